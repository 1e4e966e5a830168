#!/usr/bin/env bash
# Ingestion: fluxrate.track with an API key vs a raw single-row
# INSERT .. ON CONFLICT DO NOTHING, and fluxrate.track_batch of 1,000 events vs a
# raw 1,000-row INSERT .. ON CONFLICT DO NOTHING, on identical tables (the
# baseline table is a copy of fluxrate_internal.usage_events with all its
# indexes), 16 clients, durable commits, side by side in one run, the sides
# alternating in rounds (BENCH_ROUNDS, default 6 of 5 s) so background load hits both
# alike.
set -euo pipefail
T=${BENCH_SECONDS:-30}
C=${BENCH_CLIENTS:-16}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
W=$(mktemp -d)
ORG=$(q "SELECT (fluxrate.create_organization('Bench ingest'))->>'id'")
TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
MID=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('bench', ARRAY['usage.write']))->>'key'" | tail -1)
# 1,000 customers exist on both sides.  Their ids are derived from their
# number (cust-N -> 00000000-0000-4000-8000-00000000000N) so that the baseline
# inserts exactly the rows ours does: the same customer for the same N (until
# 2026-11-30 the baseline wrote every event for one customer, so all its
# covering-index insertions went to one leaf page while ours went to 1,000), and
# both sides take time-ordered ids from the same uuid_v7().
q "SELECT fluxrate.act_as('$ORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
q "UPDATE fluxrate_internal.customers SET id = ('00000000-0000-4000-8000-' || lpad(substr(external_id, 6), 12, '0'))::uuid
    WHERE org_id = '$ORG' AND external_id LIKE 'cust-%'"
CID=$(q "SELECT id FROM fluxrate_internal.customers WHERE org_id = '$ORG' AND external_id = 'cust-1'")
# (usage_events is partitioned, its idempotency key in usage_event_keys since
# issue 17: the baseline is one plain table with the same columns and indexes
# and the unique key the plain-PostgreSQL design would have)
q "DROP TABLE IF EXISTS public.bench_events; CREATE TABLE public.bench_events (LIKE fluxrate_internal.usage_events INCLUDING ALL);
   ALTER TABLE public.bench_events ADD UNIQUE (org_id, idempotency_key)"

# Our table is emptied with DELETE + VACUUM (the baseline's with TRUNCATE).  The
# BRIN index on xact_id would keep the summaries of the deleted rows' ranges,
# and every insert into those emptied pages would then widen a summary (one
# write to one hot index page per event, for all 16 clients), which no table
# that only grows at its end does: REINDEX gives it the fresh index TRUNCATE
# gives the baseline.
reset() {
  psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'" \
    -c "TRUNCATE public.bench_events" -c "VACUUM ANALYZE fluxrate_internal.usage_events" \
    -c "REINDEX INDEX fluxrate_internal.usage_events_xact_idx" \
    -c "VACUUM ANALYZE public.bench_events" -c "CHECKPOINT" >/dev/null
}

cat > "$W/ours_single.sql" <<SQL
\set k random(1, 2000000000)
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'cust-' || (:k % 1000),
                      quantity => 1, idempotency_key => 'k' || :k);
SQL
cat > "$W/base_single.sql" <<SQL
\set k random(1, 2000000000)
INSERT INTO public.bench_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
VALUES (:org, fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((:k % 1000)::text, 12, '0'))::uuid, :meter, 1, now(), now(), 'k' || :k)
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
# The batch arrives as JSON text, as from a client or PostgREST (jsonb_in parses
# it): a 1,000-event template whose idempotency keys carry the transaction's
# random number.  (Until 2026-11-30 the statement built the array with
# jsonb_build_object and jsonb_agg, which cost more than parsing it.)
q "DROP TABLE IF EXISTS public.bench_tpl; CREATE TABLE public.bench_tpl AS
   SELECT jsonb_agg(jsonb_build_object('meter_token', '$TOK', 'customer_external_id', 'cust-' || (g % 1000),
                    'quantity', 1, 'idempotency_key', 'b@K@-' || g))::text AS t FROM generate_series(1, 1000) g"
cat > "$W/ours_batch.sql" <<SQL
\set k random(1, 2000000000)
SELECT fluxrate.track_batch((SELECT replace(t, '@K@', :k::text) FROM public.bench_tpl)::jsonb, :key);
SQL
cat > "$W/base_batch.sql" <<SQL
\set k random(1, 2000000000)
INSERT INTO public.bench_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
SELECT :org::uuid, fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((g % 1000)::text, 12, '0'))::uuid, :meter::uuid,
       1, now(), now(), 'b' || :k || '-' || g FROM generate_series(1, 1000) g
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
# -M prepared: variables are bind parameters, so no quotes
D=(-D key="$KEY" -D tok="$TOK" -D org="$ORG" -D cust="$CID" -D meter="$MID")
run() { pgbench -n -M prepared -c "$C" -j 2 -T "$1" "${D[@]}" -f "$2" > "$3" 2>&1 || { cat "$3"; exit 1; }; }

source "$(dirname "${BASH_SOURCE[0]}")/rounds.sh"
side track_single "$W/base_single.sql" "$W/ours_single.sql" 1
side track_batch "$W/base_batch.sql" "$W/ours_batch.sql" 1000
reset
q "DROP TABLE public.bench_events, public.bench_tpl" >/dev/null
rm -rf "$W"
