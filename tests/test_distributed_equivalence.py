"""ScratchPipe under DMP (gloo, CPU) trains exactly like TorchRec's ``fused`` kernel.

One spawned group per world size runs every check (spawning costs more than the checks):
table-wise and row-wise (and, on two ranks, column-wise) equivalence over 100 steps with constant eviction and a
learning-rate change, plan swapping through state dicts in both directions, pipeline-style
``prefetch`` up to H ahead with lookahead, ``cache_stats``, and a clear run-time capacity error.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

from dist_utils import (
    build_dmp,
    constraints_for,
    load_full,
    local_tensors,
    make_batch,
    make_tables,
    max_diff,
    spawn,
)

STEPS = 100
TOL = 0.0  # bit for bit with fused (max |diff| == 0)
SP_TABLES = ("t_big", "t_mid", "t_odd")


def _fused_params(optimizer: Optional[Any] = None) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"optimizer": optimizer or EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}


def _load_factors(tables: List[Any], sharding: str, world_size: int) -> Dict[str, float]:
    """About 48 slots per shard: a batch (<= 32 distinct rows) fits, eviction never stops."""
    shards = world_size if sharding == "row_wise" else 1
    return {t.name: round(48 * shards / t.num_embeddings, 4) for t in tables if t.name in SP_TABLES}


def _step(model: Any, kjt: Any, weight: torch.Tensor) -> torch.Tensor:
    out = model(kjt)
    values = (out.wait() if hasattr(out, "wait") else out).values()
    (values * weight).sum().backward()
    return values.detach()


def _set_lr(model: Any, lr: float) -> None:
    for group in model.fused_optimizer.param_groups:
        group["lr"] = lr
    model.fused_optimizer.step()


def _states(model: Any) -> Dict[str, torch.Tensor]:
    return {**local_tensors(model.state_dict(), "w/"), **local_tensors(model.fused_optimizer.state_dict(), "o/")}


def _train_pair(a: Any, b: Any, rank: int, tables: List[Any], steps: range, weight: torch.Tensor) -> float:
    worst = 0.0
    for s in steps:
        kjt = make_batch(s, rank, tables)
        worst = max(worst, (_step(a, kjt, weight) - _step(b, kjt, weight)).abs().max().item())
    return worst


def _swap_checkpoints(
    sp: Any, ref: Any, to_sp: Any, to_fused: Any, rank: int, tables: List[Any], more: range, weight: torch.Tensor, lr: float
) -> Dict[str, float]:
    """Plan swap both ways: ``sp``'s checkpoint into a fused model, ``ref``'s (fused) into a
    ScratchPipe model that already has other rows resident; then both pairs train on."""
    _train_pair(to_sp, to_fused, rank, tables, range(1000, 1003), weight)  # warm, different state
    for src, dst in ((sp, to_fused), (ref, to_sp)):
        dst.load_state_dict(src.state_dict())
        dst.fused_optimizer.load_state_dict(src.fused_optimizer.state_dict())
        _set_lr(dst, lr)
    res = {"swap_loaded": max(max_diff(_states(sp), _states(to_fused)), max_diff(_states(ref), _states(to_sp)))}
    res["swap_out"] = max(_train_pair(sp, to_fused, rank, tables, more, weight), _train_pair(ref, to_sp, rank, tables, more, weight))
    res["swap_final"] = max(max_diff(_states(sp), _states(to_fused)), max_diff(_states(ref), _states(to_sp)))
    return res


def _sp_sharders(fp: Dict[str, Any], store_dir: Optional[str]) -> List[Any]:
    """ScratchPipe's sharders; with ``store_dir``, its tables in files there (host cache 16 rows a table)."""
    import torchrec_scratchpipe.distributed as tsp
    from torchrec_scratchpipe.core.config import ScratchPipeConfig
    from torchrec_scratchpipe.core.store_api import StoreSpec

    cfg = ScratchPipeConfig(store=StoreSpec("file", store_dir, 16 * 68)) if store_dir else None
    return tsp.get_sharders(cfg, fused_params=fp)


