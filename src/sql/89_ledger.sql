-- 89_ledger.sql: the customer ledger (issue 16, item 4; docs/ledger.md).
--   ledger_entries()          every movement of money of one customer, with its cause
--   list_customer_ledger()    the API: the entries in order with running balances
--
-- The ledger is derived from the records that hold the money (invoices and
-- their states, credit_transactions), never kept beside them, so it cannot
-- disagree with them.  Each entry moves one or both of two balances, per currency:
--   amount   what the customer owes (the receivable): + an invoice finalized,
--            - a payment, - credits used, - a void of a finalized invoice,
--            + credits given back by that void;
--   credit   the customer's prepaid credits: + a grant becoming effective,
--            - a use, + a reversal, - an expiry.
-- Invariants (sql/ledger.sql and test/scripts/ledger_equivalence.sh assert them
-- for every customer):
--   sum(amount) = the amount_due of the customer's OPEN and UNCOLLECTIBLE invoices
--   sum(credit) = the remaining of its grants spendable now (get_credit_balance's balance)
-- Entries are as of fluxrate.now(): a grant effective later is not in it yet,
-- and a grant past its expires_at shows its expiry at that instant even before
-- the minute job has recorded it (expiry is exact, the job only writes it down).
-- Discounts, credit notes and refunds (issue 16, items 1 and 3) add their rows
-- here: one more UNION ALL branch each, moving amount (and credit for a credit
-- note refunded to the wallet).

-- Entries of the same instant and kind (two grants paying one invoice) in the
-- order the grants are spent: priority, expiry (never last), creation.
CREATE FUNCTION fluxrate_internal.grant_order(g fluxrate_internal.credit_grants) RETURNS text
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.lpad(g.priority::text, 4, '0')
         || COALESCE(pg_catalog.to_char(g.expires_at AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS'), '99999999999999999999')
         || pg_catalog.to_char(g.created_at AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || g.id::text
$$;

CREATE FUNCTION fluxrate_internal.ledger_entries(org_id uuid, customer_id uuid)
  RETURNS TABLE (at timestamptz, entry text, currency text, amount numeric, credit numeric,
                 invoice_id uuid, grant_id uuid, cause text, cause_id uuid, description text, ord integer, tiebreak text)
  LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
  -- an invoice finalized: the customer owes its total, shown before its discounts
  -- (the discount row below takes them off: together, the total)
  SELECT i.finalized_at, 'invoice', i.currency, i.total - coalesce(d.discounted, 0), 0::numeric, i.id, NULL::uuid, 'invoice', i.id,
         i.invoice_number || CASE WHEN i.kind = 'top_up' THEN ' (credit top-up)' ELSE '' END, 1, i.invoice_number
    FROM fluxrate_internal.invoices i
    LEFT JOIN LATERAL (SELECT sum(l.line_total) AS discounted FROM fluxrate_internal.invoice_lines l
                        WHERE l.org_id = i.org_id AND l.invoice_id = i.id AND l.line_type = 'discount') d ON true
   WHERE i.org_id = ledger_entries.org_id AND i.customer_id = ledger_entries.customer_id AND i.finalized_at IS NOT NULL
  UNION ALL
  -- its discounts (56_discounts.sql), before tax: the discount lines of the invoice
  SELECT i.finalized_at, 'discount', i.currency, sum(l.line_total), 0, i.id, NULL, 'invoice', i.id,
         string_agg(l.description, ', ' ORDER BY l.position) || ' on ' || i.invoice_number, 1, i.invoice_number || '/d'
    FROM fluxrate_internal.invoices i
    JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id AND l.line_type = 'discount'
   WHERE i.org_id = ledger_entries.org_id AND i.customer_id = ledger_entries.customer_id AND i.finalized_at IS NOT NULL
   GROUP BY i.org_id, i.id
  UNION ALL
  -- a credit note (57_credit_notes.sql): what it credits is no longer owed (what had been
  -- paid of it goes back below, as a refund or to the wallet)
  SELECT cn.issued_at, 'credit_note', cn.currency, -cn.total, 0, cn.invoice_id, NULL, 'credit_note', cn.id,
         cn.credit_note_number || ' on ' || i.invoice_number || ' (' || cn.reason || ')', 8, cn.credit_note_number
    FROM fluxrate_internal.credit_notes cn
    JOIN fluxrate_internal.invoices i ON i.org_id = cn.org_id AND i.id = cn.invoice_id
   WHERE cn.org_id = ledger_entries.org_id AND cn.customer_id = ledger_entries.customer_id
  UNION ALL
  -- a refund record: the money owed back to the customer
  SELECT r.created_at, 'refund', r.currency, r.amount, 0, r.invoice_id, NULL, 'credit_note', r.credit_note_id,
         'refund of ' || cn.credit_note_number || ' (' || lower(r.status) || ')', 9, cn.credit_note_number
    FROM fluxrate_internal.refunds r
    JOIN fluxrate_internal.credit_notes cn ON cn.org_id = r.org_id AND cn.id = r.credit_note_id
   WHERE r.org_id = ledger_entries.org_id AND r.customer_id = ledger_entries.customer_id
  UNION ALL
  -- paid in money (what credits did not pay)
  SELECT i.paid_at, 'payment', i.currency, -i.amount_paid, 0, i.id, NULL, 'invoice', i.id, 'payment of ' || i.invoice_number, 4, i.invoice_number
    FROM fluxrate_internal.invoices i
   WHERE i.org_id = ledger_entries.org_id AND i.customer_id = ledger_entries.customer_id AND i.status = 'PAID'
     AND i.amount_paid <> 0
  UNION ALL
  -- a finalized invoice voided: its total is no longer owed (the credits it used come back below)
  -- (less what its credit notes had already taken off what was due)
  SELECT i.voided_at, 'void', i.currency,
         -(i.total - coalesce((SELECT sum(cn.applied_to_due) FROM fluxrate_internal.credit_notes cn
                                WHERE cn.org_id = i.org_id AND cn.invoice_id = i.id), 0)),
         0, i.id, NULL, 'invoice', i.id, 'void of ' || i.invoice_number, 5, i.invoice_number
    FROM fluxrate_internal.invoices i
   WHERE i.org_id = ledger_entries.org_id AND i.customer_id = ledger_entries.customer_id AND i.status = 'VOID'
     AND i.finalized_at IS NOT NULL
  UNION ALL
  -- the credit movements: a use pays part of an invoice, a reversal undoes it
  -- (a grant made by a credit note refunded to the wallet settles what the credit note
  -- gave back: it moves the receivable too)
  SELECT t.at, 'credit_' || t.kind, t.currency,
         CASE WHEN t.kind IN ('use', 'reversal') OR (t.kind = 'grant' AND g.source = 'credit_note') THEN t.amount ELSE 0 END,
         t.amount, t.invoice_id, t.grant_id, 'credit_grant', t.grant_id,
         coalesce(g.name, g.grant_type || ' credits') || CASE t.kind WHEN 'use' THEN ' applied to ' || i.invoice_number
           WHEN 'reversal' THEN ' given back by the void of ' || i.invoice_number ELSE '' END,
         -- (a credit note's grant after the credit note it settles)
         CASE t.kind WHEN 'grant' THEN CASE WHEN g.source = 'credit_note' THEN 9 ELSE 0 END
                     WHEN 'use' THEN 2 WHEN 'reversal' THEN 6 ELSE 7 END,
         fluxrate_internal.grant_order(g) || coalesce(i.invoice_number, '')
    FROM fluxrate_internal.credit_transactions t
    JOIN fluxrate_internal.credit_grants g ON g.org_id = t.org_id AND g.id = t.grant_id
    LEFT JOIN fluxrate_internal.invoices i ON i.org_id = t.org_id AND i.id = t.invoice_id
   WHERE t.org_id = ledger_entries.org_id AND t.customer_id = ledger_entries.customer_id AND t.at <= fluxrate.now()
  UNION ALL
  -- expired at expires_at, not yet recorded by the minute job
  SELECT g.expires_at, 'credit_expiry', g.currency, 0, -g.remaining, NULL, g.id, 'credit_grant', g.id,
         coalesce(g.name, g.grant_type || ' credits') || ' (expired; the job records it)', 7, fluxrate_internal.grant_order(g)
    FROM fluxrate_internal.credit_grants g
   WHERE g.org_id = ledger_entries.org_id AND g.customer_id = ledger_entries.customer_id AND g.status = 'ACTIVE'
     AND g.expires_at <= fluxrate.now() AND g.remaining > 0
$$;

-- GET /customers/{id}/ledger: the entries in time order, each with the
-- receivable (balance) and the credits (credit_balance) after it, per currency
-- (currency_code: one of them).
CREATE FUNCTION fluxrate.list_customer_ledger(customer_id uuid, currency_code text DEFAULT NULL)
  RETURNS TABLE (at timestamptz, entry text, currency text, amount numeric, credit numeric, balance numeric,
                 credit_balance numeric, invoice_id uuid, grant_id uuid, cause text, cause_id uuid, description text)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('invoices.read');
BEGIN
  PERFORM fluxrate_internal.load_customer(v_org, list_customer_ledger.customer_id);
  RETURN QUERY
    SELECT e.at, e.entry, e.currency, e.amount, e.credit,
           sum(e.amount) OVER w, sum(e.credit) OVER w,
           e.invoice_id, e.grant_id, e.cause, e.cause_id, e.description
      FROM fluxrate_internal.ledger_entries(v_org, list_customer_ledger.customer_id) e
     WHERE list_customer_ledger.currency_code IS NULL OR e.currency = upper(list_customer_ledger.currency_code)
    WINDOW w AS (PARTITION BY e.currency ORDER BY e.at, e.ord, e.tiebreak ROWS UNBOUNDED PRECEDING)
     ORDER BY e.currency, e.at, e.ord, e.tiebreak;
END
$$;
