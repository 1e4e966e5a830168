-- The customer ledger (issue 16, item 4; docs/ledger.md): every movement of
-- money with its cause, running balances, and the invariant that the
-- receivable is the sum of the ledger's amounts and the credit balance the sum
-- of its credits -- for every customer.  Time is pinned; amounts by hand.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
\set SHOW_CONTEXT errors

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Ledger Co'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Peeker Co'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.set_tax_rate('US', 0.10, name => 'Sales tax'))->>'rate' AS tax;
SELECT (fluxrate.create_plan('Seats', 'seats', 'FIXED', 'month', 'USD'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'FIXED', unit_price => 100, display_name => 'Seat', billing_timing => 'in_arrears'))->>'status' AS fixed;
SELECT (fluxrate.create_customer('Booked Ltd', 'ap@booked.test', 'booked', billing_address_country => 'US'))->>'id' AS cust \gset
SELECT (fluxrate.create_customer('Idle Ltd', 'ap@idle.test', 'idle', billing_address_country => 'US'))->>'id' AS idle \gset
SELECT (fluxrate.create_subscription(:'cust', :'plan', start_date => '2026-01-01 00:00+00'))->>'status' AS sub;
-- Each month: Seat 100.00, tax 10.00 -> 110.00.
-- Jan 1: Welcome $50 (priority 10, expires Mar 1), Prepaid $100 (paid, priority 100)
SELECT (fluxrate.create_credit_grant(:'cust', 50, 'USD', expires_at => '2026-03-01', priority => 10, name => 'Welcome'))->>'status' AS welcome;
SELECT (fluxrate.create_credit_grant(:'cust', 100, 'USD', grant_type => 'paid', name => 'Prepaid'))->>'status' AS prepaid;
-- Feb 1: INV-2026-0001 110.00 = Welcome 50.00 + Prepaid 60.00 (Prepaid 40.00 left): PAID by credits
SET fluxrate.pinned_now = '2026-02-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-02-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
-- Mar 1: INV-2026-0002 110.00 = Prepaid 40.00 + 70.00 due; paid Mar 5
SET fluxrate.pinned_now = '2026-03-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-03-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-03-05 00:00:00+00';
SELECT (fluxrate.pay_invoice(id))->>'amount_paid' AS paid FROM fluxrate_internal.invoices
 WHERE org_id = :'org' AND invoice_number = 'INV-2026-0002';                   -- 70.00
-- Promo $30 (priority 10) usable Mar 10 - Mar 20, never used: 30.00 expires
SELECT (fluxrate.create_credit_grant(:'cust', 30, 'USD', '2026-03-10', '2026-03-20', priority => 10, name => 'Promo'))->>'status' AS promo;
-- its grant movement is dated Mar 10: not in the ledger on Mar 5, pending in the balance
SELECT count(*) AS rows_today, sum(credit) AS credits FROM fluxrate.list_customer_ledger(:'cust');  -- 8 rows (2 grants, 2 invoices, 3 uses, 1 payment); credits 50 + 100 - 50 - 60 - 40 = 0.00
SELECT w->>'balance' AS balance, w->>'pending' AS pending FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;  -- 0, 30
-- Mar 20 00:00:30, before the job: the expiry is in the ledger already (at Mar 20 00:00 exactly)
SET fluxrate.pinned_now = '2026-03-20 00:00:30+00';
SELECT at, entry, amount, credit, balance, credit_balance, description FROM fluxrate.list_customer_ledger(:'cust') WHERE entry LIKE 'credit_%' AND at >= '2026-03-10';
CALL fluxrate.finalize_due_invoices();
-- after it: the same, recorded
SELECT at, entry, amount, credit, balance, credit_balance, description FROM fluxrate.list_customer_ledger(:'cust') WHERE entry LIKE 'credit_%' AND at >= '2026-03-10';
-- Apr 1: INV-2026-0003 110.00, no credits left: 110.00 due; UNCOLLECTIBLE on Apr 2 (still owed)
SET fluxrate.pinned_now = '2026-04-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-04-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-04-02 00:00:00+00';
SELECT (fluxrate.update_invoice_status(id, 'UNCOLLECTIBLE'))->>'amount_due' AS owed FROM fluxrate_internal.invoices
 WHERE org_id = :'org' AND invoice_number = 'INV-2026-0003';                   -- 110.00
