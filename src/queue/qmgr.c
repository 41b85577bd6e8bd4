/* Queue manager (see qmgr.h).
 *
 * State on disk is the truth: at start every file in new/ is loaded with its
 * status records, so a restart resumes where the last run stopped. In memory
 * a message has a retry time and a count of jobs in flight; a job is the
 * message's pending recipients for one destination (next hop). A
 * destination keeps a queue of jobs and at most
 * default_destination_concurrency_limit SMTP connections, each of which
 * runs queued jobs one after another before it QUITs. Local recipients
 * (mydestination, virtual_mailbox_domains), such as the senders of bounces,
 * go to their Maildir through the same io_uring writer the SMTP server uses.
 *
 * Each recipient outcome is appended to the status file and fsync'd before
 * it is acted on. The one window for a duplicate: the next hop answered 250
 * to the end of data but ktrelay stopped (crash, kill -9) before the "done"
 * record reached the disk; that recipient is sent again after restart.
 *
 * A message is retried minimal_backoff_time after its first failure,
 * doubling up to maximal_backoff_time; deferred messages are looked at every
 * queue_run_delay, new ones at once (in-process wakeup) or within a second
 * (a periodic scan of new/ finds `ktrelay sendmail` injections and the
 * `ktrelay queue flush` request file). After maximal_queue_lifetime
 * (bounce_queue_lifetime for the null sender) pending recipients fail.
 *
 * Queue-file reads, status appends and directory scans are plain system
 * calls on this thread: they are local and short, and no SMTP server
 * session waits on them. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "queue/bounce.h"
#include "conf/config.h"
#include "core/dirsync.h"
#include "queue/dns.h"
#include "metrics/metrics.h"
#include "core/log.h"
#include "delivery/maildir.h"
#include "queue/qmgr.h"
#include "queue/queue.h"
#include "delivery/resolve.h"
#include "conf/settings.h"
#include "queue/smtp_client.h"
#include "core/table.h"
#include "tls/tls.h"

#define TICK_MS 1000
#define STOP_GRACE_S 3
#define LOCAL_BLOCK (256 * 1024)

struct msg;
struct dest;

struct job {
    struct msg *m;
    struct dest *d;
    size_t n;
    size_t *idx;                   /* recipient indexes in m->q */
    const char **addrs;
    int *codes;
    char **replies;
    int fd;
    struct kt_smtp_msg sm;
    struct job *next;
    /* local delivery */
    size_t cur;
    struct kt_delivery *dl;
    off_t pos;
};

struct conn {
    struct dest *d;
    struct kt_runtime *rt;         /* generation whose settings it was opened with (helo_name, ssl_ctx) */
    struct kt_smtp_conn *c;
    struct job *job;
    int ready;
    struct conn *next;
};

struct dest {
    char *key;                     /* "local" or "smtp:NEXTHOP" */
    int local;
    char *host;                    /* next hop without brackets and port */
    int port, mx;
    struct job *head, *tail;
    size_t queued;
    struct conn *conns;
    unsigned n_conns, n_unassigned;
    int resolving;
    struct kt_smtp_addr *addrs;
    size_t n_addrs;
    time_t addrs_expire;
    struct job *local_job;         /* local: the job being delivered */
    struct dest *next;
    struct kt_qmgr *q;
};

struct msg {
    struct kt_qmsg *q;
    time_t next_try;
    unsigned attempts;
    unsigned jobs;
    char *defer_reason;
    struct msg *next, *prev;
    int seen;
};

struct kt_qmgr {
    struct kt_runtime *rt;         /* current generation; set points into it */
    const struct kt_qmgr_settings *set;
    _Atomic(struct kt_runtime *) next_rt;  /* handed over by kt_qmgr_reload, adopted on this thread */
    char *qdir;                    /* queue_directory at start; a reload does not move the queue */
    struct kt_loop loop;
    pthread_t thread;
    int efd;
    uint64_t efd_val;
    struct kt_op efd_op, tick_op;
    struct __kernel_timespec tick_ts;
    atomic_int stop;
    int stopping;
    time_t stop_deadline;
    struct kt_dns *dns;
    struct msg *msgs;
    size_t n_msgs;
    struct dest *dests;
    time_t last_run;
    int scan_now;
};

static atomic_int global_efd = -1;

static void dest_kick(struct dest *d);
static void msg_round_done(struct kt_qmgr *q, struct msg *m);
static void local_next(struct dest *d);

static double delay_of(const struct msg *m)
{
    return difftime(time(NULL), m->q->arrival);
}

/* ---- routing ---- */

static const char *addr_domain(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at ? at + 1 : "";
}

/* transport_maps as in transport(5): the address, the domain, each parent
 * ".domain", then "*". */
static const char *transport_lookup(struct kt_qmgr *q, const char *addr, const char *domain)
{
    const char *v;
    const struct kt_maps *tm = q->set->transport_maps;
    if (!tm)
        return NULL;
    if ((v = kt_maps_get(tm, addr)))
        return v;
    if ((v = kt_maps_get(tm, domain)))
        return v;
    for (const char *p = domain; (p = strchr(p, '.')); p++)
        if ((v = kt_maps_get(tm, p)))
            return v;
    return kt_maps_get(tm, "*");
}

