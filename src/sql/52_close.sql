-- 52_close.sql: the closer, which turns every period that has ended into a DRAFT
-- invoice and advances the subscription.
--   sys_close_tables(), sys_close_finish()   the run's usage snapshot (temp tables)
--   period_event_share(), sys_close_prepare()   filling the snapshot, one pass per
--                                            period many subscriptions end together
--   analyze_if_outgrown(), analyze_invoices_if_outgrown()   fresh statistics
--                                            during a run
--   sys_close_batch()          the set-based closer of up to batch_size subscriptions,
--                              top-down in stages: sys_close_claim() (fair across
--                              organizations, with close_periods_per_run() and
--                              sys_close_account()), sys_close_trials(),
--                              sys_close_usage(), then one
--                              statement, close_statement(): close_sql_periods(), the lines
--                              (close_sql_charge_lines(), _late_lines(), _minimum(),
--                              _lines()), close_sql_invoices(), _advance(), _outbox()
--   transient_error(), retry_delay(), sys_close_isolated()   a failed batch is
--                                            retried one subscription at a time
-- The job that drives it (close_due_periods) is in 58_jobs.sql; the reference
-- computation of a draft's lines (fill_lines) in 50_periods.sql.
-- Over 800 lines on purpose: it is one concept, read top-down -- the run's
-- snapshot and the fair claim that sys_close_batch uses, then sys_close_batch
-- and its stages in their order, then the fallback -- and a third of it is
-- the closing statement, whose parts are only meaningful next to each other.

-- The usage snapshot of a closer run.  When many subscriptions of one
-- organization end the same period (calendar billing: everyone on the 1st), the
-- usage of all their (customer, meter) pairs is computed up front in ONE pass
-- over the period's events per aggregation -- the plain, parallel GROUP BY --
-- instead of one index range scan per pair in every batch.  The sums go to two
-- temporary tables of the session: fr_close_scope says which (organization,
-- meter, period) the snapshot covers (a pair of it with no row has no usage: 0),
-- fr_close_usage holds the values.  sys_close_batch() takes a covered pair's
-- usage from there and computes the others itself.
--
-- A snapshot taken at the start of a run is safe: the invoices it feeds are
-- DRAFTs, and every draft is recomputed from the events when it is finalized
-- after the grace period, so an event that arrives during the run is billed.
-- Only SUM, COUNT, MAX, MIN and AVG meters without filters are snapshotted;
-- the others always go through meter_usage().
CREATE FUNCTION fluxrate_internal.sys_close_tables() RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF pg_catalog.to_regclass('pg_temp.fr_close_usage') IS NULL THEN
    CREATE TEMPORARY TABLE fr_close_scope (org_id uuid, meter_id uuid, period_start timestamptz, period_end timestamptz,
      PRIMARY KEY (org_id, meter_id, period_start, period_end));
    CREATE TEMPORARY TABLE fr_close_usage (org_id uuid, customer_id uuid, meter_id uuid, period_start timestamptz,
      period_end timestamptz, usage numeric NOT NULL,
      PRIMARY KEY (org_id, customer_id, meter_id, period_start, period_end));
  END IF;
  -- the same for the grouped charges' meters: usage by group ({value: usage},
  -- 24_dimensions.sql), from the rollups keyed by group (org_period_group_usage)
  IF pg_catalog.to_regclass('pg_temp.fr_close_group_usage') IS NULL THEN
    CREATE TEMPORARY TABLE fr_close_group_scope (org_id uuid, meter_id uuid, period_start timestamptz, period_end timestamptz,
      PRIMARY KEY (org_id, meter_id, period_start, period_end));
    CREATE TEMPORARY TABLE fr_close_group_usage (org_id uuid, customer_id uuid, meter_id uuid, period_start timestamptz,
      period_end timestamptz, groups jsonb NOT NULL,
      PRIMARY KEY (org_id, customer_id, meter_id, period_start, period_end));
  END IF;
  -- how many periods of each subscription this run has closed (the catch-up
  -- cap, sys_close_claim)
  IF pg_catalog.to_regclass('pg_temp.fr_close_run') IS NULL THEN
    CREATE TEMPORARY TABLE fr_close_run (org_id uuid, id uuid, n integer NOT NULL, PRIMARY KEY (org_id, id));
  END IF;
END
$$;

-- The end of a run: the snapshot is dropped, so that a later sys_close_batch()
-- in this session computes its usage from the events.
CREATE FUNCTION fluxrate_internal.sys_close_finish() RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF pg_catalog.to_regclass('pg_temp.fr_close_usage') IS NOT NULL THEN
    TRUNCATE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
  END IF;
  IF pg_catalog.to_regclass('pg_temp.fr_close_group_usage') IS NOT NULL THEN
    TRUNCATE pg_temp.fr_close_group_scope, pg_temp.fr_close_group_usage;
  END IF;
  IF pg_catalog.to_regclass('pg_temp.fr_close_run') IS NOT NULL THEN
    TRUNCATE pg_temp.fr_close_run;
  END IF;
END
$$;

-- Job fairness (docs/security.md): at most this many periods of one
-- subscription per closing run; the rest follow in the next runs (pg_cron:
-- every minute).  A backfill of 120 periods takes 10 runs instead of one run
-- that holds every other organization's closing behind it.
CREATE FUNCTION fluxrate_internal.close_periods_per_run() RETURNS integer
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 12 $$;

-- The subscriptions a closing batch claims, locked (SKIP LOCKED: concurrent
-- closers split the work), in due order.  Fair across organizations: each
-- organization with something due gets at most ceil(batch_size / organizations
-- due) places, its earliest-due first, the organizations that waited longest
-- first; one tenant's thousands of due subscriptions no longer fill every batch
-- ahead of the others.  A subscription that has closed close_periods_per_run()
-- periods in this run (fr_close_run) waits for the next run.  only_id: that
-- subscription alone (if it is due).  Needs sys_close_tables().
CREATE FUNCTION fluxrate_internal.sys_close_claim(batch_size integer, only_id uuid DEFAULT NULL)
  RETURNS fluxrate_internal.subscriptions[]
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_cap integer := fluxrate_internal.close_periods_per_run();
  v_orgs uuid[];
  v_share integer;
BEGIN
  IF only_id IS NOT NULL THEN
    RETURN ARRAY(
      SELECT x FROM fluxrate_internal.subscriptions x
       WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
         AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now) AND x.id = only_id
         AND NOT EXISTS (SELECT 1 FROM pg_temp.fr_close_run r WHERE r.org_id = x.org_id AND r.id = x.id AND r.n >= v_cap)
       FOR UPDATE SKIP LOCKED);
  END IF;
  v_orgs := ARRAY(
    SELECT d.org_id FROM (
      SELECT x.org_id, min(x.current_period_end) AS first_end FROM fluxrate_internal.subscriptions x
       WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
         AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
         AND NOT EXISTS (SELECT 1 FROM pg_temp.fr_close_run r WHERE r.org_id = x.org_id AND r.id = x.id AND r.n >= v_cap)
       GROUP BY x.org_id) d
     ORDER BY d.first_end, d.org_id
     LIMIT batch_size);
  IF cardinality(v_orgs) = 0 THEN
    RETURN '{}'::fluxrate_internal.subscriptions[];
  END IF;
  v_share := ceil(batch_size::numeric / cardinality(v_orgs))::integer;
  RETURN ARRAY(
    SELECT c.s FROM unnest(v_orgs) o(org_id)
     CROSS JOIN LATERAL (
       SELECT x AS s, x.current_period_end AS pe, x.id FROM fluxrate_internal.subscriptions x
        WHERE x.org_id = o.org_id AND x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
          AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
          AND NOT EXISTS (SELECT 1 FROM pg_temp.fr_close_run r WHERE r.org_id = x.org_id AND r.id = x.id AND r.n >= v_cap)
        ORDER BY x.current_period_end, x.id
        LIMIT v_share
        FOR UPDATE OF x SKIP LOCKED) c
     ORDER BY c.pe, o.org_id, c.id);
