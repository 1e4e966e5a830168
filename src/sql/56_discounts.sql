-- 56_discounts.sql: coupons, their redemptions and the discount lines of an
-- invoice (issue 16, item 1; docs/ledger.md "Discounts").
--   coupons, coupon_redemptions         the tables; invoice_lines gains the
--                                       'discount' kind and redemption_id
--   numeric_product()                   an exact product aggregate (percentages compound)
--   close_sql_discounts()               the discount lines, as a part of a WITH list
--                                       over `dctx` and `lines`: the set-based closer
--                                       (52_close.sql) and fill_lines (50_periods.sql)
--                                       run the same text
--   write_discount_lines()              fill_lines' call of it for one invoice
--   create_coupon(), get_coupon(), list_coupons(), archive_coupon()
--   redeem_coupon(), list_redemptions(), remove_redemption()   the API
--
-- A redemption covers a window of time [applies_from, applies_until): an
-- invoice line is discounted when its own period overlaps the window.  For a
-- subscription the window is whole billing periods, fixed at redemption (the
-- current period and the next ones), so "20% for 3 months" discounts exactly
-- three months of fees and usage wherever those lines are billed (an in-advance
-- fee rides on the invoice of the period before).  The closer writes one
-- invoice per subscription period (exactly-once, SPEC), and an invoice carries
-- a redemption at most once (unique index): a coupon cannot be applied twice to
-- a period, whoever closes it.

CREATE TABLE fluxrate_internal.coupons (
  org_id            uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id                uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  code              text NOT NULL CHECK (code ~ '^[A-Za-z0-9_-]{1,64}$'),
  name              text NOT NULL CHECK (pg_catalog.length(name) BETWEEN 1 AND 200),
  discount_type     text NOT NULL CHECK (discount_type IN ('percentage', 'fixed')),
  percent_off       numeric CHECK (percent_off > 0 AND percent_off <= 100),
  amount_off        numeric CHECK (amount_off > 0),
  currency          text CHECK (currency ~ '^[A-Z]{3}$'),
  duration          text NOT NULL CHECK (duration IN ('once', 'repeating', 'forever')),
  duration_periods  integer CHECK (duration_periods BETWEEN 1 AND 1200),
  -- fixed amounts: false = the amount is per billing period, what a period
  -- does not use is lost; true = one budget for the whole window, spent
  -- invoice by invoice until it is used up
  carry_over        boolean NOT NULL DEFAULT false,
  charge_ids        uuid[],               -- NULL: every charge (and the minimum true-up)
  plan_ids          uuid[],               -- NULL: every plan
  max_redemptions   integer CHECK (max_redemptions > 0),
  times_redeemed    integer NOT NULL DEFAULT 0 CHECK (times_redeemed >= 0),
  redeem_by         timestamptz,          -- no redemption at or after it
  status            text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'ARCHIVED')),
  created_at        timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, code),
  CHECK ((discount_type = 'percentage') = (percent_off IS NOT NULL)),
  CHECK ((discount_type = 'fixed') = (amount_off IS NOT NULL AND currency IS NOT NULL)),
  CHECK ((duration = 'repeating') = (duration_periods IS NOT NULL)),
  CHECK (NOT carry_over OR discount_type = 'fixed'),
  -- the redemption limit holds under concurrent redemptions: the counter row
  -- is updated under its lock, and this refuses what a bug would let through
  CHECK (max_redemptions IS NULL OR times_redeemed <= max_redemptions)
);

CREATE TABLE fluxrate_internal.coupon_redemptions (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL,         -- UUIDv7: redemptions of one instant apply in creation order
  coupon_id        uuid NOT NULL,
  customer_id      uuid NOT NULL,
  subscription_id  uuid,                  -- NULL: every subscription of the customer
  applies_from     timestamptz NOT NULL,
  applies_until    timestamptz,           -- NULL: forever
  status           text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'REMOVED')),
  redeemed_at      timestamptz NOT NULL,
  removed_at       timestamptz,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, coupon_id) REFERENCES fluxrate_internal.coupons (org_id, id),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE,
  CHECK (applies_until IS NULL OR applies_until > applies_from)
);
-- a coupon is redeemed once per subscription (or once customer-wide) while active
CREATE UNIQUE INDEX coupon_redemptions_sub_once_idx ON fluxrate_internal.coupon_redemptions (org_id, subscription_id, coupon_id)
  WHERE status = 'ACTIVE' AND subscription_id IS NOT NULL;
CREATE UNIQUE INDEX coupon_redemptions_cust_once_idx ON fluxrate_internal.coupon_redemptions (org_id, customer_id, coupon_id)
  WHERE status = 'ACTIVE' AND subscription_id IS NULL;
CREATE INDEX coupon_redemptions_coupon_idx ON fluxrate_internal.coupon_redemptions (org_id, coupon_id);

