#!/usr/bin/env bash
# GPU check for a bare H100/H200 device machine, in ONE device call of at most 9 minutes:
# the csrc build, a Triton warm-up, the headline correctness tests, the headline benchmark rows,
# then the rest of the gpu tier, the Triton tier and (if time is left) the full benchmark grids.
#
#   OUT=/some/folder bash bench/gpu_check.sh        # $OUT is set by the device machine
#
# Runs from the source tree (no pip install: PYTHONPATH is the repository root) with the machine's
# preinstalled python / torch / triton / pytest / transformers; no network. Without CUDA it runs
# the same steps as a dry run (CPU benchmarks, gpu tests skipped, short limits), to check the
# script itself. The minute-by-minute plan and why each limit is what it is: bench/NOTES.md,
# "Device check (bench/gpu_check.sh)".
#
# Order (each step has its own limit; a step that runs out is interrupted with SIGINT, so pytest
# still writes its summary and JUnit XML, and the benchmark runner keeps the rows it measured):
#   1 versions.txt          nvidia-smi, versions, `python -m pefops`                        ~15 s
#   2 csrc_build.log        the CUDA extension's JIT build (nvcc, ~2 min), IN THE BACKGROUND,
#                           limit CSRC_BUILD_S (default 240)
#   3 warmup.log/.json      python -m bench.headline: every op family's headline call fwd+bwd
#                           once (bf16, real sizes), first-call (compile) time per family;
#                           beside the build, with PEFOPS_CUDA_EXT=0; limit WARMUP_S (150)
#   4 pytest_headline.*     tests/ops/test_gpu_headline.py: every op vs the fp32 torch backend,
#                           sync-debug "error" mode, CUDA-graph replay; limit HEADLINE_TEST_S (120)
#   5 bench_headline.log    python -m bench --quick per op (the headline rows): results/;
#                           limit BENCH_HEADLINE_S (150) shared by the ops
#   6 (waits for the csrc build)
#   7 pytest_gpu.*          the rest of the gpu tier (csrc decode kernels, real-size kernel tests,
#                           hf on cuda); limit GPU_TEST_S (120)
#   8 pytest_triton.*       the Triton tier compiled for the device; what is left up to TRITON_TEST_S (90)
#   8b launch_overhead.*    python -m bench.launch_overhead: host µs per call of every op at tiny
#                           shapes (enqueue cost and synced cost); limit LAUNCH_OVERHEAD_S (45)
#   8c mixed_tasks.*        python -m bench.mixed_tasks: issue 15's end-to-end mixed-task batch against the
#                           per-task loop, BERT-base width and LLaMA-shaped, 12 layers, bf16, 16 x 128,
#                           forward and training step; limit MIXED_TASKS_S (100), half per model (the
#                           first compiles the routed kernels' variants)
#   9 bench_full.log        full grids (results_full/), only if BENCH_FULL_MIN_S (60) are left
#  10 results_table.md      merged results and the README table
# Autotuning: PEFOPS_AUTOTUNE_CONFIGS (default 2 here: the two configs nearest each kernel's
# heuristic; "all" tunes fully, 0 runs the heuristic config only) — a bare machine compiles every
# config it tries, and the bottleneck forward alone kept up to 36 per key.
#
# Files back from the device: at most 8, 2 folders deep, 16 MiB each (see the device README); the
# logs are small, and results/ holds the merged latest-cuda-* JSON/MD.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PEFOPS_AUTOTUNE_CONFIGS="${PEFOPS_AUTOTUNE_CONFIGS:-2}"
export PEFOPS_CACHE_DIR="${PEFOPS_CACHE_DIR:-/tmp/pefops-cache}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT/results"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

DEADLINE_S="${DEADLINE_S:-530}"          # the whole script; the device call's limit is 540+ s
CSRC_BUILD_S="${CSRC_BUILD_S:-240}"
WARMUP_S="${WARMUP_S:-150}"
HEADLINE_TEST_S="${HEADLINE_TEST_S:-120}"
BENCH_HEADLINE_S="${BENCH_HEADLINE_S:-150}"
GPU_TEST_S="${GPU_TEST_S:-120}"
TRITON_TEST_S="${TRITON_TEST_S:-90}"
LAUNCH_OVERHEAD_S="${LAUNCH_OVERHEAD_S:-45}"
MIXED_TASKS_S="${MIXED_TASKS_S:-100}"
MIXED_TASKS_ARGS="--layers 12"
BENCH_FULL_MIN_S="${BENCH_FULL_MIN_S:-60}"
REPORT_S=25                              # kept for the merge and the table at the end

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  DEVICE=cuda; DRY_RUN=0
else
  # dry run: the same steps on CPU with short limits (gpu tests skip, benchmarks are the CPU quick set)
  DEVICE=cpu; DRY_RUN=1
  DEADLINE_S="${DRY_DEADLINE_S:-300}"; CSRC_BUILD_S=30; WARMUP_S=60; HEADLINE_TEST_S=60
  BENCH_HEADLINE_S="${DRY_BENCH_S:-40}"; GPU_TEST_S=60; TRITON_TEST_S=30; LAUNCH_OVERHEAD_S=40
  MIXED_TASKS_S=40; MIXED_TASKS_ARGS="--layers 1 --batch 4 --seq 32"
  BENCH_FULL_MIN_S=100000
  export TRITON_INTERPRET=1
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE_S - REPORT_S - $(elapsed) )); }
limit() { local want=$1 have; have=$(left); [ "$have" -lt "$want" ] && want=$have; [ "$want" -lt 5 ] && want=5; echo "$want"; }
declare -A STEP_RC

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "== gpu_check.sh  $(date -u +%Y-%m-%dT%H:%M:%SZ)  root=$ROOT  out=$OUT  python=$PY  device=$DEVICE" \
     "dry_run=$DRY_RUN  autotune_configs=$PEFOPS_AUTOTUNE_CONFIGS  deadline=${DEADLINE_S}s"

