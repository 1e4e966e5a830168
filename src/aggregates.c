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
 *	  weighted_sum(numeric, timestamptz, timestamptz, uuid, timestamptz, timestamptz)
 *	                                            time-weighted level over a period,
 *	                                            in quantity x hours
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
#include "common/int.h"
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

/* ---- weighted_sum ------------------------------------------------------ */

/*
 * weighted_sum(quantity, ts, ingested_at, id, period_start, period_end)
 *
 * Each event sets the level until the next event (by ts, then ingested_at,
 * then id); the level at period_start is the latest event before it (carried
 * across the boundary); the result is the sum of level x hours up to
 * period_end.  The state keeps that one carried-in point and every point in
 * [period_start, period_end); points at or after period_end are dropped.
 *
 * Arithmetic is numeric only, and the same operations, in the same order, as
 * the SQL it replaces: per segment, level * seconds / 3600, where seconds is
 * the int64 microsecond difference / 10^6 as a numeric of scale 6 (exactly
 * what extract(epoch FROM t2 - t1) gives), then the segments are added.
 * A segment of length zero (an event superseded at the same instant) is still
 * added, as a zero: it keeps the scale of the result identical.
 */

typedef struct WPoint
{
	TimestampTz ts;
	TimestampTz ingested;
	pg_uuid_t	id;
	Numeric		q;				/* in the state's context */
} WPoint;

typedef struct WeightedState
{
	MemoryContext cxt;
	TimestampTz start;
	TimestampTz end;
	bool		has_carry;		/* latest point before start */
	WPoint		carry;
	int64		n;				/* points in [start, end) */
	int64		cap;
	WPoint	   *pts;
} WeightedState;

static int
WPointCmp(const WPoint *a, const WPoint *b)
{
	if (a->ts != b->ts)
		return a->ts < b->ts ? -1 : 1;
	if (a->ingested != b->ingested)
		return a->ingested < b->ingested ? -1 : 1;
	return memcmp(a->id.data, b->id.data, 16);
}

static int
WPointQsortCmp(const void *a, const void *b)
{
	return WPointCmp((const WPoint *) a, (const WPoint *) b);
}

static WeightedState *
WeightedNew(MemoryContext cxt, TimestampTz start, TimestampTz end)
{
	WeightedState *st;

	if (TIMESTAMP_NOT_FINITE(start) || TIMESTAMP_NOT_FINITE(end))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("weighted_sum period bounds must be finite")));
	if (end < start)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("weighted_sum period_end is before period_start")));
	st = MemoryContextAllocZero(cxt, sizeof(WeightedState));
	st->cxt = cxt;
	st->start = start;
	st->end = end;
	return st;
}

static void
WeightedCheckBounds(WeightedState *st, TimestampTz start, TimestampTz end)
{
	if (st->start != start || st->end != end)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("weighted_sum needs the same period_start and period_end on every row")));
}

static Numeric
WeightedCopyNumeric(MemoryContext cxt, Numeric v)
{
	Size		sz = VARSIZE(v);
	Numeric		c = MemoryContextAlloc(cxt, sz);

	memcpy(c, v, sz);
	return c;
}

/* Adds one point; q is copied into the state's context when it is kept. */
static void
WeightedAdd(WeightedState *st, Numeric q, TimestampTz ts, TimestampTz ingested, const pg_uuid_t *id)
{
	WPoint		p;

	if (ts >= st->end)
		return;					/* after the period: never part of it */
	p.ts = ts;
	p.ingested = ingested;
	memcpy(&p.id, id, 16);
	p.q = q;
	if (ts < st->start)
	{
		/* before the period: only the latest one matters (the carried-in level) */
		if (!st->has_carry || WPointCmp(&p, &st->carry) > 0)
		{
			p.q = WeightedCopyNumeric(st->cxt, q);
			st->carry = p;
			st->has_carry = true;
		}
		return;
	}
	if (st->n == st->cap)
	{
		int64		cap = st->cap == 0 ? 64 : st->cap * 2;

		if ((Size) cap > MaxAllocHugeSize / sizeof(WPoint))
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("too many events for weighted_sum")));
		st->pts = st->pts == NULL
			? MemoryContextAllocHuge(st->cxt, cap * sizeof(WPoint))
			: repalloc_huge(st->pts, cap * sizeof(WPoint));
		st->cap = cap;
	}
	p.q = WeightedCopyNumeric(st->cxt, q);
	st->pts[st->n++] = p;
}

