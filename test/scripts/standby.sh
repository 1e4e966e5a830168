#!/usr/bin/env bash
# A synchronous standby that loses nothing.  Primary p streams to standby sb,
# listed in synchronous_standby_names (synchronous_commit = on: a commit
# returns once sb has flushed its WAL).  16 pgbench clients track events, each
# with its own idempotency keys c<client>-1, c<client>-2, ...; January's period
# is closed on p, and p is killed with SIGKILL under the load.  sb is promoted:
#   - every track call that returned success is there exactly once (at most
#     one more per client: the call in flight, committed but unanswered);
#   - closing again, by hand and by pg_cron on the promoted server, bills
#     January once; February's close bills exactly the surviving events;
#   - on the hot standby, before the failover, the read-only functions answer
#     (live usage, invoices) and the writing ones refuse with 25006.
set -euo pipefail
source "$ROOT/test/clusters.sh"
DUR=("fsync = on" "synchronous_commit = on" "wal_level = replica" "hot_standby = on")
node_start p "${DUR[@]}"
nq p "CREATE EXTENSION pg_cron; CREATE EXTENSION fluxrate;"
# the clock: February 1st, 00:05 (January has ended); replicated like any catalog row
nq p "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-02-01 00:05:00+00'"
node_standby p sb "${DUR[@]}"
# synchronous from now on (before sb streamed, every commit would wait for it)
nq p "ALTER SYSTEM SET synchronous_standby_names = 'sb'"
nq p "SELECT pg_reload_conf()" >/dev/null
expect() { [ "$2" = "$3" ] || fail "$1: expected [$3], got [$2]"; echo "ok: $1"; }
for _ in $(seq 1 100); do
  [ "$(nq p "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'sb' AND sync_state = 'sync'")" = 1 ] && break
  sleep 0.1
done
expect "sb is the synchronous standby" "$(nq p "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'sb'")" sync

ORG=$(nq p "SELECT (fluxrate.create_organization('Standby'))->>'id'")
out=$(nqf p <<SQL
SELECT fluxrate.act_as('$ORG', session => true) IS NOT NULL;
SELECT f->>'meter_id' AS meter_id, f->>'meter_token' AS meter_token
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro', type => 'HYBRID', billing_interval => 'month', currency => 'USD'))->>'id' AS plan_id \gset
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'FIXED', unit_price => 49, display_name => 'Platform fee') IS NOT NULL;
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'USAGE', meter_id => :'meter_id', unit_price => 0.002, display_name => 'API calls') IS NOT NULL;
SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech'))->>'id' AS customer_id \gset
SELECT (fluxrate.create_subscription(customer_id => :'customer_id', plan_id => :'plan_id', billing_interval => 'month',
        start_date => '2026-01-01 00:00:00+00'))->>'id' AS sub_id \gset
SELECT (fluxrate.create_api_key(name => 'load', scopes => ARRAY['usage.write']))->>'key' AS api_key \gset
-- 1,000 calls in January, before the close: 1000 x 0.002 = 2.00
SELECT count(*) FROM generate_series(1, 1000) i,
  LATERAL fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech', quantity => 1,
                         idempotency_key => 'jan-' || i, "timestamp" => '2026-01-15 12:00:00+00') t;
\echo TOKEN :meter_token
\echo KEY :api_key
\echo CUST :customer_id
\echo SUB :sub_id
SQL
)
TOKEN=$(echo "$out" | sed -n 's/^TOKEN //p'); KEY=$(echo "$out" | sed -n 's/^KEY //p')
CUST=$(echo "$out" | sed -n 's/^CUST //p'); SUB=$(echo "$out" | sed -n 's/^SUB //p')
[ -n "$SUB" ] || fail "set-up: $out"
nq p "SELECT fluxrate.schedule_jobs()" >/dev/null

# the hot standby: reads answer, writes refuse (25006, read-only transaction)
sleep 0.5
expect "live usage on the standby" \
  "$(nq sb "SELECT fluxrate.act_as('$ORG') IS NULL; SELECT fluxrate.get_customer_usage('$CUST') IS NOT NULL" | tail -1)" t
expect "the opening invoice on the standby: 49.00" \
  "$(nq sb "SELECT fluxrate.act_as('$ORG') IS NULL; SELECT string_agg(i->>'total', ',') FROM jsonb_array_elements(fluxrate.list_subscription_invoices('$SUB')) i" | tail -1)" "49.00"
ro_err() { npsql sb -d fluxrate -q -t -A -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate -c "$1" 2>&1 | sed -n 's/^ERROR:  //p'; }
expect "track on the standby refuses" \
  "$(ro_err "SELECT fluxrate.track(api_key => '$KEY', meter_token => '$TOKEN', customer_external_id => 'initech', quantity => 1, idempotency_key => 'ro-1')")" 25006
expect "a write through act_as on the standby refuses" \
  "$(ro_err "SELECT fluxrate.act_as('$ORG') IS NULL; SELECT fluxrate.create_customer(name => 'X', email => 'x@example.com', external_id => 'x')")" 25006
expect "closing on the standby refuses" "$(ro_err "CALL fluxrate.close_due_periods()")" 25006

