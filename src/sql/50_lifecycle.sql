-- 50_lifecycle.sql: invoices (subscription, final, manual), closing periods,
-- grace period and finalization, invoice states, cancellation, PAST_DUE, taxes,
-- and the pg_cron helper.

-- the unrounded amount of each line: tax is computed on the unrounded subtotal
ALTER TABLE fluxrate_internal.invoice_lines ADD COLUMN amount_unrounded numeric;

-- Taxes ----------------------------------------------------------------------

-- The customer's rate: a state-specific rate beats the country-wide one; none = 0.
CREATE FUNCTION fluxrate_internal.tax_rate_for(org_id uuid, customer_id uuid) RETURNS numeric
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce((
    SELECT t.rate FROM fluxrate_internal.tax_rates t, fluxrate_internal.customers c
     WHERE c.org_id = tax_rate_for.org_id AND c.id = tax_rate_for.customer_id
       AND t.org_id = c.org_id AND t.country = c.billing_address_country
       AND t.state IN ('', coalesce(c.billing_address_state, ''))
     ORDER BY t.state DESC LIMIT 1), 0)
$$;

CREATE FUNCTION fluxrate.set_tax_rate(country text DEFAULT NULL, rate numeric DEFAULT NULL, state text DEFAULT '', name text DEFAULT 'Tax')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  t fluxrate_internal.tax_rates;
BEGIN
  PERFORM fluxrate_internal.required(set_tax_rate.country, 'country');
  PERFORM fluxrate_internal.required(set_tax_rate.rate, 'rate');
  IF upper(set_tax_rate.country) !~ '^[A-Z]{2}$' THEN
    PERFORM fluxrate_internal.fail('22023', format('invalid country: %s', set_tax_rate.country), 'country is an ISO 3166 two-letter code.');
  END IF;
  IF set_tax_rate.rate < 0 OR set_tax_rate.rate >= 1 THEN
    PERFORM fluxrate_internal.fail('PT422', 'rate must be at least 0 and below 1', format('rate was %s; 18%% is 0.18.', set_tax_rate.rate));
  END IF;
  INSERT INTO fluxrate_internal.tax_rates (org_id, country, state, rate, name, created_at)
  VALUES (v_org, upper(set_tax_rate.country), coalesce(set_tax_rate.state, ''), set_tax_rate.rate,
          coalesce(set_tax_rate.name, 'Tax'), fluxrate.now())
  ON CONFLICT ON CONSTRAINT tax_rates_org_id_country_state_key DO UPDATE SET rate = EXCLUDED.rate, name = EXCLUDED.name
  RETURNING * INTO t;
  RETURN jsonb_build_object('id', t.id, 'country', t.country, 'state', t.state, 'rate', t.rate, 'name', t.name);
END
$$;

CREATE FUNCTION fluxrate.list_tax_rates() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN coalesce((SELECT jsonb_agg(jsonb_build_object('id', t.id, 'country', t.country, 'state', t.state,
                     'rate', t.rate, 'name', t.name) ORDER BY t.country, t.state)
                   FROM fluxrate_internal.tax_rates t WHERE t.org_id = v_org), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.delete_tax_rate(tax_rate_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  DELETE FROM fluxrate_internal.tax_rates t WHERE t.org_id = v_org AND t.id = delete_tax_rate.tax_rate_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'tax rate not found', format('No tax rate %s in this organization.', tax_rate_id));
  END IF;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', tax_rate_id, 'deleted', true);
END
$$;

-- Invoice documents ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.invoice_json(i fluxrate_internal.invoices, with_lines boolean DEFAULT true) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', i.id, 'invoice_number', i.invoice_number, 'status', i.status,
    'kind', i.kind, 'customer_id', i.customer_id, 'subscription_id', i.subscription_id, 'currency', i.currency,
    'subtotal', i.subtotal, 'tax', i.tax, 'tax_rate', i.tax_rate, 'total', i.total, 'amount_due', i.amount_due,
    'amount_paid', i.amount_paid, 'period_start', i.period_start, 'period_end', i.period_end,
    'issue_date', i.issue_date, 'due_date', i.due_date, 'scheduled_finalize_at', i.scheduled_finalize_at,
    'finalized_at', i.finalized_at, 'paid_at', i.paid_at, 'voided_at', i.voided_at,
    'public_token', i.public_token, 'meta_data', i.meta_data, 'created_at', i.created_at)
  || CASE WHEN with_lines THEN pg_catalog.jsonb_build_object('line_items', coalesce((
       SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('id', l.id, 'position', l.position,
                'line_type', l.line_type, 'charge_id', l.charge_id, 'description', l.description,
                'quantity', l.quantity, 'unit_amount', l.unit_amount, 'line_total', l.line_total,
                'period_start', l.period_start, 'period_end', l.period_end) ORDER BY l.position)
         FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id), '[]'::jsonb))
     ELSE '{}'::jsonb END
$$;

-- subtotal = the sum of the rounded lines (the invoice adds up); tax on the
-- unrounded subtotal, rounded once; total = subtotal + tax.
CREATE FUNCTION fluxrate_internal.recompute_totals(org_id uuid, invoice_id uuid) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  v_rate numeric;
  v_sub numeric;
  v_unrounded numeric;
  v_tax numeric;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = recompute_totals.org_id AND x.id = recompute_totals.invoice_id;
  v_rate := fluxrate_internal.tax_rate_for(i.org_id, i.customer_id);
  SELECT coalesce(sum(l.line_total), 0), coalesce(sum(coalesce(l.amount_unrounded, l.line_total)), 0)
    INTO v_sub, v_unrounded
    FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_tax := fluxrate_internal.round_money(v_unrounded * v_rate, i.currency);
  UPDATE fluxrate_internal.invoices x
     SET subtotal = v_sub, tax = v_tax, tax_rate = v_rate, total = v_sub + v_tax,
         amount_due = v_sub + v_tax - x.amount_paid, updated_at = fluxrate.now()
   WHERE x.org_id = i.org_id AND x.id = i.id;
