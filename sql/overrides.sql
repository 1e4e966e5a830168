-- Per-subscription overrides (issue 15, item 2; docs/rating.md "Overrides"):
-- a tier table, a per-unit price with free units, a package, a FIXED fee and
-- the minimum commitment, each overridden for one subscription while the
-- others on the plan pay the plan's price; previews, the closer (from the
-- rollups) and the finalizer (from the events) agree; a change during the
-- grace period; every refusal writes nothing; org B cannot see or change
-- org A's.  Every amount by hand, beside it.
SET TimeZone = 'UTC';
SET client_min_messages = error;  -- (other tests' deliberately broken subscriptions warn whenever a closer runs)
\set VERBOSITY sqlstate

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Acme'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT f->>'meter_id' AS meter FROM fluxrate.create_feature('API calls', 'calls', 'meter', meter_name => 'calls',
       property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT (fluxrate.create_plan('Pro', 'pro', 'HYBRID', 'month', 'USD', minimum_commitment => 50))->>'id' AS plan \gset
-- the plan's tiers: 0-1,000 at 0.002, 1,001-10,000 at 0.001, above at 0.0005 (graduated)
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => :'meter', display_name => 'Calls', pricing_model => 'graduated',
        tiers => '[{"up_to": 1000, "unit_price": 0.002}, {"up_to": 10000, "unit_price": 0.001}, {"up_to": null, "unit_price": 0.0005}]'))->>'id' AS calls \gset
