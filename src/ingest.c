/*-------------------------------------------------------------------------
 * ingest.c
 *	  fluxrate.track and fluxrate.track_batch: the hot path.
 *
 * One event = resolve the meter (by token or by name), resolve or create the
 * customer, validate the quantity, and insert into usage_events with
 * INSERT .. ON CONFLICT (org_id, idempotency_key) DO NOTHING, all in the
 * caller's transaction: the event exists if and only if the caller commits.
 * Idempotency is exact and has no expiry: the unique index is the arbiter.
 * A conflict is a replay when the payload hash matches (the original event is
 * returned, HTTP 200) and a PT409 conflict otherwise (nothing written).
 *
 * Every query is prepared once per backend and kept (SPI_keepplan); the
 * quantity stays numeric from the argument to the row, never a float.
 * fluxrate.track keeps the key, meter and customer rows it reads per backend
 * ("Row caches" below) and writes as fluxrate_system.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <sodium.h>

#include "access/genam.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"

#define FR_MAX_METADATA		16384
#define FR_MAX_SCALE		12
#define FR_MAX_BATCH		1000
#define FR_FUTURE_SLACK		(5 * 60 * USECS_PER_SEC)

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

static SPIPlanPtr plan_meter_token = NULL;
static SPIPlanPtr plan_meter_name = NULL;
static SPIPlanPtr plan_customer = NULL;
static SPIPlanPtr plan_customer_ins = NULL;
static SPIPlanPtr plan_event_ins = NULL;
static SPIPlanPtr plan_event_get = NULL;

static SPIPlanPtr
Prepare(SPIPlanPtr *slot, const char *sql, int nargs, Oid *types)
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

static void
SetResponseStatus(const char *status)
{
	(void) set_config_option("response.status", status, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/* Look the meter up by token or by name, within the organization; false if unknown */
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
		rc = SPI_execute_plan(Prepare(&plan_meter_token,
									  "SELECT id, aggregation_type, property_name, unique_property FROM fluxrate_internal.meters "
									  "WHERE org_id OPERATOR(pg_catalog.=) $1 AND meter_token OPERATOR(pg_catalog.=) $2",
									  2, (Oid[]) {UUIDOID, UUIDOID}), args, NULL, true, 1);
	}
	else
	{
		args[1] = CStringGetTextDatum(in->meter_name);
		rc = SPI_execute_plan(Prepare(&plan_meter_name,
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

/*
 * Direct index lookups for fluxrate.track.
 *
 * The key, the meter and the customer of one event are three equality probes
 * of three unique (or near-unique) btree indexes.  Through SPI each paid for
 * plan-cache revalidation, executor start-up and shutdown, a result tuple
 * store and output conversions, several times the probe itself (and the
 * generic plan the planner picked for tiny tables was a bitmap scan, a
 * sequential scan and a Memoize node).  Here they are plain index scans
 * (index_beginscan / index_getnext_slot).
 *
 * Catalog knowledge is cached per backend: the OIDs of the three tables and
 * of the indexes whose key columns are exactly the looked-up columns, and the
 * attribute numbers.  A relcache invalidation of any of them (ALTER, DROP,
 * CREATE/DROP INDEX, DROP EXTENSION, ...) drops it, and it is checked again
 * after the table is locked, so it never outlives the catalog state.
 *
 * The rows found are cached too (see "Row caches" below): the probes were a
 * fifth of a call's own instructions, and the rows almost never change.
 *
 * These reads bypass row-level security like the previous lookup statement
 * (it ran as fluxrate_system): tenancy is the organization in the index key,
 * the key's own organization.
 */
typedef enum DlWhich
{
	DL_KEY_HASH,				/* api_keys (key_hash) */
	DL_METER_TOKEN,				/* meters (org_id, meter_token) */
	DL_METER_NAME,				/* meters (org_id, meter_name) */
	DL_CUSTOMER,				/* customers (org_id, external_id) */
	DL_N
} DlWhich;

#define DL_MAX_OUT 6
static const struct
{
	const char *rel;
	int			nkeys;
	const char *keys[2];
	Oid			keytypes[2];
	RegProcedure eqprocs[2];
	int			nout;
	const char *out[DL_MAX_OUT];
}			dl_spec[DL_N] = {
	{"api_keys", 1, {"key_hash"}, {BYTEAOID}, {F_BYTEAEQ},
	6, {"org_id", "id", "scopes", "status", "key_hash", "last_used_at"}},
	{"meters", 2, {"org_id", "meter_token"}, {UUIDOID, UUIDOID}, {F_UUID_EQ, F_UUID_EQ},
	4, {"id", "aggregation_type", "property_name", "unique_property"}},
	{"meters", 2, {"org_id", "meter_name"}, {UUIDOID, TEXTOID}, {F_UUID_EQ, F_TEXTEQ},
	4, {"id", "aggregation_type", "property_name", "unique_property"}},
	{"customers", 2, {"org_id", "external_id"}, {UUIDOID, TEXTOID}, {F_UUID_EQ, F_TEXTEQ},
	1, {"id"}},
};

static bool dl_valid = false;
static bool dl_registered = false;
static Oid	dl_rel[DL_N];
static Oid	dl_idx[DL_N];
static AttrNumber dl_att[DL_N][DL_MAX_OUT];

/*
 * Row caches: the rows of api_keys (by key hash), meters (by organization and
 * token or name) and customers (by organization and external id) that track
 * found, per backend.
 *
 * Why they are never stale, given how PostgreSQL (15) delivers invalidations:
 *  - Every UPDATE, DELETE or TRUNCATE of those three tables fires a statement
 *    trigger (30_ingest.sql, ENABLE ALWAYS so replication apply fires it too)
 *    that calls CacheInvalidateRelcache on the table.  The message is queued
 *    at commit (AtEOXact_Inval, before the committing backend releases its
 *    locks and before its COMMIT returns) and is processed locally at the next
 *    CommandCounterIncrement of the writing transaction itself.
 *  - Each track call first calls AcceptInvalidationMessages(), so every
 *    message queued before the call started is processed: DlInvalidate drops
 *    all three caches.  (Lock acquisitions and transaction start process them
 *    too.)  A sinval queue overflow resets everything (relid InvalidOid).
 *  - A miss reads the row with a snapshot taken *after* the invalidations were
 *    processed and the table was locked (GetLatestSnapshot), not the
 *    statement's older snapshot: a change either is visible to that snapshot,
 *    or it commits later and its message arrives later and drops the entry.
 *    If any message is processed while an entry is being filled, the entry is
 *    not stored (rc_generation).
 *  - INSERTs send nothing: no insert can change a row already cached (the
 *    keys are unique), and misses are never cached.
 *  - A row written by the current, uncommitted transaction may be read into a
 *    cache (a customer created by the previous call of the same transaction);
 *    if the transaction or a subtransaction aborts, or is prepared, every entry
 *    stored during it is dropped (RcXactCallback).
 *  - REPEATABLE READ and SERIALIZABLE transactions neither read nor fill the
 *    caches: they probe with the transaction snapshot, as before.
 * So a revocation (or a deletion of a meter or a customer) whose COMMIT has
 * returned is seen by every track call that starts afterwards, in every
 * session, and within its own transaction by the next statement.
 *
 * Texts longer than RC_TEXT_MAX bytes (meter names, external ids) are not
 * cached, and at most RC_MAX_ENTRIES rows are (then the caches start over),
 * so a backend spends at most a few megabytes here.
 */
#define RC_TEXT_MAX		64
#define RC_MAX_ENTRIES	8192

typedef struct RcKey
{
	char		kind;			/* 'k' key hash, 't' token, 'n' name, 'c' customer */
	pg_uuid_t	org;			/* zeros for 'k' */
	char		text[RC_TEXT_MAX];	/* zero-padded: hash, token, name, external id */
} RcKey;

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

typedef struct RcEntry
{
	RcKey		key;
	KeyRow		keyrow;			/* api key */
	/* meter or customer */
	pg_uuid_t	id;
	char		agg[16];
	char	   *property;		/* in rc_context */
	char	   *unique_property;
} RcEntry;

static MemoryContext rc_context = NULL;
static HTAB *rc_table = NULL;
static uint64 rc_generation = 0;
static bool rc_filled_in_xact = false;
static bool rc_callbacks = false;

static void
RcFlush(void)
{
	rc_generation++;
	if (rc_table != NULL)
	{
		rc_table = NULL;
		MemoryContextReset(rc_context);
	}
}

/* Entries stored by a transaction that does not commit may show its writes */
static void
RcXactCallback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			if (rc_filled_in_xact)
				RcFlush();
			rc_filled_in_xact = false;
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			rc_filled_in_xact = false;
			break;
		default:
			break;
	}
}

static void
RcSubXactCallback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB && rc_filled_in_xact)
		RcFlush();
}

