#!/usr/bin/env bash
# Install the Debian 12 packages fluxrate builds, tests and demos with.
# Idempotent: packages already present are not reinstalled.  Needs root (or sudo).
set -euo pipefail
PKGS=(
  build-essential
  postgresql-15 postgresql-server-dev-15 postgresql-client-15
  postgresql-15-cron        # the clock: period closing and finalization jobs
  postgresql-15-plpgsql-check  # the linter of every PL/pgSQL function (sql/lint.sql)
  postgresql-15-plproxy     # the router of a sharded set-up (fluxrate_router, test/scripts/router.sh)
  libsodium-dev             # randomness, API-key hashing, argon2id, secretbox
  libssl-dev                # HMAC-SHA256 for JWT HS256 and webhook signatures
  libcurl4-openssl-dev      # SMTP and webhook delivery
  libpq-dev                 # schedule_jobs() logs in the way pg_cron will (src/cron.c)
  sudo                      # the README's install steps (sudo -u postgres), run by stock_install.sh
  libhpdf-dev               # libharu: the PDF invoice (src/render_pdf.c)
  poppler-utils             # tests: pdftotext reads the PDF invoice back
  python3-psycopg           # tests: application code through a real driver (psycopg 3)
  pgbouncer                 # tests: transaction pooling in front of fluxrate
  python3 python3-aiosmtpd  # a real SMTP server for the delivery tests
  libipc-run-perl           # TAP tests (concurrency)
  clang libclang-rt-14-dev  # libFuzzer harnesses of the C parsers (make fuzz, test/scripts/fuzz.sh); the rt package holds libFuzzer itself
)
missing=()
for p in "${PKGS[@]}"; do
  [[ $p == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "fluxrate: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
