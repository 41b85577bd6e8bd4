/* TLSA lookups for DANE (see dane.h): one AD-bit query per distinct validated
 * host, "_PORT._tcp.HOST" type TLSA (52), all in parallel on the queue
 * manager's resolver; the set goes to the caller when every answer is in. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <ares.h>

#include "core/alloc.h"
#include "core/log.h"
#include "queue/dane.h"

#define T_TLSA 52

struct dane_req {
    struct kt_dane_set *set;
    kt_dane_cb cb;
    void *arg;
    unsigned pending;
    int cancelled;
};

struct dane_q {
    struct dane_req *r;
    size_t idx;
};

static void req_done(struct dane_req *r)
{
    if (r->cancelled) {
        kt_dane_set_free(r->set);
        r->cb(r->arg, NULL);
    } else {
        r->cb(r->arg, r->set);
    }
    kt_free(r);
}

static void tlsa_done(void *arg, int status, const unsigned char *abuf, int alen, int authenticated)
{
    struct dane_q *q = arg;
    struct dane_req *r = q->r;
    struct kt_dane_host *h = &r->set->hosts[q->idx];
    kt_free(q);
    if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        r->cancelled = 1;
    } else if (!authenticated && (status == ARES_SUCCESS || status == ARES_ENODATA || status == ARES_ENOTFOUND)) {
        /* RFC 7672 2.2: the host's address was validated, so its TLSA answer must be too: an insecure
         * answer under a signed name is treated as a lookup failure (Postfix: "TLSA lookup error") */
        h->state = KT_DANE_ERROR;
    } else if (status == ARES_ENODATA || status == ARES_ENOTFOUND) {
        h->state = KT_DANE_NO_TLSA;
    } else if (status != ARES_SUCCESS || kt_dane_parse_tlsa(abuf, alen, h) < 0) {
        h->state = KT_DANE_ERROR;
    }
    if (h->state == KT_DANE_ERROR)
        kt_info_as("smtp", "warning: TLSA lookup error for %s: %s", h->host,
                   status == ARES_SUCCESS ? "answer not validated or malformed" : ares_strerror(status));
    if (--r->pending == 0)
        req_done(r);
}

void kt_dane_resolve(struct kt_dns *dns, const struct kt_smtp_addr *addrs, size_t n, int port, kt_dane_cb cb,
                     void *arg)
{
    struct dane_req *r = kt_calloc(1, sizeof(*r));
    r->set = kt_calloc(1, sizeof(*r->set));
    r->set->hosts = kt_calloc(n ? n : 1, sizeof(*r->set->hosts));
    r->cb = cb;
    r->arg = arg;
    /* every distinct host once; a host is validated only if all its addresses were */
    for (size_t i = 0; i < n; i++) {
        struct kt_dane_host *h = (struct kt_dane_host *)kt_dane_set_find(r->set, addrs[i].host);
        if (!h) {
            h = &r->set->hosts[r->set->n++];
            snprintf(h->host, sizeof(h->host), "%s", addrs[i].host);
            h->state = addrs[i].dnssec ? KT_DANE_NO_TLSA : KT_DANE_INSECURE;
        } else if (!addrs[i].dnssec) {
            h->state = KT_DANE_INSECURE;
        }
    }
    r->pending = 1;       /* held until every query is sent: callbacks may run at once */
    for (size_t i = 0; i < r->set->n; i++) {
        struct kt_dane_host *h = &r->set->hosts[i];
        if (h->state == KT_DANE_INSECURE)
            continue;
        char name[300];
        snprintf(name, sizeof(name), "_%d._tcp.%s", port, h->host);
        struct dane_q *q = kt_calloc(1, sizeof(*q));
        q->r = r;
        q->idx = i;
        r->pending++;
        kt_dns_query_ad(dns, name, T_TLSA, tlsa_done, q);
    }
    if (--r->pending == 0)
        req_done(r);
}
