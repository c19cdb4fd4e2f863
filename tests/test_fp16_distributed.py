"""FP16 tables under DMP (gloo, CPU): ScratchPipe trains like TorchRec's ``fused`` FP16.

With deterministic rounding (``stochastic_rounding=False`` in the fused params) outputs,
weights and optimizer state equal ``fused`` FP16 bit for bit, table-wise and row-wise;
state dicts keep FP16 and load both ways; the planner and the traffic counters price a
row with the FP16 layout.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from dist_utils import build_dmp, constraints_for, load_full, local_tensors, max_diff, spawn
from test_distributed_equivalence import _states, _swap_checkpoints, _train_pair

#: Largest |difference| from ``fused`` FP16 the issue allows (deterministic rounding).
TOL = 0.0  # bit for bit with fused FP16 (deterministic rounding)
SP_TABLES = ("t_big", "t_mid", "t_odd")


def _tables() -> List[Any]:
    """dist_utils' four tables, the ScratchPipe ones (and t_small, on fused) in FP16."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType

    spec = [("t_big", 2000, 16), ("t_mid", 1000, 8), ("t_small", 100, 8), ("t_odd", 1500, 12)]
    return [
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=[f"f_{n[2:]}"], data_type=DataType.FP16)
        for n, r, d in spec
    ]


def _fused_params(stochastic: bool) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "stochastic_rounding": stochastic}


def _load_factors(sharding: str, world_size: int) -> Dict[str, float]:
    """About 48 slots per shard: a batch fits, eviction never stops."""
    shards = world_size if sharding == "row_wise" else 1
    return {t.name: round(48 * shards / t.num_embeddings, 4) for t in _tables() if t.name in SP_TABLES}


def _dtypes(model: Any) -> Dict[str, Any]:
    """dtype of each local weight shard and optimizer-state tensor."""
    weights = {k: v.local_shards()[0].tensor.dtype for k, v in model.state_dict().items() if v.local_shards()}
    return {**weights, **{k: v.dtype for k, v in local_tensors(model.fused_optimizer.state_dict(), "o/").items()}}


def _pair(rank: int, ws: int, sharding: str, steps: int, stochastic: bool = False) -> Dict[str, Any]:
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    import torchrec_scratchpipe.distributed as tsp
    from torchrec_scratchpipe.core.layout import RowLayout

    tables = _tables()
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    full = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
    fp = _fused_params(stochastic)
    lfs = _load_factors(sharding, ws)
    sp_cons, ref_cons = constraints_for(tables, sharding, lfs), constraints_for(tables, sharding, {})
    sp = build_dmp(ebc, sp_cons, tsp.get_sharders(fused_params=fp), ws)
    ref = build_dmp(ebc, ref_cons, [EmbeddingBagCollectionSharder(fused_params=fp)], ws, plan_sharders=tsp.get_sharders(fused_params=fp))
    load_full(sp, full)
    load_full(ref, full)
    weight = torch.randn(8, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(rank))
    res: Dict[str, Any] = {"dtypes": _dtypes(sp), "ref_dtypes": _dtypes(ref)}
    res["engine_rounding"] = {k.engine.config.stochastic_rounding for k in tsp.scratchpipe_kernels(sp)}
    res["out"] = _train_pair(sp, ref, rank, tables, range(steps), weight)
    res["final"] = max_diff(_states(sp), _states(ref))
    stats = tsp.cache_stats(sp)
    row = {t.name: RowLayout.for_table(fp["optimizer"], t).bytes_per_row for t in tables}
    res["bytes"] = {t: (s["h2d_bytes"] == s["h2d_rows"] * row[t] and s["h2d_rows"] > 0, s["train_misses"]) for t, s in stats.items()}
    if stochastic:
        before = {k: v.float() for k, v in local_full(full, sp).items()}
        after = {k: v.float() for k, v in local_full(None, sp).items()}
        res["trained"] = min(float((after[k] - before[k]).abs().max()) for k in after)
        res["nan"] = any(bool(torch.isnan(v).any()) for v in after.values())
        return res
    # State dicts both ways: ScratchPipe -> fresh fused FP16, fused FP16 -> a warm ScratchPipe model.
    to_fused = build_dmp(ebc, ref_cons, tsp.get_sharders(fused_params=fp), ws)
    to_sp = build_dmp(ebc, sp_cons, tsp.get_sharders(fused_params=fp), ws)
    res.update(_swap_checkpoints(sp, ref, to_sp, to_fused, rank, tables, range(steps, steps + 10), weight, lr=0.1))
    return res


def local_full(full: Any, model: Any) -> Dict[str, torch.Tensor]:
    """This rank's shard of each table: from ``full`` (unsharded tensors) or, when None, the model."""
    out = {}
    for key, st in model.state_dict().items():
        for shard in st.local_shards():
            o, s = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            out[key] = shard.tensor if full is None else full[key][o[0] : o[0] + s[0], o[1] : o[1] + s[1]]
    return out


