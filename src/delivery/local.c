/* The local delivery agent (see local.h for the contract and the request
 * interface). One agent process per worker generation; each request is
 * handled in a child of the agent, and each copy is written by a grandchild
 * that runs with the recipient's uid and gid, so the agent itself never opens
 * a file in a user's directory with root's rights: only the home directory
 * (or virtual_mailbox_base) is opened as root, as an O_PATH handle, because
 * the directories above it need not be searchable by the recipient. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/openat2.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "delivery/local.h"

static int openat2_dir(int dirfd, const char *path, int flags, unsigned long long resolve)
{
    struct open_how how = { .flags = (unsigned long long)(flags | O_DIRECTORY | O_CLOEXEC), .resolve = resolve };
    long fd;
    do
        fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    while (fd < 0 && errno == EAGAIN);
    return (int)fd;
}

/* One folder below DIRFD: never through a symbolic link, created (0700) when
 * missing and CREATE is set. SHOWN is the path for messages. */
static int open_folder(int dirfd, const char *name, int flags, int create, const char *shown, char *why,
                       size_t whylen)
{
    const unsigned long long res = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    int fd = openat2_dir(dirfd, name, flags, res);
    if (fd < 0 && errno == ENOENT && create) {
        if (mkdirat(dirfd, name, 0700) < 0 && errno != EEXIST) {
            int e = errno;
            kt_set_err(why, whylen, "cannot create %s: %s", shown, strerror(e));
            return -e;
        }
        fd = openat2_dir(dirfd, name, flags, res);
    }
    if (fd < 0) {
        int e = errno;
        if (e == ELOOP || e == EXDEV)
            kt_set_err(why, whylen, "%s is a symbolic link", shown);
        else if (e == ENOTDIR)
            kt_set_err(why, whylen, "%s is not a directory", shown);
        else
            kt_set_err(why, whylen, "cannot open %s: %s", shown, strerror(e));
        return -e;
    }
    return fd;
}

static int check_owner(int fd, uid_t uid, const char *shown, char *why, size_t whylen)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        kt_set_err(why, whylen, "cannot stat %s: %s", shown, strerror(e));
        return -e;
    }
    if (!S_ISDIR(st.st_mode)) {
        kt_set_err(why, whylen, "%s is not a directory", shown);
        return -ENOTDIR;
    }
    if (st.st_uid != uid) {
        kt_set_err(why, whylen, "%s is owned by uid %u, not by the recipient (uid %u)", shown,
                   (unsigned)st.st_uid, (unsigned)uid);
        return -EPERM;
    }
    return 0;
}

