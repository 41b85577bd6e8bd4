/* SMTP TLS Reporting (RFC 8460) for the outbound client: the queue manager
 * counts, per policy domain and policy, the TLS sessions that succeeded and
 * those that failed with their result type; once a day (at 00:00 UTC) and on
 * request (`ktrelay tlsrpt flush`) each domain's counts become one report in
 * the RFC's JSON (section 4), written to the report directory as
 * "SUBMITTER!DOMAIN!BEGIN!END.json" (the file name of section 5.3) for the
 * operator, next to "....rua" with the domain's reporting URIs from its
 * "_smtp._tls.DOMAIN" TXT record; for each mailto: URI the report is also
 * queued as a message (multipart/report; report-type="tlsrpt" with an
 * application/tlsrpt+json part, section 5.3). A domain without a TLSRPT
 * record gets no report. Counts kept since the last report are saved in the
 * report directory when the queue manager stops and read back at its start.
 *
 * Everything runs on the queue manager's thread. */
#ifndef KTRELAY_TLSRPT_H
#define KTRELAY_TLSRPT_H

#include <stddef.h>
#include <time.h>

#include "queue/dns.h"
#include "queue/mta_sts.h"

struct kt_tlsrpt_settings {
    const char *report_dir;        /* created if missing (mode 0700) */
    const char *organization_name; /* the report's organization-name */
    const char *contact_info;      /* the report's contact-info */
    const char *submitter;         /* the sending MTA's host name (myhostname) */
    const char *queue_directory;   /* where mailto: reports are queued */
};

struct kt_tlsrpt;

/* queued(arg, id): a report message was queued under id (the owner loads it). */
int kt_tlsrpt_new(struct kt_dns *dns, const struct kt_tlsrpt_settings *set, time_t now,
                  void (*queued)(void *arg, const char *id), void *arg, struct kt_tlsrpt **out);
/* Saves the counts not yet reported; no callback after this. Free it before
 * the resolver. NULL is fine. */
void kt_tlsrpt_free(struct kt_tlsrpt *t);
void kt_tlsrpt_update(struct kt_tlsrpt *t, const struct kt_tlsrpt_settings *set);

/* One TLS session (or a delivery attempt that found no usable policy) to a
 * policy domain. policy: the MTA-STS policy applied, NULL for
 * "no-policy-found". result: NULL for a success, else an RFC 8460 result
 * type ("starttls-not-supported", "certificate-host-mismatch",
 * "certificate-expired", "certificate-not-trusted", "validation-failure",
 * "sts-policy-fetch-error", ...). sending_ip (ours), mx_host, receiving_ip,
 * detail: for the failure details (NULL when unknown). */
void kt_tlsrpt_count(struct kt_tlsrpt *t, const char *domain, const struct kt_sts_policy *policy,
                     const char *result, const char *sending_ip, const char *mx_host, const char *receiving_ip,
                     const char *detail);
/* End the reporting period at now: every domain's counts are reported (after
 * the TXT lookups) and start again from zero. */
void kt_tlsrpt_flush(struct kt_tlsrpt *t, time_t now);
/* Once a second: the daily report at 00:00 UTC. */
void kt_tlsrpt_tick(struct kt_tlsrpt *t, time_t now);

/* The rua URIs of a TLSRPT record ("v=TLSRPTv1; rua=mailto:a@b,https://..."),
 * comma separated into uris (kt_malloc'ed strings, *n of them; a URI with a byte that is not
 * printable ASCII or with a space is left out). 0, or
 * -EINVAL when txt is not a valid TLSRPTv1 record. */
int kt_tlsrpt_txt_parse(const char *txt, char ***uris, size_t *n);

#endif
