/* One allocator front for all of ktrelay (jemalloc in normal builds).
 * Out of memory aborts: every client-controlled resource is bounded, so OOM
 * cannot be provoked from the network, and there is no sane recovery. */
#ifndef KTRELAY_ALLOC_H
#define KTRELAY_ALLOC_H

#include <stddef.h>

void *kt_malloc(size_t size);
void *kt_calloc(size_t count, size_t size);
void *kt_realloc(void *ptr, size_t size);
char *kt_strdup(const char *s);
char *kt_strndup(const char *s, size_t n);
/* printf into a fresh string */
char *kt_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2), nonnull(1)));
void kt_free(void *ptr);
/* In a child after fork(2): start jemalloc's background threads again (a forked child gets none, so the
 * dirty pages of a handshake burst stayed until the allocator was next busy, about 3 kB per idle session
 * more). Call after the child is confined: Landlock binds only threads created after it. No effect
 * without jemalloc (sanitizer builds). */
void kt_alloc_after_fork(void);

#endif
