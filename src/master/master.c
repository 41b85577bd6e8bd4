/* The master process (see master.h).
 *
 * A generation is one worker process plus, when the master runs as root, one
 * local delivery agent. The master talks to a worker through signals and one
 * status pipe on which the worker writes 'R' (serving) and, after SIGQUIT,
 * 'C' (its listeners are shut): a reload is reported done only when no
 * connection can reach the old generation any more. Every descriptor the
 * master keeps for one generation is closed in the processes it forks for
 * another. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "kt_build.h"
#include "core/alloc.h"
#include "core/log.h"
#include "core/notify.h"
#include "conf/config.h"
#include "conf/settings.h"
#include "delivery/local.h"
#include "delivery/maildir.h"
#include "master/confine.h"
#include "master/master.h"
#include "smtpd/server.h"
#include "tls/ktls.h"

#define READY_TIMEOUT_MS 30000
#define RETIRE_TIMEOUT_MS 10000

#if defined(__SANITIZE_ADDRESS__)
#define KT_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KT_SANITIZED 1
#endif
#endif

static int instance_lock_fd = -1;

void kt_master_keep_lock(int fd)
{
    instance_lock_fd = fd;
}

struct owner {
    const char *name;
    uid_t uid;
    gid_t gid;
};

struct gen {
    unsigned id;
    struct kt_runtime *rt;
    pid_t pid;                   /* worker process; 0 once reaped */
    pid_t agent;                 /* local delivery agent; 0 when none or reaped */
    int status_fd;               /* read end of the worker's status pipe */
    int retiring;
    int exit_status;
    struct gen *next;
};

struct master {
    const char *config_dir;
    int privileged;              /* started as root: workers run as mail_owner */
    struct gen *gens;            /* the serving generation first */
    unsigned next_id;
    int failed;                  /* a worker died or stopped uncleanly */
};

/* ---- mail_owner and files ---- */

static int lookup_owner(const struct kt_runtime *rt, struct owner *o)
{
    const char *name = kt_config_get(rt->cfg, NULL, "mail_owner");
    if (!name || !*name) {
        kt_err("fatal: mail_owner is empty; set it to the unprivileged user ktrelay runs as (default ktrelay)");
        return -EINVAL;
    }
    errno = 0;
    struct passwd *pw = getpwnam(name);
    if (!pw) {
        kt_err("fatal: mail_owner %s: no such user; create it with: useradd --system --home-dir /var/lib/ktrelay "
               "--shell /usr/sbin/nologin %s", name, name);
        return -ENOENT;
    }
    if (pw->pw_uid == 0 || pw->pw_gid == 0) {
        kt_err("fatal: mail_owner %s has uid or gid 0; it must be an unprivileged user", name);
        return -EINVAL;
    }
    o->name = name;
    o->uid = pw->pw_uid;
    o->gid = pw->pw_gid;
    return 0;
}

/* Give one entry of DIRFD to the owner without following a symbolic link. */
static int fix_entry(int dirfd, const char *name, const struct owner *o)
{
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || S_ISLNK(st.st_mode))
        return 0;
    if (st.st_uid == o->uid && st.st_gid == o->gid)
        return 0;
    return fchownat(dirfd, name, o->uid, o->gid, AT_SYMLINK_NOFOLLOW) == 0 ? 1 : 0;
}

/* A directory the workers own: created when missing (its parent must exist),
 * refused when it is a symbolic link or not a directory, its owner and mode
 * set when they differ; every change is logged. */
