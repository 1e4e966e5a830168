-- 50_periods.sql: a subscription period and its draft invoice.
--   nominal_period()          the nominal bounds of period n (period_boundary()
--                             itself is in 22_subscriptions.sql)
--   late_window_lines()       the late-usage window (the last 12 finalized invoices)
--   fill_late_lines(), fill_lines()   the lines of a subscription invoice: the
--                             reference the set-based closer (52_close.sql) matches
--                             and finalization (53_finalize.sql) recomputes with
--   create_period_invoice()   a DRAFT for [period_start, period_end), once
--   bills_in_advance(), open_subscription() and the subscriptions_open trigger:
--                             the opening invoice of in-advance FIXED fees
-- Part of what 50_lifecycle.sql held before it was split by concept (issue 20);
-- the parts 50-58 are concatenated in numeric order.

-- The nominal bounds of period n of a subscription.
CREATE FUNCTION fluxrate_internal.nominal_period(s fluxrate_internal.subscriptions, OUT nominal_start timestamptz, OUT nominal_end timestamptz)
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  -- src/periods.c: the calendar first period's nominal start is one whole
  -- interval before its end; every other period's are boundaries n and n + 1
  AS 'MODULE_PATHNAME', 'fr_nominal_period';

-- The late-usage window, defined once for fill_lines, sys_close_batch and
-- sys_close_prepare: the usage and late-usage lines, for periods ending by
-- `before`, of the subscription's last 12 finalized invoices that bill usage
-- (DRAFTs are not billed yet; opening invoices carry fees only; a VOID
-- invoice's usage counts as billed: voiding forgives it).  Driven from the
-- subscription's own invoices through the (org_id, subscription_id,
-- period_start) index, so its cost does not grow with the organization's other
-- invoices; the lines lateral is a fence (OFFSET 0): pulled up into a join, the
-- planner, whose statistics of invoice_lines may date from before a closing
-- run, hashed every line of the organization.  Plain SQL without SET clauses,
-- so that it is inlined into its callers' queries (they pin search_path).
CREATE FUNCTION fluxrate_internal.late_window_lines(org_id uuid, subscription_id uuid, before timestamptz)
  RETURNS TABLE (charge_id uuid, period_start timestamptz, period_end timestamptz, line_type text, meta jsonb)
  LANGUAGE sql STABLE
  AS $$
  SELECT l.charge_id, l.period_start, l.period_end, l.line_type, l.meta
    FROM (SELECT pi.id FROM fluxrate_internal.invoices pi
           WHERE pi.org_id = $1 AND pi.subscription_id = $2 AND pi.period_start < $3
             AND pi.status IN ('OPEN', 'PAID', 'UNCOLLECTIBLE', 'VOID') AND pi.kind <> 'opening'
           ORDER BY pi.period_start DESC LIMIT 12) recent
    CROSS JOIN LATERAL (SELECT l0.charge_id, l0.period_start, l0.period_end, l0.line_type, l0.meta
                          FROM fluxrate_internal.invoice_lines l0
                         WHERE l0.org_id = $1 AND l0.invoice_id = recent.id
                           AND l0.line_type IN ('usage', 'late_usage') AND l0.charge_id IS NOT NULL
                           AND l0.period_end <= $3
                        OFFSET 0) l
$$;

