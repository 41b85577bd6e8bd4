/* Maildir delivery through io_uring (see maildir.h for the contract).
 *
 * Every file system step is an io_uring operation (openat, write,
 * fsync, renameat, linkat, unlinkat, mkdirat) so the event loop never waits
 * on the disk; many deliveries from many sessions overlap their fsyncs.
 * A Maildir delivery spools into an unnamed O_TMPFILE in the first mailbox's
 * tmp/ and, once the file is fsync'd, links it by /proc/self/fd into each
 * new/: no name is made and removed in tmp/, and the file's fsync does not
 * have to write tmp/ too (ext4 syncs the directory of a newly named inode).
 * Without O_TMPFILE or /proc, and for queue files, a named tmp/ file is
 * renamed (one mailbox) or linked (several) as maildir(5) describes.
 * Error paths that undo links use plain unlink(2): they are rare and short. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/dirsync.h"
#include "core/log.h"
#include "delivery/local.h"
#include "delivery/maildir.h"

#define MAX_INFLIGHT_BYTES (4 * KT_DELIVERY_CHUNK)

enum stage {
    ST_NEW, ST_OPENING, ST_MKDIRS, ST_OPEN, ST_COMMIT_WRITES, ST_FSYNC_FILE, ST_LINKING, ST_LINK_MKDIRS,
    ST_UNLINK_TMP, ST_DIR_FSYNC, ST_AGENT, ST_DONE, ST_FAILED,
};

struct wchunk {
    struct kt_op op;
    struct kt_delivery *d;
    char *data;
    size_t len, done, cap;
    off_t off;
};

struct kt_delivery {
    struct kt_loop *loop;
    struct kt_op op;                 /* the main chain: one step at a time */
    enum stage stage;
    int fd;
    int abandoned;
    int error;
    unsigned pending;                /* operations in flight */
    char name[192];                  /* unique base name */
    char final_name[256];            /* name in new/ with ,S= and ,W= */
    int exact_name;                  /* queue file: final_name = name, never replace */
    char new_dir[8];                 /* "new", or "hold" for a held queue file */
    char tmp_path[PATH_MAX];
    size_t n_boxes;
    struct kt_mailbox *boxes;        /* n_boxes entries; paths owned (box_paths) */
    char **box_paths;
    size_t step;                     /* index into boxes while linking / fsyncing dirs */
    size_t linked;                   /* how many new/ names exist */
    struct kt_dirsync_waiter dirsync; /* waiting for new/ to be fsync'd */
    int mkdir_left;                  /* mkdirat operations still in flight */
    int mkdir_tried;
    int reuse;                       /* tmp_path is an existing spare file (kt_delivery_reuse_file) */
    int tmpfile;                     /* spool is an O_TMPFILE in tmp_path (a directory), linked by proc_path */
    char proc_path[32];              /* "/proc/self/fd/N" of the spool, for linkat */
    struct kt_op link_op;            /* the first link, chained after the file's fsync (IOSQE_IO_LINK) */
    int chain_left;                  /* completions of that chain still to come */
    int chain_fsync_res, chain_link_res;
    size_t mkdir_box;                /* the mailbox whose directories are being made */
    size_t link_mkdir_tried;         /* 1 + index of the last box made while linking */

    struct wchunk *cur;              /* chunk being filled */
    size_t inflight_bytes;
    unsigned inflight_writes;
    off_t size;                      /* bytes accepted so far (next file offset) */

    kt_delivery_cb cb, drain_cb, flush_cb;
    void *arg, *drain_arg, *flush_arg;
    struct kt_op flush_op;           /* completes a flush with nothing in flight */
    int want_drain;

    char paths[2][PATH_MAX];         /* scratch for mkdirat/linkat/renameat arguments */
    void *user;                      /* kt_delivery_set_user */
    void (*user_free)(void *);

    /* mailboxes written by the local delivery agent (other owners) */
    size_t n_agent;
    struct kt_mailbox *agent_boxes;  /* n_agent of them */
    int anon_spool;                  /* no direct mailbox: the spool is an O_TMPFILE */
    int agent_sock;                  /* our end of the reply socket */
    struct kt_local_reply agent_reply;
};

/* Set once per worker process before any delivery (kt_delivery_use_agent). */
static int agent_fd = -1;
static char agent_spool_dir[PATH_MAX];
static unsigned direct_uid;

void kt_delivery_use_agent(int fd, const char *spool_dir, unsigned uid)
{
    agent_fd = fd;
    snprintf(agent_spool_dir, sizeof(agent_spool_dir), "%s", spool_dir ? spool_dir : "");
    direct_uid = uid;
}

/* Written here, on the io_uring path: virtual mailboxes of our own uid, or
 * everything when there is no agent (ktrelay started by a normal user). */
