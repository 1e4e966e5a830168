#!/usr/bin/env bash
# Helpers for test/scripts/*.sh and bench/: a throwaway PostgreSQL cluster with
# pg_cron and fluxrate preloaded, on a Unix socket only, owned by the caller.
#   source test/cluster.sh; cluster_start name [extra postgresql.conf lines]
#   psql -c '...'        # PGHOST/PGPORT/PGDATABASE/PGUSER are exported
#   cluster_stop
set -euo pipefail
: "${ROOT:?}" "${PGBIN:?}" "${OUT:=$ROOT/build/regress}"
export PATH="$PGBIN:$PATH"
cluster_start() {
  local name=$1; shift
  CLUSTER_DIR=$OUT/cluster-$name
  CLUSTER_SOCK=$(mktemp -d /tmp/fluxrate-sock-XXXXXX)
  rm -rf "$CLUSTER_DIR"; mkdir -p "$CLUSTER_DIR"
  initdb -D "$CLUSTER_DIR/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
  {
    cat "$ROOT/test/postgresql.conf"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$CLUSTER_SOCK'"
    echo "port = 5432"
    echo "cron.database_name = 'fluxrate'"
    for l in "$@"; do echo "$l"; done
  } >> "$CLUSTER_DIR/data/postgresql.conf"
  pg_ctl -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w start >/dev/null
  export PGHOST=$CLUSTER_SOCK PGPORT=5432 PGUSER=postgres PGDATABASE=fluxrate
  createdb fluxrate
  psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION pg_cron; CREATE EXTENSION fluxrate;' >/dev/null
  trap cluster_stop EXIT
}
# Helpers every script uses: q runs one statement and prints its rows bare; qf
# runs SQL from stdin the same way; fail reports and ends the script
# (EQ_KEEP=1: the cluster is left running to look at it).
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
qf() { psql -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }
fail() {
  echo "FAIL: $*"
  if [ "${EQ_KEEP:-0}" = 1 ]; then trap - EXIT; echo "kept: PGHOST=$PGHOST data=$CLUSTER_DIR/data"; fi
  exit 1
}
cluster_stop() {
  if [ -n "${CLUSTER_DIR:-}" ] && [ -f "$CLUSTER_DIR/data/postmaster.pid" ]; then
    pg_ctl -D "$CLUSTER_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  [ -n "${CLUSTER_SOCK:-}" ] && rm -rf "$CLUSTER_SOCK"
  CLUSTER_DIR=""
}
