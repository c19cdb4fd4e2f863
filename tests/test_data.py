"""Tests for torchrec_scratchpipe.data: synthetic logs, request traces, Criteo TSV."""

import gzip
import math
import re
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.data import (
    CriteoTsvReader,
    RequestTrace,
    SyntheticClickLog,
    SyntheticConfig,
    hash_categorical,
    parse_criteo_line,
    read_request_trace,
    write_request_trace,
)
from torchrec_scratchpipe.data._sampling import ZIPF_EXACT_HEAD, RankToRow, ZipfRanks

REPO = Path(__file__).resolve().parents[1]


def small_config(**kw) -> SyntheticConfig:
    base = dict(num_embeddings=[1000, 37, 5000, 1], batch_size=64, pooling=[2, 1, 3, 1], num_dense=4)
    base.update(kw)
    return SyntheticConfig(**base)


def kjt_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    return (a.keys() == b.keys() and torch.equal(a.lengths(), b.lengths())
            and torch.equal(a.values(), b.values()))


def top_share(ids: torch.Tensor, n: int, frac: float = 0.01) -> float:
    counts = torch.bincount(ids, minlength=n).sort(descending=True).values
    return float(counts[: max(1, int(n * frac))].sum()) / ids.numel()


def hot_set(ids: torch.Tensor, n: int, k: int) -> set:
    return set(torch.bincount(ids, minlength=n).topk(k).indices.tolist())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1) / 2
    ranks[order] = avg[inverse]
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, pattern", [
    (dict(num_embeddings=[]), "num_embeddings"),
    (dict(num_embeddings=[10, 0]), "at least one row"),
    (dict(feature_names=["a"]), "feature_names has 1 names"),
    (dict(feature_names=["a", "a", "b", "c"]), "unique"),
    (dict(batch_size=0), "batch_size"),
    (dict(pooling=[1, 2]), "pooling has 2 values"),
    (dict(pooling=0.5), "min_pooling"),
    (dict(pooling=3, max_pooling=2), "max_pooling"),
    (dict(pooling=1.5, pooling_dist="fixed"), "integral"),
    (dict(pooling_dist="gamma"), "pooling_dist"),
    (dict(distribution="pareto"), "distribution"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(seed=-1), "seed"),
    (dict(drift_period=0), "drift_period"),
    (dict(drift_fraction=0.0), "drift_fraction"),
    (dict(num_dense=-1), "num_dense"),
])
def test_config_validation(kw, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        small_config(**kw)


def test_config_defaults() -> None:
    cfg = small_config(pooling=2, min_pooling=0)
    assert cfg.feature_names == ["f0", "f1", "f2", "f3"]
    assert cfg.pooling == [2.0] * 4 and cfg.num_tables == 4
    SyntheticConfig([10], batch_size=1, alpha=0.9)  # alpha below 1 is valid


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("distribution", ["zipf", "uniform", "drift"])
def test_determinism_and_order_independence(distribution: str) -> None:
    cfg = small_config(distribution=distribution, drift_period=2)
    a, b = SyntheticClickLog(cfg), SyntheticClickLog(cfg)
    later_first = [b.batch(s) for s in (5, 3, 0)][::-1]
    for step, batch in zip((0, 3, 5), later_first):
        ref = a.batch(step)
        assert kjt_equal(ref.sparse_features, batch.sparse_features)
        assert torch.equal(ref.dense_features, batch.dense_features)
        assert torch.equal(ref.labels, batch.labels)
        assert kjt_equal(a.kjt(step), ref.sparse_features)  # sparse-only path agrees
    assert not torch.equal(a.kjt(0).values(), a.kjt(1).values())
    other = SyntheticClickLog(small_config(distribution=distribution, drift_period=2, seed=1))
    assert not torch.equal(a.kjt(0).values(), other.kjt(0).values())


def test_iteration_and_len() -> None:
    log = SyntheticClickLog(small_config(), num_batches=3, start_step=7)
    batches = list(log)
    assert len(log) == 3 and len(batches) == 3
    for i, b in enumerate(batches):
        assert kjt_equal(b.sparse_features, log.kjt(7 + i))
    endless = SyntheticClickLog(small_config())
    with pytest.raises(TypeError):
        len(endless)
    assert kjt_equal(next(iter(endless)).sparse_features, endless.kjt(0))
    with pytest.raises(ValueError, match="step"):
        endless.kjt(-1)


@pytest.mark.parametrize("pooling_dist", ["poisson", "uniform", "fixed"])
@pytest.mark.parametrize("materialize", [1 << 22, 0])
def test_kjt_layout_and_ranges(pooling_dist: str, materialize: int) -> None:
    cfg = small_config(pooling_dist=pooling_dist, materialize_max_rows=materialize, batch_size=512,
                       feature_names=["a", "b", "c", "d"])
    log = SyntheticClickLog(cfg)
    batch = log.batch(4)
    kjt = batch.sparse_features
    t, b = cfg.num_tables, cfg.batch_size
    assert kjt.keys() == ["a", "b", "c", "d"]
    assert kjt.lengths().shape == (t * b,) and kjt.stride() == b
    assert kjt.values().dtype == torch.int64
    assert int(kjt.lengths().sum()) == kjt.values().numel()
    assert batch.dense_features.shape == (b, 4) and batch.labels.shape == (b,)
    assert batch.labels.dtype == torch.float32 and set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    lengths = kjt.lengths().view(t, b)
    for i, (name, jt) in enumerate(kjt.to_dict().items()):
        ids = jt.values()
        assert torch.equal(jt.lengths(), lengths[i])
        assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < cfg.num_embeddings[i])
        assert abs(float(lengths[i].float().mean()) - cfg.pooling[i]) < 0.25
        assert int(lengths[i].min()) >= cfg.min_pooling
    if pooling_dist == "fixed":
        assert torch.equal(lengths, torch.tensor(cfg.pooling).long().unsqueeze(1).expand(t, b))
    per_table = log.ids(4)
    assert [x.numel() for x in per_table] == lengths.sum(1).tolist()
    assert torch.equal(torch.cat(per_table), kjt.values())


