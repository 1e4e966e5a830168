/*-------------------------------------------------------------------------
 * outbound_policy.c
 *	  Where the database server may connect to: the fluxrate.outbound_allow
 *	  setting, the check on the address actually dialed, and what a tenant is
 *	  told of a failed attempt.  The transfers themselves are outbound_engine.c.
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
char *
FrOutboundUrlHost(const char *url)
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

