-- 42_usage.sql: usage as the API shows it: a subscription's or customer's
-- live usage, entitlement checks, meter analytics (GET /meters/{id}/usage and
-- /stats).

-- Live usage and entitlements ------------------------------------------------
-- "Is this customer over its limit?" as plain SQL, consistent with what will be
-- billed: the same meter_usage() over the same current period.

-- Usage so far in a subscription's current period, per metered charge/feature.
CREATE FUNCTION fluxrate_internal.subscription_usage(org_id uuid, s fluxrate_internal.subscriptions) RETURNS jsonb
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT pg_catalog.jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'status', s.status,
    'period_start', s.current_period_start, 'period_end', s.current_period_end,
    'usage', coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('meter_id', m.id, 'meter_name', m.meter_name,
               'aggregation_type', m.aggregation_type, 'unit', m.unit,
               -- the whole current period, as the invoice will count it (events may carry
               -- timestamps up to 5 minutes ahead of now, and they are billed in this period)
               'usage', fluxrate_internal.meter_usage(org_id, s.customer_id, m.id, s.current_period_start,
                                                      s.current_period_end))
               -- a meter with a dimension (24_dimensions.sql): the same usage by group
               || coalesce((SELECT pg_catalog.jsonb_build_object('dimension', d.property, 'groups',
                              fluxrate_internal.groups_array(fluxrate_internal.meter_group_usage(org_id, s.customer_id, m.id,
                                s.current_period_start, s.current_period_end)))
                              FROM fluxrate_internal.meter_dimensions d WHERE d.org_id = m.org_id AND d.meter_id = m.id), '{}'::jsonb)
             ORDER BY m.meter_name), '[]'::jsonb))
    FROM fluxrate_internal.meters m
   WHERE m.org_id = subscription_usage.org_id
     AND m.id IN (SELECT ch.meter_id FROM fluxrate_internal.charges ch
                   WHERE ch.org_id = subscription_usage.org_id AND ch.plan_id = s.plan_id AND ch.meter_id IS NOT NULL
                  UNION
                  SELECT mm.id FROM fluxrate_internal.plan_features pf
                    JOIN fluxrate_internal.meters mm ON mm.org_id = pf.org_id AND mm.feature_id = pf.feature_id
                   WHERE pf.org_id = subscription_usage.org_id AND pf.plan_id = s.plan_id)
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_subscription_usage(subscription_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  s fluxrate_internal.subscriptions;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = get_subscription_usage.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.subscription_usage(v_org, s));
END
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_customer_usage(customer_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = get_customer_usage.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(jsonb_build_object('customer_id', customer_id, 'subscriptions',
    coalesce((SELECT jsonb_agg(fluxrate_internal.subscription_usage(v_org, s) ORDER BY s.created_at, s.id)
                FROM fluxrate_internal.subscriptions s
               WHERE s.org_id = v_org AND s.customer_id = get_customer_usage.customer_id
                 AND s.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')), '[]'::jsonb)));
END
$$;

-- May this customer use this feature now?  Switch and custom features: the plan's
-- is_enabled (and static_value).  Meter features: usage in the reset window (the
-- calendar day/week/month/year containing now, in UTC; without a reset period,
-- the subscription's period containing now, even when the closer has not advanced
-- the subscription yet; none yet for a subscription that starts later: usage 0)
-- against usage_limit; a soft limit stays allowed.  The window ends at the earlier
-- of its own end and now + 5 minutes (events may be stamped up to 5 minutes ahead).
CREATE FUNCTION fluxrate.check_entitlement(customer_external_id text DEFAULT NULL, lookup_key text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  r record;
  v_start timestamptz;
  v_end timestamptz;
  v_k integer;
  v_usage numeric;
  v_now timestamptz := fluxrate.now();
BEGIN
  PERFORM fluxrate_internal.required(check_entitlement.customer_external_id, 'customer_external_id');
  PERFORM fluxrate_internal.required(check_entitlement.lookup_key, 'lookup_key');
  SELECT s.*, pf.is_enabled, pf.usage_limit, pf.usage_reset_period, pf.is_soft_limit, pf.static_value,
         f.type AS feature_type, m.id AS meter_id, c.id AS cust_id
    INTO r
    FROM fluxrate_internal.customers c
    JOIN fluxrate_internal.subscriptions s ON s.org_id = c.org_id AND s.customer_id = c.id
         AND s.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')
    JOIN fluxrate_internal.plan_features pf ON pf.org_id = s.org_id AND pf.plan_id = s.plan_id
    JOIN fluxrate_internal.features f ON f.org_id = pf.org_id AND f.id = pf.feature_id
    LEFT JOIN fluxrate_internal.meters m ON m.org_id = f.org_id AND m.feature_id = f.id
   WHERE c.org_id = v_org AND c.external_id = check_entitlement.customer_external_id
     AND f.lookup_key = check_entitlement.lookup_key
   ORDER BY pf.is_enabled DESC, s.created_at
   LIMIT 1;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('allowed', false, 'reason', 'no active subscription includes this feature',
                              'customer_external_id', customer_external_id, 'lookup_key', lookup_key);
  END IF;
  IF r.feature_type <> 'meter' THEN
    RETURN jsonb_build_object('allowed', r.is_enabled, 'feature_type', r.feature_type, 'is_enabled', r.is_enabled,
                              'static_value', r.static_value, 'subscription_id', r.id);
  END IF;
  IF r.usage_reset_period IS NOT NULL THEN
    v_start := date_trunc(r.usage_reset_period, v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_end := ((v_start AT TIME ZONE 'UTC') + ('1 ' || r.usage_reset_period)::interval) AT TIME ZONE 'UTC';
  ELSE
    v_start := r.current_period_start;
    v_end := r.current_period_end;
    -- the period has ended but is not closed yet (the closer runs every minute): the
    -- window is the period that contains now, as the closer will number it (the
    -- current period ends at boundary index + 1, so each step needs the next one only)
    v_k := r.current_period_index + 1;
    WHILE v_end <= v_now AND v_k < r.current_period_index + 1000 LOOP
      v_start := v_end;
      v_k := v_k + 1;
      v_end := fluxrate_internal.period_boundary(r.billing_anchor, r.billing_interval, r.alignment, v_k);
    END LOOP;
  END IF;
  v_end := least(v_end, v_now + interval '5 minutes');
  -- (a subscription that starts later has no window yet)
  v_usage := CASE WHEN v_end > v_start THEN fluxrate_internal.meter_usage(v_org, r.cust_id, r.meter_id, v_start, v_end) ELSE 0 END;
  RETURN jsonb_build_object('allowed', r.is_enabled AND (r.usage_limit IS NULL OR v_usage < r.usage_limit OR r.is_soft_limit),
    'feature_type', 'meter', 'is_enabled', r.is_enabled, 'usage', v_usage, 'usage_limit', r.usage_limit,
    'is_soft_limit', r.is_soft_limit, 'usage_reset_period', r.usage_reset_period,
    'window_start', v_start, 'subscription_id', r.id);
END
$$;

-- Meter analytics (GET /meters/{id}/usage, GET /meters/{id}/stats) -------------
-- Analytics count the events that pass the meter's filters, for every customer
-- or one.  Calendar buckets are UTC; weeks are ISO weeks (Monday).

-- Usage of one meter over [range_start, range_end), all customers (customer_id
-- NULL) or one: SUM, COUNT, MAX, MIN, AVG and UNIQUE_COUNT over the events of
-- the range taken together; LAST and WEIGHTED_SUM, which are per customer, as
-- the sum over customers of meter_usage() (what each would be billed).
CREATE FUNCTION fluxrate_internal.meter_range_usage(org_id uuid, m fluxrate_internal.meters, customer_id uuid,
    range_start timestamptz, range_end timestamptz)
  RETURNS numeric
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT CASE WHEN m.aggregation_type IN ('LAST', 'WEIGHTED_SUM') THEN
    (SELECT coalesce(sum(fluxrate_internal.meter_usage(meter_range_usage.org_id, c.customer_id, m.id,
                                                       meter_range_usage.range_start, meter_range_usage.range_end)), 0)
       FROM (SELECT DISTINCT e.customer_id FROM fluxrate_internal.usage_events e
              WHERE e.org_id = meter_range_usage.org_id AND e.meter_id = m.id
                AND e."timestamp" < meter_range_usage.range_end   -- earlier events carry a WEIGHTED_SUM level in
                AND (meter_range_usage.customer_id IS NULL OR e.customer_id = meter_range_usage.customer_id)) c)
  ELSE
    (SELECT coalesce(CASE m.aggregation_type WHEN 'SUM' THEN sum(e.quantity) WHEN 'COUNT' THEN count(*)::numeric
              WHEN 'MAX' THEN trim_scale(max(e.quantity)) WHEN 'MIN' THEN trim_scale(min(e.quantity)) WHEN 'AVG' THEN avg(e.quantity)
              WHEN 'UNIQUE_COUNT' THEN fluxrate_internal.unique_count(e.metadata->>m.property_name) END, 0)
       FROM fluxrate_internal.usage_events e
      WHERE e.org_id = meter_range_usage.org_id AND e.meter_id = m.id
        AND e."timestamp" >= meter_range_usage.range_start AND e."timestamp" < meter_range_usage.range_end
        AND (meter_range_usage.customer_id IS NULL OR e.customer_id = meter_range_usage.customer_id)
        AND fluxrate_internal.filters_match(e.metadata, m.filters))
  END
$$;

-- get_meter_usage()'s split by the meter's dimension over [range_start,
-- range_end): {dimension, groups: [{value, usage, event_count}]} (value null:
-- every value the meter does not list, and none), or {} for a meter without a
-- dimension.  LAST and WEIGHTED_SUM are per customer, not per group: no split.
CREATE FUNCTION fluxrate_internal.meter_dimension_usage(org_id uuid, m fluxrate_internal.meters, customer_id uuid,
    range_start timestamptz, range_end timestamptz)
  RETURNS jsonb
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce((
    SELECT jsonb_build_object('dimension', d.property, 'groups',
             coalesce((SELECT jsonb_agg(jsonb_build_object('value', nullif(q.g, ''), 'usage', q.u, 'event_count', q.n)
                                        ORDER BY q.g = '', q.g)
                         FROM (SELECT fluxrate_internal.group_value(e.metadata, d.property, d."values") AS g, count(*) AS n,
                                      CASE m.aggregation_type WHEN 'SUM' THEN sum(e.quantity) WHEN 'COUNT' THEN count(*)::numeric
                                        WHEN 'MAX' THEN trim_scale(max(e.quantity)) WHEN 'MIN' THEN trim_scale(min(e.quantity))
                                        WHEN 'AVG' THEN avg(e.quantity)
                                        WHEN 'UNIQUE_COUNT' THEN fluxrate_internal.unique_count(e.metadata->>m.property_name) END AS u
                                 FROM fluxrate_internal.usage_events e
                                WHERE e.org_id = meter_dimension_usage.org_id AND e.meter_id = m.id
                                  AND e."timestamp" >= meter_dimension_usage.range_start AND e."timestamp" < meter_dimension_usage.range_end
                                  AND (meter_dimension_usage.customer_id IS NULL OR e.customer_id = meter_dimension_usage.customer_id)
                                  AND fluxrate_internal.filters_match(e.metadata, m.filters)
                                GROUP BY 1) q), '[]'::jsonb))
      FROM fluxrate_internal.meter_dimensions d
     WHERE d.org_id = meter_dimension_usage.org_id AND d.meter_id = m.id
       AND m.aggregation_type NOT IN ('LAST', 'WEIGHTED_SUM')), '{}'::jsonb)
$$;

-- The bound on buckets x customers of an analytics request (get_meter_usage).
CREATE FUNCTION fluxrate_internal.max_analytics_work() RETURNS bigint
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 10000::bigint $$;

-- GET /meters/{meter_id}/usage: the meter's usage over [start_date, end_date)
-- (default the last 30 days up to now), by hour/day/week/month bucket of the
-- range (at most 10,000), for all customers or one.  Only the buckets with
-- events or usage, unless include_empty => true asks for every bucket of the
-- range (zeros included, the 0.1.0 behaviour).  Counted from the stored
-- events: a month of the range whose raw events were archived is listed under
-- "archived" (its usage is billed from the rollups, not shown here).
CREATE FUNCTION fluxrate.get_meter_usage(meter_id uuid, start_date timestamptz DEFAULT NULL,
    end_date timestamptz DEFAULT NULL, group_by text DEFAULT 'day', customer_id uuid DEFAULT NULL,
    include_empty boolean DEFAULT false)
  RETURNS json                           -- keys in a logical order (75_render.sql)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  v_now timestamptz := fluxrate.now();
  v_start timestamptz;
  v_end timestamptz;
  v_group text;
  v_step interval;
  v_first timestamp;
  m fluxrate_internal.meters;
  v_result jsonb;
  v_buckets bigint;
  v_customers bigint;
BEGIN
  v_group := coalesce(fluxrate_internal.one_of(get_meter_usage.group_by, 'group_by', ARRAY['hour', 'day', 'week', 'month']), 'day');
  v_start := coalesce(get_meter_usage.start_date, ((v_now AT TIME ZONE 'UTC') - interval '30 days') AT TIME ZONE 'UTC');
  v_end := coalesce(get_meter_usage.end_date, v_now);
  IF v_start >= v_end THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date must be before end_date',
      format('start_date %s is not before end_date %s.', v_start, v_end),
      'Send a start_date earlier than end_date (by default the range is the last 30 days up to now).');
  END IF;
  v_step := ('1 ' || v_group)::interval;
  v_first := date_trunc(v_group, v_start AT TIME ZONE 'UTC');
  IF v_first + 10000 * v_step < v_end AT TIME ZONE 'UTC' THEN
    PERFORM fluxrate_internal.fail('PT422', format('too many %s periods', v_group),
      format('From %s to %s there are more than 10000 periods of one %s.', v_start, v_end, v_group),
      'Use a coarser group_by or a shorter range.');
  END IF;
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter_usage.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  IF get_meter_usage.customer_id IS NOT NULL THEN
    PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = get_meter_usage.customer_id;
    IF NOT FOUND THEN
      PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
    END IF;
  END IF;
  -- The work bound (docs/security.md, "Limits"): LAST and WEIGHTED_SUM meters
  -- compute every bucket once per customer (meter_usage() over the bucket),
  -- ~0.3 ms each: at most 10,000 buckets x customers, ~3 s, inside the HTTP
  -- roles' statement_timeout.  The other aggregations are one pass over the
  -- range's events whatever the buckets.
  IF m.aggregation_type IN ('LAST', 'WEIGHTED_SUM') THEN
    v_buckets := (SELECT count(*) FROM generate_series(v_first, v_end AT TIME ZONE 'UTC', v_step) s
                   WHERE s < v_end AT TIME ZONE 'UTC');
    v_customers := CASE WHEN get_meter_usage.customer_id IS NOT NULL THEN 1
                        ELSE (SELECT count(*) FROM fluxrate_internal.customers c WHERE c.org_id = v_org) END;
    IF v_buckets * v_customers > fluxrate_internal.max_analytics_work() THEN
      PERFORM fluxrate_internal.fail('PT422', 'usage request too large',
        format('%s %s buckets x %s customers = %s computations of a %s meter; at most %s.', v_buckets, v_group, v_customers,
               v_buckets * v_customers, m.aggregation_type, fluxrate_internal.max_analytics_work()),
        'Use a coarser group_by, a shorter range, or one customer_id.');
    END IF;
  END IF;
  WITH ev AS MATERIALIZED (
    SELECT e.customer_id AS cust, e.quantity AS q, e.metadata AS meta,
           date_trunc(v_group, e."timestamp" AT TIME ZONE 'UTC') AS bucket
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = v_org AND e.meter_id = m.id
       AND e."timestamp" >= v_start AND e."timestamp" < v_end
       AND (get_meter_usage.customer_id IS NULL OR e.customer_id = get_meter_usage.customer_id)
       AND fluxrate_internal.filters_match(e.metadata, m.filters)
  ), g AS (
    SELECT ev.bucket, count(*) AS n,
           CASE m.aggregation_type WHEN 'SUM' THEN sum(ev.q) WHEN 'COUNT' THEN count(*)::numeric
             WHEN 'MAX' THEN trim_scale(max(ev.q)) WHEN 'MIN' THEN trim_scale(min(ev.q)) WHEN 'AVG' THEN avg(ev.q)
             WHEN 'UNIQUE_COUNT' THEN fluxrate_internal.unique_count(ev.meta->>m.property_name) END AS u
      FROM ev GROUP BY ev.bucket
  ), buckets AS (
    SELECT s AS bucket FROM generate_series(v_first, v_end AT TIME ZONE 'UTC', v_step) s
     WHERE s < v_end AT TIME ZONE 'UTC'
  )
  SELECT jsonb_build_object('meter_id', m.id,
    'total_usage', fluxrate_internal.meter_range_usage(v_org, m, get_meter_usage.customer_id, v_start, v_end),
    'event_count', (SELECT count(*) FROM ev),
    'unique_customers', (SELECT count(DISTINCT ev.cust) FROM ev),
    'period_start', v_start, 'period_end', v_end,
    'grouped_data', (SELECT coalesce(jsonb_agg(jsonb_build_object('period', r.bucket AT TIME ZONE 'UTC',
        'usage', r.usage, 'event_count', r.n) ORDER BY r.bucket), '[]'::jsonb)
      FROM (SELECT bk.bucket, coalesce(g.n, 0) AS n,
                   CASE WHEN m.aggregation_type IN ('LAST', 'WEIGHTED_SUM')
                     THEN fluxrate_internal.meter_range_usage(v_org, m, get_meter_usage.customer_id,
                            greatest(bk.bucket AT TIME ZONE 'UTC', v_start), least((bk.bucket + v_step) AT TIME ZONE 'UTC', v_end))
                     ELSE coalesce(g.u, 0) END AS usage
              FROM buckets bk LEFT JOIN g ON g.bucket = bk.bucket) r
     WHERE coalesce(get_meter_usage.include_empty, false) OR r.n > 0 OR r.usage <> 0))
    -- the split by the meter's dimension, if it has one
    || fluxrate_internal.meter_dimension_usage(v_org, m, get_meter_usage.customer_id, v_start, v_end)
    -- months of the range whose raw events retention archived (33_retention.sql):
    -- the counts above are of the events still stored; said, as list_meter_events
    -- says it (invoices bill those months from the rollups)
    || coalesce((SELECT jsonb_build_object('archived', jsonb_agg(jsonb_build_object('month', a.month, 'events', a.events,
                                                                                    'archived_at', a.archived_at)
                                                                 ORDER BY a.month, a.archived_at))
                   FROM fluxrate_internal.archived_months(v_org, v_start, v_end) a
                 HAVING count(*) > 0), '{}'::jsonb)
    INTO v_result;
  RETURN fluxrate_internal.ordered_json(v_result);
END
$$;

-- GET /meters/{meter_id}/stats: all-time counts, and the usage so far in the UTC
-- day, ISO week and month containing now ([start of the unit, now)).
-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_meter_stats(meter_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  v_now timestamptz := fluxrate.now();
  m fluxrate_internal.meters;
  v_result jsonb;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter_stats.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  SELECT jsonb_build_object('meter_id', m.id, 'total_events', count(*),
    'unique_customers', count(DISTINCT e.customer_id),
    'first_event_date', min(e."timestamp"), 'last_event_date', max(e."timestamp"),
    'today_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('day', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now),
    'this_week_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('week', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now),
    'this_month_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('month', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now))
    INTO v_result
    FROM fluxrate_internal.usage_events e
   WHERE e.org_id = v_org AND e.meter_id = m.id AND fluxrate_internal.filters_match(e.metadata, m.filters);
  RETURN fluxrate_internal.ordered_json(v_result);
END
$$;
