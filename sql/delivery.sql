-- Delivery without peers: settings and their refusals, sealed secrets, the
-- HMAC, fan-out in the change's transaction, the retry schedule against a port
-- nobody listens on, public links, tenancy.  (Real SMTP and HTTP peers:
-- test/scripts/delivery.sh.)  Time is pinned throughout.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
\set SHOW_CONTEXT errors

-- HMAC-SHA256, RFC 4231 test case 2
SELECT fluxrate_internal.hmac_sha256_hex('Jefe', 'what do ya want for nothing?')
     = '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843' AS rfc4231_case2;
-- sealing: random nonce (two seals differ), opens only with the same context
SELECT fluxrate_internal.seal('pw', 'smtp:a') <> fluxrate_internal.seal('pw', 'smtp:a') AS nonce_is_random,
       fluxrate_internal.unseal(fluxrate_internal.seal('pw', 'smtp:a'), 'smtp:a') AS opens,
       fluxrate_internal.unseal(fluxrate_internal.seal('pw', 'smtp:a'), 'smtp:b') IS NULL AS other_row_fails,
       fluxrate_internal.unseal('\x0102'::bytea, 'smtp:a') IS NULL AS garbage_fails,
       position('pw'::bytea IN fluxrate_internal.seal('pw', 'smtp:a')) = 0 AS no_plain_text;

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Acme', grace_period => '0'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
-- this file looks only at its own organization's rows (other test files share the database)
CREATE TEMP VIEW acme_smtp AS SELECT * FROM fluxrate_internal.smtp_settings WHERE org_id = :'org';
CREATE TEMP VIEW acme_webhooks AS SELECT * FROM fluxrate_internal.webhook_endpoints WHERE org_id = :'org';
CREATE TEMP VIEW acme_deliveries AS SELECT * FROM fluxrate_internal.deliveries WHERE org_id = :'org';
CREATE TEMP VIEW acme_attempts AS SELECT * FROM fluxrate_internal.delivery_attempts WHERE org_id = :'org';

-- SMTP settings: every refusal, nothing written
SELECT fluxrate.set_smtp_settings(NULL, 587, 'billing@acme.test');                 -- 22004
SELECT fluxrate.set_smtp_settings('smtp.acme.test', 0, 'billing@acme.test');       -- PT422
SELECT fluxrate.set_smtp_settings('smtp://acme.test', 587, 'billing@acme.test');   -- PT422
SELECT fluxrate.set_smtp_settings('smtp.acme.test', 587, 'not-an-address');        -- 22023
SELECT fluxrate.set_smtp_settings('smtp.acme.test', 587, 'billing@acme.test', security => 'ssl3');  -- 22023
SELECT fluxrate.get_smtp_settings();                                                -- PT404
SELECT count(*) AS smtp_rows FROM acme_smtp;
-- set; the password comes back only as has_password
SELECT fluxrate.set_smtp_settings('127.0.0.1', 1, 'billing@acme.test', username => 'mailer',
         password => 'Sup3r-Secret-SMTP', security => 'none', from_name => 'Acme Billing') - 'created_at' - 'updated_at';
-- editing without a password keeps the stored one; it is sealed for this organization only
SELECT (fluxrate.set_smtp_settings('127.0.0.1', 1, 'billing@acme.test', username => 'mailer', security => 'none'))->>'has_password' AS kept;
SELECT fluxrate_internal.unseal(password_enc, 'smtp:' || org_id) = 'Sup3r-Secret-SMTP' AS opens_for_its_row,
       fluxrate_internal.unseal(password_enc, 'smtp:' || :'org_b') IS NULL AS not_for_another_org
  FROM acme_smtp;