-- Apr 3: Goodwill $15; a manual invoice 20.00 + 2.00 tax = 22.00 takes it (7.00 due);
-- voided Apr 4: the 22.00 is no longer owed and the 15.00 comes back
SET fluxrate.pinned_now = '2026-04-03 00:00:00+00';
SELECT (fluxrate.create_credit_grant(:'cust', 15, 'USD', name => 'Goodwill'))->>'status' AS goodwill;
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Extra seat", "quantity": 1, "unit_amount": 20}]'))->>'id' AS manual \gset
SELECT (fluxrate.finalize_invoice(:'manual'))->>'amount_due' AS due;            -- 7.00
SET fluxrate.pinned_now = '2026-04-04 00:00:00+00';
SELECT (fluxrate.void_invoice(:'manual'))->>'status' AS voided;

-- The ledger, by hand (USD):
--   Jan 01 00:00  credit_grant   Welcome             credit  +50.00            cb  50.00
--   Jan 01 00:00  credit_grant   Prepaid             credit +100.00            cb 150.00
--   Feb 01 01:01  invoice        INV-2026-0001       +110.00    bal 110.00
--   Feb 01 01:01  credit_use     Welcome             -50.00 / -50.00  bal  60.00  cb 100.00
--   Feb 01 01:01  credit_use     Prepaid             -60.00 / -60.00  bal   0.00  cb  40.00
--   Mar 01 01:01  invoice        INV-2026-0002       +110.00    bal 110.00
--   Mar 01 01:01  credit_use     Prepaid             -40.00 / -40.00  bal  70.00  cb   0.00
--   Mar 05 00:00  payment        INV-2026-0002       -70.00     bal   0.00
--   Mar 10 00:00  credit_grant   Promo               credit  +30.00            cb  30.00
--   Mar 20 00:00  credit_expiry  Promo               credit  -30.00            cb   0.00
--   Apr 01 01:01  invoice        INV-2026-0003       +110.00    bal 110.00  (UNCOLLECTIBLE: still owed)
--   Apr 03 00:00  credit_grant   Goodwill            credit  +15.00            cb  15.00
--   Apr 03 00:00  invoice        INV-2026-0004       +22.00     bal 132.00
--   Apr 03 00:00  credit_use     Goodwill            -15.00 / -15.00  bal 117.00  cb   0.00
--   Apr 04 00:00  void           INV-2026-0004       -22.00     bal  95.00
--   Apr 04 00:00  credit_reversal Goodwill           +15.00 / +15.00  bal 110.00  cb  15.00
-- Ends at 110.00 owed (INV-2026-0003) and 15.00 of credits (Goodwill).
SELECT to_char(at, 'Mon DD HH24:MI') AS at, entry, currency, amount, credit, balance, credit_balance, cause, description
  FROM fluxrate.list_customer_ledger(:'cust');
-- every row points at its cause: an invoice or a grant of this customer
SELECT count(*) AS rows, count(*) FILTER (WHERE (l.cause = 'invoice' AND EXISTS (SELECT 1 FROM fluxrate_internal.invoices i
         WHERE i.org_id = :'org' AND i.id = l.cause_id AND i.customer_id = :'cust'))
       OR (l.cause = 'credit_grant' AND EXISTS (SELECT 1 FROM fluxrate_internal.credit_grants g
         WHERE g.org_id = :'org' AND g.id = l.cause_id AND g.customer_id = :'cust'))) AS caused,
       count(*) FILTER (WHERE l.entry IN ('credit_use', 'credit_reversal', 'payment', 'void', 'invoice') AND l.invoice_id IS NULL) AS without_invoice
  FROM fluxrate.list_customer_ledger(:'cust') l;                                 -- 16 16 0
