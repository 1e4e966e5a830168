-- 20_catalog.sql: paging and input checks, features and meters, plans and
-- charges, plan features.  Every function resolves the organization once
-- (require_org) and passes it explicitly; parameter names are Fluxrate's JSON
-- keys so that PostgREST's POST /rpc/<fn> with Fluxrate's body calls them as is.
-- Customers are in 21_customers.sql, subscriptions in 22_subscriptions.sql (the
-- catalog was one part of 1,052 lines until issue 20).

-- Paging ---------------------------------------------------------------------

-- page is 1-based; page_size defaults to 20 and may not exceed 100 (Fluxrate's rule).
CREATE FUNCTION fluxrate_internal.check_page(page integer, page_size integer) RETURNS void
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF page IS NOT NULL AND page < 1 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'page must be 1 or more', DETAIL = pg_catalog.format('page was %s.', page);
  END IF;
  IF page_size IS NOT NULL AND (page_size < 1 OR page_size > 100) THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'page_size must be between 1 and 100',
          DETAIL = pg_catalog.format('page_size was %s.', page_size);
  END IF;
END
$$;

CREATE FUNCTION fluxrate_internal.page_envelope(data jsonb, page integer, page_size integer, total bigint) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('data', coalesce(data, '[]'::jsonb), 'meta',
    pg_catalog.jsonb_build_object('page', page, 'page_size', page_size, 'total', total,
      'total_pages', CASE WHEN total = 0 THEN 0 ELSE (total + page_size - 1) / page_size END))
$$;

-- Every price and quantity of the catalog (unit_price, tier unit_price,
-- flat_fee and up_to, package_size and package_price, free_units,
-- minimum_commitment, usage_limit) and of manual invoice lines: finite (NaN and
-- +/-Infinity are refused here, at creation, not later at subscribe, preview
-- or close), below 10^15, and with at most 12 decimal places (SPEC: money and
-- quantities).  The magnitude bound keeps every product and sum the rating does
-- far inside numeric's range (docs/security.md, "Prices").
CREATE FUNCTION fluxrate_internal.check_decimal(value numeric, field text, allow_zero boolean DEFAULT true)
  RETURNS numeric LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF value IS NULL THEN
    RETURN NULL;
  END IF;
  -- finite, below 10^15, 12 decimal places; first, so that no DETAIL below
  -- prints a number of 131,072 digits
  PERFORM fluxrate_internal.check_magnitude(value, field);
  IF value < 0 OR (NOT allow_zero AND value = 0) THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422',
      MESSAGE = pg_catalog.format('%s must be %s', field, CASE WHEN allow_zero THEN 'zero or more' ELSE 'greater than zero' END),
      DETAIL = pg_catalog.format('%s was %s.', field, value);
  END IF;
  RETURN value;
END
$$;

-- The bound shared by check_decimal and the signed amounts (a manual line's
-- unit_amount may be a credit): |value| < 10^15, at most 12 decimal places.
CREATE FUNCTION fluxrate_internal.check_magnitude(value numeric, field text)
  RETURNS numeric LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF value IS NULL THEN
    RETURN NULL;
  END IF;
  IF value = 'NaN'::numeric OR value = 'Infinity'::numeric OR value = '-Infinity'::numeric THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('%s must be a finite number', field),
      DETAIL = pg_catalog.format('%s was %s.', field, value);
  END IF;
  IF pg_catalog.abs(value) >= 1e15 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('%s is too large', field),
      DETAIL = pg_catalog.format('%s has %s digits before the decimal point.', field,
                                 pg_catalog.length(pg_catalog.trunc(pg_catalog.abs(value))::text)),
      HINT = 'Prices and quantities are below 10^15 (at most 15 digits before the decimal point).';
  END IF;
  IF pg_catalog.scale(value) > 12 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('%s has more than 12 decimal places', field),
      DETAIL = pg_catalog.format('%s was %s.', field, value);
  END IF;
  RETURN value;
END
$$;

-- Features and meters --------------------------------------------------------

CREATE FUNCTION fluxrate_internal.meter_json(m fluxrate_internal.meters) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', m.id, 'feature_id', m.feature_id, 'meter_token', m.meter_token,
    'meter_name', m.meter_name, 'property_name', m.property_name, 'aggregation_type', m.aggregation_type,
    'unique_property', m.unique_property, 'unit', m.unit, 'filters', m.filters, 'created_at', m.created_at)
