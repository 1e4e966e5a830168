#!/usr/bin/env bash
# What the usage rollups cost ingestion: the same raw single-row and 1,000-row
# inserts into two copies of fluxrate_internal.usage_events, one as it is
# ("ours": with xact_id DEFAULT txid_current() and its BRIN index) and one
# without them ("baseline": the table before the rollups).  16 clients, durable
# commits, the sides alternating in rounds like bench 11.  Bench 11's own
# baseline copies usage_events whole, so its ratio does not show this cost.
set -euo pipefail
T=${BENCH_SECONDS:-30}
C=${BENCH_CLIENTS:-16}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
W=$(mktemp -d)
q "DROP TABLE IF EXISTS public.bench_with, public.bench_without;
   CREATE TABLE public.bench_with (LIKE fluxrate_internal.usage_events INCLUDING ALL);
   CREATE TABLE public.bench_without (LIKE fluxrate_internal.usage_events INCLUDING ALL);
   ALTER TABLE public.bench_without DROP COLUMN xact_id"
# (dropping the column drops its BRIN index with it)
[ "$(q "SELECT count(*) FROM pg_indexes WHERE tablename = 'bench_with'") $(q "SELECT count(*) FROM pg_indexes WHERE tablename = 'bench_without'")" = "4 3" ] \
  || { echo "expected 4 and 3 indexes"; exit 1; }
reset() {
  psql -X -q -v ON_ERROR_STOP=1 -c "TRUNCATE public.bench_with, public.bench_without" \
    -c "VACUUM ANALYZE public.bench_with" -c "VACUUM ANALYZE public.bench_without" -c "CHECKPOINT" >/dev/null
}
for t in with without; do
  cat > "$W/${t}_single.sql" <<SQL
\set k random(1, 2000000000)
INSERT INTO public.bench_$t (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
VALUES ('00000000-0000-4000-8000-000000000001', fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((:k % 1000)::text, 12, '0'))::uuid,
        '00000000-0000-4000-8000-000000000002', 1, now(), now(), 'k' || :k)
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
  cat > "$W/${t}_batch.sql" <<SQL
\set k random(1, 2000000000)
INSERT INTO public.bench_$t (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
SELECT '00000000-0000-4000-8000-000000000001', fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((g % 1000)::text, 12, '0'))::uuid,
       '00000000-0000-4000-8000-000000000002', 1, now(), now(), 'b' || :k || '-' || g FROM generate_series(1, 1000) g
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
done
run() { pgbench -n -M prepared -c "$C" -j 2 -T "$1" -f "$2" > "$3" 2>&1 || { cat "$3"; exit 1; }; }
source "$(dirname "${BASH_SOURCE[0]}")/rounds.sh"
side xact_id_single "$W/without_single.sql" "$W/with_single.sql" 1
side xact_id_batch "$W/without_batch.sql" "$W/with_batch.sql" 1000
q "DROP TABLE public.bench_with, public.bench_without" >/dev/null
rm -rf "$W"
