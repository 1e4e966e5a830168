-- 24_dimensions.sql: prices by event dimension (issue 15, item 3).  A meter
-- carries one dimension: a metadata property and the values it is split by
-- (at most 100: the rollups' group key, 41_rollups.sql, so their cardinality
-- is bounded by construction; every other value, and an event without the
-- property, is the group '' -- "other").  A usage charge on a SUM or COUNT
-- meter may price by it: groups [{value, pricing_model, ...}], each with its
-- own pricing model and its own invoice line; a group with value null is the
-- default (every value the charge does not list).  Without a default, the
-- unlisted values are billed at zero on a visible "unpriced" line: the events
-- were accepted (perhaps inside the application's own transaction) and the
-- meter may be priced by other plans, so ingestion does not refuse them.
-- subscription_charges() is what every rater reads: the plan's charges with the
-- subscription's overrides (23_overrides.sql) and groups applied.
-- docs/rating.md ("Prices by event dimension").  Before the parts that rate
-- (40_*): their SQL bodies name these objects.

CREATE TABLE fluxrate_internal.meter_dimensions (
  org_id      uuid NOT NULL,
  meter_id    uuid NOT NULL,
  property    text NOT NULL CHECK (pg_catalog.length(property) BETWEEN 1 AND 255),
  -- the values the usage rollups keep apart (the rest roll up together as '')
  "values"    text[] NOT NULL CHECK (pg_catalog.cardinality("values") BETWEEN 1 AND 100),
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, meter_id),
  FOREIGN KEY (org_id, meter_id) REFERENCES fluxrate_internal.meters (org_id, id) ON DELETE CASCADE
);

CREATE TABLE fluxrate_internal.charge_dimensions (
  org_id      uuid NOT NULL,
  charge_id   uuid NOT NULL,
  property    text NOT NULL,
  groups      jsonb NOT NULL,       -- normalized by check_groups()
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, charge_id),
  FOREIGN KEY (org_id, charge_id) REFERENCES fluxrate_internal.charges (org_id, id) ON DELETE CASCADE
);

-- An event's group: its value of the property when the meter lists it, else ''
-- (other, or no value).  Compared as text, like meter filters.
CREATE FUNCTION fluxrate_internal.group_value(metadata jsonb, property text, vals text[]) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$
  SELECT CASE WHEN $1->>$2 = ANY ($3) THEN $1->>$2 ELSE '' END
$$;

-- Declare a meter's dimension.  Only while the meter has no events: the
-- rollups split the events by it, and what they hold depends on the events
-- alone (a meter with events keeps its dimension; a new meter gets another).
CREATE FUNCTION fluxrate.set_meter_dimension(meter_id uuid DEFAULT NULL, property text DEFAULT NULL,
    dimension_values text[] DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  v_n integer := coalesce(cardinality(set_meter_dimension.dimension_values), 0);
  d fluxrate_internal.meter_dimensions;
BEGIN
  PERFORM fluxrate_internal.required(set_meter_dimension.meter_id, 'meter_id');
  PERFORM fluxrate_internal.required(nullif(set_meter_dimension.property, ''), 'property');
  IF length(set_meter_dimension.property) > 255 THEN
    PERFORM fluxrate_internal.fail('22023', 'property must be 1 to 255 characters',
      format('property has %s characters.', length(set_meter_dimension.property)));
  END IF;
  IF v_n = 0 OR v_n > 100 THEN
    PERFORM fluxrate_internal.fail('PT422', 'a dimension has 1 to 100 values',
      format('%s values were sent.', v_n), 'The rollups keep at most 100 values of a meter apart; the rest count as one group (other).');
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(set_meter_dimension.dimension_values) v WHERE v IS NULL OR v = '' OR length(v) > 255)
     OR (SELECT count(DISTINCT v) FROM unnest(set_meter_dimension.dimension_values) v) <> v_n THEN
    PERFORM fluxrate_internal.fail('22023', 'dimension values must be distinct, non-empty strings of at most 255 characters');
  END IF;
  -- not while a rollup refresh runs (it reads the dimension to split the events)
  PERFORM pg_advisory_xact_lock_shared(fluxrate_internal.rollup_lock_key());
  PERFORM 1 FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = set_meter_dimension.meter_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.meter_id = set_meter_dimension.meter_id) THEN
    PERFORM fluxrate_internal.fail('PT409', 'the meter already has events',
      'A meter''s dimension is set before its first event: the usage rollups are split by it.',
      'Create a new meter for the new dimension.');
  END IF;
  -- the grouped charges on it keep naming its property and values
  IF EXISTS (SELECT 1 FROM fluxrate_internal.charge_dimensions cd JOIN fluxrate_internal.charges c
               ON c.org_id = cd.org_id AND c.id = cd.charge_id
              WHERE cd.org_id = v_org AND c.meter_id = set_meter_dimension.meter_id
                AND (cd.property <> set_meter_dimension.property
                     OR EXISTS (SELECT 1 FROM jsonb_array_elements(cd.groups) g
                                 WHERE g->>'value' IS NOT NULL AND g->>'value' <> ALL (set_meter_dimension.dimension_values)))) THEN
    PERFORM fluxrate_internal.fail('PT409', 'a grouped charge prices this meter by other values',
      'The charges grouped by the meter''s dimension must still find their property and values.');
  END IF;
  INSERT INTO fluxrate_internal.meter_dimensions AS x (org_id, meter_id, property, "values", created_at)
  VALUES (v_org, set_meter_dimension.meter_id, set_meter_dimension.property, set_meter_dimension.dimension_values, fluxrate.now())
  ON CONFLICT ON CONSTRAINT meter_dimensions_pkey DO UPDATE SET property = excluded.property, "values" = excluded."values"
  RETURNING * INTO d;
  RETURN jsonb_build_object('meter_id', d.meter_id, 'property', d.property, 'values', to_jsonb(d."values"));
