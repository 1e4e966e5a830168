-- Ingestion bounds (issue 19; docs/security.md, "Ingestion bounds"): each attack
-- of a hostile tenant on the ingest path, refused with its SQLSTATE, on track and
-- track_batch alike, while the other organization's events and rollups proceed.
--   quantity   finite, |q| < 10^18, at most 12 decimal places      22003 / PT422
--   timestamp  2000-01-01 00:00:00 UTC .. server time + 5 minutes  PT422
--   names      meter_name, customer_external_id, idempotency_key:
--              1 to 255 characters (not bytes), not blank          22023 / 22004
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-06-10 12:00:00+00';
SELECT (fluxrate.create_organization('Mallory'))->>'id' AS org_m \gset
SELECT (fluxrate.create_organization('Victor'))->>'id' AS org_v \gset
SELECT fluxrate.act_as(:'org_v', true) IS NOT NULL AS acting_v;
SELECT f->>'meter_token' AS tok_v, f->>'meter_id' AS meter_v
  FROM fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
       aggregation_type => 'SUM') f \gset
SELECT k->>'key' AS key_v FROM fluxrate.create_api_key('v', ARRAY['usage.write']) k \gset
SELECT fluxrate.act_as(:'org_m', true) IS NOT NULL AS acting_m;
SELECT f->>'meter_token' AS tok_m, f->>'meter_id' AS meter_m
  FROM fluxrate.create_feature('Bytes', 'bytes', 'meter', meter_name => 'bytes', property_name => 'n',
       aggregation_type => 'SUM') f \gset
SELECT f->>'meter_token' AS tok_gauge FROM fluxrate.create_feature('Level', 'level', 'meter', meter_name => 'level',
       property_name => 'n', aggregation_type => 'MAX') f \gset
SELECT k->>'key' AS key_m FROM fluxrate.create_api_key('m', ARRAY['usage.write']) k \gset
-- Mallory's attacks and Victor's ordinary calls alternate below; what each
-- organization ends up with is counted at the end
CREATE TEMP VIEW counts AS
SELECT o.name, (SELECT count(*) FROM fluxrate_internal.usage_events e WHERE e.org_id = o.org_id) AS events,
       (SELECT count(*) FROM fluxrate_internal.customers c WHERE c.org_id = o.org_id) AS customers
  FROM fluxrate_internal.organizations o WHERE o.org_id IN (:'org_m', :'org_v') ORDER BY o.name;
-- one result row per batch element: index, status, code
CREATE FUNCTION pg_temp.batch(events jsonb, key text) RETURNS TABLE (idx int, status text, code text)
  LANGUAGE sql AS $$
    SELECT (r->>'index')::int, r->>'status', r->>'code'
      FROM jsonb_array_elements((fluxrate.track_batch(events, key))->'results') r $$;

-- 1. Quantities -------------------------------------------------------------
-- Refused: 1e1000 and a 131,072-digit integer (both legal numerics) are 22003;
-- 10^18 itself is out; NaN and Infinity are PT422 (not finite).
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1e1000);        -- 22003
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1',
       quantity => ('1' || repeat('0', 131071))::numeric);                                                                  -- 22003
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1e18);          -- 22003
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_gauge', customer_external_id => 'm1', quantity => -1e1000);   -- 22003 (before the sign)
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 'NaN');         -- PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 'Infinity');    -- PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => '-Infinity');   -- PT422
-- through properties (a numeric string), the same rule
SELECT fluxrate.track(api_key => :'key_m', meter_name => 'bytes', customer_external_id => 'm1', properties => '{"n": "1e1000"}');  -- 22003
SELECT fluxrate.track(api_key => :'key_m', meter_name => 'bytes', customer_external_id => 'm1',
       properties => jsonb_build_object('n', ('1' || repeat('0', 131071))::numeric));                                     -- 22003
