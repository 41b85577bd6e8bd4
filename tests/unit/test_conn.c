/* The connection layer (tls/conn.h) on a real io_uring loop over a real
 * socket pair: reads and writes with exact bytes, output appended while a
 * send is in flight, splice into a file at an offset, sendfile, end of
 * stream, the close contract (CLOSED once, nothing after close), and a TLS
 * handshake between a server-role and a client-role connection with a
 * self-signed certificate, followed by data both ways. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/loop.h"
#include "tls/conn.h"
#include "tls/tls.h"

/* One owner: its buffers and what its connection reported. */
struct owner {
    struct kt_conn *conn;
    struct kt_buf in, out;
    int events[KT_CONN_EV_CLOSED + 1];
    int last_res[KT_CONN_EV_CLOSED + 1];
    int after_close;          /* events other than CLOSED after kt_conn_close */
    int closing;
};

static void on_event(void *arg, enum kt_conn_event ev, int res)
{
    struct owner *o = arg;
    o->events[ev]++;
    o->last_res[ev] = res;
    if (o->closing && ev != KT_CONN_EV_CLOSED)
        o->after_close++;
    if (ev == KT_CONN_EV_CLOSED)
        o->conn = NULL;
}

static void owner_close(struct owner *o)
{
    o->closing = 1;
    kt_conn_close(o->conn);
}

static void owner_free(struct owner *o)
{
    kt_buf_release(&o->in);
    kt_buf_release(&o->out);
}

static void run_until(struct kt_loop *loop, const int *counter, int want)
{
    time_t end = time(NULL) + 10;
    while (*counter < want && time(NULL) < end)
        kt_loop_run_once(loop, 20);
    assert_true(*counter >= want);
}

