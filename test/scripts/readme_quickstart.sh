#!/usr/bin/env bash
# The README's SQL quickstart, extracted from README.md and run verbatim by psql
# (ON_ERROR_STOP), on the real clock: it must make its organization, keep its
# ids with \gset and end with the finalized invoice.  Run twice (two
# organizations, each its own numbering), the second time as a non-superuser
# member of fluxrate_app, the trusted role the README grants.
source "$ROOT/test/cluster.sh"
source "$ROOT/test/readme.sh"
cluster_start readme_quickstart
readme_block 'run the next block verbatim' > "$CLUSTER_DIR/quickstart.sql" || fail "no quickstart block in README.md"
q "CREATE ROLE quickstart_app LOGIN; GRANT fluxrate_app TO quickstart_app" >/dev/null
year=$(q "SELECT extract(year FROM now() AT TIME ZONE 'UTC')")
for who in postgres quickstart_app; do
  out=$(PGUSER=$who psql -X -v ON_ERROR_STOP=1 -f "$CLUSTER_DIR/quickstart.sql" 2>&1) || { echo "$out"; fail "the quickstart failed as $who"; }
  echo "== as $who"; echo "$out" | tail -45
  # the opening invoice: the first week's fee, 12.00; the closing one: 1,200 x 0.002 = 2.40 + 12.00 = 14.40
  echo "$out" | grep -Eq "^ opening +\| INV-$year-0001 \| OPEN +\| 12\.00 *$" || fail "no finalized opening invoice of 12.00 ($who)"
  echo "$out" | grep -Eq "^ subscription +\| INV-$year-0002 \| OPEN +\| 14\.40 *$" || fail "no finalized closing invoice of 14.40 ($who)"
  # the finalized invoice on screen, as invoice_text prints it
  for k in "^Invoice number: INV-$year-0002$" '^Status: +OPEN$' '^Platform fee +1 +12 +12\.00 USD$' \
           '^API calls +1200 +0\.002 +2\.40 USD$' '^ +Total +14\.40 USD$'; do
    echo "$out" | grep -Eq "$k" || fail "the invoice on screen lacks /$k/ ($who)"
  done
done
[ "$(q "SELECT count(*) FROM fluxrate_internal.organizations")" = 2 ] || fail "expected one organization per run"
echo "readme_quickstart: ok"
