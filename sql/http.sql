-- The HTTP API through PostgREST, replayed in SQL exactly as PostgREST 12/13
-- sends it (notes 4.2, 4.11): the authenticator session, the transaction
-- (READ ONLY for GET), PostgREST's own Bearer verification with jwt-secret, one
-- set_config statement (search_path, role, claims, method, path, headers,
-- cookies), the pre-request, the call with only the keys of the body, then
-- response.status and response.headers; an error becomes the status of
-- PostgREST's SQLSTATE table (Error.hs) and the body {code, message, details, hint}.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-05-01 12:00:00+00';
-- the test's own helpers go to public (the test user may be called fluxrate,
-- and "$user" would put them into the extension's schema)
SET search_path = public;

CREATE ROLE fr_authenticator LOGIN NOINHERIT;
GRANT fluxrate_anon, fluxrate_web, fluxrate_apikey TO fr_authenticator;

-- PostgREST's error table (pgErrorStatus), the entries fluxrate can raise
CREATE FUNCTION pgrst_status(state text, role text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN state ~ '^PT[0-9]{3}$' THEN substr(state, 3)::integer
    WHEN state IN ('23503', '23505') THEN 409
    WHEN state = '42501' THEN CASE WHEN role = 'fluxrate_anon' THEN 401 ELSE 403 END
    WHEN state = '42883' THEN 404
    WHEN state = '25006' THEN 405
    WHEN state ~ '^(08|53)' THEN 503
    WHEN state ~ '^(0L|0P|28)' THEN 403
    WHEN state ~ '^(09|25|2D|38|39|3B|40|54|55|57|58|F0|HV|XX)' THEN 500
    WHEN state ~ '^P0' AND state <> 'P0001' THEN 500
    ELSE 400 END
$$;

-- PostgREST verifies a Bearer token itself, with the jwt-secret of its config
-- (HS256, exp/nbf with 30 s skew); this stands in for that step.
CREATE FUNCTION pgrst_verify_bearer(token text) RETURNS jsonb LANGUAGE sql STABLE SECURITY DEFINER AS $$
  SELECT fluxrate_internal.jwt_verify(token, convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'))
$$;

-- credentials by name, filled in as the test logs in
CREATE TABLE http_creds (who text PRIMARY KEY, bearer text, cookies jsonb NOT NULL DEFAULT '{}', headers jsonb NOT NULL DEFAULT '{}');
GRANT ALL ON http_creds TO fr_authenticator;

CREATE FUNCTION pgrst(method text, path text, body jsonb DEFAULT '{}', headers jsonb DEFAULT '{}',
    cookies jsonb DEFAULT '{}', bearer text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql AS $$
DECLARE
  v_fn text := regexp_replace(path, '^/rpc/', '');
  v_role text := 'fluxrate_anon';
  v_claims jsonb := '{"role": "fluxrate_anon"}';
  v_headers jsonb := headers || '{"host": "api.example.com", "content-type": "application/json"}';
  v_oid oid;
  v_cols text;
  v_args text;
  v_result jsonb;
  v_status text;
  v_rheaders text;
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  IF bearer IS NOT NULL THEN
    v_headers := v_headers || jsonb_build_object('authorization', 'Bearer ' || bearer);
    BEGIN
      v_claims := pgrst_verify_bearer(bearer);
    EXCEPTION WHEN OTHERS THEN
      RETURN jsonb_build_object('status', 401, 'body', jsonb_build_object('code', 'PGRST301', 'message', 'JWT invalid'));
    END;
    v_role := v_claims->>'role';
  END IF;
  -- the function, resolved by name and by the set of keys sent (PGRST202 otherwise)
  SELECT p.oid INTO v_oid FROM pg_proc p
   WHERE p.pronamespace = 'fluxrate'::regnamespace AND p.proname = v_fn AND p.prokind = 'f'
     AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(body) k WHERE k <> ALL (coalesce(p.proargnames, '{}')));
  IF v_oid IS NULL THEN
    RETURN jsonb_build_object('status', 404, 'body', jsonb_build_object('code', 'PGRST202',
      'message', format('Could not find the function fluxrate.%s(%s) in the schema cache', v_fn,
                        (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(body) k))));
  END IF;
  SELECT string_agg(format('%I %s', n, format_type(t, NULL)), ', '), string_agg(format('%I := pgrst_body.%I', n, n), ', ')
    INTO v_cols, v_args
    FROM unnest((SELECT proargnames FROM pg_proc WHERE oid = v_oid), (SELECT proargtypes::oid[] FROM pg_proc WHERE oid = v_oid)) a(n, t)
   WHERE body ? n;
  IF method IN ('GET', 'HEAD') THEN
    PERFORM set_config('transaction_read_only', 'on', true);
  END IF;
  -- each request is its own transaction in PostgREST; several requests in one
  -- statement of this test must not see each other's response settings
  PERFORM set_config('response.status', '', true), set_config('response.headers', '', true);
  BEGIN
    PERFORM set_config('search_path', '"fluxrate", "public"', true), set_config('role', v_role, true),
            set_config('request.jwt.claims', v_claims::text, true), set_config('request.method', method, true),
            set_config('request.path', path, true), set_config('request.headers', v_headers::text, true),
            set_config('request.cookies', cookies::text, true);
    PERFORM fluxrate.pre_request();
    IF v_cols IS NULL THEN
      EXECUTE format('SELECT to_jsonb(fluxrate.%I())', v_fn) INTO v_result;
    ELSE
      EXECUTE format('SELECT to_jsonb(fluxrate.%I(%s)) FROM (SELECT $1 AS json_data) pgrst_payload, '
                     'LATERAL (SELECT * FROM jsonb_to_record(pgrst_payload.json_data) AS _(%s) LIMIT 1) pgrst_body',
                     v_fn, v_args, v_cols)
        INTO v_result USING body;
    END IF;
    v_status := nullif(current_setting('response.status', true), '');
    v_rheaders := nullif(current_setting('response.headers', true), '');
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL,
                            v_hint = PG_EXCEPTION_HINT;
    RETURN jsonb_build_object('status', pgrst_status(v_state, v_role), 'body', jsonb_strip_nulls(jsonb_build_object(
      'code', v_state, 'message', v_msg, 'details', nullif(v_detail, ''), 'hint', nullif(v_hint, ''))));
  END;
  -- PostgREST would commit here; the emulator gives the session its role back
  PERFORM set_config('role', 'none', true);
  RETURN jsonb_build_object('status', coalesce(v_status::integer, 200), 'body', v_result, 'headers', v_rheaders::jsonb);
END
$$;
GRANT EXECUTE ON FUNCTION pgrst(text, text, jsonb, jsonb, jsonb, text), pgrst_status(text, text),
  pgrst_verify_bearer(text) TO fr_authenticator;

-- A request as a named caller: 'anon', or a row of http_creds
CREATE FUNCTION req(who text, method text, fn text, body jsonb DEFAULT '{}', extra_headers jsonb DEFAULT '{}')
  RETURNS jsonb LANGUAGE sql AS $$
  SELECT pgrst(method, '/rpc/' || fn, body, coalesce(c.headers, '{}') || extra_headers, coalesce(c.cookies, '{}'), c.bearer)
    FROM (SELECT 1) one LEFT JOIN http_creds c ON c.who = req.who
$$;
GRANT EXECUTE ON FUNCTION req(text, text, text, jsonb, jsonb) TO fr_authenticator;

SET SESSION AUTHORIZATION fr_authenticator;

-- Sign-up and login ------------------------------------------------------------
-- the same answer for a new address and for one that has an account (issue 19:
-- sign-up must not tell who has an account); the second one writes nothing
SELECT r->'status' AS status, r->'body'->>'email' AS email, md5(r->>'body') AS body_md5
  FROM req('anon', 'POST', 'signup', '{"email": "Ada@Acme.test", "password": "correct horse", "organization_name": "Acme"}') r;
SELECT r->'status' AS status, r->'body'->>'email' AS email, md5(r->>'body') AS body_md5
  FROM req('anon', 'POST', 'signup', '{"email": "ada@acme.test", "password": "another pass", "organization_name": "Acme 2"}') r;
SELECT r->'status' AS status, r->'body'->>'code' AS code, r->'body'->>'message' AS message
  FROM (VALUES ('{"email": "not-an-address", "password": "correct horse", "organization_name": "X"}'::jsonb),
               ('{"email": "x@y.test", "password": "short", "organization_name": "X"}'),
               ('{"email": "x@y.test", "password": "correct horse"}'),
               ('{"email": "x@y.test", "password": "correct horse", "organization_name": "X", "plan": "gold"}')) b(body),
       LATERAL req('anon', 'POST', 'signup', b.body) r;
SELECT r->'status' AS status FROM req('anon', 'POST', 'signup', '{"email": "bo@globex.test", "password": "globex pass", "organization_name": "Globex"}') r;
-- nothing half-written by the refusals: two organizations, two users
RESET SESSION AUTHORIZATION;
SELECT (SELECT count(*) FROM fluxrate_internal.organizations WHERE name IN ('Acme 2', 'X')) AS refused_orgs, (SELECT count(*) FROM fluxrate_internal.users) AS users,
       (SELECT password_hash LIKE '$argon2id$%' FROM fluxrate_internal.users WHERE email = 'ada@acme.test') AS argon2id;
SET SESSION AUTHORIZATION fr_authenticator;

SELECT r->'status' AS status, r->'body'->>'message' AS message
  FROM (VALUES ('{"email": "ada@acme.test", "password": "wrong horse"}'::jsonb),
               ('{"email": "nobody@acme.test", "password": "correct horse"}')) b(body),
       LATERAL req('anon', 'POST', 'login', b.body) r;
-- a login: the tokens in the body and as two HttpOnly cookies
CREATE TEMP TABLE logins AS
  SELECT 'a'::text AS who, req('anon', 'POST', 'login', '{"email": "ADA@acme.test", "password": "correct horse"}') AS r
  UNION ALL
  SELECT 'b', req('anon', 'POST', 'login', '{"email": "bo@globex.test", "password": "globex pass"}');
SELECT who, r->'status' AS status, r->'body'->>'token_type' AS token_type, r->'body'->'expires_in' AS expires_in,
       r->'body'->'refresh_expires_in' AS refresh_expires_in,
       regexp_replace(r->'headers'->0->>'Set-Cookie', '=[^;]+;', '=…;') AS cookie1,
       regexp_replace(r->'headers'->1->>'Set-Cookie', '=[^;]+;', '=…;') AS cookie2,
       r->'headers'->0->>'Set-Cookie' = 'access_token=' || (r->'body'->>'access_token') || '; Path=/; Max-Age=900; HttpOnly; Secure; SameSite=Lax' AS cookie_is_token
  FROM logins ORDER BY who;
-- the access token's claims: PostgREST's role claim, the organization, the session; 15 minutes
SELECT who, c->>'role' AS role, c->>'email' AS email, (c->>'exp')::bigint - (c->>'iat')::bigint AS lifetime,
       to_timestamp((c->>'exp')::bigint) AS expires
  FROM logins, LATERAL pgrst_verify_bearer(r->'body'->>'access_token') c ORDER BY who;
INSERT INTO http_creds (who, bearer) SELECT who, r->'body'->>'access_token' FROM logins;
INSERT INTO http_creds (who, cookies) SELECT who || '_cookie', jsonb_build_object('access_token', r->'body'->>'access_token') FROM logins;
INSERT INTO http_creds (who, cookies) SELECT who || '_refresh', jsonb_build_object('refresh_token', r->'body'->>'refresh_token') FROM logins;

-- The three ways in: Bearer, the access_token cookie, none
SELECT who, r->'status' AS status, r->'body'->>'name' AS org, r->'body'->>'code' AS code
  FROM unnest(ARRAY['a', 'b', 'a_cookie', 'b_cookie', 'anon']) who, LATERAL req(who, 'GET', 'get_organization') r;
-- cookies and cross-site requests: a write from another origin is refused, from the same origin allowed
SELECT r->'status' AS status, r->'body'->>'message' AS message
  FROM req('a_cookie', 'POST', 'update_organization', '{"billing_country": "GB"}', '{"origin": "https://evil.example"}') r;
SELECT r->'status' AS status, r->'body'->>'billing_country' AS country
  FROM req('a_cookie', 'POST', 'update_organization', '{"billing_country": "GB"}', '{"origin": "https://api.example.com"}') r;

-- Bad tokens, through PostgREST's Bearer check and through our cookie check alike
RESET SESSION AUTHORIZATION;
SELECT bearer AS good FROM http_creds WHERE who = 'a' \gset
SELECT split_part(:'good', '.', 1) AS h, split_part(:'good', '.', 2) AS p, split_part(:'good', '.', 3) AS s \gset
INSERT INTO http_creds (who, bearer) VALUES
  ('tampered', :'h' || '.' || translate(:'p', 'AEIO', 'EIOA') || '.' || :'s'),
  ('alg_none', 'eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.' || :'p' || '.'),
  ('wrong_secret', fluxrate_internal.jwt_sign(convert_from(decode(translate(:'p', '-_', '+/') || repeat('=', (4 - length(:'p') % 4) % 4), 'base64'), 'UTF8')::jsonb,
                                              convert_to('a-secret-that-is-not-the-servers-at-all', 'UTF8'))),
  ('forged_role', fluxrate_internal.jwt_sign(jsonb_build_object('role', 'fluxrate_apikey', 'org_id', (SELECT org_id FROM fluxrate_internal.users WHERE email = 'ada@acme.test'),
                                              'exp', extract(epoch FROM fluxrate.now())::bigint + 60), convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8')));
INSERT INTO http_creds (who, cookies) SELECT who || '_cookie', jsonb_build_object('access_token', bearer) FROM http_creds
 WHERE who IN ('tampered', 'alg_none', 'wrong_secret', 'forged_role');
SET SESSION AUTHORIZATION fr_authenticator;
SELECT who, r->'status' AS status, r->'body'->>'code' AS code, r->'body'->>'details' AS details
  FROM unnest(ARRAY['tampered', 'alg_none', 'wrong_secret', 'tampered_cookie', 'alg_none_cookie', 'wrong_secret_cookie', 'forged_role_cookie']) who,
       LATERAL req(who, 'GET', 'get_organization') r;
-- a role claim naming a role of ours does not bypass the scopes: no scopes claim, no scope
SELECT r->'status' AS status, r->'body'->>'message' AS message FROM req('forged_role', 'POST', 'track',
  '{"meter_token": "x", "customer_external_id": "c", "quantity": 1}') r;
-- claims set by hand by a role that is not PostgREST's are refused
RESET SESSION AUTHORIZATION;
CREATE ROLE fr_intruder LOGIN;
GRANT USAGE ON SCHEMA fluxrate TO fr_intruder;
GRANT EXECUTE ON FUNCTION fluxrate.get_organization() TO fr_intruder;
SELECT org_id AS org_a FROM fluxrate_internal.users WHERE email = 'ada@acme.test' \gset
SET SESSION AUTHORIZATION fr_intruder;
SELECT set_config('request.jwt.claims', '{"org_id": "' || :'org_a' || '"}', false) IS NOT NULL AS claims_set;
SELECT fluxrate.get_organization();                                                -- PT401
RESET request.jwt.claims;
RESET SESSION AUTHORIZATION;
DROP OWNED BY fr_intruder;
DROP ROLE fr_intruder;
-- expired: 15 minutes and 31 seconds later (30 s of skew, as PostgREST)
SET fluxrate.pinned_now = '2026-05-01 12:15:31+00';
SET SESSION AUTHORIZATION fr_authenticator;
SELECT who, r->'status' AS status, r->'body'->>'details' AS details
  FROM unnest(ARRAY['a', 'a_cookie']) who, LATERAL req(who, 'GET', 'get_organization') r;

-- Refresh: a new pair; the spent token presented again ends the session
SELECT r->'status' AS status, r->'body' ? 'access_token' AS new_access,
       (r->'headers'->1->>'Set-Cookie') LIKE 'refresh_token=rt_%; Path=/rpc/refresh; Max-Age=604800; HttpOnly; Secure; SameSite=Strict' AS cookie
  FROM req('a_refresh', 'POST', 'refresh') r \gset
SELECT :'status' AS status, :'new_access' AS new_access, :'cookie' AS cookie;
CREATE TEMP TABLE refreshed AS SELECT req('b_refresh', 'POST', 'refresh') AS r;
UPDATE http_creds SET bearer = (SELECT r->'body'->>'access_token' FROM refreshed) WHERE who = 'b';
UPDATE http_creds SET cookies = jsonb_build_object('refresh_token', (SELECT r->'body'->>'refresh_token' FROM refreshed)) WHERE who = 'b_refresh';
SELECT r->'status' AS status, r->'body'->>'message' AS message, r->'body'->>'details' AS details
  FROM req('a_refresh', 'POST', 'refresh') r;                                      -- spent: 401, session ended
SELECT r->'status' AS status, r->'body'->>'code' AS code FROM req('anon', 'POST', 'refresh') r;   -- no cookie: 401
SELECT r->'status' AS status, r->'body'->>'name' AS org FROM req('b', 'GET', 'get_organization') r;   -- refreshed token works
-- log in again as Ada for the rest (time is 12:15:31)
CREATE TEMP TABLE relogin AS SELECT req('anon', 'POST', 'login', '{"email": "ada@acme.test", "password": "correct horse"}') AS r;
UPDATE http_creds SET bearer = (SELECT r->'body'->>'access_token' FROM relogin) WHERE who = 'a';
UPDATE http_creds SET cookies = jsonb_build_object('access_token', (SELECT r->'body'->>'access_token' FROM relogin)) WHERE who = 'a_cookie';
UPDATE http_creds SET cookies = jsonb_build_object('refresh_token', (SELECT r->'body'->>'refresh_token' FROM relogin)) WHERE who = 'a_refresh';

-- Logout: clears both cookies; the session's refresh token stops working; logout needs a session
SELECT r->'status' AS status, r->'body' AS body, r->'headers' AS headers FROM req('b', 'POST', 'logout') r;
SELECT r->'status' AS status, r->'body'->>'details' AS details FROM req('b_refresh', 'POST', 'refresh') r;
SELECT r->'status' AS status FROM req('anon', 'POST', 'logout') r;

-- Every endpoint of the quickstart and beyond, as Ada (Bearer) --------------------
-- status, then SQLSTATE and message when refused
RESET SESSION AUTHORIZATION;
CREATE FUNCTION brief(r jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT concat_ws(' ', r->>'status', r->'body'->>'code', r->'body'->>'message') $$;
GRANT EXECUTE ON FUNCTION brief(jsonb) TO fr_authenticator;
SET SESSION AUTHORIZATION fr_authenticator;

-- API keys: the secret once, never listed; X-API-Key credentials for the rest
CREATE TEMP TABLE keys AS
  SELECT s AS scope, req('a', 'POST', 'create_api_key', jsonb_build_object('name', 'backend ' || s, 'scopes', jsonb_build_array(s))) AS r
    FROM unnest(ARRAY['usage.write', 'usage.read']) s;
SELECT scope, brief(r), r->'body'->>'key' ~ '^org_live_[0-9a-f]{32}_[0-9A-Za-z]{43}$' AS key_once FROM keys ORDER BY scope;
SELECT brief(r), jsonb_array_length(r->'body'->'data') AS keys, r->'body'->'data'->0 ? 'key' AS lists_secret
  FROM req('a', 'GET', 'list_api_keys') r;
SELECT brief(req('a', 'POST', 'create_api_key', '{"name": "x", "scopes": ["usage.delete"]}'));
INSERT INTO http_creds (who, headers) SELECT CASE scope WHEN 'usage.write' THEN 'key_w' ELSE 'key_r' END,
  jsonb_build_object('x-api-key', r->'body'->>'key') FROM keys;
INSERT INTO http_creds (who, headers) VALUES ('key_unknown', '{"x-api-key": "org_live_0000000000000000000000000000000000000000000"}');

-- The quickstart, steps 1 to 6
CREATE TEMP TABLE qs AS SELECT req('a', 'POST', 'create_feature', '{"name": "API calls", "lookup_key": "api_calls", "type": "meter",
  "meter_name": "api_calls", "property_name": "calls", "aggregation_type": "SUM", "unit": "call"}') AS feature;
SELECT brief(feature), feature->'body'->>'meter_token' IS NOT NULL AS meter_token FROM qs;
SELECT feature->'body'->>'meter_token' AS meter_token, feature->'body'->>'meter_id' AS meter_id, feature->'body'->>'id' AS feature_id FROM qs \gset
SELECT brief(r), r->'body'->>'id' AS plan_id FROM req('a', 'POST', 'create_plan',
  '{"name": "Usage", "lookup_id": "usage", "type": "USAGE", "billing_interval": "month", "currency": "USD"}') r \gset
SELECT :'brief' AS create_plan;
SELECT brief(req('a', 'POST', 'add_charge', jsonb_build_object('plan_id', :'plan_id', 'type', 'USAGE', 'meter_id', :'meter_id',
  'unit_price', 0.002, 'display_name', 'API calls'))) AS add_charge;
SELECT brief(req('a', 'POST', 'add_charge', jsonb_build_object('plan_id', :'plan_id', 'type', 'USAGE', 'meter_id', :'meter_id',
  'unit_price', -1))) AS negative_price;
SELECT brief(r), r->'body'->>'id' AS customer_id FROM req('a', 'POST', 'create_customer',
  '{"name": "Wayne Ent.", "email": "ap@wayne.test", "external_id": "wayne", "billing_address_country": "US"}') r \gset
SELECT :'brief' AS create_customer;
SELECT brief(req('a', 'POST', 'create_customer', '{"name": "Dup", "email": "dup@wayne.test", "external_id": "wayne"}')) AS duplicate_external_id;
SELECT brief(r), r->'body'->>'id' AS sub_id FROM req('a', 'POST', 'create_subscription', jsonb_build_object(
  'customer_id', :'customer_id', 'plan_id', :'plan_id', 'billing_interval', 'month', 'start_date', '2026-05-01T00:00:00Z')) r \gset
SELECT :'brief' AS create_subscription;
-- step 6 with the X-API-Key header: 201, a replay 200, the same key with another payload 409
SELECT who, brief(req(who, 'POST', 'track', jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne',
         'quantity', q, 'idempotency_key', 'evt-1')))
  FROM (VALUES (1, 'key_w', 5000), (2, 'key_w', 5000), (3, 'key_w', 5001), (4, 'key_r', 5000), (5, 'key_unknown', 5000), (6, 'anon', 5000)) v(n, who, q)
 ORDER BY n;
SELECT brief(req('key_w', 'POST', 'track', jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne', 'quantity', -1))) AS negative,
       brief(req('key_w', 'POST', 'track', jsonb_build_object('customer_external_id', 'wayne', 'quantity', 1))) AS no_meter,
       brief(req('key_w', 'POST', 'track', jsonb_build_object('meter_token', 'mt_nope', 'customer_external_id', 'wayne', 'quantity', 1))) AS unknown_meter;
SELECT brief(r), r->'body'->'created' AS created, r->'body'->'failed' AS failed, r->'body'->'results'->1->>'code' AS second FROM req('key_w', 'POST', 'track_batch', jsonb_build_object('events', jsonb_build_array(
  jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne', 'quantity', 250, 'idempotency_key', 'b-1'),
  jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne', 'quantity', 0, 'idempotency_key', 'b-2')))) r;
-- the events were tracked at 12:15:31; read and bill them a minute later
RESET SESSION AUTHORIZATION;
SET fluxrate.pinned_now = '2026-05-01 12:16:31+00';
SET SESSION AUTHORIZATION fr_authenticator;
-- a key is not a dashboard session: management functions are not granted to the key role
-- (PostgREST chose the anonymous role for a request without Bearer token, so 42501 is 401)
SELECT brief(req('key_w', 'GET', 'list_plans')) AS key_on_management;
-- usage reads: usage.read only (5,000 + 250 calls)
SELECT brief(r), r->'body'->'usage'->0->>'usage' AS usage FROM req('key_r', 'GET', 'get_subscription_usage', jsonb_build_object('subscription_id', :'sub_id')) r;
SELECT brief(req('key_w', 'GET', 'get_subscription_usage', jsonb_build_object('subscription_id', :'sub_id'))) AS write_key_reads;
SELECT brief(r), r->'body'->>'total_usage' AS total_usage, r->'body'->>'event_count' AS events
  FROM req('a', 'GET', 'get_meter_usage', jsonb_build_object('meter_id', :'meter_id', 'group_by', 'day')) r;
SELECT brief(r), r->'body'->>'total_events' AS total_events, r->'body'->>'this_month_usage' AS this_month
  FROM req('key_r', 'GET', 'get_meter_stats', jsonb_build_object('meter_id', :'meter_id')) r;
SELECT brief(r), r->'body'->'meta'->>'total' AS events FROM req('a', 'GET', 'list_meter_events', jsonb_build_object('meter_id', :'meter_id')) r;
-- step 7: preview (5,250 calls x 0.002 = 10.50), generate, finalize, pay
SELECT brief(r), r->'body'->>'total' AS total FROM req('a', 'POST', 'preview_invoice', jsonb_build_object('subscription_id', :'sub_id')) r;
SELECT brief(r), r->'body'->>'id' AS inv_id, r->'body'->>'total' AS total FROM req('a', 'POST', 'generate_invoice', jsonb_build_object('subscription_id', :'sub_id')) r \gset
SELECT :'brief' AS generate_invoice, :'total' AS total;
SELECT brief(r), r->'body'->>'status' AS status, r->'body'->>'invoice_number' AS number FROM req('a', 'POST', 'finalize_invoice', jsonb_build_object('invoice_id', :'inv_id')) r;
SELECT brief(req('a', 'POST', 'finalize_invoice', jsonb_build_object('invoice_id', :'inv_id'))) AS finalize_again;
SELECT brief(r), r->'body'->>'public_url' LIKE 'http://localhost:3000/rpc/public_invoice?token=%' AS url, r->'body'->>'public_token' AS token
  FROM req('a', 'POST', 'generate_invoice_token', jsonb_build_object('invoice_id', :'inv_id')) r \gset
SELECT :'brief' AS generate_token, :'url' AS url;
SELECT brief(r), r->'body'->>'total' AS total, r->'body'->'customer'->>'name' AS customer
  FROM req('anon', 'GET', 'public_invoice', jsonb_build_object('token', :'token')) r;
SELECT brief(req('anon', 'GET', 'public_invoice', '{"token": "00000000-0000-0000-0000-000000000000"}')) AS unknown_token;
SELECT brief(r), r->'body'->>'success' AS success, r->'body'->>'message' AS message
  FROM req('a', 'POST', 'send_invoice_email', jsonb_build_object('invoice_id', :'inv_id')) r;
SELECT brief(r), r->'body'->>'status' AS status FROM req('a', 'POST', 'pay_invoice', jsonb_build_object('invoice_id', :'inv_id')) r;
SELECT brief(req('a', 'POST', 'update_invoice_status', jsonb_build_object('invoice_id', :'inv_id', 'status', 'VOID'))) AS void_paid;
SELECT brief(req('a', 'POST', 'update_invoice_status', jsonb_build_object('invoice_id', :'inv_id', 'status', 'LOST'))) AS bad_status;
-- manual invoices: create 201 (2 x 150 = 300.00), edit, delete
SELECT brief(r), r->'body'->>'id' AS manual_id, r->'body'->>'total' AS total FROM req('a', 'POST', 'create_invoice', jsonb_build_object(
  'customer_id', :'customer_id', 'currency', 'USD', 'line_items', '[{"description": "Onboarding", "quantity": 2, "unit_amount": 150}]'::jsonb)) r \gset
SELECT :'brief' AS create_invoice, :'total' AS total;
SELECT brief(r), r->'body'->>'total' AS total FROM req('a', 'POST', 'update_invoice', jsonb_build_object('invoice_id', :'manual_id',
  'line_items', '[{"description": "Onboarding", "quantity": 3, "unit_amount": 150}]'::jsonb)) r;
SELECT brief(req('a', 'POST', 'create_invoice', jsonb_build_object('customer_id', :'customer_id', 'currency', 'USD',
  'line_items', '[{"description": "x", "quantity": "two", "unit_amount": 1}]'::jsonb))) AS bad_line;
-- reads
SELECT fn, brief(req('a', 'GET', fn, body)) FROM (VALUES
  ('get_invoice', jsonb_build_object('invoice_id', :'inv_id')), ('list_invoices', '{}'),
  ('list_customer_invoices', jsonb_build_object('customer_id', :'customer_id')),
  ('list_subscription_invoices', jsonb_build_object('subscription_id', :'sub_id')),
  ('get_customer', jsonb_build_object('customer_id', :'customer_id')), ('list_customers', '{"page": 1, "page_size": 100}'),
  ('list_customer_subscriptions', jsonb_build_object('customer_id', :'customer_id')),
  ('get_subscription', jsonb_build_object('subscription_id', :'sub_id')),
  ('get_customer_usage', jsonb_build_object('customer_id', :'customer_id')),
  ('get_plan', jsonb_build_object('plan_id', :'plan_id')), ('list_plans', '{}'),
  ('get_feature', jsonb_build_object('feature_id', :'feature_id')), ('list_features', '{}'),
  ('get_meter', jsonb_build_object('meter_id', :'meter_id')), ('list_meters', '{}'),
  ('list_tax_rates', '{}'), ('list_webhook_endpoints', '{}'), ('list_deliveries', '{}'), ('get_organization', '{}'),
  ('invoice_text', jsonb_build_object('invoice_id', :'inv_id')), ('invoice_html', jsonb_build_object('invoice_id', :'inv_id')),
  ('invoice_pdf', jsonb_build_object('invoice_id', :'inv_id')), ('invoice_rows', '{}'), ('invoice_line_rows', '{}')) v(fn, body);
-- the PDF's bytes (PostgREST sends them raw with Accept: application/pdf; the emulator shows bytea as JSON text)
SELECT r->>'status' AS status, left(r->>'body', 12) = '\x255044462d' AS pdf_bytes
  FROM req('a', 'GET', 'invoice_pdf', jsonb_build_object('invoice_id', :'inv_id')) r;
-- an API key (usage.read) reads no invoice documents (not granted, as list_plans above)
SELECT brief(req('key_r', 'GET', 'invoice_pdf', jsonb_build_object('invoice_id', :'inv_id'))) AS key_reads_pdf;
SELECT brief(req('a', 'GET', 'list_customers', '{"page_size": 101}')) AS page_too_big;
SELECT brief(req('a', 'GET', 'get_invoice', '{"invoice_id": "not-a-uuid"}')) AS malformed_id;
SELECT brief(req('a', 'GET', 'get_invoice', '{"invoice": "x"}')) AS unknown_key;
-- a missing field of a create is a 400 naming it (every create parameter has a default)
SELECT fn, brief(req('a', 'POST', fn, body)) FROM (VALUES
  ('create_plan', '{"name": "P", "lookup_id": "p", "type": "USAGE", "billing_interval": "month"}'::jsonb),
  ('create_customer', '{"name": "No mail"}'), ('create_feature', '{"name": "F", "type": "switch"}'),
  ('add_charge', jsonb_build_object('plan_id', :'plan_id')), ('create_subscription', jsonb_build_object('customer_id', :'customer_id')),
  ('create_api_key', '{"name": "k"}'), ('create_invoice', jsonb_build_object('customer_id', :'customer_id')),
  ('update_invoice_status', '{"status": "PAID"}')) v(fn, body);
-- writes
SELECT fn, brief(req('a', 'POST', fn, body)) FROM (VALUES
  (1, 'update_customer', jsonb_build_object('customer_id', :'customer_id', 'phone', '+1 555 0100')),
  (2, 'update_plan', jsonb_build_object('plan_id', :'plan_id', 'description', 'pay as you go')),
  (3, 'add_plan_feature', jsonb_build_object('plan_id', :'plan_id', 'feature_id', :'feature_id', 'usage_limit', 10000)),
  (4, 'set_tax_rate', '{"country": "US", "rate": 0.07, "state": "", "name": "Sales tax"}'),
  (5, 'set_tax_rate', '{"country": "US", "rate": 1.5}'),
  (6, 'create_webhook_endpoint', '{"url": "http://127.0.0.1:1/hooks", "event_types": ["invoice.paid"]}'),
  (7, 'set_smtp_settings', '{"host": "127.0.0.1", "port": 1, "from_email": "billing@acme.test", "username": "u", "password": "p4ss"}'),
  (8, 'update_organization', '{"payment_terms_days": 14}'),
  (9, 'delete_invoice', jsonb_build_object('invoice_id', :'manual_id')),
  (10, 'delete_invoice', jsonb_build_object('invoice_id', :'inv_id')),
  (11, 'cancel_subscription', jsonb_build_object('subscription_id', :'sub_id', 'cancel_at_period_end', true, 'reason', 'test'))) v(n, fn, body)
 ORDER BY n;
SELECT brief(r), r->'body'->>'allowed' AS allowed FROM req('key_r', 'GET', 'check_entitlement', '{"customer_external_id": "wayne", "lookup_key": "api_calls"}') r;
-- what a signed-in user may not do: act for another organization, create one, schedule jobs
SELECT fn, brief(req('a', 'POST', fn, body)) FROM (VALUES
  ('act_as', jsonb_build_object('org_id', :'org_a')), ('create_organization', '{"name": "Mine"}'), ('schedule_jobs', '{}')) v(fn, body);

INSERT INTO http_creds (who, bearer)
  SELECT 'b2', (req('anon', 'POST', 'login', '{"email": "bo@globex.test", "password": "globex pass"}'))->'body'->>'access_token';
-- Tenancy: Globex (b) through every endpoint that takes one of Acme's ids: 404, nothing changes
SELECT fn, brief(req('b2', 'POST', fn, body)) FROM (VALUES
  ('get_invoice', jsonb_build_object('invoice_id', :'inv_id')), ('finalize_invoice', jsonb_build_object('invoice_id', :'manual_id')),
  ('invoice_text', jsonb_build_object('invoice_id', :'inv_id')), ('invoice_html', jsonb_build_object('invoice_id', :'inv_id')),
  ('invoice_pdf', jsonb_build_object('invoice_id', :'inv_id')),
  ('pay_invoice', jsonb_build_object('invoice_id', :'inv_id')), ('void_invoice', jsonb_build_object('invoice_id', :'inv_id')),
  ('update_invoice_status', jsonb_build_object('invoice_id', :'inv_id', 'status', 'VOID')),
  ('update_invoice', jsonb_build_object('invoice_id', :'inv_id', 'due_date', '2027-01-01')),
  ('delete_invoice', jsonb_build_object('invoice_id', :'inv_id')),
  ('send_invoice_email', jsonb_build_object('invoice_id', :'inv_id')),
  ('generate_invoice_token', jsonb_build_object('invoice_id', :'inv_id')),
  ('create_invoice', jsonb_build_object('customer_id', :'customer_id', 'currency', 'USD')),
  ('get_customer', jsonb_build_object('customer_id', :'customer_id')),
  ('update_customer', jsonb_build_object('customer_id', :'customer_id', 'name', 'Mine now')),
  ('delete_customer', jsonb_build_object('customer_id', :'customer_id')),
  ('list_customer_invoices', jsonb_build_object('customer_id', :'customer_id')),
  ('list_customer_subscriptions', jsonb_build_object('customer_id', :'customer_id')),
  ('get_customer_usage', jsonb_build_object('customer_id', :'customer_id')),
  ('get_subscription', jsonb_build_object('subscription_id', :'sub_id')),
  ('get_subscription_usage', jsonb_build_object('subscription_id', :'sub_id')),
  ('list_subscription_invoices', jsonb_build_object('subscription_id', :'sub_id')),
  ('preview_invoice', jsonb_build_object('subscription_id', :'sub_id')),
  ('generate_invoice', jsonb_build_object('subscription_id', :'sub_id')),
  ('cancel_subscription', jsonb_build_object('subscription_id', :'sub_id')),
  ('delete_subscription', jsonb_build_object('subscription_id', :'sub_id')),
  ('create_subscription', jsonb_build_object('customer_id', :'customer_id', 'plan_id', :'plan_id')),
  ('get_plan', jsonb_build_object('plan_id', :'plan_id')),
  ('update_plan', jsonb_build_object('plan_id', :'plan_id', 'name', 'x')),
  ('delete_plan', jsonb_build_object('plan_id', :'plan_id')),
  ('add_charge', jsonb_build_object('plan_id', :'plan_id', 'type', 'FIXED', 'unit_price', 1)),
  ('add_plan_feature', jsonb_build_object('plan_id', :'plan_id', 'feature_id', :'feature_id')),
  ('get_feature', jsonb_build_object('feature_id', :'feature_id')),
  ('get_meter', jsonb_build_object('meter_id', :'meter_id')),
  ('list_meter_events', jsonb_build_object('meter_id', :'meter_id')),
  ('get_meter_usage', jsonb_build_object('meter_id', :'meter_id')),
  ('get_meter_stats', jsonb_build_object('meter_id', :'meter_id')),
  ('revoke_api_key', jsonb_build_object('key_id', (SELECT r->'body'->>'id' FROM keys WHERE scope = 'usage.write')))) v(fn, body)
 ORDER BY fn;
-- and Globex's lists do not show Acme's rows
SELECT fn, (req('b2', 'GET', fn))->'body'->'meta'->>'total' AS total
  FROM unnest(ARRAY['list_customers', 'list_invoices', 'list_plans', 'list_features', 'list_api_keys', 'list_deliveries']) fn;
SELECT brief(req('b2', 'POST', 'track', jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne', 'quantity', 1))) AS b_tracks_a_meter;

-- Revoking a key: 401 at once
SELECT brief(req('a', 'POST', 'revoke_api_key', jsonb_build_object('key_id', (SELECT r->'body'->>'id' FROM keys WHERE scope = 'usage.write')))) AS revoke;
SELECT brief(req('key_w', 'POST', 'track', jsonb_build_object('meter_token', :'meter_token', 'customer_external_id', 'wayne', 'quantity', 1))) AS revoked_key;
-- Logout then refresh: refused
SELECT brief(req('a', 'POST', 'logout')) AS logout;
SELECT brief(req('a_refresh', 'POST', 'refresh')) AS refresh_after_logout;

-- Operators may bring their own JWT secret (at least 32 characters); tokens signed with
-- the old one stop working at once, new logins work
RESET SESSION AUTHORIZATION;
SELECT fluxrate_internal.sys_set_jwt_secret('too-short');                         -- PT422
SELECT fluxrate_internal.sys_set_jwt_secret(repeat('s3cret-', 6));
SELECT length(fluxrate_internal.sys_jwt_secret()) AS secret_length;
SET SESSION AUTHORIZATION fr_authenticator;
SELECT brief(req('b2', 'GET', 'get_organization')) AS old_token;
UPDATE http_creds SET bearer = (req('anon', 'POST', 'login', '{"email": "bo@globex.test", "password": "globex pass"}'))->'body'->>'access_token'
 WHERE who = 'b2';
SELECT brief(r), r->'body'->>'name' AS org FROM req('b2', 'GET', 'get_organization') r;

-- Security lint of the exposed schema ------------------------------------------
RESET SESSION AUTHORIZATION;
-- no SECURITY DEFINER function without a pinned search_path, no EXECUTE for PUBLIC
SELECT p.oid::regprocedure AS definer_without_search_path FROM pg_proc p
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace) AND p.prosecdef
   AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%');
SELECT p.oid::regprocedure AS executable_by_public FROM pg_proc p
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
   AND has_function_privilege('public', p.oid, 'execute');
-- what each PostgREST role may call in the exposed schema (the contract, spelled out)
SELECT r AS role, string_agg(p.proname, ', ' ORDER BY p.proname) AS may_execute
  FROM unnest(ARRAY['fluxrate_anon', 'fluxrate_apikey']) r, pg_proc p
 WHERE p.pronamespace = 'fluxrate'::regnamespace AND has_function_privilege(r, p.oid, 'execute')
 GROUP BY r ORDER BY r;
SELECT string_agg(p.proname, ', ' ORDER BY p.proname) AS web_may_not_execute
  FROM pg_proc p WHERE p.pronamespace = 'fluxrate'::regnamespace AND NOT has_function_privilege('fluxrate_web', p.oid, 'execute');
-- every exposed function with its security settings
SELECT p.proname, CASE WHEN p.prosecdef THEN 'definer' ELSE 'invoker' END AS security, p.provolatile AS volatility,
       array_to_string(p.proconfig, ' ') AS settings
  FROM pg_proc p WHERE p.pronamespace = 'fluxrate'::regnamespace ORDER BY p.proname, p.oid::regprocedure::text;

DROP TABLE http_creds;
DROP OWNED BY fr_authenticator;
DROP ROLE fr_authenticator;
RESET fluxrate.pinned_now;
