"""``ShardingPlanner``: TorchRec's ``EmbeddingShardingPlanner`` that understands ScratchPipe.

What it adds to TorchRec's planner:

- the ``"scratchpipe"`` kernel is enumerated for tables whose constraints name it
  (TorchRec's enumerator already keeps constrained kernels the sharder offers), costed by
  :mod:`~torchrec_scratchpipe.distributed.estimators`, and shown in the plan and stats;
- clear errors before planning: ``load_factor <= 0``, a fused param ScratchPipe cannot
  honour (``kernel.engine_config`` names it), an optimizer the compute device cannot run, a table ``data_type`` ScratchPipe does not hold (``RowLayout``), ScratchPipe
  asked for a module it does not support, and a scratchpad smaller than one batch's rows
  (the size needed is in the message);
- row-wise is offered on CPU only to tables whose constraints ask for it, so tables
  without ScratchPipe constraints plan exactly as in plain TorchRec.

The one scoped patch: TorchRec's final plan validation (torchrec >= 1.7) rejects kernel
names outside its enum, so during ``plan()`` (and only then)
:func:`scratchpipe_kernel_registered` lets it accept ``"scratchpipe"`` through
:func:`torchrec_scratchpipe.compat.compute_kernels_accepted`, and undoes that afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Topology
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingPlan, ShardingType
from torchrec.distributed.utils import add_params_from_parameter_sharding, convert_to_fbgemm_types, merge_fused_params
from torchrec.modules.embedding_configs import data_type_to_sparse_type

from torchrec_scratchpipe.compat import (
    EmbeddingEnumerator,
    EmbeddingStats,
    compute_kernels_accepted,
    optimizer_type_to_emb_opt_type,
    sharder_name,
)
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.distributed.estimators import (
    ScratchPipePerfEstimator,
    ScratchPipeStorageEstimator,
    ids_per_batch,
    load_factor_of,
    slots_of,
)
from torchrec_scratchpipe.distributed.kernel import TBE_DEFAULTS, engine_config
from torchrec_scratchpipe.distributed.plan_stats import ScratchPipeStats
from torchrec_scratchpipe.distributed.sharded_base import ScratchPipeSharderMixin, check_plan_entry
from torchrec_scratchpipe.distributed.types import (
    FUSED_PARAMS_KEY,
    SCRATCHPIPE,
    ScratchPipeParameterSharding,
    ScratchPipeTableParams,
    check_load_factor,
)
from torchrec_scratchpipe.quiet import default_storage_reservation

logger: logging.Logger = logging.getLogger(__name__)
#: Values of ``ShardingPlanner(capacity_check=...)``.
CAPACITY_CHECKS = ("warn", "error", "off")
_lock = threading.Lock()
_WARNED: Set[str] = set()


def scratchpipe_kernel_registered() -> ContextManager[None]:
    """Let TorchRec's final plan validation accept ``"scratchpipe"`` inside this block.

    Re-entrant; the kernel name is removed again when the outermost block exits. On
    TorchRec versions that do not validate kernel names it does nothing.

    Example::

        >>> with scratchpipe_kernel_registered():
        ...     pass  # EmbeddingShardingPlanner.plan(...) accepts "scratchpipe" here
    """
    return compute_kernels_accepted([SCRATCHPIPE])


def with_staging_rows(plan: ShardingPlan, summary: List[Dict[str, Any]]) -> ShardingPlan:
    """``plan`` with every ``"scratchpipe"`` entry carrying the rows a step is expected to
    move per shard of each ScratchPipe table (the estimator's ``rows_per_step``, the most
    over a table's shards): the kernels size their staging rings with them."""
    per_table: Dict[str, int] = {}
    for r in summary:
        per_table[r["table"]] = max(per_table.get(r["table"], 0), int(r["rows_per_step"]))
    rows = tuple(sorted(per_table.items()))
    for module_plan in plan.plan.values():
        for name, ps in list(module_plan.items()):  # type: ignore[attr-defined]
            if ps.compute_kernel == SCRATCHPIPE:
                fields = {f.name: getattr(ps, f.name) for f in dataclasses.fields(ParameterSharding)}
                module_plan[name] = ScratchPipeParameterSharding(**fields, staging_rows=rows)  # type: ignore[index]
    return plan


def scratchpipe_tables(constraints: Optional[Dict[str, ParameterConstraints]]) -> List[str]:
    """Tables whose constraints allow the ScratchPipe kernel."""
    return sorted(
        name for name, c in (constraints or {}).items() if c.compute_kernels and SCRATCHPIPE in c.compute_kernels
    )


def table_optimizer(param: torch.Tensor, sharder: Any) -> EmbOptimType:
    """The fused optimizer a table will train with (same precedence as the kernel)."""
    classes = getattr(param, "_optimizer_classes", [None])
    kwargs = getattr(param, "_optimizer_kwargs", [{}])
    if kwargs and kwargs[0] and "optimizer" in kwargs[0]:
        return kwargs[0]["optimizer"]
    if classes and classes[0] is not None:
        return optimizer_type_to_emb_opt_type(classes[0])  # type: ignore[return-value]
    fused = getattr(sharder, "fused_params", None) or {}
    if "optimizer" in fused:
        return fused["optimizer"]
    config = getattr(sharder, "config", None)
    return config.optimizer if config is not None else TBE_DEFAULTS["optimizer"]


def planned_fused_params(param: torch.Tensor, sharder: Any, constraint: ParameterConstraints) -> Dict[str, Any]:
    """The fused params TorchRec will hand the kernel of a ScratchPipe table: the sharder's,
    the table's ``apply_optimizer_in_backward`` settings, and what its constraints add
    (cache params, ``enforce_hbm``, ``stochastic_rounding``, ...), merged as TorchRec merges them."""
    optimizer_kwargs = dict((getattr(param, "_optimizer_kwargs", [{}]) or [{}])[0])
    optimizer_class = (getattr(param, "_optimizer_classes", [None]) or [None])[0]
    if optimizer_class is not None and "optimizer" not in optimizer_kwargs:
        optimizer_kwargs["optimizer"] = optimizer_type_to_emb_opt_type(optimizer_class)
    fp = merge_fused_params(dict(getattr(sharder, "fused_params", None) or {}), optimizer_kwargs)
    as_planned = ParameterSharding(
        sharding_type=(constraint.sharding_types or [ShardingType.TABLE_WISE.value])[0], compute_kernel=SCRATCHPIPE,
        ranks=None, cache_params=constraint.cache_params, enforce_hbm=constraint.enforce_hbm,
        stochastic_rounding=constraint.stochastic_rounding, bounds_check_mode=constraint.bounds_check_mode,
        output_dtype=constraint.output_dtype,
    )
    return convert_to_fbgemm_types(add_params_from_parameter_sharding(fp, as_planned))


def table_config(module: nn.Module, name: str) -> Any:
    """The config of table ``name`` in an EmbeddingBagCollection or EmbeddingCollection."""
    get = getattr(module, "embedding_bag_configs", None) or getattr(module, "embedding_configs")
    return next(t for t in get() if t.name == name)


class ScratchPipeEnumerator(EmbeddingEnumerator):
    """``EmbeddingEnumerator`` with the ScratchPipe checks and CPU row-wise rule.

    Args: as ``EmbeddingEnumerator``; estimators default to the ScratchPipe-aware ones.
    """

    def __init__(
        self,
        topology: Topology,
        batch_size: int,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        estimator: Optional[Any] = None,
        use_exact_enumerate_order: Optional[bool] = False,
    ) -> None:
        self._perf_estimator = ScratchPipePerfEstimator(topology, constraints)
        self._storage_estimator = ScratchPipeStorageEstimator(topology, constraints)
        super().__init__(
            topology,
            batch_size,
            constraints,
            estimator if estimator is not None else [self._perf_estimator, self._storage_estimator],
            use_exact_enumerate_order,
        )
        self._topology = topology
        self.capacity_check: str = "warn"

    @property
    def storage_estimator(self) -> ScratchPipeStorageEstimator:
        """The ScratchPipe storage estimator (its ``breakdown`` feeds the plan stats)."""
        return self._storage_estimator

    def _filter_sharding_types(self, name: str, allowed_sharding_types: List[str], sharder_key: str = "") -> List[str]:
        if self._compute_device == "cpu":
            c = self._constraints.get(name) if self._constraints else None
            if not (c and c.sharding_types and ShardingType.ROW_WISE.value in c.sharding_types):
                allowed_sharding_types = [t for t in allowed_sharding_types if t != ShardingType.ROW_WISE.value]
        return super()._filter_sharding_types(name, allowed_sharding_types, sharder_key)

    def _walk(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[Tuple[str, nn.Module, Any]]:
        """(path, module, sharder) of each module the planner will shard."""
        by_type = {sharder_name(s.module_type): s for s in sharders}
        found, queue = [], [("", module)]
        while queue:
            path, m = queue.pop()
            sharder = by_type.get(sharder_name(type(m)))
            if sharder is not None:
                found.append((path, m, sharder))
                continue
            queue.extend((f"{path}.{n}" if path else n, c) for n, c in m.named_children())
        return found

    def check(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> None:
        """Raise a clear error for ScratchPipe requests that cannot work (before planning)."""
        wanted = set(scratchpipe_tables(self._constraints))
        if not wanted:
            return
        device = torch.device(self._compute_device)
        optimizers: Dict[str, EmbOptimType] = {}
        for path, m, sharder in self._walk(module, sharders):
            for name, param in sharder.shardable_parameters(m).items():
                if name not in wanted:
                    continue
                if not isinstance(sharder, ScratchPipeSharderMixin):
                    raise ValueError(
                        f"table {name!r} is in a {type(m).__name__} (at '{path}'), whose sharder "
                        f"{type(sharder).__name__} does not offer ScratchPipe (it runs EmbeddingBagCollection "
                        "and EmbeddingCollection tables): shard with tsp.get_sharders(), or remove "
                        "'scratchpipe' from the table's ParameterConstraints.compute_kernels."
                    )
                c = self._constraints[name]  # type: ignore[index]
                check_load_factor(c.cache_params.load_factor if c.cache_params else None, name)
                table = table_config(m, name)
                fused_params = planned_fused_params(param, sharder, c)
                if sharder.config is not None:
                    fused_params[FUSED_PARAMS_KEY] = ScratchPipeTableParams.build(None, sharder.config)
                engine_config(fused_params, repr([name]), data_type_to_sparse_type(table.data_type))  # every param honoured or refused
                optimizers[name] = table_optimizer(param, sharder)
                layout = RowLayout.for_table(optimizers[name], table)  # names the table
                try:
                    layout.check_device(device)
                except ValueError as e:
                    raise ValueError(f"table {name!r}: {e}") from e
                config = sharder.config
                if config is not None:
                    self._storage_estimator.config = config
        self._perf_estimator.optimizers = dict(optimizers)
        self._storage_estimator.optimizers = dict(optimizers)

    def enumerate(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[ShardingOption]:
        """TorchRec's options, with the scratchpad-vs-batch check applied (``capacity_check``)."""
        self.check(module, sharders)
        options = super().enumerate(module, sharders)
        if self.capacity_check == "off":
            return options
        kept, reasons = [], {}
        for so in options:
            reason = self._too_small(so) if so.compute_kernel == SCRATCHPIPE else None
            if reason is None:
                kept.append(so)
            else:
                reasons.setdefault(so.name, []).append(reason)
        missing = sorted({so.name for so in options} - {so.name for so in kept})
        if not missing:
            return kept
        msg = (
            "ScratchPipe scratchpad smaller than one batch's rows: "
            + "; ".join(f"table {n!r}: {' / '.join(reasons[n])}" for n in missing)
            + ". Raise CacheParams.load_factor (the estimate counts every id of a batch as a "
            "distinct row: set ParameterConstraints.pooling_factors/batch_sizes if it is too high)."
        )
        if self.capacity_check == "error":
            raise ValueError(msg)
        first = missing[0]
        short = (
            f"ScratchPipe: {len(missing)} table(s) may get more rows per batch than slots "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {first!r}: {reasons[first][0]}. "
            "A batch that really does not fit fails at run time."
        )
        with _lock:  # once per process: every arm or rank planning the same tables says it once
            if short in _WARNED:
                return options
            _WARNED.add(short)
        logger.warning(short)
        return options

    def _too_small(self, so: ShardingOption) -> Optional[str]:
        for shard in so.shards:
            rows = shard.size[0]
            need = min(rows, math.ceil(ids_per_batch(so, rows, self._world_size, self._constraints)))
            have = slots_of(so, rows)
            if need > have:
                return (
                    f"{so.sharding_type} shard of {rows} rows gets up to {need} distinct rows per batch "
                    f"but load_factor {load_factor_of(so)} gives {have} slots (needs load_factor >= "
                    f"{need / rows:.4g})"
                )
        return None


@dataclass(frozen=True)
class _Refusal:
    """What rank 0 broadcasts instead of a plan when planning raised a ValueError."""

    message: str


class ShardingPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` that plans, costs and validates the ScratchPipe kernel.

    Takes the arguments of ``EmbeddingShardingPlanner``. Pick the kernel per table with
    ``ParameterConstraints(compute_kernels=[tsp.SCRATCHPIPE], cache_params=CacheParams(load_factor=...))``.

    Args:
        capacity_check: what to do when a shard's scratchpad (``load_factor x rows``) is
            smaller than the ids one batch is expected to send it (``batch_size x world
            size x pooling factors``, scaled by the shard's share of rows for row-wise):
            ``"warn"`` (default: the estimate counts repeated ids as distinct rows, so it
            may be pessimistic; a batch that really does not fit fails at run time with
            the rows needed), ``"error"`` (raise, naming the load factor needed; other
            kernels allowed for the table are still planned), or ``"off"``.
        *args, **kwargs: as ``EmbeddingShardingPlanner``.

    Example::

        >>> from torchrec.distributed.types import CacheParams
        >>> from torchrec_scratchpipe.quiet import make_topology
        >>> constraints = {"big": ParameterConstraints(compute_kernels=[SCRATCHPIPE],
        ...     sharding_types=["row_wise"], cache_params=CacheParams(load_factor=0.05))}
        >>> planner = ShardingPlanner(topology=make_topology(world_size=2, compute_device="cpu"),
        ...                           constraints=constraints)
        >>> plan = planner.collective_plan(model, get_sharders(), pg)   # doctest: +SKIP
    """

    def __init__(self, *args: Any, capacity_check: str = "warn", **kwargs: Any) -> None:
        if capacity_check not in CAPACITY_CHECKS:
            raise ValueError(f"capacity_check must be one of {CAPACITY_CHECKS}, got {capacity_check!r}.")
        constraints: Optional[Dict[str, ParameterConstraints]] = kwargs.get("constraints")
        for name in scratchpipe_tables(constraints):
            c = constraints[name]  # type: ignore[index]
            check_load_factor(c.cache_params.load_factor if c.cache_params else None, name)
        self._sp_stats = ScratchPipeStats()
        if kwargs.get("storage_reservation") is None and len(args) < 4:
            # TorchRec's heuristic default warns (FutureWarning) and over-estimates meta models.
            kwargs["storage_reservation"] = default_storage_reservation()
        if kwargs.get("stats") is None and len(args) < 8:
            kwargs["stats"] = [EmbeddingStats(), self._sp_stats]
        super().__init__(*args, **kwargs)
        if kwargs.get("enumerator") is None and (len(args) < 3 or args[2] is None):
            self._enumerator = ScratchPipeEnumerator(
                topology=self._topology, batch_size=self._batch_size, constraints=self._constraints
            )
        if isinstance(self._enumerator, ScratchPipeEnumerator):
            self._enumerator.capacity_check = capacity_check

    @property
    def scratchpipe_summary(self) -> List[Dict[str, Any]]:
        """Per ScratchPipe shard of the last plan: rows, slots, and scratchpad, staging and
        backing-store bytes (what the planner logs after the TorchRec stats)."""
        return list(self._sp_stats.rows)

    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        """Plan as TorchRec does, with ``"scratchpipe"`` accepted as a kernel name; a plan no
        ScratchPipe kernel can run (``check_plan_entry``) is refused here."""
        if isinstance(self._enumerator, ScratchPipeEnumerator):
            self._enumerator.check(module, sharders)
        with scratchpipe_kernel_registered():
            plan = super().plan(module, sharders)
        for module_plan in plan.plan.values():
            for name, ps in module_plan.items():  # type: ignore[attr-defined]
                if ps.compute_kernel == SCRATCHPIPE:
                    check_plan_entry(name, ps)
        return with_staging_rows(plan, self.scratchpipe_summary)

    def collective_plan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        pg: Optional[dist.ProcessGroup] = None,
    ) -> ShardingPlan:
        """Plan on rank 0 and broadcast the plan, as TorchRec does; but when rank 0 refuses
        (a ``ValueError`` from ``plan``), every rank raises it, instead of the other ranks
        waiting for a plan that never comes."""
        if pg is None:
            if not dist.is_initialized():
                raise ValueError("collective_plan needs an initialized process group; use plan() on one process.")
            pg = dist.GroupMember.WORLD
        chosen = sharders if sharders is not None else get_default_sharders()

        def plan_or_refusal() -> Any:
            try:
                return self.plan(module, chosen)
            except ValueError as e:
                return _Refusal(str(e))

        result = invoke_on_rank_and_broadcast_result(pg, 0, plan_or_refusal)  # type: ignore[arg-type]
        if isinstance(result, _Refusal):
            raise ValueError(f"{result.message} (refused by rank 0's planner)")
        return result
