/* Unit tests for tls.c: protocol/cipher parameter parsing, server contexts
 * from real certificates made at run time (CA -> intermediate -> RSA and
 * ECDSA leaves), and real handshakes between a client and a server SSL over
 * a socketpair: versions, cipher grades, dual certificates, resumption
 * across threads, refused old protocols, self-signed generation. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "core/alloc.h"
#include "tls/ktls.h"
#include "tls/tls.h"

static char dir[64];
static char root_pem[128], rsa_chain[128], rsa_key[128], ec_chain[128], ec_key[128],
            combined[128], other_key[128], enc_key[128], ec_leaf[128], ca_bundle[128];

/* ---- certificate fixtures ---- */

static void add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    assert_non_null(ext);
    assert_int_equal(X509_add_ext(x, ext, -1), 1);
    X509_EXTENSION_free(ext);
}

static X509 *make_cert(EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *issuer_key, int ca)
{
    static long serial = 1;
    X509 *x = X509_new();
    assert_non_null(x);
    X509_set_version(x, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, X509_get_subject_name(issuer ? issuer : x));
    X509_set_pubkey(x, key);
    if (ca) {
        add_ext(x, issuer ? issuer : x, NID_basic_constraints, "critical,CA:TRUE");
        add_ext(x, issuer ? issuer : x, NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
        char san[128];
        snprintf(san, sizeof(san), "DNS:%s", cn);
        add_ext(x, issuer, NID_basic_constraints, "critical,CA:FALSE");
        add_ext(x, issuer, NID_subject_alt_name, san);
        add_ext(x, issuer, NID_ext_key_usage, "serverAuth,clientAuth");
    }
    assert_true(X509_sign(x, issuer_key ? issuer_key : key, EVP_sha256()) > 0);
    return x;
}

static void write_pem(const char *path, const char *mode, X509 *a, X509 *b, EVP_PKEY *key, const char *pass)
{
    FILE *fp = fopen(path, mode);
    assert_non_null(fp);
    if (a)
        assert_int_equal(PEM_write_X509(fp, a), 1);
    if (b)
        assert_int_equal(PEM_write_X509(fp, b), 1);
    if (key)
        assert_int_equal(PEM_write_PrivateKey(fp, key, pass ? EVP_aes_256_cbc() : NULL,
                                              (const unsigned char *)pass, pass ? (int)strlen(pass) : 0,
                                              NULL, NULL), 1);
    assert_int_equal(fclose(fp), 0);
}

static int group_setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/kt-tls-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(root_pem, sizeof(root_pem), "%s/root.pem", dir);
    snprintf(rsa_chain, sizeof(rsa_chain), "%s/rsa-chain.pem", dir);
    snprintf(rsa_key, sizeof(rsa_key), "%s/rsa-key.pem", dir);
    snprintf(ec_chain, sizeof(ec_chain), "%s/ec-chain.pem", dir);
    snprintf(ec_key, sizeof(ec_key), "%s/ec-key.pem", dir);
    snprintf(combined, sizeof(combined), "%s/combined.pem", dir);
    snprintf(other_key, sizeof(other_key), "%s/other-key.pem", dir);
    snprintf(enc_key, sizeof(enc_key), "%s/enc-key.pem", dir);
    snprintf(ec_leaf, sizeof(ec_leaf), "%s/ec-leaf.pem", dir);
    snprintf(ca_bundle, sizeof(ca_bundle), "%s/ca-bundle.pem", dir);

    EVP_PKEY *root_k = EVP_EC_gen("P-256"), *inter_k = EVP_EC_gen("P-256");
    EVP_PKEY *rsa_k = EVP_RSA_gen(2048), *ec_k = EVP_EC_gen("P-256"), *other_k = EVP_EC_gen("P-256");
    if (!root_k || !inter_k || !rsa_k || !ec_k || !other_k)
        return -1;
    X509 *root = make_cert(root_k, "Test Root", NULL, NULL, 1);
    X509 *inter = make_cert(inter_k, "Test Intermediate", root, root_k, 1);
    X509 *rsa = make_cert(rsa_k, "mx.example.test", inter, inter_k, 0);
    X509 *ec = make_cert(ec_k, "mx.example.test", inter, inter_k, 0);

    write_pem(root_pem, "w", root, NULL, NULL, NULL);
    write_pem(rsa_chain, "w", rsa, inter, NULL, NULL);
    write_pem(rsa_key, "w", NULL, NULL, rsa_k, NULL);
    write_pem(ec_chain, "w", ec, inter, NULL, NULL);
    write_pem(ec_key, "w", NULL, NULL, ec_k, NULL);
    write_pem(combined, "w", ec, inter, ec_k, NULL);
    write_pem(other_key, "w", NULL, NULL, other_k, NULL);
    write_pem(enc_key, "w", NULL, NULL, ec_k, "secret");
    write_pem(ec_leaf, "w", ec, NULL, NULL, NULL);
    write_pem(ca_bundle, "w", inter, root, NULL, NULL);

    X509_free(root); X509_free(inter); X509_free(rsa); X509_free(ec);
    EVP_PKEY_free(root_k); EVP_PKEY_free(inter_k); EVP_PKEY_free(rsa_k);
    EVP_PKEY_free(ec_k); EVP_PKEY_free(other_k);
    return 0;
}

