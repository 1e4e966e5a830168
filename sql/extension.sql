-- The extension itself: version, schemas, settings, the clock, re-installation.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

SELECT extname, extversion, extrelocatable, n.nspname AS schema
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE extname = 'fluxrate';

-- nothing of ours lands in public; everything is in fluxrate or fluxrate_internal
SELECT count(*) AS objects_in_public
  FROM pg_depend d JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'fluxrate')
   AND p.pronamespace = 'public'::regnamespace;
SELECT DISTINCT n.nspname AS table_schema
  FROM pg_depend d JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'fluxrate') ORDER BY 1;

-- the fluxrate.* prefix is reserved: a typo is an error, not a silent placeholder
SET fluxrate.pinned_nwo = '2026-01-01';
-- the clock: pinned by a superuser, else the transaction start
SET fluxrate.pinned_now = '2026-03-01 12:00:00+00';
SELECT fluxrate.now() AS pinned;
BEGIN;
SET LOCAL fluxrate.pinned_now = '';
SELECT fluxrate.now() = now() AS follows_transaction_start;
COMMIT;
SET fluxrate.pinned_now = 'not a time';
SELECT fluxrate.now();
RESET fluxrate.pinned_now;
SELECT fluxrate.now() = now() AS unpinned;

-- only superusers may move the clock
CREATE ROLE fluxrate_test_clock;
SET ROLE fluxrate_test_clock;
SET fluxrate.pinned_now = '2020-01-01';
RESET ROLE;
DROP ROLE fluxrate_test_clock;

-- the API surface is not executable by PUBLIC
SELECT count(*) AS public_executable
  FROM pg_proc p
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
   AND has_function_privilege('public', p.oid, 'EXECUTE');

-- identifiers: UUIDv7 (version nibble 7, time-ordered) and base62 tokens
SELECT substr(fluxrate_internal.uuid_v7()::text, 15, 1) AS version;
SELECT length(fluxrate_internal.random_token(43)) AS len, fluxrate_internal.random_token(43) ~ '^[0-9A-Za-z]{43}$' AS base62;
SELECT fluxrate_internal.random_token(0);

-- drop and create again: roles survive (cluster-wide), the extension installs cleanly
DROP EXTENSION fluxrate CASCADE;
-- PostgreSQL keeps the schema CREATE EXTENSION made for the control file's
-- "schema = fluxrate" (it is not an extension member); it is left empty
SELECT n.nspname AS leftover_schema,
       (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = n.oid) AS functions
  FROM pg_namespace n WHERE nspname IN ('fluxrate', 'fluxrate_internal');
CREATE EXTENSION fluxrate;
SELECT extversion FROM pg_extension WHERE extname = 'fluxrate';
-- already at the newest version: the upgrade path has nothing to do
ALTER EXTENSION fluxrate UPDATE;

-- every table has row-level security enabled and forced; every SECURITY DEFINER
-- function pins search_path (expected: no rows)
SELECT c.relname AS table_without_forced_rls FROM pg_class c
 WHERE c.relnamespace = 'fluxrate_internal'::regnamespace AND c.relkind = 'r'
   AND NOT (c.relrowsecurity AND c.relforcerowsecurity) ORDER BY 1;
SELECT p.oid::regprocedure AS definer_without_search_path FROM pg_proc p
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace) AND p.prosecdef
   AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%') ORDER BY 1;
-- the only tables without org_id are the two that hold one row or a few for the
-- whole database, which only fluxrate_system writes: the server secrets and the
-- usage rollups' state (tenants read its snapshot, nothing else)
SELECT c.relname AS table_without_org_id FROM pg_class c
 WHERE c.relnamespace = 'fluxrate_internal'::regnamespace AND c.relkind = 'r'
   AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped)
 ORDER BY 1;
-- org_id leads every primary key of a tenant table, and is in every unique key and foreign key
SELECT conrelid::regclass AS constraint_without_org_id, conname FROM pg_constraint con
 WHERE connamespace = 'fluxrate_internal'::regnamespace AND contype IN ('p', 'u', 'f')
   AND conrelid <> 'fluxrate_internal.server_secrets'::regclass
   AND NOT (SELECT attnum FROM pg_attribute WHERE attrelid = con.conrelid AND attname = 'org_id') = ANY (con.conkey)
 ORDER BY 1, 2;
SELECT conrelid::regclass AS pk_not_led_by_org_id FROM pg_constraint con
 WHERE connamespace = 'fluxrate_internal'::regnamespace AND contype = 'p'
   AND conrelid <> 'fluxrate_internal.server_secrets'::regclass
   AND con.conkey[1] <> (SELECT attnum FROM pg_attribute WHERE attrelid = con.conrelid AND attname = 'org_id')
 ORDER BY 1;
-- the closer's run snapshot lives in temporary tables of fluxrate_system: it may
-- create them even where TEMPORARY is revoked from PUBLIC
DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); END $$;
SELECT has_database_privilege('fluxrate_system', current_database(), 'TEMPORARY') AS closer_may_create_temp_tables;
DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database()); END $$;
