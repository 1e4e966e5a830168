-- 00_schema.sql: schemas, roles and every table.
--
-- Schema fluxrate          : the public API (functions, views).  This is the
--                            schema PostgREST exposes.
-- Schema fluxrate_internal : tables and helpers.  Nobody but the owner roles
--                            can touch it; the API functions are the only door.
--
-- Every table is keyed by org_id first: org_id leads every primary key and is
-- part of every unique key and foreign key, so every table can later be
-- distributed by organization with Citus (colocated on org_id).  Row-level
-- security is enabled and FORCED on every table; the API functions run as the
-- non-superuser role fluxrate_owner, so the policies really apply to them.

CREATE SCHEMA fluxrate_internal;
COMMENT ON SCHEMA fluxrate_internal IS 'fluxrate tables and internal helpers; use the functions in schema fluxrate';

-- Roles are cluster-wide; create them only when missing (re-install, several databases).
DO $roles$
BEGIN
  -- owns the tables and the SECURITY DEFINER API functions; row-level security applies to it
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_owner') THEN
    CREATE ROLE fluxrate_owner NOLOGIN;
  END IF;
  -- owns the few functions that must work across organizations (closing jobs,
  -- API-key lookup by hash, login by e-mail, public invoice links)
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_system') THEN
    CREATE ROLE fluxrate_system NOLOGIN BYPASSRLS;
  END IF;
  -- trusted application roles: may act for any organization (fluxrate.act_as)
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_app') THEN
    CREATE ROLE fluxrate_app NOLOGIN;
  END IF;
END
$roles$;

CREATE FUNCTION fluxrate_internal.current_org_id() RETURNS uuid
  LANGUAGE sql STABLE PARALLEL SAFE
  AS $$ SELECT NULLIF(pg_catalog.current_setting('fluxrate.current_org', true), '')::uuid $$;
COMMENT ON FUNCTION fluxrate_internal.current_org_id() IS
  'organization resolved by the running API call (row-level security reads it)';

CREATE TABLE fluxrate_internal.organizations (
  org_id              uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  name                text NOT NULL CHECK (pg_catalog.length(name) BETWEEN 1 AND 200),
  billing_country     text CHECK (billing_country ~ '^[A-Z]{2}$'),
  billing_state       text,
  payment_terms_days  integer NOT NULL DEFAULT 30 CHECK (payment_terms_days BETWEEN 0 AND 3650),
  grace_period        interval NOT NULL DEFAULT '1 hour' CHECK (grace_period >= '0'::interval),
  auto_email          boolean NOT NULL DEFAULT true,
  -- public invoice links are this prefix followed by the invoice's token
  invoice_link_base   text NOT NULL DEFAULT 'http://localhost:3000/rpc/public_invoice?token='
                      CHECK (invoice_link_base ~ '^https?://'),
  created_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id)
);

CREATE TABLE fluxrate_internal.api_keys (
  org_id        uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id            uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  name          text NOT NULL CHECK (pg_catalog.length(name) BETWEEN 1 AND 200),
  prefix        text NOT NULL,             -- first characters of the secret, for display
  key_hash      bytea NOT NULL,            -- keyed BLAKE2b-256 of the whole secret
  scopes        text[] NOT NULL,
  status        text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'REVOKED')),
  created_at    timestamptz NOT NULL,
  revoked_at    timestamptz,
  last_used_at  timestamptz,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, key_hash)
);
-- lookup by hash before the organization is known (the hash is unique in practice;
-- the unique constraint above carries org_id for Citus)
CREATE INDEX api_keys_hash_idx ON fluxrate_internal.api_keys (key_hash);

CREATE TABLE fluxrate_internal.features (
  org_id       uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id           uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  name         text NOT NULL,
  lookup_key   text NOT NULL,
  type         text NOT NULL CHECK (type IN ('meter', 'switch', 'custom')),
  description  text,
  created_at   timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, lookup_key)
);

