/*-------------------------------------------------------------------------
 * ingest_lock.c
 *	  The lock that makes a deletion wait for the tracks of what it deletes.
 *
 * A track that read the customer (or verified the key) before
 * delete_customer or delete_organization committed, and committed after it,
 * wrote an event for a customer that no longer existed (issue 19).  Now every
 * track holds, until its transaction ends, a transaction-level lock in SHARE
 * mode on one of 16 buckets of its organization, chosen by a hash of the
 * customer's external id, and takes it *before* it looks the customer up;
 * delete_customer takes the bucket of the customer it deletes in EXCLUSIVE
 * mode, delete_organization all 16, before they delete anything.  So:
 *  - a deletion waits for the open transactions that tracked into its bucket
 *    (their events are committed, then deleted with the rest);
 *  - a track that comes while a deletion holds the bucket waits for it, then
 *    looks the customer up after the deletion committed (READ COMMITTED: a
 *    new snapshot; the invalidations of the deletion were queued before its
 *    locks were released, and are processed here before the lookup): the
 *    customer is gone, so the track creates it anew (a later track of that id
 *    is a new customer), or, if the organization is gone, fails (23503 on the
 *    customer's organization, PT401 for the key on the next call).
 * In REPEATABLE READ and SERIALIZABLE the lookup reads the transaction's
 * snapshot, which may predate the deletion: after the lock the customer is
 * read again with a new snapshot and a deleted one is 40001 (single track;
 * see docs/security.md "Deletion" for what stays behind otherwise).
 *
 * Why buckets and not one lock per customer: a batch of 1,000 customers takes
 * at most 16 locks, not 1,000 (the shared lock table has room for about 64
 * per connection), and an organization's deletion takes 16.  Two customers
 * share a bucket: a deletion then also waits for the other's open tracks
 * (autocommit tracks hold it for microseconds).  The tag is an advisory lock
 * tag (visible in pg_locks) in a class of its own (field 4), so no
 * pg_advisory_lock() call can take or collide with it.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/uuid.h"

#include "ingest.h"

#define FR_EVENT_LOCK_CLASS		0x4652	/* "FR": pg_advisory_lock uses 1 and 2 */

static void
EventLock(const pg_uuid_t *org, uint32 bucket, LOCKMODE mode)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, hash_bytes(org->data, UUID_LEN), bucket,
						 FR_EVENT_LOCK_CLASS);
	(void) LockAcquire(&tag, mode, false, false);
}

/* The bucket of a customer's external id */
uint32
FrEventLockBucket(const char *external_id)
{
	return hash_bytes((const unsigned char *) external_id, strlen(external_id)) % FR_EVENT_LOCK_BUCKETS;
}

/* Every bucket in buckets[] (true = take it) in SHARE mode, in ascending order */
void
FrLockEventBuckets(Datum org, const bool *buckets)
{
	for (uint32 b = 0; b < FR_EVENT_LOCK_BUCKETS; b++)
		if (buckets[b])
			EventLock(DatumGetUUIDP(org), b, ShareLock);
}

/* The track side: the bucket of one external id, in SHARE mode */
void
FrLockCustomerEvents(Datum org, const char *external_id)
{
	EventLock(DatumGetUUIDP(org), FrEventLockBucket(external_id), ShareLock);
}

/*
 * fluxrate_internal.lock_customer_events(org uuid, external_id text): the
 * deletion side, EXCLUSIVE.  STRICT: a customer without an external id cannot
 * be tracked.
 */
PG_FUNCTION_INFO_V1(fr_lock_customer_events);
Datum
fr_lock_customer_events(PG_FUNCTION_ARGS)
{
	char	   *ext = text_to_cstring(PG_GETARG_TEXT_PP(1));

	EventLock(PG_GETARG_UUID_P(0), FrEventLockBucket(ext), ExclusiveLock);
	PG_RETURN_VOID();
}

/* fluxrate_internal.lock_org_events(org uuid): every bucket, EXCLUSIVE, in ascending order */
PG_FUNCTION_INFO_V1(fr_lock_org_events);
Datum
fr_lock_org_events(PG_FUNCTION_ARGS)
{
	for (uint32 b = 0; b < FR_EVENT_LOCK_BUCKETS; b++)
		EventLock(PG_GETARG_UUID_P(0), b, ExclusiveLock);
	PG_RETURN_VOID();
}
