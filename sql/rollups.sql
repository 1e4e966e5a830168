-- Usage rollups: daily (customer, meter) sums kept by a minute job, read by the
-- closer with the events not yet rolled up.  Every answer read through the
-- rollups is compared with a pass over the events, and the amounts are
-- computed by hand.  (Late commits, concurrent ingestion and the lock against
-- delete_customer: test/scripts/rollup_concurrency.sh.)
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Rollups', grace_period => '1 hour'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Rollups neighbour'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT count(fluxrate.create_feature(t, t, 'meter', meter_name => t, property_name => 'v', aggregation_type => t)) AS meters
  FROM unnest(ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG']) t;
SELECT (fluxrate.create_customer('a', 'a@example.com', 'a'))->>'id' AS ca \gset
SELECT (fluxrate.create_customer('b', 'b@example.com', 'b'))->>'id' AS cb \gset
-- one meter of the neighbour, to see that nothing crosses the wall
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('calls', 'calls', 'meter', meter_name => 'calls', property_name => 'v', aggregation_type => 'SUM'))->>'meter_id' AS mb \gset
SELECT (fluxrate.create_customer('x', 'x@example.com', 'x'))->>'id' AS cx \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;

-- A fresh install has no state: readers fall back to the events, and the first
-- refresh counts every event (an earlier test's refresh is undone here)
UPDATE fluxrate_internal.usage_rollup_state SET snapshot = NULL, system_identifier = NULL;
SELECT fluxrate_internal.rollup_snapshot() IS NULL AS no_snapshot;

-- January events on every meter, at day edges and with mixed scales:
--   a: Jan 1 00:00 (first instant) 1.50 | Jan 1 23:59:59.999999 2 | Jan 15 0.125 | Jan 31 23:59:59 10
--   b: Jan 2 3 | Jan 2 3.0
-- plus Dec 31 23:59:59 (a, 100) and Feb 1 00:00 (a, 1000): outside January
CREATE TEMP TABLE ev (c text, ts timestamptz, q numeric);
INSERT INTO ev VALUES ('a', '2026-01-01 00:00:00', 1.50), ('a', '2026-01-01 23:59:59.999999', 2),
  ('a', '2026-01-15 12:00', 0.125), ('a', '2026-01-31 23:59:59', 10),
  ('b', '2026-01-02 08:00', 3), ('b', '2026-01-02 09:00', 3.0),
  ('a', '2025-12-31 23:59:59', 100), ('a', '2026-02-01 00:00:00', 1000);
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), CASE ev.c WHEN 'a' THEN :'ca'::uuid ELSE :'cb'::uuid END, m.id, ev.q, ev.ts, ev.ts
  FROM ev, fluxrate_internal.meters m WHERE m.org_id = :'org';
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
VALUES (:'org_b', fluxrate_internal.uuid_v7(), :'cx', :'mb', 77, '2026-01-10', '2026-01-10');

-- the usage of January through the rollups (use_rollups => true) and by one pass
-- over the events (false), for every aggregation: the two must be identical
CREATE TEMP VIEW both_ways AS
SELECT m.meter_name AS agg, c.name AS customer, r.usage AS via_rollups, p.usage AS via_events
  FROM fluxrate_internal.meters m CROSS JOIN fluxrate_internal.customers c
  LEFT JOIN LATERAL (SELECT u.usage FROM fluxrate_internal.org_period_usage(m.org_id, '2026-01-01', '2026-02-01', m.meter_name, ARRAY[m.id], true) u
                      WHERE u.customer_id = c.id) r ON true
  LEFT JOIN LATERAL (SELECT u.usage FROM fluxrate_internal.org_period_usage(m.org_id, '2026-01-01', '2026-02-01', m.meter_name, ARRAY[m.id], false) u
                      WHERE u.customer_id = c.id) p ON true
 WHERE m.org_id = current_setting('fr.org')::uuid AND c.org_id = m.org_id;
SELECT set_config('fr.org', :'org', false) IS NOT NULL AS set;
-- by hand, January:
--   a: SUM 1.50 + 2 + 0.125 + 10 = 13.625; COUNT 4; MAX 10; MIN 0.125; AVG 13.625 / 4 = 3.40625
--   b: SUM 3 + 3.0 = 6.0; COUNT 2; MAX 3; MIN 3; AVG 6.0 / 2 = 3.0000000000000000
SELECT agg, customer, via_rollups, via_events, via_rollups::text = via_events::text AS identical FROM both_ways ORDER BY 1, 2;

-- the first refresh counts everything (a rebuild): 8 events x 5 meters here
SELECT r->'skipped' AS skipped, r->'rebuilt' AS rebuilt, (r->>'events')::bigint >= 41 AS counted_all
  FROM fluxrate.refresh_usage_rollups() r;
