#!/usr/bin/env bash
# Build the libFuzzer harnesses and run each target for FUZZ_SECONDS:
#  - under AddressSanitizer and UndefinedBehaviorSanitizer, standalone
#    (test/fuzz/standalone.c, built by test/fuzz/build_asan.sh): jwt,
#    jwt_claims, apikey, numeric_syntax (and selftest_asan);
#  - inside a single-user PostgreSQL backend, without ASan, the parsers that
#    need the backend's jsonb and numeric (test/fuzz/driver.c with fluxrate's
#    real sources, clang -fsanitize=fuzzer-no-link): claims, tiers, batch,
#    quantity (and selftest).
# Needs ROOT and PGBIN (test/env.sh).
#   FUZZ_SECONDS=60 FUZZ_TARGETS="jwt tiers" bash test/fuzz/run.sh
# Every committed input under test/fuzz/corpus/<target>/ is replayed first:
# a crash found once is committed there and stays a regression test.
# New inputs go to build/fuzz/work/<target>/ (not committed); a crash leaves
# build/fuzz/crashes/<target>-crash-<sha1> and fails the run.
set -euo pipefail
: "${ROOT:?}" "${PGBIN:?}"
S=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-jwt jwt_claims apikey numeric_syntax claims tiers batch quantity}
ASAN_TARGETS=" jwt jwt_claims apikey numeric_syntax selftest_asan "
mkdir -p "$ROOT/build/fuzz"
B=$ROOT/build/fuzz
RT=$(clang -print-resource-dir)/lib/linux
PGINC=$(/usr/lib/postgresql/15/bin/pg_config --includedir-server)
# libpq-fe.h (src/cron.c) is in the client include directory, as in the Makefile's PG_CPPFLAGS
PGINC_CLIENT=$(/usr/lib/postgresql/15/bin/pg_config --includedir)
# the libraries the extension links (the Makefile's SHLIB_LINK)
LIBS=$(sed -n 's/^SHLIB_LINK *= *//p' "$ROOT/Makefile")
mkdir -p "$B/work" "$B/crashes"

# one instrumented library: the extension's own sources plus the driver
# (rebuilt when a source is newer)
if [ ! -f "$B/fluxrate_fuzz.so" ] || [ "$(cat "$B/link.flags" 2>/dev/null)" != "$LIBS" ] || [ -n "$(find "$ROOT/src" "$ROOT/test/fuzz/driver.c" -newer "$B/fluxrate_fuzz.so" \( -name '*.c' -o -name '*.h' \) | head -1)" ]; then
clang -g -O1 -fno-omit-frame-pointer -fPIC -shared -std=gnu11 -D_GNU_SOURCE -DFR_VERSION='"fuzz"' \
  -fsanitize=fuzzer-no-link -Wno-unused-command-line-argument \
  -I"$ROOT/src" -I"$PGINC" -I"$PGINC_CLIENT" -o "$B/fluxrate_fuzz.so" "$ROOT"/src/*.c "$ROOT/test/fuzz/driver.c" \
  "$RT/libclang_rt.fuzzer_no_main-x86_64.a" -lstdc++ $LIBS 2> "$B/build.log" \
  || { cat "$B/build.log"; echo "FAIL: the fuzz build failed"; exit 1; }
echo "$LIBS" > "$B/link.flags"
fi

# a database with the extension (the regular build: its server secrets, roles)
rm -rf "$B/data"
"$PGBIN/initdb" -D "$B/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
echo "CREATE EXTENSION fluxrate;" | "$PGBIN/postgres" --single -D "$B/data" -c log_min_messages=fatal postgres >/dev/null

# the standalone ASan binary, when an ASan target is asked for
ASAN_BIN=
for t in $TARGETS; do
  case "$ASAN_TARGETS" in *" $t "*) ASAN_BIN=$(bash "$ROOT/test/fuzz/build_asan.sh") || exit 1; break;; esac
done

fail=0
for t in $TARGETS; do
  mkdir -p "$B/work/$t"
  log=$B/$t.log
  seed_var=FUZZ_CORPUS_$t
  seed=${!seed_var:-$ROOT/test/fuzz/corpus/$t}
  rc=0
  case "$ASAN_TARGETS" in
  *" $t "*)
    # a finding ends the run with a non-zero status (ASan, UBSan, an oracle's abort)
    FLUXRATE_FUZZ_TARGET=${t%_asan} "$ASAN_BIN" "$B/work/$t" "$seed" -max_total_time="$S" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$B/crashes/$t-" > "$log" 2>&1 || rc=$?
    kind="ASan+UBSan";;
  *)
  kind="backend, no ASan"
  # libFuzzer ends the backend itself (exit status 0, or non-zero on a finding)
  "$PGBIN/postgres" --single -D "$B/data" -c log_min_messages=fatal -c fluxrate.pinned_now='2026-06-01 00:00:00+00' postgres \
    > "$log" 2>&1 <<SQL || rc=$?
CREATE OR REPLACE FUNCTION public.fuzz(text, text[]) RETURNS integer AS '$B/fluxrate_fuzz.so', 'fr_fuzz_main' LANGUAGE C STRICT;
SELECT public.fuzz('$t', ARRAY['$B/work/$t', '$seed', '-max_total_time=$S', '-timeout=10', '-rss_limit_mb=0', '-print_final_stats=1', '-artifact_prefix=$B/crashes/$t-']);
SQL
  ;;
  esac
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  seeds=$(ls "$seed" | wc -l)
  if [ "$rc" = 0 ] && [ -n "$runs" ] && [ "$runs" -gt 0 ]; then
    echo "fuzz $t ($kind): ${S}s, $runs inputs, $cov, $seeds seeds replayed, no finding"
  else
    echo "fuzz $t ($kind): FAILED (exit $rc); log $log"; tail -40 "$log"; ls "$B/crashes" | grep "^$t-" || true
    fail=1
  fi
done
exit $fail
