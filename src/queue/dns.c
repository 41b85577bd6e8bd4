/* Next-hop lookups (see dns.h) with c-ares on the caller's io_uring loop.
 *
 * c-ares reports through its socket-state callback which sockets it wants
 * watched; each gets a one-shot io_uring poll, re-armed after
 * ares_process_fd. Retransmissions and timeouts are driven by kt_dns_tick.
 * The socket-state callback only records wishes; sync() arms, cancels and
 * frees watches, so no watch disappears under a running completion.
 *
 * A lookup with MX queries MX first: exchangers sorted by preference, then
 * A/AAAA for all of them in parallel; no MX records means the domain itself
 * (RFC 5321 5.1); a null MX (RFC 7505) fails permanently. The user callback
 * runs exactly once per lookup.
 *
 * The DNSSEC variant (for DANE) sends its own queries with the AD bit set
 * through ares_send, A and AAAA separately, and keeps the AD bit of every
 * answer: an address is validated when its answers and the MX answer were. */
#include <arpa/inet.h>
#include <ares.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "queue/dns.h"

#define MAX_ADDRS 16
/* a failed lookup is retried with the message later: keep the wait short */
#define QUERY_TIMEOUT_MS 3000
#define QUERY_TRIES 2

struct watch {
    struct kt_op op;
    struct kt_dns *d;
    int fd;
    short want, armed_mask;
    int armed, cancelling, dead;
    struct watch *next;
};

struct kt_dns {
    struct kt_loop *loop;
    ares_channel ch;
    int have_ch;
    struct watch *watches;
    unsigned armed;
};

struct exch {
    struct req *r;
    char *name;
    unsigned short pref;
    int status;
    struct kt_smtp_addr *addrs;
    size_t n;
    int ad_pending;                /* dnssec: A and AAAA answers still to come */
    int authenticated;             /* dnssec: every answer so far had AD */
};

struct req {
    struct kt_dns *d;
    kt_dns_cb cb;
    void *arg;
    char *host;
    int port;
    unsigned pending;
    struct exch *ex;
    size_t n_ex;
    int dnssec;                    /* AD-bit queries (kt_dns_lookup_dnssec) */
    int mx_authenticated;          /* dnssec: the MX answer had AD (1 when there was no MX query) */
};

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int lib_status;

static void lib_init(void)
{
    lib_status = ares_library_init(ARES_LIB_INIT_ALL);
}

/* ---- sockets ---- */

static void watch_done(struct kt_op *op, int res, unsigned flags);

static void sync_watches(struct kt_dns *d)
{
    struct watch **pp = &d->watches, *w;
    while ((w = *pp)) {
        if (w->armed) {
            /* a poll for less than is wanted now, or for a closed socket, must go */
            if (!w->cancelling && (w->dead || (w->want & ~w->armed_mask))) {
                struct io_uring_sqe *sqe = kt_loop_sqe(d->loop, NULL);
                io_uring_prep_poll_remove(sqe, (__u64)(uintptr_t)&w->op);
                w->cancelling = 1;
            }
        } else if (w->dead) {
            *pp = w->next;
            kt_free(w);
            continue;
        } else if (w->want) {
            struct io_uring_sqe *sqe = kt_loop_sqe(d->loop, &w->op);
            io_uring_prep_poll_add(sqe, w->fd, (unsigned)w->want);
            w->armed = 1;
            w->armed_mask = w->want;
            d->armed++;
        }
        pp = &w->next;
    }
}

static void watch_done(struct kt_op *op, int res, unsigned flags)
{
    struct watch *w = (struct watch *)op;
    struct kt_dns *d = w->d;
    (void)flags;
    w->armed = 0;
    w->cancelling = 0;
    d->armed--;
    if (!d->have_ch)
        return;
    if (!w->dead && res > 0) {
        int rd = res & (POLLIN | POLLERR | POLLHUP), wr = res & (POLLOUT | POLLERR | POLLHUP);
        /* may close this socket (marking w dead) and run user callbacks */
        ares_process_fd(d->ch, rd ? w->fd : ARES_SOCKET_BAD, wr ? w->fd : ARES_SOCKET_BAD);
    }
    sync_watches(d);
}

