/* The connection layer (see conn.h for the contract).
 *
 *   plaintext       io_uring RECV / SEND on the socket
 *   userspace TLS   io_uring POLL for readiness, then SSL_read / SSL_write on
 *                   the non-blocking socket (OpenSSL needs its socket BIO for
 *                   kTLS, so it does those few syscalls itself)
 *   kernel TLS      per direction: once OpenSSL (or ktls.c for TLS 1.3 RX)
 *                   has handed a direction to the kernel, that direction goes
 *                   back to io_uring on the raw socket; RX uses RECVMSG so
 *                   that non-data records (alerts, KeyUpdate) are seen.
 *
 * Every io_uring operation counts in c->pending; the connection is freed
 * only when it is closing and that count is zero, so no completion ever
 * finds it gone. Each completion first checks whether the connection is
 * closing, and every owner callback may close it: code after a callback
 * looks at c->closing before touching anything else.
 *
 * Rule from Postfix's tlsproxy: no plaintext I/O once the handshake started. */
#include <errno.h>
#include <fcntl.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "tls/conn.h"
#include "tls/ktls.h"
#include "tls/tls.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif

#define READ_CHUNK 16384
#define MAX_BUFFERED_INPUT (256 * 1024)
#define MAX_READ (64 * 1024)
#define SSL_READ_AHEAD_BUF (64 * 1024)   /* userspace TLS receive after the handshake: bytes per read(2) */
#define SPLICE_STEP (64 * 1024)
#define SENDFILE_STEP (1u << 30)

/* One direction's transport. recv and send are the entry points; the
 * completions they arm come back through the connection's kt_ops. */
struct kt_xprt_ops {
    const char *name;
    void (*recv)(struct kt_conn *c, size_t chunk);     /* arm one read into the input buffer */
    void (*send)(struct kt_conn *c);                   /* write c->tx, then SENT */
    int (*can_splice)(const struct kt_conn *c);        /* RX: socket -> pipe possible now */
    int can_sendfile;                                  /* TX: file bytes may go out as they are */
    void (*shutdown)(struct kt_conn *c);               /* TX: end the stream (close_notify) */
};

struct kt_conn {
    struct kt_loop *loop;
    int fd;
    enum kt_conn_role role;
    char peer[320];                   /* "unknown[192.0.2.1]" or "mx.example[192.0.2.1]:25" */
    struct kt_buf *in, *out;          /* the owner's */
    struct kt_buf tx;                 /* bytes being written: a send in flight points here */
    kt_conn_cb cb;
    void *owner;
    const struct kt_xprt_ops *rx, *txo;

    unsigned pending;                 /* io_uring operations in flight; free only at 0 */
    int closing;                      /* kt_conn_close called: only CLOSED from now on */
    int failed;                       /* an error or end was reported: no more I/O */
    int corked;                       /* TCP_CORK holds the last output until kt_conn_close */
    int rx_armed, tx_armed;
    size_t rx_chunk;
    struct kt_op connect_op, rx_op, tx_op, rx_poll_op, tx_poll_op, cancel_op, splice_op, sf_poll_op;
    struct sockaddr_storage connect_addr;

    /* TLS */
    SSL *ssl;
    int handshaking, tls_on;
    int ktls_tx, ktls_rx, ktls_rx_tls13;
    struct kt_ktls_counters *counters;
    struct kt_ktls_secret secret;     /* TLS 1.3 client secret for own-key RX (ktls.c fills it) */
    char *tls_desc;                   /* "TLSv1.3 with cipher ...", once TLS is up; NULL before */
    struct msghdr rx_msg;             /* kTLS RX: recvmsg carries the record type */
    struct iovec rx_iov;
    uint8_t rx_cmsg[64];

    /* splice: socket -> pipe -> file */
    int pipe_r, pipe_w;
    int splice_fd;
    off_t splice_off;
    size_t splice_left, splice_done, in_pipe;
    int splice_phase;                 /* 0 poll, 1 socket -> pipe, 2 pipe -> file */

    /* sendfile: file -> socket */
    int sf_fd;
    off_t sf_pos, sf_end;

    enum kt_conn_step failed_step;
    char *why;                        /* the last failure, NULL without one (kt_conn_why) */
};

static const struct kt_xprt_ops xprt_plain, xprt_tls, xprt_ktls;

