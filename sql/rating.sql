-- Rating and aggregation, worked examples computed by hand.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

-- Rounding: once, to the ISO 4217 minor unit, half away from zero
SELECT a, c, fluxrate_internal.round_money(a, c) AS rounded
  FROM (VALUES (0.125, 'USD'), (-0.125, 'USD'), (0.124999, 'USD'), (1234.5, 'JPY'), (-0.5, 'JPY'),
               (1.23450, 'KWD'), (1.2345, 'KWD'), (2.675, 'EUR'), (10.005, 'GBP'), (0.995, 'INR')) v(a, c);
SELECT c, fluxrate_internal.currency_exponent(c) AS exponent FROM unnest(ARRAY['USD', 'EUR', 'GBP', 'INR', 'JPY', 'KWD', 'BHD', 'CLP']) c;
SELECT fluxrate_internal.currency_exponent('XYZ');                  -- 22023
SELECT fluxrate_internal.round_money('NaN', 'USD');                  -- 22003

-- per unit, with free units; a unit price of 10^-12 on 10^15 units = 1000
SELECT fluxrate_internal.rate_usage('per_unit', 0.002, NULL, NULL, NULL, 0, 5000) AS calls_5000,       -- 10.000
       fluxrate_internal.rate_usage('per_unit', 0.002, NULL, NULL, NULL, 1000, 5000) AS free_1000,     -- 4000 x 0.002 = 8.000
       fluxrate_internal.rate_usage('per_unit', 0.002, NULL, NULL, NULL, 9000, 5000) AS free_above,    -- 0
       fluxrate_internal.rate_usage('per_unit', 0.000000000001, NULL, NULL, NULL, 0, 1e15) AS tiny;    -- 1000
-- graduated: 0-1,000 at 0.002, 1,001-10,000 at 0.001 (+5 flat), above at 0.0005
\set tiers '[{"up_to": 1000, "unit_price": 0.002}, {"up_to": 10000, "unit_price": 0.001, "flat_fee": 5}, {"up_to": null, "unit_price": 0.0005}]'
SELECT u, fluxrate_internal.rate_usage('graduated', NULL, :'tiers', NULL, NULL, 0, u) AS graduated,
       fluxrate_internal.rate_usage('volume', NULL, :'tiers', NULL, NULL, 0, u) AS volume
  FROM unnest(ARRAY[0, 1, 1000, 1001, 10000, 10001, 1000000000000000]::numeric[]) u;
-- by hand:            graduated                        | volume
--   0                 0                                | 0
--   1                 0.002                            | 0.002
--   1000 (on bound)   2.000                            | 2.000
--   1001              2 + 0.001 + 5 = 7.001            | 1001 x 0.001 + 5 = 6.001
--   10000 (on bound)  2 + 9000 x 0.001 + 5 = 16.000    | 10000 x 0.001 + 5 = 15.000
--   10001             16 + 0.0005 = 16.0005            | 10001 x 0.0005 = 5.0005
--   10^15             16 + (10^15 - 10^4) x 0.0005     | 10^15 x 0.0005 = 500000000000
-- package of 100 at 5.00, 10 free: partial packages round up
SELECT u, fluxrate_internal.rate_usage('package', NULL, NULL, 100, 5, 10, u) AS package
  FROM unnest(ARRAY[0, 10, 11, 110, 111, 210.5]::numeric[]) u;   -- 0, 0, 5, 5, 10, 15
SELECT fluxrate_internal.rate_usage('flat', 30, NULL, NULL, NULL, 0, 0) AS flat;   -- 30
SELECT fluxrate_internal.rate_usage('tiered', 1, NULL, NULL, NULL, 0, 1);           -- 22023
SELECT fluxrate_internal.rate_usage('package', NULL, NULL, 0, 5, 0, 1);             -- PT422

-- Aggregation over a period, every type, with a filter
SET fluxrate.pinned_now = '2026-02-01 00:00:00+00';
SELECT (fluxrate.create_organization('Meters'))->>'id' AS org \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_customer('c', 'c@example.com', 'c'))->>'id' AS cust \gset
SELECT count(fluxrate.create_feature(t, t, 'meter', meter_name => t, property_name => 'v', aggregation_type => t)) AS meters
  FROM unnest(ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'LAST', 'WEIGHTED_SUM']) t;