-- Webhook endpoints: refusals, then one that receives everything, one for invoice.paid only
SELECT fluxrate.create_webhook_endpoint('ftp://acme.test/hook');                   -- PT422
SELECT fluxrate.create_webhook_endpoint('https://');                               -- PT422
SELECT fluxrate.create_webhook_endpoint('https://acme.test/hook', ARRAY['invoice.exploded']);  -- 22023
SELECT fluxrate.create_webhook_endpoint(NULL);                                     -- 22004
SELECT count(*) AS endpoints FROM acme_webhooks;
SELECT fluxrate.create_webhook_endpoint('http://127.0.0.1:1/all') AS hook_all \gset
SELECT (fluxrate.create_webhook_endpoint('http://127.0.0.1:1/paid', ARRAY['invoice.paid']))->>'id' AS hook_paid \gset
SELECT :'hook_all'::jsonb->>'secret' ~ '^whsec_[0-9A-Za-z]{43}$' AS secret_shape,
       :'hook_all'::jsonb->>'secret_prefix' = left(:'hook_all'::jsonb->>'secret', 10) AS prefix_shown,
       NOT (fluxrate.list_webhook_endpoints()::text LIKE '%' || (:'hook_all'::jsonb->>'secret') || '%') AS never_listed;
SELECT (:'hook_all'::jsonb)->>'id' AS hook_all_id \gset
SELECT fluxrate_internal.unseal(secret_enc, 'webhook:' || org_id || ':' || id) = :'hook_all'::jsonb->>'secret' AS sealed_secret_opens
  FROM acme_webhooks WHERE id = :'hook_all_id';

-- Fan-out happens in the transaction of the change: a rolled-back finalization
-- leaves no outbox row and no delivery
SELECT (fluxrate.create_customer('Zoë', 'zoe@example.com', billing_address_country => 'US'))->>'id' AS cust \gset
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Setup", "quantity": 2, "unit_amount": 12.5}]'))->>'id' AS inv \gset
BEGIN;
SELECT (fluxrate.finalize_invoice(:'inv'))->>'status' AS status_inside;
SELECT event, channel, recipient FROM acme_deliveries ORDER BY channel, recipient;
ROLLBACK;
SELECT count(*) AS outbox_after_rollback FROM fluxrate_internal.outbox WHERE org_id = :'org';
SELECT count(*) AS deliveries_after_rollback FROM acme_deliveries;
-- committed: one webhook (the catch-all endpoint) and one e-mail
SELECT (fluxrate.finalize_invoice(:'inv'))->>'invoice_number' AS number;
SELECT event, channel, recipient, status, attempts, next_attempt_at FROM acme_deliveries ORDER BY channel, recipient;
-- the webhook body is the documented payload; the e-mail renders the invoice (25.00 = 2 x 12.50)
SELECT body::jsonb - 'timestamp' AS webhook_body FROM acme_deliveries WHERE channel = 'webhook'
  \gset
SELECT (:'webhook_body'::jsonb)->'data'->>'total' AS total, (:'webhook_body'::jsonb)->>'event' AS event,
       (:'webhook_body'::jsonb)->'data' ? 'invoice_id' AS has_invoice_id;
SELECT m.subject, m.message LIKE '%Message-ID: <' || d.id || '@fluxrate.invalid>%' AS stable_message_id,
       m.message LIKE '%To: =?UTF-8?B?' || translate(encode(convert_to('Zoë', 'UTF8'), 'base64'), E'\n', '') || '?= <zoe@example.com>%' AS named_recipient,
       convert_from(decode(split_part(split_part(m.message, E'base64\r\n\r\n', 2), E'\r\n--', 1), 'base64'), 'UTF8')
         ~ ('\n +Total +25\.00 USD\n.*View the invoice online: http://localhost:3000/rpc/public_invoice\?token=' || i.public_token) AS text_part
  FROM acme_deliveries d
  JOIN fluxrate_internal.invoices i ON i.org_id = d.org_id AND i.id = d.invoice_id,
  LATERAL fluxrate_internal.invoice_email(d.org_id, d.invoice_id, d.id, d.recipient) m
 WHERE d.channel = 'email';

