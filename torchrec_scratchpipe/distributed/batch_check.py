"""Refusing a bad batch on every rank: global id checks and a cheap agreement between ranks.

A pipeline checks each batch's ids against the global table sizes before TorchRec's
input dist splits them across ranks (after it, a row-wise shard sees only local ids),
and a batch that one rank refuses must be dropped by all of them, or the others would
wait in the next collective until the process group times out.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_scratchpipe.core.validate import id_out_of_range


def out_of_range(kjt: KeyedJaggedTensor, tables: Dict[str, Tuple[str, int]], rank: int = 0) -> Optional[str]:
    """The first id of ``kjt`` outside its table, described, or None when all fit.

    Args:
        kjt: a (global, not yet input-distributed) batch.
        tables: feature -> (table name, table rows); other features are not checked.
        rank: the rank holding this batch (for the message).

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3, 12]), torch.tensor([1, 1]))
        >>> out_of_range(kjt, {"f": ("t", 10)})
        "rank 0: id 12 of feature 'f' is out of range for table 't' with 10 rows (valid ids: 0..9)."
    """
    values = kjt.values()
    if values.numel() == 0:
        return None
    keys = kjt.keys()
    per_key = torch.tensor(kjt.length_per_key())
    bound = torch.tensor([tables[k][1] if k in tables else torch.iinfo(torch.int64).max for k in keys])
    ids = values.to("cpu", torch.int64)
    limit = torch.repeat_interleave(bound, per_key, output_size=ids.numel())
    bad = ((ids < 0) | (ids >= limit)).nonzero()
    if bad.numel() == 0:
        return None
    i = int(bad[0, 0])
    f = int(torch.searchsorted(per_key.cumsum(0), i, right=True))
    table, rows = tables[keys[f]]
    return f"rank {rank}: {id_out_of_range(int(ids[i]), keys[f], table, rows)}"


class BatchAgreement:
    """Tells every rank whether any rank refused the current batch, and why.

    One 8-byte all-reduce per batch on a gloo group (no device synchronization); only
    when some rank refused, an all-gather of the messages, so all ranks raise the same one.

    Args:
        pg: the model's process group (None or world size 1: no communication).

    Example::

        >>> BatchAgreement(None).first_error("rank 0: bad id", ValueError)
        ValueError('batch dropped: rank 0: bad id')
    """

    def __init__(self, pg: Optional[dist.ProcessGroup]) -> None:
        distributed = pg is not None and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(pg) if distributed else 0
        self.world_size = dist.get_world_size(pg) if distributed else 1
        self._group: Optional[dist.ProcessGroup] = None
        if self.world_size > 1:
            ranks = dist.get_process_group_ranks(pg)  # type: ignore[arg-type]
            self._group = pg if dist.get_backend(pg) == "gloo" else dist.new_group(ranks, backend="gloo")

    def first_error(self, error: Optional[str], kind: type = ValueError) -> Optional[Exception]:
        """Combine this rank's verdict (``error`` or None) with the others'.

        Returns:
            None when every rank accepted the batch, else the same exception on every rank:
            the lowest refusing rank's message, of its ``kind``.
        """
        if self._group is None:
            return kind(f"batch dropped: {error}") if error is not None else None
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self._group)
        if int(flag) == 0:
            return None
        verdicts: List[Optional[Tuple[str, str]]] = [None] * self.world_size
        dist.all_gather_object(verdicts, None if error is None else (kind.__name__, error), group=self._group)
        refused = [v for v in verdicts if v is not None]
        name, message = refused[0]
        if len(refused) > 1:
            message += f" ({len(refused) - 1} other rank(s) refused the same batch too.)"
        return _ERRORS.get(name, ValueError)(f"batch dropped on every rank: {message}")


def _error_kinds() -> Dict[str, type]:
    from torchrec_scratchpipe.core.plan import CapacityError

    return {"ValueError": ValueError, "CapacityError": CapacityError}


_ERRORS = _error_kinds()
