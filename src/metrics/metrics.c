/* Per-thread metric shards summed at scrape time, and their Prometheus text
 * exposition (see metrics.h). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "metrics/metrics.h"

static const double tls_buckets[] = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5 };
static const double delivery_buckets[] = { 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600 };
#define MAX_BUCKETS 12

struct histogram {
    atomic_ullong buckets[MAX_BUCKETS + 1];   /* the last is +Inf */
    atomic_ullong count;
    _Atomic double sum;
};

struct shard {
    atomic_llong v[KT_M_COUNT];
    struct histogram h[KT_H_COUNT];
    struct shard *next;
} __attribute__((aligned(64)));

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct shard *shards;
static __thread struct shard *mine;

static struct shard *shard(void)
{
    if (__builtin_expect(mine != NULL, 1))
        return mine;
    struct shard *s;
    if (posix_memalign((void **)&s, 64, sizeof(*s)) != 0)
        abort();
    memset(s, 0, sizeof(*s));
    pthread_mutex_lock(&registry_lock);
    s->next = shards;
    shards = s;
    pthread_mutex_unlock(&registry_lock);
    mine = s;
    return s;
}

/* The shard's only writer is its thread: a relaxed load and store, no lock prefix. */
void kt_metric_add(enum kt_metric m, long long n)
{
    struct shard *s = shard();
    atomic_store_explicit(&s->v[m], atomic_load_explicit(&s->v[m], memory_order_relaxed) + n,
                          memory_order_relaxed);
}

void kt_metric_set(enum kt_metric m, long long v)
{
    atomic_store_explicit(&shard()->v[m], v, memory_order_relaxed);
}

static const double *buckets_of(enum kt_histogram h, size_t *n)
{
    if (h == KT_H_TLS_HANDSHAKE) {
        *n = sizeof(tls_buckets) / sizeof(tls_buckets[0]);
        return tls_buckets;
    }
    *n = sizeof(delivery_buckets) / sizeof(delivery_buckets[0]);
    return delivery_buckets;
}

void kt_metric_observe(enum kt_histogram which, double seconds)
{
    struct histogram *h = &shard()->h[which];
    size_t n;
    const double *b = buckets_of(which, &n);
    size_t i = 0;
    while (i < n && seconds > b[i])
        i++;
    /* non-cumulative here; the exposition accumulates */
    atomic_store_explicit(&h->buckets[i], atomic_load_explicit(&h->buckets[i], memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&h->count, atomic_load_explicit(&h->count, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&h->sum, atomic_load_explicit(&h->sum, memory_order_relaxed) + seconds,
                          memory_order_relaxed);
}

void kt_metric_tls_handshake(int version, int resumed, double seconds, int ktls_tx, int ktls_rx)
{
    kt_metric_inc(KT_M_TLS_SESSIONS);
    if (version == 0x0304)
        kt_metric_inc(resumed ? KT_M_TLS13_RESUMED : KT_M_TLS13_NEW);
    else if (version == 0x0303)
        kt_metric_inc(resumed ? KT_M_TLS12_RESUMED : KT_M_TLS12_NEW);
    else
        kt_metric_inc(KT_M_TLS_OTHER);
    if (ktls_tx)
        kt_metric_inc(KT_M_KTLS_TX);
    if (ktls_rx)
        kt_metric_inc(KT_M_KTLS_RX);
    kt_metric_observe(KT_H_TLS_HANDSHAKE, seconds);
}

static long long total(enum kt_metric m)
{
    long long t = 0;
    for (struct shard *s = shards; s; s = s->next)
        t += atomic_load_explicit(&s->v[m], memory_order_relaxed);
    return t;
}

static void header(struct kt_buf *b, const char *name, const char *type, const char *help)
{
    kt_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void histogram(struct kt_buf *b, enum kt_histogram which, const char *name, const char *help)
{
    size_t n;
    const double *bounds = buckets_of(which, &n);
    unsigned long long counts[MAX_BUCKETS + 1] = { 0 }, count = 0;
    double sum = 0;
    for (struct shard *s = shards; s; s = s->next) {
        for (size_t i = 0; i <= n; i++)
            counts[i] += atomic_load_explicit(&s->h[which].buckets[i], memory_order_relaxed);
        count += atomic_load_explicit(&s->h[which].count, memory_order_relaxed);
        sum += atomic_load_explicit(&s->h[which].sum, memory_order_relaxed);
    }
    header(b, name, "histogram", help);
    unsigned long long cum = 0;
    for (size_t i = 0; i < n; i++) {
        cum += counts[i];
        kt_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], cum);
    }
    cum += counts[n];
    /* a scrape may catch a shard between its bucket and count stores: keep +Inf = count */
    if (count < cum)
        count = cum;
    kt_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, count, name, sum, name,
                  count);
}

