-- Prices by event dimension (issue 15, item 3; docs/rating.md "Prices by event
-- dimension", docs/rollups.md "Group key"): a grouped charge with three priced
-- model values and unpriced ones (the issue's example), a default group, an
-- override of a grouped charge, live usage and meter analytics by group, the
-- rollups keyed by group value (closer from the rollups = finalizer from the
-- events), late usage by group, every refusal, and org B.  Amounts by hand.
SET TimeZone = 'UTC';
SET client_min_messages = error;  -- (other tests' deliberately broken subscriptions warn whenever a closer runs)
\set VERBOSITY sqlstate

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Acme AI'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT f->>'meter_id' AS meter FROM fluxrate.create_feature('Tokens', 'tokens', 'meter', meter_name => 'tokens',
       property_name => 'tokens', aggregation_type => 'SUM') f \gset
SELECT f->>'meter_id' AS peak FROM fluxrate.create_feature('Peak', 'peak', 'meter', meter_name => 'peak',
       property_name => 'n', aggregation_type => 'MAX') f \gset
-- the meter keeps four models apart; everything else is "other"
SELECT d->>'property' AS property, d->'values' AS dimension_values
  FROM fluxrate.set_meter_dimension(:'meter', 'model', ARRAY['gpt-large', 'gpt-medium', 'small', 'legacy']) d;

-- Refusals of a dimension, nothing written
SELECT fluxrate.set_meter_dimension(:'peak', 'model', ARRAY(SELECT 'm' || i FROM generate_series(1, 101) i)); -- PT422 over 100
SELECT fluxrate.set_meter_dimension(:'peak', 'model', ARRAY['a', 'a']);         -- 22023 twice
SELECT fluxrate.set_meter_dimension(:'peak', 'model', ARRAY['a', '']);          -- 22023 empty
SELECT fluxrate.set_meter_dimension(:'peak', '', ARRAY['a']);                   -- 22004
SELECT fluxrate.set_meter_dimension(gen_random_uuid(), 'model', ARRAY['a']);    -- PT404
SELECT count(*) AS dimensions FROM fluxrate_internal.meter_dimensions WHERE org_id = :'org';   -- 1

-- Plan "Per model": gpt-large per unit at 0.01; gpt-medium graduated (1,000 at
-- 0.005, then 0.004); small in packages of 1,000 at 0.50 with 100 free; no
-- default: every other value is unpriced
SELECT (fluxrate.create_plan('Per model', 'per-model', 'USAGE', 'month', 'USD'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => :'meter', display_name => 'Tokens', unit_price => 0))->>'id' AS charge \gset
SELECT g->>'property' AS property, jsonb_array_length(g->'groups') AS groups
  FROM fluxrate.set_charge_groups(:'charge', 'model', '[
    {"value": "gpt-large", "unit_price": 0.01},
    {"value": "gpt-medium", "pricing_model": "graduated", "tiers": [{"up_to": 1000, "unit_price": 0.005}, {"up_to": null, "unit_price": 0.004}]},
    {"value": "small", "display_name": "Small model", "pricing_model": "package", "package_size": 1000, "package_price": 0.50, "free_units": 100}]') g;
-- Plan "Flagship": gpt-large at 0.02, everything else at a default 0.001
SELECT (fluxrate.create_plan('Flagship', 'flagship', 'USAGE', 'month', 'USD'))->>'id' AS plan2 \gset
SELECT (fluxrate.add_charge(:'plan2', 'USAGE', meter_id => :'meter', display_name => 'Tokens', unit_price => 0))->>'id' AS charge2 \gset
SELECT jsonb_array_length(g->'groups') AS groups FROM fluxrate.set_charge_groups(:'charge2', 'model', '[
    {"value": "gpt-large", "unit_price": 0.02}, {"value": null, "display_name": "Other models", "unit_price": 0.001}]') g;

-- Refusals of a grouped charge, nothing written
SELECT (fluxrate.create_plan('Bad', 'bad', 'USAGE', 'month', 'USD'))->>'id' AS plan3 \gset
SELECT (fluxrate.add_charge(:'plan3', 'USAGE', meter_id => :'meter', unit_price => 1))->>'id' AS charge3 \gset
SELECT (fluxrate.add_charge(:'plan3', 'USAGE', meter_id => :'peak', unit_price => 1))->>'id' AS charge_peak \gset
SELECT (fluxrate.add_charge(:'plan3', 'FIXED', unit_price => 1))->>'id' AS charge_fixed \gset
SELECT fluxrate.set_charge_groups(:'charge3', 'region', '[{"value": null, "unit_price": 1}]');      -- PT422 the meter does not carry region
SELECT fluxrate.set_charge_groups(:'charge_peak', 'model', '[{"value": null, "unit_price": 1}]');   -- PT422 no dimension on that meter
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "gpt-huge", "unit_price": 1}]'); -- PT422 not a value of the meter
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "small", "unit_price": 1}, {"value": "small", "unit_price": 2}]'); -- 22023 twice
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": null, "unit_price": 1}, {"value": null, "unit_price": 2}]');       -- 22023 two defaults
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "small", "unit_price": "NaN"}]');          -- PT422
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "small", "unit_price": 1e15}]');          -- PT422
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "small", "pricing_model": "graduated", "tiers": [{"up_to": 5, "unit_price": 1}]}]'); -- PT422
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": "small"}]');                              -- 22004 unit_price
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": 7, "unit_price": 1}]');                   -- 22023 value not a string
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[]');                                                -- 22023 empty
SELECT fluxrate.set_charge_groups(:'charge3', 'model', (SELECT jsonb_agg(jsonb_build_object('value', 'v' || i, 'unit_price', 1))
                                                          FROM generate_series(1, 101) i));                  -- PT422 over 100
