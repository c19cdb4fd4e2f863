"""The simulator's input: a sequence of batches over one flattened row space.

Every cache in the simulator sees the same thing FBGEMM's cache sees: all tables share one
row space (table offset + row, FBGEMM's "linearized" index), and a batch is looked up as
its set of distinct rows. A :class:`BatchStream` holds, per step, the sorted distinct rows
and how often each occurred (LFU counts occurrences, as FBGEMM's ``lfu_state`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import torch


def _offsets(sizes: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(list(sizes), dtype=torch.int64), 0)
    return out


@dataclass
class BatchStream:
    """Distinct rows (and their occurrence counts) of each step, in one row space.

    Args:
        rows: per step, sorted distinct int64 rows in ``[0, num_rows)``.
        counts: per step, occurrences of each entry of ``rows`` (int64, >= 1).
        table_sizes: rows per table; table ``t`` owns ``[offsets[t], offsets[t+1])``.
        table_names: one name per table (feature names by default).
        name: label used in reports.

    Example::

        >>> s = BatchStream.from_table_ids([[torch.tensor([3, 3]), torch.tensor([0])]], [5, 2])
        >>> s.rows[0].tolist(), s.counts[0].tolist(), s.lookups
        ([3, 5], [2, 1], 3)
    """

    rows: List[torch.Tensor]
    counts: List[torch.Tensor]
    table_sizes: List[int]
    table_names: List[str] = field(default_factory=list)
    name: str = "stream"

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.counts):
            raise ValueError(f"{len(self.rows)} row tensors but {len(self.counts)} count tensors")
        if not self.table_names:
            self.table_names = [f"f{t}" for t in range(len(self.table_sizes))]
        if len(self.table_names) != len(self.table_sizes):
            raise ValueError("table_names and table_sizes differ in length")

    @property
    def num_steps(self) -> int:
        """Number of batches."""
        return len(self.rows)

    @property
    def num_rows(self) -> int:
        """Size of the flattened row space (all tables)."""
        return int(sum(self.table_sizes))

    @property
    def offsets(self) -> torch.Tensor:
        """``[T + 1]`` first row of each table in the flattened space."""
        return _offsets(self.table_sizes)

    @property
    def lookups(self) -> int:
        """Ids looked up over all steps, duplicates included."""
        return int(sum(int(c.sum()) for c in self.counts))

    def unique_per_step(self) -> torch.Tensor:
        """Distinct rows of each step (int64 ``[num_steps]``)."""
        return torch.tensor([r.numel() for r in self.rows], dtype=torch.int64)

    def max_batch_rows(self) -> int:
        """Largest number of distinct rows in one batch."""
        return int(self.unique_per_step().max()) if self.rows else 0

    def head(self, steps: int) -> "BatchStream":
        """The first ``steps`` batches."""
        return BatchStream(self.rows[:steps], self.counts[:steps], self.table_sizes, self.table_names, self.name)

    def table(self, t: int) -> "BatchStream":
        """Table ``t`` alone, rows renumbered ``0 .. table_sizes[t] - 1``."""
        lo, hi = int(self.offsets[t]), int(self.offsets[t + 1])
        rows, counts = [], []
        for r, c in zip(self.rows, self.counts):
            a, b = torch.searchsorted(r, torch.tensor([lo, hi])).tolist()
            rows.append(r[a:b] - lo)
            counts.append(c[a:b])
        name = self.table_names[t]
        return BatchStream(rows, counts, [self.table_sizes[t]], [name], f"{self.name}/{name}")

    @staticmethod
    def from_table_ids(
        steps: Iterable[Sequence[torch.Tensor]],
        table_sizes: Sequence[int],
        table_names: Optional[Sequence[str]] = None,
        name: str = "stream",
    ) -> "BatchStream":
        """Build from per-step lists of per-table id tensors (one tensor per table).

        Args:
            steps: iterable over steps; each item holds the ids of every table.
            table_sizes: rows per table (ids must be below them).
            table_names: names for reports.
            name: stream label.
        """
        off = _offsets(table_sizes)
        rows: List[torch.Tensor] = []
        counts: List[torch.Tensor] = []
        for ids in steps:
            if len(ids) != len(table_sizes):
                raise ValueError(f"a step has {len(ids)} tables, expected {len(table_sizes)}")
            flat = torch.cat([i.to(torch.int64) + off[t] for t, i in enumerate(ids)])
            r, c = torch.unique(flat, sorted=True, return_counts=True)
            rows.append(r)
            counts.append(c)
        return BatchStream(rows, counts, list(table_sizes), list(table_names or []), name)

    @staticmethod
    def from_flat(batches: Sequence[torch.Tensor], num_rows: int, name: str = "stream") -> "BatchStream":
        """One table of ``num_rows`` rows; each batch is any int tensor of row ids."""
        return BatchStream.from_table_ids(([b.reshape(-1)] for b in batches), [num_rows], ["t0"], name)

    @staticmethod
    def concat(streams: Sequence["BatchStream"]) -> "BatchStream":
        """Steps of several streams over the same tables, one after the other."""
        if not streams:
            raise ValueError("no streams to concatenate")
        first = streams[0]
        sizes = [max(s.table_sizes[t] for s in streams) for t in range(len(first.table_sizes))]
        if any(len(s.table_sizes) != len(sizes) for s in streams):
            raise ValueError("streams have different numbers of tables")
        off = _offsets(sizes)
        rows: List[torch.Tensor] = []
        counts: List[torch.Tensor] = []
        for s in streams:
            shift = off[:-1] - s.offsets[:-1]
            for r, c in zip(s.rows, s.counts):
                t = torch.searchsorted(s.offsets, r, right=True) - 1
                rows.append(r + shift[t])
                counts.append(c)
        return BatchStream(rows, counts, sizes, first.table_names, first.name)


def next_uses(stream: BatchStream) -> List[torch.Tensor]:
    """For each step and row of it, the next step using that row (``num_steps`` if none).

    One backward pass over the steps with a row-indexed "seen at" array; linear time.

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([1]), torch.tensor([2]), torch.tensor([1])], 3)
        >>> [n.tolist() for n in next_uses(s)]
        [[2], [3], [3]]
    """
    seen = torch.full((stream.num_rows,), stream.num_steps, dtype=torch.int64)
    out: List[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * stream.num_steps
    for s in range(stream.num_steps - 1, -1, -1):
        r = stream.rows[s]
        out[s] = seen.index_select(0, r)
        seen.index_fill_(0, r, s)
    return out
