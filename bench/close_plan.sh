#!/usr/bin/env bash
# The plan of the closer's big statement, fluxrate_internal.close_statement(),
# as sys_close_batch() runs it: EXPLAIN (VERBOSE) with the parameters of a real
# batch (the first 2,000 due subscriptions, their usage from sys_close_usage()),
# after a small bench/31_close.sh (3,000 subscriptions, 300,000 events; its two
# closes leave October finalized and November a draft), for December's close.
#   bash bench/close_plan.sh                 prints the plan
#   bash bench/close_plan.sh OLD.sql         also plans the statement text in
#                                            OLD.sql with the same parameters
#                                            and diffs the two plans
# How the split of sys_close_batch into named parts was checked against the
# statement's single text at a222ef8 (233 plan lines, costs included: the same):
#   git show a222ef8:src/sql/52_close.sql \
#     | sed -n '/^  WITH b AS MATERIALIZED/,/^  SELECT count(\*) FROM dl/p' >/tmp/old.sql
#   bash bench/close_plan.sh /tmp/old.sql
# Not a benchmark (bench/run.sh does not run it); a throwaway cluster.
set -euo pipefail
OLD=${1:-}
[ -z "$OLD" ] || OLD=$(realpath "$OLD")
source "$(dirname "${BASH_SOURCE[0]}")/../test/env.sh" >&2
OUT=$ROOT/build/close_plan; rm -rf "$OUT"; mkdir -p "$OUT"
[ -z "$OLD" ] || cp "$OLD" "$OUT/old.sql"
chown -R "$RUNAS" "$OUT" 2>/dev/null || true
as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" bash -s <<'SCRIPT'
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start close_plan "work_mem = 256MB"
BENCH_SUBS=${BENCH_SUBS:-3000} BENCH_EVENTS=${BENCH_EVENTS:-300000} BENCH_TAIL=1000 bash "$ROOT/bench/31_close.sh" >&2
old=$([ -f "$OUT/old.sql" ] && echo yes || echo no)
psql -X -q -t -A -v ON_ERROR_STOP=1 -v old_file="$OUT/old.sql" -v has_old=$old >"$OUT/explain.txt" <<'SQL'
SET fluxrate.pinned_now = '2027-01-01 00:00:30+00';
SET jit = off;   -- as sys_close_batch
SELECT fluxrate_internal.sys_close_tables() \gset
SELECT fluxrate_internal.sys_close_prepare() \gset
CREATE FUNCTION pg_temp.plan_of(stmt text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE b fluxrate_internal.subscriptions[]; u jsonb; r text;
BEGIN
  b := ARRAY(SELECT x FROM fluxrate_internal.subscriptions x
              WHERE x.status IN ('TRIAL', 'ACTIVE', 'PAST_DUE') AND x.current_period_end <= fluxrate.now()
              ORDER BY x.current_period_end, x.org_id, x.id LIMIT 2000);
  u := fluxrate_internal.sys_close_usage(b);
  FOR r IN EXECUTE 'EXPLAIN (VERBOSE) ' || stmt USING b, fluxrate.now(), u, true, true, true LOOP RETURN NEXT r; END LOOP;
END $$;
SELECT '==== new' UNION ALL SELECT * FROM pg_temp.plan_of(fluxrate_internal.close_statement());
\if :has_old
\set old `cat :old_file`
SELECT '==== old' UNION ALL SELECT * FROM pg_temp.plan_of(:'old');
\endif
SQL
SCRIPT
cd "$OUT"
awk 'BEGIN { f = "/dev/null" } /^==== new/ { f = "new.txt"; next } /^==== old/ { f = "old.txt"; next } { print > f }' explain.txt
# the parameters are printed as constants: cut the plan lines to their first 200 characters
cut -c1-200 new.txt
if [ -f old.txt ]; then
  if diff old.txt new.txt >plan.diff; then echo "plans: the same ($(wc -l <new.txt) lines)"
  else echo "plans differ ($OUT/plan.diff):"; cut -c1-200 plan.diff | head -60; fi
fi
