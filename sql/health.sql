-- fluxrate.health(): what an operator needs to know, across organizations, for
-- operators only; schedule_jobs()'s refusals that this instance can show (the
-- libpq ones, a job really failing and DROP EXTENSION: test/scripts/cron_login.sh).
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
CREATE ROLE fr_health_op LOGIN;
GRANT fluxrate_operator TO fr_health_op;
CREATE ROLE fr_health_app LOGIN;
GRANT fluxrate_app TO fr_health_app;
CREATE ROLE fr_health_nologin NOLOGIN;
GRANT fluxrate_app TO fr_health_nologin;

-- The jobs (the daily purge not run yet is no warning), in the database pg_cron runs from: scheduled, read and unscheduled in one
-- transaction, so that pg_cron never sees them (sql/cron.sql lets them run).
BEGIN;
SELECT count(*) AS jobs FROM jsonb_object_keys(fluxrate.schedule_jobs());
SET LOCAL ROLE fr_health_op;
SELECT area, item, status, count, detail LIKE 'scheduled (%, as %), no run recorded yet' AS waiting_for_a_run
  FROM fluxrate.health WHERE area = 'job' ORDER BY item;
SELECT item, status, detail FROM fluxrate.health WHERE area = 'clock';
RESET ROLE;
SELECT fluxrate.unschedule_jobs() AS unscheduled;
COMMIT;
-- not scheduled: each job is failing, with the call that schedules it
SET ROLE fr_health_op;
SELECT item, status, detail FROM fluxrate.health() WHERE area = 'job' ORDER BY item;
RESET ROLE;
-- pg_cron runs a job as the role that scheduled it: a role that cannot log in is refused (55000)
SET ROLE fr_health_nologin;
SELECT fluxrate.schedule_jobs();
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT fluxrate.schedule_jobs();
\set VERBOSITY sqlstate
RESET ROLE;
SELECT count(*) AS jobs_left FROM cron.job WHERE jobname LIKE 'fluxrate-%';

-- The rest in a database of its own, so that the counts are this file's alone (health()
-- counts every organization), and without pg_cron there: the clock says so.
CREATE DATABASE fr_health;
\c fr_health
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
CREATE EXTENSION fluxrate;
SET fluxrate.pinned_now = '2030-01-01 00:00:00+00';
SET ROLE fr_health_op;
SELECT area, item, status, count, since, detail FROM fluxrate.health;
RESET ROLE;

-- Tenants never see it: a trusted application role (even acting for an organization), and
-- PostgREST's signed-in and anonymous roles, get 42501 (the function and the view)
SET ROLE fr_health_app;
SELECT * FROM fluxrate.health();
\set VERBOSITY default
SELECT * FROM fluxrate.health();
\set VERBOSITY sqlstate
SELECT * FROM fluxrate.health;
SELECT fluxrate.act_as(((fluxrate.create_organization('Tenant'))->>'id')::uuid, session => true) IS NOT NULL AS acting;
SELECT * FROM fluxrate.health();
RESET fluxrate.acting_org;
RESET ROLE;
SET ROLE fluxrate_web;
SELECT * FROM fluxrate.health();
RESET ROLE;
SET ROLE fluxrate_anon;
SELECT * FROM fluxrate.health;
RESET ROLE;
-- nor can they reach the definer function behind it
SET ROLE fr_health_app;
SELECT * FROM fluxrate_internal.sys_health();
RESET ROLE;


-- two organizations: A bills three monthly subscriptions from Jan 1 (10.00 in arrears) and
-- has a webhook endpoint; B one from Jan 1, 01:00, so its period ends an hour after A's
SELECT (fluxrate.create_organization('A', payment_terms_days => 10))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('B'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_plan('Flat', 'flat', 'FIXED', 'month', 'USD'))->>'id' AS plan_a \gset
SELECT (fluxrate.add_charge(:'plan_a', 'FIXED', unit_price => 10, billing_timing => 'in_arrears'))->>'unit_price' AS fee;
SELECT count(fluxrate.create_subscription(((fluxrate.create_customer('A' || g, 'a' || g || '@example.com', 'a' || g))->>'id')::uuid,
        :'plan_a', start_date => '2030-01-01 00:00+00')) AS subscriptions
  FROM generate_series(1, 3) g;
SELECT id AS bad_sub FROM fluxrate_internal.subscriptions WHERE org_id = :'org_a' ORDER BY id LIMIT 1 OFFSET 1 \gset
SELECT (fluxrate.create_webhook_endpoint('https://hooks.example.com/fluxrate', ARRAY['invoice.finalized']))->>'id' AS hook \gset
SELECT (fluxrate.create_feature(name => 'Calls', lookup_key => 'calls', type => 'meter', meter_name => 'calls',
        property_name => 'n', aggregation_type => 'SUM'))->>'meter_token' AS meter_token \gset
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_plan('Flat', 'flat', 'FIXED', 'month', 'USD'))->>'id' AS plan_b \gset
SELECT (fluxrate.add_charge(:'plan_b', 'FIXED', unit_price => 5, billing_timing => 'in_arrears'))->>'unit_price' AS fee;
SELECT (fluxrate.create_subscription(((fluxrate.create_customer('B1', 'b1@example.com'))->>'id')::uuid, :'plan_b',
        start_date => '2030-01-01 01:00+00'))->>'status' AS status;
RESET fluxrate.acting_org;

