"""ScratchPipe for EmbeddingCollection (unpooled sequence tables) under DMP trains exactly
like TorchRec's ``fused`` kernel.

One spawned group per world size runs every check: table-wise and row-wise (column-wise
on two ranks) equivalence of outputs and weights/optimizer state with a learning-rate
change, a table read by two features, a ``fused`` table in the same collection, plan
swapping through state dicts in both directions, pipeline-style ``prefetch`` up to H ahead,
``cache_stats``, and clear errors for bad ids and too-small scratchpads.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from dist_utils import build_dmp, constraints_for, load_full, local_tensors, max_diff, spawn
from seq_utils import BATCH, DIM, KEYS, MAX_LEN, SP_TABLES, load_factors, seq_batch, seq_tables

TOL = 0.0  # bit for bit with fused (max |diff| == 0)
STEPS = 40


def _fused_params() -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}


def _values(out: Any, keys: List[str]) -> torch.Tensor:
    out = out.wait() if hasattr(out, "wait") else out
    return torch.cat([out[k].values() for k in keys])


def _train_pair(a: Any, b: Any, rank: int, steps: range, weight: torch.Tensor) -> float:
    worst = 0.0
    for s in steps:
        kjt = seq_batch(s, rank)
        got = []
        for m in (a, b):
            v = _values(m(kjt), kjt.keys())
            (v * weight[: v.shape[0]]).sum().backward()
            got.append(v.detach())
        worst = max(worst, (got[0] - got[1]).abs().max().item() if got[0].numel() else 0.0)
    return worst


def _states(model: Any) -> Dict[str, torch.Tensor]:
    return {**local_tensors(model.state_dict(), "w/"), **local_tensors(model.fused_optimizer.state_dict(), "o/")}


def _set_lr(model: Any, lr: float) -> None:
    for group in model.fused_optimizer.param_groups:
        group["lr"] = lr
    model.fused_optimizer.step()


def _pair(ec: Any, sharding: str, ws: int, full: Dict[str, torch.Tensor], config: Any = None, **extra: Any) -> tuple:
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    import torchrec_scratchpipe.distributed as tsp

    fp = _fused_params()
    sp = build_dmp(ec, constraints_for(seq_tables(), sharding, load_factors(ws), **extra), tsp.get_sharders(config, fp), ws)
    ref = build_dmp(
        ec, constraints_for(seq_tables(), sharding, {}, **extra), [EmbeddingCollectionSharder(fused_params=fp)], ws,
        plan_sharders=tsp.get_sharders(fused_params=fp),
    )
    load_full(sp, full)
    load_full(ref, full)
    return sp, ref


def _equivalence(rank: int, ws: int, sharding: str, ec: Any, full: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    import torchrec_scratchpipe.distributed as tsp

    extra: Dict[str, Any] = {"min_partition": 4} if sharding == "column_wise" else {}
    sp, ref = _pair(ec, sharding, ws, full, **extra)
    weight = torch.randn(4 * BATCH * MAX_LEN, DIM, generator=torch.Generator().manual_seed(rank))
    res: Dict[str, Any] = {"kernels": [k.table_names for k in tsp.scratchpipe_kernels(sp)]}
    res["keys_types"] = (
        {k: type(v).__name__ for k, v in sp.state_dict().items()}
        == {k: type(v).__name__ for k, v in ref.state_dict().items()}
    )
    res["out"] = _train_pair(sp, ref, rank, range(STEPS // 2), weight)
    _set_lr(sp, 0.05)
    _set_lr(ref, 0.05)
    res["out"] = max(res["out"], _train_pair(sp, ref, rank, range(STEPS // 2, STEPS), weight))
    res["final"] = max_diff(_states(sp), _states(ref))
    stats = tsp.cache_stats(sp)
    res["stats"] = {t: (s["train_misses"], s["evictions"] > 0, s["shards"]) for t, s in stats.items()}

    # Plan swap: ScratchPipe checkpoint -> fresh fused model; fused checkpoint -> a
    # ScratchPipe model with (stale) rows resident in its scratchpads.
    fp = _fused_params()
    to_fused = build_dmp(ec, constraints_for(seq_tables(), sharding, {}, **extra), tsp.get_sharders(fused_params=fp), ws)
    to_sp = build_dmp(ec, constraints_for(seq_tables(), sharding, load_factors(ws), **extra), tsp.get_sharders(fused_params=fp), ws)
    _train_pair(to_sp, to_fused, rank, range(1000, 1003), weight)  # warm, different state
    for src, dst in ((sp, to_fused), (ref, to_sp)):
        dst.load_state_dict(src.state_dict())
        dst.fused_optimizer.load_state_dict(src.fused_optimizer.state_dict())
        _set_lr(dst, 0.05)
    res["swap_loaded"] = max(max_diff(_states(sp), _states(to_fused)), max_diff(_states(ref), _states(to_sp)))
    more = range(STEPS, STEPS + 10)
    res["swap_out"] = max(_train_pair(sp, to_fused, rank, more, weight), _train_pair(ref, to_sp, rank, more, weight))
    res["swap_final"] = max(max_diff(_states(sp), _states(to_fused)), max_diff(_states(ref), _states(to_sp)))
    return res


def _lookahead(rank: int, ws: int, ec: Any, full: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Pipeline-style use: announce batches 4 ahead (L = 2 planned, H = 4 ranking victims), train with DMP forward."""
    import torchrec_scratchpipe.distributed as tsp
    from torchrec_scratchpipe.core.config import ScratchPipeConfig

    sp, ref = _pair(ec, "row_wise", ws, full, config=ScratchPipeConfig(lookahead=2, horizon=4))
    modules = [m for _, m in tsp.scratchpipe_modules(sp)]
    weight = torch.randn(4 * BATCH * MAX_LEN, DIM, generator=torch.Generator().manual_seed(rank))

    (module,) = modules

    def dist_input(step: int) -> Any:
        ctx = module.create_context()
        return ctx, module.input_dist(ctx, seq_batch(step, rank)).wait().wait()

    # As a pipeline does: the input-dist output announced is the one the forward computes on.
    steps, announced, worst, inputs = 20, 0, 0.0, {}
    for s in range(steps):
        while announced <= min(s + 4, steps - 1):
            inputs[announced] = dist_input(announced)
            module.prefetch(inputs[announced][1])
            announced += 1
        kjt = seq_batch(s, rank)
        got = []
        for out in (module.compute_and_output_dist(*inputs.pop(s)).wait(), ref(kjt)):
            v = _values(out, kjt.keys())
            (v * weight[: v.shape[0]]).sum().backward()
            got.append(v.detach())
        worst = max(worst, (got[0] - got[1]).abs().max().item() if got[0].numel() else 0.0)
    stats = tsp.cache_stats(sp)
    return {
        "out": worst,
        "final": max_diff(_states(sp), _states(ref)),
        "train_misses": sum(s["train_misses"] for s in stats.values()),
        "steps": {t: s["steps"] for t, s in stats.items()},
    }


