/*-------------------------------------------------------------------------
 * secrets.c
 *	  Server secrets and encryption at rest.
 *
 * Server secrets are 32 random bytes generated at CREATE EXTENSION time into
 * fluxrate_internal.server_secrets, a table only fluxrate_system can read
 * (and pg_dump includes: see 30_ingest.sql on restores):
 *	 api_key_pepper   keys the BLAKE2b hash of API keys (apikey.c)
 *	 sealing_key      encrypts the secrets fluxrate must be able to use again
 *					  later (SMTP passwords, webhook signing secrets)
 * Each is read once per backend and kept in locked memory.
 *
 * Sealing uses libsodium's XChaCha20-Poly1305 AEAD with a random 192-bit nonce
 * (stored in front of the ciphertext) and the row's identity ("smtp:<org>",
 * "webhook:<org>:<id>") as associated data: a ciphertext copied into another
 * organization's row does not open.  Plain text never reaches a table.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sodium.h>

#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "fluxrate.h"

#define SEAL_NONCE	crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
#define SEAL_TAG	crypto_aead_xchacha20poly1305_ietf_ABYTES

static unsigned char *sealing_key = NULL;

/* Run SPI work as fluxrate_system; restore with SetUserIdAndSecContext */
void
FrBecomeSystem(Oid *save_user, int *save_sec)
{
	Oid			sys = get_role_oid("fluxrate_system", false);

	GetUserIdAndSecContext(save_user, save_sec);
	SetUserIdAndSecContext(sys, *save_sec | SECURITY_LOCAL_USERID_CHANGE);
}

/*
 * A 32-byte server secret, read as fluxrate_system, copied into locked memory
 * that lives as long as the backend.  The caller caches the pointer.
 */
unsigned char *
FrServerSecret(const char *name)
{
	Oid			save_user;
	int			save_sec;
	unsigned char *volatile out = NULL;

	FrBecomeSystem(&save_user, &save_sec);
	PG_TRY();
	{
		Oid			argtypes[1] = {TEXTOID};
		Datum		args[1];
		bool		isnull;
		bytea	   *b;

		args[0] = CStringGetTextDatum(name);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		/* the oldest wins: after a restore, the dump's (see 30_ingest.sql) */
		if (SPI_execute_with_args("SELECT secret FROM fluxrate_internal.server_secrets "
								  "WHERE name OPERATOR(pg_catalog.=) $1 ORDER BY created_at LIMIT 1",
								  1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT ||
			SPI_processed != 1)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("fluxrate server secret \"%s\" is missing", name),
					 errhint("Reinstall the extension.")));
		b = DatumGetByteaPP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (isnull || VARSIZE_ANY_EXHDR(b) != 32)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("fluxrate server secret \"%s\" has the wrong length", name)));
		out = MemoryContextAlloc(TopMemoryContext, 32);
		memcpy(out, VARDATA_ANY(b), 32);
		sodium_mlock(out, 32);
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_END_TRY();
	return out;
}

static const unsigned char *
SealingKey(void)
{
	if (sealing_key == NULL)
		sealing_key = FrServerSecret("sealing_key");
	return sealing_key;
}

/* fluxrate_internal.seal(plaintext text, context text) -> bytea (nonce || ciphertext || tag) */
PG_FUNCTION_INFO_V1(fr_seal);
Datum
fr_seal(PG_FUNCTION_ARGS)
{
	text	   *plain = PG_GETARG_TEXT_PP(0);
	text	   *ctx = PG_GETARG_TEXT_PP(1);
	size_t		plen = VARSIZE_ANY_EXHDR(plain);
	bytea	   *out = palloc(VARHDRSZ + SEAL_NONCE + plen + SEAL_TAG);
	unsigned char *nonce = (unsigned char *) VARDATA(out);
	unsigned long long clen;

	randombytes_buf(nonce, SEAL_NONCE);
	crypto_aead_xchacha20poly1305_ietf_encrypt(nonce + SEAL_NONCE, &clen,
											   (const unsigned char *) VARDATA_ANY(plain), plen,
											   (const unsigned char *) VARDATA_ANY(ctx), VARSIZE_ANY_EXHDR(ctx),
											   NULL, nonce, SealingKey());
	SET_VARSIZE(out, VARHDRSZ + SEAL_NONCE + clen);
	PG_RETURN_BYTEA_P(out);
}

/*
 * fluxrate_internal.unseal(sealed bytea, context text) -> text, or NULL when
 * the ciphertext does not open (tampered, another row's, another key).  NULL
 * rather than an error, so a delivery with a bad secret is marked failed
 * instead of stopping the whole delivery run.
 */
PG_FUNCTION_INFO_V1(fr_unseal);
Datum
fr_unseal(PG_FUNCTION_ARGS)
{
	bytea	   *sealed = PG_GETARG_BYTEA_PP(0);
	text	   *ctx = PG_GETARG_TEXT_PP(1);
	size_t		slen = VARSIZE_ANY_EXHDR(sealed);
	const unsigned char *s = (const unsigned char *) VARDATA_ANY(sealed);
	text	   *out;
	unsigned long long plen;

	if (slen < SEAL_NONCE + SEAL_TAG)
		PG_RETURN_NULL();
	out = palloc(VARHDRSZ + slen);
	if (crypto_aead_xchacha20poly1305_ietf_decrypt((unsigned char *) VARDATA(out), &plen, NULL,
												   s + SEAL_NONCE, slen - SEAL_NONCE,
												   (const unsigned char *) VARDATA_ANY(ctx), VARSIZE_ANY_EXHDR(ctx),
												   s, SealingKey()) != 0)
		PG_RETURN_NULL();
	SET_VARSIZE(out, VARHDRSZ + plen);
	PG_RETURN_TEXT_P(out);
}

/* fluxrate_internal.hmac_sha256_hex(key text, message text) -> lowercase hex */
PG_FUNCTION_INFO_V1(fr_hmac_sha256_hex);
Datum
fr_hmac_sha256_hex(PG_FUNCTION_ARGS)
{
	text	   *key = PG_GETARG_TEXT_PP(0);
	text	   *msg = PG_GETARG_TEXT_PP(1);
	unsigned char mac[32];
	char		hex[65];

	FrHmacSha256((const unsigned char *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key),
				 VARDATA_ANY(msg), VARSIZE_ANY_EXHDR(msg), mac);
	sodium_bin2hex(hex, sizeof(hex), mac, 32);
	PG_RETURN_TEXT_P(cstring_to_text(hex));
}
