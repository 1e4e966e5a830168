#!/usr/bin/env bash
# Bulk load (issue 17, item 3): fluxrate.load_events over a staging table
# against plain COPY into fluxrate_internal.usage_events, the same rows.
#   baseline  COPY of resolved rows (org_id, id, customer_id, meter_id, quantity,
#             timestamp, ingested_at, idempotency_key) straight into usage_events:
#             no validation, no key table, no customer lookup
#   ours      COPY of the rows as a client has them (meter_token,
#             customer_external_id, quantity, timestamp, idempotency_key) into a
#             TEMP staging table OF fluxrate.event_load_row, then
#             SELECT fluxrate.load_events('staging'): validated, keys written
#             to usage_event_keys, customers resolved
# Both into the same (partitioned) table over 12 months of history, emptied
# between rounds; the sides alternate (BENCH_LOAD_ROUNDS, default 3) and each
# side's time is the median of its rounds.  BENCH_LOAD_ROWS rows (default 200,000).
set -euo pipefail
N=${BENCH_LOAD_ROWS:-200000}
R=${BENCH_LOAD_ROUNDS:-3}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
W=$(mktemp -d); chmod 755 "$W"
ORG=$(q "SELECT (fluxrate.create_organization('Bench load'))->>'id'")
TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
MID=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
q "SELECT fluxrate.act_as('$ORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
# the months' partitions exist for both sides (a load makes them itself; COPY cannot)
q "SET fluxrate.pinned_now = '2026-12-15 00:00:00+00';
   SELECT count(fluxrate_internal.make_event_partition('2026-01-01 00:00:00+00'::timestamptz + g * interval '1 month')) FROM generate_series(0, 11) g" >/dev/null
# the two files: the same events, 12 months of 2026, 1,000 customers, keyed
q "COPY (SELECT '$TOK', 'cust-' || (g % 1000), 1 + g % 7, '2026-01-01 00:00:00+00'::timestamptz + (g::numeric / $N) * interval '334 days', 'load-' || g
         FROM generate_series(1, $N) g) TO '$W/client.csv' (FORMAT csv)"
q "COPY (SELECT '$ORG', fluxrate_internal.uuid_v7(), c.id, '$MID', 1 + g % 7,
                '2026-01-01 00:00:00+00'::timestamptz + (g::numeric / $N) * interval '334 days', now(), 'load-' || g
           FROM generate_series(1, $N) g JOIN fluxrate_internal.customers c ON c.org_id = '$ORG' AND c.external_id = 'cust-' || (g % 1000))
    TO '$W/resolved.csv' (FORMAT csv)"
reset() {
  psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'" \
    -c "DELETE FROM fluxrate_internal.usage_event_keys WHERE org_id = '$ORG'" \
    -c "VACUUM ANALYZE fluxrate_internal.usage_events" -c "VACUUM ANALYZE fluxrate_internal.usage_event_keys" -c "CHECKPOINT" >/dev/null
}
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
base() {
  psql -X -q -v ON_ERROR_STOP=1 -c "\\copy fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, \"timestamp\", ingested_at, idempotency_key) FROM '$W/resolved.csv' (FORMAT csv)"
}
ours() {
  psql -X -q -v ON_ERROR_STOP=1 <<SQL
SET fluxrate.pinned_now = '2026-12-15 00:00:00+00';
SELECT fluxrate.act_as('$ORG', true) IS NOT NULL;
CREATE TEMP TABLE staging OF fluxrate.event_load_row;
GRANT SELECT ON staging TO fluxrate_owner;
\\copy staging (meter_token, customer_external_id, quantity, "timestamp", idempotency_key) FROM '$W/client.csv' (FORMAT csv)
SELECT fluxrate.load_events('staging')->>'created' AS created \\gset
\\if :{?created}
\\else
\\quit 3
\\endif
SQL
}
bt=(); ot=()
for r in $(seq 1 "$R"); do
  reset; bt+=("$(ms base)")
  reset; ot+=("$(ms ours)")
  [ "$(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'")" = "$N" ] || { echo "load_events did not create $N events"; exit 1; }
  [ "$(q "SELECT count(*) FROM fluxrate_internal.usage_event_keys WHERE org_id = '$ORG'")" = "$N" ] || { echo "load_events did not write $N keys"; exit 1; }
done
med() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
B=$(med "${bt[@]}"); O=$(med "${ot[@]}")
awk -v n="$N" -v b="$B" -v o="$O" -v bs="${bt[*]}" -v os="${ot[*]}" 'BEGIN {
  printf "bench bulk_load: ours=%.0f/s baseline=%.0f/s ratio=%.3f (%d rows; ms ours %s, COPY %s)\n", n / (o / 1000), n / (b / 1000), b / o, n, os, bs }'
reset
rm -rf "$W"
