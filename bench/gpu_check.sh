#!/usr/bin/env bash
# One command for a GPU machine (sm_90, H100/H200), ~8 minutes: bash bench/gpu_check.sh OUTDIR
#   1 probe: GPU, versions
#   2 the repository's GPU-marked tests (pytest -m gpu tests/ops, real kernels)
#   3 python -m bench.gpu.correctness: every kernel at its real tile configuration and the target sizes
#     (N = 16,384 x V = 151,936, rows past the 2^31-element offset) against float64 references
#   4 python -m bench: the benchmark driver (target-size timings, inputs drawn on the device, Liger side by side)
#     with what is left of the budget
#   5 results (summary.txt, gpu_check.log, correctness.json, the driver's bench/results files) -> OUTDIR
# Each stage has a time cap and logs its exit code; a failing stage does not stop the next ones. The exit code
# is non-zero if a stage failed.
#   GPU_CHECK_TOTAL_S=480  total budget in seconds        GPU_CHECK_DRYRUN=1  CPU dry run: interpreter, tiny sizes
set -u
OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-480}
DRY=${GPU_CHECK_DRYRUN:-0}
PY=${PY:-python3}
W=$(mktemp -d -t gxpo-gpucheck.XXXXXX)
LOG=$OUTDIR/gpu_check.log
STATUS=$W/status.txt
: > "$STATUS"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=$W/triton PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi

left() { echo $(( TOTAL - $(date +%s) + T0 )); }
FAILED=0
stage() {  # stage NAME CAP_S CMD...: the cap shrinks to what is left (minus a reserve for the results)
  local name=$1 cap=$2; shift 2
  local l=$(( $(left) - 15 ))
  (( cap > l )) && cap=$l
  if (( cap < 10 )); then echo "SKIP $name (time left $(left) s)" | tee -a "$STATUS"; return 0; fi
  echo; echo "########## [$name] cap ${cap}s"
  local s=$(date +%s)
  timeout -k 10 "$cap" "$@"
  local rc=$?
  (( rc != 0 )) && FAILED=1
  echo "$name rc=$rc wall=$(( $(date +%s) - s ))s$([ $rc = 124 ] && echo ' (TIMEOUT)')" | tee -a "$STATUS"
}

probe() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  # the benches need pytest-benchmark; without liger-kernel the Liger side-by-side figures are skipped
  $PY -c "from importlib import metadata as m
for d in ('pytest', 'pytest-benchmark', 'transformers', 'liger-kernel', 'numpy'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'MISSING')"
}
stage probe 30 bash -c "$(declare -f probe); PY=$PY probe"
# the C++ extension (extrapolate_'s CPU op, and the cached-list checks of the public op on every device) builds
# once per machine (minutes): start it now in the background, so that no timed stage spends its cap on it (a
# stage that needs it meanwhile waits on the build's lock rather than building it twice)
# (load_extension warns and returns None on a failed build: exit 1 then, so the summary's rc says it failed)
$PY -c "import sys; from gxpo_kernels.ops.extrapolate._cpp import load_extension; sys.exit(load_extension() is None)" \
  > "$W/cpp_build.log" 2>&1 &
CPP_BUILD=$!

if [ "$DRY" = 1 ]; then
  stage correctness 240 $PY -m bench.gpu.correctness --tiny --out "$OUTDIR/correctness.json"
  stage bench_driver 120 $PY -m bench --smoke --threads 1 --files bench_grpo_loss.py --budget-s 100 --out "$OUTDIR/bench"
else
  # no -x: one run on a lent GPU should report every gpu test, not stop at the first failure; the cap leaves room
  # for waiting on the background C++ build (the public extrapolate_'s first CUDA call needs it)
  stage pytest_gpu 100 $PY -m pytest -q -rfE -m gpu tests/ops -p no:cacheprovider
  stage correctness 150 $PY -m bench.gpu.correctness --out "$OUTDIR/correctness.json"
  B=$(( $(left) - 30 ))
  # the README's three GPU targets first: the driver's run order is its priority when the budget is short
  stage bench_driver $(( B + 20 )) $PY -m bench --budget-s "$B" --out "$OUTDIR/bench" --files bench_grpo_loss.py \
    bench_linear_grpo_loss.py bench_extrapolate.py bench_fpa.py bench_update_throughput.py bench_linear_fpa.py
fi

wait "$CPP_BUILD"
echo "cpp_build rc=$? (a failed build only slows the CPU op and the cached-list checks)" | tee -a "$STATUS"
cat "$W/cpp_build.log"
{
  echo "gpu_check: $(( $(date +%s) - T0 )) s, dry run: $DRY"
  cat "$STATUS"
  [ -f "$OUTDIR/correctness.json" ] && $PY -c "
import json, sys
d = json.load(open(sys.argv[1]))
for r in d['results']:
    print(f\"  {r['status']:5} {r['name']}\", {k: f'{v:.1e}' for k, v in (r.get('errs') or {}).items()}, r.get('error', ''))
if not d.get('complete', True):
    print(f\"  INCOMPLETE: {len(d['results'])} of {d.get('n_cases', '?')} cases ran (stage time limit)\")
" "$OUTDIR/correctness.json"
  ls "$OUTDIR"/bench 2>/dev/null | sed 's/^/  bench: /'
} > "$OUTDIR/summary.txt" 2>&1
echo; echo "==================== SUMMARY ===================="; cat "$OUTDIR/summary.txt"
rm -rf "$W"
exit $FAILED