-- The retry schedule, against a port nobody listens on: 30 s, 2 min, 10 min, 1 h, 6 h, then FAILED
CALL fluxrate.deliver_pending();
SELECT channel, status, attempts, next_attempt_at, last_status_code,
       last_error = 'connection failed' AS refused
  FROM acme_deliveries ORDER BY channel;
SET fluxrate.pinned_now = '2026-01-01 00:00:29+00';     -- not yet due: nothing is attempted
CALL fluxrate.deliver_pending();
SELECT sum(attempts) AS attempts_before_due FROM acme_deliveries;
SET fluxrate.pinned_now = '2026-01-01 00:00:30+00';
CALL fluxrate.deliver_pending();
SELECT channel, status, attempts, next_attempt_at FROM acme_deliveries ORDER BY channel;
SET fluxrate.pinned_now = '2026-01-01 00:02:30+00';
CALL fluxrate.deliver_pending();
SET fluxrate.pinned_now = '2026-01-01 00:12:30+00';
CALL fluxrate.deliver_pending();
SET fluxrate.pinned_now = '2026-01-01 01:12:30+00';
CALL fluxrate.deliver_pending();
SELECT channel, status, attempts, next_attempt_at FROM acme_deliveries ORDER BY channel;
SET fluxrate.pinned_now = '2026-01-01 07:12:30+00';
CALL fluxrate.deliver_pending();
SELECT channel, status, attempts, next_attempt_at FROM acme_deliveries ORDER BY channel;
-- the log keeps every attempt
SELECT d.channel, a.attempt, a.attempted_at, a.status_code IS NULL AS no_answer
  FROM acme_attempts a JOIN acme_deliveries d ON d.org_id = a.org_id AND d.id = a.delivery_id
 ORDER BY d.channel, a.attempt;
SELECT (fluxrate.list_deliveries(status => 'failed'))->'meta'->'total' AS failed_listed;
-- a FAILED delivery can be retried by hand; a PENDING or unknown one cannot
SELECT id AS failed_webhook FROM acme_deliveries WHERE channel = 'webhook' \gset
SELECT d->>'status' AS status, d->>'attempts' AS attempts FROM fluxrate.retry_delivery(:'failed_webhook') d;
SELECT fluxrate.retry_delivery(:'failed_webhook');                                 -- PT409
SELECT fluxrate.retry_delivery('00000000-0000-0000-0000-000000000000');            -- PT404
SELECT fluxrate.list_deliveries(status => 'lost');                                 -- 22023
-- the retried delivery starts a fresh schedule; its log keeps numbering (attempt 7)
CALL fluxrate.deliver_pending();
SELECT status, attempts, next_attempt_at, (SELECT max(attempt) FROM acme_attempts a WHERE a.delivery_id = d.id) AS logged
  FROM acme_deliveries d WHERE id = :'failed_webhook';

-- Public links: the finalized invoice has one; regenerating replaces it
SELECT public_token AS token1 FROM fluxrate_internal.invoices WHERE id = :'inv' \gset
RESET fluxrate.acting_org;
SELECT p->>'invoice_number' AS number, p->>'total' AS total, p->'customer'->>'name' AS customer,
       p->'organization'->>'name' AS organization, jsonb_array_length(p->'line_items') AS lines,
       p ? 'meta_data' AS leaks_meta, p ? 'public_token' AS leaks_token
  FROM fluxrate.public_invoice(:'token1') p;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT g->>'public_url' = 'http://localhost:3000/rpc/public_invoice?token=' || (g->>'public_token') AS url_ok
  FROM fluxrate.generate_invoice_token(:'inv') g;
SELECT fluxrate.public_invoice(:'token1');                                          -- PT404: replaced
SELECT fluxrate.public_invoice('not-a-token');                                      -- PT404
SELECT (fluxrate.public_invoice(public_token::text))->>'invoice_number' AS new_token_works
  FROM fluxrate_internal.invoices WHERE id = :'inv';
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Later", "quantity": 1, "unit_amount": 5}]'))->>'id' AS draft \gset
SELECT fluxrate.generate_invoice_token(:'draft');                                   -- PT409: drafts are not shared

