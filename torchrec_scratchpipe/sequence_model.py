"""A small next-item sequence model over an ``EmbeddingCollection``, and its synthetic data.

The model reads each user's history of item ids (unpooled: one embedding per id), encodes
it with one transformer layer and scores the next item against the other targets of the
batch (in-batch softmax). The ``item`` table is the big one; ``category`` is small. Data
are synthetic: users stick to one of 64 topics, items within a topic are skewed.

``examples/train_sequence.py`` trains it; the A/B tool runs it with ``--model sequence``
(:class:`SequenceSpec` builds it the way ``training.build_trainer`` expects).

Example::

    >>> spec = SequenceSpec(items=640, categories=8, dim=8, max_len=4, batch_size=4)
    >>> batches = spec.batches(2, seed=0)
    >>> loss, (loss_again, scores) = spec.build(torch.device("cpu"))(batches[0])
    >>> scores.shape
    torch.Size([4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME

KEYS = ["history", "history_category", "target"]
#: Features of each table, in table order (``item`` is read by two features).
TABLE_FEATURES = {"item": ["history", "target"], "category": ["history_category"]}
TOPICS = 64


class SequenceTower(nn.Module):
    """History embeddings -> one transformer layer -> user vector; in-batch softmax loss."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.position = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, history: JaggedTensor, category: JaggedTensor, target: JaggedTensor) -> Any:
        x = history.to_padded_dense(self.max_len) + category.to_padded_dense(self.max_len) + self.position
        lengths = history.lengths()
        pad = torch.arange(self.max_len, device=lengths.device)[None, :] >= lengths[:, None]
        z = self.encoder(x, src_key_padding_mask=pad)
        user = (z * (~pad)[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
        logits = user @ target.values().T  # every sample has one target
        loss = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
        return loss, (loss.detach(), logits.diag().detach())


class NextItemModel(nn.Module):
    """``EmbeddingCollection`` (items, categories) + :class:`SequenceTower`.

    Returns ``(loss, (loss, scores))``: pipelines train on the first and hand back the second.
    """

    def __init__(self, items: int, categories: int, dim: int, max_len: int, device: torch.device) -> None:
        super().__init__()
        sizes = {"item": items, "category": categories}
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=n, embedding_dim=dim, num_embeddings=sizes[n], feature_names=f)
                    for n, f in TABLE_FEATURES.items()],
            device=device,
        )
        self.tower = SequenceTower(dim, max_len)

    def forward(self, batch: Batch) -> Any:
        emb = self.ec(batch.sparse_features)
        return self.tower(emb["history"], emb["history_category"], emb["target"])


def sequence_batches(n: int, batch_size: int, items: int, categories: int, max_len: int, seed: int) -> List[Batch]:
    """``n`` batches: histories of 1..max_len items from the user's topic, a target from it too."""
    g = torch.Generator().manual_seed(seed)
    block = items // TOPICS
    out = []
    for _ in range(n):
        topic = torch.randint(0, TOPICS, (batch_size,), generator=g)
        lengths = torch.randint(1, max_len + 1, (batch_size,), generator=g)
        owner = torch.repeat_interleave(topic, lengths)
        history = owner * block + (torch.rand(owner.numel(), generator=g).pow(3) * block).long()
        target = topic * block + (torch.rand(batch_size, generator=g).pow(3) * block).long()
        category = history * categories // items
        kjt = KeyedJaggedTensor.from_lengths_sync(
            KEYS, torch.cat([history, category, target]),
            torch.cat([lengths, lengths, torch.ones(batch_size, dtype=torch.long)]),
        )
        out.append(Batch(torch.zeros(batch_size, 1), kjt, torch.zeros(batch_size)))
    return out


@dataclass
class SequenceSpec:
    """:class:`NextItemModel` in the shape ``training.build_trainer`` takes (like ``ModelSpec``).

    Args:
        items, categories: rows of the ``item`` and ``category`` tables.
        dim: embedding dim.
        max_len: longest history.
        optimizer: fused optimizer for the embeddings.
        learning_rate: for the embeddings and the dense SGD.
        batch_size: samples per step.
    """

    items: int = 64_000
    categories: int = 256
    dim: int = defaults.DIM
    max_len: int = 20
    optimizer: EmbOptimType = OPTIMIZERS_BY_NAME[defaults.OPTIMIZER]
    learning_rate: float = defaults.LEARNING_RATE
    batch_size: int = defaults.BATCH_SIZE

    def __post_init__(self) -> None:
        if self.items < TOPICS or self.categories < 1 or self.max_len < 1:
            raise ValueError(f"need items >= {TOPICS}, categories >= 1 and max_len >= 1; got "
                             f"items={self.items}, categories={self.categories}, max_len={self.max_len}.")

    @property
    def tables(self) -> List[EmbeddingConfig]:
        return list(NextItemModel(self.items, self.categories, self.dim, self.max_len, torch.device("meta")).ec.embedding_configs())

    @property
    def pooling(self) -> float:
        """Mean ids per sample and feature, for the planner's estimates."""
        return (self.max_len + 1) / 2

    def build(self, device: torch.device) -> NextItemModel:
        """The unsharded model (tables on ``device``, e.g. ``meta`` before sharding)."""
        return NextItemModel(self.items, self.categories, self.dim, self.max_len, device)

    def initial_state(self, seed: int) -> Dict[str, torch.Tensor]:
        """A fixed starting point: every arm loads the same weights."""
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in self.build(torch.device("cpu")).state_dict().items()}

    def batches(self, n: int, seed: int, rank: int = 0) -> List[Batch]:
        """``n`` synthetic batches for ``rank``."""
        return sequence_batches(n, self.batch_size, self.items, self.categories, self.max_len, seed * 1000 + rank)


def table_view(batches: List[Batch], table: str) -> List[Batch]:
    """The batches with one feature, ``table``, holding every id the table looks up (for
    the cache simulator and the stall advisor, which read one feature per table)."""
    feats = TABLE_FEATURES[table]
    out = []
    for b in batches:
        kjt = b.sparse_features
        values = torch.cat([kjt[f].values() for f in feats])
        lengths = torch.cat([kjt[f].lengths() for f in feats])
        out.append(Batch(b.dense_features, KeyedJaggedTensor.from_lengths_sync([table], values, lengths), b.labels))
    return out
