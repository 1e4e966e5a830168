#!/usr/bin/env bash
# fluxrate.track caches key, meter and customer rows per backend (src/ingest_cache.c,
# "Row caches").  Here one long-lived session B keeps its caches warm while
# other sessions revoke keys and delete rows and commit; B's next call must see
# each change.  Also: rows written by a transaction that rolls back are never
# used afterwards, and a REPEATABLE READ transaction leaves no stale entry.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start ingest_cache

ORG=$(q "SELECT (fluxrate.create_organization('Cache'))->>'id'")
as_org() { q "SELECT fluxrate.act_as('$ORG'); $1" | tail -1; }
TOK=$(as_org "SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'")
TOK2=$(as_org "SELECT (fluxrate.create_feature('Rows','rows','meter',meter_name=>'rows',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'")
newkey() { as_org "SELECT (fluxrate.create_api_key('k', ARRAY['usage.write']))->>'key'"; }
keyid() { q "SELECT id FROM fluxrate_internal.api_keys WHERE org_id = '$ORG' AND prefix = left('$1', length(prefix))"; }
CUST=$(as_org "SELECT (fluxrate.create_customer(name => 'C1', email => 'c1@example.com', external_id => 'c1'))->>'id'")

# Session B: one backend for the whole script, fed through a coprocess.  Each
# command's output (rows and errors) is read back up to a marker line.
coproc B { psql -X -q -t -A -v ON_ERROR_STOP=0 2>&1; }
n=0
b() {
  n=$((n + 1))
  printf '%s\n\\echo __done_%s__\n' "$1" "$n" >&"${B[1]}"
  local line out=""
  while IFS= read -r -t 60 line <&"${B[0]}" || fail "session B did not answer: $1"; do
    [ "$line" = "__done_${n}__" ] && break
    out+="$line"$'\n'
  done
  printf '%s' "$out"
}
# track in session B; prints the result or the error
track() {  # track <key> <token> <external id> <idempotency key>
  b "SELECT fluxrate.track(api_key => '$1', meter_token => '$2', customer_external_id => '$3', quantity => 1, idempotency_key => '$4');"
}
expect_ok() { echo "$2" | grep -q '"replay": false' || fail "$1: expected a new event, got: $2"; echo "ok: $1"; }
expect_err() { echo "$3" | grep -q "$2" || fail "$1: expected \"$2\", got: $3"; echo "ok: $1"; }

# 1. a revocation committed by another session is seen by B's next call
K1=$(newkey)
expect_ok "warm key" "$(track "$K1" "$TOK" c1 e1)"
expect_ok "cached key" "$(track "$K1" "$TOK" c1 e2)"
as_org "SELECT fluxrate.revoke_api_key('$(keyid "$K1")')" >/dev/null
expect_err "revoked in another session" "api key revoked" "$(track "$K1" "$TOK" c1 e3)"

# 2. ... also inside B's open transaction (READ COMMITTED), at the next call
#    (the key is used once before, so B's transaction does not write its
#    last_used_at, which would make the revocation wait for B)
K2=$(newkey)
expect_ok "warm key" "$(track "$K2" "$TOK" c1 e4a)"
b "BEGIN;" >/dev/null
expect_ok "cached key in a transaction" "$(track "$K2" "$TOK" c1 e4)"
as_org "SELECT fluxrate.revoke_api_key('$(keyid "$K2")')" >/dev/null
expect_err "revoked during B's transaction" "api key revoked" "$(track "$K2" "$TOK" c1 e5)"
b "ROLLBACK;" >/dev/null

# 3. a deleted customer: the next event creates a new one, never reuses the old id
K=$(newkey)
OUT=$(track "$K" "$TOK" c1 e6); expect_ok "warm customer" "$OUT"
echo "$OUT" | grep -q "\"customer_id\": \"$CUST\"" || fail "event not for customer $CUST: $OUT"
as_org "SELECT fluxrate.delete_customer('$CUST')" >/dev/null
OUT=$(track "$K" "$TOK" c1 e7); expect_ok "customer deleted in another session" "$OUT"
NEW=$(echo "$OUT" | sed -E 's/.*"customer_id": "([^"]+)".*/\1/')
[ "$NEW" != "$CUST" ] || fail "the deleted customer's id was used again"
[ "$(q "SELECT count(*) FROM fluxrate_internal.customers WHERE id = '$NEW' AND external_id = 'c1'")" = 1 ] \
  || fail "event's customer $NEW does not exist"
echo "ok: a new customer $NEW"

# 4. a deleted meter (by cascade from its feature, as a superuser would): PT404
expect_ok "warm meter" "$(track "$K" "$TOK2" c1 e8)"
q "DELETE FROM fluxrate_internal.features WHERE org_id = '$ORG' AND lookup_key = 'rows'"
expect_err "meter deleted by cascade" "meter not found" "$(track "$K" "$TOK2" c1 e9)"

# 5, 6. a customer created in a transaction, or a subtransaction, that rolls back
# is not used afterwards
not_reused() {  # not_reused <what> <external id> <key prefix> <open> <undo> [<close>]
  local OUT GHOST ID
  b "$4" >/dev/null
  OUT=$(track "$K" "$TOK" "$2" "$3-1"); expect_ok "customer created in a $1" "$OUT"
  expect_ok "same customer, same $1" "$(track "$K" "$TOK" "$2" "$3-2")"
  GHOST=$(echo "$OUT" | sed -E 's/.*"customer_id": "([^"]+)".*/\1/')
  b "$5" >/dev/null
  OUT=$(track "$K" "$TOK" "$2" "$3-3"); expect_ok "after the rollback of the $1" "$OUT"
  [ -z "${6:-}" ] || b "$6" >/dev/null
  ID=$(echo "$OUT" | sed -E 's/.*"customer_id": "([^"]+)".*/\1/')
  [ "$ID" != "$GHOST" ] || fail "the rolled-back customer $GHOST was used"
  [ "$(q "SELECT count(*) FROM fluxrate_internal.customers WHERE id = '$ID'")" = 1 ] || fail "customer $ID does not exist"
  echo "ok: customer of a rolled-back $1 not reused"
}
not_reused transaction ghost e10 "BEGIN;" "ROLLBACK;"
not_reused subtransaction ghost2 e13 "BEGIN; SAVEPOINT s;" "ROLLBACK TO SAVEPOINT s;" "COMMIT;"

# 7. REPEATABLE READ reads with its own snapshot (as before the caches) and
#    leaves nothing stale behind: after it, the revocation is seen
K3=$(newkey)
expect_ok "warm key" "$(track "$K3" "$TOK" c1 e16)"
b "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;" >/dev/null
as_org "SELECT fluxrate.revoke_api_key('$(keyid "$K3")')" >/dev/null
expect_ok "REPEATABLE READ snapshot predates the revocation" "$(track "$K3" "$TOK" c1 e17)"
b "COMMIT;" >/dev/null
expect_err "revocation seen after the REPEATABLE READ transaction" "api key revoked" "$(track "$K3" "$TOK" c1 e18)"

# 8. the organization deleted (cascade to its keys): the key is unknown
K4=$(newkey)
expect_ok "warm key" "$(track "$K4" "$TOK" c1 e19)"
q "DELETE FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'; DELETE FROM fluxrate_internal.organizations WHERE org_id = '$ORG'"
expect_err "organization deleted" "invalid api key" "$(track "$K4" "$TOK" c1 e20)"

echo "ok: every change committed elsewhere was seen by the next call"
