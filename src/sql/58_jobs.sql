-- 58_jobs.sql: the jobs and their schedule.
--   close_due_periods(), finalize_due_invoices(), mark_past_due()
--                           the invoker procedures the scheduler calls; each batch
--                           commits (52_close.sql, 53_finalize.sql do the work)
--   schedule_jobs(), unschedule_jobs()   the pg_cron jobs
--   the grants that let the trusted application role run the jobs

-- The jobs.  Invoker procedures (a SECURITY DEFINER procedure may not COMMIT):
-- each batch commits, so a long catch-up makes progress and a killed run loses
-- at most one batch, which the next run redoes.  Closing batches of 2,000
-- (~0.2 s each): a batch's fixed costs -- the claim, planning its two big
-- statements, the commit -- were ~15% of a run in batches of 500 (10,000
-- subscriptions: 1.26-1.35 s against 1.09-1.13 s).
CREATE PROCEDURE fluxrate.close_due_periods(batch_size integer DEFAULT 2000)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
  v_closed bigint := 0;
BEGIN
  -- a new run: nothing left from an earlier run of this session that failed
  -- (the snapshot, the per-subscription counts of the catch-up cap)
  PERFORM fluxrate_internal.sys_close_finish();
  -- the usage of the periods many subscriptions end together, in one pass each
  -- (an optimization: if it fails, the batches compute usage pair by pair)
  BEGIN
    PERFORM fluxrate_internal.sys_close_prepare();
  EXCEPTION WHEN OTHERS THEN
    IF fluxrate_internal.transient_error(SQLSTATE) THEN
      RAISE;
    END IF;
    RAISE WARNING 'fluxrate: the closing run''s usage snapshot failed; closing without it'
      USING DETAIL = format('%s: %s', SQLSTATE, SQLERRM);
  END;
  COMMIT;
  LOOP
    BEGIN
      n := fluxrate_internal.sys_close_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- a subscription of this batch cannot be closed: close them one by one.
      -- (Transient errors, a deadlock or a full disk, end the run instead: the next
      -- run retries everything, and no subscription is marked for them.)
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_close_isolated(batch_size);
    END;
    EXIT WHEN n = 0;
    v_closed := v_closed + n;
    COMMIT;
  END LOOP;
  PERFORM fluxrate_internal.sys_close_finish();
  PERFORM fluxrate_internal.sys_mark_past_due();
  IF v_closed > 0 THEN
    PERFORM fluxrate_internal.job_log('close_due_periods', format('closed %s period%s', v_closed, CASE WHEN v_closed = 1 THEN '' ELSE 's' END));
  END IF;
  COMMIT;
END
$$;

-- The finalizing job also keeps the wallets (59_wallets.sql): first the grants
-- whose expires_at has passed are recorded as expired (consumption never takes
-- from them after that instant, so the order is for the record only), last the
-- low-balance alerts are checked against the burn-down balance.
CREATE PROCEDURE fluxrate.finalize_due_invoices(batch_size integer DEFAULT 500)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
  v_done bigint := 0;
  v_expired bigint := 0;
BEGIN
  LOOP
    n := fluxrate_internal.sys_expire_grants(1000);
    EXIT WHEN n = 0;
    v_expired := v_expired + n;
    COMMIT;
  END LOOP;
  LOOP
    BEGIN
      n := fluxrate_internal.sys_finalize_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- an invoice of this batch cannot be finalized: finalize them one by one
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_finalize_batch(batch_size, isolated => true);
    END;
    EXIT WHEN n = 0;
    v_done := v_done + n;
    COMMIT;
  END LOOP;
  PERFORM fluxrate_internal.sys_wallet_alerts();
  IF v_done > 0 THEN
    PERFORM fluxrate_internal.job_log('finalize_due_invoices', format('finalized %s invoice%s', v_done, CASE WHEN v_done = 1 THEN '' ELSE 's' END));
  END IF;
  IF v_expired > 0 THEN
    PERFORM fluxrate_internal.job_log('finalize_due_invoices', format('expired %s credit grant%s', v_expired, CASE WHEN v_expired = 1 THEN '' ELSE 's' END));
  END IF;