SELECT id AS "SUM" FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'SUM' \gset
SELECT (fluxrate.create_feature('users', 'users', 'meter', meter_name => 'users', aggregation_type => 'UNIQUE_COUNT'))->>'meter_id' AS users \gset
SELECT (fluxrate.create_feature('eu', 'eu', 'meter', meter_name => 'eu', property_name => 'v', aggregation_type => 'SUM',
        filters => '[{"property": "region", "operator": "in", "values": ["eu", "uk"]}]'))->>'meter_id' AS eu \gset
-- the same five January events (and one December event) on every meter
CREATE TEMP TABLE ev (ts timestamptz, q numeric, meta jsonb, n int);
INSERT INTO ev VALUES ('2025-12-31 00:00+00', 4, '{"user_id": "a", "region": "eu"}', 0),
  ('2026-01-01 00:00+00', 10, '{"user_id": "a", "region": "eu"}', 1),
  ('2026-01-11 00:00+00', 20, '{"user_id": "b", "region": "us"}', 2),
  ('2026-01-21 00:00+00', 5,  '{"user_id": "a", "region": "uk"}', 3),
  ('2026-01-31 00:00+00', 7,  '{"region": "eu"}', 4),
  ('2026-01-31 00:00+00', 3,  '{"user_id": "c"}', 5);     -- same timestamp, ingested later: LAST = 3
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
SELECT :'org', fluxrate_internal.uuid_v7(), :'cust', m.id, ev.q, ev.ts, timestamptz '2026-02-01' + ev.n * interval '1 second', ev.meta
  FROM ev, fluxrate_internal.meters m WHERE m.org_id = :'org' ORDER BY ev.n;
SELECT m.meter_name, fluxrate_internal.meter_usage(:'org', :'cust', m.id, '2026-01-01', '2026-02-01') AS january
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' ORDER BY m.meter_name;
-- by hand, January [Jan 1, Feb 1) (the Dec 31 event is outside):
--   SUM 10+20+5+7+3 = 45; COUNT 5; MAX 20; MIN 3; AVG 9; LAST 3 (Jan 31, ingested last)
--   UNIQUE_COUNT user_id a, b, c = 3 (the event without user_id does not count)
--   eu (region in eu, uk): 10 + 5 + 7 = 22
--   WEIGHTED_SUM (value x hours): the level carried in from Dec 31 is 4, replaced at Jan 1 00:00 by 10:
--     10 x 240 h (Jan 1-11) + 20 x 240 h (Jan 11-21) + 5 x 240 h (Jan 21-31) + 3 x 24 h (Jan 31, last level) = 8472
--     (the 7 at Jan 31 is superseded at the same instant by the 3 ingested after it)
SELECT fluxrate_internal.meter_usage(:'org', :'cust', :'SUM', '2026-03-01', '2026-04-01') AS empty_period;   -- 0
-- a period starting mid-interval carries the level across the boundary: Jan 16 - Jan 26
--   20 x 120 h (Jan 16-21) + 5 x 120 h (Jan 21-26) = 3000
SELECT fluxrate_internal.meter_usage(:'org', :'cust', m.id, '2026-01-16', '2026-01-26') AS weighted_mid
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'WEIGHTED_SUM';
-- March has no event: the Jan 31 level 3 (ingested last) is carried in for all 744 h: 3 x 744 = 2232
SELECT fluxrate_internal.meter_usage(:'org', :'cust', m.id, '2026-03-01', '2026-04-01') AS weighted_carried_only
  FROM fluxrate_internal.meters m WHERE m.org_id = :'org' AND m.meter_name = 'WEIGHTED_SUM';
-- Events sent together share ingested_at; their ids (UUIDv7, increasing within a session)
-- keep the order they were sent in, and break the tie.  40 customers are each sent 1, then 2,
-- at the same instant in one track_batch, and 40 more by two track calls in one statement:
-- LAST is 2 for every one of them (random id bits used to pick either, about half each).
SELECT (fluxrate.create_feature('last2', 'last2', 'meter', meter_name => 'last2', property_name => 'v',
        aggregation_type => 'LAST'))->>'meter_token' AS tok_last \gset
