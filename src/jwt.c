/*-------------------------------------------------------------------------
 * jwt.c
 *	  HS256 JSON Web Tokens (OpenSSL HMAC-SHA256) and argon2id passwords
 *	  (libsodium): the primitives of dashboard sign-in.
 *
 * Verification accepts exactly {"alg":"HS256"} headers (so "none" and every
 * other algorithm are refused), compares signatures in constant time, and
 * checks exp and nbf against fluxrate.now() with 30 seconds of skew, as
 * PostgREST does.  Every refusal is PT401 with the reason in the detail.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sodium.h>

#include "common/jsonapi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "fluxrate.h"

#define JWT_SKEW_SECONDS 30

static char *
B64UrlEncode(const unsigned char *in, size_t len)
{
	size_t		outlen = sodium_base64_encoded_len(len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	char	   *out = palloc(outlen);

	sodium_bin2base64(out, outlen, in, len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	return out;
}

/* Decode base64url (no padding); false when malformed */
static bool
B64UrlDecode(const char *in, size_t inlen, unsigned char **out, size_t *outlen)
{
	size_t		max = inlen * 3 / 4 + 3;

	*out = palloc(max + 1);
	if (sodium_base642bin(*out, max, in, inlen, NULL, outlen, NULL,
						  sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0)
		return false;
	(*out)[*outlen] = '\0';
	return true;
}

void
FrHmacSha256(const unsigned char *key, size_t keylen, const char *msg, size_t msglen, unsigned char mac[32])
{
	unsigned int maclen = 32;

	if (HMAC(EVP_sha256(), key, (int) keylen, (const unsigned char *) msg, msglen, mac, &maclen) == NULL ||
		maclen != 32)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("HMAC-SHA256 failed")));
}

static void
CheckSecret(bytea *secret)
{
	if (VARSIZE_ANY_EXHDR(secret) < 32)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("jwt secret must be at least 32 bytes"),
				 errdetail("PostgREST refuses shorter HS256 secrets.")));
}

/* fluxrate_internal.jwt_sign(claims jsonb, secret bytea) -> text */
PG_FUNCTION_INFO_V1(fr_jwt_sign);
Datum
fr_jwt_sign(PG_FUNCTION_ARGS)
{
	Jsonb	   *claims = PG_GETARG_JSONB_P(0);
	bytea	   *secret = PG_GETARG_BYTEA_PP(1);
	const char *header = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
	char	   *payload;
	StringInfoData tok;
	unsigned char mac[32];

	CheckSecret(secret);
	if (!JB_ROOT_IS_OBJECT(claims) || JB_ROOT_IS_SCALAR(claims))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("jwt claims must be a JSON object")));
	payload = JsonbToCString(NULL, &claims->root, VARSIZE(claims));
	initStringInfo(&tok);
	appendStringInfoString(&tok, B64UrlEncode((const unsigned char *) header, strlen(header)));
	appendStringInfoChar(&tok, '.');
	appendStringInfoString(&tok, B64UrlEncode((const unsigned char *) payload, strlen(payload)));
	FrHmacSha256((const unsigned char *) VARDATA_ANY(secret), VARSIZE_ANY_EXHDR(secret), tok.data, tok.len, mac);
	appendStringInfoChar(&tok, '.');
	appendStringInfoString(&tok, B64UrlEncode(mac, 32));
	PG_RETURN_TEXT_P(cstring_to_text(tok.data));
}

static void
Refuse(const char *why)
{
	ereport(ERROR,
			(errcode(FR_ERRCODE_UNAUTHENTICATED),
			 errmsg("invalid token"),
			 errdetail("%s", why),
			 errhint("Log in again.")));
}

/*
 * What verification reads of a header or of the claims: a few top-level
 * members, with the JSON parser of PostgreSQL's common library (the one
 * jsonb_in runs on), whose semantic actions report every member.  The last of
 * duplicate members wins, as in the jsonb the claims become (FrRequireOrg
 * reads org_id and scopes there).  Nothing here needs a backend, so the
 * fuzzers run it under AddressSanitizer (test/fuzz/standalone.c).
 */
#define JWT_MEMBERS 4			/* alg; exp, nbf, iat */

typedef struct JwtParse
{
	const char *const *names;	/* the members wanted */
	int			depth;
	bool		object;			/* the root is an object */
	int			cur;			/* the wanted member whose value comes next, or -1 */
	JsonTokenType type[JWT_MEMBERS];	/* JSON_TOKEN_END: absent; JSON_TOKEN_INVALID: not a scalar */
	char	   *text[JWT_MEMBERS];
} JwtParse;

