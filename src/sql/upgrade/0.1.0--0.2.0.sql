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
