-- 10_context.sql: who is calling, for which organization, and on which shard
-- that organization lives.  The same rules as a shard's require_org
-- (src/context.c), applied on the router before the call leaves it.

-- fluxrate's refusals: a SQLSTATE PostgREST maps (PT401 -> 401, ...), a lower-case
-- message, DETAIL/HINT when given.
CREATE FUNCTION fluxrate_router.fail(code text, message text, detail text DEFAULT NULL, hint text DEFAULT NULL)
  RETURNS void LANGUAGE plpgsql
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  -- RAISE takes no NULL option, and an empty one would still be printed
  IF detail IS NULL AND hint IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
  ELSIF hint IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail;
  ELSIF detail IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, HINT = hint;
  END IF;
  RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail, HINT = hint;
END
$$;

-- The role the call runs for, as seen from inside a SECURITY DEFINER function
-- (where current_user is the owner): the role PostgREST or the application
-- switched to with SET [LOCAL] ROLE, else the session user.
CREATE FUNCTION fluxrate_router.outer_role() RETURNS name
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none' THEN session_user
              ELSE pg_catalog.current_setting('role')::name END
$$;

-- Trusted: a superuser or a member of fluxrate_app (may act_as any organization).
CREATE FUNCTION fluxrate_router.is_trusted(r name) RETURNS boolean
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce((SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r), false)
      OR pg_catalog.pg_has_role(r, 'fluxrate_app', 'USAGE')
$$;

-- The number of shards: the p<N> options of the SQL/MED server fluxrate_shards.
CREATE FUNCTION fluxrate_router.shard_count() RETURNS integer
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT count(*)::integer
    FROM pg_catalog.pg_foreign_server s, pg_catalog.pg_options_to_table(s.srvoptions) o
   WHERE s.srvname OPERATOR(pg_catalog.=) 'fluxrate_shards' AND o.option_name ~ '^p[0-9]+$'
$$;

-- The organization a key or refresh token names: org_live_<32 hex>_<secret>,
-- rt_<32 hex>_<secret> (src/apikey.c).  NULL for the untagged 0.1.0 forms.
-- On the hot path of every keyed call (track): no SET clause and not STRICT,
-- so the planner inlines it into its caller's cached plan (PostgreSQL 15
-- parses and plans a SQL function that is not inlined on every call), and a
-- pattern without counted repetitions ({32}, {43} make a regex ~6x slower
-- here); the length and the one "_" after the tag pin the parts to 32 and 43.
CREATE FUNCTION fluxrate_router.tagged_org(token text, prefix text) RETURNS uuid
  LANGUAGE sql IMMUTABLE
  AS $$
  -- (OPERATOR() binds left to right at one precedence: parenthesized)
  SELECT CASE WHEN pg_catalog.length(token) OPERATOR(pg_catalog.=) (pg_catalog.length(prefix) OPERATOR(pg_catalog.+) 76)
               AND token OPERATOR(pg_catalog.~) ('^' OPERATOR(pg_catalog.||) prefix OPERATOR(pg_catalog.||) '[0-9a-f]+_[0-9A-Za-z]+$')
               AND pg_catalog.substr(token, pg_catalog.length(prefix) OPERATOR(pg_catalog.+) 33, 1) OPERATOR(pg_catalog.=) '_'
              THEN pg_catalog.substr(token, pg_catalog.length(prefix) OPERATOR(pg_catalog.+) 1, 32)::pg_catalog.uuid END
$$;

-- Where an organization lives, for a call about to leave for its shard.  The
-- shared advisory lock (per organization, until the router's transaction
-- ends) is what pause_organization() waits for: once it holds the lock
-- exclusively, no call that read "not paused" is still running.
-- No SET search_path (a SET clause costs every call a GUC save and restore,
-- and this runs on every routed call): it is called only from the SECURITY
-- DEFINER wrappers, which pin search_path, and by the operator; every name in
-- it is schema-qualified, and PUBLIC may not execute it (40_move.sql).
CREATE FUNCTION fluxrate_router.shard_of(org uuid) RETURNS integer
  LANGUAGE plpgsql VOLATILE
  AS $$
