-- 55_plan_changes.sql: moving a subscription to another plan (issue 15, item 1;
-- docs/lifecycle.md, "Plan changes").
--   close_ended_period(), apply_scheduled_change()   closing one ended period
--                        by hand or for a scheduled change (generate_invoice,
--                        change_subscription's catch-up, the closer's
--                        sys_close_changes stage)
--   fill_change_lines()  the prorations of a change invoice (fill_lines calls it)
--   change_json(), change_subscription(), cancel_scheduled_change(),
--   list_subscription_changes()                       the API
--
-- The rule.  Effective now, at the instant t (fluxrate.now()) of the period
-- [S, E): a DRAFT of kind 'change' bills [S, t) at the old plan -- its usage,
-- its in-arrears fees prorated -- and carries, for [t, E), the old plan's
-- in-advance fees credited and the new plan's charged, both x (E - t) / (the
-- whole period), the proration fraction of calendar alignment and
-- cancellation (exact time: days for changes at midnight).  The subscription
-- then continues on the new plan from t: the next close bills [t, E) at its
-- charges.  Another billing interval starts a new anchor at t instead: the new
-- plan's first period [t, ...) opens with its own opening invoice, and no new
-- plan fee is prorated.  Effective at period end: nothing changes until E;
-- the close of [S, E) bills the old plan (without the next period's
-- in-advance fees), then the subscription moves to the new plan and an opening
-- invoice bills its in-advance fees of the period from E.

-- The scheduled change due at the end of s's current period, if any.
CREATE FUNCTION fluxrate_internal.scheduled_change(s fluxrate_internal.subscriptions)
  RETURNS fluxrate_internal.subscription_changes
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT c FROM fluxrate_internal.subscription_changes c
   WHERE c.org_id = s.org_id AND c.subscription_id = s.id AND c.status = 'SCHEDULED'
$$;

-- A subscription's charge overrides (23_overrides.sql) follow it to another
-- version of the same plan (migrate_subscriptions, or a change to the plan's
-- current version): each goes to the charge of the new version with the same
-- origin, unless the subscription overrides that one already.  An override is
-- a contract price, and a new list price does not undo a contract.  A change
-- to another plan carries none: the override named a charge of the old plan.
-- The old rows stay, for the late usage of periods billed before the change.
-- Returns the number carried.
CREATE FUNCTION fluxrate_internal.carry_overrides(org_id uuid, subscription_id uuid, from_plan uuid, to_plan uuid)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer;
BEGIN
  INSERT INTO fluxrate_internal.charge_overrides (org_id, subscription_id, charge_id, pricing_model, unit_price, tiers,
      package_size, package_price, free_units, groups, created_at, updated_at)
  SELECT o.org_id, o.subscription_id, nc.id, o.pricing_model, o.unit_price, o.tiers, o.package_size, o.package_price,
         o.free_units, o.groups, fluxrate.now(), fluxrate.now()
    FROM fluxrate_internal.plans fp
    JOIN fluxrate_internal.plans tp ON tp.org_id = fp.org_id AND tp.id = carry_overrides.to_plan
         AND coalesce(tp.family_id, tp.id) = coalesce(fp.family_id, fp.id)
    JOIN fluxrate_internal.charge_overrides o ON o.org_id = fp.org_id AND o.subscription_id = carry_overrides.subscription_id
    JOIN fluxrate_internal.charges oc ON oc.org_id = o.org_id AND oc.id = o.charge_id AND oc.plan_id = fp.id
    JOIN fluxrate_internal.charges nc ON nc.org_id = tp.org_id AND nc.plan_id = tp.id AND nc.status = 'ACTIVE'
         AND coalesce(nc.origin_id, nc.id) = coalesce(oc.origin_id, oc.id)
    LEFT JOIN fluxrate_internal.charge_dimensions ocd ON ocd.org_id = oc.org_id AND ocd.charge_id = oc.id
    LEFT JOIN fluxrate_internal.charge_dimensions ncd ON ncd.org_id = nc.org_id AND ncd.charge_id = nc.id
   WHERE fp.org_id = carry_overrides.org_id AND fp.id = carry_overrides.from_plan
     AND (ocd.property IS NOT DISTINCT FROM ncd.property)   -- groups of another property are another price
  ON CONFLICT ON CONSTRAINT charge_overrides_pkey DO NOTHING;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- The subscription moves to the plan of scheduled change c at the end of its
