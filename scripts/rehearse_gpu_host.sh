#!/usr/bin/env bash
# Rehearse the GPU host on this (CPU) machine: a Python with only torch 2.11 (and what torch
# itself needs) plus the offline kit (../shared/gpu-kit), then `import torchrec_scratchpipe`
# and the CPU test suite. fbgemm-gpu-cpu 1.6.0 takes the place of the kit's CUDA fbgemm-gpu,
# which needs a driver to import. Downloads about 0.5 GB and takes 5-10+ minutes: not for CI.
#
#   bash scripts/rehearse_gpu_host.sh             # kit, venv, import check, CPU suite
#   bash scripts/rehearse_gpu_host.sh --prepare   # only build the kit and the venv
#   bash scripts/rehearse_gpu_host.sh --help
#
# Everything lands in .gpu-kit/ (ignored by git): the kit's parts (prepare.sh), venv/ (torch
# 2.11 + fbgemm-gpu-cpu 1.6.0, nothing else), tools/ (pytest and hypothesis, put on the path
# AFTER the kit so they hide none of its modules), host/ (the kit unpacked by install.sh) and
# rehearsal.log. A second run reuses the kit and the venv.
# Environment: PYV (Python version of the kit's wheels; default: this python3's),
# GPU_KIT (the kit's folder; default ../shared/gpu-kit, else /work/shared/gpu-kit),
# PYTEST_ARGS (default: -q -x -p no:cacheprovider).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
  --prepare|"") ;;
  *) echo "rehearse_gpu_host.sh: unknown argument '$1' (use --prepare or --help)" >&2; exit 2 ;;
esac
PY=python3
PYV=${PYV:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
GPU_KIT=${GPU_KIT:-../shared/gpu-kit}
[ -f "$GPU_KIT/prepare.sh" ] || GPU_KIT=/work/shared/gpu-kit
KIT=.gpu-kit
mkdir -p "$KIT"
LOG=$KIT/rehearsal.log
say() { echo "rehearse: $*" | tee -a "$LOG" >&2; }
: > "$LOG"
say "kit from $GPU_KIT, wheels for Python $PYV"
if [ ! -f "$KIT/SHA256SUMS" ]; then
  PYV=$PYV bash "$GPU_KIT/prepare.sh" "$KIT" >> "$LOG" 2>&1
fi
say "kit: $(ls "$KIT" | grep -c part-) parts, $(du -sh "$KIT" --exclude=venv --exclude=tools --exclude=host | cut -f1)"
# torch 2.11 with only what torch itself needs (the NVIDIA libraries libtorch links at load
# time, as scripts/stacks/oldest.txt lists them, and torch's own Python dependencies).
if [ ! -x "$KIT/venv/bin/python" ]; then
  $PY -m venv "$KIT/venv"
  pins=$(grep -E '^(torch|nvidia-[a-z0-9-]+)==' scripts/stacks/oldest.txt)
  torch_deps=$(grep -iE '^(filelock|typing_extensions|sympy|mpmath|networkx|Jinja2|MarkupSafe|fsspec)==' scripts/stacks/common.txt)
  # shellcheck disable=SC2086
  "$KIT/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps $pins $torch_deps fbgemm-gpu-cpu==1.6.0 >> "$LOG" 2>&1
fi
if [ ! -d "$KIT/tools/_pytest" ]; then
  tools=$(grep -iE '^(pytest|iniconfig|pluggy|Pygments|hypothesis|sortedcontainers)==' scripts/stacks/common.txt)
  # shellcheck disable=SC2086
  "$KIT/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$KIT/tools" $tools >> "$LOG" 2>&1
fi
say "venv: $("$KIT/venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -ciE '^(torch|fbgemm)') of torch/fbgemm, $("$KIT/venv/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l) packages in all"
[ "${1:-}" = --prepare ] && { say "prepared"; exit 0; }
# The GPU host's steps, with the venv's python3 first on PATH (install.sh asks python3 which
# modules it lacks). The kit's CUDA fbgemm-gpu is replaced by the venv's fbgemm-gpu-cpu.
export PATH=$PWD/$KIT/venv/bin:$PATH
rm -rf "$KIT/host"
line=$(bash "$KIT/install.sh" "$KIT" "$PWD/$KIT/host/site" 2>> "$LOG")
echo "$line" >> "$LOG"
eval "$line"
rm -rf "$KIT"/host/site/fbgemm_gpu "$KIT"/host/site/fbgemm_gpu-*.dist-info
export PYTHONPATH=$PYTHONPATH:$PWD/$KIT/tools
say "modules from the kit's extras: $(grep -c '^gpu-kit: ' "$LOG" || true) ($(grep '^gpu-kit: ' "$LOG" | cut -d' ' -f2 | tr '\n' ' '))"
if ! python3 -c "import torch, fbgemm_gpu, torchrec, torchrec_scratchpipe as t; print('import ok: torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '?', t.__file__)" >> "$LOG" 2>&1; then
  say "FAIL: import (see $LOG)"; tail -20 "$LOG" >&2; exit 1
fi
say "$(grep '^import ok' "$LOG")"
# shellcheck disable=SC2086
if python3 -m pytest ${PYTEST_ARGS:--q -x -p no:cacheprovider} >> "$LOG" 2>&1; then
  say "CPU suite: $(grep -E '[0-9]+ passed' "$LOG" | tail -1)"
else
  say "FAIL: CPU suite: $(grep -E 'passed|failed|error' "$LOG" | tail -1) (see $LOG)"; exit 1
fi
