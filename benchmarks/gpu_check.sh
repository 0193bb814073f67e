#!/usr/bin/env bash
# One short run on a GPU machine: the machine and versions, the whole benchmark table (every GPU
# contender, and a small CPU reference set for the GPU/CPU column), then the GPU tests.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Installs nothing and needs no network: the package runs from this checkout (PYTHONPATH); the
# machine must have CuPy, PyTorch and pytest already (pytest-timeout, when present, gives every
# test its own time limit). Every step is time-boxed (`timeout`, SIGKILL 10 s after), so the
# whole check stays within about 9 minutes; a step that fails or runs out of time is recorded
# and the next one still runs. The benchmark runs its rows in worker processes, one per case
# group on the GPU, so a kernel that faults (an illegal address poisons its process) costs its
# row, not the table; its reports are rewritten atomically after every row, so a run cut short
# keeps every row measured. Writes into $OUT (default runs/gpu-check/<UTC date-time>/):
#   summary.txt                  each step's status and time, then what failed (printed at the end)
#   machine.txt                  nvidia-smi, nvcc, driver, CUDA and Python package versions
#   bench.log                    the benchmark's progress, a line per row, and its failure summary
#   bench/results.md .json .png  the table
#   pytest-gpu.log               python -m pytest -m gpu -v -rA
#   pytest-gpu.xml               its JUnit XML
# Exit status: 1 without a usable GPU, else the GPU tests' status if they failed, else the
# benchmark's (1 when a row failed).
# Environment: PYTHON (python3); step limits in seconds INFO_SECONDS (30), CUDA_SECONDS (30),
# BENCH_SECONDS (300), TESTS_SECONDS (150), TEST_TIMEOUT (60, per test); BENCH_ARGS, PYTEST_ARGS
# (added last, so they win); GPU_CHECK_DRY=1 prints the steps and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/gpu-check/$(date -u +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-python3}"
INFO_SECONDS="${INFO_SECONDS:-30}"
CUDA_SECONDS="${CUDA_SECONDS:-30}"
BENCH_SECONDS="${BENCH_SECONDS:-300}"
TESTS_SECONDS="${TESTS_SECONDS:-150}"
TEST_TIMEOUT="${TEST_TIMEOUT:-60}"
DRY="${GPU_CHECK_DRY:-}"
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME LOG SECONDS COMMAND...: COMMAND time-boxed, its output appended to LOG and shown;
# one line in $SUMMARY; its status in $step_status (124 or 137: it ran out of time).
step() {
    local name=$1 log=$2 seconds=$3 began=$SECONDS what
    shift 3
    if [ -n "$DRY" ]; then
        echo "$name (at most ${seconds} s, into $log): $*" >> "$SUMMARY"
        step_status=0
        return
    fi
    echo "== $name: $* (at most ${seconds} s)" >> "$log"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$log"
    step_status=${PIPESTATUS[0]}
    case $step_status in
        0) what="ok" ;;
        124 | 137) what="timed out after ${seconds} s" ;;
        *) what="exit status $step_status" ;;
    esac
    printf '%-8s %-28s %4d s   %s\n' "$name" "$what" $((SECONDS - began)) "$log" >> "$SUMMARY"
}

machine_report() {
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    timeout 15 nvidia-smi || echo "nvidia-smi failed or is missing"
    timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
        2>/dev/null || true
    timeout 15 nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not found"
    "$PYTHON" -c '
import platform

import numpy

print("python", platform.python_version(), "numpy", numpy.__version__)
try:
    import cupy

    runtime = cupy.cuda.runtime
    print("cupy", cupy.__version__, "CUDA runtime", runtime.runtimeGetVersion(), "driver", runtime.driverGetVersion())
except Exception as exc:  # report and go on: the steps below say what is missing
    print("cupy unusable:", exc)
try:
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "sees GPU:", torch.cuda.is_available())
except Exception as exc:
    print("torch unusable:", exc)
import gpuconv

print("gpuconv", gpuconv.__version__)
'
}
export -f machine_report

step info "$OUT/machine.txt" "$INFO_SECONDS" bash -c machine_report
step cuda "$OUT/machine.txt" "$CUDA_SECONDS" "$PYTHON" -c \
    'import sys, gpuconv; ok, why = gpuconv.cuda_status(); print("CUDA:", why); sys.exit(0 if ok else 1)'
gpu_status=$step_status

# The table. GPU rows first (most important cases first within them), then the CPU reference
# rows: the training steps and the convnet-benchmarks forward convolutions. No row starts in the
# last 60 s, which leave room for the row running then and the final report.
# shellcheck disable=SC2086
step bench "$OUT/bench.log" "$BENCH_SECONDS" "$PYTHON" -m gpuconv.bench --out "$OUT/bench" --device all \
    --cpu-cases train/ --cpu-cases 'convnet-benchmarks/*/conv2d_forward' --repeats 20 --warmup 3 \
    --max-row-seconds 1.5 --row-timeout 90 --time-budget $((BENCH_SECONDS - 60)) ${BENCH_ARGS:-}
bench_status=$step_status

timeout_args=(--timeout "$TEST_TIMEOUT")
if [ -z "$DRY" ] && ! timeout 15 "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
    timeout_args=()
    echo "== pytest-timeout is not installed: the GPU tests have no per-test time limit" >> "$OUT/pytest-gpu.log"
fi
# shellcheck disable=SC2086
step tests "$OUT/pytest-gpu.log" "$TESTS_SECONDS" "$PYTHON" -m pytest -m gpu -p no:cacheprovider -v -rA \
    --junitxml "$OUT/pytest-gpu.xml" ${timeout_args[@]+"${timeout_args[@]}"} ${PYTEST_ARGS:-}
tests_status=$step_status

{
    echo
    [ "$gpu_status" -eq 0 ] || echo "no usable GPU: the GPU tests were skipped and the GPU rows not measured"
    if [ -f "$OUT/bench.log" ]; then
        sed -n '/^gpuconv bench: [0-9]* rows measured/,$p' "$OUT/bench.log"
    fi
    [ -f "$OUT/pytest-gpu.log" ] && grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped).* =+$' \
        "$OUT/pytest-gpu.log" | tail -n 40
} >> "$SUMMARY"
echo "== summary ($SUMMARY)"
cat "$SUMMARY"

if [ "$gpu_status" -ne 0 ]; then
    exit 1
fi
[ "$tests_status" -ne 0 ] && exit "$tests_status"
exit "$bench_status"
