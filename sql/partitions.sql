-- Event storage (issue 17): monthly partitions made ahead by the minute job at
-- a pinned time, the default partition and its drain, idempotency across
-- partitions and organizations, and the bulk load with every refusal
-- (docs/ingestion.md, "Storage layout" and "Bulk load").  Months of 2030-2031,
-- which no other test touches.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
-- this test's partitions and how many of this test's events each holds (other
-- tests of the suite's shared database have events too, in other months)
CREATE FUNCTION pg_temp.parts() RETURNS TABLE (part text, bound text, events bigint) LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT c.oid::regclass AS rel, pg_get_expr(c.relpartbound, c.oid) AS b FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'fluxrate_internal.usage_events'::regclass
              AND (c.relname ~ '^usage_events_y(2030m02|2031m0[678])$' OR c.relname = 'usage_events_default') ORDER BY c.relname LOOP
    part := r.rel::text; bound := r.b;
    EXECUTE format('SELECT count(*) FROM %s e JOIN fluxrate_internal.organizations o ON o.org_id = e.org_id
                     WHERE o.name IN (''Archivist'', ''Other archivist'')', r.rel) INTO events;
    RETURN NEXT;
  END LOOP;
END $$;

SET fluxrate.pinned_now = '2031-06-15 12:00:00+00';
SELECT (fluxrate.create_organization('Archivist'))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('Other archivist'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting_a;
SELECT f->>'meter_token' AS tok FROM fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls',
       property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT f->>'meter_token' AS tok_u FROM fluxrate.create_feature('Users', 'users', 'meter', meter_name => 'users',
       aggregation_type => 'UNIQUE_COUNT') f \gset

-- The minute job makes this month's partition and the next two (June, July,
-- August 2031), once: a second run makes nothing
-- (other tests' events in the default partition may be drained meanwhile: only
-- 2030-2031 is shown)
SELECT x->>'partition' AS made, x->>'from' AS "from", x->>'to' AS "to"
  FROM fluxrate.maintain_event_storage() p, jsonb_array_elements(p->'partitions'->'made') x
 WHERE x->>'partition' ~ 'y2031m0[678]';
-- a second run makes none of them again (it may drain more of the default)
SELECT count(*) AS made_again FROM fluxrate.maintain_event_storage() p, jsonb_array_elements(p->'partitions'->'made') x
 WHERE x->>'partition' ~ 'y2031m0[678]';
SELECT * FROM pg_temp.parts();
-- the tenant wall holds on a partition the job made, as on every table
SELECT relrowsecurity AS rls, relforcerowsecurity AS forced, pg_get_userbyid(relowner) AS owner,
       (SELECT count(*) FROM pg_policies WHERE schemaname = 'fluxrate_internal' AND tablename = 'usage_events_y2031m06') AS policies
  FROM pg_class WHERE oid = 'fluxrate_internal.usage_events_y2031m06'::regclass;

-- An event of this month goes to its partition; one of February 2030 (no
-- partition) to the default partition
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'c1', quantity => 2, idempotency_key => 'june-1'))->>'replay' AS replay;
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'c1', quantity => 3, idempotency_key => 'feb-1',
        "timestamp" => '2030-02-10 00:00:00+00'))->>'replay' AS replay;
SELECT * FROM pg_temp.parts();
-- the same key is a replay whatever the partition (the key table is the arbiter)
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'c1', quantity => 3, idempotency_key => 'feb-1',
        "timestamp" => '2030-02-10 00:00:00+00'))->>'replay' AS replay_in_default;
-- ... and another payload under it is PT409 however far its time is from the first
SELECT fluxrate.track(meter_token => :'tok', customer_external_id => 'c1', quantity => 3, idempotency_key => 'feb-1',
        "timestamp" => '2031-06-01 00:00:00+00');
