-- fluxrate 0.1.0, as released (main at e7e41d6): frozen in src/sql/release; never edit, never rebuild.
\echo Use "CREATE EXTENSION fluxrate" to load this file. \quit

-- ==== src/sql/00_schema.sql ====
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
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, lookup_id)
);

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

-- Usage events.  No foreign keys on purpose: the ingest path has just resolved
-- the meter and the customer itself, and the RI triggers would add two lookups
-- and a FOR KEY SHARE row lock on the customer to every insert (contention when
-- one customer sends many events).  Customer deletion removes its events.
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
  -- what tells the usage rollups (40_rating.sql) which events they have
  -- counted.  Not the timestamps: a transaction can commit after a later one.
  xact_id          bigint NOT NULL DEFAULT pg_catalog.txid_current(),
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, idempotency_key)             -- exact, no expiry, same transaction as the insert
);
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
  kind                   text NOT NULL DEFAULT 'subscription' CHECK (kind IN ('subscription', 'opening', 'manual', 'final')),
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

-- ==== src/sql/10_context.sql ====
-- 10_context.sql: the clock, the calling organization, organizations.

CREATE FUNCTION fluxrate.now() RETURNS timestamptz
  LANGUAGE C STABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_now';
COMMENT ON FUNCTION fluxrate.now() IS
  'the only clock fluxrate reads: fluxrate.pinned_now when a superuser pinned it, else the transaction start';

CREATE FUNCTION fluxrate_internal.require_org(scope text) RETURNS uuid
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_require_org';
COMMENT ON FUNCTION fluxrate_internal.require_org(text) IS
  'resolves the calling organization (claims, or act_as for trusted roles), checks the scope, sets fluxrate.current_org';

CREATE FUNCTION fluxrate_internal.caller_is_trusted() RETURNS boolean
  LANGUAGE C STABLE
  AS 'MODULE_PATHNAME', 'fr_caller_is_trusted';

CREATE FUNCTION fluxrate_internal.uuid_v7() RETURNS uuid
  LANGUAGE C VOLATILE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_uuid_v7';

CREATE FUNCTION fluxrate_internal.random_token(len integer) RETURNS text
  LANGUAGE C VOLATILE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_random_token';

-- Raise a refusal with fluxrate's SQLSTATE conventions (see README "Errors").
CREATE FUNCTION fluxrate_internal.fail(code text, message text, detail text DEFAULT NULL, hint text DEFAULT NULL)
  RETURNS void LANGUAGE plpgsql
  AS $$
BEGIN
  -- RAISE refuses NULL options, and an empty DETAIL/HINT would still be printed
  IF detail IS NOT NULL AND hint IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail, HINT = hint;
  ELSIF detail IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail;
  ELSIF hint IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, HINT = hint;
  ELSE
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
  END IF;
END
$$;

-- A required argument: 22004 (HTTP 400) naming the field when it is missing.
CREATE FUNCTION fluxrate_internal.required(value anyelement, field text) RETURNS anyelement
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF value IS NULL OR (pg_catalog.pg_typeof(value) = 'text'::regtype AND pg_catalog.btrim(value::text) = '') THEN
    RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = pg_catalog.format('%s is required', field),
          HINT = pg_catalog.format('Send a non-empty "%s".', field);
  END IF;
  RETURN value;
END
$$;

-- One of a fixed set of values: 22023 (HTTP 400) listing the allowed ones.
CREATE FUNCTION fluxrate_internal.one_of(value text, field text, allowed text[]) RETURNS text
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF value IS NULL THEN
    RETURN NULL;
  END IF;
  IF NOT value = ANY (allowed) THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
          MESSAGE = pg_catalog.format('invalid %s: %s', field, value),
          DETAIL = pg_catalog.format('%s must be one of %s.', field, pg_catalog.array_to_string(allowed, ', '));
  END IF;
  RETURN value;
END
$$;

-- Organizations ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.org_json(o fluxrate_internal.organizations) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object(
    'id', o.org_id, 'name', o.name, 'billing_country', o.billing_country,
    'billing_state', o.billing_state, 'payment_terms_days', o.payment_terms_days,
    'grace_period_seconds', pg_catalog.date_part('epoch', o.grace_period)::bigint,
    'auto_email', o.auto_email, 'invoice_link_base', o.invoice_link_base, 'created_at', o.created_at)
$$;

-- Trusted roles (fluxrate_app members, superusers) create organizations directly;
-- HTTP sign-up creates one with its first user.
CREATE FUNCTION fluxrate.create_organization(name text, billing_country text DEFAULT NULL,
    billing_state text DEFAULT NULL, payment_terms_days integer DEFAULT 30,
    grace_period interval DEFAULT '1 hour')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  o fluxrate_internal.organizations;
BEGIN
  IF NOT fluxrate_internal.caller_is_trusted() THEN
    PERFORM fluxrate_internal.fail('PT403', 'only a trusted application role may create organizations',
      hint => 'Grant fluxrate_app to the role, or sign up over HTTP.');
  END IF;
  PERFORM fluxrate_internal.required(create_organization.name, 'name');
  o.org_id := gen_random_uuid();
  PERFORM set_config('fluxrate.current_org', o.org_id::text, true);
  INSERT INTO fluxrate_internal.organizations
    (org_id, name, billing_country, billing_state, payment_terms_days, grace_period, created_at)
  VALUES (o.org_id, create_organization.name, upper(create_organization.billing_country),
          create_organization.billing_state, coalesce(create_organization.payment_terms_days, 30),
          coalesce(create_organization.grace_period, '1 hour'), fluxrate.now())
  RETURNING * INTO o;
  RETURN fluxrate_internal.org_json(o);
EXCEPTION WHEN check_violation THEN
  PERFORM fluxrate_internal.fail('PT422', 'invalid organization settings', SQLERRM,
    'billing_country is a 2-letter code, payment_terms_days 0..3650, grace_period not negative.');
END
$$;

-- Act for one organization from a trusted application role.  Transaction-local
-- by default, so a pooled connection never leaks one tenant's context into the
-- next transaction; pass session => true for an interactive psql session.
CREATE FUNCTION fluxrate.act_as(org_id uuid, session boolean DEFAULT false) RETURNS uuid
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF NOT fluxrate_internal.caller_is_trusted() THEN
    PERFORM fluxrate_internal.fail('PT401', pg_catalog.format('role "%s" may not act for an organization', session_user),
      hint => 'Grant fluxrate_app to the application role, or authenticate with an API key or a token.');
  END IF;
  PERFORM fluxrate_internal.required(act_as.org_id, 'org_id');
  PERFORM set_config('fluxrate.current_org', act_as.org_id::text, true);
  IF NOT EXISTS (SELECT 1 FROM fluxrate_internal.organizations o WHERE o.org_id = act_as.org_id) THEN
    PERFORM fluxrate_internal.fail('PT404', 'organization not found', pg_catalog.format('No organization has id %s.', act_as.org_id));
  END IF;
  PERFORM set_config('fluxrate.acting_org', act_as.org_id::text, NOT coalesce(session, false));
  RETURN act_as.org_id;
END
$$;

CREATE FUNCTION fluxrate.get_organization() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  o fluxrate_internal.organizations;
BEGIN
  SELECT * INTO o FROM fluxrate_internal.organizations WHERE org_id = v_org;
  RETURN fluxrate_internal.org_json(o);
END
$$;

-- Partial update of the organization's billing settings (NULL = unchanged).
CREATE FUNCTION fluxrate.update_organization(name text DEFAULT NULL, billing_country text DEFAULT NULL,
    billing_state text DEFAULT NULL, payment_terms_days integer DEFAULT NULL,
    grace_period interval DEFAULT NULL, auto_email boolean DEFAULT NULL, invoice_link_base text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  o fluxrate_internal.organizations;
BEGIN
  UPDATE fluxrate_internal.organizations t SET
    name = coalesce(update_organization.name, t.name),
    billing_country = coalesce(upper(update_organization.billing_country), t.billing_country),
    billing_state = coalesce(update_organization.billing_state, t.billing_state),
    payment_terms_days = coalesce(update_organization.payment_terms_days, t.payment_terms_days),
    grace_period = coalesce(update_organization.grace_period, t.grace_period),
    auto_email = coalesce(update_organization.auto_email, t.auto_email),
    invoice_link_base = coalesce(update_organization.invoice_link_base, t.invoice_link_base)
  WHERE t.org_id = v_org
  RETURNING * INTO o;
  RETURN fluxrate_internal.org_json(o);
EXCEPTION WHEN check_violation THEN
  PERFORM fluxrate_internal.fail('PT422', 'invalid organization settings', SQLERRM,
    'billing_country is a 2-letter code, payment_terms_days 0..3650, grace_period not negative, invoice_link_base an http(s) URL.');
END
$$;

-- Record a business event in the outbox, in the caller's transaction.
CREATE FUNCTION fluxrate_internal.emit_event(org_id uuid, event text, data jsonb) RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_id uuid := fluxrate_internal.uuid_v7();
  v_now timestamptz := fluxrate.now();
BEGIN
  INSERT INTO fluxrate_internal.outbox (org_id, id, event, payload, created_at)
  VALUES (emit_event.org_id, v_id, emit_event.event,
          jsonb_build_object('id', v_id, 'event', emit_event.event, 'timestamp', v_now, 'data', emit_event.data),
          v_now);
  -- deliveries (webhooks, e-mail) are written in the same transaction: 70_delivery.sql
  PERFORM fluxrate_internal.fan_out(emit_event.org_id, v_id, emit_event.event, emit_event.data, v_now);
  RETURN v_id;
END
$$;

-- ==== src/sql/20_catalog.sql ====
-- 20_catalog.sql: features and meters, plans and charges, plan features,
-- customers, subscriptions.  Every function resolves the organization once
-- (require_org) and passes it explicitly; parameter names are Fluxrate's JSON
-- keys so that PostgREST's POST /rpc/<fn> with Fluxrate's body calls them as is.

-- Paging ---------------------------------------------------------------------

-- page is 1-based; page_size defaults to 20 and may not exceed 100 (Fluxrate's rule).
CREATE FUNCTION fluxrate_internal.check_page(page integer, page_size integer) RETURNS void
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF page IS NOT NULL AND page < 1 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'page must be 1 or more', DETAIL = pg_catalog.format('page was %s.', page);
  END IF;
  IF page_size IS NOT NULL AND (page_size < 1 OR page_size > 100) THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'page_size must be between 1 and 100',
          DETAIL = pg_catalog.format('page_size was %s.', page_size);
  END IF;
END
$$;

CREATE FUNCTION fluxrate_internal.page_envelope(data jsonb, page integer, page_size integer, total bigint) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('data', coalesce(data, '[]'::jsonb), 'meta',
    pg_catalog.jsonb_build_object('page', page, 'page_size', page_size, 'total', total,
      'total_pages', CASE WHEN total = 0 THEN 0 ELSE (total + page_size - 1) / page_size END))
$$;

-- At most 12 decimal places for prices and quantities (SPEC: money and quantities).
CREATE FUNCTION fluxrate_internal.check_decimal(value numeric, field text, allow_zero boolean DEFAULT true)
  RETURNS numeric LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF value IS NULL THEN
    RETURN NULL;
  END IF;
  IF value = 'NaN'::numeric THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('%s must be a finite number', field);
  END IF;
  IF value < 0 OR (NOT allow_zero AND value = 0) THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422',
      MESSAGE = pg_catalog.format('%s must be %s', field, CASE WHEN allow_zero THEN 'zero or more' ELSE 'greater than zero' END),
      DETAIL = pg_catalog.format('%s was %s.', field, value);
  END IF;
  IF pg_catalog.scale(value) > 12 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('%s has more than 12 decimal places', field),
      DETAIL = pg_catalog.format('%s was %s.', field, value);
  END IF;
  RETURN value;
END
$$;

-- Features and meters --------------------------------------------------------

CREATE FUNCTION fluxrate_internal.meter_json(m fluxrate_internal.meters) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', m.id, 'feature_id', m.feature_id, 'meter_token', m.meter_token,
    'meter_name', m.meter_name, 'property_name', m.property_name, 'aggregation_type', m.aggregation_type,
    'unique_property', m.unique_property, 'unit', m.unit, 'filters', m.filters, 'created_at', m.created_at)
$$;

CREATE FUNCTION fluxrate_internal.feature_json(f fluxrate_internal.features) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', f.id, 'name', f.name, 'lookup_key', f.lookup_key, 'type', f.type,
    'description', f.description, 'created_at', f.created_at)
    || coalesce((SELECT pg_catalog.jsonb_build_object('meter_id', m.id, 'meter_token', m.meter_token,
                   'meter_name', m.meter_name, 'property_name', m.property_name,
                   'aggregation_type', m.aggregation_type, 'unit', m.unit, 'filters', m.filters,
                   'meter', fluxrate_internal.meter_json(m))
                 FROM fluxrate_internal.meters m WHERE m.org_id = f.org_id AND m.feature_id = f.id), '{}'::jsonb)
$$;

-- Meter filters: at most 5, each {property, operator: eq|neq|in|not_in|exists, values}.
CREATE FUNCTION fluxrate_internal.check_filters(filters jsonb) RETURNS jsonb
  LANGUAGE plpgsql IMMUTABLE
  AS $$
DECLARE
  f jsonb;
  i integer := 0;
  op text;
BEGIN
  IF filters IS NULL OR filters = 'null'::jsonb THEN
    RETURN '[]'::jsonb;
  END IF;
  IF pg_catalog.jsonb_typeof(filters) <> 'array' THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'filters must be an array',
      HINT = 'Send [{"property": "region", "operator": "eq", "values": ["eu"]}].';
  END IF;
  IF pg_catalog.jsonb_array_length(filters) > 5 THEN
    RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = 'a meter has at most 5 filters',
      DETAIL = pg_catalog.format('%s filters were sent.', pg_catalog.jsonb_array_length(filters));
  END IF;
  FOR f IN SELECT e FROM pg_catalog.jsonb_array_elements(filters) e LOOP
    i := i + 1;
    IF pg_catalog.jsonb_typeof(f) <> 'object' OR coalesce(f->>'property', '') = '' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s has no property', i);
    END IF;
    op := coalesce(f->>'operator', 'eq');
    IF op NOT IN ('eq', 'neq', 'in', 'not_in', 'exists') THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s has an invalid operator: %s', i, op),
        DETAIL = 'operator must be one of eq, neq, in, not_in, exists.';
    END IF;
    IF op <> 'exists' AND (pg_catalog.jsonb_typeof(f->'values') IS DISTINCT FROM 'array'
                           OR pg_catalog.jsonb_array_length(f->'values') = 0) THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s needs a non-empty values array', i);
    END IF;
    IF op IN ('eq', 'neq') AND pg_catalog.jsonb_array_length(f->'values') <> 1 THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('filter %s (%s) takes exactly one value', i, op);
    END IF;
  END LOOP;
  -- normalised: operator always present, values always an array of strings
  -- ([] itself: no filter; jsonb_agg over no element would be NULL)
  IF pg_catalog.jsonb_array_length(filters) = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  RETURN (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('property', e->>'property',
            'operator', coalesce(e->>'operator', 'eq'),
            'values', coalesce((SELECT pg_catalog.jsonb_agg(v #>> '{}') FROM pg_catalog.jsonb_array_elements(e->'values') v), '[]'::jsonb)))
          FROM pg_catalog.jsonb_array_elements(filters) e);
END
$$;

CREATE FUNCTION fluxrate.create_feature(name text DEFAULT NULL, lookup_key text DEFAULT NULL, type text DEFAULT NULL, description text DEFAULT NULL,
    meter_name text DEFAULT NULL, property_name text DEFAULT NULL, aggregation_type text DEFAULT NULL,
    unit text DEFAULT NULL, filters jsonb DEFAULT NULL, unique_property text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  f fluxrate_internal.features;
  v_agg text := upper(create_feature.aggregation_type);
  v_filters jsonb;
BEGIN
  PERFORM fluxrate_internal.required(create_feature.name, 'name');
  PERFORM fluxrate_internal.required(create_feature.lookup_key, 'lookup_key');
  PERFORM fluxrate_internal.required(create_feature.type, 'type');
  PERFORM fluxrate_internal.one_of(create_feature.type, 'type', ARRAY['meter', 'switch', 'custom']);
  IF create_feature.type = 'meter' THEN
    PERFORM fluxrate_internal.required(create_feature.meter_name, 'meter_name');
    PERFORM fluxrate_internal.required(v_agg, 'aggregation_type');
    PERFORM fluxrate_internal.one_of(v_agg, 'aggregation_type',
      ARRAY['SUM', 'COUNT', 'MAX', 'MIN', 'AVG', 'UNIQUE_COUNT', 'LAST', 'WEIGHTED_SUM']);
    -- COUNT counts events and UNIQUE_COUNT reads metadata; the others read a property
    IF v_agg NOT IN ('COUNT', 'UNIQUE_COUNT') THEN
      PERFORM fluxrate_internal.required(create_feature.property_name, 'property_name');
    END IF;
    -- a UNIQUE_COUNT meter counts one metadata property: ingestion requires it and
    -- aggregation counts it, so two different names cannot both be meant
    IF v_agg = 'UNIQUE_COUNT' AND create_feature.property_name IS DISTINCT FROM create_feature.unique_property
       AND create_feature.property_name IS NOT NULL AND create_feature.unique_property IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'property_name and unique_property name different properties',
        pg_catalog.format('A UNIQUE_COUNT meter counts the distinct values of one metadata property; property_name was %s, unique_property %s.',
                          create_feature.property_name, create_feature.unique_property),
        'Send one of the two (they mean the same for UNIQUE_COUNT).');
    END IF;
    v_filters := fluxrate_internal.check_filters(create_feature.filters);
  ELSIF create_feature.meter_name IS NOT NULL OR create_feature.aggregation_type IS NOT NULL THEN
    PERFORM fluxrate_internal.fail('22023', 'only meter features take meter_name and aggregation_type',
      pg_catalog.format('type was %s.', create_feature.type));
  END IF;

  IF EXISTS (SELECT 1 FROM fluxrate_internal.features x WHERE x.org_id = v_org AND x.lookup_key = create_feature.lookup_key) THEN
    PERFORM fluxrate_internal.fail('23505', 'a feature with this lookup_key already exists',
      pg_catalog.format('lookup_key %s is taken in this organization.', create_feature.lookup_key));
  END IF;
  IF create_feature.type = 'meter' AND EXISTS (SELECT 1 FROM fluxrate_internal.meters x
       WHERE x.org_id = v_org AND x.meter_name = create_feature.meter_name) THEN
    PERFORM fluxrate_internal.fail('23505', 'a meter with this meter_name already exists',
      pg_catalog.format('meter_name %s is taken in this organization.', create_feature.meter_name));
  END IF;

  INSERT INTO fluxrate_internal.features (org_id, name, lookup_key, type, description, created_at)
  VALUES (v_org, create_feature.name, create_feature.lookup_key, create_feature.type,
          create_feature.description, fluxrate.now())
  RETURNING * INTO f;
  IF f.type = 'meter' THEN
    INSERT INTO fluxrate_internal.meters (org_id, feature_id, meter_name, property_name, aggregation_type,
        unique_property, unit, filters, created_at)
    VALUES (v_org, f.id, create_feature.meter_name,
            -- UNIQUE_COUNT counts distinct metadata[property_name] (default user_id);
            -- COUNT needs no property
            coalesce(create_feature.property_name, CASE v_agg WHEN 'UNIQUE_COUNT' THEN coalesce(create_feature.unique_property, 'user_id') ELSE 'quantity' END),
            v_agg,
            CASE WHEN v_agg = 'UNIQUE_COUNT' THEN coalesce(create_feature.unique_property, create_feature.property_name, 'user_id')
                 ELSE coalesce(create_feature.unique_property, 'user_id') END,
            create_feature.unit, v_filters, fluxrate.now());
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.feature_json(f);
EXCEPTION WHEN unique_violation THEN
  -- a concurrent create won the race
  PERFORM fluxrate_internal.fail('23505', 'a feature with this lookup_key or meter_name already exists', SQLERRM);
END
$$;

CREATE FUNCTION fluxrate.get_feature(feature_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  f fluxrate_internal.features;
BEGIN
  SELECT * INTO f FROM fluxrate_internal.features x WHERE x.org_id = v_org AND x.id = get_feature.feature_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'feature not found', pg_catalog.format('No feature %s in this organization.', feature_id));
  END IF;
  RETURN fluxrate_internal.feature_json(f);
END
$$;

CREATE FUNCTION fluxrate.list_features(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.feature_json(f) ORDER BY f.created_at, f.id) FROM
       (SELECT * FROM fluxrate_internal.features x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) f),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.features x WHERE x.org_id = v_org));
END
$$;

CREATE FUNCTION fluxrate.get_meter(meter_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  m fluxrate_internal.meters;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', pg_catalog.format('No meter %s in this organization.', meter_id));
  END IF;
  RETURN fluxrate_internal.meter_json(m);
END
$$;

CREATE FUNCTION fluxrate.list_meters(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.meter_json(m) ORDER BY m.created_at, m.id) FROM
       (SELECT * FROM fluxrate_internal.meters x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) m),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.meters x WHERE x.org_id = v_org));
END
$$;

-- Plans and charges ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.charge_json(c fluxrate_internal.charges) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', c.id, 'plan_id', c.plan_id, 'type', c.type, 'meter_id', c.meter_id,
    'unit_price', c.unit_price, 'display_name', c.display_name, 'pricing_model', c.pricing_model,
    'tiers', c.tiers, 'package_size', c.package_size, 'package_price', c.package_price,
    'free_units', c.free_units, 'billing_timing', c.billing_timing, 'status', c.status, 'created_at', c.created_at)
$$;

CREATE FUNCTION fluxrate_internal.plan_json(p fluxrate_internal.plans, with_children boolean DEFAULT false) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', p.id, 'name', p.name, 'lookup_id', p.lookup_id, 'type', p.type,
    'billing_interval', p.billing_interval, 'currency', p.currency, 'trial_days', p.trial_days,
    'description', p.description, 'is_active', p.is_active, 'minimum_commitment', p.minimum_commitment,
    'created_at', p.created_at)
  || CASE WHEN with_children THEN pg_catalog.jsonb_build_object(
       'charges', coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.charge_json(c) ORDER BY c.created_at, c.id)
                            FROM fluxrate_internal.charges c
                            WHERE c.org_id = p.org_id AND c.plan_id = p.id AND c.status = 'ACTIVE'), '[]'::jsonb),
       'features', coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.plan_feature_json(pf) ORDER BY pf.created_at, pf.id)
                            FROM fluxrate_internal.plan_features pf
                            WHERE pf.org_id = p.org_id AND pf.plan_id = p.id), '[]'::jsonb))
     ELSE '{}'::jsonb END
$$;

-- every parameter has a default so that a missing key is a 400 naming it (PostgREST would
-- otherwise answer 404: no function with that set of keys)
CREATE FUNCTION fluxrate.create_plan(name text DEFAULT NULL, lookup_id text DEFAULT NULL, type text DEFAULT NULL,
    billing_interval text DEFAULT NULL, currency text DEFAULT NULL,
    trial_days integer DEFAULT 0, description text DEFAULT NULL, is_active boolean DEFAULT true,
    minimum_commitment numeric DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  p fluxrate_internal.plans;
  v_type text := upper(create_plan.type);
  v_currency text := upper(create_plan.currency);
BEGIN
  PERFORM fluxrate_internal.required(create_plan.name, 'name');
  PERFORM fluxrate_internal.required(create_plan.lookup_id, 'lookup_id');
  PERFORM fluxrate_internal.required(v_type, 'type');
  PERFORM fluxrate_internal.one_of(v_type, 'type', ARRAY['FIXED', 'USAGE', 'HYBRID']);
  PERFORM fluxrate_internal.required(create_plan.billing_interval, 'billing_interval');
  PERFORM fluxrate_internal.one_of(create_plan.billing_interval, 'billing_interval', ARRAY['day', 'week', 'month', 'quarter', 'year']);
  PERFORM fluxrate_internal.required(v_currency, 'currency');
  IF v_currency !~ '^[A-Z]{3}$' THEN
    PERFORM fluxrate_internal.fail('22023', pg_catalog.format('invalid currency: %s', create_plan.currency),
      'currency is an ISO 4217 code such as USD, EUR, JPY.');
  END IF;
  IF coalesce(create_plan.trial_days, 0) < 0 OR coalesce(create_plan.trial_days, 0) > 3650 THEN
    PERFORM fluxrate_internal.fail('PT422', 'trial_days must be between 0 and 3650', pg_catalog.format('trial_days was %s.', create_plan.trial_days));
  END IF;
  PERFORM fluxrate_internal.check_decimal(create_plan.minimum_commitment, 'minimum_commitment');
  IF EXISTS (SELECT 1 FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.lookup_id = create_plan.lookup_id) THEN
    PERFORM fluxrate_internal.fail('23505', 'a plan with this lookup_id already exists',
      pg_catalog.format('lookup_id %s is taken in this organization.', create_plan.lookup_id));
  END IF;
  INSERT INTO fluxrate_internal.plans (org_id, name, lookup_id, type, billing_interval, currency, trial_days,
      description, is_active, minimum_commitment, created_at)
  VALUES (v_org, create_plan.name, create_plan.lookup_id, v_type, create_plan.billing_interval, v_currency,
          coalesce(create_plan.trial_days, 0), create_plan.description, coalesce(create_plan.is_active, true),
          create_plan.minimum_commitment, fluxrate.now())
  RETURNING * INTO p;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.plan_json(p, true);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'a plan with this lookup_id already exists', SQLERRM);
END
$$;

CREATE FUNCTION fluxrate.get_plan(plan_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
  p fluxrate_internal.plans;
BEGIN
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = get_plan.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  RETURN fluxrate_internal.plan_json(p, true);
END
$$;

CREATE FUNCTION fluxrate.list_plans(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.plan_json(p) ORDER BY p.created_at, p.id) FROM
       (SELECT * FROM fluxrate_internal.plans x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) p),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.plans x WHERE x.org_id = v_org));
END
$$;

