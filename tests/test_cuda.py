"""CUDA paths: staging ring, side-stream ordering, sync-free steps, DMP and the pipeline.

Skipped without CUDA. Every case takes its device as an argument and only the delays and
the synchronization checks need CUDA, so ``python tests/test_cuda.py`` rehearses the
logic of the cases on CPU.

Race tests delay one stream with ``torch.cuda._sleep`` so that a missing wait between
the training stream and the mover's side stream changes the numbers.

Comparisons are bit for bit (``atol=0``): the scratchpad's TBE is built as ``fused``'s
(``compat.slot_tbe``), and FBGEMM's CUDA forward and its exact-optimizer backward sum each
row's contributions in a fixed (sorted) order, so they are expected to be deterministic.
Not yet run on a GPU: a failure here on the first run says which kernel is not.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import FullTableReference, make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.validate import host_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _host_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    """These cases test the host planners' path on CUDA (staging ring, host mover hazards);
    a CUDA engine would otherwise get the device planner (tests/test_device_cuda.py)."""
    from torchrec_scratchpipe.core import native

    monkeypatch.setenv("SCRATCHPIPE_PLANNER", "native" if native.available() else "torch")
ROWS = [997, 300, 61]
CUDA = torch.device("cuda")
#: GPU cycles one delay spins (tens of milliseconds): far longer than any copy here.
DELAY_CYCLES = 200_000_000


def _delay(device: torch.device, stream: Optional[Any] = None) -> None:
    """Spin ``stream`` (default: the current one) so that work queued behind it runs late."""
    if device.type != "cuda":
        return
    if stream is None:
        torch.cuda._sleep(DELAY_CYCLES)
    else:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(DELAY_CYCLES)


def _weighted(stream: List[KeyedJaggedTensor], seed: int) -> List[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        KeyedJaggedTensor(keys=k.keys(), values=k.values(), lengths=k.lengths(), weights=torch.rand(k.values().numel(), generator=g))
        for k in stream
    ]


class Case:
    """An engine and the full-table FBGEMM reference, trained side by side on ``device``.

    Args:
        device: where both train.
        dims: embedding dim per table (different dims form several groups).
        optimizer: exact FBGEMM optimizer.
        lookahead, horizon: L and H.
        steps, weighted: the stream.
        capacity_lookahead: the scratchpad fits this many batches ahead (0: one batch).
    """

    def __init__(
        self, device: torch.device, dims: List[int], optimizer: EmbOptimType, lookahead: int, horizon: int,
        steps: int = 60, weighted: bool = False, capacity_lookahead: Optional[int] = None, seed: int = 3,
    ) -> None:
        self.device = device
        self.lookahead = lookahead
        stream = power_law_stream(ROWS, steps, 16, seed=seed)
        stream = _weighted(stream, seed) if weighted else stream
        fit = lookahead if capacity_lookahead is None else capacity_lookahead
        cfg = ScratchPipeConfig(cache_rows=window_capacity(stream, ROWS, fit), lookahead=lookahead, horizon=horizon,
                                optimizer=optimizer, learning_rate=0.05)
        self.tables = make_tables(ROWS, dims)
        self.emb = ScratchPipeEmbeddingBags(self.tables, cfg, device=device)
        self.ref = FullTableReference(self.tables, optimizer, lr=0.05, device=device)
        self.ref.load(self.emb.table_weights())
        self.batches = [k.to(device) for k in stream]
        self.grads = torch.Generator().manual_seed(0)
        self.next = 0  # next batch to prefetch
        self.step = 0  # next batch to train

    def prefetch_upto(self, n: int) -> None:
        while self.next < min(n, len(self.batches)):
            k = self.batches[self.next]
            self.emb.prefetch(k, host=host_ids(k))
            self.next += 1

    def train(self, n: int, before_backward: Optional[Callable[[], None]] = None) -> None:
        """Train ``n`` batches on both, comparing outputs; prefetch keeps L batches ahead."""
        for _ in range(n):
            self.prefetch_upto(self.step + self.lookahead + 1)
            k = self.batches[self.step]
            out, expect = self.emb(k).values(), self.ref(k)
            torch.testing.assert_close(out, expect, atol=0, rtol=0, msg=f"step {self.step}")
            grad = torch.randn(out.shape, generator=self.grads).to(self.device)
            if before_backward is not None:
                before_backward()
            out.backward(grad)
            expect.backward(grad)
            self.step += 1

    def reset(self) -> None:
        """Drop the prefetched batches; training resumes at the next untrained one."""
        self.emb.reset_window()
        self.next = self.step

    def check(self) -> Dict[str, Any]:
        stats = self.emb.stats()
        assert all(s["train_misses"] == 0 for s in stats.values()), stats
        weights = self.emb.table_weights()
        for name, w in self.ref.weights().items():
            torch.testing.assert_close(weights[name], w, atol=0, rtol=0, msg=name)
        states = self.emb.optimizer_states()
        for name, ref_states in self.ref.states().items():
            for got, want in zip(states[name].values(), ref_states):
                torch.testing.assert_close(got, want.view(got.shape), atol=0, rtol=0, msg=name)
        return stats


# ---------------------------------------------------------------------------- engine vs full-table TBE
def case_matches_full_table(device: torch.device, optimizer: EmbOptimType, lookahead: int, weighted: bool) -> None:
    c = Case(device, [8, 16, 8], optimizer, lookahead, lookahead + 4, weighted=weighted)
    assert len(c.emb.groups) == 2
    c.train(len(c.batches))
    stats = c.check()
    assert sum(s["evictions"] for s in stats.values()) > 0


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_SGD, EmbOptimType.ADAM],
                         ids=lambda o: o.name)
@pytest.mark.parametrize("lookahead", [0, 3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_engine_matches_full_table(optimizer: EmbOptimType, lookahead: int, weighted: bool) -> None:
    case_matches_full_table(CUDA, optimizer, lookahead, weighted)


def test_staging_ring_is_pinned_and_store_pageable() -> None:
    c = Case(CUDA, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30)
    c.train(len(c.batches))
    c.check()
    for g in c.emb.groups.values():
        for ring in (g.mover.ring_in, g.mover.ring_out):
            assert ring is not None and all(b.index.is_pinned() for b in ring.buffers)
        assert not g.store.weights.is_pinned()  # the backing store stays pageable


# ---------------------------------------------------------------------------- stream ordering (races)
def case_victims_wait_for_backward(device: torch.device) -> None:
    """Hazard 1: every update is delayed; victims must be read after it, slots written after it."""
    c = Case(device, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=25, capacity_lookahead=2)
    c.train(len(c.batches), before_backward=lambda: _delay(device))
    c.check()


def case_reset_waits_for_training_stream(device: torch.device) -> None:
    """After reset_window the released slots may still be in use by a late backward."""
    c = Case(device, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=40, capacity_lookahead=0)
    for _ in range(4):
        c.train(5, before_backward=lambda: _delay(device))
        c.reset()  # the next plans may evict every slot the delayed backward updates
    c.train(len(c.batches) - c.step)
    c.check()


def case_load_orders_both_streams(device: torch.device, delay_side: bool) -> None:
    """A live load: the refresh must wait for training, and training for the refresh."""
    c = Case(device, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30, capacity_lookahead=2)
    c.train(10, before_backward=lambda: _delay(device))
    new = {name: w + 0.25 for name, w in c.emb.table_weights().items()}
    if delay_side:  # the refresh's copies run late: batches planned before the load must wait for them
        for g in c.emb.groups.values():
            _late(g.mover, device)
    c.emb.load_table_weights(new)
    c.ref.load(new)
    c.train(len(c.batches) - c.step, before_backward=lambda: _delay(device))
    c.check()


def _late(mover: Any, device: torch.device) -> None:
    """Make ``mover``'s refreshes start with a delay on its side stream."""
    refresh = mover.refresh

    def late_refresh(rows: torch.Tensor, slots: torch.Tensor) -> None:
        _delay(device, mover.stream)
        refresh(rows, slots)

    mover.refresh = late_refresh


