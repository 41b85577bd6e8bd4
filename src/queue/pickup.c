/* maildrop/ pickup (see pickup.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/log.h"
#include "core/loop.h"
#include "conf/settings.h"
#include "milter/milter.h"
#include "queue/bounce.h"
#include "delivery/header_scan.h"
#include "metrics/metrics.h"
#include "delivery/rewrite.h"
#include "queue/pickup.h"
#include "smtpd/smtp_parse.h"
#include "queue/queue.h"

#define ADDR_MAX 512
/* Room for a drop file's envelope beyond message_size_limit: its most recipients of the longest addresses,
 * each on a line with its DSN requests (the message itself is checked against the limit once parsed). */
#define ENVELOPE_SLACK ((KT_PICKUP_MAX_RCPTS + 1) * (ADDR_MAX + 128) + 64 * 1024)

/* The cleanup and qmgr lines of a message just queued (the pickup line comes first, once). */
static void log_queued(const char *id, const char *sender, const char *msg, size_t len, size_t nrcpt)
{
    struct kt_header_scan hs;
    kt_header_scan_reset(&hs);
    kt_header_scan_feed(&hs, msg, len);
    kt_info_as("cleanup", "%s: message-id=%s", id, hs.message_id[0] ? hs.message_id : "<>");
    kt_info_as("qmgr", "%s: from=<%s>, size=%zu, nrcpt=%zu (queue active)", id, sender, len, nrcpt);
    kt_metric_inc(KT_M_MESSAGES_RECEIVED);
}

void kt_pickup_log(const char *id, uid_t uid, const char *sender, const char *msg, size_t len, size_t nrcpt)
{
    kt_info_as("pickup", "%s: uid=%u from=<%s>", id, (unsigned)uid, sender);
    log_queued(id, sender, msg, len, nrcpt);
}

int kt_pickup_addr_ok(const char *s, size_t n)
{
    if (n > ADDR_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || s[i] == '<' || s[i] == '>' || s[i] == 0x7f)
            return 0;
    return 1;
}

/* The DSN requests sendmail -N, -R and -V wrote (a local user's file: checked like an SMTP client's). */
struct drop_props {
    struct kt_qprops props;
    unsigned *notify;             /* per recipient, or NULL */
};

/* Envelope lines up to "body\n"; fills sender and rcpts (pointers into the
 * NUL-terminated copy in *env) and dp. Returns the offset of the message or -1. */
static long parse_envelope(char *data, size_t len, const char **sender, const char ***rcpts, size_t *n,
                           struct drop_props *dp)
{
    static const char magic[] = "KTQUEUE 1\n";
    if (len < sizeof(magic) - 1 || memcmp(data, magic, sizeof(magic) - 1) != 0)
        return -1;
    size_t pos = sizeof(magic) - 1;
    *sender = NULL;
    *n = 0;
    *rcpts = NULL;
    size_t cap = 0;
    while (pos < len) {
        char *nl = memchr(data + pos, '\n', len - pos);
        if (!nl)
            goto bad;
        char *line = data + pos;
        size_t ll = (size_t)(nl - line);
        *nl = '\0';
        pos += ll + 1;
        if (!strcmp(line, "body"))
            return *sender && *n ? (long)pos : -1;
        if (!strncmp(line, "sender ", 7) && !*sender && kt_pickup_addr_ok(line + 7, ll - 7)) {
            *sender = line + 7;
        } else if (!strncmp(line, "rcpt ", 5) && ll > 5 && kt_pickup_addr_ok(line + 5, ll - 5)
                   && *n < KT_PICKUP_MAX_RCPTS) {
            if (*n == cap) {
                cap = cap ? cap * 2 : 8;
                *rcpts = kt_realloc(*rcpts, cap * sizeof(**rcpts));
            }
            (*rcpts)[(*n)++] = line + 5;
            if (dp->notify) {
                dp->notify = kt_realloc(dp->notify, cap * sizeof(*dp->notify));
                dp->notify[*n - 1] = 0;
            }
        } else if (!strncmp(line, "notify ", 7) && *n && kt_notify_parse(line + 7)) {
            if (!dp->notify)
                dp->notify = kt_calloc(cap, sizeof(*dp->notify));
            dp->notify[*n - 1] = kt_notify_parse(line + 7);
        } else if (!strcmp(line, "ret HDRS") || !strcmp(line, "ret FULL")) {
            dp->props.ret = line[4] == 'H' ? KT_QRET_HDRS : KT_QRET_FULL;
        } else if (!strncmp(line, "envid ", 6) && kt_xtext_printable(line + 6, 100)) {
            dp->props.envid = line + 6;
        } else if (strncmp(line, "arrival ", 8) && strncmp(line, "dots ", 5)) {
            goto bad;
        }
    }
bad:
    kt_free(*rcpts);
    *rcpts = NULL;
    kt_free(dp->notify);
    dp->notify = NULL;
    return -1;
}

