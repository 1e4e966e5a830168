-- 99_security.sql: runs last.  Ownership, row-level security and privileges
-- for everything the parts above created, so no part can forget them.

DO $security$
DECLARE
  r record;
BEGIN
  -- Tables: owned by fluxrate_owner, RLS enabled and FORCED (the owner is
  -- subject to it too).  Tenant tables get one policy: the row's org_id is the
  -- organization the running API call resolved.  fluxrate_system bypasses RLS
  -- (its few cross-organization functions check org_id themselves).
  FOR r IN
    SELECT c.oid::regclass AS tbl,
           EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                   WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) 'org_id'
                     AND NOT a.attisdropped) AS has_org
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'fluxrate_internal'::regnamespace
       AND c.relkind IN ('r', 'p')
  LOOP
    EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO fluxrate_owner', r.tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', r.tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', r.tbl);
    IF r.has_org THEN
      -- this file runs again at the end of every upgrade script: policies are
      -- made anew rather than assumed absent
      EXECUTE pg_catalog.format('DROP POLICY IF EXISTS tenant_wall ON %s', r.tbl);
      EXECUTE pg_catalog.format(
        'CREATE POLICY tenant_wall ON %s FOR ALL TO fluxrate_owner '
        'USING (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id()) '
        'WITH CHECK (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id())', r.tbl);
    END IF;
    EXECUTE pg_catalog.format('GRANT ALL ON TABLE %s TO fluxrate_system', r.tbl);
    -- the data is the customer's, not the extension's: pg_dump must include it.
    -- Not the usage rollups: derived from the events, and counted by transaction
    -- ids that mean nothing in the cluster a dump is restored into (the restored
    -- database starts without a state and rebuilds them from the events).
    IF r.tbl OPERATOR(pg_catalog.<>) 'fluxrate_internal.usage_rollups'::regclass
       AND r.tbl OPERATOR(pg_catalog.<>) 'fluxrate_internal.usage_rollup_state'::regclass THEN
      PERFORM pg_catalog.pg_extension_config_dump(r.tbl, '');
    END IF;
  END LOOP;
  -- the rollup state (no org_id: one row for the cluster, like server_secrets)
  -- is read by the tenant-confined readers of the rollups: a snapshot, nothing else
  DROP POLICY IF EXISTS rollup_state_read ON fluxrate_internal.usage_rollup_state;
  CREATE POLICY rollup_state_read ON fluxrate_internal.usage_rollup_state FOR SELECT TO fluxrate_owner USING (true);

  FOR r IN
    SELECT c.oid::regclass AS seq FROM pg_catalog.pg_class c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'fluxrate_internal'::regnamespace AND c.relkind OPERATOR(pg_catalog.=) 'S'
  LOOP
    EXECUTE pg_catalog.format('ALTER SEQUENCE %s OWNER TO fluxrate_owner', r.seq);
    EXECUTE pg_catalog.format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO fluxrate_system', r.seq);
  END LOOP;

  -- Functions: SECURITY DEFINER ones run as their owner.  Internal functions
  -- named sys_* work across organizations and are owned by fluxrate_system;
  -- everything else by fluxrate_owner, which row-level security confines to
  -- one organization.  Every definer function must pin search_path (tested).
  FOR r IN
    SELECT p.oid::regprocedure AS fn, p.prokind, p.proname
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
  LOOP
    EXECUTE pg_catalog.format('ALTER %s %s OWNER TO %s',
      CASE r.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, r.fn,
      CASE WHEN r.proname LIKE 'sys\_%' THEN 'fluxrate_system' ELSE 'fluxrate_owner' END);
    EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM PUBLIC',
      CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.fn);
  END LOOP;
END
$security$;

ALTER SCHEMA fluxrate_internal OWNER TO fluxrate_owner;
REVOKE ALL ON SCHEMA fluxrate_internal FROM PUBLIC;
GRANT USAGE ON SCHEMA fluxrate_internal TO fluxrate_system;
GRANT USAGE ON SCHEMA fluxrate TO fluxrate_owner, fluxrate_system, fluxrate_app;
-- fluxrate_owner calls a few sys_* helpers (API-key lookup) and vice versa
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate_internal TO fluxrate_owner, fluxrate_system;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_owner, fluxrate_system;
-- The trusted application role may call the whole public API.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_app;
GRANT EXECUTE ON ALL PROCEDURES IN SCHEMA fluxrate TO fluxrate_app;

-- The PostgREST roles (80_http.sql), least privilege.  A role calling a function
-- it may not execute gets 42501, which PostgREST answers 401 for the anonymous
-- role and 403 for the others.
GRANT USAGE ON SCHEMA fluxrate, fluxrate_internal TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- what the pre-request needs, whoever the caller is
GRANT EXECUTE ON FUNCTION fluxrate.pre_request(), fluxrate_internal.sys_api_key_claims(text),
  fluxrate_internal.sys_access_token_claims(text), fluxrate_internal.sys_token_user_exists(uuid, uuid),
  fluxrate_internal.http_statement_timeout(text) TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- no credentials: sign up, log in, refresh, read a public invoice link
GRANT EXECUTE ON FUNCTION fluxrate.signup(text, text, text), fluxrate.login(text, text), fluxrate.refresh(text),
  fluxrate.public_invoice(text) TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- API keys: ingestion and usage reads; each function still checks the key's scopes
GRANT EXECUTE ON FUNCTION fluxrate.track(text, text, numeric, timestamptz, text, jsonb, text, jsonb, text),
  fluxrate.track_batch(jsonb, text), fluxrate.get_customer_usage(uuid), fluxrate.get_subscription_usage(uuid),
  fluxrate.check_entitlement(text, text), fluxrate.list_meter_events(uuid, integer, integer),
  fluxrate.get_meter_usage(uuid, timestamptz, timestamptz, text, uuid, boolean), fluxrate.get_meter_stats(uuid)
  TO fluxrate_apikey;
-- SQL applications that only track (fluxrate_ingest, docs/security.md "Roles"):
-- track and track_batch, each authenticated by its api_key argument; the role
-- is never one whose claims are believed, and it cannot act_as
GRANT USAGE ON SCHEMA fluxrate TO fluxrate_ingest;
GRANT EXECUTE ON FUNCTION fluxrate.track(text, text, numeric, timestamptz, text, jsonb, text, jsonb, text),
  fluxrate.track_batch(jsonb, text) TO fluxrate_ingest;
-- the operator's check of who holds the claims-believing roles
GRANT EXECUTE ON FUNCTION fluxrate_internal.role_grant_warnings(), fluxrate_internal.warn_role_grants() TO fluxrate_app;
-- signed-in users: the whole management API of their organization, but not the
-- trusted-role doors (creating organizations, acting for one) nor the jobs
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_web;
REVOKE EXECUTE ON FUNCTION fluxrate.create_organization(text, text, text, integer, interval),
  fluxrate.act_as(uuid, boolean), fluxrate.schedule_jobs(), fluxrate.unschedule_jobs(),
  fluxrate.refresh_usage_rollups(boolean), fluxrate.maintain_event_storage() FROM fluxrate_web;
-- The closer keeps a run's usage snapshot in two temporary tables of its
-- session (sys_close_prepare), created as fluxrate_system: granted here so that
-- a database that revokes TEMPORARY from PUBLIC still closes its periods.
DO $temp$
BEGIN
  EXECUTE pg_catalog.format('GRANT TEMPORARY ON DATABASE %I TO fluxrate_system', pg_catalog.current_database());
END
$temp$;
