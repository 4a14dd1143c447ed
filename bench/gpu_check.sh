#!/usr/bin/env bash
# The GPU check, one command within 8 minutes: the `gpu` tests (tests/test_gpu.py) and
# bench/bench_train.py --use-gpu (Ray Data -> Ray Train samples/s against the bare GPU loop,
# measured in the same run), on a host with one GPU and torch but no Ray and no package index.
# Without CUDA it falls back to CPU, says so at the top and in the summary
# ("CPU FALLBACK: not a GPU result") and still runs to the end.
#
#   bench/gpu_check.sh --bundle       # here, once: .devwheels/ = the stripped Ray bundle
#                                     #   (../shared/tools/ray-gpu-bundle.sh) + pytest wheels
#   bench/gpu_check.sh [--quick] [--out DIR]    # on the GPU host, from the repo root
#
# Installs only what is missing: an importable ray/pytest is used as it is; else the
# .devwheels/ bundle goes to /tmp/site (its header's recipe); else pip, where an index answers.
# --quick (or GPU_CHECK_QUICK=1): tiny sizes, for the CPU test of this script.
# GPU_CHECK_BUDGET_S: seconds for setup + tests + bench (default 470; the bench gets what is
# left, then is stopped). PYTHON: the interpreter (default python3). Results: DIR (default $OUT, else a temp folder)
# gets summary.txt, bench_train.json and the logs. Exit status 0 when every step ran.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
OUT_DIR=${OUT:-}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # s: of the 8 minutes, the rest is margin for start-up and the summary
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --bundle) MODE=bundle ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "${MODE:-}" = bundle ]; then  # on the development machine, with pip and an index
  "${RAY_GPU_BUNDLE:-../shared/tools/ray-gpu-bundle.sh}" || exit 1
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .devwheels \
    pytest pluggy iniconfig packaging pytest-timeout || exit 1
  du -sh .devwheels
  exit 0
fi

OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/rayvid-gpu-check-XXXXXX)}
mkdir -p "$OUT_DIR"
SUMMARY=()
note() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }
left() { local s=$((BUDGET_S - SECONDS)); echo $((s > 60 ? s : 60)); }  # timeout 0 = none

have() {  # the modules of "$@" that $PY cannot import, space-separated (empty: all there)
  "$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"
}

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "FAILED: $PY cannot import torch; this check brings Ray, not torch" | tee "$OUT_DIR/summary.txt"
  exit 1
fi
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  DEVICE=cuda
  NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
  LABEL="GPU: $NAME"
else
  DEVICE=cpu
  LABEL="CPU FALLBACK: not a GPU result"
  echo "######################################################################"
  echo "##  CPU FALLBACK: not a GPU result                                  ##"
  echo "##  torch.cuda.is_available() is False: the gpu tests will skip and ##"
  echo "##  bench_train.py runs on the CPU. No number below is a GPU number.##"
  echo "######################################################################"
fi
note "$LABEL; python $("$PY" -c 'import sys; print(sys.version.split()[0])'); results in $OUT_DIR"

# ---------------------------------------------------------------- install what is missing
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
unset PYTHONDONTWRITEBYTECODE  # else every Ray worker recompiles Ray and torch at start
if [ -z "$(have ray pytest)" ]; then
  note "ray $("$PY" -c 'import ray; print(ray.__version__)') and pytest already importable: not installing"
elif [ -f .devwheels/ray-stripped.zip ]; then
  note "installing from .devwheels/ into /tmp/site (missing: $(have ray pytest))"
  mkdir -p /tmp/site && "$PY" -m zipfile -e .devwheels/ray-stripped.zip /tmp/site \
    && chmod -R +x /tmp/site/ray/core \
    && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/*.whl \
    || { echo "FAILED: installing .devwheels/ into /tmp/site" | tee "$OUT_DIR/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  note "no .devwheels/ (bench/gpu_check.sh --bundle builds it): pip install $(have ray pytest)"
  timeout 240 "$PY" -m pip install -q "ray[data,train]==2.60.*" pytest pytest-timeout \
    || { echo "FAILED: pip install (no index here? build .devwheels/ with --bundle)" | tee "$OUT_DIR/summary.txt"; exit 1; }
fi
MISSING=$(have ray pytest numpy pyarrow pandas yaml scipy)
if [ -n "$MISSING" ]; then
  echo "FAILED: still missing python modules: $MISSING" | tee "$OUT_DIR/summary.txt"
  exit 1
fi
SUMMARY+=("setup: ${SECONDS} s")

# ---------------------------------------------------------------- the gpu tests
note "gpu tests (tests/test_gpu.py)"
timeout 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts=-rA \
  > "$OUT_DIR/gpu_tests.log" 2>&1
TESTS_RC=$?
tail -n 15 "$OUT_DIR/gpu_tests.log"
TESTS_LINE=$(grep -E '(passed|failed|skipped|error)' "$OUT_DIR/gpu_tests.log" | tail -n 1)
SUMMARY+=("gpu tests: ${TESTS_LINE:-no result} (exit $TESTS_RC)")

# ---------------------------------------------------------------- the training benchmark
if [ "$QUICK" = 1 ]; then
  SIZES=(--ids 12 --faces-per-clip 4 --steps 10 --ceiling-steps 9 --epochs 1)
elif [ "$DEVICE" = cuda ]; then
  SIZES=(--ids 150 --steps 1500 --ceiling-steps 600 --epochs 3)
else
  SIZES=(--ids 60 --steps 300 --ceiling-steps 150 --epochs 2)
fi
FLAGS=("${SIZES[@]}" --work "$OUT_DIR/work" --json "$OUT_DIR/bench_train.json")
if [ "$DEVICE" = cuda ]; then
  FLAGS+=(--use-gpu)
else  # logical CPUs: one Train worker and Ray Data never starve each other on 2 cores
  FLAGS+=(--num-cpus "$(( $(nproc) > 4 ? $(nproc) : 4 ))")
fi
note "bench/bench_train.py ${FLAGS[*]} (at most $(left) s)"
timeout "$(left)" "$PY" bench/bench_train.py "${FLAGS[@]}" > "$OUT_DIR/bench_train.log" 2>&1
BENCH_RC=$?
grep -E '^(simulated|prepared|bare loop on|.*worker\(s\)|.*ratio ray/bare|[A-Za-z]*Error)' \
  "$OUT_DIR/bench_train.log" | tail -n 12
RATIO_LINE=$(grep -E 'ratio ray/bare' "$OUT_DIR/bench_train.log" | tail -n 1)
[ "$BENCH_RC" = 124 ] && RATIO_LINE="timed out after the budget"
SUMMARY+=("bench_train.py (exit $BENCH_RC): ${RATIO_LINE:-no ratio line, see $OUT_DIR/bench_train.log}")

# ---------------------------------------------------------------- summary
{
  echo "==================== GPU CHECK SUMMARY ===================="
  echo "$LABEL"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "total: ${SECONDS} s; logs and bench_train.json in $OUT_DIR"
  [ "$DEVICE" = cpu ] && echo "CPU FALLBACK: not a GPU result"
} | tee "$OUT_DIR/summary.txt"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
