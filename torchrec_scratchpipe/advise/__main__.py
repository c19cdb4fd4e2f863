"""``python -m torchrec_scratchpipe.advise``: scratchpad sizes per table from a data sample.

Examples::

    python -m torchrec_scratchpipe.advise --trace day0.pt.gz --batch-size 4096 --lookahead 2 \\
        --horizon 32 --target-miss-ratio 0.1
    python -m torchrec_scratchpipe.advise --synthetic zipf:1.05 --tables 26x100000 --steps 60 \\
        --lookahead 2 --horizon 16 --target-rows-per-step 500 --json advice.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.advise.render import constraints_text, format_advice
from torchrec_scratchpipe.advise.search import Target, advise
from torchrec_scratchpipe.advise.stats import MeasuredCacheStatistics
from torchrec_scratchpipe.advise.working_set import working_set
from torchrec_scratchpipe.cli import (
    HelpFormatter, fraction, non_negative_int, positive_float, positive_int, tool_window, user_errors,
)
from torchrec_scratchpipe.sim.cli import add_stream_args, load_stream


PROG = "python -m torchrec_scratchpipe.advise"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    add_stream_args(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-rows-per-step", type=positive_float, help="max rows moved in per step, per table")
    goal.add_argument("--target-miss-ratio", type=fraction,
                      help="max misses per distinct row looked up, per table, in (0, 1]")
    p.add_argument("--lookahead", type=non_negative_int, default=defaults.LOOKAHEAD, help="ScratchPipe L")
    p.add_argument("--horizon", type=non_negative_int, default=None,
                   help=f"ScratchPipe H (default {defaults.HORIZON}, at least L; the simulator's default too)")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="leading steps not counted (default a quarter of the steps)")
    p.add_argument("--points", type=positive_int, default=10, help="capacities on each table's curve")
    p.add_argument("--table-names", default=None, help="comma-separated names for the constraints dict")
    p.add_argument("--json", default=None, metavar="OUT", help="write advice and curves here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (2, with one line, for a user error)."""
    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    horizon = tool_window(args.lookahead, args.horizon)
    stream = load_stream(args)
    if args.table_names:
        names = [n.strip() for n in args.table_names.split(",")]
        if len(names) != len(stream.table_sizes):
            raise ValueError(f"--table-names has {len(names)} names for {len(stream.table_sizes)} tables: "
                             "give one name per table")
        stream.table_names = names
    target = (Target("rows_per_step", args.target_rows_per_step) if args.target_rows_per_step is not None
              else Target("miss_ratio", args.target_miss_ratio))
    warmup = args.warmup if args.warmup is not None else stream.num_steps // 4
    if warmup >= stream.num_steps:
        raise ValueError(f"--warmup {warmup} leaves none of the stream's {stream.num_steps} steps to count: "
                         "lower --warmup or give more steps")
    result = advise(stream, target, args.lookahead, horizon, warmup, args.points)
    print(format_advice(result, target, working_set(stream, args.lookahead)))
    print()
    print(constraints_text(result, args.lookahead, horizon))
    if args.json:
        doc = {"target": {"kind": target.kind, "value": target.value}, "lookahead": args.lookahead,
               "horizon": horizon, "warmup": warmup, "steps": stream.num_steps, "tables": []}
        for a in result:
            stats = MeasuredCacheStatistics.from_curve(a.curve, a.expected_lookups)
            doc["tables"].append({**a.to_json(), "cacheability": stats.cacheability})
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
