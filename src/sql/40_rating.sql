-- 40_rating.sql: currencies, rounding, charge models (src/currency.c, src/rating.c),
-- the meter aggregates (src/aggregates.c) and meter_usage(), one (customer,
-- meter) over a period.  The usage rollups and the whole-organization usage of
-- a period are in 41_rollups.sql; live usage, entitlements and meter analytics
-- in 42_usage.sql (one part of 1,029 lines until issue 20).

CREATE FUNCTION fluxrate_internal.currency_exponent(currency text) RETURNS integer
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_currency_exponent';
COMMENT ON FUNCTION fluxrate_internal.currency_exponent(text) IS 'ISO 4217 minor-unit exponent (USD 2, JPY 0, KWD 3)';

CREATE FUNCTION fluxrate_internal.round_money(amount numeric, currency text) RETURNS numeric
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_round_money';
COMMENT ON FUNCTION fluxrate_internal.round_money(numeric, text) IS
  'rounds once to the currency''s minor unit, half away from zero';

CREATE FUNCTION fluxrate_internal.rate_usage(pricing_model text, unit_price numeric, tiers jsonb,
    package_size numeric, package_price numeric, free_units numeric, usage numeric)
  RETURNS numeric
  LANGUAGE C IMMUTABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_rate_usage';
COMMENT ON FUNCTION fluxrate_internal.rate_usage(text, numeric, jsonb, numeric, numeric, numeric, numeric) IS
  'unrounded amount of a charge for a billable quantity: flat, per_unit, graduated, volume, package';

