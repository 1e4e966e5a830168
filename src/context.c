/*-------------------------------------------------------------------------
 * context.c
 *	  Who is calling, for which organization, and what time it is.
 *
 * Every public API function resolves the organization exactly once, through
 * fluxrate_internal.require_org(scope), and then passes org_id explicitly to
 * every query (Citus-friendly: notes section 5).  The resolved organization is
 * also written to the transaction-local setting fluxrate.current_org, which the
 * row-level-security policies on every table read: a second wall should a query
 * ever forget its org_id predicate.
 *
 * Where the organization comes from, in order:
 *	 1. request.jwt.claims ->> 'org_id' -- set by PostgREST after it verified a
 *		JWT, or by fluxrate's pre-request after it verified an API key or the
 *		access_token cookie.  Claims may carry "scopes" (API keys); claims
 *		without scopes are a signed-in dashboard user with every scope.
 *	 2. fluxrate.acting_org -- set by fluxrate.act_as() for a trusted
 *		application role: a member of fluxrate_app, or a superuser.  The role
 *		checked is the *outer* role (SET ROLE / session user), which SECURITY
 *		DEFINER does not change.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"

/* Parse of the last fluxrate.pinned_now value, so now() stays cheap */
static char pinned_cache_text[128];
static TimestampTz pinned_cache_value;

/*
 * The engine's only clock.  A pinned value (tests, replays) wins; otherwise
 * the transaction start time, so one transaction sees one instant.
 */
TimestampTz
FrNow(void)
{
	if (fr_pinned_now != NULL && fr_pinned_now[0] != '\0')
	{
		if (strncmp(pinned_cache_text, fr_pinned_now, sizeof(pinned_cache_text)) != 0)
		{
			Datum		d = DirectFunctionCall3(timestamptz_in,
											  CStringGetDatum(fr_pinned_now),
											  ObjectIdGetDatum(InvalidOid),
											  Int32GetDatum(-1));

			pinned_cache_value = DatumGetTimestampTz(d);
			strlcpy(pinned_cache_text, fr_pinned_now, sizeof(pinned_cache_text));
		}
		return pinned_cache_value;
	}
	return GetCurrentTransactionStartTimestamp();
}

PG_FUNCTION_INFO_V1(fr_now);
Datum
fr_now(PG_FUNCTION_ARGS)
{
	PG_RETURN_TIMESTAMPTZ(FrNow());
}

/* Is the outer role (not the SECURITY DEFINER owner) allowed to act_as? */
bool
FrCallerIsTrusted(void)
{
	Oid			outer = GetOuterUserId();
	Oid			app = get_role_oid("fluxrate_app", true);

	if (superuser_arg(outer))
		return true;
	return OidIsValid(app) && has_privs_of_role(outer, app);
}

PG_FUNCTION_INFO_V1(fr_caller_is_trusted);
Datum
fr_caller_is_trusted(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(FrCallerIsTrusted());
}

void
FrSetCurrentOrg(const char *org_text)
{
	(void) set_config_option("fluxrate.current_org", org_text,
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL,
							 true, 0, false);
}

