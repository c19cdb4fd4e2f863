"""The window of in-flight batches: which batches are planned, and when.

Batch i trains while batches i+1 .. i+L are already planned (their rows moved in).
Batches pushed beyond that wait, unplanned; their ids still guide the victim policy.
When the window's rows do not fit, planning simply waits for older batches to retire:
the effective lookahead shrinks and training stays correct.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Sequence

import torch

from torchrec_scratchpipe.core.next_use import Distance, NextUse, peek_steps
from torchrec_scratchpipe.core.plan import SlotPlan, SlotPlanner


@dataclass
class WindowEntry:
    """One batch on its way through the window.

    Args:
        step: sequence number.
        rows: distinct rows of the batch (group row space).
        payload: whatever the owner needs at train time (e.g. remapping tensors).
        plan: set once planned.
    """

    step: int
    rows: torch.Tensor
    payload: Any = None
    plan: Optional[SlotPlan] = field(default=None, repr=False)


class PlanWindow:
    """Keeps batches from ``push`` to retirement and plans up to L ahead of training.

    Args:
        planner: the slot planner of one scratchpad.
        lookahead: L; at most L+1 planned batches (the training one included) hold slots.
        horizon: H >= L; the victim policy sees the ids of batches up to H ahead of the
            training batch.
        on_planned: called with each entry right after it is planned (moves its rows in).

    Example::

        >>> w = PlanWindow(SlotPlanner(100, 8), lookahead=1, horizon=4)
        >>> for i in range(3):
        ...     _ = w.push(torch.tensor([i, i + 1]))
        >>> w.pop().step, w.planned_steps()
        (0, [0, 1])
    """

    def __init__(
        self,
        planner: SlotPlanner,
        lookahead: int,
        horizon: Optional[int] = None,
        on_planned: Optional[Callable[[WindowEntry], None]] = None,
    ) -> None:
        self.planner = planner
        self.lookahead = lookahead
        self.horizon = lookahead if horizon is None else horizon
        self.on_planned = on_planned
        self.training: Optional[WindowEntry] = None
        self.planned: Deque[WindowEntry] = deque()
        self.pending: Deque[WindowEntry] = deque()
        self.extra_peek: List[torch.Tensor] = []
        self.next_step = 0
        self.stalls = 0  # times planning waited because the window did not fit
        self.plan_seconds = 0.0  # time spent choosing slots
        self.next_use = NextUse(planner.num_rows, native=planner.native)

    def __len__(self) -> int:
        """Batches pushed and not yet popped."""
        return len(self.planned) + len(self.pending)

    def planned_steps(self) -> List[int]:
        """Steps holding slots now, the training batch first."""
        head = [self.training.step] if self.training is not None else []
        return head + [e.step for e in self.planned]

    def push(self, rows: torch.Tensor, payload: Any = None, fill: bool = True) -> WindowEntry:
        """Enqueue a future batch; plan it now if the window has room (and ``fill``)."""
        if rows.numel() > self.planner.capacity:
            # Same check the planner makes, made before anything is queued.
            self.planner.try_plan(rows, self.next_step)
        entry = WindowEntry(self.next_step, rows, payload)
        if self._tracks_next_use:
            self.next_use.push(entry.step, rows)
        self.next_step += 1
        self.pending.append(entry)
        if fill:
            self.fill()
        return entry

    def set_peek(self, rows: Sequence[torch.Tensor]) -> None:
        """Ids of batches after everything pushed (victim policy only)."""
        self.extra_peek = list(rows)

    def pop(self, fill: bool = True) -> WindowEntry:
        """Retire the previous training batch and make the oldest batch the training one.

        Args:
            fill: then plan ahead up to L batches. When False, only the new training batch
                is sure to be planned; call ``fill`` later (e.g. while it trains).
        """
        self.retire()
        if not self.planned:
            self.fill(until=1)
        if not self.planned:
            raise RuntimeError("pop() on an empty window: push a batch first.")
        self.training = self.planned.popleft()
        if fill:
            self.fill()
        return self.training

    def retire(self) -> None:
        """Release the training batch's slots (call once its optimizer update is done)."""
        if self.training is not None and self.training.plan is not None:
            self.planner.release(self.training.plan)
        self.training = None

    def clear(self) -> None:
        """Release everything and forget all queued batches."""
        self.retire()
        for e in self.planned:
            self.planner.release(e.plan)  # type: ignore[arg-type]
        self.planned.clear()
        self.pending.clear()
        self.extra_peek = []
        self.next_use.clear()

    @property
    def _tracks_next_use(self) -> bool:
        """Only a horizon beyond the lookahead and the "future" policy need next uses."""
        return self.horizon > self.lookahead and self.planner.policy == "future"

    def _distance_fn(self, step: int) -> Optional[Distance]:
        """Distance from ``step`` to each candidate slot's next use (``NEVER`` beyond H - L)."""
        if not self._tracks_next_use:
            return None
        limit = self.horizon - self.lookahead
        peek = peek_steps(self.planner.row_to_slot, self.extra_peek[:limit], self.next_step, self.planner.capacity)
        return Distance(step, limit, self.next_use.next, self.planner.slot_to_row, peek)

    def fill(self, until: Optional[int] = None) -> None:
        """Plan pending batches in order while the window has room.

        Args:
            until: stop once this many batches wait planned (besides the training one).
        """
        while (
            self.pending
            and len(self.planned) + (self.training is not None) <= self.lookahead
            and (until is None or len(self.planned) < until)
        ):
            entry = self.pending[0]
            t0 = time.perf_counter()
            plan = self.planner.try_plan(entry.rows, entry.step, self._distance_fn(entry.step))
            if plan is not None and self._tracks_next_use:
                self.next_use.planned(entry.rows)
            self.plan_seconds += time.perf_counter() - t0
            if plan is None:
                self.stalls += 1
                return
            entry.plan = plan
            self.pending.popleft()
            self.planned.append(entry)
            if self.on_planned is not None:
                self.on_planned(entry)
