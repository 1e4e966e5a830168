#!/usr/bin/env bash
# make bench: every bench/NN_*.sh against one throwaway cluster with durable
# settings (fsync on, synchronous_commit on), our path and the plain-PostgreSQL
# baseline side by side in one run.  Each script prints lines of the form
#   bench <name>: ours=<n>/s baseline=<n>/s ratio=<r>
# BENCH="11_track" narrows the run.  Results go to build/bench/results.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../test/env.sh"
cd "$ROOT"
OUT=$ROOT/build/bench; rm -rf "$OUT"; mkdir -p "$OUT"; chown -R "$RUNAS" "$OUT" 2>/dev/null || true
scripts=$(ls bench/[0-9][0-9]_*.sh | sort)
if [ -n "${BENCH:-}" ]; then scripts=$(for b in $BENCH; do ls bench/${b}*.sh; done); fi
as_user env ROOT="$ROOT" PGBIN="$PGBIN" OUT="$OUT" SCRIPTS="$scripts" bash -c '
  set -euo pipefail
  source "$ROOT/test/cluster.sh"
  cluster_start bench "fsync = on" "synchronous_commit = on" "shared_buffers = 2GB" \
    "max_wal_size = 4GB" "max_connections = 100" "work_mem = 256MB"
  for s in $SCRIPTS; do echo "== $s"; bash "$ROOT/$s"; done
' 2>&1 | tee "$OUT/results.txt"
echo; grep '^bench ' "$OUT/results.txt" || true
