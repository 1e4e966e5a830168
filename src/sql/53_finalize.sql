-- 53_finalize.sql: DRAFT -> OPEN after the grace period, numbering, past due.
--   next_invoice_number()   INV-YYYY-NNNN, gapless per organization and year
--   finalize_one()          recompute a draft from the events, number it, open it
--   sys_finalize_batch()    the due drafts across organizations
--   sys_mark_past_due()     ACTIVE subscriptions with an overdue OPEN invoice
-- The jobs that drive them (finalize_due_invoices, mark_past_due) are in 58_jobs.sql.

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
  -- prepaid credits pay what is due, after tax (59_wallets.sql, docs/ledger.md)
  PERFORM fluxrate_internal.wallet_apply(i.org_id, i.id);
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
  -- paid in full by credits: nothing is left to collect, so it is PAID now (an
  -- OPEN invoice of nothing due would go past due)
  IF i.credits_applied > 0 AND i.amount_due = 0 THEN
    UPDATE fluxrate_internal.invoices x SET status = 'PAID', paid_at = v_now, updated_at = v_now
     WHERE x.org_id = i.org_id AND x.id = i.id;
    PERFORM fluxrate_internal.emit_event(i.org_id, 'invoice.paid',
      jsonb_build_object('invoice_id', i.id, 'invoice_number', i.invoice_number, 'customer_id', i.customer_id,
                         'total', i.total, 'currency', i.currency, 'status', 'PAID'));
  END IF;
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
  v_orgs uuid[];
  v_ids uuid[];
  v_metas jsonb[];
BEGIN
  SELECT coalesce(array_agg(c.org_id ORDER BY c.k), '{}'), coalesce(array_agg(c.id ORDER BY c.k), '{}'),
         coalesce(array_agg(c.meta_data ORDER BY c.k), '{}')
    INTO v_orgs, v_ids, v_metas
    FROM (SELECT x.org_id, x.id, x.meta_data,
                 row_number() OVER (ORDER BY x.scheduled_finalize_at, x.org_id, x.period_start, x.created_at, x.id) AS k
            FROM (SELECT x.* FROM fluxrate_internal.invoices x
                   WHERE x.status = 'DRAFT' AND x.scheduled_finalize_at <= v_now
                   ORDER BY x.scheduled_finalize_at, x.org_id, x.period_start, x.created_at, x.id
                   LIMIT batch_size
                   FOR UPDATE SKIP LOCKED) x) c;
  -- The rows two batches may share -- a customer's fixed-amount coupon
  -- redemptions (the draft's refresh, 56_discounts.sql) and credit grants
  -- (wallet_apply, 59_wallets.sql) -- are locked here, all at once and in key
  -- order, before the batch's first invoice number: taken invoice by invoice,
  -- a batch holding the organization's counter (numbering) could wait for a
  -- redemption the other batch holds while that one waits for the counter.
  PERFORM 1 FROM fluxrate_internal.coupon_redemptions rd
    JOIN fluxrate_internal.coupons k ON k.org_id = rd.org_id AND k.id = rd.coupon_id AND k.discount_type = 'fixed'
    JOIN fluxrate_internal.invoices i ON i.org_id = rd.org_id
         AND (rd.subscription_id = i.subscription_id OR (rd.subscription_id IS NULL AND rd.customer_id = i.customer_id))
    JOIN unnest(v_orgs, v_ids) b(org_id, id) ON b.org_id = i.org_id AND b.id = i.id
   WHERE rd.status = 'ACTIVE'
   ORDER BY rd.org_id, rd.id
     FOR UPDATE OF rd;
  PERFORM 1 FROM fluxrate_internal.credit_grants g
    JOIN fluxrate_internal.invoices i ON i.org_id = g.org_id AND i.customer_id = g.customer_id AND i.currency = g.currency
    JOIN unnest(v_orgs, v_ids) b(org_id, id) ON b.org_id = i.org_id AND b.id = i.id
   WHERE g.status = 'ACTIVE'
   -- (per customer, wallet_apply's own spending order: a finalize_invoice
   -- beside the batch takes a subset of these rows in the same order)
   ORDER BY g.org_id, g.customer_id, g.currency, g.priority, g.expires_at NULLS LAST, g.created_at, g.id
     FOR UPDATE OF g;
  FOR r IN
    SELECT b.org_id, b.id, b.meta_data FROM unnest(v_orgs, v_ids, v_metas) WITH ORDINALITY b(org_id, id, meta_data, k)
     ORDER BY b.k
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
