"""Capacity advisor: window working sets, load-factor search, CacheStatistics, CLI."""

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams, CacheStatistics

from torchrec_scratchpipe.advise import (
    MeasuredCacheStatistics, Target, advise_table, constraints_text, load_factor_for, window_distinct, working_set,
)
from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.advise.__main__ import main
from torchrec_scratchpipe.advise.stalls import stall_advice
from torchrec_scratchpipe.data.trace import RequestTrace, write_request_trace
from torchrec_scratchpipe.sim import BatchStream, SyntheticSpec, simulate_scratchpipe, synthetic_stream


pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 5), st.data())
def test_window_distinct_matches_brute_force(tables, steps, lookahead, data):
    sizes = [data.draw(st.integers(1, 15)) for _ in range(tables)]
    ids = [[torch.tensor(data.draw(st.lists(st.integers(0, n - 1), max_size=6)), dtype=torch.int64) for n in sizes]
           for _ in range(steps)]
    s = BatchStream.from_table_ids(ids, sizes)
    got = window_distinct(s, lookahead)
    windows = max(1, steps - lookahead)
    assert got.shape == (tables, windows)
    for t in range(tables):
        for w in range(windows):
            union = set()
            for k in range(w, min(w + lookahead + 1, steps)):
                union |= set(ids[k][t].tolist())
            assert got[t, w] == len(union)
    ws = working_set(s, lookahead)
    assert ws.group == int(got.sum(0).max()) and ws.per_table == got.max(1).values.tolist()


@given(st.integers(1, 10**7), st.integers(1, 10**7))
def test_load_factor_rounds_up(capacity, rows):
    capacity = min(capacity, rows)
    lf = load_factor_for(capacity, rows)
    assert math.ceil(lf * rows) >= capacity and lf <= 1.0 and lf - capacity / rows < 1e-5


def _cyclic(n_hot=30, steps=60, rows=200):
    """Each batch: 3 rows of a 30-row cycle plus one never-reused row: a clean, monotone curve."""
    batches = [torch.tensor([(3 * i + k) % n_hot for k in range(3)] + [n_hot + i]) for i in range(steps)]
    return BatchStream.from_flat(batches, rows)


def test_advise_table_meets_target_with_few_slots():
    s = _cyclic()
    target = Target("rows_per_step", 2.0)
    a = advise_table(s, target, lookahead=2, horizon=8, warmup=15)
    assert a.reached and a.min_scratchpad == 12 and a.max_batch == 4
    assert a.capacity >= a.min_scratchpad and math.ceil(a.load_factor * 200) >= a.capacity
    r = simulate_scratchpipe(s, a.capacity, 2, 8)
    assert r.misses_after(15) / 45 == pytest.approx(a.rows_per_step) and a.rows_per_step <= 2.0
    smaller = a.capacity - max(1, int(0.02 * a.capacity))
    if smaller >= a.min_scratchpad:
        assert simulate_scratchpipe(s, smaller, 2, 8).misses_after(15) / 45 > 2.0


def test_advise_table_unreachable_target():
    a = advise_table(_cyclic(), Target("miss_ratio", 0.1), lookahead=1, horizon=4, warmup=15)
    assert not a.reached and a.capacity == 200 and a.load_factor == 1.0
    assert a.miss_ratio == pytest.approx(0.25)  # one never-reused row in four


def test_cache_statistics_contract():
    stats = MeasuredCacheStatistics.from_curve(advise_table(_cyclic(), Target("miss_ratio", 0.5), 1, 4, 15).curve, 4.0)
    assert isinstance(stats, CacheStatistics)
    assert stats.expected_miss_rate(0.0) == 1.0 and stats.expected_miss_rate(1.0) == 0.0
    grid = [i / 50 for i in range(51)]
    rates = [stats.expected_miss_rate(x) for x in grid]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert 0.0 < stats.cacheability < 1.0 and stats.expected_lookups == 4.0
    assert CacheParams(load_factor=0.1, stats=stats).stats is stats
    with pytest.raises(ValueError):
        MeasuredCacheStatistics([0.1], [0.2, 0.3], 1.0)


def test_constraints_text_is_valid_python():
    s = synthetic_stream(SyntheticSpec("zipf", 1.05, [3000, 500], batch_size=64, steps=24))
    s.table_names = ["t_user", "t_item"]
    advice = [advise_table(s.table(t), Target("miss_ratio", 0.5), 1, 4, 6, points=5) for t in range(2)]
    scope: dict = {}
    exec(constraints_text(advice, 1, 4), scope)
    cons = scope["constraints"]
    assert set(cons) == {"t_user", "t_item"}
    for a in advice:
        c = cons[a.name]
        assert isinstance(c, ParameterConstraints) and c.compute_kernels == ["scratchpipe"]
        assert c.cache_params.load_factor == a.load_factor


def test_cli_synthetic(tmp_path, capsys):
    out = tmp_path / "advice.json"
    rc = main(["--synthetic", "zipf:1.05", "--tables", "2x2000", "--steps", "24", "--batch-size", "64",
               "--lookahead", "2", "--target-miss-ratio", "0.4", "--points", "6", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "constraints = {" in text and "'f1': ParameterConstraints" in text
    doc = json.loads(out.read_text())
    assert doc["horizon"] == defaults.horizon_for(2) == 64 and doc["warmup"] == 6 and len(doc["tables"]) == 2
    for t in doc["tables"]:
        assert t["min_scratchpad"] <= t["capacity"] <= t["num_rows"]
        assert (t["miss_ratio"] <= 0.4) == t["reached"]
        assert 0.0 < t["cacheability"] < 1.0


def test_cli_trace(tmp_path, capsys):
    lengths = torch.ones(2, 600, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    indices = (torch.rand(1200, generator=g) ** 3 * 300).long()
    path = tmp_path / "t.pt.gz"
    write_request_trace(path, indices, RequestTrace.from_lengths(indices, lengths).offsets, lengths)
    main(["--trace", str(path), "--batch-size", "20", "--lookahead", "1", "--horizon", "4",
          "--target-rows-per-step", "5", "--table-names", "a,b", "--points", "5"])
    text = capsys.readouterr().out
    assert "'a': ParameterConstraints" in text and "'b': ParameterConstraints" in text


def test_stall_advice_measures_the_cost_with_the_engine_planner() -> None:
    # Batches of 6 rows overlapping by 3: an L+1 window of 4 batches needs 15 rows, of 3 needs 12.
    stream = BatchStream.from_flat([torch.arange(i, i + 6) for i in range(0, 60, 3)], 100)
    a = stall_advice(stream, capacity=12, lookahead=3, horizon=3, stalls=5)
    assert (a.window_rows, a.suggested_lookahead, a.load_factor_needed) == (15, 2, 0.15)
    at_3 = simulate_scratchpipe(stream, 12, 3, 3).total_misses
    at_2 = simulate_scratchpipe(stream, 12, 2, 3).total_misses
    assert a.extra_rows == at_3 - at_2
    note = a.note("t")
    assert "stalled 5 times" in note and "use lookahead 2 or load_factor >= 0.15" in note and "\n" not in note
    fits = stall_advice(stream, capacity=20, lookahead=3, horizon=3, stalls=0)
    assert fits.suggested_lookahead == 3 and fits.extra_rows == 0