END
$$;

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
  r record;
  v_pos integer := 0;
  v_frac numeric;
  v_amount numeric;
  v_usage numeric;
  v_sum numeric := 0;
  v_unit numeric;
  v_opening boolean;
  v_adv_start timestamptz;
  v_adv_end timestamptz;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = fill_lines.org_id AND x.id = fill_lines.invoice_id;
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = i.org_id AND x.id = i.subscription_id;
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = i.org_id AND x.id = s.plan_id;
  DELETE FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_frac := CASE WHEN i.period_start = nominal_start AND i.period_end = nominal_end THEN 1
                 ELSE extract(epoch FROM (i.period_end - i.period_start)) / extract(epoch FROM (nominal_end - nominal_start)) END;
  v_opening := i.kind = 'opening';
  IF i.kind = 'subscription' THEN
    v_adv_start := (i.meta_data->>'advance_start')::timestamptz;
    v_adv_end := (i.meta_data->>'advance_end')::timestamptz;
  END IF;
  FOR c IN
    SELECT ch.*, m.meter_name FROM fluxrate_internal.charges ch
      LEFT JOIN fluxrate_internal.meters m ON m.org_id = ch.org_id AND m.id = ch.meter_id
     WHERE ch.org_id = i.org_id AND ch.plan_id = s.plan_id AND ch.status = 'ACTIVE'
       AND (NOT v_opening OR (ch.type = 'FIXED' AND ch.billing_timing = 'in_advance'))
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
    PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
    RETURN;
  END IF;
  -- Late usage: events that reached an already finalized period of this
  -- subscription.  Per charge and past period: the usage now minus the usage
  -- billed so far (the usage line plus earlier late lines; the deltas telescope,
  -- so this is right for every aggregation), priced incrementally
  -- (rate(now) - rate(billed)) so tiers stay right.  Only what increases the
  -- amount is billed; finalized invoices never change.  The window:
  -- late_window_lines() (the last 12 finalized invoices that bill usage).
  FOR r IN
    SELECT l.charge_id, l.period_start, l.period_end,
           sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric ELSE (l.meta->>'usage_delta')::numeric END) AS billed
      FROM fluxrate_internal.late_window_lines(i.org_id, i.subscription_id, i.period_start) l
     GROUP BY l.charge_id, l.period_start, l.period_end
     ORDER BY l.period_start, l.charge_id
  LOOP
    SELECT ch.*, m.meter_name INTO c FROM fluxrate_internal.charges ch
      JOIN fluxrate_internal.meters m ON m.org_id = ch.org_id AND m.id = ch.meter_id
     WHERE ch.org_id = i.org_id AND ch.id = r.charge_id;
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

  IF p.minimum_commitment IS NOT NULL AND v_sum < p.minimum_commitment * v_frac THEN
    v_pos := v_pos + 1;
    v_amount := p.minimum_commitment * v_frac - v_sum;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end)
    VALUES (i.org_id, i.id, v_pos, 'minimum', 'Minimum commitment true-up', 1, v_amount,
            fluxrate_internal.round_money(v_amount, i.currency), v_amount, i.period_start, i.period_end);
  END IF;
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
    usage_map jsonb DEFAULT NULL, advance_start timestamptz DEFAULT NULL, advance_end timestamptz DEFAULT NULL)
  RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  v_id uuid;
  v_currency text;
  v_grace interval;
BEGIN
  SELECT p.currency INTO v_currency FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id;
  SELECT o.grace_period INTO v_grace FROM fluxrate_internal.organizations o WHERE o.org_id = s.org_id;
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
      scheduled_finalize_at, meta_data, created_at, updated_at)
  VALUES (s.org_id, create_period_invoice.kind, s.customer_id, s.id, v_currency, create_period_invoice.period_start,
          create_period_invoice.period_end,
          CASE WHEN create_period_invoice.kind = 'opening' THEN greatest(fluxrate.now(), create_period_invoice.period_start)
               ELSE fluxrate.now() END + v_grace,
          jsonb_build_object('nominal_start', create_period_invoice.nominal_start, 'nominal_end', create_period_invoice.nominal_end)
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

-- create_subscription (20_catalog.sql) inserts ACTIVE subscriptions directly:
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

-- The nominal bounds of period n of a subscription.
CREATE FUNCTION fluxrate_internal.nominal_period(s fluxrate_internal.subscriptions, OUT nominal_start timestamptz, OUT nominal_end timestamptz)
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  step interval := CASE s.billing_interval WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
    WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months' ELSE interval '1 year' END;
BEGIN
  nominal_end := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 1);
  IF s.current_period_index = 0 AND s.alignment = 'calendar' THEN
    -- the partial first calendar period prorates against the whole calendar interval it ends
    nominal_start := ((nominal_end AT TIME ZONE 'UTC') - step) AT TIME ZONE 'UTC';
  ELSE
    nominal_start := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index);
  END IF;
END
$$;

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
-- days is read from the usage rollups (40_rating.sql) and the events not yet
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
  TRUNCATE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
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
  ANALYZE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
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
-- Set-based: ending trials go one by one (once per subscription lifetime); every
-- other claimed subscription is closed by ONE statement: its usage (from the
-- run's snapshot where it covers the pair, else period_usage() once per
-- organization, for the period that ended and for the late-usage check of the
-- last 12 finalized invoices), its lines (the same as fill_lines writes:
-- charges in order, next period's in-advance fees, late usage, minimum
-- commitment), the invoice with its totals (tax on the unrounded subtotal,
-- rounded once), the lines, the outbox events with their fan-out, and the
-- subscription's advance (or end).  fill_lines stays the reference: the draft
-- is recomputed by it at finalization, and the tests compare both.
--
-- The two big statements are EXECUTEd: each batch plans them for its own rows
-- (invoices and lines grow fast during a run, and a generic plan made while
-- they were small would make each invoice cost O(invoices)).  A function-wide
-- plan_cache_mode = force_custom_plan did the same, but it also reached the
-- foreign-key checks, which then planned their query once per line: a third of
-- a batch's time.
CREATE FUNCTION fluxrate_internal.sys_close_batch(batch_size integer DEFAULT 2000, only_id uuid DEFAULT NULL) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  -- a batch of 2,000 estimates above jit_above_cost, and compiling its 266
  -- expressions took 94 ms of its 250: row-at-a-time work JIT never pays back
  SET jit = off
  AS $$
