-- 20_sync.sql: the router's API is generated from a shard's own catalog.
--
-- Why generated, not written by hand: a shard's schema fluxrate has ~80 public
-- functions, and every fluxrate release adds or changes some.  Hand-written
-- wrappers would drift from the shards silently (a missed parameter default
-- is a different HTTP contract); generated ones are the shards' signatures by
-- construction, and after ALTER EXTENSION fluxrate UPDATE on the shards one
-- SELECT fluxrate_router.sync_api() brings the router along, with no router
-- release.  sync_api() refuses shards that run different fluxrate versions or
-- hold different server secrets.
--
-- For each shard function f(args) -> r it creates
--   fluxrate_router_calls.f(part integer, claims text, args...) -> r
--       LANGUAGE plproxy: RUN ON part; on the shard, sets request.jwt.claims
--       (transaction-local: each PL/Proxy call is one transaction there) and
--       calls fluxrate.f positionally;
--   fluxrate.f(args with the shard's defaults) -> r, SECURITY DEFINER:
--       route() -> (part, claims), then the call above; the shard's
--       volatility and EXECUTE grants.  Errors leave as the shard raised them
--       (reraise(): PL/Proxy's "REMOTE ERROR" wrapping taken off, SQLSTATE,
--       DETAIL and HINT kept); a shard that does not answer is PT503.
--   fluxrate_router_calls.f__key(part integer, args...) -> r, for a function
--       with an api_key parameter (track, track_batch): the bare call, no
--       claims.  The wrapper takes this path when a key is given, routed by
--       key_shard() (the hot path of track through the router).
-- Not wrapped: procedures and jobs (close_due_periods, ..., schedule_jobs,
-- refresh_usage_rollups: every shard runs its own by pg_cron; nothing is
-- scheduled on the router), now(), and the hand-written ones in 30_*.sql.

-- The shard's catalog, read over PL/Proxy (RUN ON the given shard).
CREATE FUNCTION fluxrate_router_calls.shard_functions(integer,
    OUT name text, OUT kind text, OUT volatility text, OUT result text, OUT args text,
    OUT argtypes text, OUT nargs integer, OUT api_key_pos integer, OUT grantees text, OUT retset boolean)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT p.proname::text AS name, p.prokind::text AS kind, p.provolatile::text AS volatility,
         pg_catalog.pg_get_function_result(p.oid) AS result, pg_catalog.pg_get_function_arguments(p.oid) AS args,
         (SELECT pg_catalog.string_agg(pg_catalog.format_type(t.t, NULL), ', ' ORDER BY t.o)
            FROM pg_catalog.unnest(p.proargtypes::oid[]) WITH ORDINALITY AS t(t, o)) AS argtypes,
         p.pronargs::integer AS nargs,
         coalesce(pg_catalog.array_position(p.proargnames, 'api_key'), 0) AS api_key_pos,
         (SELECT pg_catalog.string_agg(DISTINCT a.grantee::regrole::text, ',')
            FROM pg_catalog.aclexplode(p.proacl) AS a
           WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> 0) AS grantees,
         p.proretset AS retset
    FROM pg_catalog.pg_proc p
   WHERE p.pronamespace = 'fluxrate'::regnamespace;
$p$;

-- The shard's domains in schema fluxrate (the media types PostgREST serves by
-- a function's return type: "text/html", "application/pdf", ...): the router
-- needs the same ones for the same signatures.
CREATE FUNCTION fluxrate_router_calls.shard_domains(integer, OUT name text, OUT base text)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT t.typname::text AS name, pg_catalog.format_type(t.typbasetype, t.typtypmod) AS base
    FROM pg_catalog.pg_type t WHERE t.typnamespace = 'fluxrate'::regnamespace AND t.typtype = 'd';
$p$;

-- What every shard runs and holds in common: fluxrate's version and a digest
-- of the server secrets (API-key pepper, sealing key, JWT secret), which must
-- be the same on every shard so that a moved organization's keys, sealed
-- secrets and tokens keep working (share_secrets() below).
CREATE FUNCTION fluxrate_router_calls.shard_identity(integer, OUT version text, OUT secrets_digest text,
    OUT system_identifier text, OUT in_recovery boolean, OUT keyed_rows bigint)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname = 'fluxrate')::text AS version,
         d.digest AS secrets_digest,
         (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c)::text AS system_identifier,
         pg_catalog.pg_is_in_recovery() AS in_recovery, d.keyed_rows
    FROM fluxrate_internal.sys_secrets_digest() d;
