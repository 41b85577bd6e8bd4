/* Next-hop lookups (see dns.h). Address literals are answered at once;
 * names are looked up with getaddrinfo for now. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>

#include "ktrelay/alloc.h"
#include "ktrelay/dns.h"

struct kt_dns {
    struct kt_loop *loop;
};

int kt_dns_new(struct kt_loop *loop, const char *servers, struct kt_dns **out)
{
    struct kt_dns *d = kt_calloc(1, sizeof(*d));
    d->loop = loop;
    *out = d;
    return 0;
}

void kt_dns_free(struct kt_dns *dns)
{
    kt_free(dns);
}

void kt_dns_tick(struct kt_dns *dns)
{
}

void kt_dns_lookup(struct kt_dns *dns, const char *host, int port, int mx, kt_dns_cb cb, void *arg)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res, *ai;
    struct kt_smtp_addr addrs[16];
    size_t n = 0;
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        cb(arg, rc == EAI_NONAME ? 550 : 450, NULL, 0, gai_strerror(rc));
        return;
    }
    for (ai = res; ai && n < 16; ai = ai->ai_next) {
        memcpy(&addrs[n].ss, ai->ai_addr, ai->ai_addrlen);
        addrs[n].len = ai->ai_addrlen;
        snprintf(addrs[n].host, sizeof(addrs[n].host), "%s", host);
        n++;
    }
    freeaddrinfo(res);
    cb(arg, 0, addrs, n, NULL);
}
