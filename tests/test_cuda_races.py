"""Mutation tests of the CUDA ordering waits, and the host running ahead (issue 19, finding 6).

Each ordering wait between the training stream, the mover's side stream and the pinned
staging buffers is disabled in turn (monkeypatched in the test only), with one stream
delayed by ``torch.cuda._sleep`` so that the race it guards opens wide: the run must then
differ from full-table FBGEMM, while the unpatched run equals it. Unlike ``Case.train``
in ``test_cuda.py``, these runs copy batch ids to the host on an intake stream of their
own and compare outputs only at the end, so nothing on the host waits for the training
stream between steps (which would drain the delayed work and hide the race).

CUDA only: skipped here. Written without a GPU to run them on; see docs/gpu.md.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from test_cuda import CUDA, Case, _delay
from torchrec_scratchpipe.bench.timing import StepTimer
from torchrec_scratchpipe.core.mover import Mover
from torchrec_scratchpipe.core.staging import StagingRing
from torchrec_scratchpipe.core.validate import host_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class RaceCase(Case):
    """``Case`` whose host never waits for the training stream between steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        torch.cuda.synchronize()  # the batches are on the device; from here on nothing waits
        self.intake = torch.cuda.Stream()
        self.outs: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def prefetch_upto(self, n: int) -> None:
        while self.next < min(n, len(self.batches)):
            k = self.batches[self.next]
            self.emb.prefetch(k, host=host_ids(k, self.intake))
            self.next += 1

    def train(self, n: int, before_backward: Optional[Callable[[], None]] = None) -> None:
        for _ in range(n):
            self.prefetch_upto(self.step + self.lookahead + 1)
            k = self.batches[self.step]
            out, expect = self.emb(k).values(), self.ref(k)
            self.outs.append((out.detach().clone(), expect.detach().clone()))
            grad = torch.randn(out.shape, generator=self.grads).to(self.device)
            if before_backward is not None:
                before_backward()
            out.backward(grad)
            expect.backward(grad)
            self.step += 1

    def worst(self) -> float:
        """Largest difference from the reference: outputs of every step, then the tables."""
        torch.cuda.synchronize()
        diffs = [float((a - b).abs().max()) for a, b in self.outs if a.numel()]
        weights = self.emb.table_weights()
        diffs += [float((weights[n] - w).abs().max()) for n, w in self.ref.weights().items()]
        return max(diffs)


def _victims(case: RaceCase) -> None:
    """Every backward runs late: victims must be read, and slots written, after it."""
    case.train(len(case.batches), before_backward=lambda: _delay(CUDA))


def _reset(case: RaceCase) -> None:
    """Resets while backwards run late: released slots may still be updated."""
    for _ in range(4):
        case.train(5, before_backward=lambda: _delay(CUDA))
        case.emb.reset_window()
        case.next = case.step
    case.train(len(case.batches) - case.step)


def _load(case: RaceCase) -> None:
    """A live load behind late backwards, its refresh copies late on the side stream."""
    case.train(10, before_backward=lambda: _delay(CUDA))
    new = {name: w + 0.25 for name, w in case.emb.table_weights().items()}
    for g in case.emb.groups.values():
        _delay(CUDA, g.mover.stream)
    case.emb.load_table_weights(new)
    case.ref.load(new)
    case.train(len(case.batches) - case.step, before_backward=lambda: _delay(CUDA))


