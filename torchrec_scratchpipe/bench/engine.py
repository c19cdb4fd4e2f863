"""Engine benchmark: ScratchPipe vs plain TBE over the full tables, in one run.

Run::

    python -m torchrec_scratchpipe.bench.engine --steps 40 --json out/bench_engine.json

Prints per-step planner, mover and train time of the engine, the step time of plain
FBGEMM TBE training the full tables (same device, same batches), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_scratchpipe.compat import ComputeDevice, EmbeddingLocation, PoolingMode, SplitTableBatchedEmbeddingBagsCodegen
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
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
    """

    tables: int = 26
    rows: int = 100_000
    dim: int = 64
    batch_size: int = 4096
    pooling: int = 1
    alpha: float = 1.05
    load_factor: float = 0.1
    lookahead: int = 4
    horizon: Optional[int] = None
    steps: int = 40
    warmup: int = 5
    block: int = 10
    device: str = "cpu"
    seed: int = 0
    background_planning: Optional[bool] = None
    unpooled: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        spec, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, device=device, pooling_mode=pooling
    )


def _engine(cfg: EngineBenchConfig, device: torch.device) -> ScratchPipeEmbeddingBags:
    kind = EmbeddingConfig if cfg.unpooled else EmbeddingBagConfig
    tables = [
        kind(name=f"t{i}", embedding_dim=cfg.dim, num_embeddings=cfg.rows, feature_names=[f"f{i}"])
        for i in range(cfg.tables)
    ]
    sp = ScratchPipeConfig(
        load_factor=cfg.load_factor, lookahead=cfg.lookahead, horizon=cfg.horizon,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, background_planning=cfg.background_planning,
    )
    return ScratchPipeEmbeddingBags(tables, sp, device=device)


def run(cfg: EngineBenchConfig) -> Dict[str, object]:
    """Alternate blocks of full-table TBE and ScratchPipe steps, so both see the same machine."""
    device = torch.device(cfg.device)
    ahead = max(cfg.lookahead, cfg.horizon or 0) + 1  # announced batches: L planned, the rest peeked
    n = cfg.steps + cfg.warmup
    batches = [k.to(device) for k in _batches(cfg, n + ahead)]
    tbe, emb = _full_tbe(cfg, device), _engine(cfg, device)
    group = next(iter(emb.groups.values()))
    for k in batches[:ahead]:
        emb.prefetch(k)
    keys = ("planner_s", "mover_s", "planner_background_s", "mover_background_s", "blocked_s")
    rec: Dict[str, List[float]] = {k: [] for k in ("full", "total", "train", "planner_fg", "mover_fg") + keys}
    bar = tqdm(total=2 * n, desc="full TBE / ScratchPipe", leave=False)
    for start in range(0, n, cfg.block):  # alternate blocks: both see the same machine state
        block = range(start, min(n, start + cfg.block))
        for i in block:
            k = batches[i]
            _sync(device)
            t0 = time.perf_counter()
            tbe(k.values(), k.offsets()).sum().backward()
            _sync(device)
            if i >= cfg.warmup:
                rec["full"].append(time.perf_counter() - t0)
            bar.update(1)
        for i in block:
            before = emb.stats()[group.name]
            _sync(device)
            t0 = time.perf_counter()
            emb.pooled(batches[i]).sum().backward()
            emb.prefetch(batches[i + ahead])
            _sync(device)
            total = time.perf_counter() - t0
            after = emb.stats()[group.name]
            if i >= cfg.warmup:
                d = {k: after[k] - before[k] for k in keys}
                # the parts done on the training thread, not next to it
                planner_fg = d["planner_s"] - d["planner_background_s"]
                mover_fg = d["mover_s"] - d["mover_background_s"]
                rec["total"].append(total)
                rec["planner_fg"].append(planner_fg)
                rec["mover_fg"].append(mover_fg)
                rec["train"].append(total - planner_fg - mover_fg - d["blocked_s"])
                for k in keys:
                    rec[k].append(d[k])
            bar.update(1)
    bar.close()
    ms = {k: statistics.median(v) * 1e3 for k, v in rec.items()}
    step = ms["total"]
    return {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
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
        ("overhead ratio (SP / full)", f"{r['overhead_ratio']:.3f}"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}".rstrip() for a, b in rows)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EngineBenchConfig()
    for name, value in asdict(defaults).items():
        if name == "background_planning":
            parser.add_argument("--background-planning", choices=["auto", "on", "off"], default="auto")
            continue
        if isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
            continue
        kind = type(value) if value is not None else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = vars(parser.parse_args(argv))
    out = args.pop("json")
    args["background_planning"] = {"auto": None, "on": True, "off": False}[args["background_planning"]]
    result = run(EngineBenchConfig(**args))
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
