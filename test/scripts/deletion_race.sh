#!/usr/bin/env bash
# Deletion that leaves nothing behind, with a track that races it (issue 19,
# docs/security.md "Deletion", src/ingest_lock.c).  Two sessions, both orders:
#  1. a session tracks an event for a customer and stays open; delete_customer
#     in another session WAITS for it (seen in pg_stat_activity), and once the
#     track commits, deletes its event too: no event of a deleted customer,
#     without any rollup refresh; the idempotency key is free again.
#  2. delete_customer holds its lock (open); a track of that customer WAITS,
#     and after the delete commits creates the customer anew: its event names
#     a customer that exists.  In REPEATABLE READ, a track whose snapshot
#     predates the delete fails with 40001 and writes nothing.
#  3. the same as 1 for delete_organization: it waits, nothing of the
#     organization is left in any table.
#  4. the same as 2 for delete_organization: the waiting track fails with
#     PT401 (the key went with the organization), a track_batch too.
# A neighbour organization tracks in the same window and is rolled up exactly.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start deletion
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-03-10 00:00:00+00'"
setup() {  # name -> "org key"
  local org key
  org=$(q "SELECT (fluxrate.create_organization('$1'))->>'id'")
  key=$(q "SELECT fluxrate.act_as('$org');
           SELECT fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM') IS NOT NULL;
           SELECT (fluxrate.create_api_key('ingest', ARRAY['usage.write']))->>'key'" | tail -1)
  echo "$org $key"
}
read -r ORG KEY < <(setup Victim)
read -r NORG NKEY < <(setup Neighbour)
track() {  # key, customer, quantity, idempotency key
  echo "SELECT fluxrate.track(api_key => '$1', meter_name => 'calls', customer_external_id => '$2', properties => '{\"n\": $3}', \"timestamp\" => '2026-03-05', idempotency_key => '$4');"
}
cust() { q "SELECT id FROM fluxrate_internal.customers WHERE org_id = '$ORG' AND external_id = '$1'"; }
orphans() { q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE NOT EXISTS
                 (SELECT 1 FROM fluxrate_internal.customers c WHERE c.org_id = e.org_id AND c.id = e.customer_id)"; }
org_rows() {  # rows of an organization left in every table with an org_id
  q "DO \$\$ DECLARE r record; n bigint; t bigint := 0; BEGIN
  FOR r IN SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'fluxrate_internal'::regnamespace AND c.relkind IN ('r', 'p')
             AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id') LOOP
    EXECUTE format('SELECT count(*) FROM fluxrate_internal.%I WHERE org_id = %L', r.relname, '$1') INTO n;
    t := t + n;
  END LOOP;
  RAISE NOTICE 'left %', t; END \$\$" 2>&1 | grep -o 'left [0-9]*'
}

# Sessions that stay open: `open_session name` starts psql reading a fifo;
# `send name SQL` writes to it; `close_session name` ends its input and waits.
declare -A FD
open_session() {
  mkfifo "$CLUSTER_DIR/$1.in"
  # (without the other sessions' fifo ends, or those would never see their end)
  ( for f in "${FD[@]}"; do eval "exec $f>&-"; done
    PGAPPNAME=$1 exec psql -X -q -v ON_ERROR_STOP=0 <"$CLUSTER_DIR/$1.in" >"$CLUSTER_DIR/$1.out" 2>&1 ) &
  echo $! > "$CLUSTER_DIR/$1.pid"
  exec {fd}>"$CLUSTER_DIR/$1.in"
  FD[$1]=$fd
}
send() { echo "$2" >&"${FD[$1]}"; }
close_session() { local fd=${FD[$1]}; exec {fd}>&-; wait "$(cat "$CLUSTER_DIR/$1.pid")"; }
state_is() {  # name, predicate on pg_stat_activity; waits up to 10 s
  for i in $(seq 1 100); do
    [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = '$1' AND $2")" = 1 ] && return 0
    sleep 0.1
  done
  fail "session $1 never reached: $2"
}
idle_in_xact() { state_is "$1" "state = 'idle in transaction'"; }
waits_on_lock() { state_is "$1" "wait_event_type = 'Lock' AND wait_event = 'advisory'"; }

q "$(track "$KEY" gone 1 warm)" >/dev/null         # the customer exists, the caches are warm
q "$(track "$KEY" other 1 warm-2)" >/dev/null
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
CUST=$(cust gone)

echo "== 1. delete_customer while a track of that customer is open: the delete waits"
open_session t1; send t1 "BEGIN;"; send t1 "$(track "$KEY" gone 5 race-1)"; idle_in_xact t1
open_session d1; send d1 "SELECT fluxrate.act_as('$ORG', true); SELECT (fluxrate.delete_customer('$CUST'))->>'deleted' AS deleted;"
waits_on_lock d1
echo "the delete waits for the open track (pg_stat_activity: Lock/advisory)"
send t1 "COMMIT;"; close_session t1
close_session d1
grep -q '^ true$' "$CLUSTER_DIR/d1.out" || fail "the delete did not complete: $(cat "$CLUSTER_DIR/d1.out")"
q "$(track "$NKEY" n1 7 nb-1)" >/dev/null          # the neighbour, in the same window
n=$(orphans); [ "$n" = 0 ] || fail "$n events of a deleted customer left after both committed"
[ -z "$(cust gone)" ] || fail "the customer is still there"
r=$(q "SELECT fluxrate.refresh_usage_rollups()"); echo "refresh: $r"
echo "$r" | grep -q '"swept": 0' || fail "the refresh had something to sweep: $r"
d=$(q "SELECT count(*) FROM fluxrate_internal.usage_rollups WHERE org_id = '$ORG' AND customer_id = '$CUST'")
[ "$d" = 0 ] || fail "$d rollups of the deleted customer"
nb=$(q "SELECT quantity_sum FROM fluxrate_internal.usage_rollups WHERE org_id = '$NORG' AND width = 'day'")
[ "$nb" = 7 ] || fail "the neighbour's rollup is $nb, expected 7"
[ "$(q "SELECT count(*) FROM fluxrate_internal.rollup_differences('$NORG')")" = 0 ] || fail "neighbour rollups differ from its events"
# the raced event went with the customer: its idempotency key is free again
rep=$(q "$(track "$KEY" gone 5 race-1)")
echo "$rep" | grep -q '"replay": false' || fail "the key should be free again: $rep"
echo "ok: the delete waited and took the raced event along (0 orphans, nothing to sweep), the neighbour rolled up (7), the key free"

echo "== 2. a track while delete_customer is open: the track waits, then creates the customer anew"
CUST=$(cust gone)
open_session d2; send d2 "BEGIN;"; send d2 "SELECT fluxrate.act_as('$ORG', true); SELECT (fluxrate.delete_customer('$CUST'))->>'deleted' AS deleted;"
idle_in_xact d2
open_session t2; send t2 "$(track "$KEY" gone 4 race-2)"
waits_on_lock t2
echo "the track waits for the open delete"
# REPEATABLE READ: a snapshot taken before the delete commits
open_session rr; send rr "BEGIN ISOLATION LEVEL REPEATABLE READ;"; send rr "SELECT count(*) FROM fluxrate_internal.customers;"
idle_in_xact rr
send d2 "COMMIT;"; close_session d2
close_session t2
grep -q '"replay": false' "$CLUSTER_DIR/t2.out" || fail "the waiting track failed: $(cat "$CLUSTER_DIR/t2.out")"
NEW=$(cust gone)
[ -n "$NEW" ] && [ "$NEW" != "$CUST" ] || fail "expected a new customer 'gone', got '$NEW' (deleted: $CUST)"
send rr "\\set VERBOSITY sqlstate"
send rr "$(track "$KEY" gone 2 race-rr)"
send rr "ROLLBACK;"; close_session rr
grep -q '40001' "$CLUSTER_DIR/rr.out" || fail "the REPEATABLE READ track should fail with 40001: $(cat "$CLUSTER_DIR/rr.out")"
n=$(orphans); [ "$n" = 0 ] || fail "$n orphan events"
[ "$(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE idempotency_key = 'race-rr'")" = 0 ] || fail "the failed track wrote its event"
ev=$(q "SELECT customer_id FROM fluxrate_internal.usage_events WHERE org_id = '$ORG' AND idempotency_key = 'race-2'")
[ "$ev" = "$NEW" ] || fail "the late track's event names $ev, not the new customer $NEW"
echo "ok: the track waited, its event names the new customer; the REPEATABLE READ track failed with 40001 and wrote nothing"

echo "== 3. delete_organization while a track is open: the deletion waits"
open_session t3; send t3 "BEGIN;"; send t3 "$(track "$KEY" other 3 race-3)"; idle_in_xact t3
open_session d3; send d3 "SELECT fluxrate.act_as('$ORG', true); SELECT (fluxrate.delete_organization('$ORG'))->>'deleted' AS deleted;"
waits_on_lock d3
echo "the deletion waits for the open track"
send t3 "COMMIT;"; close_session t3
close_session d3
grep -q '^ true$' "$CLUSTER_DIR/d3.out" || fail "the deletion did not complete: $(cat "$CLUSTER_DIR/d3.out")"
q "$(track "$NKEY" n1 8 nb-2)" >/dev/null
left=$(org_rows "$ORG")
[ "$left" = "left 0" ] || fail "rows of the deleted organization right after both committed: $left"
n=$(orphans); [ "$n" = 0 ] || fail "$n orphan events"
out=$(q "$(track "$KEY" other 1 after)" 2>&1 || true)
echo "$out" | grep -q 'invalid api key' || fail "the deleted organization's key still works: $out"
echo "ok: nothing left of the organization (no refresh needed), its key refused"

echo "== 4. a track while delete_organization is open: the track waits, then fails with PT401"
read -r ORG KEY < <(setup Victim2)
q "$(track "$KEY" c4 1 warm-4)" >/dev/null
open_session d4; send d4 "BEGIN;"; send d4 "SELECT fluxrate.act_as('$ORG', true); SELECT (fluxrate.delete_organization('$ORG'))->>'deleted' AS deleted;"
idle_in_xact d4
open_session t4; send t4 "\\set VERBOSITY sqlstate"; send t4 "$(track "$KEY" c4 4 race-4)"
waits_on_lock t4
open_session b4; send b4 "\\set VERBOSITY sqlstate"
send b4 "SELECT fluxrate.track_batch('[{\"meter_name\": \"calls\", \"customer_external_id\": \"c4\", \"properties\": {\"n\": 1}}]', api_key => '$KEY');"
waits_on_lock b4
echo "the track and the batch wait for the open deletion"
send d4 "COMMIT;"; close_session d4
close_session t4; close_session b4
grep -q 'PT401' "$CLUSTER_DIR/t4.out" || fail "the waiting track should fail with PT401: $(cat "$CLUSTER_DIR/t4.out")"
grep -q '23503\|PT401' "$CLUSTER_DIR/b4.out" || fail "the waiting batch should fail: $(cat "$CLUSTER_DIR/b4.out")"
echo "track: $(cat "$CLUSTER_DIR/t4.out"); batch: $(cat "$CLUSTER_DIR/b4.out")"
left=$(org_rows "$ORG")
[ "$left" = "left 0" ] || fail "rows of the deleted organization: $left"
n=$(orphans); [ "$n" = 0 ] || fail "$n orphan events"
r=$(q "SELECT fluxrate.refresh_usage_rollups()"); echo "refresh: $r"
echo "$r" | grep -q '"swept": 0' || fail "the refresh had something to sweep: $r"
nb=$(q "SELECT quantity_sum FROM fluxrate_internal.usage_rollups WHERE org_id = '$NORG' AND width = 'day'")
[ "$nb" = 15 ] || fail "the neighbour's rollup is $nb, expected 7 + 8 = 15"
echo "ok: the waiting track refused (PT401), the batch refused, nothing left; the neighbour rolled up (15)"
