"""Synthetic click logs with Zipf-skewed, optionally drifting, embedding ids.

Each step's batch is a pure function of ``(config.seed, step)``: a per-step
``torch.Generator`` is seeded from both, so batches can be produced in any order, twice,
or in parallel and always agree. All sampling is vectorized over the whole batch.

Id distribution of table ``t`` (``n = num_embeddings[t]`` rows):

- ``"uniform"``: rows uniform on ``[0, n)``.
- ``"zipf"``: rank ``k`` in ``[0, n)`` has probability proportional to
  ``(k + 1) ** -alpha`` (truncated Zipf, any ``alpha >= 0``), and rank ``k`` is row
  ``perm_t[k]`` for a fixed random permutation ``perm_t`` of the table, so hot rows are
  scattered over the id space (as set-associative caches that hash ids would see them).
- ``"drift"``: Zipf whose hot set moves. With ``e = step // drift_period`` and
  ``s = max(1, round(drift_fraction * n))``, rank ``k`` is row
  ``perm_t[(k - e * s) mod n]``: every period, ``s`` previously coldest rows become the
  hottest ranks and every other row is ``s`` ranks cooler than before.

Labels are Bernoulli draws of ``sigmoid(label_signal * z + label_bias)`` where ``z``
sums, over tables, the mean of a hidden per-row score in ``[-1, 1]`` (a hash of the row
id), plus a fixed linear function of the dense features, so a model can learn them.
"""

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.data._sampling import (
    M31, AliasTables, RankToRow, ZipfRanks, derive_seed, generator, mix31, poisson_pmfs,
)
from torchrec_scratchpipe.data.trace import PathLike, RequestTrace

DISTRIBUTIONS = ("zipf", "uniform", "drift")
#: Default id distribution and Zipf exponent of synthetic data (every tool reads these).
DISTRIBUTION: str = "zipf"
ALPHA: float = 1.05
POOLING_DISTRIBUTIONS = ("poisson", "uniform", "fixed")

# Purpose words mixed into derived seeds (kept stable: changing them changes all data).
_STEP, _PERM, _ROW_KEY, _DENSE_W = 0, 1, 2, 3


