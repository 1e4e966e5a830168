-- 40_move.sql: moving one organization to another shard (docs/scale-out.md,
-- "Moving an organization").  Only that organization's calls pause; the
-- others on both shards go on.

-- Moving rows: the shard's own superuser-only helpers (src/sql/85_shard.sql).
CREATE FUNCTION fluxrate_router_calls.org_tables(integer, OUT tbl text, OUT cols text, OUT depth integer, OUT derived boolean)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT t.tbl, t.cols, t.depth, t.derived FROM fluxrate_internal.sys_org_tables() t;
$p$;
CREATE FUNCTION fluxrate_router_calls.org_rows(integer, uuid, OUT tbl text, OUT derived boolean, OUT n bigint)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT r.tbl, r.derived, r.n FROM fluxrate_internal.sys_org_rows($2) r;
$p$;
CREATE FUNCTION fluxrate_router_calls.org_export(integer, text, uuid) RETURNS jsonb
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_org_export($2, $3) AS org_export;
$p$;
CREATE FUNCTION fluxrate_router_calls.org_import(integer, text, uuid, jsonb) RETURNS bigint
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_org_import($2, $3, $4) AS org_import;
$p$;
CREATE FUNCTION fluxrate_router_calls.org_delete(integer, text, uuid) RETURNS bigint
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT fluxrate_internal.sys_org_delete($2, $3) AS org_delete;
$p$;

-- Its invoices, summed, on one shard: the totals a move must keep.
CREATE FUNCTION fluxrate_router_calls.org_invoices(integer, uuid,
    OUT invoices bigint, OUT total numeric, OUT numbers text)
  RETURNS SETOF record
  LANGUAGE plproxy AS $p$
  CLUSTER 'fluxrate_shards';
  RUN ON $1;
  SELECT count(*) AS invoices, coalesce(sum(i.total), 0) AS total,
         coalesce(pg_catalog.string_agg(i.status || ':' || coalesce(i.invoice_number, '-') || ':' || i.total::text, ','
                  ORDER BY i.id), '') AS numbers
    FROM fluxrate_internal.invoices i WHERE i.org_id = $2;
$p$;

-- Refuse this organization's calls from now on (PT503, retry), once every call
-- already past the routing check has finished: the exclusive advisory lock
-- waits for the shared ones shard_of() holds until their transactions end.
-- Takes effect when the caller commits.
CREATE FUNCTION fluxrate_router.pause_organization(org uuid) RETURNS boolean
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock(1179800658, pg_catalog.hashtext(org::text));
  UPDATE fluxrate_router.organizations o SET paused = true WHERE o.org_id OPERATOR(pg_catalog.=) org;
  IF NOT FOUND THEN
    PERFORM fluxrate_router.fail('PT404', 'organization not found', pg_catalog.format('No shard of this router holds organization %s.', org));
  END IF;
  RETURN true;
END
$$;

CREATE FUNCTION fluxrate_router.resume_organization(org uuid) RETURNS boolean
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
  UPDATE fluxrate_router.organizations o SET paused = false WHERE o.org_id OPERATOR(pg_catalog.=) org RETURNING true
$$;

-- Per table, the organization's row counts on two shards side by side (the
-- derived rollups left out: the target rebuilds them from the events).
CREATE FUNCTION fluxrate_router.compare_rows(org uuid, a integer, b integer)
  RETURNS TABLE (tbl text, n_a bigint, n_b bigint)
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT x.tbl, x.n, y.n
    FROM fluxrate_router_calls.org_rows(a, org) x
    JOIN fluxrate_router_calls.org_rows(b, org) y ON y.tbl OPERATOR(pg_catalog.=) x.tbl
   WHERE NOT x.derived
$$;

-- CALL fluxrate_router.move_organization(org, to_shard): pause the
-- organization (committed), copy its rows table by table (parents first),
-- verify every table's count and its invoices' count, numbers and totals,
-- switch the directory and resume (committed), then delete the old copy
-- (children first) and verify it is gone.  A failure before the switch
-- deletes the partial copy on the target and resumes the organization on its
-- old shard; nothing is lost either way.  report: what was moved.
-- Must be CALLed outside a transaction block (it commits).
-- (No SET search_path clause: a procedure with one cannot COMMIT.  Its names
-- are schema-qualified, and only a superuser may call it.)
CREATE PROCEDURE fluxrate_router.move_organization(org uuid, to_shard integer, INOUT report jsonb DEFAULT NULL)
  LANGUAGE plpgsql
  AS $$
DECLARE
  o fluxrate_router.organizations;
  t record;
  v_from integer;
  v_n bigint;
  v_copied jsonb := '{}';
  v_inv_from record;
  v_inv_to record;
  v_error text;
  v_detail text;
  v_was_paused boolean;
