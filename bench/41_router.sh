#!/usr/bin/env bash
# The router (issue 18): fluxrate.track through fluxrate_router (PL/Proxy) to a
# shard against the same call sent to that shard directly, 16 clients, durable
# commits, the sides alternating in rounds (bench/rounds.sh); then aggregate
# ingestion over 3 shards through the router, and 3 shards fed directly.  Four
# clusters of its own (test/clusters.sh: router + 3 shards, Unix sockets), all
# on this machine: router and shards share its cores, so every routed call
# costs the router's CPU on top of the shard's.
#   bench router_track_single: ours = through the router, baseline = direct
#   bench router_remote_shape: ours = the statement PL/Proxy sends a shard
#         (simple protocol, the claims subquery, parsed and planned per call),
#         straight to the shard; baseline = direct.  What a router on a machine
#         of its own would leave of the direct rate, the network aside.
#   bench router_aggregate_3_shards: ours = through the router to 3 shards,
#         baseline = 3 shards fed directly (16 clients split over them)
set -euo pipefail
T=${BENCH_SECONDS:-30}
C=${BENCH_CLIENTS:-16}
source "$ROOT/test/clusters.sh"
OUT=$OUT/router; mkdir -p "$OUT"
router_setup 3 "fsync = on" "synchronous_commit = on" "shared_buffers = 256MB" "max_wal_size = 2GB" "max_connections = 100"
W=$(mktemp -d)
declare -A ORG KEY TOK
for o in 0 1 2; do
  ORG[$o]=$(rq "SELECT (fluxrate.create_organization('Bench router $o'))->>'id'")
  [ "$(rq "SELECT shard FROM fluxrate_router.organizations WHERE org_id = '${ORG[$o]}'")" = "$o" ] || { echo "placement"; exit 1; }
  TOK[$o]=$(rq "SELECT fluxrate.act_as('${ORG[$o]}'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
  KEY[$o]=$(rq "SELECT fluxrate.act_as('${ORG[$o]}'); SELECT (fluxrate.create_api_key('bench', ARRAY['usage.write']))->>'key'" | tail -1)
  rq "SELECT fluxrate.act_as('${ORG[$o]}'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
done
reset() {
  for s in s0 s1 s2; do
    npsql $s -d fluxrate -q -v ON_ERROR_STOP=1 -c "DELETE FROM fluxrate_internal.usage_events" \
      -c "VACUUM ANALYZE fluxrate_internal.usage_events" -c "REINDEX INDEX fluxrate_internal.usage_events_xact_idx" -c "CHECKPOINT" >/dev/null
  done
}
# the same statement on both sides; only the server it is sent to differs
single() {  # single <org> <file>
  cat > "$2" <<SQL
\set k random(1, 2000000000)
SELECT fluxrate.track(api_key => '${KEY[$1]}', meter_token => '${TOK[$1]}', customer_external_id => 'cust-' || (:k % 1000),
                      quantity => 1, idempotency_key => 'k' || :k);
SQL
}
single 0 "$W/direct_single.sql"; cp "$W/direct_single.sql" "$W/router_single.sql"
# PL/Proxy's statement for this call: positional arguments, the claims subquery
cat > "$W/remote_single.sql" <<SQL
\set k random(1, 2000000000)
SELECT fluxrate.track('${TOK[0]}', 'cust-' || (:k % 1000), 1, NULL, 'k' || :k, NULL, NULL, NULL, '${KEY[0]}') AS track
  FROM (SELECT pg_catalog.set_config('request.jwt.claims', '', true)) AS _ctx(c);
SQL
for o in 0 1 2; do single $o "$W/org$o.sql"; done
# run <seconds> <script> <output>: scripts named router_* go to the router, direct_* to shard 0
run() {
  case $(basename "$2") in
    router_*) pgbench -h "$(node_host router)" -p 5432 -U postgres -n -M prepared -c "$C" -j 2 -T "$1" -f "$2" router > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
    direct_*) pgbench -h "$(node_host s0)" -p 5432 -U postgres -n -M prepared -c "$C" -j 2 -T "$1" -f "$2" fluxrate > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
    remote_*) pgbench -h "$(node_host s0)" -p 5432 -U postgres -n -M simple -c "$C" -j 2 -T "$1" -f "$2" fluxrate > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
  esac
}
source "$(dirname "${BASH_SOURCE[0]}")/rounds.sh"
side router_track_single "$W/direct_single.sql" "$W/router_single.sql" 1
side router_remote_shape "$W/direct_single.sql" "$W/remote_single.sql" 1

# aggregate over 3 shards: through the router, each transaction for one of the
# three organizations (one per shard) at random; against 3 direct pgbench runs
# at once, one per shard, the 16 clients split 6/5/5
agg_router() {
  reset
  pgbench -h "$(node_host router)" -p 5432 -U postgres -n -M prepared -c "$C" -j 2 -T "$1" \
    -f "$W/org0.sql" -f "$W/org1.sql" -f "$W/org2.sql" router > "$W/ar.out" 2>&1 || { cat "$W/ar.out"; exit 1; }
  tps "$W/ar.out"
}
agg_direct() {
  reset
  local i=0 c pids=()
  for s in 0 1 2; do
    c=$(( C / 3 + (s < C % 3 ? 1 : 0) ))
    pgbench -h "$(node_host s$s)" -p 5432 -U postgres -n -M prepared -c "$c" -j 1 -T "$1" -f "$W/org$s.sql" fluxrate > "$W/ad$s.out" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  awk '/^tps = /{s += $3} END {print s}' "$W"/ad?.out
}
ar=0; ad=0; t=$(( (T + R - 1) / R ))
for r in $(seq 1 "$R"); do
  ad=$(awk -v a="$ad" -v b="$(agg_direct "$t")" 'BEGIN { print a + b }')
  ar=$(awk -v a="$ar" -v b="$(agg_router "$t")" 'BEGIN { print a + b }')
done
report router_aggregate_3_shards "$(awk -v s="$ar" -v r="$R" 'BEGIN { print s / r }')" "$(awk -v s="$ad" -v r="$R" 'BEGIN { print s / r }')"
# where the events went (the router's aggregate run was the last): every shard took its third
for s in s0 s1 s2; do echo "  shard $s: $(npsql $s -d fluxrate -q -t -A -c "SELECT count(*) FROM fluxrate_internal.usage_events") events"; done
rm -rf "$W"
