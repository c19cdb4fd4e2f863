"""Sequence (unpooled, ``EmbeddingCollection``) lookup and shardings that run ScratchPipe groups.

TorchRec creates sequence kernels in ``GroupedEmbeddingsLookup._create_embedding_kernel``
(an if/elif that raises for ``customized_kernel``). The subclass here creates a
``ScratchPipeEmbeddingBag`` for ScratchPipe groups (its TBE runs with
``PoolingMode.NONE`` for these tables, so it returns one row per id, the shape
``GroupedEmbeddingsLookup`` expects), forwards ``prefetch`` to them, and leaves
every other group to TorchRec. The sharding subclasses only swap in that lookup.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import (
    BaseGroupedFeatureProcessor,
    GroupedEmbeddingConfig,
)
from torchrec.distributed.types import ShardingEnv, ShardingType

from torchrec_scratchpipe.compat import (
    BaseEmbedding,
    CwSequenceEmbeddingSharding,
    GroupedEmbeddingsLookup,
    RwSequenceEmbeddingSharding,
    TwSequenceEmbeddingSharding,
)
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.lookup import (
    ScratchPipeLookupMixin,
    is_scratchpipe_group,
)


class ScratchPipeGroupedEmbeddingsLookup(ScratchPipeLookupMixin, GroupedEmbeddingsLookup):
    """``GroupedEmbeddingsLookup`` (sequence tables) that also runs ScratchPipe table groups.

    Example::

        >>> # lookup.prefetch(kjt)        # like TorchRec's, plus ScratchPipe kernels
    """

    def _create_embedding_kernel(
        self,
        config: GroupedEmbeddingConfig,
        pg: Optional[dist.ProcessGroup],
        device: Optional[torch.device],
        env: Optional[ShardingEnv] = None,
    ) -> BaseEmbedding:
        if is_scratchpipe_group(config):
            return ScratchPipeEmbeddingBag(config=config, pg=pg, device=device)
        return super()._create_embedding_kernel(config, pg, device, env)


class _SequenceLookupMixin:
    """Makes a TorchRec sequence sharding create a ScratchPipe-aware lookup."""

    def create_lookup(
        self,
        device: Optional[torch.device] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        feature_processor: Optional[BaseGroupedFeatureProcessor] = None,
    ) -> ScratchPipeGroupedEmbeddingsLookup:
        if feature_processor is not None:
            raise ValueError("sequence (EmbeddingCollection) tables take no feature processor.")
        return ScratchPipeGroupedEmbeddingsLookup(
            grouped_configs=self._grouped_embedding_configs,  # type: ignore[attr-defined]
            pg=self._pg,  # type: ignore[attr-defined]
            device=device if device is not None else self._device,  # type: ignore[attr-defined]
            env=self._env,  # type: ignore[attr-defined]
        )


class ScratchPipeTwSequenceEmbeddingSharding(_SequenceLookupMixin, TwSequenceEmbeddingSharding):
    """Table-wise sequence sharding whose lookup runs ScratchPipe groups."""


class ScratchPipeRwSequenceEmbeddingSharding(_SequenceLookupMixin, RwSequenceEmbeddingSharding):
    """Row-wise sequence sharding whose lookup runs ScratchPipe groups."""


class ScratchPipeCwSequenceEmbeddingSharding(_SequenceLookupMixin, CwSequenceEmbeddingSharding):
    """Column-wise sequence sharding whose lookup runs ScratchPipe groups."""


#: Sharding type -> ScratchPipe-aware sequence sharding class.
SCRATCHPIPE_SEQUENCE_SHARDINGS = {
    ShardingType.TABLE_WISE.value: ScratchPipeTwSequenceEmbeddingSharding,
    ShardingType.ROW_WISE.value: ScratchPipeRwSequenceEmbeddingSharding,
    ShardingType.COLUMN_WISE.value: ScratchPipeCwSequenceEmbeddingSharding,
}
