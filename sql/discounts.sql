-- Discounts (issue 16, item 1; docs/ledger.md "Discounts"): coupons on
-- subscriptions and customers, the discount line, the order of several,
-- never below zero, fixed amounts with and without carry-over, the redemption
-- limit, bad input and tenancy.  Time is pinned; every amount is computed by
-- hand beside it.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate

SET fluxrate.pinned_now = '2026-01-01 00:00:00+00';
SELECT (fluxrate.create_organization('Adjust Co'))->>'id' AS org \gset
SELECT (fluxrate.create_organization('Other Co'))->>'id' AS org_b \gset
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;
SELECT (fluxrate.set_tax_rate('DE', 0.19, name => 'VAT'))->>'rate' AS vat;
SELECT (fluxrate.create_feature('API calls', 'api_calls', 'meter', meter_name => 'api_calls', property_name => 'n',
        aggregation_type => 'SUM'))->>'meter_token' AS tok \gset
SELECT id AS meter FROM fluxrate_internal.meters WHERE org_id = :'org' AND meter_name = 'api_calls' \gset
-- the hybrid plan: a $49 platform fee in advance, API calls at $0.015
SELECT (fluxrate.create_plan('Pro', 'pro', 'HYBRID', 'month', 'USD'))->>'id' AS pro \gset
SELECT (fluxrate.add_charge(:'pro', 'FIXED', unit_price => 49, display_name => 'Platform fee', billing_timing => 'in_advance'))->>'id' AS fee \gset
SELECT (fluxrate.add_charge(:'pro', 'USAGE', meter_id => :'meter', unit_price => 0.015, display_name => 'API calls'))->>'id' AS calls \gset
-- a usage-only plan at $0.01 a call
SELECT (fluxrate.create_plan('Lite', 'lite', 'USAGE', 'month', 'USD'))->>'id' AS lite \gset
SELECT (fluxrate.add_charge(:'lite', 'USAGE', meter_id => :'meter', unit_price => 0.01, display_name => 'API calls'))->>'status' AS lite_charge;

-- Coupons
SELECT c->>'code' AS code, c->>'discount_type' AS type, c->>'percent_off' AS pct, c->>'duration' AS duration,
       c->>'duration_periods' AS periods
  FROM fluxrate.create_coupon('SPRING20', '20% off for 3 months', 'percentage', percent_off => 20,
                              duration => 'repeating', duration_periods => 3) c;
SELECT (fluxrate.create_coupon('TENOFF', '$10 off once', 'fixed', amount_off => 10, currency => 'USD'))->>'amount_off' AS ten;
SELECT (fluxrate.create_coupon('BUDGET25', '$25 to spend', 'fixed', amount_off => 25, currency => 'USD',
        duration => 'forever', carry_over => true))->>'carry_over' AS budget;
SELECT (fluxrate.create_coupon('HALF', 'Half price', 'percentage', percent_off => 50, duration => 'forever'))->>'id' AS half \gset
SELECT (fluxrate.create_coupon('LOYAL10', 'Loyalty 10%', 'percentage', percent_off => 10, duration => 'forever'))->>'id' AS loyal \gset
SELECT (fluxrate.create_coupon('FOUR', '$4 off', 'fixed', amount_off => 4, currency => 'USD', duration => 'forever'))->>'id' AS four \gset
SELECT (fluxrate.create_coupon('FEEFREE', 'No platform fee', 'percentage', percent_off => 100, duration => 'forever',
        charge_ids => ARRAY[:'fee']::uuid[]))->>'id' AS feefree \gset
SELECT (fluxrate.create_coupon('ONEUSE', 'Only one', 'percentage', percent_off => 5, duration => 'forever', max_redemptions => 1))->>'id' AS oneuse \gset
SELECT (fluxrate.create_coupon('EURO5', '5 EUR off', 'fixed', amount_off => 5, currency => 'EUR'))->>'id' AS euro \gset
SELECT (fluxrate.create_coupon('XMAS', 'Expired', 'percentage', percent_off => 15, redeem_by => '2026-01-01 00:00+00'))->>'id' AS xmas \gset

