-- Catalog: features and meters, plans and charges, customers, subscriptions.
-- Success, every refusal (SQLSTATE shown), nothing half-written, and the
-- tenancy wall between two organizations.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-01-15 10:00:00+00';

SELECT (fluxrate.create_organization('Acme'))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset

-- no organization in context
SELECT fluxrate.create_customer('x', 'x@example.com');

-- act_as is transaction-local by default: gone after the transaction
BEGIN;
SELECT fluxrate.act_as(:'org_a') IS NOT NULL AS acting;
SELECT (fluxrate.list_features())->'meta'->'total' AS features_in_tx;
COMMIT;
SELECT fluxrate.list_features();
SELECT fluxrate.act_as(:'org_a', session => true) IS NOT NULL AS acting_for_session;
SELECT f->>'name' AS name, f->>'type' AS type, f->>'meter_name' AS meter, f->>'aggregation_type' AS agg,
       (f->>'meter_token') IS NOT NULL AS has_token
  FROM fluxrate.create_feature(name => 'API calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'sum', unit => 'calls') f;
-- duplicate lookup_key, duplicate meter_name
SELECT fluxrate.create_feature('API calls 2', 'api_calls', 'meter', meter_name => 'x', property_name => 'p', aggregation_type => 'SUM');
SELECT fluxrate.create_feature('Other', 'other', 'meter', meter_name => 'api_calls', property_name => 'p', aggregation_type => 'SUM');
-- missing, unknown and misplaced fields
SELECT fluxrate.create_feature('', 'k', 'meter');
SELECT fluxrate.create_feature('n', 'k', 'gauge');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'MEDIAN');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', aggregation_type => 'SUM');
SELECT fluxrate.create_feature('n', 'k', 'switch', aggregation_type => 'SUM');
-- filters: too many, bad operator, missing values
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","values":["1"]},{"property":"b","values":["1"]},{"property":"c","values":["1"]},{"property":"d","values":["1"]},{"property":"e","values":["1"]},{"property":"f","values":["1"]}]');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","operator":"like","values":["1"]}]');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","operator":"in"}]');
SELECT f->'filters' AS filters FROM fluxrate.create_feature('Storage', 'storage', 'meter', meter_name => 'storage',
  property_name => 'gb', aggregation_type => 'MAX', filters => '[{"property":"region","operator":"in","values":["eu","us"]},{"property":"tier","operator":"exists"}]') f;
SELECT count(*) AS features_of_a FROM jsonb_array_elements((fluxrate.list_features())->'data');

-- nothing of the refused features was written (2 features, 2 meters)
SELECT (SELECT count(*) FROM fluxrate_internal.features) AS features,
       (SELECT count(*) FROM fluxrate_internal.meters) AS meters;

-- Plans ---------------------------------------------------------------------
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT p->>'name' AS name, p->>'type' AS type, p->>'currency' AS currency, p->>'billing_interval' AS interval,
       p->'trial_days' AS trial_days, p->'is_active' AS active
  FROM fluxrate.create_plan(name => 'Pro', lookup_id => 'pro', type => 'hybrid', billing_interval => 'month', currency => 'usd') p;
SELECT (fluxrate.get_plan(((fluxrate.list_plans())->'data'->0->>'id')::uuid))->>'lookup_id' AS via_list;
SELECT fluxrate.create_plan('Pro again', 'pro', 'USAGE', 'month', 'USD');                 -- 23505 duplicate lookup_id
SELECT fluxrate.create_plan('X', 'x', 'METERED', 'month', 'USD');                         -- 22023 type
SELECT fluxrate.create_plan('X', 'x', 'USAGE', 'fortnight', 'USD');                       -- 22023 interval
SELECT fluxrate.create_plan('X', 'x', 'USAGE', 'month', 'dollars');                       -- 22023 currency
SELECT fluxrate.create_plan('X', 'x', 'USAGE', 'month', NULL);                            -- 22004 missing
SELECT fluxrate.create_plan('X', 'x', 'USAGE', 'month', 'USD', trial_days => -1);         -- PT422
SELECT fluxrate.create_plan('X', 'x', 'USAGE', 'month', 'USD', minimum_commitment => -5); -- PT422
SELECT count(*) AS plans FROM fluxrate_internal.plans;

SELECT (fluxrate.list_plans())->'data'->0->>'id' AS plan_id \gset
SELECT (fluxrate.list_meters())->'data'->0->>'id' AS meter_id \gset

-- Charges -------------------------------------------------------------------
SELECT c->>'type' AS type, c->>'pricing_model' AS model, c->'unit_price' AS unit_price, c->>'billing_timing' AS timing
  FROM fluxrate.add_charge(plan_id => :'plan_id', type => 'FIXED', unit_price => 30, display_name => 'Platform fee') c;
