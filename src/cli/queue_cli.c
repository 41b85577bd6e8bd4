/* `ktrelay queue` (and mailq): queue inspection and control, working on the
 * queue files directly so it runs with or without a server. A running queue
 * manager hears of flush requests at once through public/qmgr
 * (kt_queue_notify); the flush request file also covers a queue manager that
 * starts later. Local submission (sendmail) is in sendmail.c. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/alloc.h"
#include "core/buf.h"
#include "conf/config.h"
#include "core/log.h"
#include "queue/queue.h"

static struct kt_config *load_config(const char *given, const char *prog)
{
    struct kt_config *cfg;
    const char *dir = kt_cli_config_dir_existing(given, prog);
    if (!dir)
        return NULL;
    if (kt_config_load(dir, &cfg) < 0)
        return NULL;
    if (kt_cli_as_queue_owner(cfg, prog) < 0) {
        kt_config_free(cfg);
        return NULL;
    }
    return cfg;
}

static void print_entry(const struct kt_qmsg *m, char mark)
{
    char date[64];
    struct tm tm;
    localtime_r(&m->arrival, &tm);
    strftime(date, sizeof(date), "%a %b %e %H:%M:%S", &tm);
    char idm[64];
    snprintf(idm, sizeof(idm), "%s%c", m->id, mark);
    printf("%-12s %8lld %s  %s\n", idm, (long long)m->body_len, date, m->sender[0] ? m->sender : "MAILER-DAEMON");
    for (size_t k = 0; k < m->n_rcpts; k++) {
        if (m->rcpts[k].state != KT_QR_PENDING)
            continue;
        /* like mailq: the recipient's last deferral reason above it */
        if (m->rcpts[k].reason)
            printf("%42s(%.200s)\n", "", m->rcpts[k].reason);
        printf("%42s %s\n", "", m->rcpts[k].addr);
    }
    printf("\n");
}

/* mailq's layout: "*" after the id marks a message not yet deferred (Postfix's
 * active queue), "!" one on hold; each pending recipient with its last
 * deferral reason. */
static int queue_list(const char *qdir)
{
    char **ids, **held;
    size_t n, nh, shown = 0;
    long long total = 0;
    int rc = kt_queue_list_ids(qdir, &ids, &n);
    if (rc < 0) {
        fprintf(stderr, "ktrelay queue: %s: %s\n", qdir, strerror(-rc));
        return rc == -EACCES ? EX_NOPERM : EX_OSERR;
    }
    if (kt_queue_list_held(qdir, &held, &nh) < 0) {
        held = NULL;
        nh = 0;
    }
    for (size_t i = 0; i < n + nh; i++) {
        struct kt_qmsg *m;
        int on_hold = i >= n;
        const char *id = on_hold ? held[i - n] : ids[i];
        if ((on_hold ? kt_queue_load_held(qdir, id, &m) : kt_queue_load(qdir, id, &m)) < 0)
            continue;
        if (kt_qmsg_finished(m)) {     /* done, being removed */
            kt_qmsg_free(m);
            continue;
        }
        if (!shown++)
            printf("-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n");
        print_entry(m, on_hold ? '!' : m->deferred ? ' ' : '*');
        total += m->body_len;
        kt_qmsg_free(m);
    }
    kt_queue_free_ids(ids, n);
    kt_queue_free_ids(held, nh);
    if (!shown)
        printf("Mail queue is empty\n");
    else
        printf("-- %lld Kbytes in %zu Request%s.\n", (total + 1023) / 1024, shown, shown == 1 ? "" : "s");
    return EX_OK;
}

static int queue_flush(const char *qdir)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/flush", qdir);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "ktrelay queue: cannot request a flush (%s): %s\n", path, strerror(errno));
        return errno == EACCES ? EX_NOPERM : EX_CANTCREAT;
    }
    close(fd);
    kt_queue_notify(qdir, NULL);
    return EX_OK;
}