/* Fetch a top-level string member of a jsonb object, or NULL */
static char *
JsonbGetText(Jsonb *jb, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	if (!JB_ROOT_IS_OBJECT(jb))
		return NULL;
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/*
 * Is the outer role exactly this role?  Not membership: PostgREST switches to
 * fluxrate_web or fluxrate_apikey (SET LOCAL ROLE) after it, or our
 * pre-request, verified a token or a key, so a request runs as the role
 * itself.  An application role that is merely granted fluxrate_apikey (the
 * natural grant for a backend that tracks) could otherwise set
 * request.jwt.claims itself and act as any organization.  Such a role can
 * still SET ROLE fluxrate_apikey: that is why the claims-believing roles are
 * for PostgREST's authenticator only (fluxrate_internal.role_grant_warnings(),
 * docs/security.md "Roles"); SQL applications get fluxrate_ingest.
 */
static bool
RoleIs(Oid outer, const char *role)
{
	Oid			r = get_role_oid(role, true);

	return OidIsValid(r) && outer == r;
}

/*
 * Does the claims' "scopes" array grant scope?  Without "scopes" (a signed-in
 * user's token), every scope when no_scopes_means_all.
 */
static bool
ClaimsGrantScope(Jsonb *jb, const char *scope, bool no_scopes_means_all)
{
	JsonbValue	k;
	JsonbValue *v;
	JsonbIterator *it;
	JsonbValue	elem;
	JsonbIteratorToken tok;
	bool		found = false;

	k.type = jbvString;
	k.val.string.val = "scopes";
	k.val.string.len = 6;
	v = findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
	if (v == NULL)
		return no_scopes_means_all;
	if (scope == NULL || scope[0] == '\0')
		return true;
	if (v->type != jbvBinary)
		return false;
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
	{
		if (tok == WJB_ELEM && elem.type == jbvString &&
			((elem.val.string.len == strlen(scope) &&
			  memcmp(elem.val.string.val, scope, elem.val.string.len) == 0) ||
			 (elem.val.string.len == 5 &&
			  memcmp(elem.val.string.val, "admin", 5) == 0)))
			found = true;
	}
	return found;
}

/*
 * Resolve the calling organization (see the file header), check the scope,
 * publish it in fluxrate.current_org and return it.
 */
Datum
FrRequireOrg(const char *scope)
{
	const char *claims = GetConfigOption("request.jwt.claims", true, false);
	char	   *org = NULL;

	if (claims != NULL && claims[0] != '\0')
	{
		Jsonb	   *jb;

		jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(claims)));
		org = JsonbGetText(jb, "org_id");
		if (org != NULL)
		{
			Oid			outer = GetOuterUserId();
			bool		web = RoleIs(outer, "fluxrate_web");
			bool		key = RoleIs(outer, "fluxrate_apikey");
			bool		trusted = FrCallerIsTrusted();

			/*
			 * request.jwt.claims is an ordinary setting anyone can SET: it is
			 * believed only from the roles PostgREST switches to after it (or
			 * our pre-request) verified a token or key, and from trusted roles.
			 */
			if (!web && !key && !trusted)
				ereport(ERROR,
						(errcode(FR_ERRCODE_UNAUTHENTICATED),
						 errmsg("request.jwt.claims is not accepted from role \"%s\"",
								GetUserNameFromId(outer, false)),
						 errhint("Claims are set by PostgREST for fluxrate_web and fluxrate_apikey; application roles use fluxrate.act_as().")));
			/* a key caller without a scopes claim has no scope at all */
			if (!ClaimsGrantScope(jb, scope, web || trusted))
				ereport(ERROR,
						(errcode(FR_ERRCODE_FORBIDDEN),
						 errmsg("credential lacks the %s scope", scope),
						 errhint("Create an API key with the %s scope.", scope)));
		}
	}
	if (org == NULL && fr_acting_org != NULL && fr_acting_org[0] != '\0')
	{
		if (!FrCallerIsTrusted())
			ereport(ERROR,
					(errcode(FR_ERRCODE_UNAUTHENTICATED),
					 errmsg("role \"%s\" may not act for an organization",
							GetUserNameFromId(GetOuterUserId(), false)),
					 errhint("Grant fluxrate_app to the application role, or authenticate with an API key or a token.")));
		org = fr_acting_org;
	}
	if (org == NULL)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNAUTHENTICATED),
				 errmsg("no organization in context"),
				 errhint("Call fluxrate.act_as(org_id) from a trusted role, or send an API key or a bearer token.")));

	{
		Datum		u = DirectFunctionCall1(uuid_in, CStringGetDatum(org));
		char	   *canon = DatumGetCString(DirectFunctionCall1(uuid_out, u));

		if (fr_current_org == NULL || strcmp(fr_current_org, canon) != 0)
			FrSetCurrentOrg(canon);
		return u;
	}
}

PG_FUNCTION_INFO_V1(fr_require_org);
Datum
fr_require_org(PG_FUNCTION_ARGS)
{
	char	   *scope = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));

	return FrRequireOrg(scope);
}
