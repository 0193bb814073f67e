#!/usr/bin/env bash
# Set up, then run the test suite (the GPU tests run where CuPy sees a GPU, and are skipped elsewhere).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec python3 -m pytest -q "$@"