-- A grouped charge's late usage for one past period [ps, pe): per group, the
-- usage now (now_usage, by group: meter_group_usage()) and the usage billed
-- so far (its usage line and earlier late lines of that group, in the
-- late-usage window), each priced by group_lines(); amount = rate(now) -
-- rate(billed).  What fill_late_lines and the closer write, both through this.
CREATE FUNCTION fluxrate_internal.group_late_usage(org_id uuid, subscription_id uuid, before timestamptz, charge_id uuid,
    groups jsonb, charge_name text, ps timestamptz, pe timestamptz, now_usage jsonb)
  RETURNS TABLE (gpos integer, group_value text, unpriced boolean, name text, usage_now numeric, billed numeric, amount numeric)
  LANGUAGE sql STABLE
  AS $$
  WITH b AS (
    SELECT coalesce(jsonb_object_agg(q.k, q.u), '{}'::jsonb) AS m
      FROM (SELECT coalesce(l.meta->>'group', '') AS k,
                   sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric ELSE (l.meta->>'usage_delta')::numeric END) AS u
              FROM fluxrate_internal.late_window_lines($1, $2, $3) l
             WHERE l.charge_id = $4 AND l.period_start = $7 AND l.period_end = $8
             GROUP BY 1) q
  )
  SELECT n.gpos, n.group_value, n.unpriced, n.name, n.usage, o.usage, n.amount - o.amount
    FROM fluxrate_internal.group_lines($5, $9, $6) n
    JOIN fluxrate_internal.group_lines($5, (SELECT b.m FROM b), $6) o ON o.gpos = n.gpos
   WHERE n.usage <> o.usage
$$;

-- The late-usage lines of a grouped charge for one past period, after
-- position pos; returns the last position written.
CREATE FUNCTION fluxrate_internal.fill_group_late_lines(i fluxrate_internal.invoices, charge_id uuid, meter_id uuid, groups jsonb,
    charge_name text, ps timestamptz, pe timestamptz, pos integer)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  g record;
  v_pos integer := pos;
