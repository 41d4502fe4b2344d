#!/usr/bin/env bash
# Install lorafit (+ test extras) into ./.venv, or into the active virtualenv/conda env if there is one.
#
# torch is installed first and only if missing: a pinned torch==2.13.0 resolves to the CPU wheel on
# CPU-only machines that provide one locally and to the CUDA build from PyPI elsewhere; a torch you
# installed yourself (any CUDA/ROCm build) is kept, because pyproject.toml only sets a floor.
# Override the choice with LORAFIT_TORCH, e.g. LORAFIT_TORCH="torch==2.6.0".
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

if ! python -c "import torch" 2>/dev/null; then
  echo "lorafit install: installing ${LORAFIT_TORCH:-torch==2.13.0}"
  python -m pip install --progress-bar off "${LORAFIT_TORCH:-torch==2.13.0}"
fi
python -m pip install --progress-bar off -q -e ".[dev]"
python -c "import torch, lorafit; print(f'lorafit {lorafit.__version__} with torch {torch.__version__} installed in', __import__('sys').prefix)"
