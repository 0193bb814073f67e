#!/usr/bin/env bash
# Installs gpuconv and what it needs on this machine: the package (editable) with the extras named
# in $1 (comma-separated), CuPy when an NVIDIA driver is present, and the Fashion-MNIST files from
# Debian's package where apt-get can be used.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
    if python3 -c "import cupy" >/dev/null 2>&1; then
        :  # a working CuPy is already installed; keep it
    elif [ "${cuda_major:-12}" -ge 13 ]; then
        extras="${extras:+$extras,}cuda13"
    else
        extras="${extras:+$extras,}cuda12"
    fi
fi
python3 -m pip install -q -e ".${extras:+[$extras]}"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "note: could not install dataset-fashion-mnist; gpuconv will look elsewhere or download" >&2
fi
