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
