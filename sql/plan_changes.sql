-- Plan changes (docs/lifecycle.md, "Plan changes") and versioned plans
-- (docs/rating.md, "Plan versions"), issue 15 items 1 and 4.  Time is pinned;
-- every amount is computed by hand in the comment beside it.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

SET fluxrate.pinned_now = '2027-03-20 00:00:00+00';
SELECT (fluxrate.create_organization('Changes'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Other Co'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature(name => 'API calls', lookup_key => 'calls', type => 'meter', meter_name => 'calls',
        property_name => 'value', aggregation_type => 'SUM'))->>'meter_id' AS meter \gset
-- Starter: $30 a month in advance, calls at 0.01.  Pro: $100 a month in advance, calls at 0.004.
SELECT (fluxrate.create_plan('Starter', 'starter', 'HYBRID', 'month', 'USD'))->>'id' AS starter \gset
SELECT (fluxrate.add_charge(:'starter', 'FIXED', unit_price => 30, display_name => 'Platform'))->>'plan_version' AS v;
SELECT (fluxrate.add_charge(:'starter', 'USAGE', meter_id => :'meter', unit_price => 0.01, display_name => 'Calls'))->>'plan_version' AS v;
SELECT (fluxrate.create_plan('Pro', 'pro', 'HYBRID', 'month', 'USD'))->>'id' AS pro \gset
SELECT (fluxrate.add_charge(:'pro', 'FIXED', unit_price => 100, display_name => 'Platform'))->>'plan_version' AS v;
SELECT (fluxrate.add_charge(:'pro', 'USAGE', meter_id => :'meter', unit_price => 0.004, display_name => 'Calls'))->>'plan_version' AS v;
-- Annual: $1,000 a year in advance, calls at 0.002
SELECT (fluxrate.create_plan('Annual', 'annual', 'HYBRID', 'year', 'USD'))->>'id' AS annual \gset
SELECT (fluxrate.add_charge(:'annual', 'FIXED', unit_price => 1000, display_name => 'Platform'))->>'plan_version' AS v;
SELECT (fluxrate.add_charge(:'annual', 'USAGE', meter_id => :'meter', unit_price => 0.002, display_name => 'Calls'))->>'plan_version' AS v;
-- for the refusals: another currency, a deactivated plan
SELECT (fluxrate.create_plan('Euro', 'euro', 'FIXED', 'month', 'EUR'))->>'id' AS euro \gset
SELECT (fluxrate.create_plan('Old', 'old', 'FIXED', 'month', 'USD', is_active => false))->>'id' AS old \gset
SELECT (fluxrate.create_plan('Trial', 'trial', 'FIXED', 'month', 'USD', trial_days => 14))->>'id' AS trialplan \gset

CREATE FUNCTION pg_temp.calls(org uuid, cust uuid, meter uuid, qty numeric, at timestamptz) RETURNS void LANGUAGE sql AS $$
  INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
  VALUES (org, fluxrate_internal.uuid_v7(), cust, meter, qty, at, at)
$$;
CREATE FUNCTION pg_temp.lines(inv uuid) RETURNS TABLE (pos integer, line text, quantity numeric, unit_amount numeric,
    line_total numeric, period_start date, period_end date)
  LANGUAGE sql AS $$
  SELECT l.position, l.description, l.quantity, l.unit_amount, l.line_total, l.period_start::date, l.period_end::date
    FROM fluxrate_internal.invoice_lines l WHERE l.invoice_id = inv ORDER BY l.position
$$;
CREATE FUNCTION pg_temp.invoices(sub uuid) RETURNS TABLE (kind text, status text, period_start timestamptz, period_end timestamptz,
    total numeric, plan text)
  LANGUAGE sql AS $$
  SELECT i.kind, i.status, i.period_start, i.period_end, i.total,
         (SELECT p.lookup_id || ' v' || p.version FROM fluxrate_internal.plans p WHERE p.id = (i.meta_data->>'plan_id')::uuid)
    FROM fluxrate_internal.invoices i WHERE i.subscription_id = sub ORDER BY i.period_start, i.created_at, i.kind
$$;