DECLARE
  s fluxrate_internal.subscriptions;
  v_batch fluxrate_internal.subscriptions[];
  v_now timestamptz := fluxrate.now();
  v_events bigint;
  v_usage jsonb;
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  PERFORM fluxrate_internal.analyze_invoices_if_outgrown();
  v_batch := ARRAY(
    SELECT x FROM fluxrate_internal.subscriptions x
     WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
       AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
       AND (only_id IS NULL OR x.id = only_id)
     ORDER BY x.current_period_end, x.org_id, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED);
  IF cardinality(v_batch) = 0 THEN
    RETURN 0;
  END IF;

  -- the trials that are over: no invoice for them, billing starts at the trial end
  FOREACH s IN ARRAY v_batch
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

  -- 1. Usage, one period_usage() call per organization: the period that ended
  -- for every (subscription, usage charge), and for the late-usage check every
  -- (charge, period) billed on the subscription's last 12 finalized invoices.
  -- period_usage()'s answers are zipped back to their keys by position (no join),
  -- into {sub: {"u": {charge: usage}, "late": [{c, ps, pe, billed, now}]}}.
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
  $sql$ INTO v_usage USING v_batch;

  -- 2. Everything else, in one statement.  Each step derives from the claimed
  -- rows (b, s) and carries what it needs forward, so no step joins two large
  -- intermediate results.
  EXECUTE $sql$
  WITH b AS MATERIALIZED (
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
           (SELECT p.currency FROM fluxrate_internal.plans p WHERE p.org_id = x.org_id AND p.id = x.plan_id) AS currency,
           (SELECT p.minimum_commitment FROM fluxrate_internal.plans p WHERE p.org_id = x.org_id AND p.id = x.plan_id) AS minimum,
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
     WHERE x.status <> 'TRIAL'
  ), sb AS MATERIALIZED (
    -- the subscriptions to invoice: how many charge lines, and the in-advance fees the
    -- period itself was charged (for the minimum commitment)
    SELECT b.*,
           (SELECT count(*) FROM fluxrate_internal.charges c
             WHERE c.org_id = b.org_id AND c.plan_id = b.plan_id AND c.status = 'ACTIVE'
               AND NOT (c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND b.ending))::integer AS n_main,
           CASE WHEN b.minimum IS NOT NULL THEN
             coalesce((SELECT sum(c.unit_price * b.frac) FROM fluxrate_internal.charges c
                        WHERE c.org_id = b.org_id AND c.plan_id = b.plan_id AND c.status = 'ACTIVE'
                          AND c.type = 'FIXED' AND c.billing_timing = 'in_advance'), 0) END AS advance_paid
      FROM b WHERE NOT b.already
  ), main AS MATERIALIZED (
    -- one line per ACTIVE charge, in charge order (fill_lines' first loop)
    SELECT y.*,
           CASE WHEN y.type = 'USAGE' THEN
                  fluxrate_internal.rate_usage(y.pricing_model, y.unit_price, y.tiers, y.package_size,
                                               y.package_price, y.free_units, y.usage)
                WHEN y.advance THEN y.unit_price
                ELSE y.unit_price * y.frac END AS amount
      FROM (SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.frac, sb.ps, sb.pe, sb.pe AS adv_start, sb.next_end AS adv_end,
                   c.id AS charge_id, c.type, c.billing_timing, c.meter_id, c.pricing_model, c.unit_price, c.tiers,
                   c.package_size, c.package_price, c.free_units,
                   (c.type = 'FIXED' AND c.billing_timing = 'in_advance') AS advance,
                   coalesce(c.display_name, CASE WHEN c.type = 'FIXED' THEN 'Fixed fee' ELSE m.meter_name END) AS name,
                   CASE WHEN c.type = 'USAGE' THEN coalesce((sb.uj->'u'->>(c.id::text))::numeric,
                     fluxrate_internal.meter_usage(sb.org_id, sb.customer_id, c.meter_id, sb.ps, sb.pe)) END AS usage,
                   row_number() OVER (PARTITION BY sb.org_id, sb.sub_id ORDER BY c.type, c.created_at, c.id)::integer AS pos
              FROM sb
              JOIN fluxrate_internal.charges c ON c.org_id = sb.org_id AND c.plan_id = sb.plan_id AND c.status = 'ACTIVE'
              LEFT JOIN fluxrate_internal.meters m ON m.org_id = c.org_id AND m.id = c.meter_id
             WHERE NOT (c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND sb.ending)) y
  ), late AS MATERIALIZED (
    -- late usage (fill_lines' second loop): only increases, priced incrementally, after the charges
    SELECT y.*, y.n_main + row_number() OVER (PARTITION BY y.org_id, y.sub_id ORDER BY y.lps, y.charge_id)::integer AS pos
      FROM (SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.n_main, c.id AS charge_id, c.meter_id,
                   coalesce(c.display_name, m.meter_name) AS name,
                   (e->>'ps')::timestamptz AS lps, (e->>'pe')::timestamptz AS lpe,
                   (e->>'billed')::numeric AS billed, (e->>'now')::numeric AS now_usage,
                   fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'now')::numeric)
                 - fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'billed')::numeric) AS amount
              FROM sb
              CROSS JOIN LATERAL jsonb_array_elements(sb.uj->'late') e
              JOIN fluxrate_internal.charges c ON c.org_id = sb.org_id AND c.id = (e->>'c')::uuid
              JOIN fluxrate_internal.meters m ON m.org_id = c.org_id AND m.id = c.meter_id) y
     WHERE y.amount > 0
  ), mins AS MATERIALIZED (
    -- the minimum commitment true-up: the period's own charges, its in-advance
    -- fees (billed before) included, the next period's excluded; after the late lines
    SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.ps, sb.pe,
           sb.minimum * sb.frac - (coalesce(ms.period_sum, 0) + sb.advance_paid) AS amount,
           sb.n_main + coalesce(nl.n, 0)::integer + 1 AS pos
      FROM sb
      LEFT JOIN (SELECT m.org_id, m.sub_id, sum(m.amount) FILTER (WHERE NOT m.advance) AS period_sum
                   FROM main m GROUP BY 1, 2) ms ON ms.org_id = sb.org_id AND ms.sub_id = sb.sub_id
      LEFT JOIN (SELECT l.org_id, l.sub_id, count(*) AS n FROM late l GROUP BY 1, 2) nl
             ON nl.org_id = sb.org_id AND nl.sub_id = sb.sub_id
     WHERE sb.minimum IS NOT NULL
       AND coalesce(ms.period_sum, 0) + sb.advance_paid < sb.minimum * sb.frac
  ), lines AS MATERIALIZED (
    SELECT l.*, fluxrate_internal.round_money(l.amount, l.currency) AS line_total
      FROM (
        SELECT m.org_id, m.sub_id, m.invoice_id, m.currency, m.pos,
               CASE m.type WHEN 'USAGE' THEN 'usage' ELSE 'fixed' END AS line_type, m.charge_id,
               m.name || CASE WHEN m.type = 'FIXED' AND NOT m.advance AND m.frac <> 1 THEN ' (prorated)' ELSE '' END AS description,
               CASE WHEN m.type = 'USAGE' THEN m.usage WHEN m.advance OR m.frac = 1 THEN 1 ELSE round(m.frac, 12) END AS quantity,
               CASE WHEN m.type = 'FIXED' OR m.pricing_model = 'per_unit' THEN m.unit_price
                    WHEN m.usage = 0 THEN 0 ELSE round(m.amount / m.usage, 12) END AS unit_amount,
               m.amount,
               CASE WHEN m.advance THEN m.adv_start ELSE m.ps END AS line_start,
               CASE WHEN m.advance THEN m.adv_end ELSE m.pe END AS line_end,
               CASE WHEN m.type = 'USAGE' THEN jsonb_build_object('meter_id', m.meter_id, 'usage', m.usage, 'pricing_model', m.pricing_model)
                    ELSE jsonb_build_object('billing_timing', m.billing_timing) END AS meta
          FROM main m
        UNION ALL
        SELECT l.org_id, l.sub_id, l.invoice_id, l.currency, l.pos, 'late_usage', l.charge_id,
               format('%s - late usage for %s to %s', l.name, to_char(l.lps AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                      to_char(l.lpe AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
               l.now_usage - l.billed, round(l.amount / (l.now_usage - l.billed), 12), l.amount, l.lps, l.lpe,
               jsonb_build_object('meter_id', l.meter_id, 'usage_delta', l.now_usage - l.billed, 'usage_now', l.now_usage,
                                  'billed_before', l.billed)
          FROM late l
        UNION ALL
        SELECT n.org_id, n.sub_id, n.invoice_id, n.currency, n.pos, 'minimum', NULL, 'Minimum commitment true-up', 1,
               n.amount, n.amount, n.ps, n.pe, '{}'::jsonb
          FROM mins n) l
  ), inv AS (
    -- an invoice with no line (in-advance fees only, last period) is not written
    INSERT INTO fluxrate_internal.invoices AS i (org_id, id, kind, customer_id, subscription_id, currency, subtotal, tax, tax_rate,
        total, amount_due, period_start, period_end, scheduled_finalize_at, meta_data, created_at, updated_at)
    SELECT sb.org_id, sb.invoice_id, 'subscription', sb.customer_id, sb.sub_id, sb.currency, t.subtotal,
           fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency), sb.tax_rate,
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           sb.ps, sb.pe, $2 + sb.grace,
           jsonb_build_object('nominal_start', sb.nominal_start, 'nominal_end', sb.nominal_end)
           || CASE WHEN sb.ending THEN '{}'::jsonb
                   ELSE jsonb_build_object('advance_start', sb.pe, 'advance_end', sb.next_end) END,
           $2, $2
      FROM sb
      JOIN (SELECT l.org_id, l.sub_id, sum(l.line_total) AS subtotal, sum(l.amount) AS unrounded
              FROM lines l GROUP BY 1, 2) t ON t.org_id = sb.org_id AND t.sub_id = sb.sub_id
    RETURNING i.org_id, i.id, i.subscription_id, i.customer_id, i.total, i.currency, i.status
  ), ins_lines AS (
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    SELECT l.org_id, l.invoice_id, l.pos, l.line_type, l.charge_id, l.description, l.quantity, l.unit_amount, l.line_total,
           l.amount, l.line_start, l.line_end, l.meta
      FROM lines l
  ), adv AS (
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
  ), ev AS MATERIALIZED (
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
  SELECT count(*) FROM dl
  $sql$ INTO v_events USING v_batch, v_now, v_usage;
  RETURN cardinality(v_batch);
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
  FOR r IN
    SELECT x.org_id, x.id, x.current_period_end, x.close_error FROM fluxrate_internal.subscriptions x
     WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
       AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
     ORDER BY x.current_period_end, x.org_id, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED
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

-- Numbers: INV-YYYY-NNNN, gapless per organization and year.  The counter row is
-- updated in the finalizing transaction: a rollback gives the number back, and
-- concurrent finalizations queue on the row.
CREATE FUNCTION fluxrate_internal.next_invoice_number(org_id uuid, at timestamptz) RETURNS text
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_year integer := extract(year FROM at AT TIME ZONE 'UTC')::integer;
  v_seq integer;
BEGIN
  INSERT INTO fluxrate_internal.invoice_counters AS c (org_id, year, last_seq)
  VALUES (next_invoice_number.org_id, v_year, 1)
  ON CONFLICT ON CONSTRAINT invoice_counters_pkey DO UPDATE SET last_seq = c.last_seq + 1
  RETURNING last_seq INTO v_seq;
  -- at least four digits; the 10,000th invoice of a year is INV-YYYY-10000 (lpad
  -- alone would cut it to a duplicate of INV-YYYY-1000)
  RETURN format('INV-%s-%s', v_year, lpad(v_seq::text, greatest(4, length(v_seq::text)), '0'));
END
$$;

-- DRAFT -> OPEN.  A subscription draft is refreshed from the events first (events
-- that arrived during the grace period count).  After this, the invoice never changes.
CREATE FUNCTION fluxrate_internal.finalize_one(org_id uuid, invoice_id uuid) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  s fluxrate_internal.subscriptions;
  v_now timestamptz := fluxrate.now();
  v_terms integer;
  v_nom_start timestamptz;
  v_nom_end timestamptz;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x
   WHERE x.org_id = finalize_one.org_id AND x.id = finalize_one.invoice_id FOR UPDATE;
  IF i.status <> 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot finalize an invoice that is %s', i.status),
      'Only DRAFT invoices are finalized.');
  END IF;
  IF i.subscription_id IS NOT NULL THEN
    -- the proration fraction was fixed at closing; keep it when refreshing
    v_nom_start := (i.meta_data->>'nominal_start')::timestamptz;
    v_nom_end := (i.meta_data->>'nominal_end')::timestamptz;
    PERFORM fluxrate_internal.fill_lines(i.org_id, i.id, coalesce(v_nom_start, i.period_start), coalesce(v_nom_end, i.period_end));
  ELSE
    PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
  END IF;
  SELECT o.payment_terms_days INTO v_terms FROM fluxrate_internal.organizations o WHERE o.org_id = i.org_id;
  UPDATE fluxrate_internal.invoices x
     SET status = 'OPEN', invoice_number = fluxrate_internal.next_invoice_number(i.org_id, v_now),
         meta_data = x.meta_data - 'finalize_error',
         issue_date = v_now, finalized_at = v_now,
         due_date = coalesce(x.due_date, v_now + make_interval(days => v_terms)),
         -- the public link the e-mail carries (regenerable: generate_invoice_token)
         public_token = coalesce(x.public_token, gen_random_uuid()),
         updated_at = v_now
   WHERE x.org_id = i.org_id AND x.id = i.id
  RETURNING * INTO i;
  PERFORM fluxrate_internal.emit_event(i.org_id, 'invoice.finalized',
    jsonb_build_object('invoice_id', i.id, 'invoice_number', i.invoice_number, 'customer_id', i.customer_id,
                       'total', i.total, 'currency', i.currency, 'status', i.status));
END
$$;

-- Finalize the DRAFTs whose grace period is over (across organizations).
CREATE FUNCTION fluxrate_internal.sys_finalize_batch(batch_size integer DEFAULT 500, isolated boolean DEFAULT false)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  -- (no plan_cache_mode = force_custom_plan here: it would reach the foreign-key
  -- checks of every line fill_lines rewrites, and plan each one; measured over
  -- 10,000 drafts, it made finalizing 2.5 times slower)
  AS $$
DECLARE
  r record;
  n integer := 0;
  v_now timestamptz := fluxrate.now();
  v_state text;
  v_msg text;
  v_attempts integer;
BEGIN
  FOR r IN
    SELECT x.org_id, x.id, x.meta_data FROM fluxrate_internal.invoices x
     WHERE x.status = 'DRAFT' AND x.scheduled_finalize_at <= v_now
     ORDER BY x.scheduled_finalize_at, x.org_id, x.period_start, x.created_at, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED
  LOOP
    PERFORM set_config('fluxrate.current_org', r.org_id::text, true);
    IF NOT isolated THEN
      PERFORM fluxrate_internal.finalize_one(r.org_id, r.id);
    ELSE
      -- after a failed batch: each invoice in a subtransaction, so that one that
      -- cannot be finalized stays DRAFT (its number is given back with the
      -- subtransaction: numbering stays gapless) and the others go out
      BEGIN
        PERFORM fluxrate_internal.finalize_one(r.org_id, r.id);
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
        IF fluxrate_internal.transient_error(v_state) THEN
          RAISE;
        END IF;
        v_attempts := coalesce((r.meta_data->'finalize_error'->>'attempts')::integer, 0) + 1;
        UPDATE fluxrate_internal.invoices x
           SET scheduled_finalize_at = v_now + fluxrate_internal.retry_delay(v_attempts),
               meta_data = x.meta_data || jsonb_build_object('finalize_error', jsonb_build_object(
                 'sqlstate', v_state, 'message', v_msg, 'at', v_now, 'attempts', v_attempts))
         WHERE x.org_id = r.org_id AND x.id = r.id;
        RAISE WARNING 'fluxrate: could not finalize invoice %', r.id
          USING DETAIL = format('%s: %s', v_state, v_msg),
                HINT = 'The other invoices were finalized; this one stays DRAFT and is retried later (meta_data.finalize_error).';
      END;
    END IF;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- ACTIVE subscriptions with an OPEN invoice past its due date become PAST_DUE.
CREATE FUNCTION fluxrate_internal.sys_mark_past_due() RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer;
BEGIN
  UPDATE fluxrate_internal.subscriptions s SET status = 'PAST_DUE'
   WHERE s.status = 'ACTIVE' AND EXISTS (
     SELECT 1 FROM fluxrate_internal.invoices i
      WHERE i.org_id = s.org_id AND i.subscription_id = s.id AND i.status = 'OPEN' AND i.due_date < fluxrate.now());
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- The jobs.  Invoker procedures (a SECURITY DEFINER procedure may not COMMIT):
-- each batch commits, so a long catch-up makes progress and a killed run loses
-- at most one batch, which the next run redoes.  Closing batches of 2,000
-- (~0.2 s each): a batch's fixed costs -- the claim, planning its two big
-- statements, the commit -- were ~15% of a run in batches of 500 (10,000
-- subscriptions: 1.26-1.35 s against 1.09-1.13 s).
CREATE PROCEDURE fluxrate.close_due_periods(batch_size integer DEFAULT 2000)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
  v_closed bigint := 0;
BEGIN
  -- the usage of the periods many subscriptions end together, in one pass each
  -- (an optimization: if it fails, the batches compute usage pair by pair)
  BEGIN
    PERFORM fluxrate_internal.sys_close_prepare();
  EXCEPTION WHEN OTHERS THEN
    IF fluxrate_internal.transient_error(SQLSTATE) THEN
      RAISE;
    END IF;
    RAISE WARNING 'fluxrate: the closing run''s usage snapshot failed; closing without it'
      USING DETAIL = format('%s: %s', SQLSTATE, SQLERRM);
  END;
  COMMIT;
  LOOP
    BEGIN
      n := fluxrate_internal.sys_close_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- a subscription of this batch cannot be closed: close them one by one.
      -- (Transient errors, a deadlock or a full disk, end the run instead: the next
      -- run retries everything, and no subscription is marked for them.)
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_close_isolated(batch_size);
    END;
    EXIT WHEN n = 0;
    v_closed := v_closed + n;
    COMMIT;
  END LOOP;
  PERFORM fluxrate_internal.sys_close_finish();
  PERFORM fluxrate_internal.sys_mark_past_due();
  IF v_closed > 0 THEN
    PERFORM fluxrate_internal.job_log('close_due_periods', format('closed %s period%s', v_closed, CASE WHEN v_closed = 1 THEN '' ELSE 's' END));
  END IF;
  COMMIT;
END
$$;

CREATE PROCEDURE fluxrate.finalize_due_invoices(batch_size integer DEFAULT 500)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
  v_done bigint := 0;
BEGIN
  LOOP
    BEGIN
      n := fluxrate_internal.sys_finalize_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- an invoice of this batch cannot be finalized: finalize them one by one
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_finalize_batch(batch_size, isolated => true);
    END;
    EXIT WHEN n = 0;
    v_done := v_done + n;
    COMMIT;
  END LOOP;
  IF v_done > 0 THEN
    PERFORM fluxrate_internal.job_log('finalize_due_invoices', format('finalized %s invoice%s', v_done, CASE WHEN v_done = 1 THEN '' ELSE 's' END));
  END IF;
END
$$;

CREATE PROCEDURE fluxrate.mark_past_due()
  LANGUAGE plpgsql
  AS $$
BEGIN
  PERFORM fluxrate_internal.sys_mark_past_due();
END
$$;

-- Invoice operations -----------------------------------------------------------

CREATE FUNCTION fluxrate_internal.load_invoice(org_id uuid, invoice_id uuid, lock boolean DEFAULT false)
  RETURNS fluxrate_internal.invoices
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
BEGIN
  PERFORM fluxrate_internal.required(load_invoice.invoice_id, 'invoice_id');
  IF lock THEN
    SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = load_invoice.org_id AND x.id = load_invoice.invoice_id FOR UPDATE;
  ELSE
    SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = load_invoice.org_id AND x.id = load_invoice.invoice_id;
  END IF;
  IF i.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'invoice not found', format('No invoice %s in this organization.', invoice_id));
  END IF;
  RETURN i;
END
$$;

CREATE FUNCTION fluxrate.get_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, get_invoice.invoice_id));
END
$$;

