/*-------------------------------------------------------------------------
 * apikey.c
 *	  API keys: generation, keyed hashing, verification.
 *
 * A key is "org_live_", its organization's id as 32 lower-case hex digits,
 * "_", and 43 base62 characters from libsodium's CSPRNG (about 256 bits):
 * org_live_<org>_<secret>, 85 characters.  The organization tag lets a router
 * (fluxrate_router, docs/scale-out.md) send the call to the shard that owns the
 * organization before anything is looked up; it is no credential (ids are not
 * secret), and since it is part of the hashed string it cannot be changed
 * without invalidating the key.  Keys made by 0.1.0 ("org_live_" followed by
 * the 43 characters, 52 in all) are still accepted; a router cannot route them.
 * Only a keyed BLAKE2b-256 hash of the whole key is stored, with a display
 * prefix (the key up to the first 4 characters of its secret).  The hashing key (the "pepper") is 32 random
 * bytes generated at CREATE EXTENSION time into fluxrate_internal.server_secrets,
 * a table only fluxrate_system can read; it never leaves the database.  A stolen
 * copy of api_keys alone is useless, and high-entropy keys need no slow hash
 * (argon2 per request would cost tens of milliseconds: notes 6.3).
 *
 * Keys are looked up by hash, before the organization is known, so the lookup
 * runs as fluxrate_system (which bypasses row-level security) and returns the
 * key's organization; everything after it is confined to that organization.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"

#define FR_KEY_PREFIX		"org_live_"
#define FR_KEY_PREFIX_LEN	9
#define FR_KEY_RANDOM_LEN	43
#define FR_KEY_LEN			(FR_KEY_PREFIX_LEN + FR_KEY_RANDOM_LEN)	/* 0.1.0 */
#define FR_KEY_ORG_LEN		32	/* the organization id, hex, no dashes */
#define FR_TAGGED_KEY_LEN	(FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN + 1 + FR_KEY_RANDOM_LEN)
#define FR_TAGGED_DISPLAY	(FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN + 1 + 4)

static unsigned char *pepper = NULL;	/* crypto_generichash_KEYBYTES, mlocked */
static SPIPlanPtr lookup_plan = NULL;
static SPIPlanPtr touch_plan = NULL;

/* Load the pepper once per backend (kept in locked memory) */
static void
LoadPepper(void)
{
	if (pepper != NULL)
		return;
	pepper = FrServerSecret("api_key_pepper");
}

/* Keyed BLAKE2b-256 of a key */
static void
HashKey(const char *key, size_t len, unsigned char out[32])
{
	LoadPepper();
	crypto_generichash(out, 32, (const unsigned char *) key, len,
					   pepper, crypto_generichash_KEYBYTES);
}

/* 32 random bytes, for the pepper and other server secrets */
PG_FUNCTION_INFO_V1(fr_random_bytes);
Datum
fr_random_bytes(PG_FUNCTION_ARGS)
{
	int32		n = PG_GETARG_INT32(0);
	bytea	   *b;

	if (n < 1 || n > 1024)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("byte count must be between 1 and 1024")));
	b = palloc(VARHDRSZ + n);
	SET_VARSIZE(b, VARHDRSZ + n);
	randombytes_buf(VARDATA(b), n);
	PG_RETURN_BYTEA_P(b);
}

/*
 * fluxrate_internal.new_api_key() -> (key text, prefix text, key_hash bytea)
 * The SQL wrapper stores prefix and hash and returns key exactly once.  The
 * key is tagged with the organization the calling API function resolved
 * (fluxrate.current_org, set by require_org just before); without one (no
 * caller does that) it has the untagged 0.1.0 form.
 */
