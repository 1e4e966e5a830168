-- fluxrate 0.1.0 -> 0.2.0: the hand-written steps of the upgrade.
--
-- make builds build/fluxrate--0.1.0--0.2.0.sql from this file, then every
-- replayable definition of the current parts (src/sql/upgrade/replay.py: CREATE
-- [OR REPLACE] FUNCTION/PROCEDURE, CREATE OR REPLACE ..., COMMENT ON, GRANT,
-- REVOKE, DO $roles$), then 99_security.sql.  So this file holds only what a
-- replay cannot do, in the order it must happen, before the definitions:
--   - tables, columns, constraints, indexes, types, aggregates, triggers;
--   - roles (add them to a DO $roles$ block of a part: replayed) ;
--   - DROP FUNCTION for a function removed, renamed, or whose parameter names,
--     defaults or return type changed (CREATE OR REPLACE refuses those);
--   - data migrations.
-- test/scripts/upgrade.sh installs 0.1.0, fills it, runs ALTER EXTENSION
-- fluxrate UPDATE and compares the catalog with a fresh 0.2.0 install: a
-- forgotten step shows there as a difference.
-- Every name schema-qualified, as in the install script.

-- issue 14 (90_health.sql): invoice e-mails that cannot be queued are recorded as SKIPPED
ALTER TABLE fluxrate_internal.deliveries DROP CONSTRAINT deliveries_status_check;
ALTER TABLE fluxrate_internal.deliveries ADD CONSTRAINT deliveries_status_check
  CHECK (status IN ('PENDING', 'SENT', 'FAILED', 'SKIPPED'));
CREATE INDEX deliveries_attention_idx ON fluxrate_internal.deliveries (updated_at)
  WHERE status IN ('FAILED', 'SKIPPED');
-- issue 14: DROP EXTENSION fluxrate unschedules its pg_cron jobs first.  The
-- trigger's function is defined here too (the replayed definitions come after).
CREATE OR REPLACE FUNCTION fluxrate_internal.drop_extension_guard() RETURNS event_trigger
  LANGUAGE C
  AS 'MODULE_PATHNAME', 'fr_drop_extension_guard';
CREATE EVENT TRIGGER fluxrate_drop_extension ON ddl_command_start
  WHEN TAG IN ('DROP EXTENSION')
  EXECUTE FUNCTION fluxrate_internal.drop_extension_guard();
-- render (issue 14, item 5): the media-type domains PostgREST serves the PDF
-- and HTML invoices with (75_render.sql); types are not replayed.
CREATE DOMAIN fluxrate."application/pdf" AS bytea;
CREATE DOMAIN fluxrate."text/html" AS text;
CREATE DOMAIN fluxrate."text/plain" AS text;
-- get_meter_usage gained include_empty (default false: only the buckets with
-- events or usage); a new parameter is a new signature, so the old one goes.
DROP FUNCTION fluxrate.get_meter_usage(uuid, timestamptz, timestamptz, text, uuid);
-- get_invoice returns json (keys in a logical order, with the customer's
-- name): a new return type, so the jsonb one goes.
DROP FUNCTION fluxrate.get_invoice(uuid);
-- The other single-document reads return json too (keys in a logical order).
DROP FUNCTION fluxrate.get_organization();
DROP FUNCTION fluxrate.get_feature(uuid);
DROP FUNCTION fluxrate.get_meter(uuid);
DROP FUNCTION fluxrate.get_plan(uuid);
DROP FUNCTION fluxrate.get_customer(uuid);
DROP FUNCTION fluxrate.get_subscription(uuid);
DROP FUNCTION fluxrate.get_subscription_usage(uuid);
DROP FUNCTION fluxrate.get_customer_usage(uuid);
DROP FUNCTION fluxrate.get_meter_stats(uuid);
DROP FUNCTION fluxrate.get_smtp_settings();