# ---- 1 versions
echo "== 1 versions  t=$(elapsed)s"
{
  nvidia-smi || echo "nvidia-smi failed"
  echo
  timeout -s INT 60 "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
for name in ("triton", "pytest", "tqdm", "matplotlib", "transformers"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "installed"))
    except ImportError:
        print(name, "not installed")
EOF
  echo
  PEFOPS_CUDA_EXT=0 timeout -s INT 60 "$PY" -m pefops || echo "python -m pefops failed"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# ---- 2 csrc build, in the background
echo "== 2 csrc build in the background (limit ${CSRC_BUILD_S}s)  t=$(elapsed)s"
(
  t0=$(date +%s)
  timeout -s INT -k 10 "$CSRC_BUILD_S" "$PY" -c '
import sys
from pefops import csrc
reasons = csrc.unavailable_reasons()
if reasons:
    print("csrc not built:", "; ".join(reasons)); sys.exit(3)
csrc.load(verbose=True)
print("csrc built and loaded:", csrc.build_directory())
' > "$OUT/csrc_build.log" 2>&1
  rc=$?
  echo "csrc build exit code $rc after $(( $(date +%s) - t0 ))s" >> "$OUT/csrc_build.log"
  echo "$rc" > "$OUT/.csrc_rc"
) &
CSRC_PID=$!

# ---- 3 warm-up (beside the build; kept off the extension so that it does not wait on the build's lock)
echo "== 3 warm-up: headline variants (limit ${WARMUP_S}s)  t=$(elapsed)s"
PEFOPS_CUDA_EXT=0 timeout -s INT -k 10 "$(limit "$WARMUP_S")" "$PY" -m bench.headline --device "$DEVICE" \
  --out "$OUT/warmup.json" 2>&1 | tee "$OUT/warmup.log"
STEP_RC[warmup]=${PIPESTATUS[0]}
echo "warm-up exit code ${STEP_RC[warmup]}  t=$(elapsed)s"

run_tests() {  # name, limit, pytest arguments...
  local name=$1 seconds; seconds=$(limit "$2"); shift 2
  echo "== tests $name (limit ${seconds}s): pytest $*  t=$(elapsed)s"
  timeout -s INT -k 15 "$seconds" "$PY" -m pytest "$@" -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_$name.xml" 2>&1 | tee "$OUT/pytest_$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "tests $name: interrupted (SIGINT) at ${seconds}s; the summary and XML hold what ran"
  echo "tests $name exit code: $rc  t=$(elapsed)s"
  STEP_RC[$name]=$rc
}

# ---- 4 headline tests
run_tests headline "$HEADLINE_TEST_S" tests/ops/test_gpu_headline.py

