#!/usr/bin/env bash
# Issue 15, item 5: one prepared run for a session lent a GPU machine (the `device` tool's `run`).
#
# The machine's python3 has torch (CUDA), lightning, torchmetrics, transformers, onnx, onnxruntime, pytest,
# pytest-xdist and hypothesis, but not torch-pruning or jsonargparse: carry them as wheels. Here, once, in the repo's
# root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl torch-pruning jsonargparse docstring-parser typeshed-client
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=330)
# (`bash benchmarks/gpu_check.sh --gpu-only` leaves out the CPU suite: about 200 s, for a rerun after a fix.)
#
# First, alone on the idle machine: gpu_check.json/.log, benchmarks/gpu_check.py (FSDP2 bf16 on one GPU, 2:4 speed).
# Then three things side by side on the machine's 16 cores, all stopped inside about 300 s:
# - suite_cpu.log: the whole test suite as CI runs it (CPU, the machine's torch), 8 workers;
# - suite_gpu.log: the callbacks' tests with every `conftest.trainer()` on the GPU
#   (LIGHTNING_COMPRESS_TEST_ACCELERATOR=gpu); the spawned DDP/FSDP/kill tests stay on CPU and are left out;
# - structured.log and fsdp2.log: examples/structured.py and examples/fsdp2.py on the GPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# gpu_check.py first, alone, so that its 2:4 timings are taken on an idle machine.
timeout 120 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check: rc $?"; tail -n 16 "$OUT/gpu_check.log"

# The suites are stopped by SIGINT, on which pytest still prints its failures and summary.
cpu_suite=
if [ "${1:-}" != "--gpu-only" ]; then
    timeout -s INT -k 30 280 python3 -m pytest -v -p no:cacheprovider -n 8 -rfE --tb=short tests \
        > "$OUT/suite_cpu.log" 2>&1 &
    cpu_suite=$!
fi

LIGHTNING_COMPRESS_TEST_ACCELERATOR=gpu timeout -s INT -k 30 200 python3 -m pytest -q -p no:cacheprovider -n 5 \
    -rfE --tb=short tests/callbacks tests/core/test_group_check.py tests/core/test_pruner.py \
    --ignore=tests/callbacks/test_ddp.py --ignore=tests/callbacks/test_fsdp.py --ignore=tests/callbacks/test_kill.py \
    > "$OUT/suite_gpu.log" 2>&1 &
gpu_suite=$!

(cd /tmp && timeout 90 python3 "$OLDPWD/examples/structured.py" --out /tmp/structured_export) > "$OUT/structured.log" 2>&1
echo "structured: rc $?"; tail -n 12 "$OUT/structured.log"
(cd /tmp && timeout 70 python3 "$OLDPWD/examples/fsdp2.py" --accelerator gpu --devices 1 --out /tmp/fsdp2_export) \
    > "$OUT/fsdp2.log" 2>&1
echo "fsdp2: rc $?"; tail -n 6 "$OUT/fsdp2.log"

wait $gpu_suite; echo "suite on GPU: rc $?"; tail -n 40 "$OUT/suite_gpu.log"
if [ -n "$cpu_suite" ]; then wait $cpu_suite; echo "suite on CPU: rc $?"; tail -n 25 "$OUT/suite_cpu.log"; fi
