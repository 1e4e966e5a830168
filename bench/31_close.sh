#!/usr/bin/env bash
# Period closing: closing 10,000 subscriptions with 3 usage charges each over
# 10M events (one month), vs one plain GROUP BY customer, meter pass over the
# same events, side by side in one run.  Reported in events per second.
# The closer reads the month from the usage rollups that the minute job keeps
# (refreshed here once, before the period ends, and timed apart) plus the
# events that arrived after the last refresh.
# BENCH_GROUPS=N (bench/34_close_grouped.sh: 10): the first meter carries a
# dimension (model, N values) and its charge prices by it, N groups with their
# own pricing (issue 15); the events carry the model; the rollups are keyed by
# it and the closer reads them by group.  The baseline then groups by the
# model too (GROUP BY customer, meter, model: the plain pass that answers it).
set -euo pipefail
NGROUPS=${BENCH_GROUPS:-0}   # (not GROUPS: bash keeps the user's group ids there)
SUBS=${BENCH_SUBS:-10000}
EVENTS=${BENCH_EVENTS:-10000000}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
ORG=$(q "SELECT (fluxrate.create_organization('Bench close'))->>'id'")
q "ALTER DATABASE $PGDATABASE SET fluxrate.pinned_now = '2026-10-01 00:00:00+00'"
PLAN=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_plan('Metered', 'metered', 'USAGE', 'month', 'USD'))->>'id'" | tail -1)
for m in 1 2 3; do
  q "SELECT fluxrate.act_as('$ORG');
     SELECT fluxrate.add_charge('$PLAN', 'USAGE', meter_id => ((fluxrate.create_feature('Meter $m', 'm$m', 'meter', meter_name => 'm$m',
            property_name => 'q', aggregation_type => 'SUM'))->>'meter_id')::uuid, unit_price => 0.00$m)" >/dev/null
done
if [ "$NGROUPS" -gt 0 ]; then
  # meter m1 split by model (g0 .. g<N-1>); its charge: per unit, graduated and package groups in turn
  q "SELECT fluxrate.act_as('$ORG');
     SELECT fluxrate.set_meter_dimension(m.id, 'model', ARRAY(SELECT 'g' || i FROM generate_series(0, $NGROUPS - 1) i))
       FROM fluxrate_internal.meters m WHERE m.org_id = '$ORG' AND m.meter_name = 'm1';
     SELECT fluxrate.set_charge_groups(c.id, 'model', (SELECT jsonb_agg(CASE i % 3
              WHEN 0 THEN jsonb_build_object('value', 'g' || i, 'unit_price', 0.001 * (i + 1))
              WHEN 1 THEN jsonb_build_object('value', 'g' || i, 'pricing_model', 'graduated',
                            'tiers', jsonb_build_array(jsonb_build_object('up_to', 100, 'unit_price', 0.01),
                                                       jsonb_build_object('up_to', NULL, 'unit_price', 0.002)))
              ELSE jsonb_build_object('value', 'g' || i, 'pricing_model', 'package', 'package_size', 50, 'package_price', 0.2) END
              ORDER BY i) FROM generate_series(0, $NGROUPS - 1) i))
       FROM fluxrate_internal.charges c JOIN fluxrate_internal.meters m ON m.org_id = c.org_id AND m.id = c.meter_id
      WHERE c.org_id = '$ORG' AND m.meter_name = 'm1'" >/dev/null
fi
q "INSERT INTO fluxrate_internal.customers (org_id, name, email, external_id, created_at, updated_at)
   SELECT '$ORG', 'c' || g, 'c' || g || '@example.com', 'cust-' || g, now(), now() FROM generate_series(1, $SUBS) g"
q "SELECT fluxrate.act_as('$ORG');
   SELECT count(fluxrate.create_subscription(c.id, '$PLAN', start_date => '2026-10-01 00:00+00'))
     FROM fluxrate_internal.customers c WHERE c.org_id = '$ORG'" >/dev/null
