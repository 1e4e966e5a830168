-- Prepaid credits (issue 16, item 2; docs/ledger.md): grants, consumption at
-- finalization in priority then expiry order, expiry by the job at the exact
-- instant, the burn-down balance, a top-up paid by an invoice, the low-balance
-- webhook once per crossing, a void giving credits back, bad input, tenancy.
-- Time is pinned throughout; every amount is computed by hand beside it.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
\set SHOW_CONTEXT errors

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Wallet Co'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Other Co'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.set_tax_rate('US', 0.10, name => 'Sales tax'))->>'rate' AS tax;
SELECT (fluxrate.create_feature('calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_token' AS tok \gset
SELECT (fluxrate.create_plan('Hybrid', 'hybrid', 'HYBRID', 'month', 'USD'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'FIXED', unit_price => 40, display_name => 'Platform', billing_timing => 'in_arrears'))->>'status' AS fixed;
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => (SELECT id FROM fluxrate_internal.meters WHERE org_id = :'org'),
        unit_price => 0.05, display_name => 'Calls'))->>'status' AS usage;
SELECT (fluxrate.create_customer('Prepaid Inc', 'ap@prepaid.test', 'prepaid', billing_address_country => 'US'))->>'id' AS cust \gset
SELECT (fluxrate.create_subscription(:'cust', :'plan', start_date => '2026-01-01 00:00+00'))->>'status' AS sub;
SELECT fluxrate.create_webhook_endpoint('http://127.0.0.1:1/wallet', ARRAY['wallet.balance_low', 'credit_grant.expired']) IS NOT NULL AS hook;
CREATE TEMP VIEW w_grants AS SELECT * FROM fluxrate_internal.credit_grants WHERE org_id = :'org';
CREATE TEMP VIEW w_events AS SELECT event, payload->'data' AS data FROM fluxrate_internal.outbox
  WHERE org_id = :'org' AND event IN ('wallet.balance_low', 'credit_grant.expired') ORDER BY id;

-- Bad input: a specific SQLSTATE each, and nothing written
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', '2026-02-01', '2026-01-15');             -- PT422 expiry before effect
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', '2026-02-01', '2026-02-01');             -- PT422 expiry = effect
SELECT fluxrate.create_credit_grant(:'cust', 0, 'USD');                                           -- PT422 not positive
SELECT fluxrate.create_credit_grant(:'cust', -5, 'USD');                                          -- PT422
SELECT fluxrate.create_credit_grant(:'cust', 'NaN', 'USD');                                       -- PT422 finite
SELECT fluxrate.create_credit_grant(:'cust', 'Infinity', 'USD');                                  -- PT422
SELECT fluxrate.create_credit_grant(:'cust', 1e15, 'USD');                                        -- PT422 too large
SELECT fluxrate.create_credit_grant(:'cust', 10.005, 'USD');                                      -- PT422 below the cent
SELECT fluxrate.create_credit_grant(:'cust', 100, 'EUR');                                         -- PT422 not billed in EUR
SELECT fluxrate.create_credit_grant(:'cust', 100, 'XYZ');                                         -- 22023 no such currency
SELECT fluxrate.create_credit_grant(:'cust', 100, NULL);                                          -- 22004
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', 'infinity');                             -- 22008
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', expires_at => '3026-01-01');             -- 22008 far off
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', priority => -1);                         -- PT422
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', grant_type => 'free');                   -- 22023
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', grant_type => 'promotional', invoice => true); -- PT422 only paid
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD', price => 90);                            -- PT422 price needs invoice
SELECT fluxrate.create_credit_grant(gen_random_uuid(), 100, 'USD');                               -- PT404
SELECT count(*) AS grants, (SELECT count(*) FROM fluxrate_internal.credit_transactions WHERE org_id = :'org') AS movements,
       (SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = :'org' AND kind = 'top_up') AS top_ups
  FROM w_grants;                                                                                  -- 0 0 0

-- The grants of the worked example (docs/ledger.md):
--   G1 $500 paid, priority 100, never expires
--   G2 $60 promotional, priority 200 (spent after G1), expires Feb 15
--   G3 $10 promotional, priority 100, expires Mar 10 (same priority as G1, expires sooner: spent first)
SELECT (fluxrate.create_credit_grant(:'cust', 500, 'USD', grant_type => 'paid', name => 'G1'))->>'id' AS g1 \gset
SELECT (fluxrate.create_credit_grant(:'cust', 60, 'usd', expires_at => '2026-02-15 00:00+00', priority => 200, name => 'G2'))->>'id' AS g2 \gset
SELECT (fluxrate.create_credit_grant(:'cust', 10, 'USD', expires_at => '2026-03-10 00:00+00', name => 'G3'))->>'id' AS g3 \gset
SELECT name, amount, remaining, grant_type, priority, status, effective_at, expires_at FROM w_grants ORDER BY name;
-- a low-balance threshold of $100.  Available now: 570 (500 + 60 + 10) less the
-- period so far: Platform 40.00 (in arrears, billed whole) + 0 calls = 40.00, tax 4.00 -> 44.00
-- unbilled -> 526.00 available: not below
SELECT fluxrate.set_credit_alert(:'cust', 'USD', 100) - 'customer_id' AS alert;
SELECT fluxrate.set_credit_alert(:'cust', 'USD', 'NaN');                                          -- PT422
SELECT fluxrate.set_credit_alert(:'cust', 'USD', -1);                                             -- PT422

