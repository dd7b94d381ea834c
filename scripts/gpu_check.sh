#!/usr/bin/env bash
# gpu_check.sh -- the one prepared script for a lent GPU machine (see docs/cuda.md).
#
# Runs in the repository root of a machine with a CUDA GPU and no network, where the repo
# is not pip-installed: array-api-compat and array-api-strict come as wheels in .whl/,
# dla_ref is importable from the root and dla_backends through a symlink shim. Then, with
# fixed seeds and the Hypothesis "ci" profile (derandomized), each part under its own
# `timeout`, all parts together within GPU_CHECK_BUDGET seconds (default 470, under
# 8 minutes):
#   nvidia-smi; the versions seen; the CUDA backend's own tests; the differential suite
#   once per GPU backend (cupy, triton@cuda and triton-chunked@cuda compiled, torch@cuda,
#   torch-chunked@cuda),
#   each stopping at its first failure, so that one backend's failure does not hide the
#   others'; the Triton and torch backends' own tests; then the benchmarks.
# Everything is printed and logged under $OUT (./out when OUT is unset):
#   gpu_check.log  all output;  summary.txt  one line per part (ok / FAILED rc / timed out
#   / skipped, seconds);  bench.json  the benchmark results, when the bench writes JSON.
# Exit status: 0 if every part passed, else 1.
#
# usage: scripts/gpu_check.sh [--dry-run]
#   --dry-run  list the parts and their commands, run nothing (works on any machine)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$PWD/out}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$(date +%s)
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
FAILED=0
mkdir -p "$OUT"
: >"$LOG"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$LOG"; }
record() { echo "$*" | tee -a "$SUMMARY" | tee -a "$LOG"; }

# part NAME CAP COMMAND...: run COMMAND with a timeout of CAP seconds, or of the time left
# in the budget if less; its output goes to the terminal and the log.
part() {
  local name=$1 cap=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    say "would run [$name], at most ${cap}s: $*"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    record "$name: skipped (budget of ${BUDGET}s spent)"
    FAILED=1
    return
  fi
  say ""
  say "=== [$name] at $(($(date +%s) - START))s, limit ${limit}s: $*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  case $rc in
    0) record "$name: ok (${took}s)" ;;
    124 | 137) record "$name: TIMED OUT after ${took}s (limit ${limit}s)"; FAILED=1 ;;
    *) record "$name: FAILED rc=$rc (${took}s)"; FAILED=1 ;;
  esac
}

# pytest_part NAME CAP BACKENDS FILE...: pytest on the FILEs that exist (some may not be
# written yet: those are named and left out), with DLA_BACKENDS=BACKENDS, stopping at the
# first failure.
pytest_part() {
  local name=$1 cap=$2 backends=$3 files=() f
  shift 3
  for f in "$@"; do
    if [ -f "$f" ]; then files+=("$f"); else say "[$name] missing, left out: $f"; fi
  done
  if [ ${#files[@]} = 0 ]; then
    record "$name: skipped (none of its test files exists yet)"
    return
  fi
  part "$name" "$cap" env DLA_BACKENDS="$backends" \
    python3 -m pytest -q -x -p no:cacheprovider "${files[@]}"
}

# --- the environment: wheels, import paths, seeds --------------------------------------

export PYTHONHASHSEED=0 HYPOTHESIS_PROFILE=ci PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # Triton compiles for the GPU, not the interpreter
SITE=/tmp/site SHIM=/tmp/shim
if [ "$DRY_RUN" = 1 ]; then
  say "would install .whl/*.whl into $SITE (pip --no-index --no-deps): $(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')"
  say "would link $SHIM/dla_backends -> $PWD/backends; PYTHONPATH=$SITE:$SHIM:$PWD"
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"
  else
    say "no wheels in .whl/: array-api-compat must already be importable"
  fi
  mkdir -p "$SHIM" && ln -sfn "$PWD/backends" "$SHIM/dla_backends"
  export PYTHONPATH=$SITE:$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}
  if ! python3 -c "import array_api_compat, dla_ref, dla_backends" 2>&1 | tee -a "$LOG"; then
    say "cannot import dla_ref / dla_backends (is array-api-compat in .whl/?): stopping"
    exit 1
  fi
fi

# --- the parts --------------------------------------------------------------------------

part nvidia-smi 15 nvidia-smi

part versions 45 python3 - <<'EOF'
import importlib, platform, subprocess, sys
print("python", platform.python_version(), sys.executable)
for name in ("numpy", "array_api_compat", "array_api_strict", "torch", "triton", "cupy",
             "numba", "hypothesis", "pytest"):
    try:
        print(f"{name:18s}", importlib.import_module(name).__version__)
    except Exception as exc:  # report, do not stop: a missing package skips its tests
        print(f"{name:18s} unavailable: {type(exc).__name__}: {exc}")
try:
    import torch
    print("torch.cuda", torch.version.cuda, torch.cuda.get_device_name(0))
    import cupy
    print("cupy device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
          "runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("device query failed:", type(exc).__name__, exc)
print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip())
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                               text=True).stdout.strip() or "unknown (no .git here)")
EOF

pytest_part "cuda kernel tests" 75 cupy tests/test_cuda_kernels.py
for backend in cupy triton@cuda triton-chunked@cuda torch@cuda torch-chunked@cuda; do
  cap=45
  case "$backend" in triton*) cap=75 ;; esac  # each new shape is a JIT compilation
  pytest_part "differential $backend" "$cap" "$backend" tests/test_differential.py
done
pytest_part "triton and torch backend tests" 60 triton@cuda,torch@cuda,torch-chunked@cuda \
  tests/test_triton_backend.py tests/test_triton_chunked.py tests/test_torch_backend.py

if [ ! -f backends/cli/bench.py ]; then
  record "bench: skipped (backends/cli/bench.py does not exist yet)"
elif [ "$DRY_RUN" = 1 ]; then
  say "would run [bench], at most 60s: python3 -m dla_backends bench [--quick] [--json $OUT/bench.json] (the options its --help lists)"
else
  # the bench is written elsewhere: pass --quick and --json only if it takes them
  bench_help=$(python3 -m dla_backends bench --help 2>&1 || true)
  bench_args=()
  grep -q -- --quick <<<"$bench_help" && bench_args+=(--quick)
  grep -q -- --json <<<"$bench_help" && bench_args+=(--json "$OUT/bench.json")
  part bench 60 python3 -m dla_backends bench "${bench_args[@]}"
fi

if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
say ""
say "=== summary ($(($(date +%s) - START))s of ${BUDGET}s; log: $LOG)"
cat "$SUMMARY"
exit "$FAILED"
