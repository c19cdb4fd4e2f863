"""Vectorized sampling primitives for the synthetic click-log generator.

Everything here works on whole tensors (one call per batch, or per table at most);
nothing loops over individual ids in Python.

- :func:`derive_seed` turns integer words (seed, purpose, step, ...) into a 63-bit seed.
- :func:`mix31` is a cheap keyed integer hash into ``[0, 2**31)``.
- :class:`AliasTables` samples small discrete laws (bag sizes, Zipf heads) in O(1).
- :class:`ZipfRanks` draws ranks from truncated Zipf laws, several tables at once.
- :class:`RankToRow` maps Zipf ranks to row ids through a fixed per-table permutation.
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

M31 = (1 << 31) - 1

# Ranks below this are sampled exactly (alias table); above it the
# tail is sampled from the closed-form midpoint integral (relative error < 2e-6 there).
ZIPF_EXACT_HEAD = 1 << 8


def derive_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integer words, independent for each word tuple.

    Args:
        words: non-negative integers, e.g. ``(seed, purpose, step)``.

    Example:
        >>> derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*words: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``words``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*words))
    return g


def mix31(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Keyed hash of non-negative int64 ``x`` into ``[0, 2**31)`` (elementwise).

    Args:
        x: int64 tensor of non-negative values.
        key: int64 tensor (broadcastable to ``x``) of keys in ``[0, 2**31)``.

    Example:
        >>> h = mix31(torch.arange(4), torch.tensor(7))
        >>> bool(((h >= 0) & (h < 2**31)).all())
        True
    """
    x = (x ^ (x >> 31) ^ key) & M31
    x = (x * 0x2C1B3C6D) & M31
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & M31
    return x ^ (x >> 13)


