-- 71_delivery_api.sql: the API of delivery: SMTP settings, webhook endpoints,
-- the delivery log and retries, the invoice e-mail on demand and public
-- invoice links.  The flow, the tables and the sending are in 70_delivery.sql.

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

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_smtp_settings() RETURNS json
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
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.smtp_json(s));
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
  -- libcurl's reading of it: no user name or password (22023), a URL it parses
  IF url IS NOT NULL THEN
    PERFORM fluxrate_internal.check_webhook_url(url);
  END IF;
  FOREACH t IN ARRAY coalesce(event_types, '{}') LOOP
    PERFORM fluxrate_internal.one_of(t, 'event_types', fluxrate_internal.webhook_event_types());
  END LOOP;
END
$$;

-- How many webhook endpoints one organization may have: each one multiplies
-- every event into a delivery, so the cap bounds an event's fan-out.
CREATE FUNCTION fluxrate_internal.max_webhook_endpoints() RETURNS integer
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT 20 $$;

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
  -- the cap, counted under the organization's row lock so two concurrent
  -- creations cannot both take the last place
  PERFORM 1 FROM fluxrate_internal.organizations o WHERE o.org_id = v_org FOR UPDATE;
  IF (SELECT count(*) FROM fluxrate_internal.webhook_endpoints x WHERE x.org_id = v_org)
     >= fluxrate_internal.max_webhook_endpoints() THEN
    PERFORM fluxrate_internal.fail('54000',
      format('an organization has at most %s webhook endpoints', fluxrate_internal.max_webhook_endpoints()),
      'Every endpoint receives a copy of every event it subscribes to.',
      'Delete an endpoint you no longer use, or subscribe one endpoint to more event types.');
  END IF;
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
        'attempted_at', a.attempted_at, 'status_code', a.status_code, 'error', a.error)
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
  PERFORM fluxrate_internal.one_of(upper(list_deliveries.status), 'status', ARRAY['PENDING', 'SENT', 'FAILED', 'SKIPPED']);
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
