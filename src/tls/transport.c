/* Session transport: how bytes move between the socket and the session
 * buffers.
 *
 *   plaintext       io_uring RECV / SEND on the socket
 *   userspace TLS   io_uring POLL for readiness, then SSL_read / SSL_write on
 *                   the non-blocking socket (OpenSSL needs its socket BIO for
 *                   kTLS, so it does those few syscalls itself)
 *   kernel TLS      per direction: once OpenSSL (or ktls.c for TLS 1.3 RX) has
 *                   handed a direction to the kernel, that direction goes back
 *                   to io_uring on the raw socket; RX uses RECVMSG so that
 *                   non-data records (alerts, KeyUpdate) are seen and handled.
 *
 * Rule from Postfix's tlsproxy: no plaintext I/O once the handshake started. */
#include <errno.h>
#include <linux/tls.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tls/ktls.h"
#include "metrics/metrics.h"
#include "core/log.h"
#include "smtpd/server.h"
#include "smtpd/session.h"
#include "conf/settings.h"
#include "tls/tls.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif

#define READ_CHUNK 16384
#define MAX_BUFFERED_INPUT (256 * 1024)

#define SESSION_OF(ptr, member) ((struct kt_session *)((char *)(ptr) - offsetof(struct kt_session, member)))

static void tls_step(struct kt_session *s);
static void ssl_read_some(struct kt_session *s);
static void ssl_write_some(struct kt_session *s);

static struct io_uring_sqe *session_sqe(struct kt_session *s, struct kt_op *op)
{
    s->pending++;
    return kt_loop_sqe(&s->worker->loop, op);
}

static void session_fail(struct kt_session *s, const char *what, int err)
{
    if (!s->dead && what)
        kt_info("%s after %s from unknown[%s]%s%s", what, s->state == KT_SS_DATA ? "DATA" : "command", s->addr,
                err ? ": " : "", err ? strerror(err) : "");
    kt_xprt_close(s);
}

/* ---- reading ---- */

/* A kTLS RX recvmsg returned a non-data record (in s->in past its length):
 * log why the session ends and return 1, or return 0 for application data.
 * The caller closes, which answers with our own close_notify. */
static int ktls_rx_control(struct kt_session *s, int res)
{
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&s->rx_msg);
    if (!cmsg || cmsg->cmsg_level != SOL_TLS || cmsg->cmsg_type != TLS_GET_RECORD_TYPE)
        return 0;
    unsigned char type = *(unsigned char *)CMSG_DATA(cmsg);
    if (type == 23)
        return 0;     /* application data */
    const unsigned char *rec = (const unsigned char *)s->in.data + s->in.len;
    if (type == 21 && res >= 2 && rec[1] == 0)
        kt_info("TLS close_notify from unknown[%s]", s->addr);
    else if (type == 21 && res >= 2)
        kt_info("TLS alert from unknown[%s]: level %u description %u", s->addr, rec[0], rec[1]);
    else if (type == 22 && res >= 1 && rec[0] == 24)
        kt_info("TLS KeyUpdate from unknown[%s]: this kernel cannot rekey kTLS RX; closing the session", s->addr);
    else
        kt_info("unexpected TLS record type %u (handshake message %u) from unknown[%s]; closing", type,
                res >= 1 ? rec[0] : 0, s->addr);
    return 1;
}

/* Bookkeeping shared by every socket completion. Returns 0 when the session
 * is closing (and has possibly been freed): the caller must stop there. */
static int socket_op_done(struct kt_session *s, int *armed)
{
    s->pending--;
    *armed = 0;
    if (s->dead) {
        kt_session_maybe_free(s);
        return 0;
    }
    return 1;
}

static void rx_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = SESSION_OF(op, rx_op);
    if (!socket_op_done(s, &s->rx_armed))
        return;
    if (s->ssl && !s->ktls_rx) {
        /* a NOP queued because OpenSSL still held decrypted bytes */
        ssl_read_some(s);
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        kt_xprt_arm_read(s);
        return;
    }
    if (res <= 0) {
        if (res == 0)
            kt_info("lost connection after %s from unknown[%s]", s->state == KT_SS_DATA ? "DATA" : "command",
                    s->addr);
        session_fail(s, res == 0 ? NULL : "read error", -res);
        kt_session_maybe_free(s);
        return;
    }
    if (s->ktls_rx && ktls_rx_control(s, res)) {
        kt_xprt_close(s);
        kt_session_maybe_free(s);
        return;
    }
    s->in.len += (size_t)res;
    kt_session_on_input(s);
}

