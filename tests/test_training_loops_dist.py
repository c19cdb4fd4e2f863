"""ScratchPipe under DMP in the loops TorchRec users write, against the same model on `fused`.

Rollback and resume with live checkpoint loads (in place through ``dcp.load``, and with
fresh tensors; checkpoints saved under either kernel) while the pipeline has batches in
flight, bad batches in the pipeline, and evaluation in the middle of training. The live
loads and the evaluation run on a DLRM (bag tables) and on the sequence model of
``torchrec_scratchpipe.sequence_model`` (an ``EmbeddingCollection``, item table on ScratchPipe).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from dist_utils import local_tensors, max_diff, spawn

ROWS = [2000, 250, 90]
TOL = 0.0  # bit for bit with fused (max |diff| == 0)


def _spec(model: str = "dlrm"):
    from torchrec_scratchpipe.sequence_model import SequenceSpec
    from torchrec_scratchpipe.training import ModelSpec

    if model == "sequence":
        return SequenceSpec(items=ROWS[0], categories=16, dim=8, max_len=5, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                            learning_rate=0.1, batch_size=16)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"]) for i, n in enumerate(ROWS)]
    return ModelSpec(tables, dense_arch=[16], over_arch=[16, 1], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                     learning_rate=0.1, batch_size=16, pooling=2.0)


def _batches(rank: int, n: int, seed: int = 0, model: str = "dlrm") -> List[Any]:
    from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig

    if model == "sequence":
        return _spec(model).batches(n, seed, rank)
    log = SyntheticClickLog(SyntheticConfig(num_embeddings=ROWS, batch_size=16, pooling=2, min_pooling=0, seed=seed + rank))
    return [log.batch(i) for i in range(n)]


def _trainers(world_size: int, sharding: str = "table_wise", lookahead: int = 2, horizon: int = 3,
              model: str = "dlrm", store_dir: Optional[str] = None) -> Tuple[Any, Any]:
    """(fused, ScratchPipe) trainers from the same weights; the sequence model's small
    category table stays on fused in both. ``store_dir``: ScratchPipe's tables in files
    there, behind a host cache of 64 rows per table."""
    from torchrec_scratchpipe.core.store_api import StoreSpec
    from torchrec_scratchpipe.training import KernelChoice, build_trainer

    spec = _spec(model)
    tables = ["item"] if model == "sequence" else None
    init = spec.initial_state(0)
    cpu = torch.device("cpu")
    ref = build_trainer(spec, KernelChoice("fused", sharding_type=sharding), cpu, init)
    sp = build_trainer(spec, KernelChoice("scratchpipe", 0.06 * world_size if sharding == "row_wise" else 0.06,
                                          lookahead=lookahead, horizon=horizon, sharding_type=sharding, tables=tables,
                                          store=StoreSpec("file", store_dir, 64 * 36) if store_dir else None), cpu, init)
    return ref, sp


def _state(model: Any) -> Dict[str, torch.Tensor]:
    return {**local_tensors(model.state_dict(), "w/"), **local_tensors(model.fused_optimizer.state_dict(), "o/")}


def _steps(trainer: Any, it: Any, n: int) -> List[torch.Tensor]:
    """``n`` training steps (fewer if the iterator ends); the logits of each."""
    out = []
    for _ in range(n):
        try:
            out.append(trainer.pipeline.progress(it)[1].detach().clone())
        except StopIteration:
            break
    return out


def _evictions(model: Any) -> int:
    from torchrec_scratchpipe.distributed.stats import cache_stats

    return sum(int(s["evictions"]) for s in cache_stats(model).values())


def _diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max([float((x - y).abs().max()) for x, y in zip(a, b)] or [0.0])


# ---------------------------------------------------------------- live loads
def _load_in_place(trainer: Any, path: str) -> None:
    """TorchRec's in-place pattern (examples/train_dlrm.py load_checkpoint): dcp.load into
    state_dict() tensors, then load_state_dict."""
    import torch.distributed.checkpoint as dcp

    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optim"])


def _load_fresh(trainer: Any, ckpt: Dict[str, Any]) -> None:
    trainer.model.load_state_dict(copy.deepcopy(ckpt["model"]))
    trainer.model.fused_optimizer.load_state_dict(copy.deepcopy(ckpt["optim"]))


def _params(model: Any) -> Dict[str, Any]:
    """Every ScratchPipe kernel's per-table parameters (``named_parameters_by_table``)."""
    from torchrec_scratchpipe.distributed import scratchpipe_kernels

    return {name: p for k in scratchpipe_kernels(model) for name, p in k.named_parameters_by_table()}


