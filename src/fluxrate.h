/*-------------------------------------------------------------------------
 * fluxrate.h
 *	  Shared declarations of the fluxrate extension: SQLSTATEs, settings,
 *	  and the helpers every concern (ingest, rating, auth, delivery) uses.
 *
 * SQLSTATE policy (PostgREST turns these into HTTP statuses, see README):
 *	  22004 null_value_not_allowed   missing required field         -> 400
 *	  22P02 / 22007 / 22023          malformed or unknown value     -> 400
 *	  23505 unique_violation         duplicate lookup key / id      -> 409
 *	  PT401                          missing or bad credentials     -> 401
 *	  PT403                          credential lacks the scope     -> 403
 *	  PT404                          unknown (or foreign) id        -> 404
 *	  PT409                          state conflict (idempotency key reused with
 *	                                 another payload, invoice not in the right
 *	                                 status)                        -> 409
 *	  PT422                          well-formed but invalid value  -> 422
 *-------------------------------------------------------------------------
 */
#ifndef FLUXRATE_H
#define FLUXRATE_H

#include "postgres.h"
#include "fmgr.h"
#include "utils/timestamp.h"

#define FR_ERRCODE_UNAUTHENTICATED	MAKE_SQLSTATE('P','T','4','0','1')
#define FR_ERRCODE_FORBIDDEN		MAKE_SQLSTATE('P','T','4','0','3')
#define FR_ERRCODE_NOT_FOUND		MAKE_SQLSTATE('P','T','4','0','4')
#define FR_ERRCODE_CONFLICT			MAKE_SQLSTATE('P','T','4','0','9')
#define FR_ERRCODE_UNPROCESSABLE	MAKE_SQLSTATE('P','T','4','2','2')

/* settings (fluxrate.c) */
extern char *fr_pinned_now;		/* fluxrate.pinned_now, superuser only */
extern char *fr_acting_org;		/* fluxrate.acting_org */
extern char *fr_current_org;	/* fluxrate.current_org, set by API functions */

/* outbound_policy.c, outbound_engine.c: the outbound policy, the transfers and the delivery settings */
extern char *fr_outbound_allow;
extern int	fr_delivery_concurrency;
extern int	fr_delivery_per_org;
extern int	fr_delivery_per_endpoint;
extern void FrOutboundInit(void);

/* context.c */
extern TimestampTz FrNow(void);
extern bool FrCallerIsTrusted(void);
extern void FrSetCurrentOrg(const char *org_text);
extern Datum FrRequireOrg(const char *scope);

/* util.c */
extern void FrUuidV7(unsigned char out[16], TimestampTz ts);
extern void FrRandomBase62(char *out, int len);



/* apikey.c */
#include "utils/array.h"
extern void FrVerifyApiKey(const char *key, Datum *org, Datum *key_id, ArrayType **scopes);
extern bool FrScopesGrant(ArrayType *scopes, const char *scope);
extern bytea *FrApiKeyHash(const char *key, unsigned char hash[32]);
extern void FrApiKeyAccept(const unsigned char hash[32], bytea *stored, bool active);
extern void FrApiKeyAcceptHash(const unsigned char hash[32], const unsigned char *stored, bool active);
extern void FrApiKeyTouch(Datum org, Datum key_id, TimestampTz now);
/* secrets.c */
extern void FrBecomeSystem(Oid *save_user, int *save_sec);
extern unsigned char *FrServerSecret(const char *name);
/* jwt.c */
extern void FrHmacSha256(const unsigned char *key, size_t keylen, const char *msg, size_t msglen, unsigned char mac[32]);
extern char *FrJwtVerifyText(const char *token, const unsigned char *key, size_t keylen, double now);
/* currency.c */
extern int FrCurrencyExponent(const char *code);

#endif							/* FLUXRATE_H */
