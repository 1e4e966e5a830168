#!/usr/bin/env bash
# Releases are real: install the released 0.1.0 (src/sql/release), fill it through
# 0.1.0's own API (test/upgrade/fill-0.1.0.sql), ALTER EXTENSION fluxrate UPDATE,
# then prove
#   1. the updated catalog equals a fresh install's, object by object
#      (test/upgrade/catalog.sql: routines and their bodies, tables, columns,
#      constraints, indexes, policies, triggers, types, owners, privileges,
#      extension membership, what pg_dump includes);
#   2. the stored invoices and lines are the same before and after;
#   3. the updated database keeps working: 0.1.0's API key still tracks, and
#      February closes and finalizes to the cent of a hand computation.
# The updated database is made (and updated) before any 0.2.0 is installed in
# the cluster, so a role that only the fresh install would create cannot hide a
# missing upgrade step.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start upgrade
W=$CLUSTER_DIR
NEW=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$ROOT/fluxrate.control")

# cluster_start installed the current version: take it and its roles away again
q "DROP EXTENSION fluxrate CASCADE; DROP SCHEMA IF EXISTS fluxrate CASCADE;" >/dev/null
for r in $(q "SELECT rolname FROM pg_roles WHERE rolname LIKE 'fluxrate\_%' ORDER BY 1"); do
  q "DROP OWNED BY $r; DROP ROLE $r" >/dev/null
done

echo "== install 0.1.0 and fill it"
q "CREATE EXTENSION fluxrate VERSION '0.1.0'" >/dev/null
[ "$(q "SELECT extversion FROM pg_extension WHERE extname = 'fluxrate'")" = 0.1.0 ] || fail "0.1.0 did not install"
qf -f "$ROOT/test/upgrade/fill-0.1.0.sql" >"$W/fill.log" 2>&1 || { cat "$W/fill.log"; fail "filling 0.1.0 failed"; }
KEY_A=$(sed -n 's/^KEY_A //p' "$W/fill.log"); TOKEN_A=$(sed -n 's/^TOKEN_A //p' "$W/fill.log"); ORG_A=$(sed -n 's/^ORG_A //p' "$W/fill.log")
[ -n "$KEY_A" ] && [ -n "$TOKEN_A" ] && [ -n "$ORG_A" ] || { cat "$W/fill.log"; fail "the fill did not print its key"; }

# what 0.1.0 stored, in 0.1.0's columns
stored() {
  q "SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', i.kind, i.status, i.invoice_number, i.currency,
                              i.subtotal, i.tax, i.total, i.amount_due, i.period_start, i.period_end), E'\n'
                       ORDER BY i.org_id, i.period_start, i.kind, i.id)
       FROM fluxrate_internal.invoices i;
     SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', i.invoice_number, l.position, l.line_type, l.description,
                              l.quantity, l.unit_amount, l.line_total), E'\n'
                       ORDER BY i.org_id, i.period_start, i.kind, l.position)
       FROM fluxrate_internal.invoice_lines l JOIN fluxrate_internal.invoices i ON (i.org_id, i.id) = (l.org_id, l.invoice_id);
     SELECT count(*) FROM fluxrate_internal.usage_events;"
}
stored >"$W/before.txt"
# hand computation of what 0.1.0 billed (organization A, $30/month + graduated calls, 10% CA tax):
#   opening (Jan fee in advance): 30.00, tax 3.00, total 33.00, PAID later? no: the Jan 1 opening stays OPEN
#   January: 1,500 calls = 1,000 x 0.01 + 500 x 0.002 = 10.00 + 1.00 = 11.00; Feb fee 30.00
#            subtotal 41.00, tax 4.10, total 45.10, PAID (amount_due 0)
# organization B: 7 calls x 0.50 EUR = 3.50, no tax rate: total 3.50
grep -q '^subscription|PAID|INV-2026-0002|USD|41.00|4.10|45.10|0|' "$W/before.txt" \
  || { cat "$W/before.txt"; fail "0.1.0's January invoice is not 41.00 + 4.10 = 45.10 paid"; }
grep -q '^opening|OPEN|INV-2026-0001|USD|30.00|3.00|33.00|33.00|' "$W/before.txt" \
  || { cat "$W/before.txt"; fail "0.1.0's opening invoice is not 30.00 + 3.00 = 33.00"; }
grep -q '^subscription|OPEN|INV-2026-0001|EUR|3.50|0.00|3.50|3.50|' "$W/before.txt" \
  || { cat "$W/before.txt"; fail "0.1.0's EUR invoice is not 7 x 0.50 = 3.50"; }

echo "== ALTER EXTENSION fluxrate UPDATE (0.1.0 -> $NEW)"
q "ALTER EXTENSION fluxrate UPDATE" >/dev/null 2>"$W/update.err" || { cat "$W/update.err"; fail "the update failed"; }
[ "$(q "SELECT extversion FROM pg_extension WHERE extname = 'fluxrate'")" = "$NEW" ] || fail "the update did not reach $NEW"
qf -f "$ROOT/test/upgrade/catalog.sql" >"$W/catalog-updated.txt"

