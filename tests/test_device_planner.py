"""The device planner makes the host planners' plans, bit for bit (on CPU tensors).

Every program runs three windows side by side: the device planner's, the PyTorch
reference's and (when built) the native operator's, over random streams of ids with
repeats (so the device planner's padding is in play), random capacities, lookaheads,
horizons and both victim policies, with stalls, forwards taken before earlier batches
finish, window clears and horizon changes. After every operation the plans (padding cut
off), maps, last uses, holds, recency order, next uses and stalls must be equal.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_scratchpipe import PlanWindow, SlotPlanner
from torchrec_scratchpipe.core import native
from torchrec_scratchpipe.core.device_plan import DevicePlanner
from torchrec_scratchpipe.core.plan import CapacityError, SlotPlan

NUM_ROWS = 40
FIELDS = ("rows", "slots", "miss_rows", "miss_slots", "victim_rows", "victim_slots")


def host_view(w: PlanWindow, plan: SlotPlan) -> SlotPlan:
    return w.planner.exact(plan) if isinstance(w.planner, DevicePlanner) else plan


def recency(p) -> List[int]:
    if isinstance(p, DevicePlanner):
        return torch.argsort(p._seq[: p.capacity]).tolist()
    return p.recency_order().tolist()


def assert_same(ref: PlanWindow, dev: PlanWindow) -> None:
    entries = list(ref.trained) + list(ref.planned)
    others = list(dev.trained) + list(dev.planned)
    assert [e.step for e in entries] == [e.step for e in others]
    for a, b in zip(entries, others):
        pa, pb = host_view(ref, a.plan), host_view(dev, b.plan)
        for f in FIELDS:
            assert torch.equal(getattr(pa, f), getattr(pb, f)), (a.step, f, getattr(pa, f), getattr(pb, f))
        assert pa.held_after == pb.held_after, a.step
    p, q = ref.planner, dev.planner
    assert torch.equal(p.row_to_slot, q.row_to_slot)
    assert torch.equal(p.slot_to_row, q.slot_to_row)
    assert torch.equal(p.last_use[: p.capacity], q.last_use[: q.capacity])
    assert p.held_slots() == q.held_slots()
    assert [s for s, _ in p._held] == [s for s, _ in q._held]
    assert recency(p) == recency(q)
    assert torch.equal(ref.next_use.next, dev.next_use.next)
    assert ref.stalls == dev.stalls


def windows(capacity: int, policy: str, lookahead: int, horizon: int) -> List[PlanWindow]:
    planners = [DevicePlanner(NUM_ROWS, capacity, policy), SlotPlanner(NUM_ROWS, capacity, policy, native=False)]
    if native.available():
        planners.append(SlotPlanner(NUM_ROWS, capacity, policy, native=True))
    return [PlanWindow(p, lookahead, horizon) for p in planners]


@st.composite
def programs(draw) -> Tuple[int, int, int, str, List[Tuple[str, List[int], int]]]:
    capacity = draw(st.integers(2, 16))
    lookahead = draw(st.integers(0, 4))
    horizon = lookahead + draw(st.integers(0, 6))
    policy = draw(st.sampled_from(["future", "lru"]))

    @st.composite
    def ids(d) -> List[int]:  # ids with repeats, at most ``capacity`` distinct
        rows = d(st.lists(st.integers(0, NUM_ROWS - 1), min_size=0, max_size=capacity, unique=True))
        if not rows:
            return []
        return d(st.lists(st.sampled_from(rows), min_size=len(rows), max_size=2 * len(rows) + 2)) + rows

    kinds = st.sampled_from(["push"] * 9 + ["pop"] * 6 + ["take"] * 2 + ["finish"] * 2 + ["clear", "horizon"])
    ops = draw(st.lists(st.tuples(kinds, ids(), st.integers(0, 8)), min_size=10, max_size=60))
    return capacity, lookahead, horizon, policy, ops


def run(w: PlanWindow, op: str, ids: List[int], h: int) -> None:
    if op == "push":
        w.push(w.planner.unique(torch.tensor(ids, dtype=torch.int64)))
    elif op == "pop" and len(w):
        w.pop()
    elif op == "take":
        w.take()
    elif op == "finish" and w.trained:
        w.finish(w.trained[0])
        w.retire_done()
    elif op == "clear":
        w.clear()
    elif op == "horizon":  # as ScratchPipeEmbeddingBags.set_window does
        w.retire()
        w.clear()
        w.horizon = w.lookahead + h


@settings(max_examples=120, deadline=None)
@given(programs())
def test_device_planner_plans_as_the_host_planners(program) -> None:
    capacity, lookahead, horizon, policy, ops = program
    ws = windows(capacity, policy, lookahead, horizon)
    for op, ids, h in ops:
        for w in ws:
            run(w, op, ids, h)
        for other in ws[1:]:
            assert_same(other, ws[0])


def test_streams_cover_stalls_victims_and_ranking() -> None:
    """The comparison is not vacuous: a busy stream stalls, evicts and ranks by next use."""
    g = torch.Generator().manual_seed(3)
    ws = windows(10, "future", 2, 6)
    victims = ranked = 0
    for _ in range(60):
        distinct = torch.randperm(NUM_ROWS, generator=g)[: int(torch.randint(3, 10, (1,), generator=g))]
        ids = torch.cat([distinct[torch.randint(0, distinct.numel(), (12,), generator=g)], distinct])
        for w in ws:
            w.push(w.planner.unique(ids))
            if len(w) > 6:
                w.pop()
        for other in ws[1:]:
            assert_same(other, ws[0])
        if ws[1].planned:
            victims += ws[1].planned[-1].plan.victim_rows.numel()
        if len(ws) > 2:
            ranked = max(ranked, len(ws[2].planner.ranked or []))
    assert ws[0].stalls > 0 and victims > 0
    assert ranked > 0 or not native.available()


def test_padded_plan_fields() -> None:
    p = DevicePlanner(NUM_ROWS, 4)
    rows = p.unique(torch.tensor([5, 6, 5, 5, 7, 6]))
    assert rows.tolist() == [5, 6, 7, NUM_ROWS, NUM_ROWS, NUM_ROWS]
    plan = p.try_plan(rows, 0)
    assert plan.counts.tolist() == [3, 3, 0, 3]
    assert plan.slots.tolist() == [0, 1, 2, 4, 4, 4]  # padding points at the sink slot C
    assert plan.miss_slots.tolist() == [0, 1, 2, 4, 4, 4]
    assert plan.victim_rows.tolist() == [NUM_ROWS] * 6
    assert int(p.train_misses(plan)) == 0


def test_capacity_is_checked_on_distinct_rows() -> None:
    p = DevicePlanner(NUM_ROWS, 3)
    assert p.try_plan(p.unique(torch.tensor([1, 1, 1, 2, 2, 2])), 0) is not None  # 6 ids, 2 rows
    with pytest.raises(CapacityError, match="4 distinct rows"):
        p.try_plan(p.unique(torch.tensor([1, 2, 3, 4])), 1)


def test_recency_numbers_are_renumbered_in_order() -> None:
    ref, dev = windows(6, "lru", 1, 1)[1], windows(6, "lru", 1, 1)[0]
    for step in range(30):
        if step == 15:
            dev.planner._next_seq = (1 << 52) - 2  # force the renumbering on the next plan
        for w in (ref, dev):
            w.push(w.planner.unique(torch.tensor([step % 9, (3 * step) % 11, 20 + step % 5])))
            if len(w) > 1:
                w.pop()
        assert_same(ref, dev)
    assert dev.planner._next_seq < 1000
