-- 30_organizations.sql: the calls that name no organization yet (creating
-- one, signing up, logging in, refreshing, the PostgREST pre-request; public
-- invoice links are generated, 20_sync.sql) and the operator's view of the
-- directory.  They call the PL/Proxy functions sync_api() generates
-- (fluxrate_router_calls.*), so they work once sync_api() has run.

-- Where a new organization goes: the shard with the fewest organizations.
CREATE FUNCTION fluxrate_router.place_new() RETURNS integer
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT s FROM pg_catalog.generate_series(0, fluxrate_router.shard_count() - 1) s
    LEFT JOIN (SELECT o.shard, count(*) AS n FROM fluxrate_router.organizations o GROUP BY o.shard) x ON x.shard OPERATOR(pg_catalog.=) s
   ORDER BY coalesce(x.n, 0), s LIMIT 1
$$;

CREATE FUNCTION fluxrate.create_organization(name text, billing_country text DEFAULT NULL,
    billing_state text DEFAULT NULL, payment_terms_days integer DEFAULT 30,
    grace_period interval DEFAULT '1 hour')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e1 text; e2 text; e3 text; e4 text;
  v_role name := fluxrate_router.outer_role();
  v_part integer := fluxrate_router.place_new();
  v jsonb;
BEGIN
  IF NOT fluxrate_router.is_trusted(v_role) THEN
    PERFORM fluxrate_router.fail('PT403', 'only a trusted application role may create organizations', NULL,
      'Grant fluxrate_app to the role, or sign up over HTTP.');
  END IF;
  IF v_part IS NULL THEN
    PERFORM fluxrate_router.fail('55000', 'the router has no shards', NULL,
      'CREATE SERVER fluxrate_shards FOREIGN DATA WRAPPER plproxy OPTIONS (p0 ''...'', ...) (docs/scale-out.md).');
  END IF;
  v := fluxrate_router_calls.create_organization(v_part, '', create_organization.name, create_organization.billing_country,
         create_organization.billing_state, create_organization.payment_terms_days, create_organization.grace_period);
  INSERT INTO fluxrate_router.organizations (org_id, shard) VALUES ((v OPERATOR(pg_catalog.->>) 'id')::uuid, v_part);
  RETURN v;
EXCEPTION WHEN OTHERS THEN
  -- a shard's refusal as the shard raised it (reraise: PL/Proxy's prefix off)
  GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
  PERFORM fluxrate_router.reraise(NULL, ARRAY[e1, e2, e3, e4]);
  RETURN NULL;
END
$$;

CREATE FUNCTION fluxrate_router_calls.user_org(integer, text) RETURNS uuid
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT u.org_id AS user_org FROM fluxrate_internal.users u WHERE u.email = $2;
$p$;

CREATE FUNCTION fluxrate.signup(email text DEFAULT NULL, password text DEFAULT NULL, organization_name text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e1 text; e2 text; e3 text; e4 text;
  v_part integer := fluxrate_router.place_new();
  v jsonb;
  v_org uuid;
BEGIN
  -- e-mail addresses are unique per shard there, across shards here.  A known
  -- address goes to its own shard, which answers as it answers any repeated
  -- sign-up (the same words, nothing changed: no account enumeration)
  SELECT l.org_id INTO v_org FROM fluxrate_router.logins l
   WHERE l.email OPERATOR(pg_catalog.=) pg_catalog.lower(pg_catalog.btrim(signup.email));
  IF v_org IS NOT NULL THEN
    RETURN fluxrate_router_calls.signup(fluxrate_router.shard_of(v_org), '', signup.email, signup.password, signup.organization_name);
  END IF;
  v := fluxrate_router_calls.signup(v_part, '', signup.email, signup.password, signup.organization_name);
  -- the answer names no organization (it is the same whether or not the address
  -- had an account): the shard's users table does, read by the router's role
  v_org := fluxrate_router_calls.user_org(v_part, pg_catalog.lower(pg_catalog.btrim(signup.email)));
  IF v_org IS NULL THEN
    PERFORM fluxrate_router.fail('55000', 'the shard did not record the sign-up', pg_catalog.format('shard %s', v_part));
  END IF;
  INSERT INTO fluxrate_router.organizations (org_id, shard) VALUES (v_org, v_part);
  INSERT INTO fluxrate_router.logins (email, org_id) VALUES (pg_catalog.lower(pg_catalog.btrim(signup.email)), v_org);
  RETURN v;
EXCEPTION WHEN OTHERS THEN
  -- a shard's refusal as the shard raised it (reraise: PL/Proxy's prefix off)
  GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
  PERFORM fluxrate_router.reraise(NULL, ARRAY[e1, e2, e3, e4]);
  RETURN NULL;
