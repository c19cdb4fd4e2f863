"""FBGEMM request-trace files (the format of Meta's public ``dlrm_datasets`` traces).

A trace file holds a ``torch.save``d tuple ``(indices, offsets, lengths)``:

- ``lengths``: int tensor ``[T, B]`` (T tables, B samples), bag sizes;
- ``offsets``: int tensor ``[T * B + 1]``, table-major: table 0's B bags, then table
  1's, ... ``offsets[0] == 0`` and ``offsets[-1] == indices.numel()``;
- ``indices``: int64 row ids, all bags concatenated in the same order.

Files may be gzipped (detected by the gzip magic bytes when reading); a gzipped file is
inflated in memory chunk by chunk and refused once it grows past ``MAX_GZIP_RATIO`` times
its size (at least ``MIN_GZIP_LIMIT``), before a file that is no trace fills memory. Table-major order
is exactly TorchRec's key-major ``KeyedJaggedTensor`` layout, so a trace converts to a
KJT without copying.

Example:
    >>> import torch, tempfile, os
    >>> lengths = torch.tensor([[1, 2], [0, 1]])
    >>> offsets = torch.tensor([0, 1, 3, 3, 4])
    >>> indices = torch.tensor([5, 1, 2, 7])
    >>> path = os.path.join(tempfile.mkdtemp(), "t.pt.gz")
    >>> write_request_trace(path, indices, offsets, lengths)
    >>> read_request_trace(path).num_samples
    2
"""

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

PathLike = Union[str, "os.PathLike[str]"]
GZIP_MAGIC = b"\x1f\x8b"


def _default_names(num_tables: int) -> List[str]:
    return [f"f{i}" for i in range(num_tables)]


