-- 57_credit_notes.sql: credit notes against OPEN or PAID invoices and the
-- refunds they give back (issue 16, item 3; docs/ledger.md "Credit notes").
--   credit_notes, credit_note_lines, credit_note_counters, refunds   the tables
--   next_credit_note_number()       CN-YYYY-NNNN, gapless per organization and year
--   create_credit_note(), get_credit_note(), list_credit_notes(),
--   list_invoice_credit_notes(), list_customer_documents()   the API
--   (the hook of destination 'wallet', sys_credit_note_to_wallet(), is in 59_wallets.sql)

CREATE TABLE fluxrate_internal.credit_note_counters (
  org_id    uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  year      integer NOT NULL,
  last_seq  integer NOT NULL,
  PRIMARY KEY (org_id, year)
);

CREATE TABLE fluxrate_internal.credit_notes (
  org_id              uuid NOT NULL,
  id                  uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_number  text NOT NULL,            -- CN-YYYY-NNNN
  invoice_id          uuid NOT NULL,
  customer_id         uuid NOT NULL,
  currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  reason              text NOT NULL CHECK (reason IN ('duplicate', 'fraudulent', 'order_change',
                                                       'product_unsatisfactory', 'service_issue', 'other')),
  memo                text CHECK (pg_catalog.length(memo) <= 2000),
  -- where the credit goes: 'refund' = a refund record (refunds); 'wallet' = a
  -- credit grant of the customer's wallet (sys_credit_note_to_wallet, 59_wallets.sql)
  destination         text NOT NULL CHECK (destination IN ('refund', 'wallet')),
  subtotal            numeric NOT NULL CHECK (subtotal >= 0),   -- the credited amount before tax
  tax                 numeric NOT NULL CHECK (tax >= 0),
  total               numeric NOT NULL CHECK (total > 0),       -- subtotal + tax
  -- of the total: what reduced the invoice's amount due (OPEN), and what went
  -- back to the customer (refund or wallet: what had been paid)
  applied_to_due      numeric NOT NULL CHECK (applied_to_due >= 0),
  refunded            numeric NOT NULL CHECK (refunded >= 0),
  invoice_status      text NOT NULL,            -- the invoice's status when credited
  status              text NOT NULL DEFAULT 'ISSUED' CHECK (status IN ('ISSUED')),
  issued_at           timestamptz NOT NULL,
  public_token        uuid,
  meta_data           jsonb NOT NULL DEFAULT '{}',
  created_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_number),
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  CHECK (total = subtotal + tax),
  CHECK (applied_to_due + refunded = total)
);
CREATE INDEX credit_notes_invoice_idx ON fluxrate_internal.credit_notes (org_id, invoice_id);
CREATE INDEX credit_notes_customer_idx ON fluxrate_internal.credit_notes (org_id, customer_id);

CREATE TABLE fluxrate_internal.credit_note_lines (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_id   uuid NOT NULL,
  position         integer NOT NULL,
  invoice_line_id  uuid,                      -- NULL: an amount against the invoice as a whole
  description      text NOT NULL,
  amount           numeric NOT NULL CHECK (amount > 0),   -- before tax, in the minor unit
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_id, position),
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_line_id) REFERENCES fluxrate_internal.invoice_lines (org_id, id) ON DELETE CASCADE
);
CREATE INDEX credit_note_lines_invoice_line_idx ON fluxrate_internal.credit_note_lines (org_id, invoice_line_id)
  WHERE invoice_line_id IS NOT NULL;

-- A refund owed to the customer: the credit of a credit note on what had been
-- paid.  PENDING until the organization records that the money went back.
CREATE TABLE fluxrate_internal.refunds (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_id  uuid NOT NULL,
  invoice_id      uuid NOT NULL,
  customer_id     uuid NOT NULL,
  currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  amount          numeric NOT NULL CHECK (amount > 0),
  status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SUCCEEDED')),
  created_at      timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_id),
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE
);
CREATE INDEX refunds_customer_idx ON fluxrate_internal.refunds (org_id, customer_id);

