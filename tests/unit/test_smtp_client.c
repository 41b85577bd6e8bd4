/* The outbound SMTP client against a scripted peer: a loopback TCP listener
 * whose thread replays a script of server replies and checks that every
 * command line (and body byte) the client sends is exactly the one the
 * script expects, in order. The client runs on a real io_uring loop over the
 * real connection layer; nothing is mocked. Covered: EHLO refused -> HELO
 * and one command at a time; PIPELINING with CHUNKING (BDAT LAST, body by
 * sendfile) and a 5xx for one RCPT; a 4xx at MAIL under PIPELINING with a
 * pipelined DATA; DATA with dot-stuffing; QUIT on close; the message's
 * properties (SMTPUTF8, BODY, DSN) on MAIL and RCPT. LMTP mode (RFC 2033)
 * over a unix-domain socket: LHLO, DATA although CHUNKING is offered, one
 * reply per accepted recipient after the end of data, each applied to its
 * own recipient; LHLO refused (no HELO fallback); the connection lost
 * between two end-of-data replies (the first stays final). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/loop.h"
#include "queue/queue.h"
#include "queue/smtp_client.h"

/* One script step: the peer sends text (S), expects one exact line (C),
 * expects exactly len raw bytes equal to text (B), or closes the connection
 * at once (X, text NULL; ends the script). */
struct step {
    char kind;
    const char *text;
};

struct peer {
    int lfd;
    const struct step *script;
    char failure[512];       /* first mismatch, "" when the script ran through */
    int done;
    pthread_t thread;
    char buf[65536];
    size_t len;
};

static int peer_fill(struct peer *p, int fd)
{
    if (p->len == sizeof(p->buf))
        return -1;
    ssize_t n = recv(fd, p->buf + p->len, sizeof(p->buf) - p->len, 0);
    if (n <= 0)
        return -1;
    p->len += (size_t)n;
    return 0;
}

/* Take exactly want bytes (want > 0), or one line with its CRLF (want == 0). */
static int peer_take(struct peer *p, int fd, size_t want, char *out, size_t outlen)
{
    for (;;) {
        size_t n = 0;
        if (want) {
            if (p->len >= want)
                n = want;
        } else {
            char *lf = memchr(p->buf, '\n', p->len);
            if (lf)
                n = (size_t)(lf - p->buf) + 1;
        }
        if (n) {
            if (n >= outlen)
                return -1;
            memcpy(out, p->buf, n);
            out[n] = '\0';
            memmove(p->buf, p->buf + n, p->len - n);
            p->len -= n;
            return 0;
        }
        if (peer_fill(p, fd) < 0)
            return -1;
    }
}

