/*-------------------------------------------------------------------------
 * ingest_track.c
 *	  fluxrate.track: one event, the hot path.
 *
 * One event = resolve the meter (by token or by name), resolve or create the
 * customer, validate the quantity, and insert the key into usage_event_keys
 * (ON CONFLICT (org_id, idempotency_key) DO NOTHING) and the event into
 * usage_events only if the key went in, in one statement, all in the
 * caller's transaction: the event exists if and only if the caller commits.
 * Idempotency is exact and has no expiry: the key table's primary key is the
 * arbiter (usage_events is partitioned by time and cannot hold a unique key
 * without it: 32_partitions.sql).
 * A conflict is a replay when the payload hash matches (the original event is
 * returned, HTTP 200) and a PT409 conflict otherwise (nothing written).
 *
 * Every query is prepared once per backend and kept (SPI_keepplan); the
 * quantity stays numeric from the argument to the row, never a float.
 * fluxrate.track reads the key, meter and customer rows through the
 * per-backend row caches (ingest_cache.c), validates in ingest_event.c and
 * writes as fluxrate_system.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "ingest.h"

static SPIPlanPtr plan_customer = NULL;
static SPIPlanPtr plan_customer_ins = NULL;
static SPIPlanPtr plan_event_ins = NULL;
static SPIPlanPtr plan_event_get = NULL;
static SPIPlanPtr plan_event_ins_010 = NULL;
static SPIPlanPtr plan_event_get_010 = NULL;

/*
 * Whether the schema is 0.2.0's, with usage_event_keys (32_partitions.sql), or
 * still 0.1.0's (one unpartitioned table with a unique key), as between the
 * installation of this library and ALTER EXTENSION fluxrate UPDATE: one
 * library serves both scripts.  Two syscache probes per call, so a backend
 * that started before the update writes the new way as soon as it is done.
 */
bool
FrEventKeysTable(void)
{
	Oid			nsp = get_namespace_oid("fluxrate_internal", true);

	return OidIsValid(nsp) && OidIsValid(get_relname_relid("usage_event_keys", nsp));
}

/* The plan kept in *slot, prepared and kept (SPI_keepplan) on first use */
SPIPlanPtr
FrIngestPrepare(SPIPlanPtr *slot, const char *sql, int nargs, Oid *types)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*slot = p;
	}
	return *slot;
}

