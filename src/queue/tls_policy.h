/* The outbound TLS policy of one next hop, as Postfix's smtp(8) decides it:
 * smtp_tls_policy_maps first (keyed by the next hop as written: "[host]:port",
 * "[host]", "host:port", or a domain, whose parents are then tried as
 * ".parent" keys, as TLS_README says), else the main.cf defaults
 * (smtp_tls_security_level, smtp_tls_*_cert_match, smtp_tls_*protocols,
 * smtp_tls_*ciphers, smtp_tls_servername). A policy value is a level
 * (none, may, encrypt, dane, dane-only, fingerprint, verify, secure) and
 * name=value attributes: match=, protocols=, ciphers=, exclude=,
 * servername=, connection_reuse=. Everything is validated when the
 * configuration loads (check-config and run alike), so a lookup never fails.
 *
 * The result, struct kt_tls_policy, is what the SMTP client enforces for
 * every address of that next hop; DANE (queue/dane.h) and MTA-STS may then
 * narrow it per host. Strings in it point into the policy set (main.cf
 * values) or into the struct's own buffer: it stays valid as long as the set
 * and needs no freeing. */
#ifndef KTRELAY_TLS_POLICY_H
#define KTRELAY_TLS_POLICY_H

#include <stddef.h>

struct kt_maps;

/* Postfix's client TLS security levels (smtp_tls_security_level). */
enum kt_smtp_tls {
    KT_SMTP_TLS_NONE, KT_SMTP_TLS_MAY, KT_SMTP_TLS_ENCRYPT, KT_SMTP_TLS_VERIFY, KT_SMTP_TLS_SECURE,
    KT_SMTP_TLS_DANE, KT_SMTP_TLS_DANE_ONLY, KT_SMTP_TLS_FINGERPRINT,
};

/* One effective policy. level is an enum kt_smtp_tls; the strings are never NULL ("" = unset). */
struct kt_tls_policy {
    int level;
    /* verify/secure: names the certificate must match, ':'-separated, with Postfix's words "hostname"
     * (the MX host connected to), "nexthop" (the next-hop domain) and "dot-nexthop" (any subdomain of
     * it); a name starting with '.' matches any subdomain. fingerprint: digests, '|'-separated,
     * each upper- or lower-case hex pairs joined by ':', of the certificate or of its public key. */
    const char *match;
    const char *protocols;        /* Postfix protocol syntax, for this level */
    const char *ciphers;          /* cipher grade: high, medium, low */
    const char *exclude;          /* ciphers excluded from the grade */
    const char *servername;       /* SNI: "" none, "hostname", "nexthop" or a name */
    const char *fingerprint_digest;   /* OpenSSL digest name for fingerprint matching */
    char source[64];              /* for logs: "smtp_tls_policy_maps" or "smtp_tls_security_level" */
    char buf[1024];               /* storage for attributes taken from a table entry */
};

/* main.cf's side of the policy (raw, expanded values; they must outlive the set). */
struct kt_tls_policy_defaults {
    const char *security_level;               /* smtp_tls_security_level */
    const char *verify_cert_match;            /* smtp_tls_verify_cert_match ("hostname") */
    const char *secure_cert_match;            /* smtp_tls_secure_cert_match ("nexthop, dot-nexthop") */
    const char *fingerprint_cert_match;       /* smtp_tls_fingerprint_cert_match */
    const char *protocols, *mandatory_protocols;
    const char *ciphers, *mandatory_ciphers;
    const char *exclude_ciphers, *mandatory_exclude_ciphers;
    const char *servername;                   /* smtp_tls_servername */
    const char *fingerprint_digest;           /* smtp_tls_fingerprint_digest */
    const char *high_cipherlist, *medium_cipherlist, *low_cipherlist;   /* tls_*_cipherlist */
};

struct kt_tls_policy_set;

/* Build the set from main.cf's values and smtp_tls_policy_maps (maps may be NULL; the set takes
 * ownership). Every table entry is parsed now: an unknown level or attribute, an attribute the level
 * does not take, or a bad protocol list or grade is an error naming the key, with err set. Returns 0 or
 * -EINVAL. */
int kt_tls_policy_set_new(const struct kt_tls_policy_defaults *def, struct kt_maps *maps,
                          struct kt_tls_policy_set **out, char *err, size_t errlen);
void kt_tls_policy_set_free(struct kt_tls_policy_set *s);
/* 1 when some policy (the default or a table entry) may need TLS: the client TLS context is needed. */
int kt_tls_policy_set_uses_tls(const struct kt_tls_policy_set *s);
/* 1 when some policy uses DANE (dane or dane-only). */
int kt_tls_policy_set_uses_dane(const struct kt_tls_policy_set *s);

/* The policy of next hop nexthop as written in the destination ("[host]:port", "host", ...). A NULL
 * set gives level none. */
void kt_tls_policy_lookup(const struct kt_tls_policy_set *s, const char *nexthop, struct kt_tls_policy *out);

/* Parse one policy value ("secure match=nexthop:.example.com protocols=>=TLSv1.2") over the defaults
 * of def, as a table entry is read. 0, or -EINVAL with err set. */
int kt_tls_policy_parse(const struct kt_tls_policy_defaults *def, const char *value, struct kt_tls_policy *out,
                        char *err, size_t errlen);

/* What OpenSSL needs for policy p: protocol bounds (TLS1_VERSION.., 0 = none), the SSL_OP_NO_* mask and
 * the cipher list (kt_malloc'ed into *cipherlist). 0 or -EINVAL (not after a successful set build). */
int kt_tls_policy_openssl(const struct kt_tls_policy_set *s, const struct kt_tls_policy *p, int *min_version,
                          int *max_version, long *no_mask, char **cipherlist);

/* Level names: "none" ... "dane-only" (case-insensitive; "" = none); -1 for anything else. */
int kt_tls_level_parse(const char *s);
const char *kt_tls_level_name(int level);
/* TLS is mandatory at this level: a next hop without STARTTLS is deferred. */
int kt_tls_level_mandatory(int level);
/* The server's certificate is authenticated at this level (fingerprint, verify, secure, dane with TLSA). */
int kt_tls_level_authenticates(int level);

#endif
