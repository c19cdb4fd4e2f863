"""Run one arm of an A/B comparison: train, time every step, count traffic."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_scratchpipe.bench.timing import StepTimer
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.distributed.stats import cache_stats, scratchpipe_kernels
from torchrec_scratchpipe.training import AnySpec, KernelChoice, build_trainer, local_table_weights


@dataclass
class ArmResult:
    """What one arm measured.

    Args:
        label: arm name in reports.
        simulated: True when the numbers come from the cache simulator, not training.
        step_s: time of each timed step (empty when simulated): on CPU its wall time; on
            CUDA the device time since the previous step ended (CUDA events, one
            synchronize per ``TIMING_BLOCK`` steps: the host runs ahead as in training).
        losses: loss of every step (empty when simulated).
        breakdown_s: per timed step, seconds by part: ``planner``, ``mover``, ``wait`` (for the
            background planner) and ``rest`` on the training thread, and ``background`` (planning
            and moving done next to training).
        h2d_rows, d2h_rows: rows moved per step (all steps).
        h2d_bytes, d2h_bytes: bytes moved per step (all steps): what the engines counted,
            each row priced by its table's ``RowLayout`` (weights in the table's dtype, plus
            the optimizer state where the kernel moves it).
        lookups, unique_rows, misses, train_misses: totals.
        row_bytes: bytes one row takes in device memory (weights + optimizer state).
        device_bytes: bytes of embedding state resident on the device.
        peak_device_bytes: measured peak device memory (CUDA only).
        cache: ``cache_stats`` of the trained model (ScratchPipe arms; not serialized).
        notes: real problems found in this arm, one short line each (e.g. window stalls).
        error: why the arm did not run to the end (None: it did); it then has no numbers.
        weights: final local table weights (not serialized).
    """

    label: str
    simulated: bool = False
    step_s: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    breakdown_s: Dict[str, List[float]] = field(default_factory=dict)
    h2d_rows: List[int] = field(default_factory=list)
    d2h_rows: List[int] = field(default_factory=list)
    h2d_bytes: List[int] = field(default_factory=list)
    d2h_bytes: List[int] = field(default_factory=list)
    lookups: int = 0
    unique_rows: int = 0
    misses: int = 0
    train_misses: int = 0
    row_bytes: int = 0
    device_bytes: int = 0
    peak_device_bytes: Optional[int] = None
    cache: Dict[str, Dict[str, object]] = field(default_factory=dict, repr=False)
    notes: List[str] = field(default_factory=list)
    error: Optional[str] = None
    weights: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


#: Steps timed between two device synchronizations on CUDA.
TIMING_BLOCK = 16


def _sp_counters(model: torch.nn.Module) -> Dict[str, float]:
    """Summed engine counters of this rank's ScratchPipe kernels."""
    total: Dict[str, float] = {}
    for kernel in scratchpipe_kernels(model):
        for stats in kernel.engine.stats().values():
            for k, v in stats.items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0.0) + v
    return total


def run_arm(
    spec: AnySpec,
    choice: KernelChoice,
    batches: Sequence[Batch],
    warmup: int,
    device: torch.device,
    initial_state: Dict[str, torch.Tensor],
    progress: bool = True,
) -> ArmResult:
    """Train ``batches`` under ``choice`` and measure every step.

    Args:
        spec: the model (DLRM or sequence).
        choice: the arm's kernel (``choice.tables`` on it, the others on ``fused``).
        batches: the data, identical for every arm.
        warmup: leading steps left out of the timing statistics.
        device: training device.
        initial_state: the common starting weights.
        progress: tqdm bar.
    """
    trainer = build_trainer(spec, choice, device, initial_state)
    result = ArmResult(choice.label, row_bytes=RowLayout.for_table(spec.optimizer, spec.tables[0]).bytes_per_row)
    cached = [t.num_embeddings for t in spec.tables if choice.tables is None or t.name in choice.tables]
    resident = sum(t.num_embeddings for t in spec.tables) - sum(cached)
    slots = resident + (int(choice.load_factor * sum(cached)) if choice.kernel != "fused" else sum(cached))
    result.device_bytes = slots * result.row_bytes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = iter(batches)
    bar = tqdm(total=len(batches), desc=choice.label, disable=not progress, leave=False)
    before = _sp_counters(trainer.model)
    result.breakdown_s = {"planner": [], "mover": [], "wait": [], "rest": [], "background": []}
    # CUDA: events and one synchronize per block, no per-step wait (see bench/timing.py)
    timer = StepTimer(device)
    elapsed: List[float] = []
    losses: List[torch.Tensor] = []
    deltas: List[Dict[str, float]] = []
    step = 0
    while True:
        timer.begin()
        try:
            out = trainer.pipeline.progress(it)
        except StopIteration:
            break
        if timer.cuda:
            timer.end()
            losses.append(out[0].detach())
        else:
            losses.append(out[0].detach().float())  # on CPU the step is done: read it, then stop the clock
            timer.end()
        after = _sp_counters(trainer.model)
        deltas.append({k: after.get(k, 0.0) - before.get(k, 0.0) for k in after})
        before = after
        step += 1
        if step % TIMING_BLOCK == 0:
            elapsed.extend(timer.flush())
        bar.update(1)
    elapsed.extend(timer.flush())
    bar.close()
    result.losses = [float(x) for x in losses]
    for i, (d, seconds) in enumerate(zip(deltas, elapsed)):
        result.h2d_rows.append(int(d.get("h2d_rows", 0)))
        result.d2h_rows.append(int(d.get("d2h_rows", 0)))
        result.h2d_bytes.append(int(d.get("h2d_bytes", 0)))
        result.d2h_bytes.append(int(d.get("d2h_bytes", 0)))
        if i >= warmup:
            result.step_s.append(seconds)
            # on the training thread; the background planner's share overlaps training
            background = d.get("planner_background_s", 0.0) + d.get("mover_background_s", 0.0)
            planner = d.get("planner_s", 0.0) - d.get("planner_background_s", 0.0)
            mover = d.get("mover_s", 0.0) - d.get("mover_background_s", 0.0)
            wait = d.get("blocked_s", 0.0)
            for part, value in (("planner", planner), ("mover", mover), ("wait", wait), ("background", background)):
                result.breakdown_s[part].append(value)
            result.breakdown_s["rest"].append(seconds - planner - mover - wait)
    if choice.kernel == "scratchpipe":
        h = choice.horizon if choice.horizon is not None else choice.lookahead
        if warmup < h + 1 or len(elapsed) - warmup < 4 * h:
            note = (
                f"{len(elapsed) - warmup} timed steps after {warmup} warm-up with H={h}: the timings "
                f"include filling the window; time at least 4H={4 * h} steps after at least H+1={h + 1} warm-up."
            )
            result.notes.append(note)
            print(f"note: {choice.label}: {note}", file=sys.stderr)
    totals = _sp_counters(trainer.model)
    result.lookups = int(totals.get("lookups", 0))
    result.unique_rows = int(totals.get("unique_rows", 0))
    result.misses = int(totals.get("plan_misses", 0))
    result.train_misses = int(totals.get("train_misses", 0))
    if device.type == "cuda":
        result.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    result.weights = local_table_weights(trainer.model, [t.name for t in spec.tables])
    result.cache = cache_stats(trainer.model)
    return result
