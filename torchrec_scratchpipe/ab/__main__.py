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
from torchrec_scratchpipe.ab.config import ARMS, DATA_TYPES, MODELS, ABConfig
from torchrec_scratchpipe.ab.report import write_report
from torchrec_scratchpipe.ab.simulated import id_stream, simulate_uvm_arm
from torchrec_scratchpipe.advise.search import load_factor_for
from torchrec_scratchpipe.advise.stalls import stall_notes
from torchrec_scratchpipe.cli import (
    HelpFormatter, data_source, fail, fraction, int_list, name_list, non_negative_int, positive_float, positive_int,
    user_errors,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME, RowLayout
from torchrec_scratchpipe.core.plan import CapacityError
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
        raise ValueError(f"{data.description} gave {len(batches)} batches of {cfg.batch_size}, not more than "
                         f"--warmup {cfg.warmup}: lower --warmup or --batch-size, or give more data.")
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


def arm_error(error: ValueError, cfg: ABConfig, work: Workload) -> str:
    """What a ScratchPipe arm's error means in ``ab`` flags.

    A scratchpad too small for one batch (``CapacityError``) is said with the load factor
    that fits the largest batch of this run (all cached tables share one scratchpad: they
    have one dim and pooling); any other error is kept as raised.
    """
    if not isinstance(error, CapacityError):
        return str(error)
    rows = sum(work.table_sizes)
    needed = int(id_stream(work.id_batches, work.table_sizes, work.feature_names).unique_per_step().max())
    slots = ScratchPipeConfig(load_factor=cfg.load_factor).slots_for(rows)
    if needed <= slots:  # not one batch too large: batches held together (see the engine's message)
        return str(error)
    fit = load_factor_for(needed, rows, digits=4)
    return (f"a batch needs {needed:,} distinct rows in the scratchpad, but --load-factor {cfg.load_factor} gives "
            f"{slots:,} slots for {rows:,} rows: use --load-factor {fit} or more, or a smaller --batch-size.")


def failures(report: Dict[str, Any]) -> List[str]:
    """``"ARM: ERROR"`` of every arm of a report that did not run to the end."""
    return [f"{r['arm']}: {r['error']}" for r in report["arms"] if r.get("error")]


def run_ab(cfg: ABConfig) -> Dict[str, Any]:
    """Run every arm of ``cfg`` and write the report. Returns the report's JSON data.

    An arm that fails on its input (a scratchpad too small for one batch) is reported with
    its error in place of its numbers; the other arms still run (see :func:`failures`).
    """
    device = resolve_device(cfg.device)
    threads = cfg.threads_on(device)
    if threads:
        torch.set_num_threads(threads)
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
                try:
                    arms.append(run_arm(spec, choice, batches, cfg.warmup, device, initial, cfg.progress))
                except ValueError as e:  # CapacityError too: the report keeps the arms that ran
                    arms.append(ArmResult(choice.label, error=arm_error(e, cfg, work)))
                    continue
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


PROG = "python -m torchrec_scratchpipe.ab"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: every ``ABConfig`` field is one flag, refused by name when bad."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    d = ABConfig()
    run = p.add_argument_group("what to compare")
    run.add_argument("--arms", type=name_list(ARMS), default=d.arms,
                     help=f"kernels to run, a comma list of {', '.join(ARMS)} (scratchpipe once per lookahead)")
    run.add_argument("--lookaheads", type=int_list(minimum=0), default=d.lookaheads,
                     help="ScratchPipe lookaheads L, a comma list")
    run.add_argument("--horizon", type=non_negative_int, default=None,
                     help=f"ScratchPipe horizon H for every arm, from L to {defaults.MAX_HORIZON} "
                          f"(default {defaults.HORIZON}, at least L)")
    run.add_argument("--load-factor", type=fraction, default=d.load_factor,
                     help="device budget per table as a fraction of its rows, in (0, 1]; the same for the UVM "
                          "cache and the scratchpad")
    model = p.add_argument_group("model and data")
    model.add_argument("--model", default=d.model, choices=list(MODELS),
                       help="dlrm (bag tables) or sequence (an EmbeddingCollection next-item model; its item "
                            "table has tables x rows rows)")
    model.add_argument("--data", type=data_source, default=d.data,
                       help="synthetic | trace:FILE (FBGEMM request trace) | criteo:FILE[,FILE] (Criteo TSV)")
    model.add_argument("--tables", type=positive_int, default=d.tables, help="synthetic tables")
    model.add_argument("--rows", type=positive_int, default=d.rows,
                       help="rows per synthetic table (Criteo: hash size per table)")
    model.add_argument("--dim", type=positive_int, default=d.dim, help="embedding dim, a multiple of 4")
    model.add_argument("--pooling", type=positive_int, default=d.pooling, help="synthetic ids per bag")
    model.add_argument("--distribution", default=d.distribution, choices=["zipf", "uniform", "drift"],
                       help="synthetic id distribution")
    model.add_argument("--alpha", type=positive_float, default=d.alpha, help="Zipf exponent of synthetic ids")
    model.add_argument("--max-len", type=positive_int, default=d.max_len, help="longest history (--model sequence)")
    model.add_argument("--data-type", default=d.data_type, choices=list(DATA_TYPES),
                       help="weight dtype of the DLRM's tables (every arm); rows move in this dtype")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per step")
    train.add_argument("--steps", type=positive_int, default=d.steps, help="timed steps per arm")
    train.add_argument("--warmup", type=non_negative_int, default=d.warmup,
                       help="untimed first steps per arm (the data must hold steps + warmup batches)")
    train.add_argument("--optimizer", default=d.optimizer, choices=list(OPTIMIZERS_BY_NAME),
                       help="embedding optimizer (FBGEMM's exact ones)")
    train.add_argument("--learning-rate", type=positive_float, default=d.learning_rate,
                       help="embedding and dense learning rate")
    train.add_argument("--seed", type=non_negative_int, default=d.seed, help="seed of the data and initial weights")
    train.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    train.add_argument("--threads", type=non_negative_int, default=d.threads,
                       help="torch CPU threads (0: torch's default; default: 1 on CPU, where more than the free "
                            "cores slow runs, the host's own count on CUDA)")
    store = p.add_argument_group("backing store of the ScratchPipe arms")
    store.add_argument("--store", default=d.store,
                       help="host (tables in host memory) | file:DIR (a file per table group in DIR, behind a host cache)")
    store.add_argument("--host-cache-mb", type=positive_float, default=d.host_cache_mb,
                       help="host-memory cache of --store file:DIR, MiB per table")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=d.out, help="folder for report.md, report.json and the plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> ABConfig:
    """The ``ABConfig`` of a command line; a bad flag exits 2 with one line naming it."""
    p = build_parser()
    a = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(ABConfig)} - {"progress"}
    try:
        return ABConfig(progress=not a.no_progress, **{k: v for k, v in vars(a).items() if k in fields})
    except ValueError as e:
        p.error(str(e))


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv)
    with user_errors(PROG), quiet_known_noise():
        report = run_ab(cfg)
    print((Path(cfg.out) / "report.md").read_text())
    print("plots:", ", ".join(report["plots"]))
    failed = failures(report)
    if failed:
        fail(PROG, f"{len(failed)} of {len(report['arms'])} arms failed (see Problems found in "
                   f"{Path(cfg.out) / 'report.md'}): {failed[0]}")


if __name__ == "__main__":
    main()
