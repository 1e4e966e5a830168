#!/usr/bin/env bash
# Shared set-up for make test / make demo / make bench:
#  - installs packages (test/deps.sh),
#  - builds the extension,
#  - makes a private PostgreSQL installation under build/tmp_install (a copy of
#    Debian's PostgreSQL 15 tree plus fluxrate, exactly like PostgreSQL's own
#    "make check" temp-install).  PostgreSQL binaries are relocatable, so the copy
#    finds its own share/ and lib/.  Nothing is installed into the system tree,
#    and several work trees can test side by side.
#  - picks the unprivileged user that runs PostgreSQL (initdb refuses root).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash test/deps.sh
PGBIN_SYS=/usr/lib/postgresql/15/bin
export PG_CONFIG=$PGBIN_SYS/pg_config
make -s PG_CONFIG=$PG_CONFIG >/dev/null
TI=$ROOT/build/tmp_install
# (copied again when a package added to deps.sh brought a library the copy lacks)
if [ ! -x "$TI/usr/lib/postgresql/15/bin/postgres" ] || [ ! -f "$TI/usr/lib/postgresql/15/lib/plproxy.so" ]; then
  mkdir -p "$TI/usr/lib/postgresql" "$TI/usr/share/postgresql"
  cp -a /usr/lib/postgresql/15 "$TI/usr/lib/postgresql/"
  cp -a /usr/share/postgresql/15 "$TI/usr/share/postgresql/"
else
  # a copy made before a package of test/deps.sh was installed (plpgsql_check)
  # gets what it lacks; what is there (fluxrate's own files) is kept
  cp -an /usr/lib/postgresql/15 "$TI/usr/lib/postgresql/"
  cp -an /usr/share/postgresql/15 "$TI/usr/share/postgresql/"
fi
make -s PG_CONFIG=$PG_CONFIG install DESTDIR="$TI" >/dev/null
export PGBIN=$TI/usr/lib/postgresql/15/bin
export PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
# The unprivileged user that owns the throwaway clusters.
if [ "$(id -u)" = 0 ]; then
  RUNAS=${FLUXRATE_TEST_USER:-fluxrate}
  id "$RUNAS" >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash "$RUNAS"
  chown -R "$RUNAS" "$ROOT/build"
  # the user must be able to read the tree (a fresh clone may sit under /root)
  d=$ROOT; while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
  chmod -R o+rX "$ROOT" 2>/dev/null || true
  as_user() { runuser -u "$RUNAS" -- env PATH="$PGBIN:$PATH" "$@"; }
else
  RUNAS=$(id -un)
  as_user() { env PATH="$PGBIN:$PATH" "$@"; }
fi
export RUNAS