$p$;

CREATE FUNCTION fluxrate_router_calls.export_secrets(integer) RETURNS jsonb
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_export_server_secrets() AS export_secrets;
$p$;

CREATE FUNCTION fluxrate_router_calls.put_secrets(integer, jsonb) RETURNS integer
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_put_server_secrets($2) AS put_secrets;
$p$;

-- Each shard's identity, shard by shard.
CREATE FUNCTION fluxrate_router.shards()
  RETURNS TABLE (shard integer, version text, secrets_digest text, system_identifier text, in_recovery boolean, keyed_rows bigint)
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  FOR i IN 0 .. fluxrate_router.shard_count() - 1 LOOP
    RETURN QUERY SELECT i, x.* FROM fluxrate_router_calls.shard_identity(i) x;
  END LOOP;
END
$$;

-- Give every shard shard 0's server secrets.  Once, when the shards are new:
-- refused when a shard other than 0 already holds keys, webhooks, SMTP
-- settings or users (their hashes and seals would no longer open).
CREATE FUNCTION fluxrate_router.share_secrets() RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_secrets jsonb := fluxrate_router_calls.export_secrets(0);
  v_digest text := (SELECT i.secrets_digest FROM fluxrate_router_calls.shard_identity(0) i);
  s record;
  n integer := 0;
BEGIN
  FOR s IN SELECT * FROM fluxrate_router.shards() x WHERE x.shard OPERATOR(pg_catalog.>) 0 LOOP
    IF s.secrets_digest OPERATOR(pg_catalog.<>) v_digest THEN
      PERFORM fluxrate_router_calls.put_secrets(s.shard, v_secrets);   -- refused if the shard is in use
      n := n + 1;
    END IF;
  END LOOP;
  RETURN n;
END
$$;

-- Every shard answers, runs the same fluxrate and holds the same secrets.
CREATE FUNCTION fluxrate_router.check_shards() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v jsonb;
BEGIN
  SELECT pg_catalog.jsonb_build_object('shards', count(*), 'versions', pg_catalog.jsonb_agg(DISTINCT i.version),
           'secrets', count(DISTINCT i.secrets_digest), 'in_recovery', count(*) FILTER (WHERE i.in_recovery))
    INTO v FROM fluxrate_router.shards() i;
  IF (v OPERATOR(pg_catalog.->>) 'shards')::integer OPERATOR(pg_catalog.<>) fluxrate_router.shard_count() THEN
    PERFORM fluxrate_router.fail('55000', 'not every shard answered', v::text);
  END IF;
  IF pg_catalog.jsonb_array_length(v OPERATOR(pg_catalog.->) 'versions') OPERATOR(pg_catalog.<>) 1 THEN
    PERFORM fluxrate_router.fail('55000', 'the shards run different fluxrate versions', v::text,
      'Run ALTER EXTENSION fluxrate UPDATE on every shard, then SELECT fluxrate_router.sync_api().');
  END IF;
  IF (v OPERATOR(pg_catalog.->>) 'secrets')::integer OPERATOR(pg_catalog.<>) 1 THEN
    PERFORM fluxrate_router.fail('55000', 'the shards hold different server secrets', v::text,
      'SELECT fluxrate_router.share_secrets() while the shards are new (docs/scale-out.md).');
  END IF;
  RETURN v;
END
$$;

