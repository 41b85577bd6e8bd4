/* MTA-STS policies (RFC 8461), see mta_sts.h.
 *
 * Discovery runs on the queue manager's loop: the TXT query and the address
 * of mta-sts.DOMAIN go through the queue manager's c-ares resolver (so
 * ktrelay_dns_servers applies to both); only the HTTPS GET runs on a helper
 * thread, with that address pinned (CURLOPT_RESOLVE), certificate and host
 * name verified, redirects refused, HTTPS only, at most 64 KiB and a time
 * limit. The thread hands results back through a locked list and the owner's
 * wake callback.
 *
 * Cache: DIR/DOMAIN, written whole (temporary file, fsync, rename, directory
 * fsync), read at the first lookup of a domain after a start: a header line
 * "ktrelay-mta-sts 1 ID FETCHED" followed by the policy as served. A policy
 * is used until fetched + max_age (RFC 8461 5.1: also when the TXT record
 * has gone or cannot be read); a new TXT id makes it fetched again, and a
 * failed fetch keeps the cached one. */
#include <ares.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "core/alloc.h"
#include "core/durable.h"
#include "core/log.h"
#include "queue/mta_sts.h"

/* how long an answer stands before the TXT record is read again */
#define STS_RECHECK_S 300
#define FETCH_CONNECT_S 10

/* ---- policy text ---- */

const char *kt_sts_mode_str(enum kt_sts_mode mode)
{
    return mode == KT_STS_MODE_ENFORCE ? "enforce" : mode == KT_STS_MODE_TESTING ? "testing" : "none";
}

void kt_sts_policy_clear(struct kt_sts_policy *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_mx; i++)
        kt_free(p->mx[i]);
    kt_free(p->mx);
    kt_free(p->text);
    memset(p, 0, sizeof(*p));
}

void kt_sts_policy_copy(struct kt_sts_policy *dst, const struct kt_sts_policy *src)
{
    *dst = *src;
    dst->mx = kt_calloc(src->n_mx ? src->n_mx : 1, sizeof(*dst->mx));
    for (size_t i = 0; i < src->n_mx; i++)
        dst->mx[i] = kt_strdup(src->mx[i]);
    dst->text = src->text ? kt_strdup(src->text) : NULL;
}

/* A host name or "*." host name as RFC 8461 3.2 allows in mx: LDH labels. */
static int mx_pattern_ok(const char *s)
{
    if (!strncmp(s, "*.", 2))
        s += 2;
    size_t label = 0, n = 0;
    for (; *s; s++, n++) {
        if (*s == '.') {
            if (label == 0)
                return 0;
            label = 0;
        } else if (isalnum((unsigned char)*s) || *s == '-' || *s == '_') {
            if (++label > 63)
                return 0;
        } else {
            return 0;
        }
    }
    return label > 0 && n <= 253;
}

