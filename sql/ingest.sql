-- Ingestion: API keys, track (both shapes), idempotency, every refusal with its
-- SQLSTATE and proof that nothing was written, transactions, batches, tenancy.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-06-10 12:00:00+00';
SELECT (fluxrate.create_organization('Acme'))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting_a;
SELECT f->>'meter_token' AS tok_sum, f->>'meter_id' AS meter_sum
  FROM fluxrate.create_feature('API calls', 'api_calls', 'meter', meter_name => 'api_calls', property_name => 'calls',
       aggregation_type => 'SUM') f \gset
SELECT f->>'meter_token' AS tok_users FROM fluxrate.create_feature('Active users', 'users', 'meter', meter_name => 'users',
       aggregation_type => 'UNIQUE_COUNT') f \gset
SELECT f->>'meter_token' AS tok_gauge FROM fluxrate.create_feature('Seats', 'seats', 'meter', meter_name => 'seats',
       property_name => 'seats', aggregation_type => 'LAST') f \gset

-- API keys -------------------------------------------------------------------
SELECT k->>'key' AS key_w, k->>'id' AS key_w_id FROM fluxrate.create_api_key('writer', ARRAY['usage.write']) k \gset
SELECT k->>'key' AS key_r FROM fluxrate.create_api_key('reader', ARRAY['usage.read']) k \gset
-- org_live_<the organization's id in hex>_<43 random characters> (docs/ingestion.md)
SELECT :'key_w' ~ ('^org_live_' || replace(:'org_a', '-', '') || '_[0-9A-Za-z]{43}$') AS key_format, length(:'key_w') AS key_length;
SELECT fluxrate.create_api_key('', ARRAY['usage.write']);          -- 22004 name
SELECT fluxrate.create_api_key('x', ARRAY[]::text[]);              -- 22004 scopes
SELECT fluxrate.create_api_key('x', ARRAY['usage.delete']);        -- 22023 unknown scope
SELECT count(*) AS keys FROM fluxrate_internal.api_keys WHERE org_id = :'org_a';
-- the list never shows the secret or the hash; the table holds no copy of it
SELECT jsonb_object_keys((fluxrate.list_api_keys())->'data'->0) AS listed_field ORDER BY 1;
SELECT count(*) AS secrets_in_table FROM fluxrate_internal.api_keys
 WHERE position(:'key_w' IN coalesce(name, '') || prefix || encode(key_hash, 'hex')) > 0;
SELECT (fluxrate_internal.sys_verify_api_key(:'key_w')).scopes AS verified_scopes;
SELECT fluxrate_internal.sys_verify_api_key('org_live_' || repeat('x', 43));   -- PT401 unknown
SELECT fluxrate_internal.sys_verify_api_key('sk_live_abc');                   -- PT401 malformed

-- track: meter_token + quantity ---------------------------------------------
SELECT e->>'quantity' AS quantity, e->>'replay' AS replay, e->>'idempotency_key' AS idem, e->'meta_data' AS meta
  FROM fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'cust-1',
       quantity => 12.500, idempotency_key => 'order_1', metadata => '{"region": "eu"}') e;
-- the customer was created on the fly: name = external id, no e-mail
SELECT name, external_id, email FROM fluxrate_internal.customers WHERE org_id = :'org_a';
-- the retry returns the original event, flagged as a replay (HTTP 200)
SELECT (x->>'id')::uuid = (SELECT id FROM fluxrate_internal.usage_events WHERE org_id = :'org_a' AND idempotency_key = 'order_1') AS same_event,
       x->>'replay' AS replay, current_setting('response.status') AS http_status
  FROM fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'cust-1',
       quantity => 12.5, idempotency_key => 'order_1', metadata => '{"region": "eu"}') x;
-- the same key with another payload is a conflict, and writes nothing
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'cust-1', quantity => 13, idempotency_key => 'order_1');  -- PT409
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'cust-2', quantity => 12.5, idempotency_key => 'order_1', metadata => '{"region": "eu"}');  -- PT409
SELECT count(*) AS events, sum(quantity) AS total FROM fluxrate_internal.usage_events WHERE org_id = :'org_a';
SELECT count(*) AS customers FROM fluxrate_internal.customers WHERE org_id = :'org_a';