-- Functions of schema fluxrate on the shards that the router does not wrap,
-- or wraps by hand (30_organizations.sql).
CREATE FUNCTION fluxrate_router.unwrapped() RETURNS text[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['now', 'schedule_jobs', 'unschedule_jobs', 'refresh_usage_rollups', 'pre_request', 'act_as'] $$;
CREATE FUNCTION fluxrate_router.hand_wrapped() RETURNS text[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['create_organization', 'signup', 'login', 'refresh'] $$;
-- Calls by a token that names no organization (public invoice links: a random
-- uuid): tried on each shard in turn, the one that does not answer PT404 wins.
-- At most one holds the token; a few shards cost a few calls, on links people open.
CREATE FUNCTION fluxrate_router.searched() RETURNS text[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['public_invoice', 'public_invoice_html', 'public_invoice_pdf'] $$;
-- Operator calls that span organizations: run on every shard, merged as
-- {"shards": [one result per shard]} (health() when the shards have it).
CREATE FUNCTION fluxrate_router.spanning() RETURNS text[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['health'] $$;

-- The wrappers of a spanning call (spanning()): run on every shard and merged.
-- One that returns rows (health()) answers every shard's rows, each led by the
-- shard it came from (its database and system identifier); one that returns
-- a value answers {"shards": [each shard's result]}.  Returns the public
-- wrapper's signature, or NULL when the shard function takes arguments (not
-- wrapped: a spanning call names no organization and takes none).
CREATE FUNCTION fluxrate_router.wrap_spanning(name text, nargs integer, retset boolean, result text, volatility text)
  RETURNS text
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $wrap$
BEGIN
  IF retset THEN
    -- a set of rows per shard (health()): every shard's rows, each led by the
    -- shard it came from (its database and system identifier)
    IF nargs OPERATOR(pg_catalog.<>) 0 OR result NOT LIKE 'TABLE(%' THEN
      RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format($f$
      CREATE FUNCTION fluxrate_router_calls.%1$I() RETURNS TABLE(shard text, %2$s LANGUAGE plproxy AS $p$
        CLUSTER 'fluxrate_shards';
        RUN ON ALL;
        SELECT pg_catalog.current_database() || ':' || (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c)::text AS shard,
               r.* FROM fluxrate.%1$I() r;
      $p$ $f$, name, pg_catalog.substr(result, 7));
    EXECUTE pg_catalog.format($f$
      CREATE FUNCTION fluxrate.%1$I() RETURNS TABLE(shard text, %2$s LANGUAGE sql %3$s SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $b$ SELECT * FROM fluxrate_router_calls.%1$I() $b$ $f$,
      name, pg_catalog.substr(result, 7), CASE volatility WHEN 's' THEN 'STABLE' WHEN 'i' THEN 'STABLE' ELSE 'VOLATILE' END);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION fluxrate_router_calls.%I() FROM PUBLIC', name);
    INSERT INTO fluxrate_router.generated VALUES (pg_catalog.format('fluxrate_router_calls.%I()', name), 'internal'),
                                                 (pg_catalog.format('fluxrate.%I()', name), 'spanning');
    RETURN pg_catalog.format('fluxrate.%I()', name);
  ELSE
    IF nargs OPERATOR(pg_catalog.<>) 0 THEN
      RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format($f$
      CREATE FUNCTION fluxrate_router_calls.%1$I() RETURNS SETOF jsonb LANGUAGE plproxy AS $p$
        CLUSTER 'fluxrate_shards';
        RUN ON ALL;
        SELECT pg_catalog.to_jsonb(fluxrate.%1$I()) || pg_catalog.jsonb_build_object('shard_database', pg_catalog.current_database(),
                 'system_identifier', (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c)::text) AS %1$I;
      $p$ $f$, name);
    EXECUTE pg_catalog.format($f$
      CREATE FUNCTION fluxrate.%1$I() RETURNS jsonb LANGUAGE sql %2$s SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $b$ SELECT pg_catalog.jsonb_build_object('shards', pg_catalog.jsonb_agg(r)) FROM fluxrate_router_calls.%1$I() r $b$ $f$,
      name, CASE volatility WHEN 's' THEN 'STABLE' WHEN 'i' THEN 'STABLE' ELSE 'VOLATILE' END);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION fluxrate_router_calls.%I() FROM PUBLIC', name);
    INSERT INTO fluxrate_router.generated VALUES (pg_catalog.format('fluxrate_router_calls.%I()', name), 'internal'),
                                                 (pg_catalog.format('fluxrate.%I()', name), 'spanning');
    RETURN pg_catalog.format('fluxrate.%I()', name);
  END IF;
END
$wrap$;

CREATE FUNCTION fluxrate_router.sync_api() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $sync$
DECLARE
  f record;
  g record;
  d record;
  v_params text;
  v_pos text;
  v_sig text;
  v_routed integer := 0;
  v_spanning integer := 0;
  v_grantee text;
  v_keyed boolean;
BEGIN
  PERFORM fluxrate_router.check_shards();
  -- drop what the last sync made (the shards may have dropped or changed it)
  FOR g IN SELECT * FROM fluxrate_router.generated ORDER BY kind DESC LOOP
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s', g.signature);
  END LOOP;
  DELETE FROM fluxrate_router.generated;

  FOR d IN SELECT * FROM fluxrate_router_calls.shard_domains(0) LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) 'fluxrate'::regnamespace
                    AND t.typname OPERATOR(pg_catalog.=) d.name) THEN
      EXECUTE pg_catalog.format('CREATE DOMAIN fluxrate.%I AS %s', d.name, d.base);
    END IF;
  END LOOP;
  FOR f IN SELECT * FROM fluxrate_router_calls.shard_functions(0) s
            WHERE s.kind OPERATOR(pg_catalog.=) 'f' AND NOT s.name OPERATOR(pg_catalog.=) ANY (fluxrate_router.unwrapped())
            ORDER BY s.name LOOP
    -- $3, $4, ...: the shard function's arguments, positionally
    SELECT coalesce(pg_catalog.string_agg('$' || (i + 2), ', ' ORDER BY i), '') INTO v_pos
      FROM pg_catalog.generate_series(1, f.nargs) i;
    IF f.name OPERATOR(pg_catalog.=) ANY (fluxrate_router.spanning()) THEN
      v_sig := fluxrate_router.wrap_spanning(f.name, f.nargs, f.retset, f.result, f.volatility::text);
      IF v_sig IS NULL THEN
        CONTINUE;
      END IF;
      v_spanning := v_spanning + 1;
    ELSE
      IF f.retset THEN
        -- rows: the call runs after the claims are set (a lateral reference to them)
        EXECUTE pg_catalog.format($f$
          CREATE FUNCTION fluxrate_router_calls.%1$I(integer, text%2$s) RETURNS %3$s LANGUAGE plproxy AS $p$
            CLUSTER 'fluxrate_shards';
            RUN ON $1;
            SELECT r.* FROM (SELECT pg_catalog.set_config('request.jwt.claims', $2, true) AS c OFFSET 0) AS _ctx
              CROSS JOIN LATERAL (SELECT * FROM fluxrate.%1$I(%4$s) WHERE _ctx.c IS NOT NULL) AS r;
          $p$ $f$, f.name, CASE WHEN f.nargs OPERATOR(pg_catalog.>) 0 THEN ', ' || f.argtypes ELSE '' END, f.result, v_pos);
      ELSE
        EXECUTE pg_catalog.format($f$
          CREATE FUNCTION fluxrate_router_calls.%1$I(integer, text%2$s) RETURNS %3$s LANGUAGE plproxy AS $p$
            CLUSTER 'fluxrate_shards';
            RUN ON $1;
            SELECT fluxrate.%1$I(%4$s) AS %1$I FROM (SELECT pg_catalog.set_config('request.jwt.claims', $2, true)) AS _ctx(c);
          $p$ $f$, f.name, CASE WHEN f.nargs OPERATOR(pg_catalog.>) 0 THEN ', ' || f.argtypes ELSE '' END, f.result, v_pos);
      END IF;
      v_sig := pg_catalog.format('fluxrate_router_calls.%I(integer, text%s)', f.name,
                                 CASE WHEN f.nargs OPERATOR(pg_catalog.>) 0 THEN ', ' || f.argtypes ELSE '' END);
      -- the internals take any claims: for the SECURITY DEFINER wrappers only
      EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_sig);
      INSERT INTO fluxrate_router.generated VALUES (v_sig, 'internal');
      -- A call with an API key (track, track_batch) needs no claims: the shard
      -- verifies the key.  Its own internal sends the shard the bare call,
      -- without the claims subquery, which the shard would parse and plan on
      -- every call (PL/Proxy's statements are not prepared).
      v_keyed := f.api_key_pos OPERATOR(pg_catalog.>) 0 AND NOT f.retset;
      IF v_keyed THEN
        SELECT pg_catalog.string_agg('$' || (i + 1), ', ' ORDER BY i) INTO v_pos
          FROM pg_catalog.generate_series(1, f.nargs) i;
        EXECUTE pg_catalog.format($f$
          CREATE FUNCTION fluxrate_router_calls.%1$I(integer, %2$s) RETURNS %3$s LANGUAGE plproxy AS $p$
            CLUSTER 'fluxrate_shards';
            RUN ON $1;
            SELECT fluxrate.%4$I(%5$s) AS %4$I;
          $p$ $f$, f.name || '__key', f.argtypes, f.result, f.name, v_pos);
        v_sig := pg_catalog.format('fluxrate_router_calls.%I(integer, %s)', f.name || '__key', f.argtypes);
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_sig);
        INSERT INTO fluxrate_router.generated VALUES (v_sig, 'internal');
      END IF;
      IF f.name OPERATOR(pg_catalog.=) ANY (fluxrate_router.hand_wrapped()) THEN
        CONTINUE;
      END IF;
      SELECT coalesce(pg_catalog.string_agg(', $' || i, '' ORDER BY i), '') INTO v_params
        FROM pg_catalog.generate_series(1, f.nargs) i;
      IF f.name OPERATOR(pg_catalog.=) ANY (fluxrate_router.searched()) THEN
        EXECUTE pg_catalog.format($f$
          CREATE FUNCTION fluxrate.%1$I(%2$s) RETURNS %3$s LANGUAGE plpgsql %4$s SECURITY DEFINER
            SET search_path = pg_catalog, pg_temp
            AS $b$
          DECLARE
            e1 text; e2 text; e3 text; e4 text;
          BEGIN
            FOR i IN 0 .. fluxrate_router.shard_count() - 1 LOOP
              BEGIN
                RETURN fluxrate_router_calls.%1$I(i, ''%5$s);
              EXCEPTION WHEN SQLSTATE 'PT404' THEN
                GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
              END;
            END LOOP;
            -- no shard holds it: the last shard's refusal
            PERFORM fluxrate_router.reraise(NULL, ARRAY[coalesce(e1, 'PT404'), coalesce(e2, 'not found'), e3, e4]);
            RETURN NULL;
          END
          $b$ $f$,
          f.name, f.args, f.result, CASE f.volatility WHEN 'v' THEN 'VOLATILE' ELSE 'STABLE' END, v_params);
      ELSE
      EXECUTE pg_catalog.format($f$
        CREATE FUNCTION fluxrate.%1$I(%2$s) RETURNS %3$s LANGUAGE plpgsql %4$s SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp
          AS $b$
        DECLARE
          v_part integer;
          v_claims text;
          e1 text; e2 text; e3 text; e4 text;
        BEGIN%9$s
          SELECT r.part, r.claims INTO v_part, v_claims FROM fluxrate_router.route(%6$s) r;
          %7$s fluxrate_router_calls.%1$I(v_part, v_claims%5$s);
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS e1 = RETURNED_SQLSTATE, e2 = MESSAGE_TEXT, e3 = PG_EXCEPTION_DETAIL, e4 = PG_EXCEPTION_HINT;
          PERFORM fluxrate_router.reraise(v_part, ARRAY[e1, e2, e3, e4]);
          %8$s;
        END
        $b$ $f$,
        f.name, f.args, f.result, CASE f.volatility WHEN 'v' THEN 'VOLATILE' ELSE 'STABLE' END, v_params,
        CASE WHEN f.api_key_pos OPERATOR(pg_catalog.>) 0 THEN '$' || f.api_key_pos ELSE 'NULL::text' END,
        CASE WHEN f.retset THEN 'RETURN QUERY SELECT * FROM' ELSE 'RETURN' END,
        CASE WHEN f.retset THEN 'RETURN' ELSE 'RETURN NULL' END,
        CASE WHEN v_keyed THEN pg_catalog.format($k$
          IF $%1$s IS NOT NULL THEN
            v_part := fluxrate_router.key_shard($%1$s);
            RETURN fluxrate_router_calls.%2$I(v_part%3$s);
          END IF;$k$, f.api_key_pos, f.name || '__key', v_params) ELSE '' END);
      END IF;
      v_sig := pg_catalog.format('fluxrate.%I(%s)', f.name, f.argtypes);
      INSERT INTO fluxrate_router.generated VALUES (v_sig, 'routed');
      v_routed := v_routed + 1;
    END IF;
    -- the shard's grants, to the roles of the same names here
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_sig);
    FOR v_grantee IN SELECT pg_catalog.unnest(pg_catalog.string_to_array(f.grantees, ',')) LOOP
      IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) v_grantee) THEN
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_sig, v_grantee);
      END IF;
    END LOOP;
  END LOOP;

  RETURN pg_catalog.jsonb_build_object('routed', v_routed, 'spanning', v_spanning,
    'shards', fluxrate_router.shard_count());
END
$sync$;
