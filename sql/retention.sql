-- Retention (issue 17, docs/rollups.md "Retention"): an organization keeps its
-- raw events 10 days after their period is finalized; January 2032's
-- partition is archived by the minute job only when every organization in it
-- allows it; a late January event after the archival is billed once, from the
-- rollups, on February's invoice; and so is a late event of a charge priced by
-- event dimension, group by group, from the rollups keyed by group (issue 15
-- and 17).  Months of 2032, which no other test touches.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
-- the closes below close every organization's due periods: in the suite's
-- shared database, other tests' subscriptions warn (security.sql's
-- hostile ones are set aside every time); only errors are shown
SET client_min_messages = error;
SET fluxrate.pinned_now = '2032-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Keeper', grace_period => '0'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Hoarder', grace_period => '0'))->>'id' AS org_h \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT f->>'meter_token' AS tok, f->>'meter_id' AS meter FROM fluxrate.create_feature('Calls', 'calls', 'meter',
       meter_name => 'calls', property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT (fluxrate.create_plan('Usage', 'usage', 'USAGE', 'month', 'EUR'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'USAGE', unit_price => 0.50, meter_id => :'meter'))->>'status' AS charge;
-- and tokens priced by model: large at 0.10, small at 0.01, any other at 0.001
SELECT f->>'meter_token' AS tok_t, f->>'meter_id' AS meter_t FROM fluxrate.create_feature('Tokens', 'tokens', 'meter',
       meter_name => 'tokens', property_name => 't', aggregation_type => 'SUM') f \gset
SELECT d->'values' AS models FROM fluxrate.set_meter_dimension(:'meter_t', 'model', ARRAY['large', 'small']) d;
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => :'meter_t', display_name => 'Tokens', unit_price => 0))->>'id' AS charge_t \gset
SELECT jsonb_array_length(g->'groups') AS groups FROM fluxrate.set_charge_groups(:'charge_t', 'model', '[
    {"value": "large", "unit_price": 0.10}, {"value": "small", "unit_price": 0.01},
    {"value": null, "display_name": "Other models", "unit_price": 0.001}]') g;
SELECT (fluxrate.create_customer('Cust', 'cust@example.com', 'cust'))->>'id' AS cust \gset
SELECT (fluxrate.create_subscription(:'cust', :'plan', start_date => '2032-01-01 00:00+00'))->>'status' AS status;
-- the policy: 10 days after finalization; refusals
SELECT fluxrate.set_event_retention(-1);       -- 22023
SELECT fluxrate.set_event_retention(40000);    -- 22023
SELECT fluxrate.set_event_retention(10);
-- the job makes January, February and March 2032
SELECT x->>'partition' AS made FROM fluxrate.maintain_event_storage() p, jsonb_array_elements(p->'partitions'->'made') x
 WHERE x->>'partition' LIKE '%2032%';

-- January: 10 + 20 = 30 calls; the rollups count them
SET fluxrate.pinned_now = '2032-01-20 00:00:00+00';
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'cust', quantity => 10, "timestamp" => '2032-01-05 00:00+00',
        idempotency_key => 'jan-1'))->>'replay' AS replay;
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'cust', quantity => 20, "timestamp" => '2032-01-15 00:00+00'))->>'replay' AS replay;
-- and tokens: large 100, small 200, another model 50
SELECT count(fluxrate.track(meter_token => :'tok_t', customer_external_id => 'cust', quantity => q, "timestamp" => '2032-01-10 00:00+00',
                            metadata => jsonb_build_object('model', m)))
  FROM (VALUES ('large', 100), ('small', 200), ('medium', 50)) v(m, q);