-- what the invoice has been credited so far (the remaining creditable total is
-- total - credited); the credit-note e-mails' deliveries.credit_note_id is in 70_delivery.sql
ALTER TABLE fluxrate_internal.invoices ADD COLUMN amount_credited numeric NOT NULL DEFAULT 0;

-- Numbers: CN-YYYY-NNNN, gapless per organization and year, as invoice numbers
-- (53_finalize.sql): the counter row is raised in the credit note's own
-- transaction, so a rollback gives the number back and concurrent credit
-- notes queue on the row.
CREATE FUNCTION fluxrate_internal.next_credit_note_number(org_id uuid, at timestamptz) RETURNS text
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_year integer := extract(year FROM at AT TIME ZONE 'UTC')::integer;
  v_seq integer;
BEGIN
  INSERT INTO fluxrate_internal.credit_note_counters AS c (org_id, year, last_seq)
  VALUES (next_credit_note_number.org_id, v_year, 1)
  ON CONFLICT ON CONSTRAINT credit_note_counters_pkey DO UPDATE SET last_seq = c.last_seq + 1
  RETURNING last_seq INTO v_seq;
  RETURN format('CN-%s-%s', v_year, lpad(v_seq::text, greatest(4, length(v_seq::text)), '0'));
END
$$;

-- The hook of destination 'wallet', sys_credit_note_to_wallet(org_id,
-- credit_note_id), is in 59_wallets.sql (with the wallets it writes to): called
-- by create_credit_note() in its transaction, after the credit note is written.

-- The amounts a credit note may take (all before tax): per line, what is left
-- of the line after earlier credit notes; and of the invoice's subtotal.
CREATE FUNCTION fluxrate_internal.creditable(org_id uuid, invoice_id uuid,
    OUT credited_subtotal numeric, OUT credited_tax numeric)
  LANGUAGE sql STABLE
  AS $$
  SELECT coalesce(pg_catalog.sum(cn.subtotal), 0), coalesce(pg_catalog.sum(cn.tax), 0)
    FROM fluxrate_internal.credit_notes cn
   WHERE cn.org_id OPERATOR(pg_catalog.=) $1 AND cn.invoice_id OPERATOR(pg_catalog.=) $2
$$;

-- A credited amount: finite, > 0, below 10^15, in the currency's minor unit.
CREATE FUNCTION fluxrate_internal.check_credit_amount(amount numeric, currency text) RETURNS numeric
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.check_decimal(amount, 'amount', false);
  IF scale(trim_scale(amount)) > fluxrate_internal.currency_exponent(currency) THEN
    PERFORM fluxrate_internal.fail('PT422', format('amount has more decimals than %s has', currency),
      format('amount was %s; %s has %s.', amount, currency, fluxrate_internal.currency_exponent(currency)),
      'Credit notes are in the minor unit, like invoice lines.');
  END IF;
  RETURN amount;
END
$$;

