#!/usr/bin/env bash
# Print the catalog of a fresh install of this tree, one line per object
# (test/upgrade/catalog.sql: routines with md5 of their bodies, config and
# SECURITY DEFINER, relations, columns, constraints, indexes, policies,
# triggers, types, privileges, extension membership), followed by each
# column's position, which catalog.sql leaves out on purpose.  A refactoring
# that only moves definitions between parts of src/sql must leave it unchanged:
#   git stash; bash test/catalog.sh >/tmp/before.txt; git stash pop
#   bash test/catalog.sh >/tmp/after.txt; diff /tmp/before.txt /tmp/after.txt
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" >&2
OUT=$ROOT/build/catalog
rm -rf "$OUT"; mkdir -p "$OUT"; chown -R "$RUNAS" "$OUT" 2>/dev/null || true
as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" bash -s <<'SCRIPT'
set -euo pipefail
source "$ROOT/test/cluster.sh"
cluster_start catalog
qf -f "$ROOT/test/upgrade/catalog.sql"
qf <<'SQL'
SELECT format('position %s.%s %s', a.attrelid::regclass, a.attname, a.attnum)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid::regclass::text, a.attnum;
SQL
SCRIPT
