-- 32_partitions.sql: where usage events are stored (docs/ingestion.md,
-- "Storage layout").
--
--   usage_events              partitioned by RANGE ("timestamp"): one partition
--                             per UTC calendar month, usage_events_yYYYYmMM,
--                             made ahead by the minute job
--                             (maintain_event_partitions), never by the install
--                             script: they are not extension members, so pg_dump
--                             dumps them (definition and rows) like user tables
--   usage_events_default      the DEFAULT partition: an event whose month has no
--                             partition (yet, or any more: an archived month)
--   usage_event_keys          idempotency, exact and forever: (org_id,
--                             idempotency_key) -> the event, HASH-partitioned by
--                             organization (8 partitions), written in the same
--                             statement as the event
--
-- Our own job, not pg_partman: the minute job already runs under pg_cron, the
-- rule is one function of a screen (months ahead, the default drained month by
-- month), and partman would be a second extension every installation and
-- every upgrade depends on, with its own configuration table and its own
-- idea of retention (by age, for all rows of a partition), which is not ours
-- (by each organization's finalized periods: 33_retention.sql).

CREATE TABLE fluxrate_internal.usage_events_default PARTITION OF fluxrate_internal.usage_events DEFAULT;
-- which months the default holds, without reading it all (maintain_event_partitions)
CREATE INDEX usage_events_default_time_idx ON fluxrate_internal.usage_events_default ("timestamp");

-- The idempotency keys.  A unique index of usage_events would have to hold
-- "timestamp" (the partition key), and a key must be unique whatever the
-- event's time, so the key has its own table, where it can be unique.  The
-- ingest paths insert the key and the event in one statement (a CTE: the key
-- first, ON CONFLICT DO NOTHING; the event only if the key went in), so they
-- exist together or not at all, and two concurrent sends of one key queue on
-- this primary key exactly as they queued on the unique index before.  The key
-- outlives the event: retention archives events, never keys, so a replay after
-- archival is still a replay (of the stored id and time).
CREATE TABLE fluxrate_internal.usage_event_keys (
  org_id           uuid NOT NULL,
  idempotency_key  text NOT NULL,
  event_id         uuid NOT NULL,
  "timestamp"      timestamptz NOT NULL,       -- the event's partition (and its time, for a replay)
  payload_hash     bytea,                      -- NULL: never a replay (a row written without a hash)
  PRIMARY KEY (org_id, idempotency_key)
) PARTITION BY HASH (org_id);
CREATE TABLE fluxrate_internal.usage_event_keys_h0 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE fluxrate_internal.usage_event_keys_h1 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE fluxrate_internal.usage_event_keys_h2 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE fluxrate_internal.usage_event_keys_h3 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE fluxrate_internal.usage_event_keys_h4 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE fluxrate_internal.usage_event_keys_h5 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE fluxrate_internal.usage_event_keys_h6 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE fluxrate_internal.usage_event_keys_h7 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 7);

-- The UTC month holding ts, and its partition's name.
CREATE FUNCTION fluxrate_internal.event_month(ts timestamptz) RETURNS timestamptz
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT date_trunc('month', ts, 'UTC') $$;
CREATE FUNCTION fluxrate_internal.event_partition_name(month timestamptz) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT 'usage_events_' || to_char(date_trunc('month', month, 'UTC') AT TIME ZONE 'UTC', '"y"YYYY"m"MM') $$;

-- The months the default partition holds events of, oldest first (at most
-- lim): read by fluxrate_system, as row-level security hides every row of it
-- from the owner outside an organization.
CREATE FUNCTION fluxrate_internal.sys_default_event_months(lim integer) RETURNS SETOF timestamptz
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_from timestamptz := '-infinity'::timestamptz;
  v_ts timestamptz;
BEGIN
  -- a loose index scan of the time index: one probe per month
  FOR i IN 1 .. lim LOOP
    SELECT min(d."timestamp") INTO v_ts FROM fluxrate_internal.usage_events_default d WHERE d."timestamp" >= v_from;
    EXIT WHEN v_ts IS NULL;
    RETURN NEXT fluxrate_internal.event_month(v_ts);
    v_from := (fluxrate_internal.event_month(v_ts) AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
  END LOOP;
END
$$;

-- Move the default partition's events of [lo, hi) into target (a table about
-- to be attached for that range), as fluxrate_system (no row-level security):
-- a DELETE ... RETURNING into an INSERT, one statement.
CREATE FUNCTION fluxrate_internal.sys_move_default_events(target regclass, lo timestamptz, hi timestamptz) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n bigint;
BEGIN
  EXECUTE format('WITH m AS (DELETE FROM fluxrate_internal.usage_events_default d
                              WHERE d."timestamp" >= $1 AND d."timestamp" < $2 RETURNING d.*)
                  INSERT INTO %s SELECT * FROM m', target) USING lo, hi;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- The partition of the UTC month holding month, made if missing.  NULL if it
