/* Queue manager (see qmgr.h).
 *
 * State on disk is the truth, read once: at start every file in new/ is
 * loaded with its status records, so a restart resumes where the last run
 * stopped. After that the queue lives in memory and the directory is never
 * scanned again. A message queued by an SMTP session reaches the manager
 * directly: the session hands over the envelope it wrote as soon as the
 * queue file is durable (kt_qmgr_submit: a locked list and an eventfd that
 * is written only when the list was empty), so delivery starts without
 * reading the file back. Other processes (`ktrelay sendmail`, `ktrelay queue
 * flush`) write one line into the public/qmgr FIFO, as Postfix's pickup and
 * qmgr do; bounces made here are loaded by id.
 *
 * In memory: messages indexed by queue id (a hash table), deferred messages
 * in a heap by next retry time, and per destination (next hop) a queue of
 * jobs; a job is one message's pending recipients for one destination.
 * Each destination runs at most `window` SMTP connections, each running
 * queued jobs one after another before it QUITs. The window starts at
 * initial_destination_concurrency and moves like Postfix's feedback: +1/window
 * per delivered job, -1/window per failed connection, between 1 and
 * default_destination_concurrency_limit. Local recipients (mydestination,
 * virtual_mailbox_domains), such as the senders of bounces, go to their
 * Maildir through the same io_uring writer the SMTP server uses.
 *
 * Outcomes: a job's results are recorded together, one append and one fsync
 * for all its recipients, before they are acted on. When a job leaves its
 * message with every recipient delivered (the common case) no record is
 * written at all: the queue file is removed at once, and one fsync of new/,
 * shared by every removal made while the previous one ran, makes the
 * removals durable. The one window for a duplicate is unchanged: the next
 * hop answered 250 to the end of data but ktrelay stopped (crash, kill -9)
 * before the record or the removal reached the disk; that recipient is sent
 * again after restart.
 *
 * A message is retried minimal_backoff_time after its first failure,
 * doubling up to maximal_backoff_time; deferred messages whose time has come
 * are taken from the heap every queue_run_delay, new ones at once. After
 * maximal_queue_lifetime (bounce_queue_lifetime for the null sender) pending
 * recipients fail.
 *
 * Queue-file opens, status appends and unlinks are plain system calls on
 * this thread through cached directory descriptors: they are local and
 * short, and no SMTP server session waits on them. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stddef.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "queue/bounce.h"
#include "conf/config.h"
#include "core/dirsync.h"
#include "queue/dane.h"
#include "queue/dns.h"
#include "delivery/header_scan.h"
#include "metrics/metrics.h"
#include "core/log.h"
#include "delivery/maildir.h"
#include "queue/mta_sts.h"
#include "queue/qmgr.h"
#include "queue/pickup.h"
#include "queue/queue.h"
#include "delivery/resolve.h"
#include "conf/settings.h"
#include "queue/smtp_client.h"
#include "queue/smtp_sasl.h"
#include "delivery/transport.h"
#include "queue/tls_policy.h"
#include "core/table.h"
#include "queue/tlsrpt.h"
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
    const char **addrs;            /* the recipients as sent: the queue's, or local(8)'s for mailbox_transport */
    char **own;                    /* addresses of addrs[] that the job owns (NULL entries: the queue's) */
    unsigned *notify;              /* NOTIFY bits of each, for the client */
    const char **orcpt;            /* ORCPT of each or NULL (strings are the message's) */
    int *codes;
    char **replies;
    int fd;
    int requeued;                  /* already put back once after a cached connection had died */
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
    unsigned jobs_done;            /* transactions completed on this connection */
    const char *sasl_value;        /* smtp_sasl_password_maps value it authenticates with, or NULL */
    char server[256];              /* the first server's name, a key of that lookup */
    time_t idle_since;             /* waiting for work since (connection cache) */
    /* kt_smtp_connect can fail before it returns (no address may be used): kept for after it */
    int opening, open_res;
    char *open_reason;
    struct conn *next;
};

struct dest {
    char *key;                     /* "local", "smtp:NEXTHOP" or "lmtp:unix:PATH" / "lmtp:inet:HOST" */
    double window;                 /* concurrency window (feedback), 1 .. limit */
    int local;
    int lmtp;                      /* delivered with LMTP (lmtp(8)) */
    char *unix_path;               /* LMTP over a unix-domain socket: the path as configured */
    char *host;                    /* next hop without brackets and port */
    int port, mx;
    int bad_port;                  /* the next hop's port is no port: every job is deferred */
    struct job *head, *tail;
    size_t queued;
    struct conn *conns;
    unsigned n_conns, n_unassigned;
    int resolving;
    struct kt_smtp_addr *addrs;
    size_t n_addrs;
    time_t addrs_expire;
    /* MTA-STS (RFC 8461): the policy found at the last address lookup */
    int has_sts;                   /* sts holds a policy of mode testing or enforce */
    struct kt_sts_policy sts;
    struct kt_dane_set *dane;      /* TLSA records of its hosts, when its policy is dane or dane-only */
    int addrs_dnssec;              /* addrs were looked up with DNSSEC (AD) for DANE */
    struct job *local_job;         /* local: the job being delivered */
    long long resume_ms;           /* smtp_destination_rate_delay: no delivery starts before (mono_ms) */
    struct dest *next;
    struct kt_qmgr *q;
};

struct msg {
    struct kt_qmsg *q;
    time_t next_try;
    unsigned attempts;
    unsigned jobs;
    char *defer_reason;
    struct msg *next, *prev;       /* every message */
    struct msg *hnext;             /* hash chain by id */
    size_t heap_idx;               /* place in the deferred heap, or NOT_IN_HEAP */
    int gone;                      /* the queue file was removed behind our back (queue delete) */
};

#define NOT_IN_HEAP ((size_t)-1)

/* A message an SMTP session handed over, waiting for the manager's thread. */
struct handoff {
    struct handoff *next;
    struct kt_qmsg *m;
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
    struct kt_pickup *pickup;      /* maildrop/ through non_smtpd_milters, on this ring */
    struct kt_sts *sts;            /* MTA-STS policies (ktrelay_mta_sts_enable) */
    struct kt_tlsrpt *tlsrpt;      /* TLS reporting (ktrelay_tlsrpt_enable) */
    struct msg *msgs;
    size_t n_msgs;
    struct msg **htab;             /* by queue id; hcap is a power of two */
    size_t hcap;
    struct msg **heap;             /* deferred, by next_try */
    size_t heap_n, heap_cap;
    struct dest *dests;
    time_t last_run;
    unsigned initial_concurrency;
    int new_fd, status_fd, tmp_fd; /* cached new/, status/ and tmp/ */
    char *new_dir;
    /* removals waiting for one fsync of new/ */
    struct kt_dirsync_waiter rm_wait;
    int rm_in_flight, rm_dirty;
    /* handed over by SMTP sessions (kt_qmgr_submit) */
    pthread_mutex_t in_mu;
    struct handoff *in_head, *in_tail;
    int in_signalled;
    /* public/qmgr */
    int fifo_fd;
    struct kt_op fifo_op;
    char fifo_buf[4096];
    size_t fifo_len;
};

/* The client settings of d's transport: lmtp(8)'s or smtp(8)'s. */
static const struct kt_smtp_settings *dest_client(const struct dest *d)
{
    return d->lmtp ? &d->q->set->lmtp : &d->q->set->smtp;
}

static struct kt_qmgr *_Atomic global_q;
/* queue_directory of the last manager this process ran (kt_qmgr_submit without one) */
static _Atomic(const char *) submit_qdir;

static void dest_kick(struct dest *d);
static void msg_round_done(struct kt_qmgr *q, struct msg *m);
static void local_next(struct dest *d);
static void msg_load(struct kt_qmgr *q, const char *id, int start);
static void notify_sender(struct kt_qmgr *q, struct msg *m, enum kt_dsn_kind kind, int fd,
                          const struct kt_dsn_rcpt *r, size_t n, time_t until);

/* The wall clock, in seconds since the epoch: every time the manager reads
 * is read here. Unit tests point qmgr_clock elsewhere (the test includes this
 * file); nothing else changes it. */
static time_t qmgr_clock_wall(void)
{
    return time(NULL);
}

static time_t (*qmgr_clock)(void) = qmgr_clock_wall;

static time_t qmgr_now(void)
{
    return qmgr_clock();
}

/* Milliseconds on the monotonic clock, for smtp_destination_rate_delay's gaps. */
static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double delay_of(const struct msg *m)
{
    return difftime(qmgr_now(), m->q->arrival);
}

/* ---- routing ---- */

/* A next hop's port: 1 to 65535, or a service name of /etc/services (Postfix's ":smtp"); -1 for anything
 * else, which must not quietly become port 25 (a typo in a content filter's port would send the mail
 * around the filter). */
static int port_of(const char *s)
{
    if (!*s)
        return -1;
    if (strspn(s, "0123456789") == strlen(s)) {
        long p = strlen(s) <= 5 ? strtol(s, NULL, 10) : 0;
        return p >= 1 && p <= 65535 ? (int)p : -1;
    }
    struct servent *se = getservbyname(s, "tcp");
    return se ? ntohs((uint16_t)se->s_port) : -1;
}

/* A next hop "[host]:port", "[host]", "host:port" or "host": *HOST (owned by the caller) and *PORT
 * (default_port when none is given; -1 when what is given is no port, or the bracket is not closed).
 * Returns 1 for the bracketed form (no MX lookup), else 0. */
static int parse_host_port(const char *nh, int default_port, char **host, int *port)
{
    int bracketed = nh[0] == '[';
    *port = default_port;
    if (bracketed) {
        const char *end = strchr(nh, ']');
        *host = kt_strndup(nh + 1, end ? (size_t)(end - nh - 1) : strlen(nh + 1));
        if (!end || (end[1] && end[1] != ':'))
            *port = -1;
        else if (end[1] == ':')
            *port = port_of(end + 2);
    } else {
        const char *colon = strrchr(nh, ':');
        *host = colon ? kt_strndup(nh, (size_t)(colon - nh)) : kt_strdup(nh);
        if (colon)
            *port = port_of(colon + 1);
    }
    return bracketed;
}

static struct dest *dest_get(struct kt_qmgr *q, const char *key)
{
    for (struct dest *d = q->dests; d; d = d->next)
        if (!strcmp(d->key, key))
            return d;
    struct dest *d = kt_calloc(1, sizeof(*d));
    d->q = q;
    d->key = kt_strdup(key);
    d->window = q->set->initial_destination_concurrency;
    d->local = !strcmp(key, "local");
    d->lmtp = !strncmp(key, "lmtp:", 5);
    if (d->lmtp) {
        /* "lmtp:unix:PATH" (relative: below queue_directory, as Postfix's private/dovecot-lmtp), or
         * "lmtp:inet:[host]:port", "lmtp:inet:host:port", "lmtp:inet:host"; never an MX lookup */
        const char *nh = key + 5;
        if (!strncmp(nh, "unix:", 5)) {
            d->unix_path = kt_strdup(nh + 5);
            d->host = kt_strdup(nh + 5);
        } else {
            nh += 5;    /* "inet:" */
            parse_host_port(nh, 24, &d->host, &d->port);
            d->bad_port = d->port < 0;
        }
        if (d->window > q->set->lmtp_concurrency_limit)
            d->window = q->set->lmtp_concurrency_limit;
    } else if (!d->local) {
        /* "smtp:[host]:port", "smtp:host:port", "smtp:host" */
        const char *nh = strchr(key, ':') + 1;
        d->mx = !parse_host_port(nh, 25, &d->host, &d->port);
        d->bad_port = d->port < 0;
    }
    d->next = q->dests;
    q->dests = d;
    return d;
}

