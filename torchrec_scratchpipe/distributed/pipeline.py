"""ScratchPipeTrainPipeline: TorchRec's sparse-dist pipeline, looking L batches ahead.

TorchRec's ``PrefetchTrainPipelineSparseDist`` keeps one future batch and (on CPU)
skips prefetch. This pipeline keeps H+1 batches in flight, runs the sparse input
distribution ahead for each, and announces each one to the ScratchPipe kernels once
its distributed ids are known (after the backward of the step that fetched it). The
kernels' planners then move rows for up to L batches ahead while batch i trains, and use
the ids of the rest (up to H ahead) to pick victims. Plain ``fused`` tables in the same
model are untouched. A bad batch is refused on every rank and dropped; training goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch

from torchrec_scratchpipe.compat import (
    Multistreamable,
    PrefetchPipelinedForward,
    PrefetchTrainPipelineContext,
    TrainPipelineSparseDist,
    module_process_group,
    wait_for_batch,
)
from torchrec_scratchpipe.defaults import LIBRARY_LOOKAHEAD, check_window
from torchrec_scratchpipe.distributed.batch_check import BatchAgreement, out_of_range
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.stats import scratchpipe_kernels

logger = logging.getLogger(__name__)


class ScratchPipeTrainPipeline(TrainPipelineSparseDist):
    """Train pipeline that plans the ScratchPipe scratchpads from future batches.

    Batch i trains while batches i+1..i+L are planned and their rows moved in (on CUDA
    the kernels' movers run on a side stream; on CPU in order), and the ids of batches up
    to i+H steer victim choice. ``progress(dataloader_iter)`` follows TorchRec's
    contract: one step per call, ``StopIteration`` once every batch has trained.

    Args:
        model: a ``DistributedModelParallel`` model whose forward returns
            ``(losses, output)`` (e.g. torchrec's ``DLRMTrain``).
        optimizer: the optimizer stepped after backward (e.g. a ``CombinedOptimizer``
            over ``model.fused_optimizer`` and the dense parameters).
        device: the training device.
        lookahead: L, batches planned ahead of the training batch (default
            ``defaults.LIBRARY_LOOKAHEAD``: 1).
        horizon: H >= L, batches ahead whose ids guide victim choice (default L; at most
            ``defaults.MAX_HORIZON``, see ``defaults.check_window``).
        execute_all_batches: train the batches still in flight when the iterator ends.
        apply_jit: as in TorchRec's pipelines.
        custom_model_fwd: as in TorchRec's pipelines.

    Example::

        >>> pipeline = ScratchPipeTrainPipeline(model, optimizer, torch.device("cpu"),
        ...                                     lookahead=2, horizon=8)  # doctest: +SKIP
        >>> while True:  # doctest: +SKIP
        ...     try:
        ...         loss, logits, labels = pipeline.progress(data_iter)  # DLRMTrain
        ...     except StopIteration:
        ...         break
    """

    _pipelined_forward_type = PrefetchPipelinedForward  # type: ignore[assignment]

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lookahead: int = LIBRARY_LOOKAHEAD,
        horizon: Optional[int] = None,
        execute_all_batches: bool = True,
        apply_jit: bool = False,
        custom_model_fwd: Optional[Callable[[Any], Tuple[torch.Tensor, Any]]] = None,
    ) -> None:
        horizon = check_window(lookahead, horizon)
        self._kernels = scratchpipe_kernels(model)
        for kernel in self._kernels:
            for name, g in kernel.engine.groups.items():
                if lookahead + 1 > g.capacity:
                    raise ValueError(
                        f"lookahead {lookahead} is too large for the scratchpad of tables "
                        f"{[t.name for t in g.tables]} ({g.capacity} slots): L+1 batches of at "
                        "least one row each must fit. Lower --lookahead or raise the load factor."
                    )
        super().__init__(
            model=model,
            optimizer=optimizer,
            device=device,
            execute_all_batches=execute_all_batches,
            apply_jit=apply_jit,
            context_type=PrefetchTrainPipelineContext,
            custom_model_fwd=custom_model_fwd,
        )
        self.lookahead = lookahead
        self.horizon = horizon
        self._started = False
        self._keys: Optional[List[str]] = None
        self._announce_pending = False  # the newest batch is input-distributed, not yet announced
        self._verdict: Optional[str] = None  # why the newest fetched batch must be refused, or None
        self._tables = _table_rows(model)
        self._required = sorted(self._tables)
        self._agreement = BatchAgreement(module_process_group(model))
        for module in model.modules():  # this pipeline checks every batch's ids before the input dist
            if hasattr(module, "ids_checked_upstream"):
                module.ids_checked_upstream = True
        if not any(k.engine.queued() for k in self._kernels):
            self._claim()  # else another pipeline's batches are in flight: claim at the first training step

    def _claim(self) -> None:
        """Make the kernels' windows this pipeline's (L, H), unless they already are."""
        for kernel in self._kernels:
            engine = kernel.engine
            if engine.owner is self:
                continue
            if engine.queued():
                raise ValueError(
                    f"tables {kernel.table_names} have {engine.queued()} batches in flight from another "
                    "pipeline: finish them or call that pipeline's reset() before training with this one "
                    "(an evaluation pipeline runs with model.eval() and needs no claim)."
                )
            engine.set_window(self.lookahead, self.horizon)
            engine.owner = self
            # ids come from the input dist: copy them to the host there, not behind training work
            engine.intake_stream = self._data_dist_stream

    def _next_batch(self, dataloader_iter: Iterator[Any]) -> Any:
        """TorchRec's, plus the batch check on the loader's (host) batch, before TorchRec copies
        it to the device: on CUDA the check then never waits for the device."""
        batch = super()._next_batch(dataloader_iter)
        self._verdict = None if batch is None else self._check_batch(batch)
        return batch

    def _check_batch(self, batch: Any) -> Optional[str]:
        """Why a batch must be refused (features unlike the model's, ids out of range), or None.

        Checked before the batch's input dist, on the global ids: TorchRec's input dist
        permutes features by the positions it saw in the first batch, so a batch with other
        or reordered keys would silently train the wrong tables, and it splits ids by rows,
        so a row-wise shard would only see a local id.
        """
        kjt = getattr(batch, "sparse_features", None)
        if kjt is None:
            return None
        keys = list(kjt.keys())
        if self._keys is None:
            missing = [f for f in self._required if f not in keys]
            if missing:
                return (
                    f"batch features {keys} lack {missing}, which the model's embedding tables read: "
                    "give every batch a KeyedJaggedTensor with all the model's features."
                )
        elif keys != self._keys:
            return (
                f"batch features {keys} differ from the first batch's {self._keys}: every batch must "
                "carry the same features in the same order."
            )
        return out_of_range(kjt, self._tables, self._agreement.rank)

    @property
    def kernels(self) -> List[ScratchPipeEmbeddingBag]:
        """The ScratchPipe kernels this pipeline feeds."""
        return self._kernels

    def fill_pipeline(self, dataloader_iter: Iterator[Any]) -> None:
        """Bring H+1 batches in flight: copied, checked, input-distributed and announced."""
        if not self.batches:
            if not self._enqueue_checked(dataloader_iter):
                if not self._started:
                    raise ValueError(
                        "ScratchPipeTrainPipeline got an empty data iterator: it yielded no batch."
                    )
                return
            self._started = True
            self._init_pipelined_modules(
                self.batches[0], self.contexts[0], self._pipelined_forward_type  # type: ignore[arg-type]
            )
            self._announce_last()
        while len(self.batches) < self.horizon + 1 and self._enqueue_checked(dataloader_iter):
            self.start_sparse_data_dist(self.batches[-1], self.contexts[-1])
            self._announce_last()

    def _enqueue_checked(self, dataloader_iter: Iterator[Any]) -> bool:
        """Fetch the next batch and check it on every rank; a bad batch is dropped everywhere."""
        if not self.enqueue_batch(dataloader_iter):
            return False
        self._agree_or_drop(self._verdict, ValueError)  # checked on the host by _next_batch
        if self._keys is None:
            self._keys = list(self.batches[-1].sparse_features.keys())
        return True

    def _agree_or_drop(self, error: Optional[str], kind: type) -> None:
        """Share a rank's verdict on the newest batch; if any rank refused it, every rank
        drops it and raises the same error."""
        verdict = self._agreement.first_error(error, kind)
        if verdict is not None:
            self.batches.pop()
            self.contexts.pop()
            raise verdict

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        """Train one batch; raise StopIteration when none is left.

        Order of one step: announce the batch input-distributed during the previous step
        (its rows are planned once training reaches it), top up the window, fetch, check and
        start the input dist of the next batch, then forward (the kernels plan batch i+L
        right after batch i's lookup is launched), backward and the optimizer step.

        Raises:
            ValueError: a batch was refused (features unlike the model's, an id outside its
                table, more distinct rows than a scratchpad has slots), the iterator was
                empty from the start, or (training mode) another pipeline still has batches
                in flight on these tables. The batch is dropped on every rank before this step
                changes anything; the next call goes on with the batches after it.
        """
        if not self._model_attached:
            self.attach(self._model)
        if self._model.training:
            self._claim()
        if self._announce_pending:
            self._announce_pending = False
            self._announce_last()
        self.fill_pipeline(dataloader_iter)
        if not self.batches:
            raise StopIteration
        fetched = self._enqueue_checked(dataloader_iter)
        if fetched:  # its ids travel while this batch trains; announced after backward
            self.start_sparse_data_dist(self.batches[-1], self.contexts[-1])
        self._set_module_context(self.contexts[0])
        if self._model.training:
            self._optimizer.zero_grad()
        wait_for_batch(self.batches[0], self._data_dist_stream)  # type: ignore[arg-type]
        losses, output = self._model_fwd(self.batches[0])
        if self._model.training:
            torch.sum(losses, dim=0).backward()
            self._optimizer.step()
        self._announce_pending = fetched
        self.dequeue_batch()
        return output

    def _announce_last(self) -> None:
        """Finish the newest batch's input dist and hand its ids to the ScratchPipe kernels.

        Each input-dist awaitable is waited on exactly once here; the result is kept in
        the context for ``PrefetchPipelinedForward`` (TorchRec's awaitable pitfall). In
        training mode the kernels check the batch on every rank first (a batch with more
        distinct rows than a scratchpad has slots is dropped everywhere); in eval mode they
        are not told (eval forwards read rows in place and leave the training window alone).
        """
        context = cast(PrefetchTrainPipelineContext, self.contexts[-1])
        self.wait_sparse_data_dist(context)
        context.module_input_post_prefetch.clear()
        context.module_contexts_post_prefetch.clear()
        stream = self._data_dist_stream
        inputs = []
        for module in self._pipelined_modules:
            name = module.forward._name  # type: ignore[union-attr]
            request = context.input_dist_tensors_requests.pop(name)
            with self._stream_context(stream):  # type: ignore[arg-type]
                dist_input = request.wait()
            module_ctx = context.module_contexts.pop(name)
            if stream is not None:
                cur = torch.get_device_module(self._device).current_stream()
                cur.wait_stream(stream)
                cast(Multistreamable, dist_input).record_stream(cur)
                module_ctx.record_stream(cur)
            context.module_input_post_prefetch[name] = dist_input
            context.module_contexts_post_prefetch[name] = module_ctx
            if getattr(module, "scratchpipe_kernels", None) and module.scratchpipe_kernels():  # type: ignore[operator]
                inputs.append((module, dist_input))
        if not self._model.training:
            return
        # Every rank takes part in the agreement, also one without ScratchPipe shards (a
        # table-wise table lives on one rank): the collectives must match across ranks.
        prepared, error, kind = [], None, ValueError
        try:
            prepared = [(m, d, m.prepare_prefetch(d)) for m, d in inputs]
        except ValueError as e:
            error, kind = str(e), type(e)
        self._agree_or_drop(error, kind)
        for module, dist_input, parts in prepared:
            module.commit_prefetch(dist_input, parts)

    def reset(self) -> None:
        """Drop every in-flight batch (TorchRec's reset) and empty the scratchpad windows
        this pipeline filled."""
        super().reset()
        self._announce_pending = False
        for kernel in self._kernels:
            if kernel.engine.owner is self:
                kernel.engine.reset_window()


def _table_rows(model: torch.nn.Module) -> Dict[str, Tuple[str, int]]:
    """Feature -> (table, global rows) over the model's embedding tables (the smallest
    table when a feature feeds several)."""
    out: Dict[str, Tuple[str, int]] = {}
    for m in model.modules():
        for c in getattr(m, "_embedding_bag_configs", None) or getattr(m, "_embedding_configs", None) or []:
            for f in c.feature_names:
                if f not in out or c.num_embeddings < out[f][1]:
                    out[f] = (c.name, c.num_embeddings)
    return out
