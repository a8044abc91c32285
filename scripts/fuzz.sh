#!/usr/bin/env bash
# `make fuzz`: schemathesis against the live API of a private native stack (its own ports, run
# folder, bucket and Redis prefix; tiny model), every phase (examples, coverage, fuzzing and
# stateful, with links inferred from Location headers and the schema), NUL bytes included, every
# response checked against /openapi.json; then the hypothesis tests on the parsers and on strings
# Postgres can't store. FUZZ_EXAMPLES (per operation) and FUZZ_MAX_TIME bound it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
export CLIPMASK_RUN_DIR=.run/fuzz CLIPMASK_API_BIND=127.0.0.1:18300 CLIPMASK_FLOWER_PORT=15755
export CLIPMASK_S3_PORT=19300 CLIPMASK_WORKER_METRICS_PORT=19908
export CLIPMASK_S3_ENDPOINT_URL=http://127.0.0.1:19300
export CLIPMASK_S3_BUCKET="clipmask-fuzz-$$" CLIPMASK_REDIS_KEY_PREFIX="clipmask-fuzz-$$:"
export CLIPMASK_RATE_LIMIT_PER_S=0 CLIPMASK_LOG_LEVEL=WARNING
# a database of its own, dropped at the end (the fuzzer writes thousands of rows)
DB="clipmask_fuzz_$$"
PG_PORT=$(scripts/pgvector.sh ensure)
export CLIPMASK_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/$DB"
EXAMPLES=${FUZZ_EXAMPLES:-1000}
MAX_TIME=${FUZZ_MAX_TIME:-900}
RUN=$(realpath -m -- "$CLIPMASK_RUN_DIR")
mkdir -p "$RUN"
[ -f "$RUN/tiny-model/config.json" ] || "$BIN/clipmask" dev-model "$RUN/tiny-model" >/dev/null
export CLIPMASK_MODEL="$RUN/tiny-model"
cleanup() {  # the stack, its database and its Redis keys
  scripts/stack.sh down >/dev/null
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  redis-cli --scan --pattern "$CLIPMASK_REDIS_KEY_PREFIX*" | xargs -r -n 500 redis-cli del >/dev/null || true
}
trap cleanup EXIT
scripts/stack.sh up
LOG="$RUN/logs/api.log"
OFFSET=$(stat -c %s "$LOG")  # the access log from here on is this run's
KEY=$("$BIN/clipmask" tenant create fuzz | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
set +e
"$BIN/st" run "http://$CLIPMASK_API_BIND/openapi.json" -H "Authorization: Bearer $KEY" \
  --max-examples "$EXAMPLES" --max-time "$MAX_TIME" --generation-allow-x00 true --workers 1 \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --request-timeout 30 --seed "${FUZZ_SEED:-1}" --report junit,json --report-dir "$RUN/report" "$@"
st=$?
set -e
echo "[fuzz] requests the API received per operation (its access log):"
"$BIN/python" scripts/fuzz_counts.py "$LOG" "$OFFSET"
"$BIN/python" -m pytest -q -p no:cacheprovider tests/fuzz --hypothesis-profile=fuzz
exit $st
