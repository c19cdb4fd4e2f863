"""A/B comparison: the same model and data under fused, fused_uvm_caching and ScratchPipe.

Run::

    python -m torchrec_scratchpipe.ab --out out/ab
    python -m torchrec_scratchpipe.ab --data trace:my_trace.pt.gz --batch-size 2048 --load-factor 0.05
    python -m torchrec_scratchpipe.ab --model sequence --out out/ab_sequence   # EmbeddingCollection

Writes ``report.md``, ``report.json``, ``throughput.png`` and ``traffic.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.ab.arms import ArmResult, run_arm
from torchrec_scratchpipe.ab.config import DATA_TYPES, ABConfig
from torchrec_scratchpipe.ab.report import write_report
from torchrec_scratchpipe.ab.simulated import simulate_uvm_arm
from torchrec_scratchpipe.advise.stalls import stall_notes
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME, RowLayout
from torchrec_scratchpipe.data.source import open_source
from torchrec_scratchpipe.quiet import quiet_known_noise
from torchrec_scratchpipe.sequence_model import SequenceSpec, table_view
from torchrec_scratchpipe.training import KernelChoice, ModelSpec, init_single_process_group


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available: use --device cpu or auto.")
    return torch.device(name)


@dataclasses.dataclass
class Workload:
    """The model and data every arm trains, and the id streams the simulator and advisor replay.

    Args:
        spec: the model (``ModelSpec`` or ``SequenceSpec``).
        batches: the data, warm-up included.
        cached: tables on the tested kernel (None: all; the others stay ``fused``).
        id_batches: ``batches`` with one feature per cached table (its ids) for the simulator.
        feature_names, table_names, table_sizes: those features and their tables, aligned.
        header: the report's first line, without the timing part.
    """

    spec: Any
    batches: List[Any]
    cached: Optional[List[str]]
    id_batches: List[Any]
    feature_names: List[str]
    table_names: List[str]
    table_sizes: List[int]
    header: str


def dlrm_workload(cfg: ABConfig) -> Workload:
    """The DLRM over ``cfg.data`` (synthetic, trace or Criteo)."""
    data = open_source(cfg.data, cfg.batch_size, cfg.tables, cfg.rows, cfg.pooling, cfg.distribution, cfg.alpha, cfg.seed)
    batches = data.take(cfg.steps + cfg.warmup)
    if len(batches) <= cfg.warmup:
        raise ValueError(f"{data.description} gave {len(batches)} batches; need more than warmup={cfg.warmup}.")
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=cfg.dim, num_embeddings=n, feature_names=[f],
                           data_type=DataType[cfg.data_type.upper()])
        for f, n in zip(data.feature_names, data.table_sizes)
    ]
    spec = ModelSpec(tables, dense_in_features=data.num_dense, optimizer=OPTIMIZERS_BY_NAME[cfg.optimizer],
                     learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, pooling=float(cfg.pooling))
    if len(batches) < cfg.steps + cfg.warmup:
        print(f"note: {data.description} gave {len(batches)} batches of {cfg.batch_size}, fewer than the "
              f"{cfg.steps + cfg.warmup} asked for; the report covers those.", file=sys.stderr)
    header = (f"# A/B: {data.description}, {len(tables)} tables ({sum(data.table_sizes):,} rows, dim {cfg.dim}, {cfg.data_type.upper()}), "
              f"batch {cfg.batch_size}")
    return Workload(spec, batches, None, batches, list(data.feature_names), [t.name for t in tables],
                    list(data.table_sizes), header)


def sequence_workload(cfg: ABConfig) -> Workload:
    """The next-item sequence model: its ``item`` table (``tables x rows`` rows) is tested."""
    spec = SequenceSpec(items=cfg.tables * cfg.rows, dim=cfg.dim, max_len=cfg.max_len,
                        optimizer=OPTIMIZERS_BY_NAME[cfg.optimizer], learning_rate=cfg.learning_rate,
                        batch_size=cfg.batch_size)
    batches = spec.batches(cfg.steps + cfg.warmup, cfg.seed)
    header = (f"# A/B: sequence model (EmbeddingCollection, synthetic histories of 1..{cfg.max_len} items): "
              f"item table ({spec.items:,} rows, dim {cfg.dim}) on the tested kernel, category table "
              f"({spec.categories} rows) on fused, batch {cfg.batch_size}")
    return Workload(spec, batches, ["item"], table_view(batches, "item"), ["item"], ["item"], [spec.items], header)


def run_ab(cfg: ABConfig) -> Dict[str, Any]:
    """Run every arm of ``cfg`` and write the report. Returns the report's JSON data."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = sequence_workload(cfg) if cfg.model == "sequence" else dlrm_workload(cfg)
    spec, batches = work.spec, work.batches
    init_single_process_group()
    initial = spec.initial_state(cfg.seed)
    arms: List[ArmResult] = []
    for arm in cfg.arms:
        if arm == "scratchpipe":
            for L in cfg.lookaheads:
                H = cfg.horizon_for(L)
                choice = KernelChoice("scratchpipe", cfg.load_factor, lookahead=L, horizon=H, tables=work.cached,
                                      store=cfg.store_spec)
                arms.append(run_arm(spec, choice, batches, cfg.warmup, device, initial, cfg.progress))
                arms[-1].notes = stall_notes(arms[-1].cache, work.id_batches, work.feature_names,
                                             work.table_names, work.table_sizes, L, H, arms[-1].label)
                for note in arms[-1].notes:
                    print(f"note: {note}", file=sys.stderr)
        elif arm == "fused_uvm_caching":
            layout = RowLayout.for_table(spec.optimizer, next(t for t in spec.tables if t.name in work.table_names))
            sim = simulate_uvm_arm(work.id_batches, work.table_sizes, work.feature_names, cfg.load_factor, layout)
            if device.type == "cuda":
                uvm = KernelChoice("fused_uvm_caching", cfg.load_factor, tables=work.cached)
                real = run_arm(spec, uvm, batches, cfg.warmup, device, initial, cfg.progress)
                real.h2d_rows, real.d2h_rows, real.misses = sim.h2d_rows, sim.d2h_rows, sim.misses
                real.h2d_bytes, real.d2h_bytes = sim.h2d_bytes, sim.d2h_bytes
                real.lookups, real.unique_rows, real.device_bytes = sim.lookups, sim.unique_rows, sim.device_bytes
                real.label = "fused_uvm_caching (traffic simulated)"
                arms.append(real)
            else:
                arms.append(sim)
        else:
            arms.append(run_arm(spec, KernelChoice("fused"), batches, cfg.warmup, device, initial, cfg.progress))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"{work.header}, {len(batches) - cfg.warmup} timed steps after {cfg.warmup} warm-up, "
        f"device budget load_factor {cfg.load_factor}, on {name}"
        f", ScratchPipe store {cfg.store_spec.label}"
    )
    meta = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
    meta["device_name"] = name
    return write_report(arms, cfg.batch_size, Path(cfg.out), header, meta)


