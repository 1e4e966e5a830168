-- One tenant must never hurt another (issue 19): start dates, prices, the jobs,
-- statement and work limits, roles, deletion, and the smaller items.  Each
-- attack is replayed, shown refused (SQLSTATE) or contained, and the
-- neighbour's billing, rollups and deliveries proceed in the same run.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
\set SHOW_CONTEXT never
SET fluxrate.pinned_now = '2026-06-15 00:00:00+00';
CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE;
END
$$;

-- The neighbour: a monthly usage plan at 0.01 per unit, one customer whose
-- period [May 15, Jun 15) ends now, 1,000 units tracked, a webhook endpoint.
SELECT (fluxrate.create_organization('Neighbour', grace_period => '1 hour'))->>'id' AS org_n \gset
SELECT fluxrate.act_as(:'org_n', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_id' AS meter_n \gset
SELECT (fluxrate.create_plan('Metered', 'metered', 'USAGE', 'month', 'USD'))->>'id' AS plan_n \gset
SELECT fluxrate.add_charge(:'plan_n', 'USAGE', meter_id => :'meter_n', unit_price => 0.01) IS NOT NULL AS charge;
SELECT (fluxrate.create_customer('Initech', 'ap@initech.example', 'initech'))->>'id' AS cust_n \gset
SELECT (fluxrate.create_subscription(:'cust_n', :'plan_n', start_date => '2026-05-15'))->>'backfill_periods' AS backfill_periods;
SELECT (fluxrate.create_webhook_endpoint('https://hooks.example.com/fluxrate'))->>'id' IS NOT NULL AS endpoint;
SELECT (fluxrate.create_api_key('Backend', ARRAY['usage.write']))->>'key' AS key_n \gset
SELECT (fluxrate.track(api_key => :'key_n', meter_name => 'calls', customer_external_id => 'initech',
        properties => '{"n": 1000}', "timestamp" => '2026-06-01', idempotency_key => 'n-1'))->>'quantity' AS tracked;

-- The hostile tenant
SELECT (fluxrate.create_organization('Hostile'))->>'id' AS org_h \gset
SELECT fluxrate.act_as(:'org_h', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_id' AS meter_h \gset
SELECT (fluxrate.create_plan('Daily', 'daily', 'USAGE', 'day', 'USD'))->>'id' AS plan_hd \gset
SELECT (fluxrate.create_plan('Monthly', 'monthly', 'USAGE', 'month', 'USD'))->>'id' AS plan_hm \gset
SELECT fluxrate.add_charge(:'plan_hd', 'USAGE', meter_id => :'meter_h', unit_price => 1) IS NOT NULL AS charge;
SELECT fluxrate.add_charge(:'plan_hm', 'USAGE', meter_id => :'meter_h', unit_price => 1) IS NOT NULL AS charge;
SELECT (fluxrate.create_customer('Mallory', 'm@hostile.example', 'mallory', billing_address_country => 'US'))->>'id' AS cust_h \gset

-- 1. Start dates ---------------------------------------------------------------
-- never infinite; 0001-01-01 (739,951 daily periods) refused with or without
-- backfill, and refused at once (the walk that counts periods stops at 121)
SELECT args, pg_temp.sqlstate_of(format('SELECT fluxrate.create_subscription(%L, %L, %s)', :'cust_h', :'plan_hd', args)) AS sqlstate
  FROM (VALUES ($$start_date => '-infinity'$$), ($$start_date => '-infinity', backfill => true$$),
               ($$start_date => 'infinity'$$), ($$trial_end_date => 'infinity'$$),
               ($$start_date => '0001-01-01'$$), ($$start_date => '0001-01-01', backfill => true$$),
               -- 121 days back on a daily plan: one more than a backfill may bill
               ($$start_date => '2026-02-14', backfill => true$$),
               -- more than two years ahead; a trial of more than 3650 days
               ($$start_date => '2028-06-16'$$), ($$trial_end_date => '2040-01-01'$$)) t(args);
-- the refusal says how many periods and how to ask for them
\set VERBOSITY default
SELECT fluxrate.create_subscription(:'cust_h', :'plan_hm', start_date => '2020-01-01');
\set VERBOSITY sqlstate
-- nothing half-written by the refusals
SELECT count(*) AS hostile_subscriptions FROM fluxrate_internal.subscriptions WHERE org_id = :'org_h';
-- one period back is no backfill (Jun 1 start: the first period ends Jul 1);
-- 2020-01-01 monthly with backfill => true: periods ending 2020-02-01 ...
-- 2026-06-01 have ended, 6 x 12 + 5 = 77 of them, said by a NOTICE and the answer
SELECT (fluxrate.create_subscription(:'cust_h', :'plan_hm', start_date => '2026-06-01'))->>'backfill_periods' AS one_period_back;
\set VERBOSITY default
SELECT (fluxrate.create_subscription(:'cust_h', :'plan_hm', start_date => '2020-01-01', backfill => true))->>'backfill_periods' AS backfill_periods;
\set VERBOSITY sqlstate
-- the most a backfill may bill: 120 days back on the daily plan (Feb 15 .. Jun 14 = 120 periods)
SELECT (fluxrate.create_subscription(:'cust_h', :'plan_hd', start_date => '2026-02-15', backfill => true))->>'backfill_periods' AS max_backfill;

-- 2. Prices and quantities of the catalog: finite, below 10^15, 12 decimals,
-- refused at creation --------------------------------------------------------
SELECT q, pg_temp.sqlstate_of(format(q, :'plan_hd', :'meter_h')) AS sqlstate FROM (VALUES
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => 'Infinity')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => '-Infinity')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => 'NaN')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => 1e15)$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => 0.0000000000001)$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, unit_price => 1, free_units => 'Infinity')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'package', package_size => 'Infinity', package_price => 1)$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'package', package_size => 10, package_price => 'Infinity')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'graduated', tiers => '[{"up_to": 1e20, "unit_price": 1}, {"up_to": null, "unit_price": 1}]')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'volume', tiers => '[{"up_to": null, "unit_price": 1e1000}]')$$),
  ($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'volume', tiers => '[{"up_to": null, "flat_fee": 1e15}]')$$)) t(q);
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.add_charge(%L, 'USAGE', meter_id => %L, pricing_model => 'graduated', tiers => %L)$$,
         :'plan_hd', :'meter_h',
         (SELECT jsonb_agg(jsonb_build_object('up_to', CASE WHEN g < 101 THEN g END, 'unit_price', 1)) FROM generate_series(1, 101) g)))
       AS tiers_101;
