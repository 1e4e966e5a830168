#!/usr/bin/env bash
# The short fuzz run of make test: every libFuzzer target (test/fuzz/run.sh:
# the standalone ones under ASan and UBSan, the backend ones) for FUZZ_SECONDS
# (default 3) after replaying its committed corpus, which holds every crash
# ever found (regression inputs).  First both harnesses must prove they can
# fail: the selftest target (a NULL write in the backend) and selftest_asan (a
# one-byte read past a palloc'd chunk, which only ASan sees) are given their
# triggering input and must report a finding with the input saved as an
# artifact.  `make fuzz` runs the same targets for 60 s each.
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
if FUZZ_SECONDS=2 FUZZ_TARGETS=selftest_asan FUZZ_CORPUS_selftest_asan="$B/selftest-corpus" bash "$ROOT/test/fuzz/run.sh"; then
  echo "FAIL: the ASan selftest's overflow was not reported"; exit 1
fi
grep -q 'ERROR: AddressSanitizer: heap-buffer-overflow' "$B/selftest_asan.log" || { echo "FAIL: ASan did not report the overflow"; exit 1; }
ls "$B/crashes" | grep -q '^selftest_asan-crash-' || { echo "FAIL: no crash artifact for the ASan selftest"; exit 1; }
echo "selftest_asan: ASan reported the heap-buffer-overflow of a palloc'd chunk, input saved"
rm -rf "$B/crashes"
FUZZ_SECONDS=${FUZZ_SECONDS:-3} bash "$ROOT/test/fuzz/run.sh"
