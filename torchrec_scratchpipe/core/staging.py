"""A fixed ring of pinned host buffers for rows on their way between host and device.

The backing store stays in pageable memory. Rows travel through a few pinned buffers
allocated once, as packed rows (``layout.bytes_per_row`` bytes each: weights and optimizer
state together, see ``core/store.py``): rows moving in are gathered straight into a
buffer and copied to the device as one tensor; victims moving out are packed on the
device, copied into a buffer as one tensor, and scattered into the store once their copy
has completed. A buffer is handed out again only after the event recorded after its last
copy has completed, so the host never overwrites memory a copy still reads.

Each buffer is one flat allocation whose size is a power of two: PyTorch's caching host
allocator rounds pinned blocks up to a power of two, so what ``host_bytes`` counts is
exactly what pinning allocates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

#: Buffers in the ring of one table group.
RING_BUFFERS = 4
#: Bytes of one buffer (a power of two) unless the whole scratchpad needs less.
BUFFER_BYTES = 1 << 24
#: Bytes of the slot index carried with every staged row (int64).
INDEX_BYTES = 8


#: Room for aligning the packed rows after the index.
_SLACK = 64


def _buffer_size(rows: int, row_bytes: int) -> int:
    """Bytes of one buffer: its rows and their indices, plus alignment room, to a power of two."""
    n = rows * (row_bytes + INDEX_BYTES) + _SLACK
    return 1 << (n - 1).bit_length()


@dataclass
class StagingBuffer:
    """One pinned buffer: packed rows and their slot indices.

    Args:
        packed: ``[rows, row_bytes]`` uint8 packed rows (``BackingStore.gather`` layout).
        index: ``[rows]`` int64 slots of the staged rows.
        done: CUDA event recorded after the buffer's last copy (None: free).
        write_back: store rows whose victims sit in ``packed[:n]`` waiting to be scattered.
    """

    packed: torch.Tensor
    index: torch.Tensor
    done: Optional["torch.cuda.Event"] = None
    write_back: Optional[torch.Tensor] = field(default=None, repr=False)

    def rows(self, n: int) -> torch.Tensor:
        """The first ``n`` packed rows (a view)."""
        return self.packed[:n]


class StagingRing:
    """``buffers`` pinned buffers of ``rows`` packed rows each, handed out in turn.

    Args:
        row_bytes: bytes of one packed row (``RowLayout.bytes_per_row``).
        capacity: slots of the scratchpad (no buffer needs more rows than this).
        buffers: number of buffers.
        buffer_bytes: bytes of one buffer (a power of two) when the scratchpad is larger.
        pin: pin the buffers (ignored without CUDA).

    Example::

        >>> ring = StagingRing(row_bytes=260, capacity=100, pin=False)
        >>> ring.rows, ring.nbytes() == StagingRing.host_bytes(100, 260)
        (100, True)
        >>> ring.acquire().packed.shape
        torch.Size([100, 260])
    """

    def __init__(
        self,
        row_bytes: int,
        capacity: int,
        buffers: int = RING_BUFFERS,
        buffer_bytes: int = BUFFER_BYTES,
        pin: bool = True,
    ) -> None:
        if buffers < 1 or buffer_bytes & (buffer_bytes - 1):
            raise ValueError(f"need >= 1 buffers of a power-of-two size, got {buffers} x {buffer_bytes} bytes.")
        if row_bytes <= 0:
            raise ValueError(f"row_bytes must be positive, got {row_bytes}.")
        self.rows = self.rows_per_buffer(capacity, row_bytes, buffer_bytes)
        size = _buffer_size(self.rows, row_bytes)
        pin = pin and torch.cuda.is_available()
        self.buffers: List[StagingBuffer] = []
        self._flat: List[torch.Tensor] = []
        at = (self.rows * INDEX_BYTES + _SLACK - 1) // _SLACK * _SLACK  # packed rows start cache-line aligned
        for _ in range(buffers):
            flat = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            index = flat[: self.rows * INDEX_BYTES].view(torch.int64)
            packed = flat[at : at + self.rows * row_bytes].view(self.rows, row_bytes)
            self._flat.append(flat)
            self.buffers.append(StagingBuffer(packed, index))
        self._next = 0
        self.waits = 0  # times a buffer was still in use when it came round again

    @staticmethod
    def rows_per_buffer(capacity: int, row_bytes: int, buffer_bytes: int = BUFFER_BYTES) -> int:
        """Rows one buffer holds: the whole scratchpad, or what fits in ``buffer_bytes``."""
        fit = (buffer_bytes - _SLACK) // (row_bytes + INDEX_BYTES)
        return max(1, min(capacity, fit))

    @staticmethod
    def host_bytes(capacity: int, row_bytes: int, buffers: int = RING_BUFFERS, buffer_bytes: int = BUFFER_BYTES) -> int:
        """Host memory a ring allocates for a scratchpad of ``capacity`` slots.

        ``row_bytes`` is what one packed row takes (``RowLayout.bytes_per_row``).
        """
        rows = StagingRing.rows_per_buffer(capacity, row_bytes, buffer_bytes)
        return buffers * _buffer_size(rows, row_bytes)

    def nbytes(self) -> int:
        """Bytes allocated by the ring."""
        return sum(f.untyped_storage().nbytes() for f in self._flat)

    def acquire(self, land: Optional[Callable[[StagingBuffer], None]] = None) -> StagingBuffer:
        """The next buffer, once its last copy has completed.

        Args:
            land: called with the buffer when it still holds victims to scatter into the
                store (after its copy completed, before it is reused).
        """
        buf = self.buffers[self._next]
        self._next = (self._next + 1) % len(self.buffers)
        if buf.done is not None:
            if not buf.done.query():
                self.waits += 1
            buf.done.synchronize()
            buf.done = None
        if buf.write_back is not None and land is not None:
            land(buf)
        return buf

