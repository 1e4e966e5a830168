-- 21_customers.sql: customers (create, read, list, update, delete).  Same
-- conventions as 20_catalog.sql: the organization resolved once, parameter
-- names as Fluxrate's JSON keys.

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
  -- identifiers are 1 to 255 characters (docs/security.md, "Ingestion bounds"):
  -- a 3 KB external_id reached the unique index and failed with 54000
  IF pg_catalog.length(create_customer.external_id) > 255 THEN
    PERFORM fluxrate_internal.fail('22023', 'external_id must be 1 to 255 characters',
      pg_catalog.format('external_id has %s characters.', pg_catalog.length(create_customer.external_id)),
      'Use a shorter identifier of the customer in your system.');
  END IF;
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

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_customer(customer_id uuid) RETURNS json
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
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.customer_json(c));
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
  -- identifiers are 1 to 255 characters (docs/security.md, "Ingestion bounds"):
  -- a 3 KB external_id reached the unique index and failed with 54000
  IF pg_catalog.length(update_customer.external_id) > 255 THEN
    PERFORM fluxrate_internal.fail('22023', 'external_id must be 1 to 255 characters',
      pg_catalog.format('external_id has %s characters.', pg_catalog.length(update_customer.external_id)),
      'Use a shorter identifier of the customer in your system.');
  END IF;
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
  v_ext text;
BEGIN
  SELECT x.external_id INTO v_ext FROM fluxrate_internal.customers x
   WHERE x.org_id = v_org AND x.id = delete_customer.customer_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  -- wait for the open tracks of this customer, and hold off new ones until
  -- commit (src/ingest_lock.c): the statements below see every event tracked
  -- before, and a track after sees the customer gone
  PERFORM fluxrate_internal.lock_customer_events(v_org, v_ext);
  DELETE FROM fluxrate_internal.customers x WHERE x.org_id = v_org AND x.id = delete_customer.customer_id;
  -- the events and their rollups together, never interleaved with a rollup
  -- refresh (one that had read these events could write their rollups back)
  PERFORM pg_advisory_xact_lock_shared(fluxrate_internal.rollup_lock_key());
  -- (and their idempotency keys: 32_partitions.sql)
  WITH gone AS (
    DELETE FROM fluxrate_internal.usage_events e WHERE e.org_id = v_org AND e.customer_id = delete_customer.customer_id
    RETURNING e.idempotency_key)
  DELETE FROM fluxrate_internal.usage_event_keys k USING gone
   WHERE k.org_id = v_org AND k.idempotency_key = gone.idempotency_key;
  DELETE FROM fluxrate_internal.usage_rollups r WHERE r.org_id = v_org AND r.customer_id = delete_customer.customer_id;
  -- its outbox events and their deliveries, sent or not (its invoices, and the
  -- deliveries that name them, went with the customer row: ON DELETE CASCADE).
  -- (In REPEATABLE READ a track that committed after this transaction's
  -- snapshot is not seen; the next rollup refresh deletes its event:
  -- sys_rollup_add, docs/security.md "Deletion".)
  WITH ob AS (
    DELETE FROM fluxrate_internal.outbox o
     WHERE o.org_id = v_org AND o.payload->'data'->>'customer_id' = delete_customer.customer_id::text
    RETURNING o.id)
  DELETE FROM fluxrate_internal.deliveries d USING ob WHERE d.org_id = v_org AND d.event_id = ob.id;
  PERFORM set_config('response.status', '204', true);
  RETURN jsonb_build_object('id', customer_id, 'deleted', true);
END
$$;
