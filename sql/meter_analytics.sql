-- Meter analytics (GET /meters/{id}/usage and /stats), worked examples computed by hand.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

-- now = Wednesday 2026-03-18 12:00 UTC: today from Mar 18 00:00, the ISO week from Monday Mar 16,
-- the month from Mar 1; the default range is the 30 days before now: [Feb 16 12:00, Mar 18 12:00)
SET fluxrate.pinned_now = '2026-03-18 12:00:00+00';
SELECT (fluxrate.create_organization('Analytics'))->>'id' AS org \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_customer('c1', 'c1@example.com', 'c1'))->>'id' AS c1 \gset
SELECT (fluxrate.create_customer('c2', 'c2@example.com', 'c2'))->>'id' AS c2 \gset
SELECT count(fluxrate.create_feature(t, t, 'meter', meter_name => t, property_name => 'v', aggregation_type => t)) AS meters
  FROM unnest(ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'LAST', 'WEIGHTED_SUM']) t;
SELECT (fluxrate.create_feature('users', 'users', 'meter', meter_name => 'users', aggregation_type => 'UNIQUE_COUNT'))->>'meter_id' AS users \gset
SELECT (fluxrate.create_feature('eu', 'eu', 'meter', meter_name => 'eu', property_name => 'v', aggregation_type => 'SUM',
        filters => '[{"property": "region", "operator": "in", "values": ["eu"]}]'))->>'meter_id' AS eu \gset
SELECT id AS "SUM" FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'SUM' \gset
SELECT id AS "WS" FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'WEIGHTED_SUM' \gset
-- the same eight events on every meter
CREATE TEMP TABLE ev (n int, c text, ts timestamptz, q numeric, meta jsonb);
INSERT INTO ev VALUES
  (1, 'c1', '2026-03-02 10:00+00', 10, '{"user_id": "a", "region": "eu"}'),   -- Monday
  (2, 'c1', '2026-03-02 10:30+00', 4,  '{"user_id": "b", "region": "us"}'),
  (3, 'c2', '2026-03-02 11:00+00', 6,  '{"user_id": "a", "region": "eu"}'),
  (4, 'c2', '2026-03-09 00:00+00', 20, '{"user_id": "c"}'),                    -- Monday
  (5, 'c1', '2026-03-16 08:00+00', 5,  '{"user_id": "a", "region": "eu"}'),   -- Monday, this week
  (6, 'c1', '2026-03-18 06:00+00', 3,  '{"region": "eu"}'),                    -- today
  (7, 'c2', '2026-03-18 09:00+00', 2,  '{"user_id": "d", "region": "us"}'),   -- today
  (8, 'c1', '2026-02-27 00:00+00', 8,  '{"user_id": "e", "region": "eu"}');   -- February
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
SELECT :'org', fluxrate_internal.uuid_v7(), CASE ev.c WHEN 'c1' THEN :'c1'::uuid ELSE :'c2'::uuid END, m.id, ev.q, ev.ts,
       timestamptz '2026-03-18 11:00' + ev.n * interval '1 second', ev.meta
  FROM ev, fluxrate_internal.meters m WHERE m.org_id = :'org' ORDER BY ev.n;

-- Usage, defaults with every bucket (include_empty => true): the last 30 days by day = 31 buckets
-- Feb 16 .. Mar 18 (Feb 16 starts before start_date: a bucket is the whole calendar unit, its usage
-- only the part inside the range); all 8 events: 10 + 4 + 6 + 20 + 5 + 3 + 2 + 8 = 58 from 2 customers
SELECT u->>'meter_id' = :'SUM' AS same_meter, u->'total_usage' AS total_usage, u->'event_count' AS event_count,
       u->'unique_customers' AS unique_customers, u->>'period_start' AS period_start, u->>'period_end' AS period_end,
       json_array_length(u->'grouped_data') AS buckets, u->'grouped_data'->0 AS first_bucket
  FROM fluxrate.get_meter_usage(:'SUM', include_empty => true) u;
-- non-empty days: Feb 27 8; Mar 2 10 + 4 + 6 = 20; Mar 9 20; Mar 16 5; Mar 18 3 + 2 = 5
SELECT b->>'period' AS period, b->'usage' AS usage, b->'event_count' AS event_count
  FROM json_array_elements((fluxrate.get_meter_usage(:'SUM', include_empty => true))->'grouped_data') b
 WHERE (b->>'event_count')::int > 0;
-- the default is compact: exactly those 5 buckets, the same totals (8 + 20 + 20 + 5 + 5 = 58)
SELECT u->'total_usage' AS total_usage, u->'event_count' AS event_count, json_array_length(u->'grouped_data') AS buckets,
       (SELECT string_agg(left(b->>'period', 10) || ' ' || (b->>'usage'), ', ' ORDER BY b->>'period')
          FROM json_array_elements(u->'grouped_data') b) AS days
  FROM fluxrate.get_meter_usage(:'SUM') u;