SELECT (fluxrate.add_charge(:'plan', 'FIXED', unit_price => 30, display_name => 'Platform', billing_timing => 'in_arrears'))->>'id' AS fee \gset
SELECT (fluxrate.create_plan('Other', 'other', 'USAGE', 'month', 'USD'))->>'id' AS plan2 \gset
SELECT (fluxrate.add_charge(:'plan2', 'USAGE', meter_id => :'meter', unit_price => 1))->>'id' AS other_charge \gset
SELECT (fluxrate.create_customer('Tiered', 't@example.com', 'tiered'))->>'id' AS c1 \gset
SELECT (fluxrate.create_customer('List', 'l@example.com', 'list'))->>'id' AS c2 \gset
SELECT (fluxrate.create_customer('Unit', 'u@example.com', 'unit'))->>'id' AS c3 \gset
SELECT (fluxrate.create_customer('Pack', 'p@example.com', 'pack'))->>'id' AS c4 \gset
SELECT (fluxrate.create_subscription(:'c1', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s1 \gset
SELECT (fluxrate.create_subscription(:'c2', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s2 \gset
SELECT (fluxrate.create_subscription(:'c3', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s3 \gset
SELECT (fluxrate.create_subscription(:'c4', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS s4 \gset

-- The overrides.  s1: its own tier table (the issue's example), a $20 fee and a $100 minimum.
SELECT o->>'pricing_model' AS model, o->'tiers' AS tiers, o->>'free_units' AS free_units
  FROM fluxrate.set_charge_override(:'s1', :'calls', tiers => '[{"up_to": 5000, "unit_price": 0.001}, {"up_to": null, "unit_price": 0.0002}]') o;
SELECT (fluxrate.set_charge_override(:'s1', :'fee', unit_price => 20))->>'unit_price' AS fee_override;
SELECT (fluxrate.set_minimum_commitment_override(:'s1', 100))->>'minimum_commitment' AS minimum_override;
-- s3: per unit at 0.0015 with 2,000 free units, and no minimum at all
SELECT o->>'pricing_model' AS model, o->>'unit_price' AS unit_price, o->>'free_units' AS free_units, o->'tiers' AS tiers
  FROM fluxrate.set_charge_override(:'s3', :'calls', pricing_model => 'per_unit', unit_price => 0.0015, free_units => 2000) o;
SELECT (fluxrate.set_minimum_commitment_override(:'s3', NULL))->>'minimum_commitment' AS no_minimum;
-- s4: packages of 1,000 at 1.25, 500 free
SELECT (fluxrate.set_charge_override(:'s4', :'calls', pricing_model => 'package', package_size => 1000, package_price => 1.25,
        free_units => 500))->>'pricing_model' AS model;

-- Refusals, each writing nothing
SELECT fluxrate.set_charge_override(:'s2', :'other_charge', unit_price => 0.5);          -- PT422 a charge the plan does not have
SELECT fluxrate.set_charge_override(:'s2', gen_random_uuid(), unit_price => 0.5);        -- PT404 no such charge
SELECT fluxrate.set_charge_override(gen_random_uuid(), :'calls', unit_price => 0.5);     -- PT404 no such subscription
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'per_unit');       -- 22004 a new model needs its unit_price
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'weekly', unit_price => 1); -- 22023 no such model
SELECT fluxrate.set_charge_override(:'s2', :'calls', tiers => '[{"up_to": 10, "unit_price": 1}, {"up_to": 5, "unit_price": 1}, {"up_to": null, "unit_price": 1}]'); -- PT422 unsorted
SELECT fluxrate.set_charge_override(:'s2', :'calls', tiers => '[{"up_to": 10, "unit_price": 1}]'); -- PT422 last tier bounded
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'per_unit', unit_price => 'NaN');      -- PT422
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'per_unit', unit_price => 'Infinity'); -- PT422
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'per_unit', unit_price => 1e15);       -- PT422 too large
SELECT fluxrate.set_charge_override(:'s2', :'calls', pricing_model => 'per_unit', unit_price => -1);         -- PT422 negative
SELECT fluxrate.set_charge_override(:'s2', :'calls', free_units => 0.0000000000001);                         -- PT422 13 places
SELECT fluxrate.set_charge_override(:'s2', :'fee', unit_price => 10, free_units => 5);   -- 22023 FIXED takes unit_price only
SELECT fluxrate.set_charge_override(:'s2', :'fee');                                      -- 22004 unit_price required
SELECT fluxrate.set_charge_override(:'s2', :'calls', groups => '[{"value": null, "unit_price": 1}]'); -- 22023 not a grouped charge
SELECT fluxrate.set_minimum_commitment_override(:'s2', -5);                               -- PT422
SELECT fluxrate.remove_charge_override(:'s2', :'calls');                                 -- PT404 nothing to remove
SELECT count(*) AS s2_overrides FROM fluxrate_internal.charge_overrides WHERE subscription_id = :'s2';
SELECT count(*) AS s2_minimums FROM fluxrate_internal.minimum_overrides WHERE subscription_id = :'s2';
-- the plan's own prices never changed
SELECT c.pricing_model, c.tiers, c.unit_price, c.free_units FROM fluxrate_internal.charges c WHERE c.id = :'calls';
SELECT minimum_commitment FROM fluxrate_internal.plans WHERE id = :'plan';

-- Tenancy: org B sees and changes none of it
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.set_charge_override(:'s1', :'calls', unit_price => 0);                   -- PT404 not B's subscription
SELECT fluxrate.remove_charge_override(:'s1', :'calls');                                 -- PT404
SELECT fluxrate.set_minimum_commitment_override(:'s1', 0);                               -- PT404
SELECT fluxrate.list_charge_overrides(:'s1');                                            -- PT404
SET ROLE fluxrate_owner;
SELECT count(*) AS visible_to_b FROM fluxrate_internal.charge_overrides;                 -- RLS: 0
RESET ROLE;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT jsonb_array_length(o->'charges') AS s1_charges, o->'minimum_commitment'->>'minimum_commitment' AS s1_minimum
  FROM fluxrate.list_charge_overrides(:'s1') o;

-- 12,000 calls each in January (3 events at 4,000)
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), c, :'meter', 4000, '2026-01-10'::timestamptz + d * interval '1 day', '2026-01-10'
  FROM unnest(ARRAY[:'c1', :'c2', :'c3', :'c4']::uuid[]) c, generate_series(0, 2) d;

-- Preview (mid-January): s1 by its tier table:
--   5,000 x 0.001 = 5.000 + 7,000 x 0.0002 = 1.400 -> 6.40; fee 20.00; sum 26.40;
--   minimum 100 -> true-up 73.60; total 100.00
SET fluxrate.pinned_now = '2026-01-20 00:00:00+00';
SELECT l->>'description' AS line, l->>'quantity' AS quantity, l->>'line_total' AS amount
  FROM jsonb_array_elements((fluxrate.preview_invoice(:'s1'))->'line_items') l;
SELECT (fluxrate.preview_invoice(:'s1'))->>'total' AS s1_preview_total;

-- The close (from the rollups: refreshed first), February 1
SET fluxrate.pinned_now = '2026-02-01 00:00:00+00';
SELECT ((fluxrate.refresh_usage_rollups())->>'events')::integer >= 12 AS rolled_up;
CALL fluxrate.close_due_periods();
-- s1: 6.40 + 20.00 + true-up 73.60 = 100.00
-- s2 (the plan): 1,000 x 0.002 = 2 + 9,000 x 0.001 = 9 + 2,000 x 0.0005 = 1 -> 12.00; fee 30.00;
--     42.00 < 50 -> true-up 8.00; total 50.00
-- s3: (12,000 - 2,000) x 0.0015 = 15.00; fee 30.00; no minimum; total 45.00
-- s4: 12,000 - 500 = 11,500 -> 12 packages x 1.25 = 15.00; fee 30.00; 45.00 < 50 -> 5.00; total 50.00
SELECT cu.external_id, l.position, l.description, l.quantity, l.unit_amount, l.line_total
  FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
  JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id
 WHERE i.org_id = :'org' ORDER BY cu.external_id, l.position;
SELECT cu.external_id, i.status, i.subtotal, i.total FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id WHERE i.org_id = :'org' ORDER BY cu.external_id;

-- Changed during the grace period: the price in force when the draft is rated
-- again (at finalization) prices the whole period, as a plan's price would.
-- s4's packages become 2,000 at 2.00: 11,500 -> 6 packages x 2 = 12.00; fee 30.00;
-- 42.00 < 50 -> true-up 8.00; total 50.00 (the usage line 15.00 -> 12.00)
SELECT (fluxrate.set_charge_override(:'s4', :'calls', package_size => 2000, package_price => 2))->>'package_size' AS new_package;
-- s3's override removed: the plan's tiers again -> 12.00; fee 30.00; its own minimum stays "none": total 42.00
SELECT (fluxrate.remove_charge_override(:'s3', :'calls'))->>'deleted' AS removed;
SET fluxrate.pinned_now = '2026-02-01 02:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT cu.external_id, l.position, l.description, l.line_total
  FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id
  JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id
 WHERE i.org_id = :'org' AND cu.external_id IN ('pack', 'unit') ORDER BY cu.external_id, l.position;
SELECT cu.external_id, i.status, i.subtotal, i.total FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.customers cu ON cu.id = i.customer_id WHERE i.org_id = :'org' ORDER BY cu.external_id;
-- an OPEN invoice never changes: a later override applies from the next period on
SELECT (fluxrate.set_charge_override(:'s1', :'fee', unit_price => 25))->>'unit_price' AS later_fee;
SELECT total FROM fluxrate_internal.invoices WHERE subscription_id = :'s1';                -- still 100.00

-- Late usage of an OPEN period is priced as the subscription's charge is priced
-- now (its override): 1,000 more calls of January for s1 -> on February's invoice
-- 12,000 -> 13,000 in the override's top tier: 1,000 x 0.0002 = 0.20
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
VALUES (:'org', fluxrate_internal.uuid_v7(), :'c1', :'meter', 1000, '2026-01-31 12:00', '2026-02-10');
SET fluxrate.pinned_now = '2026-03-01 00:00:00+00';
CALL fluxrate.close_due_periods();
-- February for s1: no calls -> 0.00; fee 25.00; late 0.20 (January's); true-up of February's own
-- charges 100 - 25.00 = 75.00 (late usage counts for its own period, not this one); total 100.20
SELECT l.position, l.line_type, l.description, l.quantity, l.line_total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.invoice_id = i.id
 WHERE i.subscription_id = :'s1' AND i.period_start = '2026-02-01' ORDER BY l.position;
-- the finalizer's recomputation (from the events) writes the same lines
SELECT total AS before_finalize FROM fluxrate_internal.invoices WHERE subscription_id = :'s1' AND period_start = '2026-02-01';
SET fluxrate.pinned_now = '2026-03-01 02:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT status, total AS after_finalize FROM fluxrate_internal.invoices WHERE subscription_id = :'s1' AND period_start = '2026-02-01';

-- A canceled subscription's prices no longer change
SELECT (fluxrate.cancel_subscription(:'s2'))->>'status' AS canceled;
SELECT fluxrate.set_charge_override(:'s2', :'calls', unit_price => 0.1, pricing_model => 'per_unit');  -- PT409
SELECT fluxrate.set_minimum_commitment_override(:'s2', 1);                                             -- PT409
SELECT count(*) AS s2_overrides FROM fluxrate_internal.charge_overrides WHERE subscription_id = :'s2';
-- deleting a subscription deletes its overrides
SELECT count(*) AS s4_before FROM fluxrate_internal.charge_overrides WHERE subscription_id = :'s4';
SELECT (fluxrate.delete_subscription(:'s4'))->>'deleted' AS deleted;                    -- (s4_before: 1)
SELECT count(*) AS s4_after FROM fluxrate_internal.charge_overrides WHERE subscription_id = :'s4';
