"""ScratchPipe tables under a plan that trains them on a GPU, built on CPU.

A GPU plan places every shard on ``rank:0/cuda:0``; the ScratchPipe shards' tensors are
views of the host-memory backing store. These tests build the DMP from such a plan here
(everything else runs on CPU) and check that the ShardedTensor metadata agrees with the
tensors (issue 19, finding 1), and that ``Module._apply`` (``.to``, DDP wrapping, a copy)
leaves the store alone while training stays bit for bit equal to ``fused`` (finding 2).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torch.distributed.remote_device import _remote_device

from torchrec_scratchpipe.distributed import get_sharders
from torchrec_scratchpipe.distributed.placement import STORE_DEVICE, placed_on, placed_tables
from torchrec_scratchpipe.quiet import make_topology, quiet_known_noise
from torchrec_scratchpipe.training import KernelChoice, ModelSpec, constraints_for, init_single_process_group

STEPS = 6


def _spec() -> ModelSpec:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"]) for i, n in enumerate([300, 200])]
    return ModelSpec(tables, dense_arch=[8], over_arch=[8, 1], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                     learning_rate=0.1, batch_size=8, pooling=2.0)


def _on_cuda(plan: ShardingPlan) -> ShardingPlan:
    """The plan as a GPU topology would make it: every shard placed on cuda:0."""
    plan = copy.deepcopy(plan)
    for module_plan in plan.plan.values():
        for ps in module_plan.values():  # type: ignore[attr-defined]
            for shard in ps.sharding_spec.shards:
                shard.placement = _remote_device(f"rank:{shard.placement.rank()}/cuda:0")
    return plan


def _build(kernel: str, cuda_plan: bool) -> DistributedModelParallel:
    from torchrec_scratchpipe.distributed import ShardingPlanner

    pg = init_single_process_group()
    spec = _spec()
    choice = KernelChoice(kernel, 0.2, lookahead=1)
    sharders = get_sharders(fused_params={"optimizer": spec.optimizer, "learning_rate": spec.learning_rate})
    planner = ShardingPlanner(topology=make_topology(1, "cpu"), constraints=constraints_for(spec, choice))
    model = spec.build(torch.device("meta"))
    plan = planner.collective_plan(model, sharders, pg)
    with quiet_known_noise():
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), plan=_on_cuda(plan) if cuda_plan else plan,
                                       sharders=sharders, device=torch.device("cpu"))
    dmp.load_state_dict(spec.initial_state(0), strict=False)
    return dmp


def _batches() -> List[Any]:
    from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig

    log = SyntheticClickLog(SyntheticConfig(num_embeddings=[300, 200], batch_size=8, pooling=2, min_pooling=0, seed=3))
    return [log.batch(i) for i in range(STEPS)]


def _train(model: DistributedModelParallel, batches: List[Any]) -> List[torch.Tensor]:
    """Plain training steps (each batch planned on demand): logits of every step."""
    outs = []
    for b in batches:
        loss, (_, logits, _) = model(b)
        loss.backward()
        outs.append(logits.detach().clone())
    return outs


def _shards(model: DistributedModelParallel) -> List[Tuple[str, Any]]:
    """(key, Shard) of every ShardedTensor in the model's and its fused optimizer's state."""
    out = []
    for key, st in list(model.state_dict().items()) + list(model.fused_optimizer.state_dict()["state"].items()):
        values = st.values() if isinstance(st, dict) else [st]
        for v in values:
            for shard in getattr(v, "local_shards", lambda: [])():
                out.append((key, shard))
    return out


def _store_views(model: DistributedModelParallel) -> Dict[str, torch.Tensor]:
    from torchrec_scratchpipe.distributed import scratchpipe_kernels

    return {f"{k.table_names[i]}/w": w for k in scratchpipe_kernels(model) for i, w in enumerate(k.split_embedding_weights())}


def test_placed_tables_keep_rank_and_the_callers_metadata() -> None:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
    from torchrec.distributed.embedding_types import ShardedEmbeddingTable

    shards = [ShardMetadata([0, 0], [5, 8], "rank:0/cuda:0"), ShardMetadata([5, 0], [5, 8], "rank:1/cuda:1")]
    glob = ShardedTensorMetadata(shards, torch.Size([10, 8]), TensorProperties())
    table = ShardedEmbeddingTable(num_embeddings=10, embedding_dim=8, name="t", local_rows=5, local_cols=8,
                                  local_metadata=shards[1], global_metadata=glob)
    (out,) = placed_tables([table], STORE_DEVICE)
    assert [str(s.placement) for s in out.global_metadata.shards_metadata] == ["rank:0/cpu", "rank:1/cpu"]
    assert out.local_metadata is out.global_metadata.shards_metadata[1]  # one object, as TorchRec's optimizer needs
    assert str(table.local_metadata.placement) == "rank:1/cuda:1" and str(shards[0].placement) == "rank:0/cuda:0"
    assert placed_on(ShardMetadata([0], [1], None), STORE_DEVICE).placement is None


def test_cuda_plan_shards_are_placed_on_the_store_device() -> None:
    model = _build("scratchpipe", cuda_plan=True)
    shards = _shards(model)
    assert len(shards) >= 4  # two tables' weights and their row-wise Adagrad state
    for key, shard in shards:
        assert shard.tensor.device == STORE_DEVICE, key
        assert shard.metadata.placement.device() == shard.tensor.device, (key, shard.metadata.placement)
    for key, st in model.state_dict().items():
        if hasattr(st, "metadata"):
            assert {s.placement.device() for s in st.metadata().shards_metadata} == {STORE_DEVICE}, key


def test_plan_sizes_the_staging_rings() -> None:
    """The planner's rows per step (its estimate of the rows a step moves) reach each mover."""
    from torchrec_scratchpipe.distributed import scratchpipe_kernels

    model = _build("scratchpipe", cuda_plan=True)
    groups = [g for k in scratchpipe_kernels(model) for g in k.engine.groups.values()]
    assert groups and all(g.mover.rows_per_step for g in groups)
    # 8 samples x 2 ids per table, 80% of them missing a load factor 0.2 scratchpad: 13 rows each way
    assert sorted(g.mover.rows_per_step for g in groups) == [26]


