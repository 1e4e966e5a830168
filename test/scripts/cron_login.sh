#!/usr/bin/env bash
# pg_cron without background workers (cron.use_background_workers = off): each
# job is a libpq login to cron.host as the role that scheduled it, without a
# password.  Here cron.host is the cluster's socket directory, so pg_hba.conf's
# "local" lines decide:
#   1. trust: schedule_jobs() logs in the way pg_cron will and schedules;
#   2. scram-sha-256 (Debian's rule for 127.0.0.1): schedule_jobs() refuses with
#      55000 and the setting in its hint, and the jobs scheduled in 1 really fail
#      every minute: health() reports them failing, with pg_cron's message;
#   3. the password in a .pgpass file the server reads (PGPASSFILE): accepted
#      again, and pg_cron itself closes and finalizes a daily period, each job
#      writing its one LOG line;
#   4. DROP EXTENSION fluxrate unschedules its jobs (not another extension's
#      drop, not a rolled-back one).
# Waits are bounded (pg_cron has minute granularity: at most ~70 s each).
source "$ROOT/test/cluster.sh"
cluster_start cron_login "cron.use_background_workers = off"
DATA=$CLUSTER_DIR/data
echo "cron.host = '$CLUSTER_SOCK'" >> "$DATA/postgresql.conf"
pg_ctl -D "$DATA" -l "$CLUSTER_DIR/server.log" -w restart >/dev/null

wait_for() {   # wait_for <seconds> <sql returning t when done>
  local i
  for i in $(seq 1 "$1"); do
    [ "$(q "$2")" = t ] && return 0
    sleep 1
  done
  return 1
}

echo "== 1. trust: schedule_jobs() logs in as pg_cron will, and schedules"
[ "$(q "SELECT count(*) FROM jsonb_object_keys(fluxrate.schedule_jobs())")" = 6 ] || fail "schedule_jobs did not schedule 6 jobs"
clock=$(q "SELECT status || ' ' || detail FROM fluxrate.health WHERE area = 'clock'")
echo "   clock: $clock"
[[ $clock == "ok jobs log in over libpq (host=$CLUSTER_SOCK port=5432)" ]] || fail "clock row: $clock"

echo "== 2. pg_hba asks for a password pg_cron does not have"
q "ALTER ROLE postgres PASSWORD 'cron-login-test'" >/dev/null
q "CREATE ROLE ops_reader LOGIN PASSWORD 'reader-pw'; GRANT fluxrate_operator TO ops_reader" >/dev/null
echo "local all all scram-sha-256" > "$DATA/pg_hba.conf"
pg_ctl -D "$DATA" reload >/dev/null
export PGPASSWORD=cron-login-test
sleep 1
err=$(psql -X -q -v VERBOSITY=default -c 'SELECT fluxrate.schedule_jobs()' 2>&1) && fail "schedule_jobs accepted a login that cannot work"
echo "$err" | sed 's/^/   /'
state=$(psql -X -q -v VERBOSITY=sqlstate -c 'SELECT fluxrate.schedule_jobs()' 2>&1 || true)
[[ $state == *55000* ]] || fail "expected SQLSTATE 55000, got: $state"
[[ $err == *'pg_cron cannot log in to database "fluxrate" as role "postgres"'* ]] || fail "message"
[[ $err == *"host=$CLUSTER_SOCK port=5432 dbname=fluxrate user=postgres, no password"* ]] || fail "detail names the connection"
[[ $err == *'no password supplied'* ]] || fail "detail carries libpq's reason"
[[ $err == *'HINT:  Set cron.use_background_workers = on in postgresql.conf'* ]] || fail "hint names the setting"
echo "   the minute jobs scheduled in 1 now fail for real (bounded wait; the daily purge does not run)"
wait_for 75 "SELECT count(DISTINCT d.jobid) = 5 FROM cron.job_run_details d JOIN cron.job j USING (jobid)
              WHERE j.jobname LIKE 'fluxrate-%' AND j.schedule = '* * * * *' AND d.status = 'failed'" || fail "pg_cron's runs did not fail"
# the operator (not a superuser) reads them through health()
health=$(PGUSER=ops_reader PGPASSWORD=reader-pw qf -F ' | ' -c "SELECT item, status, count, detail FROM fluxrate.health WHERE area = 'job' ORDER BY item")
echo "$health" | sed 's/^/   /'
[ "$(echo "$health" | grep -c '| failing | ')" = 5 ] || fail "health() does not report the 5 minute jobs failing"
[ "$(echo "$health" | grep -cE 'failed runs? (and no success|since its last success at [^;]*); the last( at .* UTC)?: connection failed')" = 5 ] || fail "health() does not give pg_cron's reason"
# a tenant (a trusted application role) is refused
q "CREATE ROLE ops_tenant LOGIN PASSWORD 'tenant-pw'; GRANT fluxrate_app TO ops_tenant" >/dev/null
t=$(PGUSER=ops_tenant PGPASSWORD=tenant-pw psql -X -q -v VERBOSITY=sqlstate -c 'SELECT * FROM fluxrate.health' 2>&1 || true)
[[ $t == *42501* ]] || fail "a tenant read health(): $t"

