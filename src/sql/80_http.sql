-- 80_http.sql: the HTTP layer for PostgREST.  Sign-up, login, refresh, logout,
-- the pre-request hook (X-API-Key header, access_token cookie) and the roles
-- PostgREST switches to.  docs/http.md has the set-up and every route.
--
-- Roles (NOLOGIN; the operator's PostgREST login role, "authenticator", is
-- granted all three):
--   fluxrate_anon    no credentials: sign-up, login, refresh, public invoice links
--   fluxrate_web     a signed-in dashboard user (JWT: Bearer or access_token cookie)
--   fluxrate_apikey  an API key (X-API-Key): ingestion and usage reads, by scope
-- fluxrate_web and fluxrate_apikey are the roles whose request.jwt.claims
-- fluxrate believes (context.c): granted to PostgREST's authenticator only.
-- For SQL applications (not PostgREST):
--   fluxrate_ingest  track and track_batch with an api_key argument, nothing
--                    else; no claims are believed from it (docs/security.md)
-- Their EXECUTE grants are in 99_security.sql (after every function exists).
--
-- Tokens: access tokens are HS256 JWTs (src/jwt.c, OpenSSL) signed with the
-- secret PostgREST is configured with (jwt-secret), valid 15 minutes, claims
-- {role, sub, org_id, email, sid, iat, exp}.  Refresh tokens are opaque random
-- strings (libsodium), valid 7 days, stored only as a hash, rotated on every use
-- (a reused one revokes its whole session: theft detection), revoked by logout.

DO $roles$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_anon') THEN
    CREATE ROLE fluxrate_anon NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_web') THEN
    CREATE ROLE fluxrate_web NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_apikey') THEN
    CREATE ROLE fluxrate_apikey NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_ingest') THEN
    CREATE ROLE fluxrate_ingest NOLOGIN;
  END IF;
  -- Statement limits of the HTTP roles (docs/security.md, "Limits"): PostgREST
  -- 10+ applies an impersonated role's settings to its request; the
  -- pre-request sets the same values for the roles it switches to itself.
  ALTER ROLE fluxrate_anon SET statement_timeout = '5s';
  ALTER ROLE fluxrate_web SET statement_timeout = '15s';
  ALTER ROLE fluxrate_apikey SET statement_timeout = '10s';
END
$roles$;

-- The statement_timeout of each HTTP role (the values above, for pre_request).
CREATE FUNCTION fluxrate_internal.http_statement_timeout(role_name text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$ SELECT CASE role_name WHEN 'fluxrate_anon' THEN '5s' WHEN 'fluxrate_web' THEN '15s'
                              WHEN 'fluxrate_apikey' THEN '10s' END $$;

CREATE TABLE fluxrate_internal.users (
  org_id         uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id             uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  email          text NOT NULL CHECK (email = pg_catalog.lower(email)),
  password_hash  text NOT NULL,                 -- argon2id (libsodium crypto_pwhash_str)
  created_at     timestamptz NOT NULL,
  last_login_at  timestamptz,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, email)
);
-- login finds the user by e-mail before the organization is known; one account
-- per e-mail address.  (With Citus, users would be a reference table.)
CREATE UNIQUE INDEX users_email_idx ON fluxrate_internal.users (email);