static int box_is_direct(const struct kt_mailbox *b)
{
    return agent_fd < 0 || (!b->home && b->uid == direct_uid);
}

/* O_TMPFILE spools need /proc/self/fd to be linked without CAP_DAC_READ_SEARCH (linkat(2)); without
 * /proc (a chroot without it) named tmp/ files are used. Probed once per process. */
static int tmpfile_usable(void)
{
    static int usable = -1;
    if (usable < 0)
        usable = access("/proc/self/fd", X_OK) == 0;
    return usable;
}

static void delivery_step(struct kt_op *op, int res, unsigned flags);
static void chain_link_done(struct kt_op *op, int res, unsigned flags);
static void chunk_done(struct kt_op *op, int res, unsigned flags);
static void commit_continue(struct kt_delivery *d);
static void submit_dir_sync(struct kt_delivery *d);
static void submit_agent(struct kt_delivery *d);

static unsigned long seq_counter;

static void escape_host(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (; *in && o + 5 < outlen; in++) {
        /* maildir(5): '/' and ':' are not allowed in the name */
        if (*in == '/')
            o += (size_t)snprintf(out + o, outlen - o, "\\057");
        else if (*in == ':')
            o += (size_t)snprintf(out + o, outlen - o, "\\072");
        else
            out[o++] = *in;
    }
    out[o] = '\0';
}

struct kt_delivery *kt_delivery_new(struct kt_loop *loop, const struct kt_mailbox *boxes, size_t n,
                                    const char *hostname, unsigned worker_id, const char *queue_id)
{
    struct kt_delivery *d = kt_calloc(1, sizeof(*d));
    snprintf(d->new_dir, sizeof(d->new_dir), "new");
    struct timeval tv;
    char host[128];

    d->loop = loop;
    d->op.cb = delivery_step;
    d->link_op.cb = chain_link_done;
    d->fd = d->agent_sock = -1;
    d->boxes = kt_calloc(n ? n : 1, sizeof(*d->boxes));
    d->box_paths = kt_calloc(n ? n : 1, sizeof(*d->box_paths));
    d->agent_boxes = kt_calloc(n ? n : 1, sizeof(*d->agent_boxes));
    for (size_t i = 0; i < n; i++) {
        if (box_is_direct(&boxes[i])) {
            size_t k = d->n_boxes++;
            d->box_paths[k] = kt_strdup(boxes[i].path);
            d->boxes[k] = boxes[i];
            d->boxes[k].path = d->box_paths[k];
            d->boxes[k].home = NULL;
        } else {
            int dup = 0;
            for (size_t j = 0; j < d->n_agent; j++)
                dup |= !strcmp(d->agent_boxes[j].path, boxes[i].path);
            if (dup)
                continue;
            struct kt_mailbox *a = &d->agent_boxes[d->n_agent++];
            *a = boxes[i];
            a->path = kt_strdup(boxes[i].path);
            a->home = boxes[i].home ? kt_strdup(boxes[i].home) : NULL;
        }
    }
    d->anon_spool = d->n_boxes == 0;
    gettimeofday(&tv, NULL);
    escape_host(hostname, host, sizeof(host));
    unsigned long seq = __atomic_add_fetch(&seq_counter, 1, __ATOMIC_RELAXED);
    if (queue_id && *queue_id)
        snprintf(d->name, sizeof(d->name), "%lld.I%.24sM%ldP%dQ%ux%lu.%s", (long long)tv.tv_sec, queue_id,
                 (long)tv.tv_usec, (int)getpid(), worker_id, seq, host);
    else
        snprintf(d->name, sizeof(d->name), "%lld.M%ldP%dQ%ux%lu.%s", (long long)tv.tv_sec, (long)tv.tv_usec,
                 (int)getpid(), worker_id, seq, host);
    if (d->anon_spool) {
        snprintf(d->tmp_path, sizeof(d->tmp_path), "%s", agent_spool_dir);
    } else if (tmpfile_usable()) {
        d->tmpfile = 1;
        snprintf(d->tmp_path, sizeof(d->tmp_path), "%stmp", d->boxes[0].path);
    } else {
        snprintf(d->tmp_path, sizeof(d->tmp_path), "%stmp/%s", d->boxes[0].path, d->name);
    }
    return d;
}

void kt_delivery_set_new_dir(struct kt_delivery *d, const char *dir)
{
    snprintf(d->new_dir, sizeof(d->new_dir), "%s", dir);
}

void kt_delivery_set_exact_name(struct kt_delivery *d, const char *name)
{
    d->exact_name = 1;
    d->tmpfile = 0;
    snprintf(d->name, sizeof(d->name), "%s", name);
    snprintf(d->tmp_path, sizeof(d->tmp_path), "%stmp/%s", d->boxes[0].path, d->name);
}

