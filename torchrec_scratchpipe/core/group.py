"""One table group of a ScratchPipe engine: store, scratchpad, planner, window, mover, stats."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType

from torchrec_scratchpipe.compat import PoolingMode
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import OUTPUT_DTYPE, RowLayout, weight_dtype_of
from torchrec_scratchpipe.core.device_mover import DeviceMover
from torchrec_scratchpipe.core.mover import Mover
from torchrec_scratchpipe.core.planner_api import make_planner
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store import BackingStore
from torchrec_scratchpipe.core.store_api import open_store
from torchrec_scratchpipe.core.window import PlanWindow, WindowEntry

#: TorchRec pooling -> the scratchpad TBE's pooling mode.
POOLING = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN, PoolingType.NONE: PoolingMode.NONE}


@dataclass
class GroupBatch:
    """What a group keeps of a batch until it trains."""

    ids: torch.Tensor  # group row of each id; its slot is fixed while the batch is held
    offsets: torch.Tensor
    weights: Optional[torch.Tensor]
    ready: Any = None  # CUDA event: rows inserted


class TableGroup:
    """Tables that share dim, pooling and weight dtype: one store (``config.store``: host
    memory or a file), one scratchpad, one planner, one window, one mover and the group's
    statistics.

    Args:
        name: the group's key (e.g. ``"dim64_sum"``), used in messages and statistics.
        tables: its table configs (same ``embedding_dim``, pooling and ``data_type``).
        config: the engine's settings.
        device: where the scratchpad lives.
        packed_store: rows packed in the store, or one contiguous region per value
            (see ``BackingStore(packed=...)``).
        rows_per_step: rows a step is expected to move each way (sizes the mover's
            staging rings on CUDA; None: their default size).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> t = EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"])
        >>> TableGroup("dim8_sum", [t], ScratchPipeConfig(cache_rows=16), torch.device("cpu")).capacity
        16
    """

    def __init__(
        self,
        name: str,
        tables: List[Any],
        config: ScratchPipeConfig,
        device: torch.device,
        packed_store: bool = True,
        rows_per_step: Optional[int] = None,
    ) -> None:
        self.name = name
        self.tables = tables
        self.features: List[str] = [f for t in tables for f in t.feature_names]
        self.feature_table = torch.tensor([i for i, t in enumerate(tables) for _ in t.feature_names])
        self.layout = RowLayout.for_table(config.optimizer, tables[0])
        self.store = open_store(
            config.store, [t.num_embeddings for t in tables], self.layout, packed_store, "+".join(t.name for t in tables)
        )
        self.capacity = config.slots_for(self.store.num_rows)
        self.planner = make_planner(self.store.num_rows, self.capacity, config.victim_policy, device, config.planner)
        on_device = self.planner.kind == "device"  # its mover inserts padding into one spare slot
        if on_device and not isinstance(self.store, BackingStore):
            raise ValueError(
                f"table group {name!r}: the device planner's mover reads the host store directly, so it cannot "
                "run over a file store; choose planner='native' or 'torch' (or SCRATCHPIPE_PLANNER) for file-backed tables."
            )
        self.pad = Scratchpad(
            self.capacity + on_device, self.layout, [len(t.feature_names) for t in tables], POOLING[pooling_of(tables[0])],
            config, device, [t.name for t in tables],
        )
        self.stats = GroupStats()
        self.mover: Mover = (
            DeviceMover(self.store, self.pad, self.stats, self.capacity)
            if on_device and isinstance(self.store, BackingStore)
            else Mover(self.store, self.pad, self.stats, rows_per_step=rows_per_step)
        )
        self.window = PlanWindow(
            self.planner, config.lookahead, config.effective_horizon, self._on_planned,
            name=f"table group {name!r} (tables {[t.name for t in tables]})", stats=self.stats,
        )
        self.feature_base = self.store.offsets[:-1][self.feature_table]

    def _on_planned(self, entry: WindowEntry) -> None:
        t0 = time.perf_counter()
        plan = entry.plan
        assert plan is not None
        if plan.counts is not None:  # a device plan: counts stay on the device
            self.stats.add("plan_misses", plan.counts[1])
            self.stats.add("evictions", plan.counts[2])
            self.stats.peak("peak_held_rows", plan.counts[3])
        else:
            self.stats.add("plan_misses", plan.miss_rows.numel())
            self.stats.add("evictions", plan.victim_rows.numel())
            self.stats.peak("peak_held_rows", plan.held_after)
        entry.payload.ready = self.mover.move_in(plan)
        self.store.collected(entry.step)
        self.stats.mover_s += time.perf_counter() - t0

    def read_ahead(self, entry: WindowEntry) -> None:
        """A store that reads ahead starts reading the rows of a just-queued batch that are
        not resident now (they are collected when the batch is planned)."""
        if self.store.reads_ahead:
            t0 = time.perf_counter()
            rows = entry.rows
            self.store.read_ahead(rows[self.planner.row_to_slot.index_select(0, rows) < 0], entry.step)
            self.stats.mover_s += time.perf_counter() - t0

    def rows_of(self, ids: torch.Tensor, per_feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(distinct group rows, group row of each id) of this group's ``ids``, ``per_feature`` ids per feature."""
        return self.planner.group_rows(ids, self.feature_base, per_feature)

    def init_weights(self) -> None:
        with torch.no_grad():
            for t, table in enumerate(self.tables):
                w = self.store.table_view(self.store.weights, t)
                if getattr(table, "init_fn", None) is not None:
                    table.init_fn(w)
                else:
                    bound = math.sqrt(1.0 / table.num_embeddings)
                    w.uniform_(-bound, bound)

    def resident(self) -> Tuple[torch.Tensor, torch.Tensor]:
        slots = self.planner.resident().nonzero().squeeze(1)
        return self.planner.slot_to_row[slots], slots

    @torch.no_grad()
    def lookup(
        self, group_ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """Embeddings of a batch that is not in the window, read where each row is now
        (its slot if resident, else the store); nothing is planned, moved or held.

        Args:
            group_ids: group row of each id (host), as ``rows_of`` gives.
            offsets, weights: the group's bag offsets and per-sample weights (on ``device``).
            device: where the output goes.
        """
        rows, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
        self.mover.land_all()  # evicted rows have landed in the store
        table = self.store.weights_of(rows).to(device)
        slots = self.planner.row_to_slot.index_select(0, rows.to(self.planner.device)).long().cpu()
        resident = (slots >= 0).nonzero().squeeze(1)
        for entry in self.window.planned:  # rows moved in for planned batches have arrived
            self.mover.wait_ready(entry.payload.ready)
        table.index_copy_(0, resident.to(device), self.pad.weights.index_select(0, slots[resident].to(device)))
        table = table.to(OUTPUT_DTYPE)  # as the TBE: weights of any dtype, output (and sums) in FP32
        self.mover.mark_retired()  # later inserts into these slots wait for the reads above
        inverse = inverse.to(device)
        if self.pad.tbe.pooling_mode == PoolingMode.NONE:
            return table.index_select(0, inverse)
        out = F.embedding_bag(inverse, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)
        if self.pad.tbe.pooling_mode == PoolingMode.MEAN:  # as FBGEMM: the sum times 1/length
            out = out * (1.0 / (offsets[1:] - offsets[:-1]).clamp(min=1).to(out.dtype)).unsqueeze(1)
        n = len(self.features)
        return out.view(n, -1, table.shape[1]).transpose(0, 1).reshape(-1, n * table.shape[1])

    def capacity_message(self, entry: WindowEntry) -> str:
        """Why the batch ``entry`` cannot be planned now: slots held by unfinished batches."""
        waiting = sum(not e.done for e in self.window.trained)
        return (
            f"table group {self.name!r} (tables {[t.name for t in self.tables]}): the batch needs "
            f"{self.planner.distinct(entry.rows)} distinct rows, but {waiting} batch(es) that ran forward and "
            f"have not finished backward hold {self.planner.held_slots()} of the {self.capacity} "
            "slots. Call backward on those outputs first (their rows stay held until their "
            "update is done), run forwards you will not backward under torch.no_grad() or "
            "model.eval(), or raise cache_rows/load_factor so the accumulated batches fit."
        )


def pooling_of(table: Any) -> PoolingType:
    """A table's pooling; torchrec's ``EmbeddingConfig`` (no ``pooling``) is unpooled."""
    return getattr(table, "pooling", PoolingType.NONE)


def check_unpooled(tables: Sequence[Any]) -> bool:
    """True when every table is unpooled (``PoolingType.NONE``); they must then share a dim
    and a weight dtype (one scratchpad returns every id's row in id order)."""
    none = [pooling_of(t) == PoolingType.NONE for t in tables]
    if not any(none):
        return False
    if not all(none):
        raise ValueError(
            f"tables {[t.name for t in tables]} mix pooled and unpooled (PoolingType.NONE) tables: "
            "put them in separate ScratchPipeEmbeddingBags."
        )
    dims = sorted({t.embedding_dim for t in tables})
    if len(dims) > 1:
        raise ValueError(
            f"unpooled tables {[t.name for t in tables]} have dims {dims}: unpooled tables of one "
            "ScratchPipeEmbeddingBags must share embedding_dim (one scratchpad, one TBE)."
        )
    dtypes = sorted({str(weight_dtype_of(t)) for t in tables})
    if len(dtypes) > 1:
        raise ValueError(
            f"unpooled tables {[t.name for t in tables]} have weight dtypes {dtypes}: unpooled tables of one "
            "ScratchPipeEmbeddingBags must share data_type (one scratchpad, one TBE)."
        )
    return True
