/*-------------------------------------------------------------------------
 * driver.c
 *	  libFuzzer harnesses for fluxrate's C parsers, run inside a real
 *	  PostgreSQL backend (test/fuzz.sh, `make fuzz`).
 *
 * Why inside a backend and not against a shim: every parser of fluxrate reads
 * PostgreSQL's own data structures (jsonb containers and iterators, numeric,
 * timestamptz_in, the GUCs, SPI for the API-key pepper), so a shim honest
 * enough to run them would be a second PostgreSQL.  Instead the harness is
 * built with fluxrate's real source files into one instrumented library
 * (clang -fsanitize=fuzzer-no-link: libFuzzer's coverage instrumentation),
 * loaded into `postgres --single`, and libFuzzer's driver is started from a
 * SQL call (LLVMFuzzerRunDriver).  AddressSanitizer is not in this build:
 * Debian's postgres binary hangs at start-up with the ASan runtime preloaded
 * (a deadlock in glibc's bindtextdomain, before main), and PostgreSQL's own
 * allocator would hide most overflows of palloc'd memory from it anyway; a
 * crash, an abort, a hang (-timeout) or runaway memory is what it reports.  Each input runs in its own memory context,
 * inside PG_TRY: an ereport(ERROR) is a refused input, exactly what a client
 * would get; a crash, an ASan report or a hang is a finding.
 *
 * Inputs are what a client can send: text in the database encoding (UTF-8),
 * so inputs with a NUL byte or invalid UTF-8 are skipped (the server refuses
 * them before any fluxrate code runs).
 *
 * The parsers that need no backend (the token, the API key, the numeric
 * syntax) are fuzzed standalone under AddressSanitizer: test/fuzz/standalone.c.
 *
 * Targets (test/fuzz/corpus/<target>/ holds each seed corpus):
 *	  claims	input = header JSON, newline, claims JSON: signed with the test
 *				secret so verification reaches the claims (exp, nbf), then the
 *				claims are read as request.jwt.claims by FrRequireOrg (org_id,
 *				scopes): the path of a bearer token and of the access_token cookie
 *	  tiers		input = usage, newline, tier table JSON: fr_rate_usage with
 *				graduated and volume pricing (ParseTiers, the tier walk)
 *	  batch		input = a track_batch JSON array: FrReadBatchEvent,
 *				FrCheckInputShape and FrCheckQuantity on every element
 *	  quantity	FrLooksNumeric, then numeric_in and FrCheckQuantity (SUM, MAX)
 *	  selftest	crashes on the input "fluxrate-fuzz-selftest": proves that the
 *				harness reports a finding (test/scripts/fuzz.sh runs it)
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

#include "fluxrate.h"
#include "ingest.h"

extern int	LLVMFuzzerRunDriver(int *argc, char ***argv, int (*cb) (const uint8_t *data, size_t size));
extern Datum fr_jwt_verify(PG_FUNCTION_ARGS);
extern Datum fr_rate_usage(PG_FUNCTION_ARGS);

typedef void (*Target) (const char *s, size_t len);

static MemoryContext fuzz_cxt;
static Target target;
static bytea *secret;

static bytea *
Secret(void)
{
	if (secret == NULL)
	{
		secret = MemoryContextAlloc(TopMemoryContext, VARHDRSZ + 32);
		SET_VARSIZE(secret, VARHDRSZ + 32);
		memset(VARDATA(secret), 'k', 32);
	}
	return secret;
}

static char *
B64(const char *in, size_t len)
{
	size_t		n = sodium_base64_encoded_len(len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	char	   *out = palloc(n);

	sodium_bin2base64(out, n, (const unsigned char *) in, len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	return out;
}

static void
TargetClaims(const char *s, size_t len)
{
	const char *nl = memchr(s, '\n', len);
	char	   *claims;
	char	   *signing;
	unsigned char mac[32];
	char	   *token;
	Datum		verified;

	if (nl == NULL)
		return;
	claims = pnstrdup(nl + 1, len - (nl + 1 - s));
	signing = psprintf("%s.%s", B64(s, nl - s), B64(claims, strlen(claims)));
	FrHmacSha256((const unsigned char *) VARDATA(Secret()), 32, signing, strlen(signing), mac);
	token = psprintf("%s.%s", signing, B64((const char *) mac, 32));
	verified = DirectFunctionCall2(fr_jwt_verify, PointerGetDatum(cstring_to_text(token)),
								   PointerGetDatum(Secret()));
	/* what PostgREST then puts in request.jwt.claims: the verified claims */
	SetConfigOption("request.jwt.claims",
					DatumGetCString(DirectFunctionCall1(jsonb_out, verified)),
					PGC_SUSET, PGC_S_SESSION);
	PG_TRY();
	{
		FrRequireOrg("usage.write");
		FrRequireOrg("admin");
	}
	PG_FINALLY();
	{
		SetConfigOption("request.jwt.claims", "", PGC_SUSET, PGC_S_SESSION);
	}
	PG_END_TRY();
}

