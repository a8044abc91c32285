#!/usr/bin/env bash
# The GPU readiness check, one command on a CUDA host (make gpu-check):
#   1. the engine equivalence tests, on the CPU and on CUDA (fp32 and bf16);
#   2. the engine benchmark with the full-size architecture: stock transformers fp32 against the
#      engine in bf16, images/s, latency, peak memory, vision-encoder TFLOP/s against the bf16 peak;
#   3. the same with 16 prompts and a bigger batch, and with torch.compile;
#   4. bench/outputs.py: what each output kind costs per image with the model on the GPU.
# It needs torch (CUDA build), transformers, pillow, numpy, pytest, pytest-timeout, hypothesis and
# pycocotools: nothing of the stack (no Postgres, Redis or S3). Logs and one JSON line per run go
# to $GPU_OUT. GPU_STEPS picks steps (default: tests engine engine16 compile outputs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
GPU_OUT=${GPU_OUT:-${OUT:-bench/out}}
IMAGES=${GPU_IMAGES:-512}
STEPS=" ${GPU_STEPS:-tests engine engine16 compile outputs} "
mkdir -p "$GPU_OUT"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run, log to $GPU_OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$GPU_OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name failed (exit $rc)"; status=1; }
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, transformers, PIL; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__, "pillow", PIL.__version__,
"gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    nproc
} 2>&1 | tee "$GPU_OUT/machine.txt"

want() { [[ "$STEPS" == *" $1 "* ]]; }
want tests && step engine-tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/worker/test_engine_equivalence.py
want engine && step engine-bench 600 "$PY" bench/engine.py --model full --device cuda --prompts 4 \
    --images "$IMAGES" --stock-images 32 --batch 32 --json
want engine16 && step engine-bench-b64-p16 600 "$PY" bench/engine.py --model full --device cuda --prompts 16 \
    --images "$IMAGES" --stock-images 16 --batch 64 --json
want compile && step engine-bench-compile 600 "$PY" bench/engine.py --model full --device cuda --prompts 4 \
    --images "$IMAGES" --stock-images 16 --batch 32 --compile --json
want outputs && step outputs-bench 300 "$PY" bench/outputs.py --model full --device cuda --json
exit $status
