"""Next use of every row among the queued batches, kept on the planner's device.

The same bookkeeping as ``NextUse`` (``core/next_use.py``), with the same results, as a
fixed sequence of tensor ops per batch: no host reads of device data, shapes that follow
from the batch's padded size. Batches arrive as ``DevicePlanner.group_rows`` gives them:
distinct rows first, padded with the sentinel row ``num_rows``.

Each row keeps ``[next use, last pushed step, position in that batch]`` (one int32 each,
plus one entry for the sentinel, which absorbs the padding's writes). The successor links
of waiting (pushed, unplanned) batches live in a ring of ``ring x width`` int32 entries:
batch ``k`` owns row ``k mod ring``. Waiting batches have consecutive steps (the window
numbers them), so a ring longer than the waiting batches never collides. The host knows
how many batches wait and how wide each is, so it grows the ring (a copy per waiting
batch) without reading the device.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Tuple

import torch

from torchrec_scratchpipe.core.next_use import NONE


class DeviceNextUse:
    """Per-row next-use step over a FIFO of pushed batches, on ``device``.

    Args:
        num_rows: size of the row space (the sentinel is row ``num_rows``).
        device: where the records and links live.
        ring: initial ring length (grows as more batches wait).

    Example::

        >>> nu = DeviceNextUse(10, torch.device("cpu"))
        >>> nu.push(0, torch.tensor([1, 2, 10]))   # rows 1, 2 and one padding entry
        >>> nu.push(1, torch.tensor([2, 3]))
        >>> nu.planned(torch.tensor([1, 2, 10]))   # batch 0 planned: row 2 is next used at 1
        >>> nu.next[[1, 2, 3]].tolist() == [NONE, 1, 1]
        True
    """

    def __init__(self, num_rows: int, device: torch.device, ring: int = 8) -> None:
        self.num_rows = num_rows
        self.device = device
        self._next = torch.full((num_rows + 1,), NONE, dtype=torch.int32, device=device)
        self.next = self._next[:num_rows]
        self._last_step = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
        self._last_pos = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
        self._ring, self._width = ring, 0
        self._succ = torch.full((1,), NONE, dtype=torch.int32, device=device)  # ring * width links + a sink
        self._waiting: Deque[Tuple[int, int]] = deque()  # (step, width) of pushed, unplanned batches

    @staticmethod
    def device_bytes(num_rows: int, ring: int, width: int) -> int:
        """Bytes allocated: three int32 per row (and the sentinel), ``ring x width`` int32 links."""
        return 12 * (num_rows + 1) + 4 * (ring * width + 1)

    def push(self, step: int, rows: torch.Tensor) -> None:
        """Record a batch (distinct rows padded with ``num_rows``) pushed at ``step``."""
        n = rows.numel()
        self._fit(len(self._waiting) + 1, n)
        first_waiting = self._waiting[0][0] if self._waiting else step
        ring, width, sink = self._ring, self._width, self._ring * self._width
        base = (step % ring) * width
        self._succ[base : base + width].fill_(NONE)
        valid = rows < self.num_rows
        prev = self._last_step.index_select(0, rows)
        waiting = valid & (prev >= first_waiting)
        link = (prev.long() % ring) * width + self._last_pos.index_select(0, rows).long()
        self._succ.index_fill_(0, torch.where(waiting, link, sink), step)
        self._next.index_fill_(0, torch.where(valid & ~waiting, rows, self.num_rows), step)
        self._last_step.index_fill_(0, rows, step)
        self._last_pos.index_copy_(0, rows, torch.arange(n, dtype=torch.int32, device=rows.device))
        self._waiting.append((step, n))

    def planned(self, rows: torch.Tensor) -> None:
        """The oldest waiting batch, whose padded rows are ``rows``, was planned."""
        step, n = self._waiting.popleft()
        if n != rows.numel():
            raise RuntimeError("DeviceNextUse: batches must be planned in the order they were pushed.")
        base = (step % self._ring) * self._width
        self._next.index_copy_(0, rows, self._succ[base : base + n])

    def clear(self) -> None:
        """Forget every queued batch."""
        self._next.fill_(NONE)
        self._last_step.fill_(-1)
        self._waiting.clear()

    def _fit(self, batches: int, width: int) -> None:
        """Grow the ring to hold ``batches`` waiting batches of up to ``width`` rows (host sizes only)."""
        if batches <= self._ring and width <= self._width:
            return
        ring = max(self._ring, 2 * batches)
        new_width = max(width, self._width)
        succ = torch.full((ring * new_width + 1,), NONE, dtype=torch.int32, device=self.device)
        for step, n in self._waiting:  # the waiting batches' links move to their new rows
            src = (step % self._ring) * self._width
            dst = (step % ring) * new_width
            succ[dst : dst + n] = self._succ[src : src + n]
        self._succ, self._ring, self._width = succ, ring, new_width

    def step_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Next-use step of ``rows`` (``NONE`` where unknown; ``rows < 0`` give ``NONE``)."""
        nxt = self.next.index_select(0, rows.clamp(min=0))
        return torch.where(rows >= 0, nxt, torch.full_like(nxt, NONE))
