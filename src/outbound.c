/*-------------------------------------------------------------------------
 * outbound.c
 *	  Where the database server may connect to, and the concurrent transfer
 *	  engine of the delivery run.
 *
 * The policy (fluxrate.outbound_allow, superuser only) is a list of entries:
 *	  public			every public unicast address, on the usual ports of the
 *						channel (webhooks 80, 443, 8000-8999; SMTP 25, 465, 587,
 *						2525); the default
 *	  a.b.c.d[/n]		an IPv4 address or network, any port
 *	  x:y::z[/n]		an IPv6 address or network, any port ([::1] accepted)
 *	  host.name			a host name trusted as spelled in the URL or SMTP
 *						settings: whatever it resolves to, any port
 * Nothing else is dialed.  The check runs on the address libcurl is about to
 * connect to (CURLOPT_OPENSOCKETFUNCTION), after resolution, so a name that
 * resolves to 127.0.0.1 (or starts to, DNS rebinding) and the spellings
 * 0x7f000001, 2130706433, 017700000001 or [::ffff:127.0.0.1] are refused the
 * same as 127.0.0.1.  Proxies are off (CURLOPT_PROXY ""): the environment's
 * http_proxy would otherwise make every connection go to the proxy.
 *
 * The engine keeps a libcurl multi handle per backend: the delivery run starts
 * transfers (outbound_start_http, outbound_start_smtp) and collects the
 * finished ones (outbound_poll) between its commits, so one peer that never
 * answers holds its own slot only, never the run.  Handles and buffers are
 * malloc'ed (libcurl owns them; nothing between curl calls may raise), and
 * outbound_reset drops whatever a previous, interrupted run left behind.
 *
 * What a tenant sees of an attempt is one of: no error (sent), "refused by
 * policy", "connection failed" (any network, TLS or protocol failure,
 * timeouts included), "HTTP <code>" (a webhook peer answered non-2xx), or
 * "rejected by the server" with the SMTP reply code.  libcurl's own error text
 * (which quotes the peer: banners, SMTP replies) goes to the server log only.
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

/* ---- the policy ------------------------------------------------------------ */

#define POLICY_MAX_ENTRIES 64
#define POLICY_HOST_MAX 253

typedef enum
{
	ENTRY_PUBLIC,
	ENTRY_NET4,
	ENTRY_NET6,
	ENTRY_HOST
} EntryKind;

typedef struct
{
	EntryKind	kind;
	int			bits;
	unsigned char addr[16];
	char		host[POLICY_HOST_MAX + 1];
} PolicyEntry;

typedef struct
{
	int			n;
	PolicyEntry e[POLICY_MAX_ENTRIES];
} Policy;

char	   *fr_outbound_allow = NULL;
static Policy *policy = NULL;	/* the GUC's parsed "extra" */

