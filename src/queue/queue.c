/* Queue files (see queue.h for the layout and the durability contract).
 *
 * Synchronous functions here serve the command line (sendmail, queue) and
 * the queue manager thread, which owns no client sockets' hot path; the
 * in-process writer for SMTP sessions is asynchronous on the session's ring. */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/durable.h"
#include "core/log.h"
#include "queue/queue.h"

#define MAGIC "KTQUEUE 1\n"
/* A sanity bound on a queue file's envelope lines, for a damaged file: what ktrelay writes stays far below it
 * (10,000 recipients from sendmail of up to 512 bytes each are about 5.5 MB; SMTP's smtpd_recipient_limit
 * and virtual_alias_expansion_limit keep a message to a few thousand). */
#define MAX_ENVELOPE (64 * 1024 * 1024)

int kt_queue_init_dirs(const char *qdir)
{
    static const char *const sub[] = { "", "/tmp", "/new", "/status", "/public", "/hold" };
    char path[PATH_MAX];
    for (size_t i = 0; i < sizeof(sub) / sizeof(sub[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", qdir, sub[i]);
        /* queue_directory itself is searchable (not readable) by all, like
         * Postfix's, so that local users reach maildrop/ */
        if (mkdir(path, i == 0 ? 0711 : 0700) < 0 && errno != EEXIST)
            return -errno;
    }
    return 0;
}

int kt_queue_init_maildrop(const char *qdir)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof(path), "%s/maildrop", qdir);
    if (mkdir(path, 01733) < 0 && errno != EEXIST)
        return -errno;
    if (lstat(path, &st) < 0)
        return -errno;
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid())
        return -EPERM;
    /* mkdir's mode passes through the umask; this is the mode that counts */
    if ((st.st_mode & 07777) != 01733 && chmod(path, 01733) < 0)
        return -errno;
    /* local users must be able to pass through queue_directory to reach maildrop/ */
    if (stat(qdir, &st) < 0)
        return -errno;
    if (!(st.st_mode & S_IXOTH))
        return -EACCES;
    return 0;
}

void kt_queue_new_id(char *buf, size_t len)
{
    static unsigned long counter;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    unsigned long c = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
    /* Postfix's short form: upper-case hex, time first. Seconds (20 bits,
     * 12 days), microseconds, and 12 bits of a process-wide counter: unique
     * within the process (4096 ids in one microsecond cannot happen); across
     * processes a clash is refused by the queue's create/rename, never
     * overwritten. */
    snprintf(buf, len, "%05lX%05lX%03lX", (unsigned long)tv.tv_sec & 0xFFFFF, (unsigned long)tv.tv_usec,
             c & 0xFFF);
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static const char *const body_names[] = { "", "7BIT", "8BITMIME", "BINARYMIME" };

/* "SUCCESS,FAILURE,DELAY" or "NEVER" for NOTIFY bits into out. */
static void notify_names(unsigned bits, char *out, size_t cap)
{
    static const struct { unsigned bit; const char *name; } names[] = {
        { KT_QNOTIFY_NEVER, "NEVER" }, { KT_QNOTIFY_SUCCESS, "SUCCESS" }, { KT_QNOTIFY_FAILURE, "FAILURE" },
        { KT_QNOTIFY_DELAY, "DELAY" },
    };
    size_t used = 0;
    out[0] = '\0';
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if (bits & names[k].bit)
            used += (size_t)snprintf(out + used, used < cap ? cap - used : 0, "%s%s", used ? "," : "",
                                     names[k].name);
}

unsigned kt_notify_parse(const char *s)
{
    static const struct { const char *name; unsigned bit; } names[] = {
        { "NEVER", KT_QNOTIFY_NEVER }, { "SUCCESS", KT_QNOTIFY_SUCCESS }, { "FAILURE", KT_QNOTIFY_FAILURE },
        { "DELAY", KT_QNOTIFY_DELAY },
    };
    unsigned bits = 0;
    while (*s) {
        size_t n = strcspn(s, ","), k;
        for (k = 0; k < 4; k++)
            if (strlen(names[k].name) == n && !strncasecmp(s, names[k].name, n))
                break;
        if (k == 4)
            return 0;
        bits |= names[k].bit;
        s += n;
        if (*s == ',' && !*++s)
            return 0;
    }
    if ((bits & KT_QNOTIFY_NEVER) && bits != KT_QNOTIFY_NEVER)
        return 0;
    return bits;
}

int kt_xtext_printable(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return 0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '+') {
            /* RFC 3461: two upper-case hex digits */
            if (!isxdigit((unsigned char)s[1]) || islower((unsigned char)s[1]) || !isxdigit((unsigned char)s[2]) ||
                islower((unsigned char)s[2]))
                return 0;
            int v = hexval(s[1]) * 16 + hexval(s[2]);
            if (v < 0x20 || v > 0x7e)
                return 0;
            s += 2;
        } else if (c < 33 || c > 126 || c == '=') {
            return 0;
        }
    }
    return 1;
}