/* CRLF line ends: a lone LF or a bare CR becomes CRLF, through the one rule every way in uses (no
 * smuggling of line ends the next hop might read differently). */
static void normalize(struct kt_buf *out, const char *in, size_t len)
{
    struct kt_data_parser p;
    char block[2 * 4096 + 2], end[2];
    size_t used = 0;

    kt_data_parser_init_chunked(&p);
    while (used < len) {
        size_t got = 0, take = len - used < 4096 ? len - used : 4096;
        used += kt_data_parse(&p, in + used, take, block, sizeof(block), &got);
        kt_buf_append(out, block, got);
    }
    kt_buf_append(out, end, kt_data_parse_end(&p, end));
}

/* One drop file read and checked: what the message will be queued as. */
struct dropped {
    char name[NAME_MAX + 1];
    uid_t uid;
    char id[KT_QUEUE_ID_MAX];
    char *data;                   /* the file; sender and rcpts point into it */
    const char *sender;
    const char **rcpts;
    size_t n;
    struct drop_props dp;
    struct kt_buf msg;            /* our Received: and the message, CRLF */
};

static void dropped_release(struct dropped *m)
{
    kt_free(m->rcpts);
    kt_free(m->dp.notify);
    kt_free(m->data);
    kt_buf_release(&m->msg);
    memset(m, 0, sizeof(*m));
}

/* What becomes of a drop file. */
enum drop_fate { DROP_REMOVE = 1, DROP_KEEP };   /* never 0: load_one returns 0 for a message */

/* Reads name and builds m. 0, or the fate of a file that is no submission (DROP_REMOVE, warned). */
static int load_one(int dfd, const char *dir, const char *name, long long size_limit, const char *hostname,
                    struct dropped *m)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    int rc = DROP_REMOVE;
    memset(m, 0, sizeof(*m));
    snprintf(m->name, sizeof(m->name), "%s", name);
    if (fd < 0) {
        if (errno != ENOENT)   /* else removed by its owner since the directory was read */
            kt_warn("pickup: %s/%s: %s; removed", dir, name, strerror(errno));
        goto cleanup;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1) {
        /* a link to somebody else's file is no submission */
        kt_warn("pickup: %s/%s: not a regular file with one link; removed", dir, name);
        goto cleanup;
    }
    if (size_limit > 0 && st.st_size - ENVELOPE_SLACK > size_limit) {   /* (no overflow: st_size >= 0) */
        kt_warn("pickup: %s/%s: message from uid %u exceeds message_size_limit; removed", dir, name,
                (unsigned)st.st_uid);
        goto cleanup;
    }
    m->uid = st.st_uid;
    size_t len = (size_t)st.st_size;
    m->data = kt_malloc(len + 1);
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, m->data + got, len - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    if (got != len) {
        kt_warn("pickup: %s/%s: short read; removed", dir, name);
        goto cleanup;
    }
    m->data[len] = '\0';
    long off = parse_envelope(m->data, len, &m->sender, &m->rcpts, &m->n, &m->dp);
    m->dp.props.notify = m->dp.notify;
    if (off < 0) {
        kt_warn("pickup: %s/%s: malformed submission from uid %u; removed", dir, name, (unsigned)st.st_uid);
        goto cleanup;
    }
    if (size_limit > 0 && (long long)(len - (size_t)off) > size_limit) {
        kt_warn("pickup: %s/%s: message from uid %u exceeds message_size_limit; removed", dir, name,
                (unsigned)st.st_uid);
        goto cleanup;
    }
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
    kt_queue_new_id(m->id, sizeof(m->id));
    /* the submitter is the file's owner, whatever the file says */
    kt_buf_printf(&m->msg, "Received: by %s (ktrelay, from userid %u)\r\n\tid %s; %s\r\n", hostname,
                  (unsigned)st.st_uid, m->id, date);
    normalize(&m->msg, m->data + off, len - (size_t)off);
    rc = 0;
