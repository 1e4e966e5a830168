-- 22_subscriptions.sql: period boundaries (period_boundary) and subscriptions
-- (create, read, list).  Billing operations on a subscription (preview,
-- generate, cancel, delete) are in 55_subscriptions.sql, its periods' invoices
-- in 50_periods.sql.

-- Subscriptions ---------------------------------------------------------------------

-- Boundary n of a subscription's periods (n = 0 is the anchor itself).
-- Anniversary: anchor + n * interval, computed from the anchor (never from the
-- previous boundary) in UTC, so Jan 31 -> Feb 28/29 -> Mar 31 -> Apr 30.
-- Calendar: the first boundary is the next calendar boundary after the anchor
-- (next month start, next Monday, ...), then whole calendar intervals.
CREATE FUNCTION fluxrate_internal.period_boundary(anchor timestamptz, billing_interval text, alignment text, n integer)
  RETURNS timestamptz
  LANGUAGE C IMMUTABLE PARALLEL SAFE
  -- src/periods.c: in C, because the closer computes it for every subscription it closes
  AS 'MODULE_PATHNAME', 'fr_period_boundary';

CREATE FUNCTION fluxrate_internal.subscription_json(s fluxrate_internal.subscriptions, with_features boolean DEFAULT false)
  RETURNS jsonb
  LANGUAGE sql STABLE
  AS $$
  SELECT pg_catalog.jsonb_build_object('id', s.id, 'customer_id', s.customer_id, 'plan_id', s.plan_id,
    'plan_name', p.name, 'plan_version', p.version, 'status', s.status, 'billing_interval', s.billing_interval, 'alignment', s.alignment,
    'start_date', s.start_date, 'trial_end_date', s.trial_end_date,
    'current_period_start', s.current_period_start, 'current_period_end', s.current_period_end,
    'cancel_at_period_end', s.cancel_at_period_end, 'canceled_at', s.canceled_at,
    'ended_at', s.ended_at, 'last_invoiced_date', s.last_invoiced_date, 'created_at', s.created_at)
  -- only after a failed closing (see sys_close_isolated): when, why, next try
  || CASE WHEN s.close_error IS NOT NULL THEN pg_catalog.jsonb_build_object('close_error', s.close_error,
       'close_retry_at', s.close_retry_at) ELSE '{}'::jsonb END
  -- a plan change waiting for the period end (55_plan_changes.sql)
  || coalesce((SELECT pg_catalog.jsonb_build_object('scheduled_change', pg_catalog.jsonb_build_object('id', c.id,
                 'to_plan_id', c.to_plan_id, 'to_plan_name', t.name, 'to_plan_version', t.version, 'effective_at', c.effective_at,
                 'new_anchor', c.new_anchor, 'billing_interval', t.billing_interval))
                 FROM fluxrate_internal.subscription_changes c
                 JOIN fluxrate_internal.plans t ON t.org_id = c.org_id AND t.id = c.to_plan_id
                WHERE c.org_id = s.org_id AND c.subscription_id = s.id AND c.status = 'SCHEDULED'), '{}'::jsonb)
  || CASE WHEN with_features THEN pg_catalog.jsonb_build_object('features',
       coalesce((SELECT pg_catalog.jsonb_agg(fluxrate_internal.plan_feature_json(pf) ORDER BY pf.created_at, pf.id)
                 FROM fluxrate_internal.plan_features pf WHERE pf.org_id = s.org_id AND pf.plan_id = s.plan_id), '[]'::jsonb))
     ELSE '{}'::jsonb END
  FROM fluxrate_internal.plans p WHERE p.org_id = s.org_id AND p.id = s.plan_id
$$;

-- Start dates (docs/security.md, "Start dates").  A closing run bills every
-- period that has ended, so a start date is a promise of work: never infinite
-- (the boundary of -infinity is -infinity, and such a subscription would fill
-- every closing batch forever), at most max_future_start ahead, and a start
-- that would bill more than one ended period at once only with backfill =>
-- true, and at most max_backfill_periods back.
CREATE FUNCTION fluxrate_internal.max_backfill_periods() RETURNS integer
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 120 $$;
CREATE FUNCTION fluxrate_internal.max_future_start() RETURNS interval
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '2 years' $$;

-- How many periods from anchor have ended by at (boundary <= at), counting up
-- to stop_after + 1 at most (the walk is bounded whatever the anchor).
CREATE FUNCTION fluxrate_internal.ended_periods(anchor timestamptz, billing_interval text, alignment text,
    at timestamptz, stop_after integer)
  RETURNS integer LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  n integer := 0;
