-- 25_plan_versions.sql: versioned plans (issue 15, item 4; docs/rating.md,
-- "Plan versions").
--   current_plan_version()   the version a plan id stands for today
--   plan_for_edit()          the plan row an edit of prices may change: the plan
--                            itself while nobody is subscribed to it, otherwise
--                            a new version (a copy of its charges and features)
--   migrate_subscriptions()  move the subscriptions of older versions to the
--                            current one, explicitly
-- The rule: a price a subscription has been billed with (or will be, for the
-- period running) never changes under it.  add_charge, update_charge and
-- update_charge_price on a plan with subscriptions (of any status: a canceled
-- one may still have a draft to refresh) write a new version, version + 1,
-- with the same lookup_id, and leave the old one as it is, superseded;
-- existing subscriptions stay on their version until migrated (this function,
-- or change_subscription to the plan), new subscriptions get the current one.

-- The current version of plan p's family (p itself when it is current).
CREATE FUNCTION fluxrate_internal.current_plan_version(p fluxrate_internal.plans) RETURNS fluxrate_internal.plans
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce((SELECT x FROM fluxrate_internal.plans x
                    WHERE x.org_id = p.org_id AND coalesce(x.family_id, x.id) = coalesce(p.family_id, p.id)
                      AND x.superseded_by IS NULL), p)
$$;

-- The plan row that an edit of plan_id's prices goes to (locked): the plan
-- while no subscription uses it; otherwise a new version, made here, which
-- copies the plan and its ACTIVE charges (origin_id: the charge of the first
-- version) and features.  Editing a superseded version is refused (PT409):
-- edits go to the current one.
CREATE FUNCTION fluxrate_internal.plan_for_edit(org_id uuid, plan_id uuid) RETURNS fluxrate_internal.plans
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p fluxrate_internal.plans;
  v fluxrate_internal.plans;
  v_now timestamptz := fluxrate.now();
BEGIN
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = plan_for_edit.org_id AND x.id = plan_for_edit.plan_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', format('No plan %s in this organization.', plan_id));
  END IF;
  IF p.superseded_by IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('PT409', 'this plan version is superseded',
      format('Plan %s version %s was replaced by plan %s.', p.lookup_id, p.version, (fluxrate_internal.current_plan_version(p)).id),
      'Edit the current version; subscriptions of this one keep its prices.');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM fluxrate_internal.subscriptions s WHERE s.org_id = p.org_id AND s.plan_id = p.id)
     AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.subscription_changes c
                      WHERE c.org_id = p.org_id AND c.to_plan_id = p.id AND c.status = 'SCHEDULED') THEN
    RETURN p;
  END IF;
  v := p;
  v.id := gen_random_uuid();
  v.version := p.version + 1;
  v.family_id := coalesce(p.family_id, p.id);
  v.created_at := v_now;
  -- the lookup_id moves to the new version (a partial unique index: current versions)
  UPDATE fluxrate_internal.plans x SET superseded_by = v.id WHERE x.org_id = p.org_id AND x.id = p.id;
  INSERT INTO fluxrate_internal.plans SELECT v.*;
  INSERT INTO fluxrate_internal.charges (org_id, plan_id, type, meter_id, display_name, pricing_model, unit_price, tiers,
      package_size, package_price, free_units, billing_timing, status, created_at, origin_id)
  SELECT ch.org_id, v.id, ch.type, ch.meter_id, ch.display_name, ch.pricing_model, ch.unit_price, ch.tiers,
         ch.package_size, ch.package_price, ch.free_units, ch.billing_timing, ch.status, ch.created_at,
         coalesce(ch.origin_id, ch.id)
    FROM fluxrate_internal.charges ch
   WHERE ch.org_id = p.org_id AND ch.plan_id = p.id AND ch.status = 'ACTIVE'
   ORDER BY ch.type, ch.created_at, ch.id;
  -- a grouped charge's groups are its prices (24_dimensions.sql): copied with
  -- it (one ACTIVE charge per origin in a version, so the pairing is exact)
  INSERT INTO fluxrate_internal.charge_dimensions (org_id, charge_id, property, groups, created_at)
  SELECT n.org_id, n.id, cd.property, cd.groups, cd.created_at
    FROM fluxrate_internal.charges o
    JOIN fluxrate_internal.charge_dimensions cd ON cd.org_id = o.org_id AND cd.charge_id = o.id
    JOIN fluxrate_internal.charges n ON n.org_id = o.org_id AND n.plan_id = v.id AND n.origin_id = coalesce(o.origin_id, o.id)
   WHERE o.org_id = p.org_id AND o.plan_id = p.id AND o.status = 'ACTIVE';
  INSERT INTO fluxrate_internal.plan_features (org_id, plan_id, feature_id, is_enabled, usage_limit, usage_reset_period,
      is_soft_limit, static_value, created_at)
  SELECT pf.org_id, v.id, pf.feature_id, pf.is_enabled, pf.usage_limit, pf.usage_reset_period, pf.is_soft_limit,
         pf.static_value, pf.created_at
    FROM fluxrate_internal.plan_features pf WHERE pf.org_id = p.org_id AND pf.plan_id = p.id;
  RETURN v;
END
$$;

