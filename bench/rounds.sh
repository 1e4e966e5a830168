# Shared by the pgbench benchmarks (11, 12): the two sides alternate in R rounds
# of T/R seconds each (baseline, ours, baseline, ours, ...), each run on reset
# tables, and each side's rate is the mean of its rounds, so that a burst of
# other work on the machine hits both sides alike instead of skewing whichever
# side it happened to overlap.  The caller defines reset() and run <seconds>
# <script> <output>, and sets T (total seconds per side) and W (a work dir).
R=${BENCH_ROUNDS:-6}
report() { awk -v n="$1" -v o="$2" -v b="$3" 'BEGIN { printf "bench %s: ours=%.0f/s baseline=%.0f/s ratio=%.3f\n", n, o, b, o / b }'; }
tps() { grep -E '^tps = ' "$1" | head -1 | sed -E 's/tps = ([0-9.]+).*/\1/'; }
side() {  # side <name> <baseline.sql> <ours.sql> <events per transaction>
  local bs=0 os=0 t=$(( (T + R - 1) / R ))
  for r in $(seq 1 "$R"); do
    reset; run "$t" "$2" "$W/b.out"; bs=$(awk -v a="$bs" -v b="$(tps "$W/b.out")" 'BEGIN { print a + b }')
    reset; run "$t" "$3" "$W/o.out"; os=$(awk -v a="$os" -v b="$(tps "$W/o.out")" 'BEGIN { print a + b }')
  done
  report "$1" "$(awk -v s="$os" -v r="$R" -v n="$4" 'BEGIN { print s / r * n }')" \
              "$(awk -v s="$bs" -v r="$R" -v n="$4" 'BEGIN { print s / r * n }')"
}
