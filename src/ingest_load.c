/*-------------------------------------------------------------------------
 * ingest_load.c
 *	  What the bulk load (fluxrate.load_events, 34_bulk_load.sql) needs from C:
 *	  the payload hash of idempotency, the very bytes fluxrate.track and
 *	  fluxrate.track_batch store (FrPayloadHash), so that a key loaded in bulk
 *	  replays through track and the other way round.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "ingest.h"

/*
 * fluxrate_internal.event_payload_hash(meter_id uuid, customer_id uuid,
 *     quantity numeric, ts timestamptz, ts_sent boolean, metadata jsonb) -> bytea
 * Not strict: metadata may be NULL; ts counts only when ts_sent.
 */
PG_FUNCTION_INFO_V1(fr_event_payload_hash);
Datum
fr_event_payload_hash(PG_FUNCTION_ARGS)
{
	TrackInput	in;
	MeterInfo	m;
	pg_uuid_t	customer;
	unsigned char hash[32];
	bytea	   *out;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(4) ||
		(PG_GETARG_BOOL(4) && PG_ARGISNULL(3)))
		PG_RETURN_NULL();
	memset(&in, 0, sizeof(in));
	memset(&m, 0, sizeof(m));
	memcpy(&m.id, PG_GETARG_UUID_P(0), sizeof(pg_uuid_t));
	memcpy(&customer, PG_GETARG_UUID_P(1), sizeof(pg_uuid_t));
	in.has_ts = PG_GETARG_BOOL(4);
	FrPayloadHash(&in, &m, &customer, PG_GETARG_NUMERIC(2), in.has_ts ? PG_GETARG_TIMESTAMPTZ(3) : 0,
				  PG_ARGISNULL(5) ? NULL : PG_GETARG_JSONB_P(5), hash);
	out = palloc(VARHDRSZ + 32);
	SET_VARSIZE(out, VARHDRSZ + 32);
	memcpy(VARDATA(out), hash, 32);
	PG_RETURN_BYTEA_P(out);
}
