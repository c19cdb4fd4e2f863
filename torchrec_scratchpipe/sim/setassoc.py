"""FBGEMM-style set-associative LRU / LFU cache, with or without one-batch prefetch + locking.

Semantics modelled (FBGEMM 1.x ``lru_cache_populate`` / ``lfu_cache_populate``):

- Geometry: ``S = max(1, capacity // ways)`` sets of ``ways`` (32 on NVIDIA) slots; a row
  (linearized: table offset + row) goes to set ``fmix64(row) mod S``, where ``fmix64`` is
  MurmurHash3's 64-bit finalizer, the hash FBGEMM's ``cache_slot`` uses.
- A batch's distinct rows are looked up. Hits are refreshed (LRU: timestamp := now).
  LFU: every row's counter grows by its occurrences in the batch (FBGEMM's ``lfu_state``
  counts all rows, cached or not), before lookup.
- Misses of one set are inserted in order (LRU: ascending row; LFU: descending counter,
  then ascending row) into that set's ways sorted by cost (LRU: timestamp, empty = 0;
  LFU: counter of the resident row, empty = -1; ties by way index).
- LRU, exactly as the kernel loops: positions ``l < min(misses in set, ways)`` of the sorted
  ways are visited; a locked way is skipped (and still uses up its position), a way used
  by the current batch ends the set; every other way takes the next missed row.
- LFU: ways used by the current batch (and locked ways) are never victims [FBGEMM's LFU
  kernel does not check this: it may evict a row of the current batch, which is then read
  from host memory]. Missed row ``k`` goes to the ``k``-th cheapest remaining way if that
  way's counter is not above the row's counter (FBGEMM's admission test); else it and the
  rest of the set stay out.
- A missed row that is not inserted is a failed insert (FBGEMM's conflict miss,
  location -1): it is served from host memory; it counts as a miss (a row moved) and as
  ``bypassed``, and does not become resident.
- Prefetch + locking (TorchRec's ``PrefetchTrainPipelineSparseDist``): batch ``t+1`` is
  inserted while batch ``t`` trains, and the ways batch ``t`` uses (its hits and inserts)
  are locked. In step order this is the same insert loop with batch ``t``'s ways locked
  while batch ``t+1`` is inserted. (FBGEMM allows ``prefetch_pipeline`` with LRU only; the
  LFU variant is modelled for comparison.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Tuple

import torch

from torchrec_scratchpipe.sim._progress import steps
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.stream import BatchStream

_M1 = 0xFF51AFD7ED558CCD - (1 << 64)  # MurmurHash3 fmix64 constants as signed int64
_M2 = 0xC4CEB9FE1A85EC53 - (1 << 64)


def _shr(h: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits."""
    return (h >> k) & ((1 << (64 - k)) - 1)


def cache_set(rows: torch.Tensor, num_sets: int) -> torch.Tensor:
    """``fmix64(row) mod num_sets`` with unsigned 64-bit arithmetic (FBGEMM's ``cache_slot``).

    Example::

        >>> cache_set(torch.tensor([0, 1, 2]), 7).tolist()
        [0, 0, 5]
    """
    h = rows.to(torch.int64)
    h = h ^ _shr(h, 33)
    h = h * _M1  # int64 multiplication wraps mod 2**64, like uint64
    h = h ^ _shr(h, 33)
    h = h * _M2
    h = h ^ _shr(h, 33)
    # unsigned h mod S == ((h >>> 1) mod S * 2 + (h & 1)) mod S
    return (torch.remainder(_shr(h, 1), num_sets) * 2 + (h & 1)) % num_sets


@dataclass
class SetAssocConfig:
    """Set-associative cache settings.

    Args:
        ways: slots per set (FBGEMM: 32 on NVIDIA, 64 on AMD).
        algorithm: ``"lru"`` or ``"lfu"``.
        prefetch: insert batch t+1 while batch t is locked (one-batch prefetch pipeline).
    """

    ways: int = 32
    algorithm: str = "lru"
    prefetch: bool = False

    def name(self) -> str:
        """Policy name, e.g. ``set_lru_prefetch``."""
        return f"set_{self.algorithm}" + ("_prefetch" if self.prefetch else "")


