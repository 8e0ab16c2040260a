#!/usr/bin/env bash
# One call on a fresh GPU machine (device tool, H200): build, GPU tests, compute-sanitizer, CUDA-graph
# check, timings and the op benchmark, in order of importance, each stage under a timeout that also
# respects a global deadline (the call's limit is 10 minutes; the script stops starting stages
# after DEADLINE_S). Logs go to $OUT (at most 8 files come back); a summary table prints last.
#
#   run(command="bash bench/device_check.sh", timeout_s=600)
#
# The machine's python3 has torch, triton, pytest, cmake, ninja, pybind11 and nvcc; nothing can be
# downloaded there, so the build uses --no-build-isolation --no-deps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-540}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 LOOKAHEADKV_CUDA=1 LOOKAHEADKV_CUDA_ARCHS=90 LOOKAHEADKV_BUILD_JOBS=$(nproc)
SUMMARY=()

# stage NAME LIMIT_S LOG COMMAND...: runs COMMAND with its output appended to $OUT/LOG, under
# min(LIMIT_S, time left before the deadline); records status and duration.
stage() {
  local name=$1 limit=$2 log=$OUT/$3
  shift 3
  local left=$((DEADLINE_S - SECONDS))
  if ((left < 20)); then
    SUMMARY+=("$(printf '%-26s %-9s %5s' "$name" skipped -)")
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS status
  echo "=== $name (limit ${limit}s) ===" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  status=$?
  case $status in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="fail($status)" ;;
  esac
  tail -n 15 "$log"
  SUMMARY+=("$(printf '%-26s %-9s %5ss' "$name" "$status" $((SECONDS - start)))")
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/summary.txt" 2>&1

stage build 300 build.log $PY -m pip install --no-build-isolation --no-deps -e .
cp build/native-build.log "$OUT/" 2>/dev/null
if ! $PY -c "from lookaheadkv_kernels.backends import cuda; ok, why = cuda.available(); assert ok, why" >>"$OUT/build.log" 2>&1; then
  echo "CUDA backend not available after the build; see build.log" | tee -a "$OUT/summary.txt"
  printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
  exit 1
fi

TESTS="python_tests/ops/test_lookahead_qproj.py python_tests/ops/test_attention_scores.py python_tests/ops/test_select_compact.py python_tests/ops/test_paged_ops.py python_tests/ops/test_torch_integration.py"
stage "pytest cuda" 150 pytest.log env LOOKAHEADKV_TEST_BACKENDS=cuda \
  $PY -m pytest -q -p no:cacheprovider $TESTS python_tests/backends/test_cuda_backend.py python_tests/backends/test_paged_cuda.py -k "not emulated"
stage "graph replay check" 90 gpu_checks.log $PY bench/gpu_checks.py graph
stage "timing" 120 gpu_checks.log $PY bench/gpu_checks.py timing
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
stage "memcheck" 90 sanitizer.log "$SANITIZER" --tool memcheck --error-exitcode 1 $PY bench/gpu_checks.py sanitize
stage "racecheck" 90 sanitizer.log "$SANITIZER" --tool racecheck --error-exitcode 1 $PY bench/gpu_checks.py sanitize
stage "op benchmark" 150 bench.log $PY -m lookaheadkv_kernels.bench --device cuda --backends cuda,triton \
  --shapes llama8b --dtypes bfloat16 --lengths 8192,32768,131072 --budgets 128,512,2048,4096 --csv "$OUT/bench.csv"
stage "pytest triton" 120 pytest.log env LOOKAHEADKV_TEST_BACKENDS=triton $PY -m pytest -q -p no:cacheprovider $TESTS

{
  echo "--- device_check summary ($SECONDS s) ---"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$OUT/summary.txt"
grep -E "^(case|lookahead_qproj|attention_scores|lookahead_attention|select_compact|eviction|ceilings|graph)" "$OUT/gpu_checks.log" 2>/dev/null
