#!/usr/bin/env bash
# Money adjustments under concurrency (issue 16, items 1 and 3; docs/ledger.md):
#   1. two closers at the same moment apply each coupon exactly once per period,
#      and a fixed amount with carry-over is never spent twice (Lago's bug:
#      double-applied coupons), also when two finalizers refresh the drafts;
#   2. a redemption limit holds under concurrent redemptions (8 sessions);
#   3. credit notes created by 4 sessions at once are numbered gaplessly, and
#      concurrent credit notes on one invoice never credit more than it has.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start adjust
N=200
ORG=$(q "SELECT (fluxrate.create_organization('Adjusters', grace_period => '5 minutes'))->>'id'")
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-01-01 00:00:00+00'"
act="SELECT fluxrate.act_as('$ORG', true);"
# $10 a month in arrears; odd subscriptions get 10% forever, even ones a $25
# budget (fixed, carry-over) that three $10 months spend as 10 + 10 + 5
q "$act
   SELECT fluxrate.add_charge(((fluxrate.create_plan('P', 'p', 'FIXED', 'month', 'USD'))->>'id')::uuid, 'FIXED', unit_price => 10,
                              billing_timing => 'in_arrears');
   SELECT fluxrate.create_coupon('TEN', '10% off', 'percentage', percent_off => 10, duration => 'forever');
   SELECT fluxrate.create_coupon('BUDGET', '\$25 budget', 'fixed', amount_off => 25, currency => 'USD', duration => 'forever', carry_over => true);
   SELECT fluxrate.create_coupon('LIMITED', 'First 50', 'percentage', percent_off => 1, duration => 'forever', max_redemptions => 50);
   SELECT count(fluxrate.create_subscription(((fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'c' || g, billing_address_country => 'US'))->>'id')::uuid,
          (SELECT id FROM fluxrate_internal.plans WHERE org_id = '$ORG'), start_date => '2026-01-01 00:00+00'))
     FROM generate_series(1, $N) g;
   SELECT count(fluxrate.redeem_coupon(code => CASE WHEN s.n % 2 = 1 THEN 'TEN' ELSE 'BUDGET' END, subscription_id => s.id))
     FROM (SELECT x.id, row_number() OVER (ORDER BY c.external_id) AS n FROM fluxrate_internal.subscriptions x
             JOIN fluxrate_internal.customers c ON c.org_id = x.org_id AND c.id = x.customer_id WHERE x.org_id = '$ORG') s" >/dev/null

echo "== two closers at the same moment, three periods due"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-04-01 00:00:30+00'"
psql -X -q -c "CALL fluxrate.close_due_periods(7)" & a=$!
psql -X -q -c "CALL fluxrate.close_due_periods(7)" & b=$!
wait $a; wait $b
check() {
  local got
  got=$(q "SELECT count(*) || ' ' || count(DISTINCT (l.invoice_id, l.redemption_id)) || ' ' || count(DISTINCT (i.subscription_id, i.period_start))
             FROM fluxrate_internal.invoice_lines l JOIN fluxrate_internal.invoices i ON i.org_id = l.org_id AND i.id = l.invoice_id
            WHERE l.org_id = '$ORG' AND l.line_type = 'discount'")
  # per redemption: 10% = 1.00 a month, 3.00 in all; the budget 10 + 10 + 5 = 25.00, never more
  local sums
  sums=$(q "SELECT string_agg(z.x, '; ' ORDER BY z.x) FROM (
              SELECT count(*) || ' ' || y.code || ' ' || y.spent AS x FROM (
                SELECT k.code, -sum(l.line_total) AS spent FROM fluxrate_internal.invoice_lines l
                  JOIN fluxrate_internal.coupon_redemptions r ON r.org_id = l.org_id AND r.id = l.redemption_id
                  JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id
                 WHERE l.org_id = '$ORG' AND l.line_type = 'discount' GROUP BY r.id, k.code) y
               GROUP BY y.code, y.spent) z")
  local totals
  totals=$(q "SELECT count(*) || ' ' || sum(total) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription'")
  echo "discount lines, distinct (invoice, redemption), distinct periods: $got"
  echo "spent per redemption (count, code, amount): $sums"
  echo "invoices, total billed: $totals"
  # 200 subscriptions x 3 periods, one line each: 600 600 600
  [ "$got" = "$((N * 3)) $((N * 3)) $((N * 3))" ] || { echo "FAIL: a coupon was applied twice or not at all"; exit 1; }
  # 100 x 3.00 and 100 x 25.00
  [ "$sums" = "100 BUDGET 25.00; 100 TEN 3.00" ] || { echo "FAIL: spent per redemption"; exit 1; }
  # billed: 100 x (3 x 9.00) + 100 x (30.00 - 25.00) = 2,700.00 + 500.00 = 3,200.00
  [ "$totals" = "$((N * 3)) 3200.00" ] || { echo "FAIL: totals"; exit 1; }
}
check
echo "== two finalizers at once refresh the drafts (fill_lines): the same amounts"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-04-01 01:00:00+00'"
psql -X -q -c "CALL fluxrate.finalize_due_invoices(7)" & a=$!
psql -X -q -c "CALL fluxrate.finalize_due_invoices(7)" & b=$!
wait $a; wait $b
open=$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND status = 'OPEN'")
echo "open invoices: $open"
[ "$open" = $((N * 3)) ] || { echo "FAIL: not all finalized"; exit 1; }
check

echo "== a redemption limit of 50 under 8 concurrent sessions of 25 redemptions each"
for s in $(seq 0 7); do
  { echo "$act"
    for k in $(seq 1 25); do
      echo "SELECT fluxrate.redeem_coupon(code => 'LIMITED', subscription_id => (SELECT x.id FROM fluxrate_internal.subscriptions x
              JOIN fluxrate_internal.customers c ON c.org_id = x.org_id AND c.id = x.customer_id
             WHERE x.org_id = '$ORG' AND c.external_id = 'c$((s * 25 + k))'));"
    done; } > "$OUT/redeem_$s.sql"
  psql -X -q -f "$OUT/redeem_$s.sql" > "$OUT/redeem_$s.log" 2>&1 & pids[$s]=$!