BEGIN
  FOR g IN
    SELECT * FROM fluxrate_internal.group_late_usage(i.org_id, i.subscription_id, i.period_start, charge_id, groups, charge_name,
                    ps, pe, fluxrate_internal.meter_group_usage(i.org_id, i.customer_id, meter_id, ps, pe)) x
     WHERE x.amount > 0 ORDER BY x.gpos
  LOOP
    v_pos := v_pos + 1;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    VALUES (i.org_id, i.id, v_pos, 'late_usage', charge_id,
            format('%s - late usage for %s to %s', g.name, to_char(ps AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                   to_char(pe AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            g.usage_now - g.billed, round(g.amount / (g.usage_now - g.billed), 12),
            fluxrate_internal.round_money(g.amount, i.currency), g.amount, ps, pe,
            jsonb_build_object('meter_id', meter_id, 'usage_delta', g.usage_now - g.billed, 'usage_now', g.usage_now,
                               'billed_before', g.billed, 'group', g.group_value, 'unpriced', g.unpriced));
  END LOOP;
  RETURN v_pos;
END
$$;

-- The lines of a grouped charge on invoice i, from position pos + 1 (one per
-- group, group_lines()); returns their unrounded sum.
CREATE FUNCTION fluxrate_internal.fill_group_lines(i fluxrate_internal.invoices, charge_id uuid, meter_id uuid, groups jsonb,
    charge_name text, pos integer)
  RETURNS numeric
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_sum numeric;
BEGIN
  WITH g AS (
    SELECT x.* FROM fluxrate_internal.group_lines(groups,
             fluxrate_internal.meter_group_usage(i.org_id, i.customer_id, meter_id, i.period_start, i.period_end), charge_name) x
  ), ins AS (
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    SELECT i.org_id, i.id, pos + g.gpos, 'usage', charge_id, g.name, g.usage,
           CASE WHEN g.pricing_model IN ('per_unit', 'unpriced') THEN g.unit_price
                WHEN g.usage = 0 THEN 0 ELSE round(g.amount / g.usage, 12) END,
           fluxrate_internal.round_money(g.amount, i.currency), g.amount, i.period_start, i.period_end,
           jsonb_build_object('meter_id', meter_id, 'usage', g.usage, 'pricing_model', g.pricing_model,
                              'group', g.group_value, 'unpriced', g.unpriced)
      FROM g
    RETURNING amount_unrounded
  )
  SELECT coalesce(sum(ins.amount_unrounded), 0) INTO v_sum FROM ins;
  RETURN v_sum;
END
$$;

-- The late-usage lines of subscription invoice i, after position pos; returns
-- the last position written.
-- Late usage: events that reached an already finalized period of this
-- subscription.  Per charge and past period: the usage now minus the usage
-- billed so far (the usage line plus earlier late lines; the deltas telescope,
-- so this is right for every aggregation), priced incrementally
-- (rate(now) - rate(billed)) so tiers stay right.  Only what increases the
-- amount is billed; finalized invoices never change.  The window:
-- late_window_lines() (the last 12 finalized invoices that bill usage).
CREATE FUNCTION fluxrate_internal.fill_late_lines(i fluxrate_internal.invoices, pos integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c record;
  r record;
  v_pos integer := pos;
  v_usage numeric;
  v_amount numeric;
BEGIN
  FOR r IN
    SELECT l.charge_id, l.period_start, l.period_end,
           sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric ELSE (l.meta->>'usage_delta')::numeric END) AS billed
      FROM fluxrate_internal.late_window_lines(i.org_id, i.subscription_id, i.period_start) l
     GROUP BY l.charge_id, l.period_start, l.period_end
     ORDER BY l.period_start, l.charge_id
  LOOP
    -- priced as the subscription's charge is now (its override, if any; a
    -- charge its plan no longer has keeps it too: the period was billed so)
    SELECT ch.*, m.meter_name INTO c FROM fluxrate_internal.subscription_charge(i.org_id, i.subscription_id, r.charge_id) ch
      JOIN fluxrate_internal.meters m ON m.org_id = i.org_id AND m.id = ch.meter_id;
    -- a grouped charge's late usage: by group (fill_group_late_lines)
    IF c.groups IS NOT NULL THEN
      v_pos := fluxrate_internal.fill_group_late_lines(i, c.id, c.meter_id, c.groups, coalesce(c.display_name, c.meter_name),
                                                       r.period_start, r.period_end, v_pos);
      CONTINUE;
    END IF;
    v_usage := fluxrate_internal.meter_usage(i.org_id, i.customer_id, c.meter_id, r.period_start, r.period_end);
    CONTINUE WHEN v_usage = r.billed;
    v_amount := fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price, c.free_units, v_usage)
              - fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price, c.free_units, r.billed);
    CONTINUE WHEN v_amount <= 0;
    v_pos := v_pos + 1;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    VALUES (i.org_id, i.id, v_pos, 'late_usage', c.id,
            format('%s - late usage for %s to %s', coalesce(c.display_name, c.meter_name),
                   to_char(r.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'), to_char(r.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            v_usage - r.billed, round(v_amount / (v_usage - r.billed), 12),
            fluxrate_internal.round_money(v_amount, i.currency), v_amount, r.period_start, r.period_end,
            jsonb_build_object('meter_id', c.meter_id, 'usage_delta', v_usage - r.billed, 'usage_now', v_usage,
                               'billed_before', r.billed));
  END LOOP;
  RETURN v_pos;
END
$$;

-- (Re)compute the lines of a subscription invoice over [period_start, period_end).
-- nominal_start/nominal_end is the whole period the dates fall in: FIXED charges
-- are prorated by the fraction of it the invoice covers (exact time, which is
-- days for midnight boundaries: Jan 15 -> Feb 1 of a January period = 17/31).
-- One line per ACTIVE charge, zero-usage lines included (a statement), then the
-- plan's minimum-commitment true-up.  Each line rounded once.
-- FIXED charges billed in advance:
--   * an 'opening' invoice carries only them, for its own (first) period;
--   * a closing invoice (kind 'subscription') whose meta_data names an advance
--     period (advance_start/advance_end: the next period, absent when the
--     subscription ends with this one) carries them for that next period, at the
--     full price, labelled with its dates;
--   * interim and final invoices never carry them (that period was paid ahead).
-- For the minimum commitment, the period's total counts the in-advance fees of
-- the period itself (billed earlier) and not the next period's.
CREATE FUNCTION fluxrate_internal.fill_lines(org_id uuid, invoice_id uuid, nominal_start timestamptz, nominal_end timestamptz,
    usage_map jsonb DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  s fluxrate_internal.subscriptions;
  p fluxrate_internal.plans;
  c record;
  v_pos integer := 0;
  v_frac numeric;
  v_amount numeric;
  v_usage numeric;
  v_sum numeric := 0;
  v_unit numeric;
  v_opening boolean;
  v_adv_start timestamptz;
  v_adv_end timestamptz;
  v_min numeric;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = fill_lines.org_id AND x.id = fill_lines.invoice_id;
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = i.org_id AND x.id = i.subscription_id;
  -- the plan (version) the invoice is rated with, as recorded when it was
  -- written: after a plan change the subscription is on another plan
  -- (55_plan_changes.sql); invoices from before 0.2.0 carry none
  s.plan_id := coalesce((i.meta_data->>'plan_id')::uuid, s.plan_id);
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = i.org_id AND x.id = s.plan_id;
  DELETE FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_frac := CASE WHEN i.period_start = nominal_start AND i.period_end = nominal_end THEN 1
                 ELSE extract(epoch FROM (i.period_end - i.period_start)) / extract(epoch FROM (nominal_end - nominal_start)) END;
  v_opening := i.kind = 'opening';
  IF i.kind = 'subscription' THEN
    v_adv_start := (i.meta_data->>'advance_start')::timestamptz;
    v_adv_end := (i.meta_data->>'advance_end')::timestamptz;
  END IF;
  -- the plan's charges as priced for this subscription (its overrides, a
  -- grouped charge's groups: 24_dimensions.sql)
  FOR c IN
    SELECT ch.*, m.meter_name FROM fluxrate_internal.subscription_charges(i.org_id, s.id, s.plan_id) ch
      LEFT JOIN fluxrate_internal.meters m ON m.org_id = i.org_id AND m.id = ch.meter_id
     WHERE ch.status = 'ACTIVE'
       AND (NOT v_opening OR (ch.type = 'FIXED' AND ch.billing_timing = 'in_advance'))
       AND i.period_end > i.period_start   -- (a plan change at the period's first instant: nothing elapsed)
     ORDER BY ch.type, ch.created_at, ch.id
  LOOP
    IF c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND NOT v_opening THEN
      -- paid ahead for this period: it counts towards the minimum commitment
      v_sum := v_sum + c.unit_price * v_frac;
      CONTINUE WHEN v_adv_start IS NULL;
      -- the next period's fee, in advance, whole
      v_pos := v_pos + 1;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'fixed', c.id, coalesce(c.display_name, 'Fixed fee'), 1, c.unit_price,
              fluxrate_internal.round_money(c.unit_price, i.currency), c.unit_price, v_adv_start, v_adv_end,
              jsonb_build_object('billing_timing', 'in_advance'));
      CONTINUE;
    END IF;
    v_pos := v_pos + 1;
    IF c.type = 'FIXED' THEN
      v_amount := c.unit_price * v_frac;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'fixed', c.id,
              coalesce(c.display_name, 'Fixed fee') || CASE WHEN v_frac <> 1 THEN ' (prorated)' ELSE '' END,
              CASE WHEN v_frac = 1 THEN 1 ELSE round(v_frac, 12) END, c.unit_price,
              fluxrate_internal.round_money(v_amount, i.currency), v_amount,
              i.period_start, i.period_end, jsonb_build_object('billing_timing', c.billing_timing));
    ELSIF c.groups IS NOT NULL THEN
      -- a grouped charge: one line per group (fill_group_lines)
      v_sum := v_sum + fluxrate_internal.fill_group_lines(i, c.id, c.meter_id, c.groups,
                                                           coalesce(c.display_name, c.meter_name), v_pos - 1);
      v_pos := v_pos + fluxrate_internal.group_line_count(c.groups) - 1;
      CONTINUE;
    ELSE
      -- the closer computes every usage of its batch in one statement and passes it in
      v_usage := coalesce((usage_map->>(c.id::text))::numeric,
                          fluxrate_internal.meter_usage(i.org_id, i.customer_id, c.meter_id, i.period_start, i.period_end));
      v_amount := fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size,
                                                c.package_price, c.free_units, v_usage);
      v_unit := CASE WHEN c.pricing_model = 'per_unit' THEN c.unit_price
                     WHEN v_usage = 0 THEN 0 ELSE round(v_amount / v_usage, 12) END;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'usage', c.id, coalesce(c.display_name, c.meter_name),
              v_usage, v_unit, fluxrate_internal.round_money(v_amount, i.currency), v_amount,
              i.period_start, i.period_end, jsonb_build_object('meter_id', c.meter_id, 'usage', v_usage,
                                                               'pricing_model', c.pricing_model));
    END IF;
    v_sum := v_sum + v_amount;
  END LOOP;
  IF v_opening THEN
    -- only the period's in-advance fees: no usage yet, no true-up (that is the closing invoice's)
    PERFORM fluxrate_internal.write_discount_lines(i);
    PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
    RETURN;
  END IF;
  -- late usage: fill_late_lines()
  v_pos := fluxrate_internal.fill_late_lines(i, v_pos);

  -- the subscription's minimum commitment: its override, else the plan's
  v_min := fluxrate_internal.subscription_minimum(i.org_id, s.id, p.id);
  IF v_min IS NOT NULL AND v_sum < v_min * v_frac THEN
    v_pos := v_pos + 1;
    v_amount := v_min * v_frac - v_sum;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end)
    VALUES (i.org_id, i.id, v_pos, 'minimum', 'Minimum commitment true-up', 1, v_amount,
            fluxrate_internal.round_money(v_amount, i.currency), v_amount, i.period_start, i.period_end);
  END IF;
  -- a plan change's invoice: the old plan's in-advance fees credited and the
  -- new plan's charged for the rest of the period (55_plan_changes.sql)
  v_pos := fluxrate_internal.fill_change_lines(i, v_pos);
  -- the coupons (56_discounts.sql), after every other line, before the totals
  PERFORM fluxrate_internal.write_discount_lines(i);
  PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
