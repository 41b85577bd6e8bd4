/* Unit tests for the local delivery agent's writer (kt_local_deliver_box),
 * with the caller's own uid as the recipient, on real directories under a
 * temporary home: a normal delivery; missing folders made; symbolic links as
 * the Maildir, tmp/ or new/; a symbolic link waiting at the tmp file name;
 * a Maildir owned by somebody else. A refused delivery must leave every
 * target untouched. The privileged parts (uid switch, passwd checks) are
 * covered by tests/integration/test_local_attacks.py as root. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "delivery/local.h"

static const char message[] = "Subject: test\r\n\r\nhello\r\n";

struct fx {
    char home[64];
    char target[64];   /* a directory an attacker points a link at */
    int home_fd;
    int msg_fd;
};

static int setup(void **state)
{
    struct fx *f = kt_calloc(1, sizeof(*f));
    strcpy(f->home, "/tmp/kt_local_XXXXXX");
    assert_non_null(mkdtemp(f->home));
    strcpy(f->target, "/tmp/kt_local_target_XXXXXX");
    assert_non_null(mkdtemp(f->target));
    f->home_fd = open(f->home, O_PATH | O_DIRECTORY | O_CLOEXEC);
    assert_true(f->home_fd >= 0);
    char path[128];
    snprintf(path, sizeof(path), "%s/.msg", f->home);
    f->msg_fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    assert_true(f->msg_fd >= 0);
    assert_int_equal(write(f->msg_fd, message, sizeof(message) - 1), (ssize_t)sizeof(message) - 1);
    unlink(path);
    *state = f;
    return 0;
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    char cmd[256];
    close(f->home_fd);
    close(f->msg_fd);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s' '%s'", f->home, f->target);
    assert_int_equal(system(cmd), 0);
    kt_free(f);
    return 0;
}

static int deliver(struct fx *f, const char *name, char *why, size_t whylen)
{
    why[0] = '\0';
    return kt_local_deliver_box(f->home_fd, "Maildir/", getuid(), f->msg_fd, sizeof(message) - 1, name, why, whylen);
}

static void mk(struct fx *f, const char *rel)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", f->home, rel);
    assert_int_equal(mkdir(path, 0700), 0);
}

static void link_to_target(struct fx *f, const char *rel)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", f->home, rel);
    assert_int_equal(symlink(f->target, path), 0);
}

static void test_delivers_and_makes_folders(void **state)
{
    struct fx *f = *state;
    char why[256], path[256], buf[128];
    assert_int_equal(deliver(f, "1.M1P1.host,S=24,W=24", why, sizeof(why)), 0);
    snprintf(path, sizeof(path), "%s/Maildir/new/1.M1P1.host,S=24,W=24", f->home);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t n = read(fd, buf, sizeof(buf));
    close(fd);
    assert_int_equal(n, (ssize_t)sizeof(message) - 1);
    assert_memory_equal(buf, message, sizeof(message) - 1);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    snprintf(path, sizeof(path), "%s/Maildir/tmp", f->home);
    assert_int_equal(count_entries(path), 0);
    snprintf(path, sizeof(path), "%s/Maildir/cur", f->home);
    assert_int_equal(count_entries(path), 0);
    /* the same name again is refused, never overwritten */
    assert_int_equal(deliver(f, "1.M1P1.host,S=24,W=24", why, sizeof(why)), -EEXIST);
}

static void test_maildir_symlink_refused(void **state)
{
    struct fx *f = *state;
    char why[256];
    link_to_target(f, "Maildir");
    assert_int_equal(deliver(f, "2.x", why, sizeof(why)), -ELOOP);
    assert_string_equal(why, "Maildir is a symbolic link");
    assert_int_equal(count_entries(f->target), 0);
}

static void test_new_symlink_refused(void **state)
{
    struct fx *f = *state;
    char why[256];
    mk(f, "Maildir");
    mk(f, "Maildir/tmp");
    mk(f, "Maildir/cur");
    link_to_target(f, "Maildir/new");
    assert_int_equal(deliver(f, "3.x", why, sizeof(why)), -ELOOP);
    assert_string_equal(why, "Maildir/new is a symbolic link");
    assert_int_equal(count_entries(f->target), 0);
    char path[256];
    snprintf(path, sizeof(path), "%s/Maildir/tmp", f->home);
    assert_int_equal(count_entries(path), 0);
}

static void test_tmp_symlink_refused(void **state)
{
    struct fx *f = *state;
    char why[256];
    mk(f, "Maildir");
    link_to_target(f, "Maildir/tmp");
    assert_int_equal(deliver(f, "4.x", why, sizeof(why)), -ELOOP);
    assert_string_equal(why, "Maildir/tmp is a symbolic link");
    assert_int_equal(count_entries(f->target), 0);
}

static void test_symlink_at_tmp_name_refused(void **state)
{
    struct fx *f = *state;
    char why[256], path[256], victim[256];
    mk(f, "Maildir");
    mk(f, "Maildir/tmp");
    mk(f, "Maildir/new");
    mk(f, "Maildir/cur");
    snprintf(victim, sizeof(victim), "%s/victim", f->target);
    snprintf(path, sizeof(path), "%s/Maildir/tmp/5.x", f->home);
    assert_int_equal(symlink(victim, path), 0);
    assert_int_equal(deliver(f, "5.x", why, sizeof(why)), -EEXIST);
    assert_non_null(strstr(why, "tmp/5.x already exists"));
    assert_int_equal(count_entries(f->target), 0);      /* nothing created through the link */
    snprintf(path, sizeof(path), "%s/Maildir/new", f->home);
    assert_int_equal(count_entries(path), 0);
}

static void test_file_instead_of_folder_refused(void **state)
{
    struct fx *f = *state;
    char why[256], path[256];
    mk(f, "Maildir");
    snprintf(path, sizeof(path), "%s/Maildir/new", f->home);
    int fd = open(path, O_WRONLY | O_CREAT, 0600);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(deliver(f, "6.x", why, sizeof(why)), -ENOTDIR);
    assert_string_equal(why, "Maildir/new is not a directory");
}

static void test_other_owner_refused(void **state)
{
    struct fx *f = *state;
    char why[256], expect[128];
    mk(f, "Maildir");
    /* the recipient is somebody else than the Maildir's owner (us) */
    uid_t other = getuid() + 1;
    why[0] = '\0';
    assert_int_equal(kt_local_deliver_box(f->home_fd, "Maildir/", other, f->msg_fd, sizeof(message) - 1, "7.x", why,
                                          sizeof(why)),
                     -EPERM);
    snprintf(expect, sizeof(expect), "Maildir is owned by uid %u, not by the recipient (uid %u)", (unsigned)getuid(),
             (unsigned)other);
    assert_string_equal(why, expect);
}

static void test_dotdot_refused(void **state)
{
    struct fx *f = *state;
    char why[256];
    why[0] = '\0';
    assert_int_equal(kt_local_deliver_box(f->home_fd, "../Maildir/", getuid(), f->msg_fd, sizeof(message) - 1, "8.x",
                                          why, sizeof(why)),
                     -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_delivers_and_makes_folders, setup, teardown),
        cmocka_unit_test_setup_teardown(test_maildir_symlink_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_new_symlink_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tmp_symlink_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_symlink_at_tmp_name_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_instead_of_folder_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_owner_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dotdot_refused, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
