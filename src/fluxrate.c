/*-------------------------------------------------------------------------
 * fluxrate.c
 *	  Module entry point: libsodium initialisation and the fluxrate.*
 *	  settings.  Everything else lives in one file per concern.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "fmgr.h"
#include "utils/guc.h"

#include "fluxrate.h"

PG_MODULE_MAGIC;

char	   *fr_pinned_now = NULL;
char	   *fr_acting_org = NULL;
char	   *fr_current_org = NULL;

void		_PG_init(void);

void
_PG_init(void)
{
	/* 1 means "already initialised", which is fine; -1 leaves us without RNG */
	if (sodium_init() < 0)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("fluxrate could not initialise libsodium")));

	DefineCustomStringVariable("fluxrate.pinned_now",
							   "Pins the clock fluxrate reads (fluxrate.now()); empty means the real transaction time.",
							   "Tests and replays set it; only superusers may, so tenants cannot move time.",
							   &fr_pinned_now, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("fluxrate.acting_org",
							   "Organization a trusted application role acts for (see fluxrate.act_as()).",
							   "Honoured only for members of fluxrate_app and superusers.",
							   &fr_acting_org, "", PGC_USERSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);
	DefineCustomStringVariable("fluxrate.current_org",
							   "Organization resolved by the running API call; row-level security policies read it.",
							   NULL,
							   &fr_current_org, "", PGC_USERSET, GUC_NOT_IN_SAMPLE | GUC_NO_SHOW_ALL, NULL, NULL, NULL);

	FrOutboundInit();

	MarkGUCPrefixReserved("fluxrate");
}
