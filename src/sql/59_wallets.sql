-- 59_wallets.sql: prepaid credits (issue 16, item 2; docs/ledger.md).
--   credit_grants, credit_transactions, wallet_alerts      the tables
--   create_credit_grant(), list_credit_grants()            granting (a top-up may be paid by an invoice)
--   wallet_apply()          finalization consumes credits (53_finalize.sql calls it)
--   wallet_reverse()        a voided invoice gives its credits back
--   wallet_on_invoice_status()   top-up invoice PAID -> grant effective; VOID -> grant voided
--   sys_expire_grants()     the minute job records every expired remainder (58_jobs.sql)
--   unbilled_totals(), credit_balance(), get_credit_balance()   the live burn-down balance
--   set_credit_alert(), wallet_alert_check(), sys_wallet_alerts()  low-balance webhook, once per crossing
--   sys_credit_note_to_wallet()   a credit note refunded to the wallet (57_credit_notes.sql calls it)
--
-- Credits are payment-like: they apply to an invoice's total after tax (the tax
-- is owed on the supply however it is paid), at finalization, in the order
-- priority (lower first), expiry (soonest first, never-expiring last), creation.
-- A grant is usable on [effective_at, expires_at); what is left at expires_at is
-- recorded as expired by the job, at that instant, never dropped.

-- The grants.  remaining is what is left to spend; the movements that explain it
-- are credit_transactions (the ledger reads both).
CREATE TABLE fluxrate_internal.credit_grants (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  customer_id     uuid NOT NULL,
  currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  amount          numeric NOT NULL CHECK (amount > 0),
  remaining       numeric NOT NULL,
  grant_type      text NOT NULL CHECK (grant_type IN ('paid', 'promotional')),
  priority        integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
  effective_at    timestamptz NOT NULL,
  expires_at      timestamptz,
  -- PENDING: a top-up waiting for its invoice to be PAID
  status          text NOT NULL CHECK (status IN ('PENDING', 'ACTIVE', 'EXPIRED', 'VOIDED')),
  source          text NOT NULL DEFAULT 'manual' CHECK (source IN ('manual', 'top_up', 'credit_note')),
  invoice_id      uuid,                       -- the top-up invoice that pays for it
  source_id       uuid,                       -- the credit note it refunds (source 'credit_note')
  name            text CHECK (pg_catalog.length(name) <= 200),
  expired_amount  numeric NOT NULL DEFAULT 0,
  created_at      timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id),
  CHECK (remaining >= 0 AND remaining <= amount),
  CHECK (expires_at IS NULL OR expires_at > effective_at)
);
-- what finalization reads: a customer's spendable grants of one currency
CREATE INDEX credit_grants_customer_idx ON fluxrate_internal.credit_grants (org_id, customer_id, currency)
  WHERE status = 'ACTIVE';
-- what the expiry job reads, across organizations
CREATE INDEX credit_grants_expiry_idx ON fluxrate_internal.credit_grants (expires_at) WHERE status = 'ACTIVE';
CREATE UNIQUE INDEX credit_grants_invoice_idx ON fluxrate_internal.credit_grants (org_id, invoice_id)
  WHERE invoice_id IS NOT NULL;

-- Every change of a grant's remaining, signed: grant (+, when it becomes
-- effective), use (-, an invoice's finalization), reversal (+, that invoice
-- voided), expiry (-, at expires_at).  remaining = the sum of its rows.
CREATE TABLE fluxrate_internal.credit_transactions (
  org_id       uuid NOT NULL,
  id           uuid NOT NULL,                 -- UUIDv7: creation order
  grant_id     uuid NOT NULL,
  customer_id  uuid NOT NULL,
  currency     text NOT NULL,
  kind         text NOT NULL CHECK (kind IN ('grant', 'use', 'reversal', 'expiry')),
  amount       numeric NOT NULL CHECK (amount <> 0),
  invoice_id   uuid,
  at           timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, grant_id) REFERENCES fluxrate_internal.credit_grants (org_id, id) ON DELETE CASCADE,
  CHECK ((kind IN ('grant', 'reversal')) = (amount > 0))
);
CREATE INDEX credit_transactions_customer_idx ON fluxrate_internal.credit_transactions (org_id, customer_id, at);
CREATE INDEX credit_transactions_invoice_idx ON fluxrate_internal.credit_transactions (org_id, invoice_id)
  WHERE invoice_id IS NOT NULL;

