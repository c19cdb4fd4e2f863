"""Every fused param TorchRec can pass to FBGEMM's TBE is honoured by ScratchPipe (bit for bit
as ``fused``) or refused with an error that names it, at ``plan()`` and when the kernel is built."""

from __future__ import annotations

import enum
import inspect
from typing import Any, Dict

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, CacheAlgorithm
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from engine_utils import FullTableReference, make_tables, power_law_stream, train_and_compare
from torchrec_scratchpipe.core.config import TBE_OPTIONS, ScratchPipeConfig
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
from torchrec_scratchpipe.distributed.kernel import TBE_DEFAULTS, engine_config

#: TBE arguments TorchRec's fused kernel sets itself from the table configs (never fused params).
STRUCTURAL = {"embedding_specs", "feature_table_map", "pooling_mode", "device", "weights_precision", "table_names",
              "embedding_shard_info", "res_params"}
#: UVM-cache settings ScratchPipe accepts at the values that mean what a scratchpad does anyway.
CACHE_ACCEPTED: Dict[str, Any] = {
    "cache_load_factor": 0.3, "cache_algorithm": CacheAlgorithm.LRU, "cache_reserved_memory": 0.0,
    "prefetch_pipeline": True, "enforce_hbm": True, "output_dtype": SparseType.FP32, "cache_precision": SparseType.FP32,
}
#: ... and values of them it refuses.
CACHE_REFUSED: Dict[str, Any] = {
    "cache_algorithm": CacheAlgorithm.LFU, "cache_reserved_memory": 0.5, "output_dtype": SparseType.FP16,
    "cache_precision": SparseType.FP16,
}


def _tbe_arguments() -> Dict[str, inspect.Parameter]:
    params = dict(inspect.signature(SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters)
    params.pop("self")
    return params


def _other_value(p: inspect.Parameter) -> Any:
    """A value unlike the argument's default."""
    d = p.default
    if isinstance(d, bool):
        return not d
    if isinstance(d, enum.Enum):
        return next(m for m in type(d) if m != d)
    if isinstance(d, (int, float)):
        return d + 1
    return object()


def test_every_tbe_argument_is_honoured_or_refused_by_name() -> None:
    honoured = set(TBE_DEFAULTS) | set(TBE_OPTIONS)
    seen = 0
    for name, p in _tbe_arguments().items():
        if name in honoured:
            engine_config({name: p.default if name != "optimizer" else EmbOptimType.EXACT_SGD})  # accepted
            continue
        if name in CACHE_ACCEPTED:
            engine_config({name: CACHE_ACCEPTED[name]}, "['t']", SparseType.FP32)
            if name in CACHE_REFUSED:
                with pytest.raises(ValueError, match=name):
                    engine_config({name: CACHE_REFUSED[name]}, "['t']", SparseType.FP32)
            continue
        with pytest.raises(ValueError, match=f"'{name}'"):  # structural ones too: fused would fail on them
            engine_config({name: _other_value(p)}, "['t']")
        seen += 1
    assert seen >= 20  # the refused list is real (cache_sets, ensemble_mode, global_weight_decay, ...)
    assert {"gradient_clipping", "max_gradient", "max_norm", "weight_decay_mode"} <= set(TBE_OPTIONS)


@pytest.mark.parametrize("mode", [WeightDecayMode.COUNTER, WeightDecayMode.COWCLIP])
def test_weight_decay_modes_with_extra_row_state_are_refused(mode: WeightDecayMode) -> None:
    with pytest.raises(ValueError, match="weight_decay_mode"):
        engine_config({"weight_decay_mode": mode}, "['t']")


@pytest.mark.parametrize(
    "optimizer,options",
    [
        (EmbOptimType.EXACT_ROWWISE_ADAGRAD, {"gradient_clipping": True, "max_gradient": 0.05}),
        (EmbOptimType.EXACT_ADAGRAD, {"gradient_clipping": True, "max_gradient": 0.05}),
        (EmbOptimType.EXACT_SGD, {"gradient_clipping": True, "max_gradient": 0.05}),
        (EmbOptimType.EXACT_ADAGRAD, {"weight_decay_mode": WeightDecayMode.DECOUPLE, "weight_decay": 0.1}),
        (EmbOptimType.EXACT_ADAGRAD, {"weight_decay_mode": WeightDecayMode.L2, "weight_decay": 0.1}),
        (EmbOptimType.EXACT_SGD, {"max_norm": 0.2}),
        (EmbOptimType.EXACT_ROWWISE_ADAGRAD, {"bounds_check_mode": BoundsCheckMode.FATAL}),
    ],
    ids=["clip-rowwise", "clip-adagrad", "clip-sgd", "decouple", "l2", "max_norm", "bounds_check"],
)
def test_honoured_options_train_bit_for_bit_like_fused(optimizer: EmbOptimType, options: Dict[str, Any]) -> None:
    """The option reaches the scratchpad's TBE and training equals TorchRec's fused kernel
    with it; and it matters (without it the same training differs), so ignoring it fails."""
    rows, dims = [300, 200], [8, 16]
    tables = make_tables(rows, dims)
    stream = power_law_stream(rows, 12, batch=6, seed=4)
    fp = {"optimizer": optimizer, "learning_rate": 0.5, **options}
    cfg = engine_config(fp)
    cfg = ScratchPipeConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "cache_rows": 64, "load_factor": None,
                               "lookahead": 1})
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    ref = FullTableReference(tables, optimizer, lr=0.5, fused_params={k: v for k, v in options.items()})
    plain = FullTableReference(tables, optimizer, lr=0.5)  # the same training without the options
    start = emb.table_weights()
    ref.load(start)
    plain.load(start)
    train_and_compare(emb, ref, stream, ahead=1)
    g = torch.Generator().manual_seed(1)  # the output gradients train_and_compare draws
    for k in stream:
        out = plain(k)
        out.backward(torch.randn(out.shape, generator=g))
    got, want = emb.table_weights(), ref.weights()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # The option matters (so ignoring it would fail the comparison above), except where
    # FBGEMM's CPU kernels ignore it themselves: bounds checks (ids are checked before the
    # TBE), weight decay and max_norm (``fused`` trains the same with and without them).
    if not any(k in options for k in ("bounds_check_mode", "weight_decay_mode", "max_norm")):
        assert any(not torch.equal(want[n], w) for n, w in plain.weights().items())
    assert emb.stats()[next(iter(emb.groups))]["evictions"] > 0