-- period (which the caller has just closed): the same anchor and the next
-- period, or, for another billing interval, a new anchor at that instant; then
-- the new plan's in-advance fees of that period on an opening invoice.
CREATE FUNCTION fluxrate_internal.apply_scheduled_change(s fluxrate_internal.subscriptions, c fluxrate_internal.subscription_changes)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p fluxrate_internal.plans;
  np record;
  v_now timestamptz := fluxrate.now();
  v_open uuid;
BEGIN
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = s.org_id AND x.id = c.to_plan_id;
  PERFORM fluxrate_internal.carry_overrides(s.org_id, s.id, c.from_plan_id, c.to_plan_id);
  IF c.new_anchor THEN
    UPDATE fluxrate_internal.subscriptions x
       SET plan_id = p.id, billing_interval = p.billing_interval, billing_anchor = s.current_period_end,
           current_period_index = 0, current_period_start = s.current_period_end,
           current_period_end = fluxrate_internal.period_boundary(s.current_period_end, p.billing_interval, s.alignment, 1),
           last_invoiced_date = v_now, close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id RETURNING * INTO s;
  ELSE
    UPDATE fluxrate_internal.subscriptions x
       SET plan_id = p.id, current_period_index = s.current_period_index + 1, current_period_start = s.current_period_end,
           current_period_end = fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment,
                                                                  s.current_period_index + 2),
           last_invoiced_date = v_now, close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id RETURNING * INTO s;
  END IF;
  IF fluxrate_internal.bills_in_advance(s.org_id, p.id) THEN
    SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
    v_open := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end,
                                                      np.nominal_start, np.nominal_end, 'opening');
  END IF;
  UPDATE fluxrate_internal.subscription_changes x SET status = 'APPLIED', applied_at = v_now, invoice_id = v_open
   WHERE x.org_id = c.org_id AND x.id = c.id;
  PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.plan_changed',
    jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'change_id', c.id,
                       'from_plan_id', c.from_plan_id, 'to_plan_id', c.to_plan_id, 'effective_at', c.effective_at,
                       'new_anchor', c.new_anchor));
END
$$;

-- Close the ended current period of s (locked by the caller) one subscription
-- at a time, as the closer does: its invoice with the next period's in-advance
-- fees, or the end of a subscription canceled at period end, or a scheduled
-- plan change (no in-advance fee of the old plan: the new plan's opening
-- invoice bills the next period).  Returns the closing invoice, NULL when there
-- was nothing to bill.
CREATE FUNCTION fluxrate_internal.close_ended_period(s fluxrate_internal.subscriptions) RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  np record;
  c fluxrate_internal.subscription_changes;
  v_now timestamptz := fluxrate.now();
  v_next timestamptz;
  v_id uuid;
BEGIN
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  c := fluxrate_internal.scheduled_change(s);
  IF NOT s.cancel_at_period_end AND c.id IS NULL THEN
    v_next := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 2);
  END IF;
  v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end, np.nominal_start, np.nominal_end,
    'subscription', NULL, CASE WHEN v_next IS NOT NULL THEN s.current_period_end END, v_next);
  IF s.cancel_at_period_end THEN
    UPDATE fluxrate_internal.subscriptions x
       SET status = 'CANCELED', ended_at = s.current_period_end, last_invoiced_date = v_now,
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id;
    PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.canceled',
      jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', s.current_period_end));
  ELSIF c.id IS NOT NULL THEN
    PERFORM fluxrate_internal.apply_scheduled_change(s, c);
  ELSE
    UPDATE fluxrate_internal.subscriptions x
       SET current_period_index = s.current_period_index + 1, current_period_start = s.current_period_end,
           current_period_end = v_next, last_invoiced_date = v_now,
           -- closed here: a failed closer's retry time no longer applies (it would hold
           -- the next period's close back)
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id;
  END IF;
  RETURN v_id;
END
$$;

