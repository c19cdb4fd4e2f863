"""Cache simulator: every policy against a pure-Python reference, invariants, CLI end to end."""

import json
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_scratchpipe.data.trace import RequestTrace, write_request_trace
from torchrec_scratchpipe.sim import (
    BatchStream, PolicyOptions, SetAssocConfig, SyntheticSpec, cache_set, load_traces, miss_ratio_curve,
    simulate, simulate_scratchpipe, simulate_set_assoc, synthetic_stream,
)
from torchrec_scratchpipe.sim.__main__ import main
from sim_reference import (
    check_scratchpipe, fmix64_set, reference_lru, reference_opt, reference_set_assoc,
)
from torchrec_scratchpipe.sim.report import parse_capacity

FAST = settings(max_examples=60, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def traces(draw, max_rows=40, max_steps=20, max_ids=12):
    """Small skewed id streams: (stream, batches as lists, counts as lists)."""
    n = draw(st.integers(3, max_rows))
    steps = draw(st.integers(1, max_steps))
    hot = draw(st.integers(1, n))
    ids = st.one_of(st.integers(0, hot - 1), st.integers(0, n - 1))
    raw = [draw(st.lists(ids, max_size=max_ids)) for _ in range(steps)]
    s = BatchStream.from_flat([torch.tensor(b, dtype=torch.int64) for b in raw], n)
    return s, [r.tolist() for r in s.rows], [c.tolist() for c in s.counts]


def _cap(batches, extra):
    return max([len(b) for b in batches] + [1]) + extra


@FAST
@given(traces(), st.integers(0, 15))
def test_lru_matches_reference(t, extra):
    s, batches, _ = t
    cap = _cap(batches, extra)
    r = simulate(s, "lru", cap)
    assert (r.misses.tolist(), r.evictions.tolist()) == reference_lru(batches, cap)


@FAST
@given(traces(), st.integers(0, 15))
def test_opt_matches_reference(t, extra):
    s, batches, _ = t
    cap = _cap(batches, extra)
    assert simulate(s, "opt", cap).misses.tolist() == reference_opt(batches, cap)


@settings(max_examples=80, deadline=None)
@given(traces(), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 40), st.sampled_from(["lru", "lfu"]), st.booleans())
def test_set_assoc_matches_reference(t, ways, cap, algorithm, prefetch):
    s, batches, counts = t
    r = simulate_set_assoc(s, cap, SetAssocConfig(ways=ways, algorithm=algorithm, prefetch=prefetch))
    got = (r.misses.tolist(), r.evictions.tolist(), r.bypassed.tolist())
    assert got == reference_set_assoc(batches, cap, ways, algorithm, prefetch, counts)
    assert r.capacity == max(1, cap // ways) * ways


@FAST
@given(traces(), st.integers(0, 12), st.integers(0, 3), st.integers(0, 5))
def test_scratchpipe_matches_reference_window(t, extra, lookahead, more):
    s, batches, _ = t
    cap = _cap(batches, extra)
    r = simulate_scratchpipe(s, cap, lookahead, lookahead + more, log_plans=True)
    plans = [(j, m.tolist(), v.tolist()) for j, m, v in r.extra["plans"]]
    assert r.misses.tolist() == check_scratchpipe(batches, cap, lookahead, lookahead + more, plans)
    assert r.evictions.tolist() == [len(v) for _, _, v in sorted(plans)]


def test_reference_check_catches_wrong_victims():
    """The ScratchPipe check fails when the planner ignores the future (it can fail)."""
    # Rows 0 and 1 are used at step 0; 0 again at step 2. With C=2, step 1 must evict 1.
    s = BatchStream.from_flat([torch.tensor([1, 0]), torch.tensor([2]), torch.tensor([0])], 3)
    batches = [r.tolist() for r in s.rows]
    good = simulate_scratchpipe(s, 2, 0, 2, log_plans=True)
    assert good.total_misses == 3
    check_scratchpipe(batches, 2, 0, 2, [(j, m.tolist(), v.tolist()) for j, m, v in good.extra["plans"]])
    bad = [(0, [0, 1], []), (1, [2], [0]), (2, [0], [1])]  # evicts the row needed next
    with pytest.raises(AssertionError, match="better victim"):
        check_scratchpipe(batches, 2, 0, 2, bad)


def test_hash_matches_unsigned_fmix64():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.arange(100), torch.randint(0, 2**62, (500,), generator=g)])
    for sets in (1, 7, 4096, 81_250):
        assert cache_set(rows, sets).tolist() == [fmix64_set(r, sets) for r in rows.tolist()]


def test_set_assoc_prefetch_locks_previous_batch():
    """One set of 2 ways: with locking, batch 1's rows cannot displace batch 0's."""
    s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1])], 4)
    plain = simulate_set_assoc(s, 2, SetAssocConfig(ways=2))
    locked = simulate_set_assoc(s, 2, SetAssocConfig(ways=2, prefetch=True))
    assert plain.misses.tolist() == [2, 2, 2] and plain.total_bypassed == 0
    assert locked.bypassed.tolist() == [0, 2, 0] and locked.misses.tolist() == [2, 2, 0]