static bool
prefix_match(const unsigned char *a, const unsigned char *net, int bits)
{
	int			full = bits / 8,
				rest = bits % 8;

	if (memcmp(a, net, full) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((a[full] ^ net[full]) & (0xff << (8 - rest)) & 0xff) == 0;
}

/* Parse one entry; false with *why on a syntax error */
static bool
parse_entry(const char *tok, PolicyEntry *e, const char **why)
{
	char		buf[POLICY_HOST_MAX + 8];
	char	   *slash;
	size_t		len = strlen(tok);
	int			maxbits;

	memset(e, 0, sizeof(*e));
	if (len == 0 || len > POLICY_HOST_MAX)
	{
		*why = "an entry is empty or longer than 253 characters";
		return false;
	}
	if (pg_strcasecmp(tok, "public") == 0)
	{
		e->kind = ENTRY_PUBLIC;
		return true;
	}
	strlcpy(buf, tok, sizeof(buf));
	/* [::1] and [::1]/128 as well as ::1 */
	if (buf[0] == '[')
	{
		char	   *close = strchr(buf, ']');

		if (close == NULL)
		{
			*why = "an IPv6 address in brackets lacks its ']'";
			return false;
		}
		memmove(close, close + 1, strlen(close + 1) + 1);
		memmove(buf, buf + 1, strlen(buf));
	}
	slash = strchr(buf, '/');
	if (slash)
		*slash = '\0';
	if (inet_pton(AF_INET, buf, e->addr) == 1)
	{
		e->kind = ENTRY_NET4;
		maxbits = 32;
	}
	else if (inet_pton(AF_INET6, buf, e->addr) == 1)
	{
		e->kind = ENTRY_NET6;
		maxbits = 128;
	}
	else
	{
		if (slash)
		{
			*why = "a network length follows something that is not an address";
			return false;
		}
		for (const char *p = buf; *p; p++)
			if (!(isalnum((unsigned char) *p) || *p == '.' || *p == '-'))
			{
				*why = "an entry is neither \"public\", an address, a network nor a host name";
				return false;
			}
		e->kind = ENTRY_HOST;
		for (size_t i = 0; buf[i]; i++)
			e->host[i] = pg_tolower((unsigned char) buf[i]);
		return true;
	}
	e->bits = maxbits;
	if (slash)
	{
		char	   *end;
		long		b = strtol(slash + 1, &end, 10);

		if (slash[1] == '\0' || *end != '\0' || b < 0 || b > maxbits)
		{
			*why = "a network length is out of range";
			return false;
		}
		e->bits = (int) b;
	}
	return true;
}

static bool
check_outbound_allow(char **newval, void **extra, GucSource source)
{
	Policy	   *p = malloc(sizeof(Policy));
	char	   *copy;
	char	   *tok;
	char	   *save = NULL;

	if (p == NULL)
		return false;
	p->n = 0;
	copy = strdup(*newval ? *newval : "");
	if (copy == NULL)
	{
		free(p);
		return false;
	}
	for (tok = strtok_r(copy, ", \t\n", &save); tok; tok = strtok_r(NULL, ", \t\n", &save))
	{
		const char *why = NULL;

		if (p->n >= POLICY_MAX_ENTRIES)
		{
			GUC_check_errdetail("fluxrate.outbound_allow holds at most %d entries.", POLICY_MAX_ENTRIES);
			free(copy);
			free(p);
			return false;
		}
		if (!parse_entry(tok, &p->e[p->n], &why))
		{
			GUC_check_errdetail("\"%s\": %s.", tok, why);
			GUC_check_errhint("Entries are \"public\", addresses such as 127.0.0.1 or ::1, networks such as 10.0.0.0/8, or host names, separated by commas.");
			free(copy);
			free(p);
			return false;
		}
		p->n++;
	}
	free(copy);
	*extra = p;
	return true;
}

static void
assign_outbound_allow(const char *newval, void *extra)
{
	policy = (Policy *) extra;
}

/* Special-purpose IPv4 ranges (IANA registry, RFC 6890 and successors) */
static const struct
{
	unsigned char a[4];
	int			bits;
}			v4_special[] =
{
	{{0, 0, 0, 0}, 8},			/* "this network" */
	{{10, 0, 0, 0}, 8},			/* private */
	{{100, 64, 0, 0}, 10},		/* shared address space (carrier NAT) */
	{{127, 0, 0, 0}, 8},		/* loopback */
	{{169, 254, 0, 0}, 16},		/* link local, cloud metadata services */
	{{172, 16, 0, 0}, 12},		/* private */
	{{192, 0, 0, 0}, 24},		/* IETF protocol assignments */
	{{192, 0, 2, 0}, 24},		/* documentation */
	{{192, 88, 99, 0}, 24},		/* 6to4 relay anycast */
	{{192, 168, 0, 0}, 16},		/* private */
	{{198, 18, 0, 0}, 15},		/* benchmarking */
	{{198, 51, 100, 0}, 24},	/* documentation */
	{{203, 0, 113, 0}, 24},		/* documentation */
	{{224, 0, 0, 0}, 4},		/* multicast */
	{{240, 0, 0, 0}, 4},		/* reserved, broadcast */
};

/* Inside global unicast 2000::/3, the ranges that are not someone's public host */
static const struct
{
	unsigned char a[16];
	int			bits;
}			v6_special[] =
{
	{{0x20, 0x01, 0x00, 0x00}, 32},	/* Teredo (tunnels to IPv4) */
	{{0x20, 0x01, 0x00, 0x02}, 48},	/* benchmarking */
	{{0x20, 0x01, 0x00, 0x10}, 28},	/* ORCHID */
	{{0x20, 0x01, 0x0d, 0xb8}, 32},	/* documentation */
	{{0x20, 0x02}, 16},			/* 6to4 (tunnels to IPv4) */
};

static bool
v4_public(const unsigned char *a)
{
	for (int i = 0; i < lengthof(v4_special); i++)
		if (prefix_match(a, v4_special[i].a, v4_special[i].bits))
			return false;
	return true;
}

static bool
v6_public(const unsigned char *a)
{
	if ((a[0] & 0xe0) != 0x20)	/* outside 2000::/3: loopback, ULA, link local, multicast, ... */
		return false;
	for (int i = 0; i < lengthof(v6_special); i++)
		if (prefix_match(a, v6_special[i].a, v6_special[i].bits))
			return false;
	return true;
}

static bool
port_usual(FrOutKind kind, int port)
{
	if (kind == FR_OUT_WEBHOOK)
		return port == 80 || port == 443 || (port >= 8000 && port <= 8999);
	return port == 25 || port == 465 || port == 587 || port == 2525;
}

/*
 * May this address (family AF_INET with 4 bytes or AF_INET6 with 16) and
 * port be dialed for this channel?  host_trusted: the target's host name is
 * listed in the policy.
 */
bool
FrOutboundAddressAllowed(int family, const unsigned char *addr, int port, FrOutKind kind, bool host_trusted)
{
	unsigned char v4[4];
	bool		is4;

	if (policy == NULL)
		return false;
	if (host_trusted)
		return true;
	if (family == AF_INET)
	{
		memcpy(v4, addr, 4);
		is4 = true;
	}
	else if (family == AF_INET6)
	{
		static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

		/* ::ffff:a.b.c.d is a.b.c.d on the wire */
		is4 = memcmp(addr, mapped, 12) == 0;
		if (is4)
			memcpy(v4, addr + 12, 4);
	}
	else
		return false;

	for (int i = 0; i < policy->n; i++)
	{
		const PolicyEntry *e = &policy->e[i];

		switch (e->kind)
		{
			case ENTRY_PUBLIC:
				if ((is4 ? v4_public(v4) : v6_public(addr)) && port_usual(kind, port))
					return true;
				break;
			case ENTRY_NET4:
				if (is4 && prefix_match(v4, e->addr, e->bits))
					return true;
				break;
			case ENTRY_NET6:
				if (!is4 && prefix_match(addr, e->addr, e->bits))
					return true;
				break;
			case ENTRY_HOST:
				break;
		}
	}
	return false;
}

/* Is this host name (as in the URL or the SMTP settings) listed? */
bool
FrOutboundHostTrusted(const char *host)
{
	if (policy == NULL || host == NULL)
		return false;
	for (int i = 0; i < policy->n; i++)
		if (policy->e[i].kind == ENTRY_HOST && pg_strcasecmp(policy->e[i].host, host) == 0)
			return true;
	return false;
}

/* The libcurl side: called for every socket libcurl would connect */
static curl_socket_t
GuardOpenSocket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	FrGuard    *g = (FrGuard *) clientp;
	const struct sockaddr *sa = &address->addr;
	bool		ok = false;

	if (purpose == CURLSOCKTYPE_IPCXN && address->family == AF_INET &&
		address->addrlen >= sizeof(struct sockaddr_in))
	{
		const struct sockaddr_in *s4 = (const struct sockaddr_in *) sa;

		ok = FrOutboundAddressAllowed(AF_INET, (const unsigned char *) &s4->sin_addr,
									  ntohs(s4->sin_port), g->kind, g->host_trusted);
	}
	else if (purpose == CURLSOCKTYPE_IPCXN && address->family == AF_INET6 &&
			 address->addrlen >= sizeof(struct sockaddr_in6))
	{
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *) sa;

		ok = FrOutboundAddressAllowed(AF_INET6, (const unsigned char *) &s6->sin6_addr,
									  ntohs(s6->sin6_port), g->kind, g->host_trusted);
	}
	if (!ok)
	{
		g->refused = true;
		return CURL_SOCKET_BAD;
	}
	return socket(address->family, address->socktype, address->protocol);
}

