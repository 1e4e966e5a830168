/*-------------------------------------------------------------------------
 * ingest_cache.c
 *	  fluxrate.track's per-backend row caches of API keys, meters and
 *	  customers, the direct index lookups that fill them, and when they are
 *	  flushed: the relcache callback (DlInvalidate), the end of a transaction
 *	  or subtransaction that does not commit (RcXactCallback), and the
 *	  statement trigger on the three tables (fr_ingest_cache_invalidate).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/tuptable.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/uuid.h"

#include "ingest.h"

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

/* Drop every cached row (and make any fill in progress not store its entry) */
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

/* A subtransaction that aborts may have cached its own writes: drop them all */
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

/* The hash key of one cached row: kind, organization and zero-padded text */
static void
RcMakeKey(RcKey *k, char kind, const pg_uuid_t *org, const void *text, size_t len)
{
	memset(k, 0, sizeof(*k));
	k->kind = kind;
	if (org)
		memcpy(&k->org, org, sizeof(pg_uuid_t));
	memcpy(k->text, text, len);
}

/* The cached row of k, or NULL (miss, caches not in use, or catalog knowledge invalid) */
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

/* Relcache callback: an invalidation of one of our tables or indexes drops what we know */
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

/* The attribute number of column name (of type, unless InvalidOid) of rel; error if missing */
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

/* Register the callback once, then find the tables, indexes and columns (never half-valid) */
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

/* For each lookup: the table, its btree index on exactly the key columns, the out columns */
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

/* Column out of lookup w from a row DlFetch found */
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
void
FrLookupMeterAndCustomer(Datum org, TrackInput *in, Lookup *lk)
{
	lk->meter_found = LookupMeter(org, in, &lk->m);
	lk->customer_found = (in->customer_external_id != NULL &&
						  LookupCustomer(org, in->customer_external_id, &lk->customer));

	/*
	 * REPEATABLE READ, SERIALIZABLE: the transaction's snapshot may predate a
	 * deletion of the customer that committed before the caller took its
	 * deletion lock (ingest_lock.c).  Read it again with a new snapshot: a
	 * customer deleted meanwhile is a serialization failure, as a foreign key
	 * would make it, not an event for a customer that no longer exists.
	 */
	if (lk->customer_found && IsolationUsesXactSnapshot())
	{
		Datum		keys[2];
		TupleTableSlot *slot;
		bool		isnull;
		bool		same;

		keys[0] = org;
		keys[1] = CStringGetTextDatum(in->customer_external_id);
		same = DlFetch(DL_CUSTOMER, keys, true, &slot) &&
			memcmp(DatumGetUUIDP(DlGet(slot, DL_CUSTOMER, 0, &isnull)), &lk->customer, sizeof(pg_uuid_t)) == 0;
		ExecDropSingleTupleTableSlot(slot);
		if (!same)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to a concurrent deletion of customer \"%s\"",
							in->customer_external_id),
					 errhint("Retry the transaction: the track then creates the customer anew.")));
	}
}

/* The row of the key with this hash; from the row cache when it can be */
bool
FrLookupKey(const unsigned char hash[32], bytea *hash_datum, KeyRow *kr)
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