-- January: 600 calls.  Burn-down on Jan 20: 600 x 0.05 = 30.00 + 40.00 = 70.00, tax 7.00 -> 77.00
-- unbilled; balance 570.00; available 570 - 77 = 493.00
SET fluxrate.pinned_now = '2026-01-20 00:00:00+00';
SELECT fluxrate.track(meter_token => :'tok', customer_external_id => 'prepaid', quantity => 600) IS NOT NULL AS tracked;
SELECT w->>'balance' AS balance, w->>'unbilled' AS unbilled, w->>'available' AS available, w->>'pending' AS pending
  FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;
-- the same as the preview of the invoice it will be: 77.00
SELECT (fluxrate.preview_invoice((SELECT id FROM fluxrate_internal.subscriptions WHERE org_id = :'org')))->>'total' AS preview_total;

-- Feb 1: the period closes (DRAFT 77.00; the February period has begun: 44.00 more
-- unbilled -> 121.00; available 570 - 121 = 449.00)
SET fluxrate.pinned_now = '2026-02-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SELECT w->>'balance' AS balance, w->>'unbilled' AS unbilled, w->>'available' AS available
  FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust', 'USD')->'wallets') w;
-- the grace period passes: INV-2026-0001 total 77.00 is paid by G3 10.00 (first:
-- priority 100, expires soonest) then G1 67.00 (priority 100, never expires);
-- G2 (priority 200) is not touched.  Nothing is due: PAID at finalization.
SET fluxrate.pinned_now = '2026-02-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT invoice_number, status, subtotal, tax, total, credits_applied, amount_due, amount_paid, paid_at
  FROM fluxrate_internal.invoices WHERE org_id = :'org' AND status <> 'DRAFT' ORDER BY invoice_number;
SELECT name, remaining, status FROM w_grants ORDER BY name;                       -- G1 433.00, G2 60, G3 0.00
-- finalization moves 77.00 from unbilled to used: the available balance stays 449.00
-- (balance 570 - 77 = 493.00; unbilled 44.00; 493 - 44 = 449.00)
SELECT w->>'balance' AS balance, w->>'unbilled' AS unbilled, w->>'available' AS available
  FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;
-- the invoice document shows the credits
SELECT (fluxrate.get_invoice(id))->>'credits_applied' AS credits_applied, (fluxrate.get_invoice(id))->>'amount_due' AS amount_due
  FROM fluxrate_internal.invoices WHERE org_id = :'org' AND invoice_number = 'INV-2026-0001';

-- Feb 15 00:00: G2 stops being spendable at that instant, before the job has run
-- (balance 493 - 60 = 433.00); the job records the 60.00 remainder, dated Feb 15 00:00
SET fluxrate.pinned_now = '2026-02-15 00:00:00+00';
SELECT w->>'balance' AS balance FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;
SELECT status, remaining FROM w_grants WHERE name = 'G2';                         -- still ACTIVE 60 (not recorded yet)
SET fluxrate.pinned_now = '2026-02-15 00:00:40+00';
CALL fluxrate.finalize_due_invoices();
SELECT name, status, remaining, expired_amount FROM w_grants WHERE name = 'G2';   -- EXPIRED 0 60
SELECT kind, amount, at FROM fluxrate_internal.credit_transactions WHERE org_id = :'org' AND grant_id = :'g2' ORDER BY id;
SELECT event, data->>'expired_amount' AS expired, data->>'expires_at' AS at FROM w_events;
CALL fluxrate.finalize_due_invoices();                                           -- recorded once
SELECT count(*) AS expiry_movements FROM fluxrate_internal.credit_transactions WHERE org_id = :'org' AND kind = 'expiry';

-- February: 2000 calls -> 100.00 + 40.00 = 140.00, tax 14.00 -> 154.00, all from G1 (433 -> 279.00)
SET fluxrate.pinned_now = '2026-02-20 00:00:00+00';
SELECT fluxrate.track(meter_token => :'tok', customer_external_id => 'prepaid', quantity => 2000) IS NOT NULL AS tracked;
SET fluxrate.pinned_now = '2026-03-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-03-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT invoice_number, status, total, credits_applied, amount_due FROM fluxrate_internal.invoices
 WHERE org_id = :'org' AND invoice_number = 'INV-2026-0002';
