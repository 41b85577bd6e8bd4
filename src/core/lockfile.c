/* Instance lock file (see lockfile.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "core/lockfile.h"

/* The PID written by the holder, or 0 while it has not written it. */
static pid_t read_holder(int fd)
{
    char buf[32];
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    long pid = strtol(buf, NULL, 10);
    return pid > 0 ? (pid_t)pid : 0;
}

int kt_lockfile_acquire(const char *path, int *fd, pid_t *holder)
{
    char text[32];
    int rc;
    int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);

    *fd = -1;
    *holder = 0;
    if (f < 0)
        return -errno;
    if (flock(f, LOCK_EX | LOCK_NB) < 0) {
        rc = -errno;
        if (rc == -EWOULDBLOCK) {
            /* the holder writes its PID right after locking: give it a moment */
            for (int i = 0; i < 50 && !(*holder = read_holder(f)); i++)
                usleep(10000);
        }
        goto cleanup;
    }
    /* Postfix's format: the PID right-aligned in 10 columns and a newline */
    int len = snprintf(text, sizeof(text), "%10ld\n", (long)getpid());
    if (ftruncate(f, 0) < 0) {
        rc = -errno;
        goto cleanup;
    }
    ssize_t n = pwrite(f, text, (size_t)len, 0);
    if (n != len) {
        rc = n < 0 ? -errno : -EIO;
        goto cleanup;
    }
    *fd = f;
    return 0;
cleanup:
    close(f);
    return rc;
}
