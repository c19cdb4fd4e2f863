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
from typing import Dict, List, Optional

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.cli import (
    HelpFormatter, converter, fail, non_negative_int, positive_int, tool_window, user_errors,
)
from torchrec_scratchpipe.core.plan import CapacityError
from torchrec_scratchpipe.core.policy import VictimPolicy

from torchrec_scratchpipe.sim.cli import add_stream_args, load_stream
from torchrec_scratchpipe.sim.mrc import miss_ratio_curve
from torchrec_scratchpipe.sim.policies import POLICIES, PolicyOptions, parse_policies, simulate
from torchrec_scratchpipe.sim.stream import BatchStream
from torchrec_scratchpipe.sim.report import format_curves, format_table, parse_capacity, write_json


PROG = "python -m torchrec_scratchpipe.sim"


def _capacity(text: str) -> str:
    parse_capacity(text, 1)  # the form only; rows are known once the stream is read
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    add_stream_args(p)
    p.add_argument("--capacity", required=True, type=converter(_capacity),
                   help="cache rows, or a fraction of all rows (0.05 or 5%%); every policy but the set-associative "
                        "ones needs a batch's distinct rows to fit")
    p.add_argument("--policies", type=converter(parse_policies), default=list(POLICIES),
                   help=f"comma list of {', '.join(POLICIES)} (default: all of them)")
    p.add_argument("--lookahead", type=non_negative_int, default=defaults.LOOKAHEAD, help="ScratchPipe L")
    p.add_argument("--horizon", type=non_negative_int, default=None,
                   help=f"ScratchPipe H (default {defaults.HORIZON}, at least L; the advisor's default too)")
    p.add_argument("--victim-policy", choices=[v.value for v in VictimPolicy], default=VictimPolicy.FUTURE.value,
                   help="ScratchPipe's victim policy: future (ScratchPipe's: farthest next use) or lru")
    p.add_argument("--ways", type=positive_int, default=defaults.SIM_WAYS, help="set-associative ways")
    p.add_argument("--mrc", type=converter(lambda t: [_capacity(c) for c in t.split(",") if c.strip()]), default=None,
                   help="also compute miss-ratio curves at these capacities (comma list)")
    p.add_argument("--warmup", type=non_negative_int, default=0, help="MRC: leading steps left out of the counts")
    p.add_argument("--json", default=None, metavar="OUT",
                   help=f"write results here (with --mrc and no --json: {defaults.SIM_MRC_OUT})")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="tqdm bars (default: on a terminal, for streams of 5M ids or more)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def too_small(errors: Dict[str, str], stream: BatchStream, capacity: int) -> str:
    """The one line for policies that cannot run at ``--capacity``: which, and the rows to give."""
    largest = int(stream.unique_per_step().max())
    return (f"--capacity {capacity:,} rows cannot hold one batch for {', '.join(errors)} (the largest batch has "
            f"{largest:,} distinct rows, {largest / stream.num_rows:.2%} of {stream.num_rows:,}): raise --capacity to "
            f"at least {largest}, or leave those policies out of --policies.")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (2, with one line, for a user error)."""
    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    policies = args.policies
    horizon = tool_window(args.lookahead, args.horizon)
    stream = load_stream(args)
    capacity = parse_capacity(args.capacity, stream.num_rows)
    progress = args.progress if args.progress is not None else (stream.lookups >= 5_000_000 and sys.stderr.isatty())
    options = PolicyOptions(lookahead=args.lookahead, horizon=horizon, ways=args.ways, progress=progress,
                            victim_policy=args.victim_policy)
    results, cannot = {}, {}
    for name in policies:
        try:
            results[name] = simulate(stream, name, capacity, options)
        except CapacityError as e:  # a batch larger than the cache
            cannot[name] = str(e)
    if cannot:
        fail(PROG, too_small(cannot, stream, capacity))
    print(format_table(results, stream))
    curves = []
    if args.mrc:
        caps = [parse_capacity(c, stream.num_rows) for c in args.mrc]
        curves = [miss_ratio_curve(stream, name, caps, options, args.warmup) for name in policies]
        print()
        print(format_curves(curves))
    out = args.json or (defaults.SIM_MRC_OUT if curves else None)
    if out:
        config = {"capacity": capacity, "lookahead": args.lookahead, "horizon": horizon, "ways": args.ways,
                  "victim_policy": args.victim_policy, "policies": policies}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, stream, results, config, curves)
        print(f"\nwritten: {out}" + (" (miss-ratio curves under \"mrc\")" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
