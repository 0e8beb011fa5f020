#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one command: build dlext with its CUDA kernels, run the
# CUDA half of the test suite, compute-sanitizer (memcheck, racecheck) over each op's CUDA tests,
# and the GPU benchmarks. Logs and results go under $OUT (the device tool brings that folder back);
# a summary table is printed last.
#
#   tools/gpu_session.sh [stage ...]     stages: env build test memcheck racecheck bench
#                                        (default: all, in that order)
#
# A device call is limited to 10 minutes and the machine forgets everything ~30 s after a call, so
# split the stages over two calls made back to back, each starting with `build` (a no-op when the
# previous call's build is still there):
#   run: tools/gpu_session.sh env build test memcheck racecheck
#   run: tools/gpu_session.sh build bench
# then copy $OUT/results/* into benchmarks/results/ here. Each stage has a time limit
# (DLEXT_<STAGE>_S, seconds); a stage that fails or times out is reported and the next one runs.
# Uses the machine's python3 (its own PyTorch) and builds in place (tests import ./dlext).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dlext-gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
summary="$OUT/summary.txt"
: > "$summary"

# stage NAME DEFAULT_SECONDS 'COMMAND': runs COMMAND (a bash command line) with a time limit,
# output in $OUT/NAME.log, a line in the summary.
stage() {
  local name=$1 limit_var="DLEXT_${1^^}_S" default=$2 cmd=$3
  local limit=${!limit_var:-$default} start=$SECONDS rc
  echo "== $name (limit ${limit}s): $cmd" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$OUT/$name.log" 2>&1
  rc=$?
  local verdict=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
  [ "$rc" -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (rc $rc)"
  printf '%-10s %-16s %5ss  %s\n' "$name" "$verdict" "$((SECONDS - start))" \
    "$(grep -E 'passed|failed|skipped|error' "$OUT/$name.log" | tail -1 | cut -c1-90)" >> "$summary"
}

# The CUDA tests of one op file (those marked cuda), without the slow exhaustive ones, under a
# compute-sanitizer tool; its report must say 0 errors.
sanitize() {
  local tool=$1 ok=0
  for f in tests/test_relu.py tests/test_max_pool2d.py tests/test_batch_norm.py \
           tests/test_cross_entropy.py tests/test_conv2d.py; do
    echo "-- $tool $f"
    compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "$PY" -m pytest -q -x -p no:cacheprovider -m cuda \
      -k "not gradgradcheck and not property and not compile" "$f" || ok=1
  done
  return $ok
}
export -f sanitize
export PY
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env build test memcheck racecheck bench)
for s in "${stages[@]}"; do
  case "$s" in
    env) stage env 60 "nvidia-smi; $PY -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version | tail -2; \
command -v compute-sanitizer" ;;
    build) stage build 420 "$PY setup.py build_ext --inplace" ;;
    test) stage test 300 "$PY -m pytest -q -m cuda $xdist -p no:cacheprovider tests/" ;;
    memcheck) stage memcheck 300 "sanitize memcheck" ;;
    racecheck) stage racecheck 200 "sanitize racecheck" ;;
    bench) stage bench 420 "$PY -m benchmarks --device cuda --out '$OUT/results'" ;;
    *) echo "unknown stage '$s' (env build test memcheck racecheck bench)" >&2; exit 2 ;;
  esac
done
echo
echo "== summary (logs in $OUT)"
cat "$summary"
