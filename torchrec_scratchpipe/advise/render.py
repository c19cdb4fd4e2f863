"""Advice as text: a table for people and ready-to-paste ``ParameterConstraints``."""

from __future__ import annotations

from typing import List, Sequence

from torchrec_scratchpipe.advise.search import TableAdvice, Target
from torchrec_scratchpipe.advise.working_set import WorkingSet


def format_advice(advice: Sequence[TableAdvice], target: Target, group: WorkingSet) -> str:
    """One line per table: rows, minimum scratchpad for L, recommended load factor, traffic.

    Example::

        >>> format_advice([], Target("miss_ratio", 0.1), WorkingSet(2, [], 0, [])).splitlines()[0].split()[:2]
        ['table', 'rows']
    """
    head = (f"{'table':<16} {'rows':>10} {'lookups':>9} {'max batch':>9} {'min slots':>10} {'min lf':>9} "
            f"{'slots':>10} {'load_factor':>11} {'rows/step':>10} {'miss%':>7}")
    lines = [head, "-" * len(head)]
    for a in advice:
        flag = "" if a.reached else "  (target not reached even at load_factor 1.0)"
        lines.append(f"{a.name:<16} {a.num_rows:>10} {a.expected_lookups:>9.1f} {a.max_batch:>9} "
                     f"{a.min_scratchpad:>10} {a.min_load_factor:>9.5f} {a.capacity:>10} {a.load_factor:>11.6f} "
                     f"{a.rows_per_step:>10.1f} {100 * a.miss_ratio:>6.2f}%{flag}")
    lines.append(f"target: {target.kind} <= {target.value} per table; lookahead L={group.lookahead}: all tables in "
                 f"one scratchpad need at least {group.group} slots")
    return "\n".join(lines)


def constraints_text(advice: Sequence[TableAdvice], lookahead: int, horizon: int, kernel: str = "scratchpipe") -> str:
    """Python source of a ``constraints`` dict for ``EmbeddingShardingPlanner``.

    Keys are the table names of the stream (rename them to your tables' names).

    Example::

        >>> print(constraints_text([], 1, 8).splitlines()[0])
        from torchrec.distributed.planner.types import ParameterConstraints
    """
    lines: List[str] = [
        "from torchrec.distributed.planner.types import ParameterConstraints",
        "from torchrec.distributed.types import CacheParams",
        "",
        f"# ScratchPipe lookahead={lookahead}, horizon={horizon}; measured by torchrec_scratchpipe.advise",
        "constraints = {",
    ]
    for a in advice:
        lines.append(
            f"    {a.name!r}: ParameterConstraints(compute_kernels=[{kernel!r}], "
            f"cache_params=CacheParams(load_factor={a.load_factor!r})),  "
            f"# {a.rows_per_step:.1f} rows/step, miss {100 * a.miss_ratio:.2f}%, min {a.min_load_factor:.6f}"
        )
    lines.append("}")
    return "\n".join(lines)