-- The job drains the default: February 2030 gets its partition, the event moves into it
-- (the job's partition step, draining all of the default at once: the suite's
-- shared database has other tests' older months in it)
SELECT x->>'partition' AS made, x->>'moved' AS moved
  FROM fluxrate_internal.maintain_event_partitions(drain => 100) p, jsonb_array_elements(p->'made') x
 WHERE x->>'partition' = 'usage_events_y2030m02';
SELECT * FROM pg_temp.parts();
-- its key still replays to the same event (same id), now in February's partition
SELECT (SELECT id FROM fluxrate_internal.usage_events WHERE idempotency_key = 'feb-1') =
       (fluxrate.track(meter_token => :'tok', customer_external_id => 'c1', quantity => 3, idempotency_key => 'feb-1',
        "timestamp" => '2030-02-10 00:00:00+00')->>'id')::uuid AS same_event;
-- a batch whose keys span two partitions and the default, a key twice with two
-- payloads (the first wins, the second is PT409), a replay and a conflict of feb-1
SELECT r->>'created' AS created, r->>'replayed' AS replayed, r->>'failed' AS failed
  FROM fluxrate.track_batch(jsonb_build_array(
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 1, 'idempotency_key', 'b-1', 'timestamp', '2031-06-02T00:00:00Z'),
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 1, 'idempotency_key', 'b-2', 'timestamp', '2030-02-01T00:00:00Z'),
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 1, 'idempotency_key', 'b-3', 'timestamp', '2030-05-01T00:00:00Z'),
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 1, 'idempotency_key', 'feb-1', 'timestamp', '2031-06-01T00:00:00Z'),
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 3, 'idempotency_key', 'feb-1', 'timestamp', '2030-02-10T00:00:00Z'),
    jsonb_build_object('meter_token', :'tok', 'customer_external_id', 'c1', 'quantity', 1, 'idempotency_key', 'b-1', 'timestamp', '2030-05-01T00:00:00Z'))) r;
SELECT idempotency_key, count(*) AS events, min(tableoid::regclass::text) AS part
  FROM fluxrate_internal.usage_events WHERE org_id = :'org_a' GROUP BY 1 ORDER BY 1;
-- another organization's same key is its own event; org A's keys stay A's
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT f->>'meter_token' AS tok_b FROM fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls',
       property_name => 'n', aggregation_type => 'SUM') f \gset
SELECT (fluxrate.track(meter_token => :'tok_b', customer_external_id => 'c1', quantity => 9, idempotency_key => 'feb-1',
        "timestamp" => '2030-02-10 00:00:00+00'))->>'replay' AS replay_b;
-- one key per organization, each naming its own organization's event
SELECT k.org_id = :'org_b' AS is_b, k.event_id = e.id AS own_event
  FROM fluxrate_internal.usage_event_keys k JOIN fluxrate_internal.usage_events e ON e.org_id = k.org_id AND e.idempotency_key = k.idempotency_key
 WHERE k.idempotency_key = 'feb-1' AND k.org_id IN (:'org_a', :'org_b') ORDER BY 1;