-- The discount line: its own kind, pointing at its redemption (the ledger's cause).
ALTER TABLE fluxrate_internal.invoice_lines DROP CONSTRAINT invoice_lines_line_type_check;
ALTER TABLE fluxrate_internal.invoice_lines ADD CONSTRAINT invoice_lines_line_type_check
  CHECK (line_type IN ('fixed', 'usage', 'late_usage', 'minimum', 'manual', 'discount'));
ALTER TABLE fluxrate_internal.invoice_lines ADD COLUMN redemption_id uuid;
ALTER TABLE fluxrate_internal.invoice_lines ADD CONSTRAINT invoice_lines_redemption_fkey
  FOREIGN KEY (org_id, redemption_id) REFERENCES fluxrate_internal.coupon_redemptions (org_id, id);
ALTER TABLE fluxrate_internal.invoice_lines ADD CONSTRAINT invoice_lines_discount_check
  CHECK ((line_type = 'discount') = (redemption_id IS NOT NULL));
-- exactly-once: a redemption is applied at most once to an invoice (and the
-- closer writes one invoice per period); also the lookup of what a fixed
-- amount has already used
CREATE UNIQUE INDEX invoice_lines_redemption_once_idx ON fluxrate_internal.invoice_lines (org_id, redemption_id, invoice_id)
  WHERE redemption_id IS NOT NULL;

-- An exact product (numeric_mul): the share of a line the earlier percentage
-- discounts left.  exp(sum(ln(x))) would not be exact.
CREATE AGGREGATE fluxrate_internal.numeric_product(numeric) (
  SFUNC = pg_catalog.numeric_mul, STYPE = numeric, PARALLEL = SAFE
);

-- The discount lines, as a part of one WITH list (close_statement() in
-- 52_close.sql; write_discount_lines() below).  It reads two CTEs its caller
-- defines before it:
--   dctx  (org_id, sub_id, customer_id, plan_id, invoice_id, currency, ps, pe, nps: the nominal period's start)
--         one row per invoice being written
--   lines (org_id, sub_id, pos, line_type, charge_id, amount, line_start,
--          line_end, line_total): the invoice's other lines, amount unrounded
-- and defines `disc`, the discount lines in the shape of `lines` plus
-- redemption_id.  The rules (docs/ledger.md "Discounts"):
--   * a redemption covers the lines whose period overlaps its window, of its
--     coupon's charges (all, when charge_ids is NULL), positive lines only;
--   * percentages first, then fixed amounts; each in redemption order
--     (redeemed_at, id): percentages compound, each takes its share of what
--     the earlier ones left of each line;
--   * a fixed amount takes at most what the percentages left of its lines, and
--     at most its allowance: the amount less what other (non-VOID) invoices of
--     the same period already took (carry_over: of the whole window);
--   * together they never take more than the invoice's lines: the running sum
--     is capped (unrounded, then the rounded lines against the rounded subtotal);
--   * each discount line is rounded once, half away from zero; tax is then
--     computed on the unrounded subtotal, discounts included (before tax).
CREATE FUNCTION fluxrate_internal.close_sql_discounts() RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $fn$ SELECT $sql$
  dred AS MATERIALIZED (
    -- the redemptions of each invoice, in the order they apply
    SELECT d.org_id, d.sub_id, d.invoice_id, d.currency, d.ps, d.pe, d.nps, r.id AS redemption_id, r.applies_from, r.applies_until,
           k.id AS coupon_id, k.code, k.name, k.discount_type, k.percent_off, k.amount_off, k.carry_over, k.charge_ids,
           row_number() OVER (PARTITION BY d.org_id, d.sub_id
                              ORDER BY k.discount_type = 'fixed', r.redeemed_at, r.id)::integer AS ord
      FROM dctx d
      CROSS JOIN LATERAL (
        SELECT r0.* FROM fluxrate_internal.coupon_redemptions r0
         WHERE r0.org_id = d.org_id AND r0.subscription_id = d.sub_id AND r0.status = 'ACTIVE'
        UNION ALL
        SELECT r1.* FROM fluxrate_internal.coupon_redemptions r1
         WHERE r1.org_id = d.org_id AND r1.customer_id = d.customer_id AND r1.subscription_id IS NULL AND r1.status = 'ACTIVE') r
      JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id
     WHERE (k.plan_ids IS NULL OR d.plan_id = ANY (k.plan_ids))
       AND (k.currency IS NULL OR k.currency = d.currency)
  ), dlines AS (
    -- the lines, each with its invoice's positive total (unrounded and rounded) and
    -- last position: window functions, so that no later step joins two CTEs
    -- (their row estimates are guesses; a misestimated join of two was a nested
    -- loop over the whole batch, quadratic)
    SELECT l.org_id, l.sub_id, l.pos, l.line_type, l.charge_id, l.amount, l.line_start, l.line_end,
           coalesce(sum(l.amount) FILTER (WHERE l.line_type <> 'discount' AND l.amount > 0)
                    OVER (PARTITION BY l.org_id, l.sub_id), 0) AS whole,
           coalesce(sum(l.line_total) FILTER (WHERE l.line_type <> 'discount' AND l.amount > 0)
                    OVER (PARTITION BY l.org_id, l.sub_id), 0) AS whole_rounded,
           max(l.pos) OVER (PARTITION BY l.org_id, l.sub_id) AS last_pos
      FROM lines l
  ), dcover AS MATERIALIZED (
    -- each (redemption, line) it covers, with what the earlier percentages left of the line
    SELECT r.*, l.pos, l.amount, l.whole, l.whole_rounded, l.last_pos,
           l.amount * coalesce(fluxrate_internal.numeric_product(1 - r.percent_off / 100)
             FILTER (WHERE r.discount_type = 'percentage')
             OVER (PARTITION BY r.org_id, r.sub_id, l.pos ORDER BY r.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 1) AS left_before
      FROM dred r
      JOIN dlines l ON l.org_id = r.org_id AND l.sub_id = r.sub_id
     WHERE l.line_type <> 'discount' AND l.amount > 0
       AND l.line_end > r.applies_from AND (r.applies_until IS NULL OR l.line_start < r.applies_until)
       AND (r.charge_ids IS NULL OR l.charge_id = ANY (r.charge_ids))
  ), dcover2 AS (
    -- and what all the percentages took of that line
    SELECT c.*, coalesce(sum(c.left_before * c.percent_off / 100) FILTER (WHERE c.discount_type = 'percentage')
                         OVER (PARTITION BY c.org_id, c.sub_id, c.pos), 0) AS line_taken
      FROM dcover c
  ), draw AS (
    -- each redemption that covers a line: its own amount, before the invoice-wide cap
    SELECT t.*,
           CASE WHEN t.discount_type = 'percentage' THEN t.pct_taken
                ELSE greatest(0, least(t.fixed_room,
                  -- its allowance: what other invoices of the period (carry_over: of the window) did not take;
                  -- the period is the nominal one, so the two invoices of a period a plan change split
                  -- (55_plan_changes.sql) share one allowance
                  t.amount_off - coalesce((SELECT -sum(il.amount_unrounded)
                      FROM fluxrate_internal.invoice_lines il
                      JOIN fluxrate_internal.invoices iv ON iv.org_id = il.org_id AND iv.id = il.invoice_id
                     WHERE il.org_id = t.org_id AND il.redemption_id = t.redemption_id AND il.invoice_id <> t.invoice_id
                       AND iv.status <> 'VOID'
                       AND (t.carry_over OR coalesce((iv.meta_data->>'nominal_start')::timestamptz, iv.period_start) = t.nps)), 0))) END AS raw
      FROM (SELECT c.org_id, c.sub_id, c.invoice_id, c.currency, c.ps, c.pe, c.nps, c.redemption_id, c.coupon_id, c.code, c.name,
                   c.discount_type, c.percent_off, c.amount_off, c.carry_over, c.ord,
                   max(c.whole) AS whole, max(c.whole_rounded) AS whole_rounded, max(c.last_pos) AS last_pos,
                   coalesce(sum(c.left_before * c.percent_off / 100) FILTER (WHERE c.discount_type = 'percentage'), 0) AS pct_taken,
                   coalesce(sum(c.amount - c.line_taken) FILTER (WHERE c.discount_type = 'fixed'), 0) AS fixed_room
              FROM dcover2 c
             GROUP BY c.org_id, c.sub_id, c.invoice_id, c.currency, c.ps, c.pe, c.nps, c.redemption_id, c.coupon_id, c.code, c.name,
                      c.discount_type, c.percent_off, c.amount_off, c.carry_over, c.ord) t
  ), dcap AS (
    SELECT w.*,
           least(w.whole, sum(w.raw) OVER (PARTITION BY w.org_id, w.sub_id ORDER BY w.ord)) AS cum,
           least(w.whole_rounded, sum(fluxrate_internal.round_money(w.raw, w.currency))
                 OVER (PARTITION BY w.org_id, w.sub_id ORDER BY w.ord)) AS cum_rounded
      FROM draw w
  ), disc AS MATERIALIZED (
    SELECT x.org_id, x.sub_id, x.invoice_id, x.currency,
           x.last_pos + row_number() OVER (PARTITION BY x.org_id, x.sub_id ORDER BY x.ord)::integer AS pos,
           'discount'::text AS line_type, NULL::uuid AS charge_id,
           x.name || ' (' || x.code || ')' AS description,
           1::numeric AS quantity, trim_scale(round(-x.amount, 12)) AS unit_amount, -x.amount AS amount, x.ps AS line_start, x.pe AS line_end,
           jsonb_build_object('coupon_id', x.coupon_id, 'code', x.code, 'discount_type', x.discount_type)
             || CASE WHEN x.discount_type = 'percentage' THEN jsonb_build_object('percent_off', x.percent_off)
                     ELSE jsonb_build_object('amount_off', x.amount_off, 'carry_over', x.carry_over) END AS meta,
           -x.amount_rounded AS line_total, x.redemption_id
      FROM (SELECT c.*, c.cum - coalesce(lag(c.cum) OVER w, 0) AS amount,
                   c.cum_rounded - coalesce(lag(c.cum_rounded) OVER w, 0) AS amount_rounded
              FROM dcap c
            WINDOW w AS (PARTITION BY c.org_id, c.sub_id ORDER BY c.ord)) x
     WHERE x.amount > 0 OR x.amount_rounded > 0
  )
$sql$ $fn$;

-- fill_lines' discount lines for one subscription invoice (the reference the
-- closer matches): the fixed-amount redemptions it reads are locked first, so
-- two invoices of one subscription computed at once (a closing and a draft's
-- refresh) cannot both spend the same allowance; this statement's snapshot is
-- taken after the lock.
CREATE FUNCTION fluxrate_internal.write_discount_lines(i fluxrate_internal.invoices) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_plan uuid;
BEGIN
  IF i.subscription_id IS NULL THEN
    RETURN;
  END IF;
  -- the plan the invoice was rated with (a plan change may have moved the subscription since)
  SELECT coalesce((i.meta_data->>'plan_id')::uuid, s.plan_id) INTO v_plan
    FROM fluxrate_internal.subscriptions s WHERE s.org_id = i.org_id AND s.id = i.subscription_id;
  PERFORM 1 FROM fluxrate_internal.coupon_redemptions r
    JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id AND k.discount_type = 'fixed'
   WHERE r.org_id = i.org_id AND r.status = 'ACTIVE'
     AND (r.subscription_id = i.subscription_id OR (r.subscription_id IS NULL AND r.customer_id = i.customer_id))
   ORDER BY r.id
     FOR UPDATE OF r;
  EXECUTE 'WITH dctx AS (SELECT $1::uuid AS org_id, $2::uuid AS sub_id, $3::uuid AS customer_id, $4::uuid AS plan_id,
                                $5::uuid AS invoice_id, $6::text AS currency, $7::timestamptz AS ps, $8::timestamptz AS pe,
                                $9::timestamptz AS nps),
                lines AS (SELECT l.org_id, $2::uuid AS sub_id, l.position AS pos, l.line_type, l.charge_id,
                                 coalesce(l.amount_unrounded, l.line_total) AS amount, l.period_start AS line_start,
                                 l.period_end AS line_end, l.line_total
                            FROM fluxrate_internal.invoice_lines l WHERE l.org_id = $1 AND l.invoice_id = $5), '
       || fluxrate_internal.close_sql_discounts() || '
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta, redemption_id)
    SELECT d.org_id, d.invoice_id, d.pos, d.line_type, d.charge_id, d.description, d.quantity, d.unit_amount,
           d.line_total, d.amount, d.line_start, d.line_end, d.meta, d.redemption_id FROM disc d'
  USING i.org_id, i.subscription_id, i.customer_id, v_plan, i.id, i.currency, i.period_start, i.period_end,
        coalesce((i.meta_data->>'nominal_start')::timestamptz, i.period_start);