/*
 * Put the policy on an easy handle.  host: the target's host name as written
 * (its trust is decided now, its addresses when dialed).
 */
void
FrOutboundGuard(CURL *c, FrGuard *g, FrOutKind kind, const char *host)
{
	g->kind = kind;
	g->refused = false;
	g->host_trusted = FrOutboundHostTrusted(host);
	curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, GuardOpenSocket);
	curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, g);
	curl_easy_setopt(c, CURLOPT_PROXY, "");
	curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(c, CURLOPT_MAXREDIRS, 0L);
}

/* The host of a URL as libcurl will read it (palloc'd, NULL if it does not parse) */
static char *
url_host(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *h = NULL;
	char	   *out = NULL;

	if (u == NULL)
		return NULL;
	if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK)
	{
		out = pstrdup(h);
		curl_free(h);
	}
	curl_url_cleanup(u);
	return out;
}

/* The tenant's view of a failed or finished transfer (NULL: success) */
const char *
FrOutboundTenantError(const FrGuard *g, CURLcode rc, long code, bool smtp)
{
	if (g->refused)
		return "refused by policy";
	if (smtp)
	{
		if (rc == CURLE_OK)
			return NULL;
		/* the server answered and refused (AUTH, MAIL FROM, RCPT, DATA) */
		if (code >= 400 && code <= 599)
			return "rejected by the server";
		return "connection failed";
	}
	if (rc != CURLE_OK)
		return "connection failed";
	if (code < 200 || code > 299)
		return psprintf("HTTP %ld", code);
	return NULL;
}

