/* tls: server and client SSL_CTX construction from Postfix TLS parameters.
 * Guarantees: a context returned here never prompts for a passphrase, never
 * sets read_ahead or compression (so kTLS can engage when asked), releases
 * record buffers of idle connections, refuses renegotiation, and serves
 * session resumption (cache and tickets) to all threads sharing it.
 * Errors come back as negative errno plus a one-line reason. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "core/alloc.h"
#include "core/log.h"
#include "tls/dane.h"
#include "tls/ktls.h"
#include "tls/tls.h"

#define DEF_HIGH_CLIST   "aNULL:-aNULL:HIGH:@STRENGTH"
#define DEF_MEDIUM_CLIST "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"
#define DEF_LOW_CLIST    "aNULL:-aNULL:HIGH:MEDIUM:LOW:+RC4:@STRENGTH"
#define LIST_SEP         " \t\r\n,:"
#define SESSION_ID_CTX   "ktrelay-smtpd"
#define CCERT_VERIFY_DEPTH 9   /* smtpd_tls_ccert_verifydepth default */

struct kt_tls_server {
    SSL_CTX *ctx;
};


/* Appends OpenSSL's most specific reason and empties the error queue, so the
 * next failure on this thread does not report a stale cause. */
static void set_ssl_err(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    char buf[256];

    if (!reason && e) {
        ERR_error_string_n(e, buf, sizeof(buf));
        reason = buf;
    }
    kt_set_err(err, errlen, "%s: %s", what, reason ? reason : "unknown OpenSSL error");
    ERR_clear_error();
}

static int empty(const char *s) { return !s || !*s; }

/* ---- protocols ---- */

static const struct { const char *name; int version; } protocol_names[] = {
    { "SSLv2", SSL2_VERSION }, { "SSLv3", SSL3_VERSION }, { "TLSv1", TLS1_VERSION },
    { "TLSv1.1", TLS1_1_VERSION }, { "TLSv1.2", TLS1_2_VERSION }, { "TLSv1.3", TLS1_3_VERSION },
};
#define N_PROTOCOLS (int)(sizeof(protocol_names) / sizeof(protocol_names[0]))

static int protocol_index(const char *name)
{
    for (int i = 0; i < N_PROTOCOLS; i++)
        if (strcasecmp(name, protocol_names[i].name) == 0)
            return i;
    return -1;
}

/* Bounds take a name or Postfix's hexadecimal form ("303", "0x0303"); only
 * versions this OpenSSL knows are useful, so others are rejected. */
static int parse_bound(const char *tok, int *version)
{
    int i = protocol_index(tok);
    char *end;

    if (i >= 0) {
        *version = protocol_names[i].version;
        return 0;
    }
    if (!*tok)
        return -EINVAL;
    errno = 0;
    unsigned long v = strtoul(tok, &end, 16);
    if (*end || errno || v < SSL3_VERSION || v > TLS1_3_VERSION)
        return -EINVAL;
    *version = (int)v;
    return 0;
}

static long no_option(int version)
{
    switch (version) {
    case TLS1_VERSION: return SSL_OP_NO_TLSv1;
    case TLS1_1_VERSION: return SSL_OP_NO_TLSv1_1;
    case TLS1_2_VERSION: return SSL_OP_NO_TLSv1_2;
    case TLS1_3_VERSION: return SSL_OP_NO_TLSv1_3;
    default: return 0;
    }
}