-- by hour over [Mar 2 10:00, Mar 2 12:00): 10:00 -> 10 + 4 = 14 (2 events), 11:00 -> 6 (1); total 20, 3 events, 2 customers
SELECT u->'total_usage' AS total_usage, u->'event_count' AS event_count, u->'unique_customers' AS unique_customers,
       u->'grouped_data' AS grouped_data
  FROM fluxrate.get_meter_usage(:'SUM', '2026-03-02 10:00+00', '2026-03-02 12:00+00', 'hour') u;
-- by day (the default) over [Mar 17, Mar 19): Mar 17 -> 0, Mar 18 -> 3 + 2 = 5 (2 events); compact: Mar 18 only
SELECT (fluxrate.get_meter_usage(:'SUM', '2026-03-17', '2026-03-19', include_empty => true))->'grouped_data' AS by_day;
SELECT (fluxrate.get_meter_usage(:'SUM', '2026-03-17', '2026-03-19'))->'grouped_data' AS by_day_compact;
-- nothing in the range: no bucket at all, unless asked (Mar 19 .. Mar 21: 2 empty days)
SELECT json_array_length((fluxrate.get_meter_usage(:'SUM', '2026-03-19', '2026-03-21'))->'grouped_data') AS compact,
       json_array_length((fluxrate.get_meter_usage(:'SUM', '2026-03-19', '2026-03-21', include_empty => true))->'grouped_data') AS padded;
-- by ISO week over [Mar 1, Mar 19): weeks start Monday Feb 23 (nothing from Mar 1 on), Mar 2 (20, 3 events),
-- Mar 9 (20, 1), Mar 16 (5 + 3 + 2 = 10, 3); total 50, 7 events (the Feb 27 one is before the range)
SELECT u->'total_usage' AS total_usage, u->'event_count' AS event_count, u->'grouped_data' AS by_week
  FROM fluxrate.get_meter_usage(:'SUM', '2026-03-01', '2026-03-19', 'week', include_empty => true) u;
-- by month over [Feb 1, Apr 1): Feb 8 (1 event), Mar 50 (7); total 58
SELECT u->'total_usage' AS total_usage, u->'grouped_data' AS by_month
  FROM fluxrate.get_meter_usage(:'SUM', '2026-02-01', '2026-04-01', 'month') u;
-- one customer: c2 over [Mar 1, Mar 19) by week: Mar 2 6, Mar 9 20, Mar 16 2; total 28, 3 events, 1 customer
SELECT u->'total_usage' AS total_usage, u->'event_count' AS event_count, u->'unique_customers' AS unique_customers,
       u->'grouped_data' AS c2_by_week
  FROM fluxrate.get_meter_usage(:'SUM', '2026-03-01', '2026-03-19', 'week', :'c2', include_empty => true) u;

-- Every aggregation type over [Mar 1, Mar 19) by week (buckets Feb 23 | Mar 2 | Mar 9 | Mar 16):
--   COUNT         7         = 0 | 3 | 1 | 3
--   MAX           20        : 0 | 10 | 20 | 5;   MIN 2: 0 | 4 | 20 | 2
--   AVG           50/7      : 0 | 20/3 | 20 | 10/3
--   UNIQUE_COUNT  a b c d = 4 (events without user_id do not count): 0 | a b = 2 | c = 1 | a d = 2
--   LAST (per customer, added): c1 3 + c2 2 = 5: 0 | c1 4 + c2 6 = 10 | c2 20 | c1 3 + c2 2 = 5
--   WEIGHTED_SUM (level x hours per customer, added; c1 carries 8 in from Feb 27):
--     Feb 23 week, clipped to [Mar 1, Mar 2): c1 8 x 24 = 192
--     Mar 2: c1 8 x 10 + 10 x 0.5 + 4 x 157.5 = 715; c2 6 x 157 = 942           -> 1657
--     Mar 9: c1 4 x 168 = 672; c2 20 x 168 = 3360                                 -> 4032
--     Mar 16, to Mar 19: c1 4 x 8 + 5 x 46 + 3 x 18 = 316; c2 20 x 57 + 2 x 15 = 1170 -> 1486
--     total 192 + 1657 + 4032 + 1486 = 7367 (c1 1895 + c2 5472)
--   eu (SUM of region eu): 10 + 6 + 5 + 3 = 24, 4 events: 0 | 16 | 0 | 8
SELECT m.meter_name, u->'total_usage' AS total_usage, u->'event_count' AS events,
       (SELECT string_agg(b->>'usage', ' | ' ORDER BY b->>'period') FROM json_array_elements(u->'grouped_data') b) AS weeks
  FROM fluxrate_internal.meters m, fluxrate.get_meter_usage(m.id, '2026-03-01', '2026-03-19', 'week', include_empty => true) u
 WHERE m.org_id = :'org' ORDER BY m.meter_name;