SELECT pg_temp.sqlstate_of($$SELECT fluxrate.create_plan('Inf', 'inf', 'USAGE', 'month', 'USD', minimum_commitment => 'Infinity')$$) AS minimum_commitment;
SELECT (fluxrate.create_feature('Seats', 'seats', 'switch'))->>'id' AS feature_h \gset
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.add_plan_feature(%L, %L, usage_limit => 'Infinity')$$, :'plan_hd', :'feature_h')) AS usage_limit;
-- manual invoice lines (a credit may be negative, but finite and bounded) and
-- their number; a tax rate's decimals
SELECT q, pg_temp.sqlstate_of(format(q, :'cust_h')) AS sqlstate FROM (VALUES
  ($$SELECT fluxrate.create_invoice(%L, 'USD', line_items => '[{"description": "x", "quantity": 1, "unit_amount": 1e15}]')$$),
  ($$SELECT fluxrate.create_invoice(%L, 'USD', line_items => '[{"description": "x", "quantity": 1, "unit_amount": -1e15}]')$$),
  ($$SELECT fluxrate.create_invoice(%L, 'USD', line_items => '[{"description": "x", "quantity": 1e15, "unit_amount": 1}]')$$),
  ($$SELECT fluxrate.create_invoice(%L, 'USD', line_items => (SELECT jsonb_agg(jsonb_build_object('description', 'x', 'quantity', 1, 'unit_amount', 1)) FROM generate_series(1, 1001)))$$),
  ($$SELECT fluxrate.set_tax_rate('US', 0.0000000000001) -- %s$$),
  -- accepted: a credit line below a charge
  ($$SELECT fluxrate.create_invoice(%L, 'USD', line_items => '[{"description": "a", "quantity": 1, "unit_amount": 10}, {"description": "credit", "quantity": 1, "unit_amount": -5}]')$$)) t(q);
