"""Slots in order of last use: the planner's victim order without scanning every slot.

Each plan appends its batch's slots, stamped with the batch's step, at the tail. Steps
only grow, so the queue is sorted by stamp. An entry is *live* while its slot's last use
still equals its stamp; a slot used again later leaves a stale entry behind, which scans
skip and compaction drops. Every slot has exactly one live entry, so walking the live
entries from the head visits slots from least to most recently used, and the slots not
held by an in-flight batch (last use older than the oldest unreleased step) form a prefix.

The native planner also keeps ``RankedSlots``: unheld slots whose rows are needed within
the horizon, taken out of the queue and bucketed by next-use step, so that each plan
ranks only the slots released since the previous one.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch


class RecencyQueue:
    """FIFO of ``(slot, stamp)`` entries over ``capacity`` slots, kept in int32.

    Args:
        capacity: number of slots. All start live with stamp -1 (never used), in slot order.
        device: where the entries live (the planner's device).
        buffer: entries the buffer holds (at least ``2 * capacity``; default
            ``3 * capacity + 1024``). When an append does not fit, the entries are moved
            to the front, dropping stale ones if that alone would not make room.

    Example::

        >>> q = RecencyQueue(3)
        >>> last_use = torch.tensor([-1, -1, -1], dtype=torch.int32)
        >>> last_use[1] = 0
        >>> q.append(torch.tensor([1], dtype=torch.int32), step=0, last_use=last_use)
        >>> [s.tolist() for _, s in q.chunks(last_use, 8)]  # live entries, oldest first
        [[0, 2, 1]]
    """

    def __init__(self, capacity: int, device: Optional[torch.device] = None, buffer: Optional[int] = None) -> None:
        dev = device or torch.device("cpu")
        self.capacity = capacity
        size = self.entries(capacity) if buffer is None else buffer
        if size < 2 * capacity:  # live entries <= capacity, one append <= capacity
            raise ValueError(f"buffer ({size}) must hold at least 2 * capacity ({2 * capacity}) entries.")
        self.slots = torch.empty(size, dtype=torch.int32, device=dev)
        self.stamps = torch.empty(size, dtype=torch.int32, device=dev)
        self.slots[:capacity] = torch.arange(capacity, dtype=torch.int32, device=dev)
        self.stamps[:capacity] = -1
        self.head, self.tail = 0, capacity

    @staticmethod
    def entries(capacity: int) -> int:
        """Default buffer size: live entries (<= capacity) plus one append (<= capacity), with room to spare."""
        return 3 * capacity + 1024

    def __len__(self) -> int:
        """Entries between head and tail, stale ones included."""
        return self.tail - self.head

    def append(self, slots: torch.Tensor, step: int, last_use: torch.Tensor) -> None:
        """Add a planned batch's distinct ``slots`` (int32), all last used at ``step``.

        Args:
            slots: distinct slots of the batch.
            step: its step (not smaller than any earlier append).
            last_use: the planner's per-slot last use (decides which entries are stale
                when the buffer is full).
        """
        n = slots.numel()
        if self.tail + n > self.slots.numel():
            if len(self) + 2 * n <= self.slots.numel():
                self._shift()  # cheap: a copy, no liveness check
            else:
                self.compact(last_use)
        self.slots[self.tail : self.tail + n] = slots
        self.stamps[self.tail : self.tail + n] = step
        self.tail += n

    def compact(self, last_use: torch.Tensor) -> None:
        """Drop stale entries and move the live ones, in order, to the front."""
        slots, stamps = self.slots[self.head : self.tail], self.stamps[self.head : self.tail]
        live = (last_use.index_select(0, slots) == stamps).nonzero().squeeze(1)
        n = live.numel()
        self.slots[:n], self.stamps[:n] = slots.index_select(0, live), stamps.index_select(0, live)
        self.head, self.tail = 0, n

    def _shift(self) -> None:
        """Move the entries between head and tail to the front of the buffer."""
        n = len(self)
        self.slots[:n] = self.slots[self.head : self.tail].clone()
        self.stamps[:n] = self.stamps[self.head : self.tail].clone()
        self.head, self.tail = 0, n

    def chunks(
        self, last_use: torch.Tensor, size: int, before: Optional[int] = None
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Live entries from the head, oldest first, ``size`` entries scanned at a time.

        Args:
            last_use: the planner's per-slot last use (decides liveness).
            size: entries scanned per chunk.
            before: only entries with stamp < ``before`` (the unheld prefix).

        Yields:
            ``(positions, slots)``: queue positions and slots (int64) of the chunk's
            live entries.
        """
        pos = self.head
        while pos < self.tail:
            stop = min(self.tail, pos + size)
            slots, stamps = self.slots[pos:stop], self.stamps[pos:stop]
            ok = last_use.index_select(0, slots) == stamps
            last = stop == self.tail
            if before is not None and int(stamps[-1]) >= before:
                ok &= stamps < before
                last = True
            idx = ok.nonzero().squeeze(1)
            yield idx + pos, slots.index_select(0, idx).long()
            if last:
                return
            pos = stop

    def advance(self, position: int) -> None:
        """Forget every entry before ``position`` (all stale, or victims about to become so)."""
        self.head = max(self.head, min(position, self.tail))

    def prepend(self, slots: torch.Tensor, last_use: torch.Tensor) -> None:
        """Put live ``slots`` (int64, oldest first, all used before any queued slot) at the head."""
        self.compact(last_use)
        k, n = slots.numel(), self.tail
        self.slots[k : k + n] = self.slots[:n].clone()
        self.stamps[k : k + n] = self.stamps[:n].clone()
        self.slots[:k] = slots
        self.stamps[:k] = last_use.index_select(0, slots)
        self.tail = k + n


