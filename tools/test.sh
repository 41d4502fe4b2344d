#!/usr/bin/env bash
# The README's test command: install (if needed) and run the whole test suite on the CPU, offline.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k convert`, or `-m "not slow"` for the quick part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
# The review page's browser test needs Chromium (installed with apt-get as root). Where that is not
# possible it is switched off with a notice, unless LORAFIT_BROWSER_TESTS=1 demands it (CI).
if [ "${LORAFIT_BROWSER_TESTS:-}" != "1" ] && ! bash tools/install_browser.sh; then
  echo "test.sh: no Chromium, so tests/test_review_browser.py is skipped (LORAFIT_BROWSER_TESTS=0)" >&2
  export LORAFIT_BROWSER_TESTS=0
fi
# Two workers for two cores; each test process uses one torch thread (tests/conftest.py).
python -m pytest -n "${LORAFIT_TEST_WORKERS:-2}" -q "$@"