-- The closer's stage for scheduled changes (sys_close_batch, 52_close.sql): the
-- claimed subscriptions whose scheduled change is due at the end of the period
-- being closed are closed one by one here (a handful per run), with the same
-- functions generate_invoice uses; the set-based statement closes the others.
-- Returns the batch without them.
CREATE FUNCTION fluxrate_internal.sys_close_changes(batch fluxrate_internal.subscriptions[])
  RETURNS fluxrate_internal.subscriptions[]
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_ids uuid[];
  s fluxrate_internal.subscriptions;
BEGIN
  -- (one probe of the partial index per claimed row; computed once, before the
  -- changes below mark themselves APPLIED)
  v_ids := ARRAY(SELECT x.id FROM unnest(batch) x
                  WHERE x.status IN ('ACTIVE', 'PAST_DUE')
                    AND EXISTS (SELECT 1 FROM fluxrate_internal.subscription_changes c
                                 WHERE c.org_id = x.org_id AND c.subscription_id = x.id AND c.status = 'SCHEDULED'
                                   AND c.effective_at <= x.current_period_end));
  IF cardinality(v_ids) = 0 THEN
    RETURN batch;
  END IF;
  FOREACH s IN ARRAY batch
  LOOP
    CONTINUE WHEN s.id <> ALL (v_ids);
    PERFORM set_config('fluxrate.current_org', s.org_id::text, true);
    PERFORM fluxrate_internal.close_ended_period(s);
  END LOOP;
  RETURN ARRAY(SELECT x FROM unnest(batch) x WHERE x.id <> ALL (v_ids));
END
$$;

