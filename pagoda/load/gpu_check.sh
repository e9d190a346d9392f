#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU, in one call (see docs/perf.md, "Kernels"):
#   1. tests/kernels compiled for the GPU (in the background, pytest-xdist when installed),
#   2. `pagoda bench kernels` at Llama-3-8B shapes (+ --sweep over launch configurations),
#   3. e2e decode of a random-weight Llama-3-8B-shaped model at batch 64 (CUDA graphs, eager,
#      int4 weights) and at batch 1 (bf16 and int4).
# Each step's log goes to $OUT/<step>.log; a summary is printed last. Steps that would not fit in
# the time left ($BUDGET seconds from the start) are skipped and say so.
# Usage: OUT=out BUDGET=540 [SWEEP=all|decode|int4] bash pagoda/load/gpu_check.sh [steps...]   (default: all)
set -u
OUT=${OUT:-out}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
T0=$(date +%s)
STEPS=${*:-tests kernels sweep e2e_graphs e2e_eager e2e_int4 e2e1 e2e1_int4}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME LIMIT CMD...
    local name=$1 limit=$2 start rc
    shift 2
    wants "$name" || return 0
    if [ "$(left)" -lt $((limit / 2)) ]; then
        echo "== $name skipped: $(left) s left" | tee -a "$SUMMARY"
        return 0
    fi
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc in $(($(date +%s) - start)) s" | tee -a "$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee -a "$SUMMARY"

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 6"
if wants tests; then
    step tests 240 $PY -m pytest -q -p no:cacheprovider -p no:asyncio --timeout 120 $XDIST tests/kernels &
    TESTS_PID=$!
fi
step kernels 150 $PY -m pagoda bench kernels
step sweep 200 $PY -m pagoda bench kernels --sweep "${SWEEP:-all}" --only none
[ -n "${TESTS_PID:-}" ] && wait "$TESTS_PID"
step e2e_graphs 150 $PY -m pagoda bench kernels --only none --e2e
step e2e_eager 120 $PY -m pagoda bench kernels --only none --e2e --enforce-eager
step e2e_int4 150 $PY -m pagoda bench kernels --only none --e2e --e2e-quantization int4
step e2e1 100 $PY -m pagoda bench kernels --only none --e2e --e2e-batch 1
step e2e1_int4 100 $PY -m pagoda bench kernels --only none --e2e --e2e-batch 1 --e2e-quantization int4

echo "==== results ($(($(date +%s) - T0)) s)"
for f in tests kernels sweep e2e_graphs e2e_eager e2e_int4 e2e1 e2e1_int4; do
    [ -f "$OUT/$f.log" ] || continue
    echo "---- $f"
    case $f in
    tests) grep -E "passed|failed|Error|error" "$OUT/$f.log" | tail -n 30 ;;
    sweep) grep -E "^sweep|Error|error" "$OUT/$f.log" | tail -n 45 ;;
    *) grep -vE "^\s*$|Warning|warn" "$OUT/$f.log" | tail -n 16 ;;
    esac
done
