/* Listening sockets, worker threads and signals.
 *
 * Each worker owns an io_uring and, for every listening address, its own
 * SO_REUSEPORT socket with a multishot accept: the kernel spreads connections
 * over the workers and no lock is shared on the accept path. The main thread
 * only waits for signals: SIGHUP builds a new runtime that workers adopt at
 * their next tick (sessions keep the one they started with); SIGTERM stops
 * accepting, lets sessions finish up to a deadline, then exits 0. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "kt_build.h"
#include "core/alloc.h"
#include "conf/config.h"
#include "core/dirsync.h"
#include "tls/ktls.h"
#include "core/notify.h"
#include "core/log.h"
#include "queue/dns.h"
#include "queue/qmgr.h"
#include "smtpd/server.h"
#include "smtpd/session.h"

#define TICK_MS 200
#define DRAIN_SECONDS 10
#define RING_ENTRIES 2048

struct bind_addr {
    struct sockaddr_storage ss;
    socklen_t len;
    size_t service;
    char text[80];
};

static void tick_arm(struct kt_worker *w);

/* ---- addresses ---- */

static int add_addr(struct bind_addr **list, size_t *n, const char *host, int port, size_t service)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *res, *ai;
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        kt_err("cannot resolve listen address %s: %s", host ? host : "*", gai_strerror(rc));
        return -EINVAL;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        *list = kt_realloc(*list, (*n + 1) * sizeof(**list));
        struct bind_addr *b = &(*list)[*n];
        memset(b, 0, sizeof(*b));
        memcpy(&b->ss, ai->ai_addr, ai->ai_addrlen);
        b->len = ai->ai_addrlen;
        b->service = service;
        char h[INET6_ADDRSTRLEN] = "?";
        if (ai->ai_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)ai->ai_addr)->sin_addr, h, sizeof(h));
        else
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr, h, sizeof(h));
        snprintf(b->text, sizeof(b->text), ai->ai_family == AF_INET6 ? "[%s]:%d" : "%s:%d", h, port);
        (*n)++;
    }
    freeaddrinfo(res);
    return 0;
}

/* inet_interfaces / inet_protocols, like Postfix: "all", "loopback-only", or a list. */
static int service_addrs(const struct kt_runtime *rt, size_t i, struct bind_addr **list, size_t *n)
{
    const struct kt_service *svc = kt_config_service(rt->cfg, i);
    const char *ifs = kt_config_get(rt->cfg, svc, "inet_interfaces");
    const char *protos = kt_config_get(rt->cfg, svc, "inet_protocols");
    int v4 = !protos || strstr(protos, "all") || strstr(protos, "ipv4");
    int v6 = !protos || strstr(protos, "all") || strstr(protos, "ipv6");

    if (svc->host)
        return add_addr(list, n, svc->host, svc->port, i);
    if (!ifs || !strcasecmp(ifs, "all")) {
        int rc = 0;
        if (v4)
            rc |= add_addr(list, n, "0.0.0.0", svc->port, i);
        if (v6)
            rc |= add_addr(list, n, "::", svc->port, i);
        return rc;
    }
    if (!strcasecmp(ifs, "loopback-only")) {
        int rc = 0;
        if (v4)
            rc |= add_addr(list, n, "127.0.0.1", svc->port, i);
        if (v6)
            rc |= add_addr(list, n, "::1", svc->port, i);
        return rc;
    }
    char *copy = kt_strdup(ifs), *save = NULL;
    int rc = 0;
    for (char *tok = strtok_r(copy, ", \t\n", &save); tok; tok = strtok_r(NULL, ", \t\n", &save)) {
        size_t len = strlen(tok);
        if (tok[0] == '[' && tok[len - 1] == ']') {
            tok[len - 1] = '\0';
            tok++;
        }
        rc |= add_addr(list, n, tok, svc->port, i);
    }
    kt_free(copy);
    return rc;
}