-- 1. The issue's upgrade: Starter -> Pro now, at 40% of April (30 days): Apr 1 + 12 days = Apr 13.
SELECT (fluxrate.create_customer('Upgrader', 'up@example.com', 'up'))->>'id' AS cust1 \gset
SET fluxrate.pinned_now = '2027-04-01 00:00:00+00';
SELECT (fluxrate.create_subscription(:'cust1', :'starter', start_date => '2027-04-01 00:00+00'))->>'id' AS sub1 \gset
-- 1,000 calls before the change (600 + 400), 4,000 after (2,500 + 1,500)
SELECT pg_temp.calls(:'org', :'cust1', :'meter', 600, '2027-04-05 10:00+00'), pg_temp.calls(:'org', :'cust1', :'meter', 400, '2027-04-12 23:59:59+00');
SET fluxrate.pinned_now = '2027-04-13 00:00:00+00';
SELECT r->>'plan_name' AS plan, r->>'current_period_start' AS period_start, r->'change'->>'effective' AS effective,
       r->'change'->>'new_anchor' AS new_anchor, r->>'message' AS message
  FROM (SELECT fluxrate.change_subscription(:'sub1', :'pro') AS r) x;
SELECT pg_temp.calls(:'org', :'cust1', :'meter', 2500, '2027-04-13 00:00:00+00'), pg_temp.calls(:'org', :'cust1', :'meter', 1500, '2027-04-30 23:00+00');
-- the change invoice, [Apr 1, Apr 13) at Starter, immediately (a DRAFT now, finalized after the grace period):
--   Calls 1,000 x 0.01                                   =  10.00
--   Platform (Starter v1), unused Apr 13 - May 1: -30 x 18/30 = -18.00
--   Platform (Pro v1), remaining Apr 13 - May 1:   100 x 18/30 =  60.00
--   total                                                    =  52.00
SELECT id AS chg1 FROM fluxrate_internal.invoices WHERE subscription_id = :'sub1' AND kind = 'change' \gset
SELECT * FROM pg_temp.lines(:'chg1');
SELECT subtotal, tax, total FROM fluxrate_internal.invoices WHERE id = :'chg1';   -- 52.00
-- the May 1 close bills [Apr 13, May 1) at Pro: Calls 4,000 x 0.004 = 16.00, Platform for May in advance 100.00 = 116.00
SET fluxrate.pinned_now = '2027-05-01 00:00:30+00';
SET client_min_messages = error;  -- (other tests' organizations are closed too)
CALL fluxrate.close_due_periods();
RESET client_min_messages;
SELECT * FROM pg_temp.invoices(:'sub1');
SELECT l.* FROM fluxrate_internal.invoices i, pg_temp.lines(i.id) l
 WHERE i.subscription_id = :'sub1' AND i.kind = 'subscription' AND i.period_start = '2027-04-13 00:00+00';
-- finalization refreshes the drafts from the events with the plan each was rated with: unchanged
SET fluxrate.pinned_now = '2027-05-01 02:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT kind, status, total FROM fluxrate_internal.invoices WHERE subscription_id = :'sub1' ORDER BY period_start, kind;
-- 0 + 30.00 (opening, April), 52.00 (change), 116.00 (close): 198.00 for April and May's fee
SELECT sum(total) AS billed FROM fluxrate_internal.invoices WHERE subscription_id = :'sub1';
SELECT (c->>'status') AS status, c->>'effective' AS effective, c->>'effective_at' AS effective_at, c->>'from_plan_version' AS from_v
  FROM jsonb_array_elements(fluxrate.list_subscription_changes(:'sub1')) c;

-- 2. A downgrade at period end: Pro -> Starter, asked on Apr 10, nothing changes until May 1.
SELECT (fluxrate.create_customer('Downgrader', 'down@example.com', 'down'))->>'id' AS cust2 \gset
SET fluxrate.pinned_now = '2027-04-01 00:00:00+00';
SELECT (fluxrate.create_subscription(:'cust2', :'pro', start_date => '2027-04-01 00:00+00'))->>'id' AS sub2 \gset
SELECT pg_temp.calls(:'org', :'cust2', :'meter', 2500, '2027-04-20 00:00+00');
SET fluxrate.pinned_now = '2027-04-10 00:00:00+00';
SELECT r->>'plan_name' AS plan, r->'change'->>'status' AS status, r->'change'->>'effective_at' AS effective_at, r->>'message' AS message
  FROM (SELECT fluxrate.change_subscription(:'sub2', :'starter', effective => 'period_end') AS r) x;
-- visible on the subscription, still on Pro
SELECT r->>'plan_name' AS plan, r->'scheduled_change'->>'to_plan_name' AS to_plan, r->'scheduled_change'->>'effective_at' AS at
  FROM (SELECT fluxrate.get_subscription(:'sub2')::jsonb AS r) x;
SELECT fluxrate.change_subscription(:'sub2', :'annual');                        -- PT409 a change is already scheduled
-- cancel it and schedule it again: the canceled one stays in the history
SELECT (fluxrate.cancel_scheduled_change(:'sub2'))->'change'->>'status' AS canceled;
SELECT fluxrate.cancel_scheduled_change(:'sub2');                               -- PT404 nothing scheduled
SET fluxrate.pinned_now = '2027-04-11 00:00:00+00';
SELECT (fluxrate.change_subscription(:'sub2', :'starter', effective => 'period_end',
        effective_at => '2027-05-01 00:00+00'))->'change'->>'status' AS scheduled;
-- May 1: the closing invoice bills April at Pro without May's Pro fee: Calls 2,500 x 0.004 = 10.00;
-- then the subscription is on Starter and an opening invoice bills May's Starter fee: 30.00
SET fluxrate.pinned_now = '2027-05-01 00:00:30+00';
SET client_min_messages = error;  -- (other tests' organizations are closed too)
CALL fluxrate.close_due_periods();
RESET client_min_messages;
SELECT * FROM pg_temp.invoices(:'sub2');
SELECT l.* FROM fluxrate_internal.invoices i, pg_temp.lines(i.id) l WHERE i.subscription_id = :'sub2' AND i.period_start = '2027-04-01 00:00+00' AND i.kind = 'subscription';
SELECT r->>'plan_name' AS plan, r->>'current_period_start' AS period_start, r->>'current_period_end' AS period_end,
       r ? 'scheduled_change' AS still_scheduled
  FROM (SELECT fluxrate.get_subscription(:'sub2')::jsonb AS r) x;
-- June 1 at Starter: Calls 300 x 0.01 = 3.00 + Platform (June) 30.00 = 33.00
SELECT pg_temp.calls(:'org', :'cust2', :'meter', 300, '2027-05-15 00:00+00');
SET fluxrate.pinned_now = '2027-06-01 00:00:30+00';
SET client_min_messages = error;  -- (other tests' organizations are closed too)
CALL fluxrate.close_due_periods();
RESET client_min_messages;
SELECT total FROM fluxrate_internal.invoices WHERE subscription_id = :'sub2' AND period_start = '2027-05-01 00:00+00' AND kind = 'subscription';
SELECT c->>'status' AS status, c->>'effective' AS effective, c->>'applied_at' AS applied_at
  FROM jsonb_array_elements(fluxrate.list_subscription_changes(:'sub2')) c;

-- 3. Another billing interval, month -> year, now, at Apr 16 (15 of April's 30 days): a new anchor.
SELECT (fluxrate.create_customer('Yearly', 'year@example.com', 'year'))->>'id' AS cust3 \gset
SET fluxrate.pinned_now = '2027-04-01 00:00:00+00';
SELECT (fluxrate.create_subscription(:'cust3', :'starter', start_date => '2027-04-01 00:00+00'))->>'id' AS sub3 \gset
SELECT pg_temp.calls(:'org', :'cust3', :'meter', 800, '2027-04-02 00:00+00');
SET fluxrate.pinned_now = '2027-04-16 00:00:00+00';
SELECT r->>'plan_name' AS plan, r->>'billing_interval' AS iv, r->>'current_period_start' AS period_start,
       r->>'current_period_end' AS period_end, r->'change'->>'new_anchor' AS new_anchor, r->>'message' AS message
  FROM (SELECT fluxrate.change_subscription(:'sub3', :'annual') AS r) x;
-- change invoice [Apr 1, Apr 16) at Starter: Calls 800 x 0.01 = 8.00; Platform (Starter v1) unused
-- Apr 16 - May 1: -30 x 15/30 = -15.00; no prorated Annual fee (its period starts whole): total -7.00,
-- a credit owed to the customer.  The opening invoice bills the year Apr 16 2027 - Apr 16 2028: 1,000.00
SELECT * FROM pg_temp.invoices(:'sub3');
SELECT l.* FROM fluxrate_internal.invoices i, pg_temp.lines(i.id) l WHERE i.subscription_id = :'sub3' AND i.kind = 'change';
SELECT billing_anchor, current_period_index, billing_interval FROM fluxrate_internal.subscriptions WHERE id = :'sub3';

-- 3b. A change at the first instant of a period: nothing of it has elapsed, so the change invoice
-- has only the prorations, whole: -30 x 1 = -30.00 and +100 x 1 = 100.00 -> 70.00.  A second
-- change at the same instant is refused (PT409).
SET fluxrate.pinned_now = '2027-04-20 00:00:00+00';
SELECT (fluxrate.create_customer('Instant', 'instant@example.com', 'instant'))->>'id' AS cust7 \gset
SELECT (fluxrate.create_subscription(:'cust7', :'starter', start_date => '2027-04-20 00:00+00'))->>'id' AS sub7 \gset
SELECT (fluxrate.change_subscription(:'sub7', :'pro'))->>'plan_name' AS plan;
SELECT * FROM pg_temp.invoices(:'sub7');
SELECT l.* FROM fluxrate_internal.invoices i, pg_temp.lines(i.id) l WHERE i.subscription_id = :'sub7' AND i.kind = 'change';
SELECT fluxrate.change_subscription(:'sub7', :'starter');                       -- PT409 the same instant

-- 4. Versioned plans.  Metered v1: calls at 0.01.  Subscribed, its price is edited to 0.02: version 2.
SET fluxrate.pinned_now = '2027-04-01 00:00:00+00';
SELECT (fluxrate.create_plan('Metered', 'metered', 'USAGE', 'month', 'USD'))->>'id' AS m1 \gset
SELECT (fluxrate.add_charge(:'m1', 'USAGE', meter_id => :'meter', unit_price => 0.01, display_name => 'Calls'))->>'id' AS m1_calls \gset
-- no subscription yet: edited in place (still version 1)
SELECT r->>'plan_id' = :'m1' AS same_plan, r->>'plan_version' AS version, r->>'unit_price' AS unit_price
  FROM (SELECT fluxrate.update_charge_price(:'m1', :'m1_calls', unit_price => 0.011) AS r) x;
SELECT id AS m1_calls FROM fluxrate_internal.charges WHERE plan_id = :'m1' AND status = 'ACTIVE' \gset
SELECT (fluxrate.create_customer('Early', 'early@example.com', 'early'))->>'id' AS cust4 \gset
SELECT (fluxrate.create_subscription(:'cust4', :'m1', start_date => '2027-04-01 00:00+00'))->>'id' AS sub4 \gset
SELECT (fluxrate.update_charge_price(:'m1', :'m1_calls', unit_price => 0.02))->>'plan_id' AS m2 \gset
SELECT version, lookup_id, superseded_by = :'m2' AS superseded, id = :'m1' AS is_v1
  FROM fluxrate_internal.plans WHERE org_id = :'org' AND lookup_id = 'metered' ORDER BY version;
SELECT (fluxrate.get_plan(:'m2'))::jsonb->'charges'->0->>'unit_price' AS v2_price,
       (fluxrate.get_plan(:'m1'))::jsonb->'charges'->0->>'unit_price' AS v1_price;
-- editing the old version is refused; a new subscription to the old id gets the current version
SELECT fluxrate.update_charge_price(:'m1', :'m1_calls', unit_price => 0.03);    -- PT409 superseded
SELECT (fluxrate.create_customer('Late', 'late@example.com', 'late'))->>'id' AS cust5 \gset
SELECT r->>'plan_id' = :'m2' AS on_v2, r->>'plan_version' AS version
  FROM (SELECT fluxrate.create_subscription(:'cust5', :'m1', start_date => '2027-04-01 00:00+00') AS r) x;
SELECT id AS sub5 FROM fluxrate_internal.subscriptions WHERE customer_id = :'cust5' \gset
-- 100 calls each in April: Early at v1 100 x 0.011 = 1.10, Late at v2 100 x 0.02 = 2.00; the invoices name their version
SELECT pg_temp.calls(:'org', :'cust4', :'meter', 100, '2027-04-10 00:00+00'), pg_temp.calls(:'org', :'cust5', :'meter', 100, '2027-04-10 00:00+00');
SET fluxrate.pinned_now = '2027-05-01 00:00:30+00';
SET client_min_messages = error;  -- (other tests' organizations are closed too)
CALL fluxrate.close_due_periods();
RESET client_min_messages;
SELECT c.name, i.total, i.meta_data->>'plan_version' AS plan_version, i.meta_data->>'plan_id' = :'m1' AS on_v1
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers c ON c.id = i.customer_id
 WHERE i.subscription_id IN (:'sub4', :'sub5') ORDER BY c.name;
-- migrating explicitly: Early moves to v2 at the end of May; May's 100 calls still at v1: 1.10, June's at v2: 2.00
SELECT fluxrate.migrate_subscriptions(:'m1', 'period_end') - 'plan_id' AS migrated;
SELECT pg_temp.calls(:'org', :'cust4', :'meter', 100, '2027-05-10 00:00+00'), pg_temp.calls(:'org', :'cust4', :'meter', 100, '2027-06-10 00:00+00');
SET fluxrate.pinned_now = '2027-07-01 00:00:30+00';
SET client_min_messages = error;  -- (other tests' organizations are closed too)
CALL fluxrate.close_due_periods();
RESET client_min_messages;
SELECT period_start::date, total, meta_data->>'plan_version' AS plan_version FROM fluxrate_internal.invoices
 WHERE subscription_id = :'sub4' ORDER BY period_start;
-- deactivating a charge of v2 (subscribed) makes v3; Late stays on v2
SELECT (fluxrate.update_charge(:'m2', (SELECT id FROM fluxrate_internal.charges WHERE plan_id = :'m2' AND status = 'ACTIVE'), 'INACTIVE'))->>'plan_id' <> :'m2' AS new_version;
SELECT version, (SELECT count(*) FROM fluxrate_internal.charges c WHERE c.plan_id = p.id AND c.status = 'ACTIVE') AS active_charges,
       (SELECT count(*) FROM fluxrate_internal.subscriptions s WHERE s.plan_id = p.id) AS subscriptions
  FROM fluxrate_internal.plans p WHERE org_id = :'org' AND lookup_id = 'metered' ORDER BY version;

-- 5. Refusals: a specific SQLSTATE, nothing written.
SET fluxrate.pinned_now = '2027-07-02 00:00:00+00';
SELECT (fluxrate.create_customer('Refused', 'no@example.com', 'no'))->>'id' AS cust6 \gset
SELECT (fluxrate.create_subscription(:'cust6', :'starter', start_date => '2027-07-02 00:00+00'))->>'id' AS sub6 \gset
SELECT (fluxrate.create_subscription(:'cust6', :'trialplan', start_date => '2027-07-02 00:00+00'))->>'id' AS sub_trial \gset
SELECT count(*) AS changes_before FROM fluxrate_internal.subscription_changes WHERE org_id = :'org' \gset
SELECT count(*) AS invoices_before FROM fluxrate_internal.invoices WHERE org_id = :'org' \gset
SET fluxrate.pinned_now = '2027-07-10 00:00:00+00';
SELECT fluxrate.change_subscription(:'sub6', :'euro');                          -- PT422 another currency
SELECT fluxrate.change_subscription(:'sub6', :'old');                           -- PT422 deactivated plan
SELECT fluxrate.change_subscription(:'sub_trial', :'pro');                      -- PT409 trialing
SELECT fluxrate.change_subscription(:'sub6', :'starter');                       -- PT409 already on this plan
SELECT fluxrate.change_subscription(:'sub6', :'pro', effective_at => '2027-07-09 00:00+00');   -- PT422 in the past
SELECT fluxrate.change_subscription(:'sub6', :'pro', effective_at => '2027-07-20 00:00+00');   -- PT422 'now' means now
SELECT fluxrate.change_subscription(:'sub6', :'pro', effective_at => 'infinity');              -- PT422 not finite
SELECT fluxrate.change_subscription(:'sub6', :'pro', effective => 'tomorrow');  -- 22023
SELECT fluxrate.change_subscription(:'sub6', gen_random_uuid());                -- PT404 unknown plan
SELECT fluxrate.change_subscription(:'sub6', NULL);                             -- 22004 plan_id is required
SELECT fluxrate.cancel_subscription(:'sub6') IS NOT NULL AS canceled;
SELECT fluxrate.change_subscription(:'sub6', :'pro');                           -- PT409 canceled
SELECT (SELECT count(*) FROM fluxrate_internal.subscription_changes WHERE org_id = :'org') - :changes_before AS changes_written,
       (SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = :'org' AND kind <> 'final') - :invoices_before AS invoices_written;

-- 6. Tenancy: org B cannot change, schedule, cancel or list org A's subscription changes.
SELECT count(*) AS org_a_changes FROM fluxrate_internal.subscription_changes WHERE org_id = :'org' \gset
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.change_subscription(:'sub2', :'pro');                           -- PT404
SELECT fluxrate.change_subscription(:'sub2', :'pro', effective => 'period_end'); -- PT404
SELECT fluxrate.cancel_scheduled_change(:'sub2');                               -- PT404
SELECT fluxrate.list_subscription_changes(:'sub1');                             -- PT404
SELECT fluxrate.migrate_subscriptions(:'m1');                                   -- PT404
SELECT fluxrate.update_charge_price(:'m2', gen_random_uuid(), unit_price => 1); -- PT404
-- org A's subscriptions and changes are as they were
SELECT (SELECT count(*) FROM fluxrate_internal.subscription_changes WHERE org_id = :'org') - :org_a_changes AS changes_written,
       (SELECT plan_id FROM fluxrate_internal.subscriptions WHERE id = :'sub2') = :'starter' AS sub2_on_starter,
       (SELECT count(*) FROM fluxrate_internal.subscription_changes WHERE org_id = :'org_b') AS org_b_changes;