/* Key of the destination for addr ("local", "smtp:NEXTHOP", "lmtp:unix:PATH", "lmtp:inet:HOST"), "" for a
 * transport ktrelay does not run (deferred), or NULL with *err set for a recipient that fails at once.
 * filter: a FILTER action's "transport:destination" (header/body checks), which sends every recipient
 * there, as Postfix's content filter: routed like a transport_maps result, before the address classes. */
static char *route(struct kt_qmgr *q, const char *addr, const char *filter, const char **err)
{
    *err = NULL;
    const char *at = strrchr(addr, '@');
    if (!filter && (!at || !at[1]))
        return kt_strdup("local");
    enum kt_addr_class cls = q->set->resolver && at ? kt_resolve_class(q->set->resolver, at + 1) : KT_CLASS_DEFAULT;
    if (!filter && cls == KT_CLASS_ALIAS) {
        /* an address of a virtual alias domain that virtual_alias_maps did not rewrite (Postfix's error
         * transport for that class) */
        *err = "User unknown in virtual alias table";
        return NULL;
    }
    if (!q->set->transport)
        return cls == KT_CLASS_LOCAL || cls == KT_CLASS_VIRTUAL ? kt_strdup("local") : kt_strdup("");
    /* one route per recipient: the result lives in the manager, which runs on one thread */
    static struct kt_route r;
    if (filter)
        kt_transport_route_as(q->set->transport, filter, addr, cls, &r);
    else
        kt_transport_route(q->set->transport, addr, cls, &r);
    switch (r.kind) {
    case KT_XPORT_MAILDIR:
        return kt_strdup("local");
    case KT_XPORT_SMTP:
        return kt_asprintf("smtp:%s", r.nexthop);
    case KT_XPORT_LMTP:
        return kt_asprintf("lmtp:%s", r.nexthop);
    case KT_XPORT_ERROR:
        *err = r.nexthop;
        return NULL;
    default:
        return kt_strdup("");
    }
}

/* ---- recipient outcomes ---- */

/* The enhanced status code of a reply "550 5.1.1 ..." at P into OUT ("5.1.1"): 1, or 0 when P holds none. */
static int reply_dsn(const char *p, char *out, size_t len)
{
    if (strlen(p) > 9 && isdigit((unsigned char)p[4]) && p[5] == '.' && isdigit((unsigned char)p[6])) {
        size_t n = strcspn(p + 4, " ");
        if (n < len) {
            snprintf(out, len, "%.*s", (int)n, p + 4);
            return 1;
        }
    }
    return 0;
}

/* "5.1.1" from "... said: 550 5.1.1 ..." or the class of the code */
static void dsn_of(int code, const char *text, char *out, size_t len)
{
    const char *said = text ? strstr(text, "said: ") : NULL;
    if (!said || !reply_dsn(said + 6, out, len))
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
static const char *lmtp_agent;     /* "lmtp" while the outcomes of an LMTP job are logged (one thread) */

static const char *agent_of(const char *relay)
{
    if (!strcmp(relay, "local") || !strcmp(relay, "virtual"))
        return relay;
    return lmtp_agent ? lmtp_agent : "smtp";
}

/* What a "to=<%s>" log line shows for recipient i: the address, and after it Postfix's ", orig_to=<...>" when
 * address rewriting changed it. One buffer per thread, for one use at a time. */
static const char *to_of(const struct msg *m, size_t i)
{
    static __thread char buf[1100];
    const struct kt_qrcpt *r = &m->q->rcpts[i];
    if (!r->orig_rcpt)
        return r->addr;
    snprintf(buf, sizeof(buf), "%s>, orig_to=<%s", r->addr, r->orig_rcpt);
    return buf;
}

static void log_sent(struct msg *m, size_t i, const char *relay, const char *text)
{
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
    kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=2.0.0, status=sent (%s)", m->q->id, to_of(m, i), relay,
            delay_of(m), reply);
}

/* The status record of a failed recipient, "DSN RELAY TEXT"; *dsn gets the enhanced status code. */
static char *fail_reason(const char *relay, int code, const char *given, const char *text, char *dsn, size_t len)
{
    if (given)
        snprintf(dsn, len, "%s", given);
    else
        dsn_of(code, text, dsn, len);
    if (dsn[0] != '5')
        dsn[0] = '5';
    return kt_asprintf("%s %s %s", dsn, strcmp(relay, "none") ? relay : "-", text);
}

static int record(struct kt_qmgr *q, struct msg *m, const struct kt_qmark *marks, size_t n)
{
    int rc = kt_queue_mark_many(q->status_fd, m->q, marks, n);
    if (rc < 0)
        kt_err("%s: cannot record the outcome of %zu recipient%s: %s", m->q->id, n, n == 1 ? "" : "s",
               strerror(-rc));
    return rc;
}

static void rcpt_done(struct kt_qmgr *q, struct msg *m, size_t i, const char *relay, const char *text)
{
    struct kt_qmark mk = { i, KT_QR_DONE, NULL };
    if (record(q, m, &mk, 1) == 0)
        log_sent(m, i, relay, text);
}

/* given: the enhanced status code when no server reply says it (resolver failures), else NULL */
static void rcpt_failed(struct kt_qmgr *q, struct msg *m, size_t i, const char *relay, int code, const char *given,
                        const char *text)
{
    char dsn[32];
    char *reason = fail_reason(relay, code, given, text, dsn, sizeof(dsn));
    struct kt_qmark mk = { i, KT_QR_FAILED, reason };
    int rc = record(q, m, &mk, 1);
    kt_free(reason);
    if (rc == 0) {
        kt_metric_inc(KT_M_DELIVERY_BOUNCED);
        kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=%s, status=bounced (%s)", m->q->id,
                   to_of(m, i), relay, delay_of(m), dsn, text);
    }
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
    kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=%s, status=deferred (%s)", m->q->id, to_of(m, i), relay,
            delay_of(m), dsn, text);
    kt_free(m->defer_reason);
    m->defer_reason = kt_asprintf("%s %s %s", dsn, strcmp(relay, "none") ? relay : "-", text);
    /* for the queue listing: written with the round's outcome (msg_round_done) */
    kt_free(m->q->rcpts[i].reason);
    m->q->rcpts[i].reason = kt_strdup(text);
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

