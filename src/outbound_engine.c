/*-------------------------------------------------------------------------
 * outbound_engine.c
 *	  The concurrent transfer engine of the delivery run: a libcurl multi
 *	  handle per backend, started and polled by the delivery run between its
 *	  commits.  Every transfer is guarded by the policy of outbound_policy.c.
 *
 * The engine keeps a libcurl multi handle per backend: the delivery run starts
 * transfers (outbound_start_http, outbound_start_smtp) and collects the
 * finished ones (outbound_poll) between its commits, so one peer that never
 * answers holds its own slot only, never the run.  Handles and buffers are
 * malloc'ed (libcurl owns them; nothing between curl calls may raise), and
 * outbound_reset drops whatever a previous, interrupted run left behind.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <curl/curl.h>

#include "fmgr.h"
#include "funcapi.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "portability/instr_time.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "fluxrate.h"
#include "outbound.h"

/* ---- the engine ------------------------------------------------------------ */

#define RESPONSE_KEEP 1024

typedef struct Xfer
{
	struct Xfer *next;
	pg_uuid_t	org;
	pg_uuid_t	id;
	TimestampTz claimed_at;	/* what the tenant's log shows as the attempt's time */
	CURL	   *easy;
	bool		smtp;
	FrGuard		guard;
	struct curl_slist *list;	/* headers or recipients */
	char	   *payload;		/* POST body or the message; malloc'ed */
	size_t		len;
	size_t		pos;
	char	   *secret;			/* the SMTP password, zeroed before free */
	char		resp[RESPONSE_KEEP + 1];
	size_t		resp_len;
	char		errbuf[CURL_ERROR_SIZE];
	bool		done;
	CURLcode	rc;
	instr_time	started;
} Xfer;

static CURLM *multi = NULL;
static Xfer *xfers = NULL;
static int	n_xfers = 0;

static int
XferProgress(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	return (InterruptPending || QueryCancelPending || ProcDiePending) ? 1 : 0;
}

static size_t
XferWrite(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Xfer	   *x = (Xfer *) userdata;
	size_t		n = size * nmemb;
	size_t		room = RESPONSE_KEEP - x->resp_len;
	size_t		take = n < room ? n : room;

	memcpy(x->resp + x->resp_len, ptr, take);
	x->resp_len += take;
	x->resp[x->resp_len] = '\0';
	return n;
}

static size_t
XferRead(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Xfer	   *x = (Xfer *) userdata;
	size_t		room = size * nmemb;
	size_t		left = x->len - x->pos;
	size_t		take = left < room ? left : room;

	memcpy(ptr, x->payload + x->pos, take);
	x->pos += take;
	return take;
}

static void
XferFree(Xfer *x)
{
	if (x->easy)
	{
		if (multi)
			curl_multi_remove_handle(multi, x->easy);
		curl_easy_cleanup(x->easy);
	}
	curl_slist_free_all(x->list);
	free(x->payload);
	if (x->secret)
	{
		explicit_bzero(x->secret, strlen(x->secret));
		free(x->secret);
	}
	free(x);
}

static void
EnsureMulti(void)
{
	if (multi != NULL)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not initialize libcurl")));
	multi = curl_multi_init();
	if (multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
}

/* A new transfer (not yet added to the multi handle); NULL when out of memory */
static Xfer *
XferNew(pg_uuid_t *org, pg_uuid_t *id, TimestampTz claimed_at, bool smtp, const char *payload, size_t len, int timeout_ms)
{
	Xfer	   *x = calloc(1, sizeof(Xfer));

	if (x == NULL)
		return NULL;
	x->org = *org;
	x->id = *id;
	x->claimed_at = claimed_at;
	x->smtp = smtp;
	x->payload = malloc(len + 1);
	x->easy = curl_easy_init();
	if (x->payload == NULL || x->easy == NULL)
	{
		XferFree(x);
		return NULL;
	}
	memcpy(x->payload, payload, len);
	x->payload[len] = '\0';
	x->len = len;
	curl_easy_setopt(x->easy, CURLOPT_PRIVATE, x);
	curl_easy_setopt(x->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, (long) timeout_ms);
	curl_easy_setopt(x->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) (timeout_ms < 5000 ? timeout_ms : 5000));
	curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, x->errbuf);
	curl_easy_setopt(x->easy, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(x->easy, CURLOPT_XFERINFOFUNCTION, XferProgress);
	return x;
}

