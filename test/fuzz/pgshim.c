/*-------------------------------------------------------------------------
 * pgshim.c
 *	  The few backend services that fluxrate's backend-independent parsers
 *	  use, for the standalone libFuzzer binary built with AddressSanitizer and
 *	  UndefinedBehaviorSanitizer (test/fuzz/standalone.c, test/fuzz/run.sh).
 *
 * What the parsers under test call, and what stands in for it here:
 *	  palloc, palloc0, repalloc, pfree, pstrdup, pnstrdup:
 *				one malloc per chunk, exactly the size asked for (so that
 *				AddressSanitizer's redzones sit right after it: a byte read
 *				or written past a chunk is a report, where the backend's
 *				allocator would have handed out the rest of its block), all
 *				freed after each input (FrShimReset), like a memory context
 *	  ereport, elog, PG_TRY/PG_CATCH:
 *				errstart..errfinish record the SQLSTATE and the message and
 *				siglongjmp to PG_exception_stack, as the backend's do
 *	  pg_verifymbstr, GetDatabaseEncoding:
 *				the database encoding is UTF-8 (the test clusters'); the
 *				check is libpgcommon's pg_encoding_verifymbstr, which the
 *				backend's pg_verify_mbstr runs too
 *	  FrServerSecret (src/secrets.c, a table read through SPI):
 *				a fixed 32-byte pepper
 * The JSON lexer and parser (common/jsonapi.c), the string buffers, the
 * encoding tables and hash_bytes are PostgreSQL's own, linked from
 * libpgcommon.a and libpgport.a of postgresql-server-dev-15.
 * Every other backend function the linked sources name is a generated stub
 * that aborts (build/fuzz/asan/stubs.c): the paths fuzzed never call one, and
 * if one did it would be a finding, not a silent pass.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stdio.h>

#include "mb/pg_wchar.h"
#include "nodes/memnodes.h"
#include "utils/memutils.h"

#include "fluxrate.h"

/* --- memory: one malloc per chunk, freed after each input --- */
typedef struct ShimChunk
{
	struct ShimChunk *prev;
	struct ShimChunk *next;
	Size		size;
	Size		unused;			/* the caller's bytes follow, 16-byte aligned as malloc's */
} ShimChunk;

#define CHUNK_HDR sizeof(ShimChunk)

static ShimChunk chunks = {&chunks, &chunks, 0, 0};
static MemoryContextData shim_context;
MemoryContext CurrentMemoryContext = &shim_context;
MemoryContext TopMemoryContext = &shim_context;
MemoryContext ErrorContext = &shim_context;

static void *
ShimAlloc(Size size, bool zero)
{
	ShimChunk  *c;

	if (!AllocSizeIsValid(size))
		elog(ERROR, "invalid memory alloc request size %zu", size);
	c = malloc(CHUNK_HDR + size);
	if (c == NULL)
		abort();
	c->size = size;
	c->next = chunks.next;
	c->prev = &chunks;
	chunks.next->prev = c;
	chunks.next = c;
	if (zero)
		memset((char *) c + CHUNK_HDR, 0, size);
	return (char *) c + CHUNK_HDR;
}

static ShimChunk *
ChunkOf(void *p)
{
	return (ShimChunk *) ((char *) p - CHUNK_HDR);
}

void *
palloc(Size size)
{
	return ShimAlloc(size, false);
}

void *
palloc0(Size size)
{
	return ShimAlloc(size, true);
}

void *
palloc_extended(Size size, int flags)
{
	return ShimAlloc(size, (flags & MCXT_ALLOC_ZERO) != 0);
}

void *
MemoryContextAlloc(MemoryContext context, Size size)
{
	return ShimAlloc(size, false);
}

void *
MemoryContextAllocZero(MemoryContext context, Size size)
{
	return ShimAlloc(size, true);
}

void
pfree(void *p)
{
	ShimChunk  *c = ChunkOf(p);

	c->prev->next = c->next;
	c->next->prev = c->prev;
	free(c);
}

void *
repalloc(void *p, Size size)
{
	void	   *n = ShimAlloc(size, false);

	memcpy(n, p, Min(size, ChunkOf(p)->size));
	pfree(p);
	return n;
}

char *
pstrdup(const char *s)
{
	size_t		len = strlen(s);
	char	   *d = palloc(len + 1);

	memcpy(d, s, len + 1);
	return d;
}

char *
pnstrdup(const char *s, Size len)
{
	char	   *d;

	len = strnlen(s, len);
	d = palloc(len + 1);
	memcpy(d, s, len);
	d[len] = '\0';
	return d;
}

/* Free every chunk of the last input (the harness calls it after each) */
void		FrShimReset(void);
void
FrShimReset(void)
{
	while (chunks.next != &chunks)
		pfree((char *) chunks.next + CHUNK_HDR);
}

/* --- errors: the SQLSTATE and message of the last ereport(ERROR) --- */
sigjmp_buf *PG_exception_stack = NULL;
ErrorContextCallback *error_context_stack = NULL;

int			fr_shim_sqlstate;
char		fr_shim_message[256];
static int	shim_elevel;

bool
errstart(int elevel, const char *domain)
{
	if (elevel < ERROR)
		return false;			/* NOTICE, WARNING, DEBUG: nothing to do */
	shim_elevel = elevel;
	fr_shim_sqlstate = ERRCODE_INTERNAL_ERROR;
	fr_shim_message[0] = '\0';
	return true;
}

bool
errstart_cold(int elevel, const char *domain)
{
	return errstart(elevel, domain);
}

void
errfinish(const char *filename, int lineno, const char *funcname)
{
	if (shim_elevel > ERROR || PG_exception_stack == NULL)
	{
		fprintf(stderr, "pgshim: FATAL or uncaught error at %s:%d: %s\n", filename, lineno, fr_shim_message);
		abort();
	}
	siglongjmp(*PG_exception_stack, 1);
}

void
pg_re_throw(void)
{
	if (PG_exception_stack == NULL)
		abort();
	siglongjmp(*PG_exception_stack, 1);
}

void
FlushErrorState(void)
{
}

int
errcode(int sqlerrcode)
{
	fr_shim_sqlstate = sqlerrcode;
	return 0;
}

static int
ShimFormat(bool message, const char *fmt, va_list ap)
{
	char		buf[256];

	vsnprintf(buf, sizeof(buf), fmt, ap);
	if (message)
		strlcpy(fr_shim_message, buf, sizeof(fr_shim_message));
	return 0;
}

#define SHIM_ERRFN(name, message) \
int name(const char *fmt, ...) \
{ \
	va_list ap; \
	va_start(ap, fmt); \
	ShimFormat(message, fmt, ap); \
	va_end(ap); \
	return 0; \
}
SHIM_ERRFN(errmsg, true)
SHIM_ERRFN(errmsg_internal, true)
SHIM_ERRFN(errdetail, false)
SHIM_ERRFN(errdetail_internal, false)
SHIM_ERRFN(errhint, false)

/* --- the database encoding: UTF-8 --- */
int
GetDatabaseEncoding(void)
{
	return PG_UTF8;
}

bool
pg_verifymbstr(const char *mbstr, int len, bool noError)
{
	if (pg_encoding_verifymbstr(PG_UTF8, mbstr, len) == len)
		return true;
	if (!noError)
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("invalid byte sequence for encoding \"UTF8\"")));
	return false;
}

/* --- fluxrate's server secrets (src/secrets.c reads a table) --- */
unsigned char *
FrServerSecret(const char *name)
{
	static unsigned char secret[32];

	memset(secret, 'p', sizeof(secret));
	return secret;
}