-- send-email: finalizes a draft first; the automatic switch off queues nothing at finalization
SELECT (fluxrate.update_organization(auto_email => false))->>'auto_email' AS auto_email;
SELECT (fluxrate.finalize_invoice(:'draft'))->>'status' AS finalized;
SELECT count(*) AS emails_for_draft FROM acme_deliveries WHERE invoice_id = :'draft';
SELECT r->>'success' AS success, r->>'message' AS message FROM fluxrate.send_invoice_email(:'draft') r;
SELECT r->>'success' AS success, r->>'message' AS message FROM fluxrate.send_invoice_email(:'draft') r;   -- already queued
SELECT count(*) AS emails_for_draft FROM acme_deliveries WHERE invoice_id = :'draft';
SELECT fluxrate.update_organization(invoice_link_base => 'javascript:alert(1)');   -- PT422
-- event filters: invoice.paid reaches both endpoints, and only them
SELECT (fluxrate.pay_invoice(:'inv'))->>'status' AS paid;
SELECT event, recipient FROM acme_deliveries WHERE event = 'invoice.paid' ORDER BY recipient;

-- Tenancy: Globex sees none of Acme's endpoints, deliveries, settings or invoices
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.list_webhook_endpoints() AS b_endpoints, (fluxrate.list_deliveries())->'meta'->'total' AS b_deliveries;
SELECT fluxrate.get_smtp_settings();                                                -- PT404
SELECT fluxrate.delete_webhook_endpoint(:'hook_paid');                              -- PT404
SELECT fluxrate.update_webhook_endpoint(:'hook_paid', status => 'DISABLED');        -- PT404
SELECT fluxrate.rotate_webhook_secret(:'hook_paid');                                -- PT404
SELECT fluxrate.retry_delivery(:'failed_webhook');                                  -- PT404
SELECT fluxrate.generate_invoice_token(:'inv');                                     -- PT404
SELECT fluxrate.send_invoice_email(:'inv');                                         -- PT404
-- Globex has no SMTP: send-email finalizes and says why nothing was sent
SELECT (fluxrate.create_customer('Initech', 'ap@initech.test', billing_address_country => 'DE'))->>'id' AS cust_b \gset
SELECT (fluxrate.create_invoice(:'cust_b', 'EUR', line_items => '[{"description": "Audit", "quantity": 1, "unit_amount": 100}]'))->>'id' AS inv_b \gset
SELECT r->>'success' AS success, r->>'message' AS message, r->'invoice'->>'status' AS status FROM fluxrate.send_invoice_email(:'inv_b') r;
SELECT (fluxrate.void_invoice(:'inv_b'))->>'status' AS voided;
SELECT fluxrate.send_invoice_email(:'inv_b');                                       -- PT409: a VOID invoice is not sent
-- and Acme's endpoint, still there, was not touched
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT jsonb_array_length(fluxrate.list_webhook_endpoints()) AS acme_endpoints;
-- disabling an endpoint stops new deliveries to it; rotating gives a new secret once
SELECT fluxrate.update_webhook_endpoint(:'hook_paid', url => 'file:///etc/passwd');  -- PT422
SELECT fluxrate.update_webhook_endpoint(:'hook_paid', status => 'PAUSED');           -- 22023
SELECT fluxrate.update_webhook_endpoint(:'hook_paid', event_types => ARRAY['x.y']);  -- 22023
SELECT url, status FROM acme_webhooks WHERE id = :'hook_paid';                       -- unchanged
SELECT (fluxrate.update_webhook_endpoint(:'hook_paid', status => 'disabled'))->>'status' AS status;
SELECT (r->>'secret') <> (:'hook_all'::jsonb->>'secret') AS new_secret FROM fluxrate.rotate_webhook_secret(:'hook_all_id') r;
SELECT (fluxrate.delete_webhook_endpoint(:'hook_paid'))->>'deleted' AS deleted;
SELECT fluxrate.delete_smtp_settings();
SELECT fluxrate.delete_smtp_settings();                                             -- PT404
RESET fluxrate.acting_org;
RESET fluxrate.pinned_now;