/* text with CR and LF shown as \r and \n, for failure messages */
static const char *visible(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (; *in && o + 3 < outlen; in++) {
        if (*in == '\r' || *in == '\n') {
            out[o++] = '\\';
            out[o++] = *in == '\r' ? 'r' : 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
    return out;
}

static void *peer_main(void *arg)
{
    struct peer *p = arg;
    static char got[65536];
    int fd = accept(p->lfd, NULL, NULL);
    if (fd < 0) {
        snprintf(p->failure, sizeof(p->failure), "accept: %s", strerror(errno));
        goto out;
    }
    struct timeval tv = { .tv_sec = 10 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    int closed = 0;
    for (size_t i = 0; p->script[i].kind; i++) {
        const struct step *st = &p->script[i];
        if (st->kind == 'X') {
            closed = 1;
            break;
        }
        if (st->kind == 'S') {
            if (send(fd, st->text, strlen(st->text), MSG_NOSIGNAL) != (ssize_t)strlen(st->text)) {
                snprintf(p->failure, sizeof(p->failure), "step %zu: send failed", i);
                break;
            }
            continue;
        }
        size_t want = st->kind == 'B' ? strlen(st->text) : 0;
        if (peer_take(p, fd, want, got, sizeof(got)) < 0) {
            snprintf(p->failure, sizeof(p->failure), "step %zu: connection ended waiting for \"%.60s\"", i, st->text);
            break;
        }
        if (strcmp(got, st->text) != 0) {
            char a[120], b[120];
            snprintf(p->failure, sizeof(p->failure), "step %zu: expected \"%s\", got \"%s\"", i,
                     visible(st->text, a, sizeof(a)), visible(got, b, sizeof(b)));
            break;
        }
    }
    /* after the script: the client must have closed, with nothing more sent */
    if (!p->failure[0] && !closed) {
        char extra;
        if (p->len || recv(fd, &extra, 1, 0) != 0)
            snprintf(p->failure, sizeof(p->failure), "client sent more than the script expects");
    }
    close(fd);
out:
    __atomic_store_n(&p->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static int peer_start(struct peer *p, const struct step *script, struct kt_smtp_addr *addr)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sin);
    memset(p, 0, sizeof(*p));
    p->script = script;
    p->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (p->lfd < 0 || bind(p->lfd, (struct sockaddr *)&sin, sizeof(sin)) < 0 || listen(p->lfd, 1) < 0
        || getsockname(p->lfd, (struct sockaddr *)&sin, &len) < 0)
        return -1;
    memset(addr, 0, sizeof(*addr));
    memcpy(&addr->ss, &sin, sizeof(sin));
    addr->len = sizeof(sin);
    snprintf(addr->host, sizeof(addr->host), "mx.test");
    return pthread_create(&p->thread, NULL, peer_main, p);
}

/* The same peer on a unix-domain socket at path; addr's host is the relay= text. */
static int peer_start_unix(struct peer *p, const struct step *script, const char *path, struct kt_smtp_addr *addr)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    memset(p, 0, sizeof(*p));
    p->script = script;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
    unlink(path);
    p->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (p->lfd < 0 || bind(p->lfd, (struct sockaddr *)&sun, sizeof(sun)) < 0 || listen(p->lfd, 1) < 0)
        return -1;
    memset(addr, 0, sizeof(*addr));
    memcpy(&addr->ss, &sun, sizeof(sun));
    addr->len = sizeof(sun);
    snprintf(addr->host, sizeof(addr->host), "client.example[%s]", path);
    return pthread_create(&p->thread, NULL, peer_main, p);
}

static void peer_finish(struct peer *p)
{
    pthread_join(p->thread, NULL);
    close(p->lfd);
}

/* ---- driving the client ---- */

struct run {
    int called, res;
    char reason[512];
};

static void on_done(void *arg, int res, const char *reason)
{
    struct run *r = arg;
    r->called = 1;
    r->res = res;
    snprintf(r->reason, sizeof(r->reason), "%s", reason ? reason : "");
}

static void run_until(struct kt_loop *loop, const int *flag)
{
    time_t end = time(NULL) + 15;
    while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE) && time(NULL) < end)
        kt_loop_run_once(loop, 50);
    assert_true(__atomic_load_n(flag, __ATOMIC_ACQUIRE));
}

static int body_file(const char *body)
{
    char path[] = "/tmp/kt-test-smtp-client-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    assert_int_equal(write(fd, body, strlen(body)), (ssize_t)strlen(body));
    return fd;
}

/* Starts the scripted peer: SMTP on a loopback TCP port, or LMTP (lmtp 1) on the unix socket at path. */
static void peer_open(int lmtp, const struct step *script, const char *path, struct peer *p,
                      struct kt_smtp_addr *addr)
{
    if (lmtp)
        assert_int_equal(peer_start_unix(p, script, path, addr), 0);
    else
        assert_int_equal(peer_start(p, script, addr), 0);
}

/* After kt_smtp_close: waits until the peer's script ended and no client connection is left, then
 * stops the peer and fails the test if the script did not run through exactly. */