-- Bulk load ------------------------------------------------------------------
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting_a;
CREATE TEMP TABLE staging OF fluxrate.event_load_row;
-- not readable by fluxrate yet: 42501, nothing written
SELECT fluxrate.load_events('staging');
GRANT SELECT ON staging TO fluxrate_owner;
INSERT INTO staging VALUES
  (1, :'tok', NULL, 'bulk-1', 4, '2031-03-01 00:00+00', 'L-1', '{"src": "file"}', NULL),   -- created (March 2031: partition made)
  (2, NULL, 'calls', 'bulk-2', NULL, '2031-03-02 00:00+00', 'L-2', NULL, '{"n": "2.5"}'), -- created, quantity from properties
  (3, :'tok', NULL, 'bulk-1', 4, '2031-03-01 00:00+00', 'L-1', '{"src": "file"}', NULL),   -- replay of line 1
  (4, :'tok', NULL, 'bulk-1', 5, '2031-03-01 00:00+00', 'L-1', NULL, NULL),                -- PT409 other payload
  (5, :'tok', NULL, 'c1', 3, '2030-02-10 00:00+00', 'feb-1', NULL, NULL),                  -- replay of track's key
  (6, NULL, 'nope', 'bulk-6', 1, NULL, NULL, NULL, NULL),                                  -- PT404 meter
  (7, NULL, NULL, 'bulk-7', 1, NULL, NULL, NULL, NULL),                                    -- 22004 no meter
  (8, :'tok', NULL, '  ', 1, NULL, NULL, NULL, NULL),                                      -- 22004 blank customer
  (9, :'tok', NULL, repeat('x', 256), 1, NULL, NULL, NULL, NULL),                          -- 22023 long customer
  (10, :'tok', NULL, 'bulk-10', 1, NULL, '', NULL, NULL),                                  -- 22023 empty key
  (11, :'tok', NULL, 'bulk-11', 'NaN', NULL, NULL, NULL, NULL),                            -- PT422 NaN
  (12, :'tok', NULL, 'bulk-12', 1e18, NULL, NULL, NULL, NULL),                             -- 22003 out of range
  (13, :'tok', NULL, 'bulk-13', 0, NULL, NULL, NULL, NULL),                                -- PT422 SUM needs > 0
  (14, :'tok', NULL, 'bulk-14', 0.0000000000001, NULL, NULL, NULL, NULL),                  -- PT422 13 decimals
  (15, :'tok', NULL, 'bulk-15', 1, '1999-12-31 23:59:59+00', NULL, NULL, NULL),            -- PT422 before 2000
  (16, :'tok', NULL, 'bulk-16', 1, '2031-06-15 12:05:01+00', NULL, NULL, NULL),            -- PT422 future
  (17, :'tok', NULL, 'bulk-17', 1, NULL, NULL, '[1]', NULL),                               -- 22023 metadata not an object
  (18, :'tok', NULL, 'bulk-18', 1, NULL, NULL, jsonb_build_object('x', repeat('y', 17000)), NULL), -- PT422 metadata > 16 KiB
  (19, NULL, 'calls', 'bulk-19', NULL, NULL, NULL, NULL, '{"n": "lots"}'),                 -- 22P02 not a number
  (20, NULL, 'calls', 'bulk-20', NULL, NULL, NULL, NULL, '{"m": 1}'),                      -- 22004 properties.n
  (21, NULL, 'calls', 'bulk-21', NULL, NULL, NULL, NULL, NULL),                            -- 22004 quantity
  (22, :'tok_u', NULL, 'bulk-22', NULL, NULL, NULL, '{"other": 1}', NULL),                 -- 22004 user_id
  (23, :'tok_u', NULL, 'bulk-23', NULL, '2031-06-15 12:05:00+00', NULL, '{"user_id": "u1"}', NULL); -- created (COUNT of 1, 5 min ahead)
SELECT r->>'rows' AS rows, r->>'created' AS created, r->>'replayed' AS replayed, r->>'refused' AS refused
  FROM fluxrate.load_events('staging') r;
SELECT x->>'line' AS line, x->>'code' AS code, x->>'message' AS message
  FROM fluxrate.load_events('staging') r, jsonb_array_elements(r->'refusals') x;
-- nothing half-written: the refused rows' customers were not created; the
-- second load created only line 23 again (no idempotency key: a new event each
-- time, as with track), its keyed rows were replays, its refusals the same
SELECT external_id FROM fluxrate_internal.customers WHERE org_id = :'org_a' ORDER BY 1;
SELECT idempotency_key, quantity, metadata, tableoid::regclass AS part FROM fluxrate_internal.usage_events
 WHERE org_id = :'org_a' AND customer_id IN (SELECT id FROM fluxrate_internal.customers WHERE external_id LIKE 'bulk-%')
 ORDER BY "timestamp";
-- a key loaded in bulk replays through track (the same payload hash)
SELECT (fluxrate.track(meter_token => :'tok', customer_external_id => 'bulk-1', quantity => 4, idempotency_key => 'L-1',
        "timestamp" => '2031-03-01 00:00+00', metadata => '{"src": "file"}'))->>'replay' AS replay_of_load;
-- a staging table with only some columns: line is the row order
CREATE TEMP TABLE few (customer_external_id text, meter_token text, quantity numeric);
GRANT SELECT ON few TO fluxrate_owner;
INSERT INTO few VALUES ('bulk-30', :'tok', 1), ('bulk-31', :'tok', -1);
SELECT r->>'created' AS created, r->'refusals' AS refusals FROM fluxrate.load_events('few') r;
-- a table with nothing of an event: 22023; no table: 22004 / 42P01
CREATE TEMP TABLE junk (a int);
GRANT SELECT ON junk TO fluxrate_owner;
SELECT fluxrate.load_events('junk');
SELECT fluxrate.load_events(NULL);
SELECT fluxrate.load_events('no_such_table');
-- outside an organization: the load is refused before it reads anything
RESET fluxrate.acting_org;
SELECT fluxrate.load_events('staging');
