"""The ScratchPipe-aware EmbeddingBagCollection sharder and its sharded module.

``get_sharders()`` is what users hand to the planner and to ``DistributedModelParallel``
(the EmbeddingCollection counterparts live in ``sequence_sharder.py``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import (
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.compat import (
    EmbeddingSharding,
    EmbeddingShardingInfo,
    ShardedEmbeddingBagCollection,
    replace_placement_with_meta_device,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.distributed.batch_check import BatchAgreement, out_of_range
from torchrec_scratchpipe.distributed.lookup import SCRATCHPIPE_SHARDINGS
from torchrec_scratchpipe.distributed.output_order import fused_embedding_names, fused_order_index, in_fused_order
from torchrec_scratchpipe.distributed.sequence_sharder import ScratchPipeEmbeddingCollectionSharder
from torchrec_scratchpipe.distributed.sharded_base import (
    SCRATCHPIPE_SHARDING_TYPES,
    ScratchPipeShardedMixin,
    ScratchPipeSharderMixin,
)
from torchrec_scratchpipe.distributed.types import is_scratchpipe


class ShardedScratchPipeEmbeddingBagCollection(ScratchPipeShardedMixin, ShardedEmbeddingBagCollection):
    """``ShardedEmbeddingBagCollection`` whose ScratchPipe tables run on the ScratchPipe kernel.

    State dicts, ``fused_optimizer`` keys and ShardedTensor types are those of ``fused``
    (see :class:`ScratchPipeShardedMixin`), and so is the output's key order
    (``output_order.py``).

    Example::

        >>> # sharded = dmp_model.module.ebc  (after DMP with tsp.get_sharders())
        >>> # sharded.prefetch(dist_input)   # up to H + 1 batches ahead
    """

    @classmethod
    def create_embedding_bag_sharding(
        cls,
        sharding_infos: List[EmbeddingShardingInfo],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        permute_embeddings: bool = False,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> EmbeddingSharding:
        sp = [i.embedding_config.name for i in sharding_infos if is_scratchpipe(i.param_sharding)]

        def torchrec_sharding(infos: List[EmbeddingShardingInfo]) -> EmbeddingSharding:
            return super(ShardedScratchPipeEmbeddingBagCollection, cls).create_embedding_bag_sharding(
                infos, env, device, permute_embeddings, qcomm_codecs_registry
            )

        if not sp:
            return torchrec_sharding(sharding_infos)
        fused_names = fused_embedding_names(torchrec_sharding, sharding_infos)  # before meta placements
        sharding_type = sharding_infos[0].param_sharding.sharding_type
        if sharding_type not in SCRATCHPIPE_SHARDINGS:
            raise ValueError(
                f"ScratchPipe tables {sp} are planned {sharding_type!r}; ScratchPipe supports "
                f"{SCRATCHPIPE_SHARDING_TYPES}."
            )
        if device is not None and device.type == "meta":
            replace_placement_with_meta_device(sharding_infos)
        kwargs: Dict[str, Any] = {"qcomm_codecs_registry": qcomm_codecs_registry}
        if sharding_type == ShardingType.COLUMN_WISE.value:
            kwargs["permute_embeddings"] = permute_embeddings
        sharding = SCRATCHPIPE_SHARDINGS[sharding_type](sharding_infos, env, device, **kwargs)
        sharding.fused_embedding_names = fused_names
        return sharding

    def _sp_id_check(self) -> Tuple[Dict[str, Tuple[str, int]], Optional[BatchAgreement]]:
        """Feature -> (table, rows) of this module's ScratchPipe tables, and the ranks' agreement."""
        if not hasattr(self, "_sp_ids"):
            names = {n for n, ps in self.module_sharding_plan.items() if is_scratchpipe(ps)}
            self._sp_ids = {
                f: (c.name, c.num_embeddings) for c in self._embedding_bag_configs if c.name in names for f in c.feature_names
            }
            on_cpu = self._device is None or self._device.type == "cpu"
            self._sp_agreement = BatchAgreement(self._env.process_group) if on_cpu and self._sp_ids else None
        return self._sp_ids, self._sp_agreement

    def input_dist(self, ctx: Any, features: Any) -> Any:
        """TorchRec's input dist, after a check of the batch's global ids against the
        ScratchPipe tables (after the dist, a row-wise shard would see only local ids), on
        every rank alike (one 8-byte all-reduce), so a bad id is named by its global value
        and no rank waits for another that refused. CPU only (on CUDA the check would wait
        for the device; ``ScratchPipeTrainPipeline`` checks every batch on the host there),
        and skipped for batches a ``ScratchPipeTrainPipeline`` has checked already."""
        tables, agreement = self._sp_id_check()
        if agreement is not None and not self.ids_checked_upstream and isinstance(features, KeyedJaggedTensor):
            refusal = agreement.first_error(out_of_range(features, tables, agreement.rank))
            if refusal is not None:
                raise refusal
        return super().input_dist(ctx, features)

    #: Set by a ScratchPipeTrainPipeline that checks its batches' ids before the input dist.
    ids_checked_upstream: bool = False

    def _create_output_dist(self) -> None:
        super()._create_output_dist()
        fused = [n for s in self._embedding_shardings for n in getattr(s, "fused_embedding_names", s.embedding_names())]
        index = fused_order_index(self._embedding_names, self._embedding_dims, fused)
        dims = dict(zip(self._embedding_names, self._embedding_dims))
        self._sp_fused_order = None if index is None else (fused, [dims[n] for n in fused], index.to(self._device))

    def output_dist(self, ctx: Any, output: Any) -> Any:
        return in_fused_order(super().output_dist(ctx, output), self._sp_fused_order)

    def compute_and_output_dist(self, ctx: Any, input: Any) -> Any:
        return in_fused_order(super().compute_and_output_dist(ctx, input), self._sp_fused_order)


class ScratchPipeEmbeddingBagCollectionSharder(ScratchPipeSharderMixin, EmbeddingBagCollectionSharder):
    """EmbeddingBagCollection sharder that offers the ``"scratchpipe"`` kernel.

    Args:
        config: sharder-wide ScratchPipe options (lookahead, horizon, victim policy and
            fallback optimizer settings). Per-table size comes from the plan's
            ``CacheParams.load_factor``.
        fused_params: as for TorchRec's sharder (optimizer, learning rate, ...).
        qcomm_codecs_registry: as for TorchRec's sharder.

    Example::

        >>> sharder = ScratchPipeEmbeddingBagCollectionSharder(ScratchPipeConfig(lookahead=2))
        >>> "scratchpipe" in sharder.compute_kernels("row_wise", "cpu")
        True
    """

    def __init__(
        self,
        config: Optional[ScratchPipeConfig] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._sp_config = config

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        # Row-wise works on CPU with gloo; TorchRec only lists it for CUDA. The planner
        # offers it on CPU only to tables whose constraints name it (see planner.py).
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedScratchPipeEmbeddingBagCollection:
        runtime = self.runtime_params(params)
        return ShardedScratchPipeEmbeddingBagCollection(
            module=module,
            table_name_to_parameter_sharding=runtime,
            env=env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
            sharded_module_order_overwrite=self._sharded_module_order_overwrite,
        )

    @property
    def sharded_module_type(self) -> Type[ShardedScratchPipeEmbeddingBagCollection]:
        return ShardedScratchPipeEmbeddingBagCollection


def get_sharders(
    config: Optional[ScratchPipeConfig] = None,
    fused_params: Optional[Dict[str, Any]] = None,
) -> List[ModuleSharder[nn.Module]]:
    """Sharders for the planner and DMP: ScratchPipe's for EmbeddingBagCollection and
    EmbeddingCollection, TorchRec's defaults for every other module.

    Args:
        config: sharder-wide ScratchPipe options (victim policy, horizon, lookahead, and
            optimizer settings used when TorchRec passes none).
        fused_params: TorchRec fused params for both ScratchPipe sharders
            (e.g. ``{"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}``).

    Example::

        >>> sharders = get_sharders(ScratchPipeConfig(lookahead=2, victim_policy="future"))
        >>> type(sharders[0]).__name__
        'ScratchPipeEmbeddingBagCollectionSharder'
    """
    ours: List[ModuleSharder[nn.Module]] = [
        ScratchPipeEmbeddingBagCollectionSharder(config, fused_params),  # type: ignore[list-item]
        ScratchPipeEmbeddingCollectionSharder(config, fused_params),  # type: ignore[list-item]
    ]
    replaced = {s.module_type for s in ours}
    return ours + [s for s in get_default_sharders() if s.module_type not in replaced]
