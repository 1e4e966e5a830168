-- The Fluxrate quickstart, step by step, with pinned time: meter, plan, charges,
-- customer, subscription, API key, tracked events (one retried), period end,
-- DRAFT, the grace period, OPEN.  Every amount is checked by hand.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-03-01 09:00:00+00';
SELECT (fluxrate.create_organization('Acme Inc', billing_country => 'US'))->>'id' AS org \gset
SELECT fluxrate.act_as(:'org', session => true) IS NOT NULL AS acting;

-- 1. meter feature
SELECT f->>'meter_id' AS meter_id, f->>'meter_token' AS meter_token
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter', meter_name => 'api_calls',
       property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
-- 2. plan and charges: $49 platform fee, $0.002 per call, and a graduated storage charge
SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro_monthly', type => 'HYBRID', billing_interval => 'month',
        currency => 'USD'))->>'id' AS plan_id \gset
-- (the platform fee is billed in arrears here, on the invoice of the month it pays for; in-advance
-- fees, the default for FIXED charges, are shown in sql/lifecycle.sql)
SELECT (fluxrate.add_charge(plan_id => :'plan_id', type => 'FIXED', unit_price => 49, display_name => 'Platform fee',
        billing_timing => 'in_arrears'))->>'status' AS fixed;
SELECT (fluxrate.add_charge(plan_id => :'plan_id', type => 'USAGE', meter_id => :'meter_id', unit_price => 0.002,
        display_name => 'API calls'))->>'status' AS usage;
-- 3. customer (in California, with an 8.25% state rate and a 5% country-wide rate: the state wins)
SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech',
        billing_address_country => 'US', billing_address_state => 'CA'))->>'id' AS customer_id \gset
SELECT (fluxrate.set_tax_rate('US', 0.05))->>'rate' AS us_rate, (fluxrate.set_tax_rate('US', 0.0825, 'CA', 'CA sales tax'))->>'rate' AS ca_rate;
-- 4. subscription from March 1
SELECT s->>'status' AS status, s->>'current_period_end' AS period_end
  FROM fluxrate.create_subscription(customer_id => :'customer_id', plan_id => :'plan_id', billing_interval => 'month',
       start_date => '2026-03-01 00:00:00+00') s;
SELECT id AS subscription_id FROM fluxrate_internal.subscriptions WHERE org_id = :'org' \gset
-- 5. API key: returned once, stored as a hash
SELECT k->>'key' AS api_key FROM fluxrate.create_api_key(name => 'Production Backend', scopes => ARRAY['usage.write']) k \gset
SELECT count(*) AS plaintext_copies FROM fluxrate_internal.api_keys
 WHERE position(:'api_key' IN name || prefix || encode(key_hash, 'escape') || array_to_string(scopes, ',')) > 0;

-- 6. track usage through March (the clock is at the end of March)
SET fluxrate.pinned_now = '2026-03-31 23:00:00+00';
SELECT e->>'quantity' AS quantity, e->>'replay' AS replay, e->>'timestamp' AS ts
  FROM (VALUES (1, 1200, 'req-1', '2026-03-05 10:00:00+00'::timestamptz),
               (2, 1200, 'req-1', '2026-03-05 10:00:00+00'),            -- the retry: a replay
               (3, 3300.5, 'req-2', '2026-03-17 16:30:00+00'),
               (4, 499.5, 'req-3', '2026-03-31 22:59:59+00')) v(n, q, k, t),
       LATERAL fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech',
                              quantity => v.q, idempotency_key => v.k, "timestamp" => v.t) e
 ORDER BY v.n;
SELECT count(*) AS events, sum(quantity) AS total_quantity FROM fluxrate_internal.usage_events WHERE org_id = :'org';

-- nothing is due before the period ends
CALL fluxrate.close_due_periods();
SELECT count(*) AS invoices_before_period_end FROM fluxrate_internal.invoices WHERE org_id = :'org';

-- 7. the period [Mar 1, Apr 1) ends; the closer makes a DRAFT that waits the grace period
SET fluxrate.pinned_now = '2026-04-01 00:00:30+00';
CALL fluxrate.close_due_periods();
CALL fluxrate.close_due_periods();   -- a second run changes nothing
-- usage 1200 + 3300.5 + 499.5 = 5000 calls x 0.002 = 10.00; fixed 49.00; subtotal 59.00;
-- tax 59 x 0.0825 = 4.8675 -> 4.87; total 63.87
SELECT i->>'status' AS status, i->>'invoice_number' AS number, i->>'subtotal' AS subtotal, i->>'tax' AS tax,
       i->>'total' AS total, i->>'scheduled_finalize_at' AS finalize_at
  FROM jsonb_array_elements(fluxrate.list_subscription_invoices(:'subscription_id')) i;
