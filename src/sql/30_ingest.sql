-- 30_ingest.sql: API keys and usage ingestion.

-- Server-wide secrets (no org_id: only fluxrate_system reads them; RLS is forced
-- with no policy for fluxrate_owner).  The API-key pepper is generated here, at
-- CREATE EXTENSION time, and never leaves the database.
--
-- Backups: pg_dump includes every fluxrate table (99_security.sql marks them
-- with pg_extension_config_dump), secrets too, or a restored database could not
-- verify its API keys or open its sealed secrets.  On restore, CREATE EXTENSION
-- first generates fresh secrets, then the dump's rows are loaded beside them;
-- the oldest secret of each name is the one used, so the restored ones win.
CREATE TABLE fluxrate_internal.server_secrets (
  name        text NOT NULL,
  secret      bytea NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  PRIMARY KEY (name, created_at)
);

CREATE FUNCTION fluxrate_internal.random_bytes(n integer) RETURNS bytea
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_random_bytes';

-- api_key_pepper keys the API-key hash; sealing_key encrypts the secrets that
-- must be used again later (SMTP passwords, webhook signing secrets: 70_delivery)
INSERT INTO fluxrate_internal.server_secrets (name, secret)
VALUES ('api_key_pepper', fluxrate_internal.random_bytes(32)),
       ('sealing_key', fluxrate_internal.random_bytes(32));

CREATE FUNCTION fluxrate_internal.new_api_key(OUT key text, OUT prefix text, OUT key_hash bytea)
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_new_api_key';

CREATE FUNCTION fluxrate_internal.sys_verify_api_key(key text, OUT org_id uuid, OUT key_id uuid, OUT scopes text[])
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_verify_api_key';
COMMENT ON FUNCTION fluxrate_internal.sys_verify_api_key(text) IS
  'verifies an API key (keyed hash, constant-time compare); PT401 when unknown or revoked';

CREATE FUNCTION fluxrate_internal.api_key_json(k fluxrate_internal.api_keys) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', k.id, 'name', k.name, 'prefix', k.prefix, 'scopes', pg_catalog.to_jsonb(k.scopes),
    'status', k.status, 'created_at', k.created_at, 'revoked_at', k.revoked_at, 'last_used_at', k.last_used_at)
$$;

CREATE FUNCTION fluxrate.create_api_key(name text DEFAULT NULL, scopes text[] DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_bad text;
  g record;
  k fluxrate_internal.api_keys;
BEGIN
  PERFORM fluxrate_internal.required(create_api_key.name, 'name');
  IF create_api_key.scopes IS NULL OR cardinality(create_api_key.scopes) = 0 THEN
    PERFORM fluxrate_internal.fail('22004', 'scopes is required', NULL, 'Send at least one scope, e.g. ["usage.write"].');
  END IF;
  SELECT s INTO v_bad FROM unnest(create_api_key.scopes) s
   WHERE s IS NULL OR s NOT IN ('usage.write', 'usage.read', 'catalog.read', 'catalog.write', 'customers.read',
                                'customers.write', 'invoices.read', 'invoices.write', 'admin') LIMIT 1;
  IF FOUND THEN
    PERFORM fluxrate_internal.fail('22023', format('invalid scope: %s', coalesce(v_bad, 'null')),
      'Scopes are usage.write, usage.read, catalog.read, catalog.write, customers.read, customers.write, invoices.read, invoices.write, admin.');
  END IF;
  SELECT * INTO g FROM fluxrate_internal.new_api_key();
  INSERT INTO fluxrate_internal.api_keys (org_id, name, prefix, key_hash, scopes, created_at)
  VALUES (v_org, create_api_key.name, g.prefix, g.key_hash,
          ARRAY(SELECT DISTINCT s FROM unnest(create_api_key.scopes) s ORDER BY s), fluxrate.now())
  RETURNING * INTO k;
  PERFORM set_config('response.status', '201', true);
  -- the secret is in this response and nowhere else
  RETURN fluxrate_internal.api_key_json(k) || jsonb_build_object('key', g.key);
END
$$;

CREATE FUNCTION fluxrate.list_api_keys(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.api_key_json(k) ORDER BY k.created_at, k.id) FROM
       (SELECT * FROM fluxrate_internal.api_keys x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) k),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.api_keys x WHERE x.org_id = v_org));
END
$$;

-- DELETE /api-keys/{id}: revoked at once; later use is 401.
CREATE FUNCTION fluxrate.revoke_api_key(key_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  k fluxrate_internal.api_keys;
BEGIN
  UPDATE fluxrate_internal.api_keys x SET status = 'REVOKED', revoked_at = coalesce(x.revoked_at, fluxrate.now())
   WHERE x.org_id = v_org AND x.id = revoke_api_key.key_id
  RETURNING * INTO k;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'api key not found', format('No API key %s in this organization.', key_id));
  END IF;
  RETURN fluxrate_internal.api_key_json(k);