static struct dest *dest_get(struct kt_qmgr *q, const char *key)
{
    for (struct dest *d = q->dests; d; d = d->next)
        if (!strcmp(d->key, key))
            return d;
    struct dest *d = kt_calloc(1, sizeof(*d));
    d->q = q;
    d->key = kt_strdup(key);
    d->local = !strcmp(key, "local");
    if (!d->local) {
        /* "smtp:[host]:port", "smtp:host:port", "smtp:host" */
        const char *nh = strchr(key, ':') + 1;
        d->mx = 1;
        d->port = 25;
        if (nh[0] == '[') {
            const char *end = strchr(nh, ']');
            d->mx = 0;
            d->host = kt_strndup(nh + 1, end ? (size_t)(end - nh - 1) : strlen(nh + 1));
            if (end && end[1] == ':')
                d->port = atoi(end + 2);
        } else {
            const char *colon = strrchr(nh, ':');
            d->host = colon ? kt_strndup(nh, (size_t)(colon - nh)) : kt_strdup(nh);
            if (colon)
                d->port = atoi(colon + 1);
        }
        if (d->port <= 0 || d->port > 65535)
            d->port = 25;
    }
    d->next = q->dests;
    q->dests = d;
    return d;
}

/* Key of the destination for addr, or NULL with *err set for a recipient that fails at once. */
static char *route(struct kt_qmgr *q, const char *addr, const char **err)
{
    char domain[256];
    snprintf(domain, sizeof(domain), "%s", addr_domain(addr));
    for (char *p = domain; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    *err = NULL;
    if (!domain[0])
        return kt_strdup("local");
    if (q->set->resolver) {
        enum kt_addr_class cls = kt_resolve_class(q->set->resolver, domain);
        if (cls == KT_CLASS_LOCAL || cls == KT_CLASS_VIRTUAL)
            return kt_strdup("local");
    }
    const char *t = transport_lookup(q, addr, domain);
    if (t && *t) {
        const char *colon = strchr(t, ':');
        size_t tlen = colon ? (size_t)(colon - t) : strlen(t);
        const char *nh = colon ? colon + 1 : "";
        if (tlen == 5 && !strncmp(t, "error", 5)) {
            *err = *nh ? nh : "mail for this domain is refused";
            return NULL;
        }
        if ((tlen == 5 && !strncmp(t, "local", 5)) || (tlen == 7 && !strncmp(t, "virtual", 7)))
            return kt_strdup("local");
        if (!((tlen == 4 && !strncmp(t, "smtp", 4)) || (tlen == 5 && !strncmp(t, "relay", 5)))) {
            *err = NULL;
            return kt_strdup("");      /* unknown transport: deferred */
        }
        return kt_asprintf("smtp:%s", *nh ? nh : domain);
    }
    if (q->set->relayhost[0])
        return kt_asprintf("smtp:%s", q->set->relayhost);
    return kt_asprintf("smtp:%s", domain);
}

/* ---- recipient outcomes ---- */

/* "5.1.1" from "... said: 550 5.1.1 ..." or the class of the code */
static void dsn_of(int code, const char *text, char *out, size_t len)
{
    const char *said = text ? strstr(text, "said: ") : NULL;
    const char *p = said ? said + 6 : NULL;
    if (p && strlen(p) > 9 && isdigit((unsigned char)p[4]) && p[5] == '.' && isdigit((unsigned char)p[6])) {
        size_t n = strcspn(p + 4, " ");
        if (n < len) {
            snprintf(out, len, "%.*s", (int)n, p + 4);
            return;
        }
    }
    snprintf(out, len, "%d.0.0", code >= 500 ? 5 : 4);
}

/* relay= of a Maildir delivery from the queue: "virtual" for a
 * virtual_mailbox_domains recipient, else "local" (Postfix's virtual(8) and
 * local(8)). */
static const char *local_relay(const struct kt_qmgr *q, const char *addr)
{
    const char *at = strrchr(addr, '@');
    if (q->set->resolver && kt_resolve_class(q->set->resolver, at ? at + 1 : "") == KT_CLASS_VIRTUAL)
        return "virtual";
    return "local";
}

/* The Postfix delivery agent whose log line this is: local and virtual
 * Maildir deliveries, else the SMTP client (relay=none included: DNS and
 * connection failures are the smtp agent's lines in Postfix too). */
static const char *agent_of(const char *relay)
{
    if (!strcmp(relay, "local") || !strcmp(relay, "virtual"))
        return relay;
    return "smtp";
}

static void rcpt_done(struct kt_qmgr *q, struct msg *m, size_t i, const char *relay, const char *text)
{
    int rc = kt_queue_mark(q->qdir, m->q, i, KT_QR_DONE, NULL);
    if (rc < 0) {
        kt_err("%s: cannot record delivery to <%s>: %s", m->q->id, m->q->rcpts[i].addr, strerror(-rc));
        return;
    }
    const char *said = text ? strstr(text, "said: ") : NULL;
    char reply[600];
    if (said) {
        const char *end = strstr(said, " (in reply to");
        snprintf(reply, sizeof(reply), "%.*s", end ? (int)(end - said - 6) : 500, said + 6);
    } else {
        snprintf(reply, sizeof(reply), "%s", text ? text : "delivered");
    }
    kt_metric_inc(KT_M_DELIVERY_SENT);
    kt_metric_observe(KT_H_DELIVERY, (double)delay_of(m));
    kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=2.0.0, status=sent (%s)", m->q->id, m->q->rcpts[i].addr, relay,
            delay_of(m), reply);
}