SELECT fluxrate.track(api_key => :'key_m', meter_name => 'bytes', customer_external_id => 'm1', properties => '{"n": "NaN"}');     -- 22P02 (not a plain decimal)
SELECT count(*) AS mallory_events_after_refusals FROM fluxrate_internal.usage_events WHERE org_id = :'org_m';
-- the error names the rule, and says what to do
CREATE FUNCTION pg_temp.refusal(key text, tok text, q numeric) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  PERFORM fluxrate.track(api_key => key, meter_token => tok, customer_external_id => 'm1', quantity => q);
  RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL,
                          v_hint = PG_EXCEPTION_HINT;
  RETURN concat_ws(E'\n', v_state, v_msg, v_detail, v_hint);
END $$;
SELECT pg_temp.refusal(:'key_m', :'tok_m', ('1' || repeat('0', 131071))::numeric) AS refusal;
-- Victor's event goes in meanwhile
SELECT (fluxrate.track(api_key => :'key_v', meter_token => :'tok_v', customer_external_id => 'v1', quantity => 3,
        "timestamp" => '2026-06-10 08:00:00+00'))->>'quantity' AS victor_quantity;
-- Accepted: the largest quantity, 18 nines and 12 decimal nines (30 digits,
-- numeric(30,12)); twice on one customer, meter and day: the two that made the
-- rollup refresh fail for everybody when they were 131,072-digit integers
SELECT (fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1',
        quantity => 999999999999999999.999999999999, "timestamp" => '2026-06-10 09:00:00+00'))->>'quantity' AS largest;
SELECT (fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1',
        quantity => 999999999999999999.999999999999, "timestamp" => '2026-06-10 10:00:00+00'))->>'quantity' AS largest_again;
-- the batch: one refusal per bad element, the good ones created
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1e1000),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', ('1' || repeat('0', 131071))::numeric),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1e18),
    jsonb_build_object('meter_name', 'bytes', 'customer_external_id', 'm1', 'properties', '{"n": "1e1000"}'::jsonb),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 999999999999999999.999999999999,
                       'timestamp', '2026-06-10T11:00:00Z')
  ), :'key_m');
-- Mallory's day now holds 3 x 999999999999999999.999999999999
--   = 2999999999999999999.999999999997 over 3 events; Victor's 3 over 1.
-- The refresh (one statement over every organization) goes through.
SELECT r->'skipped' AS skipped FROM fluxrate.refresh_usage_rollups() r;
SELECT o.name, r.events, r.quantity_sum, r.quantity_max
  FROM fluxrate_internal.usage_rollups r JOIN fluxrate_internal.organizations o ON o.org_id = r.org_id
 WHERE r.org_id IN (:'org_m', :'org_v') AND r.width = 'day' AND r.bucket = '2026-06-10' ORDER BY o.name;
-- and the rating of that sum at 0.002 per unit:
--   2999999999999999999.999999999997 x 0.002 = 5999999999999999.999999999999994
SELECT fluxrate_internal.rate_usage('per_unit', 0.002, NULL, NULL, NULL, 0, r.quantity_sum) AS rated
  FROM fluxrate_internal.usage_rollups r
 WHERE r.org_id = :'org_m' AND r.width = 'day' AND r.bucket = '2026-06-10';

-- 2. Timestamps -------------------------------------------------------------
-- before 2000-01-01 00:00:00 UTC (PostgreSQL's epoch), infinite, or more than
-- 5 minutes ahead of the server time: PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1,
       "timestamp" => '-infinity');                                                                                         -- PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1,
       "timestamp" => '4713-01-01 00:00:00+00 BC');                                                                         -- PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1,
       "timestamp" => '1999-12-31 23:59:59.999999+00');                                                                     -- PT422
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1,
       "timestamp" => 'infinity');                                                                                          -- PT422