BEGIN
  SELECT * INTO o FROM fluxrate_router.organizations x WHERE x.org_id OPERATOR(pg_catalog.=) org;
  IF NOT FOUND THEN
    PERFORM fluxrate_router.fail('PT404', 'organization not found', pg_catalog.format('No shard of this router holds organization %s.', org));
  END IF;
  IF to_shard IS NULL OR to_shard OPERATOR(pg_catalog.<) 0 OR to_shard OPERATOR(pg_catalog.>=) fluxrate_router.shard_count() THEN
    PERFORM fluxrate_router.fail('22023', pg_catalog.format('invalid to_shard: %s', coalesce(to_shard::text, 'null')),
      pg_catalog.format('Shards are numbered 0 to %s.', fluxrate_router.shard_count() - 1));
  END IF;
  IF to_shard OPERATOR(pg_catalog.=) o.shard THEN
    PERFORM fluxrate_router.fail('22023', pg_catalog.format('organization %s is on shard %s already', org, to_shard));
  END IF;
  v_from := o.shard;
  v_was_paused := o.paused;
  PERFORM fluxrate_router.pause_organization(org);
  COMMIT;

  BEGIN
    IF EXISTS (SELECT 1 FROM fluxrate_router_calls.org_rows(to_shard, org) r WHERE r.n OPERATOR(pg_catalog.>) 0) THEN
      PERFORM fluxrate_router.fail('55000', pg_catalog.format('shard %s holds rows of organization %s already', to_shard, org),
        'A move that failed half-way cleans up after itself; remove them by hand (fluxrate_router.organization_rows shows them).');
    END IF;
    FOR t IN SELECT * FROM fluxrate_router_calls.org_tables(v_from) s WHERE NOT s.derived ORDER BY s.depth, s.tbl LOOP
      v_n := fluxrate_router_calls.org_import(to_shard, t.tbl, org, fluxrate_router_calls.org_export(v_from, t.tbl, org));
      v_copied := v_copied || pg_catalog.jsonb_build_object(t.tbl, v_n);
    END LOOP;
    IF EXISTS (SELECT 1 FROM fluxrate_router.compare_rows(org, v_from, to_shard) c WHERE c.n_a IS DISTINCT FROM c.n_b) THEN
      SELECT pg_catalog.string_agg(pg_catalog.format('%s %s/%s', c.tbl, c.n_a, c.n_b), ', ') INTO v_error
        FROM fluxrate_router.compare_rows(org, v_from, to_shard) c WHERE c.n_a IS DISTINCT FROM c.n_b;
      PERFORM fluxrate_router.fail('55000', 'the copy does not match the original', v_error);
    END IF;
    SELECT * INTO v_inv_from FROM fluxrate_router_calls.org_invoices(v_from, org);
    SELECT * INTO v_inv_to FROM fluxrate_router_calls.org_invoices(to_shard, org);
    IF v_inv_from IS DISTINCT FROM v_inv_to THEN
      PERFORM fluxrate_router.fail('55000', 'the copied invoices do not match the original',
        pg_catalog.format('%s invoices, total %s on shard %s; %s, total %s on shard %s',
          v_inv_from.invoices, v_inv_from.total, v_from, v_inv_to.invoices, v_inv_to.total, to_shard));
    END IF;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
    v_error := v_error || CASE WHEN coalesce(v_detail, '') OPERATOR(pg_catalog.=) '' THEN '' ELSE ': ' || v_detail END;
  END;
  IF v_error IS NOT NULL THEN
    -- undo: the target's partial copy goes, the organization stays where it was
    FOR t IN SELECT * FROM fluxrate_router_calls.org_tables(to_shard) s ORDER BY s.depth DESC, s.tbl LOOP
      PERFORM fluxrate_router_calls.org_delete(to_shard, t.tbl, org);
    END LOOP;
    UPDATE fluxrate_router.organizations x SET paused = v_was_paused WHERE x.org_id OPERATOR(pg_catalog.=) org;
    COMMIT;
    PERFORM fluxrate_router.fail('55000', 'organization not moved', v_error,
      pg_catalog.format('Organization %s stays on shard %s; its calls are resumed.', org, v_from));
  END IF;

  UPDATE fluxrate_router.organizations x SET shard = to_shard, paused = v_was_paused, moved_at = pg_catalog.now()
   WHERE x.org_id OPERATOR(pg_catalog.=) org;
  COMMIT;

  -- the old copy, children first; the rollups too (derived, never copied)
  FOR t IN SELECT * FROM fluxrate_router_calls.org_tables(v_from) s ORDER BY s.depth DESC, s.tbl LOOP
    PERFORM fluxrate_router_calls.org_delete(v_from, t.tbl, org);
  END LOOP;
  IF EXISTS (SELECT 1 FROM fluxrate_router_calls.org_rows(v_from, org) r WHERE r.n OPERATOR(pg_catalog.>) 0) THEN
    PERFORM fluxrate_router.fail('55000', pg_catalog.format('rows of organization %s remain on shard %s', org, v_from),
      'The organization is served by its new shard; delete the remains by hand.');
  END IF;
  report := pg_catalog.jsonb_build_object('org_id', org, 'from', v_from, 'to', to_shard, 'rows', v_copied,
    'invoices', v_inv_to.invoices, 'invoice_total', v_inv_to.total);
END
$$;

-- Nothing here is for PUBLIC: the public API is schema fluxrate (granted by
-- sync_api() as on the shards), the rest is the operator's (superuser).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA fluxrate_router FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA fluxrate FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA fluxrate_router_calls FROM PUBLIC;
REVOKE ALL ON PROCEDURE fluxrate_router.move_organization(uuid, integer, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxrate.signup(text, text, text), fluxrate.login(text, text), fluxrate.refresh(text),
  fluxrate.pre_request() TO fluxrate_anon, fluxrate_web, fluxrate_apikey, fluxrate_app;
REVOKE ALL ON FUNCTION fluxrate.create_organization(text, text, text, integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxrate.create_organization(text, text, text, integer, interval) TO fluxrate_app;
-- the pre-request's helper (verifies a key or a cookie on its shard), for the
-- roles PostgREST runs it as
GRANT USAGE ON SCHEMA fluxrate_router TO fluxrate_anon, fluxrate_web, fluxrate_apikey, fluxrate_app;
GRANT EXECUTE ON FUNCTION fluxrate_router.credential_claims(text, text) TO fluxrate_anon, fluxrate_web, fluxrate_apikey, fluxrate_app;