CREATE TABLE fluxrate_internal.meters (
  org_id            uuid NOT NULL,
  id                uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  feature_id        uuid NOT NULL,
  meter_token       uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  meter_name        text NOT NULL,
  property_name     text NOT NULL,
  aggregation_type  text NOT NULL CHECK (aggregation_type IN
                      ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'UNIQUE_COUNT', 'LAST', 'WEIGHTED_SUM')),
  unique_property   text NOT NULL DEFAULT 'user_id',  -- UNIQUE_COUNT reads metadata[unique_property]
  unit              text,
  filters           jsonb NOT NULL DEFAULT '[]',
  created_at        timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, meter_name),
  UNIQUE (org_id, meter_token),
  FOREIGN KEY (org_id, feature_id) REFERENCES fluxrate_internal.features (org_id, id) ON DELETE CASCADE
);

CREATE TABLE fluxrate_internal.plans (
  org_id              uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id                  uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  name                text NOT NULL,
  lookup_id           text NOT NULL,
  type                text NOT NULL CHECK (type IN ('FIXED', 'USAGE', 'HYBRID')),
  billing_interval    text NOT NULL CHECK (billing_interval IN ('day', 'week', 'month', 'quarter', 'year')),
  currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  trial_days          integer NOT NULL DEFAULT 0 CHECK (trial_days BETWEEN 0 AND 3650),
  description         text,
  is_active           boolean NOT NULL DEFAULT true,
  minimum_commitment  numeric CHECK (minimum_commitment >= 0),
  created_at          timestamptz NOT NULL,
  -- versions (25_plan_versions.sql): editing the prices of a plan that has
  -- subscriptions makes a new row, version + 1, of the same family (the first
  -- version's id; NULL on the first version itself); the old row gets
  -- superseded_by and keeps billing its subscriptions
  version             integer NOT NULL DEFAULT 1 CHECK (version >= 1),
  family_id           uuid,
  superseded_by       uuid,
  PRIMARY KEY (org_id, id)
);
-- a lookup_id names the current version of its family
CREATE UNIQUE INDEX plans_lookup_id_idx ON fluxrate_internal.plans (org_id, lookup_id) WHERE superseded_by IS NULL;

CREATE TABLE fluxrate_internal.charges (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  plan_id         uuid NOT NULL,
  type            text NOT NULL CHECK (type IN ('FIXED', 'USAGE')),
  meter_id        uuid,
  display_name    text,
  -- per_unit: unit_price; graduated/volume: tiers [{up_to, unit_price, flat_fee}];
  -- package: package_size + package_price.  free_units apply to all usage models.
  pricing_model   text NOT NULL DEFAULT 'per_unit'
                    CHECK (pricing_model IN ('per_unit', 'graduated', 'volume', 'package', 'flat')),
  unit_price      numeric,
  tiers           jsonb,
  package_size    numeric,
  package_price   numeric,
  free_units      numeric NOT NULL DEFAULT 0 CHECK (free_units >= 0),
  billing_timing  text NOT NULL DEFAULT 'in_advance' CHECK (billing_timing IN ('in_advance', 'in_arrears')),
  status          text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'INACTIVE')),
  created_at      timestamptz NOT NULL,
  -- the charge of an earlier plan version this one was copied from (its first
  -- version's id; NULL on a charge added to its plan directly)
  origin_id       uuid,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, plan_id) REFERENCES fluxrate_internal.plans (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, meter_id) REFERENCES fluxrate_internal.meters (org_id, id),
  CHECK ((type = 'USAGE') = (meter_id IS NOT NULL))
);
CREATE INDEX charges_plan_idx ON fluxrate_internal.charges (org_id, plan_id);