END
$$;

-- Validate and normalize a grouped charge's groups for meter_id, grouped by
-- property: [{value (null: the default), display_name, pricing_model,
-- unit_price, tiers, package_size, package_price, free_units}], at most 100,
-- values distinct and among the meter's, at most one default.
CREATE FUNCTION fluxrate_internal.check_groups(org_id uuid, meter_id uuid, property text, groups jsonb) RETURNS jsonb
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  m fluxrate_internal.meters;
  d fluxrate_internal.meter_dimensions;
  g jsonb;
  i integer := 0;
  v_model text;
  v_out jsonb := '[]'::jsonb;
  v_seen text[] := '{}'::text[];
  v_default boolean := false;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = check_groups.org_id AND x.id = check_groups.meter_id;
  SELECT * INTO d FROM fluxrate_internal.meter_dimensions x WHERE x.org_id = check_groups.org_id AND x.meter_id = check_groups.meter_id;
  IF d.meter_id IS NULL OR d.property <> check_groups.property THEN
    PERFORM fluxrate_internal.fail('PT422', format('the meter does not carry the property %s', property),
      CASE WHEN d.meter_id IS NULL THEN format('Meter %s has no dimension.', m.meter_name)
           ELSE format('Meter %s is split by %s.', m.meter_name, d.property) END,
      'Declare the meter''s dimension first (set_meter_dimension), or group by the property it carries.');
  END IF;
  IF m.aggregation_type NOT IN ('SUM', 'COUNT') THEN
    PERFORM fluxrate_internal.fail('PT422', 'only SUM and COUNT meters price by dimension',
      format('Meter %s aggregates by %s.', m.meter_name, m.aggregation_type),
      'A group''s usage is its share of the meter''s; for SUM and COUNT the shares add up to the whole.');
  END IF;
  IF groups IS NULL OR jsonb_typeof(groups) <> 'array' OR jsonb_array_length(groups) = 0 THEN
    PERFORM fluxrate_internal.fail('22023', 'groups must be a non-empty array', NULL,
      'Send [{"value": "gpt-large", "unit_price": 0.01}, {"value": null, "unit_price": 0.002}].');
  END IF;
  IF jsonb_array_length(groups) > 100 THEN
    PERFORM fluxrate_internal.fail('PT422', 'a charge has at most 100 groups', format('%s groups were sent.', jsonb_array_length(groups)));
  END IF;
  FOR g IN SELECT e FROM jsonb_array_elements(groups) e LOOP
    i := i + 1;
    IF jsonb_typeof(g) <> 'object' OR jsonb_typeof(coalesce(g->'value', 'null')) NOT IN ('string', 'null') THEN
      PERFORM fluxrate_internal.fail('22023', format('group %s must be an object whose value is a string or null', i));
    END IF;
    IF g->>'value' IS NULL THEN
      IF v_default THEN
        PERFORM fluxrate_internal.fail('22023', 'a charge has at most one default group (value null)');
      END IF;
      v_default := true;
    ELSIF g->>'value' = ANY (v_seen) THEN
      PERFORM fluxrate_internal.fail('22023', format('group value %s is listed twice', g->>'value'));
    ELSIF g->>'value' <> ALL (d."values") THEN
      PERFORM fluxrate_internal.fail('PT422', format('group value %s is not a value of the meter''s dimension', g->>'value'),
        format('Meter %s keeps these values of %s apart: %s.', m.meter_name, d.property, array_to_string(d."values", ', ')));
    ELSE
      v_seen := v_seen || ARRAY[g->>'value'];
    END IF;
    v_model := lower(coalesce(g->>'pricing_model', 'per_unit'));
    PERFORM fluxrate_internal.check_usage_pricing(v_model, (g->>'unit_price')::numeric,
      CASE WHEN v_model IN ('graduated', 'volume') THEN g->'tiers' END,
      (g->>'package_size')::numeric, (g->>'package_price')::numeric, (g->>'free_units')::numeric, format('group %s ', i));
    v_out := v_out || jsonb_build_array(jsonb_build_object('value', g->'value', 'display_name', g->'display_name',
      'pricing_model', v_model, 'unit_price', g->'unit_price',
      'tiers', CASE WHEN v_model IN ('graduated', 'volume') THEN g->'tiers' END,
      'package_size', g->'package_size', 'package_price', g->'package_price', 'free_units', coalesce(g->'free_units', '0')));
  END LOOP;
  RETURN v_out;
