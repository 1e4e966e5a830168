-- 85_shard.sql: what a router (the fluxrate_router extension, docs/scale-out.md)
-- needs from a shard beyond the public API: moving one organization's rows
-- between shards, and giving every shard the same server secrets.  All
-- superuser-only (the router's operator connects as one): they work across
-- organizations and write with session_replication_role = replica.

-- The tables holding an organization's rows, parents before children (depth:
-- the longest foreign-key path from a table without parents), and the
-- columns a copy carries: all but usage_events.xact_id (the id of the
-- inserting transaction means nothing on another server; the target's
-- default fills it with the copying transaction's).  derived: the usage
-- rollups, never copied (the target's refresh counts the copied events).
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_tables(OUT tbl text, OUT cols text, OUT depth integer, OUT derived boolean)
  RETURNS SETOF record
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH RECURSIVE t AS (
    SELECT c.oid FROM pg_catalog.pg_class c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'fluxrate_internal'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                     AND a.attname OPERATOR(pg_catalog.=) 'org_id' AND NOT a.attisdropped)
  ), d(oid, depth) AS (
    SELECT t.oid, 0 FROM t
    UNION ALL
    SELECT f.conrelid, d.depth OPERATOR(pg_catalog.+) 1
      FROM d JOIN pg_catalog.pg_constraint f ON f.contype OPERATOR(pg_catalog.=) 'f' AND f.confrelid OPERATOR(pg_catalog.=) d.oid
     WHERE f.conrelid OPERATOR(pg_catalog.<>) f.confrelid AND d.depth OPERATOR(pg_catalog.<) 20
  )
  SELECT c.relname::text,
         (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
            FROM pg_catalog.pg_attribute a
           WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
             AND a.attgenerated OPERATOR(pg_catalog.=) ''
             AND NOT (c.relname OPERATOR(pg_catalog.=) 'usage_events' AND a.attname OPERATOR(pg_catalog.=) 'xact_id')),
         max(d.depth)::integer,
         c.relname::text LIKE 'usage\_rollup%'
    FROM d JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.oid
   GROUP BY c.oid, c.relname
$$;

CREATE OR REPLACE FUNCTION fluxrate_internal.sys_require_superuser(what text) RETURNS void
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user), false) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('%s is for a superuser', what),
      HINT = 'The router''s operator connects to its shards as a superuser (docs/scale-out.md).';
  END IF;
END
$$;

-- The table named, if it holds organizations' rows; 22023 otherwise.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_table(tbl text) RETURNS record
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM fluxrate_internal.sys_org_tables() t WHERE t.tbl OPERATOR(pg_catalog.=) sys_org_table.tbl;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('invalid table: %s', coalesce(tbl, 'null')),
      DETAIL = 'fluxrate_internal.sys_org_tables() lists the tables that hold organizations'' rows.';
  END IF;
  RETURN r;
END
$$;

-- One organization's rows per table.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_rows(org uuid, OUT tbl text, OUT derived boolean, OUT n bigint)
  RETURNS SETOF record
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  t record;
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_org_rows');
  FOR t IN SELECT * FROM fluxrate_internal.sys_org_tables() x ORDER BY x.depth, x.tbl LOOP
    tbl := t.tbl;
    derived := t.derived;
    EXECUTE pg_catalog.format('SELECT count(*) FROM fluxrate_internal.%I x WHERE x.org_id OPERATOR(pg_catalog.=) $1', t.tbl)
      INTO n USING org;
    RETURN NEXT;
  END LOOP;
END
$$;

