"""Next use of every row among the queued batches, kept incrementally.

The victim policy ranks resident rows by when they are next needed. Re-scanning every
queued batch at each plan costs O(horizon x batch); this keeps, in O(batch) per batch,
each row's next occurrence after its last *planned* occurrence:

- ``push(step, rows)``: rows whose previous occurrence is still waiting to be planned get
  a successor link (stored with that earlier batch); the others learn ``step`` directly.
- ``planned(entry)``: the batch's rows now point at their successors (or "none").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

NONE = torch.iinfo(torch.int32).max  # "no known next use"


class NextUse:
    """Per-row next-use step over a FIFO of pushed batches.

    Args:
        num_rows: size of the row space.
        native: link rows in the C++ operator (``core/native.py``; must be loaded).

    Example::

        >>> nu = NextUse(10)
        >>> nu.push(0, torch.tensor([1, 2]))
        >>> nu.push(1, torch.tensor([2, 3]))
        >>> nu.planned(torch.tensor([1, 2]))   # batch 0 planned: row 2 is next used at 1
        >>> nu.step_of(torch.tensor([1, 2, 3])).tolist() == [NONE, 1, 1]
        True
    """

    def __init__(self, num_rows: int, native: bool = False) -> None:
        self.native = native
        # one record per row (a single cache line to touch): next use, last pushed step,
        # position in that batch
        self._state = torch.tensor([NONE, -1, 0], dtype=torch.int32).repeat(num_rows, 1)
        self.next = self._state[:, 0]
        self._last_step = self._state[:, 1]
        self._last_pos = self._state[:, 2]
        self._succ = torch.empty(0, dtype=torch.int32)  # successor links, one slice per waiting batch
        self._used = 0
        self._waiting: List[List[int]] = []  # [step, base, length] of batches not yet planned

    def push(self, step: int, rows: torch.Tensor) -> None:
        """Record a batch (distinct ``rows``) pushed at ``step``."""
        n = rows.numel()
        base = self._alloc(n)
        first_waiting = self._waiting[0][0] if self._waiting else step
        if self.native:
            bases = torch.tensor([w[1] for w in self._waiting], dtype=torch.int64)
            torch.ops.scratchpipe.next_use_push(rows.contiguous(), step, self._state, self._succ, bases, first_waiting)
        else:
            self._push_reference(step, rows, first_waiting)
        self._waiting.append([step, base, n])

    def _push_reference(self, step: int, rows: torch.Tensor, first_waiting: int) -> None:
        prev = self._last_step.index_select(0, rows)
        waiting = prev >= first_waiting
        if bool(waiting.any()):
            bases = torch.tensor([w[1] for w in self._waiting], dtype=torch.int64)
            w_rows = rows[waiting]
            slot = bases[(prev[waiting] - first_waiting).long()] + self._last_pos.index_select(0, w_rows).long()
            self._succ.index_fill_(0, slot, step)
        self.next.index_fill_(0, rows[~waiting], step)
        self._last_step.index_fill_(0, rows, step)
        self._last_pos.index_copy_(0, rows, torch.arange(rows.numel(), dtype=torch.int32))

    def planned(self, rows: torch.Tensor) -> None:
        """The oldest waiting batch, whose distinct rows are ``rows``, was planned."""
        _, base, n = self._waiting.pop(0)
        if n != rows.numel():
            raise RuntimeError("NextUse: batches must be planned in the order they were pushed.")
        if self.native:
            torch.ops.scratchpipe.next_use_planned(rows.contiguous(), self._state, self._succ[base : base + n])
        else:
            self.next.index_copy_(0, rows, self._succ[base : base + n])

    def step_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Next-use step of ``rows`` (``NONE`` where unknown; ``rows < 0`` give ``NONE``)."""
        out = self.next.index_select(0, rows.clamp(min=0))
        return torch.where(rows >= 0, out, torch.full_like(out, NONE))

    def clear(self) -> None:
        self.next.fill_(NONE)
        self._last_step.fill_(-1)
        self._waiting.clear()
        self._used = 0

    def _alloc(self, n: int) -> int:
        live = sum(w[2] for w in self._waiting)
        if self._used + n > self._succ.numel():
            new = torch.empty(max(2 * (live + n), 1024), dtype=torch.int32)
            pos = 0
            for w in self._waiting:  # compact the waiting batches' links to the front
                new[pos : pos + w[2]] = self._succ[w[1] : w[1] + w[2]]
                w[1] = pos
                pos += w[2]
            self._succ, self._used = new, pos
        base = self._used
        self._succ[base : base + n] = NONE
        self._used += n
        return base


@dataclass
class Distance:
    """How many batches after ``step`` each candidate slot's row is next needed.

    The victim policy's view of the future at one plan: ``NEVER`` (``NONE``) for rows no
    batch within ``limit`` steps needs. Callable on candidate slots (the PyTorch planner);
    the native planner reads the fields directly.

    Args:
        step: the step being planned.
        limit: farthest distance that counts (H - L).
        next: next-use step per row (``NextUse.next``).
        slot_to_row: the planner's slot -> row map.

    Example::

        >>> d = Distance(0, 2, torch.tensor([1, NONE, 5], dtype=torch.int32), torch.tensor([2, 0, -1]))
        >>> d(torch.tensor([0, 1, 2])).tolist() == [NONE, 1, NONE]  # row 2 at 5 > 2 steps
        True
    """

    step: int
    limit: int
    next: torch.Tensor
    slot_to_row: torch.Tensor

    def __call__(self, candidates: torch.Tensor) -> torch.Tensor:
        rows = self.slot_to_row.index_select(0, candidates)
        nxt = self.next.index_select(0, rows.clamp(min=0))
        nxt = torch.where(rows >= 0, nxt, torch.full_like(nxt, NONE))
        d = nxt - self.step
        return torch.where((nxt == NONE) | (d > self.limit), NONE, d)