-- The lines asked for, checked: [{invoice_line_id, amount}] -> (line, amount,
-- description), every amount finite, > 0, in the currency's minor unit, within
-- what is left of its line.
CREATE FUNCTION fluxrate_internal.credit_note_request_lines(i fluxrate_internal.invoices, lines jsonb)
  RETURNS TABLE (invoice_line_id uuid, amount numeric, description text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  e jsonb;
  v_line uuid;
  v_amount numeric;
  l fluxrate_internal.invoice_lines;
  v_left numeric;
  v_asked jsonb := '{}'::jsonb;   -- what this request already asked of each line
BEGIN
  IF jsonb_typeof(lines) <> 'array' OR jsonb_array_length(lines) NOT BETWEEN 1 AND 1000 THEN
    PERFORM fluxrate_internal.fail('22023', 'lines must be an array of 1 to 1000 {invoice_line_id, amount}', NULL);
  END IF;
  FOR e IN SELECT x.value FROM jsonb_array_elements(lines) x LOOP
    BEGIN
      v_line := (e->>'invoice_line_id')::uuid;
      v_amount := (e->>'amount')::numeric;
    EXCEPTION WHEN invalid_text_representation THEN
      PERFORM fluxrate_internal.fail('22P02', 'invalid credit note line', format('Line %s.', e));
    END;
    PERFORM fluxrate_internal.required(v_line, 'invoice_line_id');
    PERFORM fluxrate_internal.required(v_amount, 'amount');
    PERFORM fluxrate_internal.check_credit_amount(v_amount, i.currency);
    SELECT * INTO l FROM fluxrate_internal.invoice_lines x WHERE x.org_id = i.org_id AND x.invoice_id = i.id AND x.id = v_line;
    IF l.id IS NULL THEN
      PERFORM fluxrate_internal.fail('PT404', 'invoice line not found', format('No line %s on invoice %s.', v_line, i.id));
    END IF;
    IF l.line_total <= 0 THEN
      PERFORM fluxrate_internal.fail('PT422', 'a discount or credit line cannot be credited', format('Line %s is %s.', l.id, l.line_total));
    END IF;
    v_left := l.line_total - coalesce((SELECT sum(c.amount) FROM fluxrate_internal.credit_note_lines c
                                        WHERE c.org_id = i.org_id AND c.invoice_line_id = l.id), 0)
                           - coalesce((v_asked->>(l.id::text))::numeric, 0);
    IF v_amount > v_left THEN
      PERFORM fluxrate_internal.fail('PT422', 'a credit note line is above what is left to credit of its invoice line',
        format('Line "%s": %s asked, %s left.', l.description, v_amount, v_left));
    END IF;
    v_asked := v_asked || jsonb_build_object(l.id::text, coalesce((v_asked->>(l.id::text))::numeric, 0) + v_amount);
    invoice_line_id := l.id; amount := v_amount; description := l.description;
    RETURN NEXT;
  END LOOP;
END
$$;

CREATE FUNCTION fluxrate_internal.credit_note_json(cn fluxrate_internal.credit_notes, with_lines boolean DEFAULT true) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', cn.id, 'credit_note_number', cn.credit_note_number, 'status', cn.status,
    'invoice_id', cn.invoice_id,
    'invoice_number', (SELECT i.invoice_number FROM fluxrate_internal.invoices i
                        WHERE i.org_id OPERATOR(pg_catalog.=) cn.org_id AND i.id OPERATOR(pg_catalog.=) cn.invoice_id),
    'customer_id', cn.customer_id, 'currency', cn.currency, 'reason', cn.reason, 'memo', cn.memo,
    'destination', cn.destination, 'subtotal', cn.subtotal, 'tax', cn.tax, 'total', cn.total,
    'applied_to_due', cn.applied_to_due, 'refunded', cn.refunded, 'invoice_status', cn.invoice_status,
    'issued_at', cn.issued_at, 'created_at', cn.created_at,
    'refund', (SELECT pg_catalog.jsonb_build_object('id', r.id, 'amount', r.amount, 'status', r.status)
                 FROM fluxrate_internal.refunds r
                WHERE r.org_id OPERATOR(pg_catalog.=) cn.org_id AND r.credit_note_id OPERATOR(pg_catalog.=) cn.id))
  || CASE WHEN with_lines THEN pg_catalog.jsonb_build_object('lines', coalesce((
       SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('position', l.position, 'invoice_line_id', l.invoice_line_id,
                'description', l.description, 'amount', l.amount) ORDER BY l.position)
         FROM fluxrate_internal.credit_note_lines l
        WHERE l.org_id OPERATOR(pg_catalog.=) cn.org_id AND l.credit_note_id OPERATOR(pg_catalog.=) cn.id), '[]'::jsonb))
     ELSE '{}'::jsonb END