-- A low-balance threshold per customer and currency; below remembers the side
-- of the threshold the last check saw, so a crossing is announced once.
CREATE TABLE fluxrate_internal.wallet_alerts (
  org_id       uuid NOT NULL,
  customer_id  uuid NOT NULL,
  currency     text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  threshold    numeric NOT NULL CHECK (threshold >= 0),
  below        boolean NOT NULL DEFAULT false,
  crossed_at   timestamptz,
  created_at   timestamptz NOT NULL,
  PRIMARY KEY (org_id, customer_id, currency),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE
);

-- (invoices.credits_applied and the invoice kind 'top_up' are in 00_schema.sql:
-- the invoice documents of 54_invoices.sql read them)

-- Reading ---------------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.grant_json(g fluxrate_internal.credit_grants) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', g.id, 'customer_id', g.customer_id, 'currency', g.currency,
    'amount', g.amount, 'remaining', g.remaining, 'grant_type', g.grant_type, 'priority', g.priority,
    'effective_at', g.effective_at, 'expires_at', g.expires_at, 'status', g.status, 'source', g.source,
    'invoice_id', g.invoice_id, 'source_id', g.source_id, 'name', g.name, 'expired_amount', g.expired_amount,
    'created_at', g.created_at)
$$;

CREATE FUNCTION fluxrate_internal.load_customer(org_id uuid, customer_id uuid) RETURNS fluxrate_internal.customers
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c fluxrate_internal.customers;
BEGIN
  PERFORM fluxrate_internal.required(load_customer.customer_id, 'customer_id');
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = load_customer.org_id AND x.id = load_customer.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN c;
END
$$;

CREATE FUNCTION fluxrate.list_credit_grants(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM fluxrate_internal.load_customer(v_org, list_credit_grants.customer_id);
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.grant_json(g) ORDER BY g.created_at, g.id)
                     FROM fluxrate_internal.credit_grants g
                    WHERE g.org_id = v_org AND g.customer_id = list_credit_grants.customer_id), '[]'::jsonb);
END
$$;

-- Granting -------------------------------------------------------------------------

-- The currencies a customer is billed in: its subscriptions' plans and its
-- invoices.  A grant in another currency could never be spent.
CREATE FUNCTION fluxrate_internal.customer_currencies(org_id uuid, customer_id uuid) RETURNS text[]
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce(array_agg(DISTINCT x.currency ORDER BY x.currency), '{}') FROM (
    SELECT p.currency FROM fluxrate_internal.subscriptions s
      JOIN fluxrate_internal.plans p ON p.org_id = s.org_id AND p.id = s.plan_id
     WHERE s.org_id = customer_currencies.org_id AND s.customer_id = customer_currencies.customer_id
    UNION
    SELECT i.currency FROM fluxrate_internal.invoices i
     WHERE i.org_id = customer_currencies.org_id AND i.customer_id = customer_currencies.customer_id
       AND i.kind <> 'top_up') x
$$;

-- Checks of create_credit_grant: each refusal names its field (nothing is written before).
CREATE FUNCTION fluxrate_internal.check_grant(org_id uuid, customer_id uuid, amount numeric, currency text,
    effective_at timestamptz, expires_at timestamptz, priority integer)
  RETURNS void
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_used text[] := fluxrate_internal.customer_currencies(org_id, customer_id);
  v_now timestamptz := fluxrate.now();
BEGIN
  PERFORM fluxrate_internal.check_decimal(amount, 'amount', allow_zero => false);
  IF scale(amount) > fluxrate_internal.currency_exponent(currency) THEN
    PERFORM fluxrate_internal.fail('PT422', format('amount has more decimal places than %s allows', currency),
      format('amount was %s; %s has %s.', amount, currency, fluxrate_internal.currency_exponent(currency)));
  END IF;
  IF cardinality(v_used) > 0 AND NOT currency = ANY (v_used) THEN
    PERFORM fluxrate_internal.fail('PT422', format('the customer is not billed in %s', currency),
      format('Its subscriptions and invoices use %s.', array_to_string(v_used, ', ')),
      'Grant credits in a currency the customer''s invoices use.');
  END IF;
  IF NOT isfinite(effective_at) OR NOT coalesce(isfinite(expires_at), true)
     OR abs(extract(epoch FROM effective_at - v_now)) > 3162240000         -- 100 x 366 days, in seconds
     OR abs(coalesce(extract(epoch FROM expires_at - v_now), 0)) > 3162240000 THEN
    PERFORM fluxrate_internal.fail('22008', 'effective_at and expires_at must be within 100 years of now',
      format('effective_at was %s, expires_at %s.', effective_at, coalesce(expires_at::text, 'never')),
      'Leave expires_at out for credits that never expire.');
  END IF;
  IF expires_at <= effective_at THEN
    PERFORM fluxrate_internal.fail('PT422', 'expires_at must be after effective_at',
      format('effective_at was %s, expires_at %s.', effective_at, expires_at));
  END IF;
  IF priority IS NULL OR priority NOT BETWEEN 0 AND 1000 THEN
    PERFORM fluxrate_internal.fail('PT422', 'priority must be from 0 to 1000',
      format('priority was %s.', coalesce(priority::text, 'null')), 'Lower numbers are spent first.');
  END IF;
