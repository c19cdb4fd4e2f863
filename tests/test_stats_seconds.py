"""The engine's time counters are durations spent within the run they describe.

``planner_s``, ``mover_s`` and their background parts, and ``blocked_s``, add up time
intervals: each is at least 0 and, summed over the groups, no more than the wall time of
the training loop that produced them (planning inline runs on the training thread, so
planning and moving together fit in it too).
"""

from __future__ import annotations

import time

import pytest

from engine_utils import make_tables, power_law_stream
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [60, 40, 50]
SECONDS = ("planner_s", "mover_s", "planner_background_s", "mover_background_s", "blocked_s")


@pytest.mark.parametrize("background", [False, True])
def test_time_counters_are_durations_within_the_run(background: bool) -> None:
    lookahead = 2
    t0 = time.perf_counter()
    emb = ScratchPipeEmbeddingBags(
        make_tables(ROWS, [4, 4, 8]),
        ScratchPipeConfig(cache_rows=12, lookahead=lookahead, background_planning=background),
    )
    stream = power_law_stream(ROWS, 10, 3, max_len=2)
    for k in stream[: lookahead + 1]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        emb(k).values().sum().backward()
        if i + lookahead + 1 < len(stream):
            emb.prefetch(stream[i + lookahead + 1])
    stats = emb.stats()
    elapsed = time.perf_counter() - t0
    for name, s in stats.items():
        assert s["planner_s"] > 0 and s["mover_s"] > 0, name
        for key in SECONDS:
            assert 0 <= s[key] <= elapsed, (name, key, s[key], elapsed)
        assert s["planner_background_s"] <= s["planner_s"] and s["mover_background_s"] <= s["mover_s"], name
    for key in SECONDS:
        assert sum(s[key] for s in stats.values()) <= elapsed, key
    if not background:  # one thread did it all
        assert sum(s["planner_s"] + s["mover_s"] for s in stats.values()) <= elapsed
        assert all(s["planner_background_s"] == s["mover_background_s"] == s["blocked_s"] == 0 for s in stats.values())


def test_a_batch_s_checking_time_is_shared_out_once_among_the_groups() -> None:
    """``prepare`` (checks, de-duplication) is timed once per batch and each of the three
    groups gets a share: what the groups' ``planner_s`` gain from queueing a batch lies
    between that time and the wall time of ``prepare`` plus ``enqueue``."""
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 8, 12]), ScratchPipeConfig(cache_rows=12, lookahead=1))
    assert len(emb.groups) == 3
    for k in power_law_stream(ROWS, 4, 3, max_len=2):
        before = sum(g.stats.planner_s for g in emb.groups.values())
        t0 = time.perf_counter()
        batch = emb.prepare(k)
        emb.enqueue(batch)
        wall = time.perf_counter() - t0
        gained = sum(g.stats.planner_s for g in emb.groups.values()) - before
        assert batch.seconds * (1 - 1e-9) <= gained <= wall, (batch.seconds, gained, wall)
