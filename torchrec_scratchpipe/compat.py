"""The one module through which the package touches TorchRec and FBGEMM internals.

Supported stacks: torch 2.11-2.14 with the matching fbgemm-gpu(-cpu) 1.6-1.9 and
torchrec 1.6.1-1.9.x (see the README's version table). Everything below is either private
(an underscore name), absent or moved in one of those versions, or an extension point
whose internals the package relies on (kernel base, lookup, shardings, estimators, train
pipeline). Public data types (configs, ``KeyedJaggedTensor``, ``ShardingType``,
``ParameterConstraints``, ``EmbOptimType``, ...) are imported directly where used. The
package's subclasses of the classes below (lookup, shardings, sharded module, planner,
train pipeline) also read their base classes' private attributes (e.g. ``_emb_modules``,
``_pipelined_modules``); those reads stay in the subclasses, and the suite covers them on
every stack CI runs.

Nothing here changes TorchRec or FBGEMM at import time. The only change to a TorchRec
module is scoped: :func:`compute_kernels_accepted` lets the planner's final validation
accept extra kernel names inside a ``with`` block (torchrec >= 1.7 validates kernel names
against a module-level set; 1.6.1 does not validate them, so the block does nothing there).

Example::

    >>> from torchrec_scratchpipe import compat
    >>> compat.STACK["torchrec"] >= (1, 6)
    True
    >>> with compat.compute_kernels_accepted(["scratchpipe"]):
    ...     pass  # EmbeddingShardingPlanner.plan(...) accepts "scratchpipe" here
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch.overrides import TorchFunctionMode


class _FbgemmCompatNotice(logging.Filter):
    """Drops the notice fbgemm-gpu 1.6.0 logs on import on torch 2.11 (its own version table
    lacks its entry; the pair is the supported one). Only while this module imports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_fbgemm_torch_compat_table has no entry" not in record.getMessage()


_notice = _FbgemmCompatNotice()
logging.getLogger().addFilter(_notice)
try:
    # --- FBGEMM: the TBE the scratchpad trains with ---------------------------------
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
finally:
    logging.getLogger().removeFilter(_notice)

# --- TorchRec: kernel base, fused optimizer, state dict --------------------------------
from torchrec.distributed.batched_embedding_kernel import EmbeddingFusedOptimizer
from torchrec.distributed.composable.table_batched_embedding_slice import (
    TableBatchedEmbeddingSlice,
)

# --- TorchRec: sequence (EmbeddingCollection) lookup, shardings, sharded module -------
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.embedding_kernel import BaseEmbedding, get_state_dict

# --- TorchRec: lookup, shardings, sharded module --------------------------------------
from torchrec.distributed.embedding_lookup import (
    GroupedEmbeddingsLookup,
    GroupedPooledEmbeddingsLookup,
)
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingInfo,
)
from torchrec.distributed.embeddingbag import (
    ShardedEmbeddingBagCollection,
    replace_placement_with_meta_device,
)

# --- TorchRec: planner, estimators, stats ---------------------------------------------
from torchrec.distributed.planner import planners as _planners
from torchrec.distributed.planner.constants import BIGINT_DTYPE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
    _calculate_shard_io_sizes,
    calculate_pipeline_io_cost,
    get_num_poolings,
)
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
)
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.sharding.cw_sequence_sharding import (
    CwSequenceEmbeddingSharding,
)
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.rw_sequence_sharding import (
    RwSequenceEmbeddingSharding,
)
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sequence_sharding import (
    TwSequenceEmbeddingSharding,
)
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding

# --- TorchRec: train pipeline internals -----------------------------------------------
from torchrec.distributed.train_pipeline.pipeline_context import (
    PrefetchTrainPipelineContext,
)
from torchrec.distributed.train_pipeline.runtime_forwards import (
    PrefetchPipelinedForward,
)
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import _wait_for_batch
from torchrec.distributed.types import _tabulate
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.streamable import Multistreamable

