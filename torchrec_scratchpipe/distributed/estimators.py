"""Planner estimators for the ScratchPipe kernel (storage and perf).

Storage of one ScratchPipe shard (``r`` rows, ``d`` columns, ``C = ceil(lf * r)`` slots,
``row = d * element_size + optimizer state bytes per row``):

- device memory (HBM on CUDA): the scratchpad ``C * row`` (weights and optimizer state
  of its slots), staging buffers ``2 * (L + 1) * min(C, ids per batch) * row`` (rows
  coming in and victims going out for the L+1 batches in the window), and the
  input/output buffers TorchRec counts for every kernel;
- host memory (DDR): the backing store ``r * row`` and the planner's maps
  (``SlotPlanner.host_bytes``: ``8 r`` for the row -> slot map and de-duplication
  scratch, about ``36 C`` for the slot -> row map, last uses and the recency queue),
  plus on CUDA the mover's two rings of pinned staging buffers, one each way
  (``staging_host_bytes``: buffers of ``min(C, 16 MiB / (row + 8))`` rows, each rounded up
  to a power of two, twice as many per ring as the rows a step is expected to move
  need, at least 2).
- with a file store (``ScratchPipeConfig.store``, ``core/file_store.py``) the backing
  store's host part is its cache, ``min(r, host_cache_bytes / row)`` rows, and its row ->
  cache-slot map (``FileStore.host_bytes``); the file, ``r * row`` plus its header, is
  counted as ``ssd`` storage (``FileStore.file_bytes``).

On a CPU topology both live in DDR. Perf: the scratchpad trains at device-memory
bandwidth, so forward/backward/comms are TorchRec's estimate for ``fused`` (as TorchRec
does for ``fused_uvm_caching`` with a prefetch pipeline); moving missed rows in is a
``prefetch_compute`` term at host-to-device bandwidth. The rows moved per batch are, as
TorchRec prices ``fused_uvm_caching``, ``stats.expected_miss_rate(load_factor) x
stats.expected_lookups`` when the table's ``CacheParams.stats`` is given (e.g. measured by
``torchrec_scratchpipe.advise``), else ``(1 - load_factor)`` x the batch's ids.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    SharderDataMap,
    ShardEstimator,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import PipelineType, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS

from torchrec_scratchpipe.core.capacity import slots_for_rows
from torchrec_scratchpipe.compat import (
    BIGINT_DTYPE,
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
    calculate_pipeline_io_cost,
    calculate_shard_io_sizes,
    get_num_poolings,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.file_store import FileStore
from torchrec_scratchpipe.core.layout import TBE_DEFAULT_OPTIMIZER, RowLayout
from torchrec_scratchpipe.core.plan import SlotPlanner
from torchrec_scratchpipe.core.staging import staging_host_bytes
from torchrec_scratchpipe.defaults import LIBRARY_LOAD_FACTOR
from torchrec_scratchpipe.distributed.types import SCRATCHPIPE


def row_layout_of(so: ShardingOption, optimizer: EmbOptimType, cols: int) -> RowLayout:
    """The row layout of a shard of ``cols`` columns of ``so`` (its dtype, the table's optimizer)."""
    return RowLayout(optimizer, cols, so.tensor.dtype)


def load_factor_of(so: ShardingOption) -> float:
    lf = so.cache_load_factor
    return LIBRARY_LOAD_FACTOR if lf is None else min(float(lf), 1.0)


def batch_sizes_of(so: ShardingOption, constraints: Optional[Dict[str, ParameterConstraints]]) -> List[int]:
    c = constraints.get(so.name) if constraints else None
    return list(c.batch_sizes) if c is not None and c.batch_sizes else [so.batch_size] * so.num_inputs


def ids_per_batch(
    so: ShardingOption,
    shard_rows: int,
    world_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> float:
    """Expected ids one global batch sends to a shard (each rank's batch is ``batch_size``)."""
    per_rank = sum(b * length for b, length in zip(batch_sizes_of(so, constraints), so.input_lengths))
    ids = per_rank * world_size
    if so.sharding_type == ShardingType.ROW_WISE.value:
        ids *= shard_rows / max(1, so.tensor.shape[0])
    return ids


def rows_moved_per_batch(
    so: ShardingOption,
    shard_rows: int,
    world_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> float:
    """Expected rows one global batch moves into a shard of ``shard_rows`` rows.

    With ``CacheParams.stats`` (TorchRec's ``CacheStatistics``): its miss rate at the
    table's load factor times its distinct rows per global batch (``expected_lookups``;
    a row-wise shard gets its share of them), as TorchRec's estimator prices
    ``fused_uvm_caching``. Without: ``1 - load_factor`` of the batch's ids.
    """
    lf = load_factor_of(so)
    stats = so.cache_params.stats if so.cache_params is not None else None
    if stats is not None:
        lookups = float(stats.expected_lookups)
        if so.sharding_type == ShardingType.ROW_WISE.value:
            lookups *= shard_rows / max(1, so.tensor.shape[0])
        return float(stats.expected_miss_rate(lf)) * min(shard_rows, lookups)
    return (1.0 - lf) * min(shard_rows, ids_per_batch(so, shard_rows, world_size, constraints))


def slots_of(so: ShardingOption, shard_rows: int) -> int:
    """Scratchpad slots of one shard: ``ceil(load_factor * rows)``, at least 1."""
    return slots_for_rows(shard_rows, load_factor_of(so))


class ScratchPipeStorageEstimator(ShardEstimator):
    """TorchRec's storage estimator, with ScratchPipe options costed as described above.

    Args:
        topology: device topology.
        constraints: parameter constraints.
        pipeline_type: as for ``EmbeddingStorageEstimator``.
        config: ScratchPipe options (the lookahead sizes the staging buffers).

    Attributes:
        optimizers: EmbOptimType per table name (set by the planner, not a constructor
            argument).
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        pipeline_type: PipelineType = PipelineType.NONE,
        config: Optional[ScratchPipeConfig] = None,
    ) -> None:
        self._topology = topology
        self._constraints = constraints
        self._pipeline_type = pipeline_type
        self._inner = EmbeddingStorageEstimator(topology, constraints, pipeline_type=pipeline_type)
        self.config: Optional[ScratchPipeConfig] = config
        self.optimizers: Dict[str, EmbOptimType] = {}

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: SharderDataMap) -> None:
        self._inner.estimate(
            [so for so in sharding_options if so.compute_kernel != SCRATCHPIPE], sharder_data_map
        )
        for so in sharding_options:
            if so.compute_kernel == SCRATCHPIPE:
                for shard, storage in zip(so.shards, self.shard_storages(so)):
                    shard.storage = storage

    def breakdown(self, so: ShardingOption) -> List[Dict[str, int]]:
        """Per shard of a ScratchPipe option: rows, slots and the bytes of each part."""
        topo = self._topology
        optimizer = self.optimizers.get(so.name, TBE_DEFAULT_OPTIMIZER)
        lookahead = (self.config if self.config is not None else ScratchPipeConfig()).lookahead  # the kernel's L
        out_size = DATA_TYPE_NUM_BITS[so.output_dtype] / 8 if so.output_dtype else so.tensor.element_size()
        input_sizes, output_sizes = calculate_shard_io_sizes(
            sharding_type=so.sharding_type,
            batch_sizes=batch_sizes_of(so, self._constraints),
            world_size=topo.world_size,
            local_world_size=topo.intra_group_size,
            input_lengths=so.input_lengths,
            emb_dim=so.tensor.shape[1],
            shard_sizes=[s.size for s in so.shards],
            input_data_type_size=BIGINT_DTYPE,
            output_data_type_size=out_size,
            num_poolings=get_num_poolings(self._constraints, so),
            is_pooled=so.is_pooled,
        )
        on_device = topo.compute_device in {"cuda", "mtia"}
        store = self.config.store if self.config is not None else None
        on_file = store is not None and store.kind == "file"
        if on_file:
            assert store is not None
            store.check_directory()  # a missing or read-only directory is refused at plan time
        parts = []
        for shard, in_size, out_sz in zip(so.shards, input_sizes, output_sizes):
            rows, cols = shard.size[0], shard.size[1]
            row = row_layout_of(so, optimizer, cols).bytes_per_row
            slots = slots_of(so, rows)
            staged = min(slots, math.ceil(ids_per_batch(so, rows, topo.world_size, self._constraints)))
            layout = row_layout_of(so, optimizer, cols)
            store_bytes = rows * row
            file_bytes = 0
            if on_file:
                assert store is not None
                store_bytes = FileStore.host_bytes(rows, row, int(store.host_cache_bytes or 0))
                file_bytes = FileStore.file_bytes(rows, layout, packed=False)  # the kernel's store is unpacked
            per_step = min(slots, math.ceil(rows_moved_per_batch(so, rows, topo.world_size, self._constraints)))
            parts.append(
                {
                    "rows": rows,
                    "slots": slots,
                    "row_bytes": row,
                    "scratchpad_bytes": slots * row,
                    "staging_bytes": 2 * (lookahead + 1) * staged * row,
                    "store_bytes": store_bytes,
                    "file_bytes": file_bytes,
                    "planner_bytes": SlotPlanner.host_bytes(rows, slots),
                    "backing_store_bytes": store_bytes + SlotPlanner.host_bytes(rows, slots),
                    "rows_per_step": per_step,
                    "host_staging_bytes": staging_host_bytes(slots, row, per_step) if on_device else 0,
                    "input_bytes": int(in_size),
                    "output_bytes": int(out_sz),
                }
            )
        return parts

    def shard_storages(self, so: ShardingOption) -> List[Storage]:
        """Storage of each shard of a ScratchPipe sharding option."""
        on_device = self._topology.compute_device in {"cuda", "mtia"}
        storages = []
        for p in self.breakdown(so):
            device = p["scratchpad_bytes"] + p["staging_bytes"]
            if on_device:
                io = calculate_pipeline_io_cost(p["input_bytes"], p["output_bytes"], p["input_bytes"], self._pipeline_type, None)
                storages.append(
                    Storage(hbm=device + io, ddr=p["backing_store_bytes"] + p["host_staging_bytes"], ssd=p["file_bytes"])
                )
            else:
                storages.append(Storage(
                    hbm=0, ddr=device + p["backing_store_bytes"] + p["input_bytes"] + p["output_bytes"], ssd=p["file_bytes"]
                ))
        return storages


class ScratchPipePerfEstimator(ShardEstimator):
    """TorchRec's perf estimator; ScratchPipe shards are rated as ``fused`` (device-memory
    bandwidth) plus a prefetch term for the rows moved in.

    Args:
        topology: device topology.
        constraints: parameter constraints.
        is_inference: as for ``EmbeddingPerfEstimator``.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        is_inference: bool = False,
    ) -> None:
        self._topology = topology
        self._constraints = constraints
        self._inner = EmbeddingPerfEstimator(topology, constraints, is_inference)
        self.optimizers: Dict[str, EmbOptimType] = {}

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: SharderDataMap) -> None:
        sp = [so for so in sharding_options if so.compute_kernel == SCRATCHPIPE]
        for so in sp:  # rated as the kernel it trains like; restored right after
            so.compute_kernel = EmbeddingComputeKernel.FUSED.value
        try:
            self._inner.estimate(sharding_options, sharder_data_map)
        finally:
            for so in sp:
                so.compute_kernel = SCRATCHPIPE
        topo = self._topology
        bw = topo.hbm_to_ddr_mem_bw if topo.compute_device in {"cuda", "mtia"} else topo.ddr_mem_bw
        for so in sp:
            optimizer = self.optimizers.get(so.name, TBE_DEFAULT_OPTIMIZER)
            for shard in so.shards:
                rows, cols = shard.size[0], shard.size[1]
                row = row_layout_of(so, optimizer, cols).bytes_per_row
                moved = rows_moved_per_batch(so, rows, topo.world_size, self._constraints)
                if shard.perf is not None:
                    # in and out (victims), both ways over the host link
                    shard.perf = replace(shard.perf, prefetch_compute=2 * moved * row / bw)
