#!/usr/bin/env bash
# Set up, fetch the default base (SmolLM2-135M-Instruct), build its int4 bundle and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
[ -f bundles/smollm2-135m-instruct-int4/manifest.json ] || jishi build
jishi info bundles/smollm2-135m-instruct-int4
echo
echo "> ${1:-What is the plural of mouse?}"
jishi run bundles/smollm2-135m-instruct-int4 "${1:-What is the plural of mouse?}" --temperature 0
