-- 70_delivery.sql: invoice e-mails over SMTP, signed webhooks, public invoice links:
-- the primitives, the tables, the fan-out, the e-mail and the sending job.  The
-- API of delivery (SMTP settings, webhook endpoints, the delivery log, e-mail on
-- demand, public links) is in 71_delivery_api.sql (one part of 1,017 lines until
-- issue 20).
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
  -- SKIPPED: an invoice e-mail that could not even be queued (no SMTP, no address), kept so it is seen
  status            text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SENT', 'FAILED', 'SKIPPED')),
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
-- a credit note's e-mail (57_credit_notes.sql): invoice_id is its invoice
ALTER TABLE fluxrate_internal.deliveries ADD COLUMN credit_note_id uuid;
ALTER TABLE fluxrate_internal.deliveries ADD CONSTRAINT deliveries_credit_note_fkey
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE;
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
                     'subscription.canceled', 'subscription.plan_changed', 'coupon.redeemed', 'credit_note.created',
                     'credit_grant.expired', 'wallet.balance_low']::text[] $$;

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
  -- a credit note is e-mailed like an invoice (57_credit_notes.sql)
  IF fan_out.event = 'credit_note.created' THEN
    PERFORM fluxrate_internal.enqueue_credit_note_email(fan_out.org_id, (fan_out.data->>'credit_note_id')::uuid,
      fan_out.event_id, fan_out.at);
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
  -- the finalization's e-mail that cannot go out is not silence: a SKIPPED row
  -- with the reason, in the delivery log and health() (turned off is a choice, not a surprise)
  IF automatic AND NOT queued AND v_auto THEN
    INSERT INTO fluxrate_internal.deliveries (org_id, id, event_id, event, channel, invoice_id, recipient,
        status, last_error, created_at, updated_at)
    VALUES (enqueue_invoice_email.org_id, fluxrate_internal.uuid_v7(), enqueue_invoice_email.event_id,
            'invoice.email', 'email', enqueue_invoice_email.invoice_id, coalesce(v_email, ''), 'SKIPPED', reason, at, at);
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