def _live_loads(rank: int, world_size: int, tmp: str, model: str, store_dir: Optional[str]) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    ref, sp = _trainers(world_size, model=model, store_dir=store_dir)
    batches = _batches(rank, 22, model=model)
    its = {"ref": iter(batches), "sp": iter(batches)}
    out: Dict[str, Any] = {}
    logits: Dict[str, List[torch.Tensor]] = {"ref": [], "sp": []}
    ckpt: Dict[str, Any] = {}
    for name, t in (("ref", ref), ("sp", sp)):
        logits[name] += _steps(t, its[name], 4)
        dcp.save({"model": t.model.state_dict(), "optim": t.optimizer.state_dict()}, checkpoint_id=f"{tmp}/{name}")
        ckpt[name] = {"model": copy.deepcopy(t.model.state_dict()), "optim": copy.deepcopy(t.model.fused_optimizer.state_dict())}
        logits[name] += _steps(t, its[name], 4)
    out["saved_diff"] = max_diff(_state(ref.model), _state(sp.model))
    # Rollbacks while batches are in flight. Each arm loads the other kernel's checkpoint
    # first (fused -> ScratchPipe and back), in place, then its own with fresh tensors.
    params = _params(sp.model)
    for name, t, other in (("ref", ref, "sp"), ("sp", sp, "ref")):
        _load_in_place(t, f"{tmp}/{other}")
        logits[name] += _steps(t, its[name], 4)
        _load_fresh(t, ckpt[name])
        if name == "sp":  # the cached per-table parameters see the loaded weights
            loaded = local_tensors(ckpt["sp"]["model"])
            out["params_loaded"] = all(
                any(k.endswith(f".{table}.weight/0") and torch.equal(v, p.detach()) for k, v in loaded.items())
                for table, p in params.items()
            )
        logits[name] += _steps(t, its[name], 20)
    out["params_cached"] = _params(sp.model).keys() == params.keys() and all(
        p is params[k] for k, p in _params(sp.model).items()
    )
    out["n_steps"] = (len(logits["ref"]), len(logits["sp"]))
    out["logit_diff"] = _diff(logits["ref"], logits["sp"])
    out["state_diff"] = max_diff(_state(ref.model), _state(sp.model))
    # Resume into a fresh model: bitwise.
    _, fresh = _trainers(world_size, model=model, store_dir=store_dir)
    fresh.model.load_state_dict(copy.deepcopy(sp.model.state_dict()))
    fresh.model.fused_optimizer.load_state_dict(copy.deepcopy(sp.model.fused_optimizer.state_dict()))
    out["resume_diff"] = max_diff(_state(fresh.model), _state(sp.model))
    out["evictions"] = _evictions(sp.model)
    return out


@pytest.mark.parametrize("model,store", [("dlrm", "host"), ("sequence", "host"), ("dlrm", "file")])
def test_live_checkpoint_loads_match_fused(tmp_path: Any, model: str, store: str) -> None:
    store_dir = tmp_path / "store" if store == "file" else None
    if store_dir is not None:
        store_dir.mkdir()
    (res,) = spawn(_live_loads, 1, str(tmp_path), model, str(store_dir) if store_dir else None)
    if store_dir is not None:
        assert list(store_dir.iterdir()) == []  # the process ended: its working copies are gone
    assert res["n_steps"] == (22, 22), res
    assert res["saved_diff"] <= TOL, res
    assert res["logit_diff"] <= TOL, res
    assert res["state_diff"] <= TOL, res
    assert res["resume_diff"] == 0.0, res
    assert res["params_cached"] and res["params_loaded"], res
    assert res["evictions"] > 0, res  # the scratchpad was too small to hold every row


