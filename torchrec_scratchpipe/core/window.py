"""The window of in-flight batches: which batches are planned, and when.

Batch i trains while batches i+1 .. i+L are already planned (their rows moved in).
Batches pushed beyond that wait, unplanned; their ids still guide the victim policy.
A batch taken for training keeps its slots until its update is done (``finish``), so
several forwards may precede one backward. When the window's rows do not fit, planning
simply waits for older batches to retire: the effective lookahead shrinks and training
stays correct.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional

import torch

from torchrec_scratchpipe.core.next_use import Distance
from torchrec_scratchpipe.core.plan import CapacityError, SlotPlan, SlotPlanner
from torchrec_scratchpipe.core.planner_api import NextUseTracker, Planner
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.defaults import check_window


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
    done: bool = False  # its update has run (or it never trains): its slots may be released


class PlanWindow:
    """Keeps batches from ``push`` to retirement and plans up to L ahead of training.

    Args:
        planner: the slot planner of one scratchpad (any ``core/planner_api.Planner``).
        lookahead: L; planning ahead stops once L+1 batches (those taken for training and
            not yet finished included) hold slots.
        horizon: H >= L; the victim policy sees the ids of batches up to H ahead of the
            training batch.
        on_planned: called with each entry right after it is planned (moves its rows in).
        name: whose scratchpad this is, for messages (e.g. ``"table group 'dim8_sum'
            (tables ['t0'])"``).
        stats: the counters it reports into (``window_stalls``, ``planner_s``): the table
            group's. None: a ``GroupStats`` of its own.

    Example::

        >>> w = PlanWindow(SlotPlanner(100, 8), lookahead=1, horizon=4)
        >>> for i in range(3):
        ...     _ = w.push(torch.tensor([i, i + 1]))
        >>> w.pop().step, w.planned_steps()
        (0, [0, 1])
        >>> second = w.take()                      # a second forward before the first backward
        >>> w.finish(second); w.retire_done()      # its update ran first: it waits for batch 0
        0
        >>> w.finish(w.trained[0]); w.retire_done(), w.planned_steps()
        (2, [])
    """

    def __init__(
        self,
        planner: Planner,
        lookahead: int,
        horizon: Optional[int] = None,
        on_planned: Optional[Callable[[WindowEntry], None]] = None,
        name: str = "scratchpad",
        stats: Optional[GroupStats] = None,
    ) -> None:
        self.planner = planner
        self.name = name
        self.stats = GroupStats() if stats is None else stats
        self.lookahead = lookahead
        self.horizon = check_window(lookahead, horizon)
        self.on_planned = on_planned
        self.trained: Deque[WindowEntry] = deque()  # taken for training, slots held until retired
        self.planned: Deque[WindowEntry] = deque()
        self.pending: Deque[WindowEntry] = deque()
        self.next_step = 0
        self.next_use: NextUseTracker = planner.new_next_use()

    @property
    def stalls(self) -> int:
        """Times planning waited because the window did not fit (``stats.window_stalls``)."""
        return self.stats.window_stalls

    def __len__(self) -> int:
        """Batches pushed and not yet popped."""
        return len(self.planned) + len(self.pending)

    @property
    def training(self) -> Optional[WindowEntry]:
        """The batch taken for training most recently and not yet retired."""
        return self.trained[-1] if self.trained else None

    def planned_steps(self) -> List[int]:
        """Steps holding slots now, oldest first (batches taken for training first)."""
        return [e.step for e in self.trained] + [e.step for e in self.planned]

    def check_fits(self, rows: torch.Tensor) -> None:
        """The capacity check of a batch, made once, before it is queued.

        Raises:
            CapacityError: the batch alone has more distinct ``rows`` than the scratchpad
                has slots (names the scratchpad, the rows needed and the slots).
        """
        c = self.planner.capacity
        if rows.numel() <= c:  # no count needed (a device planner's rows are padded: reading them waits)
            return
        n = self.planner.distinct(rows)
        if n > c:
            raise CapacityError(
                f"{self.name}: one batch needs {n} distinct rows but the scratchpad has {c} slots. "
                f"Raise cache_rows/load_factor to at least {n} rows, or use smaller batches."
            )

    def push(self, rows: torch.Tensor, payload: Any = None, fill: bool = True, checked: bool = False) -> WindowEntry:
        """Enqueue a future batch; plan it now if the window has room (and ``fill``).

        Args:
            rows: the batch's distinct rows.
            payload: kept in the entry for the owner.
            fill: plan ahead now.
            checked: the caller already ran ``check_fits(rows)`` (the engine does, for every
                group, before it queues anything), so it is not repeated here.

        Raises:
            CapacityError: as ``check_fits``; nothing is queued then.
        """
        if not checked:
            self.check_fits(rows)
        entry = WindowEntry(self.next_step, rows, payload)
        if self._tracks_next_use:
            self.next_use.push(entry.step, rows)
        self.next_step += 1
        self.pending.append(entry)
        if fill:
            self.fill()
        return entry

    def pop(self, fill: bool = True) -> WindowEntry:
        """Retire every batch taken before and take the oldest batch for training.

        For a loop with one update per forward (the simulator's). Raises RuntimeError on
        an empty window.
        """
        self.retire()
        entry = self.take(fill)
        if entry is None:  # nothing is held after retire(): only an empty window gets here
            raise RuntimeError("pop() on an empty window: push a batch first.")
        return entry

    def plan_head(self) -> bool:
        """Make sure the oldest queued batch is planned, whatever the lookahead.

        Returns False when its rows do not fit beside the slots held now (nothing changes).
        """
        if self.planned:
            return True
        if not self.pending:
            raise RuntimeError("no batch is queued: push a batch first.")
        return self._plan_next()

    def take(self, fill: bool = True) -> Optional[WindowEntry]:
        """Take the oldest queued batch for training; its slots stay held until it is retired.

        Args:
            fill: then plan ahead up to L batches. When False, only the taken batch is sure
                to be planned; call ``fill`` later (e.g. once its training is launched).

        Returns:
            The batch, or None when its rows do not fit beside the slots held by batches
            taken before and not yet finished (nothing changes then).
        """
        if not self.pending and not self.planned:
            return None
        if not self.plan_head():
            return None
        entry = self.planned.popleft()
        self.trained.append(entry)
        if fill:
            self.fill()
        return entry

    @staticmethod
    def finish(entry: WindowEntry) -> None:
        """Mark a taken batch's update as done (safe from any thread; releases nothing yet)."""
        entry.done = True

    def retire_done(self) -> int:
        """Release the slots of finished batches, oldest first; return how many retired.

        A finished batch behind an unfinished one waits for it: plans release in order.
        """
        n = 0
        while self.trained and self.trained[0].done:
            entry = self.trained.popleft()
            if entry.plan is not None:
                self.planner.release(entry.plan)
            n += 1
        return n

    def retire(self) -> None:
        """Finish and release every batch taken for training."""
        for entry in self.trained:
            entry.done = True
        self.retire_done()

    def clear(self) -> None:
        """Forget every queued batch (planned or not); batches taken for training stay held
        until they finish, and the dropped plans are released after them, in order."""
        for entry in self.planned:
            entry.done = True
            self.trained.append(entry)
        self.planned.clear()
        self.pending.clear()
        self.next_use.clear()
        self.planner.unrank()  # its ranking read the next uses just forgotten
        self.retire_done()

    @property
    def _tracks_next_use(self) -> bool:
        """Only a horizon beyond the lookahead and a policy that ranks by next use need next uses."""
        return self.horizon > self.lookahead and self.planner.strategy.ranks_by_next_use

    def _distance_fn(self, step: int) -> Optional[Distance]:
        """Distance from ``step`` to each candidate slot's next use (``NEVER`` beyond H - L)."""
        if not self._tracks_next_use:
            return None
        return Distance(step, self.horizon - self.lookahead, self.next_use.next, self.planner.slot_to_row)

    def fill(self, until: Optional[int] = None) -> None:
        """Plan pending batches in order while fewer than L+1 batches hold slots.

        Args:
            until: stop once this many batches wait planned (besides those taken).
        """
        while (
            self.pending
            and len(self.trained) + len(self.planned) <= self.lookahead
            and (until is None or len(self.planned) < until)
        ):
            if not self._plan_next():
                return

    def _plan_next(self) -> bool:
        """Plan the oldest pending batch; False (a stall) when its rows do not fit now."""
        entry = self.pending[0]
        t0 = time.perf_counter()
        plan = self.planner.try_plan(entry.rows, entry.step, self._distance_fn(entry.step))
        if plan is not None and self._tracks_next_use:
            self.next_use.planned(entry.rows)
        self.stats.planner_s += time.perf_counter() - t0
        if plan is None:
            self.stats.window_stalls += 1
            return False
        entry.plan = plan
        self.pending.popleft()
        self.planned.append(entry)
        if self.on_planned is not None:
            self.on_planned(entry)
        return True
