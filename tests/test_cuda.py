"""CUDA paths: side-stream mover, DEVICE scratchpad, Adam. Skipped without CUDA."""

from __future__ import annotations

from typing import List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

from engine_utils import make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROWS = [997, 300, 61]


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_SGD, EmbOptimType.ADAM],
                         ids=lambda o: o.name)
@pytest.mark.parametrize("lookahead", [0, 3])
def test_cuda_engine_matches_full_table(optimizer: EmbOptimType, lookahead: int) -> None:
    dev = torch.device("cuda")
    tables = make_tables(ROWS, [8, 8, 8])
    stream = power_law_stream(ROWS, 120, 16, seed=3)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead,
                            horizon=lookahead + 4, optimizer=optimizer, learning_rate=0.05)
    emb = ScratchPipeEmbeddingBags(tables, cfg, device=dev)
    spec = [(n, 8, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for n in ROWS]
    ref = SplitTableBatchedEmbeddingBagsCodegen(spec, optimizer=optimizer, learning_rate=0.05, device=dev)
    init = emb.table_weights()
    for i, w in enumerate(ref.split_embedding_weights()):
        w.copy_(init[f"t{i}"])
    g = torch.Generator().manual_seed(0)
    for k in stream[: lookahead + 1]:
        emb.prefetch(k.to(dev))
    batches: List = [k.to(dev) for k in stream]
    for i, k in enumerate(batches):
        out = emb(k).values()
        expect = ref(k.values(), k.offsets())
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        grad = torch.randn(out.shape, generator=g).to(dev)
        out.backward(grad)
        expect.backward(grad)
        if i + lookahead + 1 < len(batches):
            emb.prefetch(batches[i + lookahead + 1])
    assert emb.stats()["dim8_sum"]["train_misses"] == 0
    weights = emb.table_weights()
    for i, w in enumerate(ref.split_embedding_weights()):
        torch.testing.assert_close(weights[f"t{i}"], w.cpu(), atol=1e-5, rtol=1e-5)
