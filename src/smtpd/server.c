/* Listening sockets, worker threads and the worker process's signals.
 *
 * Each worker thread owns an io_uring and, for every listening address, its
 * own SO_REUSEPORT socket (opened by the master) with a multishot accept: the
 * kernel spreads connections over the threads and no lock is shared on the
 * accept path. The process's main thread only waits for signals: SIGTERM
 * stops accepting, lets sessions finish up to a deadline, then exits 0;
 * SIGQUIT (a reload started the next generation) stops accepting and waits
 * for the sessions to end by themselves. A generation serves exactly one
 * configuration, so every port speaks what its master.cf line says. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <netdb.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "kt_build.h"
#include "core/alloc.h"
#include "conf/config.h"
#include "core/dirsync.h"
#include "tls/ktls.h"
#include "core/log.h"
#include "queue/dns.h"
#include "metrics/metrics.h"
#include "delivery/maildir.h"
#include "delivery/resolve.h"
#include "queue/qmgr.h"
#include "smtpd/server.h"
#include "smtpd/session.h"

#define TICK_MS 200
/* After EMFILE/ENFILE (or ENOBUFS/ENOMEM) accepting pauses this long, as nginx (accept_mutex_delay) and
 * Postfix do: re-arming at once would spin on the same error. Waiting clients stay in the backlog. */
#define ACCEPT_BACKOFF_MS 500
/* At most one log line per this many seconds about it */
#define ACCEPT_LOG_INTERVAL_S 10

static struct kt_log_limit accept_log_limit;

static long long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
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

/* family: AF_INET or AF_INET6 when inet_protocols enables only that one (a name is resolved in it alone, and
 * an address of the other family cannot be resolved, as Postfix refuses it), else AF_UNSPEC. */
static int add_addr(struct bind_addr **list, size_t *n, const char *host, int port, size_t service, int family)
{
    struct addrinfo hints = { .ai_family = family, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *res, *ai;
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        kt_err("cannot resolve listen address %s: %s", host ? host : "*", gai_strerror(rc));
        return -EINVAL;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr)) {
            /* the IPv6 listeners are IPV6_V6ONLY: such an address could not be bound */
            kt_err("listen address %s is an IPv4-mapped IPv6 address: write the IPv4 address", host);
            freeaddrinfo(res);
            return -EINVAL;
        }
        /* one address named twice for a service (inet_interfaces = 127.0.0.1, localhost) is one listener, as
         * Postfix makes its interface list unique */
        int dup = 0;
        for (size_t k = 0; k < *n && !dup; k++)
            dup = (*list)[k].service == service && (*list)[k].len == ai->ai_addrlen
                  && !memcmp(&(*list)[k].ss, ai->ai_addr, ai->ai_addrlen);
        if (dup)
            continue;
        *list = kt_realloc(*list, (*n + 1) * sizeof(**list));
        struct bind_addr *b = &(*list)[*n];
        memset(b, 0, sizeof(*b));
        memcpy(&b->ss, ai->ai_addr, ai->ai_addrlen);
        b->len = ai->ai_addrlen;
        b->service = service;
        /* numeric, with a link-local address's zone ("fe80::1%eth0"), which is part of the address */
        char h[INET6_ADDRSTRLEN + IF_NAMESIZE + 1] = "?";
        if (getnameinfo(ai->ai_addr, ai->ai_addrlen, h, sizeof(h), NULL, 0, NI_NUMERICHOST) != 0)
            snprintf(h, sizeof(h), "?");
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
    int family = v4 && !v6 ? AF_INET : v6 && !v4 ? AF_INET6 : AF_UNSPEC;

    if (svc->host)
        return add_addr(list, n, svc->host, svc->port, i, family);
    if (!ifs || !strcasecmp(ifs, "all")) {
        int rc = 0;
        if (v4)
            rc |= add_addr(list, n, "0.0.0.0", svc->port, i, AF_INET);
        if (v6)
            rc |= add_addr(list, n, "::", svc->port, i, AF_INET6);
        return rc;
    }
    if (!strcasecmp(ifs, "loopback-only")) {
        int rc = 0;
        if (v4)
            rc |= add_addr(list, n, "127.0.0.1", svc->port, i, AF_INET);
        if (v6)
            rc |= add_addr(list, n, "::1", svc->port, i, AF_INET6);
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
        rc |= add_addr(list, n, tok, svc->port, i, family);
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
    /* accepted sockets inherit it: every reply group is one segment that must
     * not wait for the client's delayed ACK (see kt_conn_new) */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (b->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&b->ss, b->len) < 0 || listen(fd, 4096) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

/* ---- listening sockets (opened by the master) ---- */

static int wildcard(const struct bind_addr *b)
{
    if (b->ss.ss_family == AF_INET)
        return ((const struct sockaddr_in *)&b->ss)->sin_addr.s_addr == htonl(INADDR_ANY);
    return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)&b->ss)->sin6_addr);
}

