"""Engine statistics: one owner per table group (GroupStats), the documented keys, consistent counts."""

from __future__ import annotations

from typing import List

import torch

from engine_utils import make_tables, power_law_stream
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [60, 40, 50]
#: The keys docs/user_guide.md §5 documents for each group (cache_stats adds rows, tables, ranks...).
KEYS = {
    "steps", "lookups", "unique_rows", "plan_misses", "train_misses", "evictions", "h2d_rows", "h2d_bytes",
    "d2h_rows", "d2h_bytes", "peak_held_rows", "window_stalls", "planner_s", "mover_s", "planner_background_s",
    "mover_background_s", "blocked_s", "hit_rate", "capacity",
}


def _train(background: bool, lookahead: int = 3, cache_rows: int = 12):
    """Train a stream with two groups, counting the planner's stalls (plans that returned None)."""
    emb = ScratchPipeEmbeddingBags(
        make_tables(ROWS, [4, 4, 8]),
        ScratchPipeConfig(cache_rows=cache_rows, lookahead=lookahead, background_planning=background),
    )
    stalls: List[int] = []
    for name, g in emb.groups.items():
        try_plan = g.planner.try_plan

        def counting(*args, _try=try_plan, _name=name, **kw):
            plan = _try(*args, **kw)
            stalls.append(_name) if plan is None else None
            return plan

        g.planner.try_plan = counting  # type: ignore[method-assign]
    stream = power_law_stream(ROWS, 12, 3, max_len=2)
    for k in stream[:lookahead]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        emb(k).values().sum().backward()
        if i + lookahead < len(stream):
            emb.prefetch(stream[i + lookahead])
    return emb, stalls, stream


def test_stats_keys_and_counts_have_one_source() -> None:
    emb, stalls, stream = _train(background=False)
    stats = emb.stats()
    assert set(stats) == {"dim4_sum", "dim8_sum"}
    for name, s in stats.items():
        g = emb.groups[name]
        assert set(s) == KEYS
        assert s["window_stalls"] == stalls.count(name) == g.window.stalls == g.stats.window_stalls
        assert s["steps"] == len(stream) and s["capacity"] == g.capacity
        assert s["h2d_rows"] == s["plan_misses"] and s["train_misses"] == 0
        assert s["planner_s"] > 0 and s["planner_background_s"] == s["blocked_s"] == 0
        assert 0 <= s["hit_rate"] == 1 - s["plan_misses"] / s["unique_rows"] <= 1
    assert sum(stalls.count(n) for n in stats) > 0, "the stream should make the window stall at least once"
    assert emb.stats() == stats  # reading the stats changes nothing


def test_background_worker_reports_into_each_group() -> None:
    emb, _, _ = _train(background=True)
    stats = emb.stats()
    blocked = {s["blocked_s"] for s in stats.values()}
    assert len(blocked) == 1 and blocked.pop() >= 0  # one worker, an equal share per group
    for s in stats.values():
        assert 0 < s["planner_background_s"] <= s["planner_s"]
        assert 0 <= s["mover_background_s"] <= s["mover_s"]


def test_stats_survive_a_deepcopy() -> None:
    import copy

    emb, _, _ = _train(background=True)
    clone = copy.deepcopy(emb)
    assert clone.stats() == emb.stats()
    clone._worker.on_blocked(1.0)  # the copy's worker reports into the copy's groups
    assert all(clone.stats()[n]["blocked_s"] == emb.stats()[n]["blocked_s"] + 0.5 for n in emb.groups)
    assert torch.equal(clone.groups["dim4_sum"].store.weights, emb.groups["dim4_sum"].store.weights)
