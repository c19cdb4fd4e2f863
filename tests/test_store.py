"""The packed backing store: typed views, gather/scatter of whole rows, pack/unpack.

The truth is the unpacked one: each value (weights, every optimizer state) kept as its
own tensor and indexed with plain PyTorch; the packed store must agree bit for bit on
both row-copy paths (native ``memcpy`` per row and ``index_select``/``index_copy_``).
"""

from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType

from torchrec_scratchpipe.core import layout as layout_mod
from torchrec_scratchpipe.core import native
from torchrec_scratchpipe.core.layout import OPTIMIZER_STATES, EmbOptimType, RowLayout
from torchrec_scratchpipe.core.store import BackingStore, empty_rows, gather_rows, row_views, scatter_rows

PATHS = [
    pytest.param("0", id="pytorch"),
    pytest.param("1", id="native", marks=pytest.mark.skipif(not native.available(), reason="native op not built")),
]


def _fill(store: BackingStore, seed: int) -> Dict[str, torch.Tensor]:
    """Random values written through the typed views; returns unpacked copies (the truth)."""
    g = torch.Generator().manual_seed(seed)
    views = {"weights": store.weights, **store.states}
    for v in views.values():
        v.copy_(torch.randn(v.shape, generator=g).to(v.dtype))
    return {k: v.clone() for k, v in views.items()}


def _mixed_layout(monkeypatch: pytest.MonkeyPatch, optimizer: EmbOptimType, dim: int) -> RowLayout:
    """A layout with 2-byte weights and 4-byte state (FP16 rows), whatever WEIGHT_DTYPES holds now."""
    monkeypatch.setitem(layout_mod.WEIGHT_DTYPES, "FP16", (torch.float16, SparseType.FP16))
    return RowLayout(optimizer, dim, torch.float16)