END
$$;

-- Price a usage charge of the plan by the meter's dimension (replaces its
-- groups).  Groups are prices, and a plan's prices do not change under its
-- subscribers (issue 15, item 4): on a plan with subscriptions this writes a
-- new version of the plan (25_plan_versions.sql, plan_for_edit), whose charge
-- gets the groups; the subscribers stay on theirs until migrated.  One
-- subscription's groups: set_charge_override(groups => ...).
CREATE FUNCTION fluxrate.set_charge_groups(charge_id uuid DEFAULT NULL, property text DEFAULT NULL, groups jsonb DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  c fluxrate_internal.charges;
  v fluxrate_internal.plans;
  cd fluxrate_internal.charge_dimensions;
  v_groups jsonb;
BEGIN
  PERFORM fluxrate_internal.required(set_charge_groups.charge_id, 'charge_id');
  PERFORM fluxrate_internal.required(set_charge_groups.property, 'property');
  SELECT * INTO c FROM fluxrate_internal.charges x WHERE x.org_id = v_org AND x.id = set_charge_groups.charge_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', format('No charge %s in this organization.', charge_id));
  END IF;
  IF c.type <> 'USAGE' THEN
    PERFORM fluxrate_internal.fail('22023', 'only usage charges price by dimension', format('Charge %s is %s.', c.id, c.type));
  END IF;
  IF c.status <> 'ACTIVE' THEN
    PERFORM fluxrate_internal.fail('PT409', 'the charge is not active', format('Charge %s is %s.', c.id, c.status),
      'Group the plan''s active charge (get_plan lists them).');
  END IF;
  v_groups := fluxrate_internal.check_groups(v_org, c.meter_id, set_charge_groups.property, set_charge_groups.groups);
  -- the plan itself while nobody is subscribed, else a new version (PT409 for
  -- a superseded version: edits go to the current one)
  v := fluxrate_internal.plan_for_edit(v_org, c.plan_id);
  c := fluxrate_internal.charge_in_version(v, c.id);
  INSERT INTO fluxrate_internal.charge_dimensions AS x (org_id, charge_id, property, groups, created_at)
  VALUES (v_org, c.id, set_charge_groups.property, v_groups, fluxrate.now())
  ON CONFLICT ON CONSTRAINT charge_dimensions_pkey DO UPDATE SET property = excluded.property, groups = excluded.groups
  RETURNING * INTO cd;
  RETURN jsonb_build_object('charge_id', cd.charge_id, 'property', cd.property, 'groups', cd.groups,
                            'plan_id', v.id, 'plan_version', v.version);
END
$$;

-- The charges of a subscription's plan, priced for it: each charge's override
-- (23_overrides.sql) in place of the plan's price, and a grouped charge's
-- groups (the override's, else the plan's).  Plain SQL without SET clauses, so
-- that it is inlined into the closer's statement and the other raters.
-- with_overrides / with_groups false: the caller knows that none of the
-- organization's subscriptions has an override, or that none of its charges
-- is grouped (the closer probes once per batch, sys_close_batch); given as
-- constants, the planner drops that join instead of probing its index once
-- per charge.  Either answer is the same then: it is only cheaper.
CREATE FUNCTION fluxrate_internal.subscription_charges(org_id uuid, subscription_id uuid, plan_id uuid,
    with_overrides boolean DEFAULT true, with_groups boolean DEFAULT true)
  RETURNS TABLE (id uuid, type text, meter_id uuid, display_name text, pricing_model text, unit_price numeric, tiers jsonb,
                 package_size numeric, package_price numeric, free_units numeric, billing_timing text, status text,
                 created_at timestamptz, groups jsonb, overridden boolean)
  LANGUAGE sql STABLE
  AS $$
  SELECT c.id, c.type, c.meter_id, c.display_name,
         CASE WHEN o.charge_id IS NULL THEN c.pricing_model ELSE o.pricing_model END,
         CASE WHEN o.charge_id IS NULL THEN c.unit_price ELSE o.unit_price END,
         CASE WHEN o.charge_id IS NULL THEN c.tiers ELSE o.tiers END,
         CASE WHEN o.charge_id IS NULL THEN c.package_size ELSE o.package_size END,
         CASE WHEN o.charge_id IS NULL THEN c.package_price ELSE o.package_price END,
         CASE WHEN o.charge_id IS NULL THEN c.free_units ELSE o.free_units END,
         c.billing_timing, c.status, c.created_at,
         CASE WHEN cd.charge_id IS NULL THEN NULL ELSE coalesce(o.groups, cd.groups) END,
         o.charge_id IS NOT NULL
    FROM fluxrate_internal.charges c
    LEFT JOIN fluxrate_internal.charge_overrides o ON $4 AND o.org_id = c.org_id AND o.subscription_id = $2 AND o.charge_id = c.id
    LEFT JOIN fluxrate_internal.charge_dimensions cd ON $5 AND cd.org_id = c.org_id AND cd.charge_id = c.id
   WHERE c.org_id = $1 AND c.plan_id = $3
$$;

-- One charge as priced for a subscription, whichever plan it is on (the
-- late-usage lines of a period billed before a plan change).
CREATE FUNCTION fluxrate_internal.subscription_charge(org_id uuid, subscription_id uuid, charge_id uuid)
  RETURNS TABLE (id uuid, type text, meter_id uuid, display_name text, pricing_model text, unit_price numeric, tiers jsonb,
                 package_size numeric, package_price numeric, free_units numeric, billing_timing text, status text,
                 created_at timestamptz, groups jsonb, overridden boolean)
  LANGUAGE sql STABLE
  AS $$
  SELECT sc.* FROM fluxrate_internal.charges c
   CROSS JOIN LATERAL fluxrate_internal.subscription_charges($1, $2, c.plan_id) sc
   WHERE c.org_id = $1 AND c.id = $3 AND sc.id = c.id
$$;

-- How many lines group_lines() writes for these groups (without the usage).
CREATE FUNCTION fluxrate_internal.group_line_count(groups jsonb) RETURNS integer
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT CASE WHEN $1 IS NULL THEN 1
              ELSE jsonb_array_length($1)
                   + CASE WHEN EXISTS (SELECT 1 FROM jsonb_array_elements($1) g WHERE g->>'value' IS NULL) THEN 0 ELSE 1 END END
$$;