class SetAssocCache:
    """State of one set-associative cache; :meth:`step` inserts one batch.

    Args:
        num_rows: size of the linearized row space.
        capacity: requested slots; the cache has ``max(1, capacity // ways)`` sets.
        config: geometry and policy.

    Example::

        >>> c = SetAssocCache(100, 64, SetAssocConfig(ways=32))
        >>> c.step(torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]))
        (3, 0, 0)
        >>> c.step(torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]))
        (0, 0, 0)
    """

    def __init__(self, num_rows: int, capacity: int, config: SetAssocConfig) -> None:
        if config.algorithm not in ("lru", "lfu"):
            raise ValueError(f"algorithm must be 'lru' or 'lfu', got {config.algorithm!r}")
        self.cfg = config
        w = config.ways
        self.num_sets = max(1, capacity // w)
        self.capacity = self.num_sets * w
        self.tags = torch.full((self.capacity,), -1, dtype=torch.int64)  # way -> row
        self.stamp = torch.zeros(self.capacity, dtype=torch.int64)  # LRU timestamps (0 = never)
        self.locked = torch.zeros(self.capacity, dtype=torch.bool)
        self.row_way = torch.full((num_rows,), -1, dtype=torch.int64)
        self.freq = torch.zeros(num_rows if config.algorithm == "lfu" else 0, dtype=torch.int64)
        self.time = 0
        self._way = torch.arange(w, dtype=torch.int64)

    def step(self, rows: torch.Tensor, counts: torch.Tensor) -> Tuple[int, int, int]:
        """Look up and insert one batch's distinct sorted ``rows`` (``counts``: occurrences).

        Returns:
            ``(misses, evictions, bypassed)`` of this batch.
        """
        self.time += 1
        lfu = self.cfg.algorithm == "lfu"
        if lfu:
            self.freq.index_add_(0, rows, counts)
        loc = self.row_way.index_select(0, rows)
        hit = loc >= 0
        hit_ways = loc[hit]
        if not lfu:
            self.stamp.index_fill_(0, hit_ways, self.time)
        protected = self.locked.clone() if self.cfg.prefetch else torch.zeros_like(self.locked)
        protected.index_fill_(0, hit_ways, True)
        miss_rows = rows[~hit]
        m = miss_rows.numel()
        evicted = bypassed = 0
        new_ways = hit_ways.new_empty(0)
        if m:
            new_ways, miss_rows, evicted = self._insert(miss_rows, protected, lfu)
            bypassed = m - new_ways.numel()
        if self.cfg.prefetch:
            self.locked.zero_()
            self.locked.index_fill_(0, hit_ways, True)
            self.locked.index_fill_(0, new_ways, True)
        return m, evicted, bypassed

    def _insert(
        self, miss_rows: torch.Tensor, protected: torch.Tensor, lfu: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Insert one batch's missed rows; returns (ways filled, rows placed, evictions)."""
        w = self.cfg.ways
        sets = cache_set(miss_rows, self.num_sets)
        if lfu:  # within a set: highest counter first, then ascending row (rows arrive sorted)
            cost = self.freq.index_select(0, miss_rows)
            order = torch.argsort(-cost, stable=True)
            order = order[torch.argsort(sets[order], stable=True)]
        else:
            order = torch.argsort(sets, stable=True)
        miss_rows, sets = miss_rows[order], sets[order]
        uniq, inverse, per_set = torch.unique_consecutive(sets, return_inverse=True, return_counts=True)
        rank = torch.arange(sets.numel()) - (torch.cumsum(per_set, 0) - per_set)[inverse]
        ways = uniq.unsqueeze(1) * w + self._way  # [G, W] flat way ids of each missed set
        if lfu:
            resident = self.tags[ways]
            wcost = torch.where(resident >= 0, self.freq[resident.clamp(min=0)], torch.full_like(resident, -1))
        else:
            wcost = self.stamp[ways]
        wcost, perm = torch.sort(wcost, dim=1, stable=True)
        ways = ways.gather(1, perm)
        usable = ~protected[ways]
        if not lfu:  # the kernel visits positions l < min(SL, ways) only
            usable &= self._way < per_set.clamp(max=w).unsqueeze(1)
        pack = torch.argsort((~usable).to(torch.int8), dim=1, stable=True)  # usable ways first
        ways, wcost = ways.gather(1, pack), wcost.gather(1, pack)
        n_usable = usable.sum(1)
        k = rank.clamp(max=w - 1)
        ok = rank < n_usable[inverse]
        if lfu:
            ok &= wcost[inverse, k] <= self.freq.index_select(0, miss_rows)
        dest = ways[inverse[ok], k[ok]]
        incoming = miss_rows[ok]
        old = self.tags.index_select(0, dest)
        full = old >= 0
        self.row_way.index_fill_(0, old[full], -1)
        self.row_way.index_copy_(0, incoming, dest)
        self.tags.index_copy_(0, dest, incoming)
        if not lfu:
            self.stamp.index_fill_(0, dest, self.time)
        return dest, incoming, int(full.sum())


def simulate_set_assoc(
    stream: BatchStream, capacity: int, config: SetAssocConfig = SetAssocConfig(), progress: bool = False
) -> SimResult:
    """Replay ``stream`` through an FBGEMM-style set-associative cache.

    Args:
        stream: the batches.
        capacity: requested slots (rounded down to whole sets of ``config.ways``).
        config: ways, LRU/LFU and prefetch.
        progress: show a tqdm bar.

    Example::

        >>> s = BatchStream.from_flat([torch.arange(8), torch.arange(8)], 100)
        >>> r = simulate_set_assoc(s, 4, SetAssocConfig(ways=2))
        >>> r.total_misses == 8 + r.bypassed[0].item()   # 2nd batch hits only what fit
        True
    """
    t0 = time.perf_counter()
    n = stream.num_steps
    cache = SetAssocCache(stream.num_rows, capacity, config)
    misses = torch.zeros(n, dtype=torch.int64)
    evictions = torch.zeros(n, dtype=torch.int64)
    bypassed = torch.zeros(n, dtype=torch.int64)
    for s in steps(n, config.name(), progress):
        misses[s], evictions[s], bypassed[s] = cache.step(stream.rows[s], stream.counts[s])
    return SimResult(config.name(), cache.capacity, misses, evictions, bypassed, stream.unique_per_step(),
                     stream.lookups, time.perf_counter() - t0, {"ways": config.ways, "sets": cache.num_sets})