CREATE FUNCTION fluxrate.list_invoices(page integer DEFAULT 1, page_size integer DEFAULT 20, status text DEFAULT NULL,
    customer_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  PERFORM fluxrate_internal.one_of(upper(list_invoices.status), 'status', ARRAY['DRAFT', 'OPEN', 'PAID', 'VOID', 'UNCOLLECTIBLE']);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.created_at, i.id) FROM
       (SELECT * FROM fluxrate_internal.invoices x
         WHERE x.org_id = v_org AND (list_invoices.status IS NULL OR x.status = upper(list_invoices.status))
           AND (list_invoices.customer_id IS NULL OR x.customer_id = list_invoices.customer_id)
         ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) i),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.invoices x
      WHERE x.org_id = v_org AND (list_invoices.status IS NULL OR x.status = upper(list_invoices.status))
        AND (list_invoices.customer_id IS NULL OR x.customer_id = list_invoices.customer_id)));
END
$$;

CREATE FUNCTION fluxrate.list_customer_invoices(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = list_customer_invoices.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.created_at, i.period_start, i.id)
                   FROM fluxrate_internal.invoices i WHERE i.org_id = v_org AND i.customer_id = list_customer_invoices.customer_id), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.list_subscription_invoices(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions s WHERE s.org_id = v_org AND s.id = list_subscription_invoices.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.period_start, i.created_at, i.id)
                   FROM fluxrate_internal.invoices i
                   WHERE i.org_id = v_org AND i.subscription_id = list_subscription_invoices.subscription_id), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.finalize_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