int kt_tls_parse_protocols(const char *spec, int *min_version, int *max_version, long *no_mask,
                           char *err, size_t errlen)
{
    unsigned include = 0, exclude = 0;
    int floor = 0, ceiling = 0, rc = 0;
    char *copy = kt_strdup(spec ? spec : ""), *save = NULL;

    *min_version = *max_version = 0;
    *no_mask = 0;
    for (char *tok = strtok_r(copy, LIST_SEP, &save); tok && !rc; tok = strtok_r(NULL, LIST_SEP, &save)) {
        int i, v;
        if (strncmp(tok, ">=", 2) == 0 || strncmp(tok, "<=", 2) == 0) {
            if (parse_bound(tok + 2, &v) < 0) {
                kt_set_err(err, errlen, "unknown TLS protocol version in \"%s\"", tok);
                rc = -EINVAL;
            } else if (tok[0] == '>') {
                floor = v > floor ? v : floor;
            } else {
                ceiling = ceiling && ceiling < v ? ceiling : v;
            }
        } else if ((i = protocol_index(tok[0] == '!' ? tok + 1 : tok)) < 0) {
            kt_set_err(err, errlen, "unknown TLS protocol \"%s\"", tok);
            rc = -EINVAL;
        } else if (tok[0] == '!') {
            exclude |= 1u << i;
        } else {
            include |= 1u << i;
        }
    }
    kt_free(copy);
    if (rc)
        return rc;

    /* As in Postfix, an include list also excludes every protocol it omits. */
    if (include)
        exclude |= ~include & ((1u << N_PROTOCOLS) - 1);
    int lo = -1, hi = -1;
    for (int i = 1; i < N_PROTOCOLS; i++) {     /* SSLv2 is gone from OpenSSL */
        int v = protocol_names[i].version;
        if ((exclude & (1u << i)) || (floor && v < floor) || (ceiling && v > ceiling))
            continue;
        if (lo < 0)
            lo = i;
        hi = i;
    }
    if (hi < 0 || protocol_names[hi].version < TLS1_VERSION) {
        kt_set_err(err, errlen, "TLS protocol list \"%s\" leaves no usable TLS version", spec ? spec : "");
        return -EINVAL;
    }
    /* Express the ends as bounds (OpenSSL's preferred interface); only holes
     * inside the range need SSL_OP_NO_* bits, which is what Postfix uses. */
    if (protocol_names[lo].version > SSL3_VERSION)
        *min_version = protocol_names[lo].version;
    if (ceiling || hi < N_PROTOCOLS - 1)
        *max_version = protocol_names[hi].version;
    for (int i = lo + 1; i < hi; i++)
        if (exclude & (1u << i))
            *no_mask |= no_option(protocol_names[i].version);
    return 0;
}

/* ---- ciphers ---- */

int kt_tls_cipherlist(const char *grade, const char *high, const char *medium, const char *low,
                      const char *exclude, char **out, char *err, size_t errlen)
{
    const char *base;

    *out = NULL;
    if (empty(grade) || strcasecmp(grade, "medium") == 0)
        base = empty(medium) ? DEF_MEDIUM_CLIST : medium;
    else if (strcasecmp(grade, "high") == 0)
        base = empty(high) ? DEF_HIGH_CLIST : high;
    else if (strcasecmp(grade, "low") == 0)
        base = empty(low) ? DEF_LOW_CLIST : low;
    else {
        kt_set_err(err, errlen, "invalid cipher grade \"%s\" (expected high, medium or low)", grade);
        return -EINVAL;
    }

    char *list = kt_strdup(base), *copy = kt_strdup(exclude ? exclude : ""), *save = NULL;
    for (char *tok = strtok_r(copy, LIST_SEP, &save); tok; tok = strtok_r(NULL, LIST_SEP, &save)) {
        if (strchr("!+-@", tok[0])) {
            kt_set_err(err, errlen, "invalid unary '!+-@' in cipher exclusion \"%s\"", tok);
            kt_free(copy);
            kt_free(list);
            return -EINVAL;
        }
        char *longer = kt_asprintf("%s:!%s", list, tok);
        kt_free(list);
        list = longer;
    }
    kt_free(copy);
    *out = list;
    return 0;
}

/* ---- logging callbacks (smtpd_tls_loglevel) ---- */

