"""Helpers for the distributed tests: spawn a gloo group, build models and batches."""

from __future__ import annotations

import copy
import os
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
        dist.barrier()
    except BaseException:  # report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    Returns the per-rank results; raises with the failing ranks' tracebacks.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: List[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------- model and data
def make_tables() -> List[Any]:
    """Four tables of different sizes and dims (one of them meant for ``fused``)."""
    from torchrec import EmbeddingBagConfig

    spec = [("t_big", 2000, 16), ("t_mid", 1000, 8), ("t_small", 100, 8), ("t_odd", 1500, 12)]
    return [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=[f"f_{n[2:]}"]) for n, r, d in spec]


def make_batch(step: int, rank: int, tables: List[Any], batch_size: int = 8, max_len: int = 2) -> Any:
    """A deterministic batch for ``rank`` at ``step`` (ids skewed towards low rows)."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    keys = [t.feature_names[0] for t in tables]
    lengths = torch.randint(0, max_len + 1, (len(tables) * batch_size,), generator=g)
    values = []
    for i, t in enumerate(tables):
        n = int(lengths[i * batch_size : (i + 1) * batch_size].sum())
        u = torch.rand(n, generator=g)
        values.append((u * u * t.num_embeddings).long().clamp_(max=t.num_embeddings - 1))
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), lengths)


def constraints_for(tables: List[Any], sharding: str, scratchpipe: Dict[str, float], **extra: Any) -> Dict[str, Any]:
    """Constraints: tables in ``scratchpipe`` (name -> load factor) on ScratchPipe, the rest fused."""
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import CacheParams

    from torchrec_scratchpipe.distributed import SCRATCHPIPE

    out = {}
    for t in tables:
        sp = t.name in scratchpipe
        out[t.name] = ParameterConstraints(
            compute_kernels=[SCRATCHPIPE] if sp else ["fused"],
            sharding_types=[sharding],
            cache_params=CacheParams(load_factor=scratchpipe[t.name]) if sp else None,
            **extra,
        )
    return out


def build_dmp(
    ebc: torch.nn.Module,
    constraints: Dict[str, Any],
    sharders: List[Any],
    world_size: int,
    plan_sharders: Optional[List[Any]] = None,
    copy_module: bool = True,
) -> Any:
    """Plan with ``tsp.ShardingPlanner`` and wrap (a copy of) ``ebc`` in DMP with ``sharders``.

    Pass ``copy_module=False`` for modules set up with ``apply_optimizer_in_backward``
    (a deep copy drops the optimizer attributes TorchRec reads from the parameters).
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.types import ShardingEnv

    import torchrec_scratchpipe.distributed as tsp

    pg = dist.GroupMember.WORLD
    planner = tsp.ShardingPlanner(
        topology=Topology(world_size=world_size, compute_device="cpu"), constraints=constraints, batch_size=8, debug=False
    )
    plan = planner.collective_plan(ebc, plan_sharders or sharders, pg)
    return DistributedModelParallel(
        copy.deepcopy(ebc) if copy_module else ebc, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders, device=torch.device("cpu")
    )


def load_full(model: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a DMP model (through its ShardedTensor state dict)."""
    sd = model.state_dict()
    for key, st in sd.items():
        for shard in st.local_shards():
            o, s = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[key][o[0] : o[0] + s[0], o[1] : o[1] + s[1]])
    model.load_state_dict(sd)


def local_tensors(state: Any, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Flatten a (nested) state dict of ShardedTensors into local-shard tensors."""
    out: Dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(local_tensors(v, f"{prefix}{k}/"))
    elif hasattr(state, "local_shards"):
        for i, sh in enumerate(state.local_shards()):
            out[f"{prefix}{i}"] = sh.tensor.detach().clone()
    elif isinstance(state, torch.Tensor):
        out[prefix] = state.detach().clone()
    return out


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max([(a[k] - b[k]).abs().max().item() for k in a if a[k].numel()] or [0.0])