static int exit_of(int rc)
{
    return rc == -ENOENT ? EX_NOINPUT : rc == -EACCES || rc == -EPERM ? EX_NOPERM : rc == -EINVAL ? EX_USAGE
                                                                                             : EX_OSERR;
}

/* postsuper -r: the message's pending recipients queued again under a new
 * id (arrival time kept), so they are tried at once with the current
 * configuration; the old id is removed. Held messages are released by it. */
static int requeue_one(const char *qdir, const char *id, char *newid, size_t newlen)
{
    struct kt_qmsg *m;
    int held = 0;
    int rc = kt_queue_load(qdir, id, &m);
    if (rc == -ENOENT) {
        rc = kt_queue_load_held(qdir, id, &m);
        held = 1;
    }
    if (rc < 0)
        return rc;
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s/%s", qdir, held ? "hold" : "new", id);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char *body = NULL;
    const char **rcpts = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*rcpts));
    size_t *idx = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*idx));
    unsigned *notify = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*notify));
    const char **orcpt = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*orcpt));
    const char **origs = kt_calloc(m->n_rcpts ? m->n_rcpts : 1, sizeof(*origs));
    struct kt_qprops props;
    size_t n = 0;
    if (fd < 0) {
        rc = -errno;
        goto out;
    }
    body = kt_malloc((size_t)m->body_len + 1);
    ssize_t got = pread(fd, body, (size_t)m->body_len, m->body_off);
    close(fd);
    if (got != (ssize_t)m->body_len) {
        rc = -EIO;
        goto out;
    }
    for (size_t k = 0; k < m->n_rcpts; k++)
        if (m->rcpts[k].state == KT_QR_PENDING) {
            idx[n] = k;
            rcpts[n++] = m->rcpts[k].addr;
        }
    newid[0] = '\0';
    if (n == 0) {
        rc = kt_queue_remove(qdir, id);
        goto out;
    }
    /* SMTPUTF8, BODY, the DSN parameters, the content filter and the original recipients go with the message */
    kt_qmsg_props(m, idx, n, notify, orcpt, origs, &props);
    rc = kt_queue_write_props(qdir, m->arrival, m->sender, rcpts, n, &props, body, (size_t)m->body_len, newid,
                              newlen);
    if (rc == 0)
        rc = kt_queue_remove(qdir, id);
out:
    kt_free(body);
    kt_free(rcpts);
    kt_free(idx);
    kt_free(notify);
    kt_free(orcpt);
    kt_free(origs);
    kt_qmsg_free(m);
    return rc;
}

