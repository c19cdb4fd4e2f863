"""Cache simulator: replay an id stream through ScratchPipe and the caches it replaces.

Policies (see :mod:`torchrec_scratchpipe.sim.policies`): fully associative LRU, FBGEMM-style
set-associative LRU / LFU with and without one-batch prefetch + locking, Belady's optimum,
and ScratchPipe itself (the engine's planner code). Inputs: the synthetic generator,
FBGEMM request-trace files, Criteo TSV. Also miss-ratio curves over capacity.

Example::

    >>> from torchrec_scratchpipe.sim import SyntheticSpec, synthetic_stream, simulate
    >>> s = synthetic_stream(SyntheticSpec(table_sizes=[1000] * 2, batch_size=64, steps=20))
    >>> simulate(s, "opt", 200).total_misses <= simulate(s, "lru", 200).total_misses
    True
"""

from torchrec_scratchpipe.sim.lru import simulate_lru
from torchrec_scratchpipe.sim.mrc import MissRatioCurve, miss_ratio_curve
from torchrec_scratchpipe.sim.opt import simulate_opt
from torchrec_scratchpipe.sim.policies import ALIASES, POLICIES, PolicyOptions, parse_policies, simulate, simulate_all
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.scratchpipe import simulate_scratchpipe
from torchrec_scratchpipe.sim.setassoc import SetAssocCache, SetAssocConfig, cache_set, simulate_set_assoc
from torchrec_scratchpipe.sim.sources import (
    SyntheticSpec, criteo_stream, load_traces, parse_synthetic, parse_tables, synthetic_stream, trace_to_stream,
)
from torchrec_scratchpipe.sim.stream import BatchStream, next_uses

__all__ = [
    "ALIASES", "POLICIES", "BatchStream", "MissRatioCurve", "PolicyOptions", "SetAssocCache", "SetAssocConfig",
    "SimResult", "SyntheticSpec", "cache_set", "criteo_stream", "load_traces", "miss_ratio_curve", "next_uses",
    "parse_policies", "parse_synthetic", "parse_tables", "simulate", "simulate_all", "simulate_lru",
    "simulate_opt", "simulate_scratchpipe", "simulate_set_assoc", "synthetic_stream", "trace_to_stream",
]
