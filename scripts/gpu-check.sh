#!/usr/bin/env bash
# One prepared command for a lent GPU (device time is scarce: run it once, quote its output).
#
#   bash scripts/gpu-check.sh [out-dir]
#
# 1. the tests that need CUDA (CUDA-graph capture of a whole training step, reduce-overhead
#    compile, the GPU suite's smallest entry), ~1-2 minutes;
# 2. `sliceout-fx bench gpu`: every suite entry in eager, compiled and CUDA-graph mode within a
#    budget of 300 s (entries that would start later are recorded as skipped).
# Results land in <out-dir> (default bench-results/gpu-check): pytest log, results.json/.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-bench-results/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" \
    | tee "$OUT/device.txt"
"$PY" -m pytest -q -x tests/test_capturable.py tests/test_gpu_bench.py -k "cuda or reduce_overhead" \
    -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/pytest-cuda.txt"
"$PY" -m sliceout_fx.cli bench gpu --device cuda --budget 300 --repeats 10 --warmup 3 \
    --out "$OUT" 2>&1 | tail -40 | tee "$OUT/suite.txt"
