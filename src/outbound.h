/*-------------------------------------------------------------------------
 * outbound.h
 *	  The outbound connection policy (outbound_policy.c), shared with the
 *	  transfer engine (outbound_engine.c) and delivery.c.
 *-------------------------------------------------------------------------
 */
#ifndef FLUXRATE_OUTBOUND_H
#define FLUXRATE_OUTBOUND_H

#include <curl/curl.h>

typedef enum
{
	FR_OUT_WEBHOOK,
	FR_OUT_SMTP
} FrOutKind;

/* One transfer's view of the policy; lives as long as the easy handle */
typedef struct
{
	FrOutKind	kind;
	bool		host_trusted;	/* the host name is listed in the policy */
	bool		refused;		/* an address libcurl tried was refused */
} FrGuard;

extern void FrOutboundGuard(CURL *c, FrGuard *g, FrOutKind kind, const char *host);
extern bool FrOutboundAddressAllowed(int family, const unsigned char *addr, int port,
									 FrOutKind kind, bool host_trusted);
extern bool FrOutboundHostTrusted(const char *host);
extern char *FrOutboundUrlHost(const char *url);
extern const char *FrOutboundTenantError(const FrGuard *g, CURLcode rc, long code, bool smtp);

#endif							/* FLUXRATE_OUTBOUND_H */
