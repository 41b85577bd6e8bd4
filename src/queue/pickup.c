/* maildrop/ pickup (see pickup.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/log.h"
#include "delivery/header_scan.h"
#include "metrics/metrics.h"
#include "delivery/rewrite.h"
#include "queue/pickup.h"
#include "smtpd/smtp_parse.h"
#include "queue/queue.h"

#define MAX_RCPTS 10000
#define ADDR_MAX 512
#define ENVELOPE_SLACK (1024 * 1024)     /* room for the envelope beyond message_size_limit */

void kt_pickup_log(const char *id, uid_t uid, const char *sender, const char *msg, size_t len, size_t nrcpt)
{
    struct kt_header_scan hs;
    kt_header_scan_reset(&hs);
    kt_header_scan_feed(&hs, msg, len);
    kt_info_as("pickup", "%s: uid=%u from=<%s>", id, (unsigned)uid, sender);
    kt_info_as("cleanup", "%s: message-id=%s", id, hs.message_id[0] ? hs.message_id : "<>");
    kt_info_as("qmgr", "%s: from=<%s>, size=%zu, nrcpt=%zu (queue active)", id, sender, len, nrcpt);
    kt_metric_inc(KT_M_MESSAGES_RECEIVED);
}

static int clean_addr(const char *s, size_t n)
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
        if (!strncmp(line, "sender ", 7) && !*sender && clean_addr(line + 7, ll - 7)) {
            *sender = line + 7;
        } else if (!strncmp(line, "rcpt ", 5) && ll > 5 && clean_addr(line + 5, ll - 5) && *n < MAX_RCPTS) {
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

static void pick_one(int dfd, const char *dir, const char *name, const char *qdir, long long size_limit,
                     const char *hostname, const struct kt_rewrite *rw, const char *filter, int *picked)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    char *data = NULL;
    const char **rcpts = NULL;
    size_t n = 0;
    struct drop_props dp = { 0 };
    if (fd < 0) {
        kt_warn("pickup: %s/%s: %s; removed", dir, name, strerror(errno));
        goto remove;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1) {
        /* a link to somebody else's file is no submission */
        kt_warn("pickup: %s/%s: not a regular file with one link; removed", dir, name);
        goto remove;
    }
    if (size_limit > 0 && st.st_size > size_limit + ENVELOPE_SLACK) {
        kt_warn("pickup: %s/%s: message from uid %u exceeds message_size_limit; removed", dir, name,
                (unsigned)st.st_uid);
        goto remove;
    }
    size_t len = (size_t)st.st_size;
    data = kt_malloc(len + 1);
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, data + got, len - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    if (got != len) {
        kt_warn("pickup: %s/%s: short read; removed", dir, name);
        goto remove;
    }
    data[len] = '\0';
    const char *sender;
    long off = parse_envelope(data, len, &sender, &rcpts, &n, &dp);
    dp.props.notify = dp.notify;
    if (off < 0) {
        kt_warn("pickup: %s/%s: malformed submission from uid %u; removed", dir, name, (unsigned)st.st_uid);
        goto remove;
    }
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
    char id[KT_QUEUE_ID_MAX] = "";
    kt_queue_new_id(id, sizeof(id));
    struct kt_buf msg = { 0 };
    /* the submitter is the file's owner, whatever the file says */
    kt_buf_printf(&msg, "Received: by %s (ktrelay, from userid %u)\r\n\tid %s; %s\r\n", hostname,
                  (unsigned)st.st_uid, id, date);
    normalize(&msg, data + off, len - (size_t)off);
    struct kt_rewrite_envelope env;
    const char *failed;
    int rc = kt_rewrite_envelope(rw, id, sender, rcpts, n, &env, &failed);
    if (rc < 0) {
        /* Postfix's cleanup does not accept it either; the drop file stays for a fixed table */
        kt_err("pickup: %s/%s: recipient %s cannot be rewritten; kept for a later try", dir, name, failed);
        kt_buf_release(&msg);
        goto out;
    }
    /* each recipient an alias expanded into keeps the DSN request of the one it came from */
    unsigned *notify = dp.notify ? kt_calloc(env.n ? env.n : 1, sizeof(*notify)) : NULL;
    for (size_t i = 0; notify && i < env.n; i++)
        notify[i] = dp.notify[env.src[i]];
    struct kt_qprops props = dp.props;
    props.notify = notify;
    props.filter = filter;
    props.orig_rcpt = (const char *const *)env.origs;
    rc = kt_queue_write_props(qdir, time(NULL), env.sender, (const char *const *)env.rcpts, env.n, &props, msg.data,
                              kt_buf_used(&msg), id, sizeof(id));
    kt_free(notify);
    if (rc < 0) {
        kt_rewrite_envelope_free(&env);
        /* keep the drop file: the next tick tries again */
        kt_err("pickup: %s/%s: cannot queue: %s", dir, name, strerror(-rc));
        kt_buf_release(&msg);
        goto out;
    }
    kt_pickup_log(id, st.st_uid, env.sender, msg.data, kt_buf_used(&msg), env.n);
    kt_rewrite_envelope_free(&env);
    kt_buf_release(&msg);
    kt_queue_notify(qdir, id);
    (*picked)++;
remove:
    if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
        kt_warn("pickup: cannot remove %s/%s: %s", dir, name, strerror(errno));
out:
    kt_free(rcpts);
    kt_free(dp.notify);
    kt_free(data);
    if (fd >= 0)
        close(fd);
}

int kt_pickup_run(const char *qdir, long long size_limit, const char *hostname, const struct kt_rewrite *rw,
                  const char *content_filter)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/maildrop", qdir);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return 0;
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return 0;
    }
    int picked = 0;
    struct dirent *e;
    /* at most 1000 per call, so one tick never takes long */
    for (int seen = 0; (e = readdir(d)) != NULL && seen < 1000; seen++) {
        if (e->d_name[0] == '.')
            continue;    /* ".", "..", and files still being written */
        pick_one(dirfd(d), dir, e->d_name, qdir, size_limit, hostname, rw, content_filter, &picked);
    }
    closedir(d);
    return picked;
}