static int group_teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static struct kt_tls_server_params base_params(void)
{
    struct kt_tls_server_params p = {
        .cert_file = rsa_chain, .key_file = rsa_key, .eccert_file = ec_chain, .eckey_file = ec_key,
        .protocols = ">=TLSv1.2", .ciphers = "medium", .session_cache_timeout = 3600, .ktls = 1,
    };
    return p;
}

static struct kt_tls_server *server_ok(const struct kt_tls_server_params *p)
{
    struct kt_tls_server *s = NULL;
    char err[512] = "";
    int rc = kt_tls_server_new(p, &s, err, sizeof(err));
    if (rc != 0)
        fail_msg("kt_tls_server_new: %d %s", rc, err);
    assert_non_null(kt_tls_server_ctx(s));
    return s;
}

/* Verifying against the root proves the server sent its intermediate too. */
static SSL_CTX *client_ctx(const char *protocols)
{
    struct kt_tls_client_params cp = { .CAfile = root_pem, .protocols = protocols, .ciphers = "high" };
    SSL_CTX *c = NULL;
    char err[256] = "";
    if (kt_tls_client_ctx_new(&cp, &c, err, sizeof(err)) != 0)
        fail_msg("kt_tls_client_ctx_new: %s", err);
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER, NULL);
    return c;
}

/* ---- in-memory handshake over a non-blocking socketpair ---- */

struct conn {
    SSL *c, *s;
    int fds[2];
    int ok;
    unsigned long server_err;     /* first OpenSSL error the server hit */
};

static int step(SSL *ssl, int (*fn)(SSL *), int *done, unsigned long *errcode)
{
    if (*done)
        return 0;
    ERR_clear_error();
    int r = fn(ssl);
    if (r == 1) {
        *done = 1;
        return 0;
    }
    int e = SSL_get_error(ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (errcode)
        *errcode = ERR_peek_error();
    return -1;
}

static void conn_open(struct conn *k, SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION *sess)
{
    memset(k, 0, sizeof(*k));
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, k->fds), 0);
    k->c = SSL_new(cctx);
    k->s = SSL_new(sctx);
    assert_non_null(k->c);
    assert_non_null(k->s);
    SSL_set_fd(k->c, k->fds[0]);
    SSL_set_fd(k->s, k->fds[1]);
    SSL_set_tlsext_host_name(k->c, "mx.example.test");
    if (sess)
        SSL_set_session(k->c, sess);

    int cdone = 0, sdone = 0, cfail = 0, sfail = 0;
    for (int i = 0; i < 1000 && !(cdone && sdone) && !(cfail && sfail); i++) {
        if (!cfail && step(k->c, SSL_connect, &cdone, NULL) < 0)
            cfail = 1;
        if (!sfail && step(k->s, SSL_accept, &sdone, &k->server_err) < 0)
            sfail = 1;
        if ((cfail || sfail) && i > 20)
            break;
    }
    k->ok = cdone && sdone;
    ERR_clear_error();
}

/* One application record server -> client; the client reads any TLS 1.3
 * session tickets on the way, so its session becomes resumable. */
static void conn_greet(struct conn *k)
{
    char buf[64];
    int n = -1;
    assert_int_equal(SSL_write(k->s, "220 ready\r\n", 11), 11);
    for (int i = 0; i < 100 && n <= 0; i++)
        n = SSL_read(k->c, buf, sizeof(buf));
    assert_int_equal(n, 11);
    assert_memory_equal(buf, "220 ready\r\n", 11);
}

/* A session freed without close_notify is dropped from the caches (OpenSSL
 * treats it as possibly bad), so end connections the way SMTP QUIT does. */
static void conn_close(struct conn *k)
{
    if (k->ok) {
        SSL_shutdown(k->c);
        SSL_shutdown(k->s);
    }
    SSL_free(k->c);
    SSL_free(k->s);
    close(k->fds[0]);
    close(k->fds[1]);
}

/* ---- protocol parsing ---- */

static void check_proto(const char *spec, int min_v, int max_v, long mask)
{
    int lo = -1, hi = -1;
    long m = -1;
    char err[128] = "";
    if (kt_tls_parse_protocols(spec, &lo, &hi, &m, err, sizeof(err)) != 0)
        fail_msg("\"%s\": %s", spec, err);
    if (lo != min_v || hi != max_v || m != mask)
        fail_msg("\"%s\": got min %#x max %#x mask %#lx", spec, lo, hi, m);
}