BEGIN
  PERFORM fluxrate_internal.load_invoice(v_org, finalize_invoice.invoice_id, true);
  PERFORM fluxrate_internal.finalize_one(v_org, finalize_invoice.invoice_id);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, finalize_invoice.invoice_id));
END
$$;

-- The state machine of SPEC.md:
--   DRAFT -> OPEN (finalize) | VOID;  OPEN -> PAID | VOID | UNCOLLECTIBLE;
--   UNCOLLECTIBLE -> PAID | VOID;  PAID and VOID are final.
-- Every change keeps the note, the previous status and the time in meta_data.
CREATE FUNCTION fluxrate.update_invoice_status(invoice_id uuid DEFAULT NULL, status text DEFAULT NULL, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  v_to text := upper(update_invoice_status.status);
  i fluxrate_internal.invoices;
  v_now timestamptz := fluxrate.now();
BEGIN
  PERFORM fluxrate_internal.required(v_to, 'status');
  PERFORM fluxrate_internal.one_of(v_to, 'status', ARRAY['OPEN', 'PAID', 'VOID', 'UNCOLLECTIBLE']);
  i := fluxrate_internal.load_invoice(v_org, update_invoice_status.invoice_id, true);
  IF NOT ((i.status = 'DRAFT' AND v_to IN ('OPEN', 'VOID'))
       OR (i.status = 'OPEN' AND v_to IN ('PAID', 'VOID', 'UNCOLLECTIBLE'))
       OR (i.status = 'UNCOLLECTIBLE' AND v_to IN ('PAID', 'VOID'))) THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot change an invoice from %s to %s', i.status, v_to),
      CASE WHEN i.status IN ('PAID', 'VOID') THEN format('%s is final.', i.status)
           ELSE 'Allowed: DRAFT to OPEN or VOID; OPEN to PAID, VOID or UNCOLLECTIBLE; UNCOLLECTIBLE to PAID or VOID.' END);
  END IF;
  IF v_to = 'OPEN' THEN
    PERFORM fluxrate_internal.finalize_one(v_org, i.id);
  ELSE
    UPDATE fluxrate_internal.invoices x
       SET status = v_to,
           paid_at = CASE WHEN v_to = 'PAID' THEN v_now ELSE x.paid_at END,
           amount_paid = CASE WHEN v_to = 'PAID' THEN x.total ELSE x.amount_paid END,
           amount_due = CASE WHEN v_to IN ('PAID', 'VOID') THEN 0 ELSE x.amount_due END,
           voided_at = CASE WHEN v_to = 'VOID' THEN v_now ELSE x.voided_at END,
           updated_at = v_now
     WHERE x.org_id = v_org AND x.id = i.id;
    PERFORM fluxrate_internal.emit_event(v_org, CASE v_to WHEN 'PAID' THEN 'invoice.paid' WHEN 'VOID' THEN 'invoice.voided'
                                                ELSE 'invoice.uncollectible' END,
      jsonb_build_object('invoice_id', i.id, 'invoice_number', i.invoice_number, 'customer_id', i.customer_id,
                         'total', i.total, 'currency', i.currency, 'status', v_to));
    -- a paid invoice may bring a PAST_DUE subscription back to ACTIVE
    IF v_to IN ('PAID', 'VOID') AND i.subscription_id IS NOT NULL THEN
      UPDATE fluxrate_internal.subscriptions s SET status = 'ACTIVE'
       WHERE s.org_id = v_org AND s.id = i.subscription_id AND s.status = 'PAST_DUE'
         AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.invoices o
                          WHERE o.org_id = v_org AND o.subscription_id = s.id AND o.status = 'OPEN' AND o.due_date < v_now);
    END IF;
  END IF;
  UPDATE fluxrate_internal.invoices x
     SET meta_data = x.meta_data || jsonb_build_object('status_change_note', update_invoice_status.note,
                       'status_change_timestamp', v_now, 'previous_status', i.status)
   WHERE x.org_id = v_org AND x.id = i.id;
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, i.id));
END
$$;

