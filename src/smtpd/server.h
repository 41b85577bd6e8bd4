/* The server: listening sockets, one worker thread (and io_uring) per core,
 * signals (SIGTERM drains and exits, SIGHUP reloads the configuration). */
#ifndef KTRELAY_SERVER_H
#define KTRELAY_SERVER_H

#include <pthread.h>
#include <stdatomic.h>

#include "core/loop.h"
#include "conf/settings.h"

struct kt_session;
struct kt_server;

struct kt_listener {
    struct kt_op op;
    struct kt_worker *worker;
    int fd;
    size_t service;               /* index into the runtime's services */
};

struct kt_ktls_counters {         /* sessions whose direction went to the kernel */
    atomic_ulong tls12_tx, tls12_rx, tls13_tx, tls13_rx, sessions_tls, sessions_plain;
};

struct kt_worker {
    struct kt_loop loop;
    struct kt_server *server;
    unsigned id;
    pthread_t thread;
    struct kt_listener *listeners;
    size_t n_listeners;
    struct kt_op tick_op;
    struct __kernel_timespec tick_ts;
    int tick_armed;
    struct kt_session *sessions;  /* doubly linked */
    size_t n_sessions;
    int draining;
    struct kt_runtime *rt;        /* runtime new sessions start with */
};

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
/* Called by sessions */
void kt_worker_session_gone(struct kt_worker *w, struct kt_session *s);
struct kt_server *kt_server_of(struct kt_worker *w);

#endif