static int open_listener(const struct bind_addr *b)
{
    int fd = socket(b->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        return -errno;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (b->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&b->ss, b->len) < 0 || listen(fd, 4096) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

/* ---- worker ---- */

static void accept_arm(struct kt_listener *l)
{
    struct io_uring_sqe *sqe = kt_loop_sqe(&l->worker->loop, &l->op);
    io_uring_prep_multishot_accept(sqe, l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

static void accept_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_listener *l = (struct kt_listener *)op;
    struct kt_worker *w = l->worker;

    if (res >= 0) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        if (w->draining || getpeername(res, (struct sockaddr *)&ss, &len) < 0) {
            close(res);
        } else {
            kt_session_start(w, res, (struct sockaddr *)&ss, len, w->rt, &w->rt->services[l->service]);
        }
    } else if (!w->draining && res != -ECANCELED && res != -EAGAIN && res != -EINTR && res != -ECONNABORTED) {
        kt_warn("accept: %s", strerror(-res));
    }
    if (!(flags & IORING_CQE_F_MORE) && !w->draining && l->fd >= 0)
        accept_arm(l);
}

static void worker_adopt_runtime(struct kt_worker *w)
{
    struct kt_runtime *rt = atomic_load(&w->server->rt);
    if (rt == w->rt)
        return;
    if (rt->n_services != w->rt->n_services) {
        return;   /* refused by the reload; listeners map services by index */
    }
    kt_runtime_ref(rt);
    kt_runtime_unref(w->rt);
    w->rt = rt;
}

static void worker_begin_drain(struct kt_worker *w)
{
    w->draining = 1;
    for (size_t i = 0; i < w->n_listeners; i++) {
        if (w->listeners[i].fd >= 0) {
            /* Stop listening at once: the kernel would otherwise complete
             * handshakes into a backlog nobody accepts from, and clients would
             * wait there until exit instead of being refused. */
            shutdown(w->listeners[i].fd, SHUT_RDWR);
            struct io_uring_sqe *sqe = kt_loop_sqe(&w->loop, NULL);
            io_uring_prep_cancel_fd(sqe, w->listeners[i].fd, IORING_ASYNC_CANCEL_ALL);
        }
    }
}

static void tick_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_worker *w = (struct kt_worker *)((char *)op - offsetof(struct kt_worker, tick_op));
    time_t now = time(NULL);
    struct kt_server *srv = w->server;

    w->tick_armed = 0;
    kt_dns_tick(w->dns);
    worker_adopt_runtime(w);
    if (atomic_load(&srv->stopping) && !w->draining)
        worker_begin_drain(w);
    /* the list may change under us: sessions can free themselves */
    struct kt_session *s = w->sessions, *next;
    for (; s; s = next) {
        next = s->next;
        if (w->draining) {
            if (now >= srv->drain_deadline) {
                kt_session_abort(s);
            } else if (!s->txn) {
                kt_session_shutdown(s);
            }
        } else if (s->deadline && now >= s->deadline) {
            kt_session_timeout(s);
        }
    }
    if (w->draining && w->n_sessions == 0) {
        w->loop.stop = 1;
        return;
    }
    tick_arm(w);
}

static void tick_arm(struct kt_worker *w)
{
    if (w->tick_armed)
        return;
    w->tick_armed = 1;
    w->tick_ts.tv_sec = 0;
    w->tick_ts.tv_nsec = TICK_MS * 1000000LL;
    struct io_uring_sqe *sqe = kt_loop_sqe(&w->loop, &w->tick_op);
    io_uring_prep_timeout(sqe, &w->tick_ts, 0, 0);
}

static void *worker_main(void *arg)
{
    struct kt_worker *w = arg;
    char name[16];
    snprintf(name, sizeof(name), "ktrelay-w%u", w->id);
    pthread_setname_np(pthread_self(), name);
    kt_log_set_service("smtpd");
    for (size_t i = 0; i < w->n_listeners; i++)
        accept_arm(&w->listeners[i]);
    /* client checks wait for DNS at most about 4.5 s (1.5 s, then 3 s) */
    int drc = kt_dns_new_opts(&w->loop, w->rt->qmgr.dns_servers, 1500, 2, &w->dns);
    if (drc < 0)
        kt_err("worker %u: DNS resolver: %s; client names and DNS lists will fail", w->id, strerror(-drc));
    w->tick_op.cb = tick_done;
    tick_arm(w);
    while (!w->loop.stop) {
        int rc = kt_loop_run_once(&w->loop, 1000);
        if (rc < 0) {
            kt_err("worker %u: io_uring: %s", w->id, strerror(-rc));
            break;
        }
    }
    kt_dns_free(w->dns);
    w->dns = NULL;
    /* Sessions are gone; the tick timeout may still be armed, and closing the
     * ring cancels it. */
    for (size_t i = 0; i < w->n_listeners; i++)
        if (w->listeners[i].fd >= 0)
            close(w->listeners[i].fd);
    kt_loop_fini(&w->loop);
    kt_dirsync_thread_cleanup();
    return NULL;
}

/* ---- main thread ---- */

static int reload(struct kt_server *srv, struct kt_qmgr *qmgr)
{
    struct kt_config *cfg;
    struct kt_runtime *rt, *old;
    /* after log rotation: maillog_file is opened again under its name */
    int lrc = kt_log_reopen();
    if (lrc < 0)
        kt_warn("reload: cannot reopen maillog_file: %s", strerror(-lrc));
    if (!srv->config_dir) {
        kt_info("reload: embedded configuration, nothing to reload");
        return 0;
    }
    if (kt_config_load(srv->config_dir, &cfg) < 0) {
        kt_err("reload: configuration has errors; keeping the running one");
        return -EINVAL;
    }
    if (kt_runtime_new(cfg, &rt) < 0) {
        kt_config_free(cfg);
        kt_err("reload: configuration has errors; keeping the running one");
        return -EINVAL;
    }
    old = atomic_load(&srv->rt);
    if (rt->n_services != old->n_services) {
        kt_err("reload: master.cf services changed; restart ktrelay to change listeners");
        kt_runtime_unref(rt);
        return -EINVAL;
    }
    atomic_store(&srv->rt, rt);
    kt_qmgr_reload(qmgr, rt);
    kt_runtime_unref(old);
    atomic_fetch_add(&srv->generation, 1);
    kt_info("reload: configuration reloaded");
    return 0;
}

/* A start that failed before any thread ran: give back what was set up
 * (workers 0..made-1 have their loop and listeners) and the caller's runtime. */
static int start_failed(struct kt_server *srv, unsigned made, struct bind_addr *addrs, int code)
{
    for (unsigned k = 0; k < made; k++) {
        struct kt_worker *w = &srv->workers[k];
        for (size_t a = 0; a < w->n_listeners; a++)
            if (w->listeners[a].fd >= 0)
                close(w->listeners[a].fd);
        kt_free(w->listeners);
        kt_loop_fini(&w->loop);
        kt_runtime_unref(w->rt);
    }
    kt_free(srv->workers);
    kt_free(addrs);
    kt_runtime_unref(atomic_load(&srv->rt));
    return code;
}

int kt_server_run(struct kt_runtime *rt, const char *config_dir)
{
    struct kt_server srv;
    struct bind_addr *addrs = NULL;
    size_t n_addrs = 0;
    int exit_code = 0;
    char why[256];

    memset(&srv, 0, sizeof(srv));
    srv.config_dir = config_dir;
    atomic_init(&srv.rt, rt);

    if (kt_ktls_probe(why, sizeof(why)))
        kt_info("kernel TLS: available (tls ULP); TLS sessions hand record encryption to the kernel");
    else
        kt_info("kernel TLS: not available: %s; TLS stays in userspace OpenSSL", why);

    for (size_t i = 0; i < rt->n_services; i++)
        if (service_addrs(rt, i, &addrs, &n_addrs) < 0)
            return start_failed(&srv, 0, addrs, EX_CONFIG);
    if (n_addrs == 0) {
        kt_err("fatal: no listening addresses: add an inet smtpd service to master.cf");
        return start_failed(&srv, 0, addrs, EX_CONFIG);
    }

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    srv.n_workers = rt->worker_threads;
    srv.workers = kt_calloc(srv.n_workers, sizeof(*srv.workers));
    for (unsigned k = 0; k < srv.n_workers; k++) {
        struct kt_worker *w = &srv.workers[k];
        w->server = &srv;
        w->ktls = &srv.ktls;
        w->id = k;
        int rc = kt_loop_init(&w->loop, RING_ENTRIES);
        if (rc < 0) {
            kt_err("fatal: io_uring_queue_init: %s%s", strerror(-rc),
                   rc == -ENOMEM ? " (raise the locked-memory limit: ulimit -l, LimitMEMLOCK=)"
                   : rc == -EPERM ? " (io_uring is disabled: sysctl kernel.io_uring_disabled=0)" : "");
            return start_failed(&srv, k, addrs, EX_OSERR);
        }
        w->rt = kt_runtime_ref(rt);
        w->listeners = kt_calloc(n_addrs, sizeof(*w->listeners));
        w->n_listeners = n_addrs;
        for (size_t a = 0; a < n_addrs; a++)
            w->listeners[a].fd = -1;
        for (size_t a = 0; a < n_addrs; a++) {
            struct kt_listener *l = &w->listeners[a];
            l->op.cb = accept_done;
            l->worker = w;
            l->service = addrs[a].service;
            l->fd = open_listener(&addrs[a]);
            if (l->fd < 0) {
                if (l->fd == -EACCES && geteuid() != 0)
                    kt_err("fatal: cannot listen on %s: %s: ports below 1024 need root; run ktrelay as root, "
                           "or grant the binary CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep "
                           "/path/to/ktrelay, or AmbientCapabilities=CAP_NET_BIND_SERVICE in its unit)",
                           addrs[a].text, strerror(-l->fd));
                else if (l->fd == -EADDRINUSE)
                    kt_err("fatal: cannot listen on %s: %s: another server (or ktrelay) holds that port; "
                           "stop it or change the service in master.cf", addrs[a].text, strerror(-l->fd));
                else
                    kt_err("fatal: cannot listen on %s: %s", addrs[a].text, strerror(-l->fd));
                return start_failed(&srv, k + 1, addrs, l->fd == -EACCES ? EX_NOPERM : EX_UNAVAILABLE);
            }
        }
    }
    for (size_t a = 0; a < n_addrs; a++) {
        const struct kt_smtpd_settings *st = &rt->services[addrs[a].service];
        kt_info("listening on %s (service %s%s%s)", addrs[a].text, st->service->name,
                st->wrappermode ? ", implicit TLS" : "",
                st->wrappermode ? "" : st->tls_level == KT_TLS_ENCRYPT ? ", STARTTLS required"
                                     : st->tls_level == KT_TLS_MAY ? ", STARTTLS" : "");
    }
    kt_free(addrs);
    /* the queue manager's thread inherits the blocked signal mask */
    struct kt_qmgr *qmgr = NULL;
    if (kt_qmgr_start(rt, &qmgr) < 0) {
        kt_err("fatal: cannot start the queue manager");
        return start_failed(&srv, srv.n_workers, NULL, EX_UNAVAILABLE);
    }
    for (unsigned k = 0; k < srv.n_workers; k++)
        pthread_create(&srv.workers[k].thread, NULL, worker_main, &srv.workers[k]);
    kt_info("daemon started -- version %s, %u worker threads", KT_VERSION, srv.n_workers);
    /* every listener is bound and its accept armed by now: systemd may start dependants */
    kt_notify_ready("accepting mail");

    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            kt_notify_reloading();
            reload(&srv, qmgr);
            kt_notify_ready("accepting mail");
            continue;
        }
        kt_notify_stopping();
        kt_info("terminating on signal %d", sig);
        srv.drain_deadline = time(NULL) + DRAIN_SECONDS;
        atomic_store(&srv.stopping, 1);
        break;
    }
    for (unsigned k = 0; k < srv.n_workers; k++) {
        pthread_join(srv.workers[k].thread, NULL);
        kt_runtime_unref(srv.workers[k].rt);
        kt_free(srv.workers[k].listeners);
    }
    kt_free(srv.workers);
    kt_qmgr_stop(qmgr);
    kt_runtime_unref(atomic_load(&srv.rt));
    kt_info("ktls sessions: tls12 tx=%lu rx=%lu tls13 tx=%lu rx=%lu (of %lu TLS sessions)",
            atomic_load(&srv.ktls.tls12_tx), atomic_load(&srv.ktls.tls12_rx), atomic_load(&srv.ktls.tls13_tx),
            atomic_load(&srv.ktls.tls13_rx), atomic_load(&srv.ktls.sessions_tls));
    kt_info("stopped");
    return exit_code;
}
