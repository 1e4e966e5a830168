#!/usr/bin/env bash
# Outbound connections by policy and delivery without head-of-line blocking,
# against real loopback peers (test/peers/):
#   1. the default policy ("public") refuses, at connect time, every spelling of
#      a loopback, link-local (cloud metadata) or private target, a public
#      address on an unusual port, and an SMTP relay on loopback; listeners on
#      127.0.0.1 and ::1 prove nothing was dialed; the tenant sees "refused by
#      policy" only (no peer text, no duration), while another organization's
#      deliveries to an address the operator listed are sent in the same run;
#      userinfo URLs are refused at creation (22023)
#   2. one organization's endpoint that accepts and never answers holds at most
#      fluxrate.delivery_per_endpoint connections and delays nobody else: the
#      other organization's deliveries are all sent while the slow ones are
#      still in flight (timed), within the same run
set -euo pipefail
source "$ROOT/test/cluster.sh"
# the default policy plus one loopback address for the well-behaved tenant's
# receiver (127.0.0.2): what an operator with an internal relay would write
cluster_start outbound "log_statement = 'none'" "fluxrate.outbound_allow = 'public, 127.0.0.2'"
PY=/usr/bin/python3
W=$(mktemp -d /tmp/fluxrate-outbound-XXXXXX)
pids=()
stop_peers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; cluster_stop; }
trap stop_peers EXIT
wait_file() { for _ in $(seq 1 100); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "FAIL: $1 never appeared"; exit 1; }

$PY "$ROOT/test/peers/tcp_bait.py" "$W/bait" record 127.0.0.1 ::1 & pids+=($!)
$PY "$ROOT/test/peers/tcp_bait.py" "$W/silent" silent 127.0.0.2 & pids+=($!)
$PY "$ROOT/test/peers/http_sink.py" "$W/good" 127.0.0.2 & pids+=($!)
wait_file "$W/bait/ports"; wait_file "$W/silent/ports"; wait_file "$W/good/port"
B4=$(sed -n 1p "$W/bait/ports"); B6=$(sed -n 2p "$W/bait/ports")
SILENT=$(cat "$W/silent/ports"); GOOD=$(cat "$W/good/port")
echo "bait on 127.0.0.1:$B4 and [::1]:$B6, silent on 127.0.0.2:$SILENT, receiver on 127.0.0.2:$GOOD"

[ "$(q "SELECT boot_val FROM pg_settings WHERE name = 'fluxrate.outbound_allow'")" = public ] \
  || fail "the built-in default of fluxrate.outbound_allow is not 'public'"

org() { q "SELECT (fluxrate.create_organization('$1'))->>'id'"; }
as() { echo "SELECT fluxrate.act_as('$1');"; }
invoice() {  # org, count: that many finalized invoices of 1.00 each (one event each to every endpoint)
  local C
  C=$(q "$(as "$1") SELECT (fluxrate.create_customer('C', 'c@example.com', billing_address_country => 'US'))->>'id'" | tail -1)
  for _ in $(seq 1 "$2"); do
    q "$(as "$1") SELECT fluxrate.finalize_invoice(((fluxrate.create_invoice('$C', 'USD',
         line_items => '[{\"description\": \"x\", \"quantity\": 1, \"unit_amount\": 1}]'))->>'id')::uuid)" >/dev/null
  done
}
MAL=$(org Mallory); GLO=$(org Globex)

echo "== userinfo URLs are refused at creation"
for u in "http://user:pw@127.0.0.2:$GOOD/" "http://user@127.0.0.2:$GOOD/" "http://:pw@example.com/"; do
  got=$(psql -X -q -t -A -v VERBOSITY=sqlstate -c "$(as "$MAL") SELECT fluxrate.create_webhook_endpoint('$u')" 2>&1 | tail -1 || true)
  [ "$got" = "ERROR:  22023" ] || fail "userinfo URL $u: $got"
done

echo "== the default policy refuses every spelling of an internal target"
TARGETS=("http://127.0.0.1:$B4/" "http://169.254.169.254/latest/meta-data/" "http://10.0.0.1/"
         "http://[::1]:$B6/" "http://0x7f000001:$B4/" "http://2130706433:$B4/" "http://017700000001:$B4/"
         "http://[::ffff:127.0.0.1]:$B4/" "http://localhost:$B4/" "http://127.1:$B4/"
         "http://100.64.0.1/" "http://192.168.1.1:8080/" "http://1.1.1.1:22/")
for t in "${TARGETS[@]}"; do
  q "$(as "$MAL") SELECT fluxrate.create_webhook_endpoint('$t')" >/dev/null
