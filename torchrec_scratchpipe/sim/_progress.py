"""Step iteration with an optional tqdm bar (shown only on long runs)."""

from __future__ import annotations

from typing import Iterable

from tqdm import tqdm


def steps(n: int, desc: str, progress: bool) -> Iterable[int]:
    """``range(n)``, wrapped in a tqdm bar when ``progress`` is true.

    Example::

        >>> list(steps(3, "x", False))
        [0, 1, 2]
    """
    if not progress:
        return range(n)
    return tqdm(range(n), desc=desc, unit="step", leave=False, mininterval=0.5)
