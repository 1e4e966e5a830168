#!/usr/bin/env bash
# The invoice for people (75_render.sql, src/render_pdf.c), read back by real readers:
#   - a month of a hybrid plan with tax is closed and finalized by the jobs;
#   - its text (psql), HTML and PDF forms (the PDF through poppler's pdftotext)
#     each show the number, every line and every total to the cent, equal to
#     get_invoice's amounts and to the hand computation below;
#   - the invoice e-mail, received by a real SMTP server, carries the same PDF
#     (byte for byte) as an application/pdf attachment, next to the text and
#     HTML parts;
#   - another organization gets PT404 for each form and sees no rows.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start invoice_documents "log_statement = 'none'"
PY=/usr/bin/python3
W=$(mktemp -d /tmp/fluxrate-docs-XXXXXX)
SMTP_PW='docs-smtp-pw-0815'
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; cluster_stop; }
trap stop_all EXIT
wait_file() { for _ in $(seq 1 100); do [ -s "$1" ] && return 0; sleep 0.1; done; fail "$1 never appeared"; }
command -v pdftotext >/dev/null || fail "pdftotext (poppler-utils) is not installed"

$PY "$ROOT/test/peers/smtp_sink.py" "$W/smtp" mailer "$SMTP_PW" & pids+=($!)
wait_file "$W/smtp/port"
SMTP_PORT=$(cat "$W/smtp/port")

# one statement's rows, bare, acting for an organization (\gset hides act_as's own row)
as_org() { printf '%s\n' "SELECT fluxrate.act_as('$1', session => true) \\gset" "$2;" | psql -X -q -t -A -v ON_ERROR_STOP=1 -v VERBOSITY=verbose; }
now() { q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '$1'"; }
now '2026-01-01 00:00:00+00'
ORG=$(q "SELECT (fluxrate.create_organization('Acme Billing', grace_period => '0', payment_terms_days => 30))->>'id'")
OTHER=$(q "SELECT (fluxrate.create_organization('Other Org'))->>'id'")
A="SELECT fluxrate.act_as('$ORG');"
q "$A SELECT fluxrate.set_smtp_settings('127.0.0.1', $SMTP_PORT, 'billing@acme.test', username => 'mailer',
      password => '$SMTP_PW', security => 'none')" >/dev/null
q "$A SELECT fluxrate.set_tax_rate('US', 0.0825, 'TX', 'Texas sales tax')" >/dev/null
METER=$(q "$A SELECT (fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls'))->>'meter_id'" | tail -1)
PLAN=$(q "$A SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro', type => 'HYBRID',
       billing_interval => 'month', currency => 'USD'))->>'id'" | tail -1)
q "$A SELECT fluxrate.add_charge(plan_id => '$PLAN', type => 'FIXED', unit_price => 49, display_name => 'Platform fee',
       billing_timing => 'in_arrears')" >/dev/null
q "$A SELECT fluxrate.add_charge(plan_id => '$PLAN', type => 'USAGE', meter_id => '$METER', unit_price => 0.002,
       display_name => 'API calls')" >/dev/null
CUST=$(q "$A SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech',
       billing_address_country => 'US', billing_address_state => 'TX'))->>'id'" | tail -1)
q "$A SELECT fluxrate.create_subscription(customer_id => '$CUST', plan_id => '$PLAN', billing_interval => 'month',
       start_date => '2026-01-01 00:00:00+00')" >/dev/null
now '2026-01-10 12:00:00+00'
q "$A SELECT fluxrate.track(meter_token => (SELECT meter_token FROM fluxrate_internal.meters WHERE id = '$METER')::text,
       customer_external_id => 'initech', quantity => 1234567, idempotency_key => 'jan-1')" >/dev/null

echo "== February 1st: the jobs close January, finalize it (grace 0) and e-mail it"
now '2026-02-01 00:00:30+00'
psql -X -q -c "CALL fluxrate.close_due_periods()" -c "CALL fluxrate.finalize_due_invoices()" -c "CALL fluxrate.deliver_pending()"
INV=$(q "SELECT id FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND kind = 'subscription'")
[ -n "$INV" ] || fail "no subscription invoice was closed"
q "$A SELECT fluxrate.get_invoice('$INV')" | tail -1 > "$W/invoice.json"
as_org "$ORG" "SELECT fluxrate.invoice_text('$INV')" > "$W/invoice.txt"
as_org "$ORG" "SELECT fluxrate.invoice_html('$INV')" > "$W/invoice.html"
as_org "$ORG" "SELECT encode(fluxrate.invoice_pdf('$INV'), 'hex')" | $PY -c \
  'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().split()[-1]))' > "$W/invoice.pdf"
