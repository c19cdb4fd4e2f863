"""Mutation testing of torchrec_scratchpipe/core/ and distributed/ with cosmic-ray, module by module.

``scripts/mutation.sh`` installs cosmic-ray and calls this. For each module it copies the
working tree into ``out/mutation/work-<module>`` (cosmic-ray edits the file it mutates in place),
runs the module's tests from ``map.toml`` once unmutated (the baseline, which also sets the
per-mutant timeout), lets cosmic-ray apply the operators of ``operators.toml`` one at a time
and run those tests (``pytest -x``: the first failure kills the mutant), then classifies
every result. Survivors listed in ``equivalent.toml`` (same module, operator and source line)
count as equivalent, with the reason given there.

Writes ``out/mutation/<module>.json`` per module and rebuilds from all of them
``out/mutation/summary.json``: per module and per package, killed, survived, equivalent,
timeouts (counted as killed), errors, seconds, and the survivors with their lines.

Usage (see ``scripts/mutation.sh``)::

    python scripts/mutation/run.py [--list | --count | --retest] [--max-mutants N] [MODULE ...]

MODULE: ``core/plan.py`` (``torchrec_scratchpipe/`` prefix optional), or ``core`` /
``distributed`` for every module of the package; none: every module in the map.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    import tomllib as _toml_reader  # Python >= 3.11

    def _load_toml(path: Path) -> Dict[str, Any]:
        return _toml_reader.loads(path.read_text())
except ModuleNotFoundError:  # Python 3.10: the ``toml`` package cosmic-ray depends on
    import toml as _toml_reader  # type: ignore[no-redef]

    def _load_toml(path: Path) -> Dict[str, Any]:
        return _toml_reader.loads(path.read_text())


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PACKAGE = "torchrec_scratchpipe"
PACKAGES = ("core", "distributed")
OUT = ROOT / "out" / "mutation"


def load_map() -> Dict[str, Dict[str, Any]]:
    """``map.toml``'s modules, each with the defaults filled in."""
    doc = _load_toml(HERE / "map.toml")
    defaults = doc.get("defaults", {})
    return {name: {**defaults, **entry} for name, entry in doc["modules"].items()}


def package_modules() -> List[str]:
    """Every module of core/ and distributed/, relative to the package."""
    return sorted(str(p.relative_to(ROOT / PACKAGE)) for pkg in PACKAGES for p in (ROOT / PACKAGE / pkg).glob("*.py"))


def resolve(names: List[str], modmap: Dict[str, Dict[str, Any]]) -> List[str]:
    """The modules the command line names (all mapped modules when none)."""
    missing = [m for m in package_modules() if m not in modmap]
    if missing:
        raise SystemExit(f"scripts/mutation/map.toml has no entry for {missing}: add the tests that cover them.")
    if not names:
        return [m for m in package_modules()]
    out: List[str] = []
    for name in names:
        name = name.removeprefix(f"{PACKAGE}/").rstrip("/")
        if name in PACKAGES:
            out += [m for m in package_modules() if m.startswith(name + "/")]
        elif name in modmap:
            out.append(name)
        else:
            raise SystemExit(f"unknown module {name!r}: use e.g. core/plan.py or core (see --list).")
    return out


def copy_tree(work: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) into ``work``."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            dst = work / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def test_command(module: str, entry: Dict[str, Any], work: Path) -> str:
    """The shell command cosmic-ray runs for each mutant of ``module`` (in ``work``)."""
    tests = list(entry["tests"]) + [f"{PACKAGE}/{module}"]  # the module's doctests too
    env = f"env PYTHONPATH={shlex.quote(str(work))} SCRATCHPIPE_NATIVE={entry['native']} OMP_NUM_THREADS=1"
    args = " ".join(shlex.quote(t) for t in tests)
    return f"{env} {shlex.quote(sys.executable)} -m pytest -x -q -p no:cacheprovider {args}"


def keep_pattern() -> str:
    """An ``exclude-operators`` regex that skips every operator not in ``operators.toml``."""
    keep = _load_toml(HERE / "operators.toml")["keep"]
    return "(?!core/(" + "|".join(re.escape(k) for k in keep) + ")$)"


def write_config(path: Path, module: str, command: str, timeout: float) -> None:
    path.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(f'{PACKAGE}/{module}')}\n"
        f"timeout = {timeout:.1f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = [{json.dumps(keep_pattern())}]\n"
    )


