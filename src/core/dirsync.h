/* Group commit for directory fsyncs. Many deliveries into one Maildir each
 * need new/ to be durable after their rename; one fsync that starts after a
 * rename covers every rename before it, so requests that arrive while an
 * fsync is running share the next one. Per thread (each worker has its own
 * ring); directory descriptors stay open in a small cache. */
#ifndef KTRELAY_DIRSYNC_H
#define KTRELAY_DIRSYNC_H

#include "core/loop.h"

struct kt_dirsync_waiter {
    struct kt_dirsync_waiter *next;
    void (*done)(struct kt_dirsync_waiter *w, int res);   /* res: 0 or -errno */
};

/* done() runs once an fsync of dir that began after this call completed. */
void kt_dirsync_request(struct kt_loop *loop, const char *dir, struct kt_dirsync_waiter *w);
/* Close this thread's cached directories (worker exit). */
void kt_dirsync_thread_cleanup(void);

#endif
