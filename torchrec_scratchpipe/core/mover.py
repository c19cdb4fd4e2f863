"""Stages 2-4 and 6: collect, exchange, insert and write-back of one table group.

On CPU the stages run in order inside ``move_in``. On CUDA they run on a side stream:
victims are read out only after the last retired batch's backward (an event recorded
at retirement: hazard 1), and their write-back into host memory is finished before
the next collect reads the backing store (hazard 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from torchrec_scratchpipe.core.plan import SlotPlan
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store import BackingStore


@dataclass
class _PendingWriteBack:
    rows: torch.Tensor
    values: Dict[str, torch.Tensor]
    done: "torch.cuda.Event"


def _to_pinned(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Device -> pinned host copies, issued asynchronously on the current stream."""
    out = {}
    for k, v in values.items():
        host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host.copy_(v, non_blocking=True)
        out[k] = host
    return out


class Mover:
    """Moves rows between a ``BackingStore`` and a ``Scratchpad`` as plans dictate.

    Args:
        store: host-side full tables.
        pad: device-side slots.
        stats: counters to update (rows and bytes each way).

    Example::

        >>> # mover.move_in(plan) after each plan; mover.mark_retired() when a batch retires;
        >>> # mover.wait_ready(entry_event) before training that batch.
    """

    def __init__(self, store: BackingStore, pad: Scratchpad, stats: GroupStats) -> None:
        self.store = store
        self.pad = pad
        self.stats = stats
        self.device = pad.weights.device
        self.cuda = self.device.type == "cuda"
        self.row_bytes = store.nbytes_per_row()
        self.stream: Optional["torch.cuda.Stream"] = (
            torch.cuda.Stream(self.device) if self.cuda else None
        )
        self._retired: Optional["torch.cuda.Event"] = None
        self._pending: Optional[_PendingWriteBack] = None

    def move_in(self, plan: SlotPlan) -> Optional["torch.cuda.Event"]:
        """Write back the plan's victims and bring its missing rows in.

        Returns:
            On CUDA, an event the training stream must wait on before using the batch.
        """
        self.stats.d2h_rows += plan.victim_rows.numel()
        self.stats.h2d_rows += plan.miss_rows.numel()
        self.stats.d2h_bytes += plan.victim_rows.numel() * self.row_bytes
        self.stats.h2d_bytes += plan.miss_rows.numel() * self.row_bytes
        if not self.cuda:
            if plan.victim_rows.numel():
                self.store.scatter(plan.victim_rows, self.pad.read(plan.victim_slots))
            if plan.miss_rows.numel():
                self.pad.write(plan.miss_slots, self.store.gather(plan.miss_rows))
            return None
        return self._move_in_cuda(plan)

    def _move_in_cuda(self, plan: SlotPlan) -> "torch.cuda.Event":
        self.finish_write_back()  # hazard 2: the store is current before we collect
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            if self._retired is not None:
                self.stream.wait_event(self._retired)  # hazard 1
            if plan.victim_rows.numel():
                slots = plan.victim_slots.to(self.device, non_blocking=True)
                host = _to_pinned(self.pad.read(slots))
                done = torch.cuda.Event()
                done.record(self.stream)
                self._pending = _PendingWriteBack(plan.victim_rows, host, done)
            if plan.miss_rows.numel():
                collected = self.store.gather(plan.miss_rows)
                staged = {k: v.pin_memory() for k, v in collected.items()}
                incoming = {k: v.to(self.device, non_blocking=True) for k, v in staged.items()}
                self.pad.write(plan.miss_slots.to(self.device, non_blocking=True), incoming)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return ready

    def mark_retired(self) -> None:
        """Record that every update of the batches trained so far has been issued."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._retired = ev

    def wait_ready(self, ready: Optional["torch.cuda.Event"]) -> None:
        """Make the training stream wait until a batch's rows are inserted."""
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)

    def finish_write_back(self) -> None:
        """Land the last asynchronous write-back in the backing store."""
        if self._pending is not None:
            self._pending.done.synchronize()
            self.store.scatter(self._pending.rows, self._pending.values)
            self._pending = None

    def flush(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Synchronously write the resident ``rows`` (in ``slots``) back to the store."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)  # type: ignore[arg-type]
            self.finish_write_back()
        if rows.numel():
            values = self.pad.read(slots.to(self.device))
            self.store.scatter(rows, {k: v.cpu() for k, v in values.items()})

    def refresh(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy ``rows`` from the store into their ``slots`` (after the store was loaded)."""
        if rows.numel():
            values = {k: v.to(self.device) for k, v in self.store.gather(rows).items()}
            self.pad.write(slots.to(self.device), values)