def cosmic(*args: str, cwd: Path) -> str:
    """Run a cosmic-ray command (the tool lives in ``.mutation-tool``, see mutation.sh)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.environ.get("SP_MUTATION_TOOL", str(ROOT / ".mutation-tool"))
    res = subprocess.run([sys.executable, "-m", "cosmic_ray.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cosmic-ray {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def filter_operators(config: Path, session: Path, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.environ.get("SP_MUTATION_TOOL", str(ROOT / ".mutation-tool")))
    code = "from cosmic_ray.tools.filters.operators_filter import main; main()"
    subprocess.run([sys.executable, "-c", code, str(session), str(config)], cwd=cwd, env=env, check=True,
                   capture_output=True)


def skip_beyond(session: Path, limit: int, cwd: Path) -> int:
    """Mark all but the first ``limit`` pending mutants (in source order) skipped; return how many."""
    env = dict(os.environ, PYTHONPATH=os.environ.get("SP_MUTATION_TOOL", str(ROOT / ".mutation-tool")))
    code = (
        "import sys\n"
        "from cosmic_ray.work_db import use_db, WorkDB\n"
        "from cosmic_ray.work_item import WorkResult, WorkerOutcome\n"
        "with use_db(sys.argv[1], WorkDB.Mode.open) as db:\n"
        "    items = sorted(db.pending_work_items, key=lambda w: (tuple(w.mutations[0].start_pos), w.mutations[0].operator_name))\n"
        "    for w in items[int(sys.argv[2]):]:\n"
        "        db.set_result(w.job_id, WorkResult(output='over --max-mutants', worker_outcome=WorkerOutcome.SKIPPED))\n"
        "    print(max(0, len(items) - int(sys.argv[2])))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(session), str(limit)], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True)
    return int(res.stdout.strip() or 0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_equivalents() -> List[Dict[str, Any]]:
    path = HERE / "equivalent.toml"
    return _load_toml(path).get("mutant", []) if path.exists() else []


def classify(module: str, dump: str, source: List[str], equivalents: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts and survivors of one module from ``cosmic-ray dump`` output."""
    counts = dict(killed=0, survived=0, equivalent=0, timeouts=0, errors=0, skipped=0)
    survivors: List[Dict[str, Any]] = []
    equivalent: List[Dict[str, Any]] = []
    errors: List[Dict[str, Any]] = []
    for line in filter(None, dump.splitlines()):
        item, result = json.loads(line)
        m = item["mutations"][0]
        row, col = m["start_pos"]
        text = source[row - 1].strip()
        op = m["operator_name"].removeprefix("core/")
        desc = {"operator": op, "line_no": row, "col": col, "line": text, "function": m.get("definition_name"),
                "job": item["job_id"]}
        if result is None or result["worker_outcome"] == "skipped":
            counts["skipped"] += 1
            continue
        outcome, test = result["worker_outcome"], result.get("test_outcome")
        if outcome != "normal" or test == "incompetent":
            counts["errors"] += 1
            errors.append(dict(desc, outcome=outcome, output=(result.get("output") or "")[-300:]))
        elif test == "killed":
            counts["killed"] += 1
            counts["timeouts"] += "timeout" in (result.get("output") or "").lower()
        else:
            eq = next((e for e in equivalents if e["module"] == module and e["operator"] == op and e["line"] == text
                       and e.get("col", col) == col and e.get("function", desc["function"]) == desc["function"]), None)
            if eq is not None:
                counts["equivalent"] += 1
                equivalent.append(dict(desc, reason=eq["reason"]))
            else:
                counts["survived"] += 1
                survivors.append(desc)
    live = counts["killed"] + counts["survived"]
    return dict(counts, kill_rate=round(counts["killed"] / live, 4) if live else None,
                survivors=sorted(survivors, key=lambda d: d["line_no"]),
                equivalent_mutants=sorted(equivalent, key=lambda d: d["line_no"]), error_mutants=errors)


def count_mutants(module: str) -> int:
    """How many mutants the kept operators make of ``module`` (nothing is run)."""
    work = OUT / "count"
    if not work.exists():
        copy_tree(work)
    config, session = work / "count.toml", work / "count.sqlite"
    write_config(config, module, "true", 1.0)
    if session.exists():
        session.unlink()
    cosmic("init", str(config), str(session), cwd=work)
    filter_operators(config, session, work)
    return sum(1 for line in cosmic("dump", str(session), cwd=work).splitlines() if line and json.loads(line)[1] is None)


