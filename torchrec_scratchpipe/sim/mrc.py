"""Miss-ratio curves: one policy's misses over a range of capacities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from torchrec_scratchpipe.core.plan import CapacityError
from torchrec_scratchpipe.sim.policies import PolicyOptions, simulate
from torchrec_scratchpipe.sim.stream import BatchStream


@dataclass
class MissRatioCurve:
    """Misses of one policy at several capacities.

    Args:
        policy: policy name.
        capacities: cache rows, ascending.
        misses: rows brought in at each capacity (``None`` where the policy cannot run:
            a batch is larger than the cache).
        miss_ratio: misses over distinct rows looked up (``1.0`` where infeasible).
        rows_per_step: mean rows brought in per step (``None`` where infeasible).
        num_rows: size of the row space (for load factors).
        warmup: leading steps left out of every number (cold start).
    """

    policy: str
    capacities: List[int]
    misses: List[Optional[int]]
    miss_ratio: List[float]
    rows_per_step: List[Optional[float]]
    num_rows: int
    warmup: int = 0
    evictions: List[Optional[int]] = field(default_factory=list)

    @property
    def load_factors(self) -> List[float]:
        """Capacities as fractions of the row space."""
        return [c / self.num_rows for c in self.capacities]

    def to_json(self) -> Dict[str, Any]:
        """Plain data."""
        return {"policy": self.policy, "num_rows": self.num_rows, "warmup": self.warmup,
                "capacities": self.capacities, "load_factors": self.load_factors, "misses": self.misses,
                "evictions": self.evictions, "miss_ratio": self.miss_ratio, "rows_per_step": self.rows_per_step}


def miss_ratio_curve(
    stream: BatchStream,
    policy: str,
    capacities: Sequence[int],
    options: PolicyOptions = PolicyOptions(),
    warmup: int = 0,
) -> MissRatioCurve:
    """Simulate ``policy`` at each capacity (one replay per capacity).

    Args:
        stream: the batches.
        policy: a policy name.
        capacities: cache sizes in rows.
        options: lookahead, horizon, ways.
        warmup: leading steps excluded from the counts (the cache still sees them).

    Example::

        >>> import torch
        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0])], 3)
        >>> miss_ratio_curve(s, "opt", [1, 2, 3]).misses
        [None, 3, 3]
    """
    caps = sorted(int(c) for c in capacities)
    misses: List[Optional[int]] = []
    evictions: List[Optional[int]] = []
    ratio: List[float] = []
    per_step: List[Optional[float]] = []
    steps = max(stream.num_steps - warmup, 1)
    for c in caps:
        try:
            r = simulate(stream, policy, c, options)
        except CapacityError:
            misses.append(None)
            evictions.append(None)
            ratio.append(1.0)
            per_step.append(None)
            continue
        m = r.misses_after(warmup)
        misses.append(m)
        evictions.append(int(r.evictions[warmup:].sum()))
        ratio.append(r.miss_ratio_after(warmup))
        per_step.append(m / steps)
    return MissRatioCurve(policy, caps, misses, ratio, per_step, stream.num_rows, warmup, evictions)
