/* Byte buffers for session input/output. Consumed bytes are reclaimed by
 * compaction, not per consume, so pipelined input costs one memmove per read. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/buf.h"

void kt_buf_reserve(struct kt_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return;
    if (b->off > 0 && b->cap - kt_buf_used(b) >= extra) {
        kt_buf_compact(b);
        return;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap - kt_buf_used(b) < extra)
        cap *= 2;
    kt_buf_compact(b);
    b->data = kt_realloc(b->data, cap);
    b->cap = cap;
}

void kt_buf_append(struct kt_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;   /* p may be NULL then (an empty buffer's data): memcpy must not see it */
    kt_buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void kt_buf_printf(struct kt_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char probe;
    int n = vsnprintf(&probe, 1, fmt, ap);  /* length only */
    va_end(ap);
    if (n <= 0)
        return;
    kt_buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void kt_buf_consume(struct kt_buf *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len)
        b->off = b->len = 0;
}

void kt_buf_compact(struct kt_buf *b)
{
    if (b->off == 0)
        return;
    size_t used = kt_buf_used(b);
    memmove(b->data, b->data + b->off, used);
    b->off = 0;
    b->len = used;
}

void kt_buf_reset(struct kt_buf *b)
{
    b->off = b->len = 0;
}

void kt_buf_release(struct kt_buf *b)
{
    kt_free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
}