static void peer_close(int lmtp, struct kt_loop *loop, struct peer *p, const char *path)
{
    run_until(loop, &p->done);
    time_t end = time(NULL) + 5;
    while (kt_smtp_live() > 0 && time(NULL) < end)
        kt_loop_run_once(loop, 50);
    assert_int_equal(kt_smtp_live(), 0);
    peer_finish(p);
    if (lmtp)
        unlink(path);
    if (p->failure[0])
        fail_msg("scripted peer: %s", p->failure);
}

/* Connects to a peer whose script refuses the session (greeting, EHLO or LHLO); the connection's result
 * is in *conn. */
static void connect_refused(int lmtp, const struct step *script, struct run *conn)
{
    struct kt_loop loop;
    struct peer p;
    struct kt_smtp_addr addr;
    struct kt_smtp_params params = {
        .helo_name = "client.example", .connect_timeout_s = 10, .command_timeout_s = 10, .lmtp = lmtp,
    };
    char path[64];

    memset(conn, 0, sizeof(*conn));
    snprintf(path, sizeof(path), "/tmp/kt-test-lmtp-%d.sock", (int)getpid());
    assert_int_equal(kt_loop_init(&loop, 64), 0);
    peer_open(lmtp, script, path, &p, &addr);
    struct kt_smtp_conn *c = kt_smtp_connect(&loop, &params, &addr, 1, on_done, conn);
    run_until(&loop, &conn->called);
    kt_smtp_close(c);
    peer_close(lmtp, &loop, &p, path);
    kt_loop_fini(&loop);
}

/* Connect, run one transaction of body to rcpts, close; the peer's script
 * must run through exactly. Returns the transaction's result in *txn. */
static void exchange_full(int lmtp, const struct step *script, const char *body, int dots,
                          const char *const *rcpts, size_t n, const struct kt_smtp_msg *props, int *codes,
                          char **replies, struct run *txn, size_t *final_upto)
{
    struct kt_loop loop;
    struct peer p;
    struct kt_smtp_addr addr;
    struct run conn = { 0 };
    struct kt_smtp_params params = {
        .helo_name = "client.example", .tls_level = KT_SMTP_TLS_NONE,
        .connect_timeout_s = 10, .command_timeout_s = 10, .lmtp = lmtp,
    };
    char path[64];

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    snprintf(path, sizeof(path), "/tmp/kt-test-lmtp-%d.sock", (int)getpid());
    peer_open(lmtp, script, path, &p, &addr);
    struct kt_smtp_conn *c = kt_smtp_connect(&loop, &params, &addr, 1, on_done, &conn);
    run_until(&loop, &conn.called);
    assert_int_equal(conn.res, 0);
    assert_true(kt_smtp_usable(c));

    int fd = body_file(body);
    struct kt_smtp_msg m = {
        .id = "TESTID", .sender = "alice@example.test", .rcpts = rcpts, .n_rcpts = n, .fd = fd,
        .body_off = 0, .body_len = (off_t)strlen(body), .dots = dots, .canonical = 1, .codes = codes,
        .replies = replies,
    };
    if (props) {
        m.smtputf8 = props->smtputf8;
        m.body = props->body;
        m.ret = props->ret;
        m.envid = props->envid;
        m.notify = props->notify;
        m.orcpt = props->orcpt;
    }
    memset(txn, 0, sizeof(*txn));
    kt_smtp_send(c, &m, on_done, txn);
    run_until(&loop, &txn->called);
    if (final_upto)
        *final_upto = m.final_upto;
    if (lmtp)
        assert_string_equal(kt_smtp_relay(c), addr.host);

    kt_smtp_close(c);
    peer_close(lmtp, &loop, &p, path);
    close(fd);
    kt_loop_fini(&loop);
}

static void exchange_props(const struct step *script, const char *body, int dots, const char *const *rcpts,
                           size_t n, const struct kt_smtp_msg *props, int *codes, char **replies, struct run *txn)
{
    exchange_full(0, script, body, dots, rcpts, n, props, codes, replies, txn, NULL);
}