static void pair(int sv[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* Read exactly len bytes from fd while the loop runs (the sender is on it). */
static void pump_read(struct kt_loop *loop, int fd, char *buf, size_t len)
{
    size_t got = 0;
    time_t end = time(NULL) + 10;
    while (got < len && time(NULL) < end) {
        ssize_t n = recv(fd, buf + got, len - got, MSG_DONTWAIT);
        if (n > 0)
            got += (size_t)n;
        kt_loop_run_once(loop, 2);
    }
    assert_int_equal(got, len);
}

static void test_plain_read_write(void **state)
{
    struct kt_loop loop;
    struct owner o = { 0 };
    int sv[2];
    char buf[64];

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    o.conn = kt_conn_new(&loop, sv[0], KT_CONN_SERVER, "unknown[test]", &o.in, &o.out, on_event, &o);
    assert_string_equal(kt_conn_xprt_name(o.conn, 0), "plain");
    assert_true(kt_conn_can_splice(o.conn));
    assert_true(kt_conn_can_sendfile(o.conn));

    assert_int_equal(send(sv[1], "EHLO x\r\n", 8, 0), 8);
    kt_conn_arm_read(o.conn, 1024);
    run_until(&loop, &o.events[KT_CONN_EV_INPUT], 1);
    assert_int_equal(o.last_res[KT_CONN_EV_INPUT], 8);
    assert_memory_equal(kt_buf_head(&o.in), "EHLO x\r\n", 8);

    kt_buf_printf(&o.out, "250 ok\r\n");
    kt_conn_flush(o.conn);
    /* the owner's buffer is emptied at once: the bytes belong to the connection now */
    assert_int_equal(kt_buf_used(&o.out), 0);
    pump_read(&loop, sv[1], buf, 8);
    run_until(&loop, &o.events[KT_CONN_EV_SENT], 1);
    assert_memory_equal(buf, "250 ok\r\n", 8);

    /* end of stream */
    close(sv[1]);
    kt_conn_arm_read(o.conn, 1024);
    run_until(&loop, &o.events[KT_CONN_EV_EOF], 1);
    assert_int_equal(o.events[KT_CONN_EV_ERROR], 0);

    owner_close(&o);
    run_until(&loop, &o.events[KT_CONN_EV_CLOSED], 1);
    assert_null(o.conn);
    assert_int_equal(o.after_close, 0);
    owner_free(&o);
    kt_loop_fini(&loop);
}

/* Replies appended while a send waits for a full socket buffer must go out
 * after it, byte-exact: the connection sends from its own buffer. */
static void test_append_while_sending(void **state)
{
    struct kt_loop loop;
    struct owner o = { 0 };
    int sv[2];
    enum { BIG = 4 << 20 };
    char *expect = malloc(BIG + 4096), *got = malloc(BIG + 4096);

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    o.conn = kt_conn_new(&loop, sv[0], KT_CONN_SERVER, "unknown[test]", &o.in, &o.out, on_event, &o);
    for (size_t i = 0; i < BIG; i++)
        expect[i] = (char)('a' + i % 26);
    kt_buf_append(&o.out, expect, BIG);
    kt_conn_flush(o.conn);
    kt_loop_run_once(&loop, 10);
    assert_int_equal(o.events[KT_CONN_EV_SENT], 0);   /* nobody reads: the send waits */
    /* enough to make the owner's buffer grow (and move) several times */
    for (int i = 0; i < 8; i++)
        kt_buf_printf(&o.out, "250-line %d\r\n", i);
    size_t tail = kt_buf_used(&o.out);
    assert_true(tail < 4096);
    memcpy(expect + BIG, kt_buf_head(&o.out), tail);
    kt_conn_flush(o.conn);          /* a send is in flight: this only queues */
    pump_read(&loop, sv[1], got, BIG + tail);
    run_until(&loop, &o.events[KT_CONN_EV_SENT], 1);
    assert_memory_equal(got, expect, BIG + tail);

    owner_close(&o);
    run_until(&loop, &o.events[KT_CONN_EV_CLOSED], 1);
    close(sv[1]);
    owner_free(&o);
    kt_loop_fini(&loop);
    free(expect);
    free(got);
}

static int temp_file(void)
{
    char path[] = "/tmp/kt-test-conn-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    return fd;
}

static void test_splice_into_file(void **state)
{
    struct kt_loop loop;
    struct owner o = { 0 };
    int sv[2];
    char data[100000], back[100000];

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    o.conn = kt_conn_new(&loop, sv[0], KT_CONN_SERVER, "unknown[test]", &o.in, &o.out, on_event, &o);
    int fd = temp_file();
    assert_int_equal(pwrite(fd, "HEAD:", 5, 0), 5);
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)(i * 7);
    /* the peer writes in pieces while the splice runs */
    size_t sent = 0;
    kt_conn_splice(o.conn, fd, 5, sizeof(data));
    size_t moved = 0;
    time_t end = time(NULL) + 10;
    while (moved < sizeof(data) && time(NULL) < end) {
        if (sent < sizeof(data)) {
            ssize_t n = send(sv[1], data + sent, sizeof(data) - sent > 7000 ? 7000 : sizeof(data) - sent, 0);
            if (n > 0)
                sent += (size_t)n;
        }
        int before = o.events[KT_CONN_EV_SPLICED];
        kt_loop_run_once(&loop, 5);
        if (o.events[KT_CONN_EV_SPLICED] > before) {
            assert_true(o.last_res[KT_CONN_EV_SPLICED] > 0);
            moved += (size_t)o.last_res[KT_CONN_EV_SPLICED];
            if (moved < sizeof(data))
                kt_conn_splice(o.conn, fd, 5 + (off_t)moved, sizeof(data) - moved);
        }
    }
    assert_int_equal(moved, sizeof(data));
    assert_int_equal(pread(fd, back, 5, 0), 5);
    assert_memory_equal(back, "HEAD:", 5);
    assert_int_equal(pread(fd, back, sizeof(back), 5), (ssize_t)sizeof(back));
    assert_memory_equal(back, data, sizeof(data));
    assert_int_equal(kt_buf_used(&o.in), 0);   /* nothing went through the input buffer */

    owner_close(&o);
    run_until(&loop, &o.events[KT_CONN_EV_CLOSED], 1);
    close(sv[1]);
    close(fd);
    owner_free(&o);
    kt_loop_fini(&loop);
}

static void test_sendfile(void **state)
{
    struct kt_loop loop;
    struct owner o = { 0 };
    int sv[2];
    static char data[300000], got[300000 + 16];

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    o.conn = kt_conn_new(&loop, sv[1], KT_CONN_CLIENT, "peer", &o.in, &o.out, on_event, &o);
    int fd = temp_file();
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)(i % 251);
    assert_int_equal(write(fd, data, sizeof(data)), (ssize_t)sizeof(data));
    kt_buf_printf(&o.out, "BDAT %zu LAST\r\n", sizeof(data) - 10);
    size_t head = kt_buf_used(&o.out);
    kt_conn_flush(o.conn);
    run_until(&loop, &o.events[KT_CONN_EV_SENT], 1);
    /* the file's bytes from offset 10, after the command; the peer reads as they come */
    kt_conn_sendfile(o.conn, fd, 10, sizeof(data) - 10);
    size_t want = head + sizeof(data) - 10, have = 0;
    time_t end = time(NULL) + 10;
    while ((have < want || !o.events[KT_CONN_EV_SENDFILE]) && time(NULL) < end) {
        ssize_t n = recv(sv[0], got + have, sizeof(got) - have, MSG_DONTWAIT);
        if (n > 0)
            have += (size_t)n;
        kt_loop_run_once(&loop, 5);
    }
    assert_int_equal(o.events[KT_CONN_EV_SENDFILE], 1);
    assert_int_equal(o.last_res[KT_CONN_EV_SENDFILE], 0);
    assert_int_equal(have, want);
    assert_memory_equal(got, "BDAT 299990 LAST\r\n", head);
    assert_memory_equal(got + head, data + 10, sizeof(data) - 10);

    owner_close(&o);
    run_until(&loop, &o.events[KT_CONN_EV_CLOSED], 1);
    close(sv[0]);
    close(fd);
    owner_free(&o);
    kt_loop_fini(&loop);
}

