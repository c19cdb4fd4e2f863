"""What one embedding row is made of: the single place for per-row facts.

A row of a table group is its weights plus the per-row state of its fused optimizer.
``RowLayout`` turns (optimizer, dim, weight dtype) into everything the rest of the
package needs to know about such a row: the state names in FBGEMM's order, each
value's per-row shape and dtype, where each value sits in a packed row, the bytes one
row moves, and on which devices FBGEMM's TBE can train it. The backing store, the
scratchpad, the mover, the staging ring, the memory estimators and the A/B tool all
read it; adding an optimizer or a weight dtype means editing the tables below (and
their tests), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType

#: Per-row state tensors of each optimizer, in ``split_optimizer_states()`` order, and
#: whether the state is one scalar per row (``()``) rather than one value per column.
OPTIMIZER_STATES: Dict[EmbOptimType, Tuple[Tuple[str, bool], ...]] = {
    EmbOptimType.EXACT_SGD: (),
    EmbOptimType.EXACT_ADAGRAD: (("momentum1", False),),
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: (("momentum1", True),),
    EmbOptimType.ADAM: (("exp_avg", False), ("exp_avg_sq", False)),
}
#: Optimizers FBGEMM's TBE runs per device type.
DEVICE_OPTIMIZERS: Dict[str, Tuple[EmbOptimType, ...]] = {
    "cpu": (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD),
    "cuda": (
        EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ADAM,
    ),
}
#: The optimizer FBGEMM's TBE trains with when it is given none (TorchRec's ``fused`` too).
TBE_DEFAULT_OPTIMIZER = EmbOptimType.EXACT_SGD
#: Command-line names of the exact optimizers (A/B tool, example trainer).
OPTIMIZERS_BY_NAME: Dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}
#: Weight dtypes a row can hold, keyed by TorchRec's ``DataType`` name, with FBGEMM's
#: matching ``weights_precision``. Optimizer state stays FP32 whatever the weights are
#: (FBGEMM's default state precision), and so does the TBE's output (its default
#: ``output_dtype``). The first entry is the default (tables without ``data_type``).
WEIGHT_DTYPES: Dict[str, Tuple[torch.dtype, SparseType]] = {
    "FP32": (torch.float32, SparseType.FP32),
    "FP16": (torch.float16, SparseType.FP16),
}
#: Every row's width (embedding dim) is a multiple of this (FBGEMM's TBE rows).
ROW_WIDTH_MULTIPLE = 4
#: dtype of every optimizer state.
STATE_DTYPE = torch.float32
#: dtype of the pooled (or per-id) embeddings the scratchpad returns, whatever the weights.
OUTPUT_DTYPE = torch.float32


@dataclass(frozen=True)
class RowValue:
    """One value of a row: its name, per-row shape and dtype, and byte offset in a packed row."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class RowLayout:
    """Weights and optimizer state of one row.

    Args:
        optimizer: the fused optimizer (decides the state values).
        dim: embedding dimension.
        weight_dtype: dtype of the weights (a dtype of ``WEIGHT_DTYPES``).

    Example::

        >>> layout = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, dim=64)
        >>> [(v.name, v.shape, v.offset) for v in layout.values]
        [('weights', (64,), 0), ('momentum1', (), 256)]
        >>> layout.bytes_per_row, layout.weight_bytes
        (260, 256)
        >>> half = RowLayout(EmbOptimType.EXACT_ROWWISE_ADAGRAD, dim=64, weight_dtype=torch.float16)
        >>> half.bytes_per_row, half.weight_bytes, half.state_bytes, half.group_tag
        (132, 128, 4, '_fp16')
    """

    optimizer: EmbOptimType
    dim: int
    weight_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATES:
            known = ", ".join(o.name for o in OPTIMIZER_STATES)
            raise ValueError(f"ScratchPipe does not support optimizer {self.optimizer}; supported: {known}.")
        if self.weight_dtype not in {d for d, _ in WEIGHT_DTYPES.values()}:
            raise ValueError(
                f"ScratchPipe does not support {self.weight_dtype} weights; supported: "
                f"{', '.join(WEIGHT_DTYPES)}. Declare the table's data_type as one of those."
            )
        if self.dim <= 0 or self.dim % ROW_WIDTH_MULTIPLE:
            raise ValueError(
                f"embedding_dim must be a positive multiple of {ROW_WIDTH_MULTIPLE} (FBGEMM TBE rows), got {self.dim}."
            )

    @staticmethod
    def for_table(optimizer: EmbOptimType, table: Any) -> "RowLayout":
        """The layout of a TorchRec table config (its ``embedding_dim`` and ``data_type``).

        Raises:
            ValueError: the table's data type is not one of ``WEIGHT_DTYPES``, or its dim is
                not a multiple of ``ROW_WIDTH_MULTIPLE`` (names the table).
        """
        dtype = weight_dtype_of(table)
        try:
            return RowLayout(optimizer, table.embedding_dim, dtype)
        except ValueError as e:
            raise ValueError(f"table {getattr(table, 'name', '?')!r}: {e}") from e

    @property
    def dtype_name(self) -> str:
        """The weights' TorchRec ``DataType`` name (``"FP32"``, ``"FP16"``)."""
        return next(n for n, (d, _) in WEIGHT_DTYPES.items() if d == self.weight_dtype)

    @property
    def group_tag(self) -> str:
        """Suffix that keeps tables of different weight dtypes in separate table groups:
        empty for the default dtype, else ``"_fp16"`` etc."""
        return "" if self.dtype_name == DEFAULT_DTYPE_NAME else f"_{self.dtype_name.lower()}"

    @property
    def state_names(self) -> List[str]:
        """Optimizer state names, in FBGEMM's ``split_optimizer_states()`` order."""
        return state_names(self.optimizer)

    @property
    def state_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Per-row shape of each optimizer state: ``()`` for row-wise states, ``(dim,)`` otherwise."""
        return {name: (() if row_wise else (self.dim,)) for name, row_wise in OPTIMIZER_STATES[self.optimizer]}

    @property
    def values(self) -> Tuple[RowValue, ...]:
        """Weights, then the states, each at an offset aligned to its element size."""
        out: List[RowValue] = []
        at = 0
        specs: List[Tuple[str, Tuple[int, ...], torch.dtype]] = [("weights", (self.dim,), self.weight_dtype)]
        specs += [(name, shape, STATE_DTYPE) for name, shape in self.state_shapes.items()]
        for name, shape, dtype in specs:
            at = _align(at, dtype.itemsize)
            value = RowValue(name, shape, dtype, at)
            out.append(value)
            at += value.nbytes
        return tuple(out)

    @property
    def bytes_per_row(self) -> int:
        """Bytes one packed row takes (and moves): its values, padded to the widest element."""
        values = self.values
        end = values[-1].offset + values[-1].nbytes
        return _align(end, max(v.dtype.itemsize for v in values))

    @property
    def weight_bytes(self) -> int:
        """Bytes of one row's weights."""
        return self.dim * self.weight_dtype.itemsize

    @property
    def state_bytes(self) -> int:
        """Bytes of one row's optimizer state."""
        return sum(v.nbytes for v in self.values[1:])

    @property
    def weights_precision(self) -> SparseType:
        """FBGEMM's ``weights_precision`` for these weights."""
        return next(p for d, p in WEIGHT_DTYPES.values() if d == self.weight_dtype)

    def check_device(self, device: torch.device) -> None:
        """Raise a ValueError naming the alternatives when FBGEMM cannot train this row on ``device``."""
        check_optimizer(self.optimizer, device)


