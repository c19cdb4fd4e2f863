"""The mover's staged path (pinned ring on CUDA), run on CPU without streams."""

from __future__ import annotations

from typing import Any, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from engine_utils import FullTableReference, make_tables, power_law_stream, train_and_compare, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.mover import Mover, staging_ring, staging_rings
from torchrec_scratchpipe.core.staging import RING_BUFFERS, StagingRing, ring_buffers, staging_host_bytes
from torchrec_scratchpipe.core.store import BackingStore

ROWS = [997, 300, 61]


def _staged(emb: ScratchPipeEmbeddingBags, buffer_bytes: int, buffers: int) -> List[StagingRing]:
    """Give every group of a fresh engine a staged mover with small rings (forces chunks)."""
    rings: List[StagingRing] = []
    for g in emb.groups.values():
        pair = staging_rings(g.store, g.capacity, pin=False, buffers=buffers, buffer_bytes=buffer_bytes)
        g.mover = Mover(g.store, g.pad, g.stats, rings=pair)
        rings.extend(pair)
    return rings


@pytest.mark.parametrize("optimizer,buffer_bytes,buffers,packed", [
    (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 1 << 10, 2, True),  # many chunks per plan, buffers reused within a plan
    (EmbOptimType.EXACT_ADAGRAD, 1 << 12, 3, True),
    (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 1 << 20, 4, True),  # one chunk per plan
    (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 1 << 12, 3, False),  # a store of one tensor per value (TorchRec kernel)
])
def test_staged_mover_matches_full_table(optimizer: EmbOptimType, buffer_bytes: int, buffers: int, packed: bool) -> None:
    lookahead = 2
    tables = make_tables(ROWS, [8, 8, 16])  # two groups
    stream = power_law_stream(ROWS, 60, 16, seed=5)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead,
                            horizon=lookahead + 3, optimizer=optimizer, learning_rate=0.1, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg, packed_store=packed)
    rings = _staged(emb, buffer_bytes, buffers)
    ref = FullTableReference(tables, optimizer, lr=0.1)
    ref.load(emb.table_weights())

    def reset_and_load(i: int) -> None:
        if i == 30:  # a reset and a live load go through the same ring
            emb.reset_window()
            emb.load_table_weights(ref.weights())
            for k2 in stream[i + 1 : i + lookahead + 2]:
                emb.prefetch(k2)

    train_and_compare(emb, ref, stream, lookahead, on_step=reset_and_load, seed=2)
    stats = emb.stats()
    assert all(s["train_misses"] == 0 for s in stats.values())
    assert sum(s["d2h_rows"] for s in stats.values()) > 0  # victims went through the ring
    assert any(r.rows < max(s["capacity"] for s in stats.values()) for r in rings) or buffer_bytes == 1 << 20
    weights = emb.table_weights()
    for name, w in ref.weights().items():
        torch.testing.assert_close(weights[name], w, atol=0, rtol=0)
    for name, per in emb.optimizer_states().items():
        for s_name, st in per.items():
            assert torch.isfinite(st).all(), (name, s_name)


class _Pending:
    """An event whose copy has not completed until ``synchronize`` is called."""

    def __init__(self) -> None:
        self.completed = False

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.completed = True


