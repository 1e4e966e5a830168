#!/usr/bin/env bash
# Closing is exactly-once: two closers at the same moment, and a closer killed in
# the middle of a large run, end with one invoice per subscription period, no
# duplicate, no gap; concurrent finalizations number gaplessly; a plan change
# racing a close comes before it or after it, never both.
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
echo "== a plan change racing a close (docs/lifecycle.md, "Plan changes"): before it or after it, never both"
# Both lock the subscription row (the closer FOR UPDATE SKIP LOCKED, change_subscription FOR UPDATE).
# The sessions are held at a chosen point by an advisory lock that a gate session holds and releases.
R=$(q "SELECT (fluxrate.create_organization('Racers', grace_period => '5 minutes'))->>'id'")
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-09-01 02:00:00+00'"
read -r SMALL BIG SUB_A SUB_B <<<"$(q "SELECT fluxrate.act_as('$R');
  SELECT s.id || ' ' || b.id || ' ' || a.sid || ' ' || bb.sid FROM
    (SELECT ((fluxrate.create_plan('Small', 'small', 'FIXED', 'month', 'USD'))->>'id')::uuid AS id) s,
    (SELECT ((fluxrate.create_plan('Big', 'big', 'FIXED', 'month', 'USD'))->>'id')::uuid AS id) b,
    LATERAL (SELECT fluxrate.add_charge(s.id, 'FIXED', unit_price => 10), fluxrate.add_charge(b.id, 'FIXED', unit_price => 40)) c,
    LATERAL (SELECT (fluxrate.create_subscription(((fluxrate.create_customer('ra', 'ra@example.com'))->>'id')::uuid, s.id,
                       start_date => '2026-09-01 00:00+00'))->>'id' AS sid) a,
    LATERAL (SELECT (fluxrate.create_subscription(((fluxrate.create_customer('rb', 'rb@example.com'))->>'id')::uuid, s.id,
                       start_date => '2026-09-05 00:00+00'))->>'id' AS sid) bb" | tail -1)"
gate() { PGAPPNAME=gate psql -X -q -c "SELECT pg_advisory_lock($1)" -c "SELECT pg_sleep(300)" >/dev/null 2>&1 & }
wait_for() {  # SQL condition, what
  for i in $(seq 300); do [ "$(q "SELECT ($1)")" = t ] && return 0; sleep 0.1; done
  echo "FAIL: timed out waiting for $2"; exit 1
}
held() { echo "EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '$1'
                         AND l.locktype = 'advisory' AND l.objid = $2 AND l.granted = $3)"; }
invoices_of() {
  q "SELECT string_agg(kind || ' ' || to_char(period_start, 'MM-DD HH24:MI') || '-' || to_char(period_end, 'MM-DD HH24:MI') || ' ' || total,
                       ', ' ORDER BY period_start, period_end, kind) FROM fluxrate_internal.invoices WHERE subscription_id = '$1'"
}
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-10-01 00:00:30+00'"   # September is due
# (a) the close first: the closer has closed September and holds the row; the change waits for it,
# then sees October: its change invoice bills [Oct 1, now) (nothing elapsed: credit 10 x 1, charge 40 x 1)
gate 4242; wait_for "$(held gate 4242 true)" "the gate"
PGAPPNAME=closer psql -X -q -c "BEGIN" -c "SELECT fluxrate_internal.sys_close_batch(2000)" \
  -c "SELECT pg_advisory_xact_lock(4242)" -c "COMMIT" >/dev/null & c1=$!
wait_for "$(held closer 4242 false)" "the closer to hold its rows"
PGAPPNAME=changer psql -X -q -c "SELECT fluxrate.act_as('$R', true)" -c "SELECT fluxrate.change_subscription('$SUB_A', '$BIG')" >/dev/null & c2=$!
wait_for "EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'changer' AND wait_event_type = 'Lock')" "the change to wait"
q "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'gate'" >/dev/null
wait $c1; wait $c2
got_a=$(invoices_of "$SUB_A")
echo "close, then change: $got_a"
# opening Sep 10.00; September's close: next month's Small fee 10.00; the change at Oct 1 00:00:30:
# the rest of October, 30 d 23:59:30 of 31 d: -10 x 0.99998880 = -10.00, +40 x 0.99998880 = 40.00 -> 30.00
[ "$got_a" = "opening 09-01 00:00-10-01 00:00 10.00, subscription 09-01 00:00-10-01 00:00 10.00, change 10-01 00:00-10-01 00:00 30.00" ] \
  || { echo "FAIL: close then change"; exit 1; }
# (b) the change first: it holds the row (and closes September itself, as the closer would); the
# closer skips the row; when the change commits, nothing of the subscription is left to close
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-10-05 00:00:30+00'"   # B's September is due
gate 4243; wait_for "$(held gate 4243 true)" "the gate"
PGAPPNAME=changer psql -X -q -c "BEGIN" -c "SELECT fluxrate.act_as('$R', true)" -c "SELECT fluxrate.change_subscription('$SUB_B', '$BIG')" \
  -c "SELECT pg_advisory_xact_lock(4243)" -c "COMMIT" >/dev/null & c2=$!
wait_for "$(held changer 4243 false)" "the change to hold the row"
q "CALL fluxrate.close_due_periods()" >/dev/null
skipped=$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE subscription_id = '$SUB_B' AND kind = 'subscription'")
q "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'gate'" >/dev/null
wait $c2
q "CALL fluxrate.close_due_periods()" >/dev/null
got_b=$(invoices_of "$SUB_B")
echo "change, then close: closer wrote $skipped closing invoice(s) while the change held the row; $got_b"
# (the same amounts, from Sep 5: October's rest is 30 d 23:59:30 of 31 d too)
[ "$skipped" = 0 ] && [ "$got_b" = "opening 09-05 00:00-10-05 00:00 10.00, subscription 09-05 00:00-10-05 00:00 10.00, change 10-05 00:00-10-05 00:00 30.00" ] \
  || { echo "FAIL: change then close"; exit 1; }
# either way: one closing invoice per period, on the subscription's plan of that period
q "SELECT count(*) || ' ' || count(DISTINCT (subscription_id, period_start)) FROM fluxrate_internal.invoices
    WHERE org_id = '$R' AND kind = 'subscription'" | grep -qx "2 2" || { echo "FAIL: closing invoices"; exit 1; }
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
