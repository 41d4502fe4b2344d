#!/usr/bin/env bash
# The README's test command: install (if needed) and run the whole test suite on the CPU, offline.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k convert`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
# Two workers for two cores; each test process uses one torch thread (tests/conftest.py).
python -m pytest -n "${LORAFIT_TEST_WORKERS:-2}" -q "$@"