END
$$;

-- The movement that makes a grant spendable (at its effective instant).
CREATE FUNCTION fluxrate_internal.record_grant(g fluxrate_internal.credit_grants) RETURNS void
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
  INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, at)
  VALUES (g.org_id, fluxrate_internal.uuid_v7(), g.id, g.customer_id, g.currency, 'grant', g.amount, g.effective_at)
$$;

-- A top-up paid by an invoice: one line, no tax, finalized now (numbered, OPEN,
-- e-mailed like the others); the grant waits for it to be PAID.
CREATE FUNCTION fluxrate_internal.create_top_up_invoice(org_id uuid, customer_id uuid, currency text, price numeric,
    label text)
  RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_id uuid;
  v_line numeric := fluxrate_internal.round_money(price, currency);
BEGIN
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, currency, created_at, updated_at)
  VALUES (create_top_up_invoice.org_id, 'top_up', create_top_up_invoice.customer_id, create_top_up_invoice.currency,
          fluxrate.now(), fluxrate.now())
  RETURNING id INTO v_id;
  INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description, quantity,
      unit_amount, line_total, amount_unrounded)
  VALUES (create_top_up_invoice.org_id, v_id, 1, 'manual', label, 1, price, v_line, price);
  PERFORM fluxrate_internal.finalize_one(create_top_up_invoice.org_id, v_id);
  RETURN v_id;
END
$$;

