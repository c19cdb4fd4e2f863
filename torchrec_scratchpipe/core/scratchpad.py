"""Stage 5, train: FBGEMM's TBE over the C scratchpad slots of one table group."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from torchrec_scratchpipe.compat import ComputeDevice, EmbeddingLocation, PoolingMode, slot_tbe
from torchrec_scratchpipe.core.config import ScratchPipeConfig
from torchrec_scratchpipe.core.layout import RowLayout
from torchrec_scratchpipe.core.store import gather_rows, scatter_rows


class Scratchpad(torch.nn.Module):
    """C device-resident slots (weights + optimizer state) trained by one TBE.

    The TBE is built the way TorchRec's ``fused`` builds one for the same tables
    (``compat.slot_tbe``): one TBE table per source table, with the same feature map,
    so FBGEMM runs the same kernels and training is bit for bit that of ``fused``. All
    of them alias the same C slots, which the group's tables share. Forward takes *slot*
    indices; backward runs FBGEMM's fused optimizer on the touched slots.

    Args:
        capacity: number of slots C.
        layout: what a row holds (dim, weight dtype, optimizer state); must match
            ``config.optimizer``.
        table_features: features (bags per sample) of each table of the group, in order.
        pooling: FBGEMM pooling mode (``NONE`` for unpooled tables: one row per id).
        config: optimizer, hyper-parameters and other TBE options (``tbe_kwargs``).
        device: ``cpu`` (HOST placement) or ``cuda`` (DEVICE placement).
        table_names: the tables' names (FBGEMM's ``table_names``, as ``fused`` passes).

    Example::

        >>> cfg = ScratchPipeConfig()
        >>> pad = Scratchpad(4, RowLayout(cfg.optimizer, 8), table_features=[1], pooling=PoolingMode.SUM,
        ...                  config=cfg, device=torch.device("cpu"))
        >>> pad(torch.tensor([0, 1]), torch.tensor([0, 1, 2])).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        capacity: int,
        layout: RowLayout,
        table_features: Sequence[int],
        pooling: PoolingMode,
        config: ScratchPipeConfig,
        device: torch.device,
        table_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        if layout.optimizer != config.optimizer:
            raise ValueError(f"layout is for {layout.optimizer.name}, config trains with {config.optimizer.name}.")
        layout.check_device(device)
        on_cuda = device.type == "cuda"
        self.tbe = slot_tbe(
            capacity,
            layout.dim,
            table_features,
            EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST,
            ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU,
            pooling_mode=pooling,
            device=device,
            weights_precision=layout.weights_precision,
            table_names=None if table_names is None else list(table_names),
            **config.tbe_kwargs(),
        )
        self.state_names: List[str] = layout.state_names
        self.weights: torch.Tensor = self.tbe.split_embedding_weights()[0]
        states = self.tbe.split_optimizer_states()
        self.states: Dict[str, torch.Tensor] = (
            dict(zip(self.state_names, states[0])) if states else {}
        )
        with torch.no_grad():
            self.weights.zero_()

    def forward(
        self,
        slot_indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Pooled embeddings [B, num_features * dim] for slot-remapped bags
        (``[len(slot_indices), dim]`` with ``PoolingMode.NONE``)."""
        out: torch.Tensor = self.tbe(slot_indices, offsets, per_sample_weights)
        return out

    def read(self, slots: torch.Tensor, out: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Weights and states of ``slots`` (on the scratchpad's device), written into ``out``'s
        tensors when given (e.g. typed views of packed rows)."""
        into = {} if out is None else out
        res = {"weights": gather_rows(self.weights.detach(), slots, into.get("weights"))}
        for name, st in self.states.items():
            res[name] = gather_rows(st.detach(), slots, into.get(name))
        return res

    @torch.no_grad()
    def write(self, slots: torch.Tensor, values: Dict[str, torch.Tensor]) -> None:
        """Insert rows' weights and states into ``slots``.

        The writes go through ``.data``, outside autograd's version tracking: the
        background planner inserts rows into unheld slots while a batch that holds other
        slots sits between forward and backward, and TBE's backward would otherwise reject
        its saved weights as modified. Only unheld slots are ever written here.
        """
        scatter_rows(self.weights.data, slots, values["weights"])
        for name, st in self.states.items():
            scatter_rows(st.data, slots, values[name])

    def set_learning_rate(self, lr: float) -> None:
        self.tbe.set_learning_rate(lr)

    def get_learning_rate(self) -> float:
        return float(self.tbe.get_learning_rate())