$$;

CREATE FUNCTION fluxrate_internal.feature_json(f fluxrate_internal.features) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', f.id, 'name', f.name, 'lookup_key', f.lookup_key, 'type', f.type,
    'description', f.description, 'created_at', f.created_at)
    || coalesce((SELECT pg_catalog.jsonb_build_object('meter_id', m.id, 'meter_token', m.meter_token,
                   'meter_name', m.meter_name, 'property_name', m.property_name,
                   'aggregation_type', m.aggregation_type, 'unit', m.unit, 'filters', m.filters,
                   'meter', fluxrate_internal.meter_json(m))
                 FROM fluxrate_internal.meters m WHERE m.org_id = f.org_id AND m.feature_id = f.id), '{}'::jsonb)
$$;

-- Meter filters: at most 5, each {property, operator: eq|neq|in|not_in|exists, values}.
CREATE FUNCTION fluxrate_internal.check_filters(filters jsonb) RETURNS jsonb
  LANGUAGE plpgsql IMMUTABLE
  AS $$
DECLARE
  f jsonb;
  i integer := 0;
  op text;
BEGIN
  IF filters IS NULL OR filters = 'null'::jsonb THEN
    RETURN '[]'::jsonb;
  END IF;
  IF pg_catalog.jsonb_typeof(filters) <> 'array' THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'filters must be an array',
      HINT = 'Send [{"property": "region", "operator": "eq", "values": ["eu"]}].';
  END IF;
  IF pg_catalog.jsonb_array_length(filters) > 5 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = 'a meter has at most 5 filters',
      DETAIL = pg_catalog.format('%s filters were sent.', pg_catalog.jsonb_array_length(filters));
  END IF;
  FOR f IN SELECT e FROM pg_catalog.jsonb_array_elements(filters) e LOOP
    i := i + 1;
    IF pg_catalog.jsonb_typeof(f) <> 'object' OR coalesce(f->>'property', '') = '' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s has no property', i);
    END IF;
    op := coalesce(f->>'operator', 'eq');
    IF op NOT IN ('eq', 'neq', 'in', 'not_in', 'exists') THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s has an invalid operator: %s', i, op),
        DETAIL = 'operator must be one of eq, neq, in, not_in, exists.';
    END IF;
    IF op <> 'exists' AND (pg_catalog.jsonb_typeof(f->'values') IS DISTINCT FROM 'array'
                           OR pg_catalog.jsonb_array_length(f->'values') = 0) THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s needs a non-empty values array', i);
    END IF;
    IF op IN ('eq', 'neq') AND pg_catalog.jsonb_array_length(f->'values') <> 1 THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s (%s) takes exactly one value', i, op);
    END IF;
  END LOOP;
  -- normalised: operator always present, values always an array of strings
  -- ([] itself: no filter; jsonb_agg over no element would be NULL)
  IF pg_catalog.jsonb_array_length(filters) = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  RETURN (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('property', e->>'property',
            'operator', coalesce(e->>'operator', 'eq'),
            'values', coalesce((SELECT pg_catalog.jsonb_agg(v #>> '{}') FROM pg_catalog.jsonb_array_elements(e->'values') v), '[]'::jsonb)))
          FROM pg_catalog.jsonb_array_elements(filters) e);
END
$$;

CREATE FUNCTION fluxrate.create_feature(name text DEFAULT NULL, lookup_key text DEFAULT NULL, type text DEFAULT NULL, description text DEFAULT NULL,
    meter_name text DEFAULT NULL, property_name text DEFAULT NULL, aggregation_type text DEFAULT NULL,
    unit text DEFAULT NULL, filters jsonb DEFAULT NULL, unique_property text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  f fluxrate_internal.features;
  v_agg text := upper(create_feature.aggregation_type);
  v_filters jsonb;
BEGIN
  PERFORM fluxrate_internal.required(create_feature.name, 'name');
  PERFORM fluxrate_internal.required(create_feature.lookup_key, 'lookup_key');
  PERFORM fluxrate_internal.required(create_feature.type, 'type');
  PERFORM fluxrate_internal.one_of(create_feature.type, 'type', ARRAY['meter', 'switch', 'custom']);
  IF create_feature.type = 'meter' THEN
    PERFORM fluxrate_internal.required(create_feature.meter_name, 'meter_name');
    -- identifiers are 1 to 255 characters (docs/security.md, "Ingestion bounds")
    IF pg_catalog.length(create_feature.meter_name) > 255 THEN
      PERFORM fluxrate_internal.fail('22023', 'meter_name must be 1 to 255 characters',
        pg_catalog.format('meter_name has %s characters.', pg_catalog.length(create_feature.meter_name)));
    END IF;
    PERFORM fluxrate_internal.required(v_agg, 'aggregation_type');
    PERFORM fluxrate_internal.one_of(v_agg, 'aggregation_type',
      ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'UNIQUE_COUNT', 'LAST', 'WEIGHTED_SUM']);
    -- COUNT counts events and UNIQUE_COUNT reads metadata; the others read a property
    IF v_agg NOT IN ('COUNT', 'UNIQUE_COUNT') THEN
      PERFORM fluxrate_internal.required(create_feature.property_name, 'property_name');
    END IF;
    -- a UNIQUE_COUNT meter counts one metadata property: ingestion requires it and
    -- aggregation counts it, so two different names cannot both be meant
    IF v_agg = 'UNIQUE_COUNT' AND create_feature.property_name IS DISTINCT FROM create_feature.unique_property
       AND create_feature.property_name IS NOT NULL AND create_feature.unique_property IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'property_name and unique_property name different properties',
        pg_catalog.format('A UNIQUE_COUNT meter counts the distinct values of one metadata property; property_name was %s, unique_property %s.',
                          create_feature.property_name, create_feature.unique_property),
        'Send one of the two (they mean the same for UNIQUE_COUNT).');
    END IF;
    v_filters := fluxrate_internal.check_filters(create_feature.filters);
  ELSIF create_feature.meter_name IS NOT NULL OR create_feature.aggregation_type IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('22023', 'only meter features take meter_name and aggregation_type',
      pg_catalog.format('type was %s.', create_feature.type));
  END IF;

  IF EXISTS (SELECT 1 FROM fluxrate_internal.features x WHERE x.org_id = v_org AND x.lookup_key = create_feature.lookup_key) THEN
    PERFORM fluxrate_internal.fail('23505', 'a feature with this lookup_key already exists',
      pg_catalog.format('lookup_key %s is taken in this organization.', create_feature.lookup_key));
  END IF;
  IF create_feature.type = 'meter' AND EXISTS (SELECT 1 FROM fluxrate_internal.meters x
       WHERE x.org_id = v_org AND x.meter_name = create_feature.meter_name) THEN
    PERFORM fluxrate_internal.fail('23505', 'a meter with this meter_name already exists',
      pg_catalog.format('meter_name %s is taken in this organization.', create_feature.meter_name));
  END IF;

  INSERT INTO fluxrate_internal.features (org_id, name, lookup_key, type, description, created_at)
  VALUES (v_org, create_feature.name, create_feature.lookup_key, create_feature.type,
          create_feature.description, fluxrate.now())
  RETURNING * INTO f;
  IF f.type = 'meter' THEN
    INSERT INTO fluxrate_internal.meters (org_id, feature_id, meter_name, property_name, aggregation_type,
        unique_property, unit, filters, created_at)
    VALUES (v_org, f.id, create_feature.meter_name,
            -- UNIQUE_COUNT counts distinct metadata[property_name] (default user_id);
            -- COUNT needs no property
            coalesce(create_feature.property_name, CASE v_agg WHEN 'UNIQUE_COUNT' THEN coalesce(create_feature.unique_property, 'user_id') ELSE 'quantity' END),
            v_agg,
            CASE WHEN v_agg = 'UNIQUE_COUNT' THEN coalesce(create_feature.unique_property, create_feature.property_name, 'user_id')
                 ELSE coalesce(create_feature.unique_property, 'user_id') END,
            create_feature.unit, v_filters, fluxrate.now());
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.feature_json(f);
EXCEPTION WHEN unique_violation THEN
  -- a concurrent create won the race
  PERFORM fluxrate_internal.fail('23505', 'a feature with this lookup_key or meter_name already exists', SQLERRM);
END
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_feature(feature_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  f fluxrate_internal.features;
BEGIN
  SELECT * INTO f FROM fluxrate_internal.features x WHERE x.org_id = v_org AND x.id = get_feature.feature_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'feature not found', pg_catalog.format('No feature %s in this organization.', feature_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.feature_json(f));
END
$$;

CREATE FUNCTION fluxrate.list_features(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.feature_json(f) ORDER BY f.created_at, f.id) FROM
       (SELECT * FROM fluxrate_internal.features x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) f),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.features x WHERE x.org_id = v_org));
END
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_meter(meter_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  m fluxrate_internal.meters;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', pg_catalog.format('No meter %s in this organization.', meter_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.meter_json(m));
END
$$;

CREATE FUNCTION fluxrate.list_meters(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.meter_json(m) ORDER BY m.created_at, m.id) FROM
       (SELECT * FROM fluxrate_internal.meters x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) m),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.meters x WHERE x.org_id = v_org));
