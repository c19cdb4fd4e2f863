"""What ScratchPipe adds to TorchRec's sharded modules and sharders, for bags and sequences.

``ShardedScratchPipeEmbeddingBagCollection`` (pooled) and
``ShardedScratchPipeEmbeddingCollection`` (sequence) share :class:`ScratchPipeShardedMixin`;
their sharders share :class:`ScratchPipeSharderMixin`. Each mixin goes first in the
bases, in front of the TorchRec class it extends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, KJTList
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingType

from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.lookup import ScratchPipeLookupMixin
from torchrec_scratchpipe.distributed.placement import STORE_DEVICE, placed_spec
from torchrec_scratchpipe.distributed.types import SCRATCHPIPE, check_load_factor, is_scratchpipe, to_runtime_sharding

#: Sharding types ScratchPipe tables can use (pooled and sequence alike).
SCRATCHPIPE_SHARDING_TYPES: List[str] = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
]


def check_plan_entry(name: str, ps: ParameterSharding) -> None:
    """Raise a ValueError for a ScratchPipe plan entry no kernel can run: an unsupported
    sharding type, or two column shards of one table on one rank (each rank's kernel holds
    one shard per table). Every rank sees the same plan, so every rank raises alike.

    Example::

        >>> check_plan_entry("t", ParameterSharding("column_wise", "scratchpipe", ranks=[0, 0]))
        Traceback (most recent call last):
        ...
        ValueError: table 't': the ScratchPipe plan puts 2 column shards of it on rank 0; ScratchPipe runs one shard of a table per rank. Raise the table's ParameterConstraints.min_partition (to the table's dim for one shard), use more ranks, or plan it table_wise/row_wise.
    """
    if ps.sharding_type not in SCRATCHPIPE_SHARDING_TYPES:
        raise ValueError(f"table {name!r}: ScratchPipe supports {SCRATCHPIPE_SHARDING_TYPES}, the plan asks for {ps.sharding_type!r}.")
    ranks = list(ps.ranks or [])
    doubled = sorted({r for r in ranks if ranks.count(r) > 1})
    if ps.sharding_type == ShardingType.COLUMN_WISE.value and doubled:
        raise ValueError(
            f"table {name!r}: the ScratchPipe plan puts {ranks.count(doubled[0])} column shards of it on rank "
            f"{doubled[0]}; ScratchPipe runs one shard of a table per rank. Raise the table's "
            "ParameterConstraints.min_partition (to the table's dim for one shard), use more ranks, or plan it "
            "table_wise/row_wise."
        )


#: Why a TorchRec train pipeline that prefetches cannot drive ScratchPipe tables, and what to use.
PREFETCH_PIPELINE_REFUSED = (
    "ScratchPipe tables are prefetched by torchrec_scratchpipe's ScratchPipeTrainPipeline "
    "(torchrec_scratchpipe.distributed.pipeline), not by TorchRec's PrefetchTrainPipelineSparseDist: "
    "that pipeline announces one batch ahead on its own stream and has ranks agree on nothing, while a "
    "scratchpad plans L batches ahead with H in view and drops a batch any rank refuses on every rank. "
    "Use ScratchPipeTrainPipeline(model, optimizer, device, lookahead, horizon); it also prefetches "
    "TorchRec's fused_uvm_caching tables in the same model."
)


def unwrap(lookup: nn.Module) -> nn.Module:
    """The lookup inside TorchRec's DDP wrapper (data-parallel lookups are wrapped)."""
    while isinstance(lookup, DistributedDataParallel):
        lookup = lookup.module
    return lookup


