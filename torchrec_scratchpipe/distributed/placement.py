"""ShardedTensor metadata of ScratchPipe shards: placed where the backing store is.

A sharding plan places every shard on the training device (``rank:0/cuda:0``), and
TorchRec builds the ``ShardedEmbeddingTable`` metadata of a kernel's tables from it. A
ScratchPipe shard's weights and optimizer state live in the host-memory backing store,
and PyTorch refuses a ``Shard`` whose tensor is not on its placement's device ("Local
shard tensor device does not match with local Shard's placement"). The functions here
copy that metadata with each placement's device replaced by the store's (the rank is
kept), as TorchRec itself does for its own host-resident (SSD/key-value) tables; the plan
the user holds, and the metadata TorchRec keeps for its input and output distribution,
are left as they are.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional, Sequence

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed.remote_device import _remote_device
from torchrec.distributed.embedding_types import ShardedEmbeddingTable

#: Where a ScratchPipe shard's tensors live: the backing store is host memory (core/store.py).
STORE_DEVICE = torch.device("cpu")


def placed_on(shard: ShardMetadata, device: torch.device) -> ShardMetadata:
    """A copy of ``shard`` whose placement names ``device`` on the same rank.

    Args:
        shard: one shard's metadata (its placement may name any device, or none).
        device: the device its tensor is on.

    Example::

        >>> md = ShardMetadata([0, 0], [4, 8], "rank:1/cuda:0")
        >>> str(placed_on(md, torch.device("cpu")).placement), str(md.placement)
        ('rank:1/cpu', 'rank:1/cuda:0')
    """
    out = copy.copy(shard)
    if shard.placement is not None:
        placement = shard.placement
        if isinstance(placement, str):
            placement = _remote_device(placement)
        out.placement = _remote_device(f"rank:{placement.rank()}/{device}")
    return out


def placed_spec(spec: Optional[EnumerableShardingSpec], device: torch.device) -> Optional[EnumerableShardingSpec]:
    """A copy of a plan's sharding spec with every shard placed on ``device`` (see ``placed_on``).

    Example::

        >>> spec = EnumerableShardingSpec([ShardMetadata([0, 0], [4, 8], "rank:0/cuda:0")])
        >>> str(placed_spec(spec, torch.device("cpu")).shards[0].placement)
        'rank:0/cpu'
    """
    if spec is None:
        return None
    if not isinstance(spec, EnumerableShardingSpec):
        raise ValueError(f"ScratchPipe tables need an EnumerableShardingSpec in the plan, got {type(spec).__name__}.")
    return EnumerableShardingSpec([placed_on(s, device) for s in spec.shards])


def placed_tables(tables: Sequence[ShardedEmbeddingTable], device: torch.device) -> List[ShardedEmbeddingTable]:
    """Copies of a kernel's tables whose local and global metadata are placed on ``device``.

    The local metadata stays one of the global metadata's shards (TorchRec's fused
    optimizer looks optimizer shards up by it), and each table's global metadata is its
    own copy, so the caller's tables, and the plan they came from, do not change.

    Args:
        tables: the tables of one ``GroupedEmbeddingConfig``.
        device: where their shards' tensors are (``STORE_DEVICE``).
    """
    out: List[ShardedEmbeddingTable] = []
    for table in tables:
        table = copy.copy(table)
        glob = table.global_metadata
        local = table.local_metadata
        if glob is not None:
            shards = [placed_on(s, device) for s in glob.shards_metadata]
            if local is not None:
                at = [i for i, s in enumerate(glob.shards_metadata) if s is local or s == local]
                local = shards[at[0]] if at else placed_on(local, device)
            table.global_metadata = dataclasses.replace(
                glob, shards_metadata=shards, tensor_properties=copy.deepcopy(glob.tensor_properties)
            )
        elif local is not None:
            local = placed_on(local, device)
        table.local_metadata = local
        out.append(table)
    return out