BEGIN
  WHILE n <= stop_after
        AND fluxrate_internal.period_boundary(anchor, billing_interval, alignment, n + 1) <= at LOOP
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

CREATE FUNCTION fluxrate.create_subscription(customer_id uuid DEFAULT NULL, plan_id uuid DEFAULT NULL, billing_interval text DEFAULT NULL,
    start_date timestamptz DEFAULT NULL, trial_end_date timestamptz DEFAULT NULL, alignment text DEFAULT 'anniversary',
    backfill boolean DEFAULT false)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.write');
  p fluxrate_internal.plans;
  s fluxrate_internal.subscriptions;
  v_start timestamptz := coalesce(create_subscription.start_date, fluxrate.now());
  v_trial_end timestamptz;
  v_align text := coalesce(create_subscription.alignment, 'anniversary');
  v_now timestamptz := fluxrate.now();
  v_anchor timestamptz;
  v_backfill integer;
BEGIN
  PERFORM fluxrate_internal.required(create_subscription.customer_id, 'customer_id');
  IF NOT isfinite(v_start) THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date must be a finite date',
      pg_catalog.format('start_date was %s.', v_start), 'Send a date such as 2026-01-01, or none for now.');
  END IF;
  IF create_subscription.trial_end_date IS NOT NULL AND NOT isfinite(create_subscription.trial_end_date) THEN
    PERFORM fluxrate_internal.fail('PT422', 'trial_end_date must be a finite date',
      pg_catalog.format('trial_end_date was %s.', create_subscription.trial_end_date));
  END IF;
  IF v_start > v_now + fluxrate_internal.max_future_start() THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date is too far in the future',
      pg_catalog.format('start_date %s is more than %s ahead.', v_start, fluxrate_internal.max_future_start()),
      'Create the subscription closer to its start.');
  END IF;
  PERFORM fluxrate_internal.required(create_subscription.plan_id, 'plan_id');
  PERFORM fluxrate_internal.one_of(create_subscription.billing_interval, 'billing_interval', ARRAY['day', 'week', 'month', 'quarter', 'year']);
  PERFORM fluxrate_internal.one_of(v_align, 'alignment', ARRAY['anniversary', 'calendar']);
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = create_subscription.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', create_subscription.customer_id));
  END IF;
  SELECT * INTO p FROM fluxrate_internal.plans x WHERE x.org_id = v_org AND x.id = create_subscription.plan_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'plan not found', pg_catalog.format('No plan %s in this organization.', create_subscription.plan_id));
  END IF;
  -- a superseded version's id subscribes to the current version (25_plan_versions.sql)
  p := fluxrate_internal.current_plan_version(p);
  IF NOT p.is_active THEN
    PERFORM fluxrate_internal.fail('PT422', 'plan is deactivated', pg_catalog.format('Plan %s takes no new subscriptions.', p.lookup_id));
  END IF;
  -- Prices are per plan interval; a different interval would silently rescale them.
  IF create_subscription.billing_interval IS NOT NULL AND create_subscription.billing_interval <> p.billing_interval THEN
    PERFORM fluxrate_internal.fail('PT422', 'billing_interval must match the plan''s',
      pg_catalog.format('The plan bills per %s; the request asked for %s.', p.billing_interval, create_subscription.billing_interval),
      'Create a plan per billing interval.');
  END IF;
  -- The subscription's trial_end_date overrides the plan's trial_days.
  v_trial_end := coalesce(create_subscription.trial_end_date,
                          CASE WHEN p.trial_days > 0 THEN v_start + pg_catalog.make_interval(days => p.trial_days) END);
  IF v_trial_end IS NOT NULL AND v_trial_end <= v_start THEN
    PERFORM fluxrate_internal.fail('PT422', 'trial_end_date must be after start_date',
      pg_catalog.format('start_date %s, trial_end_date %s.', v_start, v_trial_end));
  END IF;
  IF v_trial_end > v_start + interval '3650 days' THEN
    PERFORM fluxrate_internal.fail('PT422', 'the trial is longer than 3650 days',
      pg_catalog.format('start_date %s, trial_end_date %s.', v_start, v_trial_end), 'A trial lasts at most 3650 days, as trial_days.');
  END IF;
  -- The periods that have already ended: the next closing run bills them.
  -- Billing starts at the trial end when there is a trial.
  v_anchor := coalesce(v_trial_end, v_start);
  v_backfill := fluxrate_internal.ended_periods(v_anchor, p.billing_interval, v_align, v_now,
                                                fluxrate_internal.max_backfill_periods());
  -- "more than one period in the past": the start would bill more than one
  -- ended period at once (one is the ordinary case of a start some days ago
  -- whose first period has just ended)
  IF v_backfill > 1 AND NOT coalesce(create_subscription.backfill, false) THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date is more than one billing period in the past',
      pg_catalog.format('Billing would start at %s: the next closing run would bill %s%s past %s periods at once.',
                        v_anchor, CASE WHEN v_backfill > fluxrate_internal.max_backfill_periods() THEN 'more than ' ELSE '' END,
                        least(v_backfill, fluxrate_internal.max_backfill_periods()), p.billing_interval),
      pg_catalog.format('Pass backfill => true to bill them (at most %s periods back), or start the subscription today.',
                        fluxrate_internal.max_backfill_periods()));
  END IF;
  IF v_backfill > fluxrate_internal.max_backfill_periods() THEN
    PERFORM fluxrate_internal.fail('PT422', 'start_date is too far in the past',
      pg_catalog.format('Billing would start at %s, more than %s %s periods ago.', v_anchor,
                        fluxrate_internal.max_backfill_periods(), p.billing_interval),
      pg_catalog.format('A backfill bills at most %s periods; start the subscription later and add the older periods as a manual invoice.',
                        fluxrate_internal.max_backfill_periods()));
  END IF;
  IF coalesce(create_subscription.backfill, false) AND v_backfill > 0 THEN
    RAISE NOTICE 'subscription backfill: the next closing run bills % past % period(s), from % to %', v_backfill, p.billing_interval,
      v_anchor, fluxrate_internal.period_boundary(v_anchor, p.billing_interval, v_align, v_backfill)
      USING HINT = 'Closing runs bill at most 12 periods of one subscription each; the rest follow in the next runs.';
  END IF;

  s.org_id := v_org;
  s.id := gen_random_uuid();
  s.customer_id := create_subscription.customer_id;
  s.plan_id := p.id;
  s.billing_interval := p.billing_interval;
  s.alignment := v_align;
  s.start_date := v_start;
  s.trial_end_date := v_trial_end;
  s.created_at := fluxrate.now();
  s.cancel_at_period_end := false;
  IF v_trial_end IS NOT NULL THEN
    -- the trial is period 0 of its own; billing periods start at the trial end
    s.status := 'TRIAL';
    s.billing_anchor := v_trial_end;
    s.current_period_index := -1;
    s.current_period_start := v_start;
    s.current_period_end := v_trial_end;
  ELSE
    s.status := 'ACTIVE';
    s.billing_anchor := v_start;
    s.current_period_index := 0;
    s.current_period_start := v_start;
    s.current_period_end := fluxrate_internal.period_boundary(v_start, p.billing_interval, v_align, 1);
  END IF;
  INSERT INTO fluxrate_internal.subscriptions SELECT s.*;
  PERFORM fluxrate_internal.emit_event(v_org, 'subscription.created',
    jsonb_build_object('subscription_id', s.id, 'customer_id', s.customer_id, 'plan_id', s.plan_id, 'status', s.status));
  PERFORM set_config('response.status', '201', true);
  -- backfill_periods: how many ended periods the next closing runs bill at once
  RETURN fluxrate_internal.subscription_json(s) || jsonb_build_object('backfill_periods', v_backfill);