static void delivery_free(struct kt_delivery *d)
{
    if (d->fd >= 0)
        close(d->fd);
    if (d->cur) {
        kt_free(d->cur->data);
        kt_free(d->cur);
    }
    if (d->agent_sock >= 0)
        close(d->agent_sock);
    for (size_t i = 0; i < d->n_boxes; i++)
        kt_free(d->box_paths[i]);
    kt_free(d->box_paths);
    kt_free(d->boxes);
    if (d->user && d->user_free)
        d->user_free(d->user);
    for (size_t i = 0; i < d->n_agent; i++) {
        kt_free((char *)d->agent_boxes[i].path);
        kt_free((char *)d->agent_boxes[i].home);
    }
    kt_free(d->agent_boxes);
    kt_free(d);
}

void kt_delivery_set_user(struct kt_delivery *d, void *user, void (*free_fn)(void *))
{
    d->user = user;
    d->user_free = free_fn;
}

void *kt_delivery_take_user(struct kt_delivery *d)
{
    void *u = d->user;
    d->user = NULL;
    return u;
}

/* Remove every trace of an undelivered message. */
static void delivery_cleanup_files(struct kt_delivery *d)
{
    char path[PATH_MAX];
    for (size_t i = 0; i < d->linked; i++) {
        snprintf(path, sizeof(path), "%s%s/%s", d->boxes[i].path, d->new_dir, d->final_name);
        unlink(path);
    }
    d->linked = 0;
    if (!d->anon_spool && !d->tmpfile && d->stage != ST_NEW && d->stage != ST_OPENING && d->stage != ST_MKDIRS)
        unlink(d->tmp_path);
}

/* Called whenever an operation finished: free an abandoned delivery once idle. */
static int delivery_release_if_abandoned(struct kt_delivery *d)
{
    if (!d->abandoned || d->pending)
        return 0;
    if (d->stage != ST_DONE)
        delivery_cleanup_files(d);
    delivery_free(d);
    return 1;
}

static void delivery_finish(struct kt_delivery *d, int res)
{
    kt_delivery_cb cb = d->cb;
    d->cb = NULL;
    if (res < 0) {
        if (!d->error)
            d->error = res;
        delivery_cleanup_files(d);
        d->stage = ST_FAILED;
    }
    if (delivery_release_if_abandoned(d))
        return;
    if (cb)
        cb(d->arg, res);
}

static struct io_uring_sqe *delivery_sqe(struct kt_delivery *d, struct kt_op *op)
{
    d->pending++;
    return kt_loop_sqe(d->loop, op);
}

