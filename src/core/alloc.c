/* Allocation wrappers: jemalloc underneath (linked as the process malloc),
 * abort on out-of-memory. */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/alloc.h"

static void __attribute__((noreturn)) out_of_memory(size_t size)
{
    char msg[96];
    int n = snprintf(msg, sizeof(msg), "ktrelay: fatal: out of memory allocating %zu bytes\n", size);
    if (n > 0 && write(STDERR_FILENO, msg, (size_t)n) < 0) { /* nothing more to do */ }
    abort();
}

/* jemalloc's mallctl(3) when jemalloc is the process's malloc; weak, since the unit tests and the sanitizer
 * builds link without it. */
extern int mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen) __attribute__((weak));

void kt_alloc_after_fork(void)
{
    bool on = true;
    if (mallctl)
        (void)mallctl("background_thread", NULL, NULL, &on, sizeof(on));
}

void *kt_malloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (!p)
        out_of_memory(size);
    return p;
}

void *kt_calloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        out_of_memory(count * size);
    return p;
}

void *kt_realloc(void *ptr, size_t size)
{
    void *p = realloc(ptr, size ? size : 1);
    if (!p)
        out_of_memory(size);
    return p;
}

char *kt_strdup(const char *s)
{
    return kt_strndup(s, strlen(s));
}

char *kt_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *p = kt_malloc(len + 1);
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

char *kt_asprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char probe;
    int n = vsnprintf(&probe, 1, fmt, ap);  /* length only */
    va_end(ap);
    if (n < 0)
        out_of_memory(0);
    char *p = kt_malloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return p;
}

void kt_free(void *ptr)
{
    free(ptr);
}
