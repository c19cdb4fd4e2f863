"""A fully associative cache of C slots whose victims are the smallest-keyed slots.

Fully associative LRU (key: last use) and Belady's optimum (key: minus next use) are both
this cache with a different key. Work per batch is a handful of tensor ops over the
batch's distinct rows plus one ``topk`` over the C slot keys; no Python loop per id.
"""

from __future__ import annotations

from typing import Tuple

import torch

from torchrec_scratchpipe.core.plan import CapacityError

_PROTECTED = torch.iinfo(torch.int64).max


class KeyedSlots:
    """Row -> slot map with one int64 key per slot; evicts the smallest keys first.

    The rows of the batch being served are never victims (batch granularity: all rows
    of a batch are resident together). Empty slots carry ``empty_key`` (use a value below
    every real key so they fill first).

    Args:
        num_rows: size of the row space.
        capacity: number of slots C.
        empty_key: key of an empty slot.

    Example::

        >>> c = KeyedSlots(num_rows=10, capacity=2, empty_key=-1)
        >>> c.access(torch.tensor([1, 2]), torch.tensor([5, 6]))
        (2, 0)
        >>> c.access(torch.tensor([3]), torch.tensor([7]))  # evicts row 1 (key 5)
        (1, 1)
        >>> c.resident_rows().tolist()
        [2, 3]
    """

    def __init__(self, num_rows: int, capacity: int, empty_key: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.row_slot = torch.full((num_rows,), -1, dtype=torch.int64)
        self.slot_row = torch.full((capacity,), -1, dtype=torch.int64)
        self.slot_key = torch.full((capacity,), empty_key, dtype=torch.int64)

    def resident_rows(self) -> torch.Tensor:
        """Sorted rows now resident."""
        r = self.slot_row[self.slot_row >= 0]
        return torch.sort(r).values

    def access(self, rows: torch.Tensor, keys: torch.Tensor) -> Tuple[int, int]:
        """Make the distinct ``rows`` resident and set their keys to ``keys``.

        Returns:
            ``(misses, evictions)`` of this batch.

        Raises:
            CapacityError: the batch has more distinct rows than the cache has slots.
        """
        if rows.numel() > self.capacity:
            raise CapacityError(f"a batch needs {rows.numel()} distinct rows but the cache has {self.capacity} slots")
        slots = self.row_slot.index_select(0, rows)
        miss = slots < 0
        miss_rows = rows[miss]
        m = miss_rows.numel()
        evicted = 0
        if m:
            key = self.slot_key.clone()
            key.index_fill_(0, slots[~miss], _PROTECTED)
            victims = torch.topk(key, m, largest=False, sorted=False).indices
            old = self.slot_row.index_select(0, victims)
            full = old >= 0
            evicted = int(full.sum())
            self.row_slot.index_fill_(0, old[full], -1)
            self.row_slot.index_copy_(0, miss_rows, victims)
            self.slot_row.index_copy_(0, victims, miss_rows)
            slots.masked_scatter_(miss, victims)
        self.slot_key.index_copy_(0, slots, keys)
        return m, evicted
