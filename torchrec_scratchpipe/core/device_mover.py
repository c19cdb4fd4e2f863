"""Stages 2-4 and 6 for a device planner's plans: device gathers and scatters, no host copies.

A ``DevicePlanner`` plan is padded to the batch's id count (``core/device_plan.py``). This
mover moves it with a fixed sequence of ops whose shapes follow from that size:

- *collect*: one gather of the missing rows from the backing store (padding reads row 0);
- *write-back*: the victims' slots are read into packed rows and scattered into the store.
  Padding repeats the last victim (same row, same bytes), or, without victims, writes the
  collected rows back unchanged, so every index is a real row and the result is exact;
- *insert*: the collected rows are scattered into their slots; padding goes to the spare
  slot ``C`` (the scratchpad of a device-planned group has C + 1 slots; no id maps there).

On CUDA the store is host memory the GPU addresses directly (``cudaHostRegister`` of the
store's tensors, aliased as CUDA tensors through ``__cuda_array_interface__``; this needs
unified addressing, where a registered host pointer is also its device pointer), so collect
and write-back are device kernels reading and writing host memory over PCIe; they run on
the mover's side stream, after the planner's work (``wait_stream``) and after the last
retired batch's update (hazard 1, the retirement event). Hazard 2 (a row written back and
collected again later) is ordered by the stream itself. Host readers of the store (flush,
lookups of batches outside the window) call ``land_all``, which waits for the side stream.

Whole-table moves (``flush``, ``refresh``) and the retirement events are ``Mover``'s.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from torchrec_scratchpipe.core.mover import Mover
from torchrec_scratchpipe.core.plan import SlotPlan
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store import BackingStore, gather_rows, scatter_rows

#: ``cudaHostRegisterPortable | cudaHostRegisterMapped``.
_REGISTER_FLAGS = 0x01 | 0x02


@dataclass
class MoveIndices:
    """Where a padded plan's rows go, every index valid (see the module docstring).

    Args:
        collect_rows: store rows to gather (misses, then row 0).
        insert_slots: slots they go to (miss slots, then the spare slot ``C``).
        back_slots: slots whose rows are written back (victims; padding repeats the last).
        back_rows: store rows they go to (victims' rows; without victims, ``collect_rows``).
        has_victims: 0-dim bool: whether the plan evicts anything (else the write-back
            writes the collected rows back unchanged).
    """

    collect_rows: torch.Tensor
    insert_slots: torch.Tensor
    back_slots: torch.Tensor
    back_rows: torch.Tensor
    has_victims: torch.Tensor


def move_indices(plan: SlotPlan, spare_slot: int) -> MoveIndices:
    """The index vectors of a padded plan's moves (fixed shapes, no host reads).

    Example::

        >>> from torchrec_scratchpipe.core.device_plan import DevicePlanner
        >>> p = DevicePlanner(num_rows=10, capacity=2)
        >>> plan = p.try_plan(p.unique(torch.tensor([4, 4, 5])), step=0)
        >>> m = move_indices(plan, spare_slot=2)
        >>> m.collect_rows.tolist(), m.insert_slots.tolist(), bool(m.has_victims)
        ([4, 5, 0], [0, 1, 2], False)
    """
    assert plan.counts is not None, "move_indices takes a device planner's (padded) plan"
    n = plan.rows.numel()
    j = torch.arange(n, device=plan.rows.device)
    n_miss, n_victims = plan.counts[1], plan.counts[2]
    is_miss = j < n_miss
    collect_rows = torch.where(is_miss, plan.miss_rows, 0)
    insert_slots = torch.where(is_miss, plan.miss_slots, spare_slot)
    last = torch.where(j < n_victims, j, n_victims - 1).clamp_(min=0)
    has_victims = n_victims > 0
    back_slots = torch.where(has_victims, plan.victim_slots.index_select(0, last), spare_slot)
    back_rows = torch.where(has_victims, plan.victim_rows.index_select(0, last), collect_rows)
    return MoveIndices(collect_rows, insert_slots, back_slots, back_rows, has_victims)


def _typestr(dtype: torch.dtype) -> str:
    return str(torch.empty(0, dtype=dtype).numpy().dtype.str)


class _HostArray:
    """A registered host tensor seen as CUDA memory (``__cuda_array_interface__``)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": _typestr(t.dtype),
            "data": (t.data_ptr(), False),
            "strides": tuple(s * t.element_size() for s in t.stride()),
            "version": 2,
        }
        self.owner = t