def _errors(rank: int, ws: int, ec: Any) -> Dict[str, str]:
    """Bad ids and a scratchpad smaller than one batch fail clearly, before any state changes."""
    from torchrec import KeyedJaggedTensor

    import torchrec_scratchpipe.distributed as tsp

    model = build_dmp(ec, constraints_for(seq_tables(), "table_wise", {"s_big": 0.005}), tsp.get_sharders(), ws)
    before = _states(model)
    keys = KEYS
    out: Dict[str, str] = {}
    lengths = torch.zeros(len(keys) * BATCH, dtype=torch.long)
    lengths[0] = 30  # one sequence of 30 distinct items; the scratchpad has 10 slots
    cases = {
        "capacity": torch.arange(30),
        "bad_id": torch.cat([torch.arange(29), torch.tensor([2000])]),
    }
    for name, ids in cases.items():
        try:
            model(KeyedJaggedTensor.from_lengths_sync(keys, ids, lengths))
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    out["unchanged"] = str(max_diff(_states(model), before) == 0.0)
    return out


def _all_checks(rank: int, ws: int) -> Dict[str, Any]:
    from torchrec import EmbeddingCollection

    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=seq_tables(), device=torch.device("cpu"))
    full = {k: v.detach().clone() for k, v in ec.state_dict().items()}
    shardings = ["table_wise", "row_wise"] + (["column_wise"] if ws > 1 else [])
    out: Dict[str, Any] = {s: _equivalence(rank, ws, s, ec, full) for s in shardings}
    out["lookahead"] = _lookahead(rank, ws, ec, full)
    if ws == 1:
        out["errors"] = _errors(rank, ws, ec)
    return out


def _check(results: List[Dict[str, Any]], ws: int) -> None:
    shardings = ["table_wise", "row_wise"] + (["column_wise"] if ws > 1 else [])
    for sharding in shardings:  # every ScratchPipe table runs somewhere
        assert {t for res in results for k in res[sharding]["kernels"] for t in k} == set(SP_TABLES), sharding
    for rank, res in enumerate(results):
        for sharding in shardings:
            r, where = res[sharding], f"rank {rank} {sharding}"
            assert r["keys_types"], where
            for key in ("out", "final", "swap_loaded", "swap_out", "swap_final"):
                assert r[key] <= TOL, (where, key, r[key])
            shards = ws if sharding in ("row_wise", "column_wise") else 1
            assert r["stats"] == {t: (0, True, shards) for t in SP_TABLES}, (where, r["stats"])
        la = res["lookahead"]
        assert la["out"] <= TOL and la["final"] <= TOL, la
        assert la["train_misses"] == 0 and set(la["steps"].values()) == {20}, la
    if ws == 1:
        e = results[0]["errors"]
        assert "30 distinct rows" in e["capacity"] and "10 slots" in e["capacity"] and "load_factor" in e["capacity"], e
        assert "id 2000" in e["bad_id"] and "s_big" in e["bad_id"] and "out of range" in e["bad_id"], e
        assert e["unchanged"] == "True", e


def test_sequence_equivalence_world_size_1() -> None:
    _check(spawn(_all_checks, 1), 1)


@pytest.mark.slow
def test_sequence_equivalence_world_size_2() -> None:
    _check(spawn(_all_checks, 2), 2)