done
for p in "${pids[@]}"; do wait "$p"; done
lim=$(q "SELECT (SELECT times_redeemed FROM fluxrate_internal.coupons WHERE org_id = '$ORG' AND code = 'LIMITED') || ' ' ||
            (SELECT count(*) FROM fluxrate_internal.coupon_redemptions r JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id
              WHERE r.org_id = '$ORG' AND k.code = 'LIMITED')")
refused=$(cat "$OUT"/redeem_*.log | grep -c 'ERROR: .*redemption limit' || true)
echo "times_redeemed, redemptions: $lim; refused with 'reached its redemption limit': $refused"
[ "$lim" = "50 50" ] && [ "$refused" = 150 ] || { echo "FAIL: the redemption limit did not hold"; exit 1; }

echo "== credit notes from 4 sessions at once: gapless CN numbers"
# 200 paid invoices of 10.00 (no tax): each session credits 50 of them 1.00
q "$act
   SELECT count(fluxrate.finalize_invoice(((fluxrate.create_invoice(c.id, 'USD',
            line_items => '[{\"description\": \"Seat\", \"quantity\": 1, \"unit_amount\": 10}]'))->>'id')::uuid))
     FROM fluxrate_internal.customers c WHERE c.org_id = '$ORG'" >/dev/null
# one statement (one transaction) per credit note, the sessions interleaved
q "SELECT x.id FROM fluxrate_internal.invoices x WHERE x.org_id = '$ORG' AND x.kind = 'manual' ORDER BY x.id" > "$OUT/cn_ids"
for s in 0 1 2 3; do
  { echo "$act"
    awk -v s=$s 'NR % 4 == s { print "SELECT fluxrate.create_credit_note(\x27" $1 "\x27, \x27other\x27, amount => 1) IS NOT NULL AS ok;" }' "$OUT/cn_ids"
  } > "$OUT/cn_$s.sql"
  psql -X -q -v ON_ERROR_STOP=1 -f "$OUT/cn_$s.sql" > "$OUT/cn_$s.log" 2>&1 & pids[$s]=$!
done
for s in 0 1 2 3; do wait "${pids[$s]}" || { cat "$OUT/cn_$s.log"; echo "FAIL: a credit-note session failed"; exit 1; }; done
nums=$(q "SELECT count(*) || ' ' || max(split_part(credit_note_number, '-', 3)::int) || ' ' || count(DISTINCT credit_note_number)
            FROM fluxrate_internal.credit_notes WHERE org_id = '$ORG'")
echo "credit notes, highest number, distinct numbers: $nums"
[ "$nums" = "$N $N $N" ] || { echo "FAIL: credit note numbers are not gapless"; exit 1; }

echo "== 6 sessions credit 4.00 each of one invoice with 9.00 left: two succeed, never more"
ONE=$(q "SELECT x.id FROM fluxrate_internal.invoices x WHERE x.org_id = '$ORG' AND x.kind = 'manual' ORDER BY x.id LIMIT 1")
for s in $(seq 0 5); do
  psql -X -q -c "$act" -c "SELECT fluxrate.create_credit_note('$ONE', 'other', amount => 4)" > "$OUT/one_$s.log" 2>&1 & pids[$s]=$!
done
for s in $(seq 0 5); do wait "${pids[$s]}" || true; done
one=$(q "SELECT count(*) || ' ' || sum(total) || ' ' || (SELECT amount_credited || ' ' || total FROM fluxrate_internal.invoices
                                                    WHERE org_id = '$ORG' AND id = '$ONE')
           FROM fluxrate_internal.credit_notes WHERE org_id = '$ORG' AND invoice_id = '$ONE'")
over=$(cat "$OUT"/one_*.log | grep -c 'ERROR: .*above the invoice' || true)
echo "credit notes on it, credited, invoice credited, invoice total: $one; refused as above the creditable amount: $over"
# 1.00 before + 2 x 4.00 = 9.00 of 10.00
[ "$one" = "3 9.00 9.00 10.00" ] && [ "$over" = 4 ] || { echo "FAIL: concurrent credit notes over-credited"; exit 1; }
nums=$(q "SELECT count(*) || ' ' || max(split_part(credit_note_number, '-', 3)::int) FROM fluxrate_internal.credit_notes WHERE org_id = '$ORG'")
echo "credit notes, highest number: $nums"
[ "$nums" = "$((N + 2)) $((N + 2))" ] || { echo "FAIL: a refused credit note left a gap"; exit 1; }
echo "ok"