static void submit_open(struct kt_delivery *d)
{
    struct io_uring_sqe *sqe = delivery_sqe(d, &d->op);
    d->stage = ST_OPENING;
    /* readable too: the local delivery agent copies from this descriptor */
    if (d->reuse)
        io_uring_prep_openat(sqe, AT_FDCWD, d->tmp_path, O_RDWR | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0);
    else if (d->anon_spool)
        io_uring_prep_openat(sqe, AT_FDCWD, d->tmp_path, O_RDWR | O_TMPFILE | O_CLOEXEC, 0600);
    else if (d->tmpfile)
        io_uring_prep_openat(sqe, AT_FDCWD, d->tmp_path, O_RDWR | O_TMPFILE | O_NOFOLLOW | O_CLOEXEC, 0600);
    else
        io_uring_prep_openat(sqe, AT_FDCWD, d->tmp_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
}

void kt_delivery_reuse_file(struct kt_delivery *d, const char *path)
{
    d->tmpfile = 0;
    if (snprintf(d->tmp_path, sizeof(d->tmp_path), "%s", path) < (int)sizeof(d->tmp_path))
        d->reuse = 1;
    else
        snprintf(d->tmp_path, sizeof(d->tmp_path), "%stmp/%s", d->boxes[0].path, d->name);
}

/* mkdir -p of the Maildir and its tmp/ new/ cur/, as one hard-linked chain so
 * that an EEXIST in the middle does not cancel the rest. Nothing at or above
 * the mailbox's `keep` prefix (a user's home directory) is ever created: a
 * missing home fails the delivery (451, the client retries) instead of
 * appearing with the Maildir, as /nonexistent/Maildir would. */
static void submit_mkdirs(struct kt_delivery *d, size_t box, enum stage stage)
{
    static const char *const sub[] = { "tmp", "new", "cur" };
    const char *base = d->boxes[box].path;
    size_t len = strlen(base), first = d->boxes[box].keep > 1 ? d->boxes[box].keep : 1;
    char *dirs[24];
    int n = 0;

    /* every prefix ending at a '/' below the kept part (skip the root) */
    for (size_t i = first; i < len && n < 20; i++) {
        if (base[i] == '/')
            dirs[n++] = kt_strndup(base, i);
    }
    /* folders above the Maildir stay traversable for an IMAP server running
     * as the mailbox owner; the Maildir itself is private (0700) */
    int n_parents = n - 1;
    for (int k = 0; k < 3; k++)
        dirs[n++] = kt_asprintf("%s%s", base, sub[k]);
    d->stage = stage;
    d->mkdir_box = box;
    d->mkdir_left = n;
    for (int i = 0; i < n; i++) {
        struct io_uring_sqe *sqe = delivery_sqe(d, &d->op);
        io_uring_prep_mkdirat(sqe, AT_FDCWD, dirs[i], i < n_parents ? 0755 : 0700);
        if (i + 1 < n)
            sqe->flags |= IOSQE_IO_HARDLINK;
    }
    /* The kernel copies path names while it prepares requests, which happens
     * inside the submit call: submit now so the strings can be freed. */
    io_uring_submit(&d->loop->ring);
    d->loop->pending_sqes = 0;
    for (int i = 0; i < n; i++)
        kt_free(dirs[i]);
}

void kt_delivery_open(struct kt_delivery *d, kt_delivery_cb cb, void *arg)
{
    d->cb = cb;
    d->arg = arg;
    submit_open(d);
}

/* After directories were made for a mailbox: fsync every directory that may
 * have gained an entry, from the kept prefix (or the root) down to the
 * Maildir itself, so that a crash cannot lose the mailbox a 250 relied on.
 * Rare (once per new mailbox), so done synchronously. */
static void fsync_made_dirs(struct kt_delivery *d, size_t box)
{
    const char *base = d->boxes[box].path;
    size_t len = strlen(base), keep = d->boxes[box].keep;
    char path[PATH_MAX];

    for (size_t i = 1; i <= len && i < sizeof(path); i++) {
        if (base[i - 1] != '/' || i < keep)
            continue;
        memcpy(path, base, i);
        path[i] = '\0';
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (fsync(fd) < 0 && !d->error)
            d->error = -errno;
        close(fd);
    }
}

/* ---- body writes ----
 *
 * Bytes collect in a chunk buffer that is written out (io_uring WRITE at its file offset) once full. A message's
 * first chunk is small (most messages fit in it, and idle memory matters); every later one is a whole
 * KT_DELIVERY_CHUNK from the start, so no body byte is ever copied by a growing realloc. Up to
 * MAX_INFLIGHT_BYTES are written concurrently; the caller is told to wait (drain callback) beyond that. */

#define FIRST_CHUNK 16384

static struct wchunk *chunk_new(struct kt_delivery *d)
{
    struct wchunk *c = kt_calloc(1, sizeof(*c));
    c->op.cb = chunk_done;
    c->d = d;
    c->cap = d->size == 0 ? FIRST_CHUNK : KT_DELIVERY_CHUNK;
    c->data = kt_malloc(c->cap);
    c->off = d->size;
    return c;
}

static void chunk_submit_rest(struct wchunk *c)
{
    struct io_uring_sqe *sqe = delivery_sqe(c->d, &c->op);
    io_uring_prep_write(sqe, c->d->fd, c->data + c->done, (unsigned)(c->len - c->done),
                        (unsigned long long)(c->off + (off_t)c->done));
}

static void chunk_submit(struct kt_delivery *d)
{
    struct wchunk *c = d->cur;
    d->cur = NULL;
    if (!c)
        return;
    if (c->len == 0 || d->error) {
        kt_free(c->data);
        kt_free(c);
        return;
    }
    d->inflight_bytes += c->len;
    d->inflight_writes++;
    chunk_submit_rest(c);
}

static void writeback_started(struct kt_op *op, int res, unsigned flags)
{
    struct wchunk *c = (struct wchunk *)op;
    struct kt_delivery *d = c->d;
    d->pending--;
    kt_free(c);
    delivery_release_if_abandoned(d);
}

static void chunk_done(struct kt_op *op, int res, unsigned flags)
{
    struct wchunk *c = (struct wchunk *)op;
    struct kt_delivery *d = c->d;
    d->pending--;
    if (res > 0 && !d->error) {
        c->done += (size_t)res;
        if (c->done < c->len) {
            chunk_submit_rest(c);
            return;
        }
    } else if (!d->error) {
        d->error = res < 0 ? res : -EIO;
        kt_err("write %s: %s", d->tmp_path, strerror(-d->error));
    }
    d->inflight_bytes -= c->len;
    d->inflight_writes--;
    kt_free(c->data);
    c->data = NULL;
    if (c->len == KT_DELIVERY_CHUNK && !d->error && d->stage < ST_COMMIT_WRITES) {
        /* A large message: start writing this chunk back now (SYNC_FILE_RANGE_WRITE neither waits nor makes
         * anything durable), so that the fsync of the commit finds little left to write. */
        c->op.cb = writeback_started;
        io_uring_prep_sync_file_range(delivery_sqe(d, &c->op), d->fd, (unsigned)c->len, (unsigned long long)c->off,
                                      SYNC_FILE_RANGE_WRITE);
    } else {
        kt_free(c);
    }
    if (delivery_release_if_abandoned(d))
        return;
    if (d->stage == ST_COMMIT_WRITES) {
        commit_continue(d);
        return;
    }
    if (d->flush_cb && d->inflight_writes == 0) {
        kt_delivery_cb cb = d->flush_cb;
        d->flush_cb = NULL;
        cb(d->flush_arg, d->error);
        return;
    }
    if (d->want_drain && d->inflight_bytes < MAX_INFLIGHT_BYTES) {
        d->want_drain = 0;
        if (d->drain_cb)
            d->drain_cb(d->drain_arg, d->error);
    }
}

static int delivery_behind(struct kt_delivery *d)
{
    if (d->inflight_bytes >= MAX_INFLIGHT_BYTES) {
        d->want_drain = 1;
        return 1;
    }
    return 0;
}

int kt_delivery_append(struct kt_delivery *d, const void *data, size_t len)
{
    const char *p = data;
    int behind = delivery_behind(d);
    while (len > 0) {
        size_t room;
        char *dst = kt_delivery_space(d, 1, &room);
        size_t n = room < len ? room : len;
        memcpy(dst, p, n);
        behind = kt_delivery_fill(d, n);
        p += n;
        len -= n;
    }
    return behind;
}

char *kt_delivery_space(struct kt_delivery *d, size_t min, size_t *room)
{
    if (min > KT_DELIVERY_CHUNK)
        min = KT_DELIVERY_CHUNK;
    if (d->cur && d->cur->cap - d->cur->len < min)
        chunk_submit(d);
    if (!d->cur)
        d->cur = chunk_new(d);
    if (d->cur->cap < min) {
        /* an empty first chunk too small for the request: whole from the start */
        kt_free(d->cur->data);
        d->cur->cap = KT_DELIVERY_CHUNK;
        d->cur->data = kt_malloc(d->cur->cap);
    }
    *room = d->cur->cap - d->cur->len;
    return d->cur->data + d->cur->len;
}

int kt_delivery_fill(struct kt_delivery *d, size_t n)
{
    struct wchunk *c = d->cur;
    if (n == 0 || !c)
        return delivery_behind(d);
    c->len += n;
    d->size += (off_t)n;
    if (c->len == c->cap)
        chunk_submit(d);
    return delivery_behind(d);
}

static void flush_now(struct kt_op *op, int res, unsigned flags)
{
    struct kt_delivery *d = (struct kt_delivery *)((char *)op - offsetof(struct kt_delivery, flush_op));
    d->pending--;
    if (delivery_release_if_abandoned(d))
        return;
    kt_delivery_cb cb = d->flush_cb;
    d->flush_cb = NULL;
    if (cb)
        cb(d->flush_arg, d->error);
}

void kt_delivery_flush(struct kt_delivery *d, kt_delivery_cb cb, void *arg)
{
    d->flush_cb = cb;
    d->flush_arg = arg;
    chunk_submit(d);
    if (d->inflight_writes == 0) {
        d->flush_op.cb = flush_now;
        io_uring_prep_nop(delivery_sqe(d, &d->flush_op));
    }
}

int kt_delivery_fd(const struct kt_delivery *d)
{
    return d->fd;
}

void kt_delivery_set_drain_cb(struct kt_delivery *d, kt_delivery_cb cb, void *arg)
{
    d->drain_cb = cb;
    d->drain_arg = arg;
}

static const char *skip_digits(const char *p)
{
    if (*p < '0' || *p > '9')
        return NULL;
    while (*p >= '0' && *p <= '9')
        p++;
    return p;
}

/* "<sec>.[I<queue id>]M<usec>P<pid>Q<worker>x<seq>.<host>" exactly, as kt_delivery_new names files, host
 * escaped as escape_host does. */
static int ktrelay_tmp_name(const char *name, const char *host)
{
    static const char marks[] = "MPQx";
    const char *p = skip_digits(name);

    if (!p || *p++ != '.')
        return 0;
    if (*p == 'I') {
        const char *id = ++p;
        /* queue ids are upper-case hex (kt_queue_new_id), so the 'M' after one is unambiguous */
        while ((*p >= '0' && *p <= '9') || (*p >= 'A' && *p <= 'F'))
            p++;
        if (p == id || p - id > 24)
            return 0;
    }
    for (int k = 0; k < 4; k++) {
        if (*p++ != marks[k] || !(p = skip_digits(p)))
            return 0;
    }
    return *p == '.' && strcmp(p + 1, host) == 0;
}

int kt_maildir_clean_tmp(const char *maildir, const char *hostname, time_t now)
{
    char path[PATH_MAX], host[128];
    struct dirent *e;
    int removed = 0;

    escape_host(hostname, host, sizeof(host));
    snprintf(path, sizeof(path), "%stmp", maildir);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return errno == ENOENT || errno == ENOTDIR ? 0 : -errno;
    DIR *dir = fdopendir(dfd);
    if (!dir) {
        int err = -errno;
        close(dfd);
        return err;
    }
    while ((e = readdir(dir)) != NULL) {
        struct stat st;
        if (!ktrelay_tmp_name(e->d_name, host))
            continue;
        /* lstat through the directory descriptor: a symlink is never followed, only regular files go */
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode))
            continue;
        if (now - st.st_mtime <= KT_MAILDIR_TMP_MAX_AGE)
            continue;
        if (unlinkat(dfd, e->d_name, 0) == 0)
            removed++;
    }
    closedir(dir);
    return removed;
}

