"""The native planner operator and the PyTorch reference make identical plans."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_scratchpipe import PlanWindow, SlotPlanner
from torchrec_scratchpipe.core import native

pytestmark = pytest.mark.skipif(
    not native.available(), reason="native planner not built (python -m torchrec_scratchpipe.core.native)"
)
NUM_ROWS = 48


def live_queue(p: SlotPlanner) -> List[int]:
    """Slots in recency order (the native planner's ranked slots first, then its queue)."""
    return p.recency_order().tolist()


def assert_same_state(a: PlanWindow, b: PlanWindow) -> None:
    pa, pb = a.planner, b.planner
    assert torch.equal(pa.row_to_slot, pb.row_to_slot)
    assert torch.equal(pa.slot_to_row, pb.slot_to_row)
    assert torch.equal(pa.last_use[: pa.capacity], pb.last_use[: pb.capacity])
    assert pa.held_slots() == pb.held_slots() and list(pa._held) == list(pb._held)
    assert live_queue(pa) == live_queue(pb)
    assert torch.equal(a.next_use.next, b.next_use.next)
    assert a.stalls == b.stalls and a.planned_steps() == b.planned_steps()


def assert_same_plans(a: PlanWindow, b: PlanWindow) -> None:
    for ea, eb in zip(list(a.planned), list(b.planned)):
        fields = ("rows", "slots", "miss_rows", "miss_slots", "victim_rows", "victim_slots")
        for f in fields:
            assert torch.equal(getattr(ea.plan, f), getattr(eb.plan, f)), (ea.step, f)
        assert ea.plan.held_after == eb.plan.held_after


@st.composite
def programs(draw) -> Tuple[int, int, int, str, List[Tuple[str, List[List[int]]]]]:
    capacity = draw(st.integers(2, 20))
    lookahead = draw(st.integers(0, 4))
    horizon = lookahead + draw(st.integers(0, 6))
    policy = draw(st.sampled_from(["future", "lru"]))
    batch = st.lists(st.integers(0, NUM_ROWS - 1), min_size=1, max_size=2 * capacity).map(
        lambda ids: list(dict.fromkeys(ids))[:capacity]
    )
    kinds = st.sampled_from(["push"] * 9 + ["pop"] * 8 + ["clear"])  # mostly a busy window
    ops = draw(st.lists(st.tuples(kinds, st.lists(batch, min_size=1, max_size=4)), min_size=20, max_size=80))
    return capacity, lookahead, horizon, policy, ops


@settings(max_examples=100, deadline=None)
@given(programs())
def test_native_and_reference_plan_identically(program) -> None:
    capacity, lookahead, horizon, policy, ops = program
    windows = [
        PlanWindow(SlotPlanner(NUM_ROWS, capacity, policy, native=flag), lookahead, horizon) for flag in (True, False)
    ]
    assert windows[0].planner.native and not windows[1].planner.native
    for op, batches in ops:
        for w in windows:
            if op == "push":
                w.push(w.planner.unique(torch.tensor(batches[0])))
            elif op == "pop" and len(w):
                w.pop()
            elif op == "clear":
                w.clear()
        assert_same_plans(*windows)
        if windows[0].training is not None:
            for f in ("slots", "miss_slots", "victim_rows"):
                assert torch.equal(getattr(windows[0].training.plan, f), getattr(windows[1].training.plan, f))
        assert_same_state(*windows)


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    int32=st.booleans(),
)
def test_group_rows_agree(counts: List[int], seed: int, int32: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    table_rows = [7 + 3 * i for i in range(len(counts))]
    base = torch.tensor([0] + table_rows[:-1]).cumsum(0)
    values = torch.cat([torch.randint(0, n, (c,), generator=g) for n, c in zip(table_rows, counts)])
    values = values.int() if int32 else values
    per_feature = torch.tensor(counts)
    planners = [SlotPlanner(sum(table_rows), 4, native=flag) for flag in (True, False)]
    for _ in range(2):  # a second call must forget the first one's rows
        (ra, ia), (rb, ib) = (p.group_rows(values, base, per_feature) for p in planners)
        assert torch.equal(ra, rb) and torch.equal(ia, ib)
        assert ia.dtype == torch.int64 and torch.equal(ia, values.long() + torch.repeat_interleave(base, per_feature))
        assert sorted(ra.tolist()) == sorted(set(ia.tolist()))


def test_switch_chooses_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", "0")
    assert not SlotPlanner(10, 2).native
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", "1")
    assert SlotPlanner(10, 2).native
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", "maybe")
    with pytest.raises(ValueError, match="SCRATCHPIPE_NATIVE must be"):
        SlotPlanner(10, 2)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), horizons=st.lists(st.integers(2, 8), min_size=2, max_size=4))
def test_ranked_slots_survive_clears_and_horizon_changes(seed: int, horizons: List[int]) -> None:
    """The native planner's ranking (candidates bucketed by next use) is put back into recency
    order when next uses are forgotten or the horizon changes; plans stay those of the reference."""
    g = torch.Generator().manual_seed(seed)
    windows = [PlanWindow(SlotPlanner(NUM_ROWS, 12, "future", native=flag), 1, horizons[0]) for flag in (True, False)]
    ranked = 0
    for h in horizons:
        for w in windows:  # as ScratchPipeEmbeddingBags.set_window does
            w.retire()
            w.clear()
            w.horizon = h
        for step in range(25):
            batch = torch.unique(torch.randint(0, NUM_ROWS // 2, (6,), generator=g))
            for w in windows:
                w.push(batch)
                if len(w) > h:
                    w.pop()
            assert_same_plans(*windows)
            assert_same_state(*windows)
            ranked = max(ranked, len(windows[0].planner.ranked or []))
    assert ranked > 0  # the ranking was in use