/* delete, hold, release, requeue: one id or ALL (new/ and hold/ as fits). */
static int queue_each(const char *qdir, const char *verb, const char *id)
{
    char **ids = NULL;
    size_t n = 0;
    int all = !strcmp(id, "ALL");
    if (all) {
        int rc = !strcmp(verb, "release") ? kt_queue_list_held(qdir, &ids, &n) : kt_queue_list_ids(qdir, &ids, &n);
        if (rc < 0) {
            fprintf(stderr, "ktrelay queue: %s: %s\n", qdir, strerror(-rc));
            return exit_of(rc);
        }
        if (!strcmp(verb, "delete") || !strcmp(verb, "requeue")) {
            char **h;
            size_t nh;
            if (kt_queue_list_held(qdir, &h, &nh) == 0 && nh) {
                ids = kt_realloc(ids, (n + nh + 1) * sizeof(*ids));
                memcpy(ids + n, h, nh * sizeof(*h));
                n += nh;
                kt_free(h);
            }
        }
    } else {
        ids = kt_calloc(1, sizeof(*ids));
        ids[0] = kt_strdup(id);
        n = 1;
    }
    size_t done = 0;
    int status = EX_OK;
    for (size_t i = 0; i < n; i++) {
        int rc;
        char newid[KT_QUEUE_ID_MAX] = "";
        /* a running queue manager keeps the queue in memory: tell it */
        if (!strcmp(verb, "delete")) {
            if ((rc = kt_queue_remove(qdir, ids[i])) == 0)
                kt_queue_forget(qdir, ids[i], 'D');
        } else if (!strcmp(verb, "hold")) {
            if ((rc = kt_queue_hold(qdir, ids[i])) == 0)
                kt_queue_forget(qdir, ids[i], 'H');
        } else if (!strcmp(verb, "release")) {
            if ((rc = kt_queue_release(qdir, ids[i])) == 0)
                kt_queue_notify(qdir, ids[i]);
        } else if ((rc = requeue_one(qdir, ids[i], newid, sizeof(newid))) == 0) {
            kt_queue_forget(qdir, ids[i], newid[0] ? 'Q' : 'D');
            if (newid[0])
                kt_queue_notify(qdir, newid);
        }
        if (rc < 0) {
            if (!all || rc != -ENOENT) {
                fprintf(stderr, "ktrelay queue: %s: %s\n", ids[i],
                        rc == -ENOENT ? (!strcmp(verb, "release") ? "no such message on hold" : "no such message")
                                      : strerror(-rc));
                status = exit_of(rc);
            }
            continue;
        }
        done++;
        if (newid[0])
            printf("ktrelay queue: %s: requeued as %s\n", ids[i], newid);
        else
            printf("ktrelay queue: %s: %s\n", ids[i],
                   !strcmp(verb, "delete") ? "removed" : !strcmp(verb, "hold") ? "placed on hold"
                   : !strcmp(verb, "release") ? "released from hold" : "removed (nothing pending)");
    }
    if (all)
        printf("ktrelay queue: %s: %zu message%s\n",
               !strcmp(verb, "delete") ? "Deleted" : !strcmp(verb, "hold") ? "Placed on hold"
               : !strcmp(verb, "release") ? "Released from hold" : "Requeued", done, done == 1 ? "" : "s");
    kt_queue_free_ids(ids, n);
    return status;
}

/* postcat -q: the envelope, then the message as queued. */
static int queue_show(const char *qdir, const char *id)
{
    struct kt_qmsg *m;
    const char *where = "new";
    int rc = kt_queue_load(qdir, id, &m);
    if (rc == -ENOENT) {
        where = "hold";
        rc = kt_queue_load_held(qdir, id, &m);
    }
    if (rc < 0) {
        fprintf(stderr, "ktrelay queue: %s: %s\n", id, rc == -ENOENT ? "no such message" : strerror(-rc));
        return exit_of(rc);
    }
    char path[4096], date[64];
    struct tm tm;
    snprintf(path, sizeof(path), "%s/%s/%s", qdir, where, id);
    localtime_r(&m->arrival, &tm);
    strftime(date, sizeof(date), "%a %b %e %H:%M:%S %Y", &tm);
    printf("*** ENVELOPE RECORDS %s/%s ***\n", where, id);
    printf("message_size: %lld\n", (long long)m->body_len);
    printf("message_arrival_time: %s\n", date);
    printf("sender: %s\n", m->sender);
    if (m->filter)
        printf("content_filter: %s\n", m->filter);
    for (size_t k = 0; k < m->n_rcpts; k++) {
        const struct kt_qrcpt *r = &m->rcpts[k];
        if (r->orig_rcpt)
            printf("original_recipient: %s\n", r->orig_rcpt);
        printf("recipient: %s (%s)", r->addr, r->state == KT_QR_DONE ? "delivered" : r->state == KT_QR_FAILED
                                                                                  ? "failed" : "pending");
        if (r->reason)
            printf(" %s", r->reason);
        printf("\n");
    }
    printf("*** MESSAGE CONTENTS %s/%s ***\n", where, id);
    fflush(stdout);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        kt_qmsg_free(m);
        return exit_of(-errno);
    }
    char buf[65536];
    off_t off = m->body_off;
    ssize_t got;
    while ((got = pread(fd, buf, sizeof(buf), off)) > 0) {
        /* CRLF as stored becomes LF, as postcat shows it */
        size_t o = 0;
        for (ssize_t i = 0; i < got; i++)
            if (!(buf[i] == '\r' && i + 1 < got && buf[i + 1] == '\n'))
                buf[o++] = buf[i];
        fwrite(buf, 1, o, stdout);
        off += got;
    }
    close(fd);
    printf("*** MESSAGE FILE END %s/%s ***\n", where, id);
    kt_qmsg_free(m);
    return EX_OK;
}