int kt_sts_policy_parse(const char *text, size_t len, struct kt_sts_policy *out, char *err, size_t errlen)
{
    struct kt_sts_policy p = { .id = { 0 } };
    int have_version = 0, have_mode = 0, have_age = 0, rc = -EINVAL;
    const char *pos = text, *end = text + len;
    snprintf(p.id, sizeof(p.id), "%s", out->id);
    p.fetched = out->fetched;
    if (len > KT_STS_POLICY_MAX) {
        kt_set_err(err, errlen, "policy larger than %d bytes", KT_STS_POLICY_MAX);
        goto cleanup;
    }
    if (memchr(text, '\0', len)) {
        kt_set_err(err, errlen, "policy contains a NUL byte");
        goto cleanup;
    }
    while (pos < end) {
        const char *nl = memchr(pos, '\n', (size_t)(end - pos));
        const char *lend = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        if (lend > pos && lend[-1] == '\r')
            lend--;
        if (lend == pos) {
            pos = next;
            continue;
        }
        const char *colon = memchr(pos, ':', (size_t)(lend - pos));
        if (!colon) {
            kt_set_err(err, errlen, "line without ':': \"%.*s\"", (int)(lend - pos > 60 ? 60 : lend - pos), pos);
            goto cleanup;
        }
        char key[64], val[512];
        size_t klen = (size_t)(colon - pos);
        const char *v = colon + 1;
        while (v < lend && (*v == ' ' || *v == '\t'))
            v++;
        const char *vend = lend;
        while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t'))
            vend--;
        if (klen == 0 || klen >= sizeof(key) || (size_t)(vend - v) >= sizeof(val)) {
            kt_set_err(err, errlen, "malformed line \"%.*s\"", (int)(lend - pos > 60 ? 60 : lend - pos), pos);
            goto cleanup;
        }
        memcpy(key, pos, klen);
        key[klen] = '\0';
        memcpy(val, v, (size_t)(vend - v));
        val[vend - v] = '\0';
        if (!strcmp(key, "version")) {
            if (strcmp(val, "STSv1")) {
                kt_set_err(err, errlen, "unsupported version \"%s\"", val);
                goto cleanup;
            }
            have_version = 1;
        } else if (!strcmp(key, "mode")) {
            if (!strcmp(val, "enforce"))
                p.mode = KT_STS_MODE_ENFORCE;
            else if (!strcmp(val, "testing"))
                p.mode = KT_STS_MODE_TESTING;
            else if (!strcmp(val, "none"))
                p.mode = KT_STS_MODE_NONE;
            else {
                kt_set_err(err, errlen, "unknown mode \"%s\"", val);
                goto cleanup;
            }
            have_mode = 1;
        } else if (!strcmp(key, "max_age")) {
            char *e;
            errno = 0;
            unsigned long long a = strtoull(val, &e, 10);
            if (!val[0] || *e || errno || !isdigit((unsigned char)val[0]) || strlen(val) > 10
                || a > (unsigned long long)KT_STS_MAX_AGE_LIMIT) {
                kt_set_err(err, errlen, "bad max_age \"%s\"", val);
                goto cleanup;
            }
            p.max_age = (long long)a;
            have_age = 1;
        } else if (!strcmp(key, "mx")) {
            for (char *c = val; *c; c++)
                *c = (char)tolower((unsigned char)*c);
            size_t vl = strlen(val);
            if (vl > 1 && val[vl - 1] == '.')
                val[vl - 1] = '\0';
            if (!mx_pattern_ok(val)) {
                kt_set_err(err, errlen, "bad mx pattern \"%s\"", val);
                goto cleanup;
            }
            if (p.n_mx >= 256) {
                kt_set_err(err, errlen, "too many mx lines");
                goto cleanup;
            }
            p.mx = kt_realloc(p.mx, (p.n_mx + 1) * sizeof(*p.mx));
            p.mx[p.n_mx++] = kt_strdup(val);
        }
        /* other keys: extensions, ignored (RFC 8461 3.2) */
        pos = next;
    }
    if (!have_version || !have_mode || !have_age) {
        kt_set_err(err, errlen, "missing %s", !have_version ? "version" : !have_mode ? "mode" : "max_age");
        goto cleanup;
    }
    if (p.mode != KT_STS_MODE_NONE && p.n_mx == 0) {
        kt_set_err(err, errlen, "no mx in a policy of mode %s", kt_sts_mode_str(p.mode));
        goto cleanup;
    }
    p.text = kt_strndup(text, len);
    kt_sts_policy_clear(out);
    *out = p;
    return 0;
cleanup:
    kt_sts_policy_clear(&p);
    return rc;
}

int kt_sts_mx_match(const struct kt_sts_policy *p, const char *host)
{
    char h[256];
    snprintf(h, sizeof(h), "%s", host);
    size_t n = strlen(h);
    if (n > 1 && h[n - 1] == '.')
        h[--n] = '\0';
    for (size_t i = 0; i < p->n_mx; i++) {
        const char *pat = p->mx[i];
        if (!strncmp(pat, "*.", 2)) {
            /* exactly one label before the pattern's domain */
            const char *dot = strchr(h, '.');
            if (dot && dot > h && !strcasecmp(dot + 1, pat + 2))
                return 1;
        } else if (!strcasecmp(h, pat)) {
            return 1;
        }
    }
    return 0;
}