CREATE FUNCTION fluxrate.pay_invoice(invoice_id uuid, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE sql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate.update_invoice_status(pay_invoice.invoice_id, 'PAID', pay_invoice.note) $$;

CREATE FUNCTION fluxrate.void_invoice(invoice_id uuid, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE sql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate.update_invoice_status(void_invoice.invoice_id, 'VOID', void_invoice.note) $$;

CREATE FUNCTION fluxrate.delete_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, delete_invoice.invoice_id, true);
BEGIN
  IF i.status <> 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot delete an invoice that is %s', i.status),
      'Only DRAFT invoices may be deleted.', 'Void it instead.');
  END IF;
  DELETE FROM fluxrate_internal.invoices x WHERE x.org_id = v_org AND x.id = i.id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', i.id, 'deleted', true);
END
$$;

-- Manual one-off invoices: lines [{description, quantity, unit_amount}].
CREATE FUNCTION fluxrate_internal.write_manual_lines(org_id uuid, invoice_id uuid, currency text, line_items jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  l jsonb;
  n integer := 0;
  q numeric;
  u numeric;
BEGIN
  IF line_items IS NULL OR jsonb_typeof(line_items) <> 'array' THEN
    PERFORM fluxrate_internal.fail('22023', 'line_items must be an array',
      NULL, 'Send [{"description": "Setup", "quantity": 1, "unit_amount": 500}].');
  END IF;
  DELETE FROM fluxrate_internal.invoice_lines x WHERE x.org_id = write_manual_lines.org_id AND x.invoice_id = write_manual_lines.invoice_id;
  FOR l IN SELECT e FROM jsonb_array_elements(line_items) e LOOP
    n := n + 1;
    IF jsonb_typeof(l) <> 'object' OR coalesce(l->>'description', '') = '' THEN
      PERFORM fluxrate_internal.fail('22004', format('line %s needs a description', n));
    END IF;
    IF jsonb_typeof(l->'quantity') IS DISTINCT FROM 'number' OR jsonb_typeof(l->'unit_amount') IS DISTINCT FROM 'number' THEN
      PERFORM fluxrate_internal.fail('22023', format('line %s needs numeric quantity and unit_amount', n));
    END IF;
    q := fluxrate_internal.check_decimal((l->>'quantity')::numeric, format('line %s quantity', n), false);
    u := (l->>'unit_amount')::numeric;
    IF scale(u) > 12 THEN
      PERFORM fluxrate_internal.fail('PT422', format('line %s unit_amount has more than 12 decimal places', n));
    END IF;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description, quantity,
        unit_amount, line_total, amount_unrounded)
    VALUES (write_manual_lines.org_id, write_manual_lines.invoice_id, n, 'manual', l->>'description', q, u,
            fluxrate_internal.round_money(q * u, currency), q * u);
  END LOOP;
  PERFORM fluxrate_internal.recompute_totals(write_manual_lines.org_id, write_manual_lines.invoice_id);
