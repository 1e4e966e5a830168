/*-------------------------------------------------------------------------
 * ingest_event.c
 *	  One event, without the database: the batch element reader, the shape
 *	  checks, the quantity (from the argument or a property) and its checks,
 *	  the event time, the payload hash of idempotency, and the result JSON.
 *
 * Everything here is pure computation (no SPI, no catalog access), so the
 * batch path may catch its errors without a subtransaction, and each entry
 * point can be called on its own (FrReadBatchEvent, FrLooksNumeric,
 * FrCheckQuantity, FrPrepareEvent).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "catalog/pg_type.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "ingest.h"

/* Text of a top-level member of a jsonb object (string or number), or NULL */
static JsonbValue *
JsonbMember(Jsonb *jb, const char *key)
{
	JsonbValue	k;

	if (jb == NULL || !JB_ROOT_IS_OBJECT(jb))
		return NULL;
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	return findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
}

/* metadata or properties: a JSON object of at most FR_MAX_METADATA bytes */
static void
CheckObject(Jsonb *jb, const char *field)
{
	if (jb == NULL)
		return;
	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON object", field),
				 errhint("Send {\"key\": \"value\", ...}.")));
	if (VARSIZE(jb) > FR_MAX_METADATA)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("%s is larger than 16 KiB", field),
				 errdetail("%s takes %d bytes.", field, (int) VARSIZE(jb))));
}

/* A plain decimal: [+-]digits[.digits][e[+-]digits]; no NaN, no Infinity */
bool
FrLooksNumeric(const char *s)
{
	bool		digits = false;

	if (*s == '+' || *s == '-')
		s++;
	while (*s >= '0' && *s <= '9')
		s++, digits = true;
	if (*s == '.')
		for (s++; *s >= '0' && *s <= '9'; s++)
			digits = true;
	if (!digits)
		return false;
	if (*s == 'e' || *s == 'E')
	{
		s++;
		if (*s == '+' || *s == '-')
			s++;
		if (!(*s >= '0' && *s <= '9'))
			return false;
		while (*s >= '0' && *s <= '9')
			s++;
	}
	return *s == '\0';
}

/* Quantity from properties[property_name]: a JSON number or a numeric string */
static Numeric
QuantityFromProperties(Jsonb *props, const char *property)
{
	JsonbValue *v = JsonbMember(props, property);

	if (v == NULL || v->type == jbvNull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("properties.%s is required", property),
				 errdetail("The meter reads its quantity from the \"%s\" property.", property)));
	if (v->type == jbvNumeric)
		return v->val.numeric;
	if (v->type == jbvString)
	{
		char	   *s = pnstrdup(v->val.string.val, v->val.string.len);

		if (!FrLooksNumeric(s))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("properties.%s is not a number: \"%s\"", property, s)));
		return DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
												   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("properties.%s is not a number", property)));
	return NULL;				/* keep compiler quiet */
}

/* A quantity for a message: its text, cut after 40 characters (it may have 16,383 decimals) */
static char *
QuantityText(Numeric q)
{
	char	   *t = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(q)));

	if (strlen(t) > 40)
		strcpy(t + 37, "...");
	return t;
}

/* 0, 10^18 and -10^18 as numerics, made once per backend */
static Numeric
QuantityBound(int which)
{
	static Numeric bounds[3];

	if (bounds[0] == NULL)
	{
		int64		limit = 1;
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		for (int i = 0; i < FR_MAX_QUANTITY_DIGITS; i++)
			limit *= 10;
		bounds[1] = int64_to_numeric(limit);
		bounds[2] = int64_to_numeric(-limit);
		bounds[0] = int64_to_numeric(0);
		MemoryContextSwitchTo(old);
	}
	return bounds[which];
}

/* q compared with bound which of QuantityBound: <0, 0, >0 */
static int
QuantityCmp(Numeric q, int which)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(q),
											 NumericGetDatum(QuantityBound(which))));
}

/*
 * A quantity the meter accepts: finite (PT422), |q| < 10^18 (22003), positive
 * for SUM and COUNT or not negative for the others (PT422), at most 12
 * decimal places (PT422).  The magnitude goes first: the messages of the
 * others print the value.
 */