/* A stored value must stay on its line: the writers pass only checked xtext, this is the last guard. */
static int one_line(const char *s)
{
    return s && *s && !strpbrk(s, "\r\n");
}

char *kt_queue_envelope(const char *sender, const char *const *rcpts, size_t n, time_t arrival, int dots,
                        int canonical, const struct kt_qprops *props)
{
    struct kt_buf b = { 0 };
    char names[64];
    kt_buf_printf(&b, MAGIC "arrival %lld\nsender %s\n", (long long)arrival, sender ? sender : "");
    if (dots >= 0)
        kt_buf_printf(&b, "dots %d\n", dots ? 1 : 0);
    if (canonical)
        kt_buf_printf(&b, "canonical 1\n");
    if (props && props->smtputf8)
        kt_buf_printf(&b, "smtputf8 1\n");
    if (props && props->body > KT_QBODY_NONE && props->body <= KT_QBODY_BINARYMIME)
        kt_buf_printf(&b, "encoding %s\n", body_names[props->body]);
    if (props && props->ret != KT_QRET_NONE)
        kt_buf_printf(&b, "ret %s\n", props->ret == KT_QRET_HDRS ? "HDRS" : "FULL");
    if (props && one_line(props->envid))
        kt_buf_printf(&b, "envid %s\n", props->envid);
    if (props && one_line(props->filter))
        kt_buf_printf(&b, "filter %s\n", props->filter);
    for (size_t i = 0; i < n; i++) {
        kt_buf_printf(&b, "rcpt %s\n", rcpts[i]);
        if (props && props->notify && props->notify[i]) {
            notify_names(props->notify[i], names, sizeof(names));
            kt_buf_printf(&b, "notify %s\n", names);
        }
        if (props && props->orcpt && one_line(props->orcpt[i]))
            kt_buf_printf(&b, "orcpt %s\n", props->orcpt[i]);
        if (props && props->orig_rcpt && one_line(props->orig_rcpt[i]) && strcmp(props->orig_rcpt[i], rcpts[i]))
            kt_buf_printf(&b, "orig_rcpt %s\n", props->orig_rcpt[i]);
    }
    kt_buf_append(&b, "body\n", 6);    /* with the NUL: the buffer is returned as a string */
    return b.data;
}

void kt_qmsg_props(const struct kt_qmsg *m, const size_t *idx, size_t n, unsigned *notify, const char **orcpt,
                   const char **orig, struct kt_qprops *out)
{
    for (size_t k = 0; k < n; k++) {
        notify[k] = m->rcpts[idx[k]].notify;
        orcpt[k] = m->rcpts[idx[k]].orcpt;
        orig[k] = m->rcpts[idx[k]].orig_rcpt;
    }
    *out = (struct kt_qprops){ .smtputf8 = m->smtputf8, .body = m->body, .ret = m->ret, .envid = m->envid,
                               .notify = notify, .orcpt = orcpt, .filter = m->filter, .orig_rcpt = orig };
}

