"""Assemble a trainable model under a kernel choice: model, plan, DMP, optimizer, pipeline.

The model is a DLRM (:class:`ModelSpec`) or the sequence model of
``torchrec_scratchpipe.sequence_model`` (``SequenceSpec``, an ``EmbeddingCollection``).

The A/B tool and ``examples/train_dlrm.py`` both use this, so every arm of a comparison
is built the same way and differs only in its sharding plan: the user-facing promise
"change the plan, not the model".
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.types import CacheParams
from torchrec.distributed.train_pipeline import PrefetchTrainPipelineSparseDist, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.core.capacity import check_load_factor
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.store_api import StoreSpec
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME
from torchrec_scratchpipe.distributed import SCRATCHPIPE, ShardingPlanner, get_sharders
from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline
from torchrec_scratchpipe.distributed.plan_stats import format_scratchpipe_plan
from torchrec_scratchpipe.quiet import make_topology, quiet_known_noise

if TYPE_CHECKING:
    from torchrec_scratchpipe.sequence_model import SequenceSpec

KERNELS = ("fused", "fused_uvm_caching", SCRATCHPIPE)


@dataclass
class KernelChoice:
    """Which kernel the big tables use, and its knobs.

    Args:
        kernel: ``"fused"``, ``"fused_uvm_caching"`` or ``"scratchpipe"``.
        load_factor: device cache size as a fraction of a shard's rows (UVM and ScratchPipe).
        lookahead, horizon: ScratchPipe's L and H.
        tables: names of the tables that get ``kernel``; None means all. The others stay ``fused``.
        overrides: per-table kernel that wins over ``kernel`` (e.g. ``{"small": "fused"}``).
        sharding_type: ``"table_wise"`` or ``"row_wise"``.
        victim_policy: ScratchPipe victim policy.
        background_planning: ScratchPipe's ``ScratchPipeConfig.background_planning``
            (None: automatic).
        store: ScratchPipe's backing store (``StoreSpec``; None: host memory).
    """

    kernel: str = SCRATCHPIPE
    load_factor: float = defaults.LOAD_FACTOR
    lookahead: int = defaults.LOOKAHEAD
    horizon: Optional[int] = None
    tables: Optional[List[str]] = None
    overrides: Dict[str, str] = field(default_factory=dict)
    sharding_type: str = "table_wise"
    victim_policy: str = "future"
    background_planning: Optional[bool] = None
    store: Optional[StoreSpec] = None

    def __post_init__(self) -> None:
        for k in [self.kernel, *self.overrides.values()]:
            if k not in KERNELS:
                raise ValueError(f"kernel must be one of {KERNELS}, got {k!r}.")
        check_load_factor(self.load_factor, "load_factor")
        defaults.check_window(self.lookahead, self.horizon)

    @property
    def label(self) -> str:
        if self.kernel == SCRATCHPIPE:
            h = self.horizon if self.horizon is not None else self.lookahead
            return f"scratchpipe L={self.lookahead} H={h}"
        return self.kernel


@dataclass
class ModelSpec:
    """The DLRM to train.

    Args:
        tables: embedding tables (all of one dim: DLRM's interaction needs it).
        dense_in_features: dense inputs per sample.
        dense_arch: bottom MLP sizes (the last must equal the embedding dim).
        over_arch: top MLP sizes (the last must be 1).
        optimizer: fused optimizer for the embeddings.
        learning_rate: for the embeddings and the dense SGD.
        batch_size, pooling: expected per-rank batch size and ids per bag; the planner
            sizes and checks caches with them.
    """

    tables: List[EmbeddingBagConfig]
    dense_in_features: int = 13
    dense_arch: List[int] = field(default_factory=lambda: [64])
    over_arch: List[int] = field(default_factory=lambda: [64, 1])
    optimizer: EmbOptimType = OPTIMIZERS_BY_NAME[defaults.OPTIMIZER]
    learning_rate: float = defaults.LEARNING_RATE
    batch_size: int = defaults.BATCH_SIZE
    pooling: float = float(defaults.POOLING)

    def build(self, device: torch.device) -> DLRMTrain:
        """The unsharded model (tables on ``device``, e.g. ``meta`` before sharding)."""
        dim = self.tables[0].embedding_dim
        if any(t.embedding_dim != dim for t in self.tables):
            raise ValueError("DLRM needs every table to have the same embedding_dim.")
        ebc = EmbeddingBagCollection(tables=self.tables, device=device)
        return DLRMTrain(
            DLRM(
                embedding_bag_collection=ebc,
                dense_in_features=self.dense_in_features,
                dense_arch_layer_sizes=list(self.dense_arch) + [dim],
                over_arch_layer_sizes=list(self.over_arch),
            )
        )

    def initial_state(self, seed: int) -> Dict[str, torch.Tensor]:
        """A fixed starting point: every arm loads the same weights."""
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in self.build(torch.device("cpu")).state_dict().items()}


def default_backend() -> str:
    """The process-group backend of the tools: gloo for CPU tensors, and NCCL for CUDA
    tensors where CUDA and NCCL are available (what TorchRec trains with on GPUs)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_single_process_group() -> dist.ProcessGroup:
    """A world-size-1 group on 127.0.0.1 (``default_backend()``; no-op when one exists)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group(default_backend(), rank=0, world_size=1)
    return dist.GroupMember.WORLD  # type: ignore[return-value]


@dataclass
class Trainer:
    """What ``build_trainer`` returns."""

    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    pipeline: Any
    plan: ShardingPlan
    choice: KernelChoice
    scratchpads: List[Dict[str, Any]] = field(default_factory=list)

    def plan_text(self) -> str:
        """TorchRec's plan, then each ScratchPipe shard's device and host bytes."""
        text = str(self.plan)
        return text + ("\n" + format_scratchpipe_plan(self.scratchpads) if self.scratchpads else "")


#: What ``build_trainer`` takes: anything with ``tables``, ``optimizer``, ``learning_rate``,
#: ``batch_size``, ``pooling``, ``build(device)`` and ``initial_state(seed)``.
AnySpec = Union[ModelSpec, "SequenceSpec"]


def constraints_for(spec: AnySpec, choice: KernelChoice) -> Dict[str, ParameterConstraints]:
    """Per-table constraints that put ``choice.kernel`` on the chosen tables."""
    chosen = set(choice.tables) if choice.tables is not None else {t.name for t in spec.tables}
    unknown = (chosen | set(choice.overrides)) - {t.name for t in spec.tables}
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; the model has {[t.name for t in spec.tables]}.")
    out = {}
    for t in spec.tables:
        kernel = choice.overrides.get(t.name, choice.kernel if t.name in chosen else "fused")
        cache = CacheParams(load_factor=choice.load_factor) if kernel != "fused" else None
        out[t.name] = ParameterConstraints(
            compute_kernels=[kernel],
            sharding_types=[choice.sharding_type],
            cache_params=cache,
            batch_sizes=[spec.batch_size],
            pooling_factors=[spec.pooling],
        )
    return out


def build_trainer(
    spec: AnySpec,
    choice: KernelChoice,
    device: torch.device,
    initial_state: Optional[Dict[str, torch.Tensor]] = None,
    pg: Optional[dist.ProcessGroup] = None,
) -> Trainer:
    """Shard ``spec`` under ``choice`` and wrap it in the matching train pipeline.

    Args:
        spec: the model (``ModelSpec`` or ``SequenceSpec``).
        choice: the kernel for the chosen tables.
        device: training device.
        initial_state: a state dict to start from (see ``ModelSpec.initial_state``).
        pg: process group (default: the world group).

    Example::

        >>> pg = init_single_process_group()  # doctest: +SKIP
        >>> t = build_trainer(spec, KernelChoice("scratchpipe", 0.05, lookahead=2), torch.device("cpu"))  # doctest: +SKIP
        >>> loss, logits, labels = t.pipeline.progress(iter(batches))  # DLRMTrain's output  # doctest: +SKIP
    """
    pg = pg or dist.GroupMember.WORLD
    wanted = {choice.kernel, *choice.overrides.values()}
    if "fused_uvm_caching" in wanted and device.type != "cuda":
        raise ValueError(
            "fused_uvm_caching needs CUDA (FBGEMM's UVM cache); on this device use fused or "
            "scratchpipe, or compare against it with `python -m torchrec_scratchpipe.ab`, which "
            "simulates it."
        )
    world = dist.get_world_size(pg)
    fused_params: Dict[str, Any] = {"optimizer": spec.optimizer, "learning_rate": spec.learning_rate}
    if "fused_uvm_caching" in [choice.kernel, *choice.overrides.values()]:
        fused_params["prefetch_pipeline"] = True
        fused_params["gather_uvm_cache_stats"] = True
    sp_config = ScratchPipeConfig(
        lookahead=choice.lookahead, horizon=choice.horizon, victim_policy=choice.victim_policy,
        background_planning=choice.background_planning, store=choice.store,
    )
    sharders = get_sharders(sp_config, fused_params=fused_params)
    planner = ShardingPlanner(
        topology=make_topology(world, device.type),
        constraints=constraints_for(spec, choice),
    )
    model = spec.build(torch.device("meta"))
    plan = planner.collective_plan(model, sharders, pg)
    with quiet_known_noise():
        dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders, device=device
        )
    if initial_state is not None:
        dmp.load_state_dict(dict(initial_state), strict=False)  # DMP pops keys: pass a copy
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=spec.learning_rate),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    kernels = {c.compute_kernels[0] for c in constraints_for(spec, choice).values()}  # type: ignore[index]
    if SCRATCHPIPE in kernels:
        pipeline: Any = ScratchPipeTrainPipeline(dmp, optimizer, device, choice.lookahead, choice.horizon)
    elif "fused_uvm_caching" in kernels and device.type == "cuda":
        pipeline = PrefetchTrainPipelineSparseDist(dmp, optimizer, device)
    else:
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    return Trainer(dmp, optimizer, pipeline, plan, choice, planner.scratchpipe_summary)


def local_table_weights(model: torch.nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """This rank's shard of each table's weight (bag or sequence table), from the model's state dict."""
    out = {}
    for key, value in model.state_dict().items():
        for name in names:
            if key.endswith((f"embedding_bags.{name}.weight", f"embeddings.{name}.weight")):
                shards = value.local_shards() if hasattr(value, "local_shards") else None
                out[name] = shards[0].tensor.detach().clone() if shards else value.detach().clone()
    return out