PG_FUNCTION_INFO_V1(fr_weighted_sum_trans);
Datum
fr_weighted_sum_trans(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	WeightedState *st = PG_ARGISNULL(0) ? NULL : (WeightedState *) PG_GETARG_POINTER(0);
	TimestampTz start,
				end;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_weighted_sum_trans called in non-aggregate context");
	/* an event without quantity, time, ingestion time or id sets no level */
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3) || PG_ARGISNULL(4))
		PG_RETURN_POINTER(st);
	if (PG_ARGISNULL(5) || PG_ARGISNULL(6))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("weighted_sum needs period_start and period_end")));
	start = PG_GETARG_TIMESTAMPTZ(5);
	end = PG_GETARG_TIMESTAMPTZ(6);
	if (st == NULL)
		st = WeightedNew(aggcxt, start, end);
	else
		WeightedCheckBounds(st, start, end);
	WeightedAdd(st, PG_GETARG_NUMERIC(1), PG_GETARG_TIMESTAMPTZ(2), PG_GETARG_TIMESTAMPTZ(3),
				PG_GETARG_UUID_P(4));
	PG_RETURN_POINTER(st);
}

PG_FUNCTION_INFO_V1(fr_weighted_sum_combine);
Datum
fr_weighted_sum_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	WeightedState *a = PG_ARGISNULL(0) ? NULL : (WeightedState *) PG_GETARG_POINTER(0);
	WeightedState *b = PG_ARGISNULL(1) ? NULL : (WeightedState *) PG_GETARG_POINTER(1);

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "fr_weighted_sum_combine called in non-aggregate context");
	if (b == NULL)
		PG_RETURN_POINTER(a);
	if (a == NULL)
		a = WeightedNew(aggcxt, b->start, b->end);	/* never adopt b: it may live in a shorter context */
	else
		WeightedCheckBounds(a, b->start, b->end);
	/* WeightedAdd copies every kept numeric into a's context */
	if (b->has_carry)
		WeightedAdd(a, b->carry.q, b->carry.ts, b->carry.ingested, &b->carry.id);
	for (int64 i = 0; i < b->n; i++)
		WeightedAdd(a, b->pts[i].q, b->pts[i].ts, b->pts[i].ingested, &b->pts[i].id);
	PG_RETURN_POINTER(a);
}

/* level * (t2 - t1 in microseconds / 10^6, scale 6) / 3600 */
static Numeric
WeightedSegment(Numeric level, TimestampTz t1, TimestampTz t2, Numeric n3600)
{
	int64		usec;

	if (pg_sub_s64_overflow(t2, t1, &usec))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("interval out of range")));
	return numeric_div_opt_error(numeric_mul_opt_error(level, int64_div_fast_to_numeric(usec, 6), NULL),
								 n3600, NULL);
}

/* Read-only on the state: sorts a copy of the points. */
PG_FUNCTION_INFO_V1(fr_weighted_sum_final);
Datum
fr_weighted_sum_final(PG_FUNCTION_ARGS)
{
	WeightedState *st = PG_ARGISNULL(0) ? NULL : (WeightedState *) PG_GETARG_POINTER(0);
	WPoint	   *pts;
	Numeric		n3600,
				sum = NULL,
				level = NULL;
	TimestampTz t;

	if (st == NULL || (!st->has_carry && st->n == 0))
		PG_RETURN_NUMERIC(int64_to_numeric(0));
	pts = palloc_extended(Max(st->n, 1) * sizeof(WPoint), MCXT_ALLOC_HUGE);
	if (st->n > 0)
	{
		memcpy(pts, st->pts, st->n * sizeof(WPoint));
		qsort(pts, st->n, sizeof(WPoint), WPointQsortCmp);
	}
	n3600 = int64_to_numeric(3600);
	/* the carried-in level holds from period_start; otherwise nothing before the first event */
	t = st->start;
	if (st->has_carry)
		level = st->carry.q;
	for (int64 i = 0; i < st->n; i++)
	{
		if (level != NULL)
		{
			Numeric		seg = WeightedSegment(level, t, pts[i].ts, n3600);

			sum = sum == NULL ? seg : numeric_add_opt_error(sum, seg, NULL);
		}
		level = pts[i].q;
		t = pts[i].ts;
	}
	{
		Numeric		seg = WeightedSegment(level, t, st->end, n3600);

		sum = sum == NULL ? seg : numeric_add_opt_error(sum, seg, NULL);
	}
	pfree(pts);
	PG_RETURN_NUMERIC(sum);
}

