"""Build :class:`BatchStream` s from FBGEMM request traces, the synthetic generator, Criteo TSV.

All readers come from :mod:`torchrec_scratchpipe.data`; this module only cuts their
output into steps and flattens tables into one row space.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, List, Optional, Sequence

import torch

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig
from torchrec_scratchpipe.data.trace import PathLike, RequestTrace, read_request_trace
from torchrec_scratchpipe.sim.stream import BatchStream, _offsets


def trace_to_stream(
    trace: RequestTrace, batch_size: int, table_sizes: Sequence[int], drop_last: bool = False
) -> BatchStream:
    """Cut one request trace into steps of ``batch_size`` samples (vectorized, one sort).

    Args:
        trace: the trace (``lengths [T, B]``, table-major offsets).
        batch_size: samples per step; the last partial step is kept unless ``drop_last``.
        table_sizes: rows per table of the shared row space (>= the trace's ids).
        drop_last: drop a final step smaller than ``batch_size``.

    Example::

        >>> tr = RequestTrace.from_lengths(torch.tensor([1, 2, 0, 0]), torch.tensor([[1, 1], [1, 1]]))
        >>> [r.tolist() for r in trace_to_stream(tr, 1, [3, 3]).rows]
        [[1, 3], [2, 3]]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    t, b = trace.num_tables, trace.num_samples
    if t != len(table_sizes):
        raise ValueError(f"trace has {t} tables but {len(table_sizes)} table sizes were given")
    num_rows = int(sum(table_sizes))
    n = trace.indices.numel()
    bag = torch.repeat_interleave(torch.arange(t * b), trace.lengths.reshape(-1), output_size=n)
    table, sample = bag // b, bag % b
    step = sample // batch_size
    num_steps = b // batch_size if drop_last else -(-b // batch_size)
    keep = step < num_steps
    off = _offsets(table_sizes)
    flat = trace.indices + off[table]
    if bool((trace.indices >= torch.tensor(list(table_sizes))[table]).any()):
        raise ValueError("trace ids exceed the given table sizes")
    key = (step * num_rows + flat)[keep]
    uniq, counts = torch.unique(key, sorted=True, return_counts=True)
    per_step = torch.bincount(uniq // num_rows, minlength=num_steps).tolist()
    rows = list(torch.split(uniq % num_rows, per_step))
    return BatchStream(rows, list(torch.split(counts, per_step)), list(table_sizes))


def load_traces(
    paths: Sequence[PathLike],
    batch_size: int,
    table_sizes: Optional[Sequence[int]] = None,
    table_names: Optional[Sequence[str]] = None,
    drop_last: bool = False,
) -> BatchStream:
    """Read FBGEMM request-trace files and cut each, in order, into steps.

    Args:
        paths: trace files (``torch.save``d ``(indices, offsets, lengths)``, maybe gzipped).
        batch_size: samples per step.
        table_sizes: rows per table; default the largest ``max id + 1`` over all files.
        table_names: names for reports (default ``f0..``).
        drop_last: drop each file's final partial step.

    Example::

        >>> s = load_traces(["day0.pt.gz"], batch_size=4096)  # doctest: +SKIP
    """
    traces = [read_request_trace(p) for p in paths]
    if not traces:
        raise ValueError("no trace files given")
    t = traces[0].num_tables
    if any(tr.num_tables != t for tr in traces):
        raise ValueError(f"trace files disagree on the number of tables: {[tr.num_tables for tr in traces]}")
    if table_sizes is None:
        table_sizes = [max(tr.table_sizes()[i] for tr in traces) for i in range(t)]
    for path, tr in zip(paths, traces):
        if tr.num_samples < batch_size:  # one partial step (or none): say so, once per file
            print(f"note: {path} holds {tr.num_samples} samples, fewer than one batch of {batch_size}: "
                  f"{'it is dropped' if drop_last else 'it becomes one short step'}.", file=sys.stderr)
    parts = [trace_to_stream(tr, batch_size, table_sizes, drop_last) for tr in traces]
    out = BatchStream.concat(parts)
    out.table_names = list(table_names) if table_names else [f"f{i}" for i in range(t)]
    out.name = ",".join(str(p) for p in paths) if len(paths) < 4 else f"{len(paths)} trace files"
    return out


def parse_tables(spec: str) -> List[int]:
    """``"26x100000"`` -> 26 tables of 100000 rows; ``"1000,5000"`` -> two tables.

    Example::

        >>> parse_tables("2x10"), parse_tables("5,7")
        ([10, 10], [5, 7])
    """
    text = spec.strip()
    try:
        if "x" in text:
            count, size = text.split("x", 1)
            sizes = [int(size)] * int(count)
        else:
            sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"expected COUNTxROWS (like 26x100000) or a comma list of row counts (like 1000,2000), "
                         f"all positive, got {spec!r}")
    return sizes


class SyntheticSpec(SyntheticConfig):
    """A :class:`~torchrec_scratchpipe.data.SyntheticConfig` plus a number of ``steps``:
    what ``--synthetic`` asks for (see :func:`parse_synthetic`).

    Every field of the data (distribution, alpha, pooling, seed, drift period and fraction,
    ...) is ``SyntheticConfig``'s, with its defaults; only the argument order (the
    simulator's), the table sizes and batch size defaults and ``steps`` are added here.
    Dense features are off (``num_dense=0``): the simulator reads ids only.

    Args:
        distribution: ``"zipf"``, ``"uniform"`` or ``"drift"`` (moving hot set).
        alpha: Zipf exponent (None: ``SyntheticConfig``'s).
        table_sizes: rows per table (``num_embeddings``; default ``defaults.SIM_TABLE_SIZES``).
        batch_size: samples per step (default ``defaults.SIM_BATCH_SIZE``).
        steps: number of steps.
        **config: any other ``SyntheticConfig`` field (``pooling``, ``seed``,
            ``drift_period``, ``drift_fraction``, ...).

    Example::

        >>> s = SyntheticSpec("drift", 0.9, [50, 50], batch_size=8, steps=3, drift_period=5)
        >>> s.table_sizes, s.steps, s.drift_period, s.label()
        ([50, 50], 3, 5, 'drift(0.9)/p5/f0.05 2x50 B=8')
    """

    def __init__(
        self,
        distribution: str = "zipf",
        alpha: Optional[float] = None,
        table_sizes: Sequence[int] = defaults.SIM_TABLE_SIZES,
        batch_size: int = defaults.SIM_BATCH_SIZE,
        steps: int = defaults.SIM_STEPS,
        **config: Any,
    ) -> None:
        if alpha is not None:
            config["alpha"] = alpha
        config.setdefault("num_dense", 0)
        super().__init__(num_embeddings=list(table_sizes), batch_size=batch_size, distribution=distribution, **config)
        if steps < 1:
            raise ValueError(f"SyntheticSpec: steps must be >= 1, got {steps}")
        self.steps = steps

    @property
    def table_sizes(self) -> List[int]:
        """Rows per table (``num_embeddings``)."""
        return self.num_embeddings

    def label(self) -> str:
        """Short description for reports."""
        base = self.distribution if self.distribution == "uniform" else f"{self.distribution}({self.alpha})"
        if self.distribution == "drift":
            base += f"/p{self.drift_period}/f{self.drift_fraction}"
        return f"{base} {len(self.table_sizes)}x{max(self.table_sizes)} B={self.batch_size}"


def parse_synthetic(text: str, **kw: Any) -> SyntheticSpec:
    """Parse ``kind[:alpha][,key=value...]``, e.g. ``zipf:1.05`` or ``drift:1.05,period=20``.

    Keys: ``period``, ``fraction``, ``pooling``, ``seed``. Other fields come from ``kw``
    (``SyntheticSpec`` arguments); the text wins over ``kw``.

    Example::

        >>> s = parse_synthetic("drift:0.9,period=5", steps=3)
        >>> s.distribution, s.alpha, s.drift_period, s.steps
        ('drift', 0.9, 5, 3)
    """
    head, *opts = text.split(",")
    kind, _, alpha = head.partition(":")
    names = {"period": ("drift_period", int), "fraction": ("drift_fraction", float),
             "pooling": ("pooling", float), "seed": ("seed", int)}
    pairs = [("alpha", "alpha", float, alpha)] if alpha else []
    for opt in opts:
        key, _, value = opt.partition("=")
        if key.strip() not in names:
            raise ValueError(f"unknown synthetic option {key!r}; known: {sorted(names)}")
        pairs.append((key.strip(), *names[key.strip()], value))
    for key, attr, cast, value in pairs:
        try:
            kw[attr] = cast(value)
        except ValueError:
            raise ValueError(f"{key} takes a {cast.__name__}, got {value!r}") from None
    return SyntheticSpec(distribution=kind.strip(), **kw)


def synthetic_stream(spec: SyntheticSpec) -> BatchStream:
    """Generate ``spec.steps`` batches with :class:`~torchrec_scratchpipe.data.SyntheticClickLog`.

    Example::

        >>> s = synthetic_stream(SyntheticSpec(table_sizes=[50, 50], batch_size=8, steps=3))
        >>> s.num_steps, s.num_rows
        (3, 100)
    """
    log = SyntheticClickLog(spec)
    return BatchStream.from_table_ids(log.id_stream(0, spec.steps), spec.num_embeddings,
                                      spec.feature_names, spec.label())


def criteo_stream(
    paths: Sequence[PathLike], batch_size: int, table_sizes: Sequence[int], max_samples: Optional[int] = None
) -> BatchStream:
    """Read Criteo TSV files (hashed into ``table_sizes``) and cut them into steps.

    Example::

        >>> s = criteo_stream(["day_0.gz"], 4096, [1_000_000] * 26, max_samples=400_000)  # doctest: +SKIP
    """
    from torchrec_scratchpipe.data.criteo import CriteoTsvReader

    reader = CriteoTsvReader(list(paths), batch_size, list(table_sizes), max_samples=max_samples)

    def steps() -> Iterator[List[torch.Tensor]]:
        for batch in reader:
            kjt = batch.sparse_features
            yield list(torch.split(kjt.values(), kjt.lengths().view(len(table_sizes), -1).sum(1).tolist()))

    return BatchStream.from_table_ids(steps(), table_sizes, reader.feature_names, "criteo")