pdftotext -layout "$W/invoice.pdf" "$W/invoice.pdf.txt"
cat "$W/invoice.txt"
wait_file "$(ls "$W"/smtp/*.eml 2>/dev/null | head -1 || echo "$W/smtp/none.eml")"

$PY - "$W" <<'PYEOF'
import email, email.policy, glob, hashlib, html, json, re, subprocess, sys
from decimal import Decimal
w = sys.argv[1]
inv = json.loads(open(w + "/invoice.json").read(), parse_float=Decimal, parse_int=Decimal)
text = open(w + "/invoice.txt").read()
page = html.unescape(re.sub(r"<[^>]+>", " ", open(w + "/invoice.html").read()))
pdf_text = open(w + "/invoice.pdf.txt").read()
pdf = open(w + "/invoice.pdf", "rb").read()
assert pdf.startswith(b"%PDF-1."), pdf[:16]

# By hand: January's usage is 1,234,567 calls x 0.002 = 2,469.134 -> 2,469.13 USD;
# the platform fee in arrears 1 x 49 = 49.00 USD.  Subtotal 2,469.13 + 49.00 = 2,518.13.
# Tax (Texas 8.25%) on the unrounded subtotal: 2,518.134 x 0.0825 = 207.746055 -> 207.75.
# Total 2,518.13 + 207.75 = 2,725.88 = amount due (nothing paid).
assert inv["currency"] == "USD" and inv["status"] == "OPEN", inv
assert (inv["subtotal"], inv["tax"], inv["total"], inv["amount_due"]) == \
       (Decimal("2518.13"), Decimal("207.75"), Decimal("2725.88"), Decimal("2725.88")), inv
want_lines = {("API calls", Decimal("1234567"), Decimal("0.002"), Decimal("2469.13")),
              ("Platform fee", Decimal("1"), Decimal("49"), Decimal("49.00"))}
got_lines = {(l["description"], l["quantity"], l["unit_amount"], l["line_total"]) for l in inv["line_items"]}
assert got_lines == want_lines, got_lines

def money(x):
    return "%s USD" % Decimal(x).quantize(Decimal("0.01"))

number = inv["invoice_number"]
assert re.fullmatch(r"INV-2026-\d{4}", number), number
for name, doc, sep in (("text", text, r" +"), ("html", page, r"\s+"), ("pdf", pdf_text, r"\s+")):
    assert number in doc, (name, number)
    for l in inv["line_items"]:
        row = sep.join(re.escape(str(v)) for v in (l["description"], l["quantity"], l["unit_amount"]))
        row += sep + re.escape(money(l["line_total"]))
        assert re.search(row, doc), (name, row, doc)
    for label, key in (("Subtotal", "subtotal"), (r"Tax \(8\.25%\)", "tax"), ("Total", "total"), ("Amount due", "amount_due")):
        assert re.search(r"(^|\s)" + label + sep + re.escape(money(inv[key])), doc, re.M), (name, label, doc)
    assert "Initech" in doc and "Acme Billing" in doc, name
    print("%s invoice agrees with get_invoice: %s, total %s" % (name, number, money(inv["total"])))

# the e-mail: text and HTML parts and the PDF attachment, the same bytes as invoice_pdf()
emls = glob.glob(w + "/smtp/*.eml")
assert len(emls) == 1, emls
m = email.message_from_bytes(open(emls[0], "rb").read(), policy=email.policy.default)
assert m.get_content_type() == "multipart/mixed", m.get_content_type()
assert str(m["Subject"]) == "Invoice %s from Acme Billing: 2725.88 USD due 2026-03-03" % number, str(m["Subject"])
body = m.get_body(("plain",)).get_content()
assert text.strip() in body, body      # the e-mail's text part is the text invoice
assert "<strong>2725.88 USD</strong>" in m.get_body(("html",)).get_content()
atts = [p for p in m.iter_attachments()]
assert len(atts) == 1, atts
att = atts[0]
assert att.get_content_type() == "application/pdf", att.get_content_type()
assert att.get_filename() == "invoice-%s.pdf" % number, att.get_filename()
data = att.get_content()
assert hashlib.sha256(data).hexdigest() == hashlib.sha256(pdf).hexdigest(), "the attachment is not invoice_pdf()"
out = subprocess.run(["pdftotext", "-layout", "-", "-"], input=data, capture_output=True, check=True).stdout.decode()
assert re.search(r"Amount due\s+2725\.88 USD", out), out
print("e-mail carries the PDF (%d bytes, sha256 %s...)" % (len(data), hashlib.sha256(data).hexdigest()[:12]))
PYEOF

