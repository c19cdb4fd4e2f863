"""The device planner and mover on CUDA: host-mapped store, same plans as on the host, no syncs.

Skipped without CUDA (no GPU is lent to every session). The index logic these tests rely
on is covered on CPU tensors (``test_device_planner.py``, ``test_device_static.py``,
``test_device_mover.py``); what only a GPU shows is checked here.
"""

from __future__ import annotations

import pytest
import torch

from torchrec_scratchpipe import PlanWindow, SlotPlanner
from torchrec_scratchpipe.bench.launches import SlotTensors, device_step_launches, store_on
from torchrec_scratchpipe.core.device_mover import DeviceMover, host_mapped
from torchrec_scratchpipe.core.device_plan import DevicePlanner
from torchrec_scratchpipe.core.layout import EmbOptimType, RowLayout
from torchrec_scratchpipe.core.stats import GroupStats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
LAYOUT = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 8)


def test_host_mapped_alias_is_the_host_memory() -> None:
    host = torch.arange(64, dtype=torch.float32).view(16, 4)
    alias = host_mapped(host, CUDA)
    assert alias.device.type == "cuda" and alias.shape == host.shape
    alias[3] += 100.0  # a device kernel writes host memory
    torch.cuda.synchronize()
    assert host[3].tolist() == [112.0, 113.0, 114.0, 115.0]
    host[5] = -1.0
    assert alias.index_select(0, torch.tensor([5], device=CUDA)).cpu().tolist() == [[-1.0] * 4]


def test_device_planner_on_cuda_plans_as_the_host_planner() -> None:
    g = torch.Generator().manual_seed(1)
    dev = PlanWindow(DevicePlanner(60, 12, "future", CUDA), 2, 7)
    host = PlanWindow(SlotPlanner(60, 12, "future", native=False), 2, 7)
    for _ in range(80):
        distinct = torch.randperm(60, generator=g)[: int(torch.randint(2, 12, (1,), generator=g))]
        ids = torch.cat([distinct[torch.randint(0, distinct.numel(), (9,), generator=g)], distinct])
        dev.push(dev.planner.unique(ids.to(CUDA)))
        host.push(host.planner.unique(ids))
        for w in (dev, host):
            if len(w) > 7:
                w.pop()
        for a, b in zip(host.planned, dev.planned):
            pb = dev.planner.exact(b.plan)
            for f in ("rows", "slots", "miss_rows", "miss_slots", "victim_rows", "victim_slots"):
                assert torch.equal(getattr(a.plan, f), getattr(pb, f).cpu()), f
        assert torch.equal(host.planner.row_to_slot, dev.planner.row_to_slot.cpu())
        assert torch.equal(host.next_use.next, dev.next_use.next.cpu())
    assert dev.stalls == host.stalls > 0


def test_plan_and_move_steps_never_synchronize() -> None:
    """With the window fitting by id count, a step reads nothing back: sync-debug "error" passes."""
    device_step_launches([300, 300], 1000, 40, 2, 8, LAYOUT, steps=1, device=CUDA)  # warm up the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launches = device_step_launches([300, 300], 1000, 40, 2, 8, LAYOUT, steps=4, device=CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(set(launches[1:])) == 1


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_device_mover_moves_as_on_cpu(packed: bool) -> None:
    """Collect and write-back through the mapped store on the side stream give the CPU run's bytes."""
    results = []
    for device in (torch.device("cpu"), CUDA):
        torch.manual_seed(0)
        store = store_on(torch.device("cpu"), [200, 100], LAYOUT, packed)
        (store.packed if packed else store.weights).copy_(torch.randint_like(store.packed if packed else store.weights, 0, 100))
        pad = SlotTensors(LAYOUT, 41, device)
        planner = DevicePlanner(300, 40, "lru", device)
        mover = DeviceMover(store, pad, GroupStats(), 40)  # type: ignore[arg-type]
        w = PlanWindow(planner, 1, 1, lambda e: mover.move_in(e.plan))
        g = torch.Generator().manual_seed(2)
        for _ in range(30):
            w.push(planner.unique(torch.randint(0, 300, (25,), generator=g).to(device)))
            if len(w) > 1:
                w.pop()
                pad.weights.add_(1.0)  # "train" every resident slot
        mover.land_all()
        results.append(((store.packed if packed else store.weights).clone(), pad.weights[:40].cpu()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
