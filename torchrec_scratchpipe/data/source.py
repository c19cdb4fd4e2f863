"""One entry point for training data: synthetic, FBGEMM request traces or Criteo TSV.

``open_source("synthetic" | "trace:PATH" | "criteo:PATH[,PATH...]", ...)`` returns the
table sizes, feature names and TorchRec ``Batch`` objects, so the example trainer and the
A/B tool accept the same ``--data`` argument.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torchrec.datasets.utils import Batch

from torchrec_scratchpipe.data.criteo import CriteoTsvReader
from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig
from torchrec_scratchpipe.data.trace import read_request_trace


@dataclass
class TrainingData:
    """Tables and batches of one data source.

    Args:
        table_sizes: rows per table (one table per feature).
        feature_names: KJT keys, in table order.
        batches: iterator of ``Batch`` (dense ``[B, num_dense]``, KJT, labels).
        num_dense: dense features per sample.
        description: a short label for reports.
    """

    table_sizes: List[int]
    feature_names: List[str]
    batches: Iterator[Batch]
    num_dense: int
    description: str

    def take(self, n: int) -> List[Batch]:
        """The next ``n`` batches (fewer if the source ends)."""
        return list(itertools.islice(self.batches, n))


def _trace_batches(path: str, batch_size: int, names: List[str], num_dense: int, seed: int) -> Iterator[Batch]:
    trace = read_request_trace(path)
    for step, kjt in enumerate(trace.batches(batch_size, names, drop_last=True)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        b = kjt.stride()
        yield Batch(
            dense_features=torch.randn(b, num_dense, generator=g),
            sparse_features=kjt,
            labels=torch.randint(0, 2, (b,), generator=g).float(),
        )


def open_source(
    spec: str,
    batch_size: int,
    tables: int = 8,
    rows: int = 50_000,
    pooling: int = 2,
    distribution: str = "zipf",
    alpha: float = 1.05,
    seed: int = 0,
    num_dense: int = 13,
    max_batches: Optional[int] = None,
) -> TrainingData:
    """Open ``spec`` as training data.

    Args:
        spec: ``"synthetic"``, ``"trace:PATH"`` (ids from the file; dense features and
            labels are random, seeded) or ``"criteo:PATH[,PATH...]"`` (hashed into ``rows``
            per table).
        batch_size: samples per batch.
        tables, rows, pooling, distribution, alpha: synthetic shape (``rows`` also sizes
            Criteo's hashed tables).
        seed: data seed.
        num_dense: dense features (synthetic and trace).
        max_batches: stop after this many batches.

    Example::

        >>> data = open_source("synthetic", batch_size=16, tables=2, rows=100)
        >>> data.table_sizes, len(data.take(3))
        ([100, 100], 3)
    """
    if spec == "synthetic":
        cfg = SyntheticConfig(
            num_embeddings=[rows] * tables, batch_size=batch_size, pooling=pooling,
            distribution=distribution, alpha=alpha, seed=seed, num_dense=num_dense,
        )
        log = SyntheticClickLog(cfg, num_batches=max_batches)
        desc = f"synthetic {distribution}" + (f"({alpha})" if distribution != "uniform" else "")
        return TrainingData([rows] * tables, log.feature_names, iter(log), num_dense, desc)
    if spec.startswith("trace:"):
        path = spec[len("trace:"):]
        trace = read_request_trace(path)
        names = [f"f{i}" for i in range(trace.num_tables)]
        it = _trace_batches(path, batch_size, names, num_dense, seed)
        if max_batches is not None:
            it = itertools.islice(it, max_batches)
        return TrainingData(trace.table_sizes(), names, it, num_dense, f"trace {path}")
    if spec.startswith("criteo:"):
        paths = spec[len("criteo:"):].split(",")
        reader = CriteoTsvReader(paths, batch_size, rows, drop_last=True)
        it = iter(reader)
        if max_batches is not None:
            it = itertools.islice(it, max_batches)
        return TrainingData(list(reader.num_embeddings), list(reader.feature_names), it, 13, f"criteo {','.join(paths)}")
    raise ValueError(f"unknown data source {spec!r}: use 'synthetic', 'trace:PATH' or 'criteo:PATH[,PATH...]'.")