END
$$;

-- json: keys in a logical order (75_render.sql)
CREATE FUNCTION fluxrate.get_subscription(subscription_id uuid) RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
  s fluxrate_internal.subscriptions;
BEGIN
  SELECT * INTO s FROM fluxrate_internal.subscriptions x WHERE x.org_id = v_org AND x.id = get_subscription.subscription_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'subscription not found', pg_catalog.format('No subscription %s in this organization.', subscription_id));
  END IF;
  RETURN fluxrate_internal.ordered_json(fluxrate_internal.subscription_json(s, true));
END
$$;

CREATE FUNCTION fluxrate.list_customer_subscriptions(customer_id uuid) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  v_org uuid := fluxrate_internal.require_org('customers.read');
BEGIN
  PERFORM 1 FROM fluxrate_internal.customers c WHERE c.org_id = v_org AND c.id = list_customer_subscriptions.customer_id;
  IF NOT FOUND THEN
    PERFORM fluxrate_internal.fail('PT404', 'customer not found', pg_catalog.format('No customer %s in this organization.', customer_id));
  END IF;
  RETURN coalesce((SELECT jsonb_agg(fluxrate_internal.subscription_json(s) ORDER BY s.created_at, s.id)
                   FROM fluxrate_internal.subscriptions s
                   WHERE s.org_id = v_org AND s.customer_id = list_customer_subscriptions.customer_id), '[]'::jsonb);
END
$$;
