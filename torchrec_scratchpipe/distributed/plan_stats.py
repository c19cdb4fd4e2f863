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
                    dict(part, table=so.fqn.lstrip("."), sharding=so.sharding_type, rank=shard.rank,
                         load_factor=load_factor_of(so), device_memory=device_mem)
                )
        if not self.rows:
            return
        table = [
            [
                r["table"], r["sharding"], r["rank"], r["rows"], r["load_factor"], r["slots"],
                f"{r['scratchpad_bytes'] / _MB:.3f}", f"{r['staging_bytes'] / _MB:.3f}",
                f"{r['backing_store_bytes'] / _MB:.3f}",
            ]
            for r in self.rows
        ]
        header = [
            "table", "sharding", "rank", "rows", "load factor", "slots",
            f"scratchpad MB ({device_mem})", f"staging MB ({device_mem})", "backing store + maps MB (DDR)",
        ]
        text = tabulate(table, header)  # type: ignore[arg-type]
        logger.info("ScratchPipe scratchpads (kernel '%s'):\n%s", SCRATCHPIPE, text)