def _tail_mass(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Integral of ``x**-alpha`` from ``x0`` to ``x1`` (float64, stable near alpha=1)."""
    b = 1.0 - alpha
    log_ratio = torch.log(x1 / x0)
    if abs(b) < 1e-12:
        return log_ratio
    return x0.pow(b) * torch.expm1(b * log_ratio) / b


def _tail_inverse(x0: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """The ``x`` with ``_tail_mass(x0, x, alpha) == w`` (reference form; ZipfRanks inlines it)."""
    b = 1.0 - alpha
    if abs(b) < 1e-12:
        return x0 * torch.exp(w)
    arg = (w * b / x0.pow(b)).clamp(min=-1.0 + 1e-15)
    return x0 * torch.exp(torch.log1p(arg) / b)


class AliasTables:
    """Walker/Vose alias tables for several discrete distributions, sampled at once.

    One uniform draw per sample, two 1-D gathers and a compare: O(1) per id and much
    faster than ``torch.searchsorted`` on CPU.

    Args:
        pmfs: per table, non-negative weights of outcomes ``0 .. len - 1`` (normalized here).

    Example:
        >>> a = AliasTables([[0.5, 0.5], [0.0, 1.0]])
        >>> a.sample(torch.tensor([1, 1]), torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
        [1, 1]
    """

    def __init__(self, pmfs: Sequence[Sequence[float]]) -> None:
        self.width = max(len(p) for p in pmfs)
        k = self.width
        prob = torch.zeros(len(pmfs) * k, dtype=torch.float64)
        alias = torch.zeros(len(pmfs) * k, dtype=torch.int64)
        for t, pmf in enumerate(pmfs):
            weights = [float(w) for w in pmf] + [0.0] * (k - len(pmf))
            total = sum(weights)
            scaled = [w * k / total for w in weights]
            small = [i for i, x in enumerate(scaled) if x < 1.0]
            large = [i for i, x in enumerate(scaled) if x >= 1.0]
            p_t, a_t = [1.0] * k, list(range(k))
            while small and large:
                lo, hi = small.pop(), large.pop()
                p_t[lo], a_t[lo] = scaled[lo], hi
                scaled[hi] += scaled[lo] - 1.0
                (small if scaled[hi] < 1.0 else large).append(hi)
            best = max(range(k), key=lambda i: weights[i])
            for i in small + large:  # leftovers are 1 up to rounding; never emit a 0-weight outcome
                p_t[i], a_t[i] = (1.0, i) if weights[i] > 0 else (0.0, best)
            prob[t * k:(t + 1) * k] = torch.tensor(p_t, dtype=torch.float64)
            alias[t * k:(t + 1) * k] = torch.tensor(a_t, dtype=torch.int64)
        self.prob, self.alias = prob, alias

    def sample(self, table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Outcomes for uniform draws ``u`` (float64 in [0, 1)) of tables ``table`` (int64)."""
        x = u * self.width
        column = x.to(torch.int64).clamp_(max=self.width - 1)
        idx = torch.add(column, table, alpha=self.width)
        accept = x.sub_(column) < self.prob.index_select(0, idx)
        return torch.where(accept, column, self.alias.index_select(0, idx))


def poisson_pmfs(rates: Sequence[float]) -> List[List[float]]:
    """Poisson probabilities ``P(k)``, ``k = 0 .. kmax``, one list per rate (mass beyond
    ``kmax`` is below 1e-15 and dropped)."""
    pmfs = []
    for lam in rates:
        if lam <= 0:
            pmfs.append([1.0])
            continue
        kmax = int(math.ceil(lam + 14.0 * math.sqrt(lam) + 30.0))
        pmfs.append([math.exp(k * math.log(lam) - lam - math.lgamma(k + 1.0)) for k in range(kmax + 1)])
    return pmfs


class ZipfRanks:
    """Sampler of truncated Zipf ranks for several tables at once.

    Rank ``k`` (0-based) of a table with ``n`` rows has probability proportional to
    ``(k + 1) ** -alpha`` for ``k < n``; any ``alpha >= 0`` is valid (finite support).
    An alias table per table holds the first :data:`ZIPF_EXACT_HEAD` ranks exactly plus
    one "tail" outcome carrying the remaining mass; a tail draw inverts the integral of
    ``x**-alpha`` over ``[k + 0.5, k + 1.5)`` in closed form, so huge tables need no
    per-row memory.

    Args:
        sizes: rows per table.
        alpha: Zipf exponent (>= 0).

    Example:
        >>> z = ZipfRanks([1000, 50], alpha=1.05)
        >>> g = torch.Generator().manual_seed(0)
        >>> u = torch.rand(2, 3, dtype=torch.float64, generator=g)
        >>> r = z.sample(torch.tensor([0, 0, 1]), u[0], u[1])
        >>> bool((r[:2] < 1000).all() and r[2] < 50)
        True
    """

    def __init__(self, sizes: Sequence[int], alpha: float) -> None:
        self.alpha = float(alpha)
        b = 1.0 - self.alpha
        self.near_one = abs(b) < 1e-12
        pmfs: List[List[float]] = []
        coef, x0s, last = [], [], []
        for n in (int(n) for n in sizes):
            h = min(n, ZIPF_EXACT_HEAD)
            head = torch.arange(1, h + 1, dtype=torch.float64).pow(-self.alpha).tolist()
            x0 = h + 0.5
            tail = float(_tail_mass(torch.tensor(x0, dtype=torch.float64),
                                    torch.tensor(n + 0.5, dtype=torch.float64), self.alpha)) if n > h else 0.0
            pmfs.append(head + [tail] if tail > 0 else head)
            # A tail draw v in [0, 1) is at x = x0 * exp(log1p(v * coef) / b), or
            # x0 * exp(v * tail) when alpha = 1 (see _tail_inverse).
            coef.append(tail if self.near_one else tail * b / x0 ** b)
            x0s.append(x0)
            last.append(float(n - 1))
        self.head = AliasTables(pmfs)
        self.has_tail = any(int(n) > ZIPF_EXACT_HEAD for n in sizes)
        self.coef = torch.tensor(coef, dtype=torch.float64)
        self.x0 = torch.tensor(x0s, dtype=torch.float64)
        self.last = torch.tensor(last, dtype=torch.float64)

    def sample(self, table: torch.Tensor, u: torch.Tensor, v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ranks of tables ``table`` (int64) from two independent uniform float64 draws.

        ``u`` picks head rank or tail; ``v`` places tail draws (may be ``None`` when no
        table is larger than :data:`ZIPF_EXACT_HEAD`).
        """
        outcome = self.head.sample(table, u)
        if not self.has_tail:
            return outcome
        if v is None:
            raise ValueError("ZipfRanks.sample needs a second uniform draw v for tables with a tail")
        x = v * self.coef.index_select(0, table)
        if self.near_one:
            x.exp_()
        else:
            x.clamp_(min=-1.0 + 1e-15).log1p_().mul_(1.0 / (1.0 - self.alpha)).exp_()
        x.mul_(self.x0.index_select(0, table)).add_(0.5).floor_().sub_(1.0)  # 0-based rank
        tail_rank = torch.minimum(x.clamp_(min=float(ZIPF_EXACT_HEAD)), self.last.index_select(0, table))
        return torch.where(outcome == ZIPF_EXACT_HEAD, tail_rank.to(torch.int64), outcome)


class RankToRow:
    """Fixed per-table bijection rank -> row id, so hot rows are scattered over the ids.

    Tables with at most ``materialize_max_rows`` rows store a ``torch.randperm``
    (int32); larger tables use a keyed hash bijection on the next power of two with
    cycle walking, which needs no memory (vectorized over all such tables at once).

    Args:
        sizes: rows per table.
        seed: base seed; table ``t`` uses ``derive_seed(seed, 1, t)``.
        materialize_max_rows: largest table whose permutation is stored.

    Example:
        >>> p = RankToRow([10], seed=0, materialize_max_rows=0)
        >>> sorted(p(torch.zeros(10, dtype=torch.int64), torch.arange(10)).tolist()) == list(range(10))
        True
    """

    ROUNDS = 3

    def __init__(self, sizes: Sequence[int], seed: int, materialize_max_rows: int) -> None:
        self.sizes = torch.tensor([int(n) for n in sizes], dtype=torch.int64)
        perms: List[torch.Tensor] = []
        starts: List[int] = []
        hash_rows: List[List[int]] = []
        offset = 0
        for t, n in enumerate(int(n) for n in sizes):
            g = generator(seed, 1, t)
            bits = max(2, math.ceil(math.log2(n))) if n > 1 else 2
            row = [(1 << bits) - 1, (bits + 1) // 2]
            if n <= materialize_max_rows:
                perms.append(torch.randperm(n, generator=g))
                starts.append(offset)
                offset += n
                row += [0, 1] * self.ROUNDS
            else:
                starts.append(-1)
                for _ in range(self.ROUNDS):
                    key = int(torch.randint(0, 1 << min(bits, 62), (1,), generator=g))
                    mult = int(torch.randint(0, 1 << max(1, min(31, 61 - bits)), (1,), generator=g)) | 1
                    row += [key, mult]
            hash_rows.append(row)
        dtype = torch.int32 if offset <= M31 else torch.int64  # int32 halves the memory
        self.perm = torch.cat([p.to(dtype) for p in perms]) if perms else torch.empty(0, dtype=dtype)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.hash_params = torch.tensor(hash_rows, dtype=torch.int64)  # [T, 2 + 2 * ROUNDS]
        self.any_stored = bool(perms)
        self.any_hashed = bool((self.starts < 0).any())

    def _bijection(self, x: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
        mask, shift = hp[:, 0], hp[:, 1]
        for r in range(self.ROUNDS):
            x = (x + hp[:, 2 + 2 * r]) & mask
            x = (x * hp[:, 3 + 2 * r]) & mask
            x = x ^ (x >> shift)
        return x

    def _hashed(self, table: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        hp = self.hash_params.index_select(0, table)
        n = self.sizes.index_select(0, table)
        y = self._bijection(rank, hp)
        out = (y >= n).nonzero().squeeze(1)
        while out.numel():  # cycle walking: the domain is < 2n, so few rounds
            z = self._bijection(y[out], hp[out])
            y[out] = z
            out = out[z >= n[out]]
        return y

    def __call__(self, table: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """Row ids for ``rank`` (int64, within each table's size) of tables ``table``."""
        start = self.starts.index_select(0, table)
        if not self.any_hashed:
            return self.perm.index_select(0, start.add_(rank)).to(torch.int64)
        if not self.any_stored:
            return self._hashed(table, rank)
        row = torch.empty_like(rank)
        stored = start >= 0
        row[stored] = self.perm[start[stored] + rank[stored]].to(torch.int64)
        hashed = ~stored
        row[hashed] = self._hashed(table[hashed], rank[hashed])
        return row