-- the largest accepted: 15 digits and 12 decimals
SELECT (fluxrate.add_charge(:'plan_hd', 'USAGE', meter_id => :'meter_h', unit_price => 999999999999999.999999999999))->>'unit_price' AS largest_price;
SELECT fluxrate.update_charge(:'plan_hd', id, 'INACTIVE') IS NOT NULL AS retired
  FROM fluxrate_internal.charges WHERE org_id = :'org_h' AND plan_id = :'plan_hd' AND unit_price > 1;
SELECT count(*) AS hostile_charges FROM fluxrate_internal.charges WHERE org_id = :'org_h';

-- 3b. The rollup refresh isolates a failing organization --------------------
-- Two quantities of 131,072 digits on one customer, meter and day (rows from
-- before ingestion was bounded: written here directly): their sum overflows
-- numeric (22003), which used to fail the one statement over all
-- organizations on every run.
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org_h', fluxrate_internal.uuid_v7(), :'cust_h', :'meter_h', repeat('9', 131072)::numeric, '2026-06-02', '2026-06-02'
  FROM generate_series(1, 2);
SELECT r->'set_aside' = jsonb_build_array(:'org_h') AS hostile_set_aside, (r->>'skipped')::boolean AS skipped
  FROM fluxrate.refresh_usage_rollups() r;
SELECT sqlstate, attempts, retry_at FROM fluxrate_internal.rollup_errors WHERE org_id = :'org_h';
-- the neighbour's June rollups hold its 1,000 units and agree with its events
SELECT width, quantity_sum FROM fluxrate_internal.usage_rollups WHERE org_id = :'org_n' ORDER BY width;
SELECT count(*) AS neighbour_differences FROM fluxrate_internal.rollup_differences(:'org_n');
SELECT count(*) AS hostile_rollups FROM fluxrate_internal.usage_rollups WHERE org_id = :'org_h';
-- the neighbour keeps being refreshed while the hostile one waits for its retry
SELECT fluxrate.act_as(:'org_n', true) IS NOT NULL AS acting;
SELECT (fluxrate.track(api_key => :'key_n', meter_name => 'calls', customer_external_id => 'initech',
        properties => '{"n": 500}', "timestamp" => '2026-06-03', idempotency_key => 'n-2'))->>'quantity' AS tracked;
SELECT (r->>'events')::int AS events, r->'set_aside' AS set_aside FROM fluxrate.refresh_usage_rollups() r;
SELECT quantity_sum AS neighbour_june FROM fluxrate_internal.usage_rollups WHERE org_id = :'org_n' AND width = 'month';
-- the retry after 5 minutes fails again (attempt 2, 10 minutes); once the bad
-- rows are gone the next due retry rebuilds the organization's rollups
SET fluxrate.pinned_now = '2026-06-15 00:05:00+00';
SELECT r->'set_aside' = jsonb_build_array(:'org_h') AS failed_again FROM fluxrate.refresh_usage_rollups() r;
SELECT attempts, retry_at FROM fluxrate_internal.rollup_errors WHERE org_id = :'org_h';
DELETE FROM fluxrate_internal.usage_events WHERE org_id = :'org_h' AND quantity > 1e15;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
VALUES (:'org_h', fluxrate_internal.uuid_v7(), :'cust_h', :'meter_h', 7, '2026-06-02', '2026-06-02');
SET fluxrate.pinned_now = '2026-06-15 00:15:00+00';
SELECT r->'recovered' = jsonb_build_array(:'org_h') AS recovered FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS rollup_errors FROM fluxrate_internal.rollup_errors;
SELECT count(*) AS hostile_differences FROM fluxrate_internal.rollup_differences(:'org_h');
SET fluxrate.pinned_now = '2026-06-15 00:00:00+00';

