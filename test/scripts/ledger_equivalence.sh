#!/usr/bin/env bash
# Wallets and the ledger against an independent reference (issue 16, items 2
# and 4): test/scripts/ledger_equivalence.py draws a seeded scenario -- 40
# customers on USD, EUR and JPY plans (a fee in arrears and metered calls at
# prices of 3-4 decimals), taxed at 7%, 19% or not at all; six months of usage;
# credit grants of random amounts, priorities 1-3, effective now or later,
# expiring or not; top-ups sold by invoices, paid or voided later; manual
# invoices finalized at once; payments and voids of random OPEN invoices; the
# jobs between; and, when discounts and credit notes are installed, a 15% coupon
# for 3 months redeemed on some subscriptions and ~70 credit notes (amounts or
# all that is left, on OPEN and PAID invoices, refunded or to the wallet) -- and computes in Python, without the engine, what every
# invoice, grant and ledger must be.  The scenario is replayed on a real
# PostgreSQL and compared: every invoice (total, credits applied, due, paid,
# status), every grant (remaining, expired, status), each customer's ledger by
# kind (rows, amount, credit), the live balance (balance, unbilled) -- EXCEPT
# both ways, 0 differences -- and the ledger invariant for every customer
# (sum of amounts = what its OPEN/UNCOLLECTIBLE invoices have due; sum of
# credits = its spendable balance) on the engine's own tables.
# LEQ_SEED=N runs another scenario; EQ_KEEP=1 keeps the cluster after a failure.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start ledger_eq
export PGTZ=UTC PGOPTIONS='-c client_min_messages=warning'
SEED=${LEQ_SEED:-0}
[[ $SEED =~ ^[0-9]+$ ]] || fail "LEQ_SEED must be a non-negative integer"
WORK=$OUT/ledger_eq
rm -rf "$WORK"; mkdir -p "$WORK"
t0=$(date +%s)
# discounts and credit notes (issue 16, items 1 and 3) play when they are installed
ADJUST=$(q "SELECT CASE WHEN to_regproc('fluxrate.create_credit_note') IS NOT NULL THEN 'adjust' ELSE '' END")
echo "seed $SEED: $(python3 "$ROOT/test/scripts/ledger_equivalence.py" "$SEED" "$WORK" 40 $ADJUST)"
qf -f "$WORK/scenario.sql" >/dev/null
echo "replayed in $(( $(date +%s) - t0 )) s"
qf -f "$WORK/reference.sql"
END=$(cat "$WORK/end.txt")
ORG=$(q "SELECT org_id FROM fluxrate_internal.organizations WHERE name = 'Ledger equivalence'")

# the engine's side, in the reference's shapes
qf <<SQL
SET fluxrate.pinned_now = '$END';
SET TimeZone = 'UTC';
CREATE VIEW eng_invoices AS
SELECT c.external_id AS ext, i.kind, i.finalized_at,
       i.total, i.credits_applied, i.amount_due, i.amount_paid, i.status
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers c ON c.org_id = i.org_id AND c.id = i.customer_id
 WHERE i.org_id = '$ORG' AND i.status <> 'DRAFT';
CREATE VIEW eng_grants AS
SELECT g.name, c.external_id AS ext, g.remaining, g.expired_amount, g.status
  FROM fluxrate_internal.credit_grants g JOIN fluxrate_internal.customers c ON c.org_id = g.org_id AND c.id = g.customer_id
 WHERE g.org_id = '$ORG';
SELECT fluxrate.act_as('$ORG', true) IS NOT NULL;
CREATE TABLE eng_ledger AS
SELECT c.external_id AS ext, l.entry, l.currency, count(*) AS n, sum(l.amount) AS amount, sum(l.credit) AS credit
  FROM fluxrate_internal.customers c CROSS JOIN LATERAL fluxrate.list_customer_ledger(c.id) l
 WHERE c.org_id = '$ORG' GROUP BY 1, 2, 3;