/* The caches may be used: the transaction takes a snapshot per statement (READ COMMITTED) */
static bool
RcUsable(void)
{
	return !IsolationUsesXactSnapshot();
}

static void
RcMakeKey(RcKey *k, char kind, const pg_uuid_t *org, const void *text, size_t len)
{
	memset(k, 0, sizeof(*k));
	k->kind = kind;
	if (org)
		memcpy(&k->org, org, sizeof(pg_uuid_t));
	memcpy(k->text, text, len);
}

static RcEntry *
RcFind(const RcKey *k)
{
	if (rc_table == NULL || !dl_valid || !RcUsable())
		return NULL;
	return (RcEntry *) hash_search(rc_table, k, HASH_FIND, NULL);
}

/*
 * A new entry for k, or NULL when it must not be stored: an invalidation was
 * processed since generation gen was read, or the caches are not in use.
 */
static RcEntry *
RcStore(const RcKey *k, uint64 gen)
{
	RcEntry    *e;
	bool		found;

	if (gen != rc_generation || !dl_valid || !RcUsable())
		return NULL;
	if (rc_context == NULL)
		rc_context = AllocSetContextCreate(CacheMemoryContext, "fluxrate ingest row cache",
										   ALLOCSET_DEFAULT_SIZES);
	if (rc_table != NULL && hash_get_num_entries(rc_table) >= RC_MAX_ENTRIES)
		RcFlush();
	if (rc_table == NULL)
	{
		HASHCTL		hctl;

		hctl.keysize = sizeof(RcKey);
		hctl.entrysize = sizeof(RcEntry);
		hctl.hcxt = rc_context;
		rc_table = hash_create("fluxrate ingest rows", 256, &hctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	if (!rc_callbacks)
	{
		RegisterXactCallback(RcXactCallback, NULL);
		RegisterSubXactCallback(RcSubXactCallback, NULL);
		rc_callbacks = true;
	}
	e = (RcEntry *) hash_search(rc_table, k, HASH_ENTER, &found);
	rc_filled_in_xact = true;
	return e;
}

static void
DlInvalidate(Datum arg, Oid relid)
{
	bool		ours = (relid == InvalidOid);

	for (int w = 0; w < DL_N && !ours; w++)
		ours = (relid == dl_rel[w] || relid == dl_idx[w]);
	if (ours)
	{
		/* the row caches live only as long as the catalog knowledge */
		dl_valid = false;
		RcFlush();
	}
}

static AttrNumber
DlAttNum(Relation rel, const char *name, Oid type)
{
	TupleDesc	td = RelationGetDescr(rel);

	for (int i = 0; i < td->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(td, i);

		if (!a->attisdropped && strcmp(NameStr(a->attname), name) == 0 &&
			(type == InvalidOid || a->atttypid == type))
			return a->attnum;
	}
	elog(ERROR, "column %s.%s is missing", RelationGetRelationName(rel), name);
	return InvalidAttrNumber;	/* keep compiler quiet */
}

/*
 * Find the tables, the indexes and the columns.  The locks taken are kept to
 * the end of the transaction, so what was found cannot be dropped under the
 * lookups that follow.
 */
static void DlResolveAll(void);

static void
DlResolve(void)
{
	if (!dl_registered)
	{
		CacheRegisterRelcacheCallback(DlInvalidate, (Datum) 0);
		dl_registered = true;
	}
	RcFlush();
	dl_valid = true;			/* an invalidation from here on means "again" */
	PG_TRY();
	{
		DlResolveAll();
	}
	PG_CATCH();
	{
		/* never leave a half-resolved cache marked valid */
		dl_valid = false;
		RcFlush();
		PG_RE_THROW();
	}
	PG_END_TRY();
}

static void
DlResolveAll(void)
{
	Oid			nsp = get_namespace_oid("fluxrate_internal", false);

	for (int w = 0; w < DL_N; w++)
	{
		Oid			relid = get_relname_relid(dl_spec[w].rel, nsp);
		Relation	rel;
		AttrNumber	keyatt[2];
		List	   *indexes;
		ListCell   *lc;

		if (!OidIsValid(relid))
			elog(ERROR, "relation fluxrate_internal.%s is missing", dl_spec[w].rel);
		rel = table_open(relid, AccessShareLock);
		for (int k = 0; k < dl_spec[w].nkeys; k++)
			keyatt[k] = DlAttNum(rel, dl_spec[w].keys[k], dl_spec[w].keytypes[k]);
		for (int o = 0; o < dl_spec[w].nout; o++)
			dl_att[w][o] = DlAttNum(rel, dl_spec[w].out[o], InvalidOid);
		dl_rel[w] = relid;
		dl_idx[w] = InvalidOid;
		indexes = RelationGetIndexList(rel);
		foreach(lc, indexes)
		{
			Relation	ix = index_open(lfirst_oid(lc), AccessShareLock);
			Form_pg_index f = ix->rd_index;
			bool		ok;

			ok = (ix->rd_rel->relam == BTREE_AM_OID && f->indisvalid && f->indislive &&
				  f->indnkeyatts == dl_spec[w].nkeys &&
				  heap_attisnull(ix->rd_indextuple, Anum_pg_index_indpred, NULL));
			for (int k = 0; ok && k < dl_spec[w].nkeys; k++)
				ok = (f->indkey.values[k] == keyatt[k] &&
					  ix->rd_opcintype[k] == dl_spec[w].keytypes[k] &&
					  get_opcode(get_opfamily_member(ix->rd_opfamily[k], dl_spec[w].keytypes[k],
													 dl_spec[w].keytypes[k], BTEqualStrategyNumber)) ==
					  dl_spec[w].eqprocs[k]);
			index_close(ix, NoLock);
			if (ok && (!OidIsValid(dl_idx[w]) || f->indisunique))
				dl_idx[w] = lfirst_oid(lc);
		}
		list_free(indexes);
		table_close(rel, NoLock);
		if (!OidIsValid(dl_idx[w]))
			elog(ERROR, "no btree index on fluxrate_internal.%s (%s%s%s)", dl_spec[w].rel,
				 dl_spec[w].keys[0], dl_spec[w].nkeys > 1 ? ", " : "",
				 dl_spec[w].nkeys > 1 ? dl_spec[w].keys[1] : "");
	}
}

/*
 * The row of table w whose key columns equal keys into *slot (created here;
 * the caller drops it); false if none.  With fresh (to fill a row cache), the
 * row is read with a snapshot taken after the table was locked (so after the
 * invalidations that locking processes); otherwise with the statement's.
 */
static bool
DlFetch(DlWhich w, Datum *keys, bool fresh, TupleTableSlot **slot)
{
	Relation	heap;
	Relation	idx;
	ScanKeyData sk[2];
	IndexScanDesc scan;
	Snapshot	snap;
	bool		found;

	for (;;)
	{
		while (!dl_valid)
			DlResolve();
		heap = try_table_open(dl_rel[w], AccessShareLock);
		/* locking processed the pending invalidations: still valid? */
		if (heap != NULL && dl_valid)
			break;
		if (heap != NULL)
			table_close(heap, AccessShareLock);
		dl_valid = false;
		RcFlush();
	}
	idx = index_open(dl_idx[w], AccessShareLock);
	if (fresh)
		snap = RegisterSnapshot(GetLatestSnapshot());
	else
		snap = ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
	for (int k = 0; k < dl_spec[w].nkeys; k++)
		ScanKeyEntryInitialize(&sk[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   idx->rd_indcollation[k], dl_spec[w].eqprocs[k], keys[k]);
	*slot = table_slot_create(heap, NULL);
	scan = index_beginscan(heap, idx, snap, dl_spec[w].nkeys, 0);
	index_rescan(scan, sk, dl_spec[w].nkeys, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, *slot);
	index_endscan(scan);
	if (fresh)
		UnregisterSnapshot(snap);
	index_close(idx, NoLock);
	table_close(heap, NoLock);
	return found;
}

static Datum
DlGet(TupleTableSlot *slot, DlWhich w, int out, bool *isnull)
{
	return slot_getattr(slot, dl_att[w][out], isnull);
}

/* The meter (by token or name) of org; from the row cache when it can be */
static bool
LookupMeter(Datum org, TrackInput *in, MeterInfo *m)
{
	Datum		keys[2];
	TupleTableSlot *slot;
	bool		isnull;
	bool		found;
	DlWhich		w;
	RcKey		rk;
	RcEntry    *e;
	bool		cacheable;
	uint64		gen = rc_generation;

	keys[0] = org;
	if (in->meter_token != NULL)
	{
		bool		wellformed = (strlen(in->meter_token) == 36);

		for (const char *c = in->meter_token; *c && wellformed; c++)
			wellformed = (isxdigit((unsigned char) *c) || *c == '-');
		if (!wellformed)
			return false;		/* a malformed token is an unknown meter, not a type error */
		w = DL_METER_TOKEN;
		/* keyed by the token as sent: a hit needs no uuid_in */
		RcMakeKey(&rk, 't', DatumGetUUIDP(org), in->meter_token, 36);
		cacheable = true;
	}
	else if (in->meter_name != NULL)
	{
		size_t		len = strlen(in->meter_name);

		w = DL_METER_NAME;
		cacheable = (len <= RC_TEXT_MAX);
		if (cacheable)
			RcMakeKey(&rk, 'n', DatumGetUUIDP(org), in->meter_name, len);
	}
	else
		return false;			/* reported later by the shape checks */

	if (cacheable && (e = RcFind(&rk)) != NULL)
	{
		/* copied out: an invalidation may free the entry later in this call */
		memcpy(&m->id, &e->id, sizeof(pg_uuid_t));
		memcpy(m->agg, e->agg, sizeof(m->agg));
		m->property = pstrdup(e->property);
		m->unique_property = pstrdup(e->unique_property);
		return true;
	}
	cacheable = cacheable && RcUsable();
	keys[1] = (w == DL_METER_TOKEN) ?
		DirectFunctionCall1(uuid_in, CStringGetDatum(in->meter_token)) :
		CStringGetTextDatum(in->meter_name);
	found = DlFetch(w, keys, cacheable, &slot);
	if (found)
	{
		memcpy(&m->id, DatumGetUUIDP(DlGet(slot, w, 0, &isnull)), sizeof(pg_uuid_t));
		text_to_cstring_buffer(DatumGetTextPP(DlGet(slot, w, 1, &isnull)), m->agg, sizeof(m->agg));
		m->property = TextDatumGetCString(DlGet(slot, w, 2, &isnull));
		m->unique_property = TextDatumGetCString(DlGet(slot, w, 3, &isnull));
		if (cacheable && (e = RcStore(&rk, gen)) != NULL)
		{
			memcpy(&e->id, &m->id, sizeof(pg_uuid_t));
			memcpy(e->agg, m->agg, sizeof(e->agg));
			e->property = MemoryContextStrdup(rc_context, m->property);
			e->unique_property = MemoryContextStrdup(rc_context, m->unique_property);
		}
	}
	ExecDropSingleTupleTableSlot(slot);
	return found;
}

/* The customer of org with this external id; from the row cache when it can be */
static bool
LookupCustomer(Datum org, const char *external_id, pg_uuid_t *out)
{
	Datum		keys[2];
	TupleTableSlot *slot;
	bool		isnull;
	bool		found;
	size_t		len = strlen(external_id);
	bool		cacheable = (len <= RC_TEXT_MAX);
	RcKey		rk;
	RcEntry    *e;
	uint64		gen = rc_generation;

	if (cacheable)
	{
		RcMakeKey(&rk, 'c', DatumGetUUIDP(org), external_id, len);
		if ((e = RcFind(&rk)) != NULL)
		{
			memcpy(out, &e->id, sizeof(pg_uuid_t));
			return true;
		}
	}
	cacheable = cacheable && RcUsable();
	keys[0] = org;
	keys[1] = CStringGetTextDatum(external_id);
	found = DlFetch(DL_CUSTOMER, keys, cacheable, &slot);
	if (found)
	{
		memcpy(out, DatumGetUUIDP(DlGet(slot, DL_CUSTOMER, 0, &isnull)), sizeof(pg_uuid_t));
		if (cacheable && (e = RcStore(&rk, gen)) != NULL)
			memcpy(&e->id, out, sizeof(pg_uuid_t));
	}
	ExecDropSingleTupleTableSlot(slot);
	return found;
}

/*
 * The meter (by token, or by name) and the customer of one event in org.
 * A malformed token is an unknown meter, not a type error; missing fields are
 * reported later by the shape checks, in their usual order.
 */
static void
LookupMeterAndCustomer(Datum org, TrackInput *in, Lookup *lk)
{
	lk->meter_found = LookupMeter(org, in, &lk->m);
	lk->customer_found = (in->customer_external_id != NULL &&
						  LookupCustomer(org, in->customer_external_id, &lk->customer));
}

/* The row of the key with this hash; from the row cache when it can be */
static bool
LookupKey(const unsigned char hash[32], bytea *hash_datum, KeyRow *kr)
{
	Datum		keys[1];
	TupleTableSlot *slot;
	bool		isnull;
	bool		found;
	bool		cacheable = RcUsable();
	RcKey		rk;
	RcEntry    *e;
	uint64		gen = rc_generation;

	RcMakeKey(&rk, 'k', NULL, hash, 32);
	if ((e = RcFind(&rk)) != NULL)
	{
		*kr = e->keyrow;
		return true;
	}
	keys[0] = PointerGetDatum(hash_datum);
	found = DlFetch(DL_KEY_HASH, keys, cacheable, &slot);
	if (found)
	{
		text	   *status = DatumGetTextPP(DlGet(slot, DL_KEY_HASH, 3, &isnull));
		bytea	   *stored = DatumGetByteaPP(DlGet(slot, DL_KEY_HASH, 4, &isnull));
		Datum		d;

		memcpy(&kr->org, DatumGetUUIDP(DlGet(slot, DL_KEY_HASH, 0, &isnull)), sizeof(pg_uuid_t));
		memcpy(&kr->id, DatumGetUUIDP(DlGet(slot, DL_KEY_HASH, 1, &isnull)), sizeof(pg_uuid_t));
		memset(kr->stored_hash, 0, 32);
		kr->stored_ok = (VARSIZE_ANY_EXHDR(stored) == 32);
		if (kr->stored_ok)
			memcpy(kr->stored_hash, VARDATA_ANY(stored), 32);
		kr->active = (VARSIZE_ANY_EXHDR(status) == 6 && memcmp(VARDATA_ANY(status), "ACTIVE", 6) == 0);
		kr->grants_write = FrScopesGrant(DatumGetArrayTypeP(DlGet(slot, DL_KEY_HASH, 2, &isnull)),
										 "usage.write");
		d = DlGet(slot, DL_KEY_HASH, 5, &isnull);
		kr->last_used_null = isnull;
		kr->last_used = isnull ? 0 : DatumGetTimestampTz(d);
		if (cacheable && (e = RcStore(&rk, gen)) != NULL)
			e->keyrow = *kr;
	}
	ExecDropSingleTupleTableSlot(slot);
	return found;
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
 * returned before this call is seen: see "Row caches"), check the scope, then
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

	if (!LookupKey(hash, hash_datum, &kr))
		FrApiKeyAcceptHash(hash, NULL, false);
	/* the hash table or the index found it by equality; compare again in constant time */
	FrApiKeyAcceptHash(hash, kr.stored_ok ? kr.stored_hash : NULL, kr.active);
	memcpy(org, &kr.org, sizeof(pg_uuid_t));

	/* last_used_at at most once a minute */
	if (kr.last_used_null || kr.last_used < now - USECS_PER_MINUTE)
		TouchKeyAsSystem(UUIDPGetDatum(org), UUIDPGetDatum(&kr.id), now);

	if (!kr.grants_write)
		ereport(ERROR,
				(errcode(FR_ERRCODE_FORBIDDEN),
				 errmsg("api key lacks the usage.write scope"),
				 errhint("Create a key with the usage.write scope.")));
	LookupMeterAndCustomer(UUIDPGetDatum(org), in, lk);
	return UUIDPGetDatum(org);
}

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
		if (SPI_execute_plan(Prepare(&plan_customer,
									 "SELECT id FROM fluxrate_internal.customers "
									 "WHERE org_id OPERATOR(pg_catalog.=) $1 AND external_id OPERATOR(pg_catalog.=) $2",
									 2, (Oid[]) {UUIDOID, TEXTOID}), args, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "customer lookup failed");
		if (SPI_processed == 1)
			break;
		/* unknown external id: create the customer (name = external id, no e-mail) */
		if (SPI_execute_plan(Prepare(&plan_customer_ins,
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
static bool
LooksNumeric(const char *s)
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

		if (!LooksNumeric(s))
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

static void
CheckQuantity(Numeric q, const char *agg)
{
	Datum		scale;
	bool		sum_like = (strcmp(agg, "SUM") == 0 || strcmp(agg, "COUNT") == 0);
	int			cmp;

	if (numeric_is_nan(q) || numeric_is_inf(q))
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity must be a finite number")));
	cmp = DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(q),
											DirectFunctionCall1(int4_numeric, Int32GetDatum(0))));
	if (sum_like ? cmp <= 0 : cmp < 0)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity must be %s", sum_like ? "greater than zero" : "zero or more"),
				 errdetail("quantity was %s.", numeric_normalize(q))));
	scale = DirectFunctionCall1(numeric_scale, NumericGetDatum(q));
	if (DatumGetInt32(scale) > FR_MAX_SCALE)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("quantity has more than 12 decimal places"),
				 errdetail("quantity was %s.", DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(q))))));
}