-- A display name in an address header (RFC 5322 section 3.4): printable ASCII
-- as a quoted-string (backslash and double quote escaped), so commas, quotes
-- and angle brackets stay part of the name; anything else (non-ASCII, control
-- characters) as one RFC 2047 encoded word.  Control characters (a line
-- break) become spaces first: a name is one line, and no header is injected.
CREATE FUNCTION fluxrate_internal.mime_display_name(t text) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT CASE WHEN n ~ '^[ -~]*$' THEN '"' || replace(replace(n, '\', '\\'), '"', '\"') || '"'
               ELSE fluxrate_internal.mime_header(n) END
          FROM (SELECT pg_catalog.regexp_replace(t, '[[:cntrl:]]', ' ', 'g') AS n) x $$;

CREATE FUNCTION fluxrate_internal.money_text(amount numeric, currency text) RETURNS text
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT pg_catalog.round(amount, fluxrate_internal.currency_exponent(currency))::text || ' ' || currency $$;

-- The whole RFC 5322 message: multipart/mixed of a multipart/alternative
-- (plain text and HTML) and the PDF invoice as an attachment; CRLF line
-- endings, every part in base64 so any name or description travels intact.
-- The three forms come from the one invoice renderer (75_render.sql).
CREATE FUNCTION fluxrate_internal.invoice_email(org_id uuid, invoice_id uuid, delivery_id uuid, recipient text,
    OUT subject text, OUT message text)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p record := fluxrate_internal.invoice_parts(invoice_email.org_id, invoice_email.invoice_id);
  i fluxrate_internal.invoices;
  o fluxrate_internal.organizations;
  c fluxrate_internal.customers;
  s fluxrate_internal.smtp_settings;
  v_greeting text[];
  v_text text;
  v_html text;
  v_boundary text := 'fluxrate-' || replace(delivery_id::text, '-', '');
  v_inner text := 'fluxrate-alt-' || replace(delivery_id::text, '-', '');
  v_file text;
  v_from text;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = invoice_email.org_id AND x.id = invoice_email.invoice_id;
  SELECT * INTO o FROM fluxrate_internal.organizations x WHERE x.org_id = invoice_email.org_id;
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = i.org_id AND x.id = i.customer_id;
  SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = invoice_email.org_id;
  subject := p.subject;
  v_greeting := ARRAY[format('Hello %s,', p.customer_name),
                      format('%s has issued invoice %s; the PDF is attached.', o.name, p.invoice_number)];
  v_text := array_to_string(v_greeting, E'\n\n') || E'\n\n'
            || fluxrate_internal.render_invoice_text(invoice_email.org_id, invoice_email.invoice_id)
            || E'\n-- \n' || o.name;
  v_html := fluxrate_internal.render_invoice_html(invoice_email.org_id, invoice_email.invoice_id, v_greeting);
  -- a file name of safe characters only: the number is INV-YYYY-NNNN
  v_file := 'invoice-' || regexp_replace(p.invoice_number, '[^A-Za-z0-9_-]', '', 'g') || '.pdf';

  v_from := CASE WHEN coalesce(s.from_name, o.name) IS NOT NULL
                 THEN CASE WHEN coalesce(s.from_name, o.name) ~ '^[ -~]*$'
                           THEN '"' || replace(replace(coalesce(s.from_name, o.name), '\', '\\'), '"', '\"') || '"'
                           ELSE fluxrate_internal.mime_header(coalesce(s.from_name, o.name)) END
                      || ' <' || s.from_email || '>'
                 ELSE s.from_email END;
  message := concat_ws(E'\n',
    'From: ' || v_from,
    'To: ' || CASE WHEN c.name IS NOT NULL AND c.name <> recipient
                   THEN fluxrate_internal.mime_display_name(c.name) || ' <' || recipient || '>'
                   ELSE '<' || recipient || '>' END,
    'Subject: ' || fluxrate_internal.mime_header(subject),
    'Date: ' || to_char(fluxrate.now() AT TIME ZONE 'UTC', 'Dy, DD Mon YYYY HH24:MI:SS') || ' +0000',
    -- stable across retries: a receiver that got the message twice can tell
    'Message-ID: <' || delivery_id || '@fluxrate.invalid>',
    'X-Fluxrate-Invoice-Id: ' || i.id,
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="' || v_boundary || '"',
    '',
    '--' || v_boundary,
    'Content-Type: multipart/alternative; boundary="' || v_inner || '"',
    '',
    '--' || v_inner,
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    encode(convert_to(v_text, 'UTF8'), 'base64'),
    '--' || v_inner,
    'Content-Type: text/html; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    encode(convert_to(v_html, 'UTF8'), 'base64'),
    '--' || v_inner || '--',
    '--' || v_boundary,
    'Content-Type: application/pdf; name="' || v_file || '"',
    'Content-Disposition: attachment; filename="' || v_file || '"',
    'Content-Transfer-Encoding: base64',
    '',
    encode(fluxrate_internal.render_invoice_pdf(invoice_email.org_id, invoice_email.invoice_id), 'base64'),
    '--' || v_boundary || '--',
    '');
  message := replace(message, E'\n', E'\r\n');
END
$$;

-- Sending -----------------------------------------------------------------------

CREATE FUNCTION fluxrate_internal.retry_delays() RETURNS interval[]
  LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY['30 seconds', '2 minutes', '10 minutes', '1 hour', '6 hours']::interval[] $$;

-- The transfer engine (src/outbound_engine.c): transfers started by one delivery run
-- and collected as they finish, concurrently, within the outbound policy.
CREATE FUNCTION fluxrate_internal.outbound_start_http(org_id uuid, delivery_id uuid, claimed_at timestamptz, url text, headers text[], body text,
    timeout_ms integer) RETURNS void
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_outbound_start_http';
CREATE FUNCTION fluxrate_internal.outbound_start_smtp(org_id uuid, delivery_id uuid, claimed_at timestamptz, host text, port integer, security text,
    username text, password text, mail_from text, rcpt text, message text, timeout_ms integer) RETURNS void
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_outbound_start_smtp';
CREATE FUNCTION fluxrate_internal.outbound_poll(wait_ms integer)
  RETURNS TABLE (org_id uuid, delivery_id uuid, claimed_at timestamptz, status_code integer, error text, response text, duration_ms integer)
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_outbound_poll';
CREATE FUNCTION fluxrate_internal.outbound_in_flight() RETURNS TABLE (org_id uuid, delivery_id uuid)
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_outbound_in_flight';
CREATE FUNCTION fluxrate_internal.outbound_reset() RETURNS integer
  LANGUAGE C VOLATILE
  AS 'MODULE_PATHNAME', 'fr_outbound_reset';
-- The policy's verdict on a literal address (tests, and operators checking fluxrate.outbound_allow)
CREATE FUNCTION fluxrate_internal.outbound_address_allowed(address text, port integer, channel text) RETURNS boolean
  LANGUAGE C STABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_outbound_address_allowed';
-- The webhook URL as libcurl reads it: http(s), no user name or password
CREATE FUNCTION fluxrate_internal.check_webhook_url(url text) RETURNS void
  LANGUAGE C IMMUTABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_check_webhook_url';

-- Record one finished (or impossible) attempt.  error is the tenant's view
-- (src/outbound_policy.c); final: no retry makes sense (disabled endpoint, secret
-- that does not open, an internal error).  at: when the delivery was claimed,
-- never when its transfer ended, so that nothing the tenant reads (attempted_at,
-- sent_at, next_attempt_at) measures how long the peer took: no timing oracle.
CREATE FUNCTION fluxrate_internal.record_attempt(d fluxrate_internal.deliveries, at timestamptz, code integer,
    error text, response text, duration_ms integer, final boolean) RETURNS void
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := at;
  v_delays interval[] := fluxrate_internal.retry_delays();
  -- attempts counts toward the retry schedule (a manual retry starts it again);
  -- the log numbers every attempt ever made
  v_attempt integer := d.attempts + 1;
  v_log_no integer;
BEGIN
  SELECT coalesce(max(a.attempt), 0) + 1 INTO v_log_no
    FROM fluxrate_internal.delivery_attempts a WHERE a.org_id = d.org_id AND a.delivery_id = d.id;
  INSERT INTO fluxrate_internal.delivery_attempts (org_id, delivery_id, attempt, attempted_at, status_code,
      error, response, duration_ms)
  VALUES (d.org_id, d.id, v_log_no, v_now, code, error, response, coalesce(duration_ms, 0));
  UPDATE fluxrate_internal.deliveries x SET
      attempts = v_attempt,
      last_status_code = code,
      last_error = error,
      status = CASE WHEN error IS NULL THEN 'SENT'
                    WHEN final OR v_attempt > array_length(v_delays, 1) THEN 'FAILED'
                    ELSE 'PENDING' END,
      sent_at = CASE WHEN error IS NULL THEN v_now END,
      next_attempt_at = CASE WHEN error IS NOT NULL AND NOT final AND v_attempt <= array_length(v_delays, 1)
                             THEN v_now + v_delays[v_attempt] END,
      updated_at = v_now
   WHERE x.org_id = d.org_id AND x.id = d.id;
END
$$;

-- Claim and start due deliveries, any organization, within the limits:
-- fluxrate.delivery_concurrency in flight in this run, fluxrate.delivery_per_org
-- per organization and fluxrate.delivery_per_endpoint per webhook endpoint (an
-- organization's SMTP relay counts as one endpoint).  Each organization gets
-- its first slot before any gets its second, so a flood of one tenant's due
-- deliveries does not delay another's.  A claim is a lease: next_attempt_at
-- moves past the transfer's timeout, committed by the caller, so a concurrent
-- run skips the row and a run killed mid-transfer leaves it due again later
-- (delivery stays at least once).  Returns the number started.
CREATE FUNCTION fluxrate_internal.sys_deliver_start(max_new integer, timeout_ms integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_now timestamptz := fluxrate.now();
  v_free integer := least(max_new, current_setting('fluxrate.delivery_concurrency')::integer
                                   - (SELECT count(*) FROM fluxrate_internal.outbound_in_flight())::integer);
  v_per_org integer := current_setting('fluxrate.delivery_per_org')::integer;
  v_per_ep integer := current_setting('fluxrate.delivery_per_endpoint')::integer;
  v_lease timestamptz := v_now + make_interval(secs => timeout_ms / 1000.0 + 60);
  d fluxrate_internal.deliveries;
  w fluxrate_internal.webhook_endpoints;
  s fluxrate_internal.smtp_settings;
  v_secret text;
  v_password text;
  v_mail record;
  v_error text;
  n integer := 0;
BEGIN
  IF v_free <= 0 THEN
    RETURN 0;
  END IF;
  FOR d IN
    WITH busy AS MATERIALIZED (
      SELECT x.org_id, x.id, coalesce(x.endpoint_id::text, 'smtp') AS ep
        FROM fluxrate_internal.outbound_in_flight() f
        JOIN fluxrate_internal.deliveries x ON x.org_id = f.org_id AND x.id = f.delivery_id
    ), due AS (
      SELECT x.org_id, x.id, x.next_attempt_at, coalesce(x.endpoint_id::text, 'smtp') AS ep,
             row_number() OVER (PARTITION BY x.org_id, coalesce(x.endpoint_id::text, 'smtp')
                                ORDER BY x.next_attempt_at, x.id) AS rn_ep
        FROM fluxrate_internal.deliveries x
       WHERE x.status = 'PENDING' AND x.next_attempt_at <= v_now
         AND NOT EXISTS (SELECT 1 FROM busy b WHERE b.org_id = x.org_id AND b.id = x.id)
    ), open_ep AS (
      SELECT due.*, row_number() OVER (PARTITION BY due.org_id ORDER BY due.next_attempt_at, due.id) AS rn_org
        FROM due
       WHERE due.rn_ep + (SELECT count(*) FROM busy b WHERE b.org_id = due.org_id AND b.ep = due.ep) <= v_per_ep
    ), picked AS (
      SELECT o.org_id, o.id FROM open_ep o
       WHERE o.rn_org + (SELECT count(*) FROM busy b WHERE b.org_id = o.org_id) <= v_per_org
       ORDER BY o.rn_org, o.next_attempt_at, o.id
       LIMIT v_free
    )
    UPDATE fluxrate_internal.deliveries x SET next_attempt_at = v_lease
      FROM picked p
     WHERE x.org_id = p.org_id AND x.id = p.id
       -- re-checked after a concurrent run's claim commits: that run has it
       AND x.status = 'PENDING' AND x.next_attempt_at <= v_now
    RETURNING x.*
  LOOP
    PERFORM set_config('fluxrate.current_org', d.org_id::text, true);
    v_error := NULL;
    -- anything unexpected while preparing this delivery fails this delivery
    -- only, never the run: one bad row must not block every other one
    BEGIN
      IF d.channel = 'webhook' THEN
        SELECT * INTO w FROM fluxrate_internal.webhook_endpoints x WHERE x.org_id = d.org_id AND x.id = d.endpoint_id;
        v_secret := fluxrate_internal.unseal(w.secret_enc, 'webhook:' || w.org_id || ':' || w.id);
        IF w.status <> 'ACTIVE' THEN
          v_error := 'the endpoint is disabled';
        ELSIF v_secret IS NULL THEN
          v_error := 'the signing secret cannot be decrypted (server secret changed?)';
        ELSE
          PERFORM fluxrate_internal.outbound_start_http(d.org_id, d.id, v_now, w.url,
                 ARRAY['Content-Type: application/json',
                       'X-Fluxrate-Event: ' || d.event,
                       'X-Fluxrate-Event-Id: ' || d.event_id,
                       'X-Fluxrate-Delivery-Id: ' || d.id,
                       'X-Fluxrate-Signature: ' || fluxrate_internal.hmac_sha256_hex(v_secret, d.body)],
                 d.body, timeout_ms);
        END IF;
      ELSE
        SELECT * INTO s FROM fluxrate_internal.smtp_settings x WHERE x.org_id = d.org_id;
        v_password := NULL;
        IF NOT FOUND THEN
          v_error := 'smtp is not configured';
        ELSE
          IF s.password_enc IS NOT NULL THEN
            v_password := fluxrate_internal.unseal(s.password_enc, 'smtp:' || s.org_id);
          END IF;
          IF s.password_enc IS NOT NULL AND v_password IS NULL THEN
            v_error := 'the smtp password cannot be decrypted (server secret changed?)';
          ELSE
            IF d.credit_note_id IS NOT NULL THEN
              v_mail := fluxrate_internal.credit_note_email(d.org_id, d.credit_note_id, d.id, d.recipient);
            ELSE
              v_mail := fluxrate_internal.invoice_email(d.org_id, d.invoice_id, d.id, d.recipient);
            END IF;
            PERFORM fluxrate_internal.outbound_start_smtp(d.org_id, d.id, v_now, s.host, s.port, s.security, s.username, v_password,
                                                          s.from_email, d.recipient, v_mail.message, timeout_ms);
          END IF;
        END IF;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      v_error := 'internal error';
      RAISE LOG 'fluxrate: delivery %: internal error: %', d.id, SQLERRM;
    END;
    IF v_error IS NOT NULL THEN
      PERFORM fluxrate_internal.record_attempt(d, v_now, NULL, v_error, NULL, 0, true);
    END IF;
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- Wait up to wait_ms for transfers to finish and record the finished ones.
-- Returns the number still in flight.
CREATE FUNCTION fluxrate_internal.sys_deliver_finish(wait_ms integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  r record;
  d fluxrate_internal.deliveries;
BEGIN
  FOR r IN SELECT * FROM fluxrate_internal.outbound_poll(wait_ms) LOOP
    SELECT * INTO d FROM fluxrate_internal.deliveries x
     WHERE x.org_id = r.org_id AND x.id = r.delivery_id AND x.status = 'PENDING';
    CONTINUE WHEN NOT FOUND;     -- deleted (endpoint, invoice, organization) while in flight
    PERFORM set_config('fluxrate.current_org', d.org_id::text, true);
    PERFORM fluxrate_internal.record_attempt(d, r.claimed_at, r.status_code, r.error, r.response, r.duration_ms, false);
  END LOOP;
  RETURN (SELECT count(*) FROM fluxrate_internal.outbound_in_flight())::integer;
END
$$;

-- One due delivery, sent and recorded in the caller's transaction (0.1.0's
-- single-delivery step, kept for callers of it): false when nothing is due.
CREATE FUNCTION fluxrate_internal.sys_deliver_one(timeout_ms integer DEFAULT 10000) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  PERFORM fluxrate_internal.outbound_reset();
  IF fluxrate_internal.sys_deliver_start(1, timeout_ms) = 0 THEN
    RETURN false;
  END IF;
  WHILE fluxrate_internal.sys_deliver_finish(250) > 0 LOOP
  END LOOP;
  RETURN true;
END
$$;

-- The delivery job.  An invoker procedure (a SECURITY DEFINER procedure may not
-- COMMIT): claims commit before their transfers start, and every finished
-- transfer is recorded and committed as it finishes, while the others are
-- still in flight, so one peer that never answers holds its own slot until its
-- timeout and nobody else's.  max_deliveries bounds the transfers one run starts.
CREATE PROCEDURE fluxrate.deliver_pending(max_deliveries integer DEFAULT 1000, timeout_ms integer DEFAULT 10000)
  LANGUAGE plpgsql
  AS $$
DECLARE
  n_started integer := 0;
  n_new integer;
  n_flight integer := 0;
BEGIN
  -- transfers left by an interrupted run in this session are abandoned (their
  -- leases make them due again later)
  PERFORM fluxrate_internal.outbound_reset();
  LOOP
    n_new := 0;
    IF n_started < max_deliveries THEN
      n_new := fluxrate_internal.sys_deliver_start(max_deliveries - n_started, timeout_ms);
      n_started := n_started + n_new;
      COMMIT;
    END IF;
    EXIT WHEN n_new = 0 AND n_flight = 0
          AND NOT EXISTS (SELECT 1 FROM fluxrate_internal.outbound_in_flight());
    n_flight := fluxrate_internal.sys_deliver_finish(200);
    COMMIT;
  END LOOP;
  IF n_started > 0 THEN
    PERFORM fluxrate_internal.job_log('deliver_pending',
      format('attempted %s deliver%s', n_started, CASE WHEN n_started = 1 THEN 'y' ELSE 'ies' END));
  END IF;
END
$$;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_deliver_one(integer), fluxrate_internal.sys_deliver_start(integer, integer),
  fluxrate_internal.sys_deliver_finish(integer), fluxrate_internal.outbound_in_flight(),
  fluxrate_internal.outbound_reset() TO fluxrate_app;

-- Retention of the delivery log: deliveries finished (SENT, FAILED or SKIPPED) before
-- the cutoff go with their attempts, and older attempts of deliveries still
-- pending (a delivery retried by hand again and again) go too.  In batches of
-- 10,000 rows, each committed by the procedure, so the job never holds one
-- long transaction over a large backlog.  Returns the rows deleted.
CREATE FUNCTION fluxrate_internal.sys_purge_deliveries(cutoff timestamptz, batch integer DEFAULT 10000) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer;
  m integer;
BEGIN
  DELETE FROM fluxrate_internal.deliveries x
   WHERE (x.org_id, x.id) IN (SELECT y.org_id, y.id FROM fluxrate_internal.deliveries y
                               WHERE y.status IN ('SENT', 'FAILED', 'SKIPPED') AND y.updated_at < cutoff LIMIT batch);
  GET DIAGNOSTICS n = ROW_COUNT;
  DELETE FROM fluxrate_internal.delivery_attempts a
   WHERE (a.org_id, a.delivery_id, a.attempt) IN (SELECT b.org_id, b.delivery_id, b.attempt
                                                    FROM fluxrate_internal.delivery_attempts b
                                                   WHERE b.attempted_at < cutoff LIMIT batch);
  GET DIAGNOSTICS m = ROW_COUNT;
  RETURN n + m;
END
$$;

-- The retention job (daily through schedule_jobs): retention is how long the
-- log of finished deliveries is kept, counted on fluxrate.now().
CREATE PROCEDURE fluxrate.purge_deliveries(retention interval DEFAULT '30 days')
  LANGUAGE plpgsql
  AS $$
DECLARE
  v_cutoff timestamptz;
  v_n integer;
  v_rows bigint := 0;
BEGIN
  IF retention IS NULL OR retention < interval '1 day' OR NOT isfinite(fluxrate.now() - retention) THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'retention must be at least 1 day',
      DETAIL = format('retention was %s.', retention), HINT = 'The default keeps 30 days of the delivery log.';
  END IF;
  v_cutoff := fluxrate.now() - retention;
  LOOP
    v_n := fluxrate_internal.sys_purge_deliveries(v_cutoff);
    EXIT WHEN v_n = 0;
    v_rows := v_rows + v_n;
    COMMIT;
  END LOOP;
  IF v_rows > 0 THEN
    PERFORM fluxrate_internal.job_log('purge_deliveries', format('deleted %s rows of the delivery log', v_rows));
  END IF;
END
$$;
GRANT EXECUTE ON FUNCTION fluxrate_internal.sys_purge_deliveries(timestamptz, integer) TO fluxrate_app;
