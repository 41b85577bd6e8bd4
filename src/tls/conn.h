/* One connection: a TCP socket, its TLS state, and the transport that moves
 * its bytes. The SMTP server session (smtpd/session.c) and the outbound SMTP
 * client (queue/smtp_client.c) both sit on it and see the network only
 * through the functions below and one event callback.
 *
 * Each direction has its own transport operations table (struct
 * kt_xprt_ops, in the manner of HAProxy's xprt_ops): plaintext, userspace
 * TLS (OpenSSL), or kernel TLS. A connection starts plaintext; after the TLS
 * handshake each direction that OpenSSL (or ktls.c for the TLS 1.3 receive
 * keys) handed to the kernel switches to the kernel TLS table, the other to
 * userspace TLS. Zero-copy paths exist only here: splice(2) from the socket
 * into a file (BDAT bodies) and sendfile(2) from a file to the socket (queue
 * bodies), each offered only when the transport allows it.
 *
 * Ownership: the connection owns its socket and its SSL and frees both; the
 * owner owns the input and output buffers it lends (they must outlive the
 * connection, i.e. until KT_CONN_EV_CLOSED). Bytes from kt_conn_flush are
 * moved out of the owner's output buffer into the connection's own, so the
 * owner may append replies at any time, even with a send in flight.
 *
 * Events reach the owner from the event loop, except where a function below
 * says an event may come before it returns (kt_conn_flush, kt_conn_start_tls,
 * kt_conn_sendfile, and kt_conn_splice when no pipe can be made), so an owner
 * must not rely on state it changes after such a call. After kt_conn_close
 * the only event is KT_CONN_EV_CLOSED, once, when no operation refers to the
 * connection any more; the connection is freed before that callback, which
 * is where the owner may free the buffers and itself.
 *
 * The process must ignore SIGPIPE: OpenSSL writes to the socket with
 * write(2), which raises it when the peer has gone. */
#ifndef KTRELAY_CONN_H
#define KTRELAY_CONN_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "core/buf.h"
#include "core/loop.h"
#include "tls/ktls.h"

struct kt_conn;

/* Server side: accepts TLS, logs TLS events as Postfix's smtpd does
 * ("TLS close_notify from unknown[addr]", "SSL_accept error from ...").
 * Client side: connects, starts TLS as a client, logs nothing itself; the
 * owner reads kt_conn_why() for its deferral reasons, as Postfix's smtp does. */
enum kt_conn_role { KT_CONN_SERVER, KT_CONN_CLIENT };

enum kt_conn_event {
    KT_CONN_EV_CONNECTED,   /* kt_conn_connect finished: res 0 or -errno */
    KT_CONN_EV_INPUT,       /* res > 0 bytes were appended to the input buffer */
    KT_CONN_EV_SENT,        /* everything flushed has been written */
    KT_CONN_EV_TLS_READY,   /* handshake done; all I/O is TLS from now on */
    KT_CONN_EV_SPLICED,     /* kt_conn_splice ended: res > 0 bytes are in the file, 0 end of stream,
                               -EINVAL a kernel TLS control record is next (read normally), else -errno */
    KT_CONN_EV_SENDFILE,    /* kt_conn_sendfile ended: res 0 all sent, or -errno (see kt_conn_why) */
    KT_CONN_EV_EOF,         /* the peer ended the stream without a TLS-level reason (TCP FIN) */
    KT_CONN_EV_ERROR,       /* res -errno, or -EPROTO for a TLS-level end (logged on the server
                               side); kt_conn_failed_step and kt_conn_why say where and why */
    KT_CONN_EV_CLOSED,      /* after kt_conn_close: nothing is in flight, the connection is gone */
};

/* Which operation an error event comes from. */
enum kt_conn_step {
    KT_CONN_STEP_NONE, KT_CONN_STEP_CONNECT, KT_CONN_STEP_RECV, KT_CONN_STEP_SEND, KT_CONN_STEP_HANDSHAKE,
    KT_CONN_STEP_SPLICE_FILE,   /* writing spliced bytes into the file failed */
};

typedef void (*kt_conn_cb)(void *owner, enum kt_conn_event ev, int res);

/* Takes ownership of fd (a non-blocking stream socket, connected unless
 * kt_conn_connect follows). A client socket gets TCP_NODELAY here; a server
 * socket comes from accept(2) and has it from its listening socket. peer names the other end in log lines
 * ("unknown[192.0.2.1]"); it is copied. Never fails. */
struct kt_conn *kt_conn_new(struct kt_loop *loop, int fd, enum kt_conn_role role, const char *peer,
                            struct kt_buf *in, struct kt_buf *out, kt_conn_cb cb, void *owner);
/* Connect the socket (io_uring connect); KT_CONN_EV_CONNECTED follows. addr is copied. */
void kt_conn_connect(struct kt_conn *c, const struct sockaddr *addr, socklen_t len);