static int copy_message(int out, int msg_fd, uint64_t size)
{
    off_t off = 0;
    while ((uint64_t)off < size) {
        uint64_t left = size - (uint64_t)off;
        ssize_t n = sendfile(out, msg_fd, &off, left > (1u << 30) ? (1u << 30) : (size_t)left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;      /* the spool file is shorter than announced */
    }
    return 0;
}

int kt_local_deliver_box(int root_fd, const char *rel, uid_t uid, int msg_fd, uint64_t size, const char *name,
                         char *why, size_t whylen)
{
    static const char *const sub[] = { "tmp", "new", "cur" };
    int dir = -1, fds[3] = { -1, -1, -1 }, file = -1, rc = 0;
    char shown[KT_LOCAL_PATH_MAX + 16], comp[256];
    size_t shown_len = 0;
    const char *p = rel;

    shown[0] = '\0';
    dir = dup(root_fd);
    if (dir < 0) {
        rc = -errno;
        kt_set_err(why, whylen, "dup: %s", strerror(-rc));
        goto cleanup;
    }
    /* the folders down to the Maildir, one component at a time */
    while (*p) {
        size_t len = strcspn(p, "/");
        if (len == 0) {
            p++;
            continue;
        }
        if (len >= sizeof(comp) || (len == 2 && !memcmp(p, "..", 2)) || (len == 1 && p[0] == '.')) {
            rc = -EINVAL;
            kt_set_err(why, whylen, "bad mailbox path %s", rel);
            goto cleanup;
        }
        memcpy(comp, p, len);
        comp[len] = '\0';
        p += len;
        shown_len += (size_t)snprintf(shown + shown_len, sizeof(shown) - shown_len, "%s%s", shown_len ? "/" : "",
                                      comp);
        if (shown_len >= sizeof(shown)) {
            rc = -ENAMETOOLONG;
            kt_set_err(why, whylen, "mailbox path too long");
            goto cleanup;
        }
        int next = open_folder(dir, comp, O_PATH, 1, shown, why, whylen);
        if (next < 0) {
            rc = next;
            goto cleanup;
        }
        close(dir);
        dir = next;
    }
    if (!shown_len) {
        rc = -EINVAL;
        kt_set_err(why, whylen, "empty mailbox path");
        goto cleanup;
    }
    if ((rc = check_owner(dir, uid, shown, why, whylen)) < 0)
        goto cleanup;
    for (int k = 0; k < 3; k++) {
        char sub_shown[sizeof(shown) + 8];
        snprintf(sub_shown, sizeof(sub_shown), "%s/%s", shown, sub[k]);
        fds[k] = open_folder(dir, sub[k], k == 1 ? O_RDONLY : O_PATH, 1, sub_shown, why, whylen);
        if (fds[k] < 0) {
            rc = fds[k];
            goto cleanup;
        }
        if ((rc = check_owner(fds[k], uid, sub_shown, why, whylen)) < 0)
            goto cleanup;
    }
    if (msg_fd < 0)
        goto cleanup;            /* a check only: every folder is there and the recipient's */
    file = openat(fds[0], name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (file < 0) {
        rc = -errno;
        if (rc == -EEXIST)
            kt_set_err(why, whylen, "%s/tmp/%s already exists", shown, name);
        else
            kt_set_err(why, whylen, "cannot create %s/tmp/%s: %s", shown, name, strerror(-rc));
        goto cleanup;
    }
    if ((rc = copy_message(file, msg_fd, size)) < 0 || (fsync(file) < 0 && (rc = -errno) < 0)) {
        kt_set_err(why, whylen, "cannot write %s/tmp/%s: %s", shown, name, strerror(-rc));
        unlinkat(fds[0], name, 0);
        goto cleanup;
    }
    if (renameat2(fds[0], name, fds[1], name, RENAME_NOREPLACE) < 0) {
        rc = -errno;
        kt_set_err(why, whylen, "cannot move %s/tmp/%s to new/: %s", shown, name, strerror(-rc));
        unlinkat(fds[0], name, 0);
        goto cleanup;
    }
    if (fsync(fds[1]) < 0) {
        rc = -errno;
        kt_set_err(why, whylen, "fsync %s/new: %s", shown, strerror(-rc));
        unlinkat(fds[1], name, 0);
        goto cleanup;
    }
cleanup:
    if (file >= 0)
        close(file);
    for (int k = 0; k < 3; k++)
        if (fds[k] >= 0)
            close(fds[k]);
    if (dir >= 0)
        close(dir);
    return rc;
}

/* ---- the agent process ---- */

struct agent {
    const char *vbase;            /* virtual_mailbox_base, "" when unset */
    int check_forward;            /* forward_path is not empty: a user with $home/.forward is deferred */
};

static int path_below(const char *path, const char *root)
{
    size_t n = strlen(root);
    while (n > 1 && root[n - 1] == '/')
        n--;
    if (n == 1 && root[0] == '/')
        return path[0] == '/';
    return !strncmp(path, root, n) && path[n] == '/';
}

static int name_ok(const char *name)
{
    size_t len = strnlen(name, 256);
    if (len == 0 || len >= 256 || name[0] == '.')
        return 0;
    for (size_t i = 0; i < len; i++)
        if (name[i] == '/' || (unsigned char)name[i] < 0x20)
            return 0;
    return 1;
}

/* What the request may ask for, checked as root before anything is opened. */
static int box_allowed(const struct agent *a, const struct kt_local_box *b, const char **root, char *why,
                       size_t whylen)
{
    if (b->uid == 0) {
        kt_set_err(why, whylen, "%s: will not deliver as root (uid 0)", b->path);
        return -EPERM;
    }
    if (b->path[0] != '/' || !b->path[1] || b->path[strlen(b->path) - 1] != '/') {
        kt_set_err(why, whylen, "%s: not an absolute Maildir path", b->path);
        return -EINVAL;
    }
    if (b->home[0]) {
        struct passwd *pw = getpwuid(b->uid);
        if (!pw || !pw->pw_dir || strcmp(pw->pw_dir, b->home) != 0) {
            kt_set_err(why, whylen, "%s: uid %u has no home directory %s in the passwd database", b->path,
                       (unsigned)b->uid, b->home);
            return -EPERM;
        }
        *root = b->home;
    } else {
        *root = a->vbase[0] ? a->vbase : "/";
    }
    if (!path_below(b->path, *root)) {
        kt_set_err(why, whylen, "%s is not below %s", b->path, *root);
        return -EPERM;
    }
    return 0;
}

/* In a child: become the recipient and write the copy; the result goes back
 * through the pipe as an int and the reason text. */
/* A longer .forward is not read to its end at every delivery: its user's mail is deferred. */
#define FORWARD_FILE_MAX (1024 * 1024)

/* Whether one .forward line names somewhere other than USER's own mailbox: its addresses are separated by
 * commas and blanks, "(...)" is a comment, and "user" or "\\user" is the user's own mailbox (local(8)
 * delivers there). A quoted "..." part is taken as an address. */
static int forward_line_elsewhere(const char *line, size_t len, const char *user)
{
    size_t ulen = strlen(user);
    for (size_t i = 0; i < len;) {
        char ch = line[i];
        if (ch == ',' || ch == ' ' || ch == '\t' || ch == '\r') {
            i++;
            continue;
        }
        if (ch == '(') {                          /* a comment, nested as in RFC 822 */
            int depth = 0;
            for (; i < len; i++) {
                depth += line[i] == '(';
                if (line[i] == ')' && --depth == 0) {
                    i++;
                    break;
                }
            }
            continue;
        }
        size_t start = i;
        int quoted = 0;
        for (; i < len && (quoted || (line[i] != ',' && line[i] != ' ' && line[i] != '\t' && line[i] != '\r'
                                      && line[i] != '(')); i++)
            if (line[i] == '"')
                quoted = !quoted;
        const char *tok = line + start;
        size_t tlen = i - start;
        if (tlen && tok[0] == '\\') {
            tok++;
            tlen--;
        }
        if (tlen != ulen || strncmp(tok, user, ulen) != 0)
            return 1;
    }
    return 0;
}

/* 1 when $home/.forward is a file Postfix's local(8) would forward through (dotforward.c): a regular file,
 * no symbolic link followed, owned by the user or root, not writable by others, naming some address other
 * than the user's own mailbox outside "#" comment lines. -1 when it exists but cannot be read (local(8)
 * defers: "error reading forwarding file"), with the reason in WHY. Runs as the user; HOME_FD is the home
 * directory, USER the login name. A file that cannot be opened (other than missing) is as none, as in
 * Postfix, and logged. */
static int forward_file_in_use(int home_fd, uid_t uid, const char *user, const char *home, char *why, size_t whylen)
{
    int fd = openat(home_fd, ".forward", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        if (errno != ENOENT && errno != ELOOP)
            kt_warn("cannot open %s/.forward: %s; delivering to the mailbox", home, strerror(errno));
        return 0;
    }
    struct stat st;
    int used = 0;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (st.st_uid == uid || st.st_uid == 0)
        && !(st.st_mode & S_IWOTH)) {
        /* line by line; a line longer than the buffer is judged by its first 4 KB */
        char buf[8192];
        size_t have = 0, total = 0;
        int overlong = 0;
        for (;;) {
            ssize_t n = read(fd, buf + have, sizeof(buf) - have);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 || (total += (size_t)(n > 0 ? n : 0)) > FORWARD_FILE_MAX) {
                if (n < 0)
                    kt_set_err(why, whylen, "error reading %s/.forward: %s", home, strerror(errno));
                else
                    kt_set_err(why, whylen, "%s/.forward is larger than %d bytes", home, FORWARD_FILE_MAX);
                used = -1;
                break;
            }
            have += (size_t)n;
            size_t off = 0;
            for (;;) {
                char *nl = memchr(buf + off, '\n', have - off);
                if (!nl && n > 0 && have - off < sizeof(buf))
                    break;                        /* wait for the rest of the line */
                size_t llen = nl ? (size_t)(nl - (buf + off)) : have - off;
                const char *line = buf + off;
                size_t k = 0;
                while (k < llen && (line[k] == ' ' || line[k] == '\t'))
                    k++;
                if (!overlong && k < llen && line[k] != '#' && forward_line_elsewhere(line + k, llen - k, user))
                    used = 1;
                overlong = !nl && n > 0;          /* the rest of this line follows: skip it */
                off += nl ? llen + 1 : llen;
                if (used || off >= have)
                    break;
            }
            memmove(buf, buf + off, have - off);
            have -= off;
            if (used || n == 0)
                break;
        }
    }
    close(fd);
    return used;
}