int kt_sts_txt_parse(const char *txt, size_t len, char *id, size_t idlen)
{
    char buf[1024];
    int have_id = 0, first = 1;
    if (len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, txt, len);
    buf[len] = '\0';
    char *save = NULL;
    for (char *f = strtok_r(buf, ";", &save); f; f = strtok_r(NULL, ";", &save)) {
        while (*f == ' ' || *f == '\t')
            f++;
        char *e = f + strlen(f);
        while (e > f && (e[-1] == ' ' || e[-1] == '\t'))
            *--e = '\0';
        if (!*f) {
            if (first)
                return -EINVAL;
            continue;
        }
        if (first) {
            if (strcmp(f, "v=STSv1"))
                return -EINVAL;
            first = 0;
            continue;
        }
        if (!strncmp(f, "id=", 3)) {
            const char *v = f + 3;
            size_t vl = strlen(v);
            if (vl < 1 || vl > 32 || have_id)
                return -EINVAL;
            for (size_t i = 0; i < vl; i++)
                if (!isalnum((unsigned char)v[i]))
                    return -EINVAL;
            if (vl >= idlen)
                return -EINVAL;
            memcpy(id, v, vl + 1);
            have_id = 1;
        }
    }
    return !first && have_id ? 0 : -EINVAL;
}

/* ---- the lookup machinery ---- */

struct waiter {
    kt_sts_cb cb;
    void *arg;
    struct waiter *next;
};

struct entry {
    char *domain;
    struct kt_sts_policy pol;
    int have_pol;                  /* pol holds a parsed policy (cached) */
    int loaded;                    /* the cache file was read */
    int busy;                      /* discovery or fetch in flight */
    time_t checked;                /* last complete discovery */
    char txt_id[33];               /* id of the TXT record being fetched */
    const char *failure;           /* TLS-RPT result type of the last discovery's failure, or NULL */
    struct waiter *waiters;
    struct entry *next;
};

/* one asynchronous step; outlives the kt_sts when the resolver answers after kt_sts_free */
struct step {
    struct kt_sts *s;
    struct entry *e;
    struct step *next;             /* outstanding steps of s */
};

struct fetch {
    struct entry *e;               /* NULL once the kt_sts is gone */
    char *url, *resolve, *CAfile;
    long long timeout_s;
    /* results */
    int ok;
    char *body;
    size_t len;
    const char *failure;
    char why[512];
    struct fetch *next;
};

