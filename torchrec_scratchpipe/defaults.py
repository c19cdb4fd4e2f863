"""The one set of defaults shared by every tool of this package.

The A/B comparison (``python -m torchrec_scratchpipe.ab``), the cache simulator
(``...sim``), the capacity advisor (``...advise``), ``examples/train_dlrm.py`` and its torchx
component all start from these values, so a number measured with one tool can be
reproduced with another without re-typing flags.

- ``LOAD_FACTOR``: device cache (scratchpad or UVM cache) rows as a fraction of a shard's rows.
- ``LOOKAHEAD`` (L): batches planned and moved in ahead of the training batch.
- ``HORIZON`` (H): batches whose ids guide eviction. A long horizon is what lets ScratchPipe
  beat LRU: with H = L its victim choice *is* LRU among unheld rows.
- ``OPTIMIZER``, ``LEARNING_RATE``: the fused embedding optimizer (row-wise Adagrad, exact
  on CPU and CUDA) and its rate (the dense SGD uses the same rate).
- ``TABLES``, ``ROWS``, ``DIM``, ``POOLING``, ``BATCH_SIZE``: the synthetic model and data.
  At ``BATCH_SIZE x POOLING`` ids per table and batch, ``LOAD_FACTOR x ROWS`` slots hold a
  batch on one or two ranks, table-wise or row-wise, without a capacity warning.

Example:
    >>> from torchrec_scratchpipe import defaults
    >>> defaults.horizon_for(4), defaults.horizon_for(100)
    (64, 100)
"""

from __future__ import annotations

from typing import Optional, Tuple

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


def horizon_for(lookahead: int, horizon: Optional[int] = None) -> int:
    """The horizon a tool uses: ``horizon`` if given, else ``HORIZON`` (never below L).

    Args:
        lookahead: ScratchPipe's L.
        horizon: an explicit H, or None for the default.
    """
    if horizon is not None:
        return horizon
    return max(HORIZON, lookahead)