done
q "$(as "$MAL") SELECT fluxrate.set_smtp_settings('127.0.0.1', $B4, 'billing@mallory.test', security => 'none')" >/dev/null
q "$(as "$GLO") SELECT fluxrate.create_webhook_endpoint('http://127.0.0.2:$GOOD/globex')" >/dev/null
invoice "$MAL" 1; invoice "$GLO" 1
n_mal=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$MAL'")
# (Globex has no SMTP: its invoice's e-mail is recorded SKIPPED; its webhooks are what is sent)
n_glo=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$GLO' AND channel = 'webhook'")
echo "deliveries: Mallory $n_mal, Globex $n_glo"
[ "$n_mal" -ge $(( ${#TARGETS[@]} + 1 )) ] || fail "expected a delivery per hostile target and an e-mail"
psql -X -q -c "CALL fluxrate.deliver_pending()"
got=$(q "SELECT string_agg(DISTINCT coalesce(last_error, 'sent') || '/' || coalesce(last_status_code::text, '-') || '/' || attempts, ', ')
           FROM fluxrate_internal.deliveries WHERE org_id = '$MAL'")
echo "Mallory: $got"
[ "$got" = "refused by policy/-/1" ] || fail "every hostile delivery should be refused by policy once: $got"
got=$(q "SELECT string_agg(DISTINCT status, ',') FROM fluxrate_internal.deliveries WHERE org_id = '$GLO' AND channel = 'webhook'")
[ "$got" = SENT ] || fail "Globex's deliveries in the same run: $got"
[ "$(ls "$W/good" | grep -c '\.json$')" = "$n_glo" ] || fail "the receiver got $(ls "$W/good" | grep -c '\.json$') of $n_glo"
[ ! -e "$W/bait/hits" ] || fail "the database connected to a refused target: $(cat "$W/bait/hits")"
# what the tenant reads: the category, nothing of the peer, no duration
got=$(q "$(as "$MAL") SELECT string_agg(DISTINCT (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(a) k), ' ')
           FROM jsonb_array_elements((fluxrate.list_deliveries(page_size => 100))->'data') d,
                jsonb_array_elements(d->'attempt_log') a" | tail -1)
[ "$got" = "attempt,attempted_at,error,status_code" ] || fail "the attempt log shows $got"
grep -q "outside fluxrate.outbound_allow" "$CLUSTER_DIR/server.log" || fail "the operator's log does not say why"
# the operator lists the address: the same delivery goes out (any port, any spelling)
q "ALTER SYSTEM SET fluxrate.outbound_allow = 'public, 127.0.0.2, 127.0.0.1'" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
q "UPDATE fluxrate_internal.deliveries SET next_attempt_at = now() WHERE org_id = '$MAL' AND channel = 'webhook'
     AND recipient IN ('http://127.0.0.1:$B4/', 'http://0x7f000001:$B4/', 'http://2130706433:$B4/')" >/dev/null
psql -X -q -c "CALL fluxrate.deliver_pending()"
[ "$(wc -l < "$W/bait/hits")" = 3 ] || fail "listed 127.0.0.1: expected 3 connections, got $(cat "$W/bait/hits" 2>/dev/null)"
got=$(q "SELECT string_agg(DISTINCT last_error, ',') FROM fluxrate_internal.deliveries WHERE org_id = '$MAL' AND attempts = 2")
[ "$got" = "connection failed" ] || fail "a peer that closes at once: $got"
q "ALTER SYSTEM RESET fluxrate.outbound_allow" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null

echo "== a slow endpoint delays only its own organization"
SLOW=$(org Slowpoke); FAST=$(org Speedy)
q "$(as "$SLOW") SELECT fluxrate.create_webhook_endpoint('http://127.0.0.2:$SILENT/never')" >/dev/null
q "$(as "$FAST") SELECT fluxrate.create_webhook_endpoint('http://127.0.0.2:$GOOD/speedy')" >/dev/null
invoice "$SLOW" 4    # older: the run meets them first
invoice "$FAST" 10
n_slow=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$SLOW' AND status = 'PENDING'")
n_fast=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$FAST' AND status = 'PENDING'")
echo "pending: Slowpoke $n_slow, Speedy $n_fast; timeout 5 s; per endpoint $(q "SHOW fluxrate.delivery_per_endpoint")"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
psql -X -q -c "CALL fluxrate.deliver_pending(timeout_ms => 5000)" & run=$!
fast_done=""
while kill -0 "$run" 2>/dev/null; do
  left=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$FAST' AND channel = 'webhook' AND status <> 'SENT'")
  if [ "$left" = 0 ] && [ -z "$fast_done" ]; then
    fast_done=$(( $(ms) - t0 ))
    slow_sent=$(q "SELECT count(*) FROM fluxrate_internal.deliveries WHERE org_id = '$SLOW' AND attempts > 0")
  fi
  sleep 0.1
done
wait "$run"
total=$(( $(ms) - t0 ))
echo "Speedy all sent after ${fast_done:-never} ms (Slowpoke attempts finished by then: ${slow_sent:-?}); run took $total ms"
[ -n "$fast_done" ] || fail "Speedy's deliveries were not all sent during the run"
[ "$fast_done" -lt 3000 ] || fail "Speedy waited $fast_done ms behind a slow endpoint"
[ "$slow_sent" = 0 ] || fail "the slow endpoint's attempts had finished already: the test proves nothing"
got=$(q "SELECT string_agg(DISTINCT status || ' ' || last_error || ' ' || attempts, ',') FROM fluxrate_internal.deliveries WHERE org_id = '$SLOW' AND channel = 'webhook'")
[ "$got" = "PENDING connection failed 1" ] || fail "Slowpoke after its timeouts: $got"
# no timing oracle: each attempt took its 5 s timeout (the operator's duration_ms), yet
# what the tenant reads counts from the claim: next_attempt_at = attempted_at + 30 s
got=$(q "SELECT bool_and(a.duration_ms >= 4500) || ' ' || bool_and(d.next_attempt_at = a.attempted_at + interval '30 seconds')
           FROM fluxrate_internal.deliveries d JOIN fluxrate_internal.delivery_attempts a ON a.org_id = d.org_id AND a.delivery_id = d.id
          WHERE d.org_id = '$SLOW'")
[ "$got" = "true true" ] || fail "the slow attempts' times: $got"
[ "$(cat "$W/silent/total")" = "$n_slow" ] || fail "the silent endpoint saw $(cat "$W/silent/total") connections, expected $n_slow"
[ "$(cat "$W/silent/max")" -le 2 ] || fail "the silent endpoint held $(cat "$W/silent/max") connections at once (limit 2)"
# ceil(4 / 2) rounds of 5 s: the run is bounded by the slow organization's own share
[ "$total" -lt 14000 ] || fail "the run took $total ms"
echo "ok"