CREATE FUNCTION fluxrate.update_plan(plan_id uuid, name text DEFAULT NULL, description text DEFAULT NULL,
    is_active boolean DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  p fluxrate_internal.plans;
BEGIN
  UPDATE fluxrate_internal.plans x SET
    name = coalesce(nullif(update_plan.name, ''), x.name),
    description = coalesce(update_plan.description, x.description),
    is_active = coalesce(update_plan.is_active, x.is_active)
  WHERE x.org_id = v_org AND x.id = update_plan.plan_id
  RETURNING * INTO p;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  RETURN fluxrate_internal.plan_json(p, true);
END
$$;

CREATE FUNCTION fluxrate.delete_plan(plan_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
BEGIN
  PERFORM 1 FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = delete_plan.plan_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', plan_id));
  END IF;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.subscriptions s WHERE s.org_id = v_org AND s.plan_id = delete_plan.plan_id) THEN
    PERFORM fluxrate_internal.fail('PT409', 'plan has subscriptions',
      'A plan with subscriptions cannot be deleted.', 'Deactivate it with update_plan(is_active => false) instead.');
  END IF;
  DELETE FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = delete_plan.plan_id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', plan_id, 'deleted', true);
END
$$;

-- Validation of a charge's pricing; the rating code (rating.c) relies on it.
CREATE FUNCTION fluxrate_internal.check_tiers(tiers jsonb) RETURNS jsonb
  LANGUAGE plpgsql IMMUTABLE
  AS $$
DECLARE
  t jsonb;
  i integer := 0;
  n integer;
  prev numeric := 0;
  up numeric;
BEGIN
  IF tiers IS NULL OR pg_catalog.jsonb_typeof(tiers) <> 'array' OR pg_catalog.jsonb_array_length(tiers) = 0 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'tiers must be a non-empty array',
      HINT = 'Send [{"up_to": 1000, "unit_price": 0.002}, {"up_to": null, "unit_price": 0.001}].';
  END IF;
  n := pg_catalog.jsonb_array_length(tiers);
  FOR t IN SELECT e FROM pg_catalog.jsonb_array_elements(tiers) e LOOP
    i := i + 1;
    IF pg_catalog.jsonb_typeof(t) <> 'object' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('tier %s is not an object', i);
    END IF;
    IF pg_catalog.jsonb_typeof(t->'unit_price') IS DISTINCT FROM 'number' AND pg_catalog.jsonb_typeof(t->'flat_fee') IS DISTINCT FROM 'number' THEN
      RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('tier %s needs a numeric unit_price or flat_fee', i);
    END IF;
    PERFORM fluxrate_internal.check_decimal((t->>'unit_price')::numeric, pg_catalog.format('tier %s unit_price', i));
    PERFORM fluxrate_internal.check_decimal((t->>'flat_fee')::numeric, pg_catalog.format('tier %s flat_fee', i));
    IF i < n THEN
      IF pg_catalog.jsonb_typeof(t->'up_to') IS DISTINCT FROM 'number' THEN
        RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('tier %s needs a numeric up_to', i),
          DETAIL = 'Only the last tier is unbounded (up_to null).';
      END IF;
      up := (t->>'up_to')::numeric;
      IF up <= prev THEN
        RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = pg_catalog.format('tier %s up_to must be greater than the previous tier''s', i),
          DETAIL = pg_catalog.format('up_to %s follows %s; tiers must be sorted and must not overlap.', up, prev);
      END IF;
      prev := up;
    ELSIF t ? 'up_to' AND pg_catalog.jsonb_typeof(t->'up_to') <> 'null' THEN
      RAISE EXCEPTION USING ERRCODE = 'PT422', MESSAGE = 'the last tier must have up_to null',
        DETAIL = 'Usage above the last bound would have no price.';
    END IF;
  END LOOP;
  RETURN tiers;
END
$$;

CREATE FUNCTION fluxrate.add_charge(plan_id uuid DEFAULT NULL, type text DEFAULT NULL, unit_price numeric DEFAULT NULL,
    meter_id uuid DEFAULT NULL, display_name text DEFAULT NULL, pricing_model text DEFAULT NULL,
    tiers jsonb DEFAULT NULL, package_size numeric DEFAULT NULL, package_price numeric DEFAULT NULL,
    free_units numeric DEFAULT NULL, billing_timing text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  v_type text := upper(add_charge.type);
  v_model text := lower(coalesce(add_charge.pricing_model, 'per_unit'));
  c fluxrate_internal.charges;
BEGIN
  PERFORM fluxrate_internal.required(add_charge.plan_id, 'plan_id');
  PERFORM fluxrate_internal.required(v_type, 'type');
  PERFORM fluxrate_internal.one_of(v_type, 'type', ARRAY['FIXED', 'USAGE']);
  PERFORM 1 FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = add_charge.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', add_charge.plan_id));
  END IF;
  PERFORM fluxrate_internal.one_of(add_charge.billing_timing, 'billing_timing', ARRAY['in_advance', 'in_arrears']);
  PERFORM fluxrate_internal.check_decimal(add_charge.unit_price, 'unit_price');
  PERFORM fluxrate_internal.check_decimal(add_charge.free_units, 'free_units');

  IF v_type = 'FIXED' THEN
    PERFORM fluxrate_internal.required(add_charge.unit_price, 'unit_price');
    IF add_charge.meter_id IS NOT NULL OR add_charge.tiers IS NOT NULL OR add_charge.package_size IS NOT NULL THEN
      PERFORM fluxrate_internal.fail('22023', 'a FIXED charge takes only unit_price (the amount per period)',
        'meter_id, tiers and package pricing belong to USAGE charges.');
    END IF;
    v_model := 'flat';
  ELSE
    PERFORM fluxrate_internal.required(add_charge.meter_id, 'meter_id');
    PERFORM 1 FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = add_charge.meter_id;
    IF NOT FOUND THEN
      PERFORM fluxrate_internal.fail('PT404', 'meter not found', pg_catalog.format('No meter %s in this organization.', add_charge.meter_id));
    END IF;
    PERFORM fluxrate_internal.one_of(v_model, 'pricing_model', ARRAY['per_unit', 'graduated', 'volume', 'package']);
    IF add_charge.billing_timing = 'in_advance' THEN
      PERFORM fluxrate_internal.fail('22023', 'usage charges bill in arrears', 'billing_timing in_advance applies to FIXED charges only.');
    END IF;
    IF v_model = 'per_unit' THEN
      PERFORM fluxrate_internal.required(add_charge.unit_price, 'unit_price');
    ELSIF v_model IN ('graduated', 'volume') THEN
      PERFORM fluxrate_internal.check_tiers(add_charge.tiers);
    ELSE
      PERFORM fluxrate_internal.required(add_charge.package_size, 'package_size');
      PERFORM fluxrate_internal.required(add_charge.package_price, 'package_price');
      PERFORM fluxrate_internal.check_decimal(add_charge.package_size, 'package_size', false);
      PERFORM fluxrate_internal.check_decimal(add_charge.package_price, 'package_price');
    END IF;
  END IF;

  INSERT INTO fluxrate_internal.charges (org_id, plan_id, type, meter_id, display_name, pricing_model, unit_price,
      tiers, package_size, package_price, free_units, billing_timing, created_at)
  VALUES (v_org, add_charge.plan_id, v_type, add_charge.meter_id, add_charge.display_name, v_model,
          add_charge.unit_price, CASE WHEN v_model IN ('graduated', 'volume') THEN add_charge.tiers END,
          add_charge.package_size, add_charge.package_price, coalesce(add_charge.free_units, 0),
          coalesce(add_charge.billing_timing, CASE v_type WHEN 'FIXED' THEN 'in_advance' ELSE 'in_arrears' END),
          fluxrate.now())
  RETURNING * INTO c;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.charge_json(c);
END
$$;

-- Charges go one way only: ACTIVE -> INACTIVE (Fluxrate's rule).
CREATE FUNCTION fluxrate.update_charge(plan_id uuid, charge_id uuid, status text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  c fluxrate_internal.charges;
BEGIN
  PERFORM fluxrate_internal.required(update_charge.status, 'status');
  PERFORM fluxrate_internal.one_of(upper(update_charge.status), 'status', ARRAY['ACTIVE', 'INACTIVE']);
  SELECT * INTO c FROM fluxrate_internal.charges x
   WHERE x.org_id = v_org AND x.plan_id = update_charge.plan_id AND x.id = update_charge.charge_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'charge not found', pg_catalog.format('No charge %s on plan %s.', charge_id, plan_id));
  END IF;
  IF c.status = 'INACTIVE' AND upper(update_charge.status) = 'ACTIVE' THEN
    PERFORM fluxrate_internal.fail('PT409', 'an inactive charge cannot be reactivated',
      'Charges go from ACTIVE to INACTIVE only.', 'Add a new charge instead.');
  END IF;
  UPDATE fluxrate_internal.charges x SET status = upper(update_charge.status)
   WHERE x.org_id = v_org AND x.id = c.id RETURNING * INTO c;
  RETURN fluxrate_internal.charge_json(c);
END
$$;

CREATE FUNCTION fluxrate_internal.plan_feature_json(pf fluxrate_internal.plan_features) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', pf.id, 'plan_id', pf.plan_id, 'feature_id', pf.feature_id,
    'feature_type', f.type, 'lookup_key', f.lookup_key, 'is_enabled', pf.is_enabled,
    'usage_limit', pf.usage_limit, 'usage_reset_period', pf.usage_reset_period,
    'is_soft_limit', pf.is_soft_limit, 'static_value', pf.static_value)
  FROM fluxrate_internal.features f WHERE f.org_id = pf.org_id AND f.id = pf.feature_id
$$;

CREATE FUNCTION fluxrate.add_plan_feature(plan_id uuid DEFAULT NULL, feature_id uuid DEFAULT NULL, is_enabled boolean DEFAULT true,
    usage_limit numeric DEFAULT NULL, usage_reset_period text DEFAULT NULL, is_soft_limit boolean DEFAULT false,
    static_value text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('catalog.write');
  pf fluxrate_internal.plan_features;
BEGIN
  PERFORM fluxrate_internal.required(add_plan_feature.plan_id, 'plan_id');
  PERFORM fluxrate_internal.required(add_plan_feature.feature_id, 'feature_id');
  PERFORM fluxrate_internal.one_of(add_plan_feature.usage_reset_period, 'usage_reset_period', ARRAY['day', 'week', 'month', 'year']);
  PERFORM fluxrate_internal.check_decimal(add_plan_feature.usage_limit, 'usage_limit');
  PERFORM 1 FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = add_plan_feature.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', add_plan_feature.plan_id));
  END IF;
  PERFORM 1 FROM fluxrate_internal.features f WHERE f.org_id = v_org AND f.id = add_plan_feature.feature_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'feature not found', pg_catalog.format('No feature %s in this organization.', add_plan_feature.feature_id));
  END IF;
  INSERT INTO fluxrate_internal.plan_features (org_id, plan_id, feature_id, is_enabled, usage_limit,
      usage_reset_period, is_soft_limit, static_value, created_at)
  VALUES (v_org, add_plan_feature.plan_id, add_plan_feature.feature_id, coalesce(add_plan_feature.is_enabled, true),
          add_plan_feature.usage_limit, add_plan_feature.usage_reset_period, coalesce(add_plan_feature.is_soft_limit, false),
          add_plan_feature.static_value, fluxrate.now())
  RETURNING * INTO pf;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.plan_feature_json(pf);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'the feature is already on this plan', SQLERRM);
END
$$;

-- Customers ----------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.customer_json(c fluxrate_internal.customers) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', c.id, 'organization_id', c.org_id, 'name', c.name, 'email', c.email,
    'external_id', c.external_id, 'phone', c.phone, 'billing_address_line1', c.billing_address_line1,
    'billing_address_city', c.billing_address_city, 'billing_address_state', c.billing_address_state,
    'billing_address_country', c.billing_address_country, 'billing_address_postal_code', c.billing_address_postal_code,
    'created_at', c.created_at, 'updated_at', c.updated_at)
$$;

CREATE FUNCTION fluxrate_internal.check_email(email text) RETURNS text
  LANGUAGE plpgsql IMMUTABLE
  AS $$
BEGIN
  IF email IS NOT NULL AND email !~ '^[^@\s]+@[^@\s]+\.[^@\s]+$' THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('invalid email: %s', email),
      HINT = 'Send an address such as billing@example.com.';
  END IF;
  RETURN email;
END
$$;

CREATE FUNCTION fluxrate.create_customer(name text DEFAULT NULL, email text DEFAULT NULL, external_id text DEFAULT NULL, phone text DEFAULT NULL,
    billing_address_line1 text DEFAULT NULL, billing_address_city text DEFAULT NULL,
    billing_address_state text DEFAULT NULL, billing_address_country text DEFAULT NULL,
    billing_address_postal_code text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  c fluxrate_internal.customers;
BEGIN
  PERFORM fluxrate_internal.required(create_customer.name, 'name');
  PERFORM fluxrate_internal.required(create_customer.email, 'email');
  PERFORM fluxrate_internal.check_email(create_customer.email);
  IF create_customer.billing_address_country IS NOT NULL AND upper(create_customer.billing_address_country) !~ '^[A-Z]{2}$' THEN
    PERFORM fluxrate_internal.fail('22023', pg_catalog.format('invalid billing_address_country: %s', create_customer.billing_address_country),
      'billing_address_country is an ISO 3166 two-letter code such as US or IN.');
  END IF;
  IF create_customer.external_id IS NOT NULL AND EXISTS (SELECT 1 FROM fluxrate_internal.customers x
       WHERE x.org_id = v_org AND x.external_id = create_customer.external_id) THEN
    PERFORM fluxrate_internal.fail('23505', 'a customer with this external_id already exists',
      pg_catalog.format('external_id %s is taken in this organization.', create_customer.external_id));
  END IF;
  INSERT INTO fluxrate_internal.customers (org_id, name, email, external_id, phone, billing_address_line1,
      billing_address_city, billing_address_state, billing_address_country, billing_address_postal_code,
      created_at, updated_at)
  VALUES (v_org, create_customer.name, create_customer.email, nullif(create_customer.external_id, ''), create_customer.phone,
          create_customer.billing_address_line1, create_customer.billing_address_city, create_customer.billing_address_state,
          upper(create_customer.billing_address_country), create_customer.billing_address_postal_code,
          fluxrate.now(), fluxrate.now())
  RETURNING * INTO c;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.customer_json(c);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'a customer with this external_id already exists', SQLERRM);
END
$$;

CREATE FUNCTION fluxrate.get_customer(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
  c fluxrate_internal.customers;
BEGIN
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = v_org AND x.id = get_customer.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN fluxrate_internal.customer_json(c);
END
$$;

CREATE FUNCTION fluxrate.list_customers(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.customer_json(c) ORDER BY c.created_at, c.id) FROM
       (SELECT * FROM fluxrate_internal.customers x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) c),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.customers x WHERE x.org_id = v_org));
END
$$;

-- PUT /customers/{id} is a partial update in Fluxrate: absent (NULL) fields keep their value.
CREATE FUNCTION fluxrate.update_customer(customer_id uuid, name text DEFAULT NULL, email text DEFAULT NULL,
    external_id text DEFAULT NULL, phone text DEFAULT NULL, billing_address_line1 text DEFAULT NULL,
    billing_address_city text DEFAULT NULL, billing_address_state text DEFAULT NULL,
    billing_address_country text DEFAULT NULL, billing_address_postal_code text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  c fluxrate_internal.customers;
BEGIN
  PERFORM fluxrate_internal.check_email(update_customer.email);
  IF update_customer.billing_address_country IS NOT NULL AND upper(update_customer.billing_address_country) !~ '^[A-Z]{2}$' THEN
    PERFORM fluxrate_internal.fail('22023', pg_catalog.format('invalid billing_address_country: %s', update_customer.billing_address_country),
      'billing_address_country is an ISO 3166 two-letter code such as US or IN.');
  END IF;
  UPDATE fluxrate_internal.customers x SET
    name = coalesce(nullif(update_customer.name, ''), x.name),
    email = coalesce(update_customer.email, x.email),
    external_id = coalesce(update_customer.external_id, x.external_id),
    phone = coalesce(update_customer.phone, x.phone),
    billing_address_line1 = coalesce(update_customer.billing_address_line1, x.billing_address_line1),
    billing_address_city = coalesce(update_customer.billing_address_city, x.billing_address_city),
    billing_address_state = coalesce(update_customer.billing_address_state, x.billing_address_state),
    billing_address_country = coalesce(upper(update_customer.billing_address_country), x.billing_address_country),
    billing_address_postal_code = coalesce(update_customer.billing_address_postal_code, x.billing_address_postal_code),
    updated_at = fluxrate.now()
  WHERE x.org_id = v_org AND x.id = update_customer.customer_id
  RETURNING * INTO c;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN fluxrate_internal.customer_json(c);
EXCEPTION WHEN unique_violation THEN
  PERFORM fluxrate_internal.fail('23505', 'a customer with this external_id already exists', SQLERRM);
END
$$;

-- Permanent; cascades to subscriptions, invoices and usage events (Fluxrate's rule).
CREATE FUNCTION fluxrate.delete_customer(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
BEGIN
  DELETE FROM fluxrate_internal.customers x WHERE x.org_id = v_org AND x.id = delete_customer.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  -- the events and their rollups together, never interleaved with a rollup
  -- refresh (one that had read these events could write their rollups back)
  PERFORM pg_advisory_xact_lock_shared(fluxrate_internal.rollup_lock_key());
  DELETE FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.customer_id = delete_customer.customer_id;
  DELETE FROM fluxrate_internal.usage_rollups r WHERE r.org_id = v_org AND r.customer_id = delete_customer.customer_id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', customer_id, 'deleted', true);
END
$$;

-- Subscriptions ---------------------------------------------------------------------

-- Boundary n of a subscription's periods (n = 0 is the anchor itself).
-- Anniversary: anchor + n * interval, computed from the anchor (never from the
-- previous boundary) in UTC, so Jan 31 -> Feb 28/29 -> Mar 31 -> Apr 30.
-- Calendar: the first boundary is the next calendar boundary after the anchor
-- (next month start, next Monday, ...), then whole calendar intervals.
CREATE FUNCTION fluxrate_internal.period_boundary(anchor timestamptz, billing_interval text, alignment text, n integer)
  RETURNS timestamptz
  LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
  AS $$
DECLARE
  step interval := CASE billing_interval
    WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
    WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months'
    WHEN 'year' THEN interval '1 year' END;
  a timestamp := anchor AT TIME ZONE 'UTC';
  first timestamp;
BEGIN
  IF step IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('invalid billing_interval: %s', billing_interval);
  END IF;
  IF n <= 0 THEN
    RETURN anchor;
  END IF;
  IF alignment = 'calendar' THEN
    first := pg_catalog.date_trunc(CASE billing_interval WHEN 'week' THEN 'week' ELSE billing_interval END, a) + step;
    RETURN (first + step * (n - 1)) AT TIME ZONE 'UTC';
  END IF;
  RETURN (a + step * n) AT TIME ZONE 'UTC';
END
$$;

CREATE FUNCTION fluxrate_internal.subscription_json(s fluxrate_internal.subscriptions, with_features boolean DEFAULT false)
  RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', s.id, 'customer_id', s.customer_id, 'plan_id', s.plan_id,
    'plan_name', p.name, 'status', s.status, 'billing_interval', s.billing_interval, 'alignment', s.alignment,
    'start_date', s.start_date, 'trial_end_date', s.trial_end_date,
    'current_period_start', s.current_period_start, 'current_period_end', s.current_period_end,
    'cancel_at_period_end', s.cancel_at_period_end, 'canceled_at', s.canceled_at,
    'ended_at', s.ended_at, 'last_invoiced_date', s.last_invoiced_date, 'created_at', s.created_at)
  -- only after a failed closing (see sys_close_isolated): when, why, next try
  || CASE WHEN s.close_error IS NOT NULL THEN pg_catalog.jsonb_build_object('close_error', s.close_error,
       'close_retry_at', s.close_retry_at) ELSE '{}'::jsonb END
  || CASE WHEN with_features THEN pg_catalog.jsonb_build_object('features',
       coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.plan_feature_json(pf) ORDER BY pf.created_at, pf.id)
                 FROM fluxrate_internal.plan_features pf WHERE pf.org_id = s.org_id AND pf.plan_id = s.plan_id), '[]'::jsonb))
     ELSE '{}'::jsonb END
  FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id
$$;

CREATE FUNCTION fluxrate.create_subscription(customer_id uuid DEFAULT NULL, plan_id uuid DEFAULT NULL, billing_interval text DEFAULT NULL,
    start_date timestamptz DEFAULT NULL, trial_end_date timestamptz DEFAULT NULL, alignment text DEFAULT 'anniversary')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  p fluxrate_internal.plans;
  s fluxrate_internal.subscriptions;
  v_start timestamptz := coalesce(create_subscription.start_date, fluxrate.now());
  v_trial_end timestamptz;
  v_align text := coalesce(create_subscription.alignment, 'anniversary');
BEGIN
  PERFORM fluxrate_internal.required(create_subscription.customer_id, 'customer_id');
  PERFORM fluxrate_internal.required(create_subscription.plan_id, 'plan_id');
  PERFORM fluxrate_internal.one_of(create_subscription.billing_interval, 'billing_interval', ARRAY['day', 'week', 'month', 'quarter', 'year']);
  PERFORM fluxrate_internal.one_of(v_align, 'alignment', ARRAY['anniversary', 'calendar']);
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = create_subscription.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', create_subscription.customer_id));
  END IF;
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = create_subscription.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', create_subscription.plan_id));
  END IF;
  IF NOT p.is_active THEN
    PERFORM fluxrate_internal.fail('PT422', 'plan is deactivated', pg_catalog.format('Plan %s takes no new subscriptions.', p.lookup_id));
  END IF;
  -- Prices are per plan interval; a different interval would silently rescale them.
  IF create_subscription.billing_interval IS NOT NULL AND create_subscription.billing_interval <> p.billing_interval THEN
    PERFORM fluxrate_internal.fail('PT422', 'billing_interval must match the plan''s',
      pg_catalog.format('The plan bills per %s; the request asked for %s.', p.billing_interval, create_subscription.billing_interval),
      'Create a plan per billing interval.');
  END IF;
  -- The subscription's trial_end_date overrides the plan's trial_days.
  v_trial_end := coalesce(create_subscription.trial_end_date,
                          CASE WHEN p.trial_days > 0 THEN v_start + pg_catalog.make_interval(days => p.trial_days) END);
  IF v_trial_end IS NOT NULL AND v_trial_end <= v_start THEN
    PERFORM fluxrate_internal.fail('PT422', 'trial_end_date must be after start_date',
      pg_catalog.format('start_date %s, trial_end_date %s.', v_start, v_trial_end));
  END IF;

  s.org_id := v_org;
  s.id := gen_random_uuid();
  s.customer_id := create_subscription.customer_id;
  s.plan_id := p.id;
  s.billing_interval := p.billing_interval;
  s.alignment := v_align;
  s.start_date := v_start;
  s.trial_end_date := v_trial_end;
  s.created_at := fluxrate.now();
  s.cancel_at_period_end := false;
  IF v_trial_end IS NOT NULL THEN
    -- the trial is period 0 of its own; billing periods start at the trial end
    s.status := 'TRIAL';
    s.billing_anchor := v_trial_end;
    s.current_period_index := -1;
    s.current_period_start := v_start;
    s.current_period_end := v_trial_end;
  ELSE
    s.status := 'ACTIVE';
    s.billing_anchor := v_start;
    s.current_period_index := 0;
    s.current_period_start := v_start;
    s.current_period_end := fluxrate_internal.period_boundary(v_start, p.billing_interval, v_align, 1);
  END IF;
  INSERT INTO fluxrate_internal.subscriptions SELECT s.*;
  PERFORM fluxrate_internal.emit_event(v_org, 'subscription.created',
    jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'plan_id', s.plan_id, 'status', s.status));
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.subscription_json(s);
END
$$;

CREATE FUNCTION fluxrate.get_subscription(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
  s fluxrate_internal.subscriptions;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = get_subscription.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', pg_catalog.format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN fluxrate_internal.subscription_json(s, true);
END
$$;

CREATE FUNCTION fluxrate.list_customer_subscriptions(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = list_customer_subscriptions.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.subscription_json(s) ORDER BY s.created_at, s.id)
                   FROM fluxrate_internal.subscriptions s
                   WHERE s.org_id = v_org AND s.customer_id = list_customer_subscriptions.customer_id), '[]'::jsonb);
END
$$;

-- ==== src/sql/30_ingest.sql ====
-- 30_ingest.sql: API keys and usage ingestion.

-- Server-wide secrets (no org_id: only fluxrate_system reads them; RLS is forced
-- with no policy for fluxrate_owner).  The API-key pepper is generated here, at
-- CREATE EXTENSION time, and never leaves the database.
--
-- Backups: pg_dump includes every fluxrate table (99_security.sql marks them
-- with pg_extension_config_dump), secrets too, or a restored database could not
-- verify its API keys or open its sealed secrets.  On restore, CREATE EXTENSION
-- first generates fresh secrets, then the dump's rows are loaded beside them;
-- the oldest secret of each name is the one used, so the restored ones win.
CREATE TABLE fluxrate_internal.server_secrets (
  name        text NOT NULL,
  secret      bytea NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  PRIMARY KEY (name, created_at)
);

CREATE FUNCTION fluxrate_internal.random_bytes(n integer) RETURNS bytea
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_random_bytes';

-- api_key_pepper keys the API-key hash; sealing_key encrypts the secrets that
-- must be used again later (SMTP passwords, webhook signing secrets: 70_delivery)
INSERT INTO fluxrate_internal.server_secrets (name, secret)
VALUES ('api_key_pepper', fluxrate_internal.random_bytes(32)),
       ('sealing_key', fluxrate_internal.random_bytes(32));

CREATE FUNCTION fluxrate_internal.new_api_key(OUT key text, OUT prefix text, OUT key_hash bytea)
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_new_api_key';

CREATE FUNCTION fluxrate_internal.sys_verify_api_key(key text, OUT org_id uuid, OUT key_id uuid, OUT scopes text[])
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_verify_api_key';
COMMENT ON FUNCTION fluxrate_internal.sys_verify_api_key(text) IS
  'verifies an API key (keyed hash, constant-time compare); PT401 when unknown or revoked';

CREATE FUNCTION fluxrate_internal.api_key_json(k fluxrate_internal.api_keys) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', k.id, 'name', k.name, 'prefix', k.prefix, 'scopes', pg_catalog.to_jsonb(k.scopes),
    'status', k.status, 'created_at', k.created_at, 'revoked_at', k.revoked_at, 'last_used_at', k.last_used_at)
$$;

CREATE FUNCTION fluxrate.create_api_key(name text DEFAULT NULL, scopes text[] DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_bad text;
  g record;
  k fluxrate_internal.api_keys;
BEGIN
  PERFORM fluxrate_internal.required(create_api_key.name, 'name');
  IF create_api_key.scopes IS NULL OR cardinality(create_api_key.scopes) = 0 THEN
    PERFORM fluxrate_internal.fail('22004', 'scopes is required', NULL, 'Send at least one scope, e.g. ["usage.write"].');
  END IF;
  SELECT s INTO v_bad FROM unnest(create_api_key.scopes) s
   WHERE s IS NULL OR s NOT IN ('usage.write', 'usage.read', 'catalog.read', 'catalog.write', 'customers.read',
                                'customers.write', 'invoices.read', 'invoices.write', 'admin') LIMIT 1;
  IF FOUND THEN
    PERFORM fluxrate_internal.fail('22023', format('invalid scope: %s', coalesce(v_bad, 'null')),
      'Scopes are usage.write, usage.read, catalog.read, catalog.write, customers.read, customers.write, invoices.read, invoices.write, admin.');
  END IF;
  SELECT * INTO g FROM fluxrate_internal.new_api_key();
  INSERT INTO fluxrate_internal.api_keys (org_id, name, prefix, key_hash, scopes, created_at)
  VALUES (v_org, create_api_key.name, g.prefix, g.key_hash,
          ARRAY(SELECT DISTINCT s FROM unnest(create_api_key.scopes) s ORDER BY s), fluxrate.now())
  RETURNING * INTO k;
  PERFORM set_config('response.status', '201', true);
  -- the secret is in this response and nowhere else
  RETURN fluxrate_internal.api_key_json(k) || jsonb_build_object('key', g.key);
END
$$;

CREATE FUNCTION fluxrate.list_api_keys(page integer DEFAULT 1, page_size integer DEFAULT 20) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.api_key_json(k) ORDER BY k.created_at, k.id) FROM
       (SELECT * FROM fluxrate_internal.api_keys x WHERE x.org_id = v_org
        ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) k),
    page, page_size, (SELECT count(*) FROM fluxrate_internal.api_keys x WHERE x.org_id = v_org));
END
$$;

-- DELETE /api-keys/{id}: revoked at once; later use is 401.
CREATE FUNCTION fluxrate.revoke_api_key(key_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  k fluxrate_internal.api_keys;
BEGIN
  UPDATE fluxrate_internal.api_keys x SET status = 'REVOKED', revoked_at = coalesce(x.revoked_at, fluxrate.now())
   WHERE x.org_id = v_org AND x.id = revoke_api_key.key_id
  RETURNING * INTO k;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'api key not found', format('No API key %s in this organization.', key_id));
  END IF;
  RETURN fluxrate_internal.api_key_json(k);
END
$$;

-- Usage ingestion (src/ingest.c) ---------------------------------------------

CREATE FUNCTION fluxrate.track(meter_token text DEFAULT NULL, customer_external_id text DEFAULT NULL,
    quantity numeric DEFAULT NULL, "timestamp" timestamptz DEFAULT NULL, idempotency_key text DEFAULT NULL,
    metadata jsonb DEFAULT NULL, meter_name text DEFAULT NULL, properties jsonb DEFAULT NULL,
    api_key text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_track';
COMMENT ON FUNCTION fluxrate.track(text, text, numeric, timestamptz, text, jsonb, text, jsonb, text) IS
  'records one usage event, idempotently, in the caller''s transaction (POST /sdk/track)';

-- fluxrate.track caches the rows of api_keys, meters and customers it reads
-- per backend (src/ingest.c, "Row caches"; docs/ingestion.md).  Any UPDATE,
-- DELETE or TRUNCATE of those tables queues an invalidation that reaches every
-- backend when it commits; INSERTs need none (misses are never cached).
-- ENABLE ALWAYS: the caches must also hear of rows changed by a logical
-- replication apply worker (session_replication_role = replica).
CREATE FUNCTION fluxrate_internal.ingest_cache_invalidate() RETURNS trigger
  LANGUAGE C
  AS 'MODULE_PATHNAME', 'fr_ingest_cache_invalidate';
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.api_keys
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.meters
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
CREATE TRIGGER ingest_cache_invalidate AFTER UPDATE OR DELETE OR TRUNCATE ON fluxrate_internal.customers
  FOR EACH STATEMENT EXECUTE FUNCTION fluxrate_internal.ingest_cache_invalidate();
ALTER TABLE fluxrate_internal.api_keys ENABLE ALWAYS TRIGGER ingest_cache_invalidate;
ALTER TABLE fluxrate_internal.meters ENABLE ALWAYS TRIGGER ingest_cache_invalidate;
ALTER TABLE fluxrate_internal.customers ENABLE ALWAYS TRIGGER ingest_cache_invalidate;

CREATE FUNCTION fluxrate.track_batch(events jsonb, api_key text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE C VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS 'MODULE_PATHNAME', 'fr_track_batch';
COMMENT ON FUNCTION fluxrate.track_batch(jsonb, text) IS
  'records up to 1000 usage events; one result per event (created, replay or error); a bad event loses none of the others';

CREATE FUNCTION fluxrate_internal.event_json(e fluxrate_internal.usage_events) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', e.id, 'customer_id', e.customer_id, 'meter_id', e.meter_id,
    'quantity', e.quantity::text, 'timestamp', e."timestamp", 'ingested_at', e.ingested_at,
    'idempotency_key', e.idempotency_key, 'meta_data', coalesce(e.metadata, '{}'::jsonb))
$$;

CREATE FUNCTION fluxrate.list_meter_events(meter_id uuid, page integer DEFAULT 1, page_size integer DEFAULT 20)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  PERFORM 1 FROM fluxrate_internal.meters m WHERE m.org_id = v_org AND m.id = list_meter_events.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.event_json(e) ORDER BY e."timestamp" DESC, e.id DESC) FROM
       (SELECT * FROM fluxrate_internal.usage_events x WHERE x.org_id = v_org AND x.meter_id = list_meter_events.meter_id
        ORDER BY x."timestamp" DESC, x.id DESC LIMIT page_size OFFSET (page - 1) * page_size) e),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.usage_events x WHERE x.org_id = v_org AND x.meter_id = list_meter_events.meter_id));
END
$$;

-- ==== src/sql/40_rating.sql ====
-- 40_rating.sql: currencies, rounding, charge models (src/currency.c, src/rating.c)
-- and meter aggregation over a period.

CREATE FUNCTION fluxrate_internal.currency_exponent(currency text) RETURNS integer
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_currency_exponent';
COMMENT ON FUNCTION fluxrate_internal.currency_exponent(text) IS 'ISO 4217 minor-unit exponent (USD 2, JPY 0, KWD 3)';

CREATE FUNCTION fluxrate_internal.round_money(amount numeric, currency text) RETURNS numeric
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_round_money';
COMMENT ON FUNCTION fluxrate_internal.round_money(numeric, text) IS
  'rounds once to the currency''s minor unit, half away from zero';

CREATE FUNCTION fluxrate_internal.rate_usage(pricing_model text, unit_price numeric, tiers jsonb,
    package_size numeric, package_price numeric, free_units numeric, usage numeric)
  RETURNS numeric
  LANGUAGE C IMMUTABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_rate_usage';
COMMENT ON FUNCTION fluxrate_internal.rate_usage(text, numeric, jsonb, numeric, numeric, numeric, numeric) IS
  'unrounded amount of a charge for a billable quantity: flat, per_unit, graduated, volume, package';

