"""RecencyQueue against a plain-Python recency list, and the planner's hold bookkeeping."""

from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_scratchpipe import SlotPlanner
from torchrec_scratchpipe.core import native
from torchrec_scratchpipe.core.next_use import Distance, NextUse
from torchrec_scratchpipe.core.recency import RecencyQueue


def live_order(q: RecencyQueue, last_use: torch.Tensor, chunk: int, before=None) -> List[int]:
    return [s for _, slots in q.chunks(last_use, chunk, before) for s in slots.tolist()]


@settings(max_examples=120, deadline=None)
@given(
    capacity=st.integers(1, 12),
    uses=st.lists(st.lists(st.integers(0, 11), max_size=12), min_size=1, max_size=40),
    chunk=st.integers(1, 7),
    cut=st.integers(-1, 45),
    slack=st.integers(0, 6),
)
def test_live_entries_are_slots_by_recency(
    capacity: int, uses: List[List[int]], chunk: int, cut: int, slack: int
) -> None:
    q = RecencyQueue(capacity, buffer=2 * capacity + slack)  # small: shifts and compactions happen
    last_use = torch.full((capacity,), -1, dtype=torch.int32)
    order = list(range(capacity))  # reference: least recently used first
    for step, used in enumerate(uses):
        slots = list(dict.fromkeys(s % capacity for s in used))  # distinct, first-seen order
        if not slots:
            continue
        last_use[torch.tensor(slots)] = step
        q.append(torch.tensor(slots, dtype=torch.int32), step, last_use)  # shifts/compacts when full
        order = [s for s in order if s not in slots] + slots
        assert live_order(q, last_use, chunk) == order
        if step % 2:  # drop the stale head, as the planner does after taking victims
            first_live = next(q.chunks(last_use, q.slots.numel()))[0][0]
            q.advance(int(first_live))
    # only entries older than ``cut`` (the unheld prefix), still in recency order
    assert live_order(q, last_use, chunk, before=cut) == [s for s in order if int(last_use[s]) < cut]
    q.compact(last_use)
    assert len(q) == capacity and live_order(q, last_use, chunk) == order


def test_buffer_stays_bounded_when_nothing_is_evicted() -> None:
    q = RecencyQueue(4, buffer=9)
    last_use = torch.full((4,), -1, dtype=torch.int32)
    for step in range(200):  # the same batch again and again: every entry goes stale
        last_use[:] = step
        q.append(torch.arange(4, dtype=torch.int32), step, last_use)
    assert len(q) <= q.slots.numel()
    assert live_order(q, last_use, 3) == [0, 1, 2, 3]


def test_planner_rejects_out_of_order_release_and_steps() -> None:
    p = SlotPlanner(num_rows=10, capacity=4)
    a = p.try_plan(torch.tensor([1]), step=0)
    b = p.try_plan(torch.tensor([2]), step=1)
    with pytest.raises(RuntimeError, match="oldest unreleased plan is step 0"):
        p.release(b)
    with pytest.raises(ValueError, match="plan steps must increase"):
        p.try_plan(torch.tensor([3]), step=1)
    p.release(a)
    p.release(b)
    assert p.held_slots() == 0


def test_held_count_follows_the_window() -> None:
    p = SlotPlanner(num_rows=20, capacity=6)
    plans = [p.try_plan(torch.tensor(rows), step=i) for i, rows in enumerate([[0, 1], [1, 2], [2, 3, 4]])]
    assert [pl.held_after for pl in plans] == [2, 3, 5]  # distinct slots of the planned batches
    p.release(plans[0])
    assert p.held_slots() == 4  # row 0 is free again; row 1 is still held by batch 1
    p.release(plans[1])
    assert p.held_slots() == 3
    stalled = p.try_plan(torch.tensor([5, 6, 7, 8]), step=3)  # 4 misses, 3 unheld slots
    assert stalled is None and p.held_slots() == 3
    plan = p.try_plan(torch.tensor([5, 6, 7]), step=3)
    assert sorted(plan.victim_rows.tolist()) == [0, 1] and plan.held_after == 6


def test_host_bytes_counts_what_the_planner_allocates() -> None:
    p = SlotPlanner(num_rows=1000, capacity=37, native=False)
    tensors = [p.row_to_slot, p._tag, p.slot_to_row, p.last_use, p.queue.slots, p.queue.stamps]
    assert SlotPlanner.host_bytes(1000, 37) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.skipif(not native.available(), reason="native planner not built")
def test_host_bytes_counts_the_native_bitmap_and_ranking() -> None:
    p = SlotPlanner(num_rows=1000, capacity=37, native=True)
    nu = NextUse(1000, native=True)
    nu.push(0, torch.tensor([1, 2]))
    p.try_plan(torch.tensor([1, 2]), step=0, next_use=Distance(0, 5, nu.next, p.slot_to_row))
    assert p.ranked is not None and p.ranked.limit == 5
    tensors = [p.row_to_slot, p._tag, p.slot_to_row, p.last_use, p.queue.slots, p.queue.stamps]
    tensors += [p.ranked.link, p.ranked.seq, p.ranked.ends, p.ranked.meta]
    assert SlotPlanner.host_bytes(1000, 37, native=True, ranked_limit=5) == sum(t.numel() * t.element_size() for t in tensors)