static void
XferAdd(Xfer *x)
{
	INSTR_TIME_SET_CURRENT(x->started);
	if (curl_multi_add_handle(multi, x->easy) != CURLM_OK)
	{
		XferFree(x);
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not start a transfer")));
	}
	x->next = xfers;
	xfers = x;
	n_xfers++;
}

static void
CheckTimeout(int timeout_ms)
{
	if (timeout_ms < 1 || timeout_ms > 600000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout_ms must be between 1 and 600000"),
				 errdetail("timeout_ms was %d.", timeout_ms)));
}

/*
 * fluxrate_internal.outbound_start_http(org_id uuid, delivery_id uuid, claimed_at timestamptz,
 *		url text, headers text[], body text, timeout_ms integer): queue one webhook POST.
 */
PG_FUNCTION_INFO_V1(fr_outbound_start_http);
Datum
fr_outbound_start_http(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *org = PG_GETARG_UUID_P(0);
	pg_uuid_t  *id = PG_GETARG_UUID_P(1);
	TimestampTz claimed_at = PG_GETARG_TIMESTAMPTZ(2);
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(3));
	ArrayType  *headers = PG_GETARG_ARRAYTYPE_P(4);
	text	   *body = PG_GETARG_TEXT_PP(5);
	int			timeout_ms = PG_GETARG_INT32(6);
	char	  **hv;
	Datum	   *hdrs;
	bool	   *hnulls;
	int			nh;
	char	   *host = FrOutboundUrlHost(url);
	Xfer	   *x;

	CheckTimeout(timeout_ms);
	deconstruct_array(headers, TEXTOID, -1, false, TYPALIGN_INT, &hdrs, &hnulls, &nh);
	hv = palloc0(sizeof(char *) * (nh + 1));
	for (int i = 0; i < nh; i++)
		hv[i] = hnulls[i] ? NULL : TextDatumGetCString(hdrs[i]);
	EnsureMulti();
	/* from here to XferAdd nothing may raise */
	x = XferNew(org, id, claimed_at, false, VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body), timeout_ms);
	if (x == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	for (int i = 0; i < nh; i++)
		if (hv[i])
			x->list = curl_slist_append(x->list, hv[i]);
	/* libcurl would add "Expect: 100-continue" to large bodies; peers answer at once */
	x->list = curl_slist_append(x->list, "Expect:");
	FrOutboundGuard(x->easy, &x->guard, FR_OUT_WEBHOOK, host);
	curl_easy_setopt(x->easy, CURLOPT_URL, url);
	curl_easy_setopt(x->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(x->easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(x->easy, CURLOPT_USERAGENT, "fluxrate/" FR_VERSION);
	curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, x->list);
	curl_easy_setopt(x->easy, CURLOPT_POST, 1L);
	curl_easy_setopt(x->easy, CURLOPT_POSTFIELDS, x->payload);
	curl_easy_setopt(x->easy, CURLOPT_POSTFIELDSIZE, (long) x->len);
	curl_easy_setopt(x->easy, CURLOPT_WRITEFUNCTION, XferWrite);
	curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, x);
	XferAdd(x);
	PG_RETURN_VOID();
}

/*
 * fluxrate_internal.outbound_start_smtp(org_id uuid, delivery_id uuid, claimed_at timestamptz,
 *		host text, port integer,
 *		security text, username text, password text, mail_from text, rcpt text,
 *		message text, timeout_ms integer): queue one SMTP message.
 */
