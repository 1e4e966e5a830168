#!/usr/bin/env bash
# One router and three shards (four clusters, Unix sockets): organizations are
# created on every shard through the router, each runs the quickstart through
# it, and
#   - each organization's rows live on exactly one shard, the directory's;
#   - a key of organization A cannot reach B's shard's data;
#   - killing one shard stops only its organizations (a clear error) while the
#     others keep tracking, and they come back with it;
#   - moving an organization pauses only it, keeps its invoices, totals and
#     idempotency keys, and leaves nothing on the old shard.
set -euo pipefail
source "$ROOT/test/clusters.sh"
# the shards' clock: January 20th (the router's connections read it at connect)
router_setup 3
for s in s0 s1 s2; do nq $s "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-01-20 12:00:00+00'"; done
# a trusted application role on the router, as an application would connect
rq "CREATE ROLE app LOGIN IN ROLE fluxrate_app; CREATE ROLE outsider LOGIN;"
aq() { npsql router -d router -U app -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
# err <role> <sql>: the error's SQLSTATE and message ("PT404: organization not found")
err() {
  local out
  if out=$(npsql router -d router -U "$1" -q -t -A -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c "$2" 2>&1); then
    fail "expected an error from: $2 (got: $out)"
  fi
  echo "$out" | sed -n 's/^ERROR:  //p' | head -1
}
expect() { [ "$2" = "$3" ] || fail "$1: expected [$3], got [$2]"; echo "ok: $1"; }
# expect_like <what> <got> <glob>
expect_like() { [[ "$2" == *$3* ]] || fail "$1: expected [*$3*], got [$2]"; echo "ok: $1"; }

# 0. the generated API: every public function of a shard is wrapped, or knowingly not
n_shard=$(nq s0 "SELECT count(*) FROM pg_proc WHERE pronamespace = 'fluxrate'::regnamespace AND prokind = 'f'")
n_router=$(rq "SELECT count(*) FROM pg_proc WHERE pronamespace = 'fluxrate'::regnamespace")
n_unwrapped=$(rq "SELECT count(*) FROM pg_proc p WHERE p.proname = ANY (fluxrate_router.unwrapped()) AND p.pronamespace = 'fluxrate'::regnamespace")
# the router keeps act_as and pre_request of its own; now(), the job helpers are not there
expect "router API = shard API less now/schedule_jobs/unschedule_jobs/refresh_usage_rollups" \
  "$n_router" "$((n_shard - 4))"
expect "act_as and pre_request are the router's own" "$n_unwrapped" 2
diff <(nq s0 "SELECT proname || '(' || pg_get_function_arguments(oid) || ') ' || pg_get_function_result(oid)
              FROM pg_proc WHERE pronamespace = 'fluxrate'::regnamespace AND prokind = 'f'
               AND proname NOT IN ('now', 'schedule_jobs', 'unschedule_jobs', 'refresh_usage_rollups', 'health') ORDER BY 1") \
     <(rq "SELECT proname || '(' || pg_get_function_arguments(oid) || ') ' || pg_get_function_result(oid)
              FROM pg_proc WHERE pronamespace = 'fluxrate'::regnamespace AND proname <> 'health' ORDER BY 1") \
  || fail "router signatures differ from the shard's"
# the operator's health() spans the shards: the shard's columns, led by the shard each row came from
expect "health() on the router: the shard's columns led by shard" \
  "$(rq "SELECT pg_get_function_result('fluxrate.health()'::regprocedure)")" \
  "$(nq s0 "SELECT replace(pg_get_function_result('fluxrate.health()'::regprocedure), 'TABLE(', 'TABLE(shard text, ')")"
expect "health() on the router: rows from all three shards" \
  "$(rq "SELECT count(DISTINCT shard) FROM fluxrate.health()")" 3
echo "ok: every signature, parameter name and default is the shard's"
expect "nothing on the router is executable by PUBLIC" \
  "$(rq "SELECT count(*) FROM pg_proc p WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_router'::regnamespace, 'fluxrate_router_calls'::regnamespace)
           AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))")" 0