@dataclass
class SyntheticConfig:
    """Shape and statistics of a synthetic click log.

    Args:
        num_embeddings: rows per table; one table per sparse feature.
        batch_size: samples per batch.
        pooling: mean ids per bag, one value for all tables or one per table.
        feature_names: KJT keys, default ``f0, f1, ...``.
        min_pooling: smallest bag size (0 allows empty bags).
        max_pooling: optional largest bag size (lengths are clipped to it).
        pooling_dist: bag-size law. ``"poisson"``: ``min_pooling + Poisson(pooling -
            min_pooling)``; ``"uniform"``: integers uniform on ``[min_pooling, 2 *
            pooling - min_pooling]``; ``"fixed"``: always ``pooling`` (must be integral).
        num_dense: dense features per sample (``log1p`` of exponential draws).
        distribution: ``"zipf"``, ``"uniform"`` or ``"drift"`` (see module docstring).
        alpha: Zipf exponent, any finite value >= 0 (e.g. 0.9, 1.05, 1.2).
        seed: non-negative base seed.
        drift_period: steps between hot-set moves (``"drift"`` only).
        drift_fraction: fraction of each table's rows the ranking rotates by per period.
        label_signal: strength of the learnable part of the click logit.
        label_bias: constant added to the click logit (negative = fewer clicks).
        materialize_max_rows: tables up to this many rows store their rank->row
            permutation (int32); larger ones use a memory-free hash bijection.

    Example:
        >>> cfg = SyntheticConfig(num_embeddings=[1000, 500], batch_size=8, pooling=2)
        >>> SyntheticClickLog(cfg).kjt(0).keys()
        ['f0', 'f1']
    """

    num_embeddings: List[int]
    batch_size: int
    pooling: Union[float, List[float]] = 1
    feature_names: Optional[List[str]] = None
    min_pooling: int = 1
    max_pooling: Optional[int] = None
    pooling_dist: str = "poisson"
    num_dense: int = 13
    distribution: str = DISTRIBUTION
    alpha: float = ALPHA
    seed: int = 0
    drift_period: int = 100
    drift_fraction: float = 0.05
    label_signal: float = 3.0
    label_bias: float = 0.0
    materialize_max_rows: int = 1 << 22

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"SyntheticConfig: {msg}")

        if isinstance(self.num_embeddings, int) or not len(self.num_embeddings):
            fail(f"num_embeddings must be a non-empty list of table sizes, got {self.num_embeddings!r}")
        self.num_embeddings = [int(n) for n in self.num_embeddings]
        if any(n <= 0 for n in self.num_embeddings):
            fail(f"every table needs at least one row; num_embeddings = {self.num_embeddings}")
        t = len(self.num_embeddings)
        if self.feature_names is None:
            self.feature_names = [f"f{i}" for i in range(t)]
        self.feature_names = list(self.feature_names)
        if len(self.feature_names) != t:
            fail(f"feature_names has {len(self.feature_names)} names but num_embeddings has {t} tables; "
                 "give one name per table or leave feature_names=None")
        if len(set(self.feature_names)) != t:
            fail(f"feature_names must be unique, got {self.feature_names}")
        if self.batch_size <= 0:
            fail(f"batch_size must be a positive integer, got {self.batch_size}")
        pools = self.pooling if isinstance(self.pooling, (list, tuple)) else [self.pooling] * t
        if len(pools) != t:
            fail(f"pooling has {len(pools)} values but there are {t} tables; give one value or one per table")
        self.pooling = [float(p) for p in pools]
        if self.min_pooling < 0:
            fail(f"min_pooling must be >= 0, got {self.min_pooling}")
        if self.pooling_dist not in POOLING_DISTRIBUTIONS:
            fail(f"pooling_dist must be one of {POOLING_DISTRIBUTIONS}, got {self.pooling_dist!r}")
        for i, p in enumerate(self.pooling):
            if not math.isfinite(p) or p < self.min_pooling:
                fail(f"pooling for table {i} is {p}, below min_pooling={self.min_pooling}; "
                     "raise pooling or set min_pooling=0 to allow empty bags")
            if self.max_pooling is not None and p > self.max_pooling:
                fail(f"pooling for table {i} is {p}, above max_pooling={self.max_pooling}")
            if self.pooling_dist == "fixed" and p != int(p):
                fail(f"pooling_dist='fixed' needs integral pooling, table {i} has {p}")
        if self.max_pooling is not None and self.max_pooling < max(self.min_pooling, 1):
            fail(f"max_pooling={self.max_pooling} must be >= max(min_pooling, 1)")
        if self.num_dense < 0:
            fail(f"num_dense must be >= 0, got {self.num_dense}")
        if self.distribution not in DISTRIBUTIONS:
            fail(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            fail(f"alpha must be a finite number >= 0 (e.g. 0.9 or 1.05), got {self.alpha}")
        if not isinstance(self.seed, int) or self.seed < 0:
            fail(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.drift_period < 1:
            fail(f"drift_period must be >= 1 step, got {self.drift_period}")
        if not 0.0 < self.drift_fraction <= 1.0:
            fail(f"drift_fraction must be in (0, 1], got {self.drift_fraction}")
        if not math.isfinite(self.label_signal) or not math.isfinite(self.label_bias):
            fail("label_signal and label_bias must be finite")
        if self.materialize_max_rows < 0:
            fail(f"materialize_max_rows must be >= 0, got {self.materialize_max_rows}")

    @property
    def num_tables(self) -> int:
        """Number of tables (= sparse features)."""
        return len(self.num_embeddings)


class SyntheticClickLog:
    """Deterministic synthetic click log producing TorchRec ``Batch`` objects.

    Args:
        config: the :class:`SyntheticConfig`.
        num_batches: length of iteration (``None`` = endless).
        start_step: first step yielded by iteration.

    Example:
        >>> log = SyntheticClickLog(SyntheticConfig([100, 100], batch_size=4), num_batches=3)
        >>> len(log), [b.labels.shape[0] for b in log]
        (3, [4, 4, 4])
        >>> torch.equal(log.kjt(7).values(), log.kjt(7).values())
        True
    """

    def __init__(self, config: SyntheticConfig, num_batches: Optional[int] = None, start_step: int = 0) -> None:
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None (endless), got {num_batches}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.config = config
        self.num_batches = num_batches
        self.start_step = start_step
        c = config
        self._sizes = torch.tensor(c.num_embeddings, dtype=torch.int64)
        self._pooling = torch.tensor(c.pooling, dtype=torch.float64).unsqueeze(1)
        self._poisson = AliasTables(poisson_pmfs([p - c.min_pooling for p in c.pooling]))
        self._grid_table = torch.arange(c.num_tables).repeat_interleave(c.batch_size)
        self._zipf = ZipfRanks(c.num_embeddings, c.alpha) if c.distribution != "uniform" else None
        self._perm = RankToRow(c.num_embeddings, c.seed, c.materialize_max_rows) if self._zipf is not None else None
        self._drift_shift = torch.tensor([max(1, round(c.drift_fraction * n)) for n in c.num_embeddings],
                                         dtype=torch.int64)
        self._row_key = torch.tensor([derive_seed(c.seed, _ROW_KEY, t) & M31 for t in range(c.num_tables)],
                                     dtype=torch.int64)
        self._dense_w = torch.randn(c.num_dense, generator=generator(c.seed, _DENSE_W))

    @property
    def feature_names(self) -> List[str]:
        """KJT keys, one per table."""
        return list(self.config.feature_names or [])

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this SyntheticClickLog is endless (num_batches=None) and has no len()")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        step = self.start_step
        while self.num_batches is None or step < self.start_step + self.num_batches:
            yield self.batch(step)
            step += 1

    def _generator(self, step: int) -> torch.Generator:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return generator(self.config.seed, _STEP, step)

    def _lengths(self, g: torch.Generator) -> torch.Tensor:
        c = self.config
        shape = (c.num_tables, c.batch_size)
        lo = float(c.min_pooling)
        if c.pooling_dist == "fixed":
            lengths = self._pooling.expand(shape)
        elif c.pooling_dist == "poisson":
            u = torch.rand(c.num_tables * c.batch_size, dtype=torch.float64, generator=g)
            lengths = (lo + self._poisson.sample(self._grid_table, u)).view(shape)
        else:
            span = 2.0 * (self._pooling - lo) + 1.0
            lengths = lo + torch.floor(torch.rand(shape, dtype=torch.float64, generator=g) * span)
        lengths = lengths.to(torch.int64)
        if c.max_pooling is not None:
            lengths = lengths.clamp(max=c.max_pooling)
        return lengths

    def _sparse(self, step: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lengths [T, B], values [N], table of each value [N])`` for ``step``."""
        c = self.config
        lengths = self._lengths(g)
        per_table = lengths.sum(1)
        total = int(per_table.sum())
        table = torch.repeat_interleave(torch.arange(c.num_tables), per_table, output_size=total)
        u = torch.rand(total, dtype=torch.float64, generator=g)
        if self._zipf is None or self._perm is None:
            n = self._sizes.index_select(0, table)
            return lengths, torch.minimum(u.mul_(n).to(torch.int64), n - 1), table
        v = torch.rand(total, dtype=torch.float64, generator=g) if self._zipf.has_tail else None
        rank = self._zipf.sample(table, u, v)
        if c.distribution == "drift":
            shift = (step // c.drift_period * self._drift_shift) % self._sizes
            rank = torch.remainder(rank - shift.index_select(0, table), self._sizes.index_select(0, table))
        return lengths, self._perm(table, rank), table

    def kjt(self, step: int) -> KeyedJaggedTensor:
        """The sparse features of ``step`` only (cheaper than :meth:`batch`).

        Keys are ``feature_names``; lengths are key-major ``[T * B]``; values int64.
        """
        lengths, values, _ = self._sparse(step, self._generator(step))
        return KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths.reshape(-1))

    def ids(self, step: int) -> List[torch.Tensor]:
        """Per table, all ids of ``step`` (every bag concatenated), as int64 tensors."""
        lengths, values, _ = self._sparse(step, self._generator(step))
        return list(torch.split(values, lengths.sum(1).tolist()))

    def id_stream(self, start: int = 0, num_steps: Optional[int] = None) -> Iterator[List[torch.Tensor]]:
        """:meth:`ids` for steps ``start, start + 1, ...`` (endless when ``num_steps`` is None)."""
        step = start
        while num_steps is None or step < start + num_steps:
            yield self.ids(step)
            step += 1

    def batch(self, step: int) -> Batch:
        """The full ``Batch`` (dense ``[B, num_dense]``, KJT, float labels ``[B]``) of ``step``.

        ``batch(step).sparse_features`` equals ``kjt(step)``.
        """
        c = self.config
        g = self._generator(step)
        lengths, values, table = self._sparse(step, g)
        b, t = c.batch_size, c.num_tables
        dense = torch.log1p(torch.empty(b, c.num_dense).exponential_(generator=g))
        score = mix31(values, self._row_key[table]).to(torch.float32) * (2.0 / M31) - 1.0
        flat_lengths = lengths.reshape(-1)
        bag = torch.repeat_interleave(torch.arange(t * b), flat_lengths, output_size=values.numel())
        bag_sum = torch.zeros(t * b).index_add_(0, bag, score)
        bag_mean = bag_sum / flat_lengths.clamp(min=1).to(torch.float32)
        z = bag_mean.view(t, b).sum(0) / math.sqrt(t)
        if c.num_dense:
            z = z + (dense - 0.6) @ self._dense_w / math.sqrt(c.num_dense)
        labels = torch.bernoulli(torch.sigmoid(c.label_signal * z + c.label_bias), generator=g)
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=flat_lengths)
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def to_trace(self, num_steps: int, start_step: int = 0) -> RequestTrace:
        """Steps ``start_step .. start_step + num_steps - 1`` as one request trace.

        Samples are laid out step after step, so ``trace.batches(batch_size)`` yields
        exactly ``kjt(start_step), kjt(start_step + 1), ...``.
        """
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        lengths_list: List[torch.Tensor] = []
        per_table: List[List[torch.Tensor]] = [[] for _ in range(self.config.num_tables)]
        for step in range(start_step, start_step + num_steps):
            lengths, values, _ = self._sparse(step, self._generator(step))
            lengths_list.append(lengths)
            for t, ids in enumerate(torch.split(values, lengths.sum(1).tolist())):
                per_table[t].append(ids)
        indices = torch.cat([torch.cat(chunks) for chunks in per_table])
        return RequestTrace.from_lengths(indices, torch.cat(lengths_list, dim=1), list(self.config.num_embeddings))

    def write_trace(self, path: PathLike, num_steps: int, start_step: int = 0,
                    compress: Optional[bool] = None) -> RequestTrace:
        """Write :meth:`to_trace` to ``path`` (gzip if ``compress`` or a ``.gz`` suffix)."""
        trace = self.to_trace(num_steps, start_step)
        trace.save(path, compress=compress)
        return trace


def synthetic_kjts(config: SyntheticConfig, num_steps: int, start_step: int = 0) -> Sequence[KeyedJaggedTensor]:
    """Convenience: the KJTs of ``num_steps`` consecutive steps as a list.

    Example:
        >>> len(synthetic_kjts(SyntheticConfig([10], batch_size=2), 3))
        3
    """
    log = SyntheticClickLog(config)
    return [log.kjt(s) for s in range(start_step, start_step + num_steps)]
