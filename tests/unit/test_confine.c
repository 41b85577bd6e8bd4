/* Worker confinement (src/master/confine.c) on the real kernel: a child
 * process confines itself to one writable and one read-only directory and then
 * tries what the worker does (Maildir create, write, fsync, rename between
 * directories) and what it must not (read, write or execute elsewhere). */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "master/confine.h"

static char root[64];

static void path(char *out, size_t n, const char *rel)
{
    snprintf(out, n, "%s/%s", root, rel);
}

static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof(root), "/tmp/kt-confine-XXXXXX");
    if (!mkdtemp(root))
        return -1;
    char p[128];
    const char *dirs[] = { "rw", "rw/tmp", "rw/new", "ro", "outside" };
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        path(p, sizeof(p), dirs[i]);
        if (mkdir(p, 0755) < 0)
            return -1;
    }
    const char *files[] = { "ro/table", "outside/secret" };
    for (size_t i = 0; i < 2; i++) {
        path(p, sizeof(p), files[i]);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "x\n", 2) != 2)
            return -1;
        close(fd);
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
    return system(cmd) == 0 ? 0 : -1;
}

/* Each check in the confined child: 0 when the outcome is the expected one,
 * else the number of the failed step. */
static int confined_child(void)
{
    char rw[128], ro[128], p[128], q[128];
    path(rw, sizeof(rw), "rw");
    path(ro, sizeof(ro), "ro");
    const char *rws[] = { rw };
    const char *ros[] = { ro };
    const char *why = NULL;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return 1;
    if (kt_confine_paths(rws, 1, ros, 1, &why) < 0)
        return 2;
    /* what a Maildir delivery does */
    path(p, sizeof(p), "rw/tmp/1.msg");
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || write(fd, "mail\n", 5) != 5 || fsync(fd) < 0)
        return 3;
    close(fd);
    path(q, sizeof(q), "rw/new/1.msg");
    if (rename(p, q) < 0)
        return 4;
    path(p, sizeof(p), "rw/cur");
    if (mkdir(p, 0700) < 0)
        return 5;
    /* reading is allowed beneath the read-only directory, writing is not */
    path(p, sizeof(p), "ro/table");
    if ((fd = open(p, O_RDONLY)) < 0)
        return 6;
    close(fd);
    if (open(p, O_WRONLY) >= 0 || errno != EACCES)
        return 7;
    /* nothing else, not even reading */
    path(p, sizeof(p), "outside/secret");
    if (open(p, O_RDONLY) >= 0 || errno != EACCES)
        return 8;
    path(p, sizeof(p), "outside/new");
    if (open(p, O_WRONLY | O_CREAT, 0600) >= 0 || errno != EACCES)
        return 9;
    /* no moving a message out of the writable tree */
    path(p, sizeof(p), "rw/new/1.msg");
    path(q, sizeof(q), "outside/1.msg");
    if (rename(p, q) == 0 || (errno != EXDEV && errno != EACCES))
        return 10;
    /* and no program runs, not even one the worker could read */
    char *argv[] = { "true", NULL };
    execv("/bin/true", argv);
    if (errno != EACCES)
        return 11;
    return 0;
}

static void test_confined_worker_reaches_only_its_directories(void **state)
{
    (void)state;
    if (kt_confine_abi() < 2)
        skip();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(confined_child());
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    /* the message is where the child put it, and nothing leaked outside */
    char p[128];
    struct stat st;
    path(p, sizeof(p), "rw/new/1.msg");
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_size, 5);
    path(p, sizeof(p), "outside/new");
    assert_int_equal(stat(p, &st), -1);
    path(p, sizeof(p), "outside/1.msg");
    assert_int_equal(stat(p, &st), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_confined_worker_reaches_only_its_directories),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
