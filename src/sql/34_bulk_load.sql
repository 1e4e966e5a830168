-- 34_bulk_load.sql: backfilling history fast (docs/ingestion.md, "Bulk load").
--
--   COPY the events into a staging table of your own (any table with the
--   columns of fluxrate.event_load_row it has: CREATE TEMP TABLE s OF
--   fluxrate.event_load_row, or (LIKE ...) of it, plus an optional line
--   bigint), GRANT SELECT ON it TO fluxrate_owner, then
--   SELECT fluxrate.load_events('s') in the organization's context.
--
-- The same rules as fluxrate.track_batch, set-based: one statement validates
-- every row (ingest_event.c's checks, with its SQLSTATEs and messages), creates
-- the unknown customers of the valid rows, inserts the idempotency keys and the
-- events (INSERT ... SELECT, the key first, the event only if its key went in,
-- as track does) and counts what happened.  A refused row writes nothing (no
-- customer either); a valid row is written whatever the others are.  The
-- payload hash is the C one (event_payload_hash), so a key loaded in bulk
-- replays through track and the other way round.

-- The columns a staging table may have (all optional but the ones an event
-- needs): as fluxrate.track's arguments, in the same types.
CREATE TYPE fluxrate.event_load_row AS (
  line                  bigint,        -- where the row came from (a file's line); row order if absent
  meter_token           text,
  meter_name            text,
  customer_external_id  text,
  quantity              numeric,
  "timestamp"           timestamptz,   -- NULL: the load's time (fluxrate.now())
  idempotency_key       text,
  metadata              jsonb,
  properties            jsonb
);
COMMENT ON TYPE fluxrate.event_load_row IS
  'the columns of a staging table for fluxrate.load_events (CREATE TEMP TABLE s OF fluxrate.event_load_row)';

CREATE FUNCTION fluxrate_internal.event_payload_hash(meter_id uuid, customer_id uuid, quantity numeric,
    ts timestamptz, ts_sent boolean, metadata jsonb) RETURNS bytea
  LANGUAGE C IMMUTABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_event_payload_hash';
COMMENT ON FUNCTION fluxrate_internal.event_payload_hash(uuid, uuid, numeric, timestamptz, boolean, jsonb) IS
  'the payload hash track and track_batch store with an idempotency key (src/ingest_event.c, FrPayloadHash)';

-- The quantity a row means: its own, or properties[property_name] (a JSON
-- number or a numeric string), or 1 for COUNT and UNIQUE_COUNT.  NULL when
-- there is none to take (load_refusal says why).
CREATE FUNCTION fluxrate_internal.load_quantity(quantity numeric, properties jsonb, property_name text, agg text)
  RETURNS numeric
  LANGUAGE sql STABLE
  AS $$
  SELECT CASE
    WHEN quantity IS NOT NULL THEN quantity
    WHEN agg IN ('COUNT', 'UNIQUE_COUNT') THEN 1
    WHEN jsonb_typeof(properties -> property_name) = 'number' THEN (properties ->> property_name)::numeric
    WHEN jsonb_typeof(properties -> property_name) = 'string'
         AND (properties ->> property_name) ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$'
      THEN (properties ->> property_name)::numeric
  END
$$;

-- Why a row is refused, as 'SQLSTATE message', or NULL: the checks of
-- FrCheckInputShape, FrPrepareEvent and FrCheckQuantity (src/ingest_event.c),
-- in their order, with their codes and messages.  STABLE, no SET: inlined
-- into the load's statement (a function call per row cost 0.1 ms).
CREATE FUNCTION fluxrate_internal.load_refusal(r fluxrate.event_load_row, meter_found boolean, agg text,
    property_name text, unique_property text, q numeric, meta jsonb, now timestamptz)
  RETURNS text
  LANGUAGE sql STABLE
  AS $$
  SELECT CASE
    WHEN r.meter_token IS NULL AND r.meter_name IS NULL THEN '22004 meter_token is required'
    WHEN r.customer_external_id IS NULL OR btrim(r.customer_external_id, E' \t\n\r\f\v') = '' THEN '22004 customer_external_id is required'
    WHEN length(r.customer_external_id) > 255 THEN '22023 customer_external_id is longer than 255 characters'
    WHEN r.idempotency_key IS NOT NULL AND (r.idempotency_key = '' OR length(r.idempotency_key) > 255)
      THEN '22023 idempotency_key must be 1 to 255 characters'
    WHEN r.metadata IS NOT NULL AND jsonb_typeof(r.metadata) <> 'object' THEN '22023 metadata must be a JSON object'
    WHEN r.metadata IS NOT NULL AND pg_column_size(r.metadata || '{}') > 16384 THEN 'PT422 metadata is larger than 16 KiB'
    WHEN r.properties IS NOT NULL AND jsonb_typeof(r.properties) <> 'object' THEN '22023 properties must be a JSON object'
    WHEN r.properties IS NOT NULL AND pg_column_size(r.properties || '{}') > 16384 THEN 'PT422 properties is larger than 16 KiB'
    WHEN NOT meter_found THEN 'PT404 meter not found'
    WHEN q IS NULL AND r.properties IS NOT NULL AND r.properties -> property_name IS NOT NULL
         AND jsonb_typeof(r.properties -> property_name) <> 'null'
      THEN format('22P02 properties.%s is not a number', property_name)
    WHEN q IS NULL AND r.properties IS NOT NULL THEN format('22004 properties.%s is required', property_name)
    WHEN q IS NULL THEN '22004 quantity is required'
    WHEN q = 'NaN' OR q IN ('Infinity', '-Infinity') THEN 'PT422 quantity must be a finite number'
    WHEN abs(q) >= 1e18 THEN '22003 quantity is out of range'
    WHEN agg IN ('SUM', 'COUNT') AND q <= 0 THEN 'PT422 quantity must be greater than zero'
    WHEN q < 0 THEN 'PT422 quantity must be zero or more'
    WHEN scale(q) > 12 THEN 'PT422 quantity has more than 12 decimal places'
    WHEN meta IS NOT NULL AND pg_column_size(meta || '{}') > 16384 THEN 'PT422 metadata is larger than 16 KiB'
    WHEN agg = 'UNIQUE_COUNT' AND (meta -> unique_property IS NULL OR jsonb_typeof(meta -> unique_property) = 'null')
      THEN format('22004 metadata.%s is required for this UNIQUE_COUNT meter', unique_property)
    WHEN r."timestamp" < '2000-01-01 00:00:00+00' THEN 'PT422 timestamp is before 2000-01-01'
    WHEN r."timestamp" > now + interval '5 minutes' THEN 'PT422 timestamp is more than 5 minutes in the future'
  END
$$;

-- The staging table's columns as a select list of event_load_row's columns
-- (NULL for the ones it lacks; line = row order when it has none).  42P01 /
-- 42501 / 22023 for a table that is not there, not readable, or has nothing
-- of an event.
CREATE FUNCTION fluxrate_internal.load_select(staging regclass) RETURNS text
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_cols text := '';
  a record;
BEGIN
  IF NOT has_table_privilege(staging, 'SELECT') THEN
    PERFORM fluxrate_internal.fail('42501', format('fluxrate cannot read the staging table %s', staging),
      'load_events reads the staging table as fluxrate_owner.', format('GRANT SELECT ON %s TO fluxrate_owner;', staging));
  END IF;
  FOR a IN
    SELECT t.attname, format_type(t.atttypid, t.atttypmod) AS typ,
           EXISTS (SELECT 1 FROM pg_attribute s WHERE s.attrelid = staging AND s.attname = t.attname
                     AND s.attnum > 0 AND NOT s.attisdropped) AS present
      FROM pg_attribute t
     WHERE t.attrelid = 'fluxrate.event_load_row'::regclass AND t.attnum > 0 AND NOT t.attisdropped
     ORDER BY t.attnum
  LOOP
    v_cols := v_cols || CASE WHEN v_cols = '' THEN '' ELSE ', ' END
      || CASE WHEN a.present THEN format('s.%I::%s', a.attname, a.typ)
              WHEN a.attname = 'line' THEN 'row_number() OVER ()'
              ELSE format('NULL::%s', a.typ) END;
  END LOOP;
  IF NOT EXISTS (SELECT 1 FROM pg_attribute s WHERE s.attrelid = staging AND s.attname = 'customer_external_id' AND NOT s.attisdropped) THEN
    PERFORM fluxrate_internal.fail('22023', format('staging table %s has no customer_external_id column', staging),
      'Its columns are those of fluxrate.event_load_row.', 'CREATE TEMP TABLE staging OF fluxrate.event_load_row;');
  END IF;
  RETURN format('SELECT ROW(%s)::fluxrate.event_load_row AS r FROM %s s', v_cols, staging);
END
$$;

-- fluxrate.load_events(staging): every row of the staging table, as one
-- track_batch without a size limit.  Returns
--   {"rows": n, "created": n, "replayed": n, "refused": n,
--    "refusals": [{"line": n, "code": "PT404", "message": "meter not found"}, ...]}
-- (refusals in line order; replays and conflicts judged as track judges them:
-- the key's stored payload hash, or the first row of the load with that key).
CREATE FUNCTION fluxrate.load_events(staging regclass) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  -- the CTEs' row estimates are guesses (a few dozen rows for millions): a
  -- nested loop over the customers was 6 s of a 10 s load of 20,000 rows
  SET enable_nestloop = off
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.write');
  v_now timestamptz := fluxrate.now();
  v_res jsonb;
  v_month timestamptz;
BEGIN
  PERFORM fluxrate_internal.required(staging, 'staging');
  -- History goes to its own months' partitions, not to the default one: the
  -- partitions of the months the rows name are made first (32_partitions.sql).
  IF EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = staging AND a.attname = 'timestamp' AND NOT a.attisdropped) THEN
    FOR v_month IN EXECUTE format('SELECT DISTINCT fluxrate_internal.event_month(s."timestamp"::timestamptz) FROM %s s
                                    WHERE s."timestamp"::timestamptz >= %L AND s."timestamp"::timestamptz <= %L',
                                  staging, '2000-01-01 00:00:00+00'::timestamptz, v_now + interval '5 minutes') LOOP
      PERFORM fluxrate_internal.make_event_partition(v_month);
    END LOOP;
  END IF;
  EXECUTE format($q$
    WITH src AS MATERIALIZED (%s),
    v0 AS MATERIALIZED (
      SELECT (src.r).line AS line, src.r, m.id AS meter_id,
             fluxrate_internal.load_quantity((src.r).quantity, (src.r).properties, m.property_name, m.aggregation_type) AS q,
             CASE WHEN (src.r).properties IS NOT NULL AND (src.r).metadata IS NOT NULL THEN (src.r).properties || (src.r).metadata
                  ELSE coalesce((src.r).properties, (src.r).metadata) END AS meta,
             m.aggregation_type AS agg, m.property_name, m.unique_property_name
        FROM src
        -- a token wins over a name, as in track (two hash joins, not an OR)
        LEFT JOIN fluxrate_internal.meters mt ON mt.org_id = $1 AND mt.meter_token::text = lower((src.r).meter_token)
        LEFT JOIN fluxrate_internal.meters mn ON mn.org_id = $1 AND mn.meter_name = (src.r).meter_name
                                             AND (src.r).meter_token IS NULL
        CROSS JOIN LATERAL (SELECT coalesce(mt.id, mn.id) AS id, coalesce(mt.property_name, mn.property_name) AS property_name,
                                   coalesce(mt.aggregation_type, mn.aggregation_type) AS aggregation_type,
                                   coalesce(mt.unique_property, mn.unique_property) AS unique_property_name) m
    ),
    v1 AS MATERIALIZED (
      SELECT v0.*, fluxrate_internal.load_refusal(v0.r, v0.meter_id IS NOT NULL, v0.agg, v0.property_name,
                                                  v0.unique_property_name, v0.q, v0.meta, $2) AS refusal
        FROM v0
    ),
    cust_new AS (
      INSERT INTO fluxrate_internal.customers AS c (org_id, name, external_id, created_at, updated_at)
      SELECT DISTINCT $1, (v1.r).customer_external_id, (v1.r).customer_external_id, $2, $2
        FROM v1 WHERE v1.refusal IS NULL
         AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.customers x WHERE x.org_id = $1 AND x.external_id = (v1.r).customer_external_id)
      ON CONFLICT (org_id, external_id) DO NOTHING
      RETURNING c.external_id, c.id
    ),
    v AS MATERIALIZED (
      SELECT v1.line, v1.meter_id, v1.q, v1.meta, (v1.r).idempotency_key AS k, coalesce((v1.r)."timestamp", $2) AS ts,
             coalesce(x.id, cn.id) AS customer_id, fluxrate_internal.uuid_v7() AS id,
             fluxrate_internal.event_payload_hash(v1.meter_id, coalesce(x.id, cn.id), v1.q, (v1.r)."timestamp",
                                                  (v1.r)."timestamp" IS NOT NULL, v1.meta) AS h
        FROM v1
        LEFT JOIN fluxrate_internal.customers x ON x.org_id = $1 AND x.external_id = (v1.r).customer_external_id
        LEFT JOIN cust_new cn ON cn.external_id = (v1.r).customer_external_id
       WHERE v1.refusal IS NULL
    ),
    -- the stored payload of each key: a key stored before the load, else the
    -- load's first row of that key
    judged AS MATERIALIZED (
      SELECT v.*, ek.payload_hash AS stored_hash, ek.idempotency_key IS NOT NULL AS stored,
             v.k IS NOT NULL AND row_number() OVER (PARTITION BY v.k ORDER BY v.line, v.id) > 1 AS later,
             first_value(v.h) OVER (PARTITION BY v.k ORDER BY v.line, v.id) AS first_hash
        FROM v LEFT JOIN fluxrate_internal.usage_event_keys ek ON ek.org_id = $1 AND ek.idempotency_key = v.k
    ),
    ins_keys AS (
      INSERT INTO fluxrate_internal.usage_event_keys (org_id, idempotency_key, event_id, "timestamp", payload_hash)
      SELECT $1, j.k, j.id, j.ts, j.h FROM judged j WHERE j.k IS NOT NULL AND NOT j.stored AND NOT j.later
      RETURNING event_id
    ),
    ins AS (
      INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at,
                                                  idempotency_key, payload_hash, metadata)
      SELECT $1, j.id, j.customer_id, j.meter_id, j.q, j.ts, $2, j.k, j.h, j.meta FROM judged j
       WHERE j.customer_id IS NOT NULL AND (j.k IS NULL OR j.id IN (SELECT ik.event_id FROM ins_keys ik))
      RETURNING id
    ),
    outcome AS (
      SELECT j.line,
             CASE WHEN j.id IN (SELECT ins.id FROM ins) THEN 'created'
                  WHEN j.customer_id IS NULL OR (j.k IS NOT NULL AND NOT j.stored AND NOT j.later)
                    THEN '40001 the customer or idempotency key was written by a concurrent call; load the row again'
                  WHEN j.stored AND j.stored_hash IS NOT DISTINCT FROM j.h AND j.stored_hash IS NOT NULL THEN 'replay'
                  WHEN NOT j.stored AND j.later AND j.first_hash = j.h THEN 'replay'
                  ELSE 'PT409 idempotency key already used with a different payload' END AS st
        FROM judged j
      UNION ALL
      SELECT v1.line, v1.refusal FROM v1 WHERE v1.refusal IS NOT NULL
    )
    SELECT jsonb_build_object('rows', count(*),
             'created', count(*) FILTER (WHERE o.st = 'created'),
             'replayed', count(*) FILTER (WHERE o.st = 'replay'),
             'refused', count(*) FILTER (WHERE o.st NOT IN ('created', 'replay')),
             'refusals', coalesce(jsonb_agg(jsonb_build_object('line', o.line, 'code', split_part(o.st, ' ', 1),
                                                               'message', substr(o.st, 7)) ORDER BY o.line)
                                  FILTER (WHERE o.st NOT IN ('created', 'replay')), '[]'::jsonb))
      FROM outcome o
  $q$, fluxrate_internal.load_select(staging)) INTO v_res USING v_org, v_now;
  RETURN v_res;
END
$$;
COMMENT ON FUNCTION fluxrate.load_events(regclass) IS
  'loads every row of a staging table (columns of fluxrate.event_load_row) as events of the calling organization, with track_batch''s validation and idempotency; returns the counts and the refused rows by line';
