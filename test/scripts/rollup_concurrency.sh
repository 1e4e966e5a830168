#!/usr/bin/env bash
# The usage rollups count every committed event exactly once, whatever the
# order in which transactions commit:
#   1. a transaction that tracked an event and stays open across refreshes
#      (its event is in neither the rollups nor the tail until it commits, then
#      in the tail, then in the rollups, once);
#   2. ingestion with pgbench (multi-event transactions, backdated events,
#      rolled-back transactions) while a loop refreshes the rollups and another
#      reads usage through them: every read through the rollups equals a pass
#      over the events in the same snapshot, and at the end the rollups equal
#      the events;
#   3. delete_customer and a refresh never interleave (the advisory lock):
#      a delete waits for a running refresh; a refresh skips while a delete
#      is running.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start rollups
ORG=$(q "SELECT (fluxrate.create_organization('Rollups'))->>'id'")
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-02-01 00:00:00+00'"
TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('ingest', ARRAY['usage.write']))->>'key'" | tail -1)
METER=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
track() {  # customer, quantity, timestamp
  echo "SELECT fluxrate.track(api_key => '$KEY', meter_token => '$TOK', customer_external_id => '$1', quantity => $2, \"timestamp\" => '$3');"
}
# January through the rollups and by a pass over the events, in ONE statement
# (one snapshot): "rollups events" (SUM over all customers), and how many
# customers differ
compare() {
  q "WITH r AS (SELECT * FROM fluxrate_internal.org_period_usage('$ORG', '2026-01-01', '2026-02-01', 'SUM', ARRAY['$METER'::uuid], true)),
          e AS (SELECT * FROM fluxrate_internal.org_period_usage('$ORG', '2026-01-01', '2026-02-01', 'SUM', ARRAY['$METER'::uuid], false))
     SELECT coalesce((SELECT sum(usage) FROM r), 0) || ' ' || coalesce((SELECT sum(usage) FROM e), 0) || ' ' ||
            (SELECT count(*) FROM r FULL JOIN e USING (customer_id) WHERE r.usage IS DISTINCT FROM e.usage)"
}
refresh() { q "SELECT fluxrate.refresh_usage_rollups()"; }
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null   # the first (a rebuild of nothing)

echo "== 1. a transaction that stays open across refreshes"
mkfifo "$CLUSTER_DIR/late.in"
PGAPPNAME=late psql -X -q -v ON_ERROR_STOP=1 <"$CLUSTER_DIR/late.in" >"$CLUSTER_DIR/late.out" 2>&1 & late=$!
exec 7>"$CLUSTER_DIR/late.in"
echo "BEGIN;" >&7
track late 1000 '2026-01-05 10:00' >&7
for i in $(seq 1 100); do
  [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'late' AND state = 'idle in transaction'")" = 1 ] && break
  sleep 0.1
done
[ "$i" -lt 100 ] || fail "the open transaction did not start"
# later transactions commit first: 3 events
q "$(track early1 1 '2026-01-05 11:00')" >/dev/null
q "$(track early2 2 '2026-01-20 11:00')" >/dev/null
q "$(track early1 4 '2026-01-31 23:59:59')" >/dev/null
r=$(refresh); echo "refresh while it is open: $r"
[ "$(echo "$r" | grep -o '"events": [0-9]*')" = '"events": 3' ] || fail "expected the 3 committed events counted, got $r"
c=$(compare); echo "rollups, events, differing customers: $c"
[ "$c" = "7 7 0" ] || fail "expected 7 7 0 before the late commit"
# its transaction is still in progress: the next refresh cannot count it either
r=$(refresh); [ "$(echo "$r" | grep -o '"events": [0-9]*')" = '"events": 0' ] || fail "counted an uncommitted event: $r"
echo "COMMIT;" >&7; exec 7>&-; wait $late
c=$(compare); echo "after the late commit (read from the tail): $c"
[ "$c" = "1007 1007 0" ] || fail "expected 1007 1007 0 after the late commit"
r=$(refresh); echo "refresh after it: $r"
[ "$(echo "$r" | grep -o '"events": [0-9]*')" = '"events": 1' ] || fail "expected the late event counted once, got $r"
c=$(compare); [ "$c" = "1007 1007 0" ] || fail "expected 1007 1007 0 once rolled up, got $c"
d=$(q "SELECT count(*) FROM fluxrate_internal.rollup_differences('$ORG')"); [ "$d" = 0 ] || fail "$d rollup differences"
echo "ok: counted once, after its commit"

echo "== 2. ingestion, refreshes and reads at the same time"
cat > "$CLUSTER_DIR/ingest.sql" <<SQL
\set c random(1, 40)
\set q random(1, 9)
\set s random(0, 2678399)
\set r random(1, 10)
BEGIN;
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'c' || :c, quantity => :q * 0.25,
                      "timestamp" => timestamptz '2026-01-01' + :s * interval '1 second');
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'c' || ((:c * 7) % 40 + 1), quantity => :q,
                      "timestamp" => timestamptz '2026-01-01' + ((:s * 13) % 2678400) * interval '1 second');
