"""Stage 1 on the device: the slot planner as a fixed sequence of tensor ops.

``DevicePlanner`` makes the plans ``SlotPlanner`` makes (``core/plan.py``: same slots,
victims, maps, holds and next uses, bit for bit), with all of its state on the
scratchpad's device and no operation whose output shape depends on data: no ``.item()``,
``nonzero``, ``unique`` or boolean-mask indexing on its tensors. Shapes follow from the
batch's id count ``P``:

- de-duplication scatters each id's position into a per-row tag (``amin``), keeps the
  ids whose tag is their own position (their first occurrence) and compacts them, in
  first-seen order, into ``P`` entries padded with the sentinel row ``num_rows``;
- every slot's recency is a sequence number ``seq`` (appended slots get increasing
  numbers, as ``RecencyQueue`` appends them), so recency order is ``seq`` order;
- victims: one ``topk(min(P, C))`` over a per-slot int64 key: held slots last; then rows
  not needed within the horizon, least recent first; then the rest by farthest next use,
  least recent first. The first ``misses`` of them go to the misses, in row order;
- misses, victims and their slots are compacted with a prefix sum and one scatter each;
  the maps are written through indices that send padding to sink entries (row
  ``num_rows``, slot ``C``), and only when the plan fits (a device flag ``ok``).

Where the host still reads the device (``torch.cuda`` would synchronize):

- ``try_plan`` reads ``ok`` only when a stall is possible: when the id counts of the
  unreleased batches plus this one exceed C. Otherwise the misses fit by counting (held
  slots <= their batches' ids) and the plan is not read at all;
- ``distinct`` (the capacity check of a batch with more ids than slots, and messages),
  ``held_slots`` and ``stats()`` (counts accumulate on the device until read).

Example::

    >>> p = DevicePlanner(num_rows=10, capacity=2)
    >>> rows, ids = p.group_rows(torch.tensor([3, 7, 3]), torch.tensor([0]), torch.tensor([3]))
    >>> rows.tolist()                                  # padded with the sentinel row 10
    [3, 7, 10]
    >>> plan = p.try_plan(rows, step=0)
    >>> plan.miss_rows.tolist(), plan.counts.tolist()  # [rows, misses, victims, held]
    ([3, 7, 10], [2, 2, 0, 2])
    >>> p.try_plan(p.group_rows(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))[0], step=1) is None
    True
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional, Tuple, Union

import torch

from torchrec_scratchpipe.core.device_next_use import DeviceNextUse
from torchrec_scratchpipe.core.plan import NEVER, CapacityError, NextUseFn, SlotPlan, check_planner_size, release_oldest
from torchrec_scratchpipe.core.policy import VictimPolicy
from torchrec_scratchpipe.defaults import MAX_HORIZON

#: Bits of a victim key below the next-use part: a slot's recency ``seq`` lives there.
SEQ_BITS = 52
_INT64_MAX = torch.iinfo(torch.int64).max


class DevicePlanner:
    """Slot map, recency, holds and victim choice on the scratchpad's device.

    Args:
        num_rows: size of the row space (all tables of the group, concatenated).
        capacity: number of slots C (below 2**31).
        policy: the victim policy or its name (``"future"``, ``"lru"``).
        device: where every tensor of the planner lives.

    State on the device: ``row_to_slot`` (int32 per row), ``slot_to_row`` (int64 per
    slot), ``last_use`` (int32 per slot: the step of its last plan), ``seq`` (int64 per
    slot: recency), the de-duplication tag (int32 per row), each with one sink entry.
    On the host: the steps and id counts of unreleased plans (a slot is held while its
    last use is not older than the oldest of them) and the next sequence number.
    """

    kind = "device"

    def __init__(
        self,
        num_rows: int,
        capacity: int,
        policy: Union[VictimPolicy, str] = VictimPolicy.FUTURE,
        device: Optional[torch.device] = None,
    ) -> None:
        check_planner_size(num_rows, capacity)
        self.num_rows = num_rows
        self.capacity = capacity
        self.policy = VictimPolicy.parse(policy)
        self.strategy = self.policy.strategy
        self.device = dev = device or torch.device("cpu")
        c = capacity
        self._r2s = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=dev)  # + the sentinel row
        self.row_to_slot = self._r2s[:num_rows]
        self._s2r = torch.full((c + 1,), -1, dtype=torch.int64, device=dev)  # + the sink slot
        self.slot_to_row = self._s2r[:c]
        self.last_use = torch.full((c + 1,), -1, dtype=torch.int32, device=dev)
        self._seq = torch.arange(c + 1, dtype=torch.int64, device=dev)  # recency: never-used slots in slot order
        self._tag = torch.zeros(num_rows + 1, dtype=torch.int32, device=dev)
        self._slots = torch.arange(c, dtype=torch.int64, device=dev)
        self._next_seq = c
        self._held: Deque[Tuple[int, int]] = deque()  # (step, ids) of unreleased plans
        self._last_step = -1

    @staticmethod
    def device_bytes(num_rows: int, capacity: int) -> int:
        """Bytes of the planner's own state on the device: int32 map and tag per row;
        int64 slot -> row, int32 last use, int64 recency and int64 candidate list per slot."""
        return 8 * (num_rows + 1) + 28 * (capacity + 1) + 8 * capacity

    # ---------------------------------------------------------------- rows in
    def group_rows(
        self, values: torch.Tensor, feature_base: torch.Tensor, per_feature: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(distinct rows padded to the id count, group row of each id)``, on the device.

        Args:
            values: the ids, feature after feature (int32 or int64, validated).
            feature_base: first group row of each feature's table (int64).
            per_feature: number of ids of each feature (int64, host).
        """
        n = values.numel()
        base = self._on_device(feature_base)
        ids = self._on_device(values).long() + torch.repeat_interleave(base, self._on_device(per_feature), output_size=n)
        return self.dedup(ids), ids

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the planner's device; from host memory to CUDA through pinned memory, so
        the copy is asynchronous (the host does not wait for the device)."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def dedup(self, ids: torch.Tensor) -> torch.Tensor:
        """Distinct rows of ``ids`` in first-seen order, padded with ``num_rows`` to ``len(ids)``."""
        n = ids.numel()
        pos = torch.arange(n, dtype=torch.int32, device=ids.device)
        self._tag.scatter_reduce_(0, ids, pos, reduce="amin", include_self=False)  # first occurrence wins
        first = self._tag.index_select(0, ids) == pos
        at = torch.where(first, first.cumsum(0) - 1, n)
        out = torch.full((n + 1,), self.num_rows, dtype=torch.int64, device=ids.device)
        return out.scatter_(0, at, ids)[:n]

    def unique(self, ids: torch.Tensor) -> torch.Tensor:
        """``dedup`` of ``ids`` (the ``SlotPlanner.unique`` of the device planner: padded)."""
        return self.dedup(ids.to(self.device).long())

    def row_count(self, rows: torch.Tensor) -> torch.Tensor:
        """Distinct rows in padded ``rows``: a 0-dim device tensor."""
        return (rows < self.num_rows).sum()

    def distinct(self, rows: torch.Tensor) -> int:
        """``row_count`` read on the host (waits for the device)."""
        return int(self.row_count(rows))

    def new_next_use(self) -> DeviceNextUse:
        """The window's next-use tracker, on this planner's device."""
        return DeviceNextUse(self.num_rows, self.device)

    # ---------------------------------------------------------------- holds
    def held_slots(self) -> int:
        """Slots held by planned, unreleased batches (reads the device)."""
        if not self._held:
            return 0
        return int((self.last_use[: self.capacity] >= self._held[0][0]).sum())

    def resident(self) -> torch.Tensor:
        """Boolean mask over slots that hold a row."""
        return self.slot_to_row >= 0

    def release(self, plan: SlotPlan) -> None:
        """Drop the holds of the oldest planned batch once it has finished training."""
        release_oldest(self._held, plan.step)

    def unrank(self) -> None:
        """Nothing is ranked across plans here: every plan ranks every slot afresh."""

    def train_misses(self, plan: SlotPlan) -> torch.Tensor:
        """Rows of ``plan`` not in their planned slot now (a 0-dim device tensor; 0 by construction)."""
        wrong = self._s2r.index_select(0, plan.slots) != plan.rows
        return (wrong & (plan.rows < self.num_rows)).sum()

    # ---------------------------------------------------------------- plan
    def try_plan(self, rows: torch.Tensor, step: int, next_use: Optional[NextUseFn] = None) -> Optional[SlotPlan]:
        """Place batch ``step``'s padded distinct ``rows`` and hold their slots.

        Args:
            rows: as ``group_rows`` gives them (distinct rows first, then ``num_rows``).
            step: the batch's sequence number; each plan's step exceeds the previous one's.
            next_use: maps candidate slots to how many batches ahead their rows are next
                needed (``NEVER`` beyond the horizon); called once, on every slot.

        Returns:
            The plan (padded, with ``counts``), or None when the misses do not fit in the
            unheld slots now (nothing changes then).

        Raises:
            CapacityError: the batch alone has more distinct rows than slots.
            ValueError: ``step`` is not larger than the last planned step.
        """
        n = rows.numel()
        if n > self.capacity and self.distinct(rows) > self.capacity:
            raise CapacityError(
                f"a batch needs {self.distinct(rows)} distinct rows but the scratchpad has {self.capacity} slots"
            )
        if step <= self._last_step:
            raise ValueError(f"plan steps must increase: got {step} after {self._last_step}.")
        if self._next_seq + n >= 1 << SEQ_BITS:
            self._renumber()
        oldest_held = self._held[0][0] if self._held else step
        next_use = self.strategy.next_use_for(next_use)
        dist = next_use(self._slots) if next_use is not None else None
        plan, ok = self.plan_step(rows, step, oldest_held, dist)
        could_stall = sum(k for _, k in self._held) + n > self.capacity
        if could_stall and not bool(ok):  # the one read of the device on the plan path
            return None
        self._held.append((step, n))
        self._last_step = step
        self._next_seq += n
        return plan

    def plan_step(
        self, rows: torch.Tensor, step: int, oldest_held: int, dist: Optional[torch.Tensor]
    ) -> Tuple[SlotPlan, torch.Tensor]:
        """One plan as a fixed sequence of tensor ops; the state changes only if it fits.

        Args:
            rows: padded distinct rows ``[P]``.
            step, oldest_held: the batch's step and the oldest unreleased one (``step``
                when none is held).
            dist: per slot, batches until its row is next needed (``NEVER``: not within
                the horizon), or None (recency only).

        Returns:
            ``(plan, ok)``: the padded plan and a 0-dim bool device tensor, False when
            the misses do not fit in the unheld slots (a stall: nothing was written).
        """
        c, sink_row, dev = self.capacity, self.num_rows, rows.device
        n = rows.numel()
        j = torch.arange(n, device=dev)
        valid = rows < sink_row
        found = self._r2s.index_select(0, rows).long()
        hit = found >= 0
        miss = valid & ~hit
        n_miss = miss.sum()
        # a slot is a candidate when its last use is older than every unreleased plan and
        # this batch does not hit it (its hits are stamped as used now)
        used = torch.zeros(c + 1, dtype=torch.bool, device=dev).index_fill_(0, torch.where(hit, found, c), True)
        unheld = (self.last_use[:c] < oldest_held) & ~used[:c]
        ok = n_miss <= unheld.sum()
        # victim order: not needed within the horizon first, then farthest next use; least
        # recent (smallest seq) first among equals; held slots never
        seq = self._seq[:c]
        if dist is not None:
            part = torch.where(dist == NEVER, 0, 1 + MAX_HORIZON - dist.long())
            seq = (part << SEQ_BITS) | seq
        key = torch.where(unheld, seq, _INT64_MAX)
        order = torch.topk(key, min(n, c), largest=False, sorted=True).indices
        if n > c:  # only when ids repeat: misses <= c still
            order = torch.cat([order, order.new_full((n - c,), c)])
        miss_slots = torch.where(j < n_miss, order, c)
        rank = (miss.cumsum(0) - 1).clamp_(min=0)
        slots = torch.where(miss, miss_slots.index_select(0, rank), torch.where(valid, found, c))
        old = self._s2r.index_select(0, miss_slots)
        was_full = old >= 0
        n_victims = was_full.sum()
        miss_rows = self._compact(miss, rank, rows, sink_row)
        v_at = (was_full.cumsum(0) - 1).clamp_(min=0)
        victim_rows = self._compact(was_full, v_at, old, sink_row)
        victim_slots = self._compact(was_full, v_at, miss_slots, c)
        # commit, only if the plan fits: padding and a stall write the sink entries
        placed = (j < n_miss) & ok
        self._r2s.index_fill_(0, torch.where(was_full & ok, old, sink_row), -1)
        self._r2s.index_put_((torch.where(placed, miss_rows, sink_row),), torch.where(placed, miss_slots, -1).int())
        self._s2r.index_put_((torch.where(placed, miss_slots, c),), torch.where(placed, miss_rows, -1))
        into = torch.where(valid & ok, slots, c)
        self.last_use.index_fill_(0, into, step)
        self._seq.index_put_((into,), j + self._next_seq)
        held_after = (self.last_use[:c] >= oldest_held).sum()
        counts = torch.stack([valid.sum(), n_miss, n_victims, held_after])
        plan = SlotPlan(step, rows, slots, miss_rows, miss_slots, victim_rows, victim_slots, 0, counts)
        return plan, ok

    @staticmethod
    def _compact(keep: torch.Tensor, at: torch.Tensor, values: torch.Tensor, pad: int) -> torch.Tensor:
        """``values[keep]`` in order, then ``pad``: one scatter into ``len(values) + 1`` entries."""
        n = values.numel()
        out = values.new_full((n + 1,), pad)
        return out.scatter_(0, torch.where(keep, at, n), values)[:n]

    def _renumber(self) -> None:
        """Replace the recency numbers by their ranks (order kept), before they outgrow ``SEQ_BITS``."""
        c = self.capacity
        order = torch.argsort(self._seq[:c])
        self._seq[:c].index_copy_(0, order, torch.arange(c, dtype=torch.int64, device=self.device))
        self._next_seq = c

    # ---------------------------------------------------------------- host copies (tests, reports)
    def exact(self, plan: SlotPlan) -> SlotPlan:
        """``plan`` with its padding cut off (reads the device: for tests and reports)."""
        if plan.counts is None:
            return plan
        m, n_miss, n_v, held = (int(x) for x in plan.counts.tolist())
        return SlotPlan(
            plan.step, plan.rows[:m], plan.slots[:m], plan.miss_rows[:n_miss], plan.miss_slots[:n_miss],
            plan.victim_rows[:n_v], plan.victim_slots[:n_v], held_after=held,
        )