void
FrCheckQuantity(Numeric q, const char *agg)
{
	Datum		scale;
	bool		sum_like = (strcmp(agg, "SUM") == 0 || strcmp(agg, "COUNT") == 0);
	int			cmp;

	if (numeric_is_nan(q) || numeric_is_inf(q))
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity must be a finite number")));
	if (QuantityCmp(q, 1) >= 0 || QuantityCmp(q, 2) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("quantity is out of range"),
				 errdetail("A quantity must be less than 10^18 in absolute value (at most 18 integer digits); quantity was %s.",
						   QuantityText(q)),
				 errhint("Send the quantity in a larger unit (for example GB instead of bytes).")));
	cmp = QuantityCmp(q, 0);
	if (sum_like ? cmp <= 0 : cmp < 0)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity must be %s", sum_like ? "greater than zero" : "zero or more"),
				 errdetail("quantity was %s.", QuantityText(q))));
	scale = DirectFunctionCall1(numeric_scale, NumericGetDatum(q));
	if (DatumGetInt32(scale) > FR_MAX_SCALE)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity has more than 12 decimal places"),
				 errdetail("quantity was %s.", QuantityText(q))));
}

/* Building the result as a JsonbValue: no text to print and parse again */
void
FrPushKey(JsonbParseState **st, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	pushJsonbValue(st, WJB_KEY, &v);
}

/* Push key: val (a JSON string, or null for NULL) */
void
FrPushString(JsonbParseState **st, const char *key, const char *val)
{
	JsonbValue	v;

	FrPushKey(st, key);
	if (val == NULL)
		v.type = jbvNull;
	else
	{
		v.type = jbvString;
		v.val.string.val = (char *) val;
		v.val.string.len = strlen(val);
	}
	pushJsonbValue(st, WJB_VALUE, &v);
}

/* Push key: the uuid as a string */
void
FrPushUuid(JsonbParseState **st, const char *key, pg_uuid_t *u)
{
	/* uuid_out's format, written directly (pushJsonbValue keeps the pointer) */
	static const char hex[] = "0123456789abcdef";
	char	   *buf = palloc(UUID_LEN * 2 + 5);
	char	   *p = buf;

	for (int i = 0; i < UUID_LEN; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*p++ = '-';
		*p++ = hex[u->data[i] >> 4];
		*p++ = hex[u->data[i] & 0x0F];
	}
	*p = '\0';
	FrPushString(st, key, buf);
}

/* A timestamp as to_jsonb() writes it (pushJsonbValue keeps the pointer: no stack buffer) */
static void
PushTs(JsonbParseState **st, const char *key, TimestampTz ts)
{
	FrPushString(st, key, JsonEncodeDateTime(NULL, TimestampTzGetDatum(ts), TIMESTAMPTZOID, NULL));
}

/* The event as Fluxrate returns it */
Jsonb *
FrEventJson(pg_uuid_t *id, pg_uuid_t *customer, pg_uuid_t *meter, Numeric q, TimestampTz ts,
		  TimestampTz ingested, const char *key, Jsonb *meta, bool replay)
{
	JsonbParseState *st = NULL;
	JsonbValue	v;
	JsonbValue *res;
	/* created_at and ingested_at are the same instant (and usually timestamp): format it once */
	char	   *t = JsonEncodeDateTime(NULL, TimestampTzGetDatum(ingested), TIMESTAMPTZOID, NULL);

	/*
	 * The keys are pushed in jsonb's own order (shorter first, then bytewise),
	 * so the sort at WJB_END_OBJECT finds them sorted in one pass instead of
	 * sorting ten pairs (4% of a call's instructions).  The output is the same
	 * in any order.
	 */
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	FrPushUuid(&st, "id", id);
	FrPushKey(&st, "replay");
	v.type = jbvBool;
	v.val.boolean = replay;
	pushJsonbValue(&st, WJB_VALUE, &v);
	FrPushUuid(&st, "meter_id", meter);
	FrPushString(&st, "quantity", DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(q))));
	FrPushKey(&st, "meta_data");
	if (meta)
	{
		/* an object (checked on the way in): pushed member by member */
		v.type = jbvBinary;
		v.val.binary.data = &meta->root;
		v.val.binary.len = VARSIZE(meta) - VARHDRSZ;
		pushJsonbValue(&st, WJB_VALUE, &v);
	}
	else
	{
		pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	}
	if (ts == ingested)
		FrPushString(&st, "timestamp", t);
	else
		PushTs(&st, "timestamp", ts);
	FrPushString(&st, "created_at", t);
	FrPushUuid(&st, "customer_id", customer);
	FrPushString(&st, "ingested_at", t);
	FrPushString(&st, "idempotency_key", key);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/*
 * The identifier fits the rule of FR_MAX_IDENT_CHARS characters (not bytes):
 * at most 255 x 4 bytes of UTF-8, inside a btree index row (2,704 bytes).
 * Counted only past 255 bytes, so the usual short id costs one strlen.
 */
