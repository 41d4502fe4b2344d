#!/usr/bin/env bash
# Every GPU measurement lorafit wants, unattended, in under 8 minutes, on a fresh GPU machine:
#   bash tools/gpu_check.sh            # install (README's tools/install.sh), measure, print RESULTS.md rows
#   bash tools/gpu_check.sh --dry-run  # the same on a CPU at tiny sizes (what CI runs)
# What it measures and how: tools/gpu_check.py. Raw rows go to benchmarks/results-gpu.jsonl.
# LORAFIT_SKIP_INSTALL=1 skips the install (an environment that has it already, e.g. CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${LORAFIT_SKIP_INSTALL:-}" != "1" ]; then
  bash tools/install.sh
fi
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1  # random-weight architectures from the configs in lorafit/bench: nothing to download
exec python tools/gpu_check.py "$@"
