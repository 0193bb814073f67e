#!/usr/bin/env bash
# Set up (the project's virtual environment, .venv), then run the test suite in it (the GPU tests
# run where CuPy sees a GPU, and are skipped elsewhere). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${GPUCONV_VENV:-.venv}/bin/python" -m pytest -q "$@"
