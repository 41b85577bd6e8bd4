/* Kernel TLS: what the kernel offers, and the TLS 1.3 receive offload that
 * OpenSSL 3.0 does not do itself. The connection layer (tls/conn.c) is the
 * only caller of the per-connection functions. */
#ifndef KTRELAY_KTLS_H
#define KTRELAY_KTLS_H

#include <openssl/ssl.h>
#include <stdatomic.h>
#include <stddef.h>

/* Connections whose direction went to the kernel (process-wide, shared by
 * the worker threads), logged when the server stops. */
struct kt_ktls_counters {
    atomic_ulong tls12_tx, tls12_rx, tls13_tx, tls13_rx, sessions_tls;
};

/* The client's TLS 1.3 application traffic secret, captured during the
 * handshake for kt_ktls_install_tls13_rx. Lives in the connection object. */
struct kt_ktls_secret {
    unsigned char secret[64];
    size_t len;
};

/* 1 if the kernel has the tls ULP; else 0 with the reason in why. */
int kt_ktls_probe(char *why, size_t len);
/* Capture TLS 1.3 client traffic secrets (keylog callback) on this context,
 * for the SSLs that kt_ktls_track names a place for. */
void kt_ktls_prepare_ctx(SSL_CTX *ctx);
/* Before the handshake of ssl (server side): the keylog callback of its
 * context writes the client's application traffic secret into *sec, which
 * must stay valid while ssl lives. The link is ssl's own ex_data slot, owned
 * by ktls.c; nothing else is stored in ssl's app data. Returns 0 or -ENOMEM. */
int kt_ktls_track(SSL *ssl, struct kt_ktls_secret *sec);
/* After a TLS 1.3 handshake on socket fd: derive the client application key
 * and IV from *sec and install TLS_RX on the socket (record sequence 0).
 * Returns 0 or -errno (-ENOKEY without a captured secret, -EAGAIN when
 * OpenSSL already read past the handshake); on failure the connection keeps
 * reading through OpenSSL. *sec is wiped either way. */
int kt_ktls_install_tls13_rx(SSL *ssl, int fd, struct kt_ktls_secret *sec);
/* HKDF-Expand-Label (RFC 8446 7.1) with an empty context. */
int kt_tls13_expand_label(const EVP_MD *md, const unsigned char *secret, size_t secret_len, const char *label,
                          unsigned char *out, size_t out_len);

#endif
