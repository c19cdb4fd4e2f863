"""The ScratchPipe-aware EmbeddingCollection sharder and its sharded module (sequence tables).

Unpooled tables go through the same kernel, planner and state handling as bags; only
the shardings (``sequence_lookup.py``) and the kernel's output shape differ.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type

import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.types import (
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.modules.embedding_modules import EmbeddingCollection

from torchrec_scratchpipe.compat import (
    EmbeddingSharding,
    EmbeddingShardingInfo,
    ShardedEmbeddingCollection,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.distributed.sequence_lookup import (
    SCRATCHPIPE_SEQUENCE_SHARDINGS,
)
from torchrec_scratchpipe.distributed.sharded_base import (
    SCRATCHPIPE_SHARDING_TYPES,
    ScratchPipeShardedMixin,
    ScratchPipeSharderMixin,
)
from torchrec_scratchpipe.distributed.types import is_scratchpipe


class ShardedScratchPipeEmbeddingCollection(ScratchPipeShardedMixin, ShardedEmbeddingCollection):
    """``ShardedEmbeddingCollection`` whose ScratchPipe tables run on the ScratchPipe kernel.

    Outputs (``{feature: JaggedTensor}``), state dicts and ``fused_optimizer`` keys are
    those of the same collection on ``fused``.

    Example::

        >>> # sharded = dmp_model.module.ec  (after DMP with tsp.get_sharders())
        >>> # sharded.prefetch(dist_input)   # up to H + 1 batches ahead
    """

    @classmethod
    def create_embedding_sharding(
        cls,
        sharding_type: str,
        sharding_infos: List[EmbeddingShardingInfo],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> EmbeddingSharding:
        sp = [i.embedding_config.name for i in sharding_infos if is_scratchpipe(i.param_sharding)]
        if not sp:
            return super().create_embedding_sharding(sharding_type, sharding_infos, env, device, qcomm_codecs_registry)
        if sharding_type not in SCRATCHPIPE_SEQUENCE_SHARDINGS:
            raise ValueError(
                f"ScratchPipe tables {sp} are planned {sharding_type!r}; ScratchPipe supports "
                f"{SCRATCHPIPE_SHARDING_TYPES}."
            )
        return SCRATCHPIPE_SEQUENCE_SHARDINGS[sharding_type](
            sharding_infos=sharding_infos, env=env, device=device, qcomm_codecs_registry=qcomm_codecs_registry
        )


class ScratchPipeEmbeddingCollectionSharder(ScratchPipeSharderMixin, EmbeddingCollectionSharder):
    """EmbeddingCollection sharder that offers the ``"scratchpipe"`` kernel (unpooled tables).

    Args:
        config: sharder-wide ScratchPipe options (lookahead, horizon, victim policy and
            fallback optimizer settings). Per-table size comes from the plan's
            ``CacheParams.load_factor``.
        fused_params: as for TorchRec's sharder (optimizer, learning rate, ...).
        qcomm_codecs_registry: as for TorchRec's sharder.
        use_index_dedup: as for TorchRec's sharder.

    Example::

        >>> sharder = ScratchPipeEmbeddingCollectionSharder(ScratchPipeConfig(lookahead=2))
        >>> "scratchpipe" in sharder.compute_kernels("table_wise", "cpu")
        True
    """

    def __init__(
        self,
        config: Optional[ScratchPipeConfig] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        use_index_dedup: bool = False,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, use_index_dedup=use_index_dedup)
        self._sp_config = config

    def shard(
        self,
        module: EmbeddingCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedScratchPipeEmbeddingCollection:
        return ShardedScratchPipeEmbeddingCollection(
            module,
            self.runtime_params(params),
            env,
            self.fused_params,
            device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )

    @property
    def sharded_module_type(self) -> Type[ShardedScratchPipeEmbeddingCollection]:
        return ShardedScratchPipeEmbeddingCollection
