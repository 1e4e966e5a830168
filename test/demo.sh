#!/usr/bin/env bash
# make demo: set everything up, start a throwaway cluster (pg_cron + fluxrate
# preloaded, as an unprivileged user) and replay the Fluxrate quickstart in SQL,
# ending with the finalized invoice.  The cluster is removed afterwards.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
OUT=$ROOT/build/demo; rm -rf "$OUT"; mkdir -p "$OUT"; chown -R "$RUNAS" "$OUT" 2>/dev/null || true
as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" bash -c '
  set -euo pipefail
  source "$ROOT/test/cluster.sh"
  cluster_start demo
  psql -X -q -v ON_ERROR_STOP=1 -f "$ROOT/test/demo.sql"
'
