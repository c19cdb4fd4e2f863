"""Policy names and one entry point, :func:`simulate`, that runs any of them.

Names: ``lru`` (fully associative), ``set_lru``, ``set_lfu`` (alias ``lfu``),
``set_lru_prefetch``, ``set_lfu_prefetch``, ``opt`` (Belady, the lower bound),
``scratchpipe`` (the engine planner at lookahead L / horizon H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from torchrec_scratchpipe.core.policy import VictimPolicy

from torchrec_scratchpipe.sim.lru import simulate_lru
from torchrec_scratchpipe.sim.opt import simulate_opt
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.scratchpipe import simulate_scratchpipe
from torchrec_scratchpipe.sim.setassoc import SetAssocConfig, simulate_set_assoc
from torchrec_scratchpipe.sim.stream import BatchStream

POLICIES = ("lru", "set_lru", "set_lfu", "set_lru_prefetch", "set_lfu_prefetch", "opt", "scratchpipe")
ALIASES = {"lfu": "set_lfu", "belady": "opt", "sp": "scratchpipe"}


@dataclass
class PolicyOptions:
    """Knobs shared by the policies (each uses the ones that apply to it).

    Args:
        lookahead: ScratchPipe L.
        horizon: ScratchPipe H (>= L).
        ways: set-associative ways (FBGEMM: 32).
        progress: tqdm bars.
        victim_policy: ScratchPipe's victim policy (``VictimPolicy`` or its name; the
            engine's default, ``"future"``, is ScratchPipe's own).
    """

    lookahead: int = 1
    horizon: int = 1
    ways: int = 32
    progress: bool = False
    victim_policy: VictimPolicy = VictimPolicy.FUTURE

    def __post_init__(self) -> None:
        self.victim_policy = VictimPolicy.parse(self.victim_policy, "victim_policy")


def parse_policies(text: str) -> List[str]:
    """Split a comma-separated list and resolve aliases.

    Example::

        >>> parse_policies("lru,lfu,opt")
        ['lru', 'set_lfu', 'opt']
    """
    out = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        name = ALIASES.get(name, name)
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)} (aliases {ALIASES})")
        out.append(name)
    return out


def simulate(stream: BatchStream, policy: str, capacity: int, options: PolicyOptions = PolicyOptions()) -> SimResult:
    """Run one policy on ``stream`` with ``capacity`` cache rows.

    Args:
        stream: the batches.
        policy: a name from :data:`POLICIES` (or an alias).
        capacity: cache slots.
        options: lookahead, horizon, ScratchPipe's victim policy, ways, progress.

    Example::

        >>> import torch
        >>> s = BatchStream.from_flat([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0])], 3)
        >>> simulate(s, "opt", 2).total_misses
        3
        >>> simulate(s, "scratchpipe", 2, PolicyOptions(0, 2, victim_policy="lru")).total_misses
        4
    """
    policy = ALIASES.get(policy, policy)
    o = options
    if policy == "lru":
        return simulate_lru(stream, capacity, o.progress)
    if policy == "opt":
        return simulate_opt(stream, capacity, o.progress)
    if policy == "scratchpipe":
        return simulate_scratchpipe(stream, capacity, o.lookahead, o.horizon, o.victim_policy, progress=o.progress)
    if policy.startswith("set_"):
        parts = policy.split("_")
        cfg = SetAssocConfig(ways=o.ways, algorithm=parts[1], prefetch=parts[-1] == "prefetch")
        if policy in POLICIES:
            return simulate_set_assoc(stream, capacity, cfg, o.progress)
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


def simulate_all(
    stream: BatchStream, policies: Sequence[str], capacity: int, options: PolicyOptions = PolicyOptions()
) -> Dict[str, SimResult]:
    """:func:`simulate` for several policies, keyed by policy name."""
    return {p: simulate(stream, p, capacity, options) for p in policies}