@pytest.fixture(scope="module")
def zipf_stream():
    return synthetic_stream(SyntheticSpec("zipf", 1.05, [2000] * 4, batch_size=128, steps=60, seed=3))


@pytest.fixture(scope="module")
def drift_stream():
    spec = SyntheticSpec("drift", 1.05, [2000] * 4, batch_size=128, steps=60, seed=4,
                         drift_period=5, drift_fraction=0.05)
    return synthetic_stream(spec)


@pytest.mark.parametrize("which", ["zipf_stream", "drift_stream"])
def test_invariants(which, request):
    s = request.getfixturevalue(which)
    cap = int(0.1 * s.num_rows)
    distinct = torch.unique(torch.cat(s.rows)).numel()
    opt = simulate(s, "opt", cap)
    assert opt.total_misses >= distinct  # compulsory misses
    for policy in ("lru", "set_lru", "set_lfu", "set_lru_prefetch", "set_lfu_prefetch"):
        r = simulate(s, policy, cap, PolicyOptions(ways=32))
        assert r.total_misses >= distinct
        if r.total_bypassed == 0:  # every batch stayed resident: Belady bounds it
            assert opt.total_misses <= r.total_misses, policy
    for lookahead, horizon in [(0, 0), (1, 1), (1, 8), (2, 30), (4, 4)]:
        r = simulate(s, "scratchpipe", cap, PolicyOptions(lookahead, horizon))
        assert opt.total_misses <= r.total_misses
    # L = 0 and a horizon past the end: the engine planner *is* Belady.
    assert simulate(s, "scratchpipe", cap, PolicyOptions(0, s.num_steps)).total_misses == opt.total_misses
    far = simulate(s, "scratchpipe", cap, PolicyOptions(1, s.num_steps)).total_misses
    assert far <= 1.15 * opt.total_misses
    lru = simulate(s, "lru", cap).total_misses
    assert far < lru


def test_curves_are_monotone(zipf_stream):
    caps = [400, 800, 1600, 3200, 8000]
    for policy in ("opt", "lru"):
        curve = miss_ratio_curve(zipf_stream, policy, caps)
        assert all(a >= b for a, b in zip(curve.misses, curve.misses[1:])), (policy, curve.misses)
    curve = miss_ratio_curve(zipf_stream, "scratchpipe", [10] + caps, PolicyOptions(1, 8))
    assert curve.misses[0] is None and curve.miss_ratio[0] == 1.0  # a batch exceeds 10 slots


def test_trace_stream_matches_kjt_batches(tmp_path):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (3, 50), generator=g)
    indices = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    path = tmp_path / "t.pt.gz"
    write_request_trace(path, indices, RequestTrace.from_lengths(indices, lengths).offsets, lengths)
    s = load_traces([path, path], batch_size=8, table_sizes=[30, 30, 30])
    trace = RequestTrace.from_lengths(indices, lengths)
    expect = []
    for kjt in trace.batches(8):
        per = kjt.lengths().view(3, -1).sum(1).tolist()
        flat = torch.cat([ids + 30 * t for t, ids in enumerate(torch.split(kjt.values(), per))])
        expect.append(torch.unique(flat, return_counts=True))
    expect = expect + expect
    assert s.num_steps == len(expect) == 14
    for r, c, (er, ec) in zip(s.rows, s.counts, expect):
        assert torch.equal(r, er) and torch.equal(c, ec)


