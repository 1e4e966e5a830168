#!/usr/bin/env bash
# Curves, not points (issue 17, item 4): how each cost grows, as ratios against
# plain PostgreSQL measured side by side in this run.  Sections (CURVES selects,
# default all, in this order):
#   months  BENCH_MONTHS (12) consecutive monthly closes of one organization
#           (close 12 / close 1), with finalization in between
#   close   closing at BENCH_SUBS subscriptions each (one organization per size,
#           all October 2026), per-subscription cost, and the peak memory of the
#           closing backend (RssAnon sampled from /proc, VmHWM at its end)
# (months first: its organization's periods then end in late 2027, so they are
# not due again when the clock is pinned back to 2026-11-01 for each size)
#   ingest  track and track_batch against a plain INSERT with 0, then more
#           events already stored (BENCH_HIST), on both sides
#   live    get_customer_usage() of one customer, idle and under concurrent
#           ingestion (p50/p99), at each stored size of the ingest section
#   copy    plain COPY into usage_events; fluxrate.load_events (issue 17 item
#           3) over a COPYd staging table beside it, once it exists (pending)
# BENCH_SCALE=small (default, a few minutes) or big (10M/50M events, 50,000
# subscriptions: ~1 h and ~35 GB on this VM, see bench/RESULTS.md).
# Lines "bench <name>: ..." as the other benches; every point also goes to
# $OUT/curves/*.tsv for bench/plot_curves.sh.  Through the public API only
# (track, track_batch, close_due_periods, finalize_due_invoices,
# get_customer_usage); history is written with INSERT ... SELECT into
# fluxrate_internal.usage_events (gen_history below), which works on a
# partitioned table as well.
set -euo pipefail
[ "${BENCH_TRACE:-0}" = 1 ] && set -x
SCALE=${BENCH_SCALE:-small}
case "$SCALE" in
  small) HIST=${BENCH_HIST:-"0 200000 1000000"}; SUBS=${BENCH_SUBS:-"200 1000 5000"}; MSUBS=${BENCH_MONTH_SUBS:-500}
         T=${BENCH_SECONDS:-10}; R=${BENCH_ROUNDS:-2}; COPYN=${BENCH_COPY:-200000}; LIVE_T=${BENCH_LIVE_SECONDS:-5} ;;
  big)   HIST=${BENCH_HIST:-"0 10000000 50000000"}; SUBS=${BENCH_SUBS:-"1000 10000 50000"}; MSUBS=${BENCH_MONTH_SUBS:-10000}
         T=${BENCH_SECONDS:-30}; R=${BENCH_ROUNDS:-6}; COPYN=${BENCH_COPY:-5000000}; LIVE_T=${BENCH_LIVE_SECONDS:-20} ;;
  *) echo "BENCH_SCALE is small or big"; exit 1 ;;
esac
CURVES=${CURVES:-"months close ingest live copy"}
C=${BENCH_CLIENTS:-16}
EPS=${BENCH_EVENTS_PER_SUB:-30}   # events per subscription and month (10 per meter)
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"; }
W=$(mktemp -d)
CV=${OUT:-/tmp}/curves; mkdir -p "$CV"
load() { cut -d' ' -f1-3 /proc/loadavg; }
now_s() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
has() { case " $CURVES " in *" $1 "*) return 0 ;; esac; return 1; }
echo "curves: scale $SCALE, sections: $CURVES; history sizes: $HIST; subscriptions: $SUBS; load $(load)"
q "ALTER DATABASE $PGDATABASE RESET fluxrate.pinned_now"

