/* Logging in the style of Postfix's maillog: "ktrelay/smtpd[pid]: text".
 * Lines go to stderr in one write(2) each so threads never interleave. */
#ifndef KTRELAY_LOG_H
#define KTRELAY_LOG_H

#include <stdarg.h>

enum kt_log_level { KT_LOG_ERR, KT_LOG_WARN, KT_LOG_INFO, KT_LOG_DEBUG };

void kt_log_set_program(const char *name);      /* "ktrelay/smtpd" part */
void kt_log_set_debug(int on);
void kt_log(enum kt_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kt_vlog(enum kt_log_level level, const char *fmt, va_list ap);

#define kt_err(...)   kt_log(KT_LOG_ERR, __VA_ARGS__)
#define kt_warn(...)  kt_log(KT_LOG_WARN, __VA_ARGS__)
#define kt_info(...)  kt_log(KT_LOG_INFO, __VA_ARGS__)
#define kt_debug(...) kt_log(KT_LOG_DEBUG, __VA_ARGS__)

#endif
