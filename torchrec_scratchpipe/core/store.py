"""The backing store: full tables and their per-row optimizer state in host memory."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


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
        state_shapes: Dict[str, tuple],
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
            rows: rows to read.
            out: tensors of the right shapes to gather into (e.g. a staging buffer).
        """
        out = out if out is not None else {}
        for name, src in (("weights", self.weights), *self.states.items()):
            if name in out:
                torch.index_select(src, 0, rows, out=out[name])
            else:
                out[name] = src.index_select(0, rows)
        return out

    def scatter(self, rows: torch.Tensor, values: Dict[str, torch.Tensor]) -> None:
        """Write ``values`` (as returned by ``gather``) back to ``rows`` (write-back)."""
        self.weights.index_copy_(0, rows, values["weights"])
        for name, st in self.states.items():
            st.index_copy_(0, rows, values[name])

    def nbytes_per_row(self) -> int:
        """Bytes one row moves (weights and state)."""
        n = self.weights[0].nelement() * self.weights.element_size()
        return n + sum(s[0].nelement() * s.element_size() for s in self.states.values())
