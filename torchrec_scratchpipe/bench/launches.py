"""Count the tensor ops a piece of code dispatches: on a GPU, each is (at most) one kernel launch.

``LaunchCounter`` is a ``TorchDispatchMode``: every ATen op that reaches dispatch is
counted, except views (``OpOverload.is_view``: slices, ``view``, ``detach``), which only
make tensor metadata and launch nothing. It sees what runs on any device, so the launches
a device planner's step would issue on CUDA can be counted on CPU or on meta tensors.

Example::

    >>> with LaunchCounter() as c:
    ...     x = torch.arange(4)
    ...     y = (x * 2)[1:].sum()
    >>> c.launches, c.views
    (3, 1)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchrec_scratchpipe.core.device_mover import DeviceMover
from torchrec_scratchpipe.core.device_plan import DevicePlanner
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store import BackingStore
from torchrec_scratchpipe.core.window import PlanWindow

#: Ops that make no kernel: a Python number wrapped as a 0-dim CPU tensor (``torch.where(c, x, 0)``).
NOT_LAUNCHES = frozenset({"scalar_tensor"})


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops (``launches``), views and wrapped scalars apart (``views``), and
    launches by op name (``by_op``)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.views = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Tuple[Any, ...], args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        if getattr(func, "is_view", False) or func.overloadpacket.__name__ in NOT_LAUNCHES:
            self.views += 1
        else:
            self.launches += 1
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[[], Any]) -> LaunchCounter:
    """Run ``fn`` under a ``LaunchCounter``; return the counter."""
    with LaunchCounter() as counter:
        fn()
    return counter


class SlotTensors:
    """A scratchpad's slot tensors on any device, meta included (no TBE; ``Scratchpad``'s read and write)."""

    read = Scratchpad.read
    write = Scratchpad.write

    def __init__(self, layout: RowLayout, slots: int, device: torch.device) -> None:
        self.weights = torch.zeros(slots, layout.dim, dtype=layout.weight_dtype, device=device)
        self.states: Dict[str, torch.Tensor] = {
            v.name: torch.zeros((slots,) + v.shape, dtype=v.dtype, device=device) for v in layout.values if v.name != "weights"
        }


def store_on(device: torch.device, table_rows: List[int], layout: RowLayout, packed: bool = True) -> BackingStore:
    """A backing store whose tensors live on ``device`` (meta: shapes only)."""
    store = BackingStore([1] * len(table_rows), layout, packed=packed)
    n = sum(table_rows)
    store.offsets = torch.tensor([0] + list(table_rows)).cumsum(0)
    if packed:
        store.packed = torch.zeros(n, layout.bytes_per_row, dtype=torch.uint8, device=device)
    else:
        store.weights = torch.zeros((n,) + (layout.dim,), dtype=layout.weight_dtype, device=device)
        store.states = {v.name: torch.zeros((n,) + v.shape, dtype=v.dtype, device=device) for v in layout.values if v.name != "weights"}
    return store


def device_step_launches(
    table_rows: List[int], capacity: int, ids_per_table: int, lookahead: int, horizon: int, layout: RowLayout,
    steps: int = 3, device: torch.device = torch.device("meta"), packed: bool = True, seed: int = 0,
) -> List[int]:
    """Launches of each plan-and-move step of one table group with the device planner and mover.

    A step: pop the next batch (plan and move in what now fits: dedup'd rows, victims,
    collect, write-back, insert) and remap its ids to slots, count its train misses, then
    take in a new batch (group rows, dedup, next-use links). On meta tensors (the default)
    sizes cost nothing, and any data-dependent op raises. The window is filled first.

    Args:
        table_rows: rows of each table of the group.
        capacity: slots C (on meta, keep ``(lookahead + 1) * ids <= capacity``: beyond that a
            plan reads its fit flag, which meta tensors cannot give).
        ids_per_table: ids of each table per batch.
        lookahead, horizon: L and H.
        layout: what a row holds.
        steps: steps measured after the window has filled.
    """
    num_rows = sum(table_rows)
    planner = DevicePlanner(num_rows, capacity, "future", device)
    pad = SlotTensors(layout, capacity + 1, device)
    mover = DeviceMover(store_on(device, table_rows, layout, packed), pad, GroupStats(), capacity)  # type: ignore[arg-type]
    window = PlanWindow(planner, lookahead, horizon, lambda e: mover.move_in(e.plan))
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0] + list(table_rows[:-1])).cumsum(0)
    counts = torch.full((len(table_rows),), ids_per_table)
    low = min(table_rows)
    raw = [torch.randint(0, low, (ids_per_table * len(table_rows),), generator=g).to(device) for _ in range(horizon + 1 + steps)]
    queued: List[torch.Tensor] = []

    def take_in(ids: torch.Tensor) -> None:
        rows, group_ids = planner.group_rows(ids, base, counts)
        queued.append(group_ids)
        window.push(rows)

    for ids in raw[: horizon + 1]:
        take_in(ids)
    launches = []
    for i in range(steps):

        def step() -> None:
            entry = window.pop()
            assert entry.plan is not None
            planner.row_to_slot.index_select(0, queued[i])  # the training batch's remap
            planner.train_misses(entry.plan)
            take_in(raw[horizon + 1 + i])

        launches.append(count_launches(step).launches)
    return launches
