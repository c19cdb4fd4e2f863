"""FP16 tables on the engine: FP16 rows in the store and the scratchpad, trained like a
full-table FP16 TBE (FBGEMM's own numerics), moving half the FP32 weight bytes per row."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig

from engine_utils import FullTableReference, power_law_stream
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.layout import RowLayout

#: Largest |difference| from TorchRec's fused FP16 kernel with deterministic rounding: none.
TOL = 0.0
ROWS = (300, 200, 250)
OPTIMIZERS = (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
#: The scratchpad's device: CPU here, and CUDA where there is one (FBGEMM rounds stochastically only there).
DEVICES = [
    torch.device("cpu"),
    pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def _tables(dtypes: Tuple[DataType, ...]) -> List[EmbeddingBagConfig]:
    """Same dim for every table: only the weight dtype can split them into groups."""
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"], data_type=d)
        for i, (n, d) in enumerate(zip(ROWS, dtypes))
    ]


def _initial() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": torch.rand(n, 8, generator=g) * 0.2 - 0.1 for i, n in enumerate(ROWS)}


def _train(
    tables: List[EmbeddingBagConfig], optimizer: EmbOptimType, stochastic: bool, steps: int = 30, lookahead: int = 2,
    device: torch.device = torch.device("cpu"),
) -> Tuple[ScratchPipeEmbeddingBags, FullTableReference, float]:
    """Train the engine (constant eviction) and the full-table reference on one stream,
    from ``_initial()`` (rounded to each table's dtype); return both and the largest
    output difference."""
    stream = [k.to(device) for k in power_law_stream(ROWS, steps, batch=8, seed=3)]
    cfg = ScratchPipeConfig(cache_rows=120, lookahead=lookahead, optimizer=optimizer, learning_rate=0.05,
                            stochastic_rounding=stochastic)
    emb = ScratchPipeEmbeddingBags(tables, cfg, device)
    emb.load_table_weights(_initial())
    ref = FullTableReference(tables, optimizer, 0.05, device, stochastic_rounding=stochastic)
    ref.load(emb.table_weights())
    grad = torch.randn(8, 8 * len(tables), generator=torch.Generator().manual_seed(0)).to(device)
    worst = 0.0
    for i, kjt in enumerate(stream):
        while emb.queued() < min(lookahead + 1, steps - i):
            emb.prefetch(stream[i + emb.queued()])
        out, want = emb(kjt).values(), ref(kjt)
        assert out.dtype == want.dtype == torch.float32
        worst = max(worst, float((out - want).detach().abs().max()))
        (out * grad).sum().backward()
        (want * grad).sum().backward()
    return emb, ref, worst


def _weight_diff(emb: ScratchPipeEmbeddingBags, ref: FullTableReference) -> float:
    got, want = emb.table_weights(), ref.weights()
    return max(float((got[k].float() - want[k].float()).abs().max()) for k in want)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_fp16_tables_train_like_a_full_fp16_tbe(optimizer: EmbOptimType, device: torch.device) -> None:
    """FP16 and FP32 tables of one dim land in separate groups; each trains like FBGEMM's
    full-table TBE of its dtype (deterministic rounding), outputs, weights and state."""
    tables = _tables((DataType.FP16, DataType.FP32, DataType.FP16))
    emb, ref, out_diff = _train(tables, optimizer, stochastic=False, device=device)
    assert sorted(emb.groups) == ["dim8_sum", "dim8_sum_fp16"]
    assert [t.name for t in emb.groups["dim8_sum_fp16"].tables] == ["t0", "t2"]
    assert emb.groups["dim8_sum_fp16"].pad.weights.dtype == torch.float16
    weights = emb.table_weights()
    assert {k: w.dtype for k, w in weights.items()} == {"t0": torch.float16, "t1": torch.float32, "t2": torch.float16}
    assert out_diff <= TOL, out_diff
    assert _weight_diff(emb, ref) <= TOL
    for name, states in emb.optimizer_states().items():  # FBGEMM keeps FP32 state for FP16 weights
        for got, want in zip(states.values(), ref.states()[name]):
            assert got.dtype == want.dtype == torch.float32
            assert float((got.cpu() - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
    stats = emb.stats()["dim8_sum_fp16"]
    assert stats["evictions"] > 0 and stats["train_misses"] == 0, stats


def test_eval_lookup_of_fp16_rows_matches_the_tbe() -> None:
    """A forward outside the window (eval) reads FP16 rows where they are and returns what
    the TBE returns for them: FP32 sums of the FP16 weights."""
    tables = _tables((DataType.FP16,) * 3)
    emb, ref, _ = _train(tables, EmbOptimType.EXACT_ROWWISE_ADAGRAD, stochastic=False, steps=10)
    emb.eval()
    later = power_law_stream(ROWS, 3, batch=8, seed=11)
    with torch.no_grad():
        for kjt in later:
            out = emb(kjt).values()
            assert out.dtype == torch.float32
            assert torch.equal(out, ref(kjt))


def test_a_moved_fp16_row_moves_half_the_fp32_weight_bytes() -> None:
    """Same stream, same plan: FP16 moves the same rows with half the weight bytes each
    (the optimizer state stays FP32); the store holds FP16."""
    moved: Dict[DataType, Dict[str, float]] = {}
    for dtype in (DataType.FP32, DataType.FP16):
        for optimizer in (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD):
            emb, _, _ = _train(_tables((dtype,) * 3), optimizer, stochastic=False, steps=12)
            (group,) = emb.groups.values()
            assert group.store.weights.element_size() == (2 if dtype == DataType.FP16 else 4)
            moved[dtype] = moved.get(dtype, {})
            moved[dtype][optimizer.name] = emb.stats()[next(iter(emb.groups))]
    for optimizer in (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD):
        full, half = moved[DataType.FP32][optimizer.name], moved[DataType.FP16][optimizer.name]
        assert full["h2d_rows"] == half["h2d_rows"] > 0 and full["d2h_rows"] == half["d2h_rows"] > 0
        l32, l16 = RowLayout(optimizer, 8), RowLayout(optimizer, 8, torch.float16)
        assert 2 * l16.weight_bytes == l32.weight_bytes and l16.state_bytes == l32.state_bytes
        for way in ("h2d", "d2h"):
            rows = half[f"{way}_rows"]
            assert half[f"{way}_bytes"] == rows * l16.bytes_per_row
            assert (half[f"{way}_bytes"] - rows * l16.state_bytes) * 2 == full[f"{way}_bytes"] - rows * l32.state_bytes
        if optimizer == EmbOptimType.EXACT_SGD:  # weights only: exactly half the bytes
            assert 2 * half["h2d_bytes"] == full["h2d_bytes"]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_stochastic_rounding_trains_fp16_tables(device: torch.device) -> None:
    """With stochastic rounding (the default, as in FBGEMM) FP16 tables train: weights
    move, nothing is NaN, and they stay near FP32 training and the full FP16 TBE with
    stochastic rounding (on CPU FBGEMM's kernel rounds both ways alike)."""
    optimizer = EmbOptimType.EXACT_ROWWISE_ADAGRAD
    emb, ref, out_diff = _train(_tables((DataType.FP16,) * 3), optimizer, stochastic=True, device=device)
    assert emb.config.stochastic_rounding and all(g.pad.tbe.stochastic_rounding for g in emb.groups.values())
    fp32, _, _ = _train(_tables((DataType.FP32,) * 3), optimizer, stochastic=True, device=device)
    start = _initial()
    got, want32 = emb.table_weights(), fp32.table_weights()
    for name, w in got.items():
        assert not torch.isnan(w).any()
        assert float((w.float() - start[name].float()).abs().max()) > 1e-2  # trained
        assert float((w.float() - want32[name]).abs().max()) <= 1e-2  # FP16 rounding of the same training
    # FBGEMM rounds stochastically only on CUDA, from random bits drawn per launch, so two
    # TBEs agree there only up to FP16 rounding; on CPU both round to nearest: bit for bit.
    stochastic_tol = 1e-2 if device.type == "cuda" else 0.0
    assert out_diff <= stochastic_tol and _weight_diff(emb, ref) <= stochastic_tol


def test_unpooled_tables_must_share_a_dtype() -> None:
    tables = [
        EmbeddingConfig(name="a", embedding_dim=8, num_embeddings=10, feature_names=["fa"], data_type=DataType.FP16),
        EmbeddingConfig(name="b", embedding_dim=8, num_embeddings=10, feature_names=["fb"]),
    ]
    with pytest.raises(ValueError, match="must share data_type"):
        ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=4))
    tables[1].data_type = DataType.FP16
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=4))
    assert list(emb.groups) == ["dim8_none_fp16"] and emb.unpooled


def test_unsupported_dtypes_are_refused_before_anything_is_built() -> None:
    tables = _tables((DataType.FP16, DataType.INT8, DataType.FP32))
    with pytest.raises(ValueError, match="table 't1': data_type INT8 is not supported by ScratchPipe; supported: FP32, FP16"):
        ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=4))