def run_module(module: str, entry: Dict[str, Any], max_mutants: Optional[int]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    name = module.replace("/", "__").removesuffix(".py")
    work = OUT / f"work-{name}"  # one copy per module: modules may run side by side
    copy_tree(work)
    config, session = OUT / f"{name}.toml", OUT / f"{name}.sqlite"
    command = test_command(module, entry, work)
    if not entry["tests"]:
        return dict(module=module, tests=[], note="no tests mapped (nothing to mutate)", seconds=0.0)
    b0 = time.perf_counter()
    base = subprocess.run(command, shell=True, cwd=work, capture_output=True, text=True)
    baseline = time.perf_counter() - b0
    if base.returncode != 0:
        raise SystemExit(f"{module}: the unmutated tests fail ({command}):\n{base.stdout[-3000:]}\n{base.stderr[-2000:]}")
    timeout = max(30.0, 3.0 * baseline + 15.0)
    write_config(config, module, command, timeout)
    if session.exists():
        session.unlink()
    cosmic("init", str(config), str(session), cwd=work)
    filter_operators(config, session, work)
    capped = skip_beyond(session, max_mutants, work) if max_mutants is not None else 0
    print(f"[mutation] {module}: baseline {baseline:.1f} s, timeout {timeout:.0f} s; running...", flush=True)
    cosmic("exec", str(config), str(session), cwd=work)
    source = (work / PACKAGE / module).read_text().splitlines()
    res = classify(module, cosmic("dump", str(session), cwd=work), source, load_equivalents())
    res.update(module=module, tests=entry["tests"], native=entry["native"], baseline_s=round(baseline, 1),
               capped=capped, source_sha=_sha(work / PACKAGE / module), seconds=round(time.perf_counter() - t0, 1), command=command.replace(str(work), "<work>"))
    shutil.rmtree(work)
    return res


def collect() -> Dict[str, Dict[str, Any]]:
    """The latest result of every module run so far (``out/mutation/<module>.json``)."""
    out = {}
    for f in sorted(OUT.glob("*__*.json")):
        res = json.loads(f.read_text())
        out[res["module"]] = res
    return out


def retest_module(module: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    """Run the survivors of the module's last run again (not those listed as equivalent), with
    the tests as they are now (after tests were added to kill them); the other results are kept."""
    t0 = time.perf_counter()
    name = module.replace("/", "__").removesuffix(".py")
    prev_path, config, session = OUT / f"{name}.json", OUT / f"{name}.toml", OUT / f"{name}.sqlite"
    if not (prev_path.exists() and session.exists()):
        raise SystemExit(f"{module}: no earlier run to retest (run it first).")
    prev = json.loads(prev_path.read_text())
    work = OUT / f"work-{name}"
    copy_tree(work)
    source = (work / PACKAGE / module).read_text().splitlines()
    if prev.get("source_sha") not in (None, _sha(work / PACKAGE / module)):
        raise SystemExit(f"{module} changed since its run: run it again in full, not --retest.")
    write_config(config, module, test_command(module, entry, work), max(30.0, 3.0 * prev["baseline_s"] + 15.0))
    before = classify(module, cosmic("dump", str(session), cwd=work), source, load_equivalents())
    jobs = [s["job"] for s in before["survivors"]]  # not the known equivalent ones
    with sqlite3.connect(session) as db:
        n = sum(db.execute("DELETE FROM work_results WHERE job_id = ?", (j,)).rowcount for j in jobs)
    print(f"[mutation] {module}: retesting {n} survivors...", flush=True)
    cosmic("exec", str(config), str(session), cwd=work)
    res = classify(module, cosmic("dump", str(session), cwd=work), source, load_equivalents())
    res.update({k: prev[k] for k in ("baseline_s", "capped") if k in prev})
    res.update(module=module, tests=entry["tests"], native=entry["native"], command=test_command(module, entry, work).replace(str(work), "<work>"),
               seconds=round(prev.get("seconds", 0.0) + time.perf_counter() - t0, 1), retested=n, source_sha=_sha(work / PACKAGE / module))
    shutil.rmtree(work)
    return res


def summarize(modules: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    packages: Dict[str, Dict[str, Any]] = {}
    for name, r in sorted(modules.items()):
        pkg = packages.setdefault(name.split("/")[0], dict(modules=0, killed=0, survived=0, equivalent=0, timeouts=0,
                                                          errors=0, seconds=0.0))
        pkg["modules"] += 1
        for k in ("killed", "survived", "equivalent", "timeouts", "errors"):
            pkg[k] += r.get(k, 0)
        pkg["seconds"] = round(pkg["seconds"] + r.get("seconds", 0.0), 1)
    for pkg in packages.values():
        live = pkg["killed"] + pkg["survived"]
        pkg["kill_rate"] = round(pkg["killed"] / live, 4) if live else None
    return dict(tool="cosmic-ray 8.7.0", packages=packages, modules=modules)


def markdown(summary: Dict[str, Any]) -> str:
    """The per-module and per-package tables of docs/benchmarks.md, and the survivors."""
    rate = lambda r: "-" if r.get("kill_rate") is None else f"{100 * r['kill_rate']:.1f}%"  # noqa: E731
    lines = ["| module | mutants run | killed | survived | equivalent | errors | kill rate (non-equivalent) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(summary["modules"].items()):
        run = r.get("killed", 0) + r.get("survived", 0) + r.get("equivalent", 0) + r.get("errors", 0)
        lines.append(f"| `{name}` | {run} | {r.get('killed', 0)} | {r.get('survived', 0)} | {r.get('equivalent', 0)} "
                     f"| {r.get('errors', 0)} | {rate(r)} | {r.get('seconds', 0):.0f} |")
    lines += ["", "| package | modules run | killed | survived | equivalent | kill rate (non-equivalent) |", "|---|---|---|---|---|---|"]
    for name, p in sorted(summary["packages"].items()):
        lines.append(f"| `{name}/` | {p['modules']} | {p['killed']} | {p['survived']} | {p['equivalent']} | {rate(p)} |")
    surv = [(n, s) for n, r in sorted(summary["modules"].items()) for s in r.get("survivors", [])]
    if surv:
        lines += ["", "Survivors:", ""]
        lines += [f"- `{n}` line {s['line_no']}, {s['operator']}: `{s['line']}`" for n, s in surv]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*")
    ap.add_argument("--list", action="store_true", help="print the module -> tests map and stop")
    ap.add_argument("--retest", action="store_true", help="rerun only the survivors of each module's last run")
    ap.add_argument("--reclassify", action="store_true", help="classify each module's last results again with equivalent.toml as it is now")
    ap.add_argument("--markdown", action="store_true", help="print summary.json as docs/benchmarks.md's tables and stop")
    ap.add_argument("--count", action="store_true", help="count each module's mutants (no tests run) and stop")
    ap.add_argument("--max-mutants", type=int, default=None, help="run at most N mutants per module (the rest are skipped, and reported)")
    args = ap.parse_args()
    modmap = load_map()
    todo = resolve(args.modules, modmap)
    if args.list:
        for m in todo:
            print(f"{m}: {' '.join(modmap[m]['tests']) or '(none)'}")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if args.reclassify:
        for m in todo:
            name = m.replace("/", "__").removesuffix(".py")
            path, session = OUT / f"{name}.json", OUT / f"{name}.sqlite"
            if not (path.exists() and session.exists()):
                continue
            prev = json.loads(path.read_text())
            if prev.get("source_sha") not in (None, _sha(ROOT / PACKAGE / m)):
                raise SystemExit(f"{m} changed since its run: run it again.")
            source = (ROOT / PACKAGE / m).read_text().splitlines()
            prev.update(classify(m, cosmic("dump", str(session), cwd=OUT), source, load_equivalents()))
            path.write_text(json.dumps(prev, indent=1))
        (OUT / "summary.json").write_text(json.dumps(summarize(collect()), indent=1))
        return
    if args.markdown:
        print(markdown(summarize(collect())))
        return
    if args.count:
        for m in todo:
            print(f"{m}: {count_mutants(m)} mutants")
        return
    summary_path = OUT / "summary.json"
    for module in todo:
        res = (retest_module if args.retest else run_module)(module, modmap[module], *([] if args.retest else [args.max_mutants]))
        (OUT / f"{module.replace('/', '__').removesuffix('.py')}.json").write_text(json.dumps(res, indent=1))
        done = collect()  # every module's latest result (runs of other modules included)
        summary_path.write_text(json.dumps(summarize(done), indent=1))
        print(f"[mutation] {module}: killed {res.get('killed', 0)}, survived {res.get('survived', 0)}, "
              f"equivalent {res.get('equivalent', 0)}, errors {res.get('errors', 0)} in {res['seconds']} s", flush=True)
        for s in res.get("survivors", []):
            print(f"    survived {s['operator']} at line {s['line_no']}: {s['line']}")
    print(json.dumps(summarize(collect())["packages"], indent=1))
    print(f"[mutation] summary: {summary_path}")


if __name__ == "__main__":
    main()
