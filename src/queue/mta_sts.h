/* MTA-STS (RFC 8461) for the outbound client: policy discovery through the
 * "_mta-sts.DOMAIN" TXT record, the HTTPS policy fetch from
 * https://mta-sts.DOMAIN/.well-known/mta-sts.txt (libcurl on a helper
 * thread, so the queue manager's loop never blocks), the policy parser, the
 * MX pattern match, and a persistent policy cache (one file per domain in a
 * directory of data_directory) that survives restarts, is refreshed when the
 * TXT id changes and expires after the policy's max_age.
 *
 * A kt_sts object belongs to the queue manager's thread: every call and
 * every callback runs there. */
#ifndef KTRELAY_MTA_STS_H
#define KTRELAY_MTA_STS_H

#include <stddef.h>
#include <time.h>

#include "core/loop.h"
#include "queue/dns.h"

enum kt_sts_mode { KT_STS_MODE_NONE, KT_STS_MODE_TESTING, KT_STS_MODE_ENFORCE };

/* RFC 8461 3.2 limits: max_age at most 31557600 s, a policy body at most 64 KiB */
#define KT_STS_MAX_AGE_LIMIT 31557600LL
#define KT_STS_POLICY_MAX (64 * 1024)

struct kt_sts_policy {
    enum kt_sts_mode mode;
    long long max_age;             /* seconds, 0 .. KT_STS_MAX_AGE_LIMIT */
    char **mx;                     /* patterns, lower case, no trailing dot: "mx.example.com", "*.example.net" */
    size_t n_mx;
    char id[33];                   /* the TXT record's id it was fetched under (1..32 alphanumerics) */
    time_t fetched;                /* when it was fetched (expires at fetched + max_age) */
    char *text;                    /* the policy as served, for TLS-RPT's policy-string */
};

/* Parse a policy body (RFC 8461 3.2: "key: value" lines, LF or CRLF;
 * version STSv1, mode enforce|testing|none, max_age, one or more mx unless
 * the mode is none; unknown keys ignored). 0, or -EINVAL with err set. The
 * policy's id and fetched are left as they were; clear it with
 * kt_sts_policy_clear. */
int kt_sts_policy_parse(const char *text, size_t len, struct kt_sts_policy *out, char *err, size_t errlen);
void kt_sts_policy_clear(struct kt_sts_policy *p);
/* Deep copy (dst is overwritten, not cleared first). */
void kt_sts_policy_copy(struct kt_sts_policy *dst, const struct kt_sts_policy *src);
/* 1 when host (an MX name, any case, trailing dot allowed) matches one of the
 * policy's patterns (RFC 8461 4.1: "*." matches exactly one leftmost label). */
int kt_sts_mx_match(const struct kt_sts_policy *p, const char *host);
/* The id of one TXT record (RFC 8461 3.1: "v=STSv1; id=ID;" with optional
 * extension fields). 0, or -EINVAL when txt is not a valid STSv1 record. */
int kt_sts_txt_parse(const char *txt, size_t len, char *id, size_t idlen);
const char *kt_sts_mode_str(enum kt_sts_mode mode);

struct kt_sts_settings {
    const char *cache_dir;         /* created if missing (mode 0700) */
    const char *CAfile;            /* HTTPS trust; "" = the system's default store */
    long long fetch_timeout_s;     /* whole HTTPS exchange */
};

struct kt_sts;

/* wake(arg) is called from the helper thread when a fetch completes: the
 * owner then calls kt_sts_poll on its own thread. 0 or -errno. */
int kt_sts_new(struct kt_dns *dns, const struct kt_sts_settings *set, void (*wake)(void *), void *wake_arg,
               struct kt_sts **out);
/* Stops the helper thread (an HTTPS fetch in progress is aborted). No
 * callback runs after this. Free it before the resolver it uses. NULL is fine. */
void kt_sts_free(struct kt_sts *s);
/* Settings of a new configuration generation (strings are copied). */
void kt_sts_update(struct kt_sts *s, const struct kt_sts_settings *set);

/* policy: the domain's policy in effect (valid during the call), NULL when
 * it has none (or only an expired one). failure: when discovery or the fetch
 * failed and the result is therefore no policy or the cached one, the
 * TLS-RPT result type ("sts-policy-fetch-error", "sts-policy-invalid",
 * "sts-webpki-invalid"), else NULL. */
typedef void (*kt_sts_cb)(void *arg, const struct kt_sts_policy *policy, const char *failure);
/* The policy of domain (the next-hop domain, RFC 8461 4). Cached answers
 * come at once (cb may run before this returns); after STS_RECHECK_S the
 * TXT record is checked again and the policy fetched when its id changed. */
void kt_sts_lookup(struct kt_sts *s, const char *domain, time_t now, kt_sts_cb cb, void *arg);
/* Completes fetches the helper thread finished (calls their waiters). */
void kt_sts_poll(struct kt_sts *s, time_t now);

#endif