static void test_protocols_ok(void **state)
{
    check_proto("", 0, 0, 0);
    check_proto(NULL, 0, 0, 0);
    check_proto(">=TLSv1.2", TLS1_2_VERSION, 0, 0);
    check_proto(">=TLSv1", TLS1_VERSION, 0, 0);
    check_proto("<=TLSv1.3", 0, TLS1_3_VERSION, 0);
    check_proto(">=TLSv1.2 <=TLSv1.2", TLS1_2_VERSION, TLS1_2_VERSION, 0);
    check_proto(">=0x0303", TLS1_2_VERSION, 0, 0);
    check_proto(">=303", TLS1_2_VERSION, 0, 0);
    check_proto("TLSv1.2 TLSv1.3", TLS1_2_VERSION, 0, 0);
    check_proto("tlsv1.2:TLSv1.3", TLS1_2_VERSION, 0, 0);
    check_proto("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1", TLS1_2_VERSION, 0, 0);
    check_proto("!SSLv2,!SSLv3", TLS1_VERSION, 0, 0);
    check_proto("!TLSv1.3", 0, TLS1_2_VERSION, 0);
    /* a hole inside the range needs an SSL_OP_NO_* bit */
    check_proto("TLSv1 TLSv1.2", TLS1_VERSION, TLS1_2_VERSION, SSL_OP_NO_TLSv1_1);
    check_proto("!SSLv3 !TLSv1.2", TLS1_VERSION, 0, SSL_OP_NO_TLSv1_2);
    check_proto(">=TLSv1.2 !TLSv1.3", TLS1_2_VERSION, TLS1_2_VERSION, 0);
}

static void check_proto_bad(const char *spec, const char *needle)
{
    int lo, hi;
    long m;
    char err[128] = "";
    if (kt_tls_parse_protocols(spec, &lo, &hi, &m, err, sizeof(err)) != -EINVAL)
        fail_msg("\"%s\" accepted", spec);
    if (!strstr(err, needle))
        fail_msg("\"%s\": message \"%s\" lacks \"%s\"", spec, err, needle);
}

static void test_protocols_bad(void **state)
{
    check_proto_bad("TLSv9", "unknown TLS protocol \"TLSv9\"");
    check_proto_bad("!TLSv1.4", "unknown");
    check_proto_bad(">=", "unknown TLS protocol version");
    check_proto_bad(">=0x0305", "unknown TLS protocol version");
    check_proto_bad(">= TLSv1.2", "unknown");
    check_proto_bad("!TLSv1 !TLSv1.1 !TLSv1.2 !TLSv1.3", "no usable TLS version");
    check_proto_bad(">=TLSv1.3 <=TLSv1.2", "no usable TLS version");
    check_proto_bad("SSLv3", "no usable TLS version");
}

/* ---- cipher lists ---- */

static void test_cipherlist(void **state)
{
    char *list = NULL, err[128] = "";

    assert_int_equal(kt_tls_cipherlist("high", NULL, NULL, NULL, NULL, &list, err, sizeof(err)), 0);
    assert_string_equal(list, "aNULL:-aNULL:HIGH:@STRENGTH");
    kt_free(list);
    assert_int_equal(kt_tls_cipherlist(NULL, NULL, NULL, NULL, "", &list, err, sizeof(err)), 0);
    assert_string_equal(list, "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH");
    kt_free(list);
    assert_int_equal(kt_tls_cipherlist("Medium", "H", "M", "L", "aNULL, RC4:3DES", &list, err, sizeof(err)), 0);
    assert_string_equal(list, "M:!aNULL:!RC4:!3DES");
    kt_free(list);
    assert_int_equal(kt_tls_cipherlist("low", "H", "M", "L", NULL, &list, err, sizeof(err)), 0);
    assert_string_equal(list, "L");
    kt_free(list);

    assert_int_equal(kt_tls_cipherlist("export", NULL, NULL, NULL, NULL, &list, err, sizeof(err)), -EINVAL);
    assert_null(list);
    assert_non_null(strstr(err, "invalid cipher grade \"export\""));
    assert_int_equal(kt_tls_cipherlist("high", NULL, NULL, NULL, "!RC4", &list, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "!RC4"));
}

/* With Postfix's default lists nothing weak may be offered for TLS <= 1.2. */
static void test_default_lists_not_weak(void **state)
{
    static const char *const grades[] = { "high", "medium" };
    for (size_t g = 0; g < 2; g++) {
        struct kt_tls_server_params p = base_params();
        p.ciphers = grades[g];
        struct kt_tls_server *s = server_ok(&p);
        STACK_OF(SSL_CIPHER) *sk = SSL_CTX_get_ciphers(kt_tls_server_ctx(s));
        assert_true(sk_SSL_CIPHER_num(sk) > 10);
        for (int i = 0; i < sk_SSL_CIPHER_num(sk); i++) {
            const SSL_CIPHER *c = sk_SSL_CIPHER_value(sk, i);
            const char *name = SSL_CIPHER_get_name(c);
            if (SSL_CIPHER_get_cipher_nid(c) == NID_undef || SSL_CIPHER_get_auth_nid(c) == NID_auth_null
                || SSL_CIPHER_get_bits(c, NULL) < 128 || SSL_CIPHER_get_digest_nid(c) == NID_md5
                || strstr(name, "RC4") || strstr(name, "DES") || strstr(name, "EXP") || strstr(name, "NULL"))
                fail_msg("grade %s offers weak cipher %s", grades[g], name);
        }
        assert_int_equal(SSL_CTX_get_min_proto_version(kt_tls_server_ctx(s)), TLS1_2_VERSION);
        kt_tls_server_free(s);
    }
}

