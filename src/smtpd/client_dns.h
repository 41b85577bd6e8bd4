/* DNS answers for the SMTP server's client checks (reverse names, DNS
 * lists, sender and HELO domains): asynchronous queries on a worker's
 * c-ares channel (queue/dns.h, on its io_uring loop) and one process-wide
 * cache shared by all workers, holding each answer for its TTL (negative
 * answers for the SOA's negative TTL, failures briefly). Checks read the
 * cache only; a session whose check needs an answer that is not there
 * fetches it, waits, and checks again. */
#ifndef KTRELAY_CLIENT_DNS_H
#define KTRELAY_CLIENT_DNS_H

#include <stddef.h>

struct kt_dns;

enum { KT_RR_A = 1, KT_RR_PTR = 12, KT_RR_MX = 15, KT_RR_TXT = 16, KT_RR_AAAA = 28 };

enum kt_dns_status {
    KT_DNS_FOUND,        /* at least one record of the type */
    KT_DNS_NOTFOUND,     /* NXDOMAIN, or the name has no record of the type */
    KT_DNS_TEMP,         /* SERVFAIL, REFUSED, timeout, no resolver */
};

#define KT_DNS_MAX_RR 8
#define KT_DNS_RR_LEN 256

struct kt_dns_answer {
    enum kt_dns_status status;
    int nxdomain;                              /* NOTFOUND because the name does not exist */
    unsigned n;                                /* records kept (at most KT_DNS_MAX_RR) */
    char rr[KT_DNS_MAX_RR][KT_DNS_RR_LEN];     /* A/AAAA: address text; PTR: name; MX: "pref name";
                                                  TXT: the strings joined, truncated */
    char why[64];                              /* KT_DNS_TEMP: "timeout", "server failure", ... */
};

/* Copies the cached answer for (type, name) into *out: 1, or 0 when there is
 * none (never asked, or expired). Names are compared without case and
 * without a trailing dot. Thread-safe. */
int kt_cdns_lookup(int type, const char *name, struct kt_dns_answer *out);

/* An answer kept by its asker: a cached one may expire (short TTLs, failures
 * cached briefly) before every answer a check waits for is in. */
struct kt_dns_result {
    int type;
    char name[KT_DNS_RR_LEN];
    struct kt_dns_answer ans;
};

/* Queries (type, name) on chan (NULL: answered as KT_DNS_TEMP "no resolver"),
 * stores the answer in the cache, then calls done(arg, 0, res) on chan's
 * loop thread (res valid during the call). done runs exactly once, possibly
 * before this returns; with cancelled set and res NULL when the channel was
 * freed first. */
typedef void (*kt_cdns_done)(void *arg, int cancelled, const struct kt_dns_result *res);
void kt_cdns_fetch(struct kt_dns *chan, int type, const char *name, kt_cdns_done done, void *arg);

/* Parses a DNS answer message (tests): records of type into *out, *ttl
 * (seconds) the lowest record TTL, or the negative TTL for NOTFOUND. */
void kt_cdns_parse(int type, int status, const unsigned char *abuf, int alen, struct kt_dns_answer *out,
                   unsigned *ttl);

/* Number of cached answers (tests, statistics). */
size_t kt_cdns_cache_size(void);

#endif