-- track: meter_name + properties (the quantity is properties[property_name])
SELECT e->>'quantity' AS quantity, e->'meta_data' AS meta
  FROM fluxrate.track(api_key => :'key_w', meter_name => 'api_calls', customer_external_id => 'cust-1',
       properties => '{"calls": 7, "region": "us"}', idempotency_key => 'p1') e;
SELECT e->>'quantity' AS quantity FROM fluxrate.track(api_key => :'key_w', meter_name => 'api_calls', customer_external_id => 'cust-1',
       properties => '{"calls": "0.000000000001"}') e;
-- UNIQUE_COUNT and LAST meters
SELECT e->>'quantity' AS quantity FROM fluxrate.track(api_key => :'key_w', meter_token => :'tok_users', customer_external_id => 'cust-1',
       metadata => '{"user_id": "u1"}') e;
SELECT e->>'quantity' AS quantity FROM fluxrate.track(api_key => :'key_w', meter_token => :'tok_gauge', customer_external_id => 'cust-1',
       quantity => 0) e;

-- refusals: each its own SQLSTATE, naming the field; nothing written
SELECT count(*) AS events_before FROM fluxrate_internal.usage_events WHERE org_id = :'org_a';
SELECT fluxrate.track(api_key => :'key_w', customer_external_id => 'c', quantity => 1);                         -- 22004 meter
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', quantity => 1);                           -- 22004 customer
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c');             -- 22004 quantity
SELECT fluxrate.track(api_key => :'key_w', meter_token => gen_random_uuid()::text, customer_external_id => 'c', quantity => 1); -- PT404
SELECT fluxrate.track(api_key => :'key_w', meter_token => 'not-a-token', customer_external_id => 'c', quantity => 1);  -- PT404
SELECT fluxrate.track(api_key => :'key_w', meter_name => 'nope', customer_external_id => 'c', properties => '{"calls": 1}'); -- PT404
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 0);      -- PT422
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => -3);     -- PT422
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 'NaN');  -- PT422
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 'Infinity'); -- PT422
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1.0000000000001); -- PT422 13 places
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1,
       "timestamp" => '2026-06-10 12:05:01+00');                                                                       -- PT422 future
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1, metadata => '[1, 2]'); -- 22023
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1,
       metadata => jsonb_build_object('blob', repeat('x', 17000)));                                                    -- PT422 16 KiB
SELECT fluxrate.track(api_key => :'key_w', meter_name => 'api_calls', customer_external_id => 'c', properties => '{"calls": "lots"}'); -- 22P02
SELECT fluxrate.track(api_key => :'key_w', meter_name => 'api_calls', customer_external_id => 'c', properties => '{"other": 1}');     -- 22004
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_users', customer_external_id => 'c');           -- 22004 user_id
SELECT fluxrate.track(meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1, api_key => :'key_r'); -- PT403 scope
SELECT fluxrate.track(meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1, api_key => 'org_live_nope'); -- PT401
SELECT fluxrate.track(meter_token => :'tok_sum', customer_external_id => 'c', quantity => 'abc');                 -- 22P02 (type)
-- a timestamp up to 5 minutes ahead (clock skew) is accepted
SELECT (fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1,
        "timestamp" => '2026-06-10 12:05:00+00'))->>'timestamp' AS skewed_ok;
SELECT count(*) AS events_after, (SELECT count(*) FROM fluxrate_internal.customers WHERE org_id = :'org_a') AS customers
  FROM fluxrate_internal.usage_events WHERE org_id = :'org_a';

-- transactions: usage exists if and only if the caller commits
BEGIN;
SELECT (fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'rolled-back',
        quantity => 5, idempotency_key => 'tx-1'))->>'replay' AS replay_in_tx;