-- 3a. The closer makes progress for every organization in every run --------
-- Twelve hostile subscriptions whose period end is -infinity (rows from before
-- start dates were bounded: written here directly), besides the two backfills
-- (77 monthly periods from 2020-01-01, 120 daily from 2026-02-15).  They used
-- to fill every batch (due first) and never advance: close_due_periods()
-- never returned.
SELECT fluxrate.act_as(:'org_h', true) IS NOT NULL AS acting;
SELECT count(fluxrate.create_subscription(:'cust_h', :'plan_hd', start_date => '2026-06-15')) AS more_subscriptions FROM generate_series(1, 12);
UPDATE fluxrate_internal.subscriptions
   SET start_date = '-infinity', billing_anchor = '-infinity', current_period_start = '-infinity', current_period_end = '-infinity'
 WHERE org_id = :'org_h' AND start_date = '2026-06-15';
-- a fair batch of 10: the hostile organization gets its share, not all 10
-- places, and the neighbour's one due subscription is in it (claimed and
-- rolled back here)
BEGIN;
SELECT fluxrate_internal.sys_close_tables();
SELECT count(*) FILTER (WHERE c.org_id = :'org_h') < 10 AS hostile_below_all,
       count(*) FILTER (WHERE c.org_id = :'org_h') <= ceil(10.0 / count(DISTINCT c.org_id)) AS hostile_within_share,
       count(*) FILTER (WHERE c.org_id = :'org_n') AS neighbour
  FROM unnest(fluxrate_internal.sys_close_claim(10)) c;
ROLLBACK;
-- one run, batches of 10: it ends; the neighbour's period is closed; each
-- backfill advances 12 periods (the per-run cap); each -infinity subscription
-- is set aside with its error
CALL fluxrate.close_due_periods(10);
-- the neighbour: [May 15, Jun 15), 1,000 + 500 units x 0.01 = 15.00, and the
-- webhook delivery of its invoice.created
SELECT i.total, i.status, (SELECT count(*) FROM fluxrate_internal.deliveries d
                            WHERE d.org_id = i.org_id AND d.event = 'invoice.created' AND d.body LIKE '%' || i.id || '%') AS deliveries
  FROM fluxrate_internal.invoices i WHERE i.org_id = :'org_n' AND i.kind = 'subscription';
-- the backfills: 12 periods each; monthly from 2020-01-01 -> 2021-01-01, daily from 2026-02-15 -> 2026-02-27
SELECT s.billing_interval, s.current_period_start, (SELECT count(*) FROM fluxrate_internal.invoices i
        WHERE i.org_id = s.org_id AND i.subscription_id = s.id AND i.kind = 'subscription') AS invoices
  FROM fluxrate_internal.subscriptions s
 WHERE s.org_id = :'org_h' AND s.start_date IN ('2020-01-01', '2026-02-15') ORDER BY 1;
SELECT count(*) AS set_aside, string_agg(DISTINCT close_error->>'sqlstate', ',') AS sqlstate,
       string_agg(DISTINCT close_error->>'message', ',') AS message, min(close_retry_at) = max(close_retry_at) AS same_retry,
       min(close_retry_at) > fluxrate.now() AS retried_later
  FROM fluxrate_internal.subscriptions WHERE org_id = :'org_h' AND current_period_end = '-infinity' AND close_error IS NOT NULL;
-- the next run (a minute later, as pg_cron): 12 more periods each, the set-aside rows wait
SET fluxrate.pinned_now = '2026-06-15 00:01:00+00';
CALL fluxrate.close_due_periods(10);
SELECT s.billing_interval, s.current_period_start FROM fluxrate_internal.subscriptions s
 WHERE s.org_id = :'org_h' AND s.start_date IN ('2020-01-01', '2026-02-15') ORDER BY 1;
