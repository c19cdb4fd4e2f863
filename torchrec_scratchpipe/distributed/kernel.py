"""The ScratchPipe embedding kernel as TorchRec sees it: one group of sharded tables.

``ScratchPipeEmbeddingBag`` plays the role ``BatchedFusedEmbeddingBag`` plays for the
``fused`` kernel: it receives one ``GroupedEmbeddingConfig`` (the table shards of one
kernel on this rank), returns pooled embeddings ``[B, sum(local dims)]``, trains with a
fused optimizer in backward, and exposes the shards' weights and optimizer state as
views on the engine's backing store, so TorchRec builds the same ShardedTensors, state
dict keys and ``fused_optimizer`` state it builds for ``fused``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import CacheAlgorithm
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import (
    DataType,
    PoolingType,
    data_type_to_sparse_type,
    pooling_type_to_pooling_mode,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.compat import (
    BaseEmbedding,
    EmbeddingFusedOptimizer,
    PoolingMode,
    TableBatchedEmbeddingSlice,
    get_state_dict,
)
from torchrec_scratchpipe.core.config import TBE_OPTIONS, ScratchPipeConfig
from torchrec_scratchpipe.core.layout import TBE_DEFAULT_OPTIMIZER, state_names
from torchrec_scratchpipe.core.engine import PreparedBatch, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import CapacityError
from torchrec_scratchpipe.defaults import LIBRARY_LOAD_FACTOR
from torchrec_scratchpipe.distributed.placement import STORE_DEVICE, placed_tables
from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, ScratchPipeTableParams


#: What FBGEMM's TBE (the ``fused`` kernel) uses when TorchRec passes no optimizer.
TBE_DEFAULTS: Dict[str, Any] = {
    "optimizer": TBE_DEFAULT_OPTIMIZER,
    "learning_rate": 0.01,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "stochastic_rounding": True,
}


def _is(*accepted: Any) -> Callable[[Any], bool]:
    return lambda value: value in accepted


#: Fused params that configure FBGEMM's UVM cache, which a scratchpad replaces, with the
#: values ScratchPipe accepts (what it does anyway). ``cache_load_factor`` is the plan's
#: ``CacheParams.load_factor``, which sizes the scratchpad (``ScratchPipeTableParams``).
_CACHE_PARAMS: Dict[str, Callable[[Any], bool]] = {
    "cache_load_factor": lambda value: True,
    "cache_algorithm": _is(CacheAlgorithm.LRU),  # victims: ScratchPipe's victim_policy
    "cache_reserved_memory": _is(0, 0.0),
    "prefetch_pipeline": lambda value: True,  # a ScratchPipe window is always prefetched
    "enforce_hbm": lambda value: True,  # the scratchpad is always in device memory
    "output_dtype": _is(SparseType.FP32),  # the scratchpad's (and its eval path's) output
}


def engine_config(
    fused_params: Optional[Mapping[str, Any]], tables: str = "", weights_precision: Optional[SparseType] = None
) -> ScratchPipeConfig:
    """The engine config of one kernel, from the fused params TorchRec hands it.

    Every fused param is honoured or refused: the optimizer and its hyper-parameters
    become config fields, FBGEMM TBE options ScratchPipe's scratchpad takes as they are
    (``core.config.TBE_OPTIONS``: gradient clipping, ``max_norm``, weight-decay modes,
    ...) are passed to its TBE, UVM-cache settings are accepted where they mean what a
    scratchpad does anyway (``cache_precision`` only as the weights' own precision), and
    anything else raises a ``ValueError`` naming the param. The planner calls this at
    ``plan()`` for every ScratchPipe table, so a refusal comes before anything is built.

    Precedence: TorchRec's optimizer settings (``apply_optimizer_in_backward`` or the
    sharder's ``fused_params``), then the ``ScratchPipeConfig`` given to
    ``get_sharders``, then FBGEMM TBE's defaults (what ``fused`` would use).

    Args:
        fused_params: the group's fused params (``FUSED_PARAMS_KEY`` holds the
            ScratchPipe settings; without it, the library defaults).
        tables: table names for messages.
        weights_precision: the tables' weight precision (checks ``cache_precision``).

    Example::

        >>> engine_config({"learning_rate": 0.1, "gradient_clipping": True}).tbe_options
        (('gradient_clipping', True),)
        >>> engine_config({"cache_sets": 4}, "['t0']")
        Traceback (most recent call last):
        ...
        ValueError: ScratchPipe tables ['t0']: fused param 'cache_sets' is not supported (FBGEMM UVM-cache or other kernels' setting); remove it from the sharder's fused_params or the table's constraints, or use another kernel for these tables.
    """
    fp = dict(fused_params or {})
    params: ScratchPipeTableParams = fp.pop(FUSED_PARAMS_KEY, None) or ScratchPipeTableParams(LIBRARY_LOAD_FACTOR)
    kwargs: Dict[str, Any] = dict(TBE_DEFAULTS)
    kwargs.update(dict(params.options))
    options: Dict[str, Any] = dict(kwargs.pop("tbe_options", ()))
    where = f"ScratchPipe tables {tables}" if tables else "ScratchPipe"
    for name, value in fp.items():
        if name in TBE_DEFAULTS:
            kwargs[name] = value
        elif name in TBE_OPTIONS:
            options[name] = value
        elif name == "cache_precision":
            if weights_precision is not None and value != weights_precision:
                raise ValueError(
                    f"{where}: fused param cache_precision={value} differs from the tables' weights "
                    f"({weights_precision}); a scratchpad holds rows in the tables' own precision: drop "
                    "CacheParams.precision or set it to the tables' data_type."
                )
        elif name in _CACHE_PARAMS:
            if not _CACHE_PARAMS[name](value):
                raise ValueError(
                    f"{where}: fused param {name}={value!r} is not supported by ScratchPipe (its scratchpad "
                    "replaces FBGEMM's UVM cache: victims follow ScratchPipeConfig.victim_policy, slots "
                    "CacheParams.load_factor, and its output is FP32): remove it or use another kernel."
                )
        else:
            raise ValueError(
                f"{where}: fused param {name!r} is not supported (FBGEMM UVM-cache or other kernels' "
                "setting); remove it from the sharder's fused_params or the table's constraints, or use "
                "another kernel for these tables."
            )
    kwargs["load_factor"] = params.load_factor
    kwargs["cache_rows"] = None
    if not isinstance(kwargs["optimizer"], EmbOptimType):
        raise ValueError(f"{where}: optimizer must be an fbgemm EmbOptimType, got {kwargs['optimizer']!r}.")
    try:
        return ScratchPipeConfig(**kwargs, tbe_options=tuple(sorted(options.items())))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


@dataclass
class _EngineTable:
    """One local shard, described the way the engine reads tables."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: List[str]
    pooling: PoolingType
    data_type: DataType = DataType.FP32
    init_fn: Optional[Callable[[torch.Tensor], Any]] = field(default=None, repr=False)


def _staging_rows(config: GroupedEmbeddingConfig) -> Dict[str, int]:
    """Rows a step is expected to move per table of ``config`` (the plan's estimate)."""
    params = (config.fused_params or {}).get(FUSED_PARAMS_KEY)
    return dict(params.staging_rows) if params is not None else {}


class _EngineAdapter:
    """What ``EmbeddingFusedOptimizer`` expects of a TBE, answered by the engine."""

    def __init__(self, kernel: "ScratchPipeEmbeddingBag") -> None:
        self._kernel = kernel

    def get_learning_rate(self) -> float:
        return self._kernel.engine.get_learning_rate()

    def set_learning_rate(self, lr: float) -> None:
        self._kernel.engine.set_learning_rate(float(lr))

    def split_embedding_weights(self) -> List[torch.Tensor]:
        return self._kernel.split_embedding_weights()

    def get_optimizer_state(self) -> List[Dict[str, torch.Tensor]]:
        return self._kernel.split_optimizer_states()

    def set_optimizer_step(self, step: int) -> None:
        raise ValueError("ScratchPipe's optimizers (exact SGD/Adagrad/row-wise Adagrad/Adam) do not take a step count.")

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:
        if set(params_dict) - {"lr", "learning_rate"}:
            raise ValueError(f"ScratchPipe can only update the learning rate, got {sorted(params_dict)}.")
        self.set_learning_rate(params_dict.get("lr", params_dict.get("learning_rate")))


class ScratchPipeFusedOptimizer(EmbeddingFusedOptimizer):
    """TorchRec's fused-optimizer view (same keys as ``fused``) over a ScratchPipe kernel.

    ``step``/``zero_grad`` push ``param_groups[0]["lr"]`` into the scratchpad as for
    ``fused``. Reading ``state`` first writes resident rows back, so state dicts are
    up to date; ``post_load_state_dict`` refreshes resident slots from loaded state.
    """

    def __init__(
        self,
        config: GroupedEmbeddingConfig,
        kernel: "ScratchPipeEmbeddingBag",
        pg: Optional[dist.ProcessGroup] = None,
        create_for_table: Optional[str] = None,
        param_weight_for_table: Optional[nn.Parameter] = None,
    ) -> None:
        self._sp_kernel = kernel
        self._sp_state: Mapping[Any, Any] = {}
        self._sp_ready = False  # no write-back while TorchRec builds the state
        super().__init__(
            config,
            _EngineAdapter(kernel),  # type: ignore[arg-type]
            pg,
            create_for_table=create_for_table,
            param_weight_for_table=param_weight_for_table,
        )
        self._sp_ready = True

    @property  # type: ignore[override]
    def state(self) -> Mapping[Any, Any]:
        if self._sp_ready:
            self._sp_kernel.flush()
        return self._sp_state

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        self._sp_state = value

    def post_load_state_dict(self) -> None:
        super().post_load_state_dict()
        self._sp_kernel.reload()


class ScratchPipeEmbeddingBag(BaseEmbedding, FusedOptimizerModule):
    """TorchRec embedding kernel backed by a ``ScratchPipeEmbeddingBags`` engine.

    Args:
        config: the tables (local shards) of this kernel on this rank.
        pg: process group of the sharding (for ShardedTensor state).
        device: scratchpad device.
        sharding_type: sharding of these tables (row-wise MEAN pools as SUM; TorchRec
            divides afterwards, as for ``fused``).

    Example::

        >>> # created by ScratchPipeGroupedPooledEmbeddingsLookup for customized_kernel
        >>> # groups; a pipeline reaches it through tsp.scratchpipe_kernels(model):
        >>> # kernel.prefetch(local_kjt)
    """

    def __init__(
        self,
        config: GroupedEmbeddingConfig,
        pg: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
        sharding_type: Optional[ShardingType] = None,
    ) -> None:
        super().__init__()
        # The shards' tensors are store views in host memory, whatever device the plan
        # names: their ShardedTensor metadata says so (``placement.py``).
        config = dataclasses.replace(config, embedding_tables=placed_tables(config.embedding_tables, STORE_DEVICE))
        self._config = config
        self._pg = pg
        self._sharding_type = sharding_type
        tables = config.embedding_tables
        self._names: List[str] = [t.name for t in tables]
        if len(set(self._names)) != len(self._names):
            raise ValueError(
                f"ScratchPipe kernel got several shards of one table on one rank ({self._names}); "
                "this happens with column-wise plans that put two column shards of a table on the "
                "same rank. Use table_wise/row_wise, or a column-wise plan with one shard per rank."
            )
        mode = pooling_type_to_pooling_mode(config.pooling, sharding_type)
        pooling = {PoolingMode.SUM: PoolingType.SUM, PoolingMode.MEAN: PoolingType.MEAN}.get(mode, PoolingType.NONE)
        # Engine feature keys are made unique per table (a feature may feed two tables).
        self._keys: List[str] = [f"{t.name}/{f}" for t in tables for f in t.feature_names]
        engine_tables = [
            _EngineTable(t.name, t.local_rows, t.local_cols, [f"{t.name}/{f}" for f in t.feature_names], pooling, t.data_type)
            for t in tables
        ]
        self._sp_config = engine_config(config.fused_params, str(self._names), data_type_to_sparse_type(config.data_type))
        self._device = device if device is not None else torch.device("cpu")
        try:
            # ShardedTensor local shards must be contiguous: one tensor per value, not packed rows
            self._engine = ScratchPipeEmbeddingBags(
                engine_tables, self._sp_config, self._device, packed_store=False, staging_rows=_staging_rows(config)
            )
        except ValueError as e:
            raise ValueError(f"ScratchPipe tables {self._names}: {e}") from e
        self._state_names: List[str] = state_names(self._sp_config.optimizer)
        # Stable views on the backing store (it is allocated once).
        weights = self._engine.table_weights()
        states = self._engine.optimizer_states()
        self._weights: List[torch.Tensor] = [weights[n] for n in self._names]
        self._states: List[Dict[str, torch.Tensor]] = [states[n] for n in self._names]
        if any(w.device != STORE_DEVICE for w in self._weights):
            raise RuntimeError(f"ScratchPipe tables {self._names}: the backing store is not on {STORE_DEVICE}.")
        self._optim = ScratchPipeFusedOptimizer(config, self, pg)
        self._params: Optional[Dict[str, TableBatchedEmbeddingSlice]] = None  # built once, on first use
        self._token: Optional[int] = None  # names the batch of the next forward (set by the lookup)

    # ------------------------------------------------------------------ compute
    @property
    def engine(self) -> ScratchPipeEmbeddingBags:
        """The engine (one scratchpad per (dim, pooling) group of these tables)."""
        return self._engine

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def table_names(self) -> List[str]:
        return list(self._names)

    def _engine_kjt(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if features.variable_stride_per_key():
            raise ValueError(f"ScratchPipe tables {self._names}: variable batch size per feature (VBE) is not supported.")
        return KeyedJaggedTensor(
            keys=self._keys,
            values=features.values(),
            weights=features.weights_or_none(),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def _context(self) -> str:
        rank = dist.get_rank(self._pg) if self._pg is not None and dist.is_initialized() else 0
        t0 = self._config.embedding_tables[0]
        kind = (
            "row_wise" if t0.local_rows != t0.num_embeddings
            else "column_wise" if t0.local_cols != t0.embedding_dim else "table_wise"
        )
        rows = {t.name: t.local_rows for t in self._config.embedding_tables}
        return f"rank {rank}, {kind} shard rows {rows} (CacheParams.load_factor={self._sp_config.load_factor})"

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CapacityError as e:
            raise CapacityError(
                f"ScratchPipe scratchpad too small on {self._context()}: {e} The scratchpad holds "
                "load_factor x the shard's rows: raise CacheParams.load_factor of these tables to "
                "at least (rows needed / shard rows), or lower the batch size."
            ) from e

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings ``[B, sum(local dims)]`` of the tables, in feature order
        (for ``EmbeddingCollection`` tables, unpooled: ``[ids, dim]`` in id order)."""
        kjt = self._engine_kjt(features)
        token, self._token = self._token, None
        return self._guard(lambda: self._engine.pooled(kjt, token))

    def expect(self, token: Optional[int]) -> None:
        """Name the batch of the next forward (a token from ``enqueue``)."""
        self._token = token

    def prepare(self, features: KeyedJaggedTensor) -> PreparedBatch:
        """Validate a future batch (this kernel's slice of a distributed input); nothing changes."""
        kjt = self._engine_kjt(features)
        return self._guard(lambda: self._engine.prepare(kjt))

    def enqueue(self, batch: PreparedBatch) -> int:
        """Queue a prepared batch; return its token."""
        return self._engine.enqueue(batch)

    def prefetch(self, features: KeyedJaggedTensor) -> int:
        """Announce a future batch (this kernel's slice of a distributed input); return its token."""
        return self.enqueue(self.prepare(features))

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Engine counters per scratchpad group, with the tables of each group."""
        out: Dict[str, Dict[str, Any]] = {}
        for name, d in self._engine.stats().items():
            group = self._engine.groups[name]
            out[name] = dict(d, tables=[t.name for t in group.tables], rows=group.store.num_rows)
        return out

    # ------------------------------------------------------------------ state
    def flush(self) -> None:
        """Write resident rows back, so the store views are up to date."""
        self._engine.flush()

    def purge(self) -> None:
        """Called by TorchRec before loading a state dict: drop the cached copies (updates
        not yet written back are flushed first; nothing is written over a load)."""
        self._engine.purge()

    def reload(self) -> None:
        """Reload resident rows from the store, after its views (weights or optimizer
        states) were written from outside (``engine.reload``: in place, nothing copied aside)."""
        self._engine.reload()

    def split_embedding_weights(self) -> List[torch.Tensor]:
        return list(self._weights)

    def split_optimizer_states(self) -> List[Dict[str, torch.Tensor]]:
        """Per table, its states in FBGEMM order (``[]`` for SGD, like TBE)."""
        if not self._state_names:
            return []
        return [{k: s[k] for k in self._state_names} for s in self._states]

    @property
    def fused_optimizer(self) -> ScratchPipeFusedOptimizer:
        return self._optim

    def state_dict(  # type: ignore[override]
        self,
        destination: Optional[Dict[str, Any]] = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> Dict[str, Any]:
        self.flush()
        return get_state_dict(self._config.embedding_tables, self._weights, self._pg, destination, prefix)

    def named_split_embedding_weights(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        for name, w in zip(self._names, self._weights):
            yield f"{prefix}{'.' if prefix else ''}{name}.weight", w

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters_by_table():
            yield f"{prefix}{'.' if prefix else ''}{name}.weight", param

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        yield from ()

    def named_parameters_by_table(self) -> Iterator[Tuple[str, TableBatchedEmbeddingSlice]]:
        """Per table, a parameter viewing its weights in the store (as ``fused`` yields),
        with its per-table fused optimizer. Built once: the store is allocated once and
        loads copy into it, so the views stay valid."""
        if self._params is None:
            params: Dict[str, TableBatchedEmbeddingSlice] = {}
            for name, w in zip(self._names, self._weights):
                param = TableBatchedEmbeddingSlice(w, 0, w.shape[0], -1, w.shape[1])
                param._in_backward_optimizers = [  # type: ignore[attr-defined]
                    ScratchPipeFusedOptimizer(self._config, self, self._pg, create_for_table=name, param_weight_for_table=param)
                ]
                params[name] = param
            self._params = params
        yield from self._params.items()
