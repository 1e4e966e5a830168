-- Catalog: features and meters, plans and charges, customers, subscriptions.
-- Success, every refusal (SQLSTATE shown), nothing half-written, and the
-- tenancy wall between two organizations.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-01-15 10:00:00+00';

SELECT (fluxrate.create_organization('Acme'))->>'id' AS org_a \gset
SELECT (fluxrate.create_organization('Globex'))->>'id' AS org_b \gset

-- no organization in context
SELECT fluxrate.create_customer('x', 'x@example.com');

BEGIN;
SELECT fluxrate.act_as(:'org_a') IS NOT NULL AS acting;
SELECT f->>'name' AS name, f->>'type' AS type, f->>'meter_name' AS meter, f->>'aggregation_type' AS agg,
       (f->>'meter_token') IS NOT NULL AS has_token
  FROM fluxrate.create_feature(name => 'API calls', lookup_key => 'api_calls', type => 'meter',
       meter_name => 'api_calls', property_name => 'calls', aggregation_type => 'sum', unit => 'calls') f;
-- duplicate lookup_key, duplicate meter_name
SELECT fluxrate.create_feature('API calls 2', 'api_calls', 'meter', meter_name => 'x', property_name => 'p', aggregation_type => 'SUM');
SELECT fluxrate.create_feature('Other', 'other', 'meter', meter_name => 'api_calls', property_name => 'p', aggregation_type => 'SUM');
-- missing, unknown and misplaced fields
SELECT fluxrate.create_feature('', 'k', 'meter');
SELECT fluxrate.create_feature('n', 'k', 'gauge');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'MEDIAN');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', aggregation_type => 'SUM');
SELECT fluxrate.create_feature('n', 'k', 'switch', aggregation_type => 'SUM');
-- filters: too many, bad operator, missing values
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","values":["1"]},{"property":"b","values":["1"]},{"property":"c","values":["1"]},{"property":"d","values":["1"]},{"property":"e","values":["1"]},{"property":"f","values":["1"]}]');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","operator":"like","values":["1"]}]');
SELECT fluxrate.create_feature('n', 'k', 'meter', meter_name => 'm', property_name => 'p', aggregation_type => 'SUM',
  filters => '[{"property":"a","operator":"in"}]');
SELECT f->'filters' AS filters FROM fluxrate.create_feature('Storage', 'storage', 'meter', meter_name => 'storage',
  property_name => 'gb', aggregation_type => 'MAX', filters => '[{"property":"region","operator":"in","values":["eu","us"]},{"property":"tier","operator":"exists"}]') f;
SELECT count(*) AS features_of_a FROM jsonb_array_elements((fluxrate.list_features())->'data');
COMMIT;