-- Outbound policy (src/outbound_policy.c; connect-time refusals against live
-- listeners: test/scripts/outbound.sh).  The built-in default is 'public';
-- this instance lists 127.0.0.1 and ::1 for the tests' peers (test/postgresql.conf).
SELECT boot_val FROM pg_settings WHERE name = 'fluxrate.outbound_allow';
SET fluxrate.outbound_allow = 'public';
SELECT a AS address, fluxrate_internal.outbound_address_allowed(a, 443, 'webhook') AS webhook_443,
       fluxrate_internal.outbound_address_allowed(a, 587, 'email') AS smtp_587
  FROM unnest(ARRAY['93.184.215.14', '127.0.0.1', '127.255.255.254', '0.0.0.0', '10.1.2.3', '100.64.0.1',
                    '169.254.169.254', '172.16.0.1', '172.32.0.1', '192.168.0.1', '192.0.2.1', '198.18.0.1',
                    '224.0.0.1', '255.255.255.255', '2606:2800:220:1::1', '::1', '::', '::ffff:127.0.0.1',
                    '::ffff:93.184.215.14', 'fe80::1', 'fc00::1', 'ff02::1', '2001:db8::1', '2002:7f00:1::1',
                    '64:ff9b::7f00:1']) a;
-- ports on public addresses: webhooks 80, 443, 8000-8999; SMTP 25, 465, 587, 2525
SELECT p AS port, fluxrate_internal.outbound_address_allowed('93.184.215.14', p, 'webhook') AS webhook,
       fluxrate_internal.outbound_address_allowed('93.184.215.14', p, 'email') AS smtp
  FROM unnest(ARRAY[22, 25, 80, 443, 465, 587, 2525, 5432, 7999, 8000, 8999, 9000]) p;
-- a listed address or network allows any port; IPv4-mapped IPv6 counts as IPv4
SET fluxrate.outbound_allow = '10.0.0.0/8, [::1], 127.0.0.1';
SELECT fluxrate_internal.outbound_address_allowed('10.9.8.7', 5432, 'webhook') AS listed_net,
       fluxrate_internal.outbound_address_allowed('::ffff:10.9.8.7', 22, 'email') AS listed_mapped,
       fluxrate_internal.outbound_address_allowed('::1', 1, 'webhook') AS listed_v6,
       fluxrate_internal.outbound_address_allowed('127.0.0.2', 80, 'webhook') AS neighbour,
       fluxrate_internal.outbound_address_allowed('93.184.215.14', 443, 'webhook') AS public_not_listed;
SELECT fluxrate_internal.outbound_address_allowed('0x7f000001', 80, 'webhook');     -- 22P02: literal addresses only here
SELECT fluxrate_internal.outbound_address_allowed('127.0.0.1', 80, 'ftp');           -- 22023
-- a bad setting is refused when it is set, not at the next delivery
SET fluxrate.outbound_allow = 'public, 10.0.0.0/33';                                 -- 22023
SET fluxrate.outbound_allow = 'public, 10.0.0.1/8/8';                                -- 22023
SET fluxrate.outbound_allow = 'public, smtp_relay!';                                 -- 22023
SHOW fluxrate.outbound_allow;
-- only superusers set it: a tenant's role cannot widen it
SET ROLE fluxrate_web;
SET fluxrate.outbound_allow = 'public, 0.0.0.0/0';                                   -- 42501
RESET ROLE;

