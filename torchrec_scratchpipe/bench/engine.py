"""Engine benchmark: ScratchPipe vs plain TBE over the full tables, in one run.

Run::

    python -m torchrec_scratchpipe.bench.engine --steps 40 --json out/bench_engine.json

Prints per-step planner, mover and train time of the engine, the step time of plain
FBGEMM TBE training the full tables (same device, same batches), and their ratio.

Two yardsticks are measured in the same run, every step:

- the *one-gather floor*: one ``index_select`` of the step's ids from the planner's
  per-row int32 map, taken right after the step's planning (so its cache is as warm as
  the planner left it). The planner (validation, de-duplication, hits, victims, map
  updates, next-use links) is reported as a multiple of it, and in M ids/s;
- a plain ``memcpy`` of as many bytes as the mover's host side moved that step (from a
  256 MiB buffer pair, rotating, so the source is not cache-hot), against that host side
  replayed on the same rows: gather the step's missing rows (weights and optimizer
  state: packed rows, one copy each) into a reusable staging buffer, and scatter its
  victims into the backing store.

On CUDA steps are timed with CUDA events and one synchronize per block (``StepTimer``),
never per step, so the overlap of one step's moves with the previous step's training is
what is measured; the engine plans from ids copied on an intake stream of their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_scratchpipe.compat import ComputeDevice, EmbeddingLocation, PoolingMode, SplitTableBatchedEmbeddingBagsCodegen
from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.bench.timing import StepTimer
from torchrec_scratchpipe.cli import (
    HelpFormatter, fraction, non_negative_int, positive_float, positive_int, user_errors,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import SlotPlan
from torchrec_scratchpipe.core.planner_api import PLANNER_KINDS
from torchrec_scratchpipe.bench.launches import device_step_launches
from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig


@dataclass
class EngineBenchConfig:
    """Workload of the engine benchmark.

    Args:
        tables, rows, dim: table shape (all tables alike).
        batch_size, pooling, alpha: batches of Zipf(alpha) ids, ``pooling`` ids per bag.
        load_factor: scratchpad slots as a fraction of all rows.
        lookahead, horizon: L and H.
        steps, warmup: timed and untimed steps.
        block: steps run back to back before switching to the other contender.
        device: ``cpu`` or ``cuda``.
        background_planning: see ``ScratchPipeConfig`` (None: automatic).
        unpooled: a sequence workload: unpooled tables (``EmbeddingCollection`` style,
            TBE with ``PoolingMode.NONE``), ``pooling`` being the sequence length
            (e.g. ``--unpooled --batch-size 1024 --pooling 50``).
        planner: ``ScratchPipeConfig.planner`` (``native``, ``torch``, ``device``; None:
            ``SCRATCHPIPE_PLANNER``, else by device).
    """

    tables: int = 26
    rows: int = 100_000
    dim: int = 64
    batch_size: int = 4096
    pooling: int = 1
    alpha: float = 1.05
    load_factor: float = defaults.LOAD_FACTOR
    lookahead: int = defaults.LOOKAHEAD
    horizon: Optional[int] = None
    steps: int = 40
    warmup: int = 5
    block: int = 10
    device: str = "cpu"
    seed: int = 0
    background_planning: Optional[bool] = None
    unpooled: bool = False
    planner: Optional[str] = None

    def __post_init__(self) -> None:
        defaults.check_window(self.lookahead, self.horizon)


def _batches(cfg: EngineBenchConfig, n: int) -> List[KeyedJaggedTensor]:
    data = SyntheticClickLog(
        SyntheticConfig(
            num_embeddings=[cfg.rows] * cfg.tables,
            batch_size=cfg.batch_size,
            pooling=cfg.pooling,
            pooling_dist="fixed",
            alpha=cfg.alpha,
            seed=cfg.seed,
        )
    )
    return [data.kjt(i) for i in tqdm(range(n), desc="generating batches", leave=False)]


def _full_tbe(cfg: EngineBenchConfig, device: torch.device) -> SplitTableBatchedEmbeddingBagsCodegen:
    on_cuda = device.type == "cuda"
    loc = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
    spec = [(cfg.rows, cfg.dim, loc, ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU)] * cfg.tables
    pooling = PoolingMode.NONE if cfg.unpooled else PoolingMode.SUM
    return SplitTableBatchedEmbeddingBagsCodegen(
        spec, optimizer=OPTIMIZERS_BY_NAME[defaults.OPTIMIZER], device=device, pooling_mode=pooling
    )


def _engine(cfg: EngineBenchConfig, device: torch.device) -> ScratchPipeEmbeddingBags:
    kind = EmbeddingConfig if cfg.unpooled else EmbeddingBagConfig
    tables = [
        kind(name=f"t{i}", embedding_dim=cfg.dim, num_embeddings=cfg.rows, feature_names=[f"f{i}"])
        for i in range(cfg.tables)
    ]
    sp = ScratchPipeConfig(
        load_factor=cfg.load_factor, lookahead=cfg.lookahead, horizon=cfg.horizon,
        optimizer=OPTIMIZERS_BY_NAME[defaults.OPTIMIZER], background_planning=cfg.background_planning,
        planner=cfg.planner,
    )
    return ScratchPipeEmbeddingBags(tables, sp, device=device)


class _HostMoverProbe:
    """Times the mover's host side on a step's plan against a plain memcpy of the same bytes."""

    def __init__(self, emb: ScratchPipeEmbeddingBags, capacity: int) -> None:
        self.store = next(iter(emb.groups.values())).store
        self.staging = self.store.empty_rows(capacity)  # packed rows: weights and state together
        self.row_bytes = self.store.layout.bytes_per_row
        self.src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
        self.dst = torch.empty(256 << 20, dtype=torch.uint8).fill_(2)
        self.offset = 0

    def measure(self, plan: SlotPlan) -> Dict[str, float]:
        """Seconds of gather + scatter and of memcpy for ``plan``, and the bytes moved."""
        t0 = time.perf_counter()
        self.store.gather(plan.miss_rows, out=self.staging)
        t1 = time.perf_counter()
        back = self.store.gather(plan.victim_rows, out=self.staging)  # the values they hold now
        t2 = time.perf_counter()
        self.store.scatter(plan.victim_rows, back)  # rewrites identical values
        t3 = time.perf_counter()
        nbytes = (plan.miss_rows.numel() + plan.victim_rows.numel()) * self.row_bytes
        if self.offset + nbytes > self.src.numel():
            self.offset = 0
        a, b = self.src[self.offset : self.offset + nbytes], self.dst[self.offset : self.offset + nbytes]
        t4 = time.perf_counter()
        b.copy_(a)
        t5 = time.perf_counter()
        self.offset += nbytes
        return {"host": (t1 - t0) + (t3 - t2), "memcpy": t5 - t4, "bytes": float(nbytes)}


def _launches(cfg: EngineBenchConfig, emb: ScratchPipeEmbeddingBags, group: Any) -> int:
    """Ops one plan-and-move step of a device-planned group dispatches (``bench.launches``), at
    this run's sizes, counted on meta tensors (its steps have the same ops at every size).
    Capacity is raised to fit the window by id count there: a stall check would read data."""
    ids = cfg.batch_size * cfg.pooling
    horizon = cfg.lookahead if cfg.horizon is None else cfg.horizon
    capacity = max(group.capacity, (cfg.lookahead + 1) * ids * len(group.tables))
    steps = device_step_launches(group.store.table_rows, capacity, ids, cfg.lookahead, horizon, group.layout, steps=2)
    return steps[-1]


def _median_rate(nbytes: List[float], seconds: List[float]) -> float:
    """Median of per-step GB/s."""
    return statistics.median(b / t / 1e9 for b, t in zip(nbytes, seconds)) if seconds else float("nan")


def run(cfg: EngineBenchConfig) -> Dict[str, object]:
    """Alternate blocks of full-table TBE and ScratchPipe steps, so both see the same machine."""
    device = torch.device(cfg.device)
    ahead = max(cfg.lookahead, cfg.horizon or 0) + 1  # announced batches: L planned, all within H ranked
    n = cfg.steps + cfg.warmup
    emb = _engine(cfg, device)  # first: it refuses a bad table shape by name, before any work
    batches = [k.to(device) for k in _batches(cfg, n + ahead)]
    tbe = _full_tbe(cfg, device)
    group = next(iter(emb.groups.values()))
    base = group.store.offsets[:-1]
    group_ids = [k.values().cpu() + torch.repeat_interleave(base, torch.tensor(k.length_per_key())) for k in batches]
    probe = _HostMoverProbe(emb, group.capacity)
    if device.type == "cuda":
        # plan from ids copied on their own stream, as a pipeline's data-distribution stream does
        emb.intake_stream = torch.cuda.Stream(device)
        torch.cuda.synchronize(device)  # the batches are on the device before anything is timed
    for k in batches[:ahead]:
        emb.prefetch(k)
    keys = ("planner_s", "mover_s", "planner_background_s", "mover_background_s", "blocked_s")
    extra = ("floor", "host_mover", "memcpy", "moved_bytes")
    rec: Dict[str, List[float]] = {k: [] for k in ("full", "total", "train", "planner_fg", "mover_fg") + keys + extra}
    timer = StepTimer(device)  # CUDA: events, one synchronize per block (no per-step wait)
    bar = tqdm(total=2 * n, desc="full TBE / ScratchPipe", leave=False)
    for start in range(0, n, cfg.block):  # alternate blocks: both see the same machine state
        block = range(start, min(n, start + cfg.block))
        for i in block:
            k = batches[i]
            timer.begin()
            tbe(k.values(), k.offsets()).sum().backward()
            timer.end()
            bar.update(1)
        rec["full"].extend(t for i, t in zip(block, timer.flush()) if i >= cfg.warmup)
        parts = []
        for i in block:
            before = emb.stats()[group.name]
            timer.begin()
            emb.pooled(batches[i]).sum().backward()
            emb.prefetch(batches[i + ahead])
            timer.end()
            after = emb.stats()[group.name]
            t1 = time.perf_counter()
            group.planner.row_to_slot.index_select(0, group_ids[i + ahead])  # the one-gather floor
            floor = time.perf_counter() - t1
            newest = group.window.planned[-1].plan if group.window.planned else None
            m = probe.measure(newest) if newest is not None and device.type == "cpu" and i >= cfg.warmup else None
            parts.append(({k: after[k] - before[k] for k in keys}, floor, m))
            bar.update(1)
        for i, total, (d, floor, m) in zip(block, timer.flush(), parts):
            if i < cfg.warmup:
                continue
            # the parts done on the training thread, not next to it
            planner_fg = d["planner_s"] - d["planner_background_s"]
            mover_fg = d["mover_s"] - d["mover_background_s"]
            rec["total"].append(total)
            rec["planner_fg"].append(planner_fg)
            rec["mover_fg"].append(mover_fg)
            rec["train"].append(total - planner_fg - mover_fg - d["blocked_s"])
            for k in keys:
                rec[k].append(d[k])
            rec["floor"].append(floor)
            if m is not None:
                rec["host_mover"].append(m["host"])
                rec["memcpy"].append(m["memcpy"])
                rec["moved_bytes"].append(m["bytes"])
    bar.close()
    ms = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in rec.items()}
    step = ms["total"]
    ids_per_step = statistics.mean(k.values().numel() for k in batches)
    # per-step bandwidths, then medians: one stalled step (a busy machine) does not skew them
    host_gbps = _median_rate(rec["moved_bytes"], rec["host_mover"])
    memcpy_gbps = _median_rate(rec["moved_bytes"], rec["memcpy"])
    ratios = [m / h for h, m in zip(rec["host_mover"], rec["memcpy"])]
    return {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "native_planner": group.planner.kind == "native",
        "planner_kind": group.planner.kind,
        "launches_per_step": _launches(cfg, emb, group) if group.planner.kind == "device" else None,
        "background_planning": emb.config.plans_in_background(device, batches[0].values().numel()),
        "full_tbe_step_ms": ms["full"],
        "scratchpipe_step_ms": step,
        "planner_ms": ms["planner_s"],
        "mover_ms": ms["mover_s"],
        "planner_on_step_ms": ms["planner_fg"],
        "mover_on_step_ms": ms["mover_fg"],
        "planner_background_ms": ms["planner_background_s"],
        "mover_background_ms": ms["mover_background_s"],
        "blocked_ms": ms["blocked_s"],
        "train_ms": ms["train"],
        "overhead_ratio": step / ms["full"],
        # what planning costs the step: its part on the training thread, plus every wait
        # for background work (counted against the planner, though it includes moving)
        "planner_fraction": (ms["planner_fg"] + ms["blocked_s"]) / step,
        "planner_busy_fraction": ms["planner_s"] / step,
        "ids_per_step": ids_per_step,
        "floor_ms": ms["floor"],
        "planner_floor_ratio": ms["planner_s"] / ms["floor"],
        "planner_m_ids_per_s": ids_per_step / ms["planner_s"] / 1e3,
        "floor_m_ids_per_s": ids_per_step / ms["floor"] / 1e3,
        "host_mover_ms": ms["host_mover"],
        "memcpy_ms": ms["memcpy"],
        "host_mover_gbps": host_gbps,
        "memcpy_gbps": memcpy_gbps,
        "host_mover_memcpy_ratio": statistics.median(ratios) if ratios else float("nan"),
        "engine_stats": emb.stats(),
    }


def format_table(result: Dict[str, Any]) -> str:
    """The benchmark result as an aligned text table."""
    r = result
    rows = [
        ("full-table TBE step", f"{r['full_tbe_step_ms']:.2f} ms"),
        ("ScratchPipe step", f"{r['scratchpipe_step_ms']:.2f} ms"),
        ("  on the training thread:", ""),
        ("    planner (checks, dedup, plans)", f"{r['planner_on_step_ms']:.2f} ms"),
        ("    mover", f"{r['mover_on_step_ms']:.2f} ms"),
        ("    waiting for background work", f"{r['blocked_ms']:.2f} ms"),
        ("    train (TBE on slots)", f"{r['train_ms']:.2f} ms"),
        ("  next to training (background):", ""),
        ("    planner", f"{r['planner_background_ms']:.2f} ms"),
        ("    mover", f"{r['mover_background_ms']:.2f} ms"),
        ("planner cost to the step", f"{100 * r['planner_fraction']:.1f}% (on the training thread + waits)"),
        ("planner busy time", f"{100 * r['planner_busy_fraction']:.1f}% of step (both threads)"),
        ("planner launches per group per step", "host planner" if r["launches_per_step"] is None else str(r["launches_per_step"])),
        (f"planner per step ({r['planner_kind']})", f"{r['planner_ms']:.2f} ms, {r['planner_m_ids_per_s']:.1f} M ids/s"),
        ("one-gather floor", f"{r['floor_ms']:.3f} ms, {r['floor_m_ids_per_s']:.0f} M ids/s"),
        ("planner / floor", f"{r['planner_floor_ratio']:.1f}x"),
        ("mover host side (gather + scatter)", f"{r['host_mover_ms']:.2f} ms, {r['host_mover_gbps']:.1f} GB/s"),
        ("memcpy of the same bytes", f"{r['memcpy_ms']:.2f} ms, {r['memcpy_gbps']:.1f} GB/s"),
        ("mover host side / memcpy", f"{100 * r['host_mover_memcpy_ratio']:.0f}% (median of per-step ratios)"),
        ("overhead ratio (SP / full)", f"{r['overhead_ratio']:.3f}"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}".rstrip() for a, b in rows)


PROG = "python -m torchrec_scratchpipe.bench.engine"
#: Help text and value type of every ``EngineBenchConfig`` flag.
FLAGS: Dict[str, Tuple[str, Any]] = {
    "tables": ("tables (all alike)", positive_int),
    "rows": ("rows per table", positive_int),
    "dim": ("embedding dim, a multiple of 4", positive_int),
    "batch_size": ("samples per step", positive_int),
    "pooling": ("ids per bag (--unpooled: the sequence length)", positive_int),
    "alpha": ("Zipf exponent of the ids", positive_float),
    "load_factor": ("scratchpad slots as a fraction of all rows, in (0, 1]", fraction),
    "lookahead": ("L", non_negative_int),
    "horizon": ("H (default: L)", non_negative_int),
    "steps": ("timed steps", positive_int),
    "warmup": ("untimed first steps", non_negative_int),
    "block": ("steps run back to back before switching to the other contender", positive_int),
    "device": ("cpu or cuda", str),
    "seed": ("seed of the ids", non_negative_int),
    "unpooled": ("unpooled tables (EmbeddingCollection style)", None),
}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    d = EngineBenchConfig()
    for name, value in asdict(d).items():
        flag = f"--{name.replace('_', '-')}"
        if name == "background_planning":
            parser.add_argument(flag, choices=["auto", "on", "off"], default="auto",
                                help="plan on a background thread (auto: ScratchPipeConfig's choice)")
        elif name == "planner":
            parser.add_argument(flag, choices=list(PLANNER_KINDS), default=None,
                                help="slot planner (default: SCRATCHPIPE_PLANNER, else by device)")
        elif name == "device":
            parser.add_argument(flag, choices=["cpu", "cuda"], default=value, help="training device")
        elif isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=FLAGS[name][0])
        else:
            text, kind = FLAGS[name]
            parser.add_argument(flag, type=kind, default=value, help=text)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = vars(parser.parse_args(argv))
    if args["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    out = args.pop("json")
    args["background_planning"] = {"auto": None, "on": True, "off": False}[args["background_planning"]]
    with user_errors(PROG):
        result = run(EngineBenchConfig(**args))
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
