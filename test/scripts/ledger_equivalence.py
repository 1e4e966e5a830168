#!/usr/bin/env python3
"""The scenario and the reference of test/scripts/ledger_equivalence.sh.

python3 ledger_equivalence.py SEED OUTDIR writes
  OUTDIR/scenario.sql   the engine's side: an organization, customers on plans in
                        USD/EUR/JPY with and without tax, six months of usage,
                        credit grants (priorities, future effect, expiries, top-ups
                        sold by invoices, paid or voided), manual invoices, payments
                        and voids, each at its own pinned instant, the jobs between
  OUTDIR/reference.sql  what must come out, computed here, independently of the
                        engine (no call to it, no SQL): every invoice (total,
                        credits applied, due, paid, status), every grant (remaining,
                        expired, status), each customer's ledger by kind (rows, sums)
                        and the live balance (balance, unbilled) at the end.

The rules it re-implements (docs/ledger.md, SPEC.md): each invoice line rounded
once, half away from zero, to the currency's minor unit; tax on the unrounded
subtotal, rounded once; credits applied at finalization to the total after tax, from
the grants spendable at that instant ([effective_at, expires_at), ACTIVE) in
priority, expiry (never last), creation order; an invoice paid in full by credits is
PAID; a grant past expires_at is expired by the job with its remainder recorded; a
void gives the credits back (to an already expired grant: given back and expired
again); a top-up's grant is effective from its invoice's payment; the ledger rows.
"""
import random
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D, ROUND_HALF_UP

EXP = {"USD": 2, "EUR": 2, "JPY": 0}
RATE = {"US": D("0.07"), "DE": D("0.19"), "FR": D("0")}   # FR: no tax rate configured
PLANS = {  # currency: (fixed fee in arrears, unit price per call)
    "USD": (D("29.99"), D("0.0125")),
    "EUR": (D("19"), D("0.333")),
    "JPY": (D("1500"), D("0.37")),
}
INF = datetime(9999, 1, 1, tzinfo=timezone.utc)


def rnd(x, cur):
    return x.quantize(D(1).scaleb(-EXP[cur]), rounding=ROUND_HALF_UP) if x >= 0 else \
        -((-x).quantize(D(1).scaleb(-EXP[cur]), rounding=ROUND_HALF_UP))


def ts(t):
    return t.strftime("%Y-%m-%d %H:%M:%S.%f+00")


