"""RowLayout, the single source of per-row facts, checked against FBGEMM's own TBE."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from torchrec_scratchpipe.compat import ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen
from torchrec_scratchpipe.core.layout import (
    DEVICE_OPTIMIZERS,
    OPTIMIZER_STATES,
    WEIGHT_DTYPES,
    EmbOptimType,
    RowLayout,
)

CPU_CASES = [(o, d) for o in DEVICE_OPTIMIZERS["cpu"] for d in WEIGHT_DTYPES]


@pytest.mark.parametrize("optimizer,dtype_name", CPU_CASES, ids=lambda x: getattr(x, "name", x))
def test_layout_matches_fbgemm_tbe(optimizer: EmbOptimType, dtype_name: str) -> None:
    """Names, per-row shapes and dtypes of weights and states are what a real CPU TBE allocates."""
    dim, rows = 8, 6
    layout = RowLayout(optimizer, dim, WEIGHT_DTYPES[dtype_name][0])
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=optimizer,
        weights_precision=layout.weights_precision, device="cpu",
    )
    states = tbe.split_optimizer_states()
    actual = [("weights", tbe.split_embedding_weights()[0])] + list(zip(layout.state_names, states[0] if states else []))
    assert len(actual) == len(layout.values)
    for value, (name, tensor) in zip(layout.values, actual):
        assert (value.name, (rows,) + value.shape, value.dtype) == (name, tuple(tensor.shape), tensor.dtype)
    moved = sum(t[0].nbytes for _, t in actual)
    assert layout.weight_bytes + layout.state_bytes == moved
    assert moved <= layout.bytes_per_row < moved + max(v.dtype.itemsize for v in layout.values)


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_STATES), ids=lambda o: o.name)
@pytest.mark.parametrize("dtype_name", list(WEIGHT_DTYPES))
def test_packed_values_are_aligned_and_disjoint(optimizer: EmbOptimType, dtype_name: str) -> None:
    layout = RowLayout(optimizer, 12, WEIGHT_DTYPES[dtype_name][0])
    end = 0
    for v in layout.values:
        assert v.offset % v.dtype.itemsize == 0 and v.offset >= end
        end = v.offset + v.nbytes
    assert end <= layout.bytes_per_row


def test_for_table_reads_the_table_dtype_and_refuses_others() -> None:
    table = EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=10, feature_names=["f0"])
    layout = RowLayout.for_table(EmbOptimType.EXACT_SGD, table)
    assert (layout.dim, layout.weight_dtype, layout.state_names) == (16, torch.float32, [])
    unsupported = [d for d in (DataType.FP16, DataType.INT8, DataType.BF16) if d.name not in WEIGHT_DTYPES]
    for data_type in unsupported:
        table.data_type = data_type
        with pytest.raises(ValueError, match=f"table 't0': data_type {data_type.name} is not supported"):
            RowLayout.for_table(EmbOptimType.EXACT_SGD, table)


def test_bad_layouts_are_refused_with_the_alternatives() -> None:
    with pytest.raises(ValueError, match="supported: FP32"):
        RowLayout(EmbOptimType.EXACT_SGD, 8, torch.int8)
    with pytest.raises(ValueError, match="positive multiple of 4"):
        RowLayout(EmbOptimType.EXACT_SGD, 0)
    with pytest.raises(ValueError, match="Adam needs CUDA"):
        RowLayout(EmbOptimType.ADAM, 8).check_device(torch.device("cpu"))


@pytest.mark.parametrize("dtype_name", list(WEIGHT_DTYPES))
def test_for_table_reads_each_weight_dtype(dtype_name: str) -> None:
    """A table declaring a dtype gets it in its rows; optimizer state keeps its own precision."""
    dtype, precision = WEIGHT_DTYPES[dtype_name]
    table = EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=10, feature_names=["f0"],
                               data_type=DataType[dtype_name])
    layout = RowLayout.for_table(EmbOptimType.EXACT_ROWWISE_ADAGRAD, table)
    assert (layout.weight_dtype, layout.weights_precision, layout.dtype_name) == (dtype, precision, dtype_name)
    assert layout.weight_bytes == 16 * dtype.itemsize
    assert layout.state_bytes == RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 16).state_bytes


def test_group_tags_keep_weight_dtypes_apart() -> None:
    tags = [RowLayout(EmbOptimType.EXACT_SGD, 8, dtype).group_tag for dtype, _ in WEIGHT_DTYPES.values()]
    assert tags[0] == "" and len(set(tags)) == len(tags)  # the default dtype keeps the plain group names


def test_row_width_rule_lives_in_the_layout_and_names_the_table() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    with pytest.raises(ValueError, match="multiple of 4"):
        RowLayout(EmbOptimType.EXACT_SGD, 6)
    table = EmbeddingBagConfig(name="odd", embedding_dim=6, num_embeddings=10, feature_names=["f"])
    with pytest.raises(ValueError, match="table 'odd': embedding_dim must be a positive multiple of 4"):
        RowLayout.for_table(EmbOptimType.EXACT_SGD, table)


def test_planner_refuses_a_dim_the_tbe_cannot_hold_at_plan_time() -> None:
    import torch
    from torchrec import EmbeddingBagCollection
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    import torchrec_scratchpipe.distributed as tsp

    tables = [EmbeddingBagConfig(name="odd", embedding_dim=6, num_embeddings=100, feature_names=["f"])]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    planner = tsp.ShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), batch_size=8,
                                  constraints={"odd": ParameterConstraints(compute_kernels=[tsp.SCRATCHPIPE])})
    with pytest.raises(ValueError, match="table 'odd': embedding_dim must be a positive multiple of 4"):
        planner.plan(ebc, tsp.get_sharders())