-- The prorations of a change invoice (kind 'change'; fill_lines calls this for
-- every invoice and it adds nothing to the others), after its other lines: for
-- [credit_start, credit_end) (the change instant to the period end), the old
-- plan's (the invoice's plan) in-advance FIXED fees credited, then the new
-- plan's charged (change_to; none when the change starts a new anchor: the
-- new plan's period opens whole), each x the fraction of the whole period
-- (nominal_start, nominal_end) that is left, each line rounded once.  Returns
-- the last position written.
CREATE FUNCTION fluxrate_internal.fill_change_lines(i fluxrate_internal.invoices, pos integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c record;
  v_pos integer := pos;
  v_cs timestamptz := (i.meta_data->>'credit_start')::timestamptz;
  v_ce timestamptz := (i.meta_data->>'credit_end')::timestamptz;
  v_r numeric;
  v_amount numeric;
BEGIN
  IF i.kind <> 'change' OR v_ce <= v_cs THEN
    RETURN v_pos;
  END IF;
  v_r := extract(epoch FROM (v_ce - v_cs))
       / extract(epoch FROM ((i.meta_data->>'nominal_end')::timestamptz - (i.meta_data->>'nominal_start')::timestamptz));
  FOR c IN
    -- each plan's fees as priced for this subscription (its overrides,
    -- 23_overrides.sql: the credit gives back what it was charged)
    SELECT ch.*, p.id AS plan_id, p.name AS plan_name, p.version, x.sign
      FROM (VALUES ((i.meta_data->>'plan_id')::uuid, -1, 1), ((i.meta_data->>'change_to')::uuid, 1, 2)) x(plan_id, sign, k)
      JOIN fluxrate_internal.plans p ON p.org_id = i.org_id AND p.id = x.plan_id
     CROSS JOIN LATERAL fluxrate_internal.subscription_charges(i.org_id, i.subscription_id, p.id) ch
     WHERE ch.status = 'ACTIVE' AND ch.type = 'FIXED' AND ch.billing_timing = 'in_advance'
     ORDER BY x.k, ch.created_at, ch.id
  LOOP
    v_pos := v_pos + 1;
    v_amount := c.sign * c.unit_price * v_r;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    VALUES (i.org_id, i.id, v_pos, 'fixed', c.id,
            format('%s (%s v%s) - %s %s to %s', coalesce(c.display_name, 'Fixed fee'), c.plan_name, c.version,
                   CASE WHEN c.sign < 0 THEN 'unused time' ELSE 'remaining time' END,
                   to_char(v_cs AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), to_char(v_ce AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')),
            round(v_r, 12), c.sign * c.unit_price, fluxrate_internal.round_money(v_amount, i.currency), v_amount,
            v_cs, v_ce,
            jsonb_build_object('billing_timing', 'in_advance', 'proration', CASE WHEN c.sign < 0 THEN 'credit' ELSE 'charge' END,
                               'plan_id', c.plan_id, 'plan_version', c.version));
  END LOOP;
  RETURN v_pos;
END
$$;

CREATE FUNCTION fluxrate_internal.change_json(c fluxrate_internal.subscription_changes) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', c.id, 'subscription_id', c.subscription_id, 'status', c.status,
    'from_plan_id', c.from_plan_id, 'from_plan_version', f.version, 'to_plan_id', c.to_plan_id, 'to_plan_version', t.version,
    'to_plan_name', t.name, 'effective', c.effective, 'effective_at', c.effective_at, 'new_anchor', c.new_anchor,
    'billing_interval', t.billing_interval, 'invoice_id', c.invoice_id, 'created_at', c.created_at,
    'applied_at', c.applied_at, 'canceled_at', c.canceled_at)
    FROM fluxrate_internal.plans f, fluxrate_internal.plans t
   WHERE f.org_id = c.org_id AND f.id = c.from_plan_id AND t.org_id = c.org_id AND t.id = c.to_plan_id
$$;

-- The checks of change_subscription that read no period (nothing is written
-- before they pass): returns the plan the subscription moves to (the current
-- version of the plan asked for).
CREATE FUNCTION fluxrate_internal.check_change(s fluxrate_internal.subscriptions, plan_id uuid)
  RETURNS fluxrate_internal.plans
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p_old fluxrate_internal.plans;
  p fluxrate_internal.plans;
BEGIN
  IF s.status = 'CANCELED' THEN
    PERFORM fluxrate_internal.fail('PT409', 'cannot change the plan of a canceled subscription',
      format('Subscription %s ended at %s.', s.id, s.ended_at), 'Create a new subscription on the other plan.');
  END IF;
  IF s.status = 'TRIAL' THEN
    PERFORM fluxrate_internal.fail('PT409', 'cannot change the plan of a trialing subscription',
      format('The trial ends at %s; a trial is never billed, so there is nothing to prorate.', s.trial_end_date),
      'Change it once the trial has ended, or cancel it and subscribe the customer to the other plan.');
  END IF;
  IF s.cancel_at_period_end THEN
    PERFORM fluxrate_internal.fail('PT409', 'the subscription is canceled at the end of its period',
      format('It ends at %s.', s.current_period_end), 'Create a new subscription on the other plan instead.');
  END IF;
  IF (fluxrate_internal.scheduled_change(s)).id IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('PT409', 'a plan change is already scheduled',
      format('Subscription %s changes plan at %s.', s.id, (fluxrate_internal.scheduled_change(s)).effective_at),
      'Call cancel_scheduled_change first.');
  END IF;
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = s.org_id AND x.id = check_change.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', format('No plan %s in this organization.', plan_id));
  END IF;
  p := fluxrate_internal.current_plan_version(p);
  SELECT * INTO p_old FROM fluxrate_internal.plans x WHERE x.org_id = s.org_id AND x.id = s.plan_id;
  IF p.id = s.plan_id THEN
    PERFORM fluxrate_internal.fail('PT409', 'the subscription is already on this plan',
      format('Subscription %s is on %s version %s.', s.id, p.lookup_id, p.version));
  END IF;
  IF NOT p.is_active THEN
    PERFORM fluxrate_internal.fail('PT422', 'plan is deactivated', format('Plan %s takes no new subscriptions.', p.lookup_id));
  END IF;
  IF p.currency <> p_old.currency THEN
    PERFORM fluxrate_internal.fail('PT422', 'the new plan bills in another currency',
      format('The subscription bills in %s, plan %s in %s.', p_old.currency, p.lookup_id, p.currency),
      'A subscription keeps its currency: create a new subscription for the other currency.');
  END IF;
  RETURN p;
END
$$;

-- Effective now: the change invoice for [start, now) with the prorations, the
-- subscription on the new plan from now (a new anchor for another interval,
-- with the new plan's opening invoice).  s is locked and its period contains
-- now.  Returns the change.
CREATE FUNCTION fluxrate_internal.change_now(s fluxrate_internal.subscriptions, p fluxrate_internal.plans)
  RETURNS fluxrate_internal.subscription_changes
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c fluxrate_internal.subscription_changes;
  np record;
  v_now timestamptz := fluxrate.now();
  v_new_anchor boolean := p.billing_interval <> s.billing_interval;
  v_open uuid;
BEGIN
  c := ROW(s.org_id, gen_random_uuid(), s.id, s.plan_id, p.id, 'now', v_now, 'APPLIED', v_new_anchor, NULL,
           v_now, v_now, NULL)::fluxrate_internal.subscription_changes;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.invoices x WHERE x.org_id = s.org_id AND x.subscription_id = s.id
                AND x.kind = 'change' AND x.period_end = v_now) THEN
    PERFORM fluxrate_internal.fail('PT409', 'the subscription changed plan at this instant already',
      format('A change invoice of subscription %s ends at %s.', s.id, v_now), 'Change it again later, or at the period end.');
  END IF;
  -- before the change invoice: its charge of the new plan's remaining time
  -- is the subscription's price (a carried override)
  PERFORM fluxrate_internal.carry_overrides(s.org_id, s.id, s.plan_id, p.id);
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  c.invoice_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, v_now, np.nominal_start, np.nominal_end,
    'change', NULL, NULL, NULL,
    jsonb_build_object('change_id', c.id, 'change_to', CASE WHEN NOT v_new_anchor THEN p.id END,
                       'credit_start', v_now, 'credit_end', s.current_period_end, 'new_anchor', v_new_anchor));
  IF v_new_anchor THEN
    UPDATE fluxrate_internal.subscriptions x
       SET plan_id = p.id, billing_interval = p.billing_interval, billing_anchor = v_now, current_period_index = 0,
           current_period_start = v_now,
           current_period_end = fluxrate_internal.period_boundary(v_now, p.billing_interval, s.alignment, 1),
           last_invoiced_date = CASE WHEN c.invoice_id IS NULL THEN x.last_invoiced_date ELSE v_now END
     WHERE x.org_id = s.org_id AND x.id = s.id RETURNING * INTO s;
    IF fluxrate_internal.bills_in_advance(s.org_id, p.id) THEN
      SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
      v_open := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end,
                                                        np.nominal_start, np.nominal_end, 'opening');
    END IF;
  ELSE
    UPDATE fluxrate_internal.subscriptions x
       SET plan_id = p.id, current_period_start = v_now,
           last_invoiced_date = CASE WHEN c.invoice_id IS NULL THEN x.last_invoiced_date ELSE v_now END
     WHERE x.org_id = s.org_id AND x.id = s.id RETURNING * INTO s;
  END IF;
  INSERT INTO fluxrate_internal.subscription_changes SELECT c.*;
  PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.plan_changed',
    jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'change_id', c.id,
                       'from_plan_id', c.from_plan_id, 'to_plan_id', c.to_plan_id, 'effective_at', v_now,
                       'new_anchor', v_new_anchor, 'invoice_id', c.invoice_id, 'opening_invoice_id', v_open));
  RETURN c;