static void tls_step(struct kt_conn *c);
static void ssl_read_some(struct kt_conn *c);
static void ssl_write_some(struct kt_conn *c);
static void send_next(struct kt_conn *c);
static void sendfile_some(struct kt_conn *c);

/* ---- life cycle ---- */

/* Records why the connection failed, for kt_conn_why (allocated: most connections never fail). */
static void __attribute__((format(printf, 2, 3))) set_why(struct kt_conn *c, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    kt_free(c->why);
    c->why = kt_strdup(buf);
}

static void conn_free_if_done(struct kt_conn *c)
{
    if (!c->closing || c->pending)
        return;
    kt_conn_cb cb = c->cb;
    void *owner = c->owner;
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd);
    if (c->pipe_r >= 0)
        close(c->pipe_r);
    if (c->pipe_w >= 0)
        close(c->pipe_w);
    OPENSSL_cleanse(&c->secret, sizeof(c->secret));
    kt_buf_release(&c->tx);
    kt_free(c->why);
    kt_free(c->tls_desc);
    kt_free(c);
    cb(owner, KT_CONN_EV_CLOSED, 0);
}

/* Bookkeeping every completion shares. Returns 0 when the connection is
 * closing (and possibly freed): the caller must stop there. */
static int op_done(struct kt_conn *c, int *armed)
{
    c->pending--;
    if (armed)
        *armed = 0;
    if (c->closing) {
        conn_free_if_done(c);
        return 0;
    }
    return 1;
}

static struct io_uring_sqe *conn_sqe(struct kt_conn *c, struct kt_op *op)
{
    c->pending++;
    return kt_loop_sqe(c->loop, op);
}

static void emit(struct kt_conn *c, enum kt_conn_event ev, int res)
{
    c->cb(c->owner, ev, res);
}

/* The connection cannot go on: tell the owner once, who closes it. */
static void conn_fail(struct kt_conn *c, enum kt_conn_event ev, enum kt_conn_step step, int res)
{
    if (c->failed || c->closing)
        return;
    c->failed = 1;
    c->failed_step = step;
    if (ev == KT_CONN_EV_ERROR && !c->why)
        set_why(c, "%s", res ? strerror(-res) : "connection closed");
    emit(c, ev, res);
}

/* An OpenSSL failure: the reason for the owner, and on the server side the
 * log line Postfix's smtpd writes ("SSL_read error from unknown[...]: ..."). */
static void tls_fail(struct kt_conn *c, enum kt_conn_step step, int ssl_err, const char *server_what)
{
    unsigned long code = ERR_peek_error();
    if (code)
        set_why(c, "%s", ERR_reason_error_string(code) ? ERR_reason_error_string(code) : "?");
    else
        set_why(c, "%s", ssl_err == SSL_ERROR_ZERO_RETURN ? "connection closed" : "I/O error");
    if (c->role == KT_CONN_SERVER && server_what) {
        char err[256] = "lost connection";
        if (code)
            ERR_error_string_n(code, err, sizeof(err));
        kt_info("%s %s: %s", server_what, c->peer, err);
    }
    ERR_clear_error();
    conn_fail(c, KT_CONN_EV_ERROR, step, -EPROTO);
}


/* ---- reading ---- */

static void input_arrived(struct kt_conn *c, size_t n)
{
    emit(c, KT_CONN_EV_INPUT, (int)n);   /* at most MAX_BUFFERED_INPUT + one record */
}

/* A kTLS RX recvmsg returned a non-data record (in the input buffer past its
 * length): say why the connection ends and return 1, or return 0 for
 * application data. The owner closes, which answers with our close_notify. */
static int ktls_rx_control(struct kt_conn *c, int res)
{
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&c->rx_msg);
    if (!cmsg || cmsg->cmsg_level != SOL_TLS || cmsg->cmsg_type != TLS_GET_RECORD_TYPE)
        return 0;
    unsigned char type = *(unsigned char *)CMSG_DATA(cmsg);
    if (type == 23)
        return 0;     /* application data */
    const unsigned char *rec = (const unsigned char *)c->in->data + c->in->len;
    if (type == 21 && res >= 2 && rec[1] == 0)
        set_why(c, "TLS close_notify from %s", c->peer);
    else if (type == 21 && res >= 2)
        set_why(c, "TLS alert from %s: level %u description %u", c->peer, rec[0], rec[1]);
    else if (type == 22 && res >= 1 && rec[0] == 24)
        set_why(c, "TLS KeyUpdate from %s: this kernel cannot rekey kTLS RX; closing the "
                 "session", c->peer);
    else
        set_why(c, "unexpected TLS record type %u (handshake message %u) from %s; closing",
                 type, res >= 1 ? rec[0] : 0, c->peer);
    if (c->role == KT_CONN_SERVER)
        kt_info("%s", c->why);
    return 1;
}