END
$$;

-- After a batch, for the claimed subscriptions that are still due (none, in
-- the common case: a close moves the period past now): the run's count of
-- each, for the catch-up cap; and one that is due with the same period end --
-- it advanced nothing (an infinite start from before the bounds, a bug) and
-- would be claimed again by every batch -- set aside with its error, as a
-- failed close.  Returns how many were set aside.
CREATE FUNCTION fluxrate_internal.sys_close_account(batch fluxrate_internal.subscriptions[]) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  r record;
  n integer := 0;
BEGIN
  FOR r IN
    SELECT x.org_id, x.id, x.current_period_end, b.current_period_end AS old_end,
           coalesce((x.close_error->>'attempts')::integer, 0) + 1 AS attempts
      FROM unnest(batch) b
      JOIN fluxrate_internal.subscriptions x ON x.org_id = b.org_id AND x.id = b.id
     WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
  LOOP
    IF r.current_period_end <= r.old_end THEN
      UPDATE fluxrate_internal.subscriptions x
         SET close_retry_at = v_now + fluxrate_internal.retry_delay(r.attempts),
             close_error = jsonb_build_object('sqlstate', 'PT500', 'message', 'the period did not advance',
                                              'at', v_now, 'attempts', r.attempts, 'period_end', r.old_end)
       WHERE x.org_id = r.org_id AND x.id = r.id;
      RAISE WARNING 'fluxrate: subscription % was set aside: its period did not advance', r.id
        USING DETAIL = format('Its period end stays %s.', r.current_period_end),
              HINT = 'The other subscriptions were closed; this one is retried later (close_error on the subscription).';
      n := n + 1;
    ELSE
      INSERT INTO pg_temp.fr_close_run AS c (org_id, id, n) VALUES (r.org_id, r.id, 1)
      ON CONFLICT (org_id, id) DO UPDATE SET n = c.n + 1;
    END IF;
  END LOOP;
  RETURN n;
END
$$;

-- The planner's estimate of the share of an organization's events that fall
-- in [period_start, period_end): what a pass over the organization would read
-- for nothing.  (EXPLAIN of literals: estimates, no scan.)
CREATE FUNCTION fluxrate_internal.period_event_share(org_id uuid, period_start timestamptz, period_end timestamptz)
  RETURNS numeric
  LANGUAGE plpgsql VOLATILE  -- (PostgreSQL allows EXPLAIN in volatile functions only)
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p json;
  v_org numeric;
  v_period numeric;
BEGIN
  EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM fluxrate_internal.usage_events e WHERE e.org_id = %L', org_id) INTO p;
  v_org := (p->0->'Plan'->>'Plan Rows')::numeric;
  EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM fluxrate_internal.usage_events e
                   WHERE e.org_id = %L AND e."timestamp" >= %L AND e."timestamp" < %L', org_id, period_start, period_end) INTO p;
  v_period := (p->0->'Plan'->>'Plan Rows')::numeric;
  RETURN least(1, v_period / greatest(v_org, 1));
END
$$;

