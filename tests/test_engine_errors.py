"""Bad input gets a clear ValueError, raised before any state changes."""

from __future__ import annotations

import copy
from typing import Any, Dict

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engine_utils import make_tables, power_law_stream
from torchrec_scratchpipe import CapacityError, ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [30, 20]


def trained_engine() -> ScratchPipeEmbeddingBags:
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), ScratchPipeConfig(cache_rows=12, lookahead=1))
    stream = power_law_stream(ROWS, 6, 2, max_len=3)
    for k in stream[:2]:
        emb.prefetch(k)
    for i, k in enumerate(stream[:4]):
        emb(k).values().sum().backward()
        emb.prefetch(stream[i + 2])
    return emb


def snapshot(emb: ScratchPipeEmbeddingBags) -> Dict[str, Any]:
    g = emb.groups["dim4_sum"]
    return {
        "stats": copy.deepcopy(emb.stats()),
        "row_to_slot": g.planner.row_to_slot.clone(),
        "last_use": g.planner.last_use.clone(),
        "held": g.planner.held_slots(),
        "recency": (g.planner.queue.head, g.planner.queue.tail),
        "pad": g.pad.weights.detach().clone(),
        "store": g.store.weights.clone(),
        "queue": len(emb._queue),
        "window": len(g.window),
    }


def assert_untouched(emb: ScratchPipeEmbeddingBags, before: Dict[str, Any]) -> None:
    after = snapshot(emb)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def kjt(values, lengths, keys=("f0", "f1"), offsets=None) -> KeyedJaggedTensor:
    if offsets is not None:
        return KeyedJaggedTensor(keys=list(keys), values=torch.tensor(values), offsets=torch.tensor(offsets))
    return KeyedJaggedTensor(keys=list(keys), values=torch.tensor(values), lengths=torch.tensor(lengths))


BAD = {
    "negative id": (kjt([1, -3, 2], [1, 1, 1, 0]), r"id -3 of feature 'f0' is out of range for table 't0' with 30 rows"),
    "id past the end": (kjt([1, 3, 20], [1, 1, 1, 0]), r"id 20 of feature 'f1' is out of range for table 't1' with 20 rows"),
    "lengths vs values": (kjt([1, 2, 3], [1, 1, 2, 0]), r"lengths sum to 4 but there are 3 ids"),
    "negative length": (kjt([1, 2], [3, -1, 0, 0]), r"feature 'f0' \(table 't0'\) has a negative length -1"),
    "uneven lengths": (kjt([1, 2, 3], [1, 1, 1]), r"3 lengths cannot split evenly over 2 features"),
    "decreasing offsets": (kjt([1, 2, 3], None, offsets=[0, 2, 1, 3, 3]), r"offsets must start at 0 and never decrease"),
    "wrong keys": (kjt([1, 2], [1, 1], keys=("f1", "f0")), r"do not match the engine's features \['f0', 'f1'\]"),
    "float ids": (KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1])), r"ids must be a 1-D int32/int64 tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("entry", ["prefetch", "forward"])
def test_bad_batch_is_rejected_without_state_change(case: str, entry: str) -> None:
    emb = trained_engine()
    before = snapshot(emb)
    batch, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        if entry == "prefetch":
            emb.prefetch(batch)
        else:
            emb.reset_window()
            before = snapshot(emb)
            emb(batch)
    assert_untouched(emb, before)


def test_batch_larger_than_scratchpad_names_group_rows_and_capacity() -> None:
    emb = trained_engine()
    before = snapshot(emb)
    big = kjt(list(range(20)) + list(range(10)), [20, 0, 10, 0])
    with pytest.raises(CapacityError, match=r"table group 'dim4_sum'.*needs 30 distinct rows but the scratchpad has 12 slots"):
        emb.prefetch(big)
    assert_untouched(emb, before)


def test_forward_out_of_order_is_rejected() -> None:
    emb = trained_engine()
    before = snapshot(emb)
    with pytest.raises(ValueError, match="not the oldest prefetched one"):
        emb(kjt([0, 0], [1, 0, 1, 0]))
    assert_untouched(emb, before)


def test_unsupported_optimizer_on_cpu() -> None:
    with pytest.raises(ValueError, match="ADAM on a cpu device.*EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD"):
        ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), ScratchPipeConfig(optimizer=EmbOptimType.ADAM))


def test_unknown_planner_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRATCHPIPE_PLANNER", "gpu")
    with pytest.raises(ValueError, match="SCRATCHPIPE_PLANNER must be one of 'native', 'device', 'torch'"):
        ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), ScratchPipeConfig(cache_rows=8))