-- One table's rows of one organization, as a jsonb array (the copy's unit).
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_export(tbl text, org uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v jsonb;
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_org_export');
  PERFORM fluxrate_internal.sys_org_table(tbl);
  EXECUTE pg_catalog.format('SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(x)), ''[]'') FROM fluxrate_internal.%I x '
                            'WHERE x.org_id OPERATOR(pg_catalog.=) $1', tbl) INTO v USING org;
  RETURN v;
END
$$;

-- Write rows exported elsewhere, as they were: no trigger acts on them (an
-- inserted ACTIVE subscription would open a period again) and the foreign
-- keys are not checked row by row (the rows were consistent where they came
-- from, and are copied parents first), by session_replication_role = replica
-- for this transaction.  Every row must belong to org.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_import(tbl text, org uuid, rows jsonb) RETURNS bigint
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_cols text;
  n bigint;
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_org_import');
  PERFORM fluxrate_internal.sys_org_table(tbl);
  -- the column list as a plain text (plpgsql_check cannot follow a record
  -- returned by a function).  It is made from the catalog by sys_org_tables()
  -- with quote_ident, never from input: sql/lint.sql expects the checker's
  -- "not sanitized" warning on it, by name.
  SELECT x.cols INTO v_cols FROM fluxrate_internal.sys_org_tables() x
   WHERE x.tbl OPERATOR(pg_catalog.=) sys_org_import.tbl;
  IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(rows) e
              WHERE (e OPERATOR(pg_catalog.->>) 'org_id') IS DISTINCT FROM org::text) THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'rows of another organization',
      DETAIL = pg_catalog.format('Every row imported into %s must have org_id %s.', tbl, org);
  END IF;
  PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
  EXECUTE pg_catalog.format('INSERT INTO fluxrate_internal.%1$I (%2$s) SELECT %2$s FROM '
                            'pg_catalog.jsonb_populate_recordset(NULL::fluxrate_internal.%1$I, $1)', tbl, v_cols) USING rows;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Delete one organization's rows from one table (children first is the
-- caller's order).  Triggers that must always run still do (the ingest
-- caches' invalidation is ENABLE ALWAYS: no backend keeps a deleted key).
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_org_delete(tbl text, org uuid) RETURNS bigint
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_org_delete');
  PERFORM fluxrate_internal.sys_org_table(tbl);
  PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
  EXECUTE pg_catalog.format('DELETE FROM fluxrate_internal.%I x WHERE x.org_id OPERATOR(pg_catalog.=) $1', tbl) USING org;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- A digest of the server secrets (API-key pepper, sealing key, JWT secret):
-- the shards of one router must hold the same (sys_put_server_secrets).
-- keyed_rows: what would stop opening under other secrets.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_secrets_digest(OUT digest text, OUT keyed_rows bigint)
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_secrets_digest');
  SELECT pg_catalog.md5(pg_catalog.string_agg(s.name || ':' || s.created_at::text || ':' || pg_catalog.encode(s.secret, 'hex'), ','
                        ORDER BY s.name, s.created_at))
    INTO digest FROM fluxrate_internal.server_secrets s;
  keyed_rows := (SELECT count(*) FROM fluxrate_internal.api_keys) + (SELECT count(*) FROM fluxrate_internal.webhook_endpoints)
              + (SELECT count(*) FROM fluxrate_internal.smtp_settings) + (SELECT count(*) FROM fluxrate_internal.users)
              + (SELECT count(*) FROM fluxrate_internal.refresh_tokens);
END
$$;

CREATE OR REPLACE FUNCTION fluxrate_internal.sys_export_server_secrets() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_export_server_secrets');
  RETURN (SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(s)) FROM fluxrate_internal.server_secrets s);
END
$$;

-- Replace this server's secrets with another shard's.  Refused (55000) once
-- anything here depends on the old ones.  Backends that loaded the old ones
-- keep them until they end: do this on a new shard, before it serves.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_put_server_secrets(secrets jsonb) RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer;
BEGIN
  PERFORM fluxrate_internal.sys_require_superuser('sys_put_server_secrets');
  IF (SELECT d.keyed_rows FROM fluxrate_internal.sys_secrets_digest() d) OPERATOR(pg_catalog.>) 0 THEN
    RAISE EXCEPTION USING ERRCODE = '55000', MESSAGE = 'this server''s secrets are in use',
      DETAIL = 'API keys, webhook endpoints, SMTP settings, users or refresh tokens depend on them.',
      HINT = 'Share the secrets while the shard is new (docs/scale-out.md).';
  END IF;
  DELETE FROM fluxrate_internal.server_secrets;
  INSERT INTO fluxrate_internal.server_secrets (name, secret, created_at)
  SELECT x.name, x.secret, x.created_at FROM pg_catalog.jsonb_populate_recordset(NULL::fluxrate_internal.server_secrets, secrets) x;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;
