"""examples/train_sequence.py: the item table on ScratchPipe gives the losses of `fused`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict

from dist_utils import spawn

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--items", "4096", "--categories", "32", "--dim", "8", "--max-len", "8", "--batch-size", "32",
         "--steps", "10", "--load-factor", "0.1", "--lookahead", "2", "--horizon", "4"]


def _run_both(rank: int, world_size: int) -> Dict[str, Any]:
    spec = importlib.util.spec_from_file_location("train_sequence", ROOT / "examples" / "train_sequence.py")
    assert spec is not None and spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    sp = ex.run(ex.parse_args(SMALL))
    fused = ex.run(ex.parse_args(SMALL + ["--kernel", "fused"]))
    return {"sp": sp["losses"], "fused": fused["losses"], "stats": sp["stats"]}


def test_sequence_example_matches_fused() -> None:
    (res,) = spawn(_run_both, 1)
    assert len(res["sp"]) == len(res["fused"]) == 10
    assert max(abs(a - b) for a, b in zip(res["sp"], res["fused"])) == 0, res
    s = res["stats"]
    assert s["train_misses"] == 0 and s["evictions"] > 0 and s["steps"] == 10, s