$$;

-- A credit note against an OPEN or PAID invoice: lines ([{invoice_line_id,
-- amount}]), or an amount against the invoice as a whole, or neither: all that
-- is left.  Amounts are before tax; the tax is the invoice's rate on them,
-- rounded once (the last credit note takes exactly the tax that is left, so a
-- fully credited invoice is credited its total to the cent).  Never more than
-- is left to credit.  The credit first lowers an OPEN invoice's amount due; an
-- OPEN invoice credited to zero due is settled: PAID (meta_data.settled_by =
-- 'credit_note', amount_paid unchanged).  What had been paid goes back to the
-- customer: a refund record (destination 'refund'), or the wallet hook
-- (destination 'wallet', sys_credit_note_to_wallet, 59_wallets.sql: a grant).
CREATE FUNCTION fluxrate.create_credit_note(invoice_id uuid DEFAULT NULL, reason text DEFAULT NULL, lines jsonb DEFAULT NULL,
    amount numeric DEFAULT NULL, memo text DEFAULT NULL, destination text DEFAULT 'refund')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  v_now timestamptz := fluxrate.now();
  v_dest text := lower(coalesce(create_credit_note.destination, 'refund'));
  i fluxrate_internal.invoices;
  c record;
  v_sub numeric;
  v_tax numeric;
  v_due numeric;
  v_lines jsonb;
  cn fluxrate_internal.credit_notes;
BEGIN
  PERFORM fluxrate_internal.required(create_credit_note.reason, 'reason');
  PERFORM fluxrate_internal.one_of(lower(create_credit_note.reason), 'reason',
    ARRAY['duplicate', 'fraudulent', 'order_change', 'product_unsatisfactory', 'service_issue', 'other']);
  PERFORM fluxrate_internal.one_of(v_dest, 'destination', ARRAY['refund', 'wallet']);
  IF create_credit_note.lines IS NOT NULL AND create_credit_note.amount IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('22023', 'send lines or an amount, not both', 'Neither credits all that is left.');
  END IF;
  i := fluxrate_internal.load_invoice(v_org, create_credit_note.invoice_id, true);
  IF i.status NOT IN ('OPEN', 'PAID') THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot credit an invoice that is %s', i.status),
      'Credit notes are issued against OPEN or PAID invoices; a DRAFT is edited or deleted, a VOID owes nothing.');
  END IF;
  c := fluxrate_internal.creditable(v_org, i.id);
  IF i.subtotal - c.credited_subtotal + i.tax - c.credited_tax <= 0 THEN
    PERFORM fluxrate_internal.fail('PT409', 'the invoice is fully credited', format('Invoice %s has nothing left to credit.', i.invoice_number));
  END IF;
  IF create_credit_note.lines IS NOT NULL THEN
    SELECT jsonb_agg(jsonb_build_object('l', r.invoice_line_id, 'a', r.amount, 'd', r.description)), sum(r.amount)
      INTO v_lines, v_sub
      FROM fluxrate_internal.credit_note_request_lines(i, create_credit_note.lines) r;
  ELSE
    v_sub := coalesce(fluxrate_internal.check_credit_amount(create_credit_note.amount, i.currency), i.subtotal - c.credited_subtotal);
    v_lines := jsonb_build_array(jsonb_build_object('l', NULL, 'a', v_sub, 'd', format(CASE WHEN create_credit_note.amount IS NULL
      THEN 'Credit of invoice %s' ELSE 'Credit against invoice %s' END, i.invoice_number)));
  END IF;
  -- (in the minor unit already: checked; rounding only sets the scale, 300 -> 300.00)
  v_sub := fluxrate_internal.round_money(v_sub, i.currency);
  IF v_sub > i.subtotal - c.credited_subtotal THEN
    PERFORM fluxrate_internal.fail('PT422', 'the credit note is above the invoice''s creditable amount',
      format('%s %s asked before tax; %s left of invoice %s.', v_sub, i.currency, i.subtotal - c.credited_subtotal, i.invoice_number),
      'Earlier credit notes and the invoice''s discounts count.');
  END IF;
  v_tax := CASE WHEN v_sub = i.subtotal - c.credited_subtotal THEN i.tax - c.credited_tax
                ELSE least(fluxrate_internal.round_money(v_sub * coalesce(i.tax_rate, 0), i.currency), i.tax - c.credited_tax) END;
  IF v_sub + v_tax <= 0 THEN
    PERFORM fluxrate_internal.fail('PT422', 'a credit note credits more than zero', NULL);
  END IF;
  v_due := fluxrate_internal.round_money(CASE WHEN i.status = 'OPEN' THEN least(v_sub + v_tax, i.amount_due) ELSE 0 END, i.currency);
  INSERT INTO fluxrate_internal.credit_notes (org_id, credit_note_number, invoice_id, customer_id, currency, reason, memo,
      destination, subtotal, tax, total, applied_to_due, refunded, invoice_status, issued_at, public_token, created_at)
  VALUES (v_org, fluxrate_internal.next_credit_note_number(v_org, v_now), i.id, i.customer_id, i.currency,
          lower(create_credit_note.reason), create_credit_note.memo, v_dest, v_sub, v_tax, v_sub + v_tax, v_due,
          v_sub + v_tax - v_due, i.status, v_now, gen_random_uuid(), v_now)
  RETURNING * INTO cn;
  INSERT INTO fluxrate_internal.credit_note_lines (org_id, credit_note_id, position, invoice_line_id, description, amount)
  SELECT v_org, cn.id, e.n, (e.x->>'l')::uuid, e.x->>'d', fluxrate_internal.round_money((e.x->>'a')::numeric, i.currency)
    FROM jsonb_array_elements(v_lines) WITH ORDINALITY e(x, n);
  PERFORM fluxrate_internal.settle_credited_invoice(i, cn);
  PERFORM fluxrate_internal.emit_event(v_org, 'credit_note.created', jsonb_build_object('credit_note_id', cn.id,
    'credit_note_number', cn.credit_note_number, 'invoice_id', i.id, 'invoice_number', i.invoice_number,
    'customer_id', cn.customer_id, 'total', cn.total, 'currency', cn.currency, 'destination', cn.destination,
    'refunded', cn.refunded));
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.credit_note_json(cn);
END
$$;

