/* Postfix-style log lines to syslog, maillog_file and stderr (see log.h).
 * Each destination gets one system call per line and nothing else: the pid
 * is read once per process (again in a forked child) and each thread keeps
 * the time stamps of the current second, so a line costs its formatting and
 * its writes. syslog is spoken directly (a datagram to /dev/log) rather than
 * through syslog(3): its ident is one process-wide string, and ktrelay's
 * threads log as different services. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

#define LINE_MAX_BYTES 2048
#define SYSLOG_PATH "/dev/log"

static char syslog_name[64] = "ktrelay";
static char process_service[32] = "smtpd";
static __thread const char *thread_service;
static int debug_on;

static int facility = LOG_MAIL;
static int use_stderr = 1;
static atomic_int syslog_fd = -1;       /* connected datagram socket, -1 = none */
static int syslog_wanted;
static atomic_long syslog_retry_at;      /* monotonic second of the next reconnect attempt */
static atomic_int maillog_fd = -1;
static char maillog_path[4096];
static char host_label[64] = "localhost";
static atomic_int log_pid;               /* this process's pid, 0 = not read yet (or just forked) */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* Time stamps of one second, per thread: localtime_r and strftime once a second, not once a line. */
struct stamp_cache {
    time_t sec;                          /* the second they show; 0 = none yet */
    char rfc3164[24];                    /* "Mmm dd hh:mm:ss " with a space-padded day, for syslog */
    char maillog[24];                    /* "Mmm dd hh:mm:ss " with a zero-padded day, as Postfix's maillog_file */
};
static __thread struct stamp_cache stamps;

static void forget_pid(void) { atomic_store(&log_pid, 0); }
static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_pid); }

/* getpid(2) is a system call on every line otherwise; a child made by fork() reads its own. */
static int line_pid(void)
{
    int pid = atomic_load_explicit(&log_pid, memory_order_relaxed);
    if (pid)
        return pid;
    pthread_once(&atfork_once, watch_forks);
    pid = (int)getpid();
    atomic_store_explicit(&log_pid, pid, memory_order_relaxed);
    return pid;
}

static const struct stamp_cache *line_stamps(void)
{
    time_t now = time(NULL);
    if (now != stamps.sec) {
        struct tm tm;
        localtime_r(&now, &tm);
        if (!strftime(stamps.rfc3164, sizeof(stamps.rfc3164), "%b %e %H:%M:%S ", &tm))
            stamps.rfc3164[0] = '\0';
        if (!strftime(stamps.maillog, sizeof(stamps.maillog), "%b %d %H:%M:%S ", &tm))
            stamps.maillog[0] = '\0';
        stamps.sec = now;
    }
    return &stamps;
}

void kt_log_set_program(const char *name)
{
    const char *slash = strrchr(name, '/');
    if (slash) {
        snprintf(syslog_name, sizeof(syslog_name), "%.*s", (int)(slash - name), name);
        name = slash + 1;
    }
    snprintf(process_service, sizeof(process_service), "%s", name);
}

void kt_log_set_service(const char *service) { thread_service = service; }
void kt_log_set_debug(int on) { debug_on = on; }

int kt_log_facility(const char *name)
{
    static const struct { const char *name; int code; } names[] = {
        { "auth", LOG_AUTH }, { "authpriv", LOG_AUTHPRIV }, { "cron", LOG_CRON }, { "daemon", LOG_DAEMON },
        { "ftp", LOG_FTP }, { "kern", LOG_KERN }, { "lpr", LOG_LPR }, { "mail", LOG_MAIL },
        { "news", LOG_NEWS }, { "syslog", LOG_SYSLOG }, { "user", LOG_USER }, { "uucp", LOG_UUCP },
        { "local0", LOG_LOCAL0 }, { "local1", LOG_LOCAL1 }, { "local2", LOG_LOCAL2 }, { "local3", LOG_LOCAL3 },
        { "local4", LOG_LOCAL4 }, { "local5", LOG_LOCAL5 }, { "local6", LOG_LOCAL6 }, { "local7", LOG_LOCAL7 },
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(names[i].name, name))
            return names[i].code;
    return -1;
}

int kt_log_prefix_allowed(const char *path, const char *prefixes)
{
    const char *p = prefixes;
    while (*p) {
        p += strspn(p, ", \t\r\n");
        size_t n = strcspn(p, ", \t\r\n");
        if (n && strncmp(path, p, n) == 0)
            return 1;
        p += n;
    }
    return 0;
}

static int connect_syslog(void)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", SYSLOG_PATH);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

static int open_maillog(const char *path)
{
    /* append only, never through a symlink (Postfix's safe_open() refuses them too) */
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0644);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode) && !S_ISFIFO(st.st_mode))) {
        close(fd);
        return -EINVAL;
    }
    return fd;
}

int kt_log_configure(const struct kt_log_config *cfg, char *err, size_t errlen)
{
    int newfd = -1, sfd = -1;
    if (cfg->maillog_file && *cfg->maillog_file) {
        newfd = open_maillog(cfg->maillog_file);
        if (newfd < 0) {
            kt_set_err(err, errlen, "open logfile '%s': %s", cfg->maillog_file, strerror(-newfd));
            return newfd;
        }
    } else if (cfg->use_syslog) {
        sfd = connect_syslog();   /* a missing syslog daemon is not fatal: retried while logging */
    }
    if (cfg->syslog_name && *cfg->syslog_name)
        snprintf(syslog_name, sizeof(syslog_name), "%s", cfg->syslog_name);
    if (cfg->hostname && *cfg->hostname)
        snprintf(host_label, sizeof(host_label), "%.*s", (int)strcspn(cfg->hostname, "."), cfg->hostname);
    facility = cfg->syslog_facility;
    use_stderr = cfg->use_stderr;
    syslog_wanted = !(cfg->maillog_file && *cfg->maillog_file) && cfg->use_syslog;
    snprintf(maillog_path, sizeof(maillog_path), "%s", newfd >= 0 ? cfg->maillog_file : "");
    int old = atomic_exchange(&maillog_fd, newfd);
    if (old >= 0)
        close(old);
    old = atomic_exchange(&syslog_fd, sfd);
    if (old >= 0)
        close(old);
    return 0;
}