/* as: the address to send instead of the queue's (owned by the job from now on), or NULL */
static void job_add_rcpt_as(struct job *j, size_t i, char *as)
{
    j->idx = kt_realloc(j->idx, (j->n + 1) * sizeof(*j->idx));
    j->addrs = kt_realloc(j->addrs, (j->n + 1) * sizeof(*j->addrs));
    j->notify = kt_realloc(j->notify, (j->n + 1) * sizeof(*j->notify));
    j->orcpt = kt_realloc(j->orcpt, (j->n + 1) * sizeof(*j->orcpt));
    j->own = kt_realloc(j->own, (j->n + 1) * sizeof(*j->own));
    j->idx[j->n] = i;
    j->addrs[j->n] = as ? as : j->m->q->rcpts[i].addr;
    j->own[j->n] = as;
    j->notify[j->n] = j->m->q->rcpts[i].notify;
    j->orcpt[j->n] = j->m->q->rcpts[i].orcpt;
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
    kt_free(j->notify);
    kt_free(j->orcpt);
    if (j->own)
        for (size_t k = 0; k < j->n; k++)
            kt_free(j->own[k]);
    kt_free(j->own);
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

/* Every outcome of a job at once. res/reason: the connection's fate when it is not 0. Final outcomes
 * are recorded with one append and one fsync for the whole job; when they leave the message with every
 * recipient delivered and nothing else in flight, the removal of the queue file that follows is the
 * record, and nothing is written. */
static void job_results(struct kt_qmgr *q, struct job *j, int res, const char *dsn, const char *reason,
                        const char *relay, int hop_dsn)
{
    struct msg *m = j->m;
    lmtp_agent = j->d->lmtp ? "lmtp" : NULL;
    struct kt_qmark *marks = kt_calloc(j->n, sizeof(*marks));
    const char **texts = kt_calloc(j->n, sizeof(*texts));
    char (*dsns)[32] = kt_calloc(j->n, sizeof(*dsns));
    size_t n = 0, n_failed = 0;
    for (size_t k = 0; k < j->n; k++) {
        size_t i = j->idx[k];
        int code = j->codes ? j->codes[k] : 0;
        const char *text = j->replies && j->replies[k] ? j->replies[k] : reason;
        if (code >= 500 || (res >= 500 && code == 0)) {
            const char *t = code >= 500 ? (text ? text : "rejected") : (reason ? reason : "rejected");
            char *r = fail_reason(relay, code >= 500 ? code : res, code >= 500 ? NULL : dsn, t, dsns[n],
                                  sizeof(dsns[n]));
            marks[n] = (struct kt_qmark){ i, KT_QR_FAILED, r };
            texts[n++] = t;
            n_failed++;
        } else if ((res == 0 || k < j->sm.final_upto) && code >= 200 && code < 300) {
            marks[n] = (struct kt_qmark){ i, KT_QR_DONE, NULL };
            texts[n++] = text;
        } else {
            rcpt_deferred(m, i, relay, code ? code : res > 0 ? res : 450, code ? NULL : dsn,
                          text ? text : reason ? reason : "delivery temporarily suspended");
        }
    }
    /* Does this job finish the message with nothing to report to the sender? Its recipients are the
     * message's pending ones (a recipient is in one job at a time), so count those. */
    int silent = n_failed == 0 && n == j->n && m->jobs == 1;
    size_t pending = 0;
    for (size_t i = 0; silent && i < m->q->n_rcpts; i++) {
        if (m->q->rcpts[i].state == KT_QR_FAILED)
            silent = 0;
        else if (m->q->rcpts[i].state == KT_QR_PENDING)
            pending++;
    }
    if (pending != j->n)
        silent = 0;
    int rc = 0;
    if (silent) {
        for (size_t k = 0; k < n; k++)
            m->q->rcpts[marks[k].rcpt].state = KT_QR_DONE;
    } else if (n > 0) {
        rc = record(q, m, marks, n);
    }
    struct kt_dsn_rcpt *ok = kt_calloc(n ? n : 1, sizeof(*ok));
    char **ok_reasons = kt_calloc(n ? n : 1, sizeof(*ok_reasons));
    size_t n_ok = 0;
    for (size_t k = 0; k < n && rc == 0; k++) {
        size_t i = marks[k].rcpt;
        if (marks[k].state == KT_QR_DONE) {
            log_sent(m, i, relay, texts[k]);
            /* RFC 3461 5.2.2: a next hop without DSN cannot report success; ktrelay does: "relayed", or
             * "delivered" after LMTP, which is final delivery (as Postfix's lmtp) */
            if ((m->q->rcpts[i].notify & KT_QNOTIFY_SUCCESS) && !hop_dsn) {
                ok_reasons[n_ok] = kt_asprintf("2.0.0 %s %s", relay, texts[k] ? texts[k] : "relayed");
                ok[n_ok] = (struct kt_dsn_rcpt){ m->q->rcpts[i].addr, ok_reasons[n_ok], m->q->rcpts[i].orcpt,
                                                 j->d && j->d->lmtp ? "delivered" : "relayed" };
                n_ok++;
            }
        } else {
            kt_metric_inc(KT_M_DELIVERY_BOUNCED);
            kt_info_as(agent_of(relay), "%s: to=<%s>, relay=%s, delay=%.0f, dsn=%s, status=bounced (%s)", m->q->id,
                       to_of(m, i), relay, delay_of(m), dsns[k], texts[k]);
        }
    }
    /* queued before the message file can go (the removal follows this round) */
    if (n_ok)
        notify_sender(q, m, KT_DSN_SUCCESS, j->fd, ok, n_ok, 0);
    for (size_t k = 0; k < n_ok; k++)
        kt_free(ok_reasons[k]);
    kt_free(ok_reasons);
    kt_free(ok);
    for (size_t k = 0; k < n; k++)
        kt_free((char *)marks[k].reason);
    kt_free(marks);
    kt_free(texts);
    kt_free(dsns);
    lmtp_agent = NULL;
}

static void job_defer_all(struct kt_qmgr *q, struct job *j, int res, const char *dsn, const char *reason)
{
    job_results(q, j, res, dsn, reason, "none", 0);
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

/* Back at the head of the queue: the job goes out next, on another connection. */
static void dest_push_front(struct dest *d, struct job *j)
{
    j->next = d->head;
    d->head = j;
    if (!d->tail)
        d->tail = j;
    d->queued++;
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

/* Postfix's concurrency feedback (destination_concurrency_positive_feedback and _negative_feedback, both
 * 1/concurrency): the window grows by one connection after `window` good deliveries and shrinks by one
 * after `window` failed connections. */
static void dest_feedback(struct dest *d, int ok)
{
    unsigned limit = d->lmtp ? d->q->set->lmtp_concurrency_limit : d->q->set->destination_concurrency_limit;
    d->window += (ok ? 1.0 : -1.0) / d->window;
    if (d->window > limit)
        d->window = limit;
    if (d->window < 1)
        d->window = 1;
}

static void job_sent(void *arg, int res, const char *reason)
{
    struct conn *cn = arg;
    struct dest *d = cn->d;
    struct job *j = cn->job;
    cn->job = NULL;
    d->n_unassigned++;
    int replied = 0;
    for (size_t k = 0; k < j->n; k++)
        replied |= j->codes[k] != 0;
    if (res < 0 && cn->jobs_done > 0 && !replied && !j->requeued && !d->q->stopping) {
        /* A cached connection the peer had closed while it waited (the write went out, nothing came
         * back): not the message's fault, so it goes out again at once on a fresh connection, once. */
        j->requeued = 1;
        dest_push_front(d, j);
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    if (res == 0)
        cn->jobs_done++;
    if (dest_client(d)->rate_delay_s > 0)
        d->resume_ms = mono_ms() + dest_client(d)->rate_delay_s * 1000;
    /* a delivery that got replies counts as success for the window, a broken connection as failure */
    dest_feedback(d, res >= 0);
    /* Ending the job can queue new work for d (a bounce): this connection must not be handed it from
     * inside its own completion, so it is not ready until the outcomes are dealt with. */
    cn->ready = 0;
    job_results(d->q, j, res, NULL, reason, kt_smtp_relay(cn->c),
                (kt_smtp_extensions(cn->c) & KT_SMTP_EXT_DSN) != 0);
    job_end(d->q, j);
    cn->ready = 1;
    unsigned reuse_limit = dest_client(d)->reuse_count_limit;
    if (res != 0 || !kt_smtp_usable(cn->c) || (reuse_limit && cn->jobs_done >= reuse_limit)) {
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    conn_run_next(cn);
    /* the window may have grown: more connections for what still waits */
    dest_kick(d);
}

static int prepare_job_fd(struct kt_qmgr *q, struct job *j)
{
    if (j->fd >= 0)
        return 0;
    j->fd = kt_queue_open_body_at(q->new_fd, j->m->q->id);
    if (j->fd == -ENOENT)
        j->m->gone = 1;            /* `ktrelay queue delete`: forget it */
    return j->fd < 0 ? j->fd : 0;
}

static int has_8bit(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 1;
    return 0;
}

/* Postfix's rule for a message whose client asked for SMTPUTF8: it needs the extension when its envelope
 * or its header section holds UTF-8 (smtputf8_autodetect_classes is about mail without the request). */
static int smtputf8_needed(const struct job *j)
{
    const struct kt_qmsg *m = j->m->q;
    char head[65536];
    if (!m->smtputf8 || !j->d->q->set->smtputf8_enable)
        return 0;
    if (has_8bit(m->sender, strlen(m->sender)))
        return 1;
    for (size_t i = 0; i < m->n_rcpts; i++)
        if (has_8bit(m->rcpts[i].addr, strlen(m->rcpts[i].addr)))
            return 1;
    size_t want = (size_t)m->body_len < sizeof(head) ? (size_t)m->body_len : sizeof(head);
    ssize_t got = want ? pread(j->fd, head, want, m->body_off) : 0;
    if (got <= 0)
        return 0;
    const char *end = memmem(head, (size_t)got, "\r\n\r\n", 4);
    return has_8bit(head, end ? (size_t)(end - head) : (size_t)got);
}

/* A message that needs SMTPUTF8 and a server that does not offer it: the job's recipients bounce with
 * Postfix's 5.6.7 (nothing is sent). 1 when that happened and the job is over. */
static int smtputf8_refused(struct conn *cn, struct job *j)
{
    if ((kt_smtp_extensions(cn->c) & KT_SMTP_EXT_SMTPUTF8) || !smtputf8_needed(j))
        return 0;
    const char *relay = kt_smtp_relay(cn->c);
    const char *br = strrchr(relay, ']');
    char text[400];
    snprintf(text, sizeof(text), "SMTPUTF8 is required, but was not offered by host %.*s",
             br ? (int)(br - relay + 1) : (int)strlen(relay), relay);
    if (j->replies)
        for (size_t k = 0; k < j->n; k++)
            kt_free(j->replies[k]);
    kt_free(j->replies);
    kt_free(j->codes);
    j->replies = NULL;
    j->codes = NULL;
    job_results(cn->d->q, j, 550, "5.6.7", text, relay, 0);
    job_end(cn->d->q, j);
    return 1;
}

/* The smtp_sasl_password_maps value for a connection of d to server carrying j (NULL: no AUTH). */
static const char *sasl_value(const struct dest *d, const struct job *j, const char *server)
{
    const struct kt_smtp_settings *sm = dest_client(d);
    if (!sm->sasl_auth_enable || !sm->sasl_password_maps)
        return NULL;
    struct kt_smtp_sasl_keys k = {
        .sender = j ? j->m->q->sender : NULL, .sender_dependent = sm->sender_dependent_auth,
        .server = server, .nexthop = strchr(d->key, ':') + 1,
    };
    return kt_smtp_sasl_lookup(sm->sasl_password_maps, &k);
}

/* The next job this connection may carry: the first queued one, or with sender-dependent credentials
 * the first whose sender authenticates as this connection does (Postfix does not reuse such a
 * connection at all; reuse under the same credentials is as safe). */
static struct job *dest_take(struct dest *d, struct conn *cn)
{
    const struct kt_smtp_settings *sm = dest_client(d);
    if (!sm->sasl_auth_enable || !sm->sender_dependent_auth)
        return dest_pop(d);
    struct job *prev = NULL;
    for (struct job *j = d->head; j; prev = j, j = j->next) {
        if (sasl_value(d, j, cn->server) != cn->sasl_value)
            continue;
        if (prev)
            prev->next = j->next;
        else
            d->head = j->next;
        if (d->tail == j)
            d->tail = prev;
        j->next = NULL;
        d->queued--;
        return j;
    }
    return NULL;
}

static void conn_run_next(struct conn *cn)
{
    struct dest *d = cn->d;
    struct job *j;
    if (cn->rt != d->q->rt || !kt_smtp_usable(cn->c)) {
        /* opened under an older configuration: the next delivery uses the new one (smtp_tls_*, helo) */
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    if (dest_client(d)->rate_delay_s > 0 && mono_ms() < d->resume_ms) {
        /* smtp_destination_rate_delay: wait (cached) until the gap has passed; the tick resumes */
        cn->idle_since = qmgr_now();
        return;
    }
    /* not ready while picking: ending a job whose file is gone can call dest_kick */
    cn->ready = 0;
    while (!d->q->stopping && (j = dest_take(d, cn))) {
        if (prepare_job_fd(d->q, j) < 0) {
            if (!j->m->gone)
                kt_warn("%s: cannot open the queue file: %s", j->m->q->id, strerror(-j->fd));
            job_end(d->q, j);
            continue;
        }
        if (smtputf8_refused(cn, j))
            continue;
        cn->ready = 1;
        cn->job = j;
        d->n_unassigned--;
        if (j->replies)            /* a requeued job: start afresh */
            for (size_t k = 0; k < j->n; k++)
                kt_free(j->replies[k]);
        kt_free(j->codes);
        kt_free(j->replies);
        j->codes = kt_calloc(j->n, sizeof(*j->codes));
        j->replies = kt_calloc(j->n, sizeof(*j->replies));
        j->sm = (struct kt_smtp_msg){
            .id = j->m->q->id, .sender = j->m->q->sender, .rcpts = j->addrs, .n_rcpts = j->n, .fd = j->fd,
            .body_off = j->m->q->body_off, .body_len = j->m->q->body_len, .dots = j->m->q->dots,
            .canonical = j->m->q->canonical,
            .smtputf8 = j->m->q->smtputf8 && d->q->set->smtputf8_enable, .body = j->m->q->body, .ret = j->m->q->ret, .envid = j->m->q->envid,
            .notify = j->notify, .orcpt = j->orcpt,
            .codes = j->codes, .replies = j->replies,
        };
        kt_smtp_send(cn->c, &j->sm, job_sent, cn);
        return;
    }
    cn->ready = 1;
    if (d->queued && !d->q->stopping) {
        /* what waits needs other credentials: this connection makes room for one that has them */
        conn_remove(cn);
        dest_kick(d);
        return;
    }
    /* nothing more for this destination now: keep the connection for a moment, then QUIT (tick) */
    if (d->q->stopping)
        conn_remove(cn);
    else
        cn->idle_since = qmgr_now();
}

/* The TLS outcome of a connection: logged for an MTA-STS policy in testing mode, counted for TLS
 * reporting (RFC 8460) by the destination's policy domain. */
static void tls_outcome(struct conn *cn, const char *reason)
{
    struct dest *d = cn->d;
    struct kt_qmgr *q = d->q;
    const char *result, *mx, *ip, *local_ip;
    if (!kt_smtp_tls_report(cn->c, &result, &mx, &ip, &local_ip))
        return;
    if (result && d->has_sts && d->sts.mode == KT_STS_MODE_TESTING)
        kt_info_as("smtp", "MTA-STS policy of %s (mode testing): TLS with %s[%s] failed (%s); delivering anyway",
                   d->host, mx ? mx : "?", ip ? ip : "?", result);
    if (q->tlsrpt && q->set->tlsrpt_enable && d->mx)
        kt_tlsrpt_count(q->tlsrpt, d->host, d->has_sts ? &d->sts : NULL, result, local_ip, mx, ip,
                        result ? reason : NULL);
}

static void conn_ready(void *arg, int res, const char *reason)
{
    struct conn *cn = arg;
    struct dest *d = cn->d;
    if (res != 0 && cn->opening) {
        cn->open_res = res;
        cn->open_reason = kt_strdup(reason ? reason : "connection failed");
        return;
    }
    tls_outcome(cn, res != 0 ? reason : NULL);
    if (res != 0) {
        char dsn[16] = "";
        kt_info_as(d->lmtp ? "lmtp" : "smtp", "%s", reason);
        if (kt_smtp_dsn(cn->c))
            snprintf(dsn, sizeof(dsn), "%s", kt_smtp_dsn(cn->c));
        dest_feedback(d, 0);
        conn_remove(cn);
        /* the destination is down (or refuses us): what waits for it is deferred now rather
         * than fed to new connections that would fail the same way. A certificate that does not
         * verify is Postfix's 4.7.5; the client's own failures (AUTH, loops) carry their code. */
        dest_defer_queued(d, res, dsn[0] ? dsn : res == -EACCES ? "4.7.5" : NULL, reason);
        return;
    }
    cn->ready = 1;
    conn_run_next(cn);
}

/* The next hop as smtp_tls_policy_maps keys it: as written in the destination ("[host]:port", "domain"). */
static const char *dest_nexthop(const struct dest *d)
{
    return strchr(d->key, ':') + 1;      /* after "smtp:" */
}

/* The destination's TLS policy; dane and dane-only need DNSSEC lookups (smtp_dns_support_level = dnssec),
 * without which dane is may (Postfix warns and downgrades) and dane-only stays, to defer. */
static void dest_policy(const struct dest *d, struct kt_tls_policy *pol)
{
    const struct kt_smtp_settings *sm = &d->q->set->smtp;
    /* LMTP has no TLS in ktrelay (lmtp_tls_security_level takes only none) */
    kt_tls_policy_lookup(d->lmtp ? NULL : sm->tls_policy, dest_nexthop(d), pol);
    if (pol->level == KT_SMTP_TLS_DANE && sm->dns_support_level != KT_SMTP_DNS_DNSSEC)
        pol->level = KT_SMTP_TLS_MAY;
}

static int dest_wants_dane(const struct dest *d)
{
    struct kt_tls_policy pol;
    if (!kt_tls_policy_set_uses_dane(d->q->set->smtp.tls_policy)
        || d->q->set->smtp.dns_support_level != KT_SMTP_DNS_DNSSEC)
        return 0;
    dest_policy(d, &pol);
    return pol.level == KT_SMTP_TLS_DANE || pol.level == KT_SMTP_TLS_DANE_ONLY;
}

/* Whether the destination's MTA-STS policy applies on top of its TLS policy. An smtp_tls_policy_maps
 * entry for the next hop wins, as the static table does when Postfix lists it before an MTA-STS
 * resolver; and DANE wins where it has usable TLSA records (RFC 8461 2). */
static int sts_applies(const struct dest *d, const struct kt_tls_policy *pol)
{
    if (!strcmp(pol->source, "smtp_tls_policy_maps"))
        return 0;
    if ((pol->level == KT_SMTP_TLS_DANE || pol->level == KT_SMTP_TLS_DANE_ONLY) && d->dane)
        for (size_t i = 0; i < d->dane->n; i++)
            if (d->dane->hosts[i].state == KT_DANE_USABLE)
                return 0;
    return 1;
}

static void conn_open(struct dest *d)
{
    struct kt_qmgr *q = d->q;
    struct conn *cn = kt_calloc(1, sizeof(*cn));
    struct kt_tls_policy pol;
    char *cipherlist = NULL;
    cn->d = d;
    cn->next = d->conns;
    d->conns = cn;
    d->n_conns++;
    d->n_unassigned++;
    const struct kt_smtp_settings *sm = d->lmtp ? &q->set->lmtp : &q->set->smtp;
    cn->rt = kt_runtime_ref(q->rt);
    dest_policy(d, &pol);
    struct kt_smtp_params p = {
        .helo_name = sm->helo_name,
        .tls_level = (enum kt_smtp_tls)pol.level,
        .ssl_ctx = sm->ssl_ctx,
        .sni = pol.servername[0] ? pol.servername : NULL,
        .nexthop_domain = d->host,
        .match = pol.match,
        .fingerprint_digest = pol.fingerprint_digest,
        .dane = d->dane,
        .tls_loglevel = sm->tls_loglevel,
        .connect_timeout_s = sm->connect_timeout_s,
        .command_timeout_s = sm->command_timeout_s,
        .data_done_timeout_s = sm->data_done_timeout_s,
        .lmtp = d->lmtp,
        .mime_output_conversion = q->set->mime_output_conversion,
        /* Postfix's lmtp_bind_address is another parameter: LMTP connections are not bound */
        .bind_addr4 = !d->lmtp && sm->bind_len4 ? (const struct sockaddr *)&sm->bind_addr4 : NULL,
        .bind_addr6 = !d->lmtp && sm->bind_len6 ? (const struct sockaddr *)&sm->bind_addr6 : NULL,
        .bind_len4 = sm->bind_len4,
        .bind_len6 = sm->bind_len6,
        .bind_enforce = sm->bind_enforce,
    };
    if (d->has_sts && sts_applies(d, &pol)) {
        /* RFC 8461 4.2: enforce needs TLS with a certificate valid for the MX host name; testing checks
         * the same and only reports what failed */
        p.verify_mx_name = 1;
        if (d->sts.mode == KT_STS_MODE_ENFORCE && (p.tls_level == KT_SMTP_TLS_NONE || p.tls_level == KT_SMTP_TLS_MAY
                                                   || p.tls_level == KT_SMTP_TLS_ENCRYPT
                                                   || p.tls_level == KT_SMTP_TLS_VERIFY
                                                   || p.tls_level == KT_SMTP_TLS_DANE))
            p.tls_level = KT_SMTP_TLS_SECURE;
        else if (p.tls_level == KT_SMTP_TLS_NONE)
            p.tls_level = KT_SMTP_TLS_MAY;
        pol.level = p.tls_level;
    }
    /* Postfix's smtp_randomize_addresses: hosts of equal MX preference in random order, per connection */
    struct kt_smtp_addr *addrs = kt_calloc(d->n_addrs, sizeof(*addrs));
    memcpy(addrs, d->addrs, d->n_addrs * sizeof(*addrs));
    for (size_t lo = 0; sm->randomize_addresses && lo < d->n_addrs;) {
        size_t hi = lo + 1;
        while (hi < d->n_addrs && addrs[hi].pref == addrs[lo].pref)
            hi++;
        for (size_t i = hi - 1; i > lo; i--) {
            size_t k = lo + arc4random_uniform((uint32_t)(i - lo + 1));
            struct kt_smtp_addr t = addrs[i];
            addrs[i] = addrs[k];
            addrs[k] = t;
        }
        lo = hi;
    }
    /* smarthost AUTH: the credentials for the first server, and with sender-dependent ones the sender
     * of the job this connection is most likely to carry (the first one no idle connection takes) */
    snprintf(cn->server, sizeof(cn->server), "%s", addrs[0].host);
    struct job *next = d->head;
    for (unsigned k = 1; next && k < d->n_unassigned; k++)
        next = next->next;
    cn->sasl_value = sasl_value(d, next ? next : d->head, cn->server);
    char *user = NULL, *pass = NULL;
    if (cn->sasl_value && kt_smtp_sasl_split(cn->sasl_value, &user, &pass) < 0)
        kt_warn("smtp_sasl_password_maps: the value for %s is not username:password; no AUTH", d->host);
    p.sasl_username = user;
    p.sasl_password = pass;
    p.sasl_mechs = sm->sasl_mechs;
    p.sasl_tls_mechs = sm->sasl_tls_mechs;
    p.sasl_soft_bounce = sm->sasl_soft_bounce;
    /* Postfix detects loops only for port 25 (other ports are content filters and the like) */
    p.loop_myhostname = d->port == 25 && !d->lmtp ? q->set->myhostname : NULL;
    p.nexthop = strchr(d->key, ':') + 1;    /* as written: "[host]:port", "domain" */
    if (pol.level != KT_SMTP_TLS_NONE
        && kt_tls_policy_openssl(sm->tls_policy, &pol, &p.min_version, &p.max_version, &p.no_mask, &cipherlist) == 0)
        p.cipherlist = cipherlist;
    cn->opening = 1;
    cn->c = kt_smtp_connect(&q->loop, &p, addrs, d->n_addrs, conn_ready, cn);
    cn->opening = 0;
    if (pass)
        explicit_bzero(pass, strlen(pass));
    kt_free(user);
    kt_free(pass);
    kt_free(addrs);
    kt_free(cipherlist);
    if (cn->open_reason) {
        char *why = cn->open_reason;
        cn->open_reason = NULL;
        conn_ready(cn, cn->open_res, why);      /* frees cn */
        kt_free(why);
    }
}

static void dane_resolved(void *arg, struct kt_dane_set *set)
{
    struct dest *d = arg;
    d->resolving = 0;
    if (!set)
        return;                    /* stopping */
    kt_dane_set_free(d->dane);
    d->dane = set;
    dest_kick(d);
}

/* 1 when sa is one of this host's addresses (inet_interfaces, proxy_interfaces). */
static int own_addr(const struct kt_qmgr *q, const struct sockaddr_storage *sa)
{
    for (size_t i = 0; i < q->set->n_own_addrs; i++) {
        const struct sockaddr_storage *o = &q->set->own_addrs[i];
        if (o->ss_family != sa->ss_family)
            continue;
        if (sa->ss_family == AF_INET && ((const struct sockaddr_in *)o)->sin_addr.s_addr ==
                                            ((const struct sockaddr_in *)sa)->sin_addr.s_addr)
            return 1;
        if (sa->ss_family == AF_INET6 && !memcmp(&((const struct sockaddr_in6 *)o)->sin6_addr,
                                                 &((const struct sockaddr_in6 *)sa)->sin6_addr, 16))
            return 1;
    }
    return 0;
}

static void resolved(void *arg, int res, const struct kt_smtp_addr *addrs, size_t n, const char *dsn,
                     const char *err)
{
    struct dest *d = arg;
    d->resolving = 0;
    if (res == -ECANCELED)
        return;                    /* stopping: the jobs stay queued on disk */
    if (res != 0 || n == 0) {
        kt_info_as(d->lmtp ? "lmtp" : "smtp", "%s", err ? err : "no address");
        dest_defer_queued(d, res > 0 ? res : 450, dsn ? dsn : "4.4.3", err ? err : "no address");
        return;
    }
    if (d->port == 25 && !d->lmtp) {
        /* Postfix's loop detection (port 25 only): an MX host that is this host, and every one of
         * equal or lower preference, is dropped; when nothing is left the mail would come back */
        unsigned self = (unsigned)-1;
        for (size_t i = 0; i < n; i++)
            if (addrs[i].pref < self && own_addr(d->q, &addrs[i].ss))
                self = addrs[i].pref;
        size_t keep = 0;
        while (keep < n && addrs[keep].pref < self)
            keep++;
        if (keep == 0) {
            char *why = kt_asprintf("mail for %s loops back to myself", d->host);
            kt_info_as("smtp", "%s", why);
            dest_defer_queued(d, 550, "5.4.6", why);
            kt_free(why);
            return;
        }
        n = keep;
    }
    struct kt_smtp_addr *use = kt_calloc(n, sizeof(*use));
    size_t n_use = 0;
    const char *refused = NULL;
    for (size_t i = 0; i < n; i++) {
        /* RFC 8461 4.1: an MX host the policy does not list is not used in enforce mode */
        if (d->has_sts && !kt_sts_mx_match(&d->sts, addrs[i].host)) {
            if (i == 0 || strcmp(addrs[i].host, addrs[i - 1].host))
                kt_info_as("smtp", "MTA-STS policy of %s (mode %s): MX host %s does not match the policy%s", d->host,
                           kt_sts_mode_str(d->sts.mode), addrs[i].host,
                           d->sts.mode == KT_STS_MODE_ENFORCE ? "; not used" : "; used (testing)");
            if (d->sts.mode == KT_STS_MODE_ENFORCE) {
                refused = addrs[i].host;
                if (d->q->tlsrpt && d->q->set->tlsrpt_enable && (i == 0 || strcmp(addrs[i].host, addrs[i - 1].host)))
                    kt_tlsrpt_count(d->q->tlsrpt, d->host, &d->sts, "validation-failure", NULL, addrs[i].host,
                                    NULL, "MX host not listed in the MTA-STS policy");
                continue;
            }
        }
        use[n_use++] = addrs[i];
    }
    if (n_use == 0) {
        char why[600];
        snprintf(why, sizeof(why), "MX host %s does not match the MTA-STS policy of %s (mode enforce)", refused,
                 d->host);
        kt_info_as("smtp", "%s", why);
        kt_free(use);
        dest_defer_queued(d, 450, "4.7.5", why);
        return;
    }
    kt_free(d->addrs);
    d->addrs = use;
    d->n_addrs = n_use;
    d->addrs_expire = qmgr_now() + 300;
    if (d->addrs_dnssec) {
        /* RFC 7672: the TLSA records of every validated host before the first connection */
        d->resolving = 1;
        kt_dane_resolve(d->q->dns, d->addrs, d->n_addrs, d->port, dane_resolved, d);
        return;
    }
    kt_dane_set_free(d->dane);
    d->dane = NULL;
    dest_kick(d);
}

/* The destination's MTA-STS policy is known: keep it, then look its addresses up. */
/* The next hop's addresses: MX records unless smtp_dns_support_level = disabled, with DNSSEC (AD-bit)
 * queries when its policy is dane or dane-only (d->addrs_dnssec). */
static void dns_lookup(struct dest *d)
{
    struct kt_qmgr *q = d->q;
    int mx = d->mx && q->set->smtp.dns_support_level != KT_SMTP_DNS_DISABLED;
    if (d->addrs_dnssec)
        kt_dns_lookup_dnssec(q->dns, d->host, d->port, mx, resolved, d);
    else
        kt_dns_lookup(q->dns, d->host, d->port, mx, resolved, d);
}

static void sts_known(void *arg, const struct kt_sts_policy *policy, const char *failure)
{
    struct dest *d = arg;
    struct kt_qmgr *q = d->q;
    kt_sts_policy_clear(&d->sts);
    d->has_sts = policy && policy->mode != KT_STS_MODE_NONE;
    if (d->has_sts)
        kt_sts_policy_copy(&d->sts, policy);
    if (failure && q->tlsrpt && q->set->tlsrpt_enable)
        kt_tlsrpt_count(q->tlsrpt, d->host, d->has_sts ? &d->sts : NULL, failure, NULL, NULL, NULL, NULL);
    if (q->stopping) {
        d->resolving = 0;
        return;
    }
    dns_lookup(d);
}

/* An LMTP server on a unix-domain socket needs no lookup: its one address is the path (relative paths
 * below queue_directory), shown in logs as Postfix shows it, "myhostname[private/dovecot-lmtp]". */
static void dest_unix_addr(struct dest *d)
{
    struct kt_smtp_addr *a = kt_calloc(1, sizeof(*a));
    struct sockaddr_un *sun = (struct sockaddr_un *)&a->ss;
    sun->sun_family = AF_UNIX;
    int n = d->unix_path[0] == '/' ? snprintf(sun->sun_path, sizeof(sun->sun_path), "%s", d->unix_path)
                                   : snprintf(sun->sun_path, sizeof(sun->sun_path), "%s/%s", d->q->qdir, d->unix_path);
    if (n < 0 || (size_t)n >= sizeof(sun->sun_path)) {
        kt_free(a);
        kt_info_as("lmtp", "LMTP socket path too long: %s", d->unix_path);
        dest_defer_queued(d, 451, "4.3.5", "LMTP socket path too long");
        return;
    }
    a->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + 1);
    snprintf(a->host, sizeof(a->host), "%s[%s]", d->q->set->myhostname, d->unix_path);
    d->addrs = a;
    d->n_addrs = 1;
    d->addrs_expire = (time_t)1 << 62;
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
    if (d->bad_port) {
        /* as Postfix's smtp(8), which stops on a bad port: the mail waits for the configuration to be fixed */
        char *why = kt_asprintf("bad port number in next hop %s", strchr(d->key, ':') + 1);
        kt_log_as(d->lmtp ? "lmtp" : "smtp", KT_LOG_WARN, "%s", why);
        dest_defer_queued(d, 450, "4.3.5", why);
        kt_free(why);
        return;
    }
    if (d->unix_path && !d->addrs)
        dest_unix_addr(d);
    int dane = dest_wants_dane(d);
    if (!d->addrs || qmgr_now() >= d->addrs_expire || dane != d->addrs_dnssec) {
        if (!d->resolving && d->n_conns == 0) {
            d->resolving = 1;
            d->addrs_dnssec = dane;
            /* MTA-STS applies to a next-hop domain found through MX records (RFC 8461 4) */
            if (q->sts && q->set->mta_sts_enable && d->mx) {
                kt_sts_lookup(q->sts, d->host, qmgr_now(), sts_known, d);
            } else {
                kt_sts_policy_clear(&d->sts);
                d->has_sts = 0;
                dns_lookup(d);
            }
        }
        if (!d->addrs || (d->addrs_dnssec && (d->resolving || !d->dane)))
            return;
    }
    long long rate = dest_client(d)->rate_delay_s;
    if (rate > 0 && mono_ms() < d->resume_ms)
        return;                    /* smtp_destination_rate_delay: the tick comes back */
    /* idle connections take work first (each pass gives one a job or drops it, so this ends); new
     * ones only while jobs outnumber them */
    while (d->queued) {
        struct conn *cn = d->conns;
        while (cn && !(cn->ready && !cn->job))
            cn = cn->next;
        if (!cn)
            break;
        conn_run_next(cn);
    }
    /* with a rate delay, one delivery at a time (Postfix) */
    unsigned limit = rate > 0 ? 1 : (unsigned)d->window;
    while (d->queued > d->n_unassigned && d->n_conns < limit)
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
        const char *agent = kt_delivery_agent_reason(j->dl);
        char *why = agent ? kt_strdup(agent) : kt_asprintf("cannot deliver to maildir: %s", strerror(-res));
        rcpt_deferred(j->m, i, local_relay(q, j->addrs[j->cur]), 450, NULL, why);
        kt_free(why);
    } else {
        char *text = kt_asprintf("delivered to maildir as %s", kt_delivery_name(j->dl));
        rcpt_done(q, j->m, i, local_relay(q, j->addrs[j->cur]), text);
        if ((j->m->q->rcpts[i].notify & KT_QNOTIFY_SUCCESS) && j->m->q->rcpts[i].state == KT_QR_DONE) {
            /* NOTIFY=SUCCESS at final delivery: "delivered" (RFC 3461 5.2.3) */
            struct kt_dsn_rcpt ok = { j->addrs[j->cur], "2.0.0 - delivered to maildir", j->m->q->rcpts[i].orcpt,
                                      "delivered" };
            notify_sender(q, j->m, KT_DSN_SUCCESS, j->fd, &ok, 1, 0);
        }
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
    /* what Postfix's virtual(8) and local(8) prepend, as the SMTP server's own final deliveries do */
    /* X-Original-To: the address before canonical and virtual alias rewriting (orig_rcpt) */
    const char *orig = j->m->q->rcpts[j->idx[j->cur]].orig_rcpt;
    char *hdr = kt_asprintf("Return-Path: <%s>\r\nX-Original-To: %s\r\nDelivered-To: %s\r\n", j->m->q->sender,
                            orig ? orig : j->addrs[j->cur], j->addrs[j->cur]);
    kt_delivery_append(j->dl, hdr, strlen(hdr));
    kt_free(hdr);
    j->pos = j->m->q->body_off;
    kt_delivery_set_drain_cb(j->dl, local_feed, j);
    local_feed(j, 0);
}

/* The message's header section already has "Delivered-To: addr" (local(8)'s loop check). */
static int delivered_to_loop(const struct job *j, const char *addr)
{
    struct kt_header_scan hs;
    char buf[8192];
    off_t pos = j->m->q->body_off, end = j->m->q->body_off + j->m->q->body_len;
    kt_header_scan_reset(&hs);
    hs.loop_rcpt = addr;
    while (!hs.done && !hs.loop && pos < end) {
        size_t want = (size_t)(end - pos) < sizeof(buf) ? (size_t)(end - pos) : sizeof(buf);
        ssize_t n = pread(j->fd, buf, want, pos);
        if (n <= 0)
            break;
        kt_header_scan_feed(&hs, buf, (size_t)n);
        pos += n;
    }
    return hs.loop;
}


/* Why a resolved recipient cannot be delivered here, for its bounce or deferral: a local alias with remote
 * targets, which local(8) would forward and ktrelay does not (delivering only its local part would drop
 * the rest unseen); else the resolver's reply, with an unknown user's code made 550 5.1.1
 * (unknown_local_recipient_reject_code = 450 is for clients at RCPT; accepted mail bounces, as local(8)),
 * so that a reply of class 4 means "try again later". Points into res or at a static text. */
static const char *local_refusal(struct kt_resolve_result *res)
{
    if (!res->reply)
        return "alias forwards to remote addresses, which this server does not relay";
    if (res->unknown_user && res->reply[0] == '4') {
        const char *rest = strchr(res->reply, '<');
        char text[sizeof(res->reply_buf)];
        snprintf(text, sizeof(text), "550 5.1.1 %s", rest ? rest : res->reply);
        snprintf(res->reply_buf, sizeof(res->reply_buf), "%s", text);
        res->reply = res->reply_buf;
    }
    return res->reply;
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
        if (delivered_to_loop(j, j->addrs[j->cur])) {
            char *why = kt_asprintf("mail forwarding loop for %s", j->addrs[j->cur]);
            rcpt_failed(q, j->m, i, local_relay(q, j->addrs[j->cur]), 550, "5.4.6", why);
            kt_free(why);
            j->cur++;
            kt_free(res);
            continue;
        }
        kt_resolve_recipient(q->set->resolver, j->addrs[j->cur], res);
        if (res->reply || res->n_mailboxes == 0 || res->n_forward > 0) {   /* remote targets: see local_refusal */
            const char *why = local_refusal(res);
            char dsn[16];
            if (why[0] == '4')
                rcpt_deferred(j->m, i, local_relay(q, j->addrs[j->cur]), 450, NULL, why);
            else
                rcpt_failed(q, j->m, i, local_relay(q, j->addrs[j->cur]), 550,
                            reply_dsn(why, dsn, sizeof(dsn)) ? dsn : NULL, why);
            j->cur++;
            kt_free(res);
            continue;
        }
        kt_resolve_warn_skipped(res, j->m->q->id, j->addrs[j->cur]);
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

/* ---- messages: index by id, deferred heap ---- */

static size_t id_hash(const char *id)
{
    size_t h = 1469598103934665603ULL;     /* FNV-1a */
    for (; *id; id++)
        h = (h ^ (unsigned char)*id) * 1099511628211ULL;
    return h;
}

static struct msg *msg_find(struct kt_qmgr *q, const char *id)
{
    if (!q->hcap)
        return NULL;
    for (struct msg *m = q->htab[id_hash(id) & (q->hcap - 1)]; m; m = m->hnext)
        if (!strcmp(m->q->id, id))
            return m;
    return NULL;
}

static void htab_insert(struct kt_qmgr *q, struct msg *m)
{
    if (q->n_msgs + 1 > q->hcap / 2) {
        size_t cap = q->hcap ? q->hcap * 2 : 1024;
        struct msg **t = kt_calloc(cap, sizeof(*t));
        for (size_t b = 0; b < q->hcap; b++) {
            struct msg *e, *next;
            for (e = q->htab[b]; e; e = next) {
                next = e->hnext;
                size_t k = id_hash(e->q->id) & (cap - 1);
                e->hnext = t[k];
                t[k] = e;
            }
        }
        kt_free(q->htab);
        q->htab = t;
        q->hcap = cap;
    }
    size_t k = id_hash(m->q->id) & (q->hcap - 1);
    m->hnext = q->htab[k];
    q->htab[k] = m;
}

static void htab_remove(struct kt_qmgr *q, struct msg *m)
{
    for (struct msg **pp = &q->htab[id_hash(m->q->id) & (q->hcap - 1)]; *pp; pp = &(*pp)->hnext)
        if (*pp == m) {
            *pp = m->hnext;
            return;
        }
}

static void heap_set(struct kt_qmgr *q, size_t i, struct msg *m)
{
    q->heap[i] = m;
    m->heap_idx = i;
}

static void heap_up(struct kt_qmgr *q, size_t i)
{
    struct msg *m = q->heap[i];
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (q->heap[p]->next_try <= m->next_try)
            break;
        heap_set(q, i, q->heap[p]);
        i = p;
    }
    heap_set(q, i, m);
}

static void heap_down(struct kt_qmgr *q, size_t i)
{
    struct msg *m = q->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= q->heap_n)
            break;
        if (c + 1 < q->heap_n && q->heap[c + 1]->next_try < q->heap[c]->next_try)
            c++;
        if (m->next_try <= q->heap[c]->next_try)
            break;
        heap_set(q, i, q->heap[c]);
        i = c;
    }
    heap_set(q, i, m);
}

static void heap_push(struct kt_qmgr *q, struct msg *m)
{
    if (q->heap_n == q->heap_cap) {
        q->heap_cap = q->heap_cap ? q->heap_cap * 2 : 256;
        q->heap = kt_realloc(q->heap, q->heap_cap * sizeof(*q->heap));
    }
    q->heap[q->heap_n] = m;
    m->heap_idx = q->heap_n++;
    heap_up(q, m->heap_idx);
}

static void heap_remove(struct kt_qmgr *q, struct msg *m)
{
    size_t i = m->heap_idx;
    if (i == NOT_IN_HEAP)
        return;
    m->heap_idx = NOT_IN_HEAP;
    struct msg *last = q->heap[--q->heap_n];
    if (i == q->heap_n)
        return;
    heap_set(q, i, last);
    heap_down(q, i);
    heap_up(q, last->heap_idx);
}

static struct msg *msg_add(struct kt_qmgr *q, struct kt_qmsg *qm)
{
    struct msg *m = kt_calloc(1, sizeof(*m));
    m->q = qm;
    m->heap_idx = NOT_IN_HEAP;
    m->next = q->msgs;
    if (q->msgs)
        q->msgs->prev = m;
    q->msgs = m;
    htab_insert(q, m);
    q->n_msgs++;
    return m;
}

static void msg_free(struct kt_qmgr *q, struct msg *m)
{
    if (m->prev)
        m->prev->next = m->next;
    else
        q->msgs = m->next;
    if (m->next)
        m->next->prev = m->prev;
    htab_remove(q, m);
    heap_remove(q, m);
    q->n_msgs--;
    kt_qmsg_free(m->q);
    kt_free(m->defer_reason);
    kt_free(m);
}

/* A notification is a message of its own: its cleanup and qmgr lines, as
 * Postfix logs them, so that its id ties its lines together too. */
static void log_notification(struct kt_qmgr *q, const char *id)
{
    struct msg *nm = msg_find(q, id);
    if (!nm)
        return;
    struct kt_header_scan hs;
    kt_header_scan_reset(&hs);
    int fd = kt_queue_open_body_at(q->new_fd, id);
    if (fd >= 0) {
        char head[8192];
        ssize_t got = pread(fd, head, sizeof(head), nm->q->body_off);
        if (got > 0)
            kt_header_scan_feed(&hs, head, (size_t)got);
        close(fd);
    }
    kt_info_as("cleanup", "%s: message-id=%s", id, hs.message_id[0] ? hs.message_id : "<>");
    kt_info_as("qmgr", "%s: from=<>, size=%lld, nrcpt=%zu (queue active)", id, (long long)nm->q->body_len,
               nm->q->n_rcpts);
}

/* Queue one notification about m to its sender. fd: m's open queue file, or -1 to open it here. */
static void notify_sender(struct kt_qmgr *q, struct msg *m, enum kt_dsn_kind kind, int fd,
                          const struct kt_dsn_rcpt *r, size_t n, time_t until)
{
    char id[KT_QUEUE_ID_MAX];
    int own = fd < 0;
    if (own)
        fd = kt_queue_open_body_at(q->new_fd, m->q->id);
    int rc = kt_dsn_send(q->qdir, q->set->myhostname, kind, m->q, fd, r, n, until, q->set->bounce_size_limit, id,
                         sizeof(id));
    if (own && fd >= 0)
        close(fd);
    if (rc == 0) {
        msg_load(q, id, 1);
        log_notification(q, id);
        kt_info_as("bounce", "%s: sender %s notification: %s", m->q->id,
                   kind == KT_DSN_FAILED ? "non-delivery" : kind == KT_DSN_DELAYED ? "delay" : "delivery status",
                   id);
    } else if (rc < 0) {
        kt_err("%s: cannot queue a notification: %s", m->q->id, strerror(-rc));
    }
}

/* Failures and delays are reported for the recipients whose NOTIFY asks for them (no NOTIFY: both, as
 * Postfix; NOTIFY=NEVER: nothing). */
static void send_dsn(struct kt_qmgr *q, struct msg *m, enum kt_dsn_kind kind, time_t until)
{
    struct kt_dsn_rcpt *r = kt_calloc(m->q->n_rcpts ? m->q->n_rcpts : 1, sizeof(*r));
    size_t n = 0;
    unsigned want = kind == KT_DSN_FAILED ? KT_QNOTIFY_FAILURE : KT_QNOTIFY_DELAY;
    for (size_t i = 0; i < m->q->n_rcpts; i++) {
        const struct kt_qrcpt *qr = &m->q->rcpts[i];
        if (qr->notify && !(qr->notify & want))
            continue;
        if (kind == KT_DSN_FAILED && qr->state == KT_QR_FAILED)
            r[n++] = (struct kt_dsn_rcpt){ qr->addr, qr->reason, qr->orcpt, NULL };
        else if (kind == KT_DSN_DELAYED && qr->state == KT_QR_PENDING)
            r[n++] = (struct kt_dsn_rcpt){ qr->addr, m->defer_reason, qr->orcpt, NULL };
    }
    if (n > 0)
        notify_sender(q, m, kind, -1, r, n, until);
    kt_free(r);
}

/* Removals become durable together: one fsync of new/ covers every unlink before it started. */
static void rm_synced(struct kt_dirsync_waiter *w, int res);

static void rm_sync(struct kt_qmgr *q)
{
    q->rm_dirty = 1;
    if (q->rm_in_flight)
        return;
    q->rm_dirty = 0;
    q->rm_in_flight = 1;
    q->rm_wait.done = rm_synced;
    kt_dirsync_request(&q->loop, q->new_dir, &q->rm_wait);
}

static void rm_synced(struct kt_dirsync_waiter *w, int res)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)w - offsetof(struct kt_qmgr, rm_wait));
    q->rm_in_flight = 0;
    if (res < 0)
        kt_err("queue manager: fsync of %s: %s", q->new_dir, strerror(-res));
    if (q->rm_dirty)
        rm_sync(q);
}

