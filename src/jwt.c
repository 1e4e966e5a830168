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

/* A numeric claim (exp, nbf) as seconds, if present */
static bool
NumericClaim(Jsonb *jb, const char *key, double *out)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
	if (v == NULL)
		return false;
	if (v->type != jbvNumeric)
		Refuse("a time claim is not a number");
	*out = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric)));
	return true;
}

/*
 * Is this decoded token part JSON text that jsonb_in will take?  Checked
 * first with the JSON lexer, which reports instead of raising, so that a
 * header or payload that is not JSON (or not valid in the database encoding,
 * or with a NUL inside) is a PT401 refusal of the token like every other,
 * not jsonb_in's 22P02 (HTTP 400).
 */
static bool
IsJsonText(const unsigned char *text, size_t len)
{
	JsonLexContext *lex;

	if (memchr(text, '\0', len) != NULL ||
		!pg_verifymbstr((const char *) text, (int) len, true))
		return false;
	lex = makeJsonLexContextCstringLen((char *) text, (int) len, GetDatabaseEncoding(), true);
	return pg_parse_json(lex, &nullSemAction) == JSON_SUCCESS;
}

/* fluxrate_internal.jwt_verify(token text, secret bytea) -> jsonb claims, or PT401 */
PG_FUNCTION_INFO_V1(fr_jwt_verify);
Datum
fr_jwt_verify(PG_FUNCTION_ARGS)
{
	char	   *token = text_to_cstring(PG_GETARG_TEXT_PP(0));
	bytea	   *secret = PG_GETARG_BYTEA_PP(1);
	char	   *dot1 = strchr(token, '.');
	char	   *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
	unsigned char *header,
			   *payload,
			   *sig;
	size_t		hlen,
				plen,
				slen;
	unsigned char mac[32];
	Jsonb	   *hjb,
			   *claims;
	JsonbValue	k;
	JsonbValue *alg;
	double		t;
	double		now = (double) (FrNow() - SetEpochTimestamp()) / USECS_PER_SEC;

	CheckSecret(secret);
	if (dot1 == NULL || dot2 == NULL || strchr(dot2 + 1, '.') != NULL)
		Refuse("A token has three dot-separated parts.");
	if (!B64UrlDecode(token, dot1 - token, &header, &hlen) ||
		!B64UrlDecode(dot1 + 1, dot2 - dot1 - 1, &payload, &plen) ||
		!B64UrlDecode(dot2 + 1, strlen(dot2 + 1), &sig, &slen))
		Refuse("The token is not base64url.");

	/* the algorithm first: only HS256 ("none" included, everything else is refused) */
	if (!IsJsonText(header, hlen))
		Refuse("The token header is not JSON.");
	hjb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum((char *) header)));
	if (!JB_ROOT_IS_OBJECT(hjb) || JB_ROOT_IS_SCALAR(hjb))
		Refuse("The token header is not a JSON object.");
	k.type = jbvString;
	k.val.string.val = "alg";
	k.val.string.len = 3;
	alg = findJsonbValueFromContainer(&hjb->root, JB_FOBJECT, &k);
	if (alg == NULL || alg->type != jbvString || alg->val.string.len != 5 ||
		memcmp(alg->val.string.val, "HS256", 5) != 0)
		Refuse("Only HS256 tokens are accepted.");

	FrHmacSha256((const unsigned char *) VARDATA_ANY(secret), VARSIZE_ANY_EXHDR(secret), token, dot2 - token, mac);
	if (slen != 32 || CRYPTO_memcmp(mac, sig, 32) != 0)
		Refuse("The signature does not match.");

	if (!IsJsonText(payload, plen))
		Refuse("The token claims are not JSON.");
	claims = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum((char *) payload)));
	if (!JB_ROOT_IS_OBJECT(claims) || JB_ROOT_IS_SCALAR(claims))
		Refuse("The token claims are not a JSON object.");
	if (NumericClaim(claims, "exp", &t) && now >= t + JWT_SKEW_SECONDS)
		Refuse("The token has expired.");
	if (NumericClaim(claims, "nbf", &t) && now + JWT_SKEW_SECONDS < t)
		Refuse("The token is not valid yet.");
	PG_RETURN_JSONB_P(claims);
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
