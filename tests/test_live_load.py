"""A live load of new values into an engine with several table groups refreshes every group.

Between two training steps, with batches prefetched and their rows already moved into the
scratchpads, new weights and optimizer states (different from what the store holds) are
loaded. Right after the load every group's resident slots must hold the loaded rows, and
training then goes on exactly like the full tables loaded with the same values.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from engine_utils import FullTableReference, make_tables, power_law_stream, train_and_compare, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.mover import Mover, staging_rings

ROWS = [200, 150, 120, 90]
DIMS = [8, 16, 8, 4]  # three groups: dim8 (t0, t2), dim16 (t1), dim4 (t3)
LOAD_AT = 7


def _new_values(emb: ScratchPipeEmbeddingBags, seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """Weights and optimizer states unlike anything the engine holds (fresh random draws)."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.rand(w.shape, generator=g) - 0.5 for n, w in emb.table_weights().items()}
    states = {n: {k: torch.rand(s.shape, generator=g) + 0.5 for k, s in per.items()} for n, per in emb.optimizer_states().items()}
    return weights, states


def _assert_resident_slots_hold_the_store(emb: ScratchPipeEmbeddingBags) -> None:
    for name, g in emb.groups.items():
        rows, slots = g.resident()
        assert rows.numel() > 0, f"group {name} has no resident rows: the load would test nothing"
        assert torch.equal(g.pad.weights.detach()[slots], g.store.weights[rows]), f"group {name}: stale weights in slots"
        for state, tensor in g.pad.states.items():
            assert torch.equal(tensor.detach()[slots], g.store.states[state][rows]), f"group {name}: stale {state}"


@pytest.mark.parametrize("staged", [False, True])
def test_live_load_refreshes_every_group(staged: bool) -> None:
    """``staged``: rows move through a small ring of staging buffers (the CUDA path, run on CPU)."""
    lookahead, horizon = 2, 4
    tables = make_tables(ROWS, DIMS)
    stream = power_law_stream(ROWS, 16, 8, seed=3)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead, horizon=horizon,
                            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    assert len(emb.groups) == 3
    if staged:
        for g in emb.groups.values():
            g.mover = Mover(g.store, g.pad, g.stats, rings=staging_rings(g.store, g.capacity, pin=False, buffers=2, buffer_bytes=1 << 10))
    ref = FullTableReference(tables, cfg.optimizer, lr=0.1)
    ref.load(emb.table_weights())
    loaded = {}

    def load(i: int) -> None:
        if i != LOAD_AT:
            return
        assert all(len(g.window.planned) > 0 for g in emb.groups.values())  # rows already moved in ahead
        weights, states = _new_values(emb, seed=11)
        emb.load_table_weights(weights)
        emb.load_optimizer_states(states)
        _assert_resident_slots_hold_the_store(emb)
        got_w, got_s = emb.table_weights(), emb.optimizer_states()
        for name in weights:  # the store holds the loaded values, not the trained ones
            assert torch.equal(got_w[name], weights[name]), name
            for k in states[name]:
                assert torch.equal(got_s[name][k], states[name][k]), (name, k)
        ref.load(weights)
        ref.load_states(states)
        loaded["done"] = True

    train_and_compare(emb, ref, stream, horizon, on_step=load, seed=4)
    assert loaded
    emb.flush()  # trained since the load: the slots are newer than the store until flushed
    _assert_resident_slots_hold_the_store(emb)
    for name, w in ref.weights().items():
        torch.testing.assert_close(emb.table_weights()[name], w, atol=0, rtol=0)


def test_writes_into_the_store_after_purge_reach_the_next_forward() -> None:
    """``purge()`` alone makes the store the truth: values written into the store views
    after it are what the next forward reads, in every group, with no ``reload()``."""
    lookahead = 1
    tables = make_tables(ROWS, DIMS)
    stream = power_law_stream(ROWS, 8, 8, seed=5)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead,
                            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    ref = FullTableReference(tables, cfg.optimizer, lr=0.1)
    ref.load(emb.table_weights())
    views = emb.table_weights()  # views on the store, taken before the purge

    def write_after_purge(i: int) -> None:
        if i == 3:
            weights, _ = _new_values(emb, seed=12)  # made first: reading the engine's tables applies the purge
            emb.purge()
            for name, w in weights.items():
                views[name].copy_(w)
            ref.load(weights)

    train_and_compare(emb, ref, stream, lookahead, on_step=write_after_purge, seed=6)
