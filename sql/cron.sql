-- pg_cron really runs the closing, finalization, delivery and usage-rollup jobs inside this instance
-- (cron.use_background_workers = on; minute granularity, so this waits up to
-- about a minute and a half).  The cron worker's session reads the clock pinned
-- for the database.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Cron Co', grace_period => '0'))->>'id' AS org \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_plan('Flat', 'flat', 'FIXED', 'month', 'EUR'))->>'id' AS plan \gset
SELECT (fluxrate.add_charge(:'plan', 'FIXED', unit_price => 12.34))->>'status' AS charge;
SELECT (fluxrate.create_customer('Cron customer', 'cron@example.com'))->>'id' AS cust \gset
SELECT (fluxrate.create_subscription(:'cust', :'plan', start_date => '2026-01-01 00:00+00'))->>'status' AS status;
RESET fluxrate.acting_org;

-- the period [Jan 1, Feb 1) is due at the pinned time the worker will see
ALTER DATABASE contrib_regression SET fluxrate.pinned_now = '2026-02-01 00:05:00+00';
SELECT jsonb_object_keys(fluxrate.schedule_jobs()) AS job ORDER BY 1;
SELECT jobname, schedule, command FROM cron.job WHERE jobname LIKE 'fluxrate-%' ORDER BY jobname;

-- wait (bounded) until the worker has closed and finalized the period
DO $$
BEGIN
  FOR i IN 1..150 LOOP
    EXIT WHEN (SELECT count(*) FROM fluxrate_internal.invoices WHERE status = 'OPEN' AND total = 12.34 AND currency = 'EUR') = 2
          AND (SELECT count(DISTINCT j.jobname) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                WHERE j.jobname LIKE 'fluxrate-%' AND d.status = 'succeeded') = 5;
    PERFORM pg_sleep(1);
  END LOOP;
END
$$;
-- finalized by the jobs (grace period 0): the opening invoice (January's fee, in
-- advance, created with the subscription) and the one the close job wrote for the
-- January period (February's fee, in advance): 12.34 EUR each
SELECT i.kind, i.status, i.total, i.currency, i.period_start, i.period_end, l.period_start AS fee_from, l.period_end AS fee_to
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' ORDER BY l.period_start;
SELECT string_agg(invoice_number, ', ' ORDER BY invoice_number) AS numbers FROM fluxrate_internal.invoices WHERE org_id = :'org';
-- each of the five every-minute jobs ran and succeeded (what delivery does: sql/delivery.sql, test/scripts/delivery.sh)
SELECT j.jobname, bool_or(d.status = 'succeeded') AS ran_ok FROM cron.job j JOIN cron.job_run_details d USING (jobid)
 WHERE j.jobname LIKE 'fluxrate-%' GROUP BY j.jobname ORDER BY 1;
SELECT fluxrate.unschedule_jobs() AS unscheduled;
ALTER DATABASE contrib_regression RESET fluxrate.pinned_now;
