"""TorchRec integration of ScratchPipe: kernel, sharder, planner and statistics.

Example::

    import torchrec_scratchpipe as tsp
    constraints = {"big_table": ParameterConstraints(
        compute_kernels=[tsp.SCRATCHPIPE], sharding_types=["row_wise"],
        cache_params=CacheParams(load_factor=0.05))}
    planner = tsp.ShardingPlanner(topology=tsp.make_topology(world_size=2, compute_device="cpu"),
                                  constraints=constraints)
    plan = planner.collective_plan(model, tsp.get_sharders(), pg)
    model = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg),
                                     plan=plan, sharders=tsp.get_sharders())
    print(tsp.cache_stats(model))
"""

from torchrec_scratchpipe.core.config import TBE_OPTIONS
from torchrec_scratchpipe.distributed.estimators import ScratchPipePerfEstimator, ScratchPipeStorageEstimator
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag, ScratchPipeFusedOptimizer
from torchrec_scratchpipe.distributed.lookup import ScratchPipeGroupedPooledEmbeddingsLookup
from torchrec_scratchpipe.distributed.plan_stats import ScratchPipeStats
from torchrec_scratchpipe.distributed.sequence_lookup import ScratchPipeGroupedEmbeddingsLookup
from torchrec_scratchpipe.distributed.sequence_sharder import (
    ScratchPipeEmbeddingCollectionSharder,
    ShardedScratchPipeEmbeddingCollection,
)
from torchrec_scratchpipe.distributed.planner import (
    ScratchPipeEnumerator,
    ShardingPlanner,
    scratchpipe_kernel_registered,
)
from torchrec_scratchpipe.distributed.sharder import (
    ScratchPipeEmbeddingBagCollectionSharder,
    ShardedScratchPipeEmbeddingBagCollection,
    get_sharders,
)
from torchrec_scratchpipe.distributed.stats import cache_stats, scratchpipe_kernels, scratchpipe_modules
from torchrec_scratchpipe.distributed.types import (
    SCRATCHPIPE,
    ScratchPipeParameterSharding,
    ScratchPipeTableParams,
)

__all__ = [
    "SCRATCHPIPE",
    "TBE_OPTIONS",
    "ScratchPipeEmbeddingBag",
    "ScratchPipeEmbeddingBagCollectionSharder",
    "ScratchPipeEmbeddingCollectionSharder",
    "ScratchPipeEnumerator",
    "ScratchPipeFusedOptimizer",
    "ScratchPipeGroupedEmbeddingsLookup",
    "ScratchPipeGroupedPooledEmbeddingsLookup",
    "ScratchPipeParameterSharding",
    "ScratchPipePerfEstimator",
    "ScratchPipeStats",
    "ScratchPipeStorageEstimator",
    "ScratchPipeTableParams",
    "ShardedScratchPipeEmbeddingBagCollection",
    "ShardedScratchPipeEmbeddingCollection",
    "ShardingPlanner",
    "cache_stats",
    "get_sharders",
    "scratchpipe_kernel_registered",
    "scratchpipe_kernels",
    "scratchpipe_modules",
]
