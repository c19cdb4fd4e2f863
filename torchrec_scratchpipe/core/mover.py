"""Stages 2-4 and 6: collect, exchange, insert and write-back of one table group.

On CPU the stages run in order inside ``move_in``. On CUDA rows travel through two fixed
rings of pinned staging buffers (``StagingRing``: one for rows coming in, one for victims
going out, each sized from the rows a step is expected to move) and the copies run on a
side stream:

- rows moving in are gathered straight into a buffer as packed rows (weights and
  optimizer state together, ``core/store.py``), copied to the device as one tensor, and
  written into the slots from typed views of it;
- the side stream then waits for the last retired batch's update (an event recorded at
  retirement, or at a ``fence``: hazard 1) before it reads victims or writes slots;
- victims are packed on the device, copied into a buffer as one tensor and scattered
  into the pageable backing store only once that copy has completed, at the latest
  before a later collect reads one of their rows (hazard 2) or before the buffer is
  reused.

After a reset, a load or a refresh, ``fence`` makes the side stream wait for everything
issued so far on the training stream before it touches a slot again.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Deque, Iterator, List, Optional, Tuple

import torch

from torchrec_scratchpipe.core.plan import SlotPlan
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.staging import StagingBuffer, StagingRing
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store_api import RowStore

_Incoming = Tuple[torch.Tensor, torch.Tensor]  # device slots, device packed rows


def staging_ring(store: RowStore, capacity: int, pin: bool = True, **kw: Any) -> StagingRing:
    """One staging ring for a mover of ``store`` with ``capacity`` slots (see ``StagingRing``)."""
    return StagingRing(store.layout.bytes_per_row, capacity, pin=pin, **kw)


def staging_rings(store: RowStore, capacity: int, pin: bool = True, **kw: Any) -> Tuple[StagingRing, StagingRing]:
    """The two rings (rows in, victims out) a mover uses; ``kw`` as for ``StagingRing``
    (``rows_per_step``: the rows a step is expected to move each way)."""
    return staging_ring(store, capacity, pin, **kw), staging_ring(store, capacity, pin, **kw)


class Mover:
    """Moves rows between a ``RowStore`` (host or file) and a ``Scratchpad`` as plans dictate.

    Args:
        store: host-side full tables (pageable memory).
        pad: device-side slots.
        stats: counters to update (rows and bytes each way).
        rings: staging buffers, ``(in, out)``. None: pinned rings on CUDA
            (``staging_rings``), direct copies on CPU. Rings given on CPU run the staged
            path without streams (to test it).
        rows_per_step: rows a step is expected to move each way (sizes the default rings;
            None: ``RING_BUFFERS`` buffers each).

    Example::

        >>> # mover.move_in(plan) after each plan; mover.mark_retired() when a batch retires;
        >>> # mover.wait_ready(entry_event) before training that batch; mover.fence() after
        >>> # a reset.
    """

    def __init__(
        self,
        store: RowStore,
        pad: Scratchpad,
        stats: GroupStats,
        rings: Optional[Tuple[StagingRing, StagingRing]] = None,
        rows_per_step: Optional[int] = None,
    ) -> None:
        self.store = store
        self.pad = pad
        self.stats = stats
        self.device = pad.weights.device
        self.cuda = self.device.type == "cuda"
        self.row_bytes = store.layout.bytes_per_row
        self.stream: Optional["torch.cuda.Stream"] = torch.cuda.Stream(self.device) if self.cuda else None
        self.rows_per_step = rows_per_step
        if rings is None and self.cuda:
            rings = staging_rings(store, pad.weights.shape[0], rows_per_step=rows_per_step)
        self.ring_in: Optional[StagingRing] = rings[0] if rings is not None else None
        self.ring_out: Optional[StagingRing] = rings[1] if rings is not None else None
        self._retired: Optional["torch.cuda.Event"] = None
        self._pending: Deque[StagingBuffer] = deque()  # victims waiting for the store, oldest first

    # ------------------------------------------------------------------ moving
    def move_in(self, plan: SlotPlan) -> Optional["torch.cuda.Event"]:
        """Write back the plan's victims and bring its missing rows in.

        Returns:
            On CUDA, an event the training stream must wait on before using the batch.
        """
        if plan.counts is not None:  # padded with out-of-range sentinels: never index the store with it
            raise TypeError("a device planner's plan is padded: move it with core/device_mover.DeviceMover.")
        self.stats.d2h_rows += plan.victim_rows.numel()
        self.stats.h2d_rows += plan.miss_rows.numel()
        self.stats.d2h_bytes += plan.victim_rows.numel() * self.row_bytes
        self.stats.h2d_bytes += plan.miss_rows.numel() * self.row_bytes
        if self.ring_in is None or self.ring_out is None:
            if plan.victim_rows.numel():
                self.store.scatter(plan.victim_rows, self._read(plan.victim_slots))
            if plan.miss_rows.numel():
                self._insert(plan.miss_slots, self.store.gather(plan.miss_rows))
            return None
        self.ring_in.begin_step()
        self.ring_out.begin_step()
        self._land_overlapping(plan.miss_rows)  # hazard 2: collect reads current rows
        with self._side():
            incoming = self._stage_in(plan.miss_rows, plan.miss_slots)
            self._wait_retired()  # hazard 1
            self._stage_out(plan.victim_rows, plan.victim_slots)
            for slots, packed in incoming:
                self._insert(slots, packed)
            return self._record()

    def _insert(self, slots: torch.Tensor, packed: torch.Tensor) -> None:
        """Write packed rows (on the scratchpad's device) into ``slots``, value by value."""
        self.pad.write(slots, self.store.views(packed))

    def _read(self, slots: torch.Tensor) -> torch.Tensor:
        """Packed rows (on the scratchpad's device) of ``slots``, read value by value."""
        packed = self.store.empty_rows(slots.numel(), self.device)
        self.pad.read(slots, out=self.store.views(packed))
        return packed

    @staticmethod
    def _chunks(ring: StagingRing, rows: torch.Tensor, slots: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        step = ring.rows
        for i in range(0, rows.numel(), step):
            yield rows[i : i + step], slots[i : i + step]

    def _stage_in(self, rows: torch.Tensor, slots: torch.Tensor) -> List[_Incoming]:
        """Gather ``rows`` into staging buffers and start copying them (and ``slots``) to the device."""
        assert self.ring_in is not None
        out = []
        for r, s in self._chunks(self.ring_in, rows, slots):
            buf = self.ring_in.acquire()  # holds no victims: those are in ring_out
            n = r.numel()
            staged = buf.rows(n)
            self.store.gather(r, out=staged)
            buf.index[:n].copy_(s)
            idx = buf.index[:n].to(self.device, non_blocking=True, copy=True)
            out.append((idx, staged.to(self.device, non_blocking=True, copy=True)))  # one copy per chunk
            buf.done = self._record()
        return out

    def _stage_out(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy the victims in ``slots`` into staging buffers; they land in the store later."""
        assert self.ring_out is not None
        for r, s in self._chunks(self.ring_out, rows, slots):
            buf = self.ring_out.acquire(self._land_through)
            n = r.numel()
            buf.index[:n].copy_(s)
            idx = buf.index[:n].to(self.device, non_blocking=True, copy=True)
            buf.rows(n).copy_(self._read(idx), non_blocking=True)  # packed on the device: one copy
            buf.done = self._record()
            buf.write_back = r
            self._pending.append(buf)

    # ------------------------------------------------------------------ landing victims
    def _land_through(self, last: StagingBuffer) -> None:
        """Scatter pending victims into the store, oldest first, up to and including ``last``."""
        while self._pending:
            buf = self._pending.popleft()
            if buf.done is not None:
                buf.done.synchronize()
                buf.done = None
            rows = buf.write_back
            assert rows is not None
            self.store.scatter(rows, buf.rows(rows.numel()))
            buf.write_back = None
            if buf is last:
                return

    def _land_overlapping(self, rows: torch.Tensor) -> None:
        """Land every pending victim copy that has completed, and those holding any of ``rows``."""
        last = None
        for buf in self._pending:
            done = buf.done is None or buf.done.query()
            if done or (rows.numel() and bool(torch.isin(buf.write_back, rows).any())):  # type: ignore[arg-type]
                last = buf
        if last is not None:
            self._land_through(last)

    def land_all(self) -> None:
        """Land every pending victim in the backing store (waits for their copies)."""
        if self._pending:
            self._land_through(self._pending[-1])

    # ------------------------------------------------------------------ ordering
    def _side(self) -> "contextlib.AbstractContextManager[Any]":
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _record(self) -> Optional["torch.cuda.Event"]:
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def _wait_retired(self) -> None:
        if self.stream is not None and self._retired is not None:
            self.stream.wait_event(self._retired)

    def mark_retired(self) -> None:
        """Record that every update of the batches trained so far has been issued."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._retired = ev

    def fence(self) -> None:
        """Make the side stream's next work wait for everything issued so far on the current
        stream (after a reset, a load or a refresh: slots may be touched by batches that
        never retired)."""
        self.mark_retired()

    def wait_ready(self, ready: Optional["torch.cuda.Event"]) -> None:
        """Make the training stream wait until a batch's rows are inserted."""
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)

    # ------------------------------------------------------------------ whole-table moves
    def flush(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Synchronously write the resident ``rows`` (in ``slots``) back to the store."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.land_all()
        if rows.numel():
            self.store.scatter(rows, self._read(slots.to(self.device)).cpu())

    def refresh(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy ``rows`` from the store into their ``slots`` (after the store was loaded).

        On CUDA the copy runs on the side stream after everything issued so far on the
        training stream, and the training stream waits for it.
        """
        if self.ring_in is None:
            if rows.numel():
                self._insert(slots, self.store.gather(rows))
            return
        self.land_all()
        self.fence()
        with self._side():
            incoming = self._stage_in(rows, slots)
            self._wait_retired()
            for s, packed in incoming:
                self._insert(s, packed)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
