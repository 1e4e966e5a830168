#!/usr/bin/env bash
# Delivery against real peers on loopback: an SMTP server (python3-aiosmtpd,
# with AUTH, so the sealed password must really reach it) and an HTTP receiver.
#   - a rolled-back finalization sends nothing; a committed one exactly one e-mail,
#     whose recipient, subject, total and public link are checked, and which
#     survives further runs without a duplicate
#   - the webhook signature is recomputed from the secret shown at creation
#   - a receiver answering 500 gets the retry schedule (pinned time), the same
#     event id on every attempt, and the delivery succeeds when it recovers
#   - SMTP down: the e-mail is retried later, not lost
#   - neither secret appears in plain text in any table (pg_dump) or the server log
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start delivery "log_statement = 'none'"
PY=/usr/bin/python3
W=$(mktemp -d /tmp/fluxrate-peers-XXXXXX)
SMTP_PW='Sm7p-pa55-never-logged-4711'
pids=()
stop_peers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; cluster_stop; }
trap stop_peers EXIT
wait_file() { for _ in $(seq 1 100); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "FAIL: $1 never appeared"; exit 1; }

$PY "$ROOT/test/peers/smtp_sink.py" "$W/smtp" mailer "$SMTP_PW" & pids+=($!); smtp_pid=$!
$PY "$ROOT/test/peers/http_sink.py" "$W/http" & pids+=($!)
wait_file "$W/smtp/port"; wait_file "$W/http/port"
SMTP_PORT=$(cat "$W/smtp/port"); HTTP_PORT=$(cat "$W/http/port")
echo "smtp on $SMTP_PORT, http on $HTTP_PORT"

now() { q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '$1'"; }
now '2026-03-01 00:00:00+00'
ORG=$(q "SELECT (fluxrate.create_organization('Acme Billing', grace_period => '0', payment_terms_days => 15))->>'id'")
A="SELECT fluxrate.act_as('$ORG');"
q "$A SELECT fluxrate.set_smtp_settings('127.0.0.1', $SMTP_PORT, 'billing@acme.test', username => 'mailer',
      password => '$SMTP_PW', security => 'none')" >/dev/null
HOOK=$(q "$A SELECT fluxrate.create_webhook_endpoint('http://127.0.0.1:$HTTP_PORT/fluxrate')" | tail -1)
SECRET=$(echo "$HOOK" | $PY -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
CUST=$(q "$A SELECT (fluxrate.create_customer('Bob Buyer', 'bob@example.com', billing_address_country => 'US'))->>'id'" | tail -1)
# 3 x 19.99 = 59.97 and 1 x 0.03 = 0.03: total 60.00
INV=$(q "$A SELECT (fluxrate.create_invoice('$CUST', 'USD', line_items =>
      '[{\"description\": \"Seats\", \"quantity\": 3, \"unit_amount\": 19.99}, {\"description\": \"Rounding\", \"quantity\": 1, \"unit_amount\": 0.03}]'))->>'id'" | tail -1)

echo "== a rolled-back finalization sends nothing"
psql -X -q -v ON_ERROR_STOP=1 -c "BEGIN; $A SELECT fluxrate.finalize_invoice('$INV'); ROLLBACK;" >/dev/null
psql -X -q -c "CALL fluxrate.deliver_pending()"
sleep 0.5
[ -z "$(ls "$W/smtp" | grep eml || true)" ] || fail "an e-mail was sent for a rolled-back finalization"
[ -z "$(ls "$W/http" | grep json || true)" ] || fail "a webhook was sent for a rolled-back finalization"

