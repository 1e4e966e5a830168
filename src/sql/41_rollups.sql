-- 41_rollups.sql: the usage rollups (daily and monthly sums per customer and
-- meter, kept by the minute job), and the usage of many (customer, meter)
-- pairs over a period: org_period_usage(), period_usage() (what the closer
-- reads).  docs/rollups.md.

-- Usage rollups ----------------------------------------------------------------
-- What every event contributes to SUM, COUNT, MAX, MIN and AVG, kept per
-- (organization, customer, meter) and UTC day, and again per UTC calendar
-- month, so that a closing run reads one row per (customer, meter) for each
-- whole month of the period and one per remaining day, instead of every event
-- of the period.  A minute job
-- (refresh_usage_rollups, scheduled by schedule_jobs) adds the events of the
-- transactions that have committed since its last run.
--
-- Exactness.  The rollups never guess which events they hold.  Each event
-- carries the id of the transaction that inserted it (usage_events.xact_id),
-- and the state keeps the snapshot S of the last refresh: the rollups hold
-- exactly the events whose transaction is visible in S.  A refresh reads, in
-- its own statement's snapshot S', the events visible in S' and not in S --
-- the transactions that committed in between, whatever their ids and
-- whenever they began -- adds them, and records S', in one transaction.  A
-- reader takes the rollups and the events NOT visible in the recorded S (the
-- "tail": a BRIN range of the newest pages, from S's xmin) in one statement,
-- i.e. one snapshot: it sees each visible event once, the same answer as a
-- pass over the events.  A transaction that stays open holds back nothing but
-- its own events.  (Timestamps cannot do this: a transaction may commit after
-- a later one, and an event may be sent for any past day.)
--
-- What the rollups hold is a function of the events alone: not of meter
-- filters, aggregation types or prices, which may change.  Only meters without
-- filters use them.  Events are never updated; delete_customer removes a
-- customer's events and its rollups together.
--
-- Transaction ids are the cluster's own.  The state records the cluster's
-- system identifier; a state from another cluster is not read, and the next
-- refresh rebuilds.  pg_dump restores neither table (derived data): a restored
-- database starts without a state.  Ids restored with the events are only
-- numbers then, and each is counted once, when the new cluster's snapshots
-- first show it as visible (visibility in later snapshots only grows).
CREATE TABLE fluxrate_internal.usage_rollups (
  org_id        uuid NOT NULL,
  width         text NOT NULL CHECK (width IN ('day', 'month')),
  bucket        timestamptz NOT NULL,     -- a UTC day or month: [bucket, bucket + 1 width)
  customer_id   uuid NOT NULL,
  meter_id      uuid NOT NULL,
  -- the event's group of the meter's dimension (24_dimensions.sql:
  -- group_value(), one of the at most 100 values the meter declares, or ''
  -- for every other value and none; '' for a meter without a dimension), so
  -- that a grouped charge is rated from the rollups too.  At most 101 rows per
  -- (customer, meter, bucket) by construction.
  group_value   text NOT NULL DEFAULT '',
  events        bigint NOT NULL,
  quantity_sum  numeric NOT NULL,
  quantity_max  numeric NOT NULL,
  quantity_min  numeric NOT NULL,
  -- width and bucket next: a period's months, and its days, are index ranges
  PRIMARY KEY (org_id, width, bucket, customer_id, meter_id, group_value)
);

-- One row, written by CREATE EXTENSION; snapshot NULL until the first refresh.
CREATE TABLE fluxrate_internal.usage_rollup_state (
  singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  system_identifier  bigint,
  snapshot           pg_catalog.txid_snapshot,   -- the rollups hold exactly the events whose xact_id is visible in it,
  refreshed_by       bigint,          -- ... except this one: the refresh's own transaction (see sys_refresh_rollups)
  refreshed_at       timestamptz,
  rebuilt_at         timestamptz,
  events_counted     bigint NOT NULL DEFAULT 0   -- by the last refresh
);
INSERT INTO fluxrate_internal.usage_rollup_state DEFAULT VALUES;

CREATE FUNCTION fluxrate_internal.system_identifier() RETURNS bigint
  LANGUAGE C STABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_system_identifier';

-- The snapshot the rollups can be read with, or NULL (never refreshed, or a
-- state written by another cluster).  STABLE: it reads the state in the
-- snapshot of the statement that calls it, the one that reads the rollups.
CREATE FUNCTION fluxrate_internal.rollup_snapshot() RETURNS txid_snapshot
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT s.snapshot FROM fluxrate_internal.usage_rollup_state s
   WHERE s.system_identifier = fluxrate_internal.system_identifier()
$$;


-- The lock that keeps one refresh at a time, and delete_customer from
-- interleaving with one (a refresh that read a customer's events before the
-- delete could write their rollups back after it).  Advisory, keyed by the
-- rollup table's oid: it needs no privilege on the state.
CREATE FUNCTION fluxrate_internal.rollup_lock_key() RETURNS bigint
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT ('fluxrate_internal.usage_rollups'::regclass::oid)::bigint << 8 $$;

-- Organizations whose rollups a refresh could not write (a bad row: say two
-- quantities whose sum overflows numeric) are set aside here, so that one
-- tenant's data never stops the refresh for the others: the organization's
-- rollups are deleted, the refresh leaves its events alone, and its readers
-- (org_period_usage) read its events directly -- exact, only slower.  Each
-- refresh after retry_at rebuilds the organization's rollups from its events;
-- when that succeeds the row goes.  The operator's health view reads this
-- table (docs/security.md, "Job fairness").
CREATE TABLE fluxrate_internal.rollup_errors (
  org_id      uuid PRIMARY KEY,
  sqlstate    text NOT NULL,
  message     text NOT NULL,
  failed_at   timestamptz NOT NULL,
  attempts    integer NOT NULL DEFAULT 1,
  retry_at    timestamptz NOT NULL
);

-- One rollup statement: adds the events of transactions visible in now_s and
-- not in prev_s (all visible in now_s when prev_s is NULL: a rebuild), except
-- the refresh's own transaction, for one organization (only_org) or for all
-- but the set-aside ones (skip).  Visibility is tested against now_s
-- explicitly, so several such statements of one refresh count as of the same
-- snapshot.  Events whose customer no longer exists (a track that raced
-- delete_customer or an organization's deletion, and committed after it) are
-- deleted here instead of counted: the refresh is where every committed event
-- passes exactly once (docs/security.md, "Deletion").
CREATE FUNCTION fluxrate_internal.sys_rollup_add(prev_s txid_snapshot, now_s txid_snapshot, self bigint, refreshed_by bigint,
    only_org uuid, skip uuid[], OUT events bigint, OUT buckets bigint, OUT swept bigint)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  SET jit = off
  AS $$
DECLARE
  v_gone tid[];
  v_gone_rel oid[];
BEGIN
  -- The previous xmin is a literal, for the BRIN index (events below it were
  -- all visible in prev_s); for a rebuild, a sequential scan.  The day is a UTC
  -- day whatever the session's TimeZone (date_bin on timestamptz is absolute).
  EXECUTE format(
    'WITH d AS MATERIALIZED (
       SELECT e.tableoid AS rel, e.ctid AS tid, e.org_id, e.customer_id, e.meter_id, e."timestamp", e.quantity, (c.id IS NOT NULL) AS live,
              CASE WHEN md.meter_id IS NULL THEN '''' ELSE fluxrate_internal.group_value(e.metadata, md.property, md."values") END AS gv
         FROM fluxrate_internal.usage_events e
         LEFT JOIN fluxrate_internal.customers c ON c.org_id = e.org_id AND c.id = e.customer_id
         LEFT JOIN fluxrate_internal.meter_dimensions md ON md.org_id = e.org_id AND md.meter_id = e.meter_id
        WHERE txid_visible_in_snapshot(e.xact_id, %L::txid_snapshot) AND e.xact_id <> %s %s %s
     ), n AS (
       SELECT d.org_id, date_bin(''1 day'', d."timestamp", ''2000-01-01 00:00:00+00''::timestamptz) AS bucket,
              d.customer_id, d.meter_id, d.gv, count(*) AS events, sum(d.quantity) AS s, max(d.quantity) AS mx, min(d.quantity) AS mn
         FROM d WHERE d.live
        GROUP BY 1, 2, 3, 4, 5
     ), m AS (
       SELECT n.org_id, date_trunc(''month'', n.bucket, ''UTC'') AS bucket, n.customer_id, n.meter_id, n.gv,
              sum(n.events)::bigint AS events, sum(n.s) AS s, max(n.mx) AS mx, min(n.mn) AS mn
         FROM n GROUP BY 1, 2, 3, 4, 5
     ), ins AS (
       INSERT INTO fluxrate_internal.usage_rollups AS r
              (org_id, width, bucket, customer_id, meter_id, group_value, events, quantity_sum, quantity_max, quantity_min)
       SELECT n.org_id, ''day'', n.bucket, n.customer_id, n.meter_id, n.gv, n.events, n.s, n.mx, n.mn FROM n
       UNION ALL
       SELECT m.org_id, ''month'', m.bucket, m.customer_id, m.meter_id, m.gv, m.events, m.s, m.mx, m.mn FROM m
       ON CONFLICT (org_id, width, bucket, customer_id, meter_id, group_value) DO UPDATE
          SET events = r.events + excluded.events,
              quantity_sum = r.quantity_sum + excluded.quantity_sum,
              quantity_max = greatest(r.quantity_max, excluded.quantity_max),
              quantity_min = least(r.quantity_min, excluded.quantity_min)
       RETURNING 1
     )
     SELECT coalesce((SELECT sum(n.events) FROM n), 0)::bigint, (SELECT count(*) FROM ins),
            (SELECT array_agg(d.tid ORDER BY d.rel, d.tid) FROM d WHERE NOT d.live),
            (SELECT array_agg(d.rel ORDER BY d.rel, d.tid) FROM d WHERE NOT d.live)',
    now_s, self,
    CASE WHEN prev_s IS NULL THEN '' ELSE format('AND e.xact_id >= %s AND (NOT txid_visible_in_snapshot(e.xact_id, %L::txid_snapshot) OR e.xact_id = %s)',
                                                 least(txid_snapshot_xmin(prev_s), refreshed_by), prev_s, coalesce(refreshed_by, 0)) END,
    CASE WHEN only_org IS NOT NULL THEN format('AND e.org_id = %L::uuid', only_org)
         WHEN cardinality(skip) > 0 THEN format('AND e.org_id <> ALL (%L::uuid[])', skip)
         ELSE '' END)
    INTO events, buckets, v_gone, v_gone_rel;
  -- (a second statement, by tid: a DELETE joined to the delta in the same
  -- statement may be planned as a pass over all events; nothing moves them in
  -- between, and delete_customer waits for the lock this refresh holds).  A
  -- tid names a row of one partition: (partition, tid) pairs (32_partitions.sql).
  swept := coalesce(cardinality(v_gone), 0);
  IF swept > 0 THEN
    WITH gone AS (
      DELETE FROM fluxrate_internal.usage_events e
       WHERE e.ctid = ANY (v_gone) AND (e.tableoid, e.ctid) IN (SELECT * FROM unnest(v_gone_rel, v_gone))
      RETURNING e.org_id, e.idempotency_key)
    DELETE FROM fluxrate_internal.usage_event_keys k USING gone
     WHERE k.org_id = gone.org_id AND k.idempotency_key = gone.idempotency_key;
  END IF;
END
$$;

-- Count the events of the transactions that committed since the last refresh
-- (all of them when there is no usable state: the first run, another
-- cluster's state, or rebuild => true).  Returns at once, with skipped =>
-- true, while another refresh or a customer deletion holds the lock.
--
-- One statement over all organizations, the fast path.  If it fails (not for
-- a transient reason), one statement per organization with new events, each in
-- its own subtransaction: an organization that fails is set aside in
-- rollup_errors (see there), the others are counted.  Then the set-aside
-- organizations due for a retry are rebuilt, each alone.
CREATE FUNCTION fluxrate_internal.sys_refresh_rollups(rebuild boolean DEFAULT false)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  SET jit = off
  AS $$
DECLARE
  st fluxrate_internal.usage_rollup_state;
  v_snap txid_snapshot;
  v_prev txid_snapshot;
  v_events bigint := 0;
  v_buckets bigint := 0;
  v_swept bigint := 0;
  v_e bigint;
  v_b bigint;
  v_w bigint;
  v_sysid bigint := fluxrate_internal.system_identifier();
  v_self bigint;
  v_now timestamptz := fluxrate.now();
  v_skip uuid[];
  v_failed uuid[] := '{}'::uuid[];
  v_recovered uuid[] := '{}'::uuid[];
  v_state text;
  v_msg text;
  o record;
  v_org uuid;  -- of the FOR over EXECUTE: a scalar, whose type plpgsql_check knows
BEGIN
  IF NOT pg_try_advisory_xact_lock(fluxrate_internal.rollup_lock_key()) THEN
    RETURN jsonb_build_object('skipped', true, 'reason', 'another refresh or a customer deletion holds the rollups');
  END IF;
  SELECT * INTO STRICT st FROM fluxrate_internal.usage_rollup_state;
  rebuild := rebuild OR st.snapshot IS NULL OR st.system_identifier IS DISTINCT FROM v_sysid;
  IF rebuild THEN
    DELETE FROM fluxrate_internal.usage_rollups;
    -- a rebuild recounts everyone: nobody stays set aside for an old failure
    DELETE FROM fluxrate_internal.rollup_errors;
  END IF;
  -- Our own transaction is never "visible" to the rollups: a snapshot does not
  -- list its own transaction as running, so S' would show it as committed, and
  -- events this transaction inserts -- before this call, when the application
  -- tracked and refreshed in one transaction, or after it -- would be in
  -- neither half.  Its events are counted by the next refresh, once it has
  -- committed (refreshed_by); if it rolls back, so does this refresh.
  v_self := txid_current();
  -- S', the snapshot recorded; every statement below tests visibility in it
  v_snap := txid_current_snapshot();
  v_prev := CASE WHEN rebuild THEN NULL ELSE st.snapshot END;
  v_skip := ARRAY(SELECT r.org_id FROM fluxrate_internal.rollup_errors r ORDER BY 1);
  BEGIN
    SELECT a.events, a.buckets, a.swept INTO v_events, v_buckets, v_swept
      FROM fluxrate_internal.sys_rollup_add(v_prev, v_snap, v_self, st.refreshed_by, NULL, v_skip) a;
  EXCEPTION WHEN OTHERS THEN
    IF fluxrate_internal.transient_error(SQLSTATE) THEN
      RAISE;
    END IF;
    -- one organization at a time: those with events in the delta
    v_events := 0; v_buckets := 0; v_swept := 0;
    FOR v_org IN EXECUTE format(
        'SELECT DISTINCT e.org_id FROM fluxrate_internal.usage_events e
          WHERE txid_visible_in_snapshot(e.xact_id, %L::txid_snapshot) AND e.xact_id <> %s %s AND e.org_id <> ALL (%L::uuid[])
          ORDER BY 1',
        v_snap, v_self,
        CASE WHEN v_prev IS NULL THEN '' ELSE format('AND e.xact_id >= %s AND (NOT txid_visible_in_snapshot(e.xact_id, %L::txid_snapshot) OR e.xact_id = %s)',
                                                     least(txid_snapshot_xmin(v_prev), st.refreshed_by), v_prev, coalesce(st.refreshed_by, 0)) END,
        v_skip)
    LOOP
      BEGIN
        SELECT a.events, a.buckets, a.swept INTO v_e, v_b, v_w
          FROM fluxrate_internal.sys_rollup_add(v_prev, v_snap, v_self, st.refreshed_by, v_org, NULL) a;
        v_events := v_events + v_e; v_buckets := v_buckets + v_b; v_swept := v_swept + v_w;
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
        IF fluxrate_internal.transient_error(v_state) THEN
          RAISE;
        END IF;
        PERFORM fluxrate_internal.sys_rollup_set_aside(v_org, v_state, v_msg, v_now);
        v_failed := v_failed || v_org;
      END;
    END LOOP;
  END;
  -- the set-aside organizations whose retry is due: rebuilt alone, from all
  -- their events visible in S'
  FOR o IN SELECT r.org_id FROM fluxrate_internal.rollup_errors r
            WHERE r.retry_at <= v_now AND r.org_id <> ALL (v_failed) ORDER BY 1 LOOP
    BEGIN
      DELETE FROM fluxrate_internal.usage_rollups u WHERE u.org_id = o.org_id;
      SELECT a.events, a.buckets, a.swept INTO v_e, v_b, v_w
        FROM fluxrate_internal.sys_rollup_add(NULL, v_snap, v_self, st.refreshed_by, o.org_id, NULL) a;
      DELETE FROM fluxrate_internal.rollup_errors r WHERE r.org_id = o.org_id;
      v_events := v_events + v_e; v_buckets := v_buckets + v_b; v_swept := v_swept + v_w;
      v_recovered := v_recovered || o.org_id;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF fluxrate_internal.transient_error(v_state) THEN
        RAISE;
      END IF;
      PERFORM fluxrate_internal.sys_rollup_set_aside(o.org_id, v_state, v_msg, v_now);
      v_failed := v_failed || o.org_id;
    END;
  END LOOP;
  -- the closer's plans over the rollups need statistics that know their size
  -- (50_lifecycle.sql)
  PERFORM fluxrate_internal.analyze_if_outgrown('fluxrate_internal.usage_rollups');
  UPDATE fluxrate_internal.usage_rollup_state
     SET system_identifier = v_sysid, snapshot = v_snap, refreshed_by = v_self, refreshed_at = fluxrate.now(),
         rebuilt_at = CASE WHEN rebuild THEN fluxrate.now() ELSE rebuilt_at END,
         events_counted = v_events;
  RETURN jsonb_build_object('skipped', false, 'rebuilt', rebuild, 'events', v_events, 'buckets', v_buckets,
                            'snapshot', v_snap::text, 'swept', v_swept,
                            'set_aside', to_jsonb(v_failed), 'recovered', to_jsonb(v_recovered),
                            'set_aside_total', (SELECT count(*) FROM fluxrate_internal.rollup_errors));
END
$$;

-- An organization whose rollups could not be written: its rollups go (readers
-- read its events), the error is kept, and it is retried after 5 minutes,
-- doubling up to a day (retry_delay, as the closer does).
CREATE FUNCTION fluxrate_internal.sys_rollup_set_aside(org_id uuid, sqlstate text, message text, at timestamptz)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_attempts integer;
BEGIN
  DELETE FROM fluxrate_internal.usage_rollups u WHERE u.org_id = sys_rollup_set_aside.org_id;
  INSERT INTO fluxrate_internal.rollup_errors AS r (org_id, sqlstate, message, failed_at, attempts, retry_at)
  VALUES (sys_rollup_set_aside.org_id, sys_rollup_set_aside.sqlstate, sys_rollup_set_aside.message, at, 1,
          at + fluxrate_internal.retry_delay(1))
  ON CONFLICT ON CONSTRAINT rollup_errors_pkey DO UPDATE
     SET sqlstate = excluded.sqlstate, message = excluded.message, failed_at = excluded.failed_at,
         attempts = r.attempts + 1, retry_at = excluded.failed_at + fluxrate_internal.retry_delay(r.attempts + 1)
  RETURNING r.attempts INTO v_attempts;
  RAISE WARNING 'fluxrate: the usage rollups of organization % could not be refreshed', sys_rollup_set_aside.org_id
    USING DETAIL = format('%s: %s (attempt %s)', sys_rollup_set_aside.sqlstate, sys_rollup_set_aside.message, v_attempts),
          HINT = 'The other organizations were refreshed; this one reads its events directly until a retry succeeds (fluxrate_internal.rollup_errors).';
END
$$;

-- The minute job, and what operators call after a logical replication
-- switchover or anything else that wrote events with another cluster's ids
-- into a database that already had rollups (rebuild => true: recount).
CREATE FUNCTION fluxrate.refresh_usage_rollups(rebuild boolean DEFAULT false) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r jsonb := fluxrate_internal.sys_refresh_rollups(rebuild);
BEGIN
  -- the job's one line when it counted something (job_log: 90_health.sql)
  IF (r->>'events')::bigint > 0 THEN
    PERFORM fluxrate_internal.job_log('refresh_usage_rollups',
      format('counted %s events into %s buckets', r->>'events', r->>'buckets'));
  END IF;
  RETURN r;
END
$$;
COMMENT ON FUNCTION fluxrate.refresh_usage_rollups(boolean) IS
  'adds the events of the transactions committed since the last refresh to the daily usage rollups (the minute job); rebuild => true recounts everything';

-- The rollups against the events, for one organization: every (day, customer,
-- meter) whose rollup differs from the events it should hold (those visible
-- in the state's snapshot).  No rows: they agree.  For tests and for operators
-- who want to see it for themselves.
CREATE FUNCTION fluxrate_internal.rollup_differences(org_id uuid)
  RETURNS TABLE (width text, bucket timestamptz, customer_id uuid, meter_id uuid, group_value text, rollup_events bigint,
                 event_count bigint, rollup_sum numeric, event_sum numeric)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH h AS (SELECT st.snapshot AS v, st.refreshed_by AS self FROM fluxrate_internal.usage_rollup_state st
              WHERE st.system_identifier = fluxrate_internal.system_identifier()),
  r AS (SELECT * FROM fluxrate_internal.usage_rollups r WHERE r.org_id = rollup_differences.org_id),
  ev AS MATERIALIZED (SELECT e.*, CASE WHEN md.meter_id IS NULL THEN ''
                                        ELSE fluxrate_internal.group_value(e.metadata, md.property, md."values") END AS gv
                        FROM fluxrate_internal.usage_events e
                        LEFT JOIN fluxrate_internal.meter_dimensions md ON md.org_id = e.org_id AND md.meter_id = e.meter_id
                       WHERE e.org_id = rollup_differences.org_id AND txid_visible_in_snapshot(e.xact_id, (SELECT v FROM h))
                         AND e.xact_id IS DISTINCT FROM (SELECT self FROM h)),
  e AS (SELECT w.width, CASE w.width WHEN 'day' THEN date_bin('1 day', ev."timestamp", '2000-01-01 00:00:00+00'::timestamptz)
                                     ELSE date_trunc('month', ev."timestamp", 'UTC') END AS bucket,
               ev.customer_id, ev.meter_id, ev.gv, count(*) AS events, sum(ev.quantity) AS s, max(ev.quantity) AS mx, min(ev.quantity) AS mn
          FROM ev CROSS JOIN (VALUES ('day'), ('month')) w(width)
         GROUP BY 1, 2, 3, 4, 5)
  SELECT coalesce(r.width, e.width), coalesce(r.bucket, e.bucket), coalesce(r.customer_id, e.customer_id),
         coalesce(r.meter_id, e.meter_id), coalesce(r.group_value, e.gv), r.events, e.events, r.quantity_sum, e.s
    FROM r FULL JOIN e ON e.width = r.width AND e.bucket = r.bucket AND e.customer_id = r.customer_id AND e.meter_id = r.meter_id
                      AND e.gv = r.group_value
   WHERE r.events IS DISTINCT FROM e.events OR r.quantity_sum IS DISTINCT FROM e.s
      OR r.quantity_max IS DISTINCT FROM e.mx OR r.quantity_min IS DISTINCT FROM e.mn
      OR (SELECT v FROM h) IS NULL
$$;

-- One aggregation over one organization's period, for the given meters, in one
-- pass (period_usage()'s whole-organization path, the closer's snapshot).
--
-- When the period is whole UTC days and the rollups are usable: the period's
-- rollup rows plus the tail (events not yet rolled up), in one statement.
-- Otherwise one pass over the period's events.  Both are EXECUTE ... USING:
-- planned for the real bounds (the pass is a parallel hash aggregate over
-- millions of rows, like a plain GROUP BY; the tail is a BRIN range of the
-- newest pages), and RETURN QUERY may run in parallel.  When the meters are all
-- of the organization's, the meter test moves from every row to every group.
-- (plpgsql_check warns that the OUT variables are "maybe unmodified": the rows
-- come from RETURN QUERY EXECUTE, which it cannot see into; sql/lint.sql.)
CREATE FUNCTION fluxrate_internal.org_period_usage(org_id uuid, period_start timestamptz, period_end timestamptz,
    aggregation_type text, meter_ids uuid[], use_rollups boolean DEFAULT true)
  RETURNS TABLE (customer_id uuid, meter_id uuid, usage numeric)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  -- the set-aside branch (a pass over the period's events, never run unless
  -- the organization is set aside) lifts the estimate above jit_above_cost:
  -- JIT compiled 56 functions, 68 ms, for a read of 30,000 rollup rows
  SET jit = off
  AS $$
DECLARE
  v_all boolean := (SELECT count(*) FROM fluxrate_internal.meters m WHERE m.org_id = org_period_usage.org_id)
                   <= cardinality(meter_ids);
  v_snap txid_snapshot;
  v_self bigint;
  v_ms timestamptz;
  v_me timestamptz;
BEGIN
  IF aggregation_type IS NULL OR aggregation_type NOT IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG') THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('no one-pass aggregation for %s', aggregation_type),
      HINT = 'One pass computes SUM, COUNT, MAX, MIN and AVG; the other meters go through meter_usage().';
  END IF;
  IF use_rollups AND fluxrate_internal.whole_utc_days(period_start, period_end) THEN
    -- (an organization set aside by the refresh has no rollups: its events are read)
    SELECT st.snapshot, st.refreshed_by INTO v_snap, v_self
      FROM fluxrate_internal.usage_rollup_state st WHERE st.system_identifier = fluxrate_internal.system_identifier()
       AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.rollup_errors re WHERE re.org_id = org_period_usage.org_id);
    -- the whole UTC months inside the period [v_ms, v_me), read from the month
    -- rows; the days before and after them from the day rows
    v_ms := date_trunc('month', period_start, 'UTC');
    IF v_ms < period_start THEN
      v_ms := (date_trunc('month', period_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END IF;
    v_me := date_trunc('month', period_end, 'UTC');
    IF v_ms >= v_me THEN
      v_ms := period_end;
      v_me := period_end;
    END IF;
  END IF;
  IF v_snap IS NOT NULL THEN
    -- The state is read again inside the statement, in its snapshot, with the
    -- rollups: a refresh that committed since v_snap was read has moved events
    -- from the tail into the rollups, and the tail's test against the state
    -- read in-statement drops them.  (Snapshots only move forward; the lower
    -- bound of the tail -- v_snap's xmin, or the refresh's own transaction if
    -- older -- is a literal so that the planner takes the BRIN index.)  A
    -- refresh that set the organization aside since (rollup_errors: its rollups
    -- deleted) switches the statement to its events alone (q, the last branch).
    RETURN QUERY EXECUTE format(
      'WITH h AS (SELECT st.snapshot AS v, st.refreshed_by AS self,
                         EXISTS (SELECT 1 FROM fluxrate_internal.rollup_errors re WHERE re.org_id = $1) AS q
                    FROM fluxrate_internal.usage_rollup_state st
                   WHERE st.system_identifier = fluxrate_internal.system_identifier())
       SELECT g.customer_id, g.meter_id, %s AS usage
         FROM (SELECT u.customer_id, u.meter_id, sum(u.n) AS n, sum(u.s) AS s, max(u.mx) AS mx, min(u.mn) AS mn
                 FROM (SELECT r.customer_id, r.meter_id, r.events AS n, r.quantity_sum AS s, r.quantity_max AS mx,
                              r.quantity_min AS mn
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''month'' AND r.bucket >= $5 AND r.bucket < $6 %s
                          AND (SELECT v FROM h) IS NOT NULL AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT r.customer_id, r.meter_id, r.events AS n, r.quantity_sum AS s, r.quantity_max AS mx,
                              r.quantity_min AS mn
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''day''
                          AND ((r.bucket >= $2 AND r.bucket < $5) OR (r.bucket >= $6 AND r.bucket < $3)) %s
                          AND (SELECT v FROM h) IS NOT NULL AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT e.customer_id, e.meter_id, 1, e.quantity, e.quantity, e.quantity
                         FROM fluxrate_internal.usage_events e
                        WHERE e.org_id = $1 AND e.xact_id >= %s
                          AND NOT coalesce(txid_visible_in_snapshot(e.xact_id, (SELECT v FROM h))
                                           AND e.xact_id IS DISTINCT FROM (SELECT self FROM h), false)
                          AND e."timestamp" >= $2 AND e."timestamp" < $3 %s
                          AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT e.customer_id, e.meter_id, 1, e.quantity, e.quantity, e.quantity
                         FROM fluxrate_internal.usage_events e
                        WHERE coalesce((SELECT q FROM h), false) AND e.org_id = $1 AND e."timestamp" >= $2 AND e."timestamp" < $3 %s) u
                GROUP BY u.customer_id, u.meter_id) g
        WHERE g.meter_id = ANY ($4)',
      CASE aggregation_type WHEN 'SUM' THEN 'g.s' WHEN 'COUNT' THEN 'g.n' WHEN 'MAX' THEN 'trim_scale(g.mx)'
        WHEN 'MIN' THEN 'trim_scale(g.mn)' WHEN 'AVG' THEN 'g.s / g.n' END,
      CASE WHEN v_all THEN '' ELSE 'AND r.meter_id = ANY ($4)' END,
      CASE WHEN v_all THEN '' ELSE 'AND r.meter_id = ANY ($4)' END,
      least(txid_snapshot_xmin(v_snap), v_self),
      CASE WHEN v_all THEN '' ELSE 'AND e.meter_id = ANY ($4)' END,
      CASE WHEN v_all THEN '' ELSE 'AND e.meter_id = ANY ($4)' END)
      USING org_id, period_start, period_end, meter_ids, v_ms, v_me;
    RETURN;
  END IF;
  RETURN QUERY EXECUTE format(
    'SELECT g.customer_id, g.meter_id, g.usage
       FROM (SELECT e.customer_id, e.meter_id, %s AS usage FROM fluxrate_internal.usage_events e
              WHERE e.org_id = $1 AND e."timestamp" >= $2 AND e."timestamp" < $3 %s
              GROUP BY e.customer_id, e.meter_id) g
      WHERE g.meter_id = ANY ($4)',
    CASE aggregation_type WHEN 'SUM' THEN 'sum(e.quantity)' WHEN 'COUNT' THEN 'count(*)::numeric'
      WHEN 'MAX' THEN 'trim_scale(max(e.quantity))' WHEN 'MIN' THEN 'trim_scale(min(e.quantity))' WHEN 'AVG' THEN 'avg(e.quantity)' END,
    CASE WHEN v_all THEN '' ELSE 'AND e.meter_id = ANY ($4)' END)
    USING org_id, period_start, period_end, meter_ids;
END
$$;

-- org_period_usage() by group, for the dimensioned SUM and COUNT meters of
-- grouped charges (24_dimensions.sql): per (customer, meter) the usage by
-- group value, {"gpt-large": 1200, "": 15}, over one organization's period,
-- in one statement: the rollups (keyed by group value) and the tail when the
-- period is whole UTC days and the rollups serve the organization, else one
-- pass over the period's events.  The same snapshot reasoning as
-- org_period_usage (whose comments say why each half is exact).
CREATE FUNCTION fluxrate_internal.org_period_group_usage(org_id uuid, period_start timestamptz, period_end timestamptz,
    meter_ids uuid[])
  RETURNS TABLE (customer_id uuid, meter_id uuid, groups jsonb)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  SET jit = off
  AS $$
DECLARE
  v_snap txid_snapshot;
  v_self bigint;
  v_ms timestamptz;
  v_me timestamptz;
BEGIN
  IF fluxrate_internal.whole_utc_days(period_start, period_end) THEN
    SELECT st.snapshot, st.refreshed_by INTO v_snap, v_self
      FROM fluxrate_internal.usage_rollup_state st WHERE st.system_identifier = fluxrate_internal.system_identifier()
       AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.rollup_errors re WHERE re.org_id = org_period_group_usage.org_id);
    v_ms := date_trunc('month', period_start, 'UTC');
    IF v_ms < period_start THEN
      v_ms := (date_trunc('month', period_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END IF;
    v_me := date_trunc('month', period_end, 'UTC');
    IF v_ms >= v_me THEN
      v_ms := period_end;
      v_me := period_end;
    END IF;
  END IF;
  IF v_snap IS NOT NULL THEN
    RETURN QUERY EXECUTE format(
      'WITH h AS (SELECT st.snapshot AS v, st.refreshed_by AS self,
                         EXISTS (SELECT 1 FROM fluxrate_internal.rollup_errors re WHERE re.org_id = $1) AS q
                    FROM fluxrate_internal.usage_rollup_state st
                   WHERE st.system_identifier = fluxrate_internal.system_identifier()),
       mt AS (SELECT m.id, m.aggregation_type AS agg, d.property, d."values"
                FROM fluxrate_internal.meters m
                JOIN fluxrate_internal.meter_dimensions d ON d.org_id = m.org_id AND d.meter_id = m.id
               WHERE m.org_id = $1 AND m.id = ANY ($4))
       SELECT g.customer_id, g.meter_id, jsonb_object_agg(g.gv, g.usage)
         FROM (SELECT u.customer_id, u.meter_id, u.gv,
                      CASE WHEN min(mt.agg) = ''COUNT'' THEN sum(u.n) ELSE sum(u.s) END AS usage
                 FROM (SELECT r.customer_id, r.meter_id, r.group_value AS gv, r.events AS n, r.quantity_sum AS s
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''month'' AND r.bucket >= $5 AND r.bucket < $6 AND r.meter_id = ANY ($4)
                          AND (SELECT v FROM h) IS NOT NULL AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT r.customer_id, r.meter_id, r.group_value, r.events, r.quantity_sum
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''day'' AND r.meter_id = ANY ($4)
                          AND ((r.bucket >= $2 AND r.bucket < $5) OR (r.bucket >= $6 AND r.bucket < $3))
                          AND (SELECT v FROM h) IS NOT NULL AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT e.customer_id, e.meter_id, fluxrate_internal.group_value(e.metadata, mt.property, mt."values"), 1, e.quantity
                         FROM fluxrate_internal.usage_events e JOIN mt ON mt.id = e.meter_id
                        WHERE e.org_id = $1 AND e.xact_id >= %s
                          AND NOT coalesce(txid_visible_in_snapshot(e.xact_id, (SELECT v FROM h))
                                           AND e.xact_id IS DISTINCT FROM (SELECT self FROM h), false)
                          AND e."timestamp" >= $2 AND e."timestamp" < $3
                          AND NOT coalesce((SELECT q FROM h), false)
                       UNION ALL
                       SELECT e.customer_id, e.meter_id, fluxrate_internal.group_value(e.metadata, mt.property, mt."values"), 1, e.quantity
                         FROM fluxrate_internal.usage_events e JOIN mt ON mt.id = e.meter_id
                        WHERE coalesce((SELECT q FROM h), false) AND e.org_id = $1
                          AND e."timestamp" >= $2 AND e."timestamp" < $3) u
                 JOIN mt ON mt.id = u.meter_id
                GROUP BY u.customer_id, u.meter_id, u.gv) g
        GROUP BY g.customer_id, g.meter_id',
      least(txid_snapshot_xmin(v_snap), v_self))
      USING org_id, period_start, period_end, meter_ids, v_ms, v_me;
    RETURN;
  END IF;
  RETURN QUERY
    SELECT g.customer_id, g.meter_id, jsonb_object_agg(g.gv, g.usage)
      FROM (SELECT e.customer_id, e.meter_id, fluxrate_internal.group_value(e.metadata, d.property, d."values") AS gv,
                   CASE WHEN min(m.aggregation_type) = 'COUNT' THEN count(*)::numeric ELSE sum(e.quantity) END AS usage
              FROM fluxrate_internal.usage_events e
              JOIN fluxrate_internal.meters m ON m.org_id = e.org_id AND m.id = e.meter_id
              JOIN fluxrate_internal.meter_dimensions d ON d.org_id = m.org_id AND d.meter_id = m.id
             WHERE e.org_id = org_period_group_usage.org_id AND e.meter_id = ANY (meter_ids)
               AND e."timestamp" >= period_start AND e."timestamp" < period_end
             GROUP BY 1, 2, 3) g
     GROUP BY g.customer_id, g.meter_id;
END
$$;

-- Whether [period_start, period_end) is whole UTC days, i.e. whole rollup buckets.
CREATE FUNCTION fluxrate_internal.whole_utc_days(period_start timestamptz, period_end timestamptz) RETURNS boolean
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT period_start < period_end
     AND date_bin('1 day', period_start, '2000-01-01 00:00:00+00'::timestamptz) = period_start
     AND date_bin('1 day', period_end, '2000-01-01 00:00:00+00'::timestamptz) = period_end
$$;
-- Many (customer, meter, period) triples at once; ord is the 1-based position in
-- the arrays.  Plain meters (SUM, COUNT, MAX, MIN, AVG without filters) are one
-- index-only range scan of the covering index each, inside one statement; the
-- others go through meter_usage().
CREATE FUNCTION fluxrate_internal.period_usage(org_id uuid, customer_ids uuid[], meter_ids uuid[],
    period_starts timestamptz[], period_ends timestamptz[])
  RETURNS TABLE (ord integer, usage numeric)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH t AS MATERIALIZED (
    SELECT x.ord::integer AS ord, x.c, x.m, x.s, x.e, mt.aggregation_type AS agg,
           (mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')) AS plain
      FROM unnest(customer_ids, meter_ids, period_starts, period_ends) WITH ORDINALITY AS x(c, m, s, e, ord)
      JOIN fluxrate_internal.meters mt ON mt.org_id = period_usage.org_id AND mt.id = x.m
  ), shape AS MATERIALIZED (
    -- one period shared by every SUM pair, asked for at least half of the
    -- organization's customers (a whole-organization report, an analytics pass)
    SELECT count(DISTINCT (t.s, t.e)) = 1
           AND count(DISTINCT t.c) * 2 >= (SELECT count(*) FROM fluxrate_internal.customers cu
                                           WHERE cu.org_id = period_usage.org_id) AS whole,
           min(t.s) AS s, max(t.e) AS e
      FROM t WHERE t.plain AND t.agg = 'SUM'
  ), sums AS (
    -- a few pairs or several periods (a closing batch): one index-only range scan
    -- per pair inside one join (SUM alone, the common case: one aggregate per row)
    SELECT t.ord, coalesce(sum(e.quantity), 0) AS usage
      FROM t LEFT JOIN fluxrate_internal.usage_events e
        ON e.org_id = period_usage.org_id AND e.customer_id = t.c AND e.meter_id = t.m
       AND e."timestamp" >= t.s AND e."timestamp" < t.e
     WHERE t.plain AND t.agg = 'SUM' AND NOT (SELECT whole FROM shape)
     GROUP BY t.ord
    UNION ALL
    -- most of the organization over one period: aggregate first, in one pass over
    -- the period (what a plain GROUP BY does), then join the 10,000s of sums back,
    -- instead of joining millions of events to the pairs (run-time gated: only one
    -- of the two branches executes)
    SELECT t.ord, coalesce(a.usage, 0)
      FROM t LEFT JOIN fluxrate_internal.org_period_usage(period_usage.org_id, (SELECT s FROM shape), (SELECT e FROM shape), 'SUM',
                                                          (SELECT array_agg(DISTINCT t2.m) FROM t t2 WHERE t2.plain AND t2.agg = 'SUM')) a
        ON a.customer_id = t.c AND a.meter_id = t.m
     WHERE t.plain AND t.agg = 'SUM' AND (SELECT whole FROM shape)
  ), others AS (
    SELECT t.ord, CASE t.agg WHEN 'COUNT' THEN count(e.quantity)::numeric
                    WHEN 'MAX' THEN coalesce(trim_scale(max(e.quantity)), 0) WHEN 'MIN' THEN coalesce(trim_scale(min(e.quantity)), 0)
                    ELSE coalesce(avg(e.quantity), 0) END AS usage
      FROM t LEFT JOIN fluxrate_internal.usage_events e
        ON e.org_id = period_usage.org_id AND e.customer_id = t.c AND e.meter_id = t.m
       AND e."timestamp" >= t.s AND e."timestamp" < t.e
     WHERE t.plain AND t.agg <> 'SUM'
     GROUP BY t.ord, t.agg
  )
  SELECT ord, usage FROM sums
  UNION ALL
  SELECT ord, usage FROM others
  UNION ALL
  SELECT t.ord, fluxrate_internal.meter_usage(period_usage.org_id, t.c, t.m, t.s, t.e) FROM t WHERE NOT t.plain
$$;
