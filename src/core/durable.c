/* Durable file writes (see durable.h): complete writes, directory fsyncs, whole-file replacement. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include "core/durable.h"

int kt_write_all(int fd, const void *p, size_t len)
{
    const char *c = p;
    while (len > 0) {
        ssize_t n = write(fd, c, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        c += n;
        len -= (size_t)n;
    }
    return 0;
}

int kt_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

int kt_durable_write(const char *dir, const char *name, const void *data, size_t len)
{
    char path[4096], tmp[4200];
    int rc = 0, fd = -1;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", dir, name);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    rc = kt_write_all(fd, data, len);
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) < 0)
        rc = -errno;
    if (rc < 0)
        goto cleanup;
    (void)kt_fsync_dir(dir);    /* best effort: the file itself is complete */
cleanup:
    if (rc < 0)
        unlink(tmp);
    return rc;
}
