/* Landlock confinement (see confine.h). Raw system calls: glibc 2.36 has no
 * wrappers. Every right the kernel's ABI knows is handled, so anything not
 * granted below is denied. */
#include <errno.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "master/confine.h"

#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif

#define FS_READ (LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR)
#define FS_WRITE_ABI2 (LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR |                     \
                       LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_DIR |                      \
                       LANDLOCK_ACCESS_FS_MAKE_REG | LANDLOCK_ACCESS_FS_MAKE_SOCK |                        \
                       LANDLOCK_ACCESS_FS_MAKE_FIFO | LANDLOCK_ACCESS_FS_REFER)
#define FS_DENIED (LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_MAKE_CHAR |                             \
                   LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM)

int kt_confine_abi(void)
{
    long v = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    return v < 0 ? -errno : (int)v;
}

static int add_beneath(int ruleset, const char *path, unsigned long long allowed, unsigned long long handled)
{
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    if (!S_ISDIR(st.st_mode))      /* a file takes only the rights that apply to files */
        allowed &= LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_TRUNCATE;
    struct landlock_path_beneath_attr pb = { .allowed_access = allowed & handled, .parent_fd = fd };
    int rc = 0;
    if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &pb, 0) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

int kt_confine_paths(const char *const *rw, size_t nrw, const char *const *ro, size_t nro, const char **why)
{
    int abi = kt_confine_abi();
    if (abi < 2) {
        *why = abi < 0 ? "Landlock is not available in this kernel" : "Landlock is older than ABI 2 (Linux 5.19)";
        return -EOPNOTSUPP;
    }
    unsigned long long handled = FS_READ | FS_WRITE_ABI2 | FS_DENIED;
    unsigned long long write = FS_WRITE_ABI2;
    if (abi >= 3) {
        handled |= LANDLOCK_ACCESS_FS_TRUNCATE;
        write |= LANDLOCK_ACCESS_FS_TRUNCATE;
    }
    struct landlock_ruleset_attr attr = { .handled_access_fs = handled };
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof(attr), 0);
    int rc = 0;
    if (ruleset < 0) {
        *why = "landlock_create_ruleset";
        return -errno;
    }
    for (size_t i = 0; i < nrw && rc == 0; i++)
        if ((rc = add_beneath(ruleset, rw[i], FS_READ | write, handled)) < 0)
            *why = rw[i];
    for (size_t i = 0; i < nro && rc == 0; i++)
        if ((rc = add_beneath(ruleset, ro[i], FS_READ, handled)) < 0)
            *why = ro[i];
    if (rc == 0 && syscall(SYS_landlock_restrict_self, ruleset, 0) < 0) {
        rc = -errno;
        *why = "landlock_restrict_self";
    }
    close(ruleset);
    return rc;
}
