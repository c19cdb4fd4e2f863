"""torchrec-scratchpipe: a future-aware GPU scratchpad for TorchRec embedding tables."""

from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import CapacityError, SlotPlanner
from torchrec_scratchpipe.core.window import PlanWindow

__all__ = [
    "CapacityError",
    "PlanWindow",
    "ScratchPipeConfig",
    "ScratchPipeEmbeddingBags",
    "SlotPlanner",
]
