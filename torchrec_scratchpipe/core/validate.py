"""Input batches: the host copy of their ids, the checks on it, and the split into groups.

On CUDA the planner and the checks read one host copy of a batch's ids and lengths,
made with ``non_blocking`` copies into pinned memory on the stream that produced the ids
(TorchRec's data-distribution stream in a pipeline) and completed by an event
(``host_ids``). Waiting for that event is the only wait on the device: no check reads a
device tensor, so the training stream is never synchronized with the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class HostIds:
    """A batch's keys, ids and lengths in host memory, as the planner and the checks read them.

    Args:
        keys: feature names.
        values: ids (host).
        lengths: ids per bag (host), or None when the batch has only offsets.
        offsets: running sum of lengths (host), or None when the batch has only lengths.
        num_weights: number of per-sample weights (None: no weights).
        ready: CUDA event after which the host tensors hold the batch (None: already there).
    """

    keys: List[str]
    values: torch.Tensor
    lengths: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]
    num_weights: Optional[int] = None
    ready: Optional["torch.cuda.Event"] = None

    def wait(self) -> None:
        """Block until the copies have landed (a wait on their event only)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


def _to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def host_ids(kjt: KeyedJaggedTensor, stream: Optional["torch.cuda.Stream"] = None) -> HostIds:
    """Start copying ``kjt``'s ids and lengths to pinned host memory.

    On CPU nothing is copied. The copies run on ``stream`` (default: the current one):
    pass the stream that produced the ids (a pipeline's data-distribution stream), so that
    waiting for them never waits for training work queued behind them.

    Args:
        kjt: the batch.
        stream: the CUDA stream to copy on.

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f0"], torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
        >>> h = host_ids(kjt); h.wait(); h.values.tolist(), h.lengths.tolist()
        ([1, 2, 3], [1, 2])
    """
    values = kjt.values()
    weights = kjt.weights_or_none()
    on_cuda = values.device.type == "cuda"
    with torch.cuda.stream(stream) if on_cuda and stream is not None else contextlib.nullcontext():
        host = HostIds(
            list(kjt.keys()), _to_host(values), _to_host(kjt.lengths_or_none()), _to_host(kjt.offsets_or_none()),  # type: ignore[arg-type]
            None if weights is None else weights.numel(),
        )
        if on_cuda:
            host.ready = torch.cuda.Event()
            host.ready.record(torch.cuda.current_stream(values.device))
    return host


def id_out_of_range(bad_id: int, feature: str, table: str, rows: int) -> str:
    """The one message for an id outside its table (the engine's checks and the pipeline's).

    Example::

        >>> id_out_of_range(12, "f", "t", 10)
        "id 12 of feature 'f' is out of range for table 't' with 10 rows (valid ids: 0..9)."
    """
    return f"id {bad_id} of feature {feature!r} is out of range for table {table!r} with {rows} rows (valid ids: 0..{rows - 1})."


