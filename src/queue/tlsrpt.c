/* TLS reporting (RFC 8460), see tlsrpt.h.
 *
 * Counts live in memory on the queue manager's thread, one record per policy
 * domain and policy (an MTA-STS policy, by its id, or "no-policy-found"),
 * each with its success and failure totals and a list of failure details
 * (result type, MX host, receiving address, reason) with their counts. A
 * flush moves every record into one report job per domain, which looks up
 * the domain's TLSRPT record and then writes the report; the counting goes
 * on meanwhile into fresh records. Files are written whole (temporary file,
 * fsync, rename, directory fsync). */
#include <ares.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/durable.h"
#include "core/hash.h"
#include "core/log.h"
#include "queue/queue.h"
#include "queue/tlsrpt.h"

#define MAX_DETAILS 64             /* failure details kept per policy record */
#define STATE_FILE "counts"

struct detail {
    char *result, *sip, *mx, *ip, *reason;
    long long n;
    struct detail *next;
};

struct record {
    struct kt_hnode hn;            /* in kt_tlsrpt.idx, by domain */
    char *domain;
    int sts;                       /* an MTA-STS policy (else no-policy-found) */
    struct kt_sts_policy pol;      /* sts: the policy */
    long long ok, failed;
    struct detail *details;
    size_t n_details;
    struct record *next;
};

struct job {
    struct kt_tlsrpt *t;           /* NULL once the kt_tlsrpt is gone */
    char *domain;
    struct record *recs;
    time_t start, end;
    struct job *next;
};

struct kt_tlsrpt {
    struct kt_dns *dns;
    char *dir, *org, *contact, *submitter, *qdir;
    struct record *recs;
    struct kt_htab idx;            /* recs by domain: a sender to many domains counts in O(1) */
    time_t start;                  /* beginning of the current period */
    struct job *jobs;
    void (*queued)(void *, const char *);
    void *queued_arg;
};

static char *dup0(const char *s)
{
    return s ? kt_strdup(s) : NULL;
}