# BENCH_COUPON=1 (bench/32_close_coupon.sh): a coupon on every subscription,
# 20% off forever, so every invoice carries a discount line (issue 16)
COUPON=${BENCH_COUPON:-0}
if [ "$COUPON" = 1 ]; then
  q "SELECT fluxrate.act_as('$ORG');
     SELECT fluxrate.create_coupon('BENCH20', 'Bench 20%', 'percentage', percent_off => 20, duration => 'forever');
     SELECT count(fluxrate.redeem_coupon(code => 'BENCH20', subscription_id => s.id))
       FROM fluxrate_internal.subscriptions s WHERE s.org_id = '$ORG'" >/dev/null
  echo "a 20% coupon redeemed on each of the $SUBS subscriptions"
fi
# BENCH_WALLET=1: a wallet on every subscription (issue 16): each customer holds
# two credit grants (a paid one and an expiring promotional one of a higher
# priority), which the finalization after the close draws down
if [ "${BENCH_WALLET:-0}" = 1 ]; then
  q "SELECT fluxrate.act_as('$ORG');
     SELECT count(fluxrate.create_credit_grant(c.id, 40, 'USD', grant_type => 'paid')),
            count(fluxrate.create_credit_grant(c.id, 5, 'USD', expires_at => '2026-12-15', priority => 10))
       FROM fluxrate_internal.customers c WHERE c.org_id = '$ORG'" >/dev/null
  echo "wallets: $(q "SELECT count(*) || ' grants, ' || sum(amount) || ' USD' FROM fluxrate_internal.credit_grants WHERE org_id = '$ORG'")"
fi
echo "generating $EVENTS events for $SUBS customers x 3 meters in October 2026"
# (customer and meter numbers are joined, not subscripted out of an array: a
# 10,000-element array would be detoasted for every row)
q "CREATE TABLE public.bench_cust AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.customers WHERE org_id = '$ORG';
   CREATE TABLE public.bench_meter AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.meters WHERE org_id = '$ORG';
   INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, \"timestamp\", ingested_at, metadata)
   SELECT '$ORG', fluxrate_internal.uuid_v7(), c.id, m.id, 1 + (g % 7),
          timestamptz '2026-10-01' + (g % 2678400) * interval '1 second', timestamptz '2026-10-01',
          CASE WHEN $NGROUPS > 0 THEN jsonb_build_object('model', 'g' || ((g / 7) % greatest($NGROUPS, 1))) END
     FROM generate_series(0, $EVENTS - 1) g
     JOIN public.bench_cust c ON c.n = g % $SUBS
     JOIN public.bench_meter m ON m.n = (g / $SUBS) % 3;
   DROP TABLE public.bench_cust, public.bench_meter"
psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_events" -c "CHECKPOINT" >/dev/null
# The usage rollups, as the minute job keeps them during the month: in
# production each refresh counts the last minute's events; here all 10M at once
# (reported, not in the closing time: it is ingestion-side work, done before
# the period ends).  Then a tail: events that arrive after the last refresh,
# which the closer reads from the events themselves.
r0=$(date +%s.%N)
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
r1=$(date +%s.%N)
# (as after the load: the bulk refresh's ~1M new rollup rows would otherwise
# have autovacuum and a checkpoint working beside the timed close; the minute
# job's refreshes are small)
psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_rollups" -c "CHECKPOINT" >/dev/null
TAIL=${BENCH_TAIL:-10000}
q "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, \"timestamp\", ingested_at)
   SELECT '$ORG', fluxrate_internal.uuid_v7(), c.id, m.id, 2, timestamptz '2026-10-31 23:00' + (g % 3600) * interval '1 second', timestamptz '2026-10-31 23:59'
     FROM generate_series(0, $TAIL - 1) g
     JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.customers WHERE org_id = '$ORG') c ON c.n = g % $SUBS
     JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.meters WHERE org_id = '$ORG') m ON m.n = g % 3"