void kt_xtext_decode(const char *s, char *out, size_t cap)
{
    size_t o = 0;
    if (cap == 0)
        return;
    for (; *s && o + 1 < cap; s++) {
        int c = (unsigned char)*s;
        if (c == '+' && hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
            c = hexval(s[1]) * 16 + hexval(s[2]);
            s += 2;
        }
        out[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    out[o] = '\0';
}

void kt_xtext_encode(const char *s, char *out, size_t cap)
{
    size_t o = 0;
    if (cap == 0)
        return;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 33 || c > 126 || c == '+' || c == '=') {
            if (o + 4 > cap)
                break;
            snprintf(out + o, 4, "+%02X", c);
            o += 3;
        } else {
            if (o + 2 > cap)
                break;
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
}
static int valid_id(const char *id);

/* Every CR followed by LF and every LF preceded by CR. */
static int is_canonical(const char *body, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (body[i] == '\r' && (i + 1 == len || body[i + 1] != '\n'))
            return 0;
        if (body[i] == '\n' && (i == 0 || body[i - 1] != '\r'))
            return 0;
    }
    return 1;
}

static int has_dot_line(const char *body, size_t len)
{
    if (len > 0 && body[0] == '.')
        return 1;
    for (size_t i = 0; i + 1 < len; i++)
        if (body[i] == '\n' && body[i + 1] == '.')
            return 1;
    return 0;
}

int kt_queue_write(const char *qdir, const char *sender, const char *const *rcpts, size_t n, const void *body,
                   size_t len, char *id, size_t idlen)
{
    return kt_queue_write_at(qdir, time(NULL), sender, rcpts, n, body, len, id, idlen);
}

int kt_queue_write_at(const char *qdir, time_t arrival, const char *sender, const char *const *rcpts, size_t n,
                      const void *body, size_t len, char *id, size_t idlen)
{
    return kt_queue_write_props(qdir, arrival, sender, rcpts, n, NULL, body, len, id, idlen);
}

int kt_queue_write_props(const char *qdir, time_t arrival, const char *sender, const char *const *rcpts, size_t n,
                         const struct kt_qprops *props, const void *body, size_t len, char *id, size_t idlen)
{
    char tmp[PATH_MAX], dst[PATH_MAX];
    int rc = kt_queue_init_dirs(qdir);
    if (rc < 0)
        return rc;
    if (!id[0])
        kt_queue_new_id(id, idlen);
    snprintf(tmp, sizeof(tmp), "%s/tmp/%s", qdir, id);
    /* a held message is committed straight into hold/: no crash can leave it in new/ to be delivered */
    const char *where = props && props->hold ? "hold" : "new";
    snprintf(dst, sizeof(dst), "%s/%s/%s", qdir, where, id);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    char *env = kt_queue_envelope(sender, rcpts, n, arrival, has_dot_line(body, len), is_canonical(body, len),
                                  props);
    rc = kt_write_all(fd, env, strlen(env));
    kt_free(env);
    if (rc == 0)
        rc = kt_write_all(fd, body, len);
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    /* never replace a queued message whose id happens to be the same */
    if (rc == 0 && renameat2(AT_FDCWD, tmp, AT_FDCWD, dst, RENAME_NOREPLACE) < 0)
        rc = -errno;
    if (rc < 0) {
        unlink(tmp);
        return rc;
    }
    snprintf(tmp, sizeof(tmp), "%s/%s", qdir, where);
    return kt_fsync_dir(tmp);
}

int kt_queue_rewrite_held(const char *qdir, const char *id, const char *redirect, const char *filter, int keep_held)
{
    char src[PATH_MAX], tmp[PATH_MAX], dst[PATH_MAX], dir[PATH_MAX];
    struct kt_qmsg *m = NULL;
    const char **rcpts = NULL;
    size_t n;
    char *env = NULL;
    int in = -1, out = -1, rc;

    if (!valid_id(id))
        return -EINVAL;
    if ((rc = kt_queue_load_held(qdir, id, &m)) < 0)
        return rc;
    n = redirect ? 1 : m->n_rcpts;
    rcpts = kt_calloc(n ? n : 1, sizeof(*rcpts));
    for (size_t i = 0; i < n; i++)
        rcpts[i] = redirect ? redirect : m->rcpts[i].addr;
    /* the message's properties stay; a REDIRECT's new recipient has no NOTIFY or ORCPT of its own */
    size_t *idx = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*idx));
    unsigned *notify = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*notify));
    const char **orcpt = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*orcpt));
    const char **origs = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*origs));
    struct kt_qprops props;
    for (size_t i = 0; i < m->n_rcpts; i++)
        idx[i] = i;
    kt_qmsg_props(m, idx, m->n_rcpts, notify, orcpt, origs, &props);
    if (redirect) {
        props.notify = NULL;
        props.orcpt = NULL;
        props.orig_rcpt = NULL;
    }
    if (filter)
        props.filter = filter;      /* the "filter transport:destination" line, replacing any earlier one */
    env = kt_queue_envelope(m->sender, rcpts, n, m->arrival, m->dots, m->canonical, &props);
    kt_free(idx);
    kt_free(notify);
    kt_free(orcpt);
    kt_free(origs);
    snprintf(src, sizeof(src), "%s/hold/%s", qdir, id);
    snprintf(tmp, sizeof(tmp), "%s/tmp/%s.rewrite", qdir, id);
    snprintf(dst, sizeof(dst), "%s/%s/%s", qdir, keep_held ? "hold" : "new", id);
    in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        rc = -errno;
        goto cleanup;
    }
    unlink(tmp);
    out = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (out < 0) {
        rc = -errno;
        goto cleanup;
    }
    rc = kt_write_all(out, env, strlen(env));
    for (loff_t off = m->body_off, left = m->body_len; rc == 0 && left > 0;) {
        ssize_t k = copy_file_range(in, &off, out, NULL, (size_t)left, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            rc = k < 0 ? -errno : -EIO;
        else
            left -= k;
    }
    if (rc == 0 && fsync(out) < 0)
        rc = -errno;
    if (close(out) < 0 && rc == 0)
        rc = -errno;
    out = -1;
    if (rc == 0 && rename(tmp, dst) < 0)
        rc = -errno;
    if (rc < 0) {
        unlink(tmp);
        goto cleanup;
    }
    snprintf(dir, sizeof(dir), "%s/%s", qdir, keep_held ? "hold" : "new");
    rc = kt_fsync_dir(dir);
    if (!keep_held) {
        /* new/ID is durable: the held copy goes */
        if (unlink(src) < 0 && rc == 0)
            rc = -errno;
        snprintf(dir, sizeof(dir), "%s/hold", qdir);
        if (rc == 0)
            rc = kt_fsync_dir(dir);
        kt_queue_notify(qdir, id);
    }
cleanup:
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    kt_free(env);
    kt_free(rcpts);
    kt_qmsg_free(m);
    return rc;
}