static void info_cb(const SSL *ssl, int where, int ret)
{
    const char *op = (where & SSL_ST_CONNECT) ? "SSL_connect"
                   : (where & SSL_ST_ACCEPT) ? "SSL_accept" : "undefined";

    if (where & SSL_CB_LOOP) {
        kt_info("%s:%s", op, SSL_state_string_long(ssl));
    } else if (where & SSL_CB_ALERT) {
        kt_info("SSL3 alert %s:%s:%s", (where & SSL_CB_READ) ? "read" : "write",
                SSL_alert_type_string_long(ret), SSL_alert_desc_string_long(ret));
    } else if (where & SSL_CB_EXIT) {
        if (ret == 0) {
            kt_info("%s:failed in %s", op, SSL_state_string_long(ssl));
        } else if (ret < 0) {
            /* Non-blocking sockets exit with WANT_* all the time: not news. */
            int e = SSL_get_error(ssl, ret);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                kt_info("%s:error in %s", op, SSL_state_string_long(ssl));
        }
    }
}

static const char *content_type_name(int type)
{
    switch (type) {
    case SSL3_RT_CHANGE_CIPHER_SPEC: return "change_cipher_spec";
    case SSL3_RT_ALERT: return "alert";
    case SSL3_RT_HANDSHAKE: return "handshake";
    case SSL3_RT_APPLICATION_DATA: return "application_data";
    case SSL3_RT_HEADER: return "record header";
    case SSL3_RT_INNER_CONTENT_TYPE: return "inner content type";
    default: return "other";
    }
}

static void msg_cb(int write_p, int version, int content_type, const void *buf, size_t len,
                   SSL *ssl, void *arg)
{
    const unsigned char *p = buf;

    kt_info("%s %s %s (%zu bytes, version 0x%04x)", SSL_is_server(ssl) ? "server" : "client",
            write_p ? "write" : "read", content_type_name(content_type), len, (unsigned)version);
    for (size_t off = 0; off < len; off += 16) {
        char hex[16 * 3 + 1], text[17];
        size_t n = len - off < 16 ? len - off : 16, h = 0;
        for (size_t i = 0; i < n; i++) {
            h += (size_t)snprintf(hex + h, sizeof(hex) - h, "%02x ", p[off + i]);
            text[i] = isprint(p[off + i]) ? (char)p[off + i] : '.';
        }
        text[n] = '\0';
        kt_info("%04zx %-48s %s", off, hex, text);
    }
}

/* ---- shared context setup ---- */

/* Returning 0 makes OpenSSL give up on an encrypted key instead of reading
 * a passphrase from the terminal; the flag lets us say why loading failed. */
static int no_passphrase_cb(char *buf, int size, int rwflag, void *userdata)
{
    if (userdata)
        *(int *)userdata = 1;
    return 0;
}

static int setup_common(SSL_CTX *ctx, const char *protocols, const char *grade, const char *high,
                        const char *medium, const char *low, const char *exclude, int loglevel,
                        int ktls, char *err, size_t errlen)
{
    int min_v, max_v, rc;
    long no_mask;
    char *list;

    if ((rc = kt_tls_parse_protocols(protocols, &min_v, &max_v, &no_mask, err, errlen)) < 0)
        return rc;
    if ((rc = kt_tls_cipherlist(grade, high, medium, low, exclude, &list, err, errlen)) < 0)
        return rc;
    /* Postfix's lists start "aNULL:-aNULL:HIGH", and since "-" only removes
     * until a later term adds back, HIGH re-adds anonymous suites: Postfix
     * offers them unless it asks for client certificates. A ktrelay context
     * always has a certificate (or, as a client, may have to verify one), so
     * anonymous suites only invite a man in the middle: drop them for good.
     * TLS 1.3 suites keep OpenSSL's defaults, as Postfix does. */
    char *final = kt_asprintf("%s:!aNULL", list);
    kt_free(list);
    int ok = SSL_CTX_set_cipher_list(ctx, final);
    kt_free(final);
    if (!ok) {
        char what[128];
        snprintf(what, sizeof(what), "cipher grade \"%s\" selects no usable cipher", grade ? grade : "medium");
        set_ssl_err(err, errlen, what);
        return -EINVAL;
    }
    if (!SSL_CTX_set_min_proto_version(ctx, min_v) || !SSL_CTX_set_max_proto_version(ctx, max_v)) {
        set_ssl_err(err, errlen, "cannot set TLS protocol range");
        return -EINVAL;
    }
    /* SMTP ends with QUIT, so a missing close_notify cannot truncate mail;
     * many clients just close, and treating that as an error is noise. */
    uint64_t opts = SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF
                  | (uint64_t)no_mask;
    /* Without the kernel's tls ULP every kTLS attempt is two failing
     * setsockopt calls per handshake: ask for kTLS only where it can work. */
    char why[256];
    if (ktls && !kt_ktls_probe(why, sizeof(why)))
        ktls = 0;
    if (ktls)
        opts |= SSL_OP_ENABLE_KTLS;
    SSL_CTX_set_options(ctx, opts);
    /* kTLS RX is skipped when OpenSSL holds a partly read record, so with
     * kTLS OpenSSL reads each record's header and body separately. Without
     * it, read ahead: one read(2) takes every record that has arrived. */
    SSL_CTX_set_read_ahead(ctx, !ktls);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase_cb);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);
    if (loglevel >= 2)
        SSL_CTX_set_info_callback(ctx, info_cb);
    if (loglevel >= 3)
        SSL_CTX_set_msg_callback(ctx, msg_cb);
    return 0;
}