-- The charge of plan version v that charge_id (of v or of an earlier version of
-- v's family) stands for; PT404 when there is none.
CREATE FUNCTION fluxrate_internal.charge_in_version(v fluxrate_internal.plans, charge_id uuid) RETURNS fluxrate_internal.charges
  LANGUAGE plpgsql VOLATILE  -- (it reads the version plan_for_edit has just written in the same statement)
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c fluxrate_internal.charges;
BEGIN
  SELECT ch.* INTO c FROM fluxrate_internal.charges o
    JOIN fluxrate_internal.charges ch ON ch.org_id = o.org_id AND ch.plan_id = v.id
         AND coalesce(ch.origin_id, ch.id) = coalesce(o.origin_id, o.id)
   WHERE o.org_id = v.org_id AND o.id = charge_in_version.charge_id
   ORDER BY ch.created_at DESC LIMIT 1;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', format('No charge %s on plan %s.', charge_id, v.id));
  END IF;
  RETURN c;
END
$$;

-- Edit a charge's prices (a new version when the plan has subscriptions): the
-- charge is replaced by one with the new prices (the others kept), checked as
-- add_charge checks a new one.  Arguments not given keep their value.
CREATE FUNCTION fluxrate.update_charge_price(plan_id uuid DEFAULT NULL, charge_id uuid DEFAULT NULL, unit_price numeric DEFAULT NULL,
    tiers jsonb DEFAULT NULL, package_size numeric DEFAULT NULL, package_price numeric DEFAULT NULL,
    free_units numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  v fluxrate_internal.plans;
  c fluxrate_internal.charges;
  v_new jsonb;
BEGIN
  PERFORM fluxrate_internal.required(update_charge_price.plan_id, 'plan_id');
  PERFORM fluxrate_internal.required(update_charge_price.charge_id, 'charge_id');
  PERFORM 1 FROM fluxrate_internal.charges x WHERE x.org_id = v_org AND x.plan_id = update_charge_price.plan_id
     AND x.id = update_charge_price.charge_id AND x.status = 'ACTIVE';
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', format('No active charge %s on plan %s.', charge_id, plan_id));
  END IF;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.charge_dimensions d WHERE d.org_id = v_org AND d.charge_id = update_charge_price.charge_id) THEN
    PERFORM fluxrate_internal.fail('22023', 'a grouped charge is priced by its groups',
      format('Charge %s prices by an event property.', charge_id),
      'Send its new groups with set_charge_groups (a new plan version too, when the plan has subscriptions).');
  END IF;
  v := fluxrate_internal.plan_for_edit(v_org, update_charge_price.plan_id);
  c := fluxrate_internal.charge_in_version(v, update_charge_price.charge_id);
  UPDATE fluxrate_internal.charges x SET status = 'INACTIVE' WHERE x.org_id = v_org AND x.id = c.id;
  -- v has no subscriptions now: add_charge writes to it in place
  v_new := fluxrate.add_charge(v.id, c.type, coalesce(update_charge_price.unit_price, c.unit_price), c.meter_id, c.display_name,
    c.pricing_model, coalesce(update_charge_price.tiers, c.tiers), coalesce(update_charge_price.package_size, c.package_size),
    coalesce(update_charge_price.package_price, c.package_price), coalesce(update_charge_price.free_units, c.free_units),
    c.billing_timing);
  UPDATE fluxrate_internal.charges x SET origin_id = coalesce(c.origin_id, c.id)
   WHERE x.org_id = v_org AND x.id = (v_new->>'id')::uuid;
  RETURN v_new || jsonb_build_object('origin_id', coalesce(c.origin_id, c.id), 'plan_version', v.version);
END
$$;

-- Move every live subscription of an older version of plan_id's family to its
-- current version, as change_subscription(effective) would, one by one; those
-- it cannot move (a trial, one canceled at period end, one with a change
-- already scheduled) are listed with the reason, and the others still move.
CREATE FUNCTION fluxrate.migrate_subscriptions(plan_id uuid DEFAULT NULL, effective text DEFAULT 'period_end')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  p fluxrate_internal.plans;
  r record;
  v_moved integer := 0;
  v_skipped jsonb := '[]'::jsonb;
BEGIN
  PERFORM fluxrate_internal.required(migrate_subscriptions.plan_id, 'plan_id');
  PERFORM fluxrate_internal.one_of(lower(migrate_subscriptions.effective), 'effective', ARRAY['now', 'period_end']);
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = migrate_subscriptions.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', format('No plan %s in this organization.', plan_id));
  END IF;
  p := fluxrate_internal.current_plan_version(p);
  FOR r IN
    SELECT s.id FROM fluxrate_internal.subscriptions s
      JOIN fluxrate_internal.plans x ON x.org_id = s.org_id AND x.id = s.plan_id
     WHERE s.org_id = v_org AND coalesce(x.family_id, x.id) = coalesce(p.family_id, p.id) AND x.id <> p.id
       AND s.status <> 'CANCELED'
     ORDER BY s.created_at, s.id
  LOOP
    BEGIN
      PERFORM fluxrate.change_subscription(r.id, p.id, migrate_subscriptions.effective);
      v_moved := v_moved + 1;
    EXCEPTION WHEN SQLSTATE 'PT409' THEN
      v_skipped := v_skipped || jsonb_build_array(jsonb_build_object('subscription_id', r.id, 'reason', SQLERRM));
    END;
  END LOOP;
  RETURN jsonb_build_object('plan_id', p.id, 'version', p.version, 'effective', lower(migrate_subscriptions.effective),
                            'migrated', v_moved, 'skipped', v_skipped);
END
$$;