END
$$;

-- The closer's lock of the same (sys_close_batch, before its statement).
CREATE FUNCTION fluxrate_internal.lock_fixed_redemptions(batch fluxrate_internal.subscriptions[]) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  -- (PERFORM reads every row, so every one is locked; a SQL function would stop at the first)
  PERFORM 1 FROM fluxrate_internal.coupon_redemptions r
    JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id AND k.discount_type = 'fixed'
    JOIN unnest(batch) x ON x.org_id = r.org_id
         AND (r.subscription_id = x.id OR (r.subscription_id IS NULL AND r.customer_id = x.customer_id))
   WHERE r.status = 'ACTIVE'
   ORDER BY r.org_id, r.id
     FOR UPDATE OF r;
END
$$;

-- The API -------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.coupon_json(k fluxrate_internal.coupons) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', k.id, 'code', k.code, 'name', k.name, 'discount_type', k.discount_type,
    'percent_off', k.percent_off, 'amount_off', k.amount_off, 'currency', k.currency, 'duration', k.duration,
    'duration_periods', k.duration_periods, 'carry_over', k.carry_over, 'charge_ids', k.charge_ids, 'plan_ids', k.plan_ids,
    'max_redemptions', k.max_redemptions, 'times_redeemed', k.times_redeemed, 'redeem_by', k.redeem_by,
    'status', k.status, 'created_at', k.created_at)
