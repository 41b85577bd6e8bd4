/* DANE records and OpenSSL's DANE checks (RFC 6698, RFC 7671, RFC 7672), with
 * no knowledge of SMTP or DNS transport: the TLSA records of a set of hosts,
 * the parser of a TLSA answer message, and the arming of one SSL with them.
 * queue/dane.h finds the records for a next hop. */
#ifndef KTRELAY_TLS_DANE_H
#define KTRELAY_TLS_DANE_H

#include <stddef.h>

#include <openssl/ssl.h>

enum kt_dane_state {
    KT_DANE_INSECURE,      /* MX or address answers not validated: no TLSA lookup */
    KT_DANE_NO_TLSA,       /* validated absence of TLSA records */
    KT_DANE_UNUSABLE,      /* TLSA records, none usable */
    KT_DANE_USABLE,        /* at least one usable record */
    KT_DANE_ERROR,         /* TLSA lookup failed or was not validated */
};

#define KT_DANE_MAX_DATA 1024
#define KT_DANE_MAX_RR 16

struct kt_dane_tlsa {
    unsigned char usage, selector, mtype;
    unsigned short len;
    unsigned char data[KT_DANE_MAX_DATA];
};

struct kt_dane_host {
    char host[256];
    enum kt_dane_state state;
    size_t n;                          /* usable records in rr */
    struct kt_dane_tlsa rr[KT_DANE_MAX_RR];
};

/* The DANE view of one next hop: one entry per MX host (or the [host]). */
struct kt_dane_set {
    size_t n;
    struct kt_dane_host *hosts;
};

struct kt_dane_set *kt_dane_set_copy(const struct kt_dane_set *s);   /* NULL for NULL */
void kt_dane_set_free(struct kt_dane_set *s);
/* The entry of host (case-insensitive), or NULL. */
const struct kt_dane_host *kt_dane_set_find(const struct kt_dane_set *s, const char *host);
const char *kt_dane_state_str(enum kt_dane_state st);

/* Parse a TLSA answer message (RFC 6698 2.1) into h: USABLE or UNUSABLE from the records of type 52 in
 * the answer section (usage 2 or 3, selector 0 or 1, matching type 0, 1 or 2 are usable, as RFC 7672
 * 3.1.3 says; only those are kept), NO_TLSA when there are none. -EINVAL for a malformed message. */
int kt_dane_parse_tlsa(const unsigned char *abuf, int alen, struct kt_dane_host *h);

/* OpenSSL DANE on a client context (SSL_CTX_dane_enable); 0 or -EINVAL. */
int kt_dane_ctx_enable(SSL_CTX *ctx);
/* Arm OpenSSL DANE on ssl for host h (usable records): SSL_dane_enable with the host as TLSA base
 * domain (and SNI unless already set), nexthop as one more reference identifier for DANE-TA(2), no
 * name checks for DANE-EE(3) (RFC 7672 3.1.1), every usable record added. 0 or -EINVAL. */
int kt_dane_arm(SSL *ssl, const struct kt_dane_host *h, const char *nexthop);

#endif