END
$$;

-- Usage ingestion (src/ingest_*.c) -----------------------------------------

CREATE FUNCTION fluxrate.track(meter_token text DEFAULT NULL, customer_external_id text DEFAULT NULL,
    quantity numeric DEFAULT NULL, "timestamp" timestamptz DEFAULT NULL, idempotency_key text DEFAULT NULL,
    metadata jsonb DEFAULT NULL, meter_name text DEFAULT NULL, properties jsonb DEFAULT NULL,
    api_key text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_track';
COMMENT ON FUNCTION fluxrate.track(text, text, numeric, timestamptz, text, jsonb, text, jsonb, text) IS
  'records one usage event, idempotently, in the caller''s transaction (POST /sdk/track)';

-- fluxrate.track caches the rows of api_keys, meters and customers it reads
-- per backend (src/ingest_cache.c, "Row caches"; docs/ingestion.md).  Any UPDATE,
-- DELETE or TRUNCATE of those tables queues an invalidation that reaches every
-- backend when it commits; INSERTs need none (misses are never cached).
-- ENABLE ALWAYS: the caches must also hear of rows changed by a logical
-- replication apply worker (session_replication_role = replica).
CREATE FUNCTION fluxrate_internal.ingest_cache_invalidate() RETURNS trigger
  LANGUAGE C
  AS 'MODULE_PATHNAME', 'fr_ingest_cache_invalidate';
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.api_keys
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.meters
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.customers
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
ALTER TABLE fluxrate_internal.api_keys ENABLE ALWAYS TRIGGER ingest_cache_invalidate;
ALTER TABLE fluxrate_internal.meters ENABLE ALWAYS TRIGGER ingest_cache_invalidate;
ALTER TABLE fluxrate_internal.customers ENABLE ALWAYS TRIGGER ingest_cache_invalidate;

-- The deletion locks (src/ingest_lock.c, docs/security.md "Deletion"): every
-- track holds one of 16 buckets of its organization in SHARE mode, by a hash
-- of the customer's external id, from before it reads the customer until its
-- transaction ends; a deletion takes its customer's bucket (or all 16 of the
-- organization) EXCLUSIVE before it deletes, so it waits for the open tracks and
-- a track that comes later sees it committed.
CREATE FUNCTION fluxrate_internal.lock_customer_events(org_id uuid, external_id text) RETURNS void
  LANGUAGE C STRICT VOLATILE
  AS 'MODULE_PATHNAME', 'fr_lock_customer_events';
COMMENT ON FUNCTION fluxrate_internal.lock_customer_events(uuid, text) IS
  'delete_customer: wait for the open tracks of this customer''s lock bucket and hold them off until commit';
CREATE FUNCTION fluxrate_internal.lock_org_events(org_id uuid) RETURNS void
  LANGUAGE C STRICT VOLATILE
  AS 'MODULE_PATHNAME', 'fr_lock_org_events';
COMMENT ON FUNCTION fluxrate_internal.lock_org_events(uuid) IS
  'delete_organization: wait for every open track of the organization and hold them off until commit';

CREATE FUNCTION fluxrate.track_batch(events jsonb, api_key text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE C VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS 'MODULE_PATHNAME', 'fr_track_batch';
COMMENT ON FUNCTION fluxrate.track_batch(jsonb, text) IS
  'records up to 1000 usage events; one result per event (created, replay or error); a bad event loses none of the others';

CREATE FUNCTION fluxrate_internal.event_json(e fluxrate_internal.usage_events) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', e.id, 'customer_id', e.customer_id, 'meter_id', e.meter_id,
    'quantity', e.quantity::text, 'timestamp', e."timestamp", 'ingested_at', e.ingested_at,
    'idempotency_key', e.idempotency_key, 'meta_data', coalesce(e.metadata, '{}'::jsonb))
$$;

CREATE FUNCTION fluxrate.list_meter_events(meter_id uuid, page integer DEFAULT 1, page_size integer DEFAULT 20)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  PERFORM 1 FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = list_meter_events.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.event_json(e) ORDER BY e."timestamp" DESC, e.id DESC) FROM
       (SELECT * FROM fluxrate_internal.usage_events x WHERE x.org_id = v_org AND x.meter_id = list_meter_events.meter_id
        ORDER BY x."timestamp" DESC, x.id DESC LIMIT page_size OFFSET (page - 1) * page_size) e),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.usage_events x WHERE x.org_id = v_org AND x.meter_id = list_meter_events.meter_id))
    -- months whose raw events retention archived (33_retention.sql): not listed, said
    || CASE WHEN EXISTS (SELECT 1 FROM fluxrate_internal.archived_events a WHERE a.org_id = v_org)
            THEN jsonb_build_object('archived', fluxrate_internal.retention_json(v_org)->'archived') ELSE '{}'::jsonb END;
END
$$;