def parse_args(argv: Optional[Sequence[str]] = None) -> ABConfig:
    p = argparse.ArgumentParser(prog="python -m torchrec_scratchpipe.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ABConfig()
    p.add_argument("--model", default=d.model, choices=["dlrm", "sequence"],
                   help="dlrm (bag tables) or sequence (an EmbeddingCollection next-item model; its item table "
                        "has tables x rows rows)")
    p.add_argument("--arms", default=",".join(d.arms), help="comma list of fused,fused_uvm_caching,scratchpipe")
    p.add_argument("--lookaheads", default=",".join(map(str, d.lookaheads)), help="ScratchPipe lookaheads, comma list")
    p.add_argument("--horizon", type=int, default=None,
                   help=f"ScratchPipe horizon H for every arm (default {defaults.HORIZON}, at least L)")
    p.add_argument("--load-factor", type=float, default=d.load_factor)
    p.add_argument("--data", default=d.data, help="synthetic | trace:PATH | criteo:PATH[,PATH]")
    for name in ("tables", "rows", "dim", "pooling", "max_len", "batch_size", "steps", "warmup", "seed", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--distribution", default=d.distribution, choices=["zipf", "uniform", "drift"])
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--data-type", default=d.data_type, choices=list(DATA_TYPES),
                   help="weight dtype of the DLRM's tables (every arm); rows move in this dtype")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--optimizer", default=d.optimizer, choices=list(OPTIMIZERS_BY_NAME))
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--no-progress", action="store_true")
    # -- backing store (issue 22) --
    p.add_argument("--store", default=d.store, help="ScratchPipe backing store: host | file:DIR (a file per table "
                   "group in DIR, behind a host cache)")
    p.add_argument("--host-cache-mb", type=float, default=d.host_cache_mb,
                   help="host-memory cache of --store file:DIR, MiB per table")
    a = p.parse_args(argv)
    return ABConfig(
        model=a.model, max_len=a.max_len, arms=[x for x in a.arms.split(",") if x], lookaheads=[int(x) for x in a.lookaheads.split(",") if x],
        horizon=a.horizon, load_factor=a.load_factor, data=a.data, tables=a.tables, rows=a.rows, dim=a.dim,
        pooling=a.pooling, distribution=a.distribution, alpha=a.alpha, data_type=a.data_type, batch_size=a.batch_size, steps=a.steps,
        warmup=a.warmup, device=a.device, optimizer=a.optimizer, learning_rate=a.learning_rate, seed=a.seed, out=a.out, threads=a.threads, progress=not a.no_progress,
        store=a.store, host_cache_mb=a.host_cache_mb,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv)
    with quiet_known_noise():
        report = run_ab(cfg)
    print((Path(cfg.out) / "report.md").read_text())
    print("plots:", ", ".join(report["plots"]))


if __name__ == "__main__":
    main()