SET fluxrate.pinned_now = '2026-06-15 00:00:00+00';

-- 4. Statement and work limits -------------------------------------------------
SELECT r.rolname, s.setconfig FROM pg_roles r JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
 WHERE r.rolname LIKE 'fluxrate\_%' ORDER BY 1;
-- a WEIGHTED_SUM meter by hour over 30 days is 720 buckets; with 14 customers,
-- 10,080 computations: refused; one customer's, or by day (30 x 14 = 420), answered
SELECT fluxrate.act_as(:'org_h', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('Storage', 'storage', 'meter', meter_name => 'storage', property_name => 'gb',
        aggregation_type => 'WEIGHTED_SUM'))->>'meter_id' AS meter_w \gset
SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@hostile.example', 'c' || g)) AS more_customers FROM generate_series(1, 13) g;
\set VERBOSITY default
SELECT fluxrate.get_meter_usage(:'meter_w', '2026-05-16', '2026-06-15', 'hour');
\set VERBOSITY sqlstate
SELECT json_array_length(fluxrate.get_meter_usage(:'meter_w', '2026-05-16', '2026-06-15', 'hour', :'cust_h', include_empty => true)->'grouped_data') AS one_customer_hours;
SELECT json_array_length(fluxrate.get_meter_usage(:'meter_w', '2026-05-16', '2026-06-15', 'day', include_empty => true)->'grouped_data') AS all_customers_days;
-- the pre-request gives the role it switches to its statement limit: an API-key
-- request that sleeps 11 s is cancelled at 10 s (57014)
BEGIN;
SET LOCAL ROLE fluxrate_anon;
SELECT set_config('request.headers', jsonb_build_object('x-api-key', :'key_n')::text, true) IS NOT NULL AS headers;
SELECT fluxrate.pre_request();
SELECT current_user, current_setting('statement_timeout') AS statement_timeout;
SELECT pg_sleep(11);
ROLLBACK;

-- 5. Roles ------------------------------------------------------------------------
-- An SQL backend granted fluxrate_apikey (the natural grant) that sets the
-- claims itself: refused now (PT401), where it used to act as any organization
CREATE ROLE sec_backend LOGIN;
GRANT fluxrate_apikey TO sec_backend;
CREATE ROLE sec_authenticator LOGIN NOINHERIT;
GRANT fluxrate_anon, fluxrate_web, fluxrate_apikey TO sec_authenticator;
CREATE ROLE sec_ingest LOGIN;
GRANT fluxrate_ingest TO sec_ingest;
SELECT fluxrate_internal.caller_is_trusted() AS superuser_trusted;
RESET fluxrate.acting_org;
BEGIN;
SET LOCAL ROLE sec_backend;
SELECT set_config('request.jwt.claims', jsonb_build_object('org_id', :'org_n', 'scopes', jsonb_build_array('usage.write', 'usage.read'))::text, true) IS NOT NULL AS forged;
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.get_customer_usage(%L)$$, :'cust_n')) AS forged_claims_read;
SELECT pg_temp.sqlstate_of($$SELECT fluxrate.track(meter_name => 'calls', customer_external_id => 'initech', properties => '{"n": 1}')$$) AS forged_claims_track;
ROLLBACK;
-- the check names the backend, not the authenticator (LOGIN NOINHERIT, granted the three)
SELECT role_name, claims_role, warning FROM fluxrate_internal.role_grant_warnings() WHERE role_name LIKE 'sec\_%';
-- what schedule_jobs() raises (one WARNING each) before it schedules anything
SELECT fluxrate_internal.warn_role_grants() AS warnings;
-- fluxrate_ingest: track with a key, nothing else; claims never believed from it
BEGIN;
SET LOCAL ROLE sec_ingest;
SELECT (fluxrate.track(api_key => :'key_n', meter_name => 'calls', customer_external_id => 'initech',
        properties => '{"n": 1}', "timestamp" => '2026-06-04', idempotency_key => 'ingest-1'))->>'quantity' AS tracked_with_key;
