/* kt_durable_write (src/core/durable.c) on a real file system: a new file and a replaced one hold exactly
 * the bytes given with mode 0600 and no temporary file left; a symbolic link at the temporary name is
 * not followed (-ELOOP, its target untouched, the old file kept); a missing directory is -ENOENT. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/durable.h"

static char dir[64];

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/kt-durable-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* The whole content of DIR/NAME, NUL-terminated, in buf. */
static void read_back(const char *name, char *buf, size_t size)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    assert_true(n >= 0);
    buf[n] = '\0';
}

static void test_write_then_replace(void **state)
{
    (void)state;
    char buf[64], path[256];
    struct stat st;
    assert_int_equal(kt_durable_write(dir, "counts", "first\n", 6), 0);
    read_back("counts", buf, sizeof(buf));
    assert_string_equal(buf, "first\n");
    assert_int_equal(kt_durable_write(dir, "counts", "2", 1), 0);
    read_back("counts", buf, sizeof(buf));
    assert_string_equal(buf, "2");
    snprintf(path, sizeof(path), "%s/counts", dir);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    snprintf(path, sizeof(path), "%s/.counts.tmp", dir);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(kt_durable_write(dir, "empty", "", 0), 0);
    read_back("empty", buf, sizeof(buf));
    assert_string_equal(buf, "");
}

static void test_symlink_at_the_temporary_name(void **state)
{
    (void)state;
    char buf[64], link[256], target[256];
    assert_int_equal(kt_durable_write(dir, "policy", "old", 3), 0);
    assert_int_equal(kt_durable_write(dir, "target", "theirs", 6), 0);
    snprintf(link, sizeof(link), "%s/.policy.tmp", dir);
    snprintf(target, sizeof(target), "%s/target", dir);
    assert_int_equal(symlink(target, link), 0);
    assert_int_equal(kt_durable_write(dir, "policy", "new", 3), -ELOOP);
    read_back("target", buf, sizeof(buf));
    assert_string_equal(buf, "theirs");
    read_back("policy", buf, sizeof(buf));
    assert_string_equal(buf, "old");
}

static void test_missing_directory(void **state)
{
    (void)state;
    char missing[128];
    snprintf(missing, sizeof(missing), "%s/nonexistent", dir);
    assert_int_equal(kt_durable_write(missing, "x", "y", 1), -ENOENT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_then_replace, setup, teardown),
        cmocka_unit_test_setup_teardown(test_symlink_at_the_temporary_name, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_directory, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
