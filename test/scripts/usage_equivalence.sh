#!/usr/bin/env bash
# Every path that computes a meter's usage agrees with the reference
# fluxrate_internal.meter_usage(org, customer, meter, start, end), and with a
# second, independent reference written here in plain SQL straight from
# docs/rating.md (public.uq_ref: SUM, COUNT, MAX/MIN with trim_scale, AVG,
# UNIQUE_COUNT as count(DISTINCT), LAST by ORDER BY ... LIMIT 1, WEIGHTED_SUM
# with lead() over the carried-in level and the period's events, the filters
# as text comparisons), on a seeded random data set (EQ_SEED=N, 0-999):
#   - two organizations sharing customer external ids, meter names, feature
#     lookup keys and plan lookup ids (nothing may cross organizations);
#   - every aggregation type x every filter operator (eq, neq, in, not_in,
#     exists) and a meter with three filters, on JSON metadata with and without
#     the property (JSON null, numbers 1 and 1.0 against the text "1", "EU");
#   - events exactly at the period bounds and 1 microsecond either side, tied
#     timestamps and tied ingestion times, quantities with 0 to 12 decimals and
#     the same value at several scales (1.5, 1.50, 1.500000000000), a customer
#     without events, periods without events (before any, and after all: the
#     WEIGHTED_SUM level carried in), a 1-microsecond period, a period that
#     contains now and events after it;
#   - events bulk-inserted into usage_events, and events sent through
#     fluxrate.track (trusted act_as and API key, meter_token + quantity and
#     meter_name + properties) and fluxrate.track_batch (key and act_as), with
#     replays, conflicts and refusals; every stored event is checked against
#     what was sent (quantity text, timestamp, ingestion time, metadata).
# Paths: meter_usage; period_usage (its per-pair path, and its whole-
# organization path: one period, at least half of the customers; which one
# ran is checked with pg_stat_get_xact_function_calls); org_period_usage
# (SUM, COUNT, MAX, MIN, AVG; a meter subset and all meters; whole-UTC-day
# periods through the usage rollups, refreshed after the bulk events, with the
# tracked events as their tail, and again from the events alone); these again
# under forced parallel plans; the API get_meter_usage (total, every bucket,
# event counts, unique customers; one customer or all; and under another
# session time zone), get_meter_stats (today, this week, this month at three
# clocks; all-time events, customers, first/last event),
# get_subscription_usage, get_customer_usage, check_entitlement (usage in its
# window, window start, allowed); another organization's ids find nothing.
# Values are compared exactly (numeric =), and their text (scale)
# separately; any difference of either kind fails (EQ_STRICT=0 only reports
# text differences), and so does a failed check (an API call that errors, a
# wrong window, a wrong bucket list, ...).  EQ_KEEP=1 leaves the cluster
# running after a failure; EQ_MUTATE='SQL' runs SQL first (a broken copy of a
# path, to see that it is noticed).
#
# Found here and fixed on 2026-11-30: check_entitlement raised 22023 on a
# WEIGHTED_SUM feature for a subscription that starts later, and without a reset
# period counted [current_period_start, now + 5 min), past a period that had
# ended and was not closed yet; LAST and WEIGHTED_SUM ties between events sent
# together went either way (the ids' random bits); create_feature(filters =>
# '[]') failed; a UNIQUE_COUNT meter could require one property and count
# another.  Printed as a note: the checks on periods that have ended and are not
# closed yet (their window is the next period).
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start uequiv "track_functions = 'pl'"   # (to see which period_usage() path ran)
export PGTZ=UTC PGOPTIONS='-c client_min_messages=warning'
trap 'fail "a command failed (line $LINENO)"' ERR
t0=$(date +%s.%N)
lap() { awk -v s="$t0" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f s", e - s }'; }
SEED=${EQ_SEED:-0}
[[ $SEED =~ ^[0-9]+$ ]] && [ "$SEED" -lt 1000 ] || fail "EQ_SEED must be an integer from 0 to 999"
echo "seed $SEED"
NOW='2027-03-20 12:00:00+00'         # a Saturday; the ISO week started Monday 2027-03-15
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '$NOW'"
# EQ_MUTATE='SQL': run before anything else, e.g. a CREATE OR REPLACE of one of the paths with a
# bug in it, to see that this script notices
if [ -n "${EQ_MUTATE:-}" ]; then echo "mutation: $EQ_MUTATE" | head -c 300; echo; q "$EQ_MUTATE" >/dev/null; fi

# ---------------------------------------------------------------------------
# The scenario, the independent reference, the comparison table
# ---------------------------------------------------------------------------
qf <<'SQL'
SET TimeZone = 'UTC';
CREATE TABLE public.uq_orgs (tag text PRIMARY KEY, org_id uuid UNIQUE, key text);
CREATE TABLE public.uq_meters (org_id uuid, meter_id uuid, feature_id uuid, token text, name text, agg text, variant text,
  filters jsonb, prop text, n integer, PRIMARY KEY (org_id, meter_id));
CREATE TABLE public.uq_customers (org_id uuid, customer_id uuid, ext text, heavy boolean DEFAULT false, empty boolean DEFAULT false,
  PRIMARY KEY (org_id, customer_id));
CREATE TABLE public.uq_periods (k integer PRIMARY KEY, label text, ps timestamptz, pe timestamptz, group_by text);
CREATE TABLE public.uq_bounds (t timestamptz PRIMARY KEY);
-- what was sent through track / track_batch, and what should have come of it
CREATE TABLE public.uq_sends (org_id uuid, n integer, mode text, batch integer, meter_id uuid, ext text, qty text,
  ts timestamptz, md jsonb, props jsonb, idem text, at timestamptz, expect text, want_qty text, want_md jsonb,
  got text, PRIMARY KEY (org_id, n));
-- every comparison: what a path answered (got; NULL = no answer), meter_usage's answer (ref1;
-- NULL where meter_usage cannot say, e.g. an AVG over all customers) and the independent one (ref2)
CREATE TABLE public.uq_cmp (path text, org_id uuid, customer_id uuid, meter_id uuid, ps timestamptz, pe timestamptz,
  got numeric, ref1 numeric, ref2 numeric, note text);
CREATE TABLE public.uq_checks (what text, ok boolean, detail text);
CREATE TABLE public.uq_pairs (org_id uuid, meter_id uuid, customer_id uuid);

CREATE FUNCTION public.pick(a anyarray) RETURNS anyelement LANGUAGE sql VOLATILE
  AS $$ SELECT a[1 + floor(random() * cardinality(a))::int] $$;