SELECT pg_sleep(0.002 * (:r % 3));
\if :r = 1
ROLLBACK;
\else
COMMIT;
\endif
SQL
# the customers exist first: two transactions that each create two new customers
# in opposite orders deadlock on the unique index (the application's ordering,
# not the rollups')
q "SELECT fluxrate.act_as('$ORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'c' || g)) FROM generate_series(1, 40) g" >/dev/null
pgbench -n -c 3 -j 3 -T 12 -D key="'$KEY'" -D tok="'$TOK'" -f "$CLUSTER_DIR/ingest.sql" fluxrate > "$CLUSTER_DIR/pgbench.out" 2>&1 & pb=$!
refreshes=0; reads=0; bad=0
while kill -0 $pb 2>/dev/null; do
  refresh >/dev/null; refreshes=$((refreshes + 1))
  c=$(compare); reads=$((reads + 1))
  set -- $c
  if [ "$1" != "$2" ] || [ "$3" != 0 ]; then bad=$((bad + 1)); echo "read $reads differs: $c"; fi
done
wait $pb || { cat "$CLUSTER_DIR/pgbench.out"; fail "pgbench failed"; }
grep -E 'number of transactions actually processed|number of failed' "$CLUSTER_DIR/pgbench.out" || true
grep -q 'number of failed transactions: 0 ' "$CLUSTER_DIR/pgbench.out" || fail "ingestion transactions failed"
echo "$refreshes refreshes and $reads reads during ingestion, $bad differing"
[ "$bad" = 0 ] || fail "a read through the rollups differed from the events"
refresh >/dev/null
c=$(compare); echo "at the end: $c"; set -- $c
[ "$1" = "$2" ] && [ "$3" = 0 ] || fail "rollups and events differ at the end: $c"
d=$(q "SELECT count(*) FROM fluxrate_internal.rollup_differences('$ORG')"); [ "$d" = 0 ] || fail "$d rollup differences"
tot=$(q "SELECT (SELECT sum(events) FROM fluxrate_internal.usage_rollups WHERE org_id = '$ORG' AND width = 'day') || ' ' ||
               (SELECT sum(events) FROM fluxrate_internal.usage_rollups WHERE org_id = '$ORG' AND width = 'month') || ' ' ||
               (SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG')")
echo "events in the day rollups, in the month rollups, in the table: $tot"; set -- $tot
[ "$1" = "$3" ] && [ "$2" = "$3" ] && [ "$1" -gt 100 ] || fail "the rollups hold $1 and $2 events, the table $3"
echo "ok: every read equal to the events, every committed event counted once"

echo "== 3. delete_customer and a refresh do not interleave"
q "$(track doomed 5 '2026-01-07 00:00')" >/dev/null
mkfifo "$CLUSTER_DIR/ref.in"
PGAPPNAME=refresher psql -X -q -v ON_ERROR_STOP=1 <"$CLUSTER_DIR/ref.in" >"$CLUSTER_DIR/ref.out" 2>&1 & ref=$!
exec 8>"$CLUSTER_DIR/ref.in"
echo "BEGIN; SELECT fluxrate.refresh_usage_rollups();" >&8
for i in $(seq 1 100); do
  [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'refresher' AND state = 'idle in transaction'")" = 1 ] && break
  sleep 0.1
done
DOOMED=$(q "SELECT id FROM fluxrate_internal.customers WHERE org_id = '$ORG' AND external_id = 'doomed'")
PGAPPNAME=deleter psql -X -q -v ON_ERROR_STOP=1 -c "SELECT fluxrate.act_as('$ORG'); SELECT fluxrate.delete_customer('$DOOMED')" >/dev/null & del=$!
for i in $(seq 1 100); do
  [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deleter' AND wait_event_type = 'Lock' AND wait_event = 'advisory'")" = 1 ] && break
  sleep 0.1
done
[ "$i" -lt 100 ] || fail "delete_customer did not wait for the running refresh"
echo "delete_customer waits for the running refresh"
echo "COMMIT;" >&8; exec 8>&-; wait $ref; wait $del
n=$(q "SELECT count(*) FROM fluxrate_internal.usage_rollups WHERE org_id = '$ORG' AND customer_id = '$DOOMED'")
[ "$n" = 0 ] || fail "$n rollups of the deleted customer remain"
mkfifo "$CLUSTER_DIR/del.in"
PGAPPNAME=deleter2 psql -X -q -v ON_ERROR_STOP=1 <"$CLUSTER_DIR/del.in" >"$CLUSTER_DIR/del.out" 2>&1 & del2=$!
exec 9>"$CLUSTER_DIR/del.in"
EARLY=$(q "SELECT id FROM fluxrate_internal.customers WHERE org_id = '$ORG' AND external_id = 'early2'")
echo "BEGIN; SELECT fluxrate.act_as('$ORG'); SELECT fluxrate.delete_customer('$EARLY');" >&9
for i in $(seq 1 100); do
  [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deleter2' AND state = 'idle in transaction'")" = 1 ] && break
  sleep 0.1
done
r=$(timeout 10 psql -X -q -t -A -c "SELECT fluxrate.refresh_usage_rollups()") || fail "the refresh waited for the deletion"
echo "refresh during a deletion: $r"
echo "$r" | grep -q '"skipped": true' || fail "expected the refresh to skip"
echo "COMMIT;" >&9; exec 9>&-; wait $del2
refresh >/dev/null
d=$(q "SELECT count(*) FROM fluxrate_internal.rollup_differences('$ORG')"); [ "$d" = 0 ] || fail "$d rollup differences"
c=$(compare); echo "at the end: $c"; set -- $c
[ "$1" = "$2" ] && [ "$3" = 0 ] || fail "rollups and events differ after the deletions: $c"
echo "ok: no rollups of deleted customers, none missing"
