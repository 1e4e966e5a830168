#!/usr/bin/env bash
# Real clients, real pooling (docs/clients.md):
#   1. psycopg 3 (Debian python3-psycopg), connected as an application role that
#      is a member of fluxrate_app, records usage inside the application's own
#      transactions, next to its own rows: a committed transaction bills, a
#      rolled-back one (by the application, or by an error of its own) leaves
#      nothing, not even its idempotency key.  The same driver runs the jobs and
#      reads the closed invoice.
#   2. PgBouncer in transaction pooling mode (Debian pgbouncer, on a unix socket
#      of this script's own directory, no TCP): 8 threads, one organization
#      each, share 2 server connections; every transaction acts as its own
#      organization, tracks, reads its own usage and organization, and checks
#      that no other tenant is visible, before act_as too.  The scenario proves
#      the sharing happened (one server process served several organizations).
#   3. What session => true does through a transaction pooler: the next client
#      on that server connection acts for that organization.  The rule
#      (docs/clients.md): behind a transaction pooler, act_as in every
#      transaction, transaction-local (the default), never session => true.
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start clients "log_statement = 'none'"
PY=/usr/bin/python3
PGBOUNCER=/usr/sbin/pgbouncer
W=$(mktemp -d /tmp/fluxrate-clients-XXXXXX)
bouncer_pid=""
stop_all() { [ -n "$bouncer_pid" ] && kill "$bouncer_pid" 2>/dev/null; rm -rf "$W"; cluster_stop; }
trap stop_all EXIT
$PY -c 'import psycopg' || fail "psycopg 3 (python3-psycopg) is not installed"
[ -x "$PGBOUNCER" ] || fail "pgbouncer is not installed"

# the application's role: trusted to act for an organization, nothing else
q "CREATE ROLE app LOGIN; GRANT fluxrate_app TO app; GRANT CREATE ON SCHEMA public TO app"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-01-15 12:00:00+00'"
ORG=$(q "SELECT (fluxrate.create_organization('Shop Inc', grace_period => '0'))->>'id'")
A="SELECT fluxrate.act_as('$ORG');"
METER=$(q "$A SELECT (fluxrate.create_feature(name => 'Orders', lookup_key => 'orders', type => 'meter',
       meter_name => 'orders', property_name => 'n', aggregation_type => 'SUM', unit => 'order'))->>'meter_id'" | tail -1)
TOKEN=$(q "SELECT meter_token FROM fluxrate_internal.meters WHERE id = '$METER'")
PLAN=$(q "$A SELECT (fluxrate.create_plan(name => 'Metered', lookup_id => 'metered', type => 'USAGE',
       billing_interval => 'month', currency => 'USD'))->>'id'" | tail -1)
q "$A SELECT fluxrate.add_charge(plan_id => '$PLAN', type => 'USAGE', meter_id => '$METER', unit_price => 0.5,
       display_name => 'Orders')" >/dev/null
CUST=$(q "$A SELECT (fluxrate.create_customer(name => 'Wayne', email => 'ap@wayne.test', external_id => 'wayne'))->>'id'" | tail -1)
q "$A SELECT fluxrate.create_subscription(customer_id => '$CUST', plan_id => '$PLAN', billing_interval => 'month',
       start_date => '2026-01-01 00:00:00+00')" >/dev/null

echo "== 1. psycopg: usage inside the application's own transaction"
timeout 60 $PY - "$PGHOST" "$ORG" "$TOKEN" "$METER" <<'PYEOF'
import sys, psycopg
from decimal import Decimal
host, org, token, meter = sys.argv[1:]
conn = psycopg.connect(host=host, dbname="fluxrate", user="app")
conn.execute("CREATE TABLE orders (id integer PRIMARY KEY, amount numeric NOT NULL)")
conn.commit()

def order(oid, qty, key):
    """The application's own unit of work: its row and the usage, one transaction."""
    conn.execute("SELECT fluxrate.act_as(%s)", (org,))
    conn.execute("INSERT INTO orders VALUES (%s, %s)", (oid, qty))
    conn.execute("SELECT fluxrate.track(meter_token => %s, customer_external_id => 'wayne', quantity => %s, "
                 "idempotency_key => %s)", (token, qty, key))

def usage():
    with conn.transaction():
        conn.execute("SELECT fluxrate.act_as(%s)", (org,))
        # January (events stamped at the pinned now, 2026-01-15 12:00)
        return conn.execute("SELECT (fluxrate.get_meter_usage(%s, '2026-01-01', '2026-02-01'))->>'total_usage'",
                            (meter,)).fetchone()[0]

# committed: bills
with conn.transaction():
    order(1, 10, "order-1")
assert usage() == "10", usage()
# rolled back by the application: nothing
with conn.transaction():
    order(2, 1000, "order-2")
    raise psycopg.Rollback()
assert usage() == "10", usage()
# rolled back by an error of the application's own (a duplicate order id): nothing
try:
    with conn.transaction():
        conn.execute("SELECT fluxrate.act_as(%s)", (org,))
        conn.execute("SELECT fluxrate.track(meter_token => %s, customer_external_id => 'wayne', quantity => 5000, "
                     "idempotency_key => 'order-1-again')", (token,))
        conn.execute("INSERT INTO orders VALUES (1, 5000)")
    raise AssertionError("the duplicate order was accepted")