struct kt_sts {
    struct kt_dns *dns;
    struct kt_sts_settings set;
    struct entry *entries;
    struct step *steps;
    void (*wake)(void *);
    void *wake_arg;
    /* helper thread */
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct fetch *todo, *done;
    atomic_int stop;
    int n_fetching;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static int curl_ok;

static void curl_init(void)
{
    curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

static void set_settings(struct kt_sts *s, const struct kt_sts_settings *set)
{
    kt_free((char *)s->set.cache_dir);
    kt_free((char *)s->set.CAfile);
    s->set.cache_dir = kt_strdup(set->cache_dir ? set->cache_dir : "");
    s->set.CAfile = kt_strdup(set->CAfile ? set->CAfile : "");
    s->set.fetch_timeout_s = set->fetch_timeout_s > 0 ? set->fetch_timeout_s : 60;
}

static int domain_ok(const char *d)
{
    if (!d[0] || d[0] == '.' || strlen(d) > 253 || strstr(d, ".."))
        return 0;
    for (; *d; d++)
        if (!(isalnum((unsigned char)*d) || *d == '-' || *d == '.' || *d == '_'))
            return 0;
    return 1;
}

/* ---- cache files ---- */

/* One cached policy, written by cache_write. A file that was tampered with or cut short is ignored
 * with a warning (no policy from it); so is one fetched in the future (more than a day ahead of this
 * clock), which would otherwise stay in effect for as long as it claims. */
static void cache_read(struct kt_sts *s, struct entry *e, time_t now)
{
    char path[4096], err[256];
    e->loaded = 1;
    snprintf(path, sizeof(path), "%s/%s", s->set.cache_dir, e->domain);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    char *buf = kt_malloc(KT_STS_POLICY_MAX + 256 + 1);
    ssize_t n = read(fd, buf, KT_STS_POLICY_MAX + 256);
    close(fd);
    if (n <= 0) {
        kt_free(buf);
        return;
    }
    buf[n] = '\0';
    char id[64];
    long long fetched;
    char *nl = strchr(buf, '\n');
    if (!nl || sscanf(buf, "ktrelay-mta-sts 1 %40s %lld", id, &fetched) != 2 || strlen(id) > 32) {
        kt_warn("MTA-STS cache %s: unreadable; ignored", path);
        kt_free(buf);
        return;
    }
    if (fetched < 0 || fetched > (long long)now + 86400) {
        kt_warn("MTA-STS cache %s: fetched at %lld, in the future; ignored", path, fetched);
        kt_free(buf);
        return;
    }
    struct kt_sts_policy p = { .fetched = (time_t)fetched };
    snprintf(p.id, sizeof(p.id), "%.32s", id);
    if (kt_sts_policy_parse(nl + 1, (size_t)(buf + n - (nl + 1)), &p, err, sizeof(err)) < 0) {
        kt_warn("MTA-STS cache %s: %s; ignored", path, err);
        kt_free(buf);
        return;
    }
    kt_sts_policy_clear(&e->pol);
    e->pol = p;
    e->have_pol = 1;
    kt_free(buf);
}

static int cache_write(struct kt_sts *s, const struct entry *e)
{
    if (mkdir(s->set.cache_dir, 0700) < 0 && errno != EEXIST)
        return -errno;
    char *text = kt_asprintf("ktrelay-mta-sts 1 %s %lld\n%s", e->pol.id, (long long)e->pol.fetched, e->pol.text);
    int rc = kt_durable_write(s->set.cache_dir, e->domain, text, strlen(text));
    kt_free(text);
    return rc;
}

/* ---- answers ---- */

static const struct kt_sts_policy *in_effect(const struct entry *e, time_t now)
{
    if (!e->have_pol || now >= e->pol.fetched + (time_t)e->pol.max_age)
        return NULL;
    return &e->pol;
}

static void finish(struct kt_sts *s, struct entry *e, time_t now)
{
    (void)s;
    e->busy = 0;
    e->checked = now;
    struct waiter *w = e->waiters;
    e->waiters = NULL;
    while (w) {
        struct waiter *next = w->next;
        w->cb(w->arg, in_effect(e, now), e->failure);
        kt_free(w);
        w = next;
    }
}

static struct step *step_new(struct kt_sts *s, struct entry *e)
{
    struct step *st = kt_calloc(1, sizeof(*st));
    st->s = s;
    st->e = e;
    st->next = s->steps;
    s->steps = st;
    return st;
}

/* the step is over: unlink it; returns its kt_sts, NULL when that is gone */
static struct kt_sts *step_end(struct step *st)
{
    struct kt_sts *s = st->s;
    if (s)
        for (struct step **pp = &s->steps; *pp; pp = &(*pp)->next)
            if (*pp == st) {
                *pp = st->next;
                break;
            }
    return s;
}

static void *fetch_thread(void *arg);

static void fetch_start(struct kt_sts *s, struct entry *e, const struct kt_smtp_addr *a)
{
    char ip[INET6_ADDRSTRLEN];
    if (a->ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->ss)->sin6_addr, ip, sizeof(ip));
    else
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->ss)->sin_addr, ip, sizeof(ip));
    struct fetch *f = kt_calloc(1, sizeof(*f));
    f->e = e;
    f->url = kt_asprintf("https://mta-sts.%s/.well-known/mta-sts.txt", e->domain);
    f->resolve = kt_asprintf(a->ss.ss_family == AF_INET6 ? "mta-sts.%s:443:[%s]" : "mta-sts.%s:443:%s",
                             e->domain, ip);
    f->CAfile = kt_strdup(s->set.CAfile);
    f->timeout_s = s->set.fetch_timeout_s;
    pthread_mutex_lock(&s->mu);
    if (!s->thread_started) {
        if (pthread_create(&s->thread, NULL, fetch_thread, s) == 0)
            s->thread_started = 1;
    }
    if (!s->thread_started) {
        pthread_mutex_unlock(&s->mu);
        kt_warn("MTA-STS: cannot start the policy fetch thread");
        kt_free(f->url);
        kt_free(f->resolve);
        kt_free(f->CAfile);
        kt_free(f);
        e->failure = "sts-policy-fetch-error";
        finish(s, e, time(NULL));
        return;
    }
    f->next = s->todo;
    s->todo = f;
    s->n_fetching++;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void host_resolved(void *arg, int res, const struct kt_smtp_addr *addrs, size_t n, const char *dsn,
                          const char *err)
{
    struct step *st = arg;
    struct kt_sts *s = step_end(st);
    struct entry *e = st->e;
    (void)dsn;
    kt_free(st);
    if (!s)
        return;
    if (res != 0 || n == 0) {
        kt_warn("MTA-STS policy fetch for %s failed: mta-sts.%s: %s", e->domain, e->domain, err ? err : "no address");
        e->failure = "sts-policy-fetch-error";
        finish(s, e, time(NULL));
        return;
    }
    fetch_start(s, e, &addrs[0]);
}

