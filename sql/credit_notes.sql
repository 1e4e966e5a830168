-- Credit notes (issue 16, item 3; docs/ledger.md "Credit notes"): per line or
-- an amount, against OPEN or PAID invoices, CN-YYYY-NNNN numbering, the
-- remaining creditable total, the refund record, settlement of an OPEN
-- invoice, e-mail and webhook events, the customer's history, bad input and
-- tenancy.  Time is pinned; every amount is computed by hand beside it.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

SET fluxrate.pinned_now = '2026-03-01 10:00:00+00';
SELECT (fluxrate.create_organization('Credit Co'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Other Co'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.set_tax_rate('DE', 0.19, name => 'VAT'))->>'rate' AS vat;
SELECT (fluxrate.create_webhook_endpoint('https://hooks.example.com/fluxrate', ARRAY['credit_note.created', 'invoice.paid']))->>'status' AS hook;
SELECT (fluxrate.create_customer('Dana GmbH', 'dana@example.com', 'dana', billing_address_country => 'DE'))->>'id' AS dana \gset

-- Invoice 1: 1 x 500.00 setup + 8 x 150.00 consulting = 1,700.00; VAT 19% 323.00; total 2,023.00
SELECT (fluxrate.create_invoice(:'dana', 'USD', line_items => '[{"description": "Setup", "quantity": 1, "unit_amount": 500},
        {"description": "Consulting hours", "quantity": 8, "unit_amount": 150},
        {"description": "Goodwill", "quantity": 1, "unit_amount": -10}]'))->>'id' AS inv1 \gset
-- (with a goodwill credit line of -10.00: subtotal 1,690.00, VAT 321.10, total 2,011.10)
SELECT invoice_number, status, subtotal, tax, total FROM fluxrate_internal.invoices WHERE org_id = :'org' AND id = :'inv1';
SELECT fluxrate.create_credit_note(:'inv1', 'other');                                      -- PT409 a DRAFT is not credited
SELECT (fluxrate.finalize_invoice(:'inv1'))->>'invoice_number' AS inv1_number;               -- INV-2026-0001
SELECT (fluxrate.pay_invoice(:'inv1'))->>'amount_paid' AS paid;                              -- 2011.10
SELECT id AS consulting FROM fluxrate_internal.invoice_lines WHERE org_id = :'org' AND invoice_id = :'inv1' AND description = 'Consulting hours' \gset
SELECT id AS setup FROM fluxrate_internal.invoice_lines WHERE org_id = :'org' AND invoice_id = :'inv1' AND description = 'Setup' \gset
SELECT id AS goodwill FROM fluxrate_internal.invoice_lines WHERE org_id = :'org' AND invoice_id = :'inv1' AND description = 'Goodwill' \gset

-- A partial credit note on a PAID invoice, per line: 2 of the 8 hours = 300.00;
-- VAT 19% = 57.00; total 357.00, all refunded (the invoice was paid): a refund record of 357.00
SELECT c->>'credit_note_number' AS number, c->>'subtotal' AS subtotal, c->>'tax' AS tax, c->>'total' AS total,
       c->>'applied_to_due' AS to_due, c->>'refunded' AS refunded, c->>'destination' AS destination,
       c->'refund'->>'amount' AS refund, c->'refund'->>'status' AS refund_status, c->'lines'->0->>'description' AS line
  FROM fluxrate.create_credit_note(:'inv1', 'service_issue', lines => jsonb_build_array(
         jsonb_build_object('invoice_line_id', :'consulting', 'amount', 300))) c;
-- an amount against the invoice as a whole: 100.00 + VAT 19.00 = 119.00 (CN-2026-0002)
SELECT c->>'credit_note_number' AS number, c->>'total' AS total, c->>'refunded' AS refunded
  FROM fluxrate.create_credit_note(:'inv1', 'order_change', amount => 100, memo => 'Late delivery') c;
-- Left to credit, before tax: 1,690.00 - 300.00 - 100.00 = 1,290.00; of Setup 500.00; of Consulting 900.00
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => jsonb_build_array(
         jsonb_build_object('invoice_line_id', :'setup', 'amount', 500.01)));                 -- PT422 above its line
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => jsonb_build_array(
         jsonb_build_object('invoice_line_id', :'consulting', 'amount', 500),
         jsonb_build_object('invoice_line_id', :'consulting', 'amount', 400.01)));           -- PT422 900.01 of 900.00 left
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => jsonb_build_array(
         jsonb_build_object('invoice_line_id', :'goodwill', 'amount', 5)));                  -- PT422 a credit line
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 1290.01);                    -- PT422 above 1,290.00 left
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 10.001);                     -- PT422 below the cent
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => -5);                         -- PT422 negative
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 0);                          -- PT422 zero
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 'NaN');                      -- PT422
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 'Infinity');                 -- PT422
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 1, lines => '[]');           -- 22023 not both
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => '[]');                        -- 22023 empty
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => '[{"invoice_line_id": "x", "amount": 1}]'); -- 22P02
SELECT fluxrate.create_credit_note(:'inv1', 'other', lines => jsonb_build_array(
         jsonb_build_object('invoice_line_id', gen_random_uuid(), 'amount', 1)));             -- PT404 not its line