static void rx_poll_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = SESSION_OF(op, rx_poll_op);
    if (!socket_op_done(s, &s->rx_armed))
        return;
    if (s->state == KT_SS_HANDSHAKE)
        tls_step(s);
    else
        ssl_read_some(s);
}

static void arm_poll(struct kt_session *s, struct kt_op *op, unsigned events)
{
    struct io_uring_sqe *sqe = session_sqe(s, op);
    io_uring_prep_poll_add(sqe, s->fd, events);
}

static void ssl_read_some(struct kt_session *s)
{
    size_t got = 0;
    for (;;) {
        if (kt_buf_used(&s->in) >= MAX_BUFFERED_INPUT)
            break;
        /* Decrypt into the thread's scratch record buffer, then keep only
         * what arrived: an idle TLS session holds no 16 KB input buffer. */
        static __thread char record[READ_CHUNK];
        ERR_clear_error();
        int n = SSL_read(s->ssl, record, (int)sizeof(record));
        if (n > 0) {
            kt_buf_append(&s->in, record, (size_t)n);
            got += (size_t)n;
            continue;
        }
        int e = SSL_get_error(s->ssl, n);
        if (e == SSL_ERROR_WANT_READ)
            break;
        if (e == SSL_ERROR_ZERO_RETURN) {
            kt_info("TLS close_notify from unknown[%s]", s->addr);
        } else if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
            kt_info("lost connection after %s from unknown[%s]", s->state == KT_SS_DATA ? "DATA" : "command",
                    s->addr);
        } else {
            char err[256];
            ERR_error_string_n(ERR_get_error(), err, sizeof(err));
            kt_info("SSL_read error from unknown[%s]: %s", s->addr, err);
        }
        if (got) {
            /* deliver what arrived before the end: a complete QUIT may be in it */
            kt_session_on_input(s);
        }
        session_fail(s, NULL, 0);
        kt_session_maybe_free(s);
        return;
    }
    if (s->ktls_tx && SSL_get_key_update_type(s->ssl) != SSL_KEY_UPDATE_NONE) {
        /* The peer asked for our KeyUpdate, which must precede our next
         * record; OpenSSL sends it only from SSL_write, and this kernel cannot
         * rekey kTLS TX anyway. Answering with the old key would be wrong. */
        kt_info("TLS KeyUpdate request from unknown[%s]: this kernel cannot rekey kTLS TX; closing the session",
                s->addr);
        session_fail(s, NULL, 0);
        kt_session_maybe_free(s);
        return;
    }
    if (got) {
        kt_session_on_input(s);
        return;
    }
    s->rx_armed = 1;
    arm_poll(s, &s->rx_poll_op, POLLIN);
}

void kt_xprt_arm_read(struct kt_session *s)
{
    if (s->rx_armed || s->dead)
        return;
    if (kt_buf_used(&s->in) >= MAX_BUFFERED_INPUT)
        return;       /* the session consumes before it reads more */
    s->rx_armed = 1;
    if (s->ssl && !s->ktls_rx) {
        if (SSL_has_pending(s->ssl)) {
            /* come back through the loop rather than recursing */
            struct io_uring_sqe *sqe = session_sqe(s, &s->rx_op);
            io_uring_prep_nop(sqe);
            return;
        }
        arm_poll(s, &s->rx_poll_op, POLLIN);
        return;
    }
    kt_buf_reserve(&s->in, s->state == KT_SS_COMMAND ? 1024 : READ_CHUNK);
    size_t room = s->in.cap - s->in.len;
    if (room > 65536)
        room = 65536;
    struct io_uring_sqe *sqe = session_sqe(s, &s->rx_op);
    if (s->ktls_rx) {
        s->rx_iov.iov_base = s->in.data + s->in.len;
        s->rx_iov.iov_len = room;
        memset(&s->rx_msg, 0, sizeof(s->rx_msg));
        s->rx_msg.msg_iov = &s->rx_iov;
        s->rx_msg.msg_iovlen = 1;
        s->rx_msg.msg_control = s->rx_cmsg;
        s->rx_msg.msg_controllen = sizeof(s->rx_cmsg);
        io_uring_prep_recvmsg(sqe, s->fd, &s->rx_msg, 0);
    } else {
        io_uring_prep_recv(sqe, s->fd, s->in.data + s->in.len, room, 0);
    }
}

