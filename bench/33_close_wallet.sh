#!/usr/bin/env bash
# The closing benchmark (31_close.sh) with a wallet on every subscription (two
# credit grants per customer, drawn down at the finalization after the close,
# which is timed and reported) and, where discounts are installed, a 20% coupon
# on every subscription too (issue 16: "keeps its goal with a coupon and a
# wallet on every subscription").  Goal: the same as 31's.
BENCH_WALLET=1 BENCH_COUPON=${BENCH_COUPON:-1} exec bash "$(dirname "${BASH_SOURCE[0]}")/31_close.sh"
