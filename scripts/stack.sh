#!/usr/bin/env bash
# Native stack: `stack.sh up` starts (in the background) an S3-protocol server, the API under
# gunicorn, one Celery worker and Flower, after making sure Postgres and Redis answer; it returns
# when /readyz is 200. `stack.sh down` stops exactly the processes whose pid files it wrote.
# Running `up` twice is harmless. Pids and logs live under $CLIPMASK_RUN_DIR (default .run/).
set -euo pipefail
cd "$(dirname "$0")/.."

# The run folder, absolute or relative to the repository, as one absolute path for every use below.
RUN=$(realpath -m -- "${CLIPMASK_RUN_DIR:-.run}")
BIN=${VENV:-.venv}/bin
mkdir -p "$RUN/logs" "$RUN/pids"

# Defaults for the native stack; any CLIPMASK_* already set in the environment wins.
# CLIPMASK_DATABASE_URL unset: the `clipmask` database on a local Postgres with pgvector (below).
export CLIPMASK_REDIS_URL=${CLIPMASK_REDIS_URL:-redis://127.0.0.1:6379/0}
export CLIPMASK_S3_ACCESS_KEY_ID=${CLIPMASK_S3_ACCESS_KEY_ID:-clipmask}
export CLIPMASK_S3_SECRET_ACCESS_KEY=${CLIPMASK_S3_SECRET_ACCESS_KEY:-clipmask-secret}
export CLIPMASK_FLOWER_USER=${CLIPMASK_FLOWER_USER:-admin}
export CLIPMASK_FLOWER_PASSWORD=${CLIPMASK_FLOWER_PASSWORD:-change-me}
# The native stack is a development stack: it accepts the default Flower password above.
export CLIPMASK_ENVIRONMENT=${CLIPMASK_ENVIRONMENT:-development}
API_BIND=${CLIPMASK_API_BIND:-127.0.0.1:8000}
FLOWER_PORT=${CLIPMASK_FLOWER_PORT:-5555}
S3_PORT=${CLIPMASK_S3_PORT:-9000}
export CLIPMASK_S3_ENDPOINT_URL=${CLIPMASK_S3_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}

say() { echo "[stack] $*"; }

# A process is alive when its pid exists and is not a zombie: `kill -0` succeeds on zombies, and
# where PID 1 does not reap (many containers) a SIGKILLed worker lingers as one.
alive() {
  local file="$RUN/pids/$1.pid" state
  [ -f "$file" ] || return 1
  state=$(ps -o stat= -p "$(cat "$file")" 2>/dev/null) || return 1
  case "$state" in Z*|X*|"") return 1 ;; esac
}

start_bg() {  # name command...
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$RUN/pids/$name.pid"))"; return; fi
  if [ -f "$RUN/pids/$name.pid" ]; then say "$name (pid $(cat "$RUN/pids/$name.pid")) is not running; starting it again"; fi
  setsid nohup "$@" >>"$RUN/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/pids/$name.pid"
  say "$name started (pid $!), log $RUN/logs/$name.log"
}

wait_for() {  # description seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  say "$what did not come up in ${secs}s"; return 1
}

ensure_postgres() {  # a Postgres with pgvector: the system one if it has it, else scripts/pgvector.sh's
  if [ -n "${CLIPMASK_DATABASE_URL:-}" ]; then return; fi
  local port
  port=$(scripts/pgvector.sh ensure) || { say "no Postgres with pgvector: set CLIPMASK_DATABASE_URL"; exit 1; }
  export CLIPMASK_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$port/clipmask"
  # for the CLI beside the stack (`. .run/env`), demo.sh and the bench and fuzz scripts
  echo "export CLIPMASK_DATABASE_URL=$CLIPMASK_DATABASE_URL" >"$RUN/env"
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return; fi
  say "Redis not answering; starting it"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --pidfile "$RUN/pids/redis-server.pid" --logfile "$RUN/logs/redis.log"
  wait_for Redis 15 redis-cli -h 127.0.0.1 -p 6379 ping
}

ensure_database() {  # the local database the URL names, created if missing
  case "$CLIPMASK_DATABASE_URL" in
    *@127.0.0.1:*/*|*@localhost:*/*)
      local name=${CLIPMASK_DATABASE_URL##*/} port=${CLIPMASK_DATABASE_URL##*:}; name=${name%%\?*}; port=${port%%/*}
      psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$name'" | grep -q 1 \
        || psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc "CREATE DATABASE \"$name\"" ;;
  esac
}

