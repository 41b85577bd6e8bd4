/* TLS contexts built from Postfix smtpd_tls_* / smtp_tls_* parameters.
 * One server SSL_CTX is shared by every worker thread: OpenSSL locks its
 * session cache and ticket keys internally. Per-connection I/O and kTLS
 * offload checks live in the connection code; contexts made here only
 * leave kTLS possible (no read_ahead, no compression, default fragments). */
#ifndef KTRELAY_TLS_H
#define KTRELAY_TLS_H

#include <stddef.h>
#include <openssl/ssl.h>

/* Raw Postfix parameter values (strings as in main.cf after expansion).
 * NULL or "" means "not set"; key_file defaults to cert_file and eckey_file
 * to eccert_file, as in Postfix. Unset cipher lists take Postfix's defaults. */
struct kt_tls_server_params {
    const char *cert_file, *key_file, *eccert_file, *eckey_file, *CAfile, *CApath;
    const char *protocols;          /* smtpd_tls_protocols or _mandatory_protocols */
    const char *ciphers;            /* grade: "high" | "medium" | "low" */
    const char *high_cipherlist, *medium_cipherlist, *low_cipherlist, *exclude_ciphers;
    int loglevel;                   /* smtpd_tls_loglevel 0..4 */
    long session_cache_timeout;     /* seconds; 0 disables the cache and tickets */
    int ask_ccert;                  /* smtpd_tls_ask_ccert */
    int ktls;                       /* tls_ktls_enable */
};

struct kt_tls_server;

/* Returns 0, or a negative errno with a one-line reason in err. */
int kt_tls_server_new(const struct kt_tls_server_params *p, struct kt_tls_server **out,
                      char *err, size_t errlen);
void kt_tls_server_free(struct kt_tls_server *s);
SSL_CTX *kt_tls_server_ctx(const struct kt_tls_server *s);

/* Postfix protocol syntax: ">=TLSv1.2", "<=TLSv1.3", ">=0x0303", "TLSv1.2 TLSv1.3",
 * "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1" (separated by spaces, commas or colons; names are
 * case-insensitive). Sets *min_version / *max_version (TLS1_VERSION..TLS1_3_VERSION,
 * 0 = no bound) and *no_mask (SSL_OP_NO_TLSv1_x for versions excluded inside the range).
 * Returns 0 or -EINVAL with a message. */
int kt_tls_parse_protocols(const char *spec, int *min_version, int *max_version, long *no_mask,
                           char *err, size_t errlen);

/* Build the OpenSSL cipher list for a Postfix grade ("high", "medium", "low"; NULL or ""
 * means "medium"), appending ":!X" for every exclusion. *out is kt_malloc'ed.
 * Returns 0 or -EINVAL with a message. */
int kt_tls_cipherlist(const char *grade, const char *high, const char *medium, const char *low,
                      const char *exclude, char **out, char *err, size_t errlen);

/* "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", the tail of Postfix's
 * "... TLS connection established from ...:" line. */
void kt_tls_describe(SSL *ssl, char *buf, size_t len);

/* The client certificate of a server-side session, as Postfix's smtpd sees it: KT_CCERT_NONE (no
 * certificate: "Anonymous"), KT_CCERT_UNTRUSTED (one that does not verify against smtpd_tls_CAfile /
 * CApath: "Untrusted"), KT_CCERT_TRUSTED (it verifies: "Trusted"). With a certificate, fp and pkey_fp get
 * the digest (smtpd_tls_fingerprint_digest, e.g. "sha256") of the certificate and of its public key, as
 * upper-case hex pairs joined by ':' (the keys of relay_clientcerts); "" when the digest is unknown. */
enum kt_ccert { KT_CCERT_NONE, KT_CCERT_UNTRUSTED, KT_CCERT_TRUSTED };
#define KT_TLS_FP_MAX (3 * 64 + 1)
enum kt_ccert kt_tls_peer_cert(SSL *ssl, const char *digest, char fp[KT_TLS_FP_MAX], char pkey_fp[KT_TLS_FP_MAX]);
const char *kt_tls_ccert_str(enum kt_ccert c);   /* "Anonymous", "Untrusted", "Trusted" */
/* The same verdict without the fingerprints. */
enum kt_ccert kt_tls_peer_trust(SSL *ssl);

/* Self-signed ECDSA P-256 certificate for hostname (CN, SAN DNS:hostname and DNS:localhost,
 * valid 10 years) written as PEM; the key file gets mode 0600. Both files are replaced
 * atomically. Returns 0 or a negative errno with a message. */
int kt_tls_make_self_signed(const char *cert_path, const char *key_path, const char *hostname,
                            char *err, size_t errlen);

/* Client context for the outbound relay (smtp_tls_*). Peer verification is off at the
 * context level: the per-destination policy decides (SSL_set_verify, SSL_set1_host), and
 * the CAs loaded here make SSL_get_verify_result meaningful. The client session cache
 * mode is on without internal store, so SSL_CTX_sess_set_new_cb sees new sessions. */
struct kt_tls_client_params {
    const char *CAfile, *CApath, *protocols, *ciphers;
    int loglevel;
    int ktls;
    /* optional; NULL means Postfix's default tls_*_cipherlist / no exclusions */
    const char *high_cipherlist, *medium_cipherlist, *low_cipherlist, *exclude_ciphers;
};
int kt_tls_client_ctx_new(const struct kt_tls_client_params *p, SSL_CTX **out,
                          char *err, size_t errlen);

#endif
