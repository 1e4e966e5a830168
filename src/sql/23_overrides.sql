-- 23_overrides.sql: per-subscription prices (issue 15, item 2).  A
-- subscription may override any charge of its plan (pricing model, unit price,
-- tiers, package, free units; a grouped charge's groups, 24_dimensions.sql)
-- and the plan's minimum commitment, without a new plan: the plan's own prices
-- never change for its other subscribers.  Every reader of prices -- the
-- closer (52_close.sql), fill_lines and the late-usage lines (50_periods.sql),
-- preview_invoice -- reads a subscription's charges through
-- subscription_charges() (24_dimensions.sql), which applies the override.
--
-- An override is a price, like a plan's price: the one in force when the
-- period is rated applies to the whole period (the closer's draft, and again
-- the finalizer's recomputation after the grace period).  It is not
-- effective-dated (docs/rating.md, "Overrides", says why).  Before the parts
-- that rate (40_*), so that their SQL bodies may name these tables.

CREATE TABLE fluxrate_internal.charge_overrides (
  org_id           uuid NOT NULL,
  subscription_id  uuid NOT NULL,
  charge_id        uuid NOT NULL,
  -- the charge's whole price for this subscription, resolved when it is set
  -- (fields not sent are the plan charge's, for the same model)
  pricing_model    text NOT NULL CHECK (pricing_model IN ('per_unit', 'graduated', 'volume', 'package', 'flat')),
  unit_price       numeric,
  tiers            jsonb,
  package_size     numeric,
  package_price    numeric,
  free_units       numeric NOT NULL DEFAULT 0 CHECK (free_units >= 0),
  groups           jsonb,          -- a grouped charge's groups (24_dimensions.sql), else NULL
  created_at       timestamptz NOT NULL,
  updated_at       timestamptz NOT NULL,
  PRIMARY KEY (org_id, subscription_id, charge_id),
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, charge_id) REFERENCES fluxrate_internal.charges (org_id, id) ON DELETE CASCADE
);
CREATE INDEX charge_overrides_charge_idx ON fluxrate_internal.charge_overrides (org_id, charge_id);

-- The plan's minimum commitment for one subscription: a row overrides it (a
-- NULL minimum_commitment: no minimum for this subscription).
CREATE TABLE fluxrate_internal.minimum_overrides (
  org_id              uuid NOT NULL,
  subscription_id     uuid NOT NULL,
  minimum_commitment  numeric CHECK (minimum_commitment >= 0),
  created_at          timestamptz NOT NULL,
  updated_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id, subscription_id),
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE
);

-- The checks add_charge makes of a usage price, for one (model, fields):
-- the model's required fields, every number finite, >= 0, < 10^15, 12 places.
CREATE FUNCTION fluxrate_internal.check_usage_pricing(pricing_model text, unit_price numeric, tiers jsonb,
    package_size numeric, package_price numeric, free_units numeric, field text DEFAULT '')
  RETURNS void
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.one_of(pricing_model, field || 'pricing_model', ARRAY['per_unit', 'graduated', 'volume', 'package']);
  PERFORM fluxrate_internal.check_decimal(unit_price, field || 'unit_price');
  PERFORM fluxrate_internal.check_decimal(free_units, field || 'free_units');
  IF pricing_model = 'per_unit' THEN
    PERFORM fluxrate_internal.required(unit_price, field || 'unit_price');
  ELSIF pricing_model IN ('graduated', 'volume') THEN
    PERFORM fluxrate_internal.check_tiers(tiers);
  ELSE
    PERFORM fluxrate_internal.required(package_size, field || 'package_size');
    PERFORM fluxrate_internal.required(package_price, field || 'package_price');
    PERFORM fluxrate_internal.check_decimal(package_size, field || 'package_size', false);
    PERFORM fluxrate_internal.check_decimal(package_price, field || 'package_price');
  END IF;
END
$$;

-- The subscription a price override is for: of this organization, not ended.
CREATE FUNCTION fluxrate_internal.override_subscription(org_id uuid, subscription_id uuid)
  RETURNS fluxrate_internal.subscriptions
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  s fluxrate_internal.subscriptions;
BEGIN
  PERFORM fluxrate_internal.required(subscription_id, 'subscription_id');
  -- locked: a closer holds the row while it rates the period, so an override
  -- set meanwhile applies from the next rating on, never to half a close
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = override_subscription.org_id AND x.id = override_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found',
      format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status = 'CANCELED' THEN
    PERFORM fluxrate_internal.fail('PT409', 'the subscription has ended',
      format('Subscription %s is CANCELED; its prices can no longer change.', s.id));
  END IF;
  RETURN s;
END
$$;

CREATE FUNCTION fluxrate_internal.charge_override_json(o fluxrate_internal.charge_overrides) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('subscription_id', o.subscription_id, 'charge_id', o.charge_id,
    'pricing_model', o.pricing_model, 'unit_price', o.unit_price, 'tiers', o.tiers, 'package_size', o.package_size,
    'package_price', o.package_price, 'free_units', o.free_units, 'groups', o.groups,
    'created_at', o.created_at, 'updated_at', o.updated_at)
