"""The file-backed store: same rows as the host store, read ahead, and faults that are
clear and lose nothing (a full disk, a read error, a bad directory, a file left behind)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_scratchpipe.core.file_store import FileStore
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.row_file import FileIO
from torchrec_scratchpipe.core.store import BackingStore
from torchrec_scratchpipe.core.store_api import StoreError, StoreSpec

LAYOUT = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 8)
ROWS = [50, 30]


def _spec(d: Path, cache_rows: int = 10, **kw: Any) -> StoreSpec:
    return StoreSpec("file", str(d), cache_rows * LAYOUT.bytes_per_row, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("packed,direct", [(True, None), (True, False), (False, None)])
def test_random_moves_match_the_host_store(tmp_path: Path, packed: bool, direct: Any) -> None:
    """Collects, write-backs (with and without eviction), flush-style write-backs and
    read-ahead in random order, as the engine issues them (a row is collected only when
    not resident, written back only when resident), against ``BackingStore``."""
    host = BackingStore(ROWS, LAYOUT, packed=packed)
    store = FileStore(_spec(tmp_path, direct=direct), ROWS, LAYOUT, packed, "a+b")
    g = torch.Generator().manual_seed(0)
    resident = torch.zeros(sum(ROWS), dtype=torch.bool)
    for step in range(300):
        op = int(torch.randint(0, 4, (1,), generator=g))
        pool = (~resident if op in (0, 2) else resident).nonzero().squeeze(1)
        rows = pool[torch.randperm(pool.numel(), generator=g)][: int(torch.randint(1, 20, (1,), generator=g))]
        if not rows.numel():
            continue
        if op == 0:
            assert torch.equal(host.gather(rows), store.gather(rows)), step
            resident[rows] = True
        elif op == 2:
            store.read_ahead(rows, step)
            store.collected(step - 3)
            assert torch.equal(_bits(host.weights_of(rows)), _bits(store.weights_of(rows))), step
        else:
            v = torch.randint(0, 255, (rows.numel(), LAYOUT.bytes_per_row), generator=g, dtype=torch.uint8)
            host.scatter(rows, v)
            store.scatter(rows, v)
            resident[rows] = resident[rows] & (op == 3)  # op 3: a flush (the row stays resident)
    r = resident.nonzero().squeeze(1)
    store.scatter(r, host.gather(r))
    store.flush()
    c = store.stats()
    assert c["read_ahead_rows"] > 0 and c["gather_hits"] > 0 and c["evicted_dirty_rows"] > 0, c
    assert torch.equal(_bits(host.weights), _bits(store.weights))
    for name in LAYOUT.state_names:
        assert torch.equal(_bits(host.states[name]), _bits(store.states[name]))
    assert store.file.align == (4096 if direct is None else 1)  # O_DIRECT on this ext4 /tmp, else buffered
    store.close()
    assert os.listdir(tmp_path) == []


def test_read_ahead_rows_are_protected_until_collected(tmp_path: Path) -> None:
    store = FileStore(_spec(tmp_path, cache_rows=8), [100], LAYOUT, True, "t")
    store.read_ahead(torch.arange(8), step=5)
    store.weights_of(torch.arange(8))  # waits for their reads: only batch 5's claim protects them now
    store.read_ahead(torch.arange(8, 16), step=6)  # every slot wanted by batch 5: nothing read now
    assert store.stats()["read_ahead_rows"] == 8 and store.stats()["read_ahead_skipped_rows"] == 8
    store.collected(5)
    store.read_ahead(torch.arange(8, 12), step=6)  # batch 5 collected: its rows may go
    assert store.stats()["read_ahead_rows"] == 12
    store.gather(torch.arange(8, 12))
    assert store.stats()["gather_hits"] == 4 and store.stats()["gather_file_rows"] == 0
    store.close()


class _Faulty(FileIO):
    """System calls that fail with ``errno`` on demand."""

    def __init__(self) -> None:
        self.read_errno = 0
        self.write_errno = 0
        self.fallocate_errno = 0

    def preadv(self, fd: int, buffers: List[memoryview], offset: int) -> int:
        if self.read_errno:
            raise OSError(self.read_errno, os.strerror(self.read_errno))
        return super().preadv(fd, buffers, offset)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.write_errno and offset > 0:
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        return super().pwrite(fd, data, offset)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        if self.fallocate_errno:
            raise OSError(self.fallocate_errno, os.strerror(self.fallocate_errno))
        super().fallocate(fd, offset, length)


class _SlowFirstWrite(FileIO):
    """The first row write takes a while: a later write of the same row would overtake it."""

    def __init__(self) -> None:
        self.slow = True

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if offset > 0 and self.slow:
            self.slow = False
            time.sleep(0.3)
        return super().pwrite(fd, data, offset)


def test_write_backs_of_one_row_land_in_order(tmp_path: Path) -> None:
    store = FileStore(_spec(tmp_path, cache_rows=1), [100], LAYOUT, True, "t", io=_SlowFirstWrite())
    v = torch.randint(0, 255, (3, LAYOUT.bytes_per_row), dtype=torch.uint8)
    store.scatter(torch.tensor([7]), v[:1])  # cached, dirty (a flush: row 7 stays resident)
    store.scatter(torch.tensor([8]), v[1:2])  # evicts 7: its (slow) write-back starts
    store.scatter(torch.tensor([7]), v[2:3])  # evicts 8; row 7 again, newer
    store.scatter(torch.tensor([9]), v[1:2])  # evicts 7 again: this write must land last
    store.flush()
    assert torch.equal(store.gather(torch.tensor([7])), v[2:3])
    store.close()


def test_full_disk_at_creation_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    io = _Faulty()
    io.fallocate_errno = errno.ENOSPC
    with pytest.raises(StoreError, match=r"cannot reserve .* bytes .* the disk is full .* Free space"):
        FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t", io=io)
    assert os.listdir(tmp_path) == []


def test_file_size_limit_is_refused_when_the_store_is_made(tmp_path: Path) -> None:
    """A real limit (RLIMIT_FSIZE in a child process): the space reservation fails, clearly."""
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec_scratchpipe.core.file_store import FileStore
        from torchrec_scratchpipe.core.layout import RowLayout
        from torchrec_scratchpipe.core.store_api import StoreError, StoreSpec
        try:
            FileStore(StoreSpec("file", {str(tmp_path)!r}, 1 << 20), [100000], RowLayout(EmbOptimType.EXACT_SGD, 64), True, "t")
        except StoreError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "ERR file store: cannot reserve" in out.stdout and "file size limit" in out.stdout, out.stdout + out.stderr
    assert os.listdir(tmp_path) == []


def test_read_error_is_clear_and_the_rows_stay_in_the_file(tmp_path: Path) -> None:
    io = _Faulty()
    store = FileStore(_spec(tmp_path), [100], LAYOUT, True, "t", io=io)
    rows = torch.tensor([3, 40, 41])
    v = torch.randint(0, 255, (3, LAYOUT.bytes_per_row), dtype=torch.uint8)
    store.scatter(rows, v)
    store.flush()
    store.invalidate()  # the rows are only in the file now
    io.read_errno = errno.EIO
    with pytest.raises(StoreError, match=r"reading .* failed: an I/O error .* stay in the file"):
        store.gather(rows)
    store.read_ahead(rows, step=0)
    with pytest.raises(StoreError, match="an I/O error"):
        store.gather(rows)  # the failed read-ahead is reported when its rows are collected
    io.read_errno = 0
    assert torch.equal(store.gather(rows), v)  # nothing was lost
    store.close()


def test_write_error_on_eviction_is_clear_and_loses_nothing(tmp_path: Path) -> None:
    io = _Faulty()
    store = FileStore(_spec(tmp_path, cache_rows=4), [100], LAYOUT, True, "t", io=io)
    v = torch.randint(0, 255, (8, LAYOUT.bytes_per_row), dtype=torch.uint8)
    store.scatter(torch.arange(4), v[:4])  # fills the cache, dirty
    io.write_errno = errno.ENOSPC
    store.scatter(torch.arange(4, 8), v[4:])  # evicts the first four: their write-back fails
    for _ in range(2):  # every read or flush of them reports it while the disk is full
        with pytest.raises(StoreError, match=r"writing .* failed: the disk is full"):
            store.flush()
    with pytest.raises(StoreError, match="the disk is full"):
        store.gather(torch.arange(2))  # never a stale read
    io.write_errno = 0  # space freed: the rows kept in memory are written, nothing was lost
    store.flush()
    assert torch.equal(store.gather(torch.arange(8)), v)
    store.close()


def test_bad_directories_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist: create it"):
        FileStore(_spec(tmp_path / "missing"), ROWS, LAYOUT, True, "t")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        FileStore(_spec(tmp_path / "file"), ROWS, LAYOUT, True, "t")
    with pytest.raises(StoreError, match="cannot create|not writable"):  # /proc refuses new files, even to root
        FileStore(StoreSpec("file", "/proc", 1 << 12), ROWS, LAYOUT, True, "t")


def test_a_file_left_by_another_run_or_layout_is_refused(tmp_path: Path) -> None:
    first = FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t")
    path = first.file.path
    os.link(path, path + ".kept")  # what a crashed run leaves behind
    first.close()
    os.rename(path + ".kept", path)
    with pytest.raises(StoreError, match=r"already exists; it is a working copy .* not a checkpoint .* left by run [0-9a-f]{32}"):
        FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t")
    with pytest.raises(StoreError, match=r"for another table layout .*table_rows=\[50, 30\].*table_rows=\[50, 31\]"):
        FileStore(_spec(tmp_path), [50, 31], LAYOUT, True, "t")
    Path(path).write_bytes(b"not ours")
    with pytest.raises(StoreError, match="not a ScratchPipe row file"):
        FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t")
    assert Path(path).read_bytes() == b"not ours"  # never deleted or reused


def test_two_live_stores_of_one_group_get_two_files_and_copies_are_refused(tmp_path: Path) -> None:
    a = FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t")
    b = FileStore(_spec(tmp_path), ROWS, LAYOUT, True, "t")
    assert a.file.path != b.file.path and len(os.listdir(tmp_path)) == 2
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        pickle.dumps(a)
    del a, b
    import gc

    gc.collect()
    assert os.listdir(tmp_path) == []  # deleted when the stores go


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "disk"}, "store kind must be one of"),
        ({"kind": "file"}, "a file store needs a directory"),
        ({"kind": "file", "directory": "/tmp"}, "needs host_cache_bytes > 0"),
        ({"kind": "file", "directory": "/tmp", "host_cache_bytes": -1}, "needs host_cache_bytes > 0"),
        ({"kind": "file", "directory": "/tmp", "host_cache_bytes": 1, "io_threads": 0}, "io_threads must be"),
        ({"kind": "host", "host_cache_bytes": 1}, "settings of a file store"),
    ],
)
def test_store_spec_refuses_bad_values(kwargs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StoreSpec(**kwargs)


def test_store_flags_parse_or_are_refused() -> None:
    assert StoreSpec.parse("host") == StoreSpec()
    with pytest.raises(ValueError, match="needs --host-cache-mb"):
        StoreSpec.parse("file:/tmp")
    with pytest.raises(ValueError, match="must be 'host' or 'file:DIR'"):
        StoreSpec.parse("ssd")
