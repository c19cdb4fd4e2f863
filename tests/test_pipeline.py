"""ScratchPipeTrainPipeline trains exactly like TorchRec's TrainPipelineSparseDist on `fused`."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig

from dist_utils import spawn

STEPS = 14
LOOKAHEADS = [(0, 2), (1, 3), (4, 7)]


def _spec(world_size: int):
    from torchrec_scratchpipe.training import ModelSpec

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate([400, 250, 90])
    ]
    return ModelSpec(tables, dense_arch=[16], over_arch=[16, 1], optimizer=EmbOptimType.EXACT_SGD,
                     learning_rate=0.5, batch_size=16, pooling=2.0)


def _batches(rank: int, n: int = STEPS) -> List[Any]:
    from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig

    log = SyntheticClickLog(SyntheticConfig(num_embeddings=[400, 250, 90], batch_size=16, pooling=2, min_pooling=0, seed=rank))
    return [log.batch(i) for i in range(n)]


def _train(trainer: Any, batches: List[Any]) -> List[float]:
    losses, it = [], iter(batches)
    while True:
        try:
            losses.append(float(trainer.pipeline.progress(it)[0]))
        except StopIteration:
            return losses


def _compare_pipelines(rank: int, world_size: int, sharding_type: str, load_factor: float) -> Dict[str, Any]:
    from torchrec_scratchpipe.distributed import cache_stats
    from torchrec_scratchpipe.training import KernelChoice, build_trainer, local_table_weights

    spec = _spec(world_size)
    init = spec.initial_state(0)
    names = [t.name for t in spec.tables]
    batches = _batches(rank)
    ref = build_trainer(spec, KernelChoice("fused", sharding_type=sharding_type), torch.device("cpu"), init)
    ref_losses = _train(ref, batches)
    ref_w = local_table_weights(ref.model, names)
    out: Dict[str, Any] = {"steps": len(ref_losses)}
    for L, H in LOOKAHEADS:
        # L=1 also keeps one table on `fused` in the same EmbeddingBagCollection.
        # L=4 plans in the background thread (these batches are too small for the automatic choice).
        overrides = {"t2": "fused"} if L == 1 else {}
        sp = build_trainer(spec, KernelChoice("scratchpipe", load_factor, lookahead=L, horizon=H, overrides=overrides,
                                              sharding_type=sharding_type, background_planning=L == 4 or None),
                           torch.device("cpu"), init)
        losses = _train(sp, batches)
        w = local_table_weights(sp.model, names)
        stats = cache_stats(sp.model)
        out[f"L{L}"] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "n_losses": len(losses),
            "weight_diff": max(float((w[n] - ref_w[n]).abs().max()) for n in names),
            "train_misses": sum(s.get("train_misses", 0) for s in _flat(stats)),
            "evictions": sum(s.get("evictions", 0) for s in _flat(stats)),
            "background_s": sum(s.get("planner_background_s", 0) for s in _flat(stats)),
        }
    return out


def _flat(stats: Any) -> List[Dict[str, Any]]:
    """Every counter dict inside cache_stats' nested result."""
    if isinstance(stats, dict) and "train_misses" in stats:
        return [stats]
    if isinstance(stats, dict):
        return [d for v in stats.values() for d in _flat(v)]
    if isinstance(stats, (list, tuple)):
        return [d for v in stats for d in _flat(v)]
    return []


def _check(results: List[Dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        assert res["steps"] == STEPS
        for L, _ in LOOKAHEADS:
            r = res[f"L{L}"]
            assert r["n_losses"] == STEPS, (rank, L)
            assert r["loss_diff"] == 0, (rank, L, r)
            assert r["weight_diff"] == 0, (rank, L, r)
            assert r["train_misses"] == 0, (rank, L, r)
            assert r["evictions"] > 0, (rank, L, r)  # the scratchpad really was too small
            assert (r["background_s"] > 0) == (L == 4), (rank, L, r)


def test_pipeline_matches_sparse_dist_world_size_1() -> None:
    _check(spawn(_compare_pipelines, 1, "table_wise", 0.15))


@pytest.mark.slow
def test_pipeline_matches_sparse_dist_world_size_2_row_wise() -> None:
    _check(spawn(_compare_pipelines, 2, "row_wise", 0.3))


def _eval_and_errors(rank: int, world_size: int) -> Dict[str, Any]:
    from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline
    from torchrec_scratchpipe.training import KernelChoice, build_trainer

    spec = _spec(world_size)
    init = spec.initial_state(0)
    batches = _batches(rank, 6)
    out: Dict[str, Any] = {}
    logits = {}
    for kernel in ("fused", "scratchpipe"):
        t = build_trainer(spec, KernelChoice(kernel, 0.15, lookahead=2, horizon=3), torch.device("cpu"), init)
        t.model.eval()
        it, got = iter(batches), []
        with torch.no_grad():
            while True:
                try:
                    got.append(t.pipeline.progress(it)[1])
                except StopIteration:
                    break
        logits[kernel] = torch.cat(got)
    out["eval_diff"] = float((logits["fused"] - logits["scratchpipe"]).abs().max())
    t = build_trainer(spec, KernelChoice("scratchpipe", 0.15, lookahead=1), torch.device("cpu"), init)
    errors = {}
    for name, kwargs in {"negative": {"lookahead": -1}, "horizon": {"lookahead": 2, "horizon": 1},
                         "too_large": {"lookahead": 500}}.items():
        try:
            ScratchPipeTrainPipeline(t.model, t.optimizer, torch.device("cpu"), **kwargs)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    try:
        t.pipeline.progress(iter([]))
        errors["empty"] = "no error"
    except ValueError as e:
        errors["empty"] = str(e)
    out["errors"] = errors
    # A batch with foreign features is refused before the step runs; training goes on after it.
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch

    good = _batches(rank, 5)
    sf = good[2].sparse_features
    bad = Batch(good[2].dense_features, KeyedJaggedTensor(["f0", "f1", "zz"], sf.values(), lengths=sf.lengths()), good[2].labels)
    t = build_trainer(spec, KernelChoice("scratchpipe", 0.15, lookahead=1), torch.device("cpu"), init)
    it, steps, refused = iter(good[:3] + [bad] + good[3:]), 0, []
    while True:
        try:
            t.pipeline.progress(it)
            steps += 1
        except ValueError as e:
            refused.append(str(e))
        except StopIteration:
            break
    out["bad_batch"] = {"steps": steps, "refused": refused}
    return out


def test_eval_mode_and_bad_arguments() -> None:
    (res,) = spawn(_eval_and_errors, 1)
    assert res["eval_diff"] == 0
    e = res["errors"]
    assert "invalid window lookahead=-1" in e["negative"]
    assert "invalid window lookahead=2, horizon=1" in e["horizon"] and "<= 1024" in e["horizon"]
    assert "too large for the scratchpad" in e["too_large"]
    assert "empty data iterator" in e["empty"]
    bad = res["bad_batch"]
    assert bad["steps"] == 5 and len(bad["refused"]) == 1
    assert "differ from the first batch's ['f0', 'f1', 'f2']" in bad["refused"][0]