static void rx_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, rx_op));
    if (!op_done(c, &c->rx_armed))
        return;
    if (c->rx == &xprt_tls) {
        /* a NOP queued because OpenSSL still held decrypted bytes */
        ssl_read_some(c);
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        kt_conn_arm_read(c, c->rx_chunk);
        return;
    }
    if (res == 0) {
        conn_fail(c, KT_CONN_EV_EOF, KT_CONN_STEP_RECV, 0);
        return;
    }
    if (res < 0) {
        conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_RECV, res);
        return;
    }
    if (c->rx == &xprt_ktls && ktls_rx_control(c, res)) {
        conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_RECV, -EPROTO);
        return;
    }
    c->in->len += (size_t)res;
    input_arrived(c, (size_t)res);
}

static void rx_poll_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, rx_poll_op));
    if (!op_done(c, &c->rx_armed))
        return;
    if (c->handshaking)
        tls_step(c);
    else
        ssl_read_some(c);
}

static void arm_poll(struct kt_conn *c, struct kt_op *op, unsigned events)
{
    struct io_uring_sqe *sqe = conn_sqe(c, op);
    io_uring_prep_poll_add(sqe, c->fd, events);
}

static size_t read_room(struct kt_conn *c, size_t chunk);

/* Userspace TLS receive: SSL_read until OpenSSL wants the socket again or the input buffer holds enough. A
 * body read (the owner asked for READ_CHUNK or more) decrypts straight into the input buffer; a command
 * read goes through the thread's scratch record buffer and keeps only what arrived, so an idle TLS
 * connection holds no 16 KB input buffer. */
static void ssl_read_some(struct kt_conn *c)
{
    static __thread char record[READ_CHUNK];
    int direct = c->rx_chunk >= READ_CHUNK;
    size_t got = 0;
    if (direct)
        read_room(c, c->rx_chunk);
    for (;;) {
        if (kt_buf_used(c->in) >= MAX_BUFFERED_INPUT)
            break;
        char *dst = record;
        size_t room = sizeof(record), n = 0;
        if (direct) {
            dst = c->in->data + c->in->len;
            room = c->in->cap - c->in->len;
            if (room == 0)
                break;
        }
        ERR_clear_error();
        int r = SSL_read_ex(c->ssl, dst, room, &n);
        if (r == 1) {
            if (direct)
                c->in->len += n;
            else
                kt_buf_append(c->in, record, n);
            got += n;
            /* Nothing more in OpenSSL's buffers: another SSL_read would
             * mostly be a read(2) that fails with EAGAIN. What the socket
             * still holds is seen by the next poll, which completes at once. */
            if (!SSL_has_pending(c->ssl))
                break;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ)
            break;
        if (got) {
            /* deliver what arrived before the end: a complete QUIT may be in it */
            input_arrived(c, got);
            if (c->closing || c->failed)
                return;
        }
        if (e == SSL_ERROR_ZERO_RETURN) {
            if (c->role == KT_CONN_SERVER)
                kt_info("TLS close_notify from %s", c->peer);
            set_why(c, "connection closed");
            ERR_clear_error();
            conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_RECV, -EPROTO);
        } else if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
            set_why(c, "I/O error");
            conn_fail(c, KT_CONN_EV_EOF, KT_CONN_STEP_RECV, 0);
        } else {
            tls_fail(c, KT_CONN_STEP_RECV, e, "SSL_read error from");
        }
        return;
    }
    if (c->txo == &xprt_ktls && SSL_get_key_update_type(c->ssl) != SSL_KEY_UPDATE_NONE) {
        /* The peer asked for our KeyUpdate, which must precede our next
         * record; OpenSSL sends it only from SSL_write, and this kernel cannot
         * rekey kTLS TX anyway. Answering with the old key would be wrong. */
        set_why(c, "TLS KeyUpdate request from %s: this kernel cannot rekey kTLS TX; "
                 "closing the session", c->peer);
        if (c->role == KT_CONN_SERVER)
            kt_info("%s", c->why);
        conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_RECV, -EPROTO);
        return;
    }
    if (got) {
        input_arrived(c, got);
        return;
    }
    c->rx_armed = 1;
    arm_poll(c, &c->rx_poll_op, POLLIN);
}

