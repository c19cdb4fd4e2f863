"""A backing store in a file, behind a host-memory cache, read ahead from the window.

Tables larger than host memory: every row of a table group lives in a file
(``core/row_file.py``); host memory holds a cache of ``StoreSpec.host_cache_bytes``
per table (packed rows), and a map row -> cache slot (4 bytes a row).

The cache is exclusive of the scratchpad: it holds rows that are *not* resident.

- ``read_ahead(rows, step)``: when a batch enters the window (``H`` batches before it
  trains), its rows that are not resident are read into the cache by the I/O threads,
  many reads in flight; the rows stay protected until that batch has collected them.
- ``gather`` (collect): cached rows are copied out and leave the cache (the scratchpad
  now holds them); rows not cached are read from the file at once.
- ``scatter`` (write-back of scratchpad victims): rows go into the cache, dirty.
- Cache victims: never a row a queued batch will collect (its next use is known) nor
  one being read; among the rest, the one that entered the cache first (a clock over
  the slots). Rows leave on use, so entry order is recency order. Dirty victims are
  written to the file before their slot is reused.

``weights`` / ``states`` view the file through a shared mapping: ``flush`` writes the
dirty cached rows through, so they are current (state dicts, checkpoints); after they
are written from outside (loads), ``invalidate`` drops the cache.

The file is a working copy of the tables between checkpoints, not a checkpoint: it is
deleted when the store is closed (or garbage collected), and a file left by a crashed
run is refused when the next run starts (resume that run from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from collections import deque
from dataclasses import dataclass
from concurrent.futures import Future
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist

from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.row_file import BLOCK, FileIO, RowFile, wait_all
from torchrec_scratchpipe.core.store import gather_rows, scatter_rows
from torchrec_scratchpipe.core.store_api import RowStore, StoreError, StoreSpec

#: Paths of the files this process has open (a second engine over the same tables gets the next index).
_OPEN: Set[str] = set()


def file_name(directory: str, name: str, index: int) -> str:
    """The file of a table group named ``name`` on this rank (``index``: the n-th such store here).

    Example::

        >>> os.path.basename(file_name("/tmp", "t0+t1", 0))
        'scratchpipe-t0+t1-r0-0.rows'
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    if len(safe) > 80:
        safe = safe[:60] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return os.path.join(directory, f"scratchpipe-{safe}-r{rank}-{index}.rows")


@dataclass
class _Write:
    """A write-back in flight: its jobs (None: failed, to be tried again), rows and data."""

    futures: Optional[List["Future[None]"]]
    rows: torch.Tensor
    packed: torch.Tensor


