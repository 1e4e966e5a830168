#!/usr/bin/env bash
# make fuzz: the set-up of make test (packages, build, private install), then
# every libFuzzer target for FUZZ_SECONDS (default 60) each: test/fuzz/run.sh.
#   make fuzz FUZZ_SECONDS=600 FUZZ_TARGETS="tiers batch"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
as_user env ROOT="$ROOT" PGBIN="$PGBIN" FUZZ_SECONDS="${FUZZ_SECONDS:-60}" \
  ${FUZZ_TARGETS:+FUZZ_TARGETS="$FUZZ_TARGETS"} bash "$ROOT/test/fuzz/run.sh"
