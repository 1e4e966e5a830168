/*-------------------------------------------------------------------------
 * ingest.h
 *	  What the parts of ingestion share (fluxrate.track, fluxrate.track_batch).
 *
 * Ingestion is split by phase, pgvector's habit (ivfbuild.c, ivfinsert.c, ...):
 *	  ingest_track.c  fluxrate.track: one event, from the key to the row
 *	  ingest_batch.c  fluxrate.track_batch: how a batch is looked up and written
 *	  ingest_event.c  one event's fields, validation, quantity, payload hash and
 *	                  result JSON; the batch element reader (no database access)
 *	  ingest_cache.c  the per-backend row caches of keys, meters and customers,
 *	                  the direct index lookups behind them, and when they are
 *	                  flushed (the invalidation trigger)
 *-------------------------------------------------------------------------
 */
#ifndef FLUXRATE_INGEST_H
#define FLUXRATE_INGEST_H

#include "fluxrate.h"

#include "executor/spi.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/uuid.h"

/*
 * The bounds of the ingest path, one rule each (docs/security.md, "Ingestion
 * bounds", proves that no rollup, sum or rating can overflow under them).
 */
#define FR_MAX_METADATA		16384	/* bytes of metadata (and of properties) */
#define FR_MAX_SCALE		12		/* decimal places of a quantity */
#define FR_MAX_QUANTITY_DIGITS 18	/* |quantity| < 10^18: at most 18 integer digits */
#define FR_MAX_BATCH		1000	/* events of one track_batch call */
#define FR_MAX_IDENT_CHARS	255		/* characters of meter_name, customer_external_id, idempotency_key */
#define FR_FUTURE_SLACK		(5 * 60 * USECS_PER_SEC)	/* an event may be this far ahead of the clock */
/*
 * The earliest event timestamp: 2000-01-01 00:00:00 UTC, which is PostgreSQL's
 * own epoch (TimestampTz 0), so the check is one comparison with zero.
 */
#define FR_MIN_EVENT_TS		((TimestampTz) 0)

/* One event as sent, to track's arguments or as one element of a batch */
typedef struct TrackInput
{
	char	   *meter_token;
	char	   *meter_name;
	char	   *customer_external_id;
	Numeric		quantity;		/* NULL if not sent */
	bool		has_ts;
	TimestampTz ts;
	char	   *idempotency_key;
	Jsonb	   *metadata;		/* NULL if not sent */
	Jsonb	   *properties;		/* NULL if not sent */
} TrackInput;

/* What ingestion needs of a meter's row */
typedef struct MeterInfo
{
	pg_uuid_t	id;
	char		agg[16];
	char	   *property;
	char	   *unique_property;
} MeterInfo;

/* What fluxrate.track's lookups (row caches or index probes) found */
typedef struct Lookup
{
	bool		meter_found;
	MeterInfo	m;
	bool		customer_found;
	pg_uuid_t	customer;
} Lookup;

/* What track needs of an API key's row */
typedef struct KeyRow
{
	pg_uuid_t	org;
	pg_uuid_t	id;
	unsigned char stored_hash[32];
	bool		stored_ok;		/* the stored hash has 32 bytes */
	bool		active;
	bool		grants_write;
	bool		last_used_null;
	TimestampTz last_used;
} KeyRow;

/* ingest_track.c */
extern SPIPlanPtr FrIngestPrepare(SPIPlanPtr *slot, const char *sql, int nargs, Oid *types);
extern void FrIngestSetStatus(const char *status);
extern bool FrEventKeysTable(void);

/* ingest_cache.c */
extern bool FrLookupKey(const unsigned char hash[32], bytea *hash_datum, KeyRow *kr);
extern void FrLookupMeterAndCustomer(Datum org, TrackInput *in, Lookup *lk);
/* ingest_lock.c */
extern uint32 FrEventLockBucket(const char *external_id);
extern void FrLockEventBuckets(Datum org, const bool *buckets);
extern void FrLockCustomerEvents(Datum org, const char *external_id);
#define FR_EVENT_LOCK_BUCKETS	16

/* ingest_event.c: pure code, no database access (the batch catches its errors in place) */
extern void FrReadBatchEvent(Jsonb *ev, TrackInput *in);
extern bool FrLooksNumeric(const char *s);
extern bool FrIdentFits(const char *s);
extern void FrCheckQuantity(Numeric q, const char *agg);
extern void FrCheckInputShape(TrackInput *in);
extern Jsonb *FrPrepareEvent(TrackInput *in, MeterInfo *m, TimestampTz now, Numeric *q_out,
							 TimestampTz *ts_out);
extern void FrPayloadHash(TrackInput *in, MeterInfo *m, pg_uuid_t *customer, Numeric q,
						  TimestampTz ts, Jsonb *meta, unsigned char hash[32]);
extern void FrPushKey(JsonbParseState **st, const char *key);
extern void FrPushString(JsonbParseState **st, const char *key, const char *val);
extern void FrPushUuid(JsonbParseState **st, const char *key, pg_uuid_t *u);
extern void FrPushInt(JsonbParseState **st, const char *key, int val);
extern Jsonb *FrEventJson(pg_uuid_t *id, pg_uuid_t *customer, pg_uuid_t *meter, Numeric q,
						  TimestampTz ts, TimestampTz ingested, const char *key, Jsonb *meta,
						  bool replay);

#endif							/* FLUXRATE_INGEST_H */
