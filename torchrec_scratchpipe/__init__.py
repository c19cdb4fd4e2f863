"""torchrec-scratchpipe: a future-aware device scratchpad for TorchRec embedding tables.

The engine (``ScratchPipeEmbeddingBags``) works on its own; the TorchRec layer makes it a
compute kernel (``SCRATCHPIPE``) that users pick in their sharding plan.
"""

from torchrec_scratchpipe import compat  # noqa: F401  (first: it imports FBGEMM and TorchRec)
from torchrec_scratchpipe.core.config import TBE_OPTIONS, ScratchPipeConfig
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import CapacityError, SlotPlanner
from torchrec_scratchpipe.core.store_api import StoreError, StoreSpec
from torchrec_scratchpipe.core.window import PlanWindow
from torchrec_scratchpipe.distributed import (
    SCRATCHPIPE, ShardingPlanner, cache_stats, get_sharders, scratchpipe_kernel_registered, scratchpipe_kernels,
    scratchpipe_modules,
)
from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline
from torchrec_scratchpipe.distributed.plan_stats import format_scratchpipe_plan
from torchrec_scratchpipe.quiet import make_topology, quiet_known_noise

__all__ = [
    "CapacityError",
    "PlanWindow",
    "SCRATCHPIPE",
    "ScratchPipeConfig",
    "ScratchPipeEmbeddingBags",
    "ScratchPipeTrainPipeline",
    "ShardingPlanner",
    "SlotPlanner",
    "TBE_OPTIONS",
    "StoreError",
    "StoreSpec",
    "cache_stats",
    "format_scratchpipe_plan",
    "get_sharders",
    "make_topology",
    "quiet_known_noise",
    "scratchpipe_kernel_registered",
    "scratchpipe_kernels",
    "scratchpipe_modules",
]
