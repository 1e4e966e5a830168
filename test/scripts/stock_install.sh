#!/usr/bin/env bash
# fluxrate-test: runs as root
# The README's "Installing into your own PostgreSQL", extracted from README.md
# and run verbatim as root, on a fresh cluster made by Debian's
# pg_createcluster (Debian's own pg_hba.conf: peer on the socket,
# scram-sha-256 on 127.0.0.1), with its own name and port.  Then, with no
# manual call: an organization with a daily plan and a 30-second grace period,
# whose period pg_cron closes and finalizes by itself (bounded wait).  Also:
#   - the README's SQL quickstart, verbatim, as the README's application role
#     over TCP with its password;
#   - health() shows the jobs succeeding and the skipped e-mail (no SMTP);
#   - each job's one LOG line is in the cluster's log;
#   - the same cluster without background workers (Debian's stock pg_cron
#     settings): schedule_jobs() refuses with 55000, libpq's reason and the
#     setting to change, instead of jobs failing every minute.
# It installs into the system's PostgreSQL (make install, as the README does):
# one such run at a time on a machine (a lock), and the files are removed again
# unless they were there before.  The cluster is dropped at the end.
set -euo pipefail
: "${ROOT:?}"
source "$ROOT/test/readme.sh"
fail() { echo "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "runs as root (test/run.sh runs it so when make test is root)"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin   # the system's PostgreSQL, through Debian's wrappers

mkdir -p /run/lock
exec 9>/run/lock/fluxrate-stock-install.lock
flock -w 1200 9 || fail "another stock_install.sh holds the lock for more than 20 minutes"

NAME=fluxrate_stock_$$
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
had_install=0; [ -e /usr/share/postgresql/15/extension/fluxrate.control ] && had_install=1
cleanup() {
  pg_dropcluster --stop 15 "$NAME" >/dev/null 2>&1 || true
  # pg_dropcluster leaves a configuration directory holding a file it did not make (conf.d/fluxrate.conf)
  rm -rf "/etc/postgresql/15/$NAME" "/tmp/$NAME-install.sh" "/tmp/$NAME-install.log" "/tmp/$NAME-quickstart.sql"
  if [ "$had_install" = 0 ]; then (cd "$ROOT" && make -s uninstall >/dev/null 2>&1) || true; fi
}
trap cleanup EXIT
echo "== pg_createcluster 15 $NAME on port $PORT (Debian's pg_hba.conf)"
pg_createcluster 15 "$NAME" -p "$PORT" --start >/dev/null
grep -E '^(local|host)' "/etc/postgresql/15/$NAME/pg_hba.conf" | sed 's/^/   /'
grep -Eq '^host +all +all +127\.0\.0\.1/32 +scram-sha-256' "/etc/postgresql/15/$NAME/pg_hba.conf" || fail "not Debian's pg_hba.conf"

echo "== the README's install steps, verbatim (CLUSTER=$NAME)"
readme_block 'stock_install.sh runs the next block verbatim' > "/tmp/$NAME-install.sh"
cat "/tmp/$NAME-install.sh" | sed 's/^/   | /'
# (apt-get does not wait for a dpkg lock another apt holds: then the block is run again, as a user would)
for try in 1 2 3 4 5 6; do
  if (cd "$ROOT" && CLUSTER=$NAME bash -euo pipefail "/tmp/$NAME-install.sh") > "/tmp/$NAME-install.log" 2>&1; then break; fi
  if [ "$try" -lt 6 ] && grep -q 'Could not get lock' "/tmp/$NAME-install.log"; then sleep 20; continue; fi
  tail -40 "/tmp/$NAME-install.log"; fail "the install steps failed"
done
tail -15 "/tmp/$NAME-install.log" | sed 's/^/   /'
rm -f "/tmp/$NAME-install.sh" "/tmp/$NAME-install.log"
LOG=/var/log/postgresql/postgresql-15-$NAME.log
su_psql() { sudo -u postgres psql --cluster "15/$NAME" -d billing -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }
[ "$(su_psql -c "SELECT count(*) FROM cron.job WHERE jobname LIKE 'fluxrate-%'")" = 6 ] || fail "the jobs are not scheduled"

# the application's login: TCP to 127.0.0.1 with the password (scram-sha-256)
APP="host=127.0.0.1 port=$PORT dbname=billing user=billing_app password='change me'"
app() { psql "$APP" -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }
[ "$(app -c 'SELECT current_user')" = billing_app ] || fail "billing_app cannot log in over TCP"

echo "== a daily plan, a 30-second grace period, a period ending in 20 s: pg_cron closes and finalizes it"
org=$(app -c "SELECT (fluxrate.create_organization('Stock install', grace_period => '30 seconds'))->>'id'")
app >/dev/null <<SQL
SELECT fluxrate.act_as('$org', session => true);
SELECT fluxrate.add_charge(((fluxrate.create_plan('Daily', 'daily', 'FIXED', 'day', 'USD'))->>'id')::uuid, 'FIXED',
       unit_price => 7.5, billing_timing => 'in_arrears', display_name => 'Daily fee');
SELECT fluxrate.create_subscription(((fluxrate.create_customer('Stock customer', 'stock@example.com'))->>'id')::uuid,
       (SELECT (fluxrate.list_plans())->'data'->0->>'id')::uuid, billing_interval => 'day',
       start_date => now() - interval '1 day' + interval '20 seconds');
SQL
start=$(date +%s); done_=0
for _ in $(seq 1 240); do
  if [ "$(su_psql -c "SELECT count(*) FROM fluxrate_internal.invoices WHERE org_id = '$org' AND status = 'OPEN'")" = 1 ]; then
    done_=1; break
  fi
  sleep 1
done
[ "$done_" = 1 ] || fail "no invoice finalized by pg_cron within 240 s"
echo "   finalized by pg_cron after $(( $(date +%s) - start )) s"
inv=$(su_psql -F ' ' -c "SELECT invoice_number, status, total, currency,
         finalized_at - period_end >= interval '30 seconds' AS waited_grace FROM fluxrate_internal.invoices WHERE org_id = '$org'")
echo "   $inv"
# one day of the daily fee, in arrears: 7.50 USD; the organization's first number
[[ $inv == "INV-$(date -u +%Y)-0001 OPEN 7.50 USD t" ]] || fail "invoice: $inv"
# nobody called a job: every run is pg_cron's (its own history), as the role that scheduled them
[ "$(su_psql -c "SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                 WHERE j.jobname IN ('fluxrate-close-periods', 'fluxrate-finalize-invoices') AND d.status = 'succeeded'
                   AND d.username = 'postgres'")" -ge 2 ] || fail "no succeeded pg_cron runs"

echo "== the README's SQL quickstart, verbatim, as billing_app over TCP"
readme_block 'run the next block verbatim' > "/tmp/$NAME-quickstart.sql"
out=$(app -f "/tmp/$NAME-quickstart.sql" 2>&1) || { echo "$out"; fail "the quickstart failed"; }
rm -f "/tmp/$NAME-quickstart.sql"
# 12.00 opening fee; 1,200 calls x 0.002 = 2.40 + the next week's 12.00 = 14.40
echo "$out" | grep -Eq "^opening\|INV-$(date -u +%Y)-0001\|OPEN\|12\.00$" || fail "quickstart: no opening invoice of 12.00"
echo "$out" | grep -Eq "^subscription\|INV-$(date -u +%Y)-0002\|OPEN\|14\.40$" || fail "quickstart: no closing invoice of 14.40"

echo "== health(): the jobs succeed, the e-mails without SMTP are skipped, nothing is late"
su_psql -F ' | ' -c "SELECT area, item, status, count, detail FROM fluxrate.health" | sed 's/^/   /'
[ "$(su_psql -c "SELECT count(*) FROM fluxrate.health WHERE area = 'job' AND status = 'ok'")" = 6 ] || fail "jobs not ok"
[ "$(su_psql -c "SELECT status FROM fluxrate.health WHERE item = 'skipped'")" = warning ] || fail "skipped e-mails not reported"
[ "$(su_psql -c "SELECT count(*) FROM fluxrate.health WHERE area IN ('closing', 'finalizing') AND status <> 'ok'")" = 0 ] \
  || fail "something is late"
for l in 'close_due_periods: closed 1 period in [0-9]+\.[0-9] s' 'finalize_due_invoices: finalized 1 invoice in [0-9]+\.[0-9] s'; do
  line=$(grep -E "LOG:  fluxrate: $l" "$LOG" | head -1)
  [ -n "$line" ] || fail "no log line '$l' in $LOG"
  echo "   log: ${line#*LOG:  }"
done

echo "== the same cluster with pg_cron's stock setting (no background workers): refused, with the reason"
sed -i 's/^cron.use_background_workers = on$/cron.use_background_workers = off/' "/etc/postgresql/15/$NAME/conf.d/fluxrate.conf"
pg_ctlcluster 15 "$NAME" restart
err=$(sudo -u postgres psql --cluster "15/$NAME" -d billing -X -q -v VERBOSITY=default -c 'SELECT fluxrate.schedule_jobs()' 2>&1) \
  && fail "schedule_jobs accepted jobs that cannot log in"
echo "$err" | sed 's/^/   /'
state=$(sudo -u postgres psql --cluster "15/$NAME" -d billing -X -q -v VERBOSITY=sqlstate -c 'SELECT fluxrate.schedule_jobs()' 2>&1 || true)
[[ $state == *55000* ]] || fail "SQLSTATE: $state"
[[ $err == *'pg_cron cannot log in to database "billing" as role "postgres"'* ]] || fail "message"
[[ $err == *"host=localhost port=$PORT dbname=billing user=postgres, no password"* ]] || fail "detail"
[[ $err == *'no password supplied'* ]] || fail "libpq's reason"
[[ $err == *'HINT:  Set cron.use_background_workers = on in postgresql.conf and restart the server'* ]] || fail "hint"
echo "== cleaning up: the cluster, its configuration, the system install"
trap - EXIT
cleanup
pg_lsclusters -h | awk '{print $2}' | grep -qx "$NAME" && fail "cluster $NAME is still there"
[ ! -e "/etc/postgresql/15/$NAME" ] || fail "/etc/postgresql/15/$NAME is still there"
if [ "$had_install" = 0 ] && [ -e /usr/share/postgresql/15/extension/fluxrate.control ]; then fail "make uninstall left fluxrate installed"; fi
echo "stock_install: ok"
