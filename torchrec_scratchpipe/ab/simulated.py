"""The UVM-caching arm on a machine without CUDA: FBGEMM's cache, simulated.

FBGEMM's ``fused_uvm_caching`` needs CUDA. Without it, the A/B tool replays the exact id
stream the other arms train on through the simulator's FBGEMM-style cache (32-way
set-associative LRU, one-batch prefetch with locking) at the same device budget, and the
report labels the arm as simulated: traffic and misses only, no timing.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torchrec.datasets.utils import Batch

from torchrec_scratchpipe.ab.arms import ArmResult
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.sim.setassoc import SetAssocConfig, simulate_set_assoc
from torchrec_scratchpipe.sim.stream import BatchStream

SIMULATED_UVM_LABEL = "fused_uvm_caching (simulated)"


def id_stream(batches: Sequence[Batch], table_sizes: List[int], feature_names: List[str]) -> BatchStream:
    """The batches' ids as the simulator's stream (one flattened row space)."""
    steps = ([b.sparse_features[f].values() for f in feature_names] for b in batches)
    return BatchStream.from_table_ids(steps, table_sizes, feature_names, name="ab")


def uvm_row_bytes(layout: RowLayout) -> Tuple[int, int]:
    """(bytes one cached row moves, bytes FBGEMM keeps on the device for every row) of
    ``fused_uvm_caching``: its cache moves the weights only (in the table's dtype); row-wise
    optimizer state lives in device memory for every row, other state stays in UVM."""
    resident = sum(v.nbytes for v in layout.values[1:] if v.shape == ())
    return layout.weight_bytes, resident


def simulate_uvm_arm(
    batches: Sequence[Batch],
    table_sizes: List[int],
    feature_names: List[str],
    load_factor: float,
    layout: RowLayout,
) -> ArmResult:
    """Misses and rows (and bytes) moved of FBGEMM's LRU cache with prefetch on the same stream.

    Args:
        batches: the A/B data.
        table_sizes: rows per table.
        feature_names: features in table order.
        load_factor: cache rows as a fraction of all rows (FBGEMM's ``cache_load_factor``).
        layout: the tables' row layout (weight dtype and optimizer), priced by ``uvm_row_bytes``.
    """
    stream = id_stream(batches, table_sizes, feature_names)
    capacity = max(32, int(load_factor * stream.num_rows))
    sim = simulate_set_assoc(stream, capacity, SetAssocConfig(ways=32, algorithm="lru", prefetch=True))
    row_bytes, resident = uvm_row_bytes(layout)
    result = ArmResult(SIMULATED_UVM_LABEL, simulated=True, row_bytes=row_bytes)
    result.h2d_rows = [int(x) for x in sim.misses]
    result.d2h_rows = [int(x) for x in sim.evictions]
    result.h2d_bytes = [n * row_bytes for n in result.h2d_rows]
    result.d2h_bytes = [n * row_bytes for n in result.d2h_rows]
    result.lookups = stream.lookups
    result.unique_rows = int(stream.unique_per_step().sum())
    result.misses = sim.total_misses
    result.device_bytes = sim.capacity * row_bytes + resident * stream.num_rows
    return result