static void msg_complete(struct kt_qmgr *q, struct msg *m)
{
    send_dsn(q, m, KT_DSN_FAILED, 0);
    int rc = kt_queue_retire_at(q->qdir, q->new_fd, q->tmp_fd, q->status_fd, m->q->id, m->q->has_status);
    if (rc < 0 && rc != -ENOENT) {
        kt_err("%s: cannot remove the queue file: %s", m->q->id, strerror(-rc));
    } else {
        kt_info("%s: removed", m->q->id);
        rm_sync(q);
    }
    msg_free(q, m);
}

/* Seconds to wait before the next attempt after the attempts-th failed one
 * (attempts >= 1): minimal_backoff_time, doubled per further failure, at most
 * maximal_backoff_time, as Postfix's qmgr. */
static long long retry_backoff(const struct kt_qmgr_settings *set, unsigned attempts)
{
    long long backoff = set->minimal_backoff_time;
    for (unsigned k = 1; k < attempts && backoff < set->maximal_backoff_time; k++)
        backoff *= 2;
    if (backoff > set->maximal_backoff_time)
        backoff = set->maximal_backoff_time;
    return backoff;
}

/* maximal_queue_lifetime, or bounce_queue_lifetime for the null sender, in seconds. */
static long long queue_lifetime(const struct kt_qmgr_settings *set, const struct kt_qmsg *qm)
{
    return qm->sender[0] ? set->maximal_queue_lifetime : set->bounce_queue_lifetime;
}

