"""Shared helpers for engine tests: id streams and the full-table FBGEMM reference."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbedding, BatchedFusedEmbeddingBag
from torchrec.distributed.embedding_types import (
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
    ShardedEmbeddingTable,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
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


def local_process_group() -> None:
    """A world-size-1 gloo group in this process (TorchRec's kernels build their optimizer
    state as ShardedTensors, which need one). Idempotent."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _sharded_table(t: Any, kernel: EmbeddingComputeKernel, pooling: PoolingType, device: torch.device) -> Any:
    """``t`` as one whole-table shard on this rank (what TorchRec's table-wise plan gives)."""
    size = [t.num_embeddings, t.embedding_dim]
    shard = ShardMetadata(shard_offsets=[0, 0], shard_sizes=size, placement=f"rank:0/{device}")
    dtype = RowLayout.for_table(EmbOptimType.EXACT_SGD, t).weight_dtype
    return ShardedEmbeddingTable(
        num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim, name=t.name,
        feature_names=list(t.feature_names), data_type=t.data_type, pooling=pooling,
        local_rows=t.num_embeddings, local_cols=t.embedding_dim, compute_kernel=kernel,
        local_metadata=shard, global_metadata=ShardedTensorMetadata(
            shards_metadata=[shard], size=torch.Size(size), tensor_properties=TensorProperties(dtype=dtype)
        ),
    )


class FullTableReference:
    """TorchRec's own ``fused`` kernel over the whole tables: the ground truth.

    The tables are grouped as TorchRec groups them for one rank (by data type, in order of
    first appearance), and each group runs TorchRec's ``BatchedFusedEmbeddingBag`` (or,
    with ``pooling_mode=PoolingMode.NONE``, ``BatchedFusedEmbedding``), built by TorchRec
    itself: one FBGEMM TBE with one table per source table. Outputs are returned in the
    tables' order: pooled ``[B, sum(dims)]``, or one row per id, tables stacked in feature
    order, as the engine's ``embeddings`` does.
    """

    def __init__(
        self, tables: Sequence[Any], optimizer: EmbOptimType, lr: float,
        device: torch.device = torch.device("cpu"), pooling_mode: PoolingMode = PoolingMode.SUM,
        stochastic_rounding: bool = True, fused_params: Optional[Dict[str, Any]] = None,
    ) -> None:
        local_process_group()
        self.tables = list(tables)
        self.unpooled = pooling_mode == PoolingMode.NONE
        params = dict(optimizer=optimizer, learning_rate=lr, stochastic_rounding=stochastic_rounding, **(fused_params or {}))
        by_dtype: Dict[Any, List[int]] = {}
        for i, t in enumerate(self.tables):
            by_dtype.setdefault(t.data_type, []).append(i)
        self.members = list(by_dtype.values())
        self.kernels: List[Any] = []
        for dtype, idx in by_dtype.items():
            pooling = PoolingType.NONE if self.unpooled else getattr(self.tables[idx[0]], "pooling", PoolingType.SUM)
            config = GroupedEmbeddingConfig(
                data_type=dtype, pooling=pooling, is_weighted=False, has_feature_processor=False,
                compute_kernel=EmbeddingComputeKernel.FUSED,
                embedding_tables=[_sharded_table(self.tables[i], EmbeddingComputeKernel.FUSED, pooling, device) for i in idx],
                fused_params=dict(params),
            )
            kernel = (BatchedFusedEmbedding if self.unpooled else BatchedFusedEmbeddingBag)(config, device=device)
            self.kernels.append(kernel)
        self._tbe = {self.tables[i].name: (k, j) for k, idx in zip(self.kernels, self.members) for j, i in enumerate(idx)}

    def load(self, weights: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t in self.tables:
                kernel, j = self._tbe[t.name]
                kernel.split_embedding_weights()[j].copy_(weights[t.name])

    def load_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Copy optimizer states in: ``{table: {state name: tensor}}``, in FBGEMM's order."""
        with torch.no_grad():
            for t in self.tables:
                if t.name not in states:
                    continue
                kernel, j = self._tbe[t.name]
                for dst, src in zip(kernel.emb_module.split_optimizer_states()[j], states[t.name].values()):
                    dst.copy_(src.view(dst.shape))

    def set_learning_rate(self, lr: float) -> None:
        for kernel in self.kernels:
            kernel.emb_module.set_learning_rate(lr)

    def get_learning_rate(self) -> float:
        return float(self.kernels[0].emb_module.get_learning_rate())

    def __call__(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        parts: Dict[str, torch.Tensor] = {}
        for kernel, idx in zip(self.kernels, self.members):
            features = [f for i in idx for f in self.tables[i].feature_names]
            sub = _select(kjt, features)
            out = kernel(sub)
            if self.unpooled:
                pieces = torch.split(out, sub.length_per_key())
            else:
                pieces = torch.split(out, [self.tables[i].embedding_dim for i in idx for _ in self.tables[i].feature_names], dim=1)
            parts.update(zip(features, pieces))
        order = [f for t in self.tables for f in t.feature_names]
        return torch.cat([parts[f] for f in order], dim=0 if self.unpooled else 1)

    def weights(self) -> Dict[str, torch.Tensor]:
        """Weights per table (on the host)."""
        return {t.name: self._tbe[t.name][0].split_embedding_weights()[self._tbe[t.name][1]].detach().cpu() for t in self.tables}

    def states(self) -> Dict[str, List[torch.Tensor]]:
        """Optimizer states per table (on the host), in FBGEMM's order."""
        out: Dict[str, List[torch.Tensor]] = {}
        for t in self.tables:
            kernel, j = self._tbe[t.name]
            states = kernel.emb_module.split_optimizer_states()
            out[t.name] = [s.detach().cpu() for s in states[j]] if states else []
        return out


def _select(kjt: KeyedJaggedTensor, features: List[str]) -> KeyedJaggedTensor:
    """The KJT of ``features`` only, in that order."""
    if kjt.keys() == features:
        return kjt
    jts = kjt.to_dict()
    return KeyedJaggedTensor.from_jt_dict({f: jts[f] for f in features})


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
    backward; every step's output must equal the reference's, bit for bit.

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
        assert torch.equal(out, expect), f"step {i}: max |diff| {(out - expect).abs().max()}"
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        expect.backward(grad)
        if i + ahead + 1 < len(stream):
            emb.prefetch(stream[i + ahead + 1])
        if on_step is not None:
            on_step(i)