END
$$;

CREATE FUNCTION fluxrate.login(email text DEFAULT NULL, password text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e1 text; e2 text; e3 text; e4 text;
  v_org uuid;
BEGIN
  SELECT l.org_id INTO v_org FROM fluxrate_router.logins l
   WHERE l.email OPERATOR(pg_catalog.=) pg_catalog.lower(pg_catalog.btrim(login.email));
  IF v_org IS NULL THEN
    PERFORM fluxrate_router.fail('PT401', 'invalid e-mail or password', NULL, 'Check both, or sign up.');
  END IF;
  RETURN fluxrate_router_calls.login(fluxrate_router.shard_of(v_org), '', login.email, login.password);
EXCEPTION WHEN OTHERS THEN
  -- a shard's refusal as the shard raised it (reraise: PL/Proxy's prefix off)
  GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
  PERFORM fluxrate_router.reraise(NULL, ARRAY[e1, e2, e3, e4]);
  RETURN NULL;
END
$$;

-- Refresh tokens name their organization (rt_<org hex>_<secret>); an untagged
-- one (issued by 0.1.0) is tried on each shard in turn.
CREATE FUNCTION fluxrate.refresh(refresh_token text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e1 text; e2 text; e3 text; e4 text;
  v_token text := coalesce(refresh.refresh_token,
    NULLIF(pg_catalog.current_setting('request.cookies', true), '')::jsonb OPERATOR(pg_catalog.->>) 'refresh_token');
  v_org uuid := fluxrate_router.tagged_org(v_token, 'rt_');
BEGIN
  IF v_token IS NULL THEN
    PERFORM fluxrate_router.fail('PT401', 'no refresh token', 'Neither a refresh_token cookie nor a refresh_token field was sent.', 'Log in again.');
  END IF;
  IF v_org IS NOT NULL THEN
    RETURN fluxrate_router_calls.refresh(fluxrate_router.shard_of(v_org), '', v_token);
  END IF;
  FOR i IN 0 .. fluxrate_router.shard_count() - 1 LOOP
    BEGIN
      RETURN fluxrate_router_calls.refresh(i, '', v_token);
    EXCEPTION WHEN SQLSTATE 'PT401' THEN
      NULL;   -- not this shard's
    END;
  END LOOP;
  PERFORM fluxrate_router.fail('PT401', 'invalid refresh token', 'The token is unknown.', 'Log in again.');
EXCEPTION WHEN OTHERS THEN
  -- a shard's refusal as the shard raised it (reraise: PL/Proxy's prefix off)
  GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
  PERFORM fluxrate_router.reraise(NULL, ARRAY[e1, e2, e3, e4]);
  RETURN NULL;
END
$$;

-- The pre-request of a PostgREST in front of the router.  An X-API-Key is
-- verified by the shard its tag names; an access_token cookie by the shard
-- its (unverified here) org_id claim names, which checks the signature with
-- the secret all shards share.  The claims come back and are set here, so
-- route() forwards them with the key's scopes.
CREATE FUNCTION fluxrate_router_calls.api_key_claims(integer, text) RETURNS jsonb
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_api_key_claims($2) AS api_key_claims;
$p$;
CREATE FUNCTION fluxrate_router_calls.access_token_claims(integer, text) RETURNS jsonb
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_access_token_claims($2) AS access_token_claims;
$p$;