static void sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct kt_dns *d = data;
    struct watch *w;
    for (w = d->watches; w; w = w->next)
        if (!w->dead && w->fd == fd)
            break;
    if (!readable && !writable) {
        if (w) {
            w->dead = 1;
            w->want = 0;
        }
        return;
    }
    if (!w) {
        w = kt_calloc(1, sizeof(*w));
        w->op.cb = watch_done;
        w->d = d;
        w->fd = fd;
        w->next = d->watches;
        d->watches = w;
    }
    w->want = (short)((readable ? POLLIN : 0) | (writable ? POLLOUT : 0));
}

/* ---- lookups ---- */

static int temporary(int status)
{
    return status != ARES_ENOTFOUND && status != ARES_ENODATA;
}

static void req_free(struct req *r)
{
    for (size_t i = 0; i < r->n_ex; i++) {
        kt_free(r->ex[i].name);
        kt_free(r->ex[i].addrs);
    }
    kt_free(r->ex);
    kt_free(r->host);
    kt_free(r);
}

static void req_fail(struct req *r, int status, const char *name, const char *type)
{
    char err[600];
    if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        r->cb(r->arg, -ECANCELED, NULL, 0, NULL, "resolver shut down");
    } else if (temporary(status)) {
        snprintf(err, sizeof(err), "Host or domain name not found. Name service error for name=%s type=%s: "
                 "Host not found, try again (%s)", name, type, ares_strerror(status));
        r->cb(r->arg, 450, NULL, 0, "4.4.3", err);
    } else {
        snprintf(err, sizeof(err), "Host or domain name not found. Name service error for name=%s type=%s: "
                 "Host not found", name, type);
        r->cb(r->arg, 550, NULL, 0, "5.1.2", err);
    }
    req_free(r);
}

/* Every address lookup answered: report in exchanger order. No address at
 * all is temporary if any lookup failed temporarily, else permanent. */
static void req_finish(struct req *r)
{
    struct kt_smtp_addr all[MAX_ADDRS];
    size_t n = 0;
    int status = ARES_ENOTFOUND;
    const char *failed = r->n_ex ? r->ex[0].name : r->host;
    for (size_t i = 0; i < r->n_ex; i++) {
        struct exch *e = &r->ex[i];
        for (size_t k = 0; k < e->n && n < MAX_ADDRS; k++) {
            all[n] = e->addrs[k];
            all[n].dnssec = r->dnssec && e->authenticated;
            all[n++].mx_dnssec = r->dnssec && r->mx_authenticated;
        }
        if (e->status == ARES_EDESTRUCTION || e->status == ARES_ECANCELLED) {
            status = e->status;
            n = 0;
            break;
        }
        if (e->status != ARES_SUCCESS && temporary(e->status) && !temporary(status)) {
            status = e->status;
            failed = e->name;
        }
    }
    if (n == 0) {
        req_fail(r, status, failed, "A");
        return;
    }
    r->cb(r->arg, 0, all, n, NULL, NULL);
    req_free(r);
}

static void exch_add_addr(struct exch *e, int family, const void *ip)
{
    struct req *r = e->r;
    e->addrs = kt_realloc(e->addrs, (e->n + 1) * sizeof(*e->addrs));
    struct kt_smtp_addr *a = &e->addrs[e->n++];
    memset(a, 0, sizeof(*a));
    if (family == AF_INET) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)&a->ss;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)r->port);
        memcpy(&in4->sin_addr, ip, 4);
        a->len = sizeof(*in4);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a->ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)r->port);
        memcpy(&in6->sin6_addr, ip, 16);
        a->len = sizeof(*in6);
    }
    snprintf(a->host, sizeof(a->host), "%s", e->name);
}

static void addr_done(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    struct exch *e = arg;
    struct req *r = e->r;
    (void)timeouts;
    e->status = status;
    if (status == ARES_SUCCESS && res) {
        for (struct ares_addrinfo_node *ai = res->nodes; ai; ai = ai->ai_next) {
            if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) || ai->ai_addrlen > sizeof(e->addrs->ss))
                continue;
            e->addrs = kt_realloc(e->addrs, (e->n + 1) * sizeof(*e->addrs));
            struct kt_smtp_addr *a = &e->addrs[e->n++];
            memset(a, 0, sizeof(*a));
            memcpy(&a->ss, ai->ai_addr, ai->ai_addrlen);
            a->len = ai->ai_addrlen;
            if (ai->ai_family == AF_INET)
                ((struct sockaddr_in *)&a->ss)->sin_port = htons((unsigned short)r->port);
            else
                ((struct sockaddr_in6 *)&a->ss)->sin6_port = htons((unsigned short)r->port);
            snprintf(a->host, sizeof(a->host), "%s", e->name);
            a->pref = e->pref;
        }
    }
    if (res)
        ares_freeaddrinfo(res);
    if (--r->pending == 0)
        req_finish(r);
}

