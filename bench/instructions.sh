#!/usr/bin/env bash
# Instructions per event of fluxrate.track and fluxrate.track_batch, counted by
# valgrind's callgrind inside fr_track / fr_track_batch only (--toggle-collect),
# in a single-user backend: a count, not a rate, so it compares two commits on
# a machine too busy for pgbench to tell a 1% difference (bench/RESULTS.md,
# 2026-12-03).  One organization, a SUM meter, an API key, 1,000 customers;
# 3,000 track calls in one statement (the row caches are warm after the first
# 1,000), then 5 batches of 1,000 events.  Repeats agree within ~0.1%.
# Usage: bash bench/instructions.sh   (needs valgrind; not part of make bench)
set -euo pipefail
if [ "${1:-}" != --inner ]; then
  source "$(dirname "${BASH_SOURCE[0]}")/../test/env.sh"
  command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 1; }
  OUT=$ROOT/build/bench-instructions; rm -rf "$OUT"; mkdir -p "$OUT"; chown -R "$RUNAS" "$OUT" 2>/dev/null || true
  exec_as() { as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" bash "$ROOT/bench/instructions.sh" --inner; }
  exec_as
  exit
fi

# --inner: as the cluster's user
source "$ROOT/test/cluster.sh"
cluster_start instructions
ORG=$(q "SELECT (fluxrate.create_organization('Instructions'))->>'id'")
TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n', aggregation_type => 'SUM'))->>'meter_token'" | tail -1)
KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('b', ARRAY['usage.write']))->>'key'" | tail -1)
q "SELECT fluxrate.act_as('$ORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
DATA=$CLUSTER_DIR/data
pg_ctl -D "$DATA" -m fast -w stop >/dev/null
for fn in fr_track fr_track_batch; do
  if [ $fn = fr_track ]; then
    N=3000
    SQL="SELECT count(*) FROM generate_series(1, $N) g, LATERAL fluxrate.track(api_key => '$KEY', meter_token => '$TOK',
           customer_external_id => 'cust-' || (g % 1000), quantity => 1, idempotency_key => 'k' || g) t;"
  else
    N=5000
    SQL="SELECT count(fluxrate.track_batch((SELECT jsonb_agg(jsonb_build_object('meter_token', '$TOK',
           'customer_external_id', 'cust-' || (g % 1000), 'quantity', 1, 'idempotency_key', 'b' || b || '-' || g))
           FROM generate_series(1, 1000) g), '$KEY')) FROM generate_series(1, $N / 1000) b;"
  fi
  # single-user mode (one statement per line): no pg_cron worker, one process, nothing else counted
  echo "$SQL" | tr '\n' ' ' | valgrind --tool=callgrind --toggle-collect=$fn --callgrind-out-file="$OUT/$fn.callgrind" \
    "$PGBIN/postgres" --single -D "$DATA" -c shared_preload_libraries=fluxrate fluxrate >"$OUT/$fn.log" 2>&1
  ir=$(callgrind_annotate "$OUT/$fn.callgrind" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  if grep -q ' ERROR: ' "$OUT/$fn.log" || [ -z "$ir" ]; then fail "$fn: see $OUT/$fn.log"; fi
  echo "instructions $fn: $ir over $N events = $(awk -v a="$ir" -v n="$N" 'BEGIN { printf "%.0f", a / n }') per event"
done
