"""The mutation run's configuration (scripts/mutation/) stays in step with the code and tests.

``scripts/mutation.sh`` itself is not run here (it takes minutes to hours, outside CI); this
checks what it reads: every module of core/ and distributed/ maps to tests that exist, and
every known equivalent mutant still points at a line of its module, with a reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "mutation"))
import run as mutation  # noqa: E402  (scripts/mutation/run.py)


def test_every_module_maps_to_existing_tests() -> None:
    modmap = mutation.load_map()
    assert set(mutation.package_modules()) <= set(modmap), "scripts/mutation/map.toml misses modules"
    for module, entry in modmap.items():
        assert (ROOT / "torchrec_scratchpipe" / module).is_file(), f"map.toml names a module that is gone: {module}"
        assert entry["native"] in ("0", "1", "auto"), module
        for test in entry["tests"]:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), f"{module}: no test file {path}"
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), f"{module}: no test {test}"
        if not module.endswith("__init__.py"):
            assert entry["tests"], f"{module} has no tests mapped"


def test_modules_resolve_by_package_and_refuse_unknown_names() -> None:
    modmap = mutation.load_map()
    core = mutation.resolve(["core"], modmap)
    assert "core/plan.py" in core and all(m.startswith("core/") for m in core)
    assert mutation.resolve(["torchrec_scratchpipe/core/plan.py"], modmap) == ["core/plan.py"]
    with pytest.raises(SystemExit, match="unknown module 'core/nothing.py'"):
        mutation.resolve(["core/nothing.py"], modmap)


def test_known_equivalent_mutants_point_at_current_lines() -> None:
    operators = set(mutation._load_toml(ROOT / "scripts" / "mutation" / "operators.toml")["keep"])
    for e in mutation.load_equivalents():
        lines = [line.strip() for line in (ROOT / "torchrec_scratchpipe" / e["module"]).read_text().splitlines()]
        assert e["line"] in lines, f"equivalent.toml: {e['module']} no longer has the line {e['line']!r}"
        assert e["operator"] in operators, e
        assert len(e["reason"]) > 20, e


def test_classify_counts_equivalents_by_module_operator_and_line() -> None:
    source = ["x = a + b", "y = a + b"]
    item = lambda row: {"job_id": f"j{row}", "mutations": [{"operator_name": "core/ReplaceBinaryOperator_Add_Sub", "start_pos": [row, 6],
                                        "definition_name": None}]}  # noqa: E731
    survived = {"worker_outcome": "normal", "test_outcome": "survived", "output": ""}
    killed = {"worker_outcome": "normal", "test_outcome": "killed", "output": ""}
    dump = "\n".join(mutation.json.dumps(x) for x in ([item(1), survived], [item(2), survived], [item(2), killed]))
    eq = [{"module": "core/m.py", "operator": "ReplaceBinaryOperator_Add_Sub", "line": "x = a + b", "reason": "r"}]
    res = mutation.classify("core/m.py", dump, source, eq)
    assert (res["killed"], res["survived"], res["equivalent"]) == (1, 1, 1)
    assert res["survivors"][0]["line_no"] == 2 and res["kill_rate"] == 0.5
