"""A learning-rate change reaches every table group of an engine, and training follows it."""

from __future__ import annotations

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from engine_utils import FullTableReference, make_tables, power_law_stream, train_and_compare, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [120, 90, 70]
DIMS = [4, 8, 16]  # three groups


def test_set_learning_rate_mid_training_reaches_every_group() -> None:
    lookahead = 1
    tables = make_tables(ROWS, DIMS)
    stream = power_law_stream(ROWS, 8, 8, seed=9)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead,
                            optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.5, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    assert len(emb.groups) == 3
    ref = FullTableReference(tables, cfg.optimizer, lr=0.5)
    ref.load(emb.table_weights())

    def change(i: int) -> None:
        if i == 2:
            emb.set_learning_rate(0.05)
            ref.set_learning_rate(0.05)
            assert emb.get_learning_rate() == ref.get_learning_rate()  # float32, as FBGEMM keeps it

    train_and_compare(emb, ref, stream, lookahead, on_step=change, seed=3)
    for name, w in ref.weights().items():
        torch.testing.assert_close(emb.table_weights()[name], w, atol=0, rtol=0)