/* ---- contexts ---- */

static void test_ctx_options(void **state)
{
    struct kt_tls_server_params p = base_params();
    p.ask_ccert = 1;
    p.CAfile = root_pem;
    struct kt_tls_server *s = server_ok(&p);
    SSL_CTX *ctx = kt_tls_server_ctx(s);
    uint64_t o = SSL_CTX_get_options(ctx);
    char why[256];
    int kernel_tls = kt_ktls_probe(why, sizeof(why));

    /* kTLS is asked for only where the kernel has it; without it OpenSSL reads ahead */
    assert_int_equal((o & SSL_OP_ENABLE_KTLS) != 0, kernel_tls);
    assert_int_equal(SSL_CTX_get_read_ahead(ctx), !kernel_tls);
    assert_true(o & SSL_OP_NO_COMPRESSION);
    assert_true(o & SSL_OP_NO_RENEGOTIATION);
    assert_true(o & SSL_OP_CIPHER_SERVER_PREFERENCE);
    assert_false(o & SSL_OP_NO_TICKET);
    assert_int_equal(SSL_CTX_get_num_tickets(ctx), 1);
    assert_true(SSL_CTX_get_mode(ctx) & SSL_MODE_RELEASE_BUFFERS);
    assert_int_equal(SSL_CTX_get_session_cache_mode(ctx), SSL_SESS_CACHE_SERVER);
    assert_int_equal(SSL_CTX_get_timeout(ctx), 3600);
    assert_true(SSL_CTX_get_verify_mode(ctx) & SSL_VERIFY_PEER);
    assert_false(SSL_CTX_get_verify_mode(ctx) & SSL_VERIFY_FAIL_IF_NO_PEER_CERT);
    assert_int_equal(sk_X509_NAME_num(SSL_CTX_get_client_CA_list(ctx)), 1);
    kt_tls_server_free(s);

    p = base_params();
    p.ktls = 0;
    p.session_cache_timeout = 0;
    s = server_ok(&p);
    ctx = kt_tls_server_ctx(s);
    o = SSL_CTX_get_options(ctx);
    assert_false(o & SSL_OP_ENABLE_KTLS);
    assert_int_equal(SSL_CTX_get_read_ahead(ctx), 1);
    assert_true(o & SSL_OP_NO_TICKET);
    assert_int_equal(SSL_CTX_get_num_tickets(ctx), 0);
    assert_int_equal(SSL_CTX_get_session_cache_mode(ctx), SSL_SESS_CACHE_OFF);
    assert_int_equal(SSL_CTX_get_verify_mode(ctx), SSL_VERIFY_NONE);
    kt_tls_server_free(s);
    kt_tls_server_free(NULL);
}

static int server_err(const struct kt_tls_server_params *p, char *err, size_t len)
{
    struct kt_tls_server *s = (struct kt_tls_server *)1;
    int rc = kt_tls_server_new(p, &s, err, len);
    assert_null(s);
    return rc;
}

static void test_ctx_errors(void **state)
{
    char err[512];
    struct kt_tls_server_params p = base_params();

    p.key_file = other_key;         /* right type, wrong key */
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "does not match the certificate"));
    assert_non_null(strstr(err, other_key));

    p = base_params();
    p.key_file = ec_key;            /* ECDSA key for the RSA certificate */
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "does not match"));

    p = base_params();
    p.eckey_file = enc_key;
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    char want[512];
    snprintf(want, sizeof(want), "cannot load private key from %s: the key is passphrase-protected "
             "(encrypted); ktrelay cannot prompt for a passphrase", enc_key);
    if (strncmp(err, want, strlen(want)) != 0)
        fail_msg("got: %s", err);
    assert_non_null(strstr(err, "openssl pkey -in"));

    p = base_params();
    p.cert_file = "/nonexistent/cert.pem";
    assert_int_equal(server_err(&p, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "/nonexistent/cert.pem"));

    p = base_params();
    p.key_file = root_pem;          /* a PEM file without a key */
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "no usable PEM private key"));

    p = base_params();
    p.cert_file = p.eccert_file = NULL;
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "no server certificate"));

    p = base_params();
    p.protocols = "TLSv2";
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    p = base_params();
    p.ciphers = "strong";
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    p = base_params();
    p.exclude_ciphers = "+RC4";
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    p = base_params();
    p.ciphers = "high";
    p.high_cipherlist = "NOSUCHCIPHER";
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
    p = base_params();
    p.CAfile = "/nonexistent/ca.pem";
    assert_int_equal(server_err(&p, err, sizeof(err)), -EINVAL);
}

static int peer_key_type(SSL *c)
{
    X509 *x = SSL_get1_peer_certificate(c);
    assert_non_null(x);
    int id = EVP_PKEY_get_base_id(X509_get0_pubkey(x));
    X509_free(x);
    return id;
}