echo "== a fresh $NEW beside it"
createdb fresh
PGDATABASE=fresh q "CREATE EXTENSION fluxrate" >/dev/null
PGDATABASE=fresh qf -f "$ROOT/test/upgrade/catalog.sql" >"$W/catalog-fresh.txt"
if ! diff -u "$W/catalog-fresh.txt" "$W/catalog-updated.txt" >"$W/catalog.diff"; then
  echo "catalog differences (- fresh $NEW, + 0.1.0 updated):"; head -80 "$W/catalog.diff"
  fail "the updated catalog differs from a fresh install: src/sql/upgrade/0.1.0--$NEW.sql misses a step"
fi
echo "catalog: $(wc -l <"$W/catalog-fresh.txt") objects, no difference"

echo "== the minute job moves 0.1.0's events into monthly partitions"
# 0.1.0's events are in the default partition after the update (docs/ingestion.md,
# "Upgrading from 0.1.0"); the job makes this month's partitions and those ahead,
# then drains three months of the default per run: 2025-07 .. 2026-02 are eight
# months, so three runs empty it
for run in 1 2 3; do
  q "SET fluxrate.pinned_now = '2026-02-20 12:00:00+00'; SELECT fluxrate.maintain_event_storage()" >/dev/null
done
PARTS=$(q "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'fluxrate_internal.usage_events'::regclass")
expect_parts=usage_events_default,usage_events_y2025m07,usage_events_y2025m08,usage_events_y2025m09,usage_events_y2025m10,usage_events_y2025m11,usage_events_y2025m12,usage_events_y2026m01,usage_events_y2026m02,usage_events_y2026m03,usage_events_y2026m04
[ "$PARTS" = "$expect_parts" ] || fail "partitions after the job: $PARTS, not $expect_parts"
[ "$(q "SELECT count(*) FROM fluxrate_internal.usage_events_default")" = 0 ] || fail "the default partition still holds events"
# 60 history events of 1..60 (sum 1,830), 10 a month; January 1,200 + 300 + 7, February 400
[ "$(q "SELECT count(*) || ' ' || sum(quantity) FROM fluxrate_internal.usage_events_y2025m09")" = "10 255" ] \
  || fail "September 2025 does not hold its 10 events 21..30 (sum 255)"
[ "$(q "SELECT count(*) FROM fluxrate_internal.usage_event_keys")" = 64 ] || fail "not 64 idempotency keys (60 history, a-1, a-2, b-1, a-3)"
echo "partitions: ${PARTS//,/ }; default empty; 64 keys"

echo "== the stored invoices are untouched"
stored >"$W/after.txt"
diff -u "$W/before.txt" "$W/after.txt" || fail "the update changed stored invoices or events"

echo "== the updated database keeps billing"
# 0.1.0's key tracks through the 0.2.0 code; February closes: 400 + 600 = 1,000 calls
# = 1,000 x 0.01 = 10.00, March's fee 30.00: subtotal 40.00, tax 10% 4.00, total 44.00
qf -v key="$KEY_A" -v token="$TOKEN_A" -v org="$ORG_A" >"$W/after-update.log" 2>&1 <<'SQL' || { cat "$W/after-update.log"; fail "billing after the update failed"; }
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '2026-02-20 12:00:00+00';
SELECT (fluxrate.track(api_key => :'key', meter_token => :'token', customer_external_id => 'initech',
        quantity => 600, idempotency_key => 'a-4'))->>'replay' AS replay;
-- a replay of a key stored by 0.1.0 is still a replay, also one whose event moved
-- to its month's partition (h-25: 25, on 2025-09-05)
SELECT (fluxrate.track(api_key => :'key', meter_token => :'token', customer_external_id => 'history-co',
        quantity => 25, idempotency_key => 'h-25', "timestamp" => '2025-09-05 00:00:00+00'))->>'replay' AS replay;
SELECT (fluxrate.track(api_key => :'key', meter_token => :'token', customer_external_id => 'initech',
        quantity => 1200, idempotency_key => 'a-1', "timestamp" => '2026-01-05 10:00:00+00'))->>'replay' AS replay;
SET fluxrate.pinned_now = '2026-03-01 00:01:00+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-03-01 01:02:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT fluxrate.act_as(:'org', session => true) AS acting \gset
SELECT 'FEB ' || (i->>'invoice_number') || '|' || (i->>'status') || '|' || (i->>'subtotal') || '|' || (i->>'tax') || '|' || (i->>'total')
  FROM fluxrate_internal.invoices v, fluxrate.get_invoice(v.id) i
 WHERE v.org_id = :'org' AND v.kind = 'subscription' AND v.period_start = '2026-02-01 00:00:00+00';
SQL
grep -q '^FEB INV-2026-0003|OPEN|40.00|4.00|44.00$' "$W/after-update.log" \
  || { cat "$W/after-update.log"; fail "February after the update is not 40.00 + 4.00 = 44.00"; }
[ "$(grep -c '^true$' "$W/after-update.log")" = 2 ] || { cat "$W/after-update.log"; fail "the 0.1.0 idempotency keys did not replay"; }
echo "February after the update: INV-2026-0003 40.00 + 4.00 = 44.00; the 0.1.0 key replays"
echo "upgrade: ok"