CREATE TABLE fluxrate_internal.plan_features (
  org_id              uuid NOT NULL,
  id                  uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  plan_id             uuid NOT NULL,
  feature_id          uuid NOT NULL,
  is_enabled          boolean NOT NULL DEFAULT true,
  usage_limit         numeric CHECK (usage_limit >= 0),
  usage_reset_period  text CHECK (usage_reset_period IN ('day', 'week', 'month', 'year')),
  is_soft_limit       boolean NOT NULL DEFAULT false,
  static_value        text,
  created_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, plan_id, feature_id),
  FOREIGN KEY (org_id, plan_id) REFERENCES fluxrate_internal.plans (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, feature_id) REFERENCES fluxrate_internal.features (org_id, id) ON DELETE CASCADE
);

CREATE TABLE fluxrate_internal.customers (
  org_id                       uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id                           uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  name                         text NOT NULL,
  email                        text,
  external_id                  text,
  phone                        text,
  billing_address_line1        text,
  billing_address_city         text,
  billing_address_state        text,
  billing_address_country      text CHECK (billing_address_country ~ '^[A-Z]{2}$'),
  billing_address_postal_code  text,
  created_at                   timestamptz NOT NULL,
  updated_at                   timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, external_id)
);

CREATE TABLE fluxrate_internal.subscriptions (
  org_id                uuid NOT NULL,
  id                    uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  customer_id           uuid NOT NULL,
  plan_id               uuid NOT NULL,
  billing_interval      text NOT NULL CHECK (billing_interval IN ('day', 'week', 'month', 'quarter', 'year')),
  alignment             text NOT NULL DEFAULT 'anniversary' CHECK (alignment IN ('anniversary', 'calendar')),
  start_date            timestamptz NOT NULL,
  billing_anchor        timestamptz NOT NULL,     -- boundaries are anchor + n * interval (trial end, if any)
  current_period_index  integer NOT NULL DEFAULT 0,  -- n of the current period [b(n), b(n+1))
  trial_end_date        timestamptz,
  status                text NOT NULL CHECK (status IN ('TRIAL', 'ACTIVE', 'PAST_DUE', 'PAUSED', 'CANCELED')),
  current_period_start  timestamptz NOT NULL,
  current_period_end    timestamptz NOT NULL,
  cancel_at_period_end  boolean NOT NULL DEFAULT false,
  canceled_at           timestamptz,
  cancel_reason         text,
  ended_at              timestamptz,
  last_invoiced_date    timestamptz,
  created_at            timestamptz NOT NULL,
  -- a closing that failed for this subscription alone (the others of its batch
  -- were closed): retried from close_retry_at, the error kept for operators
  close_retry_at        timestamptz,
  close_error           jsonb,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, plan_id) REFERENCES fluxrate_internal.plans (org_id, id)
);
CREATE INDEX subscriptions_customer_idx ON fluxrate_internal.subscriptions (org_id, customer_id);
-- the closer's work list: what is due, across organizations, in the order the
-- closer claims it (a batch is the first rows of the index, not a sort of all due rows)
CREATE INDEX subscriptions_due_idx ON fluxrate_internal.subscriptions (current_period_end, org_id, id)
  WHERE status IN ('TRIAL', 'ACTIVE', 'PAST_DUE');
-- the same per organization: a fair closing batch takes each organization's
-- earliest-due subscriptions (sys_close_claim)
CREATE INDEX subscriptions_org_due_idx ON fluxrate_internal.subscriptions (org_id, current_period_end, id)
  WHERE status IN ('TRIAL', 'ACTIVE', 'PAST_DUE');