SELECT (fluxrate.track_batch(jsonb_build_array(jsonb_build_object('meter_name', 'calls', 'customer_external_id', 'initech',
        'properties', jsonb_build_object('n', 2), 'timestamp', '2026-06-04', 'idempotency_key', 'ingest-2')), :'key_n'))->'created' AS batch_created;
SELECT set_config('request.jwt.claims', jsonb_build_object('org_id', :'org_n', 'scopes', jsonb_build_array('usage.write'))::text, true) IS NOT NULL AS forged;
SELECT pg_temp.sqlstate_of($$SELECT fluxrate.track(meter_name => 'calls', customer_external_id => 'initech', properties => '{"n": 1}')$$) AS claims_track;
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.act_as(%L)$$, :'org_n')) AS act_as,
       pg_temp.sqlstate_of('SELECT fluxrate.list_customers()') AS list_customers,
       pg_temp.sqlstate_of(format($$SELECT fluxrate.get_customer_usage(%L)$$, :'cust_n')) AS usage_read;
COMMIT;
SELECT fluxrate.act_as(:'org_n', true) IS NOT NULL AS acting;

-- 6. Deletion -----------------------------------------------------------------------
-- A customer with events, rollups, an invoice, outbox events and deliveries
SELECT (fluxrate.create_customer('Gone', 'gone@example.com', 'gone'))->>'id' AS cust_g \gset
SELECT (fluxrate.create_subscription(:'cust_g', :'plan_n', start_date => '2026-06-10'))->>'id' IS NOT NULL AS subscribed;
SELECT (fluxrate.track(api_key => :'key_n', meter_name => 'calls', customer_external_id => 'gone',
        properties => '{"n": 3}', "timestamp" => '2026-06-11', idempotency_key => 'gone-1'))->>'quantity' AS tracked;
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
SELECT (SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = :'org_n' AND customer_id = :'cust_g') AS events,
       (SELECT count(*) FROM fluxrate_internal.usage_rollups WHERE org_id = :'org_n' AND customer_id = :'cust_g') AS rollups,
       (SELECT count(*) FROM fluxrate_internal.outbox WHERE org_id = :'org_n' AND payload->'data'->>'customer_id' = :'cust_g') AS outbox,
       (SELECT count(*) FROM fluxrate_internal.deliveries d JOIN fluxrate_internal.outbox o ON o.org_id = d.org_id AND o.id = d.event_id
         WHERE d.org_id = :'org_n' AND o.payload->'data'->>'customer_id' = :'cust_g') AS deliveries;
SELECT (fluxrate.delete_customer(:'cust_g'))->>'deleted' AS deleted;
SELECT (SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = :'org_n' AND customer_id = :'cust_g') AS events,
       (SELECT count(*) FROM fluxrate_internal.usage_rollups WHERE org_id = :'org_n' AND customer_id = :'cust_g') AS rollups,
       (SELECT count(*) FROM fluxrate_internal.outbox WHERE org_id = :'org_n' AND payload->'data'->>'customer_id' = :'cust_g') AS outbox,
       (SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = :'org_n' AND body LIKE '%' || :'cust_g' || '%') AS deliveries;
-- what a track that raced the delete leaves once it commits after it: an event
-- of a customer that no longer exists (test/scripts/deletion_race.sh makes it
-- with two sessions).  The next refresh deletes it instead of counting it.
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
VALUES (:'org_n', fluxrate_internal.uuid_v7(), :'cust_g', :'meter_n', 4, '2026-06-11', '2026-06-11', 'gone-2');
SELECT (r->>'swept')::int AS swept FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS orphans FROM fluxrate_internal.usage_events e
 WHERE NOT EXISTS (SELECT 1 FROM fluxrate_internal.customers c WHERE c.org_id = e.org_id AND c.id = e.customer_id);