static void txt_done(void *arg, int status, const unsigned char *abuf, int alen)
{
    struct step *st = arg;
    struct kt_sts *s = step_end(st);
    struct entry *e = st->e;
    kt_free(st);
    if (!s)
        return;
    time_t now = time(NULL);
    char id[33] = "";
    int records = 0, valid = 0;
    if (status == ARES_SUCCESS) {
        struct ares_txt_ext *txt = NULL;
        if (ares_parse_txt_reply_ext(abuf, alen, &txt) == ARES_SUCCESS) {
            /* a record is one or more strings, concatenated (RFC 7208 3.3 style) */
            char rec[1024];
            size_t rl = 0;
            int have = 0;
            for (struct ares_txt_ext *t = txt;; t = t->next) {
                if (!t || t->record_start) {
                    if (have) {
                        rec[rl] = '\0';
                        /* records that do not begin with "v=STSv1;" are discarded (RFC 8461 3.1) */
                        if (!strncmp(rec, "v=STSv1", 7) && (rec[7] == ';' || rec[7] == ' ' || rec[7] == '\t'
                                                           || rec[7] == '\0')) {
                            records++;
                            valid = kt_sts_txt_parse(rec, rl, id, sizeof(id)) == 0;
                        }
                    }
                    if (!t)
                        break;
                    rl = 0;
                    have = 1;
                }
                size_t take = t->length < sizeof(rec) - 1 - rl ? t->length : sizeof(rec) - 1 - rl;
                memcpy(rec + rl, t->txt, take);
                rl += take;
            }
            ares_free_data(txt);
        }
    } else if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        return;
    }
    e->failure = NULL;
    if (records != 1 || !valid) {
        /* no (usable) record: a cached policy still applies until it expires (RFC 8461 5.1) */
        if (records > 1)
            kt_warn("MTA-STS: _mta-sts.%s has %d STSv1 records; none is used", e->domain, records);
        else if (records == 1)
            kt_warn("MTA-STS: _mta-sts.%s: malformed STSv1 record", e->domain);
        finish(s, e, now);
        return;
    }
    if (in_effect(e, now) && !strcmp(e->pol.id, id)) {
        finish(s, e, now);
        return;
    }
    snprintf(e->txt_id, sizeof(e->txt_id), "%s", id);
    char host[300];
    snprintf(host, sizeof(host), "mta-sts.%s", e->domain);
    kt_dns_lookup(s->dns, host, 443, 0, host_resolved, step_new(s, e));
}

