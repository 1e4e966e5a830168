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

-- wallets (issue 16, item 2; 59_wallets.sql, docs/ledger.md): what prepaid
-- credits paid on an invoice, the top-up invoice kind, the grants, their
-- movements and the low-balance alerts.
ALTER TABLE fluxrate_internal.invoices ADD COLUMN credits_applied numeric NOT NULL DEFAULT 0;
ALTER TABLE fluxrate_internal.invoices DROP CONSTRAINT invoices_kind_check;
ALTER TABLE fluxrate_internal.invoices ADD CONSTRAINT invoices_kind_check
  CHECK (kind IN ('subscription', 'opening', 'manual', 'final', 'top_up'));
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
