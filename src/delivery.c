/*-------------------------------------------------------------------------
 * delivery.c
 *	  The network side of delivery: one HTTP POST (webhooks) and one SMTP
 *	  message (invoice e-mails), with libcurl.
 *
 * Why libcurl: it is Debian's well-kept client for both protocols (SMTP with
 * STARTTLS or implicit TLS and AUTH, HTTP/HTTPS with certificate checks), so
 * fluxrate carries no protocol code of its own.
 *
 * Both functions dial only what fluxrate.outbound_allow allows (outbound_policy.c
 * checks the resolved address) and report failures as a result row
 * (status_code, error: the tenant's view, see outbound_policy.c) instead of raising: the caller records the attempt and
 * schedules a retry, and one unreachable peer never aborts a delivery run.
 * They raise only for programming errors.  Transfers have a timeout and stop
 * early on a query cancel or a backend shutdown (the progress callback checks
 * for pending interrupts); libcurl does not install signal handlers
 * (CURLOPT_NOSIGNAL), which a PostgreSQL backend owns.
 *
 * Nothing here logs: the SMTP password and the request headers are never
 * written anywhere by this file.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "fluxrate.h"
#include "outbound.h"

#define RESPONSE_KEEP 1024		/* bytes of a webhook response kept for the log */

static bool curl_ready = false;

static void
EnsureCurl(void)
{
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("could not initialize libcurl")));
		curl_ready = true;
	}
}

/* Abort a transfer when the backend has an interrupt pending (cancel, shutdown) */
static int
ProgressCheck(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	return (InterruptPending || QueryCancelPending || ProcDiePending) ? 1 : 0;
}

/* Keep the first RESPONSE_KEEP bytes of a response, discard the rest */
typedef struct
{
	char		buf[RESPONSE_KEEP + 1];
	size_t		len;
} Response;

static size_t
WriteKeep(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Response   *r = (Response *) userdata;
	size_t		n = size * nmemb;
	size_t		room = RESPONSE_KEEP - r->len;
	size_t		take = n < room ? n : room;

	memcpy(r->buf + r->len, ptr, take);
	r->len += take;
	r->buf[r->len] = '\0';
	return n;
}

/* Feed an SMTP message to libcurl */
typedef struct
{
	const char *data;
	size_t		len;
	size_t		pos;
} Upload;

static size_t
ReadUpload(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Upload	   *u = (Upload *) userdata;
	size_t		room = size * nmemb;
	size_t		left = u->len - u->pos;
	size_t		take = left < room ? left : room;

	memcpy(ptr, u->data + u->pos, take);
	u->pos += take;
	return take;
}

static void
CommonOptions(CURL *c, int timeout_ms, char *errbuf)
{
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long) timeout_ms);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long) (timeout_ms < 5000 ? timeout_ms : 5000));
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, ProgressCheck);
}

/* Build the (status_code, error[, response]) result row */
static Datum
ResultRow(FunctionCallInfo fcinfo, long code, const char *error, const char *response)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = Int32GetDatum((int32) code);
	nulls[0] = (code == 0);
	values[1] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[1] = (error == NULL);
	if (tupdesc->natts > 2)
	{
		values[2] = response ? CStringGetTextDatum(response) : (Datum) 0;
		nulls[2] = (response == NULL);
	}
	return HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));
}

/*
 * fluxrate_internal.http_post(url text, headers text[], body text, timeout_ms integer,
 *		OUT status_code integer, OUT error text, OUT response text)
 * http and https only; redirects are not followed (a webhook endpoint that
 * moved answers 3xx, which is a failed attempt the operator sees in the log).
 */
PG_FUNCTION_INFO_V1(fr_http_post);
Datum
fr_http_post(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ArrayType  *headers = PG_GETARG_ARRAYTYPE_P(1);
	text	   *body = PG_GETARG_TEXT_PP(2);
	int			timeout_ms = PG_GETARG_INT32(3);
	Datum	   *hdrs;
	bool	   *hnulls;
	int			nh;
	struct curl_slist *list = NULL;
	char		errbuf[CURL_ERROR_SIZE] = "";
	Response   *resp = palloc0(sizeof(Response));
	CURL	   *c;
	CURLcode	rc;
	long		code = 0;
	char	   *error = NULL;
	FrGuard		guard;
	char	   *host = NULL;
	CURLU	   *u = curl_url();

	/* the policy trusts a listed host name as libcurl reads it from the URL */
	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK)
		curl_url_get(u, CURLUPART_HOST, &host, 0);
	deconstruct_array(headers, TEXTOID, -1, false, TYPALIGN_INT, &hdrs, &hnulls, &nh);
	EnsureCurl();
	/* from here to curl_easy_cleanup nothing may raise: libcurl memory is malloc'ed */
	c = curl_easy_init();
	if (c == NULL)
		return ResultRow(fcinfo, 0, "could not create a libcurl handle", NULL);
	for (int i = 0; i < nh; i++)
		if (!hnulls[i])
			list = curl_slist_append(list, TextDatumGetCString(hdrs[i]));
	/* libcurl would add "Expect: 100-continue" to large bodies; peers answer at once */
	list = curl_slist_append(list, "Expect:");
	CommonOptions(c, timeout_ms, errbuf);
	FrOutboundGuard(c, &guard, FR_OUT_WEBHOOK, host);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(c, CURLOPT_USERAGENT, "fluxrate/" FR_VERSION);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, list);
	curl_easy_setopt(c, CURLOPT_POST, 1L);
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, VARDATA_ANY(body));
	curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long) VARSIZE_ANY_EXHDR(body));
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, WriteKeep);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, resp);
	rc = curl_easy_perform(c);
	if (rc == CURLE_OK)
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_easy_cleanup(c);
	curl_slist_free_all(list);
	curl_free(host);
	curl_url_cleanup(u);
	CHECK_FOR_INTERRUPTS();
	/* the tenant's view only (see outbound_policy.c): no peer text, no libcurl detail */
	error = (char *) FrOutboundTenantError(&guard, rc, code, false);
	if (rc != CURLE_OK || guard.refused)
		code = 0;
	/* the log keeps printable ASCII only: a response may be in any encoding */
	for (size_t i = 0; i < resp->len; i++)
		if ((unsigned char) resp->buf[i] >= 0x7f ||
			((unsigned char) resp->buf[i] < 0x20 && resp->buf[i] != '\n' && resp->buf[i] != '\t'))
			resp->buf[i] = '?';
	return ResultRow(fcinfo, code, error, resp->len > 0 ? resp->buf : NULL);
}

