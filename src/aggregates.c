/*-------------------------------------------------------------------------
 * aggregates.c
 *	  Meter aggregates that PostgreSQL does not have, done the way parallel
 *	  query (and Citus) need: transition, combine, serialize and deserialize
 *	  functions, all PARALLEL SAFE.
 *
 *	  unique_count(text)                        exact distinct count, hash-based
 *	  last_value(numeric, timestamptz, timestamptz, uuid)
 *	                                            value of the latest event by
 *	                                            (timestamp, ingested_at, id)
 *
 * Rules followed (notes 2.2): transition and combine functions are non-strict
 * and check AggCheckCallContext; a state is created in the aggregate context;
 * the combine function copies a right-hand state it adopts into that context
 * (a deserialized state lives in a short-lived one); serialized forms carry a
 * version byte and are validated when read back.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "libpq/pqformat.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"

#define FR_AGG_VERSION 1

/* ---- unique_count ------------------------------------------------------ */

typedef struct UniqueKey
{
	char	   *str;			/* NUL-terminated, in the aggregate context */
	int			len;
} UniqueKey;

typedef struct UniqueState
{
	MemoryContext cxt;
	HTAB	   *set;
} UniqueState;

static uint32
UniqueHash(const void *key, Size keysize)
{
	const UniqueKey *k = key;

	return hash_bytes((const unsigned char *) k->str, k->len);
}

static int
UniqueMatch(const void *a, const void *b, Size keysize)
{
	const UniqueKey *x = a;
	const UniqueKey *y = b;

	return (x->len == y->len && memcmp(x->str, y->str, x->len) == 0) ? 0 : 1;
}

static UniqueState *
UniqueNew(MemoryContext cxt)
{
	UniqueState *st = MemoryContextAlloc(cxt, sizeof(UniqueState));
	HASHCTL		hctl;

	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = sizeof(UniqueKey);
	hctl.entrysize = sizeof(UniqueKey);
	hctl.hash = UniqueHash;
	hctl.match = UniqueMatch;
	hctl.hcxt = cxt;
	st->cxt = cxt;
	st->set = hash_create("fluxrate unique_count", 256, &hctl,
						  HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	return st;
}

static void
UniqueAdd(UniqueState *st, const char *s, int len)
{
	UniqueKey	probe = {(char *) s, len};
	bool		found;
	UniqueKey  *e = hash_search(st->set, &probe, HASH_ENTER, &found);

	if (!found)
	{
		/* the entry holds the probe's pointer: give it a copy of its own */
		e->str = MemoryContextAlloc(st->cxt, len + 1);
		memcpy(e->str, s, len);
		e->str[len] = '\0';
		e->len = len;
	}
}

PG_FUNCTION_INFO_V1(fr_unique_count_trans);
Datum
fr_unique_count_trans(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	UniqueState *st = PG_ARGISNULL(0) ? NULL : (UniqueState *) PG_GETARG_POINTER(0);

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_unique_count_trans called in non-aggregate context");
	if (st == NULL)
		st = UniqueNew(aggcxt);
	if (!PG_ARGISNULL(1))		/* events without the property do not count */
	{
		text	   *t = PG_GETARG_TEXT_PP(1);

		UniqueAdd(st, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	}
	PG_RETURN_POINTER(st);
}

PG_FUNCTION_INFO_V1(fr_unique_count_combine);
Datum
fr_unique_count_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	UniqueState *a = PG_ARGISNULL(0) ? NULL : (UniqueState *) PG_GETARG_POINTER(0);
	UniqueState *b = PG_ARGISNULL(1) ? NULL : (UniqueState *) PG_GETARG_POINTER(1);
	HASH_SEQ_STATUS seq;
	UniqueKey  *e;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_unique_count_combine called in non-aggregate context");
	if (b == NULL)
		PG_RETURN_POINTER(a);
	if (a == NULL)
		a = UniqueNew(aggcxt);	/* never adopt b: it may live in a shorter context */
	hash_seq_init(&seq, b->set);
	while ((e = hash_seq_search(&seq)) != NULL)
		UniqueAdd(a, e->str, e->len);
	PG_RETURN_POINTER(a);
}

PG_FUNCTION_INFO_V1(fr_unique_count_final);
Datum
fr_unique_count_final(PG_FUNCTION_ARGS)
{
	UniqueState *st = PG_ARGISNULL(0) ? NULL : (UniqueState *) PG_GETARG_POINTER(0);

	PG_RETURN_NUMERIC(int64_to_numeric(st ? hash_get_num_entries(st->set) : 0));
}

/* version byte, count, then (length, bytes) per value */
PG_FUNCTION_INFO_V1(fr_unique_count_serial);
Datum
fr_unique_count_serial(PG_FUNCTION_ARGS)
{
	UniqueState *st = (UniqueState *) PG_GETARG_POINTER(0);
	StringInfoData buf;
	HASH_SEQ_STATUS seq;
	UniqueKey  *e;

	pq_begintypsend(&buf);
	pq_sendbyte(&buf, FR_AGG_VERSION);
	pq_sendint64(&buf, hash_get_num_entries(st->set));
	hash_seq_init(&seq, st->set);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		pq_sendint32(&buf, e->len);
		pq_sendbytes(&buf, e->str, e->len);
	}
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

PG_FUNCTION_INFO_V1(fr_unique_count_deserial);
Datum
fr_unique_count_deserial(PG_FUNCTION_ARGS)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;
	UniqueState *st;
	int64		n;

	buf.data = VARDATA_ANY(b);
	buf.len = VARSIZE_ANY_EXHDR(b);
	buf.maxlen = buf.len;
	buf.cursor = 0;
	if (pq_getmsgbyte(&buf) != FR_AGG_VERSION)
		elog(ERROR, "unknown unique_count state version");
	st = UniqueNew(CurrentMemoryContext);
	n = pq_getmsgint64(&buf);
	if (n < 0)
		elog(ERROR, "corrupt unique_count state");
	for (int64 i = 0; i < n; i++)
	{
		int			len = pq_getmsgint(&buf, 4);

		if (len < 0 || len > buf.len - buf.cursor)
			elog(ERROR, "corrupt unique_count state");
		UniqueAdd(st, pq_getmsgbytes(&buf, len), len);
	}
	pq_getmsgend(&buf);
	PG_RETURN_POINTER(st);
}