static void tls_recv(struct kt_conn *c, size_t chunk)
{
    c->rx_armed = 1;
    if (SSL_has_pending(c->ssl)) {
        /* come back through the loop rather than recursing */
        struct io_uring_sqe *sqe = conn_sqe(c, &c->rx_op);
        io_uring_prep_nop(sqe);
        return;
    }
    arm_poll(c, &c->rx_poll_op, POLLIN);
}

/* Free space after the input buffer's bytes for a read of about chunk bytes. The buffer grows to hold chunk
 * bytes in all, not chunk more than it has: a few bytes left over from the last read do not double it. */
static size_t read_room(struct kt_conn *c, size_t chunk)
{
    size_t used = kt_buf_used(c->in);
    kt_buf_reserve(c->in, used < chunk / 2 ? chunk - used : chunk / 2);
    size_t room = c->in->cap - c->in->len;
    return room > MAX_READ ? MAX_READ : room;
}

static void plain_recv(struct kt_conn *c, size_t chunk)
{
    size_t room = read_room(c, chunk);
    c->rx_armed = 1;
    struct io_uring_sqe *sqe = conn_sqe(c, &c->rx_op);
    io_uring_prep_recv(sqe, c->fd, c->in->data + c->in->len, room, 0);
}

static void ktls_recv(struct kt_conn *c, size_t chunk)
{
    size_t room = read_room(c, chunk);
    c->rx_armed = 1;
    c->rx_iov.iov_base = c->in->data + c->in->len;
    c->rx_iov.iov_len = room;
    memset(&c->rx_msg, 0, sizeof(c->rx_msg));
    c->rx_msg.msg_iov = &c->rx_iov;
    c->rx_msg.msg_iovlen = 1;
    c->rx_msg.msg_control = c->rx_cmsg;
    c->rx_msg.msg_controllen = sizeof(c->rx_cmsg);
    struct io_uring_sqe *sqe = conn_sqe(c, &c->rx_op);
    io_uring_prep_recvmsg(sqe, c->fd, &c->rx_msg, 0);
}

void kt_conn_arm_read(struct kt_conn *c, size_t chunk)
{
    if (c->rx_armed || c->closing || c->failed || c->handshaking)
        return;
    if (kt_buf_used(c->in) >= MAX_BUFFERED_INPUT)
        return;       /* the owner consumes before it reads more */
    c->rx_chunk = chunk ? chunk : READ_CHUNK;
    c->rx->recv(c, c->rx_chunk);
}

/* splice(2) from a kTLS socket fails with EINVAL before a non-data record,
 * so peek at the next record's type: a control record (or an error, or EOF)
 * must go through RECVMSG, which sees and handles it. Nothing queued yet is
 * fine to splice: the splice waits for readability and reports EINVAL if a
 * control record comes first, and the next call here then sees it. */
static int ktls_can_splice(const struct kt_conn *c)
{
    char byte;
    uint8_t cbuf[CMSG_SPACE(sizeof(unsigned char))];
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    ssize_t n = recvmsg(c->fd, &msg, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK;
    if (n == 0)
        return 0;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    return cmsg && cmsg->cmsg_level == SOL_TLS && cmsg->cmsg_type == TLS_GET_RECORD_TYPE
           && *(unsigned char *)CMSG_DATA(cmsg) == 23;
}

static int plain_can_splice(const struct kt_conn *c)
{
    return 1;
}

static int tls_can_splice(const struct kt_conn *c)
{
    return 0;         /* userspace TLS must decrypt in OpenSSL */
}

int kt_conn_can_splice(const struct kt_conn *c)
{
    if (c->closing || c->failed || c->handshaking)
        return 0;
    return c->rx->can_splice(c);
}

/* ---- writing ---- */

/* Take the owner's bytes when ours are all written. Returns 1 if there is
 * something to write. The owner's buffer gets ours back, empty: the two
 * trade places, so no bytes are copied and none move under a send. */
static int take_output(struct kt_conn *c)
{
    if (kt_buf_used(&c->tx))
        return 1;
    if (kt_buf_used(c->out) == 0)
        return 0;
    struct kt_buf t = c->tx;
    kt_buf_reset(&t);
    c->tx = *c->out;
    *c->out = t;
    return 1;
}

static void tx_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, tx_op));
    if (!op_done(c, &c->tx_armed))
        return;
    if (res < 0) {
        if (res == -EAGAIN || res == -EINTR) {
            send_next(c);
            return;
        }
        conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_SEND, res);
        return;
    }
    kt_buf_consume(&c->tx, (size_t)res);
    send_next(c);
}

