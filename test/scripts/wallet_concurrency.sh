#!/usr/bin/env bash
# Prepaid credits are never over-spent (issue 16, item 2): one customer's
# grants are drawn down by many finalizations at once -- sessions finalizing
# manual invoices one by one, two finalizing jobs over the subscription drafts
# (which also record a grant's expiry), a session tracking usage and reading
# the burn-down balance -- and at the end every grant's remaining equals its
# amount less its recorded movements, no grant is below zero, the credits
# applied add up to exactly what the spendable grants held, the expired grant
# gave nothing and its remainder is recorded once, and every invoice's
# credits_applied + amount_due = total.  Three rounds, each with fresh grants.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start wallet "max_connections = 40"
export PGTZ=UTC PGOPTIONS='-c client_min_messages=warning'
N_MANUAL=48      # manual invoices of 20.00 (the customer's country has no tax rate)
N_SUBS=24        # subscriptions of 20.00/month in arrears: 24 drafts per closed month
ORG=$(q "SELECT (fluxrate.create_organization('Wallet race', grace_period => '0'))->>'id'")
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-01-01 00:00:00+00'"
CUST=$(q "SELECT fluxrate.act_as('$ORG');
  SELECT (fluxrate.create_customer('Racer', 'r@race.test', 'racer', billing_address_country => 'NL'))->>'id'" | tail -1)
q "SELECT fluxrate.act_as('$ORG');
   SELECT (fluxrate.create_feature('calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n', aggregation_type => 'SUM')) IS NOT NULL;
   SELECT fluxrate.add_charge((SELECT id FROM (SELECT ((fluxrate.create_plan('P', 'p', 'FIXED', 'month', 'USD'))->>'id')::uuid AS id) p),
          'FIXED', unit_price => 20, billing_timing => 'in_arrears');
   SELECT count(fluxrate.create_subscription('$CUST', (SELECT id FROM fluxrate_internal.plans WHERE org_id = '$ORG'),
          start_date => '2026-01-01 00:00+00')) FROM generate_series(1, $N_SUBS)" >/dev/null

round() {  # $1 = round number (month k closes at 2026-(k+1)-01)
  local k=$1 t
  t=$(printf '2026-%02d-01' $((k + 1)))
  echo "== round $k: the month closes at $t; $N_MANUAL manual and $N_SUBS subscription invoices of 20.00 against the grants"
  q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '$t 00:00:10+00'"
  # the grants, granted before the close: A 100.00 (priority 1), B 250.00 (priority 2,
  # expired 1 s before the race: never spendable in it), C 300.00 (priority 2),
  # D 0.25 (priority 3: a grant smaller than one invoice)
  q "SELECT fluxrate.act_as('$ORG');
     SELECT count(fluxrate.create_credit_grant('$CUST', a, 'USD', '$t'::timestamptz - interval '1 day', e, p))
       FROM (VALUES (100, NULL::timestamptz, 1), (250, '$t 00:00:09+00', 2), (300, NULL, 2), (0.25, NULL, 3)) v(a, e, p)" >/dev/null
  q "CALL fluxrate.close_due_periods()" >/dev/null
  q "SELECT fluxrate.act_as('$ORG');
     SELECT count(fluxrate.create_invoice('$CUST', 'USD', line_items => '[{\"description\": \"Work\", \"quantity\": 1, \"unit_amount\": 20}]'))
       FROM generate_series(1, $N_MANUAL)" >/dev/null
  q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '$t 00:00:20+00'"
  local ids pids=() s
  ids=$(q "SELECT id FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'manual' AND status = 'DRAFT' ORDER BY random()")
  # four sessions finalizing manual invoices, one transaction each
  for s in 0 1 2 3; do
    ( echo "SELECT fluxrate.act_as('$ORG', true);"
      echo "$ids" | awk -v s=$s 'NR % 4 == s { printf "SELECT (fluxrate.finalize_invoice(%c%s%c))->>%cstatus%c;\n", 39, $1, 39, 39, 39 }'
    ) | psql -X -q -t -A -v ON_ERROR_STOP=1 >/dev/null & pids+=($!)
  done
  # two finalizing jobs over the subscription drafts, one invoice per batch (the
  # job first records grant B's expiry)
  psql -X -q -v ON_ERROR_STOP=1 -c "CALL fluxrate.finalize_due_invoices(1)" & pids+=($!)
  psql -X -q -v ON_ERROR_STOP=1 -c "CALL fluxrate.finalize_due_invoices(1)" & pids+=($!)
  # usage and the live balance at the same time
  ( echo "SELECT fluxrate.act_as('$ORG', true);"
    for i in $(seq 30); do
      echo "SELECT fluxrate.track(meter_token => (SELECT meter_token::text FROM fluxrate_internal.meters WHERE org_id = '$ORG'), customer_external_id => 'racer', quantity => 1) IS NOT NULL;"
      echo "SELECT (fluxrate.get_credit_balance('$CUST')->'wallets'->0->>'balance')::numeric >= 0;"
    done ) | psql -X -q -t -A -v ON_ERROR_STOP=1 >/dev/null & pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || fail "a concurrent session failed (round $k)"; done
  q "CALL fluxrate.finalize_due_invoices()" >/dev/null   # anything a skipped lock left

  local r
  r=$(q "SELECT
      (SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND status = 'DRAFT' AND kind IN ('manual', 'subscription')),
      (SELECT count(*) FROM fluxrate_internal.credit_grants g WHERE g.org_id = '$ORG' AND (g.remaining < 0 OR g.remaining <> g.amount
          + coalesce((SELECT sum(t.amount) FROM fluxrate_internal.credit_transactions t WHERE t.org_id = g.org_id AND t.grant_id = g.id AND t.kind <> 'grant'), 0))),
      (SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND status <> 'DRAFT'
          AND (credits_applied < 0 OR credits_applied + amount_due + amount_paid <> total
               OR credits_applied <> coalesce((SELECT -sum(t.amount) FROM fluxrate_internal.credit_transactions t
                    WHERE t.org_id = '$ORG' AND t.invoice_id = invoices.id), 0))),
      (SELECT coalesce(sum(credits_applied), 0) FROM fluxrate_internal.invoices WHERE org_id = '$ORG'
          AND finalized_at >= '$t 00:00:20+00'),
      (SELECT coalesce(sum(remaining), 0) FROM fluxrate_internal.credit_grants WHERE org_id = '$ORG' AND status = 'ACTIVE'),
      (SELECT string_agg(expired_amount::text, ',') FROM fluxrate_internal.credit_grants WHERE org_id = '$ORG' AND amount = 250),
      (SELECT count(*) FROM fluxrate_internal.credit_transactions WHERE org_id = '$ORG' AND kind = 'expiry'),
      (SELECT count(*) FROM fluxrate_internal.credit_transactions t WHERE t.org_id = '$ORG' AND t.kind = 'use'
          AND EXISTS (SELECT 1 FROM fluxrate_internal.credit_grants g WHERE g.org_id = t.org_id AND g.id = t.grant_id
                       AND g.expires_at <= '$t 00:00:20+00'))" | tr '|' ' ')
  echo "drafts left, grants off their movements, invoices off their credits, credits applied, left, B expired, expiry rows, uses of B: $r"
  local want_applied want_expired
  # spendable in the race: A 100.00 + C 300.00 + D 0.25 = 400.25 of the 72 x 20.00 =
  # 1440.00 billed (and of the round's 24 drafts plus 48 invoices, more than enough)
  want_expired=$(seq -s, $k | sed 's/[0-9]\+/250.00/g')
  [ "$r" = "0 0 0 400.25 0.00 $want_expired $k 0" ] \
    || fail "round $k: want '0 0 0 400.25 0.00 $want_expired $k 0'"
}
for k in 1 2 3; do round $k; done
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
