"""Every default of this package, and the one check of a ScratchPipe window (L, H).

Two sets of defaults live here, and only here:

**The library's** (``ScratchPipeConfig``, ``ScratchPipeTrainPipeline``, a table whose
``CacheParams`` has no ``load_factor``):

- ``LIBRARY_LOAD_FACTOR`` (0.2): TorchRec's and FBGEMM's own UVM-cache default
  (``cache_load_factor``), so a table switched from ``fused_uvm_caching`` to ScratchPipe
  keeps its device budget.
- ``LIBRARY_LOOKAHEAD`` (1): one batch planned ahead, as TorchRec's
  ``PrefetchTrainPipelineSparseDist`` prefetches one batch. The horizon defaults to L.

**The tools'** (the A/B comparison ``python -m torchrec_scratchpipe.ab``, the cache
simulator ``...sim``, the capacity advisor ``...advise``, the engine benchmark,
``examples/train_dlrm.py`` and its torchx component), so a number measured with one tool
can be reproduced with another without re-typing flags:

- ``LOAD_FACTOR`` (0.1): half the library's. The tools exist to compare eviction choices,
  and on their synthetic data a tighter budget is where those choices decide the traffic;
  ``BATCH_SIZE x POOLING`` ids per table still fit ``LOAD_FACTOR x ROWS`` slots, one or two
  ranks, table-wise or row-wise, without a capacity warning.
- ``LOOKAHEAD`` (L = 4) and ``HORIZON`` (H = 64): a window deep enough to hide moves and a
  horizon long enough to beat LRU: with H = L the victim choice *is* LRU among unheld rows.
- ``OPTIMIZER``, ``LEARNING_RATE``: the fused embedding optimizer (row-wise Adagrad, exact
  on CPU and CUDA) and its rate (the dense SGD uses the same rate).
- ``TABLES``, ``ROWS``, ``DIM``, ``POOLING``, ``BATCH_SIZE``, ``SEED``: the synthetic model
  and data.
- ``THREADS`` (1): torch CPU threads of every tool. The ops are small, and on a busy
  machine more threads than free cores slow CPU runs tenfold.

**The simulator's and the advisor's** (``...sim``, ``...sim.goals``, ``...advise``): a
stream at the scale of the Criteo/DLRM workloads their figures use,
``SIM_TABLE_SIZES`` (26 tables of 100,000 rows) in steps of ``SIM_BATCH_SIZE`` (4096)
samples, ``SIM_STEPS`` (100) steps (the goal table: ``GOALS_STEPS``, 200), and
FBGEMM's cache geometry, ``SIM_WAYS`` (32 ways per set, as on NVIDIA GPUs). A miss-ratio
curve without ``--json`` is written to ``SIM_MRC_OUT``.

Every place that takes an L and an H checks them with :func:`check_window`.

Example:
    >>> from torchrec_scratchpipe import defaults
    >>> defaults.horizon_for(4), defaults.horizon_for(100)
    (64, 100)
    >>> defaults.check_window(2), defaults.check_window(2, 8)
    (2, 8)
    >>> defaults.check_window(3, 2)
    Traceback (most recent call last):
    ...
    ValueError: invalid window lookahead=3, horizon=2: need 0 <= lookahead <= horizon <= 1024 (L batches are moved in ahead of the training batch, the ids of H batches ahead guide eviction, so H >= L); the horizon 2 is below the lookahead 3: raise the horizon or lower the lookahead.
"""

from __future__ import annotations

from typing import Optional, Tuple

# ------------------------------------------------------------------ library
#: Scratchpad slots as a fraction of a table group's (or shard's) rows, when neither
#: ``cache_rows`` nor ``CacheParams.load_factor`` says otherwise (TorchRec's UVM default).
LIBRARY_LOAD_FACTOR: float = 0.2
#: L of an engine or a ``ScratchPipeTrainPipeline`` that is given none.
LIBRARY_LOOKAHEAD: int = 1
#: Largest horizon accepted: a pipeline keeps each batch within it (and its distributed ids) alive.
MAX_HORIZON: int = 1024

# ------------------------------------------------------------------ tools
LOAD_FACTOR: float = 0.1
LOOKAHEAD: int = 4
HORIZON: int = 64
#: ScratchPipe lookaheads the A/B comparison runs side by side.
AB_LOOKAHEADS: Tuple[int, ...] = (1, 4)
OPTIMIZER: str = "rowwise_adagrad"
LEARNING_RATE: float = 0.05
TABLES: int = 8
ROWS: int = 50_000
DIM: int = 32
POOLING: int = 2
BATCH_SIZE: int = 1024
SEED: int = 0
THREADS: int = 1

# ------------------------------------------------------------------ simulator and advisor
SIM_TABLE_SIZES: Tuple[int, ...] = (100_000,) * 26
SIM_BATCH_SIZE: int = 4096
SIM_STEPS: int = 100
GOALS_STEPS: int = 200
SIM_WAYS: int = 32
SIM_MRC_OUT: str = "out/sim/mrc.json"


def check_window(lookahead: int, horizon: Optional[int] = None) -> int:
    """Validate a window and return its horizon (``horizon``, or L when None).

    Args:
        lookahead: L, batches planned and moved in ahead of the training batch.
        horizon: H, batches ahead whose ids guide victim choice (None: L).

    Raises:
        ValueError: unless ``0 <= lookahead <= horizon <= MAX_HORIZON`` (integers).
    """
    h = lookahead if horizon is None else horizon
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (lookahead, h))
    if ok and 0 <= lookahead <= h <= MAX_HORIZON:
        return h
    if not ok:
        fix = "give both as integers."
    elif lookahead < 0:
        fix = f"the lookahead {lookahead} is negative: use 0 or more."
    elif h < lookahead:
        fix = f"the horizon {h} is below the lookahead {lookahead}: raise the horizon or lower the lookahead."
    elif horizon is None:
        fix = f"the lookahead {lookahead} (the horizon too, when none is given) is too high: use {MAX_HORIZON} or less."
    else:
        fix = f"the horizon {h} is too high: use {MAX_HORIZON} or less."
    raise ValueError(
        f"invalid window lookahead={lookahead!r}, horizon={horizon!r}: need 0 <= lookahead <= "
        f"horizon <= {MAX_HORIZON} (L batches are moved in ahead of the training batch, the ids "
        f"of H batches ahead guide eviction, so H >= L); {fix}"
    )


def horizon_for(lookahead: int, horizon: Optional[int] = None) -> int:
    """The horizon a tool uses: ``horizon`` if given, else ``HORIZON`` (never below L).

    Args:
        lookahead: ScratchPipe's L.
        horizon: an explicit H, or None for the default.
    """
    if horizon is not None:
        return horizon
    return max(HORIZON, lookahead)