# --- closing ------------------------------------------------------------------
# An organization with one plan of 3 SUM usage charges and n subscriptions from
# 2026-10-01, EPS events per subscription in its first month, the rollups
# refreshed before the period ends (as the minute job keeps them; timed apart)
# and a tail of one event per subscription after the refresh, read by the close
# from the events.
pin() { q "ALTER DATABASE $PGDATABASE SET fluxrate.pinned_now = '$1'"; }
setup_close_org() {  # setup_close_org <name> <subs> -> ORG, PLAN
  ORG=$(q "SELECT (fluxrate.create_organization('$1'))->>'id'")
  PLAN=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_plan('Metered', 'metered', 'USAGE', 'month', 'USD'))->>'id'" | tail -1)
  for m in 1 2 3; do
    q "SELECT fluxrate.act_as('$ORG');
       SELECT fluxrate.add_charge('$PLAN', 'USAGE', meter_id => ((fluxrate.create_feature('Meter $m', 'm$m', 'meter', meter_name => 'm$m',
              property_name => 'q', aggregation_type => 'SUM'))->>'meter_id')::uuid, unit_price => 0.00$m)" >/dev/null
  done
  q "INSERT INTO fluxrate_internal.customers (org_id, name, email, external_id, created_at, updated_at)
     SELECT '$ORG', 'c' || g, 'c' || g || '@example.com', 'cust-' || g, now(), now() FROM generate_series(1, $2) g"
  q "SELECT fluxrate.act_as('$ORG');
     SELECT count(fluxrate.create_subscription(c.id, '$PLAN', start_date => '2026-10-01 00:00+00'))
       FROM fluxrate_internal.customers c WHERE c.org_id = '$ORG'" >/dev/null
}
month_events() {  # month_events <org> <subs> <month start> <n events> <tail: 0|1>
  q "CREATE TEMP TABLE bc AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.customers WHERE org_id = '$1';
     CREATE TEMP TABLE bm AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM fluxrate_internal.meters WHERE org_id = '$1';
     INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, \"timestamp\", ingested_at)
     SELECT '$1', fluxrate_internal.uuid_v7(), c.id, m.id, 1 + (g % 7),
            CASE WHEN $5 = 0 THEN timestamptz '$3' + (g % 2400000) * interval '1 second'
                 ELSE timestamptz '$3' + interval '1 month' - interval '1 hour' + (g % 3600) * interval '1 second' END,
            timestamptz '$3'
       FROM generate_series(0, $4 - 1) g
       JOIN bc c ON c.n = g % $2
       JOIN bm m ON m.n = (g / $2) % 3"
}
# Runs one procedure in a backend of its own and samples that backend's memory
# from /proc every 50 ms: peak RssAnon (its private memory: palloc, sorts,
# hashes, temp buffers; shared_buffers pages it touches are RssShmem and left
# out) and VmHWM (peak resident, shared pages included) at the last sample.
timed_call() {  # timed_call <tag> <sql> -> SECS, PEAK_ANON_KB, HWM_KB
  local tag=bench51_$1 pid="" s e
  s=$(now_s)
  PGAPPNAME=$tag psql -X -q -v ON_ERROR_STOP=1 -c "$2" > "$W/call.out" 2>&1 &
  local cp=$!
  PEAK_ANON_KB=0; HWM_KB=0
  while kill -0 "$cp" 2>/dev/null; do
    [ -z "$pid" ] && pid=$(q "SELECT pid FROM pg_stat_activity WHERE application_name = '$tag' LIMIT 1")
    if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
      read -r a h < <(awk '/^RssAnon:/ { a = $2 } /^VmHWM:/ { h = $2 } END { print a + 0, h + 0 }' "/proc/$pid/status" 2>/dev/null || echo "0 0")
      [ "$a" -gt "$PEAK_ANON_KB" ] && PEAK_ANON_KB=$a
      [ "$h" -gt 0 ] && HWM_KB=$h
    fi
    sleep 0.05
  done
  wait "$cp" || { cat "$W/call.out"; exit 1; }
  e=$(now_s); SECS=$(el "$s" "$e")
}
idle_anon_kb() {  # an idle backend's RssAnon after one trivial statement, for scale
  PGAPPNAME=bench51_idle psql -X -q -c "SELECT pg_sleep(0.5)" >/dev/null &
  local cp=$! pid=""
  for _ in $(seq 1 20); do pid=$(q "SELECT pid FROM pg_stat_activity WHERE application_name = 'bench51_idle' LIMIT 1"); [ -n "$pid" ] && break; sleep 0.02; done
  awk '/^RssAnon:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0
  wait "$cp" || true
}

# --- twelve months ------------------------------------------------------------
# One organization, MSUBS subscriptions from 2026-10-01, EPS events per
# subscription each month; each month: events, rollups refreshed, the close
# (timed), the grace hour, finalization (timed, reported).  Every close also
# re-checks the last 12 finalized periods for late usage, and the tables grow
# by a month of invoices, lines and events each time.
# Where the time goes: pg_stat_user_functions (track_functions = all in the timed
# sessions), the difference over each call, in ms.
FUNCS="'sys_close_prepare', 'sys_close_batch', 'sys_close_usage', 'org_period_usage', 'sys_finalize_batch', 'fill_lines', 'fill_late_lines', 'meter_usage'"
fsnap() { q "SET client_min_messages = warning; CREATE TABLE IF NOT EXISTS public.bench_fstat (label text, funcname text, total_ms float8, calls bigint);
             DELETE FROM public.bench_fstat WHERE label = '$1';
             INSERT INTO public.bench_fstat SELECT '$1', funcname, total_time, calls FROM pg_stat_user_functions
              WHERE schemaname = 'fluxrate_internal' AND funcname IN ($FUNCS)"; }
fdiff() {  # fdiff <snapshot label> <funcname> -> ms since the snapshot
  sleep 0.5  # (an exited backend's counters reach the shared statistics as it exits)
  q "SELECT round(coalesce((SELECT sum(f.total_time) FROM pg_stat_user_functions f
                             WHERE f.schemaname = 'fluxrate_internal' AND f.funcname = '$2'), 0)
                 - coalesce((SELECT sum(total_ms) FROM public.bench_fstat WHERE label = '$1' AND funcname = '$2'), 0))"; }