static void tx_poll_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, tx_poll_op));
    if (!op_done(c, &c->tx_armed))
        return;
    if (c->handshaking)
        tls_step(c);
    else
        ssl_write_some(c);
}

/* Plaintext and kernel TLS TX: one io_uring SEND at a time from c->tx. */
static void send_next(struct kt_conn *c)
{
    if (!take_output(c)) {
        emit(c, KT_CONN_EV_SENT, 0);
        return;
    }
    c->tx_armed = 1;
    struct io_uring_sqe *sqe = conn_sqe(c, &c->tx_op);
    io_uring_prep_send(sqe, c->fd, kt_buf_head(&c->tx), kt_buf_used(&c->tx), MSG_NOSIGNAL);
}

static void plain_send(struct kt_conn *c)
{
    send_next(c);
}

static void ssl_write_some(struct kt_conn *c)
{
    while (take_output(c)) {
        ERR_clear_error();
        int n = SSL_write(c->ssl, kt_buf_head(&c->tx), (int)kt_buf_used(&c->tx));
        if (n > 0) {
            kt_buf_consume(&c->tx, (size_t)n);
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            c->tx_armed = 1;
            arm_poll(c, &c->tx_poll_op, e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN);
            return;
        }
        tls_fail(c, KT_CONN_STEP_SEND, e, "SSL_write error to");
        return;
    }
    emit(c, KT_CONN_EV_SENT, 0);
}

void kt_conn_flush(struct kt_conn *c)
{
    if (c->tx_armed || c->closing || c->failed || c->handshaking || c->sf_fd >= 0)
        return;
    if (kt_buf_used(&c->tx) == 0 && kt_buf_used(c->out) == 0)
        return;
    c->txo->send(c);
}

/* ---- sendfile: file -> socket ---- */

static void sf_poll_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, sf_poll_op));
    if (!op_done(c, NULL))
        return;
    sendfile_some(c);
}

static void sendfile_end(struct kt_conn *c, int res)
{
    c->sf_fd = -1;
    if (res < 0) {
        c->failed_step = KT_CONN_STEP_SEND;
        c->failed = 1;
    }
    emit(c, KT_CONN_EV_SENDFILE, res);
}

static void sendfile_some(struct kt_conn *c)
{
    while (c->sf_pos < c->sf_end) {
        size_t want = (size_t)(c->sf_end - c->sf_pos);
        off_t off = c->sf_pos;
        ssize_t n = sendfile(c->fd, c->sf_fd, &off, want > SENDFILE_STEP ? SENDFILE_STEP : want);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            arm_poll(c, &c->sf_poll_op, POLLOUT);
            return;
        }
        if (n <= 0) {
            int err = n < 0 ? -errno : -EIO;
            set_why(c, "%s", n < 0 ? strerror(errno) : "file truncated");
            sendfile_end(c, err);
            return;
        }
        c->sf_pos += n;
    }
    sendfile_end(c, 0);
}

int kt_conn_can_sendfile(const struct kt_conn *c)
{
    return !c->handshaking && c->txo->can_sendfile;
}

void kt_conn_sendfile(struct kt_conn *c, int fd, off_t off, size_t len)
{
    if (c->closing || c->failed)
        return;
    if (!kt_conn_can_sendfile(c) || c->tx_armed || kt_buf_used(&c->tx) || kt_buf_used(c->out)) {
        set_why(c, "sendfile is not possible on this transport now");
        sendfile_end(c, -EINVAL);
        return;
    }
    c->sf_fd = fd;
    c->sf_pos = off;
    c->sf_end = off + (off_t)len;
    sendfile_some(c);
}

/* ---- splice: socket -> pipe -> file ---- */

static void splice_report(struct kt_conn *c, int res)
{
    c->splice_fd = -1;
    emit(c, KT_CONN_EV_SPLICED, res);
}

