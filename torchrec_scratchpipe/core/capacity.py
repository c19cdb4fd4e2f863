"""The load factor, stated once: its check, its default, and rows -> slots and back.

A scratchpad holds ``load_factor x rows`` slots of its table group (the knob TorchRec's
``CacheParams.load_factor`` gives ``fused_uvm_caching``). Every reader (engine config, plan
entries, estimators, the A/B tool, the advisor) goes through these functions.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torchrec_scratchpipe.defaults import LIBRARY_LOAD_FACTOR


def check_load_factor(value: Any, what: str = "load_factor") -> float:
    """``value`` as a float if it is a finite fraction in (0, 1], else a ValueError naming ``what``.

    Example::

        >>> check_load_factor(0.25), check_load_factor(1)
        (0.25, 1.0)
        >>> check_load_factor(float("inf"), "CacheParams.load_factor")
        Traceback (most recent call last):
        ...
        ValueError: CacheParams.load_factor must be a fraction of the table's rows in (0, 1], got inf.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1
    if not ok:
        raise ValueError(f"{what} must be a fraction of the table's rows in (0, 1], got {value!r}.")
    return float(value)


def resolve_load_factor(value: Optional[float], what: str = "load_factor") -> float:
    """The checked load factor, or the library default (``defaults.LIBRARY_LOAD_FACTOR``) for None."""
    return LIBRARY_LOAD_FACTOR if value is None else check_load_factor(value, what)


def slots_for_rows(rows: int, load_factor: float) -> int:
    """Scratchpad slots for ``rows`` rows: ``ceil(load_factor x rows)``, at least 1, at most ``rows``.

    Example::

        >>> slots_for_rows(1000, 0.05), slots_for_rows(7, 0.01)
        (50, 1)
    """
    return max(1, min(rows, math.ceil(load_factor * rows)))


def load_factor_for(slots: int, rows: int, digits: int = 6) -> float:
    """The smallest ``digits``-decimal load factor whose slots (``slots_for_rows``) are >= ``slots``.

    Example::

        >>> load_factor_for(3, 7)
        0.428572
        >>> slots_for_rows(7, load_factor_for(3, 7)) >= 3
        True
    """
    scale = float(10**digits)
    return min(math.ceil(slots / rows * scale) / scale, 1.0)
