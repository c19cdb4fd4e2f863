#!/usr/bin/env bash
# One GPU check, at most ~8 minutes on one GPU: versions, the CUDA tests, the A/B against fused,
# the real fused_uvm_caching and ScratchPipe, then the engine benchmark. Everything goes under OUT_DIR; the last file
# written is OUT_DIR/summary.txt (one line per step) and OUT_DIR/summary.json.
#
# Usage (from anywhere; the project is imported from this checkout through PYTHONPATH only):
#   bash scripts/gpu_check.sh OUT_DIR
# Environment:
#   PYTHON               interpreter (default python3; e.g. the offline kit's, see docs/gpu.md)
#   GPU_CHECK_BUDGET_S   total seconds for all steps (default 470); each step also has its own limit
#   GPU_CHECK_SCALE      "full" (default) or "small" (tiny sizes, to rehearse the steps quickly)
#   GPU_CHECK_DEVICE     "cuda" (default); "cpu" runs the benchmark and A/B steps on CPU instead
#                        of skipping them (a rehearsal of their command lines, with SCALE=small)
# Steps that need CUDA report "skipped: no CUDA" without it; a failing step never stops the next.
# A test step whose tests were all skipped reports "skipped", never "ok".
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  -*) echo "gpu_check.sh: unknown option '$1' (usage: bash scripts/gpu_check.sh OUT_DIR)" >&2; exit 2 ;;
esac
OUT=$1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SCALE=${GPU_CHECK_SCALE:-full}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"  # a kit's site folder stays first
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STEPS_TSV="$OUT/.steps.tsv"
: > "$STEPS_TSV"
START=$(date +%s)

HAS_CUDA=$(timeout 120 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null | tail -n1)
[ "$HAS_CUDA" = 1 ] || HAS_CUDA=0
NEEDS_CUDA=1
[ "$DEVICE" = cpu ] && NEEDS_CUDA=0