/*
 * version byte, start, end, carry flag [, carry point], count, points;
 * a point is ts, ingested, id, numeric length, numeric varlena
 */
static void
WeightedSendPoint(StringInfo buf, const WPoint *p)
{
	pq_sendint64(buf, p->ts);
	pq_sendint64(buf, p->ingested);
	pq_sendbytes(buf, (const char *) p->id.data, 16);
	pq_sendint32(buf, VARSIZE(p->q));
	pq_sendbytes(buf, (const char *) p->q, VARSIZE(p->q));
}

PG_FUNCTION_INFO_V1(fr_weighted_sum_serial);
Datum
fr_weighted_sum_serial(PG_FUNCTION_ARGS)
{
	WeightedState *st = (WeightedState *) PG_GETARG_POINTER(0);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendbyte(&buf, FR_AGG_VERSION);
	pq_sendint64(&buf, st->start);
	pq_sendint64(&buf, st->end);
	pq_sendbyte(&buf, st->has_carry ? 1 : 0);
	if (st->has_carry)
		WeightedSendPoint(&buf, &st->carry);
	pq_sendint64(&buf, st->n);
	for (int64 i = 0; i < st->n; i++)
		WeightedSendPoint(&buf, &st->pts[i]);
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

/* Reads one point; its numeric points into buf (copied by WeightedAdd). */
static void
WeightedGetPoint(StringInfo buf, WPoint *p)
{
	int			sz;

	p->ts = pq_getmsgint64(buf);
	p->ingested = pq_getmsgint64(buf);
	memcpy(p->id.data, pq_getmsgbytes(buf, 16), 16);
	sz = pq_getmsgint(buf, 4);
	if (sz < VARHDRSZ || sz > buf->len - buf->cursor)
		elog(ERROR, "corrupt weighted_sum state");
	/* copy: the bytes in buf need not be aligned for a varlena */
	p->q = palloc(sz);
	memcpy(p->q, pq_getmsgbytes(buf, sz), sz);
	if (VARSIZE(p->q) != sz)
		elog(ERROR, "corrupt weighted_sum state");
}

PG_FUNCTION_INFO_V1(fr_weighted_sum_deserial);
Datum
fr_weighted_sum_deserial(PG_FUNCTION_ARGS)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;
	WeightedState *st;
	TimestampTz start,
				end;
	int			flag;
	int64		n;
	WPoint		p;

	buf.data = VARDATA_ANY(b);
	buf.len = VARSIZE_ANY_EXHDR(b);
	buf.maxlen = buf.len;
	buf.cursor = 0;
	if (pq_getmsgbyte(&buf) != FR_AGG_VERSION)
		elog(ERROR, "unknown weighted_sum state version");
	start = pq_getmsgint64(&buf);
	end = pq_getmsgint64(&buf);
	st = WeightedNew(CurrentMemoryContext, start, end);
	flag = pq_getmsgbyte(&buf);
	if (flag != 0 && flag != 1)
		elog(ERROR, "corrupt weighted_sum state");
	if (flag)
	{
		WeightedGetPoint(&buf, &p);
		if (p.ts >= start)
			elog(ERROR, "corrupt weighted_sum state");
		WeightedAdd(st, p.q, p.ts, p.ingested, &p.id);
		pfree(p.q);
	}
	n = pq_getmsgint64(&buf);
	if (n < 0)
		elog(ERROR, "corrupt weighted_sum state");
	for (int64 i = 0; i < n; i++)
	{
		WeightedGetPoint(&buf, &p);
		if (p.ts < start || p.ts >= end)
			elog(ERROR, "corrupt weighted_sum state");
		WeightedAdd(st, p.q, p.ts, p.ingested, &p.id);
		pfree(p.q);
	}
	pq_getmsgend(&buf);
	PG_RETURN_POINTER(st);
}