SELECT count(fluxrate.track_batch(jsonb_build_array(
         jsonb_build_object('meter_token', :'tok_last', 'customer_external_id', 'tie-b' || g, 'quantity', 1, 'timestamp', '2026-01-15T00:00:00Z'),
         jsonb_build_object('meter_token', :'tok_last', 'customer_external_id', 'tie-b' || g, 'quantity', 2, 'timestamp', '2026-01-15T00:00:00Z'))))
  FROM generate_series(1, 40) g;
SELECT count(fluxrate.track(meter_token => :'tok_last', customer_external_id => 'tie-t' || g, quantity => v.q,
                            "timestamp" => '2026-01-15T00:00:00Z'))
  FROM generate_series(1, 40) g CROSS JOIN LATERAL (VALUES (1), (2)) v(q);
SELECT left(c.external_id, 5) AS sent_by, fluxrate_internal.meter_usage(:'org', c.id, m.id, '2026-01-01', '2026-02-01') AS last, count(*)
  FROM fluxrate_internal.customers c, fluxrate_internal.meters m
 WHERE c.org_id = :'org' AND c.external_id LIKE 'tie-%' AND m.org_id = :'org' AND m.meter_name = 'last2'
 GROUP BY 1, 2 ORDER BY 1, 2;
-- filters => '[]' is a meter without filters; a UNIQUE_COUNT meter names one property
SELECT (fluxrate.create_feature('nofilter', 'nofilter', 'meter', meter_name => 'nofilter', property_name => 'v',
        aggregation_type => 'SUM', filters => '[]'))->'meter'->'filters' AS empty_filters;
SELECT fluxrate.create_feature('uc2', 'uc2', 'meter', meter_name => 'uc2', aggregation_type => 'UNIQUE_COUNT',
        property_name => 'user_id', unique_property => 'account_id');                                       -- 22023
SELECT m->>'property_name' AS property_name, m->>'unique_property' AS unique_property
  FROM (SELECT (fluxrate.create_feature('uc1', 'uc1', 'meter', meter_name => 'uc1', aggregation_type => 'UNIQUE_COUNT',
        unique_property => 'account_id'))->'meter' AS m) x;
-- the weighted_sum aggregate itself, over [Mar 1 00:00, Mar 1 10:00) (10 h)
CREATE TEMP TABLE wpts (q numeric, ts timestamptz, ing timestamptz, id uuid, k text);
INSERT INTO wpts VALUES
  -- same timestamp: the later ingestion wins: 10 from 02:00 to 10:00 = 10 x 8 = 80
  (10, '2026-03-01 02:00+00', '2026-03-02 00:00:02+00', '00000000-0000-0000-0000-000000000001', 'tie'),
  (20, '2026-03-01 02:00+00', '2026-03-02 00:00:01+00', '00000000-0000-0000-0000-000000000002', 'tie'),
  -- same timestamp and ingestion: the larger id wins: 30 x 8 = 240
  (30, '2026-03-01 02:00+00', '2026-03-02 00:00:00+00', 'ffffffff-0000-0000-0000-000000000000', 'id'),
  (40, '2026-03-01 02:00+00', '2026-03-02 00:00:00+00', '00000000-ffff-0000-0000-000000000000', 'id'),
  -- carried in: the latest point before the start (5, Feb 28 12:00; not 7, Feb 27) holds until 04:00,
  -- then 9 until the end; 100 at 10:00 is after the period: 5 x 4 + 9 x 6 = 74
  (7,   '2026-02-27 00:00+00', '2026-03-02 00:00:00+00', '00000000-0000-0000-0000-000000000003', 'carry'),
  (5,   '2026-02-28 12:00+00', '2026-02-28 12:00:00+00', '00000000-0000-0000-0000-000000000004', 'carry'),
  (9,   '2026-03-01 04:00+00', '2026-03-02 00:00:00+00', '00000000-0000-0000-0000-000000000005', 'carry'),
  (100, '2026-03-01 10:00+00', '2026-03-02 00:00:00+00', '00000000-0000-0000-0000-000000000006', 'carry'),
  -- a late-ingested point from before the start is still replaced by an event at the start: 6 x 10 = 60
  (3, '2026-02-28 00:00+00', '2026-03-05 00:00:00+00', '00000000-0000-0000-0000-000000000007', 'backfill'),
  (6, '2026-03-01 00:00+00', '2026-03-01 00:00:00+00', '00000000-0000-0000-0000-000000000008', 'backfill'),
  -- fractions of an hour: 2 for 90 s (0.025 h) + 4 for the remaining 9 h 58 min 30 s (35910 s = 9.975 h): 0.05 + 39.9 = 39.95
  (2, '2026-03-01 00:00:00+00', '2026-03-01 00:00:00+00', '00000000-0000-0000-0000-000000000009', 'fraction'),
  (4, '2026-03-01 00:01:30+00', '2026-03-01 00:00:00+00', '00000000-0000-0000-0000-00000000000a', 'fraction');