/* A read armed when the owner closes never reports: CLOSED comes once. */
static void test_close_cancels(void **state)
{
    struct kt_loop loop;
    struct owner o = { 0 };
    int sv[2];

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    o.conn = kt_conn_new(&loop, sv[0], KT_CONN_SERVER, "unknown[test]", &o.in, &o.out, on_event, &o);
    kt_conn_arm_read(o.conn, 1024);
    kt_loop_run_once(&loop, 10);
    owner_close(&o);
    owner_close(&o);      /* idempotent */
    assert_int_equal(o.events[KT_CONN_EV_CLOSED], 0);   /* never from inside kt_conn_close */
    assert_int_equal(send(sv[1], "late\r\n", 6, 0), 6);
    run_until(&loop, &o.events[KT_CONN_EV_CLOSED], 1);
    for (int i = 0; i < 5; i++)
        kt_loop_run_once(&loop, 10);
    assert_int_equal(o.events[KT_CONN_EV_CLOSED], 1);
    assert_int_equal(o.events[KT_CONN_EV_INPUT], 0);
    assert_int_equal(o.after_close, 0);
    /* the socket is closed: the peer sees the end */
    char c;
    assert_int_equal(recv(sv[1], &c, 1, 0), 0);
    close(sv[1]);
    owner_free(&o);
    kt_loop_fini(&loop);
}

