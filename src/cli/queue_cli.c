/* `ktrelay queue` (and mailq): queue inspection and control, working on the
 * queue files directly so it runs with or without a server. A running queue
 * manager hears of flush requests at once through public/qmgr
 * (kt_queue_notify); the flush request file also covers a queue manager that
 * starts later. Local submission (sendmail) is in sendmail.c. */
#include <errno.h>
#include <fcntl.h>
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
    return cfg;
}

static int queue_list(const char *qdir)
{
    char **ids;
    size_t n, shown = 0;
    long long total = 0;
    int rc = kt_queue_list_ids(qdir, &ids, &n);
    if (rc < 0) {
        fprintf(stderr, "ktrelay queue: %s: %s\n", qdir, strerror(-rc));
        return rc == -EACCES ? EX_NOPERM : EX_OSERR;
    }
    for (size_t i = 0; i < n; i++) {
        struct kt_qmsg *m;
        char date[64];
        if (kt_queue_load(qdir, ids[i], &m) < 0)
            continue;
        if (!shown++)
            printf("-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n");
        struct tm tm;
        localtime_r(&m->arrival, &tm);
        strftime(date, sizeof(date), "%a %b %e %H:%M:%S", &tm);
        printf("%-11s %8lld %s  %s\n", m->id, (long long)m->body_len, date, m->sender[0] ? m->sender : "MAILER-DAEMON");
        for (size_t k = 0; k < m->n_rcpts; k++)
            if (m->rcpts[k].state == KT_QR_PENDING)
                printf("%42s %s\n", "", m->rcpts[k].addr);
        printf("\n");
        total += m->body_len;
        kt_qmsg_free(m);
    }
    kt_queue_free_ids(ids, n);
    if (!shown)
        printf("Mail queue is empty\n");
    else
        printf("-- %lld Kbytes in %zu Request%s.\n", (total + 1023) / 1024, shown, shown == 1 ? "" : "s");
    return 0;
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
    return 0;
}

static int queue_delete(const char *qdir, const char *id)
{
    if (!strcmp(id, "ALL")) {
        char **ids;
        size_t n;
        int rc = kt_queue_list_ids(qdir, &ids, &n);
        if (rc < 0) {
            fprintf(stderr, "ktrelay queue: %s: %s\n", qdir, strerror(-rc));
            return rc == -EACCES ? EX_NOPERM : EX_OSERR;
        }
        for (size_t i = 0; i < n; i++)
            if (kt_queue_remove(qdir, ids[i]) == 0)
                printf("ktrelay queue: %s: removed\n", ids[i]);
        printf("ktrelay queue: Deleted: %zu message%s\n", n, n == 1 ? "" : "s");
        kt_queue_free_ids(ids, n);
        return 0;
    }
    int rc = kt_queue_remove(qdir, id);
    if (rc < 0) {
        fprintf(stderr, "ktrelay queue: %s: %s\n", id, rc == -ENOENT ? "no such message" : strerror(-rc));
        return rc == -ENOENT ? EX_NOINPUT : rc == -EACCES ? EX_NOPERM : EX_OSERR;
    }
    printf("ktrelay queue: %s: removed\n", id);
    return 0;
}

int kt_queue_cli_queue(int argc, char **argv)
{
    const char *dir = NULL;
    char *args[3] = { NULL, NULL, NULL };
    int opt, nargs = 0;
    /* options anywhere (queue list -c DIR): GNU getopt permutes */
    optind = 0;
    while ((opt = getopt(argc, argv, "c:v")) != -1) {
        if (opt == 'c')
            dir = optarg;
        else if (opt == 'v')
            kt_log_set_debug(1);
        else
            goto usage;
    }
    for (int i = optind; i < argc; i++) {
        if (nargs == 2)
            goto usage;
        args[nargs++] = argv[i];
    }
    if (nargs == 0)
        goto usage;
    const char *sub = args[0];
    if (strcmp(sub, "list") && strcmp(sub, "flush") && strcmp(sub, "delete"))
        goto usage;
    if ((!strcmp(sub, "delete")) != (nargs == 2))
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
    else
        rc = queue_delete(qdir, args[1]);
    kt_config_free(cfg);
    return rc;
usage:
    fprintf(stderr, "usage: ktrelay queue [-c DIR] list | flush | delete ID|ALL\n");
    return EX_USAGE;
}