/* splice(2) from a kTLS socket fails with EINVAL before a non-data record,
 * so peek at the next record's type: a control record (or an error, or EOF)
 * must go through RECVMSG, which sees and handles it. Nothing queued yet is
 * fine to splice: the splice waits for readability and reports EINVAL if a
 * control record comes first, and the next call here then sees it. */
static int ktls_next_is_data(const struct kt_session *s)
{
    char byte;
    uint8_t cbuf[CMSG_SPACE(sizeof(unsigned char))];
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    ssize_t n = recvmsg(s->fd, &msg, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK;
    if (n == 0)
        return 0;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    return cmsg && cmsg->cmsg_level == SOL_TLS && cmsg->cmsg_type == TLS_GET_RECORD_TYPE
           && *(unsigned char *)CMSG_DATA(cmsg) == 23;
}

int kt_xprt_can_splice(const struct kt_session *s)
{
    /* userspace TLS must decrypt in OpenSSL; kTLS RX and plaintext can splice */
    if (!s->ssl)
        return 1;
    return s->ktls_rx && ktls_next_is_data(s);
}

/* ---- writing ---- */

static void tx_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = SESSION_OF(op, tx_op);
    if (!socket_op_done(s, &s->tx_armed))
        return;
    if (res < 0) {
        if (res == -EAGAIN || res == -EINTR) {
            kt_xprt_flush(s);
            return;
        }
        session_fail(s, "write error", -res);
        kt_session_maybe_free(s);
        return;
    }
    kt_buf_consume(&s->out, (size_t)res);
    if (kt_buf_used(&s->out)) {
        kt_xprt_flush(s);
        return;
    }
    kt_session_on_sent(s);
}

static void tx_poll_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = SESSION_OF(op, tx_poll_op);
    if (!socket_op_done(s, &s->tx_armed))
        return;
    if (s->state == KT_SS_HANDSHAKE)
        tls_step(s);
    else
        ssl_write_some(s);
}

static void ssl_write_some(struct kt_session *s)
{
    while (kt_buf_used(&s->out)) {
        ERR_clear_error();
        int n = SSL_write(s->ssl, kt_buf_head(&s->out), (int)kt_buf_used(&s->out));
        if (n > 0) {
            kt_buf_consume(&s->out, (size_t)n);
            continue;
        }
        int e = SSL_get_error(s->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            s->tx_armed = 1;
            arm_poll(s, &s->tx_poll_op, e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN);
            return;
        }
        char err[256];
        ERR_error_string_n(ERR_get_error(), err, sizeof(err));
        kt_info("SSL_write error to unknown[%s]: %s", s->addr, err);
        session_fail(s, NULL, 0);
        return;
    }
    kt_session_on_sent(s);
}

void kt_xprt_flush(struct kt_session *s)
{
    if (s->tx_armed || s->dead || kt_buf_used(&s->out) == 0)
        return;
    if (s->ssl && !s->ktls_tx) {
        ssl_write_some(s);
        return;
    }
    s->tx_armed = 1;
    struct io_uring_sqe *sqe = session_sqe(s, &s->tx_op);
    io_uring_prep_send(sqe, s->fd, kt_buf_head(&s->out), kt_buf_used(&s->out), MSG_NOSIGNAL);
}

/* ---- TLS handshake ---- */

