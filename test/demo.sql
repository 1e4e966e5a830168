-- The Fluxrate quickstart, end to end, in SQL (make demo runs this).
-- Time is pinned so the month passes in a second: fluxrate reads its clock
-- through fluxrate.now(), which a superuser may pin.
\set ON_ERROR_STOP on
SET TimeZone = 'UTC';
\pset footer off
\echo '== fluxrate quickstart =='
SET fluxrate.pinned_now = '2026-01-01 09:00:00+00';
SELECT (fluxrate.create_organization('Acme Inc', billing_country => 'US'))->>'id' AS org \gset
SELECT fluxrate.act_as(:'org', session => true) \gset

\echo '1. a meter feature'
SELECT f->>'meter_id' AS meter_id, f->>'meter_token' AS meter_token
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
\echo '   meter_token' :meter_token

\echo '2. a plan: $49/month platform fee + $0.002 per API call'
SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro_monthly', type => 'HYBRID',
       billing_interval => 'month', currency => 'USD'))->>'id' AS plan_id \gset
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'FIXED', unit_price => 49, display_name => 'Pro platform fee') \gset
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'USAGE', meter_id => :'meter_id', unit_price => 0.002,
       display_name => 'API calls') \gset

\echo '3. a customer'
SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech',
       billing_address_country => 'US'))->>'id' AS customer_id \gset

\echo '4. a subscription from Jan 1'
SELECT (fluxrate.create_subscription(customer_id => :'customer_id', plan_id => :'plan_id',
       billing_interval => 'month', start_date => '2026-01-01 00:00:00+00'))->>'id' AS subscription_id \gset

\echo '   the platform fee bills in advance: the subscription opens with a DRAFT for January'
SELECT i->>'kind' AS kind, i->>'status' AS status, i->>'total' AS total
  FROM jsonb_array_elements(fluxrate.list_subscription_invoices(:'subscription_id')) i;

\echo '   an hour later (the grace period) it is final: numbered, due in 30 days, e-mailed if SMTP is set'
SET fluxrate.pinned_now = '2026-01-01 10:00:30+00';
CALL fluxrate.finalize_due_invoices();
SELECT i->>'kind' AS kind, i->>'invoice_number' AS number, i->>'status' AS status, i->>'total' AS total
  FROM jsonb_array_elements(fluxrate.list_subscription_invoices(:'subscription_id')) i;

\echo '5. an API key (the secret is shown once; only a keyed hash is stored)'
SELECT k->>'key' AS api_key, k->>'prefix' AS key_prefix
  FROM fluxrate.create_api_key(name => 'Production Backend', scopes => ARRAY['usage.write']) k \gset
\echo '   key' :key_prefix'...'

\echo '6. usage through January, with idempotency keys (the retry of req-1 is a replay, not a second event)'
SET fluxrate.pinned_now = '2026-01-31 23:59:30+00';
SELECT e->>'quantity' AS quantity, e->>'replay' AS replay
  FROM (VALUES (1200, 'req-1', '2026-01-05 10:00:00+00'::timestamptz),
               (1200, 'req-1', '2026-01-05 10:00:00+00'),
               (3300, 'req-2', '2026-01-17 16:30:00+00'),
               (500,  'req-3', '2026-01-30 23:59:00+00')) v(q, k, t),
       LATERAL fluxrate.track(api_key => :'api_key', meter_token => :'meter_token', customer_external_id => 'initech',
                              quantity => v.q, idempotency_key => v.k, "timestamp" => v.t) e;

\echo '7. the month ends: the period is closed into a DRAFT, which waits the grace period (1 hour)'
SET fluxrate.pinned_now = '2026-02-01 00:01:00+00';
CALL fluxrate.close_due_periods();
SELECT i->>'kind' AS kind, i->>'status' AS status, i->>'total' AS total, i->>'scheduled_finalize_at' AS finalizes_at
  FROM jsonb_array_elements((fluxrate.list_subscription_invoices(:'subscription_id'))) i;

SET fluxrate.pinned_now = '2026-02-01 01:02:00+00';
CALL fluxrate.finalize_due_invoices();

\echo ''
\echo '== the finalized invoice of January (its usage, and February''s fee in advance) =='
SELECT i->>'id' AS invoice_id FROM jsonb_array_elements(fluxrate.list_subscription_invoices(:'subscription_id')) i
 WHERE i->>'kind' = 'subscription' \gset
SELECT i->>'invoice_number' AS number, i->>'status' AS status, i->>'currency' AS currency,
       i->>'period_start' AS period_start, i->>'period_end' AS period_end, i->>'due_date' AS due_date
  FROM fluxrate.get_invoice(:'invoice_id') i;
SELECT l->>'description' AS line, l->>'quantity' AS quantity, l->>'unit_amount' AS unit_amount, l->>'line_total' AS amount,
       left(l->>'period_start', 10) || ' - ' || left(l->>'period_end', 10) AS for_period
  FROM json_array_elements((fluxrate.get_invoice(:'invoice_id'))->'line_items') l;
SELECT i->>'subtotal' AS subtotal, i->>'tax' AS tax, i->>'total' AS total
  FROM fluxrate.get_invoice(:'invoice_id') i;