-- create_subscription takes backfill (docs/security.md, "Start dates"): a new
-- parameter is a new signature, so the 0.1.0 function goes and the replay
-- creates the new one (PostgREST calls it by parameter name; old calls work).
DROP FUNCTION fluxrate.create_subscription(uuid, uuid, text, timestamptz, timestamptz, text);

-- The organizations a rollup refresh set aside (40_rating.sql, docs/security.md
-- "Job fairness").
CREATE TABLE fluxrate_internal.rollup_errors (
  org_id      uuid PRIMARY KEY,
  sqlstate    text NOT NULL,
  message     text NOT NULL,
  failed_at   timestamptz NOT NULL,
  attempts    integer NOT NULL DEFAULT 1,
  retry_at    timestamptz NOT NULL
);

-- Fair closing batches take each organization's earliest-due subscriptions
-- (sys_close_claim, docs/security.md "Job fairness").
CREATE INDEX subscriptions_org_due_idx ON fluxrate_internal.subscriptions (org_id, current_period_end, id)
  WHERE status IN ('TRIAL', 'ACTIVE', 'PAST_DUE');

-- issue 15, items 1 and 4 (plan changes, versioned plans; 25_plan_versions.sql,
-- 55_plan_changes.sql, docs/lifecycle.md "Plan changes", docs/rating.md
-- "Plan versions").  Existing plans are version 1 of their own family; a
-- lookup_id names the current version, so the unique constraint becomes a
-- partial unique index.
ALTER TABLE fluxrate_internal.plans ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1);
ALTER TABLE fluxrate_internal.plans ADD COLUMN family_id uuid;
ALTER TABLE fluxrate_internal.plans ADD COLUMN superseded_by uuid;
ALTER TABLE fluxrate_internal.plans DROP CONSTRAINT plans_org_id_lookup_id_key;
CREATE UNIQUE INDEX plans_lookup_id_idx ON fluxrate_internal.plans (org_id, lookup_id) WHERE superseded_by IS NULL;
ALTER TABLE fluxrate_internal.charges ADD COLUMN origin_id uuid;
ALTER TABLE fluxrate_internal.invoices DROP CONSTRAINT invoices_kind_check;
ALTER TABLE fluxrate_internal.invoices ADD CONSTRAINT invoices_kind_check
  CHECK (kind IN ('subscription', 'opening', 'manual', 'final', 'change'));
CREATE UNIQUE INDEX invoices_change_once_idx ON fluxrate_internal.invoices (org_id, subscription_id, period_end)
  WHERE kind = 'change';
CREATE TABLE fluxrate_internal.subscription_changes (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  subscription_id  uuid NOT NULL,
  from_plan_id     uuid NOT NULL,
  to_plan_id       uuid NOT NULL,
  effective        text NOT NULL CHECK (effective IN ('now', 'period_end')),
  effective_at     timestamptz NOT NULL,
  status           text NOT NULL CHECK (status IN ('SCHEDULED', 'APPLIED', 'CANCELED')),
  new_anchor       boolean NOT NULL DEFAULT false,
  invoice_id       uuid,
  created_at       timestamptz NOT NULL,
  applied_at       timestamptz,
  canceled_at      timestamptz,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, from_plan_id) REFERENCES fluxrate_internal.plans (org_id, id),
  FOREIGN KEY (org_id, to_plan_id) REFERENCES fluxrate_internal.plans (org_id, id)
);
CREATE UNIQUE INDEX subscription_changes_scheduled_idx ON fluxrate_internal.subscription_changes (org_id, subscription_id)
  WHERE status = 'SCHEDULED';