-- ---- the independent reference (docs/rating.md) --------------------------
-- Filters: all must match; compared as text against metadata; neq and not_in also
-- match an event that lacks the property.
CREATE FUNCTION public.uq_match(md jsonb, filters jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
  SELECT coalesce(bool_and(CASE f->>'operator'
           WHEN 'eq' THEN coalesce(md->>(f->>'property') = (f->'values'->>0), false)
           WHEN 'neq' THEN md->>(f->>'property') IS NULL OR md->>(f->>'property') <> (f->'values'->>0)
           WHEN 'in' THEN coalesce(md->>(f->>'property') = ANY (ARRAY(SELECT jsonb_array_elements_text(f->'values'))), false)
           WHEN 'not_in' THEN md->>(f->>'property') IS NULL
                           OR NOT (md->>(f->>'property') = ANY (ARRAY(SELECT jsonb_array_elements_text(f->'values'))))
           WHEN 'exists' THEN coalesce(md ? (f->>'property'), false) END), true)
    FROM jsonb_array_elements(filters) f
$$;

-- The usage of one customer (or, v_cust NULL, of all customers: the events taken together for
-- SUM, COUNT, MAX, MIN, AVG and UNIQUE_COUNT, the sum over customers for LAST and WEIGHTED_SUM,
-- as docs/rating.md says of the meter analytics) on one meter over [s, e); v_agg overrides the
-- meter's aggregation (COUNT: the number of matching events).
CREATE FUNCTION public.uq_ref(v_org uuid, v_cust uuid, v_meter uuid, s timestamptz, e timestamptz, v_agg text DEFAULT NULL)
  RETURNS numeric LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  m record; r numeric; agg text;
BEGIN
  SELECT * INTO STRICT m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = v_meter;
  agg := coalesce(v_agg, m.aggregation_type);
  IF s > e THEN
    RETURN 0;                            -- an empty range: no event
  END IF;
  IF v_cust IS NULL AND agg IN ('LAST', 'WEIGHTED_SUM') THEN
    SELECT coalesce(sum(public.uq_ref(v_org, c.id, v_meter, s, e, agg)), 0) INTO r
      FROM fluxrate_internal.customers c WHERE c.org_id = v_org
       AND c.id IN (SELECT x.customer_id FROM public.uq_pairs x WHERE x.meter_id = v_meter);   -- (the others have no event: 0)
    RETURN r;
  END IF;
  IF agg = 'WEIGHTED_SUM' THEN
    -- each event sets the level until the next one (by timestamp, ingestion time, id); the
    -- last event before s sets the level at s; level x seconds / 3600 per segment, where the
    -- seconds are the difference of the two instants' epochs (scale 6)
    WITH carry AS (
      SELECT x.quantity, x."timestamp" AS ts, x.ingested_at, x.id FROM fluxrate_internal.usage_events x
       WHERE x.org_id = v_org AND x.customer_id = v_cust AND x.meter_id = v_meter AND x."timestamp" < s
         AND public.uq_match(x.metadata, m.filters)
       ORDER BY x."timestamp" DESC, x.ingested_at DESC, x.id DESC LIMIT 1
    ), pts AS (
      SELECT c.quantity AS level, s AS t, c.ts, c.ingested_at, c.id FROM carry c
      UNION ALL
      SELECT x.quantity, x."timestamp", x."timestamp", x.ingested_at, x.id FROM fluxrate_internal.usage_events x
       WHERE x.org_id = v_org AND x.customer_id = v_cust AND x.meter_id = v_meter
         AND x."timestamp" >= s AND x."timestamp" < e AND public.uq_match(x.metadata, m.filters)
    ), seg AS (
      SELECT p.level, p.t, lead(p.t, 1, e) OVER (ORDER BY p.ts, p.ingested_at, p.id) AS t2 FROM pts p
    )
    SELECT coalesce(sum(g.level * (extract(epoch FROM g.t2) - extract(epoch FROM g.t)) / 3600), 0) INTO r FROM seg g;
    RETURN r;
  END IF;
  WITH ev AS (
    SELECT x.quantity AS q, x."timestamp" AS ts, x.ingested_at, x.id, x.metadata AS md FROM fluxrate_internal.usage_events x
     WHERE x.org_id = v_org AND (v_cust IS NULL OR x.customer_id = v_cust) AND x.meter_id = v_meter
       AND x."timestamp" >= s AND x."timestamp" < e AND public.uq_match(x.metadata, m.filters)
  )
  SELECT CASE agg
      WHEN 'SUM' THEN (SELECT coalesce(sum(q), 0) FROM ev)
      WHEN 'COUNT' THEN (SELECT count(*)::numeric FROM ev)
      WHEN 'MAX' THEN coalesce((SELECT trim_scale(q) FROM ev ORDER BY q DESC LIMIT 1), 0)
      WHEN 'MIN' THEN coalesce((SELECT trim_scale(q) FROM ev ORDER BY q LIMIT 1), 0)
      WHEN 'AVG' THEN (SELECT coalesce(sum(q) / count(*), 0) FROM ev)
      WHEN 'UNIQUE_COUNT' THEN (SELECT count(DISTINCT md->>m.property_name)::numeric FROM ev)
      WHEN 'LAST' THEN coalesce((SELECT q FROM ev ORDER BY ts DESC, ingested_at DESC, id DESC LIMIT 1), 0)
    END INTO r;
  RETURN r;
END
$fn$;

-- meter_usage() over every customer of the organization, where the docs make that the answer
-- for all customers (SUM and COUNT add up, MAX is the largest; LAST and WEIGHTED_SUM are
-- the sum over customers); NULL otherwise (MIN, AVG, UNIQUE_COUNT are not derivable)
CREATE FUNCTION public.uq_mu_all(v_org uuid, v_meter uuid, s timestamptz, e timestamptz) RETURNS numeric
  LANGUAGE sql STABLE AS $$
  SELECT CASE m.aggregation_type
           WHEN 'MAX' THEN (SELECT coalesce(max(fluxrate_internal.meter_usage(v_org, c.id, v_meter, s, e)), 0)
                              FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id IN (SELECT x.customer_id FROM public.uq_pairs x WHERE x.meter_id = v_meter))
           WHEN 'MIN' THEN NULL WHEN 'AVG' THEN NULL WHEN 'UNIQUE_COUNT' THEN NULL
           ELSE (SELECT coalesce(sum(fluxrate_internal.meter_usage(v_org, c.id, v_meter, s, e)), 0)
                   FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id IN (SELECT x.customer_id FROM public.uq_pairs x WHERE x.meter_id = v_meter)) END
    FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = v_meter
$$;

-- ---- the scenario --------------------------------------------------------
-- A quantity for a meter: a few values at several scales (ties for MAX, MIN and LAST that
-- differ only in scale), or random ones with 0 to 12 decimals.
CREATE FUNCTION public.uq_qty(agg text) RETURNS text LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v text;
BEGIN
  IF agg IN ('COUNT', 'UNIQUE_COUNT') THEN
    RETURN public.pick(ARRAY['1', '1', '1', '1.0', '2', '0.5']);
  END IF;
  IF random() < 0.45 THEN
    v := public.pick(ARRAY['0', '1.5', '1.50', '1.500000000000', '2', '2.0', '2.000', '10', '10.00', '0.000000000001',
                           '999999999999.999999999999', '7.25', '7.250', '0.1', '0.10', '3.333333333333', '100']);
  ELSE
    v := round((random() * 1000)::numeric, public.pick(ARRAY[0, 1, 2, 3, 6, 12]))::text;
  END IF;
  IF agg = 'SUM' AND v::numeric = 0 THEN
    v := '0.000000000001';               -- SUM events are positive (track refuses 0)
  END IF;
  RETURN v;
END
$fn$;

-- Metadata: region (eu, us, apac, EU, JSON null, missing), tier (present, JSON null, empty
-- string, missing), user_id (u0-u5, the number 1, the number 1.0, the string "1", JSON null,
-- missing), sku; sometimes no metadata at all.
CREATE FUNCTION public.uq_md() RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  md jsonb := '{}'; r float8;
BEGIN
  IF random() < 0.03 THEN
    RETURN NULL;
  END IF;
  r := random();
  md := md || CASE WHEN r < 0.3 THEN '{"region": "eu"}' WHEN r < 0.5 THEN '{"region": "us"}' WHEN r < 0.62 THEN '{"region": "apac"}'
                   WHEN r < 0.68 THEN '{"region": "EU"}' WHEN r < 0.72 THEN '{"region": null}' ELSE '{}' END::jsonb;
  r := random();
  md := md || CASE WHEN r < 0.4 THEN '{"tier": "gold"}' WHEN r < 0.45 THEN '{"tier": null}' WHEN r < 0.5 THEN '{"tier": ""}'
                   ELSE '{}' END::jsonb;
  r := random();
  md := md || CASE WHEN r < 0.6 THEN jsonb_build_object('user_id', 'u' || floor(random() * 6)) WHEN r < 0.65 THEN '{"user_id": 1}'
                   WHEN r < 0.7 THEN '{"user_id": 1.0}' WHEN r < 0.75 THEN '{"user_id": "1"}' WHEN r < 0.8 THEN '{"user_id": null}'
                   ELSE '{}' END::jsonb;
  IF random() < 0.5 THEN
    md := md || jsonb_build_object('sku', 's' || floor(random() * 4));
  END IF;
  RETURN md;
END
$fn$;

-- Meters (8 aggregations x 7 filter variants), customers, plans with features and charges,
-- an API key, subscriptions.  Organization B gets the same names, created in another order.
CREATE FUNCTION public.uq_build(v_tag text, v_org uuid, n_customers integer, seed float8) RETURNS void
  LANGUAGE plpgsql AS $fn$
DECLARE
  a text; v record; f jsonb; i integer := 0; p_all uuid; p_some uuid; p_trial uuid; p_day uuid; c record; m record;
  v_key jsonb; v_sub jsonb;
BEGIN
  PERFORM setseed(seed);
  PERFORM set_config('fluxrate.pinned_now', '2026-12-01 00:00:00+00', true);
  PERFORM fluxrate.act_as(v_org);
  FOR v IN
    SELECT x.a, y.k, y.variant, y.filters FROM unnest(ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'UNIQUE_COUNT', 'LAST', 'WEIGHTED_SUM']) WITH ORDINALITY x(a, i),
      (VALUES (1, 'none', '[]'::jsonb),
              (2, 'eq', '[{"property": "region", "operator": "eq", "values": ["eu"]}]'),
              (3, 'neq', '[{"property": "region", "operator": "neq", "values": ["eu"]}]'),
              (4, 'in', '[{"property": "region", "operator": "in", "values": ["eu", "apac"]}]'),
              (5, 'not_in', '[{"property": "region", "operator": "not_in", "values": ["eu", "apac"]}]'),
              (6, 'exists', '[{"property": "tier", "operator": "exists"}]'),
              (7, 'multi', '[{"property": "region", "operator": "in", "values": ["eu", "us"]}, {"property": "tier", "operator": "exists"},
                             {"property": "user_id", "operator": "neq", "values": [1]}]')) y(k, variant, filters)
    ORDER BY CASE WHEN v_tag = 'A' THEN x.i * 10 + y.k ELSE -(x.i * 10 + y.k) END
  LOOP
    i := i + 1;
    a := v.a;
    f := fluxrate.create_feature(name => lower(a) || ' ' || v.variant, lookup_key => lower(a) || '_' || v.variant, type => 'meter',
           meter_name => lower(a) || '_' || v.variant,
           property_name => CASE WHEN a = 'UNIQUE_COUNT' THEN CASE WHEN v.variant = 'neq' THEN 'sku' END
                                 WHEN a = 'COUNT' THEN NULL ELSE 'v' END,
           aggregation_type => a, unit => 'u',
           filters => CASE WHEN v.variant = 'none' THEN NULL ELSE v.filters END);
    INSERT INTO public.uq_meters
    SELECT v_org, x.id, x.feature_id, x.meter_token::text, x.meter_name, x.aggregation_type, v.variant, x.filters, x.property_name, i
      FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = (f->>'meter_id')::uuid;
  END LOOP;
  -- customers c01.. (c01 has many more events), and one without any event
  FOR i IN 1..n_customers LOOP
    f := fluxrate.create_customer(name => 'Customer ' || i, email => 'c' || i || '@example.com', external_id => 'c' || lpad(i::text, 2, '0'));
    INSERT INTO public.uq_customers VALUES (v_org, (f->>'id')::uuid, f->>'external_id', i = 1, false);
  END LOOP;
  f := fluxrate.create_customer(name => 'Quiet', email => 'quiet@example.com', external_id => 'c_empty');
  INSERT INTO public.uq_customers VALUES (v_org, (f->>'id')::uuid, 'c_empty', false, true);
  -- plans: every meter as a feature (reset periods, limits and soft limits varied), a weekly
  -- one with usage charges (and features on two of the same meters), a trial, a daily one
  p_all := ((fluxrate.create_plan(name => 'All', lookup_id => 'all', type => 'USAGE', billing_interval => 'month', currency => 'USD'))->>'id')::uuid;
  p_some := ((fluxrate.create_plan(name => 'Some', lookup_id => 'some', type => 'USAGE', billing_interval => 'week', currency => 'EUR'))->>'id')::uuid;
  p_trial := ((fluxrate.create_plan(name => 'Trial', lookup_id => 'trial', type => 'USAGE', billing_interval => 'month', currency => 'USD',
                trial_days => 14))->>'id')::uuid;
  p_day := ((fluxrate.create_plan(name => 'Day', lookup_id => 'day', type => 'USAGE', billing_interval => 'day', currency => 'USD'))->>'id')::uuid;
  FOR m IN SELECT * FROM public.uq_meters x WHERE x.org_id = v_org ORDER BY x.n LOOP
    PERFORM fluxrate.add_plan_feature(p_all, m.feature_id, is_enabled => m.n % 9 <> 4,
      usage_limit => public.pick(ARRAY[NULL, 3, 50, 5000]::numeric[]),
      usage_reset_period => (ARRAY[NULL, 'day', 'week', 'month', 'year'])[1 + m.n % 5],
      is_soft_limit => random() < 0.3);
    IF m.n % 7 = 3 THEN
      PERFORM fluxrate.add_charge(p_some, 'USAGE', meter_id => m.meter_id, unit_price => 0.01);
    END IF;
    IF m.n % 7 = 3 AND m.n % 2 = 0 OR m.n % 11 = 0 THEN
      PERFORM fluxrate.add_plan_feature(p_some, m.feature_id, usage_limit => 10, usage_reset_period => 'week');
    END IF;
    IF m.n % 6 = 1 THEN
      PERFORM fluxrate.add_plan_feature(p_trial, m.feature_id, usage_limit => 100);
      PERFORM fluxrate.add_plan_feature(p_day, m.feature_id, usage_reset_period => 'day', usage_limit => 20);
    END IF;
  END LOOP;
  v_key := fluxrate.create_api_key('writer', ARRAY['usage.write']);
  INSERT INTO public.uq_orgs VALUES (v_tag, v_org, v_key->>'key');
  -- subscriptions, created "now" (the current periods: one that contains now, one that ended
  -- and was not closed yet, one that starts exactly now, one in the future, a trial, ...)
  PERFORM set_config('fluxrate.pinned_now', '2027-03-20 12:00:00+00', true);
  FOR c IN SELECT * FROM public.uq_customers x WHERE x.org_id = v_org ORDER BY x.ext LOOP
    CASE c.ext
      WHEN 'c01' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_all,
          start_date => '2027-02-25 13:37:00+00'::timestamptz + floor(random() * 86400) * interval '1 second');
      WHEN 'c02' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-03-01 00:00:00+00', alignment => 'calendar');
      WHEN 'c03' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-01-17 10:00:00+00', backfill => true);   -- ended, not closed
      WHEN 'c04' THEN
        -- (created at two clocks: check_entitlement takes the older of two subscriptions)
        PERFORM set_config('fluxrate.pinned_now', '2027-03-20 11:00:00+00', true);
        PERFORM fluxrate.create_subscription(c.customer_id, p_some, start_date => '2027-03-15 00:00:00+00');
        PERFORM set_config('fluxrate.pinned_now', '2027-03-20 12:00:00+00', true);
        PERFORM fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-03-20 12:00:00+00');   -- starts now
      WHEN 'c05' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_trial, start_date => '2027-03-10 06:00:00+00');
      WHEN 'c06' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_day, start_date => '2027-03-01 00:00:00+00', backfill => true);
      WHEN 'c07' THEN
        PERFORM set_config('fluxrate.pinned_now', '2027-03-20 10:00:00+00', true);
        v_sub := fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-03-01 00:00:00+00');
        PERFORM fluxrate.cancel_subscription((v_sub->>'id')::uuid, cancel_at_period_end => false, reason => 'test');
        PERFORM set_config('fluxrate.pinned_now', '2027-03-20 12:00:00+00', true);
        PERFORM fluxrate.create_subscription(c.customer_id, p_some, start_date => '2027-03-13 00:00:00+00');
      WHEN 'c08' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-04-15 00:00:00+00');  -- in the future
      WHEN 'c_empty' THEN
        PERFORM fluxrate.create_subscription(c.customer_id, p_all, start_date => '2027-03-01 00:00:00+00', alignment => 'calendar');
      ELSE
        NULL;
    END CASE;
  END LOOP;
END
$fn$;

-- Bulk events straight into usage_events for every (customer, meter) pair with probability
-- `share`, 0..density events each (the heavy customer 4 times as many): timestamps anywhere
-- from Dec 20 to Mar 28 (after now, too), exactly on a bound, 1 microsecond either side of
-- one, or tied with the previous event; ingestion times tied now and then (the id decides).
-- Ids from the seed: reproducible, and not in time order.
CREATE FUNCTION public.uq_bulk(v_org uuid, density integer, share float8, seed float8) RETURNS integer
  LANGUAGE plpgsql AS $fn$
DECLARE
  pr record; j integer; n integer := 0; r float8; ts timestamptz; prev timestamptz; ing timestamptz; prev_ing timestamptz;
  bounds timestamptz[] := ARRAY(SELECT t FROM public.uq_bounds ORDER BY t);
