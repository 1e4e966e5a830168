-- 55_subscriptions.sql: billing operations on one subscription.
--   preview_invoice()       the current period's invoice as it would be now
--   generate_invoice()      bill now
--   cancel_subscription(), delete_subscription()
-- (Creating and reading subscriptions is in 22_subscriptions.sql.)

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
    -- next one, or the end of the subscription, or a scheduled plan change
    -- (close_ended_period, 55_plan_changes.sql)
    v_id := fluxrate_internal.close_ended_period(s);
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
  -- a plan change scheduled for the period end will not happen: canceling wins
  UPDATE fluxrate_internal.subscription_changes c SET status = 'CANCELED', canceled_at = v_now
   WHERE c.org_id = v_org AND c.subscription_id = s.id AND c.status = 'SCHEDULED';
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
