"""The engine trains exactly like plain FBGEMM TBE over the full tables."""

from __future__ import annotations

from typing import List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from engine_utils import FullTableReference, make_tables, power_law_stream, train_and_compare, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [997, 300, 61]
STEPS = 200
BATCH = 16
OPTIMIZERS = [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD]


def run_pair(
    dims: List[int], optimizer: EmbOptimType, lookahead: int, horizon: int, capacity: str, background: bool = True
):
    tables = make_tables(ROWS, dims)
    stream = power_law_stream(ROWS, STEPS, BATCH, seed=lookahead * 7 + len(set(dims)))
    if capacity == "window":
        cache_rows = window_capacity(stream, ROWS, lookahead)
    else:  # the largest single batch: the window must shrink
        cache_rows = window_capacity(stream, ROWS, 0)
    cfg = ScratchPipeConfig(
        cache_rows=cache_rows, lookahead=lookahead, horizon=horizon, optimizer=optimizer, learning_rate=0.1,
        background_planning=background,
    )
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    ref = FullTableReference(tables, optimizer, lr=0.1)
    ref.load(emb.table_weights())
    train_and_compare(emb, ref, stream, horizon)  # the batches within the horizon guide victim choice
    return emb, ref, tables


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("lookahead,horizon", [(0, 0), (1, 3), (4, 12)])
@pytest.mark.parametrize("capacity", ["window", "batch"])
@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_matches_full_table_training(
    optimizer: EmbOptimType, lookahead: int, horizon: int, capacity: str, background: bool
) -> None:
    emb, ref, tables = run_pair([8, 8, 8], optimizer, lookahead, horizon, capacity, background)
    stats = emb.stats()["dim8_sum"]
    assert stats["train_misses"] == 0
    assert stats["evictions"] > STEPS  # evicting every step
    if capacity == "batch" and lookahead > 0:
        assert stats["window_stalls"] > 0
    weights = emb.table_weights()
    for name, w in ref.weights().items():
        torch.testing.assert_close(weights[name], w, atol=0, rtol=0)
    states = emb.optimizer_states()
    for name, ref_states in ref.states().items():
        for got, want in zip(states[name].values(), ref_states):
            torch.testing.assert_close(got, want.view(got.shape), atol=0, rtol=0)


@pytest.mark.parametrize("path", ["native", "torch", "device"])
@pytest.mark.parametrize("lookahead,horizon", [(4, 12)])
@pytest.mark.parametrize("capacity", ["window", "batch"])
def test_every_planner_matches(path: str, lookahead: int, horizon: int, capacity: str, monkeypatch) -> None:
    """The C++ planner operator, the PyTorch reference and the device planner (chosen by
    ``SCRATCHPIPE_PLANNER``) all train like the full tables."""
    from torchrec_scratchpipe.core import native

    if path == "native" and not native.available():
        pytest.skip("native planner not built (python -m torchrec_scratchpipe.core.native)")
    monkeypatch.setenv("SCRATCHPIPE_PLANNER", path)
    emb, ref, _ = run_pair([8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, lookahead, horizon, capacity, False)
    assert all(g.planner.kind == path for g in emb.groups.values())
    assert emb.stats()["dim8_sum"]["train_misses"] == 0
    weights, states = emb.table_weights(), emb.optimizer_states()
    for name, w in ref.weights().items():
        torch.testing.assert_close(weights[name], w, atol=0, rtol=0)
        for got, want in zip(states[name].values(), ref.states()[name]):
            torch.testing.assert_close(got, want.view(got.shape), atol=0, rtol=0)


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_device_planner_trains_as_the_host_planner_bit_for_bit(background: bool) -> None:
    """Same plans, so the same moves and the same updates: weights, states and counters equal."""
    stream = power_law_stream(ROWS, 60, BATCH, seed=4)
    cache_rows = window_capacity(stream, ROWS, 0)  # the largest batch: the window stalls
    runs = {}
    for path in ("torch", "device"):
        torch.manual_seed(0)  # the same initial weights
        cfg = ScratchPipeConfig(cache_rows=cache_rows, lookahead=2, horizon=9, optimizer=EmbOptimType.EXACT_ADAGRAD,
                                learning_rate=0.1, background_planning=background, planner=path)
        emb = runs[path] = ScratchPipeEmbeddingBags(make_tables(ROWS, [8, 8, 8]), cfg)
        for k in stream[:10]:
            emb.prefetch(k)
        for i, k in enumerate(stream):
            emb(k).values().square().sum().backward()
            if i + 10 < len(stream):
                emb.prefetch(stream[i + 10])
    host, dev = runs["torch"], runs["device"]
    for name, w in host.table_weights().items():
        assert torch.equal(dev.table_weights()[name], w), name
        for a, b in zip(host.optimizer_states()[name].values(), dev.optimizer_states()[name].values()):
            assert torch.equal(a, b), name
    keep = ("plan_misses", "evictions", "window_stalls", "peak_held_rows", "h2d_rows", "d2h_rows", "unique_rows",
            "lookups", "train_misses", "steps", "h2d_bytes", "d2h_bytes")
    hs, ds = host.stats()["dim8_sum"], dev.stats()["dim8_sum"]
    assert {k: hs[k] for k in keep} == {k: ds[k] for k in keep}
    assert hs["window_stalls"] > 0 and hs["evictions"] > 0


def test_mixed_dims_form_groups_and_match() -> None:
    emb, ref, _ = run_pair([8, 16, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, "window")
    assert set(emb.stats()) == {"dim8_sum", "dim16_sum"}
    weights = emb.table_weights()
    for name, w in ref.weights().items():
        torch.testing.assert_close(weights[name], w, atol=0, rtol=0)


def test_weighted_bags_match() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    tables = make_tables(ROWS, [8, 8, 8])
    g = torch.Generator().manual_seed(5)
    stream = [
        KeyedJaggedTensor(keys=k.keys(), values=k.values(), lengths=k.lengths(),
                          weights=torch.rand(k.values().numel(), generator=g))
        for k in power_law_stream(ROWS, 40, BATCH, seed=11)
    ]
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, 2), lookahead=2,
                            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    ref = FullTableReference(tables, EmbOptimType.EXACT_ROWWISE_ADAGRAD, lr=0.1)
    ref.load(emb.table_weights())
    for k in stream[:3]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        out, expect = emb(k).values(), ref(k)
        torch.testing.assert_close(out, expect, atol=0, rtol=0)
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        expect.backward(grad)
        if i + 3 < len(stream):
            emb.prefetch(stream[i + 3])
    for name, w in ref.weights().items():
        torch.testing.assert_close(emb.table_weights()[name], w, atol=0, rtol=0)