void kt_qmsg_free(struct kt_qmsg *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n_rcpts; i++) {
        kt_free(m->rcpts[i].addr);
        kt_free(m->rcpts[i].reason);
        kt_free(m->rcpts[i].orcpt);
        kt_free(m->rcpts[i].orig_rcpt);
    }
    kt_free(m->rcpts);
    kt_free(m->envid);
    kt_free(m->sender);
    kt_free(m->filter);
    kt_free(m->id);
    kt_free(m);
}

static void load_status(const char *qdir, struct kt_qmsg *m)
{
    char path[PATH_MAX];
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    snprintf(path, sizeof(path), "%s/status/%s", qdir, m->id);
    FILE *f = fopen(path, "re");
    if (!f)
        return;
    m->has_status = 1;
    while ((n = getline(&line, &cap, f)) > 0) {
        unsigned long idx;
        int off = 0;
        /* a torn last line (crash mid-append) is ignored: that outcome was never acknowledged */
        if (line[n - 1] != '\n')
            break;
        line[n - 1] = '\0';
        if (!strcmp(line, "warn")) {
            m->warned = 1;
        } else if (sscanf(line, "done %lu", &idx) == 1 && idx < m->n_rcpts) {
            m->rcpts[idx].state = KT_QR_DONE;
        } else if (sscanf(line, "fail %lu%n", &idx, &off) == 1 && idx < m->n_rcpts) {
            m->rcpts[idx].state = KT_QR_FAILED;
            kt_free(m->rcpts[idx].reason);
            m->rcpts[idx].reason = line[off] == ' ' ? kt_strdup(line + off + 1) : NULL;
        } else if (sscanf(line, "defer %lu%n", &idx, &off) == 1 && idx < m->n_rcpts
                   && m->rcpts[idx].state == KT_QR_PENDING && line[off] == ' ') {
            /* the last deferral reason, for the queue listing */
            kt_free(m->rcpts[idx].reason);
            m->rcpts[idx].reason = kt_strdup(line + off + 1);
            m->deferred = 1;
        }
    }
    free(line);
    fclose(f);
}