def test_cli_end_to_end(tmp_path, capsys):
    rng = random.Random(0)
    lengths = torch.ones(2, 400, dtype=torch.int64)
    indices = torch.tensor([min(int(rng.paretovariate(1.0)), 199) for _ in range(800)])
    trace = tmp_path / "day.pt"
    write_request_trace(trace, indices, RequestTrace.from_lengths(indices, lengths).offsets, lengths)
    out = tmp_path / "out.json"
    rc = main(["--trace", str(trace), str(trace), "--batch-size", "16", "--capacity", "0.2",
               "--policies", "lru,lfu,set_lru,opt,scratchpipe", "--lookahead", "1", "--horizon", "8",
               "--ways", "4", "--json", str(out), "--mrc", "40,80,120", "--tables", "200,200"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "set_lfu" in printed and "sp L1 H8" in printed
    doc = json.loads(out.read_text())
    assert doc["stream"]["steps"] == 50 and doc["config"]["capacity"] == 80  # 0.2 of 2 tables x 200 rows
    s = load_traces([trace, trace], 16, [200, 200])
    for name, res in doc["policies"].items():
        assert len(res["misses_per_step"]) == 50 and sum(res["misses_per_step"]) == res["misses"]
        direct = simulate(s, name, 80, PolicyOptions(1, 8, ways=4))
        assert res["misses"] == direct.total_misses and res["evictions"] == direct.total_evictions
    p = doc["policies"]
    assert p["opt"]["misses"] <= min(p["lru"]["misses"], p["scratchpipe"]["misses"])
    assert doc["mrc"]["opt"]["capacities"] == [40, 80, 120]


def test_cli_synthetic(tmp_path):
    out = tmp_path / "s.json"
    main(["--synthetic", "drift:1.05,period=3", "--tables", "2x500", "--steps", "12", "--batch-size", "32",
          "--capacity", "10%", "--policies", "opt,scratchpipe", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["config"]["capacity"] == 100 and set(doc["policies"]) == {"opt", "scratchpipe"}


def test_parse_capacity():
    assert parse_capacity("0.05", 2000) == 100
    assert parse_capacity("5%", 2000) == 100
    assert parse_capacity("1.0", 2000) == 2000
    assert parse_capacity("300", 2000) == 300
    with pytest.raises(ValueError):
        parse_capacity("-0.5", 10)


def test_goals_script_smoke(tmp_path):
    from torchrec_scratchpipe.sim.goals import main as goals_main

    out = tmp_path / "goals.json"
    goals_main(["--tables", "2x3000", "--batch-size", "128", "--steps", "12", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 8  # 4 streams x 2 capacities
    for row in doc["rows"]:
        m = row["misses"]
        assert m["opt"] <= min(m["lru"], m["sp_L0_H64"], m["sp_L4_H4"])
        assert set(row["a_sp_over_opt"]) == {"L0", "L1", "L4"} and "set_lru" in row["c_saving_vs_set_lru"]


def test_cli_criteo(tmp_path):
    rng = random.Random(1)
    lines = []
    for _ in range(96):
        cats = [format(min(int(rng.paretovariate(1.2)), 500), "x") for _ in range(26)]
        lines.append("\t".join(["1"] + ["3"] * 13 + cats))
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c.json"
    main(["--criteo", str(path), "--tables", "26x64", "--batch-size", "16", "--capacity", "0.5",
          "--policies", "lru,opt", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["stream"]["steps"] == 6 and doc["stream"]["lookups"] == 96 * 26
    assert doc["policies"]["opt"]["misses"] <= doc["policies"]["lru"]["misses"]


def test_cli_mrc_saves_curves_without_json(tmp_path, monkeypatch, capsys) -> None:
    from torchrec_scratchpipe.defaults import SIM_MRC_OUT as DEFAULT_MRC_OUT

    monkeypatch.chdir(tmp_path)
    assert main(["--synthetic", "zipf:1.05", "--tables", "2x2000", "--steps", "6", "--batch-size", "32",
                     "--capacity", "0.1", "--policies", "lru,scratchpipe", "--mrc", "0.05,0.1", "--no-progress"]) == 0
    doc = json.loads((tmp_path / DEFAULT_MRC_OUT).read_text())
    assert set(doc["mrc"]) == {"lru", "scratchpipe"} and doc["config"]["horizon"] == 64
    assert DEFAULT_MRC_OUT in capsys.readouterr().out


def test_trace_shorter_than_a_batch_says_so(tmp_path, capsys) -> None:
    from torchrec_scratchpipe.sim.sources import load_traces

    path = tmp_path / "short.pt"
    RequestTrace.from_lengths(torch.arange(10), torch.ones(1, 10, dtype=torch.int64)).save(path)
    stream = load_traces([path], batch_size=64)
    assert stream.num_steps == 1
    assert "holds 10 samples, fewer than one batch of 64" in capsys.readouterr().err


def test_goals_report_progress_per_simulation() -> None:
    import io

    from torchrec_scratchpipe.sim.goals import GoalConfig, run_goals, run_keys

    cfg = GoalConfig(table_sizes=[400, 400], batch_size=16, steps=6, capacities=(0.2,), alphas=(1.05,),
                     far_horizon=4, lookaheads_a=(1,), lookaheads_b=(1,), lookahead_c=1)
    log = io.StringIO()
    rows = run_goals(cfg, log)
    assert len(rows) == 2 and set(rows[0]["misses"]) == run_keys(cfg)
    assert "goals" in log.getvalue() and "zipf(1.05)" in log.getvalue()


def test_synthetic_spec_is_a_synthetic_config() -> None:
    """One declaration: the simulator's spec takes every data default from SyntheticConfig."""
    import dataclasses

    from torchrec_scratchpipe.data import SyntheticClickLog, SyntheticConfig

    spec = SyntheticSpec("drift", table_sizes=[300, 200], batch_size=16, steps=4, seed=2)
    plain = SyntheticConfig([300, 200], 16, distribution="drift", seed=2, num_dense=0)
    assert isinstance(spec, SyntheticConfig)
    for f in dataclasses.fields(SyntheticConfig):
        assert getattr(spec, f.name) == getattr(plain, f.name), f.name
    stream = synthetic_stream(spec)
    ids = list(SyntheticClickLog(plain).id_stream(0, 4))
    for step, per_table in enumerate(ids):
        assert torch.equal(stream.rows[step], torch.unique(torch.cat([per_table[0], per_table[1] + 300])))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SyntheticSpec(steps=0)