def _no_refresh_wait(self: Mover, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """``Mover.refresh`` without its last line (the training stream waiting for it)."""
    assert self.ring_in is not None
    self.land_all()
    self.fence()
    with self._side():
        incoming = self._stage_in(rows, slots)
        self._wait_retired()
        for s, packed in incoming:
            self._insert(s, packed)


def _acquire_without_wait(self: StagingRing, land: Any = None) -> Any:
    """``StagingRing.acquire`` that hands a buffer out before its last copy completed."""
    buf = self.buffers[self._next]
    self._next = (self._next + 1) % len(self.buffers)
    buf.done = None
    if buf.write_back is not None and land is not None:
        land(buf)
    return buf


#: (name, what to patch, the scenario that needs it, small rings to force reuse)
MUTATIONS = [
    ("wait_retired", (Mover, "_wait_retired", lambda self: None), _victims, False),
    ("fence", (Mover, "fence", lambda self: None), _reset, False),
    ("staging_done", (StagingRing, "acquire", _acquire_without_wait), _victims, True),
    ("refresh_wait", (Mover, "refresh", _no_refresh_wait), _load, False),
]


def _case(small_rings: bool) -> RaceCase:
    c = RaceCase(CUDA, [8, 8, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30, capacity_lookahead=0)
    if small_rings:  # two buffers of a few rows each way: every move reuses them
        from torchrec_scratchpipe.core.mover import staging_rings

        for g in c.emb.groups.values():
            g.mover = Mover(g.store, g.pad, g.stats, rings=staging_rings(g.store, g.capacity, buffer_bytes=1 << 10))
    return c


@pytest.mark.parametrize("name,patch,scenario,small_rings", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_wait_is_needed(monkeypatch: pytest.MonkeyPatch, name: str, patch: Any, scenario: Any, small_rings: bool) -> None:
    intact = _case(small_rings)
    scenario(intact)
    assert intact.worst() <= 1e-5, f"{name}: the intact run must equal full-table FBGEMM"
    monkeypatch.setattr(*patch)
    mutant = _case(small_rings)
    scenario(mutant)
    assert mutant.worst() > 1e-3, f"{name}: disabling this wait changed nothing: the test does not exercise it"


def test_host_runs_ahead_of_the_device() -> None:
    """A steady-state step (host copy, plan, moves, forward, backward) issued behind a long
    delay returns while the device is still busy: nothing in it waited for the device."""
    c = RaceCase(CUDA, [8, 16, 8], EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2, 4, steps=30, weighted=True)
    c.train(10)
    torch.cuda.synchronize()
    timer = StepTimer(CUDA)
    timer.begin()
    _delay(CUDA)
    for _ in range(3):  # ScratchPipe only: the reference's own kernels may synchronize
        c.prefetch_upto(c.step + c.lookahead + 1)
        out = c.emb(c.batches[c.step]).values()
        out.backward(torch.ones_like(out))
        c.step += 1
    timer.end()
    assert not torch.cuda.current_stream().query(), "the host waited for the device within a step"
    assert len(timer.flush()) == 1 and timer.syncs == 1


@pytest.mark.parametrize("handed", [True, False], ids=["handed", "not_handed"])
def test_a_batch_prepared_on_another_stream_is_handed_to_the_forward_stream(handed: bool) -> None:
    """``PreparedBatch.hand_to`` (what ``commit(..., forward_stream)`` does): a batch whose
    device tensors are made on a prefetch stream, behind a delay, trains right on the forward
    stream; without the hand-off the forward reads its bag offsets before they exist."""
    from engine_utils import FullTableReference, make_tables, power_law_stream

    from torchrec_scratchpipe.core.config import ScratchPipeConfig
    from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags

    device = torch.device("cuda")
    rows = [500, 300]
    tables = make_tables(rows, [8, 8])
    emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=256, lookahead=0,
                                                             optimizer=EmbOptimType.EXACT_SGD), device)
    ref = FullTableReference(tables, EmbOptimType.EXACT_SGD, lr=0.01, device=device)
    ref.load(emb.table_weights())
    kjt = power_law_stream(rows, 1, batch=64, seed=9)[0]
    prefetch = torch.cuda.Stream()
    with torch.cuda.stream(prefetch):
        _delay(device)  # the prefetch stream is still busy when the forward is issued
        on_device = kjt.to(device, non_blocking=True)
        prepared = emb.prepare(on_device, host=host_ids(kjt))
    if handed:
        prepared.hand_to(torch.cuda.current_stream())
    emb.enqueue(prepared)
    out = emb(on_device).values()
    torch.cuda.synchronize()
    same = torch.equal(out, ref(kjt.to(device)))
    assert same if handed else not same