/* PATH in single quotes for a POSIX shell ("'" becomes '\''). */
static void shell_quote(const char *path, char *out, size_t len)
{
    size_t o = 0;
    if (len < 3) {
        if (len)
            out[0] = '\0';
        return;
    }
    out[o++] = '\'';
    for (const char *p = path; *p && o + 5 < len; p++) {
        if (*p == '\'') {
            memcpy(out + o, "'\\''", 4);
            o += 4;
        } else {
            out[o++] = *p;
        }
    }
    out[o++] = '\'';
    out[o] = '\0';
}

/* A shell command that removes KEY's passphrase (asking for it once) and
 * keeps the file's certificates when the key shares a file with them. It
 * writes a new file and then moves it over the old one: `openssl pkey -in F
 * -out F` truncates F before reading it and leaves it empty. */
static void decrypt_command(const char *cert, const char *key, char *out, size_t len)
{
    char k[1100], n[1100], tmp[1040];
    snprintf(tmp, sizeof(tmp), "%s.new", key);
    shell_quote(key, k, sizeof(k));
    shell_quote(tmp, n, sizeof(n));
    if (strcmp(cert, key) == 0)
        snprintf(out, len, "(umask 077 && { sed -n '/-BEGIN CERTIFICATE-/,/-END CERTIFICATE-/p' %s && "
                 "openssl pkey -in %s; } > %s) && mv %s %s", k, k, n, n, k);
    else
        snprintf(out, len, "(umask 077 && openssl pkey -in %s -out %s) && mv %s %s", k, n, n, k);
}

static int load_cert_and_key(SSL_CTX *ctx, const char *cert, const char *key, char *err, size_t errlen)
{
    char what[512];
    int asked = 0;
    FILE *fp;

    if (empty(key))
        key = cert;
    if (access(cert, R_OK) < 0) {
        int e = errno;
        kt_set_err(err, errlen, "cannot load certificate chain from %s: %s", cert, strerror(e));
        return -e;
    }
    if (!SSL_CTX_use_certificate_chain_file(ctx, cert)) {
        snprintf(what, sizeof(what), "cannot load certificate chain from %s", cert);
        set_ssl_err(err, errlen, what);
        return -EINVAL;
    }
    if (!(fp = fopen(key, "re"))) {
        int e = errno;
        kt_set_err(err, errlen, "cannot load private key from %s: %s", key, strerror(e));
        return -e;
    }
    /* PEM_read skips the certificate blocks of a combined cert+key file. */
    EVP_PKEY *pkey = PEM_read_PrivateKey(fp, NULL, no_passphrase_cb, &asked);
    fclose(fp);
    if (!pkey && asked) {
        char cmd[8192];
        decrypt_command(cert, key, cmd, sizeof(cmd));
        kt_set_err(err, errlen, "cannot load private key from %s: the key is passphrase-protected "
                "(encrypted); ktrelay cannot prompt for a passphrase - remove the passphrase with: %s",
                key, cmd);
        ERR_clear_error();
        return -EINVAL;
    }
    if (!pkey) {
        snprintf(what, sizeof(what), "cannot load private key from %s: no usable PEM private key", key);
        set_ssl_err(err, errlen, what);
        return -EINVAL;
    }
    /* A key of another type lands in another slot and then has no certificate,
     * so the check below catches type mismatches as well as wrong keys. */
    int ok = SSL_CTX_use_PrivateKey(ctx, pkey) && SSL_CTX_check_private_key(ctx);
    EVP_PKEY_free(pkey);
    if (!ok) {
        snprintf(what, sizeof(what), "private key in %s does not match the certificate in %s", key, cert);
        set_ssl_err(err, errlen, what);
        return -EINVAL;
    }
    return 0;
}

