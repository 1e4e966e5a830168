#!/usr/bin/env bash
# make test: set everything up (packages, build, private install), then run
#   1. the pg_regress suite: sql/<name>.sql against expected/<name>.out, in a
#      temp instance with pg_cron and fluxrate preloaded;
#   2. the scenario scripts test/scripts/*.sh, each against its own throwaway
#      cluster (concurrency with pgbench, real SMTP and HTTP peers on loopback).
# Prints "N passed, N failed" last.  TESTS="a b" or SCRIPTS="x" narrow the run.
set -uo pipefail
# SCRIPTS is also a PGXS variable (scripts to install): take it out of the
# environment before env.sh runs make
SCRIPT_LIST=${SCRIPTS-unset}; unset SCRIPTS
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
set +e   # count failures instead of stopping at the first
cd "$ROOT"
OUT=$ROOT/build/regress
rm -rf "$OUT"; mkdir -p "$OUT"; chown -R "$RUNAS" "$OUT" 2>/dev/null || true
pass=0; fail=0

if [ "${TESTS-unset}" = unset ]; then
  TESTS=$(ls sql/*.sql | sed 's#sql/##; s#\.sql$##' | sort | tr '\n' ' ')
fi
if [ -n "$TESTS" ]; then
  as_user "$PG_REGRESS" --bindir="$PGBIN" --inputdir="$ROOT" --outputdir="$OUT" \
    --temp-instance="$OUT/tmp_check" --temp-config="$ROOT/test/postgresql.conf" \
    --dbname=contrib_regression --load-extension=pg_cron --load-extension=fluxrate \
    $TESTS 2>&1 | tee "$OUT/pg_regress.txt"
  p=$(grep -E '\.\.\. ok' "$OUT/pg_regress.txt" | wc -l)
  f=$(grep -E '\.\.\. (FAILED|failed)' "$OUT/pg_regress.txt" | wc -l)
  n=$(echo $TESTS | wc -w)
  # a test that never reported (crash of the whole run) counts as failed
  if [ $((p + f)) -lt "$n" ]; then f=$((n - p)); fi
  pass=$((pass + p)); fail=$((fail + f))
  if [ -s "$OUT/regression.diffs" ]; then
    echo "---- regression.diffs (first 200 lines) ----"; head -200 "$OUT/regression.diffs"
  fi
fi

if [ "$SCRIPT_LIST" = unset ]; then
  SCRIPT_LIST=$(ls test/scripts/*.sh 2>/dev/null | sort | tr '\n' ' ')
else  # names (closer_concurrency) or paths
  SCRIPT_LIST=$(for s in $SCRIPT_LIST; do [ -f "$s" ] && echo "$s" || echo "test/scripts/$s.sh"; done)
fi
for s in $SCRIPT_LIST; do
  name=$(basename "$s" .sh)
  log="$OUT/script-$name.log"
  start=$(date +%s)
  # A script whose header has the line "# fluxrate-test: runs as root" runs as
  # root (it installs into the system's PostgreSQL, as the README does); when
  # make test itself is not root, such a script is skipped and said so.
  runner=as_user
  if grep -q '^# fluxrate-test: runs as root$' "$s"; then
    if [ "$(id -u)" != 0 ]; then echo "script $name ... skipped (runs as root)"; continue; fi
    runner=env
  fi
  if $runner ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" RUNAS="$RUNAS" bash "$s" >"$log" 2>&1; then
    echo "script $name ... ok $(( $(date +%s) - start )) s"; pass=$((pass + 1))
  else
    echo "script $name ... FAILED $(( $(date +%s) - start )) s (log follows)"; tail -40 "$log"
    fail=$((fail + 1))
  fi
done
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
