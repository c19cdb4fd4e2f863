"""The engine in the loops users write: accumulation, no-grad forwards, live loads.

Ground truth: plain FBGEMM TBE over the full tables, run through the same loop. Every test
runs on both backing stores: host memory, and a file behind a host cache too small for
the tables (``store`` fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import FullTableReference, make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.plan import CapacityError
from torchrec_scratchpipe.core.store_api import StoreSpec

ROWS = [2000, 600]
OPT = EmbOptimType.EXACT_ROWWISE_ADAGRAD
TOL = dict(atol=0, rtol=0)  # bit for bit with fused


@pytest.fixture(params=["host", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Optional[StoreSpec]:
    """The backing store: host memory, or a file with a host cache of 64 rows per table."""
    return None if request.param == "host" else StoreSpec("file", str(tmp_path), 64 * 36)


def _pair(cache_rows: int, lookahead: int = 0, store: Optional[StoreSpec] = None):
    tables = make_tables(ROWS, [8, 8])
    emb = ScratchPipeEmbeddingBags(
        tables, ScratchPipeConfig(cache_rows=cache_rows, lookahead=lookahead, optimizer=OPT, learning_rate=0.1, store=store)
    )
    ref = FullTableReference(tables, OPT, lr=0.1)
    ref.load(emb.table_weights())
    return emb, ref


def _assert_same(emb: ScratchPipeEmbeddingBags, ref: FullTableReference) -> None:
    for name, w in emb.table_weights().items():
        torch.testing.assert_close(w, ref.weights()[name], **TOL)
    for name, states in emb.optimizer_states().items():
        torch.testing.assert_close(states["momentum1"], ref.states()[name][0], **TOL)


def _union(batches: List[KeyedJaggedTensor]) -> int:
    """Distinct rows (over all tables) of ``batches`` together."""
    base = torch.tensor([0] + ROWS[:-1]).cumsum(0)
    rows = [torch.repeat_interleave(base, torch.tensor(b.length_per_key())) + b.values() for b in batches]
    return torch.unique(torch.cat(rows)).numel()


def _held(emb: ScratchPipeEmbeddingBags) -> int:
    """Slots held now (finished batches are released at the engine's next call: make one)."""
    emb.stats()
    return sum(g.planner.held_slots() for g in emb.groups.values())


@pytest.mark.parametrize("lookahead", [0, 2])
def test_k_forwards_then_one_backward_train_like_full_tables(lookahead: int, store: Optional[StoreSpec]) -> None:
    k = 3
    stream = power_law_stream(ROWS, 36, 8, seed=3)
    # Just room for the k batches of one accumulation step: every slot is needed, rows keep moving.
    emb, ref = _pair(max(_union(stream[s : s + k]) for s in range(0, len(stream), k)), lookahead, store)
    assert emb.groups["dim8_sum"].capacity < sum(ROWS) // 4
    for b in stream[: lookahead + 1]:
        emb.prefetch(b)
    g = torch.Generator().manual_seed(0)
    for start in range(0, len(stream), k):
        outs, expects = [], []
        for i in range(start, start + k):
            outs.append(emb(stream[i]).values())
            expects.append(ref(stream[i]))
            torch.testing.assert_close(outs[-1], expects[-1], **TOL)
            if i + lookahead + 1 < len(stream):
                emb.prefetch(stream[i + lookahead + 1])
        grads = [torch.randn(o.shape, generator=g) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, grads)).backward()
        sum((e * w).sum() for e, w in zip(expects, grads)).backward()
        assert _held(emb) <= emb.groups["dim8_sum"].capacity
    assert emb.stats()["dim8_sum"]["evictions"] > 0
    _assert_same(emb, ref)


def test_accumulated_batches_that_do_not_fit_are_refused_before_any_change(store: Optional[StoreSpec]) -> None:
    stream = power_law_stream(ROWS, 3, 8, seed=5)
    emb, ref = _pair(window_capacity(stream, ROWS, 0), store=store)  # one batch fits, two do not
    first = emb(stream[0]).values()
    expect = ref(stream[0])
    held = _held(emb)
    with pytest.raises(CapacityError, match=r"table group 'dim8_sum'.*1 batch\(es\) that ran forward.*hold \d+ of the \d+ slots"):
        for b in stream[1:]:
            emb(b)
    assert emb.queued() == 0 and _held(emb) == held
    first.sum().backward()  # the held batch finishes: its slots are free again
    expect.sum().backward()
    for b in stream[1:]:
        out = emb(b).values()
        e = ref(b)
        torch.testing.assert_close(out, e, **TOL)
        out.sum().backward()
        e.sum().backward()
    _assert_same(emb, ref)


