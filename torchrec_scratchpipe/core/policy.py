"""Victim policies: which unheld slot gives way to a missing row.

A policy is named by :class:`VictimPolicy` (a ``str`` enum, so ``"future"`` and
``"lru"`` keep working wherever a policy is accepted) and acts through its
:class:`VictimStrategy`, which the planner and the window consult instead of comparing
names:

- ``FUTURE`` (ScratchPipe's): among unheld slots, those whose rows no batch within the
  horizon needs go first, least recently used first; then the rest by farthest next use
  within the horizon, least recently used first among equals. It needs next uses.
- ``LRU``: unheld slots by least recent use only (next uses are never tracked).

Example::

    >>> VictimPolicy.parse("lru") is VictimPolicy.LRU, VictimPolicy.FUTURE == "future"
    (True, True)
    >>> VictimPolicy.parse("future").strategy.ranks_by_next_use
    True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, TypeVar, Union

T = TypeVar("T")


@dataclass(frozen=True)
class VictimStrategy:
    """How a policy chooses victims, as the planner and the window need to know it.

    Args:
        ranks_by_next_use: candidates needed within the horizon are ranked by next use
            (the window tracks next uses and hands them to the planner); otherwise the
            recency order alone decides.
    """

    ranks_by_next_use: bool

    def next_use_for(self, next_use: Optional[T]) -> Optional[T]:
        """What the planner ranks by: ``next_use`` if this strategy looks at it, else None."""
        return next_use if self.ranks_by_next_use else None


class VictimPolicy(str, enum.Enum):
    """The planner's victim policy (``str``-valued: ``VictimPolicy.LRU == "lru"``)."""

    FUTURE = "future"
    LRU = "lru"

    @classmethod
    def parse(cls, value: Union[str, "VictimPolicy"], what: str = "victim policy") -> "VictimPolicy":
        """The policy named ``value``.

        Args:
            value: a policy or its name.
            what: how the error message names the setting.

        Raises:
            ValueError: ``value`` names no policy (the message lists the choices).
        """
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"{what} must be one of {choices}, got {value!r}.") from None

    @property
    def strategy(self) -> VictimStrategy:
        """How this policy chooses victims."""
        return _STRATEGIES[self]

    def __str__(self) -> str:
        return self.value


_STRATEGIES = {
    VictimPolicy.FUTURE: VictimStrategy(ranks_by_next_use=True),
    VictimPolicy.LRU: VictimStrategy(ranks_by_next_use=False),
}