class FileStore(RowStore):
    """Full tables of one table group in a file, behind a host cache (see the module docstring).

    Args:
        spec: the directory, the host-cache budget per table, the I/O threads, ``O_DIRECT``.
        table_rows: rows of each table, in group order.
        layout: what a row holds.
        packed: rows packed in the file (one read a row), or one region per value
            (contiguous views: TorchRec's ShardedTensors need them).
        name: the group's tables (names the file).
        io: the system calls (a test double injects faults).

    Raises:
        StoreError: the directory is missing or not writable, the file exists (left by
            another run), or the disk has no room for it.

    Example::

        >>> import tempfile
        >>> from torchrec_scratchpipe.core.layout import EmbOptimType
        >>> d = tempfile.mkdtemp()
        >>> s = FileStore(StoreSpec("file", d, 1 << 12), [100], RowLayout(EmbOptimType.EXACT_SGD, 4), True, "t0")
        >>> s.scatter(torch.tensor([3, 7]), torch.ones(2, 16, dtype=torch.uint8))
        >>> s.flush(); s.weights.shape, int(s.gather(torch.tensor([7]))[0].sum())
        (torch.Size([100, 4]), 16)
        >>> s.close(); os.listdir(d)
        []
    """

    def __init__(
        self, spec: StoreSpec, table_rows: Sequence[int], layout: RowLayout, packed: bool, name: str,
        io: Optional[FileIO] = None,
    ) -> None:
        spec.check_directory()
        self.spec = spec
        self.layout = layout
        self.table_rows: List[int] = list(table_rows)
        self.offsets = torch.tensor([0] + self.table_rows).cumsum(0)
        n, row = self.num_rows, layout.bytes_per_row
        index = 0
        while file_name(str(spec.directory), name, index) in _OPEN:
            index += 1
        path = file_name(str(spec.directory), name, index)
        self.file = RowFile(path, table_rows, layout, packed, name, spec.direct, spec.io_threads, io)
        _OPEN.add(path)
        self._finalizer = weakref.finalize(self, _close_file, self.file)
        views = self.file.views()
        if packed:
            views = self.views(views.pop("packed"))
        self.weights: torch.Tensor = views.pop("weights")
        self.states: Dict[str, torch.Tensor] = views
        k = sum(max(1, min(r, int(spec.host_cache_bytes or 0) // row)) for r in self.table_rows)  # per table
        self.cache = torch.empty((k, row), dtype=torch.uint8)  # pages are allocated as slots are first used
        self.row_slot = torch.full((n,), -1, dtype=torch.int32)
        self.slot_row = torch.full((k,), -1, dtype=torch.int64)
        self.dirty = torch.zeros(k, dtype=torch.bool)
        self.pending = torch.zeros(k, dtype=torch.bool)  # being read by the I/O threads
        self.want = torch.full((k,), -1, dtype=torch.int64)  # last step that will collect the slot's row
        self._watermark = 0  # batches before this step have collected their rows
        self._hand = 0
        self._reads: Deque[Tuple[List["Future[None]"], torch.Tensor]] = deque()  # (jobs, cache slots)
        self._writes: Deque[_Write] = deque()  # write-backs of evicted rows, oldest first
        self.counters: Dict[str, int] = {k_: 0 for k_ in (
            "read_ahead_rows", "read_ahead_skipped_rows", "gather_hits", "gather_file_rows", "scatter_rows",
            "evicted_dirty_rows", "written_through_rows")}

    @staticmethod
    def host_bytes(rows: int, row_bytes: int, cache_bytes: int) -> int:
        """Host memory of a store of ``rows`` rows of ``row_bytes`` with ``cache_bytes`` of cache
        (what ``nbytes`` reports): the cache, 18 bytes of bookkeeping a slot, 4 a row."""
        k = max(1, min(rows, cache_bytes // row_bytes))
        return k * (row_bytes + 8 + 1 + 1 + 8) + 4 * rows

    @staticmethod
    def file_bytes(rows: int, layout: RowLayout, packed: bool) -> int:
        """Bytes of the file of ``rows`` rows: the header and each region, 4 KiB aligned."""
        sizes = [layout.bytes_per_row] if packed else [v.nbytes for v in layout.values]
        return BLOCK + sum((rows * s + BLOCK - 1) // BLOCK * BLOCK for s in sizes)

    @property
    def reads_ahead(self) -> bool:
        return True

    @property
    def capacity(self) -> int:
        """Rows the host cache holds."""
        return int(self.cache.shape[0])

    def nbytes(self) -> int:
        """Host memory: the cache and the maps (the file's mapping is not counted: pages are
        only touched by state dicts, loads and init)."""
        return sum(t.untyped_storage().nbytes() for t in (self.cache, self.row_slot, self.slot_row, self.dirty,
                                                          self.pending, self.want))

    def stats(self) -> Dict[str, int]:
        """Counters: rows read ahead / from the file at collect / written, and the I/O calls."""
        return dict(self.counters, **self.file.stats, cache_rows=self.capacity)

    # ------------------------------------------------------------------ cache slots
    def _reap(self, block_for: Optional[torch.Tensor] = None) -> None:
        """Finish completed reads (oldest first); with ``block_for`` slots, wait until none of them is pending."""
        while self._reads:
            futures, slots = self._reads[0]
            if not all(f.done() for f in futures):
                if block_for is None or not bool(self.pending[block_for].any()):
                    return
            self._reads.popleft()
            try:
                wait_all(futures)
            except BaseException:
                self._drop(slots)  # the rows stay in the file only
                raise
            finally:
                self.pending[slots] = False

    def _landed(self, rows: Optional[torch.Tensor] = None) -> None:
        """Finish completed write-backs and wait for those of any of ``rows`` (None: all), so
        a read of the file sees them.

        Raises:
            StoreError: a write failed (e.g. a full disk). Its rows are kept in memory and
                written again at the next call (nothing is lost while the process lives).
        """
        keep: Deque[_Write] = deque()
        try:
            while self._writes:
                w = self._writes.popleft()
                if w.futures is None:  # failed before: try again
                    w.futures = self.file.write_async(w.rows, w.packed)
                if rows is None or all(f.done() for f in w.futures) or bool(torch.isin(w.rows, rows).any()):
                    try:
                        wait_all(w.futures)
                    except StoreError:
                        w.futures = None
                        keep.append(w)
                        raise
                else:
                    keep.append(w)
        finally:
            keep.extend(self._writes)
            self._writes = keep

    def _drop(self, slots: torch.Tensor) -> None:
        rows = self.slot_row[slots]
        self.row_slot[rows[rows >= 0]] = -1
        self.slot_row[slots] = -1
        self.dirty[slots] = False
        self.want[slots] = -1

    def _allocate(self, n: int) -> torch.Tensor:
        """Up to ``n`` slots for new rows: clock order over slots neither being read nor
        wanted by a queued batch; dirty rows in them are written to the file first."""
        k = self.capacity
        picked: List[torch.Tensor] = []
        got = scanned = 0
        while got < n and scanned < k:
            w = min(k - scanned, max(2 * (n - got), 4096))
            idx = (self._hand + torch.arange(w)) % k
            ok = idx[~(self.pending[idx] | (self.want[idx] >= self._watermark))][: n - got]
            picked.append(ok)
            got += ok.numel()
            scanned += w
            self._hand = int(ok[-1] + 1) % k if got >= n else (self._hand + w) % k
        slots = torch.cat(picked) if picked else torch.empty(0, dtype=torch.int64)
        if slots.numel():
            old = self.slot_row[slots]
            out = self.dirty[slots] & (old >= 0)
            if bool(out.any()):
                rows = old[out]
                self._landed(rows)  # an older write of one of them must not land after this one
                packed = gather_rows(self.cache, slots[out])
                self._writes.append(_Write(self.file.write_async(rows, packed), rows, packed))
                self.counters["evicted_dirty_rows"] += rows.numel()
            self._drop(slots)
        return slots

    def _place(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        self.row_slot[rows] = slots.to(torch.int32)
        self.slot_row[slots] = rows

    # ------------------------------------------------------------------ RowStore
    def read_ahead(self, rows: torch.Tensor, step: int) -> None:
        """Start reading the ``rows`` batch ``step`` will collect into the cache (those cached
        already are protected until then); rows that find no free slot are read at collect."""
        self._reap()
        if not rows.numel():
            return
        slots = self.row_slot.index_select(0, rows).long()
        hit = slots >= 0
        held = slots[hit]
        self.want[held] = torch.clamp(self.want[held], min=step)
        new = rows[~hit]
        if not new.numel():
            return
        got = self._allocate(new.numel())
        self.counters["read_ahead_skipped_rows"] += new.numel() - got.numel()
        if not got.numel():
            return
        new = new[: got.numel()]
        self._landed(new)
        self._place(new, got)
        self.want[got] = step
        self.pending[got] = True
        self._reads.append((self.file.read_into(new, self.cache, got), got))
        self.counters["read_ahead_rows"] += got.numel()

    def collected(self, step: int) -> None:
        self._watermark = max(self._watermark, step + 1)

    def gather(self, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = rows.numel()
        dst = (self.empty_rows(n) if out is None else out)[:n]
        slots = self.row_slot.index_select(0, rows).long()
        hit = slots >= 0
        at = hit.nonzero().squeeze(1)
        if at.numel():
            held = slots[at]
            self._reap(held)
            scatter_rows(dst, at, gather_rows(self.cache, held))
            self._drop(held)  # the scratchpad holds these rows now
            self.counters["gather_hits"] += at.numel()
        miss = (~hit).nonzero().squeeze(1)
        if miss.numel():
            self._landed(rows[miss])
            wait_all(self.file.read_into(rows[miss], dst, miss))
            self.counters["gather_file_rows"] += miss.numel()
        return dst

    def scatter(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        if not rows.numel():
            return
        packed = packed.to("cpu")
        self.counters["scatter_rows"] += rows.numel()
        slots = self.row_slot.index_select(0, rows).long()
        hit = slots >= 0
        if bool(hit.any()):
            at = hit.nonzero().squeeze(1)
            held = slots[at]
            self._reap(held)
            scatter_rows(self.cache, held, gather_rows(packed, at))
            self.dirty[held] = True
        miss = (~hit).nonzero().squeeze(1)
        if not miss.numel():
            return
        got = self._allocate(miss.numel())
        into, rest = miss[: got.numel()], miss[got.numel():]
        if into.numel():
            self._place(rows[into], got)
            scatter_rows(self.cache, got, gather_rows(packed, into))
            self.dirty[got] = True
        if rest.numel():  # every slot is wanted by a queued batch: straight to the file
            self._landed(rows[rest])
            self.file.write(rows[rest], gather_rows(packed, rest))
            self.counters["written_through_rows"] += rest.numel()

    def weights_of(self, rows: torch.Tensor) -> torch.Tensor:
        slots = self.row_slot.index_select(0, rows).long()
        hit = (slots >= 0).nonzero().squeeze(1)
        self._reap(slots[hit])
        packed = self.empty_rows(rows.numel())
        scatter_rows(packed, hit, gather_rows(self.cache, slots[hit]))
        miss = (slots < 0).nonzero().squeeze(1)
        if miss.numel():
            self._landed(rows[miss])
            wait_all(self.file.read_into(rows[miss], packed, miss))
        return self.views(packed)["weights"].clone()

    def flush(self) -> None:
        """Write every dirty cached row to the file (they stay cached, clean)."""
        self._landed()
        slots = self.dirty.nonzero().squeeze(1)
        if slots.numel():
            self.file.write(self.slot_row[slots], gather_rows(self.cache, slots))
            self.dirty[slots] = False

    def invalidate(self) -> None:
        """Drop every cached row (clean or not) and read-ahead: the file is the truth now."""
        try:
            self._landed()
            while self._reads:
                self._reap(self._reads[0][1])
        finally:
            self.row_slot.fill_(-1)
            self.slot_row.fill_(-1)
            self.dirty.zero_()
            self.want.fill_(-1)
            self.pending.zero_()

    def close(self) -> None:
        """Wait for reads, then close and delete the file (views of it stay readable)."""
        try:
            self._landed()
            while self._reads:
                futures, _ = self._reads.popleft()
                wait_all(futures)
        finally:
            self._finalizer()

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError(
            f"a file-backed store ({self.file.path}) cannot be copied or pickled: its rows live in a file that "
            "one store owns. Save the model with state_dict() or a DCP checkpoint instead."
        )


def _close_file(file: RowFile) -> None:
    _OPEN.discard(file.path)
    file.close(unlink=True)
