"""examples/train_dlrm.py: kernels from the command line, checkpoint resume, torchx launch."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--tables", "3", "--rows", "600", "--dim", "8", "--batch-size", "32", "--load-factor", "0.3",
         "--no-progress", "--optimizer", "rowwise_adagrad"]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_dlrm", ROOT / "examples" / "train_dlrm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(trainer) -> dict:
    from torchrec_scratchpipe.training import local_table_weights

    return local_table_weights(trainer.model, [f"t_f{i}" for i in range(3)])


def test_resume_continues_exactly(tmp_path: Path) -> None:
    ex = _example()
    straight, t_straight = ex.run(ex.parse_args(SMALL + ["--steps", "12", "--lookahead", "2"]))
    ex.run(ex.parse_args(SMALL + ["--steps", "6", "--lookahead", "2", "--save", str(tmp_path / "ck")]))
    resumed, t_resumed = ex.run(ex.parse_args(SMALL + ["--steps", "6", "--lookahead", "2", "--resume", str(tmp_path / "ck")]))
    assert straight["steps"] == 12 and resumed["steps"] == 6
    a, b = _weights(t_straight), _weights(t_resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_kernel_choice_per_table_and_errors() -> None:
    ex = _example()
    _, trainer = ex.run(ex.parse_args(SMALL + ["--steps", "3", "--kernel", "scratchpipe", "--table-kernel", "t_f1=fused"]))
    kernels = {name: ps.compute_kernel for plan in trainer.plan.plan.values() for name, ps in plan.items()}  # type: ignore[union-attr]
    assert kernels["t_f1"] == "fused" and kernels["t_f0"] != "fused"
    with pytest.raises(SystemExit):
        ex.parse_args(["--table-kernel", "t_f1=bogus"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fused_uvm_caching needs CUDA"):
            ex.run(ex.parse_args(SMALL + ["--steps", "2", "--kernel", "fused_uvm_caching"]))


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "torchx").exists(), reason="needs torchx (not in the GPU kit)")
def test_torchx_launch_two_processes() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))  # this checkout first
    torchx = Path(sys.executable).parent / "torchx"
    cmd = [str(torchx), "run", "-s", "local_cwd", "torchrec_scratchpipe/components.py:train", "--nproc_per_node", "2",
           "--", *SMALL, "--steps", "4", "--sharding-type", "row_wise"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "steps 4" in out and "world size 2" in out, out[-4000:]
    # Quiet: no warning from torchrun, torch, TorchRec or this package about the command itself.
    noisy = [line for line in out.splitlines() if re.search(r"warn|deprecat|\bW\d{4} ", line, re.IGNORECASE)]
    assert not noisy, "\n".join(noisy)


def _trace_on_two_ranks(rank: int, world: int, path: str, steps: int) -> tuple:
    from torchrec_scratchpipe.data.source import open_source

    seen = open_source(f"trace:{path}", 32, rank=rank, world_size=world).take(steps + 10)
    ex = _example()
    result, _ = ex.run(ex.parse_args(["--data", f"trace:{path}", "--batch-size", "32", "--dim", "8", "--steps", str(steps),
                                      "--load-factor", "0.5", "--lookahead", "1", "--no-progress"]))
    return [b.sparse_features.values().tolist() for b in seen], result["samples"], result["steps"]


@pytest.mark.slow
def test_two_ranks_read_disjoint_trace_samples_and_count_them_once(tmp_path: Path) -> None:
    from dist_utils import spawn

    from torchrec_scratchpipe.data.trace import RequestTrace

    n = 32 * 2 * 5 + 16  # five full rounds of two batches, then a partial one (dropped)
    path = tmp_path / "ids.pt"
    RequestTrace.from_lengths(torch.arange(n), torch.ones(1, n, dtype=torch.int64)).save(path)  # sample i looks up row i
    (ids0, samples0, steps0), (ids1, samples1, steps1) = spawn(_trace_on_two_ranks, 2, str(path), 4)
    assert len(ids0) == len(ids1) == 5  # equal step counts; the partial last round is dropped
    assert ids0[1] == list(range(64, 96)) and ids1[1] == list(range(96, 128))  # batch k of the file -> rank k % 2
    flat0, flat1 = {i for b in ids0 for i in b}, {i for b in ids1 for i in b}
    assert not flat0 & flat1 and flat0 | flat1 == set(range(320))
    assert steps0 == steps1 == 4 and samples0 == samples1 == 4 * 32 * 2  # every sample counted once