/* Two listeners of one family and port whose addresses are equal, or one of them the wildcard, would take
 * the same connections. Postfix's master cannot bind the second (EADDRINUSE) and does not start; ktrelay's
 * listeners are SO_REUSEPORT sockets, which would both bind and split the connections between two services
 * (say one that requires TLS and one that does not). So it refuses too. Returns how many pairs it logged. */
static int overlapping(const struct kt_runtime *rt, const struct bind_addr *addrs, size_t n)
{
    int errors = 0;
    for (size_t a = 0; a < n; a++)
        for (size_t b = a + 1; b < n; b++) {
            const struct bind_addr *x = &addrs[a], *y = &addrs[b];
            if (x->ss.ss_family != y->ss.ss_family)
                continue;
            int same_port, same_addr;
            if (x->ss.ss_family == AF_INET) {
                const struct sockaddr_in *p = (const void *)&x->ss, *q = (const void *)&y->ss;
                same_port = p->sin_port == q->sin_port;
                same_addr = p->sin_addr.s_addr == q->sin_addr.s_addr;
            } else {
                const struct sockaddr_in6 *p = (const void *)&x->ss, *q = (const void *)&y->ss;
                same_port = p->sin6_port == q->sin6_port;
                /* fe80::1%eth0 and fe80::1%eth1 are two addresses (RFC 4007 zones): the scope is compared too */
                same_addr = IN6_ARE_ADDR_EQUAL(&p->sin6_addr, &q->sin6_addr) && p->sin6_scope_id == q->sin6_scope_id;
            }
            if (!same_port || (!same_addr && !wildcard(x) && !wildcard(y)))
                continue;
            const struct kt_service *sx = kt_config_service(rt->cfg, x->service);
            const struct kt_service *sy = kt_config_service(rt->cfg, y->service);
            kt_err("%s:%d: service %s would listen on %s, where service %s (%s:%d) already listens on %s: "
                   "give each master.cf service its own address and port", sy->file, sy->line, sy->name, y->text,
                   sx->name, sx->file, sx->line, x->text);
            errors++;
        }
    return errors;
}

/* Every service's listening addresses into *addrs (the caller frees it, whatever the result), checked: at
 * least one, and no two overlapping. Returns the number of problems, each logged (0: fine). */
static int listen_addrs(const struct kt_runtime *rt, struct bind_addr **addrs, size_t *n_addrs)
{
    int errors = 0;
    *addrs = NULL;
    *n_addrs = 0;
    for (size_t i = 0; i < rt->n_services; i++)
        if (service_addrs(rt, i, addrs, n_addrs) < 0)
            errors++;
    if (!errors && *n_addrs == 0) {
        kt_err("no listening addresses: add an inet smtpd service to master.cf");
        errors++;
    }
    if (!errors)
        errors = overlapping(rt, *addrs, *n_addrs);
    return errors;
}

int kt_listen_check(const struct kt_runtime *rt)
{
    struct bind_addr *addrs;
    size_t n_addrs;
    int errors = listen_addrs(rt, &addrs, &n_addrs);
    kt_free(addrs);
    return errors;
}

/* 0 when nothing listens on b's address and port, else -errno (-EADDRINUSE: something does). The listeners
 * are SO_REUSEPORT sockets, which would bind beside another root process's (a second ktrelay with another
 * data_directory) and share its connections; this socket without SO_REUSEPORT cannot, as Postfix's master
 * cannot bind a port already in use. */