int kt_delivery_error(const struct kt_delivery *d)
{
    return d->error;
}

unsigned long long kt_delivery_size(const struct kt_delivery *d)
{
    return (unsigned long long)d->size;
}

const char *kt_delivery_name(const struct kt_delivery *d)
{
    return d->final_name;
}

const char *kt_delivery_agent_reason(const struct kt_delivery *d)
{
    return d->agent_reply.status != 0 && d->agent_reply.reason[0] ? d->agent_reply.reason : NULL;
}

/* ---- zero-copy bytes written by someone else (the connection's splice) ---- */

int kt_delivery_splice_target(struct kt_delivery *d, int *fd, off_t *off)
{
    if (d->error)
        return d->error;
    if (d->fd < 0)
        return -EBADF;
    /* bytes appended so far go to their own offsets first */
    chunk_submit(d);
    *fd = d->fd;
    *off = d->size;
    return 0;
}

void kt_delivery_spliced(struct kt_delivery *d, size_t n)
{
    d->size += (off_t)n;
}

void kt_delivery_fail(struct kt_delivery *d, int err)
{
    if (!d || d->error)
        return;
    d->error = err < 0 ? err : -EIO;
    kt_err("write %s: %s", d->tmp_path, strerror(-d->error));
}

/* ---- commit ---- */