echo "== 3. the password in the server's .pgpass: accepted, and pg_cron bills a daily period by itself"
printf '*:*:*:postgres:cron-login-test\n' > "$CLUSTER_DIR/pgpass"; chmod 600 "$CLUSTER_DIR/pgpass"
PGPASSFILE=$CLUSTER_DIR/pgpass pg_ctl -D "$DATA" -l "$CLUSTER_DIR/server.log" -w restart >/dev/null
[ "$(q "SELECT count(*) FROM jsonb_object_keys(fluxrate.schedule_jobs())")" = 6 ] || fail "schedule_jobs refused a working login"
# a daily plan whose first period ended a few seconds ago; grace period 0; 3.25 per day in arrears
org=$(q "SELECT (fluxrate.create_organization('Cron login', grace_period => '0'))->>'id'")
qf >/dev/null <<SQL
SELECT fluxrate.act_as('$org', session => true);
SELECT fluxrate.add_charge(((fluxrate.create_plan('Daily', 'daily', 'FIXED', 'day', 'EUR'))->>'id')::uuid, 'FIXED',
       unit_price => 3.25, billing_timing => 'in_arrears');
SELECT fluxrate.create_subscription(((fluxrate.create_customer('Daily customer', 'daily@example.com'))->>'id')::uuid,
       (SELECT id FROM fluxrate_internal.plans WHERE org_id = '$org'), billing_interval => 'day',
       start_date => now() - interval '1 day' + interval '5 seconds');
SQL
sleep 6
wait_for 150 "SELECT count(*) = 1 FROM fluxrate_internal.invoices WHERE org_id = '$org' AND status = 'OPEN'" \
  || fail "pg_cron did not close and finalize the period"
inv=$(q "SELECT invoice_number || ' ' || status || ' ' || total || ' ' || currency FROM fluxrate_internal.invoices WHERE org_id = '$org'")
echo "   $inv"
[[ $inv == "INV-"*"-0001 OPEN 3.25 EUR" ]] || fail "invoice: $inv"   # one day at 3.25 EUR
wait_for 75 "SELECT bool_and(status = 'ok') FROM fluxrate.health WHERE area = 'job'" || fail "health() still reports failing jobs"
q "SELECT item, status, detail FROM fluxrate.health WHERE area = 'job' ORDER BY item" | sed 's/^/   /'
# each job that did something wrote its one line, at LOG, from the pg_cron session
for l in 'close_due_periods: closed 1 period in [0-9]+\.[0-9] s' 'finalize_due_invoices: finalized 1 invoice in [0-9]+\.[0-9] s'; do
  line=$(grep -E "LOG:  fluxrate: $l" "$CLUSTER_DIR/server.log" | head -1)
  [ -n "$line" ] || fail "no log line matching '$l'"
  echo "   log: ${line#*LOG:  }"
  # one line: no STATEMENT or CONTEXT line follows it
  grep -E -A1 "LOG:  fluxrate: $l" "$CLUSTER_DIR/server.log" | grep -Eq '^(\s|.*(STATEMENT|CONTEXT):)' \
    && fail "the job's line comes with STATEMENT or CONTEXT lines"
done

echo "== 4. DROP EXTENSION fluxrate unschedules its jobs"
jobs() { q "SELECT count(*) FROM cron.job WHERE jobname LIKE 'fluxrate-%'"; }
q "CREATE EXTENSION pg_trgm; DROP EXTENSION pg_trgm" >/dev/null
[ "$(jobs)" = 6 ] || fail "dropping another extension touched fluxrate's jobs"
q "BEGIN; DROP EXTENSION fluxrate; ROLLBACK" >/dev/null 2>&1
[ "$(jobs)" = 6 ] || fail "a rolled-back DROP EXTENSION unscheduled the jobs"
out=$(psql -X -q -c 'DROP EXTENSION fluxrate' 2>&1)
echo "   $out"
[[ $out == *'unscheduled its 6 pg_cron jobs'* ]] || fail "no notice: $out"
[ "$(jobs)" = 0 ] || fail "DROP EXTENSION fluxrate left $(jobs) jobs"
# (pg_cron lets PUBLIC select its tables, under row-level security: look at the grants themselves)
[ "$(q "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid IN ('cron.job'::regclass, 'cron.job_run_details'::regclass) AND a.grantee = 'fluxrate_system'::regrole")" = 0 ] \
  || fail "fluxrate_system keeps its grants on pg_cron's tables"
q "CREATE EXTENSION fluxrate" >/dev/null
[ "$(q "SELECT count(*) FROM pg_event_trigger WHERE evtname = 'fluxrate_drop_extension'")" = 1 ] || fail "event trigger not back"
echo "cron_login: ok"