/* A certificate file without its chain gets one at every handshake: OpenSSL
 * builds it from the CA store with a full X509_verify_cert ("auto chain").
 * Build it here once instead, for each certificate slot (RSA, ECDSA), as far
 * as the store allows and with the same certificates the handshake would
 * send (the root too, when the store has it). A slot whose chain cannot be
 * built here keeps OpenSSL's per-handshake building, and its errors. */
static void build_chains_once(SSL_CTX *ctx)
{
    for (int r = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_FIRST); r == 1;
         r = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_NEXT)) {
        STACK_OF(X509) *chain = NULL;
        if (!SSL_CTX_get0_chain_certs(ctx, &chain) || chain)
            continue;    /* the file had its chain: OpenSSL sends that one as it is */
        if (SSL_CTX_build_cert_chain(ctx, SSL_BUILD_CHAIN_FLAG_UNTRUSTED | SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR
                                          | SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR) <= 0)
            ERR_clear_error();
    }
    ERR_clear_error();
}

/* ask_ccert asks, it does not require: any certificate is accepted here and
 * its verification result stays available through SSL_get_verify_result. */
static int accept_any_cert_cb(int ok, X509_STORE_CTX *store)
{
    return 1;
}

static int setup_server(SSL_CTX *ctx, const struct kt_tls_server_params *p, char *err, size_t errlen)
{
    int rc;

    if (empty(p->cert_file) && empty(p->eccert_file)) {
        kt_set_err(err, errlen, "no server certificate configured (smtpd_tls_cert_file or smtpd_tls_eccert_file)");
        return -EINVAL;
    }
    if (p->session_cache_timeout < 0) {
        kt_set_err(err, errlen, "invalid TLS session cache timeout %ld", p->session_cache_timeout);
        return -EINVAL;
    }
    rc = setup_common(ctx, p->protocols, p->ciphers, p->high_cipherlist, p->medium_cipherlist,
                      p->low_cipherlist, p->exclude_ciphers, p->loglevel, p->ktls, err, errlen);
    if (rc < 0)
        return rc;
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);

    /* Dual RSA + ECDSA: each pair fills its own slot, OpenSSL picks per client. */
    if (!empty(p->cert_file) && (rc = load_cert_and_key(ctx, p->cert_file, p->key_file, err, errlen)) < 0)
        return rc;
    if (!empty(p->eccert_file) && (rc = load_cert_and_key(ctx, p->eccert_file, p->eckey_file, err, errlen)) < 0)
        return rc;

    if (!empty(p->CAfile) || !empty(p->CApath)) {
        if (!SSL_CTX_load_verify_locations(ctx, empty(p->CAfile) ? NULL : p->CAfile,
                                           empty(p->CApath) ? NULL : p->CApath)) {
            set_ssl_err(err, errlen, "cannot load CA certificates (smtpd_tls_CAfile/CApath)");
            return -EINVAL;
        }
    }
    build_chains_once(ctx);
    if (p->ask_ccert) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_CLIENT_ONCE, accept_any_cert_cb);
        SSL_CTX_set_verify_depth(ctx, CCERT_VERIFY_DEPTH);
        /* As in Postfix, the CA names go to clients only when we ask. */
        if (!empty(p->CAfile)) {
            STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(p->CAfile);
            if (!names) {
                set_ssl_err(err, errlen, "cannot load client CA names from smtpd_tls_CAfile");
                return -EINVAL;
            }
            SSL_CTX_set_client_CA_list(ctx, names);
        }
    }

    /* Required for resumption whenever client certificates are requested. */
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)SESSION_ID_CTX, sizeof(SESSION_ID_CTX) - 1);
    /* Postfix shares sessions between smtpd processes through
     * smtpd_tls_session_cache_database; ktrelay's workers are threads of one
     * process, so the context's internal cache (locked by OpenSSL) and its
     * per-context ticket keys already serve every worker, and that parameter
     * is accepted but not needed. */
    if (p->session_cache_timeout > 0) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_set_timeout(ctx, p->session_cache_timeout);
        /* Postfix's tls_server.c: one TLS 1.3 ticket per full handshake
         * (OpenSSL's default is two; an MTA keeps one per destination, and
         * each costs an encrypted session and a record). */
        SSL_CTX_set_num_tickets(ctx, 1);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(ctx, 0);
    }
    return 0;
}