static int load_from(const char *qdir, const char *sub, const char *id, struct kt_qmsg **out)
{
    char path[PATH_MAX];
    struct stat st;
    *out = NULL;
    if (!id[0] || id[0] == '.' || strchr(id, '/'))
        return -EINVAL;
    snprintf(path, sizeof(path), "%s/%s/%s", qdir, sub, id);
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    if (fstat(fileno(f), &st) < 0) {
        fclose(f);
        return -errno;
    }
    struct kt_qmsg *m = kt_calloc(1, sizeof(*m));
    m->id = kt_strdup(id);
    m->dots = -1;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int rc = -EINVAL, first = 1;
    long total = 0;
    while ((n = getline(&line, &cap, f)) > 0) {
        total += n;
        if (total > MAX_ENVELOPE || line[n - 1] != '\n')
            break;
        line[n - 1] = '\0';
        if (first) {
            first = 0;
            if (strcmp(line, "KTQUEUE 1") != 0)
                break;
        } else if (!strncmp(line, "arrival ", 8)) {
            m->arrival = (time_t)strtoll(line + 8, NULL, 10);
        } else if (!strncmp(line, "sender ", 7)) {
            kt_free(m->sender);
            m->sender = kt_strdup(line + 7);
        } else if (!strncmp(line, "dots ", 5)) {
            m->dots = atoi(line + 5) ? 1 : 0;
        } else if (!strcmp(line, "canonical 1")) {
            m->canonical = 1;
        } else if (!strcmp(line, "smtputf8 1")) {
            m->smtputf8 = 1;
        } else if (!strncmp(line, "encoding ", 9)) {
            for (int k = KT_QBODY_7BIT; k <= KT_QBODY_BINARYMIME; k++)
                if (!strcmp(line + 9, body_names[k]))
                    m->body = (enum kt_qbody)k;
        } else if (!strncmp(line, "ret ", 4)) {
            m->ret = !strcmp(line + 4, "HDRS") ? KT_QRET_HDRS : !strcmp(line + 4, "FULL") ? KT_QRET_FULL : KT_QRET_NONE;
        } else if (!strncmp(line, "envid ", 6) && line[6]) {
            kt_free(m->envid);
            m->envid = kt_strdup(line + 6);
        } else if (!strncmp(line, "notify ", 7) && m->n_rcpts) {
            m->rcpts[m->n_rcpts - 1].notify = kt_notify_parse(line + 7);
        } else if (!strncmp(line, "orig_rcpt ", 10) && line[10] && m->n_rcpts) {
            kt_free(m->rcpts[m->n_rcpts - 1].orig_rcpt);
            m->rcpts[m->n_rcpts - 1].orig_rcpt = kt_strdup(line + 10);
        } else if (!strncmp(line, "orcpt ", 6) && line[6] && m->n_rcpts) {
            kt_free(m->rcpts[m->n_rcpts - 1].orcpt);
            m->rcpts[m->n_rcpts - 1].orcpt = kt_strdup(line + 6);
        } else if (!strncmp(line, "filter ", 7)) {
            kt_free(m->filter);
            m->filter = line[7] ? kt_strdup(line + 7) : NULL;
        } else if (!strncmp(line, "rcpt ", 5)) {
            m->rcpts = kt_realloc(m->rcpts, (m->n_rcpts + 1) * sizeof(*m->rcpts));
            memset(&m->rcpts[m->n_rcpts], 0, sizeof(*m->rcpts));
            m->rcpts[m->n_rcpts].addr = kt_strdup(line + 5);
            m->rcpts[m->n_rcpts].state = KT_QR_PENDING;
            m->n_rcpts++;
        } else if (!strcmp(line, "body")) {
            m->body_off = (off_t)total;
            m->body_len = st.st_size - (off_t)total;
            rc = m->sender ? 0 : -EINVAL;
            break;
        }
    }
    free(line);
    fclose(f);
    if (rc < 0) {
        kt_qmsg_free(m);
        return rc;
    }
    load_status(qdir, m);
    *out = m;
    return 0;
}

int kt_queue_load(const char *qdir, const char *id, struct kt_qmsg **out)
{
    return load_from(qdir, "new", id, out);
}

int kt_queue_load_held(const char *qdir, const char *id, struct kt_qmsg **out)
{
    return load_from(qdir, "hold", id, out);
}