/* 1 when the message has been queued for its lifetime at `now`: its pending recipients fail. */
static int msg_expired(const struct kt_qmgr_settings *set, const struct kt_qmsg *qm, time_t now)
{
    return difftime(now, qm->arrival) >= (double)queue_lifetime(set, qm);
}

/* 1 when a delay warning is due at `now` (delay_warning_time, not yet sent, not for the null sender). */
static int delay_warning_due(const struct kt_qmgr_settings *set, const struct kt_qmsg *qm, time_t now)
{
    return set->delay_warning_time > 0 && !qm->warned && qm->sender[0] &&
           difftime(now, qm->arrival) >= (double)set->delay_warning_time;
}

static void msg_round_done(struct kt_qmgr *q, struct msg *m)
{
    time_t now = qmgr_now();
    if (m->gone) {
        kt_info("%s: removed from the queue by the administrator", m->q->id);
        msg_free(q, m);
        return;
    }
    if (kt_qmsg_finished(m->q)) {
        msg_complete(q, m);
        return;
    }
    kt_queue_note_deferrals(q->qdir, m->q);
    long long life = queue_lifetime(q->set, m->q);
    if (msg_expired(q->set, m->q, now)) {
        for (size_t i = 0; i < m->q->n_rcpts; i++) {
            if (m->q->rcpts[i].state != KT_QR_PENDING)
                continue;
            const char *last = m->defer_reason ? m->defer_reason : "4.4.7 - delivery temporarily suspended";
            const char *diag = strchr(last, ' ') ? strchr(strchr(last, ' ') + 1, ' ') : NULL;
            char *text = kt_asprintf("message expired: %s", diag ? diag + 1 : last);
            char *reason = kt_asprintf("5%.*s%s", (int)strcspn(last + 1, " "), last + 1,
                                       strchr(last, ' ') ? strchr(last, ' ') : " - ");
            /* keep the last temporary status' detail, as a permanent one */
            struct kt_qmark mk = { i, KT_QR_FAILED, reason };
            if (record(q, m, &mk, 1) == 0) {
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
    m->next_try = now + (time_t)retry_backoff(q->set, m->attempts);
    heap_push(q, m);
    if (delay_warning_due(q->set, m->q, now)) {
        send_dsn(q, m, KT_DSN_DELAYED, m->q->arrival + (time_t)life);
        struct kt_qmark mk = { (size_t)-1, KT_QR_PENDING, NULL };
        record(q, m, &mk, 1);
    }
}

/* local(8) with a mailbox_transport (Postfix: local expands aliases, then hands each local user's mailbox
 * delivery to the transport): for recipient i of the local class, *key becomes the lmtp: destination and
 * *as the address to send when an alias was expanded ("user@$myorigin", as local(8) resolves an alias
 * target). Returns 0 when the recipient's outcome was decided here (unknown, or an expansion this does not
 * hand over: several mailboxes), 1 to go on with *key. Virtual recipients and expansions into virtual
 * mailboxes only keep the Maildir delivery. */
static int mailbox_route(struct kt_qmgr *q, struct msg *m, size_t i, char **key, char **as)
{
    struct kt_route mr;
    const char *addr = m->q->rcpts[i].addr;
    const char *at = strrchr(addr, '@');
    if (!q->set->resolver || !kt_transport_mailbox(q->set->transport, &mr) || !at
        || kt_resolve_class(q->set->resolver, at + 1) != KT_CLASS_LOCAL)
        return 1;
    struct kt_resolve_result *res = kt_malloc(sizeof(*res));
    int go_on = 0;
    kt_resolve_recipient(q->set->resolver, addr, res);
    size_t users = 0;
    for (size_t k = 0; k < res->n_mailboxes; k++)
        users += res->mailboxes[k].user != NULL;
    if (res->reply || res->n_mailboxes == 0 || res->n_forward > 0) {   /* remote targets: see local_refusal */
        const char *why = local_refusal(res);
        char dsn[16];
        if (why[0] == '4')
            rcpt_deferred(m, i, "local", 450, NULL, why);
        else
            rcpt_failed(q, m, i, "local", 550, reply_dsn(why, dsn, sizeof(dsn)) ? dsn : NULL, why);
    } else if (users == 0) {
        go_on = 1;                 /* virtual mailboxes: still local(8)'s own Maildir delivery */
    } else if (res->n_mailboxes > 1) {
        rcpt_deferred(m, i, "local", 450, "4.3.0",
                      "mailbox_transport: an alias that expands to several mailboxes is not handed over");
    } else {
        const char *user = res->mailboxes[0].user;
        size_t llen = (size_t)(at - addr);
        kt_resolve_warn_skipped(res, m->q->id, addr);
        kt_free(*key);
        *key = kt_asprintf("lmtp:%s", mr.nexthop);
        if (strlen(user) != llen || strncasecmp(user, addr, llen)) {
            char full[512];
            if (kt_resolve_complete(q->set->resolver, user, full, sizeof(full)) == 0)
                *as = kt_strdup(full);
        }
        go_on = 1;
    }
    kt_free(res);
    if (!go_on) {
        kt_free(*key);
        *key = NULL;
    }
    return go_on;
}

static void msg_start(struct kt_qmgr *q, struct msg *m)
{
    struct job **jobs = NULL;
    size_t n_jobs = 0;
    heap_remove(q, m);
    m->jobs++;     /* hold: jobs that end at once must not finish the round early */
    for (size_t i = 0; i < m->q->n_rcpts; i++) {
        if (m->q->rcpts[i].state != KT_QR_PENDING)
            continue;
        const char *err = NULL;
        char *key = route(q, m->q->rcpts[i].addr, m->q->filter, &err);
        if (!key) {
            rcpt_failed(q, m, i, "none", 550, NULL, err);
            continue;
        }
        if (!key[0]) {
            rcpt_deferred(m, i, "none", 451, NULL, "mail transport unavailable");
            kt_free(key);
            continue;
        }
        char *as = NULL;
        if (!strcmp(key, "local") && !mailbox_route(q, m, i, &key, &as))
            continue;      /* local(8) decided this recipient's outcome already */
        struct dest *d = dest_get(q, key);
        kt_free(key);
        struct job *j = NULL;
        /* smtp_ and lmtp_destination_recipient_limit: at most that many recipients per transaction */
        unsigned limit = d->local ? 0 : d->lmtp ? q->set->lmtp_recipient_limit : q->set->smtp.recipient_limit;
        for (size_t k = 0; k < n_jobs; k++)
            if (jobs[k]->d == d && (!limit || jobs[k]->n < limit))
                j = jobs[k];
        if (!j) {
            j = job_new(m, d);
            jobs = kt_realloc(jobs, (n_jobs + 1) * sizeof(*jobs));
            jobs[n_jobs++] = j;
        }
        job_add_rcpt_as(j, i, as);
    }
    for (size_t k = 0; k < n_jobs; k++)
        dest_push(jobs[k]->d, jobs[k]);
    for (size_t k = 0; k < n_jobs; k++)
        dest_kick(jobs[k]->d);
    kt_free(jobs);
    if (--m->jobs == 0)
        msg_round_done(q, m);
}

/* A message the manager does not know yet: into the index, and (start) into delivery at once. */
static void msg_adopt(struct kt_qmgr *q, struct kt_qmsg *qm, int start)
{
    if (msg_find(q, qm->id)) {
        kt_qmsg_free(qm);
        return;
    }
    struct msg *m = msg_add(q, qm);
    if (start && !q->stopping)
        msg_start(q, m);
}

/* Load new/ID from disk (queued by another process, a bounce made here, or at start). */
static void msg_load(struct kt_qmgr *q, const char *id, int start)
{
    struct kt_qmsg *qm;
    if (msg_find(q, id))
        return;
    int rc = kt_queue_load(q->qdir, id, &qm);
    if (rc < 0) {
        if (rc != -ENOENT)
            kt_warn("%s: unreadable queue file: %s", id, strerror(-rc));
        return;
    }
    msg_adopt(q, qm, start);
}

/* Start-up only: every file in new/, once. */
static void load_all(struct kt_qmgr *q)
{
    char **ids;
    size_t n;
    if (kt_queue_list_ids(q->qdir, &ids, &n) < 0)
        return;
    for (size_t i = 0; i < n; i++)
        msg_load(q, ids[i], 0);
    kt_queue_free_ids(ids, n);
}

/* The deferred message to start next at `now` (any for a flush), or NULL. */
static struct msg *deferred_due(const struct kt_qmgr *q, time_t now, int all)
{
    if (q->heap_n == 0 || q->stopping || !(all || q->heap[0]->next_try <= now))
        return NULL;
    return q->heap[0];
}

/* Deferred messages whose retry time has come (all of them for a flush). */
static void run_deferred(struct kt_qmgr *q, time_t now, int all)
{
    struct msg *m;
    while ((m = deferred_due(q, now, all)))
        msg_start(q, m);
}

/* ---- loop ---- */

static void efd_arm(struct kt_qmgr *q)
{
    struct io_uring_sqe *sqe = kt_loop_sqe(&q->loop, &q->efd_op);
    io_uring_prep_read(sqe, q->efd, &q->efd_val, sizeof(q->efd_val), 0);
}

static void fifo_arm(struct kt_qmgr *q)
{
    struct io_uring_sqe *sqe = kt_loop_sqe(&q->loop, &q->fifo_op);
    io_uring_prep_read(sqe, q->fifo_fd, q->fifo_buf + q->fifo_len, (unsigned)(sizeof(q->fifo_buf) - q->fifo_len),
                       0);
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
    q->stop_deadline = qmgr_now() + STOP_GRACE_S;
    kt_pickup_stop(q->pickup);
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
    if (q->rm_in_flight || kt_pickup_busy(q->pickup))
        return 1;
    for (struct dest *d = q->dests; d; d = d->next)
        if (d->n_conns || d->local_job)
            return 1;
    return 0;
}

static void force_stop(struct kt_qmgr *q)
{
    kt_pickup_free(q->pickup);   /* the drop file of a message still with the milters stays */
    q->pickup = NULL;
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

static void sts_wake(void *arg)
{
    struct kt_qmgr *q = arg;
    uint64_t one = 1;
    if (write(q->efd, &one, sizeof(one)) < 0) {
        /* the counter is full: a wakeup is pending anyway, and the tick polls too */
    }
}

static void report_queued(void *arg, const char *id)
{
    struct kt_qmgr *q = arg;
    msg_load(q, id, 1);
    log_notification(q, id);
}

/* MTA-STS and TLS reporting as the current generation asks: started when first enabled, given each
 * generation's settings (a generation that disables them keeps their state and stops using it). */
static void reporting_start(struct kt_qmgr *q)
{
    const struct kt_qmgr_settings *set = q->set;
    struct kt_sts_settings ss = {
        .cache_dir = set->mta_sts_cache_directory, .CAfile = set->mta_sts_CAfile,
        .fetch_timeout_s = set->mta_sts_fetch_timeout,
    };
    struct kt_tlsrpt_settings ts = {
        .report_dir = set->tlsrpt_directory, .organization_name = set->tlsrpt_organization_name,
        .contact_info = set->tlsrpt_contact_info, .submitter = set->myhostname, .queue_directory = q->qdir,
    };
    if (q->sts)
        kt_sts_update(q->sts, &ss);
    else if (set->mta_sts_enable && q->dns)
        kt_sts_new(q->dns, &ss, sts_wake, q, &q->sts);
    if (q->tlsrpt)
        kt_tlsrpt_update(q->tlsrpt, &ts);
    else if (set->tlsrpt_enable && q->dns)
        kt_tlsrpt_new(q->dns, &ts, qmgr_now(), report_queued, q, &q->tlsrpt);
}

static void check_tlsrpt(struct kt_qmgr *q)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/tlsrpt-flush", q->qdir);
    if (unlink(path) == 0) {
        if (q->tlsrpt && q->set->tlsrpt_enable) {
            kt_info("TLS report flush requested");
            kt_tlsrpt_flush(q->tlsrpt, qmgr_now());
        } else {
            kt_warn("TLS report flush requested, but ktrelay_tlsrpt_enable = no");
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
    reporting_start(q);
    kt_info("queue manager: configuration reloaded");
}

/* Messages handed over by SMTP sessions since the last wakeup. */
static void take_handoffs(struct kt_qmgr *q)
{
    pthread_mutex_lock(&q->in_mu);
    struct handoff *h = q->in_head;
    q->in_head = q->in_tail = NULL;
    q->in_signalled = 0;
    pthread_mutex_unlock(&q->in_mu);
    while (h) {
        struct handoff *next = h->next;
        msg_adopt(q, h->m, 1);
        kt_free(h);
        h = next;
    }
}

static void efd_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)op - offsetof(struct kt_qmgr, efd_op));
    if (atomic_load(&q->stop)) {
        begin_stop(q);
        return;
    }
    adopt_runtime(q);
    take_handoffs(q);
    kt_sts_poll(q->sts, qmgr_now());
    efd_arm(q);
}

static void flush_now(struct kt_qmgr *q)
{
    kt_info("flush requested: retrying every deferred message");
    run_deferred(q, qmgr_now(), 1);
    q->last_run = qmgr_now();
}

static void check_flush(struct kt_qmgr *q)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/flush", q->qdir);
    if (unlink(path) == 0)
        flush_now(q);
}

/* Lines from public/qmgr: "N<id>" a message in new/, "F" a flush request. */
/* "D<id>", "H<id>", "Q<id>": the message left new/ (queue delete, hold,
 * requeue): forget it now, or, when an attempt is under way (its file is
 * open), once that attempt ends. */
static void msg_forget(struct kt_qmgr *q, char why, const char *id)
{
    struct msg *m = msg_find(q, id);
    if (!m)
        return;
    if (m->jobs) {
        m->gone = 1;
        return;
    }
    if (why == 'H')
        kt_info("%s: placed on hold", id);
    else if (why == 'Q')
        kt_info("%s: requeued", id);
    else
        kt_info("%s: removed from the queue by the administrator", id);
    msg_free(q, m);
}

static void fifo_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)op - offsetof(struct kt_qmgr, fifo_op));
    if (res <= 0) {
        if (res != -ECANCELED && !q->stopping)
            fifo_arm(q);
        return;
    }
    q->fifo_len += (size_t)res;
    char *p = q->fifo_buf, *end = q->fifo_buf + q->fifo_len, *nl;
    while ((nl = memchr(p, '\n', (size_t)(end - p)))) {
        *nl = '\0';
        if (!q->stopping) {
            if (p[0] == 'N' && p[1] && p[1] != '.' && !strchr(p + 1, '/'))
                msg_load(q, p + 1, 1);
            else if (p[0] == 'F')
                check_flush(q);
            else if (p[0] == 'R')
                check_tlsrpt(q);
            else if ((p[0] == 'D' || p[0] == 'H' || p[0] == 'Q') && p[1])
                msg_forget(q, p[0], p + 1);
        }
        p = nl + 1;
    }
    q->fifo_len = (size_t)(end - p);
    if (q->fifo_len == sizeof(q->fifo_buf))
        q->fifo_len = 0;           /* no line is this long: drop it */
    memmove(q->fifo_buf, p, q->fifo_len);
    if (!q->stopping)
        fifo_arm(q);
}

