/* Unit tests for the SMTP session state machine and its command table: the
 * real session, connection layer (tls/conn), TLS, SASL and Maildir code on a real io_uring
 * loop, with the client on the other end of a socketpair. No server, no
 * listener, no worker thread: the test thread owns a minimal worker and runs
 * its loop until the reply it waits for is complete. Every reply is
 * compared byte for byte; the session's state and transaction are checked
 * where a precondition depends on them.
 *
 * Configuration: three services from one main.cf in a temporary directory,
 * "smtp" (smtpd_tls_security_level = may), "submission" (= encrypt) and
 * "helo" (smtpd_helo_required = yes), with a self-signed certificate, a
 * password file for AUTH and a virtual mailbox for example.test; no reverse
 * DNS of clients (smtpd_peername_lookup = no). */
#include <arpa/inet.h>
#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "conf/config.h"
#include "conf/settings.h"
#include "core/alloc.h"
#include "core/loop.h"
#include "smtpd/sasl.h"
#include "smtpd/session.h"
#include "smtpd/worker.h"

#define SVC_MAY 0
#define SVC_ENCRYPT 1
#define SVC_HELO 2
#define MUST_STARTTLS "530 5.7.0 Must issue a STARTTLS command first"
#define WAIT_MS 10000

static char tmpdir[] = "/tmp/kt_session_XXXXXX";
static struct kt_runtime *rt;

/* One client connection to a session on a minimal worker. */
struct conn {
    struct kt_worker w;
    int peer;                   /* the client's end of the socketpair */
    SSL_CTX *ctx;
    SSL *ssl;                   /* client side after STARTTLS */
    char in[16384];             /* bytes from the server not yet returned */
    size_t in_len;
    char reply[16384];          /* the last reply, lines joined with '\n', no CRLF */
};

/* ---- set-up: certificate, password file, configuration ---- */

static void write_file(const char *name, const char *text)
{
    char *p = kt_asprintf("%s/%s", tmpdir, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    kt_free(p);
}

static void write_cert(void)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    assert_non_null(key);
    assert_non_null(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"mx.example.test", -1, -1, 0);
    X509_set_issuer_name(x, name);
    assert_true(X509_sign(x, key, EVP_sha256()) > 0);
    char *path = kt_asprintf("%s/cert.pem", tmpdir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    PEM_write_X509(f, x);
    PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    kt_free(path);
    X509_free(x);
    EVP_PKEY_free(key);
}

static int setup(void **state)
{
    (void)state;
    assert_non_null(mkdtemp(tmpdir));
    write_cert();
    struct crypt_data cd;
    memset(&cd, 0, sizeof(cd));
    const char *hash = crypt_r("secret", "$6$kttestsalt$", &cd);
    assert_non_null(hash);
    char *pw = kt_asprintf("alice:%s\n", hash);
    write_file("passwd", pw);
    kt_free(pw);
    write_file("vmailbox", "alice@example.test example.test/alice/\n");
    char *main_cf = kt_asprintf(
        "myhostname = mx.example.test\n"
        "mydestination =\n"
        "inet_interfaces = loopback-only\n"
        "inet_protocols = ipv4\n"
        "queue_directory = %1$s/queue\n"
        "virtual_mailbox_domains = example.test\n"
        "virtual_mailbox_base = %1$s/mail\n"
        "virtual_mailbox_maps = texthash:%1$s/vmailbox\n"
        "alias_maps =\n"
        "mynetworks = 198.51.100.0/24\n"
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination\n"
        "smtpd_tls_cert_file = %1$s/cert.pem\n"
        "smtpd_tls_key_file = %1$s/cert.pem\n"
        "smtpd_tls_security_level = may\n"
        "ktrelay_sasl_password_file = %1$s/passwd\n"
        "smtpd_sasl_auth_enable = yes\n"
        "smtpd_soft_error_limit = 100\n"
        "smtpd_hard_error_limit = 100\n"
        "smtpd_error_sleep_time = 0\n"
        "smtpd_peername_lookup = no\n",
        tmpdir);
    const char *master_cf = "127.0.0.1:1 inet n - n - - smtpd\n"
                            "127.0.0.1:2 inet n - n - - smtpd\n"
                            "  -o smtpd_tls_security_level=encrypt\n"
                            "127.0.0.1:3 inet n - n - - smtpd\n"
                            "  -o smtpd_helo_required=yes\n";
    struct kt_config *cfg = NULL;
    assert_int_equal(kt_config_load_text(main_cf, master_cf, tmpdir, &cfg), 0);
    kt_free(main_cf);
    assert_int_equal(kt_runtime_new(cfg, &rt), 0);
    assert_int_equal((int)rt->n_services, 3);
    assert_int_equal(rt->services[SVC_MAY].tls_level, KT_TLS_MAY);
    assert_int_equal(rt->services[SVC_ENCRYPT].tls_level, KT_TLS_ENCRYPT);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kt_runtime_unref(rt);
    char *cmd = kt_asprintf("rm -rf '%s'", tmpdir);
    assert_int_equal(system(cmd), 0);
    kt_free(cmd);
    return 0;
}

/* ---- the harness ---- */

static struct kt_session *session_of(struct conn *c)
{
    return c->w.sessions;
}

static void pump(struct conn *c)
{
    kt_loop_run_once(&c->w.loop, 20);
}

/* Reads what the server sent so far into c->in; returns 0 at EOF. */
static int fill(struct conn *c)
{
    size_t room = sizeof(c->in) - c->in_len;
    assert_true(room > 0);
    ssize_t n;
    if (c->ssl) {
        int r = SSL_read(c->ssl, c->in + c->in_len, (int)room);
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                return 1;
            return 0;
        }
        n = r;
    } else {
        n = recv(c->peer, c->in + c->in_len, room, MSG_DONTWAIT);
        if (n < 0) {
            assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
            return 1;
        }
        if (n == 0)
            return 0;
    }
    c->in_len += (size_t)n;
    return 1;
}