END
$$;

-- Plans and charges ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.charge_json(c fluxrate_internal.charges) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', c.id, 'plan_id', c.plan_id, 'type', c.type, 'meter_id', c.meter_id,
    'unit_price', c.unit_price, 'display_name', c.display_name, 'pricing_model', c.pricing_model,
    'tiers', c.tiers, 'package_size', c.package_size, 'package_price', c.package_price,
    'free_units', c.free_units, 'billing_timing', c.billing_timing, 'status', c.status, 'created_at', c.created_at)
$$;

CREATE FUNCTION fluxrate_internal.plan_json(p fluxrate_internal.plans, with_children boolean DEFAULT false) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', p.id, 'name', p.name, 'lookup_id', p.lookup_id, 'type', p.type,
    'billing_interval', p.billing_interval, 'currency', p.currency, 'trial_days', p.trial_days,
    'description', p.description, 'is_active', p.is_active, 'minimum_commitment', p.minimum_commitment,
    'created_at', p.created_at,
    -- versions (25_plan_versions.sql): family_id is the first version's id
    'version', p.version, 'family_id', coalesce(p.family_id, p.id), 'superseded_by', p.superseded_by)
  || CASE WHEN with_children THEN pg_catalog.jsonb_build_object(
       'charges', coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.charge_json(c) ORDER BY c.created_at, c.id)
                            FROM fluxrate_internal.charges c
                            WHERE c.org_id = p.org_id AND c.plan_id = p.id AND c.status = 'ACTIVE'), '[]'::jsonb),
       'features', coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.plan_feature_json(pf) ORDER BY pf.created_at, pf.id)
                            FROM fluxrate_internal.plan_features pf
                            WHERE pf.org_id = p.org_id AND pf.plan_id = p.id), '[]'::jsonb))
     ELSE '{}'::jsonb END
