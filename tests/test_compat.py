"""The compatibility module works on the running stack (CI runs this on every stack it tests)."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
import torchrec
from torchrec.distributed.embedding_types import EmbeddingComputeKernel

from torchrec_scratchpipe import compat
from torchrec_scratchpipe.distributed.lookup import ScratchPipeGroupedPooledEmbeddingsLookup
from torchrec_scratchpipe.distributed.types import SCRATCHPIPE

#: (oldest, newest) supported minor releases; the README's version table says the same.
SUPPORTED = {"torch": ((2, 11), (2, 14)), "fbgemm_gpu": ((1, 6), (1, 9)), "torchrec": ((1, 6), (1, 9))}


def test_running_stack_is_a_supported_pair() -> None:
    for name, (low, high) in SUPPORTED.items():
        assert low <= compat.STACK[name][:2] <= high, f"{name} {compat.STACK[name]} outside {low}..{high}"
    # fbgemm-gpu 1.6 is built for torch 2.11, 1.7 for 2.12, ...: a mismatch fails at import or at run time.
    assert compat.STACK["torch"][1] - compat.STACK["fbgemm_gpu"][1] == 5, compat.stack_text()
    assert compat.STACK["torch"][:2] == compat.version_tuple(torch.__version__)[:2]
    assert compat.STACK["torchrec"][:2] == compat.version_tuple(torchrec.__version__)[:2]
    assert "torchrec" in compat.stack_text()


def test_version_tuple() -> None:
    assert compat.version_tuple("2.11.0+cu130") == (2, 11, 0)
    assert compat.version_tuple("1.9.0rc1") == (1, 9, 0)
    with pytest.raises(ValueError, match="not a version"):
        compat.version_tuple("dev")


def test_kernel_validation_set_tracks_torchrec() -> None:
    valid = compat.kernel_validation_set()
    if compat.STACK["torchrec"] < (1, 7):
        assert valid is None  # 1.6.x does not validate kernel names at the end of plan()
    else:
        assert valid is not None and {k.value for k in EmbeddingComputeKernel} <= valid
        assert SCRATCHPIPE not in valid


def test_kernels_accepted_is_scoped_and_reentrant() -> None:
    valid = compat.kernel_validation_set()

    def present() -> bool:
        return valid is not None and SCRATCHPIPE in valid

    with compat.compute_kernels_accepted([SCRATCHPIPE, "fused"]):
        with compat.compute_kernels_accepted([SCRATCHPIPE]):
            assert present() == (valid is not None)
        assert present() == (valid is not None)
    assert not present()
    if valid is not None:
        assert "fused" in valid  # TorchRec's own kernel is never removed


def test_kernels_accepted_from_threads() -> None:
    valid = compat.kernel_validation_set()
    inside = threading.Barrier(4)

    def plan_once() -> None:
        with compat.compute_kernels_accepted([SCRATCHPIPE]):
            inside.wait(timeout=30)

    threads = [threading.Thread(target=plan_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert valid is None or SCRATCHPIPE not in valid


def test_tbe_shim_matches_torch_embedding_bag() -> None:
    rows, dim = 10, 4
    tbe = compat.SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, compat.EmbeddingLocation.HOST, compat.ComputeDevice.CPU)],
        pooling_mode=compat.PoolingMode.SUM,
    )
    weights = tbe.split_embedding_weights()[0]
    torch.manual_seed(0)
    weights.copy_(torch.randn(rows, dim))
    indices = torch.tensor([1, 2, 2, 9, 0], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 5], dtype=torch.int64)
    got = tbe(indices, offsets)
    want = torch.nn.functional.embedding_bag(indices, weights.detach(), offsets[:-1], mode="sum")
    torch.testing.assert_close(got, want)


def test_private_hooks_keep_the_signatures_the_package_calls() -> None:
    """The private TorchRec hooks overridden or called by keyword still take those arguments."""
    base = inspect.signature(compat.GroupedPooledEmbeddingsLookup._create_embedding_kernel).parameters
    ours = inspect.signature(ScratchPipeGroupedPooledEmbeddingsLookup._create_embedding_kernel).parameters
    assert list(base) == list(ours)
    io = inspect.signature(compat.calculate_shard_io_sizes).parameters
    assert {"sharding_type", "batch_sizes", "world_size", "local_world_size", "input_lengths", "emb_dim",
            "shard_sizes", "input_data_type_size", "output_data_type_size", "num_poolings", "is_pooled"} <= set(io)
    lookup = inspect.signature(compat.GroupedPooledEmbeddingsLookup.__init__).parameters
    assert {"grouped_configs", "pg", "device", "feature_processor", "sharding_type", "env"} <= set(lookup)
    assert list(inspect.signature(compat.wait_for_batch).parameters)[:2] == ["batch", "stream"]
    # the pipeline checks each loader batch on the host in this hook, before the device copy
    assert list(inspect.signature(compat.TrainPipelineSparseDist._next_batch).parameters) == ["self", "dataloader_iter"]


def test_tabulate_and_wait_for_batch() -> None:
    text = compat.tabulate([["big_table", "12"]], ["table", "slots"])
    assert "big_table" in text and "slots" in text
    batch = torch.ones(3)
    compat.wait_for_batch(batch, None)  # no stream on CPU: returns without touching the batch
    assert torch.equal(batch, torch.ones(3))


def test_sequence_lookup_hook_keeps_its_signature() -> None:
    """The sequence lookup's private kernel hook still takes the arguments our subclass passes."""
    from torchrec_scratchpipe.distributed.sequence_lookup import ScratchPipeGroupedEmbeddingsLookup

    base = inspect.signature(compat.GroupedEmbeddingsLookup._create_embedding_kernel).parameters
    ours = inspect.signature(ScratchPipeGroupedEmbeddingsLookup._create_embedding_kernel).parameters
    assert list(base)[:4] == list(ours)[:4]


def test_process_group_topology_and_fx_notice_shims() -> None:
    class _Env:
        process_group = "pg"

    model = torch.nn.Sequential(torch.nn.Linear(1, 1))
    assert compat.module_process_group(model) is None
    model[0]._env = _Env()  # what TorchRec's sharded modules carry
    assert compat.module_process_group(model) == "pg"
    factory = compat.topology_factory()
    if factory is not None:
        assert [c.__name__ for c in factory] == ["TopologyFactory", "TrainerConfig", "KernelConfig"]
    notice = compat.fx_tracing_notice()
    assert notice is None or (callable(notice[0]) and notice[1].startswith("torch.fx"))