-- The invoice side of a new credit note: amount_credited, amount due, the
-- settlement of an OPEN invoice credited to zero due (PAID; a PAST_DUE
-- subscription with no other overdue invoice is ACTIVE again), and where the
-- paid part goes: a refund record, or the wallet hook.
CREATE FUNCTION fluxrate_internal.settle_credited_invoice(i fluxrate_internal.invoices, cn fluxrate_internal.credit_notes) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_settled boolean := i.status = 'OPEN' AND i.amount_due - cn.applied_to_due = 0;
BEGIN
  UPDATE fluxrate_internal.invoices x
     SET amount_credited = x.amount_credited + cn.total, amount_due = x.amount_due - cn.applied_to_due,
         status = CASE WHEN v_settled THEN 'PAID' ELSE x.status END,
         paid_at = CASE WHEN v_settled THEN v_now ELSE x.paid_at END,
         meta_data = CASE WHEN v_settled THEN x.meta_data || jsonb_build_object('settled_by', 'credit_note',
                       'previous_status', x.status, 'status_change_timestamp', v_now) ELSE x.meta_data END,
         updated_at = v_now
   WHERE x.org_id = i.org_id AND x.id = i.id;
  IF v_settled THEN
    PERFORM fluxrate_internal.emit_event(i.org_id, 'invoice.paid', jsonb_build_object('invoice_id', i.id,
      'invoice_number', i.invoice_number, 'customer_id', i.customer_id, 'total', i.total, 'currency', i.currency,
      'status', 'PAID', 'settled_by', 'credit_note', 'credit_note_id', cn.id));
    IF i.subscription_id IS NOT NULL THEN
      UPDATE fluxrate_internal.subscriptions s SET status = 'ACTIVE'
       WHERE s.org_id = i.org_id AND s.id = i.subscription_id AND s.status = 'PAST_DUE'
         AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.invoices o
                          WHERE o.org_id = i.org_id AND o.subscription_id = s.id AND o.status = 'OPEN' AND o.due_date < v_now);
    END IF;
  END IF;
  IF cn.refunded > 0 AND cn.destination = 'refund' THEN
    INSERT INTO fluxrate_internal.refunds (org_id, credit_note_id, invoice_id, customer_id, currency, amount, created_at)
    VALUES (i.org_id, cn.id, i.id, i.customer_id, cn.currency, cn.refunded, v_now);
  ELSIF cn.destination = 'wallet' THEN
    PERFORM fluxrate_internal.sys_credit_note_to_wallet(i.org_id, cn.id);
  END IF;
