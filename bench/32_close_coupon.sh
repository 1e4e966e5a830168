#!/usr/bin/env bash
# The closing benchmark (31_close.sh) with a 20% coupon on every subscription:
# every invoice gets a discount line, computed in the closing statement
# (close_sql_discounts, 56_discounts.sql).  Goal: the same as 31's.
BENCH_COUPON=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/31_close.sh"
