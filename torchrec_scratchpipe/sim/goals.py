"""The simulator's goal table: ScratchPipe against Belady, LRU and FBGEMM's cache.

``python -m torchrec_scratchpipe.sim.goals --json out.json`` replays Zipf(0.9, 1.05, 1.2)
and a drifting-hot-set stream at capacities of 5% and 10% of all rows and reports:

- (a) ScratchPipe rows moved at H = 64 over Belady's optimum (goal: <= 1.02);
- (b) ScratchPipe at H = L over fully associative LRU (goal: <= 1.00);
- (c) 1 - ScratchPipe(L = H = 4) / FBGEMM-style 32-way set-associative LRU (goal: >= 0.10),
  also against the prefetch + locking variant.

"Rows moved" is rows brought in (misses) over the whole stream, cold start included;
write-backs equal evictions and trail misses by the capacity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from tqdm import tqdm

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.cli import HelpFormatter, converter, non_negative_int, positive_int
from torchrec_scratchpipe.sim.policies import PolicyOptions, simulate
from torchrec_scratchpipe.sim.sources import SyntheticSpec, parse_tables, synthetic_stream
from torchrec_scratchpipe.sim.stream import BatchStream


@dataclass
class GoalConfig:
    """What the goal table measures.

    Args:
        table_sizes: rows per table.
        batch_size: samples per step (one id per table per sample).
        steps: steps per stream.
        capacities: cache sizes as fractions of all rows.
        alphas: Zipf exponents of the stationary streams.
        drift: ``(alpha, period, fraction)`` of the drifting stream (hot set rotates by
            ``fraction`` of each table every ``period`` steps).
        far_horizon: H of goal (a).
        lookaheads_a: L values of goal (a).
        lookaheads_b: L values of goal (b) (H = L).
        lookahead_c: L = H of goal (c).
        ways: set-associative ways.
        seed: generator seed.
    """

    table_sizes: Sequence[int] = defaults.SIM_TABLE_SIZES
    batch_size: int = defaults.SIM_BATCH_SIZE
    steps: int = defaults.GOALS_STEPS
    capacities: Sequence[float] = (0.05, 0.10)
    alphas: Sequence[float] = (0.9, 1.05, 1.2)
    drift: Sequence[float] = (1.05, 10, 0.02)
    far_horizon: int = defaults.HORIZON
    lookaheads_a: Sequence[int] = (0, 1, 4)
    lookaheads_b: Sequence[int] = (0, 1, 4)
    lookahead_c: int = defaults.LOOKAHEAD
    ways: int = defaults.SIM_WAYS
    seed: int = defaults.SEED

    def build_streams(self) -> List[SyntheticSpec]:
        """The synthetic specs of the stationary and drifting streams."""
        def spec(kind: str, alpha: float, period: int = 10, fraction: float = 0.01) -> SyntheticSpec:
            return SyntheticSpec(kind, alpha, list(self.table_sizes), self.batch_size, self.steps,
                                 seed=self.seed, drift_period=period, drift_fraction=fraction)

        a, period, frac = self.drift
        return [spec("zipf", x) for x in self.alphas] + [spec("drift", a, int(period), frac)]


def run_keys(cfg: GoalConfig) -> Set[str]:
    """The distinct simulations :func:`measure` runs per stream and capacity."""
    far, lc = cfg.far_horizon, cfg.lookahead_c
    return ({"opt", "lru", "set_lru", "set_lru_prefetch", f"sp_L{lc}_H{lc}", f"sp_L{lc}_H{far}"}
            | {f"sp_L{l}_H{far}" for l in cfg.lookaheads_a} | {f"sp_L{l}_H{l}" for l in cfg.lookaheads_b})


def measure(stream: BatchStream, capacity: int, cfg: GoalConfig,
            on_run: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Rows moved by every policy the goals compare, and the three ratios.

    Example::

        >>> s = synthetic_stream(SyntheticSpec("zipf", 1.05, [500] * 2, batch_size=16, steps=8))
        >>> row = measure(s, 100, GoalConfig(far_horizon=4, lookaheads_a=(1,), lookaheads_b=(1,), lookahead_c=1))
        >>> row["misses"]["opt"] <= row["misses"]["lru"]
        True
    """
    runs: Dict[str, int] = {}
    seconds: Dict[str, float] = {}
    stalls: Dict[str, int] = {}

    def run(key: str, policy: str, lookahead: int = 0, horizon: int = 0) -> int:
        if key not in runs:
            r = simulate(stream, policy, capacity, PolicyOptions(lookahead, horizon, cfg.ways))
            runs[key], seconds[key] = r.total_misses, r.seconds
            if "stalls" in r.extra:
                stalls[key] = r.extra["stalls"]
            if on_run is not None:
                on_run(key)
        return runs[key]

    opt, lru = run("opt", "opt"), run("lru", "lru")
    set_lru, set_pf = run("set_lru", "set_lru"), run("set_lru_prefetch", "set_lru_prefetch")
    a = {f"L{l}": run(f"sp_L{l}_H{cfg.far_horizon}", "scratchpipe", l, cfg.far_horizon) / opt
         for l in cfg.lookaheads_a}
    b = {f"L{l}": run(f"sp_L{l}_H{l}", "scratchpipe", l, l) / lru for l in cfg.lookaheads_b}
    lc = cfg.lookahead_c
    sp_c = run(f"sp_L{lc}_H{lc}", "scratchpipe", lc, lc)
    sp_far = run(f"sp_L{lc}_H{cfg.far_horizon}", "scratchpipe", lc, cfg.far_horizon)
    c = {"set_lru": 1.0 - sp_c / set_lru, "set_lru_prefetch": 1.0 - sp_c / set_pf,
         f"set_lru_by_H{cfg.far_horizon}": 1.0 - sp_far / set_lru}
    return {"capacity": capacity, "misses": runs, "seconds": seconds, "stalls": stalls, "a_sp_over_opt": a,
            "b_sp_over_lru": b, "c_saving_vs_set_lru": c}