/* Building the result as a JsonbValue: no text to print and parse again */
static void
PushKey(JsonbParseState **st, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	pushJsonbValue(st, WJB_KEY, &v);
}

static void
PushString(JsonbParseState **st, const char *key, const char *val)
{
	JsonbValue	v;

	PushKey(st, key);
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

static void
PushUuid(JsonbParseState **st, const char *key, pg_uuid_t *u)
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
	PushString(st, key, buf);
}

/* A timestamp as to_jsonb() writes it (pushJsonbValue keeps the pointer: no stack buffer) */
static void
PushTs(JsonbParseState **st, const char *key, TimestampTz ts)
{
	PushString(st, key, JsonEncodeDateTime(NULL, TimestampTzGetDatum(ts), TIMESTAMPTZOID, NULL));
}

/* The event as Fluxrate returns it */
static Jsonb *
EventJson(pg_uuid_t *id, pg_uuid_t *customer, pg_uuid_t *meter, Numeric q, TimestampTz ts,
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
	PushUuid(&st, "id", id);
	PushKey(&st, "replay");
	v.type = jbvBool;
	v.val.boolean = replay;
	pushJsonbValue(&st, WJB_VALUE, &v);
	PushUuid(&st, "meter_id", meter);
	PushString(&st, "quantity", DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(q))));
	PushKey(&st, "meta_data");
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
		PushString(&st, "timestamp", t);
	else
		PushTs(&st, "timestamp", ts);
	PushString(&st, "created_at", t);
	PushUuid(&st, "customer_id", customer);
	PushString(&st, "ingested_at", t);
	PushString(&st, "idempotency_key", key);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* Checks that need no meter and no database: presence and shape of the fields */