$$;

-- every parameter has a default so that a missing key is a 400 naming it (PostgREST would
-- otherwise answer 404: no function with that set of keys)
CREATE FUNCTION fluxrate.create_plan(name text DEFAULT NULL, lookup_id text DEFAULT NULL, type text DEFAULT NULL,
    billing_interval text DEFAULT NULL, currency text DEFAULT NULL,
    trial_days integer DEFAULT 0, description text DEFAULT NULL, is_active boolean DEFAULT true,
    minimum_commitment numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  p fluxrate_internal.plans;
  v_type text := upper(create_plan.type);
  v_currency text := upper(create_plan.currency);
BEGIN
  PERFORM fluxrate_internal.required(create_plan.name, 'name');
  PERFORM fluxrate_internal.required(create_plan.lookup_id, 'lookup_id');
  PERFORM fluxrate_internal.required(v_type, 'type');
  PERFORM fluxrate_internal.one_of(v_type, 'type', ARRAY['FIXED', 'USAGE', 'HYBRID']);
  PERFORM fluxrate_internal.required(create_plan.billing_interval, 'billing_interval');
  PERFORM fluxrate_internal.one_of(create_plan.billing_interval, 'billing_interval', ARRAY['day', 'week', 'month', 'quarter', 'year']);
  PERFORM fluxrate_internal.required(v_currency, 'currency');
  IF v_currency !~ '^[A-Z]{3}$' THEN
    PERFORM fluxrate_internal.fail('22023', pg_catalog.format('invalid currency: %s', create_plan.currency),
      'currency is an ISO 4217 code such as USD, EUR, JPY.');
  END IF;
  IF coalesce(create_plan.trial_days, 0) < 0 OR coalesce(create_plan.trial_days, 0) > 3650 THEN
    PERFORM fluxrate_internal.fail('PT422', 'trial_days must be between 0 and 3650', pg_catalog.format('trial_days was %s.', create_plan.trial_days));
  END IF;
  PERFORM fluxrate_internal.check_decimal(create_plan.minimum_commitment, 'minimum_commitment');
  IF EXISTS (SELECT 1 FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.lookup_id = create_plan.lookup_id) THEN
    PERFORM fluxrate_internal.fail('23505', 'a plan with this lookup_id already exists',
      pg_catalog.format('lookup_id %s is taken in this organization.', create_plan.lookup_id));
  END IF;
  INSERT INTO fluxrate_internal.plans (org_id, name, lookup_id, type, billing_interval, currency, trial_days,
      description, is_active, minimum_commitment, created_at)
  VALUES (v_org, create_plan.name, create_plan.lookup_id, v_type, create_plan.billing_interval, v_currency,
          coalesce(create_plan.trial_days, 0), create_plan.description, coalesce(create_plan.is_active, true),
          create_plan.minimum_commitment, fluxrate.now())
  RETURNING * INTO p;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.plan_json(p, true);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'a plan with this lookup_id already exists', SQLERRM);