def test_empty_bags_and_max_pooling() -> None:
    cfg = small_config(pooling=1.0, min_pooling=0, max_pooling=2, batch_size=2000)
    lengths = SyntheticClickLog(cfg).kjt(0).lengths()
    assert int((lengths == 0).sum()) > 0 and int(lengths.max()) <= 2


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000, 1025])
@pytest.mark.parametrize("materialize", [1 << 22, 0])
def test_rank_to_row_is_a_permutation(n: int, materialize: int) -> None:
    perm = RankToRow([5, n], seed=3, materialize_max_rows=materialize)
    rows = perm(torch.ones(n, dtype=torch.int64), torch.arange(n))
    assert sorted(rows.tolist()) == list(range(n))


@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0, 1.2])
def test_zipf_ranks_match_exact_cdf(alpha: float) -> None:
    n, draws = 20 * ZIPF_EXACT_HEAD, 1_600_000  # larger than the exact head: exercises the tail
    g = torch.Generator().manual_seed(1)
    u, v = torch.rand(2, draws, dtype=torch.float64, generator=g)
    ranks = ZipfRanks([n], alpha).sample(torch.zeros(draws, dtype=torch.int64), u, v)
    assert int(ranks.min()) >= 0 and int(ranks.max()) < n
    pmf = torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(pmf / pmf.sum(), 0)
    for k in (1, 10, ZIPF_EXACT_HEAD, 2 * ZIPF_EXACT_HEAD, n // 2, n - 1):
        p = float(cdf[k - 1])
        emp = float((ranks < k).double().mean())
        assert abs(emp - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (k, emp, p)
    # Per-rank counts around the exact-head / closed-form-tail boundary: chi-square over
    # 64 bins must stay within 5 standard deviations of its mean (df = 64, sd = sqrt(128)).
    lo, bins = ZIPF_EXACT_HEAD - 8, 64
    observed = torch.bincount(ranks, minlength=n)[lo:lo + bins].double()
    expected = (pmf / pmf.sum())[lo:lo + bins] * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < bins + 5 * math.sqrt(2 * bins), chi2


def test_zipf_skew_and_scatter() -> None:
    n = 100_000
    shares = {}
    for name, kw in [("uniform", dict(distribution="uniform")), ("a0.9", dict(alpha=0.9)),
                     ("a1.2", dict(alpha=1.2))]:
        cfg = SyntheticConfig([n], batch_size=100_000, pooling=1, pooling_dist="fixed", **kw)
        ids = SyntheticClickLog(cfg).ids(0)[0]
        shares[name] = top_share(ids, n)
        if name == "a1.2":
            hot = torch.tensor(sorted(hot_set(ids, n, 100)))
            # hot rows are scattered over the id space, not packed at the low ids
            assert int(hot.max()) > n // 2 and int(hot.min()) < n // 2
    # Uniform: about one draw per row, so the top 1% of rows (those drawn ~4-6 times by
    # Poisson noise) hold ~4-5% of the draws, far from the Zipf shares.
    assert shares["uniform"] < 0.06
    assert shares["a1.2"] > 10 * shares["uniform"]
    assert shares["a1.2"] > shares["a0.9"] > 5 * shares["uniform"]


def test_drift_moves_hot_set() -> None:
    n, k = 20_000, 200
    cfg = dict(num_embeddings=[n], batch_size=50_000, pooling=1, pooling_dist="fixed", alpha=1.2, num_dense=0)
    drift = SyntheticClickLog(SyntheticConfig(distribution="drift", drift_period=10, drift_fraction=0.05, **cfg))
    static = SyntheticClickLog(SyntheticConfig(distribution="zipf", **cfg))
    # Within the first period the drifting log is exactly the static Zipf log.
    assert torch.equal(drift.ids(3)[0], static.ids(3)[0])
    h0, h1, h_far = (hot_set(drift.ids(s)[0], n, k) for s in (0, 1, 30))
    assert len(h0 & h1) > 0.8 * k
    assert len(h0 & h_far) < 0.2 * k
    assert len(hot_set(static.ids(30)[0], n, k) & h0) > 0.8 * k


def test_labels_are_learnable() -> None:
    cfg = SyntheticConfig([50, 50], batch_size=4000, pooling=1, pooling_dist="fixed", num_dense=0)
    log = SyntheticClickLog(cfg)

    def rows_and_labels(step: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
        b = log.batch(step)
        return [jt.values() for jt in b.sparse_features.to_dict().values()], b.labels

    train = [rows_and_labels(s) for s in range(5)]
    rates = []
    for t in range(2):
        rows = torch.cat([r[t] for r, _ in train])
        labels = torch.cat([y for _, y in train])
        clicks = torch.zeros(50).index_add_(0, rows, labels)
        rates.append(clicks / torch.bincount(rows, minlength=50).clamp(min=1))
    rows, labels = rows_and_labels(100)
    score = rates[0][rows[0]] + rates[1][rows[1]]
    assert auc(score, labels) > 0.6


# ----------------------------------------------------------------------------- traces


def random_trace(t: int, b: int, seed: int = 0, max_len: int = 4) -> RequestTrace:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (t, b), generator=g)
    indices = torch.randint(0, 100, (int(lengths.sum()),), generator=g)
    return RequestTrace.from_lengths(indices, lengths)


def manual_slice(trace: RequestTrace, start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: Python loops over tables and samples."""
    vals, lens = [], []
    b = trace.num_samples
    for t in range(trace.num_tables):
        for j in range(start, end):
            lo, hi = int(trace.offsets[t * b + j]), int(trace.offsets[t * b + j + 1])
            vals += trace.indices[lo:hi].tolist()
            lens.append(hi - lo)
    return torch.tensor(vals, dtype=torch.int64), torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize("name, compress, gz", [("t.pt", None, False), ("t.pt.gz", None, True),
                                                ("t.pt", True, True), ("t.pt.gz", False, False)])
def test_trace_round_trip(tmp_path: Path, name: str, compress, gz: bool) -> None:
    tr = random_trace(3, 11)
    path = tmp_path / name
    write_request_trace(path, tr.indices.int(), tr.offsets.int(), tr.lengths, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_request_trace(path)
    assert back.indices.dtype == torch.int64
    for field in ("indices", "offsets", "lengths"):
        assert torch.equal(getattr(back, field), getattr(tr, field))
    assert (back.num_tables, back.num_samples) == (3, 11)
    raw = torch.load(gzip.open(path) if gz else path, weights_only=True)  # plain FBGEMM tuple
    assert isinstance(raw, tuple) and len(raw) == 3 and raw[2].shape == (3, 11)


def test_trace_kjt_and_sizes() -> None:
    tr = random_trace(2, 5, seed=4)
    kjt = tr.to_kjt(["x", "y"])
    assert kjt.keys() == ["x", "y"] and torch.equal(kjt.values(), tr.indices)
    for t, jt in enumerate(kjt.to_dict().values()):
        assert torch.equal(jt.values(), tr.table_ids(t))
        assert tr.table_sizes()[t] == max(int(jt.values().max()) + 1 if jt.values().numel() else 1, 1)
    assert RequestTrace.from_kjt(kjt).offsets.tolist() == tr.offsets.tolist()
    assert RequestTrace(tr.indices, tr.offsets, tr.lengths, [100, 100]).table_sizes() == [100, 100]
    with pytest.raises(ValueError, match="feature_names"):
        tr.to_kjt(["x"])


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), b=st.integers(0, 30), bs=st.integers(1, 12), seed=st.integers(0, 1000),
       drop_last=st.booleans())
def test_trace_batches_match_manual_slicing(t: int, b: int, bs: int, seed: int, drop_last: bool) -> None:
    tr = random_trace(t, b, seed)
    batches = list(tr.batches(bs, drop_last=drop_last))
    starts = list(range(0, b, bs))
    if drop_last and b % bs:
        starts = starts[:-1]
    assert len(batches) == len(starts) == tr.num_batches(bs, drop_last)
    for start, kjt in zip(starts, batches):
        end = min(start + bs, b)
        vals, lens = manual_slice(tr, start, end)
        assert kjt.stride() == end - start
        assert torch.equal(kjt.values(), vals) and torch.equal(kjt.lengths(), lens)


def test_synthetic_trace_reproduces_steps(tmp_path: Path) -> None:
    cfg = small_config(batch_size=16, min_pooling=0)
    log = SyntheticClickLog(cfg)
    path = tmp_path / "syn.pt.gz"
    log.write_trace(path, num_steps=4, start_step=2)
    tr = read_request_trace(path, num_embeddings=cfg.num_embeddings)
    assert (tr.num_tables, tr.num_samples) == (4, 64)
    batches = list(tr.batches(16, feature_names=cfg.feature_names))
    assert len(batches) == 4
    for i, kjt in enumerate(batches):
        assert kjt_equal(kjt, log.kjt(2 + i))


def _save_raw(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("make, pattern", [
    (lambda tr: (tr.indices, tr.offsets[:-1], tr.lengths), r"T\*B\+1"),
    (lambda tr: (tr.indices, tr.offsets, tr.lengths.reshape(-1)), r"shape \[T, B\]"),
    (lambda tr: (tr.indices[:-1], tr.offsets, tr.lengths), "indices has"),
    (lambda tr: (tr.indices, tr.offsets, tr.lengths.flip(1)), "do not match lengths at table"),
    (lambda tr: (tr.indices.float(), tr.offsets, tr.lengths), "integer dtype"),
    (lambda tr: (tr.indices, tr.offsets), "expected a tuple"),
    (lambda tr: {"indices": tr.indices}, "expected a tuple"),
])
def test_malformed_trace_errors(tmp_path: Path, make, pattern: str) -> None:
    tr = random_trace(2, 6, seed=9, max_len=3)
    assert not torch.equal(tr.lengths, tr.lengths.flip(1))
    path = _save_raw(tmp_path / "bad.pt", make(tr))
    with pytest.raises(ValueError, match=pattern) as info:
        read_request_trace(path)
    assert "bad.pt" in str(info.value)


def test_trace_garbage_and_range_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt.*not a torch.save file"):
        read_request_trace(junk)
    gz = tmp_path / "junk.gz"
    gz.write_bytes(b"\x1f\x8b broken")
    with pytest.raises(ValueError, match="junk.gz.*gzip"):
        read_request_trace(gz)
    tr = random_trace(2, 6)
    good = tmp_path / "good.pt"
    tr.save(good)
    with pytest.raises(ValueError, match=r"good.pt.*table \d has id \d+ but num_embeddings"):
        read_request_trace(good, num_embeddings=[1, 1])
    with pytest.raises(ValueError, match="num_embeddings has 1 entries"):
        read_request_trace(good, num_embeddings=[1000])


# ----------------------------------------------------------------------------- criteo


def criteo_rows(n: int, seed: int) -> List[List[str]]:
    """Random Criteo-like rows as field strings, with some missing values."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        r = torch.randint(0, 10, (40,), generator=g).tolist()
        dense = ["" if v == 0 else str((v - 3) * 7) for v in r[1:14]]  # includes negatives and missing
        cats = ["" if v == 0 else format(v * 0x1F3A9B7 + 0xFFFF0000, "08x") for v in r[14:]]
        rows.append([str(r[0] % 2)] + dense + cats)
    return rows


def test_criteo_tsv_round_trip(tmp_path: Path) -> None:
    sizes = [7 + i for i in range(26)]
    rows = criteo_rows(11, seed=0)
    plain = tmp_path / "day_0.tsv"
    plain.write_text("".join("\t".join(r) + "\n" for r in rows[:6]) + "\n")  # blank line skipped
    packed = tmp_path / "day_1.gz"
    with gzip.open(packed, "wt") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows[6:]))
    batches = list(CriteoTsvReader([plain, packed], batch_size=4, num_embeddings=sizes))
    assert [b.labels.numel() for b in batches] == [4, 4, 3]
    assert len(list(CriteoTsvReader([plain, packed], 4, sizes, drop_last=True))) == 2
    assert sum(b.labels.numel() for b in CriteoTsvReader([plain, packed], 4, sizes, max_samples=5)) == 5
    labels = torch.cat([b.labels for b in batches])
    dense = torch.cat([b.dense_features for b in batches])
    assert labels.tolist() == [float(r[0]) for r in rows]
    expected_dense = [[math.log1p(max(int(x), 0)) if x else 0.0 for x in r[1:14]] for r in rows]
    assert torch.allclose(dense, torch.tensor(expected_dense))
    expected_ids = [[int(x, 16) % sizes[t] if x else 0 for t, x in enumerate(r[14:])] for r in rows]
    start = 0
    for b in batches:
        kjt = b.sparse_features
        assert kjt.keys()[0] == "cat_0" and len(kjt.keys()) == 26
        assert torch.equal(kjt.lengths(), torch.ones(26 * b.labels.numel(), dtype=torch.int64))
        for t, jt in enumerate(kjt.to_dict().values()):
            want = [expected_ids[start + i][t] for i in range(b.labels.numel())]
            assert jt.values().tolist() == want
        start += b.labels.numel()


def test_criteo_ranks_read_disjoint_batches(tmp_path: Path) -> None:
    rows = criteo_rows(23, seed=2)
    path = tmp_path / "day.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    whole = torch.cat([b.labels for b in CriteoTsvReader(path, 1, 10)])  # one sample per batch: its label
    dense = [torch.cat([b.dense_features for b in CriteoTsvReader(path, 3, 10, rank=r, world_size=2)]) for r in (0, 1)]
    everything = torch.cat([b.dense_features for b in CriteoTsvReader(path, 1, 10)])
    # Batches of 3 samples, round-robin: rank 0 gets samples 0-2, 6-8, 12-14, 18-20; rank 1 the others.
    # The last round (samples 18-23) is incomplete for rank 1, so both ranks stop after three batches.
    assert dense[0].shape[0] == dense[1].shape[0] == 9
    assert torch.equal(dense[0], everything[[0, 1, 2, 6, 7, 8, 12, 13, 14]])
    assert torch.equal(dense[1], everything[[3, 4, 5, 9, 10, 11, 15, 16, 17]])
    assert whole.numel() == 23
    with pytest.raises(ValueError, match="rank < world_size"):
        CriteoTsvReader(path, 3, 10, rank=2, world_size=2)


def test_criteo_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    row = criteo_rows(1, seed=1)[0]
    bad.write_text("\t".join(row) + "\n" + "\t".join(row[:-1]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2") + ".*40 tab-separated"):
        list(CriteoTsvReader(bad, 4, 10))
    with pytest.raises(ValueError, match="hexadecimal"):
        parse_criteo_line("\t".join(row[:-1] + ["zz"]))
    with pytest.raises(ValueError, match="26 positive ints"):
        CriteoTsvReader(bad, 4, [10] * 3)
    with pytest.raises(ValueError, match="not a file"):
        CriteoTsvReader(tmp_path / "missing.tsv", 4, 10)


def test_hashing_in_range() -> None:
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 1 << 40, (500, 26), generator=g)
    sizes = torch.randint(1, 1000, (26,), generator=g).tolist()
    ids = hash_categorical(raw, sizes)
    assert bool((ids >= 0).all()) and bool((ids < torch.tensor(sizes)).all())
    assert torch.equal(ids, raw % torch.tensor(sizes))
    assert bool((hash_categorical(raw, 17) < 17).all())


# ----------------------------------------------------------------------------- docs


def test_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "docs" / "data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/data.md", "exec"), {})