static void prep_link(struct kt_delivery *d, struct kt_op *op)
{
    struct io_uring_sqe *sqe = delivery_sqe(d, op);
    snprintf(d->paths[0], sizeof(d->paths[0]), "%s%s/%s", d->boxes[d->step].path, d->new_dir, d->final_name);
    if (d->tmpfile)
        io_uring_prep_linkat(sqe, AT_FDCWD, d->proc_path, AT_FDCWD, d->paths[0], AT_SYMLINK_FOLLOW);
    else if (d->n_boxes == 1)
        io_uring_prep_renameat(sqe, AT_FDCWD, d->tmp_path, AT_FDCWD, d->paths[0],
                               d->exact_name ? RENAME_NOREPLACE : 0);
    else
        io_uring_prep_linkat(sqe, AT_FDCWD, d->tmp_path, AT_FDCWD, d->paths[0], 0);
}

static void submit_link(struct kt_delivery *d)
{
    prep_link(d, &d->op);
}

static int box_seen_before(struct kt_delivery *d, size_t i)
{
    for (size_t j = 0; j < i; j++)
        if (strcmp(d->boxes[j].path, d->boxes[i].path) == 0)
            return 1;
    return 0;
}

static void dir_synced(struct kt_dirsync_waiter *w, int res)
{
    struct kt_delivery *d = (struct kt_delivery *)((char *)w - offsetof(struct kt_delivery, dirsync));
    d->pending--;
    if (res < 0) {
        kt_err("fsync %s: %s", d->paths[1], strerror(-res));
        delivery_finish(d, res);
        return;
    }
    d->step++;
    submit_dir_sync(d);
}

/* fsync each distinct new/ once; concurrent deliveries share the fsyncs */
static void submit_dir_sync(struct kt_delivery *d)
{
    while (d->step < d->n_boxes && box_seen_before(d, d->step))
        d->step++;
    if (d->step == d->n_boxes) {
        if (d->n_agent) {
            submit_agent(d);
            return;
        }
        d->stage = ST_DONE;
        delivery_finish(d, 0);
        return;
    }
    d->stage = ST_DIR_FSYNC;
    snprintf(d->paths[1], sizeof(d->paths[1]), "%s%s", d->boxes[d->step].path, d->new_dir);
    d->dirsync.done = dir_synced;
    d->pending++;
    kt_dirsync_request(d->loop, d->paths[1], &d->dirsync);
}

/* Hand the spooled message to the local delivery agent: the request, the
 * spool descriptor and the socket the answer comes back on. */
