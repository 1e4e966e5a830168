#!/usr/bin/env bash
# Closing is exactly-once: two closers at the same moment, and a closer killed in
# the middle of a large run, end with one invoice per subscription period, no
# duplicate, no gap; concurrent finalizations number gaplessly.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start closer
N=300
ORG=$(q "SELECT (fluxrate.create_organization('Closers', grace_period => '5 minutes'))->>'id'")
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-01-01 00:00:00+00'"
q "SELECT fluxrate.act_as('$ORG');
   SELECT fluxrate.add_charge((SELECT id FROM (SELECT ((fluxrate.create_plan('P','p','FIXED','month','USD'))->>'id')::uuid AS id) p), 'FIXED', unit_price => 10);
   SELECT count(fluxrate.create_subscription(((fluxrate.create_customer('c' || g, 'c' || g || '@example.com'))->>'id')::uuid,
          (SELECT id FROM fluxrate_internal.plans WHERE org_id = '$ORG'), start_date => '2026-01-01 00:00+00'))
     FROM generate_series(1, $N) g" >/dev/null
check() {  # expected periods per subscription
  local want=$1
  local got
  got=$(q "SELECT count(*) || ' ' || count(DISTINCT (subscription_id, period_start)) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription'")
  local gaps
  gaps=$(q "SELECT count(*) FROM (SELECT period_start, lag(period_end) OVER (PARTITION BY subscription_id ORDER BY period_start) AS prev_end
                                    FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription') x
            WHERE prev_end IS NOT NULL AND prev_end <> period_start")
  local behind
  behind=$(q "SELECT count(*) FROM fluxrate_internal.subscriptions WHERE org_id = '$ORG' AND current_period_index <> $want")
  local opening
  opening=$(q "SELECT count(*) || ' ' || count(DISTINCT subscription_id) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'opening'")
  echo "invoices, distinct periods: $got; gaps: $gaps; subscriptions not advanced: $behind; opening invoices, subscriptions: $opening"
  [ "$opening" = "$N $N" ] || { echo "FAIL opening"; exit 1; }
  [ "$got" = "$((N * want)) $((N * want))" ] && [ "$gaps" = 0 ] && [ "$behind" = 0 ] || { echo "FAIL"; exit 1; }
}

echo "== two closers at the same moment, three periods due (Jan, Feb, Mar)"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-04-01 00:00:30+00'"
psql -X -q -c "CALL fluxrate.close_due_periods(7)" & a=$!
psql -X -q -c "CALL fluxrate.close_due_periods(7)" & b=$!
wait $a; wait $b
check 3

echo "== a closer killed in the middle of a large run, then a normal run"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-09-01 00:00:30+00'"
PGAPPNAME=victim psql -X -q -c "CALL fluxrate.close_due_periods(1)" >/dev/null 2>&1 & v=$!
sleep 1
killed=$(q "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'victim'")
wait $v || true
partial=$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription'")
echo "killed $killed closer(s) with $partial invoices written so far"
[ "$partial" -lt $((N * 8)) ] || echo "(note: the closer finished before it was killed)"
q "CALL fluxrate.close_due_periods()" >/dev/null
check 8

echo "== the closer's ANALYZE of a fast-grown invoices table: done when stale, never waited for"
# (statistics as a closing run leaves them: far fewer pages than the table has;
# set in the catalog by this superuser harness, since autovacuum may run anytime)
stale="UPDATE pg_class SET relpages = 0 WHERE oid = 'fluxrate_internal.invoices'::regclass"
PGAPPNAME=holder psql -X -q -c "BEGIN" -c "LOCK TABLE fluxrate_internal.invoices IN SHARE UPDATE EXCLUSIVE MODE" \
  -c "SELECT pg_sleep(60)" >/dev/null 2>&1 & h=$!
for i in $(seq 50); do
  [ "$(q "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'holder'
           AND l.relation = 'fluxrate_internal.invoices'::regclass AND l.granted")" = 1 ] && break; sleep 0.1
done
held=$(PGOPTIONS="-c statement_timeout=5s" q "$stale; SELECT fluxrate_internal.analyze_invoices_if_outgrown()")
q "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'holder'" >/dev/null
wait $h || true
stale_run=$(q "$stale; SELECT fluxrate_internal.analyze_invoices_if_outgrown()")
fresh_run=$(q "SELECT fluxrate_internal.analyze_invoices_if_outgrown()")
pages=$(q "SELECT relpages > 8 FROM pg_class WHERE oid = 'fluxrate_internal.invoices'::regclass")
echo "analyzed while another session held the table: $held; when stale: $stale_run; right after: $fresh_run; pages counted: $pages"
[ "$held $stale_run $fresh_run $pages" = "f t f t" ] || { echo "FAIL: analyze_invoices_if_outgrown"; exit 1; }

echo "== two finalizers at once: gapless numbers"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-09-01 01:00:00+00'"
psql -X -q -c "CALL fluxrate.finalize_due_invoices(5)" & a=$!
psql -X -q -c "CALL fluxrate.finalize_due_invoices(5)" & b=$!
wait $a; wait $b
nums=$(q "SELECT count(*) || ' ' || max(split_part(invoice_number, '-', 3)::int) || ' ' || count(DISTINCT invoice_number)
          FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND status = 'OPEN'")
N8=$((N * 9))  # 8 closed periods + 1 opening invoice each
echo "open invoices, highest number, distinct numbers: $nums"
[ "$nums" = "$N8 $N8 $N8" ] || { echo "FAIL: numbers are not gapless"; exit 1; }
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
