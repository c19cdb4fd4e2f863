"""Lookup and sharding classes that create ScratchPipe kernels for their table groups.

TorchRec creates kernels in ``GroupedPooledEmbeddingsLookup._create_embedding_kernel``
(an if/elif over its enum that raises for anything else) and only forwards ``prefetch``
to UVM-caching kernels. The subclass here adds the ``customized_kernel`` branch for
ScratchPipe groups, forwards ``prefetch`` to them, and delegates every other
group to TorchRec unchanged. The sharding subclasses only swap in that lookup.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import (
    BaseGroupedFeatureProcessor,
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
)
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.compat import (
    BaseEmbedding,
    CwPooledEmbeddingSharding,
    GroupedPooledEmbeddingsLookup,
    RwPooledEmbeddingSharding,
    TwPooledEmbeddingSharding,
)
from torchrec_scratchpipe.core.engine import PreparedBatch
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY


def is_scratchpipe_group(config: GroupedEmbeddingConfig) -> bool:
    """True for a table group TorchRec built from ScratchPipe plan entries."""
    return config.compute_kernel == EmbeddingComputeKernel.CUSTOMIZED_KERNEL and bool(
        config.fused_params and config.fused_params.get(FUSED_PARAMS_KEY) is not None
    )


class ScratchPipeLookupMixin:
    """What a TorchRec lookup needs to feed its ScratchPipe kernels (pooled or sequence).

    Mixed into a subclass of a TorchRec lookup (which has ``_emb_modules`` and
    ``_feature_splits``): lists the ScratchPipe kernels, announces batches to them (in two
    steps, ``prepare`` then ``commit``, so that ranks can agree in between), names each
    prefetched batch by tokens kept with the very ``KeyedJaggedTensor`` TorchRec later
    passes to ``forward`` (the kernels then know which queued batch trains without
    comparing ids), and passes later batches' ids to their victim policy.
    """

    _emb_modules: Any
    _feature_splits: List[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens: "weakref.WeakKeyDictionary[KeyedJaggedTensor, List[Tuple[ScratchPipeEmbeddingBag, int]]]" = (
            weakref.WeakKeyDictionary()
        )

    def scratchpipe_kernels(self) -> List[ScratchPipeEmbeddingBag]:
        """This lookup's ScratchPipe kernels, in group order."""
        return [m for m in self._emb_modules if isinstance(m, ScratchPipeEmbeddingBag)]

    def _scratchpipe_parts(self, features: KeyedJaggedTensor) -> List[tuple]:
        parts = features.split(self._feature_splits)
        return [(m, f) for m, f in zip(self._emb_modules, parts) if isinstance(m, ScratchPipeEmbeddingBag)]

    def prepare(self, sparse_features: KeyedJaggedTensor) -> List[PreparedBatch]:
        """Validate a batch for every ScratchPipe kernel; nothing changes (raises on bad input)."""
        if not self.scratchpipe_kernels():
            return []
        return [kernel.prepare(features) for kernel, features in self._scratchpipe_parts(sparse_features)]

    def commit(
        self,
        sparse_features: KeyedJaggedTensor,
        prepared: List[PreparedBatch],
        forward_stream: Optional[Any] = None,
    ) -> None:
        """Prefetch for TorchRec's caching kernels and queue the prepared ScratchPipe batches.

        ``forward_stream``: the CUDA stream the batch's forward will run on, when it is not
        the current one (the batch's device tensors are handed to it: ``PreparedBatch.hand_to``).
        """
        super().prefetch(sparse_features, forward_stream)  # type: ignore[misc]
        if forward_stream is not None:
            for p in prepared:
                p.hand_to(forward_stream)
        if prepared:
            kernels = self.scratchpipe_kernels()
            self._tokens[sparse_features] = [(k, k.enqueue(p)) for k, p in zip(kernels, prepared)]

    def prefetch(
        self,
        sparse_features: KeyedJaggedTensor,
        forward_stream: Optional[Any] = None,
    ) -> None:
        """Prefetch for TorchRec's caching kernels, and announce the batch to ScratchPipe ones."""
        self.commit(sparse_features, self.prepare(sparse_features), forward_stream)

    def forward(self, sparse_features: KeyedJaggedTensor) -> Any:
        """TorchRec's lookup, telling each ScratchPipe kernel which prefetched batch this is."""
        for kernel, token in self._tokens.pop(sparse_features, []):
            kernel.expect(token)
        try:
            return super().forward(sparse_features)  # type: ignore[misc]
        finally:
            for kernel in self.scratchpipe_kernels():
                kernel.expect(None)


class ScratchPipeGroupedPooledEmbeddingsLookup(ScratchPipeLookupMixin, GroupedPooledEmbeddingsLookup):
    """``GroupedPooledEmbeddingsLookup`` that also runs ScratchPipe table groups.

    Example::

        >>> # lookup.prefetch(kjt)        # like TorchRec's, plus ScratchPipe kernels
    """

    def _create_embedding_kernel(
        self,
        config: GroupedEmbeddingConfig,
        device: Optional[torch.device],
        pg: Optional[dist.ProcessGroup],
        sharding_type: Optional[ShardingType],
        env: Optional[ShardingEnv],
    ) -> BaseEmbedding:
        if is_scratchpipe_group(config):
            return ScratchPipeEmbeddingBag(config=config, pg=pg, device=device, sharding_type=sharding_type)
        return super()._create_embedding_kernel(config, device, pg, sharding_type, env)


class _ScratchPipeLookupMixin:
    """Makes a TorchRec pooled sharding create a ScratchPipe-aware lookup."""

    _lookup_sharding_type: Optional[ShardingType] = None

    def create_lookup(
        self,
        device: Optional[torch.device] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        feature_processor: Optional[BaseGroupedFeatureProcessor] = None,
    ) -> ScratchPipeGroupedPooledEmbeddingsLookup:
        return ScratchPipeGroupedPooledEmbeddingsLookup(
            grouped_configs=self._grouped_embedding_configs,  # type: ignore[attr-defined]
            pg=self._pg,  # type: ignore[attr-defined]
            device=device if device is not None else self._device,  # type: ignore[attr-defined]
            feature_processor=feature_processor,
            sharding_type=self._lookup_sharding_type,
            env=self._env,  # type: ignore[attr-defined]
        )


class ScratchPipeTwPooledEmbeddingSharding(_ScratchPipeLookupMixin, TwPooledEmbeddingSharding):
    """Table-wise pooled sharding whose lookup runs ScratchPipe groups."""


class ScratchPipeRwPooledEmbeddingSharding(_ScratchPipeLookupMixin, RwPooledEmbeddingSharding):
    """Row-wise pooled sharding whose lookup runs ScratchPipe groups."""

    _lookup_sharding_type = ShardingType.ROW_WISE


class ScratchPipeCwPooledEmbeddingSharding(_ScratchPipeLookupMixin, CwPooledEmbeddingSharding):
    """Column-wise pooled sharding whose lookup runs ScratchPipe groups."""


#: Sharding type -> ScratchPipe-aware sharding class.
SCRATCHPIPE_SHARDINGS = {
    ShardingType.TABLE_WISE.value: ScratchPipeTwPooledEmbeddingSharding,
    ShardingType.ROW_WISE.value: ScratchPipeRwPooledEmbeddingSharding,
    ShardingType.COLUMN_WISE.value: ScratchPipeCwPooledEmbeddingSharding,
}