/* given: the enhanced status code when no server reply says it (resolver failures), else NULL */
static void rcpt_failed(struct kt_qmgr *q, struct msg *m, size_t i, const char *relay, int code, const char *given,
                        const char *text)
{
    char dsn[32];
    if (given)
        snprintf(dsn, sizeof(dsn), "%s", given);
    else
        dsn_of(code, text, dsn, sizeof(dsn));
    if (dsn[0] != '5')
        dsn[0] = '5';
    char *reason = kt_asprintf("%s %s %s", dsn, strcmp(relay, "none") ? relay : "-", text);
    int rc = kt_queue_mark(q->qdir, m->q, i, KT_QR_FAILED, reason);
    kt_free(reason);
    if (rc < 0) {
        kt_err("%s: cannot record the failure of <%s>: %s", m->q->id, m->q->rcpts[i].addr, strerror(-rc));
        return;
    }
    kt_metric_inc(KT_M_DELIVERY_BOUNCED);
    kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=%s, status=bounced (%s)", m->q->id, m->q->rcpts[i].addr, relay,
            delay_of(m), dsn, text);
}

static void rcpt_deferred(struct msg *m, size_t i, const char *relay, int code, const char *given, const char *text)
{
    char dsn[32];
    if (given)
        snprintf(dsn, sizeof(dsn), "%s", given);
    else
        dsn_of(code, text, dsn, sizeof(dsn));
    if (dsn[0] != '4')
        dsn[0] = '4';
    kt_metric_inc(KT_M_DELIVERY_DEFERRED);
    kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=%s, status=deferred (%s)", m->q->id, m->q->rcpts[i].addr, relay,
            delay_of(m), dsn, text);
    kt_free(m->defer_reason);
    m->defer_reason = kt_asprintf("%s %s %s", dsn, strcmp(relay, "none") ? relay : "-", text);
}

/* ---- jobs ---- */

static struct job *job_new(struct msg *m, struct dest *d)
{
    struct job *j = kt_calloc(1, sizeof(*j));
    j->m = m;
    j->d = d;
    j->fd = -1;
    m->jobs++;
    return j;
}

static void job_add_rcpt(struct job *j, size_t i)
{
    j->idx = kt_realloc(j->idx, (j->n + 1) * sizeof(*j->idx));
    j->addrs = kt_realloc(j->addrs, (j->n + 1) * sizeof(*j->addrs));
    j->idx[j->n] = i;
    j->addrs[j->n] = j->m->q->rcpts[i].addr;
    j->n++;
}

static void job_free(struct job *j)
{
    if (j->replies)
        for (size_t k = 0; k < j->n; k++)
            kt_free(j->replies[k]);
    kt_free(j->replies);
    kt_free(j->codes);
    kt_free(j->idx);
    kt_free(j->addrs);
    if (j->fd >= 0)
        close(j->fd);
    kt_free(j);
}

/* The job is over: outcomes were recorded by the caller. */
static void job_end(struct kt_qmgr *q, struct job *j)
{
    struct msg *m = j->m;
    job_free(j);
    if (--m->jobs == 0)
        msg_round_done(q, m);
}

/* res/reason: the connection's fate when it is not 0 */
static void job_results(struct kt_qmgr *q, struct job *j, int res, const char *dsn, const char *reason,
                        const char *relay)
{
    struct msg *m = j->m;
    for (size_t k = 0; k < j->n; k++) {
        size_t i = j->idx[k];
        int code = j->codes ? j->codes[k] : 0;
        const char *text = j->replies && j->replies[k] ? j->replies[k] : reason;
        if (code >= 500)
            rcpt_failed(q, m, i, relay, code, NULL, text ? text : "rejected");
        else if (res == 0 && code >= 200 && code < 300)
            rcpt_done(q, m, i, relay, text);
        else if (res >= 500 && code == 0)
            rcpt_failed(q, m, i, relay, res, dsn, reason ? reason : "rejected");
        else
            rcpt_deferred(m, i, relay, code ? code : res > 0 ? res : 450, code ? NULL : dsn,
                          text ? text : reason ? reason : "delivery temporarily suspended");
    }
}

static void job_defer_all(struct kt_qmgr *q, struct job *j, int res, const char *dsn, const char *reason)
{
    job_results(q, j, res, dsn, reason, "none");
    job_end(q, j);
}

static struct job *dest_pop(struct dest *d)
{
    struct job *j = d->head;
    if (j) {
        d->head = j->next;
        if (!d->head)
            d->tail = NULL;
        j->next = NULL;
        d->queued--;
    }
    return j;
}

static void dest_push(struct dest *d, struct job *j)
{
    j->next = NULL;
    if (d->tail)
        d->tail->next = j;
    else
        d->head = j;
    d->tail = j;
    d->queued++;
}

/* Every queued job of d fails over with the same reason (destination down). */
static void dest_defer_queued(struct dest *d, int res, const char *dsn, const char *reason)
{
    struct job *j;
    while ((j = dest_pop(d)))
        job_defer_all(d->q, j, res, dsn, reason);
}

/* ---- SMTP connections ---- */

static void conn_remove(struct conn *cn)
{
    struct dest *d = cn->d;
    for (struct conn **pp = &d->conns; *pp; pp = &(*pp)->next) {
        if (*pp == cn) {
            *pp = cn->next;
            break;
        }
    }
    d->n_conns--;
    if (!cn->job)
        d->n_unassigned--;
    kt_smtp_close(cn->c);
    kt_runtime_unref(cn->rt);
    kt_free(cn);
}

static void conn_run_next(struct conn *cn);

