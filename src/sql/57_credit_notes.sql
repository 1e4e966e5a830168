-- 57_credit_notes.sql: credit notes against OPEN or PAID invoices and the
-- refunds they give back (issue 16, item 3; docs/ledger.md "Credit notes").
--   credit_notes, credit_note_lines, credit_note_counters, refunds   the tables
--   next_credit_note_number()       CN-YYYY-NNNN, gapless per organization and year
--   create_credit_note(), get_credit_note(), list_credit_notes(),
--   list_invoice_credit_notes(), list_customer_documents()   the API
--   sys_credit_note_to_wallet()     the hook of destination 'wallet' (not yet:
--                                   refused until wallets exist, issue 16 item 2)

CREATE TABLE fluxrate_internal.credit_note_counters (
  org_id    uuid NOT NULL REFERENCES fluxrate_internal.organizations ON DELETE CASCADE,
  year      integer NOT NULL,
  last_seq  integer NOT NULL,
  PRIMARY KEY (org_id, year)
);

CREATE TABLE fluxrate_internal.credit_notes (
  org_id              uuid NOT NULL,
  id                  uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_number  text NOT NULL,            -- CN-YYYY-NNNN
  invoice_id          uuid NOT NULL,
  customer_id         uuid NOT NULL,
  currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  reason              text NOT NULL CHECK (reason IN ('duplicate', 'fraudulent', 'order_change',
                                                       'product_unsatisfactory', 'service_issue', 'other')),
  memo                text CHECK (pg_catalog.length(memo) <= 2000),
  -- where the credit goes: 'refund' = a refund record (refunds); 'wallet' = a
  -- credit grant of the customer's wallet (sys_credit_note_to_wallet, not yet)
  destination         text NOT NULL CHECK (destination IN ('refund', 'wallet')),
  subtotal            numeric NOT NULL CHECK (subtotal >= 0),   -- the credited amount before tax
  tax                 numeric NOT NULL CHECK (tax >= 0),
  total               numeric NOT NULL CHECK (total > 0),       -- subtotal + tax
  -- of the total: what reduced the invoice's amount due (OPEN), and what went
  -- back to the customer (refund or wallet: what had been paid)
  applied_to_due      numeric NOT NULL CHECK (applied_to_due >= 0),
  refunded            numeric NOT NULL CHECK (refunded >= 0),
  invoice_status      text NOT NULL,            -- the invoice's status when credited
  status              text NOT NULL DEFAULT 'ISSUED' CHECK (status IN ('ISSUED')),
  issued_at           timestamptz NOT NULL,
  public_token        uuid,
  meta_data           jsonb NOT NULL DEFAULT '{}',
  created_at          timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_number),
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE,
  CHECK (total = subtotal + tax),
  CHECK (applied_to_due + refunded = total)
);
CREATE INDEX credit_notes_invoice_idx ON fluxrate_internal.credit_notes (org_id, invoice_id);
CREATE INDEX credit_notes_customer_idx ON fluxrate_internal.credit_notes (org_id, customer_id);

CREATE TABLE fluxrate_internal.credit_note_lines (
  org_id           uuid NOT NULL,
  id               uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_id   uuid NOT NULL,
  position         integer NOT NULL,
  invoice_line_id  uuid,                      -- NULL: an amount against the invoice as a whole
  description      text NOT NULL,
  amount           numeric NOT NULL CHECK (amount > 0),   -- before tax, in the minor unit
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_id, position),
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_line_id) REFERENCES fluxrate_internal.invoice_lines (org_id, id) ON DELETE CASCADE
);
CREATE INDEX credit_note_lines_invoice_line_idx ON fluxrate_internal.credit_note_lines (org_id, invoice_line_id)
  WHERE invoice_line_id IS NOT NULL;

-- A refund owed to the customer: the credit of a credit note on what had been
-- paid.  PENDING until the organization records that the money went back.
CREATE TABLE fluxrate_internal.refunds (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
  credit_note_id  uuid NOT NULL,
  invoice_id      uuid NOT NULL,
  customer_id     uuid NOT NULL,
  currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  amount          numeric NOT NULL CHECK (amount > 0),
  status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SUCCEEDED')),
  created_at      timestamptz NOT NULL,
  PRIMARY KEY (org_id, id),
  UNIQUE (org_id, credit_note_id),
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, invoice_id) REFERENCES fluxrate_internal.invoices (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, customer_id) REFERENCES fluxrate_internal.customers (org_id, id) ON DELETE CASCADE
);
CREATE INDEX refunds_customer_idx ON fluxrate_internal.refunds (org_id, customer_id);

-- what the invoice has been credited so far (the remaining creditable total is
-- total - credited), and the credit-note e-mails' deliveries
ALTER TABLE fluxrate_internal.invoices ADD COLUMN amount_credited numeric NOT NULL DEFAULT 0;
ALTER TABLE fluxrate_internal.deliveries ADD COLUMN credit_note_id uuid;
ALTER TABLE fluxrate_internal.deliveries ADD CONSTRAINT deliveries_credit_note_fkey
  FOREIGN KEY (org_id, credit_note_id) REFERENCES fluxrate_internal.credit_notes (org_id, id) ON DELETE CASCADE;