/* RSA only, ECDSA only (cert+key in one file), both; each verified by the client. */
static void test_certificate_variants(void **state)
{
    struct { const char *cert, *key, *eccert, *eckey, *client_sigalgs; int want; } v[] = {
        { rsa_chain, rsa_key, NULL, NULL, NULL, EVP_PKEY_RSA },
        { NULL, NULL, combined, NULL, NULL, EVP_PKEY_EC },
        { combined, NULL, NULL, NULL, NULL, EVP_PKEY_EC },
        { rsa_chain, rsa_key, ec_chain, ec_key, "ECDSA+SHA256", EVP_PKEY_EC },
        { rsa_chain, rsa_key, ec_chain, ec_key, "RSA-PSS+SHA256:RSA+SHA256", EVP_PKEY_RSA },
    };
    SSL_CTX *cctx = client_ctx(NULL);
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        struct kt_tls_server_params p = base_params();
        p.cert_file = v[i].cert;
        p.key_file = v[i].key;
        p.eccert_file = v[i].eccert;
        p.eckey_file = v[i].eckey;
        struct kt_tls_server *s = server_ok(&p);
        if (v[i].client_sigalgs)
            assert_int_equal(SSL_CTX_set1_sigalgs_list(cctx, v[i].client_sigalgs), 1);
        struct conn k;
        conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
        if (!k.ok)
            fail_msg("variant %zu: handshake failed", i);
        assert_int_equal(SSL_get_verify_result(k.c), X509_V_OK);
        assert_int_equal(peer_key_type(k.c), v[i].want);
        conn_greet(&k);
        conn_close(&k);
        kt_tls_server_free(s);
    }
    SSL_CTX_free(cctx);
}

static void test_handshake_versions(void **state)
{
    struct kt_tls_server_params p = base_params();
    struct kt_tls_server *s = server_ok(&p);
    static const struct { const char *client_protocols; int want; const char *version; } v[] = {
        { "<=TLSv1.2", TLS1_2_VERSION, "TLSv1.2" },
        { ">=TLSv1.3", TLS1_3_VERSION, "TLSv1.3" },
        { NULL, TLS1_3_VERSION, "TLSv1.3" },
    };
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        SSL_CTX *cctx = client_ctx(v[i].client_protocols);
        struct conn k;
        conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
        assert_true(k.ok);
        assert_int_equal(SSL_version(k.s), v[i].want);
        char desc[128], prefix[64];
        kt_tls_describe(k.s, desc, sizeof(desc));
        snprintf(prefix, sizeof(prefix), "%s with cipher %s (", v[i].version,
                 SSL_CIPHER_get_name(SSL_get_current_cipher(k.s)));
        if (strncmp(desc, prefix, strlen(prefix)) != 0 || !strstr(desc, " bits)"))
            fail_msg("describe: %s", desc);
        conn_greet(&k);
        conn_close(&k);
        SSL_CTX_free(cctx);
    }
    char desc[32];
    kt_tls_describe(NULL, desc, sizeof(desc));
    assert_string_equal(desc, "no TLS session");
    kt_tls_server_free(s);
}

/* Exclusions change what TLS 1.2 negotiates; TLS 1.3 suites are untouched. */
static void test_handshake_cipher_grade(void **state)
{
    SSL_CTX *cctx = client_ctx("<=TLSv1.2");
    struct kt_tls_server_params p = base_params();
    p.ciphers = "high";
    p.eccert_file = p.eckey_file = NULL;
    struct kt_tls_server *s = server_ok(&p);
    struct conn k;
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    /* server preference plus @STRENGTH: the strongest AEAD first */
    assert_string_equal(SSL_CIPHER_get_name(SSL_get_current_cipher(k.s)), "ECDHE-RSA-AES256-GCM-SHA384");
    char desc[128];
    kt_tls_describe(k.s, desc, sizeof(desc));
    assert_string_equal(desc, "TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)");
    conn_close(&k);
    kt_tls_server_free(s);

    p.exclude_ciphers = "AESGCM, CHACHA20 aCCM ARIA";
    s = server_ok(&p);
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    const char *name = SSL_CIPHER_get_name(SSL_get_current_cipher(k.s));
    if (strstr(name, "GCM") || strstr(name, "CHACHA"))
        fail_msg("excluded cipher negotiated: %s", name);
    conn_close(&k);
    kt_tls_server_free(s);

    /* a client offering only what the server excluded gets nothing */
    assert_int_equal(SSL_CTX_set_cipher_list(cctx, "AESGCM"), 1);
    s = server_ok(&p);
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_false(k.ok);
    assert_int_equal(ERR_GET_REASON(k.server_err), SSL_R_NO_SHARED_CIPHER);
    conn_close(&k);
    kt_tls_server_free(s);
    SSL_CTX_free(cctx);
}

