#!/usr/bin/env bash
# One run on a GPU machine: the machine and versions, the GPU tests, then the full benchmark.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Needs CuPy, PyTorch, pytest and a CUDA GPU already installed; installs nothing and needs no
# network (the package runs from the checkout through PYTHONPATH). Writes into $OUT (default
# benchmarks/results/gpu-check-<UTC date and time>):
#   machine.txt      nvidia-smi, driver, CUDA, Python package versions
#   pytest-gpu.log   python -m pytest -m gpu
#   bench.log        the benchmark's progress, one line per row as it is measured
#   bench/results.md, bench/results.json, bench/results.png   (rewritten after every case)
# Logs are tee'd as they are written, so a run cut short keeps what it did. The whole run fits in
# 530 s (a GPU machine may give a command 10 minutes): every step before the benchmark has a time
# limit (the GPU tests 3 minutes), the benchmark gets what is left, and it runs its most important
# cases first. Exits non-zero if the GPU tests fail or no GPU is usable.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    timeout 20 nvidia-smi || echo "nvidia-smi failed"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    timeout 20 nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not found"
    timeout 60 "$PYTHON" - <<'EOF'
import platform

import numpy

print("python", platform.python_version(), "numpy", numpy.__version__)
try:
    import cupy

    runtime = cupy.cuda.runtime
    print("cupy", cupy.__version__, "CUDA runtime", runtime.runtimeGetVersion(), "driver", runtime.driverGetVersion())
except Exception as exc:  # report and go on: the tests below say what is missing
    print("cupy unusable:", exc)
try:
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "sees GPU:", torch.cuda.is_available())
except Exception as exc:
    print("torch unusable:", exc)
import gpuconv

print("gpuconv", gpuconv.__version__, "| device auto:", gpuconv.resolve_device("auto")[1])
EOF
} 2>&1 | tee "$OUT/machine.txt"

# The GPU tests first: they decide the exit status. Without a usable GPU they would all be
# skipped and pass, so that is a failure of its own.
{
    timeout 60 "$PYTHON" -c 'import sys, gpuconv; ok, why = gpuconv.cuda_status(); print("== CUDA:", why); sys.exit(0 if ok else 1)'
    gpu_status=$?
    timeout 180 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
    tests_status=$?
    echo "== GPU tests exit status: $tests_status"
    [ "$gpu_status" -eq 0 ] && exit "$tests_status"
    echo "== no usable GPU: failing the check"
    exit 1
} 2>&1 | tee "$OUT/pytest-gpu.log"
check_status=${PIPESTATUS[0]}

# The full benchmark, most important cases first (convnet-benchmarks convolutions, training
# steps, the models' kernels, the epoch); rows not started within the time budget are listed as
# skipped. CPU rows at smaller batches keep the NumPy path's share of the time small.
# $BENCH_ARGS (e.g. "--quick" or "--only alexnet") is added last, so it overrides these. No row
# starts after the time budget; the last one gets 40 s to finish before the hard timeout. The
# steps above take at most 360 s, so the benchmark gets at least 170 s (usually over 300).
TOTAL_SECONDS=530
bench_seconds=$(( TOTAL_SECONDS - SECONDS ))
# shellcheck disable=SC2086
timeout "$bench_seconds" "$PYTHON" -m gpuconv.bench --out "$OUT/bench" --repeats 20 --warmup 3 \
    --max-row-seconds 1.5 --time-budget $(( bench_seconds - 40 )) ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "== benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"

exit "$check_status"
