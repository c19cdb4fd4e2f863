"""Stage 1, plan: the slot map, holds and victim choice of one scratchpad.

The planner knows nothing about weights; it only decides which row lives in which slot.
The engine, the simulator and the capacity advisor all use this same code. Its per-id
loops run in a fused C++ operator when that is built (``core/native.py``), else as the
PyTorch tensor code below (the reference; both give identical plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple, Union

import torch

from torchrec_scratchpipe.core import native as _native
from torchrec_scratchpipe.core.next_use import Distance, NextUse
from torchrec_scratchpipe.core.policy import VictimPolicy
from torchrec_scratchpipe.core.recency import RankedSlots, RecencyQueue


#: Maps candidate slots to how many batches ahead their rows are next needed
#: (``NEVER`` for rows not needed within the horizon).
NextUseFn = Callable[[torch.Tensor], torch.Tensor]

#: Distance of a row that no batch within the horizon needs.
NEVER = torch.iinfo(torch.int32).max


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
        counts: a device planner's plan (``core/device_plan.py``): its tensors are padded
            to the batch's id count (rows with ``num_rows``, slots with ``capacity``) and
            this int64 tensor holds ``[rows, misses, victims, held_after]`` on the device.
            None: the fields above are exact.
    """

    step: int
    rows: torch.Tensor
    slots: torch.Tensor
    miss_rows: torch.Tensor
    miss_slots: torch.Tensor
    victim_rows: torch.Tensor
    victim_slots: torch.Tensor
    held_after: int = 0
    counts: Optional[torch.Tensor] = None


def release_oldest(held: Deque[Any], step: int) -> None:
    """Pop the oldest hold of a planner's queue (entries start with their step), which must
    be ``step``'s: batches are released in the order they were planned."""
    if not held or held[0][0] != step:
        oldest = held[0][0] if held else None
        raise RuntimeError(
            f"release() of step {step}, but the oldest unreleased plan is step {oldest}: "
            "release batches in the order they were planned."
        )
    held.popleft()


def check_planner_size(num_rows: int, capacity: int) -> None:
    """Raise a ValueError unless a planner of ``capacity`` slots over ``num_rows`` rows can exist
    (both positive; slots fit the int32 maps). Every planner checks this."""
    if capacity <= 0 or num_rows <= 0:
        raise ValueError(f"capacity ({capacity}) and num_rows ({num_rows}) must be positive.")
    if capacity >= 2**31 - 1:
        raise ValueError(f"capacity ({capacity}) must be below 2**31 - 1 slots.")