@pytest.mark.parametrize("name", ["native", "device", "torch"])
def test_planner_follows_the_config_over_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrec_scratchpipe.core import native

    if name == "native" and not native.available():
        pytest.skip("native planner not built")
    monkeypatch.setenv("SCRATCHPIPE_PLANNER", "torch" if name != "torch" else "device")
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), ScratchPipeConfig(cache_rows=8, planner=name))
    assert [g.planner.kind for g in emb.groups.values()] == [name]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cache_rows": 0}, "cache_rows must be positive"),
        ({"load_factor": 0.0}, r"load_factor must be a fraction of the table.s rows in \(0, 1\]"),
        ({"load_factor": float("inf")}, "load_factor must be a fraction"),
        ({"load_factor": 1.5}, "load_factor must be a fraction"),
        ({"lookahead": -1}, "invalid window lookahead=-1, horizon=None: need 0 <= lookahead"),
        ({"lookahead": 3, "horizon": 2}, "invalid window lookahead=3, horizon=2: need 0 <= lookahead <= horizon"),
        ({"lookahead": 1, "horizon": 2000}, "horizon <= 1024"),
        ({"victim_policy": "mru"}, "victim_policy must be one of"),
        ({"planner": "gpu"}, "ScratchPipeConfig.planner must be one of 'native', 'device', 'torch'"),
    ],
)
def test_bad_config(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScratchPipeConfig(**kwargs)


def test_load_with_wrong_shape_changes_nothing() -> None:
    emb = trained_engine()
    before = snapshot(emb)
    with pytest.raises(ValueError, match=r"table 't1' weights: shape \(3, 4\) does not match \(20, 4\)"):
        emb.load_table_weights({"t0": torch.zeros(30, 4), "t1": torch.zeros(3, 4)})
    assert_untouched(emb, before)


def test_load_refreshes_resident_rows() -> None:
    emb = trained_engine()
    new = {"t0": torch.randn(30, 4), "t1": torch.randn(20, 4)}
    emb.load_table_weights(new)
    g = emb.groups["dim4_sum"]
    rows, slots = g.resident()
    assert rows.numel() > 0
    torch.testing.assert_close(g.pad.weights[slots], torch.cat([new["t0"], new["t1"]])[rows])
    for name, w in emb.table_weights().items():
        torch.testing.assert_close(w, new[name])


@pytest.mark.parametrize("lookahead,horizon", [(-1, None), (3, 2), (1, 5000)])
def test_bad_window_changes_nothing(lookahead: int, horizon: Any) -> None:
    """set_window validates (defaults.check_window) before it waits, clears or fences anything."""
    emb = trained_engine()
    before = snapshot(emb)
    config = emb.config
    with pytest.raises(ValueError, match=f"invalid window lookahead={lookahead}, horizon={horizon}"):
        emb.set_window(lookahead, horizon)
    assert_untouched(emb, before)
    assert emb.config is config and (config.lookahead, config.horizon) == (1, None)
    assert [(g.window.lookahead, g.window.horizon) for g in emb.groups.values()] == [(1, 1)]


def test_capacity_is_checked_once_per_batch_and_group() -> None:
    """prepare() makes the one check per group; enqueue and planning do not repeat it."""
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), ScratchPipeConfig(cache_rows=12, lookahead=1))
    window = emb.groups["dim4_sum"].window
    calls = []
    check = window.check_fits
    window.check_fits = lambda rows: (calls.append(rows.numel()), check(rows))[1]  # type: ignore[method-assign]
    stream = power_law_stream(ROWS, 4, 2, max_len=3, seed=1)
    for k in stream:
        emb.prefetch(k)
    for k in stream:
        emb(k).values().sum().backward()
    assert len(calls) == len(stream)


def test_window_alone_refuses_a_batch_larger_than_the_scratchpad() -> None:
    from torchrec_scratchpipe.core.plan import SlotPlanner
    from torchrec_scratchpipe.core.window import PlanWindow

    w = PlanWindow(SlotPlanner(100, 4), lookahead=1, name="cache 'x'")
    with pytest.raises(CapacityError, match="cache 'x': one batch needs 5 distinct rows but the scratchpad has 4 slots"):
        w.push(torch.arange(5))
    assert len(w) == 0 and w.next_step == 0


def test_set_window_leaves_the_users_config_alone() -> None:
    import dataclasses

    cfg = ScratchPipeConfig(cache_rows=12, lookahead=1)
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), cfg)
    other = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 4]), cfg)  # one config, two engines
    emb.set_window(2, 5)
    assert (cfg.lookahead, cfg.horizon) == (1, None)
    assert (emb.config.lookahead, emb.config.effective_horizon) == (2, 5) and emb.config.cache_rows == 12
    assert (other.config.lookahead, other.config.effective_horizon) == (1, 1)
    assert [(g.window.lookahead, g.window.horizon) for g in emb.groups.values()] == [(2, 5)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lookahead = 3  # type: ignore[misc]