-- An organization: everything it owns goes, its key and its tokens stop at once
CREATE FUNCTION pg_temp.org_rows(org uuid) RETURNS TABLE (tbl name, n bigint) LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT c.relname FROM pg_class c
            WHERE c.relnamespace = 'fluxrate_internal'::regnamespace AND c.relkind = 'r'
              AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id') ORDER BY 1 LOOP
    tbl := r.relname;
    EXECUTE format('SELECT count(*) FROM fluxrate_internal.%I WHERE org_id = $1', r.relname) INTO n USING org;
    RETURN NEXT;
  END LOOP;
END
$$;
SELECT (fluxrate.signup('owner@doomed.example', 'correct horse battery', 'Doomed'))->>'email' AS signed_up;
SELECT org_id AS org_d, id AS user_d FROM fluxrate_internal.users WHERE email = 'owner@doomed.example' \gset
SELECT fluxrate.act_as(:'org_d', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_id' AS meter_d \gset
SELECT (fluxrate.create_api_key('Backend', ARRAY['usage.write']))->>'key' AS key_d \gset
SELECT fluxrate.create_webhook_endpoint('https://hooks.example.com/doomed') IS NOT NULL AS endpoint;
SELECT (fluxrate.track(api_key => :'key_d', meter_name => 'calls', customer_external_id => 'd1',
        properties => '{"n": 5}', "timestamp" => '2026-06-12', idempotency_key => 'd-1'))->>'quantity' AS tracked;
SELECT (fluxrate.create_customer('Doomed customer', 'dc@example.com', 'dc'))->>'id' IS NOT NULL AS customer;
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
SELECT fluxrate.login('owner@doomed.example', 'correct horse battery')->>'access_token' AS token_d \gset
SELECT fluxrate_internal.sys_access_token_claims(:'token_d')->>'sub' = :'user_d' AS token_valid;
-- another organization's id: not found
SELECT pg_temp.sqlstate_of(format('SELECT fluxrate.delete_organization(%L)', :'org_n')) AS foreign_org;
SELECT count(*) FILTER (WHERE n > 0) AS tables_with_rows FROM pg_temp.org_rows(:'org_d');
SELECT (fluxrate.delete_organization(:'org_d'))->>'usage_events' AS deleted_events;
-- no row of the organization is left in any table
SELECT sum(n) AS rows_left, count(*) > 20 AS tables_checked FROM pg_temp.org_rows(:'org_d');
RESET fluxrate.acting_org;
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.track(api_key => %L, meter_name => 'calls', customer_external_id => 'd1', properties => '{"n": 1}')$$, :'key_d')) AS deleted_key;
SELECT pg_temp.sqlstate_of(format('SELECT fluxrate_internal.sys_access_token_claims(%L)', :'token_d')) AS deleted_cookie_token;
-- a Bearer token PostgREST verified: the pre-request refuses it
SELECT fluxrate_internal.jwt_verify(:'token_d', convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'))::text AS claims_d \gset
BEGIN;
SET LOCAL ROLE fluxrate_web;
SELECT set_config('request.jwt.claims', :'claims_d', true) IS NOT NULL AS bearer;
SELECT pg_temp.sqlstate_of('SELECT fluxrate.pre_request()') AS deleted_bearer_token;
ROLLBACK;

-- 7. Smaller ----------------------------------------------------------------------
-- a JWT whose header (or claims) is not JSON is PT401, not 22P02; so is bad UTF-8
SELECT t, pg_temp.sqlstate_of(format($$SELECT fluxrate_internal.jwt_verify(%L, convert_to(repeat('s', 32), 'UTF8'))$$, t)) AS sqlstate
  FROM (VALUES ('bm90IGpzb24.e30.c2ln'),             -- "not json"
               ('eyJhbGciOiJIUzI1NiI.e30.c2ln'),     -- {"alg":"HS256" (cut)
               ('_w.e30.c2ln')) v(t);                -- 0xff
-- time claims: a whole number of seconds from 0 to 253402300799, anything else
-- is PT401 (exp 1e1000 was 22003 from the numeric to double conversion)
SELECT c AS claims, pg_temp.sqlstate_of(format($$SELECT fluxrate_internal.jwt_verify(%L, convert_to(repeat('s', 32), 'UTF8'))$$,
         fluxrate_internal.jwt_sign(c::jsonb, convert_to(repeat('s', 32), 'UTF8')))) AS sqlstate
  FROM (VALUES ('{"org_id": "x", "exp": 1e1000}'), ('{"exp": -1e1000}'), ('{"exp": -1}'), ('{"exp": 1781654400.5}'),
               ('{"exp": "1781654400"}'), ('{"exp": null}'), ('{"exp": 253402300800}'),
               ('{"nbf": 1e1000}'), ('{"nbf": -5}'), ('{"iat": 1e1000}'), ('{"iat": 0.5}'), ('{"iat": [1]}'),
               ('{"exp": 1781654400, "nbf": 1781481600, "iat": 1781481600}'),  -- 2026-06-17, 06-15: valid
               ('{"exp": 253402300799}'),                                       -- the last accepted second
               ('{"exp": 1781481570}')) v(c);                                   -- now - 30 s: expired
-- external_id: 1 to 255 characters on create_customer and update_customer
-- (3 KB reached the unique index: 54000), as on track and track_batch
SELECT fluxrate.act_as(:'org_n', true) IS NOT NULL AS acting;
SELECT pg_temp.sqlstate_of(format('SELECT fluxrate.create_customer(%L, %L, %L)', 'Long', 'long@ext.example', repeat('x', 3000))) AS create_3kb,
       pg_temp.sqlstate_of(format('SELECT fluxrate.create_customer(%L, %L, %L)', 'Long', 'long@ext.example', repeat('é', 256))) AS create_256_chars,
       pg_temp.sqlstate_of(format('SELECT fluxrate.update_customer(%L, external_id => %L)', :'cust_n', repeat('x', 3000))) AS update_3kb;
SELECT (fluxrate.create_customer('Wide', 'wide@ext.example', repeat('é', 255)))->>'external_id' = repeat('é', 255) AS create_255_chars;
RESET fluxrate.acting_org;
SELECT pg_temp.sqlstate_of(format($$SELECT fluxrate.track(api_key => %L, meter_name => 'calls', customer_external_id => %L, properties => '{"n": 1}')$$,
         :'key_n', repeat('x', 3000))) AS track_autocreate_3kb;
SELECT (fluxrate.track_batch(jsonb_build_array(jsonb_build_object('meter_name', 'calls', 'customer_external_id', repeat('x', 3000),
         'properties', jsonb_build_object('n', 1))), api_key => :'key_n'))->'results'->0->>'code' AS batch_autocreate_3kb;
-- passwords: 8 to 1,024 characters, as documented (the C hash said 256)
SELECT pg_temp.sqlstate_of(format('SELECT fluxrate.signup(%L, %L, %L)', 'long@pw.example', repeat('é', 1024), 'Long')) AS pw_1024,
       pg_temp.sqlstate_of(format('SELECT fluxrate.signup(%L, %L, %L)', 'longer@pw.example', repeat('é', 1025), 'Longer')) AS pw_1025;
SELECT fluxrate.login('long@pw.example', repeat('é', 1024)) ? 'access_token' AS long_password_logs_in;
-- sign-up answers the same for a taken address, and changes nothing
SELECT fluxrate.signup('long@pw.example', 'another password', 'Again') - 'email'
     = fluxrate.signup('fresh@pw.example', 'another password', 'Fresh') - 'email' AS same_answer;
SELECT count(*) AS orgs_named_again FROM fluxrate_internal.organizations WHERE name = 'Again';
DROP ROLE sec_backend, sec_authenticator, sec_ingest;
