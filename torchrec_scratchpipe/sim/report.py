"""Readable tables and JSON for simulation results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from torchrec_scratchpipe.sim.mrc import MissRatioCurve
from torchrec_scratchpipe.sim.result import SimResult
from torchrec_scratchpipe.sim.stream import BatchStream


def parse_capacity(text: Union[str, float, int], num_rows: int) -> int:
    """Rows from ``"130000"``, a fraction ``"0.05"`` / ``0.05`` or a percentage ``"5%"``.

    Example::

        >>> parse_capacity("0.05", 1000), parse_capacity("5%", 1000), parse_capacity("64", 1000)
        (50, 50, 64)
    """
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"expected cache rows (like 130000), a fraction (0.05) or a percentage (5%), got {text!r}")
    if not s.endswith("%") and (value > 1.0 or (value == 1.0 and "." not in s)):
        if value != int(value):
            raise ValueError(f"a capacity above 1 counts rows and must be a whole number, got {text!r}")
        return int(value)
    frac = value
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"capacity fraction must be in (0, 1], got {text!r}")
    return max(1, int(round(frac * num_rows)))


def stream_summary(stream: BatchStream) -> Dict[str, Any]:
    """Facts about a stream for reports."""
    u = stream.unique_per_step()
    return {"name": stream.name, "steps": stream.num_steps, "tables": len(stream.table_sizes),
            "num_rows": stream.num_rows, "lookups": stream.lookups, "unique_lookups": int(u.sum()),
            "max_batch_rows": int(u.max()) if u.numel() else 0,
            "mean_batch_rows": float(u.float().mean()) if u.numel() else 0.0}


def format_table(results: Mapping[str, SimResult], stream: BatchStream) -> str:
    """One line per policy: misses, miss ratio, rows per step, evictions, bypassed, speed.

    Example::

        >>> import torch
        >>> s = BatchStream.from_flat([torch.tensor([0, 1])], 2)
        >>> from torchrec_scratchpipe.sim.policies import simulate
        >>> print(format_table({"opt": simulate(s, "opt", 2)}, s).splitlines()[0].split()[:3])
        ['policy', 'capacity', 'misses']
    """
    opt = results.get("opt")
    head = (f"{'policy':<18} {'capacity':>9} {'misses':>11} {'miss%':>7} {'rows/step':>10} {'evictions':>11} "
            f"{'bypassed':>9} {'vs opt':>7} {'sec':>6} {'Mids/s':>7}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        vs = f"{r.total_misses / opt.total_misses:.3f}" if opt is not None and opt.total_misses else "-"
        label = name
        if r.policy == "scratchpipe":
            lru = " lru" if r.extra.get("victim_policy") == "lru" else ""
            label = f"sp L{r.extra['lookahead']} H{r.extra['horizon']}{lru}" if name == "scratchpipe" else name
        lines.append(
            f"{label:<18} {r.capacity:>9} {r.total_misses:>11} {100 * r.miss_ratio:>6.2f}% "
            f"{r.total_misses / max(r.steps, 1):>10.1f} {r.total_evictions:>11} {r.total_bypassed:>9} {vs:>7} "
            f"{r.seconds:>6.2f} {r.lookups_per_second / 1e6:>7.2f}"
        )
    s = stream_summary(stream)
    lines.append(f"stream {s['name']}: {s['steps']} steps, {s['lookups']} ids, {s['unique_lookups']} distinct "
                 f"per-batch rows, {s['num_rows']} rows in {s['tables']} tables, "
                 f"largest batch {s['max_batch_rows']} rows")
    return "\n".join(lines)


def format_curves(curves: Sequence[MissRatioCurve]) -> str:
    """Miss ratio per capacity, one column per policy."""
    if not curves:
        return ""
    caps = curves[0].capacities
    lines = [f"{'capacity':>10} {'load':>7} " + " ".join(f"{c.policy:>16}" for c in curves)]
    for i, cap in enumerate(caps):
        cells = []
        for c in curves:
            cells.append(f"{'infeasible':>16}" if c.misses[i] is None else f"{100 * c.miss_ratio[i]:>15.2f}%")
        lines.append(f"{cap:>10} {cap / curves[0].num_rows:>7.4f} " + " ".join(cells))
    return "\n".join(lines)


def write_json(
    path: Union[str, Path],
    stream: BatchStream,
    results: Mapping[str, SimResult],
    config: Dict[str, Any],
    curves: Optional[Sequence[MissRatioCurve]] = None,
) -> Dict[str, Any]:
    """Write ``{"stream", "config", "policies": {name: {...}}, "mrc"}`` to ``path``."""
    doc: Dict[str, Any] = {
        "stream": stream_summary(stream),
        "config": config,
        "policies": {name: r.to_json() for name, r in results.items()},
    }
    if curves:
        doc["mrc"] = {c.policy: c.to_json() for c in curves}
    Path(path).write_text(json.dumps(doc, indent=1))
    return doc