void kt_sts_lookup(struct kt_sts *s, const char *domain, time_t now, kt_sts_cb cb, void *arg)
{
    char dom[256];
    snprintf(dom, sizeof(dom), "%s", domain);
    for (char *p = dom; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    size_t dl = strlen(dom);
    if (dl > 1 && dom[dl - 1] == '.')
        dom[dl - 1] = '\0';
    unsigned char bin[sizeof(struct in6_addr)];
    if (!domain_ok(dom) || inet_pton(AF_INET, dom, bin) == 1) {
        /* an address literal has no policy */
        cb(arg, NULL, NULL);
        return;
    }
    struct entry *e;
    for (e = s->entries; e; e = e->next)
        if (!strcmp(e->domain, dom))
            break;
    if (!e) {
        e = kt_calloc(1, sizeof(*e));
        e->domain = kt_strdup(dom);
        e->next = s->entries;
        s->entries = e;
    }
    if (!e->loaded)
        cache_read(s, e, now);
    if (!e->busy && e->checked && now - e->checked < STS_RECHECK_S && now >= e->checked) {
        cb(arg, in_effect(e, now), e->failure);
        return;
    }
    struct waiter *w = kt_calloc(1, sizeof(*w));
    w->cb = cb;
    w->arg = arg;
    w->next = e->waiters;
    e->waiters = w;
    if (e->busy)
        return;
    e->busy = 1;
    char name[300];
    snprintf(name, sizeof(name), "_mta-sts.%s", e->domain);
    kt_dns_query(s->dns, name, 16 /* TXT */, txt_done, step_new(s, e));
}

/* ---- the HTTPS fetch (helper thread) ---- */

struct body {
    char *buf;
    size_t len;
    int too_big;
    struct kt_sts *s;
};

static size_t body_write(char *ptr, size_t size, size_t nmemb, void *arg)
{
    struct body *b = arg;
    size_t n = size * nmemb;
    if (b->len + n > KT_STS_POLICY_MAX) {
        b->too_big = 1;
        return 0;                  /* aborts the transfer */
    }
    b->buf = kt_realloc(b->buf, b->len + n + 1);
    memcpy(b->buf + b->len, ptr, n);
    b->len += n;
    b->buf[b->len] = '\0';
    return n;
}

static int progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    struct body *b = arg;
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    return atomic_load(&b->s->stop) ? 1 : 0;
}

static void fetch_run(struct kt_sts *s, struct fetch *f)
{
    struct body b = { .s = s };
    struct curl_slist *resolve = NULL;
    char errbuf[CURL_ERROR_SIZE] = "";
    CURL *h = curl_ok ? curl_easy_init() : NULL;
    f->failure = "sts-policy-fetch-error";
    if (!h) {
        snprintf(f->why, sizeof(f->why), "cannot initialise libcurl");
        return;
    }
    resolve = curl_slist_append(NULL, f->resolve);
    curl_easy_setopt(h, CURLOPT_URL, f->url);
    curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);  /* RFC 8461 3.3: redirects are not followed */
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    if (f->CAfile[0])
        curl_easy_setopt(h, CURLOPT_CAINFO, f->CAfile);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, (long)FETCH_CONNECT_S);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)f->timeout_s);
    curl_easy_setopt(h, CURLOPT_MAXFILESIZE, (long)KT_STS_POLICY_MAX);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "ktrelay-mta-sts");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, body_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &b);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    char *ctype = NULL;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &ctype);
    if (rc != CURLE_OK) {
        if (b.too_big || rc == CURLE_FILESIZE_EXCEEDED) {
            snprintf(f->why, sizeof(f->why), "policy larger than %d bytes", KT_STS_POLICY_MAX);
            f->failure = "sts-policy-invalid";
        } else {
            snprintf(f->why, sizeof(f->why), "%s", errbuf[0] ? errbuf : curl_easy_strerror(rc));
            if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE
#if LIBCURL_VERSION_NUM < 0x073e00
                || rc == CURLE_SSL_CACERT
#endif
                )
                f->failure = "sts-webpki-invalid";
        }
    } else if (status != 200) {
        /* a 3xx is a failure too: redirects are not followed */
        snprintf(f->why, sizeof(f->why), "HTTP status %ld", status);
    } else if (!ctype || strncasecmp(ctype, "text/plain", 10)
               || (ctype[10] && ctype[10] != ';' && ctype[10] != ' ')) {
        snprintf(f->why, sizeof(f->why), "Content-Type is \"%s\", not text/plain", ctype ? ctype : "");
        f->failure = "sts-policy-invalid";
    } else {
        f->ok = 1;
        f->failure = NULL;
        f->body = b.buf;
        f->len = b.len;
        b.buf = NULL;
    }
    kt_free(b.buf);
    curl_slist_free_all(resolve);
    curl_easy_cleanup(h);
}