if has months; then
  NM=${BENCH_MONTHS:-12}
  pin '2026-10-01 00:00:00+00'
  setup_close_org "Curve months" "$MSUBS"
  MORG=$ORG
  printf "month\tperiod_start\tclose_s\tper_sub_ms\tfinalize_s\trefresh_s\tprepare_ms\tbatches_ms\tfill_late_ms\tload\n" > "$CV/months.tsv"
  for i in $(seq 0 $((NM - 1))); do
    ms=$(q "SELECT to_char(timestamptz '2026-10-01 00:00+00' + $i * interval '1 month', 'YYYY-MM-DD')")
    me=$(q "SELECT to_char(timestamptz '2026-10-01 00:00+00' + ($i + 1) * interval '1 month', 'YYYY-MM-DD')")
    pin "$ms 00:00:00+00"
    month_events "$MORG" "$MSUBS" "$ms" $((MSUBS * EPS)) 0
    psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_events" >/dev/null
    s=$(now_s); q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null; rs=$(el "$s" "$(now_s)")
    psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_rollups" -c "CHECKPOINT" >/dev/null
    month_events "$MORG" "$MSUBS" "$ms" "$MSUBS" 1
    pin "$me 00:00:30+00"
    fsnap m0
    PGOPTIONS="-c track_functions=all" timed_call month_$i "CALL fluxrate.close_due_periods()"; cs=$SECS
    pms=$(fdiff m0 sys_close_prepare); bms=$(fdiff m0 sys_close_batch)
    got=$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$MORG' AND period_start = '$ms'")
    [ "$got" = "$MSUBS" ] || { echo "month $((i + 1)): $got invoices for $MSUBS subscriptions"; exit 1; }
    pin "$me 01:00:30+00"
    fsnap f0
    s=$(now_s); PGOPTIONS="-c track_functions=all" psql -X -q -c "CALL fluxrate.finalize_due_invoices()"; fs=$(el "$s" "$(now_s)")
    fl=$(fdiff f0 fill_late_lines)
    l=$(load)
    printf "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" $((i + 1)) "$ms" "$cs" "$(awk -v s="$cs" -v n="$MSUBS" 'BEGIN { printf "%.4f", s * 1000 / n }')" "$fs" "$rs" "$pms" "$bms" "$fl" "$l" >> "$CV/months.tsv"
    echo "bench close_month_$((i + 1)): $cs s for $MSUBS subscriptions ($ms; sys_close_prepare $pms ms, batches $bms ms), finalize $fs s (fill_late_lines $fl ms), refresh $rs s, peak RssAnon $((PEAK_ANON_KB / 1024)) MB; load $l"
  done
  awk -F'\t' 'NR == 2 { f = $3 } NR == 13 { l = $3 } END { if (l) printf "bench close_month_12_vs_1: ratio=%.3f (goal within 20%%: <= 1.20)\n", l / f }' "$CV/months.tsv"
