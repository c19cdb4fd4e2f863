"""The backing store: full tables and their per-row optimizer state in host memory, packed.

Every row of a table group is stored as one packed record of ``layout.bytes_per_row``
bytes (weights, then each optimizer state, at the offsets ``RowLayout`` gives), all rows
in one contiguous ``uint8`` allocation. ``store.weights`` and ``store.states[name]`` are
typed views into it (strided by the packed row), so table views, init and loads read and
write the store in place, while the mover moves each row as one piece:
``gather`` / ``scatter`` copy whole packed rows between the store and a compact buffer,
one ``memcpy`` per row in the native operator when it is built (``core/native.py``),
``index_select`` / ``index_copy_`` otherwise. The same row copies move one value at a time
between a strided view of packed rows and the scratchpad (unpacking and packing in the
same pass as the random reads or writes).

TorchRec's ``ShardedTensor`` accepts only contiguous local shards, so the TorchRec kernel
asks for an unpacked store (``packed=False``: one contiguous tensor per value, the same
packed buffers on the mover's side, rows gathered and scattered value by value).

Random rows of a large table are bound by memory latency and address translation, not
bandwidth: the store asks Linux for transparent huge pages (``madvise``), which on the
benchmark's 676 MB store makes a row copy about 1.6x faster than on 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_scratchpipe.core import native as _native
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.store_api import RowStore

#: Size of a transparent huge page on x86-64 and aarch64 Linux (4 KiB base pages).
HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether each row of ``t`` is one contiguous run of memory, rows not overlapping
    (rows themselves may be strided: one value of packed rows)."""
    if t.dim() == 0:
        return False
    step = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.shape[d] != 1 and t.stride(d) != step:
            return False
        step *= t.shape[d]
    return t.shape[0] <= 1 or t.stride(0) >= step


def _native_rows(table: torch.Tensor, rows: torch.Tensor, buffer: torch.Tensor) -> bool:
    return (
        table.device.type == "cpu" and buffer.device.type == "cpu" and rows.device.type == "cpu"
        and table.dtype == buffer.dtype and table.shape[1:] == buffer.shape[1:]
        and _dense_rows(table) and _dense_rows(buffer) and rows.dtype == torch.int64 and _native.enabled()
    )