cleanup:
    if (fd >= 0)
        close(fd);
    if (rc)
        dropped_release(m);
    return rc;
}

/* Queues m under its id with the envelope sender/rcpts and the message body/len (m's own, or as the
 * milters edited them; their DSN requests follow the recipient they were given for), into hold/ when
 * hold. DROP_REMOVE once it is durably queued (logged as Postfix's pickup, cleanup and qmgr; the pickup
 * line not again when pickup_logged, before the milters), else DROP_KEEP (logged): the drop file stays for
 * a later try. */
static int queue_one(const char *qdir, const char *dir, const struct kt_rewrite *rw, const char *filter,
                     struct dropped *m, const char *sender, const char *const *rcpts, size_t n, const char *body,
                     size_t len, int hold, int pickup_logged)
{
    struct kt_rewrite_envelope env;
    const char *failed;
    int rc = kt_rewrite_envelope(rw, m->id, sender, rcpts, n, &env, &failed);
    if (rc < 0) {
        /* Postfix's cleanup does not accept it either; the drop file stays for a fixed table */
        kt_err("pickup: %s/%s: recipient %s cannot be rewritten; kept for a later try", dir, m->name, failed);
        return DROP_KEEP;
    }
    /* each recipient an alias expanded into keeps the DSN request of the one it came from (one a milter
     * added: the default) */
    unsigned *notify = m->dp.notify ? kt_calloc(env.n ? env.n : 1, sizeof(*notify)) : NULL;
    for (size_t i = 0; notify && i < env.n; i++)
        for (size_t k = 0; k < m->n; k++)
            if (!strcmp(rcpts[env.src[i]], m->rcpts[k])) {
                notify[i] = m->dp.notify[k];
                break;
            }
    struct kt_qprops props = m->dp.props;
    props.notify = notify;
    props.filter = filter;
    props.orig_rcpt = (const char *const *)env.origs;
    props.hold = hold;
    rc = kt_queue_write_props(qdir, time(NULL), env.sender, (const char *const *)env.rcpts, env.n, &props, body,
                              len, m->id, sizeof(m->id));
    kt_free(notify);
    if (rc < 0) {
        kt_rewrite_envelope_free(&env);
        /* keep the drop file: the next tick tries again */
        kt_err("pickup: %s/%s: cannot queue: %s", dir, m->name, strerror(-rc));
        return DROP_KEEP;
    }
    if (pickup_logged)
        log_queued(m->id, env.sender, body, len, env.n);
    else
        kt_pickup_log(m->id, m->uid, env.sender, body, len, env.n);
    kt_rewrite_envelope_free(&env);
    if (!hold)
        kt_queue_notify(qdir, m->id);
    return DROP_REMOVE;
}

static void drop_remove(int dfd, const char *dir, const char *name)
{
    if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
        kt_warn("pickup: cannot remove %s/%s: %s", dir, name, strerror(errno));
}

static void pick_one(int dfd, const char *dir, const char *name, const char *qdir, long long size_limit,
                     const char *hostname, const struct kt_rewrite *rw, const char *filter, int *picked)
{
    struct dropped m;
    int fate = load_one(dfd, dir, name, size_limit, hostname, &m);
    if (fate == 0) {
        fate = queue_one(qdir, dir, rw, filter, &m, m.sender, m.rcpts, m.n, m.msg.data, kt_buf_used(&m.msg), 0, 0);
        if (fate == DROP_REMOVE)
            (*picked)++;
        dropped_release(&m);
    }
    if (fate == DROP_REMOVE)
        drop_remove(dfd, dir, name);
}

/* ---- non_smtpd_milters: the same pickup with a milter conversation per message ---- */

/* Drop files a milter deferred are not tried again before their time (queue_run_delay). At most this many
 * are remembered; one beyond it is tried again on the next pass, one pass a tick at most. */
#define RETRY_MAX 100000
/* Directory entries one call looks at before it lets the loop run (a pass through many files the milters
 * deferred, or through many malformed files, goes on from the loop) */
#define SCAN_BATCH 1000

struct retry {
    char *name;
    time_t at;
    unsigned pass;                /* the last pass that found the file still there */
};

