#!/usr/bin/env bash
# The router (issue 18): fluxrate.track through fluxrate_router (PL/Proxy) to a
# shard against the same call sent to that shard directly, 16 clients, durable
# commits, the sides alternating in rounds (bench/rounds.sh); then aggregate
# ingestion over 3 shards through the router, and 3 shards fed directly.  Four
# clusters of its own (test/clusters.sh: router + 3 shards, Unix sockets), all
# on this machine: router and shards share its cores, so every routed call
# costs the router's CPU on top of the shard's.
#   bench router_track_single: ours = through the router, baseline = direct
#   bench router_remote_shape: ours = the statement PL/Proxy sends a shard for
#         a keyed track (extended protocol, parameters, parsed and planned per
#         call: PL/Proxy prepares nothing), straight to the shard; baseline =
#         direct.  What a router on a machine of its own would leave of the
#         direct rate, the network aside.
#   bench router_hop_floor: ours = a PL/Proxy function whose remote statement
#         is SELECT 1, through the router; baseline = SELECT 1 on the shard.
#         The price of the second backend and round trip alone, with nothing
#         to route and nothing to do.
#   bench router_track_pinned: router_track_single with the router cluster and
#         pgbench on core 0 and the shards on core 1 (taskset): the shard's
#         core is its own on both sides, as with a router (beside the
#         application) on a machine of its own.
#   bench router_aggregate_3_shards: ours = through the router to 3 shards,
#         baseline = 3 shards fed directly (16 clients split over them)
# After each single-shard side, "cpu <name>:" gives the CPU time per call the
# router's and shard 0's processes spent (their /proc stat, reaped children
# included): on 2 shared cores, what caps the rate once they are busy.
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
# PL/Proxy's statement for this call (fluxrate_router_calls.track__key: a key
# needs no claims), as the shard gets it: a parameter per argument, each cast;
# pgbench sends :tok, :key and the two computed strings as parameters (-M
# extended, unnamed statement: parsed and planned per call like PL/Proxy's)
cat > "$W/remote_single.sql" <<'SQL'
\set k random(1, 2000000000)
\set c :k % 1000
SELECT fluxrate.track(:tok::text, ('cust-' || :c::text)::text, 1::"numeric", NULL::timestamptz, ('k' || :k::text)::text,
                      NULL::jsonb, NULL::text, NULL::jsonb, :key::text) AS track;
SQL
# the floor: one hop through PL/Proxy that does nothing, against nothing done directly
rq "CREATE FUNCTION public.bench_hop(integer) RETURNS integer LANGUAGE plproxy AS \$p\$
      CLUSTER 'fluxrate_shards'; RUN ON \$1; SELECT 1 AS bench_hop; \$p\$" >/dev/null
echo 'SELECT 1;' > "$W/direct_one.sql"
echo 'SELECT public.bench_hop(0);' > "$W/router_one.sql"
cp "$W/direct_single.sql" "$W/direct_pinned.sql"; cp "$W/direct_single.sql" "$W/router_pinned.sql"
for o in 0 1 2; do single $o "$W/org$o.sql"; done
# CPU ticks of a node: its postmaster's reaped children and every live process of it
ticks() {
  local pm t c
  pm=$(node_pid "$1")
  t=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pm/stat")
  for c in $(ps -o pid= --ppid "$pm"); do t=$(( t + $(awk '{ print $14 + $15 }' "/proc/$c/stat" 2>/dev/null || echo 0) )); done
  echo "$t"
}
declare -A CPU_R CPU_S CALLS
# pin <router cpus> <shard cpus>: every process of the router node, and of the shards
pin() {
  local n p
  for n in router s0 s1 s2; do
    for p in $(node_pid $n) $(ps -o pid= --ppid "$(node_pid $n)"); do
      taskset -p -c "$([ $n = router ] && echo "$1" || echo "$2")" "$p" >/dev/null 2>&1 || true
    done
  done
}
# run <seconds> <script> <output>: scripts named router_* go to the router, direct_* and remote_* to shard 0
run() {
  local b r0 s0 pre=""
  b=$(basename "$2" .sql)
  case $b in *_pinned) pre="taskset -c 0" ;; esac
  r0=$(ticks router); s0=$(ticks s0)
  case $b in
    router_*) $pre pgbench -h "$(node_host router)" -p 5432 -U postgres -n -M prepared -c "$C" -j 2 -T "$1" -f "$2" router > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
    direct_*) $pre pgbench -h "$(node_host s0)" -p 5432 -U postgres -n -M prepared -c "$C" -j 2 -T "$1" -f "$2" fluxrate > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
    remote_*) pgbench -h "$(node_host s0)" -p 5432 -U postgres -n -M extended -D tok="${TOK[0]}" -D key="${KEY[0]}" \
                -c "$C" -j 2 -T "$1" -f "$2" fluxrate > "$3" 2>&1 || { cat "$3"; exit 1; } ;;
  esac
  sleep 0.2   # the backends exit and are reaped
  CPU_R[$b]=$(( ${CPU_R[$b]:-0} + $(ticks router) - r0 )); CPU_S[$b]=$(( ${CPU_S[$b]:-0} + $(ticks s0) - s0 ))
  CALLS[$b]=$(( ${CALLS[$b]:-0} + $(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$3") ))
}
# cpu <name> <baseline script> <ours script>: CPU µs per call on each side
cpu() {
  local o b hz; o=$(basename "$3" .sql); b=$(basename "$2" .sql); hz=$(getconf CLK_TCK)
  awk -v n="$1" -v hz="$hz" -v ro="${CPU_R[$o]}" -v so="${CPU_S[$o]}" -v co="${CALLS[$o]}" \
      -v rb="${CPU_R[$b]}" -v sb="${CPU_S[$b]}" -v cb="${CALLS[$b]}" 'BEGIN {
    printf "cpu %s: ours router=%.0f shard=%.0f total=%.0f us/call; baseline router=%.0f shard=%.0f total=%.0f us/call; ratio=%.3f\n", n,
      ro / hz / co * 1e6, so / hz / co * 1e6, (ro + so) / hz / co * 1e6, rb / hz / cb * 1e6, sb / hz / cb * 1e6, (rb + sb) / hz / cb * 1e6,
      ((rb + sb) / cb) / ((ro + so) / co) }'
}
source "$(dirname "${BASH_SOURCE[0]}")/rounds.sh"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
side router_track_single "$W/direct_single.sql" "$W/router_single.sql" 1
cpu router_track_single "$W/direct_single.sql" "$W/router_single.sql"
side router_remote_shape "$W/direct_single.sql" "$W/remote_single.sql" 1
cpu router_remote_shape "$W/direct_single.sql" "$W/remote_single.sql"
side router_hop_floor "$W/direct_one.sql" "$W/router_one.sql" 1
cpu router_hop_floor "$W/direct_one.sql" "$W/router_one.sql"
pin 0 1
side router_track_pinned "$W/direct_pinned.sql" "$W/router_pinned.sql" 1
cpu router_track_pinned "$W/direct_pinned.sql" "$W/router_pinned.sql"
pin 0-1 0-1
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"

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
