/* The worker process of one generation: one thread (and io_uring) per core
 * accepting on listening sockets that the master opened, the sessions, and
 * the queue manager. It runs as mail_owner; the master (master/master.c)
 * starts it, and signals it: SIGTERM/SIGINT drain and exit, SIGQUIT retires
 * the generation after a reload (stop accepting, hand the queue manager over
 * to the next generation, let running sessions finish). */
#ifndef KTRELAY_SERVER_H
#define KTRELAY_SERVER_H

#include <pthread.h>
#include <stdatomic.h>

#include "core/loop.h"
#include "conf/settings.h"
#include "smtpd/worker.h"
#include "tls/ktls.h"

struct kt_qmgr;

struct kt_server {
    struct kt_worker *workers;
    unsigned n_workers;
    struct kt_runtime *rt;        /* this generation's configuration */
    unsigned generation;          /* 1 at start, +1 per reload */
    atomic_int stopping;          /* SIGTERM: stop accepting, drain */
    atomic_int retiring;          /* SIGQUIT: stop accepting, sessions run to their end */
    atomic_uint threads_done;
    time_t drain_deadline;
    struct kt_ktls_counters ktls;
    /* the queue manager, once this generation holds queue_directory/qmgr.lock */
    struct kt_qmgr *qmgr;
    int qmgr_lock;
    pthread_t qmgr_thread;
    int qmgr_waiting;
    atomic_int qmgr_cancel;
    pthread_mutex_t qmgr_mu;
    int metrics;                  /* serving ktrelay_metrics_address */
};

/* Listening sockets for every address of every smtpd service, one socket per
 * worker thread and address (SO_REUSEPORT), opened by the master (binding
 * port 25 needs root). fds[w * n_addrs + a]; services[a] indexes rt->services. */
struct kt_listen_set {
    unsigned n_workers;
    size_t n_addrs;
    int *fds;
    size_t *services;
};

/* Resolve RT's listening addresses as kt_listen_open does and check that no two services (or one service
 * twice) would listen on the same address and port, or on a port another listens on for the wildcard
 * address: Postfix's master fails to bind such a configuration. Binds nothing. Returns the number of
 * problems, each logged with its master.cf line (0: fine). */
int kt_listen_check(const struct kt_runtime *rt);
/* Open (and log) the listeners of RT's services. 0 or -errno, errors logged (overlapping services too).
 * exclusive (the first generation): each address must be free, not held by another process with
 * SO_REUSEPORT either (-EADDRINUSE); a reload's generation binds beside the one it replaces. */
int kt_listen_open(const struct kt_runtime *rt, struct kt_listen_set *ls, int exclusive);
/* Close every socket still open and free the set. */
void kt_listen_close(struct kt_listen_set *ls);

/* Body of a worker process: serve LS with RT until SIGTERM/SIGINT, or after
 * SIGQUIT until the last session ended. Writes 'R' to STATUS_FD once serving
 * and 'C' once its listeners are shut after SIGQUIT (-1: nobody to tell).
 * Takes the listening sockets (closes them at the end). Returns the exit
 * code: 0, or a sysexits(3) code for a start-up failure (EX_OSERR: io_uring,
 * EX_UNAVAILABLE: anything else), after logging what to do. */
int kt_server_run(struct kt_runtime *rt, const struct kt_listen_set *ls, unsigned generation, int status_fd);
/* Called by sessions */
void kt_worker_session_gone(struct kt_worker *w, struct kt_session *s);
struct kt_server *kt_server_of(struct kt_worker *w);

#endif