$$;

-- Override one charge of the subscription's plan.  Fields not sent keep the
-- plan charge's value when the model stays the same (a new model needs its
-- own fields).  A FIXED charge takes unit_price only (the amount per period);
-- a grouped charge takes groups only (its whole table of groups,
-- 24_dimensions.sql).  Setting it again replaces it.  A charge of another plan,
-- or of none: refused, nothing written.
CREATE FUNCTION fluxrate.set_charge_override(subscription_id uuid DEFAULT NULL, charge_id uuid DEFAULT NULL,
    pricing_model text DEFAULT NULL, unit_price numeric DEFAULT NULL, tiers jsonb DEFAULT NULL,
    package_size numeric DEFAULT NULL, package_price numeric DEFAULT NULL, free_units numeric DEFAULT NULL,
    groups jsonb DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  s fluxrate_internal.subscriptions;
  c fluxrate_internal.charges;
  d fluxrate_internal.charge_dimensions;
  o fluxrate_internal.charge_overrides;
  v_model text;
  v_same boolean;
BEGIN
  PERFORM fluxrate_internal.required(set_charge_override.charge_id, 'charge_id');
  s := fluxrate_internal.override_subscription(v_org, set_charge_override.subscription_id);
  SELECT * INTO c FROM fluxrate_internal.charges x WHERE x.org_id = v_org AND x.id = set_charge_override.charge_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', format('No charge %s in this organization.', charge_id));
  END IF;
  IF c.plan_id <> s.plan_id THEN
    PERFORM fluxrate_internal.fail('PT422', 'the charge is not on the subscription''s plan',
      format('Charge %s belongs to plan %s; subscription %s is on plan %s.', c.id, c.plan_id, s.id, s.plan_id),
      'Override one of the charges of the subscription''s own plan (get_plan lists them).');
  END IF;
  SELECT * INTO d FROM fluxrate_internal.charge_dimensions x WHERE x.org_id = v_org AND x.charge_id = c.id;
  v_model := lower(coalesce(set_charge_override.pricing_model, c.pricing_model));
  v_same := v_model = c.pricing_model;
  IF d.charge_id IS NOT NULL THEN
    -- a grouped charge: its groups are its price
    IF set_charge_override.groups IS NULL OR set_charge_override.pricing_model IS NOT NULL OR set_charge_override.unit_price IS NOT NULL
       OR set_charge_override.tiers IS NOT NULL OR set_charge_override.package_size IS NOT NULL
       OR set_charge_override.package_price IS NOT NULL OR set_charge_override.free_units IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'a grouped charge is overridden by its groups',
        format('Charge %s prices by %s; send groups (each with its own pricing) and nothing else.', c.id, d.property));
    END IF;
    o.groups := fluxrate_internal.check_groups(v_org, c.meter_id, d.property, set_charge_override.groups);
    v_model := c.pricing_model;
  ELSIF set_charge_override.groups IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('22023', 'only a grouped charge takes groups',
      format('Charge %s does not price by an event property.', c.id), 'Group the plan''s charge first (set_charge_groups).');
  ELSIF c.type = 'FIXED' THEN
    PERFORM fluxrate_internal.required(set_charge_override.unit_price, 'unit_price');
    IF v_model <> 'flat' OR set_charge_override.tiers IS NOT NULL OR set_charge_override.package_size IS NOT NULL
       OR set_charge_override.package_price IS NOT NULL OR set_charge_override.free_units IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'a FIXED charge takes only unit_price (the amount per period)',
        'pricing_model, tiers, package pricing and free_units belong to USAGE charges.');
    END IF;
    PERFORM fluxrate_internal.check_decimal(set_charge_override.unit_price, 'unit_price');
  END IF;
  o.pricing_model := v_model;
  o.unit_price := coalesce(set_charge_override.unit_price, CASE WHEN v_same THEN c.unit_price END);
  o.tiers := coalesce(set_charge_override.tiers, CASE WHEN v_same THEN c.tiers END);
  o.package_size := coalesce(set_charge_override.package_size, CASE WHEN v_same THEN c.package_size END);
  o.package_price := coalesce(set_charge_override.package_price, CASE WHEN v_same THEN c.package_price END);
  o.free_units := coalesce(set_charge_override.free_units, c.free_units);
  IF c.type = 'USAGE' AND d.charge_id IS NULL THEN
    PERFORM fluxrate_internal.check_usage_pricing(o.pricing_model, o.unit_price, o.tiers, o.package_size,
                                                  o.package_price, o.free_units);
    IF o.pricing_model NOT IN ('graduated', 'volume') THEN
      o.tiers := NULL;
    END IF;
  END IF;
  INSERT INTO fluxrate_internal.charge_overrides AS x (org_id, subscription_id, charge_id, pricing_model, unit_price, tiers,
      package_size, package_price, free_units, groups, created_at, updated_at)
  VALUES (v_org, s.id, c.id, o.pricing_model, o.unit_price, o.tiers, o.package_size, o.package_price, o.free_units,
          o.groups, fluxrate.now(), fluxrate.now())
  ON CONFLICT ON CONSTRAINT charge_overrides_pkey DO UPDATE
     SET pricing_model = excluded.pricing_model, unit_price = excluded.unit_price, tiers = excluded.tiers,
         package_size = excluded.package_size, package_price = excluded.package_price,
         free_units = excluded.free_units, groups = excluded.groups, updated_at = excluded.updated_at
  RETURNING * INTO o;
  RETURN fluxrate_internal.charge_override_json(o);
