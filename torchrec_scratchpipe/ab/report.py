"""Turn A/B arm results into a Markdown table, a JSON file and PNG plots."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchrec_scratchpipe.ab.arms import ArmResult  # noqa: E402


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(arm: ArmResult, batch_size: int, baseline: Optional[ArmResult]) -> Dict[str, Any]:
    """One row of the report: throughput, breakdown, traffic, memory, agreement."""
    row: Dict[str, Any] = {"arm": arm.label, "simulated": arm.simulated}
    if arm.error is not None:
        return {**row, "error": arm.error}
    if arm.step_s:
        med = statistics.median(arm.step_s)
        row["samples_per_s"] = batch_size / med
        row["samples_per_s_p10"] = batch_size / _pct(arm.step_s, 0.9)
        row["samples_per_s_p90"] = batch_size / _pct(arm.step_s, 0.1)
        row["step_ms"] = med * 1e3
        for part, vals in arm.breakdown_s.items():
            row[f"{part}_ms"] = statistics.median(vals) * 1e3 if vals else 0.0
    row.update(
        lookups=arm.lookups,
        unique_rows=arm.unique_rows,
        misses=arm.misses,
        hit_rate=(1 - arm.misses / arm.unique_rows) if arm.unique_rows else None,
        train_misses=arm.train_misses,
        h2d_rows=sum(arm.h2d_rows),
        d2h_rows=sum(arm.d2h_rows),
        h2d_mb=sum(arm.h2d_bytes) / 2**20,
        d2h_mb=sum(arm.d2h_bytes) / 2**20,
        moved_mb=(sum(arm.h2d_bytes) + sum(arm.d2h_bytes)) / 2**20,
        device_embedding_mb=arm.device_bytes / 2**20,
        peak_device_mb=None if arm.peak_device_bytes is None else arm.peak_device_bytes / 2**20,
    )
    if baseline is not None and arm is not baseline and arm.losses and baseline.losses:
        n = min(len(arm.losses), len(baseline.losses))
        row["max_loss_diff_vs_fused"] = max(abs(a - b) for a, b in zip(arm.losses[:n], baseline.losses[:n]))
        diffs = [float((arm.weights[k] - baseline.weights[k]).abs().max()) for k in baseline.weights if k in arm.weights]
        row["max_weight_diff_vs_fused"] = max(diffs) if diffs else None
    return row


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COLUMNS = [
    ("arm", "arm"), ("samples_per_s", "samples/s"), ("step_ms", "step ms"), ("planner_ms", "planner ms"),
    ("mover_ms", "mover ms"), ("wait_ms", "wait ms"), ("rest_ms", "rest ms"), ("background_ms", "background ms"), ("misses", "rows in (misses)"), ("hit_rate", "hit rate"),
    ("train_misses", "train misses"), ("moved_mb", "bytes moved MB (H2D+D2H)"), ("h2d_mb", "H2D MB"), ("d2h_mb", "D2H MB"),
    ("device_embedding_mb", "device emb. MB"), ("peak_device_mb", "peak device MB"),
    ("max_loss_diff_vs_fused", "max |Δloss| vs fused"), ("max_weight_diff_vs_fused", "max |Δw| vs fused"),
]




def headline(rows: List[Dict[str, Any]], on_cpu: bool) -> List[str]:
    """The report's opening: rows and bytes against the UVM arm, exactness, what timings mean."""
    ran = [r for r in rows if not r.get("error")]
    uvm = next((r for r in ran if r["arm"].startswith("fused_uvm_caching")), None)
    sp = [r for r in ran if r["arm"].startswith("scratchpipe")]
    lines = []
    if uvm is not None and sp and uvm["h2d_rows"]:
        best = min(sp, key=lambda r: r["h2d_rows"])
        fewer = 1 - best["h2d_rows"] / uvm["h2d_rows"]
        bytes_fewer = 1 - best["moved_mb"] / uvm["moved_mb"] if uvm["moved_mb"] else 0.0
        lines.append(
            f"**{best['arm']} moved {100 * fewer:.1f}% {'fewer' if fewer >= 0 else 'MORE'} rows into the device "
            f"than {uvm['arm']} ({best['h2d_rows']:,} vs {uvm['h2d_rows']:,}) and "
            f"{100 * abs(bytes_fewer):.1f}% {'fewer' if bytes_fewer >= 0 else 'more'} bytes both ways "
            f"({best['moved_mb']:,.1f} vs {uvm['moved_mb']:,.1f} MB, ScratchPipe rows carry their optimizer state), "
            f"at the same device budget.**"
        )
    checked = [r for r in sp if r.get("max_weight_diff_vs_fused") is not None]
    if checked:
        dw = max(r["max_weight_diff_vs_fused"] for r in checked)
        dl = max(r["max_loss_diff_vs_fused"] for r in checked)
        misses = sum(r["train_misses"] for r in checked)
        if dw == 0 and dl == 0 and misses == 0:
            lines.append("Every ScratchPipe arm is bitwise equal to `fused` (max |Δw| 0, max |Δloss| 0) "
                         "with 0 train-time misses.")
        else:
            lines.append(f"ScratchPipe arms DIFFER from `fused`, which they must equal bit for bit: max |Δw| "
                         f"{dw:.3g}, max |Δloss| {dl:.3g}, {misses} train-time misses.")
    if on_cpu:
        lines.append("Timings are from this CPU and are no GPU forecast: here the \"device\" is host memory, so "
                     "moving a row is a memcpy and the planner competes with training for the same cores.")
    return lines


