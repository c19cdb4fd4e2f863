"""A TorchRec ``CacheStatistics`` built from a measured ScratchPipe miss-ratio curve.

TorchRec's planner reads ``CacheParams.stats`` (``expected_lookups``,
``expected_miss_rate(clf)``, ``cacheability``) to price cache fetches and to rank tables
when it scales load factors up (``EmbeddingOffloadScaleupProposer``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torchrec.distributed.types import CacheStatistics

from torchrec_scratchpipe.sim.mrc import MissRatioCurve


class MeasuredCacheStatistics(CacheStatistics):
    """Piecewise-linear miss rate over load factor, through measured points.

    The curve is pinned to TorchRec's contract: miss rate 1.0 at load factor 0 and 0.0 at
    load factor 1 (a whole table never misses once warm); in between it interpolates
    linearly through the measured ``(load_factor, miss_ratio)`` points, made non-increasing.
    Below the smallest measured load factor ScratchPipe cannot run at all (a batch needs
    more slots); the line from (0, 1) only keeps the function continuous for the planner.

    Args:
        load_factors: measured load factors, in (0, 1].
        miss_rates: miss ratio (misses per distinct row looked up) at each of them.
        expected_lookups: distinct rows per (global) batch.

    Example::

        >>> s = MeasuredCacheStatistics([0.1, 0.5], [0.4, 0.1], expected_lookups=1000.0)
        >>> s.expected_miss_rate(0.0), s.expected_miss_rate(0.3), s.expected_miss_rate(1.0)
        (1.0, 0.25, 0.0)
        >>> round(s.cacheability, 4)
        0.195
    """

    def __init__(self, load_factors: Sequence[float], miss_rates: Sequence[float], expected_lookups: float) -> None:
        if len(load_factors) != len(miss_rates) or not load_factors:
            raise ValueError("need one miss rate per load factor, at least one point")
        pts = sorted((float(x), float(y)) for x, y in zip(load_factors, miss_rates) if 0.0 < x < 1.0)
        xs: List[float] = [0.0] + [x for x, _ in pts] + [1.0]
        ys: List[float] = [1.0] + [min(max(y, 0.0), 1.0) for _, y in pts] + [0.0]
        for i in range(1, len(ys)):
            ys[i] = min(ys[i], ys[i - 1])
        self._x = torch.tensor(xs, dtype=torch.float64)
        self._y = torch.tensor(ys, dtype=torch.float64)
        self._lookups = float(expected_lookups)

    @staticmethod
    def from_curve(curve: MissRatioCurve, expected_lookups: float) -> "MeasuredCacheStatistics":
        """From a :class:`MissRatioCurve` (infeasible capacities are left out)."""
        pts = [(lf, r) for lf, r, m in zip(curve.load_factors, curve.miss_ratio, curve.misses) if m is not None]
        if not pts:
            raise ValueError("the curve has no feasible capacity")
        return MeasuredCacheStatistics([p[0] for p in pts], [p[1] for p in pts], expected_lookups)

    @property
    def expected_lookups(self) -> float:
        """Distinct rows per batch."""
        return self._lookups

    def expected_miss_rate(self, clf: float) -> float:
        """Interpolated miss ratio at cache load factor ``clf``."""
        if clf <= 0.0:
            return 1.0
        if clf >= 1.0:
            return 0.0
        i = int(torch.searchsorted(self._x, torch.tensor(clf, dtype=torch.float64), right=True)) - 1
        x0, x1, y0, y1 = float(self._x[i]), float(self._x[i + 1]), float(self._y[i]), float(self._y[i + 1])
        return y0 + (y1 - y0) * (clf - x0) / (x1 - x0)

    @property
    def cacheability(self) -> float:
        """Area under the miss-ratio curve over load factors 0..1 (0 = easy, 1 = hard)."""
        return float(torch.trapezoid(self._y, self._x))