static void tls_established(struct kt_session *s)
{
    struct kt_server *srv = kt_server_of(s->worker);
    int version = SSL_version(s->ssl);

    s->tls_on = 1;
    s->ktls_tx = BIO_get_ktls_send(SSL_get_wbio(s->ssl)) == 1;
    s->ktls_rx = BIO_get_ktls_recv(SSL_get_rbio(s->ssl)) == 1;
    if (!s->ktls_rx && version == TLS1_3_VERSION && s->ktls_tx && s->cfg->ktls_rx_tls13)
        s->ktls_rx = kt_ktls_install_tls13_rx(s) == 0;
    kt_tls_describe(s->ssl, s->tls_desc, sizeof(s->tls_desc));
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    kt_metric_tls_handshake(version, SSL_session_reused(s->ssl), (double)(now.tv_sec - s->tls_t0.tv_sec)
                            + (double)(now.tv_nsec - s->tls_t0.tv_nsec) / 1e9, s->ktls_tx, s->ktls_rx);
    atomic_fetch_add(&srv->ktls.sessions_tls, 1);
    if (version == TLS1_3_VERSION) {
        if (s->ktls_tx)
            atomic_fetch_add(&srv->ktls.tls13_tx, 1);
        if (s->ktls_rx)
            atomic_fetch_add(&srv->ktls.tls13_rx, 1);
    } else {
        if (s->ktls_tx)
            atomic_fetch_add(&srv->ktls.tls12_tx, 1);
        if (s->ktls_rx)
            atomic_fetch_add(&srv->ktls.tls12_rx, 1);
    }
    /* Postfix logs this at loglevel 1; ktrelay always does, as it also says
     * which directions the kernel took over. */
    kt_info("%s TLS connection established from unknown[%s]: %s, resumed=%s, ktls=%s%s%s",
                SSL_get0_peer_certificate(s->ssl) ? "Untrusted" : "Anonymous", s->addr, s->tls_desc,
                SSL_session_reused(s->ssl) ? "yes" : "no", s->ktls_tx ? "tx" : "", s->ktls_tx && s->ktls_rx ? "+" : "",
                s->ktls_rx ? "rx" : (s->ktls_tx ? "" : "none"));
    kt_session_on_tls_ready(s);
}

static void tls_step(struct kt_session *s)
{
    ERR_clear_error();
    int r = SSL_do_handshake(s->ssl);
    if (r == 1) {
        tls_established(s);
        return;
    }
    int e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        s->rx_armed = 1;
        arm_poll(s, &s->rx_poll_op, POLLIN);
        return;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        s->tx_armed = 1;
        arm_poll(s, &s->tx_poll_op, POLLOUT);
        return;
    }
    unsigned long code = ERR_get_error();
    if (code) {
        char err[256];
        ERR_error_string_n(code, err, sizeof(err));
        kt_info("SSL_accept error from unknown[%s]: %s", s->addr, err);
    } else {
        kt_info("SSL_accept error from unknown[%s]: lost connection", s->addr);
    }
    session_fail(s, NULL, 0);
    kt_session_maybe_free(s);
}

void kt_xprt_start_tls(struct kt_session *s)
{
    clock_gettime(CLOCK_MONOTONIC, &s->tls_t0);
    s->ssl = SSL_new(kt_tls_server_ctx(s->cfg->tls));
    if (!s->ssl || SSL_set_fd(s->ssl, s->fd) != 1) {
        kt_err("cannot create TLS session for unknown[%s]", s->addr);
        session_fail(s, NULL, 0);
        kt_session_maybe_free(s);
        return;
    }
    SSL_set_mode(s->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_set_app_data(s->ssl, s);
    SSL_set_accept_state(s->ssl);
    tls_step(s);
}

/* ---- teardown ---- */

static void cancel_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = SESSION_OF(op, cancel_op);
    s->pending--;
    kt_session_maybe_free(s);
}

void kt_xprt_close(struct kt_session *s)
{
    if (s->dead)
        return;
    s->dead = 1;
    if (s->ssl && s->tls_on) {
        /* best effort close_notify; never wait for the peer's */
        SSL_set_quiet_shutdown(s->ssl, 0);
        ERR_clear_error();
        SSL_shutdown(s->ssl);
    }
    /* Cancel everything on the socket, including a delivery's splice that
     * may be waiting for bytes that will never come. */
    struct io_uring_sqe *sqe = session_sqe(s, &s->cancel_op);
    io_uring_prep_cancel_fd(sqe, s->fd, IORING_ASYNC_CANCEL_ALL);
}

void kt_xprt_init_ops(struct kt_session *s)
{
    s->rx_op.cb = rx_done;
    s->tx_op.cb = tx_done;
    s->rx_poll_op.cb = rx_poll_done;
    s->tx_poll_op.cb = tx_poll_done;
    s->cancel_op.cb = cancel_done;
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}