-- POST /credit_grants.  grant_type 'paid' or 'promotional'; priority 0-1000
-- (lower is spent first); effective_at defaults to now, expires_at to never.
-- invoice => true: a paid top-up sold by an invoice of price (default the
-- amount), effective when that invoice is PAID (and not before effective_at).
CREATE FUNCTION fluxrate.create_credit_grant(customer_id uuid DEFAULT NULL, amount numeric DEFAULT NULL,
    currency text DEFAULT NULL, effective_at timestamptz DEFAULT NULL, expires_at timestamptz DEFAULT NULL,
    priority integer DEFAULT 100, grant_type text DEFAULT 'promotional', name text DEFAULT NULL,
    invoice boolean DEFAULT false, price numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  v_cur text := upper(create_credit_grant.currency);
  v_type text := lower(create_credit_grant.grant_type);
  v_eff timestamptz := coalesce(create_credit_grant.effective_at, fluxrate.now());
  g fluxrate_internal.credit_grants;
  v_amount numeric;
BEGIN
  PERFORM fluxrate_internal.load_customer(v_org, create_credit_grant.customer_id);
  PERFORM fluxrate_internal.required(create_credit_grant.amount, 'amount');
  PERFORM fluxrate_internal.required(v_cur, 'currency');
  PERFORM fluxrate_internal.one_of(v_type, 'grant_type', ARRAY['paid', 'promotional']);
  PERFORM fluxrate_internal.check_grant(v_org, create_credit_grant.customer_id, create_credit_grant.amount, v_cur,
                                        v_eff, create_credit_grant.expires_at, create_credit_grant.priority);
  IF coalesce(invoice, false) AND v_type <> 'paid' THEN
    PERFORM fluxrate_internal.fail('PT422', 'only a paid grant is sold by an invoice',
      'grant_type was promotional.', 'Send grant_type => ''paid'' with invoice => true.');
  END IF;
  IF price IS NOT NULL AND NOT coalesce(invoice, false) THEN
    PERFORM fluxrate_internal.fail('PT422', 'price is the top-up invoice''s amount', NULL, 'Send invoice => true with a price.');
  END IF;
  PERFORM fluxrate_internal.check_decimal(price, 'price', allow_zero => false);
  -- written at the currency's scale (50 -> 50.00), as invoices are
  v_amount := round(create_credit_grant.amount, fluxrate_internal.currency_exponent(v_cur));
  INSERT INTO fluxrate_internal.credit_grants AS x (org_id, customer_id, currency, amount, remaining, grant_type, priority,
      effective_at, expires_at, status, source, name, created_at)
  VALUES (v_org, create_credit_grant.customer_id, v_cur, v_amount, v_amount, v_type,
          create_credit_grant.priority, v_eff, create_credit_grant.expires_at,
          CASE WHEN coalesce(invoice, false) THEN 'PENDING' ELSE 'ACTIVE' END,
          CASE WHEN coalesce(invoice, false) THEN 'top_up' ELSE 'manual' END, create_credit_grant.name, fluxrate.now())
  RETURNING * INTO g;
  IF coalesce(invoice, false) THEN
    UPDATE fluxrate_internal.credit_grants x
       SET invoice_id = fluxrate_internal.create_top_up_invoice(v_org, g.customer_id, v_cur,
                          coalesce(create_credit_grant.price, g.amount), coalesce(g.name, 'Prepaid credits'))
     WHERE x.org_id = v_org AND x.id = g.id
    RETURNING * INTO g;
  ELSE
    PERFORM fluxrate_internal.record_grant(g);
    PERFORM fluxrate_internal.wallet_alert_check(v_org, g.customer_id, g.currency);
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.grant_json(g);
END
$$;

-- Spending ---------------------------------------------------------------------------

-- At finalization (finalize_one, before the invoice is OPEN): the customer's
-- spendable grants of the invoice's currency pay what is due, in priority,
-- expiry, creation order.  The grants are locked in that same order by every
-- spender (FOR UPDATE in the ORDER BY's order), so two finalizations of one
-- customer queue grant by grant without deadlock, and the second sees what the
-- first left (the re-checked row): a grant is never over-spent (remaining >= 0
-- is also a CHECK).  Returns the amount applied.
CREATE FUNCTION fluxrate_internal.wallet_apply(org_id uuid, invoice_id uuid) RETURNS numeric
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  g record;
  v_now timestamptz := fluxrate.now();
  v_left numeric;
  v_take numeric;
  v_used numeric := 0;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = wallet_apply.org_id AND x.id = wallet_apply.invoice_id;
  v_left := i.total - i.amount_paid - i.credits_applied;
  IF i.kind = 'top_up' OR v_left <= 0 THEN
    RETURN 0;
  END IF;
  FOR g IN
    SELECT x.id, x.remaining FROM fluxrate_internal.credit_grants x
     WHERE x.org_id = i.org_id AND x.customer_id = i.customer_id AND x.currency = i.currency AND x.status = 'ACTIVE'
       AND x.effective_at <= v_now AND (x.expires_at IS NULL OR x.expires_at > v_now) AND x.remaining > 0
     ORDER BY x.priority, x.expires_at NULLS LAST, x.created_at, x.id
     FOR UPDATE
  LOOP
    v_take := least(g.remaining, v_left);
    UPDATE fluxrate_internal.credit_grants x SET remaining = x.remaining - v_take WHERE x.org_id = i.org_id AND x.id = g.id;
    INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, invoice_id, at)
    VALUES (i.org_id, fluxrate_internal.uuid_v7(), g.id, i.customer_id, i.currency, 'use', -v_take, i.id, v_now);
    v_used := v_used + v_take;
    v_left := v_left - v_take;
    EXIT WHEN v_left = 0;
  END LOOP;
  IF v_used > 0 THEN
    UPDATE fluxrate_internal.invoices x
       SET credits_applied = x.credits_applied + v_used, amount_due = x.total - x.amount_paid - (x.credits_applied + v_used)
     WHERE x.org_id = i.org_id AND x.id = i.id;
  END IF;
  RETURN v_used;
END
$$;

-- A voided invoice gives back the credits it used, to the grants they came from
-- (locked in the spenders' order).  Credit of a grant that has expired since
-- expires again at once: both movements are recorded.
CREATE FUNCTION fluxrate_internal.wallet_reverse(org_id uuid, invoice_id uuid) RETURNS numeric
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
  v_now timestamptz := fluxrate.now();
  v_back numeric := 0;
BEGIN
  FOR r IN
    SELECT g.id, g.customer_id, g.currency, g.expires_at, g.status, -sum(t.amount) AS used
      FROM fluxrate_internal.credit_transactions t
      JOIN fluxrate_internal.credit_grants g ON g.org_id = t.org_id AND g.id = t.grant_id
     WHERE t.org_id = wallet_reverse.org_id AND t.invoice_id = wallet_reverse.invoice_id AND t.kind IN ('use', 'reversal')
     GROUP BY g.org_id, g.id HAVING sum(t.amount) < 0
     ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
  LOOP
    PERFORM 1 FROM fluxrate_internal.credit_grants x WHERE x.org_id = wallet_reverse.org_id AND x.id = r.id FOR UPDATE;
    INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, invoice_id, at)
    VALUES (wallet_reverse.org_id, fluxrate_internal.uuid_v7(), r.id, r.customer_id, r.currency, 'reversal', r.used,
            wallet_reverse.invoice_id, v_now);
    IF r.status = 'EXPIRED' THEN
      INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, invoice_id, at)
      VALUES (wallet_reverse.org_id, fluxrate_internal.uuid_v7(), r.id, r.customer_id, r.currency, 'expiry', -r.used,
              wallet_reverse.invoice_id, v_now);
      UPDATE fluxrate_internal.credit_grants x SET expired_amount = x.expired_amount + r.used
       WHERE x.org_id = wallet_reverse.org_id AND x.id = r.id;
    ELSE
      -- an ACTIVE grant past expires_at gets it back too: the expiry job records it
      UPDATE fluxrate_internal.credit_grants x SET remaining = x.remaining + r.used
       WHERE x.org_id = wallet_reverse.org_id AND x.id = r.id;
    END IF;
    v_back := v_back + r.used;
  END LOOP;
  RETURN v_back;