def test_trace_shorter_than_a_batch_says_so(tmp_path: Path) -> None:
    from torchrec_scratchpipe.data.source import open_source

    path = tmp_path / "short.pt"
    RequestTrace.from_lengths(torch.arange(10), torch.ones(1, 10, dtype=torch.int64)).save(path)
    with pytest.raises(ValueError, match="holds 10 samples, fewer than one batch of 64"):
        open_source(f"trace:{path}", 64)
    with pytest.raises(ValueError, match="for each of 2 ranks"):
        open_source(f"trace:{path}", 8, rank=1, world_size=2)


# ----------------------------------------------------------------------------- bad files, named


def test_criteo_non_utf8_byte_names_file_and_line(tmp_path: Path) -> None:
    row = "\t".join(criteo_rows(1, seed=3)[0]) + "\n"
    path = tmp_path / "day.tsv"
    path.write_bytes(row.encode() + b"1\t\xff" + row.encode()[3:])
    with pytest.raises(ValueError, match=r"day.tsv:2: not UTF-8 text \(byte 0xff at column 3\)"):
        list(CriteoTsvReader(path, 4, 10))


def test_criteo_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "day.tsv.gz"
    rows = criteo_rows(400, seed=4)
    with gzip.open(path, "wt") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"day.tsv.gz: truncated or corrupt gzip data after line \d+"):
        list(CriteoTsvReader(path, 16, 10))