$$;

CREATE FUNCTION fluxrate_internal.redemption_json(r fluxrate_internal.coupon_redemptions) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', r.id, 'coupon_id', r.coupon_id, 'customer_id', r.customer_id,
    'subscription_id', r.subscription_id, 'applies_from', r.applies_from, 'applies_until', r.applies_until,
    'status', r.status, 'redeemed_at', r.redeemed_at, 'removed_at', r.removed_at)
$$;

-- The checks of a new coupon's terms (all before anything is written).
CREATE FUNCTION fluxrate_internal.check_coupon_terms(org_id uuid, discount_type text, percent_off numeric, amount_off numeric,
    currency text, duration text, duration_periods integer, carry_over boolean, charge_ids uuid[], plan_ids uuid[],
    max_redemptions integer)
  RETURNS void
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.one_of(discount_type, 'discount_type', ARRAY['percentage', 'fixed']);
  PERFORM fluxrate_internal.one_of(duration, 'duration', ARRAY['once', 'repeating', 'forever']);
  PERFORM fluxrate_internal.check_decimal(percent_off, 'percent_off', false);
  PERFORM fluxrate_internal.check_decimal(amount_off, 'amount_off', false);
  IF discount_type = 'percentage' AND (percent_off IS NULL OR amount_off IS NOT NULL OR percent_off > 100) THEN
    PERFORM fluxrate_internal.fail('PT422', 'a percentage coupon needs percent_off, above 0 and at most 100, and no amount_off',
      format('percent_off was %s, amount_off %s.', coalesce(percent_off::text, 'null'), coalesce(amount_off::text, 'null')),
      '20% off is percent_off 20.');
  END IF;
  IF discount_type = 'fixed' AND (amount_off IS NULL OR currency IS NULL OR percent_off IS NOT NULL) THEN
    PERFORM fluxrate_internal.fail('PT422', 'a fixed coupon needs amount_off and currency, and no percent_off',
      format('amount_off was %s, currency %s.', coalesce(amount_off::text, 'null'), coalesce(currency, 'null')));
  END IF;
  IF currency IS NOT NULL AND (currency !~ '^[A-Z]{3}$' OR fluxrate_internal.currency_exponent(currency) IS NULL) THEN
    PERFORM fluxrate_internal.fail('22023', format('invalid currency: %s', currency), 'currency is an ISO 4217 code such as USD.');
  END IF;
  IF amount_off IS NOT NULL AND scale(trim_scale(amount_off)) > fluxrate_internal.currency_exponent(currency) THEN
    PERFORM fluxrate_internal.fail('PT422', format('amount_off has more decimals than %s has', currency),
      format('amount_off was %s; %s has %s.', amount_off, currency, fluxrate_internal.currency_exponent(currency)));
  END IF;
  IF (duration = 'repeating') <> (duration_periods IS NOT NULL) OR duration_periods NOT BETWEEN 1 AND 1200 THEN
    PERFORM fluxrate_internal.fail('PT422', 'duration_periods goes with duration repeating, from 1 to 1200',
      format('duration was %s, duration_periods %s.', duration, coalesce(duration_periods::text, 'null')));
  END IF;
  IF carry_over AND discount_type <> 'fixed' THEN
    PERFORM fluxrate_internal.fail('PT422', 'carry_over applies to fixed amounts only', 'A percentage has nothing to carry.');
  END IF;
  IF max_redemptions IS NOT NULL AND max_redemptions <= 0 THEN
    PERFORM fluxrate_internal.fail('PT422', 'max_redemptions must be greater than zero', format('max_redemptions was %s.', max_redemptions));
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(charge_ids) c WHERE NOT EXISTS (SELECT 1 FROM fluxrate_internal.charges x
               WHERE x.org_id = check_coupon_terms.org_id AND x.id = c)) THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', 'Every charge_ids entry is a charge of this organization.');
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(plan_ids) p WHERE NOT EXISTS (SELECT 1 FROM fluxrate_internal.plans x
               WHERE x.org_id = check_coupon_terms.org_id AND x.id = p)) THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', 'Every plan_ids entry is a plan of this organization.');
  END IF;