END
$$;

-- The plan's price applies again.
CREATE FUNCTION fluxrate.remove_charge_override(subscription_id uuid DEFAULT NULL, charge_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  s fluxrate_internal.subscriptions;
BEGIN
  PERFORM fluxrate_internal.required(remove_charge_override.charge_id, 'charge_id');
  s := fluxrate_internal.override_subscription(v_org, remove_charge_override.subscription_id);
  DELETE FROM fluxrate_internal.charge_overrides o
   WHERE o.org_id = v_org AND o.subscription_id = s.id AND o.charge_id = remove_charge_override.charge_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'override not found',
      format('Subscription %s has no override of charge %s.', s.id, charge_id));
  END IF;
  RETURN jsonb_build_object('subscription_id', s.id, 'charge_id', charge_id, 'deleted', true);
END
$$;

-- The subscription's price for the plan's minimum commitment (NULL: none).
CREATE FUNCTION fluxrate.set_minimum_commitment_override(subscription_id uuid DEFAULT NULL, minimum_commitment numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  s fluxrate_internal.subscriptions;
  m fluxrate_internal.minimum_overrides;
BEGIN
  s := fluxrate_internal.override_subscription(v_org, set_minimum_commitment_override.subscription_id);
  PERFORM fluxrate_internal.check_decimal(set_minimum_commitment_override.minimum_commitment, 'minimum_commitment');
  INSERT INTO fluxrate_internal.minimum_overrides AS x (org_id, subscription_id, minimum_commitment, created_at, updated_at)
  VALUES (v_org, s.id, set_minimum_commitment_override.minimum_commitment, fluxrate.now(), fluxrate.now())
  ON CONFLICT ON CONSTRAINT minimum_overrides_pkey DO UPDATE
     SET minimum_commitment = excluded.minimum_commitment, updated_at = excluded.updated_at
  RETURNING * INTO m;
  RETURN jsonb_build_object('subscription_id', m.subscription_id, 'minimum_commitment', m.minimum_commitment,
                            'created_at', m.created_at, 'updated_at', m.updated_at);
END
$$;

CREATE FUNCTION fluxrate.remove_minimum_commitment_override(subscription_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  s fluxrate_internal.subscriptions;
BEGIN
  s := fluxrate_internal.override_subscription(v_org, remove_minimum_commitment_override.subscription_id);
  DELETE FROM fluxrate_internal.minimum_overrides o WHERE o.org_id = v_org AND o.subscription_id = s.id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'override not found',
      format('Subscription %s has no minimum commitment override.', s.id));
  END IF;
  RETURN jsonb_build_object('subscription_id', s.id, 'deleted', true);
END
$$;

-- A subscription's overrides: {subscription_id, charges: [...], minimum_commitment: {...} | null}
CREATE FUNCTION fluxrate.list_charge_overrides(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = list_charge_overrides.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found',
      format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN jsonb_build_object('subscription_id', subscription_id,
    'charges', coalesce((SELECT jsonb_agg(fluxrate_internal.charge_override_json(o) ORDER BY o.created_at, o.charge_id)
                           FROM fluxrate_internal.charge_overrides o
                          WHERE o.org_id = v_org AND o.subscription_id = list_charge_overrides.subscription_id), '[]'::jsonb),
    'minimum_commitment', (SELECT jsonb_build_object('minimum_commitment', m.minimum_commitment, 'updated_at', m.updated_at)
                             FROM fluxrate_internal.minimum_overrides m
                            WHERE m.org_id = v_org AND m.subscription_id = list_charge_overrides.subscription_id));
END
$$;

-- The minimum commitment that applies to a subscription: its override, else the plan's.
CREATE FUNCTION fluxrate_internal.subscription_minimum(org_id uuid, subscription_id uuid, plan_id uuid) RETURNS numeric
  LANGUAGE sql STABLE
  AS $$
  SELECT CASE WHEN mo.subscription_id IS NOT NULL THEN mo.minimum_commitment ELSE p.minimum_commitment END
    FROM fluxrate_internal.plans p
    LEFT JOIN fluxrate_internal.minimum_overrides mo ON mo.org_id = $1 AND mo.subscription_id = $2
   WHERE p.org_id = $1 AND p.id = $3
$$;
