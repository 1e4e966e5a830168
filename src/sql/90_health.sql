-- 90_health.sql: the operator's side of the clock (docs/lifecycle.md, "Operating").
--
--   - schedule_jobs() first checks that pg_cron can reach this database the way
--     it is configured (check_cron), and refuses with 55000 and a hint naming
--     the setting when it cannot: a job that cannot log in fails every minute
--     in cron.job_run_details, where nobody looks.
--   - fluxrate.health() (and the view fluxrate.health): are the jobs
--     scheduled and succeeding, what is due and not done, what was set aside
--     and why, how far the usage rollups lag.  For members of
--     fluxrate_operator (and superusers), never for tenants.
--   - job_log(): the one line each job writes when it did something.
--   - DROP EXTENSION fluxrate unschedules its jobs first (an event trigger).

-- health() counts the deliveries that need a look across organizations: a
-- partial index keeps that off the (large, mostly SENT) table
CREATE INDEX deliveries_attention_idx ON fluxrate_internal.deliveries (updated_at)
  WHERE status IN ('FAILED', 'SKIPPED');

DO $roles$
BEGIN
  -- operators: read fluxrate.health() across organizations; no tenant data beyond ids and errors
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_operator') THEN
    CREATE ROLE fluxrate_operator NOLOGIN;
  END IF;
END
$roles$;

-- The libpq login pg_cron makes for each job when cron.use_background_workers
-- is off; NULL when it works, else libpq's error (src/cron.c).
CREATE OR REPLACE FUNCTION fluxrate_internal.cron_connect_error() RETURNS text
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_cron_connect_error';
-- cron.database_name, cron.use_background_workers or cron.host, whoever asks
-- (pg_cron makes them superuser-only to read); NULL without pg_cron (src/cron.c)
CREATE OR REPLACE FUNCTION fluxrate_internal.cron_setting(name text) RETURNS text
  LANGUAGE C STABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_cron_setting';

-- Can pg_cron run a job in this database as the current role (the role
-- cron.schedule records, and the jobs run as)?  Raises 55000 with the setting
-- to change when not; returns how the jobs will run.  Called by
-- schedule_jobs(), whose caller it checks.  It also lets fluxrate_system read
-- pg_cron's job list and run history (for health()): pg_cron may be installed
-- after fluxrate, and this is the first moment both exist.
CREATE OR REPLACE FUNCTION fluxrate_internal.check_cron() RETURNS text
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_user text := current_user;
  v_db text := current_database();
  v_cron_db text := fluxrate_internal.cron_setting('cron.database_name');
  v_host text;
  v_port text := current_setting('port');
  v_err text;
