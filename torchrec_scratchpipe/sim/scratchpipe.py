"""ScratchPipe at lookahead L and horizon H, driven by the engine's own planner.

This is not a model of the engine: it *is* the engine's planning code
(:class:`~torchrec_scratchpipe.core.plan.SlotPlanner` and
:class:`~torchrec_scratchpipe.core.window.PlanWindow`) fed with row ids and no weights.
The driver mirrors a training loop: batches ``0 .. H`` are pushed first, then each step
pops the next training batch (retiring the previous one) and pushes one more, so the
planner of batch ``j`` reads the next uses of its candidates in batches ``j+1 .. j+H-L``.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Union

import torch

from torchrec_scratchpipe.core.plan import SlotPlanner
from torchrec_scratchpipe.core.policy import VictimPolicy
from torchrec_scratchpipe.core.window import PlanWindow, WindowEntry
from torchrec_scratchpipe.defaults import check_window
from torchrec_scratchpipe.sim._progress import steps
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.stream import BatchStream


def simulate_scratchpipe(
    stream: BatchStream,
    capacity: int,
    lookahead: int = 1,
    horizon: int = 1,
    victim_policy: Union[VictimPolicy, str] = VictimPolicy.FUTURE,
    progress: bool = False,
    log_plans: bool = False,
) -> SimResult:
    """Replay ``stream`` through the engine planner with ``capacity`` slots.

    Args:
        stream: the batches.
        capacity: scratchpad slots C.
        lookahead: L, batches planned (rows moved in) ahead of the training batch.
        horizon: H >= L, batches whose ids guide victim choice.
        victim_policy: the planner's ``VictimPolicy`` (or its name): ``"future"``
            (ScratchPipe) or ``"lru"``.
        progress: show a tqdm bar.
        log_plans: keep every plan, in planning order, in ``result.extra["plans"]``
            (as ``(step, miss_rows, victim_rows)``; used by the reference check).

    Raises:
        CapacityError: a batch has more distinct rows than ``capacity``.

    Example::

        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0])], 3)
        >>> simulate_scratchpipe(s, 2, lookahead=0, horizon=2).total_misses  # keeps row 0
        3
    """
    policy = VictimPolicy.parse(victim_policy)
    check_window(lookahead, horizon)
    t0 = time.perf_counter()
    n = stream.num_steps
    misses = torch.zeros(n, dtype=torch.int64)
    evictions = torch.zeros(n, dtype=torch.int64)
    plans = []

    def on_planned(entry: WindowEntry) -> None:
        plan = entry.plan
        assert plan is not None
        misses[entry.step] = plan.miss_rows.numel()
        evictions[entry.step] = plan.victim_rows.numel()
        if log_plans:
            plans.append((entry.step, plan.miss_rows.clone(), plan.victim_rows.clone()))

    planner = SlotPlanner(stream.num_rows, capacity, policy=policy)
    window = PlanWindow(planner, lookahead, horizon, on_planned)
    pushed = 0
    while pushed < min(horizon + 1, n):
        window.push(stream.rows[pushed])
        pushed += 1
    for _ in steps(n, f"scratchpipe L={lookahead} H={horizon}", progress):
        window.pop()
        if pushed < n:
            window.push(stream.rows[pushed])
            pushed += 1
    window.retire()
    extra: Dict[str, Any] = {"lookahead": lookahead, "horizon": horizon, "victim_policy": policy.value, "stalls": window.stalls}
    if log_plans:
        extra["plans"] = plans
    return SimResult("scratchpipe", capacity, misses, evictions, torch.zeros_like(misses),
                     stream.unique_per_step(), stream.lookups, time.perf_counter() - t0, extra)