static void
CheckInputShape(TrackInput *in)
{
	if (in->meter_token == NULL && in->meter_name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("meter_token is required"),
				 errhint("Send meter_token with quantity, or meter_name with properties.")));
	if (in->customer_external_id == NULL || in->customer_external_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("customer_external_id is required")));
	if (in->idempotency_key != NULL && (in->idempotency_key[0] == '\0' || strlen(in->idempotency_key) > 255))
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
static Jsonb *
PrepareEvent(TrackInput *in, MeterInfo *m, TimestampTz now, Numeric *q_out, TimestampTz *ts_out)
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
	CheckQuantity(q, m->agg);

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

/* The payload a replay must repeat: meter, customer, value, time (if sent), metadata */
static void
PayloadHash(TrackInput *in, MeterInfo *m, pg_uuid_t *customer, Numeric q, TimestampTz ts, Jsonb *meta,
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

	PayloadHash(in, m, customer, q, ts, meta, hash);
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
	if (SPI_execute_plan(Prepare(&plan_event_ins,
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING",
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
		if (SPI_execute_plan(Prepare(&plan_event_get,
									 "SELECT id, customer_id, meter_id, quantity, \"timestamp\", ingested_at, payload_hash, metadata "
									 "FROM fluxrate_internal.usage_events "
									 "WHERE org_id OPERATOR(pg_catalog.=) $1 AND idempotency_key OPERATOR(pg_catalog.=) $2",
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
		memcpy(&out->customer, DatumGetUUIDP(SPI_getbinval(tup, td, 2, &isnull)), 16);
		memcpy(&out->meter, DatumGetUUIDP(SPI_getbinval(tup, td, 3, &isnull)), 16);
		out->quantity = DatumGetNumeric(SPI_getbinval(tup, td, 4, &isnull));
		out->ts = DatumGetTimestampTz(SPI_getbinval(tup, td, 5, &isnull));
		out->ingested = DatumGetTimestampTz(SPI_getbinval(tup, td, 6, &isnull));
		d = SPI_getbinval(tup, td, 8, &isnull);
		out->meta = isnull ? NULL : DatumGetJsonbP(d);
		return EV_REPLAY;
	}
}

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

	CheckInputShape(in);
	if (!lk->meter_found)
		RaiseMeterNotFound(in);
	meta = PrepareEvent(in, &lk->m, now, &q, &ts);

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
	return EventJson(&ev.id, &ev.customer, &ev.meter, ev.quantity, ev.ts, ev.ingested,
					 in->idempotency_key, ev.meta, *replay);
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

static char *
ArgText(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/*
 * fluxrate_internal.ingest_cache_invalidate(): statement trigger (AFTER UPDATE
 * OR DELETE OR TRUNCATE) on api_keys, meters and customers.  Queues a relcache
 * invalidation of the table, delivered to every backend when this transaction
 * commits (and to this one at its next command), which drops the row caches
 * of fluxrate.track: see "Row caches".  Nothing else of the relcache entry
 * changes; plans using the table are re-planned once.
 */
PG_FUNCTION_INFO_V1(fr_ingest_cache_invalidate);
Datum
fr_ingest_cache_invalidate(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("ingest_cache_invalidate must be called as a statement trigger")));
	CacheInvalidateRelcache(td->tg_relation);
	return PointerGetDatum(NULL);
}

/* pg_catalog only: see fr_track */
static OverrideSearchPath pinned_path = {NIL, true, false, 0};

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
	 * transaction happens to take: see "Row caches".  Cheap when none is
	 * pending (one unlocked test of a shared flag).
	 */
	AcceptInvalidationMessages();
	/* the key (if any), the meter and the customer: row caches or direct index lookups */
	if (!PG_ARGISNULL(8))
		org = LookupWithKey(text_to_cstring(PG_GETARG_TEXT_PP(8)), &in, now, &lk);
	else
	{
		org = FrRequireOrg("usage.write");
		LookupMeterAndCustomer(org, &in, &lk);
	}
	result = TrackOne(org, &in, &lk, now, &replay);
	{
		MemoryContext spi = MemoryContextSwitchTo(caller);

		result = (Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(result));
		MemoryContextSwitchTo(spi);
	}
	SPI_finish();
	PopOverrideSearchPath();
	SetResponseStatus(replay ? "200" : "201");
	PG_RETURN_JSONB_P(result);
}

/* Fields of one batch element */
static void
BatchInput(Jsonb *ev, TrackInput *in)
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

static void
PushInt(JsonbParseState **st, const char *key, int val)
{
	JsonbValue	v;

	PushKey(st, key);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(val);
	pushJsonbValue(st, WJB_VALUE, &v);
}

/* Per-batch cache of meters by token or name */
typedef struct MeterEntry
{
	char		key[NAMEDATALEN * 2];	/* "t:<token>" or "n:<name>" */
	bool		found;
	MeterInfo	m;
} MeterEntry;

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

static int
CompareCStrings(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

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
	HASHCTL		hctl;
	HTAB	   *map;
	char	  **ids = palloc(sizeof(char *) * Max(n, 1));
	int			nids = 0;
	/* entries: the external id (key), then the customer id, then "known" */
	memset(&hctl, 0, sizeof(hctl));
	hctl.hcxt = CurrentMemoryContext;
	hctl.keysize = NAMEDATALEN * 4;
	hctl.entrysize = NAMEDATALEN * 4 + sizeof(pg_uuid_t) + sizeof(bool) + 8;
	map = hash_create("fluxrate batch customers", Max(n, 16), &hctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	for (int i = 0; i < n; i++)
	{
		bool		hit;
		char	   *e;

		if (ev[i].status == 2)
			continue;
		if (strlen(ev[i].in.customer_external_id) >= NAMEDATALEN * 4)
		{
			ev[i].status = 2;
			ev[i].sqlerrcode = ERRCODE_INVALID_PARAMETER_VALUE;
			ev[i].message = "customer_external_id is longer than 255 characters";
			continue;
		}
		e = hash_search(map, ev[i].in.customer_external_id, HASH_ENTER, &hit);
		if (!hit)
		{
			*(bool *) (e + NAMEDATALEN * 4 + sizeof(pg_uuid_t)) = false;
			ids[nids++] = ev[i].in.customer_external_id;
		}
	}
	if (nids == 0)
		return;
	qsort(ids, nids, sizeof(char *), CompareCStrings);

	for (int pass = 0; pass < 2; pass++)
	{
		Datum		args[2];
		char	  **missing = palloc(sizeof(char *) * nids);
		int			nmissing = 0;

		args[0] = org;
		args[1] = PointerGetDatum(TextArray(ids, nids));
		if (SPI_execute_plan(Prepare(&plan_batch_customers,
									 "SELECT c.external_id, c.id FROM pg_catalog.unnest($2) AS x "
									 "JOIN fluxrate_internal.customers c "
									 "ON c.org_id OPERATOR(pg_catalog.=) $1 AND c.external_id OPERATOR(pg_catalog.=) x",
									 2, (Oid[]) {UUIDOID, TEXTARRAYOID}), args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "customer lookup failed");
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool		isnull;
			char	   *ext = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);
			char	   *e = hash_search(map, ext, HASH_FIND, NULL);

			if (e)
			{
				memcpy(e + NAMEDATALEN * 4, DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull)), 16);
				*(bool *) (e + NAMEDATALEN * 4 + sizeof(pg_uuid_t)) = true;
			}
		}
		for (int i = 0; i < nids; i++)
		{
			char	   *e = hash_search(map, ids[i], HASH_FIND, NULL);

			if (!*(bool *) (e + NAMEDATALEN * 4 + sizeof(pg_uuid_t)))
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
			if (SPI_execute_plan(Prepare(&plan_batch_customers_ins,
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
		char	   *e;

		if (ev[i].status == 2)
			continue;
		e = hash_search(map, ev[i].in.customer_external_id, HASH_FIND, NULL);
		memcpy(&ev[i].customer, e + NAMEDATALEN * 4, 16);
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
	HASHCTL		hctl;
	char	  **keyed;
	int			nkeyed = 0;

	for (int i = 0; i < n; i++)
	{
		bytea	   *hb;

		if (ev[i].status == 2)
			continue;
		PayloadHash(&ev[i].in, ev[i].m, &ev[i].customer, ev[i].q, ev[i].ts, ev[i].meta, ev[i].hash);
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
	if (SPI_execute_plan(Prepare(&plan_batch_insert,
								 "INSERT INTO fluxrate_internal.usage_events (org_id, id, customer_id, meter_id, quantity, "
								 "\"timestamp\", ingested_at, idempotency_key, payload_hash, metadata) "
								 "SELECT $1, u.id, u.c, u.m, u.q, u.t, $2, u.k, u.h, u.md "
								 "FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6), "
								 "pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9), pg_catalog.unnest($10)) AS u(id, c, m, q, t, k, h, md) "
								 "ON CONFLICT (org_id, idempotency_key) DO NOTHING",
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
		if (SPI_execute_plan(Prepare(&plan_batch_existing,
									 "SELECT e.idempotency_key, e.id, e.payload_hash FROM pg_catalog.unnest($2) AS x "
									 "JOIN fluxrate_internal.usage_events e "
									 "ON e.org_id OPERATOR(pg_catalog.=) $1 AND e.idempotency_key OPERATOR(pg_catalog.=) x",
									 2, (Oid[]) {UUIDOID, TEXTARRAYOID}), gargs, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read the events of taken idempotency keys");
		memset(&hctl, 0, sizeof(hctl));
		hctl.keysize = 256;
		hctl.entrysize = 256 + 16 + 32;
		hctl.hcxt = CurrentMemoryContext;
		bykey = hash_create("fluxrate batch keys", nkeyed, &hctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool		isnull;
			HeapTuple	tup = SPI_tuptable->vals[r];
			TupleDesc	td = SPI_tuptable->tupdesc;
			char	   *key = SPI_getvalue(tup, td, 1);
			char	   *e = hash_search(bykey, key, HASH_ENTER, NULL);
			bytea	   *h = DatumGetByteaPP(SPI_getbinval(tup, td, 3, &isnull));

			memcpy(e + 256, DatumGetUUIDP(SPI_getbinval(tup, td, 2, &isnull)), 16);
			memset(e + 272, 0, 32);
			if (!isnull && VARSIZE_ANY_EXHDR(h) == 32)
				memcpy(e + 272, VARDATA_ANY(h), 32);
		}
		for (int j = 0; j < k; j++)
		{
			BatchEvent *b = &ev[pos[j]];
			char	   *e;

			if (b->in.idempotency_key == NULL)
				continue;		/* never skipped */
			e = hash_search(bykey, b->in.idempotency_key, HASH_FIND, NULL);
			if (e != NULL && memcmp(e + 256, &b->id, 16) == 0)
				continue;		/* ours: created */
			if (e != NULL && sodium_memcmp(e + 272, b->hash, 32) == 0)
			{
				b->status = 1;
				memcpy(&b->id, e + 256, 16);
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
	HASHCTL		hctl;
	HTAB	   *meters;
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

	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = sizeof(((MeterEntry *) 0)->key);
	hctl.entrysize = sizeof(MeterEntry);
	hctl.hcxt = CurrentMemoryContext;
	meters = hash_create("fluxrate batch meters", 16, &hctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* everything of the batch lives until the end of the call */
	MemoryContextSwitchTo(caller);

	it = JsonbIteratorInit(&events->root);
	while ((tok = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
	{
		BatchEvent *volatile b;
		MeterEntry *me = NULL;
		char		key[NAMEDATALEN * 2];

		if (tok != WJB_ELEM)
			continue;
		b = &ev[idx++];

		/* 1. shape: pure code, errors caught in place */
		PG_TRY();
		{
			BatchInput(JsonbValueToJsonb(&elem), &b->in);
			CheckInputShape(&b->in);
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

			snprintf(key, sizeof(key), "%c:%s", b->in.meter_token ? 't' : 'n',
					 b->in.meter_token ? b->in.meter_token : b->in.meter_name);
			me = hash_search(meters, key, HASH_ENTER, &hit);
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

			b->meta = PrepareEvent(&b->in, b->m, now, &q, &ts);
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
	PushKey(&st, "results");
	pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
	{
		pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		PushInt(&st, "index", i);
		if (ev[i].status == 2)
		{
			PushString(&st, "status", "error");
			/* unpack_sql_state returns a static buffer: copy (pushJsonbValue keeps pointers) */
			PushString(&st, "code", pstrdup(unpack_sql_state(ev[i].sqlerrcode)));
			PushString(&st, "message", ev[i].message ? ev[i].message : "error");
			failed++;
		}
		else
		{
			PushString(&st, "status", ev[i].status == 1 ? "replay" : "created");
			PushUuid(&st, "id", &ev[i].id);
			if (ev[i].status == 1)
				replayed++;
			else
				created++;
		}
		pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	}
	pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	PushInt(&st, "created", created);
	PushInt(&st, "replayed", replayed);
	PushInt(&st, "failed", failed);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	SetResponseStatus(created > 0 ? "201" : "200");
	PG_RETURN_JSONB_P(JsonbValueToJsonb(res));
}