def markdown(rows: List[Dict[str, Any]], header: str, opening: Sequence[str] = (),
             notes: Sequence[str] = ()) -> str:
    """The comparison as a Markdown table with a short preamble."""
    lines = [header, ""]
    if opening:
        lines += [" ".join(opening), ""]
    lines += ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['arm']} | failed (see Problems found) |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            if key == "samples_per_s" and v is not None:
                cells.append(f"{v:,.0f} ({r['samples_per_s_p10']:,.0f}–{r['samples_per_s_p90']:,.0f})")
            elif key == "hit_rate" and v is not None:
                cells.append(f"{100 * v:.1f}%")
            else:
                cells.append(_fmt(v, 2 if key.endswith("_ms") else 1))
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["simulated"] for r in rows):
        lines += ["", "Rows marked simulated were not trained: FBGEMM's UVM cache needs CUDA, so the "
                  "simulator replayed the same id stream through an FBGEMM-style 32-way LRU cache with "
                  "one-batch prefetch at the same device budget. They report traffic only."]
    lines += ["", "samples/s: median after warm-up, (p10–p90). planner, mover, wait and rest ms split the "
              "step on the training thread (wait: for the background planner); rest = dense + embedding "
              "compute + input dist. background ms: planning and moving done next to training (CPU). "
              "device emb. MB: embedding state resident on the device (analytic). bytes moved: host<->device "
              "traffic of the embedding rows, each row priced by its table's row layout (weights in the table's "
              "dtype; ScratchPipe rows also carry their optimizer state, FBGEMM's UVM cache moves weights only)."]
    if notes:
        lines += ["", "Problems found:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plots(arms: List[ArmResult], rows: List[Dict[str, Any]], out: Path, on_cpu: bool = False) -> List[Path]:
    """throughput.png (bars with p10–p90) and traffic.png (rows host->device, cumulative)."""
    paths = []
    timed = [r for r in rows if "samples_per_s" in r]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        med = [r["samples_per_s"] for r in timed]
        err = [[m - r["samples_per_s_p10"] for m, r in zip(med, timed)], [r["samples_per_s_p90"] - m for m, r in zip(med, timed)]]
        ax.bar(range(len(timed)), med, yerr=err, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(timed)), [r["arm"] for r in timed], rotation=15, ha="right")
        ax.set_ylabel("samples / s (median, p10–p90)")
        simulated = [r["arm"] for r in rows if r["simulated"]]
        notes = ([f"{', '.join(simulated)}: traffic only, not timed"] if simulated else []) + (
            ["CPU timings: no GPU forecast"] if on_cpu else [])
        ax.set_title("Throughput per arm" + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=10)
        fig.tight_layout()
        paths.append(out / "throughput.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for arm in arms:
        if arm.h2d_rows and (sum(arm.h2d_rows) or arm.label != "fused"):
            ax.plot(list(itertools.accumulate(arm.h2d_rows)), label=arm.label, linestyle="--" if arm.simulated else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("rows host → device (cumulative)")
    ax.set_title("Rows moved into the device")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "traffic.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(arms: List[ArmResult], batch_size: int, out: Path, header: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``report.md``, ``report.json`` and the plots into ``out``; return the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    baseline = next((a for a in arms if a.label == "fused"), None)
    rows = [summarize(a, batch_size, baseline) for a in arms]
    opening = headline(rows, meta.get("device_name") == "cpu")
    notes = [f"{a.label} failed: {a.error}" for a in arms if a.error is not None] + [n for a in arms for n in a.notes]
    (out / "report.md").write_text(markdown(rows, header, opening, notes))
    data = {"meta": meta, "headline": opening, "notes": notes, "arms": rows, "per_step": {a.label: {"h2d_rows": a.h2d_rows, "d2h_rows": a.d2h_rows, "h2d_bytes": a.h2d_bytes, "d2h_bytes": a.d2h_bytes, "loss": a.losses, "step_s": a.step_s} for a in arms}}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    data["plots"] = [str(p) for p in plots(arms, rows, out, meta.get("device_name") == "cpu")]
    return data
