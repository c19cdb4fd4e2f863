"""Configuration of a ScratchPipe engine."""

from __future__ import annotations


from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

from torchrec_scratchpipe.core.capacity import check_load_factor, resolve_load_factor, slots_for_rows
from torchrec_scratchpipe.core.layout import TBE_DEFAULT_OPTIMIZER
from torchrec_scratchpipe.core.policy import VictimPolicy
from torchrec_scratchpipe.core.planner_api import check_planner
from torchrec_scratchpipe.core.store_api import StoreSpec
from torchrec_scratchpipe.defaults import LIBRARY_LOOKAHEAD, check_window


#: Ids per batch (in one table group) from which a CPU engine plans in the background by
#: default. Measured on 2 cores (docs/benchmarks.md): 106k ids gain 1-9% per step, 26k
#: and 53k ids neither gain nor lose, a 16k-id DLRM step loses 10-20%.
BACKGROUND_MIN_IDS = 65536

#: FBGEMM TBE constructor arguments a ScratchPipe scratchpad takes as they are (besides
#: the optimizer and the hyper-parameters that are fields below), with the values it
#: accepts (None: any). They change the update, not what a row holds, so the scratchpad's
#: TBE applies them exactly as ``fused``'s does.
TBE_OPTIONS: Dict[str, Optional[Tuple[Any, ...]]] = {
    "gradient_clipping": None,
    "max_gradient": None,
    "max_norm": None,
    "momentum": None,
    "weight_decay_mode": (WeightDecayMode.NONE, WeightDecayMode.L2, WeightDecayMode.DECOUPLE),
    "bounds_check_mode": None,
}