ROLLBACK;
SELECT count(*) AS after_rollback FROM fluxrate_internal.usage_events WHERE idempotency_key = 'tx-1';
SELECT count(*) AS customer_after_rollback FROM fluxrate_internal.customers WHERE external_id = 'rolled-back';
SELECT (fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'rolled-back',
        quantity => 5, idempotency_key => 'tx-1'))->>'replay' AS replay_after_rollback;

-- batch: one result per event; a bad event loses none of the others
SELECT r->>'index' AS idx, r->>'status' AS status, r->>'code' AS code, r->>'message' AS message
  FROM jsonb_array_elements((fluxrate.track_batch(jsonb_build_array(
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b1', 'quantity', 2, 'idempotency_key', 'batch-1'),
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b1', 'quantity', -2),
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b1', 'quantity', 2, 'idempotency_key', 'batch-1'),
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b1', 'quantity', 3, 'idempotency_key', 'batch-1'),
         jsonb_build_object('meter_name', 'api_calls', 'customer_external_id', 'b2', 'properties', jsonb_build_object('calls', 4)),
         'not an object'::text,
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b3', 'quantity', 1, 'timestamp', '2026-06-01T00:00:00Z')
       ), :'key_w'))->'results') r;
SELECT customer_id IS NOT NULL AS has_customer, quantity FROM fluxrate_internal.usage_events
 WHERE org_id = :'org_a' AND customer_id IN (SELECT id FROM fluxrate_internal.customers WHERE external_id IN ('b1', 'b2', 'b3'))
 ORDER BY quantity;
SELECT fluxrate.track_batch((SELECT jsonb_agg(jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'x', 'quantity', 1))
                             FROM generate_series(1, 1001)), :'key_w');   -- PT422 over 1,000
SELECT fluxrate.track_batch('[]', :'key_w');                               -- PT422 empty
SELECT fluxrate.track_batch('{"a": 1}', :'key_w');                         -- 22023 not an array

-- events list (usage.read)
SELECT (fluxrate.list_meter_events(:'meter_sum', page_size => 2))->'meta' AS meta;

-- tenancy: org B's key cannot touch org A's meters; B sees none of A's events or keys
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT k->>'key' AS key_b FROM fluxrate.create_api_key('b writer', ARRAY['usage.write']) k \gset
SELECT fluxrate.track(api_key => :'key_b', meter_token => :'tok_sum', customer_external_id => 'cust-1', quantity => 1);  -- PT404
SELECT fluxrate.track(api_key => :'key_b', meter_name => 'api_calls', customer_external_id => 'cust-1', properties => '{"calls": 1}'); -- PT404
SELECT fluxrate.list_meter_events(:'meter_sum');                                                                        -- PT404
SELECT (fluxrate.list_api_keys())->'meta'->'total' AS b_keys;
SELECT fluxrate.revoke_api_key(:'key_w_id');                                                                            -- PT404
-- the same idempotency key is free in another organization
SELECT f->>'meter_token' AS tok_b FROM fluxrate.create_feature('API calls', 'api_calls', 'meter', meter_name => 'api_calls',
       property_name => 'calls', aggregation_type => 'SUM') f \gset
SELECT (fluxrate.track(api_key => :'key_b', meter_token => :'tok_b', customer_external_id => 'cust-1', quantity => 1,
        idempotency_key => 'order_1'))->>'replay' AS b_replay;
-- a batch with org B's key (written as fluxrate_system, so only C keeps the wall): org A's
-- meter token is unknown here (PT404 for that event); the external id 'b1', a customer of A,
-- becomes B's own customer; A's 'b1' keeps its 2
SELECT r->>'index' AS idx, r->>'status' AS status, r->>'code' AS code
  FROM jsonb_array_elements((fluxrate.track_batch(jsonb_build_array(
         jsonb_build_object('meter_token', :'tok_sum', 'customer_external_id', 'b1', 'quantity', 1),
         jsonb_build_object('meter_token', :'tok_b', 'customer_external_id', 'b1', 'quantity', 7)), :'key_b'))->'results') r;
