/* The server: listening sockets, one worker thread (and io_uring) per core,
 * signals (SIGTERM drains and exits, SIGHUP reloads the configuration). */
#ifndef KTRELAY_SERVER_H
#define KTRELAY_SERVER_H

#include <pthread.h>
#include <stdatomic.h>

#include "core/loop.h"
#include "conf/settings.h"
#include "smtpd/worker.h"
#include "tls/ktls.h"

struct kt_server {
    struct kt_worker *workers;
    unsigned n_workers;
    _Atomic(struct kt_runtime *) rt;
    atomic_int stopping;          /* SIGTERM: stop accepting, drain */
    atomic_uint generation;       /* bumped on reload */
    time_t drain_deadline;
    const char *config_dir;
    struct kt_ktls_counters ktls;
};

/* Run until SIGTERM/SIGINT; returns the process exit code: 0, or a sysexits(3)
 * code for a start-up failure (EX_NOPERM: a port needs privileges, EX_OSERR:
 * io_uring, EX_UNAVAILABLE: anything else), after logging what to do. */
int kt_server_run(struct kt_runtime *rt, const char *config_dir);

#endif