static void
JwtObjectStart(void *state)
{
	JwtParse   *p = state;

	if (p->depth++ == 0)
		p->object = true;
}

static void
JwtEnd(void *state)
{
	((JwtParse *) state)->depth--;
}

static void
JwtArrayStart(void *state)
{
	((JwtParse *) state)->depth++;
}

static void
JwtFieldStart(void *state, char *fname, bool isnull)
{
	JwtParse   *p = state;

	p->cur = -1;
	if (p->depth != 1)
		return;
	for (int i = 0; i < JWT_MEMBERS && p->names[i] != NULL; i++)
		if (strcmp(fname, p->names[i]) == 0)
		{
			p->cur = i;
			p->type[i] = JSON_TOKEN_INVALID;	/* until a scalar says otherwise */
			p->text[i] = NULL;
		}
}

static void
JwtScalar(void *state, char *token, JsonTokenType tokentype)
{
	JwtParse   *p = state;

	if (p->depth == 1 && p->cur >= 0)
	{
		p->type[p->cur] = tokentype;
		p->text[p->cur] = token;
	}
	p->cur = -1;
}

/*
 * Parse a decoded header or claims part into p: false unless it is JSON text
 * valid in the database encoding (UTF-8 for a token's parts) with no NUL
 * inside -- what jsonb_in would take -- so that a part that is not JSON is a
 * PT401 refusal of the token like every other, not jsonb_in's 22P02 (400).
 */
static bool
JwtParsePart(const unsigned char *text, size_t len, const char *const *names, JwtParse *p)
{
	JsonLexContext *lex;
	JsonSemAction sem = {0};

	memset(p, 0, sizeof(*p));
	p->names = names;
	p->cur = -1;
	for (int i = 0; i < JWT_MEMBERS; i++)
		p->type[i] = JSON_TOKEN_END;
	if (len > INT_MAX || memchr(text, '\0', len) != NULL ||
		!pg_verifymbstr((const char *) text, (int) len, true))
		return false;
	sem.semstate = p;
	sem.object_start = JwtObjectStart;
	sem.object_end = JwtEnd;
	sem.array_start = JwtArrayStart;
	sem.array_end = JwtEnd;
	sem.object_field_start = JwtFieldStart;
	sem.scalar = JwtScalar;
	lex = makeJsonLexContextCstringLen((char *) text, (int) len, GetDatabaseEncoding(), true);
	return pg_parse_json(lex, &sem) == JSON_SUCCESS;
}

/*
 * A time claim (exp, nbf, iat) as seconds since 1970, if present: a JSON
 * integer from 0 to 253402300799 (9999-12-31 23:59:59 UTC), digits only.
 * Anything else -- a string, 1e1000, -1, 1.5, 1e9 -- refuses the token
 * (PT401): no issuer of ours writes it, and read as a double or a numeric it
 * overflowed (22003, HTTP 400) or compared as infinity.
 */
#define JWT_MAX_TIME INT64CONST(253402300799)

static bool
TimeClaim(JwtParse *p, int i, int64 *out)
{
	const char *t = p->text[i];
	int64		v = 0;

	if (p->type[i] == JSON_TOKEN_END)
		return false;
	if (p->type[i] != JSON_TOKEN_NUMBER || t == NULL || *t == '\0' || strlen(t) > 12)
		Refuse("A time claim (exp, nbf, iat) is not a whole number of seconds from 0 to 253402300799.");
	for (; *t; t++)
	{
		if (*t < '0' || *t > '9')
			Refuse("A time claim (exp, nbf, iat) is not a whole number of seconds from 0 to 253402300799.");
		v = v * 10 + (*t - '0');
	}
	if (v > JWT_MAX_TIME)
		Refuse("A time claim (exp, nbf, iat) is not a whole number of seconds from 0 to 253402300799.");
	*out = v;
	return true;
}

/*
 * Verify an HS256 token against key at now (seconds since 1970): its claims
 * as JSON text (a JSON object), or PT401.  Every refusal is PT401 and
 * nothing else (test/fuzz checks it).
 */
