"""Background planning: same results as inline planning, errors surface, scratchpad writes are safe."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from engine_utils import make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags
from torchrec_scratchpipe.core.worker import PlanWorker

ROWS = [400, 90]


def train(background: bool, steps: int = 60, lookahead: int = 2):
    stream = power_law_stream(ROWS, steps, 12, seed=3)
    cfg = ScratchPipeConfig(
        cache_rows=window_capacity(stream, ROWS, lookahead), lookahead=lookahead, horizon=lookahead + 2,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, background_planning=background,
    )
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [8, 8]), cfg)
    emb.load_table_weights({n: torch.linspace(-1, 1, w.numel()).view_as(w) for n, w in emb.table_weights().items()})
    outs = []
    ahead = lookahead + 2  # = H: the batches within the horizon guide victim choice
    for k in stream[: ahead + 1]:
        emb.prefetch(k)
    for i, k in enumerate(stream):
        out = emb(k).values()
        out.square().sum().backward()
        outs.append(out.detach())
        if i + ahead + 1 < len(stream):
            emb.prefetch(stream[i + ahead + 1])
    return emb, outs


def test_background_planning_gives_the_same_plans_and_numbers() -> None:
    bg, bg_outs = train(background=True)
    inline, inline_outs = train(background=False)
    for a, b in zip(bg_outs, inline_outs):
        assert torch.equal(a, b)  # same plans, same slots, same summation order
    keys = ("plan_misses", "evictions", "h2d_rows", "d2h_rows", "peak_held_rows", "train_misses")
    s_bg, s_in = bg.stats()["dim8_sum"], inline.stats()["dim8_sum"]
    assert {k: s_bg[k] for k in keys} == {k: s_in[k] for k in keys}
    assert s_bg["evictions"] > 0 and s_bg["train_misses"] == 0
    assert s_bg["planner_background_s"] > 0 and s_in["planner_background_s"] == 0
    for name, w in bg.table_weights().items():
        assert torch.equal(w, inline.table_weights()[name])


def test_worker_runs_jobs_in_order_and_reraises() -> None:
    w = PlanWorker()
    seen = []
    w.submit(lambda: seen.append(threading.current_thread().name), background=True)
    w.submit(lambda: seen.append(len(seen)), background=True)  # waits for the first job
    w.wait()
    assert seen[0].startswith("scratchpipe-plan") and seen[1] == 1

    def boom() -> None:
        raise RuntimeError("planner failed")

    w.submit(boom, background=True)
    with pytest.raises(RuntimeError, match="planner failed"):
        w.wait()
    w.submit(lambda: seen.append("after"), background=True)  # still usable
    w.wait()
    assert seen[-1] == "after"


def test_inline_job_runs_at_once_after_the_background_one() -> None:
    w = PlanWorker()
    seen = []
    w.submit(lambda: seen.append("background"), background=True)
    w.submit(lambda: seen.append(threading.current_thread() is threading.main_thread()), background=False)
    assert seen == ["background", True]


def test_automatic_choice_follows_batch_size() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_scratchpipe.core.config import BACKGROUND_MIN_IDS

    tables = make_tables([5000], [8])
    g = torch.Generator().manual_seed(0)
    for n, expect in ((BACKGROUND_MIN_IDS - 1, False), (BACKGROUND_MIN_IDS, True)):
        emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=5000, lookahead=1))
        batches = [
            KeyedJaggedTensor.from_lengths_sync(["f0"], torch.randint(0, 5000, (n,), generator=g), torch.ones(n, dtype=torch.int64))
            for _ in range(4)
        ]
        for k in batches[:2]:
            emb.prefetch(k)
        for i, k in enumerate(batches):
            emb(k).values().sum().backward()
            if i + 2 < len(batches):
                emb.prefetch(batches[i + 2])
        assert (emb.stats()["dim8_sum"]["planner_background_s"] > 0) is expect, n


def test_scratchpad_write_between_forward_and_backward() -> None:
    """The background planner inserts rows into unheld slots while a batch awaits backward."""
    emb, _ = train(background=False, steps=3, lookahead=0)
    pad = emb.groups["dim8_sum"].pad
    slots, offsets = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3])
    before = pad.weights.detach().clone()
    out = pad(slots, offsets)
    incoming = {"weights": torch.full((1, 8), 7.0), "momentum1": torch.full((1,), 3.0)}
    pad.write(torch.tensor([5]), incoming)  # slot 5 is not in this batch
    out.sum().backward()  # would fail if the write had bumped autograd's version counter
    assert torch.equal(pad.weights[5], incoming["weights"][0])
    assert not torch.equal(pad.weights[:2], before[:2])  # the batch's rows were updated


def test_copies_start_with_an_idle_worker() -> None:
    emb, _ = train(background=True, steps=4)
    twin = copy.deepcopy(emb)
    assert emb._worker._pool is not None and twin._worker._pool is None
    for name, w in twin.table_weights().items():
        assert torch.equal(w, emb.table_weights()[name])
