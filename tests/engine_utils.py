"""Shared helpers for engine tests: id streams and the full-table FBGEMM reference."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.core.layout import RowLayout


def make_tables(rows: Sequence[int], dims: Sequence[int]) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"])
        for i, (n, d) in enumerate(zip(rows, dims))
    ]


def power_law_stream(
    rows: Sequence[int], steps: int, batch: int, max_len: int = 6, seed: int = 0, alpha: float = 2.5
) -> List[KeyedJaggedTensor]:
    """Batches with skewed ids, duplicates inside bags and some empty bags."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, max_len + 1, (len(rows) * batch,), generator=g)
        vals = []
        for t, n in enumerate(rows):
            cnt = int(lengths[t * batch : (t + 1) * batch].sum())
            u = torch.rand(cnt, generator=g)
            vals.append((u.pow(alpha) * n).long().clamp_(max=n - 1))
        keys = [f"f{i}" for i in range(len(rows))]
        out.append(KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(vals), lengths))
    return out


class FullTableReference:
    """Plain FBGEMM TBE over the whole tables: the ground truth.

    With ``pooling_mode=PoolingMode.NONE`` (unpooled, sequence tables) it returns one row
    per id, tables stacked in feature order, as the engine's ``embeddings`` does.
    """

    def __init__(
        self, tables: Sequence[EmbeddingBagConfig], optimizer: EmbOptimType, lr: float,
        device: torch.device = torch.device("cpu"), pooling_mode: PoolingMode = PoolingMode.SUM,
        stochastic_rounding: bool = True,
    ) -> None:
        self.tables = list(tables)
        self.unpooled = pooling_mode == PoolingMode.NONE
        self.tbes = []
        on_cuda = device.type == "cuda"
        place = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if on_cuda else (EmbeddingLocation.HOST, ComputeDevice.CPU)
        # One TBE per table keeps mixed dims simple; numerics are per row either way.
        for t in tables:
            self.tbes.append(
                SplitTableBatchedEmbeddingBagsCodegen(
                    [(t.num_embeddings, t.embedding_dim, *place)],
                    optimizer=optimizer,
                    learning_rate=lr,
                    device=device,
                    pooling_mode=pooling_mode,
                    weights_precision=RowLayout.for_table(optimizer, t).weights_precision,  # the table's dtype
                    stochastic_rounding=stochastic_rounding,
                )
            )

    def load(self, weights: Dict[str, torch.Tensor]) -> None:
        for t, tbe in zip(self.tables, self.tbes):
            tbe.split_embedding_weights()[0].copy_(weights[t.name])

    def __call__(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        outs = []
        for t, tbe in zip(self.tables, self.tbes):
            jt = kjt[t.feature_names[0]]
            outs.append(tbe(jt.values(), jt.offsets(), None if self.unpooled else jt.weights_or_none()))
        return torch.cat(outs, dim=0 if self.unpooled else 1)

    def weights(self) -> Dict[str, torch.Tensor]:
        """Weights per table (on the host)."""
        return {t.name: tbe.split_embedding_weights()[0].cpu() for t, tbe in zip(self.tables, self.tbes)}

    def states(self) -> Dict[str, List[torch.Tensor]]:
        """Optimizer states per table (on the host)."""
        return {
            t.name: [s.cpu() for s in tbe.split_optimizer_states()[0]] if tbe.split_optimizer_states() else []
            for t, tbe in zip(self.tables, self.tbes)
        }


def window_capacity(stream: Sequence[KeyedJaggedTensor], rows: Sequence[int], lookahead: int) -> int:
    """Largest union of distinct rows over L+1 consecutive batches (the smallest C with no stall)."""
    base = torch.tensor([0] + list(rows)).cumsum(0)[:-1]
    sets = []
    for k in stream:
        g = torch.repeat_interleave(base, torch.tensor(k.length_per_key())) + k.values()
        sets.append(torch.unique(g))
    return max(torch.unique(torch.cat(sets[i : i + lookahead + 1])).numel() for i in range(len(sets)))


def train_and_compare(
    emb: Any,
    ref: FullTableReference,
    stream: Sequence[KeyedJaggedTensor],
    ahead: int,
    forward: Optional[Callable[[KeyedJaggedTensor], torch.Tensor]] = None,
    on_step: Optional[Callable[[int], None]] = None,
    seed: int = 1,
) -> None:
    """Train a ScratchPipe engine and the full-table reference side by side on ``stream``.

    ``ahead + 1`` batches are prefetched before the first forward and one more after each
    backward; every step's output must equal the reference's (1e-5).

    Args:
        emb, ref: the engine and its reference, loaded with the same weights.
        stream: the batches.
        ahead: batches prefetched beyond the training one (L, or H to exercise victim choice).
        forward: the engine's output for a batch (default: pooled values).
        on_step: called with the step index after its backward and prefetch (e.g. a reset).
        seed: of the random output gradients.
    """
    forward = forward or (lambda k: emb(k).values())
    g = torch.Generator().manual_seed(seed)
    for k in stream[: ahead + 1]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        out = forward(k)
        expect = ref(k)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5, msg=f"step {i}")
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        expect.backward(grad)
        if i + ahead + 1 < len(stream):
            emb.prefetch(stream[i + ahead + 1])
        if on_step is not None:
            on_step(i)
