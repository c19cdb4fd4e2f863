"""Train a small transformer next-item model whose item table lives on ScratchPipe.

The model (torchrec_scratchpipe/sequence_model.py) reads each user's history of item ids (unpooled: one embedding per id, from a
TorchRec ``EmbeddingCollection``), encodes it with one transformer layer, and scores the
next item against the other targets of the batch (in-batch softmax). The large ``item``
table trains on ScratchPipe (or ``fused`` for comparison); the small ``category``
table stays on ``fused`` in the same collection. Data are synthetic: users stick to a
topic, items within a topic are skewed.

One process on CPU::

    python examples/train_sequence.py --steps 100 --load-factor 0.1 --lookahead 2 --horizon 6
    python examples/train_sequence.py --kernel fused --steps 100      # same losses

Several processes: ``torchrun --nproc_per_node 2 examples/train_sequence.py --sharding-type row_wise``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import torchrec_scratchpipe.distributed as tsp  # before FBGEMM: compat mutes FBGEMM 1.6's import notice
from torchrec_scratchpipe import defaults, make_topology, quiet_known_noise
from torchrec_scratchpipe.cli import (
    HelpFormatter, fraction, non_negative_int, positive_float, positive_int, tool_window, user_errors,
)
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline
from torchrec_scratchpipe.sequence_model import NextItemModel, sequence_batches
from torchrec_scratchpipe.training import init_single_process_group
from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: E402  (after the package, see above)
from torchrec.datasets.utils import Batch  # noqa: E402
from torchrec.distributed import DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner.types import ParameterConstraints  # noqa: E402
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist  # noqa: E402
from torchrec.distributed.types import CacheParams, ShardingEnv  # noqa: E402
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper  # noqa: E402
from torchrec.optim.optimizers import in_backward_optimizer_filter  # noqa: E402


def synthetic_batches(args: argparse.Namespace, rank: int) -> List[Batch]:
    """Users stick to one of 64 topics; histories of 1..max_len items, target from the same topic."""
    return sequence_batches(args.steps, args.batch_size, args.items, args.categories, args.max_len, args.seed * 1000 + rank)


def build(args: argparse.Namespace) -> tuple:
    """(DMP model, pipeline) with ``item`` on ``args.kernel`` and ``category`` on fused."""
    pg = dist.GroupMember.WORLD
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    model = NextItemModel(args.items, args.categories, args.dim, args.max_len, device)
    items = ParameterConstraints(
        compute_kernels=[args.kernel], sharding_types=[args.sharding_type],
        cache_params=CacheParams(load_factor=args.load_factor) if args.kernel == tsp.SCRATCHPIPE else None,
        pooling_factors=[args.max_len / 2], batch_sizes=[args.batch_size],
    )
    # category: fused, table-wise (naming only the kernel leaves TorchRec to try data_parallel,
    # which has no fused kernel, and say so in a warning)
    category = ParameterConstraints(compute_kernels=["fused"], sharding_types=["table_wise"])
    constraints = {"item": items, "category": category}
    fused_params = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": args.learning_rate}
    sharders = tsp.get_sharders(ScratchPipeConfig(lookahead=args.lookahead, horizon=args.horizon), fused_params)
    planner = tsp.ShardingPlanner(
        topology=make_topology(world_size=dist.get_world_size(pg), compute_device="cpu"), constraints=constraints,
    )
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders, device=device)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=args.learning_rate / 10),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    if args.kernel == tsp.SCRATCHPIPE:
        return dmp, ScratchPipeTrainPipeline(dmp, optimizer, device, args.lookahead, args.horizon)
    return dmp, TrainPipelineSparseDist(dmp, optimizer, device)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train ``args.steps`` batches; return losses, seconds and the item table's cache stats."""
    if not dist.is_initialized():
        init_single_process_group()
    model, pipeline = build(args)
    batches = synthetic_batches(args, dist.get_rank())
    losses: List[float] = []
    it, t0 = iter(batches), time.perf_counter()
    while True:
        try:
            loss, _ = pipeline.progress(it)
        except StopIteration:
            break
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    stats = tsp.cache_stats(model).get("item", {}) if args.kernel == tsp.SCRATCHPIPE else {}
    return {"losses": losses, "seconds": seconds, "stats": stats, "model": model}


PROG = "examples/train_sequence.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--kernel", default=tsp.SCRATCHPIPE, choices=[tsp.SCRATCHPIPE, "fused"], help="kernel of the item table")
    p.add_argument("--sharding-type", default="table_wise", choices=["table_wise", "row_wise", "column_wise"],
                   help="sharding of the item table")
    p.add_argument("--load-factor", type=fraction, default=defaults.LOAD_FACTOR,
                   help="scratchpad rows as a fraction of the item table's rows")
    p.add_argument("--lookahead", type=non_negative_int, default=defaults.LOOKAHEAD, help="ScratchPipe L")
    p.add_argument("--horizon", type=non_negative_int, default=None,
                   help=f"ScratchPipe H (default {defaults.HORIZON}, at least L)")
    p.add_argument("--items", type=positive_int, default=64_000, help="rows of the item table")
    p.add_argument("--categories", type=positive_int, default=256, help="rows of the category table")
    p.add_argument("--dim", type=positive_int, default=32, help="embedding dim, a multiple of 4")
    p.add_argument("--max-len", type=positive_int, default=20, help="longest history")
    p.add_argument("--batch-size", type=positive_int, default=128, help="samples per rank and step")
    p.add_argument("--steps", type=positive_int, default=100, help="training steps")
    p.add_argument("--learning-rate", type=positive_float, default=0.05, help="learning rate")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data and weights")
    args = p.parse_args(argv)
    try:
        args.horizon = tool_window(args.lookahead, args.horizon)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    with user_errors(PROG), quiet_known_noise():
        res = run(args)
    if dist.get_rank() == 0:
        ls = res["losses"]
        k = max(1, len(ls) // 5)
        print(f"item table on {args.kernel}: loss first {k} steps {sum(ls[:k]) / k:.4f}, last {k} steps {sum(ls[-k:]) / k:.4f}; "
              f"{len(ls) / res['seconds']:.1f} steps/s")
        if res["stats"]:
            s = res["stats"]
            print(f"item scratchpad: {s['capacity']} slots, hit rate {s['hit_rate']:.3f}, "
                  f"train misses {s['train_misses']}, evictions {s['evictions']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