END
$$;

CREATE FUNCTION fluxrate.create_coupon(code text DEFAULT NULL, name text DEFAULT NULL, discount_type text DEFAULT NULL,
    percent_off numeric DEFAULT NULL, amount_off numeric DEFAULT NULL, currency text DEFAULT NULL,
    duration text DEFAULT 'once', duration_periods integer DEFAULT NULL, carry_over boolean DEFAULT false,
    charge_ids uuid[] DEFAULT NULL, plan_ids uuid[] DEFAULT NULL, max_redemptions integer DEFAULT NULL,
    redeem_by timestamptz DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  v_type text := lower(create_coupon.discount_type);
  v_duration text := lower(coalesce(create_coupon.duration, 'once'));
  v_currency text := upper(create_coupon.currency);
  k fluxrate_internal.coupons;
BEGIN
  PERFORM fluxrate_internal.required(create_coupon.code, 'code');
  PERFORM fluxrate_internal.required(v_type, 'discount_type');
  IF create_coupon.code !~ '^[A-Za-z0-9_-]{1,64}$' THEN
    PERFORM fluxrate_internal.fail('22023', 'invalid code', 'A code is 1 to 64 letters, digits, "_" or "-".');
  END IF;
  PERFORM fluxrate_internal.check_coupon_terms(v_org, v_type, create_coupon.percent_off, create_coupon.amount_off, v_currency,
    v_duration, create_coupon.duration_periods, coalesce(create_coupon.carry_over, false), create_coupon.charge_ids,
    create_coupon.plan_ids, create_coupon.max_redemptions);
  IF create_coupon.redeem_by IS NOT NULL AND NOT isfinite(create_coupon.redeem_by) THEN
    PERFORM fluxrate_internal.fail('PT422', 'redeem_by must be a finite instant', 'Leave it out for no expiry.');
  END IF;
  INSERT INTO fluxrate_internal.coupons (org_id, code, name, discount_type, percent_off, amount_off, currency, duration,
      duration_periods, carry_over, charge_ids, plan_ids, max_redemptions, redeem_by, created_at)
  VALUES (v_org, create_coupon.code, coalesce(nullif(btrim(create_coupon.name), ''), create_coupon.code), v_type,
          create_coupon.percent_off, create_coupon.amount_off, v_currency, v_duration, create_coupon.duration_periods,
          coalesce(create_coupon.carry_over, false), create_coupon.charge_ids, create_coupon.plan_ids,
          create_coupon.max_redemptions, create_coupon.redeem_by, fluxrate.now())
  ON CONFLICT ON CONSTRAINT coupons_org_id_code_key DO NOTHING
  RETURNING * INTO k;
  IF k.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT409', 'a coupon with this code already exists', format('code %s is taken.', create_coupon.code));
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.coupon_json(k);
END
$$;

CREATE FUNCTION fluxrate_internal.load_coupon(org_id uuid, coupon_id uuid, lock boolean DEFAULT false)
  RETURNS fluxrate_internal.coupons
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k fluxrate_internal.coupons;
BEGIN
  PERFORM fluxrate_internal.required(load_coupon.coupon_id, 'coupon_id');
  IF lock THEN
    SELECT * INTO k FROM fluxrate_internal.coupons x WHERE x.org_id = load_coupon.org_id AND x.id = load_coupon.coupon_id FOR UPDATE;
  ELSE
    SELECT * INTO k FROM fluxrate_internal.coupons x WHERE x.org_id = load_coupon.org_id AND x.id = load_coupon.coupon_id;
  END IF;
  IF k.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'coupon not found', format('No coupon %s in this organization.', coupon_id));
  END IF;
  RETURN k;
