#!/usr/bin/env bash
# Mutation testing of torchrec_scratchpipe/core/ and distributed/ with cosmic-ray (not run in
# CI: a whole run takes hours on 2 cores). Run it on the modules a change touches, before
# stopping:
#
#   bash scripts/mutation.sh core/plan.py core/window.py   # some modules
#   bash scripts/mutation.sh core                          # a whole package
#   bash scripts/mutation.sh --list                        # the module -> tests map
#   bash scripts/mutation.sh --max-mutants 40 core/engine.py   # a budgeted sample (the rest reported skipped)
#
# It installs cosmic-ray (pinned) into .mutation-tool/ (git-ignored, once; not into the
# venv), mutates a copy of the working tree in out/mutation/work, runs only the tests
# scripts/mutation/map.toml maps to each module, and writes out/mutation/summary.json
# (killed, survived, equivalent with its reason from scripts/mutation/equivalent.toml,
# seconds; per module and per package). docs/benchmarks.md records the kill rates.
#
# Environment: SP_PYTHON, the interpreter with the project's stack (default .venv/bin/python,
# what scripts/setup.sh makes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SP_PYTHON:-.venv/bin/python}
TOOL=$PWD/.mutation-tool
VERSION=8.7.0
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "scripts/mutation.sh: no Python at $PY: run scripts/setup.sh, or set SP_PYTHON." >&2
  exit 2
fi
if ! PYTHONPATH=$TOOL "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('cosmic-ray') != '$VERSION')" 2>/dev/null; then
  echo "[mutation] installing cosmic-ray $VERSION into $TOOL"
  rm -rf "$TOOL"
  "$PY" -m pip install --quiet --disable-pip-version-check --target "$TOOL" "cosmic-ray==$VERSION"
fi
exec env SP_MUTATION_TOOL="$TOOL" "$PY" scripts/mutation/run.py "$@"