/* A complete reply at the start of c->in? Moves it to c->reply. */
static int take_reply(struct conn *c)
{
    size_t pos = 0, out = 0;
    for (;;) {
        char *crlf = memmem(c->in + pos, c->in_len - pos, "\r\n", 2);
        if (!crlf)
            return 0;
        size_t len = (size_t)(crlf - (c->in + pos));
        assert_true(out + len + 1 < sizeof(c->reply));
        if (out)
            c->reply[out++] = '\n';
        memcpy(c->reply + out, c->in + pos, len);
        out += len;
        int more = len >= 4 && c->in[pos + 3] == '-';
        pos += len + 2;
        if (!more)
            break;
    }
    c->reply[out] = '\0';
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 1;
}

/* Runs the loop until the next whole reply has arrived; returns it. */
static const char *next_reply(struct conn *c)
{
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (take_reply(c))
            return c->reply;
        pump(c);
        if (!fill(c))
            fail_msg("connection closed; unread: %.*s", (int)c->in_len, c->in);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000 > WAIT_MS)
            fail_msg("no reply within %d ms; unread: %.*s", WAIT_MS, (int)c->in_len, c->in);
    }
}

static void send_raw(struct conn *c, const char *data, size_t len)
{
    if (c->ssl) {
        assert_int_equal(SSL_write(c->ssl, data, (int)len), (int)len);
        return;
    }
    assert_int_equal(send(c->peer, data, len, 0), (ssize_t)len);
}

/* Sends one command line and returns the reply to it. */
static const char *cmd(struct conn *c, const char *line)
{
    char *l = kt_asprintf("%s\r\n", line);
    send_raw(c, l, strlen(l));
    kt_free(l);
    return next_reply(c);
}

#define assert_reply(c, line, expected) assert_string_equal(cmd((c), (line)), (expected))

static struct conn *conn_open(size_t service)
{
    struct conn *c = kt_calloc(1, sizeof(*c));
    int sv[2];
    /* the server end as accept4(SOCK_NONBLOCK) gives it to a session */
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    assert_int_equal(fcntl(sv[1], F_SETFL, O_NONBLOCK), 0);
    c->peer = sv[0];
    assert_int_equal(kt_loop_init(&c->w.loop, 64), 0);
    c->w.rt = rt;
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(40000) };
    inet_pton(AF_INET, "192.0.2.7", &sin.sin_addr);
    kt_session_start(&c->w, sv[1], (struct sockaddr *)&sin, sizeof(sin), rt, &rt->services[service]);
    assert_non_null(session_of(c));
    assert_string_equal(next_reply(c), "220 mx.example.test ESMTP ktrelay");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    return c;
}

/* QUIT, then run the loop until the session has freed itself. */
static void conn_close(struct conn *c)
{
    assert_reply(c, "QUIT", "221 2.0.0 Bye");
    for (int i = 0; i < 500 && c->w.n_sessions; i++)
        pump(c);
    assert_int_equal((int)c->w.n_sessions, 0);
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->ctx)
        SSL_CTX_free(c->ctx);
    close(c->peer);
    kt_loop_fini(&c->w.loop);
    kt_free(c);
}