-- the invariant, for every customer of the organization: the sum of the amounts
-- is what the OPEN and UNCOLLECTIBLE invoices have due, the sum of the credits
-- is the balance get_credit_balance reports
SELECT c.name,
       (SELECT coalesce(sum(l.amount), 0) FROM fluxrate.list_customer_ledger(c.id) l) AS ledger_owed,
       (SELECT coalesce(sum(i.amount_due), 0) FROM fluxrate_internal.invoices i
         WHERE i.org_id = :'org' AND i.customer_id = c.id AND i.status IN ('OPEN', 'UNCOLLECTIBLE')) AS invoices_owed,
       (SELECT coalesce(sum(l.credit), 0) FROM fluxrate.list_customer_ledger(c.id) l) AS ledger_credit,
       (SELECT coalesce(sum((w->>'balance')::numeric), 0) FROM jsonb_array_elements(fluxrate.get_credit_balance(c.id)->'wallets') w) AS wallet_balance
  FROM fluxrate_internal.customers c WHERE c.org_id = :'org' ORDER BY c.name;  -- Booked 110.00 110.00 15.00 15.00; Idle 0 0 0 0
-- one currency asked for; another currency has no rows
SELECT count(*) AS usd_rows FROM fluxrate.list_customer_ledger(:'cust', 'usd');   -- 16
SELECT count(*) AS eur_rows FROM fluxrate.list_customer_ledger(:'cust', 'EUR');   -- 0

-- Tenancy: Peeker Co cannot read Ledger Co's ledger
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT * FROM fluxrate.list_customer_ledger(:'cust');                             -- PT404
SELECT count(*) AS peeked FROM fluxrate_internal.ledger_entries(:'org_b', :'cust');  -- 0: the org's rows only
SET ROLE fluxrate_owner;
SELECT set_config('fluxrate.current_org', :'org_b', false) IS NOT NULL AS as_b;
SELECT count(*) AS through_rls FROM fluxrate_internal.ledger_entries(:'org', :'cust');  -- 0: row-level security
RESET ROLE;
SELECT set_config('fluxrate.current_org', '', false) IS NOT NULL AS reset;

