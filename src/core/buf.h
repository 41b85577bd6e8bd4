/* Growable byte buffer with a read offset: append at the end, consume from the front. */
#ifndef KTRELAY_BUF_H
#define KTRELAY_BUF_H

#include <stddef.h>

struct kt_buf {
    char *data;
    size_t off;   /* first unconsumed byte */
    size_t len;   /* end of valid bytes */
    size_t cap;
};

void kt_buf_reserve(struct kt_buf *b, size_t extra);   /* room for extra bytes after len */
void kt_buf_append(struct kt_buf *b, const void *p, size_t n);
void kt_buf_printf(struct kt_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3), nonnull(2)));
void kt_buf_consume(struct kt_buf *b, size_t n);
void kt_buf_compact(struct kt_buf *b);                  /* move unconsumed bytes to the front */
void kt_buf_reset(struct kt_buf *b);
void kt_buf_release(struct kt_buf *b);                  /* free the memory */

static inline size_t kt_buf_used(const struct kt_buf *b) { return b->len - b->off; }
static inline char *kt_buf_head(const struct kt_buf *b) { return b->data + b->off; }

#endif