END
$$;

CREATE FUNCTION fluxrate.create_invoice(customer_id uuid DEFAULT NULL, currency text DEFAULT NULL, due_date timestamptz DEFAULT NULL,
    line_items jsonb DEFAULT '[]')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  c fluxrate_internal.customers;
  v_currency text := upper(create_invoice.currency);
  v_id uuid;
BEGIN
  PERFORM fluxrate_internal.required(create_invoice.customer_id, 'customer_id');
  PERFORM fluxrate_internal.required(v_currency, 'currency');
  PERFORM fluxrate_internal.currency_exponent(v_currency);
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = v_org AND x.id = create_invoice.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', create_invoice.customer_id));
  END IF;
  IF c.billing_address_country IS NULL THEN
    PERFORM fluxrate_internal.fail('PT422', 'customer has no billing_address_country',
      'A manual invoice needs the customer''s country (for tax).', 'Set it with update_customer.');
  END IF;
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, currency, due_date, created_at, updated_at)
  VALUES (v_org, 'manual', c.id, v_currency, create_invoice.due_date, fluxrate.now(), fluxrate.now())
  RETURNING id INTO v_id;
  PERFORM fluxrate_internal.write_manual_lines(v_org, v_id, v_currency, coalesce(create_invoice.line_items, '[]'::jsonb));
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id));
END
$$;

-- PUT /invoices/{id}: DRAFT only.
CREATE FUNCTION fluxrate.update_invoice(invoice_id uuid, due_date timestamptz DEFAULT NULL, line_items jsonb DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, update_invoice.invoice_id, true);
BEGIN
  IF i.status <> 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot edit an invoice that is %s', i.status), 'Only DRAFT invoices may be edited.');
  END IF;
  IF update_invoice.line_items IS NOT NULL AND i.kind <> 'manual' THEN
    PERFORM fluxrate_internal.fail('PT409', 'the lines of a subscription invoice come from its charges',
      'Edit the lines of manual invoices only.');
  END IF;
  UPDATE fluxrate_internal.invoices x SET due_date = coalesce(update_invoice.due_date, x.due_date), updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = i.id;
  IF update_invoice.line_items IS NOT NULL THEN
    PERFORM fluxrate_internal.write_manual_lines(v_org, i.id, i.currency, update_invoice.line_items);
  END IF;
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, i.id));
END
$$;

-- Subscriptions: preview, generate now, cancel, delete ------------------------------

-- What the current period's invoice would be now; writes nothing (a savepoint
-- computes it with the real code path and is rolled back).
CREATE FUNCTION fluxrate.preview_invoice(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  s fluxrate_internal.subscriptions;
  np record;
  v_id uuid;
  v_doc jsonb;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = preview_invoice.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status IN ('TRIAL', 'CANCELED') THEN
    RETURN jsonb_build_object('subscription_id', s.id, 'status', s.status, 'line_items', '[]'::jsonb, 'total', 0,
                              'message', format('a %s subscription has nothing to bill', lower(s.status)));
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  BEGIN
    INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
        created_at, updated_at)
    SELECT v_org, 'final', s.customer_id, s.id, p.currency, s.current_period_start, s.current_period_end, fluxrate.now(), fluxrate.now()
      FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = s.plan_id
    RETURNING id INTO v_id;
    PERFORM fluxrate_internal.fill_lines(v_org, v_id, np.nominal_start, np.nominal_end);
    v_doc := fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id))
             - 'id' - 'kind' - 'status' - 'created_at' || jsonb_build_object('preview', true, 'usage_through', fluxrate.now());
    RAISE EXCEPTION USING ERRCODE = 'P0004', MESSAGE = 'preview rollback';
  EXCEPTION WHEN assert_failure THEN
    NULL;
  END;
  RETURN v_doc;
END
$$;

-- Bill now.  If the current period has ended, close it at once (the closer would
-- have); otherwise bill the period so far [start, now) as a DRAFT, prorating fixed
-- charges, and restart the current period at now, so the regular close bills only
-- the rest and nothing is billed twice.
CREATE FUNCTION fluxrate.generate_invoice(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  s fluxrate_internal.subscriptions;
  np record;
  v_now timestamptz := fluxrate.now();
  v_id uuid;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = generate_invoice.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status NOT IN ('ACTIVE', 'PAST_DUE') THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot invoice a %s subscription', s.status),
      CASE s.status WHEN 'TRIAL' THEN 'Trials are never billed.' ELSE 'The subscription has ended.' END);
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  IF s.current_period_end <= v_now THEN
    -- what the closer would do: usage of the ended period, in-advance fees of the
    -- next one, or the end of the subscription
    v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end, np.nominal_start, np.nominal_end,
      'subscription', NULL,
      CASE WHEN NOT s.cancel_at_period_end THEN s.current_period_end END,
      CASE WHEN NOT s.cancel_at_period_end THEN
        fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 2) END);
    IF s.cancel_at_period_end THEN
      UPDATE fluxrate_internal.subscriptions x
         SET status = 'CANCELED', ended_at = s.current_period_end, last_invoiced_date = v_now,
             close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = v_org AND x.id = s.id;
      PERFORM fluxrate_internal.emit_event(v_org, 'subscription.canceled',
        jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', s.current_period_end));
    ELSE
      UPDATE fluxrate_internal.subscriptions x
         SET current_period_index = s.current_period_index + 1, current_period_start = s.current_period_end,
             current_period_end = fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 2),
             last_invoiced_date = v_now,
             -- closed here: a failed closer's retry time no longer applies (it would hold
             -- the next period's close back)
             close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = v_org AND x.id = s.id;
    END IF;
  ELSIF s.current_period_start >= v_now THEN
    PERFORM fluxrate_internal.fail('PT409', 'nothing to invoice yet', 'The current period has just started.');
  ELSE
    v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, v_now, np.nominal_start, np.nominal_end);
    UPDATE fluxrate_internal.invoices x SET meta_data = x.meta_data || jsonb_build_object('interim', true)
     WHERE x.org_id = v_org AND x.id = v_id;
    UPDATE fluxrate_internal.subscriptions x SET current_period_start = v_now, last_invoiced_date = v_now
     WHERE x.org_id = v_org AND x.id = s.id;
  END IF;
  IF v_id IS NULL THEN
    -- nothing to bill: the plan's fees were billed in advance and there is no usage charge
    RETURN jsonb_build_object('subscription_id', s.id, 'invoice', NULL,
                              'message', 'nothing to invoice: the fees of this period were billed in advance');
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id));
END
$$;

