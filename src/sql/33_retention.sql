-- 33_retention.sql: how long raw events are kept (docs/rollups.md,
-- "Retention").
--
-- An organization may set a retention: its raw events may leave usage_events
-- keep_days after the period they belong to is finalized.  Events leave by
-- partition, never by DELETE: a month's partition is DETACHed when every
-- organization with events in it allows it, and kept aside as a table of its
-- own (usage_events_yYYYYmMM_archived_<when>) for the operator to export
-- (COPY) and DROP.  Partitions are shared by all organizations, so the rule
-- is the strictest of them: one organization without a retention, or with a
-- period of that month not yet finalized keep_days ago, keeps the month for
-- everyone.  (Per-organization archive tables would need a DELETE per
-- organization: exactly the row-by-row work partitions are for.)
--
-- What stays: the usage rollups (never archived) carry the archived months'
-- usage, so closing, finalization, late usage and live usage keep their
-- answers (meter_usage reads the rollups for an archived month); the keys of
-- usage_event_keys stay (a replay after archival is still a replay);
-- archived_events says, per organization and month, how many events left and
-- when (list_meter_events shows it).

CREATE TABLE fluxrate_internal.event_retention (
  org_id      uuid PRIMARY KEY REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  keep_days   integer NOT NULL CHECK (keep_days >= 0 AND keep_days <= 36500),
  updated_at  timestamptz NOT NULL
);

CREATE TABLE fluxrate_internal.archived_events (
  org_id         uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  month          timestamptz NOT NULL,     -- the UTC month [month, month + 1 month)
  archived_at    timestamptz NOT NULL,
  events         bigint NOT NULL,
  archive_table  text NOT NULL,            -- where the rows went (until the operator drops it)
  PRIMARY KEY (org_id, month, archived_at)
);