static void job_sent(void *arg, int res, const char *reason)
{
    struct conn *cn = arg;
    struct dest *d = cn->d;
    struct job *j = cn->job;
    cn->job = NULL;
    d->n_unassigned++;
    job_results(d->q, j, res, NULL, reason, kt_smtp_relay(cn->c));
    job_end(d->q, j);
    if (res != 0 || !kt_smtp_usable(cn->c)) {
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    conn_run_next(cn);
}

static int prepare_job_fd(struct kt_qmgr *q, struct job *j)
{
    if (j->fd >= 0)
        return 0;
    j->fd = kt_queue_open_body(q->qdir, j->m->q->id);
    return j->fd < 0 ? j->fd : 0;
}

static void conn_run_next(struct conn *cn)
{
    struct dest *d = cn->d;
    struct job *j;
    if (cn->rt != d->q->rt) {
        /* opened under an older configuration: the next delivery uses the new one (smtp_tls_*, helo) */
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    while (!d->q->stopping && (j = dest_pop(d))) {
        if (prepare_job_fd(d->q, j) < 0) {
            kt_warn("%s: queue file gone: %s", j->m->q->id, strerror(-j->fd));
            job_end(d->q, j);
            continue;
        }
        cn->job = j;
        d->n_unassigned--;
        j->codes = kt_calloc(j->n, sizeof(*j->codes));
        j->replies = kt_calloc(j->n, sizeof(*j->replies));
        j->sm = (struct kt_smtp_msg){
            .id = j->m->q->id, .sender = j->m->q->sender, .rcpts = j->addrs, .n_rcpts = j->n, .fd = j->fd,
            .body_off = j->m->q->body_off, .body_len = j->m->q->body_len, .dots = j->m->q->dots,
            .codes = j->codes, .replies = j->replies,
        };
        kt_smtp_send(cn->c, &j->sm, job_sent, cn);
        return;
    }
    /* nothing more for this destination: QUIT */
    conn_remove(cn);
}

static void conn_ready(void *arg, int res, const char *reason)
{
    struct conn *cn = arg;
    struct dest *d = cn->d;
    if (res != 0) {
        kt_info_as("smtp", "%s", reason);
        conn_remove(cn);
        /* the destination is down (or refuses us): what waits for it is deferred now rather
         * than fed to new connections that would fail the same way */
        dest_defer_queued(d, res, NULL, reason);
        return;
    }
    cn->ready = 1;
    conn_run_next(cn);
}

static void conn_open(struct dest *d)
{
    struct kt_qmgr *q = d->q;
    struct conn *cn = kt_calloc(1, sizeof(*cn));
    cn->d = d;
    cn->next = d->conns;
    d->conns = cn;
    d->n_conns++;
    d->n_unassigned++;
    const struct kt_smtp_settings *sm = &q->set->smtp;
    cn->rt = kt_runtime_ref(q->rt);
    struct kt_smtp_params p = {
        .helo_name = sm->helo_name,
        .tls_level = (enum kt_smtp_tls)sm->tls_level,
        .ssl_ctx = sm->ssl_ctx,
        .tls_loglevel = sm->tls_loglevel,
        .connect_timeout_s = sm->connect_timeout_s,
        .command_timeout_s = sm->command_timeout_s,
    };
    char *sni = NULL;
    if (sm->tls_servername[0]) {
        if (!strcmp(sm->tls_servername, "hostname") || !strcmp(sm->tls_servername, "nexthop"))
            sni = kt_strdup(d->host);
        else
            sni = kt_strdup(sm->tls_servername);
    }
    p.sni = sni;
    p.verify_name = sni ? sni : d->host;
    cn->c = kt_smtp_connect(&q->loop, &p, d->addrs, d->n_addrs, conn_ready, cn);
    kt_free(sni);
}

static void resolved(void *arg, int res, const struct kt_smtp_addr *addrs, size_t n, const char *dsn,
                     const char *err)
{
    struct dest *d = arg;
    d->resolving = 0;
    if (res == -ECANCELED)
        return;                    /* stopping: the jobs stay queued on disk */
    if (res != 0 || n == 0) {
        kt_info_as("smtp", "%s", err ? err : "no address");
        dest_defer_queued(d, res > 0 ? res : 450, dsn ? dsn : "4.4.3", err ? err : "no address");
        return;
    }
    kt_free(d->addrs);
    d->addrs = kt_calloc(n, sizeof(*addrs));
    memcpy(d->addrs, addrs, n * sizeof(*addrs));
    d->n_addrs = n;
    d->addrs_expire = time(NULL) + 300;
    dest_kick(d);
}

static void dest_kick(struct dest *d)
{
    struct kt_qmgr *q = d->q;
    if (q->stopping)
        return;
    if (d->local) {
        if (!d->local_job)
            local_next(d);
        return;
    }
    if (d->queued == 0)
        return;
    if (!d->addrs || time(NULL) >= d->addrs_expire) {
        if (!d->resolving && d->n_conns == 0) {
            d->resolving = 1;
            kt_dns_lookup(q->dns, d->host, d->port, d->mx, resolved, d);
        }
        if (!d->addrs)
            return;
    }
    /* idle connections take work first; new ones only while jobs outnumber them */
    for (struct conn *cn = d->conns; cn && d->queued; cn = cn->next)
        if (cn->ready && !cn->job) {
            conn_run_next(cn);
            break;
        }
    while (d->queued > d->n_unassigned && d->n_conns < q->set->destination_concurrency_limit)
        conn_open(d);
}

/* ---- local delivery ---- */

static void local_step(struct job *j);

static void local_result(struct job *j, int res)
{
    struct dest *d = j->d;
    struct kt_qmgr *q = d->q;
    size_t i = j->idx[j->cur];
    if (res < 0) {
        char *why = kt_asprintf("cannot deliver to maildir: %s", strerror(-res));
        rcpt_deferred(j->m, i, local_relay(q, j->addrs[j->cur]), 450, NULL, why);
        kt_free(why);
    } else {
        char *text = kt_asprintf("delivered to maildir as %s", kt_delivery_name(j->dl));
        rcpt_done(q, j->m, i, local_relay(q, j->addrs[j->cur]), text);
        kt_free(text);
    }
    kt_delivery_abandon(j->dl);
    j->dl = NULL;
    j->cur++;
    local_step(j);
}

static void local_committed(void *arg, int res)
{
    local_result(arg, res);
}

static void local_feed(void *arg, int res)
{
    struct job *j = arg;
    if (res < 0) {
        local_result(j, res);
        return;
    }
    char *buf = kt_malloc(LOCAL_BLOCK);
    off_t end = j->m->q->body_off + j->m->q->body_len;
    while (j->pos < end) {
        size_t want = (size_t)(end - j->pos) < LOCAL_BLOCK ? (size_t)(end - j->pos) : LOCAL_BLOCK;
        ssize_t n = pread(j->fd, buf, want, j->pos);
        if (n <= 0) {
            kt_free(buf);
            local_result(j, n < 0 ? -errno : -EIO);
            return;
        }
        j->pos += n;
        if (kt_delivery_append(j->dl, buf, (size_t)n)) {
            kt_free(buf);
            return;     /* the drain callback brings us back */
        }
    }
    kt_free(buf);
    kt_delivery_commit(j->dl, local_committed, j);
}

static void local_opened(void *arg, int res)
{
    struct job *j = arg;
    if (res < 0) {
        local_result(j, res);
        return;
    }
    char *hdr = kt_asprintf("Return-Path: <%s>\r\nDelivered-To: %s\r\n", j->m->q->sender, j->addrs[j->cur]);
    kt_delivery_append(j->dl, hdr, strlen(hdr));
    kt_free(hdr);
    j->pos = j->m->q->body_off;
    kt_delivery_set_drain_cb(j->dl, local_feed, j);
    local_feed(j, 0);
}

static void local_step(struct job *j)
{
    struct dest *d = j->d;
    struct kt_qmgr *q = d->q;
    while (j->cur < j->n && !q->stopping) {
        size_t i = j->idx[j->cur];
        struct kt_resolve_result *res = kt_malloc(sizeof(*res));
        if (!q->set->resolver) {
            rcpt_deferred(j->m, i, "local", 451, NULL, "no local delivery configured");
            j->cur++;
            kt_free(res);
            continue;
        }
        kt_resolve_recipient(q->set->resolver, j->addrs[j->cur], res);
        if (res->reply || res->n_mailboxes == 0) {
            const char *why = res->reply ? res->reply : "alias forwards to remote addresses only";
            if (res->reply && res->reply[0] == '4')
                rcpt_deferred(j->m, i, local_relay(q, j->addrs[j->cur]), 450, NULL, why);
            else
                rcpt_failed(q, j->m, i, local_relay(q, j->addrs[j->cur]), 550, NULL, why);
            j->cur++;
            kt_free(res);
            continue;
        }
        j->dl = kt_delivery_new(&q->loop, res->mailboxes, res->n_mailboxes, q->set->myhostname, 255, j->m->q->id);
        kt_free(res);
        kt_delivery_open(j->dl, local_opened, j);
        return;
    }
    for (; j->cur < j->n; j->cur++)
        rcpt_deferred(j->m, j->idx[j->cur], local_relay(q, j->addrs[j->cur]), 450, NULL, "mail system is stopping");
    d->local_job = NULL;
    job_end(q, j);
    dest_kick(d);
}

static void local_next(struct dest *d)
{
    struct job *j;
    while ((j = dest_pop(d))) {
        if (prepare_job_fd(d->q, j) < 0) {
            job_end(d->q, j);
            continue;
        }
        d->local_job = j;
        j->cur = 0;
        local_step(j);
        return;
    }
}

/* ---- messages ---- */

static void msg_free(struct kt_qmgr *q, struct msg *m)
{
    if (m->prev)
        m->prev->next = m->next;
    else
        q->msgs = m->next;
    if (m->next)
        m->next->prev = m->prev;
    q->n_msgs--;
    kt_qmsg_free(m->q);
    kt_free(m->defer_reason);
    kt_free(m);
}

static void send_dsn(struct kt_qmgr *q, struct msg *m, enum kt_dsn_kind kind, time_t until)
{
    struct kt_dsn_rcpt *r = kt_calloc(m->q->n_rcpts, sizeof(*r));
    size_t n = 0;
    for (size_t i = 0; i < m->q->n_rcpts; i++) {
        const struct kt_qrcpt *qr = &m->q->rcpts[i];
        if (kind == KT_DSN_FAILED && qr->state == KT_QR_FAILED)
            r[n++] = (struct kt_dsn_rcpt){ qr->addr, qr->reason };
        else if (kind == KT_DSN_DELAYED && qr->state == KT_QR_PENDING)
            r[n++] = (struct kt_dsn_rcpt){ qr->addr, m->defer_reason };
    }
    if (n > 0) {
        char id[KT_QUEUE_ID_MAX];
        int fd = kt_queue_open_body(q->qdir, m->q->id);
        int rc = kt_dsn_send(q->qdir, q->set->myhostname, kind, m->q, fd, r, n, until, id, sizeof(id));
        if (fd >= 0)
            close(fd);
        if (rc == 0) {
            kt_info_as("bounce", "%s: sender %s notification: %s", m->q->id,
                    kind == KT_DSN_FAILED ? "non-delivery" : "delay", id);
            q->scan_now = 1;
        } else if (rc < 0) {
            kt_err("%s: cannot queue a notification: %s", m->q->id, strerror(-rc));
        }
    }
    kt_free(r);
}

static void msg_complete(struct kt_qmgr *q, struct msg *m)
{
    send_dsn(q, m, KT_DSN_FAILED, 0);
    int rc = kt_queue_remove(q->qdir, m->q->id);
    if (rc < 0 && rc != -ENOENT)
        kt_err("%s: cannot remove the queue file: %s", m->q->id, strerror(-rc));
    else
        kt_info("%s: removed", m->q->id);
    msg_free(q, m);
}

static void msg_round_done(struct kt_qmgr *q, struct msg *m)
{
    time_t now = time(NULL);
    if (kt_qmsg_finished(m->q)) {
        msg_complete(q, m);
        return;
    }
    long long life = m->q->sender[0] ? q->set->maximal_queue_lifetime : q->set->bounce_queue_lifetime;
    if (difftime(now, m->q->arrival) >= (double)life) {
        for (size_t i = 0; i < m->q->n_rcpts; i++) {
            if (m->q->rcpts[i].state != KT_QR_PENDING)
                continue;
            const char *last = m->defer_reason ? m->defer_reason : "4.4.7 - delivery temporarily suspended";
            const char *diag = strchr(last, ' ') ? strchr(strchr(last, ' ') + 1, ' ') : NULL;
            char *text = kt_asprintf("message expired: %s", diag ? diag + 1 : last);
            char *reason = kt_asprintf("5%.*s%s", (int)strcspn(last + 1, " "), last + 1,
                                       strchr(last, ' ') ? strchr(last, ' ') : " - ");
            /* keep the last temporary status' detail, as a permanent one */
            if (kt_queue_mark(q->qdir, m->q, i, KT_QR_FAILED, reason) == 0) {
                kt_metric_inc(KT_M_DELIVERY_EXPIRED);
                kt_info("%s: to=<%s>, relay=none, delay=%.0f, status=expired, returned to sender (%s)", m->q->id,
                        m->q->rcpts[i].addr, delay_of(m), text);
            }
            kt_free(text);
            kt_free(reason);
        }
        if (kt_qmsg_finished(m->q)) {
            msg_complete(q, m);
            return;
        }
    }
    m->attempts++;
    long long backoff = q->set->minimal_backoff_time;
    for (unsigned k = 1; k < m->attempts && backoff < q->set->maximal_backoff_time; k++)
        backoff *= 2;
    if (backoff > q->set->maximal_backoff_time)
        backoff = q->set->maximal_backoff_time;
    m->next_try = now + (time_t)backoff;
    if (q->set->delay_warning_time > 0 && !m->q->warned && m->q->sender[0] &&
        difftime(now, m->q->arrival) >= (double)q->set->delay_warning_time) {
        send_dsn(q, m, KT_DSN_DELAYED, m->q->arrival + (time_t)life);
        kt_queue_mark(q->qdir, m->q, (size_t)-1, KT_QR_PENDING, NULL);
    }
}

static void msg_start(struct kt_qmgr *q, struct msg *m)
{
    struct job **jobs = NULL;
    size_t n_jobs = 0;
    m->jobs++;     /* hold: jobs that end at once must not finish the round early */
    for (size_t i = 0; i < m->q->n_rcpts; i++) {
        if (m->q->rcpts[i].state != KT_QR_PENDING)
            continue;
        const char *err;
        char *key = route(q, m->q->rcpts[i].addr, &err);
        if (!key) {
            rcpt_failed(q, m, i, "none", 550, NULL, err);
            continue;
        }
        if (!key[0]) {
            rcpt_deferred(m, i, "none", 451, NULL, "mail transport unavailable");
            kt_free(key);
            continue;
        }
        struct dest *d = dest_get(q, key);
        kt_free(key);
        struct job *j = NULL;
        for (size_t k = 0; k < n_jobs; k++)
            if (jobs[k]->d == d)
                j = jobs[k];
        if (!j) {
            j = job_new(m, d);
            jobs = kt_realloc(jobs, (n_jobs + 1) * sizeof(*jobs));
            jobs[n_jobs++] = j;
        }
        job_add_rcpt(j, i);
    }
    for (size_t k = 0; k < n_jobs; k++)
        dest_push(jobs[k]->d, jobs[k]);
    for (size_t k = 0; k < n_jobs; k++)
        dest_kick(jobs[k]->d);
    kt_free(jobs);
    if (--m->jobs == 0)
        msg_round_done(q, m);
}

static struct msg *msg_find(struct kt_qmgr *q, const char *id)
{
    for (struct msg *m = q->msgs; m; m = m->next)
        if (!strcmp(m->q->id, id))
            return m;
    return NULL;
}

/* Pick up new queue files; forget messages removed behind our back. */
static void scan(struct kt_qmgr *q)
{
    char **ids;
    size_t n;
    q->scan_now = 0;
    if (kt_queue_list_ids(q->qdir, &ids, &n) < 0)
        return;
    for (struct msg *m = q->msgs; m; m = m->next)
        m->seen = 0;
    for (size_t i = 0; i < n; i++) {
        struct msg *m = msg_find(q, ids[i]);
        if (m) {
            m->seen = 1;
            continue;
        }
        struct kt_qmsg *qm;
        int rc = kt_queue_load(q->qdir, ids[i], &qm);
        if (rc < 0) {
            if (rc != -ENOENT)
                kt_warn("%s: unreadable queue file: %s", ids[i], strerror(-rc));
            continue;
        }
        m = kt_calloc(1, sizeof(*m));
        m->q = qm;
        m->seen = 1;
        m->next = q->msgs;
        if (q->msgs)
            q->msgs->prev = m;
        q->msgs = m;
        q->n_msgs++;
    }
    kt_queue_free_ids(ids, n);
    struct msg *next;
    for (struct msg *m = q->msgs; m; m = next) {
        next = m->next;
        if (!m->seen && m->jobs == 0)
            msg_free(q, m);
    }
}

static void run(struct kt_qmgr *q, time_t now, int deferred_too)
{
    struct msg *next;
    for (struct msg *m = q->msgs; m; m = next) {
        next = m->next;
        if (m->jobs || q->stopping)
            continue;
        if (m->attempts == 0 || (deferred_too && m->next_try <= now))
            msg_start(q, m);
    }
}

/* ---- loop ---- */

static void efd_arm(struct kt_qmgr *q)
{
    struct io_uring_sqe *sqe = kt_loop_sqe(&q->loop, &q->efd_op);
    io_uring_prep_read(sqe, q->efd, &q->efd_val, sizeof(q->efd_val), 0);
}

static void tick_arm(struct kt_qmgr *q)
{
    q->tick_ts.tv_sec = TICK_MS / 1000;
    q->tick_ts.tv_nsec = 0;
    struct io_uring_sqe *sqe = kt_loop_sqe(&q->loop, &q->tick_op);
    io_uring_prep_timeout(sqe, &q->tick_ts, 0, 0);
}

static void begin_stop(struct kt_qmgr *q)
{
    if (q->stopping)
        return;
    q->stopping = 1;
    q->stop_deadline = time(NULL) + STOP_GRACE_S;
    /* queued jobs stay pending on disk */
    for (struct dest *d = q->dests; d; d = d->next) {
        struct job *j;
        while ((j = dest_pop(d)))
            job_end(q, j);
        struct conn *cn, *next;
        for (cn = d->conns; cn; cn = next) {
            next = cn->next;
            if (!cn->job)
                conn_remove(cn);
        }
    }
}

static int busy(struct kt_qmgr *q)
{
    for (struct dest *d = q->dests; d; d = d->next)
        if (d->n_conns || d->local_job)
            return 1;
    return 0;
}

static void force_stop(struct kt_qmgr *q)
{
    for (struct dest *d = q->dests; d; d = d->next) {
        struct conn *cn;
        while ((cn = d->conns)) {
            struct job *j = cn->job;
            cn->job = NULL;
            if (j)
                d->n_unassigned++;
            conn_remove(cn);
            if (j)
                job_end(q, j);
        }
    }
}

/* Take the generation kt_qmgr_reload handed over, on this thread, between deliveries steps: routing
 * (relayhost, transport_maps), retry times and the client's settings apply from the next delivery;
 * connections opened under the old one finish their transaction and then close. */
static void adopt_runtime(struct kt_qmgr *q)
{
    struct kt_runtime *rt = atomic_exchange(&q->next_rt, NULL);
    if (!rt)
        return;
    if (strcmp(rt->qmgr.queue_directory, q->qdir))
        kt_warn("queue manager: queue_directory stays %s until a restart", q->qdir);
    if (strcmp(rt->qmgr.dns_servers, q->set->dns_servers))
        kt_warn("queue manager: ktrelay_dns_servers changes take effect after a restart");
    kt_runtime_unref(q->rt);
    q->rt = rt;
    q->set = &rt->qmgr;
    kt_info("queue manager: configuration reloaded");
}

static void efd_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)op - offsetof(struct kt_qmgr, efd_op));
    if (atomic_load(&q->stop)) {
        begin_stop(q);
        return;
    }
    adopt_runtime(q);
    scan(q);
    run(q, time(NULL), 0);
    efd_arm(q);
}