DECLARE
  o fluxrate_router.organizations;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock_shared(1179800658, pg_catalog.hashtext(org::text));
  SELECT x.* INTO o FROM fluxrate_router.organizations x WHERE x.org_id OPERATOR(pg_catalog.=) org;
  IF NOT FOUND THEN
    PERFORM fluxrate_router.fail('PT404', 'organization not found',
      pg_catalog.format('No shard of this router holds organization %s.', org));
  END IF;
  IF o.paused THEN
    PERFORM fluxrate_router.fail('PT503', 'organization is being moved',
      pg_catalog.format('Calls for organization %s are paused while it moves to another shard.', org),
      'Retry in a few seconds; a track call with the same idempotency_key is safe to retry.');
  END IF;
  RETURN o.shard;
END
$$;

-- The shard of an API key's organization: the key's tag (the shard verifies
-- the key itself).  The hot path of track through the router: the generated
-- wrappers of functions with an api_key parameter call this directly when a
-- key is given, not route(), and send no claims.  No SET clause (as shard_of).
CREATE FUNCTION fluxrate_router.key_shard(api_key text) RETURNS integer
  LANGUAGE plpgsql VOLATILE
  AS $$
DECLARE
  v_org uuid := fluxrate_router.tagged_org(api_key, 'org_live_');
BEGIN
  IF v_org IS NULL THEN
    IF api_key OPERATOR(pg_catalog.~) '^org_live_[0-9A-Za-z]{43}$' THEN
      PERFORM fluxrate_router.fail('PT401', 'api key names no organization',
        'Keys made by fluxrate 0.1.0 carry no organization tag, so the router cannot tell which shard holds them.',
        'Create a new key (fluxrate.create_api_key) and retire this one; on its own shard the old key still works.');
    END IF;
    PERFORM fluxrate_router.fail('PT401', 'invalid api key',
      'An API key is "org_live_", the organization id in 32 hex digits, "_" and 43 letters and digits.',
      'Create a key with fluxrate.create_api_key.');
  END IF;
  RETURN fluxrate_router.shard_of(v_org);
END
$$;

