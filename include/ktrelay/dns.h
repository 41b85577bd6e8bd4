/* Next-hop address lookups for the outbound client: MX records (sorted by
 * preference) with A/AAAA fallback, or A/AAAA alone for a [bracketed] next
 * hop, answered on the queue manager's loop. */
#ifndef KTRELAY_DNS_H
#define KTRELAY_DNS_H

#include <stddef.h>

#include "ktrelay/loop.h"
#include "ktrelay/smtp_client.h"

struct kt_dns;

/* res: 0 with n >= 1 addresses; a negative errno or 450 for a temporary
 * failure; 550 when the name does not exist or has no address. err (valid
 * during the call) says why. */
typedef void (*kt_dns_cb)(void *arg, int res, const struct kt_smtp_addr *addrs, size_t n, const char *err);

/* servers: "ip[:port],..." overriding resolv.conf (tests), NULL = system. 0 or -errno. */
int kt_dns_new(struct kt_loop *loop, const char *servers, struct kt_dns **out);
/* Calls back every lookup still in flight (res -ECANCELED) and frees. NULL is fine. */
void kt_dns_free(struct kt_dns *dns);
/* host: a name or an IP address literal (answered at once, without DNS). */
void kt_dns_lookup(struct kt_dns *dns, const char *host, int port, int mx, kt_dns_cb cb, void *arg);
/* Call about once a second: resolver retransmissions and timeouts. */
void kt_dns_tick(struct kt_dns *dns);

#endif