static void submit_agent(struct kt_delivery *d)
{
    const size_t len = offsetof(struct kt_local_req, boxes) + d->n_agent * sizeof(struct kt_local_box);
    struct kt_local_req *req = kt_calloc(1, sizeof(*req));
    int sv[2] = { -1, -1 }, rc = 0;

    req->magic = KT_LOCAL_MAGIC;
    req->n_boxes = (uint32_t)d->n_agent;
    req->n_total = (uint32_t)(d->n_agent + d->n_boxes);
    req->size = (uint64_t)d->size;
    snprintf(req->name, sizeof(req->name), "%s", d->final_name);
    for (size_t i = 0; i < d->n_agent; i++) {
        const struct kt_mailbox *b = &d->agent_boxes[i];
        struct kt_local_box *r = &req->boxes[i];
        r->uid = b->uid;
        r->gid = b->gid;
        if (strlen(b->path) >= sizeof(r->path) || (b->home && strlen(b->home) >= sizeof(r->home))) {
            rc = -ENAMETOOLONG;
            goto cleanup;
        }
        strcpy(r->path, b->path);
        strcpy(r->home, b->home ? b->home : "");
    }
    if (agent_fd < 0 || d->n_agent > KT_LOCAL_MAX_BOXES) {
        rc = -EPIPE;
        goto cleanup;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        rc = -errno;
        goto cleanup;
    }
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct iovec iov = { req, len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fds[2] = { d->fd, sv[1] };
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(c), fds, sizeof(fds));
    while (sendmsg(agent_fd, &msg, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR) {
            rc = -errno;
            goto cleanup;
        }
    }
    d->agent_sock = sv[0];
    sv[0] = -1;
    d->stage = ST_AGENT;
    struct io_uring_sqe *sqe = delivery_sqe(d, &d->op);
    io_uring_prep_recv(sqe, d->agent_sock, &d->agent_reply, sizeof(d->agent_reply), 0);
cleanup:
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    kt_free(req);
    if (rc < 0) {
        kt_err("cannot reach the local delivery agent: %s", strerror(-rc));
        delivery_finish(d, rc);
    }
}

static void commit_continue(struct kt_delivery *d)
{
    if (d->inflight_writes > 0)
        return;      /* chunk_done calls back here */
    if (d->error) {
        delivery_finish(d, d->error);
        return;
    }
    if (d->anon_spool) {
        /* nothing of ours to make durable: the agent fsyncs its copies */
        submit_agent(d);
        return;
    }
    d->stage = ST_FSYNC_FILE;
    d->step = 0;
    struct io_uring_sqe *sqe = delivery_sqe(d, &d->op);
    io_uring_prep_fsync(sqe, d->fd, 0);
    if (d->tmpfile) {
        /* The first link runs right after the fsync, only if it succeeded (else it completes with
         * -ECANCELED): one trip through the loop instead of two. */
        sqe->flags |= IOSQE_IO_LINK;
        d->chain_left = 2;
        prep_link(d, &d->link_op);
    }
}

void kt_delivery_commit(struct kt_delivery *d, kt_delivery_cb cb, void *arg)
{
    d->cb = cb;
    d->arg = arg;
    if (d->exact_name)
        snprintf(d->final_name, sizeof(d->final_name), "%s", d->name);
    else
        snprintf(d->final_name, sizeof(d->final_name), "%s,S=%lld,W=%lld", d->name, (long long)d->size,
                 (long long)d->size);
    d->stage = ST_COMMIT_WRITES;
    chunk_submit(d);
    commit_continue(d);
}

/* A link into new/ (box d->step) completed with res. */
static void link_done(struct kt_delivery *d, int res)
{
    /* only the first mailbox was made before the message was spooled */
    if (res == -ENOENT && d->link_mkdir_tried != d->step + 1) {
        d->link_mkdir_tried = d->step + 1;
        submit_mkdirs(d, d->step, ST_LINK_MKDIRS);
        return;
    }
    if (res < 0 && !(res == -EEXIST && box_seen_before(d, d->step))) {
        kt_err("link %s -> %s: %s", d->tmp_path, d->paths[0], strerror(-res));
        delivery_finish(d, res);
        return;
    }
    if (res == 0)
        d->linked = d->step + 1;
    if (++d->step < d->n_boxes) {
        submit_link(d);
        return;
    }
    d->step = 0;
    if (d->n_boxes > 1 && !d->tmpfile) {
        d->stage = ST_UNLINK_TMP;
        struct io_uring_sqe *sqe = delivery_sqe(d, &d->op);
        io_uring_prep_unlinkat(sqe, AT_FDCWD, d->tmp_path, 0);
        return;
    }
    submit_dir_sync(d);
}

/* Both completions of the fsync -> first link chain are in (in either order): go on as the unchained
 * steps would. A failed fsync cancels the link, so nothing unsynced ever gets a name in new/. */