SELECT c.org_id = :'org_b' AS in_b,
       (SELECT sum(e.quantity) FROM fluxrate_internal.usage_events e WHERE e.org_id = c.org_id AND e.customer_id = c.id) AS usage
  FROM fluxrate_internal.customers c WHERE c.external_id = 'b1' AND c.org_id IN (:'org_a', :'org_b') ORDER BY 1;

-- revocation is effective at once
SELECT fluxrate.act_as(:'org_a', true) IS NOT NULL AS acting_a;
SELECT (fluxrate.revoke_api_key(:'key_w_id'))->>'status' AS status;
SELECT fluxrate.track(api_key => :'key_w', meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1);  -- PT401
SELECT fluxrate.revoke_api_key(gen_random_uuid());                                                                -- PT404
-- track keeps the rows it reads (key, meter, customer) per backend; every change is seen
-- by the next call, here in the same session, even inside the changing transaction
-- (test/scripts/ingest_cache.sh: other sessions, rollbacks, REPEATABLE READ)
SELECT tgrelid::regclass AS cached_table, tgenabled FROM pg_trigger WHERE tgname = 'ingest_cache_invalidate' ORDER BY 1;
BEGIN;
SELECT k->>'key' AS key_tx, k->>'id' AS key_tx_id FROM fluxrate.create_api_key('tx', ARRAY['usage.write']) k \gset
SELECT (fluxrate.track(api_key => :'key_tx', meter_token => :'tok_sum', customer_external_id => 'cache-1', quantity => 1))->>'replay' AS replay;
SELECT (fluxrate.revoke_api_key(:'key_tx_id'))->>'status' AS status;
SELECT fluxrate.track(api_key => :'key_tx', meter_token => :'tok_sum', customer_external_id => 'cache-1', quantity => 1);  -- PT401
ROLLBACK;
SELECT k->>'key' AS key_c FROM fluxrate.create_api_key('cache', ARRAY['usage.write']) k \gset
SELECT (fluxrate.track(api_key => :'key_c', meter_token => :'tok_sum', customer_external_id => 'cache-2', quantity => 1))->>'customer_id' AS cust_old \gset
SELECT (fluxrate.delete_customer(:'cust_old'))->>'deleted' AS deleted;
SELECT (fluxrate.track(api_key => :'key_c', meter_token => :'tok_sum', customer_external_id => 'cache-2', quantity => 1))->>'customer_id' AS cust_new \gset
SELECT :'cust_new' <> :'cust_old' AS new_customer,
       EXISTS (SELECT 1 FROM fluxrate_internal.customers WHERE id = :'cust_new' AND external_id = 'cache-2') AS exists;
-- track is SECURITY INVOKER (C): it resolves every name through pg_catalog alone and
-- writes as fluxrate_system, so a caller's search_path reaches none of its statements,
-- not even when they are re-planned
CREATE SCHEMA hostile;
CREATE FUNCTION hostile.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql
  AS $$ BEGIN RAISE EXCEPTION 'hostile operator called'; END $$;
CREATE OPERATOR hostile.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = hostile.uuid_eq);
CREATE TABLE hostile.usage_events (LIKE fluxrate_internal.usage_events);
SET search_path = hostile, pg_catalog, public;
DISCARD PLANS;
SELECT (fluxrate.track(api_key => :'key_c', meter_token => :'tok_sum', customer_external_id => 'cache-3', quantity => 1,
        idempotency_key => 'hostile-1'))->>'replay' AS replay;
SELECT (fluxrate.track(api_key => :'key_c', meter_token => :'tok_sum', customer_external_id => 'cache-3', quantity => 1,
        idempotency_key => 'hostile-1'))->>'replay' AS replay;
RESET search_path;
SELECT (SELECT count(*) FROM hostile.usage_events) AS hostile_rows,
       (SELECT count(*) FROM fluxrate_internal.usage_events WHERE idempotency_key = 'hostile-1') AS events;
DROP SCHEMA hostile CASCADE;
RESET fluxrate.acting_org;
-- no organization and no key: 401
SELECT fluxrate.track(meter_token => :'tok_sum', customer_external_id => 'c', quantity => 1);                    -- PT401