SELECT fluxrate.set_charge_groups(:'charge_fixed', 'model', '[{"value": null, "unit_price": 1}]');           -- 22023 FIXED
SELECT count(*) AS grouped_charges FROM fluxrate_internal.charge_dimensions WHERE org_id = :'org';            -- 2

-- Tenancy: org B can neither see nor change A's dimensions and groups
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.set_meter_dimension(:'meter', 'region', ARRAY['eu']);                          -- PT404
SELECT fluxrate.set_charge_groups(:'charge3', 'model', '[{"value": null, "unit_price": 1}]'); -- PT404
SET ROLE fluxrate_owner;
SELECT (SELECT count(*) FROM fluxrate_internal.meter_dimensions) AS dims_b,
       (SELECT count(*) FROM fluxrate_internal.charge_dimensions) AS groups_b;                 -- RLS: 0, 0
RESET ROLE;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;

SELECT (fluxrate.create_customer('Ada', 'a@example.com', 'ada'))->>'id' AS c1 \gset
SELECT (fluxrate.create_customer('Bob', 'b@example.com', 'bob'))->>'id' AS c2 \gset
SELECT (fluxrate.create_customer('Cy', 'c@example.com', 'cy'))->>'id' AS c3 \gset
SELECT (fluxrate.create_subscription(:'c1', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s1 \gset
SELECT (fluxrate.create_subscription(:'c2', :'plan2', start_date => '2026-01-01 00:00+00'))->>'id' AS s2 \gset
SELECT (fluxrate.create_subscription(:'c3', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s3 \gset
-- (new groups for a plan with subscribers make a new version of it: at the end)
-- Cy's override of the grouped charge: gpt-large at 0.008, everything else at 0.0005
SELECT jsonb_array_length(o->'groups') AS override_groups FROM fluxrate.set_charge_override(:'s3', :'charge',
       groups => '[{"value": "gpt-large", "unit_price": 0.008}, {"value": null, "unit_price": 0.0005}]') o;
SELECT fluxrate.set_charge_override(:'s3', :'charge', unit_price => 1);                                 -- 22023 groups only
SELECT fluxrate.set_charge_override(:'s3', :'charge', groups => '[{"value": "nope", "unit_price": 1}]'); -- PT422

-- January, the same events for each customer:
--   gpt-large 1,000 + 500 = 1,500; gpt-medium 2,500; small 2,350;
--   legacy 700 (a value of the meter no plan prices); mystery 300 (not a value of the meter); 200 without a model
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
SELECT :'org', fluxrate_internal.uuid_v7(), c, :'meter', q, '2026-01-05'::timestamptz + n * interval '1 day', '2026-01-05', md
  FROM unnest(ARRAY[:'c1', :'c2', :'c3']::uuid[]) c,
       (VALUES (1, 1000, '{"model": "gpt-large"}'::jsonb), (2, 500, '{"model": "gpt-large"}'), (3, 2500, '{"model": "gpt-medium"}'),
               (4, 2350, '{"model": "small"}'), (5, 700, '{"model": "legacy"}'), (6, 300, '{"model": "mystery"}'),
               (7, 200, '{}')) v(n, q, md);
-- a meter with events keeps its dimension
SELECT fluxrate.set_meter_dimension(:'meter', 'model', ARRAY['gpt-large']);    -- PT409

-- Live usage (mid-January) and meter analytics, by group: other = 300 + 200 = 500
SET fluxrate.pinned_now = '2026-01-20 00:00:00+00';
SELECT u->>'meter_name' AS meter, u->>'usage' AS usage, u->>'dimension' AS dimension, u->'groups' AS groups
  FROM json_array_elements((fluxrate.get_subscription_usage(:'s1'))->'usage') u;
SELECT r->>'total_usage' AS total, r->'groups' AS groups
  FROM fluxrate.get_meter_usage(:'meter', '2026-01-01', '2026-02-01', 'month', :'c1') r;
-- Preview of Ada (no default group):
--   gpt-large 1,500 x 0.01 = 15.00
--   gpt-medium 1,000 x 0.005 = 5 + 1,500 x 0.004 = 6 -> 11.00
--   Small model 2,350 - 100 free = 2,250 -> 3 packages x 0.50 = 1.50
--   unpriced legacy 700 + other 500 = 1,200 at 0 -> 0.00
--   total 27.50
SELECT l->>'description' AS line, l->>'quantity' AS quantity, l->>'unit_amount' AS unit_amount, l->>'line_total' AS amount
  FROM jsonb_array_elements((fluxrate.preview_invoice(:'s1'))->'line_items') l;
SELECT (fluxrate.preview_invoice(:'s1'))->>'total' AS preview_total;

-- The rollups keep the groups apart (7 events per customer, 5 groups: gpt-large,
-- gpt-medium, small, legacy and '' for mystery and none; day and month rows)
SET fluxrate.pinned_now = '2026-02-01 00:00:00+00';
SELECT ((fluxrate.refresh_usage_rollups())->>'events')::integer >= 21 AS rolled_up;
SELECT r.width, r.group_value, r.events, r.quantity_sum FROM fluxrate_internal.usage_rollups r
 WHERE r.org_id = :'org' AND r.customer_id = :'c1' AND r.width = 'month' ORDER BY r.group_value;
SELECT count(*) AS rollup_differences FROM fluxrate_internal.rollup_differences(:'org');
-- the closer reads its grouped usage from the rollups (the run's snapshot)
SELECT fluxrate_internal.sys_close_prepare(0) > 0 AS snapshotted;
SELECT count(*) AS grouped_pairs FROM pg_temp.fr_close_group_usage WHERE org_id = :'org';
CALL fluxrate.close_due_periods();
-- Ada: 15.00 + 11.00 + 1.50 + 0.00 = 27.50
-- Bob (Flagship): gpt-large 1,500 x 0.02 = 30.00; other models 2,500 + 2,350 + 700 + 500 = 6,050 x 0.001 = 6.05; total 36.05
-- Cy (override): gpt-large 1,500 x 0.008 = 12.00; other 6,050 x 0.0005 = 3.025 -> 3.03 (half away from zero); total 15.03
SELECT cu.external_id, l.position, l.description, l.quantity, l.unit_amount, l.line_total, l.meta->>'group' AS grp,
       l.meta->>'unpriced' AS unpriced
  FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
  JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id
 WHERE i.org_id = :'org' ORDER BY cu.external_id, l.position;
SELECT cu.external_id, i.total FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
 WHERE i.org_id = :'org' ORDER BY cu.external_id;
-- the finalizer recomputes every draft from the events: the same lines, the same totals
CREATE TEMP TABLE closer_lines AS
SELECT i.subscription_id, l.position, l.description, l.quantity, l.line_total, l.meta
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id WHERE i.org_id = :'org';
SET fluxrate.pinned_now = '2026-02-01 02:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT count(*) AS differences FROM (
  (SELECT * FROM closer_lines EXCEPT
   SELECT i.subscription_id, l.position, l.description, l.quantity, l.line_total, l.meta
     FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id WHERE i.org_id = :'org')
  UNION ALL
  (SELECT i.subscription_id, l.position, l.description, l.quantity, l.line_total, l.meta
     FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id WHERE i.org_id = :'org'
   EXCEPT SELECT * FROM closer_lines)) d;
SELECT cu.external_id, i.status, i.total FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
 WHERE i.org_id = :'org' ORDER BY cu.external_id;

-- Late usage, by group: after January is OPEN, 100 more gpt-large tokens and 50
-- mystery ones dated January for Ada; February's invoice bills
--   gpt-large 1,500 -> 1,600: 100 x 0.01 = 1.00; the unpriced 50 cost nothing (no line)
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
VALUES (:'org', fluxrate_internal.uuid_v7(), :'c1', :'meter', 100, '2026-01-31 10:00', '2026-02-03', '{"model": "gpt-large"}'),
       (:'org', fluxrate_internal.uuid_v7(), :'c1', :'meter', 50, '2026-01-31 11:00', '2026-02-03', '{"model": "mystery"}');
SET fluxrate.pinned_now = '2026-03-01 00:00:00+00';
CALL fluxrate.close_due_periods();
-- February: no usage -> four 0.00 lines (three groups and unpriced), then the late line 1.00; total 1.00
SELECT l.position, l.line_type, l.description, l.quantity, l.line_total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id
 WHERE i.subscription_id = :'s1' AND i.period_start = '2026-02-01' ORDER BY l.position;
SET fluxrate.pinned_now = '2026-03-01 02:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT status, total FROM fluxrate_internal.invoices WHERE subscription_id = :'s1' AND period_start = '2026-02-01';  -- OPEN 1.00

-- New groups for a plan with subscribers: a new version (docs/rating.md, "Plan
-- versions"); Ada and Cy stay on version 1 and its groups until migrated.
-- Version 2: every model at 1.00 per 1,000 tokens (0.001 per token).
SELECT g->>'plan_version' AS version, g->>'plan_id' <> :'plan' AS new_plan_row, g->>'charge_id' <> :'charge' AS new_charge,
       g->'groups'->0->>'unit_price' AS unit_price
  FROM fluxrate.set_charge_groups(:'charge', 'model', '[{"value": null, "unit_price": 0.001}]') g;
SELECT (SELECT id FROM fluxrate_internal.plans WHERE org_id = :'org' AND family_id = :'plan' AND superseded_by IS NULL) AS plan_v2 \gset
SELECT count(*) AS on_version_1 FROM fluxrate_internal.subscriptions WHERE org_id = :'org' AND plan_id = :'plan';  -- 2
SELECT jsonb_array_length(groups) AS v1_groups FROM fluxrate_internal.charge_dimensions WHERE charge_id = :'charge';  -- 3, unchanged
SELECT fluxrate.update_charge_price(:'plan_v2', (SELECT id FROM fluxrate_internal.charges WHERE plan_id = :'plan_v2'), unit_price => 1); -- 22023 groups
SELECT fluxrate.set_charge_groups(:'charge', 'model', '[{"value": null, "unit_price": 2}]');  -- PT409 version 1 is superseded: edit version 2
SELECT (fluxrate.update_charge(:'plan3', :'charge_peak', 'INACTIVE'))->>'status' AS retired;
SELECT fluxrate.set_charge_groups(:'charge_peak', 'model', '[{"value": null, "unit_price": 1}]');  -- PT409 not active
SELECT count(*) AS v2_dimensions FROM fluxrate_internal.charge_dimensions d JOIN fluxrate_internal.charges c ON c.id = d.charge_id
 WHERE c.plan_id = :'plan_v2';  -- 1: nothing written by the refusals
-- Migrated at the end of March: March is billed at version 1, April at version 2.
-- Cy's override (gpt-large 0.008, other 0.0005) is a contract price: it follows
-- Cy to the new version's charge (same origin, grouped on the same property).
SET fluxrate.pinned_now = '2026-03-15 00:00:00+00';
SELECT r->>'version' AS version, r->>'migrated' AS migrated FROM fluxrate.migrate_subscriptions(:'plan', 'period_end') r;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
VALUES (:'org', fluxrate_internal.uuid_v7(), :'c1', :'meter', 1000, '2026-03-20', '2026-03-20', '{"model": "gpt-large"}'),
       (:'org', fluxrate_internal.uuid_v7(), :'c1', :'meter', 4000, '2026-04-10', '2026-04-10', '{"model": "gpt-large"}'),
       (:'org', fluxrate_internal.uuid_v7(), :'c3', :'meter', 4000, '2026-04-10', '2026-04-10', '{"model": "gpt-large"}'),
       (:'org', fluxrate_internal.uuid_v7(), :'c3', :'meter', 2000, '2026-04-11', '2026-04-11', '{"model": "small"}');
SET fluxrate.pinned_now = '2026-04-01 00:00:00+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-05-01 00:00:00+00';
CALL fluxrate.close_due_periods();
-- Ada, March (v1): gpt-large 1,000 x 0.01 = 10.00
-- Ada, April (v2): 4,000 x 0.001 = 4.00
-- Cy, March (v1, override): no usage, 0.00
-- Cy, April (v2, carried override): gpt-large 4,000 x 0.008 = 32.00; small 2,000 x 0.0005 = 1.00; 33.00
SELECT cu.external_id, i.period_start::date, i.meta_data->>'plan_version' AS version, i.total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
 WHERE i.org_id = :'org' AND i.customer_id IN (:'c1', :'c3') AND i.period_start >= '2026-03-01' AND i.kind = 'subscription'
 ORDER BY 1, 2;
SELECT count(*) AS cy_overrides FROM fluxrate_internal.charge_overrides WHERE subscription_id = :'s3';  -- 2: v1's kept, v2's carried
