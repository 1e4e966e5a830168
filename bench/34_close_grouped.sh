#!/usr/bin/env bash
# Period closing with a grouped charge (issue 15): bench/31_close.sh with the
# first of the three usage charges priced by event dimension, 10 groups (the
# events carry the model; the rollups are keyed by it; each invoice gets 12
# lines instead of 3).  Run alone (BENCH=34 make bench): beside 31 the events
# table would hold both runs' events, which the baseline's pass filters through.
set -euo pipefail
BENCH_GROUPS=${BENCH_GROUPS:-10} exec bash "$(dirname "${BASH_SOURCE[0]}")/31_close.sh"