echo "== a committed finalization sends exactly one e-mail"
q "$A SELECT fluxrate.finalize_invoice('$INV')" >/dev/null
psql -X -q -c "CALL fluxrate.deliver_pending()"
psql -X -q -c "CALL fluxrate.deliver_pending()"    # a second run sends nothing again
TOKEN=$(q "SELECT public_token FROM fluxrate_internal.invoices WHERE id = '$INV'")
NUMBER=$(q "SELECT invoice_number FROM fluxrate_internal.invoices WHERE id = '$INV'")
[ "$(ls "$W/smtp" | grep -c '\.eml$')" = 1 ] || fail "expected exactly one e-mail, got: $(ls "$W/smtp")"
$PY - "$W/smtp" "$NUMBER" "$TOKEN" <<'PYEOF'
import email, email.policy, glob, json, sys
d, number, token = sys.argv[1:]
eml = glob.glob(d + "/*.eml")[0]
env = json.load(open(eml[:-4] + ".json"))
m = email.message_from_bytes(open(eml, "rb").read(), policy=email.policy.default)
assert env["rcpt_tos"] == ["bob@example.com"], env
assert env["mail_from"] == "billing@acme.test", env
assert env["auth"], "the server did not authenticate the sender"
assert m["To"].addresses[0].addr_spec == "bob@example.com", m["To"]
want = "Invoice %s from Acme Billing: 60.00 USD due 2026-03-16" % number
assert str(m["Subject"]) == want, (str(m["Subject"]), want)
text = m.get_body(("plain",)).get_content()
html = m.get_body(("html",)).get_content()
link = "http://localhost:3000/rpc/public_invoice?token=" + token
import re
# the text invoice (75_render.sql): one aligned row per line, then the totals
for needle in (r"Seats +3 +19\.99 +59\.97 USD", r"Rounding +1 +0\.03 +0\.03 USD", r"\n +Total +60\.00 USD",
               r"Due date: +2026-03-16", re.escape(link)):
    assert re.search(needle, text), (needle, text)
assert 'href="%s"' % link in html and "<strong>60.00 USD</strong>" in html, html
print("e-mail ok:", want)
PYEOF

echo "== the webhook signature verifies with the secret shown at creation"
OUTBOX_ID=$(q "SELECT id FROM fluxrate_internal.outbox WHERE org_id = '$ORG' AND event = 'invoice.finalized'")
$PY - "$W/http" "$SECRET" "$OUTBOX_ID" "$INV" <<'PYEOF'
import glob, hashlib, hmac, json, sys
d, secret, event_id, inv = sys.argv[1:]
hooks = [json.load(open(f)) for f in sorted(glob.glob(d + "/*.json"))]
fin = [h for h in hooks if h["headers"]["x-fluxrate-event"] == "invoice.finalized"]
assert len(fin) == 1, hooks
h = fin[0]
sig = hmac.new(secret.encode(), h["body"].encode(), hashlib.sha256).hexdigest()
assert h["headers"]["x-fluxrate-signature"] == sig, (h["headers"], sig)
assert h["headers"]["x-fluxrate-event-id"] == event_id
body = json.loads(h["body"])
assert sorted(body) == ["data", "event", "timestamp"], body
assert body["data"]["invoice_id"] == inv and body["data"]["total"] == 60.00 and body["data"]["status"] == "OPEN", body
print("signature ok:", sig)
PYEOF

echo "== a receiver answering 500 gets the retry schedule, with one stable event id"
echo 500 > "$W/http/status"
q "$A SELECT fluxrate.pay_invoice('$INV')" >/dev/null
DEL=$(q "SELECT id FROM fluxrate_internal.deliveries WHERE org_id = '$ORG' AND event = 'invoice.paid'")
for t in '00:00:00' '00:00:29' '00:00:30' '00:02:30' '00:12:30' '01:12:30'; do
  now "2026-03-01 $t+00"
  psql -X -q -c "CALL fluxrate.deliver_pending()"