CREATE INDEX subscription_changes_subscription_idx ON fluxrate_internal.subscription_changes (org_id, subscription_id, created_at);
-- create_period_invoice (50_periods.sql) takes the invoice's extra meta_data
-- (a change invoice's prorations): a new parameter is a new signature.
DROP FUNCTION fluxrate_internal.create_period_invoice(fluxrate_internal.subscriptions, timestamptz, timestamptz,
  timestamptz, timestamptz, text, jsonb, timestamptz, timestamptz);
-- ==== Per-subscription overrides and prices by event dimension (issue 15, items 2 and 3) ====
-- The tables of 23_overrides.sql and 24_dimensions.sql, as there.
CREATE TABLE fluxrate_internal.charge_overrides (
  org_id           uuid NOT NULL,
  subscription_id  uuid NOT NULL,
  charge_id        uuid NOT NULL,
  pricing_model    text NOT NULL CHECK (pricing_model IN ('per_unit', 'graduated', 'volume', 'package', 'flat')),
  unit_price       numeric,
  tiers            jsonb,
  package_size     numeric,
  package_price    numeric,
  free_units       numeric NOT NULL DEFAULT 0 CHECK (free_units >= 0),
  groups           jsonb,
  created_at       timestamptz NOT NULL,
  updated_at       timestamptz NOT NULL,
  PRIMARY KEY (org_id, subscription_id, charge_id),
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, charge_id) REFERENCES fluxrate_internal.charges (org_id, id) ON DELETE CASCADE
);
CREATE INDEX charge_overrides_charge_idx ON fluxrate_internal.charge_overrides (org_id, charge_id);
CREATE TABLE fluxrate_internal.minimum_overrides (
  org_id              uuid NOT NULL,
  subscription_id     uuid NOT NULL,
  minimum_commitment  numeric CHECK (minimum_commitment >= 0),
  created_at          timestamptz NOT NULL,
  updated_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id, subscription_id),
  FOREIGN KEY (org_id, subscription_id) REFERENCES fluxrate_internal.subscriptions (org_id, id) ON DELETE CASCADE
);
CREATE TABLE fluxrate_internal.meter_dimensions (
  org_id      uuid NOT NULL,
  meter_id    uuid NOT NULL,
  property    text NOT NULL CHECK (pg_catalog.length(property) BETWEEN 1 AND 255),
  "values"    text[] NOT NULL CHECK (pg_catalog.cardinality("values") BETWEEN 1 AND 100),
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, meter_id),
  FOREIGN KEY (org_id, meter_id) REFERENCES fluxrate_internal.meters (org_id, id) ON DELETE CASCADE
);
CREATE TABLE fluxrate_internal.charge_dimensions (
  org_id      uuid NOT NULL,
  charge_id   uuid NOT NULL,
  property    text NOT NULL,
  groups      jsonb NOT NULL,
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, charge_id),
  FOREIGN KEY (org_id, charge_id) REFERENCES fluxrate_internal.charges (org_id, id) ON DELETE CASCADE
);
-- The rollups are keyed by group value too (41_rollups.sql).  No meter had a
-- dimension before 0.2.0, so every existing rollup row is the group '' of its
-- (customer, meter, bucket): the migration is the default, the rows stay valid
-- for the recorded snapshot, and nothing is recounted.
ALTER TABLE fluxrate_internal.usage_rollups ADD COLUMN group_value text NOT NULL DEFAULT '';
ALTER TABLE fluxrate_internal.usage_rollups DROP CONSTRAINT usage_rollups_pkey;
ALTER TABLE fluxrate_internal.usage_rollups ADD PRIMARY KEY (org_id, width, bucket, customer_id, meter_id, group_value);
-- rollup_differences names the group: a new return type
DROP FUNCTION fluxrate_internal.rollup_differences(uuid);
-- ==== Issue 16, items 1 and 3: discounts (56_discounts.sql) and credit notes
-- (57_credit_notes.sql).  The same statements as the parts.
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

-- the exact product aggregate the compounding percentages use
CREATE AGGREGATE fluxrate_internal.numeric_product(numeric) (
  SFUNC = pg_catalog.numeric_mul, STYPE = numeric, PARALLEL = SAFE
);

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
  -- credit grant of the customer's wallet (sys_credit_note_to_wallet, not yet)
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