class ScratchPipeShardedMixin:
    """State handling, scratchpad refresh and ``prefetch`` for a sharded module with ScratchPipe tables.

    State dicts, ``fused_optimizer`` keys and ShardedTensor types are those of ``fused``
    (TorchRec skips state handling for ``customized_kernel``; this mixin does not).

    Example::

        >>> # sharded = dmp_model.module.ebc  (after DMP with tsp.get_sharders())
        >>> # sharded.prefetch(dist_input)   # up to H + 1 batches ahead
    """

    module_sharding_plan: EmbeddingModuleShardingPlan
    _lookups: List[nn.Module]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_post_hook(  # type: ignore[attr-defined]
            lambda module, _keys: module.refresh_scratchpads()
        )

    def _initialize_torch_state(self, *args: Any, **kwargs: Any) -> None:
        # TorchRec leaves state handling of customized_kernel tables to subclasses. Ours
        # expose store views exactly like ``fused``, so let TorchRec treat them as fused,
        # with the shards placed where the store is (host memory), not where the plan
        # trains them (the ShardedTensors' metadata must match their tensors' device).
        plan = self.module_sharding_plan
        self.module_sharding_plan = EmbeddingModuleShardingPlan(
            {
                name: dataclasses.replace(
                    ps,
                    compute_kernel=EmbeddingComputeKernel.FUSED.value,
                    sharding_spec=placed_spec(ps.sharding_spec, STORE_DEVICE),  # type: ignore[arg-type]
                )
                if is_scratchpipe(ps)
                else ps
                for name, ps in plan.items()
            }
        )
        try:
            super()._initialize_torch_state(*args, **kwargs)  # type: ignore[misc]  (1.6.1 takes no argument)
        finally:
            self.module_sharding_plan = plan

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``Module._apply`` (``.to``, ``.cuda``, ``.half``, TorchRec's DDP wrapping) for every
        tensor but the ScratchPipe tables' parameters.

        Those parameters view the host-memory backing store (``named_parameters_by_table``):
        moved or copied, they would be a full copy of each table on the device, and a later
        ``load_state_dict`` would write into the copy instead of the store. They are left
        out of ``fn``. TorchRec keeps its lookups (and so the kernels) outside the module
        tree, so ``fn`` is shown to each kernel's engine first: the engines keep their
        tensors where they are, and refuse ``fn`` if it asks for another device
        (``ScratchPipeEmbeddingBags._apply``), before anything of this module changes.
        """
        kernels = self.scratchpipe_kernels()
        for kernel in kernels:
            kernel.engine._apply(fn)
        views = {id(p) for kernel in kernels for _, p in kernel.named_parameters_by_table()}
        held = []  # (module, its parameters as they were)
        for module in self.modules():  # type: ignore[attr-defined]
            if any(p is not None and id(p) in views for p in module._parameters.values()):
                held.append((module, dict(module._parameters)))
                for name in [n for n, p in module._parameters.items() if p is not None and id(p) in views]:
                    del module._parameters[name]
        try:
            return super()._apply(fn, recurse)  # type: ignore[misc]
        finally:
            for module, before in held:  # the store views back, in their places
                now = dict(module._parameters)
                module._parameters.clear()
                module._parameters.update({n: p if id(p) in views else now.get(n, p) for n, p in before.items()})

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        self.refresh_scratchpads()

    def scratchpipe_kernels(self) -> List[ScratchPipeEmbeddingBag]:
        """ScratchPipe kernels of this module on this rank."""
        out: List[ScratchPipeEmbeddingBag] = []
        for lookup in getattr(self, "_lookups", []):
            lookup = unwrap(lookup)
            if isinstance(lookup, ScratchPipeLookupMixin):
                out.extend(lookup.scratchpipe_kernels())
        return out

    def refresh_scratchpads(self) -> None:
        """Reload resident slots from the store views (after a state dict was loaded)."""
        for kernel in self.scratchpipe_kernels():
            kernel.reload()

    def prefetch(self, dist_input: KJTList, forward_stream: Optional[Any] = None, ctx: Optional[Any] = None) -> None:
        """Announce a batch's input-dist output to every kernel (``prepare_prefetch``, then
        ``commit_prefetch``), as TorchRec's ``prefetch`` does for its caching kernels.

        Raises:
            RuntimeError: called by one of TorchRec's train pipelines (they pass ``ctx``),
                e.g. ``PrefetchTrainPipelineSparseDist``, on a module with ScratchPipe tables.
        """
        if ctx is not None and self.scratchpipe_kernels():
            raise RuntimeError(PREFETCH_PIPELINE_REFUSED)
        self.commit_prefetch(dist_input, self.prepare_prefetch(dist_input), forward_stream)

    def prepare_prefetch(self, dist_input: KJTList) -> List[Any]:
        """Validate a batch's input-dist output for every ScratchPipe kernel; nothing changes.

        ``commit_prefetch(dist_input, prepared)`` then announces it: a pipeline can agree
        across ranks in between, so that a batch one rank refuses is dropped by all.
        """
        return [
            lookup.prepare(features) if isinstance(lookup, ScratchPipeLookupMixin) else None
            for features, lookup in zip(dist_input, map(unwrap, self._lookups))
        ]

    def commit_prefetch(self, dist_input: KJTList, prepared: List[Any], forward_stream: Optional[Any] = None) -> None:
        """Announce a batch prepared by ``prepare_prefetch`` (TorchRec's ``prefetch``, in two steps)."""
        for features, lookup, part in zip(dist_input, map(unwrap, self._lookups), prepared):
            if isinstance(lookup, ScratchPipeLookupMixin):
                lookup.commit(features, part, forward_stream)
            else:
                lookup.prefetch(sparse_features=features, forward_stream=forward_stream)


class ScratchPipeSharderMixin:
    """Offers the ``"scratchpipe"`` kernel in a TorchRec sharder and converts its plan entries.

    Args of the sharders using it: ``config`` (sharder-wide ``ScratchPipeConfig``), then
    TorchRec's own arguments.
    """

    _sp_config: Optional[ScratchPipeConfig] = None

    @property
    def config(self) -> Optional[ScratchPipeConfig]:
        return self._sp_config

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)  # type: ignore[misc]
        if sharding_type in SCRATCHPIPE_SHARDING_TYPES:
            kernels.append(SCRATCHPIPE)
        return kernels

    def storage_usage(self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str) -> Dict[str, int]:
        if compute_kernel == SCRATCHPIPE:  # the table lives in host memory, like fused_uvm_caching
            return {"ddr": tensor.element_size() * tensor.nelement()}
        return super().storage_usage(tensor, compute_device_type, compute_kernel)  # type: ignore[misc]

    def runtime_params(self, params: Dict[str, ParameterSharding]) -> Dict[str, ParameterSharding]:
        """Check the ScratchPipe entries of a module's plan and convert them for TorchRec.

        Raises:
            ValueError: an unsupported sharding type or a bad load factor (before sharding).
        """
        for name, ps in params.items():
            if is_scratchpipe(ps):
                check_plan_entry(name, ps)
                check_load_factor(ps.cache_params.load_factor if ps.cache_params else None, name)
        return {name: to_runtime_sharding(ps, self._sp_config) for name, ps in params.items()}
