/* Next-hop address lookups for the outbound client: MX records (sorted by
 * preference) with A/AAAA fallback, or A/AAAA alone for a [bracketed] next
 * hop, answered on the queue manager's loop through c-ares; never blocks. */
#ifndef KTRELAY_DNS_H
#define KTRELAY_DNS_H

#include <stddef.h>

#include "core/loop.h"
#include "queue/smtp_client.h"

struct kt_dns;

/* res: 0 with n >= 1 addresses (in preference order); 450 for a temporary
 * failure (SERVFAIL, timeout); 550 when the name does not exist, has no
 * address or refuses mail (null MX); -ECANCELED when the resolver is freed.
 * dsn ("4.4.3", "5.1.2", "5.1.10") and err (Postfix-style text) are valid
 * during the call, NULL on success. */
typedef void (*kt_dns_cb)(void *arg, int res, const struct kt_smtp_addr *addrs, size_t n, const char *dsn,
                          const char *err);

/* servers: "ip[:port],..." overriding resolv.conf (tests), NULL or "" = system. 0 or -errno. */
int kt_dns_new(struct kt_loop *loop, const char *servers, struct kt_dns **out);
/* Calls back every lookup still in flight (res -ECANCELED), reaps its own
 * io_uring operations (running the loop briefly) and frees. NULL is fine. */
void kt_dns_free(struct kt_dns *dns);
/* host: a name or an IP address literal (answered at once, without DNS).
 * mx: look up MX records first. cb may run before this returns. */
void kt_dns_lookup(struct kt_dns *dns, const char *host, int port, int mx, kt_dns_cb cb, void *arg);
/* kt_dns_lookup for DANE (smtp_dns_support_level = dnssec): every query carries the AD bit (RFC 6840
 * 5.7), so a validating resolver says in its answer's AD bit whether it validated it; each address's
 * dnssec flag is 1 when its A/AAAA answers had AD set, mx_dnssec when the MX answer before them (if
 * any) had. Postfix
 * trusts its local resolver's AD bit the same way: the resolver must be a validating one on a trusted
 * path (loopback). */
void kt_dns_lookup_dnssec(struct kt_dns *dns, const char *host, int port, int mx, kt_dns_cb cb, void *arg);
/* Like kt_dns_new with the per-try timeout (ms) and number of tries given. */
int kt_dns_new_opts(struct kt_loop *loop, const char *servers, int timeout_ms, int tries, struct kt_dns **out);
/* One query of class IN and the given type (1 A, 12 PTR, 15 MX, 16 TXT, 28
 * AAAA). cb gets the c-ares status (ARES_SUCCESS, ARES_ENOTFOUND for NXDOMAIN,
 * ARES_ENODATA, ARES_ETIMEOUT, ARES_ESERVFAIL, ..., ARES_EDESTRUCTION when the
 * resolver is freed) and the answer message when there is one (valid during
 * the call). cb runs exactly once, possibly before this returns. */
typedef void (*kt_dns_raw_cb)(void *arg, int status, const unsigned char *abuf, int alen);
void kt_dns_query(struct kt_dns *dns, const char *name, int type, kt_dns_raw_cb cb, void *arg);
/* kt_dns_query with the AD bit set in the query; cb also gets whether the answer had AD set. The
 * status is as kt_dns_query's (ARES_ENOTFOUND for NXDOMAIN, ARES_ENODATA for an empty answer). */
typedef void (*kt_dns_ad_cb)(void *arg, int status, const unsigned char *abuf, int alen, int authenticated);
void kt_dns_query_ad(struct kt_dns *dns, const char *name, int type, kt_dns_ad_cb cb, void *arg);
/* Call about once a second: resolver retransmissions and timeouts. */
void kt_dns_tick(struct kt_dns *dns);

#endif