-- Discounts, credit notes and refunds in the ledger (issue 16, items 1 and 3), in
-- an organization of its own: Seat $100/month in arrears, tax 10%, SPRING 20% off
-- for 2 months on the subscription.  The issue's "partial credit note on a PAID
-- invoice refunded to the wallet" is CN-2026-0001.
SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Adjusted Co'))->>'id' AS org_c \gset
SELECT fluxrate.act_as(:'org_c', true) IS NOT NULL AS acting_c;
SELECT (fluxrate.set_tax_rate('US', 0.10, name => 'Sales tax'))->>'rate' AS tax;
SELECT (fluxrate.create_plan('Seats', 'seats', 'FIXED', 'month', 'USD'))->>'id' AS plan_c \gset
SELECT (fluxrate.add_charge(:'plan_c', 'FIXED', unit_price => 100, display_name => 'Seat', billing_timing => 'in_arrears'))->>'status' AS fixed;
SELECT (fluxrate.create_customer('Adjusted Inc', 'ap@adjusted.test', 'adjusted', billing_address_country => 'US'))->>'id' AS adj \gset
SELECT (fluxrate.create_subscription(:'adj', :'plan_c', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_c \gset
SELECT (fluxrate.redeem_coupon(((fluxrate.create_coupon('SPRING', 'Spring', 'percentage', percent_off => 20, duration => 'repeating',
        duration_periods => 2))->>'id')::uuid, subscription_id => :'sub_c'))->>'status' AS redeemed;
-- Feb 1: INV-2026-0001 Seat 100.00 - 20.00 = 80.00, tax 8.00 -> 88.00; paid Feb 2
SET fluxrate.pinned_now = '2026-02-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-02-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-02-02 00:00:00+00';
SELECT (fluxrate.pay_invoice(id))->>'amount_paid' AS paid FROM fluxrate_internal.invoices WHERE org_id = :'org_c' AND invoice_number = 'INV-2026-0001';  -- 88.00
-- Feb 3: CN-2026-0001, a partial credit note on the PAID invoice, refunded to the wallet:
-- 50.00 + 5.00 tax = 55.00, all of it paid: a grant of 55.00 (paid, never expires)
SET fluxrate.pinned_now = '2026-02-03 00:00:00+00';
SELECT c->>'credit_note_number' AS number, c->>'total' AS total, c->>'refunded' AS refunded, c->>'destination' AS destination
  FROM fluxrate.create_credit_note((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org_c' AND invoice_number = 'INV-2026-0001'),
         'service_issue', amount => 50, destination => 'wallet') c;
SELECT name, amount, remaining, grant_type, source, status FROM fluxrate_internal.credit_grants WHERE org_id = :'org_c';  -- 55.00
-- Mar 1: INV-2026-0002 88.00 again (the second discounted month): the 55.00 pays part, 33.00 due; paid Mar 2
SET fluxrate.pinned_now = '2026-03-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-03-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-03-02 00:00:00+00';
SELECT (fluxrate.pay_invoice(id))->>'amount_paid' AS paid FROM fluxrate_internal.invoices WHERE org_id = :'org_c' AND invoice_number = 'INV-2026-0002';  -- 33.00
-- Mar 3: CN-2026-0002 on it, 20.00 + 2.00 = 22.00 refunded as a refund record
SET fluxrate.pinned_now = '2026-03-03 00:00:00+00';
SELECT c->>'credit_note_number' AS number, c->>'total' AS total, c->'refund'->>'amount' AS refund
  FROM fluxrate.create_credit_note((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org_c' AND invoice_number = 'INV-2026-0002'),
         'order_change', amount => 20) c;
-- Apr 1: INV-2026-0003 110.00 (no discount left); Apr 2: CN-2026-0003 of 10.00 + 1.00 on it while OPEN:
-- 11.00 off what is due, nothing refunded: 99.00 due
SET fluxrate.pinned_now = '2026-04-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-04-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-04-02 00:00:00+00';
SELECT c->>'credit_note_number' AS number, c->>'applied_to_due' AS to_due, c->>'refunded' AS refunded
  FROM fluxrate.create_credit_note((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org_c' AND invoice_number = 'INV-2026-0003'),
         'other', amount => 10) c;
-- The ledger, by hand (USD):
--   Feb 01 01:01  invoice      INV-2026-0001 before its discount  +108.00   bal 108.00
--   Feb 01 01:01  discount     Spring (SPRING)                     -20.00   bal  88.00
--   Feb 02        payment      INV-2026-0001                       -88.00   bal   0.00
--   Feb 03        credit_note  CN-2026-0001                        -55.00   bal -55.00
--   Feb 03        credit_grant CN-2026-0001 to the wallet          +55.00 / +55.00  bal 0.00  cb 55.00
--   Mar 01 01:01  invoice      INV-2026-0002                      +108.00   bal 108.00
--   Mar 01 01:01  discount     Spring (SPRING)                     -20.00   bal  88.00
--   Mar 01 01:01  credit_use   CN-2026-0001's grant                -55.00 / -55.00  bal 33.00  cb 0.00
--   Mar 02        payment      INV-2026-0002                       -33.00   bal   0.00
--   Mar 03        credit_note  CN-2026-0002                        -22.00   bal -22.00
--   Mar 03        refund       CN-2026-0002                        +22.00   bal   0.00
--   Apr 01 01:01  invoice      INV-2026-0003                      +110.00   bal 110.00
--   Apr 02        credit_note  CN-2026-0003                        -11.00   bal  99.00
-- Ends at 99.00 owed (INV-2026-0003) and no credit.
SELECT to_char(at, 'Mon DD HH24:MI') AS at, entry, amount, credit, balance, credit_balance, cause, description
  FROM fluxrate.list_customer_ledger(:'adj');
SELECT (SELECT sum(l.amount) FROM fluxrate.list_customer_ledger(:'adj') l) AS ledger_owed,
       (SELECT sum(i.amount_due) FROM fluxrate_internal.invoices i WHERE i.org_id = :'org_c' AND i.status IN ('OPEN', 'UNCOLLECTIBLE')) AS invoices_owed,
       (SELECT sum(l.credit) FROM fluxrate.list_customer_ledger(:'adj') l) AS ledger_credit,
       (SELECT (w->>'balance')::numeric FROM jsonb_array_elements(fluxrate.get_credit_balance(:'adj')->'wallets') w) AS wallet_balance;  -- 99.00 99.00 0.00 0.00
RESET fluxrate.pinned_now;