static void check_flush(struct kt_qmgr *q)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/flush", q->qdir);
    if (unlink(path) == 0) {
        kt_info("flush requested: retrying every deferred message");
        for (struct msg *m = q->msgs; m; m = m->next)
            m->next_try = 0;
        q->last_run = 0;
    }
}

/* ktrelay_queue_messages: deferred = waiting for a retry after a failed
 * attempt, active = the rest (new or being delivered). Once a second, on
 * this thread, which alone owns the list. */
static void publish_queue_gauges(struct kt_qmgr *q, time_t now)
{
    long long deferred = 0, all = 0;
    for (struct msg *m = q->msgs; m; m = m->next, all++)
        if (m->defer_reason && m->next_try > now && m->jobs == 0)
            deferred++;
    kt_metric_set(KT_M_QUEUE_ACTIVE, all - deferred);
    kt_metric_set(KT_M_QUEUE_DEFERRED, deferred);
}

static void tick_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)op - offsetof(struct kt_qmgr, tick_op));
    time_t now = time(NULL);
    publish_queue_gauges(q, now);
    kt_dns_tick(q->dns);
    for (struct dest *d = q->dests; d; d = d->next) {
        struct conn *cn, *next;
        for (cn = d->conns; cn; cn = next) {
            next = cn->next;
            kt_smtp_check_timeout(cn->c, now);
        }
    }
    if (q->stopping) {
        if (now >= q->stop_deadline)
            force_stop(q);
        if (!busy(q)) {
            q->loop.stop = 1;
            return;
        }
        tick_arm(q);
        return;
    }
    adopt_runtime(q);
    check_flush(q);
    scan(q);
    int deferred_run = difftime(now, q->last_run) >= (double)q->set->queue_run_delay;
    if (deferred_run)
        q->last_run = now;
    run(q, now, deferred_run);
    tick_arm(q);
}