BEGIN
  PERFORM setseed(seed);
  CREATE TEMP TABLE IF NOT EXISTS uq_new (sortkey float8, customer_id uuid, meter_id uuid, quantity numeric, ts timestamptz,
    ingested timestamptz, metadata jsonb);
  TRUNCATE uq_new;
  FOR pr IN
    SELECT c.customer_id, c.heavy, m.meter_id, m.agg, m.prop FROM public.uq_customers c JOIN public.uq_meters m ON m.org_id = c.org_id
     WHERE c.org_id = v_org AND NOT c.empty ORDER BY c.ext, m.n
  LOOP
    CONTINUE WHEN random() >= share;
    prev := NULL; prev_ing := NULL;
    FOR j IN 1..floor(random() * (density + 1) * CASE WHEN pr.heavy THEN 4 ELSE 1 END)::int LOOP
      r := random();
      ts := CASE WHEN r < 0.15 THEN public.pick(bounds)
                 WHEN r < 0.22 THEN public.pick(bounds) + public.pick(ARRAY[interval '1 microsecond', interval '-1 microsecond'])
                 WHEN r < 0.3 AND prev IS NOT NULL THEN prev
                 ELSE timestamptz '2026-12-20 00:00:00+00' + random() * interval '98 days' END;
      ing := CASE WHEN random() < 0.25 AND prev_ing IS NOT NULL THEN prev_ing
                  ELSE ts + floor(random() * 172800) * interval '1 second' - interval '4 minutes' END;
      INSERT INTO uq_new VALUES (random(), pr.customer_id, pr.meter_id, public.uq_qty(pr.agg)::numeric, ts, ing, public.uq_md());
      prev := ts; prev_ing := ing;
      n := n + 1;
    END LOOP;
    -- LAST and WEIGHTED_SUM: now and then 2-4 events at one instant, the last one of a period
    -- (a bound minus 1 microsecond) or its first (a bound), most of them ingested at one time too:
    -- only the id can order those
    IF pr.agg IN ('LAST', 'WEIGHTED_SUM') AND random() < 0.5 THEN
      ts := public.pick(bounds) - CASE WHEN random() < 0.7 THEN interval '1 microsecond' ELSE interval '0' END;
      ing := ts + floor(random() * 86400) * interval '1 second';
      FOR j IN 1..2 + floor(random() * 3)::int LOOP
        INSERT INTO uq_new VALUES (random(), pr.customer_id, pr.meter_id, public.uq_qty(pr.agg)::numeric, ts,
          CASE WHEN random() < 0.8 THEN ing ELSE ing + floor(random() * 3) * interval '1 second' END, public.uq_md());
        n := n + 1;
      END LOOP;
    END IF;
  END LOOP;
  INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
  -- (ids from the seed and the organization's tag, not its generated id: ties come out the same on every run)
  SELECT v_org, md5(seed::text || '/' || (SELECT o.tag FROM public.uq_orgs o WHERE o.org_id = v_org) || '/'
                    || row_number() OVER (ORDER BY e.sortkey))::uuid,
         e.customer_id, e.meter_id, e.quantity, e.ts, e.ingested, e.metadata
    FROM uq_new e ORDER BY e.sortkey;
  RETURN n;
END
$fn$;

-- What to send through track and track_batch: n_single single calls (act_as or the API key;
-- meter_token + quantity or meter_name + properties), replays, conflicts and refusals among
-- them, and batches of n_per_batch events.  Single calls get distinct clocks (their ingestion
-- times), a batch one clock; timestamps up to now (4 minutes ahead of a call's clock, too).
CREATE FUNCTION public.uq_plan_sends(v_tag text, v_org uuid, n_single integer, n_batches integer, n_per_batch integer, seed float8)
  RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
  i integer; b integer; j integer; n integer := 0; m record; ext text; qty text; ts timestamptz; at timestamptz; md jsonb; props jsonb;
  mode text; idem text; want_qty text; want_md jsonb; r float8; o record;
  v_now timestamptz := '2027-03-20 12:00:00+00';
  bounds timestamptz[] := ARRAY(SELECT t FROM public.uq_bounds WHERE t < v_now - interval '1 hour' ORDER BY t);
  exts text[] := ARRAY(SELECT c.ext FROM public.uq_customers c WHERE c.org_id = v_org AND NOT c.empty ORDER BY c.ext) || ARRAY['n01'];
BEGIN
  PERFORM setseed(seed);
  FOR i IN 1..n_single LOOP
    SELECT * INTO m FROM public.uq_meters x WHERE x.org_id = v_org ORDER BY random() LIMIT 1;
    ext := public.pick(exts);
    mode := public.pick(ARRAY['token_act', 'token_key', 'props_act', 'props_key']);
    r := random();
    ts := CASE WHEN r < 0.08 THEN NULL
               WHEN r < 0.35 THEN public.pick(bounds)
               ELSE timestamptz '2027-01-01 00:00:00+00' + random() * (v_now - interval '1 hour' - timestamptz '2027-01-01 00:00:00+00') END;
    at := CASE WHEN ts IS NULL THEN v_now - (n_single - i + 1) * interval '37 seconds'
               WHEN random() < 0.05 THEN ts - interval '4 minutes'
               ELSE least(ts + random() * interval '3 days', v_now - i * interval '1 microsecond') END;
    qty := public.uq_qty(m.agg);
    md := public.uq_md();
    IF m.agg = 'UNIQUE_COUNT' AND (md IS NULL OR md->>m.prop IS NULL) THEN
      md := coalesce(md, '{}') || jsonb_build_object(m.prop, 'u' || floor(random() * 6));
    END IF;
    props := NULL;
    want_qty := qty;
    IF mode LIKE 'props%' THEN
      -- the quantity (and the region, when there is one) as properties; the rest as metadata
      IF m.agg IN ('COUNT', 'UNIQUE_COUNT') THEN
        props := coalesce(md, '{}');
        want_qty := '1';
      ELSE
        props := jsonb_build_object('v', CASE WHEN random() < 0.2 THEN to_jsonb(qty) ELSE to_jsonb(qty::numeric) END)
                 || CASE WHEN md ? 'region' THEN jsonb_build_object('region', md->'region') ELSE '{}' END;
      END IF;
      md := CASE WHEN md IS NULL THEN NULL ELSE md - 'region' END;
      IF md = '{}' THEN md := NULL; END IF;
      want_md := CASE WHEN md IS NULL THEN props ELSE props || md END;
    ELSE
      IF m.agg IN ('COUNT', 'UNIQUE_COUNT') AND random() < 0.3 THEN
        qty := NULL; want_qty := '1';
      END IF;
      want_md := md;
    END IF;
    idem := CASE WHEN random() < 0.97 THEN 'S-' || v_tag || '-' || i END;
    n := n + 1;
    INSERT INTO public.uq_sends VALUES (v_org, n, mode, NULL, m.meter_id, ext, qty, ts, md, props, idem, at, 'created', want_qty, want_md);
  END LOOP;
  -- replays (same payload, later), conflicts (same key, another quantity), refusals
  FOR o IN SELECT * FROM public.uq_sends s WHERE s.org_id = v_org AND s.idem IS NOT NULL ORDER BY s.n LOOP
    r := random();
    IF r < 0.05 THEN
      n := n + 1;
      INSERT INTO public.uq_sends VALUES (v_org, n, o.mode, NULL, o.meter_id, o.ext, o.qty, o.ts, o.md, o.props, o.idem,
        v_now - interval '1 minute' + n * interval '1 microsecond', 'replay');
    ELSIF r < 0.08 AND o.mode LIKE 'token%' AND o.qty IS NOT NULL THEN
      n := n + 1;
      INSERT INTO public.uq_sends VALUES (v_org, n, o.mode, NULL, o.meter_id, o.ext, (o.qty::numeric + 1)::text, o.ts, o.md, o.props, o.idem,
        v_now - interval '1 minute' + n * interval '1 microsecond', 'PT409');
    END IF;
  END LOOP;
  SELECT * INTO m FROM public.uq_meters x WHERE x.org_id = v_org AND x.agg = 'SUM' AND x.variant = 'none';
  n := n + 1;
  INSERT INTO public.uq_sends VALUES (v_org, n, 'token_key', NULL, m.meter_id, 'c02', '-1', NULL, NULL, NULL, 'X-' || v_tag || '-1',
    v_now - interval '50 seconds', 'PT422');
  n := n + 1;
  INSERT INTO public.uq_sends VALUES (v_org, n, 'token_act', NULL, m.meter_id, 'c02', '1.0000000000001', NULL, NULL, NULL, 'X-' || v_tag || '-2',
    v_now - interval '49 seconds', 'PT422');
  n := n + 1;
  INSERT INTO public.uq_sends VALUES (v_org, n, 'token_act', NULL, m.meter_id, 'c02', '1', v_now + interval '6 minutes', NULL, NULL,
    'X-' || v_tag || '-3', v_now - interval '48 seconds', 'PT422');

  -- batches (the key, then act_as, alternately): random timestamps (no ties inside a batch:
  -- its events share one ingestion time), one replay of an event of the same batch, one
  -- conflict, one refusal
  FOR b IN 1..n_batches LOOP
    at := v_now - (n_batches - b + 1) * interval '13 seconds';
    FOR j IN 1..n_per_batch LOOP
      SELECT * INTO m FROM public.uq_meters x WHERE x.org_id = v_org ORDER BY random() LIMIT 1;
      ext := public.pick(exts);
      ts := timestamptz '2027-01-01 00:00:00+00' + random() * (at - timestamptz '2027-01-01 00:00:00+00');
      qty := public.uq_qty(m.agg);
      md := public.uq_md();
      IF m.agg = 'UNIQUE_COUNT' AND (md IS NULL OR md->>m.prop IS NULL) THEN
        md := coalesce(md, '{}') || jsonb_build_object(m.prop, 'u' || floor(random() * 6));
      END IF;
      n := n + 1;
      INSERT INTO public.uq_sends VALUES (v_org, n, CASE WHEN b % 2 = 1 THEN 'batch_key' ELSE 'batch_act' END, b, m.meter_id, ext,
        qty, ts, md, NULL, 'B-' || v_tag || '-' || b || '-' || j, at, 'created', qty, md);
    END LOOP;
    SELECT * INTO o FROM public.uq_sends s WHERE s.org_id = v_org AND s.batch = b ORDER BY s.n LIMIT 1;
    n := n + 1;
    INSERT INTO public.uq_sends VALUES (v_org, n, o.mode, b, o.meter_id, o.ext, o.qty, o.ts, o.md, NULL, o.idem, at, 'replay');
    SELECT * INTO o FROM public.uq_sends s WHERE s.org_id = v_org AND s.batch = b ORDER BY s.n LIMIT 1 OFFSET 1;
    n := n + 1;
    INSERT INTO public.uq_sends VALUES (v_org, n, o.mode, b, o.meter_id, o.ext, (o.qty::numeric + 1)::text, o.ts, o.md, NULL, o.idem, at, 'error');
    n := n + 1;
    INSERT INTO public.uq_sends VALUES (v_org, n, o.mode, b, m.meter_id, o.ext, '-5', o.ts, o.md, NULL, NULL, at, 'error');
  END LOOP;
  RETURN n;
END
$fn$;

-- Send them: single calls one by one, each under its own clock (its ingestion time); each
-- batch in one call.  The outcome of each send is recorded in uq_sends.got.
CREATE FUNCTION public.uq_send(v_org uuid) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
  s record; r jsonb; v_key text := (SELECT o.key FROM public.uq_orgs o WHERE o.org_id = v_org); tok text; nm text;
  b integer; arr jsonb; res jsonb; n integer := 0; st text;
BEGIN
  FOR s IN SELECT * FROM public.uq_sends x WHERE x.org_id = v_org AND x.batch IS NULL ORDER BY x.n LOOP
    PERFORM set_config('fluxrate.pinned_now', s.at::text, true);
    SELECT m.token, m.name INTO tok, nm FROM public.uq_meters m WHERE m.org_id = v_org AND m.meter_id = s.meter_id;
    BEGIN
      IF s.mode LIKE '%act' THEN
        PERFORM fluxrate.act_as(v_org);
      ELSE
        PERFORM set_config('fluxrate.acting_org', '', true);   -- the key alone says who calls
        PERFORM set_config('fluxrate.current_org', '', true);
      END IF;
      IF s.mode LIKE 'token%' THEN
        r := fluxrate.track(meter_token => tok, customer_external_id => s.ext, quantity => s.qty::numeric, "timestamp" => s.ts,
               idempotency_key => s.idem, metadata => s.md, api_key => CASE WHEN s.mode LIKE '%key' THEN v_key END);
      ELSE
        r := fluxrate.track(meter_name => nm, customer_external_id => s.ext, properties => s.props, "timestamp" => s.ts,
               idempotency_key => s.idem, metadata => s.md, api_key => CASE WHEN s.mode LIKE '%key' THEN v_key END);
      END IF;
      UPDATE public.uq_sends x SET got = CASE WHEN (r->>'replay')::boolean THEN 'replay' ELSE 'created' END
       WHERE x.org_id = v_org AND x.n = s.n;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE;
      UPDATE public.uq_sends x SET got = st WHERE x.org_id = v_org AND x.n = s.n;
    END;
    n := n + 1;
  END LOOP;
  FOR b IN SELECT DISTINCT x.batch FROM public.uq_sends x WHERE x.org_id = v_org AND x.batch IS NOT NULL ORDER BY 1 LOOP
    PERFORM set_config('fluxrate.pinned_now', (SELECT min(x.at) FROM public.uq_sends x WHERE x.org_id = v_org AND x.batch = b)::text, true);
    -- (quantities as JSON numbers written from their text: the scale is kept)
    SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object('meter_token', m.token, 'customer_external_id', x.ext,
             'quantity', x.qty::numeric, 'timestamp', to_char(x.ts, 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'), 'idempotency_key', x.idem))
             || CASE WHEN x.md IS NULL THEN '{}' ELSE jsonb_build_object('metadata', x.md) END ORDER BY x.n)
      INTO arr
      FROM public.uq_sends x JOIN public.uq_meters m ON m.org_id = x.org_id AND m.meter_id = x.meter_id
     WHERE x.org_id = v_org AND x.batch = b;
    IF (SELECT min(x.mode) FROM public.uq_sends x WHERE x.org_id = v_org AND x.batch = b) = 'batch_act' THEN
      PERFORM fluxrate.act_as(v_org);
      res := fluxrate.track_batch(arr);
    ELSE
      PERFORM set_config('fluxrate.acting_org', '', true);
      PERFORM set_config('fluxrate.current_org', '', true);
      res := fluxrate.track_batch(arr, v_key);
    END IF;
    UPDATE public.uq_sends x SET got = CASE rr->>'status' WHEN 'error' THEN 'error' ELSE rr->>'status' END
      FROM (SELECT row_number() OVER (ORDER BY y.n) AS i, y.n FROM public.uq_sends y WHERE y.org_id = v_org AND y.batch = b) o,
           jsonb_array_elements(res->'results') rr
     WHERE x.org_id = v_org AND x.n = o.n AND (rr->>'index')::int = o.i - 1;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$fn$;
SQL

ORG_A=$(q "SELECT (fluxrate.create_organization('Usage A'))->>'id'")
ORG_B=$(q "SELECT (fluxrate.create_organization('Usage B'))->>'id'")
# periods: months, an odd week (microseconds), a day, one microsecond, before every event, after
# every event (WEIGHTED_SUM carries the last level in), all time, and one drawn from the seed
{ qf <<SQL
SET TimeZone = 'UTC';
SELECT setseed(0.5 - $SEED / 2000.0);
INSERT INTO public.uq_periods VALUES
  (0, 'before', '2026-06-01', '2026-07-01', 'week'),
  (1, 'jan', '2027-01-01', '2027-02-01', 'month'),
  (2, 'feb', '2027-02-01', '2027-03-01', 'week'),
  (3, 'mar (contains now)', '2027-03-01', '2027-04-01', 'day'),
  (4, 'odd', '2027-02-10 13:37:00.123456', '2027-02-17 08:00:00', 'day'),
  (5, 'a day', '2027-02-14', '2027-02-15', 'hour'),
  (6, '1 microsecond', '2027-02-01 00:00:00', '2027-02-01 00:00:00.000001', 'hour'),
  (7, 'after', '2030-01-01', '2030-02-01', 'week'),
  (8, 'all time', '2026-01-01', '2028-01-01', 'month');
INSERT INTO public.uq_periods
SELECT 9, 'seeded', s, s + (3600 + floor(random() * 20 * 86400)) * interval '1 second', 'day'
  FROM (SELECT timestamptz '2027-01-10' + floor(random() * 60 * 86400 * 1000000) * interval '1 microsecond' AS s) x;
-- the instants events are put on (or 1 microsecond beside): period bounds, subscription period
-- bounds, the entitlement windows around now
INSERT INTO public.uq_bounds
SELECT DISTINCT t FROM (SELECT ps FROM public.uq_periods WHERE k BETWEEN 1 AND 6 OR k = 9 UNION ALL SELECT pe FROM public.uq_periods WHERE k BETWEEN 1 AND 6 OR k = 9
  UNION ALL SELECT unnest(ARRAY['2027-02-25 13:37:00', '2027-03-15 00:00:00', '2027-03-20 00:00:00', '2027-03-20 12:00:00',
                                '2027-03-20 12:05:00', '2027-01-17 10:00:00', '2027-02-17 10:00:00', '2027-03-10 06:00:00',
                                '2027-03-13 00:00:00']::timestamptz[])) x(t);
SELECT public.uq_build('A', '$ORG_A', 20, 0.31 - $SEED / 2000.0);
SELECT public.uq_build('B', '$ORG_B', 8, 0.62 - $SEED / 2000.0);
SQL
} >/dev/null
echo "setup: $(q "SELECT count(*) FROM public.uq_meters") meters, $(q "SELECT count(*) FROM public.uq_customers") customers, $(q "SELECT count(*) FROM fluxrate_internal.subscriptions") subscriptions in 2 organizations; period 9 $(q "SELECT ps || ' - ' || pe FROM public.uq_periods WHERE k = 9") ($(lap))"

# ---------------------------------------------------------------------------
# Events: bulk, then track / track_batch
# ---------------------------------------------------------------------------
bulk=$(q "SELECT public.uq_bulk('$ORG_A', 7, 0.75, 0.11 - $SEED / 2000.0) + public.uq_bulk('$ORG_B', 7, 0.9, 0.22 - $SEED / 2000.0)")
# the usage rollups count the bulk events; the events sent next are their tail
# (org_period_usage reads whole-UTC-day periods as rollups + tail: docs/rollups.md)
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
q "SELECT public.uq_plan_sends('A', '$ORG_A', 360, 4, 150, 0.33 - $SEED / 2000.0), public.uq_plan_sends('B', '$ORG_B', 120, 2, 80, 0.44 - $SEED / 2000.0)" >/dev/null
q "SELECT public.uq_send('$ORG_A') + public.uq_send('$ORG_B')" >/dev/null
# every send had the outcome it should have, and every created event is stored exactly as sent
qf <<'SQL' > /tmp/uq_ingest.$$ || fail "ingestion check"
SET TimeZone = 'UTC';
SELECT 'outcome|' || count(*) || '|' || count(*) FILTER (WHERE got IS DISTINCT FROM expect) FROM public.uq_sends;
SELECT 'badoutcome|' || n || ' ' || mode || ' expected ' || expect || ', got ' || coalesce(got, 'nothing') FROM public.uq_sends
 WHERE got IS DISTINCT FROM expect ORDER BY org_id, n LIMIT 10;
WITH want AS (
  SELECT s.*, c.id AS customer_id FROM public.uq_sends s
    LEFT JOIN fluxrate_internal.customers c ON c.org_id = s.org_id AND c.external_id = s.ext
   WHERE s.expect = 'created' AND s.idem IS NOT NULL
), stored AS (
  SELECT w.n, w.org_id, e.id IS NOT NULL AS found,
         e.customer_id = w.customer_id AND e.meter_id = w.meter_id AND e.quantity::text = w.want_qty
         AND e."timestamp" = coalesce(w.ts, w.at) AND e.ingested_at = w.at AND e.metadata IS NOT DISTINCT FROM w.want_md AS same
    FROM want w LEFT JOIN fluxrate_internal.usage_events e ON e.org_id = w.org_id AND e.idempotency_key = w.idem
)
SELECT 'stored|' || count(*) || '|' || count(*) FILTER (WHERE NOT found) || '|' || count(*) FILTER (WHERE found AND NOT same) FROM stored;
SELECT 'keyless|' || (SELECT count(*) FROM public.uq_sends WHERE expect = 'created' AND idem IS NULL) || '|'
    || (SELECT count(*) FROM fluxrate_internal.usage_events WHERE idempotency_key IS NULL AND payload_hash IS NOT NULL);
SELECT 'tracked|' || (SELECT count(*) FROM fluxrate_internal.usage_events WHERE payload_hash IS NOT NULL) || '|'
    || (SELECT count(*) FROM public.uq_sends WHERE expect = 'created');
SQL
grep '^badoutcome|' /tmp/uq_ingest.$$ || true
IFS='|' read -r _ sends bad_out <<<"$(grep '^outcome|' /tmp/uq_ingest.$$)"
IFS='|' read -r _ keyed missing wrong <<<"$(grep '^stored|' /tmp/uq_ingest.$$)"
IFS='|' read -r _ keyless_sent keyless_stored <<<"$(grep '^keyless|' /tmp/uq_ingest.$$)"
IFS='|' read -r _ tracked want_tracked <<<"$(grep '^tracked|' /tmp/uq_ingest.$$)"
rm -f /tmp/uq_ingest.$$
echo "events: $bulk bulk-inserted; $sends sends through track/track_batch ($(q "SELECT string_agg(expect || ' ' || n, ', ' ORDER BY expect) FROM (SELECT expect, count(*) n FROM public.uq_sends GROUP BY 1) x")), $tracked events stored by them; outcomes wrong $bad_out, keyed events missing $missing, stored unlike sent $wrong ($(lap))"
[ "$bad_out" = 0 ] || fail "$bad_out sends had another outcome than expected"
[ "$missing" = 0 ] && [ "$wrong" = 0 ] || fail "tracked events not stored as sent: $missing missing, $wrong different"
[ "$keyless_sent" = "$keyless_stored" ] && [ "$tracked" = "$want_tracked" ] || fail "tracked events: $tracked stored, $want_tracked expected ($keyless_stored/$keyless_sent without a key)"
# track created n01 in both organizations: a customer like the others from now on
q "INSERT INTO public.uq_customers SELECT c.org_id, c.id, c.external_id, false, false FROM fluxrate_internal.customers c
    WHERE NOT EXISTS (SELECT 1 FROM public.uq_customers u WHERE u.org_id = c.org_id AND u.customer_id = c.id)
      AND c.org_id IN (SELECT org_id FROM public.uq_orgs)"
q "ANALYZE fluxrate_internal.usage_events"
# the (customer, meter) pairs with an event: the all-customer references add up only these
q "INSERT INTO public.uq_pairs SELECT DISTINCT org_id, meter_id, customer_id FROM fluxrate_internal.usage_events;
   CREATE INDEX ON public.uq_pairs (meter_id)"
echo "$(q "SELECT count(*) FROM fluxrate_internal.usage_events") events: $(q "SELECT string_agg(o.tag || ' ' || n, ', ' ORDER BY o.tag) FROM (SELECT org_id, count(*) n FROM fluxrate_internal.usage_events GROUP BY 1) x JOIN public.uq_orgs o USING (org_id)"); on a period bound $(q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE e.\"timestamp\" IN (SELECT t FROM public.uq_bounds)"), 1 microsecond beside one $(q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE e.\"timestamp\" - interval '1 microsecond' IN (SELECT t FROM public.uq_bounds) OR e.\"timestamp\" + interval '1 microsecond' IN (SELECT t FROM public.uq_bounds)"), with a tied timestamp $(q "SELECT count(*) FROM (SELECT count(*) OVER (PARTITION BY org_id, customer_id, meter_id, \"timestamp\") k FROM fluxrate_internal.usage_events) x WHERE k > 1"), after now $(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE \"timestamp\" >= '$NOW'")"

# ---------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------
# 1. meter_usage and the independent reference, every (customer, meter, period) of both organizations
qf <<'SQL'
SET TimeZone = 'UTC';
CREATE TABLE public.uq_triples AS
SELECT row_number() OVER (ORDER BY (SELECT o.tag FROM public.uq_orgs o WHERE o.org_id = c.org_id), c.ext, m.n, p.k)::integer AS t, c.org_id, c.customer_id, m.meter_id, p.k, p.ps, p.pe,
       fluxrate_internal.meter_usage(c.org_id, c.customer_id, m.meter_id, p.ps, p.pe) AS r1,
       public.uq_ref(c.org_id, c.customer_id, m.meter_id, p.ps, p.pe) AS r2
  FROM public.uq_customers c JOIN public.uq_meters m ON m.org_id = c.org_id CROSS JOIN public.uq_periods p;
CREATE UNIQUE INDEX ON public.uq_triples (org_id, customer_id, meter_id, ps, pe);
INSERT INTO public.uq_cmp SELECT 'meter_usage', org_id, customer_id, meter_id, ps, pe, r1, r1, r2 FROM public.uq_triples;
SQL
# (the fingerprint of the reference's answers is the same on every run of a seed)
echo "meter_usage: $(q "SELECT count(*) FROM public.uq_triples") triples, $(q "SELECT count(*) FROM public.uq_triples WHERE r2 <> 0") non-zero, fingerprint $(q "SELECT left(md5(string_agg(r2::text, ',' ORDER BY t)), 12) FROM public.uq_triples") ($(lap))"

# 2. period_usage: (a) every triple of an organization in one call, shuffled, several periods:
# the per-pair path; (b) per period, every customer x every meter: the whole-organization path;
# (c) per period, half of the customers (rounded up): still the whole-organization path;
# (d) one period, fewer than half of the customers: the per-pair path; (e) every customer, the
# plain SUM pairs of one period (some twice), the other pairs of two: the whole-organization path.
# Each call's path is told by the calls of org_period_usage() in its transaction.
qf <<'SQL'
SET TimeZone = 'UTC';
CREATE TABLE public.uq_pu_calls (label text, org_id uuid, k integer, asked integer, answered integer, distinct_ords integer,
  opu_calls bigint, want_whole boolean);
CREATE FUNCTION public.uq_opu_calls() RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT coalesce(pg_stat_get_xact_function_calls('fluxrate_internal.org_period_usage'::regproc), 0) $$;
CREATE FUNCTION public.uq_period_usage(v_label text, v_org uuid, v_k integer, v_query text, v_want_whole boolean) RETURNS void
  LANGUAGE plpgsql AS $fn$
DECLARE
  c0 bigint; c1 bigint;
BEGIN
  -- v_query: the triples to ask for (rows of uq_triples x, duplicates allowed), in a shuffled order
  EXECUTE format('CREATE TEMP TABLE uq_ask ON COMMIT DROP AS SELECT row_number() OVER (ORDER BY md5(x.t::text || %L), x.k)::integer AS ord, x.*
                    FROM (%s) x', v_label, v_query);
  c0 := public.uq_opu_calls();
  CREATE TEMP TABLE uq_ans ON COMMIT DROP AS
  SELECT pu.* FROM fluxrate_internal.period_usage(v_org,
    ARRAY(SELECT a.customer_id FROM uq_ask a ORDER BY a.ord), ARRAY(SELECT a.meter_id FROM uq_ask a ORDER BY a.ord),
    ARRAY(SELECT a.ps FROM uq_ask a ORDER BY a.ord), ARRAY(SELECT a.pe FROM uq_ask a ORDER BY a.ord)) pu;
  c1 := public.uq_opu_calls();
  INSERT INTO public.uq_pu_calls VALUES (v_label, v_org, v_k, (SELECT count(*) FROM uq_ask), (SELECT count(*) FROM uq_ans),
    (SELECT count(DISTINCT ord) FROM uq_ans), c1 - c0, v_want_whole);
  INSERT INTO public.uq_cmp
  SELECT 'period_usage/' || v_label, a.org_id, a.customer_id, a.meter_id, a.ps, a.pe, n.usage, a.r1, a.r2
    FROM uq_ask a LEFT JOIN uq_ans n ON n.ord = a.ord;
  DROP TABLE uq_ask, uq_ans;
END
$fn$;
-- the customers of an organization in a shuffled order: the first `share` of them (rounded up), plus `plus`
CREATE FUNCTION public.uq_some_customers(v_org uuid, v_k integer, share numeric, plus integer) RETURNS SETOF uuid LANGUAGE sql AS $$
  SELECT c.id FROM fluxrate_internal.customers c WHERE c.org_id = v_org ORDER BY md5(c.external_id || v_k)
   LIMIT ceil((SELECT count(*) FROM fluxrate_internal.customers c2 WHERE c2.org_id = v_org) * share)::int + plus
$$;
CREATE FUNCTION public.uq_sum_plain(v_meter uuid) RETURNS boolean LANGUAGE sql AS $$
  SELECT EXISTS (SELECT 1 FROM public.uq_meters m WHERE m.meter_id = v_meter AND m.agg = 'SUM' AND m.variant = 'none') $$;
SQL
T="SELECT * FROM public.uq_triples x WHERE x.org_id"
for org in "$ORG_A" "$ORG_B"; do
  {
  echo "BEGIN; SELECT public.uq_period_usage('pairs', '$org', NULL, '$T = ''$org''', false); COMMIT;"
  for k in $(q "SELECT k FROM public.uq_periods ORDER BY k"); do
    echo "BEGIN; SELECT public.uq_period_usage('whole', '$org', $k, '$T = ''$org'' AND x.k = $k', true); COMMIT;"
    echo "BEGIN; SELECT public.uq_period_usage('whole-half', '$org', $k, '$T = ''$org'' AND x.k = $k
            AND x.customer_id IN (SELECT public.uq_some_customers(''$org'', $k, 0.5, 0))', true); COMMIT;"
  done
  for k in 2 4 9; do
    echo "BEGIN; SELECT public.uq_period_usage('pairs-one-period', '$org', $k, '$T = ''$org'' AND x.k = $k
            AND x.customer_id IN (SELECT public.uq_some_customers(''$org'', $k, 0.5, -1))', false); COMMIT;"
  done
  # the plain SUM pairs share one period (a fifth of the customers' asked twice); the other
  # meters' pairs are of two periods
  for k in 3 9; do
    echo "BEGIN; SELECT public.uq_period_usage('whole-mixed', '$org', $k, '$T = ''$org''
            AND (public.uq_sum_plain(x.meter_id) AND x.k = $k OR NOT public.uq_sum_plain(x.meter_id) AND x.k IN ($k, ($k + 4) % 10))
            UNION ALL $T = ''$org'' AND public.uq_sum_plain(x.meter_id) AND x.k = $k
            AND x.customer_id IN (SELECT public.uq_some_customers(''$org'', $k, 0.2, 0))', true); COMMIT;"
  done
  } | qf >/dev/null
done
bad_calls=$(q "SELECT count(*) FROM public.uq_pu_calls WHERE asked <> answered OR asked <> distinct_ords OR (opu_calls > 0) <> want_whole OR opu_calls > 1")
q "SELECT 'period_usage: ' || string_agg(label || ' ' || n || ' call(s), ' || asked || ' triples, org_period_usage ran in ' || whole, '; ' ORDER BY label)
     FROM (SELECT label, count(*) n, sum(asked) asked, count(*) FILTER (WHERE opu_calls > 0) whole FROM public.uq_pu_calls GROUP BY 1) x"
if [ "$bad_calls" != 0 ]; then
  q "SELECT label || ' k=' || coalesce(k::text, '-') || ': asked ' || asked || ', answered ' || answered || ' (' || distinct_ords || ' distinct), org_period_usage calls ' || opu_calls || ', whole expected ' || want_whole
       FROM public.uq_pu_calls WHERE asked <> answered OR asked <> distinct_ords OR (opu_calls > 0) <> want_whole OR opu_calls > 1"
  fail "period_usage: $bad_calls call(s) answered another number of rows than asked, or took the other path"
fi
echo "period_usage done ($(lap))"

# 3. org_period_usage, SUM/COUNT/MAX/MIN/AVG: the plain meter of the aggregation alone, and every
# meter of the organization (its other query shape); compared on the plain meters (the closer
# hands it only those: it applies no filters), every customer (no row = 0)
qf >/dev/null <<'SQL'
SET TimeZone = 'UTC';
CREATE FUNCTION public.uq_org_period_usage(v_sfx text, v_ks integer[], v_rollups boolean DEFAULT true) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
  CREATE TEMP TABLE uq_opu ON COMMIT DROP AS
  SELECT o.tag, x.shape, p.k, a.agg, u.*
    FROM public.uq_orgs o CROSS JOIN public.uq_periods p CROSS JOIN unnest(ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG']) a(agg)
   CROSS JOIN (VALUES ('subset'), ('all meters')) x(shape)
   CROSS JOIN LATERAL fluxrate_internal.org_period_usage(o.org_id, p.ps, p.pe, a.agg,
      CASE x.shape WHEN 'subset' THEN ARRAY(SELECT m.meter_id FROM public.uq_meters m WHERE m.org_id = o.org_id AND m.agg = a.agg AND m.variant = 'none')
                   ELSE ARRAY(SELECT m.meter_id FROM public.uq_meters m WHERE m.org_id = o.org_id) END, v_rollups) u
   WHERE p.k = ANY (v_ks);
  INSERT INTO public.uq_checks
  SELECT 'org_period_usage: one row per (customer, meter), all of the organization', count(*) = 0,
         count(*) || ' bad rows'
    FROM (SELECT u.tag, u.shape, u.k, u.agg, u.customer_id, u.meter_id FROM uq_opu u
           WHERE NOT EXISTS (SELECT 1 FROM public.uq_customers c JOIN public.uq_orgs o ON o.org_id = c.org_id WHERE o.tag = u.tag AND c.customer_id = u.customer_id)
              OR NOT EXISTS (SELECT 1 FROM public.uq_meters m JOIN public.uq_orgs o ON o.org_id = m.org_id WHERE o.tag = u.tag AND m.meter_id = u.meter_id)
          UNION ALL
          SELECT u.tag, u.shape, u.k, u.agg, u.customer_id, u.meter_id FROM uq_opu u
           GROUP BY 1, 2, 3, 4, 5, 6 HAVING count(*) > 1) b;
  INSERT INTO public.uq_cmp
  SELECT 'org_period_usage/' || x.shape || v_sfx, t.org_id, t.customer_id, t.meter_id, t.ps, t.pe, coalesce(u.usage, 0), t.r1, t.r2,
         CASE WHEN u.usage IS NULL THEN 'no row' END
    FROM public.uq_triples t JOIN public.uq_meters m ON m.org_id = t.org_id AND m.meter_id = t.meter_id AND m.variant = 'none'
         AND m.agg IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
    JOIN public.uq_orgs o ON o.org_id = t.org_id
    CROSS JOIN (VALUES ('subset'), ('all meters')) x(shape)
    LEFT JOIN uq_opu u ON u.tag = o.tag AND u.shape = x.shape AND u.k = t.k AND u.agg = m.agg AND u.customer_id = t.customer_id
         AND u.meter_id = t.meter_id
   WHERE t.k = ANY (v_ks);
  DROP TABLE uq_opu;
END
$fn$;
BEGIN;
SELECT public.uq_org_period_usage('', ARRAY(SELECT k FROM public.uq_periods));
COMMIT;
-- the same from the events alone (whole-day periods above went through the rollups)
BEGIN;
SELECT public.uq_org_period_usage(' (events only)', ARRAY(SELECT k FROM public.uq_periods), false);
COMMIT;
-- the rollups were read with a tail: the tracked events are not rolled up
INSERT INTO public.uq_checks
SELECT 'org_period_usage: rollups refreshed, the tracked events in their tail',
       fluxrate_internal.rollup_snapshot() IS NOT NULL AND count(*) > 0, count(*) || ' events in the tail'
  FROM fluxrate_internal.usage_events e
 WHERE NOT txid_visible_in_snapshot(e.xact_id, fluxrate_internal.rollup_snapshot());
SQL
echo "org_period_usage done ($(lap))"

# 3b. Again under plans that read the events with parallel workers (Gather: the rows reach every
# aggregate in another order): meter_usage, period_usage's two paths and org_period_usage, for
# three periods.  That workers do run is checked on the whole-organization aggregate's plan.
PAR="-c parallel_setup_cost=0 -c parallel_tuple_cost=0 -c min_parallel_table_scan_size=0 -c min_parallel_index_scan_size=0 -c max_parallel_workers_per_gather=2"
for org in "$ORG_A" "$ORG_B"; do
  for k in 3 8 9; do
    echo "BEGIN; SELECT public.uq_period_usage('whole (parallel plans)', '$org', $k, '$T = ''$org'' AND x.k = $k', true); COMMIT;"
    echo "BEGIN; SELECT public.uq_period_usage('pairs (parallel plans)', '$org', $k, '$T = ''$org'' AND x.k IN ($k, ($k + 3) % 10)', false); COMMIT;"
  done
done | PGOPTIONS="$PGOPTIONS $PAR" qf >/dev/null
PGOPTIONS="$PGOPTIONS $PAR" qf >/dev/null <<'SQL'
SET TimeZone = 'UTC';
INSERT INTO public.uq_cmp
SELECT 'meter_usage (parallel plans)', t.org_id, t.customer_id, t.meter_id, t.ps, t.pe,
       fluxrate_internal.meter_usage(t.org_id, t.customer_id, t.meter_id, t.ps, t.pe), t.r1, t.r2
  FROM public.uq_triples t WHERE t.k IN (3, 8, 9);
BEGIN;
SELECT public.uq_org_period_usage(' (parallel plans)', ARRAY[3, 8, 9]);
COMMIT;
DO $do$
DECLARE
  j jsonb;
BEGIN
  EXECUTE format('EXPLAIN (ANALYZE, FORMAT JSON) SELECT e.customer_id, e.meter_id, sum(e.quantity) FROM fluxrate_internal.usage_events e
                   WHERE e.org_id = %L AND e."timestamp" >= %L AND e."timestamp" < %L GROUP BY 1, 2',
                 (SELECT org_id FROM public.uq_orgs WHERE tag = 'A'), '2026-01-01', '2028-01-01') INTO j;
  INSERT INTO public.uq_checks VALUES ('parallel plans: workers launched for the whole-organization aggregate',
    j::text ~ '"Workers Launched": [1-9]', left(j::text, 200));
END
$do$;
SQL
echo "parallel plans done ($(lap))"

# 4. The public API.  get_meter_usage: total, event_count, unique_customers and every bucket, for
# the heavy customer, another one, the customer without events (organization A), and all
# customers; the buckets against [max(bucket, start), min(bucket + step, end)).
qf <<'SQL'
SET TimeZone = 'UTC';
CREATE FUNCTION public.uq_api_meter_usage(v_org uuid, v_ks integer[], v_ks_all integer[], seed float8) RETURNS integer
  LANGUAGE plpgsql AS $fn$
DECLARE
  m record; p record; c uuid; j jsonb; b jsonb; n integer := 0; step interval; bs timestamptz; be timestamptz; custs uuid[];
  want timestamptz[]; got timestamptz[]; sfx text;
BEGIN
  PERFORM setseed(seed);
  PERFORM fluxrate.act_as(v_org);
  custs := ARRAY(SELECT x.customer_id FROM public.uq_customers x WHERE x.org_id = v_org AND x.heavy)
        || ARRAY(SELECT x.customer_id FROM public.uq_customers x WHERE x.org_id = v_org AND NOT x.heavy AND NOT x.empty ORDER BY random() LIMIT 1)
        || ARRAY(SELECT x.customer_id FROM public.uq_customers x WHERE x.org_id = v_org AND x.empty);
  FOR m IN SELECT * FROM public.uq_meters x WHERE x.org_id = v_org ORDER BY x.n LOOP
    FOR p IN SELECT * FROM public.uq_periods x WHERE x.k = ANY (v_ks || v_ks_all) ORDER BY x.k LOOP
      FOR c IN SELECT u FROM unnest(CASE WHEN p.k = ANY (v_ks) THEN custs ELSE '{}' END
                                    || CASE WHEN p.k = ANY (v_ks_all) THEN ARRAY[NULL::uuid] ELSE '{}' END) u LOOP
        j := fluxrate.get_meter_usage(m.meter_id, p.ps, p.pe, p.group_by, c, include_empty => true);
        n := n + 1;
        sfx := CASE WHEN c IS NULL THEN ' (all customers)' ELSE '' END;
        step := ('1 ' || p.group_by)::interval;
        INSERT INTO public.uq_cmp
        SELECT 'get_meter_usage/total' || sfx, v_org, c, m.meter_id, p.ps, p.pe, (j->>'total_usage')::numeric,
               CASE WHEN c IS NULL THEN public.uq_mu_all(v_org, m.meter_id, p.ps, p.pe) ELSE t.r1 END,
               CASE WHEN c IS NULL THEN public.uq_ref(v_org, NULL, m.meter_id, p.ps, p.pe) ELSE t.r2 END
          FROM (SELECT 1) one LEFT JOIN public.uq_triples t ON t.org_id = v_org AND t.customer_id = c AND t.meter_id = m.meter_id AND t.k = p.k;
        INSERT INTO public.uq_cmp VALUES
          ('get_meter_usage/event_count' || sfx, v_org, c, m.meter_id, p.ps, p.pe, (j->>'event_count')::numeric, NULL,
           public.uq_ref(v_org, c, m.meter_id, p.ps, p.pe, 'COUNT')),
          ('get_meter_usage/unique_customers' || sfx, v_org, c, m.meter_id, p.ps, p.pe, (j->>'unique_customers')::numeric, NULL,
           (SELECT count(DISTINCT e.customer_id) FROM fluxrate_internal.usage_events e
             WHERE e.org_id = v_org AND e.meter_id = m.meter_id AND (c IS NULL OR e.customer_id = c)
               AND e."timestamp" >= p.ps AND e."timestamp" < p.pe AND public.uq_match(e.metadata, m.filters)));
        -- the buckets: every calendar unit of the range, in order, the first one truncated
        want := ARRAY(SELECT g AT TIME ZONE 'UTC' FROM generate_series(date_trunc(p.group_by, p.ps AT TIME ZONE 'UTC'), p.pe AT TIME ZONE 'UTC', step) g
                       WHERE g < p.pe AT TIME ZONE 'UTC' ORDER BY g);
        got := ARRAY(SELECT (x->>'period')::timestamptz FROM jsonb_array_elements(j->'grouped_data') WITH ORDINALITY y(x, i) ORDER BY i);
        IF got IS DISTINCT FROM want OR (j->>'period_start')::timestamptz <> p.ps OR (j->>'period_end')::timestamptz <> p.pe THEN
          INSERT INTO public.uq_checks VALUES ('get_meter_usage: buckets and range', false,
            format('meter %s period %s customer %s: %s buckets, %s expected', m.name, p.k, c, cardinality(got), cardinality(want)));
        END IF;
        FOR b IN SELECT x FROM jsonb_array_elements(j->'grouped_data') x LOOP
          bs := greatest((b->>'period')::timestamptz, p.ps);
          be := least((b->>'period')::timestamptz + step, p.pe);
          INSERT INTO public.uq_cmp VALUES
            ('get_meter_usage/bucket' || sfx, v_org, c, m.meter_id, bs, be, (b->>'usage')::numeric,
             CASE WHEN c IS NULL THEN public.uq_mu_all(v_org, m.meter_id, bs, be) ELSE fluxrate_internal.meter_usage(v_org, c, m.meter_id, bs, be) END,
             public.uq_ref(v_org, c, m.meter_id, bs, be)),
            ('get_meter_usage/bucket event_count' || sfx, v_org, c, m.meter_id, bs, be, (b->>'event_count')::numeric, NULL,
             public.uq_ref(v_org, c, m.meter_id, bs, be, 'COUNT'));
        END LOOP;
      END LOOP;
    END LOOP;
  END LOOP;
  RETURN n;
END
$fn$;

-- get_meter_stats at a clock: today, this ISO week, this month, up to now (all customers);
-- all-time events, customers, first and last event
CREATE FUNCTION public.uq_api_meter_stats(v_org uuid, v_now timestamptz) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
  m record; j jsonb; n integer := 0; w record;
BEGIN
  PERFORM set_config('fluxrate.pinned_now', v_now::text, true);
  PERFORM fluxrate.act_as(v_org);
  FOR m IN SELECT * FROM public.uq_meters x WHERE x.org_id = v_org ORDER BY x.n LOOP
    j := fluxrate.get_meter_stats(m.meter_id);
    n := n + 1;
    FOR w IN SELECT * FROM (VALUES ('today_usage', 'day'), ('this_week_usage', 'week'), ('this_month_usage', 'month')) x(f, unit) LOOP
      INSERT INTO public.uq_cmp
      SELECT 'get_meter_stats/' || w.f, v_org, NULL, m.meter_id, s, v_now, (j->>w.f)::numeric,
             public.uq_mu_all(v_org, m.meter_id, s, v_now), public.uq_ref(v_org, NULL, m.meter_id, s, v_now)
        FROM (SELECT date_trunc(w.unit, v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS s) x;
    END LOOP;
    INSERT INTO public.uq_cmp
    SELECT 'get_meter_stats/total_events', v_org, NULL::uuid, m.meter_id, NULL::timestamptz, NULL::timestamptz, (j->>'total_events')::numeric, NULL::numeric, count(*)
      FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.meter_id = m.meter_id AND public.uq_match(e.metadata, m.filters)
    UNION ALL
    SELECT 'get_meter_stats/unique_customers', v_org, NULL, m.meter_id, NULL, NULL, (j->>'unique_customers')::numeric, NULL, count(DISTINCT e.customer_id)
      FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.meter_id = m.meter_id AND public.uq_match(e.metadata, m.filters);
    INSERT INTO public.uq_checks
    SELECT 'get_meter_stats: first and last event', (j->>'first_event_date')::timestamptz IS NOT DISTINCT FROM min(e."timestamp")
             AND (j->>'last_event_date')::timestamptz IS NOT DISTINCT FROM max(e."timestamp"),
           format('meter %s: %s..%s, expected %s..%s', m.name, j->>'first_event_date', j->>'last_event_date', min(e."timestamp"), max(e."timestamp"))
      FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.meter_id = m.meter_id AND public.uq_match(e.metadata, m.filters);
  END LOOP;
  RETURN n;
END
$fn$;

-- get_subscription_usage of every subscription; get_customer_usage of every customer (its live
-- subscriptions, each as get_subscription_usage says, in order); check_entitlement of every
-- meter feature of the customers' plans
CREATE FUNCTION public.uq_api_live(v_org uuid) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
  s record; c record; f record; j jsonb; u jsonb; n integer := 0; want jsonb; ws timestamptz; we timestamptz; k integer;
  v_now timestamptz := fluxrate.now();
  pf record; st text; msg text;
BEGIN
  PERFORM fluxrate.act_as(v_org);
  FOR s IN SELECT x.* FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org ORDER BY x.created_at, x.id LOOP
    j := fluxrate.get_subscription_usage(s.id);
    n := n + 1;
    INSERT INTO public.uq_checks
    SELECT 'get_subscription_usage: period and meters', (j->>'period_start')::timestamptz = s.current_period_start
             AND (j->>'period_end')::timestamptz = s.current_period_end
             AND ARRAY(SELECT (x->>'meter_id')::uuid FROM jsonb_array_elements(j->'usage') x ORDER BY 1)
                 = ARRAY(SELECT mm.meter_id FROM public.uq_meters mm WHERE mm.org_id = v_org AND (
                           mm.meter_id IN (SELECT ch.meter_id FROM fluxrate_internal.charges ch WHERE ch.org_id = v_org AND ch.plan_id = s.plan_id)
                           OR mm.feature_id IN (SELECT pf2.feature_id FROM fluxrate_internal.plan_features pf2 WHERE pf2.org_id = v_org AND pf2.plan_id = s.plan_id))
                         ORDER BY 1),
           format('subscription %s', s.id);
    INSERT INTO public.uq_cmp
    SELECT 'get_subscription_usage', v_org, s.customer_id, (x->>'meter_id')::uuid, s.current_period_start, s.current_period_end,
           (x->>'usage')::numeric,
           fluxrate_internal.meter_usage(v_org, s.customer_id, (x->>'meter_id')::uuid, s.current_period_start, s.current_period_end),
           public.uq_ref(v_org, s.customer_id, (x->>'meter_id')::uuid, s.current_period_start, s.current_period_end)
      FROM jsonb_array_elements(j->'usage') x;
  END LOOP;
  FOR c IN SELECT * FROM public.uq_customers x WHERE x.org_id = v_org ORDER BY x.ext LOOP
    j := fluxrate.get_customer_usage(c.customer_id);
    n := n + 1;
    want := coalesce((SELECT jsonb_agg(fluxrate.get_subscription_usage(x.id) ORDER BY x.created_at, x.id) FROM fluxrate_internal.subscriptions x
                       WHERE x.org_id = v_org AND x.customer_id = c.customer_id AND x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')), '[]');
    INSERT INTO public.uq_checks VALUES ('get_customer_usage: the live subscriptions, as get_subscription_usage says (text)',
      (j->'subscriptions')::text = want::text, format('customer %s', c.ext));
    INSERT INTO public.uq_cmp
    SELECT 'get_customer_usage', v_org, c.customer_id, (x->>'meter_id')::uuid, (y->>'period_start')::timestamptz, (y->>'period_end')::timestamptz,
           (x->>'usage')::numeric,
           fluxrate_internal.meter_usage(v_org, c.customer_id, (x->>'meter_id')::uuid, (y->>'period_start')::timestamptz, (y->>'period_end')::timestamptz),
           public.uq_ref(v_org, c.customer_id, (x->>'meter_id')::uuid, (y->>'period_start')::timestamptz, (y->>'period_end')::timestamptz)
      FROM jsonb_array_elements(j->'subscriptions') y, jsonb_array_elements(y->'usage') x;
    -- entitlements: every meter feature of a plan the customer subscribes to (live or not), and one of none
    FOR f IN SELECT DISTINCT mm.* FROM public.uq_meters mm
               JOIN fluxrate_internal.plan_features pf2 ON pf2.org_id = mm.org_id AND pf2.feature_id = mm.feature_id
               JOIN fluxrate_internal.subscriptions x ON x.org_id = pf2.org_id AND x.plan_id = pf2.plan_id AND x.customer_id = c.customer_id
              WHERE mm.org_id = v_org
             UNION SELECT mm.* FROM public.uq_meters mm WHERE mm.org_id = v_org AND mm.n = 1
             ORDER BY n LOOP
      BEGIN
        j := fluxrate.check_entitlement(c.ext, f.name);
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
        INSERT INTO public.uq_checks VALUES ('check_entitlement answers', false,
          format('%s %s (%s): %s %s', c.ext, f.name, f.agg, st, msg));
        CONTINUE;
      END;
      n := n + 1;
      -- the subscription it should use: a live one whose plan has the feature, enabled first, then the oldest
      SELECT x.*, pf2.is_enabled, pf2.usage_limit, pf2.usage_reset_period, pf2.is_soft_limit INTO pf
        FROM fluxrate_internal.subscriptions x
        JOIN fluxrate_internal.plan_features pf2 ON pf2.org_id = x.org_id AND pf2.plan_id = x.plan_id AND pf2.feature_id = f.feature_id
       WHERE x.org_id = v_org AND x.customer_id = c.customer_id AND x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')
       ORDER BY pf2.is_enabled DESC, x.created_at LIMIT 1;
      IF NOT FOUND THEN
        INSERT INTO public.uq_checks VALUES ('check_entitlement: no live subscription with the feature: not allowed',
          j->>'allowed' = 'false' AND NOT j ? 'usage', format('%s %s: %s', c.ext, f.name, j));
        CONTINUE;
      END IF;
      -- the window (docs/rating.md): the reset period containing now, or the subscription's
      -- period containing now (also when the closer has not advanced it yet), up to the
      -- earlier of its end and now + 5 minutes; empty for a subscription that starts later
      IF pf.usage_reset_period IS NOT NULL THEN
        ws := date_trunc(pf.usage_reset_period, v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        we := ((ws AT TIME ZONE 'UTC') + ('1 ' || pf.usage_reset_period)::interval) AT TIME ZONE 'UTC';
      ELSE
        ws := pf.current_period_start; we := pf.current_period_end; k := pf.current_period_index + 1;
        WHILE we <= v_now LOOP
          ws := fluxrate_internal.period_boundary(pf.billing_anchor, pf.billing_interval, pf.alignment, k);
          we := fluxrate_internal.period_boundary(pf.billing_anchor, pf.billing_interval, pf.alignment, k + 1);
          k := k + 1;
        END LOOP;
      END IF;
      we := least(we, v_now + interval '5 minutes');
      INSERT INTO public.uq_checks VALUES ('check_entitlement: subscription, window start and allowed as documented',
        (j->>'subscription_id')::uuid = pf.id AND (j->>'window_start')::timestamptz = ws
        AND (j->>'allowed')::boolean = (pf.is_enabled AND (pf.usage_limit IS NULL OR (j->>'usage')::numeric < pf.usage_limit OR pf.is_soft_limit)),
        format('%s %s: %s', c.ext, f.name, j));
      INSERT INTO public.uq_cmp VALUES ('check_entitlement', v_org, c.customer_id, f.meter_id, ws, we,
        -- (a window that starts after it ends, a subscription of the future: meter_usage() refuses
        -- it for WEIGHTED_SUM, so only the reference says: 0)
        (j->>'usage')::numeric, CASE WHEN ws <= we THEN fluxrate_internal.meter_usage(v_org, c.customer_id, f.meter_id, ws, we) END,
        public.uq_ref(v_org, c.customer_id, f.meter_id, ws, we),
        CASE WHEN pf.usage_reset_period IS NULL AND pf.current_period_end <= v_now THEN
          'ended period ' || pf.current_period_start || ' - ' || pf.current_period_end || ': its usage '
          || public.uq_ref(v_org, c.customer_id, f.meter_id, pf.current_period_start, pf.current_period_end) END);
    END LOOP;
  END LOOP;
  RETURN n;
END
$fn$;
SQL
api=$(q "SELECT public.uq_api_meter_usage('$ORG_A', ARRAY[2, 4, 5, 6, 7, 9], ARRAY[2, 4], 0.55 - $SEED / 2000.0)
              + public.uq_api_meter_usage('$ORG_B', ARRAY[1, 3, 8], ARRAY[9], 0.66 - $SEED / 2000.0)")
echo "get_meter_usage: $api calls ($(lap))"
# the same under another session time zone: UTC buckets and the same numbers as the UTC calls
tzdiff=$(qf <<SQL | tail -1
ANALYZE public.uq_cmp;
SET TimeZone = 'Asia/Kolkata';
SET fluxrate.pinned_now = '$NOW';
SELECT fluxrate.act_as('$ORG_A', true) IS NULL;
CREATE TEMP TABLE uq_tz AS
SELECT m.meter_id, (x->>'period')::timestamptz AS bucket, p.ps, p.pe, p.group_by, x->>'usage' AS usage, (x->>'event_count')::numeric AS n
  FROM public.uq_meters m, public.uq_periods p,
       json_array_elements(fluxrate.get_meter_usage(m.meter_id, p.ps, p.pe, p.group_by, include_empty => true)->'grouped_data') x
 WHERE m.org_id = '$ORG_A' AND p.k IN (2, 4);
SELECT count(*) FROM uq_tz t
  FULL JOIN (SELECT c.meter_id, c.ps, c.pe, c.got::text AS usage, c2.got AS n FROM public.uq_cmp c
               JOIN public.uq_cmp c2 ON c2.path = 'get_meter_usage/bucket event_count (all customers)'
                    AND c2.org_id = c.org_id AND c2.meter_id = c.meter_id AND c2.ps = c.ps AND c2.pe = c.pe
              WHERE c.path = 'get_meter_usage/bucket (all customers)' AND c.org_id = '$ORG_A'
                AND EXISTS (SELECT 1 FROM public.uq_periods p WHERE p.k IN (2, 4) AND c.ps >= p.ps AND c.pe <= p.pe)) u
    ON u.meter_id = t.meter_id AND u.ps = greatest(t.bucket, t.ps)
       AND u.pe = least(t.bucket + ('1 ' || t.group_by)::interval, t.pe)
 WHERE t.usage IS DISTINCT FROM u.usage OR t.n IS DISTINCT FROM u.n;
SQL
)
q "INSERT INTO public.uq_checks VALUES ('get_meter_usage under TimeZone Asia/Kolkata: the same UTC buckets and numbers', $tzdiff = 0, '$tzdiff buckets differ')"
echo "get_meter_usage under another time zone: $tzdiff buckets differ ($(lap))"
stats=$(q "SELECT sum(public.uq_api_meter_stats(o.org_id, c)) FROM public.uq_orgs o,
             unnest(ARRAY['$NOW', '2027-03-01 00:00:00+00', '2027-03-15 00:00:00.5+00']::timestamptz[]) c")
echo "get_meter_stats: $stats calls at 3 clocks ($(lap))"
live=$(q "SELECT public.uq_api_live('$ORG_A') + public.uq_api_live('$ORG_B')")
echo "get_subscription_usage, get_customer_usage, check_entitlement: $live calls ($(lap))"

# 5. Nothing crosses organizations: A's functions, given B's ids, find nothing (PT404, 0 or no row)
qf >/dev/null <<SQL
SET TimeZone = 'UTC';
CREATE FUNCTION public.uq_expect_error(v_what text, v_sql text, v_state text) RETURNS void LANGUAGE plpgsql AS \$fn\$
DECLARE
  st text; r text;
BEGIN
  BEGIN
    EXECUTE v_sql INTO r;
    INSERT INTO public.uq_checks VALUES ('another organization''s id: ' || v_state, false, v_what || ' answered ' || coalesce(r, 'NULL'));
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE;
    INSERT INTO public.uq_checks VALUES ('another organization''s id: ' || v_state, st = v_state, v_what || ': ' || st);
  END;
END
\$fn\$;
SELECT fluxrate.act_as('$ORG_A', true);
SELECT public.uq_expect_error('get_meter_usage(B meter)', format('SELECT fluxrate.get_meter_usage(%L)', m.meter_id), 'PT404'),
       public.uq_expect_error('get_meter_stats(B meter)', format('SELECT fluxrate.get_meter_stats(%L)', m.meter_id), 'PT404'),
       public.uq_expect_error('meter_usage(A, B customer, B meter)', format('SELECT fluxrate_internal.meter_usage(%L, %L, %L, %L, %L)',
         '$ORG_A', c.customer_id, m.meter_id, '2026-01-01', '2028-01-01'), 'PT404')
  FROM public.uq_meters m, public.uq_customers c WHERE m.org_id = '$ORG_B' AND c.org_id = '$ORG_B' AND c.ext = 'c01' AND m.n IN (1, 47, 56);
SELECT public.uq_expect_error('get_meter_usage(A meter, customer_id => B customer)',
         format('SELECT fluxrate.get_meter_usage(%L, customer_id => %L)', m.meter_id, c.customer_id), 'PT404')
  FROM public.uq_meters m, public.uq_customers c WHERE m.org_id = '$ORG_A' AND c.org_id = '$ORG_B' AND c.ext = 'c01' AND m.n = 1;
SELECT public.uq_expect_error('get_subscription_usage(B subscription)', format('SELECT fluxrate.get_subscription_usage(%L)', s.id), 'PT404')
  FROM fluxrate_internal.subscriptions s WHERE s.org_id = '$ORG_B';
SELECT public.uq_expect_error('get_customer_usage(B customer)', format('SELECT fluxrate.get_customer_usage(%L)', c.customer_id), 'PT404')
  FROM public.uq_customers c WHERE c.org_id = '$ORG_B';
SELECT public.uq_expect_error('track(A key, B meter_token)', format('SELECT fluxrate.track(meter_token => %L, customer_external_id => %L, quantity => 1, api_key => %L)',
         m.token, 'c01', (SELECT key FROM public.uq_orgs WHERE tag = 'A')), 'PT404')
  FROM public.uq_meters m WHERE m.org_id = '$ORG_B' AND m.n = 1;
-- A's customer c01 and B's customer c01, each on the other organization's meters: nothing
INSERT INTO public.uq_checks
SELECT 'another organization''s id: meter_usage, period_usage, org_period_usage find no event', count(*) = 0, count(*) || ' answers'
  FROM (SELECT 1 FROM public.uq_meters m, public.uq_customers c
         WHERE m.org_id = '$ORG_A' AND c.org_id = '$ORG_B' AND fluxrate_internal.meter_usage('$ORG_A', c.customer_id, m.meter_id, '2026-01-01', '2028-01-01') <> 0
        UNION ALL
        SELECT 1 FROM fluxrate_internal.period_usage('$ORG_A',
            ARRAY(SELECT c.customer_id FROM public.uq_customers c, public.uq_meters m WHERE c.org_id = '$ORG_B' AND m.org_id = '$ORG_A' ORDER BY 1, m.meter_id),
            ARRAY(SELECT m.meter_id FROM public.uq_customers c, public.uq_meters m WHERE c.org_id = '$ORG_B' AND m.org_id = '$ORG_A' ORDER BY c.customer_id, 1),
            array_fill('2026-01-01'::timestamptz, ARRAY[(SELECT count(*)::int FROM public.uq_customers c, public.uq_meters m WHERE c.org_id = '$ORG_B' AND m.org_id = '$ORG_A')]),
            array_fill('2028-01-01'::timestamptz, ARRAY[(SELECT count(*)::int FROM public.uq_customers c, public.uq_meters m WHERE c.org_id = '$ORG_B' AND m.org_id = '$ORG_A')])) p
         WHERE p.usage <> 0
        UNION ALL
        -- B's meters asked of A: no row (period_usage answers only A's meters)
        SELECT 1 FROM fluxrate_internal.period_usage('$ORG_A',
            ARRAY(SELECT c.customer_id FROM public.uq_customers c WHERE c.org_id = '$ORG_A' AND c.ext = 'c01'),
            ARRAY(SELECT m.meter_id FROM public.uq_meters m WHERE m.org_id = '$ORG_B' AND m.n = 1),
            ARRAY['2026-01-01']::timestamptz[], ARRAY['2028-01-01']::timestamptz[]) p
        UNION ALL
        SELECT 1 FROM fluxrate_internal.org_period_usage('$ORG_A', '2026-01-01', '2028-01-01', 'SUM',
            ARRAY(SELECT m.meter_id FROM public.uq_meters m WHERE m.org_id = '$ORG_B')) u) x;
SQL
echo "cross-organization checks: $(q "SELECT count(*) FROM public.uq_checks WHERE what LIKE 'another organization%'") ($(lap))"

# ---------------------------------------------------------------------------
# Issue 15: usage by group of a meter's dimension, and prices by group and by override.
# A SUM meter per organization split by "model" (values a-e; everything else, JSON null, a
# number, "A", and no model at all are "other", ''), random events over February and March,
# the rollups refreshed, then more events (the tail).  Per customer, group and period (a whole
# month and whole days: the rollups and the tail; an odd period: the events), against an
# independent SQL reference (the model if it is one of a-e, else ''): meter_group_usage,
# org_period_group_usage, get_meter_usage's groups, get_subscription_usage's groups; then the
# preview of subscriptions on a plan with a grouped charge (one with an override of the groups)
# and an overridden plain charge, each line against rate_usage() of the price row it names.
# ---------------------------------------------------------------------------
qf <<SQL >/dev/null
SET TimeZone = 'UTC';
SELECT setseed(0.61 - $SEED / 2000.0);
CREATE FUNCTION public.uq_group_ref(v_org uuid, v_cust uuid, v_meter uuid, s timestamptz, e timestamptz, g text) RETURNS numeric
  LANGUAGE sql STABLE AS \$\$
  SELECT coalesce(sum(x.quantity), 0) FROM fluxrate_internal.usage_events x
   WHERE x.org_id = v_org AND x.customer_id = v_cust AND x.meter_id = v_meter AND x."timestamp" >= s AND x."timestamp" < e
     AND CASE WHEN x.metadata->>'model' IN ('a', 'b', 'c', 'd', 'e') THEN x.metadata->>'model' ELSE '' END = g
\$\$;
CREATE FUNCTION public.uq_group_build(v_org uuid, v_n integer) RETURNS uuid LANGUAGE plpgsql AS \$fn\$
DECLARE
  f jsonb; v_meter uuid; c record; i integer;
BEGIN
  PERFORM fluxrate.act_as(v_org);
  f := fluxrate.create_feature(name => 'gtokens', lookup_key => 'gtokens', type => 'meter', meter_name => 'gtokens',
         property_name => 'value', aggregation_type => 'SUM');
  v_meter := (f->>'meter_id')::uuid;
  PERFORM fluxrate.set_meter_dimension(v_meter, 'model', ARRAY['a', 'b', 'c', 'd', 'e']);
  INSERT INTO public.uq_meters VALUES (v_org, v_meter, (f->>'id')::uuid, f->>'meter_token', 'gtokens', 'SUM', 'dimension',
                                       '[]', 'value', 100);
  FOR c IN SELECT * FROM public.uq_customers x WHERE x.org_id = v_org AND NOT x.empty ORDER BY x.ext LOOP
    FOR i IN 1..v_n LOOP
      INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
      VALUES (v_org, fluxrate_internal.uuid_v7(), c.customer_id, v_meter, round((random() * 500)::numeric, floor(random() * 4)::int),
              '2027-02-01'::timestamptz + random() * interval '48 days', '2027-03-20',
              (ARRAY['{"model": "a"}', '{"model": "b"}', '{"model": "c"}', '{"model": "d"}', '{"model": "e"}', '{"model": "zz"}',
                     '{"model": null}', '{"model": 1}', '{"model": "A"}', '{}'])[1 + floor(random() * 10)::int]::jsonb);
    END LOOP;
  END LOOP;
  RETURN v_meter;
END
\$fn\$;
SQL
GM_A=$(q "SELECT public.uq_group_build('$ORG_A', 12)")
GM_B=$(q "SELECT public.uq_group_build('$ORG_B', 5)")
q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null
# the tail: events the rollups have not counted yet
qf <<SQL >/dev/null
SET TimeZone = 'UTC';
SELECT setseed(0.27 - $SEED / 2000.0);
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, metadata)
SELECT m.org_id, fluxrate_internal.uuid_v7(), c.customer_id, m.meter_id, round((random() * 90)::numeric, 2),
       '2027-02-01'::timestamptz + random() * interval '48 days', '2027-03-20',
       jsonb_build_object('model', public.pick(ARRAY['a', 'c', 'e', 'q']))
  FROM public.uq_meters m JOIN public.uq_customers c ON c.org_id = m.org_id AND NOT c.empty, generate_series(1, 3)
 WHERE m.name = 'gtokens';
-- every (customer, group, period)
CREATE TEMP TABLE gq AS
SELECT m.org_id, c.customer_id, m.meter_id, p.ps, p.pe, g.g
  FROM public.uq_meters m JOIN public.uq_customers c ON c.org_id = m.org_id,
       (VALUES ('2027-02-01'::timestamptz, '2027-03-01'::timestamptz), ('2027-02-10', '2027-03-05'),
               ('2027-02-03 07:30', '2027-03-11 18:00:00.5')) p(ps, pe),
       unnest(ARRAY['a', 'b', 'c', 'd', 'e', '']) g(g)
 WHERE m.name = 'gtokens';
INSERT INTO public.uq_cmp
SELECT 'group: meter_group_usage', q.org_id, q.customer_id, q.meter_id, q.ps, q.pe,
       coalesce((fluxrate_internal.meter_group_usage(q.org_id, q.customer_id, q.meter_id, q.ps, q.pe)->>q.g)::numeric, 0),
       NULL, public.uq_group_ref(q.org_id, q.customer_id, q.meter_id, q.ps, q.pe, q.g), 'group ' || q.g
  FROM gq q;
INSERT INTO public.uq_cmp
SELECT 'group: org_period_group_usage ' || CASE WHEN fluxrate_internal.whole_utc_days(q.ps, q.pe) THEN '(rollups + tail)' ELSE '(events)' END,
       q.org_id, q.customer_id, q.meter_id, q.ps, q.pe,
       coalesce((SELECT (u.groups->>q.g)::numeric FROM fluxrate_internal.org_period_group_usage(q.org_id, q.ps, q.pe, ARRAY[q.meter_id]) u
                  WHERE u.customer_id = q.customer_id), 0),
       NULL, public.uq_group_ref(q.org_id, q.customer_id, q.meter_id, q.ps, q.pe, q.g), 'group ' || q.g
  FROM gq q;
SQL
# the API: get_meter_usage's groups for one customer (as the organization), and the live usage
for org in "$ORG_A" "$ORG_B"; do
  qf <<SQL >/dev/null
SET TimeZone = 'UTC';
SELECT fluxrate.act_as('$org', true);
INSERT INTO public.uq_cmp
SELECT 'group: get_meter_usage', q.org_id, q.customer_id, q.meter_id, q.ps, q.pe,
       coalesce((SELECT (je.value->>'usage')::numeric
                   FROM json_array_elements((fluxrate.get_meter_usage(q.meter_id, q.ps, q.pe, 'month', q.customer_id))->'groups') je
                  WHERE (je.value->>'value') IS NOT DISTINCT FROM nullif(q.g, '')), 0),
       NULL, public.uq_group_ref(q.org_id, q.customer_id, q.meter_id, q.ps, q.pe, q.g), 'group ' || q.g
  FROM (SELECT DISTINCT m.org_id, c.customer_id, m.meter_id, p.ps, p.pe, g.g
          FROM public.uq_meters m JOIN public.uq_customers c ON c.org_id = m.org_id,
               (VALUES ('2027-02-01'::timestamptz, '2027-03-01'::timestamptz), ('2027-02-03 07:30', '2027-03-11 18:00')) p(ps, pe),
               unnest(ARRAY['a', 'b', 'c', 'd', 'e', '']) g(g)
         WHERE m.name = 'gtokens' AND m.org_id = '$org') q;
SQL
done
# a plan with a grouped charge (a: per unit, b: graduated, c: package, default per unit) and an
# overridden plain charge on the same meter; five customers subscribed from March 1, one with
# its groups overridden; live usage and previews on March 20
qf <<SQL >/dev/null
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '2027-02-15 00:00:00+00';
SELECT fluxrate.act_as('$ORG_A', true);
CREATE TEMP TABLE gp AS SELECT (fluxrate.create_plan(name => 'Grouped', lookup_id => 'grouped', type => 'USAGE',
                                 billing_interval => 'month', currency => 'USD'))->>'id' AS plan_id;
CREATE TEMP TABLE gc AS SELECT (fluxrate.add_charge((SELECT plan_id::uuid FROM gp), 'USAGE', meter_id => '$GM_A', unit_price => 0,
                                 display_name => 'Tokens'))->>'id' AS grouped_id,
                               (fluxrate.add_charge((SELECT plan_id::uuid FROM gp), 'USAGE', meter_id => '$GM_A', unit_price => 0.003,
                                 display_name => 'All tokens'))->>'id' AS plain_id;
SELECT fluxrate.set_charge_groups((SELECT grouped_id::uuid FROM gc), 'model', '[
  {"value": "a", "unit_price": 0.011},
  {"value": "b", "pricing_model": "graduated", "tiers": [{"up_to": 300, "unit_price": 0.02, "flat_fee": 1}, {"up_to": null, "unit_price": 0.005}]},
  {"value": "c", "pricing_model": "package", "package_size": 100, "package_price": 0.7, "free_units": 10},
  {"value": null, "unit_price": 0.0004}]');
CREATE TABLE public.uq_gsubs AS
SELECT c.customer_id, (fluxrate.create_subscription(c.customer_id, (SELECT plan_id::uuid FROM gp),
                         start_date => '2027-03-01 00:00:00+00', alignment => 'calendar'))->>'id' AS sub_id,
       row_number() OVER (ORDER BY c.ext) AS k
  FROM (SELECT * FROM public.uq_customers WHERE org_id = '$ORG_A' AND NOT empty ORDER BY ext LIMIT 5) c;
SELECT fluxrate.set_charge_override((SELECT sub_id::uuid FROM public.uq_gsubs WHERE k = 1), (SELECT grouped_id::uuid FROM gc),
       groups => '[{"value": "e", "pricing_model": "volume", "tiers": [{"up_to": 200, "unit_price": 0.03}, {"up_to": null, "unit_price": 0.01}]}]');
SELECT fluxrate.set_charge_override(s.sub_id::uuid, (SELECT plain_id::uuid FROM gc), pricing_model => 'graduated', free_units => 25,
       tiers => '[{"up_to": 1000, "unit_price": 0.004}, {"up_to": null, "unit_price": 0.001}]')
  FROM public.uq_gsubs s WHERE s.k IN (2, 3);
CREATE TABLE public.uq_gcharges AS SELECT * FROM gc;
SQL
qf <<SQL >/dev/null
SET TimeZone = 'UTC';
SET fluxrate.pinned_now = '$NOW';
SELECT fluxrate.act_as('$ORG_A', true);
INSERT INTO public.uq_cmp
SELECT 'group: get_subscription_usage', '$ORG_A', s.customer_id, '$GM_A', '2027-03-01', '2027-04-01',
       coalesce((SELECT (je.value->>'usage')::numeric FROM json_array_elements(uu.u->'groups') je
                  WHERE (je.value->>'value') IS NOT DISTINCT FROM nullif(gg.g, '')), 0),
       NULL, public.uq_group_ref('$ORG_A', s.customer_id, '$GM_A', '2027-03-01', '2027-04-01', gg.g), 'group ' || gg.g
  FROM public.uq_gsubs s
  CROSS JOIN LATERAL (SELECT u FROM json_array_elements((fluxrate.get_subscription_usage(s.sub_id::uuid))->'usage') u
                       WHERE u->>'meter_id' = '$GM_A') uu(u)
  CROSS JOIN unnest(ARRAY['a', 'b', 'c', 'd', 'e', '']) gg(g);
-- previews: every line's amount against rate_usage() of the price it should have (the
-- override's row, else the charge's; the group's JSON by value, the default for the rest),
-- on the independent usage
INSERT INTO public.uq_cmp
SELECT 'price: preview_invoice (groups and overrides)', '$ORG_A', s.customer_id, '$GM_A', '2027-03-01', '2027-04-01',
       (l->>'line_total')::numeric, NULL,
       fluxrate_internal.round_money(CASE WHEN l->>'charge_id' = c.plain_id THEN
              coalesce((SELECT fluxrate_internal.rate_usage(o.pricing_model, o.unit_price, o.tiers, o.package_size, o.package_price,
                                                           o.free_units, u.total)
                          FROM fluxrate_internal.charge_overrides o WHERE o.subscription_id = s.sub_id::uuid AND o.charge_id = c.plain_id::uuid),
                       0.003 * u.total)
            ELSE (SELECT fluxrate_internal.rate_usage(g->>'pricing_model', (g->>'unit_price')::numeric, g->'tiers',
                           (g->>'package_size')::numeric, (g->>'package_price')::numeric, (g->>'free_units')::numeric,
                           CASE WHEN g->>'value' IS NOT NULL
                                THEN public.uq_group_ref('$ORG_A', s.customer_id, '$GM_A', '2027-03-01', '2027-04-01', g->>'value')
                                ELSE u.total - coalesce((SELECT sum(public.uq_group_ref('$ORG_A', s.customer_id, '$GM_A', '2027-03-01',
                                                                  '2027-04-01', h->>'value'))
                                                           FROM jsonb_array_elements(gr.groups) h WHERE h->>'value' IS NOT NULL), 0) END)
                    FROM jsonb_array_elements(gr.groups) g
                   WHERE (g->>'value') IS NOT DISTINCT FROM nullif(substring(l->>'description' FROM '^Tokens - (.*)$'), 'other')) END, 'USD'),
       l->>'description'
  FROM public.uq_gsubs s CROSS JOIN public.uq_gcharges c
  CROSS JOIN LATERAL (SELECT coalesce(sum(x.quantity), 0) AS total FROM fluxrate_internal.usage_events x
                       WHERE x.org_id = '$ORG_A' AND x.customer_id = s.customer_id AND x.meter_id = '$GM_A'
                         AND x."timestamp" >= '2027-03-01' AND x."timestamp" < '2027-04-01') u
  CROSS JOIN LATERAL (SELECT coalesce(o.groups, cd.groups) AS groups FROM fluxrate_internal.charge_dimensions cd
                        LEFT JOIN fluxrate_internal.charge_overrides o ON o.charge_id = cd.charge_id AND o.subscription_id = s.sub_id::uuid
                       WHERE cd.charge_id = c.grouped_id::uuid) gr
  CROSS JOIN LATERAL jsonb_array_elements((fluxrate.preview_invoice(s.sub_id::uuid))->'line_items') l
 WHERE l->>'description' <> 'Tokens - unpriced';
INSERT INTO public.uq_checks
SELECT 'preview: a grouped charge has one line per group (and an unpriced line without a default)',
       count(*) = (SELECT count(*) FROM public.uq_gsubs) * 5 - 2, count(*)::text
  FROM public.uq_gsubs s CROSS JOIN LATERAL jsonb_array_elements((fluxrate.preview_invoice(s.sub_id::uuid))->'line_items') l;
SQL
echo "grouped usage and prices: $(q "SELECT count(*) FROM public.uq_cmp WHERE path LIKE 'group:%' OR path LIKE 'price:%'") comparisons ($(lap))"

# ---------------------------------------------------------------------------
# Summary: per path, comparisons with meter_usage (ref1) and with the independent reference
# (ref2): value differences (numeric <>, or no answer) and text-only differences (same value,
# another scale), separately
# ---------------------------------------------------------------------------
qf <<'SQL'
SET TimeZone = 'UTC';
SELECT rpad(path, 52) || lpad(count(*)::text, 7) || ' compared; vs meter_usage ' || lpad(count(ref1)::text, 6) || ': value '
       || count(*) FILTER (WHERE ref1 IS NOT NULL AND got IS DISTINCT FROM ref1) || ', text '
       || count(*) FILTER (WHERE got = ref1 AND got::text <> ref1::text) || '; vs reference: value '
       || count(*) FILTER (WHERE got IS DISTINCT FROM ref2) || ', text ' || count(*) FILTER (WHERE got = ref2 AND got::text <> ref2::text)
  FROM public.uq_cmp GROUP BY path ORDER BY path;
SELECT 'by aggregation (every path): ' || string_agg(agg || ' ' || n || (CASE WHEN bad > 0 THEN ' (' || bad || ' differ)' ELSE '' END), ', ' ORDER BY agg)
  FROM (SELECT m.agg, count(*) n, count(*) FILTER (WHERE c.got IS DISTINCT FROM c.ref2 OR c.got::text <> c.ref2::text
                                                     OR c.ref1 IS NOT NULL AND (c.got IS DISTINCT FROM c.ref1 OR c.got::text <> c.ref1::text)) bad
          FROM public.uq_cmp c JOIN public.uq_meters m ON m.org_id = c.org_id AND m.meter_id = c.meter_id GROUP BY 1) x;
SELECT 'by filter (every path): ' || string_agg(variant || ' ' || n || (CASE WHEN bad > 0 THEN ' (' || bad || ' differ)' ELSE '' END), ', ' ORDER BY variant)
  FROM (SELECT m.variant, count(*) n, count(*) FILTER (WHERE c.got IS DISTINCT FROM c.ref2 OR c.got::text <> c.ref2::text
                                                     OR c.ref1 IS NOT NULL AND (c.got IS DISTINCT FROM c.ref1 OR c.got::text <> c.ref1::text)) bad
          FROM public.uq_cmp c JOIN public.uq_meters m ON m.org_id = c.org_id AND m.meter_id = c.meter_id GROUP BY 1) x;
SELECT 'non-zero answers compared: ' || count(*) FILTER (WHERE ref2 <> 0) || ' of ' || count(*) || '; answers whose text has a scale > 0: '
       || count(*) FILTER (WHERE scale(ref2) > 0) || ', > 12: ' || count(*) FILTER (WHERE scale(ref2) > 12) FROM public.uq_cmp;
SELECT 'checks: ' || count(*) || ', failed ' || count(*) FILTER (WHERE NOT ok) FROM public.uq_checks;
SELECT 'failed check: ' || what || ' -- ' || coalesce(detail, '') FROM public.uq_checks WHERE NOT ok ORDER BY what, detail LIMIT 20;
-- the differences themselves (first 30), value ones first
SELECT CASE WHEN (c.ref1 IS NOT NULL AND c.got IS DISTINCT FROM c.ref1) OR c.got IS DISTINCT FROM c.ref2 THEN 'VALUE' ELSE 'TEXT' END
       || ' ' || c.path || ' org ' || o.tag || ' customer ' || coalesce(u.ext, '(all)') || ' meter ' || m.name
       || ' [' || coalesce(c.ps::text, '-') || ', ' || coalesce(c.pe::text, '-') || '): got ' || coalesce(c.got::text, 'no answer')
       || ', meter_usage ' || coalesce(c.ref1::text, '-') || ', reference ' || coalesce(c.ref2::text, '-')
  FROM public.uq_cmp c JOIN public.uq_orgs o ON o.org_id = c.org_id JOIN public.uq_meters m ON m.org_id = c.org_id AND m.meter_id = c.meter_id
  LEFT JOIN public.uq_customers u ON u.org_id = c.org_id AND u.customer_id = c.customer_id
 WHERE c.got IS DISTINCT FROM c.ref2 OR c.got::text <> c.ref2::text OR c.ref1 IS NOT NULL AND (c.got IS DISTINCT FROM c.ref1 OR c.got::text <> c.ref1::text)
 ORDER BY 1 DESC, c.path, o.tag, u.ext, m.n, c.ps LIMIT 30;
SQL
# check_entitlement on a subscription whose current period has ended (not closed yet): its
# window is the next period (compared above like every other)
q "SELECT 'note: check_entitlement without a reset period on a period that has ended, not closed yet: ' || count(*)
          || ' checks, compared on the next period''s window'
     FROM public.uq_cmp WHERE path = 'check_entitlement' AND note LIKE 'ended period%'"
read -r vdiff tdiff nchecks badchecks <<<"$(q "SELECT (SELECT count(*) FROM public.uq_cmp WHERE got IS DISTINCT FROM ref2 OR (ref1 IS NOT NULL AND got IS DISTINCT FROM ref1)),
    (SELECT count(*) FROM public.uq_cmp WHERE got::text <> ref2::text OR got::text <> ref1::text),
    (SELECT count(*) FROM public.uq_checks), (SELECT count(*) FROM public.uq_checks WHERE NOT ok)" | tr '|' ' ')"
total=$(q "SELECT count(*) FROM public.uq_cmp")
echo "total: $total comparisons, $vdiff value differences, $tdiff text differences (a value difference is also one); $nchecks checks, $badchecks failed ($(lap))"
[ "$vdiff" = 0 ] || fail "$vdiff answers differ in value"
[ "$badchecks" = 0 ] || fail "$badchecks checks failed"
if [ "$tdiff" != 0 ]; then
  [ "${EQ_STRICT:-1}" = 0 ] || fail "$tdiff answers are equal in value but not in text (scale)"
  echo "($tdiff text differences, reported only: EQ_STRICT=0)"
fi
echo ok
