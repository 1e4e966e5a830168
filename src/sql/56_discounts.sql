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
  id               uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
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