void
FrOutboundInit(void)
{
	DefineCustomStringVariable("fluxrate.outbound_allow",
							   "Where webhook and SMTP deliveries may connect: \"public\" (public unicast addresses on the usual ports), addresses, networks, host names.",
							   "Checked on the address actually dialed.  Loopback and private networks must be listed, e.g. 'public, 10.1.2.3, 127.0.0.1'.",
							   &fr_outbound_allow, "public", PGC_SUSET, 0,
							   check_outbound_allow, assign_outbound_allow, NULL);
	DefineCustomIntVariable("fluxrate.delivery_concurrency",
							"Deliveries one delivery run keeps in flight at once.",
							NULL, &fr_delivery_concurrency, 32, 1, 256, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("fluxrate.delivery_per_org",
							"Deliveries of one organization in flight at once in a delivery run.",
							"A slow organization holds at most this many of the run's slots.",
							&fr_delivery_per_org, 4, 1, 256, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("fluxrate.delivery_per_endpoint",
							"Deliveries to one webhook endpoint (or one organization's SMTP relay) in flight at once.",
							NULL, &fr_delivery_per_endpoint, 2, 1, 256, PGC_SUSET, 0, NULL, NULL, NULL);
}

int			fr_delivery_concurrency = 32;
int			fr_delivery_per_org = 4;
int			fr_delivery_per_endpoint = 2;

/*
 * fluxrate_internal.outbound_address_allowed(address text, port integer, channel text)
 * The policy's verdict for a literal address (inet_pton syntax), for tests
 * and for operators checking their setting.
 */
PG_FUNCTION_INFO_V1(fr_outbound_address_allowed);
Datum
fr_outbound_address_allowed(PG_FUNCTION_ARGS)
{
	char	   *a = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int			port = PG_GETARG_INT32(1);
	char	   *ch = text_to_cstring(PG_GETARG_TEXT_PP(2));
	unsigned char buf[16];
	FrOutKind	kind;
	int			family;

	if (strcmp(ch, "webhook") == 0)
		kind = FR_OUT_WEBHOOK;
	else if (strcmp(ch, "email") == 0)
		kind = FR_OUT_SMTP;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid channel: %s", ch),
				 errhint("The channel is webhook or email.")));
	if (inet_pton(AF_INET, a, buf) == 1)
		family = AF_INET;
	else if (inet_pton(AF_INET6, a, buf) == 1)
		family = AF_INET6;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid address: \"%s\"", a),
				 errhint("Send an IPv4 or IPv6 address such as 192.0.2.1 or 2001:db8::1.")));
	PG_RETURN_BOOL(FrOutboundAddressAllowed(family, buf, port, kind, false));
}

/*
 * fluxrate_internal.check_webhook_url(url text): refuses, at creation, what
 * the delivery would refuse anyway or what hides a credential, reading the URL
 * with libcurl's own parser (the one the transfer uses, so there is no second
 * opinion to disagree with it).
 */
PG_FUNCTION_INFO_V1(fr_check_webhook_url);
Datum
fr_check_webhook_url(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	CURLU	   *u = curl_url();
	char	   *part = NULL;
	CURLUcode	uc;
	bool		userinfo = false;
	bool		scheme_ok = false;

	if (u == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	uc = curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME);
	if (uc == CURLUE_OK)
	{
		if (curl_url_get(u, CURLUPART_SCHEME, &part, 0) == CURLUE_OK)
		{
			scheme_ok = strcmp(part, "http") == 0 || strcmp(part, "https") == 0;
			curl_free(part);
		}
		part = NULL;
		if (curl_url_get(u, CURLUPART_USER, &part, 0) == CURLUE_OK)
		{
			userinfo = true;
			curl_free(part);
		}
		part = NULL;
		if (curl_url_get(u, CURLUPART_PASSWORD, &part, 0) == CURLUE_OK)
		{
			userinfo = true;
			curl_free(part);
		}
	}
	curl_url_cleanup(u);
	if (uc != CURLUE_OK || !scheme_ok)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("url must be an http or https URL"),
				 errdetail("url was \"%.200s\".", url),
				 errhint("Send a URL such as https://example.com/webhooks/fluxrate.")));
	if (userinfo)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("url must not carry a user name or password"),
				 errhint("Authenticate the webhook with its X-Fluxrate-Signature header; put a token in the path or query if the receiver needs one.")));
	PG_RETURN_VOID();
}

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
	char	   *host = url_host(url);
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
