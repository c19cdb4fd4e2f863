"""The device mover's padded moves leave the store and the slots as the host mover does (CPU)."""

from __future__ import annotations

import pytest
import torch

from torchrec_scratchpipe import PlanWindow, SlotPlanner
from torchrec_scratchpipe.bench.launches import SlotTensors, store_on
from torchrec_scratchpipe.core.device_mover import DeviceMover, move_indices
from torchrec_scratchpipe.core.device_plan import DevicePlanner
from torchrec_scratchpipe.core.layout import EmbOptimType, RowLayout
from torchrec_scratchpipe.core.mover import Mover
from torchrec_scratchpipe.core.stats import GroupStats

LAYOUT = RowLayout(EmbOptimType.EXACT_ADAGRAD, 4)
CPU = torch.device("cpu")
ROWS, SLOTS = 120, 24


def values(store):
    return [store.weights.clone(), *(s.clone() for s in store.states.values())]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("policy,lookahead,horizon", [("future", 2, 6), ("lru", 1, 1), ("future", 0, 3)])
def test_device_mover_matches_the_host_mover(packed: bool, policy: str, lookahead: int, horizon: int) -> None:
    runs = []
    for kind in ("host", "device"):
        g = torch.Generator().manual_seed(7)
        store = store_on(CPU, [70, 50], LAYOUT, packed)
        store.weights.copy_(torch.randn(store.weights.shape, generator=g))
        stats = GroupStats()
        if kind == "host":
            planner = SlotPlanner(ROWS, SLOTS, policy, native=False)
            pad = SlotTensors(LAYOUT, SLOTS, CPU)
            mover = Mover(store, pad, stats)  # type: ignore[arg-type]
        else:
            planner = DevicePlanner(ROWS, SLOTS, policy, CPU)
            pad = SlotTensors(LAYOUT, SLOTS + 1, CPU)
            mover = DeviceMover(store, pad, stats, SLOTS)  # type: ignore[arg-type]
        w = PlanWindow(planner, lookahead, horizon, lambda e: mover.move_in(e.plan))
        snapshots = []
        for step in range(50):
            ids = torch.randint(0, ROWS, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
            w.push(planner.unique(torch.cat([ids, ids[:3]])))
            if len(w) > horizon:
                entry = w.pop()
                slots = planner.row_to_slot.index_select(0, entry.rows[entry.rows < ROWS]).long()
                pad.weights.index_add_(0, slots, torch.full((slots.numel(), 4), 0.5 + step))  # "train" the batch
                pad.states["momentum1"].index_add_(0, slots, torch.full((slots.numel(), 4), 1.0))
            mover.land_all()
            snapshots.append(values(store))  # the store after every step, not only at the end
        w.retire()
        resident = planner.slot_to_row >= 0
        mover.flush(planner.slot_to_row[resident], resident.nonzero().squeeze(1))
        runs.append((snapshots + [values(store)], stats.as_dict()))
    (host, hs), (dev, ds) = runs
    for step, (a, b) in enumerate(zip(host, dev)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    assert {k: hs[k] for k in ("h2d_rows", "d2h_rows", "h2d_bytes", "d2h_bytes")} == {
        k: ds[k] for k in ("h2d_rows", "d2h_rows", "h2d_bytes", "d2h_bytes")
    }
    assert hs["d2h_rows"] > 0


def test_padding_repeats_the_last_victim() -> None:
    p = DevicePlanner(ROWS, 2, "lru", CPU)
    first = p.try_plan(p.unique(torch.tensor([1, 2])), 0)
    p.release(first)
    plan = p.try_plan(p.unique(torch.tensor([3, 4, 3, 3])), 1)
    m = move_indices(plan, spare_slot=2)
    assert m.collect_rows.tolist() == [3, 4, 0, 0] and m.insert_slots.tolist() == [0, 1, 2, 2]
    assert m.back_rows.tolist() == [1, 2, 2, 2] and m.back_slots.tolist() == [0, 1, 1, 1]
    assert bool(m.has_victims)