SELECT k, fluxrate_internal.weighted_sum(q, ts, ing, id, '2026-03-01 00:00+00', '2026-03-01 10:00+00') AS weighted
  FROM wpts GROUP BY k ORDER BY k;
-- no events: 0; an event without a level (NULL quantity) sets none
SELECT fluxrate_internal.weighted_sum(q, ts, ing, id, '2026-03-01', '2026-03-02') AS no_events FROM wpts WHERE false;
SELECT fluxrate_internal.weighted_sum(NULL, now(), now(), gen_random_uuid(), '2026-03-01', '2026-03-02') AS null_quantity;
-- refusals: bounds that change between rows (22023), an end before the start (22023), no bounds (22004)
SELECT fluxrate_internal.weighted_sum(q, ts, ing, id, ts, '2026-03-02') FROM wpts;
SELECT fluxrate_internal.weighted_sum(q, ts, ing, id, '2026-03-02', '2026-03-01') FROM wpts;
SELECT fluxrate_internal.weighted_sum(q, ts, ing, id, NULL, '2026-03-01') FROM wpts;
-- many triples at once
SELECT ord, usage FROM fluxrate_internal.period_usage(:'org', ARRAY[:'cust', :'cust']::uuid[],
       ARRAY[:'SUM', :'users']::uuid[], ARRAY['2026-01-01', '2026-01-01']::timestamptz[], ARRAY['2026-02-01', '2026-01-15']::timestamptz[]) ORDER BY ord;
-- one pass over the organization's period (the closer's snapshot, period_usage()'s whole-organization
-- path): the same January SUM as the pair above; COUNT of the same events; other aggregations refused
-- (22023); another organization's id finds none of these events
SELECT u.customer_id = :'cust' AS cust, u.usage AS january_sum
  FROM fluxrate_internal.org_period_usage(:'org', '2026-01-01', '2026-02-01', 'SUM', ARRAY[:'SUM']::uuid[]) u;
SELECT u.usage AS january_count
  FROM fluxrate_internal.org_period_usage(:'org', '2026-01-01', '2026-02-01', 'COUNT', ARRAY[:'SUM']::uuid[]) u;
SELECT count(*) FROM fluxrate_internal.org_period_usage(:'org', '2026-01-01', '2026-02-01', 'UNIQUE_COUNT', ARRAY[:'users']::uuid[]);
SELECT count(*) AS other_org_rows
  FROM fluxrate_internal.org_period_usage(gen_random_uuid(), '2026-01-01', '2026-02-01', 'SUM', ARRAY[:'SUM']::uuid[]);
-- filters: every operator
SELECT f, fluxrate_internal.filters_match('{"region": "eu", "plan": "pro"}', f::jsonb) AS matches
  FROM unnest(ARRAY['[]', '[{"property": "region", "operator": "eq", "values": ["eu"]}]',
                    '[{"property": "region", "operator": "neq", "values": ["eu"]}]',
                    '[{"property": "tier", "operator": "neq", "values": ["x"]}]',
                    '[{"property": "region", "operator": "in", "values": ["us", "eu"]}]',
                    '[{"property": "region", "operator": "not_in", "values": ["us", "eu"]}]',
                    '[{"property": "plan", "operator": "exists", "values": []}]',
                    '[{"property": "tier", "operator": "exists", "values": []}]',
                    '[{"property": "region", "operator": "eq", "values": ["eu"]}, {"property": "plan", "operator": "eq", "values": ["free"]}]']) f;