/* LMTP (lmtp 1) over a unix socket; *final_upto gets the message's final_upto. */
static void exchange_as(int lmtp, const struct step *script, const char *body, int dots, const char *const *rcpts,
                        size_t n, int *codes, char **replies, struct run *txn, size_t *final_upto)
{
    exchange_full(lmtp, script, body, dots, rcpts, n, NULL, codes, replies, txn, final_upto);
}

static void exchange(const struct step *script, const char *body, int dots, const char *const *rcpts, size_t n,
                     int *codes, char **replies, struct run *txn)
{
    exchange_props(script, body, dots, rcpts, n, NULL, codes, replies, txn);
}

static void free_replies(char **replies, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kt_free(replies[i]);
}

/* No ESMTP: HELO after the refused EHLO, then one command per reply. */
static void test_helo_fallback_lockstep(void **state)
{
    static const char *const rcpts[] = { "bob@remote.test", "carol@remote.test" };
    static const struct step script[] = {
        { 'S', "220 mx.test ESMTP\r\n" },
        { 'C', "EHLO client.example\r\n" },
        { 'S', "502 5.5.2 Error: command not recognized\r\n" },
        { 'C', "HELO client.example\r\n" },
        { 'S', "250 mx.test\r\n" },
        { 'C', "MAIL FROM:<alice@example.test>\r\n" },
        { 'S', "250 2.1.0 Ok\r\n" },
        { 'C', "RCPT TO:<bob@remote.test>\r\n" },
        { 'S', "250 2.1.5 Ok\r\n" },
        { 'C', "RCPT TO:<carol@remote.test>\r\n" },
        { 'S', "250 2.1.5 Ok\r\n" },
        { 'C', "DATA\r\n" },
        { 'S', "354 End data with <CR><LF>.<CR><LF>\r\n" },
        { 'C', "Subject: t\r\n" },
        { 'C', "\r\n" },
        { 'C', "..dot line\r\n" },
        { 'C', "end\r\n" },
        { 'C', ".\r\n" },
        { 'S', "250 2.0.0 Ok: queued as ABC\r\n" },
        { 'C', "QUIT\r\n" },
        { 'S', "221 2.0.0 Bye\r\n" },
        { 0, NULL },
    };
    int codes[2];
    char *replies[2];
    struct run txn;
    exchange(script, "Subject: t\r\n\r\n.dot line\r\nend\r\n", 1, rcpts, 2, codes, replies, &txn);
    assert_int_equal(txn.res, 0);
    assert_int_equal(codes[0], 250);
    assert_int_equal(codes[1], 250);
    assert_memory_equal(replies[0], "host mx.test[127.0.0.1]:", 24);
    assert_non_null(strstr(replies[0], "said: 250 2.0.0 Ok: queued as ABC (in reply to end of DATA command)"));
    free_replies(replies, 2);
}

/* PIPELINING and CHUNKING: MAIL and every RCPT in one group, no DATA; one
 * recipient refused with 550; the body goes as BDAT LAST (by sendfile on
 * this plaintext connection) to the recipient that was accepted. */