END
$$;

-- update_invoice_status (54_invoices.sql) calls this after a change to PAID or
-- VOID: the top-up an invoice sold becomes effective when it is PAID (at the
-- later of the payment and the grant's effective_at), is voided with it; a
-- voided invoice gives its credits back.
CREATE FUNCTION fluxrate_internal.wallet_on_invoice_status(org_id uuid, invoice_id uuid, status text) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  g fluxrate_internal.credit_grants;
  v_now timestamptz := fluxrate.now();
BEGIN
  IF status = 'VOID' THEN
    PERFORM fluxrate_internal.wallet_reverse(org_id, invoice_id);
  END IF;
  SELECT * INTO g FROM fluxrate_internal.credit_grants x
   WHERE x.org_id = wallet_on_invoice_status.org_id AND x.invoice_id = wallet_on_invoice_status.invoice_id
     AND x.status = 'PENDING'
   FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF status = 'PAID' AND g.expires_at <= v_now THEN
    -- paid after its expiry: granted and expired at the payment, both recorded
    UPDATE fluxrate_internal.credit_grants x SET status = 'EXPIRED', remaining = 0, expired_amount = x.amount
     WHERE x.org_id = g.org_id AND x.id = g.id;
    INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, at)
    VALUES (g.org_id, fluxrate_internal.uuid_v7(), g.id, g.customer_id, g.currency, 'grant', g.amount, v_now),
           (g.org_id, fluxrate_internal.uuid_v7(), g.id, g.customer_id, g.currency, 'expiry', -g.amount, v_now);
  ELSIF status = 'PAID' THEN
    UPDATE fluxrate_internal.credit_grants x SET status = 'ACTIVE', effective_at = greatest(x.effective_at, v_now)
     WHERE x.org_id = g.org_id AND x.id = g.id
    RETURNING * INTO g;
    PERFORM fluxrate_internal.record_grant(g);
    PERFORM fluxrate_internal.wallet_alert_check(g.org_id, g.customer_id, g.currency);
  ELSIF status = 'VOID' THEN
    UPDATE fluxrate_internal.credit_grants x SET status = 'VOIDED', remaining = 0 WHERE x.org_id = g.org_id AND x.id = g.id;
  END IF;
END
$$;

-- Expiry -------------------------------------------------------------------------------

-- The minute job: every ACTIVE grant whose expires_at has passed becomes
-- EXPIRED; its remainder is recorded as an expiry movement dated expires_at
-- (the instant it stopped being spendable: finalizations after it never took
-- from it), and announced (credit_grant.expired).  Grants a finalization holds
-- are skipped and taken by the next run, so the job never waits on spenders
-- (and cannot deadlock with their locking order).  Returns how many expired.
CREATE FUNCTION fluxrate_internal.sys_expire_grants(batch_size integer DEFAULT 1000) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  g fluxrate_internal.credit_grants;
  n integer := 0;
BEGIN
  FOR g IN
    SELECT * FROM fluxrate_internal.credit_grants x
     WHERE x.status = 'ACTIVE' AND x.expires_at <= fluxrate.now()
     ORDER BY x.expires_at, x.org_id, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED
  LOOP
    PERFORM set_config('fluxrate.current_org', g.org_id::text, true);
    UPDATE fluxrate_internal.credit_grants x SET status = 'EXPIRED', remaining = 0, expired_amount = x.expired_amount + g.remaining
     WHERE x.org_id = g.org_id AND x.id = g.id;
    IF g.remaining > 0 THEN
      INSERT INTO fluxrate_internal.credit_transactions (org_id, id, grant_id, customer_id, currency, kind, amount, at)
      VALUES (g.org_id, fluxrate_internal.uuid_v7(), g.id, g.customer_id, g.currency, 'expiry', -g.remaining, g.expires_at);
      PERFORM fluxrate_internal.emit_event(g.org_id, 'credit_grant.expired', jsonb_build_object('grant_id', g.id,
        'customer_id', g.customer_id, 'currency', g.currency, 'expired_amount', g.remaining, 'expires_at', g.expires_at));
      PERFORM fluxrate_internal.wallet_alert_check(g.org_id, g.customer_id, g.currency);
    END IF;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