END
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_plan(plan_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  p fluxrate_internal.plans;
BEGIN
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = get_plan.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.plan_json(p, true));
END
$$;

CREATE FUNCTION fluxrate.list_plans(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.plan_json(p) ORDER BY p.created_at, p.id) FROM
       (SELECT * FROM fluxrate_internal.plans x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) p),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.plans x WHERE x.org_id = v_org));
END
$$;

CREATE FUNCTION fluxrate.update_plan(plan_id uuid, name text DEFAULT NULL, description text DEFAULT NULL,
    is_active boolean DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  p fluxrate_internal.plans;
BEGIN
  UPDATE fluxrate_internal.plans x SET
    name = coalesce(nullif(update_plan.name, ''), x.name),
    description = coalesce(update_plan.description, x.description),
    is_active = coalesce(update_plan.is_active, x.is_active)
  WHERE x.org_id = v_org AND x.id = update_plan.plan_id
  RETURNING * INTO p;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  RETURN fluxrate_internal.plan_json(p, true);
END
$$;

CREATE FUNCTION fluxrate.delete_plan(plan_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
BEGIN
  PERFORM 1 FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = delete_plan.plan_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.subscriptions s WHERE s.org_id = v_org AND s.plan_id = delete_plan.plan_id)
     -- (or had: a plan change names it)
     OR EXISTS (SELECT 1 FROM fluxrate_internal.subscription_changes c WHERE c.org_id = v_org
                   AND delete_plan.plan_id IN (c.from_plan_id, c.to_plan_id)) THEN
    PERFORM fluxrate_internal.fail('PT409', 'plan has subscriptions',
      'A plan with subscriptions cannot be deleted.', 'Deactivate it with update_plan(is_active => false) instead.');
  END IF;
  DELETE FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = delete_plan.plan_id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', plan_id, 'deleted', true);
END
$$;

-- Validation of a charge's pricing; the rating code (rating.c) relies on it.
CREATE FUNCTION fluxrate_internal.check_tiers(tiers jsonb) RETURNS jsonb
  LANGUAGE plpgsql IMMUTABLE
  AS $$
DECLARE
  t jsonb;
  i integer := 0;
  n integer;
  prev numeric := 0;
  up numeric;
BEGIN
  IF tiers IS NULL OR pg_catalog.jsonb_typeof(tiers) <> 'array' OR pg_catalog.jsonb_array_length(tiers) = 0 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'tiers must be a non-empty array',
      HINT = 'Send [{"up_to": 1000, "unit_price": 0.002}, {"up_to": null, "unit_price": 0.001}].';
  END IF;
  n := pg_catalog.jsonb_array_length(tiers);
  -- rating walks the tiers for every usage line of every close: a bounded walk
  IF n > 100 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = 'a charge has at most 100 tiers',
      DETAIL = pg_catalog.format('%s tiers were sent.', n);
  END IF;
  FOR t IN SELECT e FROM pg_catalog.jsonb_array_elements(tiers) e LOOP
    i := i + 1;
    IF pg_catalog.jsonb_typeof(t) <> 'object' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('tier %s is not an object', i);
    END IF;
    IF pg_catalog.jsonb_typeof(t->'unit_price') IS DISTINCT FROM 'number' AND pg_catalog.jsonb_typeof(t->'flat_fee') IS DISTINCT FROM 'number' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('tier %s needs a numeric unit_price or flat_fee', i);
    END IF;
    PERFORM fluxrate_internal.check_decimal((t->>'unit_price')::numeric, pg_catalog.format('tier %s unit_price', i));
    PERFORM fluxrate_internal.check_decimal((t->>'flat_fee')::numeric, pg_catalog.format('tier %s flat_fee', i));
    IF i < n THEN
      IF pg_catalog.jsonb_typeof(t->'up_to') IS DISTINCT FROM 'number' THEN
        RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('tier %s needs a numeric up_to', i),
          DETAIL = 'Only the last tier is unbounded (up_to null).';
      END IF;
      up := fluxrate_internal.check_decimal((t->>'up_to')::numeric, pg_catalog.format('tier %s up_to', i));
      IF up <= prev THEN
        RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('tier %s up_to must be greater than the previous tier''s', i),
          DETAIL = pg_catalog.format('up_to %s follows %s; tiers must be sorted and must not overlap.', up, prev);
      END IF;
      prev := up;
    ELSIF t ? 'up_to' AND pg_catalog.jsonb_typeof(t->'up_to') <> 'null' THEN
      RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = 'the last tier must have up_to null',
        DETAIL = 'Usage above the last bound would have no price.';
    END IF;
  END LOOP;
  RETURN tiers;
END
$$;

CREATE FUNCTION fluxrate.add_charge(plan_id uuid DEFAULT NULL, type text DEFAULT NULL, unit_price numeric DEFAULT NULL,
    meter_id uuid DEFAULT NULL, display_name text DEFAULT NULL, pricing_model text DEFAULT NULL,
    tiers jsonb DEFAULT NULL, package_size numeric DEFAULT NULL, package_price numeric DEFAULT NULL,
    free_units numeric DEFAULT NULL, billing_timing text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  v_type text := upper(add_charge.type);
  v_model text := lower(coalesce(add_charge.pricing_model, 'per_unit'));
  v_plan uuid;
  c fluxrate_internal.charges;
BEGIN
  PERFORM fluxrate_internal.required(add_charge.plan_id, 'plan_id');
  PERFORM fluxrate_internal.required(v_type, 'type');
  PERFORM fluxrate_internal.one_of(v_type, 'type', ARRAY['FIXED', 'USAGE']);
  PERFORM 1 FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = add_charge.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', add_charge.plan_id));
  END IF;
  PERFORM fluxrate_internal.one_of(add_charge.billing_timing, 'billing_timing', ARRAY['in_advance', 'in_arrears']);
  PERFORM fluxrate_internal.check_decimal(add_charge.unit_price, 'unit_price');
  PERFORM fluxrate_internal.check_decimal(add_charge.free_units, 'free_units');

  IF v_type = 'FIXED' THEN
    PERFORM fluxrate_internal.required(add_charge.unit_price, 'unit_price');
    IF add_charge.meter_id IS NOT NULL OR add_charge.tiers IS NOT NULL OR add_charge.package_size IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'a FIXED charge takes only unit_price (the amount per period)',
        'meter_id, tiers and package pricing belong to USAGE charges.');
    END IF;
    v_model := 'flat';
  ELSE
    PERFORM fluxrate_internal.required(add_charge.meter_id, 'meter_id');
    PERFORM 1 FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = add_charge.meter_id;
    IF NOT FOUND THEN
      PERFORM fluxrate_internal.fail('PT404', 'meter not found', pg_catalog.format('No meter %s in this organization.', add_charge.meter_id));
    END IF;
    PERFORM fluxrate_internal.one_of(v_model, 'pricing_model', ARRAY['per_unit', 'graduated', 'volume', 'package']);
    IF add_charge.billing_timing = 'in_advance' THEN
      PERFORM fluxrate_internal.fail('22023', 'usage charges bill in arrears', 'billing_timing in_advance applies to FIXED charges only.');
    END IF;
    IF v_model = 'per_unit' THEN
      PERFORM fluxrate_internal.required(add_charge.unit_price, 'unit_price');
    ELSIF v_model IN ('graduated', 'volume') THEN
      PERFORM fluxrate_internal.check_tiers(add_charge.tiers);
    ELSE
      PERFORM fluxrate_internal.required(add_charge.package_size, 'package_size');
      PERFORM fluxrate_internal.required(add_charge.package_price, 'package_price');
      PERFORM fluxrate_internal.check_decimal(add_charge.package_size, 'package_size', false);
      PERFORM fluxrate_internal.check_decimal(add_charge.package_price, 'package_price');
    END IF;
  END IF;

  -- a plan with subscriptions gets a new version for the new charge (25_plan_versions.sql)
  v_plan := (fluxrate_internal.plan_for_edit(v_org, add_charge.plan_id)).id;
  INSERT INTO fluxrate_internal.charges (org_id, plan_id, type, meter_id, display_name, pricing_model, unit_price,
      tiers, package_size, package_price, free_units, billing_timing, created_at)
  VALUES (v_org, v_plan, v_type, add_charge.meter_id, add_charge.display_name, v_model,
          add_charge.unit_price, CASE WHEN v_model IN ('graduated', 'volume') THEN add_charge.tiers END,
          add_charge.package_size, add_charge.package_price, coalesce(add_charge.free_units, 0),
          coalesce(add_charge.billing_timing, CASE v_type WHEN 'FIXED' THEN 'in_advance' ELSE 'in_arrears' END),
          fluxrate.now())
  RETURNING * INTO c;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.charge_json(c)
         || pg_catalog.jsonb_build_object('plan_version', (SELECT p.version FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = v_plan));
END
$$;

-- Charges go one way only: ACTIVE -> INACTIVE (Fluxrate's rule).
CREATE FUNCTION fluxrate.update_charge(plan_id uuid, charge_id uuid, status text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  c fluxrate_internal.charges;
BEGIN
  PERFORM fluxrate_internal.required(update_charge.status, 'status');
  PERFORM fluxrate_internal.one_of(upper(update_charge.status), 'status', ARRAY['ACTIVE', 'INACTIVE']);
  SELECT * INTO c FROM fluxrate_internal.charges x
   WHERE x.org_id = v_org AND x.plan_id = update_charge.plan_id AND x.id = update_charge.charge_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', pg_catalog.format('No charge %s on plan %s.', charge_id, plan_id));
  END IF;
  -- deactivating a charge of a plan with subscriptions: in a new version (25_plan_versions.sql)
  IF c.status = 'ACTIVE' AND upper(update_charge.status) = 'INACTIVE' THEN
    c := fluxrate_internal.charge_in_version(fluxrate_internal.plan_for_edit(v_org, update_charge.plan_id), c.id);
  END IF;
  IF c.status = 'INACTIVE' AND upper(update_charge.status) = 'ACTIVE' THEN
    PERFORM fluxrate_internal.fail('PT409', 'an inactive charge cannot be reactivated',
      'Charges go from ACTIVE to INACTIVE only.', 'Add a new charge instead.');
  END IF;
  UPDATE fluxrate_internal.charges x SET status = upper(update_charge.status)
   WHERE x.org_id = v_org AND x.id = c.id RETURNING * INTO c;
  RETURN fluxrate_internal.charge_json(c);
END
$$;

CREATE FUNCTION fluxrate_internal.plan_feature_json(pf fluxrate_internal.plan_features) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', pf.id, 'plan_id', pf.plan_id, 'feature_id', pf.feature_id,
    'feature_type', f.type, 'lookup_key', f.lookup_key, 'is_enabled', pf.is_enabled,
    'usage_limit', pf.usage_limit, 'usage_reset_period', pf.usage_reset_period,
    'is_soft_limit', pf.is_soft_limit, 'static_value', pf.static_value)
  FROM fluxrate_internal.features f WHERE f.org_id = pf.org_id AND f.id = pf.feature_id
$$;

CREATE FUNCTION fluxrate.add_plan_feature(plan_id uuid DEFAULT NULL, feature_id uuid DEFAULT NULL, is_enabled boolean DEFAULT true,
    usage_limit numeric DEFAULT NULL, usage_reset_period text DEFAULT NULL, is_soft_limit boolean DEFAULT false,
    static_value text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  pf fluxrate_internal.plan_features;
BEGIN
  PERFORM fluxrate_internal.required(add_plan_feature.plan_id, 'plan_id');
  PERFORM fluxrate_internal.required(add_plan_feature.feature_id, 'feature_id');
  PERFORM fluxrate_internal.one_of(add_plan_feature.usage_reset_period, 'usage_reset_period', ARRAY['day', 'week', 'month', 'year']);
  PERFORM fluxrate_internal.check_decimal(add_plan_feature.usage_limit, 'usage_limit');
  PERFORM 1 FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = add_plan_feature.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', add_plan_feature.plan_id));
  END IF;
  PERFORM 1 FROM fluxrate_internal.features f WHERE f.org_id = v_org AND f.id = add_plan_feature.feature_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'feature not found', pg_catalog.format('No feature %s in this organization.', add_plan_feature.feature_id));
  END IF;
  INSERT INTO fluxrate_internal.plan_features (org_id, plan_id, feature_id, is_enabled, usage_limit,
      usage_reset_period, is_soft_limit, static_value, created_at)
  VALUES (v_org, add_plan_feature.plan_id, add_plan_feature.feature_id, coalesce(add_plan_feature.is_enabled, true),
          add_plan_feature.usage_limit, add_plan_feature.usage_reset_period, coalesce(add_plan_feature.is_soft_limit, false),
          add_plan_feature.static_value, fluxrate.now())
  RETURNING * INTO pf;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.plan_feature_json(pf);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'the feature is already on this plan', SQLERRM);
END
$$;
