-- 51_taxes.sql: taxes and an invoice's totals.
--   invoice_lines.amount_unrounded   each line's unrounded amount (tax is computed
--                                    on the unrounded subtotal)
--   tax_rate_for()                   the customer's rate
--   set_tax_rate(), list_tax_rates(), delete_tax_rate()   the API
--   recompute_totals()               subtotal, tax (rounded once), total, amount due
-- The set-based closer (52_close.sql) computes the same totals inline.

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
  PERFORM fluxrate_internal.check_magnitude(set_tax_rate.rate, 'rate');
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
  -- a top-up invoice sells credits, which are taxed on the invoices they pay
  v_rate := CASE WHEN i.kind = 'top_up' THEN 0 ELSE fluxrate_internal.tax_rate_for(i.org_id, i.customer_id) END;
  SELECT coalesce(sum(l.line_total), 0), coalesce(sum(coalesce(l.amount_unrounded, l.line_total)), 0)
    INTO v_sub, v_unrounded
    FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_tax := fluxrate_internal.round_money(v_unrounded * v_rate, i.currency);
  UPDATE fluxrate_internal.invoices x
     SET subtotal = v_sub, tax = v_tax, tax_rate = v_rate, total = v_sub + v_tax,
         amount_due = v_sub + v_tax - x.credits_applied - x.amount_paid, updated_at = fluxrate.now()
   WHERE x.org_id = i.org_id AND x.id = i.id;
END
$$;
