"""Victim policies: the enum and its strategies, in the planner, the engine config and the simulator."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_scratchpipe import PlanWindow, ScratchPipeConfig, SlotPlanner
from torchrec_scratchpipe.core.policy import VictimPolicy
from torchrec_scratchpipe.sim import BatchStream, PolicyOptions, simulate
from torchrec_scratchpipe.sim.__main__ import main
from torchrec_scratchpipe.sim.lru import simulate_lru


def test_enum_accepts_the_old_strings() -> None:
    assert VictimPolicy.parse("future") is VictimPolicy.FUTURE and VictimPolicy.parse("lru") is VictimPolicy.LRU
    assert VictimPolicy.FUTURE == "future" and str(VictimPolicy.LRU) == "lru"
    cfg = ScratchPipeConfig(cache_rows=8, victim_policy="lru")
    assert cfg.victim_policy is VictimPolicy.LRU
    assert SlotPlanner(10, 2, "future").policy is VictimPolicy.FUTURE
    assert PolicyOptions(victim_policy="lru").victim_policy is VictimPolicy.LRU


@pytest.mark.parametrize(
    "make",
    [
        lambda: VictimPolicy.parse("mru"),
        lambda: ScratchPipeConfig(cache_rows=8, victim_policy="mru"),
        lambda: SlotPlanner(10, 2, "mru"),
        lambda: PolicyOptions(victim_policy="mru"),
    ],
)
def test_bad_policy_names_the_choices(make) -> None:
    with pytest.raises(ValueError, match=r"must be one of 'future', 'lru', got 'mru'"):
        make()


def test_cli_refuses_an_unknown_policy(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--synthetic", "zipf:1.05", "--tables", "1x50", "--capacity", "10", "--victim-policy", "mru"])
    assert "invalid choice: 'mru'" in capsys.readouterr().err


@pytest.mark.parametrize("policy, tracks", [("future", True), ("lru", False)])
def test_strategy_decides_whether_next_uses_are_tracked(policy: str, tracks: bool) -> None:
    assert VictimPolicy.parse(policy).strategy.ranks_by_next_use is tracks
    window = PlanWindow(SlotPlanner(20, 4, policy), lookahead=1, horizon=3)
    for rows in ([1, 2], [3], [1]):
        window.push(torch.tensor(rows), fill=False)
    assert bool((window.next_use.next != torch.iinfo(torch.int32).max).any()) is tracks


def cyclic(rows: int, steps: int) -> BatchStream:
    """Batches 0, 1, 2, ... of one row each, cycling over ``rows`` rows: LRU's worst case."""
    return BatchStream.from_flat([torch.tensor([i % rows]) for i in range(steps)], rows)


def test_future_beats_lru_on_a_cycle() -> None:
    s = cyclic(rows=5, steps=40)
    lru = simulate(s, "scratchpipe", 4, PolicyOptions(0, 8, victim_policy="lru"))
    future = simulate(s, "scratchpipe", 4, PolicyOptions(0, 8, victim_policy="future"))
    assert lru.total_misses == 40  # the row needed next was always the one evicted
    assert future.total_misses < lru.total_misses
    assert future.total_misses == simulate(s, "opt", 4).total_misses  # H covers the cycle: Belady
    assert lru.extra["victim_policy"] == "lru" and future.extra["victim_policy"] == "future"


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, 29), min_size=1, max_size=8), min_size=1, max_size=25),
    extra=st.integers(0, 10),
    horizon=st.integers(0, 6),
)
def test_lru_policy_is_exact_lru(batches, extra: int, horizon: int) -> None:
    """At L = 0 the planner holds only the batch in hand; under LRU the horizon changes nothing,
    and victims are those of the fully associative LRU (same tie-break: the batch's row order)."""
    s = BatchStream.from_flat([torch.tensor(b) for b in batches], 30)
    cap = int(s.unique_per_step().max()) + extra
    ref = simulate_lru(s, cap)
    got = simulate(s, "scratchpipe", cap, PolicyOptions(0, horizon, victim_policy="lru"))
    assert torch.equal(got.misses, ref.misses) and torch.equal(got.evictions, ref.evictions)
    # FUTURE without a horizon has no next uses to rank by: the same as LRU
    assert torch.equal(simulate(s, "scratchpipe", cap, PolicyOptions(0, 0)).misses, ref.misses)
    future = simulate(s, "scratchpipe", cap, PolicyOptions(0, len(batches)))  # sees every batch
    assert future.total_misses <= ref.total_misses


def test_cli_runs_the_chosen_policy(tmp_path) -> None:
    out = tmp_path / "s.json"
    args = ["--synthetic", "zipf:1.05", "--tables", "2x200", "--steps", "30", "--batch-size", "16",
            "--capacity", "0.2", "--policies", "scratchpipe", "--lookahead", "1", "--horizon", "8"]
    main(args + ["--victim-policy", "lru", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["config"]["victim_policy"] == "lru"
    main(args + ["--json", str(tmp_path / "f.json")])
    default = json.loads((tmp_path / "f.json").read_text())
    assert default["config"]["victim_policy"] == "future"
    assert default["policies"]["scratchpipe"]["misses"] < doc["policies"]["scratchpipe"]["misses"]
