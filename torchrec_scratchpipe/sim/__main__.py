"""``python -m torchrec_scratchpipe.sim``: replay an id stream through several cache policies.

Examples::

    python -m torchrec_scratchpipe.sim --trace day0.pt.gz --batch-size 4096 --capacity 0.05 \\
        --policies lru,set_lru,set_lru_prefetch,opt,scratchpipe --lookahead 2 --horizon 64 --json out.json
    python -m torchrec_scratchpipe.sim --synthetic zipf:1.05 --tables 26x100000 --steps 100 \\
        --capacity 5% --policies opt,scratchpipe --mrc 0.01,0.02,0.05,0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.core.policy import VictimPolicy

from torchrec_scratchpipe.sim.cli import add_stream_args, load_stream
from torchrec_scratchpipe.sim.mrc import miss_ratio_curve
from torchrec_scratchpipe.sim.policies import POLICIES, PolicyOptions, parse_policies, simulate
from torchrec_scratchpipe.sim.report import format_curves, format_table, parse_capacity, write_json


#: Where ``--mrc`` saves its curves when no ``--json`` is given.
DEFAULT_MRC_OUT = "out/sim/mrc.json"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m torchrec_scratchpipe.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_args(p)
    p.add_argument("--capacity", required=True, help="cache rows, or a fraction of all rows (0.05 or 5%%)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    p.add_argument("--lookahead", type=int, default=defaults.LOOKAHEAD, help="ScratchPipe L")
    p.add_argument("--horizon", type=int, default=None,
                   help=f"ScratchPipe H (default {defaults.HORIZON}, at least L; the advisor's default too)")
    p.add_argument("--victim-policy", choices=[v.value for v in VictimPolicy], default=VictimPolicy.FUTURE.value,
                   help="ScratchPipe's victim policy: future (ScratchPipe's: farthest next use) or lru")
    p.add_argument("--ways", type=int, default=32, help="set-associative ways")
    p.add_argument("--mrc", default=None, help="also compute miss-ratio curves at these capacities (comma list)")
    p.add_argument("--warmup", type=int, default=0, help="MRC: leading steps left out of the counts")
    p.add_argument("--json", default=None, metavar="OUT",
                   help=f"write results here (with --mrc and no --json: {DEFAULT_MRC_OUT})")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="tqdm bars")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        policies = parse_policies(args.policies)
    except ValueError as e:
        raise SystemExit(str(e))
    stream = load_stream(args)
    capacity = parse_capacity(args.capacity, stream.num_rows)
    horizon = defaults.horizon_for(args.lookahead, args.horizon)
    progress = args.progress if args.progress is not None else (stream.lookups >= 5_000_000 and sys.stderr.isatty())
    options = PolicyOptions(lookahead=args.lookahead, horizon=horizon, ways=args.ways, progress=progress,
                            victim_policy=args.victim_policy)
    results = {}
    for name in policies:
        try:
            results[name] = simulate(stream, name, capacity, options)
        except ValueError as e:  # CapacityError too: a batch larger than the cache
            print(f"{name}: cannot run: {e}", file=sys.stderr)
    print(format_table(results, stream))
    curves = []
    if args.mrc:
        caps = [parse_capacity(c, stream.num_rows) for c in args.mrc.split(",") if c.strip()]
        curves = [miss_ratio_curve(stream, name, caps, options, args.warmup) for name in policies]
        print()
        print(format_curves(curves))
    out = args.json or (DEFAULT_MRC_OUT if curves else None)
    if out:
        config = {"capacity": capacity, "lookahead": args.lookahead, "horizon": horizon, "ways": args.ways,
                  "victim_policy": args.victim_policy, "policies": policies}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, stream, results, config, curves)
        print(f"\nwritten: {out}" + (" (miss-ratio curves under \"mrc\")" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