-- compact: the Feb 23 week goes where it has neither events nor usage; WEIGHTED_SUM keeps it
-- (192, c1's level carried in), and eu drops its empty Mar 9 week too: 16 | 8
SELECT m.meter_name, (SELECT string_agg(b->>'usage', ' | ' ORDER BY b->>'period') FROM json_array_elements(u->'grouped_data') b) AS weeks
  FROM fluxrate_internal.meters m, fluxrate.get_meter_usage(m.id, '2026-03-01', '2026-03-19', 'week') u
 WHERE m.org_id = :'org' ORDER BY m.meter_name;

-- Stats: all-time counts of the events the meter counts, and usage so far ([start, now))
--   total_events 8 (eu: 5, the region-eu ones), 2 customers, first Feb 27 00:00, last Mar 18 09:00
--   today [Mar 18, 12:00): events 6, 7; this week [Mar 16, ...): 5, 6, 7; this month [Mar 1, ...): 1 to 7
--     SUM 3 + 2 = 5 | 5 + 3 + 2 = 10 | 50;   COUNT 2 | 3 | 7;   MAX 3 | 5 | 20;   MIN 2 | 2 | 2
--     AVG 2.5 | 10/3 | 50/7;   UNIQUE_COUNT d = 1 | a d = 2 | a b c d = 4;   LAST c1 3 + c2 2 = 5 | 5 | 5
--     WEIGHTED_SUM today: c1 5 x 6 + 3 x 6 = 48, c2 20 x 9 + 2 x 3 = 186 -> 234
--                  week:  c1 4 x 8 + 5 x 46 + 3 x 6 = 280, c2 20 x 57 + 2 x 3 = 1146 -> 1426
--                  month: the 7367 above less 12 h after now (c1 3 x 12 + c2 2 x 12 = 60) -> 7307
--     eu 3 | 5 + 3 = 8 | 10 + 6 + 5 + 3 = 24
SELECT m.meter_name, s->>'meter_id' = m.id::text AS same_meter, s->'total_events' AS total_events,
       s->'unique_customers' AS customers, s->>'first_event_date' AS first_event, s->>'last_event_date' AS last_event,
       s->'today_usage' AS today, s->'this_week_usage' AS this_week, s->'this_month_usage' AS this_month
  FROM fluxrate_internal.meters m, fluxrate.get_meter_stats(m.id) s
 WHERE m.org_id = :'org' ORDER BY m.meter_name;

-- Refusals
SELECT fluxrate.get_meter_usage(:'SUM', group_by => 'year');                               -- 22023
SELECT fluxrate.get_meter_usage(:'SUM', '2026-03-02', '2026-03-02');                       -- PT422 (empty range)
SELECT fluxrate.get_meter_usage(:'SUM', '2026-03-03', '2026-03-02');                       -- PT422
SELECT fluxrate.get_meter_usage(:'SUM', end_date => '2026-01-01');                         -- PT422 (default start is after it)
SELECT fluxrate.get_meter_usage(:'SUM', '2020-01-01', '2022-01-01', 'hour');               -- PT422: 17,544 hours > 10,000
SELECT fluxrate.get_meter_usage(:'SUM', '-infinity', '2026-01-01', 'month');              -- PT422
SELECT json_array_length((fluxrate.get_meter_usage(:'SUM', '2020-01-01', '2021-02-20 16:00', 'hour', include_empty => true))->'grouped_data') AS hours;  -- exactly 10,000: allowed
SELECT fluxrate.get_meter_usage(gen_random_uuid());                                        -- PT404
SELECT fluxrate.get_meter_usage(:'SUM', customer_id => gen_random_uuid());                 -- PT404
SELECT fluxrate.get_meter_stats(gen_random_uuid());                                        -- PT404
RESET fluxrate.acting_org;
SELECT fluxrate.get_meter_stats(:'SUM');                                                   -- PT401: no organization

-- Another organization: cannot read org A's meter or filter on its customer; its own empty meter reads zeros
SELECT (fluxrate.create_organization('Analytics B'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.get_meter_usage(:'SUM');                                                   -- PT404
SELECT fluxrate.get_meter_stats(:'SUM');                                                   -- PT404
SELECT (fluxrate.create_feature('b', 'b', 'meter', meter_name => 'b', property_name => 'v', aggregation_type => 'SUM'))->>'meter_id' AS b_meter \gset
SELECT fluxrate.get_meter_usage(:'b_meter', customer_id => :'c1');                         -- PT404
SELECT s->'total_events' AS total_events, s->'unique_customers' AS customers, s->'first_event_date' AS first_event,
       s->'today_usage' AS today, s->'this_month_usage' AS this_month
  FROM fluxrate.get_meter_stats(:'b_meter') s;
SELECT u->'total_usage' AS total_usage, u->'event_count' AS event_count, json_array_length(u->'grouped_data') AS buckets,
       (SELECT bool_and((b->>'usage')::numeric = 0) FROM json_array_elements(u->'grouped_data') b) AS all_zero
  FROM fluxrate.get_meter_usage(:'b_meter', '2026-03-01', '2026-03-08', 'day', include_empty => true) u;
RESET fluxrate.acting_org;
RESET fluxrate.pinned_now;