#: TorchRec's shard input/output size helper (private in every supported version).
calculate_shard_io_sizes = _calculate_shard_io_sizes
#: TorchRec's plain-text table formatter (private in every supported version).
tabulate = _tabulate
#: Wait for a batch's host-to-device copy on ``stream`` (TorchRec's private helper).
wait_for_batch = _wait_for_batch

__all__ = [
    "CwSequenceEmbeddingSharding", "FixedPercentageStorageReservation", "GroupedEmbeddingsLookup",
    "RwSequenceEmbeddingSharding", "ShardedEmbeddingCollection", "TwSequenceEmbeddingSharding",
    "fx_tracing_notice", "module_process_group", "topology_factory",
    "BIGINT_DTYPE", "BaseEmbedding", "ComputeDevice", "CwPooledEmbeddingSharding", "EmbeddingEnumerator",
    "EmbeddingFusedOptimizer", "EmbeddingLocation", "EmbeddingPerfEstimator", "EmbeddingSharding",
    "EmbeddingShardingInfo", "EmbeddingStats", "EmbeddingStorageEstimator", "GroupedPooledEmbeddingsLookup",
    "Multistreamable", "PoolingMode", "PrefetchPipelinedForward", "PrefetchTrainPipelineContext",
    "RwPooledEmbeddingSharding", "STACK", "ShardedEmbeddingBagCollection", "SplitTableBatchedEmbeddingBagsCodegen",
    "TableBatchedEmbeddingSlice", "TrainPipelineSparseDist", "TwPooledEmbeddingSharding", "slot_tbe",
    "calculate_pipeline_io_cost", "calculate_shard_io_sizes", "compute_kernels_accepted", "get_num_poolings",
    "get_state_dict", "kernel_validation_set", "optimizer_type_to_emb_opt_type", "replace_placement_with_meta_device",
    "sharder_name", "stack_text", "tabulate", "version_tuple", "wait_for_batch",
]


