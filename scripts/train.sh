#!/usr/bin/env bash
# The main job: set up, then train LeNet-5 on Fashion-MNIST (on the GPU if there is one, else the CPU).
# Extra arguments go to `gpuconv train`, e.g. `bash scripts/train.sh --epochs 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec gpuconv train --model lenet5 --dataset fashion-mnist --device auto --epochs 5 --out runs/lenet5 "$@"