-- Meter aggregates in C (src/aggregates.c): transition, combine, serial and
-- deserial functions, so they run as partial aggregates in parallel workers.
CREATE FUNCTION fluxrate_internal.unique_count_trans(internal, text) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_trans';
CREATE FUNCTION fluxrate_internal.unique_count_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_combine';
CREATE FUNCTION fluxrate_internal.unique_count_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_final';
CREATE FUNCTION fluxrate_internal.unique_count_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_serial';
CREATE FUNCTION fluxrate_internal.unique_count_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_unique_count_deserial';
CREATE AGGREGATE fluxrate_internal.unique_count(text) (
  SFUNC = fluxrate_internal.unique_count_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.unique_count_final,
  COMBINEFUNC = fluxrate_internal.unique_count_combine,
  SERIALFUNC = fluxrate_internal.unique_count_serial, DESERIALFUNC = fluxrate_internal.unique_count_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.unique_count(text) IS
  'exact number of distinct non-null values, hash-based, parallel-safe (UNIQUE_COUNT meters)';

CREATE FUNCTION fluxrate_internal.last_value_trans(internal, numeric, timestamptz, timestamptz, uuid) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_trans';
CREATE FUNCTION fluxrate_internal.last_value_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_combine';
CREATE FUNCTION fluxrate_internal.last_value_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_final';
CREATE FUNCTION fluxrate_internal.last_value_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_serial';
CREATE FUNCTION fluxrate_internal.last_value_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_last_value_deserial';
CREATE AGGREGATE fluxrate_internal.last_value(numeric, timestamptz, timestamptz, uuid) (
  SFUNC = fluxrate_internal.last_value_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.last_value_final,
  COMBINEFUNC = fluxrate_internal.last_value_combine,
  SERIALFUNC = fluxrate_internal.last_value_serial, DESERIALFUNC = fluxrate_internal.last_value_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.last_value(numeric, timestamptz, timestamptz, uuid) IS
  'value of the latest event by (timestamp, ingested_at, id), parallel-safe (LAST meters)';

CREATE FUNCTION fluxrate_internal.weighted_sum_trans(internal, numeric, timestamptz, timestamptz, uuid, timestamptz, timestamptz)
  RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_trans';
CREATE FUNCTION fluxrate_internal.weighted_sum_combine(internal, internal) RETURNS internal
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_combine';
CREATE FUNCTION fluxrate_internal.weighted_sum_final(internal) RETURNS numeric
  LANGUAGE C PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_final';
CREATE FUNCTION fluxrate_internal.weighted_sum_serial(internal) RETURNS bytea
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_serial';
CREATE FUNCTION fluxrate_internal.weighted_sum_deserial(bytea, internal) RETURNS internal
  LANGUAGE C STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'fr_weighted_sum_deserial';
CREATE AGGREGATE fluxrate_internal.weighted_sum(quantity numeric, ts timestamptz, ingested_at timestamptz, id uuid,
    period_start timestamptz, period_end timestamptz) (
  SFUNC = fluxrate_internal.weighted_sum_trans, STYPE = internal,
  FINALFUNC = fluxrate_internal.weighted_sum_final,
  COMBINEFUNC = fluxrate_internal.weighted_sum_combine,
  SERIALFUNC = fluxrate_internal.weighted_sum_serial, DESERIALFUNC = fluxrate_internal.weighted_sum_deserial,
  PARALLEL = SAFE);
COMMENT ON AGGREGATE fluxrate_internal.weighted_sum(numeric, timestamptz, timestamptz, uuid, timestamptz, timestamptz) IS
  'time-weighted level over [period_start, period_end) in quantity x hours; the latest point before the start is the level carried in; parallel-safe (WEIGHTED_SUM meters)';

-- Meter filters, all of which must match; compared as text against metadata.
-- neq and not_in also match an event that lacks the property.
CREATE FUNCTION fluxrate_internal.filters_match(metadata jsonb, filters jsonb) RETURNS boolean
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$
  SELECT filters IS NULL OR filters = '[]'::jsonb OR NOT EXISTS (
    SELECT 1 FROM pg_catalog.jsonb_array_elements(filters) f
     WHERE NOT coalesce(CASE f->>'operator'
       WHEN 'eq' THEN metadata->>(f->>'property') = f->'values'->>0
       WHEN 'neq' THEN metadata->>(f->>'property') IS DISTINCT FROM f->'values'->>0
       WHEN 'in' THEN metadata->>(f->>'property') IN (SELECT pg_catalog.jsonb_array_elements_text(f->'values'))
       WHEN 'not_in' THEN metadata->>(f->>'property') IS NULL
                       OR metadata->>(f->>'property') NOT IN (SELECT pg_catalog.jsonb_array_elements_text(f->'values'))
       WHEN 'exists' THEN metadata ? (f->>'property')
     END, false))
$$;

-- The billable quantity of one customer on one meter over [period_start, period_end).
--   SUM, MIN, MAX, AVG  of the quantities; COUNT of the events;
--   UNIQUE_COUNT        distinct metadata[property_name] (events without it do not count);
--   LAST                quantity of the latest event by timestamp, ties by ingestion order;
--   WEIGHTED_SUM        time-weighted level, in quantity x hours: each event sets the level
--                       until the next one; the level at the period start is the last
--                       event before it (carried across the boundary).
-- No events: 0 for every type.
CREATE FUNCTION fluxrate_internal.meter_usage(org_id uuid, customer_id uuid, meter_id uuid,
    period_start timestamptz, period_end timestamptz)
  RETURNS numeric
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  m fluxrate_internal.meters;
  v numeric;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = meter_usage.org_id AND x.id = meter_usage.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  -- plain meters: one index-only range scan of the covering index, computing only
  -- the meter's own aggregate (a CASE over five aggregates would compute all five
  -- for every event)
  IF m.filters = '[]'::jsonb AND m.aggregation_type = 'SUM' THEN
    SELECT sum(e.quantity) INTO v
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end;
    RETURN coalesce(v, 0);
  ELSIF m.filters = '[]'::jsonb AND m.aggregation_type IN ('COUNT', 'MAX', 'MIN', 'AVG') THEN
    SELECT CASE m.aggregation_type WHEN 'COUNT' THEN count(*)::numeric
             WHEN 'MAX' THEN trim_scale(max(e.quantity)) WHEN 'MIN' THEN trim_scale(min(e.quantity)) ELSE avg(e.quantity) END
      INTO v
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end;
    RETURN coalesce(v, 0);
  END IF;
  IF m.aggregation_type = 'WEIGHTED_SUM' THEN
    -- the aggregate (src/aggregates.c) gets the latest event before the period
    -- (the level carried in) and the events of the period
    SELECT fluxrate_internal.weighted_sum(p.quantity, p."timestamp", p.ingested_at, p.id,
                                          meter_usage.period_start, meter_usage.period_end)
      INTO v
      FROM ((SELECT e.quantity, e."timestamp", e.ingested_at, e.id
               FROM fluxrate_internal.usage_events e
              WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
                AND e."timestamp" < meter_usage.period_start AND fluxrate_internal.filters_match(e.metadata, m.filters)
              ORDER BY e."timestamp" DESC, e.ingested_at DESC, e.id DESC LIMIT 1)
            UNION ALL
            SELECT e.quantity, e."timestamp", e.ingested_at, e.id
              FROM fluxrate_internal.usage_events e
             WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
               AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end
               AND fluxrate_internal.filters_match(e.metadata, m.filters)) p;
    RETURN v;
  END IF;

  WITH ev AS MATERIALIZED (
    SELECT e.quantity, e."timestamp", e.ingested_at, e.id, e.metadata
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = meter_usage.org_id AND e.customer_id = meter_usage.customer_id AND e.meter_id = meter_usage.meter_id
       AND e."timestamp" >= meter_usage.period_start AND e."timestamp" < meter_usage.period_end
       AND (m.filters = '[]'::jsonb OR fluxrate_internal.filters_match(e.metadata, m.filters))
  )
  SELECT CASE m.aggregation_type
    WHEN 'SUM' THEN (SELECT sum(quantity) FROM ev)
    WHEN 'COUNT' THEN (SELECT count(*)::numeric FROM ev)
    WHEN 'MAX' THEN (SELECT trim_scale(max(quantity)) FROM ev)
    WHEN 'MIN' THEN (SELECT trim_scale(min(quantity)) FROM ev)
    WHEN 'AVG' THEN (SELECT avg(quantity) FROM ev)
    WHEN 'UNIQUE_COUNT' THEN (SELECT fluxrate_internal.unique_count(metadata->>m.property_name) FROM ev)
    WHEN 'LAST' THEN (SELECT fluxrate_internal.last_value(quantity, "timestamp", ingested_at, id) FROM ev)
  END INTO v;
  RETURN coalesce(v, 0);
END
$$;

-- Usage rollups ----------------------------------------------------------------
-- What every event contributes to SUM, COUNT, MAX, MIN and AVG, kept per
-- (organization, customer, meter) and UTC day, and again per UTC calendar
-- month, so that a closing run reads one row per (customer, meter) for each
-- whole month of the period and one per remaining day, instead of every event
-- of the period.  A minute job
-- (refresh_usage_rollups, scheduled by schedule_jobs) adds the events of the
-- transactions that have committed since its last run.
--
-- Exactness.  The rollups never guess which events they hold.  Each event
-- carries the id of the transaction that inserted it (usage_events.xact_id),
-- and the state keeps the snapshot S of the last refresh: the rollups hold
-- exactly the events whose transaction is visible in S.  A refresh reads, in
-- its own statement's snapshot S', the events visible in S' and not in S --
-- the transactions that committed in between, whatever their ids and
-- whenever they began -- adds them, and records S', in one transaction.  A
-- reader takes the rollups and the events NOT visible in the recorded S (the
-- "tail": a BRIN range of the newest pages, from S's xmin) in one statement,
-- i.e. one snapshot: it sees each visible event once, the same answer as a
-- pass over the events.  A transaction that stays open holds back nothing but
-- its own events.  (Timestamps cannot do this: a transaction may commit after
-- a later one, and an event may be sent for any past day.)
--
-- What the rollups hold is a function of the events alone: not of meter
-- filters, aggregation types or prices, which may change.  Only meters without
-- filters use them.  Events are never updated; delete_customer removes a
-- customer's events and its rollups together.
--
-- Transaction ids are the cluster's own.  The state records the cluster's
-- system identifier; a state from another cluster is not read, and the next
-- refresh rebuilds.  pg_dump restores neither table (derived data): a restored
-- database starts without a state.  Ids restored with the events are only
-- numbers then, and each is counted once, when the new cluster's snapshots
-- first show it as visible (visibility in later snapshots only grows).
CREATE TABLE fluxrate_internal.usage_rollups (
  org_id        uuid NOT NULL,
  width         text NOT NULL CHECK (width IN ('day', 'month')),
  bucket        timestamptz NOT NULL,     -- a UTC day or month: [bucket, bucket + 1 width)
  customer_id   uuid NOT NULL,
  meter_id      uuid NOT NULL,
  events        bigint NOT NULL,
  quantity_sum  numeric NOT NULL,
  quantity_max  numeric NOT NULL,
  quantity_min  numeric NOT NULL,
  -- width and bucket next: a period's months, and its days, are index ranges
  PRIMARY KEY (org_id, width, bucket, customer_id, meter_id)
);

-- One row, written by CREATE EXTENSION; snapshot NULL until the first refresh.
CREATE TABLE fluxrate_internal.usage_rollup_state (
  singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  system_identifier  bigint,
  snapshot           pg_catalog.txid_snapshot,   -- the rollups hold exactly the events whose xact_id is visible in it,
  refreshed_by       bigint,          -- ... except this one: the refresh's own transaction (see sys_refresh_rollups)
  refreshed_at       timestamptz,
  rebuilt_at         timestamptz,
  events_counted     bigint NOT NULL DEFAULT 0   -- by the last refresh
);
INSERT INTO fluxrate_internal.usage_rollup_state DEFAULT VALUES;

CREATE FUNCTION fluxrate_internal.system_identifier() RETURNS bigint
  LANGUAGE C STABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_system_identifier';

-- The snapshot the rollups can be read with, or NULL (never refreshed, or a
-- state written by another cluster).  STABLE: it reads the state in the
-- snapshot of the statement that calls it, the one that reads the rollups.
CREATE FUNCTION fluxrate_internal.rollup_snapshot() RETURNS txid_snapshot
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT s.snapshot FROM fluxrate_internal.usage_rollup_state s
   WHERE s.system_identifier = fluxrate_internal.system_identifier()
$$;


-- The lock that keeps one refresh at a time, and delete_customer from
-- interleaving with one (a refresh that read a customer's events before the
-- delete could write their rollups back after it).  Advisory, keyed by the
-- rollup table's oid: it needs no privilege on the state.
CREATE FUNCTION fluxrate_internal.rollup_lock_key() RETURNS bigint
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT ('fluxrate_internal.usage_rollups'::regclass::oid)::bigint << 8 $$;

-- Count the events of the transactions that committed since the last refresh
-- (all of them when there is no usable state: the first run, another
-- cluster's state, or rebuild => true).  Returns at once, with skipped =>
-- true, while another refresh or a customer deletion holds the lock.
CREATE FUNCTION fluxrate_internal.sys_refresh_rollups(rebuild boolean DEFAULT false)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  SET jit = off
  AS $$
DECLARE
  st fluxrate_internal.usage_rollup_state;
  v_snap txid_snapshot;
  v_events bigint := 0;
  v_buckets bigint := 0;
  v_sysid bigint := fluxrate_internal.system_identifier();
  v_self bigint;
BEGIN
  IF NOT pg_try_advisory_xact_lock(fluxrate_internal.rollup_lock_key()) THEN
    RETURN jsonb_build_object('skipped', true, 'reason', 'another refresh or a customer deletion holds the rollups');
  END IF;
  SELECT * INTO STRICT st FROM fluxrate_internal.usage_rollup_state;
  rebuild := rebuild OR st.snapshot IS NULL OR st.system_identifier IS DISTINCT FROM v_sysid;
  IF rebuild THEN
    DELETE FROM fluxrate_internal.usage_rollups;
  END IF;
  -- Our own transaction is never "visible" to the rollups: a snapshot does not
  -- list its own transaction as running, so S' would show it as committed, and
  -- events this transaction inserts -- before this call, when the application
  -- tracked and refreshed in one transaction, or after it -- would be in
  -- neither half.  Its events are counted by the next refresh, once it has
  -- committed (refreshed_by); if it rolls back, so does this refresh.
  v_self := txid_current();
  -- One statement: its snapshot S' is the one recorded (txid_current_snapshot()
  -- is the running statement's).  The events visible in S' and not in S: the
  -- test against S' is implied for events of this cluster (a row is read only
  -- if its transaction is visible), and counts an id restored from another
  -- cluster once.  The previous xmin is a literal, for the BRIN index (events
  -- below it were all visible in S); for a rebuild, a sequential scan.  The day
  -- is a UTC day whatever the session's TimeZone (date_bin on timestamptz is
  -- absolute).
  EXECUTE format(
    'WITH snap AS (SELECT txid_current_snapshot() AS now_s, %L::txid_snapshot AS prev_s),
     n AS (
       SELECT e.org_id, date_bin(''1 day'', e."timestamp", ''2000-01-01 00:00:00+00''::timestamptz) AS bucket,
              e.customer_id, e.meter_id, count(*) AS events, sum(e.quantity) AS s, max(e.quantity) AS mx, min(e.quantity) AS mn
         FROM fluxrate_internal.usage_events e
        WHERE txid_visible_in_snapshot(e.xact_id, (SELECT now_s FROM snap)) AND e.xact_id <> %s %s
        GROUP BY 1, 2, 3, 4
     ), m AS (
       SELECT n.org_id, date_trunc(''month'', n.bucket, ''UTC'') AS bucket, n.customer_id, n.meter_id,
              sum(n.events)::bigint AS events, sum(n.s) AS s, max(n.mx) AS mx, min(n.mn) AS mn
         FROM n GROUP BY 1, 2, 3, 4
     ), ins AS (
       INSERT INTO fluxrate_internal.usage_rollups AS r
              (org_id, width, bucket, customer_id, meter_id, events, quantity_sum, quantity_max, quantity_min)
       SELECT n.org_id, ''day'', n.bucket, n.customer_id, n.meter_id, n.events, n.s, n.mx, n.mn FROM n
       UNION ALL
       SELECT m.org_id, ''month'', m.bucket, m.customer_id, m.meter_id, m.events, m.s, m.mx, m.mn FROM m
       ON CONFLICT (org_id, width, bucket, customer_id, meter_id) DO UPDATE
          SET events = r.events + excluded.events,
              quantity_sum = r.quantity_sum + excluded.quantity_sum,
              quantity_max = greatest(r.quantity_max, excluded.quantity_max),
              quantity_min = least(r.quantity_min, excluded.quantity_min)
       RETURNING 1
     )
     SELECT (SELECT now_s FROM snap), coalesce((SELECT sum(n.events) FROM n), 0)::bigint, (SELECT count(*) FROM ins)',
    CASE WHEN rebuild THEN NULL ELSE st.snapshot END,
    v_self,
    CASE WHEN rebuild THEN '' ELSE format('AND e.xact_id >= %s AND (NOT txid_visible_in_snapshot(e.xact_id, (SELECT prev_s FROM snap)) OR e.xact_id = %s)',
                                          least(txid_snapshot_xmin(st.snapshot), st.refreshed_by), coalesce(st.refreshed_by, 0)) END)
    INTO v_snap, v_events, v_buckets;
  -- the closer's plans over the rollups need statistics that know their size
  -- (50_lifecycle.sql)
  PERFORM fluxrate_internal.analyze_if_outgrown('fluxrate_internal.usage_rollups');
  UPDATE fluxrate_internal.usage_rollup_state
     SET system_identifier = v_sysid, snapshot = v_snap, refreshed_by = v_self, refreshed_at = fluxrate.now(),
         rebuilt_at = CASE WHEN rebuild THEN fluxrate.now() ELSE rebuilt_at END,
         events_counted = v_events;
  RETURN jsonb_build_object('skipped', false, 'rebuilt', rebuild, 'events', v_events, 'buckets', v_buckets,
                            'snapshot', v_snap::text);
END
$$;

-- The minute job, and what operators call after a logical replication
-- switchover or anything else that wrote events with another cluster's ids
-- into a database that already had rollups (rebuild => true: recount).
CREATE FUNCTION fluxrate.refresh_usage_rollups(rebuild boolean DEFAULT false) RETURNS jsonb
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate_internal.sys_refresh_rollups(rebuild) $$;
COMMENT ON FUNCTION fluxrate.refresh_usage_rollups(boolean) IS
  'adds the events of the transactions committed since the last refresh to the daily usage rollups (the minute job); rebuild => true recounts everything';

-- The rollups against the events, for one organization: every (day, customer,
-- meter) whose rollup differs from the events it should hold (those visible
-- in the state's snapshot).  No rows: they agree.  For tests and for operators
-- who want to see it for themselves.
CREATE FUNCTION fluxrate_internal.rollup_differences(org_id uuid)
  RETURNS TABLE (width text, bucket timestamptz, customer_id uuid, meter_id uuid, rollup_events bigint, event_count bigint,
                 rollup_sum numeric, event_sum numeric)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH h AS (SELECT st.snapshot AS v, st.refreshed_by AS self FROM fluxrate_internal.usage_rollup_state st
              WHERE st.system_identifier = fluxrate_internal.system_identifier()),
  r AS (SELECT * FROM fluxrate_internal.usage_rollups r WHERE r.org_id = rollup_differences.org_id),
  ev AS MATERIALIZED (SELECT e.* FROM fluxrate_internal.usage_events e
                       WHERE e.org_id = rollup_differences.org_id AND txid_visible_in_snapshot(e.xact_id, (SELECT v FROM h))
                         AND e.xact_id IS DISTINCT FROM (SELECT self FROM h)),
  e AS (SELECT w.width, CASE w.width WHEN 'day' THEN date_bin('1 day', ev."timestamp", '2000-01-01 00:00:00+00'::timestamptz)
                                     ELSE date_trunc('month', ev."timestamp", 'UTC') END AS bucket,
               ev.customer_id, ev.meter_id, count(*) AS events, sum(ev.quantity) AS s, max(ev.quantity) AS mx, min(ev.quantity) AS mn
          FROM ev CROSS JOIN (VALUES ('day'), ('month')) w(width)
         GROUP BY 1, 2, 3, 4)
  SELECT coalesce(r.width, e.width), coalesce(r.bucket, e.bucket), coalesce(r.customer_id, e.customer_id),
         coalesce(r.meter_id, e.meter_id), r.events, e.events, r.quantity_sum, e.s
    FROM r FULL JOIN e ON e.width = r.width AND e.bucket = r.bucket AND e.customer_id = r.customer_id AND e.meter_id = r.meter_id
   WHERE r.events IS DISTINCT FROM e.events OR r.quantity_sum IS DISTINCT FROM e.s
      OR r.quantity_max IS DISTINCT FROM e.mx OR r.quantity_min IS DISTINCT FROM e.mn
      OR (SELECT v FROM h) IS NULL
$$;

-- One aggregation over one organization's period, for the given meters, in one
-- pass (period_usage()'s whole-organization path, the closer's snapshot).
--
-- When the period is whole UTC days and the rollups are usable: the period's
-- rollup rows plus the tail (events not yet rolled up), in one statement.
-- Otherwise one pass over the period's events.  Both are EXECUTE ... USING:
-- planned for the real bounds (the pass is a parallel hash aggregate over
-- millions of rows, like a plain GROUP BY; the tail is a BRIN range of the
-- newest pages), and RETURN QUERY may run in parallel.  When the meters are all
-- of the organization's, the meter test moves from every row to every group.
CREATE FUNCTION fluxrate_internal.org_period_usage(org_id uuid, period_start timestamptz, period_end timestamptz,
    aggregation_type text, meter_ids uuid[], use_rollups boolean DEFAULT true)
  RETURNS TABLE (customer_id uuid, meter_id uuid, usage numeric)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_all boolean := (SELECT count(*) FROM fluxrate_internal.meters m WHERE m.org_id = org_period_usage.org_id)
                   <= cardinality(meter_ids);
  v_snap txid_snapshot;
  v_self bigint;
  v_ms timestamptz;
  v_me timestamptz;
BEGIN
  IF aggregation_type IS NULL OR aggregation_type NOT IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG') THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('no one-pass aggregation for %s', aggregation_type),
      HINT = 'One pass computes SUM, COUNT, MAX, MIN and AVG; the other meters go through meter_usage().';
  END IF;
  IF use_rollups AND fluxrate_internal.whole_utc_days(period_start, period_end) THEN
    SELECT st.snapshot, st.refreshed_by INTO v_snap, v_self
      FROM fluxrate_internal.usage_rollup_state st WHERE st.system_identifier = fluxrate_internal.system_identifier();
    -- the whole UTC months inside the period [v_ms, v_me), read from the month
    -- rows; the days before and after them from the day rows
    v_ms := date_trunc('month', period_start, 'UTC');
    IF v_ms < period_start THEN
      v_ms := (date_trunc('month', period_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END IF;
    v_me := date_trunc('month', period_end, 'UTC');
    IF v_ms >= v_me THEN
      v_ms := period_end;
      v_me := period_end;
    END IF;
  END IF;
  IF v_snap IS NOT NULL THEN
    -- The state is read again inside the statement, in its snapshot, with the
    -- rollups: a refresh that committed since v_snap was read has moved events
    -- from the tail into the rollups, and the tail's test against the state
    -- read in-statement drops them.  (Snapshots only move forward; the lower
    -- bound of the tail -- v_snap's xmin, or the refresh's own transaction if
    -- older -- is a literal so that the planner takes the BRIN index.)
    RETURN QUERY EXECUTE format(
      'WITH h AS (SELECT st.snapshot AS v, st.refreshed_by AS self FROM fluxrate_internal.usage_rollup_state st
                   WHERE st.system_identifier = fluxrate_internal.system_identifier())
       SELECT g.customer_id, g.meter_id, %s AS usage
         FROM (SELECT u.customer_id, u.meter_id, sum(u.n) AS n, sum(u.s) AS s, max(u.mx) AS mx, min(u.mn) AS mn
                 FROM (SELECT r.customer_id, r.meter_id, r.events AS n, r.quantity_sum AS s, r.quantity_max AS mx,
                              r.quantity_min AS mn
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''month'' AND r.bucket >= $5 AND r.bucket < $6 %s
                          AND (SELECT v FROM h) IS NOT NULL
                       UNION ALL
                       SELECT r.customer_id, r.meter_id, r.events AS n, r.quantity_sum AS s, r.quantity_max AS mx,
                              r.quantity_min AS mn
                         FROM fluxrate_internal.usage_rollups r
                        WHERE r.org_id = $1 AND r.width = ''day''
                          AND ((r.bucket >= $2 AND r.bucket < $5) OR (r.bucket >= $6 AND r.bucket < $3)) %s
                          AND (SELECT v FROM h) IS NOT NULL
                       UNION ALL
                       SELECT e.customer_id, e.meter_id, 1, e.quantity, e.quantity, e.quantity
                         FROM fluxrate_internal.usage_events e
                        WHERE e.org_id = $1 AND e.xact_id >= %s
                          AND NOT coalesce(txid_visible_in_snapshot(e.xact_id, (SELECT v FROM h))
                                           AND e.xact_id IS DISTINCT FROM (SELECT self FROM h), false)
                          AND e."timestamp" >= $2 AND e."timestamp" < $3 %s) u
                GROUP BY u.customer_id, u.meter_id) g
        WHERE g.meter_id = ANY ($4)',
      CASE aggregation_type WHEN 'SUM' THEN 'g.s' WHEN 'COUNT' THEN 'g.n' WHEN 'MAX' THEN 'trim_scale(g.mx)'
        WHEN 'MIN' THEN 'trim_scale(g.mn)' WHEN 'AVG' THEN 'g.s / g.n' END,
      CASE WHEN v_all THEN '' ELSE 'AND r.meter_id = ANY ($4)' END,
      CASE WHEN v_all THEN '' ELSE 'AND r.meter_id = ANY ($4)' END,
      least(txid_snapshot_xmin(v_snap), v_self),
      CASE WHEN v_all THEN '' ELSE 'AND e.meter_id = ANY ($4)' END)
      USING org_id, period_start, period_end, meter_ids, v_ms, v_me;
    RETURN;
  END IF;
  RETURN QUERY EXECUTE format(
    'SELECT g.customer_id, g.meter_id, g.usage
       FROM (SELECT e.customer_id, e.meter_id, %s AS usage FROM fluxrate_internal.usage_events e
              WHERE e.org_id = $1 AND e."timestamp" >= $2 AND e."timestamp" < $3 %s
              GROUP BY e.customer_id, e.meter_id) g
      WHERE g.meter_id = ANY ($4)',
    CASE aggregation_type WHEN 'SUM' THEN 'sum(e.quantity)' WHEN 'COUNT' THEN 'count(*)::numeric'
      WHEN 'MAX' THEN 'trim_scale(max(e.quantity))' WHEN 'MIN' THEN 'trim_scale(min(e.quantity))' WHEN 'AVG' THEN 'avg(e.quantity)' END,
    CASE WHEN v_all THEN '' ELSE 'AND e.meter_id = ANY ($4)' END)
    USING org_id, period_start, period_end, meter_ids;
END
$$;

-- Whether [period_start, period_end) is whole UTC days, i.e. whole rollup buckets.
CREATE FUNCTION fluxrate_internal.whole_utc_days(period_start timestamptz, period_end timestamptz) RETURNS boolean
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT period_start < period_end
     AND date_bin('1 day', period_start, '2000-01-01 00:00:00+00'::timestamptz) = period_start
     AND date_bin('1 day', period_end, '2000-01-01 00:00:00+00'::timestamptz) = period_end
$$;
-- Many (customer, meter, period) triples at once; ord is the 1-based position in
-- the arrays.  Plain meters (SUM, COUNT, MAX, MIN, AVG without filters) are one
-- index-only range scan of the covering index each, inside one statement; the
-- others go through meter_usage().
CREATE FUNCTION fluxrate_internal.period_usage(org_id uuid, customer_ids uuid[], meter_ids uuid[],
    period_starts timestamptz[], period_ends timestamptz[])
  RETURNS TABLE (ord integer, usage numeric)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  WITH t AS MATERIALIZED (
    SELECT x.ord::integer AS ord, x.c, x.m, x.s, x.e, mt.aggregation_type AS agg,
           (mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')) AS plain
      FROM unnest(customer_ids, meter_ids, period_starts, period_ends) WITH ORDINALITY AS x(c, m, s, e, ord)
      JOIN fluxrate_internal.meters mt ON mt.org_id = period_usage.org_id AND mt.id = x.m
  ), shape AS MATERIALIZED (
    -- one period shared by every SUM pair, asked for at least half of the
    -- organization's customers (a whole-organization report, an analytics pass)
    SELECT count(DISTINCT (t.s, t.e)) = 1
           AND count(DISTINCT t.c) * 2 >= (SELECT count(*) FROM fluxrate_internal.customers cu
                                           WHERE cu.org_id = period_usage.org_id) AS whole,
           min(t.s) AS s, max(t.e) AS e
      FROM t WHERE t.plain AND t.agg = 'SUM'
  ), sums AS (
    -- a few pairs or several periods (a closing batch): one index-only range scan
    -- per pair inside one join (SUM alone, the common case: one aggregate per row)
    SELECT t.ord, coalesce(sum(e.quantity), 0) AS usage
      FROM t LEFT JOIN fluxrate_internal.usage_events e
        ON e.org_id = period_usage.org_id AND e.customer_id = t.c AND e.meter_id = t.m
       AND e."timestamp" >= t.s AND e."timestamp" < t.e
     WHERE t.plain AND t.agg = 'SUM' AND NOT (SELECT whole FROM shape)
     GROUP BY t.ord
    UNION ALL
    -- most of the organization over one period: aggregate first, in one pass over
    -- the period (what a plain GROUP BY does), then join the 10,000s of sums back,
    -- instead of joining millions of events to the pairs (run-time gated: only one
    -- of the two branches executes)
    SELECT t.ord, coalesce(a.usage, 0)
      FROM t LEFT JOIN fluxrate_internal.org_period_usage(period_usage.org_id, (SELECT s FROM shape), (SELECT e FROM shape), 'SUM',
                                                          (SELECT array_agg(DISTINCT t2.m) FROM t t2 WHERE t2.plain AND t2.agg = 'SUM')) a
        ON a.customer_id = t.c AND a.meter_id = t.m
     WHERE t.plain AND t.agg = 'SUM' AND (SELECT whole FROM shape)
  ), others AS (
    SELECT t.ord, CASE t.agg WHEN 'COUNT' THEN count(e.quantity)::numeric
                    WHEN 'MAX' THEN coalesce(trim_scale(max(e.quantity)), 0) WHEN 'MIN' THEN coalesce(trim_scale(min(e.quantity)), 0)
                    ELSE coalesce(avg(e.quantity), 0) END AS usage
      FROM t LEFT JOIN fluxrate_internal.usage_events e
        ON e.org_id = period_usage.org_id AND e.customer_id = t.c AND e.meter_id = t.m
       AND e."timestamp" >= t.s AND e."timestamp" < t.e
     WHERE t.plain AND t.agg <> 'SUM'
     GROUP BY t.ord, t.agg
  )
  SELECT ord, usage FROM sums
  UNION ALL
  SELECT ord, usage FROM others
  UNION ALL
  SELECT t.ord, fluxrate_internal.meter_usage(period_usage.org_id, t.c, t.m, t.s, t.e) FROM t WHERE NOT t.plain
$$;

-- Live usage and entitlements ------------------------------------------------
-- "Is this customer over its limit?" as plain SQL, consistent with what will be
-- billed: the same meter_usage() over the same current period.

-- Usage so far in a subscription's current period, per metered charge/feature.
CREATE FUNCTION fluxrate_internal.subscription_usage(org_id uuid, s fluxrate_internal.subscriptions) RETURNS jsonb
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT pg_catalog.jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'status', s.status,
    'period_start', s.current_period_start, 'period_end', s.current_period_end,
    'usage', coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('meter_id', m.id, 'meter_name', m.meter_name,
               'aggregation_type', m.aggregation_type, 'unit', m.unit,
               -- the whole current period, as the invoice will count it (events may carry
               -- timestamps up to 5 minutes ahead of now, and they are billed in this period)
               'usage', fluxrate_internal.meter_usage(org_id, s.customer_id, m.id, s.current_period_start,
                                                      s.current_period_end))
             ORDER BY m.meter_name), '[]'::jsonb))
    FROM fluxrate_internal.meters m
   WHERE m.org_id = subscription_usage.org_id
     AND m.id IN (SELECT ch.meter_id FROM fluxrate_internal.charges ch
                   WHERE ch.org_id = subscription_usage.org_id AND ch.plan_id = s.plan_id AND ch.meter_id IS NOT NULL
                  UNION
                  SELECT mm.id FROM fluxrate_internal.plan_features pf
                    JOIN fluxrate_internal.meters mm ON mm.org_id = pf.org_id AND mm.feature_id = pf.feature_id
                   WHERE pf.org_id = subscription_usage.org_id AND pf.plan_id = s.plan_id)
$$;

CREATE FUNCTION fluxrate.get_subscription_usage(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  s fluxrate_internal.subscriptions;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = get_subscription_usage.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN fluxrate_internal.subscription_usage(v_org, s);
END
$$;

CREATE FUNCTION fluxrate.get_customer_usage(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = get_customer_usage.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN jsonb_build_object('customer_id', customer_id, 'subscriptions',
    coalesce((SELECT jsonb_agg(fluxrate_internal.subscription_usage(v_org, s) ORDER BY s.created_at, s.id)
                FROM fluxrate_internal.subscriptions s
               WHERE s.org_id = v_org AND s.customer_id = get_customer_usage.customer_id
                 AND s.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')), '[]'::jsonb));
END
$$;

-- May this customer use this feature now?  Switch and custom features: the plan's
-- is_enabled (and static_value).  Meter features: usage in the reset window (the
-- calendar day/week/month/year containing now, in UTC; without a reset period,
-- the subscription's period containing now, even when the closer has not advanced
-- the subscription yet; none yet for a subscription that starts later: usage 0)
-- against usage_limit; a soft limit stays allowed.  The window ends at the earlier
-- of its own end and now + 5 minutes (events may be stamped up to 5 minutes ahead).
CREATE FUNCTION fluxrate.check_entitlement(customer_external_id text DEFAULT NULL, lookup_key text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  r record;
  v_start timestamptz;
  v_end timestamptz;
  v_k integer;
  v_usage numeric;
  v_now timestamptz := fluxrate.now();
BEGIN
  PERFORM fluxrate_internal.required(check_entitlement.customer_external_id, 'customer_external_id');
  PERFORM fluxrate_internal.required(check_entitlement.lookup_key, 'lookup_key');
  SELECT s.*, pf.is_enabled, pf.usage_limit, pf.usage_reset_period, pf.is_soft_limit, pf.static_value,
         f.type AS feature_type, m.id AS meter_id, c.id AS cust_id
    INTO r
    FROM fluxrate_internal.customers c
    JOIN fluxrate_internal.subscriptions s ON s.org_id = c.org_id AND s.customer_id = c.id
         AND s.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')
    JOIN fluxrate_internal.plan_features pf ON pf.org_id = s.org_id AND pf.plan_id = s.plan_id
    JOIN fluxrate_internal.features f ON f.org_id = pf.org_id AND f.id = pf.feature_id
    LEFT JOIN fluxrate_internal.meters m ON m.org_id = f.org_id AND m.feature_id = f.id
   WHERE c.org_id = v_org AND c.external_id = check_entitlement.customer_external_id
     AND f.lookup_key = check_entitlement.lookup_key
   ORDER BY pf.is_enabled DESC, s.created_at
   LIMIT 1;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('allowed', false, 'reason', 'no active subscription includes this feature',
                              'customer_external_id', customer_external_id, 'lookup_key', lookup_key);
  END IF;
  IF r.feature_type <> 'meter' THEN
    RETURN jsonb_build_object('allowed', r.is_enabled, 'feature_type', r.feature_type, 'is_enabled', r.is_enabled,
                              'static_value', r.static_value, 'subscription_id', r.id);
  END IF;
  IF r.usage_reset_period IS NOT NULL THEN
    v_start := date_trunc(r.usage_reset_period, v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_end := ((v_start AT TIME ZONE 'UTC') + ('1 ' || r.usage_reset_period)::interval) AT TIME ZONE 'UTC';
  ELSE
    v_start := r.current_period_start;
    v_end := r.current_period_end;
    -- the period has ended but is not closed yet (the closer runs every minute): the
    -- window is the period that contains now, as the closer will number it (the
    -- current period ends at boundary index + 1, so each step needs the next one only)
    v_k := r.current_period_index + 1;
    WHILE v_end <= v_now AND v_k < r.current_period_index + 1000 LOOP
      v_start := v_end;
      v_k := v_k + 1;
      v_end := fluxrate_internal.period_boundary(r.billing_anchor, r.billing_interval, r.alignment, v_k);
    END LOOP;
  END IF;
  v_end := least(v_end, v_now + interval '5 minutes');
  -- (a subscription that starts later has no window yet)
  v_usage := CASE WHEN v_end > v_start THEN fluxrate_internal.meter_usage(v_org, r.cust_id, r.meter_id, v_start, v_end) ELSE 0 END;
  RETURN jsonb_build_object('allowed', r.is_enabled AND (r.usage_limit IS NULL OR v_usage < r.usage_limit OR r.is_soft_limit),
    'feature_type', 'meter', 'is_enabled', r.is_enabled, 'usage', v_usage, 'usage_limit', r.usage_limit,
    'is_soft_limit', r.is_soft_limit, 'usage_reset_period', r.usage_reset_period,
    'window_start', v_start, 'subscription_id', r.id);
END
$$;

-- Meter analytics (GET /meters/{id}/usage, GET /meters/{id}/stats) -------------
-- Analytics count the events that pass the meter's filters, for every customer
-- or one.  Calendar buckets are UTC; weeks are ISO weeks (Monday).

-- Usage of one meter over [range_start, range_end), all customers (customer_id
-- NULL) or one: SUM, COUNT, MAX, MIN, AVG and UNIQUE_COUNT over the events of
-- the range taken together; LAST and WEIGHTED_SUM, which are per customer, as
-- the sum over customers of meter_usage() (what each would be billed).
CREATE FUNCTION fluxrate_internal.meter_range_usage(org_id uuid, m fluxrate_internal.meters, customer_id uuid,
    range_start timestamptz, range_end timestamptz)
  RETURNS numeric
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT CASE WHEN m.aggregation_type IN ('LAST', 'WEIGHTED_SUM') THEN
    (SELECT coalesce(sum(fluxrate_internal.meter_usage(meter_range_usage.org_id, c.customer_id, m.id,
                                                       meter_range_usage.range_start, meter_range_usage.range_end)), 0)
       FROM (SELECT DISTINCT e.customer_id FROM fluxrate_internal.usage_events e
              WHERE e.org_id = meter_range_usage.org_id AND e.meter_id = m.id
                AND e."timestamp" < meter_range_usage.range_end   -- earlier events carry a WEIGHTED_SUM level in
                AND (meter_range_usage.customer_id IS NULL OR e.customer_id = meter_range_usage.customer_id)) c)
  ELSE
    (SELECT coalesce(CASE m.aggregation_type WHEN 'SUM' THEN sum(e.quantity) WHEN 'COUNT' THEN count(*)::numeric
              WHEN 'MAX' THEN trim_scale(max(e.quantity)) WHEN 'MIN' THEN trim_scale(min(e.quantity)) WHEN 'AVG' THEN avg(e.quantity)
              WHEN 'UNIQUE_COUNT' THEN fluxrate_internal.unique_count(e.metadata->>m.property_name) END, 0)
       FROM fluxrate_internal.usage_events e
      WHERE e.org_id = meter_range_usage.org_id AND e.meter_id = m.id
        AND e."timestamp" >= meter_range_usage.range_start AND e."timestamp" < meter_range_usage.range_end
        AND (meter_range_usage.customer_id IS NULL OR e.customer_id = meter_range_usage.customer_id)
        AND fluxrate_internal.filters_match(e.metadata, m.filters))
  END
$$;

-- GET /meters/{meter_id}/usage: the meter's usage over [start_date, end_date)
-- (default the last 30 days up to now), in every hour/day/week/month bucket of
-- the range (empty buckets included, at most 10,000), for all customers or one.
CREATE FUNCTION fluxrate.get_meter_usage(meter_id uuid, start_date timestamptz DEFAULT NULL,
    end_date timestamptz DEFAULT NULL, group_by text DEFAULT 'day', customer_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  v_now timestamptz := fluxrate.now();
  v_start timestamptz;
  v_end timestamptz;
  v_group text;
  v_step interval;
  v_first timestamp;
  m fluxrate_internal.meters;
  v_result jsonb;
BEGIN
  v_group := coalesce(fluxrate_internal.one_of(get_meter_usage.group_by, 'group_by', ARRAY['hour', 'day', 'week', 'month']), 'day');
  v_start := coalesce(get_meter_usage.start_date, ((v_now AT TIME ZONE 'UTC') - interval '30 days') AT TIME ZONE 'UTC');
  v_end := coalesce(get_meter_usage.end_date, v_now);
  IF v_start >= v_end THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date must be before end_date',
      format('start_date %s is not before end_date %s.', v_start, v_end),
      'Send a start_date earlier than end_date (by default the range is the last 30 days up to now).');
  END IF;
  v_step := ('1 ' || v_group)::interval;
  v_first := date_trunc(v_group, v_start AT TIME ZONE 'UTC');
  IF v_first + 10000 * v_step < v_end AT TIME ZONE 'UTC' THEN
    PERFORM fluxrate_internal.fail('PT422', format('too many %s periods', v_group),
      format('From %s to %s there are more than 10000 periods of one %s.', v_start, v_end, v_group),
      'Use a coarser group_by or a shorter range.');
  END IF;
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter_usage.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  IF get_meter_usage.customer_id IS NOT NULL THEN
    PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = get_meter_usage.customer_id;
    IF NOT FOUND THEN
      PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
    END IF;
  END IF;
  WITH ev AS MATERIALIZED (
    SELECT e.customer_id AS cust, e.quantity AS q, e.metadata AS meta,
           date_trunc(v_group, e."timestamp" AT TIME ZONE 'UTC') AS bucket
      FROM fluxrate_internal.usage_events e
     WHERE e.org_id = v_org AND e.meter_id = m.id
       AND e."timestamp" >= v_start AND e."timestamp" < v_end
       AND (get_meter_usage.customer_id IS NULL OR e.customer_id = get_meter_usage.customer_id)
       AND fluxrate_internal.filters_match(e.metadata, m.filters)
  ), g AS (
    SELECT ev.bucket, count(*) AS n,
           CASE m.aggregation_type WHEN 'SUM' THEN sum(ev.q) WHEN 'COUNT' THEN count(*)::numeric
             WHEN 'MAX' THEN trim_scale(max(ev.q)) WHEN 'MIN' THEN trim_scale(min(ev.q)) WHEN 'AVG' THEN avg(ev.q)
             WHEN 'UNIQUE_COUNT' THEN fluxrate_internal.unique_count(ev.meta->>m.property_name) END AS u
      FROM ev GROUP BY ev.bucket
  ), buckets AS (
    SELECT s AS bucket FROM generate_series(v_first, v_end AT TIME ZONE 'UTC', v_step) s
     WHERE s < v_end AT TIME ZONE 'UTC'
  )
  SELECT jsonb_build_object('meter_id', m.id,
    'total_usage', fluxrate_internal.meter_range_usage(v_org, m, get_meter_usage.customer_id, v_start, v_end),
    'event_count', (SELECT count(*) FROM ev),
    'unique_customers', (SELECT count(DISTINCT ev.cust) FROM ev),
    'period_start', v_start, 'period_end', v_end,
    'grouped_data', (SELECT coalesce(jsonb_agg(jsonb_build_object('period', bk.bucket AT TIME ZONE 'UTC',
        'usage', CASE WHEN m.aggregation_type IN ('LAST', 'WEIGHTED_SUM')
                   THEN fluxrate_internal.meter_range_usage(v_org, m, get_meter_usage.customer_id,
                          greatest(bk.bucket AT TIME ZONE 'UTC', v_start), least((bk.bucket + v_step) AT TIME ZONE 'UTC', v_end))
                   ELSE coalesce(g.u, 0) END,
        'event_count', coalesce(g.n, 0)) ORDER BY bk.bucket), '[]'::jsonb)
      FROM buckets bk LEFT JOIN g ON g.bucket = bk.bucket))
    INTO v_result;
  RETURN v_result;
END
$$;

-- GET /meters/{meter_id}/stats: all-time counts, and the usage so far in the UTC
-- day, ISO week and month containing now ([start of the unit, now)).
CREATE FUNCTION fluxrate.get_meter_stats(meter_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('usage.read');
  v_now timestamptz := fluxrate.now();
  m fluxrate_internal.meters;
  v_result jsonb;
BEGIN
  SELECT * INTO m FROM fluxrate_internal.meters x WHERE x.org_id = v_org AND x.id = get_meter_stats.meter_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'meter not found', format('No meter %s in this organization.', meter_id));
  END IF;
  SELECT jsonb_build_object('meter_id', m.id, 'total_events', count(*),
    'unique_customers', count(DISTINCT e.customer_id),
    'first_event_date', min(e."timestamp"), 'last_event_date', max(e."timestamp"),
    'today_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('day', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now),
    'this_week_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('week', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now),
    'this_month_usage', fluxrate_internal.meter_range_usage(v_org, m, NULL,
                     date_trunc('month', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', v_now))
    INTO v_result
    FROM fluxrate_internal.usage_events e
   WHERE e.org_id = v_org AND e.meter_id = m.id AND fluxrate_internal.filters_match(e.metadata, m.filters);
  RETURN v_result;
END
$$;

-- ==== src/sql/50_lifecycle.sql ====
-- 50_lifecycle.sql: invoices (subscription, final, manual), closing periods,
-- grace period and finalization, invoice states, cancellation, PAST_DUE, taxes,
-- and the pg_cron helper.

-- the unrounded amount of each line: tax is computed on the unrounded subtotal
ALTER TABLE fluxrate_internal.invoice_lines ADD COLUMN amount_unrounded numeric;

-- Taxes ----------------------------------------------------------------------

-- The customer's rate: a state-specific rate beats the country-wide one; none = 0.
CREATE FUNCTION fluxrate_internal.tax_rate_for(org_id uuid, customer_id uuid) RETURNS numeric
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT coalesce((
    SELECT t.rate FROM fluxrate_internal.tax_rates t, fluxrate_internal.customers c
     WHERE c.org_id = tax_rate_for.org_id AND c.id = tax_rate_for.customer_id
       AND t.org_id = c.org_id AND t.country = c.billing_address_country
       AND t.state IN ('', coalesce(c.billing_address_state, ''))
     ORDER BY t.state DESC LIMIT 1), 0)
$$;

CREATE FUNCTION fluxrate.set_tax_rate(country text DEFAULT NULL, rate numeric DEFAULT NULL, state text DEFAULT '', name text DEFAULT 'Tax')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  t fluxrate_internal.tax_rates;
BEGIN
  PERFORM fluxrate_internal.required(set_tax_rate.country, 'country');
  PERFORM fluxrate_internal.required(set_tax_rate.rate, 'rate');
  IF upper(set_tax_rate.country) !~ '^[A-Z]{2}$' THEN
    PERFORM fluxrate_internal.fail('22023', format('invalid country: %s', set_tax_rate.country), 'country is an ISO 3166 two-letter code.');
  END IF;
  IF set_tax_rate.rate < 0 OR set_tax_rate.rate >= 1 THEN
    PERFORM fluxrate_internal.fail('PT422', 'rate must be at least 0 and below 1', format('rate was %s; 18%% is 0.18.', set_tax_rate.rate));
  END IF;
  INSERT INTO fluxrate_internal.tax_rates (org_id, country, state, rate, name, created_at)
  VALUES (v_org, upper(set_tax_rate.country), coalesce(set_tax_rate.state, ''), set_tax_rate.rate,
          coalesce(set_tax_rate.name, 'Tax'), fluxrate.now())
  ON CONFLICT ON CONSTRAINT tax_rates_org_id_country_state_key DO UPDATE SET rate = EXCLUDED.rate, name = EXCLUDED.name
  RETURNING * INTO t;
  RETURN jsonb_build_object('id', t.id, 'country', t.country, 'state', t.state, 'rate', t.rate, 'name', t.name);
END
$$;

CREATE FUNCTION fluxrate.list_tax_rates() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN coalesce((SELECT jsonb_agg(jsonb_build_object('id', t.id, 'country', t.country, 'state', t.state,
                     'rate', t.rate, 'name', t.name) ORDER BY t.country, t.state)
                   FROM fluxrate_internal.tax_rates t WHERE t.org_id = v_org), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.delete_tax_rate(tax_rate_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  DELETE FROM fluxrate_internal.tax_rates t WHERE t.org_id = v_org AND t.id = delete_tax_rate.tax_rate_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'tax rate not found', format('No tax rate %s in this organization.', tax_rate_id));
  END IF;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', tax_rate_id, 'deleted', true);
END
$$;

-- Invoice documents ------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.invoice_json(i fluxrate_internal.invoices, with_lines boolean DEFAULT true) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', i.id, 'invoice_number', i.invoice_number, 'status', i.status,
    'kind', i.kind, 'customer_id', i.customer_id, 'subscription_id', i.subscription_id, 'currency', i.currency,
    'subtotal', i.subtotal, 'tax', i.tax, 'tax_rate', i.tax_rate, 'total', i.total, 'amount_due', i.amount_due,
    'amount_paid', i.amount_paid, 'period_start', i.period_start, 'period_end', i.period_end,
    'issue_date', i.issue_date, 'due_date', i.due_date, 'scheduled_finalize_at', i.scheduled_finalize_at,
    'finalized_at', i.finalized_at, 'paid_at', i.paid_at, 'voided_at', i.voided_at,
    'public_token', i.public_token, 'meta_data', i.meta_data, 'created_at', i.created_at)
  || CASE WHEN with_lines THEN pg_catalog.jsonb_build_object('line_items', coalesce((
       SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('id', l.id, 'position', l.position,
                'line_type', l.line_type, 'charge_id', l.charge_id, 'description', l.description,
                'quantity', l.quantity, 'unit_amount', l.unit_amount, 'line_total', l.line_total,
                'period_start', l.period_start, 'period_end', l.period_end) ORDER BY l.position)
         FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id), '[]'::jsonb))
     ELSE '{}'::jsonb END
$$;

-- subtotal = the sum of the rounded lines (the invoice adds up); tax on the
-- unrounded subtotal, rounded once; total = subtotal + tax.
CREATE FUNCTION fluxrate_internal.recompute_totals(org_id uuid, invoice_id uuid) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  v_rate numeric;
  v_sub numeric;
  v_unrounded numeric;
  v_tax numeric;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = recompute_totals.org_id AND x.id = recompute_totals.invoice_id;
  v_rate := fluxrate_internal.tax_rate_for(i.org_id, i.customer_id);
  SELECT coalesce(sum(l.line_total), 0), coalesce(sum(coalesce(l.amount_unrounded, l.line_total)), 0)
    INTO v_sub, v_unrounded
    FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_tax := fluxrate_internal.round_money(v_unrounded * v_rate, i.currency);
  UPDATE fluxrate_internal.invoices x
     SET subtotal = v_sub, tax = v_tax, tax_rate = v_rate, total = v_sub + v_tax,
         amount_due = v_sub + v_tax - x.amount_paid, updated_at = fluxrate.now()
   WHERE x.org_id = i.org_id AND x.id = i.id;
END
$$;

-- The late-usage window, defined once for fill_lines, sys_close_batch and
-- sys_close_prepare: the usage and late-usage lines, for periods ending by
-- `before`, of the subscription's last 12 finalized invoices that bill usage
-- (DRAFTs are not billed yet; opening invoices carry fees only; a VOID
-- invoice's usage counts as billed: voiding forgives it).  Driven from the
-- subscription's own invoices through the (org_id, subscription_id,
-- period_start) index, so its cost does not grow with the organization's other
-- invoices; the lines lateral is a fence (OFFSET 0): pulled up into a join, the
-- planner, whose statistics of invoice_lines may date from before a closing
-- run, hashed every line of the organization.  Plain SQL without SET clauses,
-- so that it is inlined into its callers' queries (they pin search_path).
CREATE FUNCTION fluxrate_internal.late_window_lines(org_id uuid, subscription_id uuid, before timestamptz)
  RETURNS TABLE (charge_id uuid, period_start timestamptz, period_end timestamptz, line_type text, meta jsonb)
  LANGUAGE sql STABLE
  AS $$
  SELECT l.charge_id, l.period_start, l.period_end, l.line_type, l.meta
    FROM (SELECT pi.id FROM fluxrate_internal.invoices pi
           WHERE pi.org_id = $1 AND pi.subscription_id = $2 AND pi.period_start < $3
             AND pi.status IN ('OPEN', 'PAID', 'UNCOLLECTIBLE', 'VOID') AND pi.kind <> 'opening'
           ORDER BY pi.period_start DESC LIMIT 12) recent
    CROSS JOIN LATERAL (SELECT l0.charge_id, l0.period_start, l0.period_end, l0.line_type, l0.meta
                          FROM fluxrate_internal.invoice_lines l0
                         WHERE l0.org_id = $1 AND l0.invoice_id = recent.id
                           AND l0.line_type IN ('usage', 'late_usage') AND l0.charge_id IS NOT NULL
                           AND l0.period_end <= $3
                        OFFSET 0) l
$$;

-- (Re)compute the lines of a subscription invoice over [period_start, period_end).
-- nominal_start/nominal_end is the whole period the dates fall in: FIXED charges
-- are prorated by the fraction of it the invoice covers (exact time, which is
-- days for midnight boundaries: Jan 15 -> Feb 1 of a January period = 17/31).
-- One line per ACTIVE charge, zero-usage lines included (a statement), then the
-- plan's minimum-commitment true-up.  Each line rounded once.
-- FIXED charges billed in advance:
--   * an 'opening' invoice carries only them, for its own (first) period;
--   * a closing invoice (kind 'subscription') whose meta_data names an advance
--     period (advance_start/advance_end: the next period, absent when the
--     subscription ends with this one) carries them for that next period, at the
--     full price, labelled with its dates;
--   * interim and final invoices never carry them (that period was paid ahead).
-- For the minimum commitment, the period's total counts the in-advance fees of
-- the period itself (billed earlier) and not the next period's.
CREATE FUNCTION fluxrate_internal.fill_lines(org_id uuid, invoice_id uuid, nominal_start timestamptz, nominal_end timestamptz,
    usage_map jsonb DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  s fluxrate_internal.subscriptions;
  p fluxrate_internal.plans;
  c record;
  r record;
  v_pos integer := 0;
  v_frac numeric;
  v_amount numeric;
  v_usage numeric;
  v_sum numeric := 0;
  v_unit numeric;
  v_opening boolean;
  v_adv_start timestamptz;
  v_adv_end timestamptz;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = fill_lines.org_id AND x.id = fill_lines.invoice_id;
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = i.org_id AND x.id = i.subscription_id;
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = i.org_id AND x.id = s.plan_id;
  DELETE FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  v_frac := CASE WHEN i.period_start = nominal_start AND i.period_end = nominal_end THEN 1
                 ELSE extract(epoch FROM (i.period_end - i.period_start)) / extract(epoch FROM (nominal_end - nominal_start)) END;
  v_opening := i.kind = 'opening';
  IF i.kind = 'subscription' THEN
    v_adv_start := (i.meta_data->>'advance_start')::timestamptz;
    v_adv_end := (i.meta_data->>'advance_end')::timestamptz;
  END IF;
  FOR c IN
    SELECT ch.*, m.meter_name FROM fluxrate_internal.charges ch
      LEFT JOIN fluxrate_internal.meters m ON m.org_id = ch.org_id AND m.id = ch.meter_id
     WHERE ch.org_id = i.org_id AND ch.plan_id = s.plan_id AND ch.status = 'ACTIVE'
       AND (NOT v_opening OR (ch.type = 'FIXED' AND ch.billing_timing = 'in_advance'))
     ORDER BY ch.type, ch.created_at, ch.id
  LOOP
    IF c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND NOT v_opening THEN
      -- paid ahead for this period: it counts towards the minimum commitment
      v_sum := v_sum + c.unit_price * v_frac;
      CONTINUE WHEN v_adv_start IS NULL;
      -- the next period's fee, in advance, whole
      v_pos := v_pos + 1;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'fixed', c.id, coalesce(c.display_name, 'Fixed fee'), 1, c.unit_price,
              fluxrate_internal.round_money(c.unit_price, i.currency), c.unit_price, v_adv_start, v_adv_end,
              jsonb_build_object('billing_timing', 'in_advance'));
      CONTINUE;
    END IF;
    v_pos := v_pos + 1;
    IF c.type = 'FIXED' THEN
      v_amount := c.unit_price * v_frac;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'fixed', c.id,
              coalesce(c.display_name, 'Fixed fee') || CASE WHEN v_frac <> 1 THEN ' (prorated)' ELSE '' END,
              CASE WHEN v_frac = 1 THEN 1 ELSE round(v_frac, 12) END, c.unit_price,
              fluxrate_internal.round_money(v_amount, i.currency), v_amount,
              i.period_start, i.period_end, jsonb_build_object('billing_timing', c.billing_timing));
    ELSE
      -- the closer computes every usage of its batch in one statement and passes it in
      v_usage := coalesce((usage_map->>(c.id::text))::numeric,
                          fluxrate_internal.meter_usage(i.org_id, i.customer_id, c.meter_id, i.period_start, i.period_end));
      v_amount := fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size,
                                                c.package_price, c.free_units, v_usage);
      v_unit := CASE WHEN c.pricing_model = 'per_unit' THEN c.unit_price
                     WHEN v_usage = 0 THEN 0 ELSE round(v_amount / v_usage, 12) END;
      INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
          quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
      VALUES (i.org_id, i.id, v_pos, 'usage', c.id, coalesce(c.display_name, c.meter_name),
              v_usage, v_unit, fluxrate_internal.round_money(v_amount, i.currency), v_amount,
              i.period_start, i.period_end, jsonb_build_object('meter_id', c.meter_id, 'usage', v_usage,
                                                               'pricing_model', c.pricing_model));
    END IF;
    v_sum := v_sum + v_amount;
  END LOOP;
  IF v_opening THEN
    -- only the period's in-advance fees: no usage yet, no true-up (that is the closing invoice's)
    PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
    RETURN;
  END IF;
  -- Late usage: events that reached an already finalized period of this
  -- subscription.  Per charge and past period: the usage now minus the usage
  -- billed so far (the usage line plus earlier late lines; the deltas telescope,
  -- so this is right for every aggregation), priced incrementally
  -- (rate(now) - rate(billed)) so tiers stay right.  Only what increases the
  -- amount is billed; finalized invoices never change.  The window:
  -- late_window_lines() (the last 12 finalized invoices that bill usage).
  FOR r IN
    SELECT l.charge_id, l.period_start, l.period_end,
           sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric ELSE (l.meta->>'usage_delta')::numeric END) AS billed
      FROM fluxrate_internal.late_window_lines(i.org_id, i.subscription_id, i.period_start) l
     GROUP BY l.charge_id, l.period_start, l.period_end
     ORDER BY l.period_start, l.charge_id
  LOOP
    SELECT ch.*, m.meter_name INTO c FROM fluxrate_internal.charges ch
      JOIN fluxrate_internal.meters m ON m.org_id = ch.org_id AND m.id = ch.meter_id
     WHERE ch.org_id = i.org_id AND ch.id = r.charge_id;
    v_usage := fluxrate_internal.meter_usage(i.org_id, i.customer_id, c.meter_id, r.period_start, r.period_end);
    CONTINUE WHEN v_usage = r.billed;
    v_amount := fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price, c.free_units, v_usage)
              - fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price, c.free_units, r.billed);
    CONTINUE WHEN v_amount <= 0;
    v_pos := v_pos + 1;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    VALUES (i.org_id, i.id, v_pos, 'late_usage', c.id,
            format('%s - late usage for %s to %s', coalesce(c.display_name, c.meter_name),
                   to_char(r.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'), to_char(r.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            v_usage - r.billed, round(v_amount / (v_usage - r.billed), 12),
            fluxrate_internal.round_money(v_amount, i.currency), v_amount, r.period_start, r.period_end,
            jsonb_build_object('meter_id', c.meter_id, 'usage_delta', v_usage - r.billed, 'usage_now', v_usage,
                               'billed_before', r.billed));
  END LOOP;

  IF p.minimum_commitment IS NOT NULL AND v_sum < p.minimum_commitment * v_frac THEN
    v_pos := v_pos + 1;
    v_amount := p.minimum_commitment * v_frac - v_sum;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end)
    VALUES (i.org_id, i.id, v_pos, 'minimum', 'Minimum commitment true-up', 1, v_amount,
            fluxrate_internal.round_money(v_amount, i.currency), v_amount, i.period_start, i.period_end);
  END IF;
  PERFORM fluxrate_internal.recompute_totals(i.org_id, i.id);
END
$$;

-- A DRAFT subscription invoice for [period_start, period_end), once: the unique
-- indexes on (org_id, subscription_id, period_start) of kinds 'subscription' and
-- 'opening' make a second closer's insert a no-op.  Returns the invoice id, or
-- NULL when it already existed.  advance_start/advance_end: the next period,
-- whose in-advance FIXED fees a closing invoice carries (NULL: the subscription
-- ends with this period, or the invoice is not a closing one).  An opening
-- invoice of a period that has not started yet waits for its start, then the
-- grace period.
CREATE FUNCTION fluxrate_internal.create_period_invoice(s fluxrate_internal.subscriptions, period_start timestamptz,
    period_end timestamptz, nominal_start timestamptz, nominal_end timestamptz, kind text DEFAULT 'subscription',
    usage_map jsonb DEFAULT NULL, advance_start timestamptz DEFAULT NULL, advance_end timestamptz DEFAULT NULL)
  RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
#variable_conflict use_column
DECLARE
  v_id uuid;
  v_currency text;
  v_grace interval;
BEGIN
  SELECT p.currency INTO v_currency FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id;
  SELECT o.grace_period INTO v_grace FROM fluxrate_internal.organizations o WHERE o.org_id = s.org_id;
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
      scheduled_finalize_at, meta_data, created_at, updated_at)
  VALUES (s.org_id, create_period_invoice.kind, s.customer_id, s.id, v_currency, create_period_invoice.period_start,
          create_period_invoice.period_end,
          CASE WHEN create_period_invoice.kind = 'opening' THEN greatest(fluxrate.now(), create_period_invoice.period_start)
               ELSE fluxrate.now() END + v_grace,
          jsonb_build_object('nominal_start', create_period_invoice.nominal_start, 'nominal_end', create_period_invoice.nominal_end)
          || CASE WHEN create_period_invoice.advance_start IS NULL THEN '{}'::jsonb
                  ELSE jsonb_build_object('advance_start', create_period_invoice.advance_start,
                                          'advance_end', create_period_invoice.advance_end) END,
          fluxrate.now(), fluxrate.now())
  ON CONFLICT DO NOTHING
  RETURNING id INTO v_id;
  IF v_id IS NOT NULL THEN
    PERFORM fluxrate_internal.fill_lines(s.org_id, v_id, create_period_invoice.nominal_start, create_period_invoice.nominal_end,
                                         create_period_invoice.usage_map);
    -- nothing to bill (a plan of in-advance fees only, in its last period): no invoice
    IF NOT EXISTS (SELECT 1 FROM fluxrate_internal.invoice_lines l WHERE l.org_id = s.org_id AND l.invoice_id = v_id) THEN
      DELETE FROM fluxrate_internal.invoices i WHERE i.org_id = s.org_id AND i.id = v_id;
      RETURN NULL;
    END IF;
    PERFORM fluxrate_internal.emit_event(s.org_id, 'invoice.created',
      (SELECT jsonb_build_object('invoice_id', i.id, 'customer_id', i.customer_id, 'subscription_id', i.subscription_id,
                                 'total', i.total, 'currency', i.currency, 'status', i.status)
         FROM fluxrate_internal.invoices i WHERE i.org_id = s.org_id AND i.id = v_id));
  END IF;
  RETURN v_id;
END
$$;

-- Does the plan bill any FIXED charge in advance?
CREATE FUNCTION fluxrate_internal.bills_in_advance(org_id uuid, plan_id uuid) RETURNS boolean
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT EXISTS (SELECT 1 FROM fluxrate_internal.charges ch
                  WHERE ch.org_id = bills_in_advance.org_id AND ch.plan_id = bills_in_advance.plan_id
                    AND ch.type = 'FIXED' AND ch.billing_timing = 'in_advance' AND ch.status = 'ACTIVE')
$$;

-- The opening invoice: when a subscription starts billing (at creation, or when
-- its trial ends) and its plan bills FIXED charges in advance, the first
-- period's fees (prorated for a partial calendar period) go on a DRAFT of kind
-- 'opening' that finalizes after the grace period like the others.
-- last_invoiced_date marks the subscription as opened (and keeps a restore of a
-- dump, which re-inserts the rows, from opening it twice).
CREATE FUNCTION fluxrate_internal.open_subscription(s fluxrate_internal.subscriptions) RETURNS uuid
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  np record;
  v_id uuid;
BEGIN
  IF s.status <> 'ACTIVE' OR s.current_period_index <> 0 OR NOT fluxrate_internal.bills_in_advance(s.org_id, s.plan_id) THEN
    RETURN NULL;
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end,
                                                  np.nominal_start, np.nominal_end, 'opening');
  IF v_id IS NOT NULL THEN
    UPDATE fluxrate_internal.subscriptions x SET last_invoiced_date = fluxrate.now()
     WHERE x.org_id = s.org_id AND x.id = s.id;
  END IF;
  RETURN v_id;
END
$$;

-- create_subscription (20_catalog.sql) inserts ACTIVE subscriptions directly:
-- open them in the same transaction.
CREATE FUNCTION fluxrate_internal.subscription_opened() RETURNS trigger
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.open_subscription(NEW);
  RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_open AFTER INSERT ON fluxrate_internal.subscriptions
  FOR EACH ROW WHEN (NEW.status = 'ACTIVE' AND NEW.current_period_index = 0 AND NEW.last_invoiced_date IS NULL)
  EXECUTE FUNCTION fluxrate_internal.subscription_opened();

-- The nominal bounds of period n of a subscription.
CREATE FUNCTION fluxrate_internal.nominal_period(s fluxrate_internal.subscriptions, OUT nominal_start timestamptz, OUT nominal_end timestamptz)
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  step interval := CASE s.billing_interval WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
    WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months' ELSE interval '1 year' END;
BEGIN
  nominal_end := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 1);
  IF s.current_period_index = 0 AND s.alignment = 'calendar' THEN
    -- the partial first calendar period prorates against the whole calendar interval it ends
    nominal_start := ((nominal_end AT TIME ZONE 'UTC') - step) AT TIME ZONE 'UTC';
  ELSE
    nominal_start := fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index);
  END IF;
END
$$;

-- The usage snapshot of a closer run.  When many subscriptions of one
-- organization end the same period (calendar billing: everyone on the 1st), the
-- usage of all their (customer, meter) pairs is computed up front in ONE pass
-- over the period's events per aggregation -- the plain, parallel GROUP BY --
-- instead of one index range scan per pair in every batch.  The sums go to two
-- temporary tables of the session: fr_close_scope says which (organization,
-- meter, period) the snapshot covers (a pair of it with no row has no usage: 0),
-- fr_close_usage holds the values.  sys_close_batch() takes a covered pair's
-- usage from there and computes the others itself.
--
-- A snapshot taken at the start of a run is safe: the invoices it feeds are
-- DRAFTs, and every draft is recomputed from the events when it is finalized
-- after the grace period, so an event that arrives during the run is billed.
-- Only SUM, COUNT, MAX, MIN and AVG meters without filters are snapshotted;
-- the others always go through meter_usage().
CREATE FUNCTION fluxrate_internal.sys_close_tables() RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF pg_catalog.to_regclass('pg_temp.fr_close_usage') IS NULL THEN
    CREATE TEMPORARY TABLE fr_close_scope (org_id uuid, meter_id uuid, period_start timestamptz, period_end timestamptz,
      PRIMARY KEY (org_id, meter_id, period_start, period_end));
    CREATE TEMPORARY TABLE fr_close_usage (org_id uuid, customer_id uuid, meter_id uuid, period_start timestamptz,
      period_end timestamptz, usage numeric NOT NULL,
      PRIMARY KEY (org_id, customer_id, meter_id, period_start, period_end));
  END IF;
END
$$;

-- The end of a run: the snapshot is dropped, so that a later sys_close_batch()
-- in this session computes its usage from the events.
CREATE FUNCTION fluxrate_internal.sys_close_finish() RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF pg_catalog.to_regclass('pg_temp.fr_close_usage') IS NOT NULL THEN
    TRUNCATE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
  END IF;
END
$$;

-- The planner's estimate of the share of an organization's events that fall
-- in [period_start, period_end): what a pass over the organization would read
-- for nothing.  (EXPLAIN of literals: estimates, no scan.)
CREATE FUNCTION fluxrate_internal.period_event_share(org_id uuid, period_start timestamptz, period_end timestamptz)
  RETURNS numeric
  LANGUAGE plpgsql VOLATILE  -- (PostgreSQL allows EXPLAIN in volatile functions only)
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p json;
  v_org numeric;
  v_period numeric;
BEGIN
  EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM fluxrate_internal.usage_events e WHERE e.org_id = %L', org_id) INTO p;
  v_org := (p->0->'Plan'->>'Plan Rows')::numeric;
  EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM fluxrate_internal.usage_events e
                   WHERE e.org_id = %L AND e."timestamp" >= %L AND e."timestamp" < %L', org_id, period_start, period_end) INTO p;
  v_period := (p->0->'Plan'->>'Plan Rows')::numeric;
  RETURN least(1, v_period / greatest(v_org, 1));
END
$$;

-- Fill the snapshot for the periods that are due now.  A period of whole UTC
-- days is read from the usage rollups (40_rating.sql) and the events not yet
-- rolled up.  Otherwise one pass over an
-- organization's period reads every event of the organization the plan visits
-- (~0.1-0.3 µs each, in parallel); the per-pair scans read only the due pairs'
-- events of the period (~0.6 µs each).  So a group (organization, period) is
-- snapshotted when (its due customers / the organization's subscribed
-- customers) x (the share of the organization's events in the period, as the
-- planner estimates it) reaches min_benefit: calendar billing of a young
-- organization, yes; anniversary billing (a thirtieth of the customers a day)
-- or a period that is one month of years of history, no.  min_benefit 0 takes
-- every group.  Returns the number of (organization, meter, period) covered.
CREATE FUNCTION fluxrate_internal.sys_close_prepare(min_benefit numeric DEFAULT 0.2) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  g record;
  v_rows bigint := 0;
  v_n bigint;
  v_key text := '';
  v_share numeric;
  v_meters uuid[];
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  TRUNCATE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
  FOR g IN
    SELECT d.org_id, d.ps, d.pe, d.n::numeric / greatest(d.subscribed, 1) AS customer_share,
           mt.aggregation_type AS agg, array_agg(DISTINCT mt.id) AS meters
      FROM (SELECT x.org_id, x.current_period_start AS ps, x.current_period_end AS pe,
                   array_agg(DISTINCT x.plan_id) AS plans, count(DISTINCT x.customer_id) AS n,
                   (SELECT count(DISTINCT l.customer_id) FROM fluxrate_internal.subscriptions l
                     WHERE l.org_id = x.org_id AND l.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')) AS subscribed
              FROM fluxrate_internal.subscriptions x
             WHERE x.status IN ('ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
             GROUP BY 1, 2, 3) d
      JOIN fluxrate_internal.charges c ON c.org_id = d.org_id AND c.plan_id = ANY (d.plans)
           AND c.type = 'USAGE' AND c.status = 'ACTIVE'
      JOIN fluxrate_internal.meters mt ON mt.org_id = c.org_id AND mt.id = c.meter_id
           AND mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
     WHERE d.n >= min_benefit * d.subscribed   -- (the event share is at most 1)
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3
  LOOP
    IF v_key <> g.org_id::text || g.ps::text || g.pe::text THEN
      v_key := g.org_id::text || g.ps::text || g.pe::text;
      -- read from the rollups, a period costs its own rows only: no events of
      -- other periods are read for nothing
      v_share := CASE WHEN min_benefit <= 0 THEN 1
                      WHEN fluxrate_internal.whole_utc_days(g.ps, g.pe) AND fluxrate_internal.rollup_snapshot() IS NOT NULL THEN 1
                      ELSE fluxrate_internal.period_event_share(g.org_id, g.ps, g.pe) END;
    END IF;
    CONTINUE WHEN g.customer_share * v_share < min_benefit;
    INSERT INTO pg_temp.fr_close_scope (org_id, meter_id, period_start, period_end)
    SELECT g.org_id, m, g.ps, g.pe FROM unnest(g.meters) m;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_rows := v_rows + v_n;
    INSERT INTO pg_temp.fr_close_usage (org_id, customer_id, meter_id, period_start, period_end, usage)
    SELECT g.org_id, u.customer_id, u.meter_id, g.ps, g.pe, u.usage
      FROM fluxrate_internal.org_period_usage(g.org_id, g.ps, g.pe, g.agg, g.meters) u;
  END LOOP;
  -- The late-usage check's periods: the usage now of every period billed on the
  -- due subscriptions' last 12 finalized invoices.  Without this, every close
  -- re-read up to 12 past periods of events pair by pair (the benchmark's
  -- December close, with October behind it: 3.8 s against October's 2.1 s).
  -- From the rollups only, where they can serve the period (whole UTC days,
  -- refreshed): a month is one row per (customer, meter) there.  The same
  -- customer-share rule; periods the loop above covered are skipped.
  IF fluxrate_internal.rollup_snapshot() IS NOT NULL THEN
    FOR g IN
      SELECT d.org_id, d.ps, d.pe, mt.aggregation_type AS agg, array_agg(DISTINCT mt.id) AS meters
        FROM (SELECT x.org_id, l.period_start AS ps, l.period_end AS pe, array_agg(DISTINCT l.charge_id) AS charges,
                     count(DISTINCT x.customer_id) AS n,
                     (SELECT count(DISTINCT o.customer_id) FROM fluxrate_internal.subscriptions o
                       WHERE o.org_id = x.org_id AND o.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE')) AS subscribed
                FROM fluxrate_internal.subscriptions x
                CROSS JOIN LATERAL fluxrate_internal.late_window_lines(x.org_id, x.id, x.current_period_start) l
               WHERE x.status IN ('ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
               GROUP BY 1, 2, 3) d
        JOIN fluxrate_internal.charges c ON c.org_id = d.org_id AND c.id = ANY (d.charges)
        JOIN fluxrate_internal.meters mt ON mt.org_id = c.org_id AND mt.id = c.meter_id
             AND mt.filters = '[]'::jsonb AND mt.aggregation_type IN ('SUM', 'COUNT', 'MAX', 'MIN', 'AVG')
       WHERE fluxrate_internal.whole_utc_days(d.ps, d.pe) AND d.n >= min_benefit * d.subscribed
       GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3
    LOOP
      v_meters := ARRAY(SELECT m FROM unnest(g.meters) m
                         WHERE NOT EXISTS (SELECT 1 FROM pg_temp.fr_close_scope sc WHERE sc.org_id = g.org_id AND sc.meter_id = m
                                             AND sc.period_start = g.ps AND sc.period_end = g.pe));
      CONTINUE WHEN cardinality(v_meters) = 0;
      INSERT INTO pg_temp.fr_close_scope (org_id, meter_id, period_start, period_end)
      SELECT g.org_id, m, g.ps, g.pe FROM unnest(v_meters) m;
      GET DIAGNOSTICS v_n = ROW_COUNT;
      v_rows := v_rows + v_n;
      INSERT INTO pg_temp.fr_close_usage (org_id, customer_id, meter_id, period_start, period_end, usage)
      SELECT g.org_id, u.customer_id, u.meter_id, g.ps, g.pe, u.usage
        FROM fluxrate_internal.org_period_usage(g.org_id, g.ps, g.pe, g.agg, v_meters) u;
    END LOOP;
  END IF;
  ANALYZE pg_temp.fr_close_scope, pg_temp.fr_close_usage;
  RETURN v_rows;
END
$$;

-- ANALYZE a table when it has outgrown its statistics (more than twice the
-- pages ANALYZE last counted): invoices in every closing batch, usage_rollups
-- after every refresh (a first refresh fills it with a month of rollups that
-- the planner, without statistics, would take for a dozen rows: a sort
-- instead of a hash over 930,000 of them, 2.5 s instead of 0.25 s).
-- A closing run can multiply the invoices table in
-- seconds, long before autovacuum looks, and the plans cached meanwhile are made
-- for a near-empty table.  The one that hurts is PostgreSQL's own foreign-key
-- check of each invoice line: its generic plan, made while invoices held a few
-- rows, may take the (org_id, invoice_number) index and then read every invoice
-- of the organization for each line (measured: 0.6 ms per line at 10,000
-- invoices; a run in batches of 250 took 5 times as long).  ANALYZE
-- invalidates that plan; the doubling rule bounds a run to a few of them
-- (~40 ms at 10,000 invoices).  It never waits: skipped while another ANALYZE
-- or a VACUUM holds the table.  Returns whether it analyzed.
CREATE FUNCTION fluxrate_internal.analyze_if_outgrown(rel regclass) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER  -- (as the tables' owner)
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF (SELECT c.relnamespace <> 'fluxrate_internal'::regnamespace FROM pg_class c WHERE c.oid = rel) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = format('%s is not a fluxrate table', rel);
  END IF;
  IF (SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint <= greatest(2 * c.relpages, 8)
        FROM pg_class c WHERE c.oid = rel) THEN
    RETURN false;
  END IF;
  EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', rel);
  EXECUTE format('ANALYZE %s', rel);
  RETURN true;
EXCEPTION WHEN lock_not_available THEN
  RETURN false;
END
$$;
CREATE FUNCTION fluxrate_internal.analyze_invoices_if_outgrown() RETURNS boolean
  LANGUAGE sql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate_internal.analyze_if_outgrown('fluxrate_internal.invoices') $$;

-- Close the next due period of up to batch_size subscriptions, across
-- organizations (owned by fluxrate_system).  Rows are claimed with SKIP LOCKED,
-- so concurrent closers split the work; the invoices and the subscriptions'
-- advance commit together, so a killed closer leaves no half-closed period.
-- Returns how many subscriptions it advanced (0 = nothing is due).
--
-- Set-based: ending trials go one by one (once per subscription lifetime); every
-- other claimed subscription is closed by ONE statement: its usage (from the
-- run's snapshot where it covers the pair, else period_usage() once per
-- organization, for the period that ended and for the late-usage check of the
-- last 12 finalized invoices), its lines (the same as fill_lines writes:
-- charges in order, next period's in-advance fees, late usage, minimum
-- commitment), the invoice with its totals (tax on the unrounded subtotal,
-- rounded once), the lines, the outbox events with their fan-out, and the
-- subscription's advance (or end).  fill_lines stays the reference: the draft
-- is recomputed by it at finalization, and the tests compare both.
--
-- The two big statements are EXECUTEd: each batch plans them for its own rows
-- (invoices and lines grow fast during a run, and a generic plan made while
-- they were small would make each invoice cost O(invoices)).  A function-wide
-- plan_cache_mode = force_custom_plan did the same, but it also reached the
-- foreign-key checks, which then planned their query once per line: a third of
-- a batch's time.
CREATE FUNCTION fluxrate_internal.sys_close_batch(batch_size integer DEFAULT 2000, only_id uuid DEFAULT NULL) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  -- a batch of 2,000 estimates above jit_above_cost, and compiling its 266
  -- expressions took 94 ms of its 250: row-at-a-time work JIT never pays back
  SET jit = off
  AS $$
DECLARE
  s fluxrate_internal.subscriptions;
  v_batch fluxrate_internal.subscriptions[];
  v_now timestamptz := fluxrate.now();
  v_events bigint;
  v_usage jsonb;
BEGIN
  PERFORM fluxrate_internal.sys_close_tables();
  PERFORM fluxrate_internal.analyze_invoices_if_outgrown();
  v_batch := ARRAY(
    SELECT x FROM fluxrate_internal.subscriptions x
     WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
       AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
       AND (only_id IS NULL OR x.id = only_id)
     ORDER BY x.current_period_end, x.org_id, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED);
  IF cardinality(v_batch) = 0 THEN
    RETURN 0;
  END IF;

  -- the trials that are over: no invoice for them, billing starts at the trial end
  FOREACH s IN ARRAY v_batch
  LOOP
    CONTINUE WHEN s.status <> 'TRIAL';
    PERFORM set_config('fluxrate.current_org', s.org_id::text, true);
    IF s.cancel_at_period_end THEN
      -- canceled during the trial, at its end: it ends with the trial, never billed
      UPDATE fluxrate_internal.subscriptions x
         SET status = 'CANCELED', ended_at = s.current_period_end, close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = s.org_id AND x.id = s.id;
      PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.canceled',
        jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', s.current_period_end));
      CONTINUE;
    END IF;
    UPDATE fluxrate_internal.subscriptions x
       SET status = 'ACTIVE', current_period_index = 0, current_period_start = s.billing_anchor,
           current_period_end = fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, 1),
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = s.org_id AND x.id = s.id;
    PERFORM fluxrate_internal.emit_event(s.org_id, 'subscription.activated',
      jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id));
    -- the first period's in-advance fees
    PERFORM fluxrate_internal.open_subscription(x) FROM fluxrate_internal.subscriptions x
     WHERE x.org_id = s.org_id AND x.id = s.id;
  END LOOP;

  -- 1. Usage, one period_usage() call per organization: the period that ended
  -- for every (subscription, usage charge), and for the late-usage check every
  -- (charge, period) billed on the subscription's last 12 finalized invoices.
  -- period_usage()'s answers are zipped back to their keys by position (no join),
  -- into {sub: {"u": {charge: usage}, "late": [{c, ps, pe, billed, now}]}}.
  EXECUTE $sql$
  WITH items AS MATERIALIZED (
    -- covered: the run's snapshot (sys_close_prepare) has this pair's usage, snap
    SELECT z.*, (sc.org_id IS NOT NULL) AS covered, coalesce(su.usage, 0) AS snap,
           row_number() OVER (PARTITION BY z.org_id, sc.org_id IS NOT NULL
                              ORDER BY z.sub_id, z.late, z.charge_id, z.ps)::integer AS ord
      FROM (SELECT x.org_id, x.id AS sub_id, false AS late, c.id AS charge_id, x.customer_id, c.meter_id,
                   x.current_period_start AS ps, x.current_period_end AS pe, NULL::numeric AS billed
              FROM unnest($1) x
              JOIN fluxrate_internal.charges c ON c.org_id = x.org_id AND c.plan_id = x.plan_id
                   AND c.type = 'USAGE' AND c.status = 'ACTIVE'
             WHERE x.status <> 'TRIAL'
            UNION ALL
            SELECT ls.org_id, ls.sub_id, true, ls.charge_id, ls.customer_id, c.meter_id, ls.ps, ls.pe, ls.billed
              FROM (SELECT x.org_id, x.id AS sub_id, x.customer_id, l.charge_id, l.period_start AS ps, l.period_end AS pe,
                           sum(CASE l.line_type WHEN 'usage' THEN (l.meta->>'usage')::numeric
                                    ELSE (l.meta->>'usage_delta')::numeric END) AS billed
                      FROM unnest($1) x
                      CROSS JOIN LATERAL fluxrate_internal.late_window_lines(x.org_id, x.id, x.current_period_start) l
                     WHERE x.status <> 'TRIAL'
                     GROUP BY 1, 2, 3, 4, 5, 6) ls
              JOIN fluxrate_internal.charges c ON c.org_id = ls.org_id AND c.id = ls.charge_id) z
      LEFT JOIN pg_temp.fr_close_scope sc ON sc.org_id = z.org_id AND sc.meter_id = z.meter_id
                AND sc.period_start = z.ps AND sc.period_end = z.pe
      LEFT JOIN pg_temp.fr_close_usage su ON su.org_id = z.org_id AND su.customer_id = z.customer_id
                AND su.meter_id = z.meter_id AND su.period_start = z.ps AND su.period_end = z.pe
  ), todo AS MATERIALIZED (
    SELECT * FROM items WHERE NOT covered
  ), per_org AS (
    SELECT o.org_id,
           ARRAY(SELECT i.sub_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS subs,
           ARRAY(SELECT i.late FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS lates,
           ARRAY(SELECT i.charge_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS charges,
           ARRAY(SELECT i.ps FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS pss,
           ARRAY(SELECT i.pe FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS pes,
           ARRAY(SELECT i.billed FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord) AS billeds,
           ARRAY(SELECT pu.usage FROM fluxrate_internal.period_usage(o.org_id,
                   ARRAY(SELECT i.customer_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.meter_id FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.ps FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord),
                   ARRAY(SELECT i.pe FROM todo i WHERE i.org_id = o.org_id ORDER BY i.ord)) pu ORDER BY pu.ord) AS usages
      FROM (SELECT DISTINCT org_id FROM todo) o
  )
  SELECT jsonb_object_agg(q.sub_id::text, q.m)
    FROM (SELECT z.sub_id,
                 jsonb_build_object('u', coalesce(jsonb_object_agg(z.charge_id::text, z.usage) FILTER (WHERE NOT z.late), '{}'),
                   'late', coalesce(jsonb_agg(jsonb_build_object('c', z.charge_id, 'ps', z.ps, 'pe', z.pe, 'billed', z.billed,
                                                                 'now', z.usage) ORDER BY z.ps, z.charge_id)
                                    FILTER (WHERE z.late AND z.usage <> z.billed), '[]')) AS m
            FROM (SELECT u.* FROM per_org, unnest(per_org.subs, per_org.lates, per_org.charges, per_org.pss, per_org.pes,
                                                  per_org.billeds, per_org.usages) u(sub_id, late, charge_id, ps, pe, billed, usage)
                  UNION ALL
                  SELECT i.sub_id, i.late, i.charge_id, i.ps, i.pe, i.billed, i.snap FROM items i WHERE i.covered) z
           GROUP BY z.sub_id) q
  $sql$ INTO v_usage USING v_batch;

  -- 2. Everything else, in one statement.  Each step derives from the claimed
  -- rows (b, s) and carries what it needs forward, so no step joins two large
  -- intermediate results.
  EXECUTE $sql$
  WITH b AS MATERIALIZED (
    -- the period that ended, its proration fraction, the next period (whose
    -- in-advance fees this invoice carries unless the subscription ends now)
    SELECT x.org_id, x.id AS sub_id, x.customer_id, x.plan_id, x.current_period_index AS idx,
           x.current_period_start AS ps, x.current_period_end AS pe, x.cancel_at_period_end AS ending,
           np.nominal_start, np.nominal_end,
           CASE WHEN x.current_period_start = np.nominal_start AND x.current_period_end = np.nominal_end THEN 1
                ELSE extract(epoch FROM (x.current_period_end - x.current_period_start))
                   / extract(epoch FROM (np.nominal_end - np.nominal_start)) END AS frac,
           fluxrate_internal.period_boundary(x.billing_anchor, x.billing_interval, x.alignment,
                                             x.current_period_index + 2) AS next_end,
           (SELECT p.currency FROM fluxrate_internal.plans p WHERE p.org_id = x.org_id AND p.id = x.plan_id) AS currency,
           (SELECT p.minimum_commitment FROM fluxrate_internal.plans p WHERE p.org_id = x.org_id AND p.id = x.plan_id) AS minimum,
           (SELECT o.grace_period FROM fluxrate_internal.organizations o WHERE o.org_id = x.org_id) AS grace,
           -- tax_rate_for(), inline: a state-specific rate beats the country-wide one; none = 0
           coalesce((SELECT t.rate FROM fluxrate_internal.customers c, fluxrate_internal.tax_rates t
                      WHERE c.org_id = x.org_id AND c.id = x.customer_id
                        AND t.org_id = c.org_id AND t.country = c.billing_address_country
                        AND t.state IN ('', coalesce(c.billing_address_state, ''))
                      ORDER BY t.state DESC LIMIT 1), 0) AS tax_rate,
           gen_random_uuid() AS invoice_id,
           coalesce($3->(x.id::text), '{}') AS uj,
           -- a closing invoice of this period already exists (cannot happen while the row is
           -- locked and advances with its invoice; the unique index would refuse a second one).
           -- A scalar subquery, one index probe per row: as an EXISTS, the planner may hash
           -- all the organization's invoices in every batch.
           coalesce((SELECT true FROM fluxrate_internal.invoices i
                      WHERE i.org_id = x.org_id AND i.subscription_id = x.id AND i.kind = 'subscription'
                        AND i.period_start = x.current_period_start LIMIT 1), false) AS already
      FROM unnest($1) x
      CROSS JOIN LATERAL fluxrate_internal.nominal_period(x) np
     WHERE x.status <> 'TRIAL'
  ), sb AS MATERIALIZED (
    -- the subscriptions to invoice: how many charge lines, and the in-advance fees the
    -- period itself was charged (for the minimum commitment)
    SELECT b.*,
           (SELECT count(*) FROM fluxrate_internal.charges c
             WHERE c.org_id = b.org_id AND c.plan_id = b.plan_id AND c.status = 'ACTIVE'
               AND NOT (c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND b.ending))::integer AS n_main,
           CASE WHEN b.minimum IS NOT NULL THEN
             coalesce((SELECT sum(c.unit_price * b.frac) FROM fluxrate_internal.charges c
                        WHERE c.org_id = b.org_id AND c.plan_id = b.plan_id AND c.status = 'ACTIVE'
                          AND c.type = 'FIXED' AND c.billing_timing = 'in_advance'), 0) END AS advance_paid
      FROM b WHERE NOT b.already
  ), main AS MATERIALIZED (
    -- one line per ACTIVE charge, in charge order (fill_lines' first loop)
    SELECT y.*,
           CASE WHEN y.type = 'USAGE' THEN
                  fluxrate_internal.rate_usage(y.pricing_model, y.unit_price, y.tiers, y.package_size,
                                               y.package_price, y.free_units, y.usage)
                WHEN y.advance THEN y.unit_price
                ELSE y.unit_price * y.frac END AS amount
      FROM (SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.frac, sb.ps, sb.pe, sb.pe AS adv_start, sb.next_end AS adv_end,
                   c.id AS charge_id, c.type, c.billing_timing, c.meter_id, c.pricing_model, c.unit_price, c.tiers,
                   c.package_size, c.package_price, c.free_units,
                   (c.type = 'FIXED' AND c.billing_timing = 'in_advance') AS advance,
                   coalesce(c.display_name, CASE WHEN c.type = 'FIXED' THEN 'Fixed fee' ELSE m.meter_name END) AS name,
                   CASE WHEN c.type = 'USAGE' THEN coalesce((sb.uj->'u'->>(c.id::text))::numeric,
                     fluxrate_internal.meter_usage(sb.org_id, sb.customer_id, c.meter_id, sb.ps, sb.pe)) END AS usage,
                   row_number() OVER (PARTITION BY sb.org_id, sb.sub_id ORDER BY c.type, c.created_at, c.id)::integer AS pos
              FROM sb
              JOIN fluxrate_internal.charges c ON c.org_id = sb.org_id AND c.plan_id = sb.plan_id AND c.status = 'ACTIVE'
              LEFT JOIN fluxrate_internal.meters m ON m.org_id = c.org_id AND m.id = c.meter_id
             WHERE NOT (c.type = 'FIXED' AND c.billing_timing = 'in_advance' AND sb.ending)) y
  ), late AS MATERIALIZED (
    -- late usage (fill_lines' second loop): only increases, priced incrementally, after the charges
    SELECT y.*, y.n_main + row_number() OVER (PARTITION BY y.org_id, y.sub_id ORDER BY y.lps, y.charge_id)::integer AS pos
      FROM (SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.n_main, c.id AS charge_id, c.meter_id,
                   coalesce(c.display_name, m.meter_name) AS name,
                   (e->>'ps')::timestamptz AS lps, (e->>'pe')::timestamptz AS lpe,
                   (e->>'billed')::numeric AS billed, (e->>'now')::numeric AS now_usage,
                   fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'now')::numeric)
                 - fluxrate_internal.rate_usage(c.pricing_model, c.unit_price, c.tiers, c.package_size, c.package_price,
                                                c.free_units, (e->>'billed')::numeric) AS amount
              FROM sb
              CROSS JOIN LATERAL jsonb_array_elements(sb.uj->'late') e
              JOIN fluxrate_internal.charges c ON c.org_id = sb.org_id AND c.id = (e->>'c')::uuid
              JOIN fluxrate_internal.meters m ON m.org_id = c.org_id AND m.id = c.meter_id) y
     WHERE y.amount > 0
  ), mins AS MATERIALIZED (
    -- the minimum commitment true-up: the period's own charges, its in-advance
    -- fees (billed before) included, the next period's excluded; after the late lines
    SELECT sb.org_id, sb.sub_id, sb.invoice_id, sb.currency, sb.ps, sb.pe,
           sb.minimum * sb.frac - (coalesce(ms.period_sum, 0) + sb.advance_paid) AS amount,
           sb.n_main + coalesce(nl.n, 0)::integer + 1 AS pos
      FROM sb
      LEFT JOIN (SELECT m.org_id, m.sub_id, sum(m.amount) FILTER (WHERE NOT m.advance) AS period_sum
                   FROM main m GROUP BY 1, 2) ms ON ms.org_id = sb.org_id AND ms.sub_id = sb.sub_id
      LEFT JOIN (SELECT l.org_id, l.sub_id, count(*) AS n FROM late l GROUP BY 1, 2) nl
             ON nl.org_id = sb.org_id AND nl.sub_id = sb.sub_id
     WHERE sb.minimum IS NOT NULL
       AND coalesce(ms.period_sum, 0) + sb.advance_paid < sb.minimum * sb.frac
  ), lines AS MATERIALIZED (
    SELECT l.*, fluxrate_internal.round_money(l.amount, l.currency) AS line_total
      FROM (
        SELECT m.org_id, m.sub_id, m.invoice_id, m.currency, m.pos,
               CASE m.type WHEN 'USAGE' THEN 'usage' ELSE 'fixed' END AS line_type, m.charge_id,
               m.name || CASE WHEN m.type = 'FIXED' AND NOT m.advance AND m.frac <> 1 THEN ' (prorated)' ELSE '' END AS description,
               CASE WHEN m.type = 'USAGE' THEN m.usage WHEN m.advance OR m.frac = 1 THEN 1 ELSE round(m.frac, 12) END AS quantity,
               CASE WHEN m.type = 'FIXED' OR m.pricing_model = 'per_unit' THEN m.unit_price
                    WHEN m.usage = 0 THEN 0 ELSE round(m.amount / m.usage, 12) END AS unit_amount,
               m.amount,
               CASE WHEN m.advance THEN m.adv_start ELSE m.ps END AS line_start,
               CASE WHEN m.advance THEN m.adv_end ELSE m.pe END AS line_end,
               CASE WHEN m.type = 'USAGE' THEN jsonb_build_object('meter_id', m.meter_id, 'usage', m.usage, 'pricing_model', m.pricing_model)
                    ELSE jsonb_build_object('billing_timing', m.billing_timing) END AS meta
          FROM main m
        UNION ALL
        SELECT l.org_id, l.sub_id, l.invoice_id, l.currency, l.pos, 'late_usage', l.charge_id,
               format('%s - late usage for %s to %s', l.name, to_char(l.lps AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                      to_char(l.lpe AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
               l.now_usage - l.billed, round(l.amount / (l.now_usage - l.billed), 12), l.amount, l.lps, l.lpe,
               jsonb_build_object('meter_id', l.meter_id, 'usage_delta', l.now_usage - l.billed, 'usage_now', l.now_usage,
                                  'billed_before', l.billed)
          FROM late l
        UNION ALL
        SELECT n.org_id, n.sub_id, n.invoice_id, n.currency, n.pos, 'minimum', NULL, 'Minimum commitment true-up', 1,
               n.amount, n.amount, n.ps, n.pe, '{}'::jsonb
          FROM mins n) l
  ), inv AS (
    -- an invoice with no line (in-advance fees only, last period) is not written
    INSERT INTO fluxrate_internal.invoices AS i (org_id, id, kind, customer_id, subscription_id, currency, subtotal, tax, tax_rate,
        total, amount_due, period_start, period_end, scheduled_finalize_at, meta_data, created_at, updated_at)
    SELECT sb.org_id, sb.invoice_id, 'subscription', sb.customer_id, sb.sub_id, sb.currency, t.subtotal,
           fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency), sb.tax_rate,
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           t.subtotal + fluxrate_internal.round_money(t.unrounded * sb.tax_rate, sb.currency),
           sb.ps, sb.pe, $2 + sb.grace,
           jsonb_build_object('nominal_start', sb.nominal_start, 'nominal_end', sb.nominal_end)
           || CASE WHEN sb.ending THEN '{}'::jsonb
                   ELSE jsonb_build_object('advance_start', sb.pe, 'advance_end', sb.next_end) END,
           $2, $2
      FROM sb
      JOIN (SELECT l.org_id, l.sub_id, sum(l.line_total) AS subtotal, sum(l.amount) AS unrounded
              FROM lines l GROUP BY 1, 2) t ON t.org_id = sb.org_id AND t.sub_id = sb.sub_id
    RETURNING i.org_id, i.id, i.subscription_id, i.customer_id, i.total, i.currency, i.status
  ), ins_lines AS (
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, charge_id, description,
        quantity, unit_amount, line_total, amount_unrounded, period_start, period_end, meta)
    SELECT l.org_id, l.invoice_id, l.pos, l.line_type, l.charge_id, l.description, l.quantity, l.unit_amount, l.line_total,
           l.amount, l.line_start, l.line_end, l.meta
      FROM lines l
  ), adv AS (
    -- the period advances, or the subscription ends with it
    UPDATE fluxrate_internal.subscriptions x
       SET status = CASE WHEN b.ending THEN 'CANCELED' ELSE x.status END,
           ended_at = CASE WHEN b.ending THEN b.pe ELSE x.ended_at END,
           current_period_index = CASE WHEN b.ending THEN x.current_period_index ELSE b.idx + 1 END,
           current_period_start = CASE WHEN b.ending THEN x.current_period_start ELSE b.pe END,
           current_period_end = CASE WHEN b.ending THEN x.current_period_end ELSE b.next_end END,
           last_invoiced_date = $2, close_retry_at = NULL, close_error = NULL
      FROM b
     WHERE x.org_id = b.org_id AND x.id = b.sub_id
    RETURNING x.org_id, x.id, x.customer_id, b.ending AS ended, b.pe AS ended_at
  ), ev AS MATERIALIZED (
    -- the outbox events, as emit_event() writes them
    SELECT e.org_id, fluxrate_internal.uuid_v7() AS id, e.event, e.data
      FROM (SELECT inv.org_id, inv.subscription_id AS sub_id, 1 AS k, 'invoice.created' AS event,
                   jsonb_build_object('invoice_id', inv.id, 'customer_id', inv.customer_id, 'subscription_id', inv.subscription_id,
                                      'total', inv.total, 'currency', inv.currency, 'status', inv.status) AS data
              FROM inv
            UNION ALL
            SELECT adv.org_id, adv.id, 2, 'subscription.canceled',
                   jsonb_build_object('subscription_id', adv.id, 'customer_id', adv.customer_id, 'ended_at', adv.ended_at)
              FROM adv WHERE adv.ended
            ORDER BY 1, 2, 3) e
  ), ob AS (
    INSERT INTO fluxrate_internal.outbox (org_id, id, event, payload, created_at)
    SELECT ev.org_id, ev.id, ev.event,
           jsonb_build_object('id', ev.id, 'event', ev.event, 'timestamp', $2, 'data', ev.data), $2
      FROM ev
  ), dl AS (
    -- and their webhook deliveries, the rows fan_out() writes, in one statement
    -- (neither event sends an e-mail: fan_out() mails for invoice.finalized only)
    INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, endpoint_id, recipient,
        body, next_attempt_at, created_at, updated_at)
    SELECT w.org_id, fluxrate_internal.uuid_v7(), ev.id, ev.event, 'webhook', w.id, w.url,
           jsonb_build_object('event', ev.event, 'timestamp', $2, 'data', ev.data)::text, $2, $2, $2
      FROM ev
      JOIN fluxrate_internal.webhook_endpoints w ON w.org_id = ev.org_id AND w.status = 'ACTIVE'
           AND (w.event_types = '{}' OR ev.event = ANY (w.event_types))
    RETURNING 1
  )
  SELECT count(*) FROM dl
  $sql$ INTO v_events USING v_batch, v_now, v_usage;
  RETURN cardinality(v_batch);
END
$$;

-- Errors that say nothing about the row being processed: serialization failures
-- and deadlocks (class 40), a lock not available (55P03), lack of resources (53),
-- operator intervention (57), system errors (58).  The jobs let these end the run
-- (the next run retries) instead of marking a subscription or an invoice as failed.
CREATE FUNCTION fluxrate_internal.transient_error(sqlstate text) RETURNS boolean
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT left(sqlstate, 2) IN ('40', '53', '57', '58') OR sqlstate = '55P03'
$$;

-- How long a subscription or an invoice that failed attempts times waits before
-- the next try: 5 minutes, doubling, at most a day.
CREATE FUNCTION fluxrate_internal.retry_delay(attempts integer) RETURNS interval
  LANGUAGE sql IMMUTABLE
  AS $$
  SELECT least(interval '5 minutes' * power(2, least(greatest(attempts, 1) - 1, 20)), interval '1 day')
$$;

-- The closer's fallback when a batch fails: the same subscriptions, each closed
-- alone in a subtransaction, so that one subscription that cannot be closed (a
-- bug, bad data) does not stop billing for every organization behind it in the
-- due order.  The failing one keeps its period; its error is kept on it
-- (close_error, shown by get_subscription) and it is retried after 5 minutes,
-- doubling per attempt up to a day.  Only runs after a batch failed, so the
-- normal path has no subtransaction per row.  Returns how many it handled.
CREATE FUNCTION fluxrate_internal.sys_close_isolated(batch_size integer DEFAULT 2000) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
  n integer := 0;
  v_now timestamptz := fluxrate.now();
  v_state text;
  v_msg text;
  v_attempts integer;
BEGIN
  FOR r IN
    SELECT x.org_id, x.id, x.current_period_end, x.close_error FROM fluxrate_internal.subscriptions x
     WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= v_now
       AND (x.close_retry_at IS NULL OR x.close_retry_at <= v_now)
     ORDER BY x.current_period_end, x.org_id, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED
  LOOP
    BEGIN
      PERFORM fluxrate_internal.sys_close_batch(1, r.id);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF fluxrate_internal.transient_error(v_state) THEN
        RAISE;
      END IF;
      v_attempts := coalesce((r.close_error->>'attempts')::integer, 0) + 1;
      UPDATE fluxrate_internal.subscriptions x
         SET close_retry_at = v_now + fluxrate_internal.retry_delay(v_attempts),
             close_error = jsonb_build_object('sqlstate', v_state, 'message', v_msg, 'at', v_now,
                                              'attempts', v_attempts, 'period_end', r.current_period_end)
       WHERE x.org_id = r.org_id AND x.id = r.id;
      RAISE WARNING 'fluxrate: could not close the period of subscription %', r.id
        USING DETAIL = format('%s: %s', v_state, v_msg),
              HINT = 'The other subscriptions were closed; this one is retried later (close_error on the subscription).';
    END;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

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
  s fluxrate_internal.subscriptions;
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
BEGIN
  FOR r IN
    SELECT x.org_id, x.id, x.meta_data FROM fluxrate_internal.invoices x
     WHERE x.status = 'DRAFT' AND x.scheduled_finalize_at <= v_now
     ORDER BY x.scheduled_finalize_at, x.org_id, x.period_start, x.created_at, x.id
     LIMIT batch_size
     FOR UPDATE SKIP LOCKED
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

-- The jobs.  Invoker procedures (a SECURITY DEFINER procedure may not COMMIT):
-- each batch commits, so a long catch-up makes progress and a killed run loses
-- at most one batch, which the next run redoes.  Closing batches of 2,000
-- (~0.2 s each): a batch's fixed costs -- the claim, planning its two big
-- statements, the commit -- were ~15% of a run in batches of 500 (10,000
-- subscriptions: 1.26-1.35 s against 1.09-1.13 s).
CREATE PROCEDURE fluxrate.close_due_periods(batch_size integer DEFAULT 2000)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
BEGIN
  -- the usage of the periods many subscriptions end together, in one pass each
  -- (an optimization: if it fails, the batches compute usage pair by pair)
  BEGIN
    PERFORM fluxrate_internal.sys_close_prepare();
  EXCEPTION WHEN OTHERS THEN
    IF fluxrate_internal.transient_error(SQLSTATE) THEN
      RAISE;
    END IF;
    RAISE WARNING 'fluxrate: the closing run''s usage snapshot failed; closing without it'
      USING DETAIL = format('%s: %s', SQLSTATE, SQLERRM);
  END;
  COMMIT;
  LOOP
    BEGIN
      n := fluxrate_internal.sys_close_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- a subscription of this batch cannot be closed: close them one by one.
      -- (Transient errors, a deadlock or a full disk, end the run instead: the next
      -- run retries everything, and no subscription is marked for them.)
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_close_isolated(batch_size);
    END;
    EXIT WHEN n = 0;
    COMMIT;
  END LOOP;
  PERFORM fluxrate_internal.sys_close_finish();
  PERFORM fluxrate_internal.sys_mark_past_due();
  COMMIT;
END
$$;

CREATE PROCEDURE fluxrate.finalize_due_invoices(batch_size integer DEFAULT 500)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer;
BEGIN
  LOOP
    BEGIN
      n := fluxrate_internal.sys_finalize_batch(batch_size);
    EXCEPTION WHEN OTHERS THEN
      -- an invoice of this batch cannot be finalized: finalize them one by one
      IF fluxrate_internal.transient_error(SQLSTATE) THEN
        RAISE;
      END IF;
      n := fluxrate_internal.sys_finalize_batch(batch_size, isolated => true);
    END;
    EXIT WHEN n = 0;
    COMMIT;
  END LOOP;
END
$$;

CREATE PROCEDURE fluxrate.mark_past_due()
  LANGUAGE plpgsql
  AS $$
BEGIN
  PERFORM fluxrate_internal.sys_mark_past_due();
END
$$;

-- Invoice operations -----------------------------------------------------------

CREATE FUNCTION fluxrate_internal.load_invoice(org_id uuid, invoice_id uuid, lock boolean DEFAULT false)
  RETURNS fluxrate_internal.invoices
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
BEGIN
  PERFORM fluxrate_internal.required(load_invoice.invoice_id, 'invoice_id');
  IF lock THEN
    SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = load_invoice.org_id AND x.id = load_invoice.invoice_id FOR UPDATE;
  ELSE
    SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = load_invoice.org_id AND x.id = load_invoice.invoice_id;
  END IF;
  IF i.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'invoice not found', format('No invoice %s in this organization.', invoice_id));
  END IF;
  RETURN i;
END
$$;

CREATE FUNCTION fluxrate.get_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, get_invoice.invoice_id));
END
$$;

CREATE FUNCTION fluxrate.list_invoices(page integer DEFAULT 1, page_size integer DEFAULT 20, status text DEFAULT NULL,
    customer_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  PERFORM fluxrate_internal.one_of(upper(list_invoices.status), 'status', ARRAY['DRAFT', 'OPEN', 'PAID', 'VOID', 'UNCOLLECTIBLE']);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.created_at, i.id) FROM
       (SELECT * FROM fluxrate_internal.invoices x
         WHERE x.org_id = v_org AND (list_invoices.status IS NULL OR x.status = upper(list_invoices.status))
           AND (list_invoices.customer_id IS NULL OR x.customer_id = list_invoices.customer_id)
         ORDER BY x.created_at, x.id LIMIT page_size OFFSET (page - 1) * page_size) i),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.invoices x
      WHERE x.org_id = v_org AND (list_invoices.status IS NULL OR x.status = upper(list_invoices.status))
        AND (list_invoices.customer_id IS NULL OR x.customer_id = list_invoices.customer_id)));
END
$$;

CREATE FUNCTION fluxrate.list_customer_invoices(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = list_customer_invoices.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.created_at, i.period_start, i.id)
                   FROM fluxrate_internal.invoices i WHERE i.org_id = v_org AND i.customer_id = list_customer_invoices.customer_id), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.list_subscription_invoices(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions s WHERE s.org_id = v_org AND s.id = list_subscription_invoices.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.invoice_json(i, false) ORDER BY i.period_start, i.created_at, i.id)
                   FROM fluxrate_internal.invoices i
                   WHERE i.org_id = v_org AND i.subscription_id = list_subscription_invoices.subscription_id), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate.finalize_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
BEGIN
  PERFORM fluxrate_internal.load_invoice(v_org, finalize_invoice.invoice_id, true);
  PERFORM fluxrate_internal.finalize_one(v_org, finalize_invoice.invoice_id);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, finalize_invoice.invoice_id));
