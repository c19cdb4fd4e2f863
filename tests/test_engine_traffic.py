"""Engine-level traffic: the rows a training engine moves are the simulator's, and look-ahead wins.

On a stream that cycles over more rows than the scratchpad has slots, LRU evicts exactly
the row needed next, while ScratchPipe's FUTURE policy keeps the rows needed soonest.
Training stays exact under any victim choice, so only the traffic counters show a wrong
one: here the engine's ``plan_misses``, ``evictions`` and rows moved each way must equal
the simulator's for the same stream, the simulator's victims must pass the independent
reference check (``sim_reference.check_scratchpipe``: no better victim was skipped), and
FUTURE must move fewer rows than LRU. Both planner paths run (native operator and PyTorch).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import make_tables
from sim_reference import check_scratchpipe
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.sim import BatchStream, simulate_scratchpipe

SLOTS = 16
LOOKAHEAD, HORIZON = 1, 12
STEPS = 40
#: Per table: (rows per batch, batches per cycle). Both cycles cover more rows than SLOTS.
CYCLES = [(3, 8), (2, 10)]  # 24 and 20 rows: H - L sees a whole cycle, so every candidate has a next use


def _cyclic_rows(step: int) -> List[torch.Tensor]:
    """Each table's distinct ids at ``step`` (ascending: the order the engine plans them)."""
    return [torch.arange(per, dtype=torch.int64) + per * (step % batches) for per, batches in CYCLES]


def _stream() -> List[KeyedJaggedTensor]:
    """Two samples per feature; the ids of a feature are split between them (one bag may repeat none)."""
    out = []
    for step in range(STEPS):
        ids = _cyclic_rows(step)
        lengths = torch.tensor([n for t in ids for n in (t.numel() - 1, 1)])
        out.append(KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.cat(ids), lengths))
    return out


def _train(policy: str) -> Dict[str, Dict[str, float]]:
    """Train the engine on the cyclic stream, prefetching H + 1 ahead (a pipeline's loop)."""
    tables = make_tables([sum(p * b for p, b in CYCLES) + 5] * 2, [4, 8])  # two groups (dims 4, 8)
    cfg = ScratchPipeConfig(cache_rows=SLOTS, lookahead=LOOKAHEAD, horizon=HORIZON, victim_policy=policy,
                            optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.1, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    stream = _stream()
    for k in stream[: HORIZON + 1]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        emb(k).values().sum().backward()
        if i + HORIZON + 1 < len(stream):
            emb.prefetch(stream[i + HORIZON + 1])
    stats = emb.stats()
    for name, g in emb.groups.items():  # bytes moved: whole packed rows (weights and optimizer state)
        s = stats[name]
        assert (s["h2d_bytes"], s["d2h_bytes"]) == (s["h2d_rows"] * g.layout.bytes_per_row, s["d2h_rows"] * g.layout.bytes_per_row)
    return stats


def _simulated(table: int, policy: str, num_rows: int) -> Tuple[int, int, BatchStream]:
    stream = BatchStream.from_flat([_cyclic_rows(s)[table] for s in range(STEPS)], num_rows)
    r = simulate_scratchpipe(stream, SLOTS, LOOKAHEAD, HORIZON, victim_policy=policy, log_plans=True)
    if policy == "future":  # the victims are the best ones, checked by the independent reference
        plans = [(j, m.tolist(), v.tolist()) for j, m, v in r.extra["plans"]]
        batches = [b.tolist() for b in stream.rows]
        assert r.misses.tolist() == check_scratchpipe(batches, SLOTS, LOOKAHEAD, HORIZON, plans)
    return r.total_misses, int(r.evictions.sum()), stream


@pytest.mark.parametrize("path", ["native", "reference"])
def test_engine_moves_what_the_simulator_counts_and_less_than_lru(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrec_scratchpipe.core import native

    if path == "native" and not native.available():
        pytest.skip("native planner not built (python -m torchrec_scratchpipe.core.native)")
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", "1" if path == "native" else "0")
    got = {policy: _train(policy) for policy in ("future", "lru")}
    for table, group in enumerate(["dim4_sum", "dim8_sum"]):
        num_rows = sum(p * b for p, b in CYCLES) + 5
        for policy in ("future", "lru"):
            s = got[policy][group]
            misses, evictions, stream = _simulated(table, policy, num_rows)
            assert s["train_misses"] == 0, (group, policy)
            assert s["unique_rows"] == int(stream.unique_per_step().sum()), (group, policy)
            assert (s["plan_misses"], s["evictions"]) == (misses, evictions), (group, policy)
            assert (s["h2d_rows"], s["d2h_rows"]) == (misses, evictions), (group, policy)  # rows moved each way
        future, lru = got["future"][group], got["lru"][group]
        assert lru["plan_misses"] == int(_simulated(table, "lru", num_rows)[2].unique_per_step().sum())  # LRU: all miss
        assert future["plan_misses"] < lru["plan_misses"] and future["h2d_rows"] < lru["h2d_rows"], group
        assert future["d2h_rows"] < lru["d2h_rows"], group