def _layouts(monkeypatch: pytest.MonkeyPatch, kind: str, optimizer: EmbOptimType) -> RowLayout:
    if kind == "fp32":
        return RowLayout(optimizer, 8)
    return _mixed_layout(monkeypatch, optimizer, 4)  # 8 B of FP16 weights, then 4-byte state


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_value"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["fp32", "fp16_weights"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_STATES), ids=lambda o: o.name)
def test_gather_scatter_round_trip(
    optimizer: EmbOptimType, kind: str, path: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", path)
    layout = _layouts(monkeypatch, kind, optimizer)
    store = BackingStore([7, 11, 5], layout, packed=packed)
    assert store.nbytes() == 23 * (layout.bytes_per_row if packed else layout.weight_bytes + layout.state_bytes)
    assert sorted(store.states) == sorted(layout.state_names)
    if packed:  # every value is a view of the one packed allocation
        assert store.packed is not None and store.weights.data_ptr() == store.packed.data_ptr()
        assert all(v.untyped_storage().data_ptr() == store.packed.data_ptr() for v in store.states.values())
    else:  # what ShardedTensor local shards need
        assert store.packed is None and all(v.is_contiguous() for v in [store.weights, *store.states.values()])
    truth = _fill(store, seed=1)
    rows, dest = torch.tensor([20, 3, 14, 0, 9]), torch.tensor([1, 22, 7, 13, 4])

    buffer = store.empty_rows(8)
    got = store.gather(rows, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and got.shape == (5, layout.bytes_per_row)
    for name, view in store.views(got).items():
        assert torch.equal(view, truth[name][rows]), name
    assert torch.equal(store.gather(rows), got)  # without a buffer: the same rows
    twin = BackingStore([23], layout, packed=not packed)
    for name, view in {"weights": twin.weights, **twin.states}.items():
        view.copy_(truth[name])
    assert torch.equal(twin.gather(rows), got)  # both layouts stage the same bytes (padding zero)

    store.scatter(dest, got)
    for name, view in {"weights": store.weights, **store.states}.items():
        expect = truth[name].clone()
        expect[dest] = truth[name][rows]
        assert torch.equal(view, expect), name


@pytest.mark.parametrize("kind", ["fp32", "fp16_weights"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_STATES), ids=lambda o: o.name)
def test_values_sit_at_their_layout_offsets(optimizer: EmbOptimType, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each view reads exactly the bytes ``RowLayout`` assigns it; padding stays untouched."""
    layout = _layouts(monkeypatch, kind, optimizer)
    store = BackingStore([4], layout)
    truth = _fill(store, seed=2)
    covered = torch.zeros(layout.bytes_per_row, dtype=torch.bool)
    for v in layout.values:
        raw = store.packed[:, v.offset : v.offset + v.nbytes].contiguous().view(v.dtype).view((4,) + v.shape)
        assert torch.equal(raw, truth[v.name]), v.name
        assert not covered[v.offset : v.offset + v.nbytes].any()
        covered[v.offset : v.offset + v.nbytes] = True
    assert (store.packed[:, ~covered] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["fp32", "fp16_weights"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_STATES), ids=lambda o: o.name)
def test_unpack_and_pack_through_strided_views(
    optimizer: EmbOptimType, kind: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the mover does with a scratchpad: scatter each value of packed rows into its own
    slot table (insert), and gather slot rows into each value of new packed rows (victims)."""
    monkeypatch.setenv("SCRATCHPIPE_NATIVE", path)
    layout = _layouts(monkeypatch, kind, optimizer)
    store = BackingStore([9], layout)
    truth = _fill(store, seed=3)
    slots_tables = {v.name: torch.zeros((6,) + v.shape, dtype=v.dtype) for v in layout.values}
    rows, slots = torch.tensor([8, 2, 5]), torch.tensor([4, 0, 3])
    for name, view in store.views(store.gather(rows)).items():
        scatter_rows(slots_tables[name], slots, view)  # strided source
        expect = torch.zeros_like(slots_tables[name])
        expect[slots] = truth[name][rows]
        assert torch.equal(slots_tables[name], expect), name

    packed = store.empty_rows(3)
    for name, view in store.views(packed).items():
        assert gather_rows(slots_tables[name], slots, out=view).data_ptr() == view.data_ptr()  # strided target
    assert torch.equal(packed, store.packed[rows])  # values and zero padding, byte for byte


def test_typed_views_serve_table_users() -> None:
    """Init, loads and reads through strided table views write the packed rows in place."""
    layout = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 4)
    store = BackingStore([3, 5], layout)
    w1 = store.table_view(store.weights, 1)
    w1.uniform_(-1.0, 1.0)  # as init_weights does
    assert (store.states["momentum1"] == 0).all() and (store.weights[:3] == 0).all()
    store.table_view(store.states["momentum1"], 0).copy_(torch.tensor([1.0, 2.0, 3.0]))  # as a load does
    packed = store.gather(torch.tensor([4, 1]))
    views = store.views(packed)
    assert torch.equal(views["weights"][0], w1[1]) and views["momentum1"].tolist() == [0.0, 2.0]
    assert torch.equal(w1.view(w1.shape), w1) and torch.equal(w1.clone(), w1)  # TorchRec's slice view, deepcopy


def test_row_views_rejects_other_shapes() -> None:
    layout = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 4)
    with pytest.raises(ValueError, match=r"uint8 \[n, 20\]"):
        row_views(torch.zeros(3, 16, dtype=torch.uint8), layout)


def _vm_flags(address: int) -> List[str]:
    """VmFlags of the mapping holding ``address`` (Linux /proc/self/smaps)."""
    flags: List[str] = []
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    return flags


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="Linux with THP only")
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_value"])
def test_large_stores_ask_for_huge_pages(packed: bool) -> None:
    store = BackingStore([40_000], RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 64), packed=packed)  # 10 MB
    middle = store.weights.data_ptr() + store.weights.untyped_storage().nbytes() // 2
    assert "hg" in _vm_flags(middle)  # MADV_HUGEPAGE took effect on the mapping
