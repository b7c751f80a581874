#!/usr/bin/env bash
# Issue 15, item 5: one prepared run for a session lent a GPU machine (the `device` tool's `run`).
#
# The machine's python3 has torch (CUDA), lightning, torchmetrics, transformers, onnx, onnxruntime, pytest and
# pytest-xdist, but not torch-pruning or jsonargparse: carry them as wheels. Here, once, in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl torch-pruning jsonargparse docstring-parser typeshed-client
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results come back under $OUT: suite.log (the test suite on CUDA), gpu_check.json and gpu_check.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# the GPU checks first (short), then the suite with 8 workers, stopped well inside the call's limit
timeout 180 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 2>&1 | tee "$OUT/suite.log" | tail -n 60
