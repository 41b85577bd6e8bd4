/* Kernel TLS: what the kernel offers, and the TLS 1.3 receive offload that
 * OpenSSL 3.0 does not do itself. */
#ifndef KTRELAY_KTLS_H
#define KTRELAY_KTLS_H

#include <openssl/ssl.h>
#include <stddef.h>

struct kt_session;

/* 1 if the kernel has the tls ULP; else 0 with the reason in why. */
int kt_ktls_probe(char *why, size_t len);
/* Capture TLS 1.3 client traffic secrets (keylog callback) on this context. */
void kt_ktls_prepare_ctx(SSL_CTX *ctx);
/* After a TLS 1.3 handshake: derive the client application key and IV and
 * install TLS_RX on the socket (record sequence 0). Returns 0 or -errno;
 * on failure the session keeps reading through OpenSSL. */
int kt_ktls_install_tls13_rx(struct kt_session *s);
/* HKDF-Expand-Label (RFC 8446 7.1) with an empty context. */
int kt_tls13_expand_label(const EVP_MD *md, const unsigned char *secret, size_t secret_len, const char *label,
                          unsigned char *out, size_t out_len);

#endif