-- existed; else what was made: {partition, from, to, moved}.
--
-- Made as a table of its own, then ATTACHed (a SHARE UPDATE EXCLUSIVE lock on
-- usage_events: ingestion and readers go on; CREATE TABLE ... PARTITION OF
-- would take ACCESS EXCLUSIVE).  The CHECK constraint equal to the bound
-- spares ATTACH a scan of the new table.  When the default partition holds
-- events of that month (a month with no partition when they came: history
-- sent before the partition was made, or a late event for an archived month)
-- they are moved into the new table first, in the same transaction: ATTACH
-- refuses a range the default partition still has rows of.  The default is
-- locked (SHARE ROW EXCLUSIVE) before it is read, so no event can reach it in
-- that range between the move and the attach.
CREATE FUNCTION fluxrate_internal.make_event_partition(month timestamptz) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_lo timestamptz := fluxrate_internal.event_month(month);
  v_hi timestamptz := (fluxrate_internal.event_month(month) AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
  v_name text := fluxrate_internal.event_partition_name(month);
  v_rel regclass;
  v_moved bigint := 0;
BEGIN
  IF to_regclass('fluxrate_internal.' || v_name) IS NOT NULL THEN
    RETURN NULL;
  END IF;
  LOCK TABLE fluxrate_internal.usage_events_default IN SHARE ROW EXCLUSIVE MODE;
  EXECUTE format('CREATE TABLE fluxrate_internal.%I (LIKE fluxrate_internal.usage_events INCLUDING DEFAULTS)', v_name);
  v_rel := ('fluxrate_internal.' || v_name)::regclass;
  EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK ("timestamp" >= %L AND "timestamp" < %L)',
                 v_rel, v_name || '_bound', v_lo, v_hi);
  -- the tenant wall of every table (99_security.sql), for direct reads of the partition
  EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', v_rel);
  EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', v_rel);
  EXECUTE format('CREATE POLICY tenant_wall ON %s FOR ALL TO fluxrate_owner '
                 'USING (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id()) '
                 'WITH CHECK (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id())', v_rel);
  EXECUTE format('GRANT ALL ON TABLE %s TO fluxrate_system', v_rel);
  v_moved := fluxrate_internal.sys_move_default_events(v_rel, v_lo, v_hi);
  EXECUTE format('ALTER TABLE fluxrate_internal.usage_events ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)', v_rel, v_lo, v_hi);
  EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_rel, v_name || '_bound');
  RETURN jsonb_build_object('partition', v_name, 'from', v_lo, 'to', v_hi, 'moved', v_moved);
END
$$;
COMMENT ON FUNCTION fluxrate_internal.make_event_partition(timestamptz) IS
  'makes the usage_events partition of the UTC month holding month (moving the default partition''s events of that month into it); NULL if it exists';

-- How many months the minute job keeps made ahead of the current one.
CREATE FUNCTION fluxrate_internal.event_partitions_ahead() RETURNS integer
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$ SELECT 2 $$;

-- The minute job's partition work: the partitions of this month and the next
-- event_partitions_ahead() months, then the default partition drained of the
-- months it holds (at most drain of them per run, oldest first: each is a move
-- of rows).  Skips (and says so) when it would wait for a lock: the job comes
-- back in a minute, and ingestion must never queue behind it.
CREATE FUNCTION fluxrate_internal.maintain_event_partitions(drain integer DEFAULT 3) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  SET lock_timeout = '2s'
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_made jsonb := '[]'::jsonb;
  v_r jsonb;
  v_month timestamptz;
BEGIN
  FOR i IN 0 .. fluxrate_internal.event_partitions_ahead() LOOP
    v_r := fluxrate_internal.make_event_partition((fluxrate_internal.event_month(v_now) AT TIME ZONE 'UTC' + make_interval(months => i)) AT TIME ZONE 'UTC');
    IF v_r IS NOT NULL THEN
      v_made := v_made || v_r;
    END IF;
  END LOOP;
  FOR v_month IN SELECT m FROM fluxrate_internal.sys_default_event_months(drain) m LOOP
    v_r := fluxrate_internal.make_event_partition(v_month);
    IF v_r IS NOT NULL THEN
      v_made := v_made || v_r;
    END IF;
  END LOOP;
  RETURN jsonb_build_object('made', v_made, 'skipped', false);
EXCEPTION WHEN lock_not_available THEN
  RETURN jsonb_build_object('made', '[]'::jsonb, 'skipped', true, 'reason', 'a lock on usage_events was not free within 2 s');
END
$$;

-- The minute job (fluxrate-event-storage, 58_jobs.sql): partitions, then
-- retention (33_retention.sql).
CREATE FUNCTION fluxrate.maintain_event_storage() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r jsonb := fluxrate_internal.maintain_event_partitions();
  a jsonb := fluxrate_internal.maintain_event_retention();
BEGIN
  IF jsonb_array_length(r->'made') > 0 OR jsonb_array_length(a->'archived') > 0 THEN
    PERFORM fluxrate_internal.job_log('maintain_event_storage',
      format('made %s event partitions, archived %s', jsonb_array_length(r->'made'), jsonb_array_length(a->'archived')));
  END IF;
  RETURN jsonb_build_object('partitions', r, 'retention', a);
END
$$;
COMMENT ON FUNCTION fluxrate.maintain_event_storage() IS
  'the minute job of event storage: makes the usage_events partitions of this month and the next two, moves the default partition''s months into their own, archives the months retention allows';