/*
 * fluxrate_internal.smtp_send(host text, port integer, security text, username text,
 *		password text, mail_from text, rcpt text, message text, timeout_ms integer,
 *		OUT status_code integer, OUT error text)
 * security: 'starttls' (required, not opportunistic), 'tls' (implicit, smtps),
 * or 'none' (plain text, for a relay on loopback).  username NULL = no AUTH.
 */
PG_FUNCTION_INFO_V1(fr_smtp_send);
Datum
fr_smtp_send(PG_FUNCTION_ARGS)
{
	char	   *host;
	int			port;
	char	   *security;
	char	   *username;
	char	   *password;
	char	   *from;
	char	   *rcpt;
	text	   *message;
	int			timeout_ms;
	char	   *url;
	char	   *from_addr;
	char	   *rcpt_addr;
	struct curl_slist *rcpts = NULL;
	char		errbuf[CURL_ERROR_SIZE] = "";
	Upload		up;
	CURL	   *c;
	CURLcode	rc;
	long		code = 0;
	char	   *error = NULL;
	FrGuard		guard;

	for (int i = 0; i < 9; i++)
		if (PG_ARGISNULL(i) && i != 3 && i != 4)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("smtp_send argument %d is null", i + 1)));
	host = text_to_cstring(PG_GETARG_TEXT_PP(0));
	port = PG_GETARG_INT32(1);
	security = text_to_cstring(PG_GETARG_TEXT_PP(2));
	username = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	password = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));
	from = text_to_cstring(PG_GETARG_TEXT_PP(5));
	rcpt = text_to_cstring(PG_GETARG_TEXT_PP(6));
	message = PG_GETARG_TEXT_PP(7);
	timeout_ms = PG_GETARG_INT32(8);

	if (strcmp(security, "starttls") != 0 && strcmp(security, "tls") != 0 && strcmp(security, "none") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid smtp security: %s", security),
				 errdetail("security must be one of starttls, tls, none.")));
	url = psprintf("%s://%s:%d", strcmp(security, "tls") == 0 ? "smtps" : "smtp", host, port);
	from_addr = psprintf("<%s>", from);
	rcpt_addr = psprintf("<%s>", rcpt);
	up.data = VARDATA_ANY(message);
	up.len = VARSIZE_ANY_EXHDR(message);
	up.pos = 0;

	EnsureCurl();
	/* from here to curl_easy_cleanup nothing may raise */
	c = curl_easy_init();
	if (c == NULL)
		return ResultRow(fcinfo, 0, "could not create a libcurl handle", NULL);
	rcpts = curl_slist_append(rcpts, rcpt_addr);
	CommonOptions(c, timeout_ms, errbuf);
	FrOutboundGuard(c, &guard, FR_OUT_SMTP, host);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	if (strcmp(security, "starttls") == 0)
		curl_easy_setopt(c, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
	if (username != NULL && username[0] != '\0')
	{
		curl_easy_setopt(c, CURLOPT_USERNAME, username);
		curl_easy_setopt(c, CURLOPT_PASSWORD, password ? password : "");
	}
	curl_easy_setopt(c, CURLOPT_MAIL_FROM, from_addr);
	curl_easy_setopt(c, CURLOPT_MAIL_RCPT, rcpts);
	curl_easy_setopt(c, CURLOPT_READFUNCTION, ReadUpload);
	curl_easy_setopt(c, CURLOPT_READDATA, &up);
	curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
	rc = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	error = (char *) FrOutboundTenantError(&guard, rc, code, true);
	if (error != NULL && strcmp(error, "rejected by the server") != 0)
		code = 0;
	curl_easy_cleanup(c);
	curl_slist_free_all(rcpts);
	if (password != NULL)
		explicit_bzero(password, strlen(password));
	CHECK_FOR_INTERRUPTS();
	return ResultRow(fcinfo, code, error, NULL);
}
