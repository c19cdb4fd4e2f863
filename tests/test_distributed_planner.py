"""Planner, sharder and plan-time errors of the ScratchPipe TorchRec layer (single process)."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import CacheParams, ParameterSharding

import torchrec_scratchpipe.distributed as tsp
from torchrec_scratchpipe import compat
from torchrec_scratchpipe.core.plan import SlotPlanner
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.mover import staging_rings
from torchrec_scratchpipe.core.staging import staging_host_bytes
from torchrec_scratchpipe.core.store import BackingStore
from torchrec_scratchpipe.distributed.kernel import engine_config
from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, ScratchPipeTableParams, to_runtime_sharding

ROWS = 100_000
FP = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}


def _ebc() -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="big_table", embedding_dim=64, num_embeddings=ROWS, feature_names=["f_big"]),
            EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=1000, feature_names=["f_small"]),
        ],
        device=torch.device("meta"),
    )


def _constraints(lf: Any = 0.05, sharding: str = "row_wise", **kw: Any) -> Dict[str, ParameterConstraints]:
    return {
        "big_table": ParameterConstraints(
            compute_kernels=[tsp.SCRATCHPIPE], sharding_types=[sharding], cache_params=CacheParams(load_factor=lf), **kw
        )
    }


def _planner(device: str = "cpu", **kw: Any) -> tsp.ShardingPlanner:
    kw.setdefault("constraints", _constraints())
    return tsp.ShardingPlanner(topology=Topology(world_size=2, compute_device=device), **kw)


def _options(planner: Any, name: str) -> List[Any]:
    return [so for so in planner._best_plan if so.name == name]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_shows_kernel_and_storage(device: str, caplog: pytest.LogCaptureFixture) -> None:
    planner = _planner(device)
    with caplog.at_level(logging.INFO):
        plan = planner.plan(_ebc(), tsp.get_sharders(fused_params=FP))
    ps = plan.plan[""]["big_table"]
    assert ps.compute_kernel == tsp.SCRATCHPIPE and ps.sharding_type == "row_wise"
    assert plan.plan[""]["small"].compute_kernel == "fused"
    assert "scratchpipe" in str(plan)
    valid = compat.kernel_validation_set()
    assert valid is None or tsp.SCRATCHPIPE not in valid  # scoped patch undone
    log = caplog.text
    assert "scratchpipe: 1" in log and "ScratchPipe tables" in log  # TorchRec stats + ours
    assert "device: scratchpad MB" in log and "host: store MB" in log and "host: planner MB" in log
    rows = planner.scratchpipe_summary
    assert [r["rank"] for r in rows] == [0, 1]
    row_bytes = 64 * 4 + 4  # fp32 weights + row-wise Adagrad state
    for r, so_shard in zip(rows, _options(planner, "big_table")[0].shards):
        assert r["rows"] == ROWS // 2 and r["slots"] == math.ceil(0.05 * ROWS / 2)
        assert r["scratchpad_bytes"] == r["slots"] * row_bytes
        assert r["backing_store_bytes"] == r["rows"] * row_bytes + SlotPlanner.host_bytes(r["rows"], r["slots"])
        assert (r["store_bytes"], r["planner_bytes"]) == (r["rows"] * row_bytes, SlotPlanner.host_bytes(r["rows"], r["slots"]))
        assert 0 < r["staging_bytes"] < r["scratchpad_bytes"]
        device_part = r["scratchpad_bytes"] + r["staging_bytes"]
        if device == "cuda":  # device memory: scratchpad + staging (+ io); host: backing store
            assert so_shard.storage.ddr == r["backing_store_bytes"] + r["host_staging_bytes"]
            assert r["host_staging_bytes"] == staging_host_bytes(r["slots"], row_bytes, r["rows_per_step"]) > 0
            assert device_part < so_shard.storage.hbm < device_part + 2 * 1024 * 1024
        else:  # one memory on CPU; no pinned staging
            assert so_shard.storage.hbm == 0 and r["host_staging_bytes"] == 0
            assert so_shard.storage.ddr >= device_part + r["backing_store_bytes"]


def _nbytes(tensors: Any) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("lf", [0.05, 0.5])
def test_host_estimate_matches_allocations(lf: float) -> None:
    """The DDR estimate of a CUDA shard is what its store, planner and staging ring allocate."""
    planner = _planner("cuda", constraints=_constraints(lf))
    planner.plan(_ebc(), tsp.get_sharders(fused_params=FP))
    for r, shard in zip(planner.scratchpipe_summary, _options(planner, "big_table")[0].shards):
        store = BackingStore([r["rows"]], RowLayout(FP["optimizer"], 64))
        slots = SlotPlanner(r["rows"], r["slots"])
        rings = staging_rings(store, r["slots"], pin=False, rows_per_step=r["rows_per_step"])  # pinned on CUDA: same bytes
        allocated = store.nbytes() + sum(ring.nbytes() for ring in rings) + _nbytes(
            [slots.row_to_slot, slots._tag, slots.slot_to_row, slots.last_use, slots.queue.slots, slots.queue.stamps]
        )
        assert sum(ring.nbytes() for ring in rings) == r["host_staging_bytes"]
        assert abs(shard.storage.ddr - allocated) <= 0.05 * allocated, (shard.storage.ddr, allocated)


def test_perf_at_device_bandwidth_plus_prefetch() -> None:
    sp = _planner("cuda")
    sp.plan(_ebc(), tsp.get_sharders(fused_params=FP))
    fused = _planner("cuda", constraints={"big_table": ParameterConstraints(compute_kernels=["fused"], sharding_types=["row_wise"])})
    fused.plan(_ebc(), tsp.get_sharders(fused_params=FP))
    a, b = _options(sp, "big_table")[0].shards[0].perf, _options(fused, "big_table")[0].shards[0].perf
    assert a.fwd_compute == pytest.approx(b.fwd_compute) and a.bwd_compute == pytest.approx(b.bwd_compute)
    assert a.prefetch_compute > 0 and b.prefetch_compute == 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unconstrained_tables_plan_as_torchrec(device: str) -> None:
    topo = Topology(world_size=2, compute_device=device)
    ours, theirs = tsp.ShardingPlanner(topology=topo), EmbeddingShardingPlanner(topology=topo)
    ebc, sp_sharders, trec_sharders = _ebc(), tsp.get_sharders(), get_default_sharders()

    def space(planner: Any, sharders: Any) -> Any:
        return sorted((so.name, so.sharding_type, so.compute_kernel) for so in planner._enumerator.enumerate(ebc, sharders))

    assert space(ours, sp_sharders) == space(theirs, trec_sharders)  # same search space
    assert str(ours.plan(ebc, sp_sharders)) == str(theirs.plan(ebc, trec_sharders))


def test_errors_load_factor() -> None:
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="CacheParams.load_factor of table .* must be a fraction"):
            _planner(constraints=_constraints(lf=bad))
    sharder = tsp.get_sharders()[0]
    ps = ParameterSharding("row_wise", tsp.SCRATCHPIPE, cache_params=CacheParams(load_factor=0.0))
    with pytest.raises(ValueError, match="CacheParams.load_factor of table .* must be a fraction"):
        sharder.shard(_ebc(), {"big_table": ps}, env=None)  # type: ignore[arg-type]


def test_errors_optimizer_for_device() -> None:
    adam = {"optimizer": EmbOptimType.ADAM}
    with pytest.raises(ValueError, match="ADAM.*cpu"):
        _planner("cpu").plan(_ebc(), tsp.get_sharders(fused_params=adam))
    with pytest.raises(ValueError, match="ADAM"):
        _planner("cpu").plan(_ebc(), tsp.get_sharders(ScratchPipeConfig(optimizer=EmbOptimType.ADAM)))
    _planner("cuda").plan(_ebc(), tsp.get_sharders(fused_params=adam))  # fine on CUDA


class _MixedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = _ebc()
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name="seq", embedding_dim=16, num_embeddings=ROWS, feature_names=["f_seq", "f_hist"])],
            device=torch.device("meta"),
        )


def test_sequence_tables_plan_like_bags() -> None:
    c = {**_constraints(), "seq": ParameterConstraints(
        compute_kernels=[tsp.SCRATCHPIPE], sharding_types=["row_wise"], cache_params=CacheParams(load_factor=0.1))}
    planner = _planner(constraints=c)
    plan = planner.plan(_MixedModel(), tsp.get_sharders())
    assert plan.plan["ec"]["seq"].compute_kernel == tsp.SCRATCHPIPE
    assert plan.plan["ebc"]["big_table"].compute_kernel == tsp.SCRATCHPIPE
    summary = {f'{row["module"]}.{row["table"]}': row for row in planner.scratchpipe_summary}
    assert set(summary) == {"ebc.big_table", "ec.seq"}, summary
    slots = sum(row["slots"] for row in planner.scratchpipe_summary if (row["module"], row["table"]) == ("ec", "seq"))
    assert slots == 2 * math.ceil(0.1 * ROWS / 2), planner.scratchpipe_summary
    # A sharder that does not offer ScratchPipe for the module is refused before planning.
    trec = [s for s in tsp.get_sharders() if s.module_type is not EmbeddingCollection] + [EmbeddingCollectionSharder()]
    with pytest.raises(ValueError, match="'seq' is in a EmbeddingCollection.*EmbeddingCollectionSharder does not offer ScratchPipe"):
        _planner(constraints=c).plan(_MixedModel(), trec)
    sharder = tsp.ScratchPipeEmbeddingCollectionSharder()
    with pytest.raises(ValueError, match=r"ScratchPipe supports \['table_wise', 'row_wise', 'column_wise'\]"):
        sharder.shard(_MixedModel().ec, {"seq": ParameterSharding("data_parallel", tsp.SCRATCHPIPE)}, None)
    with pytest.raises(ValueError, match="CacheParams.load_factor of table .seq. .* must be a fraction"):
        sharder.shard(_MixedModel().ec, {"seq": ParameterSharding(
            "table_wise", tsp.SCRATCHPIPE, cache_params=CacheParams(load_factor=0.0))}, None)


def test_errors_scratchpad_smaller_than_a_batch(caplog: pytest.LogCaptureFixture) -> None:
    # 512 samples x 2 ranks x pooling factor 4 = 4096 ids; a row-wise shard sees ~2048.
    c = _constraints(lf=0.01, pooling_factors=[4.0])  # 500 slots per 50k-row shard
    with pytest.raises(ValueError, match=r"2048 distinct rows.*500 slots.*load_factor >= 0\.04"):
        _planner(constraints=c, capacity_check="error").plan(_ebc(), tsp.get_sharders())
    c = _constraints(lf=0.01, pooling_factors=[4.0], sharding="table_wise")
    with pytest.raises(ValueError, match="4096 distinct rows.*1000 slots"):
        _planner(constraints=c, capacity_check="error").plan(_ebc(), tsp.get_sharders())
    # Default: the estimate may count repeated ids, so it warns and plans anyway.
    with caplog.at_level(logging.WARNING):
        plan = _planner(constraints=c).plan(_ebc(), tsp.get_sharders())
    assert plan.plan[""]["big_table"].compute_kernel == tsp.SCRATCHPIPE
    assert "4096 distinct rows" in caplog.text and "fails at run time" in caplog.text
    # Other kernels allowed for the table are kept in "error" mode.
    c["big_table"].compute_kernels = [tsp.SCRATCHPIPE, "fused"]
    plan = _planner(constraints=c, capacity_check="error").plan(_ebc(), tsp.get_sharders())
    assert plan.plan[""]["big_table"].compute_kernel == "fused"
    _planner(constraints=_constraints(lf=0.05, pooling_factors=[4.0]), capacity_check="error").plan(_ebc(), tsp.get_sharders())
    with pytest.raises(ValueError, match="capacity_check"):
        _planner(capacity_check="strict")


def test_get_sharders_and_kernels() -> None:
    sharders = tsp.get_sharders(ScratchPipeConfig(lookahead=2))
    assert isinstance(sharders[0], tsp.ScratchPipeEmbeddingBagCollectionSharder)
    assert isinstance(sharders[1], tsp.ScratchPipeEmbeddingCollectionSharder)
    assert sharders[1].config == ScratchPipeConfig(lookahead=2)
    for st in ("table_wise", "row_wise", "column_wise"):
        assert tsp.SCRATCHPIPE in sharders[1].compute_kernels(st, "cpu")
    defaults = {s.module_type for s in get_default_sharders()}
    assert {s.module_type for s in sharders} == defaults and len(sharders) == len(defaults)
    sp = sharders[0]
    for st in ("table_wise", "row_wise", "column_wise"):
        assert tsp.SCRATCHPIPE in sp.compute_kernels(st, "cpu")
    assert tsp.SCRATCHPIPE not in sp.compute_kernels("data_parallel", "cpu")
    assert "row_wise" in sp.sharding_types("cpu")


def test_runtime_sharding_and_params() -> None:
    cfg = ScratchPipeConfig(lookahead=3, victim_policy="lru")
    ps = ParameterSharding("row_wise", tsp.SCRATCHPIPE, ranks=[0, 1], cache_params=CacheParams(load_factor=0.05))
    rt = to_runtime_sharding(ps, cfg)
    assert isinstance(rt, tsp.ScratchPipeParameterSharding)
    assert rt.compute_kernel == "customized_kernel" and rt.ranks == [0, 1]
    params = rt.get_additional_fused_params()[FUSED_PARAMS_KEY]
    assert hash(params) == hash(ScratchPipeTableParams.build(0.05, cfg))
    fused = ParameterSharding("row_wise", "fused")
    assert to_runtime_sharding(fused, cfg) is fused
    # Precedence: TorchRec fused params > sharder config > FBGEMM TBE defaults.
    got = engine_config({FUSED_PARAMS_KEY: params, "learning_rate": 0.3})
    assert (got.learning_rate, got.lookahead, got.victim_policy, got.load_factor) == (0.3, 3, "lru", 0.05)
    assert got.optimizer == cfg.optimizer
    plain = engine_config({FUSED_PARAMS_KEY: ScratchPipeTableParams.build(None, None)})
    assert plain.optimizer == EmbOptimType.EXACT_SGD and plain.learning_rate == 0.01 and plain.load_factor == 0.2


def test_perf_prefetch_follows_cache_params_stats() -> None:
    """With CacheParams.stats the moved rows are stats.expected_miss_rate(lf) x expected_lookups
    (a row-wise shard's share), as TorchRec prices fused_uvm_caching; without, (1 - lf) x ids."""
    from torchrec_scratchpipe.advise.stats import MeasuredCacheStatistics

    def prefetch(stats: Any) -> List[float]:
        c = _constraints(lf=0.05)
        c["big_table"].cache_params = CacheParams(load_factor=0.05, stats=stats)
        planner = _planner("cuda", constraints=c)
        planner.plan(_ebc(), tsp.get_sharders(fused_params=FP))
        return [s.perf.prefetch_compute for s in _options(planner, "big_table")[0].shards]

    topo = Topology(world_size=2, compute_device="cuda")
    row = 64 * 4 + 4  # FP32 weights + row-wise Adagrad state
    lookups = 3000.0  # distinct rows per global batch: 1500 per row-wise shard
    plain = prefetch(None)
    for miss in (0.5, 0.1):
        got = prefetch(MeasuredCacheStatistics([0.05], [miss], expected_lookups=lookups))
        assert got == pytest.approx([2 * miss * lookups / 2 * row / topo.hbm_to_ddr_mem_bw] * 2)
    assert plain[0] > 0 and plain[0] != pytest.approx(got[0])


def _plan_two_column_shards_on_one_rank(rank: int, ws: int) -> str:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import CacheParams

    import torchrec_scratchpipe.distributed as tsp

    tables = [EmbeddingBagConfig(name="wide", embedding_dim=24, num_embeddings=1000, feature_names=["f"])]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    constraints = {"wide": ParameterConstraints(compute_kernels=[tsp.SCRATCHPIPE], sharding_types=["column_wise"],
                                                min_partition=8, cache_params=CacheParams(load_factor=0.5))}
    planner = tsp.ShardingPlanner(topology=Topology(world_size=ws, compute_device="cpu"), constraints=constraints,
                                  batch_size=8)
    try:
        plan = planner.collective_plan(ebc, tsp.get_sharders(), dist.GroupMember.WORLD)
    except ValueError as e:
        return str(e)
    return f"planned: {plan}"


@pytest.mark.slow
def test_two_column_shards_on_one_rank_are_refused_at_plan_on_every_rank() -> None:
    from dist_utils import spawn

    messages = spawn(_plan_two_column_shards_on_one_rank, 2, timeout=120)
    for rank, msg in enumerate(messages):
        assert "column shards of it on rank" in msg and "min_partition" in msg, (rank, msg)
