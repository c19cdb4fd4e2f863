"""ScratchPipeEmbeddingBags: the engine that ties plan, move and train together."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import RowLayout, check_optimizer, state_names
from torchrec_scratchpipe.core.group import POOLING, GroupBatch, TableGroup, check_unpooled, pooling_of
from torchrec_scratchpipe.core.plan import CapacityError
from torchrec_scratchpipe.core.validate import HostIds, check_kjt, host_ids, split_groups, to_device
from torchrec_scratchpipe.core.window import WindowEntry
from torchrec_scratchpipe.core.worker import PlanWorker
from torchrec_scratchpipe.defaults import check_window


#: A group's bag offsets and per-sample weights, on the scratchpad's device.
_Bags = Tuple[torch.Tensor, Optional[torch.Tensor]]


@dataclass
class PreparedBatch:
    """A validated batch, ready to queue (``ScratchPipeEmbeddingBags.prepare``)."""

    kjt: KeyedJaggedTensor
    per_group: List[Tuple[_Bags, torch.Tensor, torch.Tensor]]  # ((offsets, weights), rows, ids) per group
    seconds: float
    counts: List[int] = dataclasses.field(default_factory=list)  # ids per feature, from the host copy

    def hand_to(self, stream: Any) -> None:
        """Hand the batch's device tensors (bag offsets, per-sample weights), made on the
        current stream, to the CUDA ``stream`` its forward will run on: ``stream`` waits
        for the current stream's work so far, and the allocator keeps the tensors until
        ``stream``'s use of them is done (``record_stream``). Nothing to do on CPU.
        """
        tensors = [t for (offsets, weights), _, _ in self.per_group for t in (offsets, weights) if t is not None and t.is_cuda]
        if not tensors:
            return
        stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        for t in tensors:
            t.record_stream(stream)


@dataclass
class _Queued:
    """A prefetched batch waiting for its forward, identified by ``token``."""

    token: int
    kjt: KeyedJaggedTensor
    counts: List[int]  # ids per feature (host): what an unpooled forward splits by


class ScratchPipeEmbeddingBags(torch.nn.Module):
    """Pooled embedding tables kept in host memory and trained in a device scratchpad.

    Batches are announced ahead with ``prefetch``; the planner places each batch's rows
    in the scratchpad before it trains, never evicting a row that a batch in the window
    still needs. ``forward`` trains the oldest announced batch (or plans the given one on
    demand), and backward applies the fused optimizer inside the scratchpad.

    Args:
        tables: torchrec ``EmbeddingBagConfig`` (or objects with ``name``,
            ``num_embeddings``, ``embedding_dim``, ``feature_names``, ``pooling``), or
            unpooled tables: torchrec ``EmbeddingConfig`` (or ``pooling=NONE``), all of
            one dim; ``embeddings``/``forward`` then return one row per id.
        config: capacity, lookahead, optimizer and policy.
        device: ``cpu`` or a ``cuda`` device for the scratchpad.
        packed_store: keep each row's weights and optimizer state together in the
            backing store (one copy per row when moving; ``table_weights()`` and
            ``optimizer_states()`` are then row-strided views: ``torch.save`` of one
            writes the whole packed store, ``.clone()`` it first). False: one contiguous
            tensor per value (what TorchRec's ``ShardedTensor`` needs; the TorchRec
            kernel uses it).
        staging_rows: rows a step is expected to move into (and out of) each table, by
            name (e.g. the planner's estimate); a group's staging rings on CUDA are sized
            for the sum over its tables. None: their default size.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100,
        ...                              feature_names=["f0"])]
        >>> emb = ScratchPipeEmbeddingBags(tables, ScratchPipeConfig(cache_rows=16, lookahead=1))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f0"], torch.tensor([1, 2, 3]),
        ...                                             torch.tensor([1, 2]))
        >>> token = emb.prefetch(kjt)
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
        packed_store: bool = True,
        staging_rows: Optional[Dict[str, int]] = None,
    ) -> None:
        super().__init__()
        self.device = device or torch.device("cpu")
        check_optimizer(config.optimizer, self.device)
        if not tables:
            raise ValueError("ScratchPipeEmbeddingBags needs at least one table.")
        self.unpooled = check_unpooled(tables)
        self.config = config
        by_key: Dict[str, List[Any]] = {}
        for t in tables:
            if pooling_of(t) not in POOLING:
                raise ValueError(f"table {t.name!r}: pooling {pooling_of(t)} is not supported (use SUM, MEAN or NONE).")
            tag = RowLayout.for_table(config.optimizer, t).group_tag  # weight dtypes train apart
            by_key.setdefault(f"dim{t.embedding_dim}_{pooling_of(t).name.lower()}{tag}", []).append(t)
        per_step = {k: sum((staging_rows or {}).get(t.name, 0) for t in v) or None for k, v in by_key.items()}
        self.groups: Dict[str, TableGroup] = {
            k: TableGroup(k, v, config, self.device, packed_store, per_step[k]) for k, v in by_key.items()
        }
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
        self._group_features = [[self.feature_names.index(f) for f in g.features] for g in self.groups.values()]
        self._group_dims = [self._dims[self.feature_names.index(f)] for f in group_order]
        self._queue: Deque[_Queued] = deque()  # prefetched, waiting for their forward
        self._tokens = itertools.count()
        #: CUDA stream the batches' ids are produced on (a pipeline sets its data-distribution
        #: stream): ``prefetch`` copies ids to the host there, so it never waits for training.
        self.intake_stream: Optional[Any] = None
        self._worker = PlanWorker(self._blocked)
        self._background = False  # whether the latest batch is planned in the background
        self._dirty = False  # slots may hold updates the store has not seen (flush writes them back)
        self._stale = False  # the store was loaded: resident slots must be refreshed from it
        self.owner: Any = None  # the pipeline whose batches are queued (set by that pipeline)
        self._counts: List[int] = []  # ids per feature of the batch the latest forward looked up
        for g in self.groups.values():
            g.init_weights()

    # ---------------------------------------------------------------- batches in
    def _rows(
        self, kjt: KeyedJaggedTensor, host: Optional[HostIds] = None
    ) -> Tuple[List[Tuple[_Bags, torch.Tensor, torch.Tensor]], List[int]]:
        """Validate on the host copy; return, per group, ((offsets, weights) on the device,
        distinct rows, group row of each id), and the ids of each feature."""
        host = host if host is not None else host_ids(kjt, self.intake_stream)
        per_feature = check_kjt(host, self.feature_names, self._feature_tables, self._feature_rows)[1]
        counts = per_feature[self._split_order].split(self._split_sizes)
        parts = split_groups(kjt, host, per_feature, self._group_features, self.device)
        per_group = [((offsets, weights), *g.rows_of(ids, n)) for g, (ids, offsets, weights), n in zip(self.groups.values(), parts, counts)]
        return per_group, per_feature.tolist()  # a host tensor: no device sync

    def prefetch(self, kjt: KeyedJaggedTensor, host: Optional[HostIds] = None) -> int:
        """Announce a future batch; return its token (pass it to ``pooled`` to name the batch).

        The batch is queued; its rows are planned and moved in when training reaches it
        (at most L batches ahead of the one training).

        Args:
            kjt: the batch.
            host: its host copy from ``host_ids(kjt)``, made earlier on the stream that
                produced the ids. None: made here, on ``intake_stream`` if set. The checks
                and the planner read only this copy.

        Raises:
            ValueError: bad ids/lengths, or a batch with more distinct rows than a group has
                slots (names the group, the rows needed and the capacity). Nothing changes then.
        """
        return self.enqueue(self.prepare(kjt, host))

    def prepare(self, kjt: KeyedJaggedTensor, host: Optional[HostIds] = None) -> PreparedBatch:
        """Validate a batch and find its rows, changing nothing (``enqueue`` queues it).

        Raises:
            ValueError, CapacityError: as ``prefetch``.
        """
        t0 = time.perf_counter()
        per_group, counts = self._rows(kjt, host)
        for g, (_, rows, _) in zip(self.groups.values(), per_group):
            g.window.check_fits(rows)  # the batch's one capacity check, before any group queues it
        return PreparedBatch(kjt, per_group, time.perf_counter() - t0, counts)

    def enqueue(self, batch: PreparedBatch) -> int:
        """Queue a prepared batch (see ``prefetch``); return its token."""
        self._sync()
        largest = max(ids.numel() for _, _, ids in batch.per_group)
        self._background = self.config.plans_in_background(self.device, largest)
        for g, ((offsets, weights), rows, ids) in zip(self.groups.values(), batch.per_group):
            g.stats.planner_s += batch.seconds / len(self.groups)
            g.stats.add("lookups", ids.numel())
            g.stats.add("unique_rows", g.planner.row_count(rows))
            t1 = time.perf_counter()
            entry = g.window.push(rows, GroupBatch(ids, offsets, weights), fill=False, checked=True)  # next-use links: planner time
            g.stats.planner_s += time.perf_counter() - t1
            g.read_ahead(entry)
        token = next(self._tokens)
        self._queue.append(_Queued(token, batch.kjt, batch.counts))
        return token

    def _plan_ahead(self) -> None:
        """Plan, and move rows in for, every batch the window has room for (on the worker)."""
        background = self._background
        self._worker.submit(lambda: self._fill(background), background)

    def _fill(self, background: bool) -> None:
        for g in self.groups.values():
            planned, moved = g.stats.planner_s, g.stats.mover_s
            g.window.fill()
            if background:
                g.stats.planner_background_s += g.stats.planner_s - planned
                g.stats.mover_background_s += g.stats.mover_s - moved

    def _blocked(self, seconds: float) -> None:
        """The worker's report of time training waited for it: an equal share per group."""
        for g in self.groups.values():
            g.stats.blocked_s += seconds / len(self.groups)

    # ---------------------------------------------------------------- train
    def _sync(self) -> None:
        """Wait for the background planner, release finished batches, apply a pending load."""
        self._worker.wait()
        for g in self.groups.values():
            g.window.retire_done()
        if self._stale:
            self._stale = False
            for g in self.groups.values():
                g.mover.refresh(*g.resident())

    def pooled(self, kjt: KeyedJaggedTensor, token: Optional[int] = None) -> torch.Tensor:
        """Pooled embeddings ``[B, sum(dims)]`` in feature order (see ``forward``).

        Which batch: the one ``token`` names (``prefetch``'s result), else ``kjt`` itself.
        The oldest prefetched batch trains; with nothing prefetched, a training forward
        plans ``kjt`` on demand. A forward that will not be backpropagated (under
        ``torch.no_grad()`` or in eval mode) of any other batch reads the rows where they
        are and changes nothing.

        Raises:
            ValueError: a training forward of a batch that is not the oldest prefetched one.
            CapacityError: the batch's rows do not fit beside those held by batches that
                ran forward and have not finished backward. Nothing changes then.
        """
        self._sync()
        train = torch.is_grad_enabled() and self.training
        head = self._queue[0] if self._queue else None
        if head is not None and (head.token == token if token is not None else head.kjt is kjt):
            return self._train_head(train)
        if not train:
            parts, self._counts = self._rows(kjt)
            return self._join([g.lookup(ids, *dev, self.device) for g, (dev, _, ids) in zip(self.groups.values(), parts)])
        if head is not None or token is not None:
            raise ValueError(
                "forward() got a batch that is not the oldest prefetched one: call forward on "
                "batches in the order they were prefetched (or do not prefetch)."
            )
        self.prefetch(kjt)  # on demand
        try:
            return self._train_head(train)
        except CapacityError:
            self.reset_window()  # forget the batch just queued
            raise

    def _train_head(self, train: bool) -> torch.Tensor:
        """Train (or, without ``train``, just look up) the oldest prefetched batch."""
        for g in self.groups.values():
            if not g.window.plan_head():
                raise CapacityError(g.capacity_message(g.window.pending[0]))
        self._counts = self._queue.popleft().counts
        entries = [g.window.take(fill=False) for g in self.groups.values()]
        plan_first = train and self._background  # the thread plans ahead while this batch trains
        if plan_first:
            self._plan_ahead()
        outs = []
        with contextlib.nullcontext() if train else torch.no_grad():
            for g, entry in zip(self.groups.values(), entries):
                assert entry is not None and entry.plan is not None
                plan, batch = entry.plan, entry.payload
                g.stats.add("train_misses", g.planner.train_misses(plan))
                g.stats.steps += 1
                g.mover.wait_ready(batch.ready)
                # through pinned memory on CUDA: a pageable copy would make the host wait
                slot_idx = to_device(g.planner.row_to_slot.index_select(0, batch.ids), self.device).to(self.device, torch.int64)
                out = g.pad(slot_idx, batch.offsets, batch.weights)
                node = _update_node(out) if train else None
                if node is None:  # no update will run: the slots are free once the reads are issued
                    g.window.finish(entry)
                    g.mover.mark_retired()
                    if not plan_first:  # else the next call releases it, once the thread is done
                        g.window.retire_done()
                else:
                    self._dirty = True
                    node.register_hook(functools.partial(self._finished, g, entry))
                outs.append(out)
        if not plan_first:
            self._plan_ahead()  # plan batch j+L now that batch j's TBE is launched
        return self._join(outs)

    def _finished(self, g: TableGroup, entry: WindowEntry, *_: Any) -> None:
        """Autograd hook, run once the batch's backward (and fused update) has run."""
        self._dirty = True
        g.mover.mark_retired()
        g.window.finish(entry)

    def _join(self, outs: List[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-group outputs in feature order."""
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if not self._identity:
            cols = torch.split(out, self._group_dims, dim=1)
            out = torch.cat([cols[i] for i in self._group_perm], dim=1)
        return out

    def embeddings(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Unpooled tables: one embedding per id, ``[len(kjt.values()), dim]`` in id order.

        The scratchpad's TBE runs with ``PoolingMode.NONE`` here, so the tensor ``pooled``
        computes is already per id; only its shape differs.
        """
        if not self.unpooled:
            raise ValueError("embeddings() is for unpooled (PoolingType.NONE) tables; these pool: use pooled().")
        return self.pooled(kjt)

    def forward(self, kjt: KeyedJaggedTensor) -> Any:
        """Embeddings of the oldest prefetched batch (``kjt`` itself): a KeyedTensor of
        pooled embeddings, or for unpooled tables ``{feature: JaggedTensor}`` as
        TorchRec's ``EmbeddingCollection`` returns."""
        if self.unpooled:
            # split by the host copy's counts and a view of the lengths: no device sync
            values = torch.split(self.embeddings(kjt), self._counts)
            lengths = kjt.lengths().view(len(self.feature_names), -1)
            return {f: JaggedTensor(values=v, lengths=n) for f, v, n in zip(self.feature_names, values, lengths)}
        return KeyedTensor(keys=self.feature_names, length_per_key=self._dims, values=self.pooled(kjt))

    # ---------------------------------------------------------------- state
    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per-group counters (``GroupStats``, their only owner), plus ``capacity``."""
        self._sync()
        return {name: dict(g.stats.as_dict(), capacity=g.capacity) for name, g in self.groups.items()}

    def _apply(self, fn: Any, recurse: bool = True) -> "ScratchPipeEmbeddingBags":
        """``Module._apply`` (``.to``, ``.cuda``, ``.half``, ``to_empty``, TorchRec's DDP
        wrapping): nothing of the engine is moved, cast or copied.

        The backing store stays in host memory (tables larger than device memory are the
        point), and the scratchpad, its streams and staging buffers stay on the device the
        engine was built for, with the tables' own precision (their ``data_type``; a cast
        such as ``.half()`` changes the model's other tensors only). A call that keeps the
        device, as DDP's ``.to(device)`` does, is therefore a no-op here; one that asks for
        another device raises (the engine changes nothing).

        Raises:
            ValueError: ``fn`` moves tensors to another device than the scratchpad's.
        """
        pad = next(iter(self.groups.values())).pad.weights
        probe = torch.empty(0, dtype=pad.dtype, device=pad.device)
        moved = fn(probe)
        if isinstance(moved, torch.Tensor) and moved.device != probe.device:
            raise ValueError(
                f"ScratchPipe tables {[t.name for t in self.tables]} cannot move from {probe.device} to "
                f"{moved.device}: the backing store stays in host memory and the scratchpad on the device "
                "the engine (or the DMP) was built with. Build it with that device instead."
            )
        return self

    def __getstate__(self) -> Dict[str, Any]:
        """Copies (deepcopy, pickling) are taken once the background planner is idle, so
        no group is copied halfway through a plan."""
        self._worker.wait()
        state: Dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        return state

    def flush(self) -> None:
        """Write every resident row (weights and optimizer state) back to the backing store.

        Only rows updated since the last flush or load can differ from the store; when none
        was, nothing is written (so a flush never overwrites values loaded into the store).
        """
        self._sync()
        for g in self.groups.values():
            g.mover.flush(*(g.resident() if self._dirty else (torch.empty(0, dtype=torch.int64),) * 2))
            g.store.flush()  # a file store writes its cached updates through: the views are current
        self._dirty = False

    def purge(self) -> None:
        """Drop the cached copies: the store becomes the truth (call before writing it).

        Updates not yet written back are flushed first; after that the scratchpad is only
        a cache, refreshed from the store before it is next used, so whatever is then
        loaded into the store (in place or by copy) is what the next forward reads.
        """
        self.flush()
        self._stale = True

    def reload(self) -> None:
        """The store was written from outside (after ``purge``): refresh the resident slots
        from it now. Updates not flushed before are dropped, as a load overwrites them."""
        self._dirty = False
        self._stale = True
        self._worker.wait()
        for g in self.groups.values():
            g.store.invalidate()  # a file store's cached copies predate the load
        self._sync()

    def _locate(self, name: str) -> Tuple[TableGroup, int]:
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
        return state_names(self.config.optimizer)

    def _view(self, table: str, what: str) -> torch.Tensor:
        g, i = self._locate(table)
        src = g.store.weights if what == "weights" else g.store.states[what]
        view: torch.Tensor = g.store.table_view(src, i)
        return view

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
        self.purge()
        with torch.no_grad():
            for name, per in items.items():
                for what, src in per.items():
                    self._view(name, what).copy_(src)
        self.reload()

    def set_learning_rate(self, lr: float) -> None:
        self._sync()
        for g in self.groups.values():
            g.pad.set_learning_rate(lr)

    def get_learning_rate(self) -> float:
        return next(iter(self.groups.values())).pad.get_learning_rate()

    def set_window(self, lookahead: int, horizon: Optional[int] = None) -> None:
        """Change L and H (a pipeline does this); only while no batch is in flight.

        ``config`` then becomes a copy with the new L and H: the ``ScratchPipeConfig``
        the engine was built with is frozen, and may be shared, so it never changes.

        Args:
            lookahead: batches planned ahead of the training batch.
            horizon: batches ahead whose ids guide victim choice (default ``lookahead``).
        """
        horizon = check_window(lookahead, horizon)
        self._sync()
        if self._queue:
            raise RuntimeError(
                f"set_window() with {len(self._queue)} batches in flight: call reset_window() "
                "or finish them first."
            )
        self.config = dataclasses.replace(self.config, lookahead=lookahead, horizon=horizon)  # never the caller's
        for g in self.groups.values():
            g.window.clear()
            g.mover.fence()  # released slots may still be in use on the training stream
            g.window.lookahead, g.window.horizon = lookahead, horizon

    def queued(self) -> int:
        """Batches prefetched and not yet forwarded."""
        return len(self._queue)

    def reset_window(self) -> None:
        """Forget every prefetched batch that has not trained (e.g. at the end of an epoch).

        Batches that ran forward keep their rows until their backward has run.
        """
        self._sync()
        self._queue.clear()
        self.owner = None
        for g in self.groups.values():
            g.window.clear()
            g.mover.fence()  # released slots may still be in use on the training stream


def _update_node(out: torch.Tensor) -> Optional[Any]:
    """The autograd node of the TBE lookup behind ``out`` (its backward applies the fused
    update), or None when no backward can run. Skips single-input wrappers such as views."""
    node = out.grad_fn
    while node is not None:
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1 or type(inputs[0]).__name__ == "AccumulateGrad":
            return node
        node = inputs[0]
    return None