END
$$;

CREATE FUNCTION fluxrate.get_coupon(coupon_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  k fluxrate_internal.coupons;
BEGIN
  PERFORM fluxrate_internal.required(get_coupon.coupon_id, 'coupon_id');
  SELECT * INTO k FROM fluxrate_internal.coupons x WHERE x.org_id = v_org AND x.id = get_coupon.coupon_id;
  IF k.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'coupon not found', format('No coupon %s in this organization.', coupon_id));
  END IF;
  RETURN fluxrate_internal.coupon_json(k);
END
$$;

CREATE FUNCTION fluxrate.list_coupons(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.coupon_json(k) ORDER BY k.created_at, k.id)
       FROM (SELECT * FROM fluxrate_internal.coupons x WHERE x.org_id = v_org
              ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) k),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.coupons x WHERE x.org_id = v_org));
END
$$;

-- No new redemptions; the existing ones run their course.
CREATE FUNCTION fluxrate.archive_coupon(coupon_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  k fluxrate_internal.coupons := fluxrate_internal.load_coupon(v_org, archive_coupon.coupon_id, true);
BEGIN
  UPDATE fluxrate_internal.coupons x SET status = 'ARCHIVED' WHERE x.org_id = v_org AND x.id = k.id RETURNING * INTO k;
  RETURN fluxrate_internal.coupon_json(k);
END
$$;

-- The window of a new redemption.  On a subscription: whole billing periods
-- from the current one (a TRIAL's first billed period: billing starts at its
-- anchor), duration_periods of them ('once' = 1, 'forever' = no end).
-- Customer-wide: from now, forever.
CREATE FUNCTION fluxrate_internal.redemption_window(k fluxrate_internal.coupons, s fluxrate_internal.subscriptions,
    OUT applies_from timestamptz, OUT applies_until timestamptz)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_first integer := CASE WHEN s.status = 'TRIAL' THEN 0 ELSE s.current_period_index END;
  v_n integer := CASE k.duration WHEN 'once' THEN 1 WHEN 'repeating' THEN k.duration_periods END;
BEGIN
  IF s.id IS NULL THEN
    applies_from := fluxrate.now();
    RETURN;
  END IF;
  applies_from := CASE WHEN s.status = 'TRIAL' THEN s.billing_anchor ELSE s.current_period_start END;
  IF v_n IS NOT NULL THEN
    applies_until := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, v_first + v_n);
  END IF;