static void ad_addr_done(void *arg, int status, const unsigned char *abuf, int alen, int authenticated);

struct ad_addr_q {
    struct exch *e;
    int type;
};

static void resolve_exchangers(struct req *r)
{
    struct ares_addrinfo_hints hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
    r->pending = (unsigned)r->n_ex;
    /* a callback may run at once: none may see pending reach 0 before all are started */
    r->pending++;
    for (size_t i = 0; i < r->n_ex; i++) {
        r->ex[i].r = r;
        if (r->dnssec) {
            r->ex[i].ad_pending = 2;
            r->ex[i].authenticated = 1;
            r->ex[i].status = ARES_ENODATA;
            for (int t = 0; t < 2; t++) {
                struct ad_addr_q *aq = kt_calloc(1, sizeof(*aq));
                aq->e = &r->ex[i];
                aq->type = t == 0 ? 1 /* A */ : 28 /* AAAA */;
                kt_dns_query_ad(r->d, r->ex[i].name, aq->type, ad_addr_done, aq);
            }
            continue;
        }
        ares_getaddrinfo(r->d->ch, r->ex[i].name, NULL, &hints, addr_done, &r->ex[i]);
    }
    if (--r->pending == 0)
        req_finish(r);
}

/* One of the A/AAAA answers of an exchanger in DNSSEC mode. */
static void ad_addr_done(void *arg, int status, const unsigned char *abuf, int alen, int authenticated)
{
    struct ad_addr_q *aq = arg;
    struct exch *e = aq->e;
    struct req *r = e->r;
    if (status == ARES_SUCCESS) {
        if (aq->type == 1) {
            struct ares_addrttl ttls[MAX_ADDRS];
            int n = MAX_ADDRS;
            status = ares_parse_a_reply(abuf, alen, NULL, ttls, &n);
            for (int i = 0; status == ARES_SUCCESS && i < n; i++)
                exch_add_addr(e, AF_INET, &ttls[i].ipaddr);
        } else {
            struct ares_addr6ttl ttls[MAX_ADDRS];
            int n = MAX_ADDRS;
            status = ares_parse_aaaa_reply(abuf, alen, NULL, ttls, &n);
            for (int i = 0; status == ARES_SUCCESS && i < n; i++)
                exch_add_addr(e, AF_INET6, &ttls[i].ip6addr);
        }
    }
    if (status == ARES_SUCCESS || status == ARES_ENODATA || status == ARES_ENOTFOUND)
        e->authenticated &= authenticated;
    else
        e->authenticated = 0;
    /* the exchanger's status: success if either family gave an address, else a temporary failure if
     * either had one, else NXDOMAIN or no data */
    if (status == ARES_SUCCESS && e->n > 0)
        e->status = ARES_SUCCESS;
    else if (e->status != ARES_SUCCESS && status != ARES_SUCCESS && status != ARES_ENODATA
             && (temporary(status) || e->status == ARES_ENODATA))
        e->status = status;
    kt_free(aq);
    if (--e->ad_pending == 0 && --r->pending == 0)
        req_finish(r);
}

static void add_exchanger(struct req *r, const char *name, unsigned short pref)
{
    r->ex = kt_realloc(r->ex, (r->n_ex + 1) * sizeof(*r->ex));
    r->ex[r->n_ex++] = (struct exch){ .name = kt_strdup(name), .pref = pref };
}

static int by_pref(const void *a, const void *b)
{
    const struct exch *x = a, *y = b;
    return (x->pref > y->pref) - (x->pref < y->pref);
}

static void mx_done(void *arg, int status, int timeouts, unsigned char *abuf, int alen);

static void mx_ad_done(void *arg, int status, const unsigned char *abuf, int alen, int authenticated)
{
    struct req *r = arg;
    r->mx_authenticated = authenticated;
    mx_done(r, status, 0, (unsigned char *)abuf, alen);
}

