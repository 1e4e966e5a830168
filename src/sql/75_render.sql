-- 75_render.sql: the invoice for people: plain text (psql, the e-mail's text
-- part), HTML (the e-mail's HTML part, a browser) and PDF (the e-mail's
-- attachment, a download), and table-shaped reads of invoices and lines.
--
-- One renderer: invoice_parts() formats every string once (money exactly as
-- stored, in the currency's minor unit, by money_text(); quantities and unit
-- amounts as stored; dates in UTC), and the three forms only lay those strings
-- out.  So the text, the HTML and the PDF cannot disagree on an amount, and
-- all three agree with get_invoice (tested to the cent, the PDF through
-- poppler's pdftotext).
--
-- PostgREST serves a function's result with the media type named by its
-- return type's domain (its "media type handlers"): invoice_pdf returns the
-- domain "application/pdf" over bytea, invoice_html "text/html" and
-- invoice_text "text/plain" over text (PostgREST 12 has no built-in text/plain),
-- so GET /rpc/invoice_pdf?invoice_id=... with Accept: application/pdf is the
-- PDF itself.  The domains are created by the install script and, for an
-- upgraded database, by the upgrade script.

CREATE DOMAIN fluxrate."application/pdf" AS bytea;
CREATE DOMAIN fluxrate."text/html" AS text;
CREATE DOMAIN fluxrate."text/plain" AS text;

CREATE OR REPLACE FUNCTION fluxrate_internal.render_pdf(title text, pairs text[], head text[], rows text[],
    totals text[], notes text[])
  RETURNS bytea
  LANGUAGE C IMMUTABLE PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_render_pdf';

-- Every string of one invoice, formatted once.  pairs and totals are n x 2
-- (label, value), rows n x 4 (description, quantity, unit amount, amount).
CREATE OR REPLACE FUNCTION fluxrate_internal.invoice_parts(org_id uuid, invoice_id uuid,
    OUT title text, OUT invoice_number text, OUT org_name text, OUT customer_name text, OUT subject text,
    OUT period text, OUT due text, OUT link text,
    OUT pairs text[], OUT head text[], OUT rows text[], OUT totals text[], OUT notes text[])
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices;
  o fluxrate_internal.organizations;
  c fluxrate_internal.customers;
  v_address text;
BEGIN
  SELECT * INTO i FROM fluxrate_internal.invoices x WHERE x.org_id = invoice_parts.org_id AND x.id = invoice_parts.invoice_id;
  SELECT * INTO o FROM fluxrate_internal.organizations x WHERE x.org_id = invoice_parts.org_id;
  SELECT * INTO c FROM fluxrate_internal.customers x WHERE x.org_id = i.org_id AND x.id = i.customer_id;
  invoice_number := coalesce(i.invoice_number, '(draft)');
  title := 'Invoice ' || invoice_number;
  org_name := o.name;
  customer_name := c.name;
  link := CASE WHEN i.public_token IS NOT NULL THEN o.invoice_link_base || i.public_token END;
  period := CASE WHEN i.period_start IS NOT NULL
                 THEN to_char(i.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' to '
                      || to_char(i.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD') END;
  due := coalesce(to_char(i.due_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'on receipt');
  subject := format('Invoice %s from %s: %s due %s', invoice_number, o.name,
                    fluxrate_internal.money_text(i.total, i.currency), due);
  pairs := ARRAY[['Invoice number', invoice_number], ['Status', i.status], ['From', o.name],
                 ['Bill to', c.name || coalesce(' <' || nullif(btrim(c.email), '') || '>', '')]];
  v_address := concat_ws(', ', nullif(btrim(c.billing_address_line1), ''), nullif(btrim(c.billing_address_city), ''),
                         nullif(btrim(c.billing_address_state), ''), nullif(btrim(c.billing_address_postal_code), ''),
                         c.billing_address_country);
  IF v_address <> '' THEN
    pairs := pairs || ARRAY[['Address', v_address]];
  END IF;
  pairs := pairs || ARRAY[['Issue date', coalesce(to_char(i.issue_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '(not issued)')],
                 ['Due date', due]];
  IF period IS NOT NULL THEN
    pairs := pairs || ARRAY[['Period', period]];
  END IF;
  pairs := pairs || ARRAY[['Currency', i.currency]];
  head := ARRAY['Description', 'Quantity', 'Unit amount', 'Amount'];
  SELECT coalesce(array_agg(ARRAY[l.description, l.quantity::text, l.unit_amount::text,
                                  fluxrate_internal.money_text(l.line_total, i.currency)] ORDER BY l.position), '{}')
    INTO rows
    FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id;
  totals := ARRAY[['Subtotal', fluxrate_internal.money_text(i.subtotal, i.currency)],
                  ['Tax' || CASE WHEN i.tax_rate > 0 THEN ' (' || trim_scale(i.tax_rate * 100) || '%)' ELSE '' END,
                   fluxrate_internal.money_text(i.tax, i.currency)],
                  ['Total', fluxrate_internal.money_text(i.total, i.currency)]];
  IF i.credits_applied <> 0 THEN
    totals := totals || ARRAY[['Credits applied', fluxrate_internal.money_text(-i.credits_applied, i.currency)]];
  END IF;
  IF i.amount_paid <> 0 THEN
    totals := totals || ARRAY[['Amount paid', fluxrate_internal.money_text(i.amount_paid, i.currency)]];
  END IF;
  totals := totals || ARRAY[['Amount due', fluxrate_internal.money_text(i.amount_due, i.currency)]];
  notes := CASE WHEN link IS NOT NULL THEN ARRAY['View the invoice online: ' || link] ELSE '{}' END;
END
$$;

-- A line of text as lines of at most `width` characters, broken at spaces (a
-- longer word is cut); control characters (a line break) are spaces first.
CREATE OR REPLACE FUNCTION fluxrate_internal.wrap_text(t text, width integer) RETURNS text[]
  LANGUAGE plpgsql IMMUTABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_out text[] := '{}'::text[];
  v_cur text := '';
  v_word text;
BEGIN
  FOREACH v_word IN ARRAY regexp_split_to_array(btrim(regexp_replace(coalesce(t, ''), '[[:cntrl:]]', ' ', 'g')), ' +') LOOP
    WHILE length(v_word) > width LOOP
      IF v_cur <> '' THEN
        v_out := array_append(v_out, v_cur);
        v_cur := '';
      END IF;
      v_out := array_append(v_out, left(v_word, width));
      v_word := substr(v_word, width + 1);
    END LOOP;
    IF v_cur = '' THEN
      v_cur := v_word;
    ELSIF length(v_cur) + 1 + length(v_word) <= width THEN
      v_cur := v_cur || ' ' || v_word;
    ELSE
      v_out := array_append(v_out, v_cur);
      v_cur := v_word;
    END IF;
  END LOOP;
  RETURN array_append(v_out, v_cur);
END
$$;

-- The plain-text invoice: label/value pairs, then the lines as a table with
-- the numbers right-aligned (a description wider than 48 characters wraps
-- under itself), then the totals under the amount column.
CREATE OR REPLACE FUNCTION fluxrate_internal.render_invoice_text(org_id uuid, invoice_id uuid) RETURNS text
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p record := fluxrate_internal.invoice_parts(org_id, invoice_id);
  w integer[] := ARRAY[0, 0, 0, 0];
  v_label_w integer := 0;
  v_out text[] := '{}'::text[];
  v_line text;
  v_desc text[];
  n integer := coalesce(array_length(p.rows, 1), 0);
BEGIN
  FOR k IN 1 .. array_length(p.pairs, 1) LOOP
    v_label_w := greatest(v_label_w, length(p.pairs[k][1]) + 1);
  END LOOP;
  v_out := ARRAY[upper(p.title), ''];
  FOR k IN 1 .. array_length(p.pairs, 1) LOOP
    v_out := array_append(v_out, rpad(p.pairs[k][1] || ':', v_label_w + 1) || p.pairs[k][2]);
  END LOOP;
  v_out := array_append(v_out, '');
  FOR c IN 1 .. 4 LOOP
    w[c] := length(p.head[c]);
    FOR k IN 1 .. n LOOP
      w[c] := greatest(w[c], length(p.rows[k][c]));
    END LOOP;
  END LOOP;
  w[1] := greatest(length(p.head[1]), least(w[1], 48));
  FOR k IN 1 .. array_length(p.totals, 1) LOOP
    w[4] := greatest(w[4], length(p.totals[k][2]));
  END LOOP;
  -- the totals' labels sit right-aligned under quantity and unit amount
  v_line := rpad(p.head[1], w[1]) || '  ' || lpad(p.head[2], w[2]) || '  ' || lpad(p.head[3], w[3]) || '  ' || lpad(p.head[4], w[4]);
  v_out := v_out || ARRAY[v_line, repeat('-', w[1]) || '  ' || repeat('-', w[2]) || '  ' || repeat('-', w[3]) || '  ' || repeat('-', w[4])];
  FOR k IN 1 .. n LOOP
    v_desc := fluxrate_internal.wrap_text(p.rows[k][1], w[1]);
    v_out := array_append(v_out, rpad(v_desc[1], w[1]) || '  ' || lpad(p.rows[k][2], w[2]) || '  '
                                 || lpad(p.rows[k][3], w[3]) || '  ' || lpad(p.rows[k][4], w[4]));
    v_out := v_out || v_desc[2:];
  END LOOP;
  IF n = 0 THEN
    v_out := array_append(v_out, '(no lines)');
  END IF;
  v_out := array_append(v_out, repeat(' ', w[1] + w[2] + w[3] + 6) || repeat('-', w[4]));
  FOR k IN 1 .. array_length(p.totals, 1) LOOP
    v_out := array_append(v_out, lpad(p.totals[k][1], w[1] + w[2] + w[3] + 4) || '  ' || lpad(p.totals[k][2], w[4]));
  END LOOP;
  IF coalesce(array_length(p.notes, 1), 0) > 0 THEN
    v_out := array_append(v_out, '') || p.notes;
  END IF;
  RETURN array_to_string(v_out, E'\n') || E'\n';
END
$$;

-- The HTML invoice, a whole document; the e-mail passes its greeting, which
-- goes before the invoice.
CREATE OR REPLACE FUNCTION fluxrate_internal.render_invoice_html(org_id uuid, invoice_id uuid, greeting text[] DEFAULT '{}')
  RETURNS text
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p record := fluxrate_internal.invoice_parts(org_id, invoice_id);
  n integer := coalesce(array_length(p.rows, 1), 0);
  t integer := array_length(p.totals, 1);
  v_out text[];
  e text;
BEGIN
  v_out := ARRAY['<!DOCTYPE html><html><head><meta charset="utf-8"><title>' || fluxrate_internal.html_escape(p.subject)
                   || '</title></head>',
                 '<body style="font-family:sans-serif">'];
  FOREACH e IN ARRAY coalesce(greeting, '{}') LOOP
    v_out := array_append(v_out, '<p>' || fluxrate_internal.html_escape(e) || '</p>');
  END LOOP;
  v_out := v_out || ARRAY['<h1>' || fluxrate_internal.html_escape(p.title) || '</h1>', '<table cellpadding="2">'];
  FOR k IN 1 .. array_length(p.pairs, 1) LOOP
    v_out := array_append(v_out, format('<tr><th style="text-align:left">%s</th><td>%s</td></tr>',
                             fluxrate_internal.html_escape(p.pairs[k][1]), fluxrate_internal.html_escape(p.pairs[k][2])));
  END LOOP;
  v_out := v_out || ARRAY['</table>',
    '<table cellpadding="4"><tr><th style="text-align:left">Description</th><th style="text-align:right">Quantity</th><th style="text-align:right">Unit amount</th><th style="text-align:right">Amount</th></tr>'];
  FOR k IN 1 .. n LOOP
    v_out := array_append(v_out, format('<tr><td>%s</td><td style="text-align:right">%s</td><td style="text-align:right">%s</td>'
                             '<td style="text-align:right">%s</td></tr>',
                             fluxrate_internal.html_escape(p.rows[k][1]), fluxrate_internal.html_escape(p.rows[k][2]),
                             fluxrate_internal.html_escape(p.rows[k][3]), fluxrate_internal.html_escape(p.rows[k][4])));
  END LOOP;
  FOR k IN 1 .. t LOOP
    v_out := array_append(v_out, format(CASE WHEN k = t OR p.totals[k][1] = 'Total'
                                  THEN '<tr><td colspan="3"><strong>%s</strong></td><td style="text-align:right"><strong>%s</strong></td></tr>'
                                  ELSE '<tr><td colspan="3">%s</td><td style="text-align:right">%s</td></tr>' END,
                             fluxrate_internal.html_escape(p.totals[k][1]), fluxrate_internal.html_escape(p.totals[k][2])));
  END LOOP;
  v_out := array_append(v_out, '</table>');
  IF p.link IS NOT NULL THEN
    v_out := array_append(v_out, format('<p><a href="%s">View the invoice online</a></p>', fluxrate_internal.html_escape(p.link)));
  END IF;
  RETURN array_to_string(array_append(v_out, '</body></html>'), E'\n');
END
$$;

CREATE OR REPLACE FUNCTION fluxrate_internal.render_invoice_pdf(org_id uuid, invoice_id uuid) RETURNS bytea
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  p record := fluxrate_internal.invoice_parts(org_id, invoice_id);
BEGIN
  RETURN fluxrate_internal.render_pdf(p.title, p.pairs, p.head, p.rows, p.totals, p.notes);
END
$$;

-- The public forms ------------------------------------------------------------

-- psql: SELECT fluxrate.invoice_text(:'invoice_id') \g (format=unaligned tuples_only)
CREATE OR REPLACE FUNCTION fluxrate.invoice_text(invoice_id uuid) RETURNS fluxrate."text/plain"
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, invoice_text.invoice_id);
BEGIN
  RETURN fluxrate_internal.render_invoice_text(v_org, i.id);
END
$$;

CREATE OR REPLACE FUNCTION fluxrate.invoice_html(invoice_id uuid) RETURNS fluxrate."text/html"
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, invoice_html.invoice_id);
BEGIN
  RETURN fluxrate_internal.render_invoice_html(v_org, i.id);
END
$$;

CREATE OR REPLACE FUNCTION fluxrate.invoice_pdf(invoice_id uuid) RETURNS fluxrate."application/pdf"
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(v_org, invoice_pdf.invoice_id);
BEGIN
  RETURN fluxrate_internal.render_invoice_pdf(v_org, i.id);
END
$$;

-- Table-shaped reads ------------------------------------------------------------
-- One row per invoice / per line, with the customer's name, for psql and
-- spreadsheets (PostgREST serves them as JSON arrays, CSV with Accept: text/csv).
-- Confined to the calling organization by the org_id predicate and, behind
-- it, the row-level security of every table (these run as fluxrate_owner).

-- No parameters: filter with WHERE in SQL, or with PostgREST's column filters
-- (GET /rpc/invoice_rows?status=eq.OPEN&customer_name=eq.Initech).
CREATE OR REPLACE FUNCTION fluxrate.invoice_rows()
  RETURNS TABLE (invoice_number text, customer_name text, status text, kind text, currency text,
                 subtotal numeric, tax numeric, total numeric, amount_paid numeric, amount_due numeric,
                 period_start timestamptz, period_end timestamptz, issue_date timestamptz, due_date timestamptz,
                 line_count bigint, invoice_id uuid, customer_id uuid)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN QUERY
  SELECT i.invoice_number, c.name, i.status, i.kind, i.currency, i.subtotal, i.tax, i.total, i.amount_paid, i.amount_due,
         i.period_start, i.period_end, i.issue_date, i.due_date,
         (SELECT count(*) FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id),
         i.id, i.customer_id
    FROM fluxrate_internal.invoices i
    JOIN fluxrate_internal.customers c ON c.org_id = i.org_id AND c.id = i.customer_id
   WHERE i.org_id = v_org
   ORDER BY i.created_at, i.id;
END
$$;

-- The lines of every invoice of the organization (WHERE invoice_number = ...).
CREATE OR REPLACE FUNCTION fluxrate.invoice_line_rows()
  RETURNS TABLE (invoice_number text, customer_name text, "position" integer, line_type text, description text,
                 quantity numeric, unit_amount numeric, line_total numeric, currency text,
                 period_start timestamptz, period_end timestamptz, invoice_id uuid, line_id uuid)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  RETURN QUERY
  SELECT i.invoice_number, c.name, l.position, l.line_type, l.description, l.quantity, l.unit_amount, l.line_total,
         i.currency, l.period_start, l.period_end, i.id, l.id
    FROM fluxrate_internal.invoices i
    JOIN fluxrate_internal.customers c ON c.org_id = i.org_id AND c.id = i.customer_id
    JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
   WHERE i.org_id = v_org
   ORDER BY i.created_at, i.id, l.position;
END
$$;

-- JSON in a logical order ---------------------------------------------------------
-- jsonb keeps an object's keys sorted by length, then bytes ("id", "tax",
-- "kind", "total", ...).  The documents are still built as jsonb (they compose
-- with || and the jsonb operators); the reads a person looks at return json
-- written by json_in_order (src/render_json.c): what it is, what it belongs
-- to, its terms, quantities and money, dates, then the nested collections; a
-- key the list does not name goes where '*' stands, in byte order.
CREATE OR REPLACE FUNCTION fluxrate_internal.json_in_order(doc jsonb, key_order text[]) RETURNS json
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
  AS 'MODULE_PATHNAME', 'fr_json_in_order';

CREATE OR REPLACE FUNCTION fluxrate_internal.ordered_json(doc jsonb) RETURNS json
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$
  SELECT fluxrate_internal.json_in_order(doc, ARRAY[
    -- what it is
    'id', 'position', 'invoice_number', 'name', 'display_name', 'lookup_key', 'lookup_id', 'external_id', 'email', 'phone',
    'status', 'kind', 'type', 'line_type',
    -- what it belongs to
    'organization_id', 'feature_id', 'meter_id', 'meter_name', 'meter_token', 'property_name', 'aggregation_type',
    'unique_property', 'unit', 'filters', 'customer_id', 'customer_name', 'subscription_id', 'plan_id', 'plan_name', 'charge_id', 'endpoint_id',
    'description',
    -- its terms
    'billing_interval', 'alignment', 'currency', 'pricing_model', 'billing_timing', 'unit_price', 'package_size',
    'package_price', 'free_units', 'tiers', 'trial_days', 'minimum_commitment', 'is_active', 'is_enabled', 'usage_limit',
    'usage_reset_period', 'is_soft_limit', 'static_value',
    'billing_country', 'billing_state', 'billing_address_line1', 'billing_address_city', 'billing_address_state',
    'billing_address_postal_code', 'billing_address_country', 'payment_terms_days', 'grace_period_seconds', 'auto_email',
    'invoice_link_base',
    -- quantities and money
    'quantity', 'unit_amount', 'line_total', 'period', 'usage', 'total_usage', 'event_count', 'total_events',
    'unique_customers', 'first_event_date', 'last_event_date', 'today_usage', 'this_week_usage', 'this_month_usage',
    'subtotal', 'tax', 'tax_rate', 'total', 'credits_applied', 'amount_due', 'amount_paid',
    -- when
    'period_start', 'period_end', 'current_period_start', 'current_period_end', 'start_date', 'trial_end_date',
    'cancel_at_period_end', 'canceled_at', 'cancel_reason', 'ended_at', 'issue_date', 'due_date', 'scheduled_finalize_at',
    'finalized_at', 'paid_at', 'voided_at', 'public_token',
    '*',            -- the keys this list does not name, in byte order
    'created_at', 'updated_at', 'meta_data',
    -- what it contains
    'meter', 'charges', 'features', 'line_items', 'grouped_data', 'subscriptions', 'data', 'meta']::text[])
$$;

-- get_invoice's document: the invoice with its lines and the customer's name.
CREATE OR REPLACE FUNCTION fluxrate_internal.invoice_document(org_id uuid, invoice_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  i fluxrate_internal.invoices := fluxrate_internal.load_invoice(invoice_document.org_id, invoice_document.invoice_id);
BEGIN
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.invoice_json(i) || jsonb_build_object('customer_name',
    (SELECT c.name FROM fluxrate_internal.customers c WHERE c.org_id = i.org_id AND c.id = i.customer_id)));
END
$$;