int kt_queue_open_body(const char *qdir, const char *id)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/new/%s", qdir, id);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int kt_queue_open_body_at(int new_fd, const char *id)
{
    int fd = openat(new_fd, id, O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

static char *mark_line(size_t rcpt, enum kt_qrcpt_state state, const char *reason)
{
    char *line;
    if (rcpt == (size_t)-1)
        line = kt_strdup("warn\n");
    else if (state == KT_QR_DONE || !reason)
        line = kt_asprintf("%s %zu\n", state == KT_QR_DONE ? "done" : "fail", rcpt);
    else
        line = kt_asprintf("fail %zu %.2000s\n", rcpt, reason);
    for (char *p = line; p[0] && p[1]; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return line;
}

static void mark_apply(struct kt_qmsg *m, size_t rcpt, enum kt_qrcpt_state state, const char *reason)
{
    m->has_status = 1;
    if (rcpt == (size_t)-1) {
        m->warned = 1;
    } else if (rcpt < m->n_rcpts) {
        m->rcpts[rcpt].state = state;
        kt_free(m->rcpts[rcpt].reason);
        m->rcpts[rcpt].reason = reason && state == KT_QR_FAILED ? kt_strdup(reason) : NULL;
    }
}

int kt_queue_mark_many(int status_fd, struct kt_qmsg *m, const struct kt_qmark *marks, size_t n)
{
    struct kt_buf b = { 0 };
    if (n == 0)
        return 0;
    for (size_t k = 0; k < n; k++) {
        char *line = mark_line(marks[k].rcpt, marks[k].state, marks[k].reason);
        kt_buf_append(&b, line, strlen(line));
        kt_free(line);
    }
    int created = 0;
    int fd = openat(status_fd, m->id, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        fd = openat(status_fd, m->id, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        created = 1;
    }
    int rc = fd < 0 ? -errno : kt_write_all(fd, b.data, kt_buf_used(&b));
    if (fd >= 0) {
        if (rc == 0 && fdatasync(fd) < 0)
            rc = -errno;
        close(fd);
    }
    if (rc == 0 && created && fsync(status_fd) < 0)
        rc = -errno;       /* the new name must survive a crash too */
    kt_buf_release(&b);
    if (rc < 0)
        return rc;
    for (size_t k = 0; k < n; k++)
        mark_apply(m, marks[k].rcpt, marks[k].state, marks[k].reason);
    return 0;
}

int kt_queue_mark(const char *qdir, struct kt_qmsg *m, size_t rcpt, enum kt_qrcpt_state state, const char *reason)
{
    char path[PATH_MAX];
    char *line = mark_line(rcpt, state, reason);
    snprintf(path, sizeof(path), "%s/status/%s", qdir, m->id);
    int created = 0;
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        created = 1;
    }
    int rc = fd < 0 ? -errno : kt_write_all(fd, line, strlen(line));
    if (fd >= 0) {
        if (rc == 0 && fsync(fd) < 0)
            rc = -errno;
        close(fd);
    }
    if (rc == 0 && created) {
        /* the new name must survive a crash too */
        snprintf(path, sizeof(path), "%s/status", qdir);
        rc = kt_fsync_dir(path);
    }
    kt_free(line);
    if (rc < 0)
        return rc;
    mark_apply(m, rcpt, state, reason);
    return 0;
}

int kt_qmsg_finished(const struct kt_qmsg *m)
{
    for (size_t i = 0; i < m->n_rcpts; i++)
        if (m->rcpts[i].state == KT_QR_PENDING)
            return 0;
    return 1;
}

int kt_queue_remove(const char *qdir, const char *id)
{
    char path[PATH_MAX];
    if (!id[0] || id[0] == '.' || strchr(id, '/'))
        return -EINVAL;
    snprintf(path, sizeof(path), "%s/new/%s", qdir, id);
    int rc = unlink(path) < 0 ? -errno : 0;
    if (rc == -ENOENT) {   /* or on hold */
        snprintf(path, sizeof(path), "%s/hold/%s", qdir, id);
        rc = unlink(path) < 0 ? -errno : 0;
    }
    snprintf(path, sizeof(path), "%s/status/%s", qdir, id);
    unlink(path);
    return rc;
}

int kt_queue_remove_at(int new_fd, int status_fd, const char *id, int has_status)
{
    int rc = unlinkat(new_fd, id, 0) < 0 ? -errno : 0;
    if (has_status)
        unlinkat(status_fd, id, 0);
    return rc;
}

/* Spare queue files in tmp/ (see kt_queue_retire_at): a stack of names, shared by the queue manager, which
 * adds, and the SMTP workers' queue writers, which take. */
static pthread_mutex_t spare_mu = PTHREAD_MUTEX_INITIALIZER;
static char *spare_qdir;
static char **spares;
static size_t n_spares;

int kt_queue_retire_at(const char *qdir, int new_fd, int tmp_fd, int status_fd, const char *id, int has_status)
{
    int rc, room;
    pthread_mutex_lock(&spare_mu);
    room = n_spares < KT_QUEUE_SPARES && (!spare_qdir || !strcmp(spare_qdir, qdir));
    pthread_mutex_unlock(&spare_mu);
    if (!room || tmp_fd < 0)
        return kt_queue_remove_at(new_fd, status_fd, id, has_status);
    rc = renameat(new_fd, id, tmp_fd, id) < 0 ? -errno : 0;
    if (has_status)
        unlinkat(status_fd, id, 0);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&spare_mu);
    if (!spare_qdir)
        spare_qdir = kt_strdup(qdir);
    if (!spares)
        spares = kt_calloc(KT_QUEUE_SPARES, sizeof(*spares));
    if (n_spares < KT_QUEUE_SPARES && !strcmp(spare_qdir, qdir)) {
        spares[n_spares++] = kt_strdup(id);
        id = NULL;
    }
    pthread_mutex_unlock(&spare_mu);
    if (id)
        unlinkat(tmp_fd, id, 0);   /* lost the race for the last place */
    return 0;
}

/* A spare's path for the writer, or NULL. kt_malloc'ed. */
static char *spare_take(const char *qdir)
{
    char *path = NULL;
    pthread_mutex_lock(&spare_mu);
    if (n_spares > 0 && !strcmp(spare_qdir, qdir)) {
        char *id = spares[--n_spares];
        path = kt_asprintf("%s/tmp/%s", qdir, id);
        kt_free(id);
    }
    pthread_mutex_unlock(&spare_mu);
    return path;
}

void kt_queue_spares_clear(void)
{
    pthread_mutex_lock(&spare_mu);
    for (size_t i = 0; i < n_spares; i++)
        kt_free(spares[i]);
    kt_free(spares);
    kt_free(spare_qdir);
    spares = NULL;
    spare_qdir = NULL;
    n_spares = 0;
    pthread_mutex_unlock(&spare_mu);
}

/* One line (at most PIPE_BUF bytes: written whole or not at all) into the queue manager's FIFO
 * QDIR/public/qmgr. No reader (ENXIO), no FIFO or a full one: nothing is written, and nothing is lost,
 * as the queue manager loads new/ when it starts and finds a removed file gone at its next attempt. */
static void qmgr_fifo_line(const char *qdir, const char *line, int n)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/public/qmgr", qdir);
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode) && n > 0 && write(fd, line, (size_t)n) < 0) {
        /* a full FIFO means the queue manager has wakeups pending */
    }
    close(fd);
}