fi
if has close; then
  IDLE_KB=$(idle_anon_kb)
  printf "subs\tclose_s\tper_sub_ms\tbaseline_s\tpeak_anon_mb\tvmhwm_mb\tidle_anon_mb\trefresh_s\tevents\tload\n" > "$CV/close.tsv"
  for n in $SUBS; do
    pin '2026-10-01 00:00:00+00'
    setup_close_org "Curve close $n" "$n"
    ev=$((n * EPS))
    month_events "$ORG" "$n" 2026-10-01 "$ev" 0
    psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_events" -c "CHECKPOINT" >/dev/null
    s=$(now_s); q "SELECT fluxrate.refresh_usage_rollups()" >/dev/null; rs=$(el "$s" "$(now_s)")
    psql -X -q -c "VACUUM ANALYZE fluxrate_internal.usage_rollups" -c "CHECKPOINT" >/dev/null
    month_events "$ORG" "$n" 2026-10-01 "$n" 1
    ev=$((ev + n))
    # the baseline: one plain GROUP BY customer, meter pass over the same events
    s=$(now_s)
    q "SELECT count(*), sum(s) FROM (SELECT customer_id, meter_id, sum(quantity) AS s FROM fluxrate_internal.usage_events
        WHERE org_id = '$ORG' AND \"timestamp\" >= '2026-10-01' AND \"timestamp\" < '2026-11-01' GROUP BY 1, 2) x" >/dev/null
    bs=$(el "$s" "$(now_s)")
    pin '2026-11-01 00:00:30+00'
    timed_call close_$n "CALL fluxrate.close_due_periods()"
    got=$(q "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$ORG' AND period_start = '2026-10-01'")
    [ "$got" = "$n" ] || { echo "close of $n subscriptions made $got invoices"; exit 1; }
    l=$(load)
    awk -v n="$n" -v s="$SECS" -v b="$bs" -v pa="$PEAK_ANON_KB" -v h="$HWM_KB" -v i="$IDLE_KB" -v r="$rs" -v ev="$ev" -v l="$l" 'BEGIN {
      printf "%d\t%.3f\t%.4f\t%.3f\t%.1f\t%.1f\t%.1f\t%.3f\t%d\t%s\n", n, s, s * 1000 / n, b, pa / 1024, h / 1024, i / 1024, r, ev, l }' >> "$CV/close.tsv"
    awk -v n="$n" -v s="$SECS" -v b="$bs" -v pa="$PEAK_ANON_KB" -v h="$HWM_KB" -v l="$l" -v r="$rs" -v ev="$ev" 'BEGIN {
      printf "bench close_%d: %.2f s, %.3f ms per subscription (%d events; rollup refresh %.2f s apart); baseline GROUP BY %.2f s; ratio=%.3f; closing backend peak RssAnon %.1f MB, VmHWM %.1f MB; load %s\n",
             n, s, s * 1000 / n, ev, r, b, b / s, pa / 1024, h / 1024, l }'
  done
  # per subscription at the largest size against the smallest, and the marginal
  # cost between the two largest sizes (what one more subscription costs there)
  awk -F'\t' 'NR == 2 { f = $3 } NR > 1 { pn = n; ps = s; l = $3; n = $1; s = $2 }
    END { if (f > 0) printf "bench close_per_sub_growth: largest/smallest = %.3f (goal within 20%%: 0.80-1.20); marginal between the two largest sizes %.4f ms per subscription\n", l / f, (s - ps) * 1000 / (n - pn) }' "$CV/close.tsv"
fi

q "ALTER DATABASE $PGDATABASE RESET fluxrate.pinned_now"