static void *qmgr_main(void *arg)
{
    struct kt_qmgr *q = arg;
    pthread_setname_np(pthread_self(), "ktrelay-qmgr");
    kt_log_set_service("qmgr");
    q->efd_op.cb = efd_done;
    q->tick_op.cb = tick_done;
    efd_arm(q);
    tick_arm(q);
    scan(q);
    kt_info("queue manager started: %zu message%s in %s", q->n_msgs, q->n_msgs == 1 ? "" : "s", q->qdir);
    q->last_run = time(NULL);
    run(q, q->last_run, 1);
    while (!q->loop.stop) {
        if (q->scan_now && !q->stopping) {
            scan(q);
            run(q, time(NULL), 0);
        }
        int rc = kt_loop_run_once(&q->loop, 1000);
        if (rc < 0) {
            kt_err("queue manager: io_uring: %s", strerror(-rc));
            break;
        }
    }
    /* lookups in flight call back with -ECANCELED; nothing waits for them now */
    kt_dns_free(q->dns);
    q->dns = NULL;
    /* let cancellations complete so no operation points at freed memory */
    for (int i = 0; i < 20 && kt_smtp_live() > 0; i++)
        kt_loop_run_once(&q->loop, 50);
    kt_dirsync_thread_cleanup();
    return NULL;
}