END
$$;

CREATE FUNCTION fluxrate.get_credit_note(credit_note_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  cn fluxrate_internal.credit_notes;
BEGIN
  PERFORM fluxrate_internal.required(get_credit_note.credit_note_id, 'credit_note_id');
  SELECT * INTO cn FROM fluxrate_internal.credit_notes x WHERE x.org_id = v_org AND x.id = get_credit_note.credit_note_id;
  IF cn.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'credit note not found', format('No credit note %s in this organization.', credit_note_id));
  END IF;
  RETURN fluxrate_internal.credit_note_json(cn);
END
$$;

CREATE FUNCTION fluxrate.list_credit_notes(page integer DEFAULT 1, page_size integer DEFAULT 20, invoice_id uuid DEFAULT NULL,
    customer_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.credit_note_json(cn, false) ORDER BY cn.issued_at, cn.credit_note_number)
       FROM (SELECT * FROM fluxrate_internal.credit_notes x
              WHERE x.org_id = v_org AND (list_credit_notes.invoice_id IS NULL OR x.invoice_id = list_credit_notes.invoice_id)
                AND (list_credit_notes.customer_id IS NULL OR x.customer_id = list_credit_notes.customer_id)
              ORDER BY x.issued_at, x.credit_note_number LIMIT page_size OFFSET (page - 1) * page_size) cn),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.credit_notes x
      WHERE x.org_id = v_org AND (list_credit_notes.invoice_id IS NULL OR x.invoice_id = list_credit_notes.invoice_id)
        AND (list_credit_notes.customer_id IS NULL OR x.customer_id = list_credit_notes.customer_id)));
END
$$;

-- The customer's history: invoices and credit notes, oldest first, each with
-- its document_type.
CREATE FUNCTION fluxrate.list_customer_documents(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = list_customer_documents.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(d.doc ORDER BY d.at, d.k, d.num, d.id) FROM (
      SELECT i.created_at AS at, 1 AS k, coalesce(i.invoice_number, '') AS num, i.id, jsonb_build_object('document_type', 'invoice')
             || fluxrate_internal.invoice_json(i, false) || jsonb_build_object('amount_credited', i.amount_credited) AS doc
        FROM fluxrate_internal.invoices i WHERE i.org_id = v_org AND i.customer_id = list_customer_documents.customer_id
      UNION ALL
      SELECT cn.issued_at, 2, cn.credit_note_number, cn.id, jsonb_build_object('document_type', 'credit_note') || fluxrate_internal.credit_note_json(cn, false)
        FROM fluxrate_internal.credit_notes cn WHERE cn.org_id = v_org AND cn.customer_id = list_customer_documents.customer_id) d),
    '[]'::jsonb);
END
$$;