/* ktrelay_queue_messages: deferred = waiting for a retry after a failed
 * attempt (the retry heap), active = the rest (new or being delivered). Once
 * a second, on this thread, which alone owns the counts; no walk over the
 * messages. */
static void publish_queue_gauges(struct kt_qmgr *q, time_t now)
{
    (void)now;
    kt_metric_set(KT_M_QUEUE_ACTIVE, (long long)(q->n_msgs - q->heap_n));
    kt_metric_set(KT_M_QUEUE_DEFERRED, (long long)q->heap_n);
    char **held;
    size_t n_held = 0;
    if (kt_queue_list_held(q->qdir, &held, &n_held) == 0)
        kt_queue_free_ids(held, n_held);
    kt_metric_set(KT_M_QUEUE_HOLD, (long long)n_held);
}

static void tick_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_qmgr *q = (struct kt_qmgr *)((char *)op - offsetof(struct kt_qmgr, tick_op));
    time_t now = qmgr_now();
    publish_queue_gauges(q, now);
    /* maildrop/: what local users submitted reaches the queue, and this queue
     * manager through public/qmgr, like any other process's mail */
    if (!q->stopping && q->set->non_smtpd_milters)
        kt_pickup_milter_run(q->pickup, q->rt);   /* through the milters first, asynchronously */
    else if (!q->stopping && !kt_pickup_busy(q->pickup))
        kt_pickup_run(q->pickup, q->set->message_size_limit, q->set->myhostname, q->set->rewrite,
                      q->set->content_filter);
    kt_dns_tick(q->dns);
    for (struct dest *d = q->dests; d; d = d->next) {
        struct conn *cn, *next;
        for (cn = d->conns; cn; cn = next) {
            next = cn->next;
            if (cn->ready && !cn->job && now - cn->idle_since >= dest_client(d)->conn_cache_time_s)
                conn_remove(cn);   /* QUIT */
            else
                kt_smtp_check_timeout(cn->c, now);
        }
        if (!q->stopping && d->queued && !d->local && dest_client(d)->rate_delay_s > 0 && mono_ms() >= d->resume_ms)
            dest_kick(d);
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
    check_tlsrpt(q);
    kt_sts_poll(q->sts, now);
    if (q->tlsrpt && q->set->tlsrpt_enable)
        kt_tlsrpt_tick(q->tlsrpt, now);
    if (difftime(now, q->last_run) >= (double)q->set->queue_run_delay) {
        q->last_run = now;
        run_deferred(q, now, 0);
    }
    tick_arm(q);
}