EVENTS=$((EVENTS + TAIL))
awk -v a="$r0" -v b="$r1" -v n="$EVENTS" -v t="$TAIL" 'BEGIN { printf "rollup refresh of %d events: %.2f s (the minute job, before the period ends); %d events after it (the tail)\n", n - t, b - a, t }'

s=$(date +%s.%N)
# sum(s) on top: a bare count(*) would let the planner drop the unused sum(numeric)
if [ "$NGROUPS" -gt 0 ]; then
  q "SELECT count(*), sum(s) FROM (SELECT customer_id, meter_id, metadata->>'model', sum(quantity) AS s FROM fluxrate_internal.usage_events
      WHERE org_id = '$ORG' AND \"timestamp\" >= '2026-10-01' AND \"timestamp\" < '2026-11-01' GROUP BY 1, 2, 3) x" >/dev/null
else
  q "SELECT count(*), sum(s) FROM (SELECT customer_id, meter_id, sum(quantity) AS s FROM fluxrate_internal.usage_events
      WHERE org_id = '$ORG' AND \"timestamp\" >= '2026-10-01' AND \"timestamp\" < '2026-11-01' GROUP BY 1, 2) x" >/dev/null
fi
b=$(date +%s.%N)
q "ALTER DATABASE $PGDATABASE SET fluxrate.pinned_now = '2026-11-01 00:00:30+00'"
psql -X -q -c "CALL fluxrate.close_due_periods()"
e=$(date +%s.%N)
inv=$(q "SELECT count(*) || ' invoices, ' || (SELECT count(*) FROM fluxrate_internal.invoice_lines WHERE org_id = '$ORG') || ' lines, total ' || sum(total) FROM fluxrate_internal.invoices WHERE org_id = '$ORG'")
echo "closed: $inv"
awk -v n="$EVENTS" -v s="$s" -v b="$b" -v e="$e" -v suffix="$([ "$NGROUPS" -gt 0 ] && echo "_grouped_$NGROUPS" || true)$([ "$COUPON" = 1 ] && echo _coupon)$([ "${BENCH_WALLET:-0}" = 1 ] && echo _wallet)" 'BEGIN {
  base = n / (b - s); ours = n / (e - b);
  printf "baseline GROUP BY: %.2f s; closing: %.2f s\n", b - s, e - b;
  printf "bench close_periods%s: ours=%.0f/s baseline=%.0f/s ratio=%.3f\n", suffix, ours, base, ours / base }'
# The next close (reported, no goal): October finalized after its grace hour,
# November without events.  Every close re-checks the usage of the periods on
# each subscription's last finalized invoices for late events; here October's,
# read from the rollups.
q "ALTER DATABASE $PGDATABASE SET fluxrate.pinned_now = '2026-11-01 01:00:30+00'"
f0=$(date +%s.%N)
psql -X -q -c "CALL fluxrate.finalize_due_invoices()"
f1=$(date +%s.%N)
awk -v a="$f0" -v b="$f1" -v c="$(q "SELECT count(*) || ' invoices, credits applied ' || sum(credits_applied) || ', due ' || sum(amount_due)
                                     FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND status <> 'DRAFT'")" \
  'BEGIN { printf "finalization (reported, no goal): %.2f s, %s\n", b - a, c }'
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
q "ALTER DATABASE $PGDATABASE SET fluxrate.pinned_now = '2026-12-01 00:00:30+00'"
n0=$(date +%s.%N)
psql -X -q -c "CALL fluxrate.close_due_periods()"
n1=$(date +%s.%N)
awk -v a="$n0" -v b="$n1" -v c="$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND period_start = '2026-11-01'")" \
  'BEGIN { printf "next close (November, October re-checked for late usage): %.2f s, %d drafts\n", b - a, c }'
q "ALTER DATABASE $PGDATABASE RESET fluxrate.pinned_now"