def test_cuda_plan_trains_like_fused() -> None:
    batches = _batches()
    ref = _train(_build("fused", cuda_plan=False), batches)
    got = _train(_build("scratchpipe", cuda_plan=True), batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_apply_never_copies_the_store_and_loads_reach_it() -> None:
    """``_apply`` with a function that copies every tensor (what ``.to(other device)`` does
    to a parameter) leaves the store views in place: same objects, same bytes; a state dict
    loaded afterwards lands in the store, and training goes on equal to ``fused``."""
    batches = _batches()
    ref, sp = _build("fused", cuda_plan=False), _build("scratchpipe", cuda_plan=True)
    _train(ref, batches[:2]), _train(sp, batches[:2])
    views = _store_views(sp)
    before = {k: (v, v.clone()) for k, v in views.items()}
    params = {n: p for n, p in sp.named_parameters() if "embedding_bags" in n}
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    sp.to("cpu")
    sp._apply(lambda t: t.clone())
    for k, v in _store_views(sp).items():
        assert v is before[k][0] and torch.equal(v, before[k][1]), k
    assert {n: p.data_ptr() for n, p in sp.named_parameters() if "embedding_bags" in n} == ptrs
    sp.load_state_dict(ref.state_dict())  # ScratchPipe's tables now hold fused's weights
    sp.fused_optimizer.load_state_dict(ref.fused_optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_train(ref, batches[2:]), _train(sp, batches[2:])))


def test_apply_to_another_device_is_refused() -> None:
    model = _build("scratchpipe", cuda_plan=False)
    with pytest.raises(ValueError, match="cannot move from cpu to meta"):
        model.to("meta")


def test_engine_apply_keeps_store_and_scratchpad() -> None:
    from torchrec_scratchpipe.core.config import ScratchPipeConfig
    from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags

    engine = ScratchPipeEmbeddingBags(_spec().tables, ScratchPipeConfig(cache_rows=40))
    g = next(iter(engine.groups.values()))
    before = [(t, t.clone()) for t in (g.store.packed, g.pad.weights)]
    engine.half()
    engine._apply(lambda t: t.clone())
    assert all(t is now and torch.equal(t, was) for (t, was), now in zip(before, (g.store.packed, g.pad.weights)))
    with pytest.raises(ValueError, match="cannot move from cpu to meta"):
        engine.to("meta")


def test_torchrec_prefetch_pipeline_is_refused() -> None:
    """TorchRec's pipelines call ``prefetch(ctx=..., dist_input=..., forward_stream=...)``
    (``PrefetchTrainPipelineSparseDist`` does not run on CPU at all, with ``fused`` either):
    a module with ScratchPipe tables refuses, naming the pipeline to use."""
    from torchrec_scratchpipe.distributed import scratchpipe_modules

    ((_, sharded),) = scratchpipe_modules(_build("scratchpipe", cuda_plan=False))
    with pytest.raises(RuntimeError, match="use ScratchPipeTrainPipeline|Use ScratchPipeTrainPipeline"):
        sharded.prefetch(dist_input=None, forward_stream=None, ctx=object())