static void *qmgr_main(void *arg)
{
    struct kt_qmgr *q = arg;
    pthread_setname_np(pthread_self(), "ktrelay-qmgr");
    kt_log_set_service("qmgr");
    q->efd_op.cb = efd_done;
    q->tick_op.cb = tick_done;
    q->fifo_op.cb = fifo_done;
    efd_arm(q);
    tick_arm(q);
    if (q->fifo_fd >= 0)
        fifo_arm(q);
    kt_info("queue manager started: %zu message%s in %s", q->n_msgs, q->n_msgs == 1 ? "" : "s", q->qdir);
    q->last_run = qmgr_now();
    /* everything loaded at start is due now */
    for (struct msg *m = q->msgs; m; m = m->next)
        heap_push(q, m);
    check_flush(q);
    run_deferred(q, q->last_run, 1);
    take_handoffs(q);
    while (!q->loop.stop) {
        int rc = kt_loop_run_once(&q->loop, 1000);
        if (rc < 0) {
            kt_err("queue manager: io_uring: %s", strerror(-rc));
            break;
        }
    }
    /* a message still with the milters stays in maildrop/ for the next start */
    kt_pickup_free(q->pickup);
    q->pickup = NULL;
    /* both use the resolver: they go first (the counts not yet reported are saved) */
    kt_sts_free(q->sts);
    q->sts = NULL;
    kt_tlsrpt_free(q->tlsrpt);
    q->tlsrpt = NULL;
    /* lookups in flight call back with -ECANCELED; nothing waits for them now */
    kt_dns_free(q->dns);
    q->dns = NULL;
    /* let cancellations complete so no operation points at freed memory */
    for (int i = 0; i < 20 && kt_smtp_live() > 0; i++)
        kt_loop_run_once(&q->loop, 50);
    kt_loop_run_once(&q->loop, 0);   /* and the pickup's milter sockets, shut down above */
    kt_dirsync_thread_cleanup();
    return NULL;
}