-- The shard and the claims to send for one call.
--   api_key given: the key's tag names the organization; the shard verifies
--     the key itself (no claims are sent).
--   request.jwt.claims with org_id (PostgREST verified the token, or the
--     router's pre_request verified the key on its shard): believed from
--     fluxrate_web, fluxrate_apikey and trusted roles, as on a shard; sent on.
--   fluxrate_router.acting_org (act_as): trusted roles only; sent as claims
--     {org_id} without scopes, which a shard reads as every scope for a
--     trusted caller (the router's own role on the shards is trusted).
CREATE FUNCTION fluxrate_router.route(api_key text, OUT part integer, OUT claims text)
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid;
  v_claims text;
  v_role name;
BEGIN
  IF api_key IS NOT NULL THEN
    part := fluxrate_router.key_shard(api_key);
    claims := '';
    RETURN;
  END IF;
  v_claims := NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '');
  IF v_claims IS NOT NULL AND v_claims::jsonb OPERATOR(pg_catalog.?) 'org_id' THEN
    v_role := fluxrate_router.outer_role();
    IF NOT (pg_catalog.pg_has_role(v_role, 'fluxrate_web', 'USAGE') OR pg_catalog.pg_has_role(v_role, 'fluxrate_apikey', 'USAGE')
            OR fluxrate_router.is_trusted(v_role)) THEN
      PERFORM fluxrate_router.fail('PT401', pg_catalog.format('request.jwt.claims is not accepted from role "%s"', v_role),
        NULL, 'Claims are set by PostgREST for fluxrate_web and fluxrate_apikey; application roles use fluxrate.act_as().');
    END IF;
    BEGIN
      v_org := (v_claims::jsonb OPERATOR(pg_catalog.->>) 'org_id')::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
      PERFORM fluxrate_router.fail('PT401', 'invalid org_id claim', v_claims);
    END;
    part := fluxrate_router.shard_of(v_org);
    claims := v_claims;
    RETURN;
  END IF;
  v_org := NULLIF(pg_catalog.current_setting('fluxrate_router.acting_org', true), '')::uuid;
  IF v_org IS NULL THEN
    PERFORM fluxrate_router.fail('PT401', 'no organization in context', NULL,
      'Call fluxrate.act_as(org_id) from a trusted role, or send an API key or a bearer token.');
  END IF;
  v_role := fluxrate_router.outer_role();
  IF NOT fluxrate_router.is_trusted(v_role) THEN
    PERFORM fluxrate_router.fail('PT401', pg_catalog.format('role "%s" may not act for an organization', v_role), NULL,
      'Grant fluxrate_app to the application role, or authenticate with an API key or a token.');
  END IF;
  part := fluxrate_router.shard_of(v_org);
  claims := pg_catalog.jsonb_build_object('org_id', v_org)::text;
END
$$;

-- An error from a routed call, raised again for the caller.  e: SQLSTATE,
-- message, detail, hint.  PL/Proxy passes a shard's SQLSTATE, DETAIL and HINT
-- on but prefixes the message ("f(n): [db] REMOTE ERROR: "): taken off, so a client sees what a shard would have said.  A shard that
-- cannot be reached is XX000 from PL/Proxy: PT503 (HTTP 503) naming the shard,
-- since only that shard's organizations are affected and a retry may succeed.
CREATE FUNCTION fluxrate_router.reraise(part integer, e text[]) RETURNS void
  LANGUAGE plpgsql
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_msg text := e[2];
BEGIN
  IF v_msg ~ '^(PL/Proxy function )?[a-z_.]+\([0-9]+\): \[[^]]*\] REMOTE ERROR: ' THEN
    v_msg := pg_catalog.regexp_replace(v_msg, '^(PL/Proxy function )?[a-z_.]+\([0-9]+\): \[[^]]*\] REMOTE ERROR: ', '');
  ELSIF v_msg ~ '^PL/Proxy function ' AND e[1] OPERATOR(pg_catalog.=) 'XX000' THEN
    PERFORM fluxrate_router.fail('PT503', pg_catalog.format('shard %s is unavailable', coalesce(part::text, '?')),
      pg_catalog.regexp_replace(v_msg, '^PL/Proxy function [^ ]+: ', ''),
      'Only the organizations on this shard are affected; retry when it is back (track calls with an idempotency_key are safe to retry).');
  END IF;
  PERFORM fluxrate_router.fail(e[1], v_msg, NULLIF(e[3], ''), NULLIF(e[4], ''));
END
$$;

-- act_as on the router: the same contract as on a shard (trusted roles,
-- transaction-local unless session => true), checked against the directory.
CREATE FUNCTION fluxrate.act_as(org_id uuid, session boolean DEFAULT false) RETURNS uuid
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_role name := fluxrate_router.outer_role();
BEGIN
  IF NOT fluxrate_router.is_trusted(v_role) THEN
    PERFORM fluxrate_router.fail('PT401', pg_catalog.format('role "%s" may not act for an organization', v_role), NULL,
      'Grant fluxrate_app to the application role, or authenticate with an API key or a token.');
  END IF;
  IF act_as.org_id IS NULL THEN
    PERFORM fluxrate_router.fail('22004', 'org_id is required', NULL, 'Send a non-empty "org_id".');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM fluxrate_router.organizations o WHERE o.org_id OPERATOR(pg_catalog.=) act_as.org_id) THEN
    PERFORM fluxrate_router.fail('PT404', 'organization not found', pg_catalog.format('No organization has id %s.', act_as.org_id));
  END IF;
  PERFORM pg_catalog.set_config('fluxrate_router.acting_org', act_as.org_id::text, NOT coalesce(session, false));
  RETURN act_as.org_id;
END
$$;
REVOKE ALL ON FUNCTION fluxrate.act_as(uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxrate.act_as(uuid, boolean) TO fluxrate_app;