int kt_tls_server_new(const struct kt_tls_server_params *p, struct kt_tls_server **out,
                      char *err, size_t errlen)
{
    SSL_CTX *ctx;
    int rc;

    *out = NULL;
    if (!(ctx = SSL_CTX_new(TLS_server_method()))) {
        set_ssl_err(err, errlen, "cannot create TLS server context");
        return -ENOMEM;
    }
    if ((rc = setup_server(ctx, p, err, errlen)) < 0) {
        SSL_CTX_free(ctx);
        return rc;
    }
    *out = kt_calloc(1, sizeof(**out));
    (*out)->ctx = ctx;
    return 0;
}

void kt_tls_server_free(struct kt_tls_server *s)
{
    if (!s)
        return;
    SSL_CTX_free(s->ctx);
    kt_free(s);
}

SSL_CTX *kt_tls_server_ctx(const struct kt_tls_server *s)
{
    return s ? s->ctx : NULL;
}

int kt_tls_client_ctx_new(const struct kt_tls_client_params *p, SSL_CTX **out, char *err, size_t errlen)
{
    SSL_CTX *ctx;
    int rc;

    *out = NULL;
    if (!(ctx = SSL_CTX_new(TLS_client_method()))) {
        set_ssl_err(err, errlen, "cannot create TLS client context");
        return -ENOMEM;
    }
    rc = setup_common(ctx, p->protocols, p->ciphers, p->high_cipherlist, p->medium_cipherlist,
                      p->low_cipherlist, p->exclude_ciphers, p->loglevel, p->ktls, err, errlen);
    if (rc == 0 && (!empty(p->CAfile) || !empty(p->CApath))
        && !SSL_CTX_load_verify_locations(ctx, empty(p->CAfile) ? NULL : p->CAfile,
                                          empty(p->CApath) ? NULL : p->CApath)) {
        set_ssl_err(err, errlen, "cannot load CA certificates (smtp_tls_CAfile/CApath)");
        rc = -EINVAL;
    }
    if (rc < 0) {
        SSL_CTX_free(ctx);
        return rc;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    /* DANE stays off on each SSL until kt_dane_arm turns it on for a host with TLSA records */
    if (kt_dane_ctx_enable(ctx) < 0) {
        set_ssl_err(err, errlen, "cannot enable DANE on the TLS client context");
        SSL_CTX_free(ctx);
        return -ENOMEM;
    }
    *out = ctx;
    return 0;
}

void kt_tls_describe(SSL *ssl, char *buf, size_t len)
{
    const SSL_CIPHER *c = ssl ? SSL_get_current_cipher(ssl) : NULL;
    int alg_bits = 0, bits;

    if (!len)
        return;
    if (!c) {
        snprintf(buf, len, "no TLS session");
        return;
    }
    bits = SSL_CIPHER_get_bits(c, &alg_bits);
    snprintf(buf, len, "%s with cipher %s (%d/%d bits)", SSL_get_version(ssl),
             SSL_CIPHER_get_name(c), bits, alg_bits);
}

/* ---- self-signed certificate ---- */

static int valid_hostname(const char *h)
{
    size_t n = strlen(h);

    if (n == 0 || n > 253 || h[0] == '.' || h[0] == '-')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)h[i]) && h[i] != '.' && h[i] != '-')
            return 0;
    return 1;
}