# --- ingestion with history -----------------------------------------------------
# As bench 11: 1,000 customers whose ids follow from their number, so that the
# baseline inserts exactly the rows ours does; the baseline table copies
# usage_events with every index.  Here both tables first get the same history,
# generated by gen_history: the ingesting organization's own past events, the
# n-th one (n = 0, 1, ...) stamped 365 days / the largest size further back than
# the one before (history grows backwards, so the recent days are full at every
# size), idempotency keys 'h<n>', a 32-byte payload hash.  The measured events
# are not deleted between rounds (a DELETE + VACUUM of a 50M-row table's
# indexes would dwarf the rounds): they stay as history, on both sides.
if has ingest || has live; then
  ORG=$(q "SELECT (fluxrate.create_organization('Curve ingest'))->>'id'")
  TOK=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_feature('Calls','calls','meter',meter_name=>'calls',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
  MID=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$ORG'")
  KEY=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_api_key('bench', ARRAY['usage.write']))->>'key'" | tail -1)
  q "SELECT fluxrate.act_as('$ORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
  q "UPDATE fluxrate_internal.customers SET id = ('00000000-0000-4000-8000-' || lpad(substr(external_id, 6), 12, '0'))::uuid
      WHERE org_id = '$ORG' AND external_id LIKE 'cust-%'"
  # the live reader's customer: cust-1, subscribed this month to a plan billing the meter
  LPLAN=$(q "SELECT fluxrate.act_as('$ORG'); SELECT (fluxrate.create_plan('Calls', 'calls', 'USAGE', 'month', 'USD'))->>'id'" | tail -1)
  q "SELECT fluxrate.act_as('$ORG'); SELECT fluxrate.add_charge('$LPLAN', 'USAGE', meter_id => '$MID', unit_price => 0.001)" >/dev/null
  LCUST=00000000-0000-4000-8000-000000000001
  q "SELECT fluxrate.act_as('$ORG'); SELECT fluxrate.create_subscription('$LCUST', '$LPLAN', start_date => date_trunc('month', now()))" >/dev/null
  # The baseline is plain PostgreSQL with exact idempotency, on the same history.
  # While usage_events is a plain table with its unique (org_id, idempotency_key)
  # index, the baseline's raw INSERT goes into usage_events itself: the same
  # table, the same indexes, the same history and the same events inserted so
  # far by both sides, at half the disk and half the generation time of a copy
  # (50M events are ~20 GB with their indexes).  Otherwise (a partitioned
  # usage_events, whose unique keys must include the partition key; or
  # BENCH_BASE_COPY=1) the baseline is a plain table copied from usage_events
  # with every index, plus the unique idempotency index if it lacks it, and it
  # gets its own copy of the history, generated the same way.
  uniq() { q "SELECT count(*) FROM pg_index i WHERE i.indrelid = '$1'::regclass AND i.indisunique
               AND pg_get_indexdef(i.indexrelid) LIKE '%(org_id, idempotency_key)'"; }
  if [ "$(q "SELECT relkind FROM pg_class WHERE oid = 'fluxrate_internal.usage_events'::regclass")" = r ] \
     && [ "$(uniq fluxrate_internal.usage_events)" -gt 0 ] && [ "${BENCH_BASE_COPY:-0}" != 1 ]; then
    BASE=fluxrate_internal.usage_events; TABLES=$BASE
  else
    BASE=public.bench_events; TABLES="fluxrate_internal.usage_events $BASE"
    q "DROP TABLE IF EXISTS $BASE; CREATE TABLE $BASE (LIKE fluxrate_internal.usage_events INCLUDING ALL)"
    [ "$(uniq $BASE)" -gt 0 ] || q "CREATE UNIQUE INDEX ON $BASE (org_id, idempotency_key)"
  fi
  echo "baseline table: $BASE"
  HMAX=$(echo "$HIST" | tr ' ' '\n' | sort -n | tail -1); [ "$HMAX" -gt 0 ] || HMAX=1
  # History generation through the internal table, with the idempotency keys
  # wherever the engine keeps them: in usage_events' own unique index (today), or
  # in fluxrate_internal.usage_event_keys (issue 17 item 1: the key table written
  # in the same statement as the event), and in the months' partitions when
  # usage_events is partitioned (made first, as load_events does, so history
  # does not land in the default partition).  Without either, stop rather than
  # measure an ingest path whose idempotency index does not hold the history.
  KEYS=$(q "SELECT to_regclass('fluxrate_internal.usage_event_keys') IS NOT NULL")
  if [ "$KEYS" != t ] && [ "$(uniq fluxrate_internal.usage_events)" = 0 ]; then
    echo "bench 51: neither a unique (org_id, idempotency_key) index on usage_events nor usage_event_keys: adapt gen_history"; exit 1
  fi
  make_months() {  # make_months <from> <to>: the partitions of those months, if usage_events is partitioned
    [ -n "$(q "SELECT to_regproc('fluxrate_internal.make_event_partition')")" ] || return 0
    q "SELECT count(fluxrate_internal.make_event_partition(m))
         FROM generate_series(date_trunc('month', ($1)::timestamptz, 'UTC'), ($2)::timestamptz, interval '1 month') m" >/dev/null
  }
  make_months "now() - interval '366 days'" "now() + interval '1 month'"
  HASH="'\\x$(printf 'ab%.0s' $(seq 1 32))'::bytea"
  gen_history() {  # gen_history <table> <from n> <to n>
    local sel="SELECT '$ORG'::uuid, fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((g % 1000)::text, 12, '0'))::uuid, '$MID'::uuid,
                      (1 + (g % 7))::numeric, ts, ts, 'h' || g, $HASH
                 FROM generate_series($2::bigint, $3::bigint - 1) g,
                      LATERAL (SELECT now() - (g + 1) * (interval '365 days' / $HMAX)) t(ts)"
    local cols='org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key, payload_hash'
    if [ "$KEYS" = t ] && [ "$1" = fluxrate_internal.usage_events ]; then
      q "WITH ev AS (INSERT INTO $1 ($cols) $sel RETURNING org_id, idempotency_key, id, \"timestamp\", payload_hash)
         INSERT INTO fluxrate_internal.usage_event_keys (org_id, idempotency_key, event_id, \"timestamp\", payload_hash) SELECT * FROM ev"
    else
      q "INSERT INTO $1 ($cols) $sel"
    fi
  }
  cat > "$W/ours_single.sql" <<SQL
\set k random(1, 9000000000000000000)
\set c :k % 1000
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'cust-' || :c,
                      quantity => 1, idempotency_key => 'o' || :k);
SQL
  cat > "$W/base_single.sql" <<SQL
\set k random(1, 9000000000000000000)
\set c :k % 1000
INSERT INTO $BASE (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
VALUES (:org, fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad(:c::text, 12, '0'))::uuid, :meter, 1, now(), now(), 'p' || :k)
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
  q "SET client_min_messages = warning; DROP TABLE IF EXISTS public.bench_tpl; CREATE TABLE public.bench_tpl AS
     SELECT jsonb_agg(jsonb_build_object('meter_token', '$TOK', 'customer_external_id', 'cust-' || (g % 1000),
                      'quantity', 1, 'idempotency_key', 'b@K@-' || g))::text AS t FROM generate_series(1, 1000) g"
  cat > "$W/ours_batch.sql" <<SQL
\set k random(1, 9000000000000000000)
\set c :k % 1000
SELECT fluxrate.track_batch((SELECT replace(t, '@K@', :k::text) FROM public.bench_tpl)::jsonb, :key);
SQL
  cat > "$W/base_batch.sql" <<SQL
\set k random(1, 9000000000000000000)
\set c :k % 1000
INSERT INTO $BASE (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at, idempotency_key)
SELECT :org::uuid, fluxrate_internal.uuid_v7(), ('00000000-0000-4000-8000-' || lpad((g % 1000)::text, 12, '0'))::uuid, :meter::uuid,
       1, now(), now(), 'q' || :k || '-' || g FROM generate_series(1, 1000) g
ON CONFLICT (org_id, idempotency_key) DO NOTHING;
SQL
  # (keys: random 63-bit numbers, one prefix per script: the measured events stay
  # in the table, and on the shared table both sides', so a key drawn twice would
  # be an idempotency conflict, not a replay)
  # the live reader, and the ingestion beside it: track by 8 clients over the
  # 1,000 customers, one event in ten for the reader's own customer
  cat > "$W/live.sql" <<SQL
SELECT fluxrate.act_as(:org, true);
SELECT fluxrate.get_customer_usage(:lcust);
SQL
  cat > "$W/live_own.sql" <<SQL
\set k random(1, 9000000000000000000)
\set c :k % 1000
SELECT fluxrate.track(api_key => :key, meter_token => :tok, customer_external_id => 'cust-1', quantity => 1, idempotency_key => 'l' || :k);
SQL
  D=(-D key="$KEY" -D tok="$TOK" -D org="$ORG" -D meter="$MID" -D lcust="$LCUST")
  run() { pgbench -n -M prepared -c "$C" -j 2 -T "$1" "${D[@]}" -f "$2" > "$3" 2>&1 || { cat "$3"; exit 1; }; }
  reset() { psql -X -q -c "CHECKPOINT" >/dev/null; }
  source "$(dirname "${BASH_SOURCE[0]}")/rounds.sh"
  pct() { sort -n | awk '{ a[NR] = $1 } END { i50 = int(NR * 0.50 + 0.5); i99 = int(NR * 0.99 + 0.5); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1;
                                                printf "%.3f %.3f %d\n", a[i50] / 1000, a[i99] / 1000, NR }'; }
  live_run() {  # live_run <tag> -> $W/pct_<tag>: "p50_ms p99_ms n" of the reader (pgbench -l, 3rd field: µs)
    rm -f "$W"/livelog_"$1".*
    (cd "$W" && pgbench -n -M prepared -c 1 -T "$LIVE_T" "${D[@]}" -l --log-prefix="livelog_$1" -f "$W/live.sql" > "$W/live_$1.out" 2>&1) || { cat "$W/live_$1.out"; exit 1; }
    cat "$W"/livelog_"$1".* | awk '{ print $3 }' | pct > "$W/pct_$1"
  }
  printf "stored\tname\tours\tbaseline\tratio\tload\n" > "$CV/ingest.tsv"
  printf "stored\tidle_p50_ms\tidle_p99_ms\tbusy_p50_ms\tbusy_p99_ms\tp99_ratio\tingest_per_s\tload\n" > "$CV/live.tsv"
  printf "size\ttable\tseconds\n" > "$CV/history.tsv"
  prev=0
  for h in $HIST; do
    if [ "$h" -gt "$prev" ]; then
      for t in $TABLES; do
        # in slices of 1M rows (one statement's memory and WAL stay bounded), two
        # sessions at a time
        s=$(now_s)
        for ((a = prev; a < h; a += 2000000)); do
          b=$((a + 1000000)); [ "$b" -gt "$h" ] && b=$h
          gen_history "$t" "$a" "$b" &
          p1=$!
          [ "$b" -lt "$h" ] && { c=$((b + 1000000)); [ "$c" -gt "$h" ] && c=$h; gen_history "$t" "$b" "$c"; }
          wait "$p1"
        done
        gs=$(el "$s" "$(now_s)")
        printf "%d\t%s\t%s\n" "$h" "$t" "$gs" >> "$CV/history.tsv"
        echo "history: $t to $h events in $gs s; load $(load); disk $(df -h "$CV" | awk 'NR == 2 { print $4 " free" }')"
      done
      for t in $TABLES; do psql -X -q -c "VACUUM ANALYZE $t" >/dev/null; done
      psql -X -q -c "CHECKPOINT" >/dev/null
      prev=$h
    fi
    stored=$(q "SELECT count(*) FROM fluxrate_internal.usage_events WHERE org_id = '$ORG'")
    # (a partitioned table's size is its partitions')
    sz=$(q "SELECT string_agg(t || ' ' || pg_size_pretty(coalesce((SELECT sum(pg_total_relation_size(p.relid)) FROM pg_partition_tree(t::regclass) p), pg_total_relation_size(t::regclass))), ', ')
              FROM unnest(string_to_array('$TABLES' || CASE WHEN '$KEYS'::boolean THEN ' fluxrate_internal.usage_event_keys' ELSE '' END, ' ')) t")
    echo "stored: $stored events of the ingesting organization (history $h); with indexes: $sz"
    if has ingest; then
      for kind in single batch; do
        per=1; [ "$kind" = batch ] && per=1000
        line=$(side "track_${kind}_h$h" "$W/base_$kind.sql" "$W/ours_$kind.sql" "$per")
        echo "$line; load $(load)"
        echo "$line" | sed -E "s/^bench track_${kind}_h[0-9]+: ours=([0-9.]+)\/s baseline=([0-9.]+)\/s ratio=([0-9.]+)$/$h\ttrack_$kind\t\1\t\2\t\3\t$(load)/" >> "$CV/ingest.tsv"
      done
    fi
    if has live; then
      live_run idle_$h; read -r ip50 ip99 in < "$W/pct_idle_$h"
      pgbench -n -M prepared -c 8 -j 2 -T $((LIVE_T + 4)) "${D[@]}" -f "$W/ours_single.sql@9" -f "$W/live_own.sql@1" > "$W/ingest_bg.out" 2>&1 &
      bg=$!
      sleep 2
      live_run busy_$h; read -r bp50 bp99 bn < "$W/pct_busy_$h"
      wait "$bg" || { cat "$W/ingest_bg.out"; exit 1; }
      itps=$(tps "$W/ingest_bg.out")
      l=$(load)
      printf "%d\t%s\t%s\t%s\t%s\t%s\t%.0f\t%s\n" "$stored" "$ip50" "$ip99" "$bp50" "$bp99" "$(awk -v a="$bp99" -v b="$ip99" 'BEGIN { printf "%.3f", a / b }')" "$itps" "$l" >> "$CV/live.tsv"
      # what one read reads: the reader's meter over its current period (the
      # statement of meter_usage's SUM path), with its plan kept in $CV
      RQ="SELECT sum(e.quantity) FROM fluxrate_internal.usage_events e WHERE e.org_id = '$ORG' AND e.customer_id = '$LCUST' AND e.meter_id = '$MID'
            AND e.\"timestamp\" >= (SELECT current_period_start FROM fluxrate_internal.subscriptions WHERE org_id = '$ORG' AND customer_id = '$LCUST')
            AND e.\"timestamp\" < (SELECT current_period_end FROM fluxrate_internal.subscriptions WHERE org_id = '$ORG' AND customer_id = '$LCUST')"
      q "EXPLAIN (ANALYZE, BUFFERS) $RQ" > "$CV/explain_live_h$h.txt"
      rd=$(q "SELECT count(*) FROM fluxrate_internal.usage_events e WHERE e.org_id = '$ORG' AND e.customer_id = '$LCUST'
            AND e.\"timestamp\" >= (SELECT current_period_start FROM fluxrate_internal.subscriptions WHERE org_id = '$ORG' AND customer_id = '$LCUST')")
      hf=$(grep -o 'Heap Fetches: [0-9]*' "$CV/explain_live_h$h.txt" | head -1)
      echo "bench live_usage_h$h: idle p50=${ip50} ms p99=${ip99} ms ($in reads); under ingestion (${itps%.*} track/s, 8 clients) p50=${bp50} ms p99=${bp99} ms ($bn reads); p99 ratio=$(awk -v a="$bp99" -v b="$ip99" 'BEGIN { printf "%.3f", a / b }') (goal <= 2); the reader's customer has $rd events in its period after the run ($hf in the plan); load $l"
    fi
  done
  q "SET client_min_messages = warning; DROP TABLE IF EXISTS public.bench_events, public.bench_tpl" >/dev/null
fi

# --- bulk load ------------------------------------------------------------------
# COPYN events of one organization (1,000 customers, one meter, a month) from a
# CSV file.  Baseline: plain COPY into fluxrate_internal.usage_events itself
# (the same table; and of the keys into usage_event_keys where the engine keeps
# them there), the rows as the engine would store them.  Ours, once
# fluxrate.load_events (issue 17 item 3) exists: COPY of the same events as
# track's arguments into a staging table, then load_events() (validation,
# customers, keys, events), timed together.  Until then its row says pending.
if has copy; then
  CORG=$(q "SELECT (fluxrate.create_organization('Curve copy'))->>'id'")
  CTOK=$(q "SELECT fluxrate.act_as('$CORG'); SELECT (fluxrate.create_feature('Rows','rows','meter',meter_name=>'rows',property_name=>'n',aggregation_type=>'SUM'))->>'meter_token'" | tail -1)
  CMID=$(q "SELECT id FROM fluxrate_internal.meters WHERE org_id = '$CORG'")
  q "SELECT fluxrate.act_as('$CORG'); SELECT count(fluxrate.create_customer('c' || g, 'c' || g || '@example.com', 'cust-' || g)) FROM generate_series(0, 999) g" >/dev/null
  if [ -n "$(q "SELECT to_regproc('fluxrate_internal.make_event_partition')")" ]; then
    q "SELECT count(fluxrate_internal.make_event_partition(m)) FROM generate_series(timestamptz '2026-10-01', '2026-11-01', interval '1 month') m" >/dev/null
  fi
  KEYS=$(q "SELECT to_regclass('fluxrate_internal.usage_event_keys') IS NOT NULL")
  BULK=$(q "SELECT to_regprocedure('fluxrate.load_events(regclass)') IS NOT NULL")
  # (2,592,000 s: October; the n-th event at n × 2,592,000 / COPYN s)
  TS="timestamptz '2026-10-01 00:00+00' + (g * (2592000.0 / $COPYN)) * interval '1 second'"
  q "CREATE TABLE public.bench_cc AS SELECT row_number() OVER (ORDER BY external_id) - 1 AS n, id, external_id FROM fluxrate_internal.customers WHERE org_id = '$CORG'"
  q "CREATE TABLE public.bench_src AS SELECT '$CORG'::uuid AS org_id, fluxrate_internal.uuid_v7() AS id, c.id AS customer_id, '$CMID'::uuid AS meter_id,
            1 + (g % 7) AS quantity, $TS AS ts, 'c' || g AS k, c.external_id
       FROM generate_series(0, $COPYN - 1) g JOIN public.bench_cc c ON c.n = g % 1000"
  q "COPY (SELECT org_id, id, customer_id, meter_id, quantity, ts, ts, k FROM public.bench_src) TO '$CV/events.csv' WITH (FORMAT csv)"
  q "COPY (SELECT org_id, k, id, ts FROM public.bench_src) TO '$CV/keys.csv' WITH (FORMAT csv)"
  q "COPY (SELECT '$CTOK', external_id, quantity, ts, 'l' || substr(k, 2) FROM public.bench_src) TO '$CV/load.csv' WITH (FORMAT csv)"
  q "DROP TABLE public.bench_src; CHECKPOINT"
  s=$(now_s)
  q "COPY fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, \"timestamp\", ingested_at, idempotency_key) FROM '$CV/events.csv' WITH (FORMAT csv)"
  # the keys as the engine stores them there: (org, key, event id, time)
  [ "$KEYS" = t ] && q "COPY fluxrate_internal.usage_event_keys (org_id, idempotency_key, event_id, \"timestamp\") FROM '$CV/keys.csv' WITH (FORMAT csv)"
  cs=$(el "$s" "$(now_s)")
  q "CHECKPOINT"
  bs=pending; bps=pending; ratio=pending
  if [ "$BULK" = t ]; then
    s=$(now_s)
    res=$(psql -X -q -t -A -v ON_ERROR_STOP=1 -c "CREATE TEMP TABLE s OF fluxrate.event_load_row" \
            -c "COPY s (meter_token, customer_external_id, quantity, \"timestamp\", idempotency_key) FROM '$CV/load.csv' WITH (FORMAT csv)" \
            -c "GRANT SELECT ON s TO fluxrate_owner" -c "SELECT fluxrate.act_as('$CORG', true)" -c "SELECT fluxrate.load_events('s')" | tail -1)
    bs=$(el "$s" "$(now_s)")
    [ "$(echo "$res" | sed -E 's/.*"created": ([0-9]+).*/\1/')" = "$COPYN" ] || { echo "load_events: $res"; exit 1; }
    bps=$(awk -v n="$COPYN" -v s="$bs" 'BEGIN { printf "%.0f", n / s }'); ratio=$(awk -v c="$cs" -v b="$bs" 'BEGIN { printf "%.3f", c / b }')
  fi
  l=$(load)
  printf "rows\tcopy_s\tcopy_per_s\tbulk_s\tbulk_per_s\tratio\tload\n" > "$CV/copy.tsv"
  printf "%d\t%s\t%.0f\t%s\t%s\t%s\t%s\n" "$COPYN" "$cs" "$(awk -v n="$COPYN" -v s="$cs" 'BEGIN { print n / s }')" "$bs" "$bps" "$ratio" "$l" >> "$CV/copy.tsv"
  awk -v n="$COPYN" -v s="$cs" -v o="$bps" -v r="$ratio" -v l="$l" 'BEGIN { printf "bench bulk_load: ours=%s/s baseline=%.0f/s ratio=%s (plain COPY of %d events into usage_events, %.2f s; goal 0.8); load %s\n", o, n / s, r, n, s, l }'
  q "DROP TABLE public.bench_cc" >/dev/null
  rm -f "$CV/events.csv" "$CV/keys.csv" "$CV/load.csv"
fi
rm -rf "$W"
echo "curves: data in $CV (bench/plot_curves.sh $CV draws them)"