/* Set response.status for PostgREST (local to the transaction) */
void
FrIngestSetStatus(const char *status)
{
	(void) set_config_option("response.status", status, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/* FrApiKeyTouch as fluxrate_system (api_keys is not the organization's to write) */
static void
TouchKeyAsSystem(Datum org, Datum key_id, TimestampTz now)
{
	Oid			save_user;
	int			save_sec;

	FrBecomeSystem(&save_user, &save_sec);
	PG_TRY();
	{
		FrApiKeyTouch(org, key_id, now);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_END_TRY();
}

/*
 * fluxrate.track with an API key: verify the key (a revocation whose commit
 * returned before this call is seen: see "Row caches" in ingest_cache.c), check the scope, then
 * look up the meter and the customer of the key's organization.  Inside SPI.
 *
 * fluxrate.current_org is not set: nothing on this path reads it (the writes
 * run as fluxrate_system with the key's organization in every statement).
 */
static Datum
LookupWithKey(const char *key, TrackInput *in, TimestampTz now, Lookup *lk)
{
	unsigned char hash[32];
	bytea	   *hash_datum = FrApiKeyHash(key, hash);
	pg_uuid_t  *org = palloc(sizeof(pg_uuid_t));
	KeyRow		kr;

	if (!FrLookupKey(hash, hash_datum, &kr))
		FrApiKeyAcceptHash(hash, NULL, false);
	/* the hash table or the index found it by equality; compare again in constant time */
	FrApiKeyAcceptHash(hash, kr.stored_ok ? kr.stored_hash : NULL, kr.active);
	memcpy(org, &kr.org, sizeof(pg_uuid_t));

	/*
	 * The customer's deletion lock before the customer is read (ingest_lock.c),
	 * then the key again: an organization deleted while this waited has taken
	 * its keys along (PT401), and the invalidations it queued drop the caches.
	 */
	if (in->customer_external_id != NULL)
	{
		FrLockCustomerEvents(UUIDPGetDatum(org), in->customer_external_id);
		AcceptInvalidationMessages();
		if (!FrLookupKey(hash, hash_datum, &kr))
			FrApiKeyAcceptHash(hash, NULL, false);
		FrApiKeyAcceptHash(hash, kr.stored_ok ? kr.stored_hash : NULL, kr.active);
	}

	/* last_used_at at most once a minute */
	if (kr.last_used_null || kr.last_used < now - USECS_PER_MINUTE)
		TouchKeyAsSystem(UUIDPGetDatum(org), UUIDPGetDatum(&kr.id), now);

	if (!kr.grants_write)
		ereport(ERROR,
				(errcode(FR_ERRCODE_FORBIDDEN),
				 errmsg("api key lacks the usage.write scope"),
				 errhint("Create a key with the usage.write scope.")));
	FrLookupMeterAndCustomer(UUIDPGetDatum(org), in, lk);
	return UUIDPGetDatum(org);
}

/* PT404 for the meter the event names (by token or by name) */
static void
RaiseMeterNotFound(TrackInput *in)
{
	ereport(ERROR,
			(errcode(FR_ERRCODE_NOT_FOUND),
			 errmsg("meter not found"),
			 in->meter_token ?
			 errdetail("No meter has meter_token \"%s\" in this organization.", in->meter_token) :
			 errdetail("No meter is named \"%s\" in this organization.", in->meter_name)));
}

/* Find the customer by external id, creating it if it is new (race-safe) */
static void
ResolveCustomer(Datum org, const char *external_id, TimestampTz now, pg_uuid_t *out)
{
	Datum		args[3];
	bool		isnull;

	args[0] = org;
	args[1] = CStringGetTextDatum(external_id);
	args[2] = TimestampTzGetDatum(now);
	for (int attempt = 0; attempt < 2; attempt++)
	{
		if (SPI_execute_plan(FrIngestPrepare(&plan_customer,
									 "SELECT id FROM fluxrate_internal.customers "
									 "WHERE org_id OPERATOR(pg_catalog.=) $1 AND external_id OPERATOR(pg_catalog.=) $2",
									 2, (Oid[]) {UUIDOID, TEXTOID}), args, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "customer lookup failed");
		if (SPI_processed == 1)
			break;
		/* unknown external id: create the customer (name = external id, no e-mail) */
		if (SPI_execute_plan(FrIngestPrepare(&plan_customer_ins,
									 "INSERT INTO fluxrate_internal.customers (org_id, name, external_id, created_at, updated_at) "
									 "VALUES ($1, $2, $2, $3, $3) ON CONFLICT (org_id, external_id) DO NOTHING RETURNING id",
									 3, (Oid[]) {UUIDOID, TEXTOID, TIMESTAMPTZOID}), args, NULL, false, 1) != SPI_OK_INSERT_RETURNING)
			elog(ERROR, "customer insert failed");
		if (SPI_processed == 1)
			break;
		/* a concurrent track created it first: read it again */
	}
	if (SPI_processed != 1)
		elog(ERROR, "could not resolve customer \"%s\"", external_id);
	memcpy(out, DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)),
		   sizeof(pg_uuid_t));
}

typedef enum EventStatus
{
	EV_CREATED,
	EV_REPLAY,
	EV_CONFLICT
} EventStatus;

/* The stored event (new, or the original one on a replay) */
typedef struct StoredEvent
{
	pg_uuid_t	id;
	pg_uuid_t	customer;
	pg_uuid_t	meter;
	Numeric		quantity;
	TimestampTz ts;
	TimestampTz ingested;
	Jsonb	   *meta;
} StoredEvent;

/*
 * Insert the event, idempotently.  A conflict is returned, not raised, so the
 * batch path can report it without a subtransaction.  Inside SPI.
 */
static EventStatus
WriteEvent(Datum org, TrackInput *in, MeterInfo *m, pg_uuid_t *customer, Numeric q, TimestampTz ts,
		   TimestampTz now, Jsonb *meta, StoredEvent *out)
{
	unsigned char hash[32];
	bytea	   *hb;
	Datum		args[10];
	char		nulls[10];
	bool		keys;

	FrPayloadHash(in, m, customer, q, ts, meta, hash);
	hb = palloc(VARHDRSZ + 32);
	SET_VARSIZE(hb, VARHDRSZ + 32);
	memcpy(VARDATA(hb), hash, 32);

	FrUuidV7(out->id.data, GetCurrentTimestamp());
	memset(nulls, ' ', sizeof(nulls));
	args[0] = org;
	args[1] = UUIDPGetDatum(&out->id);
	args[2] = UUIDPGetDatum(customer);
	args[3] = UUIDPGetDatum(&m->id);
	args[4] = NumericGetDatum(q);
	args[5] = TimestampTzGetDatum(ts);
	args[6] = TimestampTzGetDatum(now);
	args[7] = in->idempotency_key ? CStringGetTextDatum(in->idempotency_key) : (Datum) 0;
	nulls[7] = in->idempotency_key ? ' ' : 'n';
	args[8] = PointerGetDatum(hb);
	args[9] = meta ? JsonbPGetDatum(meta) : (Datum) 0;
	nulls[9] = meta ? ' ' : 'n';
	keys = FrEventKeysTable();
	if (SPI_execute_plan(!keys ? FrIngestPrepare(&plan_event_ins_010,
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING",
								 10, (Oid[]) {UUIDOID, UUIDOID, UUIDOID, UUIDOID, NUMERICOID, TIMESTAMPTZOID,
									 TIMESTAMPTZOID, TEXTOID, BYTEAOID, JSONBOID}) :
						 FrIngestPrepare(&plan_event_ins,
								 "WITH k AS (INSERT INTO fluxrate_internal.usage_event_keys "
								 "(org_id, idempotency_key, event_id, \"timestamp\", payload_hash) "
								 "SELECT $1, $8, $2, $6, $9 WHERE $8 IS NOT NULL "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING RETURNING 1) "
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 "
								 "WHERE $8 IS NULL OR EXISTS (SELECT FROM k)",
								 10, (Oid[]) {UUIDOID, UUIDOID, UUIDOID, UUIDOID, NUMERICOID, TIMESTAMPTZOID,
									 TIMESTAMPTZOID, TEXTOID, BYTEAOID, JSONBOID}),
						 args, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "usage event insert failed");
	if (SPI_processed == 1)
	{
		out->customer = *customer;
		out->meter = m->id;
		out->quantity = q;
		out->ts = ts;
		out->ingested = now;
		out->meta = meta;
		return EV_CREATED;
	}

	/* the key exists: a replay of the same payload, or a conflicting reuse */
	{
		Datum		gargs[2];
		HeapTuple	tup;
		TupleDesc	td;
		bool		isnull;
		bytea	   *stored;
		Datum		d;

		gargs[0] = org;
		gargs[1] = args[7];
		if (SPI_execute_plan(!keys ? FrIngestPrepare(&plan_event_get_010,
									 "SELECT id, customer_id, meter_id, quantity, \"timestamp\", ingested_at, payload_hash, metadata, true "
									 "FROM fluxrate_internal.usage_events "
									 "WHERE org_id OPERATOR(pg_catalog.=) $1 AND idempotency_key OPERATOR(pg_catalog.=) $2",
									 2, (Oid[]) {UUIDOID, TEXTOID}) :
							 FrIngestPrepare(&plan_event_get,
									 "SELECT k.event_id, e.customer_id, e.meter_id, e.quantity, k.\"timestamp\", e.ingested_at, "
									 "k.payload_hash, e.metadata, e.id IS NOT NULL "
									 "FROM fluxrate_internal.usage_event_keys k "
									 "LEFT JOIN fluxrate_internal.usage_events e ON e.org_id OPERATOR(pg_catalog.=) k.org_id "
									 "AND e.id OPERATOR(pg_catalog.=) k.event_id AND e.\"timestamp\" OPERATOR(pg_catalog.=) k.\"timestamp\" "
									 "WHERE k.org_id OPERATOR(pg_catalog.=) $1 AND k.idempotency_key OPERATOR(pg_catalog.=) $2",
									 2, (Oid[]) {UUIDOID, TEXTOID}), gargs, NULL, false, 1) != SPI_OK_SELECT ||
			SPI_processed != 1)
			elog(ERROR, "could not read the event of idempotency key \"%s\"", in->idempotency_key);
		tup = SPI_tuptable->vals[0];
		td = SPI_tuptable->tupdesc;
		d = SPI_getbinval(tup, td, 7, &isnull);
		stored = isnull ? NULL : DatumGetByteaPP(d);
		if (stored == NULL || VARSIZE_ANY_EXHDR(stored) != 32 ||
			sodium_memcmp(VARDATA_ANY(stored), hash, 32) != 0)
			return EV_CONFLICT;
		memcpy(&out->id, DatumGetUUIDP(SPI_getbinval(tup, td, 1, &isnull)), 16);
		out->ts = DatumGetTimestampTz(SPI_getbinval(tup, td, 5, &isnull));
		if (!DatumGetBool(SPI_getbinval(tup, td, 9, &isnull)))
		{
			/*
			 * The key outlives its event (retention archived the event's month,
			 * 33_retention.sql): the payload hash matched, so meter, customer,
			 * quantity and metadata are the ones sent now; id and time are the
			 * key's.  The ingestion time is gone with the row: the event time.
			 */
			out->customer = *customer;
			out->meter = m->id;
			out->quantity = q;
			out->ingested = out->ts;
			out->meta = meta;
			return EV_REPLAY;
		}
		memcpy(&out->customer, DatumGetUUIDP(SPI_getbinval(tup, td, 2, &isnull)), 16);
		memcpy(&out->meter, DatumGetUUIDP(SPI_getbinval(tup, td, 3, &isnull)), 16);
		out->quantity = DatumGetNumeric(SPI_getbinval(tup, td, 4, &isnull));
		out->ingested = DatumGetTimestampTz(SPI_getbinval(tup, td, 6, &isnull));
		d = SPI_getbinval(tup, td, 8, &isnull);
		out->meta = isnull ? NULL : DatumGetJsonbP(d);
		return EV_REPLAY;
	}
}

/* PT409: the idempotency key names an event with another payload */
static void
RaiseConflict(TrackInput *in)
{
	ereport(ERROR,
			(errcode(FR_ERRCODE_CONFLICT),
			 errmsg("idempotency key already used with a different payload"),
			 errdetail("idempotency_key \"%s\" names an event with another meter, customer, quantity, timestamp or metadata.",
					   in->idempotency_key),
			 errhint("Use a new idempotency_key for a new event; resend the same payload to retry.")));
}

/*
 * Record one event for org.  Returns the event as jsonb; *replay tells a replay
 * from a new event.  Must run inside an SPI connection.
 */
static Jsonb *
TrackOne(Datum org, TrackInput *in, Lookup *lk, TimestampTz now, bool *replay)
{
	Numeric		q;
	TimestampTz ts;
	Jsonb	   *meta;
	StoredEvent ev;
	volatile EventStatus st = EV_CREATED;
	Oid			save_user;
	int			save_sec;

	FrCheckInputShape(in);
	if (!lk->meter_found)
		RaiseMeterNotFound(in);
	meta = FrPrepareEvent(in, &lk->m, now, &q, &ts);

	/*
	 * The writes run as fluxrate_system, which bypasses row-level security:
	 * every statement carries org (the verified key's organization, or the
	 * verified context's) and the meter and customer were found within it, so
	 * the policy's WITH CHECK (org_id = current_org_id()) could only repeat
	 * what C just set, at the cost of a setting to publish and an expression
	 * to evaluate per event.
	 */
	FrBecomeSystem(&save_user, &save_sec);
	PG_TRY();
	{
		/* an unknown external id: create the customer (race-safe) */
		if (!lk->customer_found)
			ResolveCustomer(org, in->customer_external_id, now, &lk->customer);
		st = WriteEvent(org, in, &lk->m, &lk->customer, q, ts, now, meta, &ev);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_END_TRY();
	if (st == EV_CONFLICT)
		RaiseConflict(in);
	*replay = (st == EV_REPLAY);
	return FrEventJson(&ev.id, &ev.customer, &ev.meter, ev.quantity, ev.ts, ev.ingested,
					 in->idempotency_key, ev.meta, *replay);
}

/* Argument n as a C string, or NULL */
static char *
ArgText(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/* pg_catalog only: see fr_track */
static OverrideSearchPath pinned_path = {NIL, true, false, 0};

/* fluxrate.track(meter_token, customer_external_id, quantity, timestamp, idempotency_key, metadata, meter_name, properties, api_key) */
PG_FUNCTION_INFO_V1(fr_track);
Datum
fr_track(PG_FUNCTION_ARGS)
{
	TrackInput	in;
	Datum		org;
	bool		replay;
	Jsonb	   *result;
	Lookup		lk;
	TimestampTz now = FrNow();
	MemoryContext caller = CurrentMemoryContext;

	in.meter_token = ArgText(fcinfo, 0);
	in.customer_external_id = ArgText(fcinfo, 1);
	in.quantity = PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2);
	in.has_ts = !PG_ARGISNULL(3);
	in.ts = in.has_ts ? PG_GETARG_TIMESTAMPTZ(3) : 0;
	in.idempotency_key = ArgText(fcinfo, 4);
	in.metadata = PG_ARGISNULL(5) ? NULL : PG_GETARG_JSONB_P(5);
	in.meter_name = ArgText(fcinfo, 6);
	in.properties = PG_ARGISNULL(7) ? NULL : PG_GETARG_JSONB_P(7);

	/*
	 * fluxrate.track is not SECURITY DEFINER ... SET search_path (that cost a
	 * GUC nest level, a search_path set and reset, and the namespace search
	 * path computed twice, per call).  Instead, everything in it resolves
	 * names through pg_catalog alone (no temp schema either): a kept SPI plan
	 * is re-planned under the search path active when it is revalidated (in
	 * PostgreSQL 15 it does not keep its own), so the caller's search path
	 * never reaches one.  The writes switch to fluxrate_system themselves
	 * (TrackOne), as the key lookups never needed a role: they are direct
	 * index scans.  An error pops the override (AtEOXact_Namespace).
	 */
	PushOverrideSearchPath(&pinned_path);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/*
	 * Changes committed before this call (a revoked key, a deleted meter or
	 * customer) drop the row caches now, not at the next lock this
	 * transaction happens to take: see "Row caches" in ingest_cache.c.  Cheap when none is
	 * pending (one unlocked test of a shared flag).
	 */
	AcceptInvalidationMessages();
	/* the key (if any), the meter and the customer: row caches or direct index lookups */
	if (!PG_ARGISNULL(8))
		org = LookupWithKey(text_to_cstring(PG_GETARG_TEXT_PP(8)), &in, now, &lk);
	else
	{
		org = FrRequireOrg("usage.write");
		/* the customer's deletion lock before the customer is read (ingest_lock.c) */
		if (in.customer_external_id != NULL)
		{
			FrLockCustomerEvents(org, in.customer_external_id);
			AcceptInvalidationMessages();
		}
		FrLookupMeterAndCustomer(org, &in, &lk);
	}
	result = TrackOne(org, &in, &lk, now, &replay);
	{
		MemoryContext spi = MemoryContextSwitchTo(caller);

		result = (Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(result));
		MemoryContextSwitchTo(spi);
	}
	SPI_finish();
	PopOverrideSearchPath();
	FrIngestSetStatus(replay ? "200" : "201");
	PG_RETURN_JSONB_P(result);
}

