"""A device planner's step has no data-dependent op: it runs whole on meta tensors.

Meta tensors carry shapes and dtypes but no data, so ``nonzero``, ``unique``, boolean-mask
indexing, ``.item()``, ``.tolist()`` and ``torch.equal`` all raise on them. A step that
runs here (dedup, next-use links, plan, collect, write-back, insert, slot remap) is a fixed
sequence of ops whose shapes follow from the input sizes. The second test shows the check
bites: the same step with one such op inserted fails.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from torchrec_scratchpipe.bench.launches import device_step_launches
from torchrec_scratchpipe.core.device_plan import DevicePlanner
from torchrec_scratchpipe.core.layout import EmbOptimType, RowLayout

META = torch.device("meta")
ROWS, SLOTS, DIM = 500, 400, 8


LAYOUT = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, DIM)


def run_steps(device: torch.device, ids_per_batch: int, horizon: int, steps: int, packed: bool = True) -> List[int]:
    """Launches of each plan-and-move step (``bench.launches.device_step_launches``)."""
    return device_step_launches([ROWS // 2, ROWS - ROWS // 2], SLOTS, ids_per_batch // 2, 2, horizon, LAYOUT, steps,
                                device, packed)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_whole_step_runs_on_meta_tensors(packed: bool) -> None:
    assert len(run_steps(META, 60, 6, 8, packed)) == 8


def with_op(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """Insert one data-dependent op at the start of every plan step."""
    original = DevicePlanner.plan_step

    def plan_step(self, rows, *args):
        if op == "nonzero":
            (rows < self.num_rows).nonzero()
        elif op == "mask":
            rows = torch.cat([rows[rows < self.num_rows], rows[rows >= self.num_rows]])
        elif op == "item":
            int((rows < self.num_rows).sum())
        return original(self, rows, *args)

    monkeypatch.setattr(DevicePlanner, "plan_step", plan_step)


@pytest.mark.parametrize("op", ["nonzero", "mask", "item"])
def test_a_data_dependent_op_fails_the_meta_step(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_op(monkeypatch, op)
    assert len(run_steps(torch.device("cpu"), 60, 6, 3)) == 3  # on CPU the op runs
    with pytest.raises((NotImplementedError, RuntimeError)):
        run_steps(META, 60, 6, 3)


def test_launches_per_step_do_not_depend_on_batch_size_or_horizon() -> None:
    """Ops dispatched per plan-and-move step, once the window is full: the same for every size."""
    counts = {(ids, h): run_steps(META, ids, h, 4)[1:] for ids in (30, 120) for h in (3, 12)}
    assert len({c for steps in counts.values() for c in steps}) == 1, counts