PG_FUNCTION_INFO_V1(fr_outbound_start_smtp);
Datum
fr_outbound_start_smtp(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *org;
	pg_uuid_t  *id;
	TimestampTz claimed_at;
	char	   *host;
	int			port;
	char	   *security;
	char	   *username;
	char	   *password;
	char	   *url;
	char	   *from_addr;
	char	   *rcpt_addr;
	text	   *message;
	int			timeout_ms;
	Xfer	   *x;

	for (int i = 0; i < 12; i++)
		if (PG_ARGISNULL(i) && i != 6 && i != 7)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("outbound_start_smtp argument %d is null", i + 1)));
	org = PG_GETARG_UUID_P(0);
	id = PG_GETARG_UUID_P(1);
	claimed_at = PG_GETARG_TIMESTAMPTZ(2);
	host = text_to_cstring(PG_GETARG_TEXT_PP(3));
	port = PG_GETARG_INT32(4);
	security = text_to_cstring(PG_GETARG_TEXT_PP(5));
	username = PG_ARGISNULL(6) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(6));
	password = PG_ARGISNULL(7) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(7));
	from_addr = psprintf("<%s>", text_to_cstring(PG_GETARG_TEXT_PP(8)));
	rcpt_addr = psprintf("<%s>", text_to_cstring(PG_GETARG_TEXT_PP(9)));
	message = PG_GETARG_TEXT_PP(10);
	timeout_ms = PG_GETARG_INT32(11);
	CheckTimeout(timeout_ms);
	if (strcmp(security, "starttls") != 0 && strcmp(security, "tls") != 0 && strcmp(security, "none") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid smtp security: %s", security),
				 errdetail("security must be one of starttls, tls, none.")));
	if (port < 1 || port > 65535)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("port must be between 1 and 65535")));
	/* an IPv6 literal needs its brackets in the URL, and is matched without them */
	url = psprintf("%s://%s%s%s:%d", strcmp(security, "tls") == 0 ? "smtps" : "smtp",
				   strchr(host, ':') && host[0] != '[' ? "[" : "", host,
				   strchr(host, ':') && host[0] != '[' ? "]" : "", port);
	EnsureMulti();
	/* from here to XferAdd nothing may raise */
	x = XferNew(org, id, claimed_at, true, VARDATA_ANY(message), VARSIZE_ANY_EXHDR(message), timeout_ms);
	if (x == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	x->list = curl_slist_append(NULL, rcpt_addr);
	FrOutboundGuard(x->easy, &x->guard, FR_OUT_SMTP, host);
	curl_easy_setopt(x->easy, CURLOPT_URL, url);
	curl_easy_setopt(x->easy, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	if (strcmp(security, "starttls") == 0)
		curl_easy_setopt(x->easy, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
	if (username != NULL && username[0] != '\0')
	{
		x->secret = strdup(password ? password : "");
		curl_easy_setopt(x->easy, CURLOPT_USERNAME, username);
		curl_easy_setopt(x->easy, CURLOPT_PASSWORD, x->secret ? x->secret : "");
	}
	if (password != NULL)
		explicit_bzero(password, strlen(password));
	curl_easy_setopt(x->easy, CURLOPT_MAIL_FROM, from_addr);
	curl_easy_setopt(x->easy, CURLOPT_MAIL_RCPT, x->list);
	curl_easy_setopt(x->easy, CURLOPT_READFUNCTION, XferRead);
	curl_easy_setopt(x->easy, CURLOPT_READDATA, x);
	curl_easy_setopt(x->easy, CURLOPT_UPLOAD, 1L);
	XferAdd(x);
	PG_RETURN_VOID();
}

/* Mark what libcurl reports finished */
static int
CollectDone(void)
{
	CURLMsg    *m;
	int			left;
	int			n = 0;

	while ((m = curl_multi_info_read(multi, &left)) != NULL)
	{
		Xfer	   *x = NULL;

		if (m->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **) &x);
		if (x && !x->done)
		{
			x->done = true;
			x->rc = m->data.result;
			n++;
		}
	}
	return n;
}

/*
 * fluxrate_internal.outbound_poll(wait_ms integer) RETURNS TABLE (org_id uuid, delivery_id uuid,
 *		claimed_at timestamptz, status_code integer, error text, response text, duration_ms integer)
 * Drives the transfers until at least one is finished or wait_ms has passed,
 * returns the finished ones (the tenant's view of the error, see the header)
 * and forgets them.  The operator's detail goes to the server log.
 */
PG_FUNCTION_INFO_V1(fr_outbound_poll);
Datum
fr_outbound_poll(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			wait_ms = PG_GETARG_INT32(0);
	instr_time	start,
				now;
	int			finished = 0;
	Xfer	  **link;

	InitMaterializedSRF(fcinfo, 0);
	if (multi == NULL || xfers == NULL)
		return (Datum) 0;
	INSTR_TIME_SET_CURRENT(start);
	for (Xfer *x = xfers; x; x = x->next)
		if (x->done)
			finished++;
	for (;;)
	{
		int			running = 0;
		double		waited;

		curl_multi_perform(multi, &running);
		finished += CollectDone();
		if (finished > 0 || running == 0)
			break;
		INSTR_TIME_SET_CURRENT(now);
		INSTR_TIME_SUBTRACT(now, start);
		waited = INSTR_TIME_GET_MILLISEC(now);
		if (waited >= wait_ms)
			break;
		curl_multi_poll(multi, NULL, 0, (int) Min(100.0, wait_ms - waited) + 1, NULL);
		CHECK_FOR_INTERRUPTS();
	}

	link = &xfers;
	while (*link)
	{
		Xfer	   *x = *link;
		Datum		values[7];
		bool		nulls[7] = {false, false, false, false, false, false, false};
		long		code = 0;
		const char *error;
		instr_time	took;

		if (!x->done)
		{
			link = &x->next;
			continue;
		}
		curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
		INSTR_TIME_SET_CURRENT(took);
		INSTR_TIME_SUBTRACT(took, x->started);
		error = FrOutboundTenantError(&x->guard, x->rc, code, x->smtp);
		if (error != NULL)
			ereport(LOG,
					(errmsg("fluxrate: delivery %s: %s",
							DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&x->id))), error),
					 errdetail_internal("%s%s%s", x->guard.refused ? "the address dialed is outside fluxrate.outbound_allow" :
										curl_easy_strerror(x->rc),
										x->errbuf[0] ? ": " : "", x->errbuf)));
		/* the response is kept for the operator; printable ASCII only */
		for (size_t i = 0; i < x->resp_len; i++)
			if ((unsigned char) x->resp[i] >= 0x7f ||
				((unsigned char) x->resp[i] < 0x20 && x->resp[i] != '\n' && x->resp[i] != '\t'))
				x->resp[i] = '?';
		values[0] = UUIDPGetDatum(&x->org);
		values[1] = UUIDPGetDatum(&x->id);
		values[2] = TimestampTzGetDatum(x->claimed_at);
		values[3] = Int32GetDatum((int32) code);
		/* a refused or failed connection has no status worth showing */
		nulls[3] = (code == 0 || x->guard.refused || (error != NULL && strcmp(error, "connection failed") == 0));
		values[4] = error ? CStringGetTextDatum(error) : (Datum) 0;
		nulls[4] = (error == NULL);
		values[5] = x->resp_len > 0 ? CStringGetTextDatum(x->resp) : (Datum) 0;
		nulls[5] = (x->resp_len == 0);
		values[6] = Int32GetDatum((int32) INSTR_TIME_GET_MILLISEC(took));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		*link = x->next;
		n_xfers--;
		XferFree(x);
	}
	return (Datum) 0;
}

/*
 * fluxrate_internal.outbound_in_flight() RETURNS TABLE (org_id uuid, delivery_id uuid):
 * the deliveries being sent by this backend
 */
PG_FUNCTION_INFO_V1(fr_outbound_in_flight);
Datum
fr_outbound_in_flight(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (Xfer *x = xfers; x; x = x->next)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};

		values[0] = UUIDPGetDatum(&x->org);
		values[1] = UUIDPGetDatum(&x->id);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* fluxrate_internal.outbound_reset() RETURNS integer: drop every transfer of this backend */
PG_FUNCTION_INFO_V1(fr_outbound_reset);
Datum
fr_outbound_reset(PG_FUNCTION_ARGS)
{
	int			n = 0;

	while (xfers)
	{
		Xfer	   *x = xfers;

		xfers = x->next;
		XferFree(x);
		n++;
	}
	n_xfers = 0;
	if (multi)
	{
		curl_multi_cleanup(multi);
		multi = NULL;
	}
	PG_RETURN_INT32(n);
}