END
$$;

-- Why a coupon cannot be redeemed now (NULL: it can); the order of the checks
-- is the order of the errors.
CREATE FUNCTION fluxrate_internal.coupon_refusal(k fluxrate_internal.coupons, at timestamptz,
    OUT code text, OUT message text, OUT detail text)
  LANGUAGE sql STABLE
  AS $$
  SELECT CASE WHEN k.status <> 'ACTIVE' THEN 'PT409' WHEN k.redeem_by IS NOT NULL AND k.redeem_by <= at THEN 'PT422'
              WHEN k.max_redemptions IS NOT NULL AND k.times_redeemed >= k.max_redemptions THEN 'PT409' END,
         CASE WHEN k.status <> 'ACTIVE' THEN 'the coupon is archived'
              WHEN k.redeem_by IS NOT NULL AND k.redeem_by <= at THEN 'the coupon has expired'
              WHEN k.max_redemptions IS NOT NULL AND k.times_redeemed >= k.max_redemptions THEN 'the coupon has reached its redemption limit' END,
         CASE WHEN k.status <> 'ACTIVE' THEN pg_catalog.format('Coupon %s takes no new redemptions.', k.code)
              WHEN k.redeem_by IS NOT NULL AND k.redeem_by <= at THEN pg_catalog.format('It could be redeemed until %s.', k.redeem_by)
              WHEN k.max_redemptions IS NOT NULL AND k.times_redeemed >= k.max_redemptions
                THEN pg_catalog.format('It was redeemed %s times of %s.', k.times_redeemed, k.max_redemptions) END
$$;