static void chain_step(struct kt_delivery *d)
{
    if (--d->chain_left > 0)
        return;
    if (d->chain_fsync_res < 0) {
        if (d->chain_link_res == 0)
            d->linked = 1;
        kt_err("fsync %s: %s", d->tmp_path, strerror(-d->chain_fsync_res));
        delivery_finish(d, d->chain_fsync_res);
        return;
    }
    d->stage = ST_LINKING;
    link_done(d, d->chain_link_res);
}

static void chain_link_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_delivery *d = (struct kt_delivery *)((char *)op - offsetof(struct kt_delivery, link_op));
    d->pending--;
    d->chain_link_res = res;
    chain_step(d);
}

/* The open failed for a way without a name (a reused spare file, or O_TMPFILE): open a named file in
 * the first mailbox's tmp/ instead, unless the delivery was abandoned meanwhile. */
static void reopen_named(struct kt_delivery *d)
{
    snprintf(d->tmp_path, sizeof(d->tmp_path), "%stmp/%s", d->boxes[0].path, d->name);
    if (delivery_release_if_abandoned(d))
        return;
    submit_open(d);
}

static void delivery_step(struct kt_op *op, int res, unsigned flags)
{
    struct kt_delivery *d = (struct kt_delivery *)((char *)op - offsetof(struct kt_delivery, op));
    d->pending--;

    switch (d->stage) {
    case ST_OPENING:
        if (res < 0 && d->reuse) {
            /* the spare is gone: a file of our own after all */
            d->reuse = 0;
            reopen_named(d);
            return;
        }
        if (res == -ENOENT && !d->mkdir_tried && !d->anon_spool) {
            d->mkdir_tried = 1;
            submit_mkdirs(d, 0, ST_MKDIRS);
            return;
        }
        if ((res == -EOPNOTSUPP || res == -EISDIR) && d->tmpfile) {
            /* a file system without O_TMPFILE: a named tmp/ file */
            d->tmpfile = 0;
            reopen_named(d);
            return;
        }
        if (res < 0) {
            kt_err("open %s: %s", d->tmp_path, strerror(-res));
            delivery_finish(d, res);
            return;
        }
        d->fd = res;
        if (d->tmpfile)
            snprintf(d->proc_path, sizeof(d->proc_path), "/proc/self/fd/%d", res);
        d->stage = ST_OPEN;
        delivery_finish(d, 0);
        return;
    case ST_MKDIRS:
        if (--d->mkdir_left > 0)
            return;
        fsync_made_dirs(d, 0);
        if (delivery_release_if_abandoned(d))
            return;
        submit_open(d);
        return;
    case ST_LINK_MKDIRS:
        if (--d->mkdir_left > 0)
            return;
        fsync_made_dirs(d, d->mkdir_box);
        d->stage = ST_LINKING;
        submit_link(d);
        return;
    case ST_FSYNC_FILE:
        if (d->chain_left) {
            d->chain_fsync_res = res;
            chain_step(d);
            return;
        }
        if (res < 0) {
            kt_err("fsync %s: %s", d->tmp_path, strerror(-res));
            delivery_finish(d, res);
            return;
        }
        d->stage = ST_LINKING;
        d->step = 0;
        submit_link(d);
        return;
    case ST_LINKING:
        link_done(d, res);
        return;
    case ST_UNLINK_TMP:
        if (res < 0)
            kt_warn("unlink %s: %s", d->tmp_path, strerror(-res));
        submit_dir_sync(d);
        return;
    case ST_AGENT:
        if (res != (int)sizeof(d->agent_reply)) {
            kt_err("local delivery agent: %s", res < 0 ? strerror(-res) : "no answer");
            delivery_finish(d, res < 0 ? res : -EPIPE);
            return;
        }
        if (d->agent_reply.status != 0) {
            d->agent_reply.reason[sizeof(d->agent_reply.reason) - 1] = '\0';
            kt_warn("delivery deferred: %s", d->agent_reply.reason);
            delivery_finish(d, d->agent_reply.status > 0 ? -d->agent_reply.status : -EIO);
            return;
        }
        d->stage = ST_DONE;
        delivery_finish(d, 0);
        return;
    default:
        delivery_release_if_abandoned(d);
        return;
    }
}

void kt_delivery_abandon(struct kt_delivery *d)
{
    if (!d)
        return;
    d->abandoned = 1;
    d->cb = d->drain_cb = d->flush_cb = NULL;
    /* A commit under way finishes (the client sent its final dot, so the
     * message may be delivered, as with any SMTP server); anything earlier is
     * removed once the operations in flight complete. */
    if (d->stage >= ST_COMMIT_WRITES && d->stage < ST_DONE)
        return;
    delivery_release_if_abandoned(d);
}