SELECT fluxrate_internal.rollup_snapshot() IS NOT NULL AS has_snapshot,
       (SELECT system_identifier FROM fluxrate_internal.usage_rollup_state) = fluxrate_internal.system_identifier() AS this_cluster;
-- a's SUM meter by day and by month: Jan 1 holds both edge events, Dec 31 and
-- Feb 1 their own; January 1.50 + 2 + 0.125 + 10 = 13.625 over 4 events
SELECT r.width, r.bucket, r.events, r.quantity_sum, r.quantity_max, r.quantity_min
  FROM fluxrate_internal.usage_rollups r JOIN fluxrate_internal.meters m ON m.org_id = r.org_id AND m.id = r.meter_id
 WHERE r.org_id = :'org' AND r.customer_id = :'ca' AND m.meter_name = 'SUM' ORDER BY r.width, r.bucket;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');
SELECT agg, customer, via_rollups, via_events, via_rollups::text = via_events::text AS identical FROM both_ways ORDER BY 1, 2;
-- nothing new: a second refresh counts nothing
SELECT (r->>'events')::bigint AS events, r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups() r;

-- The tail: events committed after the refresh are read from the events, once.
-- A backdated one for Jan 10 (a, 4.375) and one for Jan 31 (b, 0.5).
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), t.c, m.id, t.q, t.ts, '2026-02-01'
  FROM (VALUES (:'ca'::uuid, 4.375, timestamptz '2026-01-10 10:00'), (:'cb'::uuid, 0.5, timestamptz '2026-01-31 23:00')) t(c, q, ts),
       fluxrate_internal.meters m WHERE m.org_id = :'org';
-- by hand:
--   a: SUM 13.625 + 4.375 = 18.000; COUNT 5; MAX 10; MIN 0.125; AVG 18.000 / 5 = 3.6000000000000000
--   b: SUM 6.0 + 0.5 = 6.5; COUNT 3; MAX 3; MIN 0.5; AVG 6.5 / 3 = 2.1666666666666667
SELECT agg, customer, via_rollups, via_events, via_rollups::text = via_events::text AS identical FROM both_ways ORDER BY 1, 2;
-- counted by the next refresh, exactly once (2 events x 5 meters)
SELECT (r->>'events')::bigint AS events, r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');
SELECT agg, customer, via_rollups, via_events, via_rollups::text = via_events::text AS identical FROM both_ways ORDER BY 1, 2;
-- A refresh inside a transaction that tracks before and after it: its own
-- events are in neither half until it commits, then counted once by the next
-- refresh.  b: Jan 3, 0.25 before the refresh, 0.75 after (SUM 6.5 -> 7.5)
BEGIN;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cb', m.id, 0.25, '2026-01-03', '2026-02-01'
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
SELECT (r->>'events')::bigint AS events_counted_inside FROM fluxrate.refresh_usage_rollups() r;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cb', m.id, 0.75, '2026-01-03', '2026-02-01'
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
COMMIT;
SELECT agg, customer, via_rollups, via_events FROM both_ways WHERE agg = 'SUM' AND customer = 'b';
SELECT (r->>'events')::bigint AS events FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');
SELECT agg, customer, via_rollups, via_events FROM both_ways WHERE agg = 'SUM' AND customer = 'b';
-- (and out again, so that the hand computations below stand)
DELETE FROM fluxrate_internal.usage_events WHERE org_id = :'org' AND customer_id = :'cb' AND "timestamp" = '2026-01-03';
SELECT r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups(rebuild => true) r;

-- the neighbour's event is in the neighbour's rollups only
SELECT org_id = :'org_b' AS neighbour, events, quantity_sum FROM fluxrate_internal.usage_rollups WHERE customer_id = :'cx';

-- Whole-day periods that are not calendar months: whole months from the month
-- rows, the days around them from the day rows.  SUM and MAX of a over
-- [Dec 31, Feb 2) = 100 + 18.000 + 1000, [Jan 10, Feb 1) = 4.375 + 0.125 + 10,
-- [Dec 1, Feb 1) = 100 + 18.000, [Jan 31, Feb 1) = 10, [Dec 31, Jan 1) = 100
SELECT p.s AS period_start, p.e AS period_end, r.usage AS sum_via_rollups, x.usage AS sum_via_events,
       rm.usage AS max_via_rollups, xm.usage AS max_via_events
  FROM (VALUES (timestamptz '2025-12-31', timestamptz '2026-02-02'), ('2026-01-10', '2026-02-01'), ('2025-12-01', '2026-02-01'),
               ('2026-01-31', '2026-02-01'), ('2025-12-31', '2026-01-01')) p(s, e)
  CROSS JOIN (SELECT id FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'SUM') ms
  CROSS JOIN (SELECT id FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'MAX') mx
  LEFT JOIN LATERAL (SELECT usage FROM fluxrate_internal.org_period_usage(:'org', p.s, p.e, 'SUM', ARRAY[ms.id]) WHERE customer_id = :'ca') r ON true
  LEFT JOIN LATERAL (SELECT usage FROM fluxrate_internal.org_period_usage(:'org', p.s, p.e, 'SUM', ARRAY[ms.id], false) WHERE customer_id = :'ca') x ON true
  LEFT JOIN LATERAL (SELECT usage FROM fluxrate_internal.org_period_usage(:'org', p.s, p.e, 'MAX', ARRAY[mx.id]) WHERE customer_id = :'ca') rm ON true
  LEFT JOIN LATERAL (SELECT usage FROM fluxrate_internal.org_period_usage(:'org', p.s, p.e, 'MAX', ARRAY[mx.id], false) WHERE customer_id = :'ca') xm ON true
 ORDER BY 1, 2;

