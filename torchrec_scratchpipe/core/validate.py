"""Checks on input batches, run before any state changes."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_kjt(
    kjt: KeyedJaggedTensor,
    feature_names: Sequence[str],
    feature_tables: Sequence[str],
    feature_rows: torch.Tensor,
) -> Tuple[int, torch.Tensor]:
    """Validate a batch; return its batch size and the number of ids of each feature.

    Args:
        kjt: the batch.
        feature_names: keys expected, in order.
        feature_tables: table name of each feature (for messages).
        feature_rows: rows of each feature's table (int64, one per feature).

    Raises:
        ValueError: naming the feature/table and the offending value.
    """
    keys: List[str] = list(kjt.keys())
    if keys != list(feature_names):
        raise ValueError(
            f"batch keys {keys} do not match the engine's features {list(feature_names)}: "
            "pass a KeyedJaggedTensor with exactly these keys in this order."
        )
    values = kjt.values()
    if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
        raise ValueError(f"ids must be a 1-D int32/int64 tensor, got {values.dtype} {tuple(values.shape)}.")
    T = len(keys)
    lengths = kjt.lengths_or_none()
    offsets = kjt.offsets_or_none()
    if lengths is None:
        assert offsets is not None
        if offsets.numel() == 0 or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must start at 0 and never decrease.")
        lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() % T != 0:
        raise ValueError(f"{lengths.numel()} lengths cannot split evenly over {T} features.")
    if lengths.numel() and int(lengths.min()) < 0:
        bad = int(lengths[lengths < 0][0])
        f = int((lengths < 0).nonzero()[0]) // (lengths.numel() // T)
        raise ValueError(f"feature {keys[f]!r} (table {feature_tables[f]!r}) has a negative length {bad}.")
    total = int(lengths.sum())
    if total != values.numel():
        raise ValueError(
            f"lengths sum to {total} but there are {values.numel()} ids: lengths and values disagree."
        )
    if offsets is not None:
        expect = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        if offsets.numel() != expect.numel() or not torch.equal(offsets.to(expect.dtype), expect):
            raise ValueError("offsets are inconsistent with lengths (offsets must be the running sum).")
    weights = kjt.weights_or_none()
    if weights is not None and weights.numel() != values.numel():
        raise ValueError(f"{weights.numel()} per-sample weights for {values.numel()} ids.")
    B = lengths.numel() // T
    per_feature = lengths.view(T, B).sum(1)
    bounds = feature_rows.tolist()
    for f, ids in enumerate(torch.split(values, per_feature.tolist())):
        if ids.numel() == 0:
            continue
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= bounds[f]:
            bad = int(ids[(ids < 0) | (ids >= bounds[f])][0])
            raise ValueError(
                f"id {bad} of feature {keys[f]!r} is out of range for table {feature_tables[f]!r} "
                f"with {bounds[f]} rows (valid ids: 0..{bounds[f] - 1})."
            )
    return B, per_feature