# ---------------------------------------------------------------- bad batches
def _with_ids(batch: Any, feature: str, position: int, value: int) -> Any:
    from torchrec.datasets.utils import Batch

    kjt = batch.sparse_features
    values = kjt.values().clone()
    start = sum(kjt.length_per_key()[: kjt.keys().index(feature)])
    values[start + position] = value
    return Batch(batch.dense_features, KeyedJaggedTensor(kjt.keys(), values, lengths=kjt.lengths()), batch.labels)


def _too_many_rows(batch: Any) -> Any:
    """Every sample looks up 40 distinct rows of t0: more than its scratchpad has slots."""
    from torchrec.datasets.utils import Batch

    kjt = batch.sparse_features
    n = len(batch.labels)
    lengths = kjt.lengths().clone()
    lengths[:n] = 40
    parts = torch.split(kjt.values(), kjt.length_per_key())
    values = torch.cat([torch.arange(40 * n), *parts[1:]])
    return Batch(batch.dense_features, KeyedJaggedTensor(kjt.keys(), values, lengths=lengths), batch.labels)


def _bad_batches(rank: int, world_size: int, sharding: str, bad_rank: int) -> Dict[str, Any]:
    ref, sp = _trainers(world_size, sharding)
    good = _batches(rank, 10)
    mine = rank == bad_rank
    stream = list(good)
    # (position in the stream, bad batch on ``bad_rank``; the other ranks get a good batch there)
    inserts = [(2, _with_ids(good[0], "f0", 1, ROWS[0])), (4, _with_ids(good[1], "f1", 0, -1)), (7, _too_many_rows(good[2]))]
    for pos, bad in reversed(inserts):
        stream.insert(pos, bad if mine else good[pos])
    ref_logits = _steps(ref, iter(good), 100)
    errors, logits, it = [], [], iter(stream)
    while True:
        try:
            logits.append(sp.pipeline.progress(it)[1].detach().clone())
        except StopIteration:
            break
        except ValueError as e:
            errors.append(f"{type(e).__name__}: {e}")
    return {"errors": errors, "n": (len(ref_logits), len(logits)), "logit_diff": _diff(ref_logits, logits),
            "state_diff": max_diff(_state(ref.model), _state(sp.model))}


def _check_bad(results: List[Dict[str, Any]], rows: int) -> None:
    for res in results:
        assert res["n"] == (10, 10), res
        assert res["logit_diff"] <= TOL and res["state_diff"] <= TOL, res
        assert res["errors"] == results[0]["errors"]  # every rank raised the same errors
        first, second, third = res["errors"]
        bad = len(results) - 1
        assert f"rank {bad}: id {rows} of feature 'f0' is out of range for table 't0' with {rows} rows" in first
        assert f"rank {bad}: id -1 of feature 'f1' is out of range for table 't1' with {ROWS[1]} rows" in second
        assert third.startswith("CapacityError:") and "distinct rows but the scratchpad has" in third


def test_pipeline_drops_bad_batches_and_trains_like_fused() -> None:
    (res,) = spawn(_bad_batches, 1, "table_wise", 0)
    _check_bad([res], ROWS[0])


@pytest.mark.slow
def test_bad_batch_on_one_rank_is_dropped_by_every_rank_row_wise() -> None:
    _check_bad(spawn(_bad_batches, 2, "row_wise", 1, timeout=240.0), ROWS[0])


