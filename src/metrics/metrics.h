/* Prometheus metrics: counters, gauges and histograms kept per thread and
 * summed when scraped.
 *
 * Each thread that records a value gets its own cache-line aligned shard on
 * first use; only that thread writes it (relaxed atomic load + store: plain
 * moves on x86, no locked instruction, no shared cache line), so recording
 * costs the event loops nothing measurable. A scrape (another thread) reads
 * every shard with relaxed loads and adds them up; shards are registered
 * once under a mutex and live until kt_metrics_shutdown(). The names, labels
 * and units are the exposition's (text format 0.0.4); every count agrees with
 * a log line: messages received with "message-id=" lines, deliveries with
 * "to=... status=" lines, rejects with "reject:" lines. */
#ifndef KTRELAY_METRICS_H
#define KTRELAY_METRICS_H

#include <stddef.h>

enum kt_metric {
    KT_M_MESSAGES_RECEIVED,          /* ktrelay_messages_received_total */
    KT_M_DELIVERY_SENT,              /* ktrelay_deliveries_total{status="sent"} */
    KT_M_DELIVERY_DEFERRED,          /* {status="deferred"} */
    KT_M_DELIVERY_BOUNCED,           /* {status="bounced"} */
    KT_M_DELIVERY_EXPIRED,           /* {status="expired"} */
    KT_M_REJECT_RCPT,                /* ktrelay_smtpd_rejects_total{stage="rcpt"} */
    KT_M_REJECT_DATA,                /* {stage="data"} */
    KT_M_CONN_SMTPD,                 /* gauge ktrelay_connections{service="smtpd"} */
    KT_M_CONN_SMTP,                  /* {service="smtp"}: outbound */
    KT_M_TLS_SESSIONS,               /* ktrelay_tls_sessions_total (inbound handshakes completed) */
    KT_M_TLS12_NEW, KT_M_TLS12_RESUMED, KT_M_TLS13_NEW, KT_M_TLS13_RESUMED, KT_M_TLS_OTHER,
                                     /* ktrelay_tls_handshakes_total{version,resumed} */
    KT_M_KTLS_TX, KT_M_KTLS_RX,      /* ktrelay_ktls_sessions_total{direction} */
    KT_M_TLS_BYTES_RX_KTLS,          /* ktrelay_tls_bytes_total{direction="rx",path="ktls"} (message bytes) */
    KT_M_TLS_BYTES_RX_USER,          /* {direction="rx",path="userspace"} */
    KT_M_QUEUE_ACTIVE,               /* gauge ktrelay_queue_messages{queue="active"} (set by the queue manager) */
    KT_M_QUEUE_DEFERRED,             /* {queue="deferred"} */
    KT_M_QUEUE_HOLD,                 /* {queue="hold"} */
    KT_M_COUNT
};

enum kt_histogram { KT_H_TLS_HANDSHAKE, KT_H_DELIVERY, KT_H_COUNT };

/* Add n (may be negative for a gauge) to this thread's value. */
void kt_metric_add(enum kt_metric m, long long n);
static inline void kt_metric_inc(enum kt_metric m) { kt_metric_add(m, 1); }
/* Set this thread's value of a gauge that only one thread maintains. */
void kt_metric_set(enum kt_metric m, long long v);
/* One observation, in seconds. */
void kt_metric_observe(enum kt_histogram h, double seconds);
/* A TLS handshake completed: version is SSL_version()'s (0x0303, 0x0304). */
void kt_metric_tls_handshake(int version, int resumed, double seconds, int ktls_tx, int ktls_rx);

/* The text exposition of every metric (kt_malloc'ed, *len bytes). */
char *kt_metrics_render(size_t *len);

/* "host:port", "[v6]:port" or ":port" (all addresses). 0, or -EINVAL with err. */
int kt_metrics_parse_address(const char *text, char *host, size_t hostlen, unsigned *port, char *err,
                             size_t errlen);
/* Serve GET /metrics on address (libmicrohttpd, one internal epoll thread;
 * never a thread per request). 0 or -errno with err set. */
int kt_metrics_http_start(const char *address, char *err, size_t errlen);
void kt_metrics_http_stop(void);
/* Free the shards (at exit, after every recording thread stopped). */
void kt_metrics_shutdown(void);

#endif