BEGIN
  -- pg_cron runs each job as the role that scheduled it; a role without LOGIN
  -- is refused both by a libpq login and, in PostgreSQL 15, by a background worker
  IF NOT (SELECT r.rolcanlogin FROM pg_roles r WHERE r.rolname = v_user) THEN
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = format('pg_cron cannot run jobs as role "%s": it has no LOGIN', v_user),
        DETAIL = 'pg_cron runs each job as the role that scheduled it.',
        HINT = format('Call fluxrate.schedule_jobs() as a role with LOGIN (not through SET ROLE %s), or ALTER ROLE %I LOGIN.', v_user, v_user);
  END IF;

  IF v_cron_db IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = 'pg_cron is not loaded',
        DETAIL = 'pg_cron starts its launcher only when the server preloads it.',
        HINT = 'Add pg_cron to shared_preload_libraries in postgresql.conf and restart the server.';
  END IF;
  IF v_cron_db IS DISTINCT FROM v_db THEN
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = format('pg_cron runs its jobs from database "%s", not "%s"', v_cron_db, v_db),
        HINT = format('Set cron.database_name = ''%s'' in postgresql.conf and restart the server.', v_db);
  END IF;
  -- the launcher restarts every second until cron.database_name exists: a
  -- database made just now may wait for it a moment (activity is read afresh)
  FOR i IN 1..20 LOOP
    EXIT WHEN EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.backend_type = 'pg_cron launcher');
    IF i = 20 THEN
      RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = 'the pg_cron launcher is not running',
        DETAIL = 'No process of backend_type "pg_cron launcher" in pg_stat_activity: nothing would start the jobs.',
        HINT = 'Check that shared_preload_libraries includes pg_cron and that max_worker_processes leaves a worker for it, then restart the server.';
    END IF;
    PERFORM pg_sleep(0.25);
    PERFORM pg_stat_clear_snapshot();
  END LOOP;
  IF fluxrate_internal.cron_setting('cron.use_background_workers') = 'on' THEN
    v_host := 'background workers (cron.use_background_workers = on)';
  ELSE
    v_host := fluxrate_internal.cron_setting('cron.host');
    v_err := fluxrate_internal.cron_connect_error();
    IF v_err IS NOT NULL THEN
      RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = format('pg_cron cannot log in to database "%s" as role "%s"', v_db, v_user),
        DETAIL = format('With cron.use_background_workers = off, pg_cron opens a libpq connection for each job '
               '(host=%s port=%s dbname=%s user=%s, no password) and it failed: %s', v_host, v_port, v_db, v_user, v_err),
        HINT = 'Set cron.use_background_workers = on in postgresql.conf and restart the server (jobs then run in background workers and need no login); '
        || format('or let that login succeed: a pg_hba.conf line for host %s that does not ask for a password, '
                  'or the role''s password in the .pgpass file of the operating-system user the server runs as.', v_host);
    END IF;
    v_host := format('libpq connections (host=%s port=%s)', v_host, v_port);
  END IF;

  -- what health() reads (fluxrate_system bypasses pg_cron's row-level security)
  BEGIN
    EXECUTE 'GRANT USAGE ON SCHEMA cron TO fluxrate_system';
    EXECUTE 'GRANT SELECT ON cron.job, cron.job_run_details TO fluxrate_system';
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'fluxrate: could not let fluxrate_system read pg_cron''s tables'
      USING HINT = 'fluxrate.health() reports the jobs once a superuser has called fluxrate.schedule_jobs().';
  END;
  RETURN v_host;
END
$$;

-- The jobs' one line (src/cron.c): what a run did and how long it took (from the start of
-- the statement that called it: for a job, pg_cron's command).  Written at LOG,
-- as autovacuum and the checkpointer write theirs: into the server log whoever
-- runs the job, and to a client only when it asks (SET client_min_messages =
-- log), so an application calling a job inside its own work gets no output.
-- The jobs call it only when they did something: an idle minute writes nothing
-- (pg_cron's own "cron job N completed" lines show that it ran).
CREATE OR REPLACE FUNCTION fluxrate_internal.job_log(job text, did text) RETURNS void
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_job_log';

-- The operator's view, across organizations.  One row per check:
--   area    clock | job | closing | finalizing | delivery | rollups
--   status  ok | warning | failing
--   count   what is counted (periods, invoices, deliveries, events; for a job,
--           its failed runs since its last success)
--   since   the time that matters (a job's last success; the oldest due item;
--           the last refresh)
-- "Due and not done" is measured on fluxrate.now(); pg_cron's history on the
-- wall clock (its own).  A backlog younger than 5 minutes is normal (the jobs
-- run every minute), older is a warning, older than an hour is failing.
-- In stages: the clock here, then each job (sys_health_jobs) and the backlogs
-- (sys_health_backlog), both below.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_health()
  RETURNS TABLE (area text, item text, status text, count bigint, since timestamptz, detail text)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  v_cron boolean := EXISTS (SELECT 1 FROM pg_extension e WHERE e.extname = 'pg_cron');
  v_readable boolean := false;
  v_host text;
BEGIN
  -- the clock --------------------------------------------------------------
  IF NOT v_cron THEN
    RETURN QUERY SELECT 'clock', 'pg_cron', 'warning', NULL::bigint, NULL::timestamptz,
      'pg_cron is not installed in this database: the jobs run only when something calls them';
  ELSE
    v_host := CASE WHEN fluxrate_internal.cron_setting('cron.use_background_workers') = 'off'
                   THEN fluxrate_internal.cron_setting('cron.host') END;
    v_readable := has_schema_privilege('cron', 'USAGE')
                  AND has_table_privilege('cron.job', 'SELECT') AND has_table_privilege('cron.job_run_details', 'SELECT');
    RETURN QUERY SELECT 'clock', 'pg_cron',
      CASE WHEN fluxrate_internal.cron_setting('cron.database_name') IS NULL THEN 'failing'
           WHEN v_readable THEN 'ok' ELSE 'warning' END, NULL::bigint, NULL::timestamptz,
      CASE WHEN fluxrate_internal.cron_setting('cron.database_name') IS NULL
           THEN 'pg_cron is installed but the server did not load it: nothing runs the jobs (shared_preload_libraries)'
           WHEN NOT v_readable THEN 'pg_cron''s tables are not readable by fluxrate_system: a superuser calls fluxrate.schedule_jobs()'
           WHEN v_host IS NULL THEN 'jobs run in background workers (cron.use_background_workers = on)'
           ELSE format('jobs log in over libpq (host=%s port=%s)', v_host, current_setting('port')) END;
  END IF;

  RETURN QUERY SELECT * FROM fluxrate_internal.sys_health_jobs(v_readable);
  RETURN QUERY SELECT * FROM fluxrate_internal.sys_health_backlog();
END
$$;

-- health(), each job: scheduled? last success? failing since when, and why?
-- (readable: pg_cron's tables can be read; sys_health() found out).  Called by
-- sys_health(), as fluxrate_system.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_health_jobs(readable boolean)
  RETURNS TABLE (area text, item text, status text, count bigint, since timestamptz, detail text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  j record;
  r record;
BEGIN
  IF readable THEN
    FOR j IN
      -- stale: how long without a success is worth a warning (the minute jobs, the daily purge)
      SELECT x.jobname, x.command, x.stale, c.jobid, c.active, c.schedule, c.username
        FROM (VALUES ('fluxrate-close-periods', 'close_due_periods', interval '5 minutes'),
                     ('fluxrate-finalize-invoices', 'finalize_due_invoices', interval '5 minutes'),
                     ('fluxrate-deliver', 'deliver_pending', interval '5 minutes'),
                     ('fluxrate-usage-rollups', 'refresh_usage_rollups', interval '5 minutes'),
                     -- partitions made ahead and retention: behind, events of a new month land in the default
                     ('fluxrate-event-storage', 'maintain_event_storage', interval '5 minutes'),
                     ('fluxrate-purge-deliveries', 'purge_deliveries', interval '25 hours')) x(jobname, command, stale)
        LEFT JOIN LATERAL (SELECT * FROM fluxrate_internal.cron_jobs() c WHERE c.jobname = x.jobname ORDER BY c.jobid LIMIT 1) c ON true
       ORDER BY x.jobname
    LOOP
      IF j.jobid IS NULL THEN
        RETURN QUERY SELECT 'job', j.jobname, 'failing', NULL::bigint, NULL::timestamptz,
          format('not scheduled: nothing calls %s(); SELECT fluxrate.schedule_jobs()', j.command);
        CONTINUE;
      END IF;
      SELECT * INTO r FROM fluxrate_internal.cron_job_runs(j.jobid);
      area := 'job'; item := j.jobname; count := r.failures; since := r.last_success;
      IF NOT j.active THEN
        status := 'warning';
        detail := format('scheduled but inactive (cron.alter_job(%s, active => true))', j.jobid);
      ELSIF r.last_status IS NULL THEN
        -- a daily job has not run yet for up to a day: that is no warning
        status := CASE WHEN j.stale > interval '1 hour' THEN 'ok' ELSE 'warning' END;
        detail := format('scheduled (%s, as %s), no run recorded yet', j.schedule, j.username);
      ELSIF r.last_status = 'failed' THEN
        status := 'failing';
        detail := CASE WHEN r.last_success IS NULL
                       THEN format('%s failed run%s and no success', r.failures, CASE WHEN r.failures = 1 THEN '' ELSE 's' END)
                       ELSE format('%s failed run%s since its last success at %s', r.failures,
                                   CASE WHEN r.failures = 1 THEN '' ELSE 's' END,
                                   to_char(r.last_success AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"')) END
                  -- (a run that could not connect has no start or end time)
                  || coalesce('; the last at ' || to_char(coalesce(r.last_end, r.last_start) AT TIME ZONE 'UTC',
                                                            'YYYY-MM-DD HH24:MI:SS" UTC"'), '; the last')
                  || ': ' || coalesce(r.last_message, '(no message)');
      ELSIF r.last_success < now() - j.stale THEN
        status := 'warning';
        detail := format('last run %s (%s), last success %s ago', r.last_status,
                         to_char(r.last_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"'),
                         date_trunc('second', now() - r.last_success));
      ELSE
        status := 'ok';
        detail := format('last run %s at %s', r.last_status, to_char(r.last_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"'));
      END IF;
      RETURN NEXT;
    END LOOP;
  END IF;
END
$$;

-- health(), the backlogs: closing, finalizing, delivery, rollups.  Called by
-- sys_health(), as fluxrate_system (every organization's rows).
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_health_backlog()
  RETURNS TABLE (area text, item text, status text, count bigint, since timestamptz, detail text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  v_now timestamptz := fluxrate.now();
  r record;
  v_n bigint;
  v_due bigint;
  v_t timestamptz;
  v_d text;
BEGIN
  -- closing ------------------------------------------------------------------
  SELECT count(*), min(s.current_period_end) INTO v_n, v_t FROM fluxrate_internal.subscriptions s
   WHERE s.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND s.current_period_end <= v_now AND s.close_error IS NULL;
  RETURN QUERY SELECT 'closing', 'periods due', fluxrate_internal.backlog_status(v_t, v_now), v_n, v_t,
    CASE WHEN v_n = 0 THEN 'no period has ended without being closed'
         ELSE format('%s subscription%s with an ended period not closed yet, the oldest ended %s', v_n,
                     CASE WHEN v_n = 1 THEN '' ELSE 's' END, to_char(v_t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"')) END;

  SELECT count(*), min((s.close_error->>'at')::timestamptz) INTO v_n, v_t FROM fluxrate_internal.subscriptions s
   WHERE s.close_error IS NOT NULL;
  SELECT format('subscription %s of organization %s: %s: %s (attempt %s, next try %s)', s.id, s.org_id,
                s.close_error->>'sqlstate', s.close_error->>'message', s.close_error->>'attempts',
                to_char(s.close_retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"'))
    INTO v_d FROM fluxrate_internal.subscriptions s WHERE s.close_error IS NOT NULL
   ORDER BY (s.close_error->>'at')::timestamptz DESC, s.org_id, s.id LIMIT 1;
  RETURN QUERY SELECT 'closing', 'set aside', CASE WHEN v_n = 0 THEN 'ok' ELSE 'failing' END, v_n, v_t,
    coalesce(CASE WHEN v_n > 1 THEN format('%s subscriptions could not be closed; the latest: ', v_n) ELSE '' END || v_d,
             'no subscription set aside with a closing error');

  -- finalizing ---------------------------------------------------------------
  SELECT count(*), min(i.scheduled_finalize_at) INTO v_n, v_t FROM fluxrate_internal.invoices i
   WHERE i.status = 'DRAFT' AND i.scheduled_finalize_at <= v_now AND NOT i.meta_data ? 'finalize_error';
  RETURN QUERY SELECT 'finalizing', 'drafts past grace', fluxrate_internal.backlog_status(v_t, v_now), v_n, v_t,
    CASE WHEN v_n = 0 THEN 'no draft waits past its grace period'
         ELSE format('%s draft%s past the grace period, the oldest due for finalizing since %s', v_n,
                     CASE WHEN v_n = 1 THEN '' ELSE 's' END, to_char(v_t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"')) END;

  SELECT count(*), min((i.meta_data->'finalize_error'->>'at')::timestamptz) INTO v_n, v_t FROM fluxrate_internal.invoices i
   WHERE i.status = 'DRAFT' AND i.meta_data ? 'finalize_error';
  SELECT format('invoice %s of organization %s: %s: %s (attempt %s, next try %s)', i.id, i.org_id,
                i.meta_data->'finalize_error'->>'sqlstate', i.meta_data->'finalize_error'->>'message',
                i.meta_data->'finalize_error'->>'attempts',
                to_char(i.scheduled_finalize_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"'))
    INTO v_d FROM fluxrate_internal.invoices i WHERE i.status = 'DRAFT' AND i.meta_data ? 'finalize_error'
   ORDER BY (i.meta_data->'finalize_error'->>'at')::timestamptz DESC, i.org_id, i.id LIMIT 1;
  RETURN QUERY SELECT 'finalizing', 'set aside', CASE WHEN v_n = 0 THEN 'ok' ELSE 'failing' END, v_n, v_t,
    coalesce(CASE WHEN v_n > 1 THEN format('%s invoices could not be finalized; the latest: ', v_n) ELSE '' END || v_d,
             'no draft set aside with a finalizing error');

  -- delivery -----------------------------------------------------------------
  SELECT count(*), min(d.next_attempt_at) FILTER (WHERE d.next_attempt_at <= v_now),
         count(*) FILTER (WHERE d.next_attempt_at <= v_now)
    INTO v_n, v_t, v_due FROM fluxrate_internal.deliveries d WHERE d.status = 'PENDING';
  RETURN QUERY SELECT 'delivery', 'pending', fluxrate_internal.backlog_status(v_t, v_now), v_n, v_t,
    CASE WHEN v_n = 0 THEN 'nothing to send'
         ELSE format('%s deliver%s pending (retries included), %s due now', v_n, CASE WHEN v_n = 1 THEN 'y' ELSE 'ies' END, v_due) END;

  SELECT count(*), max(d.updated_at) INTO v_n, v_t FROM fluxrate_internal.deliveries d WHERE d.status = 'FAILED';
  SELECT format('delivery %s (%s to %s) of organization %s: %s', d.id, d.channel, d.recipient, d.org_id, d.last_error)
    INTO v_d FROM fluxrate_internal.deliveries d WHERE d.status = 'FAILED' ORDER BY d.updated_at DESC, d.org_id, d.id LIMIT 1;
  RETURN QUERY SELECT 'delivery', 'failed', CASE WHEN v_n = 0 THEN 'ok' ELSE 'warning' END, v_n, v_t,
    coalesce(format('%s deliver%s gave up (retry_delivery(id) sends again); the latest: ', v_n,
                    CASE WHEN v_n = 1 THEN 'y' ELSE 'ies' END) || v_d, 'no failed delivery');

  -- skipped e-mails of the last 7 days (an organization without SMTP skips every one, forever)
  SELECT count(*), max(d.updated_at) INTO v_n, v_t FROM fluxrate_internal.deliveries d
   WHERE d.status = 'SKIPPED' AND d.updated_at > v_now - interval '7 days';
  SELECT string_agg(format('%s: %s', g.n, g.last_error), '; ' ORDER BY g.n DESC, g.last_error) INTO v_d
    FROM (SELECT d.last_error, count(*) AS n FROM fluxrate_internal.deliveries d
           WHERE d.status = 'SKIPPED' AND d.updated_at > v_now - interval '7 days' GROUP BY d.last_error) g;
  RETURN QUERY SELECT 'delivery', 'skipped', CASE WHEN v_n = 0 THEN 'ok' ELSE 'warning' END, v_n, v_t,
    CASE WHEN v_n = 0 THEN 'no invoice e-mail skipped in the last 7 days'
         ELSE format('invoice e-mails not sent in the last 7 days (%s)', v_d) END;

  -- rollups ------------------------------------------------------------------
  SELECT st.refreshed_at, st.snapshot,
         st.snapshot IS NOT NULL AND st.system_identifier = fluxrate_internal.system_identifier() AS usable
    INTO r FROM fluxrate_internal.usage_rollup_state st;
  IF NOT r.usable THEN
    RETURN QUERY SELECT 'rollups', 'lag',
      CASE WHEN EXISTS (SELECT 1 FROM fluxrate_internal.usage_events e) THEN 'warning' ELSE 'ok' END, NULL::bigint, r.refreshed_at,
      'the usage rollups have no state for this cluster yet: the next refresh_usage_rollups() counts every event';
  ELSE
    -- the events not rolled up yet: the readers' tail (BRIN on xact_id from the snapshot's xmin)
    SELECT count(*) INTO v_n FROM fluxrate_internal.usage_events e
     WHERE e.xact_id >= txid_snapshot_xmin(r.snapshot) AND NOT txid_visible_in_snapshot(e.xact_id, r.snapshot);
    RETURN QUERY SELECT 'rollups', 'lag',
      CASE WHEN r.refreshed_at < v_now - interval '1 hour' AND v_n > 0 THEN 'failing'
           WHEN r.refreshed_at < v_now - interval '5 minutes' AND v_n > 0 THEN 'warning' ELSE 'ok' END,
      v_n, r.refreshed_at,
      format('%s event%s not rolled up yet; last refresh %s', v_n, CASE WHEN v_n = 1 THEN '' ELSE 's' END,
             to_char(r.refreshed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS" UTC"'));
  END IF;
END
$$;

-- ok below 5 minutes of backlog, warning below an hour, failing beyond
CREATE OR REPLACE FUNCTION fluxrate_internal.backlog_status(oldest timestamptz, now timestamptz) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT CASE WHEN oldest IS NULL OR oldest > now - interval '5 minutes' THEN 'ok'
              WHEN oldest > now - interval '1 hour' THEN 'warning' ELSE 'failing' END
$$;

-- pg_cron's tables through dynamic SQL: they may not exist (pg_cron is a soft
-- dependency), and a function naming them would not even be created.  Run
-- inside sys_health(), as fluxrate_system.
CREATE OR REPLACE FUNCTION fluxrate_internal.cron_jobs()
  RETURNS TABLE (jobid bigint, jobname text, schedule text, username text, active boolean)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  RETURN QUERY EXECUTE 'SELECT j.jobid, j.jobname::text, j.schedule, j.username, j.active FROM cron.job j '
                       'WHERE j.jobname LIKE ''fluxrate-%''';
END
$$;

-- One job's history, newest first by runid (the primary key: a backward scan
-- reaches the recent runs at once however long the history grows; failures
-- are counted over at most 10,000 runs).
CREATE OR REPLACE FUNCTION fluxrate_internal.cron_job_runs(jobid bigint,
    OUT last_status text, OUT last_start timestamptz, OUT last_end timestamptz, OUT last_message text,
    OUT last_success timestamptz, OUT failures bigint)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_success_run bigint;
BEGIN
  EXECUTE 'SELECT d.status, d.start_time, d.end_time, d.return_message FROM cron.job_run_details d
            WHERE d.jobid = $1 AND d.status IN (''succeeded'', ''failed'') ORDER BY d.runid DESC LIMIT 1'
    INTO last_status, last_start, last_end, last_message USING jobid;
  EXECUTE 'SELECT d.runid, d.end_time FROM cron.job_run_details d
            WHERE d.jobid = $1 AND d.status = ''succeeded'' ORDER BY d.runid DESC LIMIT 1'
    INTO v_success_run, last_success USING jobid;
  EXECUTE 'SELECT count(*) FROM (SELECT 1 FROM cron.job_run_details d
            WHERE d.jobid = $1 AND d.status = ''failed'' AND d.runid > $2 ORDER BY d.runid DESC LIMIT 10000) f'
    INTO failures USING jobid, coalesce(v_success_run, 0);
END
$$;

-- The operator's entry: members of fluxrate_operator and superusers.  An
-- invoker function in front of the definer one, so the check sees the caller.
CREATE OR REPLACE FUNCTION fluxrate.health()
  RETURNS TABLE (area text, item text, status text, count bigint, since timestamptz, detail text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF NOT pg_has_role(current_user, 'fluxrate_operator', 'USAGE') THEN
    RAISE EXCEPTION USING ERRCODE = '42501',
        MESSAGE = 'permission denied for fluxrate.health()',
        DETAIL = 'health() reports on every organization; it is for operators, not tenants.',
        HINT = 'GRANT fluxrate_operator TO the operator''s role.';
  END IF;
  RETURN QUERY SELECT * FROM fluxrate_internal.sys_health();
END
$$;
COMMENT ON FUNCTION fluxrate.health() IS
  'the operator''s view: jobs, what is due and not done, what was set aside and why, delivery, rollup lag (fluxrate_operator)';

CREATE OR REPLACE VIEW fluxrate.health AS SELECT * FROM fluxrate.health();
COMMENT ON VIEW fluxrate.health IS 'SELECT * FROM fluxrate.health WHERE status <> ''ok'': what needs an operator';

-- DROP EXTENSION fluxrate unschedules the jobs first (src/cron.c says why in C)
CREATE OR REPLACE FUNCTION fluxrate_internal.drop_extension_guard() RETURNS event_trigger
  LANGUAGE C
  AS 'MODULE_PATHNAME', 'fr_drop_extension_guard';

CREATE OR REPLACE FUNCTION fluxrate_internal.before_drop_extension() RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer := fluxrate.unschedule_jobs();
BEGIN
  IF n > 0 THEN
    RAISE NOTICE 'fluxrate: unscheduled its % pg_cron jobs', n;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'cron') THEN
    BEGIN
      EXECUTE 'REVOKE ALL ON cron.job, cron.job_run_details FROM fluxrate_system';
      EXECUTE 'REVOKE ALL ON SCHEMA cron FROM fluxrate_system';
    EXCEPTION WHEN insufficient_privilege OR undefined_table THEN
      NULL;   -- not granted by us, or not ours to revoke: nothing to undo
    END;
  END IF;
END
$$;

-- who may call what: the operator reads health(); nobody else
GRANT USAGE ON SCHEMA fluxrate, fluxrate_internal TO fluxrate_operator;
GRANT EXECUTE ON FUNCTION fluxrate.health(), fluxrate_internal.sys_health() TO fluxrate_operator;
GRANT SELECT ON fluxrate.health TO fluxrate_operator;

-- (CREATE EVENT TRIGGER is not replayable: the upgrade from 0.1.0 creates it in
-- src/sql/upgrade/0.1.0--0.2.0.sql)
CREATE EVENT TRIGGER fluxrate_drop_extension ON ddl_command_start
  WHEN TAG IN ('DROP EXTENSION')
  EXECUTE FUNCTION fluxrate_internal.drop_extension_guard();
-- the trusted application role runs the jobs and schedule_jobs() (99_security.sql): these run as their caller
GRANT EXECUTE ON FUNCTION fluxrate_internal.check_cron(), fluxrate_internal.cron_connect_error(), fluxrate_internal.job_log(text, text),
  fluxrate_internal.cron_setting(text) TO fluxrate_app;