bool
FrIdentFits(const char *s)
{
	size_t		len = strlen(s);

	if (len <= FR_MAX_IDENT_CHARS)
		return true;
	if (len > (size_t) FR_MAX_IDENT_CHARS * MAX_MULTIBYTE_CHAR_LEN)
		return false;
	return pg_mbstrlen_with_len(s, (int) len) <= FR_MAX_IDENT_CHARS;
}

/* Nothing but ASCII white space (or nothing at all): a blank identifier */
static bool
IsBlank(const char *s)
{
	for (; *s; s++)
		if (!(*s == ' ' || (*s >= '\t' && *s <= '\r')))
			return false;
	return true;
}

/* Checks that need no meter and no database: presence and shape of the fields */
void
FrCheckInputShape(TrackInput *in)
{
	if (in->meter_token == NULL && in->meter_name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("meter_token is required"),
				 errhint("Send meter_token with quantity, or meter_name with properties.")));
	if (in->customer_external_id == NULL || IsBlank(in->customer_external_id))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("customer_external_id is required"),
				 errhint("Send a non-blank customer_external_id.")));
	if (!FrIdentFits(in->customer_external_id))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("customer_external_id is longer than 255 characters"),
				 errhint("Send an external id of 1 to 255 characters.")));
	if (in->idempotency_key != NULL && (in->idempotency_key[0] == '\0' || !FrIdentFits(in->idempotency_key)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("idempotency_key must be 1 to 255 characters")));
	CheckObject(in->metadata, "metadata");
	CheckObject(in->properties, "properties");
}

/*
 * Validate the event against its meter and the clock; returns the metadata to
 * store and sets the quantity and the event time.  Pure computation (no
 * database access), so the batch path may catch its errors without a
 * subtransaction.
 */
Jsonb *
FrPrepareEvent(TrackInput *in, MeterInfo *m, TimestampTz now, Numeric *q_out, TimestampTz *ts_out)
{
	Numeric		q = in->quantity;
	Jsonb	   *meta;
	TimestampTz ts;

	if (q == NULL)
	{
		if (in->properties != NULL && strcmp(m->agg, "COUNT") != 0 && strcmp(m->agg, "UNIQUE_COUNT") != 0)
			q = QuantityFromProperties(in->properties, m->property);
		else if (strcmp(m->agg, "COUNT") == 0 || strcmp(m->agg, "UNIQUE_COUNT") == 0)
			q = int64_to_numeric(1);
		else
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("quantity is required"),
					 errhint("Send quantity, or properties with \"%s\".", m->property)));
	}
	FrCheckQuantity(q, m->agg);

	/* properties and metadata both end up in the event's metadata (metadata wins) */
	if (in->properties && in->metadata)
		meta = DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(in->properties),
												  JsonbPGetDatum(in->metadata)));
	else
		meta = in->properties ? in->properties : in->metadata;
	if (meta && VARSIZE(meta) > FR_MAX_METADATA)
		CheckObject(meta, "metadata");
	if (strcmp(m->agg, "UNIQUE_COUNT") == 0)
	{
		JsonbValue *v = JsonbMember(meta, m->unique_property);

		if (v == NULL || v->type == jbvNull)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("metadata.%s is required for this UNIQUE_COUNT meter", m->unique_property)));
	}

	ts = in->has_ts ? in->ts : now;
	/* -infinity and 4713 BC included; the earliest is PostgreSQL's epoch (zero) */
	if (in->has_ts && ts < FR_MIN_EVENT_TS)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("timestamp is before 2000-01-01"),
				 errdetail("timestamp was %s.", pstrdup(timestamptz_to_str(ts))),
				 errhint("Event timestamps run from 2000-01-01 00:00:00 UTC to 5 minutes past the server time.")));
	if (in->has_ts && ts > now + FR_FUTURE_SLACK)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("timestamp is more than 5 minutes in the future"),
				 errdetail("timestamp was %s; the server time is %s.",
						   pstrdup(timestamptz_to_str(ts)), pstrdup(timestamptz_to_str(now)))));
	*q_out = q;
	*ts_out = ts;
	return meta;
}