END
$$;

-- A DRAFT subscription invoice for [period_start, period_end), once: the unique
-- indexes on (org_id, subscription_id, period_start) of kinds 'subscription' and
-- 'opening' make a second closer's insert a no-op.  Returns the invoice id, or
-- NULL when it already existed.  advance_start/advance_end: the next period,
-- whose in-advance FIXED fees a closing invoice carries (NULL: the subscription
-- ends with this period, or the invoice is not a closing one).  An opening
-- invoice of a period that has not started yet waits for its start, then the
-- grace period.
CREATE FUNCTION fluxrate_internal.create_period_invoice(s fluxrate_internal.subscriptions, period_start timestamptz,
    period_end timestamptz, nominal_start timestamptz, nominal_end timestamptz, kind text DEFAULT 'subscription',
    usage_map jsonb DEFAULT NULL, advance_start timestamptz DEFAULT NULL, advance_end timestamptz DEFAULT NULL,
    meta jsonb DEFAULT NULL)
  RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  v_id uuid;
  v_currency text;
  v_grace interval;
  v_version integer;
BEGIN
  SELECT p.currency, p.version INTO v_currency, v_version FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id;
  SELECT o.grace_period INTO v_grace FROM fluxrate_internal.organizations o WHERE o.org_id = s.org_id;
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
      scheduled_finalize_at, meta_data, created_at, updated_at)
  VALUES (s.org_id, create_period_invoice.kind, s.customer_id, s.id, v_currency, create_period_invoice.period_start,
          create_period_invoice.period_end,
          CASE WHEN create_period_invoice.kind = 'opening' THEN greatest(fluxrate.now(), create_period_invoice.period_start)
               ELSE fluxrate.now() END + v_grace,
          jsonb_build_object('nominal_start', create_period_invoice.nominal_start, 'nominal_end', create_period_invoice.nominal_end,
                             'plan_id', s.plan_id, 'plan_version', v_version)
          || coalesce(create_period_invoice.meta, '{}'::jsonb)
          || CASE WHEN create_period_invoice.advance_start IS NULL THEN '{}'::jsonb
                  ELSE jsonb_build_object('advance_start', create_period_invoice.advance_start,
                                          'advance_end', create_period_invoice.advance_end) END,
          fluxrate.now(), fluxrate.now())
  ON CONFLICT DO NOTHING
  RETURNING id INTO v_id;
  IF v_id IS NOT NULL THEN
    PERFORM fluxrate_internal.fill_lines(s.org_id, v_id, create_period_invoice.nominal_start, create_period_invoice.nominal_end,
                                         create_period_invoice.usage_map);
    -- nothing to bill (a plan of in-advance fees only, in its last period): no invoice
    IF NOT EXISTS (SELECT 1 FROM fluxrate_internal.invoice_lines l WHERE l.org_id = s.org_id AND l.invoice_id = v_id) THEN
      DELETE FROM fluxrate_internal.invoices i WHERE i.org_id = s.org_id AND i.id = v_id;
      RETURN NULL;
    END IF;
    PERFORM fluxrate_internal.emit_event(s.org_id, 'invoice.created',
      (SELECT jsonb_build_object('invoice_id', i.id, 'customer_id', i.customer_id, 'subscription_id', i.subscription_id,
                                 'total', i.total, 'currency', i.currency, 'status', i.status)
         FROM fluxrate_internal.invoices i WHERE i.org_id = s.org_id AND i.id = v_id));
  END IF;
  RETURN v_id;