# step NAME LIMIT_S NEEDS_CUDA CMD...: run CMD with its own timeout (capped by what is left of
# the budget), output in OUT/NAME.log, one line in the summary.
step() {
  local name=$1 limit=$2 cuda=$3
  shift 3
  local log="$OUT/$name.log" left status rc t0
  if [ "$cuda" = 1 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "skipped: no CUDA" > "$log"
    printf '%s\t%s\t%s\n' "$name" "skipped: no CUDA" 0 >> "$STEPS_TSV"
    echo "$name: skipped: no CUDA" | tee -a "$SUMMARY"
    return 0
  fi
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    printf '%s\t%s\t%s\n' "$name" "skipped: budget spent" 0 >> "$STEPS_TSV"
    echo "$name: skipped: budget of ${BUDGET}s spent" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  echo "+ $*" > "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if [ -f "$OUT/$name.xml" ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
    status=$(junit_status "$OUT/$name.xml" "$status")
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$STEPS_TSV"
  echo "$name: $status in $(($(date +%s) - t0))s (log: $name.log)" | tee -a "$SUMMARY"
}

# junit_status XML STATUS: a pytest step's status from its counts: "skipped (N of N tests
# skipped)" when nothing ran, else STATUS with the counts ("ok: 20 passed, 2 skipped").
junit_status() {
  timeout 60 "$PY" - "$1" "$2" <<'EOF' 2>/dev/null || echo "$2"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
ran = n["tests"] - n["skipped"]
if n["tests"] and ran == 0:
    print(f"skipped ({n['skipped']} of {n['tests']} tests skipped)")
else:
    bad = f", {n['failures']} failed, {n['errors']} errors" if n["failures"] or n["errors"] else ""
    print(f"{sys.argv[2]}: {ran - n['failures'] - n['errors']} passed{bad}, {n['skipped']} skipped")
EOF
}

THREADS=()
[ "$DEVICE" = cuda ] && THREADS=(--threads 0)  # the host's own thread count next to a GPU

if [ "$SCALE" = small ]; then
  BENCH_ARGS=(--tables 2 --rows 20000 --dim 16 --batch-size 256 --steps 6 --warmup 2 --block 3)
  AB_ARGS=(--tables 2 --rows 20000 --dim 16 --batch-size 256 --lookaheads 1,2 --horizon 3 --steps 12 --warmup 4)
else
  # 26 tables x 200k rows, 5% on the device (20x the budget); Zipf(1.05) ids
  BENCH_ARGS=(--tables 26 --rows 200000 --dim 64 --batch-size 4096 --load-factor 0.05 --lookahead 4
              --steps 30 --warmup 5 --block 10)
  # 8 tables x 500k rows, 5% on the device (20x the budget); batch 4096, Zipf(1.05);
  # timed steps 4H after a warm-up that fills the window (H+1 batches)
  AB_ARGS=(--tables 8 --rows 500000 --dim 64 --batch-size 4096 --load-factor 0.05 --lookaheads 1,4 --horizon 16
           --steps 64 --warmup 20 --alpha 1.05 --distribution zipf)
fi

step versions 60 0 "$PY" - "$OUT/versions.json" <<'EOF'
import importlib, json, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ["torch", "fbgemm_gpu", "torchrec", "tensordict", "iopath", "numpy", "tqdm", "matplotlib", "pytest", "hypothesis"]:
    try:
        m = importlib.import_module(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception as e:  # report, do not stop: later steps show what it breaks
        info[mod] = f"MISSING: {type(e).__name__}: {e}"
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:
    info["cuda_error"] = repr(e)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    info["nvidia_smi"] = f"unavailable: {e}"
import torchrec_scratchpipe
info["project"] = torchrec_scratchpipe.__file__
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

step test_cuda 150 0 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" \
  tests/test_cuda.py tests/test_cuda_races.py

# the A/B before the benchmark: a run that runs out of budget still ends with its report
step ab 200 $NEEDS_CUDA "$PY" -m torchrec_scratchpipe.ab --device "$DEVICE" --arms fused,fused_uvm_caching,scratchpipe \
  "${AB_ARGS[@]}" "${THREADS[@]}" --no-progress --out "$OUT/ab"

step bench_engine 80 $NEEDS_CUDA "$PY" -m torchrec_scratchpipe.bench.engine --device "$DEVICE" "${BENCH_ARGS[@]}" \
  --json "$OUT/bench_engine.json"

# summary.json: the steps, the test counts and the headline numbers (plain Python, no project import)
timeout 60 "$PY" - "$OUT" "$HAS_CUDA" "$(($(date +%s) - START))" <<'EOF' >> "$SUMMARY" 2>&1
import json, os, sys
import xml.etree.ElementTree as ET
out, has_cuda, total = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
s = {"cuda": has_cuda, "seconds": total, "steps": {}}
for line in open(os.path.join(out, ".steps.tsv")):
    name, status, secs = line.rstrip("\n").split("\t")
    s["steps"][name] = {"status": status, "seconds": int(secs)}
try:
    suite = ET.parse(os.path.join(out, "test_cuda.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    s["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as e:
    s["tests"] = f"no junit: {e}"
try:
    b = json.load(open(os.path.join(out, "bench_engine.json")))
    s["bench_engine"] = {k: b[k] for k in ("device", "full_tbe_step_ms", "scratchpipe_step_ms", "overhead_ratio", "planner_fraction")}
except Exception as e:
    s["bench_engine"] = f"none: {e}"
try:
    r = json.load(open(os.path.join(out, "ab", "report.json")))
    arms = {a["arm"]: a for a in r["arms"]}
    s["ab"] = {k: {f: a.get(f) for f in ("samples_per_s", "train_misses", "max_loss_diff_vs_fused", "max_weight_diff_vs_fused")} for k, a in arms.items()}
    fused = next((a.get("samples_per_s") for k, a in arms.items() if k == "fused"), None)
    uvm = next((a.get("samples_per_s") for k, a in arms.items() if k.startswith("fused_uvm_caching")), None)
    for k, a in arms.items():
        if k.startswith("scratchpipe") and a.get("samples_per_s"):
            s["ab"][k]["vs_fused"] = a["samples_per_s"] / fused if fused else None
            s["ab"][k]["vs_uvm"] = a["samples_per_s"] / uvm if uvm else None
except Exception as e:
    s["ab"] = f"none: {e}"
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(f"total {total}s; summary.json written")
print(json.dumps({k: s[k] for k in ("tests", "bench_engine", "ab")}, indent=2))
EOF
rm -f "$STEPS_TSV"
echo "done: $OUT/summary.txt"