-- Customers and subscriptions
SELECT (fluxrate.create_customer('Dana GmbH', 'dana@example.com', 'dana', billing_address_country => 'DE'))->>'id' AS dana \gset
SELECT (fluxrate.create_customer('Eve', 'eve@example.com', 'eve'))->>'id' AS eve \gset
SELECT (fluxrate.create_customer('Finn', 'finn@example.com', 'finn'))->>'id' AS finn \gset
SELECT (fluxrate.create_customer('Gus', 'gus@example.com', 'gus'))->>'id' AS gus \gset
SELECT (fluxrate.create_customer('Hana', 'hana@example.com', 'hana'))->>'id' AS hana \gset
SELECT (fluxrate.create_subscription(:'dana', :'pro', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_dana \gset
SELECT (fluxrate.create_subscription(:'eve', :'lite', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_eve \gset
SELECT (fluxrate.create_subscription(:'finn', :'lite', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_finn \gset
SELECT (fluxrate.create_subscription(:'gus', :'lite', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_gus \gset
SELECT (fluxrate.create_subscription(:'hana', :'pro', start_date => '2026-01-01 00:00+00'))->>'id' AS sub_hana \gset

-- Redemptions.  SPRING20 on Dana's subscription: the window is her current
-- period and the next two, Jan 1 - Apr 1 (three whole months).
SELECT r->>'applies_from' AS applies_from, r->>'applies_until' AS applies_until, r->>'status' AS status
  FROM fluxrate.redeem_coupon(code => 'SPRING20', subscription_id => :'sub_dana') r;
SELECT (fluxrate.redeem_coupon(code => 'TENOFF', subscription_id => :'sub_eve'))->>'applies_until' AS eve_until;   -- Feb 1
SELECT (fluxrate.redeem_coupon(code => 'BUDGET25', subscription_id => :'sub_finn'))->>'applies_until' AS finn_until; -- null: forever
-- Gus: three at once, redeemed in this order: HALF (subscription), LOYAL10
-- (customer-wide), FOUR (subscription)
SELECT (fluxrate.redeem_coupon(:'half', subscription_id => :'sub_gus'))->>'status' AS half;
SET fluxrate.pinned_now = '2026-01-01 00:00:01+00';
SELECT (fluxrate.redeem_coupon(:'loyal', customer_id => :'gus'))->>'subscription_id' IS NULL AS customer_wide;
SET fluxrate.pinned_now = '2026-01-01 00:00:02+00';
SELECT (fluxrate.redeem_coupon(:'four', subscription_id => :'sub_gus'))->>'status' AS four;
SET fluxrate.pinned_now = '2026-01-01 00:00:03+00';
SELECT (fluxrate.redeem_coupon(:'feefree', subscription_id => :'sub_hana'))->>'status' AS feefree;

-- Bad input: each refused with its SQLSTATE, nothing written
SELECT fluxrate.redeem_coupon(:'euro', subscription_id => :'sub_dana');               -- PT422 currency EUR, subscription USD
SELECT fluxrate.redeem_coupon(:'xmas', subscription_id => :'sub_dana');               -- PT422 expired (redeem_by = now)
SELECT fluxrate.redeem_coupon(code => 'SPRING20', subscription_id => :'sub_dana');    -- PT409 already redeemed here
SELECT fluxrate.redeem_coupon(code => 'TENOFF', customer_id => :'dana');              -- PT422 customer-wide needs forever
SELECT fluxrate.redeem_coupon(code => 'TENOFF', subscription_id => :'sub_dana', customer_id => :'dana'); -- 22023 one of the two
SELECT fluxrate.redeem_coupon(code => 'NOPE', subscription_id => :'sub_dana');        -- PT404
SET fluxrate.pinned_now = '2026-01-01 00:00:04+00';
SELECT (fluxrate.redeem_coupon(:'oneuse', subscription_id => :'sub_hana'))->>'status' AS first_use;
SELECT fluxrate.redeem_coupon(:'oneuse', subscription_id => :'sub_dana');             -- PT409 limit reached
SELECT fluxrate.create_coupon('BAD1', 'x', 'percentage', percent_off => 0);           -- PT422 not above 0
SELECT fluxrate.create_coupon('BAD2', 'x', 'percentage', percent_off => 150);         -- PT422 above 100
SELECT fluxrate.create_coupon('BAD3', 'x', 'percentage', percent_off => 'NaN');       -- PT422 not finite
SELECT fluxrate.create_coupon('BAD4', 'x', 'fixed', amount_off => 'Infinity', currency => 'USD'); -- PT422 not finite
SELECT fluxrate.create_coupon('BAD5', 'x', 'fixed', amount_off => -5, currency => 'USD');         -- PT422 negative
SELECT fluxrate.create_coupon('BAD6', 'x', 'fixed', amount_off => 5);                 -- PT422 no currency
SELECT fluxrate.create_coupon('BAD7', 'x', 'fixed', amount_off => 0.001, currency => 'USD');      -- PT422 below the cent
SELECT fluxrate.create_coupon('BAD8', 'x', 'percentage', percent_off => 5, duration => 'repeating'); -- PT422 no periods
SELECT fluxrate.create_coupon('BAD9', 'x', 'percentage', percent_off => 5, carry_over => true);   -- PT422 carry_over is for fixed
SELECT fluxrate.create_coupon('TENOFF', 'again', 'percentage', percent_off => 5);     -- PT409 code taken
SELECT fluxrate.create_coupon('BAD10', 'x', 'bogus');                                  -- 22023 discount_type
SELECT count(*) AS coupons, sum(times_redeemed) AS redeemed FROM fluxrate_internal.coupons WHERE org_id = :'org';  -- 10, 8
SELECT count(*) AS redemptions FROM fluxrate_internal.coupon_redemptions WHERE org_id = :'org';                   -- 8

-- Tenancy: the other organization sees none of it and cannot redeem it
SELECT fluxrate.act_as(:'org_b', true) IS NOT NULL AS acting_b;
SELECT fluxrate.get_coupon(:'half');                                                   -- PT404
SELECT (fluxrate.list_coupons())->'meta'->>'total' AS b_coupons;                       -- 0
SELECT fluxrate.redeem_coupon(code => 'HALF', subscription_id => :'sub_gus');          -- PT404 coupon
SELECT (fluxrate.create_coupon('BONLY', 'B only', 'percentage', percent_off => 90))->>'id' AS b_coupon \gset
SELECT fluxrate.redeem_coupon(:'b_coupon', subscription_id => :'sub_gus');             -- PT404 subscription
SELECT fluxrate.list_redemptions(customer_id => :'gus');                               -- []
SELECT fluxrate.remove_redemption((SELECT id FROM fluxrate_internal.coupon_redemptions WHERE org_id = :'org' LIMIT 1)); -- PT404
SELECT fluxrate.act_as(:'org', true) IS NOT NULL AS acting;

-- Usage: Dana 1,234 calls in January, 2,000 in February, 3,000 in March,
-- 4,000 in April; Eve 300 and 500; Finn 1,000, 2,000, 3,000; Gus 2,000.
-- (written as the ingestion writes them; track() refuses events from the future of the pinned clock)
INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "timestamp", ingested_at)
SELECT :'org', fluxrate_internal.uuid_v7(), c.id, :'meter', v.q, v.t, v.t
  FROM (VALUES ('dana', 1234, '2026-01-15'::timestamptz), ('dana', 2000, '2026-02-10'), ('dana', 3000, '2026-03-10'),
               ('dana', 4000, '2026-04-10'), ('eve', 300, '2026-01-20'), ('eve', 500, '2026-02-20'),
               ('finn', 1000, '2026-01-20'), ('finn', 2000, '2026-02-20'), ('finn', 3000, '2026-03-20'),
               ('gus', 2000, '2026-01-20')) v(c, q, t)
  JOIN fluxrate_internal.customers c ON c.org_id = :'org' AND c.external_id = v.c;

-- Four months close and finalize, one after the other
SET fluxrate.pinned_now = '2026-02-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-02-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-03-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-03-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-04-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-04-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();
SET fluxrate.pinned_now = '2026-05-01 00:00:30+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-05-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();

-- The issue's example: 20% off for 3 months on a hybrid plan with 19% tax.
--   opening (Jan fee):  49.00, -20% 9.80                 -> 39.20, tax 7.448 -> 7.45, total 46.65
--   January closing:    calls 1,234 x 0.015 = 18.51, Feb fee 49.00; -20% of 67.51 = 13.502 -> 13.50
--                       subtotal 18.51 + 49.00 - 13.50 = 54.01; tax 19% of the unrounded 54.008 = 10.26152 -> 10.26; total 64.27
--   February closing:   calls 30.00, Mar fee 49.00; -20% of 79.00 = 15.80 -> 63.20, tax 12.008 -> 12.01, total 75.21
--   March closing:      calls 45.00 (March, in the window), Apr fee 49.00 (April, outside it): -20% of 45.00 = 9.00
--                       subtotal 85.00, tax 16.15, total 101.15
--   April closing:      calls 60.00, May fee 49.00, no discount: 109.00, tax 20.71, total 129.71 (the 4th month undiscounted)
-- (numbers: finalization order among one instant's drafts is not fixed, so only their shape is shown)
SELECT i.kind, to_char(i.period_start, 'YYYY-MM-DD') AS period, i.invoice_number ~ '^INV-2026-\d{4}$' AS numbered, i.status, i.subtotal, i.tax, i.total
  FROM fluxrate_internal.invoices i WHERE i.org_id = :'org' AND i.subscription_id = :'sub_dana'
 ORDER BY i.period_start, i.kind DESC;
SELECT to_char(i.period_start, 'YYYY-MM') AS invoice, l.position, l.line_type, l.description, to_char(l.period_start, 'YYYY-MM-DD') AS line_from,
       l.quantity, l.unit_amount, l.line_total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.subscription_id = :'sub_dana' AND i.kind = 'subscription'
 ORDER BY i.period_start, l.position;
-- the discount line as the API shows it, on January's invoice
SELECT l->>'line_type' AS line_type, l->>'description' AS description, l->>'line_total' AS line_total
  FROM json_array_elements((fluxrate.get_invoice((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org'
        AND subscription_id = :'sub_dana' AND kind = 'subscription' AND period_start = '2026-01-01')))->'line_items') l
 WHERE l->>'line_type' = 'discount';

-- and as the customer reads it (the e-mail's text; HTML and PDF take the same parts)
SELECT regexp_replace(regexp_replace(fluxrate.invoice_text((SELECT id FROM fluxrate_internal.invoices WHERE org_id = :'org'
        AND subscription_id = :'sub_dana' AND kind = 'subscription' AND period_start = '2026-01-01')), 'INV-2026-\d{4}', 'INV-2026-NNNN', 'g'),
       'token=[0-9a-f-]+', 'token=TOKEN') AS invoice;

-- A fixed amount larger than the period does not carry over: Eve's $10 once
--   January: 300 x 0.01 = 3.00, -3.00 (never below zero; the other 7.00 is lost) -> 0.00
--   February: 500 x 0.01 = 5.00, outside the window -> 5.00 (no tax: no country)
-- Carried over (Finn's $25 budget, forever):
--   January 10.00 - 10.00 = 0.00 (15.00 left); February 20.00 - 15.00 = 5.00 (0 left); March 30.00 -> 30.00
-- Several at once (Gus): percentages first, compounding in redemption order, then the fixed amount
--   January 2,000 x 0.01 = 20.00; HALF -10.00; LOYAL10 10% of the 10.00 left -1.00; FOUR -4.00 -> 5.00
--   February .. April: no usage: 0.00, and no discount line (nothing to discount)
-- Limited to a charge (Hana, 100% of the platform fee): every fee line is discounted whole
--   opening 49.00 - 49.00 = 0.00; each closing: calls 0.00 + next fee 49.00 - 49.00 = 0.00
SELECT c.name, to_char(i.period_start, 'YYYY-MM') AS period, i.kind, i.subtotal, i.total,
       (SELECT string_agg(l.description || ' ' || l.line_total, '; ' ORDER BY l.position)
          FROM fluxrate_internal.invoice_lines l WHERE l.org_id = i.org_id AND l.invoice_id = i.id AND l.line_type = 'discount') AS discounts
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.customers c ON c.org_id = i.org_id AND c.id = i.customer_id
 WHERE i.org_id = :'org' AND c.external_id IN ('eve', 'finn', 'gus', 'hana')
 ORDER BY c.name, i.period_start, i.kind DESC;

-- Exactly-once: no invoice carries a redemption twice, and no period of a
-- subscription has two closing invoices
SELECT count(*) AS discount_lines, count(DISTINCT (l.invoice_id, l.redemption_id)) AS distinct_pairs
  FROM fluxrate_internal.invoice_lines l WHERE l.org_id = :'org' AND l.line_type = 'discount';
SELECT count(*) AS closing_invoices, count(DISTINCT (subscription_id, period_start)) AS periods
  FROM fluxrate_internal.invoices WHERE org_id = :'org' AND kind = 'subscription';
-- the set-based closer and fill_lines (the reference) agree: every draft was
-- recomputed by fill_lines at finalization; a fresh close checked against it
SET fluxrate.pinned_now = '2026-06-01 00:00:30+00';
CALL fluxrate.close_due_periods();
CREATE TEMP TABLE closer_lines AS
SELECT i.id, l.position, l.line_type, l.line_total, l.amount_unrounded, l.redemption_id, i.total
  FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
 WHERE i.org_id = :'org' AND i.period_start = '2026-05-01' AND i.status = 'DRAFT';
SELECT count(*) > 0 AS refreshed FROM (SELECT fluxrate_internal.fill_lines(i.org_id, i.id, i.period_start, i.period_end)
  FROM fluxrate_internal.invoices i WHERE i.org_id = :'org' AND i.period_start = '2026-05-01' AND i.status = 'DRAFT') x;
SELECT count(*) AS differences FROM (
  (SELECT * FROM closer_lines EXCEPT
   SELECT i.id, l.position, l.line_type, l.line_total, l.amount_unrounded, l.redemption_id, i.total
     FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
    WHERE i.org_id = :'org' AND i.period_start = '2026-05-01' AND i.status = 'DRAFT')
  UNION ALL
  (SELECT i.id, l.position, l.line_type, l.line_total, l.amount_unrounded, l.redemption_id, i.total
     FROM fluxrate_internal.invoices i JOIN fluxrate_internal.invoice_lines l ON l.org_id = i.org_id AND l.invoice_id = i.id
    WHERE i.org_id = :'org' AND i.period_start = '2026-05-01' AND i.status = 'DRAFT'
   EXCEPT SELECT * FROM closer_lines)) d;
SELECT count(*) AS may_discount_lines FROM closer_lines WHERE line_type = 'discount';   -- Gus none (no usage), Hana FEEFREE on the June fee (ONEUSE finds 0 left) = 1

-- Removing a redemption: Hana's FEEFREE; the June draft, refreshed, carries no discount:
--   calls 0.00 + July fee 49.00 - ONEUSE 5% 2.45 = 46.55
SELECT (fluxrate.remove_redemption(r.id))->>'status' AS removed
  FROM fluxrate_internal.coupon_redemptions r WHERE r.org_id = :'org' AND r.coupon_id = :'feefree';
SET fluxrate.pinned_now = '2026-06-01 01:00:30+00';
CALL fluxrate.finalize_due_invoices();
SELECT i.subtotal, i.total FROM fluxrate_internal.invoices i
 WHERE i.org_id = :'org' AND i.subscription_id = :'sub_hana' AND i.period_start = '2026-05-01';
SELECT jsonb_array_length(fluxrate.list_redemptions(customer_id => :'hana')) AS hana_redemptions,
       (SELECT count(*) FROM jsonb_array_elements(fluxrate.list_redemptions(customer_id => :'hana')) r WHERE r->>'status' = 'REMOVED') AS removed;
-- the outbox has the redemptions
SELECT count(*) AS redeemed_events FROM fluxrate_internal.outbox WHERE org_id = :'org' AND event = 'coupon.redeemed';  -- 8

-- A plan change splits a period in two invoices (docs/lifecycle.md "Plan
-- changes"); a fixed amount per period is one allowance for the period, not one
-- per invoice.  Org "Split Co": Basic, a $30 fee in arrears; Premium, $100 in
-- arrears; a coupon of $10 off every period, on Ivy from April 1.  She moves to
-- Premium on April 13 (12 of April's 30 days gone: 40%).
--   the change invoice [Apr 1, Apr 13): 30 x 12/30 = 12.00, less 10.00 -> 2.00
--   the close [Apr 13, May 1): 100 x 18/30 = 60.00; April's $10 is spent -> no discount, 60.00
--   May [May 1, Jun 1): 100.00, less May's 10.00 -> 90.00
SET fluxrate.pinned_now = '2026-04-01 00:00:00+00';
SELECT (fluxrate.create_organization('Split Co'))->>'id' AS org_s \gset
SELECT fluxrate.act_as(:'org_s', true) IS NOT NULL AS acting;
SELECT (fluxrate.create_plan('Basic', 'basic', 'FIXED', 'month', 'USD'))->>'id' AS basic \gset
SELECT (fluxrate.add_charge(:'basic', 'FIXED', unit_price => 30, display_name => 'Basic fee', billing_timing => 'in_arrears'))->>'status' AS basic_fee;
SELECT (fluxrate.create_plan('Premium', 'premium', 'FIXED', 'month', 'USD'))->>'id' AS premium \gset
SELECT (fluxrate.add_charge(:'premium', 'FIXED', unit_price => 100, display_name => 'Premium fee', billing_timing => 'in_arrears'))->>'status' AS premium_fee;
SELECT (fluxrate.create_coupon('TENMONTHLY', '$10 off every month', 'fixed', amount_off => 10, currency => 'USD', duration => 'forever'))->>'code' AS coupon;
SELECT (fluxrate.create_customer('Ivy', 'ivy@example.com', 'ivy'))->>'id' AS ivy \gset
SELECT (fluxrate.create_subscription(:'ivy', :'basic', start_date => '2026-04-01 00:00+00'))->>'id' AS sub_ivy \gset
SELECT (fluxrate.redeem_coupon(code => 'TENMONTHLY', subscription_id => :'sub_ivy'))->>'status' AS redeemed;
SET fluxrate.pinned_now = '2026-04-13 00:00:00+00';
SELECT (fluxrate.change_subscription(:'sub_ivy', :'premium'))->'change'->>'status' AS changed;
SET fluxrate.pinned_now = '2026-05-01 00:00:00+00';
CALL fluxrate.close_due_periods();
SET fluxrate.pinned_now = '2026-06-01 00:00:00+00';
CALL fluxrate.close_due_periods();
SELECT i.kind, i.period_start::date, i.period_end::date, i.subtotal, i.total,
       (SELECT string_agg(l.line_type || ' ' || l.line_total, ', ' ORDER BY l.position) FROM fluxrate_internal.invoice_lines l
         WHERE l.org_id = i.org_id AND l.invoice_id = i.id) AS lines
  FROM fluxrate_internal.invoices i WHERE i.org_id = :'org_s' AND i.subscription_id = :'sub_ivy' ORDER BY i.period_start;
-- the finalizer's refresh of each draft (fill_lines) agrees: the same totals
SET fluxrate.pinned_now = '2026-06-02 00:00:00+00';
CALL fluxrate.finalize_due_invoices();
SELECT i.kind, i.status, i.total FROM fluxrate_internal.invoices i
 WHERE i.org_id = :'org_s' AND i.subscription_id = :'sub_ivy' ORDER BY i.period_start;
