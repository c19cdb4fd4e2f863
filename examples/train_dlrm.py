"""Train TorchRec's DLRM with the big tables on fused, fused_uvm_caching or ScratchPipe.

One process::

    python examples/train_dlrm.py --kernel scratchpipe --load-factor 0.05 --lookahead 4 --steps 200

Two processes with torchx (CPU, gloo)::

    torchx run -s local_cwd torchrec_scratchpipe/components.py:train --nproc_per_node 2 -- \\
        --kernel scratchpipe --sharding-type row_wise --lookahead 2 --steps 50

Data: ``--data synthetic`` (default), ``--data trace:FILE`` (FBGEMM request trace) or
``--data criteo:FILE[,FILE]`` (Criteo TSV); on several ranks each reads its own samples.
Checkpoints: ``--save DIR`` / ``--resume DIR``. Defaults: ``torchrec_scratchpipe.defaults``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchmetrics.classification import BinaryAUROC
from tqdm import tqdm

from torchrec_scratchpipe import cache_stats, defaults  # before torchrec: compat quiets FBGEMM 1.6's import notice
from torchrec_scratchpipe.advise.stalls import stall_notes
from torchrec_scratchpipe.cli import (
    HelpFormatter, data_source, fraction, non_negative_int, positive_float, positive_int, tool_window, user_errors,
)
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME, WEIGHT_DTYPES
from torchrec_scratchpipe.data.source import open_source
from torchrec_scratchpipe.quiet import quiet_known_noise
from torchrec_scratchpipe.training import KERNELS, KernelChoice, ModelSpec, Trainer, build_trainer
from torchrec import EmbeddingBagConfig  # noqa: E402  (after the package, see above)
from torchrec.modules.embedding_configs import DataType  # noqa: E402


PROG = "examples/train_dlrm.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=data_source, default="synthetic", help="synthetic | trace:FILE | criteo:FILE[,FILE]")
    p.add_argument("--kernel", default="scratchpipe", choices=KERNELS, help="kernel for the big tables")
    p.add_argument("--table-kernel", action="append", default=[], metavar="TABLE=KERNEL",
                   help="per-table kernel, wins over --kernel (repeatable)")
    p.add_argument("--big-table-rows", type=non_negative_int, default=0,
                   help="tables with at least this many rows are 'big' and get --kernel (0: all)")
    p.add_argument("--load-factor", type=fraction, default=defaults.LOAD_FACTOR,
                   help="scratchpad (or UVM cache) rows as a fraction of a table's rows")
    p.add_argument("--lookahead", type=non_negative_int, default=defaults.LOOKAHEAD, help="ScratchPipe L")
    p.add_argument("--horizon", type=non_negative_int, default=None,
                   help=f"ScratchPipe H (default {defaults.HORIZON}, at least L)")
    p.add_argument("--sharding-type", default="table_wise", choices=["table_wise", "row_wise", "column_wise"],
                   help="sharding of every table")
    p.add_argument("--tables", type=positive_int, default=defaults.TABLES, help="synthetic tables")
    p.add_argument("--rows", type=positive_int, default=defaults.ROWS,
                   help="rows per synthetic table (Criteo: hash size per table)")
    p.add_argument("--dim", type=positive_int, default=defaults.DIM, help="embedding dim, a multiple of 4")
    p.add_argument("--data-type", default="fp32", choices=[n.lower() for n in WEIGHT_DTYPES],
                   help="weight dtype of every table (FP16 halves the weight bytes each moved row carries)")
    p.add_argument("--pooling", type=positive_int, default=defaults.POOLING, help="synthetic ids per bag")
    p.add_argument("--batch-size", type=positive_int, default=defaults.BATCH_SIZE, help="samples per rank and step")
    p.add_argument("--steps", type=positive_int, default=100, help="training steps")
    p.add_argument("--optimizer", default=defaults.OPTIMIZER, choices=list(OPTIMIZERS_BY_NAME),
                   help="embedding optimizer")
    p.add_argument("--learning-rate", type=positive_float, default=defaults.LEARNING_RATE, help="learning rate")
    p.add_argument("--seed", type=non_negative_int, default=defaults.SEED, help="seed of the data and weights")
    p.add_argument("--threads", type=non_negative_int, default=defaults.THREADS,
                   help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--save", default=None, help="write a checkpoint folder at the end")
    p.add_argument("--resume", default=None, help="start from a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for item in args.table_kernel:
        name, _, kernel = item.partition("=")
        if not name or kernel not in KERNELS:
            p.error(f"--table-kernel takes TABLE=KERNEL with KERNEL in {KERNELS}, got {item!r}")
    try:
        args.horizon = tool_window(args.lookahead, args.horizon)
    except ValueError as e:
        p.error(str(e))
    if args.resume and not os.path.isdir(args.resume):
        p.error(f"--resume {args.resume}: no such checkpoint folder")
    return args


def init_distributed() -> torch.device:
    """Join the job torchrun started (or a one-process group) and pick the device."""
    cuda = torch.cuda.is_available()
    if "LOCAL_RANK" in os.environ and cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from torchrec_scratchpipe.training import init_single_process_group

            init_single_process_group()
        else:
            dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def save_checkpoint(path: str, trainer: Trainer, step: int) -> None:
    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(), "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, trainer: Trainer) -> int:
    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(), "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    trainer.model.load_state_dict(state["model"])  # refreshes resident scratchpad rows
    trainer.optimizer.load_state_dict(state["optim"])
    return int(state["step"])


def format_cache_stats(stats: Dict[str, Dict[str, object]]) -> str:
    """One line per scratchpad (tables sharing one are listed together)."""
    if not stats:
        return "no ScratchPipe tables"
    cols = ["lookups", "unique_rows", "plan_misses", "train_misses", "evictions", "h2d_rows", "d2h_rows", "capacity"]
    lines = ["scratchpad tables | hit rate | " + " | ".join(cols)]
    seen = set()
    for name, s in stats.items():
        group = tuple(s.get("shared_with", [name]))  # type: ignore[arg-type]
        if group in seen:
            continue
        seen.add(group)
        values = " | ".join(f"{int(s.get(c, 0)):,}" for c in cols)  # type: ignore[call-overload]
        lines.append(f"{','.join(group)} | {100 * float(s.get('hit_rate', 0.0)):.1f}% | {values}")  # type: ignore[arg-type]
    return "\n".join(lines)


def counter_stall_notes(stats: Dict[str, Dict[str, object]], lookahead: int) -> List[str]:
    """Stall notes from the counters alone (several ranks: each shard saw other ids)."""
    notes, seen = [], set()
    for name, s in stats.items():
        group = tuple(s.get("shared_with", [name]))  # type: ignore[arg-type]
        stalls = int(s.get("window_stalls", 0))  # type: ignore[call-overload]
        if group in seen or not stalls:
            continue
        seen.add(group)
        slots = int(s["capacity"]) // max(1, int(s.get("shards", 1)))  # type: ignore[call-overload]
        notes.append(f"{','.join(group)}: the L+1 = {lookahead + 1} batch window did not fit {slots:,} slots per "
                     f"shard; planning stalled {stalls:,} times in {int(s['steps']):,} steps (peak "  # type: ignore[call-overload]
                     f"{int(s['peak_held_rows']):,} rows held): try --lookahead {max(0, lookahead - 1)} or a larger "  # type: ignore[call-overload]
                     f"--load-factor (`python -m torchrec_scratchpipe.advise` sizes both).")
    return notes


def run(args: argparse.Namespace) -> Tuple[Dict[str, float], Trainer]:
    """Train as ``args`` say; return the summary and the trainer (for tests and notebooks)."""
    device = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = open_source(args.data, args.batch_size, args.tables, args.rows, args.pooling, seed=args.seed,
                       rank=rank, world_size=world)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=args.dim, num_embeddings=n, feature_names=[f],
                                 data_type=DataType[args.data_type.upper()])
              for f, n in zip(data.feature_names, data.table_sizes)]
    big = [t.name for t in tables if t.num_embeddings >= args.big_table_rows]
    overrides = dict(item.split("=", 1) for item in args.table_kernel)
    spec = ModelSpec(tables, dense_in_features=data.num_dense, optimizer=OPTIMIZERS_BY_NAME[args.optimizer],
                     learning_rate=args.learning_rate, batch_size=args.batch_size, pooling=float(args.pooling))
    horizon = args.horizon
    choice = KernelChoice(args.kernel, args.load_factor, args.lookahead, horizon, big, overrides, args.sharding_type)
    trainer = build_trainer(spec, choice, device, spec.initial_state(args.seed))
    start = load_checkpoint(args.resume, trainer) if args.resume else 0
    if rank == 0:
        print(trainer.plan_text())
    auroc = BinaryAUROC().to(device)
    data.take(start)  # a resumed run continues the data stream where the checkpoint stopped
    taken = data.take(args.steps)
    if len(taken) < args.steps and rank == 0:
        print(f"note: {data.description} gave {len(taken)} batches of {args.batch_size} per rank, "
              f"fewer than --steps {args.steps}.")
    batches = iter(taken)
    losses: List[float] = []
    samples = 0
    bar = tqdm(total=args.steps, desc=f"rank {rank} {choice.label}", disable=args.no_progress or rank != 0)
    t0 = time.perf_counter()
    while True:
        try:
            loss, logits, labels = trainer.pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(float(loss))
        samples += int(labels.numel())
        auroc.update(torch.sigmoid(logits.detach()), labels.detach().long())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    stats = cache_stats(trainer.model)
    total = torch.tensor([samples], dtype=torch.int64)
    dist.all_reduce(total)  # every rank read its own samples: each counts once
    result = {
        "steps": float(len(losses)),
        "loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "auc": float(auroc.compute()),
        "samples": float(total.item()),
        "samples_per_s": float(total.item()) / seconds,
    }
    if args.save:
        save_checkpoint(args.save, trainer, start + len(losses))
    if rank == 0:
        print(f"steps {len(losses)}  loss {result['loss']:.4f}  AUC {result['auc']:.4f}  "
              f"samples/s {result['samples_per_s']:,.0f}  (world size {world}, {device})")
        print(format_cache_stats(stats))
        notes = (stall_notes(stats, taken, data.feature_names, [t.name for t in tables], data.table_sizes,
                             choice.lookahead, horizon) if world == 1 else counter_stall_notes(stats, choice.lookahead))
        for note in notes:
            print(f"note: {note}")
    return result, trainer


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    with user_errors(PROG), quiet_known_noise():
        return run(args)[0]


if __name__ == "__main__":
    main()