def version_tuple(text: str) -> Tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.11.0+cu130"`` -> ``(2, 11, 0)``.

    Example::

        >>> version_tuple("1.9.0rc1")
        (1, 9, 0)
    """
    match = re.match(r"\d+(\.\d+)*", text)
    if match is None:
        raise ValueError(f"not a version string: {text!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def _installed(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0"  # an unpackaged checkout (e.g. the GPU kit's PYTHONPATH install without metadata)


#: Versions of the running stack as tuples, e.g. ``{"torch": (2, 11, 0), ...}``.
STACK: Dict[str, Tuple[int, ...]] = {
    "torch": version_tuple(_installed("torch")),
    "fbgemm_gpu": version_tuple(_installed("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm_gpu", "fbgemm_gpu_cpu")),
    "torchrec": version_tuple(_installed("torchrec")),
}


def stack_text() -> str:
    """One line naming the running stack, e.g. ``torch 2.11.0, fbgemm-gpu 1.6.0, torchrec 1.6.1``."""
    return ", ".join(
        f"{name.replace('_', '-')} {'.'.join(map(str, version))}" for name, version in STACK.items()
    )


def kernel_validation_set() -> Optional[Set[str]]:
    """The set of kernel names TorchRec's planner accepts at the end of ``plan()``.

    ``None`` where this TorchRec version does not validate kernel names (1.6.x).
    """
    valid = getattr(_planners, "_VALID_COMPUTE_KERNELS", None)
    return valid if isinstance(valid, set) else None


_lock = threading.Lock()
_accepted: Dict[str, int] = {}


@contextlib.contextmanager
def compute_kernels_accepted(names: Iterable[str]) -> Iterator[None]:
    """Let TorchRec's final plan validation accept the kernel ``names`` inside this block.

    Re-entrant and thread-safe: a name is removed again when the last block that added it
    exits, and names TorchRec itself knows are never removed. Does nothing on TorchRec
    versions that do not validate kernel names.

    Args:
        names: kernel names outside ``EmbeddingComputeKernel`` (e.g. ``["scratchpipe"]``).

    Example::

        >>> with compute_kernels_accepted(["scratchpipe"]):
        ...     valid = kernel_validation_set()
        ...     assert valid is None or "scratchpipe" in valid
    """
    valid = kernel_validation_set()
    if valid is None:
        yield
        return
    added = []
    with _lock:
        for name in names:
            if name in valid and name not in _accepted:
                continue  # TorchRec's own kernel: never ours to remove
            _accepted[name] = _accepted.get(name, 0) + 1
            valid.add(name)
            added.append(name)
    try:
        yield
    finally:
        with _lock:
            for name in added:
                _accepted[name] -= 1
                if _accepted[name] == 0:
                    del _accepted[name]
                    valid.discard(name)


def module_process_group(model: Any) -> Optional[Any]:
    """The process group of a model's sharded modules (their private ``_env``), or None.

    Example::

        >>> import torch
        >>> module_process_group(torch.nn.Linear(1, 1)) is None
        True
    """
    for module in model.modules():
        env = getattr(module, "_env", None)
        if env is not None and getattr(env, "process_group", None) is not None:
            return env.process_group
    return None


def topology_factory() -> Optional[Tuple[Any, Any, Any]]:
    """TorchRec's ``(TopologyFactory, TrainerConfig, KernelConfig)``, or None on versions
    without the factory (there ``Topology(...)`` is the recommended way and does not warn).

    Example::

        >>> factory = topology_factory()
        >>> factory is None or len(factory) == 3
        True
    """
    try:
        from torchrec.distributed.planner.types import (
            KernelConfig,
            TopologyFactory,
            TrainerConfig,
        )
    except ImportError:
        return None
    return TopologyFactory, TrainerConfig, KernelConfig


def fx_tracing_notice() -> Optional[Tuple[Callable[[], None], str]]:
    """torch's one-time ``is_fx_tracing`` notice (a private, cached function) and the name
    of the logger it writes to, or None where this torch has no such notice.

    Example::

        >>> notice = fx_tracing_notice()
        >>> notice is None or callable(notice[0])
        True
    """
    try:
        from torch.fx import _symbolic_trace
    except ImportError:  # pragma: no cover - other torch layouts
        return None
    notice = getattr(_symbolic_trace, "is_fx_tracing_warning", None)
    return None if notice is None else (notice, _symbolic_trace.__name__)


class _OneBlockAllocation(TorchFunctionMode):
    """While a TBE is built: ``torch.zeros(n)`` of a split's total size ``n`` (all tables)
    allocates only one table's block (``sizes[n]``). Scoped to one constructor call."""

    def __init__(self, sizes: Dict[int, int]) -> None:
        super().__init__()
        self._sizes = sizes

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.zeros and "out" not in kwargs and len(args) == 1 and isinstance(args[0], int):
            args = (self._sizes.get(args[0], args[0]),)
        return func(*args, **kwargs)


def slot_tbe(
    capacity: int,
    dim: int,
    table_features: Sequence[int],
    location: Any,
    compute_device: Any,
    **kwargs: Any,
) -> SplitTableBatchedEmbeddingBagsCodegen:
    """FBGEMM's TBE built as TorchRec's ``fused`` builds it, over one shared block of slots.

    The TBE has one table per source table (``table_features[t]`` features map to table
    ``t``, as ``fused``'s ``feature_table_map``), each of ``capacity`` rows, so FBGEMM picks
    the same forward and backward kernels as for ``fused`` (its CPU row-wise Adagrad, for
    one, has a fast path only for tables that serve a single feature). All tables then
    alias the same ``capacity`` rows of weights and optimizer state: their offsets are
    zeroed, and only one block is allocated. The tables' slots must be disjoint (each slot
    holds one row of one table), which the planner guarantees; each table's update then
    touches only its own slots, exactly as ``fused`` touches only its own rows.

    Args:
        capacity: slots C, shared by every table.
        dim: embedding dim of every table.
        table_features: features per table, in feature order.
        location, compute_device: FBGEMM's ``EmbeddingLocation`` / ``ComputeDevice``.
        kwargs: the rest of TBE's constructor arguments (optimizer, pooling, device, ...).

    Example::

        >>> tbe = slot_tbe(4, 8, [1, 2], EmbeddingLocation.HOST, ComputeDevice.CPU)
        >>> w = tbe.split_embedding_weights()
        >>> len(w), tuple(w[0].shape), w[0].data_ptr() == w[1].data_ptr()
        (2, (4, 8), True)
    """
    tables = len(table_features)
    if tables < 1 or min(table_features) < 1:
        raise ValueError(f"every table needs at least one feature, got features per table {list(table_features)}.")
    feature_table_map = [t for t, n in enumerate(table_features) for _ in range(n)]
    specs = [(capacity, dim, location, compute_device)] * tables
    block = {capacity * dim * tables: capacity * dim, capacity * tables: capacity}  # per-column and per-row state
    with _OneBlockAllocation(block if tables > 1 else {}):
        tbe = SplitTableBatchedEmbeddingBagsCodegen(specs, feature_table_map=feature_table_map, **kwargs)
    _alias_tables(tbe, tables)
    return tbe