static void mx_done(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct req *r = arg;
    struct ares_mx_reply *mx = NULL;
    (void)timeouts;
    if (status == ARES_SUCCESS)
        status = ares_parse_mx_reply(abuf, alen, &mx);
    if (status == ARES_ENODATA) {
        /* no MX: the domain itself is the exchanger (RFC 5321 5.1) */
        add_exchanger(r, r->host, 0);
        resolve_exchangers(r);
        return;
    }
    if (status != ARES_SUCCESS) {
        req_fail(r, status, r->host, "MX");
        return;
    }
    int null_mx = 0;
    for (struct ares_mx_reply *p = mx; p; p = p->next) {
        if (!p->host[0] || !strcmp(p->host, "."))
            null_mx = 1;
        else if (r->n_ex < MAX_ADDRS)
            add_exchanger(r, p->host, p->priority);
    }
    ares_free_data(mx);
    if (null_mx || r->n_ex == 0) {
        char err[400];
        snprintf(err, sizeof(err), "Domain %s does not accept mail (nullMX)", r->host);
        r->cb(r->arg, 550, NULL, 0, "5.1.10", err);
        req_free(r);
        return;
    }
    /* equal preferences keep the server's order here; each connection shuffles them (qmgr.c,
     * smtp_randomize_addresses) */
    for (size_t i = 1; i < r->n_ex; i++)
        for (size_t k = i; k > 0 && by_pref(&r->ex[k - 1], &r->ex[k]) > 0; k--) {
            struct exch t = r->ex[k];
            r->ex[k] = r->ex[k - 1];
            r->ex[k - 1] = t;
        }
    resolve_exchangers(r);
}

static int literal(const char *host, int port, struct kt_smtp_addr *a)
{
    struct sockaddr_in *in4 = (struct sockaddr_in *)&a->ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a->ss;
    const char *h = host;
    memset(a, 0, sizeof(*a));
    if (!strncasecmp(h, "ipv6:", 5))
        h += 5;
    if (inet_pton(AF_INET, h, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)port);
        a->len = sizeof(*in4);
    } else if (inet_pton(AF_INET6, h, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        a->len = sizeof(*in6);
    } else {
        return 0;
    }
    snprintf(a->host, sizeof(a->host), "%s", h);
    return 1;
}

static void lookup(struct kt_dns *d, const char *host, int port, int mx, int dnssec, kt_dns_cb cb, void *arg)
{
    struct kt_smtp_addr a;
    if (literal(host, port, &a)) {
        cb(arg, 0, &a, 1, NULL, NULL);
        return;
    }
    if (!d || !d->have_ch) {
        cb(arg, -ECANCELED, NULL, 0, NULL, "resolver shut down");
        return;
    }
    struct req *r = kt_calloc(1, sizeof(*r));
    r->d = d;
    r->cb = cb;
    r->arg = arg;
    r->host = kt_strdup(host);
    r->port = port;
    r->dnssec = dnssec;
    r->mx_authenticated = 1;
    size_t len = strlen(r->host);
    if (len > 1 && r->host[len - 1] == '.')
        r->host[len - 1] = '\0';
    if (mx && dnssec) {
        kt_dns_query_ad(d, r->host, 15 /* T_MX */, mx_ad_done, r);
    } else if (mx) {
        ares_query(d->ch, r->host, 1 /* C_IN */, 15 /* T_MX */, mx_done, r);
    } else {
        add_exchanger(r, r->host, 0);
        resolve_exchangers(r);
    }
    sync_watches(d);
}

void kt_dns_lookup(struct kt_dns *d, const char *host, int port, int mx, kt_dns_cb cb, void *arg)
{
    lookup(d, host, port, mx, 0, cb, arg);
}

void kt_dns_lookup_dnssec(struct kt_dns *d, const char *host, int port, int mx, kt_dns_cb cb, void *arg)
{
    lookup(d, host, port, mx, 1, cb, arg);
}

struct raw_req {
    kt_dns_raw_cb cb;
    void *arg;
};

static void raw_done(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct raw_req *q = arg;
    (void)timeouts;
    q->cb(q->arg, status, abuf, abuf ? alen : 0);
    kt_free(q);
}

void kt_dns_query(struct kt_dns *d, const char *name, int type, kt_dns_raw_cb cb, void *arg)
{
    if (!d || !d->have_ch) {
        cb(arg, ARES_EDESTRUCTION, NULL, 0);
        return;
    }
    struct raw_req *q = kt_calloc(1, sizeof(*q));
    q->cb = cb;
    q->arg = arg;
    ares_query(d->ch, name, 1 /* C_IN */, type, raw_done, q);
    sync_watches(d);
}

