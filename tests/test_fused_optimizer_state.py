"""TorchRec-level state reads that a checkpoint routine makes, against the real ``fused`` kernel.

One process, a gloo group of one rank (no spawn): a DMP model with ScratchPipe tables of
three dims beside the same model on TorchRec's ``fused`` kernel, trained alike.

- ``fused_optimizer.state_dict()`` read first and alone (no ``model.state_dict()``, which
  flushes, before it) must equal ``fused``'s bit for bit: reading the optimizer's state
  writes the resident rows back first.
- A state dict of new values loaded into the live model (batches trained, rows resident in
  every group) must reach every group's resident slots, then train on like ``fused``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import torch

from dist_utils import build_dmp, constraints_for, load_full, local_tensors, make_batch, make_tables
from one_rank import one_rank  # noqa: F401  (fixture)

SP_LOAD_FACTORS = {"t_big": 0.03, "t_mid": 0.06, "t_odd": 0.04}  # 60, 60 and 60 slots: constant eviction
STEPS = 12


def _pair() -> Tuple[Any, Any, list]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    import torchrec_scratchpipe.distributed as tsp

    tables = make_tables()
    fp = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    sp = build_dmp(ebc, constraints_for(tables, "table_wise", SP_LOAD_FACTORS), tsp.get_sharders(fused_params=fp), 1)
    ref = build_dmp(ebc, constraints_for(tables, "table_wise", {}), [EmbeddingBagCollectionSharder(fused_params=fp)], 1,
                    plan_sharders=tsp.get_sharders(fused_params=fp))
    g = torch.Generator().manual_seed(0)
    full = {k: torch.rand(tuple(st.size()), generator=g) - 0.5 for k, st in ref.state_dict().items()}
    load_full(sp, full)
    load_full(ref, full)
    return sp, ref, tables


def _train(models: Tuple[Any, ...], tables: list, steps: range) -> None:
    for s in steps:
        kjt = make_batch(s, 0, tables, batch_size=16, max_len=3)
        outs = []
        for m in models:
            out = m(kjt)
            values = (out.wait() if hasattr(out, "wait") else out).values()
            values.pow(2).sum().backward()
            outs.append(values.detach())
        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"step {s}"


def _assert_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a, (what, sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k}: max diff {(a[k] - b[k]).abs().max().item()}"


def _dirty_groups(sp: Any) -> int:
    """Groups whose resident slots hold values the store has not seen (what a flush writes)."""
    import torchrec_scratchpipe.distributed as tsp

    n = 0
    for kernel in tsp.scratchpipe_kernels(sp):
        for g in kernel.engine.groups.values():
            rows, slots = g.resident()
            n += not torch.equal(g.pad.weights.detach()[slots], g.store.weights[rows])
    return n


def test_optimizer_state_dict_read_first_and_alone_equals_fused(one_rank: None) -> None:
    sp, ref, tables = _pair()
    _train((sp, ref), tables, range(STEPS))
    assert _dirty_groups(sp) == 3  # every group has updates only its slots hold
    got = local_tensors(sp.fused_optimizer.state_dict(), "o/")  # first, and alone
    _assert_equal(got, local_tensors(ref.fused_optimizer.state_dict(), "o/"), "optimizer state")
    assert _dirty_groups(sp) == 0


def _load_new(model: Any, new: Dict[str, torch.Tensor], optimizer: bool) -> None:
    """Load ``new`` (local tensors by ``local_tensors`` key) through the model's or its
    fused optimizer's state dict, as a checkpoint restore does (a copy, not the live views)."""
    owner = model.fused_optimizer if optimizer else model
    sd = copy.deepcopy(owner.state_dict())
    _copy_into(sd, new)
    owner.load_state_dict(sd)


def _copy_into(state: Any, new: Dict[str, torch.Tensor], prefix: str = "") -> None:
    if isinstance(state, dict):
        for k, v in state.items():
            _copy_into(v, new, f"{prefix}{k}/")
    elif hasattr(state, "local_shards"):
        for i, sh in enumerate(state.local_shards()):
            sh.tensor.copy_(new[f"{prefix}{i}"])


def test_live_state_dict_load_refreshes_every_group(one_rank: None) -> None:
    """TorchRec puts each dim in a kernel of its own: this load must reach all three kernels
    (``test_live_load`` covers several groups inside one engine)."""
    import torchrec_scratchpipe.distributed as tsp

    sp, ref, tables = _pair()
    _train((sp, ref), tables, range(STEPS))
    g = torch.Generator().manual_seed(7)
    weights = {k: torch.rand(v.shape, generator=g) - 0.5 for k, v in local_tensors(ref.state_dict()).items()}
    states = {k: torch.rand(v.shape, generator=g) + 0.5 for k, v in local_tensors(ref.fused_optimizer.state_dict()).items()}
    groups = [g for k in tsp.scratchpipe_kernels(sp) for g in k.engine.groups.values()]
    assert len(groups) == 3
    for optimizer, values in ((False, weights), (True, states)):  # each load refreshes on its own
        for model in (sp, ref):
            _load_new(model, values, optimizer)
        for grp in groups:
            rows, slots = grp.resident()
            assert rows.numel() > 0, grp.name
            pairs = grp.pad.states.items() if optimizer else [("weights", grp.pad.weights)]
            for name, tensor in pairs:
                src = grp.store.states[name] if optimizer else grp.store.weights
                assert torch.equal(tensor.detach()[slots], src[rows]), f"group {grp.name}: stale {name} after the load"
    _assert_equal(local_tensors(sp.state_dict()), weights, "loaded weights")
    _assert_equal(local_tensors(sp.fused_optimizer.state_dict()), states, "loaded optimizer state")
    _train((sp, ref), tables, range(STEPS, STEPS + 4))
    _assert_equal(local_tensors(sp.state_dict()), local_tensors(ref.state_dict()), "weights")
    _assert_equal(local_tensors(sp.fused_optimizer.state_dict()), local_tensors(ref.fused_optimizer.state_dict()), "optimizer state")