-- Redeem a coupon (by id or code) on a subscription, or customer-wide (every
-- subscription of the customer, forever coupons only).  The redemption limit
-- holds under concurrent redemptions: the counter is raised by one UPDATE
-- whose condition is re-checked on the row's latest version after a
-- concurrent redemption commits (READ COMMITTED's re-check), so the (N+1)th
-- of N concurrent ones is refused and writes nothing.
CREATE FUNCTION fluxrate.redeem_coupon(coupon_id uuid DEFAULT NULL, code text DEFAULT NULL, subscription_id uuid DEFAULT NULL,
    customer_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  v_now timestamptz := fluxrate.now();
  k fluxrate_internal.coupons;
  s fluxrate_internal.subscriptions;
  v_currency text;
  v_customer uuid := redeem_coupon.customer_id;
  w record;
  f record;
  r fluxrate_internal.coupon_redemptions;
BEGIN
  SELECT * INTO k FROM fluxrate_internal.coupons x
   WHERE x.org_id = v_org AND (x.id = redeem_coupon.coupon_id OR (redeem_coupon.coupon_id IS NULL AND x.code = redeem_coupon.code));
  IF k.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'coupon not found', 'Name a coupon of this organization by coupon_id or code.');
  END IF;
  IF (redeem_coupon.subscription_id IS NULL) = (redeem_coupon.customer_id IS NULL) THEN
    PERFORM fluxrate_internal.fail('22023', 'redeem on a subscription or a customer, one of the two',
      'Send subscription_id, or customer_id for every subscription of the customer.');
  END IF;
  IF redeem_coupon.subscription_id IS NOT NULL THEN
    SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = redeem_coupon.subscription_id FOR UPDATE;
    IF s.id IS NULL THEN
      PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', redeem_coupon.subscription_id));
    END IF;
    IF s.status NOT IN ('TRIAL', 'ACTIVE', 'PAST_DUE') THEN
      PERFORM fluxrate_internal.fail('PT409', format('cannot redeem a coupon on a subscription that is %s', s.status), 'It bills nothing more.');
    END IF;
    SELECT p.currency INTO v_currency FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = s.plan_id;
    IF k.currency IS NOT NULL AND k.currency <> v_currency THEN
      PERFORM fluxrate_internal.fail('PT422', 'the coupon''s currency is not the subscription''s',
        format('Coupon %s is in %s; the subscription bills in %s.', k.code, k.currency, v_currency));
    END IF;
    IF k.plan_ids IS NOT NULL AND NOT s.plan_id = ANY (k.plan_ids) THEN
      PERFORM fluxrate_internal.fail('PT422', 'the coupon does not apply to this subscription''s plan',
        format('Coupon %s is limited to %s plan(s).', k.code, cardinality(k.plan_ids)));
    END IF;
    v_customer := s.customer_id;
  ELSE
    PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = v_customer;
    IF NOT FOUND THEN
      PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', v_customer));
    END IF;
    IF k.duration <> 'forever' THEN
      PERFORM fluxrate_internal.fail('PT422', format('a customer-wide redemption needs a forever coupon, not %s', k.duration),
        format('Coupon %s lasts %s.', k.code, k.duration),
        'Periods are a subscription''s: redeem a once or repeating coupon on the subscription.');
    END IF;
  END IF;
  -- the limit, the expiry and the status, under the coupon row's lock
  UPDATE fluxrate_internal.coupons x SET times_redeemed = x.times_redeemed + 1
   WHERE x.org_id = v_org AND x.id = k.id AND x.status = 'ACTIVE'
     AND (x.redeem_by IS NULL OR x.redeem_by > v_now)
     AND (x.max_redemptions IS NULL OR x.times_redeemed < x.max_redemptions)
  RETURNING * INTO k;
  IF NOT FOUND THEN
    SELECT * INTO f FROM fluxrate_internal.coupon_refusal(fluxrate_internal.load_coupon(v_org, coalesce(redeem_coupon.coupon_id,
      (SELECT x.id FROM fluxrate_internal.coupons x WHERE x.org_id = v_org AND x.code = redeem_coupon.code))), v_now);
    PERFORM fluxrate_internal.fail(f.code, f.message, f.detail);
  END IF;
  SELECT * INTO w FROM fluxrate_internal.redemption_window(k, s);
  INSERT INTO fluxrate_internal.coupon_redemptions (org_id, id, coupon_id, customer_id, subscription_id, applies_from, applies_until, redeemed_at)
  VALUES (v_org, fluxrate_internal.uuid_v7(), k.id, v_customer, redeem_coupon.subscription_id, w.applies_from, w.applies_until, v_now)
  ON CONFLICT DO NOTHING
  RETURNING * INTO r;
  IF r.id IS NULL THEN
    -- (the counter's raise is rolled back with the error)
    PERFORM fluxrate_internal.fail('PT409', 'the coupon is already redeemed here',
      format('Coupon %s has an active redemption on this %s.', k.code,
             CASE WHEN redeem_coupon.subscription_id IS NULL THEN 'customer' ELSE 'subscription' END));
  END IF;
  PERFORM fluxrate_internal.emit_event(v_org, 'coupon.redeemed', jsonb_build_object('redemption_id', r.id, 'coupon_id', k.id,
    'code', k.code, 'customer_id', r.customer_id, 'subscription_id', r.subscription_id));
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.redemption_json(r);
END
$$;

-- A customer's or a subscription's redemptions, with their coupons.
CREATE FUNCTION fluxrate.list_redemptions(customer_id uuid DEFAULT NULL, subscription_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
BEGIN
  IF list_redemptions.customer_id IS NULL AND list_redemptions.subscription_id IS NULL THEN
    PERFORM fluxrate_internal.fail('22004', 'customer_id or subscription_id is required', 'Send one of the two.');
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.redemption_json(r) || jsonb_build_object('coupon', fluxrate_internal.coupon_json(k))
                                    ORDER BY r.redeemed_at, r.id)
                     FROM fluxrate_internal.coupon_redemptions r
                     JOIN fluxrate_internal.coupons k ON k.org_id = r.org_id AND k.id = r.coupon_id
                    WHERE r.org_id = v_org
                      AND (list_redemptions.customer_id IS NULL OR r.customer_id = list_redemptions.customer_id)
                      AND (list_redemptions.subscription_id IS NULL OR r.subscription_id = list_redemptions.subscription_id)), '[]'::jsonb);
END
$$;

-- Remove a redemption: invoices closed from now on (and drafts refreshed at
-- finalization) carry it no more; finalized invoices keep theirs.  The
-- coupon's redemption count is not given back (it was redeemed).
CREATE FUNCTION fluxrate.remove_redemption(redemption_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  r fluxrate_internal.coupon_redemptions;
BEGIN
  PERFORM fluxrate_internal.required(remove_redemption.redemption_id, 'redemption_id');
  UPDATE fluxrate_internal.coupon_redemptions x SET status = 'REMOVED', removed_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = remove_redemption.redemption_id AND x.status = 'ACTIVE'
  RETURNING * INTO r;
  IF r.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'active redemption not found',
      format('No active redemption %s in this organization.', remove_redemption.redemption_id));
  END IF;
  RETURN fluxrate_internal.redemption_json(r);
END
$$;