def _alias_tables(tbe: SplitTableBatchedEmbeddingBagsCodegen, tables: int) -> None:
    """Point every table of ``tbe`` at the first table's block (see ``slot_tbe``)."""
    prefixes = [n[: -len("_physical_offsets")] for n in list(vars(tbe)) if n.endswith("_physical_offsets")]
    if "weights" not in prefixes:
        raise RuntimeError(f"fbgemm-gpu {STACK['fbgemm_gpu']}: TBE has no weights_physical_offsets; unsupported layout.")
    for prefix in prefixes:
        offsets: List[int] = list(getattr(tbe, f"{prefix}_physical_offsets"))
        block = offsets[1] - offsets[0] if tables > 1 else None
        for where in ("host", "dev", "uvm"):
            name = f"{prefix}_{where}"
            storage = getattr(tbe, name, None)
            if storage is None or storage.numel() == 0 or block is None:
                continue
            if where == "uvm" or storage.dim() != 1 or storage.numel() not in (block, block * tables):
                raise RuntimeError(
                    f"fbgemm-gpu {STACK['fbgemm_gpu']}: unexpected TBE storage {name} "
                    f"{tuple(storage.shape)} for {tables} tables of {block} elements."
                )
            if storage.numel() != block:  # built at full size (allocation not intercepted): keep one block
                small = storage.detach()[:block].clone()
                if isinstance(storage, torch.nn.Parameter):
                    setattr(tbe, name, torch.nn.Parameter(small, requires_grad=storage.requires_grad))
                else:
                    tbe.register_buffer(name, small)
        setattr(tbe, f"{prefix}_physical_offsets", [0] * len(offsets))
        buffer = getattr(tbe, f"{prefix}_offsets", None)
        if isinstance(buffer, torch.Tensor):
            with torch.no_grad():
                buffer.zero_()


def host_tbe_over(weights: torch.Tensor, **kwargs: Any) -> SplitTableBatchedEmbeddingBagsCodegen:
    """A CPU TBE of one table (HOST placement) training ``weights`` ``[rows, dim]`` in place,
    e.g. a shared mapping of a file larger than memory (the file-store benchmark's ``fused``
    over ``mmap``). Built with a one-row weight block (the constructor would allocate and
    zero the whole table), then pointed at ``weights``; only optimizers without per-row
    state (``EXACT_SGD``) are accepted, as their state would be allocated in full.

    Example::

        >>> from fbgemm_gpu.split_embedding_configs import EmbOptimType
        >>> w = torch.zeros(10, 4)
        >>> tbe = host_tbe_over(w, optimizer=EmbOptimType.EXACT_SGD)
        >>> tbe.weights_host.data_ptr() == w.data_ptr()
        True
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    if kwargs.get("optimizer") != EmbOptimType.EXACT_SGD:
        raise ValueError(f"host_tbe_over needs optimizer=EXACT_SGD (no per-row state), got {kwargs.get('optimizer')}.")
    rows, dim = weights.shape
    with _OneBlockAllocation({rows * dim: dim}):
        tbe = SplitTableBatchedEmbeddingBagsCodegen([(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], **kwargs)
    tbe.weights_host.data = weights.view(-1)
    return tbe