static void test_tls11_refused(void **state)
{
    SSL_CTX *old = SSL_CTX_new(TLS_client_method());
    assert_non_null(old);
    SSL_CTX_set_security_level(old, 0);
    assert_int_equal(SSL_CTX_set_cipher_list(old, "ALL:@SECLEVEL=0"), 1);
    SSL_CTX_set_min_proto_version(old, TLS1_1_VERSION);
    SSL_CTX_set_max_proto_version(old, TLS1_1_VERSION);

    struct kt_tls_server_params p = base_params();
    struct kt_tls_server *s = server_ok(&p);
    assert_int_equal(SSL_CTX_get_min_proto_version(kt_tls_server_ctx(s)), TLS1_2_VERSION);
    struct conn k;
    conn_open(&k, kt_tls_server_ctx(s), old, NULL);
    assert_false(k.ok);
    assert_int_equal(ERR_GET_REASON(k.server_err), SSL_R_UNSUPPORTED_PROTOCOL);
    conn_close(&k);
    kt_tls_server_free(s);

    /* the same spec in exclusion syntax refuses it the same way */
    p.protocols = "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1";
    s = server_ok(&p);
    conn_open(&k, kt_tls_server_ctx(s), old, NULL);
    assert_false(k.ok);
    assert_int_equal(ERR_GET_REASON(k.server_err), SSL_R_UNSUPPORTED_PROTOCOL);
    conn_close(&k);
    kt_tls_server_free(s);
    SSL_CTX_free(old);
}

/* Asking for a client certificate never requires one: trusted, untrusted and
 * absent certificates all complete, and the verdict is left for policy. */
static void test_ask_ccert(void **state)
{
    struct kt_tls_server_params p = base_params();
    p.ask_ccert = 1;
    p.CAfile = root_pem;
    struct kt_tls_server *s = server_ok(&p);
    char self_cert[160], self_key[160], err[256];
    snprintf(self_cert, sizeof(self_cert), "%s/client-self.pem", dir);
    snprintf(self_key, sizeof(self_key), "%s/client-self.key", dir);
    assert_int_equal(kt_tls_make_self_signed(self_cert, self_key, "client.example.test", err, sizeof(err)), 0);
    const char *certs[] = { rsa_chain, self_cert, NULL }, *keys[] = { rsa_key, self_key, NULL };
    const int trusted[] = { 1, 0, 1 };

    for (size_t i = 0; i < 3; i++) {
        const char *cert = certs[i], *key = keys[i];
        SSL_CTX *cctx = client_ctx("<=TLSv1.2");
        if (cert) {
            assert_int_equal(SSL_CTX_use_certificate_chain_file(cctx, cert), 1);
            assert_int_equal(SSL_CTX_use_PrivateKey_file(cctx, key, SSL_FILETYPE_PEM), 1);
        }
        struct conn k;
        conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
        assert_true(k.ok);
        X509 *peer = SSL_get1_peer_certificate(k.s);
        assert_int_equal(peer != NULL, cert != NULL);
        X509_free(peer);
        assert_int_equal(SSL_get_verify_result(k.s) == X509_V_OK, trusted[i]);
        conn_greet(&k);
        SSL_SESSION *sess = SSL_get1_session(k.c);
        conn_close(&k);

        /* resumption with client certificates needs the session id context */
        conn_open(&k, kt_tls_server_ctx(s), cctx, sess);
        assert_true(k.ok);
        assert_true(SSL_session_reused(k.s));
        conn_close(&k);
        SSL_SESSION_free(sess);
        SSL_CTX_free(cctx);
    }
    kt_tls_server_free(s);
}

/* ---- resumption ---- */

struct resume_job {
    SSL_CTX *sctx, *cctx;
    SSL_SESSION *sess;
    int ok, reused;
};

/* Second connection from another thread: the cache and ticket keys belong
 * to the shared context, not to the thread that made the session. */
static void *resume_thread(void *arg)
{
    struct resume_job *j = arg;
    struct conn k;
    conn_open(&k, j->sctx, j->cctx, j->sess);
    j->ok = k.ok;
    j->reused = k.ok && SSL_session_reused(k.s) && SSL_session_reused(k.c);
    if (k.ok)
        conn_greet(&k);
    conn_close(&k);
    return NULL;
}

static int resume_once(long timeout, const char *client_protocols, int tickets)
{
    struct kt_tls_server_params p = base_params();
    p.session_cache_timeout = timeout;
    struct kt_tls_server *s = server_ok(&p);
    SSL_CTX *cctx = client_ctx(client_protocols);
    if (!tickets)   /* session-ID resumption from the server's cache */
        SSL_CTX_set_options(cctx, SSL_OP_NO_TICKET);
    struct conn k;
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    assert_false(SSL_session_reused(k.s));
    conn_greet(&k);
    struct resume_job j = { kt_tls_server_ctx(s), cctx, SSL_get1_session(k.c), 0, 0 };
    assert_non_null(j.sess);
    conn_close(&k);

    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, resume_thread, &j), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(j.ok);
    SSL_SESSION_free(j.sess);
    SSL_CTX_free(cctx);
    kt_tls_server_free(s);
    return j.reused;
}

/* ---- tickets and chains (what a full handshake costs the server) ---- */

static int tickets_seen;

static int count_ticket(SSL *ssl, SSL_SESSION *sess)
{
    tickets_seen++;
    return 0;     /* not kept */
}