except psycopg.errors.UniqueViolation:
    pass
assert usage() == "10", usage()
# the rolled-back idempotency key was never burned: the retry of order 2 bills once
with conn.transaction():
    order(2, 1000, "order-2")
assert usage() == "1010", usage()
n = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
assert n == 2, n
conn.close()
print("commit bills, rollback does not: usage 10 + 1000 = 1010, 2 orders")
PYEOF

echo "== the month closes (the jobs called through psycopg) into one invoice of the committed usage"
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-02-01 00:00:30+00'"
timeout 60 $PY - "$PGHOST" "$ORG" <<'PYEOF'
import sys, psycopg
from decimal import Decimal
host, org = sys.argv[1:]
# CALL of a procedure that commits needs autocommit (no surrounding transaction)
with psycopg.connect(host=host, dbname="fluxrate", user="app", autocommit=True) as conn:
    conn.execute("CALL fluxrate.close_due_periods()")
    conn.execute("CALL fluxrate.finalize_due_invoices()")
with psycopg.connect(host=host, dbname="fluxrate", user="app") as conn:
    conn.execute("SELECT fluxrate.act_as(%s)", (org,))
    rows = conn.execute("SELECT invoice_number, customer_name, status, total FROM fluxrate.invoice_rows()").fetchall()
    assert len(rows) == 1, rows
    number, customer, status, total = rows[0]
    # by hand: 1,010 orders x 0.5 = 505.00 USD (the rolled-back 1,000 and 5,000 are not billed)
    assert (customer, status, total) == ("Wayne", "OPEN", Decimal("505.00")), rows
    lines = conn.execute("SELECT description, quantity, line_total FROM fluxrate.invoice_line_rows()").fetchall()
    assert lines == [("Orders", Decimal("1010"), Decimal("505.00"))], lines
    print("closed invoice", number, "for", customer, ":", status, total, "USD")
PYEOF

echo "== 2. PgBouncer, transaction pooling: 8 tenants, 2 server connections"
N=8
ORGS=(); TOKENS=(); METERS=()
for k in $(seq 1 $N); do
  o=$(q "SELECT (fluxrate.create_organization('Tenant $k'))->>'id'")
  m=$(q "SELECT fluxrate.act_as('$o'); SELECT (fluxrate.create_feature(name => 'Calls', lookup_key => 'calls', type => 'meter',
         meter_name => 'calls', property_name => 'n', aggregation_type => 'SUM', unit => 'call'))->>'meter_id'" | tail -1)
  q "SELECT fluxrate.act_as('$o'); SELECT fluxrate.create_customer(name => 'Customer of tenant $k', email => 'ap@tenant$k.test', external_id => 'cust-$k')" >/dev/null
  ORGS+=("$o"); METERS+=("$m"); TOKENS+=("$(q "SELECT meter_token FROM fluxrate_internal.meters WHERE id = '$m'")")
done
mkdir -p "$W/sock"
echo '"app" ""' > "$W/userlist.txt"
cat > "$W/pgbouncer.ini" <<EOF
[databases]
fluxrate = host=$PGHOST port=$PGPORT dbname=fluxrate user=app pool_size=2
; one server connection: the session => true demonstration needs the next client on it
fluxrate_one = host=$PGHOST port=$PGPORT dbname=fluxrate user=app pool_size=1
[pgbouncer]
listen_addr =
listen_port = 6432
unix_socket_dir = $W/sock
auth_type = trust
auth_file = $W/userlist.txt
pool_mode = transaction
max_client_conn = 100
logfile = $W/pgbouncer.log
pidfile = $W/pgbouncer.pid
EOF
$PGBOUNCER "$W/pgbouncer.ini" >/dev/null 2>&1 & bouncer_pid=$!
for _ in $(seq 1 50); do [ -S "$W/sock/.s.PGSQL.6432" ] && break; sleep 0.1; done
[ -S "$W/sock/.s.PGSQL.6432" ] || { cat "$W/pgbouncer.log"; fail "pgbouncer did not start"; }
q "ALTER DATABASE fluxrate SET fluxrate.pinned_now = '2026-03-15 12:00:00+00'"

timeout 120 $PY - "$W/sock" "${ORGS[*]}" "${TOKENS[*]}" "${METERS[*]}" <<'PYEOF'
import random, sys, threading, time, psycopg
sock, orgs, tokens, meters = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
ROUNDS = 40
served = []            # (server pid, org) of every transaction
errors = []
lock = threading.Lock()
barrier = threading.Barrier(len(orgs))

