/* Directory fsync group commit (see dirsync.h).
 *
 * Each cached directory has at most one fsync in flight. Waiters that came
 * before it was submitted are in `current`; later ones wait in `next` and get
 * a fresh fsync when the running one completes, because an fsync already
 * running may not include a rename made after it started. Opening a cached
 * directory is a plain open(2): it happens once per directory per thread. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/dirsync.h"

#define CACHE_MAX 256

struct dirsync {
    struct kt_op op;
    struct kt_loop *loop;
    char *path;
    int fd;
    int in_flight;
    unsigned long last_use;
    struct kt_dirsync_waiter *current, *next;
};

static __thread struct dirsync **cache;
static __thread size_t n_cache;
static __thread unsigned long use_clock;

static void dirsync_done(struct kt_op *op, int res, unsigned flags);

static void dirsync_submit(struct dirsync *ds)
{
    ds->current = ds->next;
    ds->next = NULL;
    ds->in_flight = 1;
    struct io_uring_sqe *sqe = kt_loop_sqe(ds->loop, &ds->op);
    io_uring_prep_fsync(sqe, ds->fd, 0);
}

static void dirsync_done(struct kt_op *op, int res, unsigned flags)
{
    struct dirsync *ds = (struct dirsync *)op;
    struct kt_dirsync_waiter *w = ds->current;
    ds->current = NULL;
    ds->in_flight = 0;
    if (ds->next)
        dirsync_submit(ds);
    while (w) {
        struct kt_dirsync_waiter *nw = w->next;
        w->done(w, res);
        w = nw;
    }
}

static void dirsync_free(struct dirsync *ds)
{
    close(ds->fd);
    kt_free(ds->path);
    kt_free(ds);
}

/* Drop the least recently used idle directory when the cache is full. */
static void cache_evict(void)
{
    size_t victim = n_cache;
    for (size_t i = 0; i < n_cache; i++) {
        struct dirsync *ds = cache[i];
        if (ds->in_flight || ds->next)
            continue;
        if (victim == n_cache || ds->last_use < cache[victim]->last_use)
            victim = i;
    }
    if (victim == n_cache)
        return;
    dirsync_free(cache[victim]);
    cache[victim] = cache[--n_cache];
}

static struct dirsync *cache_get(struct kt_loop *loop, const char *dir, int *err)
{
    for (size_t i = 0; i < n_cache; i++)
        if (cache[i]->loop == loop && strcmp(cache[i]->path, dir) == 0)
            return cache[i];
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *err = -errno;
        return NULL;
    }
    if (n_cache >= CACHE_MAX)
        cache_evict();
    struct dirsync *ds = kt_calloc(1, sizeof(*ds));
    ds->op.cb = dirsync_done;
    ds->loop = loop;
    ds->path = kt_strdup(dir);
    ds->fd = fd;
    cache = kt_realloc(cache, (n_cache + 1) * sizeof(*cache));
    cache[n_cache++] = ds;
    return ds;
}

void kt_dirsync_request(struct kt_loop *loop, const char *dir, struct kt_dirsync_waiter *w)
{
    int err = 0;
    struct dirsync *ds = cache_get(loop, dir, &err);
    if (!ds) {
        w->done(w, err);
        return;
    }
    ds->last_use = ++use_clock;
    w->next = ds->next;
    ds->next = w;
    if (!ds->in_flight)
        dirsync_submit(ds);
}

void kt_dirsync_thread_cleanup(void)
{
    for (size_t i = 0; i < n_cache; i++)
        dirsync_free(cache[i]);
    kt_free(cache);
    cache = NULL;
    n_cache = 0;
}