char *kt_metrics_render(size_t *len)
{
    struct kt_buf b = { 0 };
    pthread_mutex_lock(&registry_lock);
    header(&b, "ktrelay_messages_received_total", "counter",
           "Messages accepted (250 after end of data) and messages picked up from the local submission queue.");
    kt_buf_printf(&b, "ktrelay_messages_received_total %lld\n", total(KT_M_MESSAGES_RECEIVED));
    header(&b, "ktrelay_deliveries_total", "counter", "Recipient delivery attempts by outcome, one per to= log line.");
    kt_buf_printf(&b, "ktrelay_deliveries_total{status=\"sent\"} %lld\n", total(KT_M_DELIVERY_SENT));
    kt_buf_printf(&b, "ktrelay_deliveries_total{status=\"deferred\"} %lld\n", total(KT_M_DELIVERY_DEFERRED));
    kt_buf_printf(&b, "ktrelay_deliveries_total{status=\"bounced\"} %lld\n", total(KT_M_DELIVERY_BOUNCED));
    kt_buf_printf(&b, "ktrelay_deliveries_total{status=\"expired\"} %lld\n", total(KT_M_DELIVERY_EXPIRED));
    header(&b, "ktrelay_smtpd_rejects_total", "counter", "SMTP server rejections logged as reject:, by stage.");
    kt_buf_printf(&b, "ktrelay_smtpd_rejects_total{stage=\"rcpt\"} %lld\n", total(KT_M_REJECT_RCPT));
    kt_buf_printf(&b, "ktrelay_smtpd_rejects_total{stage=\"data\"} %lld\n", total(KT_M_REJECT_DATA));
    header(&b, "ktrelay_connections", "gauge", "Open SMTP connections: smtpd inbound, smtp outbound.");
    kt_buf_printf(&b, "ktrelay_connections{service=\"smtpd\"} %lld\n", total(KT_M_CONN_SMTPD));
    kt_buf_printf(&b, "ktrelay_connections{service=\"smtp\"} %lld\n", total(KT_M_CONN_SMTP));
    header(&b, "ktrelay_tls_sessions_total", "counter", "Completed inbound TLS handshakes (SMTP server side).");
    kt_buf_printf(&b, "ktrelay_tls_sessions_total %lld\n", total(KT_M_TLS_SESSIONS));
    header(&b, "ktrelay_tls_handshakes_total", "counter", "Completed inbound TLS handshakes by protocol version and resumption.");
    kt_buf_printf(&b, "ktrelay_tls_handshakes_total{version=\"TLSv1.2\",resumed=\"no\"} %lld\n", total(KT_M_TLS12_NEW));
    kt_buf_printf(&b, "ktrelay_tls_handshakes_total{version=\"TLSv1.2\",resumed=\"yes\"} %lld\n",
                  total(KT_M_TLS12_RESUMED));
    kt_buf_printf(&b, "ktrelay_tls_handshakes_total{version=\"TLSv1.3\",resumed=\"no\"} %lld\n", total(KT_M_TLS13_NEW));
    kt_buf_printf(&b, "ktrelay_tls_handshakes_total{version=\"TLSv1.3\",resumed=\"yes\"} %lld\n",
                  total(KT_M_TLS13_RESUMED));
    kt_buf_printf(&b, "ktrelay_tls_handshakes_total{version=\"other\",resumed=\"no\"} %lld\n", total(KT_M_TLS_OTHER));
    header(&b, "ktrelay_ktls_sessions_total", "counter", "Inbound TLS sessions with a direction handed to kernel TLS.");
    kt_buf_printf(&b, "ktrelay_ktls_sessions_total{direction=\"tx\"} %lld\n", total(KT_M_KTLS_TX));
    kt_buf_printf(&b, "ktrelay_ktls_sessions_total{direction=\"rx\"} %lld\n", total(KT_M_KTLS_RX));
    header(&b, "ktrelay_tls_bytes_total", "counter",
           "Message bytes received over inbound TLS, by who decrypted the records (kernel or OpenSSL).");
    kt_buf_printf(&b, "ktrelay_tls_bytes_total{direction=\"rx\",path=\"ktls\"} %lld\n", total(KT_M_TLS_BYTES_RX_KTLS));
    kt_buf_printf(&b, "ktrelay_tls_bytes_total{direction=\"rx\",path=\"userspace\"} %lld\n",
                  total(KT_M_TLS_BYTES_RX_USER));
    header(&b, "ktrelay_queue_messages", "gauge", "Messages in the queue directory by state.");
    kt_buf_printf(&b, "ktrelay_queue_messages{queue=\"active\"} %lld\n", total(KT_M_QUEUE_ACTIVE));
    kt_buf_printf(&b, "ktrelay_queue_messages{queue=\"deferred\"} %lld\n", total(KT_M_QUEUE_DEFERRED));
    kt_buf_printf(&b, "ktrelay_queue_messages{queue=\"hold\"} %lld\n", total(KT_M_QUEUE_HOLD));
    histogram(&b, KT_H_TLS_HANDSHAKE, "ktrelay_tls_handshake_seconds",
              "TLS handshake time, from the first handshake byte to the finished handshake.");
    histogram(&b, KT_H_DELIVERY, "ktrelay_delivery_seconds",
              "Time from MAIL FROM (or queue arrival) to a recipient's successful delivery (the to= line's delay).");
    pthread_mutex_unlock(&registry_lock);
    *len = kt_buf_used(&b);
    return b.data;
}

void kt_metrics_shutdown(void)
{
    pthread_mutex_lock(&registry_lock);
    struct shard *s = shards;
    shards = NULL;
    pthread_mutex_unlock(&registry_lock);
    while (s) {
        struct shard *next = s->next;
        free(s);
        s = next;
    }
    mine = NULL;
}