class SlotPlanner:
    """Slot map (row -> slot, slot -> row), holds and victim choice.

    A slot is *held* while a planned, unreleased batch uses it; held slots are never
    victims. Plans are released in the order they were made, so a slot is held exactly
    when its last use is not older than the oldest unreleased step: holds need no
    counters. Victims come from unheld slots, walked from least recently used (empty
    slots first) by a ``RecencyQueue``: ``"lru"`` takes them in that order; ``"future"``
    first takes those whose rows ``next_use`` says are not needed within the horizon,
    and only if too few, ranks the rest by farthest next use, then least recent use.
    Everything is vectorized: no Python loop runs per id. On CPU the per-id work runs in
    the native operator when it is available (``native``), in tensor ops otherwise.

    Args:
        num_rows: size of the row space (all tables of the group, concatenated).
        capacity: number of slots C (below 2**31).
        policy: the victim policy (``core/policy.py``), or its name: ``"future"`` or ``"lru"``.
        device: where the maps live (the device the ids arrive on).
        native: use the C++ operator (True: required; False: the PyTorch path; None:
            ``SCRATCHPIPE_NATIVE``, by default the operator when built). CPU maps only.

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
        policy: Union[VictimPolicy, str] = VictimPolicy.FUTURE,
        device: Optional[torch.device] = None,
        native: Optional[bool] = None,
    ) -> None:
        check_planner_size(num_rows, capacity)
        self.num_rows = num_rows
        self.capacity = capacity
        self.policy = VictimPolicy.parse(policy)
        self.strategy = self.policy.strategy
        dev = device or torch.device("cpu")
        if native and dev.type != "cpu":
            raise ValueError(f"the native planner runs on CPU maps only, got device {dev}: pass native=None.")
        self.native = dev.type == "cpu" and _native.enabled(native)
        self.kind = "native" if self.native else "torch"
        self.device = dev
        self.row_to_slot = torch.full((num_rows,), -1, dtype=torch.int32, device=dev)
        self.slot_to_row = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        # Step of each slot's last plan (-1: never); entry ``capacity`` is a sink for misses.
        self.last_use = torch.full((capacity + 1,), -1, dtype=torch.int32, device=dev)
        self.queue = RecencyQueue(capacity, dev)
        self._held: Deque[List[int]] = deque()  # [step, slots last used at step], unreleased
        self._last_step = -1
        # de-duplication scratch: a bitmap over rows (native), or each row's first position
        size, dtype = self.dedup_scratch(num_rows, self.native)
        self._tag = torch.zeros(size, dtype=dtype, device=dev)
        self.ranked: Optional[RankedSlots] = None  # native "future" plans: candidates by next use

    @staticmethod
    def dedup_scratch(num_rows: int, native: bool) -> Tuple[int, torch.dtype]:
        """Size and dtype of the de-duplication scratch: one bit per row natively, else int32."""
        return ((num_rows + 7) // 8, torch.uint8) if native else (num_rows, torch.int32)

    @staticmethod
    def host_bytes(num_rows: int, capacity: int, native: bool = False, ranked_limit: Optional[int] = None) -> int:
        """Memory a planner allocates: the int32 row -> slot map and de-duplication scratch per
        row; int64 slot -> row, int32 last use and the recency queue's int32 pairs per slot;
        with ``ranked_limit`` (H - L of a native "future" planner), its ``RankedSlots``.

        Args:
            num_rows, capacity: the planner's row space and slots.
            native: the C++ operator plans (bitmap scratch); else the PyTorch path.
            ranked_limit: H - L when next uses rank victims natively, else None.
        """
        size, dtype = SlotPlanner.dedup_scratch(num_rows, native)
        base = 4 * num_rows + size * dtype.itemsize + 8 * capacity + 4 * (capacity + 1) + 8 * RecencyQueue.entries(capacity)
        return base + (RankedSlots.host_bytes(capacity, ranked_limit) if ranked_limit is not None else 0)

    def held_slots(self) -> int:
        """Number of slots held by planned, unreleased batches."""
        return sum(n for _, n in self._held)

    def resident(self) -> torch.Tensor:
        """Boolean mask over slots that hold a row."""
        return self.slot_to_row >= 0

    def row_count(self, rows: torch.Tensor) -> int:
        """Distinct rows in ``rows`` (as ``group_rows`` gives them: all of it)."""
        return rows.numel()

    def distinct(self, rows: torch.Tensor) -> int:
        """``row_count`` (the planner seam's host count, ``core/planner_api.py``)."""
        return rows.numel()

    def new_next_use(self) -> NextUse:
        """A next-use tracker over this planner's rows (native when the planner is)."""
        return NextUse(self.num_rows, native=self.native)

    def train_misses(self, plan: SlotPlan) -> int:
        """Rows of ``plan`` not in their planned slot now (0 by construction)."""
        return int((self.slot_to_row[plan.slots] != plan.rows).sum())

    def recency_order(self) -> torch.Tensor:
        """Unheld and held slots (int64) from least to most recently used (queue order)."""
        ranked = self.ranked.order() if self.ranked is not None else self.slot_to_row.new_empty(0)
        queued = [slots for _, slots in self.queue.chunks(self.last_use, 1 << 16)]
        return torch.cat([ranked] + queued)

    def unrank(self) -> None:
        """Put the slots ranked by next use back into the recency queue (next uses changed)."""
        if self.ranked is not None and len(self.ranked):
            self.queue.prepend(self.ranked.drain(), self.last_use)

    def try_plan(
        self, rows: torch.Tensor, step: int, next_use: Optional[NextUseFn] = None
    ) -> Optional[SlotPlan]:
        """Place the distinct ``rows`` of batch ``step`` and hold their slots.

        Args:
            rows: distinct row ids of the batch (any order, int64).
            step: the batch's sequence number; each plan's step exceeds the previous one's.
            next_use: maps candidate slots to how many batches ahead their rows are next
                needed (``NEVER`` for rows not needed within the horizon). None: recency
                only. A ``Distance`` (what ``PlanWindow`` passes) runs natively too; any
                other callable runs the PyTorch path.

        Returns:
            The plan, or None when the misses do not fit in the unheld slots now (nothing
            changes then; retry after older batches are released).

        Raises:
            CapacityError: the batch alone has more distinct rows than slots.
            ValueError: ``step`` is not larger than the last planned step.
        """
        if rows.numel() > self.capacity:
            raise CapacityError(
                f"a batch needs {rows.numel()} distinct rows but the scratchpad has "
                f"{self.capacity} slots"
            )
        if step <= self._last_step:
            raise ValueError(f"plan steps must increase: got {step} after {self._last_step}.")
        oldest_held = self._held[0][0] if self._held else step
        if self.native and (next_use is None or isinstance(next_use, Distance)):
            plan = self._plan_native(rows, step, oldest_held, next_use)
        else:
            self.unrank()
            plan = self._plan_reference(rows, step, oldest_held, next_use)
        if plan is None:
            return None
        self._last_step = step
        plan.held_after = self.held_slots()
        return plan

    def _plan_native(
        self, rows: torch.Tensor, step: int, oldest_held: int, next_use: Optional[Distance]
    ) -> Optional[SlotPlan]:
        """``try_plan`` in the fused operator: one pass for hits, one walk for victims, one to place.

        With next uses the walk moves the candidates it passes whose rows are needed within
        the horizon into ``self.ranked`` (kept across plans, so each slot is ranked once per
        release, not at every plan); victims come from there once the others run out.
        """
        next_use = self.strategy.next_use_for(next_use)
        future = next_use is not None
        limit = next_use.limit if future else 0  # type: ignore[union-attr]
        if self.ranked is not None and (not future or self.ranked.limit != limit):
            self.unrank()
            self.ranked = None
        if future and self.ranked is None:
            self.ranked = RankedSlots(self.capacity, limit)
        r = self.ranked
        slots, miss_rows, miss_slots, victim_rows, victim_slots, moved, head, ok = torch.ops.scratchpipe.plan(
            rows.to(torch.int64).contiguous(), step, self.row_to_slot, self.slot_to_row, self.last_use, self.queue.slots,
            self.queue.stamps, self.queue.head, self.queue.tail, oldest_held, next_use.next if future else None,  # type: ignore[union-attr]
            limit, *((r.link, r.seq, r.ends, r.meta) if r is not None else (None,) * 4),
        )
        if not ok:
            return None
        self.queue.advance(head)
        self.queue.append(slots, step, self.last_use)
        self._hold(moved, oldest_held, step, rows.numel())
        return SlotPlan(step, rows, slots, miss_rows, miss_slots, victim_rows, victim_slots)

    def _plan_reference(
        self, rows: torch.Tensor, step: int, oldest_held: int, next_use: Optional[NextUseFn]
    ) -> Optional[SlotPlan]:
        """``try_plan`` in PyTorch tensor ops (the reference, and the path on CUDA)."""
        slots = self.row_to_slot.index_select(0, rows).long()
        miss = slots < 0
        n_miss = int(miss.sum())
        ref = torch.where(miss, self.capacity, slots)  # misses point at the sink
        prev = self.last_use.index_select(0, ref)
        self.last_use.index_fill_(0, ref, step)  # the batch's own slots are no victims
        found = self._victims(n_miss, oldest_held, next_use) if n_miss else (slots.new_empty(0), self.queue.head)
        self.last_use[self.capacity] = -1
        if found is None:
            self.last_use.index_copy_(0, ref, prev)  # undo: nothing changes
            return None
        miss_slots, head = found
        plan = self._place(step, rows, slots, miss, miss_slots)
        self.queue.advance(head)
        self.queue.append(plan.slots, step, self.last_use)
        span = step - oldest_held
        self._hold(torch.bincount((prev - (oldest_held - 1)).clamp_(min=0), minlength=span + 1), oldest_held, step, rows.numel())
        return plan

    def _place(
        self, step: int, rows: torch.Tensor, slots: torch.Tensor, miss: torch.Tensor, miss_slots: torch.Tensor
    ) -> SlotPlan:
        """Put the missing rows into ``miss_slots``, evicting their rows; update the maps."""
        miss_at = miss.nonzero().squeeze(1)
        miss_rows = rows.index_select(0, miss_at)
        old = self.slot_to_row.index_select(0, miss_slots)
        was_full = old >= 0  # empty slots have no victim
        victim_rows, victim_slots = (old, miss_slots) if bool(was_full.all()) else (old[was_full], miss_slots[was_full])
        if miss_rows.numel():
            self.row_to_slot.index_fill_(0, victim_rows, -1)
            self.row_to_slot.index_copy_(0, miss_rows, miss_slots.int())
            self.slot_to_row.index_copy_(0, miss_slots, miss_rows)
            self.last_use.index_fill_(0, miss_slots, step)
            slots.index_copy_(0, miss_at, miss_slots)
        return SlotPlan(step, rows, slots, miss_rows, miss_slots, victim_rows, victim_slots)

    def release(self, plan: SlotPlan) -> None:
        """Drop the holds of the oldest planned batch once it has finished training."""
        release_oldest(self._held, plan.step)

    def _hold(self, moved: torch.Tensor, oldest_held: int, step: int, n: int) -> None:
        """Count the new plan's slots as held at ``step``, moving hits off older held steps.

        Args:
            moved: per step since ``oldest_held - 1`` (index 1 is ``oldest_held``), how many
                of the plan's hits were last used then.
        """
        if self._held:
            counts = moved.tolist()
            for entry in self._held:
                entry[1] -= counts[entry[0] - oldest_held + 1]
        self._held.append([step, n])

    def _victims(
        self, n: int, oldest_held: int, next_use: Optional[NextUseFn]
    ) -> Optional[Tuple[torch.Tensor, int]]:
        """``n`` victim slots among the unheld ones, and the queue head after taking them.

        Walks the recency queue's unheld prefix from the least recently used slot. Slots
        whose rows are not needed within the horizon (all of them for ``"lru"``) are
        taken in that order; only if fewer than ``n`` exist are the rest ranked.
        """
        next_use = self.strategy.next_use_for(next_use)
        future = next_use is not None
        parts: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        n_free = 0  # candidates not needed within the horizon
        for pos, slots in self.queue.chunks(self.last_use, max(2 * n, 1 << 16), before=oldest_held):
            dist = next_use(slots) if future else None  # type: ignore[misc]
            parts.append((pos, slots, dist))
            n_free += slots.numel() if dist is None else int((dist == NEVER).sum())
            if n_free >= n:
                break
        pos = torch.cat([p for p, _, _ in parts])
        slots = torch.cat([s for _, s, _ in parts])
        if slots.numel() < n:
            return None
        if not future:
            return slots[:n], int(pos[n - 1]) + 1
        dist = torch.cat([d for _, _, d in parts])  # type: ignore[misc]
        free = (dist == NEVER).nonzero().squeeze(1)
        if free.numel() >= n:
            pick = free[:n]
        else:  # farthest next use first; queue order (least recent use) breaks ties
            rest = (dist != NEVER).nonzero().squeeze(1)
            score = dist.index_select(0, rest).long() * (rest.numel() + 1) - torch.arange(rest.numel(), device=rest.device)
            pick = torch.cat([free, rest[torch.topk(score, n - free.numel(), sorted=True).indices]])
        taken = torch.zeros(slots.numel(), dtype=torch.bool, device=slots.device)
        taken[pick] = True
        head = int(pos[pick].max()) + 1
        kept = (~taken).nonzero()
        if kept.numel():
            head = min(head, int(pos[kept[0, 0]]))
        return slots.index_select(0, pick), head

    def unique(self, ids: torch.Tensor) -> torch.Tensor:
        """Distinct rows of ``ids`` (int64), in first-seen order.

        Linear time: a row-indexed scratch array replaces sorting.
        """
        return self.group_rows(ids, ids.new_zeros(1), torch.tensor([ids.numel()]))[0]

    def group_rows(
        self, values: torch.Tensor, feature_base: torch.Tensor, per_feature: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Group rows of a batch's ids and their distinct rows, in one pass where native.

        Args:
            values: the ids, feature after feature (int32 or int64, validated).
            feature_base: first group row of each feature's table (int64).
            per_feature: number of ids of each feature (int64).

        Returns:
            ``(distinct rows in first-seen order, group row of each id)``, both int64.
        """
        n = values.numel()
        if self.native:  # a native planner's maps, and so its ids, are on CPU
            ids, rows = torch.ops.scratchpipe.group_dedup(
                values.contiguous(), per_feature.to(torch.int64).contiguous(),
                feature_base.to(torch.int64).contiguous(), self._tag,
            )
            return rows, ids
        ids = values.long() + torch.repeat_interleave(feature_base.to(values.device), per_feature.to(values.device), output_size=n)
        if n >= 2**31 - 1:
            return torch.unique(ids), ids
        pos = torch.arange(n, dtype=torch.int32, device=ids.device)
        self._tag.scatter_reduce_(0, ids, pos, reduce="amin", include_self=False)  # first occurrence wins
        first = (self._tag.index_select(0, ids) == pos).nonzero().squeeze(1)
        return ids.index_select(0, first), ids
