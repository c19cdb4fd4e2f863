"""ScratchPipeEmbeddingBags: the engine that ties plan, move and train together."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_scratchpipe.core.config import OPTIMIZER_STATE_NAMES, ScratchPipeConfig, check_optimizer, state_shapes
from torchrec_scratchpipe.core.mover import Mover
from torchrec_scratchpipe.core.plan import CapacityError, SlotPlanner
from torchrec_scratchpipe.core.scratchpad import Scratchpad
from torchrec_scratchpipe.core.stats import GroupStats
from torchrec_scratchpipe.core.store import BackingStore
from torchrec_scratchpipe.core.validate import check_kjt
from torchrec_scratchpipe.core.window import PlanWindow, WindowEntry
from torchrec_scratchpipe.core.worker import PlanWorker

_POOLING = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}


@dataclass
class _Batch:
    """What a group keeps of a batch until it trains."""

    ids: torch.Tensor  # group row of each id; its slot is fixed while the batch is held
    offsets: torch.Tensor
    weights: Optional[torch.Tensor]
    ready: Any = None  # CUDA event: rows inserted


class _Group:
    """Tables that share dim and pooling: one store, one scratchpad, one planner."""

    def __init__(self, name: str, tables: List[Any], config: ScratchPipeConfig, device: torch.device) -> None:
        self.name = name
        self.tables = tables
        self.features: List[str] = [f for t in tables for f in t.feature_names]
        self.feature_table = torch.tensor([i for i, t in enumerate(tables) for _ in t.feature_names])
        dim = tables[0].embedding_dim
        self.store = BackingStore([t.num_embeddings for t in tables], dim, state_shapes(config.optimizer, dim))
        self.capacity = config.slots_for(self.store.num_rows)
        self.pad = Scratchpad(self.capacity, dim, len(self.features), _POOLING[tables[0].pooling], config, device)
        self.stats = GroupStats()
        self.planner = SlotPlanner(self.store.num_rows, self.capacity, config.victim_policy)
        self.mover = Mover(self.store, self.pad, self.stats)
        self.window = PlanWindow(self.planner, config.lookahead, config.effective_horizon, self._on_planned)
        self.feature_base = self.store.offsets[:-1][self.feature_table]

    def _on_planned(self, entry: WindowEntry) -> None:
        t0 = time.perf_counter()
        plan = entry.plan
        assert plan is not None
        self.stats.plan_misses += plan.miss_rows.numel()
        self.stats.evictions += plan.victim_rows.numel()
        self.stats.peak_held_rows = max(self.stats.peak_held_rows, plan.held_after)
        entry.payload.ready = self.mover.move_in(plan)
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

    def resident(self) -> tuple:
        slots = self.planner.resident().nonzero().squeeze(1)
        return self.planner.slot_to_row[slots], slots


class ScratchPipeEmbeddingBags(torch.nn.Module):
    """Pooled embedding tables kept in host memory and trained in a device scratchpad.

    Batches are announced ahead with ``prefetch``; the planner places each batch's rows
    in the scratchpad before it trains, never evicting a row that a batch in the window
    still needs. ``forward`` trains the oldest announced batch (or plans the given one on
    demand), and backward applies the fused optimizer inside the scratchpad.

    Args:
        tables: torchrec ``EmbeddingBagConfig`` (or objects with ``name``,
            ``num_embeddings``, ``embedding_dim``, ``feature_names``, ``pooling``).
        config: capacity, lookahead, optimizer and policy.
        device: ``cpu`` or a ``cuda`` device for the scratchpad.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100,
        ...                              feature_names=["f0"])]
        >>> emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=16, lookahead=1))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f0"], torch.tensor([1, 2, 3]),
        ...                                             torch.tensor([1, 2]))
        >>> emb.prefetch(kjt)
        >>> emb(kjt).values().shape
        torch.Size([2, 8])
        >>> emb.stats()["dim8_sum"]["train_misses"]
        0
    """

    def __init__(
        self,
        tables: Sequence[Any],
        config: ScratchPipeConfig,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.device = device or torch.device("cpu")
        check_optimizer(config.optimizer, self.device)
        if config.background_planning and self.device.type != "cpu":
            raise ValueError(
                f"background_planning=True needs a CPU scratchpad, got device {self.device}: on CUDA "
                "the host already plans while the device trains. Leave it None (automatic) or False."
            )
        if not tables:
            raise ValueError("ScratchPipeEmbeddingBags needs at least one table.")
        self.config = config
        by_key: Dict[str, List[Any]] = {}
        for t in tables:
            if t.pooling not in _POOLING:
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (use SUM or MEAN).")
            if t.embedding_dim % 4:
                raise ValueError(f"table {t.name!r}: embedding_dim {t.embedding_dim} must be a multiple of 4 (FBGEMM TBE).")
            by_key.setdefault(f"dim{t.embedding_dim}_{t.pooling.name.lower()}", []).append(t)
        self.groups: Dict[str, _Group] = {k: _Group(k, v, config, self.device) for k, v in by_key.items()}
        for i, g in enumerate(self.groups.values()):
            self.add_module(f"scratchpad_{i}", g.pad)
        self.tables = list(tables)
        self.feature_names: List[str] = [f for t in tables for f in t.feature_names]
        self._feature_tables = [t.name for t in tables for _ in t.feature_names]
        self._feature_rows = torch.tensor([t.num_embeddings for t in tables for _ in t.feature_names])
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        group_order = [f for g in self.groups.values() for f in g.features]
        self._group_perm = [group_order.index(f) for f in self.feature_names]
        self._identity = self._group_perm == list(range(len(self.feature_names)))
        self._split_order = [self.feature_names.index(f) for f in group_order]
        self._split_sizes = [len(g.features) for g in self.groups.values()]
        self._group_dims = [self._dims[self.feature_names.index(f)] for f in group_order]
        self._queue: Deque[KeyedJaggedTensor] = deque()
        self._worker = PlanWorker()
        self._background = False  # whether the latest batch is planned in the background
        for g in self.groups.values():
            g.init_weights()

    # ---------------------------------------------------------------- batches in
    def _split(self, kjt: KeyedJaggedTensor) -> List[KeyedJaggedTensor]:
        if len(self.groups) == 1:
            return [kjt]
        return kjt.permute(self._split_order).split(self._split_sizes)

    def _validate(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Check the batch; return the number of ids of each feature."""
        return check_kjt(kjt, self.feature_names, self._feature_tables, self._feature_rows)[1].cpu()

    def _rows(self, kjt: KeyedJaggedTensor) -> List[Tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]]:
        """Validate; return, per group, (its sub-batch, distinct rows, group row of each id)."""
        per_feature = self._validate(kjt)[self._split_order]
        counts = per_feature.split(self._split_sizes)
        return [
            (sub, *g.rows_of(sub.values().to("cpu", torch.int64), n))
            for g, sub, n in zip(self.groups.values(), self._split(kjt), counts)
        ]

    def prefetch(self, kjt: KeyedJaggedTensor) -> None:
        """Announce a future batch: it is planned and its rows moved in when the window has room.

        Raises:
            ValueError: bad ids/lengths, or a batch with more distinct rows than a group has
                slots (names the group, the rows needed and the capacity). Nothing changes then.
        """
        t0 = time.perf_counter()
        per_group = self._rows(kjt)
        for g, (_, rows, _) in zip(self.groups.values(), per_group):
            if rows.numel() > g.capacity:
                raise CapacityError(
                    f"table group {g.name!r} (tables {[t.name for t in g.tables]}): one batch needs "
                    f"{rows.numel()} distinct rows but the scratchpad has {g.capacity} slots. "
                    f"Raise cache_rows/load_factor to at least {rows.numel()} rows, or use smaller batches."
                )
        elapsed = (time.perf_counter() - t0) / len(self.groups)
        largest = max(ids.numel() for _, _, ids in per_group)
        self._worker.wait()
        self._background = self.config.plans_in_background(self.device, largest)
        for g, (sub, rows, ids) in zip(self.groups.values(), per_group):
            g.stats.planner_s += elapsed
            g.stats.lookups += ids.numel()
            g.stats.unique_rows += rows.numel()
            offsets = sub.offsets().to(self.device, torch.int64)
            weights = sub.weights_or_none()
            weights = weights.to(self.device, non_blocking=True) if weights is not None else None
            t1 = time.perf_counter()
            g.window.push(rows, _Batch(ids, offsets, weights), fill=False)  # next-use links: planner time
            g.stats.planner_s += time.perf_counter() - t1
        self._queue.append(kjt)
        self._plan_ahead()

    def _plan_ahead(self) -> None:
        """Plan, and move rows in for, every batch the window has room for (on the worker)."""
        background = self._background
        self._worker.submit(lambda: self._fill(background), background)

    def _fill(self, background: bool) -> None:
        for g in self.groups.values():
            planned, moved = g.window.plan_seconds, g.stats.mover_s
            g.window.fill()
            if background:
                g.stats.planner_background_s += g.window.plan_seconds - planned
                g.stats.mover_background_s += g.stats.mover_s - moved

    def peek(self, kjts: Sequence[KeyedJaggedTensor]) -> None:
        """Show the victim policy the ids of batches beyond those prefetched (nothing moves)."""
        per_batch = [self._rows(k) for k in kjts]
        self._worker.wait()
        for i, g in enumerate(self.groups.values()):
            g.window.set_peek([rows[i][1] for rows in per_batch])

    # ---------------------------------------------------------------- train
    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings ``[B, sum(dims)]`` in feature order (see ``forward``)."""
        if not self._queue:
            self.prefetch(kjt)
        self._worker.wait()
        head = self._queue[0]
        if head is not kjt and not _same_batch(head, kjt):
            raise ValueError(
                "forward() got a batch that is not the oldest prefetched one: call forward on "
                "batches in the order they were prefetched (or do not prefetch)."
            )
        self._queue.popleft()
        entries = []
        for g in self.groups.values():
            g.mover.mark_retired()
            entries.append(g.window.pop(fill=False))
        # Plan the batches behind this one while it trains: they only touch unheld slots.
        self._plan_ahead()
        outs = []
        for g, entry in zip(self.groups.values(), entries):
            plan, batch = entry.plan, entry.payload
            assert plan is not None
            g.stats.train_misses += int((g.planner.slot_to_row[plan.slots] != plan.rows).sum())
            g.stats.steps += 1
            g.mover.wait_ready(batch.ready)
            slot_idx = g.planner.row_to_slot.index_select(0, batch.ids).to(self.device, torch.int64, non_blocking=True)
            outs.append(g.pad(slot_idx, batch.offsets, batch.weights))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if not self._identity:
            cols = torch.split(out, self._group_dims, dim=1)
            out = torch.cat([cols[i] for i in self._group_perm], dim=1)
        return out

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        """KeyedTensor of pooled embeddings for the oldest prefetched batch (``kjt`` itself)."""
        return KeyedTensor(keys=self.feature_names, length_per_key=self._dims, values=self.pooled(kjt))

    # ---------------------------------------------------------------- state
    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per-group counters (see ``GroupStats``), plus ``capacity``, ``window_stalls`` and
        ``blocked_s`` (seconds training waited for the background planner)."""
        self._worker.wait()
        out = {}
        for name, g in self.groups.items():
            d = g.stats.as_dict()
            d["blocked_s"] = self._worker.blocked_s / len(self.groups)
            d["planner_s"] += g.window.plan_seconds
            d["window_stalls"] = g.window.stalls
            d["capacity"] = g.capacity
            out[name] = d
        return out

    def flush(self) -> None:
        """Write every resident row (weights and optimizer state) back to the backing store."""
        self._worker.wait()
        for g in self.groups.values():
            g.mover.flush(*g.resident())

    def _locate(self, name: str) -> tuple:
        for g in self.groups.values():
            for i, t in enumerate(g.tables):
                if t.name == name:
                    return g, i
        raise KeyError(f"no table named {name!r}; tables: {[t.name for t in self.tables]}")

    def table_weights(self) -> Dict[str, torch.Tensor]:
        """Full, up-to-date weights per table (views on the backing store)."""
        self.flush()
        return {t.name: self._view(t.name, "weights") for t in self.tables}

    def optimizer_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Full optimizer state per table: ``{table: {state name: tensor}}`` (views)."""
        self.flush()
        return {t.name: {n: self._view(t.name, n) for n in self._state_names()} for t in self.tables}

    def _state_names(self) -> List[str]:
        return OPTIMIZER_STATE_NAMES[self.config.optimizer]

    def _view(self, table: str, what: str) -> torch.Tensor:
        g, i = self._locate(table)
        src = g.store.weights if what == "weights" else g.store.states[what]
        return g.store.table_view(src, i)

    def load_table_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        """Copy full table weights in (any subset of tables); resident slots are refreshed."""
        self._load({name: {"weights": w} for name, w in weights.items()})

    def load_optimizer_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Copy full optimizer states in (any subset of tables and states)."""
        self._load(states)

    def _load(self, items: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for name, per in items.items():  # validate everything first
            for what, src in per.items():
                if what != "weights" and what not in self._state_names():
                    raise KeyError(f"table {name!r}: unknown optimizer state {what!r}; known: {self._state_names()}")
                dst = self._view(name, what)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"table {name!r} {what}: shape {tuple(src.shape)} does not match {tuple(dst.shape)}.")
        self.flush()
        with torch.no_grad():
            for name, per in items.items():
                for what, src in per.items():
                    self._view(name, what).copy_(src)
        for g in self.groups.values():
            g.mover.refresh(*g.resident())

    def set_learning_rate(self, lr: float) -> None:
        self._worker.wait()
        for g in self.groups.values():
            g.pad.set_learning_rate(lr)

    def get_learning_rate(self) -> float:
        return next(iter(self.groups.values())).pad.get_learning_rate()

    def set_window(self, lookahead: int, horizon: Optional[int] = None) -> None:
        """Change L and H (a pipeline does this); only while no batch is in flight.

        Args:
            lookahead: batches planned ahead of the training batch.
            horizon: batches ahead whose ids guide victim choice (default ``lookahead``).
        """
        self._worker.wait()
        horizon = lookahead if horizon is None else horizon
        if lookahead < 0 or horizon < lookahead:
            raise ValueError(f"need 0 <= lookahead <= horizon, got lookahead={lookahead}, horizon={horizon}.")
        if self._queue:
            raise RuntimeError(
                f"set_window() with {len(self._queue)} batches in flight: call reset_window() "
                "or finish them first."
            )
        self.config.lookahead, self.config.horizon = lookahead, horizon
        for g in self.groups.values():
            g.window.clear()
            g.window.lookahead, g.window.horizon = lookahead, horizon

    def reset_window(self) -> None:
        """Forget every prefetched batch that has not trained (e.g. at the end of an epoch)."""
        self._worker.wait()
        self._queue.clear()
        for g in self.groups.values():
            g.window.clear()


def _same_batch(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    return (
        a.keys() == b.keys()
        and torch.equal(a.lengths(), b.lengths())
        and torch.equal(a.values(), b.values())
    )
