/* Kernel TLS support.
 *
 * OpenSSL 3.0 hands TLS 1.2 TX/RX and TLS 1.3 TX to the kernel itself. For
 * TLS 1.3 RX it does not, so ktrelay does: the keylog callback captures the
 * client's application traffic secret during the handshake, and right after
 * it (when OpenSSL holds no unread record) the key and IV derived from it go
 * into the socket with setsockopt(SOL_TLS, TLS_RX), record sequence 0. From
 * then on nothing may call SSL_read on that session: the connection reads the
 * raw socket. The kernel before 6.14 cannot follow a KeyUpdate; the transport
 * closes the session when one arrives. */
#include <errno.h>
#include <fcntl.h>
#include <linux/tls.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tls/ktls.h"
#include "core/log.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif

int kt_ktls_probe(char *why, size_t len)
{
    char ulps[256] = "";
    int fd = open("/proc/sys/net/ipv4/tcp_available_ulp", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, ulps, sizeof(ulps) - 1);
        close(fd);
        ulps[n > 0 ? n : 0] = '\0';
    }
    for (char *p = strtok(ulps, " \n"); p; p = strtok(NULL, " \n"))
        if (strcmp(p, "tls") == 0)
            return 1;
    snprintf(why, len, "the kernel's tls ULP is not loaded (available ULPs: %s); run 'modprobe tls' "
             "(and add tls to /etc/modules-load.d) or use a kernel built with CONFIG_TLS",
             ulps[0] ? ulps : "none");
    return 0;
}

