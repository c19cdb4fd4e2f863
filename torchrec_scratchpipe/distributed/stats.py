"""Finding ScratchPipe kernels inside a (DMP) model, and their statistics across ranks."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist
from torch import nn

from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.sharded_base import ScratchPipeShardedMixin

#: Counters combined by taking the maximum over shards (the rest are summed).
_MAX_KEYS = (
    "steps", "peak_held_rows", "planner_s", "mover_s", "planner_background_s", "mover_background_s", "blocked_s",
)


def scratchpipe_modules(model: nn.Module) -> List[Tuple[str, ScratchPipeShardedMixin]]:
    """Sharded EmbeddingBagCollections and EmbeddingCollections of ``model`` that hold
    ScratchPipe tables.

    A pipeline calls ``module.prefetch(dist_input)`` (TorchRec's ``ShardedModule``
    API, ``dist_input`` being the module's ``input_dist`` output) for each batch it
    announces (up to H + 1 ahead: the victim policy reads the ids of all of them).

    Args:
        model: a ``DistributedModelParallel`` (or any module containing sharded EBCs/ECs).

    Example::

        >>> for fqn, ebc in scratchpipe_modules(dmp_model):   # doctest: +SKIP
        ...     ebc.prefetch(dist_input)
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, ScratchPipeShardedMixin) and m.scratchpipe_kernels()
    ]


def scratchpipe_kernels(model: nn.Module) -> List[ScratchPipeEmbeddingBag]:
    """All ScratchPipe kernels of ``model`` on this rank (each takes ``prefetch(kjt)`` with
    its own slice of the distributed input).

    Example::

        >>> [k.table_names for k in scratchpipe_kernels(dmp_model)]   # doctest: +SKIP
        [['big_table']]
    """
    return [k for _, m in scratchpipe_modules(model) for k in m.scratchpipe_kernels()]


def _local_records(model: nn.Module, rank: int) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for _, module in scratchpipe_modules(model):
        for kernel in module.scratchpipe_kernels():
            for group, d in kernel.stats().items():
                for table in d["tables"]:
                    out.setdefault(table, []).append(dict(d, rank=rank, group=group))
    return out


def _combine(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for rec in records:
        for k, v in rec.items():
            if k in ("tables", "rank", "group", "hit_rate") or not isinstance(v, (int, float)):
                continue
            out[k] = max(out.get(k, v), v) if k in _MAX_KEYS else out.get(k, 0) + v
    unique = out.get("unique_rows", 0)
    out["hit_rate"] = 1.0 - out.get("plan_misses", 0) / unique if unique else 0.0
    out["shards"] = len(records)
    out["ranks"] = sorted({r["rank"] for r in records})
    out["shared_with"] = sorted({t for r in records for t in r["tables"]})
    return out


def cache_stats(
    model: nn.Module,
    process_group: Optional[dist.ProcessGroup] = None,
    per_shard: bool = False,
) -> Dict[str, Any]:
    """Per-table ScratchPipe statistics, gathered from every rank.

    A collective: every rank of the process group must call it. Counters belong to the
    scratchpad a table's shard trains in; tables sharing one scratchpad (same kernel,
    dim and pooling on a rank) report that scratchpad's counters, and ``shared_with``
    lists them. Per table, counts are summed over its shards (ranks), ``steps``,
    ``peak_held_rows`` and the timings are maxima, and ``hit_rate`` is recomputed as
    ``1 - plan_misses / unique_rows``. ``train_misses`` is 0 by construction.

    Args:
        model: the DMP model.
        process_group: group to gather over (default: the sharded modules' group, else
            the default group; no communication when not distributed).
        per_shard: also return the raw per-shard records under ``"shards"``.

    Returns:
        ``{table: {counter: value, ...}}`` (plus ``{"shards": {table: [records]}}``
        when ``per_shard``).

    Example::

        >>> stats = cache_stats(dmp_model)            # doctest: +SKIP
        >>> stats["big_table"]["hit_rate"], stats["big_table"]["train_misses"]  # doctest: +SKIP
        (0.93, 0)
    """
    modules = scratchpipe_modules(model)
    if process_group is None and modules:
        process_group = modules[0][1]._env.process_group
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(process_group) if distributed else 0
    local = _local_records(model, rank)
    if distributed and dist.get_world_size(process_group) > 1:
        gathered: List[Optional[Dict[str, List[Dict[str, Any]]]]] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, local, group=process_group)
    else:
        gathered = [local]
    per_table: Dict[str, List[Dict[str, Any]]] = {}
    for part in gathered:
        for table, recs in (part or {}).items():
            per_table.setdefault(table, []).extend(recs)
    result: Dict[str, Any] = {t: _combine(recs) for t, recs in sorted(per_table.items())}
    if per_shard:
        result = {"tables": result, "shards": per_table}
    return result