expect "every SECURITY DEFINER function on the router pins search_path" \
  "$(rq "SELECT count(*) FROM pg_proc p WHERE p.prosecdef AND p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_router'::regnamespace)
           AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog, pg_temp%', false)")" 0
expect "a second sync makes the same API" "$(rq "SELECT fluxrate_router.sync_api()->>'routed'")" \
  "$(rq "SELECT count(*) FROM fluxrate_router.generated WHERE kind = 'routed'")"

# 1. six organizations through the router: two on each shard (fewest first)
declare -A ORG SHARD KEY TOKEN CUST SUB
for o in a b c d e f; do
  ORG[$o]=$(aq "SELECT (fluxrate.create_organization('Org $o'))->>'id'")
  SHARD[$o]=$(rq "SELECT shard FROM fluxrate_router.organizations WHERE org_id = '${ORG[$o]}'")
done
expect "two organizations per shard" "$(rq "SELECT string_agg(n::text, ',' ORDER BY shard) FROM (SELECT shard, count(*) n FROM fluxrate_router.organizations GROUP BY shard) x")" "2,2,2"

# 2. the quickstart through the router, for each
for o in a b c d e f; do
  out=$(npsql router -d router -U app -q -t -A -v ON_ERROR_STOP=1 <<SQL
SELECT fluxrate.act_as('${ORG[$o]}') IS NOT NULL;   -- transaction-local: each statement is one here
BEGIN;
SELECT fluxrate.act_as('${ORG[$o]}');
SELECT f->>'meter_id' AS meter_id, f->>'meter_token' AS meter_token
  FROM fluxrate.create_feature(name => 'API Calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'SUM', unit => 'calls') f \gset
SELECT (fluxrate.create_plan(name => 'Pro', lookup_id => 'pro_monthly', type => 'HYBRID',
       billing_interval => 'month', currency => 'USD'))->>'id' AS plan_id \gset
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'FIXED', unit_price => 49, display_name => 'Platform fee') IS NOT NULL;
SELECT fluxrate.add_charge(plan_id => :'plan_id', type => 'USAGE', meter_id => :'meter_id', unit_price => 0.002,
       display_name => 'API calls') IS NOT NULL;
SELECT (fluxrate.create_customer(name => 'Initech', email => 'ap@initech.example', external_id => 'initech'))->>'id' AS customer_id \gset
SELECT (fluxrate.create_subscription(customer_id => :'customer_id', plan_id => :'plan_id',
       billing_interval => 'month', start_date => '2026-01-01 00:00:00+00'))->>'id' AS subscription_id \gset
SELECT (fluxrate.create_api_key(name => 'Production Backend', scopes => ARRAY['usage.write']))->>'key' AS api_key \gset
COMMIT;
\echo KEY :api_key
\echo TOKEN :meter_token
\echo CUST :customer_id
\echo SUB :subscription_id
SQL
)
  KEY[$o]=$(echo "$out" | sed -n 's/^KEY //p'); TOKEN[$o]=$(echo "$out" | sed -n 's/^TOKEN //p')
  CUST[$o]=$(echo "$out" | sed -n 's/^CUST //p'); SUB[$o]=$(echo "$out" | sed -n 's/^SUB //p')
  [ -n "${KEY[$o]}" ] && [ -n "${SUB[$o]}" ] || fail "quickstart of $o: $out"
  # usage with the key alone (no context): 1200 + 3300 + 500 calls, req-1 sent twice
  for ev in "1200 req-1 2026-01-05" "1200 req-1 2026-01-05" "3300 req-2 2026-01-17" "500 req-3 2026-01-19"; do
    set -- $ev
    aq "SELECT fluxrate.track(api_key => '${KEY[$o]}', meter_token => '${TOKEN[$o]}', customer_external_id => 'initech',
          quantity => $1, idempotency_key => '$2', \"timestamp\" => '$3 10:00:00+00')->>'replay'" >> "$OUT/router-replays-$o"
  done
