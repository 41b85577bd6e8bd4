/* `ktrelay sendmail` and `ktrelay queue`: local injection and queue
 * inspection, working on the queue files directly so they run with or
 * without a server. A running queue manager hears of injected messages and
 * flush requests at once through public/qmgr (kt_queue_notify); the flush
 * request file also covers a queue manager that starts later. */
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

/* Bare LF or CRLF in, CRLF out; without ignore_dots a line with a single
 * "." ends the message, as with sendmail(1) without -i. */
static void read_message(struct kt_buf *out, int ignore_dots)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, stdin)) > 0) {
        size_t len = (size_t)n;
        if (line[len - 1] == '\n')
            len--;
        if (len > 0 && line[len - 1] == '\r')
            len--;
        if (!ignore_dots && len == 1 && line[0] == '.')
            break;
        kt_buf_append(out, line, len);
        kt_buf_append(out, "\r\n", 2);
    }
    free(line);
}

int kt_queue_cli_sendmail(int argc, char **argv)
{
    const char *dir = NULL, *sender = NULL;
    int ignore_dots = 0, opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "c:f:io:tv")) != -1) {
        switch (opt) {
        case 'c': dir = optarg; break;
        case 'f': sender = optarg; break;
        case 'i': ignore_dots = 1; break;
        case 'o': if (!strcmp(optarg, "i")) ignore_dots = 1; break;
        case 'v': kt_log_set_debug(1); break;
        case 't':
            fprintf(stderr, "ktrelay sendmail: -t is not supported; give the recipients as arguments\n");
            return EX_USAGE;
        default:
            fprintf(stderr, "usage: ktrelay sendmail [-c DIR] [-f sender] [-i] recipient...\n");
            return EX_USAGE;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "ktrelay sendmail: no recipients given\n");
        return EX_USAGE;
    }
    struct kt_config *cfg = load_config(dir, "sendmail");
    if (!cfg)
        return EX_CONFIG;
    const char *qdir = kt_config_get(cfg, NULL, "queue_directory");
    const char *host = kt_config_get(cfg, NULL, "myhostname");
    const char *origin = kt_config_get(cfg, NULL, "myorigin");
    char *from;
    if (!sender) {
        struct passwd *pw = getpwuid(getuid());
        from = kt_asprintf("%s@%s", pw ? pw->pw_name : "nobody", origin && *origin ? origin : host);
    } else if (!strcmp(sender, "<>")) {
        from = kt_strdup("");
    } else {
        size_t l = strlen(sender);
        from = (sender[0] == '<' && l >= 2 && sender[l - 1] == '>') ? kt_strndup(sender + 1, l - 2) : kt_strdup(sender);
    }
    char id[KT_QUEUE_ID_MAX] = "", date[64];
    kt_queue_new_id(id, sizeof(id));
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
    struct kt_buf msg = { 0 };
    kt_buf_printf(&msg, "Received: by %s (ktrelay, from userid %u)\r\n\tid %s; %s\r\n", host, (unsigned)getuid(),
                  id, date);
    read_message(&msg, ignore_dots);
    int rc = kt_queue_write(qdir, from, (const char *const *)&argv[optind], (size_t)(argc - optind),
                            msg.data, kt_buf_used(&msg), id, sizeof(id));
    if (rc < 0) {
        fprintf(stderr, "ktrelay sendmail: cannot queue the message in %s: %s\n", qdir, strerror(-rc));
    } else {
        kt_info("%s: from=<%s>, size=%zu, nrcpt=%d (queue active)", id, from, kt_buf_used(&msg), argc - optind);
        kt_queue_notify(qdir, id);
    }
    kt_buf_release(&msg);
    kt_free(from);
    kt_config_free(cfg);
    return rc < 0 ? (rc == -EACCES || rc == -EPERM ? EX_NOPERM : EX_TEMPFAIL) : EX_OK;
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
