"""Every tool turns a user error into one line naming the flag or file, and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, List

import pytest

from torchrec_scratchpipe.ab.__main__ import build_parser as ab_parser
from torchrec_scratchpipe.ab.__main__ import main as ab_main
from torchrec_scratchpipe.ab.__main__ import parse_args as ab_args
from torchrec_scratchpipe.ab.__main__ import run_ab
from torchrec_scratchpipe.advise.__main__ import main as advise_main
from torchrec_scratchpipe.bench.engine import main as bench_main
from torchrec_scratchpipe.cli import user_errors
from torchrec_scratchpipe.sim.__main__ import build_parser as sim_parser
from torchrec_scratchpipe.sim.__main__ import main as sim_main

ROOT = Path(__file__).resolve().parent.parent
WARNING_LINE = re.compile(r"warn|deprecat|^W\d{4} ", re.IGNORECASE)


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_line(main: Callable[[List[str]], object], argv: List[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``main(argv)``; it must exit 2 with its last stderr line ``PROG: error: ...``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def _criteo_file(path: Path, lines: int) -> Path:
    row = "1\t3" + "\t" * 12 + "\t" + "\t".join(["ff"] * 26) + "\n"
    path.write_text(row * lines)
    return path


@pytest.mark.parametrize("argv,needle", [
    (["--load-factor", "-0.1"], "argument --load-factor: must be in (0, 1]"),
    (["--load-factor", "inf"], "argument --load-factor: expected a finite number"),
    (["--arms", "fused,uvm"], "argument --arms: unknown 'uvm'"),
    (["--lookaheads", "1,x"], "argument --lookaheads: expected a comma list of integers"),
    (["--steps", "0"], "argument --steps: must be >= 1"),
    (["--data", "trace:missing.pt.gz"], "argument --data: missing.pt.gz: no such file"),
    (["--data", "parquet:x"], "argument --data: expected synthetic, trace:FILE or criteo:FILE"),
    (["--horizon", "2000"], "the horizon 2000 is too high: use 1024 or less"),
    (["--lookaheads", "8", "--horizon", "4"], "--lookaheads 8 with --horizon 4"),
    (["--dim", "6"], "--dim: embedding_dim must be a positive multiple of 4"),
])
def test_ab_flag_errors(argv: List[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    line = _error_line(ab_main, argv, capsys)
    assert line.startswith("python -m torchrec_scratchpipe.ab: error: ") and needle in line, line
    assert "raise the horizon" not in line or "below the lookahead" in line  # says which bound is broken


def test_ab_data_file_too_short_for_warmup(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _criteo_file(tmp_path / "day.tsv", 40)
    line = _error_line(ab_main, ["--data", f"criteo:{path}", "--batch-size", "16", "--warmup", "10",
                                 "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"], capsys)
    assert "2 batches of 16, not more than --warmup 10: lower --warmup" in line, line


def test_ab_reports_the_arms_that_ran_and_the_load_factor_that_fits(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    small = ["--tables", "2", "--rows", "2000", "--dim", "8", "--batch-size", "64", "--steps", "3", "--warmup", "1",
             "--arms", "fused,scratchpipe", "--lookaheads", "1", "--no-progress", "--device", "cpu"]
    line = _error_line(ab_main, small + ["--load-factor", "0.01", "--out", str(tmp_path / "a")], capsys)
    assert "1 of 2 arms failed" in line and "cache_rows" not in line
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    rows = {r["arm"]: r for r in report["arms"]}
    assert rows["fused"]["samples_per_s"] > 0  # the arm that ran is reported with its numbers
    error = rows["scratchpipe L=1 H=64"]["error"]
    assert "samples_per_s" not in rows["scratchpipe L=1 H=64"]
    fit = re.search(r"use --load-factor ([0-9.]+) or more", error)
    assert fit is not None and "cache_rows" not in error, error
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| scratchpipe L=1 H=64 | failed" in md and f"scratchpipe L=1 H=64 failed: {error}" in md
    # the advice is right: that load factor runs, a hair less does not
    ok = run_ab(ab_args(small + ["--load-factor", fit.group(1), "--out", str(tmp_path / "b")]))
    assert not any(r.get("error") for r in ok["arms"])
    lower = f"{float(fit.group(1)) - 0.0005:.4f}"
    short = run_ab(ab_args(small + ["--load-factor", lower, "--out", str(tmp_path / "c")]))
    assert any(r.get("error") for r in short["arms"])


def test_ab_help_documents_every_option_with_its_default() -> None:
    parser = ab_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default is not None and action.nargs != 0:
            assert "default" in action.help or f"{action.help} (default: " in text, action.option_strings
    assert "(default: 0.1)" in text and "(default: 1,4)" in text


def test_sim_help_shows_defaults() -> None:
    text = " ".join(sim_parser().format_help().split())
    assert "ScratchPipe L (default: 4)" in text
    assert "scratchpipe (default: all of them)" in text and "(default: True)" not in text


@pytest.mark.parametrize("argv,needle", [
    (["--synthetic", "zipf", "--tables", "8by50000", "--capacity", "0.1"],
     "argument --tables: expected COUNTxROWS (like 26x100000)"),
    (["--synthetic", "zipf", "--capacity", "abc"], "argument --capacity: expected cache rows"),
    (["--synthetic", "zipf", "--capacity", "0.1", "--policies", "lru,foo"], "argument --policies: unknown policy 'foo'"),
    (["--synthetic", "zipf:x", "--tables", "2x100", "--capacity", "0.1"], "--synthetic zipf:x: alpha takes a float"),
    (["--trace", "missing.pt", "--capacity", "0.1"], "argument --trace: missing.pt: no such file"),
    (["--synthetic", "zipf", "--capacity", "0.1", "--horizon", "2000"], "the horizon 2000 is too high"),
])
def test_sim_flag_errors(argv: List[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    line = _error_line(sim_main, argv, capsys)
    assert line.startswith("python -m torchrec_scratchpipe.sim: error: ") and needle in line, line


def test_sim_refuses_a_capacity_below_one_batch(capsys: pytest.CaptureFixture) -> None:
    base = ["--synthetic", "zipf:1.05", "--tables", "2x2000", "--steps", "3", "--batch-size", "64", "--capacity", "40"]
    line = _error_line(sim_main, base + ["--policies", "lru,set_lru,scratchpipe"], capsys)
    assert "--capacity 40 rows cannot hold one batch for lru, scratchpipe" in line, line
    need = int(re.search(r"raise --capacity to at least (\d+)", line).group(1))  # type: ignore[union-attr]
    assert sim_main(base[:-1] + [str(need), "--policies", "lru,scratchpipe"]) == 0  # and that is enough
    assert sim_main(base + ["--policies", "set_lru"]) == 0  # set-associative caches bypass: they run


def test_advise_and_bench_flag_errors(capsys: pytest.CaptureFixture) -> None:
    stream = ["--synthetic", "zipf", "--tables", "2x2000", "--steps", "8", "--batch-size", "32"]
    line = _error_line(advise_main, stream + ["--target-miss-ratio", "2"], capsys)
    assert "argument --target-miss-ratio: must be in (0, 1]" in line
    line = _error_line(advise_main, stream + ["--target-miss-ratio", "0.2", "--table-names", "a"], capsys)
    assert "--table-names has 1 names for 2 tables" in line
    line = _error_line(advise_main, stream + ["--target-miss-ratio", "0.2", "--warmup", "8"], capsys)
    assert "--warmup 8 leaves none of the stream's 8 steps" in line
    line = _error_line(bench_main, ["--load-factor", "2"], capsys)
    assert "argument --load-factor" in line
    line = _error_line(bench_main, ["--dim", "6", "--tables", "2", "--rows", "100", "--batch-size", "8",
                                    "--steps", "1", "--warmup", "0"], capsys)
    assert "embedding_dim must be a positive multiple of 4 (FBGEMM TBE rows), got 6" in line


def test_examples_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dlrm, seq = _example("train_dlrm"), _example("train_sequence")
    line = _error_line(dlrm.main, ["--lookahead", "1", "--horizon", "2000"], capsys)
    assert line.startswith("examples/train_dlrm.py: error: ") and "horizon 2000 is too high" in line
    line = _error_line(dlrm.main, ["--data", "trace:missing.pt.gz"], capsys)
    assert "argument --data: missing.pt.gz: no such file" in line
    line = _error_line(seq.main, ["--load-factor", "0"], capsys)
    assert line.startswith("examples/train_sequence.py: error: argument --load-factor")


def test_user_errors_names_the_file_of_an_os_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e, user_errors("tool"):
        open("/nonexistent/file.tsv")
    assert e.value.code == 2
    assert capsys.readouterr().err == "tool: error: /nonexistent/file.tsv: No such file or directory\n"


def test_a_tool_error_prints_no_traceback() -> None:
    """The whole process, as a user runs it: one usage block, one error line, status 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SCRATCHPIPE_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", "torchrec_scratchpipe.sim", "--synthetic", "zipf", "--tables",
                           "2x1000", "--steps", "2", "--batch-size", "64", "--capacity", "8", "--policies", "lru"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--capacity 8 rows cannot hold one batch for lru" in proc.stderr


