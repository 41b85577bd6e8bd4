/* Logging in the manner of Postfix's maillog: every line is
 * "NAME/SERVICE[pid]: text" (NAME is syslog_name, "ktrelay"; SERVICE is the
 * Postfix program whose job the line reports: smtpd, cleanup, qmgr, smtp,
 * local, virtual, lmtp, bounce, pickup, ...), "warning: " or "error: " before
 * the text of those levels. Destinations, each optional:
 *   - syslog: a datagram to /dev/log with the syslog_facility priority and
 *     an RFC 3164 time stamp (what syslog(3) sends), so rsyslog or journald
 *     store it as they store Postfix's lines;
 *   - maillog_file (Postfix 3.4+): the same line with "Mmm dd hh:mm:ss host "
 *     in front, appended with one write(2) per line (O_APPEND); when it is
 *     set, syslog is not used, as in Postfix, where the two are exclusive;
 *   - stderr: the bare line, for `run` in the foreground and the tools.
 * Thread-safe: each line is formatted on the stack and written with one
 * system call per destination, so lines never interleave. The destinations
 * are set up before threads start; kt_log_reopen() may run at any time. */
#ifndef KTRELAY_LOG_H
#define KTRELAY_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum kt_log_level { KT_LOG_ERR, KT_LOG_WARN, KT_LOG_INFO, KT_LOG_DEBUG };

struct kt_log_config {
    const char *syslog_name;       /* "ktrelay"; NULL keeps the current one */
    int syslog_facility;           /* LOG_MAIL, ... (<syslog.h>) */
    int use_syslog;                /* send to /dev/log (ignored when maillog_file is set) */
    const char *maillog_file;      /* NULL or "" = none; "/dev/stdout" works */
    const char *hostname;          /* myhostname; its first label goes into maillog_file lines */
    int use_stderr;                /* bare lines on stderr as well */
};

/* The SERVICE for lines logged by this process (every thread without its own). */
void kt_log_set_program(const char *service);
/* The SERVICE for lines logged by the calling thread (NULL: the process's). */
void kt_log_set_service(const char *service);
void kt_log_set_debug(int on);
/* Switch destinations. Opens maillog_file (append, created 0644, never
 * through a symlink) and connects to /dev/log as asked; on failure the old
 * destinations stay and err says why. 0 or -errno. Call before threads start. */
int kt_log_configure(const struct kt_log_config *cfg, char *err, size_t errlen);
/* Reopen maillog_file after rotation (SIGHUP). 0 or -errno. */
int kt_log_reopen(void);
/* Postfix's syslog_facility names (mail, daemon, local0..local7, ...). -1 when unknown. */
int kt_log_facility(const char *name);
/* Postfix's maillog_file_prefixes rule: path starts with one of the prefixes
 * in the comma/space separated list. 1 or 0. */
int kt_log_prefix_allowed(const char *path, const char *prefixes);

void kt_log(enum kt_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kt_vlog(enum kt_log_level level, const char *fmt, va_list ap);
/* One line as another service ("virtual", "smtp", "bounce", ...). */
void kt_log_as(const char *service, enum kt_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void kt_vlog_as(const char *service, enum kt_log_level level, const char *fmt, va_list ap);

/* A message that can repeat fast (out of descriptors, a flood of the same failure): at most one line per
 * `interval_s` seconds per limiter, across threads; the next line that passes says how many were left
 * out. A limiter is a zeroed static struct kt_log_limit. */
struct kt_log_limit {
    long long next;            /* time() before which lines are suppressed */
    unsigned long suppressed;  /* lines left out since the last one written */
};
void kt_log_limited(struct kt_log_limit *l, unsigned interval_s, enum kt_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Format an error message into a caller's buffer (err may be NULL). */
void kt_set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4), nonnull(3)));

#define kt_err(...)   kt_log(KT_LOG_ERR, __VA_ARGS__)
#define kt_warn(...)  kt_log(KT_LOG_WARN, __VA_ARGS__)
#define kt_info(...)  kt_log(KT_LOG_INFO, __VA_ARGS__)
#define kt_debug(...) kt_log(KT_LOG_DEBUG, __VA_ARGS__)
#define kt_info_as(svc, ...) kt_log_as(svc, KT_LOG_INFO, __VA_ARGS__)

#endif