def _ebc_and_constraints(cache_params: Any = None) -> Any:
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import CacheParams

    from dist_utils import make_tables as dist_tables
    from torchrec_scratchpipe.distributed import SCRATCHPIPE

    tables = dist_tables()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    constraints = {
        t.name: ParameterConstraints(compute_kernels=[SCRATCHPIPE], sharding_types=["table_wise"],
                                     cache_params=cache_params or CacheParams(load_factor=0.5))
        for t in tables
    }
    return ebc, constraints


@pytest.mark.parametrize(
    "fused_params,cache,name",
    [
        ({"cache_sets": 4}, None, "cache_sets"),
        ({"weight_decay_mode": WeightDecayMode.COUNTER}, None, "weight_decay_mode"),
        ({"output_dtype": SparseType.FP16}, None, "output_dtype"),
        ({}, {"algorithm": CacheAlgorithm.LFU}, "cache_algorithm"),
    ],
    ids=["cache_sets", "counter", "output_dtype", "lfu"],
)
def test_plan_refuses_a_fused_param_it_cannot_honour(fused_params: Dict[str, Any], cache: Any, name: str) -> None:
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.types import CacheParams

    import torchrec_scratchpipe.distributed as tsp

    ebc, constraints = _ebc_and_constraints(CacheParams(load_factor=0.5, **cache) if cache else None)
    planner = tsp.ShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints,
                                  batch_size=8)
    with pytest.raises(ValueError, match=name):
        planner.plan(ebc, tsp.get_sharders(fused_params={"optimizer": EmbOptimType.EXACT_SGD, **fused_params}))
    if cache is None:  # honoured ones plan
        assert planner.plan(ebc, tsp.get_sharders(fused_params={"gradient_clipping": True, "max_gradient": 0.5})).plan


def _clipped_pair(rank: int, ws: int) -> float:
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from dist_utils import build_dmp, constraints_for, load_full, make_batch, make_tables as dist_tables, max_diff
    import torchrec_scratchpipe.distributed as tsp

    tables = dist_tables()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    fp = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.5, "gradient_clipping": True,
          "max_gradient": 0.05}
    lfs = {t.name: round(48 / t.num_embeddings, 4) for t in tables[:3]}
    sp = build_dmp(ebc, constraints_for(tables, "table_wise", lfs), tsp.get_sharders(fused_params=fp), ws)
    ref = build_dmp(ebc, constraints_for(tables, "table_wise", {}), [EmbeddingBagCollectionSharder(fused_params=fp)], ws,
                    plan_sharders=tsp.get_sharders(fused_params=fp))
    full = {f"embedding_bags.{t.name}.weight": torch.rand(t.num_embeddings, t.embedding_dim,
                                                          generator=torch.Generator().manual_seed(3)) for t in tables}
    load_full(sp, full)
    load_full(ref, full)
    weight = torch.randn(8, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for step in range(30):
        kjt = make_batch(step, rank, tables)
        outs = []
        for m in (sp, ref):
            out = m(kjt)
            values = (out.wait() if hasattr(out, "wait") else out).values()
            (values * weight).sum().backward()
            outs.append(values.detach())
        worst = max(worst, float((outs[0] - outs[1]).abs().max()))
    states = [{**{k: v.local_shards()[0].tensor for k, v in m.state_dict().items()}} for m in (sp, ref)]
    return max(worst, max_diff(states[0], states[1]))


@pytest.mark.slow
def test_gradient_clipping_under_dmp_is_bitwise_fused() -> None:
    from dist_utils import spawn

    (diff,) = spawn(_clipped_pair, 1)
    assert diff == 0.0


def test_a_sharder_config_does_not_change_the_fallback_optimizer() -> None:
    """``get_sharders(ScratchPipeConfig(lookahead=2))`` trains what ``fused`` would with no
    optimizer given (FBGEMM TBE's default); an optimizer the config names is the fallback."""
    from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, ScratchPipeTableParams

    def fallback(config: ScratchPipeConfig) -> EmbOptimType:
        return engine_config({FUSED_PARAMS_KEY: ScratchPipeTableParams.build(0.1, config)}).optimizer

    assert fallback(ScratchPipeConfig(lookahead=2)) == engine_config({}).optimizer == TBE_DEFAULTS["optimizer"]
    assert TBE_DEFAULTS["optimizer"] == EmbOptimType.EXACT_SGD
    assert fallback(ScratchPipeConfig(optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD)) == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    assert engine_config({FUSED_PARAMS_KEY: ScratchPipeTableParams.build(0.1, ScratchPipeConfig(lookahead=2)),
                          "optimizer": EmbOptimType.EXACT_ADAGRAD}).optimizer == EmbOptimType.EXACT_ADAGRAD  # TorchRec's wins
