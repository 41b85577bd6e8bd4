/* Logging in the style of Postfix's maillog: "ktrelay/smtpd[pid]: text".
 * Lines go to stderr in one write(2) each so threads never interleave. */
#ifndef KTRELAY_LOG_H
#define KTRELAY_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum kt_log_level { KT_LOG_ERR, KT_LOG_WARN, KT_LOG_INFO, KT_LOG_DEBUG };

void kt_log_set_program(const char *name);      /* "ktrelay/smtpd" part */
void kt_log_set_debug(int on);
void kt_log(enum kt_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kt_vlog(enum kt_log_level level, const char *fmt, va_list ap);

/* Format an error message into a caller's buffer (err may be NULL). */
void kt_set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4), nonnull(3)));

#define kt_err(...)   kt_log(KT_LOG_ERR, __VA_ARGS__)
#define kt_warn(...)  kt_log(KT_LOG_WARN, __VA_ARGS__)
#define kt_info(...)  kt_log(KT_LOG_INFO, __VA_ARGS__)
#define kt_debug(...) kt_log(KT_LOG_DEBUG, __VA_ARGS__)

#endif
