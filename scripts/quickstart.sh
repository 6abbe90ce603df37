#!/usr/bin/env bash
# Set up, fetch the default base (SmolLM2-135M-Instruct), build its bundle (the GGUF's own grids: --quant gguf) and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
[ -f bundles/smollm2-135m-instruct-gguf/manifest.json ] || jishi build
jishi info bundles/smollm2-135m-instruct-gguf
echo
echo "> ${1:-What is the plural of mouse?}"
jishi run bundles/smollm2-135m-instruct-gguf "${1:-What is the plural of mouse?}" --temperature 0
