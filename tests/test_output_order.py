"""Output key order: a plan with ScratchPipe tables returns its KeyedTensor in the order the
same plan on ``fused`` returns (TorchRec's DLRM reads ``KeyedTensor.values()`` by position)."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest
import torch

from dist_utils import constraints_for, load_full, make_batch, spawn


def _as_fused(plan: Any) -> Any:
    """The same plan (same shards, same ranks) with every ScratchPipe table on ``fused``."""
    from torchrec.distributed.types import ParameterSharding

    from torchrec_scratchpipe.distributed import SCRATCHPIPE

    plan = copy.deepcopy(plan)
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            if ps.compute_kernel == SCRATCHPIPE:
                module_plan[name] = ParameterSharding(
                    sharding_type=ps.sharding_type, compute_kernel="fused", ranks=ps.ranks,
                    sharding_spec=ps.sharding_spec,
                )
    return plan


def _orders(rank: int, ws: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import DataType

    import torchrec_scratchpipe.distributed as tsp

    dtypes = [DataType.FP32, DataType.FP16, DataType.FP16, DataType.FP32, DataType.FP32]
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=200, embedding_dim=16 if i == 0 else 8, feature_names=[f"f{i}"],
                           data_type=d)
        for i, d in enumerate(dtypes)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    full = {f"embedding_bags.{t.name}.weight": torch.rand(t.num_embeddings, t.embedding_dim,
                                                          generator=torch.Generator().manual_seed(i)).to(
        torch.float16 if t.data_type == DataType.FP16 else torch.float32) for i, t in enumerate(tables)}
    out: Dict[str, Any] = {}
    shardings = ["table_wise"] if ws == 1 else ["row_wise", "column_wise"]
    for sharding in shardings:
        for name, sp in (("one_fp16", {"t1": 0.5}), ("mixed", {"t0": 0.5, "t2": 0.5})):
            extra = {"min_partition": 8} if sharding == "column_wise" else {}
            cons = constraints_for(tables, sharding, sp, **extra)
            planner = tsp.ShardingPlanner(topology=Topology(world_size=ws, compute_device="cpu"), constraints=cons,
                                          batch_size=8, debug=False)
            plan = planner.collective_plan(ebc, tsp.get_sharders(), dist.GroupMember.WORLD)
            models = [
                DistributedModelParallel(copy.deepcopy(ebc), env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                         plan=p, sharders=tsp.get_sharders(), device=torch.device("cpu"))
                for p in (plan, _as_fused(plan))
            ]
            keys, values = [], []
            for m in models:
                load_full(m, full)
                kt = m(make_batch(0, rank, tables))
                kt = kt.wait() if hasattr(kt, "wait") else kt
                keys.append(kt.keys())
                values.append(kt.values().detach())
            out[f"{sharding}/{name}"] = (keys[0], keys[1], torch.equal(values[0], values[1]),
                                         len(tsp.scratchpipe_kernels(models[0])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_output_keys_follow_fused_order_for_the_same_plan(ws: int) -> None:
    results = spawn(_orders, ws)
    for where in results[0]:
        assert sum(res[where][3] for res in results) > 0, where  # some rank runs a ScratchPipe kernel
    for rank, res in enumerate(results):
        for where, (sp_keys, fused_keys, same_values, _) in res.items():
            assert sp_keys == fused_keys, (rank, where, sp_keys, fused_keys)
            assert same_values, (rank, where)
    if ws == 1:  # the case the issue found: FP16 and FP32 tables, grouped by dtype by TorchRec
        assert results[0]["table_wise/mixed"][1] == ["f0", "f3", "f4", "f1", "f2"], results[0]
