"""Stage 1, plan: the slot map, holds and victim choice of one scratchpad.

The planner knows nothing about weights; it only decides which row lives in which slot.
The engine, the simulator and the capacity advisor all use this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch


#: Maps candidate slots to the distance (in batches) to their rows' next use.
NextUseFn = Callable[[torch.Tensor], torch.Tensor]


class CapacityError(ValueError):
    """A single batch needs more distinct rows than the scratchpad has slots."""


@dataclass
class SlotPlan:
    """Where one batch's rows live, and what moves to put them there.

    Args:
        step: sequence number of the batch (monotone per planner).
        rows: the batch's distinct rows (group row space), sorted.
        slots: slot of each entry of ``rows``.
        miss_rows: rows that were not resident and must be brought in.
        miss_slots: slots they go to.
        victim_rows: resident rows evicted for them (to be written back).
        victim_slots: slots those victims held (a subset of ``miss_slots``).
        held_after: slots held by planned batches right after this plan.
    """

    step: int
    rows: torch.Tensor
    slots: torch.Tensor
    miss_rows: torch.Tensor
    miss_slots: torch.Tensor
    victim_rows: torch.Tensor
    victim_slots: torch.Tensor
    held_after: int = 0


class SlotPlanner:
    """Slot map (row -> slot, slot -> row), hold counts and victim choice.

    A slot is *held* while any planned, unreleased batch uses it; held slots are never
    victims. Victims come from unheld slots: empty ones first, then by ``policy``:
    ``"future"`` evicts the row whose next use in ``peek`` is farthest (rows not seen
    there count as never used again), ties broken by least recent use; ``"lru"`` uses
    recency only. Everything is vectorized: no Python loop runs per id.

    Args:
        num_rows: size of the row space (all tables of the group, concatenated).
        capacity: number of slots C.
        policy: ``"future"`` or ``"lru"``.
        device: where the maps live (the device the ids arrive on).

    Example::

        >>> p = SlotPlanner(num_rows=10, capacity=2)
        >>> plan = p.try_plan(torch.tensor([3, 7]), step=0)
        >>> plan.miss_rows.tolist(), p.held_slots()
        ([3, 7], 2)
        >>> p.try_plan(torch.tensor([1]), step=1) is None  # both slots are held
        True
        >>> p.release(plan)
        >>> p.try_plan(torch.tensor([1]), step=1).victim_rows.numel()
        1
    """

    def __init__(
        self,
        num_rows: int,
        capacity: int,
        policy: str = "future",
        device: Optional[torch.device] = None,
    ) -> None:
        if capacity <= 0 or num_rows <= 0:
            raise ValueError(f"capacity ({capacity}) and num_rows ({num_rows}) must be positive.")
        self.num_rows = num_rows
        self.capacity = capacity
        self.policy = policy
        dev = device or torch.device("cpu")
        self.row_to_slot = torch.full((num_rows,), -1, dtype=torch.int64, device=dev)
        self.slot_to_row = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        self.hold = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.last_use = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        self._one_buf = torch.ones(1024, dtype=torch.int32, device=dev)
        self._tag = torch.empty(num_rows, dtype=torch.int32, device=dev)  # scratch for unique()

    def held_slots(self) -> int:
        """Number of slots held by planned, unreleased batches."""
        return int((self.hold > 0).sum())

    def resident(self) -> torch.Tensor:
        """Boolean mask over slots that hold a row."""
        return self.slot_to_row >= 0

    def try_plan(
        self, rows: torch.Tensor, step: int, next_use: Optional[NextUseFn] = None
    ) -> Optional[SlotPlan]:
        """Place the distinct ``rows`` of batch ``step`` and hold their slots.

        Args:
            rows: distinct row ids of the batch (any order).
            step: the batch's sequence number; later batches have larger steps.
            next_use: maps candidate slots to how many batches ahead their rows are next
                needed (larger = later; rows not needed within the horizon share one
                largest value). None: recency only.

        Returns:
            The plan, or None when the misses do not fit in the unheld slots now (nothing
            changes then; retry after older batches are released).

        Raises:
            CapacityError: the batch alone has more distinct rows than slots.
        """
        if rows.numel() > self.capacity:
            raise CapacityError(
                f"a batch needs {rows.numel()} distinct rows but the scratchpad has "
                f"{self.capacity} slots"
            )
        slots = self.row_to_slot.index_select(0, rows)
        miss = slots < 0
        miss_rows = rows[miss]
        n_miss = miss_rows.numel()
        hit_slots = slots[~miss]
        # Hold the hits first: the candidates are then exactly the slots with no hold.
        self.hold.index_add_(0, hit_slots, self._ones(hit_slots.numel()))
        candidates = (self.hold == 0).nonzero().squeeze(1)
        if n_miss > candidates.numel():
            self.hold.index_add_(0, hit_slots, self._ones(hit_slots.numel()), alpha=-1)
            return None
        empty = rows.new_empty(0)
        victim_rows, victim_slots, miss_slots = empty, empty, empty
        if n_miss > 0:
            if n_miss == candidates.numel():
                miss_slots = candidates
            else:
                score = self._victim_score(candidates, step, next_use)
                miss_slots = candidates[torch.topk(score, n_miss, sorted=False).indices]
            old = self.slot_to_row.index_select(0, miss_slots)
            was_full = old >= 0
            if bool(was_full.all()):
                victim_rows, victim_slots = old, miss_slots
            else:
                victim_rows, victim_slots = old[was_full], miss_slots[was_full]
            self.row_to_slot.index_fill_(0, victim_rows, -1)
            self.row_to_slot.index_copy_(0, miss_rows, miss_slots)
            self.slot_to_row.index_copy_(0, miss_slots, miss_rows)
            self.hold.index_add_(0, miss_slots, self._ones(n_miss))
            slots = slots.masked_scatter(miss, miss_slots)
        self.last_use.index_fill_(0, slots, step)
        held_after = self.capacity - candidates.numel() + n_miss
        return SlotPlan(step, rows, slots, miss_rows, miss_slots, victim_rows, victim_slots, held_after)

    def release(self, plan: SlotPlan) -> None:
        """Drop the holds of a batch that has finished training."""
        self.hold.index_add_(0, plan.slots, self._ones(plan.slots.numel()), alpha=-1)

    def _ones(self, n: int) -> torch.Tensor:
        if self._one_buf.numel() < n:
            self._one_buf = torch.ones(max(n, 2 * self._one_buf.numel()), dtype=torch.int32, device=self.hold.device)
        return self._one_buf[:n]

    def unique(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Distinct rows of ``ids`` (in first-seen order) and each id's position among them.

        Linear time: a scatter into a row-indexed scratch array replaces sorting.
        """
        n = ids.numel()
        if n >= 2**31 - 1:
            return torch.unique(ids, return_inverse=True)
        pos = torch.arange(n, dtype=torch.int32, device=ids.device)
        self._tag.index_copy_(0, ids, pos)  # one winner per distinct id
        rep = self._tag.index_select(0, ids)
        first = rep == pos
        rows = ids[first]
        rank = torch.cumsum(first, 0, dtype=torch.int64) - 1
        return rows, rank.index_select(0, rep.long())

    def _victim_score(
        self, candidates: torch.Tensor, step: int, next_use: Optional[NextUseFn]
    ) -> torch.Tensor:
        """Higher is a better victim: farthest next use, then least recent use.

        Empty slots have ``last_use == -1`` and no row (so no next use): they rank first.
        """
        older = -self.last_use.index_select(0, candidates)
        if self.policy == "future" and next_use is not None:
            return next_use(candidates) * (step + 2) + older
        return older