static int hex_nibble(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int hex_decode(const char *hex, unsigned char *out, size_t max)
{
    size_t n = 0;
    while (hex[0] && hex[1] && n < max) {
        int hi = hex_nibble(hex[0]), lo = hex_nibble(hex[1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[n++] = (unsigned char)(hi << 4 | lo);
        hex += 2;
    }
    return (int)n;
}

/* The ex_data slot linking an SSL to its struct kt_ktls_secret. */
static int secret_index = -1;
static pthread_once_t secret_once = PTHREAD_ONCE_INIT;

static void secret_index_init(void)
{
    secret_index = SSL_get_ex_new_index(0, "ktrelay kTLS RX secret", NULL, NULL, NULL);
}

int kt_ktls_track(SSL *ssl, struct kt_ktls_secret *sec)
{
    pthread_once(&secret_once, secret_index_init);
    sec->len = 0;
    if (secret_index < 0 || SSL_set_ex_data(ssl, secret_index, sec) != 1)
        return -ENOMEM;
    return 0;
}

static void keylog_cb(const SSL *ssl, const char *line)
{
    static const char label[] = "CLIENT_TRAFFIC_SECRET_0 ";
    if (strncmp(line, label, sizeof(label) - 1) != 0 || secret_index < 0)
        return;
    struct kt_ktls_secret *sec = SSL_get_ex_data(ssl, secret_index);
    if (!sec)
        return;
    const char *secret = strchr(line + sizeof(label) - 1, ' ');
    if (!secret)
        return;
    int n = hex_decode(secret + 1, sec->secret, sizeof(sec->secret));
    sec->len = n > 0 ? (size_t)n : 0;
}

void kt_ktls_prepare_ctx(SSL_CTX *ctx)
{
    /* OpenSSL formats every secret as hex text for this callback: only pay
     * for it when the kernel can take the keys. */
    char why[256];
    if (kt_ktls_probe(why, sizeof(why)))
        SSL_CTX_set_keylog_callback(ctx, keylog_cb);
}

int kt_tls13_expand_label(const EVP_MD *md, const unsigned char *secret, size_t secret_len, const char *label,
                          unsigned char *out, size_t out_len)
{
    unsigned char info[2 + 1 + 255 + 1 + 1];
    size_t label_len = strlen(label);
    size_t hash_len = (size_t)EVP_MD_get_size(md);
    unsigned char block[EVP_MAX_MD_SIZE];
    unsigned int block_len = 0;

    /* HkdfLabel = length(2) || "tls13 " label (len-prefixed) || context "" */
    if (out_len > hash_len || 6 + label_len > 255)
        return -EINVAL;
    size_t i = 0;
    info[i++] = (unsigned char)(out_len >> 8);
    info[i++] = (unsigned char)out_len;
    info[i++] = (unsigned char)(6 + label_len);
    memcpy(info + i, "tls13 ", 6);
    i += 6;
    memcpy(info + i, label, label_len);
    i += label_len;
    info[i++] = 0;
    /* HKDF-Expand for L <= HashLen is one block: T(1) = HMAC(PRK, info || 0x01) */
    info[i++] = 1;
    if (!HMAC(md, secret, (int)secret_len, info, i, block, &block_len))
        return -EIO;
    memcpy(out, block, out_len);
    OPENSSL_cleanse(block, sizeof(block));
    return 0;
}

/* The TLS 1.3 cipher suites the kernel takes (RFC 8446 B.4), and where each one's key and nonce go in its
 * struct tls12_crypto_info_*: the 12-byte nonce (the "iv" of RFC 8446 7.3) is salt || iv in the kernel's
 * terms (AES-GCM: 4 + 8 bytes; ChaCha20-Poly1305: no salt, the whole 12 bytes as iv). */
#define SUITE(id_, digest, type, st)                                                                          \
    { .id = id_, .md = digest, .cipher_type = type, .size = sizeof(struct st),                                \
      .key_off = offsetof(struct st, key), .key_len = sizeof(((struct st *)0)->key),                          \
      .salt_off = offsetof(struct st, salt), .salt_len = sizeof(((struct st *)0)->salt),                      \
      .iv_off = offsetof(struct st, iv), .iv_len = sizeof(((struct st *)0)->iv) }
static const struct tls13_suite {
    uint16_t id, cipher_type;
    const EVP_MD *(*md)(void);
    size_t size, key_off, key_len, salt_off, salt_len, iv_off, iv_len;
} tls13_suites[] = {
    SUITE(0x1301, EVP_sha256, TLS_CIPHER_AES_GCM_128, tls12_crypto_info_aes_gcm_128),
    SUITE(0x1302, EVP_sha384, TLS_CIPHER_AES_GCM_256, tls12_crypto_info_aes_gcm_256),
    SUITE(0x1303, EVP_sha256, TLS_CIPHER_CHACHA20_POLY1305, tls12_crypto_info_chacha20_poly1305),
};
#undef SUITE

int kt_ktls_install_tls13_rx(SSL *ssl, int fd, struct kt_ktls_secret *sec)
{
    const SSL_CIPHER *c = SSL_get_current_cipher(ssl);
    const struct tls13_suite *suite = NULL;
    unsigned char key[32], iv[12];
    union {
        struct tls_crypto_info info;
        struct tls12_crypto_info_aes_gcm_128 aes_gcm_128;
        struct tls12_crypto_info_aes_gcm_256 aes_gcm_256;
        struct tls12_crypto_info_chacha20_poly1305 chacha20_poly1305;
    } ci;
    unsigned char *ci_bytes = (unsigned char *)&ci;
    int ret = -ENOTSUP;

    if (!c || sec->len == 0) {
        ret = -ENOKEY;
        goto out;
    }
    if (SSL_has_pending(ssl) || SSL_pending(ssl)) {
        ret = -EAGAIN;    /* OpenSSL already read part of the client's stream */
        goto out;
    }
    uint16_t id = (uint16_t)(SSL_CIPHER_get_id(c) & 0xFFFF);
    for (size_t i = 0; i < sizeof(tls13_suites) / sizeof(tls13_suites[0]); i++)
        if (tls13_suites[i].id == id)
            suite = &tls13_suites[i];
    if (!suite)
        goto out;    /* -ENOTSUP */
    if (kt_tls13_expand_label(suite->md(), sec->secret, sec->len, "key", key, suite->key_len) < 0
        || kt_tls13_expand_label(suite->md(), sec->secret, sec->len, "iv", iv, sizeof(iv)) < 0)
        goto out;

    memset(&ci, 0, sizeof(ci));    /* rec_seq 0: the first record after the handshake */
    ci.info.version = TLS_1_3_VERSION;
    ci.info.cipher_type = suite->cipher_type;
    memcpy(ci_bytes + suite->key_off, key, suite->key_len);
    memcpy(ci_bytes + suite->salt_off, iv, suite->salt_len);
    memcpy(ci_bytes + suite->iv_off, iv + suite->salt_len, suite->iv_len);
    ret = setsockopt(fd, SOL_TLS, TLS_RX, &ci, (socklen_t)suite->size) < 0 ? -errno : 0;
    OPENSSL_cleanse(&ci, sizeof(ci));
out:
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_cleanse(iv, sizeof(iv));
    OPENSSL_cleanse(sec->secret, sizeof(sec->secret));
    sec->len = 0;
    return ret;
}