SELECT id AS invoice_id FROM fluxrate_internal.invoices WHERE org_id = :'org' \gset
SELECT s->>'current_period_start' AS next_start, s->>'current_period_end' AS next_end
  FROM fluxrate.get_subscription(:'subscription_id') s;

-- a late event for March arrives during the grace period: the draft picks it up at finalization
SET fluxrate.pinned_now = '2026-04-01 00:20:00+00';
SELECT (fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech',
        quantity => 250, idempotency_key => 'req-5', "timestamp" => '2026-03-31 23:30:00+00'))->>'replay' AS late_replay;
-- still inside the grace period: nothing is finalized
SET fluxrate.pinned_now = '2026-04-01 00:59:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT status FROM fluxrate_internal.invoices WHERE org_id = :'org';

-- the grace period (1 hour) is over: refreshed from the events, numbered, OPEN, due in 30 days
SET fluxrate.pinned_now = '2026-04-01 01:01:00+00';
CALL fluxrate.finalize_due_invoices();
-- usage 5250 x 0.002 = 10.50; subtotal 49 + 10.50 = 59.50; tax 59.50 x 0.0825 = 4.90875 -> 4.91; total 64.41
SELECT i->>'invoice_number' AS number, i->>'status' AS status, i->>'subtotal' AS subtotal, i->>'tax' AS tax,
       i->>'total' AS total, i->>'amount_due' AS amount_due, i->>'issue_date' AS issued, i->>'due_date' AS due
  FROM fluxrate.get_invoice(:'invoice_id') i;
SELECT l->>'position' AS pos, l->>'line_type' AS type, l->>'description' AS description, l->>'quantity' AS quantity,
       l->>'unit_amount' AS unit_amount, l->>'line_total' AS line_total
  FROM json_array_elements((fluxrate.get_invoice(:'invoice_id'))->'line_items') l;
-- the business events, in order, in the outbox
SELECT event FROM fluxrate_internal.outbox WHERE org_id = :'org' ORDER BY id;

-- an OPEN invoice never changes: a March event arriving now goes to April's invoice as late usage
SELECT (fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech',
        quantity => 100, idempotency_key => 'req-6', "timestamp" => '2026-03-20 00:00:00+00'))->>'replay' AS late_replay;
SET fluxrate.pinned_now = '2026-04-20 12:00:00+00';
SELECT (fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech',
        quantity => 700, idempotency_key => 'req-7', "timestamp" => '2026-04-02 00:00:00+00'))->>'replay' AS april_replay;
CALL fluxrate.finalize_due_invoices();
SELECT total, status FROM fluxrate_internal.invoices WHERE org_id = :'org' AND id = :'invoice_id';
-- paying it
SELECT (fluxrate.pay_invoice(:'invoice_id'))->>'status' AS paid;
-- April closes: 700 x 0.002 = 1.40, fixed 49.00, late March usage 100 x 0.002 = 0.20;
-- subtotal 50.60, tax 50.60 x 0.0825 = 4.1745 -> 4.17, total 54.77
SET fluxrate.pinned_now = '2026-05-01 00:00:10+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-05-01 01:10:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT i->>'invoice_number' AS number, i->>'status' AS status, i->>'subtotal' AS subtotal, i->>'tax' AS tax, i->>'total' AS total
  FROM jsonb_array_elements(fluxrate.list_subscription_invoices(:'subscription_id')) i;
SELECT l->>'line_type' AS type, l->>'description' AS description, l->>'quantity' AS quantity, l->>'line_total' AS line_total
  FROM fluxrate_internal.invoices i, json_array_elements((fluxrate.get_invoice(i.id))->'line_items') l
 WHERE i.org_id = :'org' AND i.invoice_number = 'INV-2026-0002';
-- the March invoice is untouched
SELECT invoice_number, total, status FROM fluxrate_internal.invoices WHERE org_id = :'org' AND id = :'invoice_id';
RESET fluxrate.acting_org;