class World:
    def __init__(self, seed, n_customers):
        self.r = random.Random(seed)
        self.sql = []
        self.customers = []
        self.invoices = []      # dicts, in finalization order
        self.grants = []
        self.ledger = []        # (customer, kind, amount, credit, at)
        self.usage = {}         # (customer, month index) -> quantity
        for n in range(1, n_customers + 1):
            cur = self.r.choice(["USD", "USD", "EUR", "JPY"])
            country = self.r.choice(["US", "DE", "FR"])
            self.customers.append({"ext": "c%d" % n, "cur": cur, "country": country})

    def emit(self, t, stmt):
        self.sql.append("SET fluxrate.pinned_now = '%s';\n%s" % (ts(t), stmt))

    # -- the engine's statements and the reference's effects ---------------------
    def setup(self):
        t = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.emit(t, "SELECT (fluxrate.create_organization('Ledger equivalence'))->>'id' AS org \\gset\n"
                  "SELECT fluxrate.act_as(:'org', true) IS NOT NULL;\n"
                  "SELECT fluxrate.set_tax_rate('US', 0.07) IS NOT NULL, fluxrate.set_tax_rate('DE', 0.19) IS NOT NULL;\n"
                  "SELECT (fluxrate.create_feature('calls', 'calls', 'meter', meter_name => 'calls', property_name => 'n',"
                  " aggregation_type => 'SUM'))->>'meter_token' AS tok \\gset")
        for cur, (fee, price) in PLANS.items():
            self.emit(t, "SELECT (fluxrate.create_plan('P %s', 'p_%s', 'HYBRID', 'month', '%s'))->>'id' AS plan_%s \\gset\n"
                      "SELECT fluxrate.add_charge(:'plan_%s', 'FIXED', unit_price => %s, billing_timing => 'in_arrears') IS NOT NULL,"
                      " fluxrate.add_charge(:'plan_%s', 'USAGE', meter_id => (SELECT id FROM fluxrate_internal.meters"
                      " WHERE org_id = :'org'), unit_price => %s) IS NOT NULL;"
                      % (cur, cur, cur, cur.lower(), cur.lower(), fee, cur.lower(), price))
        for c in self.customers:
            self.emit(t, "SELECT fluxrate.create_subscription(((fluxrate.create_customer('%s', '%s@eq.test', '%s',"
                      " billing_address_country => '%s'))->>'id')::uuid, :'plan_%s', start_date => '2026-01-01 00:00+00') IS NOT NULL;"
                      % (c["ext"], c["ext"], c["ext"], c["country"], c["cur"].lower()))

    def cust_sql(self, c):
        return "(SELECT id FROM fluxrate_internal.customers WHERE org_id = :'org' AND external_id = '%s')" % c["ext"]

    def spendable(self, c, t):
        gs = [g for g in self.grants if g["cust"] is c and g["status"] == "ACTIVE" and g["eff"] <= t
              and g["exp"] > t and g["remaining"] > 0]
        return sorted(gs, key=lambda g: (g["priority"], g["exp"], g["created"]))

    def finalize(self, c, t, total, kind):
        inv = {"cust": c, "at": t, "total": total, "credits": D(0), "paid": D(0), "status": "OPEN", "kind": kind,
               "uses": []}
        self.ledger.append((c, "invoice", total, D(0), t))
        if kind != "top_up":
            left = total
            for g in self.spendable(c, t):
                if left <= 0:
                    break
                take = min(g["remaining"], left)
                g["remaining"] -= take
                inv["uses"].append((g, take))
                self.ledger.append((c, "credit_use", -take, -take, t))
                left -= take
                inv["credits"] += take
            if inv["credits"] > 0 and total - inv["credits"] == 0:
                inv["status"] = "PAID"
        self.invoices.append(inv)
        return inv

    def close_month(self, m):
        """Month m (1 = January) closes at the first of month m+1; drafts finalize 1 h later."""
        t_close = datetime(2026, m + 1, 1, 0, 0, 30, tzinfo=timezone.utc)
        t_fin = datetime(2026, m + 1, 1, 1, 1, tzinfo=timezone.utc)
        self.emit(t_close, "CALL fluxrate.close_due_periods();")
        self.expire(t_fin)   # the job records expiries first (no effect on amounts)
        self.emit(t_fin, "CALL fluxrate.finalize_due_invoices();")
        for c in self.customers:
            fee, price = PLANS[c["cur"]]
            q = self.usage.get((c["ext"], m), D(0))
            unrounded = fee + q * price
            sub = rnd(fee, c["cur"]) + rnd(q * price, c["cur"])
            total = sub + rnd(unrounded * RATE[c["country"]], c["cur"])
            self.finalize(c, t_fin, total, "subscription")

    def expire(self, t):
        for g in self.grants:
            if g["status"] == "ACTIVE" and g["exp"] <= t:
                g["status"] = "EXPIRED"
                if g["remaining"] > 0:
                    self.ledger.append((g["cust"], "credit_expiry", D(0), -g["remaining"], g["exp"]))
                    g["expired"] += g["remaining"]
                    g["remaining"] = D(0)

    def new_grant(self, c, t, topup):
        cur = c["cur"]
        scale = D(1000) if cur == "JPY" else D(10)
        amount = rnd(D(self.r.randint(1, 400)) * scale / D(self.r.choice([1, 3, 7])), cur)
        eff = t if self.r.random() < 0.6 else t + timedelta(days=self.r.randint(1, 20), hours=3)
        exp = INF if (topup or self.r.random() < 0.4) else eff + timedelta(days=self.r.randint(5, 70), minutes=7)
        if topup and self.r.random() < 0.5:
            exp = eff + timedelta(days=400)   # (paid within the scenario: never after its expiry)
        priority = self.r.choice([1, 2, 2, 3])
        name = "g%d" % (len(self.grants) + 1)
        g = {"cust": c, "name": name, "amount": amount, "remaining": amount, "priority": priority, "eff": eff,
             "exp": exp, "created": t, "status": "PENDING" if topup else "ACTIVE", "expired": D(0), "invoice": None}
        self.grants.append(g)
        args = "%s, %s, '%s', '%s', %s, priority => %d, grant_type => '%s', name => '%s'" % (
            self.cust_sql(c), amount, cur, ts(eff), "NULL" if exp == INF else "'%s'" % ts(exp), priority,
            "paid" if topup or self.r.random() < 0.5 else "promotional", name)
        if topup:
            price = rnd(amount * D("0.9"), cur)
            if price <= 0:
                price = amount
            self.emit(t, "SELECT fluxrate.create_credit_grant(%s, invoice => true, price => %s) IS NOT NULL;" % (args, price))
            g["invoice"] = self.finalize(c, t, price, "top_up")
            g["invoice"]["grant"] = g
        else:
            self.emit(t, "SELECT fluxrate.create_credit_grant(%s) IS NOT NULL;" % args)
            self.ledger.append((c, "credit_grant", D(0), amount, eff))

    def open_invoices(self, c):
        return [i for i in self.invoices if i["cust"] is c and i["status"] == "OPEN"]

    def pay_or_void(self, c, t, void):
        opens = self.open_invoices(c)
        if not opens:
            return
        k = self.r.randrange(len(opens))
        inv = opens[k]
        # (the invoice picked in a scalar subquery: a function in the select list of
        # an ORDER BY ... LIMIT query may run for more rows than the one returned)
        self.emit(t, "SELECT fluxrate.%s_invoice((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org'"
                  " AND customer_id = %s AND status = 'OPEN' ORDER BY finalized_at OFFSET %d LIMIT 1)) IS NOT NULL;"
                  % ("void" if void else "pay", self.cust_sql(c), k))
        if not void:
            inv["status"] = "PAID"
            inv["paid"] = inv["total"] - inv["credits"]
            if inv["paid"] != 0:
                self.ledger.append((c, "payment", -inv["paid"], D(0), t))
            g = inv.get("grant")
            if g is not None:
                g["status"] = "ACTIVE"
                g["eff"] = max(g["eff"], t)
                assert g["exp"] > t
                self.ledger.append((c, "credit_grant", D(0), g["amount"], g["eff"]))
            return
        inv["status"] = "VOID"
        self.ledger.append((c, "void", -inv["total"], D(0), t))
        g = inv.get("grant")
        if g is not None:
            g["status"] = "VOIDED"
            g["remaining"] = D(0)
        per_grant = {}
        for gg, take in inv["uses"]:
            per_grant[id(gg)] = (gg, per_grant.get(id(gg), (gg, D(0)))[1] + take)
        for gg, back in per_grant.values():
            self.ledger.append((c, "credit_reversal", back, back, t))
            if gg["status"] == "EXPIRED":
                self.ledger.append((c, "credit_expiry", D(0), -back, t))
                gg["expired"] += back
            else:
                gg["remaining"] += back

    def manual(self, c, t):
        cur = c["cur"]
        a = rnd(D(self.r.randint(100, 20000)) / D(100) * (D(100) if cur == "JPY" else D(1)), cur)
        self.emit(t, "SELECT fluxrate.finalize_invoice(((fluxrate.create_invoice(%s, '%s', line_items =>"
                  " '[{\"description\": \"Extra\", \"quantity\": 1, \"unit_amount\": %s}]'))->>'id')::uuid) IS NOT NULL;"
                  % (self.cust_sql(c), cur, a))
        self.finalize(c, t, a + rnd(a * RATE[c["country"]], cur), "manual")

    def step(self, m, day):
        base = datetime(2026, m, day, 12, 0, tzinfo=timezone.utc)
        s = 0
        for c in self.customers:
            for _ in range(self.r.choice([0, 1, 1, 2, 3])):
                s += 1
                t = base + timedelta(seconds=s)
                q = D(self.r.randint(1, 400000)) / D(1000)
                self.usage[(c["ext"], m)] = self.usage.get((c["ext"], m), D(0)) + q
                self.emit(t, "SELECT fluxrate.track(meter_token => :'tok', customer_external_id => '%s', quantity => %s,"
                          " \"timestamp\" => '%s') IS NOT NULL;" % (c["ext"], q, ts(t)))
            x = self.r.random()
            s += 1
            t = base + timedelta(seconds=s)
            if x < 0.10:
                self.new_grant(c, t, topup=False)
            elif x < 0.14:
                self.new_grant(c, t, topup=True)
            elif x < 0.22:
                self.pay_or_void(c, t, void=False)
            elif x < 0.25:
                self.pay_or_void(c, t, void=True)
            elif x < 0.28:
                self.manual(c, t)
        t = base + timedelta(seconds=s + 1)
        self.expire(t)
        self.emit(t, "CALL fluxrate.finalize_due_invoices();")
        return t

    def run(self):
        self.setup()
        t_end = None
        for c in self.customers:   # grants from the start, for everyone, so credits always play
            self.new_grant(c, datetime(2026, 1, 1, 0, 0, 1 + self.customers.index(c), tzinfo=timezone.utc), topup=False)
        for m in range(1, 7):
            if m > 1:
                self.close_month(m - 1)
            for day in (3, 8, 13, 18, 23, 28):
                t_end = self.step(m, day)
        return t_end

    # -- the reference tables -----------------------------------------------------
    def reference(self, t_end):
        out = ["CREATE TABLE ref_invoices (ext text, kind text, finalized_at timestamptz, total numeric,"
               " credits_applied numeric, amount_due numeric, amount_paid numeric, status text);",
               "CREATE TABLE ref_grants (name text, ext text, remaining numeric, expired_amount numeric, status text);",
               "CREATE TABLE ref_ledger (ext text, entry text, currency text, n bigint, amount numeric, credit numeric);",
               "CREATE TABLE ref_balance (ext text, currency text, balance numeric, unbilled numeric);"]
        for i in self.invoices:
            due = D(0) if i["status"] in ("PAID", "VOID") else i["total"] - i["credits"]
            out.append("INSERT INTO ref_invoices VALUES ('%s', '%s', '%s', %s, %s, %s, %s, '%s');" % (
                i["cust"]["ext"], i["kind"], ts(i["at"]), i["total"], i["credits"], due, i["paid"], i["status"]))
        for g in self.grants:
            out.append("INSERT INTO ref_grants VALUES ('%s', '%s', %s, %s, '%s');" % (
                g["name"], g["cust"]["ext"], g["remaining"], g["expired"], g["status"]))
        agg = {}
        for c, kind, amount, credit, at in self.ledger:
            if at > t_end:
                continue
            k = (c["ext"], kind, c["cur"])
            n, a, cr = agg.get(k, (0, D(0), D(0)))
            agg[k] = (n + 1, a + amount, cr + credit)
        for (ext, kind, cur), (n, a, cr) in sorted(agg.items()):
            out.append("INSERT INTO ref_ledger VALUES ('%s', '%s', '%s', %d, %s, %s);" % (ext, kind, cur, n, a, cr))
        # the live balance at the end: the spendable grants, and June's period so far
        # (its usage, the fee in arrears, their tax): June closes on July 1, after the end
        for c in self.customers:
            bal = sum((g["remaining"] for g in self.grants if g["cust"] is c and g["status"] == "ACTIVE"
                       and g["eff"] <= t_end and g["exp"] > t_end), D(0))
            fee, price = PLANS[c["cur"]]
            q = self.usage.get((c["ext"], 6), D(0))
            sub = rnd(fee, c["cur"]) + rnd(q * price, c["cur"])
            unbilled = sub + rnd((fee + q * price) * RATE[c["country"]], c["cur"])
            out.append("INSERT INTO ref_balance VALUES ('%s', '%s', %s, %s);" % (c["ext"], c["cur"], bal, unbilled))
        return "\n".join(out) + "\n"


def main():
    seed, outdir = int(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    w = World(seed, n)
    t_end = w.run()
    with open(outdir + "/scenario.sql", "w") as f:
        f.write("SET TimeZone = 'UTC';\n" + "\n".join(w.sql) + "\n")
    with open(outdir + "/end.txt", "w") as f:
        f.write(ts(t_end))
    with open(outdir + "/reference.sql", "w") as f:
        f.write(w.reference(t_end))
    kinds = {}
    for _, k, *_ in w.ledger:
        kinds[k] = kinds.get(k, 0) + 1
    print("customers %d, invoices %d (%s), grants %d, ledger movements %s, ends %s" % (
        n, len(w.invoices), ", ".join("%s %d" % (k, sum(1 for i in w.invoices if i["kind"] == k))
                                      for k in ("subscription", "manual", "top_up")),
        len(w.grants), ", ".join("%s %d" % kv for kv in sorted(kinds.items())), ts(t_end)))


if __name__ == "__main__":
    main()
