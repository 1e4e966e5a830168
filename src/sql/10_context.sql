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
-- It never returns; plpgsql_check cannot know that, and reports "control
-- reached end of function without RETURN" for each function whose EXCEPTION
-- handler ends in fail() (sql/lint.sql names them).
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

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_organization() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  o fluxrate_internal.organizations;
BEGIN
  SELECT * INTO o FROM fluxrate_internal.organizations WHERE org_id = v_org;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.org_json(o));
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

-- Delete the calling organization and everything it owns (docs/security.md,
-- "Deletion"): its usage events, rollups, outbox, deliveries and every other
-- row, in one transaction.  org_id must be the calling organization's own id
-- (another's is "not found", as everywhere).  Its API keys, users and refresh
-- tokens go with it, so its credentials stop working at once: a key is looked
-- up by its row, and the pre-request refuses an access token whose user no
-- longer exists.  A track that raced the deletion is waited for, or waits and
-- then finds the key gone (src/ingest_lock.c).
CREATE FUNCTION fluxrate.delete_organization(org_id uuid DEFAULT NULL) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('admin');
  v_events bigint;
BEGIN
  PERFORM fluxrate_internal.required(delete_organization.org_id, 'org_id');
  IF delete_organization.org_id IS DISTINCT FROM v_org THEN
    PERFORM fluxrate_internal.fail('PT404', 'organization not found',
      pg_catalog.format('No organization %s is yours to delete.', delete_organization.org_id),
      'Send the id of the organization you are signed in to (get_organization).');
  END IF;
  PERFORM 1 FROM fluxrate_internal.organizations o WHERE o.org_id = v_org FOR UPDATE;
  -- wait for every open track of the organization and hold off new ones until
  -- commit (src/ingest_lock.c): no event is left behind
  PERFORM fluxrate_internal.lock_org_events(v_org);
  -- as delete_customer: never interleaved with a rollup refresh
  PERFORM pg_advisory_xact_lock_shared(fluxrate_internal.rollup_lock_key());
  DELETE FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org;
  GET DIAGNOSTICS v_events = ROW_COUNT;
  DELETE FROM fluxrate_internal.usage_event_keys k WHERE k.org_id = v_org;
  DELETE FROM fluxrate_internal.usage_rollups r WHERE r.org_id = v_org;
  DELETE FROM fluxrate_internal.rollup_errors r WHERE r.org_id = v_org;
  DELETE FROM fluxrate_internal.outbox o WHERE o.org_id = v_org;
  -- everything else references the organization ON DELETE CASCADE
  DELETE FROM fluxrate_internal.organizations o WHERE o.org_id = v_org;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', v_org, 'deleted', true, 'usage_events', v_events);
END
$$;

-- Does the user of an access token still exist?  (The pre-request refuses a
-- token of a deleted user or organization at once, not when it expires.)
CREATE FUNCTION fluxrate_internal.sys_token_user_exists(org_id uuid, user_id uuid) RETURNS boolean
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
  SELECT EXISTS (SELECT 1 FROM fluxrate_internal.users u
                  WHERE u.org_id OPERATOR(pg_catalog.=) sys_token_user_exists.org_id
                    AND u.id OPERATOR(pg_catalog.=) sys_token_user_exists.user_id)
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