def host_mapped(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the same host memory as the CPU tensor ``t`` (registered and
    mapped; unregistered when the alias is collected). On a CPU ``device``: ``t`` itself."""
    if device.type != "cuda":
        return t
    storage = t.untyped_storage()
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), _REGISTER_FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of the backing store failed (error {int(err)}): {cudart.cudaGetErrorString(err)}")
    with torch.cuda.device(device):
        alias = torch.as_tensor(_HostArray(t), device=device)
    weakref.finalize(alias, cudart.cudaHostUnregister, storage.data_ptr())
    return alias


class DeviceMover(Mover):
    """Moves a device planner's padded plans between the store and the scratchpad.

    Args:
        store: the group's backing store (host memory; mapped for the GPU on CUDA).
        pad: the scratchpad, with one spare slot after the ``spare_slot`` planned ones.
        stats: counters (moved rows and bytes, accumulated on the device).
        spare_slot: C, the slot padding is inserted into.

    Example::

        >>> # TableGroup builds one for a device planner: DeviceMover(store, pad, stats, capacity)
    """

    def __init__(self, store: BackingStore, pad: Scratchpad, stats: GroupStats, spare_slot: int) -> None:
        super().__init__(store, pad, stats)
        if pad.weights.shape[0] <= spare_slot:
            raise ValueError(f"the scratchpad needs a spare slot: {pad.weights.shape[0]} slots for {spare_slot} planned.")
        self.spare_slot = spare_slot
        self.tables: Dict[str, torch.Tensor] = (
            {"packed": host_mapped(store.packed, self.device)} if store.packed is not None
            else {name: host_mapped(t, self.device) for name, t in {"weights": store.weights, **store.states}.items()}
        )

    def move_in(self, plan: SlotPlan) -> Optional["torch.cuda.Event"]:
        """Write back the plan's victims and bring its missing rows in, on the device.

        Returns:
            On CUDA, an event the training stream must wait on before using the batch.
        """
        if plan.counts is None:
            raise TypeError("DeviceMover moves a device planner's plans (SlotPlan.counts is None).")
        row_bytes = self.row_bytes
        self.stats.add("h2d_rows", plan.counts[1])
        self.stats.add("d2h_rows", plan.counts[2])
        self.stats.add("h2d_bytes", plan.counts[1] * row_bytes)
        self.stats.add("d2h_bytes", plan.counts[2] * row_bytes)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the plan was made there
        with self._side():
            m = move_indices(plan, self.spare_slot)
            incoming = self._collect(m.collect_rows)
            self._wait_retired()  # hazard 1: victims are read and slots written after the last update
            outgoing = torch.where(m.has_victims, self._read(m.back_slots), incoming)
            self._write_back(m.back_rows, outgoing)
            self._insert(m.insert_slots, incoming)
            return self._record()

    def _collect(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows of ``rows`` gathered from the (mapped) store onto the scratchpad's device."""
        if "packed" in self.tables:
            return gather_rows(self.tables["packed"], rows)
        out = self.store.empty_rows(rows.numel(), self.device)
        for name, view in self.store.views(out).items():
            gather_rows(self.tables[name], rows, view)
        return out

    def _write_back(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Scatter packed rows into the (mapped) store (repeated rows carry equal bytes)."""
        if "packed" in self.tables:
            scatter_rows(self.tables["packed"], rows, packed)
            return
        for name, view in self.store.views(packed).items():
            scatter_rows(self.tables[name], rows, view)

    def land_all(self) -> None:
        """Make the store current for host readers: wait for the side stream's write-backs."""
        if self.stream is not None:
            self.stream.synchronize()
        super().land_all()
