"""Property tests of the planner and window against a small reference model of the tables."""

from __future__ import annotations

from typing import List, Set

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from engine_utils import make_tables, power_law_stream
from torchrec_scratchpipe import PlanWindow, ScratchPipeConfig, ScratchPipeEmbeddingBags, SlotPlanner
from torchrec_scratchpipe.core.window import WindowEntry

NUM_ROWS = 40


@st.composite
def scenarios(draw):
    capacity = draw(st.integers(2, 24))
    lookahead = draw(st.integers(0, 4))
    horizon = lookahead + draw(st.integers(0, 6))
    policy = draw(st.sampled_from(["future", "lru"]))
    steps = draw(st.integers(1, 30))
    batches = [
        sorted(draw(st.sets(st.integers(0, NUM_ROWS - 1), min_size=1, max_size=capacity)))
        for _ in range(steps)
    ]
    return capacity, lookahead, horizon, policy, batches


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_window_keeps_every_promise(scenario) -> None:
    capacity, lookahead, horizon, policy, batches = scenario
    planner = SlotPlanner(NUM_ROWS, capacity, policy)
    store = np.zeros(NUM_ROWS)  # reference tables: host side
    pad = np.full(capacity, np.nan)  # scratchpad slots
    truth = np.zeros(NUM_ROWS)  # what full-table training would hold
    window: PlanWindow

    def on_planned(entry: WindowEntry) -> None:
        plan = entry.plan
        held: Set[int] = set()
        others: List[WindowEntry] = [e for e in window.planned if e is not entry]
        if window.training is not None:
            others.append(window.training)
        for e in others:
            held |= set(e.plan.slots.tolist())
        victims = set(plan.victim_slots.tolist())
        assert not victims & held, "a held slot was chosen as victim"
        assert set(plan.victim_slots.tolist()) <= set(plan.miss_slots.tolist())
        store[plan.victim_rows.numpy()] = pad[plan.victim_slots.numpy()]  # write-back
        pad[plan.miss_slots.numpy()] = store[plan.miss_rows.numpy()]  # collect+insert

    window = PlanWindow(planner, lookahead, horizon, on_planned)
    tensors = [torch.tensor(b) for b in batches]
    for t in tensors[: horizon + 1]:
        window.push(t)
    for i in range(len(tensors)):
        entry = window.pop()
        assert entry.step == i
        assert len(window.planned_steps()) <= lookahead + 1
        slots = entry.plan.slots
        # every row of the training batch is resident, in the slot the plan says
        assert torch.equal(planner.slot_to_row[slots], entry.rows)
        assert torch.equal(planner.row_to_slot[entry.rows], slots)
        pad[slots.numpy()] += 1.0 + i  # "train": update the rows in place
        truth[entry.rows.numpy()] += 1.0 + i
        if i + horizon + 1 < len(tensors):
            window.push(tensors[i + horizon + 1])
    window.retire()
    resident = planner.slot_to_row >= 0
    store[planner.slot_to_row[resident].numpy()] = pad[resident.nonzero().squeeze(1).numpy()]
    # a row evicted and fetched again came back with its latest value
    np.testing.assert_array_equal(store, truth)
    assert planner.held_slots() == 0


@settings(max_examples=15, deadline=None)
@given(
    capacity_extra=st.integers(0, 30),
    lookahead=st.integers(0, 3),
    extra_h=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_engine_never_misses_at_train_time(capacity_extra: int, lookahead: int, extra_h: int, seed: int) -> None:
    rows = [50, 20]
    stream = power_law_stream(rows, 12, 4, seed=seed)
    need = max(int(torch.unique(k.values() + torch.repeat_interleave(torch.tensor([0, 50]), torch.tensor(k.length_per_key()))).numel()) for k in stream)
    cfg = ScratchPipeConfig(cache_rows=need + capacity_extra, lookahead=lookahead, horizon=lookahead + extra_h)
    emb = ScratchPipeEmbeddingBags(make_tables(rows, [4, 4]), cfg)
    for k in stream[: lookahead + 1]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        emb(k).values().sum().backward()
        if i + lookahead + 1 < len(stream):
            emb.prefetch(stream[i + lookahead + 1])
    s = emb.stats()["dim4_sum"]
    assert s["train_misses"] == 0 and s["steps"] == len(stream)
    assert s["peak_held_rows"] <= s["capacity"]


@settings(max_examples=100, deadline=None)
@given(
    batches=st.lists(st.sets(st.integers(0, 15), min_size=1, max_size=8), min_size=1, max_size=25),
    plan_every=st.integers(1, 4),
)
def test_next_use_matches_brute_force(batches: List[Set[int]], plan_every: int) -> None:
    from torchrec_scratchpipe.core.next_use import NONE, NextUse

    nu = NextUse(16)
    planned = 0
    for k, b in enumerate(batches):
        nu.push(k, torch.tensor(sorted(b)))
        while planned < k + 1 and (k % plan_every == 0 or k == len(batches) - 1):
            nu.planned(torch.tensor(sorted(batches[planned])))
            planned += 1
        # Brute force: a row's next use is its first occurrence among pushed, unplanned batches
        # after its last planned occurrence.
        for r in range(16):
            last = max((j for j in range(planned) if r in batches[j]), default=-1)
            nxt = next((j for j in range(max(last + 1, planned), k + 1) if r in batches[j]), NONE)
            assert int(nu.step_of(torch.tensor([r]))) == nxt, (r, k, planned)
