/*-------------------------------------------------------------------------
 * ingest_batch.c
 *	  fluxrate.track_batch: up to FR_MAX_BATCH events in a few statements.
 *
 * Each element is read and validated by pure code (ingest_event.c), so its
 * refusal is recorded in place without a subtransaction; meters are looked
 * up once per batch; then the customers are resolved and every valid event is
 * inserted, one statement each (ResolveBatchCustomers, InsertBatch).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <sodium.h>

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "ingest.h"

static SPIPlanPtr plan_meter_token = NULL;
static SPIPlanPtr plan_meter_name = NULL;

/* The batch's meter lookup (once per distinct meter, by SPI): by token or name within org; false if unknown */
static bool
FindMeter(Datum org, TrackInput *in, MeterInfo *m)
{
	Datum		args[2];
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	td;
	int			rc;

	args[0] = org;
	if (in->meter_token != NULL)
	{
		/* a malformed token is an unknown meter, not a type error */
		if (strlen(in->meter_token) != 36)
			return false;
		for (const char *c = in->meter_token; *c; c++)
			if (!(isxdigit((unsigned char) *c) || *c == '-'))
				return false;
		args[1] = DirectFunctionCall1(uuid_in, CStringGetDatum(in->meter_token));
		rc = SPI_execute_plan(FrIngestPrepare(&plan_meter_token,
									  "SELECT id, aggregation_type, property_name, unique_property FROM fluxrate_internal.meters "
									  "WHERE org_id OPERATOR(pg_catalog.=) $1 AND meter_token OPERATOR(pg_catalog.=) $2",
									  2, (Oid[]) {UUIDOID, UUIDOID}), args, NULL, true, 1);
	}
	else
	{
		args[1] = CStringGetTextDatum(in->meter_name);
		rc = SPI_execute_plan(FrIngestPrepare(&plan_meter_name,
									  "SELECT id, aggregation_type, property_name, unique_property FROM fluxrate_internal.meters "
									  "WHERE org_id OPERATOR(pg_catalog.=) $1 AND meter_name OPERATOR(pg_catalog.=) $2",
									  2, (Oid[]) {UUIDOID, TEXTOID}), args, NULL, true, 1);
	}
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "meter lookup failed");
	if (SPI_processed != 1)
		return false;
	tup = SPI_tuptable->vals[0];
	td = SPI_tuptable->tupdesc;
	memcpy(&m->id, DatumGetUUIDP(SPI_getbinval(tup, td, 1, &isnull)), sizeof(pg_uuid_t));
	strlcpy(m->agg, SPI_getvalue(tup, td, 2), sizeof(m->agg));
	m->property = SPI_getvalue(tup, td, 3);
	m->unique_property = SPI_getvalue(tup, td, 4);
	return true;
}

/* The organization: from the API key if one was passed, else from the context */
static Datum
ResolveOrg(FunctionCallInfo fcinfo, int key_arg)
{
	if (!PG_ARGISNULL(key_arg))
	{
		Datum		org,
					key_id;
		ArrayType  *scopes;
		char	   *key = text_to_cstring(PG_GETARG_TEXT_PP(key_arg));

		FrVerifyApiKey(key, &org, &key_id, &scopes);
		if (!FrScopesGrant(scopes, "usage.write"))
			ereport(ERROR,
					(errcode(FR_ERRCODE_FORBIDDEN),
					 errmsg("api key lacks the usage.write scope"),
					 errhint("Create a key with the usage.write scope.")));
		FrSetCurrentOrg(DatumGetCString(DirectFunctionCall1(uuid_out, org)));
		return org;
	}
	return FrRequireOrg("usage.write");
}

/*
 * The per-batch maps (meters, customers, idempotency keys) are keyed by the
 * whole string, however long: the key is a pointer, hashed and compared by
 * content.  (A fixed-size key buffer truncates: until 0.2.0 two meter names
 * sharing their first 126 bytes were one entry, and the second meter's events
 * were booked to the first.)
 */

/* Hash of the C string a key points to */
static uint32
StrPtrHash(const void *key, Size keysize)
{
	const char *str = *(const char *const *) key;

	return hash_bytes((const unsigned char *) str, (int) strlen(str));
}