SELECT c->>'type' AS type, c->>'pricing_model' AS model, c->'unit_price' AS unit_price, c->>'billing_timing' AS timing
  FROM fluxrate.add_charge(plan_id => :'plan_id', type => 'USAGE', meter_id => :'meter_id', unit_price => 0.0005, display_name => 'API calls') c;
SELECT c->>'pricing_model' AS model, c->'tiers' AS tiers
  FROM fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => :'meter_id', pricing_model => 'graduated',
       tiers => '[{"up_to": 1000, "unit_price": 0.002}, {"up_to": 10000, "unit_price": 0.001}, {"up_to": null, "unit_price": 0.0005}]') c;
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', unit_price => 1);                                   -- 22004 meter_id
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => gen_random_uuid(), unit_price => 1);   -- PT404 meter
SELECT fluxrate.add_charge(gen_random_uuid(), 'FIXED', unit_price => 1);                           -- PT404 plan
SELECT fluxrate.add_charge(:'plan_id', 'FIXED');                                                     -- 22004 unit_price
SELECT fluxrate.add_charge(:'plan_id', 'FIXED', unit_price => -1);                                   -- PT422 negative
SELECT fluxrate.add_charge(:'plan_id', 'FIXED', unit_price => 0.0000000000001);                     -- PT422 13 places
SELECT fluxrate.add_charge(:'plan_id', 'FIXED', unit_price => 1, meter_id => :'meter_id');          -- 22023 fixed+meter
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => :'meter_id', pricing_model => 'volume',
       tiers => '[{"up_to": 100, "unit_price": 1}, {"up_to": 50, "unit_price": 0.5}, {"up_to": null, "unit_price": 0.1}]'); -- PT422 unsorted
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => :'meter_id', pricing_model => 'volume',
       tiers => '[{"up_to": 100, "unit_price": 1}, {"up_to": 200, "unit_price": 0.5}]');            -- PT422 last bounded
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => :'meter_id', pricing_model => 'volume',
       tiers => '[{"up_to": 100, "unit_price": -1}, {"up_to": null, "unit_price": 0.5}]');          -- PT422 negative
SELECT fluxrate.add_charge(:'plan_id', 'USAGE', meter_id => :'meter_id', pricing_model => 'package', package_size => 0, package_price => 5); -- PT422
SELECT count(*) AS charges FROM fluxrate_internal.charges;
SELECT (fluxrate.get_plan(:'plan_id'))->'charges'->0->>'id' AS charge_id \gset
SELECT (fluxrate.update_charge(:'plan_id', :'charge_id', 'INACTIVE'))->>'status' AS status;
SELECT fluxrate.update_charge(:'plan_id', :'charge_id', 'ACTIVE');                                   -- PT409 one way
SELECT json_array_length((fluxrate.get_plan(:'plan_id'))->'charges') AS active_charges;

-- Customers -----------------------------------------------------------------
SELECT c->>'name' AS name, c->>'email' AS email, c->>'external_id' AS external_id, c->>'billing_address_country' AS country
  FROM fluxrate.create_customer(name => 'Initech', email => 'billing@initech.example', external_id => 'cust-1',
       billing_address_country => 'us', billing_address_state => 'CA') c;
SELECT fluxrate.create_customer('Dup', 'dup@example.com', 'cust-1');        -- 23505
SELECT fluxrate.create_customer('No mail', NULL);                           -- 22004
SELECT fluxrate.create_customer('Bad mail', 'not-an-address');              -- 22023
SELECT fluxrate.create_customer('Bad country', 'a@b.example', billing_address_country => 'USA'); -- 22023
SELECT count(*) AS customers FROM fluxrate_internal.customers;
SELECT (fluxrate.list_customers())->'data'->0->>'id' AS customer_id \gset
SELECT (fluxrate.update_customer(:'customer_id', phone => '+1 555 0100'))->>'phone' AS phone;
SELECT (fluxrate.get_customer(:'customer_id'))->>'email' AS email_kept;
SELECT fluxrate.list_customers(page => 0);                                  -- 22023
SELECT fluxrate.list_customers(page_size => 101);                           -- 22023
SELECT (fluxrate.list_customers(page => 2, page_size => 1))->'meta' AS meta;

-- Subscriptions ---------------------------------------------------------------
SELECT s->>'status' AS status, s->>'current_period_start' AS period_start, s->>'current_period_end' AS period_end, s->>'plan_name' AS plan
  FROM fluxrate.create_subscription(customer_id => :'customer_id', plan_id => :'plan_id', billing_interval => 'month',
       start_date => '2026-01-31 00:00+00') s;
SELECT s->>'status' AS status, s->>'current_period_start' AS period_start, s->>'current_period_end' AS period_end, s->>'trial_end_date' AS trial_end
  FROM fluxrate.create_subscription(:'customer_id', :'plan_id', start_date => '2026-01-15 00:00+00', trial_end_date => '2026-01-29 00:00+00') s;
