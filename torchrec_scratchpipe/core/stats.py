"""Per-group counters of a ScratchPipe engine: the one place they are kept.

Every part of a table group writes its counters here as it works: the window (stalls,
planning time), the mover (traffic, moving time), the engine (lookups, steps) and the
background worker (the time training waited for it). ``as_dict`` is what
``ScratchPipeEmbeddingBags.stats()`` reports, plus the group's ``capacity``.

Counts a device planner computes stay on its device (``add`` and ``peak`` take 0-dim
tensors there, and sum or max them on the device): they are read, once, by ``as_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, Union

import torch


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
        >>> s.add("plan_misses", torch.tensor(2)); s.peak("peak_held_rows", torch.tensor(7))
        >>> s.as_dict()["plan_misses"], s.peak_held_rows
        (6, 7)
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
    _on_device: Dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _peaks: Dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def add(self, name: str, value: Union[int, torch.Tensor]) -> None:
        """Add ``value`` to counter ``name``; a tensor is summed where it lives, read later."""
        if isinstance(value, torch.Tensor):
            prev = self._on_device.get(name)
            self._on_device[name] = value.long() if prev is None else prev + value
        else:
            setattr(self, name, getattr(self, name) + value)

    def peak(self, name: str, value: Union[int, torch.Tensor]) -> None:
        """Raise counter ``name`` to ``value`` if larger; a tensor is compared where it lives."""
        if isinstance(value, torch.Tensor):
            prev = self._peaks.get(name)
            self._peaks[name] = value.long() if prev is None else torch.maximum(prev, value)
        else:
            setattr(self, name, max(getattr(self, name), value))

    def settle(self) -> None:
        """Fold the counts kept on a device into the counters (reads the device once)."""
        names = list(self._on_device) + list(self._peaks)
        if not names:
            return
        values = torch.stack(list(self._on_device.values()) + list(self._peaks.values())).tolist()
        for i, name in enumerate(names):
            if i < len(self._on_device):
                setattr(self, name, getattr(self, name) + values[i])
            else:
                setattr(self, name, max(getattr(self, name), values[i]))
        self._on_device.clear()
        self._peaks.clear()

    def as_dict(self) -> Dict[str, float]:
        """Counters plus the derived plan-time hit rate."""
        self.settle()
        d: Dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["hit_rate"] = 1.0 - self.plan_misses / self.unique_rows if self.unique_rows else 0.0
        return d