-- Refunds: what credit notes owe back, and the organization's record that the
-- money went back (PENDING -> SUCCEEDED).
CREATE FUNCTION fluxrate.list_refunds(customer_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN coalesce((SELECT jsonb_agg(jsonb_build_object('id', r.id, 'credit_note_id', r.credit_note_id,
                     'credit_note_number', cn.credit_note_number, 'invoice_id', r.invoice_id, 'customer_id', r.customer_id,
                     'currency', r.currency, 'amount', r.amount, 'status', r.status, 'created_at', r.created_at)
                     ORDER BY r.created_at, cn.credit_note_number)
                     FROM fluxrate_internal.refunds r
                     JOIN fluxrate_internal.credit_notes cn ON cn.org_id = r.org_id AND cn.id = r.credit_note_id
                    WHERE r.org_id = v_org AND (list_refunds.customer_id IS NULL OR r.customer_id = list_refunds.customer_id)), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.complete_refund(refund_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  r fluxrate_internal.refunds;
BEGIN
  PERFORM fluxrate_internal.required(complete_refund.refund_id, 'refund_id');
  UPDATE fluxrate_internal.refunds x SET status = 'SUCCEEDED'
   WHERE x.org_id = v_org AND x.id = complete_refund.refund_id AND x.status = 'PENDING'
  RETURNING * INTO r;
  IF r.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'pending refund not found', format('No pending refund %s in this organization.', refund_id));
  END IF;
  RETURN jsonb_build_object('id', r.id, 'amount', r.amount, 'currency', r.currency, 'status', r.status);
END
$$;

-- E-mail ------------------------------------------------------------------------

-- The credit note's e-mail delivery (fan_out(), for credit_note.created): like
-- an invoice's, queued when the organization has SMTP and the customer an
-- address, else a SKIPPED row with the reason (automatic e-mails turned off: nothing).
CREATE FUNCTION fluxrate_internal.enqueue_credit_note_email(org_id uuid, credit_note_id uuid, event_id uuid, at timestamptz)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_auto boolean;
  v_email text;
  v_invoice uuid;
  v_reason text;
BEGIN
  SELECT o.auto_email INTO v_auto FROM fluxrate_internal.organizations o WHERE o.org_id = enqueue_credit_note_email.org_id;
  SELECT cn.invoice_id, c.email INTO v_invoice, v_email
    FROM fluxrate_internal.credit_notes cn JOIN fluxrate_internal.customers c ON c.org_id = cn.org_id AND c.id = cn.customer_id
   WHERE cn.org_id = enqueue_credit_note_email.org_id AND cn.id = enqueue_credit_note_email.credit_note_id;
  IF NOT v_auto THEN
    RETURN;
  END IF;
  v_reason := CASE WHEN NOT EXISTS (SELECT 1 FROM fluxrate_internal.smtp_settings s WHERE s.org_id = enqueue_credit_note_email.org_id)
                   THEN 'smtp is not configured'
                   WHEN v_email IS NULL OR btrim(v_email) = '' THEN 'the customer has no e-mail address' END;
  INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, invoice_id, credit_note_id, recipient,
      status, last_error, next_attempt_at, created_at, updated_at)
  VALUES (enqueue_credit_note_email.org_id, fluxrate_internal.uuid_v7(), event_id, 'credit_note.email', 'email', v_invoice,
          enqueue_credit_note_email.credit_note_id, coalesce(v_email, ''), CASE WHEN v_reason IS NULL THEN 'PENDING' ELSE 'SKIPPED' END,
          v_reason, CASE WHEN v_reason IS NULL THEN at END, at, at);
END
$$;

-- The credit note as text (the e-mail's body).
CREATE FUNCTION fluxrate_internal.render_credit_note_text(org_id uuid, credit_note_id uuid) RETURNS text
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  cn fluxrate_internal.credit_notes;
  v_inv text;
  v_lines text;
BEGIN
  SELECT * INTO cn FROM fluxrate_internal.credit_notes x WHERE x.org_id = render_credit_note_text.org_id AND x.id = render_credit_note_text.credit_note_id;
  SELECT i.invoice_number INTO v_inv FROM fluxrate_internal.invoices i WHERE i.org_id = cn.org_id AND i.id = cn.invoice_id;
  SELECT string_agg(format('  %s  %s', rpad(l.description, 40), fluxrate_internal.money_text(l.amount, cn.currency)), E'\n' ORDER BY l.position)
    INTO v_lines FROM fluxrate_internal.credit_note_lines l WHERE l.org_id = cn.org_id AND l.credit_note_id = cn.id;
  RETURN concat_ws(E'\n',
    format('Credit note %s for invoice %s', cn.credit_note_number, v_inv),
    format('Issued: %s    Reason: %s', to_char(cn.issued_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), replace(cn.reason, '_', ' ')),
    '', v_lines, '',
    format('  %s  %s', rpad('Subtotal', 40), fluxrate_internal.money_text(cn.subtotal, cn.currency)),
    format('  %s  %s', rpad('Tax', 40), fluxrate_internal.money_text(cn.tax, cn.currency)),
    format('  %s  %s', rpad('Total credited', 40), fluxrate_internal.money_text(cn.total, cn.currency)),
    CASE WHEN cn.applied_to_due > 0 THEN format('  %s  %s', rpad('Taken off the amount due', 40), fluxrate_internal.money_text(cn.applied_to_due, cn.currency)) END,
    CASE WHEN cn.refunded > 0 THEN format('  %s  %s', rpad(CASE cn.destination WHEN 'refund' THEN 'Refunded to you' ELSE 'Added to your credit' END, 40),
                                          fluxrate_internal.money_text(cn.refunded, cn.currency)) END,
    CASE WHEN cn.memo IS NOT NULL THEN E'\n' || cn.memo END) || E'\n';
END
$$;

-- The credit note e-mail, a text/plain message (sys_deliver_start sends it for
-- deliveries with a credit_note_id).
CREATE FUNCTION fluxrate_internal.credit_note_email(org_id uuid, credit_note_id uuid, delivery_id uuid, recipient text,
    OUT subject text, OUT message text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  cn fluxrate_internal.credit_notes;
  o fluxrate_internal.organizations;
  c fluxrate_internal.customers;
  s fluxrate_internal.smtp_settings;
  v_from text;
BEGIN
  SELECT * INTO cn FROM fluxrate_internal.credit_notes x WHERE x.org_id = credit_note_email.org_id AND x.id = credit_note_email.credit_note_id;
  SELECT * INTO o FROM fluxrate_internal.organizations x WHERE x.org_id = cn.org_id;
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = cn.org_id AND x.id = cn.customer_id;
  SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = cn.org_id;
  subject := format('Credit note %s from %s', cn.credit_note_number, o.name);
  v_from := '"' || replace(replace(coalesce(s.from_name, o.name), '\', '\\'), '"', '\"') || '" <' || s.from_email || '>';
  message := concat_ws(E'\n',
    'From: ' || CASE WHEN coalesce(s.from_name, o.name) ~ '^[ -~]*$' THEN v_from
                     ELSE fluxrate_internal.mime_header(coalesce(s.from_name, o.name)) || ' <' || s.from_email || '>' END,
    'To: <' || recipient || '>',
    'Subject: ' || fluxrate_internal.mime_header(subject),
    'Date: ' || to_char(fluxrate.now() AT TIME ZONE 'UTC', 'Dy, DD Mon YYYY HH24:MI:SS') || ' +0000',
    'Message-ID: <' || delivery_id || '@fluxrate.invalid>',
    'X-Fluxrate-Credit-Note-Id: ' || cn.id,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    encode(convert_to(format('Hello %s,', c.name) || E'\n\n'
                      || fluxrate_internal.render_credit_note_text(cn.org_id, cn.id) || E'\n-- \n' || o.name, 'UTF8'), 'base64'),
    '');
  message := replace(message, E'\n', E'\r\n');
END
$$;