-- a credit note's e-mail (70_delivery.sql)
ALTER TABLE fluxrate_internal.deliveries ADD COLUMN credit_note_id uuid;
ALTER TABLE fluxrate_internal.deliveries ADD CONSTRAINT deliveries_credit_note_fkey
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE;
-- wallets (issue 16, item 2; 59_wallets.sql, docs/ledger.md): what prepaid
-- credits paid on an invoice, the top-up invoice kind, the grants, their
-- movements and the low-balance alerts.
ALTER TABLE fluxrate_internal.invoices ADD COLUMN credits_applied numeric NOT NULL DEFAULT 0;
ALTER TABLE fluxrate_internal.invoices DROP CONSTRAINT invoices_kind_check;
ALTER TABLE fluxrate_internal.invoices ADD CONSTRAINT invoices_kind_check
  CHECK (kind IN ('subscription', 'opening', 'manual', 'final', 'change', 'top_up'));
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
  status          text NOT NULL CHECK (status IN ('PENDING', 'ACTIVE', 'EXPIRED', 'VOIDED')),
  source          text NOT NULL DEFAULT 'manual' CHECK (source IN ('manual', 'top_up', 'credit_note')),
  invoice_id      uuid,
  source_id       uuid,
  name            text CHECK (pg_catalog.length(name) <= 200),
  expired_amount  numeric NOT NULL DEFAULT 0,
  created_at      timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id),
  CHECK (remaining >= 0 AND remaining <= amount),
  CHECK (expires_at IS NULL OR expires_at > effective_at)
);
CREATE INDEX credit_grants_customer_idx ON fluxrate_internal.credit_grants (org_id, customer_id, currency)
  WHERE status = 'ACTIVE';
CREATE INDEX credit_grants_expiry_idx ON fluxrate_internal.credit_grants (expires_at) WHERE status = 'ACTIVE';
CREATE UNIQUE INDEX credit_grants_invoice_idx ON fluxrate_internal.credit_grants (org_id, invoice_id)
  WHERE invoice_id IS NOT NULL;