/* Server and client roles shake hands over the pair, then talk. */
static void test_tls_both_roles(void **state)
{
    struct kt_loop loop;
    struct owner srv = { 0 }, cli = { 0 };
    int sv[2];
    char dir[] = "/tmp/kt-test-conn-tls-XXXXXX", cert[128], key[128], err[256];

    assert_non_null(mkdtemp(dir));
    snprintf(cert, sizeof(cert), "%s/cert.pem", dir);
    snprintf(key, sizeof(key), "%s/key.pem", dir);
    assert_int_equal(kt_tls_make_self_signed(cert, key, "mx.test", err, sizeof(err)), 0);
    SSL_CTX *sctx = SSL_CTX_new(TLS_server_method()), *cctx = SSL_CTX_new(TLS_client_method());
    assert_int_equal(SSL_CTX_use_certificate_file(sctx, cert, SSL_FILETYPE_PEM), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey_file(sctx, key, SSL_FILETYPE_PEM), 1);
    SSL_CTX_set_verify(cctx, SSL_VERIFY_NONE, NULL);

    assert_int_equal(kt_loop_init(&loop, 64), 0);
    pair(sv);
    srv.conn = kt_conn_new(&loop, sv[0], KT_CONN_SERVER, "unknown[test]", &srv.in, &srv.out, on_event, &srv);
    cli.conn = kt_conn_new(&loop, sv[1], KT_CONN_CLIENT, "mx.test[test]:25", &cli.in, &cli.out, on_event, &cli);
    struct kt_ktls_counters counters = { 0 };
    assert_non_null(kt_conn_tls_new(srv.conn, sctx, 1, &counters));
    SSL *cssl = kt_conn_tls_new(cli.conn, cctx, 0, NULL);
    assert_non_null(cssl);
    assert_null(kt_conn_tls_new(cli.conn, cctx, 0, NULL));   /* once */
    SSL_set_tlsext_host_name(cssl, "mx.test");
    kt_conn_start_tls(cli.conn);
    kt_conn_start_tls(srv.conn);
    run_until(&loop, &srv.events[KT_CONN_EV_TLS_READY], 1);
    run_until(&loop, &cli.events[KT_CONN_EV_TLS_READY], 1);
    assert_true(kt_conn_tls_on(srv.conn));
    assert_non_null(strstr(kt_conn_tls_desc(cli.conn), "TLSv1.3 with cipher"));
    assert_int_equal(atomic_load(&counters.sessions_tls), 1);
    /* this kernel may or may not have kTLS: the names say which path each direction took */
    const char *rx = kt_conn_xprt_name(srv.conn, 0);
    assert_true(strcmp(rx, "tls") == 0 || strcmp(rx, "ktls") == 0);
    assert_int_equal(kt_conn_can_splice(srv.conn), strcmp(rx, "ktls") == 0);

    kt_buf_printf(&cli.out, "EHLO client.example\r\n");
    kt_conn_flush(cli.conn);
    kt_conn_arm_read(srv.conn, 1024);
    run_until(&loop, &srv.events[KT_CONN_EV_INPUT], 1);
    assert_int_equal(kt_buf_used(&srv.in), 21);
    assert_memory_equal(kt_buf_head(&srv.in), "EHLO client.example\r\n", 21);

    kt_buf_printf(&srv.out, "250 mx.test\r\n");
    kt_conn_flush(srv.conn);
    kt_conn_arm_read(cli.conn, 1024);
    run_until(&loop, &cli.events[KT_CONN_EV_INPUT], 1);
    assert_memory_equal(kt_buf_head(&cli.in), "250 mx.test\r\n", 13);

    /* the client closes with close_notify: the server reads the end as a TLS-level one */
    owner_close(&cli);
    kt_conn_arm_read(srv.conn, 1024);
    run_until(&loop, &srv.events[KT_CONN_EV_ERROR], 1);
    assert_int_equal(srv.last_res[KT_CONN_EV_ERROR], -EPROTO);
    assert_int_equal(kt_conn_failed_step(srv.conn), KT_CONN_STEP_RECV);
    if (strcmp(rx, "ktls") == 0)
        assert_non_null(strstr(kt_conn_why(srv.conn), "TLS close_notify from unknown[test]"));
    else
        assert_string_equal(kt_conn_why(srv.conn), "connection closed");
    owner_close(&srv);
    run_until(&loop, &srv.events[KT_CONN_EV_CLOSED], 1);
    run_until(&loop, &cli.events[KT_CONN_EV_CLOSED], 1);

    owner_free(&srv);
    owner_free(&cli);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    kt_loop_fini(&loop);
    unlink(cert);
    unlink(key);
    rmdir(dir);
}

int main(void)
{
    /* as the daemon does: OpenSSL writes with write(2), so a closed peer raises SIGPIPE */
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_read_write),
        cmocka_unit_test(test_append_while_sending),
        cmocka_unit_test(test_splice_into_file),
        cmocka_unit_test(test_sendfile),
        cmocka_unit_test(test_close_cancels),
        cmocka_unit_test(test_tls_both_roles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