CREATE FUNCTION fluxrate.cancel_subscription(subscription_id uuid, cancel_at_period_end boolean DEFAULT false,
    reason text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  s fluxrate_internal.subscriptions;
  np record;
  v_now timestamptz := fluxrate.now();
  v_inv uuid;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = cancel_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status = 'CANCELED' THEN
    PERFORM fluxrate_internal.fail('PT409', 'subscription is already canceled');
  END IF;
  IF coalesce(cancel_subscription.cancel_at_period_end, false) THEN
    UPDATE fluxrate_internal.subscriptions x
       SET cancel_at_period_end = true, canceled_at = v_now, cancel_reason = cancel_subscription.reason
     WHERE x.org_id = v_org AND x.id = s.id RETURNING * INTO s;
  ELSE
    -- a subscription canceled before its first period starts: its opening
    -- invoice, still a draft, bills a period that will not happen
    DELETE FROM fluxrate_internal.invoices x
     WHERE x.org_id = v_org AND x.subscription_id = s.id AND x.kind = 'opening' AND x.status = 'DRAFT'
       AND x.period_start >= v_now;
    -- a final invoice prorated up to now (none for a trial: trials are never billed);
    -- in-advance fees are not on it: the period was paid ahead (no credit for the rest)
    IF s.status <> 'TRIAL' AND v_now > s.current_period_start THEN
      SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
      v_inv := fluxrate_internal.create_period_invoice(s, s.current_period_start, least(v_now, s.current_period_end),
                                                       np.nominal_start, np.nominal_end, 'final');
    END IF;
    UPDATE fluxrate_internal.subscriptions x
       SET status = 'CANCELED', canceled_at = v_now, ended_at = v_now, cancel_reason = cancel_subscription.reason,
           last_invoiced_date = CASE WHEN v_inv IS NULL THEN x.last_invoiced_date ELSE v_now END,
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = v_org AND x.id = s.id RETURNING * INTO s;
    PERFORM fluxrate_internal.emit_event(v_org, 'subscription.canceled',
      jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', v_now, 'reason', cancel_subscription.reason));
  END IF;
  RETURN fluxrate_internal.subscription_json(s) || jsonb_build_object('cancel_reason', s.cancel_reason, 'final_invoice_id', v_inv);
END
$$;

CREATE FUNCTION fluxrate.delete_subscription(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = delete_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  -- drafts go with it; finalized invoices stay (they are accounting records)
  DELETE FROM fluxrate_internal.invoices i WHERE i.org_id = v_org AND i.subscription_id = delete_subscription.subscription_id AND i.status = 'DRAFT';
  UPDATE fluxrate_internal.invoices i SET subscription_id = NULL
   WHERE i.org_id = v_org AND i.subscription_id = delete_subscription.subscription_id;
  DELETE FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = delete_subscription.subscription_id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', subscription_id, 'deleted', true);
END
$$;

-- pg_cron ---------------------------------------------------------------------------

-- Schedule the jobs every minute (pg_cron 1.4.2: minute granularity, UTC) when
-- pg_cron is installed; the jobs only call the procedures.
CREATE FUNCTION fluxrate.schedule_jobs() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_close bigint;
  v_final bigint;
  v_deliver bigint;
  v_rollups bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    PERFORM fluxrate_internal.fail('PT409', 'pg_cron is not installed',
      'fluxrate.close_due_periods() and fluxrate.finalize_due_invoices() can be called from any scheduler.',
      'CREATE EXTENSION pg_cron, with pg_cron in shared_preload_libraries.');
  END IF;
  -- refuse jobs that could not log in (55000, the setting in the hint): 90_health.sql
  PERFORM fluxrate_internal.check_cron();
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_close
    USING 'fluxrate-close-periods', '* * * * *', 'CALL fluxrate.close_due_periods()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_final
    USING 'fluxrate-finalize-invoices', '* * * * *', 'CALL fluxrate.finalize_due_invoices()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_deliver
    USING 'fluxrate-deliver', '* * * * *', 'CALL fluxrate.deliver_pending()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_rollups
    USING 'fluxrate-usage-rollups', '* * * * *', 'SELECT fluxrate.refresh_usage_rollups()';
  RETURN jsonb_build_object('close_due_periods', v_close, 'finalize_due_invoices', v_final,
                            'deliver_pending', v_deliver, 'refresh_usage_rollups', v_rollups);
END
$$;

CREATE FUNCTION fluxrate.unschedule_jobs() RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer := 0;
  j record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    RETURN 0;
  END IF;
  FOR j IN EXECUTE 'SELECT jobid FROM cron.job WHERE jobname LIKE ''fluxrate-%''' LOOP
    EXECUTE 'SELECT cron.unschedule($1)' USING j.jobid;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- the trusted application role runs the jobs (the procedures call these)
GRANT USAGE ON SCHEMA fluxrate_internal TO fluxrate_app;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_close_batch(integer, uuid), fluxrate_internal.sys_close_isolated(integer),
  fluxrate_internal.sys_finalize_batch(integer, boolean),
  fluxrate_internal.sys_close_prepare(numeric), fluxrate_internal.sys_close_finish(), fluxrate_internal.sys_close_tables(),
  fluxrate_internal.sys_mark_past_due(), fluxrate_internal.transient_error(text),
  fluxrate_internal.sys_refresh_rollups(boolean) TO fluxrate_app;
