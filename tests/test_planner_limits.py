"""The planner's documented limits: slots below 2**31 - 1 (int32 slot ids), and a
de-duplication scratch of one bit per row natively (one int32 per row otherwise).

Shapes are checked on ``meta`` tensors, so the largest accepted planner allocates nothing.
"""

from __future__ import annotations

import pytest
import torch

from torchrec_scratchpipe.core import native
from torchrec_scratchpipe.core.plan import SlotPlanner

META = torch.device("meta")


def test_capacity_limit_is_just_below_int32_max() -> None:
    largest = SlotPlanner(10, 2**31 - 2, device=META)
    assert largest.slot_to_row.shape == (2**31 - 2,) and largest.row_to_slot.dtype == torch.int32
    with pytest.raises(ValueError, match=r"capacity \(2147483647\) must be below 2\*\*31 - 1 slots"):
        SlotPlanner(10, 2**31 - 1, device=META)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 1000, 1001])
def test_dedup_scratch_is_one_bit_per_row_natively(rows: int) -> None:
    """What each path adds per row beyond the int32 row -> slot map (capacity fixed)."""
    per_row_native = SlotPlanner.host_bytes(rows, 4, native=True) - SlotPlanner.host_bytes(rows, 4, native=False)
    assert per_row_native == -(4 * rows) + (rows + 7) // 8  # a bitmap (rounded up to a byte) instead of int32
    if native.available():
        p = SlotPlanner(rows, 4, native=True)
        assert p._tag.numel() * p._tag.element_size() == (rows + 7) // 8
    assert SlotPlanner(rows, 4, native=False)._tag.numel() == rows


@pytest.mark.parametrize("rows, slots", [(10, 0), (0, 4), (10, -1)])
def test_an_empty_planner_is_refused(rows: int, slots: int) -> None:
    with pytest.raises(ValueError, match=rf"capacity \({slots}\) and num_rows \({rows}\) must be positive"):
        SlotPlanner(rows, slots, device=META)
    SlotPlanner(1, 1, device=META)  # the smallest planner there is


@pytest.mark.skipif(not native.available(), reason="native planner not built")
def test_a_native_planner_takes_any_next_use_callable_on_the_pytorch_path() -> None:
    """``try_plan``'s ``next_use`` may be any callable (not only the window's ``Distance``):
    a native planner then plans that batch on the PyTorch path, with the same result."""
    plans = []
    for flag in (True, False):
        p = SlotPlanner(20, 3, native=flag)
        far = lambda slots, p=p: torch.where(p.slot_to_row.index_select(0, slots) == 1, 1, 5).int()  # noqa: E731
        got = [p.try_plan(torch.tensor([0, 1, 2]), 0, far)]
        p.release(got[0])
        got.append(p.try_plan(torch.tensor([3]), 1, far))  # row 1 is needed soonest: evict 0 or 2 first
        plans.append([(g.miss_rows.tolist(), g.victim_rows.tolist()) for g in got])
    assert plans[0] == plans[1] and plans[0][1][1] != [1]


@pytest.mark.parametrize("flag", [False, True])
def test_future_victims_come_from_beyond_the_first_queue_chunk(flag: bool) -> None:
    """With more unheld slots than one walk chunk (65,536), rows no batch needs soon are still
    the victims, even when every slot of the first chunk holds a row needed soon."""
    if flag and not native.available():
        pytest.skip("native planner not built")
    n = 70_000
    p = SlotPlanner(n + 10, n, native=flag)
    p.release(p.try_plan(torch.arange(n), 0))  # the queue: rows 0 .. n-1, least recent first
    soon = 66_000  # rows 0 .. soon-1 are needed at the next step; the rest never
    dist = lambda slots: torch.where(p.slot_to_row.index_select(0, slots) < soon, 1, 2**31 - 1).int()  # noqa: E731
    plan = p.try_plan(torch.arange(n, n + 10), 1, dist)
    assert bool((plan.victim_rows >= soon).all()), plan.victim_rows
