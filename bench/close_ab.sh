#!/usr/bin/env bash
# A/B of one closing batch: the current sys_close_batch() against the one of an
# older revision, in ONE cluster, on the same rows, interleaved, each batch
# rolled back, so that both see the same data and (nearly) the same machine.
# On a shared machine this is steadier than two bench/31_close.sh runs, whose
# baselines alone move by 50% between runs.
#   bash bench/close_ab.sh REV FILE [ROUNDS]
#   e.g. bash bench/close_ab.sh a222ef8 src/sql/52_close.sql 15
# REV:FILE must define fluxrate_internal.sys_close_batch(integer, uuid); it is
# installed beside the current one as fluxrate_internal.ab_old_close_batch,
# owned by fluxrate_system like the original.  Data: bench/31_close.sh with
# BENCH_SUBS (10,000) subscriptions and BENCH_EVENTS (1,000,000) events; then
# December is due (October finalized, November a draft: the late-usage check
# has work), and each round times old and new on the first batch of 2,000
# (server-side, clock_timestamp()), in alternating order; the first round is
# a warm-up and left out.
# Not run by bench/run.sh; a throwaway cluster.
set -euo pipefail
REV=${1:?revision}; FILE=${2:?file}; ROUNDS=${3:-15}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OLDDEF=$(git -C "$ROOT" show "$REV:$FILE" | python3 -c '
import sys
s = sys.stdin.read()
a = s.index("CREATE FUNCTION fluxrate_internal.sys_close_batch(")
b = s.index("\n$$;\n", a) + 5
print(s[a:b].replace("fluxrate_internal.sys_close_batch(", "fluxrate_internal.ab_old_close_batch(", 1))')
source "$ROOT/test/env.sh" >&2
OUT=$ROOT/build/close_ab; rm -rf "$OUT"; mkdir -p "$OUT"
printf '%s\n' "$OLDDEF" >"$OUT/old.sql"
chown -R "$RUNAS" "$OUT" 2>/dev/null || true
as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" ROUNDS="$ROUNDS" bash -s <<'SCRIPT'
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start close_ab "shared_buffers = 1GB" "work_mem = 256MB"
BENCH_SUBS=${BENCH_SUBS:-10000} BENCH_EVENTS=${BENCH_EVENTS:-1000000} BENCH_TAIL=1000 bash "$ROOT/bench/31_close.sh" >&2
psql -X -q -v ON_ERROR_STOP=1 -f "$OUT/old.sql"
psql -X -q -v ON_ERROR_STOP=1 -c "ALTER FUNCTION fluxrate_internal.ab_old_close_batch(integer, uuid) OWNER TO fluxrate_system"
{
  echo "SET fluxrate.pinned_now = '2027-01-01 00:00:30+00';"
  echo "SELECT fluxrate_internal.sys_close_tables() \\gset"
  echo "SELECT fluxrate_internal.sys_close_prepare() \\gset"
  echo "CREATE TEMP TABLE ab (round int, which text, ms numeric, n int);"
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for w in $order; do
      f=$([ $w = old ] && echo ab_old_close_batch || echo sys_close_batch)
      echo "BEGIN;"
      echo "SELECT clock_timestamp() AS t0 \\gset"
      echo "SELECT fluxrate_internal.$f(2000) AS n \\gset"
      echo "SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000 AS ms \\gset"
      echo "ROLLBACK;"
      echo "INSERT INTO ab VALUES ($r, '$w', :ms, :n);"
    done
  done
  echo "SELECT which, count(*) AS runs, min(n) AS subs, round(min(ms), 1) AS min_ms,"
  echo "       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS median_ms,"
  echo "       round(max(ms), 1) AS max_ms FROM ab WHERE round > 1 GROUP BY which ORDER BY which;"
  # the two of a round ran seconds apart: their ratio is steadier than either
  echo "SELECT count(*) AS rounds, round(percentile_cont(0.5) WITHIN GROUP (ORDER BY n.ms / o.ms)::numeric, 3) AS median_new_over_old,"
  echo "       round(min(n.ms / o.ms), 3) AS min_ratio, round(max(n.ms / o.ms), 3) AS max_ratio"
  echo "  FROM ab n JOIN ab o ON o.round = n.round AND o.which = 'old' WHERE n.which = 'new' AND n.round > 1;"
} >"$OUT/ab.sql"
psql -X -q -v ON_ERROR_STOP=1 -f "$OUT/ab.sql"
SCRIPT