END
$$;

CREATE PROCEDURE fluxrate.mark_past_due()
  LANGUAGE plpgsql
  AS $$
BEGIN
  PERFORM fluxrate_internal.sys_mark_past_due();
END
$$;

-- pg_cron ---------------------------------------------------------------------------

-- Schedule the jobs every minute (pg_cron 1.4.2: minute granularity, UTC) when
-- pg_cron is installed; the jobs only call the procedures.
CREATE FUNCTION fluxrate.schedule_jobs() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_close bigint;
  v_final bigint;
  v_deliver bigint;
  v_rollups bigint;
  v_purge bigint;
  v_storage bigint;
BEGIN
  -- roles that can claim to be any organization (docs/security.md, "Roles")
  PERFORM fluxrate_internal.warn_role_grants();
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    PERFORM fluxrate_internal.fail('PT409', 'pg_cron is not installed',
      'fluxrate.close_due_periods() and fluxrate.finalize_due_invoices() can be called from any scheduler.',
      'CREATE EXTENSION pg_cron, with pg_cron in shared_preload_libraries.');
  END IF;
  -- refuse jobs that could not log in (55000, the setting in the hint): 90_health.sql
  PERFORM fluxrate_internal.check_cron();
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_close
    USING 'fluxrate-close-periods', '* * * * *', 'CALL fluxrate.close_due_periods()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_final
    USING 'fluxrate-finalize-invoices', '* * * * *', 'CALL fluxrate.finalize_due_invoices()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_deliver
    USING 'fluxrate-deliver', '* * * * *', 'CALL fluxrate.deliver_pending()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_rollups
    USING 'fluxrate-usage-rollups', '* * * * *', 'SELECT fluxrate.refresh_usage_rollups()';
  -- usage_events partitions made ahead, and retention (32_partitions.sql)
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_storage
    USING 'fluxrate-event-storage', '* * * * *', 'SELECT fluxrate.maintain_event_storage()';
  -- the delivery log's retention (70_delivery.sql), once a day
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_purge
    USING 'fluxrate-purge-deliveries', '17 3 * * *', 'CALL fluxrate.purge_deliveries()';
  RETURN jsonb_build_object('close_due_periods', v_close, 'finalize_due_invoices', v_final,
                            'deliver_pending', v_deliver, 'refresh_usage_rollups', v_rollups,
                            'purge_deliveries', v_purge, 'maintain_event_storage', v_storage);
END
$$;

CREATE FUNCTION fluxrate.unschedule_jobs() RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer := 0;
  j record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    RETURN 0;
  END IF;
  FOR j IN EXECUTE 'SELECT jobid FROM cron.job WHERE jobname LIKE ''fluxrate-%''' LOOP
    EXECUTE 'SELECT cron.unschedule($1)' USING j.jobid;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- the trusted application role runs the jobs (the procedures call these)
GRANT USAGE ON SCHEMA fluxrate_internal TO fluxrate_app;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_close_batch(integer, uuid), fluxrate_internal.sys_close_isolated(integer),
  fluxrate_internal.sys_finalize_batch(integer, boolean),
  fluxrate_internal.sys_close_prepare(numeric), fluxrate_internal.sys_close_finish(), fluxrate_internal.sys_close_tables(),
  fluxrate_internal.sys_close_claim(integer, uuid), fluxrate_internal.sys_close_account(fluxrate_internal.subscriptions[]),
  fluxrate_internal.sys_mark_past_due(), fluxrate_internal.transient_error(text),
  fluxrate_internal.sys_refresh_rollups(boolean) TO fluxrate_app;
-- (the wallet jobs' functions are granted in 59_wallets.sql, where they are made)