static void splice_next(struct kt_conn *c)
{
    struct io_uring_sqe *sqe;
    if (c->in_pipe > 0) {
        c->splice_phase = 2;
        sqe = conn_sqe(c, &c->splice_op);
        io_uring_prep_splice(sqe, c->pipe_r, -1, c->splice_fd, c->splice_off + (off_t)c->splice_done,
                             (unsigned)c->in_pipe, SPLICE_F_MOVE);
        return;
    }
    if (c->splice_left == 0) {
        splice_report(c, (int)c->splice_done);
        return;
    }
    size_t n = c->splice_left < SPLICE_STEP ? c->splice_left : SPLICE_STEP;
    c->splice_phase = 1;
    sqe = conn_sqe(c, &c->splice_op);
    /* SPLICE_F_NONBLOCK: never park an io-wq worker on an idle socket; wait
     * for readability with a poll instead. */
    io_uring_prep_splice(sqe, c->fd, -1, c->pipe_w, -1, (unsigned)n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

static void splice_step(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, splice_op));
    if (!op_done(c, NULL))
        return;
    switch (c->splice_phase) {
    case 0: /* poll */
        if (res < 0) {
            splice_report(c, c->splice_done ? (int)c->splice_done : res);
            return;
        }
        splice_next(c);
        return;
    case 1: /* socket -> pipe */
        if (res == -EAGAIN) {
            struct io_uring_sqe *sqe = conn_sqe(c, &c->splice_op);
            c->splice_phase = 0;
            io_uring_prep_poll_add(sqe, c->fd, POLLIN);
            return;
        }
        if (res <= 0) {
            /* EOF, an error, or (kTLS) a control record: report what moved */
            splice_report(c, c->splice_done ? (int)c->splice_done : res);
            return;
        }
        c->in_pipe = (size_t)res;
        c->splice_left -= (size_t)res;
        splice_next(c);
        return;
    case 2: /* pipe -> file */
        if (res <= 0) {
            set_why(c, "splice into the file: %s", strerror(res < 0 ? -res : EIO));
            c->splice_fd = -1;
            conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_SPLICE_FILE, res < 0 ? res : -EIO);
            return;
        }
        c->in_pipe -= (size_t)res;
        c->splice_done += (size_t)res;
        splice_next(c);
        return;
    }
}

void kt_conn_splice(struct kt_conn *c, int fd, off_t off, size_t len)
{
    if (c->closing || c->failed)
        return;
    if (c->pipe_r < 0) {
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
            splice_report(c, -errno);
            return;
        }
        c->pipe_r = p[0];
        c->pipe_w = p[1];
    }
    c->splice_fd = fd;
    c->splice_off = off;
    c->splice_left = len;
    c->splice_done = 0;
    c->in_pipe = 0;
    splice_next(c);
}

/* ---- TLS ---- */

static void count_ktls(struct kt_conn *c, int version)
{
    struct kt_ktls_counters *k = c->counters;
    if (!k)
        return;
    atomic_fetch_add(&k->sessions_tls, 1);
    if (version == TLS1_3_VERSION) {
        if (c->ktls_tx)
            atomic_fetch_add(&k->tls13_tx, 1);
        if (c->ktls_rx)
            atomic_fetch_add(&k->tls13_rx, 1);
    } else {
        if (c->ktls_tx)
            atomic_fetch_add(&k->tls12_tx, 1);
        if (c->ktls_rx)
            atomic_fetch_add(&k->tls12_rx, 1);
    }
}