def tenant(k):
    org, token, meter = orgs[k], tokens[k], meters[k]
    qty = k + 1
    # prepare_threshold=None: no server-side prepared statements, which a
    # transaction pooler cannot keep on the client's behalf (PgBouncer < 1.21)
    conn = psycopg.connect(host=sock, port=6432, dbname="fluxrate", user="app", prepare_threshold=None)
    committed = 0
    barrier.wait()
    try:
        for i in range(ROUNDS):
            rollback = (i % 5 == 4)
            try:
                with conn.transaction():
                    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    # nothing of the previous transaction on this server connection, whoever ran it
                    left = conn.execute("SELECT current_setting('fluxrate.current_org', true), "
                                        "current_setting('fluxrate.acting_org', true)").fetchone()
                    assert all(v in (None, "") for v in left), ("context left over", k, left)
                    try:
                        with conn.transaction():       # a savepoint: the refusal must not end our transaction
                            conn.execute("SELECT fluxrate.get_organization()")
                        raise AssertionError("an organization before act_as")
                    except psycopg.Error as e:
                        assert e.sqlstate == "PT401", e
                    conn.execute("SELECT fluxrate.act_as(%s)", (org,))
                    conn.execute("SELECT fluxrate.track(meter_token => %s, customer_external_id => %s, quantity => %s, "
                                 "idempotency_key => %s)", (token, "cust-%d" % (k + 1), qty, "t%d-%d" % (k, i)))
                    time.sleep(random.random() * 0.003)     # let the others queue for the two server connections
                    me = conn.execute("SELECT (fluxrate.get_organization())->>'id'").fetchone()[0]
                    assert me == org, ("acting for another organization", k, me)
                    custs = conn.execute("SELECT c->>'external_id' FROM jsonb_array_elements("
                                         "(fluxrate.list_customers(1, 100))->'data') c").fetchall()
                    assert custs == [("cust-%d" % (k + 1),)], ("another tenant's customers", k, custs)
                    total = conn.execute("SELECT (fluxrate.get_meter_usage(%s, '2026-03-01', '2026-04-01'))->>'total_usage'",
                                         (meter,)).fetchone()[0]
                    # our own uncommitted event counts; no other tenant's does
                    assert total == str(qty * (committed + 1)), ("usage", k, total, qty * (committed + 1))
                    with lock:
                        served.append((pid, org))
                    if rollback:
                        raise psycopg.Rollback()
                committed += 0 if rollback else 1
            except psycopg.Rollback:
                pass
    except Exception as e:
        with lock:
            errors.append(repr(e))
    finally:
        conn.close()

threads = [threading.Thread(target=tenant, args=(k,)) for k in range(len(orgs))]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
pids = {p for p, _ in served}
shared = {p: len({o for q, o in served if q == p}) for p in pids}
assert len(served) == len(orgs) * ROUNDS, len(served)
assert len(pids) <= 2, ("more server connections than the pool", pids)
assert max(shared.values()) >= 2, ("no server connection was shared between tenants", shared)
print("%d transactions of %d tenants on %d server connections (organizations per connection: %s): no leak"
      % (len(served), len(orgs), len(pids), sorted(shared.values())))
PYEOF
# by hand: tenant k tracks quantity k in 40 transactions and rolls back every 5th
# (8 of them), so 32 commit: k x 32 (tenant 1: 32, tenant 8: 256), 32 events each
for k in $(seq 1 $N); do
  got=$(q "SELECT count(*) || ' ' || sum(quantity) FROM fluxrate_internal.usage_events WHERE org_id = '${ORGS[$((k-1))]}'")
  [ "$got" = "32 $((k * 32))" ] || fail "tenant $k: expected 32 events of $((k * 32)) in all, got $got"
done
echo "committed usage per tenant: k x 32 for k = 1..8"

echo "== 3. session => true through transaction pooling: the next client inherits the organization"
timeout 60 $PY - "$W/sock" "${ORGS[0]}" <<'PYEOF'
import sys, psycopg
sock, org = sys.argv[1:]
def client():
    return psycopg.connect(host=sock, port=6432, dbname="fluxrate_one", user="app", autocommit=True, prepare_threshold=None)
a, b = client(), client()
# the rule kept: transaction-local act_as ends with its transaction
a.execute("SELECT fluxrate.act_as(%s)", (org,))
def refused(conn):
    try:
        conn.execute("SELECT fluxrate.get_organization()")
    except psycopg.Error as e:
        return e.sqlstate == "PT401"
    return False
if refused(b):
    print("transaction-local act_as: the next client on the server connection has no organization (PT401)")
else:
    raise AssertionError("transaction-local act_as leaked")
# the rule broken: session => true stays on the server connection, which the pooler hands to b
a.execute("SELECT fluxrate.act_as(%s, session => true)", (org,))
assert a.execute("SELECT pg_backend_pid()").fetchone() == b.execute("SELECT pg_backend_pid()").fetchone()
leaked = b.execute("SELECT (fluxrate.get_organization())->>'id'").fetchone()[0]
assert leaked == org, leaked
print("session => true: client b, which never called act_as, acts for", leaked, "(why the rule exists)")
# and it stays until reset on that server connection
b.execute("RESET fluxrate.acting_org")
assert refused(a), "still acting after RESET"
a.close(); b.close()
PYEOF
q "ALTER DATABASE fluxrate RESET fluxrate.pinned_now"
echo "ok"
