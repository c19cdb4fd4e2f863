"""Window working sets: distinct rows of every L+1 consecutive batches, per table.

A scratchpad running lookahead L holds the rows of the training batch and the L planned
after it, so it needs at least the largest such window's distinct rows (with fewer slots
the engine still runs, but planning stalls and the effective lookahead shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from torchrec_scratchpipe.sim.stream import BatchStream


def window_distinct(stream: BatchStream, lookahead: int) -> torch.Tensor:
    """Distinct rows of each table in each window of ``lookahead + 1`` consecutive steps.

    An occurrence of a row at step k whose previous occurrence was at step p is the first
    of that row in exactly the windows starting in ``[max(p + 1, k - L), k]``; adding +1
    over those ranges (one difference array, one cumsum) counts every window at once.

    Args:
        stream: the batches.
        lookahead: L >= 0.

    Returns:
        int64 ``[T, W]`` with ``W = max(1, steps - L)`` windows (one window of all steps
        when the stream is shorter than L+1).

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3])], 4)
        >>> window_distinct(s, 1).tolist()
        [[3, 3]]
    """
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    n, t = stream.num_steps, len(stream.table_sizes)
    windows = max(1, n - lookahead)
    diff = torch.zeros(t, n + 1, dtype=torch.int64)
    prev = torch.full((stream.num_rows,), -(lookahead + 2), dtype=torch.int64)
    offsets = stream.offsets
    for k, rows in enumerate(stream.rows):
        lo = torch.clamp(torch.maximum(prev.index_select(0, rows) + 1, torch.tensor(k - lookahead)), min=0)
        table = torch.searchsorted(offsets, rows, right=True) - 1
        ones = torch.ones_like(rows)
        diff.index_put_((table, lo), ones, accumulate=True)
        diff.index_put_((table, torch.full_like(rows, k + 1)), -ones, accumulate=True)
        prev.index_fill_(0, rows, k)
    counts = torch.cumsum(diff, 1)  # window starting at s counts the rows first seen in it
    return counts[:, :windows]


@dataclass
class WorkingSet:
    """Largest window working set, per table and for all tables sharing one scratchpad.

    Args:
        lookahead: L.
        per_table: rows each table needs (max over windows).
        group: rows all tables together need (max over windows of the sum).
        max_batch: largest single batch per table (the engine's hard minimum).
    """

    lookahead: int
    per_table: List[int]
    group: int
    max_batch: List[int]


def working_set(stream: BatchStream, lookahead: int) -> WorkingSet:
    """:func:`window_distinct` reduced to the numbers a capacity plan needs.

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3])], 4)
        >>> ws = working_set(s, 1)
        >>> ws.per_table, ws.max_batch
        ([3], [2])
    """
    per_window = window_distinct(stream, lookahead)
    batch = window_distinct(stream, 0)
    return WorkingSet(lookahead, per_window.max(1).values.tolist(), int(per_window.sum(0).max()),
                      batch.max(1).values.tolist())
