#!/usr/bin/env bash
# The short fuzz run of make test: every libFuzzer target (test/fuzz/driver.c)
# for FUZZ_SECONDS (default 3) after replaying its committed corpus, which
# holds every crash ever found (regression inputs).  First the harness must
# prove it can fail: the selftest target is given its crashing input and must
# report a finding with the input saved as an artifact.  `make fuzz` runs the
# same targets for 60 s each.
set -euo pipefail
: "${ROOT:?}" "${PGBIN:?}"
B=$ROOT/build/fuzz
rm -rf "$B/crashes" "$B/selftest-corpus"; mkdir -p "$B/selftest-corpus"
printf 'fluxrate-fuzz-selftest' > "$B/selftest-corpus/trigger"
# the selftest reads its corpus from build/ (the trigger is never committed:
# it would fail every run)
if FUZZ_SECONDS=2 FUZZ_TARGETS=selftest FUZZ_CORPUS_selftest="$B/selftest-corpus" bash "$ROOT/test/fuzz/run.sh"; then
  echo "FAIL: the selftest's crashing input was not reported"; exit 1
fi
ls "$B/crashes" | grep -q '^selftest-crash-' || { echo "FAIL: no crash artifact for the selftest"; exit 1; }
echo "selftest: the crash was reported and saved ($(ls "$B/crashes"))"
rm -rf "$B/crashes"
FUZZ_SECONDS=${FUZZ_SECONDS:-3} bash "$ROOT/test/fuzz/run.sh"
