"""What one policy did on one stream: per-step misses, evictions and bypasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch


@dataclass
class SimResult:
    """Per-step counters of one simulated policy.

    Args:
        policy: policy name.
        capacity: cache slots the policy actually had (set-associative caches round
            down to whole sets).
        misses: per step, rows brought in from host memory (every non-resident row the
            batch needs, including set-associative inserts that failed).
        evictions: per step, resident rows evicted (written back).
        bypassed: per step, misses that did not become resident (failed insert: the row
            was served from host memory). Zero for every policy but the set-associative ones.
        unique: per step, distinct rows looked up.
        lookups: ids looked up, duplicates included.
        seconds: wall time of the simulation.
        extra: policy-specific facts (e.g. ScratchPipe stalls).

    Example::

        >>> r = SimResult("x", 4, torch.tensor([2, 1]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.int64),
        ...               torch.tensor([2, 2]), lookups=5)
        >>> r.total_misses, r.miss_ratio
        (3, 0.75)
    """

    policy: str
    capacity: int
    misses: torch.Tensor
    evictions: torch.Tensor
    bypassed: torch.Tensor
    unique: torch.Tensor
    lookups: int
    seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of steps simulated."""
        return int(self.misses.numel())

    @property
    def total_misses(self) -> int:
        """Rows brought in over the whole stream."""
        return int(self.misses.sum())

    @property
    def total_evictions(self) -> int:
        """Rows evicted over the whole stream."""
        return int(self.evictions.sum())

    @property
    def total_bypassed(self) -> int:
        """Misses that were served from host memory without becoming resident."""
        return int(self.bypassed.sum())

    @property
    def miss_ratio(self) -> float:
        """Misses over distinct rows looked up (TorchRec's ``expected_miss_rate`` unit)."""
        u = int(self.unique.sum())
        return self.total_misses / u if u else 0.0

    def misses_after(self, warmup: int) -> int:
        """Misses of steps ``warmup ..`` (cold start excluded)."""
        return int(self.misses[warmup:].sum())

    def miss_ratio_after(self, warmup: int) -> float:
        """Miss ratio of steps ``warmup ..``."""
        u = int(self.unique[warmup:].sum())
        return self.misses_after(warmup) / u if u else 0.0

    @property
    def lookups_per_second(self) -> float:
        """Simulation speed in ids (duplicates included) per second."""
        return self.lookups / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self, per_step: bool = True) -> Dict[str, Any]:
        """Plain-data summary (and per-step misses / evictions when ``per_step``)."""
        out: Dict[str, Any] = {
            "policy": self.policy,
            "capacity": self.capacity,
            "steps": self.steps,
            "lookups": self.lookups,
            "unique_lookups": int(self.unique.sum()),
            "misses": self.total_misses,
            "evictions": self.total_evictions,
            "bypassed": self.total_bypassed,
            "miss_ratio": self.miss_ratio,
            "seconds": self.seconds,
            "lookups_per_second": self.lookups_per_second,
            **self.extra,
        }
        if per_step:
            out["misses_per_step"] = self.misses.tolist()
            out["evictions_per_step"] = self.evictions.tolist()
            if self.total_bypassed:
                out["bypassed_per_step"] = self.bypassed.tolist()
        return out
