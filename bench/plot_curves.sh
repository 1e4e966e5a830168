#!/usr/bin/env bash
# Draws bench 51's curves as SVG with gnuplot.
#   bash bench/plot_curves.sh [data dir] [output dir]
# data dir: the TSV files bench/51_curves.sh wrote (default build/bench/curves);
# output dir: where the SVGs go (default bench/curves, next to RESULTS.md, where
# the data of the committed pictures is kept too).
# Needs gnuplot-nox (Debian; the SVG terminal, no X).  A bench-only dependency:
# make test and make bench do not need it, so it is not in test/deps.sh; this
# script installs it when it is missing and it can (root or sudo).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IN=${1:-$ROOT/build/bench/curves}
OUTD=${2:-$ROOT/bench/curves}
if ! command -v gnuplot >/dev/null; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
fi
mkdir -p "$OUTD"
[ "$(cd "$IN" && pwd)" = "$(cd "$OUTD" && pwd)" ] || cp "$IN"/*.tsv "$OUTD"/ 2>/dev/null || true
cd "$OUTD"
# (PLOT_PNG=1: PNG files instead, to look at them where no SVG viewer is at hand)
if [ "${PLOT_PNG:-0}" = 1 ]; then TERMSPEC='pngcairo size 720,440 font "sans,10"'; X=png; else TERMSPEC='svg size 720,440 dynamic font "sans,12" background "#ffffff"'; X=svg; fi
common="set terminal $TERMSPEC; set termoption noenhanced; set key top left box opaque; set grid; set datafile separator \"\\t\""

if [ -s ingest.tsv ]; then
  # one column per side and kind, by stored size (millions)
  awk -F'\t' 'NR > 1 && $2 == "track_single" { print $1 / 1e6 "\t" $3 "\t" $4 "\t" $5 }' ingest.tsv > ingest_single.dat
  awk -F'\t' 'NR > 1 && $2 == "track_batch" { print $1 / 1e6 "\t" $3 "\t" $4 "\t" $5 }' ingest.tsv > ingest_batch.dat
  gnuplot <<GP
$common
set output "ingest_ratio.$X"
set title "Ingestion against a plain INSERT, by events already stored"
set xlabel "events already stored (millions)"; set ylabel "ours / plain PostgreSQL"
set yrange [0:1.3]
plot "ingest_single.dat" using 1:4 with linespoints lw 2 pt 7 title "track (one event)", \
     "ingest_batch.dat" using 1:4 with linespoints lw 2 pt 5 title "track_batch (1,000 events)", \
     0.90 with lines dt 2 lc rgb "#1f77b4" title "goal, single (0.90)", \
     0.85 with lines dt 3 lc rgb "#ff7f0e" title "goal, batch (0.85)"
set output "ingest_rate.$X"
set title "Ingestion rate, by events already stored"
set ylabel "events per second"; set yrange [0:*]; set logscale y; set yrange [100:*]
plot "ingest_single.dat" using 1:2 with linespoints lw 2 pt 7 title "track", \
     "ingest_single.dat" using 1:3 with linespoints lw 2 pt 6 dt 2 title "plain INSERT, one row", \
     "ingest_batch.dat" using 1:2 with linespoints lw 2 pt 5 title "track_batch", \
     "ingest_batch.dat" using 1:3 with linespoints lw 2 pt 4 dt 2 title "plain INSERT, 1,000 rows"
GP
fi
if [ -s close.tsv ]; then
  awk -F'\t' 'NR > 1 { print $1 "\t" $2 "\t" $3 "\t" $5 "\t" $6 "\t" $4 }' close.tsv > close.dat
  gnuplot <<GP
$common
set output "close_per_sub.$X"
set title "Closing: cost per subscription, by subscriptions due"
set logscale x; set xlabel "subscriptions closed in one run"; set ylabel "ms per subscription"; set yrange [0:*]
plot "close.dat" using 1:3 with linespoints lw 2 pt 7 title "close_due_periods()", \
     "close.dat" using 1:(\$6 * 1000 / \$1) with linespoints lw 2 pt 6 dt 2 title "plain GROUP BY pass (baseline)"
set output "close_memory.$X"
set title "Closing: peak memory of the closing backend"
set ylabel "MB"; set yrange [0:*]
plot "close.dat" using 1:4 with linespoints lw 2 pt 7 title "peak RssAnon (private)", \
     "close.dat" using 1:5 with linespoints lw 2 pt 5 dt 2 title "VmHWM (incl. shared buffers touched)"
GP
fi
# every months*.tsv (months.tsv from the run, months_<subs>.tsv kept from other
# runs): each close and finalization against the first month's
if ls months*.tsv >/dev/null 2>&1; then
  plot=""; plot2=""
  for f in months*.tsv; do
    d=${f%.tsv}.dat; t=$(echo "${f%.tsv}" | sed -E 's/^months_?//'); [ -z "$t" ] && t=run
    awk -F'\t' 'NR == 2 { c1 = $3; f1 = $5 } NR > 1 { print $1 "\t" $3 / c1 "\t" $5 / f1 "\t" $3 }' "$f" > "$d"
    plot="$plot${plot:+, }\"$d\" using 1:2 with linespoints lw 2 title \"close_due_periods() ($t)\""
    plot2="$plot2${plot2:+, }\"$d\" using 1:3 with linespoints lw 2 dt 2 title \"finalize_due_invoices() ($t)\""
  done
  gnuplot <<GP
$common
set output "close_months.$X"
set title "Monthly close of one organization: month N against month 1"
set xlabel "month"; set ylabel "time / time of month 1"; set xrange [0.5:12.5]; set xtics 1; set yrange [0:*]
plot $plot, $plot2, 1.2 with lines dt 3 lc rgb "#888888" title "goal: within 20%"
GP
fi
if [ -s live.tsv ]; then
  awk -F'\t' 'NR > 1 { print $1 / 1e6 "\t" $2 "\t" $3 "\t" $4 "\t" $5 }' live.tsv > live.dat
  gnuplot <<GP
$common
set output "live_usage.$X"
set title "get_customer_usage() of one customer: latency"
set xlabel "events already stored (millions)"; set ylabel "ms"; set yrange [0:*]
plot "live.dat" using 1:2 with linespoints lw 2 pt 6 dt 2 title "idle p50", \
     "live.dat" using 1:3 with linespoints lw 2 pt 7 title "idle p99", \
     "live.dat" using 1:4 with linespoints lw 2 pt 4 dt 2 title "under ingestion p50", \
     "live.dat" using 1:5 with linespoints lw 2 pt 5 title "under ingestion p99", \
     "live.dat" using 1:(2 * \$3) with lines dt 3 lc rgb "#888888" title "goal: 2 × idle p99"
GP
fi
rm -f ./*.dat
ls -1 "$OUTD"/*.$X 2>/dev/null || true
