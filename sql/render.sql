-- The invoice for people (75_render.sql, src/render_pdf.c, src/render_json.c):
-- the text invoice as psql prints it, HTML, the PDF's envelope, the table-shaped
-- reads with the customer's name, get_invoice's key order, each currency's
-- minor unit, refusals and another organization.  (The PDF read back by
-- pdftotext and the e-mail attachment: test/scripts/invoice_documents.sh.)
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-03-01 09:00:00+00';
SELECT (fluxrate.create_organization('Acme Billing', payment_terms_days => 14))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_customer('Bob <Buyer> & Sons', 'bob@example.com', 'bob', billing_address_line1 => '1 Main St',
       billing_address_city => 'Springfield', billing_address_state => 'IL', billing_address_postal_code => '62701',
       billing_address_country => 'US'))->>'id' AS cust \gset
SELECT (fluxrate.create_customer('Yamada KK', 'ap@yamada.example', 'yamada', billing_address_country => 'JP'))->>'id' AS cust_jp \gset

-- By hand: 3 x 19.99 = 59.97; 2.5 x 0.333 = 0.8325 -> 0.83 (rounded once, per line);
-- subtotal 59.97 + 0.83 = 60.80; no tax; total = amount due = 60.80
SELECT (fluxrate.create_invoice(:'cust', 'USD', line_items => '[{"description": "Seats", "quantity": 3, "unit_amount": 19.99},
          {"description": "Storage (GB-months)", "quantity": 2.5, "unit_amount": 0.333}]'))->>'id' AS inv \gset
-- a draft: no number yet, no link
\pset format unaligned
\pset tuples_only on
SELECT fluxrate.invoice_text(:'inv');
SELECT (fluxrate.finalize_invoice(:'inv'))->>'invoice_number' AS number;
-- finalized: numbered, issued today, due in 14 days, with its public link (the token masked here)
SELECT regexp_replace(fluxrate.invoice_text(:'inv'), 'token=[0-9a-f-]{36}', 'token=<token>');
SELECT regexp_replace(fluxrate.invoice_html(:'inv'), 'token=[0-9a-f-]{36}', 'token=<token>');
\pset format aligned
\pset tuples_only off

-- Minor units: JPY has none, KWD three.  3 x 333.3 = 999.9 -> 1000 JPY; 1 x 1.2345 = 1.2345 -> 1.235 KWD
-- (half away from zero); the amounts print as stored, with the currency's decimals
SELECT (fluxrate.create_invoice(:'cust_jp', 'JPY', line_items => '[{"description": "API calls", "quantity": 3, "unit_amount": 333.3}]'))->>'id' AS inv_jpy \gset
SELECT (fluxrate.create_invoice(:'cust_jp', 'KWD', line_items => '[{"description": "Support", "quantity": 1, "unit_amount": 1.2345}]'))->>'id' AS inv_kwd \gset
SELECT line FROM regexp_split_to_table(fluxrate.invoice_text(:'inv_jpy'), E'\n') line WHERE line ~ 'API calls|Total|Currency';
SELECT line FROM regexp_split_to_table(fluxrate.invoice_text(:'inv_kwd'), E'\n') line WHERE line ~ 'Support|Total|Currency';
-- a long description wraps at 48 characters under itself, a line break in it is a space,
-- a word longer than the column is cut
SELECT w FROM unnest(fluxrate_internal.wrap_text('Premium support, 24/7, with a named engineer and'
       || E'\na four-hour response time; ticket https://support.example/tickets/ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789', 48)) w;

-- The table-shaped reads, with the customer's name
-- (ordered here: the two drafts share the pinned clock, and ties go by random id)
SELECT invoice_number, customer_name, status, kind, currency, subtotal, tax, total, amount_due, issue_date, due_date, line_count
  FROM fluxrate.invoice_rows() ORDER BY invoice_number NULLS LAST, currency;
SELECT invoice_number, customer_name, position, line_type, description, quantity, unit_amount, line_total, currency
  FROM fluxrate.invoice_line_rows() ORDER BY invoice_number NULLS LAST, currency, position;
-- filtered with WHERE (PostgREST: ?status=eq.OPEN)
SELECT invoice_number, customer_name, total FROM fluxrate.invoice_rows() WHERE status = 'OPEN';

-- get_invoice: json, keys in a logical order, with the customer's name
SELECT pg_typeof(fluxrate.get_invoice(:'inv')) AS type;
SELECT string_agg(k, ', ') AS invoice_keys FROM json_object_keys(fluxrate.get_invoice(:'inv')) k;
SELECT string_agg(k, ', ') AS line_keys FROM json_object_keys((fluxrate.get_invoice(:'inv'))->'line_items'->0) k;
SELECT g->>'customer_name' AS customer_name, g->>'total' AS total, json_array_length(g->'line_items') AS lines
  FROM fluxrate.get_invoice(:'inv') g;
-- the other single-document reads too: what it is, what it belongs to, its terms, money, dates, contents
SELECT string_agg(k, ', ') AS organization_keys FROM json_object_keys(fluxrate.get_organization()) k;
SELECT string_agg(k, ', ') AS customer_keys FROM json_object_keys(fluxrate.get_customer(:'cust')) k;
-- a key the order does not name goes before the timestamps, in byte order; nested objects are ordered too
SELECT fluxrate_internal.ordered_json('{"zeta": 1, "created_at": "t", "alpha": {"total": 2, "id": 1, "b": [{"usage": 3, "period": "p"}]}, "id": 0}');

-- The PDF: the media-type domain PostgREST serves as application/pdf; a PDF file;
-- the same bytes every time (no creation date, no random file id)
SELECT pg_typeof(fluxrate.invoice_pdf(:'inv')) AS type, pg_typeof(fluxrate.invoice_html(:'inv')) AS html_type,
       pg_typeof(fluxrate.invoice_text(:'inv')) AS text_type;
SELECT encode(substr(fluxrate.invoice_pdf(:'inv'), 1, 8), 'escape') AS header, length(fluxrate.invoice_pdf(:'inv')) > 1000 AS sizeable,
       md5(fluxrate.invoice_pdf(:'inv')) = md5(fluxrate.invoice_pdf(:'inv')) AS deterministic,
       position('%%EOF' IN encode(fluxrate.invoice_pdf(:'inv'), 'escape')) > 0 AS complete;
-- the renderer refuses a malformed layout
SELECT fluxrate_internal.render_pdf('x', '{}', ARRAY['only one'], '{}', '{}', '{}');                     -- 22023
SELECT fluxrate_internal.render_pdf('x', '{}', ARRAY['a', 'b'], ARRAY[['1', '2', '3']], '{}', '{}');    -- 2202E
SELECT fluxrate_internal.render_pdf('x', ARRAY['no', 'pairs'], ARRAY['a', 'b'], '{}', '{}', '{}');      -- 2202E

-- Refusals: an unknown invoice, no invoice id
SELECT fluxrate.invoice_text('00000000-0000-0000-0000-000000000000');   -- PT404
SELECT fluxrate.invoice_pdf(NULL);                                      -- 22004
-- Another organization: each form is PT404, the tables are empty
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.invoice_text(:'inv');                                   -- PT404
SELECT fluxrate.invoice_html(:'inv');                                   -- PT404
SELECT fluxrate.invoice_pdf(:'inv');                                    -- PT404
SELECT fluxrate.get_invoice(:'inv');                                    -- PT404
SELECT (SELECT count(*) FROM fluxrate.invoice_rows()) AS invoices, (SELECT count(*) FROM fluxrate.invoice_line_rows()) AS lines;
-- no organization at all
RESET fluxrate.acting_org;
SELECT fluxrate.invoice_text(:'inv');                                   -- PT401
SELECT count(*) FROM fluxrate.invoice_rows();                           -- PT401
RESET fluxrate.pinned_now;

-- The public link, as HTML and PDF, with no credentials: the token opens one
-- finalized invoice of its organization, nothing else
SET fluxrate.pinned_now = '2026-03-01 09:00:00+00';
SELECT public_token AS token FROM fluxrate_internal.invoices WHERE id = :'inv' \gset
SET ROLE fluxrate_anon;
SELECT position('>59.97 USD</td>' IN fluxrate.public_invoice_html(:'token')) > 0 AS html_has_seats,
       position('60.80 USD' IN fluxrate.public_invoice_html(:'token')) > 0 AS html_has_total,
       encode(substr(fluxrate.public_invoice_pdf(:'token'), 1, 8), 'escape') AS pdf_header;
SELECT md5(fluxrate.public_invoice_pdf(:'token')) AS public_md5 \gset
SELECT fluxrate.public_invoice_html('00000000-0000-0000-0000-000000000000');   -- PT404
SELECT fluxrate.public_invoice_pdf('not-a-token');                            -- PT404
SELECT fluxrate.invoice_pdf(:'inv');                                          -- 42501: the token is the only door
RESET ROLE;
-- the same PDF the organization gets
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT md5(fluxrate.invoice_pdf(:'inv')) = :'public_md5' AS same_pdf;
-- a draft has no link (the JPY invoice): nothing to open
SELECT public_token IS NULL AS draft_has_no_token FROM fluxrate_internal.invoices WHERE id = :'inv_jpy';
RESET fluxrate.pinned_now;