static void test_pipelining_bdat_last_rcpt_5xx(void **state)
{
    static const char *const rcpts[] = { "bob@remote.test", "nobody@remote.test", "carol@remote.test" };
    static const char body[] = "Subject: t\r\n\r\n.no stuffing in BDAT\r\n";
    static const struct step script[] = {
        { 'S', "220 mx.test ESMTP\r\n" },
        { 'C', "EHLO client.example\r\n" },
        { 'S', "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 CHUNKING\r\n" },
        { 'C', "MAIL FROM:<alice@example.test> SIZE=36\r\n" },
        { 'C', "RCPT TO:<bob@remote.test>\r\n" },
        { 'C', "RCPT TO:<nobody@remote.test>\r\n" },
        { 'C', "RCPT TO:<carol@remote.test>\r\n" },
        { 'S', "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <nobody@remote.test>: Recipient address rejected\r\n"
               "250 2.1.5 Ok\r\n" },
        { 'C', "BDAT 36 LAST\r\n" },
        { 'B', body },
        { 'S', "250 2.0.0 Ok: queued as DEF\r\n" },
        { 'C', "QUIT\r\n" },
        { 'S', "221 2.0.0 Bye\r\n" },
        { 0, NULL },
    };
    int codes[3];
    char *replies[3];
    struct run txn;
    unsigned long sent_before = kt_smtp_sendfile_count();
    assert_int_equal(strlen(body), 36);
    exchange(script, body, 1, rcpts, 3, codes, replies, &txn);
    assert_int_equal(txn.res, 0);
    assert_int_equal(codes[0], 250);
    assert_int_equal(codes[1], 550);
    assert_int_equal(codes[2], 250);
    assert_memory_equal(replies[1], "host mx.test[127.0.0.1]:", 24);
    assert_non_null(strstr(replies[1], "said: 550 5.1.1 <nobody@remote.test>: Recipient address rejected "
                                       "(in reply to RCPT TO command)"));
    assert_non_null(strstr(replies[0], "(in reply to end of BDAT command)"));
    assert_int_equal(kt_smtp_sendfile_count(), sent_before + 1);
    free_replies(replies, 3);
}

/* A 4xx at MAIL under PIPELINING: the pipelined RCPT and DATA fail too;
 * every recipient gets the MAIL reply, then RSET ends the transaction and
 * the connection stays usable for QUIT. */
static void test_pipelining_mail_4xx(void **state)
{
    static const char *const rcpts[] = { "bob@remote.test", "carol@remote.test" };
    static const struct step script[] = {
        { 'S', "220 mx.test ESMTP\r\n" },
        { 'C', "EHLO client.example\r\n" },
        { 'S', "250-mx.test\r\n250 PIPELINING\r\n" },
        { 'C', "MAIL FROM:<alice@example.test>\r\n" },
        { 'C', "RCPT TO:<bob@remote.test>\r\n" },
        { 'C', "RCPT TO:<carol@remote.test>\r\n" },
        { 'C', "DATA\r\n" },
        { 'S', "451 4.3.0 Error: queue file write error\r\n503 5.5.1 Error: need MAIL command\r\n"
               "503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n" },
        { 'C', "RSET\r\n" },
        { 'S', "250 2.0.0 Ok\r\n" },
        { 'C', "QUIT\r\n" },
        { 'S', "221 2.0.0 Bye\r\n" },
        { 0, NULL },
    };
    int codes[2];
    char *replies[2];
    struct run txn;
    exchange(script, "Subject: t\r\n\r\nx\r\n", 0, rcpts, 2, codes, replies, &txn);
    assert_int_equal(txn.res, 0);
    assert_int_equal(codes[0], 451);
    assert_int_equal(codes[1], 451);
    assert_non_null(strstr(replies[0], "said: 451 4.3.0 Error: queue file write error (in reply to MAIL FROM command)"));
    assert_string_equal(replies[0], replies[1]);
    free_replies(replies, 2);
}

/* A greeting that is not 2xx fails the connection with the server's words. */
/* The message's properties on MAIL and RCPT when the server announces the extensions (RFC 6531, 6152,
 * 3030, 3461): BINARYMIME over BDAT, SMTPUTF8, RET, ENVID; NOTIFY and ORCPT per recipient, and an ORCPT
 * made of the address where none was given. */