def test_victims_wait_for_backward() -> None:
    case_victims_wait_for_backward(CUDA)


def test_reset_waits_for_training_stream() -> None:
    case_reset_waits_for_training_stream(CUDA)


@pytest.mark.parametrize("delay_side", [False, True], ids=["training-late", "side-late"])
def test_load_orders_both_streams(delay_side: bool) -> None:
    case_load_orders_both_streams(CUDA, delay_side)


# ---------------------------------------------------------------------------- no host synchronization
def _syncs(fn: Callable[[], Any]) -> int:
    """Synchronizing CUDA calls ``fn`` makes (``torch.cuda.set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_host_copy_waits_only_for_the_stream_that_made_the_ids() -> None:
    kjt = power_law_stream(ROWS, 1, 16, seed=1)[0].to(CUDA)
    intake = torch.cuda.Stream()
    intake.wait_stream(torch.cuda.current_stream())
    _delay(CUDA)  # training work queued on the current stream
    host = host_ids(kjt, intake)
    host.wait()
    assert not torch.cuda.current_stream().query()  # the copy did not wait for training
    assert host.values.is_pinned() and torch.equal(host.values, kjt.values().cpu())
    torch.cuda.synchronize()


def test_engine_steady_state_step_never_synchronizes() -> None:
    """Prefetch (checks, plan, moves), forward and backward of a steady-state step do not
    synchronize the host with the device (sync debug mode "error")."""
    c = Case(CUDA, [8, 16, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30, weighted=True)
    c.train(10)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            k = c.batches[c.step]
            c.emb.prefetch(c.batches[c.next], host=host_ids(c.batches[c.next]))
            c.next += 1
            out = c.emb(k).values()
            c.step += 1
            torch.cuda.set_sync_debug_mode("default")
            c.ref(k).backward(torch.ones_like(out))  # the reference's own kernels may synchronize
            torch.cuda.set_sync_debug_mode("error")
            out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    c.check()


def test_engine_step_synchronizes_no_more_than_full_table_tbe() -> None:
    c = Case(CUDA, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30)
    c.train(10)
    grad = torch.ones(16, 24, device=CUDA)

    def sp_step() -> None:
        k = c.batches[c.step]
        c.emb.prefetch(c.batches[c.next], host=host_ids(c.batches[c.next]))
        c.next += 1
        c.emb(k).values().backward(grad)
        c.step += 1

    full = [_syncs(lambda: c.ref(c.batches[i]).backward(grad)) for i in range(10, 15)]
    ours = [_syncs(sp_step) for _ in range(5)]
    # the reference slices the batch per table (KeyedJaggedTensor.__getitem__ reads lengths)
    assert max(ours) <= min(full), (ours, full)


# ---------------------------------------------------------------------------- DMP and the pipeline
def _process_group() -> Any:
    """A world-size-1 NCCL group (a new one when a gloo world group exists already)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)
        return dist.GroupMember.WORLD
    if dist.get_backend() == "nccl":
        return dist.GroupMember.WORLD
    return dist.new_group(backend="nccl")


