"""The planner's optional C++ operator: build it once, load it at import, or fall back.

``csrc/planner.cpp`` fuses the planner's per-id loops (de-duplication, hits, victims, map
updates, next-use links) into single passes, registered as ``torch.ops.scratchpipe.*``.
``scripts/setup.sh`` builds it with torch's extension tooling (``python -m
torchrec_scratchpipe.core.native``); the build is cached per torch version, Python
version and source, so each installed stack keeps its own. At import the library is
loaded if that build exists; otherwise the planner runs its pure-PyTorch reference,
which gives identical plans.

Environment:
    ``SCRATCHPIPE_NATIVE``: ``auto`` (default: use the build if present), ``0`` (always
    the PyTorch path), ``1`` (require the build; raise if it is missing).
    ``SCRATCHPIPE_NATIVE_DIR``: build cache (default ``~/.cache/torchrec_scratchpipe``).

Example::

    >>> isinstance(available(), bool)
    True
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "planner.cpp"
_state: Dict[str, Any] = {}


#: Compiler flags. ``-fopenmp`` lets ``at::parallel_for`` in the row copies use ATen's
#: OpenMP threads (without it the header's parallel loop runs on one thread).
CFLAGS = ["-O3", "-fopenmp"]


def build_dir() -> Path:
    """Where this stack's build lives: one folder per torch version, Python and source."""
    root = Path(os.environ.get("SCRATCHPIPE_NATIVE_DIR", Path.home() / ".cache" / "torchrec_scratchpipe"))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return root / "native" / tag


def _library() -> Path:
    return build_dir() / "scratchpipe_native.so"


def build(verbose: bool = False) -> Path:
    """Compile the operator for the running torch (needs a C++ compiler and ninja) and load it.

    Returns:
        The path of the shared library.
    """
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    load(
        name="scratchpipe_native",
        sources=[str(SOURCE)],
        build_directory=str(out),
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    _state["loaded"] = True
    return _library()


def available() -> bool:
    """Whether ``torch.ops.scratchpipe`` is loaded (loading this stack's build if present)."""
    if "loaded" not in _state:
        lib = _library() if SOURCE.exists() else None
        ok = False
        if lib is not None and lib.exists():
            try:
                torch.ops.load_library(str(lib))
                ok = True
            except (OSError, RuntimeError):  # built for another torch ABI: fall back
                ok = False
        _state["loaded"] = ok
    return bool(_state["loaded"])


def enabled(prefer: Optional[bool] = None) -> bool:
    """Whether a new planner should use the operator.

    Args:
        prefer: True/False to ask for a path explicitly (True raises if the build is
            missing); None follows ``SCRATCHPIPE_NATIVE``.
    """
    if prefer is None:
        mode = os.environ.get("SCRATCHPIPE_NATIVE", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise ValueError(f"SCRATCHPIPE_NATIVE must be 'auto', '0' or '1', got {mode!r}.")
        if mode == "0":
            return False
        prefer = True if mode == "1" else None
    if prefer is False:
        return False
    if available():
        return True
    if prefer:
        raise RuntimeError(
            f"the native planner was requested but is not built for torch {torch.__version__} "
            f"(looked in {build_dir()}): run `python -m torchrec_scratchpipe.core.native` "
            "(needs a C++ compiler and ninja), or set SCRATCHPIPE_NATIVE=0."
        )
    return False


def main() -> None:
    """Build the operator (``scripts/setup.sh`` runs this); print where it went. A failed
    build exits 1 when ``SCRATCHPIPE_NATIVE=1`` (CI), else the PyTorch path is used."""
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as e:  # no compiler, no ninja: the PyTorch path still works, unless the op is required
        if os.environ.get("SCRATCHPIPE_NATIVE", "auto").strip() == "1":
            print(f"scratchpipe: native planner required (SCRATCHPIPE_NATIVE=1) but not built: {type(e).__name__}: {e}",
                  file=sys.stderr)
            raise SystemExit(1) from e
        print(f"scratchpipe: native planner not built ({type(e).__name__}: {e}); using the PyTorch path.")
        return
    print(f"scratchpipe: native planner built at {path}")


if __name__ == "__main__":
    main()