struct kt_pickup {
    struct kt_loop *loop;
    char *qdir;                   /* the queue manager's queue_directory (a reload does not move it) */
    struct kt_runtime *rt;        /* held while a conversation runs: its milter set and settings */
    struct kt_milters *ms;
    int busy;
    struct dropped m;
    int memfd;                    /* the message as the milters read it back */
    size_t next_rcpt;
    int mail_sent;
    const char *rcpt;             /* {rcpt_addr} during a RCPT event */
    int hold;
    char hold_reason[128];
    struct retry *retry;          /* drop files a milter deferred, sorted by name, and when to try them again */
    size_t n_retry, cap_retry;
    DIR *scan;                    /* the pass through maildrop/ under way (one a tick at most), or NULL */
    DIR *plain_scan;              /* kt_pickup_run's pass (without milters) under way, or NULL */
    unsigned pass;
    struct kt_op next_op;         /* the end of a conversation runs from the loop, not inside its callback */
    int next_pending;
    int orphan;                   /* kt_pickup_free came while next_op was in flight: on_next frees */
    int stopping;                 /* no new conversation */
};

static void on_next(struct kt_op *op, int res, unsigned flags);

struct kt_pickup *kt_pickup_new(struct kt_loop *loop, const char *qdir)
{
    struct kt_pickup *p = kt_calloc(1, sizeof(*p));
    p->loop = loop;
    p->qdir = kt_strdup(qdir);
    p->memfd = -1;
    p->next_op.cb = on_next;
    return p;
}

int kt_pickup_busy(const struct kt_pickup *p)
{
    return p && (p->busy || p->next_pending);
}

static void conversation_end(struct kt_pickup *p)
{
    kt_milters_free(p->ms);
    p->ms = NULL;
    if (p->memfd >= 0)
        close(p->memfd);
    p->memfd = -1;
    dropped_release(&p->m);
    p->busy = 0;
    p->rcpt = NULL;
    p->mail_sent = 0;
    p->hold = 0;
    p->hold_reason[0] = '\0';
}

static void retry_free(struct kt_pickup *p)
{
    for (size_t i = 0; i < p->n_retry; i++)
        kt_free(p->retry[i].name);
    kt_free(p->retry);
    p->retry = NULL;
    p->n_retry = p->cap_retry = 0;
}

/* A new pass: maildrop/ (dir) opened for reading, not through a symlink; NULL when it cannot be. */
static DIR *maildrop_open(const char *dir)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (dfd >= 0 && !d)
        close(dfd);
    return d;
}

/* Whether maildrop/ (dir) is no longer the directory d was opened on: moved away (and maybe replaced)
 * since the pass began. The pass then ends, as Postfix's pickup opens every file by its name under
 * maildrop/. lstat: a symlink put in its place is not the directory either. */
static int maildrop_replaced(DIR *d, const char *dir)
{
    struct stat open_st, now_st;
    return fstat(dirfd(d), &open_st) < 0 || lstat(dir, &now_st) < 0 || open_st.st_dev != now_st.st_dev
        || open_st.st_ino != now_st.st_ino;
}

static void plain_scan_end(struct kt_pickup *p)
{
    if (p->plain_scan)
        closedir(p->plain_scan);
    p->plain_scan = NULL;
}

int kt_pickup_run(struct kt_pickup *p, long long size_limit, const char *hostname, const struct kt_rewrite *rw,
                  const char *content_filter)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/maildrop", p->qdir);
    if (p->plain_scan && maildrop_replaced(p->plain_scan, dir))
        plain_scan_end(p);
    if (!p->plain_scan && !(p->plain_scan = maildrop_open(dir)))
        return 0;
    int picked = 0;
    /* at most 1000 entries a call, so one tick never takes long; the pass goes on at the next call */
    for (int seen = 0; seen < 1000; seen++) {
        struct dirent *e = readdir(p->plain_scan);
        if (!e) {
            plain_scan_end(p);   /* the pass is over: the next call begins another */
            break;
        }
        if (e->d_name[0] == '.')
            continue;    /* ".", "..", and files still being written */
        pick_one(dirfd(p->plain_scan), dir, e->d_name, p->qdir, size_limit, hostname, rw, content_filter, &picked);
    }
    return picked;
}

static void scan_end(struct kt_pickup *p)
{
    if (p->scan)
        closedir(p->scan);
    p->scan = NULL;
}

