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

-- issue 15, items 1 and 4 (plan changes, versioned plans; 23_plan_versions.sql,
-- 56_plan_changes.sql, docs/lifecycle.md "Plan changes", docs/rating.md
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
