"""One table group's rows in a file: its header, its regions, and batched reads and writes.

The file starts with a 4 KiB header (JSON: the layout, the tables' rows, the run that
made it), then the rows: packed (``layout.bytes_per_row`` bytes a row, one region) or
one region per value (weights, each optimizer state: contiguous, what TorchRec's
ShardedTensors need), each region 4 KiB aligned. Its space is reserved when it is made
(``posix_fallocate``), so a full disk shows when the model is built, not mid-training.

Reads and writes take many rows at once: rows are sorted, grouped into runs of
contiguous bytes (with ``O_DIRECT``, of contiguous 4 KiB blocks), split into one job per
I/O thread, and each job issues one ``preadv`` / ``pwrite`` per run; rows are then
copied out of the job's bounce buffer with one vectorized index op. ``O_DIRECT`` reads
bypass the page cache (the host cache is the only copy in memory); writes are buffered.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.store import scatter_rows
from torchrec_scratchpipe.core.store_api import StoreError

#: Bytes of the header, and the alignment of every region (and of ``O_DIRECT`` reads).
BLOCK = 4096
MAGIC = b"SCRATCHPIPE-ROWS\n"
#: Rows a job reads or writes at least (fewer jobs for small requests).
MIN_JOB_ROWS = 16
#: Bytes written between two hints that the page cache may drop written pages.
_DROP_EVERY = 64 << 20


class FileIO:
    """The system calls a ``RowFile`` makes (a test double overrides them to inject faults)."""

    def preadv(self, fd: int, buffers: List[memoryview], offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)


@dataclass(frozen=True)
class Segment:
    """A part of each row kept together in the file: ``nbytes`` bytes a row at
    ``base + row * nbytes``, at byte ``at`` of a packed row."""

    base: int
    nbytes: int
    at: int


def _describe(e: OSError) -> str:
    reason = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached",
              errno.EIO: "an I/O error", errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno or 0)
    return f"{reason} ({os.strerror(e.errno or 0)})" if reason else str(e)


def runs(offsets: torch.Tensor, nbytes: int, align: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group sorted byte ``offsets`` of ``nbytes``-byte records into reads.

    Returns:
        (start, length) of each read (multiples of ``align``), and where each record
        lands in the buffer the reads fill one after the other.

    Example::

        >>> s, n, pos = runs(torch.tensor([0, 8, 40]), 8, 1)
        >>> s.tolist(), n.tolist(), pos.tolist()
        ([0, 40], [16, 8], [0, 8, 16])
    """
    blk0, blk1 = offsets // align, (offsets + nbytes - 1) // align
    new = torch.ones_like(offsets, dtype=torch.bool)
    if align > 1:  # blocks shared or adjacent: one read
        new[1:] = blk0[1:] > blk1[:-1] + 1
    else:  # bytes adjacent: one read
        new[1:] = offsets[1:] != offsets[:-1] + nbytes
    first = new.nonzero().squeeze(1)
    last = torch.cat([first[1:] - 1, torch.tensor([offsets.numel() - 1])])
    start, end = blk0[first] * align, (blk1[last] + 1) * align
    length = end - start
    base = torch.cumsum(length, 0) - length
    run = torch.cumsum(new.long(), 0) - 1
    return start, length, base[run] + offsets - start[run]


