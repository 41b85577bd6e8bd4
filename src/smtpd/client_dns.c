/* Client-check DNS (client_dns.h): answer parsing and the shared cache.
 *
 * The cache is a chained hash table under one mutex, bounded at CACHE_MAX
 * entries: expired entries are swept when it fills, and if that frees too
 * little it is emptied (answers are refetched, nothing is lost). Expiry uses
 * CLOCK_MONOTONIC milliseconds; every answer is kept at least one second so
 * that the session that fetched it can read it back. */
#include <arpa/inet.h>
#include <ares.h>
#include <ctype.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/alloc.h"
#include "core/hash.h"
#include "queue/dns.h"
#include "smtpd/client_dns.h"

#define CACHE_MAX 65536
#define NEG_TTL_DEFAULT 60      /* NOTFOUND without an SOA to say how long */
#define NEG_TTL_MAX 3600
#define TEMP_TTL 5              /* failures: long enough to spare a dead server, short enough to retry */
#define TTL_MAX 86400

struct centry {
    struct kt_hnode node;           /* first: the table's link and hash */
    int type;
    long long expires_ms;
    struct kt_dns_answer ans;
    char name[];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct kt_htab table;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* name lower-cased, without a trailing dot */
static void norm_name(const char *in, char *out, size_t outlen)
{
    size_t i;
    for (i = 0; in[i] && i + 1 < outlen; i++)
        out[i] = (char)tolower((unsigned char)in[i]);
    if (i > 0 && out[i - 1] == '.')
        i--;
    out[i] = '\0';
}

static uint64_t hash_of(int type, const char *name)
{
    return kt_fnv1a(KT_FNV_OFFSET ^ (uint64_t)type, name, strlen(name));
}

/* expired at NOW (ms); NOW 0: every entry */
static int expired(const struct kt_hnode *n, void *arg)
{
    long long now = *(const long long *)arg;
    return now == 0 || ((const struct centry *)n)->expires_ms <= now;
}

static void free_entry(struct kt_hnode *n)
{
    kt_free(n);
}

static void cache_clear_expired(long long now)
{
    kt_htab_sweep(&table, expired, &now, free_entry);
}

static struct kt_hnode **find(uint64_t h, int type, const char *name)
{
    struct kt_hnode **pp = kt_htab_chain(&table, h);
    for (; *pp; pp = &(*pp)->next) {
        const struct centry *e = (const struct centry *)*pp;
        if (e->node.hash == h && e->type == type && strcmp(e->name, name) == 0)
            break;
    }
    return pp;
}

static void cache_store(int type, const char *raw, const struct kt_dns_answer *a, unsigned ttl)
{
    char name[KT_DNS_RR_LEN];
    norm_name(raw, name, sizeof(name));
    uint64_t h = hash_of(type, name);
    long long now = now_ms();
    pthread_mutex_lock(&lock);
    if (!table.n_buckets)
        kt_htab_resize(&table, 1024);
    struct kt_hnode **pp = find(h, type, name);
    if (*pp)
        kt_free(kt_htab_unlink(&table, pp));
    if (table.n_entries >= CACHE_MAX) {
        cache_clear_expired(now);
        if (table.n_entries >= CACHE_MAX * 3 / 4)
            cache_clear_expired(0);
    }
    if (table.n_entries >= table.n_buckets && table.n_buckets < CACHE_MAX)
        kt_htab_resize(&table, table.n_buckets * 2);
    size_t nl = strlen(name);
    struct centry *e = kt_malloc(sizeof(*e) + nl + 1);
    e->node.hash = h;
    e->type = type;
    e->expires_ms = now + (long long)(ttl < 1 ? 1 : ttl > TTL_MAX ? TTL_MAX : ttl) * 1000;
    e->ans = *a;
    memcpy(e->name, name, nl + 1);
    kt_htab_insert(&table, &e->node);
    pthread_mutex_unlock(&lock);
}

int kt_cdns_lookup(int type, const char *raw, struct kt_dns_answer *out)
{
    char name[KT_DNS_RR_LEN];
    norm_name(raw, name, sizeof(name));
    uint64_t h = hash_of(type, name);
    int found = 0;
    pthread_mutex_lock(&lock);
    if (table.n_buckets) {
        const struct centry *e = (const struct centry *)*find(h, type, name);
        if (e && e->expires_ms > now_ms()) {
            *out = e->ans;
            found = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

size_t kt_cdns_cache_size(void)
{
    pthread_mutex_lock(&lock);
    size_t n = table.n_entries;
    pthread_mutex_unlock(&lock);
    return n;
}

/* ---- answer parsing ---- */

static unsigned get16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static unsigned get32(const unsigned char *p)
{
    return (unsigned)p[0] << 24 | (unsigned)p[1] << 16 | (unsigned)p[2] << 8 | p[3];
}

/* Length of the (possibly compressed) name at p, or -1. */
static long skip_name(const unsigned char *abuf, int alen, const unsigned char *p)
{
    char *name;
    long enclen;
    if (ares_expand_name(p, abuf, alen, &name, &enclen) != ARES_SUCCESS)
        return -1;
    ares_free_string(name);
    return enclen;
}

static void rr_text(int type, const unsigned char *abuf, int alen, const unsigned char *rd, unsigned rdlen,
                    char *out)
{
    char *name;
    long enclen;
    out[0] = '\0';
    switch (type) {
    case KT_RR_A:
        if (rdlen == 4)
            inet_ntop(AF_INET, rd, out, KT_DNS_RR_LEN);
        break;
    case KT_RR_AAAA:
        if (rdlen == 16)
            inet_ntop(AF_INET6, rd, out, KT_DNS_RR_LEN);
        break;
    case KT_RR_PTR:
    case KT_RR_MX: {
        const unsigned char *np = type == KT_RR_MX ? rd + 2 : rd;
        if (type == KT_RR_MX && rdlen < 3)
            break;
        if (ares_expand_name(np, abuf, alen, &name, &enclen) != ARES_SUCCESS)
            break;
        if (type == KT_RR_MX)
            snprintf(out, KT_DNS_RR_LEN, "%u %s", get16(rd), name);
        else
            snprintf(out, KT_DNS_RR_LEN, "%s", name);
        ares_free_string(name);
        break;
    }
    case KT_RR_TXT: {
        size_t o = 0;
        for (unsigned i = 0; i < rdlen;) {
            unsigned l = rd[i++];
            for (unsigned k = 0; k < l && i < rdlen; k++, i++)
                if (o + 1 < KT_DNS_RR_LEN)
                    out[o++] = (rd[i] >= 0x20 && rd[i] < 0x7f) ? (char)rd[i] : '?';
        }
        out[o] = '\0';
        break;
    }
    default:
        break;
    }
}

void kt_cdns_parse(int type, int status, const unsigned char *abuf, int alen, struct kt_dns_answer *out,
                   unsigned *ttl)
{
    memset(out, 0, sizeof(*out));
    *ttl = TEMP_TTL;
    if (status != ARES_SUCCESS && status != ARES_ENOTFOUND && status != ARES_ENODATA) {
        out->status = KT_DNS_TEMP;
        snprintf(out->why, sizeof(out->why), "%s", status == ARES_ETIMEOUT ? "timeout"
                 /* c-ares reports SERVFAIL or REFUSED from every server as ECONNREFUSED */
                 : status == ARES_ESERVFAIL || status == ARES_ECONNREFUSED ? "server failure"
                 : status == ARES_EREFUSED ? "refused"
                 : ares_strerror(status));
        return;
    }
    out->status = KT_DNS_NOTFOUND;
    out->nxdomain = status == ARES_ENOTFOUND;
    unsigned neg_ttl = NEG_TTL_DEFAULT, min_ttl = TTL_MAX;
    if (abuf && alen >= 12) {
        unsigned qd = get16(abuf + 4), an = get16(abuf + 6), ns = get16(abuf + 8);
        const unsigned char *p = abuf + 12, *end = abuf + alen;
        for (unsigned i = 0; i < qd && p < end; i++) {
            long l = skip_name(abuf, alen, p);
            if (l < 0 || p + l + 4 > end)
                goto done;
            p += l + 4;
        }
        for (unsigned i = 0; i < an + ns && p < end; i++) {
            long l = skip_name(abuf, alen, p);
            if (l < 0 || p + l + 10 > end)
                break;
            p += l;
            unsigned t = get16(p), rttl = get32(p + 4), rdlen = get16(p + 8);
            const unsigned char *rd = p + 10;
            if (rd + rdlen > end)
                break;
            if (i < an && (int)t == type && out->n < KT_DNS_MAX_RR) {
                rr_text(type, abuf, alen, rd, rdlen, out->rr[out->n]);
                if (out->rr[out->n][0]) {
                    out->n++;
                    if (rttl < min_ttl)
                        min_ttl = rttl;
                }
            } else if (i >= an && t == 6 /* SOA */) {
                /* RFC 2308 5: the negative TTL is the lower of the SOA's TTL and its MINIMUM */
                long m1 = skip_name(abuf, alen, rd);
                long m2 = m1 < 0 ? -1 : skip_name(abuf, alen, rd + m1);
                if (m2 >= 0 && (unsigned)(m1 + m2 + 20) <= rdlen) {
                    unsigned minimum = get32(rd + m1 + m2 + 16);
                    neg_ttl = rttl < minimum ? rttl : minimum;
                }
            }
            p = rd + rdlen;
        }
    }
done:
    if (out->n) {
        out->status = KT_DNS_FOUND;
        out->nxdomain = 0;
        *ttl = min_ttl;
    } else {
        *ttl = neg_ttl > NEG_TTL_MAX ? NEG_TTL_MAX : neg_ttl;
    }
}

/* ---- fetching ---- */

struct fetch {
    int type;
    kt_cdns_done done;
    void *arg;
    char name[];
};

static void fetch_done(void *arg, int status, const unsigned char *abuf, int alen)
{
    struct fetch *f = arg;
    if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        f->done(f->arg, 1, NULL);
        kt_free(f);
        return;
    }
    struct kt_dns_result *r = kt_malloc(sizeof(*r));
    unsigned ttl;
    r->type = f->type;
    snprintf(r->name, sizeof(r->name), "%s", f->name);
    kt_cdns_parse(f->type, status, abuf, alen, &r->ans, &ttl);
    cache_store(f->type, f->name, &r->ans, ttl);
    f->done(f->arg, 0, r);
    kt_free(r);
    kt_free(f);
}

void kt_cdns_fetch(struct kt_dns *chan, int type, const char *name, kt_cdns_done done, void *arg)
{
    if (!chan) {
        struct kt_dns_result *r = kt_calloc(1, sizeof(*r));
        r->type = type;
        snprintf(r->name, sizeof(r->name), "%s", name);
        r->ans.status = KT_DNS_TEMP;
        snprintf(r->ans.why, sizeof(r->ans.why), "no resolver");
        cache_store(type, name, &r->ans, TEMP_TTL);
        done(arg, 0, r);
        kt_free(r);
        return;
    }
    size_t nl = strlen(name);
    struct fetch *f = kt_malloc(sizeof(*f) + nl + 1);
    f->type = type;
    f->done = done;
    f->arg = arg;
    memcpy(f->name, name, nl + 1);
    kt_dns_query(chan, name, type, fetch_done, f);
}
