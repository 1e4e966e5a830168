# fluxrate: PGXS build.  See README.md "Layout" for the role of each directory.
# fluxrate_router: the PL/Proxy router of a sharded set-up, a second extension
# with its own version (src/router/, docs/scale-out.md)
EXTENSION   = fluxrate fluxrate_router
EXTVERSION  = 0.1.0
ROUTER_VERSION = 0.1.0
MODULE_big  = fluxrate
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# The install script is assembled from the concern-by-concern parts in
# src/sql/NN_*.sql (in numeric order) into one versioned script, the way
# pgvector copies sql/vector.sql.  Upgrade scripts live in src/sql/upgrade.
SQL_PARTS   = $(sort $(wildcard src/sql/[0-9][0-9]_*.sql))
DATA_built  = build/fluxrate--$(EXTVERSION).sql build/fluxrate_router--$(ROUTER_VERSION).sql
DATA        = $(wildcard src/sql/upgrade/fluxrate--*--*.sql)
ROUTER_PARTS = $(sort $(wildcard src/router/[0-9][0-9]_*.sql))

PG_CONFIG  ?= pg_config
# Warnings are errors by default (CI builds this way); packagers may pass WERROR=.
WERROR     ?= -Werror
PG_CPPFLAGS = -I$(srcdir)/src -DFR_VERSION='"$(EXTVERSION)"'
PG_CFLAGS   = -std=gnu11 -Wall -Wextra $(WERROR) -Wno-unused-parameter \
              -Wno-sign-compare -Wno-missing-field-initializers
# libsodium: randomness, keyed BLAKE2b, argon2id, secretbox.
# OpenSSL libcrypto: HMAC-SHA256 (JWT HS256, webhook signatures).
# libcurl: SMTP and webhook delivery.
SHLIB_LINK  = -lsodium -lcrypto -lcurl

EXTRA_CLEAN = build results regression.diffs regression.out

all: $(DATA_built)

build/fluxrate--$(EXTVERSION).sql: $(SQL_PARTS)
	@mkdir -p build
	( echo '-- fluxrate $(EXTVERSION): generated from src/sql/*.sql by make; do not edit.'; \
	  printf '%s\n' '\echo Use "CREATE EXTENSION fluxrate" to load this file. \quit'; \
	  for f in $(SQL_PARTS); do echo; echo "-- ==== $$f ===="; cat $$f; done ) > $@

build/fluxrate_router--$(ROUTER_VERSION).sql: $(ROUTER_PARTS)
	@mkdir -p build
	( echo '-- fluxrate_router $(ROUTER_VERSION): generated from src/router/*.sql by make; do not edit.'; \
	  printf '%s\n' '\echo Use "CREATE EXTENSION fluxrate_router" to load this file. \quit'; \
	  for f in $(ROUTER_PARTS); do echo; echo "-- ==== $$f ===="; cat $$f; done ) > $@

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# ---- the two commands of the README ---------------------------------------
.PHONY: test demo bench deps
deps:
	bash test/deps.sh
test:
	bash test/run.sh
demo:
	bash test/demo.sh
bench:
	bash bench/run.sh