static void tls_established(struct kt_conn *c)
{
    int version = SSL_version(c->ssl);

    c->handshaking = 0;
    c->tls_on = 1;
    c->ktls_tx = BIO_get_ktls_send(SSL_get_wbio(c->ssl)) == 1;
    c->ktls_rx = BIO_get_ktls_recv(SSL_get_rbio(c->ssl)) == 1;
    if (!c->ktls_rx && version == TLS1_3_VERSION && c->ktls_tx && c->ktls_rx_tls13 && c->role == KT_CONN_SERVER) {
        int r = kt_ktls_install_tls13_rx(c->ssl, c->fd, &c->secret);
        c->ktls_rx = r == 0;
        if (r < 0 && r != -ENOKEY && r != -EAGAIN)
            kt_info("TLS 1.3 kTLS RX not installed for %s: %s", c->peer, strerror(-r));
    }
    OPENSSL_cleanse(&c->secret, sizeof(c->secret));
    if (!c->ktls_rx) {
        /* Receive stays in userspace for good: OpenSSL may now read ahead, several records per read(2)
         * into a larger buffer (still released when empty, SSL_MODE_RELEASE_BUFFERS), instead of a
         * header read and a body read per record. Never before this point: a record OpenSSL buffered
         * would keep kTLS RX from being installed. */
        SSL_set_default_read_buffer_len(c->ssl, SSL_READ_AHEAD_BUF);
        SSL_set_read_ahead(c->ssl, 1);
    }
    c->rx = c->ktls_rx ? &xprt_ktls : &xprt_tls;
    c->txo = c->ktls_tx ? &xprt_ktls : &xprt_tls;
    char desc[160];
    kt_tls_describe(c->ssl, desc, sizeof(desc));
    kt_free(c->tls_desc);
    c->tls_desc = kt_strdup(desc);
    count_ktls(c, version);
    if (c->role == KT_CONN_SERVER) {
        /* Postfix logs this at loglevel 1; ktrelay always does, as it also
         * says which directions the kernel took over. */
        kt_info("%s TLS connection established from %s: %s, resumed=%s, ktls=%s%s%s",
                kt_tls_ccert_str(kt_tls_peer_trust(c->ssl)), c->peer, c->tls_desc,
                SSL_session_reused(c->ssl) ? "yes" : "no", c->ktls_tx ? "tx" : "", c->ktls_tx && c->ktls_rx ? "+" : "",
                c->ktls_rx ? "rx" : (c->ktls_tx ? "" : "none"));
    }
    emit(c, KT_CONN_EV_TLS_READY, 0);
}

static void tls_step(struct kt_conn *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        tls_established(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        c->rx_armed = 1;
        arm_poll(c, &c->rx_poll_op, POLLIN);
        return;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->tx_armed = 1;
        arm_poll(c, &c->tx_poll_op, POLLOUT);
        return;
    }
    tls_fail(c, KT_CONN_STEP_HANDSHAKE, e, "SSL_accept error from");
}

SSL *kt_conn_tls_new(struct kt_conn *c, SSL_CTX *ctx, int ktls_rx_tls13, struct kt_ktls_counters *counters)
{
    if (c->ssl || c->closing || c->failed || !ctx)
        return NULL;
    SSL *ssl = SSL_new(ctx);
    if (!ssl)
        return NULL;
    if (SSL_set_fd(ssl, c->fd) != 1) {
        SSL_free(ssl);
        return NULL;
    }
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (c->role == KT_CONN_SERVER) {
        SSL_set_accept_state(ssl);
        if (ktls_rx_tls13)
            kt_ktls_track(ssl, &c->secret);
    } else {
        SSL_set_connect_state(ssl);
    }
    c->ssl = ssl;
    c->ktls_rx_tls13 = ktls_rx_tls13;
    c->counters = counters;
    return ssl;
}

void kt_conn_start_tls(struct kt_conn *c)
{
    if (c->closing || c->failed)
        return;
    if (!c->ssl || c->tls_on || c->handshaking || c->rx_armed || c->tx_armed) {
        set_why(c, "cannot start TLS now");
        conn_fail(c, KT_CONN_EV_ERROR, KT_CONN_STEP_HANDSHAKE, -EINVAL);
        return;
    }
    c->handshaking = 1;
    tls_step(c);
}

static void tls_shutdown(struct kt_conn *c)
{
    if (!c->ssl || !c->tls_on)
        return;
    /* best effort close_notify; never wait for the peer's */
    SSL_set_quiet_shutdown(c->ssl, 0);
    ERR_clear_error();
    SSL_shutdown(c->ssl);
    ERR_clear_error();
}

static void plain_shutdown(struct kt_conn *c)
{
}

/* ---- connect, close ---- */

static void connect_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, connect_op));
    if (!op_done(c, NULL))
        return;
    if (res < 0) {
        set_why(c, "%s", strerror(-res));
        c->failed = 1;
        c->failed_step = KT_CONN_STEP_CONNECT;
    }
    emit(c, KT_CONN_EV_CONNECTED, res);
}

void kt_conn_connect(struct kt_conn *c, const struct sockaddr *addr, socklen_t len)
{
    if (len > sizeof(c->connect_addr))
        len = sizeof(c->connect_addr);
    memcpy(&c->connect_addr, addr, len);
    struct io_uring_sqe *sqe = conn_sqe(c, &c->connect_op);
    io_uring_prep_connect(sqe, c->fd, (const struct sockaddr *)&c->connect_addr, len);
}

static void cancel_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_conn *c = (struct kt_conn *)((char *)op - offsetof(struct kt_conn, cancel_op));
    op_done(c, NULL);
}