static void test_properties_sent_on(void **state)
{
    static const char *const rcpts[] = { "bob@remote.test", "carol@remote.test" };
    static const char body[] = "Subject: t\r\n\r\nx\r\n";
    static const struct step script[] = {
        { 'S', "220 mx.test ESMTP\r\n" },
        { 'C', "EHLO client.example\r\n" },
        { 'S', "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
               "250 CHUNKING\r\n" },
        { 'C', "MAIL FROM:<alice@example.test> BODY=BINARYMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n" },
        { 'C', "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+2Bx@orig.test\r\n" },
        { 'C', "RCPT TO:<carol@remote.test> NOTIFY=NEVER ORCPT=rfc822;carol@remote.test\r\n" },
        { 'S', "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n" },
        { 'C', "BDAT 17 LAST\r\n" },
        { 'B', body },
        { 'S', "250 2.0.0 Ok: queued as GHI\r\n" },
        { 'C', "QUIT\r\n" },
        { 'S', "221 2.0.0 Bye\r\n" },
        { 0, NULL },
    };
    static const unsigned notify[] = { KT_QNOTIFY_SUCCESS | KT_QNOTIFY_DELAY, KT_QNOTIFY_NEVER };
    static const char *const orcpt[] = { "rfc822;b+2Bx@orig.test", NULL };
    struct kt_smtp_msg props = { .smtputf8 = 1, .body = KT_QBODY_BINARYMIME, .ret = KT_QRET_HDRS,
                                 .envid = "QQ+2B1", .notify = notify, .orcpt = orcpt };
    int codes[2];
    char *replies[2];
    struct run txn;
    assert_int_equal(strlen(body), 17);
    exchange_props(script, body, 0, rcpts, 2, &props, codes, replies, &txn);
    assert_int_equal(txn.res, 0);
    assert_int_equal(codes[0], 250);
    assert_int_equal(codes[1], 250);
    free_replies(replies, 2);
}

static void test_greeting_refused(void **state)
{
    static const struct step script[] = {
        { 'S', "554 5.7.1 mx.test go away\r\n" },
        { 0, NULL },
    };
    struct run conn;
    connect_refused(0, script, &conn);
    assert_int_equal(conn.res, 554);
    assert_non_null(strstr(conn.reason, "refused to talk to me: 554 5.7.1 mx.test go away"));
}

/* LMTP over a unix socket: LHLO, everything pipelined with DATA (CHUNKING is offered but lmtp(8) does not
 * use it), one recipient refused at RCPT, then one reply per accepted recipient after the end of data in
 * RCPT order: bob delivered, carol over quota (452) while bob's stays 250. */
static void test_lmtp_replies_per_recipient(void **state)
{
    static const char *const rcpts[] = { "bob@example.test", "nobody@example.test", "carol@example.test" };
    static const struct step script[] = {
        { 'S', "220 dovecot ready.\r\n" },
        { 'C', "LHLO client.example\r\n" },
        { 'S', "250-dovecot\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n" },
        { 'C', "MAIL FROM:<alice@example.test>\r\n" },
        { 'C', "RCPT TO:<bob@example.test>\r\n" },
        { 'C', "RCPT TO:<nobody@example.test>\r\n" },
        { 'C', "RCPT TO:<carol@example.test>\r\n" },
        { 'C', "DATA\r\n" },
        { 'S', "250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <nobody@example.test> User doesn't exist\r\n"
               "250 2.1.5 OK\r\n354 OK\r\n" },
        { 'C', "Subject: t\r\n" },
        { 'C', "\r\n" },
        { 'C', "..dot\r\n" },
        { 'C', ".\r\n" },
        { 'S', "250 2.0.0 <bob@example.test> kL3aAB Saved\r\n" },
        { 'S', "452 4.2.2 <carol@example.test> Quota exceeded (mailbox for user is full)\r\n" },
        { 'C', "QUIT\r\n" },
        { 'S', "221 2.0.0 Bye\r\n" },
        { 0, NULL },
    };
    int codes[3];
    char *replies[3];
    struct run txn;
    size_t final_upto;
    char path[64];
    snprintf(path, sizeof(path), "/tmp/kt-test-lmtp-%d.sock", (int)getpid());
    exchange_as(1, script, "Subject: t\r\n\r\n.dot\r\n", 1, rcpts, 3, codes, replies, &txn, &final_upto);
    assert_int_equal(txn.res, 0);
    assert_int_equal(codes[0], 250);
    assert_int_equal(codes[1], 550);
    assert_int_equal(codes[2], 452);
    assert_int_equal(final_upto, 3);
    char want[256];
    snprintf(want, sizeof(want), "host client.example[%s] said: 250 2.0.0 <bob@example.test> kL3aAB Saved "
             "(in reply to end of DATA command)", path);
    assert_string_equal(replies[0], want);
    assert_non_null(strstr(replies[1], "said: 550 5.1.1 <nobody@example.test> User doesn't exist (in reply to RCPT TO command)"));
    assert_non_null(strstr(replies[2], "said: 452 4.2.2 <carol@example.test> Quota exceeded (mailbox for user is full) "
                                       "(in reply to end of DATA command)"));
    free_replies(replies, 3);
}

