"""Shared helpers for the sequence (EmbeddingCollection) tests: tables and batches."""

from __future__ import annotations

from typing import Any, List

import torch

BATCH = 8
MAX_LEN = 5
DIM = 8
#: (table, rows, features): s_big is read by two features; s_small stays on `fused`.
SPEC = [("s_big", 2000, ["f_item", "f_hist"]), ("s_mid", 1000, ["f_mid"]), ("s_small", 100, ["f_small"])]
SP_TABLES = ("s_big", "s_mid")
KEYS = [f for _, _, feats in SPEC for f in feats]


def seq_tables() -> List[Any]:
    from torchrec import EmbeddingConfig

    return [EmbeddingConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=list(f)) for n, r, f in SPEC]


def seq_batch(step: int, rank: int, batch: int = BATCH) -> Any:
    """Deterministic sequences (lengths 0..MAX_LEN, ids skewed towards low rows)."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    rows = [r for _, r, feats in SPEC for _ in feats]
    lengths = torch.randint(0, MAX_LEN + 1, (len(KEYS) * batch,), generator=g)
    values = []
    for i, n in enumerate(rows):
        u = torch.rand(int(lengths[i * batch : (i + 1) * batch].sum()), generator=g)
        values.append((u * u * n).long())
    return KeyedJaggedTensor.from_lengths_sync(KEYS, torch.cat(values), lengths)


def load_factors(world_size: int) -> dict:
    """Room for every id of a step (all ranks' ids reach a table-wise shard), far below the rows."""
    most = world_size * BATCH * MAX_LEN
    return {"s_big": round(2 * most / 2000, 4), "s_mid": round(most / 1000, 4)}
