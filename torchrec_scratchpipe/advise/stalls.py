"""What a stalled window cost, and the lookahead or load factor that avoids it.

A scratchpad running lookahead L holds the rows of L+1 batches at once. When they do not
fit, planning waits for the window to drain (``cache_stats``' ``window_stalls``): training
stays correct, but the effective lookahead shrinks and the held rows crowd out rows that
would have been hits. Given the id stream one scratchpad saw, :func:`stall_advice` measures
the cost by replaying the stream through the engine's own planner at L and at the largest
L that fits (the advisor's working set), and names the load factor L needs.

Example:
    >>> import torch
    >>> from torchrec_scratchpipe.sim.stream import BatchStream
    >>> s = BatchStream.from_flat([torch.arange(i, i + 6) for i in range(0, 60, 3)], 100)
    >>> a = stall_advice(s, capacity=12, lookahead=3, horizon=3, stalls=5)
    >>> a.suggested_lookahead, a.load_factor_needed
    (2, 0.15)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence

from torchrec_scratchpipe.advise.working_set import window_distinct
from torchrec_scratchpipe.sim.scratchpipe import simulate_scratchpipe
from torchrec_scratchpipe.sim.stream import BatchStream


@dataclass
class StallAdvice:
    """The numbers of one stall note.

    Args:
        stalls: times planning waited (from ``cache_stats``).
        steps: batches in the stream.
        lookahead: L the scratchpad ran with.
        capacity: its slots.
        window_rows: distinct rows of the largest L+1-batch window (all its tables).
        suggested_lookahead: largest L whose windows fit ``capacity``.
        load_factor_needed: slots / rows that L's largest window needs.
        extra_rows: rows moved in at L minus rows moved in at ``suggested_lookahead``
            (the rows the stalls cost; 0 or less when the stalls were harmless).
    """

    stalls: int
    steps: int
    lookahead: int
    capacity: int
    window_rows: int
    suggested_lookahead: int
    load_factor_needed: float
    extra_rows: int

    def note(self, name: str) -> str:
        """One short line for a log or a report."""
        cost = f"cost {self.extra_rows:,} extra rows moved" if self.extra_rows > 0 else "cost no extra rows"
        return (f"{name}: the L+1 = {self.lookahead + 1} batch window ({self.window_rows:,} rows) did not fit "
                f"{self.capacity:,} slots; planning stalled {self.stalls:,} times in {self.steps:,} steps and "
                f"{cost} vs L = {self.suggested_lookahead}: use lookahead {self.suggested_lookahead} "
                f"or load_factor >= {self.load_factor_needed:.3g}.")


def stall_advice(stream: BatchStream, capacity: int, lookahead: int, horizon: int, stalls: int) -> StallAdvice:
    """Advice for a scratchpad of ``capacity`` slots that stalled on ``stream``.

    Args:
        stream: every batch the scratchpad planned, in its own row space (all the tables
            sharing it).
        capacity: slots.
        lookahead, horizon: L and H it ran with.
        stalls: its ``window_stalls``.
    """
    group = window_distinct(stream, lookahead).sum(0)
    window_rows = int(group.max())
    fits = lookahead if window_rows <= capacity and not stalls else max(0, lookahead - 1)
    while fits > 0 and int(window_distinct(stream, fits).sum(0).max()) > capacity:
        fits -= 1
    extra = 0
    if fits < lookahead:
        at_l = simulate_scratchpipe(stream, capacity, lookahead, max(horizon, lookahead)).total_misses
        at_fit = simulate_scratchpipe(stream, capacity, fits, max(horizon, fits)).total_misses
        extra = int(at_l - at_fit)
    return StallAdvice(stalls, stream.num_steps, lookahead, capacity, window_rows, fits,
                       round(window_rows / stream.num_rows, 4), extra)


def stall_notes(
    cache: Mapping[str, Mapping[str, Any]],
    batches: Sequence[Any],
    feature_names: Sequence[str],
    table_names: Sequence[str],
    table_sizes: Sequence[int],
    lookahead: int,
    horizon: int,
    label: str = "",
) -> List[str]:
    """One :meth:`StallAdvice.note` per scratchpad of a one-rank run whose window stalled.

    Args:
        cache: ``cache_stats(model)`` after training ``batches``.
        batches: the TorchRec ``Batch``es trained, in order.
        feature_names, table_names, table_sizes: the tables, aligned (feature i feeds
            table i of ``table_sizes[i]`` rows).
        lookahead, horizon: L and H of the run.
        label: prefix of each note (e.g. the A/B arm).
    """
    notes, seen = [], set()
    for table, s in cache.items():
        group = tuple(s.get("shared_with", [table]))
        stalls = int(s.get("window_stalls", 0))
        if group in seen or not stalls:
            continue
        seen.add(group)
        chosen = [i for i, name in enumerate(table_names) if name in group]
        steps = ([b.sparse_features[feature_names[i]].values() for i in chosen] for b in batches)
        stream = BatchStream.from_table_ids(steps, [table_sizes[i] for i in chosen],
                                            [feature_names[i] for i in chosen], name="run")
        advice = stall_advice(stream, int(s["capacity"]), lookahead, horizon, stalls)
        notes.append(advice.note(f"{label} [{','.join(group)}]".strip()))
    return notes
