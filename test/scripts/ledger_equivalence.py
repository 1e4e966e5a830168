#!/usr/bin/env python3
"""The scenario and the reference of test/scripts/ledger_equivalence.sh.

python3 ledger_equivalence.py SEED OUTDIR [N_CUSTOMERS] [adjust] writes
  OUTDIR/scenario.sql   the engine's side: an organization, customers on plans in
                        USD/EUR/JPY with and without tax, six months of usage,
                        credit grants (priorities, future effect, expiries, top-ups
                        sold by invoices, paid or voided), manual invoices, payments
                        and voids, each at its own pinned instant, the jobs between;
                        with `adjust` (discounts and credit notes are installed), a
                        15%-for-3-months coupon redeemed on some subscriptions and
                        credit notes (amounts or all that is left) on OPEN and PAID
                        invoices, refunded or to the wallet
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
again); a top-up's grant is effective from its invoice's payment; a percentage
discount takes its share of the unrounded lines of the periods it covers, its line
rounded once, before tax; a credit note credits before tax (the invoice's rate,
rounded once; the last one takes the tax that is left), first off what an OPEN
invoice has due, the rest refunded or granted to the wallet; the ledger rows.
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
    def __init__(self, seed, n_customers, adjust=False):
        self.r = random.Random(seed)
        self.adjust = adjust
        self.credit_notes = []  # dicts, in number order
        self.redeemed = {}      # customer ext -> first discounted month
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
        if self.adjust:
            self.emit(t, "SELECT fluxrate.create_coupon('SAVE15', 'Save 15', 'percentage', percent_off => 15,"
                      " duration => 'repeating', duration_periods => 3) IS NOT NULL;")
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

    def finalize(self, c, t, total, kind, subtotal=None, tax=D(0), rate=D(0), discount=D(0)):
        inv = {"cust": c, "at": t, "total": total, "credits": D(0), "paid": D(0), "status": "OPEN", "kind": kind,
               "uses": [], "subtotal": total if subtotal is None else subtotal, "tax": tax, "rate": rate,
               "credited_sub": D(0), "credited_tax": D(0), "credited_due": D(0)}
        self.ledger.append((c, "invoice", total - discount, D(0), t))
        if discount != 0:
            self.ledger.append((c, "discount", discount, D(0), t))
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
            sub, tax, disc = self.rate_month(c, m)
            self.finalize(c, t_fin, sub + tax, "subscription", sub, tax, RATE[c["country"]], disc)

    def rate_month(self, c, m):
        """A subscription invoice of month m: (subtotal, tax, discount line)."""
        fee, price = PLANS[c["cur"]]
        q = self.usage.get((c["ext"], m), D(0))
        unrounded = fee + q * price
        sub = rnd(fee, c["cur"]) + rnd(q * price, c["cur"])
        disc_u = D(0)
        m0 = self.redeemed.get(c["ext"])
        if m0 is not None and m0 <= m < m0 + 3:
            disc_u = unrounded * D("0.15")     # (a zero usage line is not a positive line: nothing of it)
        disc = -rnd(disc_u, c["cur"])
        return sub + disc, rnd((unrounded - disc_u) * RATE[c["country"]], c["cur"]), disc

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
            inv["paid"] = inv["total"] - inv["credits"] - inv["credited_due"]
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
        self.ledger.append((c, "void", -(inv["total"] - inv["credited_due"]), D(0), t))
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

    def credit_note(self, c, t):
        mine = [i for i in self.invoices if i["cust"] is c and i["kind"] != "top_up"]
        cands = [i for i in mine if i["status"] in ("OPEN", "PAID") and i["subtotal"] - i["credited_sub"] > 0]
        if not cands:
            return
        inv = self.r.choice(cands)
        cur = c["cur"]
        left_sub, left_tax = inv["subtotal"] - inv["credited_sub"], inv["tax"] - inv["credited_tax"]
        unit = D(1).scaleb(-EXP[cur])
        whole = self.r.random() < 0.3
        amount = left_sub if whole else unit * self.r.randint(1, int(left_sub / unit))
        tax = left_tax if amount == left_sub else min(rnd(amount * inv["rate"], cur), left_tax)
        n = amount + tax
        due_now = inv["total"] - inv["credits"] - inv["credited_due"] - inv["paid"]
        to_due = min(n, due_now) if inv["status"] == "OPEN" else D(0)
        refunded = n - to_due
        dest = self.r.choice(["refund", "wallet"])
        number = "CN-2026-%04d" % (len(self.credit_notes) + 1)
        self.emit(t, "SELECT fluxrate.create_credit_note((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org'"
                  " AND customer_id = %s AND kind <> 'top_up' AND finalized_at IS NOT NULL ORDER BY finalized_at OFFSET %d LIMIT 1),"
                  " 'other', amount => %s, destination => '%s') IS NOT NULL;"
                  % (self.cust_sql(c), mine.index(inv), "NULL" if whole else amount, dest))
        self.credit_notes.append({"number": number, "cust": c, "total": n, "to_due": to_due, "refunded": refunded})
        inv["credited_sub"] += amount
        inv["credited_tax"] += tax
        inv["credited_due"] += to_due
        self.ledger.append((c, "credit_note", -n, D(0), t))
        if inv["status"] == "OPEN" and due_now - to_due == 0:
            inv["status"] = "PAID"
        if refunded > 0 and dest == "refund":
            self.ledger.append((c, "refund", refunded, D(0), t))
        elif refunded > 0:
            g = {"cust": c, "name": "Credit note " + number, "amount": refunded, "remaining": refunded, "priority": 100,
                 "eff": t, "exp": INF, "created": t, "status": "ACTIVE", "expired": D(0), "invoice": None}
            self.grants.append(g)
            self.ledger.append((c, "credit_grant", refunded, refunded, t))

    def manual(self, c, t):
        cur = c["cur"]
        a = rnd(D(self.r.randint(100, 20000)) / D(100) * (D(100) if cur == "JPY" else D(1)), cur)
        self.emit(t, "SELECT fluxrate.finalize_invoice(((fluxrate.create_invoice(%s, '%s', line_items =>"
                  " '[{\"description\": \"Extra\", \"quantity\": 1, \"unit_amount\": %s}]'))->>'id')::uuid) IS NOT NULL;"
                  % (self.cust_sql(c), cur, a))
        tax = rnd(a * RATE[c["country"]], cur)
        self.finalize(c, t, a + tax, "manual", a, tax, RATE[c["country"]])

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
            elif self.adjust and x < 0.31 and c["ext"] not in self.redeemed:
                self.redeemed[c["ext"]] = m
                self.emit(t, "SELECT fluxrate.redeem_coupon(code => 'SAVE15', subscription_id => (SELECT id FROM"
                          " fluxrate_internal.subscriptions WHERE org_id = :'org' AND customer_id = %s)) IS NOT NULL;"
                          % self.cust_sql(c))
            elif self.adjust and x < 0.36:
                self.credit_note(c, t)
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
               "CREATE TABLE ref_balance (ext text, currency text, balance numeric, unbilled numeric);",
               "CREATE TABLE ref_credit_notes (number text, ext text, total numeric, applied_to_due numeric, refunded numeric);"]
        for cn in self.credit_notes:
            out.append("INSERT INTO ref_credit_notes VALUES ('%s', '%s', %s, %s, %s);" % (
                cn["number"], cn["cust"]["ext"], cn["total"], cn["to_due"], cn["refunded"]))
        for i in self.invoices:
            due = D(0) if i["status"] in ("PAID", "VOID") else i["total"] - i["credits"] - i["credited_due"]
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
            sub, tax, _ = self.rate_month(c, 6)
            unbilled = sub + tax
            out.append("INSERT INTO ref_balance VALUES ('%s', '%s', %s, %s);" % (c["ext"], c["cur"], bal, unbilled))
        return "\n".join(out) + "\n"


def main():
    seed, outdir = int(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    w = World(seed, n, adjust=len(sys.argv) > 4 and sys.argv[4] == "adjust")
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
    print("customers %d, invoices %d (%s), grants %d, coupons redeemed %d, credit notes %d, ledger movements %s, ends %s" % (
        n, len(w.invoices), ", ".join("%s %d" % (k, sum(1 for i in w.invoices if i["kind"] == k))
                                      for k in ("subscription", "manual", "top_up")),
        len(w.grants), len(w.redeemed), len(w.credit_notes), ", ".join("%s %d" % kv for kv in sorted(kinds.items())), ts(t_end)))


if __name__ == "__main__":
    main()
