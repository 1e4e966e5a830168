/*-------------------------------------------------------------------------
 * standalone.c
 *	  libFuzzer harnesses for fluxrate's parsers that need no backend, built
 *	  with clang -fsanitize=fuzzer,address,undefined into one standalone
 *	  binary with fluxrate's real source files (src/jwt.c, src/apikey.c,
 *	  src/ingest_event.c), PostgreSQL's libpgcommon and libpgport, and
 *	  test/fuzz/pgshim.c for palloc and ereport (test/fuzz/run.sh builds it).
 *
 * Why not inside the backend like test/fuzz/driver.c: Debian's postgres
 * binary deadlocks at start-up with the ASan runtime preloaded (in
 * bindtextdomain, on _nl_state_lock, before main; `postgres --version`
 * too), and the backend's allocator hands out memory from its own blocks,
 * where ASan would miss most overflows.  Here every palloc is its own malloc.
 *
 * The target is chosen by FLUXRATE_FUZZ_TARGET:
 *	  jwt		FrJwtVerifyText on the input as a token: three parts,
 *				base64url, the header's JSON (PostgreSQL's JSON parser) and
 *				algorithm, the signature; every refusal must be PT401
 *	  jwt_claims input = header JSON, newline, claims JSON: signed with the
 *				harness's key so verification reaches the claims (exp, nbf,
 *				iat of any form and size); every refusal must be PT401 (exp
 *				1e1000 was 22003)
 *	  apikey	FrApiKeyHash (format, keyed hash) and FrApiKeyAcceptHash: a key
 *				accepted must have the documented form, every refusal PT401
 *	  numeric_syntax FrLooksNumeric, against strtod on strings of digits,
 *				signs, points and exponents: the same verdict
 *	  selftest	reads one byte past a palloc'd chunk on the input
 *				"fluxrate-fuzz-selftest": proves that ASan sees an overflow of
 *				palloc'd memory here (test/scripts/fuzz.sh runs it)
 * A crash, an ASan or UBSan report, an abort from an oracle above or from a
 * stub (a backend function the path was not expected to call) is a finding.
 * Inputs with a NUL byte or invalid UTF-8 are skipped: the server refuses
 * such text before fluxrate sees it.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>

#include "mb/pg_wchar.h"

#include "fluxrate.h"
#include "ingest.h"

extern void FrShimReset(void);
extern int	fr_shim_sqlstate;
extern char fr_shim_message[256];
int			LLVMFuzzerInitialize(int *argc, char ***argv);
int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NOW 1781481600.0		/* 2026-06-15 00:00:00 UTC */

typedef void (*Target) (const char *s, size_t len);
static Target target;
static const char *target_name;
static unsigned char key[32];

/* A SQLSTATE as its five characters (the backend's unpack_sql_state) */
static const char *
SqlState(int code, char *buf)
{
	for (int i = 0; i < 5; i++, code >>= 6)
		buf[i] = PGUNSIXBIT(code);
	buf[5] = '\0';
	return buf;
}

/* An error that is not a refusal of the expected kind is a finding */
static void
Expect(int sqlstate)
{
	char		got[6],
				want[6];

	if (fr_shim_sqlstate != sqlstate)
	{
		fprintf(stderr, "fuzz %s: refused with SQLSTATE %s, expected %s: %s\n", target_name,
				SqlState(fr_shim_sqlstate, got), SqlState(sqlstate, want), fr_shim_message);
		abort();
	}
}

static void
TargetJwt(const char *s, size_t len)
{
	(void) FrJwtVerifyText(pnstrdup(s, len), key, sizeof(key), NOW);
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
TargetJwtClaims(const char *s, size_t len)
{
	const char *nl = memchr(s, '\n', len);
	char	   *signing;
	unsigned char mac[32];

	if (nl == NULL)
		return;
	signing = psprintf("%s.%s", B64(s, nl - s), B64(nl + 1, len - (nl + 1 - s)));
	FrHmacSha256(key, sizeof(key), signing, strlen(signing), mac);
	(void) FrJwtVerifyText(psprintf("%s.%s", signing, B64((const char *) mac, 32)), key, sizeof(key), NOW);
}

static void
TargetApikey(const char *s, size_t len)
{
	unsigned char hash[32];
	char	   *k = pnstrdup(s, len);
	size_t		n = strlen(k);

	FrApiKeyHash(k, hash);
	/* accepted: "org_live_" and 43 characters, or the tagged form of 85 */
	if (strncmp(k, "org_live_", 9) != 0 || (n != 52 && n != 85))
	{
		fprintf(stderr, "fuzz apikey: a key of %zu bytes passed the format check\n", n);
		abort();
	}
	FrApiKeyAcceptHash(hash, NULL, true);	/* unknown key: PT401 */
}

static void
TargetNumericSyntax(const char *s, size_t len)
{
	char	   *c = pnstrdup(s, len);
	bool		ours = FrLooksNumeric(c);

	/* strtod's verdict where it reads the same language (no hex, inf, nan, spaces) */
	if (len > 0 && strspn(c, "0123456789+-.eE") == len)
	{
		char	   *end;

		(void) strtod(c, &end);
		if (ours != (*end == '\0'))
		{
			fprintf(stderr, "fuzz numeric_syntax: FrLooksNumeric says %d, strtod %d\n", ours, *end == '\0');
			abort();
		}
	}
}

static void
TargetSelftest(const char *s, size_t len)
{
	if (len == 22 && memcmp(s, "fluxrate-fuzz-selftest", 22) == 0)
	{
		char	   *p = palloc(len);
		volatile char c;

		memcpy(p, s, len);
		c = p[len];				/* one past the chunk: heap-buffer-overflow */
		(void) c;
	}
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	static const struct
	{
		const char *name;
		Target		fn;
	}			targets[] =
	{
		{"jwt", TargetJwt},
		{"jwt_claims", TargetJwtClaims},
		{"apikey", TargetApikey},
		{"numeric_syntax", TargetNumericSyntax},
		{"selftest", TargetSelftest},
	};

	target_name = getenv("FLUXRATE_FUZZ_TARGET");
	for (int i = 0; target_name && i < lengthof(targets); i++)
		if (strcmp(target_name, targets[i].name) == 0)
			target = targets[i].fn;
	if (target == NULL)
	{
		fprintf(stderr, "FLUXRATE_FUZZ_TARGET: one of jwt, jwt_claims, apikey, numeric_syntax\n");
		exit(2);
	}
	if (sodium_init() < 0)
		abort();
	memset(key, 'k', sizeof(key));
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > 1024 * 1024 || memchr(data, '\0', size) != NULL ||
		pg_encoding_verifymbstr(PG_UTF8, (const char *) data, (int) size) != (int) size)
		return 0;
	PG_TRY();
	{
		target((const char *) data, size);
	}
	PG_CATCH();
	{
		/* every refusal of a token or a key is PT401; the syntax check raises nothing */
		Expect(target == TargetNumericSyntax || target == TargetSelftest ? -1 : FR_ERRCODE_UNAUTHENTICATED);
	}
	PG_END_TRY();
	FrShimReset();
	return 0;
}