-- Usage events.  No foreign keys on purpose: the ingest path has just resolved
-- the meter and the customer itself, and the RI triggers would add two lookups
-- and a FOR KEY SHARE row lock on the customer to every insert (contention when
-- one customer sends many events).  Customer deletion removes its events.
-- Partitioned by event time, one partition per UTC month, made ahead by the
-- minute job, plus a default partition (32_partitions.sql, docs/ingestion.md
-- "Storage layout").  A unique key of a partitioned table must hold the
-- partition key, so idempotency lives in its own table, usage_event_keys.
CREATE TABLE fluxrate_internal.usage_events (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL,              -- UUIDv7: time-ordered, appends to the PK index
  customer_id      uuid NOT NULL,
  meter_id         uuid NOT NULL,
  quantity         numeric NOT NULL,
  "timestamp"      timestamptz NOT NULL,       -- event time: decides the billing period
  ingested_at      timestamptz NOT NULL,
  idempotency_key  text,
  payload_hash     bytea,                      -- to tell a replay from a conflicting reuse
  metadata         jsonb,
  -- the inserting transaction (epoch-extended, as txid_current() gives it):
  -- what tells the usage rollups (41_rollups.sql) which events they have
  -- counted.  Not the timestamps: a transaction can commit after a later one.
  xact_id          bigint NOT NULL DEFAULT pg_catalog.txid_current(),
  -- "timestamp" because a partitioned table's keys must hold its partition key
  PRIMARY KEY (org_id, id, "timestamp")
  -- idempotency: usage_event_keys (org_id, idempotency_key), written in the
  -- same statement as the event (32_partitions.sql)
) PARTITION BY RANGE ("timestamp");
-- The rollup refresh reads the events of the transactions that committed since
-- the last one, and a reader the events not rolled up yet: the table's newest
-- pages.  BRIN, because events arrive in roughly
-- transaction order (a few bytes per 128 pages, next to nothing per insert);
-- autosummarize so that pages filled since the last VACUUM are summarized
-- without waiting for it (unsummarized ranges are always read).
CREATE INDEX usage_events_xact_idx ON fluxrate_internal.usage_events USING brin (xact_id)
  WITH (autosummarize = on);
-- Period aggregation and live usage: one customer's meter over a time range,
-- answered by an index-only scan (quantity is covered).
CREATE INDEX usage_events_usage_idx ON fluxrate_internal.usage_events
  (org_id, customer_id, meter_id, "timestamp") INCLUDE (quantity);

CREATE TABLE fluxrate_internal.invoice_counters (
  org_id    uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  year      integer NOT NULL,
  last_seq  integer NOT NULL DEFAULT 0,
  PRIMARY KEY (org_id, year)
);

CREATE TABLE fluxrate_internal.invoices (
  org_id                 uuid NOT NULL,
  id                     uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  invoice_number         text,                -- INV-YYYY-NNNN, assigned at finalization
  -- change: a plan change's invoice (55_plan_changes.sql); top_up: sells
  -- prepaid credits (59_wallets.sql), untaxed, never paid by credits
  kind                   text NOT NULL DEFAULT 'subscription'
                           CHECK (kind IN ('subscription', 'opening', 'manual', 'final', 'change', 'top_up')),
  status                 text NOT NULL DEFAULT 'DRAFT'
                           CHECK (status IN ('DRAFT', 'OPEN', 'PAID', 'VOID', 'UNCOLLECTIBLE')),
  customer_id            uuid NOT NULL,
  subscription_id        uuid,
  currency               text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  subtotal               numeric NOT NULL DEFAULT 0,
  tax                    numeric NOT NULL DEFAULT 0,
  tax_rate               numeric,
  total                  numeric NOT NULL DEFAULT 0,
  amount_due             numeric NOT NULL DEFAULT 0,
  amount_paid            numeric NOT NULL DEFAULT 0,
  period_start           timestamptz,
  period_end             timestamptz,
  issue_date             timestamptz,
  due_date               timestamptz,
  scheduled_finalize_at  timestamptz,
  finalized_at           timestamptz,
  paid_at                timestamptz,
  voided_at              timestamptz,
  public_token           uuid,
  meta_data              jsonb NOT NULL DEFAULT '{}',
  created_at             timestamptz NOT NULL,
  updated_at             timestamptz NOT NULL,
  -- what prepaid credits paid at finalization (59_wallets.sql): amount_due =
  -- total - credits_applied - amount_paid
  credits_applied        numeric NOT NULL DEFAULT 0,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, invoice_number),
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE
);
-- exactly one invoice per subscription period, whoever closes it
CREATE UNIQUE INDEX invoices_period_once_idx ON fluxrate_internal.invoices (org_id, subscription_id, period_start)
  WHERE kind = 'subscription';