SELECT fluxrate.create_subscription(:'customer_id', :'plan_id', billing_interval => 'year');           -- PT422 interval mismatch
SELECT fluxrate.create_subscription(gen_random_uuid(), :'plan_id');                                    -- PT404 customer
SELECT fluxrate.create_subscription(:'customer_id', gen_random_uuid());                                -- PT404 plan
SELECT fluxrate.create_subscription(:'customer_id', :'plan_id', start_date => '2026-02-01', trial_end_date => '2026-01-01'); -- PT422
SELECT fluxrate.create_subscription(:'customer_id', :'plan_id', alignment => 'lunar');                 -- 22023
SELECT (fluxrate.update_plan(:'plan_id', is_active => false))->'is_active' AS active;
SELECT fluxrate.create_subscription(:'customer_id', :'plan_id');                                       -- PT422 deactivated
SELECT fluxrate.delete_plan(:'plan_id');                                                               -- PT409 has subscriptions
SELECT count(*) AS subscriptions FROM fluxrate_internal.subscriptions;

-- Period boundaries from the anchor, clamped to short months (UTC)
SELECT n, fluxrate_internal.period_boundary('2026-01-31 00:00+00', 'month', 'anniversary', n) AS boundary
  FROM generate_series(0, 4) n;
SELECT fluxrate_internal.period_boundary('2026-01-15 00:00+00', 'month', 'calendar', 1) AS calendar_first,
       fluxrate_internal.period_boundary('2026-01-15 00:00+00', 'month', 'calendar', 2) AS calendar_second;

-- Tenancy: org B sees nothing of org A and cannot touch it --------------------
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT (fluxrate.list_features())->'meta'->'total' AS b_features, (fluxrate.list_plans())->'meta'->'total' AS b_plans,
       (fluxrate.list_customers())->'meta'->'total' AS b_customers, (fluxrate.list_meters())->'meta'->'total' AS b_meters;
SELECT fluxrate.get_plan(:'plan_id');                                   -- PT404
SELECT fluxrate.get_customer(:'customer_id');                           -- PT404
SELECT fluxrate.get_meter(:'meter_id');                                 -- PT404
SELECT fluxrate.update_customer(:'customer_id', name => 'pwned');       -- PT404
SELECT fluxrate.delete_customer(:'customer_id');                        -- PT404
SELECT fluxrate.add_charge(:'plan_id', 'FIXED', unit_price => 1);       -- PT404
SELECT fluxrate.add_charge(((fluxrate.create_plan('B plan', 'pro', 'USAGE', 'month', 'EUR'))->>'id')::uuid, 'USAGE',
       meter_id => :'meter_id', unit_price => 1);                       -- PT404: A's meter is not B's (same lookup_id is fine)
SELECT fluxrate.create_subscription(:'customer_id', :'plan_id');        -- PT404
SELECT fluxrate.update_plan(:'plan_id', name => 'pwned');               -- PT404
-- same lookup_key / external_id are free in another organization
SELECT (fluxrate.create_feature('API calls', 'api_calls', 'meter', meter_name => 'api_calls', property_name => 'calls',
        aggregation_type => 'SUM'))->>'lookup_key' AS b_lookup_key;
SELECT (fluxrate.create_customer('B cust', 'b@example.com', 'cust-1'))->>'external_id' AS b_external_id;
-- A's rows are untouched
SELECT name, phone FROM fluxrate_internal.customers WHERE org_id = :'org_a';
-- the RLS wall itself: as fluxrate_owner acting for B, A's rows are invisible even without a WHERE
BEGIN;
SET LOCAL ROLE fluxrate_owner;
SELECT set_config('fluxrate.current_org', :'org_b', true) IS NOT NULL AS set;
SELECT count(*) FILTER (WHERE org_id = :'org_a') AS visible_a, count(*) FILTER (WHERE org_id = :'org_b') AS visible_b
  FROM fluxrate_internal.customers;
INSERT INTO fluxrate_internal.customers (org_id, name, created_at, updated_at) VALUES (:'org_a', 'sneak', now(), now()); -- 42501
ROLLBACK;

-- untrusted roles cannot act for an organization
CREATE ROLE fluxrate_test_stranger;
GRANT EXECUTE ON FUNCTION fluxrate.act_as(uuid, boolean) TO fluxrate_test_stranger;
GRANT USAGE ON SCHEMA fluxrate TO fluxrate_test_stranger;
SET ROLE fluxrate_test_stranger;
SELECT fluxrate.act_as(:'org_a');                                        -- PT401
SELECT fluxrate.list_customers();                                        -- 42501: no EXECUTE granted
RESET ROLE;
DROP OWNED BY fluxrate_test_stranger;
DROP ROLE fluxrate_test_stranger;
RESET fluxrate.acting_org;