-- G3 expires Mar 10 with nothing left: EXPIRED, no movement (nothing to record)
SET fluxrate.pinned_now = '2026-03-10 00:01:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT name, remaining, status, expired_amount FROM w_grants ORDER BY name;     -- G1 279.00 ACTIVE; G2 EXPIRED 60; G3 EXPIRED 0

-- March: 8000 calls by Mar 20 -> 400.00 + 40.00 = 440.00, tax 44.00 -> 484.00 unbilled;
-- balance 279.00, available 279 - min(279, 484) = 0.00 < 100: wallet.balance_low, once
SET fluxrate.pinned_now = '2026-03-20 00:00:00+00';
SELECT fluxrate.track(meter_token => :'tok', customer_external_id => 'prepaid', quantity => 8000) IS NOT NULL AS tracked;
CALL fluxrate.finalize_due_invoices();
CALL fluxrate.finalize_due_invoices();
SELECT event, data->>'balance' AS balance, data->>'unbilled' AS unbilled, data->>'available' AS available,
       data->>'threshold' AS threshold FROM w_events WHERE event = 'wallet.balance_low';
-- the signed webhook is queued for the endpoint (signed when it is sent, 70_delivery.sql)
SELECT event, channel, status FROM fluxrate_internal.deliveries WHERE org_id = :'org' AND event = 'wallet.balance_low';

-- A top-up paid by an invoice: $500 of credits for $450.  The invoice is OPEN at
-- once (no tax: tax is on the invoices the credits pay), the grant PENDING.
SET fluxrate.pinned_now = '2026-03-21 00:00:00+00';
SELECT g->>'status' AS status, g->>'source' AS source, g->>'invoice_id' IS NOT NULL AS invoiced, g->>'id' AS topup
  FROM fluxrate.create_credit_grant(:'cust', 500, 'USD', grant_type => 'paid', invoice => true, price => 450, name => 'Top-up') g \gset
SELECT :'status' AS status, :'source' AS source, :'invoiced' AS invoiced;
SELECT invoice_number, kind, status, subtotal, tax, total, amount_due FROM fluxrate_internal.invoices
 WHERE org_id = :'org' AND kind = 'top_up';                                     -- INV-2026-0003 450.00 0 450.00 450.00
-- pending is not spendable: balance 279.00, pending 500
SELECT w->>'balance' AS balance, w->>'pending' AS pending FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;
-- paid on Mar 22: the grant is effective from the payment; balance 279 + 500 = 779.00,
-- available 779 - 484 = 295.00 >= 100: the alert is re-armed (no event)
SET fluxrate.pinned_now = '2026-03-22 00:00:00+00';
SELECT (fluxrate.pay_invoice(id))->>'amount_paid' AS paid FROM fluxrate_internal.invoices WHERE org_id = :'org' AND kind = 'top_up';
SELECT name, status, remaining, effective_at FROM w_grants WHERE name = 'Top-up';
SELECT w->>'balance' AS balance, w->>'available' AS available, w->>'below_threshold' AS below
  FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;
-- 5000 more calls by Mar 25: unbilled 13000 x 0.05 = 650.00 + 40.00 = 690.00, tax 69.00 -> 759.00;
-- available 779 - 759 = 20.00 < 100: a second crossing, a second event
SET fluxrate.pinned_now = '2026-03-25 00:00:00+00';
SELECT fluxrate.track(meter_token => :'tok', customer_external_id => 'prepaid', quantity => 5000) IS NOT NULL AS tracked;
CALL fluxrate.finalize_due_invoices();
SELECT event, data->>'available' AS available FROM w_events WHERE event = 'wallet.balance_low';

-- April 1: INV-2026-0004 total 759.00: G1 pays its last 279.00, the top-up 480.00
-- (759 - 279; top-up 500 -> 20.00).  The $500 grant G1 was consumed over three
-- invoices: 67.00 + 154.00 + 279.00 = 500.00, with G2's expiry in between.
SET fluxrate.pinned_now = '2026-04-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-04-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT invoice_number, status, total, credits_applied, amount_due FROM fluxrate_internal.invoices
 WHERE org_id = :'org' AND invoice_number = 'INV-2026-0004';
SELECT g.name, -sum(t.amount) AS used, count(*) AS invoices FROM fluxrate_internal.credit_transactions t
  JOIN w_grants g ON g.id = t.grant_id WHERE t.kind = 'use' GROUP BY g.name ORDER BY g.name;  -- G1 500.00 3; G3 10.00 1; Top-up 480.00 1