static int own_dir(const char *param, const char *path, const struct owner *o, mode_t mode)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        if (errno != ENOENT) {
            kt_err("%s %s: %s", param, path, strerror(errno));
            return -errno;
        }
        if (mkdir(path, mode) < 0 && errno != EEXIST) {
            kt_err("cannot create %s %s: %s", param, path, strerror(errno));
            return -errno;
        }
        if (lstat(path, &st) < 0)
            return -errno;
        kt_info("created %s %s", param, path);
    }
    if (S_ISLNK(st.st_mode)) {
        kt_err("%s %s is a symbolic link; name the directory itself", param, path);
        return -ELOOP;
    }
    if (!S_ISDIR(st.st_mode)) {
        kt_err("%s %s is not a directory", param, path);
        return -ENOTDIR;
    }
    if (st.st_uid != o->uid || st.st_gid != o->gid) {
        if (lchown(path, o->uid, o->gid) < 0) {
            kt_err("cannot give %s %s to %s: %s", param, path, o->name, strerror(errno));
            return -errno;
        }
        kt_info("%s %s: owner set to %s (was uid %u gid %u)", param, path, o->name, (unsigned)st.st_uid,
                (unsigned)st.st_gid);
    }
    if ((st.st_mode & 07777) != mode) {
        if (chmod(path, mode) < 0) {
            kt_err("cannot chmod %s %s: %s", param, path, strerror(errno));
            return -errno;
        }
        kt_info("%s %s: mode set to %04o (was %04o)", param, path, (unsigned)mode, (unsigned)(st.st_mode & 07777));
    }
    return 0;
}

/* The queue belongs to mail_owner: its folders and files (written by an
 * earlier run as root, say) are given back one level deep. */