CREATE TABLE fluxrate_internal.refresh_tokens (
  org_id       uuid NOT NULL,
  id           uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  user_id      uuid NOT NULL,
  session_id   uuid NOT NULL,                   -- the "sid" claim of the access tokens
  token_hash   text NOT NULL,                   -- HMAC-SHA256 hex; the token itself is never stored
  created_at   timestamptz NOT NULL,
  expires_at   timestamptz NOT NULL,
  revoked_at   timestamptz,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, user_id) REFERENCES fluxrate_internal.users (org_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX refresh_tokens_hash_idx ON fluxrate_internal.refresh_tokens (token_hash);
CREATE INDEX refresh_tokens_session_idx ON fluxrate_internal.refresh_tokens (org_id, session_id);

-- The JWT secret PostgREST verifies Bearer tokens with (at least 32 characters:
-- PostgREST 13 refuses shorter ones).  Generated here; read it with
-- fluxrate_internal.sys_jwt_secret() (superusers) into postgrest.conf, or set
-- your own with fluxrate_internal.sys_set_jwt_secret().
INSERT INTO fluxrate_internal.server_secrets (name, secret)
VALUES ('jwt_secret', pg_catalog.convert_to(fluxrate_internal.random_token(48), 'UTF8'));

CREATE FUNCTION fluxrate_internal.sys_jwt_secret() RETURNS text
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT convert_from(s.secret, 'UTF8') FROM fluxrate_internal.server_secrets s
   WHERE s.name = 'jwt_secret' ORDER BY s.created_at LIMIT 1
$$;
COMMENT ON FUNCTION fluxrate_internal.sys_jwt_secret() IS
  'the HS256 secret to put in postgrest.conf (jwt-secret); executable by superusers only';

CREATE FUNCTION fluxrate_internal.sys_set_jwt_secret(secret text) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF secret IS NULL OR length(secret) < 32 THEN
    PERFORM fluxrate_internal.fail('PT422', 'the jwt secret must have at least 32 characters',
      hint => 'PostgREST refuses shorter HS256 secrets.');
  END IF;
  DELETE FROM fluxrate_internal.server_secrets s WHERE s.name = 'jwt_secret';
  INSERT INTO fluxrate_internal.server_secrets (name, secret) VALUES ('jwt_secret', convert_to(secret, 'UTF8'));
END
$$;
COMMENT ON FUNCTION fluxrate_internal.sys_set_jwt_secret(text) IS
  'use an existing PostgREST jwt-secret (superusers only); tokens signed with the old one stop working';

CREATE FUNCTION fluxrate_internal.refresh_token_hash(token text) RETURNS text
  LANGUAGE sql IMMUTABLE
  -- tokens carry 256 bits from libsodium: a fast hash is enough, nothing to brute-force
  AS $$ SELECT fluxrate_internal.hmac_sha256_hex('fluxrate refresh token', token) $$;

-- Set-Cookie values (HttpOnly: not readable by scripts; SameSite: not sent on
-- cross-site sub-requests; the refresh token only travels to /rpc/refresh).
CREATE FUNCTION fluxrate_internal.cookie(name text, value text, max_age integer, path text) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT pg_catalog.jsonb_build_object('Set-Cookie', pg_catalog.format('%s=%s; Path=%s; Max-Age=%s; HttpOnly; Secure; SameSite=%s',
          name, value, path, max_age, CASE WHEN name = 'refresh_token' THEN 'Strict' ELSE 'Lax' END)) $$;

-- A new access + refresh token pair for a session (a new one at login; the
-- same session on refresh).  Also sets the two cookies on the response.
CREATE FUNCTION fluxrate_internal.sys_issue_tokens(org_id uuid, user_id uuid, email text, session_id uuid)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_access_ttl constant integer := 900;           -- 15 minutes
  v_refresh_ttl constant integer := 7 * 86400;    -- 7 days
  v_access text;
  -- rt_<organization id, hex>_<secret>: a router picks the shard from the tag (docs/scale-out.md)
  v_refresh text := 'rt_' || pg_catalog.replace(sys_issue_tokens.org_id::text, '-', '') || '_' || fluxrate_internal.random_token(43);
BEGIN
  v_access := fluxrate_internal.jwt_sign(jsonb_build_object(
      'role', 'fluxrate_web', 'sub', sys_issue_tokens.user_id, 'org_id', sys_issue_tokens.org_id,
      'email', sys_issue_tokens.email, 'sid', sys_issue_tokens.session_id,
      'iat', floor(extract(epoch FROM v_now))::bigint,
      'exp', floor(extract(epoch FROM v_now))::bigint + v_access_ttl),
    convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'));
  INSERT INTO fluxrate_internal.refresh_tokens (org_id, user_id, session_id, token_hash, created_at, expires_at)
  VALUES (sys_issue_tokens.org_id, sys_issue_tokens.user_id, sys_issue_tokens.session_id,
          fluxrate_internal.refresh_token_hash(v_refresh), v_now, v_now + make_interval(secs => v_refresh_ttl));
  PERFORM set_config('response.headers', jsonb_build_array(
      fluxrate_internal.cookie('access_token', v_access, v_access_ttl, '/'),
      fluxrate_internal.cookie('refresh_token', v_refresh, v_refresh_ttl, '/rpc/refresh'))::text, true);
  RETURN jsonb_build_object('access_token', v_access, 'token_type', 'bearer', 'expires_in', v_access_ttl,
    'refresh_token', v_refresh, 'refresh_expires_in', v_refresh_ttl,
    'user', jsonb_build_object('id', sys_issue_tokens.user_id, 'email', sys_issue_tokens.email),
    'organization_id', sys_issue_tokens.org_id);
END
$$;

-- POST /auth/signup: a user and its organization.  The answer is the same
-- whether or not the address already has an account (202, {email, message}):
-- sign-up must not tell who is a customer (issue 19).  An existing account is
-- left unchanged, nothing is written for the second sign-up, and the caller
-- learns what happened the honest way: by logging in, where a wrong password
-- and an unknown address answer alike.  Both paths pay the same argon2id hash.
CREATE FUNCTION fluxrate.signup(email text DEFAULT NULL, password text DEFAULT NULL, organization_name text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_email text := lower(btrim(signup.email));
  v_org uuid := gen_random_uuid();
  v_hash text;
BEGIN
  PERFORM fluxrate_internal.required(v_email, 'email');
  PERFORM fluxrate_internal.required(signup.password, 'password');
  PERFORM fluxrate_internal.required(signup.organization_name, 'organization_name');
  PERFORM fluxrate_internal.check_email(v_email);
  IF length(signup.password) < 8 OR length(signup.password) > 1024 THEN
    PERFORM fluxrate_internal.fail('PT422', 'password must have 8 to 1024 characters',
      format('The password has %s characters.', length(signup.password)));
  END IF;
  IF length(signup.organization_name) > 200 THEN
    PERFORM fluxrate_internal.fail('PT422', 'organization_name must have at most 200 characters');
  END IF;
  v_hash := fluxrate_internal.password_hash(signup.password);
  BEGIN
    PERFORM set_config('fluxrate.current_org', v_org::text, true);
    INSERT INTO fluxrate_internal.organizations (org_id, name, created_at)
    VALUES (v_org, btrim(signup.organization_name), fluxrate.now());
    INSERT INTO fluxrate_internal.users (org_id, email, password_hash, created_at)
    VALUES (v_org, v_email, v_hash, fluxrate.now());
  EXCEPTION WHEN unique_violation THEN
    -- the address has an account: the organization above is rolled back with
    -- this block, and the answer below is the same
    NULL;
  END;
  PERFORM set_config('response.status', '202', true);
  RETURN jsonb_build_object('email', v_email,
    'message', 'Sign-up received. Log in with this address and password. If the address already had an account, that account is unchanged.');
END
$$;

-- The login itself, across organizations (the e-mail finds the organization).
CREATE FUNCTION fluxrate_internal.sys_login(email text, password text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  u fluxrate_internal.users;
BEGIN
  SELECT * INTO u FROM fluxrate_internal.users x WHERE x.email = lower(btrim(sys_login.email));
  -- an unknown address costs the same argon2id verification as a wrong password,
  -- so response times do not reveal which addresses have accounts
  IF NOT fluxrate_internal.password_verify(
       coalesce(u.password_hash, '$argon2id$v=19$m=65536,t=2,p=1$qfJstOo4cnK2ZW6I3lvazQ$tpwnFYloRfEykJ752kRcP4hW//E+TrOEADP6A5O02OI'),
       sys_login.password) OR u.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid e-mail or password', hint => 'Check both, or sign up.');
  END IF;
  PERFORM set_config('fluxrate.current_org', u.org_id::text, true);
  UPDATE fluxrate_internal.users x SET last_login_at = fluxrate.now() WHERE x.org_id = u.org_id AND x.id = u.id;
  RETURN fluxrate_internal.sys_issue_tokens(u.org_id, u.id, u.email, gen_random_uuid());
END
$$;

-- POST /auth/login: {access_token, refresh_token, …} in the body and as HttpOnly cookies.
CREATE FUNCTION fluxrate.login(email text DEFAULT NULL, password text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.required(login.email, 'email');
  PERFORM fluxrate_internal.required(login.password, 'password');
  RETURN fluxrate_internal.sys_login(login.email, login.password);
END
$$;

-- POST /auth/refresh: the refresh_token cookie (or the refresh_token field, for
-- clients without cookies) for a new pair.  The presented token is spent; a
-- spent token presented again revokes the whole session.
CREATE FUNCTION fluxrate_internal.sys_refresh(token text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r fluxrate_internal.refresh_tokens;
  u fluxrate_internal.users;
  v_now timestamptz := fluxrate.now();
BEGIN
  SELECT * INTO r FROM fluxrate_internal.refresh_tokens x
   WHERE x.token_hash = fluxrate_internal.refresh_token_hash(sys_refresh.token) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid refresh token', 'The token is unknown.', 'Log in again.');
  END IF;
  PERFORM set_config('fluxrate.current_org', r.org_id::text, true);
  IF r.revoked_at IS NOT NULL THEN
    -- reuse of a spent token: someone else may hold the session; end it
    UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = coalesce(x.revoked_at, v_now)
     WHERE x.org_id = r.org_id AND x.session_id = r.session_id;
    RETURN jsonb_build_object('reused', true);
  END IF;
  IF r.expires_at <= v_now THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid refresh token', 'The token has expired.', 'Log in again.');
  END IF;
  UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = v_now WHERE x.org_id = r.org_id AND x.id = r.id;
  SELECT * INTO u FROM fluxrate_internal.users x WHERE x.org_id = r.org_id AND x.id = r.user_id;
  RETURN fluxrate_internal.sys_issue_tokens(u.org_id, u.id, u.email, r.session_id);
END
$$;

CREATE FUNCTION fluxrate.refresh(refresh_token text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_token text := coalesce(refresh.refresh_token,
    nullif(current_setting('request.cookies', true), '')::jsonb->>'refresh_token');
  v jsonb;
BEGIN
  IF v_token IS NULL OR v_token = '' THEN
    PERFORM fluxrate_internal.fail('PT401', 'no refresh token', 'Neither a refresh_token cookie nor a refresh_token field was sent.',
      'Log in again.');
  END IF;
  v := fluxrate_internal.sys_refresh(v_token);
  IF v ? 'reused' THEN
    -- the revocation above must commit, so this is a response, not an error
    PERFORM set_config('response.status', '401', true);
    RETURN jsonb_build_object('code', 'PT401', 'message', 'invalid refresh token',
      'details', 'The token was already used; the session is ended.', 'hint', 'Log in again.');
  END IF;
  RETURN v;
END
$$;

-- POST /auth/logout: ends the caller's session (its refresh tokens stop
-- working at once; access tokens expire within 15 minutes) and clears the cookies.
CREATE FUNCTION fluxrate.logout() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_claims jsonb := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
  n integer;
BEGIN
  IF v_claims IS NULL OR v_claims->>'sid' IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'not signed in', 'Logout ends a session started by login.');
  END IF;
  UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.session_id = (v_claims->>'sid')::uuid AND x.revoked_at IS NULL;
  GET DIAGNOSTICS n = ROW_COUNT;
  PERFORM set_config('response.headers', jsonb_build_array(
      fluxrate_internal.cookie('access_token', '', 0, '/'),
      fluxrate_internal.cookie('refresh_token', '', 0, '/rpc/refresh'))::text, true);
  RETURN jsonb_build_object('logged_out', true, 'revoked_refresh_tokens', n);
END
$$;

-- Claims for a verified API key (X-API-Key).  PT401 when unknown or revoked.
CREATE FUNCTION fluxrate_internal.sys_api_key_claims(key text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k record;
BEGIN
  SELECT * INTO k FROM fluxrate_internal.sys_verify_api_key(sys_api_key_claims.key);
  RETURN jsonb_build_object('role', 'fluxrate_apikey', 'org_id', k.org_id, 'key_id', k.key_id,
                            'scopes', to_jsonb(k.scopes));
END
$$;

-- Claims of a valid access token from the access_token cookie.  PT401 otherwise.
CREATE FUNCTION fluxrate_internal.sys_access_token_claims(token text) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c jsonb := fluxrate_internal.jwt_verify(token, convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'));
BEGIN
  IF c->>'role' IS DISTINCT FROM 'fluxrate_web' OR c->>'org_id' IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid token', 'The token is not a fluxrate session token.', 'Log in again.');
  END IF;
  IF c ? 'sub' AND NOT fluxrate_internal.sys_token_user_exists((c->>'org_id')::uuid, (c->>'sub')::uuid) THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid token', 'The token''s user or organization no longer exists.', 'Log in again.');
  END IF;
  RETURN c;
END
$$;

-- db-pre-request = "fluxrate.pre_request".  Runs as the role PostgREST chose
-- (anon when no Bearer token was sent), before the function of the request.
-- SECURITY INVOKER on purpose: switching role is refused inside SECURITY
-- DEFINER functions; the verification itself happens in the sys_ functions.
--   X-API-Key: <key>          -> role fluxrate_apikey, claims {org_id, key_id, scopes}
--   Cookie: access_token=<jwt> -> role fluxrate_web, the token's claims
-- A Bearer token PostgREST already verified takes precedence over both.
CREATE FUNCTION fluxrate.pre_request() RETURNS void
  LANGUAGE plpgsql VOLATILE
  AS $$
DECLARE
  v_headers jsonb := coalesce(nullif(pg_catalog.current_setting('request.headers', true), '')::jsonb, '{}');
  v_cookies jsonb := coalesce(nullif(pg_catalog.current_setting('request.cookies', true), '')::jsonb, '{}');
  v_claims jsonb := coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}');
  v_method text := coalesce(pg_catalog.current_setting('request.method', true), '');
  v_new jsonb;
  v_origin_host text;
BEGIN
  IF v_claims OPERATOR(pg_catalog.?) 'org_id' THEN
    -- a Bearer token PostgREST verified: still refused once its user (or its
    -- organization) was deleted
    IF v_claims OPERATOR(pg_catalog.?) 'sub' AND NOT fluxrate_internal.sys_token_user_exists(
         (v_claims OPERATOR(pg_catalog.->>) 'org_id')::uuid, (v_claims OPERATOR(pg_catalog.->>) 'sub')::uuid) THEN
      RAISE EXCEPTION USING ERRCODE = 'PT401', MESSAGE = 'invalid token',
        DETAIL = 'The token''s user or organization no longer exists.', HINT = 'Log in again.';
    END IF;
    RETURN;
  END IF;
  IF v_headers OPERATOR(pg_catalog.?) 'x-api-key' THEN
    v_new := fluxrate_internal.sys_api_key_claims(v_headers OPERATOR(pg_catalog.->>) 'x-api-key');
  ELSIF v_cookies OPERATOR(pg_catalog.?) 'access_token' THEN
    v_new := fluxrate_internal.sys_access_token_claims(v_cookies OPERATOR(pg_catalog.->>) 'access_token');
    -- cookies travel with cross-site requests: a browser's write request from
    -- another origin is refused (SameSite=Lax already stops most of them)
    IF v_method NOT IN ('GET', 'HEAD', 'OPTIONS') AND v_headers OPERATOR(pg_catalog.?) 'origin' THEN
      v_origin_host := pg_catalog.split_part(pg_catalog.split_part(v_headers OPERATOR(pg_catalog.->>) 'origin', '://', 2), '/', 1);
      IF v_origin_host IS DISTINCT FROM (v_headers OPERATOR(pg_catalog.->>) 'host') THEN
        RAISE EXCEPTION USING ERRCODE = 'PT403', MESSAGE = 'cross-site request refused',
          DETAIL = pg_catalog.format('Origin %s does not match host %s.', v_headers OPERATOR(pg_catalog.->>) 'origin',
                                     coalesce(v_headers OPERATOR(pg_catalog.->>) 'host', '(none)')),
          HINT = 'Send the request from the dashboard''s own origin, or use an Authorization header.';
      END IF;
    END IF;
  END IF;
  IF v_new IS NOT NULL THEN
    PERFORM pg_catalog.set_config('request.jwt.claims', v_new::text, true);
    PERFORM pg_catalog.set_config('role', v_new OPERATOR(pg_catalog.->>) 'role', true);
    -- the switched role's statement limit (PostgREST applied the anonymous
    -- role's); it governs the request's next statement, the function call
    PERFORM pg_catalog.set_config('statement_timeout',
      fluxrate_internal.http_statement_timeout(v_new OPERATOR(pg_catalog.->>) 'role'), true);
  END IF;
END
$$;

-- The check that the claims-believing roles went where they belong.  Any
-- member of fluxrate_web or fluxrate_apikey can SET ROLE to it and set
-- request.jwt.claims: it can act as any organization.  That is PostgREST's
-- authenticator's job, recognised by the shape docs/postgrest.conf gives it
-- (LOGIN, NOINHERIT, also granted fluxrate_anon); every other member, direct or
-- through another role, is a warning.  Superusers can do anything anyway and
-- are not listed.  schedule_jobs() raises each as a WARNING; the operator's
-- health view can read it.  No rows: nothing to warn about.
CREATE FUNCTION fluxrate_internal.role_grant_warnings()
  RETURNS TABLE (role_name name, claims_role name, warning text, hint text)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH RECURSIVE m(member, claims_role, direct) AS (
    SELECT am.member, r.rolname, true
      FROM pg_catalog.pg_auth_members am
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) am.roleid
     WHERE r.rolname IN ('fluxrate_web', 'fluxrate_apikey')
    UNION
    SELECT am.member, m.claims_role, false
      FROM m JOIN pg_catalog.pg_auth_members am ON am.roleid OPERATOR(pg_catalog.=) m.member
  )
  SELECT DISTINCT r.rolname, m.claims_role,
         pg_catalog.format('role "%s" is %s member of %s: it can set request.jwt.claims and act as any organization',
                           r.rolname, CASE WHEN m.direct THEN 'a' ELSE 'an indirect' END, m.claims_role),
         'Grant fluxrate_web and fluxrate_apikey only to PostgREST''s authenticator (LOGIN NOINHERIT, see docs/postgrest.conf); an SQL application that tracks gets fluxrate_ingest.'
    FROM m
    JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) m.member
   WHERE NOT r.rolsuper
     AND NOT (m.direct AND r.rolcanlogin AND NOT r.rolinherit
              AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members a
                            JOIN pg_catalog.pg_roles anon ON anon.oid OPERATOR(pg_catalog.=) a.roleid
                           WHERE a.member OPERATOR(pg_catalog.=) r.oid AND anon.rolname OPERATOR(pg_catalog.=) 'fluxrate_anon'))
   ORDER BY 1, 2
$$;
COMMENT ON FUNCTION fluxrate_internal.role_grant_warnings() IS
  'members of the claims-believing roles (fluxrate_web, fluxrate_apikey) that are not a PostgREST authenticator: each can act as any organization';

-- Each warning as a WARNING (schedule_jobs() runs this: the set-up step every
-- operator takes).  Returns how many.
CREATE FUNCTION fluxrate_internal.warn_role_grants() RETURNS integer
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  w record;
  n integer := 0;
BEGIN
  FOR w IN SELECT * FROM fluxrate_internal.role_grant_warnings() LOOP
    RAISE WARNING 'fluxrate: %', w.warning USING HINT = w.hint;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;