-- A's second subscription cannot be closed (a fault injected by a trigger, standing for a bug
-- or bad data): the closer sets it aside with its error, closes the two others
CREATE FUNCTION public.inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.subscription_id::text = current_setting('test.bad_sub', true)
     OR (TG_OP = 'UPDATE' AND NEW.status = 'OPEN' AND NEW.id::text = current_setting('test.bad_inv', true)) THEN
    RAISE EXCEPTION 'injected fault' USING ERRCODE = 'P0001';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER inject_fault BEFORE INSERT OR UPDATE ON fluxrate_internal.invoices
  FOR EACH ROW EXECUTE FUNCTION public.inject_fault();
SET test.bad_sub = :'bad_sub';
SET fluxrate.pinned_now = '2030-02-01 00:00:30+00';
CALL fluxrate.close_due_periods();                                         -- WARNING, once
RESET test.bad_sub;

-- 01:30: nothing has run since.  B's period ended 30 minutes ago (warning), A's two drafts
-- waited their grace period (1 hour, to 01:00:30) 29.5 minutes ago (warning), and A's
-- set-aside subscription is failing, with its error and next try
SET fluxrate.pinned_now = '2030-02-01 01:30:00+00';
SET ROLE fr_health_op;
SELECT area, item, status, count, since,
       replace(replace(detail, :'bad_sub', '<bad_sub>'), :'org_a', '<org_a>') AS detail
  FROM fluxrate.health WHERE area IN ('closing', 'finalizing') ORDER BY area, item;
RESET ROLE;

-- finalizing: one of A's two drafts cannot be opened (set aside); the other is numbered, its
-- e-mail SKIPPED (A has no SMTP), its webhook queued
SELECT id AS bad_inv FROM fluxrate_internal.invoices WHERE org_id = :'org_a' ORDER BY id LIMIT 1 \gset
SET test.bad_inv = :'bad_inv';
CALL fluxrate.finalize_due_invoices();                                     -- WARNING, once
RESET test.bad_inv;
SET ROLE fr_health_op;
SELECT area, item, status, count, since,
       replace(replace(detail, :'bad_inv', '<bad_inv>'), :'org_a', '<org_a>') AS detail
  FROM fluxrate.health WHERE area IN ('finalizing', 'delivery') ORDER BY area, item;
RESET ROLE;
-- the skipped e-mail is in A's delivery log, with its reason; B's log does not show it
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT d->>'channel' AS channel, d->>'status' AS status, d->>'last_error' AS reason,
       d->>'recipient' = (SELECT c.email FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers c
                           ON c.org_id = i.org_id AND c.id = i.customer_id
                           WHERE i.org_id = :'org_a' AND i.status = 'OPEN') AS the_customers_address,
       d->>'invoice_id' = (SELECT id::text FROM fluxrate_internal.invoices WHERE org_id = :'org_a' AND status = 'OPEN') AS the_open_invoice
  FROM jsonb_array_elements((fluxrate.list_deliveries(status => 'skipped'))->'data') d;
-- a skipped e-mail is not retried (there is nothing to retry until SMTP is set: send_invoice_email)
SELECT (fluxrate.retry_delivery(((fluxrate.list_deliveries(status => 'SKIPPED'))->'data'->0->>'id')::uuid))->>'status';
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting;
SELECT (fluxrate.list_deliveries(status => 'SKIPPED'))->'meta'->>'total' AS b_skipped;
-- the endpoint is disabled before the webhook goes out: the delivery fails for good
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT (fluxrate.update_webhook_endpoint(:'hook', status => 'DISABLED'))->>'status' AS endpoint;
RESET fluxrate.acting_org;
CALL fluxrate.deliver_pending();
SET ROLE fr_health_op;
SELECT item, status, count, since,
       regexp_replace(replace(detail, :'org_a', '<org_a>'), '[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}', '<id>') AS detail
  FROM fluxrate.health WHERE area = 'delivery' ORDER BY item;
RESET ROLE;

-- the usage rollups: never refreshed (warning while there are events), then current, then
-- behind by one event for 10 minutes (warning)
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT count(fluxrate.track(meter_token => :'meter_token', customer_external_id => 'a1', quantity => 2,
                            idempotency_key => 'e' || g)) AS tracked FROM generate_series(1, 2) g;
RESET fluxrate.acting_org;
SET ROLE fr_health_op;
SELECT item, status, count, since, detail FROM fluxrate.health WHERE area = 'rollups';
RESET ROLE;
SELECT (fluxrate.refresh_usage_rollups())->>'events' AS counted;
SET ROLE fr_health_op;
SELECT item, status, count, since, detail FROM fluxrate.health WHERE area = 'rollups';
RESET ROLE;
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting;
SELECT (fluxrate.track(meter_token => :'meter_token', customer_external_id => 'a1', quantity => 2, idempotency_key => 'e3'))->>'quantity' AS tracked;
RESET fluxrate.acting_org;
SET fluxrate.pinned_now = '2030-02-01 01:40:00+00';
SET ROLE fr_health_op;
SELECT item, status, count, since, detail FROM fluxrate.health WHERE area = 'rollups';
RESET ROLE;

-- the backlog is cleared: B closed, A's set-aside ones retried without the fault; everything ok
-- but the failed delivery (a warning until someone retries it) and the skipped e-mail
SET fluxrate.pinned_now = '2030-02-02 03:00:00+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2030-02-02 04:30:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT (fluxrate.refresh_usage_rollups())->>'events' AS counted;
SET ROLE fr_health_op;
SELECT area, item, status, count FROM fluxrate.health ORDER BY area, item;
RESET ROLE;
SELECT count(*) FILTER (WHERE status = 'OPEN') AS open, sum(total) FILTER (WHERE status = 'OPEN') AS billed
  FROM fluxrate_internal.invoices;   -- A: 3 x 10.00 + B: 5.00 = 35.00

\c contrib_regression
DROP DATABASE fr_health;
DROP ROLE fr_health_op, fr_health_app, fr_health_nologin;