/* The connection is lost after the first of two end-of-data replies: the transaction fails, the first
 * recipient's reply is final (final_upto), the second has only its RCPT reply. */
static void test_lmtp_lost_between_replies(void **state)
{
    static const char *const rcpts[] = { "bob@example.test", "carol@example.test" };
    static const struct step script[] = {
        { 'S', "220 lmtp ready\r\n" },
        { 'C', "LHLO client.example\r\n" },
        { 'S', "250-lmtp\r\n250 PIPELINING\r\n" },
        { 'C', "MAIL FROM:<alice@example.test>\r\n" },
        { 'C', "RCPT TO:<bob@example.test>\r\n" },
        { 'C', "RCPT TO:<carol@example.test>\r\n" },
        { 'C', "DATA\r\n" },
        { 'S', "250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 OK\r\n" },
        { 'C', "x\r\n" },
        { 'C', ".\r\n" },
        { 'S', "250 2.0.0 <bob@example.test> Saved\r\n" },
        { 'X', NULL },
    };
    int codes[2];
    char *replies[2];
    struct run txn;
    size_t final_upto;
    exchange_as(1, script, "x\r\n", 0, rcpts, 2, codes, replies, &txn, &final_upto);
    assert_true(txn.res < 0);
    assert_non_null(strstr(txn.reason, "lost connection with client.example["));
    assert_int_equal(final_upto, 1);
    assert_int_equal(codes[0], 250);
    assert_non_null(strstr(replies[0], "said: 250 2.0.0 <bob@example.test> Saved (in reply to end of DATA command)"));
    assert_int_equal(codes[1], 250);          /* its RCPT reply only: not final */
    assert_null(replies[1]);
    free_replies(replies, 2);
}

/* RFC 2033 has no HELO: a refused LHLO fails the connection. */
static void test_lmtp_lhlo_refused(void **state)
{
    static const struct step script[] = {
        { 'S', "220 lmtp ready\r\n" },
        { 'C', "LHLO client.example\r\n" },
        { 'S', "500 5.5.1 Unknown command\r\n" },
        { 0, NULL },
    };
    struct run conn;
    connect_refused(1, script, &conn);
    assert_int_equal(conn.res, 500);
    assert_non_null(strstr(conn.reason, "refused LHLO: 500 5.5.1 Unknown command"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_helo_fallback_lockstep),
        cmocka_unit_test(test_pipelining_bdat_last_rcpt_5xx),
        cmocka_unit_test(test_pipelining_mail_4xx),
        cmocka_unit_test(test_greeting_refused),
        cmocka_unit_test(test_properties_sent_on),
        cmocka_unit_test(test_lmtp_replies_per_recipient),
        cmocka_unit_test(test_lmtp_lost_between_replies),
        cmocka_unit_test(test_lmtp_lhlo_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