void kt_qmgr_wakeup(void)
{
    int fd = atomic_load(&global_efd);
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* the counter is full: a wakeup is pending anyway */
    }
}

static void qmgr_free(struct kt_qmgr *q)
{
    if (!q)
        return;
    while (q->msgs)
        msg_free(q, q->msgs);
    struct dest *d, *dn;
    for (d = q->dests; d; d = dn) {
        dn = d->next;
        kt_free(d->key);
        kt_free(d->host);
        kt_free(d->addrs);
        kt_free(d);
    }
    kt_dns_free(q->dns);
    kt_free(q->qdir);
    if (q->efd >= 0)
        close(q->efd);
    kt_loop_fini(&q->loop);
    kt_runtime_unref(atomic_exchange(&q->next_rt, NULL));
    kt_runtime_unref(q->rt);
    kt_free(q);
}

int kt_qmgr_start(struct kt_runtime *rt, struct kt_qmgr **out)
{
    struct kt_qmgr *q = kt_calloc(1, sizeof(*q));
    int rc;
    *out = NULL;
    q->rt = kt_runtime_ref(rt);
    q->efd = -1;
    q->set = &rt->qmgr;
    q->qdir = kt_strdup(q->set->queue_directory);
    if ((rc = kt_queue_init_dirs(q->qdir)) < 0) {
        /* local delivery needs no queue: run without the relay rather than not at all */
        kt_warn("queue_directory %s: %s; outbound delivery is disabled", q->qdir, strerror(-rc));
        qmgr_free(q);
        return 0;
    }
    kt_queue_cleanup(q->qdir);
    if ((rc = kt_loop_init(&q->loop, 256)) < 0) {
        kt_err("queue manager: io_uring: %s", strerror(-rc));
        qmgr_free(q);
        return rc;
    }
    const char *servers = q->set->dns_servers;
    if ((rc = kt_dns_new(&q->loop, servers, &q->dns)) < 0) {
        kt_err("queue manager: resolver (ktrelay_dns_servers = %s): %s", servers, strerror(-rc));
        qmgr_free(q);
        return rc;
    }
    q->efd = eventfd(0, EFD_CLOEXEC);
    if (q->efd < 0) {
        rc = -errno;
        qmgr_free(q);
        return rc;
    }
    atomic_store(&global_efd, q->efd);
    if ((rc = pthread_create(&q->thread, NULL, qmgr_main, q)) != 0) {
        atomic_store(&global_efd, -1);
        qmgr_free(q);
        return -rc;
    }
    *out = q;
    return 0;
}

void kt_qmgr_reload(struct kt_qmgr *q, struct kt_runtime *rt)
{
    if (!q)
        return;
    kt_runtime_unref(atomic_exchange(&q->next_rt, kt_runtime_ref(rt)));
    uint64_t one = 1;
    if (write(q->efd, &one, sizeof(one)) < 0) {
        /* the counter is full: a wakeup is pending anyway, and the tick adopts it too */
    }
}

void kt_qmgr_stop(struct kt_qmgr *q)
{
    if (!q)
        return;
    atomic_store(&q->stop, 1);
    uint64_t one = 1;
    if (write(q->efd, &one, sizeof(one)) < 0)
        kt_warn("queue manager: cannot signal stop: %s", strerror(errno));
    pthread_join(q->thread, NULL);
    atomic_store(&global_efd, -1);
    kt_info("queue manager stopped: %lu message bodies sent with sendfile", kt_smtp_sendfile_count());
    qmgr_free(q);
}