void kt_qmgr_submit(struct kt_delivery *d)
{
    struct kt_qmsg *m = kt_queue_delivery_take(d);
    if (!m)
        return;
    struct kt_qmgr *q = atomic_load(&global_q);
    if (!q) {
        /* No manager in this process: a generation retiring after a reload
         * (its manager stopped; the serving generation's reads public/qmgr),
         * or one whose manager has not started (it loads new/ when it does). */
        const char *qdir = atomic_load(&submit_qdir);
        if (qdir)
            kt_queue_notify(qdir, m->id);
        kt_qmsg_free(m);
        return;
    }
    struct handoff *h = kt_malloc(sizeof(*h));
    h->next = NULL;
    h->m = m;
    pthread_mutex_lock(&q->in_mu);
    if (q->in_tail)
        q->in_tail->next = h;
    else
        q->in_head = h;
    q->in_tail = h;
    int wake = !q->in_signalled;
    q->in_signalled = 1;
    pthread_mutex_unlock(&q->in_mu);
    uint64_t one = 1;
    if (wake && write(q->efd, &one, sizeof(one)) < 0) {
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
        kt_free(d->unix_path);
        kt_free(d->addrs);
        kt_sts_policy_clear(&d->sts);
        kt_dane_set_free(d->dane);
        kt_free(d);
    }
    kt_free(q->htab);
    kt_free(q->heap);
    kt_pickup_free(q->pickup);
    kt_sts_free(q->sts);
    kt_tlsrpt_free(q->tlsrpt);
    kt_dns_free(q->dns);
    kt_free(q->qdir);
    kt_free(q->new_dir);
    if (q->efd >= 0)
        close(q->efd);
    if (q->new_fd >= 0)
        close(q->new_fd);
    if (q->status_fd >= 0)
        close(q->status_fd);
    if (q->tmp_fd >= 0)
        close(q->tmp_fd);
    if (q->fifo_fd >= 0)
        close(q->fifo_fd);
    pthread_mutex_destroy(&q->in_mu);
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
    q->efd = q->new_fd = q->status_fd = q->tmp_fd = q->fifo_fd = -1;
    pthread_mutex_init(&q->in_mu, NULL);
    q->set = &rt->qmgr;
    q->qdir = kt_strdup(q->set->queue_directory);
    if ((rc = kt_queue_init_dirs(q->qdir)) < 0) {
        /* local delivery needs no queue: run without the relay rather than not at all */
        kt_warn("queue_directory %s: %s; outbound delivery is disabled", q->qdir, strerror(-rc));
        qmgr_free(q);
        return 0;
    }
    kt_queue_cleanup(q->qdir);
    q->new_dir = kt_asprintf("%s/new", q->qdir);
    char *status_dir = kt_asprintf("%s/status", q->qdir);
    q->new_fd = open(q->new_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    q->status_fd = open(status_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    kt_free(status_dir);
    char *tmp_dir = kt_asprintf("%s/tmp", q->qdir);
    q->tmp_fd = open(tmp_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    kt_free(tmp_dir);
    if (q->new_fd < 0 || q->status_fd < 0 || q->tmp_fd < 0) {
        rc = -errno;
        kt_err("queue manager: %s: %s", q->qdir, strerror(-rc));
        qmgr_free(q);
        return rc;
    }
    /* public/qmgr: opened for reading and writing, so it never reports end of file */
    char *fifo = kt_asprintf("%s/public/qmgr", q->qdir);
    struct stat st;
    if (lstat(fifo, &st) == 0 && !S_ISFIFO(st.st_mode))
        unlink(fifo);
    if (mkfifo(fifo, 0600) < 0 && errno != EEXIST)
        kt_warn("queue manager: %s: %s; other processes' mail waits for the next start", fifo, strerror(errno));
    else if ((q->fifo_fd = open(fifo, O_RDWR | O_CLOEXEC)) < 0)
        kt_warn("queue manager: %s: %s; other processes' mail waits for the next start", fifo, strerror(errno));
    kt_free(fifo);
    /* the queue on disk, read once, before any SMTP session can hand over a message */
    load_all(q);
    if ((rc = kt_queue_init_maildrop(q->qdir)) < 0)
        kt_warn("queue_directory %s/maildrop: %s; local users other than the queue's owner cannot submit "
                "with sendmail%s", q->qdir, strerror(-rc),
                rc == -EACCES ? " (queue_directory must be searchable by all: chmod o+x on it, as Postfix's "
                                "0755 /var/spool/postfix)" : "");
    if ((rc = kt_loop_init(&q->loop, 256)) < 0) {
        kt_err("queue manager: io_uring: %s", strerror(-rc));
        qmgr_free(q);
        return rc;
    }
    q->pickup = kt_pickup_new(&q->loop, q->qdir);
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
    reporting_start(q);
    if (!atomic_load(&submit_qdir))
        atomic_store(&submit_qdir, (const char *)kt_strdup(q->qdir));
    atomic_store(&global_q, q);
    if ((rc = pthread_create(&q->thread, NULL, qmgr_main, q)) != 0) {
        atomic_store(&global_q, NULL);
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
    atomic_store(&global_q, NULL);
    kt_queue_spares_clear();
    /* handed over too late for this run: they are on disk for the next one */
    for (struct handoff *h = q->in_head, *next; h; h = next) {
        next = h->next;
        kt_qmsg_free(h->m);
        kt_free(h);
    }
    kt_info("queue manager stopped: %lu message bodies sent with sendfile", kt_smtp_sendfile_count());
    qmgr_free(q);
}