int kt_log_reopen(void)
{
    if (!maillog_path[0])
        return 0;
    int fd = open_maillog(maillog_path);
    if (fd < 0)
        return fd;
    int old = atomic_exchange(&maillog_fd, fd);
    if (old >= 0)
        close(old);
    return 0;
}

static void send_syslog(int severity, const char *body, size_t len)
{
    char msg[LINE_MAX_BYTES + 64];
    int n = snprintf(msg, sizeof(msg), "<%d>%s", facility | severity, line_stamps()->rfc3164);
    if (len > sizeof(msg) - (size_t)n)
        len = sizeof(msg) - (size_t)n;
    memcpy(msg + n, body, len);
    int fd = atomic_load(&syslog_fd);
    if (fd < 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long retry = atomic_load(&syslog_retry_at);
        /* one reconnect attempt per 10 s, by whichever thread gets there first */
        if (ts.tv_sec < retry || !atomic_compare_exchange_strong(&syslog_retry_at, &retry, ts.tv_sec + 10))
            return;
        fd = connect_syslog();
        if (fd < 0)
            return;
        int expected = -1;
        if (!atomic_compare_exchange_strong(&syslog_fd, &expected, fd)) {
            close(fd);
            fd = expected;
        }
    }
    if (send(fd, msg, (size_t)n + len, MSG_NOSIGNAL) < 0 && (errno == ECONNREFUSED || errno == ENOTCONN)) {
        /* the syslog daemon restarted: drop the socket, reconnect later */
        int expected = fd;
        if (atomic_compare_exchange_strong(&syslog_fd, &expected, -1))
            close(fd);
    }
}

void kt_vlog_as(const char *service, enum kt_log_level level, const char *fmt, va_list ap)
{
    static const char *const prefix[] = { "error: ", "warning: ", "", "debug: " };
    static const int severity[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
    char line[LINE_MAX_BYTES + 128];
    const size_t stamp_room = 96;    /* "Mmm dd hh:mm:ss host " for maillog_file goes in front */
    char *body = line + stamp_room;
    const size_t cap = LINE_MAX_BYTES;

    if (level == KT_LOG_DEBUG && !debug_on)
        return;
    if (!service)
        service = thread_service ? thread_service : process_service;
    int n = snprintf(body, cap, "%s/%s[%d]: %s", syslog_name, service, line_pid(), prefix[level]);
    if (n < 0)
        return;
    size_t len = (size_t)n < cap ? (size_t)n : cap - 1;
    int m = vsnprintf(body + len, cap - len, fmt, ap);
    if (m < 0)
        return;
    len += (size_t)m;
    if (len > cap - 1)
        len = cap - 1;
    /* one line per message: a line end or other control character that came with a peer's text (a header
     * copied by a check, a reply) is shown as '?', as Postfix's printable() does in msg_output */
    for (size_t i = (size_t)n; i < len; i++)
        if (((unsigned char)body[i] < ' ' && body[i] != '\t') || body[i] == 127)
            body[i] = '?';
    body[len] = '\n';

    if (use_stderr && write(STDERR_FILENO, body, len + 1) < 0) { /* stderr gone: nowhere to report */ }
    int mfd = atomic_load(&maillog_fd);
    if (mfd >= 0) {
        char stamp[96];
        int sl = snprintf(stamp, sizeof(stamp), "%s%s ", line_stamps()->maillog, host_label);
        if (sl < 0)
            sl = 0;
        if ((size_t)sl >= sizeof(stamp))
            sl = (int)sizeof(stamp) - 1;
        memcpy(body - sl, stamp, (size_t)sl);
        if (write(mfd, body - sl, sl + len + 1) < 0) { /* a full disk loses log lines, never mail */ }
    }
    if (syslog_wanted)
        send_syslog(severity[level], body, len);
}

void kt_vlog(enum kt_log_level level, const char *fmt, va_list ap)
{
    kt_vlog_as(NULL, level, fmt, ap);
}

void kt_log(enum kt_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kt_vlog_as(NULL, level, fmt, ap);
    va_end(ap);
}

void kt_log_as(const char *service, enum kt_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kt_vlog_as(service, level, fmt, ap);
    va_end(ap);
}

void kt_log_limited(struct kt_log_limit *l, unsigned interval_s, enum kt_log_level level, const char *fmt, ...)
{
    long long now = (long long)time(NULL);
    long long next = __atomic_load_n(&l->next, __ATOMIC_RELAXED);
    char text[1536];
    va_list ap;

    if (now < next || !__atomic_compare_exchange_n(&l->next, &next, now + (long long)interval_s, 0,
                                                   __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        __atomic_add_fetch(&l->suppressed, 1, __ATOMIC_RELAXED);
        return;
    }
    unsigned long left_out = __atomic_exchange_n(&l->suppressed, 0, __ATOMIC_RELAXED);
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (left_out)
        kt_log(level, "%s (%lu similar messages suppressed in the last %u s)", text, left_out, interval_s);
    else
        kt_log(level, "%s", text);
}

void kt_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || !errlen)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}
