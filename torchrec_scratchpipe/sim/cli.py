"""Command-line input options shared by the simulator and the capacity advisor."""

from __future__ import annotations

import argparse

import torch

from torchrec_scratchpipe.quiet import quiet_known_noise
from torchrec_scratchpipe.sim.sources import (
    SIM_BATCH_SIZE, criteo_stream, load_traces, parse_synthetic, parse_tables, synthetic_stream,
)
from torchrec_scratchpipe.sim.stream import BatchStream


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """Input options shared with the capacity advisor."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", nargs="+", metavar="FILE", help="FBGEMM request-trace files (maybe gzipped)")
    src.add_argument("--synthetic", metavar="SPEC",
                     help="zipf:ALPHA | uniform | drift:ALPHA[,period=P,fraction=F] [,pooling=X,seed=S]")
    src.add_argument("--criteo", nargs="+", metavar="FILE", help="Criteo TSV files (maybe gzipped)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (synthetic default 4096)")
    p.add_argument("--tables", default=None,
                   help="table sizes, '26x100000' or '1000,2000' (synthetic, Criteo hashing; traces: override)")
    p.add_argument("--steps", type=int, default=100, help="synthetic steps")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed")
    p.add_argument("--max-samples", type=int, default=None, help="Criteo: stop after this many samples")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the ops are small; more threads lose badly on a busy machine)")


def load_stream(args: argparse.Namespace) -> BatchStream:
    """Build the stream the arguments describe (see :func:`add_stream_args`); sets torch threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with quiet_known_noise():  # building KJTs (Criteo) triggers torch's one-time fx notice
        return _load_stream(args)


def _load_stream(args: argparse.Namespace) -> BatchStream:
    sizes = parse_tables(args.tables) if args.tables else None
    if args.trace:
        if not args.batch_size:
            raise SystemExit("--trace needs --batch-size")
        return load_traces(args.trace, args.batch_size, sizes)
    if args.criteo:
        if not args.batch_size or sizes is None:
            raise SystemExit("--criteo needs --batch-size and --tables (hash sizes, 26 tables)")
        return criteo_stream(args.criteo, args.batch_size, sizes, args.max_samples)
    kw = {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size or SIM_BATCH_SIZE}
    if sizes is not None:
        kw["table_sizes"] = sizes
    return synthetic_stream(parse_synthetic(args.synthetic, **kw))
