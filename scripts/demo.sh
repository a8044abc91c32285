#!/usr/bin/env bash
# `make demo`: pick a model, start the stack, segment a sample image, print the job.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
RUN=$(realpath -m -- "${CLIPMASK_RUN_DIR:-.run}")
mkdir -p "$RUN"
random=()
if [ -z "${CLIPMASK_MODEL:-}" ]; then
  if ! timeout 60 "$BIN/clipmask" model-available CIDAS/clipseg-rd64-refined 2>/dev/null; then
    echo "CIDAS/clipseg-rd64-refined cannot be loaded here (no network?): running on a generated random-weight dev model"
    [ -f "$RUN/dev-model/config.json" ] || "$BIN/clipmask" dev-model "$RUN/dev-model" >/dev/null
    export CLIPMASK_MODEL="$RUN/dev-model"
    random=(--random-weights)
  fi
fi
if [ -f "$RUN/model" ] && scripts/stack.sh status | grep -q "^worker running" \
   && [ "$(cat "$RUN/model")" != "${CLIPMASK_MODEL:-CIDAS/clipseg-rd64-refined}" ]; then
  echo "note: the running worker uses $(cat "$RUN/model"); run 'make down' first to switch models"
fi
scripts/stack.sh up
[ -n "${CLIPMASK_DATABASE_URL:-}" ] || . "$RUN/env"
exec "$BIN/clipmask" demo --base-url "http://${CLIPMASK_API_BIND:-127.0.0.1:8000}" "${random[@]}"