void kt_queue_notify(const char *qdir, const char *id)
{
    char line[KT_QUEUE_ID_MAX + 4];
    int n = id ? snprintf(line, sizeof(line), "N%s\n", id) : snprintf(line, sizeof(line), "F\n");
    if (n > 0 && (size_t)n < sizeof(line))
        qmgr_fifo_line(qdir, line, n);
}

void kt_queue_forget(const char *qdir, const char *id, char why)
{
    char line[KT_QUEUE_ID_MAX + 4];
    int n = snprintf(line, sizeof(line), "%c%s\n", why, id);
    if (n > 0 && (size_t)n < sizeof(line))
        qmgr_fifo_line(qdir, line, n);
}

int kt_queue_note_deferrals(const char *qdir, const struct kt_qmsg *m)
{
    struct kt_buf b = { 0 };
    for (size_t i = 0; i < m->n_rcpts; i++)
        if (m->rcpts[i].state == KT_QR_PENDING && m->rcpts[i].reason) {
            size_t at = kt_buf_used(&b);
            kt_buf_printf(&b, "defer %zu %.1000s\n", i, m->rcpts[i].reason);
            for (char *p = b.data + at; p < b.data + kt_buf_used(&b) - 1; p++)
                if (*p == '\n' || *p == '\r')
                    *p = ' ';
        }
    if (!kt_buf_used(&b))
        return 0;
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/status/%s", qdir, m->id);
    /* informational: no fsync (a lost reason is shown again after the next attempt) */
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    int rc = fd < 0 ? -errno : kt_write_all(fd, b.data, kt_buf_used(&b));
    if (fd >= 0)
        close(fd);
    kt_buf_release(&b);
    return rc;
}

static int valid_id(const char *id)
{
    return id[0] && id[0] != '.' && !strchr(id, '/') && strlen(id) < 200;
}

static int move(const char *qdir, const char *from, const char *to, const char *id)
{
    char src[PATH_MAX], dst[PATH_MAX];
    if (!valid_id(id))
        return -EINVAL;
    snprintf(src, sizeof(src), "%s/%s/%s", qdir, from, id);
    snprintf(dst, sizeof(dst), "%s/%s/%s", qdir, to, id);
    if (renameat2(AT_FDCWD, src, AT_FDCWD, dst, RENAME_NOREPLACE) < 0)
        return -errno;
    snprintf(dst, sizeof(dst), "%s/%s", qdir, to);
    int rc = kt_fsync_dir(dst);
    snprintf(src, sizeof(src), "%s/%s", qdir, from);
    int rc2 = kt_fsync_dir(src);
    return rc < 0 ? rc : rc2;
}

int kt_queue_hold(const char *qdir, const char *id)
{
    return move(qdir, "new", "hold", id);
}

int kt_queue_release(const char *qdir, const char *id)
{
    return move(qdir, "hold", "new", id);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list_dir(const char *dir, char ***ids, size_t *n)
{
    DIR *d = opendir(dir);
    *ids = NULL;
    *n = 0;
    if (!d)
        return errno == ENOENT ? 0 : -errno;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        *ids = kt_realloc(*ids, (*n + 1) * sizeof(**ids));
        (*ids)[(*n)++] = kt_strdup(e->d_name);
    }
    closedir(d);
    if (*n)
        qsort(*ids, *n, sizeof(**ids), cmp_str);
    return 0;
}