#: ``DataType`` name of tables that declare none.
DEFAULT_DTYPE_NAME = next(iter(WEIGHT_DTYPES))


def weight_dtype_of(table: Any) -> torch.dtype:
    """The torch dtype of a table config's weights (its ``data_type``; the default when it has none).

    Raises:
        ValueError: the table's data type is not one of ``WEIGHT_DTYPES`` (names the table
            and the alternatives).

    Example::

        >>> from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
        >>> weight_dtype_of(EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4,
        ...                                    feature_names=["f"], data_type=DataType.FP16))
        torch.float16
    """
    data_type = getattr(table, "data_type", None)
    name = DEFAULT_DTYPE_NAME if data_type is None else data_type.name
    if name not in WEIGHT_DTYPES:
        raise ValueError(
            f"table {getattr(table, 'name', '?')!r}: data_type {name} is not supported by ScratchPipe; "
            f"supported: {', '.join(WEIGHT_DTYPES)}. Use one of those, or another compute kernel for this table."
        )
    return WEIGHT_DTYPES[name][0]


def state_names(optimizer: EmbOptimType) -> List[str]:
    """Per-row state names of ``optimizer``, in FBGEMM's ``split_optimizer_states()`` order."""
    return [name for name, _ in OPTIMIZER_STATES[optimizer]]


def supported_optimizers(device: torch.device) -> Tuple[EmbOptimType, ...]:
    """Optimizers the scratchpad can train with on ``device``."""
    return DEVICE_OPTIMIZERS["cuda" if device.type == "cuda" else "cpu"]


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


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to