def _dlrm_spec() -> Any:
    from torchrec_scratchpipe.training import ModelSpec

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"], pooling=p)
        for i, (n, p) in enumerate([(4000, PoolingType.SUM), (2500, PoolingType.MEAN), (900, PoolingType.SUM)])
    ]
    return ModelSpec(tables, dense_arch=[16], over_arch=[16, 1], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                     learning_rate=0.1, batch_size=64, pooling=2.0)


def _dlrm_batches(n: int) -> List[Any]:
    from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig

    log = SyntheticClickLog(SyntheticConfig(num_embeddings=[4000, 2500, 900], batch_size=64, pooling=2, min_pooling=0, seed=1))
    return [log.batch(i) for i in range(n)]


def _pipeline_run(device: torch.device, choice: Any, batches: List[Any], pg: Any,
                  measure: Optional[Callable[[Callable[[], Any]], int]] = None) -> Dict[str, Any]:
    from torchrec_scratchpipe.distributed import cache_stats
    from torchrec_scratchpipe.training import build_trainer, local_table_weights

    spec = _dlrm_spec()
    t = build_trainer(spec, choice, device, spec.initial_state(0), pg=pg)
    it = iter(batches)
    losses: List[float] = []
    syncs: List[int] = []
    while True:
        try:
            if measure is not None and len(losses) >= 6:  # steady state
                holder: List[Any] = []
                syncs.append(measure(lambda: holder.append(t.pipeline.progress(it))))
                out = holder[0]
            else:
                out = t.pipeline.progress(it)
        except StopIteration:
            break
        losses.append(float(out[0]))
    weights = local_table_weights(t.model, [tb.name for tb in spec.tables])
    return {"losses": losses, "weights": weights, "syncs": syncs, "stats": _counters(cache_stats(t.model))}