def test_setup_help_prints_only_its_usage() -> None:
    script = ROOT / "scripts" / "setup.sh"
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    comments = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        comments.append(line[2:] if line.startswith("# ") else line[1:])
    assert proc.stdout.splitlines() == comments and "set -euo" not in proc.stdout


def _quiet_run(args: List[str], tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if WARNING_LINE.search(line))


def test_sequence_example_is_quiet(tmp_path: Path) -> None:
    assert _quiet_run([str(ROOT / "examples" / "train_sequence.py"), "--steps", "3"], tmp_path) == ""


def test_user_guide_plan_example_is_quiet(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "user_guide.md").read_text()
    section = text[text.index("## 2. Choose kernels in a plan"):]
    code = re.search(r"^```python[ \t]*\n(.*?)^```", section, flags=re.S | re.M).group(1)  # type: ignore[union-attr]
    (tmp_path / "plan.py").write_text(code)
    assert _quiet_run([str(tmp_path / "plan.py")], tmp_path) == ""


def test_docs_name_what_the_package_exports() -> None:
    """``tsp.NAME`` in the README and docs (``import torchrec_scratchpipe as tsp``) exists, and
    the README's comment on ``cache_stats`` names real keys."""
    import torchrec_scratchpipe as tsp
    from torchrec_scratchpipe.core.stats import GroupStats

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    names = set(re.findall(r"\btsp\.([A-Za-z_]+)", text))
    assert names and not [n for n in names if not hasattr(tsp, n)], sorted(n for n in names if not hasattr(tsp, n))
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "cache_stats(model)[" in line)
    keys = [k.strip() for k in line.split("#", 1)[1].split(",") if k.strip() != "..."]
    assert keys and set(keys) <= set(GroupStats().as_dict()), keys