/* The options of `ktrelay queue` and `ktrelay tlsrpt`, anywhere among the arguments (queue list -c DIR:
 * GNU getopt permutes): -c DIR into *dir, -v for debug logging. Leaves optind at the first operand;
 * returns 0, or -EINVAL on any other option (the caller prints its usage). */
static int dir_and_verbose(int argc, char **argv, const char **dir)
{
    int opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "c:v")) != -1) {
        if (opt == 'c')
            *dir = optarg;
        else if (opt == 'v')
            kt_log_set_debug(1);
        else
            return -EINVAL;
    }
    return 0;
}

int kt_queue_cli_queue(int argc, char **argv)
{
    const char *dir = NULL;
    char *args[3] = { NULL, NULL, NULL };
    int nargs = 0;
    if (dir_and_verbose(argc, argv, &dir) < 0)
        goto usage;
    for (int i = optind; i < argc; i++) {
        if (nargs == 2)
            goto usage;
        args[nargs++] = argv[i];
    }
    if (nargs == 0)
        goto usage;
    const char *sub = args[0];
    static const char *const with_id[] = { "delete", "hold", "release", "requeue", "show" };
    int needs_id = 0, known = !strcmp(sub, "list") || !strcmp(sub, "flush");
    for (size_t i = 0; i < sizeof(with_id) / sizeof(with_id[0]); i++)
        if (!strcmp(sub, with_id[i]))
            known = needs_id = 1;
    if (!known || needs_id != (nargs == 2))
        goto usage;
    struct kt_config *cfg = load_config(dir, "ktrelay queue");
    if (!cfg)
        return EX_CONFIG;
    const char *qdir = kt_config_get(cfg, NULL, "queue_directory");
    int rc;
    if (!strcmp(sub, "list"))
        rc = queue_list(qdir);
    else if (!strcmp(sub, "flush"))
        rc = queue_flush(qdir);
    else if (!strcmp(sub, "show"))
        rc = queue_show(qdir, args[1]);
    else
        rc = queue_each(qdir, sub, args[1]);
    kt_config_free(cfg);
    return rc;
usage:
    fprintf(stderr, "usage: ktrelay queue [-c DIR] list | flush | show ID | delete|hold|release|requeue ID|ALL\n");
    return EX_USAGE;
}

int kt_queue_cli_tlsrpt(int argc, char **argv)
{
    const char *dir = NULL;
    if (dir_and_verbose(argc, argv, &dir) < 0 || argc - optind != 1 || strcmp(argv[optind], "flush"))
        goto usage;
    struct kt_config *cfg = load_config(dir, "ktrelay tlsrpt");
    if (!cfg)
        return EX_CONFIG;
    const char *qdir = kt_config_get(cfg, NULL, "queue_directory");
    char path[4096];
    snprintf(path, sizeof(path), "%s/tlsrpt-flush", qdir);
    int rc = EX_OK, fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        fprintf(stderr, "ktrelay tlsrpt: cannot request the reports (%s): %s\n", path, strerror(errno));
        rc = errno == EACCES ? EX_NOPERM : EX_CANTCREAT;
    } else {
        close(fd);
        /* "R": the queue manager looks for the request file now (else within a second) */
        kt_queue_forget(qdir, "", 'R');
    }
    kt_config_free(cfg);
    return rc;
usage:
    fprintf(stderr, "usage: ktrelay tlsrpt [-c DIR] flush\n");
    return EX_USAGE;
}
