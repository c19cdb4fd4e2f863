"""Configuration of a ScratchPipe engine and the optimizers it supports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_scratchpipe.core.policy import VictimPolicy

#: Optimizers whose per-row update FBGEMM's TBE runs on each device type, with the names
#: of their per-row state tensors (in ``split_optimizer_states()`` order).
OPTIMIZER_STATE_NAMES: Dict[EmbOptimType, List[str]] = {
    EmbOptimType.EXACT_SGD: [],
    EmbOptimType.EXACT_ADAGRAD: ["momentum1"],
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: ["momentum1"],
    EmbOptimType.ADAM: ["exp_avg", "exp_avg_sq"],
}
#: Command-line names of the exact optimizers (A/B tool, example trainer).
OPTIMIZERS_BY_NAME: Dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}
CPU_OPTIMIZERS: Tuple[EmbOptimType, ...] = (
    EmbOptimType.EXACT_SGD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
)
CUDA_OPTIMIZERS: Tuple[EmbOptimType, ...] = CPU_OPTIMIZERS + (EmbOptimType.ADAM,)


def state_shapes(optimizer: EmbOptimType, dim: int) -> Dict[str, Tuple[int, ...]]:
    """Per-row shape of each optimizer state: ``()`` for row-wise Adagrad, ``(dim,)`` otherwise."""
    row_wise = optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    return {name: (() if row_wise else (dim,)) for name in OPTIMIZER_STATE_NAMES[optimizer]}


def row_bytes(optimizer: EmbOptimType, dim: int) -> int:
    """FP32 bytes one row moves: its weights and optimizer state."""
    return 4 * (dim + sum(math.prod(shape) for shape in state_shapes(optimizer, dim).values()))


def supported_optimizers(device: torch.device) -> Tuple[EmbOptimType, ...]:
    """Optimizers the scratchpad can train with on ``device``."""
    return CUDA_OPTIMIZERS if device.type == "cuda" else CPU_OPTIMIZERS


def check_optimizer(optimizer: EmbOptimType, device: torch.device) -> None:
    """Raise a ValueError naming the alternatives when ``optimizer`` cannot run on ``device``."""
    allowed = supported_optimizers(device)
    if optimizer not in allowed:
        names = ", ".join(o.name for o in allowed)
        raise ValueError(
            f"ScratchPipe cannot train with optimizer {optimizer.name} on a {device.type} "
            f"device: FBGEMM's TBE supports only {names} there. Pick one of those"
            + (" (Adam needs CUDA)." if optimizer == EmbOptimType.ADAM else ".")
        )


#: Ids per batch (in one table group) from which a CPU engine plans in the background by
#: default. Measured on 2 cores (docs/benchmarks.md): 106k ids gain 1-9% per step, 26k
#: and 53k ids neither gain nor lose, a 16k-id DLRM step loses 10-20%.
BACKGROUND_MIN_IDS = 65536


@dataclass
class ScratchPipeConfig:
    """Settings of one ScratchPipe engine.

    Args:
        cache_rows: scratchpad slots per table group (tables sharing dim and pooling).
            When None, ``load_factor`` sizes it.
        load_factor: slots as a fraction of the group's rows (the knob TorchRec's
            ``CacheParams.load_factor`` gives ``fused_uvm_caching``). Default 0.2.
        lookahead: L, batches planned and moved in ahead of the training batch.
        horizon: H >= L, batches ahead of the training batch whose ids the victim policy
            may look at (ids only; nothing moves for them). Defaults to ``lookahead``.
        optimizer: fused optimizer applied in backward inside the scratchpad.
        learning_rate, eps, weight_decay, beta1, beta2: optimizer hyper-parameters,
            passed to FBGEMM's TBE.
        victim_policy: a ``VictimPolicy`` (``core/policy.py``) or its name: ``"future"``
            (farthest next use within the horizon, ties by least recent use) or ``"lru"``
            (least recent use only). Stored as the enum.
        background_planning: plan and move the batches behind the training batch in a
            background thread while it trains (True), or on the training thread (False).
            None (default): in the background only on a CPU scratchpad and for batches of
            at least ``BACKGROUND_MIN_IDS`` ids in a table group. There, planning costs a
            large share of the step, and FBGEMM's CPU TBE keeps only about 1.4 of 2 cores busy;
            for smaller batches the second thread's contention costs more than it hides.
            On CUDA the host already plans while the device trains, and True is refused.

    Example::

        >>> cfg = ScratchPipeConfig(cache_rows=1024, lookahead=2, horizon=8)
        >>> cfg.slots_for(100_000)
        1024
    """

    cache_rows: Optional[int] = None
    load_factor: Optional[float] = None
    lookahead: int = 0
    horizon: Optional[int] = None
    optimizer: EmbOptimType = EmbOptimType.EXACT_ROWWISE_ADAGRAD
    learning_rate: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    victim_policy: VictimPolicy = VictimPolicy.FUTURE
    background_planning: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.cache_rows is not None and self.cache_rows <= 0:
            raise ValueError(f"cache_rows must be positive, got {self.cache_rows}.")
        if self.load_factor is not None and not 0.0 < self.load_factor:
            raise ValueError(
                f"load_factor must be > 0 (a fraction of the table's rows), got {self.load_factor}."
            )
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}.")
        if self.horizon is not None and self.horizon < self.lookahead:
            raise ValueError(
                f"horizon ({self.horizon}) must be >= lookahead ({self.lookahead}): the "
                "planner must at least see the batches it moves rows in for."
            )
        object.__setattr__(self, "victim_policy", VictimPolicy.parse(self.victim_policy, "victim_policy"))
        if not isinstance(self.optimizer, EmbOptimType):
            raise ValueError(f"optimizer must be an fbgemm EmbOptimType, got {self.optimizer!r}.")

    @property
    def effective_horizon(self) -> int:
        """H, defaulting to L."""
        return self.lookahead if self.horizon is None else self.horizon

    def plans_in_background(self, device: torch.device, ids: int) -> bool:
        """Whether an engine on ``device`` plans a batch with ``ids`` ids (largest group) in the background."""
        if self.background_planning is None:
            return device.type == "cpu" and ids >= BACKGROUND_MIN_IDS
        return self.background_planning

    def slots_for(self, num_rows: int) -> int:
        """Scratchpad slots for a group of ``num_rows`` rows (never more than the rows)."""
        if self.cache_rows is not None:
            return min(self.cache_rows, num_rows)
        factor = 0.2 if self.load_factor is None else self.load_factor
        return max(1, min(num_rows, math.ceil(factor * num_rows)))

    def optimizer_kwargs(self) -> Dict[str, float]:
        """Keyword arguments for FBGEMM's TBE constructor."""
        return {
            "learning_rate": self.learning_rate,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "beta1": self.beta1,
            "beta2": self.beta2,
        }