static int tickets_after_handshake(long timeout)
{
    struct kt_tls_server_params p = base_params();
    p.session_cache_timeout = timeout;
    struct kt_tls_server *s = server_ok(&p);
    SSL_CTX *cctx = client_ctx("TLSv1.3");
    SSL_CTX_sess_set_new_cb(cctx, count_ticket);
    struct conn k;
    tickets_seen = 0;
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    assert_int_equal(SSL_version(k.s), TLS1_3_VERSION);
    conn_greet(&k);    /* the client reads the tickets that came before the greeting */
    conn_close(&k);
    SSL_CTX_free(cctx);
    kt_tls_server_free(s);
    return tickets_seen;
}

/* As Postfix's tls_server.c: one TLS 1.3 ticket per full handshake (OpenSSL sends two by default), none
 * with the session cache off. */
static void test_one_ticket(void **state)
{
    assert_int_equal(tickets_after_handshake(3600), 1);
    assert_int_equal(tickets_after_handshake(0), 0);
}

static int chain_sent(const struct kt_tls_server_params *p, const char *protocols)
{
    struct kt_tls_server *s = server_ok(p);
    SSL_CTX *cctx = client_ctx(protocols);
    struct conn k;
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    assert_int_equal(SSL_get_verify_result(k.c), X509_V_OK);
    STACK_OF(X509) *chain = SSL_get_peer_cert_chain(k.c);
    int n = chain ? sk_X509_num(chain) : -1;
    conn_close(&k);
    SSL_CTX_free(cctx);
    kt_tls_server_free(s);
    return n;
}

/* A certificate file without its chain: the chain comes from smtpd_tls_CAfile, built when the context is
 * made rather than at every handshake, and the handshake sends what OpenSSL's per-handshake building sent
 * (leaf, intermediate and the root the store has). A file with its chain sends that chain as it is. */
static void test_chain_built_once(void **state)
{
    struct kt_tls_server_params p = base_params();
    p.cert_file = p.key_file = NULL;
    p.eccert_file = ec_leaf;
    p.CAfile = ca_bundle;
    struct kt_tls_server *s = server_ok(&p);
    STACK_OF(X509) *built = NULL;
    assert_int_equal(SSL_CTX_set_current_cert(kt_tls_server_ctx(s), SSL_CERT_SET_FIRST), 1);
    assert_int_equal(SSL_CTX_get0_chain_certs(kt_tls_server_ctx(s), &built), 1);
    assert_non_null(built);
    assert_int_equal(sk_X509_num(built), 2);
    kt_tls_server_free(s);
    assert_int_equal(chain_sent(&p, "TLSv1.3"), 3);
    assert_int_equal(chain_sent(&p, "<=TLSv1.2"), 3);

    p = base_params();          /* leaf + intermediate in the file, root only in the CAfile */
    p.CAfile = ca_bundle;
    assert_int_equal(chain_sent(&p, "TLSv1.3"), 2);
}

static void test_resumption(void **state)
{
    assert_true(resume_once(3600, "<=TLSv1.2", 1));
    assert_true(resume_once(3600, "<=TLSv1.2", 0));
    assert_true(resume_once(3600, NULL, 1));
    /* timeout 0 turns both the cache and tickets off */
    assert_false(resume_once(0, "<=TLSv1.2", 1));
    assert_false(resume_once(0, "<=TLSv1.2", 0));
    assert_false(resume_once(0, NULL, 1));
}

/* ---- smtpd_tls_loglevel ---- */

/* Runs one handshake at the given level with stderr captured; returns the log. */
static char *handshake_log(int loglevel)
{
    char path[160];
    snprintf(path, sizeof(path), "%s/log.txt", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600), saved = dup(STDERR_FILENO);
    assert_true(fd >= 0 && saved >= 0);
    struct kt_tls_server_params p = base_params();
    p.loglevel = loglevel;
    struct kt_tls_server *s = server_ok(&p);
    SSL_CTX *cctx = client_ctx(NULL);
    struct conn k;

    assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_int_equal(dup2(saved, STDERR_FILENO), STDERR_FILENO);
    close(saved);
    assert_true(k.ok);
    conn_close(&k);
    SSL_CTX_free(cctx);
    kt_tls_server_free(s);

    off_t len = lseek(fd, 0, SEEK_END);
    char *text = kt_malloc((size_t)len + 1);
    assert_int_equal(pread(fd, text, (size_t)len, 0), len);
    text[len] = '\0';
    close(fd);
    return text;
}

static void test_loglevels(void **state)
{
    char *log = handshake_log(0);
    assert_string_equal(log, "");
    kt_free(log);

    log = handshake_log(2);
    assert_non_null(strstr(log, "SSL_accept:SSLv3/TLS write server hello"));
    assert_null(strstr(log, "SSL_connect:"));       /* the client context logs nothing */
    assert_null(strstr(log, "record header"));
    kt_free(log);

    log = handshake_log(3);
    assert_non_null(strstr(log, "SSL_accept:"));
    assert_non_null(strstr(log, "server read record header (5 bytes"));
    assert_non_null(strstr(log, "0000 16 03 01 "));  /* the ClientHello's record header */
    kt_free(log);
}

/* ---- client context ---- */