class RankedSlots:
    """Unheld slots whose rows are needed within the horizon, bucketed by next-use step.

    The state of the native planner's incremental ranking (``csrc/planner.cpp`` reads and
    writes it). Bucket ``k mod (limit + 1)`` is a FIFO, linked through ``link``, of the
    slots whose rows batch ``k`` needs next, in recency order; the plan of step ``k``
    hits all of them and drops the bucket. ``ends`` holds, per bucket, its first and last
    slot, its step and its size; ``seq`` when each slot was ranked.

    Args:
        capacity: number of slots.
        limit: farthest next-use distance ranked (H - L); ``limit + 1`` buckets.

    Example::

        >>> r = RankedSlots(4, limit=2)
        >>> len(r), r.ends.shape
        (0, torch.Size([4, 3]))
    """

    def __init__(self, capacity: int, limit: int) -> None:
        self.limit = limit
        self.link = torch.full((capacity,), -1, dtype=torch.int32)
        self.seq = torch.zeros(capacity, dtype=torch.int64)
        self.ends = torch.tensor([[-1], [-1], [-1], [0]], dtype=torch.int64).repeat(1, limit + 1)
        self.meta = torch.zeros(2, dtype=torch.int64)  # ranked slots, next sequence number

    def __len__(self) -> int:
        return int(self.meta[0])

    @staticmethod
    def host_bytes(capacity: int, limit: int) -> int:
        """Bytes allocated: an int32 link and an int64 order per slot, four int64 per bucket."""
        return 12 * capacity + 32 * (limit + 1) + 16

    def order(self) -> torch.Tensor:
        """Ranked slots (int64) in the order they left the queue: their recency order (native)."""
        order: torch.Tensor = torch.ops.scratchpipe.ranked_order(self.link, self.seq, self.ends)
        return order

    def drain(self) -> torch.Tensor:
        """Unrank every slot; return them in recency order (for ``RecencyQueue.prepend``)."""
        slots = self.order()
        self.ends[:3].fill_(-1)
        self.ends[3].zero_()
        self.meta.zero_()
        return slots