int kt_queue_list_ids(const char *qdir, char ***ids, size_t *n)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/new", qdir);
    return list_dir(path, ids, n);
}

int kt_queue_list_held(const char *qdir, char ***ids, size_t *n)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/hold", qdir);
    return list_dir(path, ids, n);
}

void kt_queue_free_ids(char **ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kt_free(ids[i]);
    kt_free(ids);
}

void kt_queue_cleanup(const char *qdir)
{
    char path[PATH_MAX + 256], dir[PATH_MAX];
    char **ids;
    size_t n;
    snprintf(dir, sizeof(dir), "%s/tmp", qdir);
    if (list_dir(dir, &ids, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            snprintf(path, sizeof(path), "%s/%s", dir, ids[i]);
            unlink(path);
        }
        kt_queue_free_ids(ids, n);
    }
    snprintf(dir, sizeof(dir), "%s/status", qdir);
    if (list_dir(dir, &ids, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            struct stat st;
            snprintf(path, sizeof(path), "%s/new/%s", qdir, ids[i]);
            int gone = stat(path, &st) < 0 && errno == ENOENT;
            snprintf(path, sizeof(path), "%s/hold/%s", qdir, ids[i]);
            if (gone && stat(path, &st) < 0 && errno == ENOENT) {
                snprintf(path, sizeof(path), "%s/%s", dir, ids[i]);
                unlink(path);
            }
        }
        kt_queue_free_ids(ids, n);
    }
}

/* ---- in-process writer ---- */

static void qmsg_free_user(void *p)
{
    kt_qmsg_free(p);
}

struct kt_qmsg *kt_queue_delivery_take(struct kt_delivery *d)
{
    struct kt_qmsg *m = kt_delivery_take_user(d);
    if (!m)
        return NULL;
    m->id = kt_strdup(kt_delivery_name(d));
    m->body_len = (off_t)kt_delivery_size(d) - m->body_off;
    return m;
}

struct kt_delivery *kt_queue_delivery_new(struct kt_loop *loop, const char *qdir, const char *sender,
                                          const char *const *rcpts, size_t n, const struct kt_qprops *props,
                                          const char *hostname, unsigned worker_id, const char *queue_id)
{
    time_t arrival = time(NULL);
    /* the session stores bodies through the line-ending rule (smtp_parse.h): canonical */
    char *env = kt_queue_envelope(sender, rcpts, n, arrival, -1, 1, props);
    size_t len = strlen(env);
    if (len >= KT_DELIVERY_CHUNK) {
        kt_free(env);
        return NULL;
    }
    char *path = kt_asprintf("%s/", qdir);
    /* the queue is ours: written on the io_uring path, never by the delivery agent */
    struct kt_mailbox box = { .path = path, .uid = (unsigned)geteuid(), .gid = (unsigned)getegid() };
    struct kt_delivery *d = kt_delivery_new(loop, &box, 1, hostname, worker_id, queue_id);
    kt_free(path);
    kt_delivery_set_exact_name(d, queue_id);
    char *spare = spare_take(qdir);
    if (spare) {
        kt_delivery_reuse_file(d, spare);
        kt_free(spare);
    }
    kt_delivery_append(d, env, len);
    kt_free(env);
    /* the same envelope in memory, for the queue manager once the file is durable */
    struct kt_qmsg *m = kt_calloc(1, sizeof(*m));
    m->sender = kt_strdup(sender ? sender : "");
    m->arrival = arrival;
    m->dots = -1;
    m->canonical = 1;
    m->n_rcpts = n;
    m->rcpts = kt_calloc(n ? n : 1, sizeof(*m->rcpts));
    for (size_t i = 0; i < n; i++) {
        m->rcpts[i].addr = kt_strdup(rcpts[i]);
        if (props && props->notify)
            m->rcpts[i].notify = props->notify[i];
        if (props && props->orcpt && one_line(props->orcpt[i]))
            m->rcpts[i].orcpt = kt_strdup(props->orcpt[i]);
        if (props && props->orig_rcpt && one_line(props->orig_rcpt[i]) && strcmp(props->orig_rcpt[i], rcpts[i]))
            m->rcpts[i].orig_rcpt = kt_strdup(props->orig_rcpt[i]);
    }
    if (props) {
        m->smtputf8 = props->smtputf8;
        m->body = props->body;
        m->ret = props->ret;
        m->envid = one_line(props->envid) ? kt_strdup(props->envid) : NULL;
        m->filter = one_line(props->filter) ? kt_strdup(props->filter) : NULL;
    }
    m->body_off = (off_t)len;
    kt_delivery_set_user(d, m, qmsg_free_user);
    return d;
}
