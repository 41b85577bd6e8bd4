/* DANE for SMTP (RFC 7672): the TLSA records of each MX host of a next hop,
 * looked up only when the host's MX and address answers were DNSSEC-validated,
 * and the TLS security level each host then gets, with Postfix's fallbacks
 * (smtp_tls_security_level = dane / dane-only):
 *   - insecure MX or address records, or validated "no TLSA records": may
 *     (dane-only: the host is not used, "non DNSSEC destination" / "no TLSA
 *     records", dsn 4.7.5);
 *   - TLSA records, none usable (usage 2 or 3, selector 0 or 1, matching type
 *     0, 1 or 2 as RFC 7672 3.1.3 allows): encrypt (dane-only: not used);
 *   - usable records: the certificate must match one, checked with OpenSSL's
 *     DANE API (SSL_dane_enable, SSL_dane_tlsa_add), else the delivery defers
 *     with "Server certificate not verified";
 *   - a failed TLSA lookup (SERVFAIL, a bogus answer, a timeout) or a TLSA
 *     answer that is not validated for a validated host: "TLSA lookup error",
 *     dsn 4.7.5, the host is not used.
 * DNSSEC validation is the resolver's: queries carry the AD bit (RFC 6840
 * 5.7) and only answers with AD set count, as Postfix trusts the AD bit of
 * its local validating resolver (queue/dns.h). */
#ifndef KTRELAY_DANE_H
#define KTRELAY_DANE_H

#include <stddef.h>

#include "queue/dns.h"
#include "tls/dane.h"

/* set (kt_malloc'ed, the callee's from then on) has one entry per distinct host. */
typedef void (*kt_dane_cb)(void *arg, struct kt_dane_set *set);

/* Look up the TLSA records "_port._tcp.HOST" of every distinct host in addrs whose answers were
 * validated (kt_smtp_addr.dnssec); the others are KT_DANE_INSECURE. cb runs once, possibly before this
 * returns; with -ECANCELED semantics (the resolver freed) set is NULL. */
void kt_dane_resolve(struct kt_dns *dns, const struct kt_smtp_addr *addrs, size_t n, int port, kt_dane_cb cb,
                     void *arg);

#endif
