/* Postfix-style log lines on stderr, one write(2) per line. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"

static const char *program = "ktrelay";
static int debug_on;

void kt_log_set_program(const char *name) { program = name; }
void kt_log_set_debug(int on) { debug_on = on; }

void kt_vlog(enum kt_log_level level, const char *fmt, va_list ap)
{
    static const char *const prefix[] = { "error: ", "warning: ", "", "debug: " };
    char line[2048];

    if (level == KT_LOG_DEBUG && !debug_on)
        return;
    int n = snprintf(line, sizeof(line), "%s[%d]: %s", program, (int)getpid(), prefix[level]);
    if (n < 0)
        return;
    size_t len = (size_t)n;
    int m = vsnprintf(line + len, sizeof(line) - len - 1, fmt, ap);
    if (m < 0)
        return;
    len += (size_t)m;
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    if (write(STDERR_FILENO, line, len) < 0) { /* stderr gone: nowhere to report */ }
}

void kt_log(enum kt_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kt_vlog(level, fmt, ap);
    va_end(ap);
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
