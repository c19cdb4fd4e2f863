"""A fixed ring of pinned host buffers for rows on their way between host and device.

The backing store stays in pageable memory. Rows travel through a few pinned buffers
allocated once: rows moving in are gathered straight into a buffer (``index_select``
with ``out=``) and copied to the device from there; victims moving out are copied from
the device into a buffer and scattered into the store once their copy has completed.
A buffer is handed out again only after the event recorded after its last copy has
completed, so the host never overwrites memory a copy still reads.

Each buffer is one flat allocation whose size is a power of two: PyTorch's caching host
allocator rounds pinned blocks up to a power of two, so what ``host_bytes`` counts is
exactly what pinning allocates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: Buffers in the ring of one table group.
RING_BUFFERS = 4
#: Bytes of one buffer (a power of two) unless the whole scratchpad needs less.
BUFFER_BYTES = 1 << 24
#: Bytes of the slot index carried with every staged row (int64).
INDEX_BYTES = 8


#: Room for aligning up to 8 values to 8 bytes inside one buffer.
_SLACK = 64


def _buffer_size(rows: int, row_bytes: int) -> int:
    """Bytes of one buffer: its rows and their indices, plus alignment room, to a power of two."""
    n = rows * (row_bytes + INDEX_BYTES) + _SLACK
    return 1 << (n - 1).bit_length()


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass
class StagingBuffer:
    """One pinned buffer: per-row values keyed like ``BackingStore.gather``, and slot indices.

    Args:
        values: ``{"weights": [rows, dim], state name: [rows, ...]}`` views of the buffer.
        index: ``[rows]`` int64 slots of the staged rows.
        done: CUDA event recorded after the buffer's last copy (None: free).
        write_back: store rows whose victims sit in ``values[:n]`` waiting to be scattered.
    """

    values: Dict[str, torch.Tensor]
    index: torch.Tensor
    done: Optional["torch.cuda.Event"] = None
    write_back: Optional[torch.Tensor] = field(default=None, repr=False)

    def rows(self, n: int) -> Dict[str, torch.Tensor]:
        """The first ``n`` rows of every value (views)."""
        return {k: v[:n] for k, v in self.values.items()}


class StagingRing:
    """``buffers`` pinned buffers of ``rows`` rows each, handed out in turn.

    Args:
        row_shapes: per value (``"weights"`` and optimizer states), its per-row shape.
        dtypes: per value, its dtype.
        capacity: slots of the scratchpad (no buffer needs more rows than this).
        buffers: number of buffers.
        buffer_bytes: bytes of one buffer (a power of two) when the scratchpad is larger.
        pin: pin the buffers (ignored without CUDA).

    Example::

        >>> ring = StagingRing({"weights": (8,)}, {"weights": torch.float32}, capacity=100, pin=False)
        >>> ring.rows, ring.nbytes() == StagingRing.host_bytes(100, 8 * 4)
        (100, True)
        >>> ring.acquire().values["weights"].shape
        torch.Size([100, 8])
    """

    def __init__(
        self,
        row_shapes: Dict[str, Tuple[int, ...]],
        dtypes: Dict[str, torch.dtype],
        capacity: int,
        buffers: int = RING_BUFFERS,
        buffer_bytes: int = BUFFER_BYTES,
        pin: bool = True,
    ) -> None:
        if buffers < 1 or buffer_bytes & (buffer_bytes - 1):
            raise ValueError(f"need >= 1 buffers of a power-of-two size, got {buffers} x {buffer_bytes} bytes.")
        widths = {k: _numel(s) * dtypes[k].itemsize for k, s in row_shapes.items()}
        self.rows = self.rows_per_buffer(capacity, sum(widths.values()), buffer_bytes)
        size = _buffer_size(self.rows, sum(widths.values()))
        pin = pin and torch.cuda.is_available()
        self.buffers: List[StagingBuffer] = []
        self._flat: List[torch.Tensor] = []
        for _ in range(buffers):
            flat = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            at = _align(self.rows * INDEX_BYTES)
            index = flat[:at].view(torch.int64)[: self.rows]
            values = {}
            for k, shape in row_shapes.items():
                n = _align(self.rows * widths[k])
                values[k] = flat[at : at + n].view(dtypes[k])[: self.rows * _numel(shape)].view((self.rows,) + tuple(shape))
                at += n
            self._flat.append(flat)
            self.buffers.append(StagingBuffer(values, index))
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

        ``row_bytes`` is what one row's values take (weights and optimizer state).
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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
