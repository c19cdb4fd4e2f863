"""The backing store: full tables and their per-row optimizer state in host memory.

``gather_rows`` / ``scatter_rows`` are the host side of the mover: whole-row copies
between a large table and a compact buffer. On CPU they run as one ``memcpy`` per row in
the native operator when it is built (``core/native.py``); PyTorch's ``index_copy_``
moves rows element by element and is an order of magnitude slower there.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_scratchpipe.core import native as _native


def _native_rows(table: torch.Tensor, rows: torch.Tensor, buffer: torch.Tensor) -> bool:
    return (
        table.device.type == "cpu" and buffer.device.type == "cpu" and rows.device.type == "cpu"
        and table.is_contiguous() and buffer.is_contiguous() and table.dtype == buffer.dtype
        and rows.dtype == torch.int64 and _native.enabled()
    )


def gather_rows(table: torch.Tensor, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``table[rows]``, written into ``out[:len(rows)]`` when given (e.g. a pinned staging buffer).

    Args:
        table: rows to read (any shape ``[N, ...]``).
        rows: int64 row ids.
        out: optional buffer with at least ``len(rows)`` rows of ``table``'s row shape.

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
    else:
        torch.index_select(table, 0, rows.to(table.device), out=dst)
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
        table.index_copy_(0, rows.to(table.device), values.to(table.device))


class BackingStore:
    """Host-resident rows of one table group: weights plus optimizer state per row.

    Tables are concatenated into one row space; table ``t`` owns rows
    ``[offsets[t], offsets[t + 1])``. Memory is pageable: rows are only read and written
    with ``index_select`` / ``index_copy_``; the mover stages them through a small ring of
    pinned buffers (``core/staging.py``) to copy them to and from the device.

    Args:
        table_rows: rows of each table, in group order.
        dim: embedding dimension.
        state_shapes: per optimizer state, its per-row shape (``()`` or ``(dim,)``).

    Example::

        >>> s = BackingStore([4, 6], dim=2, state_shapes={"momentum1": ()})
        >>> s.weights.shape, s.states["momentum1"].shape, s.offsets.tolist()
        (torch.Size([10, 2]), torch.Size([10]), [0, 4, 10])
    """

    def __init__(
        self,
        table_rows: Sequence[int],
        dim: int,
        state_shapes: Dict[str, Tuple[int, ...]],
    ) -> None:
        self.table_rows: List[int] = list(table_rows)
        self.offsets = torch.tensor([0] + self.table_rows).cumsum(0)
        total = int(self.offsets[-1])
        self.weights = torch.zeros(total, dim)
        self.states: Dict[str, torch.Tensor] = {
            name: torch.zeros((total,) + tuple(shape))
            for name, shape in state_shapes.items()
        }

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def table_view(self, tensor: torch.Tensor, t: int) -> torch.Tensor:
        """Rows of table ``t`` in ``tensor`` (a view, no copy)."""
        return tensor[int(self.offsets[t]) : int(self.offsets[t + 1])]

    def gather(self, rows: torch.Tensor, out: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Weights and states of ``rows`` (collect), keyed ``"weights"`` and state names.

        Args:
            rows: int64 row ids.
            out: optional reusable buffers, same keys, each with at least ``len(rows)``
                rows (e.g. pinned staging); the results are views of them.
        """
        res = {"weights": gather_rows(self.weights, rows, None if out is None else out["weights"])}
        for name, st in self.states.items():
            res[name] = gather_rows(st, rows, None if out is None else out[name])
        return res

    def scatter(self, rows: torch.Tensor, values: Dict[str, torch.Tensor]) -> None:
        """Write ``values`` (as returned by ``gather``) back to ``rows`` (write-back)."""
        scatter_rows(self.weights, rows, values["weights"])
        for name, st in self.states.items():
            scatter_rows(st, rows, values[name])

    def row_layout(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Per-row shape and dtype of each value, keyed like ``gather``'s result."""
        values = {"weights": self.weights, **self.states}
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in values.items()}

    def buffers(self, rows: int, pin: bool = False) -> Dict[str, torch.Tensor]:
        """Empty buffers for ``rows`` rows of weights and states (``gather(out=...)``)."""
        pin = pin and torch.cuda.is_available()
        return {
            name: torch.empty((rows,) + shape, dtype=dtype, pin_memory=pin)
            for name, (shape, dtype) in self.row_layout().items()
        }

    def nbytes_per_row(self) -> int:
        """Bytes one row moves (weights and state)."""
        n = self.weights[0].nelement() * self.weights.element_size()
        return n + sum(s[0].nelement() * s.element_size() for s in self.states.values())