-- The organization's archived months that overlap [range_start, range_end):
-- what meter_usage() and meter_group_usage() read from the rollups instead of
-- the events, and what get_meter_usage() says it could not count.  Plain SQL
-- without SET clauses, so that it is inlined into its callers' queries (they
-- pin search_path).
CREATE FUNCTION fluxrate_internal.archived_months(org_id uuid, range_start timestamptz, range_end timestamptz)
  RETURNS SETOF fluxrate_internal.archived_events
  LANGUAGE sql STABLE
  AS $$
  SELECT a.* FROM fluxrate_internal.archived_events a
   WHERE a.org_id = $1 AND a.month < $3 AND (a.month AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC' > $2
$$;

-- The time before which the organization's raw events may leave: NULL
-- without a retention; else the earliest of now - keep_days and, for each
-- subscription, the start of its first invoice not finalized keep_days ago
-- (a draft, or finalized since), or of its current period (an open period is
-- never archived).  A canceled subscription with every invoice finalized long
-- enough holds nothing back.  Opening invoices bill fees, not events.
CREATE FUNCTION fluxrate_internal.retention_horizon(org_id uuid, now timestamptz) RETURNS timestamptz
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT least(now - make_interval(days => r.keep_days),
               (SELECT min(coalesce(
                         (SELECT min(i.period_start) FROM fluxrate_internal.invoices i
                           WHERE i.org_id = s.org_id AND i.subscription_id = s.id AND i.kind <> 'opening'
                             AND (i.finalized_at IS NULL OR i.finalized_at > now - make_interval(days => r.keep_days))),
                         CASE WHEN s.status = 'CANCELED' THEN 'infinity'::timestamptz ELSE s.current_period_start END))
                  FROM fluxrate_internal.subscriptions s WHERE s.org_id = retention_horizon.org_id))
    FROM fluxrate_internal.event_retention r WHERE r.org_id = retention_horizon.org_id
$$;

-- The monthly partitions whose events may all leave now, oldest first: ended
-- months with events, every organization of which has a retention horizon at
-- or after the month's end and its rollups in order, and every event counted
-- by the rollups (their transactions visible in the refresh's snapshot), so
-- that what leaves is carried by the rollups.  Read by fluxrate_system.
CREATE FUNCTION fluxrate_internal.sys_archivable_event_months(now timestamptz)
  RETURNS TABLE (part regclass, month timestamptz)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  st fluxrate_internal.usage_rollup_state;
  p record;
  v_hi timestamptz;
  v_ok boolean;
BEGIN
  SELECT * INTO st FROM fluxrate_internal.usage_rollup_state x WHERE x.system_identifier = fluxrate_internal.system_identifier();
  IF st.snapshot IS NULL THEN
    RETURN;  -- no rollups yet: nothing is carried, nothing leaves
  END IF;
  FOR p IN
    SELECT c.oid::regclass AS rel,
           make_timestamptz(substr(c.relname, 15, 4)::integer, substr(c.relname, 20, 2)::integer, 1, 0, 0, 0, 'UTC') AS lo
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'fluxrate_internal.usage_events'::regclass AND c.relname ~ '^usage_events_y[0-9]{4}m[0-9]{2}$'
     ORDER BY c.relname
  LOOP
    v_hi := (p.lo AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
    CONTINUE WHEN v_hi > now;
    -- the organizations with events in it (a loose scan of the primary key)
    EXECUTE format(
      'WITH RECURSIVE o AS (SELECT (SELECT e.org_id FROM %1$s e ORDER BY e.org_id LIMIT 1) AS id
                            UNION ALL
                            SELECT (SELECT e.org_id FROM %1$s e WHERE e.org_id > o.id ORDER BY e.org_id LIMIT 1)
                              FROM o WHERE o.id IS NOT NULL)
       SELECT count(*) > 0 AND bool_and(coalesce(fluxrate_internal.retention_horizon(o.id, $1) >= $2, false)
                                        AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.rollup_errors re WHERE re.org_id = o.id))
         FROM o WHERE o.id IS NOT NULL', p.rel)
      INTO v_ok USING now, v_hi;
    CONTINUE WHEN NOT coalesce(v_ok, false);
    EXECUTE format(
      'SELECT NOT EXISTS (SELECT 1 FROM %s e WHERE e.xact_id >= %s
                           AND NOT (txid_visible_in_snapshot(e.xact_id, $1) AND e.xact_id IS DISTINCT FROM $2))',
      p.rel, least(txid_snapshot_xmin(st.snapshot), st.refreshed_by))
      INTO v_ok USING st.snapshot, st.refreshed_by;
    CONTINUE WHEN NOT v_ok;
    part := p.rel;
    month := p.lo;
    RETURN NEXT;
  END LOOP;
END
$$;

-- What an archived partition held, per organization (as fluxrate_system: all of them).
CREATE FUNCTION fluxrate_internal.sys_record_archive(part regclass, month timestamptz, at timestamptz, archive_table text)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n bigint;
BEGIN
  EXECUTE format('INSERT INTO fluxrate_internal.archived_events (org_id, month, archived_at, events, archive_table)
                  SELECT e.org_id, $1, $2, count(*), $3 FROM %s e GROUP BY e.org_id', part)
    USING month, at, archive_table;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Archive the partitions retention allows (the minute job, after the
-- partitions): each is recorded, DETACHed and renamed aside.  DETACH takes an
-- ACCESS EXCLUSIVE lock on usage_events for a moment; with lock_timeout 2s
-- the job gives up rather than queue ingestion behind it, and tries again
-- the next minute.
CREATE FUNCTION fluxrate_internal.maintain_event_retention() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  SET lock_timeout = '2s'
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  a record;
  v_name text;
  v_done jsonb := '[]'::jsonb;
BEGIN
  FOR a IN SELECT x.part, x.month FROM fluxrate_internal.sys_archivable_event_months(v_now) x LOOP
    v_name := fluxrate_internal.event_partition_name(a.month) || '_archived_' || to_char(v_now AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS');
    PERFORM fluxrate_internal.sys_record_archive(a.part, a.month, v_now, 'fluxrate_internal.' || v_name);
    EXECUTE format('ALTER TABLE fluxrate_internal.usage_events DETACH PARTITION %s', a.part);
    EXECUTE format('ALTER TABLE %s RENAME TO %I', a.part, v_name);
    v_done := v_done || jsonb_build_object('month', a.month, 'archive_table', 'fluxrate_internal.' || v_name);
  END LOOP;
  RETURN jsonb_build_object('archived', v_done, 'skipped', false);
EXCEPTION WHEN lock_not_available THEN
  RETURN jsonb_build_object('archived', '[]'::jsonb, 'skipped', true, 'reason', 'a lock on usage_events was not free within 2 s');
END
$$;

-- The organization's retention and what was archived.
CREATE FUNCTION fluxrate_internal.retention_json(org_id uuid) RETURNS jsonb
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT jsonb_build_object(
    'keep_days', (SELECT r.keep_days FROM fluxrate_internal.event_retention r WHERE r.org_id = retention_json.org_id),
    'archived', coalesce((SELECT jsonb_agg(jsonb_build_object('month', a.month, 'events', a.events, 'archived_at', a.archived_at)
                                           ORDER BY a.month, a.archived_at)
                            FROM fluxrate_internal.archived_events a WHERE a.org_id = retention_json.org_id), '[]'::jsonb))
$$;

-- PUT /event-retention: keep_days after a period is finalized (NULL: keep
-- the raw events forever, the default).
CREATE FUNCTION fluxrate.set_event_retention(keep_days integer) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  IF keep_days IS NULL THEN
    DELETE FROM fluxrate_internal.event_retention r WHERE r.org_id = v_org;
  ELSIF keep_days < 0 OR keep_days > 36500 THEN
    PERFORM fluxrate_internal.fail('22023', format('keep_days must be 0 to 36500, not %s', keep_days), NULL,
      'Raw events are kept keep_days after their period is finalized; NULL keeps them forever.');
  ELSE
    INSERT INTO fluxrate_internal.event_retention AS r (org_id, keep_days, updated_at)
    VALUES (v_org, set_event_retention.keep_days, fluxrate.now())
    ON CONFLICT (org_id) DO UPDATE SET keep_days = excluded.keep_days, updated_at = excluded.updated_at;
  END IF;
  RETURN fluxrate_internal.retention_json(v_org);
END
$$;
COMMENT ON FUNCTION fluxrate.set_event_retention(integer) IS
  'how many days after its period is finalized a raw event may be archived (NULL: forever); returns the policy and the archived months';

CREATE FUNCTION fluxrate.get_event_retention() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
BEGIN
  RETURN fluxrate_internal.retention_json(v_org);
END
$$;