-- A void gives credits back: a manual invoice of $30 + 10% = 33.00 takes the
-- top-up's last 20.00 (13.00 due, OPEN); voided, the 20.00 go back to it
SET fluxrate.pinned_now = '2026-04-02 00:00:00+00';
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Support", "quantity": 1, "unit_amount": 30}]'))->>'id' AS manual \gset
SELECT (fluxrate.finalize_invoice(:'manual')) - 'line_items' - 'id' - 'public_token' - 'meta_data' - 'created_at'
       - 'issue_date' - 'due_date' - 'finalized_at' - 'customer_id' AS doc;
SELECT name, remaining FROM w_grants WHERE name = 'Top-up';                      -- 0.00
SET fluxrate.pinned_now = '2026-04-03 00:00:00+00';
SELECT (fluxrate.void_invoice(:'manual'))->>'status' AS voided;
SELECT name, remaining FROM w_grants WHERE name = 'Top-up';                      -- 20.00
SELECT kind, amount FROM fluxrate_internal.credit_transactions WHERE org_id = :'org' AND invoice_id = :'manual' ORDER BY id;
-- a paid top-up invoice's grant cannot be voided with it (PAID is final); a voided
-- unpaid top-up voids its grant: $50 top-up, voided before payment
SELECT (fluxrate.create_credit_grant(:'cust', 50, 'USD', grant_type => 'paid', invoice => true, name => 'Unpaid'))->>'invoice_id' AS unpaid \gset
SELECT (fluxrate.void_invoice(:'unpaid'))->>'status' AS voided;
SELECT name, status, remaining FROM w_grants WHERE name = 'Unpaid';              -- VOIDED 0

-- a top-up paid after its expiry: $25 expiring Apr 10, paid Apr 11: granted and
-- expired at the payment, both recorded (25.00 expired); the balance is unchanged (20.00)
SELECT (fluxrate.create_credit_grant(:'cust', 25, 'USD', grant_type => 'paid', invoice => true, expires_at => '2026-04-10',
        name => 'Late'))->>'invoice_id' AS late \gset
SET fluxrate.pinned_now = '2026-04-11 00:00:00+00';
SELECT (fluxrate.pay_invoice(:'late'))->>'amount_paid' AS paid;                  -- 25.00
SELECT name, status, remaining, expired_amount FROM w_grants WHERE name = 'Late'; -- EXPIRED 0 25.00
SELECT t.kind, t.amount, t.at FROM fluxrate_internal.credit_transactions t JOIN w_grants g ON g.id = t.grant_id
 WHERE g.name = 'Late' ORDER BY t.id;
SELECT w->>'balance' AS balance FROM jsonb_array_elements(fluxrate.get_credit_balance(:'cust')->'wallets') w;  -- 20.00
-- the rendered invoice shows the credits: INV-2026-0004 759.00, credits applied -759.00, due 0.00
SELECT line FROM regexp_split_to_table(fluxrate.invoice_text((SELECT id FROM fluxrate_internal.invoices
         WHERE org_id = :'org' AND invoice_number = 'INV-2026-0004')), E'\n') line
 WHERE line ~ 'Total|Credits applied|Amount due';

-- Tenancy: Other Co sees none of it and cannot grant to, read or spend Wallet Co's wallet
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.create_credit_grant(:'cust', 100, 'USD');                                         -- PT404
SELECT fluxrate.get_credit_balance(:'cust');                                                      -- PT404
SELECT fluxrate.list_credit_grants(:'cust');                                                      -- PT404
SELECT fluxrate.set_credit_alert(:'cust', 'USD', 5);                                              -- PT404
-- row-level security: the tables as the functions' owner sees them for Other Co (none), then Wallet Co
SET ROLE fluxrate_owner;
SELECT set_config('fluxrate.current_org', :'org_b', false) IS NOT NULL AS as_b;
SELECT count(*) AS grants_through_rls, (SELECT count(*) FROM fluxrate_internal.credit_transactions) AS movements,
       (SELECT count(*) FROM fluxrate_internal.wallet_alerts) AS alerts
  FROM fluxrate_internal.credit_grants;                                                           -- 0 0 0
SELECT set_config('fluxrate.current_org', :'org', false) IS NOT NULL AS as_a;
SELECT count(*) AS grants_through_rls FROM fluxrate_internal.credit_grants;                      -- 6
RESET ROLE;
SELECT set_config('fluxrate.current_org', '', false) IS NOT NULL AS reset;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT jsonb_array_length(fluxrate.list_credit_grants(:'cust')) AS own_grants;                   -- 6
RESET fluxrate.pinned_now;