/* Read more into the input buffer, at most chunk bytes per read on plaintext
 * and kernel TLS; KT_CONN_EV_INPUT, _EOF or _ERROR follows. No-op while a
 * read is armed, while the input buffer holds 256 KB unconsumed (the owner
 * consumes first), during the handshake, or once closing. */
void kt_conn_arm_read(struct kt_conn *c, size_t chunk);
/* Write the owner's output buffer (it is emptied at once; the bytes move to
 * the connection); KT_CONN_EV_SENT when all is written. With userspace TLS
 * the write is a direct SSL_write and SENT may fire before this returns. */
void kt_conn_flush(struct kt_conn *c);

/* Create the connection's SSL from ctx for its role (accept or connect
 * state) and return it so that the owner can set its peer policy (SNI,
 * verification) before kt_conn_start_tls. The connection owns it. On the
 * server side with ktls_rx_tls13, a TLS 1.3 session whose TX went to the
 * kernel also gets its RX keys installed by ktls.c. counters (optional)
 * count the directions offloaded. NULL on failure or when TLS was started. */
SSL *kt_conn_tls_new(struct kt_conn *c, SSL_CTX *ctx, int ktls_rx_tls13, struct kt_ktls_counters *counters);
/* Run the handshake (Postfix tlsproxy's rule: no plaintext I/O from here on);
 * KT_CONN_EV_TLS_READY or KT_CONN_EV_ERROR (step HANDSHAKE) follows, possibly
 * before this returns. */
void kt_conn_start_tls(struct kt_conn *c);

/* 1 when input may move socket -> pipe -> file right now: plaintext, or
 * kernel TLS RX with application data next (userspace TLS must decrypt). */
int kt_conn_can_splice(const struct kt_conn *c);
/* Move len bytes from the socket into file fd at offset off (zero copy,
 * through the connection's pipe); KT_CONN_EV_SPLICED reports what moved
 * (before this returns only if no pipe can be made). A failed write into the
 * file is KT_CONN_EV_ERROR with step KT_CONN_STEP_SPLICE_FILE.
 * The input buffer must be empty. fd must stay open until the event, or until
 * KT_CONN_EV_CLOSED if the connection is closed meanwhile. */
void kt_conn_splice(struct kt_conn *c, int fd, off_t off, size_t len);
/* 1 when the transmit side can take file bytes as they are: plaintext or kernel TLS TX. */
int kt_conn_can_sendfile(const struct kt_conn *c);
/* Send len bytes of fd from off with sendfile(2) after whatever was flushed;
 * KT_CONN_EV_SENDFILE follows, possibly before this returns. */
void kt_conn_sendfile(struct kt_conn *c, int fd, off_t off, size_t len);

/* The owner's next output is its last (a 221 or 421 before the close): TCP
 * holds it (TCP_CORK) until kt_conn_close, so that the reply, the TLS
 * close_notify and the FIN leave in one segment instead of three. No-op on a
 * socket that is not TCP. */
void kt_conn_last_output(struct kt_conn *c);
/* Stop: send a TLS close_notify (best effort, never waiting for the peer's),
 * end the stream (FIN) when kt_conn_last_output held the last bytes, cancel
 * every operation on the socket, then close it and free the SSL.
 * KT_CONN_EV_CLOSED follows from the event loop. Idempotent; NULL is fine. */
void kt_conn_close(struct kt_conn *c);

/* The SSL after kt_conn_tls_new (owned by the connection), else NULL. */
SSL *kt_conn_ssl(const struct kt_conn *c);
/* 1 once the handshake finished. */
int kt_conn_tls_on(const struct kt_conn *c);
/* Directions in the kernel: bit 0 TX, bit 1 RX. */
#define KT_CONN_KTLS_TX 1
#define KT_CONN_KTLS_RX 2
unsigned kt_conn_ktls(const struct kt_conn *c);
/* "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" once TLS is on, else "". */
const char *kt_conn_tls_desc(const struct kt_conn *c);
/* Why the last error event came: an OpenSSL reason, "connection closed", a strerror text. */
const char *kt_conn_why(const struct kt_conn *c);
enum kt_conn_step kt_conn_failed_step(const struct kt_conn *c);
/* Rename the other end in log lines (the real client behind a proxy, its
 * name once DNS gave one). */
void kt_conn_set_peer(struct kt_conn *c, const char *peer);
/* The socket, for an owner that must read a protocol header with exact
 * lengths before any I/O of the connection (the PROXY protocol); -1 once
 * closing. The owner must not close it, and its own operations on it are
 * cancelled by kt_conn_close like the connection's. */
int kt_conn_fd(const struct kt_conn *c);
/* Name of a transport per direction ("plain", "tls", "ktls"), for logs and tests. */
const char *kt_conn_xprt_name(const struct kt_conn *c, int tx);

#endif