RESET fluxrate.acting_org;

-- The C aggregates run as partial aggregates in parallel workers, and the
-- parallel result equals the serial one (and PostgreSQL's own answer)
-- (a regular table: temporary tables are never scanned by parallel workers)
CREATE TABLE public.agg_rows AS
  SELECT g, 'user-' || (g % 1234) AS u, (g % 97)::numeric AS q,
         timestamptz '2026-01-01' + (g % 5000) * interval '1 minute' AS ts,
         timestamptz '2026-02-01' + g * interval '1 millisecond' AS ing,
         md5(g::text)::uuid AS id
    FROM generate_series(1, 200000) g;
ANALYZE public.agg_rows;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT fluxrate_internal.unique_count(u), fluxrate_internal.last_value(q, ts, ing, id) FROM agg_rows;
-- run it in parallel, and check that workers really ran the partial aggregates
SELECT fluxrate_internal.unique_count(u) AS par_uc, fluxrate_internal.last_value(q, ts, ing, id) AS par_lv FROM agg_rows \gset
CREATE FUNCTION pg_temp.workers_launched(q text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  line text;
BEGIN
  FOR line IN EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ' || q LOOP
    IF line ~ 'Workers Launched' THEN
      RETURN substring(line FROM 'Workers Launched: ([0-9]+)')::integer;
    END IF;
  END LOOP;
  RETURN 0;
END
$$;
SELECT pg_temp.workers_launched('SELECT fluxrate_internal.unique_count(u), fluxrate_internal.last_value(q, ts, ing, id) FROM agg_rows') > 0
  AS workers_ran;
SET max_parallel_workers_per_gather = 0;
SELECT fluxrate_internal.unique_count(u) AS ser_uc, fluxrate_internal.last_value(q, ts, ing, id) AS ser_lv FROM agg_rows \gset
-- by hand: 1,234 distinct users; the latest timestamp is minute 4999, reached by g = 4999 + 5000k,
-- and among those the last ingested is g = 199999 (q = 199999 % 97 = 199999 - 97 x 2061 = 82)
SELECT :par_uc AS parallel_uc, :ser_uc AS serial_uc, :par_lv AS parallel_last, :ser_lv AS serial_last,
       (SELECT count(DISTINCT u) FROM agg_rows) AS pg_distinct,
       (SELECT q FROM agg_rows ORDER BY ts DESC, ing DESC, id DESC LIMIT 1) AS pg_last;
-- weighted_sum in parallel: point k = g % 5000 at 2026-01-01 + k x 36 s (k/100 h); the level at k is the
-- last-ingested row, g = k + 195000 (k >= 1), so q = (k + 195000) % 97 = (k + 30) % 97.
-- Period [14:23:42, next day 04:48) = [k 1439.5, k 2880):
--   carried in: k 1439, q = 1469 % 97 = 14, for 18 s = 0.005 h                   ->   0.07
--   k 1440..2879, 0.01 h each: 1440 = 14 x 97 + 82 values of (k + 30) % 97 starting at 15:
--   14 x (0 + ... + 96) + (15 + ... + 96) = 14 x 4656 + 4551 = 69735, x 0.01   -> 697.35
--   total 697.42; rows at k >= 2880 are after the period and dropped
\set wq 'fluxrate_internal.weighted_sum(q, timestamptz ''2026-01-01'' + (g % 5000) * interval ''36 seconds'', ing, id, ''2026-01-01 14:23:42+00'', ''2026-01-02 04:48:00+00'') FROM agg_rows'
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT :wq;
SELECT :wq \gset par_
SELECT pg_temp.workers_launched('SELECT ' || :'wq') > 0 AS workers_ran;
SET max_parallel_workers_per_gather = 0;
SELECT :wq \gset ser_
-- and the window-function formula it replaced
WITH w AS (SELECT q, timestamptz '2026-01-01' + (g % 5000) * interval '36 seconds' AS t, ing, id FROM agg_rows),
pts AS ((SELECT timestamptz '2026-01-01 14:23:42+00' AS t, q, ing, id FROM w WHERE w.t < '2026-01-01 14:23:42+00'
          ORDER BY w.t DESC, w.ing DESC, w.id DESC LIMIT 1)
        UNION ALL SELECT t, q, ing, id FROM w WHERE t >= '2026-01-01 14:23:42+00' AND t < '2026-01-02 04:48:00+00'),
seg AS (SELECT q, t, lead(t, 1, '2026-01-02 04:48:00+00') OVER (ORDER BY t, ing, id) AS t2 FROM pts)
SELECT :par_weighted_sum AS parallel_weighted, :ser_weighted_sum AS serial_weighted,
       sum(q * extract(epoch FROM (t2 - t)) / 3600) AS window_formula FROM seg;
RESET max_parallel_workers_per_gather;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
-- nulls are skipped; an empty input counts 0 and has no last value
SELECT fluxrate_internal.unique_count(x) AS none_counted FROM (VALUES (NULL::text), (NULL)) v(x);
SELECT fluxrate_internal.last_value(1, NULL, now(), gen_random_uuid()) IS NULL AS no_last;
DROP TABLE public.agg_rows;

-- Live usage and entitlements, consistent with billing
SET fluxrate.pinned_now = '2026-01-20 12:00:00+00';
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_plan('Live', 'live', 'HYBRID', 'month', 'USD'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'USAGE', meter_id => :'SUM', unit_price => 1))->>'status' AS charge;
SELECT (fluxrate.create_feature('Reports', 'reports', 'switch'))->>'id' AS sw \gset
SELECT (fluxrate.create_feature('Seats', 'seat_count', 'custom'))->>'id' AS cu \gset
SELECT (fluxrate.add_plan_feature(:'plan', (SELECT feature_id FROM fluxrate_internal.meters WHERE id = :'SUM'), usage_limit => 40))->>'usage_limit' AS sum_limit;
SELECT (fluxrate.add_plan_feature(:'plan', :'sw', is_enabled => false))->>'is_enabled' AS reports_enabled;
SELECT (fluxrate.add_plan_feature(:'plan', :'cu', static_value => '25'))->>'static_value' AS seats;
SELECT (fluxrate.create_subscription(:'cust', :'plan', start_date => '2026-01-01 00:00+00'))->>'id' AS live_sub \gset
-- usage of the current period as its invoice will count it (Jan 1 - Feb 1): 10 + 20 + 5 + 7 + 3 = 45
-- on SUM (these rows were written directly, dated after now; through track an
-- event is never more than 5 minutes ahead, and it is billed in its period)
SELECT u->>'meter_name' AS meter, u->>'usage' AS usage_so_far
  FROM json_array_elements((fluxrate.get_subscription_usage(:'live_sub'))->'usage') u;
SELECT json_array_length((fluxrate.get_customer_usage(:'cust'))->'subscriptions') AS active_subscriptions;
-- usage 30 < limit 40: allowed (the Jan 21 event is still in the future of the pinned clock)
SELECT e->>'allowed' AS allowed, e->>'usage' AS usage, e->>'usage_limit' AS usage_limit FROM fluxrate.check_entitlement('c', 'SUM') e;
SELECT (fluxrate.update_plan(:'plan', name => 'Live')) IS NOT NULL AS touched;
UPDATE fluxrate_internal.plan_features SET usage_limit = 30 WHERE org_id = :'org' AND plan_id = :'plan' AND usage_limit = 40;
-- 30 is not below 30: refused; a soft limit would allow it
SELECT e->>'allowed' AS allowed, e->>'usage' AS usage FROM fluxrate.check_entitlement('c', 'SUM') e;
UPDATE fluxrate_internal.plan_features SET is_soft_limit = true WHERE org_id = :'org' AND plan_id = :'plan' AND usage_limit = 30;
SELECT e->>'allowed' AS allowed_soft FROM fluxrate.check_entitlement('c', 'SUM') e;
SELECT e->>'allowed' AS reports_allowed FROM fluxrate.check_entitlement('c', 'reports') e;
SELECT e->>'allowed' AS seats_allowed, e->>'static_value' AS seats FROM fluxrate.check_entitlement('c', 'seat_count') e;
SELECT e->>'allowed' AS allowed, e->>'reason' AS reason FROM fluxrate.check_entitlement('c', 'nope') e;
SELECT fluxrate.check_entitlement(NULL, 'SUM');                  -- 22004
SELECT fluxrate.get_subscription_usage(gen_random_uuid());       -- PT404
-- another organization sees none of it
SELECT (fluxrate.create_organization('Other'))->>'id' AS other \gset
SELECT fluxrate.act_as(:'other', true) IS NOT NULL AS acting_other;
SELECT fluxrate.get_subscription_usage(:'live_sub');             -- PT404
SELECT fluxrate.get_customer_usage(:'cust');                     -- PT404
SELECT e->>'allowed' AS other_allowed FROM fluxrate.check_entitlement('c', 'SUM') e;
RESET fluxrate.acting_org;

-- The entitlement window without a reset period is the subscription's period that contains
-- now.  30 s after February ended, before the closer has advanced the subscription: 90 calls
-- in February, 20 in March's first seconds -> March's usage is 20 (allowed under 100), not 110.
SET fluxrate.pinned_now = '2027-03-01 00:00:30+00';
SELECT (fluxrate.create_organization('Windows'))->>'id' AS org_w \gset
SELECT fluxrate.act_as(:'org_w', true) IS NOT NULL AS acting;
SELECT f->>'meter_token' AS tok_w, f->>'id' AS feat_w FROM fluxrate.create_feature('calls', 'calls', 'meter', meter_name => 'calls',
       property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT f->>'meter_token' AS tok_g, f->>'id' AS feat_g FROM fluxrate.create_feature('gbh', 'gbh', 'meter', meter_name => 'gbh',
       property_name => 'gb', aggregation_type => 'WEIGHTED_SUM') f \gset
SELECT (fluxrate.create_plan('P', 'p', 'USAGE', 'month', 'USD'))->>'id' AS plan_w \gset
SELECT fluxrate.add_plan_feature(:'plan_w', :'feat_w', usage_limit => 100) IS NOT NULL AS calls_feature,
       fluxrate.add_plan_feature(:'plan_w', :'feat_g', usage_limit => 1000) IS NOT NULL AS gbh_feature;
SELECT (fluxrate.create_customer('Acme', 'ap@acme.example', 'acme'))->>'id' AS cust_w \gset
SELECT (fluxrate.create_subscription(:'cust_w', :'plan_w', start_date => '2027-02-01 00:00+00'))->>'current_period_end' AS period_end;
SELECT fluxrate.track(meter_token => :'tok_w', customer_external_id => 'acme', quantity => 90, "timestamp" => '2027-02-20 10:00:00+00') IS NOT NULL AS feb,
       fluxrate.track(meter_token => :'tok_w', customer_external_id => 'acme', quantity => 20, "timestamp" => '2027-03-01 00:00:10+00') IS NOT NULL AS mar;
SELECT e->>'usage' AS usage, e->>'allowed' AS allowed, e->>'window_start' AS window_start FROM fluxrate.check_entitlement('acme', 'calls') e;
-- a subscription that starts later has no window yet: usage 0 on every meter, also on a
-- WEIGHTED_SUM meter that has a level to carry in (it used to raise 22023)
SELECT (fluxrate.create_customer('Later', 'l@later.example', 'later'))->>'id' AS cust_l \gset
SELECT (fluxrate.create_subscription(:'cust_l', :'plan_w', start_date => '2027-04-15 00:00+00'))->>'status' AS later_status;
SELECT fluxrate.track(meter_token => :'tok_g', customer_external_id => 'later', quantity => 5, "timestamp" => '2027-03-01 00:00:00+00') IS NOT NULL AS level,
       fluxrate.track(meter_token => :'tok_w', customer_external_id => 'later', quantity => 5, "timestamp" => '2027-03-01 00:00:00+00') IS NOT NULL AS calls;
SELECT e->>'usage' AS gbh_usage, e->>'allowed' AS allowed FROM fluxrate.check_entitlement('later', 'gbh') e;
SELECT e->>'usage' AS calls_usage FROM fluxrate.check_entitlement('later', 'calls') e;
RESET fluxrate.acting_org;