static int add_ext(X509 *x, int nid, const char *value)
{
    X509V3_CTX v3;
    X509_EXTENSION *ext;

    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    if (!(ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value)))
        return 0;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok;
}

static X509 *make_cert(EVP_PKEY *pkey, const char *hostname)
{
    X509 *x = X509_new();
    BIGNUM *serial = BN_new();
    char *san = strcmp(hostname, "localhost") == 0 ? kt_strdup("DNS:localhost")
                                                   : kt_asprintf("DNS:%s,DNS:localhost", hostname);
    X509_NAME *name = NULL;
    /* 128 random bits, top bit clear: a positive serial of at most 16 bytes. */
    int ok = x && serial && BN_rand(serial, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY)
          && BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x))
          && X509_set_version(x, X509_VERSION_3)
          && X509_gmtime_adj(X509_getm_notBefore(x), 0)
          && X509_time_adj_ex(X509_getm_notAfter(x), 3653, 0, NULL)
          && (name = X509_get_subject_name(x))
          && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)hostname, -1, -1, 0)
          && X509_set_issuer_name(x, name)
          && X509_set_pubkey(x, pkey)
          && add_ext(x, NID_basic_constraints, "critical,CA:FALSE")
          && add_ext(x, NID_key_usage, "critical,digitalSignature")
          && add_ext(x, NID_ext_key_usage, "serverAuth")
          && add_ext(x, NID_subject_key_identifier, "hash")
          && add_ext(x, NID_subject_alt_name, san)
          && X509_sign(x, pkey, EVP_sha256()) > 0;
    kt_free(san);
    BN_free(serial);
    if (!ok) {
        X509_free(x);
        return NULL;
    }
    return x;
}

/* Writes into a fresh temporary next to path (mkstemp creates it 0600, so
 * the key is never readable by others, not even briefly). */
static int write_pem_tmp(const char *path, mode_t mode, X509 *x, EVP_PKEY *pkey, char **tmp_out)
{
    char *tmp = kt_asprintf("%s.tmpXXXXXX", path);
    int fd = mkstemp(tmp), rc = 0;
    FILE *fp;

    *tmp_out = NULL;
    if (fd < 0) {
        rc = -errno;
        kt_free(tmp);
        return rc;
    }
    if (fchmod(fd, mode) < 0 || !(fp = fdopen(fd, "w"))) {
        rc = -errno;
        close(fd);
        unlink(tmp);
        kt_free(tmp);
        return rc;
    }
    int ok = x ? PEM_write_X509(fp, x) : PEM_write_PrivateKey(fp, pkey, NULL, NULL, 0, NULL, NULL);
    if (!ok)
        rc = -EIO;
    else if (fflush(fp) != 0 || fsync(fileno(fp)) < 0)
        rc = -errno;
    if (fclose(fp) != 0 && rc == 0)
        rc = -errno;
    if (rc < 0) {
        unlink(tmp);
        kt_free(tmp);
        return rc;
    }
    *tmp_out = tmp;
    return 0;
}