char *
FrJwtVerifyText(const char *token, const unsigned char *key, size_t keylen, double now)
{
	static const char *const header_names[] = {"alg", NULL};
	static const char *const claim_names[] = {"exp", "nbf", "iat", NULL};
	const char *dot1 = strchr(token, '.');
	const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
	unsigned char *header,
			   *payload,
			   *sig;
	size_t		hlen,
				plen,
				slen;
	unsigned char mac[32];
	JwtParse	p;
	int64		t;

	if (dot1 == NULL || dot2 == NULL || strchr(dot2 + 1, '.') != NULL)
		Refuse("A token has three dot-separated parts.");
	if (!B64UrlDecode(token, dot1 - token, &header, &hlen) ||
		!B64UrlDecode(dot1 + 1, dot2 - dot1 - 1, &payload, &plen) ||
		!B64UrlDecode(dot2 + 1, strlen(dot2 + 1), &sig, &slen))
		Refuse("The token is not base64url.");

	/* the algorithm first: only HS256 ("none" included, everything else is refused) */
	if (!JwtParsePart(header, hlen, header_names, &p))
		Refuse("The token header is not JSON.");
	if (!p.object)
		Refuse("The token header is not a JSON object.");
	if (p.type[0] != JSON_TOKEN_STRING || strcmp(p.text[0], "HS256") != 0)
		Refuse("Only HS256 tokens are accepted.");

	FrHmacSha256(key, keylen, token, dot2 - token, mac);
	if (slen != 32 || CRYPTO_memcmp(mac, sig, 32) != 0)
		Refuse("The signature does not match.");

	if (!JwtParsePart(payload, plen, claim_names, &p))
		Refuse("The token claims are not JSON.");
	if (!p.object)
		Refuse("The token claims are not a JSON object.");
	if (TimeClaim(&p, 0, &t) && now >= (double) t + JWT_SKEW_SECONDS)
		Refuse("The token has expired.");
	if (TimeClaim(&p, 1, &t) && now + JWT_SKEW_SECONDS < (double) t)
		Refuse("The token is not valid yet.");
	(void) TimeClaim(&p, 2, &t);	/* iat: its form only */
	return (char *) payload;
}

/* fluxrate_internal.jwt_verify(token text, secret bytea) -> jsonb claims, or PT401 */
PG_FUNCTION_INFO_V1(fr_jwt_verify);
Datum
fr_jwt_verify(PG_FUNCTION_ARGS)
{
	char	   *token = text_to_cstring(PG_GETARG_TEXT_PP(0));
	bytea	   *secret = PG_GETARG_BYTEA_PP(1);
	double		now = (double) (FrNow() - SetEpochTimestamp()) / USECS_PER_SEC;
	char	   *claims;

	CheckSecret(secret);
	claims = FrJwtVerifyText(token, (const unsigned char *) VARDATA_ANY(secret),
							 VARSIZE_ANY_EXHDR(secret), now);
	/* JSON text the same parser accepted: jsonb_in takes it */
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(claims)));
}

/* fluxrate_internal.password_hash(password text) -> argon2id string */
PG_FUNCTION_INFO_V1(fr_password_hash);
Datum
fr_password_hash(PG_FUNCTION_ARGS)
{
	text	   *pw = PG_GETARG_TEXT_PP(0);
	int			len = VARSIZE_ANY_EXHDR(pw);
	char		out[crypto_pwhash_STRBYTES];

	/*
	 * 8 to 1,024 characters, as documented (signup checks characters; here
	 * bytes: 1,024 characters of at most 4 bytes each).  argon2id's cost is its
	 * memory and passes, not the password's length: the password is hashed
	 * once (BLAKE2b) into the first block, microseconds for 4 kB.
	 */
	if (pg_mbstrlen_with_len(VARDATA_ANY(pw), len) < 8 || pg_mbstrlen_with_len(VARDATA_ANY(pw), len) > 1024)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("password must have 8 to 1024 characters")));
	if (crypto_pwhash_str(out, VARDATA_ANY(pw), len, crypto_pwhash_OPSLIMIT_INTERACTIVE,
						  crypto_pwhash_MEMLIMIT_INTERACTIVE) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not hash the password")));
	PG_RETURN_TEXT_P(cstring_to_text(out));
}

/* fluxrate_internal.password_verify(hash text, password text) -> boolean */
PG_FUNCTION_INFO_V1(fr_password_verify);
Datum
fr_password_verify(PG_FUNCTION_ARGS)
{
	char	   *hash = text_to_cstring(PG_GETARG_TEXT_PP(0));
	text	   *pw = PG_GETARG_TEXT_PP(1);

	PG_RETURN_BOOL(crypto_pwhash_str_verify(hash, VARDATA_ANY(pw), VARSIZE_ANY_EXHDR(pw)) == 0);
}