CREATE PROCEDURE fluxrate.expire_credit_grants(batch_size integer DEFAULT 1000)
  LANGUAGE plpgsql
  AS $$
BEGIN
  WHILE fluxrate_internal.sys_expire_grants(batch_size) > 0 LOOP
    COMMIT;
  END LOOP;
END
$$;

-- The live balance -------------------------------------------------------------------

-- What the customer's next finalizations will bill, per currency, as they would
-- be billed now: each DRAFT refreshed as finalize_one() refreshes it, and each
-- billing subscription's current period as preview_invoice() computes it (the
-- same fill_lines()), in a subtransaction that is rolled back -- nothing is
-- written.  {"USD": 123.45, ...}; top-up invoices are not billed against credits.
CREATE FUNCTION fluxrate_internal.unbilled_totals(org_id uuid, customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
  s fluxrate_internal.subscriptions;
  np record;
  v_id uuid;
  v_out jsonb;
BEGIN
  BEGIN
    FOR r IN SELECT x.id, x.subscription_id, x.period_start, x.period_end, x.meta_data FROM fluxrate_internal.invoices x
              WHERE x.org_id = unbilled_totals.org_id AND x.customer_id = unbilled_totals.customer_id
                AND x.status = 'DRAFT' AND x.kind <> 'top_up'
                -- a draft being finalized right now counts at its stored total:
                -- a balance read never waits for (or deadlocks with) a finalizer,
                -- nor refreshes a draft at the same time as one
                FOR UPDATE SKIP LOCKED
    LOOP
      IF r.subscription_id IS NOT NULL THEN
        PERFORM fluxrate_internal.fill_lines(unbilled_totals.org_id, r.id,
          coalesce((r.meta_data->>'nominal_start')::timestamptz, r.period_start),
          coalesce((r.meta_data->>'nominal_end')::timestamptz, r.period_end));
      ELSE
        PERFORM fluxrate_internal.recompute_totals(unbilled_totals.org_id, r.id);
      END IF;
    END LOOP;
    FOR s IN SELECT * FROM fluxrate_internal.subscriptions x
              WHERE x.org_id = unbilled_totals.org_id AND x.customer_id = unbilled_totals.customer_id
                AND x.status IN ('ACTIVE', 'PAST_DUE')
    LOOP
      SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
      INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
          created_at, updated_at)
      SELECT s.org_id, 'final', s.customer_id, s.id, p.currency, s.current_period_start, s.current_period_end,
             fluxrate.now(), fluxrate.now()
        FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id
      RETURNING id INTO v_id;
      PERFORM fluxrate_internal.fill_lines(s.org_id, v_id, np.nominal_start, np.nominal_end);
    END LOOP;
    SELECT jsonb_object_agg(t.currency, t.total) INTO v_out
      FROM (SELECT x.currency, sum(x.total - x.amount_paid) AS total FROM fluxrate_internal.invoices x
             WHERE x.org_id = unbilled_totals.org_id AND x.customer_id = unbilled_totals.customer_id
               AND x.status = 'DRAFT' AND x.kind <> 'top_up'
             GROUP BY x.currency) t;
    RAISE EXCEPTION USING ERRCODE = 'P0004', MESSAGE = 'unbilled_totals rollback';
  EXCEPTION WHEN assert_failure THEN
    NULL;
  END;
  RETURN coalesce(v_out, '{}'::jsonb);
END
$$;