-- and one opening invoice (the first period's in-advance fees) per subscription
-- period: it shares period_start with the closing invoice of the same period, so
-- it has its own kind and key
CREATE UNIQUE INDEX invoices_opening_once_idx ON fluxrate_internal.invoices (org_id, subscription_id, period_start)
  WHERE kind = 'opening';
-- and one plan-change invoice (55_plan_changes.sql: the old plan's part of the
-- period [start, change instant) with the prorations) per change instant
CREATE UNIQUE INDEX invoices_change_once_idx ON fluxrate_internal.invoices (org_id, subscription_id, period_end)
  WHERE kind = 'change';
CREATE INDEX invoices_customer_idx ON fluxrate_internal.invoices (org_id, customer_id);
-- a subscription's invoices in period order (lists, late usage)
CREATE INDEX invoices_subscription_idx ON fluxrate_internal.invoices (org_id, subscription_id, period_start);
CREATE INDEX invoices_finalize_due_idx ON fluxrate_internal.invoices (scheduled_finalize_at) WHERE status = 'DRAFT';
CREATE INDEX invoices_open_due_idx ON fluxrate_internal.invoices (due_date) WHERE status = 'OPEN';

CREATE TABLE fluxrate_internal.invoice_lines (
  org_id        uuid NOT NULL,
  id            uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  invoice_id    uuid NOT NULL,
  position      integer NOT NULL,
  line_type     text NOT NULL CHECK (line_type IN ('fixed', 'usage', 'late_usage', 'minimum', 'manual')),
  charge_id     uuid,
  description   text NOT NULL,
  quantity      numeric NOT NULL,
  unit_amount   numeric NOT NULL,
  line_total    numeric NOT NULL,                -- rounded once to the currency's minor unit
  period_start  timestamptz,
  period_end    timestamptz,
  meta          jsonb NOT NULL DEFAULT '{}',
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, invoice_id, position),
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE
);

-- Plan changes (55_plan_changes.sql): applied ones are the subscription's
-- history; a SCHEDULED one (at most one per subscription) waits for its
-- period end, when the closer applies it.
CREATE TABLE fluxrate_internal.subscription_changes (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  subscription_id  uuid NOT NULL,
  from_plan_id     uuid NOT NULL,
  to_plan_id       uuid NOT NULL,
  effective        text NOT NULL CHECK (effective IN ('now', 'period_end')),
  effective_at     timestamptz NOT NULL,
  status           text NOT NULL CHECK (status IN ('SCHEDULED', 'APPLIED', 'CANCELED')),
  new_anchor       boolean NOT NULL DEFAULT false,   -- another billing interval: periods restart at effective_at
  invoice_id       uuid,                             -- the change invoice (effective now)
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

CREATE TABLE fluxrate_internal.tax_rates (
  org_id      uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id          uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  country     text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
  state       text NOT NULL DEFAULT '',          -- '' = the whole country
  rate        numeric NOT NULL CHECK (rate >= 0 AND rate < 1),
  name        text NOT NULL DEFAULT 'Tax',
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, country, state)
);

-- The outbox: business events written in the same transaction as the change
-- that caused them (invoice.finalized, invoice.paid, subscription.canceled, ...),
-- so nothing is announced for a rolled-back change and nothing is lost for a
-- committed one.  Delivery (e-mail, webhooks) consumes it.
CREATE TABLE fluxrate_internal.outbox (
  org_id      uuid NOT NULL,
  id          uuid NOT NULL,                 -- UUIDv7: the stable event id receivers de-duplicate on
  event       text NOT NULL,
  payload     jsonb NOT NULL,                -- {event, timestamp, data}
  created_at  timestamptz NOT NULL,
  PRIMARY KEY (org_id, id)
);
