/* TLSA records and OpenSSL's DANE checks (see dane.h). The answer parser
 * reads only what RFC 1035 4.1 lays out: the header, the question (skipped),
 * and the answer section's records of type TLSA (52), whose RDATA is usage,
 * selector, matching type and the association data (RFC 6698 2.1). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <openssl/x509v3.h>

#include "core/alloc.h"
#include "tls/dane.h"

#define T_TLSA 52

struct kt_dane_set *kt_dane_set_copy(const struct kt_dane_set *s)
{
    if (!s)
        return NULL;
    struct kt_dane_set *c = kt_calloc(1, sizeof(*c));
    c->n = s->n;
    c->hosts = kt_calloc(s->n ? s->n : 1, sizeof(*c->hosts));
    memcpy(c->hosts, s->hosts, s->n * sizeof(*s->hosts));
    return c;
}

void kt_dane_set_free(struct kt_dane_set *s)
{
    if (!s)
        return;
    kt_free(s->hosts);
    kt_free(s);
}

const struct kt_dane_host *kt_dane_set_find(const struct kt_dane_set *s, const char *host)
{
    for (size_t i = 0; s && i < s->n; i++)
        if (!strcasecmp(s->hosts[i].host, host))
            return &s->hosts[i];
    return NULL;
}

const char *kt_dane_state_str(enum kt_dane_state st)
{
    switch (st) {
    case KT_DANE_INSECURE:
        return "non DNSSEC destination";
    case KT_DANE_NO_TLSA:
        return "no TLSA records";
    case KT_DANE_UNUSABLE:
        return "TLSA records unusable";
    case KT_DANE_USABLE:
        return "usable TLSA records";
    case KT_DANE_ERROR:
        return "TLSA lookup error";
    }
    return "?";
}

/* Skip a (possibly compressed) name at *off; 0 or -EINVAL. */
static int skip_name(const unsigned char *m, int len, int *off)
{
    int o = *off;
    for (int guard = 0; guard < 128; guard++) {
        if (o >= len)
            return -EINVAL;
        unsigned char l = m[o];
        if (l == 0) {
            *off = o + 1;
            return 0;
        }
        if ((l & 0xc0) == 0xc0) {
            if (o + 2 > len)
                return -EINVAL;
            *off = o + 2;
            return 0;
        }
        if (l & 0xc0)
            return -EINVAL;
        o += 1 + l;
    }
    return -EINVAL;
}

int kt_dane_parse_tlsa(const unsigned char *m, int len, struct kt_dane_host *h)
{
    int off = 12;
    size_t seen = 0;

    h->n = 0;
    if (!m || len < 12)
        return -EINVAL;
    unsigned qd = (unsigned)(m[4] << 8 | m[5]), an = (unsigned)(m[6] << 8 | m[7]);
    for (unsigned i = 0; i < qd; i++) {
        if (skip_name(m, len, &off) < 0 || off + 4 > len)
            return -EINVAL;
        off += 4;
    }
    for (unsigned i = 0; i < an; i++) {
        if (skip_name(m, len, &off) < 0 || off + 10 > len)
            return -EINVAL;
        unsigned type = (unsigned)(m[off] << 8 | m[off + 1]);
        unsigned rdlen = (unsigned)(m[off + 8] << 8 | m[off + 9]);
        off += 10;
        if (off + (int)rdlen > len)
            return -EINVAL;
        if (type == T_TLSA) {
            seen++;
            if (rdlen < 3)
                return -EINVAL;
            unsigned char usage = m[off], sel = m[off + 1], mt = m[off + 2];
            size_t dlen = rdlen - 3;
            /* RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP; digest lengths must be right */
            int ok = (usage == 2 || usage == 3) && sel <= 1 && mt <= 2 && dlen > 0 && dlen <= KT_DANE_MAX_DATA
                     && (mt != 1 || dlen == 32) && (mt != 2 || dlen == 64);
            if (ok && h->n < KT_DANE_MAX_RR) {
                struct kt_dane_tlsa *r = &h->rr[h->n++];
                r->usage = usage;
                r->selector = sel;
                r->mtype = mt;
                r->len = (unsigned short)dlen;
                memcpy(r->data, m + off + 3, dlen);
            }
        }
        off += (int)rdlen;
    }
    h->state = h->n ? KT_DANE_USABLE : seen ? KT_DANE_UNUSABLE : KT_DANE_NO_TLSA;
    return 0;
}

int kt_dane_ctx_enable(SSL_CTX *ctx)
{
    return SSL_CTX_dane_enable(ctx) > 0 ? 0 : -EINVAL;
}

int kt_dane_arm(SSL *ssl, const struct kt_dane_host *h, const char *nexthop)
{
    if (SSL_dane_enable(ssl, h->host) <= 0)
        return -EINVAL;
    /* RFC 7672 3.1.1: DANE-EE(3) binds the key, whatever names the certificate holds */
    SSL_dane_set_flags(ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (nexthop && *nexthop && strcasecmp(nexthop, h->host) && !SSL_add1_host(ssl, nexthop))
        return -EINVAL;
    int added = 0;
    for (size_t i = 0; i < h->n; i++) {
        const struct kt_dane_tlsa *r = &h->rr[i];
        if (SSL_dane_tlsa_add(ssl, r->usage, r->selector, r->mtype, r->data, r->len) > 0)
            added++;
    }
    if (!added)
        return -EINVAL;
    SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
    return 0;
}