END
$$;

-- The state machine of SPEC.md:
--   DRAFT -> OPEN (finalize) | VOID;  OPEN -> PAID | VOID | UNCOLLECTIBLE;
--   UNCOLLECTIBLE -> PAID | VOID;  PAID and VOID are final.
-- Every change keeps the note, the previous status and the time in meta_data.
CREATE FUNCTION fluxrate.update_invoice_status(invoice_id uuid DEFAULT NULL, status text DEFAULT NULL, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  v_to text := upper(update_invoice_status.status);
  i fluxrate_internal.invoices;
  v_now timestamptz := fluxrate.now();
BEGIN
  PERFORM fluxrate_internal.required(v_to, 'status');
  PERFORM fluxrate_internal.one_of(v_to, 'status', ARRAY['OPEN', 'PAID', 'VOID', 'UNCOLLECTIBLE']);
  i := fluxrate_internal.load_invoice(v_org, update_invoice_status.invoice_id, true);
  IF NOT ((i.status = 'DRAFT' AND v_to IN ('OPEN', 'VOID'))
       OR (i.status = 'OPEN' AND v_to IN ('PAID', 'VOID', 'UNCOLLECTIBLE'))
       OR (i.status = 'UNCOLLECTIBLE' AND v_to IN ('PAID', 'VOID'))) THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot change an invoice from %s to %s', i.status, v_to),
      CASE WHEN i.status IN ('PAID', 'VOID') THEN format('%s is final.', i.status)
           ELSE 'Allowed: DRAFT to OPEN or VOID; OPEN to PAID, VOID or UNCOLLECTIBLE; UNCOLLECTIBLE to PAID or VOID.' END);
  END IF;
  IF v_to = 'OPEN' THEN
    PERFORM fluxrate_internal.finalize_one(v_org, i.id);
  ELSE
    UPDATE fluxrate_internal.invoices x
       SET status = v_to,
           paid_at = CASE WHEN v_to = 'PAID' THEN v_now ELSE x.paid_at END,
           amount_paid = CASE WHEN v_to = 'PAID' THEN x.total ELSE x.amount_paid END,
           amount_due = CASE WHEN v_to IN ('PAID', 'VOID') THEN 0 ELSE x.amount_due END,
           voided_at = CASE WHEN v_to = 'VOID' THEN v_now ELSE x.voided_at END,
           updated_at = v_now
     WHERE x.org_id = v_org AND x.id = i.id;
    PERFORM fluxrate_internal.emit_event(v_org, CASE v_to WHEN 'PAID' THEN 'invoice.paid' WHEN 'VOID' THEN 'invoice.voided'
                                                ELSE 'invoice.uncollectible' END,
      jsonb_build_object('invoice_id', i.id, 'invoice_number', i.invoice_number, 'customer_id', i.customer_id,
                         'total', i.total, 'currency', i.currency, 'status', v_to));
    -- a paid invoice may bring a PAST_DUE subscription back to ACTIVE
    IF v_to IN ('PAID', 'VOID') AND i.subscription_id IS NOT NULL THEN
      UPDATE fluxrate_internal.subscriptions s SET status = 'ACTIVE'
       WHERE s.org_id = v_org AND s.id = i.subscription_id AND s.status = 'PAST_DUE'
         AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.invoices o
                          WHERE o.org_id = v_org AND o.subscription_id = s.id AND o.status = 'OPEN' AND o.due_date < v_now);
    END IF;
  END IF;
  UPDATE fluxrate_internal.invoices x
     SET meta_data = x.meta_data || jsonb_build_object('status_change_note', update_invoice_status.note,
                       'status_change_timestamp', v_now, 'previous_status', i.status)
   WHERE x.org_id = v_org AND x.id = i.id;
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, i.id));
END
$$;