static void starttls(struct conn *c)
{
    assert_reply(c, "STARTTLS", "220 2.0.0 Ready to start TLS");
    c->ctx = SSL_CTX_new(TLS_client_method());
    assert_non_null(c->ctx);
    c->ssl = SSL_new(c->ctx);
    assert_non_null(c->ssl);
    assert_int_equal(fcntl(c->peer, F_SETFL, O_NONBLOCK), 0);
    SSL_set_fd(c->ssl, c->peer);
    SSL_set_connect_state(c->ssl);
    for (int i = 0; i < 1000; i++) {
        int r = SSL_do_handshake(c->ssl);
        if (r == 1) {
            /* the server's state follows once it has seen our Finished */
            for (int j = 0; j < 500 && session_of(c)->state != KT_SS_COMMAND; j++)
                pump(c);
            assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
            assert_true(session_of(c)->tls_on);
            return;
        }
        int e = SSL_get_error(c->ssl, r);
        assert_true(e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE);
        pump(c);
    }
    fail_msg("TLS handshake did not finish");
}

static char *b64(const char *data, size_t len)
{
    char *out = kt_malloc(len * 4 / 3 + 8);
    kt_base64_encode(data, len, out);
    return out;
}

/* ---- tests ---- */

static void test_state_names(void **state)
{
    (void)state;
    assert_string_equal(kt_session_state_str(KT_SS_NEW), "NEW");
    assert_string_equal(kt_session_state_str(KT_SS_HANDSHAKE), "HANDSHAKE");
    assert_string_equal(kt_session_state_str(KT_SS_COMMAND), "COMMAND");
    assert_string_equal(kt_session_state_str(KT_SS_AUTH), "AUTH");
    assert_string_equal(kt_session_state_str(KT_SS_DATA), "DATA");
    assert_string_equal(kt_session_state_str(KT_SS_BDAT), "BDAT");
    assert_string_equal(kt_session_state_str(KT_SS_CLOSING), "CLOSING");
    assert_string_equal(kt_session_state_str((enum kt_session_state)99), "?");
}

/* smtpd_tls_security_level = encrypt: only EHLO, HELO, STARTTLS, NOOP, RSET,
 * HELP and QUIT before TLS; the TLS rule comes before every other rule. */
static void test_tls_required(void **state)
{
    (void)state;
    struct conn *c = conn_open(SVC_ENCRYPT);
    /* before HELO: the TLS reply, not the HELO one */
    assert_reply(c, "MAIL FROM:<a@example.org>", MUST_STARTTLS);
    assert_reply(c, "AUTH PLAIN", MUST_STARTTLS);
    assert_reply(c, "VRFY alice@example.test", MUST_STARTTLS);
    assert_reply(c, "EHLO client.example",
                 "250-mx.example.test\n250-PIPELINING\n250-SIZE 10240000\n250-VRFY\n250-STARTTLS\n"
                 "250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250-DSN\n250-SMTPUTF8\n250 CHUNKING");
    assert_reply(c, "MAIL FROM:<a@example.org>", MUST_STARTTLS);
    assert_reply(c, "RCPT TO:<alice@example.test>", MUST_STARTTLS);
    assert_reply(c, "DATA", MUST_STARTTLS);
    assert_reply(c, "VRFY alice@example.test", MUST_STARTTLS);
    assert_reply(c, "AUTH PLAIN", MUST_STARTTLS);
    /* a refused BDAT is answered after its chunk, which is not taken for commands */
    send_raw(c, "BDAT 6 LAST\r\nNOOP\r\n", 19);
    assert_string_equal(next_reply(c), MUST_STARTTLS);
    assert_null(session_of(c)->txn);
    assert_reply(c, "NOOP", "250 2.0.0 Ok");
    assert_reply(c, "RSET", "250 2.0.0 Ok");
    assert_reply(c, "HELP", "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS");
    assert_reply(c, "EXPN staff", "502 5.5.1 Error: command not implemented");
    assert_reply(c, "XYZZY", "502 5.5.2 Error: command not recognized");
    assert_reply(c, "HELO client.example", "250 mx.example.test");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    starttls(c);
    /* RFC 3207 4.2: HELO is forgotten; now the HELO rule speaks */
    assert_reply(c, "AUTH PLAIN", "503 5.5.1 Error: send HELO/EHLO first");
    assert_reply(c, "VRFY alice@example.test", "252 2.0.0 alice@example.test");
    assert_reply(c, "EHLO client.example",
                 "250-mx.example.test\n250-PIPELINING\n250-SIZE 10240000\n250-VRFY\n250-AUTH PLAIN LOGIN\n"
                 "250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250-DSN\n250-SMTPUTF8\n250 CHUNKING");
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_non_null(session_of(c)->txn);
    assert_reply(c, "STARTTLS", "554 5.5.1 Error: TLS already active");
    conn_close(c);
}

