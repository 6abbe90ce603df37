#!/usr/bin/env bash
# The peers' own environment for bench/spine.py: onnxruntime-genai (its model builder needs
# transformers 5) and llama-cpp-python (compiles llama.cpp: about 11 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
.venv-peers/bin/pip install --quiet torch==2.13.0
.venv-peers/bin/pip install --quiet transformers onnxruntime-genai onnx-ir onnx onnxruntime numpy gguf accelerate
.venv-peers/bin/pip install --quiet 'llama-cpp-python[server]'  # the server extras: bench/serve.py runs its server
