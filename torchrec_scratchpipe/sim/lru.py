"""Fully associative LRU at batch granularity.

All distinct rows of a batch are looked up together and must be resident together.
Misses evict the least recently used rows not used by the current batch; rows last used
by the same batch are evicted in ascending row order (a fixed tie-break, so the result is
exactly reproducible by ``reference_lru`` in ``tests/sim_reference.py``).
"""

from __future__ import annotations

import time

import torch

from torchrec_scratchpipe.sim._progress import steps
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.slots import KeyedSlots
from torchrec_scratchpipe.sim.stream import BatchStream


def simulate_lru(stream: BatchStream, capacity: int, progress: bool = False) -> SimResult:
    """Replay ``stream`` through a fully associative LRU cache of ``capacity`` rows.

    Args:
        stream: the batches.
        capacity: cache slots.
        progress: show a tqdm bar.

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0])], 3)
        >>> simulate_lru(s, 2).misses.tolist()   # step 1 evicts row 0 (tie with 1, lower id)
        [2, 1, 1]
    """
    t0 = time.perf_counter()
    n = stream.num_steps
    cache = KeyedSlots(stream.num_rows, capacity, empty_key=-1)
    misses = torch.zeros(n, dtype=torch.int64)
    evictions = torch.zeros(n, dtype=torch.int64)
    for s in steps(n, "lru", progress):
        rows = stream.rows[s]
        misses[s], evictions[s] = cache.access(rows, rows + s * stream.num_rows)
    return SimResult("lru", capacity, misses, evictions, torch.zeros_like(misses), stream.unique_per_step(),
                     stream.lookups, time.perf_counter() - t0)