def _planner_rows(rank: int, ws: int) -> List[Dict[str, Any]]:
    """The planner's per-shard breakdown of the FP16 ScratchPipe tables."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.planner import Topology

    import torchrec_scratchpipe.distributed as tsp

    tables = _tables()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    planner = tsp.ShardingPlanner(topology=Topology(world_size=ws, compute_device="cpu"),
                                  constraints=constraints_for(tables, "table_wise", _load_factors("table_wise", ws)), batch_size=8)
    planner.collective_plan(ebc, tsp.get_sharders(fused_params=_fused_params(False)), dist.GroupMember.WORLD)
    return planner.scratchpipe_summary


def _sequence(rank: int, ws: int) -> Dict[str, Any]:
    """FP16 sequence tables (EmbeddingCollection) against ``fused`` FP16, table-wise."""
    from torchrec import EmbeddingCollection
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.modules.embedding_configs import DataType

    import test_sequence_distributed as seq
    import torchrec_scratchpipe.distributed as tsp
    from seq_utils import BATCH, DIM, MAX_LEN, load_factors, seq_tables

    tables = seq_tables()
    for t in tables:
        t.data_type = DataType.FP16
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
    full = {k: v.detach().clone() for k, v in ec.state_dict().items()}
    fp = _fused_params(False)
    sp = build_dmp(ec, constraints_for(tables, "table_wise", load_factors(ws)), tsp.get_sharders(fused_params=fp), ws)
    ref = build_dmp(ec, constraints_for(tables, "table_wise", {}), [EmbeddingCollectionSharder(fused_params=fp)], ws,
                    plan_sharders=tsp.get_sharders(fused_params=fp))
    load_full(sp, full)
    load_full(ref, full)
    weight = torch.randn(4 * BATCH * MAX_LEN, DIM, generator=torch.Generator().manual_seed(rank))
    out = seq._train_pair(sp, ref, rank, range(20), weight)
    evictions = sum(s["evictions"] for s in tsp.cache_stats(sp).values())
    return {"out": out, "final": max_diff(_states(sp), _states(ref)), "dtypes": _dtypes(sp), "ref_dtypes": _dtypes(ref),
            "evictions": evictions}


def _all(rank: int, ws: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {s: _pair(rank, ws, s, 30) for s in ("table_wise", "row_wise")}
    if ws == 1:
        out["stochastic"] = _pair(rank, ws, "table_wise", 30, stochastic=True)
        out["planner"] = _planner_rows(rank, ws)
        out["sequence"] = _sequence(rank, ws)
    return out


def _check(results: List[Dict[str, Any]], ws: int) -> None:
    import torch

    from torchrec_scratchpipe.core.layout import EmbOptimType, RowLayout

    for rank, res in enumerate(results):
        for sharding in ("table_wise", "row_wise"):
            r, where = res[sharding], f"rank {rank} {sharding}"
            weights = {k: v for k, v in r["dtypes"].items() if not k.startswith("o/")}
            assert r["dtypes"] == r["ref_dtypes"] and set(weights.values()) == {torch.float16}, (where, r["dtypes"])
            assert r["engine_rounding"] <= {False}, where
            for key in ("out", "final", "swap_loaded", "swap_out", "swap_final"):
                assert r[key] <= TOL, (where, key, r[key])
            assert all(ok and misses == 0 for ok, misses in r["bytes"].values()), (where, r["bytes"])
    if ws == 1:
        s = results[0]["stochastic"]
        assert s["engine_rounding"] == {True} and not s["nan"] and s["trained"] > 1e-3, s
        assert s["out"] == 0 and s["final"] == 0, s  # CPU: FBGEMM rounds to nearest even when asked to round stochastically
        q = results[0]["sequence"]
        assert q["out"] <= TOL and q["final"] <= TOL and q["evictions"] > 0, q
        assert q["dtypes"] == q["ref_dtypes"] and torch.float16 in q["dtypes"].values(), q
        for row in results[0]["planner"]:
            dim = {"t_big": 16, "t_mid": 8, "t_odd": 12}[row["table"]]
            layout = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, dim, torch.float16)
            assert row["row_bytes"] == layout.bytes_per_row and row["store_bytes"] == row["rows"] * layout.bytes_per_row, row


def test_fp16_matches_fused_fp16_world_size_1() -> None:
    _check(spawn(_all, 1), 1)


@pytest.mark.slow
def test_fp16_matches_fused_fp16_world_size_2() -> None:
    _check(spawn(_all, 2), 2)


def test_planner_refuses_data_types_scratchpipe_does_not_hold() -> None:
    """An INT8 table asked for ScratchPipe fails at plan() naming the table and the dtypes
    it can hold; the same table on ``fused`` plans."""
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.planner import Topology
    from torchrec.modules.embedding_configs import DataType

    import torchrec_scratchpipe.distributed as tsp

    tables = _tables()
    tables[1].data_type = DataType.INT8  # t_mid
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    topology = Topology(world_size=1, compute_device="cpu")
    planner = tsp.ShardingPlanner(topology=topology, constraints=constraints_for(tables, "table_wise", {"t_mid": 0.1}))
    with pytest.raises(ValueError, match="^table .t_mid.: data_type INT8 is not supported by ScratchPipe; supported: FP32, FP16"):
        planner.plan(ebc, tsp.get_sharders())
    planner = tsp.ShardingPlanner(topology=topology, constraints=constraints_for(tables, "table_wise", {"t_big": 0.1}))
    plan = planner.plan(ebc, tsp.get_sharders())
    assert plan.plan[""]["t_big"].compute_kernel == tsp.SCRATCHPIPE  # type: ignore[index]
