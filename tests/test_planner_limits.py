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