SELECT count(*) AS mallory_events FROM fluxrate_internal.usage_events WHERE org_id = :'org_m';
-- the first instant is accepted
SELECT (fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm1', quantity => 1,
        "timestamp" => '2000-01-01 00:00:00+00'))->>'timestamp' AS first_instant;
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', '-infinity'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', '4713-01-01 00:00:00+00 BC'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', '1999-12-31T23:59:59.999999Z'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', 'infinity'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', '2026-06-10T12:05:01Z'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm1', 'quantity', 1, 'timestamp', '2000-01-01T00:00:00Z')
  ), :'key_m');
SELECT "timestamp", count(*) AS events FROM fluxrate_internal.usage_events
 WHERE org_id = :'org_m' AND "timestamp" < '2026-01-01' GROUP BY 1 ORDER BY 1;

-- 3. Meter names --------------------------------------------------------------
-- Two meters whose names share their first 130 bytes: the batch booked both
-- meters' events to the first one it looked up (a 128-byte key); single track
-- was right.  Each event must land on its own meter.
SELECT (fluxrate.create_feature('Long A', 'long_a', 'meter', meter_name => repeat('x', 130) || '-a', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_id' AS meter_la \gset
SELECT (fluxrate.create_feature('Long B', 'long_b', 'meter', meter_name => repeat('x', 130) || '-b', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_id' AS meter_lb \gset
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_name', repeat('x', 130) || '-a', 'customer_external_id', 'm2', 'properties', '{"n": 1}'::jsonb),
    jsonb_build_object('meter_name', repeat('x', 130) || '-b', 'customer_external_id', 'm2', 'properties', '{"n": 2}'::jsonb),
    jsonb_build_object('meter_name', repeat('x', 130) || '-b', 'customer_external_id', 'm2', 'properties', '{"n": 4}'::jsonb)
  ), :'key_m');
-- by hand: meter -a holds 1, meter -b holds 2 + 4 = 6
SELECT right(m.meter_name, 2) AS meter, count(*) AS events, sum(e.quantity) AS total
  FROM fluxrate_internal.usage_events e JOIN fluxrate_internal.meters m ON m.org_id = e.org_id AND m.id = e.meter_id
 WHERE e.org_id = :'org_m' AND m.id IN (:'meter_la', :'meter_lb') GROUP BY m.meter_name ORDER BY 1;
-- and the same names through single track, for comparison: -a + 8, -b + 16
SELECT (fluxrate.track(api_key => :'key_m', meter_name => repeat('x', 130) || '-a', customer_external_id => 'm2',
        properties => '{"n": 8}'))->>'meter_id' = :'meter_la' AS track_a_right,
       (fluxrate.track(api_key => :'key_m', meter_name => repeat('x', 130) || '-b', customer_external_id => 'm2',
        properties => '{"n": 16}'))->>'meter_id' = :'meter_lb' AS track_b_right;
-- meter names are 1 to 255 characters, counted in characters: 255 two-byte
-- characters (510 bytes) are accepted, 256 ASCII characters are not
SELECT (fluxrate.create_feature('Long C', 'long_c', 'meter', meter_name => repeat('é', 255), property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_name' = repeat('é', 255) AS accented_255;
SELECT fluxrate.create_feature('Long D', 'long_d', 'meter', meter_name => repeat('x', 256), property_name => 'n',
       aggregation_type => 'SUM');                                                                                          -- 22023
SELECT fluxrate.create_feature('Long E', 'long_e', 'meter', meter_name => repeat('é', 256), property_name => 'n',
       aggregation_type => 'SUM');                                                                                          -- 22023
SELECT count(*) AS long_features FROM fluxrate_internal.features WHERE org_id = :'org_m' AND lookup_key LIKE 'long_%';
-- the 255-character name works in a batch and in track
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_name', repeat('é', 255), 'customer_external_id', 'm2', 'properties', '{"n": 5}'::jsonb)), :'key_m');
SELECT (fluxrate.track(api_key => :'key_m', meter_name => repeat('é', 255), customer_external_id => 'm2',
        properties => '{"n": 5}'))->>'quantity' AS accented_track;

-- 4. Identifiers: characters, not bytes; clear refusals ---------------------
-- idempotency_key: 255 two-byte characters (510 bytes) were refused as "over
-- 255" (bytes); now accepted, and a replay of it is recognized in a batch
SELECT (fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm3', quantity => 1,
        idempotency_key => repeat('é', 255)))->>'replay' AS key_255_chars;
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm3', quantity => 1,
       idempotency_key => repeat('é', 256));                                                                                -- 22023
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => 'm3', quantity => 1,
       idempotency_key => repeat('k', 256));                                                                                -- 22023
-- in a batch, two long keys sharing their first 508 bytes are two keys: the
-- first is a replay of the event above, the second is new
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm3', 'quantity', 1, 'idempotency_key', repeat('é', 255)),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm3', 'quantity', 1, 'idempotency_key', repeat('é', 254) || 'e'),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', 'm3', 'quantity', 1, 'idempotency_key', repeat('é', 256))
  ), :'key_m');
