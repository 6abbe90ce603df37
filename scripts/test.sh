#!/usr/bin/env bash
# Set up and run the whole test suite, the slow tests on the real base model included.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick ones only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest "$@"