def _wide(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (rows of bytes) viewed as the widest integer type that tiles both
    their rows, so that PyTorch's element-wise index ops move 8, 4 or 2 bytes per element,
    not 1 (``index_select`` about 1.4x, ``index_copy_`` about 2x faster on packed rows)."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.dim() != 2 or b.dim() != 2:
        return a, b
    for dtype in (torch.int64, torch.int32, torch.int16):
        w = dtype.itemsize
        if all(t.stride(1) == 1 and t.shape[1] % w == 0 and t.stride(0) % w == 0 and t.storage_offset() % w == 0
               for t in (a, b)):
            return a.view(dtype), b.view(dtype)
    return a, b


def gather_rows(table: torch.Tensor, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``table[rows]``, written into ``out[:len(rows)]`` when given (e.g. a pinned staging buffer).

    Args:
        table: rows to read (any shape ``[N, ...]``; rows may be strided).
        rows: int64 row ids.
        out: optional buffer with at least ``len(rows)`` rows of ``table``'s row shape
            (rows may be strided, e.g. one value of a packed buffer).

    Returns:
        The gathered rows (a view of ``out`` when given).

    Example::

        >>> gather_rows(torch.arange(6.0).view(3, 2), torch.tensor([2, 0])).tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """
    n = rows.numel()
    if out is None:
        out = torch.empty((n,) + tuple(table.shape[1:]), dtype=table.dtype, device=table.device)
    dst = out[:n]
    if _native_rows(table, rows, dst):
        torch.ops.scratchpipe.gather_rows(table, rows, dst)
    elif dst.is_contiguous():
        src, into = _wide(table, dst)
        torch.index_select(src, 0, rows.to(table.device), out=into)
    else:  # a strided view (e.g. one value of packed rows): index_select(out=) would reallocate it
        dst.copy_(table.index_select(0, rows.to(table.device)))
    return dst


def scatter_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table[rows] = values`` (distinct ``rows``), in place.

    Example::

        >>> t = torch.zeros(3, 2)
        >>> scatter_rows(t, torch.tensor([1]), torch.ones(1, 2))
        >>> t.sum().item()
        2.0
    """
    if _native_rows(table, rows, values):
        torch.ops.scratchpipe.scatter_rows(table, rows, values)
    else:
        into, src = _wide(table, values.to(table.device))
        into.index_copy_(0, rows.to(table.device), src)


def row_views(packed: torch.Tensor, layout: RowLayout) -> Dict[str, torch.Tensor]:
    """Typed views of packed rows: ``{"weights": [n, dim], state name: [n, ...]}``.

    Args:
        packed: ``[n, layout.bytes_per_row]`` uint8 rows (any device), contiguous in a row.
        layout: where each value sits in a row.

    Example::

        >>> from torchrec_scratchpipe.core.layout import EmbOptimType
        >>> layout = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, dim=4)
        >>> v = row_views(torch.zeros(3, layout.bytes_per_row, dtype=torch.uint8), layout)
        >>> v["momentum1"].fill_(1.0).shape, v["weights"].shape, v["weights"].stride()
        (torch.Size([3]), torch.Size([3, 4]), (5, 1))
    """
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != layout.bytes_per_row:
        raise ValueError(
            f"packed rows must be uint8 [n, {layout.bytes_per_row}], got {packed.dtype} {tuple(packed.shape)}."
        )
    n = packed.shape[0]
    out = {}
    for v in layout.values:
        size = v.dtype.itemsize
        typed = packed.view(v.dtype)  # [n, bytes_per_row / size]: rows are padded to the widest element
        flat = typed[:, v.offset // size : v.offset // size + v.numel]
        out[v.name] = flat[:, 0] if v.shape == () else flat.view((n,) + v.shape)
    return out


def empty_rows(
    n: int, layout: RowLayout, device: Optional[torch.device] = None, pin: bool = False
) -> torch.Tensor:
    """``n`` packed rows ``[n, layout.bytes_per_row]`` (uint8) to fill through ``row_views``
    (pinned if ``pin`` and CUDA is available); their alignment padding (if the layout has
    any) is zero, so packed rows are deterministic.

    Example::

        >>> from torchrec_scratchpipe.core.layout import EmbOptimType
        >>> layout = RowLayout(EmbOptimType.EXACT_SGD, dim=4)
        >>> row_views(empty_rows(4, layout), layout)["weights"].shape
        torch.Size([4, 4])
    """
    pin = pin and torch.cuda.is_available() and (device is None or torch.device(device).type == "cpu")
    out = torch.empty((n, layout.bytes_per_row), dtype=torch.uint8, device=device, pin_memory=pin)
    at = 0
    for v in layout.values:
        if v.offset > at:
            out[:, at : v.offset].zero_()
        at = v.offset + v.nbytes
    if layout.bytes_per_row > at:
        out[:, at:].zero_()
    return out


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back ``t``'s memory with transparent huge pages (before it is touched).

    Random rows of a table spanning gigabytes miss the TLB on nearly every row with 4 KiB
    pages; with 2 MiB pages the page walks mostly hit the cache. Harmless where THP is off
    or the call is not available.
    """
    if sys.platform != "linux" or t.device.type != "cpu" or t.nbytes < 2 * HUGE_PAGE:
        return
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_HUGEPAGE))
    except (OSError, AttributeError):  # no libc symbol: 4 KiB pages, still correct
        pass


class BackingStore(RowStore):
    """Host-resident rows of one table group: weights plus optimizer state per row
    (the default ``RowStore``; ``core/store_api.py``).

    Tables are concatenated into one row space; table ``t`` owns rows
    ``[offsets[t], offsets[t + 1])``. By default the store is *packed*: ``packed`` holds
    every row as ``layout.bytes_per_row`` bytes, ``weights`` and ``states`` are typed,
    row-strided views into it, and a row moves as one piece. With ``packed=False`` each
    value is its own contiguous tensor (what TorchRec's ``ShardedTensor`` local shards
    require) and rows move value by value into and out of the same packed buffers. Memory
    is pageable: the mover stages rows through a small ring of pinned buffers
    (``core/staging.py``) to copy them to and from the device.

    Args:
        table_rows: rows of each table, in group order.
        layout: what one row holds (weights and optimizer state, their dtypes and offsets).
        packed: one packed allocation (True) or one contiguous tensor per value.

    Example::

        >>> from torchrec_scratchpipe.core.layout import EmbOptimType
        >>> s = BackingStore([4, 6], RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, dim=4))
        >>> s.weights.shape, s.states["momentum1"].shape, s.offsets.tolist()
        (torch.Size([10, 4]), torch.Size([10]), [0, 4, 10])
        >>> s.packed.shape, s.weights.data_ptr() == s.packed.data_ptr(), s.weights.is_contiguous()
        (torch.Size([10, 20]), True, False)
        >>> BackingStore([4, 6], s.layout, packed=False).weights.is_contiguous()
        True
    """

    def __init__(self, table_rows: Sequence[int], layout: RowLayout, packed: bool = True) -> None:
        self.table_rows: List[int] = list(table_rows)
        self.layout = layout
        self.offsets = torch.tensor([0] + self.table_rows).cumsum(0)
        n = int(self.offsets[-1])
        self.packed: Optional[torch.Tensor] = None
        if packed:
            self.packed = _zeros((n, layout.bytes_per_row), torch.uint8)
            views = row_views(self.packed, layout)
        else:
            views = {v.name: _zeros((n,) + v.shape, v.dtype) for v in layout.values}
        self.weights: torch.Tensor = views.pop("weights")
        self.states: Dict[str, torch.Tensor] = views

    def nbytes(self) -> int:
        """Bytes the store allocates."""
        tensors = [self.packed] if self.packed is not None else [self.weights, *self.states.values()]
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

    def gather(self, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Packed rows ``[len(rows), bytes_per_row]`` of ``rows`` (collect).

        Args:
            rows: int64 row ids.
            out: optional packed buffer with at least ``len(rows)`` rows (e.g. pinned
                staging); the result is a view of it.
        """
        if self.packed is not None:
            return gather_rows(self.packed, rows, out)
        dst = (self.empty_rows(rows.numel()) if out is None else out)[: rows.numel()]
        for name, view in self.views(dst).items():
            gather_rows(self._value(name), rows, view)
        return dst

    def scatter(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Write packed rows (as ``gather`` returns them) back to ``rows`` (write-back)."""
        if self.packed is not None:
            scatter_rows(self.packed, rows, packed)
            return
        for name, view in self.views(packed).items():
            scatter_rows(self._value(name), rows, view)

    def _value(self, name: str) -> torch.Tensor:
        return self.weights if name == "weights" else self.states[name]


def _zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zero host tensor whose pages are advised to be huge before they are first touched."""
    t = torch.empty(tuple(shape), dtype=dtype)
    _advise_huge_pages(t)
    return t.zero_()