-- customer_external_id: 3 KB that does not compress (94 md5 digests) failed
-- with 54000 (index row size) in track; now 22023 in track and in the batch,
-- and nothing is created
SELECT string_agg(md5(g::text), '') AS ext_3k, length(string_agg(md5(g::text), '')) AS ext_3k_length
  FROM generate_series(1, 94) g \gset
SELECT :ext_3k_length AS ext_3k_length;
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => :'ext_3k', quantity => 1);  -- 22023
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => repeat('c', 256), quantity => 1);   -- 22023
-- blank: refused by track as by the batch (22004)
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => '', quantity => 1);                 -- 22004
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => '   ', quantity => 1);              -- 22004
SELECT fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => E'\t\n', quantity => 1);            -- 22004
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', :'ext_3k', 'quantity', 1),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', '', 'quantity', 1),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', '   ', 'quantity', 1),
    jsonb_build_object('meter_token', :'tok_m', 'customer_external_id', repeat('é', 255), 'quantity', 1)
  ), :'key_m');
-- 255 two-byte characters are a customer (created by the batch above), found again by track
SELECT (fluxrate.track(api_key => :'key_m', meter_token => :'tok_m', customer_external_id => repeat('é', 255),
        quantity => 1))->>'customer_id' = (SELECT id::text FROM fluxrate_internal.customers
                                            WHERE org_id = :'org_m' AND external_id = repeat('é', 255)) AS same_customer;
SELECT count(*) AS blank_or_long_customers FROM fluxrate_internal.customers
 WHERE org_id = :'org_m' AND (btrim(external_id, E' \t\n') = '' OR length(external_id) > 255);

-- 5. The other organization proceeded throughout ------------------------------
SELECT * FROM pg_temp.batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok_v', 'customer_external_id', 'v1', 'quantity', 4, 'timestamp', '2026-06-10T09:00:00Z'),
    jsonb_build_object('meter_name', 'calls', 'customer_external_id', 'v2', 'properties', '{"n": 5}'::jsonb,
                       'timestamp', '2026-06-10T09:30:00Z')), :'key_v');
SELECT r->'skipped' AS skipped FROM fluxrate.refresh_usage_rollups() r;
-- by hand, Victor on 2026-06-10: v1 3 + 4 = 7 over 2 events; v2 5 over 1
SELECT c.external_id, r.events, r.quantity_sum
  FROM fluxrate_internal.usage_rollups r JOIN fluxrate_internal.customers c ON c.org_id = r.org_id AND c.id = r.customer_id
 WHERE r.org_id = :'org_v' AND r.width = 'day' AND r.bucket = '2026-06-10' ORDER BY 1;
-- Mallory: 3 largest (2 track, 1 batch) + 2 at 2000-01-01 + 5 on the two long
--   meters (3 batch, 2 track) + 2 on the é meter + 2 keyed (the 255-character
--   key, its sibling; the replay is not new) + 2 for the é customer = 16 events;
--   customers m1, m2, m3 and the é one = 4.  Victor: 1 + 2 = 3 events, v1 and v2.
SELECT * FROM counts;
