"""The Python examples in the docs run as written (those that need no GPU or cluster)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
RUNNABLE = ["engine.md"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_examples_run(name: str) -> None:
    text = (DOCS / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{name} has no python example"
    for block in blocks:
        exec(compile(block, f"{name}", "exec"), {"__name__": "__doc_example__"})


def test_integration_guide_example_runs_in_its_own_process() -> None:
    """The TorchRec guide starts its own process group, so it runs in a fresh interpreter."""
    text = (DOCS / "torchrec_integration.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    # Its own port: this process's gloo group holds the MASTER_PORT it would inherit.
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