def _check(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{source}: invalid request trace: {message}")


@dataclass
class RequestTrace:
    """An in-memory request trace.

    Args:
        indices: int64 ``[N]`` row ids, bags concatenated table-major.
        offsets: int64 ``[T * B + 1]`` bag offsets into ``indices``.
        lengths: int64 ``[T, B]`` bag sizes.
        num_embeddings: optional rows per table (traces do not store it); when absent,
            :meth:`table_sizes` infers ``max id + 1`` per table.

    Example:
        >>> tr = RequestTrace.from_lengths(torch.tensor([3, 4, 9]), torch.tensor([[1, 1], [1, 0]]))
        >>> tr.to_kjt().keys(), tr.num_tables, tr.num_samples
        (['f0', 'f1'], 2, 2)
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    num_embeddings: Optional[List[int]] = None

    def __post_init__(self) -> None:
        self.validate("RequestTrace")

    @classmethod
    def from_lengths(cls, indices: torch.Tensor, lengths: torch.Tensor,
                     num_embeddings: Optional[List[int]] = None) -> "RequestTrace":
        """Build a trace from ``indices`` and ``lengths [T, B]`` (offsets computed)."""
        lengths = lengths.to(torch.int64)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths.reshape(-1), 0)
        return cls(indices.to(torch.int64), offsets, lengths, num_embeddings)

    @classmethod
    def _unchecked(cls, indices: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                   num_embeddings: Optional[List[int]]) -> "RequestTrace":
        trace = cls.__new__(cls)
        trace.indices, trace.offsets, trace.lengths, trace.num_embeddings = indices, offsets, lengths, num_embeddings
        return trace

    @classmethod
    def from_kjt(cls, kjt: KeyedJaggedTensor, num_embeddings: Optional[List[int]] = None) -> "RequestTrace":
        """Build a trace from a (non-variable-batch) KJT; keys become tables in order."""
        num_tables = len(kjt.keys())
        lengths = kjt.lengths().to(torch.int64).view(num_tables, -1)
        return cls.from_lengths(kjt.values(), lengths, num_embeddings)

    def validate(self, source: str = "RequestTrace") -> None:
        """Check shapes and consistency; raise ``ValueError`` naming ``source`` if wrong."""
        for name in ("indices", "offsets", "lengths"):
            value = getattr(self, name)
            _check(isinstance(value, torch.Tensor), source, f"{name} must be a torch.Tensor, got {type(value).__name__}")
            _check(not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool,
                   source, f"{name} must have an integer dtype, got {value.dtype}")
        self.indices = self.indices.to(torch.int64)
        self.offsets = self.offsets.to(torch.int64)
        self.lengths = self.lengths.to(torch.int64)
        _check(self.lengths.dim() == 2, source,
               f"lengths must have shape [T, B] (tables, samples), got shape {list(self.lengths.shape)}")
        _check(self.indices.dim() == 1, source, f"indices must be 1-D, got shape {list(self.indices.shape)}")
        t, b = self.lengths.shape
        _check(self.offsets.dim() == 1 and self.offsets.numel() == t * b + 1, source,
               f"offsets must be 1-D of size T*B+1 = {t}*{b}+1 = {t * b + 1} for lengths {[t, b]}, "
               f"got shape {list(self.offsets.shape)}")
        _check(int(self.offsets[0]) == 0, source, f"offsets[0] must be 0, got {int(self.offsets[0])}")
        _check(int(self.offsets[-1]) == self.indices.numel(), source,
               f"offsets[-1] = {int(self.offsets[-1])} but indices has {self.indices.numel()} elements")
        diffs = self.offsets[1:] - self.offsets[:-1]
        bad = (diffs != self.lengths.reshape(-1)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            _check(False, source, f"offsets do not match lengths at table {i // b}, sample {i % b}: "
                   f"offsets give {int(diffs[i])}, lengths[{i // b}, {i % b}] = {int(self.lengths.view(-1)[i])}")
        _check(bool((self.lengths >= 0).all()), source, "lengths must be non-negative")
        if self.indices.numel():
            _check(int(self.indices.min()) >= 0, source, f"indices must be >= 0, found {int(self.indices.min())}")
        if self.num_embeddings is not None:
            _check(len(self.num_embeddings) == t, source,
                   f"num_embeddings has {len(self.num_embeddings)} entries but the trace has {t} tables")
            for table, (n, hi) in enumerate(zip(self.num_embeddings, self._table_max())):
                _check(hi < n, source, f"table {table} has id {hi} but num_embeddings[{table}] = {n}")

    @property
    def num_tables(self) -> int:
        """T, the number of tables (features)."""
        return int(self.lengths.shape[0])

    @property
    def num_samples(self) -> int:
        """B, the number of samples."""
        return int(self.lengths.shape[1])

    def _table_bounds(self) -> torch.Tensor:
        """``[T + 1]`` offsets of each table's block in ``indices``."""
        return self.offsets[:: self.num_samples] if self.num_samples else torch.zeros(self.num_tables + 1, dtype=torch.int64)

    def _table_max(self) -> List[int]:
        bounds = self._table_bounds().tolist()
        return [int(self.indices[s:e].max()) if e > s else -1 for s, e in zip(bounds[:-1], bounds[1:])]

    def table_sizes(self) -> List[int]:
        """Rows per table: ``num_embeddings`` if given, else ``max id + 1`` (at least 1)."""
        if self.num_embeddings is not None:
            return list(self.num_embeddings)
        return [max(1, m + 1) for m in self._table_max()]

    def table_ids(self, table: int) -> torch.Tensor:
        """All ids of ``table`` over all samples, in order (a view)."""
        bounds = self._table_bounds()
        return self.indices[int(bounds[table]):int(bounds[table + 1])]

    def to_kjt(self, feature_names: Optional[Sequence[str]] = None) -> KeyedJaggedTensor:
        """The whole trace as one KJT (keys default ``f0..f{T-1}``); shares memory."""
        keys = list(feature_names) if feature_names is not None else _default_names(self.num_tables)
        if len(keys) != self.num_tables:
            raise ValueError(f"feature_names has {len(keys)} names but the trace has {self.num_tables} tables")
        return KeyedJaggedTensor(keys=keys, values=self.indices, lengths=self.lengths.reshape(-1),
                                 offsets=self.offsets)

    def select(self, start: int, end: int) -> "RequestTrace":
        """Samples ``[start, end)`` of every table as a new trace (vectorized gather)."""
        b = self.num_samples
        if not 0 <= start <= end <= b:
            raise ValueError(f"sample range [{start}, {end}) is outside [0, {b}]")
        table_base = torch.arange(self.num_tables, dtype=torch.int64) * b
        seg_start = self.offsets[table_base + start]
        seg_len = self.offsets[table_base + end] - seg_start
        out_start = torch.cumsum(seg_len, 0) - seg_len
        total = int(seg_len.sum())
        shift = torch.repeat_interleave(seg_start - out_start, seg_len, output_size=total)
        gather = torch.arange(total, dtype=torch.int64) + shift
        lengths = self.lengths[:, start:end].contiguous()
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths.reshape(-1), 0)
        return RequestTrace._unchecked(self.indices[gather], offsets, lengths, self.num_embeddings)

    def batches(self, batch_size: int, feature_names: Optional[Sequence[str]] = None,
                drop_last: bool = False) -> Iterator[KeyedJaggedTensor]:
        """Consecutive mini-batches of ``batch_size`` samples, in order, as KJTs.

        Args:
            batch_size: samples per batch.
            feature_names: KJT keys (default ``f0..f{T-1}``).
            drop_last: drop a final batch smaller than ``batch_size``. By default
                (``False``) the last partial batch is kept.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        b = self.num_samples
        stop = b - b % batch_size if drop_last else b
        for start in range(0, stop, batch_size):
            yield self.select(start, min(start + batch_size, b)).to_kjt(feature_names)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        return self.num_samples // batch_size if drop_last else -(-self.num_samples // batch_size)

    def save(self, path: PathLike, compress: Optional[bool] = None) -> None:
        """Write this trace with :func:`write_request_trace`."""
        write_request_trace(path, self.indices, self.offsets, self.lengths, compress=compress)


def write_request_trace(path: PathLike, indices: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                        compress: Optional[bool] = None) -> None:
    """Write ``(indices, offsets, lengths)`` as an FBGEMM request-trace file.

    Args:
        path: output file.
        indices: int64 ``[N]``; offsets: ``[T*B+1]`` table-major; lengths: ``[T, B]``.
        compress: gzip the file; ``None`` means "if ``path`` ends with ``.gz``".

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.pt")
        >>> write_request_trace(p, torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([[1]]))
    """
    trace = RequestTrace(indices, offsets, lengths)  # validates
    if compress is None:
        compress = str(path).endswith(".gz")
    buffer = io.BytesIO()
    torch.save((trace.indices, trace.offsets, trace.lengths), buffer)
    data = buffer.getvalue()
    if compress:
        with gzip.open(path, "wb", compresslevel=6) as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


#: Most bytes a gzipped trace may inflate to, per compressed byte. Request traces (int64
#: ids, lengths and offsets) compress a few times, rarely tenfold; far more is a file that
#: is not a trace (a run of zeros compresses a thousandfold), refused before it fills memory.
MAX_GZIP_RATIO = 100
#: The inflated size always allowed, however small the file.
MIN_GZIP_LIMIT = 64 * 2**20
_CHUNK = 2**20


def _gunzip(path: PathLike, limit: Optional[int] = None) -> io.BytesIO:
    """The decompressed bytes of a gzip file, read in chunks, refused past ``limit`` bytes
    (default ``max(MIN_GZIP_LIMIT, MAX_GZIP_RATIO x the file's size)``)."""
    size = os.path.getsize(path)
    limit = max(MIN_GZIP_LIMIT, MAX_GZIP_RATIO * size) if limit is None else limit
    out = io.BytesIO()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                if out.tell() > limit:
                    raise ValueError(
                        f"{path}: invalid request trace: its gzip data inflates past {limit:,} bytes "
                        f"({limit / max(size, 1):.0f}x the file's {size:,}), far more than a trace compresses; "
                        "if it is a trace, gunzip it and pass the uncompressed file")
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: invalid request trace: truncated or corrupt gzip data at byte {out.tell():,} "
                         f"of the inflated stream ({e})") from e
    out.seek(0)
    return out


def _load_tuple(path: PathLike) -> Tuple[object, ...]:
    with open(path, "rb") as f:
        magic = f.read(2)
    source: Union[str, io.BytesIO] = str(path)
    if magic == GZIP_MAGIC:  # torch.load needs a seekable file: decompress into memory
        source = _gunzip(path)
    try:
        obj = torch.load(source, weights_only=True)
    except Exception as e:  # torch raises several types for non-torch files
        raise ValueError(f"{path}: invalid request trace: not a torch.save file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        what = f"a {type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise ValueError(f"{path}: invalid request trace: expected a tuple (indices, offsets, lengths), got {what}")
    return tuple(obj)


def read_request_trace(path: PathLike, num_embeddings: Optional[List[int]] = None) -> RequestTrace:
    """Read and validate a request-trace file (gzipped or not).

    Args:
        path: the file.
        num_embeddings: optional rows per table, checked against the ids.

    Raises:
        ValueError: naming the file and what is inconsistent.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.pt")
        >>> write_request_trace(p, torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([[1]]))
        >>> read_request_trace(p).table_sizes()
        [2]
    """
    indices, offsets, lengths = _load_tuple(path)
    trace = RequestTrace._unchecked(indices, offsets, lengths, num_embeddings)  # type: ignore[arg-type]
    trace.validate(str(path))
    return trace
