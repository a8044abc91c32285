#!/usr/bin/env bash
# `make bench-load` / `make bench-api`: a private native stack on the tiny random-weight model
# (its own ports, run dir, bucket and Redis prefix), the given bench script against it, then the
# stack is stopped. Usage: scripts/bench_stack.sh bench/load.py [args...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
script=$1; shift
export CLIPMASK_RUN_DIR=.run/bench CLIPMASK_API_BIND=127.0.0.1:18100 CLIPMASK_FLOWER_PORT=15655
export CLIPMASK_S3_PORT=19100 CLIPMASK_WORKER_METRICS_PORT=19808
# the bench reads the database and the bucket too, so it needs what stack.sh would default
export CLIPMASK_S3_ENDPOINT_URL=http://127.0.0.1:19100
export CLIPMASK_S3_ACCESS_KEY_ID=${CLIPMASK_S3_ACCESS_KEY_ID:-clipmask}
export CLIPMASK_S3_SECRET_ACCESS_KEY=${CLIPMASK_S3_SECRET_ACCESS_KEY:-clipmask-secret}
export CLIPMASK_S3_BUCKET="clipmask-bench-$$" CLIPMASK_REDIS_KEY_PREFIX="clipmask-bench-$$:"
export CLIPMASK_LOG_LEVEL=WARNING CLIPMASK_API_WORKERS=${CLIPMASK_API_WORKERS:-4}
# the bench's own image server; every other private address stays refused
export CLIPMASK_FETCH_ALLOW_ENDPOINTS='["127.0.0.1:18199"]' CLIPMASK_BENCH_IMAGE_PORT=18199
mkdir -p "$CLIPMASK_RUN_DIR"
[ -f "$CLIPMASK_RUN_DIR/tiny-model/config.json" ] || "$BIN/clipmask" dev-model "$CLIPMASK_RUN_DIR/tiny-model" >/dev/null
export CLIPMASK_MODEL="$(realpath -m -- "$CLIPMASK_RUN_DIR")/tiny-model"
trap 'scripts/stack.sh down' EXIT
scripts/stack.sh up
[ -n "${CLIPMASK_DATABASE_URL:-}" ] || . "$CLIPMASK_RUN_DIR/env"
"$BIN/python" "$script" --base-url "http://$CLIPMASK_API_BIND" "$@"
