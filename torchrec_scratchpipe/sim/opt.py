"""Belady's optimum at batch granularity: the lower bound on rows brought in.

Every distinct row of a batch must be resident while it trains (the model ScratchPipe and
LRU obey). On a miss, evict the resident rows, not used by the current batch, whose next
use is farthest (never used again counts as farthest). By the usual exchange argument this
greedy rule brings in the fewest rows of any policy that keeps each batch resident; ties
do not change the count. (A cache that may *bypass* rows, like FBGEMM's set-associative
cache on a failed insert, is outside that model and can in rare cases move fewer rows.)
"""

from __future__ import annotations

import time

import torch

from torchrec_scratchpipe.sim._progress import steps
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.slots import KeyedSlots
from torchrec_scratchpipe.sim.stream import BatchStream, next_uses


def simulate_opt(stream: BatchStream, capacity: int, progress: bool = False) -> SimResult:
    """Replay ``stream`` with Belady's farthest-next-use eviction.

    Args:
        stream: the batches.
        capacity: cache slots.
        progress: show a tqdm bar.

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0])], 3)
        >>> simulate_opt(s, 2).total_misses   # evicts row 1 (never used again), keeps 0
        3
    """
    t0 = time.perf_counter()
    n = stream.num_steps
    nxt = next_uses(stream)
    # Key = -next use: the smallest key (farthest next use) goes first; empty slots before all.
    cache = KeyedSlots(stream.num_rows, capacity, empty_key=-(n + 1))
    misses = torch.zeros(n, dtype=torch.int64)
    evictions = torch.zeros(n, dtype=torch.int64)
    for s in steps(n, "opt", progress):
        misses[s], evictions[s] = cache.access(stream.rows[s], -nxt[s])
    return SimResult("opt", capacity, misses, evictions, torch.zeros_like(misses), stream.unique_per_step(),
                     stream.lookups, time.perf_counter() - t0)
