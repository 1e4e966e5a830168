/*-------------------------------------------------------------------------
 * util.c
 *	  Identifiers and random tokens from libsodium's CSPRNG; the cluster's
 *	  identity.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "access/xlog.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"

static const char base62[] =
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/*
 * UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness.  Time-ordered
 * ids keep the events' primary-key index appending at its right edge instead
 * of writing all over it, as random UUIDs do (baseline notes).
 *
 * Within one backend the ids are strictly increasing (RFC 9562 method 1: the
 * 12 bits of rand_a count within a millisecond, from a random start in their
 * lower half; past 4095, or when the clock steps back, the millisecond is
 * borrowed from the future).  The id is the last tie-break of LAST and
 * WEIGHTED_SUM ("ingestion order"): events sent in one batch or one
 * transaction share ingested_at, and purely random bits used to order two of
 * them made in the same millisecond either way.
 */
static uint64 uuid_last_ms = 0;
static uint16 uuid_last_seq = 0;

void
FrUuidV7(unsigned char out[16], TimestampTz ts)
{
	uint64		ms = (uint64) (ts / 1000 +
							   (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000);

	randombytes_buf(out + 6, 10);
	if (ms > uuid_last_ms)
	{
		uuid_last_ms = ms;
		uuid_last_seq = ((out[6] << 8) | out[7]) & 0x07ff;
	}
	else if (uuid_last_seq >= 0x0fff)
	{
		uuid_last_ms++;
		uuid_last_seq = 0;
	}
	else
		uuid_last_seq++;
	ms = uuid_last_ms;
	out[0] = (ms >> 40) & 0xff;
	out[1] = (ms >> 32) & 0xff;
	out[2] = (ms >> 24) & 0xff;
	out[3] = (ms >> 16) & 0xff;
	out[4] = (ms >> 8) & 0xff;
	out[5] = ms & 0xff;
	out[6] = 0x70 | ((uuid_last_seq >> 8) & 0x0f);	/* version 7, counter */
	out[7] = uuid_last_seq & 0xff;
	out[8] = (out[8] & 0x3f) | 0x80;	/* variant 10 */
}

/* len characters drawn uniformly from [0-9A-Za-z] (no modulo bias) */
void
FrRandomBase62(char *out, int len)
{
	for (int i = 0; i < len; i++)
		out[i] = base62[randombytes_uniform(62)];
	out[len] = '\0';
}

PG_FUNCTION_INFO_V1(fr_uuid_v7);
Datum
fr_uuid_v7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *u = palloc(sizeof(pg_uuid_t));

	FrUuidV7(u->data, GetCurrentTimestamp());
	PG_RETURN_UUID_P(u);
}

PG_FUNCTION_INFO_V1(fr_random_token);
Datum
fr_random_token(PG_FUNCTION_ARGS)
{
	int32		len = PG_GETARG_INT32(0);
	char	   *buf;

	if (len < 1 || len > 1024)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("token length must be between 1 and 1024")));
	buf = palloc(len + 1);
	FrRandomBase62(buf, len);
	PG_RETURN_TEXT_P(cstring_to_text(buf));
}

/*
 * The cluster's system identifier (pg_controldata's "Database system
 * identifier").  The usage rollups (41_rollups.sql) count events by the id of
 * the transaction that inserted them, and transaction ids mean something only
 * inside the cluster that handed them out: the rollup state records this
 * number, and a state written by another cluster (a restored copy, a logical
 * replica) is not trusted.  pg_control_system() says the same, but reads and
 * checks the control file from disk on every call; every reader of the
 * rollups asks, so this returns the copy in shared memory.
 */
PG_FUNCTION_INFO_V1(fr_system_identifier);
Datum
fr_system_identifier(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64((int64) GetSystemIdentifier());
}
