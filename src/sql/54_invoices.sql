-- 54_invoices.sql: invoice operations of the API.
--   invoice_json()          the invoice document every API function returns
--   load_invoice(), get_invoice(), list_invoices(), list_customer_invoices(),
--   list_subscription_invoices()                              reading
--   finalize_invoice(), update_invoice_status(), pay_invoice(), void_invoice(),
--   delete_invoice()                                          state changes
--   write_manual_lines(), create_invoice(), update_invoice()  manual invoices

-- Invoice documents ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.invoice_json(i fluxrate_internal.invoices, with_lines boolean DEFAULT true) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', i.id, 'invoice_number', i.invoice_number, 'status', i.status,
    'kind', i.kind, 'customer_id', i.customer_id, 'subscription_id', i.subscription_id, 'currency', i.currency,
    'subtotal', i.subtotal, 'tax', i.tax, 'tax_rate', i.tax_rate, 'total', i.total, 'credits_applied', i.credits_applied,
    'amount_due', i.amount_due, 'amount_paid', i.amount_paid, 'period_start', i.period_start, 'period_end', i.period_end,
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

-- json, not jsonb: the keys in a logical order, with the customer's name (75_render.sql)
CREATE FUNCTION fluxrate.get_invoice(invoice_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN fluxrate_internal.invoice_document(v_org, get_invoice.invoice_id);
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
           -- what is paid in money: what was due (the total less the credits applied
           -- at finalization and what credit notes took off)
           amount_paid = CASE WHEN v_to = 'PAID' THEN x.amount_paid + x.amount_due ELSE x.amount_paid END,
           amount_due = CASE WHEN v_to IN ('PAID', 'VOID') THEN 0 ELSE x.amount_due END,
           voided_at = CASE WHEN v_to = 'VOID' THEN v_now ELSE x.voided_at END,
           updated_at = v_now
     WHERE x.org_id = v_org AND x.id = i.id;
    PERFORM fluxrate_internal.emit_event(v_org, CASE v_to WHEN 'PAID' THEN 'invoice.paid' WHEN 'VOID' THEN 'invoice.voided'
                                                ELSE 'invoice.uncollectible' END,
      jsonb_build_object('invoice_id', i.id, 'invoice_number', i.invoice_number, 'customer_id', i.customer_id,
                         'total', i.total, 'currency', i.currency, 'status', v_to));
    -- credits: a top-up invoice's grant, a voided invoice's credits back (59_wallets.sql)
    IF v_to IN ('PAID', 'VOID') THEN
      PERFORM fluxrate_internal.wallet_on_invoice_status(v_org, i.id, v_to);
    END IF;
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
  IF jsonb_array_length(line_items) > 1000 THEN
    PERFORM fluxrate_internal.fail('PT422', 'an invoice has at most 1000 manual lines',
      format('%s lines were sent.', jsonb_array_length(line_items)));
  END IF;
  FOR l IN SELECT e FROM jsonb_array_elements(line_items) e LOOP
    n := n + 1;
    IF jsonb_typeof(l) <> 'object' OR coalesce(l->>'description', '') = '' THEN
      PERFORM fluxrate_internal.fail('22004', format('line %s needs a description', n));
    END IF;
    IF jsonb_typeof(l->'quantity') IS DISTINCT FROM 'number' OR jsonb_typeof(l->'unit_amount') IS DISTINCT FROM 'number' THEN
      PERFORM fluxrate_internal.fail('22023', format('line %s needs numeric quantity and unit_amount', n));
    END IF;
    q := fluxrate_internal.check_decimal((l->>'quantity')::numeric, format('line %s quantity', n), false);
    -- finite, below 10^15, 12 decimal places; negative allowed (a credit)
    u := fluxrate_internal.check_magnitude((l->>'unit_amount')::numeric, format('line %s unit_amount', n));
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
