#!/usr/bin/env bash
# GPU check for the H200 device machine: GPU test tier + the benchmark grid of all 7 op families, in
# under 9.5 minutes (one device call; the session's device budget is 15 minutes, so a rerun fits).
#
#   OUT=/some/folder bash bench/gpu_check.sh        # $OUT is set by the device machine
#
# Runs from the source tree (no pip install: PYTHONPATH is the repository root) with the machine's
# preinstalled torch / triton / pytest; tqdm and matplotlib are optional (without them: plain
# progress lines, no PNGs). No network is needed. Writes to $OUT:
#   gpu_check.log       everything printed below
#   versions.txt        nvidia-smi, python/torch/triton versions, `python -m pefops`
#   pytest_gpu.log      python -m pytest tests -m "gpu and not slow" -q   (+ pytest_gpu.xml), then
#   pytest_triton.log   -m "triton and not gpu and not slow" (+ pytest_triton.xml):
#                       the gpu tier and every Triton-tier test, which run on the device when CUDA is there
#   bench.log           python -m bench --device cuda --ops <op> --out "$OUT/results/<op>", per op
#   results/            latest-cuda-*.json/.md/.png and the timestamped JSON (every op, merged);
#                       results/<op>/ holds each op's own run
#   results_table.md    python -m bench.report --print (the README section for these results)
# Bring results back into the repo: copy $OUT/results/latest-cuda-* to bench/results/ and run
# `python -m bench.report`.
#
# Time limits (seconds; override by environment): DEADLINE_S total (default 560), TEST_TIMEOUT_S for
# the GPU tests (default 220); the benchmarks get what is left, one process per op family (BENCH_OPS,
# default every registered op, in registry order), each with an equal share of the time still left:
# it stops starting new configurations BENCH_MARGIN_S (default 60) before the end of its share and
# is killed at the end of it (the last op: at the deadline). Each op runs its headline shapes first,
# and results are written after every configuration, so a cut-short run still reports.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT/results"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DEADLINE_S="${DEADLINE_S:-560}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-220}"
BENCH_MARGIN_S="${BENCH_MARGIN_S:-60}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

exec > >(tee -a "$OUT/gpu_check.log") 2>&1

echo "== gpu_check.sh  $(date -u +%Y-%m-%dT%H:%M:%SZ)  root=$ROOT  out=$OUT  python=$PY"

echo "== nvidia-smi"
{
  nvidia-smi || echo "nvidia-smi failed"
  echo
  "$PY" - <<'EOF'
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
  timeout 60 "$PY" -m pefops || echo "python -m pefops failed"
} 2>&1 | tee "$OUT/versions.txt"

# Two passes, so that a time-out in the long Triton tier (every interpreter test, now compiled for the
# device) cannot cost the gpu tier's results: first `-m gpu` (real sizes, bf16) with 60% of the test
# time, then the Triton tier with what is left. Each writes its own log and JUnit XML.
GPU_TIER_S=$(( TEST_TIMEOUT_S * 6 / 10 ))
TEST_RC=0
run_tests() {  # name, marker expression, timeout
  echo "== tests: $1 (-m \"$2\", timeout $3s)  t=$(elapsed)s"
  timeout -k 10 "$3" "$PY" -m pytest tests -m "$2" -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_$1.xml" 2>&1 | tee "$OUT/pytest_$1.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "tests $1: TIMED OUT after $3s (see pytest_$1.log for what ran)"
  echo "tests $1 exit code: $rc  t=$(elapsed)s"
  [ "$TEST_RC" = 0 ] && TEST_RC=$rc
}
run_tests gpu "gpu and not slow" "$GPU_TIER_S"
TRITON_LEFT=$(( TEST_TIMEOUT_S - $(elapsed) + 5 ))
[ "$TRITON_LEFT" -lt 30 ] && TRITON_LEFT=30
run_tests triton "triton and not gpu and not slow" "$TRITON_LEFT"

# One benchmark process per op family, each with an equal share of the time left (an op that ends
# early leaves its unused time to the next), so that every op's headline configurations run even
# when an earlier op's grid is large; their JSONs are merged into $OUT/results/latest-cuda-*.
OPS="${BENCH_OPS:-$("$PY" -c 'from bench.runner import REGISTRY; print(" ".join(REGISTRY))')}"
set -- $OPS
N_OPS=$#
BENCH_RC=0
PARTS=()
i=0
for op in $OPS; do
  i=$(( i + 1 ))
  LEFT=$(( DEADLINE_S - $(elapsed) - 25 ))  # 25 s kept for the merge and the report below
  REMAINING=$(( N_OPS - i + 1 ))
  SHARE=$(( LEFT / REMAINING ))             # hard limit of this op (the last one gets all that is left)
  BUDGET=$(( SHARE - BENCH_MARGIN_S ))      # no new configuration after this
  if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
  if [ "$SHARE" -lt 45 ]; then SHARE=45; fi
  echo "== benchmark $op (budget ${BUDGET}s, hard limit ${SHARE}s)  t=$(elapsed)s"
  EXTRA=()
  # torch.compile of N stacked adapters takes most of a share before its first row: leave it out here
  [ "$op" = adapter_fusion ] && EXTRA=(--providers eager,pefops,nofusion)
  timeout -k 10 "$SHARE" "$PY" -m bench --device cuda --ops "$op" --out "$OUT/results/$op" \
    --budget-s "$BUDGET" --no-plots "${EXTRA[@]}" 2>&1 | tee -a "$OUT/bench.log"
  RC=${PIPESTATUS[0]}
  [ "$RC" = 124 ] && echo "benchmark $op: killed at its ${SHARE}s limit (rows measured so far are in its JSON)"
  echo "benchmark $op exit code: $RC  t=$(elapsed)s"
  [ "$BENCH_RC" = 0 ] && BENCH_RC=$RC
  PARTS+=("$op=$OUT/results/$op")
done

echo "== merging the benchmark results into $OUT/results  t=$(elapsed)s"
PART_FILES=()
for part in "${PARTS[@]}"; do
  found=$(ls "${part#*=}"/latest-*.json 2>/dev/null | head -n 1)
  if [ -n "$found" ]; then PART_FILES+=("$found"); else echo "${part%%=*}: no results (killed or failed early)"; fi
done
if [ "${#PART_FILES[@]}" -gt 0 ]; then
  timeout 60 "$PY" -m bench.merge "$OUT/results" "${PART_FILES[@]}" || { echo "merge failed"; [ "$BENCH_RC" = 0 ] && BENCH_RC=1; }
else
  echo "no benchmark results to merge"; [ "$BENCH_RC" = 0 ] && BENCH_RC=1
fi

echo "== results table"
timeout 30 "$PY" -m bench.report --results "$OUT/results" --print | tee "$OUT/results_table.md"

echo "== done in $(elapsed)s: tests rc=$TEST_RC, bench rc=$BENCH_RC"
ls -la "$OUT" "$OUT/results"
if [ "$TEST_RC" != 0 ] || [ "$BENCH_RC" != 0 ]; then exit 1; fi
exit 0