/* The two C strings the keys point to, compared whole (0 when equal) */
static int
StrPtrMatch(const void *a, const void *b, Size keysize)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* A hash table in the current context whose entries start with a char * key */
static HTAB *
StrPtrTable(const char *name, long nelem, Size entrysize)
{
	HASHCTL		hctl;

	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = sizeof(char *);
	hctl.entrysize = entrysize;
	hctl.hash = StrPtrHash;
	hctl.match = StrPtrMatch;
	hctl.hcxt = CurrentMemoryContext;
	return hash_create(name, nelem, &hctl, HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/* Per-batch cache of meters, by token (one table) or by name (another) */
typedef struct MeterEntry
{
	char	   *key;			/* the token or the name as sent, whole */
	bool		found;
	MeterInfo	m;
} MeterEntry;

/* A customer of the batch, by external id */
typedef struct CustomerEntry
{
	char	   *external_id;
	pg_uuid_t	id;
	bool		known;			/* id is set */
} CustomerEntry;

/* A stored event of one of the batch's idempotency keys */
typedef struct KeyEntry
{
	char	   *key;
	pg_uuid_t	id;
	unsigned char hash[32];
} KeyEntry;

/* One element of a batch on its way to the table */
typedef struct BatchEvent
{
	TrackInput	in;
	MeterInfo  *m;
	Numeric		q;
	TimestampTz ts;
	Jsonb	   *meta;
	pg_uuid_t	customer;
	pg_uuid_t	id;
	unsigned char hash[32];
	/* outcome */
	int			status;			/* 0 pending/created, 1 replay, 2 error */
	int			sqlerrcode;
	char	   *message;
} BatchEvent;

/*
 * Record the error just caught as this element's refusal.  Only for errors of
 * pure validation code (no database access), which need no subtransaction.
 */
static void
RecordCaughtError(BatchEvent *b, MemoryContext ctx)
{
	ErrorData  *ed;

	MemoryContextSwitchTo(ctx);
	ed = CopyErrorData();
	FlushErrorState();
	b->status = 2;
	b->sqlerrcode = ed->sqlerrcode;
	b->message = ed->message;
}

static SPIPlanPtr plan_batch_customers = NULL;
static SPIPlanPtr plan_batch_customers_ins = NULL;
static SPIPlanPtr plan_batch_insert = NULL;
static SPIPlanPtr plan_batch_existing = NULL;
static SPIPlanPtr plan_batch_insert_010 = NULL;	/* 0.1.0's schema, before ALTER EXTENSION UPDATE */
static SPIPlanPtr plan_batch_existing_010 = NULL;

/* qsort comparator of C strings (the batch's external ids, sorted before the create) */
static int
CompareCStrings(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/* A text[] of n C strings (NULL elements for NULL pointers) */
static ArrayType *
TextArray(char **vals, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = (vals[i] == NULL);
		d[i] = vals[i] ? CStringGetTextDatum(vals[i]) : (Datum) 0;
	}
	return construct_md_array(d, nulls, 1, dims, lbs, TEXTOID, -1, false, TYPALIGN_INT);
}

/*
 * Resolve the customers of a batch in at most three statements: the ones that
 * exist, then the new ones created (in sorted order, so concurrent batches
 * queue instead of deadlocking), then those read back.
 *
 * The lookup joins unnest($2) instead of "external_id = ANY ($2)": with a
 * parameter (not a constant) array, the kept generic plan of the ANY form may
 * be a sequential scan testing every row against the whole array linearly
 * (1,000 x 1,000 text comparisons: 18 ms of a batch); the join is a hash join
 * or an index nested loop, about 1 ms.
 */
static void
ResolveBatchCustomers(Datum org, BatchEvent *ev, int n, TimestampTz now)
{
	HTAB	   *map = StrPtrTable("fluxrate batch customers", Max(n, 16), sizeof(CustomerEntry));
	char	  **ids = palloc(sizeof(char *) * Max(n, 1));
	int			nids = 0;

	/* (external ids were checked with the shape: 1 to 255 characters) */
	for (int i = 0; i < n; i++)
	{
		bool		hit;
		CustomerEntry *e;

		if (ev[i].status == 2)
			continue;
		e = hash_search(map, &ev[i].in.customer_external_id, HASH_ENTER, &hit);
		if (!hit)
		{
			e->known = false;
			ids[nids++] = ev[i].in.customer_external_id;
		}
	}
	if (nids == 0)
		return;
	qsort(ids, nids, sizeof(char *), CompareCStrings);

	/*
	 * The deletion locks of the batch's customers (at most 16 buckets) before
	 * they are read (ingest_lock.c): a deletion that committed while this
	 * waited is seen by the lookups below (READ COMMITTED: new snapshots).
	 */
	{
		bool		buckets[FR_EVENT_LOCK_BUCKETS] = {false};

		for (int i = 0; i < nids; i++)
			buckets[FrEventLockBucket(ids[i])] = true;
		FrLockEventBuckets(org, buckets);
	}

	for (int pass = 0; pass < 2; pass++)
	{
		Datum		args[2];
		char	  **missing = palloc(sizeof(char *) * nids);
		int			nmissing = 0;

		args[0] = org;
		args[1] = PointerGetDatum(TextArray(ids, nids));
		if (SPI_execute_plan(FrIngestPrepare(&plan_batch_customers,
									 "SELECT c.external_id, c.id FROM pg_catalog.unnest($2) AS x "
									 "JOIN fluxrate_internal.customers c "
									 "ON c.org_id OPERATOR(pg_catalog.=) $1 AND c.external_id OPERATOR(pg_catalog.=) x",
									 2, (Oid[]) {UUIDOID, TEXTARRAYOID}), args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "customer lookup failed");
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool		isnull;
			char	   *ext = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);
			CustomerEntry *e = hash_search(map, &ext, HASH_FIND, NULL);

			if (e)
			{
				memcpy(&e->id, DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull)), 16);
				e->known = true;
			}
		}
		for (int i = 0; i < nids; i++)
		{
			CustomerEntry *e = hash_search(map, &ids[i], HASH_FIND, NULL);

			if (!e->known)
				missing[nmissing++] = ids[i];
		}
		if (nmissing == 0)
			break;
		if (pass == 1)
			elog(ERROR, "could not resolve %d customers", nmissing);
		/* unknown external ids: create the customers (name = external id, no e-mail) */
		{
			Datum		iargs[3];

			iargs[0] = org;
			iargs[1] = PointerGetDatum(TextArray(missing, nmissing));
			iargs[2] = TimestampTzGetDatum(now);
			if (SPI_execute_plan(FrIngestPrepare(&plan_batch_customers_ins,
										 "INSERT INTO fluxrate_internal.customers (org_id, name, external_id, created_at, updated_at) "
										 "SELECT $1, x, x, $3, $3 FROM pg_catalog.unnest($2) AS x "
										 "ON CONFLICT (org_id, external_id) DO NOTHING",
										 3, (Oid[]) {UUIDOID, TEXTARRAYOID, TIMESTAMPTZOID}), iargs, NULL, false, 0) != SPI_OK_INSERT)
				elog(ERROR, "customer insert failed");
		}
		ids = missing;
		nids = nmissing;
	}
	for (int i = 0; i < n; i++)
	{
		CustomerEntry *e;

		if (ev[i].status == 2)
			continue;
		e = hash_search(map, &ev[i].in.customer_external_id, HASH_FIND, NULL);
		ev[i].customer = e->id;
	}
}

