#!/usr/bin/env bash
# Deletion that leaves nothing behind, with a track that races it (issue 19,
# docs/security.md "Deletion"): a session tracks an event for a customer and
# stays open; another deletes the customer (then, the same way, a whole
# organization) and commits first; the track commits after it.  Its event names
# a customer that no longer exists.  The next rollup refresh deletes it instead
# of counting it, while a neighbour organization's events of the same window
# are rolled up; its idempotency key is free again; of a deleted organization no
# row is left in any table.
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
q "$(track "$KEY" gone 1 warm)" >/dev/null         # the customer exists, the caches are warm
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
CUST=$(q "SELECT id FROM fluxrate_internal.customers WHERE org_id = '$ORG' AND external_id = 'gone'")
orphans() { q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE NOT EXISTS
                 (SELECT 1 FROM fluxrate_internal.customers c WHERE c.org_id = e.org_id AND c.id = e.customer_id)"; }

# a session that tracks and stays open
open_track() {  # name, key, customer, quantity, idempotency key
  mkfifo "$CLUSTER_DIR/$1.in"
  PGAPPNAME=$1 psql -X -q -v ON_ERROR_STOP=1 <"$CLUSTER_DIR/$1.in" >"$CLUSTER_DIR/$1.out" 2>&1 &
  echo $! > "$CLUSTER_DIR/$1.pid"
  exec 7>"$CLUSTER_DIR/$1.in"
  echo "BEGIN;" >&7
  track "$2" "$3" "$4" "$5" >&7
  for i in $(seq 1 100); do
    [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = '$1' AND state = 'idle in transaction'")" = 1 ] && return 0
    sleep 0.1
  done
  fail "the tracking session $1 did not start"
}
close_track() { echo "COMMIT;" >&7; exec 7>&-; wait "$(cat "$CLUSTER_DIR/$1.pid")"; }

echo "== 1. delete_customer while a track of that customer is open"
open_track race1 "$KEY" gone 5 race-1
q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.delete_customer('$CUST'))->>'deleted'" >/dev/null &
del=$!
# the delete does not wait for the track (nothing locks the customer row) ...
sleep 1
close_track race1
wait $del
q "$(track "$NKEY" n1 7 nb-1)" >/dev/null          # the neighbour, in the same window
n=$(orphans); echo "events of a deleted customer after the late commit: $n"
[ "$n" = 1 ] || fail "expected the raced event left behind (1), got $n"
r=$(q "SELECT fluxrate.refresh_usage_rollups()"); echo "refresh: $r"
echo "$r" | grep -q '"swept": 1' || fail "expected the refresh to sweep 1 event"
n=$(orphans); [ "$n" = 0 ] || fail "$n events of deleted customers left"
d=$(q "SELECT count(*) FROM fluxrate_internal.usage_rollups WHERE org_id = '$ORG' AND customer_id = '$CUST'")
[ "$d" = 0 ] || fail "$d rollups of the deleted customer"
nb=$(q "SELECT quantity_sum FROM fluxrate_internal.usage_rollups WHERE org_id = '$NORG' AND width = 'day'")
[ "$nb" = 7 ] || fail "the neighbour's rollup is $nb, expected 7"
[ "$(q "SELECT count(*) FROM fluxrate_internal.rollup_differences('$NORG')")" = 0 ] || fail "neighbour rollups differ from its events"
# the raced event's idempotency key is free again: a new event, not a replay
rep=$(q "$(track "$KEY" gone 5 race-1)")
echo "$rep" | grep -q '"replay": false' || fail "the swept key should be free again: $rep"
echo "ok: the raced event swept, the neighbour rolled up (7), the key free"

echo "== 2. delete_organization while a track of that organization is open"
# (of an existing customer: a track that creates its customer takes a key-share
# lock on the organization row, which the deletion locks first, so that one
# simply waits and is deleted with the rest)
q "$(track "$KEY" other 1 warm-2)" >/dev/null
open_track race2 "$KEY" other 3 race-2
q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.delete_organization('$ORG'))->>'deleted'" >/dev/null &
del=$!
sleep 1
close_track race2
wait $del
q "$(track "$NKEY" n1 8 nb-2)" >/dev/null
n=$(orphans); echo "events of the deleted organization after the late commit: $n"
[ "$n" = 1 ] || fail "expected the raced event left behind (1), got $n"
r=$(q "SELECT fluxrate.refresh_usage_rollups()"); echo "refresh: $r"
echo "$r" | grep -q '"swept": 1' || fail "expected the refresh to sweep 1 event"
left=$(q "DO \$\$ DECLARE r record; n bigint; t bigint := 0; BEGIN
  FOR r IN SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'fluxrate_internal'::regnamespace AND c.relkind = 'r'
             AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id') LOOP
    EXECUTE format('SELECT count(*) FROM fluxrate_internal.%I WHERE org_id = %L', r.relname, '$ORG') INTO n;
    t := t + n;
  END LOOP;
  RAISE NOTICE 'left %', t; END \$\$" 2>&1 | grep -o 'left [0-9]*')
[ "$left" = "left 0" ] || fail "rows of the deleted organization: $left"
# its key stops at once
out=$(q "$(track "$KEY" other 1 after)" 2>&1 || true)
echo "$out" | grep -q 'api key' || echo "$out" | grep -qi 'unknown\|revoked\|invalid' || fail "the deleted organization's key still works: $out"
nb=$(q "SELECT quantity_sum FROM fluxrate_internal.usage_rollups WHERE org_id = '$NORG' AND width = 'day'")
[ "$nb" = 15 ] || fail "the neighbour's rollup is $nb, expected 7 + 8 = 15"
echo "ok: nothing left of the organization, its key refused, the neighbour rolled up (15)"
