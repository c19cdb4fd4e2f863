"""The pooled output's key order: what TorchRec's ``fused`` gives for the same plan.

TorchRec groups a rank's tables into kernels by data type, pooling and compute kernel, in
order of first appearance, and a sharded ``EmbeddingBagCollection`` returns its
``KeyedTensor`` in group order. ScratchPipe tables run under TorchRec's
``customized_kernel``, so they form groups of their own, and the same plan with a table
moved to ScratchPipe would return the keys in another order (with FP16 and FP32 tables:
``f0,f1,f2,f3`` instead of ``fused``'s ``f0,f3,f1,f2``). Models that read
``KeyedTensor.values()`` by position (TorchRec's DLRM) would then feed their interaction
in another order after a plan swap. The sharded module therefore asks TorchRec which
order the plan would give with every ScratchPipe table on ``fused``
(:func:`fused_embedding_names`), and, where it differs, returns its output in that order
(:class:`FusedOrderOutput`, one column gather, exact in forward and backward).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_scratchpipe.compat import EmbeddingSharding, EmbeddingShardingInfo
from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, is_scratchpipe


def as_fused(info: EmbeddingShardingInfo) -> EmbeddingShardingInfo:
    """The same table shard info planned on TorchRec's ``fused`` kernel."""
    if not is_scratchpipe(info.param_sharding):
        return info
    ps = info.param_sharding
    fields = {f.name: getattr(ps, f.name) for f in dataclasses.fields(ParameterSharding)}
    fields["compute_kernel"] = EmbeddingComputeKernel.FUSED.value
    fused_params = {k: v for k, v in (info.fused_params or {}).items() if k != FUSED_PARAMS_KEY}
    return dataclasses.replace(info, param_sharding=ParameterSharding(**fields), fused_params=fused_params)


def fused_embedding_names(
    build: Callable[[List[EmbeddingShardingInfo]], EmbeddingSharding], infos: List[EmbeddingShardingInfo]
) -> List[str]:
    """The embedding names (output keys) TorchRec's sharding of ``infos`` would have with every
    ScratchPipe table on ``fused``. ``build`` is TorchRec's own sharding factory; building a
    sharding only groups tables (no kernel, no allocation, no communication)."""
    sharding = build([as_fused(i) for i in infos])
    names: List[str] = sharding.embedding_names()
    return names


def fused_order_index(actual: List[str], dims: List[int], fused: List[str]) -> Optional[torch.Tensor]:
    """Column indices that gather an output laid out as ``actual`` (keys of ``dims`` columns)
    into the ``fused`` key order; None when the orders agree.

    Example::

        >>> fused_order_index(["a", "b"], [2, 1], ["b", "a"]).tolist()
        [2, 0, 1]
        >>> fused_order_index(["a", "b"], [2, 1], ["a", "b"]) is None
        True
    """
    if actual == fused:
        return None
    if sorted(actual) != sorted(fused) or len(set(actual)) != len(actual):
        raise ValueError(f"output keys {actual} cannot be reordered as fused's {fused}.")
    starts = torch.tensor([0] + dims).cumsum(0).tolist()
    where = {name: i for i, name in enumerate(actual)}
    cols = [torch.arange(starts[where[n]], starts[where[n] + 1]) for n in fused]
    return torch.cat(cols)


class FusedOrderOutput(LazyAwaitable[KeyedTensor]):
    """A sharded module's output awaitable whose ``KeyedTensor`` comes out in ``fused``'s key order.

    Args:
        inner: the module's own output awaitable.
        keys, dims: the keys in fused order and their widths.
        index: columns of the inner output, in fused order (``fused_order_index``).
    """

    def __init__(self, inner: Awaitable[KeyedTensor], keys: List[str], dims: List[int], index: torch.Tensor) -> None:
        super().__init__()
        self._inner = inner
        self._keys = keys
        self._dims = dims
        self._index = index

    def _wait_impl(self) -> KeyedTensor:
        kt = self._inner.wait()
        values = kt.values()
        index = self._index if self._index.device == values.device else self._index.to(values.device)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values.index_select(1, index), key_dim=1)


def in_fused_order(awaitable: Any, order: Optional[tuple]) -> Any:
    """``awaitable`` as is, or wrapped so that its KeyedTensor has ``fused``'s key order."""
    if order is None:
        return awaitable
    keys, dims, index = order
    return FusedOrderOutput(awaitable, keys, dims, index)
