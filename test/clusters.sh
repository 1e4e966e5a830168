#!/usr/bin/env bash
# Several throwaway clusters in one scenario (test/scripts/router.sh,
# standby.sh, bench/41_router.sh): test/cluster.sh's helpers, per named node.
# Each node has its own data directory and Unix socket directory (no TCP).
#   source test/clusters.sh
#   node_start s0 [extra postgresql.conf lines]   # initdb, start, createdb fluxrate
#   nq s0 'SELECT 1'         # q on node s0 (rows bare); nqf s0 < file; npsql s0 -c ...
#   node_host s0             # its socket directory (for connection strings)
#   node_kill s0             # kill -9 the postmaster: a crash, not a shutdown
#   node_standby s0 s0b      # a streaming standby of s0 (pg_basebackup -R), started
# Every node is stopped when the script exits.
source "${BASH_SOURCE[0]%/*}/cluster.sh"
declare -A NODE_DIR NODE_SOCK
NODES=()
node_start() {
  local name=$1; shift
  local dir=$OUT/node-$name sock
  sock=$(mktemp -d /tmp/fluxrate-sock-XXXXXX)
  rm -rf "$dir"; mkdir -p "$dir"
  initdb -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
  node_conf "$dir/data" "$sock" "$@"
  NODE_DIR[$name]=$dir; NODE_SOCK[$name]=$sock; NODES+=("$name")
  pg_ctl -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
  createdb -h "$sock" -U postgres fluxrate
  trap nodes_stop EXIT
}
node_conf() {  # node_conf <data dir> <socket dir> [extra lines]
  local data=$1 sock=$2; shift 2
  {
    cat "$ROOT/test/postgresql.conf"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$sock'"
    echo "port = 5432"
    echo "cron.database_name = 'fluxrate'"
    for l in "$@"; do echo "$l"; done
  } >> "$data/postgresql.conf"
}
node_host() { echo "${NODE_SOCK[$1]}"; }
npsql() { local n=$1; shift; psql -X -h "${NODE_SOCK[$n]}" -p 5432 -U postgres "$@"; }
nq() { npsql "$1" -d "${NQ_DB:-fluxrate}" -q -t -A -v ON_ERROR_STOP=1 -c "$2"; }
nqf() { local n=$1; shift; npsql "$n" -d "${NQ_DB:-fluxrate}" -q -t -A -v ON_ERROR_STOP=1 "$@"; }
node_pid() { head -1 "${NODE_DIR[$1]}/data/postmaster.pid"; }
node_kill() {
  local pid; pid=$(node_pid "$1")
  kill -9 "$pid"
  # the postmaster is gone at once; its children notice and exit
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}
node_stop() { pg_ctl -D "${NODE_DIR[$1]}/data" -m fast -w stop >/dev/null 2>&1 || true; }
node_restart() { pg_ctl -D "${NODE_DIR[$1]}/data" -l "${NODE_DIR[$1]}/server.log" -w start >/dev/null; }
node_standby() {  # node_standby <primary> <standby name> [extra conf lines]
  local primary=$1 name=$2; shift 2
  local dir=$OUT/node-$name sock
  sock=$(mktemp -d /tmp/fluxrate-sock-XXXXXX)
  rm -rf "$dir"; mkdir -p "$dir"
  pg_basebackup -h "${NODE_SOCK[$primary]}" -p 5432 -U postgres -D "$dir/data" -R -X stream >/dev/null
  # the copied postgresql.conf names the primary's socket directory: this one's own
  node_conf "$dir/data" "$sock" "$@"
  # the application name is what synchronous_standby_names lists
  echo "primary_conninfo = 'host=${NODE_SOCK[$primary]} port=5432 user=postgres application_name=$name'" \
    >> "$dir/data/postgresql.auto.conf"
  NODE_DIR[$name]=$dir; NODE_SOCK[$name]=$sock; NODES+=("$name")
  pg_ctl -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}
nodes_stop() {
  for n in "${NODES[@]}"; do
    if [ -f "${NODE_DIR[$n]}/data/postmaster.pid" ]; then
      pg_ctl -D "${NODE_DIR[$n]}/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "${NODE_SOCK[$n]}"
  done
}
# router_setup <number of shards> [extra postgresql.conf lines for the shards]:
# shards s0..s<N-1> (pg_cron + fluxrate, database fluxrate) and a router node
# "router" (database router: fluxrate_router, the PL/Proxy server
# fluxrate_shards over the shards' sockets, the shards' secrets shared, the
# API synced).  rq runs SQL on the router like nq.
router_setup() {
  local n=$1; shift
  local opts="modular_mapping '1'"
  for i in $(seq 0 $((n - 1))); do
    node_start "s$i" "$@"
    nq "s$i" "CREATE EXTENSION pg_cron; CREATE EXTENSION fluxrate;"
    opts+=", p$i 'host=$(node_host "s$i") port=5432 dbname=fluxrate connect_timeout=2'"
  done
  node_start router
  npsql router -d postgres -qc "CREATE DATABASE router" >/dev/null
  # the router's connections to the shards run as their superuser: it acts for
  # organizations (a trusted role there) and moves them (superuser-only helpers)
  rq "CREATE EXTENSION fluxrate_router CASCADE;
      CREATE SERVER fluxrate_shards FOREIGN DATA WRAPPER plproxy OPTIONS ($opts);
      CREATE USER MAPPING FOR PUBLIC SERVER fluxrate_shards OPTIONS (user 'postgres');" >/dev/null 2>&1
  rq "SELECT fluxrate_router.share_secrets()" >/dev/null
  rq "SELECT fluxrate_router.sync_api()" >/dev/null
}
rq() { NQ_DB=router nq router "$1"; }