/* HELO needed for AUTH, and for MAIL where smtpd_helo_required = yes (the
 * "helo" service); the transaction rules for the others. */
static void test_helo_needed(void **state)
{
    (void)state;
    struct conn *c = conn_open(SVC_HELO);
    assert_reply(c, "MAIL FROM:<a@example.org>", "503 5.5.1 Error: send HELO/EHLO first");
    assert_reply(c, "AUTH PLAIN", "503 5.5.1 Error: send HELO/EHLO first");
    assert_reply(c, "RCPT TO:<alice@example.test>", "503 5.5.1 Error: need MAIL command");
    assert_reply(c, "DATA", "503 5.5.1 Error: need RCPT command");
    send_raw(c, "BDAT 3\r\nabc", 11);
    assert_string_equal(next_reply(c), "503 5.5.1 Error: need MAIL command");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    /* no HELO needed for these */
    assert_reply(c, "VRFY alice@example.test", "252 2.0.0 alice@example.test");
    assert_reply(c, "NOOP", "250 2.0.0 Ok");
    assert_reply(c, "HELO client.example", "250 mx.example.test");
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    conn_close(c);
    c = conn_open(SVC_HELO);
    assert_reply(c, "HELO", "501 5.5.4 Syntax: HELO hostname");
    /* a refused HELO is no HELO */
    assert_reply(c, "MAIL FROM:<a@example.org>", "503 5.5.1 Error: send HELO/EHLO first");
    conn_close(c);
    /* without smtpd_helo_required MAIL needs no HELO (Postfix), AUTH still does */
    c = conn_open(SVC_MAY);
    assert_reply(c, "AUTH PLAIN", "503 5.5.1 Error: send HELO/EHLO first");
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_reply(c, "", "500 5.5.2 Error: bad syntax");
    conn_close(c);
}

/* Inside and outside a transaction: which commands, and what ends it. */
static void test_transaction(void **state)
{
    (void)state;
    struct conn *c = conn_open(SVC_MAY);
    assert_null(session_of(c)->txn);
    assert_reply(c, "EHLO client.example",
                 "250-mx.example.test\n250-PIPELINING\n250-SIZE 10240000\n250-VRFY\n250-STARTTLS\n"
                 "250-AUTH PLAIN LOGIN\n250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250-DSN\n250-SMTPUTF8\n250 CHUNKING");
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    struct kt_smtpd_txn *t = session_of(c)->txn;
    assert_non_null(t);
    assert_string_equal(t->sender, "a@example.org");
    assert_int_equal(strlen(t->queue_id), 13);   /* kt_queue_new_id: Postfix's short form */
    assert_reply(c, "MAIL FROM:<b@example.org>", "503 5.5.1 Error: nested MAIL command");
    assert_reply(c, "AUTH PLAIN", "503 5.5.1 Error: MAIL transaction in progress");
    assert_string_equal(session_of(c)->txn->sender, "a@example.org");
    assert_reply(c, "DATA", "554 5.5.1 Error: no valid recipients");
    /* a refused BDAT inside a transaction refuses every later chunk until it ends */
    send_raw(c, "BDAT 2\r\nab", 10);
    assert_string_equal(next_reply(c), "554 5.5.1 Error: no valid recipients");
    assert_reply(c, "RCPT TO:<alice@example.test>", "250 2.1.5 Ok");
    assert_int_equal(session_of(c)->txn->n_rcpts, 1);
    send_raw(c, "BDAT 2 LAST\r\nab", 15);
    assert_string_equal(next_reply(c), "554 5.5.1 Error: no valid recipients");
    assert_null(session_of(c)->txn);   /* LAST ended it */
    /* RSET ends a transaction */
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_reply(c, "RCPT TO:<alice@example.test>", "250 2.1.5 Ok");
    assert_reply(c, "RSET", "250 2.0.0 Ok");
    assert_null(session_of(c)->txn);
    assert_reply(c, "RCPT TO:<alice@example.test>", "503 5.5.1 Error: need MAIL command");
    /* so does EHLO */
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_int_equal(strncmp(cmd(c, "EHLO again.example"), "250-mx.example.test\n", 20), 0);
    assert_null(session_of(c)->txn);
    /* a whole message: DATA, then the transaction is gone */
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_reply(c, "RCPT TO:<alice@example.test>", "250 2.1.5 Ok");
    assert_reply(c, "DATA", "354 End data with <CR><LF>.<CR><LF>");
    assert_int_equal(session_of(c)->state, KT_SS_DATA);
    char queued[64];
    snprintf(queued, sizeof(queued), "250 2.0.0 Ok: queued as %s", session_of(c)->txn->queue_id);
    assert_reply(c, "Subject: t\r\n\r\nbody\r\n.", queued);
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    assert_null(session_of(c)->txn);
    assert_reply(c, "DATA", "503 5.5.1 Error: need RCPT command");
    /* and BDAT LAST */
    assert_reply(c, "MAIL FROM:<a@example.org>", "250 2.1.0 Ok");
    assert_reply(c, "RCPT TO:<alice@example.test>", "250 2.1.5 Ok");
    send_raw(c, "BDAT 5\r\nSubj:", 13);
    assert_string_equal(next_reply(c), "250 2.0.0 Ok: 5 bytes");
    assert_reply(c, "DATA", "503 5.5.1 Error: DATA after BDAT");
    snprintf(queued, sizeof(queued), "250 2.0.0 Ok: queued as %s", session_of(c)->txn->queue_id);
    send_raw(c, "BDAT 4 LAST\r\n x\r\n", 17);
    assert_string_equal(next_reply(c), queued);
    assert_null(session_of(c)->txn);
    conn_close(c);
}

