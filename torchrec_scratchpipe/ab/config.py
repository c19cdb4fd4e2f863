"""Settings of an A/B comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from torchrec_scratchpipe import defaults
from torchrec_scratchpipe.cli import tool_window
from torchrec_scratchpipe.core.capacity import check_load_factor
from torchrec_scratchpipe.core.layout import OPTIMIZERS_BY_NAME, WEIGHT_DTYPES, RowLayout
from torchrec_scratchpipe.core.store_api import StoreSpec
from torchrec_scratchpipe.data.synthetic import ALPHA, DISTRIBUTION

ARMS = ("fused", "fused_uvm_caching", "scratchpipe")
MODELS = ("dlrm", "sequence")
OPTIMIZERS = tuple(OPTIMIZERS_BY_NAME)
#: ``--data-type`` values: the weight dtypes a row can hold, lower case.
DATA_TYPES = tuple(name.lower() for name in WEIGHT_DTYPES)


@dataclass
class ABConfig:
    """What to compare, on what data.

    Args:
        model: ``"dlrm"`` (bag tables, the default) or ``"sequence"``: the next-item model of
            ``torchrec_scratchpipe.sequence_model`` (an ``EmbeddingCollection``; its ``item``
            table of ``tables x rows`` rows on the tested kernel, ``category`` on ``fused``),
            on synthetic histories of 1..``max_len`` items.
        arms: kernels to run; ``scratchpipe`` runs once per entry of ``lookaheads``.
        lookaheads: ScratchPipe lookaheads L.
        horizon: ScratchPipe horizon H, the same for every arm (None: ``defaults.HORIZON``,
            at least L). With H = L the victim choice is plain LRU among unheld rows; the
            long default horizon is what lets the planner keep rows that come back soon.
        load_factor: device budget per table as a fraction of its rows; the same for the
            UVM cache and the scratchpad.
        data: ``"synthetic"``, ``"trace:PATH"`` (FBGEMM request trace) or
            ``"criteo:PATH[,PATH...]"`` (Criteo TSV).
        tables, rows, dim, pooling, distribution, alpha: synthetic data and model shape
            (``rows`` is per table; for traces the sizes come from the file).
        data_type: weight dtype of the DLRM's tables (``"fp32"`` or ``"fp16"``), for every arm.
        max_len: longest history of the sequence model.
        batch_size: samples per step.
        steps, warmup: timed steps and untimed first steps per arm.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        optimizer, learning_rate: embedding optimizer (exact FBGEMM ones) and its rate.
            Every ScratchPipe arm must be bitwise equal to ``fused`` with each of them.
        seed: seed of the data and of the initial weights.
        out: output folder for the Markdown table, JSON and plots.
        threads: torch CPU threads (0: torch's default, the host's cores). None (default):
            one on CPU, where the ops are small and on a busy machine more threads than free
            cores slow runs tenfold; the host's own count on CUDA, where the host plans and
            launches next to the device (``threads_on``).
        progress: show tqdm bars.
        store, host_cache_mb: the ScratchPipe arms' backing store, ``"host"`` or
            ``"file:DIR"`` with a host cache of ``host_cache_mb`` MiB per table
            (``StoreSpec.parse``); ``fused`` always keeps its tables in memory.

    Example::

        >>> cfg = ABConfig(steps=20, lookaheads=[0, 2])
        >>> cfg.arm_labels()
        ['fused', 'fused_uvm_caching', 'scratchpipe L=0 H=64', 'scratchpipe L=2 H=64']
    """

    model: str = "dlrm"
    arms: List[str] = field(default_factory=lambda: list(ARMS))
    lookaheads: List[int] = field(default_factory=lambda: list(defaults.AB_LOOKAHEADS))
    horizon: Optional[int] = None
    load_factor: float = defaults.LOAD_FACTOR
    data: str = "synthetic"
    tables: int = defaults.TABLES
    rows: int = defaults.ROWS
    dim: int = defaults.DIM
    pooling: int = defaults.POOLING
    distribution: str = DISTRIBUTION
    alpha: float = ALPHA
    data_type: str = DATA_TYPES[0]
    max_len: int = 20
    batch_size: int = defaults.BATCH_SIZE
    steps: int = 150
    warmup: int = 10
    device: str = "auto"
    optimizer: str = defaults.OPTIMIZER
    learning_rate: float = defaults.LEARNING_RATE
    seed: int = defaults.SEED
    out: Path = Path("out/ab")
    threads: Optional[int] = None
    progress: bool = True
    # -- backing store of the ScratchPipe arms (issue 22) --
    store: str = "host"
    host_cache_mb: Optional[float] = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {list(MODELS)}, got {self.model!r}.")
        if self.model == "sequence" and (self.data != "synthetic" or self.max_len < 1):
            raise ValueError("--model sequence trains on its own synthetic histories: leave --data synthetic "
                             f"and give --max-len >= 1 (got data={self.data!r}, max_len={self.max_len}).")
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"--data-type must be one of {list(DATA_TYPES)}, got {self.data_type!r}.")
        if self.model == "sequence" and self.data_type != DATA_TYPES[0]:
            raise ValueError(f"--data-type {self.data_type} is for the DLRM tables; the sequence model trains in "
                             f"{DATA_TYPES[0]}: leave --data-type out with --model sequence.")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"--arms: unknown arms {bad}; choose from {list(ARMS)}.")
        if not self.arms:
            raise ValueError("--arms: name at least one arm.")
        check_load_factor(self.load_factor, "--load-factor")
        if not self.lookaheads:
            raise ValueError("--lookaheads: name at least one ScratchPipe lookahead.")
        for L in self.lookaheads:
            tool_window(L, self.horizon, "--lookaheads")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}.")
        if self.steps <= 0 or self.warmup < 0:
            raise ValueError(f"--steps must be > 0 and --warmup >= 0, got {self.steps} and {self.warmup}.")
        try:
            RowLayout(OPTIMIZERS_BY_NAME[self.optimizer], self.dim)  # the row-width rule, stated once
        except (KeyError, ValueError) as e:
            raise ValueError(f"--dim: {e}") from e
        if not (self.data == "synthetic" or self.data.startswith(("trace:", "criteo:"))):
            raise ValueError(f"--data must be 'synthetic', 'trace:PATH' or 'criteo:PATH', got {self.data!r}.")
        self.store_spec  # --store / --host-cache-mb

    @property
    def store_spec(self) -> StoreSpec:
        """The ScratchPipe arms' ``StoreSpec`` (raises a ValueError naming the flag)."""
        return StoreSpec.parse(self.store, self.host_cache_mb)

    def threads_on(self, device: torch.device) -> int:
        """torch CPU threads for a run on ``device`` (0: leave torch's default).

        Example::

            >>> import torch
            >>> ABConfig().threads_on(torch.device("cpu")), ABConfig().threads_on(torch.device("cuda"))
            (1, 0)
            >>> ABConfig(threads=3).threads_on(torch.device("cuda"))
            3
        """
        if self.threads is not None:
            return self.threads
        return defaults.THREADS if device.type == "cpu" else 0

    def horizon_for(self, lookahead: int) -> int:
        """H of the ScratchPipe arm with lookahead ``lookahead``."""
        return defaults.horizon_for(lookahead, self.horizon)

    def arm_labels(self) -> List[str]:
        labels = []
        for a in self.arms:
            if a == "scratchpipe":
                for L in self.lookaheads:
                    labels.append(f"scratchpipe L={L} H={self.horizon_for(L)}")
            else:
                labels.append(a)
        return labels