static int same(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

static void record_free(struct record *r)
{
    struct detail *d, *dn;
    for (d = r->details; d; d = dn) {
        dn = d->next;
        kt_free(d->result);
        kt_free(d->sip);
        kt_free(d->mx);
        kt_free(d->ip);
        kt_free(d->reason);
        kt_free(d);
    }
    kt_sts_policy_clear(&r->pol);
    kt_free(r->domain);
    kt_free(r);
}

static void records_free(struct record *r)
{
    while (r) {
        struct record *next = r->next;
        record_free(r);
        r = next;
    }
}

/* the same policy: its id and what it says (the text as saved may differ in line ends) */
static int same_policy(const struct kt_sts_policy *a, const struct kt_sts_policy *b)
{
    if (strcmp(a->id, b->id) || a->mode != b->mode || a->max_age != b->max_age || a->n_mx != b->n_mx)
        return 0;
    for (size_t i = 0; i < a->n_mx; i++)
        if (strcmp(a->mx[i], b->mx[i]))
            return 0;
    return 1;
}

static uint64_t domain_hash(const char *domain)
{
    return kt_fnv1a(KT_FNV_OFFSET, domain, strlen(domain));
}

/* r (its domain set) joins the current period's records and their index */
static void record_add(struct kt_tlsrpt *t, struct record *r)
{
    if (t->idx.n_entries >= t->idx.n_buckets)
        kt_htab_resize(&t->idx, t->idx.n_buckets ? t->idx.n_buckets * 2 : 64);
    r->hn.hash = domain_hash(r->domain);
    kt_htab_insert(&t->idx, &r->hn);
    r->next = t->recs;
    t->recs = r;
}

static struct record *record_get(struct kt_tlsrpt *t, const char *domain, const struct kt_sts_policy *p)
{
    struct record *r;
    uint64_t h = domain_hash(domain);
    if (t->idx.n_buckets)
        for (struct kt_hnode **pp = kt_htab_chain(&t->idx, h); *pp; pp = &(*pp)->next) {
            r = (struct record *)*pp;
            if (r->hn.hash == h && !strcmp(r->domain, domain) && r->sts == (p != NULL) &&
                (!p || same_policy(&r->pol, p)))
                return r;
        }
    r = kt_calloc(1, sizeof(*r));
    r->domain = kt_strdup(domain);
    r->sts = p != NULL;
    if (p)
        kt_sts_policy_copy(&r->pol, p);
    record_add(t, r);
    return r;
}

/* for the grouping by domain at a flush: by domain, then in the order the records came */
struct rec_ord {
    struct record *r;
    size_t seq;
};

static int rec_ord_cmp(const void *a, const void *b)
{
    const struct rec_ord *x = a, *y = b;
    int c = strcmp(x->r->domain, y->r->domain);
    return c ? c : x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void add_detail(struct record *r, const char *result, const char *sip, const char *mx, const char *ip,
                       const char *reason, long long n)
{
    struct detail *d;
    for (d = r->details; d; d = d->next)
        if (!strcmp(d->result, result) && same(d->sip, sip) && same(d->mx, mx) && same(d->ip, ip)
            && same(d->reason, reason)) {
            d->n += n;
            return;
        }
    if (r->n_details >= MAX_DETAILS) {
        /* bounded: further distinct details fold into the first of the same type */
        for (d = r->details; d; d = d->next)
            if (!strcmp(d->result, result)) {
                d->n += n;
                return;
            }
    }
    d = kt_calloc(1, sizeof(*d));
    d->result = kt_strdup(result);
    d->sip = dup0(sip);
    d->mx = dup0(mx);
    d->ip = dup0(ip);
    d->reason = dup0(reason);
    d->n = n;
    d->next = r->details;
    r->details = d;
    r->n_details++;
}

void kt_tlsrpt_count(struct kt_tlsrpt *t, const char *domain, const struct kt_sts_policy *policy,
                     const char *result, const char *sending_ip, const char *mx_host, const char *receiving_ip,
                     const char *detail)
{
    if (!t || !domain || !*domain)
        return;
    char dom[256];
    snprintf(dom, sizeof(dom), "%s", domain);
    for (char *p = dom; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    struct record *r = record_get(t, dom, policy);
    if (!result) {
        r->ok++;
        return;
    }
    r->failed++;
    add_detail(r, result, sending_ip, mx_host, receiving_ip, detail, 1);
}

/* ---- TLSRPT record ---- */

/* RFC 8460 3 tlsrpt-uri is an RFC 3986 URI: printable ASCII, no spaces. A TXT string may hold any
 * byte; a line break would add a line of the attacker's choosing to the .rua file the operator sends
 * reports to, so such a URI is left out. */
static int uri_chars_ok(const char *u)
{
    for (; *u; u++)
        if ((unsigned char)*u <= ' ' || (unsigned char)*u >= 0x7f)
            return 0;
    return 1;
}

int kt_tlsrpt_txt_parse(const char *txt, char ***uris, size_t *n)
{
    char buf[2048];
    int first = 1, have_rua = 0;
    *uris = NULL;
    *n = 0;
    if (strlen(txt) >= sizeof(buf))
        return -EINVAL;
    snprintf(buf, sizeof(buf), "%s", txt);
    char *save = NULL;
    for (char *f = strtok_r(buf, ";", &save); f; f = strtok_r(NULL, ";", &save)) {
        while (*f == ' ' || *f == '\t')
            f++;
        char *e = f + strlen(f);
        while (e > f && (e[-1] == ' ' || e[-1] == '\t'))
            *--e = '\0';
        if (first) {
            if (strcmp(f, "v=TLSRPTv1"))
                return -EINVAL;
            first = 0;
            continue;
        }
        if (strncmp(f, "rua=", 4) || have_rua)
            continue;
        have_rua = 1;
        char *s2 = NULL;
        for (char *u = strtok_r(f + 4, ",", &s2); u; u = strtok_r(NULL, ",", &s2)) {
            while (*u == ' ' || *u == '\t')
                u++;
            char *ue = u + strlen(u);
            while (ue > u && (ue[-1] == ' ' || ue[-1] == '\t'))
                *--ue = '\0';
            if (!*u || !uri_chars_ok(u))
                continue;
            *uris = kt_realloc(*uris, (*n + 1) * sizeof(**uris));
            (*uris)[(*n)++] = kt_strdup(u);
        }
    }
    if (first || *n == 0) {
        for (size_t i = 0; i < *n; i++)
            kt_free((*uris)[i]);
        kt_free(*uris);
        *uris = NULL;
        *n = 0;
        return -EINVAL;
    }
    return 0;
}

/* "mailto:addr[?...]" -> addr (percent escapes decoded), NULL if not a plain mail address */
static char *mailto_addr(const char *uri)
{
    if (strncasecmp(uri, "mailto:", 7))
        return NULL;
    const char *p = uri + 7;
    size_t len = strcspn(p, "?");
    char *out = kt_malloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '%' && i + 2 < len + 0 + 1 && isxdigit((unsigned char)p[i + 1]) && isxdigit((unsigned char)p[i + 2])) {
            char hex[3] = { p[i + 1], p[i + 2], 0 };
            out[o++] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            out[o++] = p[i];
        }
    }
    out[o] = '\0';
    const char *at = strchr(out, '@');
    int ok = at && at > out && at[1] && o < 256;
    for (size_t i = 0; ok && i < o; i++)
        if ((unsigned char)out[i] <= ' ' || out[i] == '<' || out[i] == '>' || out[i] == ',' || (unsigned char)out[i] >= 127)
            ok = 0;
    if (!ok) {
        kt_free(out);
        return NULL;
    }
    return out;
}

/* ---- the report ---- */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", f);
        else if (c == '\r')
            fputs("\\r", f);
        else if (c == '\t')
            fputs("\\t", f);
        else if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void iso_time(time_t t, char *buf, size_t len)
{
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* RFC 8460 4.4 */
static char *report_json(const struct kt_tlsrpt *t, const struct job *j, const char *report_id, size_t *len)
{
    char *out = NULL;
    size_t olen = 0;
    FILE *f = open_memstream(&out, &olen);
    char s[64], e[64];
    iso_time(j->start, s, sizeof(s));
    iso_time(j->end, e, sizeof(e));
    fputs("{\n  \"organization-name\": ", f);
    json_str(f, t->org);
    fprintf(f, ",\n  \"date-range\": {\n    \"start-datetime\": \"%s\",\n    \"end-datetime\": \"%s\"\n  },\n", s, e);
    fputs("  \"contact-info\": ", f);
    json_str(f, t->contact);
    fputs(",\n  \"report-id\": ", f);
    json_str(f, report_id);
    fputs(",\n  \"policies\": [", f);
    int first = 1;
    for (const struct record *r = j->recs; r; r = r->next) {
        fprintf(f, "%s\n    {\n      \"policy\": {\n        \"policy-type\": \"%s\",\n", first ? "" : ",",
                r->sts ? "sts" : "no-policy-found");
        first = 0;
        if (r->sts) {
            fputs("        \"policy-string\": [", f);
            const char *p = r->pol.text ? r->pol.text : "";
            int fl = 1;
            while (*p) {
                size_t n = strcspn(p, "\n");
                size_t m = n;
                if (m > 0 && p[m - 1] == '\r')
                    m--;
                if (m > 0) {
                    char *line = kt_strndup(p, m);
                    fputs(fl ? "" : ", ", f);
                    json_str(f, line);
                    kt_free(line);
                    fl = 0;
                }
                p += n;
                if (*p)
                    p++;
            }
            fputs("],\n", f);
        }
        fputs("        \"policy-domain\": ", f);
        json_str(f, r->domain);
        if (r->sts) {
            fputs(",\n        \"mx-host\": [", f);
            for (size_t i = 0; i < r->pol.n_mx; i++) {
                fputs(i ? ", " : "", f);
                json_str(f, r->pol.mx[i]);
            }
            fputs("]", f);
        }
        fprintf(f, "\n      },\n      \"summary\": {\n        \"total-successful-session-count\": %lld,\n"
                "        \"total-failure-session-count\": %lld\n      }", r->ok, r->failed);
        if (r->details) {
            fputs(",\n      \"failure-details\": [", f);
            int fd = 1;
            for (const struct detail *d = r->details; d; d = d->next) {
                fprintf(f, "%s\n        {\n          \"result-type\": ", fd ? "" : ",");
                fd = 0;
                json_str(f, d->result);
                if (d->sip) {
                    fputs(",\n          \"sending-mta-ip\": ", f);
                    json_str(f, d->sip);
                }
                if (d->ip) {
                    fputs(",\n          \"receiving-ip\": ", f);
                    json_str(f, d->ip);
                }
                if (d->mx) {
                    fputs(",\n          \"receiving-mx-hostname\": ", f);
                    json_str(f, d->mx);
                }
                fprintf(f, ",\n          \"failed-session-count\": %lld", d->n);
                if (d->reason) {
                    fputs(",\n          \"failure-reason-code\": ", f);
                    json_str(f, d->reason);
                }
                fputs("\n        }", f);
            }
            fputs("\n      ]", f);
        }
        fputs("\n    }", f);
    }
    fputs("\n  ]\n}\n", f);
    fclose(f);
    *len = olen;
    return out;
}

/* RFC 8460 5.3: a multipart/report with a short text and the JSON as application/tlsrpt+json */
static char *report_mail(const struct kt_tlsrpt *t, const struct job *j, const char *report_id, const char *fname,
                         const char *json, size_t jlen, char *const *to, size_t n_to)
{
    char *out = NULL;
    size_t olen = 0;
    FILE *f = open_memstream(&out, &olen);
    char date[64], boundary[96];
    struct tm tm;
    time_t now = time(NULL);
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
    snprintf(boundary, sizeof(boundary), "tlsrpt-%lld-%lld", (long long)j->start, (long long)j->end);
    fprintf(f, "From: TLS reporting <postmaster@%s>\r\n", t->submitter);
    fputs("To: ", f);
    for (size_t i = 0; i < n_to; i++)
        fprintf(f, "%s<%s>", i ? ", " : "", to[i]);
    fprintf(f, "\r\nDate: %s\r\n", date);
    fprintf(f, "Subject: Report Domain: %s Submitter: %s Report-ID: <%s>\r\n", j->domain, t->submitter, report_id);
    fprintf(f, "Message-ID: <%s>\r\n", report_id);
    fprintf(f, "TLS-Report-Domain: %s\r\nTLS-Report-Submitter: %s\r\n", j->domain, t->submitter);
    fprintf(f, "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=\"tlsrpt\";\r\n"
               "\tboundary=\"%s\"\r\n\r\n", boundary);
    fprintf(f, "This is a MIME-encapsulated message.\r\n\r\n--%s\r\n", boundary);
    fprintf(f, "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
               "This is an aggregate TLS report (RFC 8460) from %s for %s.\r\n\r\n--%s\r\n",
            t->submitter, j->domain, boundary);
    fprintf(f, "Content-Type: application/tlsrpt+json\r\nContent-Transfer-Encoding: base64\r\n"
               "Content-Disposition: attachment;\r\n\tfilename=\"%s\"\r\n\r\n", fname);
    unsigned char b64[110];
    for (size_t off = 0; off < jlen; off += 57) {
        size_t n = jlen - off < 57 ? jlen - off : 57;
        EVP_EncodeBlock(b64, (const unsigned char *)json + off, (int)n);
        fprintf(f, "%s\r\n", b64);
    }
    fprintf(f, "\r\n--%s--\r\n", boundary);
    fclose(f);
    (void)olen;
    return out;
}

static void job_write(struct kt_tlsrpt *t, struct job *j, char **uris, size_t n_uris)
{
    char report_id[512], fname[700], name[760];
    snprintf(report_id, sizeof(report_id), "%lld.%lld.%s@%s", (long long)j->start, (long long)j->end, j->domain,
             t->submitter);
    /* RFC 8460 5.3: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp */
    snprintf(fname, sizeof(fname), "%s!%s!%lld!%lld.json", t->submitter, j->domain, (long long)j->start,
             (long long)j->end);
    size_t jlen;
    char *json = report_json(t, j, report_id, &jlen);
    if (mkdir(t->dir, 0700) < 0 && errno != EEXIST) {
        kt_err("TLS report for %s: cannot create %s: %s", j->domain, t->dir, strerror(errno));
        free(json);
        return;
    }
    /* the URIs first: a report file is complete with its destinations */
    char *rua = NULL;
    size_t rlen = 0;
    FILE *rf = open_memstream(&rua, &rlen);
    for (size_t i = 0; i < n_uris; i++)
        fprintf(rf, "%s\n", uris[i]);
    fclose(rf);
    snprintf(name, sizeof(name), "%.*s.rua", (int)(strlen(fname) - 5), fname);
    int rc = kt_durable_write(t->dir, name, rua, rlen);
    if (rc == 0)
        rc = kt_durable_write(t->dir, fname, json, jlen);
    free(rua);
    if (rc < 0) {
        kt_err("TLS report for %s: cannot write %s/%s: %s", j->domain, t->dir, fname, strerror(-rc));
        free(json);
        return;
    }
    kt_info("TLS report for %s written: %s/%s", j->domain, t->dir, fname);
    char **to = kt_calloc(n_uris ? n_uris : 1, sizeof(*to));
    size_t n_to = 0;
    for (size_t i = 0; i < n_uris; i++)
        if ((to[n_to] = mailto_addr(uris[i])))
            n_to++;
    if (n_to > 0 && t->qdir && *t->qdir) {
        char *mail = report_mail(t, j, report_id, fname, json, jlen, to, n_to);
        char id[KT_QUEUE_ID_MAX];
        id[0] = '\0';
        /* the null sender: no notification is ever sent about a report */
        rc = kt_queue_write(t->qdir, "", (const char *const *)to, n_to, mail, strlen(mail), id, sizeof(id));
        free(mail);
        if (rc < 0)
            kt_err("TLS report for %s: cannot queue it: %s", j->domain, strerror(-rc));
        else {
            kt_info("TLS report for %s queued as %s", j->domain, id);
            if (t->queued)
                t->queued(t->queued_arg, id);
        }
    }
    for (size_t i = 0; i < n_to; i++)
        kt_free(to[i]);
    kt_free(to);
    free(json);
}

static void job_free(struct job *j)
{
    records_free(j->recs);
    kt_free(j->domain);
    kt_free(j);
}

static void rua_done(void *arg, int status, const unsigned char *abuf, int alen)
{
    struct job *j = arg;
    struct kt_tlsrpt *t = j->t;
    char **uris = NULL;
    size_t n_uris = 0;
    int records = 0;
    if (!t) {
        job_free(j);
        return;
    }
    for (struct job **pp = &t->jobs; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            break;
        }
    if (status == ARES_SUCCESS) {
        struct ares_txt_ext *txt = NULL;
        if (ares_parse_txt_reply_ext(abuf, alen, &txt) == ARES_SUCCESS) {
            char rec[2048];
            size_t rl = 0;
            int have = 0;
            for (struct ares_txt_ext *x = txt;; x = x->next) {
                if (!x || x->record_start) {
                    if (have) {
                        rec[rl] = '\0';
                        char **u;
                        size_t n;
                        if (!strncmp(rec, "v=TLSRPTv1", 10) && kt_tlsrpt_txt_parse(rec, &u, &n) == 0) {
                            records++;
                            if (records == 1) {
                                uris = u;
                                n_uris = n;
                            } else {
                                for (size_t i = 0; i < n; i++)
                                    kt_free(u[i]);
                                kt_free(u);
                            }
                        }
                    }
                    if (!x)
                        break;
                    rl = 0;
                    have = 1;
                }
                size_t take = x->length < sizeof(rec) - 1 - rl ? x->length : sizeof(rec) - 1 - rl;
                memcpy(rec + rl, x->txt, take);
                rl += take;
            }
            ares_free_data(txt);
        }
    }
    if (records == 1)
        job_write(t, j, uris, n_uris);
    else if (records > 1)
        kt_warn("TLS report for %s not written: _smtp._tls.%s has %d TLSRPTv1 records", j->domain, j->domain,
                records);
    else if (status == ARES_SUCCESS || status == ARES_ENOTFOUND || status == ARES_ENODATA)
        kt_info("TLS report for %s not written: the domain publishes no TLSRPT record", j->domain);
    else
        kt_warn("TLS report for %s not written: _smtp._tls.%s: %s", j->domain, j->domain, ares_strerror(status));
    for (size_t i = 0; i < n_uris; i++)
        kt_free(uris[i]);
    kt_free(uris);
    job_free(j);
}

void kt_tlsrpt_flush(struct kt_tlsrpt *t, time_t now)
{
    if (!t)
        return;
    time_t start = t->start;
    size_t n = 0;
    for (struct record *r = t->recs; r; r = r->next)
        n++;
    struct rec_ord *ord = kt_calloc(n ? n : 1, sizeof(*ord));
    n = 0;
    for (struct record *r = t->recs; r; r = r->next, n++)
        ord[n] = (struct rec_ord){ r, n };
    qsort(ord, n, sizeof(*ord), rec_ord_cmp);
    t->recs = NULL;
    kt_htab_free(&t->idx);
    t->start = now;
    for (size_t i = 0; i < n;) {
        /* one job per domain, its records in the order they came */
        struct job *j = kt_calloc(1, sizeof(*j));
        j->t = t;
        j->domain = kt_strdup(ord[i].r->domain);
        j->start = start;
        j->end = now;
        struct record **tail = &j->recs;
        for (; i < n && !strcmp(ord[i].r->domain, j->domain); i++) {
            ord[i].r->next = NULL;
            *tail = ord[i].r;
            tail = &ord[i].r->next;
        }
        j->next = t->jobs;
        t->jobs = j;
        char name[300];
        snprintf(name, sizeof(name), "_smtp._tls.%s", j->domain);
        kt_dns_query(t->dns, name, 16 /* TXT */, rua_done, j);
    }
    kt_free(ord);
}

void kt_tlsrpt_tick(struct kt_tlsrpt *t, time_t now)
{
    if (!t)
        return;
    /* the daily report covers the UTC day that ended */
    time_t midnight = now - now % 86400;
    if (t->start < midnight)
        kt_tlsrpt_flush(t, midnight);
}

/* ---- counts across restarts ---- */

static void state_save(struct kt_tlsrpt *t)
{
    if (!t->recs)
        return;
    char *out = NULL;
    size_t olen = 0;
    FILE *f = open_memstream(&out, &olen);
    fprintf(f, "ktrelay-tlsrpt 2 %lld\n", (long long)t->start);
    for (struct record *r = t->recs; r; r = r->next) {
        fprintf(f, "record %s %d %lld %lld %s\n", r->domain, r->sts, r->ok, r->failed, r->sts ? r->pol.id : "-");
        if (r->sts && r->pol.text)
            for (const char *p = r->pol.text; *p;) {
                size_t n = strcspn(p, "\r\n");
                if (n)
                    fprintf(f, "policy %.*s\n", (int)n, p);
                p += n;
                while (*p == '\r' || *p == '\n')
                    p++;
            }
        for (struct detail *d = r->details; d; d = d->next) {
            char reason[512];
            snprintf(reason, sizeof(reason), "%s", d->reason ? d->reason : "");
            for (char *c = reason; *c; c++)
                if (*c == '\n' || *c == '\r')
                    *c = ' ';
            fprintf(f, "detail %lld %s %s %s %s %s\n", d->n, d->result, d->sip ? d->sip : "-", d->mx ? d->mx : "-",
                    d->ip ? d->ip : "-", reason);
        }
    }
    fclose(f);
    if (mkdir(t->dir, 0700) < 0 && errno != EEXIST) {
        kt_err("TLS reporting: cannot save the counts in %s: %s", t->dir, strerror(errno));
    } else {
        int rc = kt_durable_write(t->dir, STATE_FILE, out, olen);
        if (rc < 0)
            kt_err("TLS reporting: cannot save the counts in %s: %s", t->dir, strerror(-rc));
    }
    free(out);
}

static void state_load(struct kt_tlsrpt *t)
{
    char path[4096], line[2048];
    snprintf(path, sizeof(path), "%s/%s", t->dir, STATE_FILE);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    FILE *f = fdopen(fd, "r");
    if (!f) {
        close(fd);
        return;
    }
    long long start;
    struct record *r = NULL;
    char *ptext = NULL;
    size_t plen = 0;
    FILE *pf = NULL;
    if (!fgets(line, sizeof(line), f) || sscanf(line, "ktrelay-tlsrpt 2 %lld", &start) != 1) {
        kt_warn("TLS reporting: %s unreadable; counts start from zero", path);
        goto cleanup;
    }
    t->start = (time_t)start;
    for (;;) {
        int eof = !fgets(line, sizeof(line), f);
        line[strcspn(line, "\n")] = '\0';
        if ((eof || !strncmp(line, "record ", 7)) && r && pf) {
            fclose(pf);
            pf = NULL;
            char err[200];
            if (kt_sts_policy_parse(ptext, plen, &r->pol, err, sizeof(err)) < 0)
                r->sts = 0;
            free(ptext);
            ptext = NULL;
        }
        if (eof)
            break;
        char dom[256], id[64];
        int sts;
        long long ok, failed, n;
        if (sscanf(line, "record %255s %d %lld %lld %63s", dom, &sts, &ok, &failed, &id[0]) == 5) {
            r = kt_calloc(1, sizeof(*r));
            r->domain = kt_strdup(dom);
            r->sts = sts == 1;
            r->ok = ok;
            r->failed = failed;
            if (r->sts) {
                snprintf(r->pol.id, sizeof(r->pol.id), "%.32s", id);
                pf = open_memstream(&ptext, &plen);
            }
            record_add(t, r);
        } else if (r && pf && !strncmp(line, "policy ", 7)) {
            fprintf(pf, "%s\n", line + 7);
        } else if (r && !strncmp(line, "detail ", 7)) {
            char result[64], sip[64], mx[256], ip[64];
            int off = 0;
            if (sscanf(line, "detail %lld %63s %63s %255s %63s %n", &n, result, sip, mx, ip, &off) >= 5 && off > 0) {
                const char *reason = line + off;
                add_detail(r, result, strcmp(sip, "-") ? sip : NULL, strcmp(mx, "-") ? mx : NULL,
                           strcmp(ip, "-") ? ip : NULL, *reason ? reason : NULL, n);
            }
        }
    }
cleanup:
    if (pf) {
        fclose(pf);
        free(ptext);
    }
    fclose(f);
    unlink(path);
}

/* ---- life ---- */

static void set_settings(struct kt_tlsrpt *t, const struct kt_tlsrpt_settings *set)
{
    kt_free(t->dir);
    kt_free(t->org);
    kt_free(t->contact);
    kt_free(t->submitter);
    kt_free(t->qdir);
    t->dir = kt_strdup(set->report_dir);
    t->org = kt_strdup(set->organization_name);
    t->contact = kt_strdup(set->contact_info);
    t->submitter = kt_strdup(set->submitter);
    t->qdir = kt_strdup(set->queue_directory ? set->queue_directory : "");
}

int kt_tlsrpt_new(struct kt_dns *dns, const struct kt_tlsrpt_settings *set, time_t now,
                  void (*queued)(void *arg, const char *id), void *arg, struct kt_tlsrpt **out)
{
    struct kt_tlsrpt *t = kt_calloc(1, sizeof(*t));
    t->dns = dns;
    t->start = now;
    t->queued = queued;
    t->queued_arg = arg;
    set_settings(t, set);
    state_load(t);
    *out = t;
    return 0;
}

void kt_tlsrpt_update(struct kt_tlsrpt *t, const struct kt_tlsrpt_settings *set)
{
    if (t)
        set_settings(t, set);
}

void kt_tlsrpt_free(struct kt_tlsrpt *t)
{
    if (!t)
        return;
    /* reports waiting for their TXT answer go back into the counts, to be saved */
    for (struct job *j = t->jobs; j; j = j->next) {
        struct record **tail = &j->recs;
        while (*tail)
            tail = &(*tail)->next;
        *tail = t->recs;
        t->recs = j->recs;
        j->recs = NULL;
        if (j->start < t->start)
            t->start = j->start;
        j->t = NULL;
    }
    state_save(t);
    records_free(t->recs);
    kt_htab_free(&t->idx);
    kt_free(t->dir);
    kt_free(t->org);
    kt_free(t->contact);
    kt_free(t->submitter);
    kt_free(t->qdir);
    kt_free(t);
}