-- Periods that are not whole UTC days are read from the events (the same answer
-- either way; whole_utc_days decides)
SELECT fluxrate_internal.whole_utc_days('2026-01-01', '2026-02-01') AS month,
       fluxrate_internal.whole_utc_days('2026-01-15 12:00', '2026-02-15 12:00') AS anniversary_at_noon,
       fluxrate_internal.whole_utc_days('2026-01-02', '2026-01-01') AS backwards;
SELECT u.usage AS a_sum_from_jan_15_noon  -- 0.125 + 10 = 10.125
  FROM fluxrate_internal.meters m, fluxrate_internal.org_period_usage(:'org', '2026-01-15 12:00', '2026-02-01', 'SUM', ARRAY[m.id]) u
 WHERE m.org_id = :'org' AND m.meter_name = 'SUM' AND u.customer_id = :'ca';
-- ... and in another session TimeZone the days are still UTC days
SET TimeZone = 'Asia/Kolkata';
SELECT fluxrate_internal.whole_utc_days('2026-01-01 00:00+00', '2026-02-01 00:00+00') AS utc_month_in_kolkata;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');
SET TimeZone = 'UTC';

-- A state written by another cluster (a restored copy): not read, then rebuilt
UPDATE fluxrate_internal.usage_rollup_state SET system_identifier = system_identifier + 1;
SELECT fluxrate_internal.rollup_snapshot() IS NULL AS not_trusted;
SELECT agg, customer, via_rollups, via_events FROM both_ways WHERE agg = 'SUM' ORDER BY 1, 2;
SELECT r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');
-- an explicit rebuild gives the same rollups
CREATE TEMP TABLE before_rebuild AS SELECT * FROM fluxrate_internal.usage_rollups WHERE org_id = :'org';
SELECT r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups(rebuild => true) r;
-- (the refresh ANALYZEs the rollups when they outgrow their statistics; the
-- helper analyzes fluxrate's own tables only)
SELECT fluxrate_internal.analyze_if_outgrown('fluxrate_internal.usage_rollups') AS analyzed_small_table;
SELECT fluxrate_internal.analyze_if_outgrown('pg_catalog.pg_class');   -- 42501
SELECT count(*) AS changed_by_rebuild FROM
  ((SELECT * FROM before_rebuild EXCEPT SELECT * FROM fluxrate_internal.usage_rollups WHERE org_id = :'org')
   UNION ALL (SELECT * FROM fluxrate_internal.usage_rollups WHERE org_id = :'org' EXCEPT SELECT * FROM before_rebuild)) d;

-- The closer reads January through the rollups and the tail.  A calendar
-- subscription of b on a plan with a SUM charge at 0.40 per unit; one more tail
-- event (b, Jan 20, 1.5) after the last refresh:
--   usage 6.5 + 1.5 = 8.0 -> 8.0 x 0.40 = 3.20
SELECT (fluxrate.create_plan('Metered', 'metered', 'USAGE', 'month', 'USD'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => m.id, unit_price => 0.40))->>'status' AS charge
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
SELECT (fluxrate.create_subscription(:'cb', :'plan', start_date => '2026-01-01 00:00+00'))->>'status' AS status;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cb', m.id, 1.5, '2026-01-20', '2026-02-01'
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
RESET fluxrate.acting_org;
SET fluxrate.pinned_now = '2026-02-01 00:00:30+00';
-- the run's snapshot covers the period (1 of 1 subscribed customers due; the rollups make the share 1)
SELECT fluxrate_internal.sys_close_prepare() > 0 AS prepared;
SELECT count(*) AS covered FROM pg_temp.fr_close_scope WHERE org_id = :'org';
SELECT usage FROM pg_temp.fr_close_usage WHERE org_id = :'org' AND customer_id = :'cb';
-- Drafts only: the finalizer recomputes every draft from the events.  To see
-- both, one rollup row is damaged by hand (+100 on b's January): rollup_differences
-- shows it, the closing run reads it (draft 108.0 x 0.40 = 43.20), and the
-- finalized invoice is right anyway (3.20)
UPDATE fluxrate_internal.usage_rollups r SET quantity_sum = quantity_sum + 100
  FROM fluxrate_internal.meters m
 WHERE r.org_id = :'org' AND r.customer_id = :'cb' AND r.width = 'month' AND r.bucket = '2026-01-01'
   AND m.org_id = r.org_id AND m.id = r.meter_id AND m.meter_name = 'SUM';
SELECT width, bucket, rollup_sum, event_sum FROM fluxrate_internal.rollup_differences(:'org');
CALL fluxrate.close_due_periods();
SELECT l.description, l.quantity, l.unit_amount, l.line_total, i.total, i.status
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.customer_id = :'cb' AND l.line_type = 'usage';
SET fluxrate.pinned_now = '2026-02-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();
SELECT l.description, l.quantity, l.unit_amount, l.line_total, i.total, i.status
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.customer_id = :'cb' AND l.line_type = 'usage';
SELECT r->'rebuilt' AS rebuilt FROM fluxrate.refresh_usage_rollups(rebuild => true) r;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');

-- The next close reads the late-usage check's periods through the rollups too:
-- February's usage (b, Feb 10, 2; rolled up) and a late January event (b, Jan
-- 25, 5; after the refresh: the tail).  The run's snapshot covers January and
-- February; January now 8.0 + 5 = 13.0, billed 8.0 -> a late-usage line of
-- 5 x 0.40 = 2.00; February 2 x 0.40 = 0.80; total 2.80
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cb', m.id, 2, '2026-02-10', '2026-02-10'
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
SELECT (r->>'events')::bigint AS events FROM fluxrate.refresh_usage_rollups() r;
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cb', m.id, 5, '2026-01-25', '2026-02-28'
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'SUM';
SET fluxrate.pinned_now = '2026-03-01 00:00:30+00';
SELECT fluxrate_internal.sys_close_prepare() > 0 AS prepared;
SELECT sc.period_start, sc.period_end, su.usage
  FROM pg_temp.fr_close_scope sc
  LEFT JOIN pg_temp.fr_close_usage su ON su.org_id = sc.org_id AND su.meter_id = sc.meter_id
       AND su.period_start = sc.period_start AND su.period_end = sc.period_end AND su.customer_id = :'cb'
 WHERE sc.org_id = :'org' ORDER BY 1;
CALL fluxrate.close_due_periods();
SELECT l.line_type, l.quantity, l.unit_amount, l.line_total, l.period_start, i.total, i.status
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.customer_id = :'cb' AND i.period_start = '2026-02-01' ORDER BY l.position;

-- delete_customer removes the customer's rollups with its events
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT count(*) AS a_rollups_before FROM fluxrate_internal.usage_rollups WHERE org_id = :'org' AND customer_id = :'ca';
SELECT (fluxrate.delete_customer(:'ca'))->'deleted' AS deleted;
SELECT count(*) AS a_rollups_after FROM fluxrate_internal.usage_rollups WHERE org_id = :'org' AND customer_id = :'ca';
SELECT (r->>'events')::bigint AS events FROM fluxrate.refresh_usage_rollups() r;
SELECT count(*) AS differences FROM fluxrate_internal.rollup_differences(:'org');

-- The wall: as the neighbour's API key role would run it (fluxrate_owner,
-- confined by row-level security to the calling organization), the rollups of
-- this organization are not there, and its usage read through them is nothing
SELECT set_config('fluxrate.current_org', :'org_b', false) IS NOT NULL AS set;
SET ROLE fluxrate_owner;
SELECT count(*) AS visible_rollups, count(*) FILTER (WHERE org_id = :'org') AS of_the_other_org FROM fluxrate_internal.usage_rollups;
SELECT count(*) AS other_orgs_usage
  FROM fluxrate_internal.org_period_usage(:'org', '2026-01-01', '2026-02-01', 'SUM',
                                          ARRAY(SELECT id FROM fluxrate_internal.meters WHERE org_id = :'org'));
SELECT fluxrate_internal.rollup_snapshot() IS NOT NULL AS snapshot_readable;
-- not writable by tenants, and the refresh is not theirs to run
WITH u AS (UPDATE fluxrate_internal.usage_rollup_state SET snapshot = NULL RETURNING 1) SELECT count(*) AS rows_written FROM u;
RESET ROLE;
SELECT set_config('fluxrate.current_org', '', false) IS NOT NULL AS reset;
SET ROLE fluxrate_web;
SELECT fluxrate.refresh_usage_rollups();   -- 42501
RESET ROLE;
SELECT snapshot IS NOT NULL AS state_intact FROM fluxrate_internal.usage_rollup_state;
RESET fluxrate.acting_org;
RESET fluxrate.pinned_now;