def test_criteo_label_must_be_0_or_1(tmp_path: Path) -> None:
    row = criteo_rows(1, seed=5)[0]
    path = tmp_path / "day.tsv"
    path.write_text("\t".join(["1"] + row[1:]) + "\n" + "\t".join(["2"] + row[1:]) + "\n")
    with pytest.raises(ValueError, match=r"day.tsv:2: the label \(first field\) must be 0 or 1 \(a click\), got '2'"):
        list(CriteoTsvReader(path, 4, 10))


def test_gzipped_trace_is_refused_before_it_fills_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    from torchrec_scratchpipe.data import trace as trace_module

    monkeypatch.setattr(trace_module, "MIN_GZIP_LIMIT", 2**20)
    bomb = tmp_path / "bomb.pt.gz"
    with gzip.open(bomb, "wb") as f:
        for _ in range(32):
            f.write(bytes(2**20))  # 32 MiB of zeros: a few tens of KB on disk
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb.pt.gz: invalid request trace: its gzip data inflates past"):
            read_request_trace(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20, peak  # refused within the limit (a few MB), not after inflating all 32 MiB
    tr = random_trace(2, 6)  # a real gzipped trace still reads
    tr.save(tmp_path / "ok.pt.gz")
    assert read_request_trace(tmp_path / "ok.pt.gz").num_samples == tr.num_samples