done
expect "req-1 replayed, the others new (org a)" "$(tr '\n' ' ' < "$OUT/router-replays-a")" "false true false false "
# the period closes on each shard by its own jobs (here called as pg_cron would, at Feb 1st 00:01)
for s in s0 s1 s2; do
  nqf $s -c "SET fluxrate.pinned_now = '2026-02-01 00:01:00+00'" -c "CALL fluxrate.close_due_periods()" >/dev/null
done
# each organization: the opening invoice (49.00: the platform fee of January, in advance) and
# January's close: 5000 calls x 0.002 = 10.00 + February's fee 49.00 = 59.00
for o in a b c d e f; do
  got=$(aq "SELECT fluxrate.act_as('${ORG[$o]}') IS NULL;
            SELECT string_agg(i->>'total', ' ' ORDER BY (i->>'total')::numeric) FROM jsonb_array_elements(fluxrate.list_subscription_invoices('${SUB[$o]}')) i" | tail -1)
  expect "invoices of $o through the router: 49.00 and 59.00" "$got" "49.00 59.00"
done

# a set-returning function through the router: rows of the calling organization only
expect "invoice_rows of b through the router: its 2 invoices, 49.00 and 59.00" \
  "$(aq "SELECT fluxrate.act_as('${ORG[b]}') IS NULL; SELECT count(*) || ' ' || string_agg(total::text, ' ' ORDER BY total) FROM fluxrate.invoice_rows()" | tail -1)" "2 49.00 59.00"
# an hour later (the grace period) the shards finalize them: numbered, OPEN
for s in s0 s1 s2; do
  nqf $s -c "SET fluxrate.pinned_now = '2026-02-01 01:02:00+00'" -c "CALL fluxrate.finalize_due_invoices()" >/dev/null
done
expect "a's invoices are numbered and open" \
  "$(aq "SELECT fluxrate.act_as('${ORG[a]}') IS NULL;
         SELECT count(*) FILTER (WHERE i->>'status' = 'OPEN' AND i->>'invoice_number' IS NOT NULL)
           FROM jsonb_array_elements(fluxrate.list_invoices(page_size => 100)->'data') i" | tail -1)" 2

# 3. each organization's rows on exactly one shard: the directory's
for o in a b c d e f; do
  where=$(rq "SELECT string_agg(DISTINCT shard::text, ',') FROM fluxrate_router.organization_rows('${ORG[$o]}') WHERE n > 0")
  expect "rows of $o only on shard ${SHARD[$o]}" "$where" "${SHARD[$o]}"
done
expect "each shard holds exactly its two organizations" \
  "$(for s in s0 s1 s2; do nq $s "SELECT count(*) FROM fluxrate_internal.organizations"; done | tr '\n' ' ')" "2 2 2 "
expect "the operator's list agrees with the directory" \
  "$(rq "SELECT count(*) FILTER (WHERE shard = routed_to) || '/' || count(*) FROM fluxrate_router.list_organizations()")" "6/6"
# list_organizations asks every shard at once (one PL/Proxy call to all partitions, merged),
# not one after the other: with each shard's organizations table locked, the router's
# query waits on all three shards together (asked in turn, only shard 0 would hold one)
declare -A LOCKFD
for s in s0 s1 s2; do
  mkfifo "$OUT/lock-$s"
  npsql $s -d fluxrate -q -v ON_ERROR_STOP=1 < "$OUT/lock-$s" > /dev/null &
  exec {fd}>"$OUT/lock-$s"; LOCKFD[$s]=$fd
  echo "BEGIN; LOCK TABLE fluxrate_internal.organizations IN ACCESS EXCLUSIVE MODE; SELECT 'locked';" >&$fd
done
waiting() {  # waiting <mode granted|waiting>: per shard, the locks on organizations in that state
  for s in s0 s1 s2; do
    nq $s "SELECT count(*) FROM pg_locks WHERE relation = 'fluxrate_internal.organizations'::regclass AND granted = ('$1' = 'granted')"
  done | tr '\n' ' '
}
for _ in $(seq 1 100); do [ "$(waiting granted)" = "1 1 1 " ] && break; sleep 0.1; done
expect "each shard's organizations are locked" "$(waiting granted)" "1 1 1 "
rq "SELECT count(*) FROM fluxrate_router.list_organizations()" > "$OUT/list-all" &
listpid=$!
for _ in $(seq 1 100); do [ "$(waiting waiting)" = "1 1 1 " ] && break; sleep 0.1; done
expect "list_organizations waits on all three shards at once" "$(waiting waiting)" "1 1 1 "
for s in s0 s1 s2; do echo "COMMIT;" >&${LOCKFD[$s]}; exec {LOCKFD[$s]}>&-; done
wait "$listpid"; wait
expect "and lists the six organizations once the locks are gone" "$(cat "$OUT/list-all")" 6
# an organization on a shard the directory does not know (made on s2 directly), and a directory
# entry that no shard holds: each listed once, the side it is missing from NULL
stray=$(nq s2 "SELECT (fluxrate.create_organization('Stray'))->>'id'")
ghost=$(rq "INSERT INTO fluxrate_router.organizations (org_id, shard) VALUES (gen_random_uuid(), 1) RETURNING org_id")
expect "a stray organization: on shard 2, routed nowhere" \
  "$(rq "SELECT shard || ' ' || coalesce(routed_to::text, 'null') || ' ' || name FROM fluxrate_router.list_organizations() WHERE org_id = '$stray'")" "2 null Stray"
expect "a ghost entry: on no shard, routed to 1" \
  "$(rq "SELECT coalesce(shard::text, 'null') || ' ' || routed_to FROM fluxrate_router.list_organizations() WHERE org_id = '$ghost'")" "null 1"
expect "eight rows in all" "$(rq "SELECT count(*) FROM fluxrate_router.list_organizations()")" 8
rq "DELETE FROM fluxrate_router.organizations WHERE org_id = '$ghost'"
nq s2 "SELECT sum(fluxrate_internal.sys_org_delete(t.tbl, '$stray')) FROM (SELECT * FROM fluxrate_internal.sys_org_tables() ORDER BY depth DESC) t" >/dev/null
expect "both gone again" "$(rq "SELECT count(*) || '/' || count(*) FILTER (WHERE shard = routed_to) FROM fluxrate_router.list_organizations()")" "6/6"

# outsider may execute two functions (granted by mistake, say): their own checks still refuse it
rq "GRANT USAGE ON SCHEMA fluxrate TO outsider;
    GRANT EXECUTE ON FUNCTION fluxrate.list_customers(integer, integer), fluxrate.act_as(uuid, boolean) TO outsider"
# 4. A's key cannot reach B's shard: a (shard 0) and b (shard 1)
[ "${SHARD[a]}" != "${SHARD[b]}" ] || fail "a and b share a shard"
forged="org_live_$(echo "${ORG[b]}" | tr -d -)_${KEY[a]:42}"
expect_like "A's secret under B's tag reaches B's shard and is refused there" \
  "$(err app "SELECT fluxrate.track(api_key => '$forged', meter_token => '${TOKEN[b]}', customer_external_id => 'initech', quantity => 1)")" \
  "PT401: invalid api key"
expect_like "A's key with B's meter token: B's meter is not on A's shard" \
  "$(err app "SELECT fluxrate.track(api_key => '${KEY[a]}', meter_token => '${TOKEN[b]}', customer_external_id => 'initech', quantity => 1)")" \
  "PT404"
# a key's claims (as the router's pre_request makes them for X-API-Key) reach only its organization
claims=$(npsql router -d router -U postgres -q -t -A -c "SELECT fluxrate_router.credential_claims('${KEY[a]}', NULL)")
expect_like "the key's claims come from its shard" "$claims" "\"org_id\": \"${ORG[a]}\""
expect_like "A's context and B's customer: not found" \
  "$(err app "SELECT fluxrate.act_as('${ORG[a]}', true); SELECT fluxrate.get_customer('${CUST[b]}')")" "PT404: customer not found"
expect "A's context and A's customer: found" \
  "$(aq "SELECT fluxrate.act_as('${ORG[a]}', true) IS NULL; SELECT fluxrate.get_customer('${CUST[a]}')->>'id'" | tail -1)" "${CUST[a]}"
expect_like "a usage.write key may not read customers" \
  "$(err app "SELECT set_config('request.jwt.claims', '$claims', false); SELECT fluxrate.get_customer('${CUST[a]}')")" "PT403"
expect_like "claims from an untrusted role are not believed" \
  "$(err outsider "SELECT set_config('request.jwt.claims', '$claims', false); SELECT fluxrate.list_customers()")" "PT401"
expect_like "an untrusted role may not act_as" "$(err outsider "SELECT fluxrate.act_as('${ORG[a]}')")" "PT401: role \"outsider\" may not act*"
expect_like "nor use a context set by hand" \
  "$(err outsider "SELECT set_config('fluxrate_router.acting_org', '${ORG[a]}', false); SELECT fluxrate.list_customers()")" "PT401: role \"outsider\" may not act*"
expect_like "no context: refused" "$(err app "SELECT fluxrate.list_customers()")" "PT401: no organization in context"
expect_like "an unknown organization: not found" "$(err app "SELECT fluxrate.act_as(gen_random_uuid())")" "PT404"
# the tag as the router reads it (tagged_org: a length check, one pattern without counted
# repetitions, the "_" after 32 hex digits): exactly the shard's key format, nothing looser
k=${KEY[a]}
expect "tagged_org: a key's organization; the refresh-token prefix; malformed forms are NULL" \
  "$(rq "SELECT concat_ws(',', fluxrate_router.tagged_org('$k', 'org_live_') = '${ORG[a]}',
           fluxrate_router.tagged_org(replace('$k', 'org_live_', 'rt_'), 'rt_') = '${ORG[a]}',
           coalesce(fluxrate_router.tagged_org('org_live_' || upper(substr('$k', 10, 32)) || substr('$k', 42), 'org_live_')::text, 'upper'),
           coalesce(fluxrate_router.tagged_org(overlay('$k' placing '_' from 30), 'org_live_')::text, 'underscore in tag'),
           coalesce(fluxrate_router.tagged_org(overlay('$k' placing '-' from 60), 'org_live_')::text, 'dash in secret'),
           coalesce(fluxrate_router.tagged_org('$k' || 'x', 'org_live_')::text, 'long'),
           coalesce(fluxrate_router.tagged_org(substr('$k', 1, 84), 'org_live_')::text, 'short'),
           coalesce(fluxrate_router.tagged_org(NULL, 'org_live_')::text, 'null'))")" \
  "t,t,upper,underscore in tag,dash in secret,long,short,null"
expect_like "a malformed key through the router" \
  "$(err app "SELECT fluxrate.track(api_key => '${k}x', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 1)")" \
  "PT401: invalid api key"
# a 0.1.0 key (no tag) works on its shard, and the router says why it cannot route it
old=$(nq s0 "SELECT key || ' ' || prefix || ' ' || encode(key_hash, 'hex') FROM fluxrate_internal.new_api_key()")
set -- $old
nq s0 "INSERT INTO fluxrate_internal.api_keys (org_id, name, prefix, key_hash, scopes, created_at)
       VALUES ('${ORG[a]}', '0.1.0', '$2', decode('$3', 'hex'), ARRAY['usage.write'], now())"
expect_like "an untagged key through the router" \
  "$(err app "SELECT fluxrate.track(api_key => '$1', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 1)")" \
  "PT401: api key names no organization"
[ "${SHARD[a]}" = 0 ] || fail "a is expected on shard 0"
expect "the untagged key on its own shard" \
  "$(nq s0 "SELECT fluxrate.track(api_key => '$1', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'old-1')->>'replay'")" "false"

# 5. shard 1 dies: its organizations get a clear error, the others keep tracking
node_kill s1
for o in a b c d e f; do
  if [ "${SHARD[$o]}" = 1 ]; then
    echo "  $o: $(err app "SELECT fluxrate.track(api_key => '${KEY[$o]}', meter_token => '${TOKEN[$o]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'down-1')")"
    expect_like "$o (shard 1, down) gets a connection error" \
      "$(err app "SELECT fluxrate.track(api_key => '${KEY[$o]}', meter_token => '${TOKEN[$o]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'down-1')")" \
      "PT503: shard 1 is unavailable"
  else
    expect "$o keeps tracking while shard 1 is down" \
      "$(aq "SELECT fluxrate.track(api_key => '${KEY[$o]}', meter_token => '${TOKEN[$o]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'down-1')->>'replay'")" "false"
  fi
done
node_restart s1
for o in b e; do
  [ "${SHARD[$o]}" = 1 ] || continue
  expect "$o tracks again once shard 1 is back" \
    "$(aq "SELECT fluxrate.track(api_key => '${KEY[$o]}', meter_token => '${TOKEN[$o]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'down-1')->>'replay'")" "false"
done

# 6. moving a (shard 0) to shard 2
before_inv=$(aq "SELECT fluxrate.act_as('${ORG[a]}') IS NULL;
                 SELECT fluxrate.list_invoices(page_size => 100)->'data'" | tail -1)
before_rows=$(rq "SELECT string_agg(tbl || '=' || n, ',' ORDER BY tbl) FROM fluxrate_router.organization_rows('${ORG[a]}') WHERE shard = 0 AND NOT derived")
# paused: a is refused (retryable), d on the same shard is not
rq "SELECT fluxrate_router.pause_organization('${ORG[a]}')" >/dev/null
expect_like "a is paused" \
  "$(err app "SELECT fluxrate.track(api_key => '${KEY[a]}', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 1)")" \
  "PT503: organization is being moved"
other=""
for o in f e d c b; do if [ "${SHARD[$o]}" = 0 ]; then other=$o; fi; done
expect "$other on the same shard tracks while a is paused" \
  "$(aq "SELECT fluxrate.track(api_key => '${KEY[$other]}', meter_token => '${TOKEN[$other]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'paused-1')->>'replay'")" "false"
# refusals of the move
expect_like "move to its own shard" "$(err postgres "CALL fluxrate_router.move_organization('${ORG[a]}', 0)")" "22023"
expect_like "move to a shard that does not exist" "$(err postgres "CALL fluxrate_router.move_organization('${ORG[a]}', 3)")" "22023"
expect_like "move an unknown organization" "$(err postgres "CALL fluxrate_router.move_organization(gen_random_uuid(), 1)")" "PT404"
expect_like "the move is the operator's" "$(err app "CALL fluxrate_router.move_organization('${ORG[a]}', 2)")" "42501"
report=$(rq "CALL fluxrate_router.move_organization('${ORG[a]}', 2)")
echo "move: $report"
expect "the directory routes a to shard 2, still paused (the operator paused it first)" \
  "$(rq "SELECT shard || ' ' || paused FROM fluxrate_router.organizations WHERE org_id = '${ORG[a]}'")" "2 true"
# (paused before the move by the operator: it stays paused until resumed)
rq "SELECT fluxrate_router.resume_organization('${ORG[a]}')" >/dev/null
expect "a's rows: the same on shard 2 as before on shard 0" \
  "$(rq "SELECT string_agg(tbl || '=' || n, ',' ORDER BY tbl) FROM fluxrate_router.organization_rows('${ORG[a]}') WHERE shard = 2 AND NOT derived")" \
  "$before_rows"
expect "nothing of a is left on shard 0" \
  "$(rq "SELECT coalesce(sum(n), 0) FROM fluxrate_router.organization_rows('${ORG[a]}') WHERE shard <> 2")" 0
expect "a's invoices, numbers and totals are unchanged" \
  "$(aq "SELECT fluxrate.act_as('${ORG[a]}') IS NULL; SELECT fluxrate.list_invoices(page_size => 100)->'data'" | tail -1)" "$before_inv"
expect "a's idempotency keys moved: req-2 replays on shard 2" \
  "$(aq "SELECT fluxrate.track(api_key => '${KEY[a]}', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 3300, idempotency_key => 'req-2', \"timestamp\" => '2026-01-17 10:00:00+00')->>'replay'")" "true"
expect "a's key works on shard 2 (shared pepper), new usage lands there" \
  "$(aq "SELECT fluxrate.track(api_key => '${KEY[a]}', meter_token => '${TOKEN[a]}', customer_external_id => 'initech', quantity => 7, idempotency_key => 'moved-1')->>'replay'")" "false"
expect "the new event is on shard 2" "$(nq s2 "SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '${ORG[a]}' AND idempotency_key = 'moved-1'")" 1
# closing again on the new shard bills nothing twice
nqf s2 -c "SET fluxrate.pinned_now = '2026-02-01 00:02:00+00'" -c "CALL fluxrate.close_due_periods()" >/dev/null
expect "no second invoice for January after the move" \
  "$(aq "SELECT fluxrate.act_as('${ORG[a]}') IS NULL; SELECT jsonb_array_length(fluxrate.list_subscription_invoices('${SUB[a]}'))" | tail -1)" 2
# the other organizations never noticed
for o in b c d e f; do
  expect "$o still on its shard" "$(rq "SELECT shard FROM fluxrate_router.organizations WHERE org_id = '${ORG[$o]}'")" "${SHARD[$o]}"
done
# 7. the calls that name no organization: signup, login, refresh, public links, the pre-request
rsql() { npsql router -d router -q -t -A -v ON_ERROR_STOP=1 "$@"; }   # as postgres, one file = one transaction with -1
su=$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.signup(email => 'Ada@Example.com', password => 'correct horse', organization_name => 'Signed up')")
SORG=$(rq "SELECT org_id FROM fluxrate_router.logins WHERE email = 'ada@example.com'")
[ -n "$SORG" ] || fail "signup through the router: $su"
expect "signup placed the organization and its e-mail" \
  "$(rq "SELECT count(*) FROM fluxrate_router.organizations o WHERE o.org_id = '$SORG'")" 1
n_orgs=$(rq "SELECT count(*) FROM fluxrate_router.organizations")
expect "the same e-mail again: the same answer, from its shard" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.signup(email => 'ada@example.com', password => 'another password', organization_name => 'Twice')")" "$su"
expect "and nothing created" "$(rq "SELECT count(*) FROM fluxrate_router.organizations")" "$n_orgs"
lg=$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.login(email => 'ada@example.com', password => 'correct horse')")
AT=$(echo "$lg" | sed -n 's/.*"access_token": "\([^"]*\)".*/\1/p')
[ -n "$AT" ] || fail "login through the router: $lg"
RT=$(echo "$lg" | sed -n 's/.*"refresh_token": "\([^"]*\)".*/\1/p')
expect "the refresh token names its organization" "${RT:0:35}" "rt_$(echo "$SORG" | tr -d -)"
echo "ok: login through the router (by the e-mail's organization)"
expect_like "a wrong password" "$(err postgres "SET ROLE fluxrate_anon; SELECT fluxrate.login(email => 'ada@example.com', password => 'wrong')")" "PT401*"
expect_like "an unknown e-mail" "$(err postgres "SET ROLE fluxrate_anon; SELECT fluxrate.login(email => 'nobody@example.com', password => 'x')")" "PT401: invalid e-mail or password"
expect_like "refresh by the tagged token" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.refresh(refresh_token => '$RT')")" "*\"access_token\"*"
expect_like "the used refresh token again" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.refresh(refresh_token => '$RT')")" "*invalid refresh token*"
# the access_token cookie: the router's pre_request has the shard verify it, then acts as fluxrate_web
expect "the cookie's session reaches its organization" \
  "$(rsql -1 <<SQL | tail -1
SELECT set_config('request.cookies', '{"access_token": "$AT"}', true) IS NULL;
SET LOCAL ROLE fluxrate_anon;
SELECT fluxrate.pre_request();
SELECT current_user || ' ' || (fluxrate.get_organization()->>'id');
SQL
)" "fluxrate_web $SORG"
expect_like "a forged cookie" "$(err postgres "SELECT set_config('request.cookies', '{\"access_token\": \"${AT%?}x\"}', false); SELECT fluxrate.pre_request()")" "PT401*"
# X-API-Key: verified on its shard, then the key's claims and scopes travel with each call
expect "an X-API-Key call tracks for its organization" \
  "$(rsql -1 <<SQL | tail -1
SELECT set_config('request.headers', '{"x-api-key": "${KEY[c]}"}', true) IS NULL;
SET LOCAL ROLE fluxrate_anon;
SELECT fluxrate.pre_request();
SELECT current_user || ' ' || (fluxrate.track(meter_token => '${TOKEN[c]}', customer_external_id => 'initech', quantity => 1, idempotency_key => 'hdr-1')->>'replay');
SQL
)" "fluxrate_apikey false"
expect_like "and stays within its scopes" \
  "$(rsql -1 -v VERBOSITY=verbose 2>&1 <<SQL
SELECT set_config('request.headers', '{"x-api-key": "${KEY[c]}"}', true) IS NULL;
SET LOCAL ROLE fluxrate_anon;
SELECT fluxrate.pre_request();
SELECT fluxrate.list_customers();
SQL
)" "*42501*"
# a public invoice link: each shard in turn, the one holding it answers
INV=$(aq "SELECT fluxrate.act_as('${ORG[c]}') IS NULL; SELECT fluxrate.list_invoices(page_size => 1)->'data'->0->>'id'" | tail -1)
INVNO=$(aq "SELECT fluxrate.act_as('${ORG[c]}') IS NULL; SELECT fluxrate.get_invoice('$INV')->>'invoice_number'" | tail -1)
[ -n "$INVNO" ] || fail "no invoice number for c"
PTOK=$(aq "SELECT fluxrate.act_as('${ORG[c]}') IS NULL; SELECT fluxrate.generate_invoice_token('$INV')->>'public_token'" | tail -1)
expect "a public link through the router (shard ${SHARD[c]})" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT fluxrate.public_invoice('$PTOK')->>'invoice_number'")" "$INVNO"
expect "the HTML link through the router, as the shard's media type" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT pg_typeof(h)::text || ' ' || (position('$INVNO' IN h) > 0) FROM fluxrate.public_invoice_html('$PTOK') h")" \
  'fluxrate."text/html" true'
expect "and the PDF" \
  "$(rsql -c "SET ROLE fluxrate_anon" -c "SELECT pg_typeof(p)::text || ' ' || (substr(p, 1, 5) = '%PDF-'::bytea) FROM fluxrate.public_invoice_pdf('$PTOK') p")" \
  'fluxrate."application/pdf" true'
expect_like "an unknown link" "$(err postgres "SET ROLE fluxrate_anon; SELECT fluxrate.public_invoice(gen_random_uuid()::text)")" "PT404: invoice not found"
echo "router scenario passed"