void kt_conn_last_output(struct kt_conn *c)
{
    int one = 1;
    if (c->corked || c->closing || c->failed || c->role != KT_CONN_SERVER)
        return;
    c->corked = setsockopt(c->fd, IPPROTO_TCP, TCP_CORK, &one, sizeof(one)) == 0;
}

void kt_conn_close(struct kt_conn *c)
{
    if (!c || c->closing)
        return;
    if (!c->handshaking)
        c->txo->shutdown(c);
    /* The held bytes leave now, with the FIN appended to them (close(2) alone
     * would send a reset instead if the client had sent more after QUIT). */
    if (c->corked)
        shutdown(c->fd, SHUT_WR);
    c->closing = 1;
    /* Cancel everything on the socket, including a splice that may be
     * waiting for bytes that will never come. The completion of this cancel
     * is what frees the connection, so CLOSED never fires from inside here. */
    struct io_uring_sqe *sqe = conn_sqe(c, &c->cancel_op);
    io_uring_prep_cancel_fd(sqe, c->fd, IORING_ASYNC_CANCEL_ALL);
}

/* ---- the transports ---- */

static const struct kt_xprt_ops xprt_plain = {
    .name = "plain", .recv = plain_recv, .send = plain_send, .can_splice = plain_can_splice,
    .can_sendfile = 1, .shutdown = plain_shutdown,
};
static const struct kt_xprt_ops xprt_tls = {
    .name = "tls", .recv = tls_recv, .send = ssl_write_some, .can_splice = tls_can_splice,
    .can_sendfile = 0, .shutdown = tls_shutdown,
};
static const struct kt_xprt_ops xprt_ktls = {
    .name = "ktls", .recv = ktls_recv, .send = plain_send, .can_splice = ktls_can_splice,
    .can_sendfile = 1, .shutdown = tls_shutdown,
};

struct kt_conn *kt_conn_new(struct kt_loop *loop, int fd, enum kt_conn_role role, const char *peer,
                            struct kt_buf *in, struct kt_buf *out, kt_conn_cb cb, void *owner)
{
    struct kt_conn *c = kt_calloc(1, sizeof(*c));
    c->loop = loop;
    c->fd = fd;
    c->role = role;
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
    c->in = in;
    c->out = out;
    c->cb = cb;
    c->owner = owner;
    c->rx = c->txo = &xprt_plain;
    c->pipe_r = c->pipe_w = -1;
    c->splice_fd = c->sf_fd = -1;
    c->connect_op.cb = connect_done;
    c->rx_op.cb = rx_done;
    c->tx_op.cb = tx_done;
    c->rx_poll_op.cb = rx_poll_done;
    c->tx_poll_op.cb = tx_poll_done;
    c->sf_poll_op.cb = sf_poll_done;
    c->splice_op.cb = splice_step;
    c->cancel_op.cb = cancel_done;
    /* Each group of replies (server) or of pipelined commands and the body's
     * last segment (client) is one write: it must not wait for the peer's
     * delayed ACK. An accepted socket inherits TCP_NODELAY from its listening
     * socket (server.c sets it there), which saves a system call per client. */
    if (role == KT_CONN_CLIENT) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    return c;
}

/* ---- what the owner may ask ---- */

SSL *kt_conn_ssl(const struct kt_conn *c)
{
    return c ? c->ssl : NULL;
}

int kt_conn_tls_on(const struct kt_conn *c)
{
    return c && c->tls_on;
}

unsigned kt_conn_ktls(const struct kt_conn *c)
{
    return (c->ktls_tx ? KT_CONN_KTLS_TX : 0) | (c->ktls_rx ? KT_CONN_KTLS_RX : 0);
}

const char *kt_conn_tls_desc(const struct kt_conn *c)
{
    return c->tls_on && c->tls_desc ? c->tls_desc : "";
}

const char *kt_conn_why(const struct kt_conn *c)
{
    return c->why ? c->why : "";
}

enum kt_conn_step kt_conn_failed_step(const struct kt_conn *c)
{
    return c->failed_step;
}

const char *kt_conn_xprt_name(const struct kt_conn *c, int tx)
{
    return tx ? c->txo->name : c->rx->name;
}

void kt_conn_set_peer(struct kt_conn *c, const char *peer)
{
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
}

int kt_conn_fd(const struct kt_conn *c)
{
    return c->closing ? -1 : c->fd;
}