class RowFile:
    """The file of one table group (see the module docstring).

    Args:
        path: the file to create (it must not exist).
        table_rows: rows of each table.
        layout: what a row holds.
        packed: one packed region, or one region per value.
        name: the group's tables (kept in the header).
        direct: read with ``O_DIRECT`` (None: where the file system supports it).
        threads: I/O threads (reads and writes in flight at once).
        io: the system calls (``FileIO``).

    Raises:
        StoreError: the file exists (names what made it), or its space cannot be reserved.
    """

    def __init__(
        self, path: str, table_rows: Sequence[int], layout: RowLayout, packed: bool, name: str,
        direct: Optional[bool] = None, threads: int = 32, io: Optional[FileIO] = None,
    ) -> None:
        self.path = path
        self.layout = layout
        self.io = io or FileIO()
        self.rows = int(sum(table_rows))
        values = [("packed", layout.bytes_per_row, 0)] if packed else [(v.name, v.nbytes, v.offset) for v in layout.values]
        at, self.regions, segments = BLOCK, {}, []
        for vname, nbytes, dst in values:
            self.regions[vname] = (at, self.rows * nbytes)
            segments.append(Segment(at, nbytes, dst))
            at += (self.rows * nbytes + BLOCK - 1) // BLOCK * BLOCK
        self.segments: Tuple[Segment, ...] = tuple(segments)
        self.size = at
        self.header: Dict[str, Any] = {
            "format": 1, "name": name, "table_rows": list(map(int, table_rows)), "optimizer": layout.optimizer.name,
            "dim": layout.dim, "weight_dtype": str(layout.weight_dtype), "bytes_per_row": layout.bytes_per_row,
            "packed": packed, "run_id": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.fd = self._create()
        self.direct_fd: Optional[int] = None
        if direct is not False and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if direct:
                    self.close(unlink=True)
                    raise StoreError(f"file store {path!r}: O_DIRECT was asked for but {e}; use direct=None.") from e
        self.align = BLOCK if self.direct_fd is not None else 1
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="scratchpipe-io")
        self.threads = threads
        self._written = 0
        self._lock = threading.Lock()
        self.stats = {"read_calls": 0, "read_bytes": 0, "write_calls": 0, "write_bytes": 0}

    # ------------------------------------------------------------------ the file itself
    def _create(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise StoreError(self._leftover()) from None
        except OSError as e:
            raise StoreError(f"file store: cannot create {self.path!r}: {e}; name a writable directory.") from e
        try:
            head = MAGIC + json.dumps(self.header, sort_keys=True).encode()
            assert len(head) < BLOCK, "header too long"
            try:
                self.io.fallocate(fd, 0, self.size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                os.ftruncate(fd, self.size)  # no reservation on this file system: sparse
            self.io.pwrite(fd, memoryview(head.ljust(BLOCK, b"\0")), 0)
        except OSError as e:
            os.close(fd)
            os.unlink(self.path)
            raise StoreError(
                f"file store: cannot reserve {self.size:,} bytes for {self.path!r}: {_describe(e)}. Free space "
                "there, name another directory, or use fewer rows per rank."
            ) from e
        return fd

    def _leftover(self) -> str:
        """Why an existing file at ``path`` cannot be used (it is never reused or deleted here)."""
        what = (f"file store: {self.path!r} already exists; it is a working copy of a run's tables, not a "
                "checkpoint (after a crash, resume from your last checkpoint)")
        try:
            with open(self.path, "rb") as f:
                head = f.read(BLOCK)
            old = json.loads(head[len(MAGIC):].rstrip(b"\0")) if head.startswith(MAGIC) else None
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            return f"{what}. It is not a ScratchPipe row file: remove it or name another directory."
        keys = ("name", "table_rows", "optimizer", "dim", "weight_dtype", "packed")
        alive = _running(int(old.get("pid", -1))) and old.get("host") == socket.gethostname()
        by = (f"run {old.get('run_id')} (pid {old.get('pid')} on {old.get('host')}, started {old.get('created')}, "
              f"{'still running' if alive else 'not running'})")
        if any(old.get(k) != self.header[k] for k in keys):
            mine = ", ".join(f"{k}={self.header[k]}" for k in keys)
            theirs = ", ".join(f"{k}={old.get(k)}" for k in keys)
            return f"{what}, left by {by} for another table layout ({theirs}; this group: {mine}). Remove it or name another directory."
        return f"{what}, left by {by}. Remove it if that run is over, or name another directory."

    def views(self) -> Dict[str, torch.Tensor]:
        """Typed views of the rows through a shared mapping of the file: ``{"packed": [n, row]}``
        or one contiguous ``[n, ...]`` tensor per value."""
        out = {}
        for vname, (at, nbytes) in self.regions.items():
            m = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=at, shape=(max(nbytes, 1),))
            out[vname] = torch.from_numpy(m)[:nbytes]
        if "packed" in out:
            return {"packed": out["packed"].view(self.rows, self.layout.bytes_per_row)}
        return {v.name: out[v.name].view(v.dtype).view((self.rows,) + v.shape) for v in self.layout.values}

    def close(self, unlink: bool = True) -> None:
        """Wait for the I/O threads, close the file and (``unlink``) delete it."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for fd in (self.fd, getattr(self, "direct_fd", None)):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self.direct_fd = -1, None
        if unlink and os.path.exists(self.path):
            os.unlink(self.path)

    def _count(self, calls: str, nbytes: str, n_calls: int, n_bytes: int) -> None:
        with self._lock:
            self.stats[calls] += n_calls
            self.stats[nbytes] += n_bytes

    # ------------------------------------------------------------------ reads and writes
    def _jobs(self, n: int) -> List[Tuple[int, int]]:
        k = max(1, min(self.threads, n // MIN_JOB_ROWS))
        bounds = [n * i // k for i in range(k + 1)]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def read_into(self, rows: torch.Tensor, dest: torch.Tensor, dest_rows: torch.Tensor) -> List["Future[None]"]:
        """Start reading packed ``rows`` into ``dest[dest_rows]`` (``dest``: ``[m, bytes_per_row]``
        uint8); returns the jobs' futures (their errors are ``StoreError``)."""
        order = torch.argsort(rows)
        rows, dest_rows = rows[order], dest_rows[order]
        return [self.pool.submit(self._read_job, rows[a:b], dest, dest_rows[a:b]) for a, b in self._jobs(rows.numel())]

    def _read_job(self, rows: torch.Tensor, dest: torch.Tensor, dest_rows: torch.Tensor) -> None:
        k, row = rows.numel(), self.layout.bytes_per_row
        packed = dest.new_empty((k, row)) if len(self.segments) > 1 else None
        fd = self.direct_fd if self.direct_fd is not None else self.fd
        for seg in self.segments:
            off = seg.base + rows * seg.nbytes
            start, length, pos = runs(off, seg.nbytes, self.align)
            total = int(length.sum())
            raw = torch.empty(total + self.align, dtype=torch.uint8)
            skip = (-raw.data_ptr()) % self.align
            buf = raw[skip : skip + total]
            mv = memoryview(buf.numpy())  # type: ignore[arg-type]
            at = 0
            for s, n in zip(start.tolist(), length.tolist()):
                try:
                    got = self.io.preadv(fd, [mv[at : at + n]], s)
                except OSError as e:
                    raise StoreError(
                        f"file store {self.path!r}: reading {n} bytes at offset {s} failed: {_describe(e)}. The rows "
                        "stay in the file; check the disk, then resume from your last checkpoint."
                    ) from e
                if got != n:
                    raise StoreError(f"file store {self.path!r}: short read ({got} of {n} bytes at offset {s}); "
                                     "was the file truncated by another process?")
                at += n
            self._count("read_calls", "read_bytes", start.numel(), total)
            if self.align == 1:
                got_rows = buf.view(k, seg.nbytes)
            else:  # rows sit at 4-byte-aligned offsets in the blocks read: one strided gather
                words = buf.view(torch.int32).unfold(0, seg.nbytes // 4, 1)
                got_rows = words.index_select(0, pos // 4).view(torch.uint8)
            if packed is None:
                scatter_rows(dest, dest_rows, got_rows)
            else:
                packed[:, seg.at : seg.at + seg.nbytes] = got_rows
        if packed is not None:
            scatter_rows(dest, dest_rows, packed)

    def write(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Write packed rows to ``rows`` (distinct) and wait.

        Raises:
            StoreError: a write failed (names the file and the cause, e.g. a full disk).
        """
        wait_all(self.write_async(rows, packed))

    def write_async(self, rows: torch.Tensor, packed: torch.Tensor) -> List["Future[None]"]:
        """Start writing packed rows (``packed`` is not touched by the caller afterwards)."""
        if not rows.numel():
            return []
        order = torch.argsort(rows)
        rows, packed = rows[order], packed.index_select(0, order)
        self._note_written(rows.numel() * self.layout.bytes_per_row)
        return [self.pool.submit(self._write_job, rows[a:b], packed[a:b]) for a, b in self._jobs(rows.numel())]

    def _note_written(self, nbytes: int) -> None:
        self._written += nbytes
        if self._written >= _DROP_EVERY and hasattr(os, "posix_fadvise"):
            self._written = 0
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written pages need not stay cached

    def _write_job(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        for seg in self.segments:
            data = packed[:, seg.at : seg.at + seg.nbytes].contiguous().view(-1)
            start, length, _ = runs(seg.base + rows * seg.nbytes, seg.nbytes, 1)
            bases = torch.cumsum(length, 0) - length  # each run's rows, one after the other in ``data``
            mv = memoryview(data.numpy())  # type: ignore[arg-type]
            for s, n, p in zip(start.tolist(), length.tolist(), bases.tolist()):
                done = 0
                while done < n:
                    try:
                        done += self.io.pwrite(self.fd, mv[p + done : p + n], s + done)
                    except OSError as e:
                        raise StoreError(
                            f"file store {self.path!r}: writing {n} bytes at offset {s} failed: {_describe(e)}. "
                            "The rows stay in memory and are written again at the next flush or read of them; "
                            "free space there (or stop and resume from your last checkpoint)."
                        ) from e
            self._count("write_calls", "write_bytes", start.numel(), data.numel())


def wait_all(futures: Sequence["Future[None]"]) -> None:
    """Wait for every future, then raise the first error (so no job is left running)."""
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