CREATE TABLE fluxrate_internal.credit_transactions (
  org_id       uuid NOT NULL,
  id           uuid NOT NULL,
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
-- issue 17 (32_partitions.sql, 34_bulk_load.sql): usage_events partitioned by
-- event time, idempotency keys in their own table.  0.1.0's table is renamed
-- (its indexes too, to free their names), the partitioned one is made as a
-- fresh install makes it, 0.1.0's rows move into it with their ids and xact_ids
-- (so the rollups' snapshot still tells which are counted) and their keys into
-- usage_event_keys, and the old table goes.  The rows land in the default
-- partition: monthly partitions are never extension members (pg_dump must dump
-- them), so the minute job makes them, moving each month out of the default
-- (maintain_event_partitions; docs/ingestion.md "Upgrading from 0.1.0").
-- event_json's argument is the table's row type: dropped first, the replay
-- below makes it again over the new table.
DROP FUNCTION fluxrate_internal.event_json(fluxrate_internal.usage_events);
ALTER TABLE fluxrate_internal.usage_events RENAME TO usage_events_0_1_0;
ALTER INDEX fluxrate_internal.usage_events_pkey RENAME TO usage_events_0_1_0_pkey;
ALTER INDEX fluxrate_internal.usage_events_org_id_idempotency_key_key RENAME TO usage_events_0_1_0_key;
ALTER INDEX fluxrate_internal.usage_events_xact_idx RENAME TO usage_events_0_1_0_xact_idx;
ALTER INDEX fluxrate_internal.usage_events_usage_idx RENAME TO usage_events_0_1_0_usage_idx;
CREATE TABLE fluxrate_internal.usage_events (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL,
  customer_id      uuid NOT NULL,
  meter_id         uuid NOT NULL,
  quantity         numeric NOT NULL,
  "timestamp"      timestamptz NOT NULL,
  ingested_at      timestamptz NOT NULL,
  idempotency_key  text,
  payload_hash     bytea,
  metadata         jsonb,
  xact_id          bigint NOT NULL DEFAULT pg_catalog.txid_current(),
  PRIMARY KEY (org_id, id, "timestamp")
) PARTITION BY RANGE ("timestamp");
CREATE INDEX usage_events_xact_idx ON fluxrate_internal.usage_events USING brin (xact_id)
  WITH (autosummarize = on);
CREATE INDEX usage_events_usage_idx ON fluxrate_internal.usage_events
  (org_id, customer_id, meter_id, "timestamp") INCLUDE (quantity);
CREATE TABLE fluxrate_internal.usage_events_default PARTITION OF fluxrate_internal.usage_events DEFAULT;
CREATE INDEX usage_events_default_time_idx ON fluxrate_internal.usage_events_default ("timestamp");
CREATE TABLE fluxrate_internal.usage_event_keys (
  org_id           uuid NOT NULL,
  idempotency_key  text NOT NULL,
  event_id         uuid NOT NULL,
  "timestamp"      timestamptz NOT NULL,
  payload_hash     bytea,
  PRIMARY KEY (org_id, idempotency_key)
) PARTITION BY HASH (org_id);
CREATE TABLE fluxrate_internal.usage_event_keys_h0 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE fluxrate_internal.usage_event_keys_h1 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE fluxrate_internal.usage_event_keys_h2 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE fluxrate_internal.usage_event_keys_h3 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE fluxrate_internal.usage_event_keys_h4 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE fluxrate_internal.usage_event_keys_h5 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE fluxrate_internal.usage_event_keys_h6 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE fluxrate_internal.usage_event_keys_h7 PARTITION OF fluxrate_internal.usage_event_keys FOR VALUES WITH (MODULUS 8, REMAINDER 7);
INSERT INTO fluxrate_internal.usage_events
  (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key, payload_hash, metadata, xact_id)
SELECT o.org_id, o.id, o.customer_id, o.meter_id, o.quantity, o."timestamp", o.ingested_at, o.idempotency_key,
       o.payload_hash, o.metadata, o.xact_id
  FROM fluxrate_internal.usage_events_0_1_0 o;
INSERT INTO fluxrate_internal.usage_event_keys (org_id, idempotency_key, event_id, "timestamp", payload_hash)
SELECT o.org_id, o.idempotency_key, o.id, o."timestamp", o.payload_hash
  FROM fluxrate_internal.usage_events_0_1_0 o WHERE o.idempotency_key IS NOT NULL;
-- (out of the extension first: that takes it off pg_dump's list of
-- configuration tables too, which a plain DROP TABLE leaves behind)
ALTER EXTENSION fluxrate DROP TABLE fluxrate_internal.usage_events_0_1_0;
DROP TABLE fluxrate_internal.usage_events_0_1_0;
-- the bulk load's staging row (34_bulk_load.sql); types are not replayed
CREATE TYPE fluxrate.event_load_row AS (
  line                  bigint,
  meter_token           text,
  meter_name            text,
  customer_external_id  text,
  quantity              numeric,
  "timestamp"           timestamptz,
  idempotency_key       text,
  metadata              jsonb,
  properties            jsonb
);
-- retention (33_retention.sql): the organizations' policies and what left
CREATE TABLE fluxrate_internal.event_retention (
  org_id      uuid PRIMARY KEY REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  keep_days   integer NOT NULL CHECK (keep_days >= 0 AND keep_days <= 36500),
  updated_at  timestamptz NOT NULL
);
CREATE TABLE fluxrate_internal.archived_events (
  org_id         uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  month          timestamptz NOT NULL,
  archived_at    timestamptz NOT NULL,
  events         bigint NOT NULL,
  archive_table  text NOT NULL,
  PRIMARY KEY (org_id, month, archived_at)
);
