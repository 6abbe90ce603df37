#!/usr/bin/env bash
# Set up ./.venv with jishi and what it needs to build bundles and run the tests.
#   bash scripts/setup.sh            build + test + serve extras (torch, transformers, onnx, pytest, starlette, ...)
#   bash scripts/setup.sh runtime    the runtime only (what a Raspberry Pi needs: no torch)
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ "${1:-build}" = runtime ]; then
  python -m pip install --quiet -e .
else
  # The CPU build of torch, pinned, before anything that depends on torch: an open
  # range would pull a multi-GB CUDA build.
  python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
  python -m pip install --quiet -e ".[build,test,serve]"
fi
echo "Ready: . .venv/bin/activate"
