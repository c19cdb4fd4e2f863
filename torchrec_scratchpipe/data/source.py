"""One entry point for training data: synthetic, FBGEMM request traces or Criteo TSV.

``open_source("synthetic" | "trace:PATH" | "criteo:PATH[,PATH...]", ...)`` returns the
table sizes, feature names and TorchRec ``Batch`` objects, so the example trainer and the
A/B tool accept the same ``--data`` argument.

On several ranks every source gives each rank its own samples: synthetic data draws a
different stream per rank, and traces and Criteo files hand out their batches round-robin
(batch ``k`` of the file to rank ``k % world_size``), dropping a last round that would not
give every rank a full batch, so ranks train on disjoint samples for the same number of steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torchrec.datasets.utils import Batch

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.data.criteo import CriteoTsvReader
from torchrec_scratchpipe.data.synthetic import ALPHA, DISTRIBUTION, SyntheticClickLog, SyntheticConfig
from torchrec_scratchpipe.data.trace import RequestTrace, read_request_trace


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


def _trace_batches(trace: RequestTrace, batch_size: int, names: List[str], num_dense: int, seed: int,
                   rank: int, world_size: int) -> Iterator[Batch]:
    """This rank's batches of ``trace``: file batches ``rank, rank + world_size, ...``."""
    for round_ in range(trace.num_samples // (batch_size * world_size)):
        step = round_ * world_size + rank  # the batch's index in the file: seeds its dense part
        kjt = trace.select(step * batch_size, (step + 1) * batch_size).to_kjt(names)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        yield Batch(
            dense_features=torch.randn(batch_size, num_dense, generator=g),
            sparse_features=kjt,
            labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
        )


def open_source(
    spec: str,
    batch_size: int,
    tables: int = defaults.TABLES,
    rows: int = defaults.ROWS,
    pooling: int = defaults.POOLING,
    distribution: str = DISTRIBUTION,
    alpha: float = ALPHA,
    seed: int = defaults.SEED,
    num_dense: int = 13,
    max_batches: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingData:
    """Open ``spec`` as training data.

    Args:
        spec: ``"synthetic"``, ``"trace:PATH"`` (ids from the file; dense features and
            labels are random, seeded) or ``"criteo:PATH[,PATH...]"`` (hashed into ``rows``
            per table).
        batch_size: samples per batch.
        tables, rows, pooling, distribution, alpha: synthetic shape (``rows`` also sizes
            Criteo's hashed tables); defaults: the tools' (``defaults``) and ``SyntheticConfig``'s.
        seed: data seed (synthetic data on rank r > 0 of several uses ``seed * 1000 + r``).
        num_dense: dense features (synthetic and trace).
        max_batches: stop after this many batches (per rank).
        rank, world_size: which share of the data this rank reads (see the module doc).

    Raises:
        ValueError: an unknown source, a bad rank, or a trace with fewer samples than one
            batch per rank (it says how many it has).

    Example::

        >>> data = open_source("synthetic", batch_size=16, tables=2, rows=100)
        >>> data.table_sizes, len(data.take(3))
        ([100, 100], 3)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}.")
    if spec == "synthetic":
        cfg = SyntheticConfig(
            num_embeddings=[rows] * tables, batch_size=batch_size, pooling=pooling, distribution=distribution,
            alpha=alpha, seed=seed if world_size == 1 else seed * 1000 + rank, num_dense=num_dense,
        )
        log = SyntheticClickLog(cfg, num_batches=max_batches)
        desc = f"synthetic {distribution}" + (f"({alpha})" if distribution != "uniform" else "")
        return TrainingData([rows] * tables, log.feature_names, iter(log), num_dense, desc)
    if spec.startswith("trace:"):
        path = spec[len("trace:"):]
        trace = read_request_trace(path)
        if trace.num_samples < batch_size * world_size:
            raise ValueError(
                f"{path} holds {trace.num_samples} samples, fewer than one batch of {batch_size}"
                + (f" for each of {world_size} ranks" if world_size > 1 else "")
                + ": lower the batch size or use a longer trace."
            )
        names = [f"f{i}" for i in range(trace.num_tables)]
        it = _trace_batches(trace, batch_size, names, num_dense, seed, rank, world_size)
        if max_batches is not None:
            it = itertools.islice(it, max_batches)
        return TrainingData(trace.table_sizes(), names, it, num_dense, f"trace {path}")
    if spec.startswith("criteo:"):
        paths = spec[len("criteo:"):].split(",")
        reader = CriteoTsvReader(paths, batch_size, rows, drop_last=True, rank=rank, world_size=world_size)
        it = iter(reader)
        if max_batches is not None:
            it = itertools.islice(it, max_batches)
        return TrainingData(list(reader.num_embeddings), list(reader.feature_names), it, 13, f"criteo {','.join(paths)}")
    raise ValueError(f"unknown data source {spec!r}: use 'synthetic', 'trace:PATH' or 'criteo:PATH[,PATH...]'.")