CREATE TABLE eng_balance AS
SELECT c.external_id AS ext, w->>'currency' AS currency, (w->>'balance')::numeric AS balance, (w->>'unbilled')::numeric AS unbilled
  FROM fluxrate_internal.customers c CROSS JOIN LATERAL jsonb_array_elements(fluxrate.get_credit_balance(c.id)->'wallets') w
 WHERE c.org_id = '$ORG';
SQL

total=0
compare() {  # name, columns
  local n
  n=$(q "SELECT count(*) FROM ((SELECT $2 FROM ref_$1 EXCEPT ALL SELECT $2 FROM eng_$1)
                               UNION ALL (SELECT $2 FROM eng_$1 EXCEPT ALL SELECT $2 FROM ref_$1)) d")
  local rows
  rows=$(q "SELECT count(*) FROM ref_$1")
  echo "$1: $rows reference rows, $n differences"
  if [ "$n" != 0 ]; then
    q "(SELECT 'reference' AS side, $2 FROM ref_$1 EXCEPT ALL SELECT 'reference', $2 FROM eng_$1)
       UNION ALL (SELECT 'engine', $2 FROM eng_$1 EXCEPT ALL SELECT 'engine', $2 FROM ref_$1) ORDER BY 2, 1 LIMIT 30"
  fi
  total=$((total + n))
}
compare invoices "ext, kind, finalized_at, total, credits_applied, amount_due, amount_paid, status"
compare grants "name, ext, remaining, expired_amount, status"
compare ledger "ext, entry, currency, n, amount, credit"
compare balance "ext, currency, balance, unbilled"
if [ -n "$ADJUST" ]; then
  q "CREATE VIEW eng_credit_notes AS SELECT cn.credit_note_number AS number, c.external_id AS ext, cn.total, cn.applied_to_due, cn.refunded
       FROM fluxrate_internal.credit_notes cn JOIN fluxrate_internal.customers c ON c.org_id = cn.org_id AND c.id = cn.customer_id
      WHERE cn.org_id = '$ORG'"
  compare credit_notes "number, ext, total, applied_to_due, refunded"
fi

# the invariant, on the engine's own records, for every customer and currency
bad=$(q "SET fluxrate.pinned_now = '$END';
  SELECT fluxrate.act_as('$ORG', true) IS NULL;
  SELECT count(*) FROM fluxrate_internal.customers c
   WHERE c.org_id = '$ORG' AND (
     (SELECT coalesce(sum(l.amount), 0) FROM fluxrate.list_customer_ledger(c.id) l)
       <> (SELECT coalesce(sum(i.amount_due), 0) FROM fluxrate_internal.invoices i
            WHERE i.org_id = c.org_id AND i.customer_id = c.id AND i.status IN ('OPEN', 'UNCOLLECTIBLE'))
     OR (SELECT coalesce(sum(l.credit), 0) FROM fluxrate.list_customer_ledger(c.id) l)
       <> (SELECT coalesce(sum(g.remaining), 0) FROM fluxrate_internal.credit_grants g
            WHERE g.org_id = c.org_id AND g.customer_id = c.id AND g.status = 'ACTIVE'
              AND g.effective_at <= fluxrate.now() AND (g.expires_at IS NULL OR g.expires_at > fluxrate.now()))
     -- and each grant's remaining is its amount moved by its recorded movements
     OR EXISTS (SELECT 1 FROM fluxrate_internal.credit_grants g WHERE g.org_id = c.org_id AND g.customer_id = c.id
                  AND g.status <> 'VOIDED' AND g.remaining <> g.amount + coalesce((SELECT sum(t.amount)
                      FROM fluxrate_internal.credit_transactions t WHERE t.org_id = g.org_id AND t.grant_id = g.id
                       AND t.kind <> 'grant'), 0)))" | tail -1)
customers=$(q "SELECT count(*) FROM fluxrate_internal.customers WHERE org_id = '$ORG'")
echo "ledger invariant: $customers customers, $bad off"
[ "$total" = 0 ] || fail "$total differences between the engine and the reference"
[ "$bad" = 0 ] || fail "the ledger invariant fails for $bad customers"
echo "0 differences in $(( $(date +%s) - t0 )) s"
echo "ok"
