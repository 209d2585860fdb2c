#!/usr/bin/env bash
# Set up ./.venv with fatrain installed (editable, with the dev extra).
#
# Where no NVIDIA GPU is visible, the CPU build of torch is installed first, so that the
# project's plain `torch` requirement is already met and pip pulls no multi-GB CUDA
# build. Set FATRAIN_TORCH_SPEC to choose another torch (for example "torch==2.11.0"),
# and PIP_INDEX_URL / PIP_EXTRA_INDEX_URL as usual for pip to find it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "${FATRAIN_TORCH_SPEC:-torch}"
  else
    pip_install "${FATRAIN_TORCH_SPEC:-torch==2.13.0}"
  fi
fi
pip_install -e ".[dev]"
echo "fatrain is set up in $(pwd)/.venv"