SELECT fluxrate.create_credit_note(:'inv1', 'bored');                                      -- 22023 reason
SELECT fluxrate.create_credit_note(:'inv1');                                               -- 22004 reason
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 10, destination => 'cash');  -- 22023 destination
-- (destination 'wallet': a grant of the customer's wallet, sql/ledger.sql)
SELECT count(*) AS credit_notes, (SELECT last_seq FROM fluxrate_internal.credit_note_counters WHERE org_id = :'org') AS last_seq,
       (SELECT count(*) FROM fluxrate_internal.refunds WHERE org_id = :'org') AS refunds
  FROM fluxrate_internal.credit_notes WHERE org_id = :'org';                                -- 2, 2, 2
-- All that is left (no lines, no amount): 1,290.00 and the VAT left, 321.10 - 57.00 - 19.00 = 245.10; total 1,535.10
SELECT c->>'credit_note_number' AS number, c->>'subtotal' AS subtotal, c->>'tax' AS tax, c->>'total' AS total
  FROM fluxrate.create_credit_note(:'inv1', 'duplicate') c;
-- 357.00 + 119.00 + 1,535.10 = 2,011.10, the invoice's total to the cent; nothing is left
SELECT i.status, i.total, i.amount_credited, i.amount_due, (SELECT sum(total) FROM fluxrate_internal.credit_notes cn
        WHERE cn.org_id = i.org_id AND cn.invoice_id = i.id) AS credited
  FROM fluxrate_internal.invoices i WHERE i.org_id = :'org' AND i.id = :'inv1';
SELECT fluxrate.create_credit_note(:'inv1', 'other', amount => 0.01);                       -- PT409 fully credited
SELECT r->>'credit_note_number' AS credit_note, r->>'amount' AS amount, r->>'status' AS status
  FROM jsonb_array_elements(fluxrate.list_refunds(:'dana')) r;                               -- 357.00, 119.00, 1535.10 PENDING
SELECT (fluxrate.complete_refund(((fluxrate.list_refunds(:'dana'))->0->>'id')::uuid))->>'status' AS completed;  -- SUCCEEDED
SELECT fluxrate.complete_refund(((fluxrate.list_refunds(:'dana'))->0->>'id')::uuid);        -- PT404 not pending

-- Invoice 2, OPEN: 1 x 99.99; VAT 19% 18.9981 -> 19.00; total 118.99
SELECT (fluxrate.create_invoice(:'dana', 'USD', line_items => '[{"description": "Support plan", "quantity": 1, "unit_amount": 99.99}]'))->>'id' AS inv2 \gset
SELECT i->>'invoice_number' AS number, i->>'total' AS total, i->>'amount_due' AS due FROM fluxrate.finalize_invoice(:'inv2') i;
-- 33.33 + VAT 19% 6.3327 -> 6.33 = 39.66: off the amount due, nothing refunded: due 118.99 - 39.66 = 79.33
SELECT c->>'credit_note_number' AS number, c->>'total' AS total, c->>'applied_to_due' AS to_due, c->>'refunded' AS refunded,
       c->'refund' AS refund
  FROM fluxrate.create_credit_note(:'inv2', 'product_unsatisfactory', amount => 33.33) c;
SELECT status, amount_due, amount_credited FROM fluxrate_internal.invoices WHERE org_id = :'org' AND id = :'inv2';  -- OPEN 79.33 39.66
-- the rest: 66.66 + VAT 19.00 - 6.33 = 12.67 -> 79.33; due 0: the invoice is settled, PAID by credit
SELECT c->>'credit_note_number' AS number, c->>'subtotal' AS subtotal, c->>'tax' AS tax, c->>'total' AS total
  FROM fluxrate.create_credit_note(:'inv2', 'product_unsatisfactory') c;
SELECT status, amount_due, amount_paid, amount_credited, meta_data->>'settled_by' AS settled_by, paid_at
  FROM fluxrate_internal.invoices WHERE org_id = :'org' AND id = :'inv2';                   -- PAID 0.00 0 118.99 credit_note
SELECT count(*) AS refunds FROM fluxrate_internal.refunds WHERE org_id = :'org' AND invoice_id = :'inv2';  -- 0: nothing was paid

-- VOID invoices owe nothing: no credit note
SELECT (fluxrate.create_invoice(:'dana', 'USD', line_items => '[{"description": "Oops", "quantity": 1, "unit_amount": 5}]'))->>'id' AS inv3 \gset
SELECT (fluxrate.finalize_invoice(:'inv3'))->>'status' AS open3;
SELECT (fluxrate.void_invoice(:'inv3'))->>'status' AS void3;
SELECT fluxrate.create_credit_note(:'inv3', 'other');                                       -- PT409 VOID
SELECT fluxrate.create_credit_note(gen_random_uuid(), 'other');                             -- PT404

-- Gapless per organization and year: a new year starts at CN-2027-0001
SET fluxrate.pinned_now = '2027-01-02 09:00:00+00';
SELECT (fluxrate.create_invoice(:'dana', 'USD', line_items => '[{"description": "Seats", "quantity": 3, "unit_amount": 20}]'))->>'id' AS inv4 \gset
SELECT (fluxrate.finalize_invoice(:'inv4'))->>'invoice_number' AS inv4_number;
-- 20.00 + VAT 3.80 = 23.80
SELECT c->>'credit_note_number' AS number, c->>'total' AS total FROM fluxrate.create_credit_note(:'inv4', 'order_change', amount => 20) c;
SELECT credit_note_number FROM fluxrate_internal.credit_notes WHERE org_id = :'org' ORDER BY issued_at, credit_note_number;

-- Reading: one credit note, the lists, the customer's history (invoices and credit notes, in time order)
SELECT c->>'credit_note_number' AS number, c->>'invoice_number' AS invoice, c->>'reason' AS reason, c->>'memo' AS memo,
       jsonb_array_length(c->'lines') AS lines
  FROM fluxrate.get_credit_note((SELECT id FROM fluxrate_internal.credit_notes WHERE org_id = :'org' AND credit_note_number = 'CN-2026-0002')) c;
SELECT (fluxrate.list_credit_notes(invoice_id => :'inv1'))->'meta'->>'total' AS on_inv1,
       (fluxrate.list_credit_notes(customer_id => :'dana'))->'meta'->>'total' AS for_dana;  -- 3, 6
SELECT d->>'document_type' AS type, coalesce(d->>'credit_note_number', d->>'invoice_number') AS number, d->>'status' AS status,
       d->>'total' AS total, d->>'amount_credited' AS credited
  FROM jsonb_array_elements(fluxrate.list_customer_documents(:'dana')) d;
-- The credit note as the e-mail says it
SELECT fluxrate_internal.render_credit_note_text(:'org', id) AS text
  FROM fluxrate_internal.credit_notes WHERE org_id = :'org' AND credit_note_number = 'CN-2026-0002';

-- Events and deliveries: credit_note.created per credit note (6), webhooked;
-- invoice.paid for invoice 1 (paid) and invoice 2 (settled by credit);
-- e-mail: SKIPPED, no SMTP (as for invoices)
SELECT event, count(*) FROM fluxrate_internal.outbox WHERE org_id = :'org' AND event IN ('credit_note.created', 'invoice.paid')
 GROUP BY 1 ORDER BY 1;
SELECT channel, event, status, last_error, count(*) FROM fluxrate_internal.deliveries
 WHERE org_id = :'org' AND event IN ('credit_note.created', 'credit_note.email', 'invoice.paid') GROUP BY 1, 2, 3, 4 ORDER BY 1, 2;
SELECT (body::jsonb)->'data'->>'settled_by' AS settled_by FROM fluxrate_internal.deliveries
 WHERE org_id = :'org' AND event = 'invoice.paid' AND (body::jsonb)->'data'->>'invoice_id' = :'inv2';

-- Tenancy: the other organization can neither read nor credit
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.get_credit_note((SELECT id FROM fluxrate_internal.credit_notes WHERE org_id = :'org' LIMIT 1));  -- PT404
SELECT fluxrate.create_credit_note(:'inv4', 'other', amount => 1);                           -- PT404
SELECT (fluxrate.list_credit_notes())->'meta'->>'total' AS b_credit_notes, fluxrate.list_refunds() AS b_refunds;
SELECT fluxrate.list_customer_documents(:'dana');                                           -- PT404
SELECT fluxrate.complete_refund((SELECT id FROM fluxrate_internal.refunds WHERE org_id = :'org' AND status = 'PENDING' LIMIT 1)); -- PT404