/* While AUTH waits for a response, every line is that response (RFC 4954 4). */
static void test_auth_in_progress(void **state)
{
    (void)state;
    struct conn *c = conn_open(SVC_MAY);
    cmd(c, "EHLO client.example");
    assert_reply(c, "AUTH LOGIN", "334 VXNlcm5hbWU6");
    assert_int_equal(session_of(c)->state, KT_SS_AUTH);
    assert_reply(c, "MAIL FROM:<a@example.org>", "501 5.5.2 Invalid base64 data in continued response");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    assert_null(session_of(c)->txn);
    assert_reply(c, "AUTH PLAIN", "334 ");
    /* "QUIT" is valid base64: a (malformed) PLAIN message, not the command */
    assert_reply(c, "QUIT", "535 5.7.8 Error: authentication failed: malformed PLAIN message");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    assert_reply(c, "AUTH PLAIN", "334 ");
    assert_reply(c, "*", "501 5.7.0 Authentication aborted");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    /* LOGIN step by step, through the password check pool */
    assert_reply(c, "AUTH LOGIN", "334 VXNlcm5hbWU6");
    char *user = b64("alice", 5), *pass = b64("secret", 6);
    assert_reply(c, user, "334 UGFzc3dvcmQ6");
    assert_int_equal(session_of(c)->state, KT_SS_AUTH);
    assert_reply(c, pass, "235 2.7.0 Authentication successful");
    assert_int_equal(session_of(c)->state, KT_SS_COMMAND);
    assert_string_equal(session_of(c)->sasl_username, "alice");
    assert_reply(c, "AUTH LOGIN", "503 5.5.1 Error: already authenticated");
    /* authenticated: relaying is allowed */
    assert_reply(c, "MAIL FROM:<alice@example.test>", "250 2.1.0 Ok");
    assert_reply(c, "RCPT TO:<x@remote.example>", "250 2.1.5 Ok");
    kt_free(user);
    kt_free(pass);
    conn_close(c);
}

/* Replies to a pipelined group leave together, in order; a refused command
 * in the middle does not stop the others. */
static void test_pipelined_group(void **state)
{
    (void)state;
    struct conn *c = conn_open(SVC_MAY);
    cmd(c, "EHLO client.example");
    const char *group = "MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@remote.example>\r\n"
                        "RCPT TO:<alice@example.test>\r\nMAIL FROM:<b@example.org>\r\nRSET\r\n";
    send_raw(c, group, strlen(group));
    assert_string_equal(next_reply(c), "250 2.1.0 Ok");
    assert_string_equal(next_reply(c), "554 5.7.1 <nobody@remote.example>: Relay access denied");
    assert_string_equal(next_reply(c), "250 2.1.5 Ok");
    assert_string_equal(next_reply(c), "503 5.5.1 Error: nested MAIL command");
    assert_string_equal(next_reply(c), "250 2.0.0 Ok");
    assert_null(session_of(c)->txn);
    conn_close(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_names),
        cmocka_unit_test(test_tls_required),
        cmocka_unit_test(test_helo_needed),
        cmocka_unit_test(test_transaction),
        cmocka_unit_test(test_auth_in_progress),
        cmocka_unit_test(test_pipelined_group),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
