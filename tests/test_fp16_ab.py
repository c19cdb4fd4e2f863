"""The A/B report's bytes moved per arm, priced by the tables' row layout (FP32 and FP16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchrec_scratchpipe.ab.__main__ import parse_args, run_ab
from torchrec_scratchpipe.ab.simulated import SIMULATED_UVM_LABEL
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME, RowLayout

ARGS = ["--tables", "2", "--rows", "600", "--dim", "8", "--batch-size", "32", "--steps", "6", "--warmup", "1",
        "--lookaheads", "2", "--horizon", "4", "--load-factor", "0.15", "--no-progress", "--device", "cpu"]


def test_bytes_moved_per_arm_follow_the_table_dtype(tmp_path: Path) -> None:
    """Every arm reports bytes moved; an FP16 run moves the same rows as FP32 with half the
    weight bytes each (ScratchPipe rows keep their FP32 optimizer state), and trains what
    ``fused`` FP16 trains."""
    runs = {}
    for dtype in ("fp32", "fp16"):
        data = run_ab(parse_args(ARGS + ["--data-type", dtype, "--out", str(tmp_path / dtype)]))
        runs[dtype] = {r["arm"]: r for r in data["arms"]}
        assert f"dim 8, {dtype.upper()})" in (tmp_path / dtype / "report.md").read_text()
        assert "bytes moved MB (H2D+D2H)" in (tmp_path / dtype / "report.md").read_text()
    optimizer = OPTIMIZERS_BY_NAME[parse_args(ARGS).optimizer]
    sp = "scratchpipe L=2 H=4"
    for dtype, weights in (("fp32", torch.float32), ("fp16", torch.float16)):
        layout = RowLayout(optimizer, 8, weights)
        rows = runs[dtype]
        assert rows["fused"]["moved_mb"] == 0.0
        for arm, per_row in ((sp, layout.bytes_per_row), (SIMULATED_UVM_LABEL, layout.weight_bytes)):
            r = rows[arm]
            assert r["h2d_rows"] > 0 and r["d2h_rows"] > 0, r
            assert r["moved_mb"] * 2**20 == pytest.approx((r["h2d_rows"] + r["d2h_rows"]) * per_row), (dtype, arm)
            assert r["moved_mb"] == pytest.approx(r["h2d_mb"] + r["d2h_mb"])
        assert rows[sp]["max_weight_diff_vs_fused"] <= 1e-3 and rows[sp]["train_misses"] == 0
    for arm in (sp, SIMULATED_UVM_LABEL):  # same ids, same plans: the same rows move
        assert runs["fp16"][arm]["h2d_rows"] == runs["fp32"][arm]["h2d_rows"]
    uvm16, uvm32 = runs["fp16"][SIMULATED_UVM_LABEL]["moved_mb"], runs["fp32"][SIMULATED_UVM_LABEL]["moved_mb"]
    assert uvm16 == pytest.approx(uvm32 / 2)  # weights only: exactly half


def test_data_type_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_args(ARGS + ["--data-type", "int8"])
    with pytest.raises(SystemExit) as e:
        parse_args(ARGS + ["--model", "sequence", "--data-type", "fp16"])
    assert e.value.code == 2 and "sequence model trains in fp32" in capsys.readouterr().err