CREATE FUNCTION fluxrate.pay_invoice(invoice_id uuid, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE sql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate.update_invoice_status(pay_invoice.invoice_id, 'PAID', pay_invoice.note) $$;

CREATE FUNCTION fluxrate.void_invoice(invoice_id uuid, note text DEFAULT NULL) RETURNS jsonb
  LANGUAGE sql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$ SELECT fluxrate.update_invoice_status(void_invoice.invoice_id, 'VOID', void_invoice.note) $$;

CREATE FUNCTION fluxrate.delete_invoice(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, delete_invoice.invoice_id, true);
BEGIN
  IF i.status <> 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot delete an invoice that is %s', i.status),
      'Only DRAFT invoices may be deleted.', 'Void it instead.');
  END IF;
  DELETE FROM fluxrate_internal.invoices x WHERE x.org_id = v_org AND x.id = i.id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', i.id, 'deleted', true);
END
$$;

-- Manual one-off invoices: lines [{description, quantity, unit_amount}].
CREATE FUNCTION fluxrate_internal.write_manual_lines(org_id uuid, invoice_id uuid, currency text, line_items jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  l jsonb;
  n integer := 0;
  q numeric;
  u numeric;
BEGIN
  IF line_items IS NULL OR jsonb_typeof(line_items) <> 'array' THEN
    PERFORM fluxrate_internal.fail('22023', 'line_items must be an array',
      NULL, 'Send [{"description": "Setup", "quantity": 1, "unit_amount": 500}].');
  END IF;
  DELETE FROM fluxrate_internal.invoice_lines x WHERE x.org_id = write_manual_lines.org_id AND x.invoice_id = write_manual_lines.invoice_id;
  FOR l IN SELECT e FROM jsonb_array_elements(line_items) e LOOP
    n := n + 1;
    IF jsonb_typeof(l) <> 'object' OR coalesce(l->>'description', '') = '' THEN
      PERFORM fluxrate_internal.fail('22004', format('line %s needs a description', n));
    END IF;
    IF jsonb_typeof(l->'quantity') IS DISTINCT FROM 'number' OR jsonb_typeof(l->'unit_amount') IS DISTINCT FROM 'number' THEN
      PERFORM fluxrate_internal.fail('22023', format('line %s needs numeric quantity and unit_amount', n));
    END IF;
    q := fluxrate_internal.check_decimal((l->>'quantity')::numeric, format('line %s quantity', n), false);
    u := (l->>'unit_amount')::numeric;
    IF scale(u) > 12 THEN
      PERFORM fluxrate_internal.fail('PT422', format('line %s unit_amount has more than 12 decimal places', n));
    END IF;
    INSERT INTO fluxrate_internal.invoice_lines (org_id, invoice_id, position, line_type, description, quantity,
        unit_amount, line_total, amount_unrounded)
    VALUES (write_manual_lines.org_id, write_manual_lines.invoice_id, n, 'manual', l->>'description', q, u,
            fluxrate_internal.round_money(q * u, currency), q * u);
  END LOOP;
  PERFORM fluxrate_internal.recompute_totals(write_manual_lines.org_id, write_manual_lines.invoice_id);
END
$$;

CREATE FUNCTION fluxrate.create_invoice(customer_id uuid DEFAULT NULL, currency text DEFAULT NULL, due_date timestamptz DEFAULT NULL,
    line_items jsonb DEFAULT '[]')
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  c fluxrate_internal.customers;
  v_currency text := upper(create_invoice.currency);
  v_id uuid;
BEGIN
  PERFORM fluxrate_internal.required(create_invoice.customer_id, 'customer_id');
  PERFORM fluxrate_internal.required(v_currency, 'currency');
  PERFORM fluxrate_internal.currency_exponent(v_currency);
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = v_org AND x.id = create_invoice.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', format('No customer %s in this organization.', create_invoice.customer_id));
  END IF;
  IF c.billing_address_country IS NULL THEN
    PERFORM fluxrate_internal.fail('PT422', 'customer has no billing_address_country',
      'A manual invoice needs the customer''s country (for tax).', 'Set it with update_customer.');
  END IF;
  INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, currency, due_date, created_at, updated_at)
  VALUES (v_org, 'manual', c.id, v_currency, create_invoice.due_date, fluxrate.now(), fluxrate.now())
  RETURNING id INTO v_id;
  PERFORM fluxrate_internal.write_manual_lines(v_org, v_id, v_currency, coalesce(create_invoice.line_items, '[]'::jsonb));
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id));
END
$$;

