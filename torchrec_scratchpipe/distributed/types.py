"""Names and small value types shared by the TorchRec layer of ScratchPipe.

The kernel is called ``"scratchpipe"`` in constraints, in the planner and in the
``ShardingPlan`` users see. TorchRec's sharded modules only accept members of its
``EmbeddingComputeKernel`` enum, so right before sharding the ScratchPipe sharder turns
each ``"scratchpipe"`` ``ParameterSharding`` into a :class:`ScratchPipeParameterSharding`
with ``compute_kernel="customized_kernel"`` (TorchRec's placeholder for out-of-tree
kernels). Its ``get_additional_fused_params()`` hands the table's ScratchPipe settings to
the kernel through the table's fused params (TorchRec calls it for that kernel only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding

from torchrec_scratchpipe.core import capacity
from torchrec_scratchpipe.core.config import ScratchPipeConfig

#: The kernel name users put in ``ParameterConstraints(compute_kernels=[...])``.
SCRATCHPIPE: str = "scratchpipe"
#: The TorchRec kernel value ScratchPipe tables run under inside sharded modules.
CUSTOMIZED: str = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
#: Key of the :class:`ScratchPipeTableParams` in a table's fused params.
FUSED_PARAMS_KEY: str = "__scratchpipe__"
#: ``ScratchPipeConfig`` fields that are per table (from the plan), not sharder-wide.
_PER_TABLE_FIELDS = ("cache_rows", "load_factor")


@dataclass(frozen=True)
class ScratchPipeTableParams:
    """ScratchPipe settings of one table, as the kernel receives them.

    Frozen and hashable: TorchRec groups tables into kernels by their fused params, so
    tables with different settings (e.g. load factors) get separate scratchpads.

    Args:
        load_factor: scratchpad slots as a fraction of the shard's rows.
        options: sharder-wide ``ScratchPipeConfig`` fields (sorted ``(name, value)``
            pairs) from ``get_sharders(config)``; empty when no config was given.
        staging_rows: ``(table, rows)`` for every ScratchPipe table of the plan: the rows a
            step is expected to move into (and out of) one of its shards, as the planner's
            estimator prices them; they size the staging rings. The same for every table
            of a plan, and left out of comparisons, so tables group into kernels as before.

    Example::

        >>> p = ScratchPipeTableParams.build(0.05, ScratchPipeConfig(lookahead=2))
        >>> p.load_factor, dict(p.options)["lookahead"]
        (0.05, 2)
    """

    load_factor: float
    options: Tuple[Tuple[str, Any], ...] = ()
    staging_rows: Tuple[Tuple[str, int], ...] = dataclasses.field(default=(), compare=False)

    @staticmethod
    def build(
        load_factor: Optional[float], config: Optional[ScratchPipeConfig], staging_rows: Tuple[Tuple[str, int], ...] = ()
    ) -> "ScratchPipeTableParams":
        """Params for a table with ``load_factor`` (None: ``defaults.LIBRARY_LOAD_FACTOR``) under ``config``."""
        lf = capacity.resolve_load_factor(load_factor, "CacheParams.load_factor")
        options: Tuple[Tuple[str, Any], ...] = ()
        if config is not None:
            options = tuple(
                sorted(
                    (f.name, getattr(config, f.name))
                    for f in dataclasses.fields(config)
                    if f.name not in _PER_TABLE_FIELDS
                )
            )
        return ScratchPipeTableParams(lf, options, tuple(staging_rows))


def check_load_factor(load_factor: Optional[float], table: str) -> None:
    """Raise a ValueError naming the table unless ``load_factor`` is None (the default) or a
    finite fraction in (0, 1] (``core.capacity.check_load_factor``).

    Args:
        load_factor: ``CacheParams.load_factor`` of the table (None means the default).
        table: table name for the message.
    """
    if load_factor is not None:
        where = f"CacheParams.load_factor of table {table!r}" if table else "CacheParams.load_factor"
        capacity.check_load_factor(load_factor, f"{where} (the scratchpad holds load_factor x the shard's rows)")


@dataclass
class ScratchPipeParameterSharding(ParameterSharding):
    """A ``ParameterSharding`` that runs the table on the ScratchPipe kernel.

    ``compute_kernel`` is TorchRec's ``customized_kernel``; ``scratchpipe`` carries the
    table's settings, which TorchRec merges into the table's fused params.

    Args:
        scratchpipe: the table's :class:`ScratchPipeTableParams` (set by the sharder).
        staging_rows: set by ``ShardingPlanner`` on its ``"scratchpipe"`` entries: see
            ``ScratchPipeTableParams.staging_rows``.
    """

    scratchpipe: Optional[ScratchPipeTableParams] = None
    staging_rows: Tuple[Tuple[str, int], ...] = ()

    def get_additional_fused_params(self) -> Dict[str, Any]:
        """Fused params TorchRec adds for ``customized_kernel`` tables."""
        return {FUSED_PARAMS_KEY: self.scratchpipe}


def is_scratchpipe(ps: ParameterSharding) -> bool:
    """True for a plan entry naming the ScratchPipe kernel (either spelling)."""
    return ps.compute_kernel == SCRATCHPIPE or isinstance(ps, ScratchPipeParameterSharding)


def to_runtime_sharding(ps: ParameterSharding, config: Optional[ScratchPipeConfig]) -> ParameterSharding:
    """Turn a ``"scratchpipe"`` plan entry into what TorchRec's sharded modules accept.

    Args:
        ps: one entry of a module's sharding plan.
        config: sharder-wide ScratchPipe options.

    Returns:
        ``ps`` itself when it is not ScratchPipe (or already converted), else a
        :class:`ScratchPipeParameterSharding` with ``compute_kernel="customized_kernel"``.
    """
    if ps.compute_kernel != SCRATCHPIPE:
        return ps
    fields = {f.name: getattr(ps, f.name) for f in dataclasses.fields(ParameterSharding)}
    fields["compute_kernel"] = CUSTOMIZED
    lf = ps.cache_params.load_factor if ps.cache_params is not None else None
    rows = getattr(ps, "staging_rows", ())
    return ScratchPipeParameterSharding(**fields, scratchpipe=ScratchPipeTableParams.build(lf, config, rows), staging_rows=rows)