CREATE FUNCTION fluxrate_router.credential_claims(api_key text, access_token text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e1 text; e2 text; e3 text; e4 text;
  v_org uuid;
  v_payload text;
BEGIN
  IF api_key IS NOT NULL THEN
    v_org := fluxrate_router.tagged_org(api_key, 'org_live_');
    IF v_org IS NULL THEN
      PERFORM fluxrate_router.fail('PT401', 'api key names no organization',
        'Keys made by fluxrate 0.1.0 carry no organization tag, so the router cannot tell which shard holds them.',
        'Create a new key (fluxrate.create_api_key) and retire this one.');
    END IF;
    RETURN fluxrate_router_calls.api_key_claims(fluxrate_router.shard_of(v_org), api_key);
  END IF;
  BEGIN
    v_payload := pg_catalog.translate(pg_catalog.split_part(access_token, '.', 2), '-_', '+/');
    v_payload := v_payload || pg_catalog.repeat('=', (4 - pg_catalog.length(v_payload) % 4) % 4);
    v_org := (pg_catalog.convert_from(pg_catalog.decode(v_payload, 'base64'), 'UTF8')::jsonb OPERATOR(pg_catalog.->>) 'org_id')::uuid;
  EXCEPTION WHEN OTHERS THEN
    v_org := NULL;
  END;
  IF v_org IS NULL THEN
    PERFORM fluxrate_router.fail('PT401', 'invalid token', 'The token is not a fluxrate session token.', 'Log in again.');
  END IF;
  RETURN fluxrate_router_calls.access_token_claims(fluxrate_router.shard_of(v_org), access_token);
EXCEPTION WHEN OTHERS THEN
  -- a shard's refusal as the shard raised it (reraise: PL/Proxy's prefix off)
  GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
  PERFORM fluxrate_router.reraise(NULL, ARRAY[e1, e2, e3, e4]);
  RETURN NULL;
END
$$;

CREATE FUNCTION fluxrate.pre_request() RETURNS void
  LANGUAGE plpgsql VOLATILE
  AS $$
DECLARE
  v_headers jsonb := coalesce(NULLIF(pg_catalog.current_setting('request.headers', true), '')::jsonb, '{}');
  v_cookies jsonb := coalesce(NULLIF(pg_catalog.current_setting('request.cookies', true), '')::jsonb, '{}');
  v_claims jsonb := coalesce(NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}');
  v_new jsonb;
BEGIN
  IF v_claims OPERATOR(pg_catalog.?) 'org_id' THEN
    RETURN;
  END IF;
  IF v_headers OPERATOR(pg_catalog.?) 'x-api-key' THEN
    v_new := fluxrate_router.credential_claims(v_headers OPERATOR(pg_catalog.->>) 'x-api-key', NULL);
  ELSIF v_cookies OPERATOR(pg_catalog.?) 'access_token' THEN
    v_new := fluxrate_router.credential_claims(NULL, v_cookies OPERATOR(pg_catalog.->>) 'access_token');
  END IF;
  IF v_new IS NOT NULL THEN
    PERFORM pg_catalog.set_config('request.jwt.claims', v_new::text, true);
    PERFORM pg_catalog.set_config('role', v_new OPERATOR(pg_catalog.->>) 'role', true);
  END IF;
END
$$;

-- Operator: every organization every shard holds, beside where the directory
-- routes it (routed_to NULL: on a shard but unknown to the router; shard
-- NULL: in the directory but on no shard).  All shards at once: PL/Proxy
-- sends the query to every partition before it reads any answer, and merges
-- the rows, as RUN ON ALL does.  RUN ON ALL itself cannot say which partition
-- a row came from (a shard does not know its own number), so the partition
-- numbers 0..n-1 are SPLIT and RUN ON them: each partition gets the one-element
-- array of its own number and answers with it.  A shard down fails the call
-- (PL/Proxy's connection error): it is an operator's look at all of them.
CREATE FUNCTION fluxrate_router_calls.shard_organizations(parts integer[], OUT shard integer, OUT org_id uuid, OUT name text)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  SPLIT parts;
  RUN ON parts;
  SELECT ($1::integer[])[1] AS shard, o.org_id, o.name FROM fluxrate_internal.organizations o;
$p$;

CREATE FUNCTION fluxrate_router.list_organizations()
  RETURNS TABLE (org_id uuid, name text, shard integer, routed_to integer, paused boolean)
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce(s.org_id, d.org_id), s.name, s.shard, d.shard, d.paused
    FROM fluxrate_router_calls.shard_organizations(
           ARRAY(SELECT pg_catalog.generate_series(0, fluxrate_router.shard_count() - 1))) s
    FULL JOIN fluxrate_router.organizations d ON d.org_id OPERATOR(pg_catalog.=) s.org_id
$$;

-- Operator: one organization's rows per table on every shard.
CREATE FUNCTION fluxrate_router.organization_rows(org uuid)
  RETURNS TABLE (shard integer, tbl text, derived boolean, n bigint)
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  FOR i IN 0 .. fluxrate_router.shard_count() - 1 LOOP
    RETURN QUERY SELECT i, r.tbl, r.derived, r.n FROM fluxrate_router_calls.org_rows(i, org) r;
  END LOOP;
END
$$;