/*
 * Insert every valid event of the batch in one statement.  When every row
 * went in (the usual case) that is all.  Otherwise the stored events of the
 * batch's idempotency keys are read in one statement: a stored id that is the
 * one generated here is an event of this batch; any other is a replay (same
 * payload hash) or a conflict.  (UUIDv7 ids carry 74 random bits; an event
 * without a key can never be skipped by ON CONFLICT.)
 */
static void
InsertBatch(Datum org, BatchEvent *ev, int n, TimestampTz now)
{
	int			k = 0;
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *custs = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *meters = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *qs = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *tss = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *keys = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *keynulls = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *hashes = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *metas = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *metanulls = palloc(sizeof(bool) * Max(n, 1));
	int		   *pos = palloc(sizeof(int) * Max(n, 1));
	int			dims[1];
	int			lbs[1] = {1};
	Datum		args[10];
	char	  **keyed;
	int			nkeyed = 0;
	bool		keys_table;

	for (int i = 0; i < n; i++)
	{
		bytea	   *hb;

		if (ev[i].status == 2)
			continue;
		FrPayloadHash(&ev[i].in, ev[i].m, &ev[i].customer, ev[i].q, ev[i].ts, ev[i].meta, ev[i].hash);
		FrUuidV7(ev[i].id.data, GetCurrentTimestamp());
		hb = palloc(VARHDRSZ + 32);
		SET_VARSIZE(hb, VARHDRSZ + 32);
		memcpy(VARDATA(hb), ev[i].hash, 32);
		ids[k] = UUIDPGetDatum(&ev[i].id);
		custs[k] = UUIDPGetDatum(&ev[i].customer);
		meters[k] = UUIDPGetDatum(&ev[i].m->id);
		qs[k] = NumericGetDatum(ev[i].q);
		tss[k] = TimestampTzGetDatum(ev[i].ts);
		keynulls[k] = (ev[i].in.idempotency_key == NULL);
		keys[k] = keynulls[k] ? (Datum) 0 : CStringGetTextDatum(ev[i].in.idempotency_key);
		hashes[k] = PointerGetDatum(hb);
		metanulls[k] = (ev[i].meta == NULL);
		metas[k] = metanulls[k] ? (Datum) 0 : JsonbPGetDatum(ev[i].meta);
		pos[k] = i;
		k++;
	}
	if (k == 0)
		return;
	dims[0] = k;
	args[0] = org;
	args[1] = TimestampTzGetDatum(now);
	args[2] = PointerGetDatum(construct_array(ids, k, UUIDOID, 16, false, TYPALIGN_CHAR));
	args[3] = PointerGetDatum(construct_array(custs, k, UUIDOID, 16, false, TYPALIGN_CHAR));
	args[4] = PointerGetDatum(construct_array(meters, k, UUIDOID, 16, false, TYPALIGN_CHAR));
	args[5] = PointerGetDatum(construct_array(qs, k, NUMERICOID, -1, false, TYPALIGN_INT));
	args[6] = PointerGetDatum(construct_array(tss, k, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[7] = PointerGetDatum(construct_md_array(keys, keynulls, 1, dims, lbs, TEXTOID, -1, false, TYPALIGN_INT));
	args[8] = PointerGetDatum(construct_array(hashes, k, BYTEAOID, -1, false, TYPALIGN_INT));
	args[9] = PointerGetDatum(construct_md_array(metas, metanulls, 1, dims, lbs, JSONBOID, -1, false, TYPALIGN_INT));
	keys_table = FrEventKeysTable();
	if (SPI_execute_plan(!keys_table ? FrIngestPrepare(&plan_batch_insert_010,
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "SELECT $1, u.id, u.c, u.m, u.q, u.t, $2, u.k, u.h, u.md "
								 "FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6), "
								 "pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9), pg_catalog.unnest($10)) AS u(id, c, m, q, t, k, h, md) "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING",
								 10, (Oid[]) {UUIDOID, TIMESTAMPTZOID, UUIDARRAYOID, UUIDARRAYOID, UUIDARRAYOID,
									 NUMERICARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID, BYTEAARRAYOID, JSONBARRAYOID}) :
						 FrIngestPrepare(&plan_batch_insert,
								 "WITH u AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), "
								 "pg_catalog.unnest($6), pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9), "
								 "pg_catalog.unnest($10)) AS u(id, c, m, q, t, k, h, md)), "
								 "k AS (INSERT INTO fluxrate_internal.usage_event_keys (org_id, idempotency_key, event_id, \"timestamp\", payload_hash) "
								 "SELECT $1, u.k, u.id, u.t, u.h FROM u WHERE u.k IS NOT NULL "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING RETURNING event_id) "
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "SELECT $1, u.id, u.c, u.m, u.q, u.t, $2, u.k, u.h, u.md FROM u "
								 "WHERE u.k IS NULL OR u.id OPERATOR(pg_catalog.=) ANY (SELECT k.event_id FROM k)",
								 10, (Oid[]) {UUIDOID, TIMESTAMPTZOID, UUIDARRAYOID, UUIDARRAYOID, UUIDARRAYOID,
									 NUMERICARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID, BYTEAARRAYOID, JSONBARRAYOID}),
						 args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "usage event batch insert failed");
	if (SPI_processed == (uint64) k)
		return;					/* every event went in */

	/* some keys were taken: read the stored events of the batch's keys once */
	keyed = palloc(sizeof(char *) * k);
	for (int j = 0; j < k; j++)
		if (ev[pos[j]].in.idempotency_key != NULL)
			keyed[nkeyed++] = ev[pos[j]].in.idempotency_key;
	if (nkeyed > 0)
	{
		Datum		gargs[2];
		HTAB	   *bykey;

		gargs[0] = org;
		gargs[1] = PointerGetDatum(TextArray(keyed, nkeyed));
		if (SPI_execute_plan(!keys_table ? FrIngestPrepare(&plan_batch_existing_010,
									 "SELECT e.idempotency_key, e.id, e.payload_hash FROM pg_catalog.unnest($2) AS x "
									 "JOIN fluxrate_internal.usage_events e "
									 "ON e.org_id OPERATOR(pg_catalog.=) $1 AND e.idempotency_key OPERATOR(pg_catalog.=) x",
									 2, (Oid[]) {UUIDOID, TEXTARRAYOID}) :
							 FrIngestPrepare(&plan_batch_existing,
									 "SELECT e.idempotency_key, e.event_id, e.payload_hash FROM pg_catalog.unnest($2) AS x "
									 "JOIN fluxrate_internal.usage_event_keys e "
									 "ON e.org_id OPERATOR(pg_catalog.=) $1 AND e.idempotency_key OPERATOR(pg_catalog.=) x",
									 2, (Oid[]) {UUIDOID, TEXTARRAYOID}), gargs, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read the events of taken idempotency keys");
		bykey = StrPtrTable("fluxrate batch keys", nkeyed, sizeof(KeyEntry));
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool		isnull;
			HeapTuple	tup = SPI_tuptable->vals[r];
			TupleDesc	td = SPI_tuptable->tupdesc;
			char	   *key = SPI_getvalue(tup, td, 1);
			KeyEntry   *e = hash_search(bykey, &key, HASH_ENTER, NULL);
			bytea	   *h = DatumGetByteaPP(SPI_getbinval(tup, td, 3, &isnull));

			memcpy(&e->id, DatumGetUUIDP(SPI_getbinval(tup, td, 2, &isnull)), 16);
			memset(e->hash, 0, 32);
			if (!isnull && VARSIZE_ANY_EXHDR(h) == 32)
				memcpy(e->hash, VARDATA_ANY(h), 32);
		}
		for (int j = 0; j < k; j++)
		{
			BatchEvent *b = &ev[pos[j]];
			KeyEntry   *e;

			if (b->in.idempotency_key == NULL)
				continue;		/* never skipped */
			e = hash_search(bykey, &b->in.idempotency_key, HASH_FIND, NULL);
			if (e != NULL && memcmp(&e->id, &b->id, 16) == 0)
				continue;		/* ours: created */
			if (e != NULL && sodium_memcmp(e->hash, b->hash, 32) == 0)
			{
				b->status = 1;
				memcpy(&b->id, &e->id, 16);
			}
			else
			{
				b->status = 2;
				b->sqlerrcode = FR_ERRCODE_CONFLICT;
				b->message = "idempotency key already used with a different payload";
			}
		}
	}
}

/*
 * The writes of a batch run as fluxrate_system (no row-level security), as
 * track's: every statement carries org, the verified key's or context's
 * organization, and the policy's WITH CHECK would only repeat it once per
 * event (a setting read and a uuid parsed per row: ~8% of a 1,000-event batch).
 */
static void
WriteBatch(Datum org, BatchEvent *ev, int n, TimestampTz now)
{
	Oid			save_user;
	int			save_sec;

	FrBecomeSystem(&save_user, &save_sec);
	PG_TRY();
	{
		ResolveBatchCustomers(org, ev, n, now);
		InsertBatch(org, ev, n, now);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_END_TRY();
}

/*
 * fluxrate.track_batch(events jsonb, api_key text): up to 1,000 events.
 *
 * Set-based, with no subtransaction per event (1,000 subtransactions would
 * overflow the 64 cached subtransaction ids and slow every snapshot in the
 * cluster).  Each event is validated first by code that touches no database
 * state, so its errors are caught and reported in place; meters are looked up
 * once per batch; then the customers are resolved and all valid events are
 * inserted in one statement each, which bad input can no longer make fail
 * (ON CONFLICT DO NOTHING); an idempotency conflict is reported, not raised.
 * A bad event therefore loses none of the others.
 */
PG_FUNCTION_INFO_V1(fr_track_batch);
Datum
fr_track_batch(PG_FUNCTION_ARGS)
{
	Jsonb	   *events;
	Datum		org;
	int			n;
	volatile int created = 0,
				replayed = 0,
				failed = 0;
	JsonbParseState *st = NULL;
	JsonbValue *res;
	MemoryContext caller = CurrentMemoryContext;
	JsonbIterator *it;
	JsonbValue	elem;
	JsonbIteratorToken tok;
	volatile int idx = 0;
	HTAB	   *by_token;
	HTAB	   *by_name;
	TimestampTz now = FrNow();
	BatchEvent *ev;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("events is required"),
				 errhint("Send {\"events\": [{...}, ...]}.")));
	events = PG_GETARG_JSONB_P(0);
	if (!JB_ROOT_IS_ARRAY(events) || JB_ROOT_IS_SCALAR(events))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must be a JSON array")));
	n = JB_ROOT_COUNT(events);
	if (n == 0)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("events is empty")));
	if (n > FR_MAX_BATCH)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("a batch holds at most %d events", FR_MAX_BATCH),
				 errdetail("%d events were sent.", n),
				 errhint("Split the batch.")));
	org = ResolveOrg(fcinfo, 1);
	ev = palloc0(sizeof(BatchEvent) * n);

	by_token = StrPtrTable("fluxrate batch meters by token", 16, sizeof(MeterEntry));
	by_name = StrPtrTable("fluxrate batch meters by name", 16, sizeof(MeterEntry));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* everything of the batch lives until the end of the call */
	MemoryContextSwitchTo(caller);

	it = JsonbIteratorInit(&events->root);
	while ((tok = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
	{
		BatchEvent *volatile b;
		MeterEntry *me = NULL;

		if (tok != WJB_ELEM)
			continue;
		b = &ev[idx++];

		/* 1. shape: pure code, errors caught in place */
		PG_TRY();
		{
			FrReadBatchEvent(JsonbValueToJsonb(&elem), &b->in);
			FrCheckInputShape(&b->in);
		}
		PG_CATCH();
		{
			RecordCaughtError(b, caller);
		}
		PG_END_TRY();
		if (b->status == 2)
			continue;

		/* 2. the meter, once per batch (database access: outside any catch) */
		{
			bool		hit;

			/* a token wins over a name, as in FindMeter; the whole string is the key */
			if (b->in.meter_token != NULL)
				me = hash_search(by_token, &b->in.meter_token, HASH_ENTER, &hit);
			else
				me = hash_search(by_name, &b->in.meter_name, HASH_ENTER, &hit);
			if (!hit)
			{
				me->found = FindMeter(org, &b->in, &me->m);
				MemoryContextSwitchTo(caller);
				if (me->found)
				{
					me->m.property = pstrdup(me->m.property);
					me->m.unique_property = pstrdup(me->m.unique_property);
				}
			}
			if (!me->found)
			{
				b->status = 2;
				b->sqlerrcode = FR_ERRCODE_NOT_FOUND;
				b->message = "meter not found";
				continue;
			}
			b->m = &me->m;
		}

		/* 3. validation against the meter and the clock: pure code again */
		PG_TRY();
		{
			Numeric		q;
			TimestampTz ts;

			b->meta = FrPrepareEvent(&b->in, b->m, now, &q, &ts);
			b->q = q;
			b->ts = ts;
		}
		PG_CATCH();
		{
			RecordCaughtError(b, caller);
		}
		PG_END_TRY();
	}

	/* 4. the writes: customers, then all events, in a few statements */
	WriteBatch(org, ev, n, now);
	SPI_finish();
	MemoryContextSwitchTo(caller);

	/* the result, pushed as a JsonbValue (no text to print and parse again) */
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	FrPushKey(&st, "results");
	pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
	{
		pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		FrPushInt(&st, "index", i);
		if (ev[i].status == 2)
		{
			FrPushString(&st, "status", "error");
			/* unpack_sql_state returns a static buffer: copy (pushJsonbValue keeps pointers) */
			FrPushString(&st, "code", pstrdup(unpack_sql_state(ev[i].sqlerrcode)));
			FrPushString(&st, "message", ev[i].message ? ev[i].message : "error");
			failed++;
		}
		else
		{
			FrPushString(&st, "status", ev[i].status == 1 ? "replay" : "created");
			FrPushUuid(&st, "id", &ev[i].id);
			if (ev[i].status == 1)
				replayed++;
			else
				created++;
		}
		pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	}
	pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	FrPushInt(&st, "created", created);
	FrPushInt(&st, "replayed", replayed);
	FrPushInt(&st, "failed", failed);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	FrIngestSetStatus(created > 0 ? "201" : "200");
	PG_RETURN_JSONB_P(JsonbValueToJsonb(res));
}
