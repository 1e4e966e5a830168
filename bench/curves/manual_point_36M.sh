#!/usr/bin/env bash
# The third history point of bench 51's ingest and live sections, measured by
# hand on the run's own cluster after its generator was stopped (disk): the
# same scripts ($W of the run), bench/rounds.sh's side(), the same reset and
# pgbench options, then VACUUM ANALYZE + CHECKPOINT first as the script does.
set -euo pipefail
export PGHOST=${PGHOST:?the run's socket dir} PGPORT=5432 PGUSER=postgres PGDATABASE=fluxrate
export PATH=/work/wt/curves/build/tmp_install/usr/lib/postgresql/15/bin:$PATH
W=${W:?the stopped run's work dir}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
ORG=$(q "SELECT org_id FROM fluxrate_internal.organizations WHERE name = 'Curve ingest'")
MID=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
TOK=$(q "SELECT meter_token FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('bench2', ARRAY['usage.write']))->>'key'" | tail -1)
LCUST=00000000-0000-4000-8000-000000000001
echo "vacuum start $(date -u +%T) load $(load)"
psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_events" -c "CHECKPOINT" >/dev/null
echo "vacuum end $(date -u +%T) load $(load)"
h=$(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG' AND idempotency_key LIKE 'h%'")
stored=$(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'")
echo "stored: $stored events of the ingesting organization (history $h); $(q "SELECT pg_size_pretty(pg_total_relation_size('fluxrate_internal.usage_events'))")"
T=30; R=6; C=16
D=(-D key="$KEY" -D tok="$TOK" -D org="$ORG" -D meter="$MID" -D lcust="$LCUST")
run() { pgbench -n -M prepared -c "$C" -j 2 -T "$1" "${D[@]}" -f "$2" > "$3" 2>&1 || { cat "$3"; exit 1; }; }
reset() { psql -X -q -c "CHECKPOINT" >/dev/null; }
source /work/wt/curves/bench/rounds.sh
echo "$(side "track_single_h$h" "$W/base_single.sql" "$W/ours_single.sql" 1); load $(load)"
echo "$(side "track_batch_h$h" "$W/base_batch.sql" "$W/ours_batch.sql" 1000); load $(load)"
pct() { sort -n | awk '{ a[NR] = $1 } END { i50 = int(NR * 0.50 + 0.5); i99 = int(NR * 0.99 + 0.5); printf "%.3f %.3f %d\n", a[i50] / 1000, a[i99] / 1000, NR }'; }
live_run() { rm -f "$W"/livelog_"$1".*; (cd "$W" && pgbench -n -M prepared -c 1 -T 20 "${D[@]}" -l --log-prefix="livelog_$1" -f "$W/live.sql" > "$W/live_$1.out" 2>&1) || { cat "$W/live_$1.out"; exit 1; }; cat "$W"/livelog_"$1".* | awk '{ print $3 }' | pct > "$W/pct_$1"; }
live_run idle_m; read -r ip50 ip99 in < "$W/pct_idle_m"
pgbench -n -M prepared -c 8 -j 2 -T 24 "${D[@]}" -f "$W/ours_single.sql@9" -f "$W/live_own.sql@1" > "$W/ingest_bg.out" 2>&1 &
bg=$!; sleep 2
live_run busy_m; read -r bp50 bp99 bn < "$W/pct_busy_m"
wait "$bg"
itps=$(tps "$W/ingest_bg.out")
RQ="SELECT sum(e.quantity) FROM fluxrate_internal.usage_events e WHERE e.org_id = '$ORG' AND e.customer_id = '$LCUST' AND e.meter_id = '$MID'
      AND e.\"timestamp\" >= date_trunc('month', now()) AND e.\"timestamp\" < date_trunc('month', now()) + interval '1 month'"
q "EXPLAIN (ANALYZE, BUFFERS) $RQ" > /tmp/explain_live_manual.txt
rd=$(q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE e.org_id = '$ORG' AND e.customer_id = '$LCUST' AND e.\"timestamp\" >= date_trunc('month', now())")
echo "bench live_usage_h$h: idle p50=$ip50 ms p99=$ip99 ms ($in reads); under ingestion (${itps%.*} track/s, 8 clients) p50=$bp50 ms p99=$bp99 ms ($bn reads); p99 ratio=$(awk -v a="$bp99" -v b="$ip99" 'BEGIN { printf "%.3f", a / b }'); reader's customer: $rd events in its period; load $(load)"
echo "end $(date -u +%T)"