# the load: 16 clients, each numbering its own calls (pgbench variables live as long as the client)
cat > "$OUT/standby-track.sql" <<SQL
\set n :n + 1
SELECT fluxrate.track(api_key => '$KEY', meter_token => '$TOKEN', customer_external_id => 'initech', quantity => 1,
                      idempotency_key => 'c' || :client_id || '-' || :n);
SQL
rm -f "$OUT"/standby-log*
( cd "$OUT" && pgbench -h "$(node_host p)" -p 5432 -U postgres -n -c 16 -j 4 -T 30 -D n=0 \
    -f "$OUT/standby-track.sql" -l --log-prefix="$OUT/standby-log" fluxrate >"$OUT/standby-pgbench.txt" 2>&1 ) &
LOAD=$!
sleep 4
# January closes on the primary just before it dies
nq p "CALL fluxrate.close_due_periods()" >/dev/null
jan_before=$(nq p "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription' AND period_start = '2026-01-01 00:00:00+00'")
sleep 1
node_kill p
wait $LOAD || true
echo "pgbench: $(grep -E 'aborted|processed' "$OUT/standby-pgbench.txt" | tr '\n' ' ')"
# what the clients saw succeed: per client, how many calls returned (log lines)
cat "$OUT"/standby-log* | awk '{n[$1]++} END {for (c in n) print c, n[c]}' | sort -n > "$OUT/standby-ok.txt"
ok_total=$(awk '{s += $2} END {print s + 0}' "$OUT/standby-ok.txt")
[ "$ok_total" -gt 100 ] || fail "the load tracked only $ok_total events before the kill"
echo "calls that returned success: $ok_total"

# promote
pg_ctl -D "${NODE_DIR[sb]}/data" -w promote >/dev/null
for _ in $(seq 1 100); do [ "$(nq sb "SELECT pg_is_in_recovery()")" = f ] && break; sleep 0.1; done
expect "sb is the primary now" "$(nq sb "SELECT pg_is_in_recovery()")" f

# every success is there exactly once; at most the one call in flight per client more
nq sb "SELECT split_part(idempotency_key, '-', 1), split_part(idempotency_key, '-', 2)::int, count(*)
         FROM fluxrate_internal.usage_events WHERE org_id = '$ORG' AND idempotency_key LIKE 'c%'
        GROUP BY 1, 2" | tr '|' ' ' > "$OUT/standby-events.txt"
dups=$(awk '$3 != 1' "$OUT/standby-events.txt" | wc -l)
expect "no idempotency key twice" "$dups" 0
while read -r c k; do
  have=$(awk -v c="c$c" -v k="$k" '$1 == c && $2 <= k' "$OUT/standby-events.txt" | wc -l)
  [ "$have" = "$k" ] || fail "client $c: $k calls returned success, $have of them survived"
  extra=$(awk -v c="c$c" -v k="$k" '$1 == c && $2 > k' "$OUT/standby-events.txt" | wc -l)
  [ "$extra" -le 1 ] || fail "client $c: $extra events beyond its $k successes"
done < "$OUT/standby-ok.txt"
survived=$(wc -l < "$OUT/standby-events.txt")
echo "ok: all $ok_total successes survived, $((survived - ok_total)) in-flight calls committed too"

# the jobs resume on the promoted server: January stays billed once
expect "January was closed on the old primary before the kill" "$jan_before" 1
nq sb "CALL fluxrate.close_due_periods()" >/dev/null
expect "closing again bills January once" \
  "$(nq sb "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription' AND kind = 'subscription' AND period_start = '2026-01-01 00:00:00+00'")" 1
# pg_cron on the promoted server runs its (replicated) schedule: wait for one run of the closer (bounded)
t0=$(nq sb "SELECT now()")
for _ in $(seq 1 90); do
  [ "$(nq sb "SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
               WHERE j.jobname = 'fluxrate-close-periods' AND d.start_time > '$t0' AND d.status = 'succeeded'")" -ge 1 ] && break
  sleep 1
done
expect "pg_cron closed on the promoted server" \
  "$(nq sb "SELECT count(*) >= 1 FROM cron.job_run_details d JOIN cron.job j USING (jobid)
             WHERE j.jobname = 'fluxrate-close-periods' AND d.start_time > '$t0' AND d.status = 'succeeded'")" t
expect "and billed January once still" \
  "$(nq sb "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription' AND kind = 'subscription' AND period_start = '2026-01-01 00:00:00+00'")" 1
# January's close: 1000 x 0.002 = 2.00 + February's fee 49.00 = 51.00
expect "January's close: 51.00" \
  "$(nq sb "SELECT total FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription' AND kind = 'subscription' AND period_start = '2026-01-01 00:00:00+00'")" "51.00"
# February: every surviving event of the load (quantity 1, 0.002 each), rounded once, + March's fee 49.00
nqf sb -c "SET fluxrate.pinned_now = '2026-03-01 00:01:00+00'" -c "CALL fluxrate.close_due_periods()" >/dev/null
want=$(awk -v n="$survived" 'BEGIN {printf "%.2f", int(n * 0.2 + 0.5) / 100 + 49}')
expect "February's close bills the $survived surviving events: $want" \
  "$(nq sb "SELECT total FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription' AND kind = 'subscription' AND period_start = '2026-02-01 00:00:00+00'")" "$want"
echo "standby scenario passed"
