"""Per-table load factors that reach a traffic target, from ScratchPipe miss-ratio curves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torchrec_scratchpipe.advise.working_set import working_set
from torchrec_scratchpipe.core.capacity import load_factor_for
from torchrec_scratchpipe.sim.mrc import MissRatioCurve, miss_ratio_curve
from torchrec_scratchpipe.sim.policies import PolicyOptions
from torchrec_scratchpipe.sim.scratchpipe import simulate_scratchpipe
from torchrec_scratchpipe.sim.stream import BatchStream

TARGET_KINDS = ("rows_per_step", "miss_ratio")


@dataclass
class Target:
    """Traffic goal per table: mean rows moved in per step, or miss ratio (per distinct row).

    Args:
        kind: ``"rows_per_step"`` or ``"miss_ratio"``.
        value: the largest acceptable value.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")


@dataclass
class TableAdvice:
    """The advice for one table.

    Args:
        name: table name.
        num_rows: rows of the table.
        expected_lookups: mean distinct rows per batch (TorchRec's ``expected_lookups``).
        max_batch: distinct rows of the largest batch (fewer slots cannot run at all).
        min_scratchpad: largest working set of L+1 consecutive batches (full lookahead).
        capacity: recommended slots: the fewest >= ``min_scratchpad`` meeting the target.
        load_factor: ``capacity / num_rows`` rounded up (``CacheParams.load_factor``).
        reached: whether the target is met at ``capacity`` (else ``capacity`` = all rows).
        rows_per_step: rows moved in per step at ``capacity`` (after warm-up).
        miss_ratio: misses per distinct row looked up at ``capacity`` (after warm-up).
        curve: the ScratchPipe miss-ratio curve measured on the way.
    """

    name: str
    num_rows: int
    expected_lookups: float
    max_batch: int
    min_scratchpad: int
    capacity: int
    load_factor: float
    reached: bool
    rows_per_step: float
    miss_ratio: float
    curve: MissRatioCurve = field(repr=False)

    @property
    def min_load_factor(self) -> float:
        """``min_scratchpad / num_rows``."""
        return self.min_scratchpad / self.num_rows

    def to_json(self) -> Dict[str, Any]:
        """Plain data."""
        out = {k: getattr(self, k) for k in ("name", "num_rows", "expected_lookups", "max_batch", "min_scratchpad",
                                              "capacity", "load_factor", "reached", "rows_per_step", "miss_ratio")}
        out["min_load_factor"] = self.min_load_factor
        out["curve"] = self.curve.to_json()
        return out




def _measure(stream: BatchStream, capacity: int, lookahead: int, horizon: int, warmup: int) -> Tuple[float, float]:
    r = simulate_scratchpipe(stream, capacity, lookahead, horizon)
    steps = max(stream.num_steps - warmup, 1)
    return r.misses_after(warmup) / steps, r.miss_ratio_after(warmup)


def advise_table(
    stream: BatchStream,
    target: Target,
    lookahead: int,
    horizon: int,
    warmup: int = 0,
    points: int = 10,
    tolerance: float = 0.02,
) -> TableAdvice:
    """Measure one table's ScratchPipe curve and find the load factor meeting ``target``.

    A geometric grid of ``points`` capacities from the largest batch to the whole table
    gives the curve; the answer is then bisected between the last grid capacity that misses
    the target and the first that meets it, to ``tolerance`` (relative).

    Args:
        stream: one table's batches (``BatchStream.table(t)``).
        target: the traffic goal.
        lookahead, horizon: ScratchPipe L and H.
        warmup: leading steps excluded from the measured traffic (cold start).
        points: grid size of the curve.
        tolerance: relative precision of the bisection.

    Example::

        >>> import torch
        >>> s = BatchStream.from_flat([torch.tensor([i % 7, 7 + i]) for i in range(30)], 40)
        >>> a = advise_table(s, Target("miss_ratio", 0.6), lookahead=1, horizon=4, warmup=10)
        >>> a.min_scratchpad, a.reached, a.miss_ratio <= 0.6
        (4, True, True)
    """
    n = stream.num_rows
    ws = working_set(stream, lookahead)
    lo_cap = max(ws.per_table[0], 1)
    first = max(ws.max_batch[0], 1)
    grid = sorted({int(round(first * (n / first) ** (i / max(points - 1, 1)))) for i in range(points)} | {lo_cap})
    curve = miss_ratio_curve(stream, "scratchpipe", grid, PolicyOptions(lookahead, horizon), warmup)
    cache: Dict[int, Tuple[float, float]] = {}
    for c, m, r in zip(curve.capacities, curve.rows_per_step, curve.miss_ratio):
        if m is not None:
            cache[c] = (m, r)

    def value(c: int) -> Tuple[float, float]:
        if c not in cache:
            cache[c] = _measure(stream, c, lookahead, horizon, warmup)
        return cache[c]

    def ok(c: int) -> bool:
        rows, ratio = value(c)
        return (rows if target.kind == "rows_per_step" else ratio) <= target.value

    candidates = [c for c in grid if c >= lo_cap]
    good: Optional[int] = next((c for c in candidates if ok(c)), None)
    if good is None:
        best, reached = n, ok(n)
    elif good == lo_cap:
        best, reached = lo_cap, True
    else:
        bad = max(c for c in candidates if c < good)
        while good - bad > max(1, int(tolerance * good)):
            mid = (good + bad) // 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        best, reached = good, True
    rows, ratio = value(best)
    unique = stream.unique_per_step().float()
    return TableAdvice(stream.table_names[0], n, float(unique.mean()) if unique.numel() else 0.0,
                       ws.max_batch[0], lo_cap, best, load_factor_for(best, n), reached, rows, ratio, curve)


def advise(
    stream: BatchStream,
    target: Target,
    lookahead: int,
    horizon: int,
    warmup: int = 0,
    points: int = 10,
    tables: Optional[List[int]] = None,
) -> List[TableAdvice]:
    """:func:`advise_table` for every table (or the ``tables`` listed) of ``stream``."""
    chosen = range(len(stream.table_sizes)) if tables is None else tables
    return [advise_table(stream.table(t), target, lookahead, horizon, warmup, points) for t in chosen]