# ---- 5 headline benchmark rows: every op's --quick set (the headline shapes first), equal shares
OPS="${BENCH_OPS:-$("$PY" -c 'from bench.interface import REGISTRY; print(" ".join(REGISTRY))')}"
run_bench() {  # tag, total seconds, extra args...
  local tag=$1 total; total=$(limit "$2"); shift 2
  local ops=($OPS) n i=0 op start_step
  n=${#ops[@]}
  start_step=$(elapsed)
  for op in "${ops[@]}"; do
    i=$(( i + 1 ))
    local used=$(( $(elapsed) - start_step )) share budget
    share=$(( (total - used) / (n - i + 1) ))
    [ "$share" -lt 20 ] && share=20
    share=$(limit "$share")
    budget=$(( share * 2 / 3 ))
    echo "== bench $tag $op (budget ${budget}s, limit ${share}s)  t=$(elapsed)s"
    local extra=()
    [ "$op" = adapter_fusion ] && extra=(--providers eager,pefops,nofusion)
    timeout -s INT -k 10 "$share" "$PY" -m bench --device "$DEVICE" --ops "$op" --out "$OUT/results_$tag/$op" \
      --budget-s "$budget" --no-plots "$@" "${extra[@]}" 2>&1 | tee -a "$OUT/bench_$tag.log" | tail -n 15
    local rc=${PIPESTATUS[0]}
    echo "bench $tag $op exit code: $rc  t=$(elapsed)s"
    [ "${STEP_RC[bench_$tag]:-0}" = 0 ] && STEP_RC[bench_$tag]=$rc
  done
}
run_bench headline "$BENCH_HEADLINE_S" --quick

# ---- 6 the csrc build must be done before the tier that loads it
echo "== 6 waiting for the csrc build  t=$(elapsed)s"
wait "$CSRC_PID"
cat "$OUT/csrc_build.log" | tail -n 5
STEP_RC[csrc]=$(cat "$OUT/.csrc_rc" 2>/dev/null || echo 1); rm -f "$OUT/.csrc_rc"

# ---- 7 the rest of the gpu tier (real-size kernels first, csrc decode kernels, hf on cuda)
run_tests gpu "$GPU_TEST_S" tests/kernels tests/ops tests/hf tests/csrc -m "gpu and not slow" \
  --ignore=tests/ops/test_gpu_headline.py

# ---- 8 the Triton tier, compiled for the device
run_tests triton "$TRITON_TEST_S" tests -m "triton and not gpu and not slow"

# ---- 8b per-call host overhead at tiny shapes (the small headline cases; a SIGINT keeps the rows measured)
echo "== 8b launch overhead (limit ${LAUNCH_OVERHEAD_S}s)  t=$(elapsed)s"
timeout -s INT -k 10 "$(limit "$LAUNCH_OVERHEAD_S")" "$PY" -m bench.launch_overhead --device "$DEVICE" --calls 20 \
  --rounds 3 --out "$OUT/launch_overhead.json" 2>&1 | tee "$OUT/launch_overhead.log" | tail -n 30
STEP_RC[launch_overhead]=${PIPESTATUS[0]}

# ---- 8c mixed-task batch end to end (issue 15), half the limit per model
echo "== 8c mixed tasks (limit ${MIXED_TASKS_S}s)  t=$(elapsed)s"
STEP_RC[mixed_tasks]=0
for model in bert-base llama; do
  timeout -s INT -k 10 "$(limit $(( MIXED_TASKS_S / 2 )))" "$PY" -m bench.mixed_tasks --device "$DEVICE" \
    --model "$model" $MIXED_TASKS_ARGS --out "$OUT/mixed_tasks.json" 2>&1 | tee -a "$OUT/mixed_tasks.log" | tail -n 6
  rc=${PIPESTATUS[0]}
  [ "$rc" != 0 ] && STEP_RC[mixed_tasks]=$rc
done
echo "mixed tasks exit code: ${STEP_RC[mixed_tasks]}  t=$(elapsed)s"

# ---- 9 full benchmark grids with what is left
if [ "$(left)" -ge "$BENCH_FULL_MIN_S" ]; then
  run_bench full "$(left)"
else
  echo "== 9 full benchmark grids skipped: $(left)s left (< ${BENCH_FULL_MIN_S}s)"
fi

# ---- 10 merge + report
echo "== 10 merging benchmark results  t=$(elapsed)s"
merge() {  # tag, destination
  local files=()
  for op in $OPS; do
    local found; found=$(ls "$OUT/results_$1/$op"/latest-*.json 2>/dev/null | head -n 1)
    [ -n "$found" ] && files+=("$found") || echo "$1 $op: no results"
  done
  [ "${#files[@]}" -gt 0 ] && timeout -s INT 30 "$PY" -m bench.merge "$2" "${files[@]}"
}
merge headline "$OUT/results" || STEP_RC[merge]=1
[ -d "$OUT/results_full" ] && { mkdir -p "$OUT/results/full"; merge full "$OUT/results/full" || true; }
timeout -s INT 20 "$PY" -m bench.report --results "$OUT/results" --print > "$OUT/results_table.md" 2>&1 ||
  echo "report failed"
rm -rf "$OUT/results_headline" "$OUT/results_full"   # per-op copies: merged above (fewer files come back)

echo "== done in $(elapsed)s (deadline ${DEADLINE_S}s, dry_run=$DRY_RUN)"
FAILED=0
for step in "${!STEP_RC[@]}"; do
  echo "   $step: exit ${STEP_RC[$step]}"
  [ "${STEP_RC[$step]}" != 0 ] && FAILED=1
done
# At most 8 files come back from the device: everything goes into one archive, and the few files
# read first stay beside it (this log, the table, the warm-up's compile times, the merged results).
tar -czf "$OUT/gpu_check_all.tar.gz" -C "$OUT" --exclude=gpu_check_all.tar.gz . 2>/dev/null
find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu_check.log ! -name gpu_check_all.tar.gz ! -name results_table.md \
  ! -name warmup.json ! -name launch_overhead.json ! -name results -exec rm -rf {} +
find "$OUT/results" -mindepth 1 ! -name 'latest-*.json' ! -name 'latest-*.md' -exec rm -rf {} + 2>/dev/null
ls -la "$OUT" "$OUT/results"
head -n 30 "$OUT/results_table.md" 2>/dev/null
exit $FAILED