PG_FUNCTION_INFO_V1(fr_new_api_key);
Datum
fr_new_api_key(PG_FUNCTION_ARGS)
{
	char		key[FR_TAGGED_KEY_LEN + 1];
	int			len;
	int			display;
	unsigned char hash[32];
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	bytea	   *h;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	memcpy(key, FR_KEY_PREFIX, FR_KEY_PREFIX_LEN);
	if (fr_current_org != NULL && fr_current_org[0] != '\0')
	{
		pg_uuid_t  *org = DatumGetUUIDP(DirectFunctionCall1(uuid_in,
													   CStringGetDatum(fr_current_org)));
		static const char hex[] = "0123456789abcdef";

		for (int i = 0; i < UUID_LEN; i++)
		{
			key[FR_KEY_PREFIX_LEN + 2 * i] = hex[org->data[i] >> 4];
			key[FR_KEY_PREFIX_LEN + 2 * i + 1] = hex[org->data[i] & 0x0f];
		}
		key[FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN] = '_';
		FrRandomBase62(key + FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN + 1, FR_KEY_RANDOM_LEN);
		len = FR_TAGGED_KEY_LEN;
		display = FR_TAGGED_DISPLAY;
	}
	else
	{
		FrRandomBase62(key + FR_KEY_PREFIX_LEN, FR_KEY_RANDOM_LEN);
		len = FR_KEY_LEN;
		display = 12;
	}
	HashKey(key, len, hash);
	h = palloc(VARHDRSZ + 32);
	SET_VARSIZE(h, VARHDRSZ + 32);
	memcpy(VARDATA(h), hash, 32);
	values[0] = PointerGetDatum(cstring_to_text_with_len(key, len));
	values[1] = PointerGetDatum(cstring_to_text_with_len(key, display));
	values[2] = PointerGetDatum(h);
	sodium_memzero(key, sizeof(key));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* Is key a well-formed key: the 0.1.0 form, or tagged with an organization? */
static bool
KeyWellFormed(const char *key, size_t len)
{
	if (strncmp(key, FR_KEY_PREFIX, FR_KEY_PREFIX_LEN) != 0)
		return false;
	if (len == FR_KEY_LEN)
		return true;
	if (len != FR_TAGGED_KEY_LEN || key[FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN] != '_')
		return false;
	for (int i = FR_KEY_PREFIX_LEN; i < FR_KEY_PREFIX_LEN + FR_KEY_ORG_LEN; i++)
		if (!((key[i] >= '0' && key[i] <= '9') || (key[i] >= 'a' && key[i] <= 'f')))
			return false;
	return true;
}

/*
 * The pieces of verification, for callers that look the key up themselves
 * (fluxrate.track reads the key's row from a per-backend cache or by a direct
 * index probe: src/ingest_cache.c).  Declared in fluxrate.h.
 */

/*
 * Check a key's format and compute its keyed hash (also returned as a bytea
 * for the lookup); PT401 if malformed.
 */
bytea *
FrApiKeyHash(const char *key, unsigned char hash[32])
{
	size_t		len = strlen(key);
	bytea	   *h;

	if (!KeyWellFormed(key, len))
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("invalid api key"),
				 errdetail("An API key is \"org_live_\", the organization id in 32 hex digits, \"_\" and 43 letters and digits."),
				 errhint("Create a key with fluxrate.create_api_key.")));
	HashKey(key, len, hash);
	h = palloc(VARHDRSZ + 32);
	SET_VARSIZE(h, VARHDRSZ + 32);
	memcpy(VARDATA(h), hash, 32);
	return h;
}

/*
 * Accept the key whose row the lookup by hash found (stored == NULL: none, or
 * a stored hash that is not 32 bytes): the stored hash is compared again in
 * constant time, and a revoked key is refused.  PT401 otherwise.
 * fluxrate.track reads the row from its per-backend cache or the index
 * (src/ingest_cache.c, "Row caches" for when a revocation is seen).
 */
void
FrApiKeyAcceptHash(const unsigned char hash[32], const unsigned char *stored, bool active)
{
	if (stored == NULL)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("invalid api key"),
				 errhint("The key is unknown; create one with fluxrate.create_api_key.")));
	/* the lookup found it by equality; compare again in constant time anyway */
	if (crypto_verify_32(stored, hash) != 0)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("invalid api key")));
	if (!active)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("api key revoked"),
				 errhint("Create a new key with fluxrate.create_api_key.")));
}

/* The same for a stored hash as a bytea (the caller's statement read the row) */
void
FrApiKeyAccept(const unsigned char hash[32], bytea *stored, bool active)
{
	FrApiKeyAcceptHash(hash,
					   stored != NULL && VARSIZE_ANY_EXHDR(stored) == 32 ?
					   (const unsigned char *) VARDATA_ANY(stored) : NULL,
					   active);
}

/*
 * Record the use of a key whose last_used_at is more than a minute old (the
 * lookup tells).  Inside SPI, as fluxrate_system; nothing on read-only
 * transactions.
 *
 * SKIP LOCKED: track() runs inside the application's own transactions, and
 * the touch's row lock lasts as long as the transaction that made it.  Until
 * that one commits, every other call with the key still sees the old
 * last_used_at and would queue behind it: one long transaction (a batch job
 * that tracked once) would stall all ingestion with its key.  A locked row is
 * being touched already; skipping it loses nothing.
 */