/* ---- last_value -------------------------------------------------------- */

typedef struct LastState
{
	TimestampTz ts;
	TimestampTz ingested;
	pg_uuid_t	id;
	Numeric		value;			/* in the aggregate context */
} LastState;

/* Is (ts, ingested, id) later than the state's? Ties: later ingestion wins, then the larger id */
static bool
LastIsNewer(LastState *st, TimestampTz ts, TimestampTz ingested, const pg_uuid_t *id)
{
	if (ts != st->ts)
		return ts > st->ts;
	if (ingested != st->ingested)
		return ingested > st->ingested;
	return memcmp(id->data, st->id.data, 16) > 0;
}

static void
LastSet(LastState *st, MemoryContext cxt, Numeric v, TimestampTz ts, TimestampTz ingested, const pg_uuid_t *id)
{
	Size		sz = VARSIZE(v);

	st->ts = ts;
	st->ingested = ingested;
	memcpy(&st->id, id, 16);
	st->value = MemoryContextAlloc(cxt, sz);
	memcpy(st->value, v, sz);
}

PG_FUNCTION_INFO_V1(fr_last_value_trans);
Datum
fr_last_value_trans(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	LastState  *st = PG_ARGISNULL(0) ? NULL : (LastState *) PG_GETARG_POINTER(0);
	Numeric		v;
	TimestampTz ts,
				ing;
	pg_uuid_t  *id;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_last_value_trans called in non-aggregate context");
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3) || PG_ARGISNULL(4))
		PG_RETURN_POINTER(st);
	v = PG_GETARG_NUMERIC(1);
	ts = PG_GETARG_TIMESTAMPTZ(2);
	ing = PG_GETARG_TIMESTAMPTZ(3);
	id = PG_GETARG_UUID_P(4);
	if (st == NULL)
	{
		st = MemoryContextAllocZero(aggcxt, sizeof(LastState));
		LastSet(st, aggcxt, v, ts, ing, id);
	}
	else if (LastIsNewer(st, ts, ing, id))
		LastSet(st, aggcxt, v, ts, ing, id);
	PG_RETURN_POINTER(st);
}

PG_FUNCTION_INFO_V1(fr_last_value_combine);
Datum
fr_last_value_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	LastState  *a = PG_ARGISNULL(0) ? NULL : (LastState *) PG_GETARG_POINTER(0);
	LastState  *b = PG_ARGISNULL(1) ? NULL : (LastState *) PG_GETARG_POINTER(1);

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_last_value_combine called in non-aggregate context");
	if (b == NULL)
		PG_RETURN_POINTER(a);
	if (a == NULL)
	{
		a = MemoryContextAllocZero(aggcxt, sizeof(LastState));
		LastSet(a, aggcxt, b->value, b->ts, b->ingested, &b->id);
	}
	else if (LastIsNewer(a, b->ts, b->ingested, &b->id))
		LastSet(a, aggcxt, b->value, b->ts, b->ingested, &b->id);
	PG_RETURN_POINTER(a);
}

PG_FUNCTION_INFO_V1(fr_last_value_final);
Datum
fr_last_value_final(PG_FUNCTION_ARGS)
{
	LastState  *st = PG_ARGISNULL(0) ? NULL : (LastState *) PG_GETARG_POINTER(0);

	if (st == NULL)
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(st->value);
}

/* version byte, ts, ingested, id, numeric varlena */
PG_FUNCTION_INFO_V1(fr_last_value_serial);
Datum
fr_last_value_serial(PG_FUNCTION_ARGS)
{
	LastState  *st = (LastState *) PG_GETARG_POINTER(0);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendbyte(&buf, FR_AGG_VERSION);
	pq_sendint64(&buf, st->ts);
	pq_sendint64(&buf, st->ingested);
	pq_sendbytes(&buf, (char *) st->id.data, 16);
	pq_sendint32(&buf, VARSIZE(st->value));
	pq_sendbytes(&buf, (char *) st->value, VARSIZE(st->value));
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

PG_FUNCTION_INFO_V1(fr_last_value_deserial);
Datum
fr_last_value_deserial(PG_FUNCTION_ARGS)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;
	LastState  *st = palloc0(sizeof(LastState));
	int			sz;

	buf.data = VARDATA_ANY(b);
	buf.len = VARSIZE_ANY_EXHDR(b);
	buf.maxlen = buf.len;
	buf.cursor = 0;
	if (pq_getmsgbyte(&buf) != FR_AGG_VERSION)
		elog(ERROR, "unknown last_value state version");
	st->ts = pq_getmsgint64(&buf);
	st->ingested = pq_getmsgint64(&buf);
	memcpy(st->id.data, pq_getmsgbytes(&buf, 16), 16);
	sz = pq_getmsgint(&buf, 4);
	if (sz < VARHDRSZ || sz > buf.len - buf.cursor)
		elog(ERROR, "corrupt last_value state");
	st->value = palloc(sz);
	memcpy(st->value, pq_getmsgbytes(&buf, sz), sz);
	if (VARSIZE(st->value) != sz)
		elog(ERROR, "corrupt last_value state");
	pq_getmsgend(&buf);
	PG_RETURN_POINTER(st);
}