-- Connect time: with the default, the same targets as above are refused before
-- any connection, and the tenant reads "refused by policy", no status, no duration
SET fluxrate.pinned_now = '2026-02-01 00:00:00+00';
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_webhook_endpoint('http://127.0.0.1:1/policy'))->>'id' AS hook_policy \gset
SELECT (fluxrate.create_webhook_endpoint('http://[::1]:1/policy'))->>'id' AS hook_policy6 \gset
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Policy", "quantity": 1, "unit_amount": 1}]'))->>'id' AS inv_p \gset
SELECT (fluxrate.finalize_invoice(:'inv_p'))->>'status' AS status;
SET fluxrate.outbound_allow = 'public';
CALL fluxrate.deliver_pending();
SELECT recipient, status, attempts, last_status_code, last_error
  FROM acme_deliveries WHERE endpoint_id IN (:'hook_policy', :'hook_policy6') ORDER BY recipient;
SELECT a AS attempt_log_entry FROM jsonb_array_elements((fluxrate.list_deliveries(endpoint_id => :'hook_policy'))->'data'->0->'attempt_log') a;
RESET fluxrate.outbound_allow;
SHOW fluxrate.outbound_allow;

-- Userinfo in a webhook URL is refused at creation and update (22023, with a hint)
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT fluxrate.create_webhook_endpoint('https://user:secret@hooks.example.com/x');
\set VERBOSITY sqlstate
\set SHOW_CONTEXT errors
SELECT fluxrate.create_webhook_endpoint('https://user@hooks.example.com/x');          -- 22023
SELECT fluxrate.update_webhook_endpoint(:'hook_policy', url => 'http://a:b@hooks.example.com/');  -- 22023
SELECT fluxrate.create_webhook_endpoint('https://hooks.example.com:99999/x');         -- PT422: libcurl cannot read it

-- At most 20 webhook endpoints per organization (54000, HTTP 413); another
-- organization's count is its own
SELECT count(*) AS acme_endpoints_now FROM acme_webhooks;
SELECT count(*) AS created FROM generate_series(1, 20 - (SELECT count(*) FROM acme_webhooks)::integer) i,
  LATERAL fluxrate.create_webhook_endpoint('https://hooks.example.com/' || i) w;
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT fluxrate.create_webhook_endpoint('https://hooks.example.com/21');
\set VERBOSITY sqlstate
\set SHOW_CONTEXT errors
SELECT count(*) AS acme_endpoints_capped FROM acme_webhooks;
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT (fluxrate.create_webhook_endpoint('https://hooks.example.com/globex'))->>'url' AS globex_still_can;
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.delete_webhook_endpoint(:'hook_policy'))->>'deleted' AS deleted;
SELECT (fluxrate.create_webhook_endpoint('https://hooks.example.com/again'))->>'url' AS after_a_delete;

-- Retention: finished deliveries older than the retention go with their
-- attempts; pending ones stay, and so does everything newer; every organization
CALL fluxrate.purge_deliveries(retention => '1 hour');                               -- 22023
SELECT status, count(*) AS deliveries, sum((SELECT count(*) FROM fluxrate_internal.delivery_attempts a
         WHERE a.org_id = d.org_id AND a.delivery_id = d.id)) AS attempts
  FROM acme_deliveries d GROUP BY status ORDER BY status;
SET fluxrate.pinned_now = '2026-02-20 00:00:00+00';
CALL fluxrate.purge_deliveries(retention => '30 days');    -- cutoff 2026-01-21: January's finished ones go
SELECT status, count(*) AS deliveries, sum((SELECT count(*) FROM fluxrate_internal.delivery_attempts a
         WHERE a.org_id = d.org_id AND a.delivery_id = d.id)) AS attempts
  FROM acme_deliveries d GROUP BY status ORDER BY status;
SELECT count(*) AS orphan_attempts FROM acme_attempts a
 WHERE NOT EXISTS (SELECT 1 FROM acme_deliveries d WHERE d.id = a.delivery_id);
RESET fluxrate.acting_org;
RESET fluxrate.pinned_now;
