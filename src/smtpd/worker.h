/* What an SMTP session may know of the worker thread that runs it: its
 * event loop, its id, its list of sessions (which session.c keeps) and the
 * process-wide kTLS counters. The server (server.c) fills it; sessions
 * (session.c) never call back into the server, so the two do not include
 * each other. */
#ifndef KTRELAY_WORKER_H
#define KTRELAY_WORKER_H

#include <pthread.h>
#include <stddef.h>
#include <time.h>

#include "core/loop.h"

struct kt_server;
struct kt_session;
struct kt_runtime;
struct kt_ktls_counters;
struct kt_dns;

struct kt_listener {
    struct kt_op op;
    struct kt_worker *worker;
    int fd;
    size_t service;               /* index into the runtime's services */
    int armed;                    /* an accept (multishot) is in the kernel */
    long long resume_ms;          /* paused after EMFILE/ENFILE until this CLOCK_MONOTONIC time; 0 = not */
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
    struct kt_session *sessions;  /* doubly linked, kept by session.c */
    size_t n_sessions;
    int draining;
    struct kt_runtime *rt;        /* runtime new sessions start with */
    struct kt_ktls_counters *ktls; /* the server's, counted by the connections */
    struct kt_dns *dns;           /* c-ares on this loop for client checks; NULL if it failed */
};

#endif