def check_kjt(
    kjt: Union[KeyedJaggedTensor, HostIds],
    feature_names: Sequence[str],
    feature_tables: Sequence[str],
    feature_rows: torch.Tensor,
) -> Tuple[int, torch.Tensor]:
    """Validate a batch; return its batch size and the number of ids of each feature (host).

    Args:
        kjt: the batch, or its host copy (``host_ids``).
        feature_names: keys expected, in order.
        feature_tables: table name of each feature (for messages).
        feature_rows: rows of each feature's table (int64, one per feature).

    Raises:
        ValueError: naming the feature/table and the offending value.
    """
    host = kjt if isinstance(kjt, HostIds) else host_ids(kjt)
    host.wait()
    keys = host.keys
    if keys != list(feature_names):
        raise ValueError(
            f"batch keys {keys} do not match the engine's features {list(feature_names)}: "
            "pass a KeyedJaggedTensor with exactly these keys in this order."
        )
    values = host.values
    if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
        raise ValueError(f"ids must be a 1-D int32/int64 tensor, got {values.dtype} {tuple(values.shape)}.")
    T = len(keys)
    lengths, offsets = host.lengths, host.offsets
    if lengths is None:
        assert offsets is not None
        if offsets.numel() == 0 or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must start at 0 and never decrease.")
        lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() % T != 0:
        raise ValueError(f"{lengths.numel()} lengths cannot split evenly over {T} features.")
    negative = lengths < 0
    if bool(negative.any()):
        at = int(negative.nonzero()[0])
        f = at // (lengths.numel() // T)
        raise ValueError(f"feature {keys[f]!r} (table {feature_tables[f]!r}) has a negative length {int(lengths[at])}.")
    total = int(lengths.sum())
    if total != values.numel():
        raise ValueError(
            f"lengths sum to {total} but there are {values.numel()} ids: lengths and values disagree."
        )
    if offsets is not None:
        expect = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        if offsets.numel() != expect.numel() or not torch.equal(offsets.to(expect.dtype), expect):
            raise ValueError("offsets are inconsistent with lengths (offsets must be the running sum).")
    if host.num_weights is not None and host.num_weights != values.numel():
        raise ValueError(f"{host.num_weights} per-sample weights for {values.numel()} ids.")
    B = lengths.numel() // T
    per_feature = lengths.view(T, B).sum(1)
    # one min/max per feature (small single-threaded reductions), compared all at once
    chunks = torch.split(values, per_feature.tolist())
    present = [f for f, ids in enumerate(chunks) if ids.numel()]
    if present:
        lo_hi = torch.stack([torch.stack(torch.aminmax(chunks[f])) for f in present])
        bad = (lo_hi[:, 0] < 0) | (lo_hi[:, 1] >= feature_rows[present])
        if bool(bad.any()):
            f = present[int(bad.nonzero()[0])]
            ids, rows = chunks[f], int(feature_rows[f])
            raise ValueError(id_out_of_range(int(ids[(ids < 0) | (ids >= rows)][0]), keys[f], feature_tables[f], rows))
    return B, per_feature


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (host) on ``device``: through pinned memory and without a host wait on CUDA."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def split_groups(
    kjt: KeyedJaggedTensor,
    host: HostIds,
    per_feature: torch.Tensor,
    groups: Sequence[Sequence[int]],
    device: torch.device,
) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Per group of features: its ids (host, int64), offsets and per-sample weights (device).

    Everything is computed from the host copy; device tensors are only indexed, never
    read back, so splitting takes no host synchronization.

    Args:
        kjt: the (checked) batch, whose per-sample weights stay on their device.
        host: its host copy, after ``wait``.
        per_feature: ids of each feature (host), from ``check_kjt``.
        groups: feature indices of each group, in the group's order.
        device: where offsets and weights go.
    """
    weights = kjt.weights_or_none()
    values = host.values.to(torch.int64)
    T = len(host.keys)
    if len(groups) == 1 and list(groups[0]) == list(range(T)):
        offsets = host.offsets if host.offsets is not None else _running_sum(host.lengths)  # type: ignore[arg-type]
        w = weights.to(device, non_blocking=True) if weights is not None else None
        return [(values, to_device(offsets.to(torch.int64), device), w)]
    lengths = host.lengths if host.lengths is not None else host.offsets[1:] - host.offsets[:-1]  # type: ignore[index]
    by_feature = lengths.view(T, -1)
    starts = per_feature.cumsum(0) - per_feature
    out = []
    for feats in groups:
        pos = torch.cat([torch.arange(int(starts[f]), int(starts[f] + per_feature[f])) for f in feats])
        offsets = _running_sum(by_feature[list(feats)].reshape(-1))
        w = weights.index_select(0, to_device(pos, weights.device)) if weights is not None else None
        out.append((values.index_select(0, pos), to_device(offsets, device), w if w is None else w.to(device)))
    return out


def _running_sum(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int64)
