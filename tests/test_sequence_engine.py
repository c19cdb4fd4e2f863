"""Unpooled (sequence) tables: the engine with PoolingMode.NONE trains exactly like
full-table FBGEMM TBE with PoolingMode.NONE."""

from __future__ import annotations

from typing import List, Sequence

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import FullTableReference, power_law_stream, train_and_compare, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import CapacityError

ROWS = [997, 300, 61]
DIM = 8
STEPS = 120
BATCH = 16


def _tables(rows: Sequence[int] = ROWS, dim: int = DIM) -> List[EmbeddingConfig]:
    return [
        EmbeddingConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(rows)
    ]


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD], ids=lambda o: o.name)
@pytest.mark.parametrize("lookahead,horizon,capacity", [(0, 0, "batch"), (2, 5, "window"), (3, 6, "batch")])
def test_unpooled_matches_full_table_tbe(optimizer: EmbOptimType, lookahead: int, horizon: int, capacity: str) -> None:
    tables = _tables()
    stream = power_law_stream(ROWS, STEPS, BATCH, max_len=10, seed=lookahead)
    cache_rows = window_capacity(stream, ROWS, lookahead if capacity == "window" else 0)
    cfg = ScratchPipeConfig(cache_rows=cache_rows, lookahead=lookahead, horizon=horizon, optimizer=optimizer, learning_rate=0.1)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    assert emb.unpooled and list(emb.groups) == ["dim8_none"]
    ref = FullTableReference(tables, optimizer, lr=0.1, pooling_mode=PoolingMode.NONE)
    ref.load(emb.table_weights())

    def forward(k: KeyedJaggedTensor) -> torch.Tensor:
        out = emb.embeddings(k)
        assert out.shape == (k.values().numel(), DIM)
        return out

    train_and_compare(emb, ref, stream, horizon, forward)  # the batches within the horizon guide victim choice
    stats = emb.stats()["dim8_none"]
    assert stats["train_misses"] == 0 and stats["evictions"] > 0, stats
    ref_w, ref_s = ref.weights(), ref.states()
    for name, w in emb.table_weights().items():
        torch.testing.assert_close(w, ref_w[name], atol=0, rtol=0)
    for name, states in emb.optimizer_states().items():
        for got, want in zip(states.values(), ref_s[name]):
            torch.testing.assert_close(got.view(-1), want.view(-1), atol=0, rtol=0)


def test_forward_returns_jagged_tensors_per_feature() -> None:
    tables = _tables()
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=64, learning_rate=0.0))
    ref = FullTableReference(tables, EmbOptimType.EXACT_SGD, lr=0.0, pooling_mode=PoolingMode.NONE)
    ref.load(emb.table_weights())
    (k,) = power_law_stream(ROWS, 1, 4, max_len=5, seed=3)
    out = emb(k)
    expect = ref(k).split(k.length_per_key())
    assert list(out) == ["f0", "f1", "f2"]
    for f, e in zip(out, expect):
        assert torch.equal(out[f].lengths(), k[f].lengths())
        torch.testing.assert_close(out[f].values(), e)


def test_unpooled_errors() -> None:
    mixed = _tables()[:1] + [EmbeddingBagConfig(name="bag", embedding_dim=DIM, num_embeddings=10, feature_names=["b"])]
    with pytest.raises(ValueError, match="mix pooled and unpooled"):
        ScratchPipeEmbeddingBags(mixed, ScratchPipeConfig(cache_rows=8))
    with pytest.raises(ValueError, match=r"dims \[8, 16\].*must share embedding_dim"):
        ScratchPipeEmbeddingBags(_tables()[:1] + _tables([50], 16)[:1], ScratchPipeConfig(cache_rows=8))
    pooled = ScratchPipeEmbeddingBags([mixed[1]], ScratchPipeConfig(cache_rows=8))
    with pytest.raises(ValueError, match="for unpooled"):
        pooled.embeddings(KeyedJaggedTensor.from_lengths_sync(["b"], torch.tensor([1]), torch.tensor([1])))
    emb = ScratchPipeEmbeddingBags(_tables([100]), ScratchPipeConfig(cache_rows=8))
    before = emb.table_weights()["t0"].clone()
    bad = KeyedJaggedTensor.from_lengths_sync(["f0"], torch.tensor([3, 100]), torch.tensor([2]))
    with pytest.raises(ValueError, match="id 100 of feature 'f0' is out of range"):
        emb.embeddings(bad)
    many = KeyedJaggedTensor.from_lengths_sync(["f0"], torch.arange(20), torch.tensor([20]))
    with pytest.raises(CapacityError, match="20 distinct rows but the scratchpad has 8 slots"):
        emb.embeddings(many)
    assert torch.equal(emb.table_weights()["t0"], before)
    assert sum(emb.stats()["dim8_none"][k] for k in ("steps", "lookups")) == 0


@pytest.mark.parametrize("lookahead", [0, 2])
def test_two_forwards_then_one_backward_train_like_full_table_tbe(lookahead: int) -> None:
    """Gradient accumulation over two unpooled batches: both outputs read the rows as they
    were before the (one) backward, which then applies both batches' updates, as full TBE does."""
    tables = _tables()
    stream = power_law_stream(ROWS, 40, BATCH, max_len=10, seed=7)
    # Room for the two batches of one step only: every slot is needed and rows keep moving.
    cache_rows = window_capacity(stream, ROWS, 1)
    opt = EmbOptimType.EXACT_ROWWISE_ADAGRAD
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=cache_rows, lookahead=lookahead, optimizer=opt, learning_rate=0.1))
    assert emb.groups["dim8_none"].capacity < sum(ROWS) // 2
    ref = FullTableReference(tables, opt, lr=0.1, pooling_mode=PoolingMode.NONE)
    ref.load(emb.table_weights())
    g = torch.Generator().manual_seed(2)
    for k in stream[: lookahead + 1]:
        emb.prefetch(k)
    for start in range(0, len(stream), 2):
        outs, expects = [], []
        for i in (start, start + 1):
            outs.append(emb.embeddings(stream[i]))
            expects.append(ref(stream[i]))
            torch.testing.assert_close(outs[-1], expects[-1], atol=0, rtol=0, msg=f"step {i}")
            if i + lookahead + 1 < len(stream):
                emb.prefetch(stream[i + lookahead + 1])
        grads = [torch.randn(o.shape, generator=g) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, grads)).backward()
        sum((e * w).sum() for e, w in zip(expects, grads)).backward()
    assert emb.stats()["dim8_none"]["evictions"] > 0
    ref_w, ref_s = ref.weights(), ref.states()
    for name, w in emb.table_weights().items():
        torch.testing.assert_close(w, ref_w[name], atol=0, rtol=0)
    for name, states in emb.optimizer_states().items():
        torch.testing.assert_close(states["momentum1"].view(-1), ref_s[name][0].view(-1), atol=0, rtol=0)
