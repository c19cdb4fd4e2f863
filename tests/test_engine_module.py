"""What a freshly built engine is: a module holding its scratchpads, tables initialized as
TorchRec initializes them, a packed backing store by default, and batches named by token."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import make_tables, power_law_stream
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.scratchpad import Scratchpad

ROWS = [50, 40, 30]


def _engine(**kw: object) -> ScratchPipeEmbeddingBags:
    return ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 8, 8]), ScratchPipeConfig(cache_rows=16, lookahead=1), **kw)


def test_scratchpads_are_submodules() -> None:
    emb = _engine()
    pads = [m for m in emb.modules() if isinstance(m, Scratchpad)]
    assert len(pads) == len(emb.groups) == 2
    assert {id(p) for p in pads} == {id(g.pad) for g in emb.groups.values()}
    assert {p.data_ptr() for p in emb.parameters()} >= {g.pad.weights.data_ptr() for g in emb.groups.values()}


def test_tables_start_with_torchrec_s_default_init_or_their_init_fn() -> None:
    tables = make_tables(ROWS, [4, 8, 8])
    tables[2] = EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=30, feature_names=["f2"],
                                   init_fn=lambda w: torch.nn.init.constant_(w, 0.25))
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=16, lookahead=1))
    weights = emb.table_weights()
    for t in tables[:2]:  # uniform(-sqrt(1/n), sqrt(1/n)), as torchrec's EmbeddingBagConfig default
        w, bound = weights[t.name], math.sqrt(1.0 / t.num_embeddings)
        assert float(w.abs().max()) <= bound and float(w.std()) > bound / 4, t.name
    assert torch.equal(weights["t2"], torch.full((30, 8), 0.25))


def test_the_store_is_packed_unless_asked_otherwise() -> None:
    for kw, packed in (({}, True), ({"packed_store": False}, False)):
        emb = _engine(**kw)
        for g in emb.groups.values():
            assert (g.store.packed is not None) is packed
            strided = packed and bool(g.layout.state_names)  # packed with state: a row-strided view
            assert g.store.weights.is_contiguous() is not strided


def test_a_token_names_the_batch_whatever_object_is_passed() -> None:
    emb = _engine()
    first, second = power_law_stream(ROWS, 2, 2, max_len=2, seed=1)
    token = emb.prefetch(first)
    emb.prefetch(second)
    copy = KeyedJaggedTensor.from_lengths_sync(first.keys(), first.values().clone(), first.lengths().clone())
    with pytest.raises(ValueError, match="not the oldest prefetched"):
        emb.pooled(copy, token + 1)  # the second batch's token: not the head
    out = emb.pooled(copy, token)  # a copy of the head, named by its token, trains the head
    out.sum().backward()
    assert emb.queued() == 1
    with pytest.raises(ValueError, match="not the oldest prefetched"):
        emb.pooled(first)  # the head is now the second batch; the first object no longer names it
