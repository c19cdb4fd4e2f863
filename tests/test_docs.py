"""Every ```python block of README.md and docs/*.md runs as written, on CPU.

Convention (shared by everyone who writes docs): the ```python blocks of one file run in
order, in one fresh interpreter, in an empty working folder, with this repository on the
import path; a block whose first line is ``# skip-test: <reason>`` is left out (e.g. it
needs CUDA or several processes). Shell commands go in ```bash blocks. New files and new
blocks are picked up without touching this test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
_SKIP = re.compile(r"^\s*# skip-test:\s*(\S.*)$")


def python_blocks(text: str) -> List[Tuple[int, str, str]]:
    """``(line, code, skip_reason)`` of each ```python block (reason "" when it runs)."""
    out = []
    for m in _BLOCK.finditer(text):
        code = m.group(1)
        first = code.lstrip("\n").split("\n", 1)[0]
        skip = _SKIP.match(first)
        out.append((text.count("\n", 0, m.start()) + 2, code, skip.group(1) if skip else ""))
    return out


def _script(path: Path) -> Tuple[str, int]:
    """One program of the file's runnable blocks, each compiled under its file:line name."""
    parts, runs = [], 0
    for line, code, skip in python_blocks(path.read_text()):
        if skip:
            continue
        runs += 1
        name = f"{path.relative_to(ROOT)}:{line}"
        parts.append(f"exec(compile({code!r}, {name!r}, 'exec'), globals())")
    return "\n".join(parts), runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_block_parser_sees_skips_and_fences() -> None:
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\n# skip-test: needs CUDA\nb\n```\n"
    blocks = python_blocks(text)
    assert [(code, skip) for _, code, skip in blocks] == [("a = 1\n", ""), ("# skip-test: needs CUDA\nb\n", "needs CUDA")]
    assert blocks[0][0] == 3  # the first code line


@pytest.mark.parametrize("path", [p for p in DOC_FILES if "```python" in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_python_blocks_run(path: Path, tmp_path: Path) -> None:
    script, runs = _script(path)
    if not runs:
        pytest.skip(f"every python block of {path.name} is marked skip-test")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"{path.name}: a python block failed:\n{proc.stderr[-4000:]}"
