#!/usr/bin/env bash
# Create .venv with a working torch + fbgemm-gpu + torchrec stack, then install this
# package in editable mode with its test extras. Idempotent: a second run only re-checks.
#
#   bash scripts/setup.sh            # auto-detect CUDA (nvidia-smi) or CPU
#   SP_STACK=cpu bash scripts/setup.sh
#
# CPU stack (pinned, see docs/user_guide.md): torch 2.13.0, fbgemm-gpu-cpu 1.8.0,
# torchrec 1.8.0 installed with --no-deps (its metadata asks for the CUDA fbgemm-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SP_VENV:-.venv}
PY=${PYTHON:-python3}
STACK=${SP_STACK:-auto}
if [ "$STACK" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STACK=cuda; else STACK=cpu; fi
fi
STAMP="$VENV/.scratchpipe-stack-$STACK"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ ! -f "$STAMP" ]; then
  if [ "$STACK" = cpu ]; then
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" fbgemm-gpu-cpu==1.8.0
  else
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" fbgemm-gpu==1.8.0
  fi
  "${PIP[@]}" --no-deps torchrec==1.8.0
  "${PIP[@]}" tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath torchx==0.7.0 \
    numpy matplotlib
  touch "$STAMP"
fi
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" pytest hypothesis ninja
# The planner's C++ operator, cached per torch version (falls back to PyTorch if no compiler).
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -c "from torchrec_scratchpipe.core import native; native.main()"
echo "scratchpipe: $STACK stack ready in $VENV"