done
got=$(q "SELECT status || ' ' || attempts || ' ' || last_status_code || ' ' || next_attempt_at FROM fluxrate_internal.deliveries WHERE id = '$DEL'")
echo "after five failures: $got"
[ "$got" = "PENDING 5 500 2026-03-01 07:12:30+00" ] || fail "unexpected state after five failures: $got"
echo 200 > "$W/http/status"
now '2026-03-01 07:12:29+00'; psql -X -q -c "CALL fluxrate.deliver_pending()"
now '2026-03-01 07:12:30+00'; psql -X -q -c "CALL fluxrate.deliver_pending()"
got=$(q "SELECT status || ' ' || attempts || ' ' || last_status_code FROM fluxrate_internal.deliveries WHERE id = '$DEL'")
[ "$got" = "SENT 6 200" ] || fail "expected SENT after the receiver recovered, got $got"
codes=$(q "SELECT string_agg(status_code::text, ',' ORDER BY attempt) FROM fluxrate_internal.delivery_attempts WHERE delivery_id = '$DEL'")
[ "$codes" = "500,500,500,500,500,200" ] || fail "attempt log: $codes"
$PY - "$W/http" <<'PYEOF'
import glob, json, sys
hooks = [json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/*.json"))]
paid = [h for h in hooks if h["headers"]["x-fluxrate-event"] == "invoice.paid"]
assert len(paid) == 6, len(paid)
assert len({h["headers"]["x-fluxrate-event-id"] for h in paid}) == 1
assert len({h["body"] for h in paid}) == 1 and len({h["headers"]["x-fluxrate-signature"] for h in paid}) == 1
print("6 attempts, one event id:", paid[0]["headers"]["x-fluxrate-event-id"])
PYEOF

echo "== SMTP down: the e-mail is retried later, not lost"
kill "$smtp_pid"; wait "$smtp_pid" 2>/dev/null || true
now '2026-03-02 00:00:00+00'
INV2=$(q "$A SELECT (fluxrate.create_invoice('$CUST', 'USD', line_items => '[{\"description\": \"Support\", \"quantity\": 1, \"unit_amount\": 250}]'))->>'id'" | tail -1)
q "$A SELECT fluxrate.finalize_invoice('$INV2')" >/dev/null
psql -X -q -c "CALL fluxrate.deliver_pending()"
got=$(q "SELECT status || ' ' || attempts || ' ' || next_attempt_at FROM fluxrate_internal.deliveries WHERE invoice_id = '$INV2' AND channel = 'email'")
echo "with the server down: $got"
[ "$got" = "PENDING 1 2026-03-02 00:00:30+00" ] || fail "expected a scheduled retry, got $got"
$PY "$ROOT/test/peers/smtp_sink.py" "$W/smtp" mailer "$SMTP_PW" "$SMTP_PORT" & pids+=($!)
for _ in $(seq 1 50); do $PY -c "import socket; socket.create_connection(('127.0.0.1', $SMTP_PORT), 1)" 2>/dev/null && break; sleep 0.1; done
now '2026-03-02 00:00:30+00'
psql -X -q -c "CALL fluxrate.deliver_pending()"
got=$(q "SELECT status || ' ' || attempts FROM fluxrate_internal.deliveries WHERE invoice_id = '$INV2' AND channel = 'email'")
[ "$got" = "SENT 2" ] || fail "expected the e-mail sent on the retry, got $got"
[ "$(ls "$W/smtp" | grep -c '\.eml$')" = 2 ] || fail "expected two e-mails in all: $(ls "$W/smtp")"
grep -l "Support" "$W"/smtp/*.eml >/dev/null 2>&1 || $PY - "$W/smtp" <<'PYEOF'
import email, email.policy, glob, sys
import re
ok = any(re.search(r"Support +1 +250 +250\.00 USD", email.message_from_bytes(open(f, "rb").read(), policy=email.policy.default).get_body(("plain",)).get_content())
         for f in glob.glob(sys.argv[1] + "/*.eml"))
assert ok, "the retried e-mail is not the second invoice"
print("retried e-mail delivered")
PYEOF

echo "== the customer's display name is quoted in To: (quotes, commas, non-ASCII, a line break)"
# each name once as the customer of an invoice; the receiver must read back the
# exact name and one single address (a comma outside quotes would make two)
i=0
for name in 'Smith, John "JJ" \ Jr.' 'Zoë "Z", Ltd.' 'Eve <eve@evil.test>, Mallory' $'Bcc\r\nBcc: x@evil.test'; do
  i=$((i + 1))
  C=$(qf -v name="$name" <<SQL | tail -1
SELECT fluxrate.act_as('$ORG', true) IS NULL;
SELECT (fluxrate.create_customer(:'name', 'named$i@example.com', billing_address_country => 'US'))->>'id';
SQL
)
  IV=$(q "$A SELECT (fluxrate.create_invoice('$C', 'USD', line_items => '[{\"description\": \"Named\", \"quantity\": 1, \"unit_amount\": 1}]'))->>'id'" | tail -1)
  q "$A SELECT fluxrate.finalize_invoice('$IV')" >/dev/null
done
psql -X -q -c "CALL fluxrate.deliver_pending()"
$PY - "$W/smtp" <<'PYEOF'
import email, email.policy, glob, sys
want = {"named1@example.com": 'Smith, John "JJ" \\ Jr.', "named2@example.com": 'Zoë "Z", Ltd.',
        "named3@example.com": "Eve <eve@evil.test>, Mallory", "named4@example.com": "Bcc  Bcc: x@evil.test"}
seen = {}
for f in glob.glob(sys.argv[1] + "/*.eml"):
    raw = open(f, "rb").read()
    m = email.message_from_bytes(raw, policy=email.policy.default)
    to = m["To"]
    if "named" not in str(to.addresses[0].addr_spec):
        continue
    assert len(to.addresses) == 1, (f, str(to))
    assert m.get_all("Bcc") is None, "a name injected a header"
    seen[to.addresses[0].addr_spec] = to.addresses[0].display_name
assert seen == want, (seen, want)
print("display names read back:", sorted(seen.values()))
PYEOF

echo "== STARTTLS is required, not opportunistic: a server without it gets nothing in plain text"
q "$A SELECT fluxrate.set_smtp_settings('127.0.0.1', $SMTP_PORT, 'billing@acme.test', username => 'mailer', security => 'starttls')" >/dev/null
INV3=$(q "$A SELECT (fluxrate.create_invoice('$CUST', 'USD', line_items => '[{\"description\": \"Audit\", \"quantity\": 1, \"unit_amount\": 10}]'))->>'id'" | tail -1)
q "$A SELECT fluxrate.finalize_invoice('$INV3')" >/dev/null
psql -X -q -c "CALL fluxrate.deliver_pending()"
got=$(q "SELECT status || ' ' || attempts || ' ' || last_error FROM fluxrate_internal.deliveries WHERE invoice_id = '$INV3' AND channel = 'email'")
DEL3=$(q "SELECT id FROM fluxrate_internal.deliveries WHERE invoice_id = '$INV3' AND channel = 'email'")
echo "starttls against a plain server: $got"
# the tenant sees "connection failed" only; the operator's log says why
[ "$got" = "PENDING 1 connection failed" ] || fail "expected a refused STARTTLS, got $got"
grep -A1 "delivery $DEL3: connection failed" "$CLUSTER_DIR/server.log" | grep -qi "ssl\|tls" \
  || fail "the server log does not say the STARTTLS failed"
[ "$(ls "$W/smtp" | grep -c '\.eml$')" = 6 ] || fail "a message went out without TLS"

echo "== no secret in plain text in any table or in the server log"
pg_dump fluxrate > "$W/dump.sql"
if grep -qF "$SMTP_PW" "$W/dump.sql"; then fail "the SMTP password is in a table"; fi
if grep -qF "$SECRET" "$W/dump.sql"; then fail "the webhook secret is in a table"; fi
if grep -qF "$SMTP_PW" "$CLUSTER_DIR/server.log" || grep -qF "$SECRET" "$CLUSTER_DIR/server.log"; then fail "a secret is in the server log"; fi
grep -q "billing@acme.test" "$W/dump.sql" || fail "the dump holds no fluxrate data (the check would prove nothing)"

echo "== a restored dump still opens its sealed secrets"
createdb restored
psql -X -q -d restored -f "$W/dump.sql" >/dev/null 2>"$W/restore.err" || true
# pg_cron may live in one database only (cron.database_name): its errors are expected here
if grep "ERROR" "$W/restore.err" | grep -v "cron\|can only create extension in database"; then
  fail "the restore reported errors"
fi
got=$(psql -X -q -t -A -d restored -c "SELECT fluxrate_internal.unseal(password_enc, 'smtp:' || org_id) = '$SMTP_PW'
                                         FROM fluxrate_internal.smtp_settings")
[ "$got" = t ] || { cat "$W/restore.err"; fail "the restored database cannot open its SMTP password ($got)"; }
got=$(psql -X -q -t -A -d restored -c "SELECT count(*) || ' ' || sum(total) FROM fluxrate_internal.invoices")
# 60.00 + 250.00 + 10.00 + the four named customers' 1.00 each = 324.00
[ "$got" = "7 324.00" ] || fail "restored invoices: $got"
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