def check_tbe_options(options: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the first option ScratchPipe's scratchpad cannot honour.

    Example::

        >>> check_tbe_options({"gradient_clipping": True, "max_gradient": 0.5})
        >>> check_tbe_options({"cache_sets": 8})
        Traceback (most recent call last):
        ...
        ValueError: ScratchPipe does not support the TBE option 'cache_sets'; it honours gradient_clipping, max_gradient, max_norm, momentum, weight_decay_mode, bounds_check_mode (and the optimizer and its hyper-parameters).
    """
    for name, value in options.items():
        if name not in TBE_OPTIONS:
            raise ValueError(
                f"ScratchPipe does not support the TBE option {name!r}; it honours "
                f"{', '.join(TBE_OPTIONS)} (and the optimizer and its hyper-parameters)."
            )
        accepted = TBE_OPTIONS[name]
        if accepted is not None and value not in accepted:
            raise ValueError(
                f"ScratchPipe does not support {name}={value!r}: it accepts {[str(a) for a in accepted]} "
                "(COUNTER and COWCLIP keep per-row state ScratchPipe's rows do not hold)."
            )


@dataclass(frozen=True)
class ScratchPipeConfig:
    """Settings of one ScratchPipe engine (frozen: use ``dataclasses.replace`` for a variant).

    Args:
        cache_rows: scratchpad slots per table group (tables sharing dim and pooling).
            When None, ``load_factor`` sizes it.
        load_factor: slots as a fraction of the group's rows (the knob TorchRec's
            ``CacheParams.load_factor`` gives ``fused_uvm_caching``). None:
            ``defaults.LIBRARY_LOAD_FACTOR`` (0.2, TorchRec's UVM default).
        lookahead: L, batches planned and moved in ahead of the training batch
            (``defaults.LIBRARY_LOOKAHEAD``: 1).
        horizon: H >= L, batches ahead of the training batch whose ids the victim policy
            may look at (ids only; nothing moves for them). Defaults to ``lookahead``.
            ``defaults.check_window`` validates the pair.
        optimizer: fused optimizer applied in backward inside the scratchpad. Default:
            FBGEMM TBE's own (``layout.TBE_DEFAULT_OPTIMIZER``, exact SGD), what ``fused``
            trains with when TorchRec passes none, so a config given to ``get_sharders``
            does not change the fallback.
        learning_rate, eps, weight_decay, beta1, beta2: optimizer hyper-parameters,
            passed to FBGEMM's TBE.
        stochastic_rounding: round FP16 weight updates stochastically (FBGEMM TBE's
            ``stochastic_rounding``, default True as there); False rounds to nearest, so
            training matches ``fused`` FP16 with the same setting. FP32 tables ignore it.
        tbe_options: further FBGEMM TBE constructor arguments as sorted ``(name, value)``
            pairs (a mapping is accepted and sorted), from ``TBE_OPTIONS``: gradient
            clipping, ``max_norm``, the L2 / decoupled weight-decay modes, ... (TorchRec's
            fused params of the table). Anything else is refused by name.
        victim_policy: a ``VictimPolicy`` (``core/policy.py``) or its name: ``"future"``
            (farthest next use within the horizon, ties by least recent use) or ``"lru"``
            (least recent use only). Stored as the enum.
        background_planning: plan and move the batches behind the training batch in a
            background thread while it trains (True), or on the training thread (False).
            None (default): in the background only on a CPU scratchpad and for batches of
            at least ``BACKGROUND_MIN_IDS`` ids in a table group. There, planning costs a
            large share of the step, and FBGEMM's CPU TBE keeps only about 1.4 of 2 cores busy;
            for smaller batches the second thread's contention costs more than it hides.
            On CUDA the host planners (``planner="native"`` or ``"torch"``) plan next to
            the device's training anyway; True there overlaps their host work too.
        planner: which slot planner a table group uses (``core/planner_api.py``):
            ``"native"`` (the C++ operator, host maps), ``"torch"`` (the PyTorch
            reference, host maps) or ``"device"`` (maps and plans on the scratchpad's
            device, static shapes). None: ``SCRATCHPIPE_PLANNER``, else ``"native"`` on
            CPU when built (``"torch"`` otherwise) and ``"device"`` on CUDA.
        store: where each table group keeps its full tables (``StoreSpec``): None or
            ``kind="host"`` in host memory; ``kind="file"`` in a file in ``directory``
            behind a host cache of ``host_cache_bytes`` per table (``core/file_store.py``).

    Example::

        >>> cfg = ScratchPipeConfig(cache_rows=1024, lookahead=2, horizon=8)
        >>> cfg.slots_for(100_000)
        1024
    """

    cache_rows: Optional[int] = None
    load_factor: Optional[float] = None
    lookahead: int = LIBRARY_LOOKAHEAD
    horizon: Optional[int] = None
    optimizer: EmbOptimType = TBE_DEFAULT_OPTIMIZER
    learning_rate: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    stochastic_rounding: bool = True
    tbe_options: Tuple[Tuple[str, Any], ...] = ()
    victim_policy: VictimPolicy = VictimPolicy.FUTURE
    background_planning: Optional[bool] = None
    store: Optional[StoreSpec] = None
    planner: Optional[str] = None

    def __post_init__(self) -> None:
        # Validation only. A field normalized here (e.g. a string turned into an enum) must be
        # set with object.__setattr__(self, name, value): the dataclass is frozen.
        if self.cache_rows is not None and self.cache_rows <= 0:
            raise ValueError(f"cache_rows must be positive, got {self.cache_rows}.")
        if self.load_factor is not None:
            object.__setattr__(self, "load_factor", check_load_factor(self.load_factor))
        check_window(self.lookahead, self.horizon)
        options = dict(self.tbe_options)
        check_tbe_options(options)
        object.__setattr__(self, "tbe_options", tuple(sorted(options.items())))
        object.__setattr__(self, "victim_policy", VictimPolicy.parse(self.victim_policy, "victim_policy"))
        if self.planner is not None:
            check_planner(self.planner, "ScratchPipeConfig.planner")
        if not isinstance(self.optimizer, EmbOptimType):
            raise ValueError(f"optimizer must be an fbgemm EmbOptimType, got {self.optimizer!r}.")
        if self.store is not None and not isinstance(self.store, StoreSpec):
            raise ValueError(f"store must be a StoreSpec (or None for host memory), got {self.store!r}.")

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
        return slots_for_rows(num_rows, resolve_load_factor(self.load_factor))

    def tbe_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for FBGEMM's TBE constructor: the optimizer, its
        hyper-parameters and ``tbe_options``."""
        return {
            "optimizer": self.optimizer,
            **dict(self.tbe_options),
            "learning_rate": self.learning_rate,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "stochastic_rounding": self.stochastic_rounding,
        }