void kt_pickup_free(struct kt_pickup *p)
{
    if (!p)
        return;
    conversation_end(p);   /* a message in flight stays in maildrop/ for the next start */
    scan_end(p);
    plain_scan_end(p);
    if (p->rt)
        kt_runtime_unref(p->rt);
    p->rt = NULL;
    if (p->next_pending) {
        p->orphan = 1;
        return;
    }
    retry_free(p);
    kt_free(p->qdir);
    kt_free(p);
}

/* Postfix's cleanup_milter_eval for local submissions: the client is localhost[127.0.0.1], port 0. */
static const char *pickup_macro(void *arg, const char *name, char *buf, size_t len)
{
    struct kt_pickup *p = arg;
    const struct kt_qmgr_settings *set = &p->rt->qmgr;
    (void)buf;
    (void)len;
    if (!strcmp(name, "{daemon_name}"))
        return set->milter_daemon_name;
    if (!strcmp(name, "v"))
        return set->milter_macro_v;
    if (!strcmp(name, "j"))
        return set->myhostname;
    if (!strcmp(name, "_"))
        return "localhost [127.0.0.1]";
    if (!strcmp(name, "{client_addr}"))
        return "127.0.0.1";
    if (!strcmp(name, "{client_name}") || !strcmp(name, "{client_ptr}"))
        return "localhost";
    if (!strcmp(name, "{client_port}"))
        return "0";
    if (!strcmp(name, "i"))
        return p->m.id;
    if (!strcmp(name, "{mail_addr}"))
        return p->mail_sent ? p->m.sender : NULL;
    if (!strcmp(name, "{rcpt_addr}"))
        return p->rcpt;
    return NULL;
}

/* Postfix's cleanup_milter_apply line: "ID: milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: text;
 * from=<...> to=<...>". */
static void milter_log(struct kt_pickup *p, const char *action, const char *where, const char *text)
{
    const char *to = p->rcpt ? p->rcpt : p->m.n ? p->m.rcpts[0] : "";
    kt_info_as("cleanup", "%s: %s: %s from localhost[127.0.0.1]: %s; from=<%s> to=<%s>", p->m.id, action, where,
               text, p->m.sender, to);
}

