"""Command-line input options shared by the simulator and the capacity advisor."""

from __future__ import annotations

import argparse

import torch

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.cli import converter, existing_file, non_negative_int, positive_int
from torchrec_scratchpipe.quiet import quiet_known_noise
from torchrec_scratchpipe.sim.sources import criteo_stream, load_traces, parse_synthetic, parse_tables, synthetic_stream
from torchrec_scratchpipe.sim.stream import BatchStream


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """Input options shared with the capacity advisor."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", nargs="+", type=existing_file, metavar="FILE",
                     help="FBGEMM request-trace files (maybe gzipped)")
    src.add_argument("--synthetic", metavar="SPEC",
                     help="zipf:ALPHA | uniform | drift:ALPHA[,period=P,fraction=F] [,pooling=X,seed=S]")
    src.add_argument("--criteo", nargs="+", type=existing_file, metavar="FILE",
                     help="Criteo TSV files (maybe gzipped)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"samples per step (synthetic default {defaults.SIM_BATCH_SIZE}; traces and Criteo need it)")
    p.add_argument("--tables", type=converter(parse_tables), default=None,
                   help=f"table sizes, '26x100000' or '1000,2000' (synthetic default "
                        f"{len(defaults.SIM_TABLE_SIZES)}x{defaults.SIM_TABLE_SIZES[0]}; Criteo hashing; traces: override)")
    p.add_argument("--steps", type=positive_int, default=defaults.SIM_STEPS, help="synthetic steps")
    p.add_argument("--seed", type=non_negative_int, default=defaults.SEED, help="synthetic seed")
    p.add_argument("--max-samples", type=positive_int, default=None, help="Criteo: stop after this many samples")
    p.add_argument("--threads", type=non_negative_int, default=defaults.THREADS,
                   help="torch CPU threads (0: torch's default; the ops are small, more threads lose badly on a "
                        "busy machine)")


def load_stream(args: argparse.Namespace) -> BatchStream:
    """Build the stream the arguments describe (see :func:`add_stream_args`); sets torch threads.

    Raises:
        ValueError: flags that do not go together, or a file that cannot be read (named).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    with quiet_known_noise():  # building KJTs (Criteo) triggers torch's one-time fx notice
        return _load_stream(args)


def _load_stream(args: argparse.Namespace) -> BatchStream:
    sizes = args.tables
    if args.trace:
        if not args.batch_size:
            raise ValueError("--trace needs --batch-size (samples per step)")
        return load_traces(args.trace, args.batch_size, sizes)
    if args.criteo:
        if not args.batch_size or sizes is None:
            raise ValueError("--criteo needs --batch-size and --tables (hash sizes of its 26 tables, like 26x100000)")
        return criteo_stream(args.criteo, args.batch_size, sizes, args.max_samples)
    kw = {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size or defaults.SIM_BATCH_SIZE}
    if sizes is not None:
        kw["table_sizes"] = sizes
    try:
        spec = parse_synthetic(args.synthetic, **kw)
    except ValueError as e:
        raise ValueError(f"--synthetic {args.synthetic}: {e}") from None
    return synthetic_stream(spec)