int kt_tls_make_self_signed(const char *cert_path, const char *key_path, const char *hostname,
                            char *err, size_t errlen)
{
    EVP_PKEY *pkey = NULL;
    X509 *x = NULL;
    char *key_tmp = NULL, *cert_tmp = NULL;
    int rc = 0;

    if (!hostname || !valid_hostname(hostname)) {
        kt_set_err(err, errlen, "invalid hostname \"%s\" for a self-signed certificate", hostname ? hostname : "");
        return -EINVAL;
    }
    if (!(pkey = EVP_EC_gen("P-256")) || !(x = make_cert(pkey, hostname))) {
        set_ssl_err(err, errlen, "cannot generate self-signed certificate");
        rc = -EIO;
        goto out;
    }
    if ((rc = write_pem_tmp(key_path, 0600, NULL, pkey, &key_tmp)) < 0) {
        kt_set_err(err, errlen, "cannot write private key %s: %s", key_path, strerror(-rc));
        goto out;
    }
    if ((rc = write_pem_tmp(cert_path, 0644, x, NULL, &cert_tmp)) < 0) {
        kt_set_err(err, errlen, "cannot write certificate %s: %s", cert_path, strerror(-rc));
        goto out;
    }
    if (rename(key_tmp, key_path) < 0) {
        rc = -errno;
        kt_set_err(err, errlen, "cannot rename %s to %s: %s", key_tmp, key_path, strerror(-rc));
        goto out;
    }
    kt_free(key_tmp);
    key_tmp = NULL;
    if (rename(cert_tmp, cert_path) < 0) {
        rc = -errno;
        kt_set_err(err, errlen, "cannot rename %s to %s: %s", cert_tmp, cert_path, strerror(-rc));
    }
out:
    if (key_tmp)
        unlink(key_tmp);
    if (cert_tmp && rc < 0)
        unlink(cert_tmp);
    kt_free(key_tmp);
    kt_free(cert_tmp);
    X509_free(x);
    EVP_PKEY_free(pkey);
    return rc;
}

static void hex_pairs(const unsigned char *md, unsigned n, char out[KT_TLS_FP_MAX])
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    for (unsigned i = 0; i < n && o + 3 < KT_TLS_FP_MAX; i++) {
        if (i)
            out[o++] = ':';
        out[o++] = hex[md[i] >> 4];
        out[o++] = hex[md[i] & 15];
    }
    out[o] = '\0';
}

enum kt_ccert kt_tls_peer_cert(SSL *ssl, const char *digest, char fp[KT_TLS_FP_MAX], char pkey_fp[KT_TLS_FP_MAX])
{
    X509 *cert = SSL_get0_peer_certificate(ssl);
    const EVP_MD *md = EVP_get_digestbyname(digest && *digest ? digest : "sha256");
    unsigned char buf[EVP_MAX_MD_SIZE];
    unsigned n = 0;

    fp[0] = pkey_fp[0] = '\0';
    if (!cert)
        return KT_CCERT_NONE;
    if (md && X509_digest(cert, md, buf, &n) == 1)
        hex_pairs(buf, n, fp);
    /* Postfix's pkey_fingerprint: the digest of the DER SubjectPublicKeyInfo */
    unsigned char *der = NULL;
    int len = i2d_PUBKEY(X509_get0_pubkey(cert), &der);
    if (md && len > 0 && EVP_Digest(der, (size_t)len, buf, &n, md, NULL) == 1)
        hex_pairs(buf, n, pkey_fp);
    OPENSSL_free(der);
    /* ask_ccert accepts any certificate in the handshake (accept_any_cert_cb); the chain's real
     * verdict is kept by OpenSSL */
    return SSL_get_verify_result(ssl) == X509_V_OK ? KT_CCERT_TRUSTED : KT_CCERT_UNTRUSTED;
}

enum kt_ccert kt_tls_peer_trust(SSL *ssl)
{
    if (!SSL_get0_peer_certificate(ssl))
        return KT_CCERT_NONE;
    return SSL_get_verify_result(ssl) == X509_V_OK ? KT_CCERT_TRUSTED : KT_CCERT_UNTRUSTED;
}

const char *kt_tls_ccert_str(enum kt_ccert c)
{
    return c == KT_CCERT_TRUSTED ? "Trusted" : c == KT_CCERT_UNTRUSTED ? "Untrusted" : "Anonymous";
}
