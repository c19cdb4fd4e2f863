"""Batches are checked and split from one host copy of their ids (``core/validate.py``)."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import FullTableReference, make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.validate import check_kjt, host_ids, split_groups

ROWS = [997, 300, 61]


@pytest.mark.parametrize("form", ["lengths", "offsets"])
def test_weighted_groups_out_of_feature_order_match(form: str) -> None:
    """Tables t0 and t2 share a group, t1 is alone: ids, offsets and weights are regrouped."""
    tables = make_tables(ROWS, [8, 16, 8])
    g = torch.Generator().manual_seed(7)
    stream = []
    for k in power_law_stream(ROWS, 30, 16, seed=13):
        w = torch.rand(k.values().numel(), generator=g)
        if form == "lengths":
            stream.append(KeyedJaggedTensor(keys=k.keys(), values=k.values(), lengths=k.lengths(), weights=w))
        else:
            stream.append(KeyedJaggedTensor(keys=k.keys(), values=k.values(), offsets=k.offsets(), weights=w))
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, 1), lookahead=1,
                            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    assert len(emb.groups) == 2 and not emb._identity
    ref = FullTableReference(tables, EmbOptimType.EXACT_ROWWISE_ADAGRAD, lr=0.1)
    ref.load(emb.table_weights())
    emb.prefetch(stream[0], host=host_ids(stream[0]))
    for i, k in enumerate(stream):
        if i + 1 < len(stream):
            emb.prefetch(stream[i + 1], host=host_ids(stream[i + 1]))
        out, expect = emb(k).values(), ref(k)
        torch.testing.assert_close(out, expect, atol=0, rtol=0, msg=f"step {i}")
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        expect.backward(grad)
    for name, w in ref.weights().items():
        torch.testing.assert_close(emb.table_weights()[name], w, atol=0, rtol=0)


def test_split_matches_kjt_permute() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor([5, 1, 2, 7, 3, 4]), torch.tensor([2, 0, 1, 1, 1, 1]),
        weights=torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0]),
    )
    host = host_ids(kjt)
    _, per_feature = check_kjt(host, ["a", "b", "c"], ["ta", "tb", "tc"], torch.tensor([10, 10, 10]))
    parts = split_groups(kjt, host, per_feature, [[0, 2], [1]], torch.device("cpu"))
    expect = kjt.permute([0, 2, 1]).split([2, 1])
    for (ids, offsets, weights), sub in zip(parts, expect):
        assert ids.tolist() == sub.values().tolist()
        assert offsets.tolist() == sub.offsets().tolist()
        assert weights.tolist() == sub.weights().tolist()


def test_errors_come_from_the_host_copy() -> None:
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 12]), offsets=torch.tensor([0, 1, 2, 3, 3]))
    host = host_ids(kjt)
    assert host.lengths is None and host.offsets is not None
    with pytest.raises(ValueError, match=r"id 12 of feature 'b' is out of range for table 'tb' with 10 rows"):
        check_kjt(host, ["a", "b"], ["ta", "tb"], torch.tensor([10, 10]))
    neg = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1]), lengths=torch.tensor([1, 0, 1, -1]))
    with pytest.raises(ValueError, match=r"feature 'b' \(table 'tb'\) has a negative length -1"):
        check_kjt(neg, ["a", "b"], ["ta", "tb"], torch.tensor([10, 10]))