static int probe_free(const struct bind_addr *b)
{
    int fd = socket(b->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1, rc = 0;
    if (fd < 0)
        return -errno;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (b->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&b->ss, b->len) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

int kt_listen_open(const struct kt_runtime *rt, struct kt_listen_set *ls, int exclusive)
{
    struct bind_addr *addrs = NULL;
    size_t n_addrs = 0;
    int rc = 0;

    memset(ls, 0, sizeof(*ls));
    if (listen_addrs(rt, &addrs, &n_addrs) > 0) {
        rc = -EINVAL;
        goto cleanup;
    }
    ls->n_workers = rt->worker_threads;
    ls->n_addrs = n_addrs;
    ls->services = kt_calloc(n_addrs, sizeof(*ls->services));
    ls->fds = kt_calloc((size_t)ls->n_workers * n_addrs, sizeof(int));
    for (size_t k = 0; k < (size_t)ls->n_workers * n_addrs; k++)
        ls->fds[k] = -1;
    for (size_t a = 0; a < n_addrs; a++) {
        ls->services[a] = addrs[a].service;
        for (unsigned w = 0; w < ls->n_workers; w++) {
            int fd = w == 0 && exclusive ? probe_free(&addrs[a]) : 0;
            if (fd == 0)
                fd = open_listener(&addrs[a]);
            if (fd < 0) {
                if (fd == -EACCES && geteuid() != 0)
                    kt_err("fatal: cannot listen on %s: %s: ports below 1024 need root; run ktrelay as root, "
                           "or grant the binary CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep "
                           "/path/to/ktrelay, or AmbientCapabilities=CAP_NET_BIND_SERVICE in its unit)",
                           addrs[a].text, strerror(-fd));
                else if (fd == -EADDRINUSE)
                    kt_err("fatal: cannot listen on %s: %s: another server (or ktrelay) holds that port; "
                           "stop it or change the service in master.cf", addrs[a].text, strerror(-fd));
                else
                    kt_err("fatal: cannot listen on %s: %s", addrs[a].text, strerror(-fd));
                rc = fd;
                goto cleanup;
            }
            ls->fds[w * n_addrs + a] = fd;
        }
    }
    for (size_t a = 0; a < n_addrs; a++) {
        const struct kt_smtpd_settings *st = &rt->services[addrs[a].service];
        kt_info("listening on %s (service %s%s%s)", addrs[a].text, st->service->name,
                st->wrappermode ? ", implicit TLS" : "",
                st->wrappermode ? "" : st->tls_level == KT_TLS_ENCRYPT ? ", STARTTLS required"
                                     : st->tls_level == KT_TLS_MAY ? ", STARTTLS" : "");
    }
cleanup:
    kt_free(addrs);
    if (rc < 0)
        kt_listen_close(ls);
    return rc;
}

void kt_listen_close(struct kt_listen_set *ls)
{
    if (ls->fds)
        for (size_t k = 0; k < (size_t)ls->n_workers * ls->n_addrs; k++)
            if (ls->fds[k] >= 0)
                close(ls->fds[k]);
    kt_free(ls->fds);
    kt_free(ls->services);
    memset(ls, 0, sizeof(*ls));
}

/* ---- worker threads ---- */

static void accept_arm(struct kt_listener *l)
{
    struct io_uring_sqe *sqe = kt_loop_sqe(&l->worker->loop, &l->op);
    l->armed = 1;
    io_uring_prep_multishot_accept(sqe, l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

static int server_closing(const struct kt_server *srv)
{
    return atomic_load(&srv->stopping) || atomic_load(&srv->retiring);
}

static int accept_exhausted(int res)
{
    return res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM;
}

static void accept_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_listener *l = (struct kt_listener *)op;
    struct kt_worker *w = l->worker;
    int closing = w->draining || server_closing(w->server);

    if (res >= 0) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        if (closing || getpeername(res, (struct sockaddr *)&ss, &len) < 0) {
            close(res);
        } else {
            kt_session_start(w, res, (struct sockaddr *)&ss, len, w->rt, &w->rt->services[l->service]);
        }
    } else if (accept_exhausted(res) && !closing) {
        if (!l->resume_ms)
            kt_log_limited(&accept_log_limit, ACCEPT_LOG_INTERVAL_S, KT_LOG_WARN,
                           "accept: %s: not accepting for %d ms (%zu sessions on worker %u)", strerror(-res),
                           ACCEPT_BACKOFF_MS, w->n_sessions, w->id);
        l->resume_ms = monotonic_ms() + ACCEPT_BACKOFF_MS;
        if (flags & IORING_CQE_F_MORE) {
            struct io_uring_sqe *sqe = kt_loop_sqe(&w->loop, NULL);
            io_uring_prep_cancel64(sqe, (uint64_t)(uintptr_t)&l->op, 0);
        }
    } else if (!closing && res != -ECANCELED && res != -EAGAIN && res != -EINTR && res != -ECONNABORTED) {
        kt_log_limited(&accept_log_limit, ACCEPT_LOG_INTERVAL_S, KT_LOG_WARN, "accept: %s", strerror(-res));
    }
    if (!(flags & IORING_CQE_F_MORE)) {
        l->armed = 0;
        if (!closing && l->fd >= 0 && !l->resume_ms)
            accept_arm(l);
    }
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
    int stopping = atomic_load(&srv->stopping);

    w->tick_armed = 0;
    kt_dns_tick(w->dns);
    long long now_ms = monotonic_ms();
    for (size_t i = 0; i < w->n_listeners; i++) {
        struct kt_listener *l = &w->listeners[i];
        if (l->resume_ms && now_ms >= l->resume_ms && !server_closing(srv)) {
            l->resume_ms = 0;
            if (!l->armed && l->fd >= 0)
                accept_arm(l);
        }
    }
    if (server_closing(srv) && !w->draining)
        worker_begin_drain(w);
    /* the list may change under us: sessions can free themselves */
    struct kt_session *s = w->sessions, *next;
    for (; s; s = next) {
        next = s->next;
        if (stopping) {
            if (now >= srv->drain_deadline) {
                kt_session_abort(s);
            } else if (!s->txn) {
                kt_session_shutdown(s);
            }
        } else if (s->deadline && now >= s->deadline) {
            /* a retiring generation lets its sessions run to their end */
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
    atomic_fetch_add(&w->server->threads_done, 1);
    return NULL;
}

/* ---- the queue manager: one per queue directory ---- */

/* Only one queue manager may work on a queue directory: a new generation's
 * waits until the retiring one has stopped (flock on queue_directory/qmgr.lock,
 * released when that process stops its manager or exits). */
static int qmgr_lock_open(struct kt_server *srv)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/qmgr.lock", srv->rt->queue_directory);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        kt_warn("cannot open %s: %s", path, strerror(errno));
    return fd;
}

static void *qmgr_waiter(void *arg)
{
    struct kt_server *srv = arg;
    pthread_setname_np(pthread_self(), "ktrelay-qwait");
    while (!atomic_load(&srv->qmgr_cancel)) {
        if (flock(srv->qmgr_lock, LOCK_EX | LOCK_NB) == 0) {
            pthread_mutex_lock(&srv->qmgr_mu);
            if (!atomic_load(&srv->qmgr_cancel)) {
                if (kt_qmgr_start(srv->rt, &srv->qmgr) < 0)
                    kt_err("cannot start the queue manager");
                else
                    kt_info_as("qmgr", "queue manager: configuration reloaded (generation %u)", srv->generation);
            }
            pthread_mutex_unlock(&srv->qmgr_mu);
            return NULL;
        }
        struct timespec ts = { 0, 50 * 1000000L };
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* 0: running (now or as soon as the previous generation's manager stopped);
 * -1: it could not start. */
static int qmgr_begin(struct kt_server *srv)
{
    srv->qmgr_lock = qmgr_lock_open(srv);
    if (srv->qmgr_lock < 0 || flock(srv->qmgr_lock, LOCK_EX | LOCK_NB) == 0) {
        if (kt_qmgr_start(srv->rt, &srv->qmgr) < 0)
            return -1;
        if (srv->generation > 1)
            kt_info_as("qmgr", "queue manager: configuration reloaded (generation %u)", srv->generation);
        return 0;
    }
    kt_info("queue manager: waiting for the previous generation's to stop");
    if (pthread_create(&srv->qmgr_thread, NULL, qmgr_waiter, srv) != 0)
        return -1;
    srv->qmgr_waiting = 1;
    return 0;
}

static void qmgr_end(struct kt_server *srv)
{
    atomic_store(&srv->qmgr_cancel, 1);
    if (srv->qmgr_waiting) {
        pthread_join(srv->qmgr_thread, NULL);
        srv->qmgr_waiting = 0;
    }
    pthread_mutex_lock(&srv->qmgr_mu);
    kt_qmgr_stop(srv->qmgr);
    srv->qmgr = NULL;
    pthread_mutex_unlock(&srv->qmgr_mu);
    if (srv->qmgr_lock >= 0) {
        close(srv->qmgr_lock);
        srv->qmgr_lock = -1;
    }
}

/* Descriptors the process needs besides sessions: listeners, rings, the queue manager, logs, tables. */
#define FD_RESERVE 64

/* Raise the soft RLIMIT_NOFILE to the hard limit (what a process may do without privileges) and say how
 * many sessions that allows: a session holds its socket, and one more descriptor while a message is
 * being written. */
static void raise_nofile(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t old = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
            kt_warn("cannot raise the open file limit from %llu to %llu: %s", (unsigned long long)old,
                    (unsigned long long)rl.rlim_max, strerror(errno));
            rl.rlim_cur = old;
        }
    }
    if (rl.rlim_cur == RLIM_INFINITY) {
        kt_info("open file limit: unlimited");
        return;
    }
    unsigned long long n = rl.rlim_cur > FD_RESERVE ? (unsigned long long)rl.rlim_cur - FD_RESERVE : 0;
    kt_info("open file limit %llu: room for about %llu sessions (%llu while every one writes a message)",
            (unsigned long long)rl.rlim_cur, n, n / 2);
}

struct tmp_clean {
    const char *hostname;
    time_t now;
    long removed;
};

static int clean_one(const char *maildir, void *arg)
{
    struct tmp_clean *tc = arg;
    int n = kt_maildir_clean_tmp(maildir, tc->hostname, tc->now);
    if (n > 0)
        tc->removed += n;
    return 0;
}

/* Files ktrelay left in Maildir tmp/ folders (kill -9, power loss) go after 36 hours, the Maildir rule;
 * only names ktrelay makes, for each service's mailboxes and host name. */
static void clean_maildir_tmp(const struct kt_runtime *rt)
{
    struct tmp_clean tc = { .now = time(NULL) };

    for (size_t i = 0; i < rt->n_services; i++) {
        const struct kt_smtpd_settings *st = &rt->services[i];
        int seen = 0;
        for (size_t k = 0; k < i; k++)
            if (rt->services[k].resolver == st->resolver && !strcmp(rt->services[k].myhostname, st->myhostname))
                seen = 1;
        if (seen || !st->resolver)
            continue;
        tc.hostname = st->myhostname;
        kt_resolver_foreach_mailbox(st->resolver, clean_one, &tc);
    }
    if (tc.removed)
        kt_info("removed %ld stale files (older than 36 hours) from Maildir tmp/ folders", tc.removed);
}

/* ---- the worker process ---- */

static void tell_master(int fd, char what)
{
    if (fd >= 0 && write(fd, &what, 1) != 1)
        kt_warn("cannot reach the master process: %s", strerror(errno));
}

/* SIGQUIT from the master: a new generation serves from now on. Stop
 * accepting (the sockets are shut down here, so no connection lands on this
 * generation once the master hears back), hand the queue over, let running
 * sessions finish. */
static void retire(struct kt_server *srv, int status_fd)
{
    atomic_store(&srv->retiring, 1);
    for (unsigned k = 0; k < srv->n_workers; k++)
        for (size_t i = 0; i < srv->workers[k].n_listeners; i++)
            shutdown(srv->workers[k].listeners[i].fd, SHUT_RDWR);
    tell_master(status_fd, 'C');
    if (srv->metrics) {
        kt_metrics_http_stop();
        srv->metrics = 0;
    }
    kt_info("generation %u: no longer accepting; finishing its sessions", srv->generation);
    qmgr_end(srv);
}

int kt_server_run(struct kt_runtime *rt, const struct kt_listen_set *ls, unsigned generation, int status_fd)
{
    struct kt_server srv;
    int exit_code = 0;

    memset(&srv, 0, sizeof(srv));
    srv.rt = rt;
    srv.generation = generation;
    srv.qmgr_lock = -1;
    pthread_mutex_init(&srv.qmgr_mu, NULL);

    raise_nofile();
    clean_maildir_tmp(rt);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    srv.n_workers = ls->n_workers;
    srv.workers = kt_calloc(srv.n_workers, sizeof(*srv.workers));
    for (unsigned k = 0; k < srv.n_workers; k++) {
        struct kt_worker *w = &srv.workers[k];
        w->server = &srv;
        w->ktls = &srv.ktls;
        w->id = k;
        w->rt = rt;
        w->listeners = kt_calloc(ls->n_addrs, sizeof(*w->listeners));
        w->n_listeners = ls->n_addrs;
        for (size_t a = 0; a < ls->n_addrs; a++) {
            struct kt_listener *l = &w->listeners[a];
            l->op.cb = accept_done;
            l->worker = w;
            l->service = ls->services[a];
            l->fd = ls->fds[k * ls->n_addrs + a];
        }
        int rc = kt_loop_init(&w->loop, RING_ENTRIES);
        if (rc < 0) {
            kt_err("fatal: io_uring_queue_init: %s%s", strerror(-rc),
                   rc == -ENOMEM ? " (raise the locked-memory limit: ulimit -l, LimitMEMLOCK=)"
                   : rc == -EPERM ? " (io_uring is disabled: sysctl kernel.io_uring_disabled=0)" : "");
            return EX_OSERR;        /* the worker process exits: nothing to give back */
        }
    }
    /* the queue manager's thread inherits the blocked signal mask */
    if (qmgr_begin(&srv) < 0) {
        kt_err("fatal: cannot start the queue manager");
        return EX_UNAVAILABLE;
    }
    /* ktrelay_metrics_address: served by the generation that serves mail (its
     * counters); SO_REUSEPORT lets the next generation bind it while this one
     * retires */
    if (rt->metrics_address[0]) {
        char err[512];
        if (kt_metrics_http_start(rt->metrics_address, err, sizeof(err)) < 0) {
            kt_err("fatal: %s", err);
            return EX_UNAVAILABLE;
        }
        srv.metrics = 1;
    }
    for (unsigned k = 0; k < srv.n_workers; k++)
        pthread_create(&srv.workers[k].thread, NULL, worker_main, &srv.workers[k]);
    tell_master(status_fd, 'R');

    for (;;) {
        int sig;
        if (atomic_load(&srv.retiring)) {
            /* wait for the sessions to end, still listening for SIGTERM */
            if (atomic_load(&srv.threads_done) == srv.n_workers)
                break;
            struct timespec ts = { 0, TICK_MS * 1000000L };
            sig = sigtimedwait(&set, NULL, &ts);
            if (sig < 0)
                continue;
        } else if (sigwait(&set, &sig) != 0) {
            continue;
        }
        if (sig == SIGHUP)
            continue;              /* the master reloads */
        if (sig == SIGQUIT) {
            if (!atomic_load(&srv.retiring))
                retire(&srv, status_fd);
            continue;
        }
        kt_info("terminating on signal %d", sig);
        srv.drain_deadline = time(NULL) + DRAIN_SECONDS;
        atomic_store(&srv.stopping, 1);
        break;
    }
    for (unsigned k = 0; k < srv.n_workers; k++) {
        pthread_join(srv.workers[k].thread, NULL);
        kt_free(srv.workers[k].listeners);
    }
    kt_free(srv.workers);
    qmgr_end(&srv);
    pthread_mutex_destroy(&srv.qmgr_mu);
    if (srv.metrics)
        kt_metrics_http_stop();
    kt_metrics_shutdown();
    kt_info("ktls sessions: tls12 tx=%lu rx=%lu tls13 tx=%lu rx=%lu (of %lu TLS sessions)",
            atomic_load(&srv.ktls.tls12_tx), atomic_load(&srv.ktls.tls12_rx), atomic_load(&srv.ktls.tls13_tx),
            atomic_load(&srv.ktls.tls13_rx), atomic_load(&srv.ktls.sessions_tls));
    kt_info("generation %u stopped", generation);
    return exit_code;
}
