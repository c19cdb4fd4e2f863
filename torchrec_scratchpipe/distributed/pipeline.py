"""ScratchPipeTrainPipeline: TorchRec's sparse-dist pipeline, looking L batches ahead.

TorchRec's ``PrefetchTrainPipelineSparseDist`` keeps one future batch and (on CPU)
skips prefetch. This pipeline keeps H+1 batches in flight, runs the sparse input
distribution ahead for each, and announces each one to the ScratchPipe kernels as soon
as its distributed ids are known. The kernels' planners then move rows for up to L
batches ahead while batch i trains, and use the ids of the rest (up to H ahead) to pick
victims. Plain ``fused`` tables in the same model are untouched.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List, Optional, Tuple, cast

import torch

from torchrec_scratchpipe.compat import (
    Multistreamable,
    PrefetchPipelinedForward,
    PrefetchTrainPipelineContext,
    TrainPipelineSparseDist,
    wait_for_batch,
)
from torchrec_scratchpipe.distributed.kernel import ScratchPipeEmbeddingBag
from torchrec_scratchpipe.distributed.stats import scratchpipe_kernels

logger = logging.getLogger(__name__)
#: Largest horizon accepted: each in-flight batch keeps its distributed ids alive.
MAX_HORIZON = 1024


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
        lookahead: L, batches planned ahead of the training batch.
        horizon: H >= L, batches ahead whose ids guide victim choice (default L).
        execute_all_batches: train the batches still in flight when the iterator ends.
        apply_jit: as in TorchRec's pipelines.
        custom_model_fwd: as in TorchRec's pipelines.

    Example::

        >>> pipeline = ScratchPipeTrainPipeline(model, optimizer, torch.device("cpu"),
        ...                                     lookahead=2, horizon=8)  # doctest: +SKIP
        >>> while True:  # doctest: +SKIP
        ...     try:
        ...         losses, out = pipeline.progress(data_iter)
        ...     except StopIteration:
        ...         break
    """

    _pipelined_forward_type = PrefetchPipelinedForward  # type: ignore[assignment]

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lookahead: int = 1,
        horizon: Optional[int] = None,
        execute_all_batches: bool = True,
        apply_jit: bool = False,
        custom_model_fwd: Optional[Callable[[Any], Tuple[torch.Tensor, Any]]] = None,
    ) -> None:
        horizon = lookahead if horizon is None else horizon
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}.")
        if horizon < lookahead or horizon > MAX_HORIZON:
            raise ValueError(
                f"horizon must be between lookahead ({lookahead}) and {MAX_HORIZON}, got {horizon}."
            )
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
        for kernel in self._kernels:
            kernel.engine.reset_window()
            kernel.engine.set_window(lookahead, horizon)
        self._started = False
        self._keys: Optional[List[str]] = None
        self._required = sorted(
            {f for m in model.modules() for c in getattr(m, "_embedding_bag_configs", []) for f in c.feature_names}
        )

    def _check_batch(self, batch: Any) -> None:
        """Refuse a batch whose sparse features do not match the model, before its input dist.

        TorchRec's input dist permutes features by the positions it saw in the first batch,
        so a batch with other or reordered keys would silently train the wrong tables.
        """
        kjt = getattr(batch, "sparse_features", None)
        if kjt is None:
            return
        keys = list(kjt.keys())
        if self._keys is None:
            missing = [f for f in self._required if f not in keys]
            if missing:
                raise ValueError(
                    f"batch features {keys} lack {missing}, which the model's embedding tables read: "
                    "give every batch a KeyedJaggedTensor with all the model's features."
                )
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(
                f"batch features {keys} differ from the first batch's {self._keys}: every batch must "
                "carry the same features in the same order."
            )

    @property
    def kernels(self) -> List[ScratchPipeEmbeddingBag]:
        """The ScratchPipe kernels this pipeline feeds."""
        return self._kernels

    def fill_pipeline(self, dataloader_iter: Iterator[Any]) -> None:
        """Bring H+1 batches in flight: copied, input-distributed and announced."""
        if not self.batches:
            if not self.enqueue_batch(dataloader_iter):
                if not self._started:
                    raise ValueError(
                        "ScratchPipeTrainPipeline got an empty data iterator: it yielded no batch."
                    )
                return
            self._check_or_drop_last()
            self._started = True
            self._init_pipelined_modules(
                self.batches[0], self.contexts[0], self._pipelined_forward_type  # type: ignore[arg-type]
            )
            self.wait_sparse_data_dist(self.contexts[0])
            self._announce(cast(PrefetchTrainPipelineContext, self.contexts[0]))
        while len(self.batches) < self.horizon + 1 and self._enqueue_and_announce(dataloader_iter):
            pass

    def _enqueue_and_announce(self, dataloader_iter: Iterator[Any]) -> bool:
        if not self._enqueue_checked(dataloader_iter):
            return False
        self._dist_and_announce()
        return True

    def _enqueue_checked(self, dataloader_iter: Iterator[Any]) -> bool:
        """Fetch the next batch and check its features; a bad batch leaves no trace."""
        if not self.enqueue_batch(dataloader_iter):
            return False
        self._check_or_drop_last()
        return True

    def _dist_and_announce(self) -> None:
        self.start_sparse_data_dist(self.batches[-1], self.contexts[-1])
        self.wait_sparse_data_dist(self.contexts[-1])
        self._announce(cast(PrefetchTrainPipelineContext, self.contexts[-1]))

    def _check_or_drop_last(self) -> None:
        try:
            self._check_batch(self.batches[-1])
        except ValueError:
            self.batches.pop()
            self.contexts.pop()
            raise

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        """Train one batch; raise StopIteration when none is left.

        Raises:
            ValueError: the next batch's features do not match the model (checked before
                this step changes anything), or the iterator was empty from the start.
        """
        if not self._model_attached:
            self.attach(self._model)
        self.fill_pipeline(dataloader_iter)
        if not self.batches:
            raise StopIteration
        fetched = self._enqueue_checked(dataloader_iter)
        self._set_module_context(self.contexts[0])
        if self._model.training:
            self._optimizer.zero_grad()
        wait_for_batch(self.batches[0], self._data_dist_stream)  # type: ignore[arg-type]
        losses, output = self._model_fwd(self.batches[0])
        if fetched:  # the next batch enters the window while this one trains: its rows move now
            self._dist_and_announce()
        if self._model.training:
            torch.sum(losses, dim=0).backward()
            self._optimizer.step()
        self.dequeue_batch()
        return output

    def _announce(self, context: PrefetchTrainPipelineContext) -> None:
        """Finish a batch's input dist and hand its ids to the ScratchPipe kernels.

        Each input-dist awaitable is waited on exactly once here; the result is kept in
        the context for ``PrefetchPipelinedForward`` (TorchRec's awaitable pitfall).
        """
        context.module_input_post_prefetch.clear()
        context.module_contexts_post_prefetch.clear()
        stream = self._data_dist_stream
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
            if getattr(module, "scratchpipe_kernels", None) and module.scratchpipe_kernels():  # type: ignore[operator]
                module.prefetch(dist_input=dist_input, ctx=module_ctx)  # type: ignore[operator]
            context.module_input_post_prefetch[name] = dist_input
            context.module_contexts_post_prefetch[name] = module_ctx

    def reset(self) -> None:
        """Drop every in-flight batch (TorchRec's reset) and empty the scratchpad windows."""
        super().reset()
        for kernel in self._kernels:
            kernel.engine.reset_window()