static int prepare_queue(const char *qdir, const struct owner *o)
{
    static const char *const sub[] = { "tmp", "new", "status" };
    /* searchable (not readable) by all, like Postfix's: local users reach maildrop/ */
    int rc = own_dir("queue_directory", qdir, o, 0711);
    if (rc < 0)
        return rc;
    int qfd = open(qdir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (qfd < 0)
        return -errno;
    unsigned fixed = 0;
    DIR *top = fdopendir(dup(qfd));
    if (top) {
        struct dirent *e;
        while ((e = readdir(top)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                fixed += (unsigned)fix_entry(qfd, e->d_name, o);
        closedir(top);
    }
    for (int k = 0; k < 3; k++) {
        int fd = openat(qfd, sub[k], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            continue;
        DIR *d = fdopendir(fd);
        if (!d) {
            close(fd);
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                fixed += (unsigned)fix_entry(fd, e->d_name, o);
        closedir(d);
    }
    close(qfd);
    if (fixed)
        kt_info("queue_directory %s: %u entr%s given to %s", qdir, fixed, fixed == 1 ? "y" : "ies", o->name);
    return 0;
}

static int same_dir(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int prepare_files(const struct master *m, const struct kt_runtime *rt, const struct owner *o)
{
    int rc = prepare_queue(rt->queue_directory, o);
    if (rc < 0)
        return rc;
    const char *data = kt_config_get(rt->cfg, NULL, "data_directory");
    if (data && *data) {
        if (m->config_dir && same_dir(data, m->config_dir)) {
            /* it holds main.cf and the keys: those stay root's */
        } else if ((rc = own_dir("data_directory", data, o, 0700)) < 0) {
            return rc;
        }
    }
    /* the queue manager's MTA-STS policy cache and TLS reports */
    if (rt->qmgr.mta_sts_enable
        && (rc = own_dir("ktrelay_mta_sts_cache_directory", rt->qmgr.mta_sts_cache_directory, o, 0700)) < 0)
        return rc;
    if (rt->qmgr.tlsrpt_enable && (rc = own_dir("ktrelay_tlsrpt_directory", rt->qmgr.tlsrpt_directory, o, 0700)) < 0)
        return rc;
    const char *base = kt_config_get(rt->cfg, NULL, "virtual_mailbox_base");
    const char *maps = kt_config_get(rt->cfg, NULL, "virtual_mailbox_maps");
    struct stat st;
    if (base && *base && maps && *maps && lstat(base, &st) < 0 && errno == ENOENT) {
        if (mkdir(base, 0755) < 0 || lchown(base, o->uid, o->gid) < 0) {
            kt_err("cannot create virtual_mailbox_base %s: %s", base, strerror(errno));
            return -errno;
        }
        kt_info("created virtual_mailbox_base %s (owner %s)", base, o->name);
    }
    return 0;
}

/* ---- the worker process ---- */

static int drop_privileges(const struct owner *o)
{
    /* nothing of root's may survive: the bounding set first (needs
     * CAP_SETPCAP, which we still have), then groups, gid, uid */
    for (int cap = 0; cap < 64; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    if (setgroups(1, &o->gid) < 0 || setresgid(o->gid, o->gid, o->gid) < 0 ||
        setresuid(o->uid, o->uid, o->uid) < 0)
        return -errno;
    if (setresuid(0, 0, 0) == 0)
        return -EPERM;
    return 0;
}

/* The worker must be able to write the virtual mailboxes it delivers on the
 * fast path; say what to run when it cannot. */
static int check_virtual_base(const struct kt_runtime *rt, const struct owner *o)
{
    const char *base = kt_config_get(rt->cfg, NULL, "virtual_mailbox_base");
    const char *maps = kt_config_get(rt->cfg, NULL, "virtual_mailbox_maps");
    const char *uids = kt_config_get(rt->cfg, NULL, "virtual_uid_maps");
    if (!base || !*base || !maps || !*maps)
        return 0;
    if (uids && *uids)
        return 0;     /* mailboxes of other owners: the delivery agent writes them as those owners */
    if (faccessat(AT_FDCWD, base, W_OK | X_OK, AT_EACCESS) == 0)
        return 0;
    int e = errno;
    kt_err("fatal: mail_owner %s cannot write virtual_mailbox_base %s (%s); run: chown %s: %s (and make the "
           "directories above it searchable)", o->name, base, strerror(e), o->name, base);
    return -e;
}

/* master.cf's chroot y (see master.h): the worker can then write only the
 * queue, data_directory and the virtual mailboxes, read the configuration and
 * the system's libraries and files, and execute nothing. */
static int confine_worker(const struct master *m, const struct kt_runtime *rt)
{
    const char *file;
    int line;
    if (!kt_config_chroot(rt->cfg, &file, &line))
        return 0;
    const char *base = kt_config_get(rt->cfg, NULL, "virtual_mailbox_base");
    const char *data = kt_config_get(rt->cfg, NULL, "data_directory");
    const char *rw[5];
    size_t nrw = 0;
    rw[nrw++] = rt->queue_directory;
    if (data && *data)
        rw[nrw++] = data;
    if (base && *base)
        rw[nrw++] = base;
    /* the MTA-STS policy cache and the TLS reports (made by prepare_files) */
    const struct kt_qmgr_settings *qs = &rt->qmgr;
    if (qs->mta_sts_enable)
        rw[nrw++] = qs->mta_sts_cache_directory;
    if (qs->tlsrpt_enable)
        rw[nrw++] = qs->tlsrpt_directory;
    const char *ro[] = { m->config_dir ? m->config_dir : "/etc", "/etc", "/usr", "/proc/self", "/sys/devices/system/cpu",
                         "/dev/null", "/dev/urandom",
                         /* the policy fetch's trust anchors */
                         qs->mta_sts_enable && qs->mta_sts_CAfile[0] ? qs->mta_sts_CAfile : "/etc" };
    const char *why = "";
    int rc = kt_confine_paths(rw, nrw, ro, sizeof(ro) / sizeof(ro[0]), &why);
    if (rc < 0) {
        kt_err("fatal: %s:%d: chroot field y: cannot confine the worker (%s: %s); set the chroot field to n to run "
               "it unconfined", file, line, why, strerror(-rc));
        return rc;
    }
    kt_info("worker confined to %s%s%s%s%s (writable) and the configuration, /etc and /usr (read-only), as %s:%d "
            "asks (chroot y)", rt->queue_directory, nrw > 1 ? ", " : "", nrw > 1 ? rw[1] : "", nrw > 2 ? ", " : "",
            nrw > 2 ? rw[2] : "", file, line);
    return 0;
}

static void close_other_gens(const struct master *m)
{
    for (const struct gen *g = m->gens; g; g = g->next)
        if (g->status_fd >= 0)
            close(g->status_fd);
}

static __attribute__((noreturn)) void worker_child(struct master *m, struct kt_runtime *rt, struct kt_listen_set *ls,
                                                   unsigned id, int status_fd, int agent_fd, const struct owner *o)
{
    int rc;
    close_other_gens(m);
    if (instance_lock_fd >= 0)
        close(instance_lock_fd);
    kt_log_set_program("smtpd");
    unsetenv("NOTIFY_SOCKET");      /* only the master talks to the service manager */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGCHLD, SIG_DFL);
    if (m->privileged) {
        if ((rc = drop_privileges(o)) < 0) {
            kt_err("fatal: cannot switch to mail_owner %s: %s", o->name, strerror(-rc));
            exit(EX_OSERR);
        }
    }
    /* A master killed with SIGKILL takes its generation along, as a crash of
     * one process would: nothing acknowledged is lost (the queue and the
     * Maildirs are durable before any 250), and a restart finds the queue
     * directory free. Set after the uid change, which clears it. */
    pid_t master_pid = getppid();
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != master_pid)
        exit(EX_OSERR);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        kt_err("fatal: PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
        exit(EX_OSERR);
    }
#ifdef KT_SANITIZED
    /* LeakSanitizer stops the threads with ptrace, which a process that
     * changed its uid may only do when it is dumpable. */
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
#endif
    if (m->privileged) {
        if (check_virtual_base(rt, o) < 0)
            exit(EX_CANTCREAT);
        kt_delivery_use_agent(agent_fd, rt->queue_directory, (unsigned)o->uid);
    }
    if ((rc = confine_worker(m, rt)) < 0)
        exit(EX_CONFIG);
    kt_alloc_after_fork();
    rc = kt_server_run(rt, ls, id, status_fd);
    exit(rc);
}

/* ---- generations ---- */

/* Wait for one status byte from a worker: 1 when it came, 0 on timeout or
 * when the worker closed the pipe (it exited). */
static int wait_status(int fd, char want, int timeout_ms)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long spent = (t1.tv_sec - t0.tv_sec) * 1000L + (t1.tv_nsec - t0.tv_nsec) / 1000000L;
        if (spent >= timeout_ms)
            return 0;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int n = poll(&p, 1, (int)(timeout_ms - spent));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        if (c == want)
            return 1;
    }
}

static void gen_free(struct gen *g)
{
    if (g->status_fd >= 0)
        close(g->status_fd);
    kt_runtime_unref(g->rt);
    kt_free(g);
}

static void reap_blocking(pid_t pid, int *status)
{
    while (waitpid(pid, status, 0) < 0 && errno == EINTR) {
    }
}

/* Start a generation serving RT (a reference is taken). 0, or after logging,
 * with nothing left running: -errno, or -1000 - a sysexits(3) code that says
 * why (EX_CONFIG: mail_owner, EX_CANTCREAT: its directories, EX_NOPERM: a
 * port, or the worker's own code). */
static int gen_start(struct master *m, struct kt_runtime *rt, struct gen **out)
{
    struct owner o = { .name = NULL, .uid = getuid(), .gid = getgid() };
    struct kt_listen_set ls;
    int agent_fd = -1, pfd[2] = { -1, -1 }, rc;
    pid_t agent = 0;

    if (m->privileged) {
        if (lookup_owner(rt, &o) < 0)
            return -1000 - EX_CONFIG;
        if (prepare_files(m, rt, &o) < 0)
            return -1000 - EX_CANTCREAT;
    }
    if ((rc = kt_listen_open(rt, &ls, m->gens == NULL)) < 0)
        return rc == -EACCES ? -1000 - EX_NOPERM : -1000 - EX_UNAVAILABLE;
    if (m->privileged) {
        /* the agent needs none of the master's descriptors */
        size_t n = 0, cap = (size_t)ls.n_workers * ls.n_addrs;
        for (const struct gen *g = m->gens; g; g = g->next)
            cap++;
        int *others = kt_calloc(cap + 2, sizeof(int));
        for (const struct gen *g = m->gens; g; g = g->next)
            others[n++] = g->status_fd;
        if (instance_lock_fd >= 0)
            others[n++] = instance_lock_fd;
        for (size_t k = 0; k < (size_t)ls.n_workers * ls.n_addrs; k++)
            others[n++] = ls.fds[k];
        const char *base = kt_config_get(rt->cfg, NULL, "virtual_mailbox_base");
        /* forward_path (a local(8) template, kept as written): empty means no .forward file is read */
        const char *fwd = kt_config_get(rt->cfg, NULL, "forward_path");
        int check_forward = fwd && fwd[strspn(fwd, ", \t\r\n")] != '\0';
        const char *mbt = kt_config_get(rt->cfg, NULL, "mailbox_transport");
        if (check_forward && mbt && *mbt)
            kt_warn("mailbox_transport: mail handed to %s is not checked for .forward files (forward_path), "
                    "which Postfix's local(8) would deliver through; set forward_path empty to say that is meant",
                    mbt);
        rc = kt_local_agent_start(base ? base : "", check_forward, others, n, &agent_fd, &agent);
        kt_free(others);
        if (rc < 0) {
            kt_err("cannot start the local delivery agent: %s", strerror(-rc));
            kt_listen_close(&ls);
            return rc;
        }
    }
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        rc = -errno;
        goto fail;
    }
    unsigned id = ++m->next_id;
    pid_t pid = fork();
    if (pid < 0) {
        rc = -errno;
        goto fail;
    }
    if (pid == 0) {
        close(pfd[0]);
        worker_child(m, rt, &ls, id, pfd[1], agent_fd, &o);
    }
    close(pfd[1]);
    pfd[1] = -1;
    kt_listen_close(&ls);
    if (agent_fd >= 0)
        close(agent_fd);
    struct gen *g = kt_calloc(1, sizeof(*g));
    g->id = id;
    g->rt = kt_runtime_ref(rt);
    g->pid = pid;
    g->agent = agent;
    g->status_fd = pfd[0];
    if (!wait_status(g->status_fd, 'R', READY_TIMEOUT_MS)) {
        int status, astatus;
        kill(pid, SIGTERM);
        reap_blocking(pid, &status);
        if (agent)
            reap_blocking(agent, &astatus);
        gen_free(g);
        kt_err("the worker process did not start");
        /* its sysexits(3) code says why */
        return WIFEXITED(status) && WEXITSTATUS(status) > 1 ? -1000 - WEXITSTATUS(status) : -EIO;
    }
    if (m->privileged)
        kt_info("generation %u: worker process %d runs as %s (uid %u), local delivery agent %d", id, (int)pid,
                o.name, (unsigned)o.uid, (int)agent);
    else
        kt_info("generation %u: worker process %d", id, (int)pid);
    g->next = m->gens;
    m->gens = g;
    *out = g;
    return 0;
fail:
    kt_err("cannot start a worker process: %s", strerror(-rc));
    if (pfd[0] >= 0)
        close(pfd[0]);
    if (pfd[1] >= 0)
        close(pfd[1]);
    kt_listen_close(&ls);
    if (agent_fd >= 0)
        close(agent_fd);
    if (agent) {
        int status;
        reap_blocking(agent, &status);
    }
    return rc;
}

static void gen_retire(struct gen *g)
{
    if (g->retiring || !g->pid)
        return;
    g->retiring = 1;
    kill(g->pid, SIGQUIT);
    if (!wait_status(g->status_fd, 'C', RETIRE_TIMEOUT_MS))
        kt_warn("generation %u did not confirm that it stopped accepting", g->id);
}

static void gen_unlink(struct master *m, struct gen *g)
{
    for (struct gen **p = &m->gens; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            break;
        }
    gen_free(g);
}

static void describe_exit(int status, char *buf, size_t len)
{
    if (WIFEXITED(status))
        snprintf(buf, len, "exit status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, len, "status %d", status);
}

/* Collect exited children. Returns 1 when the serving generation's worker
 * died (the master then stops everything). */
static int reap(struct master *m)
{
    int status, fatal = 0;
    pid_t pid;
    char how[64];
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (struct gen *g = m->gens, *next; g; g = next) {
            next = g->next;
            if (g->agent == pid) {
                g->agent = 0;
                if (g->pid) {
                    describe_exit(status, how, sizeof(how));
                    kt_err("generation %u: local delivery agent exited (%s)", g->id, how);
                }
            } else if (g->pid == pid) {
                g->pid = 0;
                describe_exit(status, how, sizeof(how));
                if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                    m->failed = 1;
                    kt_err("generation %u: worker process %d ended (%s)", g->id, (int)pid, how);
                    if (g == m->gens && !g->retiring)
                        fatal = 1;
                } else {
                    kt_info("generation %u: finished", g->id);
                }
            }
            if (!g->pid && !g->agent && g != m->gens)
                gen_unlink(m, g);
        }
    }
    return fatal;
}

static void reload(struct master *m)
{
    struct kt_config *cfg;
    struct kt_runtime *rt;
    struct gen *old = m->gens, *g;

    /* after log rotation: maillog_file is opened again under its name (the
     * new generation inherits it) */
    int lrc = kt_log_reopen();
    if (lrc < 0)
        kt_warn("reload: cannot reopen maillog_file: %s", strerror(-lrc));
    if (kt_config_load(m->config_dir, &cfg) < 0) {
        kt_err("reload: configuration has errors; keeping the running one");
        return;
    }
    if (kt_runtime_new(cfg, &rt) < 0) {
        kt_config_free(cfg);
        kt_err("reload: configuration has errors; keeping the running one");
        return;
    }
    int rc = gen_start(m, rt, &g);
    kt_runtime_unref(rt);
    if (rc < 0) {
        kt_err("reload: cannot start the new configuration; keeping the running one");
        return;
    }
    if (old)
        gen_retire(old);
    kt_info("reload: configuration reloaded (generation %u serving)", g->id);
}

int kt_master_run(struct kt_runtime *rt, const char *config_dir)
{
    struct master m;
    struct gen *g;
    char why[256];

    memset(&m, 0, sizeof(m));
    m.config_dir = config_dir;
    m.privileged = geteuid() == 0;
    kt_log_set_program("master");

    if (kt_ktls_probe(why, sizeof(why)))
        kt_info("kernel TLS: available (tls ULP); TLS sessions hand record encryption to the kernel");
    else
        kt_info("kernel TLS: not available: %s; TLS stays in userspace OpenSSL", why);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    int rc = gen_start(&m, rt, &g);
    kt_runtime_unref(rt);
    if (rc <= -1000)
        return -rc - 1000;
    if (rc < 0)
        return EX_UNAVAILABLE;
    kt_info("daemon started -- version %s, %u worker threads", KT_VERSION, g->rt->worker_threads);
    /* every listener is bound and the worker accepts: systemd may start dependants */
    kt_notify_ready("accepting mail");

    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            kt_notify_reloading();
            reload(&m);
            kt_notify_ready("accepting mail");
            continue;
        }
        if (sig == SIGCHLD) {
            if (reap(&m)) {
                kt_err("the worker process died; stopping");
                break;
            }
            continue;
        }
        kt_notify_stopping();
        kt_info("terminating on signal %d", sig);
        break;
    }
    for (g = m.gens; g; g = g->next)
        if (g->pid)
            kill(g->pid, SIGTERM);
    while (m.gens) {
        g = m.gens;
        int status;
        char how[64];
        if (g->pid) {
            reap_blocking(g->pid, &status);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                describe_exit(status, how, sizeof(how));
                kt_err("generation %u: worker process %d ended (%s)", g->id, (int)g->pid, how);
                m.failed = 1;
            }
        }
        if (g->agent)
            reap_blocking(g->agent, &status);
        m.gens = g->next;
        gen_free(g);
    }
    kt_info("stopped");
    return m.failed ? EX_SOFTWARE : 0;
}