-- Fill the snapshot for the periods that are due now.  A period of whole UTC
-- days is read from the usage rollups (41_rollups.sql) and the events not yet
-- rolled up.  Otherwise one pass over an
-- organization's period reads every event of the organization the plan visits
-- (~0.1-0.3 µs each, in parallel); the per-pair scans read only the due pairs'
-- events of the period (~0.6 µs each).  So a group (organization, period) is
-- snapshotted when (its due customers / the organization's subscribed
-- customers) x (the share of the organization's events in the period, as the
-- planner estimates it) reaches min_benefit: calendar billing of a young
-- organization, yes; anniversary billing (a thirtieth of the customers a day)
-- or a period that is one month of years of history, no.  min_benefit 0 takes
-- every group.  Returns the number of (organization, meter, period) covered.
CREATE FUNCTION fluxrate_internal.sys_close_prepare(min_benefit numeric DEFAULT 0.2) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  g record;
  v_rows bigint := 0;
  v_n bigint;
  v_key text := '';
  v_share numeric;
  v_meters uuid[];
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  TRUNCATE pg_temp.fr_close_scope, pg_temp.fr_close_usage, pg_temp.fr_close_group_scope, pg_temp.fr_close_group_usage;
  FOR g IN
    SELECT d.org_id, d.ps, d.pe, d.n::numeric / greatest(d.subscribed, 1) AS customer_share,
           mt.aggregation_type AS agg, array_agg(DISTINCT mt.id) AS meters
      FROM (SELECT x.org_id, x.current_period_start AS ps, x.current_period_end AS pe,
                   array_agg(DISTINCT x.plan_id) AS plans, count(DISTINCT x.customer_id) AS n,
                   (SELECT count(DISTINCT l.customer_id) FROM fluxrate_internal.subscriptions l
                     WHERE l.org_id = x.org_id AND l.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')) AS subscribed
              FROM fluxrate_internal.subscriptions x
             WHERE x.status IN ('ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
             GROUP BY 1, 2, 3) d
      JOIN fluxrate_internal.charges c ON c.org_id = d.org_id AND c.plan_id = ANY (d.plans)
           AND c.type = 'USAGE' AND c.status = 'ACTIVE'
      JOIN fluxrate_internal.meters mt ON mt.org_id = c.org_id AND mt.id = c.meter_id
           AND mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
     WHERE d.n >= min_benefit * d.subscribed   -- (the event share is at most 1)
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3
  LOOP
    IF v_key <> g.org_id::text || g.ps::text || g.pe::text THEN
      v_key := g.org_id::text || g.ps::text || g.pe::text;
      -- read from the rollups, a period costs its own rows only: no events of
      -- other periods are read for nothing
      v_share := CASE WHEN min_benefit <= 0 THEN 1
                      WHEN fluxrate_internal.whole_utc_days(g.ps, g.pe) AND fluxrate_internal.rollup_snapshot() IS NOT NULL THEN 1
                      ELSE fluxrate_internal.period_event_share(g.org_id, g.ps, g.pe) END;
    END IF;
    CONTINUE WHEN g.customer_share * v_share < min_benefit;
    INSERT INTO pg_temp.fr_close_scope (org_id, meter_id, period_start, period_end)
    SELECT g.org_id, m, g.ps, g.pe FROM unnest(g.meters) m;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_rows := v_rows + v_n;
    INSERT INTO pg_temp.fr_close_usage (org_id, customer_id, meter_id, period_start, period_end, usage)
    SELECT g.org_id, u.customer_id, u.meter_id, g.ps, g.pe, u.usage
      FROM fluxrate_internal.org_period_usage(g.org_id, g.ps, g.pe, g.agg, g.meters) u;
  END LOOP;
  -- The late-usage check's periods: the usage now of every period billed on the
  -- due subscriptions' last 12 finalized invoices.  Without this, every close
  -- re-read up to 12 past periods of events pair by pair (the benchmark's
  -- December close, with October behind it: 3.8 s against October's 2.1 s).
  -- From the rollups only, where they can serve the period (whole UTC days,
  -- refreshed): a month is one row per (customer, meter) there.  The same
  -- customer-share rule; periods the loop above covered are skipped.
  IF fluxrate_internal.rollup_snapshot() IS NOT NULL THEN
    FOR g IN
      SELECT d.org_id, d.ps, d.pe, mt.aggregation_type AS agg, array_agg(DISTINCT mt.id) AS meters
        FROM (SELECT x.org_id, l.period_start AS ps, l.period_end AS pe, array_agg(DISTINCT l.charge_id) AS charges,
                     count(DISTINCT x.customer_id) AS n,
                     (SELECT count(DISTINCT o.customer_id) FROM fluxrate_internal.subscriptions o
                       WHERE o.org_id = x.org_id AND o.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')) AS subscribed
                FROM fluxrate_internal.subscriptions x
                CROSS JOIN LATERAL fluxrate_internal.late_window_lines(x.org_id, x.id, x.current_period_start) l
               WHERE x.status IN ('ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
               GROUP BY 1, 2, 3) d
        JOIN fluxrate_internal.charges c ON c.org_id = d.org_id AND c.id = ANY (d.charges)
        JOIN fluxrate_internal.meters mt ON mt.org_id = c.org_id AND mt.id = c.meter_id
             AND mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
       WHERE fluxrate_internal.whole_utc_days(d.ps, d.pe) AND d.n >= min_benefit * d.subscribed
       GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3
    LOOP
      v_meters := ARRAY(SELECT m FROM unnest(g.meters) m
                         WHERE NOT EXISTS (SELECT 1 FROM pg_temp.fr_close_scope sc WHERE sc.org_id = g.org_id AND sc.meter_id = m
                                             AND sc.period_start = g.ps AND sc.period_end = g.pe));
      CONTINUE WHEN cardinality(v_meters) = 0;
      INSERT INTO pg_temp.fr_close_scope (org_id, meter_id, period_start, period_end)
      SELECT g.org_id, m, g.ps, g.pe FROM unnest(v_meters) m;
      GET DIAGNOSTICS v_n = ROW_COUNT;
      v_rows := v_rows + v_n;
      INSERT INTO pg_temp.fr_close_usage (org_id, customer_id, meter_id, period_start, period_end, usage)
      SELECT g.org_id, u.customer_id, u.meter_id, g.ps, g.pe, u.usage
        FROM fluxrate_internal.org_period_usage(g.org_id, g.ps, g.pe, g.agg, v_meters) u;
    END LOOP;
  END IF;
  -- The grouped charges' meters (24_dimensions.sql): their usage by group,
  -- from the rollups keyed by group value, for the periods that are due now
  -- (late usage of grouped charges is rare and read from the events).  The
  -- same customer-share rule.
  v_rows := v_rows + fluxrate_internal.sys_close_prepare_groups(min_benefit);
  ANALYZE pg_temp.fr_close_scope, pg_temp.fr_close_usage, pg_temp.fr_close_group_scope, pg_temp.fr_close_group_usage;
  RETURN v_rows;
END
$$;

-- sys_close_prepare()'s grouped part: for each (organization, period) due
-- now whose plans have grouped charges (or subscriptions with grouped
-- overrides: the groups are the charge's, the meter the same), the usage by
-- group of their dimensioned meters, one statement per (organization, period).
-- Returns the number of (organization, meter, period) covered.
CREATE FUNCTION fluxrate_internal.sys_close_prepare_groups(min_benefit numeric) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  g record;
  v_rows bigint := 0;
  v_n bigint;
BEGIN
  -- (most installations price nothing by dimension: then the pass over the due
  -- subscriptions below is skipped; else it reads those organizations only)
  IF NOT EXISTS (SELECT 1 FROM fluxrate_internal.charge_dimensions) THEN
    RETURN 0;
  END IF;
  FOR g IN
    SELECT d.org_id, d.ps, d.pe, array_agg(DISTINCT c.meter_id) AS meters
      FROM (SELECT x.org_id, x.current_period_start AS ps, x.current_period_end AS pe,
                   array_agg(DISTINCT x.plan_id) AS plans, count(DISTINCT x.customer_id) AS n,
                   (SELECT count(DISTINCT l.customer_id) FROM fluxrate_internal.subscriptions l
                     WHERE l.org_id = x.org_id AND l.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')) AS subscribed
              FROM fluxrate_internal.subscriptions x
             WHERE x.status IN ('ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
               AND x.org_id IN (SELECT cd.org_id FROM fluxrate_internal.charge_dimensions cd)
             GROUP BY 1, 2, 3) d
      JOIN fluxrate_internal.charges c ON c.org_id = d.org_id AND c.plan_id = ANY (d.plans)
           AND c.type = 'USAGE' AND c.status = 'ACTIVE'
      JOIN fluxrate_internal.charge_dimensions cd ON cd.org_id = c.org_id AND cd.charge_id = c.id
      JOIN fluxrate_internal.meters mt ON mt.org_id = c.org_id AND mt.id = c.meter_id AND mt.filters = '[]'::jsonb
     WHERE d.n >= min_benefit * d.subscribed
       AND (min_benefit <= 0 OR (fluxrate_internal.whole_utc_days(d.ps, d.pe) AND fluxrate_internal.rollup_snapshot() IS NOT NULL))
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
  LOOP
    INSERT INTO pg_temp.fr_close_group_scope (org_id, meter_id, period_start, period_end)
    SELECT g.org_id, m, g.ps, g.pe FROM unnest(g.meters) m;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_rows := v_rows + v_n;
    INSERT INTO pg_temp.fr_close_group_usage (org_id, customer_id, meter_id, period_start, period_end, groups)
    SELECT g.org_id, u.customer_id, u.meter_id, g.ps, g.pe, u.groups
      FROM fluxrate_internal.org_period_group_usage(g.org_id, g.ps, g.pe, g.meters) u;
  END LOOP;
  RETURN v_rows;
END
$$;

-- ANALYZE a table when it has outgrown its statistics (more than twice the
-- pages ANALYZE last counted): invoices in every closing batch, usage_rollups
-- after every refresh (a first refresh fills it with a month of rollups that
-- the planner, without statistics, would take for a dozen rows: a sort
-- instead of a hash over 930,000 of them, 2.5 s instead of 0.25 s).
-- A closing run can multiply the invoices table in
-- seconds, long before autovacuum looks, and the plans cached meanwhile are made
-- for a near-empty table.  The one that hurts is PostgreSQL's own foreign-key
-- check of each invoice line: its generic plan, made while invoices held a few
-- rows, may take the (org_id, invoice_number) index and then read every invoice
-- of the organization for each line (measured: 0.6 ms per line at 10,000
-- invoices; a run in batches of 250 took 5 times as long).  ANALYZE
-- invalidates that plan; the doubling rule bounds a run to a few of them
-- (~40 ms at 10,000 invoices).  It never waits: skipped while another ANALYZE
-- or a VACUUM holds the table.  Returns whether it analyzed.
CREATE FUNCTION fluxrate_internal.analyze_if_outgrown(rel regclass) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER  -- (as the tables' owner)
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF (SELECT c.relnamespace <> 'fluxrate_internal'::regnamespace FROM pg_class c WHERE c.oid = rel) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = format('%s is not a fluxrate table', rel);
  END IF;
  IF (SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint <= greatest(2 * c.relpages, 8)
        FROM pg_class c WHERE c.oid = rel) THEN
    RETURN false;
  END IF;
  EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', rel);
  EXECUTE format('ANALYZE %s', rel);
  RETURN true;
EXCEPTION WHEN lock_not_available THEN
  RETURN false;
END
$$;
CREATE FUNCTION fluxrate_internal.analyze_invoices_if_outgrown() RETURNS boolean
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate_internal.analyze_if_outgrown('fluxrate_internal.invoices') $$;

-- Close the next due period of up to batch_size subscriptions, across
-- organizations (owned by fluxrate_system).  Rows are claimed with SKIP LOCKED,
-- so concurrent closers split the work; the invoices and the subscriptions'
-- advance commit together, so a killed closer leaves no half-closed period.
-- Returns how many subscriptions it advanced (0 = nothing is due).
--
-- Set-based, in stages (each below, in this order):
--   claim    sys_close_claim() (above): the due subscriptions, fair across
--            organizations, locked
--   trials   sys_close_trials(): ending trials go one by one (once per
--            subscription lifetime): no invoice, billing starts
--   usage    sys_close_usage(): one statement: the usage of the period that
--            ended and of the late-usage check of the last 12 finalized
--            invoices, from the run's snapshot where it covers the pair, else
--            period_usage() once per organization
--   then ONE statement for every other claimed subscription, close_statement(),
--   assembled from named parts (close_sql_*()):
--   periods  the period that ended, its proration, the next period, currency,
--            tax rate, the new invoice's id; the subscriptions to invoice
--   lines    the charge lines, late usage, minimum commitment (the same as
--            fill_lines writes), each rounded once
--   invoices the totals (tax on the unrounded subtotal, rounded once), the
--            invoice and its lines
--   advance  the subscription's next period (or its end)
--   outbox   the events with their webhook fan-out
--   account  sys_close_account() (above): the run's count per subscription;
--            one whose period did not advance is set aside
-- fill_lines (50_periods.sql) stays the reference: the draft is recomputed by
-- it at finalization, and the tests compare both.
--
-- The two big statements are EXECUTEd: each batch plans them for its own rows
-- (invoices and lines grow fast during a run, and a generic plan made while
-- they were small would make each invoice cost O(invoices)).  A function-wide
-- plan_cache_mode = force_custom_plan did the same, but it also reached the
-- foreign-key checks, which then planned their query once per line: a third of
-- a batch's time.  The second statement stays one statement, parts and all:
-- its writes see one snapshot and commit together, its intermediate results
-- stay in the executor (no temporary tables to write and plan around), and
-- the plan is the one it had as a single text (checked with EXPLAIN: the same).
CREATE FUNCTION fluxrate_internal.sys_close_batch(batch_size integer DEFAULT 2000, only_id uuid DEFAULT NULL) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  -- a batch of 2,000 estimates above jit_above_cost, and compiling its 266
  -- expressions took 94 ms of its 250: row-at-a-time work JIT never pays back
  SET jit = off
  AS $$
DECLARE
  v_batch fluxrate_internal.subscriptions[];
  v_rest fluxrate_internal.subscriptions[];
  v_now timestamptz := fluxrate.now();
  v_usage jsonb;
  v_overrides boolean;
  v_groups boolean;
  v_discounts boolean;
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  PERFORM fluxrate_internal.analyze_invoices_if_outgrown();
  -- claim: fair across organizations, at most close_periods_per_run() periods of one
  -- subscription per run (docs/security.md, "Job fairness")
  v_batch := fluxrate_internal.sys_close_claim(batch_size, only_id);
  IF cardinality(v_batch) = 0 THEN
    RETURN 0;
  END IF;
  PERFORM fluxrate_internal.sys_close_trials(v_batch);
  -- scheduled plan changes due at this period end go one by one too
  -- (55_plan_changes.sql); the statement closes the others
  v_rest := fluxrate_internal.sys_close_changes(v_batch);
  v_usage := fluxrate_internal.sys_close_usage(v_rest);
  -- the fixed-amount coupons the statement's invoices may spend, locked before
  -- its snapshot (56_discounts.sql)
  PERFORM fluxrate_internal.lock_fixed_redemptions(v_rest);
  -- the batch's shape: which of the pricing parts it needs (each a constant for
  -- the statement's plan, which then leaves out the parts' per-row probes when
  -- false; bench/RESULTS.md: a tenth of a batch of plain subscriptions)
  SELECT EXISTS (SELECT 1 FROM unnest(v_rest) x JOIN fluxrate_internal.charge_overrides o
                     ON o.org_id = x.org_id AND o.subscription_id = x.id)
      OR EXISTS (SELECT 1 FROM unnest(v_rest) x JOIN fluxrate_internal.minimum_overrides o
                     ON o.org_id = x.org_id AND o.subscription_id = x.id),
         EXISTS (SELECT 1 FROM (SELECT DISTINCT x.org_id, x.plan_id FROM unnest(v_rest) x) p
                   JOIN fluxrate_internal.charges c ON c.org_id = p.org_id AND c.plan_id = p.plan_id
                   JOIN fluxrate_internal.charge_dimensions d ON d.org_id = c.org_id AND d.charge_id = c.id),
         -- (per organization: a redemption may be the customer's, for all its subscriptions)
         EXISTS (SELECT 1 FROM fluxrate_internal.coupon_redemptions r
                  WHERE r.org_id IN (SELECT x.org_id FROM unnest(v_rest) x) AND r.status = 'ACTIVE')
    INTO v_overrides, v_groups, v_discounts;
  -- periods, lines, invoices, advance, outbox
  EXECUTE fluxrate_internal.close_statement() USING v_rest, v_now, v_usage, v_overrides, v_groups, v_discounts;
  -- account: the run's count per subscription; one that did not advance is set aside
  PERFORM fluxrate_internal.sys_close_account(v_batch);
  RETURN cardinality(v_batch);
END
$$;

-- Stage trials: the claimed trials that are over: no invoice for them, billing
-- starts at the trial end (or, canceled during the trial, the subscription ends).
CREATE FUNCTION fluxrate_internal.sys_close_trials(batch fluxrate_internal.subscriptions[]) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  s fluxrate_internal.subscriptions;
BEGIN
  FOREACH s IN ARRAY batch
  LOOP
    CONTINUE WHEN s.status <> 'TRIAL';
    PERFORM set_config('fluxrate.current_org', s.org_id::text, true);
    IF s.cancel_at_period_end THEN
      -- canceled during the trial, at its end: it ends with the trial, never billed
      UPDATE fluxrate_internal.subscriptions x
         SET status = 'CANCELED', ended_at = s.current_period_end, close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = s.org_id AND x.id = s.id;
      PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.canceled',
        jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', s.current_period_end));
      CONTINUE;
    END IF;
    UPDATE fluxrate_internal.subscriptions x
       SET status = 'ACTIVE', current_period_index = 0, current_period_start = s.billing_anchor,
           current_period_end = fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, 1),
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id;
    PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.activated',
      jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id));
    -- the first period's in-advance fees
    PERFORM fluxrate_internal.open_subscription(x) FROM fluxrate_internal.subscriptions x
     WHERE x.org_id = s.org_id AND x.id = s.id;
  END LOOP;
END
$$;

-- Stage usage: the usage every other claimed subscription is billed for.
-- One period_usage() call per organization: the period that ended
-- for every (subscription, usage charge), and for the late-usage check every
-- (charge, period) billed on the subscription's last 12 finalized invoices.
-- period_usage()'s answers are zipped back to their keys by position (no join),
-- into {sub: {"u": {charge: usage}, "late": [{c, ps, pe, billed, now}]}}.
CREATE FUNCTION fluxrate_internal.sys_close_usage(batch fluxrate_internal.subscriptions[]) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_usage jsonb;
BEGIN
  EXECUTE $sql$
  WITH items AS MATERIALIZED (
    -- covered: the run's snapshot (sys_close_prepare) has this pair's usage, snap
    SELECT z.*, (sc.org_id IS NOT NULL) AS covered, coalesce(su.usage, 0) AS snap,
           row_number() OVER (PARTITION BY z.org_id, sc.org_id IS NOT NULL
                              ORDER BY z.sub_id, z.late, z.charge_id, z.ps)::integer AS ord
      FROM (SELECT x.org_id, x.id AS sub_id, false AS late, c.id AS charge_id, x.customer_id, c.meter_id,
                   x.current_period_start AS ps, x.current_period_end AS pe, NULL::numeric AS billed
              FROM unnest($1) x
              JOIN fluxrate_internal.charges c ON c.org_id = x.org_id AND c.plan_id = x.plan_id
                   AND c.type = 'USAGE' AND c.status = 'ACTIVE'
             WHERE x.status <> 'TRIAL'
            UNION ALL
            SELECT ls.org_id, ls.sub_id, true, ls.charge_id, ls.customer_id, c.meter_id, ls.ps, ls.pe, ls.billed
              FROM (SELECT x.org_id, x.id AS sub_id, x.customer_id, l.charge_id, l.period_start AS ps, l.period_end AS pe,
                           sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric
                                    ELSE (l.meta->>'usage_delta')::numeric END) AS billed
                      FROM unnest($1) x
                      CROSS JOIN LATERAL fluxrate_internal.late_window_lines(x.org_id, x.id, x.current_period_start) l
                     WHERE x.status <> 'TRIAL'
                     GROUP BY 1, 2, 3, 4, 5, 6) ls
              JOIN fluxrate_internal.charges c ON c.org_id = ls.org_id AND c.id = ls.charge_id) z
      LEFT JOIN pg_temp.fr_close_scope sc ON sc.org_id = z.org_id AND sc.meter_id = z.meter_id
                AND sc.period_start = z.ps AND sc.period_end = z.pe
      LEFT JOIN pg_temp.fr_close_usage su ON su.org_id = z.org_id AND su.customer_id = z.customer_id
                AND su.meter_id = z.meter_id AND su.period_start = z.ps AND su.period_end = z.pe
  ), todo AS MATERIALIZED (
    SELECT * FROM items WHERE NOT covered
  ), per_org AS (
    SELECT o.org_id,
           ARRAY(SELECT i.sub_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS subs,
           ARRAY(SELECT i.late FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS lates,
           ARRAY(SELECT i.charge_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS charges,
           ARRAY(SELECT i.ps FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS pss,
           ARRAY(SELECT i.pe FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS pes,
           ARRAY(SELECT i.billed FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS billeds,
           ARRAY(SELECT pu.usage FROM fluxrate_internal.period_usage(o.org_id,
                   ARRAY(SELECT i.customer_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.meter_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.ps FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.pe FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord)) pu ORDER BY pu.ord) AS usages
      FROM (SELECT DISTINCT org_id FROM todo) o
  )
  SELECT jsonb_object_agg(q.sub_id::text, q.m)
    FROM (SELECT z.sub_id,
                 jsonb_build_object('u', coalesce(jsonb_object_agg(z.charge_id::text, z.usage) FILTER (WHERE NOT z.late), '{}'),
                   'late', coalesce(jsonb_agg(jsonb_build_object('c', z.charge_id, 'ps', z.ps, 'pe', z.pe, 'billed', z.billed,
                                                                 'now', z.usage) ORDER BY z.ps, z.charge_id)
                                    FILTER (WHERE z.late AND z.usage <> z.billed), '[]')) AS m
            FROM (SELECT u.* FROM per_org, unnest(per_org.subs, per_org.lates, per_org.charges, per_org.pss, per_org.pes,
                                                  per_org.billeds, per_org.usages) u(sub_id, late, charge_id, ps, pe, billed, usage)
                  UNION ALL
                  SELECT i.sub_id, i.late, i.charge_id, i.ps, i.pe, i.billed, i.snap FROM items i WHERE i.covered) z
           GROUP BY z.sub_id) q
  $sql$ INTO v_usage USING batch;
  RETURN v_usage;
END
$$;

-- The parts of the closing statement (close_statement(), after them).  Each is
-- a piece of one WITH list over $1 (the claimed subscriptions), $2 (now), $3 (the usage
-- by subscription, of sys_close_usage()) and the batch's shape: $4 (some subscription
-- of it has an override), $5 (some plan of it has a grouped charge), $6 (its
-- organizations have active coupon redemptions), and may name the CTEs of the parts
-- before it.  Each step derives from the claimed rows (b, sb) and carries what
-- it needs forward, so no step joins two large intermediate results.
-- (bench/close_plan.sh prints its plan.)

-- Stage periods: b, each claimed subscription that is not a trial, with its
-- period, proration and next period; sb, those of b to invoice.
CREATE FUNCTION fluxrate_internal.close_sql_periods() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  b AS MATERIALIZED (
    -- the period that ended, its proration fraction, the next period (whose
    -- in-advance fees this invoice carries unless the subscription ends now)
    SELECT x.org_id, x.id AS sub_id, x.customer_id, x.plan_id, x.current_period_index AS idx,
           x.current_period_start AS ps, x.current_period_end AS pe, x.cancel_at_period_end AS ending,
           np.nominal_start, np.nominal_end,
           CASE WHEN x.current_period_start = np.nominal_start AND x.current_period_end = np.nominal_end THEN 1
                ELSE extract(epoch FROM (x.current_period_end - x.current_period_start))
                   / extract(epoch FROM (np.nominal_end - np.nominal_start)) END AS frac,
           fluxrate_internal.period_boundary(x.billing_anchor, x.billing_interval, x.alignment,
                                             x.current_period_index + 2) AS next_end,
           pl.currency, pl.minimum, pl.version AS plan_version,
           (SELECT o.grace_period FROM fluxrate_internal.organizations o WHERE o.org_id = x.org_id) AS grace,
           -- tax_rate_for(), inline: a state-specific rate beats the country-wide one; none = 0
           coalesce((SELECT t.rate FROM fluxrate_internal.customers c, fluxrate_internal.tax_rates t
                      WHERE c.org_id = x.org_id AND c.id = x.customer_id
                        AND t.org_id = c.org_id AND t.country = c.billing_address_country
                        AND t.state IN ('', coalesce(c.billing_address_state, ''))
                      ORDER BY t.state DESC LIMIT 1), 0) AS tax_rate,
           gen_random_uuid() AS invoice_id,
           coalesce($3->(x.id::text), '{}') AS uj,
           -- a closing invoice of this period already exists (cannot happen while the row is
           -- locked and advances with its invoice; the unique index would refuse a second one).
           -- A scalar subquery, one index probe per row: as an EXISTS, the planner may hash
           -- all the organization's invoices in every batch.
           coalesce((SELECT true FROM fluxrate_internal.invoices i
                      WHERE i.org_id = x.org_id AND i.subscription_id = x.id AND i.kind = 'subscription'
                        AND i.period_start = x.current_period_start LIMIT 1), false) AS already
      FROM unnest($1) x
      CROSS JOIN LATERAL fluxrate_internal.nominal_period(x) np
      -- the plan, in one probe: its currency, version, and the subscription's own minimum
      -- commitment, else the plan's (23_overrides.sql: subscription_minimum(), inline;
      -- $4: the batch's organizations have overrides, else that probe is left out)
      LEFT JOIN LATERAL (
        SELECT p.currency, p.version,
               CASE WHEN mo.subscription_id IS NOT NULL THEN mo.minimum_commitment ELSE p.minimum_commitment END AS minimum
          FROM fluxrate_internal.plans p
          LEFT JOIN fluxrate_internal.minimum_overrides mo ON $4 AND mo.org_id = x.org_id AND mo.subscription_id = x.id
         WHERE p.org_id = x.org_id AND p.id = x.plan_id) pl ON true
     WHERE x.status <> 'TRIAL'
  ), sb AS MATERIALIZED (
    -- the subscriptions to invoice, and the in-advance fees the period itself
    -- was charged (for the minimum commitment)
    SELECT b.*,
           CASE WHEN b.minimum IS NOT NULL THEN
             coalesce((SELECT sum(c.unit_price * b.frac) FROM fluxrate_internal.subscription_charges(b.org_id, b.sub_id, b.plan_id, $4, $5) c
                        WHERE c.status = 'ACTIVE' AND c.type = 'FIXED' AND c.billing_timing = 'in_advance'), 0) END AS advance_paid
      FROM b WHERE NOT b.already
  )
$sql$ $fn$;

-- Stage lines (1/4): one line per ACTIVE charge of the plan.
CREATE FUNCTION fluxrate_internal.close_sql_charge_lines() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  main AS MATERIALIZED (
    -- one line per ACTIVE charge, in charge order (fill_lines' first loop), as
    -- priced for the subscription (subscription_charges: its overrides); a
    -- grouped charge one line per group (group_lines), its usage by group from
    -- the run's snapshot where it covers the pair, else from the events
    SELECT y.*,
           CASE WHEN y.groups IS NOT NULL THEN y.group_amount
                WHEN y.type = 'USAGE' THEN
                  fluxrate_internal.rate_usage(y.pricing_model, y.unit_price, y.tiers, y.package_size,
                                               y.package_price, y.free_units, y.usage)
                WHEN y.advance THEN y.unit_price
                ELSE y.unit_price * y.frac END AS amount
      FROM (SELECT z.*, row_number() OVER (PARTITION BY z.org_id, z.sub_id ORDER BY z.type, z.created_at, z.charge_id, z.gpos)::integer AS pos
              FROM (
            -- the plain charges (no function call per row: most charges are these)
            SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.frac, sb.ps, sb.pe, sb.pe AS adv_start, sb.next_end AS adv_end,
                   c.id AS charge_id, c.type, c.billing_timing, c.meter_id, c.created_at, c.pricing_model, c.unit_price, c.tiers,
                   c.package_size, c.package_price, c.free_units, c.groups, NULL::integer AS gpos, NULL::text AS group_value,
                   NULL::boolean AS unpriced, NULL::numeric AS group_amount,
                   (c.type = 'FIXED' AND c.billing_timing = 'in_advance') AS advance,
                   coalesce(c.display_name, CASE WHEN c.type = 'FIXED' THEN 'Fixed fee' ELSE m.meter_name END) AS name,
                   CASE WHEN c.type = 'USAGE' THEN coalesce((sb.uj->'u'->>(c.id::text))::numeric,
                     fluxrate_internal.meter_usage(sb.org_id, sb.customer_id, c.meter_id, sb.ps, sb.pe)) END AS usage
              FROM sb
              CROSS JOIN LATERAL fluxrate_internal.subscription_charges(sb.org_id, sb.sub_id, sb.plan_id, $4, $5) c
              LEFT JOIN fluxrate_internal.meters m ON m.org_id = sb.org_id AND m.id = c.meter_id
             WHERE c.status = 'ACTIVE' AND c.groups IS NULL
               AND NOT (c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND sb.ending)
            UNION ALL
            -- the grouped charges: a line per group
            SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.frac, sb.ps, sb.pe, sb.pe, sb.next_end,
                   c.id, c.type, c.billing_timing, c.meter_id, c.created_at, gl.pricing_model, gl.unit_price, c.tiers,
                   c.package_size, c.package_price, c.free_units, c.groups, gl.gpos, gl.group_value, gl.unpriced, gl.amount,
                   false, gl.name, gl.usage
              FROM sb
              CROSS JOIN LATERAL fluxrate_internal.subscription_charges(sb.org_id, sb.sub_id, sb.plan_id, $4, $5) c
              LEFT JOIN fluxrate_internal.meters m ON m.org_id = sb.org_id AND m.id = c.meter_id
              CROSS JOIN LATERAL fluxrate_internal.group_lines(c.groups,
                  CASE WHEN EXISTS (SELECT 1 FROM pg_temp.fr_close_group_scope gs WHERE gs.org_id = sb.org_id
                                       AND gs.meter_id = c.meter_id AND gs.period_start = sb.ps AND gs.period_end = sb.pe)
                         THEN coalesce((SELECT gu.groups FROM pg_temp.fr_close_group_usage gu
                                         WHERE gu.org_id = sb.org_id AND gu.customer_id = sb.customer_id AND gu.meter_id = c.meter_id
                                           AND gu.period_start = sb.ps AND gu.period_end = sb.pe), '{}'::jsonb)
                       ELSE fluxrate_internal.meter_group_usage(sb.org_id, sb.customer_id, c.meter_id, sb.ps, sb.pe) END,
                  coalesce(c.display_name, m.meter_name)) gl
             WHERE $5 AND c.status = 'ACTIVE' AND c.groups IS NOT NULL) z) y
  ), nmain AS (
    -- how many charge lines each invoice has: the late and minimum lines come
    -- after them (counted from main rather than probed per subscription in sb:
    -- main is small, and most invoices have neither)
    SELECT m.org_id, m.sub_id, count(*)::integer AS n FROM main m GROUP BY 1, 2
  )
$sql$ $fn$;

-- Stage lines (2/4): late usage of the periods the usage stage re-checked.
CREATE FUNCTION fluxrate_internal.close_sql_late_lines() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  late AS MATERIALIZED (
    -- late usage (fill_lines' second loop): only increases, priced incrementally, after the charges
    -- priced as the subscription's charge is now (subscription_charge: its
    -- override); a grouped charge by group (group_late_usage)
    SELECT y.*, y.n_main + row_number() OVER (PARTITION BY y.org_id, y.sub_id ORDER BY y.lps, y.charge_id, y.gpos)::integer AS pos
      FROM (SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency,
                   coalesce(nm.n, 0) AS n_main,
                   c.id AS charge_id, c.meter_id,
                   coalesce(gl.name, c.display_name, m.meter_name) AS name, c.groups, gl.gpos, gl.group_value, gl.unpriced,
                   (e->>'ps')::timestamptz AS lps, (e->>'pe')::timestamptz AS lpe,
                   coalesce(gl.billed, (e->>'billed')::numeric) AS billed, coalesce(gl.usage_now, (e->>'now')::numeric) AS now_usage,
                   CASE WHEN c.groups IS NOT NULL THEN gl.amount ELSE
                   fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'now')::numeric)
                 - fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'billed')::numeric) END AS amount
              FROM sb
              CROSS JOIN LATERAL jsonb_array_elements(sb.uj->'late') e
              LEFT JOIN nmain nm ON nm.org_id = sb.org_id AND nm.sub_id = sb.sub_id
              CROSS JOIN LATERAL fluxrate_internal.subscription_charge(sb.org_id, sb.sub_id, (e->>'c')::uuid) c
              JOIN fluxrate_internal.meters m ON m.org_id = sb.org_id AND m.id = c.meter_id
              LEFT JOIN LATERAL fluxrate_internal.group_late_usage(sb.org_id, sb.sub_id, sb.ps, c.id, c.groups,
                  coalesce(c.display_name, m.meter_name), (e->>'ps')::timestamptz, (e->>'pe')::timestamptz,
                  CASE WHEN c.groups IS NOT NULL THEN fluxrate_internal.meter_group_usage(sb.org_id, sb.customer_id, c.meter_id,
                                                          (e->>'ps')::timestamptz, (e->>'pe')::timestamptz) END) gl ON true
             WHERE c.groups IS NULL OR gl.gpos IS NOT NULL) y
     WHERE y.amount > 0
  )
$sql$ $fn$;

-- Stage lines (3/4): the minimum commitment's true-up.
CREATE FUNCTION fluxrate_internal.close_sql_minimum() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  mins AS MATERIALIZED (
    -- the minimum commitment true-up: the period's own charges, its in-advance
    -- fees (billed before) included, the next period's excluded; after the late lines
    SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.ps, sb.pe,
           sb.minimum * sb.frac - (coalesce(ms.period_sum, 0) + sb.advance_paid) AS amount,
           coalesce(ms.n_main, 0) + coalesce(nl.n, 0)::integer + 1 AS pos
      FROM sb
      LEFT JOIN (SELECT m.org_id, m.sub_id, sum(m.amount) FILTER (WHERE NOT m.advance) AS period_sum,
                        count(*)::integer AS n_main
                   FROM main m GROUP BY 1, 2) ms ON ms.org_id = sb.org_id AND ms.sub_id = sb.sub_id
      LEFT JOIN (SELECT l.org_id, l.sub_id, count(*) AS n FROM late l GROUP BY 1, 2) nl
             ON nl.org_id = sb.org_id AND nl.sub_id = sb.sub_id
     WHERE sb.minimum IS NOT NULL
       AND coalesce(ms.period_sum, 0) + sb.advance_paid < sb.minimum * sb.frac
  )
$sql$ $fn$;

-- Stage lines (4/4): all lines, as written, each rounded once.
CREATE FUNCTION fluxrate_internal.close_sql_lines() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  lines AS MATERIALIZED (
    SELECT l.*, fluxrate_internal.round_money(l.amount, l.currency) AS line_total
      FROM (
        SELECT m.org_id, m.sub_id, m.invoice_id, m.currency, m.pos,
               CASE m.type WHEN 'USAGE' THEN 'usage' ELSE 'fixed' END AS line_type, m.charge_id,
               m.name || CASE WHEN m.type = 'FIXED' AND NOT m.advance AND m.frac <> 1 THEN ' (prorated)' ELSE '' END AS description,
               CASE WHEN m.type = 'USAGE' THEN m.usage WHEN m.advance OR m.frac = 1 THEN 1 ELSE round(m.frac, 12) END AS quantity,
               CASE WHEN m.type = 'FIXED' OR m.pricing_model IN ('per_unit', 'unpriced') THEN m.unit_price
                    WHEN m.usage = 0 THEN 0 ELSE round(m.amount / m.usage, 12) END AS unit_amount,
               m.amount,
               CASE WHEN m.advance THEN m.adv_start ELSE m.ps END AS line_start,
               CASE WHEN m.advance THEN m.adv_end ELSE m.pe END AS line_end,
               CASE WHEN m.groups IS NOT NULL THEN jsonb_build_object('meter_id', m.meter_id, 'usage', m.usage, 'pricing_model', m.pricing_model,
                                                                      'group', m.group_value, 'unpriced', m.unpriced)
                    WHEN m.type = 'USAGE' THEN jsonb_build_object('meter_id', m.meter_id, 'usage', m.usage, 'pricing_model', m.pricing_model)
                    ELSE jsonb_build_object('billing_timing', m.billing_timing) END AS meta
          FROM main m
        UNION ALL
        SELECT l.org_id, l.sub_id, l.invoice_id, l.currency, l.pos, 'late_usage', l.charge_id,
               format('%s - late usage for %s to %s', l.name, to_char(l.lps AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                      to_char(l.lpe AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
               l.now_usage - l.billed, round(l.amount / (l.now_usage - l.billed), 12), l.amount, l.lps, l.lpe,
               jsonb_build_object('meter_id', l.meter_id, 'usage_delta', l.now_usage - l.billed, 'usage_now', l.now_usage,
                                  'billed_before', l.billed)
               || CASE WHEN l.groups IS NOT NULL THEN jsonb_build_object('group', l.group_value, 'unpriced', l.unpriced)
                       ELSE '{}'::jsonb END
          FROM late l
        UNION ALL
        SELECT n.org_id, n.sub_id, n.invoice_id, n.currency, n.pos, 'minimum', NULL, 'Minimum commitment true-up', 1,
               n.amount, n.amount, n.ps, n.pe, '{}'::jsonb
          FROM mins n) l
  )
$sql$ $fn$;

-- Stage invoices: the totals, the DRAFT invoice and its lines.
CREATE FUNCTION fluxrate_internal.close_sql_invoices() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  all_lines AS NOT MATERIALIZED (
    -- the charge, late-usage and minimum lines, then the discounts
    -- (close_sql_discounts); read twice, from lines and disc, both materialized:
    -- cheaper than a third copy of every line
    SELECT l.org_id, l.sub_id, l.invoice_id, l.pos, l.line_type, l.charge_id, l.description, l.quantity, l.unit_amount,
           l.line_total, l.amount, l.line_start, l.line_end, l.meta, NULL::uuid AS redemption_id
      FROM lines l
    UNION ALL
    SELECT d.org_id, d.sub_id, d.invoice_id, d.pos, d.line_type, d.charge_id, d.description, d.quantity, d.unit_amount,
           d.line_total, d.amount, d.line_start, d.line_end, d.meta, d.redemption_id
      FROM disc d
  ), totals AS (
    -- per invoice: the sum of the rounded lines and of the unrounded amounts
    SELECT l.org_id, l.sub_id, sum(l.line_total) AS subtotal, sum(l.amount) AS unrounded
      FROM all_lines l GROUP BY 1, 2
  ), inv AS (
    -- an invoice with no line (in-advance fees only, last period) is not written
    INSERT INTO fluxrate_internal.invoices AS i (org_id, id, kind, customer_id, subscription_id, currency, subtotal, tax, tax_rate,
        total, amount_due, period_start, period_end, scheduled_finalize_at, meta_data, created_at, updated_at)
    SELECT sb.org_id, sb.invoice_id, 'subscription', sb.customer_id, sb.sub_id, sb.currency, t.subtotal,
           fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency), sb.tax_rate,
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           sb.ps, sb.pe, $2 + sb.grace,
           jsonb_build_object('nominal_start', sb.nominal_start, 'nominal_end', sb.nominal_end,
                              'plan_id', sb.plan_id, 'plan_version', sb.plan_version)
           || CASE WHEN sb.ending THEN '{}'::jsonb
                   ELSE jsonb_build_object('advance_start', sb.pe, 'advance_end', sb.next_end) END,
           $2, $2
      FROM sb
      JOIN totals t ON t.org_id = sb.org_id AND t.sub_id = sb.sub_id
    RETURNING i.org_id, i.id, i.subscription_id, i.customer_id, i.total, i.currency, i.status
  ), ins_lines AS (
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta, redemption_id)
    SELECT l.org_id, l.invoice_id, l.pos, l.line_type, l.charge_id, l.description, l.quantity, l.unit_amount, l.line_total,
           l.amount, l.line_start, l.line_end, l.meta, l.redemption_id
      FROM all_lines l
  )
$sql$ $fn$;

-- Stage advance: the subscription's next period, or its end.
CREATE FUNCTION fluxrate_internal.close_sql_advance() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  adv AS (
    -- the period advances, or the subscription ends with it
    UPDATE fluxrate_internal.subscriptions x
       SET status = CASE WHEN b.ending THEN 'CANCELED' ELSE x.status END,
           ended_at = CASE WHEN b.ending THEN b.pe ELSE x.ended_at END,
           current_period_index = CASE WHEN b.ending THEN x.current_period_index ELSE b.idx + 1 END,
           current_period_start = CASE WHEN b.ending THEN x.current_period_start ELSE b.pe END,
           current_period_end = CASE WHEN b.ending THEN x.current_period_end ELSE b.next_end END,
           last_invoiced_date = $2, close_retry_at = NULL, close_error = NULL
      FROM b
     WHERE x.org_id = b.org_id AND x.id = b.sub_id
    RETURNING x.org_id, x.id, x.customer_id, b.ending AS ended, b.pe AS ended_at
  )
$sql$ $fn$;

-- Stage outbox: invoice.created and subscription.canceled, and their webhook
-- deliveries.
CREATE FUNCTION fluxrate_internal.close_sql_outbox() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  ev AS MATERIALIZED (
    -- the outbox events, as emit_event() writes them
    SELECT e.org_id, fluxrate_internal.uuid_v7() AS id, e.event, e.data
      FROM (SELECT inv.org_id, inv.subscription_id AS sub_id, 1 AS k, 'invoice.created' AS event,
                   jsonb_build_object('invoice_id', inv.id, 'customer_id', inv.customer_id, 'subscription_id', inv.subscription_id,
                                      'total', inv.total, 'currency', inv.currency, 'status', inv.status) AS data
              FROM inv
            UNION ALL
            SELECT adv.org_id, adv.id, 2, 'subscription.canceled',
                   jsonb_build_object('subscription_id', adv.id, 'customer_id', adv.customer_id, 'ended_at', adv.ended_at)
              FROM adv WHERE adv.ended
            ORDER BY 1, 2, 3) e
  ), ob AS (
    INSERT INTO fluxrate_internal.outbox (org_id, id, event, payload, created_at)
    SELECT ev.org_id, ev.id, ev.event,
           jsonb_build_object('id', ev.id, 'event', ev.event, 'timestamp', $2, 'data', ev.data), $2
      FROM ev
  ), dl AS (
    -- and their webhook deliveries, the rows fan_out() writes, in one statement
    -- (neither event sends an e-mail: fan_out() mails for invoice.finalized only)
    INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, endpoint_id, recipient,
        body, next_attempt_at, created_at, updated_at)
    SELECT w.org_id, fluxrate_internal.uuid_v7(), ev.id, ev.event, 'webhook', w.id, w.url,
           jsonb_build_object('event', ev.event, 'timestamp', $2, 'data', ev.data)::text, $2, $2, $2
      FROM ev
      JOIN fluxrate_internal.webhook_endpoints w ON w.org_id = ev.org_id AND w.status = 'ACTIVE'
           AND (w.event_types = '{}' OR ev.event = ANY (w.event_types))
    RETURNING 1
  )
$sql$ $fn$;

-- The closing statement: its parts in order (defined after them: a SQL body is
-- checked at CREATE).
-- PL/pgSQL, not SQL: close_sql_discounts() is defined later, in 56_discounts.sql
-- (a SQL body is checked at CREATE, a PL/pgSQL one when it runs).
CREATE FUNCTION fluxrate_internal.close_statement() RETURNS text
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  RETURN 'WITH '
         || fluxrate_internal.close_sql_periods() || ', '
         || fluxrate_internal.close_sql_charge_lines() || ', '
         || fluxrate_internal.close_sql_late_lines() || ', '
         || fluxrate_internal.close_sql_minimum() || ', '
         || fluxrate_internal.close_sql_lines() || ', '
         -- the discounts read dctx (the invoices) and lines
         -- ($6: the batch's organizations have active redemptions; else none to read)
         || 'dctx AS (SELECT sb.org_id, sb.sub_id, sb.customer_id, sb.plan_id, sb.invoice_id, sb.currency, sb.ps, sb.pe, sb.nominal_start AS nps FROM sb WHERE $6), '
         || fluxrate_internal.close_sql_discounts() || ', '
         || fluxrate_internal.close_sql_invoices() || ', '
         || fluxrate_internal.close_sql_advance() || ', '
         || fluxrate_internal.close_sql_outbox()
         || ' SELECT count(*) FROM dl';
END
$$;

-- Errors that say nothing about the row being processed: serialization failures
-- and deadlocks (class 40), a lock not available (55P03), lack of resources (53),
-- operator intervention (57), system errors (58).  The jobs let these end the run
-- (the next run retries) instead of marking a subscription or an invoice as failed.
CREATE FUNCTION fluxrate_internal.transient_error(sqlstate text) RETURNS boolean
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT left(sqlstate, 2) IN ('40', '53', '57', '58') OR sqlstate = '55P03'
$$;

-- How long a subscription or an invoice that failed attempts times waits before
-- the next try: 5 minutes, doubling, at most a day.
CREATE FUNCTION fluxrate_internal.retry_delay(attempts integer) RETURNS interval
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT least(interval '5 minutes' * power(2, least(greatest(attempts, 1) - 1, 20)), interval '1 day')
$$;

-- The closer's fallback when a batch fails: the same subscriptions, each closed
-- alone in a subtransaction, so that one subscription that cannot be closed (a
-- bug, bad data) does not stop billing for every organization behind it in the
-- due order.  The failing one keeps its period; its error is kept on it
-- (close_error, shown by get_subscription) and it is retried after 5 minutes,
-- doubling per attempt up to a day.  Only runs after a batch failed, so the
-- normal path has no subtransaction per row.  Returns how many it handled.
CREATE FUNCTION fluxrate_internal.sys_close_isolated(batch_size integer DEFAULT 2000) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
  n integer := 0;
  v_now timestamptz := fluxrate.now();
  v_state text;
  v_msg text;
  v_attempts integer;
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  FOR r IN
    SELECT x.org_id, x.id, x.current_period_end, x.close_error
      FROM unnest(fluxrate_internal.sys_close_claim(batch_size)) x
  LOOP
    BEGIN
      PERFORM fluxrate_internal.sys_close_batch(1, r.id);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF fluxrate_internal.transient_error(v_state) THEN
        RAISE;
      END IF;
      v_attempts := coalesce((r.close_error->>'attempts')::integer, 0) + 1;
      UPDATE fluxrate_internal.subscriptions x
         SET close_retry_at = v_now + fluxrate_internal.retry_delay(v_attempts),
             close_error = jsonb_build_object('sqlstate', v_state, 'message', v_msg, 'at', v_now,
                                              'attempts', v_attempts, 'period_end', r.current_period_end)
       WHERE x.org_id = r.org_id AND x.id = r.id;
      RAISE WARNING 'fluxrate: could not close the period of subscription %', r.id
        USING DETAIL = format('%s: %s', v_state, v_msg),
              HINT = 'The other subscriptions were closed; this one is retried later (close_error on the subscription).';
    END;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