-- PUT /invoices/{id}: DRAFT only.
CREATE FUNCTION fluxrate.update_invoice(invoice_id uuid, due_date timestamptz DEFAULT NULL, line_items jsonb DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, update_invoice.invoice_id, true);
BEGIN
  IF i.status <> 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot edit an invoice that is %s', i.status), 'Only DRAFT invoices may be edited.');
  END IF;
  IF update_invoice.line_items IS NOT NULL AND i.kind <> 'manual' THEN
    PERFORM fluxrate_internal.fail('PT409', 'the lines of a subscription invoice come from its charges',
      'Edit the lines of manual invoices only.');
  END IF;
  UPDATE fluxrate_internal.invoices x SET due_date = coalesce(update_invoice.due_date, x.due_date), updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = i.id;
  IF update_invoice.line_items IS NOT NULL THEN
    PERFORM fluxrate_internal.write_manual_lines(v_org, i.id, i.currency, update_invoice.line_items);
  END IF;
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, i.id));
END
$$;

-- Subscriptions: preview, generate now, cancel, delete ------------------------------

-- What the current period's invoice would be now; writes nothing (a savepoint
-- computes it with the real code path and is rolled back).
CREATE FUNCTION fluxrate.preview_invoice(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  s fluxrate_internal.subscriptions;
  np record;
  v_id uuid;
  v_doc jsonb;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = preview_invoice.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status IN ('TRIAL', 'CANCELED') THEN
    RETURN jsonb_build_object('subscription_id', s.id, 'status', s.status, 'line_items', '[]'::jsonb, 'total', 0,
                              'message', format('a %s subscription has nothing to bill', lower(s.status)));
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  BEGIN
    INSERT INTO fluxrate_internal.invoices (org_id, kind, customer_id, subscription_id, currency, period_start, period_end,
        created_at, updated_at)
    SELECT v_org, 'final', s.customer_id, s.id, p.currency, s.current_period_start, s.current_period_end, fluxrate.now(), fluxrate.now()
      FROM fluxrate_internal.plans p WHERE p.org_id = v_org AND p.id = s.plan_id
    RETURNING id INTO v_id;
    PERFORM fluxrate_internal.fill_lines(v_org, v_id, np.nominal_start, np.nominal_end);
    v_doc := fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id))
             - 'id' - 'kind' - 'status' - 'created_at' || jsonb_build_object('preview', true, 'usage_through', fluxrate.now());
    RAISE EXCEPTION USING ERRCODE = 'P0004', MESSAGE = 'preview rollback';
  EXCEPTION WHEN assert_failure THEN
    NULL;
  END;
  RETURN v_doc;
END
$$;

-- Bill now.  If the current period has ended, close it at once (the closer would
-- have); otherwise bill the period so far [start, now) as a DRAFT, prorating fixed
-- charges, and restart the current period at now, so the regular close bills only
-- the rest and nothing is billed twice.
CREATE FUNCTION fluxrate.generate_invoice(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  s fluxrate_internal.subscriptions;
  np record;
  v_now timestamptz := fluxrate.now();
  v_id uuid;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = generate_invoice.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status NOT IN ('ACTIVE', 'PAST_DUE') THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot invoice a %s subscription', s.status),
      CASE s.status WHEN 'TRIAL' THEN 'Trials are never billed.' ELSE 'The subscription has ended.' END);
  END IF;
  SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
  IF s.current_period_end <= v_now THEN
    -- what the closer would do: usage of the ended period, in-advance fees of the
    -- next one, or the end of the subscription
    v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, s.current_period_end, np.nominal_start, np.nominal_end,
      'subscription', NULL,
      CASE WHEN NOT s.cancel_at_period_end THEN s.current_period_end END,
      CASE WHEN NOT s.cancel_at_period_end THEN
        fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 2) END);
    IF s.cancel_at_period_end THEN
      UPDATE fluxrate_internal.subscriptions x
         SET status = 'CANCELED', ended_at = s.current_period_end, last_invoiced_date = v_now,
             close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = v_org AND x.id = s.id;
      PERFORM fluxrate_internal.emit_event(v_org, 'subscription.canceled',
        jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', s.current_period_end));
    ELSE
      UPDATE fluxrate_internal.subscriptions x
         SET current_period_index = s.current_period_index + 1, current_period_start = s.current_period_end,
             current_period_end = fluxrate_internal.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 2),
             last_invoiced_date = v_now,
             -- closed here: a failed closer's retry time no longer applies (it would hold
             -- the next period's close back)
             close_retry_at = NULL, close_error = NULL
       WHERE x.org_id = v_org AND x.id = s.id;
    END IF;
  ELSIF s.current_period_start >= v_now THEN
    PERFORM fluxrate_internal.fail('PT409', 'nothing to invoice yet', 'The current period has just started.');
  ELSE
    v_id := fluxrate_internal.create_period_invoice(s, s.current_period_start, v_now, np.nominal_start, np.nominal_end);
    UPDATE fluxrate_internal.invoices x SET meta_data = x.meta_data || jsonb_build_object('interim', true)
     WHERE x.org_id = v_org AND x.id = v_id;
    UPDATE fluxrate_internal.subscriptions x SET current_period_start = v_now, last_invoiced_date = v_now
     WHERE x.org_id = v_org AND x.id = s.id;
  END IF;
  IF v_id IS NULL THEN
    -- nothing to bill: the plan's fees were billed in advance and there is no usage charge
    RETURN jsonb_build_object('subscription_id', s.id, 'invoice', NULL,
                              'message', 'nothing to invoice: the fees of this period were billed in advance');
  END IF;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.invoice_json(fluxrate_internal.load_invoice(v_org, v_id));
END
$$;

CREATE FUNCTION fluxrate.cancel_subscription(subscription_id uuid, cancel_at_period_end boolean DEFAULT false,
    reason text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  s fluxrate_internal.subscriptions;
  np record;
  v_now timestamptz := fluxrate.now();
  v_inv uuid;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x
   WHERE x.org_id = v_org AND x.id = cancel_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  IF s.status = 'CANCELED' THEN
    PERFORM fluxrate_internal.fail('PT409', 'subscription is already canceled');
  END IF;
  IF coalesce(cancel_subscription.cancel_at_period_end, false) THEN
    UPDATE fluxrate_internal.subscriptions x
       SET cancel_at_period_end = true, canceled_at = v_now, cancel_reason = cancel_subscription.reason
     WHERE x.org_id = v_org AND x.id = s.id RETURNING * INTO s;
  ELSE
    -- a subscription canceled before its first period starts: its opening
    -- invoice, still a draft, bills a period that will not happen
    DELETE FROM fluxrate_internal.invoices x
     WHERE x.org_id = v_org AND x.subscription_id = s.id AND x.kind = 'opening' AND x.status = 'DRAFT'
       AND x.period_start >= v_now;
    -- a final invoice prorated up to now (none for a trial: trials are never billed);
    -- in-advance fees are not on it: the period was paid ahead (no credit for the rest)
    IF s.status <> 'TRIAL' AND v_now > s.current_period_start THEN
      SELECT * INTO np FROM fluxrate_internal.nominal_period(s);
      v_inv := fluxrate_internal.create_period_invoice(s, s.current_period_start, least(v_now, s.current_period_end),
                                                       np.nominal_start, np.nominal_end, 'final');
    END IF;
    UPDATE fluxrate_internal.subscriptions x
       SET status = 'CANCELED', canceled_at = v_now, ended_at = v_now, cancel_reason = cancel_subscription.reason,
           last_invoiced_date = CASE WHEN v_inv IS NULL THEN x.last_invoiced_date ELSE v_now END,
           close_retry_at = NULL, close_error = NULL
     WHERE x.org_id = v_org AND x.id = s.id RETURNING * INTO s;
    PERFORM fluxrate_internal.emit_event(v_org, 'subscription.canceled',
      jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'ended_at', v_now, 'reason', cancel_subscription.reason));
  END IF;
  RETURN fluxrate_internal.subscription_json(s) || jsonb_build_object('cancel_reason', s.cancel_reason, 'final_invoice_id', v_inv);
END
$$;

CREATE FUNCTION fluxrate.delete_subscription(subscription_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
BEGIN
  PERFORM 1 FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = delete_subscription.subscription_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', format('No subscription %s in this organization.', subscription_id));
  END IF;
  -- drafts go with it; finalized invoices stay (they are accounting records)
  DELETE FROM fluxrate_internal.invoices i WHERE i.org_id = v_org AND i.subscription_id = delete_subscription.subscription_id AND i.status = 'DRAFT';
  UPDATE fluxrate_internal.invoices i SET subscription_id = NULL
   WHERE i.org_id = v_org AND i.subscription_id = delete_subscription.subscription_id;
  DELETE FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = delete_subscription.subscription_id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', subscription_id, 'deleted', true);
END
$$;

-- pg_cron ---------------------------------------------------------------------------

-- Schedule the jobs every minute (pg_cron 1.4.2: minute granularity, UTC) when
-- pg_cron is installed; the jobs only call the procedures.
CREATE FUNCTION fluxrate.schedule_jobs() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_close bigint;
  v_final bigint;
  v_deliver bigint;
  v_rollups bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    PERFORM fluxrate_internal.fail('PT409', 'pg_cron is not installed',
      'fluxrate.close_due_periods() and fluxrate.finalize_due_invoices() can be called from any scheduler.',
      'CREATE EXTENSION pg_cron, with pg_cron in shared_preload_libraries.');
  END IF;
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_close
    USING 'fluxrate-close-periods', '* * * * *', 'CALL fluxrate.close_due_periods()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_final
    USING 'fluxrate-finalize-invoices', '* * * * *', 'CALL fluxrate.finalize_due_invoices()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_deliver
    USING 'fluxrate-deliver', '* * * * *', 'CALL fluxrate.deliver_pending()';
  EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_rollups
    USING 'fluxrate-usage-rollups', '* * * * *', 'SELECT fluxrate.refresh_usage_rollups()';
  RETURN jsonb_build_object('close_due_periods', v_close, 'finalize_due_invoices', v_final,
                            'deliver_pending', v_deliver, 'refresh_usage_rollups', v_rollups);
END
$$;

CREATE FUNCTION fluxrate.unschedule_jobs() RETURNS integer
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer := 0;
  j record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
    RETURN 0;
  END IF;
  FOR j IN EXECUTE 'SELECT jobid FROM cron.job WHERE jobname LIKE ''fluxrate-%''' LOOP
    EXECUTE 'SELECT cron.unschedule($1)' USING j.jobid;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- the trusted application role runs the jobs (the procedures call these)
GRANT USAGE ON SCHEMA fluxrate_internal TO fluxrate_app;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_close_batch(integer, uuid), fluxrate_internal.sys_close_isolated(integer),
  fluxrate_internal.sys_finalize_batch(integer, boolean),
  fluxrate_internal.sys_close_prepare(numeric), fluxrate_internal.sys_close_finish(), fluxrate_internal.sys_close_tables(),
  fluxrate_internal.sys_mark_past_due(), fluxrate_internal.transient_error(text),
  fluxrate_internal.sys_refresh_rollups(boolean) TO fluxrate_app;

-- ==== src/sql/60_auth.sql ====
-- 60_auth.sql: sign-in primitives (src/jwt.c).  The HTTP layer (sign-up, login,
-- refresh, logout, the PostgREST pre-request, roles) builds on these.

CREATE FUNCTION fluxrate_internal.jwt_sign(claims jsonb, secret bytea) RETURNS text
  LANGUAGE C IMMUTABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_jwt_sign';
COMMENT ON FUNCTION fluxrate_internal.jwt_sign(jsonb, bytea) IS 'HS256 JWT of the claims (OpenSSL HMAC-SHA256)';

CREATE FUNCTION fluxrate_internal.jwt_verify(token text, secret bytea) RETURNS jsonb
  LANGUAGE C STABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_jwt_verify';
COMMENT ON FUNCTION fluxrate_internal.jwt_verify(text, bytea) IS
  'the claims of a valid HS256 token (signature in constant time, exp/nbf against fluxrate.now(), 30 s skew), else PT401';

CREATE FUNCTION fluxrate_internal.password_hash(password text) RETURNS text
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_password_hash';
COMMENT ON FUNCTION fluxrate_internal.password_hash(text) IS 'argon2id (libsodium crypto_pwhash_str, interactive limits)';

CREATE FUNCTION fluxrate_internal.password_verify(hash text, password text) RETURNS boolean
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_password_verify';

-- ==== src/sql/70_delivery.sql ====
-- 70_delivery.sql: invoice e-mails over SMTP, signed webhooks, public invoice links.
--
-- The flow:
--   1. A change (finalization, payment, voiding, a subscription event) calls
--      emit_event() in its own transaction; emit_event writes the outbox row and
--      fan_out() below writes one delivery row per webhook endpoint that wants
--      the event, plus one e-mail delivery for a finalized invoice when the
--      organization has SMTP and automatic e-mails on.  A rolled-back change
--      therefore sends nothing; a committed one cannot be lost.
--   2. fluxrate.deliver_pending() (pg_cron, every minute) takes due deliveries
--      one at a time with FOR UPDATE SKIP LOCKED, performs the network call
--      (src/delivery.c, libcurl), records the attempt and commits.  Delivery is
--      at least once: a run killed between the send and the commit sends again,
--      with the same event id (webhooks: X-Fluxrate-Event-Id; e-mail: the same
--      Message-ID), so receivers de-duplicate.
--   3. A failed attempt is retried after 30 s, 2 min, 10 min, 1 h and 6 h; the
--      sixth failure marks the delivery FAILED (it can be retried by hand).
--
-- Secrets: the SMTP password and webhook signing secrets are sealed
-- (XChaCha20-Poly1305, src/secrets.c) with the row's identity as associated
-- data; plain text is never stored and never returned after creation.

CREATE FUNCTION fluxrate_internal.seal(plaintext text, context text) RETURNS bytea
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_seal';
CREATE FUNCTION fluxrate_internal.unseal(sealed bytea, context text) RETURNS text
  LANGUAGE C STABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_unseal';
CREATE FUNCTION fluxrate_internal.hmac_sha256_hex(key text, message text) RETURNS text
  LANGUAGE C IMMUTABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_hmac_sha256_hex';
CREATE FUNCTION fluxrate_internal.http_post(url text, headers text[], body text, timeout_ms integer,
    OUT status_code integer, OUT error text, OUT response text)
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_http_post';
CREATE FUNCTION fluxrate_internal.smtp_send(host text, port integer, security text, username text,
    password text, mail_from text, rcpt text, message text, timeout_ms integer,
    OUT status_code integer, OUT error text)
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_smtp_send';

-- Tables ------------------------------------------------------------------------

CREATE TABLE fluxrate_internal.smtp_settings (
  org_id        uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  host          text NOT NULL CHECK (host ~ '^[A-Za-z0-9.:\[\]-]{1,253}$'),
  port          integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
  security      text NOT NULL CHECK (security IN ('starttls', 'tls', 'none')),
  username      text,
  password_enc  bytea,                          -- sealed with context 'smtp:<org_id>'
  from_email    text NOT NULL,
  from_name     text,
  created_at    timestamptz NOT NULL,
  updated_at    timestamptz NOT NULL,
  PRIMARY KEY (org_id)
);

CREATE TABLE fluxrate_internal.webhook_endpoints (
  org_id        uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id            uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  url           text NOT NULL CHECK (url ~ '^https?://[^\s/?#]+'),
  event_types   text[] NOT NULL,                -- empty = every event
  description   text,
  secret_enc    bytea NOT NULL,                 -- sealed with context 'webhook:<org_id>:<id>'
  secret_prefix text NOT NULL,                  -- for display
  status        text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'DISABLED')),
  created_at    timestamptz NOT NULL,
  updated_at    timestamptz NOT NULL,
  PRIMARY KEY (org_id, id)
);

