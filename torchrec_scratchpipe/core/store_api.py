"""The backing-store seam: what the mover, the table group, the engine and the TorchRec
kernel ask of the full tables, and which store a group gets.

Two stores implement ``RowStore``:

- ``BackingStore`` (``core/store.py``): every row in host memory (the default);
- ``FileStore`` (``core/file_store.py``): every row in a file, a host-memory cache of a
  configured size in front of it, rows read ahead from the look-ahead window.

Callers see one contract: ``gather`` packed rows on their way into the scratchpad,
``scatter`` victims on their way out, typed ``weights`` / ``states`` views of the whole
store (what state dicts, loads and init read and write), valid after ``flush`` and to be
followed by ``invalidate`` once written from outside, and ``read_ahead`` / ``collected``
hints from the window (no-ops for the host store). ``StoreSpec`` names the store in a
``ScratchPipeConfig`` (and so in a sharding plan); ``open_store`` builds it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from torchrec_scratchpipe.core.layout import RowLayout

#: ``StoreSpec.kind`` values.
STORE_KINDS = ("host", "file")


class StoreError(RuntimeError):
    """A backing store cannot do what was asked (a full disk, a read error, a bad directory,
    a file left by another run); the message names the file and what to do."""


@dataclass(frozen=True)
class StoreSpec:
    """Which backing store a table group keeps its full tables in.

    Args:
        kind: ``"host"`` (host memory, the default) or ``"file"`` (a file per table group
            in ``directory``, behind a host-memory cache).
        directory: where a file store puts its files (must exist and be writable).
        host_cache_bytes: host-memory cache of a file store, per table shard (a table group
            of ``n`` tables gets ``n`` times this, at most its tables' bytes).
        io_threads: reads and writes a file store keeps in flight at once.
        direct: read with ``O_DIRECT`` (None: where the file system supports it), so the
            page cache does not hold a second copy beside the host cache.

    Example::

        >>> StoreSpec.parse("file:/tmp", host_cache_mb=64).host_cache_bytes
        67108864
        >>> StoreSpec("file")
        Traceback (most recent call last):
        ...
        ValueError: a file store needs a directory: StoreSpec(kind="file", directory=DIR) or --store file:DIR.
    """

    kind: str = "host"
    directory: Optional[str] = None
    host_cache_bytes: Optional[int] = None
    io_threads: int = 32
    direct: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.kind not in STORE_KINDS:
            raise ValueError(f"store kind must be one of {list(STORE_KINDS)}, got {self.kind!r}.")
        if self.kind == "host":
            if self.directory is not None or self.host_cache_bytes is not None:
                raise ValueError(
                    "directory and host_cache_bytes are settings of a file store; the host store keeps every "
                    "row in memory: use StoreSpec(kind='file', ...) or drop them."
                )
            return
        if not self.directory:
            raise ValueError('a file store needs a directory: StoreSpec(kind="file", directory=DIR) or --store file:DIR.')
        hc = self.host_cache_bytes
        if hc is None or isinstance(hc, bool) or not isinstance(hc, int) or hc <= 0:
            raise ValueError(
                f"a file store needs host_cache_bytes > 0 (its host-memory cache per table shard), got {hc!r}: "
                "set it (or --host-cache-mb N)."
            )
        if not isinstance(self.io_threads, int) or not 1 <= self.io_threads <= 1024:
            raise ValueError(f"store io_threads must be an int in [1, 1024], got {self.io_threads!r}.")

    @staticmethod
    def parse(text: str, host_cache_mb: Optional[float] = None) -> "StoreSpec":
        """``"host"`` or ``"file:DIR"`` (as ``--store`` takes it), with a cache of ``host_cache_mb`` MiB."""
        if text == "host":
            if host_cache_mb is not None:
                raise ValueError("--host-cache-mb is for --store file:DIR; the host store has no cache.")
            return StoreSpec()
        if text.startswith("file:") and len(text) > 5:
            if host_cache_mb is None:
                raise ValueError("--store file:DIR needs --host-cache-mb N (the host-memory cache per table, MiB).")
            return StoreSpec("file", text[5:], int(float(host_cache_mb) * (1 << 20)))
        raise ValueError(f"store must be 'host' or 'file:DIR', got {text!r}.")

    @property
    def label(self) -> str:
        """How reports name the store (``host`` or ``file:DIR (host cache N MiB per table)``)."""
        if self.kind == "host":
            return "host"
        return f"file:{self.directory} (host cache {(self.host_cache_bytes or 0) / 2**20:g} MiB per table)"

    def check_directory(self) -> None:
        """Raise a ``StoreError`` unless ``directory`` exists, is a directory and is writable."""
        d = str(self.directory)
        if not os.path.exists(d):
            raise StoreError(f"file store directory {d!r} does not exist: create it or name another one.")
        if not os.path.isdir(d):
            raise StoreError(f"file store directory {d!r} is not a directory: name a directory.")
        if not os.access(d, os.W_OK | os.X_OK):
            raise StoreError(f"file store directory {d!r} is not writable by this process: fix its permissions or name another one.")


class RowStore(ABC):
    """The full tables of one table group: packed rows (``RowLayout``) in one row space.

    Table ``t`` owns rows ``[offsets[t], offsets[t + 1])``. ``weights`` and ``states``
    view every row's values (typed; contiguous per value when the store is unpacked).
    """

    layout: RowLayout
    table_rows: List[int]
    offsets: torch.Tensor
    weights: torch.Tensor
    states: Dict[str, torch.Tensor]

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def reads_ahead(self) -> bool:
        """Whether ``read_ahead`` does anything (callers skip computing its rows otherwise)."""
        return False

    @abstractmethod
    def nbytes(self) -> int:
        """Host memory the store allocates."""

    @abstractmethod
    def gather(self, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Packed rows ``[len(rows), bytes_per_row]`` of distinct ``rows`` on their way into the
        scratchpad (collect); a store may drop its cached copies of them. Written into
        ``out[:len(rows)]`` when given (e.g. pinned staging); the result is a view of it."""

    @abstractmethod
    def scatter(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Write packed rows (as ``gather`` returns them) to distinct ``rows`` (write-back)."""

    def weights_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The current weights ``[len(rows), dim]`` of ``rows`` (a copy; reads change nothing)."""
        return self.weights.index_select(0, rows)

    def read_ahead(self, rows: torch.Tensor, step: int) -> None:
        """Hint: batch ``step`` will collect ``rows`` (not resident now); start reading them."""

    def collected(self, step: int) -> None:
        """Hint: every batch up to ``step`` has collected its rows."""

    def flush(self) -> None:
        """Make ``weights`` / ``states`` current (write cached updates through)."""

    def invalidate(self) -> None:
        """``weights`` / ``states`` were written from outside: forget cached copies."""

    def close(self) -> None:
        """Release files and threads (the store is unusable afterwards)."""

    def table_view(self, tensor: torch.Tensor, t: int) -> torch.Tensor:
        """Rows of table ``t`` in ``tensor`` (a view, no copy)."""
        return tensor[int(self.offsets[t]) : int(self.offsets[t + 1])]

    def views(self, packed: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Typed views (weights, states) of packed rows of this store's layout."""
        from torchrec_scratchpipe.core.store import row_views

        return row_views(packed, self.layout)

    def empty_rows(self, n: int, device: Optional[torch.device] = None, pin: bool = False) -> torch.Tensor:
        """``n`` packed rows of this store's layout, e.g. a buffer for ``gather(out=...)``."""
        from torchrec_scratchpipe.core.store import empty_rows

        return empty_rows(n, self.layout, device, pin)


def open_store(
    spec: Optional[StoreSpec], table_rows: Sequence[int], layout: RowLayout, packed: bool, name: str
) -> RowStore:
    """The store ``spec`` names for a table group (``name`` names its file).

    Args:
        spec: None or ``kind="host"``: a ``BackingStore``; ``kind="file"``: a ``FileStore``.
        table_rows: rows of each table, in group order.
        layout: what one row holds.
        packed: rows packed (True) or one contiguous region per value (TorchRec's
            ShardedTensors need the latter).
        name: the group's tables (the file store's file name and messages).

    Example::

        >>> from torchrec_scratchpipe.core.layout import EmbOptimType
        >>> type(open_store(None, [4], RowLayout(EmbOptimType.EXACT_SGD, 4), True, "t0")).__name__
        'BackingStore'
    """
    if spec is None or spec.kind == "host":
        from torchrec_scratchpipe.core.store import BackingStore

        return BackingStore(table_rows, layout, packed=packed)
    from torchrec_scratchpipe.core.file_store import FileStore

    return FileStore(spec, table_rows, layout, packed=packed, name=name)