static void
TargetTiers(const char *s, size_t len)
{
	const char *nl = memchr(s, '\n', len);
	Datum		usage;
	Datum		tiers;
	static const char *const models[] = {"graduated", "volume"};

	if (nl == NULL)
		return;
	usage = DirectFunctionCall3(numeric_in, CStringGetDatum(pnstrdup(s, nl - s)),
								ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
	tiers = DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(nl + 1, len - (nl + 1 - s))));
	for (int m = 0; m < lengthof(models); m++)
	{
		LOCAL_FCINFO(fcinfo, 7);

		InitFunctionCallInfoData(*fcinfo, NULL, 7, InvalidOid, NULL, NULL);
		for (int i = 0; i < 7; i++)
			fcinfo->args[i].isnull = true;
		fcinfo->args[0].value = CStringGetTextDatum(models[m]);
		fcinfo->args[0].isnull = false;
		fcinfo->args[2].value = tiers;
		fcinfo->args[2].isnull = false;
		fcinfo->args[6].value = usage;
		fcinfo->args[6].isnull = false;
		(void) fr_rate_usage(fcinfo);
	}
}

static void
TargetBatch(const char *s, size_t len)
{
	Jsonb	   *events = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(s, len))));
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (!JB_ROOT_IS_ARRAY(events) || JB_ROOT_IS_SCALAR(events))
		return;
	it = JsonbIteratorInit(&events->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		TrackInput	in;

		if (tok != WJB_ELEM)
			continue;
		/* one element at a time, as track_batch does: a refusal stops the element only */
		PG_TRY();
		{
			FrReadBatchEvent(JsonbValueToJsonb(&v), &in);
			FrCheckInputShape(&in);
			if (in.quantity)
				FrCheckQuantity(in.quantity, "SUM");
		}
		PG_CATCH();
		{
			FlushErrorState();
		}
		PG_END_TRY();
	}
}

static void
TargetQuantity(const char *s, size_t len)
{
	char	   *c = pnstrdup(s, len);
	Numeric		q;

	if (!FrLooksNumeric(c))
		return;
	q = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(c),
											ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
	PG_TRY();
	{
		FrCheckQuantity(q, "SUM");
	}
	PG_CATCH();
	{
		FlushErrorState();
	}
	PG_END_TRY();
	FrCheckQuantity(q, "MAX");
}

static void
TargetSelftest(const char *s, size_t len)
{
	if (len == 22 && memcmp(s, "fluxrate-fuzz-selftest", 22) == 0)
		*(volatile int *) NULL = 1;
}

static int
FuzzOne(const uint8_t *data, size_t size)
{
	MemoryContext old;

	if (size > 1024 * 1024 || memchr(data, '\0', size) != NULL ||
		!pg_verifymbstr((const char *) data, (int) size, true))
		return 0;
	old = MemoryContextSwitchTo(fuzz_cxt);
	PG_TRY();
	{
		target((const char *) data, size);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(fuzz_cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	MemoryContextReset(fuzz_cxt);
	return 0;
}

/*
 * fr_fuzz_main(target text, args text[]) RETURNS integer: runs libFuzzer with
 * args (corpus directories, -max_total_time=..., files to replay) on target.
 * libFuzzer ends the process itself when it is done (exit status 0, or the
 * crash's) -- run it in a single-user backend made for it.
 */
PG_FUNCTION_INFO_V1(fr_fuzz_main);
Datum
fr_fuzz_main(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ArrayType  *args = PG_GETARG_ARRAYTYPE_P(1);
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int			argc;
	char	  **argv;
	static const struct
	{
		const char *name;
		Target		fn;
	}			targets[] =
	{
		{"claims", TargetClaims},
		{"tiers", TargetTiers},
		{"batch", TargetBatch},
		{"quantity", TargetQuantity},
		{"selftest", TargetSelftest},
	};

	for (int i = 0; i < lengthof(targets); i++)
		if (strcmp(name, targets[i].name) == 0)
			target = targets[i].fn;
	if (target == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown fuzz target: %s", name)));
	deconstruct_array(args, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	argv = MemoryContextAllocZero(TopMemoryContext, sizeof(char *) * (n + 2));
	argv[0] = MemoryContextStrdup(TopMemoryContext, name);
	for (int i = 0; i < n; i++)
		argv[i + 1] = MemoryContextStrdup(TopMemoryContext, TextDatumGetCString(elems[i]));
	argc = n + 1;
	fuzz_cxt = AllocSetContextCreate(TopMemoryContext, "fluxrate fuzz input", ALLOCSET_DEFAULT_SIZES);
	PG_RETURN_INT32(LLVMFuzzerRunDriver(&argc, &argv, FuzzOne));
}