-- One currency's wallet: balance = what the spendable grants hold now; unbilled
-- = what the next finalizations will bill (unbilled_totals); available =
-- balance - the part of unbilled it will pay (the burn-down: what would be left
-- if everything were finalized now); pending = grants not effective yet (a
-- top-up waiting for its payment, a future effective_at).
CREATE FUNCTION fluxrate_internal.credit_balance(org_id uuid, customer_id uuid, currency text, unbilled numeric)
  RETURNS jsonb
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT jsonb_build_object('currency', credit_balance.currency, 'balance', b.balance,
           'unbilled', coalesce(credit_balance.unbilled, 0),
           'available', b.balance - least(b.balance, greatest(coalesce(credit_balance.unbilled, 0), 0)),
           'pending', b.pending, 'threshold', a.threshold, 'below_threshold', a.below)
    FROM (SELECT coalesce(sum(g.remaining) FILTER (WHERE g.status = 'ACTIVE' AND g.effective_at <= fluxrate.now()
                                                     AND (g.expires_at IS NULL OR g.expires_at > fluxrate.now())), 0) AS balance,
                 coalesce(sum(g.remaining) FILTER (WHERE g.status = 'PENDING'
                                                     OR (g.status = 'ACTIVE' AND g.effective_at > fluxrate.now())), 0) AS pending
            FROM fluxrate_internal.credit_grants g
           WHERE g.org_id = credit_balance.org_id AND g.customer_id = credit_balance.customer_id
             AND g.currency = credit_balance.currency) b
    LEFT JOIN fluxrate_internal.wallet_alerts a ON a.org_id = credit_balance.org_id
         AND a.customer_id = credit_balance.customer_id AND a.currency = credit_balance.currency
$$;