def test_victims_land_before_their_rows_are_collected_again() -> None:
    """Hazard 2: a victim still in flight is landed before a plan collects its row; others stay."""
    emb = ScratchPipeEmbeddingBags(make_tables([50], [4]), ScratchPipeConfig(cache_rows=8, lookahead=0))
    group = next(iter(emb.groups.values()))
    store, pad = group.store, group.pad
    store.weights.zero_()
    mover = Mover(store, pad, group.stats, rings=staging_rings(store, 8, pin=False, buffers=4))
    with torch.no_grad():
        pad.weights.copy_(torch.arange(32, dtype=torch.float32).view(8, 4))
    mover._stage_out(torch.tensor([10, 11]), torch.tensor([0, 1]))
    mover._stage_out(torch.tensor([20]), torch.tensor([2]))
    first, second = list(mover._pending)
    first.done, second.done = _Pending(), _Pending()
    mover._land_overlapping(torch.tensor([5, 6]))  # no overlap, copies in flight: nothing lands
    assert len(mover._pending) == 2 and store.weights[10].abs().sum() == 0
    mover._land_overlapping(torch.tensor([20]))  # row 20 is in the second: both land, in order
    assert not mover._pending
    torch.testing.assert_close(store.weights[[10, 11, 20]], pad.weights[[0, 1, 2]])


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ADAM],
                         ids=lambda o: o.name)
@pytest.mark.parametrize("capacity", [1, 100, 10_000, 1_000_000])
def test_ring_allocates_what_host_bytes_counts(optimizer: EmbOptimType, capacity: int) -> None:
    dim = 64
    store = BackingStore([10], RowLayout(optimizer, dim))
    ring = staging_ring(store, capacity, pin=False)
    row = store.layout.bytes_per_row
    assert store.nbytes() == 10 * row
    assert ring.nbytes() == StagingRing.host_bytes(capacity, row)
    assert ring.rows == min(capacity, ring.rows) and ring.buffers[0].packed.shape == (ring.rows, row)
    for buf in ring.buffers:  # views of one flat buffer that do not overlap
        spans: List[Any] = sorted(
            (t.storage_offset() * t.element_size(), (t.storage_offset() + t.numel()) * t.element_size())
            for t in [buf.index, buf.packed]
        )
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] <= ring.nbytes() // len(ring.buffers)


@pytest.mark.parametrize("rows_per_step,wraps", [(None, True), ("batch", False)], ids=["default", "sized"])
def test_rings_sized_for_a_step_never_wrap(rows_per_step: Any, wraps: bool) -> None:
    """Rings sized from the rows a step moves (here: the most distinct rows of any batch,
    what the planner's estimate bounds) never come round, within a step or the next, to a
    buffer still holding that step's copies; the default two small buffers do."""
    tables = make_tables([997], [8])
    stream = power_law_stream([997], 40, 16, seed=7)
    cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, [997], 1), lookahead=1, learning_rate=0.1, background_planning=False)
    emb = ScratchPipeEmbeddingBags(tables, cfg)
    (g,) = emb.groups.values()
    per_step = max(int(k.values().unique().numel()) for k in stream) if rows_per_step == "batch" else None
    pair = staging_rings(g.store, g.capacity, pin=False, buffer_bytes=1 << 10, rows_per_step=per_step)
    g.mover = Mover(g.store, g.pad, g.stats, rings=pair)
    ref = FullTableReference(tables, cfg.optimizer, lr=0.1)
    ref.load(emb.table_weights())
    train_and_compare(emb, ref, stream, 1, seed=1)
    assert emb.stats()[g.name]["d2h_rows"] > 0 and all(r.rows < per_step for r in pair if per_step)
    assert (sum(r.wraps for r in pair) > 0) == wraps, [(len(r.buffers), r.rows, r.wraps) for r in pair]


def test_ring_buffers_from_rows_per_step() -> None:
    row = 64 * 4 + 4
    per_buffer = StagingRing.rows_per_buffer(10**6, row)
    assert ring_buffers(None, per_buffer) == RING_BUFFERS
    assert ring_buffers(per_buffer, per_buffer) == 2 and ring_buffers(per_buffer + 1, per_buffer) == 4
    ring = StagingRing(row, 10**6, pin=False, rows_per_step=3 * per_buffer, buffer_bytes=1 << 24)
    assert len(ring.buffers) == 6 and ring.nbytes() == StagingRing.host_bytes(10**6, row, rows_per_step=3 * per_buffer)
    assert staging_host_bytes(10**6, row, 3 * per_buffer) == 2 * ring.nbytes()
