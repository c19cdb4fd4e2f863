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

A mover has one ring per direction (rows in, victims out), each sized from the rows one
step is expected to move (``ring_buffers``: the planner's estimate): a step's chunks fill
at most half the ring, so a step never comes round to a buffer it or the step before it
used, whose copies may still be queued behind that step's backward (``wraps`` counts the
times it did).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

#: Buffers in one ring when nothing says how many rows a step moves.
RING_BUFFERS = 2
#: Bytes of one buffer (a power of two) unless the whole scratchpad needs less.
BUFFER_BYTES = 1 << 24
#: Bytes of the slot index carried with every staged row (int64).
INDEX_BYTES = 8


#: Room for aligning the packed rows after the index.
_SLACK = 64


def ring_buffers(rows_per_step: Optional[int], rows_per_buffer: int) -> int:
    """Buffers of one ring: twice the chunks one step's ``rows_per_step`` rows take (so a
    step uses buffers the previous step did not), at least ``RING_BUFFERS``.

    Example::

        >>> ring_buffers(None, 1000), ring_buffers(800, 1000), ring_buffers(5000, 1000)
        (2, 2, 10)
    """
    if rows_per_step is None or rows_per_step <= 0:
        return RING_BUFFERS
    return max(RING_BUFFERS, 2 * -(-int(rows_per_step) // rows_per_buffer))


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
        buffers: number of buffers (None: ``ring_buffers(rows_per_step, rows)``).
        buffer_bytes: bytes of one buffer (a power of two) when the scratchpad is larger.
        pin: pin the buffers (ignored without CUDA).
        rows_per_step: rows one step is expected to move this way (sizes ``buffers``).

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
        buffers: Optional[int] = None,
        buffer_bytes: int = BUFFER_BYTES,
        pin: bool = True,
        rows_per_step: Optional[int] = None,
    ) -> None:
        rows = self.rows_per_buffer(capacity, row_bytes, buffer_bytes)
        buffers = ring_buffers(rows_per_step, rows) if buffers is None else buffers
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
        self.wraps = 0  # times a step came round to a buffer it or the step before it used
        self._step = 0
        self._used = [-2] * buffers  # step each buffer was last handed out in

    def begin_step(self) -> None:
        """A new step's moves start (``wraps`` compares each buffer's last use with it)."""
        self._step += 1

    @staticmethod
    def rows_per_buffer(capacity: int, row_bytes: int, buffer_bytes: int = BUFFER_BYTES) -> int:
        """Rows one buffer holds: the whole scratchpad, or what fits in ``buffer_bytes``."""
        fit = (buffer_bytes - _SLACK) // (row_bytes + INDEX_BYTES)
        return max(1, min(capacity, fit))

    @staticmethod
    def host_bytes(
        capacity: int,
        row_bytes: int,
        buffers: Optional[int] = None,
        buffer_bytes: int = BUFFER_BYTES,
        rows_per_step: Optional[int] = None,
    ) -> int:
        """Host memory one ring allocates for a scratchpad of ``capacity`` slots.

        ``row_bytes`` is what one packed row takes (``RowLayout.bytes_per_row``); buffers
        as for the constructor. A mover has two rings (``staging_host_bytes``).
        """
        rows = StagingRing.rows_per_buffer(capacity, row_bytes, buffer_bytes)
        buffers = ring_buffers(rows_per_step, rows) if buffers is None else buffers
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
        i = self._next
        buf = self.buffers[i]
        self._next = (i + 1) % len(self.buffers)
        if self._step - self._used[i] < 2:
            self.wraps += 1
        self._used[i] = self._step
        if buf.done is not None:
            if not buf.done.query():
                self.waits += 1
            buf.done.synchronize()
            buf.done = None
        if buf.write_back is not None and land is not None:
            land(buf)
        return buf



def staging_host_bytes(capacity: int, row_bytes: int, rows_per_step: Optional[int] = None) -> int:
    """Host memory of a mover's two rings (rows in, victims out), each sized for ``rows_per_step``.

    Example::

        >>> # 1M slots of 64-dim fp32 rows with row-wise Adagrad (260 bytes a row), 100k
        >>> # rows moved each way per step: 2 x 4 buffers of 16 MiB
        >>> staging_host_bytes(1_000_000, 260, 100_000) / 2**20
        128.0
    """
    return 2 * StagingRing.host_bytes(capacity, row_bytes, rows_per_step=rows_per_step)
