"""ScratchPipeTrainPipeline over an EmbeddingCollection model trains exactly like
TorchRec's TrainPipelineSparseDist on ``fused`` (lookahead L >= 2, horizon H > L)."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from dist_utils import build_dmp, constraints_for, local_tensors, max_diff, spawn
from seq_utils import BATCH, DIM, KEYS, load_factors, seq_batch, seq_tables

STEPS = 12
TOL = 0.0  # bit for bit with fused (max |diff| == 0)


class _SeqModel(nn.Module):
    """Embeds item sequences and scores every position: ``(loss, scores)`` as pipelines expect."""

    def __init__(self) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection

        self.ec = EmbeddingCollection(tables=seq_tables(), device=torch.device("cpu"))
        self.head = nn.Linear(DIM, 1)

    def forward(self, batch: Any) -> Any:
        out = self.ec(batch.sparse_features)
        scores = self.head(torch.cat([out[k].values() for k in KEYS])).squeeze(1)
        return (scores - 0.5).pow(2).sum(), scores.detach()


def _batches(rank: int, n: int = STEPS) -> List[Any]:
    from torchrec.datasets.utils import Batch

    return [Batch(torch.zeros(BATCH, 1), seq_batch(i, rank), torch.zeros(BATCH)) for i in range(n)]


def _trainer(kernel: str, ws: int, sharding: str, lookahead: int = 0, horizon: int = 0) -> tuple:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    import torchrec_scratchpipe.distributed as tsp
    from torchrec_scratchpipe.core.config import ScratchPipeConfig
    from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline

    torch.manual_seed(0)
    model = _SeqModel()
    fp = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
    lfs = load_factors(ws) if kernel == "scratchpipe" else {}
    sharders = tsp.get_sharders(ScratchPipeConfig(lookahead=lookahead, horizon=horizon), fused_params=fp)
    dmp = build_dmp(model, constraints_for(seq_tables(), sharding, lfs), sharders, ws)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=0.1)
    )
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    device = torch.device("cpu")
    if kernel == "scratchpipe":
        return dmp, ScratchPipeTrainPipeline(dmp, opt, device, lookahead=lookahead, horizon=horizon)
    return dmp, TrainPipelineSparseDist(dmp, opt, device)


def _run(pipeline: Any, batches: List[Any]) -> List[torch.Tensor]:
    outs, it = [], iter(batches)
    while True:
        try:
            outs.append(pipeline.progress(it))
        except StopIteration:
            return outs


def _compare(rank: int, ws: int, sharding: str) -> Dict[str, Any]:
    import torchrec_scratchpipe.distributed as tsp

    batches = _batches(rank)
    ref, ref_pipe = _trainer("fused", ws, sharding)
    ref_out = _run(ref_pipe, batches)
    res: Dict[str, Any] = {"steps": len(ref_out)}
    for L, H in ((2, 5),):
        sp, pipe = _trainer("scratchpipe", ws, sharding, L, H)
        out = _run(pipe, batches)
        stats = tsp.cache_stats(sp)
        res[f"L{L}"] = {
            "n": len(out),
            "out": max(float((a - b).abs().max()) for a, b in zip(out, ref_out) if a.numel()),
            "final": max_diff(local_tensors(sp.state_dict()), local_tensors(ref.state_dict())),
            "train_misses": sum(s["train_misses"] for s in stats.values()),
            "evictions": {t: s["evictions"] > 0 for t, s in stats.items()},
            "steps": {t: s["steps"] for t, s in stats.items()},
        }
    # Evaluation: the same pipelines under model.eval() and no_grad give fused's scores.
    scores = []
    for kernel in ("fused", "scratchpipe"):
        model, pipe = _trainer(kernel, ws, sharding, 2, 3)
        model.eval()
        with torch.no_grad():
            scores.append(torch.cat(_run(pipe, batches[:6])))
    res["eval"] = float((scores[0] - scores[1]).abs().max())
    # A batch without a feature the collection reads is refused before its step.
    from torchrec.datasets.utils import Batch

    _, pipe = _trainer("scratchpipe", ws, sharding, 2, 3)
    kjt = batches[0].sparse_features
    keep = [i for i, k in enumerate(KEYS) if k != "f_hist"]
    bad = Batch(batches[0].dense_features, kjt.permute(keep), batches[0].labels)
    try:
        pipe.progress(iter([bad]))
        res["missing"] = "no error"
    except ValueError as e:
        res["missing"] = str(e)
    return res


def _check(results: List[Dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        assert res["steps"] == STEPS
        r = res["L2"]
        assert r["n"] == STEPS, (rank, r)
        assert r["out"] <= TOL and r["final"] <= TOL, (rank, r)
        assert r["train_misses"] == 0, (rank, r)
        assert r["evictions"] == {"s_big": True, "s_mid": True}, (rank, r)
        assert set(r["steps"].values()) == {STEPS}, (rank, r)
        assert "lack ['f_hist']" in res["missing"], res["missing"]
        assert res["eval"] <= TOL, res["eval"]


def test_sequence_pipeline_world_size_1() -> None:
    _check(spawn(_compare, 1, "table_wise"))


@pytest.mark.slow
def test_sequence_pipeline_world_size_2_row_wise() -> None:
    _check(spawn(_compare, 2, "row_wise"))
