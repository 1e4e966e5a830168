#!/usr/bin/env bash
# Many connections retrying the same idempotency keys at once end with exactly
# one event per key, and no error (a retry is a replay, not a failure).
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start ingest
ORG=$(q "SELECT (fluxrate.create_organization('Concurrent'))->>'id'")
TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('bench', ARRAY['usage.write']))->>'key'" | tail -1)
cat > "$CLUSTER_DIR/retry.sql" <<SQL
\set k random(1, 200)
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'cust-' || (:k % 7),
                      quantity => :k, idempotency_key => 'order-' || :k);
SQL
echo "pgbench: 8 clients, 5 s, 200 keys"
pgbench -n -c 8 -j 2 -T 5 -D key="'$KEY'" -D tok="'$TOK'" -f "$CLUSTER_DIR/retry.sql" fluxrate > "$CLUSTER_DIR/pgbench.out" 2>&1
grep -E 'number of transactions actually processed|number of failed' "$CLUSTER_DIR/pgbench.out" || true
RESULT=$(q "SELECT count(*) || ' ' || count(DISTINCT idempotency_key) || ' ' || sum(quantity) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'")
CUSTOMERS=$(q "SELECT count(*) FROM fluxrate_internal.customers WHERE org_id = '$ORG'")
echo "events, distinct keys, sum: $RESULT; customers: $CUSTOMERS"
# every key 1..200 is hit with overwhelming probability in thousands of calls: 200 events, sum 1+..+200 = 20100
[ "$RESULT" = "200 200 20100" ] || { echo "FAIL: expected 200 events summing to 20100"; exit 1; }
[ "$CUSTOMERS" = "7" ] || { echo "FAIL: expected 7 auto-created customers"; exit 1; }
echo "ok: exactly one event per key under concurrent retries"

# Idempotency across partitions (issue 17): each key's event falls in one of four
# months -- this month, the two before (partitions made here) and the third
# before (no partition: the default) -- so the retries of one key race into any
# partition; the key table alone must keep them to one event per key.
q "SELECT fluxrate.maintain_event_storage();
   SELECT fluxrate_internal.make_event_partition(now() - interval '1 month');
   SELECT fluxrate_internal.make_event_partition(now() - interval '2 months')" >/dev/null
cat > "$CLUSTER_DIR/spread.sql" <<SQL
\set k random(1, 200)
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'cust-' || (:k % 7),
                      quantity => :k, idempotency_key => 'spread-' || :k,
                      "timestamp" => date_trunc('month', now(), 'UTC') - (:k % 4) * interval '1 month');
SQL
echo "pgbench: 8 clients, 5 s, 200 keys over 4 months (3 partitions and the default)"
pgbench -n -c 8 -j 2 -T 5 -D key="'$KEY'" -D tok="'$TOK'" -f "$CLUSTER_DIR/spread.sql" fluxrate > "$CLUSTER_DIR/pgbench2.out" 2>&1
grep -E 'number of transactions actually processed|number of failed' "$CLUSTER_DIR/pgbench2.out" || true
grep -qE '^number of failed transactions: 0 ' "$CLUSTER_DIR/pgbench2.out" || { cat "$CLUSTER_DIR/pgbench2.out"; echo "FAIL: retries across partitions failed"; exit 1; }
RESULT=$(q "SELECT count(*) || ' ' || count(DISTINCT idempotency_key) || ' ' || sum(quantity) || ' ' || count(DISTINCT tableoid)
              FROM fluxrate_internal.usage_events WHERE org_id = '$ORG' AND idempotency_key LIKE 'spread-%'")
KEYS=$(q "SELECT count(*) FROM fluxrate_internal.usage_event_keys k JOIN fluxrate_internal.usage_events e
            ON e.org_id = k.org_id AND e.id = k.event_id AND e.\"timestamp\" = k.\"timestamp\"
           WHERE k.org_id = '$ORG' AND k.idempotency_key LIKE 'spread-%'")
echo "events, distinct keys, sum, partitions: $RESULT; keys naming their event: $KEYS"
[ "$RESULT" = "200 200 20100 4" ] || { echo "FAIL: expected 200 events over 4 partitions summing to 20100"; exit 1; }
[ "$KEYS" = "200" ] || { echo "FAIL: expected 200 keys, each naming its event"; exit 1; }
echo "ok: exactly one event per key when a key's retries may land in any partition"
