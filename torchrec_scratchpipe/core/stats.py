"""Per-group counters of a ScratchPipe engine: the one place they are kept.

Every part of a table group writes its counters here as it works: the window (stalls,
planning time), the mover (traffic, moving time), the engine (lookups, steps) and the
background worker (the time training waited for it). ``as_dict`` is what
``ScratchPipeEmbeddingBags.stats()`` reports, plus the group's ``capacity``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict


@dataclass
class GroupStats:
    """Counters of one table group, accumulated over all steps (the only copy of each).

    Args:
        steps: batches trained.
        lookups: ids looked up (with duplicates).
        unique_rows: distinct rows summed over batches.
        plan_misses: rows not resident when their batch was planned (brought in).
        train_misses: rows not resident when their batch trained (0 by construction).
        evictions: resident rows replaced.
        h2d_rows, h2d_bytes: rows/bytes copied host -> device (weights + state).
        d2h_rows, d2h_bytes: rows/bytes written back device -> host.
        peak_held_rows: most slots held at once by the window.
        window_stalls: times planning waited for the window to drain (lookahead shrank).
        planner_s, mover_s: seconds spent planning and moving, wherever they ran.
        planner_background_s, mover_background_s: the parts of ``planner_s`` and
            ``mover_s`` run by the background worker, next to training (see
            ``ScratchPipeConfig.background_planning``).
        blocked_s: seconds training waited for the background worker (the engine's
            worker serves every group: each gets an equal share).

    Example::

        >>> s = GroupStats(unique_rows=10, plan_misses=4)
        >>> s.as_dict()["hit_rate"]
        0.6
    """

    steps: int = 0
    lookups: int = 0
    unique_rows: int = 0
    plan_misses: int = 0
    train_misses: int = 0
    evictions: int = 0
    h2d_rows: int = 0
    h2d_bytes: int = 0
    d2h_rows: int = 0
    d2h_bytes: int = 0
    peak_held_rows: int = 0
    window_stalls: int = 0
    planner_s: float = 0.0
    mover_s: float = 0.0
    planner_background_s: float = 0.0
    mover_background_s: float = 0.0
    blocked_s: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        """Counters plus the derived plan-time hit rate."""
        d: Dict[str, float] = asdict(self)
        d["hit_rate"] = 1.0 - self.plan_misses / self.unique_rows if self.unique_rows else 0.0
        return d