/* The payload a replay must repeat: meter, customer, value, time (if sent), metadata */
void
FrPayloadHash(TrackInput *in, MeterInfo *m, pg_uuid_t *customer, Numeric q, TimestampTz ts, Jsonb *meta,
			unsigned char hash[32])
{
	crypto_generichash_state hs;
	char	   *qnorm = numeric_normalize(q);

	crypto_generichash_init(&hs, NULL, 0, 32);
	crypto_generichash_update(&hs, m->id.data, 16);
	crypto_generichash_update(&hs, customer->data, 16);
	crypto_generichash_update(&hs, (unsigned char *) qnorm, strlen(qnorm) + 1);
	if (in->has_ts)
		crypto_generichash_update(&hs, (unsigned char *) &ts, sizeof(ts));
	crypto_generichash_update(&hs, (unsigned char *) "|", 1);
	if (meta)
	{
		char	   *mt = JsonbToCString(NULL, &meta->root, VARSIZE(meta));

		crypto_generichash_update(&hs, (unsigned char *) mt, strlen(mt));
	}
	crypto_generichash_final(&hs, hash, 32);
}

/* Fields of one batch element */
void
FrReadBatchEvent(Jsonb *ev, TrackInput *in)
{
	JsonbValue *v;

	memset(in, 0, sizeof(*in));
	if (!JB_ROOT_IS_OBJECT(ev) || JB_ROOT_IS_SCALAR(ev))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event must be a JSON object")));
#define STRFIELD(name, dst) \
	if ((v = JsonbMember(ev, name)) != NULL && v->type != jbvNull) \
	{ \
		if (v->type != jbvString) \
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s must be a string", name))); \
		dst = pnstrdup(v->val.string.val, v->val.string.len); \
	}
	STRFIELD("meter_token", in->meter_token);
	STRFIELD("meter_name", in->meter_name);
	STRFIELD("customer_external_id", in->customer_external_id);
	STRFIELD("idempotency_key", in->idempotency_key);
#undef STRFIELD
	if ((v = JsonbMember(ev, "quantity")) != NULL && v->type != jbvNull)
	{
		if (v->type == jbvNumeric)
			in->quantity = v->val.numeric;
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("quantity must be a JSON number")));
	}
	if ((v = JsonbMember(ev, "timestamp")) != NULL && v->type != jbvNull)
	{
		if (v->type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_DATETIME_FORMAT),
					 errmsg("timestamp must be an ISO 8601 string")));
		in->has_ts = true;
		in->ts = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
														 CStringGetDatum(pnstrdup(v->val.string.val, v->val.string.len)),
														 ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
	}
	if ((v = JsonbMember(ev, "metadata")) != NULL && v->type != jbvNull)
		in->metadata = JsonbValueToJsonb(v);
	if ((v = JsonbMember(ev, "properties")) != NULL && v->type != jbvNull)
		in->properties = JsonbValueToJsonb(v);
}

/* Push key: val as a JSON number */
void
FrPushInt(JsonbParseState **st, const char *key, int val)
{
	JsonbValue	v;

	FrPushKey(st, key);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(val);
	pushJsonbValue(st, WJB_VALUE, &v);
}