-- GET /customers/{id}/credit_balance: one row per currency the customer holds
-- credits in (or is billed in), or the one asked for.  One call; VOLATILE only
-- because the unbilled part is computed by the billing code in a rolled-back
-- subtransaction.
CREATE FUNCTION fluxrate.get_credit_balance(customer_id uuid, currency text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  v_unbilled jsonb;
BEGIN
  PERFORM fluxrate_internal.load_customer(v_org, get_credit_balance.customer_id);
  IF get_credit_balance.currency IS NOT NULL THEN
    PERFORM fluxrate_internal.currency_exponent(upper(get_credit_balance.currency));
  END IF;
  v_unbilled := fluxrate_internal.unbilled_totals(v_org, get_credit_balance.customer_id);
  RETURN jsonb_build_object('customer_id', get_credit_balance.customer_id, 'as_of', fluxrate.now(), 'wallets',
    coalesce((SELECT jsonb_agg(fluxrate_internal.credit_balance(v_org, get_credit_balance.customer_id, c.cur,
                                 (v_unbilled->>c.cur)::numeric) ORDER BY c.cur)
                FROM (SELECT g.currency AS cur FROM fluxrate_internal.credit_grants g
                       WHERE g.org_id = v_org AND g.customer_id = get_credit_balance.customer_id
                      UNION SELECT jsonb_object_keys(v_unbilled)) c
               WHERE get_credit_balance.currency IS NULL OR c.cur = upper(get_credit_balance.currency)), '[]'::jsonb));
END
$$;

-- Low-balance alerts -------------------------------------------------------------

-- The check: the available (burn-down) balance against the threshold.  Going
-- below announces wallet.balance_low once (the row's below flag remembers the
-- side); coming back to the threshold or above re-arms it silently.  The row is
-- locked, so concurrent checks announce one crossing once.
CREATE FUNCTION fluxrate_internal.wallet_alert_check(org_id uuid, customer_id uuid, currency text) RETURNS boolean
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  a fluxrate_internal.wallet_alerts;
  b jsonb;
  v_below boolean;
BEGIN
  SELECT * INTO a FROM fluxrate_internal.wallet_alerts x
   WHERE x.org_id = wallet_alert_check.org_id AND x.customer_id = wallet_alert_check.customer_id
     AND x.currency = wallet_alert_check.currency
   FOR UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  b := fluxrate_internal.credit_balance(a.org_id, a.customer_id, a.currency,
         (fluxrate_internal.unbilled_totals(a.org_id, a.customer_id)->>a.currency)::numeric);
  v_below := (b->>'available')::numeric < a.threshold;
  IF v_below AND NOT a.below THEN
    PERFORM fluxrate_internal.emit_event(a.org_id, 'wallet.balance_low', jsonb_build_object('customer_id', a.customer_id,
      'currency', a.currency, 'threshold', a.threshold, 'balance', b->'balance', 'unbilled', b->'unbilled',
      'available', b->'available'));
  END IF;
  IF v_below IS DISTINCT FROM a.below THEN
    UPDATE fluxrate_internal.wallet_alerts x SET below = v_below, crossed_at = fluxrate.now()
     WHERE x.org_id = a.org_id AND x.customer_id = a.customer_id AND x.currency = a.currency;
  END IF;
  RETURN v_below;
END
$$;

-- PUT /customers/{id}/credit_alert: threshold NULL removes it.  The balance is
-- checked at once (an alert set below the balance announces right away).
CREATE FUNCTION fluxrate.set_credit_alert(customer_id uuid DEFAULT NULL, currency text DEFAULT NULL,
    threshold numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  v_cur text := upper(set_credit_alert.currency);
BEGIN
  PERFORM fluxrate_internal.load_customer(v_org, set_credit_alert.customer_id);
  PERFORM fluxrate_internal.required(v_cur, 'currency');
  PERFORM fluxrate_internal.currency_exponent(v_cur);
  IF set_credit_alert.threshold IS NULL THEN
    DELETE FROM fluxrate_internal.wallet_alerts a
     WHERE a.org_id = v_org AND a.customer_id = set_credit_alert.customer_id AND a.currency = v_cur;
    RETURN jsonb_build_object('customer_id', set_credit_alert.customer_id, 'currency', v_cur, 'threshold', NULL);
  END IF;
  PERFORM fluxrate_internal.check_decimal(set_credit_alert.threshold, 'threshold');
  INSERT INTO fluxrate_internal.wallet_alerts AS a (org_id, customer_id, currency, threshold, created_at)
  VALUES (v_org, set_credit_alert.customer_id, v_cur, set_credit_alert.threshold, fluxrate.now())
  ON CONFLICT ON CONSTRAINT wallet_alerts_pkey DO UPDATE SET threshold = EXCLUDED.threshold, below = false;
  PERFORM fluxrate_internal.wallet_alert_check(v_org, set_credit_alert.customer_id, v_cur);
  RETURN (SELECT jsonb_build_object('customer_id', a.customer_id, 'currency', a.currency, 'threshold', a.threshold,
                                    'below_threshold', a.below, 'crossed_at', a.crossed_at)
            FROM fluxrate_internal.wallet_alerts a
           WHERE a.org_id = v_org AND a.customer_id = set_credit_alert.customer_id AND a.currency = v_cur);
END
$$;

-- The minute job: usage burns the available balance down between invoices, so
-- every alert is checked (alerts another check holds are skipped).
CREATE FUNCTION fluxrate_internal.sys_wallet_alerts() RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  a record;
  n integer := 0;
BEGIN
  FOR a IN SELECT x.org_id, x.customer_id, x.currency FROM fluxrate_internal.wallet_alerts x
            ORDER BY x.org_id, x.customer_id, x.currency FOR UPDATE SKIP LOCKED
  LOOP
    PERFORM set_config('fluxrate.current_org', a.org_id::text, true);
    IF fluxrate_internal.wallet_alert_check(a.org_id, a.customer_id, a.currency) THEN
      n := n + 1;
    END IF;
  END LOOP;
  RETURN n;
END
$$;

-- Credit notes to the wallet (issue 16, item 3's destination 'wallet'; 57_credit_notes.sql
-- calls this in the credit note's transaction, after writing it): what the credit
-- note gives back (its `refunded` part: what had been paid of the invoice, in money
-- or credits) becomes a paid grant of the invoice's currency, effective now, never
-- expiring, priority 100, source 'credit_note' (source_id: the credit note).  The
-- part that lowered an OPEN invoice's amount due moves no money and grants nothing.
CREATE FUNCTION fluxrate_internal.sys_credit_note_to_wallet(org_id uuid, credit_note_id uuid) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  cn fluxrate_internal.credit_notes;
  g fluxrate_internal.credit_grants;
BEGIN
  SELECT * INTO cn FROM fluxrate_internal.credit_notes x
   WHERE x.org_id = sys_credit_note_to_wallet.org_id AND x.id = sys_credit_note_to_wallet.credit_note_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'credit note not found', format('No credit note %s in this organization.', credit_note_id));
  END IF;
  IF cn.refunded <= 0 THEN
    RETURN;
  END IF;
  INSERT INTO fluxrate_internal.credit_grants (org_id, customer_id, currency, amount, remaining, grant_type, priority,
      effective_at, status, source, source_id, name, created_at)
  VALUES (cn.org_id, cn.customer_id, cn.currency, cn.refunded, cn.refunded, 'paid', 100, fluxrate.now(), 'ACTIVE',
          'credit_note', cn.id, 'Credit note ' || cn.credit_note_number, fluxrate.now())
  RETURNING * INTO g;
  PERFORM fluxrate_internal.record_grant(g);
  PERFORM fluxrate_internal.wallet_alert_check(g.org_id, g.customer_id, g.currency);
END
$$;

-- the trusted application role runs the jobs (finalize_due_invoices, 58_jobs.sql)
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_expire_grants(integer), fluxrate_internal.sys_wallet_alerts() TO fluxrate_app;
