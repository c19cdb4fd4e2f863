"""Planner printout of the ScratchPipe tables: slots and where their memory goes.

TorchRec's ``EmbeddingStats`` already lists the kernel (``scratchpipe``) with each
table's total storage; this adds the breakdown a user sizes the load factor with.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.distributed.planner.types import (
    Enumerator,
    ParameterConstraints,
    PlanDebugStats,
    ShardingOption,
    Stats,
    StorageReservation,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from torchrec_scratchpipe.compat import tabulate
from torchrec_scratchpipe.distributed.estimators import load_factor_of
from torchrec_scratchpipe.distributed.types import SCRATCHPIPE

logger: logging.Logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class ScratchPipeStats(Stats):
    """Logs (INFO) one row per ScratchPipe shard of the chosen plan; keeps them in ``rows``.

    Example::

        >>> planner = ShardingPlanner(...)        # doctest: +SKIP
        >>> planner.plan(model, get_sharders())   # doctest: +SKIP
        >>> planner.scratchpipe_summary[0]["slots"]   # doctest: +SKIP
        25000
    """

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def log(
        self,
        sharding_plan: ShardingPlan,
        topology: Topology,
        batch_size: int,
        storage_reservation: StorageReservation,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: List[ShardingOption],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        enumerator: Optional[Enumerator] = None,
        debug: bool = False,
        debug_stats: Optional[PlanDebugStats] = None,
    ) -> None:
        estimator = getattr(enumerator, "storage_estimator", None)
        self.rows = []
        if estimator is None:
            return
        device_mem = "HBM" if topology.compute_device in {"cuda", "mtia"} else "DDR"
        for so in best_plan:
            if so.compute_kernel != SCRATCHPIPE:
                continue
            for shard, part in zip(so.shards, estimator.breakdown(so)):
                self.rows.append(
                    dict(part, table=so.name, module=so.path, sharding=so.sharding_type, rank=shard.rank,
                         load_factor=load_factor_of(so), device_memory=device_mem)
                )
        if self.rows:
            logger.info("%s", format_scratchpipe_plan(self.rows))


def format_scratchpipe_plan(rows: List[Dict[str, Any]]) -> str:
    """The plan printout's ScratchPipe part: one line per shard, device and host bytes.

    Device: the scratchpad (slots x (weights + optimizer state)) and the staging buffers
    that carry rows in and out; host: the backing store (every row of the shard, or with a
    file store its host cache and map) and the planner's maps and recency queue, and (CUDA)
    the pinned staging ring; disk: a file store's file.

    Args:
        rows: ``ShardingPlanner.scratchpipe_summary`` (or ``ScratchPipeStats.rows``).

    Example::

        >>> print(format_scratchpipe_plan(planner.scratchpipe_summary))   # doctest: +SKIP
    """
    if not rows:
        return "no ScratchPipe tables in the plan"
    device_mem = rows[0].get("device_memory", "HBM")
    table = [
        [
            r["table"], r["sharding"], r["rank"], r["rows"], r["load_factor"], r["slots"],
            f"{r['scratchpad_bytes'] / _MB:.3f}", f"{r['staging_bytes'] / _MB:.3f}",
            f"{r['store_bytes'] / _MB:.3f}", f"{r['planner_bytes'] / _MB:.3f}",
            f"{r['host_staging_bytes'] / _MB:.3f}", f"{r.get('file_bytes', 0) / _MB:.3f}",
        ]
        for r in rows
    ]
    header = [
        "table", "sharding", "rank", "rows", "load factor", "slots",
        f"device: scratchpad MB ({device_mem})", f"device: staging MB ({device_mem})",
        "host: store MB (DDR)", "host: planner MB (DDR)", "host: pinned staging MB (DDR)",
        "disk: file store MB",
    ]
    return f"ScratchPipe tables (kernel '{SCRATCHPIPE}'), memory per shard:\n" + tabulate(table, header)  # type: ignore[arg-type]
