"""The ScratchPipe-aware EmbeddingBagCollection sharder and its sharded module.

``get_sharders()`` is what users hand to the planner and to ``DistributedModelParallel``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Type

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, KJTList
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_scratchpipe.compat import (
    EmbeddingSharding,
    EmbeddingShardingInfo,
    ShardedEmbeddingBagCollection,
    replace_placement_with_meta_device,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.lookup import SCRATCHPIPE_SHARDINGS, ScratchPipeGroupedPooledEmbeddingsLookup
from torchrec_scratchpipe.distributed.types import (
    SCRATCHPIPE,
    check_load_factor,
    is_scratchpipe,
    to_runtime_sharding,
)

#: Sharding types ScratchPipe tables can use.
SCRATCHPIPE_SHARDING_TYPES: List[str] = list(SCRATCHPIPE_SHARDINGS)


def _unwrap(lookup: nn.Module) -> nn.Module:
    while isinstance(lookup, DistributedDataParallel):  # wraps data-parallel lookups
        lookup = lookup.module
    return lookup


class ShardedScratchPipeEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """``ShardedEmbeddingBagCollection`` whose ScratchPipe tables run on the ScratchPipe kernel.

    State dicts, ``fused_optimizer`` keys and ShardedTensor types are those of ``fused``
    (TorchRec skips state handling for ``customized_kernel``; this class does not).

    Example::

        >>> # sharded = dmp_model.module.ebc  (after DMP with tsp.get_sharders())
        >>> # sharded.prefetch(dist_input); sharded.peek([later_dist_inputs])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_scratchpads())

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
        if not sp:
            return super().create_embedding_bag_sharding(
                sharding_infos, env, device, permute_embeddings, qcomm_codecs_registry
            )
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
        return SCRATCHPIPE_SHARDINGS[sharding_type](sharding_infos, env, device, **kwargs)

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        # TorchRec leaves state handling of customized_kernel tables to subclasses. Ours
        # expose store views exactly like ``fused``, so let TorchRec treat them as fused.
        plan = self.module_sharding_plan
        self.module_sharding_plan = EmbeddingModuleShardingPlan(
            {
                name: dataclasses.replace(ps, compute_kernel=EmbeddingComputeKernel.FUSED.value)
                if is_scratchpipe(ps)
                else ps
                for name, ps in plan.items()
            }
        )
        try:
            super()._initialize_torch_state(skip_registering)
        finally:
            self.module_sharding_plan = plan

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.refresh_scratchpads()

    def scratchpipe_kernels(self) -> List[ScratchPipeEmbeddingBag]:
        """ScratchPipe kernels of this module on this rank."""
        out: List[ScratchPipeEmbeddingBag] = []
        for lookup in getattr(self, "_lookups", []):
            lookup = _unwrap(lookup)
            if isinstance(lookup, ScratchPipeGroupedPooledEmbeddingsLookup):
                out.extend(lookup.scratchpipe_kernels())
        return out

    def refresh_scratchpads(self) -> None:
        """Reload resident slots from the store views (after a state dict was loaded)."""
        for kernel in self.scratchpipe_kernels():
            kernel.refresh_weights()

    def peek(self, dist_inputs: Sequence[KJTList]) -> None:
        """Ids of batches after the prefetched ones (each the output of ``input_dist``)."""
        for i, lookup in enumerate(self._lookups):
            lookup = _unwrap(lookup)
            if isinstance(lookup, ScratchPipeGroupedPooledEmbeddingsLookup):
                lookup.peek([d[i] for d in dist_inputs])


class ScratchPipeEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
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

    @property
    def config(self) -> Optional[ScratchPipeConfig]:
        return self._sp_config

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        # Row-wise works on CPU with gloo; TorchRec only lists it for CUDA. The planner
        # offers it on CPU only to tables whose constraints name it (see planner.py).
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if sharding_type in SCRATCHPIPE_SHARDING_TYPES:
            kernels.append(SCRATCHPIPE)
        return kernels

    def storage_usage(self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str) -> Dict[str, int]:
        if compute_kernel == SCRATCHPIPE:  # the table lives in host memory, like fused_uvm_caching
            return {"ddr": tensor.element_size() * tensor.nelement()}
        return super().storage_usage(tensor, compute_device_type, compute_kernel)

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedScratchPipeEmbeddingBagCollection:
        for name, ps in params.items():
            if is_scratchpipe(ps):
                if ps.sharding_type not in SCRATCHPIPE_SHARDING_TYPES:
                    raise ValueError(
                        f"table {name!r}: ScratchPipe supports {SCRATCHPIPE_SHARDING_TYPES}, "
                        f"the plan asks for {ps.sharding_type!r}."
                    )
                check_load_factor(ps.cache_params.load_factor if ps.cache_params else None, name)
        runtime = {name: to_runtime_sharding(ps, self._sp_config) for name, ps in params.items()}
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


class ScratchPipeGuardedEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """TorchRec's EmbeddingCollection sharder, with a clear error for ScratchPipe plans."""

    def shard(self, module: nn.Module, params: Dict[str, ParameterSharding], *args: Any, **kwargs: Any) -> Any:
        bad = sorted(name for name, ps in params.items() if is_scratchpipe(ps))
        if bad:
            raise ValueError(
                f"tables {bad} of {type(module).__name__} are planned on the ScratchPipe kernel, which "
                "supports pooled EmbeddingBagCollection tables only (no unpooled EmbeddingCollection): "
                "plan them with a TorchRec kernel such as 'fused'."
            )
        return super().shard(module, params, *args, **kwargs)


def get_sharders(
    config: Optional[ScratchPipeConfig] = None,
    fused_params: Optional[Dict[str, Any]] = None,
) -> List[ModuleSharder[nn.Module]]:
    """Sharders for the planner and DMP: ScratchPipe's for EmbeddingBagCollection,
    TorchRec's defaults for every other module.

    Args:
        config: sharder-wide ScratchPipe options (victim policy, horizon, lookahead, and
            optimizer settings used when TorchRec passes none).
        fused_params: TorchRec fused params for the EmbeddingBagCollection sharder
            (e.g. ``{"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}``).

    Example::

        >>> sharders = get_sharders(ScratchPipeConfig(lookahead=2, victim_policy="future"))
        >>> type(sharders[0]).__name__
        'ScratchPipeEmbeddingBagCollectionSharder'
    """
    sharders: List[ModuleSharder[nn.Module]] = [
        ScratchPipeEmbeddingBagCollectionSharder(config, fused_params)  # type: ignore[list-item]
    ]
    for sharder in get_default_sharders():
        if sharder.module_type is EmbeddingBagCollection:
            continue
        if type(sharder) is EmbeddingCollectionSharder:
            sharder = ScratchPipeGuardedEmbeddingCollectionSharder()  # type: ignore[assignment]
        sharders.append(sharder)
    return sharders