END
$$;

-- Move a subscription to another plan (docs/lifecycle.md, "Plan changes").
-- effective: 'now' (the default) or 'period_end'.  effective_at, optional, is
-- the instant the caller means: it may not be in the past (billed usage is
-- never re-rated), and must be now for 'now' and the period end for
-- 'period_end'.  The row lock is the closer's (FOR UPDATE of the subscription
-- row): a change racing a close waits for it, or the closer skips the row.
CREATE FUNCTION fluxrate.change_subscription(subscription_id uuid DEFAULT NULL, plan_id uuid DEFAULT NULL,
    effective text DEFAULT 'now', effective_at timestamptz DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  v_eff text := lower(coalesce(change_subscription.effective, 'now'));
  v_now timestamptz := fluxrate.now();
  s fluxrate_internal.subscriptions;
  p fluxrate_internal.plans;
  c fluxrate_internal.subscription_changes;
  n integer := 0;
  v_at timestamptz;
BEGIN
  PERFORM fluxrate_internal.required(change_subscription.subscription_id, 'subscription_id');
  PERFORM fluxrate_internal.required(change_subscription.plan_id, 'plan_id');
  PERFORM fluxrate_internal.one_of(v_eff, 'effective', ARRAY['now', 'period_end']);
  IF change_subscription.effective_at IS NOT NULL AND NOT isfinite(change_subscription.effective_at) THEN
    PERFORM fluxrate_internal.fail('PT422', 'effective_at must be a finite date', format('effective_at was %s.', change_subscription.effective_at));
  END IF;
  IF change_subscription.effective_at < v_now THEN
    PERFORM fluxrate_internal.fail('PT422', 'effective_at is in the past',
      format('effective_at was %s; it is now %s.', change_subscription.effective_at, v_now),
      'A change takes effect now or at the end of the current period: usage already billed is never re-rated.');
  END IF;
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = change_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  p := fluxrate_internal.check_change(s, change_subscription.plan_id);
  -- a period that has ended is closed first (as the closer would), so the change
  -- is after that close, never inside it
  WHILE s.current_period_end <= v_now LOOP
    n := n + 1;
    IF n > fluxrate_internal.close_periods_per_run() THEN
      PERFORM fluxrate_internal.fail('PT409', 'the subscription''s closing is behind',
        format('Its current period ended at %s.', s.current_period_end), 'Run close_due_periods(), then change it.');
    END IF;
    PERFORM fluxrate_internal.close_ended_period(s);
    SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = s.id;
  END LOOP;
  v_at := CASE v_eff WHEN 'now' THEN v_now ELSE s.current_period_end END;
  IF change_subscription.effective_at IS NOT NULL AND change_subscription.effective_at <> v_at THEN
    PERFORM fluxrate_internal.fail('PT422', format('effective_at must be %s for effective => %s',
        CASE v_eff WHEN 'now' THEN 'now' ELSE 'the period end' END, v_eff),
      format('effective_at was %s; the current period is %s to %s.', change_subscription.effective_at,
             s.current_period_start, s.current_period_end),
      'A change takes effect now or at the end of the current period.');
  END IF;
  IF v_eff = 'period_end' THEN
    INSERT INTO fluxrate_internal.subscription_changes (org_id, subscription_id, from_plan_id, to_plan_id, effective,
        effective_at, status, new_anchor, created_at)
    VALUES (v_org, s.id, s.plan_id, p.id, 'period_end', s.current_period_end, 'SCHEDULED',
            p.billing_interval <> s.billing_interval, v_now)
    RETURNING * INTO c;
  ELSE
    c := fluxrate_internal.change_now(s, p);
    SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = s.id;
  END IF;
  IF c.new_anchor THEN
    RAISE NOTICE 'plan change: billing periods restart at % (the new plan bills per %)', c.effective_at, p.billing_interval;
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.subscription_json(s)
         || jsonb_build_object('change', fluxrate_internal.change_json(c),
              'message', CASE WHEN c.new_anchor THEN format('another billing interval: a new anchor, periods restart at %s', c.effective_at)
                              WHEN c.status = 'SCHEDULED' THEN format('the plan changes at the period end, %s', c.effective_at)
                              ELSE 'the plan changed now' END);
END
$$;

-- A scheduled change (effective => 'period_end') that has not happened yet is
-- canceled: the subscription stays on its plan.
CREATE FUNCTION fluxrate.cancel_scheduled_change(subscription_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  s fluxrate_internal.subscriptions;
  c fluxrate_internal.subscription_changes;
BEGIN
  PERFORM fluxrate_internal.required(cancel_scheduled_change.subscription_id, 'subscription_id');
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = cancel_scheduled_change.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  UPDATE fluxrate_internal.subscription_changes x SET status = 'CANCELED', canceled_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.subscription_id = s.id AND x.status = 'SCHEDULED'
  RETURNING * INTO c;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'no scheduled plan change', format('Subscription %s has no plan change scheduled.', s.id),
      'A change effective now has already happened; change the plan again instead.');
  END IF;
  RETURN fluxrate_internal.subscription_json(s) || jsonb_build_object('change', fluxrate_internal.change_json(c));
END
$$;

-- A subscription's plan changes, oldest first (applied, scheduled, canceled).
CREATE FUNCTION fluxrate.list_subscription_changes(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = list_subscription_changes.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.change_json(c)
                            ORDER BY c.created_at, coalesce(c.canceled_at, c.applied_at, c.effective_at), c.id)
                     FROM fluxrate_internal.subscription_changes c
                    WHERE c.org_id = v_org AND c.subscription_id = list_subscription_changes.subscription_id), '[]'::jsonb);
END
$$;