CREATE TABLE fluxrate_internal.deliveries (
  org_id            uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id                uuid NOT NULL,               -- UUIDv7
  event_id          uuid NOT NULL,               -- the outbox event: stable across retries
  event             text NOT NULL,
  channel           text NOT NULL CHECK (channel IN ('webhook', 'email')),
  endpoint_id       uuid,                        -- webhook deliveries
  invoice_id        uuid,                        -- e-mail deliveries
  recipient         text NOT NULL,               -- URL or e-mail address, as of enqueueing
  body              text,                        -- webhook: the exact bytes signed and sent
  status            text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SENT', 'FAILED')),
  attempts          integer NOT NULL DEFAULT 0,
  next_attempt_at   timestamptz,
  last_status_code  integer,
  last_error        text,
  created_at        timestamptz NOT NULL,
  sent_at           timestamptz,
  updated_at        timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  CHECK ((channel = 'webhook') = (endpoint_id IS NOT NULL)),
  FOREIGN KEY (org_id, endpoint_id) REFERENCES fluxrate_internal.webhook_endpoints (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE
);
-- the delivery run takes due rows in time order across organizations
CREATE INDEX deliveries_due_idx ON fluxrate_internal.deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX deliveries_event_idx ON fluxrate_internal.deliveries (org_id, event_id);

-- The delivery log: one row per attempt, with the peer's answer.
CREATE TABLE fluxrate_internal.delivery_attempts (
  org_id        uuid NOT NULL,
  delivery_id   uuid NOT NULL,
  attempt       integer NOT NULL,
  attempted_at  timestamptz NOT NULL,
  status_code   integer,
  error         text,
  response      text,                            -- first 1 KiB of a webhook response
  duration_ms   integer NOT NULL,
  PRIMARY KEY (org_id, delivery_id, attempt),
  FOREIGN KEY (org_id, delivery_id) REFERENCES fluxrate_internal.deliveries (org_id, id) ON DELETE CASCADE
);

-- invoice links are looked up by token before the organization is known
CREATE UNIQUE INDEX invoices_public_token_idx ON fluxrate_internal.invoices (public_token)
  WHERE public_token IS NOT NULL;

-- Fan-out ------------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.webhook_event_types() RETURNS text[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['invoice.created', 'invoice.finalized', 'invoice.paid', 'invoice.voided',
                     'invoice.uncollectible', 'subscription.created', 'subscription.activated',
                     'subscription.canceled']::text[] $$;

-- Called by emit_event() in the transaction of the change.
-- (sys_close_batch() writes the same webhook rows set-based for the events it
-- emits, invoice.created and subscription.canceled: keep the two in step.)
CREATE FUNCTION fluxrate_internal.fan_out(org_id uuid, event_id uuid, event text, data jsonb, at timestamptz)
  RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  -- the documented payload {event, timestamp, data}; its text is what is signed
  v_body text := jsonb_build_object('event', fan_out.event, 'timestamp', fan_out.at, 'data', fan_out.data)::text;
BEGIN
  INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, endpoint_id, recipient,
      body, next_attempt_at, created_at, updated_at)
  SELECT w.org_id, fluxrate_internal.uuid_v7(), fan_out.event_id, fan_out.event, 'webhook', w.id, w.url,
         v_body, fan_out.at, fan_out.at, fan_out.at
    FROM fluxrate_internal.webhook_endpoints w
   WHERE w.org_id = fan_out.org_id AND w.status = 'ACTIVE'
     AND (w.event_types = '{}' OR fan_out.event = ANY (w.event_types));

  IF fan_out.event = 'invoice.finalized' THEN
    PERFORM fluxrate_internal.enqueue_invoice_email(fan_out.org_id, (fan_out.data->>'invoice_id')::uuid,
      fan_out.event_id, fan_out.at, automatic => true);
  END IF;
END
$$;

-- One e-mail delivery for an invoice; returns why not when it cannot be sent.
-- automatic: the finalization path, which honours the organization's switch.
CREATE FUNCTION fluxrate_internal.enqueue_invoice_email(org_id uuid, invoice_id uuid, event_id uuid,
    at timestamptz, automatic boolean, OUT queued boolean, OUT reason text)
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_auto boolean;
  v_email text;
BEGIN
  SELECT o.auto_email INTO v_auto FROM fluxrate_internal.organizations o WHERE o.org_id = enqueue_invoice_email.org_id;
  SELECT c.email INTO v_email
    FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers c ON c.org_id = i.org_id AND c.id = i.customer_id
   WHERE i.org_id = enqueue_invoice_email.org_id AND i.id = enqueue_invoice_email.invoice_id;
  queued := false;
  IF automatic AND NOT v_auto THEN
    reason := 'automatic invoice e-mails are turned off for this organization';
  ELSIF NOT EXISTS (SELECT 1 FROM fluxrate_internal.smtp_settings s WHERE s.org_id = enqueue_invoice_email.org_id) THEN
    reason := 'smtp is not configured';
  ELSIF v_email IS NULL OR btrim(v_email) = '' THEN
    reason := 'the customer has no e-mail address';
  ELSE
    INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, invoice_id, recipient,
        next_attempt_at, created_at, updated_at)
    VALUES (enqueue_invoice_email.org_id, fluxrate_internal.uuid_v7(), enqueue_invoice_email.event_id,
            'invoice.email', 'email', enqueue_invoice_email.invoice_id, v_email, at, at, at);
    queued := true;
  END IF;
END
$$;