static void deliver_as_recipient(const struct agent *a, const struct kt_local_box *b, const char *root,
                                 int msg_fd, uint64_t size, const char *name, int sole, int out)
{
    char why[sizeof(((struct kt_local_reply *)0)->reason)] = "";
    int rc;
    int root_fd = openat2_dir(AT_FDCWD, root, O_PATH, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
    if (root_fd < 0) {
        rc = -errno;
        if (rc == -ENOENT)
            kt_set_err(why, sizeof(why), "%s %s does not exist", b->home[0] ? "home directory" : "virtual_mailbox_base",
                       root);
        else if (rc == -ELOOP)
            kt_set_err(why, sizeof(why), "%s %s is a symbolic link or lies below one",
                       b->home[0] ? "home directory" : "virtual_mailbox_base", root);
        else
            kt_set_err(why, sizeof(why), "cannot open %s: %s", root, strerror(-rc));
        goto out;
    }
    char user[256] = "";             /* the login name, for a .forward that names its own mailbox */
    const struct passwd *pw = b->home[0] ? getpwuid(b->uid) : NULL;
    if (pw && pw->pw_name)
        snprintf(user, sizeof(user), "%s", pw->pw_name);
    gid_t gid = (gid_t)b->gid;
    if (setgroups(1, &gid) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(b->uid, b->uid, b->uid) < 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        rc = -errno;
        kt_set_err(why, sizeof(why), "cannot switch to uid %u gid %u: %s", (unsigned)b->uid, (unsigned)b->gid,
                   strerror(-rc));
        goto out;
    }
    if (getuid() == 0 || geteuid() == 0) {
        rc = -EPERM;
        kt_set_err(why, sizeof(why), "still root after setresuid");
        goto out;
    }
    umask(077);
    /* Postfix's local(8) would deliver through $home/.forward (forward_path); ktrelay cannot, and the user's
     * Maildir may not be where such a user reads mail. Mail for that user alone waits; a copy for the user
     * as one of several mailboxes (an alias list) goes to the Maildir with a warning, so that one member's
     * file never holds up the others' mail. */
    int fwd = a->check_forward && b->home[0] && user[0]
              ? forward_file_in_use(root_fd, b->uid, user, b->home, why, sizeof(why)) : 0;
    if (fwd < 0) {
        rc = -EIO;
        goto out;
    }
    if (fwd) {
        if (sole) {
            rc = -EOPNOTSUPP;
            kt_set_err(why, sizeof(why), "%s/.forward exists: ktrelay does not deliver through .forward files "
                       "(forward_path); the mail is deferred until it is removed", b->home);
            goto out;
        }
        if (msg_fd >= 0)
            kt_set_err(why, sizeof(why), "%s/.forward exists: ktrelay does not deliver through .forward files "
                       "(forward_path); this copy, one of an alias's, goes to %s", b->home, b->path);
    }
    const char *rel = b->path + strlen(root);
    rc = kt_local_deliver_box(root_fd, rel, b->uid, msg_fd, size, name, why, sizeof(why));
out:
    if (write(out, &rc, sizeof(rc)) != (ssize_t)sizeof(rc) || write(out, why, strlen(why)) < 0) {
        /* the parent sees a short read and reports an error */
    }
}

static int run_box(const struct agent *a, const struct kt_local_box *b, int msg_fd, uint64_t size, const char *name,
                   int sole, char *why, size_t whylen)
{
    const char *root;
    int rc = box_allowed(a, b, &root, why, whylen);
    if (rc < 0)
        return rc;
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        rc = -errno;
        kt_set_err(why, whylen, "pipe: %s", strerror(-rc));
        return rc;
    }
    pid_t pid = fork();
    if (pid < 0) {
        rc = -errno;
        kt_set_err(why, whylen, "fork: %s", strerror(-rc));
        close(pfd[0]);
        close(pfd[1]);
        return rc;
    }
    if (pid == 0) {
        close(pfd[0]);
        deliver_as_recipient(a, b, root, msg_fd, size, name, sole, pfd[1]);
        _exit(0);
    }
    close(pfd[1]);
    char buf[sizeof(int) + 512];
    size_t got = 0;
    for (;;) {
        ssize_t n = read(pfd[0], buf + got, sizeof(buf) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(pfd[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (got < sizeof(int)) {
        kt_set_err(why, whylen, "delivery process for uid %u failed", (unsigned)b->uid);
        return -EIO;
    }
    memcpy(&rc, buf, sizeof(int));
    buf[got] = '\0';
    kt_set_err(why, whylen, "%s", buf + sizeof(int));
    return rc;
}

static void handle_request(const struct agent *a, const struct kt_local_req *req, int msg_fd, int reply_fd)
{
    struct kt_local_reply reply;
    memset(&reply, 0, sizeof(reply));
    if (!name_ok(req->name)) {
        reply.status = EINVAL;
        kt_set_err(reply.reason, sizeof(reply.reason), "bad Maildir file name");
    }
    /* Several mailboxes: check them all before writing any, so that one
     * refused mailbox defers the message before the others got a copy that a
     * retry would duplicate. */
    for (uint32_t i = 0; req->n_boxes > 1 && i < req->n_boxes && reply.status == 0; i++) {
        const struct kt_local_box *b = &req->boxes[i];
        int rc = run_box(a, b, -1, 0, req->name, 0, reply.reason, sizeof(reply.reason));
        if (rc < 0) {
            reply.status = -rc;
            kt_warn("delivery to %s (uid %u) deferred: %s; no mailbox of this message was written", b->path,
                    (unsigned)b->uid, reply.reason);
        }
    }
    /* the message's only mailbox (none written by the worker either): a .forward then defers it */
    int sole = req->n_boxes == 1 && req->n_total <= 1;
    for (uint32_t i = 0; i < req->n_boxes && reply.status == 0; i++) {
        const struct kt_local_box *b = &req->boxes[i];
        int rc = run_box(a, b, msg_fd, req->size, req->name, sole, reply.reason, sizeof(reply.reason));
        if (rc < 0) {
            reply.status = -rc;
            kt_warn("delivery to %s (uid %u) deferred: %s", b->path, (unsigned)b->uid, reply.reason);
            break;
        }
        if (reply.reason[0])       /* delivered, with something to say (a .forward passed over) */
            kt_warn("%s", reply.reason);
        reply.reason[0] = '\0';
        kt_info("delivered to %s (uid %u) as new/%s", b->path, (unsigned)b->uid, req->name);
        reply.delivered++;
    }
    if (send(reply_fd, &reply, sizeof(reply), MSG_NOSIGNAL) < 0)
        kt_warn("cannot answer a delivery request: %s", strerror(errno));
}

static void agent_main(int sock, const char *vbase, int check_forward)
{
    struct agent a = { .vbase = vbase, .check_forward = check_forward };
    struct kt_local_req *req = kt_malloc(sizeof(*req));
    const size_t head = offsetof(struct kt_local_req, boxes);

    for (;;) {
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(2 * sizeof(int))];
        } ctl;
        struct iovec iov = { req, sizeof(*req) };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                              .msg_controllen = sizeof(ctl.buf) };
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;       /* every worker of this generation is gone */
        int fds[2] = { -1, -1 }, nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + (size_t)i * sizeof(int), sizeof(int));
                    if (nfds < 2)
                        fds[nfds++] = fd;
                    else
                        close(fd);
                }
            }
        }
        if (nfds != 2 || (size_t)n < head || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) ||
            req->magic != KT_LOCAL_MAGIC || req->n_boxes > KT_LOCAL_MAX_BOXES ||
            (size_t)n != head + req->n_boxes * sizeof(req->boxes[0])) {
            kt_warn("malformed delivery request ignored");
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            continue;
        }
        req->name[sizeof(req->name) - 1] = '\0';
        for (uint32_t i = 0; i < req->n_boxes; i++) {
            req->boxes[i].home[KT_LOCAL_PATH_MAX - 1] = '\0';
            req->boxes[i].path[KT_LOCAL_PATH_MAX - 1] = '\0';
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(sock);
            signal(SIGCHLD, SIG_DFL);
            handle_request(&a, req, fds[0], fds[1]);
            _exit(0);
        }
        if (pid < 0) {
            struct kt_local_reply reply = { .status = errno };
            kt_set_err(reply.reason, sizeof(reply.reason), "fork: %s", strerror(errno));
            if (send(fds[1], &reply, sizeof(reply), MSG_NOSIGNAL) < 0) {
                /* the worker sees the socket close and defers */
            }
        }
        close(fds[0]);
        close(fds[1]);
    }
    kt_free(req);
}

int kt_local_agent_start(const char *virtual_base, int check_forward, const int *close_fds, size_t n_close,
                         int *worker_fd, pid_t *pid)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    pid_t p = fork();
    if (p < 0) {
        int e = -errno;
        close(sv[0]);
        close(sv[1]);
        return e;
    }
    if (p == 0) {
        sigset_t all;
        close(sv[0]);
        for (size_t i = 0; i < n_close; i++)
            if (close_fds[i] >= 0)
                close(close_fds[i]);
        kt_log_set_program("local");
        unsetenv("NOTIFY_SOCKET");
        prctl(PR_SET_NAME, "ktrelay-local", 0, 0, 0);
        /* the master's signals are not ours: stop when the workers hang up */
        signal(SIGINT, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        signal(SIGQUIT, SIG_IGN);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_IGN);
        signal(SIGCHLD, SIG_IGN);     /* request children reap themselves */
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        agent_main(sv[1], virtual_base ? virtual_base : "", check_forward);
        _exit(0);
    }
    close(sv[1]);
    *worker_fd = sv[0];
    *pid = p;
    return 0;
}