def format_rows(rows: Sequence[Dict[str, Any]], cfg: GoalConfig) -> str:
    """The goal table as text, one line per (stream, capacity)."""
    la = " ".join(f"{'a L' + str(l):>8}" for l in cfg.lookaheads_a)
    lb = " ".join(f"{'b L' + str(l):>8}" for l in cfg.lookaheads_b)
    head = (f"{'stream':<22} {'cap':>5} {la} {lb} {'c set':>7} {'c pf':>7} {'c H' + str(cfg.far_horizon):>7} "
            f"{'opt':>9} {'lru':>9} {'set_lru':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a = " ".join(f"{v:>8.4f}" for v in r["a_sp_over_opt"].values())
        b = " ".join(f"{v:>8.4f}" for v in r["b_sp_over_lru"].values())
        c = r["c_saving_vs_set_lru"]
        m = r["misses"]
        far = c[f"set_lru_by_H{cfg.far_horizon}"]
        lines.append(f"{r['stream']:<22} {r['fraction']:>5.2f} {a} {b} {c['set_lru']:>7.1%} "
                     f"{c['set_lru_prefetch']:>7.1%} {far:>7.1%} {m['opt']:>9} {m['lru']:>9} {m['set_lru']:>9}")
    lines.append(f"a = ScratchPipe(H={cfg.far_horizon}) / Belady (goal <= 1.02); b = ScratchPipe(H=L) / LRU "
                 f"(goal <= 1.00); c = 1 - ScratchPipe(L=H={cfg.lookahead_c}) / set-assoc LRU, without (set) and "
                 f"with (pf) prefetch+locking (goal >= 10%); c H{cfg.far_horizon}: ScratchPipe(L={cfg.lookahead_c}, "
                 f"H={cfg.far_horizon}) against set-assoc LRU")
    return "\n".join(lines)


def run_goals(cfg: GoalConfig, log: Optional[Any] = sys.stderr) -> List[Dict[str, Any]]:
    """Generate every stream and measure every capacity.

    Args:
        cfg: what to measure.
        log: where the progress bar (one tick per simulation, naming it) and the per-stream
            times go; None for silence.
    """
    rows = []
    specs = cfg.build_streams()
    bar = tqdm(total=len(specs) * len(cfg.capacities) * len(run_keys(cfg)), desc="goals", unit="sim",
               file=log, disable=log is None, mininterval=0.5, leave=False)
    for spec in specs:
        t0 = time.perf_counter()
        name = spec.distribution + (f"({spec.alpha})" if spec.distribution != "drift" else
                                    f"({spec.alpha},p{spec.drift_period},f{spec.drift_fraction})")
        bar.set_postfix_str(f"{name}: generating")
        stream = synthetic_stream(spec)
        for frac in cfg.capacities:
            def tick(key: str, where: str = f"{name} cap {frac:.2f}") -> None:
                bar.set_postfix_str(f"{where} {key}")
                bar.update(1)

            row = measure(stream, int(round(frac * stream.num_rows)), cfg, tick)
            row.update(stream=name, fraction=frac, lookups=stream.lookups,
                       mean_batch_rows=float(stream.unique_per_step().float().mean()))
            rows.append(row)
        if log is not None:
            bar.write(f"{name}: {stream.lookups} ids, {time.perf_counter() - t0:.0f}s", file=log)
    bar.close()
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point."""
    d = GoalConfig()
    p = argparse.ArgumentParser(prog="python -m torchrec_scratchpipe.sim.goals", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--tables", type=converter(parse_tables), default=list(d.table_sizes),
                   help=f"table sizes, like 26x100000 (default {len(d.table_sizes)}x{d.table_sizes[0]})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per step")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="steps per stream")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="generator seed")
    p.add_argument("--threads", type=non_negative_int, default=defaults.THREADS,
                   help="torch CPU threads (0: torch's default; the ops are small, more threads lose badly on a "
                        "busy machine)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows and the config here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GoalConfig(table_sizes=args.tables, batch_size=args.batch_size, steps=args.steps, seed=args.seed)
    rows = run_goals(cfg)
    print(format_rows(rows, cfg))
    if args.json:
        conf = asdict(cfg)
        Path(args.json).write_text(json.dumps({"config": conf, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