void
FrApiKeyTouch(Datum org, Datum key_id, TimestampTz now)
{
	Datum		targs[3];

	if (XactReadOnly)
		return;
	if (touch_plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare("UPDATE fluxrate_internal.api_keys k SET last_used_at = $3 "
									"FROM (SELECT l.org_id, l.id FROM fluxrate_internal.api_keys l "
									"WHERE l.org_id OPERATOR(pg_catalog.=) $1 AND l.id OPERATOR(pg_catalog.=) $2 "
									"FOR UPDATE SKIP LOCKED) x "
									"WHERE k.org_id OPERATOR(pg_catalog.=) x.org_id AND k.id OPERATOR(pg_catalog.=) x.id",
									3, (Oid[]) {UUIDOID, UUIDOID, TIMESTAMPTZOID});

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		touch_plan = p;
	}
	targs[0] = org;
	targs[1] = key_id;
	targs[2] = TimestampTzGetDatum(now);
	SPI_execute_plan(touch_plan, targs, NULL, false, 0);
}

/*
 * Verify a key: returns its organization, id and scopes, or raises PT401.
 * Runs as fluxrate_system.  last_used_at is written at most once a minute per
 * key, so verification does not add a write to every call.
 */
void
FrVerifyApiKey(const char *key, Datum *org, Datum *key_id, ArrayType **scopes)
{
	unsigned char hash[32];
	bytea	   *h;
	Datum		args[2];
	Oid			save_user;
	int			save_sec;
	MemoryContext caller = CurrentMemoryContext;

	h = FrApiKeyHash(key, hash);

	FrBecomeSystem(&save_user, &save_sec);
	PG_TRY();
	{
		bool		isnull;
		HeapTuple	tup;
		TupleDesc	td;
		TimestampTz now = FrNow();

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (lookup_plan == NULL)
		{
			SPIPlanPtr	p = SPI_prepare("SELECT org_id, id, scopes, status OPERATOR(pg_catalog.=) 'ACTIVE', key_hash, "
										"(last_used_at IS NULL OR last_used_at OPERATOR(pg_catalog.<) ($2 OPERATOR(pg_catalog.-) interval '1 minute')) AS stale "
										"FROM fluxrate_internal.api_keys WHERE key_hash OPERATOR(pg_catalog.=) $1",
										2, (Oid[]) {BYTEAOID, TIMESTAMPTZOID});

			if (p == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(p);
			lookup_plan = p;
		}
		args[0] = PointerGetDatum(h);
		args[1] = TimestampTzGetDatum(now);
		if (SPI_execute_plan(lookup_plan, args, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "api key lookup failed");
		if (SPI_processed != 1)
			FrApiKeyAccept(hash, NULL, false);
		tup = SPI_tuptable->vals[0];
		td = SPI_tuptable->tupdesc;
		FrApiKeyAccept(hash, DatumGetByteaPP(SPI_getbinval(tup, td, 5, &isnull)),
					   DatumGetBool(SPI_getbinval(tup, td, 4, &isnull)));
		{
			MemoryContext spi = MemoryContextSwitchTo(caller);

			*org = datumCopy(SPI_getbinval(tup, td, 1, &isnull), false, 16);
			*key_id = datumCopy(SPI_getbinval(tup, td, 2, &isnull), false, 16);
			*scopes = DatumGetArrayTypePCopy(SPI_getbinval(tup, td, 3, &isnull));
			MemoryContextSwitchTo(spi);
		}
		if (DatumGetBool(SPI_getbinval(tup, td, 6, &isnull)))
			FrApiKeyTouch(*org, *key_id, now);
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_END_TRY();
}

/* Does a text[] of scopes grant scope ("admin" grants all)? */
bool
FrScopesGrant(ArrayType *scopes, const char *scope)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	bool		found = false;

	deconstruct_array(scopes, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	for (int i = 0; i < n && !found; i++)
	{
		char	   *s;

		if (nulls[i])
			continue;
		s = TextDatumGetCString(elems[i]);
		found = (strcmp(s, scope) == 0 || strcmp(s, "admin") == 0);
	}
	return found;
}

/*
 * fluxrate_internal.sys_verify_api_key(key) -> (org_id, key_id, scopes)
 * For the PostgREST pre-request and for SQL callers holding a key.
 */
PG_FUNCTION_INFO_V1(fr_verify_api_key);
Datum
fr_verify_api_key(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	ArrayType  *scopes;
	char	   *key;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("api key is required")));
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	key = text_to_cstring(PG_GETARG_TEXT_PP(0));
	FrVerifyApiKey(key, &values[0], &values[1], &scopes);
	values[2] = PointerGetDatum(scopes);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