-- February 1: January closes and finalizes (grace 0):
--   calls 30 x 0.50 = 15.00; tokens large 100 x 0.10 = 10.00, small 200 x 0.01 = 2.00,
--   other models 50 x 0.001 = 0.05; total 27.05
SET fluxrate.pinned_now = '2032-02-01 00:00:00+00';
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
CALL fluxrate.close_due_periods();
CALL fluxrate.finalize_due_invoices();
SELECT i.status, i.total, l.line_type, l.description, l.quantity, l.line_total FROM fluxrate_internal.invoices i
  JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.period_start = '2032-01-01' ORDER BY l.line_type, l.description;  -- (positions follow the charges' random ids)

-- February 5: finalized 4 days ago, not 10: January stays
SET fluxrate.pinned_now = '2032-02-05 00:00:00+00';
SELECT p->'retention'->'archived' AS archived FROM fluxrate.maintain_event_storage() p;
-- February 12: 11 days, but Hoarder (no retention) has a January event: January stays for everyone
SET fluxrate.pinned_now = '2032-02-12 00:00:00+00';
SELECT fluxrate.act_as(:'org_h', true) IS NOT NULL AS acting_h;
SELECT f->>'meter_token' AS tok_h, f->>'meter_id' AS meter_h FROM fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls',
       property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT (fluxrate.track(meter_token => :'tok_h', customer_external_id => 'h', quantity => 1, "timestamp" => '2032-01-07 00:00+00'))->>'replay' AS replay;
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
SELECT p->'retention'->'archived' AS archived FROM fluxrate.maintain_event_storage() p;
-- Hoarder sets a retention too (no subscription: its events may go 0 days after): January goes
SELECT (fluxrate.set_event_retention(0))->>'keep_days' AS keep_days_h;
SELECT jsonb_array_length(p->'retention'->'archived') AS archived, p->'retention'->'archived'->0->>'month' AS month
  FROM fluxrate.maintain_event_storage() p;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
-- the partition left usage_events by DETACH and waits aside for the operator's COPY
SELECT count(*) AS january_partitions FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'fluxrate_internal.usage_events'::regclass AND c.relname = 'usage_events_y2032m01';
SELECT c.relname AS archive, (SELECT count(*) FROM pg_inherits i WHERE i.inhrelid = c.oid) AS still_attached
  FROM pg_class c WHERE c.relname LIKE 'usage\_events\_y2032m01\_archived\_%';
SELECT count(*) AS raw_january_events FROM fluxrate_internal.usage_events WHERE org_id = :'org' AND "timestamp" < '2032-02-01';
-- what was archived, said by the policy and by list_meter_events
SELECT x->>'month' AS month, x->>'events' AS events FROM jsonb_array_elements(fluxrate.get_event_retention()->'archived') x;
SELECT (fluxrate.list_meter_events(:'meter'))->'archived'->0->>'events' AS listed_archived,
       (fluxrate.list_meter_events(:'meter'))->'meta'->>'total' AS listed_events;
-- the key of an archived event still replays (id and time from the key table)
SELECT e->>'replay' AS replay, e->>'timestamp' AS ts
  FROM fluxrate.track(meter_token => :'tok', customer_external_id => 'cust', quantity => 10, "timestamp" => '2032-01-05 00:00+00',
       idempotency_key => 'jan-1') e;
-- live usage of January from the rollups: still 30
SELECT fluxrate_internal.meter_usage(:'org', :'cust', :'meter', '2032-01-01', '2032-02-01') AS january_usage;
-- the meter's analytics count the stored events, and say what was archived
SELECT u->>'total_usage' AS stored_usage, json_array_length(u->'archived') AS archived_months,
       u->'archived'->0->>'month' AS archived_month, u->'archived'->0->>'events' AS archived_events
  FROM fluxrate.get_meter_usage(:'meter', '2032-01-01', '2032-02-01', 'month') u;
SELECT u->'archived' IS NULL AS nothing_archived_in_march
  FROM fluxrate.get_meter_usage(:'meter', '2032-03-01', '2032-04-01', 'month') u;
-- Hoarder sees its own archived January (1 event), never Keeper's, and not Keeper's meter
SELECT fluxrate.act_as(:'org_h', true) IS NOT NULL AS acting_h;
SELECT json_array_length(u->'archived') AS archived_months_h, u->'archived'->0->>'events' AS archived_events_h
  FROM fluxrate.get_meter_usage(:'meter_h', '2032-01-01', '2032-02-01', 'month') u;
SELECT fluxrate.get_meter_usage(:'meter', '2032-01-01', '2032-02-01', 'month');   -- PT404
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
-- and January's tokens by model, from the rollups keyed by group (no raw event left)
SELECT fluxrate_internal.meter_group_usage(:'org', :'cust', :'meter_t', '2032-01-01', '2032-02-01') AS january_tokens;

-- February 15: a late January event of 4 calls, and 6 calls in February
SET fluxrate.pinned_now = '2032-02-15 00:00:00+00';
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'cust', quantity => 4, "timestamp" => '2032-01-25 00:00+00',
        idempotency_key => 'late-1'))->>'replay' AS late_replay;
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'cust', quantity => 6, "timestamp" => '2032-02-10 00:00+00'))->>'replay' AS replay;
-- late January tokens: 5 of the large model; and 10 small ones in February
SELECT (fluxrate.track(meter_token => :'tok_t', customer_external_id => 'cust', quantity => 5, "timestamp" => '2032-01-28 00:00+00',
        metadata => '{"model": "large"}'))->>'replay' AS late_replay;
