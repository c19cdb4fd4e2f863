"""Step times that do not change what they measure: CUDA events, one synchronize per block.

Synchronizing the device after every step would hide the overlap ScratchPipe depends on
(batch j+1's rows moving in while batch j trains) and add a host round trip per step. On
CUDA, ``StepTimer`` records an event on the current stream after each step and reads
them all with one synchronize at the end of a block: a step's time is the device time
between the end of the step before it (or the block's start) and its own end, which is
what a training loop that never waits sees in throughput. On CPU a step is timed on the
host clock from ``begin`` to ``end``, as before.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional

import torch


class StepTimer:
    """Times steps in blocks.

    Args:
        device: the training device.

    Example::

        >>> timer = StepTimer(torch.device("cpu"))
        >>> for _ in range(3):
        ...     timer.begin()
        ...     _ = torch.ones(8).sum()
        ...     timer.end()
        >>> len(timer.flush()), timer.flush()
        (3, [])
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._t0 = 0.0
        self._host: List[float] = []
        self._events: List[Any] = []
        self._start: Optional[Any] = None
        self.syncs = 0  # device synchronizations: one per flushed block on CUDA

    def begin(self) -> None:
        """A step starts (on CUDA only the block's first ``begin`` records anything)."""
        if self.cuda:
            if self._start is None:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record(torch.cuda.current_stream(self.device))
        else:
            self._t0 = time.perf_counter()

    def end(self) -> None:
        """The step's work is issued (CUDA: an event after it; CPU: it is done)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self._events.append(ev)
        else:
            self._host.append(time.perf_counter() - self._t0)

    def flush(self) -> List[float]:
        """Seconds of each step since the last flush (one device synchronize on CUDA)."""
        if not self.cuda:
            out, self._host = self._host, []
            return out
        if not self._events:
            return []
        self._events[-1].synchronize()
        self.syncs += 1
        marks = [self._start] + self._events
        out = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        self._events, self._start = [], None
        return out
