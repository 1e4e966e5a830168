-- Fills a fluxrate 0.1.0 database through 0.1.0's own API (test/scripts/upgrade.sh):
-- two organizations, a meter, a hybrid plan with a graduated usage charge, a
-- customer with tax, API keys, a webhook endpoint, a dashboard user, January's
-- usage closed, finalized and paid, and February's first events tracked.
-- psql variables set here for the script: key_a (organization A's API key).
\set ON_ERROR_STOP on
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '2026-01-01 09:00:00+00';
SELECT (fluxrate.create_organization('Acme Inc', billing_country => 'US'))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('Globex', billing_country => 'DE'))->>'id' AS org_b \gset

-- organization A: $30/month in advance + API calls, first 1,000 at 0.01, then 0.002
SELECT fluxrate.act_as(:'org_a', session => true) \gset
SELECT f->>'meter_id' AS meter_a, f->>'meter_token' AS token_a
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro', type => 'HYBRID',
       billing_interval => 'month', currency => 'USD'))->>'id' AS plan_a \gset
SELECT fluxrate.add_charge(plan_id => :'plan_a', type => 'FIXED', unit_price => 30, display_name => 'Platform fee') IS NOT NULL AS ok;
SELECT fluxrate.add_charge(plan_id => :'plan_a', type => 'USAGE', meter_id => :'meter_a', pricing_model => 'graduated',
       tiers => '[{"up_to": 1000, "unit_price": 0.01}, {"up_to": null, "unit_price": 0.002}]',
       display_name => 'API calls') IS NOT NULL AS ok;
SELECT fluxrate.set_tax_rate(country => 'US', rate => 0.10, state => 'CA', name => 'CA sales tax') IS NOT NULL AS ok;
SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech',
       billing_address_country => 'US', billing_address_state => 'CA'))->>'id' AS cust_a \gset
SELECT (fluxrate.create_subscription(customer_id => :'cust_a', plan_id => :'plan_a', billing_interval => 'month',
       start_date => '2026-01-01 00:00:00+00'))->>'id' AS sub_a \gset
SELECT k->>'key' AS key_a FROM fluxrate.create_api_key(name => 'backend', scopes => ARRAY['usage.write', 'usage.read']) k \gset
SELECT fluxrate.create_webhook_endpoint('https://hooks.acme.example/fluxrate') IS NOT NULL AS ok;

-- organization B: same meter name, its own plan; must stay out of A's invoices
SELECT fluxrate.act_as(:'org_b', session => true) \gset
SELECT f->>'meter_id' AS meter_b, f->>'meter_token' AS token_b
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
SELECT (fluxrate.create_plan(name => 'Basic', lookup_id => 'basic', type => 'USAGE',
       billing_interval => 'month', currency => 'EUR'))->>'id' AS plan_b \gset
SELECT fluxrate.add_charge(plan_id => :'plan_b', type => 'USAGE', meter_id => :'meter_b', unit_price => 0.5,
       display_name => 'API calls') IS NOT NULL AS ok;
SELECT (fluxrate.create_customer(name => 'Hooli', email => 'ap@hooli.example', external_id => 'hooli'))->>'id' AS cust_b \gset
SELECT (fluxrate.create_subscription(customer_id => :'cust_b', plan_id => :'plan_b', billing_interval => 'month',
       start_date => '2026-01-01 00:00:00+00'))->>'id' AS sub_b \gset
SELECT k->>'key' AS key_b FROM fluxrate.create_api_key(name => 'backend', scopes => ARRAY['usage.write']) k \gset
SELECT fluxrate.signup('owner@globex.example', 'correct horse battery staple', 'Globex console') IS NOT NULL AS ok;
RESET fluxrate.current_org;

-- January's usage: A 1,500 calls (one replayed), B 7 calls; rollups refreshed mid-way
SET fluxrate.pinned_now = '2026-01-20 12:00:00+00';
SELECT (fluxrate.track(api_key => :'key_a', meter_token => :'token_a', customer_external_id => 'initech',
        quantity => 1200, idempotency_key => 'a-1', "timestamp" => '2026-01-05 10:00:00+00'))->>'replay' AS replay;
SELECT (fluxrate.track(api_key => :'key_a', meter_token => :'token_a', customer_external_id => 'initech',
        quantity => 1200, idempotency_key => 'a-1', "timestamp" => '2026-01-05 10:00:00+00'))->>'replay' AS replay;
SELECT fluxrate.refresh_usage_rollups() IS NOT NULL AS ok;
SELECT fluxrate.track_batch(jsonb_build_array(jsonb_build_object('meter_token', :'token_a',
         'customer_external_id', 'initech', 'quantity', 300, 'idempotency_key', 'a-2',
         'timestamp', '2026-01-18T08:00:00Z')), :'key_a') ->> 'created' AS batch_created;
SELECT (fluxrate.track(api_key => :'key_b', meter_token => :'token_b', customer_external_id => 'hooli',
        quantity => 7, idempotency_key => 'b-1', "timestamp" => '2026-01-10 00:00:00+00'))->>'replay' AS replay;

-- February 1: January closes, then finalizes after the grace period; A pays it
SET fluxrate.pinned_now = '2026-02-01 00:01:00+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-02-01 01:02:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT fluxrate.act_as(:'org_a', session => true) \gset
SELECT fluxrate.pay_invoice(i.id) IS NOT NULL AS paid
  FROM fluxrate_internal.invoices i
 WHERE i.org_id = :'org_a' AND i.kind = 'subscription' AND i.period_start = '2026-01-01 00:00:00+00';
RESET fluxrate.current_org;

-- February's first events, before the upgrade
SET fluxrate.pinned_now = '2026-02-10 12:00:00+00';
SELECT (fluxrate.track(api_key => :'key_a', meter_token => :'token_a', customer_external_id => 'initech',
        quantity => 400, idempotency_key => 'a-3'))->>'replay' AS replay;

-- History over six months (July to December 2025) for a customer without a
-- subscription (so no invoice changes): 60 events, 10 a month, each with a key,
-- for the upgrade's move into monthly partitions (issue 17)
SELECT fluxrate.track_batch((SELECT jsonb_agg(jsonb_build_object('meter_token', :'token_a',
         'customer_external_id', 'history-co', 'quantity', g, 'idempotency_key', 'h-' || g,
         'timestamp', to_char(('2025-07-01 00:00:00+00'::timestamptz + ((g - 1) / 10) * interval '1 month'
                               + ((g - 1) % 10) * interval '1 day') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
         FROM generate_series(1, 60) g), :'key_a') ->> 'created' AS history_created;

-- for the rest of test/scripts/upgrade.sh
\echo KEY_A :key_a
\echo TOKEN_A :token_a
\echo ORG_A :org_a