# ---------------------------------------------------------------- evaluation
def _evaluation(rank: int, world_size: int, model: str, store_dir: Optional[str] = None) -> Dict[str, Any]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from torchrec_scratchpipe.distributed.pipeline import ScratchPipeTrainPipeline

    ref, sp = _trainers(world_size, model=model, store_dir=store_dir)
    train, val = _batches(rank, 16, model=model), _batches(rank, 4, seed=100, model=model)
    got: Dict[str, List[torch.Tensor]] = {"ref": [], "sp": []}
    for name, t in (("ref", ref), ("sp", sp)):
        it = iter(train)
        got[name] += _steps(t, it, 5)
        t.pipeline.detach()
        t.model.eval()
        for kind in (TrainPipelineSparseDist, ScratchPipeTrainPipeline):  # (a) a second pipeline
            evaluator = kind(t.model, t.optimizer, torch.device("cpu"))
            with torch.no_grad():
                got[name] += _steps(type("T", (), {"pipeline": evaluator}), iter(val), 10)
            evaluator.detach()
        with torch.no_grad():  # (b) plain eval-mode forwards on the detached model
            got[name] += [t.model(b)[1][1].detach().clone() for b in val]
        t.model.train()
        got[name] += _steps(t, it, 100)
        # Then, without a pipeline: two forwards, one backward (gradient accumulation).
        t.pipeline.detach()
        for i in range(0, len(val), 2):
            t.optimizer.zero_grad()
            outs = [t.model(b) for b in val[i : i + 2]]
            sum(loss for loss, _ in outs).backward()
            t.optimizer.step()
            got[name] += [o[1][1].detach().clone() for o in outs]
    return {"n": (len(got["ref"]), len(got["sp"])), "diff": _diff(got["ref"], got["sp"]), "evictions": _evictions(sp.model),
            "state_diff": max_diff(_state(ref.model), _state(sp.model))}


@pytest.mark.parametrize("model,store", [("dlrm", "host"), ("sequence", "host"), ("dlrm", "file")])
def test_evaluation_mid_training_and_accumulation_match_fused(tmp_path: Any, model: str, store: str) -> None:
    (res,) = spawn(_evaluation, 1, model, str(tmp_path) if store == "file" else None)
    assert res["n"] == (16 + 12 + 4, 16 + 12 + 4), res
    assert res["diff"] <= TOL and res["state_diff"] <= TOL, res
    assert res["evictions"] > 0, res


def _plain_forward_bad_global_id(rank: int, ws: int) -> Tuple[str, float]:
    from torchrec import EmbeddingBagCollection

    import torchrec_scratchpipe.distributed as tsp
    from dist_utils import build_dmp, constraints_for, make_batch, make_tables

    tables = make_tables()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = build_dmp(ebc, constraints_for(tables, "row_wise", {t.name: 0.5 for t in tables}), tsp.get_sharders(), ws)
    keys = [t.feature_names[0] for t in tables]
    # Only rank 0's batch is bad: id 2000 of t_big (2000 rows), which the input dist would
    # hand rank 1's shard as a local id; rank 1's batch is fine.
    ids = torch.tensor([2000 if rank == 0 else 5])
    lengths = torch.tensor([1] + [0] * (len(keys) * 8 - 1))
    try:
        model(KeyedJaggedTensor.from_lengths_sync(keys, ids, lengths))
        message = "no error"
    except ValueError as e:
        message = str(e)
    out = model(make_batch(0, rank, tables))  # training goes on
    values = (out.wait() if hasattr(out, "wait") else out).values()
    values.sum().backward()
    return message, float(values.abs().sum())


@pytest.mark.slow
def test_plain_dmp_forward_names_a_bad_id_by_its_global_id_on_every_rank() -> None:
    results = spawn(_plain_forward_bad_global_id, 2, timeout=120)
    for rank, (message, trained) in enumerate(results):
        assert "rank 0: id 2000 of feature 'f_big' is out of range for table 't_big' with 2000 rows" in message, (rank, message)
        assert trained > 0, rank