SELECT (fluxrate.track(meter_token => :'tok_t', customer_external_id => 'cust', quantity => 10, "timestamp" => '2032-02-11 00:00+00',
        metadata => '{"model": "small"}'))->>'replay' AS replay;
-- the late event is in the default partition (January has none any more); the
-- next job run gives January a partition again and moves it there
SELECT count(*) AS in_default FROM fluxrate_internal.usage_events_default WHERE org_id = :'org';
-- (the job's partition step, draining all of the default at once: the suite's
-- shared database has other tests' older months in it)
SELECT x->>'partition' AS made, x->>'moved' AS moved
  FROM fluxrate_internal.maintain_event_partitions(drain => 100) p, jsonb_array_elements(p->'made') x
 WHERE x->>'partition' LIKE '%2032%';
-- March 1: February closes with 6 calls and the late 4 of January, priced once:
--   usage      6 x 0.50 = 3.00
--   late usage 4 x 0.50 = 2.00   (January now 30 archived + 4 = 34, billed 30 before)
--   tokens: large 0 = 0.00, small 10 x 0.01 = 0.10, other models 0 = 0.00
--   late tokens, large only: 5 x 0.10 = 0.50   (January's large now 100 archived + 5
--     = 105, billed 100 before; small and other unchanged: no line)
--   total 3.00 + 2.00 + 0.10 + 0.50 = 5.60 (no tax rate)
SET fluxrate.pinned_now = '2032-03-01 00:00:00+00';
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
CALL fluxrate.close_due_periods();
CALL fluxrate.finalize_due_invoices();
SELECT i.status, i.total, l.line_type, l.description, l.quantity, l.line_total, l.meta->>'billed_before' AS billed_before
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.period_start = '2032-02-01' ORDER BY l.line_type, l.description;  -- (positions follow the charges' random ids)
-- April 1: March has no usage, and January's late 4 calls and 5 tokens are not
-- billed again: usage 0 x 0.50 = 0.00, tokens 0.00 each, no late line: total 0.00
SET fluxrate.pinned_now = '2032-04-01 00:00:00+00';
SELECT (fluxrate.refresh_usage_rollups())->>'skipped' AS skipped;
CALL fluxrate.close_due_periods();
CALL fluxrate.finalize_due_invoices();
SELECT i.status, i.total, l.line_type, l.quantity, l.line_total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.period_start = '2032-03-01' ORDER BY l.line_type, l.description;  -- (positions follow the charges' random ids)
SELECT count(*) AS late_lines_for_january FROM fluxrate_internal.invoice_lines
 WHERE org_id = :'org' AND line_type = 'late_usage' AND period_start = '2032-01-01';
RESET fluxrate.acting_org;