echo "== a long invoice: 150 lines over several PDF pages, long descriptions wrapped, every amount on a page"
# by hand: line n (1..150) is n x 1.01, so its amount is 1.01 n; the total is
# 1.01 x (150 x 151 / 2) = 1.01 x 11,325 = 11,438.25 (Initech is taxed 8.25%:
# 11,438.25 x 0.0825 = 943.655625 -> 943.66, amount due 12,381.91)
LONG=$(q "$A SELECT (fluxrate.create_invoice('$CUST', 'USD', line_items => (SELECT jsonb_agg(jsonb_build_object(
       'description', 'Item ' || n || CASE WHEN n % 10 = 0 THEN ' with a description long enough to wrap over more than one line of the table in the PDF invoice' ELSE '' END,
       'quantity', n, 'unit_amount', 1.01) ORDER BY n) FROM generate_series(1, 150) n)))->>'id'" | tail -1)
as_org "$ORG" "SELECT encode(fluxrate.invoice_pdf('$LONG'), 'hex')" | $PY -c \
  'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().split()[-1]))' > "$W/long.pdf"
pages=$(pdfinfo "$W/long.pdf" | awk '/^Pages:/ {print $2}')
[ "$pages" -ge 3 ] || fail "150 lines on $pages pages"
pdftotext -layout "$W/long.pdf" "$W/long.txt"
as_org "$ORG" "SELECT fluxrate.invoice_text('$LONG')" > "$W/long-text.txt"
$PY - "$W/long.txt" "$W/long-text.txt" <<'PYEOF'
import re, sys
from decimal import Decimal
t = open(sys.argv[1]).read()
# the text form: the same amounts, the long descriptions wrapped at 48 characters under themselves
text = open(sys.argv[2]).read()
assert max(len(l) for l in text.splitlines() if l.startswith("Item ")) <= 48 + 2 + 8 + 2 + 11 + 2 + 12, "a line too wide"
assert re.search(r"\nItem 10 with a description long enough to wrap +10 +1\.01 +10\.10 USD\nover more than one line", text), text[:1500]
for n in range(1, 151):
    amount = (Decimal("1.01") * n).quantize(Decimal("0.01"))
    assert re.search(r"\nItem %d\b.* %d +1\.01 +%s USD\n" % (n, n, re.escape(str(amount))), text), ("text line", n)
assert re.search(r"\n +Amount due +12381\.91 USD\n", text)
for n in range(1, 151):
    amount = (Decimal("1.01") * n).quantize(Decimal("0.01"))
    assert re.search(r"Item %d\b.*\s%d\s+1\.01\s+%s USD" % (n, n, re.escape(str(amount))), t), ("line", n, amount)
for label, value in (("Subtotal", "11438.25"), (r"Tax \(8\.25%\)", "943.66"), ("Total", "12381.91"), ("Amount due", "12381.91")):
    assert re.search(label + r"\s+" + re.escape(value) + " USD", t), (label, value, t[-1500:])
# the long description wraps onto a second line of its own, under the description column
assert re.search(r"Item 10 with a description long enough to wrap over more than +10 +1\.01 +10\.10 USD\none line of the table in the PDF invoice\n", t), t[:2000]
print("150 lines, total 12381.91 USD")
PYEOF
echo "long invoice: $pages pages"

echo "== another organization: PT404 for every form, no rows"
B="SELECT fluxrate.act_as('$OTHER');"
for f in invoice_text invoice_html invoice_pdf; do
  got=$(as_org "$OTHER" "SELECT fluxrate.$f('$INV')" 2>&1 || true)
  echo "$got" | grep -q '^ERROR:  PT404: invoice not found' || fail "$f of another organization's invoice: expected PT404, got $got"
done
got=$(q "$B SELECT (SELECT count(*) FROM fluxrate.invoice_rows()) || ' ' || (SELECT count(*) FROM fluxrate.invoice_line_rows())" | tail -1)
[ "$got" = "0 0" ] || fail "another organization sees rows: $got"
got=$(q "$A SELECT (SELECT count(*) FROM fluxrate.invoice_rows()) || ' ' || (SELECT count(*) FROM fluxrate.invoice_line_rows())" | tail -1)
[ "$got" = "2 152" ] || fail "the organization's own rows: $got"
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