def _equivalence(
    rank: int, ws: int, sharding: str, ebc: Any, full: Dict[str, torch.Tensor], steps: int = STEPS,
    store_dir: Optional[str] = None, optimizer: Optional[Any] = None,
) -> Dict[str, Any]:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    import torchrec_scratchpipe.distributed as tsp

    tables = make_tables()
    fp = _fused_params(optimizer)
    lfs = _load_factors(tables, sharding, ws)
    # column-wise: t_big (dim 16) splits into two 8-column shards, one per rank
    extra: Dict[str, Any] = {"min_partition": 8} if sharding == "column_wise" else {}
    sp = build_dmp(ebc, constraints_for(tables, sharding, lfs, **extra), _sp_sharders(fp, store_dir), ws)
    ref = build_dmp(
        ebc, constraints_for(tables, sharding, {}, **extra), [EmbeddingBagCollectionSharder(fused_params=fp)], ws,
        plan_sharders=tsp.get_sharders(fused_params=fp),
    )
    load_full(sp, full)
    load_full(ref, full)
    weight = torch.randn(8, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(rank))
    res: Dict[str, Any] = {"kernels": [k.table_names for k in tsp.scratchpipe_kernels(sp)]}
    res["keys_types"] = (
        {k: type(v).__name__ for k, v in sp.state_dict().items()}
        == {k: type(v).__name__ for k, v in ref.state_dict().items()}
    )
    res["out"] = _train_pair(sp, ref, rank, tables, range(steps // 2), weight)
    _set_lr(sp, 0.05)
    _set_lr(ref, 0.05)
    res["out"] = max(res["out"], _train_pair(sp, ref, rank, tables, range(steps // 2, steps), weight))
    res["final"] = max_diff(_states(sp), _states(ref))
    res["lr_applied"] = max_diff(_states(sp), _states(ref)) <= TOL and abs(sp.fused_optimizer.param_groups[0]["lr"] - 0.05) < 1e-6
    stats = tsp.cache_stats(sp)
    res["stats"] = {t: (s["train_misses"], s["evictions"] > 0, s["shards"]) for t, s in stats.items()}

    # Plan swap: ScratchPipe checkpoint -> fresh fused model, fused checkpoint -> a ScratchPipe
    # model that already has (stale) rows resident in its scratchpads.
    to_fused = build_dmp(ebc, constraints_for(tables, sharding, {}, **extra), tsp.get_sharders(fused_params=fp), ws)
    to_sp = build_dmp(ebc, constraints_for(tables, sharding, lfs, **extra), _sp_sharders(fp, store_dir), ws)
    res.update(_swap_checkpoints(sp, ref, to_sp, to_fused, rank, tables, range(steps, steps + 20), weight, lr=0.05))
    return res


def _lookahead(rank: int, ws: int, ebc: Any, full: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Pipeline-style use: announce batches 4 ahead (L = 2 planned, H = 4 ranking victims), train with DMP forward."""
    import torchrec_scratchpipe.distributed as tsp
    from torchrec_scratchpipe.core.config import ScratchPipeConfig

    tables = make_tables()
    fp = _fused_params()
    lfs = _load_factors(tables, "row_wise", ws)
    cfg = ScratchPipeConfig(lookahead=2, horizon=4)
    sp = build_dmp(ebc, constraints_for(tables, "row_wise", lfs), tsp.get_sharders(cfg, fused_params=fp), ws)
    ref = build_dmp(ebc, constraints_for(tables, "row_wise", {}), tsp.get_sharders(fused_params=fp), ws)
    load_full(sp, full)
    load_full(ref, full)
    weight = torch.randn(8, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(rank))
    modules = [m for _, m in tsp.scratchpipe_modules(sp)]

    (module,) = modules

    def dist_input(step: int) -> Any:
        ctx = module.create_context()
        return ctx, module.input_dist(ctx, make_batch(step, rank, tables)).wait().wait()

    # As a pipeline does: the input dist output announced is the one the forward computes on.
    steps, announced, worst, inputs = 30, 0, 0.0, {}
    for s in range(steps):
        while announced <= min(s + 4, steps - 1):
            inputs[announced] = dist_input(announced)
            module.prefetch(inputs[announced][1])
            announced += 1
        out = module.compute_and_output_dist(*inputs.pop(s)).wait().values()
        (out * weight).sum().backward()
        kjt = make_batch(s, rank, tables)
        worst = max(worst, (out.detach() - _step(ref, kjt, weight)).abs().max().item())
    stats = tsp.cache_stats(sp)
    return {
        "out": worst,
        "final": max_diff(_states(sp), _states(ref)),
        "train_misses": sum(s["train_misses"] for s in stats.values()),
        "steps": {t: s["steps"] for t, s in stats.items()},
    }


def _sgd_in_backward(rank: int, ws: int, full: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Optimizer from ``apply_optimizer_in_backward`` (exact SGD: no optimizer state)."""
    from torchrec import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    import torchrec_scratchpipe.distributed as tsp

    tables = make_tables()
    lfs = _load_factors(tables, "table_wise", ws)
    models = []
    for sp in (lfs, {}):
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        apply_optimizer_in_backward(torch.optim.SGD, ebc.embedding_bags.parameters(), {"lr": 0.5})
        models.append(build_dmp(ebc, constraints_for(tables, "table_wise", sp), tsp.get_sharders(), ws, copy_module=False))
        load_full(models[-1], full)
    weight = torch.randn(8, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(rank))
    before = local_tensors(models[0].state_dict())
    out = _train_pair(models[0], models[1], rank, tables, range(20), weight)
    lrs = {k.engine.get_learning_rate() for k in tsp.scratchpipe_kernels(models[0])}
    moved = max_diff(local_tensors(models[0].state_dict()), before)
    return {"out": out, "final": max_diff(_states(models[0]), _states(models[1])), "lrs": lrs, "moved": moved}


def _capacity_error(rank: int, ws: int, ebc: Any) -> str:
    """A batch with more distinct rows than the scratchpad has slots fails clearly."""
    from torchrec import KeyedJaggedTensor

    import torchrec_scratchpipe.distributed as tsp

    tables = make_tables()
    model = build_dmp(ebc, constraints_for(tables, "table_wise", {"t_big": 0.005}), tsp.get_sharders(), ws)
    lengths = torch.zeros(len(tables) * 8, dtype=torch.long)
    lengths[0] = 30  # one bag of t_big with 30 distinct rows; the scratchpad has 10 slots
    kjt = KeyedJaggedTensor.from_lengths_sync([t.feature_names[0] for t in tables], torch.arange(30), lengths)
    try:
        model(kjt)
    except ValueError as e:
        return str(e)
    return "no error"


def _all_checks(rank: int, ws: int, store_dir: Optional[str] = None) -> Dict[str, Any]:
    from torchrec import EmbeddingBagCollection

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=make_tables(), device=torch.device("cpu"))
    full = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
    out: Dict[str, Any] = {s: _equivalence(rank, ws, s, ebc, full, store_dir=store_dir) for s in ("table_wise", "row_wise")}
    if store_dir is not None:  # the file store: table- and row-wise, plan swaps with fused
        return out
    if ws > 1:  # column-wise needs two ranks to split a table; fewer steps keep it quick
        out["column_wise"] = _equivalence(rank, ws, "column_wise", ebc, full, steps=40)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    # exact (per-column) Adagrad too, bit for bit: row-wise on two ranks, table-wise on one
    out["adagrad"] = _equivalence(rank, ws, "row_wise" if ws > 1 else "table_wise", ebc, full, steps=30,
                                  optimizer=EmbOptimType.EXACT_ADAGRAD)
    out["lookahead"] = _lookahead(rank, ws, ebc, full)
    out["sgd"] = _sgd_in_backward(rank, ws, full)
    if ws == 1:
        out["capacity"] = _capacity_error(rank, ws, ebc)
    return out


def _check(results: List[Dict[str, Any]], ws: int, store: bool = False) -> None:
    shardings = ["table_wise", "row_wise"] + (["column_wise"] if ws > 1 and not store else [])
    for sharding in shardings:  # every ScratchPipe table runs somewhere
        assert {t for res in results for k in res[sharding]["kernels"] for t in k} == set(SP_TABLES)
    for rank, res in enumerate(results):
        for sharding in shardings:
            r = res[sharding]
            where = f"rank {rank} {sharding}"
            assert {t for k in r["kernels"] for t in k} <= set(SP_TABLES), where
            assert r["keys_types"], where
            assert r["out"] <= TOL, (where, r["out"])
            assert r["final"] <= TOL, (where, r["final"])
            assert r["lr_applied"], where
            assert r["swap_loaded"] <= TOL, (where, r["swap_loaded"])
            assert r["swap_out"] <= TOL, (where, r["swap_out"])
            assert r["swap_final"] <= TOL, (where, r["swap_final"])
            shards = {t: ws if sharding == "row_wise" else 1 for t in SP_TABLES}
            if sharding == "column_wise":
                shards["t_big"] = 2
            assert r["stats"] == {t: (0, True, shards[t]) for t in SP_TABLES}, (where, r["stats"])
        if store:
            continue
        la = res["lookahead"]
        assert la["out"] <= TOL and la["final"] <= TOL, la
        ada = res["adagrad"]
        assert ada["out"] <= TOL and ada["final"] <= TOL and ada["swap_final"] <= TOL, ada
        assert la["train_misses"] == 0 and set(la["steps"].values()) == {30}, la
        sgd = res["sgd"]
        assert sgd["out"] <= TOL and sgd["final"] <= TOL and sgd["moved"] > 0.01, sgd
        assert sgd["lrs"] <= {0.5}, sgd  # empty on a rank without ScratchPipe shards
    if ws == 1:
        msg = results[0]["capacity"]
        assert "30 distinct rows" in msg and "10 slots" in msg and "load_factor" in msg, msg


@pytest.mark.slow
def test_equivalence_world_size_1() -> None:
    _check(spawn(_all_checks, 1), 1)


@pytest.mark.slow
def test_equivalence_world_size_2() -> None:
    _check(spawn(_all_checks, 2), 2)


@pytest.mark.slow
def test_equivalence_world_size_2_file_store(tmp_path: Any) -> None:
    """Both ranks keep their ScratchPipe shards in files (table- and row-wise, plan swaps)."""
    _check(spawn(_all_checks, 2, str(tmp_path)), 2, store=True)
    assert list(tmp_path.iterdir()) == []
