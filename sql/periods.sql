-- periods: period_boundary() and nominal_period() are in C (src/periods.c)
-- since 0.2.0.  The reference here is their PL/pgSQL definition of 0.1.0,
-- written out again as it was (release/fluxrate--0.1.0.sql); the two are
-- compared on a grid of anchors (month ends, leap days, times of day, far
-- dates, infinity), every interval and alignment, n from 0 to 40 and a few
-- large n, values and errors alike.  The hand-checked boundaries are in
-- catalog.sql and lifecycle.sql.
SET timezone = 'UTC';
CREATE SCHEMA ref;
CREATE FUNCTION ref.period_boundary(anchor timestamptz, billing_interval text, alignment text, n integer)
  RETURNS timestamptz LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  step interval := CASE billing_interval
    WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
    WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months'
    WHEN 'year' THEN interval '1 year' END;
  a timestamp := anchor AT TIME ZONE 'UTC';
  first timestamp;
BEGIN
  IF step IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = pg_catalog.format('invalid billing_interval: %s', billing_interval);
  END IF;
  IF n <= 0 THEN
    RETURN anchor;
  END IF;
  IF alignment = 'calendar' THEN
    first := pg_catalog.date_trunc(CASE billing_interval WHEN 'week' THEN 'week' ELSE billing_interval END, a) + step;
    RETURN (first + step * (n - 1)) AT TIME ZONE 'UTC';
  END IF;
  RETURN (a + step * n) AT TIME ZONE 'UTC';
END
$$;
CREATE FUNCTION ref.nominal_period(s fluxrate_internal.subscriptions, OUT nominal_start timestamptz, OUT nominal_end timestamptz)
  LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  step interval := CASE s.billing_interval WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
    WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months' ELSE interval '1 year' END;
BEGIN
  nominal_end := ref.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index + 1);
  IF s.current_period_index = 0 AND s.alignment = 'calendar' THEN
    nominal_start := ((nominal_end AT TIME ZONE 'UTC') - step) AT TIME ZONE 'UTC';
  ELSE
    nominal_start := ref.period_boundary(s.billing_anchor, s.billing_interval, s.alignment, s.current_period_index);
  END IF;
END
$$;
-- one outcome as text: the value, or the error's SQLSTATE
CREATE FUNCTION ref.outcome(f text, anchor timestamptz, iv text, al text, n integer) RETURNS text
  LANGUAGE plpgsql AS $$
DECLARE
  s fluxrate_internal.subscriptions;
  v text;
BEGIN
  IF f LIKE '%nominal_period' THEN
    s.billing_anchor := anchor; s.billing_interval := iv; s.alignment := al; s.current_period_index := n;
    EXECUTE format('SELECT (%s($1))::text', f) INTO v USING s;
  ELSE
    EXECUTE format('SELECT %s($1, $2, $3, $4)::text', f) INTO v USING anchor, iv, al, n;
  END IF;
  RETURN coalesce(v, 'null');
EXCEPTION WHEN OTHERS THEN
  RETURN 'error ' || SQLSTATE;
END
$$;
CREATE TABLE ref.grid AS
SELECT a.anchor, iv, al, n
  FROM unnest(ARRAY['2026-01-31 00:00+00', '2028-02-29 10:30+00', '2026-03-31 23:59:59.999999+00', '2026-12-31 12:00+00',
                    '2026-05-15 08:00+00', '2027-06-30 00:00+00', '2024-02-29 00:00+00', '1970-01-01 00:00+00',
                    '2026-11-02 00:00+00', '9999-11-30 00:00+00', '4700-01-01 BC', 'infinity', '-infinity']::timestamptz[]) a(anchor),
       unnest(ARRAY['day', 'week', 'month', 'quarter', 'year']) iv,
       unnest(ARRAY['anniversary', 'calendar']) al,
       (SELECT generate_series(0, 40) UNION ALL VALUES (-1), (1000), (100000), (2147483647)) g(n);
SELECT count(*) AS cases FROM ref.grid;
-- every case: the same value or the same error (rows printed: none)
SELECT g.*, ref.outcome('ref.period_boundary', g.anchor, g.iv, g.al, g.n) AS reference,
       ref.outcome('fluxrate_internal.period_boundary', g.anchor, g.iv, g.al, g.n) AS ours
  FROM ref.grid g
 WHERE ref.outcome('ref.period_boundary', g.anchor, g.iv, g.al, g.n)
       IS DISTINCT FROM ref.outcome('fluxrate_internal.period_boundary', g.anchor, g.iv, g.al, g.n);
SELECT g.*, ref.outcome('ref.nominal_period', g.anchor, g.iv, g.al, g.n) AS reference,
       ref.outcome('fluxrate_internal.nominal_period', g.anchor, g.iv, g.al, g.n) AS ours
  FROM ref.grid g
 WHERE g.n < 2147483647   -- (index + 1 overflows in both: compared below)
   AND ref.outcome('ref.nominal_period', g.anchor, g.iv, g.al, g.n)
       IS DISTINCT FROM ref.outcome('fluxrate_internal.nominal_period', g.anchor, g.iv, g.al, g.n);
-- the grid does reach the errors and the far dates: how many cases of each kind
SELECT CASE WHEN o LIKE 'error%' THEN o WHEN o = 'null' THEN o WHEN o LIKE '%infinity%' THEN 'infinite' ELSE 'value' END AS kind, count(*)
  FROM (SELECT ref.outcome('fluxrate_internal.period_boundary', g.anchor, g.iv, g.al, g.n) AS o FROM ref.grid g) x
 GROUP BY 1 ORDER BY 1;
-- the edges, by hand: an unknown or missing interval is refused with 22023,
-- a missing anchor or n has no boundary, a missing alignment is anniversary
SELECT fluxrate_internal.period_boundary('2026-01-31 00:00+00', 'fortnight', 'anniversary', 1);
SELECT fluxrate_internal.period_boundary('2026-01-31 00:00+00', NULL, 'anniversary', 1);
SELECT fluxrate_internal.period_boundary(NULL, 'month', 'anniversary', 1) AS no_anchor,
       fluxrate_internal.period_boundary('2026-01-31 00:00+00', 'month', 'anniversary', NULL) AS no_n,
       fluxrate_internal.period_boundary('2026-01-31 00:00+00', 'month', NULL, 1) AS no_alignment;
SELECT ref.outcome('fluxrate_internal.nominal_period', '2026-01-15 10:00+00', 'month', 'calendar', 2147483647) AS ours,
       ref.outcome('ref.nominal_period', '2026-01-15 10:00+00', 'month', 'calendar', 2147483647) AS reference;
-- a calendar subscription anchored on January 15: its partial first period
-- [Jan 15, Feb 1) prorates against all of January, [Jan 1, Feb 1); its
-- second is February itself
SELECT ref.outcome('fluxrate_internal.nominal_period', '2026-01-15 10:00+00', 'month', 'calendar', 0) AS first,
       ref.outcome('fluxrate_internal.nominal_period', '2026-01-15 10:00+00', 'month', 'calendar', 1) AS second;
-- strict: no subscription, no period
SELECT * FROM fluxrate_internal.nominal_period(NULL::fluxrate_internal.subscriptions) AS null_row;
DROP SCHEMA ref CASCADE;
