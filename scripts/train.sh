#!/usr/bin/env bash
# The main job: set up (the project's virtual environment, .venv), then train LeNet-5 on
# Fashion-MNIST (on the GPU if there is one, else the CPU) into runs/lenet5.
# Extra arguments go to `gpuconv train`, e.g. `bash scripts/train.sh --epochs 10`; a second run
# into the same directory needs --resume (continue) or --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The command to print for resuming after Ctrl-C is this script's, as it was typed.
command="bash $(printf '%q' "$0")"
[ $# -eq 0 ] || command+="$(printf ' %q' "$@")"
GPUCONV_COMMAND="$command" exec "${GPUCONV_VENV:-.venv}/bin/gpuconv" train --model lenet5 --dataset fashion-mnist --device auto --epochs 5 \
    --out runs/lenet5 "$@"
