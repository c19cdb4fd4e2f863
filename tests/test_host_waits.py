"""A step reads nothing back from the device (issue 19, finding 4), as far as CPU shows it.

On CUDA, ``KeyedJaggedTensor.length_per_key()`` of a batch that did not come with it copies
lengths to the host and waits for the device; the unpooled forward splits by the counts of
the batch's host copy instead. Here the method is made to raise while forwards run (the
CUDA test of the host running ahead is in ``test_cuda_races.py``).
"""

from __future__ import annotations

from typing import Any, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import FullTableReference
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [50, 30]


def _batch(seed: int) -> KeyedJaggedTensor:
    """A batch as a pipeline hands it over: lengths only, nothing cached on the host."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (2 * 4,), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * 4 : i * 4 + 4].sum()),), generator=g) for i, n in enumerate(ROWS)])
    return KeyedJaggedTensor(keys=["f0", "f1"], values=values, lengths=lengths)


def _no_host_reads(*_: Any) -> Any:
    raise AssertionError("length_per_key()/offset_per_key() read lengths back from the device")


def test_unpooled_forward_splits_by_the_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = [EmbeddingConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"]) for i, n in enumerate(ROWS)]
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=40, lookahead=1, optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.0))
    ref = FullTableReference(tables, EmbOptimType.EXACT_SGD, lr=0.0, pooling_mode=PoolingMode.NONE)
    ref.load(emb.table_weights())
    batches = [_batch(s) for s in range(4)]
    expect: List[Any] = [(ref(b).split(b.length_per_key()), b.lengths().view(2, -1)) for b in [_batch(s) for s in range(4)]]
    monkeypatch.setattr(KeyedJaggedTensor, "length_per_key", _no_host_reads)
    monkeypatch.setattr(KeyedJaggedTensor, "offset_per_key", _no_host_reads)
    emb.prefetch(batches[0])
    emb.prefetch(batches[1])
    outs = [emb(batches[0]), emb(batches[1]), emb(batches[2])]  # two prefetched, one on demand
    with torch.no_grad():
        outs.append(emb(batches[3]))  # a lookup outside the window
    for out, (values, lengths) in zip(outs, expect):
        assert list(out) == ["f0", "f1"]
        for f, v, n in zip(out, values, lengths):
            assert torch.equal(out[f].values(), v) and torch.equal(out[f].lengths(), n)
