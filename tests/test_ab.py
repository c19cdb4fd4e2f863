"""The A/B tool: every arm trains the same model on the same data; the report is complete."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_scratchpipe.ab.__main__ import parse_args, run_ab
from torchrec_scratchpipe.ab.config import ABConfig


def test_ab_report_on_synthetic_data(tmp_path: Path) -> None:
    cfg = parse_args(["--tables", "3", "--rows", "800", "--dim", "8", "--batch-size", "64", "--steps", "8",
                      "--warmup", "2", "--lookaheads", "0,2", "--horizon", "4", "--load-factor", "0.3",
                      "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    data = run_ab(cfg)
    rows = {r["arm"]: r for r in data["arms"]}
    assert set(rows) == {"fused", "fused_uvm_caching (simulated)", "scratchpipe L=0 H=4", "scratchpipe L=2 H=4"}
    for label in ("scratchpipe L=0 H=4", "scratchpipe L=2 H=4"):
        r = rows[label]
        assert r["max_loss_diff_vs_fused"] == 0 and r["max_weight_diff_vs_fused"] == 0  # bit for bit
        assert r["train_misses"] == 0 and r["misses"] > 0 and r["samples_per_s"] > 0
        assert r["h2d_rows"] == r["misses"]
    sim = rows["fused_uvm_caching (simulated)"]
    assert sim["simulated"] and "samples_per_s" not in sim and sim["misses"] > 0
    # All arms saw the same ids: the same number of distinct rows per step in total.
    assert sim["unique_rows"] == rows["scratchpipe L=2 H=4"]["unique_rows"]
    md = (tmp_path / "report.md").read_text()
    assert "simulated" in md and "| scratchpipe L=2 H=4 |" in md
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert len(on_disk["per_step"]["fused"]["loss"]) == 10
    for png in ("throughput.png", "traffic.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_ab_sequence_model_scratchpipe_arms_match_fused(tmp_path: Path) -> None:
    """``--model sequence``: an EmbeddingCollection whose item table (read by two features)
    is on ScratchPipe trains what ``fused`` trains; the UVM arm replays the same item ids."""
    cfg = parse_args(["--model", "sequence", "--tables", "1", "--rows", "4096", "--dim", "8", "--max-len", "8",
                      "--batch-size", "32", "--steps", "8", "--warmup", "2", "--horizon", "8", "--load-factor", "0.2",
                      "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    data = run_ab(cfg)
    rows = {r["arm"]: r for r in data["arms"]}
    sp_labels = ["scratchpipe L=1 H=8", "scratchpipe L=4 H=8"]
    assert set(rows) == {"fused", "fused_uvm_caching (simulated)", *sp_labels}
    sim = rows["fused_uvm_caching (simulated)"]
    for label in sp_labels:
        r = rows[label]
        assert r["max_loss_diff_vs_fused"] == 0 and r["max_weight_diff_vs_fused"] == 0, r
        assert r["train_misses"] == 0 and r["h2d_rows"] == r["misses"] > 0
        assert r["unique_rows"] == sim["unique_rows"]  # the simulator replayed the item table's ids
    assert sim["simulated"] and sim["misses"] > 0
    assert "sequence model (EmbeddingCollection" in (tmp_path / "report.md").read_text()
    assert len(json.loads((tmp_path / "report.json").read_text())["per_step"]["fused"]["loss"]) == 10
    for png in ("throughput.png", "traffic.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_ab_file_store_trains_bitwise_like_fused(tmp_path: Path) -> None:
    """``--store file:DIR``: the ScratchPipe arm's tables live in files behind a host cache
    smaller than they are; with SGD it trains exactly the weights ``fused`` trains."""
    store = tmp_path / "store"
    store.mkdir()
    cfg = parse_args(["--tables", "2", "--rows", "4000", "--dim", "8", "--batch-size", "64", "--steps", "6",
                      "--warmup", "2", "--lookaheads", "1", "--horizon", "4", "--load-factor", "0.05",
                      "--optimizer", "sgd", "--arms", "fused,scratchpipe", "--store", f"file:{store}",
                      "--host-cache-mb", "0.05", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    data = run_ab(cfg)
    r = {a["arm"]: a for a in data["arms"]}["scratchpipe L=1 H=4"]
    assert r["max_loss_diff_vs_fused"] == 0.0 and r["max_weight_diff_vs_fused"] == 0.0, r
    assert r["misses"] > 0 and r["train_misses"] == 0
    assert f"ScratchPipe store file:{store}" in (tmp_path / "out" / "report.md").read_text()
    import gc

    gc.collect()  # the arms' models may sit in reference cycles
    assert list(store.iterdir()) == []  # the working copies are gone with the model


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"arms": ["fused", "lru"]}, "unknown arms"),
        ({"load_factor": 0.0}, "--load-factor must be a fraction"),
        ({"lookaheads": []}, "--lookaheads: name at least one ScratchPipe lookahead"),
        ({"lookaheads": [-1]}, "invalid window lookahead=-1"),
        ({"lookaheads": [4], "horizon": 2}, "invalid window lookahead=4, horizon=2"),
        ({"data": "parquet:x"}, "data must be"),
        ({"dim": 6}, "multiple of 4"),
        ({"model": "hstu"}, "model must be one of"),
        ({"model": "sequence", "data": "trace:x"}, "leave --data synthetic"),
    ],
)
def test_ab_config_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ABConfig(**kwargs)


#: A line that looks like a warning: Python warnings, logging WARNING records, torch's
#: glog-style "W1129 ..." lines, deprecation notes.
WARNING_LINE = re.compile(r"warn|deprecat|^W\d{4} ", re.IGNORECASE)


@pytest.mark.slow
def test_main_job_as_documented_is_quiet_and_shows_the_point(tmp_path: Path) -> None:
    """The README's main job, with no flags: no warning line, >= 15% fewer rows than the UVM
    arm, and every ScratchPipe arm trains what ``fused`` trains."""
    root = Path(__file__).resolve().parent.parent
    # A fresh shell's environment: no rendezvous port inherited from this test process's group.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # this checkout first
    proc = subprocess.run([sys.executable, "-m", "torchrec_scratchpipe.ab", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if WARNING_LINE.search(line)]
    assert not noisy, "\n".join(noisy)
    data = json.loads((tmp_path / "report.json").read_text())
    rows = {r["arm"]: r for r in data["arms"]}
    uvm = next(r for label, r in rows.items() if label.startswith("fused_uvm_caching"))
    sp = [r for label, r in rows.items() if label.startswith("scratchpipe")]
    assert {r["arm"] for r in sp} == {f"scratchpipe L={L} H=64" for L in (1, 4)}
    assert min(r["h2d_rows"] for r in sp) <= 0.85 * uvm["h2d_rows"]
    for r in sp:  # 160 DLRM steps amplify any ulp (a ReLU flips): only a bitwise kernel passes
        assert r["max_weight_diff_vs_fused"] == 0 and r["max_loss_diff_vs_fused"] == 0 and r["train_misses"] == 0
    assert data["headline"][0].startswith("**scratchpipe") and "fewer rows" in data["headline"][0]
    assert "bitwise equal to `fused`" in data["headline"][1]
    if data["meta"]["device_name"] == "cpu":
        assert "no GPU forecast" in proc.stdout


def test_ab_reports_a_stalled_window_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = parse_args(["--tables", "3", "--rows", "800", "--dim", "8", "--batch-size", "64", "--steps", "8",
                      "--warmup", "2", "--arms", "scratchpipe", "--lookaheads", "1,6", "--load-factor", "0.3",
                      "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    data = run_ab(cfg)
    err = capsys.readouterr().err
    stalled = [line for line in err.splitlines() if "did not fit" in line]
    assert len(stalled) == 1 and "scratchpipe L=6 H=64" in stalled[0], err  # L=1 fits; L=6 said once
    assert "stalled" in stalled[0] and "use lookahead" in stalled[0] and "load_factor >=" in stalled[0]
    assert data["notes"] == [stalled[0].removeprefix("note: ")]
    assert "Problems found" in (tmp_path / "report.md").read_text()


def _write_zipf_trace(path: Path, tables: int, rows: int, samples: int) -> None:
    import torch

    from torchrec_scratchpipe.data.trace import RequestTrace

    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 4, (tables, samples), generator=g)
    ids = (torch.rand(int(lengths.sum()), generator=g).pow(3) * rows).long()
    RequestTrace.from_lengths(ids, lengths).save(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,env_extra",
    [
        (["--optimizer", "sgd"], {}),
        (["--optimizer", "adagrad"], {}),
        (["--data-type", "fp16"], {}),
        (["--load-factor", "0.05"], {}),
        (["--data", "trace:{trace}"], {}),
        ([], {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ],
    ids=["sgd", "adagrad", "fp16", "load_factor_0.05", "trace", "mkl_avx2"],
)
def test_main_job_variants_are_bitwise_equal_to_fused(tmp_path: Path, flags: list, env_extra: dict) -> None:
    """The main job's 160 DLRM steps (fused against ScratchPipe L=1) with each optimizer, FP16
    weights, a small scratchpad, a trace source, and MKL held to AVX2 (another BLAS path for
    the dense GEMMs, so the ReLU flips that amplify an ulp happen elsewhere): max |Δw| 0 and
    max |Δloss| 0 every time."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(root), **env_extra)
    if any("{trace}" in f for f in flags):
        _write_zipf_trace(tmp_path / "ids.pt", tables=8, rows=50_000, samples=1024 * 170)
        flags = [f.format(trace=tmp_path / "ids.pt") for f in flags]
    cmd = [sys.executable, "-m", "torchrec_scratchpipe.ab", "--arms", "fused,scratchpipe", "--lookaheads", "1",
           "--out", str(tmp_path), "--no-progress", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "report.json").read_text())
    (sp,) = [r for r in data["arms"] if r["arm"].startswith("scratchpipe")]
    assert sp["max_weight_diff_vs_fused"] == 0 and sp["max_loss_diff_vs_fused"] == 0, sp
    assert sp["train_misses"] == 0 and sp["misses"] > 0, sp