static void *fetch_thread(void *arg)
{
    struct kt_sts *s = arg;
    pthread_setname_np(pthread_self(), "ktrelay-sts");
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->todo && !atomic_load(&s->stop))
            pthread_cond_wait(&s->cv, &s->mu);
        if (atomic_load(&s->stop))
            break;
        struct fetch *f = s->todo;
        s->todo = f->next;
        pthread_mutex_unlock(&s->mu);
        fetch_run(s, f);
        pthread_mutex_lock(&s->mu);
        f->next = s->done;
        s->done = f;
        if (s->wake)
            s->wake(s->wake_arg);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void fetch_free(struct fetch *f)
{
    kt_free(f->url);
    kt_free(f->resolve);
    kt_free(f->CAfile);
    kt_free(f->body);
    kt_free(f);
}

void kt_sts_poll(struct kt_sts *s, time_t now)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    struct fetch *f = s->done;
    s->done = NULL;
    pthread_mutex_unlock(&s->mu);
    while (f) {
        struct fetch *next = f->next;
        struct entry *e = f->e;
        s->n_fetching--;
        char err[256];
        if (f->ok) {
            struct kt_sts_policy p = { .fetched = now };
            snprintf(p.id, sizeof(p.id), "%s", e->txt_id);
            if (kt_sts_policy_parse(f->body, f->len, &p, err, sizeof(err)) == 0) {
                kt_sts_policy_clear(&e->pol);
                e->pol = p;
                e->have_pol = 1;
                e->failure = NULL;
                kt_info("MTA-STS policy for %s: id %s, mode %s, max_age %lld, %zu mx pattern%s", e->domain,
                        p.id, kt_sts_mode_str(p.mode), p.max_age, p.n_mx, p.n_mx == 1 ? "" : "s");
                int rc = cache_write(s, e);
                if (rc < 0)
                    kt_warn("MTA-STS cache %s/%s: %s", s->set.cache_dir, e->domain, strerror(-rc));
            } else {
                kt_warn("MTA-STS policy for %s is invalid: %s", e->domain, err);
                e->failure = "sts-policy-invalid";
            }
        } else {
            kt_warn("MTA-STS policy fetch for %s failed: %s", e->domain, f->why);
            e->failure = f->failure;
        }
        finish(s, e, now);
        fetch_free(f);
        f = next;
    }
}

/* ---- life ---- */

int kt_sts_new(struct kt_dns *dns, const struct kt_sts_settings *set, void (*wake)(void *), void *wake_arg,
               struct kt_sts **out)
{
    pthread_once(&curl_once, curl_init);
    struct kt_sts *s = kt_calloc(1, sizeof(*s));
    s->dns = dns;
    s->wake = wake;
    s->wake_arg = wake_arg;
    set_settings(s, set);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    *out = s;
    return 0;
}

void kt_sts_update(struct kt_sts *s, const struct kt_sts_settings *set)
{
    if (s)
        set_settings(s, set);
}

void kt_sts_free(struct kt_sts *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    atomic_store(&s->stop, 1);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_started)
        pthread_join(s->thread, NULL);
    struct fetch *f, *next;
    for (f = s->todo; f; f = next) {
        next = f->next;
        fetch_free(f);
    }
    for (f = s->done; f; f = next) {
        next = f->next;
        fetch_free(f);
    }
    /* the resolver still holds these: they end themselves when it answers */
    for (struct step *st = s->steps; st; st = st->next)
        st->s = NULL;
    struct entry *e, *en;
    for (e = s->entries; e; e = en) {
        en = e->next;
        struct waiter *w, *wn;
        for (w = e->waiters; w; w = wn) {
            wn = w->next;
            kt_free(w);
        }
        kt_sts_policy_clear(&e->pol);
        kt_free(e->domain);
        kt_free(e);
    }
    kt_free((char *)s->set.cache_dir);
    kt_free((char *)s->set.CAfile);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    kt_free(s);
}