-- The invoice e-mail --------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.html_escape(t text) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT replace(replace(replace(replace(replace(coalesce(t, ''), '&', '&amp;'), '<', '&lt;'), '>', '&gt;'),
                               '"', '&quot;'), '''', '&#39;') $$;

-- A header value: as is when it is printable ASCII, else an RFC 2047 encoded word.
CREATE FUNCTION fluxrate_internal.mime_header(t text) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT CASE WHEN t ~ '^[ -~]*$' THEN t
               ELSE '=?UTF-8?B?' || translate(encode(convert_to(t, 'UTF8'), 'base64'), E'\n', '') || '?=' END $$;

CREATE FUNCTION fluxrate_internal.money_text(amount numeric, currency text) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT pg_catalog.round(amount, fluxrate_internal.currency_exponent(currency))::text || ' ' || currency $$;

-- The whole RFC 5322 message (multipart/alternative: plain text and HTML),
-- CRLF line endings, bodies in base64 so any name or description travels intact.
CREATE FUNCTION fluxrate_internal.invoice_email(org_id uuid, invoice_id uuid, delivery_id uuid, recipient text,
    OUT subject text, OUT message text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  o fluxrate_internal.organizations;
  c fluxrate_internal.customers;
  s fluxrate_internal.smtp_settings;
  v_link text;
  v_period text;
  v_lines_text text;
  v_lines_html text;
  v_text text;
  v_html text;
  v_boundary text := 'fluxrate-' || replace(delivery_id::text, '-', '');
  v_from text;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = invoice_email.org_id AND x.id = invoice_email.invoice_id;
  SELECT * INTO o FROM fluxrate_internal.organizations x WHERE x.org_id = invoice_email.org_id;
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = i.org_id AND x.id = i.customer_id;
  SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = invoice_email.org_id;
  v_link := CASE WHEN i.public_token IS NOT NULL THEN o.invoice_link_base || i.public_token END;
  v_period := CASE WHEN i.period_start IS NOT NULL
                   THEN to_char(i.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' to '
                        || to_char(i.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD') END;
  subject := format('Invoice %s from %s: %s due %s', coalesce(i.invoice_number, '(draft)'), o.name,
                    fluxrate_internal.money_text(i.total, i.currency),
                    coalesce(to_char(i.due_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'on receipt'));

  SELECT string_agg(format('  %s: %s x %s = %s', l.description, l.quantity, l.unit_amount,
                           fluxrate_internal.money_text(l.line_total, i.currency)), E'\n' ORDER BY l.position),
         string_agg(format('<tr><td>%s</td><td style="text-align:right">%s</td><td style="text-align:right">%s</td>'
                           '<td style="text-align:right">%s</td></tr>',
                           fluxrate_internal.html_escape(l.description), l.quantity, l.unit_amount,
                           fluxrate_internal.html_escape(fluxrate_internal.money_text(l.line_total, i.currency))),
                    E'\n' ORDER BY l.position)
    INTO v_lines_text, v_lines_html
    FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;

  v_text := concat_ws(E'\n',
    format('Hello %s,', c.name), '',
    format('%s has issued invoice %s.', o.name, coalesce(i.invoice_number, '(draft)')),
    CASE WHEN v_period IS NOT NULL THEN 'Period: ' || v_period END, '',
    coalesce(v_lines_text, '  (no lines)'), '',
    'Subtotal: ' || fluxrate_internal.money_text(i.subtotal, i.currency),
    'Tax: ' || fluxrate_internal.money_text(i.tax, i.currency),
    'Total: ' || fluxrate_internal.money_text(i.total, i.currency),
    'Amount due: ' || fluxrate_internal.money_text(i.amount_due, i.currency),
    'Due date: ' || coalesce(to_char(i.due_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'on receipt'),
    CASE WHEN v_link IS NOT NULL THEN E'\nView the invoice: ' || v_link END,
    '', '-- ', o.name);

  v_html := concat_ws(E'\n',
    '<!DOCTYPE html><html><head><meta charset="utf-8"><title>' || fluxrate_internal.html_escape(subject) || '</title></head>',
    '<body style="font-family:sans-serif">',
    format('<p>Hello %s,</p>', fluxrate_internal.html_escape(c.name)),
    format('<p>%s has issued invoice <strong>%s</strong>.</p>', fluxrate_internal.html_escape(o.name),
           fluxrate_internal.html_escape(coalesce(i.invoice_number, '(draft)'))),
    CASE WHEN v_period IS NOT NULL THEN '<p>Period: ' || v_period || '</p>' END,
    '<table cellpadding="4"><tr><th>Description</th><th>Quantity</th><th>Unit amount</th><th>Amount</th></tr>',
    coalesce(v_lines_html, ''),
    format('<tr><td colspan="3">Subtotal</td><td style="text-align:right">%s</td></tr>',
           fluxrate_internal.money_text(i.subtotal, i.currency)),
    format('<tr><td colspan="3">Tax</td><td style="text-align:right">%s</td></tr>', fluxrate_internal.money_text(i.tax, i.currency)),
    format('<tr><td colspan="3"><strong>Total</strong></td><td style="text-align:right"><strong>%s</strong></td></tr>',
           fluxrate_internal.money_text(i.total, i.currency)),
    '</table>',
    format('<p>Amount due: %s, due %s.</p>', fluxrate_internal.money_text(i.amount_due, i.currency),
           coalesce(to_char(i.due_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'on receipt')),
    CASE WHEN v_link IS NOT NULL
         THEN format('<p><a href="%s">View the invoice online</a></p>', fluxrate_internal.html_escape(v_link)) END,
    '</body></html>');

  v_from := CASE WHEN coalesce(s.from_name, o.name) IS NOT NULL
                 THEN CASE WHEN coalesce(s.from_name, o.name) ~ '^[ -~]*$'
                           THEN '"' || replace(replace(coalesce(s.from_name, o.name), '\', '\\'), '"', '\"') || '"'
                           ELSE fluxrate_internal.mime_header(coalesce(s.from_name, o.name)) END
                      || ' <' || s.from_email || '>'
                 ELSE s.from_email END;
  message := concat_ws(E'\n',
    'From: ' || v_from,
    'To: ' || CASE WHEN c.name IS NOT NULL AND c.name <> recipient
                   THEN fluxrate_internal.mime_header(c.name) || ' <' || recipient || '>'
                   ELSE '<' || recipient || '>' END,
    'Subject: ' || fluxrate_internal.mime_header(subject),
    'Date: ' || to_char(fluxrate.now() AT TIME ZONE 'UTC', 'Dy, DD Mon YYYY HH24:MI:SS') || ' +0000',
    -- stable across retries: a receiver that got the message twice can tell
    'Message-ID: <' || delivery_id || '@fluxrate.invalid>',
    'X-Fluxrate-Invoice-Id: ' || i.id,
    'MIME-Version: 1.0',
    'Content-Type: multipart/alternative; boundary="' || v_boundary || '"',
    '',
    '--' || v_boundary,
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    encode(convert_to(v_text, 'UTF8'), 'base64'),
    '--' || v_boundary,
    'Content-Type: text/html; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    encode(convert_to(v_html, 'UTF8'), 'base64'),
    '--' || v_boundary || '--',
    '');
  message := replace(message, E'\n', E'\r\n');
END
$$;

-- Sending -----------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.retry_delays() RETURNS interval[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['30 seconds', '2 minutes', '10 minutes', '1 hour', '6 hours']::interval[] $$;

-- Take one due delivery (any organization), attempt it, record the attempt.
-- Returns false when nothing is due.  The row stays locked until the calling
-- procedure commits, so concurrent runs never send the same delivery at once.
CREATE FUNCTION fluxrate_internal.sys_deliver_one(timeout_ms integer DEFAULT 10000) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  d fluxrate_internal.deliveries;
  w fluxrate_internal.webhook_endpoints;
  s fluxrate_internal.smtp_settings;
  v_secret text;
  v_password text;
  v_code integer;
  v_error text;
  v_response text;
  v_mail record;
  v_started timestamptz := clock_timestamp();
  v_now timestamptz := fluxrate.now();
  v_attempt integer;
  v_log_no integer;
  v_delays interval[] := fluxrate_internal.retry_delays();
  v_final boolean := false;
BEGIN
  SELECT * INTO d FROM fluxrate_internal.deliveries x
   WHERE x.status = 'PENDING' AND x.next_attempt_at <= v_now
   ORDER BY x.next_attempt_at, x.id
   LIMIT 1
   FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM set_config('fluxrate.current_org', d.org_id::text, true);
  -- attempts counts toward the retry schedule (a manual retry starts it again);
  -- the log numbers every attempt ever made
  v_attempt := d.attempts + 1;
  SELECT coalesce(max(a.attempt), 0) + 1 INTO v_log_no
    FROM fluxrate_internal.delivery_attempts a WHERE a.org_id = d.org_id AND a.delivery_id = d.id;

  -- anything unexpected while preparing or recording this delivery fails this
  -- delivery only, never the run: one bad row must not block every other one
  BEGIN
  IF d.channel = 'webhook' THEN
    SELECT * INTO w FROM fluxrate_internal.webhook_endpoints x WHERE x.org_id = d.org_id AND x.id = d.endpoint_id;
    v_secret := fluxrate_internal.unseal(w.secret_enc, 'webhook:' || w.org_id || ':' || w.id);
    IF w.status <> 'ACTIVE' THEN
      v_error := 'the endpoint is disabled';
      v_final := true;
    ELSIF v_secret IS NULL THEN
      v_error := 'the signing secret cannot be decrypted (server secret changed?)';
      v_final := true;
    ELSE
      SELECT r.status_code, r.error, r.response INTO v_code, v_error, v_response
        FROM fluxrate_internal.http_post(w.url,
               ARRAY['Content-Type: application/json',
                     'X-Fluxrate-Event: ' || d.event,
                     'X-Fluxrate-Event-Id: ' || d.event_id,
                     'X-Fluxrate-Delivery-Id: ' || d.id,
                     'X-Fluxrate-Signature: ' || fluxrate_internal.hmac_sha256_hex(v_secret, d.body)],
               d.body, timeout_ms) r;
    END IF;
  ELSE
    SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = d.org_id;
    IF NOT FOUND THEN
      v_error := 'smtp is not configured';
      v_final := true;
    ELSE
      IF s.password_enc IS NOT NULL THEN
        v_password := fluxrate_internal.unseal(s.password_enc, 'smtp:' || s.org_id);
      END IF;
      IF s.password_enc IS NOT NULL AND v_password IS NULL THEN
        v_error := 'the smtp password cannot be decrypted (server secret changed?)';
        v_final := true;
      ELSE
        v_mail := fluxrate_internal.invoice_email(d.org_id, d.invoice_id, d.id, d.recipient);
        SELECT r.status_code, r.error INTO v_code, v_error
          FROM fluxrate_internal.smtp_send(s.host, s.port, s.security, s.username, v_password,
                                           s.from_email, d.recipient, v_mail.message, timeout_ms) r;
      END IF;
    END IF;
  END IF;

  EXCEPTION WHEN OTHERS THEN
    v_error := 'internal error: ' || SQLERRM;
    v_code := NULL;
    v_final := true;
  END;

  INSERT INTO fluxrate_internal.delivery_attempts (org_id, delivery_id, attempt, attempted_at, status_code,
      error, response, duration_ms)
  VALUES (d.org_id, d.id, v_log_no, v_now, v_code, v_error, v_response,
          (extract(epoch FROM clock_timestamp() - v_started) * 1000)::integer);
  UPDATE fluxrate_internal.deliveries x SET
      attempts = v_attempt,
      last_status_code = v_code,
      last_error = v_error,
      status = CASE WHEN v_error IS NULL THEN 'SENT'
                    WHEN v_final OR v_attempt > array_length(v_delays, 1) THEN 'FAILED'
                    ELSE 'PENDING' END,
      sent_at = CASE WHEN v_error IS NULL THEN v_now END,
      next_attempt_at = CASE WHEN v_error IS NOT NULL AND NOT v_final AND v_attempt <= array_length(v_delays, 1)
                             THEN v_now + v_delays[v_attempt] END,
      updated_at = v_now
   WHERE x.org_id = d.org_id AND x.id = d.id;
  RETURN true;
END
$$;

-- The delivery job.  An invoker procedure (a SECURITY DEFINER procedure may not
-- COMMIT): each delivery commits on its own, so one slow peer delays but never
-- undoes the others, and a killed run loses at most the attempt in flight.
CREATE PROCEDURE fluxrate.deliver_pending(max_deliveries integer DEFAULT 1000, timeout_ms integer DEFAULT 10000)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n integer := 0;
BEGIN
  LOOP
    EXIT WHEN n >= max_deliveries OR NOT fluxrate_internal.sys_deliver_one(timeout_ms);
    n := n + 1;
    COMMIT;
  END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_deliver_one(integer) TO fluxrate_app;

-- SMTP settings -------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.smtp_json(s fluxrate_internal.smtp_settings) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('host', s.host, 'port', s.port, 'security', s.security,
    'username', s.username, 'has_password', s.password_enc IS NOT NULL, 'from_email', s.from_email,
    'from_name', s.from_name, 'created_at', s.created_at, 'updated_at', s.updated_at)
$$;

-- Set (create or replace) the organization's SMTP settings.  The password is
-- sealed at once and never returned; password => NULL keeps the stored one
-- (so the other settings can be edited without re-typing it), '' removes it.
CREATE FUNCTION fluxrate.set_smtp_settings(host text DEFAULT NULL, port integer DEFAULT NULL, from_email text DEFAULT NULL,
    username text DEFAULT NULL, password text DEFAULT NULL, security text DEFAULT 'starttls',
    from_name text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_now timestamptz := fluxrate.now();
  s fluxrate_internal.smtp_settings;
BEGIN
  PERFORM fluxrate_internal.required(set_smtp_settings.host, 'host');
  PERFORM fluxrate_internal.required(set_smtp_settings.port, 'port');
  PERFORM fluxrate_internal.required(set_smtp_settings.from_email, 'from_email');
  PERFORM fluxrate_internal.one_of(lower(set_smtp_settings.security), 'security', ARRAY['starttls', 'tls', 'none']);
  IF set_smtp_settings.port NOT BETWEEN 1 AND 65535 THEN
    PERFORM fluxrate_internal.fail('PT422', 'port must be between 1 and 65535',
      format('port was %s.', set_smtp_settings.port), 'Submission is usually 587 (starttls) or 465 (tls).');
  END IF;
  IF set_smtp_settings.host !~ '^[A-Za-z0-9.:\[\]-]{1,253}$' THEN
    PERFORM fluxrate_internal.fail('PT422', 'host is not a host name or address',
      format('host was "%s".', set_smtp_settings.host), 'Send a host name such as smtp.example.com, without scheme or port.');
  END IF;
  PERFORM fluxrate_internal.check_email(set_smtp_settings.from_email);
  SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = v_org FOR UPDATE;
  INSERT INTO fluxrate_internal.smtp_settings AS x (org_id, host, port, security, username, password_enc,
      from_email, from_name, created_at, updated_at)
  VALUES (v_org, set_smtp_settings.host, set_smtp_settings.port, lower(coalesce(set_smtp_settings.security, 'starttls')),
          nullif(set_smtp_settings.username, ''),
          CASE WHEN set_smtp_settings.password IS NULL THEN s.password_enc
               WHEN set_smtp_settings.password = '' THEN NULL
               ELSE fluxrate_internal.seal(set_smtp_settings.password, 'smtp:' || v_org) END,
          set_smtp_settings.from_email, set_smtp_settings.from_name, v_now, v_now)
  ON CONFLICT (org_id) DO UPDATE SET host = excluded.host, port = excluded.port, security = excluded.security,
      username = excluded.username, password_enc = excluded.password_enc, from_email = excluded.from_email,
      from_name = excluded.from_name, updated_at = excluded.updated_at
  RETURNING * INTO s;
  RETURN fluxrate_internal.smtp_json(s);
END
$$;

CREATE FUNCTION fluxrate.get_smtp_settings() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  s fluxrate_internal.smtp_settings;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = v_org;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'smtp is not configured', hint => 'Call fluxrate.set_smtp_settings().');
  END IF;
  RETURN fluxrate_internal.smtp_json(s);
END
$$;

CREATE FUNCTION fluxrate.delete_smtp_settings() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  DELETE FROM fluxrate_internal.smtp_settings x WHERE x.org_id = v_org;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'smtp is not configured');
  END IF;
  RETURN jsonb_build_object('deleted', true);
END
$$;

-- Webhook endpoints -----------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.webhook_json(w fluxrate_internal.webhook_endpoints) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', w.id, 'url', w.url, 'event_types', pg_catalog.to_jsonb(w.event_types),
    'description', w.description, 'secret_prefix', w.secret_prefix, 'status', w.status,
    'created_at', w.created_at, 'updated_at', w.updated_at)
$$;

CREATE FUNCTION fluxrate_internal.check_webhook(url text, event_types text[]) RETURNS void
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  t text;
BEGIN
  IF url IS NOT NULL AND (url !~ '^https?://[^\s/?#]+' OR length(url) > 2000 OR url ~ '\s') THEN
    PERFORM fluxrate_internal.fail('PT422', 'url must be an http or https URL',
      format('url was "%s".', left(url, 200)), 'Send a URL such as https://example.com/webhooks/fluxrate.');
  END IF;
  FOREACH t IN ARRAY coalesce(event_types, '{}') LOOP
    PERFORM fluxrate_internal.one_of(t, 'event_types', fluxrate_internal.webhook_event_types());
  END LOOP;
END
$$;

-- The signing secret ("whsec_" + 43 base62 characters from libsodium) is
-- returned here, once; only a sealed copy is stored.
CREATE FUNCTION fluxrate.create_webhook_endpoint(url text DEFAULT NULL, event_types text[] DEFAULT '{}', description text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_now timestamptz := fluxrate.now();
  v_id uuid := gen_random_uuid();
  v_secret text := 'whsec_' || fluxrate_internal.random_token(43);
  w fluxrate_internal.webhook_endpoints;
BEGIN
  PERFORM fluxrate_internal.required(create_webhook_endpoint.url, 'url');
  PERFORM fluxrate_internal.check_webhook(create_webhook_endpoint.url, create_webhook_endpoint.event_types);
  INSERT INTO fluxrate_internal.webhook_endpoints (org_id, id, url, event_types, description, secret_enc,
      secret_prefix, created_at, updated_at)
  VALUES (v_org, v_id, create_webhook_endpoint.url, coalesce(create_webhook_endpoint.event_types, '{}'),
          create_webhook_endpoint.description, fluxrate_internal.seal(v_secret, 'webhook:' || v_org || ':' || v_id),
          left(v_secret, 10), v_now, v_now)
  RETURNING * INTO w;
  PERFORM set_config('response.status', '201', true);
  RETURN fluxrate_internal.webhook_json(w) || jsonb_build_object('secret', v_secret);
END
$$;

CREATE FUNCTION fluxrate.list_webhook_endpoints() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.webhook_json(w) ORDER BY w.created_at, w.id)
                     FROM fluxrate_internal.webhook_endpoints w WHERE w.org_id = v_org), '[]'::jsonb);
END
$$;

CREATE FUNCTION fluxrate_internal.load_webhook(org_id uuid, endpoint_id uuid) RETURNS fluxrate_internal.webhook_endpoints
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  w fluxrate_internal.webhook_endpoints;
BEGIN
  PERFORM fluxrate_internal.required(endpoint_id, 'endpoint_id');
  SELECT * INTO w FROM fluxrate_internal.webhook_endpoints x WHERE x.org_id = load_webhook.org_id AND x.id = load_webhook.endpoint_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'webhook endpoint not found',
      format('No webhook endpoint %s in this organization.', endpoint_id));
  END IF;
  RETURN w;
END
$$;

-- Partial update (NULL = unchanged); status ACTIVE or DISABLED.
CREATE FUNCTION fluxrate.update_webhook_endpoint(endpoint_id uuid, url text DEFAULT NULL,
    event_types text[] DEFAULT NULL, description text DEFAULT NULL, status text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  w fluxrate_internal.webhook_endpoints := fluxrate_internal.load_webhook(v_org, update_webhook_endpoint.endpoint_id);
BEGIN
  PERFORM fluxrate_internal.check_webhook(update_webhook_endpoint.url, update_webhook_endpoint.event_types);
  PERFORM fluxrate_internal.one_of(upper(update_webhook_endpoint.status), 'status', ARRAY['ACTIVE', 'DISABLED']);
  UPDATE fluxrate_internal.webhook_endpoints x SET
      url = coalesce(update_webhook_endpoint.url, x.url),
      event_types = coalesce(update_webhook_endpoint.event_types, x.event_types),
      description = coalesce(update_webhook_endpoint.description, x.description),
      status = coalesce(upper(update_webhook_endpoint.status), x.status),
      updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = w.id
  RETURNING * INTO w;
  RETURN fluxrate_internal.webhook_json(w);
END
$$;

-- A new signing secret, returned once; the old one stops signing at once.
CREATE FUNCTION fluxrate.rotate_webhook_secret(endpoint_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  w fluxrate_internal.webhook_endpoints := fluxrate_internal.load_webhook(v_org, rotate_webhook_secret.endpoint_id);
  v_secret text := 'whsec_' || fluxrate_internal.random_token(43);
BEGIN
  UPDATE fluxrate_internal.webhook_endpoints x
     SET secret_enc = fluxrate_internal.seal(v_secret, 'webhook:' || v_org || ':' || w.id),
         secret_prefix = left(v_secret, 10), updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = w.id
  RETURNING * INTO w;
  RETURN fluxrate_internal.webhook_json(w) || jsonb_build_object('secret', v_secret);
END
$$;

-- Deletes the endpoint and its pending and past deliveries.
CREATE FUNCTION fluxrate.delete_webhook_endpoint(endpoint_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  w fluxrate_internal.webhook_endpoints := fluxrate_internal.load_webhook(v_org, delete_webhook_endpoint.endpoint_id);
BEGIN
  DELETE FROM fluxrate_internal.webhook_endpoints x WHERE x.org_id = v_org AND x.id = w.id;
  RETURN jsonb_build_object('id', w.id, 'deleted', true);
END
$$;

-- The delivery log ------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.delivery_json(d fluxrate_internal.deliveries) RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', d.id, 'event_id', d.event_id, 'event', d.event, 'channel', d.channel,
    'endpoint_id', d.endpoint_id, 'invoice_id', d.invoice_id, 'recipient', d.recipient, 'status', d.status,
    'attempts', d.attempts, 'next_attempt_at', d.next_attempt_at, 'last_status_code', d.last_status_code,
    'last_error', d.last_error, 'created_at', d.created_at, 'sent_at', d.sent_at,
    'attempt_log', coalesce((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('attempt', a.attempt,
        'attempted_at', a.attempted_at, 'status_code', a.status_code, 'error', a.error, 'duration_ms', a.duration_ms)
        ORDER BY a.attempt)
      FROM fluxrate_internal.delivery_attempts a WHERE a.org_id = d.org_id AND a.delivery_id = d.id), '[]'::jsonb))
$$;

CREATE FUNCTION fluxrate.list_deliveries(page integer DEFAULT 1, page_size integer DEFAULT 20,
    status text DEFAULT NULL, channel text DEFAULT NULL, endpoint_id uuid DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
BEGIN
  PERFORM fluxrate_internal.check_page(page, page_size);
  PERFORM fluxrate_internal.one_of(upper(list_deliveries.status), 'status', ARRAY['PENDING', 'SENT', 'FAILED']);
  PERFORM fluxrate_internal.one_of(lower(list_deliveries.channel), 'channel', ARRAY['webhook', 'email']);
  RETURN fluxrate_internal.page_envelope(
    (SELECT jsonb_agg(fluxrate_internal.delivery_json(d) ORDER BY d.id) FROM
       (SELECT * FROM fluxrate_internal.deliveries x
         WHERE x.org_id = v_org AND (list_deliveries.status IS NULL OR x.status = upper(list_deliveries.status))
           AND (list_deliveries.channel IS NULL OR x.channel = lower(list_deliveries.channel))
           AND (list_deliveries.endpoint_id IS NULL OR x.endpoint_id = list_deliveries.endpoint_id)
         ORDER BY x.id LIMIT page_size OFFSET (page - 1) * page_size) d),
    page, page_size,
    (SELECT count(*) FROM fluxrate_internal.deliveries x
      WHERE x.org_id = v_org AND (list_deliveries.status IS NULL OR x.status = upper(list_deliveries.status))
        AND (list_deliveries.channel IS NULL OR x.channel = lower(list_deliveries.channel))
        AND (list_deliveries.endpoint_id IS NULL OR x.endpoint_id = list_deliveries.endpoint_id)));
END
$$;

-- A FAILED delivery is tried again at the next run, with a fresh retry schedule.
CREATE FUNCTION fluxrate.retry_delivery(delivery_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  d fluxrate_internal.deliveries;
BEGIN
  SELECT * INTO d FROM fluxrate_internal.deliveries x WHERE x.org_id = v_org AND x.id = retry_delivery.delivery_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'delivery not found', format('No delivery %s in this organization.', delivery_id));
  END IF;
  IF d.status <> 'FAILED' THEN
    PERFORM fluxrate_internal.fail('PT409', format('cannot retry a delivery that is %s', d.status),
      'Only FAILED deliveries are retried by hand; PENDING ones are retried automatically.');
  END IF;
  UPDATE fluxrate_internal.deliveries x SET status = 'PENDING', attempts = 0, next_attempt_at = fluxrate.now(),
         updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = d.id
  RETURNING * INTO d;
  RETURN fluxrate_internal.delivery_json(d);
END
$$;

-- Invoice e-mail on demand and public links ---------------------------------------------

-- POST /invoices/{id}/send-email: finalizes a DRAFT first (finalization stays
-- even when no e-mail can be sent, as Fluxrate does), then queues the e-mail.
-- {success, message, invoice}; success is false when SMTP is not configured.
CREATE FUNCTION fluxrate.send_invoice_email(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, send_invoice_email.invoice_id, true);
  r record;
BEGIN
  IF i.status = 'VOID' THEN
    PERFORM fluxrate_internal.fail('PT409', 'cannot e-mail a VOID invoice', 'A voided invoice is not sent to the customer.');
  END IF;
  IF i.status = 'DRAFT' THEN
    -- finalization queues the automatic e-mail itself (when the switch is on)
    PERFORM fluxrate_internal.finalize_one(v_org, i.id);
    i := fluxrate_internal.load_invoice(v_org, i.id);
  END IF;
  IF EXISTS (SELECT 1 FROM fluxrate_internal.deliveries d
              WHERE d.org_id = v_org AND d.invoice_id = i.id AND d.channel = 'email' AND d.status = 'PENDING') THEN
    RETURN jsonb_build_object('success', true, 'message', 'the invoice e-mail is queued',
                              'invoice', fluxrate_internal.invoice_json(i));
  END IF;
  r := fluxrate_internal.enqueue_invoice_email(v_org, i.id, fluxrate_internal.uuid_v7(), fluxrate.now(), automatic => false);
  RETURN jsonb_build_object('success', r.queued,
                            'message', CASE WHEN r.queued THEN 'the invoice e-mail is queued' ELSE r.reason END,
                            'invoice', fluxrate_internal.invoice_json(i));
END
$$;

-- POST /invoices/{id}/generate-token: a new random token; the previous link stops working.
CREATE FUNCTION fluxrate.generate_invoice_token(invoice_id uuid) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.write');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, generate_invoice_token.invoice_id, true);
  v_base text;
BEGIN
  IF i.status = 'DRAFT' THEN
    PERFORM fluxrate_internal.fail('PT409', 'cannot share a DRAFT invoice',
      'A draft still changes; finalize it first (its link is created then).');
  END IF;
  UPDATE fluxrate_internal.invoices x SET public_token = gen_random_uuid(), updated_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.id = i.id
  RETURNING * INTO i;
  SELECT o.invoice_link_base INTO v_base FROM fluxrate_internal.organizations o WHERE o.org_id = v_org;
  RETURN jsonb_build_object('invoice_id', i.id, 'public_token', i.public_token, 'public_url', v_base || i.public_token);
END
$$;

-- The public view of one invoice, by token, across organizations (hence sys_):
-- what the customer needs to read and pay it, nothing else of the organization.
CREATE FUNCTION fluxrate_internal.sys_public_invoice(token uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  o fluxrate_internal.organizations;
  c fluxrate_internal.customers;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.public_token = sys_public_invoice.token AND x.status <> 'DRAFT';
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT * INTO o FROM fluxrate_internal.organizations x WHERE x.org_id = i.org_id;
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = i.org_id AND x.id = i.customer_id;
  RETURN jsonb_build_object(
    'organization', jsonb_build_object('name', o.name, 'billing_country', o.billing_country, 'billing_state', o.billing_state),
    'customer', jsonb_build_object('name', c.name, 'email', c.email, 'country', c.billing_address_country,
                                'state', c.billing_address_state),
    'invoice_number', i.invoice_number, 'status', i.status, 'currency', i.currency,
    'period_start', i.period_start, 'period_end', i.period_end, 'issue_date', i.issue_date, 'due_date', i.due_date,
    'subtotal', i.subtotal, 'tax', i.tax, 'tax_rate', i.tax_rate, 'total', i.total,
    'amount_due', i.amount_due, 'amount_paid', i.amount_paid,
    'line_items', coalesce((SELECT jsonb_agg(jsonb_build_object('description', l.description, 'quantity', l.quantity,
                     'unit_amount', l.unit_amount, 'line_total', l.line_total) ORDER BY l.position)
                   FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id), '[]'::jsonb));
END
$$;

-- GET /rpc/public_invoice?token=...: no credentials.  An unknown, replaced or
-- malformed token is the same 404, so tokens cannot be probed.
CREATE FUNCTION fluxrate.public_invoice(token text) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v jsonb;
BEGIN
  IF token ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    v := fluxrate_internal.sys_public_invoice(token::uuid);
  END IF;
  IF v IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'invoice not found', 'The link is unknown or was replaced by a newer one.');
  END IF;
  RETURN v;
END
$$;

-- ==== src/sql/80_http.sql ====
-- 80_http.sql: the HTTP layer for PostgREST.  Sign-up, login, refresh, logout,
-- the pre-request hook (X-API-Key header, access_token cookie) and the roles
-- PostgREST switches to.  docs/http.md has the set-up and every route.
--
-- Roles (NOLOGIN; the operator's PostgREST login role, "authenticator", is
-- granted all three):
--   fluxrate_anon    no credentials: sign-up, login, refresh, public invoice links
--   fluxrate_web     a signed-in dashboard user (JWT: Bearer or access_token cookie)
--   fluxrate_apikey  an API key (X-API-Key): ingestion and usage reads, by scope
-- Their EXECUTE grants are in 99_security.sql (after every function exists).
--
-- Tokens: access tokens are HS256 JWTs (src/jwt.c, OpenSSL) signed with the
-- secret PostgREST is configured with (jwt-secret), valid 15 minutes, claims
-- {role, sub, org_id, email, sid, iat, exp}.  Refresh tokens are opaque random
-- strings (libsodium), valid 7 days, stored only as a hash, rotated on every use
-- (a reused one revokes its whole session: theft detection), revoked by logout.

DO $roles$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_anon') THEN
    CREATE ROLE fluxrate_anon NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_web') THEN
    CREATE ROLE fluxrate_web NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'fluxrate_apikey') THEN
    CREATE ROLE fluxrate_apikey NOLOGIN;
  END IF;
END
$roles$;

CREATE TABLE fluxrate_internal.users (
  org_id         uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  id             uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  email          text NOT NULL CHECK (email = pg_catalog.lower(email)),
  password_hash  text NOT NULL,                 -- argon2id (libsodium crypto_pwhash_str)
  created_at     timestamptz NOT NULL,
  last_login_at  timestamptz,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, email)
);
-- login finds the user by e-mail before the organization is known; one account
-- per e-mail address.  (With Citus, users would be a reference table.)
CREATE UNIQUE INDEX users_email_idx ON fluxrate_internal.users (email);

CREATE TABLE fluxrate_internal.refresh_tokens (
  org_id       uuid NOT NULL,
  id           uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  user_id      uuid NOT NULL,
  session_id   uuid NOT NULL,                   -- the "sid" claim of the access tokens
  token_hash   text NOT NULL,                   -- HMAC-SHA256 hex; the token itself is never stored
  created_at   timestamptz NOT NULL,
  expires_at   timestamptz NOT NULL,
  revoked_at   timestamptz,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, user_id) REFERENCES fluxrate_internal.users (org_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX refresh_tokens_hash_idx ON fluxrate_internal.refresh_tokens (token_hash);
CREATE INDEX refresh_tokens_session_idx ON fluxrate_internal.refresh_tokens (org_id, session_id);

-- The JWT secret PostgREST verifies Bearer tokens with (at least 32 characters:
-- PostgREST 13 refuses shorter ones).  Generated here; read it with
-- fluxrate_internal.sys_jwt_secret() (superusers) into postgrest.conf, or set
-- your own with fluxrate_internal.sys_set_jwt_secret().
INSERT INTO fluxrate_internal.server_secrets (name, secret)
VALUES ('jwt_secret', pg_catalog.convert_to(fluxrate_internal.random_token(48), 'UTF8'));

CREATE FUNCTION fluxrate_internal.sys_jwt_secret() RETURNS text
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT convert_from(s.secret, 'UTF8') FROM fluxrate_internal.server_secrets s
   WHERE s.name = 'jwt_secret' ORDER BY s.created_at LIMIT 1
$$;
COMMENT ON FUNCTION fluxrate_internal.sys_jwt_secret() IS
  'the HS256 secret to put in postgrest.conf (jwt-secret); executable by superusers only';

CREATE FUNCTION fluxrate_internal.sys_set_jwt_secret(secret text) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF secret IS NULL OR length(secret) < 32 THEN
    PERFORM fluxrate_internal.fail('PT422', 'the jwt secret must have at least 32 characters',
      hint => 'PostgREST refuses shorter HS256 secrets.');
  END IF;
  DELETE FROM fluxrate_internal.server_secrets s WHERE s.name = 'jwt_secret';
  INSERT INTO fluxrate_internal.server_secrets (name, secret) VALUES ('jwt_secret', convert_to(secret, 'UTF8'));
END
$$;
COMMENT ON FUNCTION fluxrate_internal.sys_set_jwt_secret(text) IS
  'use an existing PostgREST jwt-secret (superusers only); tokens signed with the old one stop working';

CREATE FUNCTION fluxrate_internal.refresh_token_hash(token text) RETURNS text
  LANGUAGE sql IMMUTABLE
  -- tokens carry 256 bits from libsodium: a fast hash is enough, nothing to brute-force
  AS $$ SELECT fluxrate_internal.hmac_sha256_hex('fluxrate refresh token', token) $$;

-- Set-Cookie values (HttpOnly: not readable by scripts; SameSite: not sent on
-- cross-site sub-requests; the refresh token only travels to /rpc/refresh).
CREATE FUNCTION fluxrate_internal.cookie(name text, value text, max_age integer, path text) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT pg_catalog.jsonb_build_object('Set-Cookie', pg_catalog.format('%s=%s; Path=%s; Max-Age=%s; HttpOnly; Secure; SameSite=%s',
          name, value, path, max_age, CASE WHEN name = 'refresh_token' THEN 'Strict' ELSE 'Lax' END)) $$;

-- A new access + refresh token pair for a session (a new one at login; the
-- same session on refresh).  Also sets the two cookies on the response.
CREATE FUNCTION fluxrate_internal.sys_issue_tokens(org_id uuid, user_id uuid, email text, session_id uuid)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_access_ttl constant integer := 900;           -- 15 minutes
  v_refresh_ttl constant integer := 7 * 86400;    -- 7 days
  v_access text;
  v_refresh text := 'rt_' || fluxrate_internal.random_token(43);
BEGIN
  v_access := fluxrate_internal.jwt_sign(jsonb_build_object(
      'role', 'fluxrate_web', 'sub', sys_issue_tokens.user_id, 'org_id', sys_issue_tokens.org_id,
      'email', sys_issue_tokens.email, 'sid', sys_issue_tokens.session_id,
      'iat', floor(extract(epoch FROM v_now))::bigint,
      'exp', floor(extract(epoch FROM v_now))::bigint + v_access_ttl),
    convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'));
  INSERT INTO fluxrate_internal.refresh_tokens (org_id, user_id, session_id, token_hash, created_at, expires_at)
  VALUES (sys_issue_tokens.org_id, sys_issue_tokens.user_id, sys_issue_tokens.session_id,
          fluxrate_internal.refresh_token_hash(v_refresh), v_now, v_now + make_interval(secs => v_refresh_ttl));
  PERFORM set_config('response.headers', jsonb_build_array(
      fluxrate_internal.cookie('access_token', v_access, v_access_ttl, '/'),
      fluxrate_internal.cookie('refresh_token', v_refresh, v_refresh_ttl, '/rpc/refresh'))::text, true);
  RETURN jsonb_build_object('access_token', v_access, 'token_type', 'bearer', 'expires_in', v_access_ttl,
    'refresh_token', v_refresh, 'refresh_expires_in', v_refresh_ttl,
    'user', jsonb_build_object('id', sys_issue_tokens.user_id, 'email', sys_issue_tokens.email),
    'organization_id', sys_issue_tokens.org_id);
END
$$;

-- POST /auth/signup: a user and its organization.
CREATE FUNCTION fluxrate.signup(email text DEFAULT NULL, password text DEFAULT NULL, organization_name text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_email text := lower(btrim(signup.email));
  o fluxrate_internal.organizations;
  u fluxrate_internal.users;
BEGIN
  PERFORM fluxrate_internal.required(v_email, 'email');
  PERFORM fluxrate_internal.required(signup.password, 'password');
  PERFORM fluxrate_internal.required(signup.organization_name, 'organization_name');
  PERFORM fluxrate_internal.check_email(v_email);
  IF length(signup.password) < 8 OR length(signup.password) > 1024 THEN
    PERFORM fluxrate_internal.fail('PT422', 'password must have 8 to 1024 characters',
      format('The password has %s characters.', length(signup.password)));
  END IF;
  IF length(signup.organization_name) > 200 THEN
    PERFORM fluxrate_internal.fail('PT422', 'organization_name must have at most 200 characters');
  END IF;
  o.org_id := gen_random_uuid();
  PERFORM set_config('fluxrate.current_org', o.org_id::text, true);
  INSERT INTO fluxrate_internal.organizations (org_id, name, created_at)
  VALUES (o.org_id, btrim(signup.organization_name), fluxrate.now())
  RETURNING * INTO o;
  BEGIN
    INSERT INTO fluxrate_internal.users (org_id, email, password_hash, created_at)
    VALUES (o.org_id, v_email, fluxrate_internal.password_hash(signup.password), fluxrate.now())
    RETURNING * INTO u;
  EXCEPTION WHEN unique_violation THEN
    PERFORM fluxrate_internal.fail('PT409', 'an account with this e-mail address already exists',
      hint => 'Log in, or sign up with another address.');
  END;
  PERFORM set_config('response.status', '201', true);
  RETURN jsonb_build_object('user', jsonb_build_object('id', u.id, 'email', u.email, 'created_at', u.created_at),
                            'organization', fluxrate_internal.org_json(o));
END
$$;

-- The login itself, across organizations (the e-mail finds the organization).
CREATE FUNCTION fluxrate_internal.sys_login(email text, password text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  u fluxrate_internal.users;
BEGIN
  SELECT * INTO u FROM fluxrate_internal.users x WHERE x.email = lower(btrim(sys_login.email));
  -- an unknown address costs the same argon2id verification as a wrong password,
  -- so response times do not reveal which addresses have accounts
  IF NOT fluxrate_internal.password_verify(
       coalesce(u.password_hash, '$argon2id$v=19$m=65536,t=2,p=1$qfJstOo4cnK2ZW6I3lvazQ$tpwnFYloRfEykJ752kRcP4hW//E+TrOEADP6A5O02OI'),
       sys_login.password) OR u.id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid e-mail or password', hint => 'Check both, or sign up.');
  END IF;
  PERFORM set_config('fluxrate.current_org', u.org_id::text, true);
  UPDATE fluxrate_internal.users x SET last_login_at = fluxrate.now() WHERE x.org_id = u.org_id AND x.id = u.id;
  RETURN fluxrate_internal.sys_issue_tokens(u.org_id, u.id, u.email, gen_random_uuid());
END
$$;

-- POST /auth/login: {access_token, refresh_token, …} in the body and as HttpOnly cookies.
CREATE FUNCTION fluxrate.login(email text DEFAULT NULL, password text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.required(login.email, 'email');
  PERFORM fluxrate_internal.required(login.password, 'password');
  RETURN fluxrate_internal.sys_login(login.email, login.password);
END
$$;

-- POST /auth/refresh: the refresh_token cookie (or the refresh_token field, for
-- clients without cookies) for a new pair.  The presented token is spent; a
-- spent token presented again revokes the whole session.
CREATE FUNCTION fluxrate_internal.sys_refresh(token text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r fluxrate_internal.refresh_tokens;
  u fluxrate_internal.users;
  v_now timestamptz := fluxrate.now();
BEGIN
  SELECT * INTO r FROM fluxrate_internal.refresh_tokens x
   WHERE x.token_hash = fluxrate_internal.refresh_token_hash(sys_refresh.token) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid refresh token', 'The token is unknown.', 'Log in again.');
  END IF;
  PERFORM set_config('fluxrate.current_org', r.org_id::text, true);
  IF r.revoked_at IS NOT NULL THEN
    -- reuse of a spent token: someone else may hold the session; end it
    UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = coalesce(x.revoked_at, v_now)
     WHERE x.org_id = r.org_id AND x.session_id = r.session_id;
    RETURN jsonb_build_object('reused', true);
  END IF;
  IF r.expires_at <= v_now THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid refresh token', 'The token has expired.', 'Log in again.');
  END IF;
  UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = v_now WHERE x.org_id = r.org_id AND x.id = r.id;
  SELECT * INTO u FROM fluxrate_internal.users x WHERE x.org_id = r.org_id AND x.id = r.user_id;
  RETURN fluxrate_internal.sys_issue_tokens(u.org_id, u.id, u.email, r.session_id);
END
$$;

CREATE FUNCTION fluxrate.refresh(refresh_token text DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_token text := coalesce(refresh.refresh_token,
    nullif(current_setting('request.cookies', true), '')::jsonb->>'refresh_token');
  v jsonb;
BEGIN
  IF v_token IS NULL OR v_token = '' THEN
    PERFORM fluxrate_internal.fail('PT401', 'no refresh token', 'Neither a refresh_token cookie nor a refresh_token field was sent.',
      'Log in again.');
  END IF;
  v := fluxrate_internal.sys_refresh(v_token);
  IF v ? 'reused' THEN
    -- the revocation above must commit, so this is a response, not an error
    PERFORM set_config('response.status', '401', true);
    RETURN jsonb_build_object('code', 'PT401', 'message', 'invalid refresh token',
      'details', 'The token was already used; the session is ended.', 'hint', 'Log in again.');
  END IF;
  RETURN v;
END
$$;

-- POST /auth/logout: ends the caller's session (its refresh tokens stop
-- working at once; access tokens expire within 15 minutes) and clears the cookies.
CREATE FUNCTION fluxrate.logout() RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_claims jsonb := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
  n integer;
BEGIN
  IF v_claims IS NULL OR v_claims->>'sid' IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'not signed in', 'Logout ends a session started by login.');
  END IF;
  UPDATE fluxrate_internal.refresh_tokens x SET revoked_at = fluxrate.now()
   WHERE x.org_id = v_org AND x.session_id = (v_claims->>'sid')::uuid AND x.revoked_at IS NULL;
  GET DIAGNOSTICS n = ROW_COUNT;
  PERFORM set_config('response.headers', jsonb_build_array(
      fluxrate_internal.cookie('access_token', '', 0, '/'),
      fluxrate_internal.cookie('refresh_token', '', 0, '/rpc/refresh'))::text, true);
  RETURN jsonb_build_object('logged_out', true, 'revoked_refresh_tokens', n);
END
$$;

-- Claims for a verified API key (X-API-Key).  PT401 when unknown or revoked.
CREATE FUNCTION fluxrate_internal.sys_api_key_claims(key text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k record;
BEGIN
  SELECT * INTO k FROM fluxrate_internal.sys_verify_api_key(sys_api_key_claims.key);
  RETURN jsonb_build_object('role', 'fluxrate_apikey', 'org_id', k.org_id, 'key_id', k.key_id,
                            'scopes', to_jsonb(k.scopes));
END
$$;

-- Claims of a valid access token from the access_token cookie.  PT401 otherwise.
CREATE FUNCTION fluxrate_internal.sys_access_token_claims(token text) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  c jsonb := fluxrate_internal.jwt_verify(token, convert_to(fluxrate_internal.sys_jwt_secret(), 'UTF8'));
BEGIN
  IF c->>'role' IS DISTINCT FROM 'fluxrate_web' OR c->>'org_id' IS NULL THEN
    PERFORM fluxrate_internal.fail('PT401', 'invalid token', 'The token is not a fluxrate session token.', 'Log in again.');
  END IF;
  RETURN c;
END
$$;

-- db-pre-request = "fluxrate.pre_request".  Runs as the role PostgREST chose
-- (anon when no Bearer token was sent), before the function of the request.
-- SECURITY INVOKER on purpose: switching role is refused inside SECURITY
-- DEFINER functions; the verification itself happens in the sys_ functions.
--   X-API-Key: <key>          -> role fluxrate_apikey, claims {org_id, key_id, scopes}
--   Cookie: access_token=<jwt> -> role fluxrate_web, the token's claims
-- A Bearer token PostgREST already verified takes precedence over both.
CREATE FUNCTION fluxrate.pre_request() RETURNS void
  LANGUAGE plpgsql VOLATILE
  AS $$
DECLARE
  v_headers jsonb := coalesce(nullif(pg_catalog.current_setting('request.headers', true), '')::jsonb, '{}');
  v_cookies jsonb := coalesce(nullif(pg_catalog.current_setting('request.cookies', true), '')::jsonb, '{}');
  v_claims jsonb := coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}');
  v_method text := coalesce(pg_catalog.current_setting('request.method', true), '');
  v_new jsonb;
  v_origin_host text;
BEGIN
  IF v_claims OPERATOR(pg_catalog.?) 'org_id' THEN
    RETURN;
  END IF;
  IF v_headers OPERATOR(pg_catalog.?) 'x-api-key' THEN
    v_new := fluxrate_internal.sys_api_key_claims(v_headers OPERATOR(pg_catalog.->>) 'x-api-key');
  ELSIF v_cookies OPERATOR(pg_catalog.?) 'access_token' THEN
    v_new := fluxrate_internal.sys_access_token_claims(v_cookies OPERATOR(pg_catalog.->>) 'access_token');
    -- cookies travel with cross-site requests: a browser's write request from
    -- another origin is refused (SameSite=Lax already stops most of them)
    IF v_method NOT IN ('GET', 'HEAD', 'OPTIONS') AND v_headers OPERATOR(pg_catalog.?) 'origin' THEN
      v_origin_host := pg_catalog.split_part(pg_catalog.split_part(v_headers OPERATOR(pg_catalog.->>) 'origin', '://', 2), '/', 1);
      IF v_origin_host IS DISTINCT FROM (v_headers OPERATOR(pg_catalog.->>) 'host') THEN
        RAISE EXCEPTION USING ERRCODE = 'PT403', MESSAGE = 'cross-site request refused',
          DETAIL = pg_catalog.format('Origin %s does not match host %s.', v_headers OPERATOR(pg_catalog.->>) 'origin',
                                     coalesce(v_headers OPERATOR(pg_catalog.->>) 'host', '(none)')),
          HINT = 'Send the request from the dashboard''s own origin, or use an Authorization header.';
      END IF;
    END IF;
  END IF;
  IF v_new IS NOT NULL THEN
    PERFORM pg_catalog.set_config('request.jwt.claims', v_new::text, true);
    PERFORM pg_catalog.set_config('role', v_new OPERATOR(pg_catalog.->>) 'role', true);
  END IF;
END
$$;

-- ==== src/sql/99_security.sql ====
-- 99_security.sql: runs last.  Ownership, row-level security and privileges
-- for everything the parts above created, so no part can forget them.

DO $security$
DECLARE
  r record;
BEGIN
  -- Tables: owned by fluxrate_owner, RLS enabled and FORCED (the owner is
  -- subject to it too).  Tenant tables get one policy: the row's org_id is the
  -- organization the running API call resolved.  fluxrate_system bypasses RLS
  -- (its few cross-organization functions check org_id themselves).
  FOR r IN
    SELECT c.oid::regclass AS tbl,
           EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                   WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) 'org_id'
                     AND NOT a.attisdropped) AS has_org
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'fluxrate_internal'::regnamespace
       AND c.relkind IN ('r', 'p')
  LOOP
    EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO fluxrate_owner', r.tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', r.tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', r.tbl);
    IF r.has_org THEN
      EXECUTE pg_catalog.format(
        'CREATE POLICY tenant_wall ON %s FOR ALL TO fluxrate_owner '
        'USING (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id()) '
        'WITH CHECK (org_id OPERATOR(pg_catalog.=) fluxrate_internal.current_org_id())', r.tbl);
    END IF;
    EXECUTE pg_catalog.format('GRANT ALL ON TABLE %s TO fluxrate_system', r.tbl);
    -- the data is the customer's, not the extension's: pg_dump must include it.
    -- Not the usage rollups: derived from the events, and counted by transaction
    -- ids that mean nothing in the cluster a dump is restored into (the restored
    -- database starts without a state and rebuilds them from the events).
    IF r.tbl OPERATOR(pg_catalog.<>) 'fluxrate_internal.usage_rollups'::regclass
       AND r.tbl OPERATOR(pg_catalog.<>) 'fluxrate_internal.usage_rollup_state'::regclass THEN
      PERFORM pg_catalog.pg_extension_config_dump(r.tbl, '');
    END IF;
  END LOOP;
  -- the rollup state (no org_id: one row for the cluster, like server_secrets)
  -- is read by the tenant-confined readers of the rollups: a snapshot, nothing else
  CREATE POLICY rollup_state_read ON fluxrate_internal.usage_rollup_state FOR SELECT TO fluxrate_owner USING (true);

  FOR r IN
    SELECT c.oid::regclass AS seq FROM pg_catalog.pg_class c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'fluxrate_internal'::regnamespace AND c.relkind OPERATOR(pg_catalog.=) 'S'
  LOOP
    EXECUTE pg_catalog.format('ALTER SEQUENCE %s OWNER TO fluxrate_owner', r.seq);
    EXECUTE pg_catalog.format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO fluxrate_system', r.seq);
  END LOOP;

  -- Functions: SECURITY DEFINER ones run as their owner.  Internal functions
  -- named sys_* work across organizations and are owned by fluxrate_system;
  -- everything else by fluxrate_owner, which row-level security confines to
  -- one organization.  Every definer function must pin search_path (tested).
  FOR r IN
    SELECT p.oid::regprocedure AS fn, p.prokind, p.proname
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
  LOOP
    EXECUTE pg_catalog.format('ALTER %s %s OWNER TO %s',
      CASE r.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, r.fn,
      CASE WHEN r.proname LIKE 'sys\_%' THEN 'fluxrate_system' ELSE 'fluxrate_owner' END);
    EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM PUBLIC',
      CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.fn);
  END LOOP;
END
$security$;

ALTER SCHEMA fluxrate_internal OWNER TO fluxrate_owner;
REVOKE ALL ON SCHEMA fluxrate_internal FROM PUBLIC;
GRANT USAGE ON SCHEMA fluxrate_internal TO fluxrate_system;
GRANT USAGE ON SCHEMA fluxrate TO fluxrate_owner, fluxrate_system, fluxrate_app;
-- fluxrate_owner calls a few sys_* helpers (API-key lookup) and vice versa
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate_internal TO fluxrate_owner, fluxrate_system;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_owner, fluxrate_system;
-- The trusted application role may call the whole public API.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_app;
GRANT EXECUTE ON ALL PROCEDURES IN SCHEMA fluxrate TO fluxrate_app;

-- The PostgREST roles (80_http.sql), least privilege.  A role calling a function
-- it may not execute gets 42501, which PostgREST answers 401 for the anonymous
-- role and 403 for the others.
GRANT USAGE ON SCHEMA fluxrate, fluxrate_internal TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- what the pre-request needs, whoever the caller is
GRANT EXECUTE ON FUNCTION fluxrate.pre_request(), fluxrate_internal.sys_api_key_claims(text),
  fluxrate_internal.sys_access_token_claims(text) TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- no credentials: sign up, log in, refresh, read a public invoice link
GRANT EXECUTE ON FUNCTION fluxrate.signup(text, text, text), fluxrate.login(text, text), fluxrate.refresh(text),
  fluxrate.public_invoice(text) TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
-- API keys: ingestion and usage reads; each function still checks the key's scopes
GRANT EXECUTE ON FUNCTION fluxrate.track(text, text, numeric, timestamptz, text, jsonb, text, jsonb, text),
  fluxrate.track_batch(jsonb, text), fluxrate.get_customer_usage(uuid), fluxrate.get_subscription_usage(uuid),
  fluxrate.check_entitlement(text, text), fluxrate.list_meter_events(uuid, integer, integer),
  fluxrate.get_meter_usage(uuid, timestamptz, timestamptz, text, uuid), fluxrate.get_meter_stats(uuid)
  TO fluxrate_apikey;
-- signed-in users: the whole management API of their organization, but not the
-- trusted-role doors (creating organizations, acting for one) nor the jobs
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fluxrate TO fluxrate_web;
REVOKE EXECUTE ON FUNCTION fluxrate.create_organization(text, text, text, integer, interval),
  fluxrate.act_as(uuid, boolean), fluxrate.schedule_jobs(), fluxrate.unschedule_jobs(),
  fluxrate.refresh_usage_rollups(boolean) FROM fluxrate_web;
-- The closer keeps a run's usage snapshot in two temporary tables of its
-- session (sys_close_prepare), created as fluxrate_system: granted here so that
-- a database that revokes TEMPORARY from PUBLIC still closes its periods.
DO $temp$
BEGIN
  EXECUTE pg_catalog.format('GRANT TEMPORARY ON DATABASE %I TO fluxrate_system', pg_catalog.current_database());
END
$temp$;