-- Meter aggregates in C (src/aggregates.c): transition, combine, serial and
-- deserial functions, so they run as partial aggregates in parallel workers.
CREATE FUNCTION fluxrate_internal.unique_count_trans(internal, text) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_trans';
CREATE FUNCTION fluxrate_internal.unique_count_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_combine';
CREATE FUNCTION fluxrate_internal.unique_count_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_final';
CREATE FUNCTION fluxrate_internal.unique_count_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_serial';
CREATE FUNCTION fluxrate_internal.unique_count_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_deserial';
CREATE AGGREGATE fluxrate_internal.unique_count(text) (
  SFUNC = fluxrate_internal.unique_count_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.unique_count_final,
  COMBINEFUNC = fluxrate_internal.unique_count_combine,
  SERIALFUNC = fluxrate_internal.unique_count_serial, DESERIALFUNC = fluxrate_internal.unique_count_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.unique_count(text) IS
  'exact number of distinct non-null values, hash-based, parallel-safe (UNIQUE_COUNT meters)';

CREATE FUNCTION fluxrate_internal.last_value_trans(internal, numeric, timestamptz, timestamptz, uuid) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_trans';
CREATE FUNCTION fluxrate_internal.last_value_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_combine';
CREATE FUNCTION fluxrate_internal.last_value_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_final';
CREATE FUNCTION fluxrate_internal.last_value_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_serial';
CREATE FUNCTION fluxrate_internal.last_value_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_deserial';
CREATE AGGREGATE fluxrate_internal.last_value(numeric, timestamptz, timestamptz, uuid) (
  SFUNC = fluxrate_internal.last_value_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.last_value_final,
  COMBINEFUNC = fluxrate_internal.last_value_combine,
  SERIALFUNC = fluxrate_internal.last_value_serial, DESERIALFUNC = fluxrate_internal.last_value_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.last_value(numeric, timestamptz, timestamptz, uuid) IS
  'value of the latest event by (timestamp, ingested_at, id), parallel-safe (LAST meters)';

CREATE FUNCTION fluxrate_internal.weighted_sum_trans(internal, numeric, timestamptz, timestamptz, uuid, timestamptz, timestamptz)
  RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_trans';
CREATE FUNCTION fluxrate_internal.weighted_sum_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_combine';
CREATE FUNCTION fluxrate_internal.weighted_sum_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_final';
CREATE FUNCTION fluxrate_internal.weighted_sum_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_serial';
CREATE FUNCTION fluxrate_internal.weighted_sum_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_deserial';
CREATE AGGREGATE fluxrate_internal.weighted_sum(quantity numeric, ts timestamptz, ingested_at timestamptz, id uuid,
    period_start timestamptz, period_end timestamptz) (
  SFUNC = fluxrate_internal.weighted_sum_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.weighted_sum_final,
  COMBINEFUNC = fluxrate_internal.weighted_sum_combine,
  SERIALFUNC = fluxrate_internal.weighted_sum_serial, DESERIALFUNC = fluxrate_internal.weighted_sum_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.weighted_sum(numeric, timestamptz, timestamptz, uuid, timestamptz, timestamptz) IS
  'time-weighted level over [period_start, period_end) in quantity x hours; the latest point before the start is the level carried in; parallel-safe (WEIGHTED_SUM meters)';

-- Meter filters, all of which must match; compared as text against metadata.
-- neq and not_in also match an event that lacks the property.
CREATE FUNCTION fluxrate_internal.filters_match(metadata jsonb, filters jsonb) RETURNS boolean
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$
  SELECT filters IS NULL OR filters = '[]'::jsonb OR NOT EXISTS (
    SELECT 1 FROM pg_catalog.jsonb_array_elements(filters) f
     WHERE NOT coalesce(CASE f->>'operator'
       WHEN 'eq' THEN metadata->>(f->>'property') = f->'values'->>0
       WHEN 'neq' THEN metadata->>(f->>'property') IS DISTINCT FROM f->'values'->>0
       WHEN 'in' THEN metadata->>(f->>'property') IN (SELECT pg_catalog.jsonb_array_elements_text(f->'values'))
       WHEN 'not_in' THEN metadata->>(f->>'property') IS NULL
                       OR metadata->>(f->>'property') NOT IN (SELECT pg_catalog.jsonb_array_elements_text(f->'values'))
       WHEN 'exists' THEN metadata ? (f->>'property')
     END, false))
$$;

-- The billable quantity of one customer on one meter over [period_start, period_end).
--   SUM, MIN, MAX, AVG  of the quantities; COUNT of the events;
--   UNIQUE_COUNT        distinct metadata[property_name] (events without it do not count);
--   LAST                quantity of the latest event by timestamp, ties by ingestion order;
--   WEIGHTED_SUM        time-weighted level, in quantity x hours: each event sets the level
--                       until the next one; the level at the period start is the last
--                       event before it (carried across the boundary).
-- No events: 0 for every type.
CREATE FUNCTION fluxrate_internal.meter_usage(org_id uuid, customer_id uuid, meter_id uuid,
    period_start timestamptz, period_end timestamptz)
  RETURNS numeric
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  m fluxrate_internal.meters;
  v numeric;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = meter_usage.org_id AND x.id = meter_usage.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  -- a period with a month whose raw events were archived (33_retention.sql):
  -- the usage rollups carry it, for the meters they hold (late usage of an
  -- archived period is then billed from them)
  IF m.filters = '[]'::jsonb AND m.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
     AND EXISTS (SELECT 1 FROM fluxrate_internal.archived_months(meter_usage.org_id, meter_usage.period_start, meter_usage.period_end)) THEN
    SELECT u.usage INTO v
      FROM fluxrate_internal.org_period_usage(meter_usage.org_id, meter_usage.period_start, meter_usage.period_end,
                                              m.aggregation_type, ARRAY[meter_usage.meter_id]) u
     WHERE u.customer_id = meter_usage.customer_id;
    RETURN coalesce(v, 0);
  END IF;
  -- plain meters: one index-only range scan of the covering index, computing only
  -- the meter's own aggregate (a CASE over five aggregates would compute all five
  -- for every event)
  IF m.filters = '[]'::jsonb AND m.aggregation_type = 'SUM' THEN
    SELECT sum(e.quantity) INTO v
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end;
    RETURN coalesce(v, 0);
  ELSIF m.filters = '[]'::jsonb AND m.aggregation_type IN ('COUNT', 'MAX', 'MIN', 'AVG') THEN
    SELECT CASE m.aggregation_type WHEN 'COUNT' THEN count(*)::numeric
             WHEN 'MAX' THEN trim_scale(max(e.quantity)) WHEN 'MIN' THEN trim_scale(min(e.quantity)) ELSE avg(e.quantity) END
      INTO v
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end;
    RETURN coalesce(v, 0);
  END IF;
  IF m.aggregation_type = 'WEIGHTED_SUM' THEN
    -- the aggregate (src/aggregates.c) gets the latest event before the period
    -- (the level carried in) and the events of the period
    SELECT fluxrate_internal.weighted_sum(p.quantity, p."timestamp", p.ingested_at, p.id,
                                          meter_usage.period_start, meter_usage.period_end)
      INTO v
      FROM ((SELECT e.quantity, e."timestamp", e.ingested_at, e.id
               FROM fluxrate_internal.usage_events e
              WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
                AND e."timestamp" < meter_usage.period_start AND fluxrate_internal.filters_match(e.metadata, m.filters)
              ORDER BY e."timestamp" DESC, e.ingested_at DESC, e.id DESC LIMIT 1)
            UNION ALL
            SELECT e.quantity, e."timestamp", e.ingested_at, e.id
              FROM fluxrate_internal.usage_events e
             WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
               AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end
               AND fluxrate_internal.filters_match(e.metadata, m.filters)) p;
    RETURN v;
  END IF;

  WITH ev AS MATERIALIZED (
    SELECT e.quantity, e."timestamp", e.ingested_at, e.id, e.metadata
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end
       AND (m.filters = '[]'::jsonb OR fluxrate_internal.filters_match(e.metadata, m.filters))
  )
  SELECT CASE m.aggregation_type
    WHEN 'SUM' THEN (SELECT sum(quantity) FROM ev)
    WHEN 'COUNT' THEN (SELECT count(*)::numeric FROM ev)
    WHEN 'MAX' THEN (SELECT trim_scale(max(quantity)) FROM ev)
    WHEN 'MIN' THEN (SELECT trim_scale(min(quantity)) FROM ev)
    WHEN 'AVG' THEN (SELECT avg(quantity) FROM ev)
    WHEN 'UNIQUE_COUNT' THEN (SELECT fluxrate_internal.unique_count(metadata->>m.property_name) FROM ev)
    WHEN 'LAST' THEN (SELECT fluxrate_internal.last_value(quantity, "timestamp", ingested_at, id) FROM ev)
  END INTO v;
  RETURN coalesce(v, 0);
END
$$;

-- Prices by event dimension (24_dimensions.sql): here, after rate_usage() and
-- filters_match(), which their SQL bodies call.

-- One customer's usage of a dimensioned meter over [period_start, period_end),
-- by group: {"gpt-large": 1200, "": 15} ('' = other values and none), from the
-- events (the closer reads the rollups instead where they serve: 41_rollups.sql).
CREATE FUNCTION fluxrate_internal.meter_group_usage(org_id uuid, customer_id uuid, meter_id uuid,
    period_start timestamptz, period_end timestamptz)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v jsonb;
BEGIN
  -- a period with a month whose raw events were archived (33_retention.sql):
  -- the rollups carry it by group, as meter_usage() reads them for the
  -- ungrouped meters (a grouped charge's late usage of an archived month is
  -- then billed from them, group by group)
  IF EXISTS (SELECT 1 FROM fluxrate_internal.meters m
              WHERE m.org_id = meter_group_usage.org_id AND m.id = meter_group_usage.meter_id AND m.filters = '[]'::jsonb)
     AND EXISTS (SELECT 1 FROM fluxrate_internal.archived_months(meter_group_usage.org_id, meter_group_usage.period_start,
                                                                 meter_group_usage.period_end)) THEN
    SELECT u.groups INTO v
      FROM fluxrate_internal.org_period_group_usage(meter_group_usage.org_id, meter_group_usage.period_start,
                                                    meter_group_usage.period_end, ARRAY[meter_group_usage.meter_id]) u
     WHERE u.customer_id = meter_group_usage.customer_id;
    RETURN coalesce(v, '{}'::jsonb);
  END IF;
  SELECT coalesce(jsonb_object_agg(q.g, q.u), '{}'::jsonb) INTO v
    FROM (SELECT fluxrate_internal.group_value(e.metadata, d.property, d."values") AS g,
                 CASE WHEN m.aggregation_type = 'COUNT' THEN count(*)::numeric ELSE sum(e.quantity) END AS u
            FROM fluxrate_internal.meters m
            JOIN fluxrate_internal.meter_dimensions d ON d.org_id = m.org_id AND d.meter_id = m.id
            JOIN fluxrate_internal.usage_events e ON e.org_id = m.org_id AND e.customer_id = meter_group_usage.customer_id
                 AND e.meter_id = m.id AND e."timestamp" >= meter_group_usage.period_start AND e."timestamp" < meter_group_usage.period_end
           WHERE m.org_id = meter_group_usage.org_id AND m.id = meter_group_usage.meter_id
             AND fluxrate_internal.filters_match(e.metadata, m.filters)
           GROUP BY 1, m.aggregation_type) q;
  RETURN v;
END
$$;

-- The lines of a grouped charge for usage by group ({value: usage}, '' =
-- other): one per group, in the charge's order, zero usage included (the
-- default group takes every value the charge does not list), then, when the
-- charge has no default group, the unlisted values' usage at zero, on a line
-- of its own.  Unrounded amounts (each line is rounded once by its writer).
CREATE FUNCTION fluxrate_internal.group_lines(groups jsonb, usage jsonb, charge_name text)
  RETURNS TABLE (gpos integer, group_value text, unpriced boolean, name text, usage numeric, amount numeric,
                 pricing_model text, unit_price numeric)
  LANGUAGE sql IMMUTABLE
  AS $$
  WITH g AS (SELECT x.ord::integer AS gpos, x.g FROM jsonb_array_elements($1) WITH ORDINALITY x(g, ord)),
  rest AS (SELECT coalesce(sum(u.value::numeric), 0) AS u FROM jsonb_each_text(coalesce($2, '{}'::jsonb)) u
            WHERE NOT EXISTS (SELECT 1 FROM g WHERE g.g->>'value' = u.key))
  SELECT g.gpos, g.g->>'value', false,
         $3 || ' - ' || coalesce(g.g->>'display_name', g.g->>'value', 'other'),
         q.u,
         fluxrate_internal.rate_usage(g.g->>'pricing_model', (g.g->>'unit_price')::numeric, g.g->'tiers',
                                      (g.g->>'package_size')::numeric, (g.g->>'package_price')::numeric,
                                      (g.g->>'free_units')::numeric, q.u),
         g.g->>'pricing_model', (g.g->>'unit_price')::numeric
    FROM g
    CROSS JOIN LATERAL (SELECT CASE WHEN g.g->>'value' IS NULL THEN (SELECT rest.u FROM rest)
                                    ELSE coalesce(($2->>(g.g->>'value'))::numeric, 0) END AS u) q
  UNION ALL
  SELECT jsonb_array_length($1) + 1, NULL, true, $3 || ' - unpriced', (SELECT rest.u FROM rest), 0, 'unpriced', 0
   WHERE $1 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM g WHERE g.g->>'value' IS NULL)
$$;

-- {value: usage} by group (meter_group_usage()) as the API shows it:
-- [{value, usage}] in value order, the other values (and none) last as value null.
CREATE FUNCTION fluxrate_internal.groups_array(usage jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('value', nullif(k.key, ''), 'usage', k.value)
                                       ORDER BY k.key = '', k.key), '[]'::jsonb)
    FROM pg_catalog.jsonb_each($1) k
$$;
