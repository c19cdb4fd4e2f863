#!/usr/bin/env bash
# Create a virtual environment with a torch + fbgemm-gpu + torchrec stack, then install this
# package in editable mode with its test tools. Idempotent: a second run only re-checks.
#
#   bash scripts/setup.sh                   # the default stack in .venv (CUDA build if nvidia-smi works)
#   bash scripts/setup.sh --stack oldest    # or SP_STACK=oldest: a stack in its own .venv-oldest
#
# Stacks (the README's "Supported versions" table; torchrec always with --no-deps, since its
# metadata asks for the CUDA fbgemm-gpu package, which would replace fbgemm-gpu-cpu):
#   default  torch 2.13.0 (CPU), fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0           -> .venv
#   cuda     torch 2.13.0, fbgemm-gpu 1.8.0 (CUDA), torchrec 1.8.0                -> .venv
#   oldest   torch 2.11.0, fbgemm-gpu-cpu 1.6.0, torchrec 1.6.1 (the GPU kit's)    -> .venv-oldest
#   newest   torch 2.14.1, fbgemm-gpu-cpu 1.9.0, torchrec 1.9.2                   -> .venv-newest
# ("cpu" is another name for "default".) oldest and newest install the exact pins of
# scripts/stacks/NAME.txt with --no-deps: torch's CUDA build runs on CPU, and --no-deps skips
# the NVIDIA packages nothing loads there (triton alone is ~0.5 GB unpacked).
# SP_VENV overrides the venv folder, PYTHON the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${SP_STACK:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --stack) STACK=${2:?--stack needs a name}; shift 2 ;;
    --stack=*) STACK=${1#--stack=}; shift ;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;  # the comment block above
    *) echo "setup.sh: unknown argument '$1' (use --stack default|cuda|oldest|newest)" >&2; exit 2 ;;
  esac
done
if [ -z "$STACK" ] || [ "$STACK" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STACK=cuda; else STACK=default; fi
fi
[ "$STACK" = cpu ] && STACK=default
case "$STACK" in
  default|cuda) VENV=${SP_VENV:-.venv} ;;
  oldest|newest) VENV=${SP_VENV:-.venv-$STACK} ;;
  *) echo "setup.sh: unknown stack '$STACK' (use default, cuda, oldest or newest)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
STAMP="$VENV/.scratchpipe-stack-$STACK"
if [ -f "scripts/stacks/$STACK.txt" ]; then  # a changed pin list re-installs
  STAMP="$STAMP-$(cat scripts/stacks/common.txt "scripts/stacks/$STACK.txt" | sha256sum | cut -c1-12)"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ ! -f "$STAMP" ]; then
  case "$STACK" in
    default|cuda)
      if [ "$STACK" = default ]; then FBGEMM=fbgemm-gpu-cpu==1.8.0; else FBGEMM=fbgemm-gpu==1.8.0; fi
      "${PIP[@]}" torch==2.13.0
      "${PIP[@]}" "$FBGEMM"
      "${PIP[@]}" --no-deps torchrec==1.8.0
      "${PIP[@]}" tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath torchx==0.7.0 \
        numpy matplotlib
      ;;
    *)
      "${PIP[@]}" --no-deps -r "scripts/stacks/$STACK.txt"
      ;;
  esac
  touch "$STAMP"
fi
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" pytest hypothesis mypy==2.4.1 ninja  # the test tools (pyproject's "test" extra) and the op's build tool
# The planner's C++ operator, cached per torch version (falls back to PyTorch if no compiler).
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -c "from torchrec_scratchpipe.core import native; native.main()"
echo "scratchpipe: $STACK stack ready in $VENV"