static void test_client_ctx(void **state)
{
    struct kt_tls_client_params cp = { .CAfile = root_pem, .protocols = ">=TLSv1.2", .ciphers = "medium", .ktls = 1 };
    SSL_CTX *c = NULL;
    char err[256];
    assert_int_equal(kt_tls_client_ctx_new(&cp, &c, err, sizeof(err)), 0);
    assert_int_equal(SSL_CTX_get_min_proto_version(c), TLS1_2_VERSION);
    char why[256];
    int kernel_tls = kt_ktls_probe(why, sizeof(why));
    assert_int_equal((SSL_CTX_get_options(c) & SSL_OP_ENABLE_KTLS) != 0, kernel_tls);
    assert_int_equal(SSL_CTX_get_read_ahead(c), !kernel_tls);
    assert_int_equal(SSL_CTX_get_verify_mode(c), SSL_VERIFY_NONE);
    SSL_CTX_free(c);

    cp.protocols = "<=SSLv3";
    c = (SSL_CTX *)1;
    assert_int_equal(kt_tls_client_ctx_new(&cp, &c, err, sizeof(err)), -EINVAL);
    assert_null(c);
    cp.protocols = NULL;
    cp.CAfile = "/nonexistent/ca.pem";
    assert_int_equal(kt_tls_client_ctx_new(&cp, &c, err, sizeof(err)), -EINVAL);
    assert_null(c);
}

/* ---- self-signed ---- */

static void test_self_signed(void **state)
{
    char cert[160], key[160], err[256];
    snprintf(cert, sizeof(cert), "%s/self.pem", dir);
    snprintf(key, sizeof(key), "%s/self.key", dir);

    assert_int_equal(kt_tls_make_self_signed(cert, key, "mail.example.test", err, sizeof(err)), 0);
    struct stat st;
    assert_int_equal(stat(key, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(stat(cert, &st), 0);
    assert_int_equal(st.st_mode & 0077, 0044);

    FILE *fp = fopen(cert, "r");
    assert_non_null(fp);
    X509 *x = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(x);
    assert_int_equal(X509_check_host(x, "mail.example.test", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(x, "localhost", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(x, "other.example.test", 0, 0, NULL), 0);
    char cn[64];
    assert_true(X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) > 0);
    assert_string_equal(cn, "mail.example.test");
    EVP_PKEY *pub = X509_get0_pubkey(x);
    assert_int_equal(EVP_PKEY_get_base_id(pub), EVP_PKEY_EC);
    char group[32];
    assert_int_equal(EVP_PKEY_get_group_name(pub, group, sizeof(group), NULL), 1);
    assert_string_equal(group, "prime256v1");
    int days, secs;
    assert_int_equal(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(x), X509_get0_notAfter(x)), 1);
    assert_in_range(days, 3650, 3653);
    assert_int_equal(X509_verify(x, pub), 1);    /* self-signed */
    X509_free(x);

    /* loadable as a server certificate, and a handshake works with it */
    struct kt_tls_server_params p = { .eccert_file = cert, .eckey_file = key, .ciphers = "high",
                                      .session_cache_timeout = 300 };
    struct kt_tls_server *s = server_ok(&p);
    struct kt_tls_client_params cp = { .CAfile = cert };
    SSL_CTX *cctx = NULL;
    assert_int_equal(kt_tls_client_ctx_new(&cp, &cctx, err, sizeof(err)), 0);
    SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, NULL);
    struct conn k;
    conn_open(&k, kt_tls_server_ctx(s), cctx, NULL);
    assert_true(k.ok);
    assert_int_equal(SSL_get_verify_result(k.c), X509_V_OK);
    conn_close(&k);
    SSL_CTX_free(cctx);
    kt_tls_server_free(s);

    /* regenerating replaces both files, keeping the key private */
    assert_int_equal(chmod(key, 0644), 0);
    assert_int_equal(kt_tls_make_self_signed(cert, key, "localhost", err, sizeof(err)), 0);
    assert_int_equal(stat(key, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    p.eccert_file = cert;
    s = server_ok(&p);
    kt_tls_server_free(s);

    assert_int_equal(kt_tls_make_self_signed(cert, key, "bad,name", err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_tls_make_self_signed(cert, key, "", err, sizeof(err)), -EINVAL);
    char nodir[160];
    snprintf(nodir, sizeof(nodir), "%s/missing/self.key", dir);
    assert_int_equal(kt_tls_make_self_signed(cert, nodir, "localhost", err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, nodir));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_protocols_ok),
        cmocka_unit_test(test_protocols_bad),
        cmocka_unit_test(test_cipherlist),
        cmocka_unit_test(test_default_lists_not_weak),
        cmocka_unit_test(test_ctx_options),
        cmocka_unit_test(test_ctx_errors),
        cmocka_unit_test(test_certificate_variants),
        cmocka_unit_test(test_handshake_versions),
        cmocka_unit_test(test_handshake_cipher_grade),
        cmocka_unit_test(test_tls11_refused),
        cmocka_unit_test(test_ask_ccert),
        cmocka_unit_test(test_resumption),
        cmocka_unit_test(test_one_ticket),
        cmocka_unit_test(test_chain_built_once),
        cmocka_unit_test(test_loglevels),
        cmocka_unit_test(test_client_ctx),
        cmocka_unit_test(test_self_signed),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