END
$$;

-- Does the plan bill any FIXED charge in advance?
CREATE FUNCTION fluxrate_internal.bills_in_advance(org_id uuid, plan_id uuid) RETURNS boolean
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT EXISTS (SELECT 1 FROM fluxrate_internal.charges ch
                  WHERE ch.org_id = bills_in_advance.org_id AND ch.plan_id = bills_in_advance.plan_id
                    AND ch.type = 'FIXED' AND ch.billing_timing = 'in_advance' AND ch.status = 'ACTIVE')
$$;

-- The opening invoice: when a subscription starts billing (at creation, or when
-- its trial ends) and its plan bills FIXED charges in advance, the first
-- period's fees (prorated for a partial calendar period) go on a DRAFT of kind
-- 'opening' that finalizes after the grace period like the others.
-- last_invoiced_date marks the subscription as opened (and keeps a restore of a
-- dump, which re-inserts the rows, from opening it twice).
CREATE FUNCTION fluxrate_internal.open_subscription(s fluxrate_internal.subscriptions) RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  np record;
  v_id uuid;
BEGIN
  IF s.status <> 'ACTIVE' OR s.current_period_index <> 0 OR NOT fluxrate_internal.bills_in_advance(s.org_id, s.plan_id) THEN
    RETURN NULL;
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end,
                                                  np.nominal_start, np.nominal_end, 'opening');
  IF v_id IS NOT NULL THEN
    UPDATE fluxrate_internal.subscriptions x SET last_invoiced_date = fluxrate.now()
     WHERE x.org_id = s.org_id AND x.id = s.id;
  END IF;
  RETURN v_id;
END
$$;

-- create_subscription (22_subscriptions.sql) inserts ACTIVE subscriptions directly:
-- open them in the same transaction.
CREATE FUNCTION fluxrate_internal.subscription_opened() RETURNS trigger
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.open_subscription(NEW);
  RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_open AFTER INSERT ON fluxrate_internal.subscriptions
  FOR EACH ROW WHEN (NEW.status = 'ACTIVE' AND NEW.current_period_index = 0 AND NEW.last_invoiced_date IS NULL)
  EXECUTE FUNCTION fluxrate_internal.subscription_opened();