up() {
  ensure_postgres
  ensure_redis
  ensure_database
  if [ "$CLIPMASK_S3_ENDPOINT_URL" = "http://127.0.0.1:$S3_PORT" ]; then
    # SeaweedFS: objects on disk under $RUN/s3 (they outlive `down`/`up`; `make clean` removes them),
    # SigV4 with the CLIPMASK_S3_* keys; ports $S3_PORT to $S3_PORT+7 (cli/dev_s3.py)
    start_bg s3 "$BIN/clipmask" dev-s3 "$RUN/s3" --port "$S3_PORT"
    # after a restart, ListBuckets answers before the volume server has told the master where the
    # old volumes are (its heartbeat comes every 5 s); wait for that, or old masks read as 500s
    "$BIN/clipmask" dev-s3 "$RUN/s3" --port "$S3_PORT" --wait 90 >/dev/null \
      || { say "object storage did not get ready; see $RUN/logs/s3.log"; exit 1; }
  fi
  "$BIN/clipmask" migrate
  # waits for the S3 endpoint (SeaweedFS answers in a few seconds) and makes the bucket
  "$BIN/clipmask" init-storage --wait 60 || { say "object storage did not answer; see $RUN/logs/s3.log"; exit 1; }
  if ! alive api; then rm -rf "$RUN/prometheus"; mkdir -p "$RUN/prometheus"; fi
  PROMETHEUS_MULTIPROC_DIR="$RUN/prometheus" start_bg api "$BIN/gunicorn" -c python:api.gunicorn_conf \
    --workers "${CLIPMASK_API_WORKERS:-2}" --bind "$API_BIND" --access-logfile - --graceful-timeout 20 "api.wsgi:app"
  # CLIPMASK_WORKER_PROCESSES (default 1) Celery worker processes, supervised (worker/processes.py)
  start_bg worker "$BIN/python" -m worker.processes --name clipmask -- \
    --concurrency "${CLIPMASK_WORKER_CONCURRENCY:-8}" \
    -Q "${CLIPMASK_INTERACTIVE_QUEUE:-interactive},${CLIPMASK_BULK_QUEUE:-bulk},${CLIPMASK_EVENTS_QUEUE:-events}" \
    --loglevel INFO -E
  # CLIPMASK_EXTRA_MODELS: more bases served beside the default, comma separated (hub ids or folders,
  # CLIPSeg or SAM 3: `clipmask dev-model --family sam3 DIR` writes a tiny one). One supervised worker
  # per base, on that base's own queues (shared.queue.base_queues); jobs pick a base with `model`.
  local extra index=0
  IFS=',' read -ra extra <<<"${CLIPMASK_EXTRA_MODELS:-}"
  for model in "${extra[@]}"; do
    [ -n "$model" ] || continue
    index=$((index + 1))
    CLIPMASK_DEFAULT_MODEL="${CLIPMASK_MODEL:-CIDAS/clipseg-rd64-refined}" CLIPMASK_MODEL="$model" \
      CLIPMASK_WORKER_METRICS_PORT=$(( ${CLIPMASK_WORKER_METRICS_PORT:-9808} + 64 * index )) \
      start_bg "worker-extra$index" "$BIN/python" -m worker.processes --name "clipmask-extra$index" -- \
      --concurrency "${CLIPMASK_WORKER_CONCURRENCY:-8}" \
      -Q "${CLIPMASK_INTERACTIVE_QUEUE:-interactive},${CLIPMASK_BULK_QUEUE:-bulk},${CLIPMASK_EVENTS_QUEUE:-events}" \
      --loglevel INFO -E
  done
  start_bg beat "$BIN/celery" -A shared.beat_app beat --schedule "$RUN/celerybeat-schedule" --loglevel INFO
  start_bg flower "$BIN/celery" -A shared.beat_app flower --address=127.0.0.1 --port="$FLOWER_PORT" \
    --basic-auth="$CLIPMASK_FLOWER_USER:$CLIPMASK_FLOWER_PASSWORD" --persistent=True --db="$RUN/flower.db"
  echo "${CLIPMASK_MODEL:-CIDAS/clipseg-rd64-refined}" >"$RUN/model"
  wait_for "API /readyz" 60 curl -sf "http://$API_BIND/readyz"
  say "ready: API http://$API_BIND  Flower http://127.0.0.1:$FLOWER_PORT  S3 $CLIPMASK_S3_ENDPOINT_URL" \
    " worker metrics http://127.0.0.1:${CLIPMASK_WORKER_METRICS_PORT:-9808}/metrics"
}

down() {
  for name in flower beat $(cd "$RUN/pids" 2>/dev/null && ls worker-extra*.pid 2>/dev/null | sed 's/\.pid$//') worker api s3; do
    if alive "$name"; then
      pid=$(cat "$RUN/pids/$name.pid")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      say "$name stopped"
    fi
    rm -f "$RUN/pids/$name.pid"
  done
  if [ -f "$RUN/pids/redis-server.pid" ]; then
    kill "$(cat "$RUN/pids/redis-server.pid")" 2>/dev/null || true; rm -f "$RUN/pids/redis-server.pid"
    say "redis stopped"
  fi
  # The Postgres with pgvector stays up: tests and other stacks share it (`make clean` stops it).
}

status() {
  for name in s3 api worker $(cd "$RUN/pids" 2>/dev/null && ls worker-extra*.pid 2>/dev/null | sed 's/\.pid$//') beat flower; do
    if alive "$name"; then echo "$name running (pid $(cat "$RUN/pids/$name.pid"))"; else echo "$name not running"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status"; exit 2 ;;
esac