def _counters(stats: Any) -> List[Dict[str, Any]]:
    """Every engine counter dict inside ``cache_stats``' nested result."""
    if isinstance(stats, dict) and "train_misses" in stats:
        return [stats]
    values = stats.values() if isinstance(stats, dict) else stats if isinstance(stats, (list, tuple)) else []
    return [d for v in values for d in _counters(v)]


def case_pipeline_matches_fused(device: torch.device, pg: Any) -> None:
    from torchrec_scratchpipe.training import KernelChoice

    batches = _dlrm_batches(24)
    ref = _pipeline_run(device, KernelChoice("fused"), batches, pg)
    for L, H in [(1, 1), (4, 8)]:
        sp = _pipeline_run(device, KernelChoice("scratchpipe", 0.1, lookahead=L, horizon=H), batches, pg)
        assert len(sp["losses"]) == len(ref["losses"]) == len(batches)
        for a, b in zip(sp["losses"], ref["losses"]):
            assert a == b, (L, sp["losses"], ref["losses"])
        for name, w in ref["weights"].items():
            torch.testing.assert_close(sp["weights"][name].cpu(), w.cpu(), atol=0, rtol=0, msg=f"L={L} {name}")
        assert sp["stats"] and all(d["train_misses"] == 0 for d in sp["stats"]), sp["stats"]
        assert sum(d["evictions"] for d in sp["stats"]) > 0, sp["stats"]  # the scratchpads were too small


def test_pipeline_matches_fused() -> None:
    case_pipeline_matches_fused(CUDA, _process_group())


def test_pipeline_steady_state_adds_no_synchronization() -> None:
    """Goal: no host synchronization in ``progress()``. TorchRec's own input distribution may
    synchronize (it reads split sizes); ScratchPipe must add nothing on top of ``fused``."""
    from torchrec_scratchpipe.training import KernelChoice

    pg = _process_group()
    batches = _dlrm_batches(16)
    ref = _pipeline_run(CUDA, KernelChoice("fused"), batches, pg, measure=_syncs)
    sp = _pipeline_run(CUDA, KernelChoice("scratchpipe", 0.1, lookahead=2, horizon=4), batches, pg, measure=_syncs)
    assert sp["syncs"] and max(sp["syncs"]) <= min(ref["syncs"]), (sp["syncs"], ref["syncs"])


if __name__ == "__main__":  # rehearse the cases' logic on CPU
    cpu = torch.device("cpu")
    case_matches_full_table(cpu, EmbOptimType.EXACT_ROWWISE_ADAGRAD, 3, True)
    case_victims_wait_for_backward(cpu)
    case_reset_waits_for_training_stream(cpu)
    case_load_orders_both_streams(cpu, False)
    case_load_orders_both_streams(cpu, True)
    from torchrec_scratchpipe.training import init_single_process_group

    case_pipeline_matches_fused(cpu, init_single_process_group())
    print("all cases pass on CPU")