struct ad_req {
    kt_dns_ad_cb cb;
    void *arg;
};

/* ares_send's answer: the status as ares_query would give it (rcode and answer count), and the AD bit. */
static void ad_done(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct ad_req *q = arg;
    int authenticated = 0;
    (void)timeouts;
    if (status == ARES_SUCCESS) {
        if (!abuf || alen < 12) {
            status = ARES_EBADRESP;
        } else {
            int rcode = abuf[3] & 0x0f, ancount = abuf[6] << 8 | abuf[7];
            authenticated = (abuf[3] & 0x20) != 0;
            status = rcode == 0 ? (ancount > 0 ? ARES_SUCCESS : ARES_ENODATA)
                   : rcode == 3 ? ARES_ENOTFOUND
                   : rcode == 2 ? ARES_ESERVFAIL
                   : rcode == 5 ? ARES_EREFUSED
                   : ARES_EBADRESP;
        }
    }
    q->cb(q->arg, status, abuf, abuf ? alen : 0, authenticated);
    kt_free(q);
}

void kt_dns_query_ad(struct kt_dns *d, const char *name, int type, kt_dns_ad_cb cb, void *arg)
{
    unsigned char *qbuf = NULL;
    int qlen = 0;
    if (!d || !d->have_ch) {
        cb(arg, ARES_EDESTRUCTION, NULL, 0, 0);
        return;
    }
    if (ares_create_query(name, 1 /* C_IN */, type, 0, 1, &qbuf, &qlen, 0) != ARES_SUCCESS || qlen < 12) {
        if (qbuf)
            ares_free_string(qbuf);
        cb(arg, ARES_EBADNAME, NULL, 0, 0);
        return;
    }
    qbuf[3] |= 0x20;               /* AD: "tell me whether you validated it" (RFC 6840 5.7) */
    struct ad_req *q = kt_calloc(1, sizeof(*q));
    q->cb = cb;
    q->arg = arg;
    ares_send(d->ch, qbuf, qlen, ad_done, q);
    ares_free_string(qbuf);
    sync_watches(d);
}

void kt_dns_tick(struct kt_dns *d)
{
    if (!d || !d->have_ch)
        return;
    ares_process_fd(d->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    sync_watches(d);
}

int kt_dns_new(struct kt_loop *loop, const char *servers, struct kt_dns **out)
{
    return kt_dns_new_opts(loop, servers, QUERY_TIMEOUT_MS, QUERY_TRIES, out);
}

int kt_dns_new_opts(struct kt_loop *loop, const char *servers, int timeout_ms, int tries, struct kt_dns **out)
{
    *out = NULL;
    pthread_once(&lib_once, lib_init);
    if (lib_status != ARES_SUCCESS)
        return -ENOMEM;
    struct kt_dns *d = kt_calloc(1, sizeof(*d));
    d->loop = loop;
    struct ares_options o = {
        .sock_state_cb = sock_state, .sock_state_cb_data = d, .timeout = timeout_ms, .tries = tries,
    };
    int rc = ares_init_options(&d->ch, &o, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES);
    if (rc != ARES_SUCCESS) {
        kt_free(d);
        return rc == ARES_ENOMEM ? -ENOMEM : -EINVAL;
    }
    d->have_ch = 1;
    if (servers && *servers && ares_set_servers_ports_csv(d->ch, servers) != ARES_SUCCESS) {
        ares_destroy(d->ch);
        kt_free(d);
        return -EINVAL;
    }
    *out = d;
    return 0;
}

void kt_dns_free(struct kt_dns *d)
{
    if (!d)
        return;
    if (d->have_ch) {
        /* cancels every query: callbacks run now, with ARES_EDESTRUCTION */
        ares_destroy(d->ch);
        d->have_ch = 0;
    }
    for (struct watch *w = d->watches; w; w = w->next) {
        w->dead = 1;
        w->want = 0;
    }
    sync_watches(d);
    /* the cancelled polls still point at their watches */
    for (int i = 0; i < 100 && d->armed > 0; i++)
        kt_loop_run_once(d->loop, 10);
    struct watch *w, *next;
    for (w = d->watches; w; w = next) {
        next = w->next;
        kt_free(w);
    }
    kt_free(d);
}
