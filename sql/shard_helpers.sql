-- The shard side of fluxrate_router (src/sql/85_shard.sql): moving one
-- organization's rows, sharing server secrets.  Superuser-only.
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '2026-03-01 12:00:00+00';
SELECT (fluxrate.create_organization('Mover'))->>'id' AS org_m \gset
SELECT (fluxrate.create_organization('Stayer'))->>'id' AS org_s \gset
SELECT fluxrate.act_as(:'org_m', true) IS NOT NULL AS acting;
SELECT fluxrate.create_customer(name => 'C' || g, email => 'c' || g || '@example.com', external_id => 'c' || g) IS NOT NULL
  FROM generate_series(1, 3) g;
SELECT fluxrate.act_as(:'org_s', true) IS NOT NULL AS acting;
SELECT fluxrate.create_customer(name => 'S', email => 's@example.com', external_id => 's') IS NOT NULL AS other_customer;
RESET fluxrate.acting_org;
-- the tables, parents first; the rollups are derived; xact_id is not carried
SELECT tbl, depth, derived FROM fluxrate_internal.sys_org_tables() WHERE tbl IN
  ('organizations', 'customers', 'subscriptions', 'invoices', 'invoice_lines', 'usage_events', 'usage_rollups') ORDER BY depth, tbl;
SELECT position('xact_id' IN cols) = 0 AS no_xact_id FROM fluxrate_internal.sys_org_tables() WHERE tbl = 'usage_events';
SELECT tbl, n FROM fluxrate_internal.sys_org_rows(:'org_m') WHERE n > 0 ORDER BY tbl;
-- export, delete, import back: the same rows (another organization's untouched)
SELECT jsonb_array_length(fluxrate_internal.sys_org_export('customers', :'org_m')) AS exported;
SELECT fluxrate_internal.sys_org_export('customers', :'org_m') AS rows_m \gset
SELECT md5(string_agg(c::text, ',' ORDER BY c.id)) AS before FROM fluxrate_internal.customers c WHERE org_id = :'org_m' \gset
SELECT fluxrate_internal.sys_org_delete('customers', :'org_m') AS deleted;
SELECT count(*) AS left_m FROM fluxrate_internal.customers WHERE org_id = :'org_m';
SELECT fluxrate_internal.sys_org_import('customers', :'org_m', :'rows_m') AS imported;
SELECT md5(string_agg(c::text, ',' ORDER BY c.id)) = :'before' AS same_rows FROM fluxrate_internal.customers c WHERE org_id = :'org_m';
SELECT count(*) AS other_org_customers FROM fluxrate_internal.customers WHERE org_id = :'org_s';
-- refusals
\set VERBOSITY sqlstate
\set ON_ERROR_STOP 0
SELECT fluxrate_internal.sys_org_export('server_secrets', :'org_m');             -- 22023: no org_id
SELECT fluxrate_internal.sys_org_export('customers; DROP TABLE x', :'org_m');    -- 22023
SELECT fluxrate_internal.sys_org_import('customers', :'org_s', :'rows_m');       -- 22023: another organization's rows
SELECT fluxrate_internal.sys_org_delete('pg_class', :'org_m');                   -- 22023
-- (replacing the secrets of a shard nothing depends on yet: test/scripts/router.sh, share_secrets)
CREATE ROLE fr_not_super;
GRANT USAGE ON SCHEMA fluxrate_internal TO fr_not_super;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate_internal TO fr_not_super;
SET ROLE fr_not_super;
SELECT fluxrate_internal.sys_org_export('customers', :'org_m');                  -- 42501
SELECT fluxrate_internal.sys_org_delete('customers', :'org_m');                  -- 42501
SELECT * FROM fluxrate_internal.sys_secrets_digest();                            -- 42501
RESET ROLE;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA fluxrate_internal FROM fr_not_super;
REVOKE USAGE ON SCHEMA fluxrate_internal FROM fr_not_super;
DROP ROLE fr_not_super;
-- once an API key exists, the secrets may not be replaced
SELECT fluxrate.act_as(:'org_m', true) IS NOT NULL AS acting;
SELECT fluxrate.create_api_key('k', ARRAY['usage.write']) IS NOT NULL AS key_made;
RESET fluxrate.acting_org;
SELECT keyed_rows >= 1 AS in_use, length(digest) AS digest_length FROM fluxrate_internal.sys_secrets_digest();
SELECT fluxrate_internal.sys_put_server_secrets(fluxrate_internal.sys_export_server_secrets());  -- 55000
\set ON_ERROR_STOP 1
\set VERBOSITY terse
SELECT count(*) AS customers_m FROM fluxrate_internal.customers WHERE org_id = :'org_m';