/* The retry entry of name (the list is sorted by name): its index, or where it would go with *found 0. */
static size_t retry_find(const struct kt_pickup *p, const char *name, int *found)
{
    size_t lo = 0, hi = p->n_retry;
    *found = 0;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(p->retry[mid].name, name);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void retry_later(struct kt_pickup *p, const char *name, time_t at)
{
    int found;
    size_t i = retry_find(p, name, &found);
    if (found) {
        p->retry[i].at = at;
        p->retry[i].pass = p->pass;
        return;
    }
    if (p->n_retry == RETRY_MAX)
        return;   /* tried again on the next pass, as if never deferred */
    if (p->n_retry == p->cap_retry) {
        p->cap_retry = p->cap_retry ? 2 * p->cap_retry : 64;
        p->retry = kt_realloc(p->retry, p->cap_retry * sizeof(*p->retry));
    }
    memmove(&p->retry[i + 1], &p->retry[i], (p->n_retry - i) * sizeof(*p->retry));
    p->retry[i] = (struct retry){ .name = kt_strdup(name), .at = at, .pass = p->pass };
    p->n_retry++;
}

static void retry_remove(struct kt_pickup *p, size_t i)
{
    kt_free(p->retry[i].name);
    memmove(&p->retry[i], &p->retry[i + 1], (p->n_retry - i - 1) * sizeof(*p->retry));
    p->n_retry--;
}

/* 1 when name was deferred and is not due yet; a due entry is forgotten. */
static int retry_wait(struct kt_pickup *p, const char *name, time_t now)
{
    int found;
    size_t i = retry_find(p, name, &found);
    if (!found)
        return 0;
    if (p->retry[i].at > now) {
        p->retry[i].pass = p->pass;
        return 1;
    }
    retry_remove(p, i);
    return 0;
}

/* A whole pass is over: the entries of files it did not find (removed by their owner) are forgotten. */
static void retry_prune(struct kt_pickup *p)
{
    size_t k = 0;
    for (size_t i = 0; i < p->n_retry; i++) {
        if (p->retry[i].pass == p->pass)
            p->retry[k++] = p->retry[i];
        else
            kt_free(p->retry[i].name);
    }
    p->n_retry = k;
}

static void pickup_next(struct kt_pickup *p);

/* A 5xx from a milter: as Postfix's cleanup does for pickup mail (CLEANUP_FLAG_BOUNCE), the message is
 * returned to its sender with the milter's reply. DROP_REMOVE once the notification is queued (or there is
 * nobody to return it to), else DROP_KEEP. */
static int bounce_rejected(struct kt_pickup *p, const char *reply)
{
    const struct kt_qmgr_settings *set = &p->rt->qmgr;
    const char *qdir = p->qdir;
    if (!p->m.sender[0]) {
        kt_info_as("cleanup", "%s: the message from the null sender is not returned", p->m.id);
        return DROP_REMOVE;
    }
    /* "STATUS - DIAGNOSTIC": the enhanced status code of the reply, else 5.7.1 (Postfix's for a milter) */
    char status[32] = "5.7.1";
    const char *text = strlen(reply) > 4 ? reply + 4 : reply;
    if (text[0] == '5' && text[1] == '.') {
        size_t sl = strcspn(text, " ");
        if (sl < sizeof(status))
            snprintf(status, sizeof(status), "%.*s", (int)sl, text);
    }
    /* a multi-line reply on one line, its lines joined by a space (as a next hop's reply is quoted): the
     * Diagnostic-Code field takes no line of its own per reply line */
    char flat[sizeof(((struct kt_milter_result *)0)->reply)], reason[1200];
    size_t k = 0;
    for (size_t i = 0; reply[i] && k + 1 < sizeof(flat); i++) {
        if (reply[i] == '\r' && reply[i + 1] == '\n') {
            flat[k++] = ' ';
            i++;
        } else {
            flat[k++] = reply[i];
        }
    }
    flat[k] = '\0';
    snprintf(reason, sizeof(reason), "%s - %s", status, flat);
    struct kt_dsn_rcpt *dr = kt_calloc(p->m.n, sizeof(*dr));
    for (size_t i = 0; i < p->m.n; i++)
        dr[i] = (struct kt_dsn_rcpt){ .addr = p->m.rcpts[i], .reason = reason };
    size_t len = kt_buf_used(&p->m.msg);
    /* the whole message unless RET=HDRS or bounce_size_limit says headers only */
    size_t hlen = len;
    const char *d = p->m.msg.data;
    int full = p->m.dp.props.ret != KT_QRET_HDRS && (set->bounce_size_limit <= 0 ||
                                                     (long long)len <= set->bounce_size_limit);
    if (!full) {
        const char *blank = memmem(d, len, "\r\n\r\n", 4);
        hlen = blank ? (size_t)(blank - d) + 2 : len;
    }
    struct kt_dsn_msg dm = { .id = p->m.id, .orig_sender = p->m.sender, .arrival = time(NULL),
                             .envid = p->m.dp.props.envid, .original = d, .original_len = hlen, .full = full };
    char *text_dsn = kt_dsn_build(KT_DSN_FAILED, set->myhostname, &dm, dr, p->m.n);
    const char *to = p->m.sender;
    char new_id[KT_QUEUE_ID_MAX] = "";
    int rc = kt_queue_write(qdir, "", &to, 1, text_dsn, strlen(text_dsn), new_id, sizeof(new_id));
    kt_free(text_dsn);
    kt_free(dr);
    if (rc < 0) {
        kt_err("pickup: %s: cannot queue the non-delivery notification: %s; kept for a later try", p->m.id,
               strerror(-rc));
        return DROP_KEEP;
    }
    kt_info_as("bounce", "%s: sender non-delivery notification: %s", p->m.id, new_id);
    kt_queue_notify(qdir, new_id);
    return DROP_REMOVE;
}

/* The conversation's outcome: queue, return, drop or keep the drop file, then the next file. */
static void conversation_done(struct kt_pickup *p, const struct kt_milter_result *r, const char *where)
{
    const struct kt_qmgr_settings *set = &p->rt->qmgr;
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/maildrop", p->qdir);
    int fate = DROP_KEEP;
    if (r->verdict == KT_MILTER_DISCARD) {
        milter_log(p, "milter-discard", where, "milter triggers DISCARD action");
        fate = DROP_REMOVE;
    } else if (r->verdict == KT_MILTER_REJECT || r->verdict == KT_MILTER_SHUTDOWN) {
        milter_log(p, "milter-reject", where, r->reply);
        if (r->reply[0] == '5' && r->verdict == KT_MILTER_REJECT && strcmp(where, "RCPT")) {
            fate = bounce_rejected(p, r->reply);
        } else if (r->reply[0] == '5') {
            /* Postfix: a recipient cannot be refused in a submission that is not SMTP */
            kt_warn("%s: milter configuration error: can't reject recipient in non-smtpd(8) submission",
                    p->m.id);
            kt_warn("%s: deferring delivery of this message", p->m.id);
        }
    } else {
        if (p->hold)
            milter_log(p, "milter-hold", where, p->hold_reason[0] ? p->hold_reason : "milter triggers HOLD action");
        struct kt_buf edited = { 0 };
        const char *body = p->m.msg.data;
        size_t len = kt_buf_used(&p->m.msg);
        const char *sender = p->m.sender;
        const char *const *rcpts = p->m.rcpts;
        size_t n = p->m.n;
        int rc = 0;
        if (r->edited && (rc = kt_milters_render(p->ms, &edited)) == 0) {
            body = edited.data;
            len = kt_buf_used(&edited);
        }
        if (r->envelope_edited) {
            sender = kt_milters_sender(p->ms);
            n = kt_milters_rcpts(p->ms, &rcpts);
        }
        if (rc < 0) {
            kt_err("pickup: %s: cannot read the edited message back: %s", p->m.id, strerror(-rc));
        } else if (n == 0) {
            milter_log(p, "milter-reject", where, "554 5.5.1 Error: no valid recipients");
            fate = bounce_rejected(p, "554 5.5.1 Error: no valid recipients");
        } else {
            fate = queue_one(p->qdir, dir, set->rewrite, set->content_filter, &p->m, sender, rcpts, n,
                             body, len, p->hold, 1);
        }
        kt_buf_release(&edited);
    }
    if (fate == DROP_REMOVE) {
        /* through the directory the file was read from (the pass's, open until the conversation ends), which
         * is no longer maildrop/ if that was moved aside meanwhile: never a file of the same name elsewhere */
        if (p->scan)
            drop_remove(dirfd(p->scan), dir, p->m.name);
        else
            kt_err("pickup: %s/%s: the directory it was read from is gone; the file stays", dir, p->m.name);
    } else {
        retry_later(p, p->m.name, time(NULL) + set->queue_run_delay);
    }
    /* the milters' object is freed, and the next file taken, once this callback has returned */
    io_uring_prep_nop(kt_loop_sqe(p->loop, &p->next_op));
    p->next_pending = 1;
}

static void on_next(struct kt_op *op, int res, unsigned flags)
{
    struct kt_pickup *p = (struct kt_pickup *)((char *)op - offsetof(struct kt_pickup, next_op));
    (void)res;
    (void)flags;
    p->next_pending = 0;
    if (p->orphan) {
        retry_free(p);
        kt_free(p->qdir);
        kt_free(p);
        return;
    }
    conversation_end(p);
    if (p->rt && !p->stopping)
        pickup_next(p);
}

static void on_eom(void *arg, const struct kt_milter_result *r);
static void on_rcpt(void *arg, const struct kt_milter_result *r);

/* Every event's result passes here: 1 when the conversation goes on. */
static int goes_on(struct kt_pickup *p, const struct kt_milter_result *r, const char *where)
{
    if (r->hold && !p->hold) {
        p->hold = 1;
        snprintf(p->hold_reason, sizeof(p->hold_reason), "%s", r->hold_reason);
    }
    if (r->verdict == KT_MILTER_CONTINUE)
        return 1;
    conversation_done(p, r, where);
    return 0;
}

static void on_data(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (!goes_on(p, r, "DATA"))
        return;
    p->rcpt = NULL;
    /* our own Received: is not shown to the milters (as Postfix's cleanup) */
    kt_milters_eom(p->ms, p->memfd, 0, (off_t)kt_buf_used(&p->m.msg), 0, 1, p->m.sender, p->m.rcpts, p->m.n,
                   on_eom, p);
}

static void send_rcpt(struct kt_pickup *p)
{
    if (p->next_rcpt == p->m.n) {
        kt_milters_data(p->ms, on_data, p);
        return;
    }
    p->rcpt = p->m.rcpts[p->next_rcpt++];
    /* Postfix's cleanup sends the address alone, as Sendmail 8.13 */
    const char *args[1] = { p->rcpt };
    kt_milters_rcpt(p->ms, args, 1, on_rcpt, p);
}

static void on_rcpt(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (goes_on(p, r, "RCPT"))
        send_rcpt(p);
}

static void on_eom(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (goes_on(p, r, "END-OF-MESSAGE"))
        conversation_done(p, r, "END-OF-MESSAGE");
}

static void on_mail(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (goes_on(p, r, "MAIL"))
        send_rcpt(p);
}

static void on_helo(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (!goes_on(p, r, "EHLO"))
        return;
    p->mail_sent = 1;
    const char *args[1] = { p->m.sender };
    kt_milters_mail(p->ms, args, 1, on_mail, p);
}

static void on_connect(void *arg, const struct kt_milter_result *r)
{
    struct kt_pickup *p = arg;
    if (goes_on(p, r, "CONNECT"))
        kt_milters_helo(p->ms, "localhost", on_helo, p);
}

/* The next complete drop file of the pass under way that is not waiting for a retry: its conversation
 * starts. Each pass goes through the whole directory once, from where the last conversation left it, so a
 * file is neither tried twice in a pass nor left behind a thousand others the milters keep deferring; the
 * pass ends (and the next begins on a tick) at the end of the directory. */
static void pickup_next(struct kt_pickup *p)
{
    const struct kt_qmgr_settings *set = &p->rt->qmgr;
    if (!set->non_smtpd_milters || !p->scan) {
        scan_end(p);
        return;
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/maildrop", p->qdir);
    if (maildrop_replaced(p->scan, dir)) {
        scan_end(p);   /* the next tick begins a pass through the new maildrop/ */
        return;
    }
    time_t now = time(NULL);
    struct dirent *e = NULL;
    for (int seen = 0; !p->busy && seen < SCAN_BATCH && (e = readdir(p->scan)) != NULL; seen++) {
        if (e->d_name[0] == '.' || retry_wait(p, e->d_name, now))
            continue;
        if (load_one(dirfd(p->scan), dir, e->d_name, set->message_size_limit, set->myhostname, &p->m) != 0) {
            drop_remove(dirfd(p->scan), dir, e->d_name);
            continue;
        }
        kt_info_as("pickup", "%s: uid=%u from=<%s>", p->m.id, (unsigned)p->m.uid, p->m.sender);
        p->memfd = memfd_create("pickup", MFD_CLOEXEC);
        size_t len = kt_buf_used(&p->m.msg), off = 0;
        while (p->memfd >= 0 && off < len) {
            ssize_t w = write(p->memfd, p->m.msg.data + off, len - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break;
            off += (size_t)w;
        }
        if (p->memfd < 0 || off != len) {
            kt_err("pickup: %s/%s: cannot hold the message for the milters: %s; kept for a later try", dir,
                   e->d_name, strerror(errno));
            retry_later(p, e->d_name, now + set->queue_run_delay);
            conversation_end(p);
            continue;
        }
        p->busy = 1;
        p->next_rcpt = 0;
        p->ms = kt_milters_new(p->loop, set->non_smtpd_milters, pickup_macro, p);
        /* Postfix's cleanup_milter_emul_mail: a local submission comes from localhost[127.0.0.1], inet */
        kt_milters_connect(p->ms, "localhost", '4', "127.0.0.1", 0, on_connect, p);
    }
    if (p->busy)
        return;
    if (e) {
        /* a full batch without a conversation: the rest of the pass from the loop */
        io_uring_prep_nop(kt_loop_sqe(p->loop, &p->next_op));
        p->next_pending = 1;
        return;
    }
    scan_end(p);
    retry_prune(p);
}

void kt_pickup_stop(struct kt_pickup *p)
{
    if (p)
        p->stopping = 1;
}

void kt_pickup_milter_run(struct kt_pickup *p, struct kt_runtime *rt)
{
    if (p->busy || p->next_pending || p->stopping)
        return;
    if (p->rt != rt) {
        if (p->rt)
            kt_runtime_unref(p->rt);
        p->rt = kt_runtime_ref(rt);
    }
    if (!p->scan) {
        /* a new pass (the last one ended) */
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "%s/maildrop", p->qdir);
        if (!(p->scan = maildrop_open(dir)))
            return;
        p->pass++;
    }
    pickup_next(p);
}
