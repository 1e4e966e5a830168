-- API-key format of 0.2.0: org_live_<organization id, 32 hex digits>_<43 base62>.
-- The tag lets a router (fluxrate_router, docs/scale-out.md) pick the shard
-- before any lookup; the shard still verifies the whole key by its keyed hash.
-- Keys of the 0.1.0 form (org_live_ + 43) keep working on their server.
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '2026-03-01 12:00:00+00';
SELECT (fluxrate.create_organization('Tagged'))->>'id' AS org_t \gset
SELECT (fluxrate.create_organization('Other'))->>'id' AS org_o \gset
SELECT fluxrate.act_as(:'org_t', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_feature('Calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_token' AS tok \gset
SELECT fluxrate.create_customer(name => 'C', email => 'c@example.com', external_id => 'c') IS NOT NULL AS customer;
SELECT k->>'key' AS key_t, k->>'prefix' AS prefix_t FROM fluxrate.create_api_key('tagged', ARRAY['usage.write']) k \gset
-- the tag is the organization's id; the display prefix is the key up to 4 characters of its secret
SELECT substr(:'key_t', 10, 32)::uuid = :'org_t'::uuid AS tag_is_org, length(:'key_t') AS key_length,
       :'prefix_t' = left(:'key_t', 46) AS prefix_is_start, substr(:'key_t', 42, 1) AS separator;
-- a 0.1.0 key: made the 0.1.0 way (no organization in context), stored as 0.1.0 stored it
RESET fluxrate.acting_org;
BEGIN;
SELECT key AS key_old, prefix AS prefix_old, encode(key_hash, 'hex') AS hash_old FROM fluxrate_internal.new_api_key() \gset
COMMIT;
SELECT length(:'key_old') AS old_length, :'key_old' ~ '^org_live_[0-9A-Za-z]{43}$' AS old_form, length(:'prefix_old') AS old_prefix_length;
INSERT INTO fluxrate_internal.api_keys (org_id, name, prefix, key_hash, scopes, created_at)
VALUES (:'org_t', 'from 0.1.0', :'prefix_old', decode(:'hash_old', 'hex'), ARRAY['usage.write'], fluxrate.now());
-- both work, both for their organization
SELECT (fluxrate.track(api_key => :'key_t', meter_token => :'tok', customer_external_id => 'c', quantity => 2,
        idempotency_key => 'k1'))->>'replay' AS tagged_replay;
SELECT (fluxrate.track(api_key => :'key_old', meter_token => :'tok', customer_external_id => 'c', quantity => 3,
        idempotency_key => 'k2'))->>'replay' AS old_replay;
SELECT org_id = :'org_t'::uuid AS tagged_org FROM fluxrate_internal.sys_verify_api_key(:'key_t');
SELECT org_id = :'org_t'::uuid AS old_org FROM fluxrate_internal.sys_verify_api_key(:'key_old');
SELECT sum(quantity) AS tracked FROM fluxrate_internal.usage_events WHERE org_id = :'org_t';   -- 2 + 3 = 5
-- refusals, all PT401 with nothing written
\set VERBOSITY default
\set ON_ERROR_STOP 0
-- another organization's tag on this key's secret: another string, another hash, unknown
SELECT fluxrate_internal.sys_verify_api_key('org_live_' || replace(:'org_o', '-', '') || substr(:'key_t', 42));
-- upper-case hex, a missing separator, a short secret: malformed
SELECT fluxrate_internal.sys_verify_api_key(upper(left(:'key_t', 41)) || substr(:'key_t', 42));
SELECT fluxrate_internal.sys_verify_api_key(left(:'key_t', 41) || 'x' || substr(:'key_t', 43));
SELECT fluxrate_internal.sys_verify_api_key(left(:'key_t', 84));
SELECT fluxrate.track(api_key => left(:'key_t', 84), meter_token => :'tok', customer_external_id => 'c', quantity => 1,
       idempotency_key => 'k3');
-- the same five, their SQLSTATE
\set VERBOSITY sqlstate
SELECT fluxrate_internal.sys_verify_api_key('org_live_' || replace(:'org_o', '-', '') || substr(:'key_t', 42));
SELECT fluxrate_internal.sys_verify_api_key(upper(left(:'key_t', 41)) || substr(:'key_t', 42));
SELECT fluxrate_internal.sys_verify_api_key(left(:'key_t', 41) || 'x' || substr(:'key_t', 43));
SELECT fluxrate_internal.sys_verify_api_key(left(:'key_t', 84));
SELECT fluxrate.track(api_key => left(:'key_t', 84), meter_token => :'tok', customer_external_id => 'c', quantity => 1,
       idempotency_key => 'k3');
\set ON_ERROR_STOP 1
\set VERBOSITY terse
SELECT count(*) AS events FROM fluxrate_internal.usage_events WHERE org_id = :'org_t';   -- still 2
-- the other organization's keys carry its own tag
SELECT fluxrate.act_as(:'org_o', true) IS NOT NULL AS acting_other;
SELECT substr((fluxrate.create_api_key('other', ARRAY['usage.write']))->>'key', 10, 32)::uuid = :'org_o'::uuid AS other_tag;