@pytest.mark.parametrize("mode", ["no_grad", "eval"])
def test_forwards_without_backward_hold_nothing_and_change_nothing(mode: str, store: Optional[StoreSpec]) -> None:
    stream = power_law_stream(ROWS, 12, 8, seed=7)
    others = power_law_stream(ROWS, 3, 8, seed=8)  # never prefetched
    emb, ref = _pair(window_capacity(stream, ROWS, 2), lookahead=2, store=store)
    for b in stream[:3]:
        emb.prefetch(b)
    for i, b in enumerate(stream):
        out = emb(b).values()
        e = ref(b)
        out.sum().backward()
        e.sum().backward()
        if i + 3 < len(stream):
            emb.prefetch(stream[i + 3])
        if i % 4 == 1:  # evaluate mid-window: batches queued, one between forward and backward or not
            queued, held = emb.queued(), _held(emb)
            for o in others:
                if mode == "no_grad":
                    with torch.no_grad():
                        got = emb(o).values()
                else:
                    emb.eval()
                    got = emb(o).values()
                    emb.train()
                with torch.no_grad():
                    torch.testing.assert_close(got, ref(o), **TOL)
                assert not got.requires_grad
            assert (emb.queued(), _held(emb)) == (queued, held)
    _assert_same(emb, ref)


def test_no_grad_forward_of_the_prefetched_batch_releases_it_at_once(store: Optional[StoreSpec]) -> None:
    stream = power_law_stream(ROWS, 2, 8, seed=9)
    emb, ref = _pair(window_capacity(stream, ROWS, 1), lookahead=1, store=store)
    for b in stream:
        emb.prefetch(b)
    with torch.no_grad():
        torch.testing.assert_close(emb(stream[0]).values(), ref(stream[0]), **TOL)
        torch.testing.assert_close(emb(stream[1]).values(), ref(stream[1]), **TOL)
    assert emb.queued() == 0 and _held(emb) == 0
    _assert_same(emb, ref)


def test_loads_into_the_store_reach_the_next_forward(store: Optional[StoreSpec]) -> None:
    stream = power_law_stream(ROWS, 10, 8, seed=11)
    emb, ref = _pair(window_capacity(stream, ROWS, 1), lookahead=1, store=store)
    emb.prefetch(stream[0])
    emb.prefetch(stream[1])
    for i in range(4):  # rows resident and updated since the last flush
        emb(stream[i]).values().sum().backward()
        ref(stream[i]).sum().backward()
        emb.prefetch(stream[i + 2])
    g = torch.Generator().manual_seed(2)
    loaded = {t: torch.randn(w.shape, generator=g) for t, w in ref.weights().items()}
    momentum = {t: torch.rand(s[0].shape, generator=g) for t, s in ref.states().items()}
    # in place, as dcp.load writes into state_dict() tensors: purge, write the views, reload
    views, states = emb.table_weights(), emb.optimizer_states()
    emb.purge()
    for t in loaded:
        views[t].copy_(loaded[t])
        states[t]["momentum1"].copy_(momentum[t])
    emb.reload()
    for t in loaded:
        ref.weights()[t].copy_(loaded[t])
        ref.states()[t][0].copy_(momentum[t])
    for i in range(4, 8):  # batches 4 and 5 were planned before the load
        out, e = emb(stream[i]).values(), ref(stream[i])
        torch.testing.assert_close(out, e, **TOL)
        out.sum().backward()
        e.sum().backward()
        if i + 2 < len(stream):
            emb.prefetch(stream[i + 2])
    _assert_same(emb, ref)
    # by copy, weights only: the optimizer state stays what training made it
    emb.load_table_weights({t: w * 0.5 for t, w in loaded.items()})
    for t in loaded:
        ref.weights()[t].copy_(loaded[t] * 0.5)
    _assert_same(emb, ref)


@pytest.mark.parametrize("weighted", [False, True])
def test_reads_in_place_match_the_scratchpad_for_mean_pooling_weights_and_groups(weighted: bool, store: Optional[StoreSpec]) -> None:
    from torchrec import PoolingType
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=50, feature_names=["fa"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=30, feature_names=["fb", "fc"]),
    ]
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=40, lookahead=1, store=store))
    g = torch.Generator().manual_seed(int(weighted))

    def batch() -> KeyedJaggedTensor:
        lengths = torch.randint(0, 4, (15,), generator=g)
        n = int(lengths[:5].sum())
        ids = torch.cat([torch.randint(0, 50, (n,), generator=g), torch.randint(0, 30, (int(lengths.sum()) - n,), generator=g)])
        w = torch.rand(ids.numel(), generator=g) if weighted else None
        return KeyedJaggedTensor.from_lengths_sync(["fa", "fb", "fc"], ids, lengths, weights=w)

    bs = [batch() for _ in range(6)]
    for b in bs[:3]:  # some rows resident and newer than the store, others only in the store
        emb(b).values().sum().backward()
    emb.prefetch(bs[3])
    emb.prefetch(bs[4])
    with torch.no_grad():
        read = emb(bs[5]).values()  # not prefetched: read where the rows are
    emb.reset_window()
    trained = emb(bs[5]).values()  # planned and looked up by the scratchpad's TBE
    torch.testing.assert_close(read, trained.detach(), **TOL)
