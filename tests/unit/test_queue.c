/* Queue files: creation, envelope parsing, status records (including a torn
 * last record and a job's records written at once), removal, retiring a file
 * as a spare, start-up cleanup, and the DSN text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/alloc.h"
#include "queue/bounce.h"
#include "queue/queue.h"

static char qdir[256];

static int setup(void **state)
{
    snprintf(qdir, sizeof(qdir), "/tmp/kt-test-queue-XXXXXX");
    if (!mkdtemp(qdir))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", qdir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *const rcpts[] = { "bob@remote.test", "carol@remote.test", "dave@remote.test" };
static const char body[] = "Subject: t\r\n\r\nline\r\n.dot\r\n";

static void append_raw(const char *rel, const char *text)
{
    char path[1024];    /* room for both strings: -O3 checks for truncation */
    snprintf(path, sizeof(path), "%s/%s", qdir, rel);
    FILE *f = fopen(path, "a");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_write_and_load(void **state)
{
    char id[KT_QUEUE_ID_MAX] = "";
    struct kt_qmsg *m;
    assert_int_equal(kt_queue_write(qdir, "alice@example.test", rcpts, 3, body, strlen(body), id, sizeof(id)), 0);
    assert_true(strlen(id) > 10);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_string_equal(m->id, id);
    assert_string_equal(m->sender, "alice@example.test");
    assert_int_equal(m->n_rcpts, 3);
    assert_string_equal(m->rcpts[2].addr, "dave@remote.test");
    assert_int_equal(m->dots, 1);
    assert_int_equal(m->body_len, (off_t)strlen(body));
    assert_true(m->arrival > 0 && m->arrival <= time(NULL));
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(m->rcpts[i].state, KT_QR_PENDING);

    /* the body is where the envelope says */
    char buf[128] = { 0 };
    int fd = kt_queue_open_body(qdir, id);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, buf, sizeof(buf), m->body_off), (ssize_t)strlen(body));
    close(fd);
    assert_string_equal(buf, body);
    kt_qmsg_free(m);

    /* nothing is left in tmp/ */
    char **ids;
    size_t n;
    char tmp[300];
    snprintf(tmp, sizeof(tmp), "%s/tmp", qdir);
    assert_int_equal(kt_queue_list_ids(qdir, &ids, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(ids[0], id);
    kt_queue_free_ids(ids, n);
}

static void test_status_records(void **state)
{
    char id[KT_QUEUE_ID_MAX] = "", rel[400];
    struct kt_qmsg *m, *again;
    assert_int_equal(kt_queue_write(qdir, "", rcpts, 3, "x\r\n", 3, id, sizeof(id)), 0);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_string_equal(m->sender, "");
    assert_int_equal(m->dots, 0);
    assert_int_equal(kt_queue_mark(qdir, m, 0, KT_QR_DONE, NULL), 0);
    assert_int_equal(kt_queue_mark(qdir, m, 2, KT_QR_FAILED, "5.1.1 mx[1.2.3.4]:25 host said:\n550 no"), 0);
    assert_false(kt_qmsg_finished(m));
    /* a crash in the middle of an append leaves a line without its newline: not an outcome */
    snprintf(rel, sizeof(rel), "status/%s", id);
    append_raw(rel, "done 1");
    assert_int_equal(kt_queue_load(qdir, id, &again), 0);
    assert_int_equal(again->rcpts[0].state, KT_QR_DONE);
    assert_int_equal(again->rcpts[1].state, KT_QR_PENDING);
    assert_int_equal(again->rcpts[2].state, KT_QR_FAILED);
    assert_string_equal(again->rcpts[2].reason, "5.1.1 mx[1.2.3.4]:25 host said: 550 no");
    assert_int_equal(again->warned, 0);
    kt_qmsg_free(again);
    kt_qmsg_free(m);
}

static void test_remove_and_cleanup(void **state)
{
    char id[KT_QUEUE_ID_MAX] = "", path[1024];
    struct kt_qmsg *m;
    struct stat st;
    assert_int_equal(kt_queue_write(qdir, "a@b", rcpts, 1, "x\r\n", 3, id, sizeof(id)), 0);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_int_equal(kt_queue_mark(qdir, m, (size_t)-1, KT_QR_PENDING, NULL), 0);
    assert_int_equal(m->warned, 1);
    kt_qmsg_free(m);
    assert_int_equal(kt_queue_remove(qdir, id), 0);
    assert_int_equal(kt_queue_remove(qdir, id), -ENOENT);
    assert_int_equal(kt_queue_load(qdir, id, &m), -ENOENT);
    assert_int_equal(kt_queue_load(qdir, "../etc", &m), -EINVAL);

    /* leftovers: an unfinished tmp file and an orphan status file go; a live status stays */
    char live[KT_QUEUE_ID_MAX] = "";
    assert_int_equal(kt_queue_write(qdir, "a@b", rcpts, 2, "x\r\n", 3, live, sizeof(live)), 0);
    assert_int_equal(kt_queue_load(qdir, live, &m), 0);
    assert_int_equal(kt_queue_mark(qdir, m, 0, KT_QR_DONE, NULL), 0);
    kt_qmsg_free(m);
    append_raw("tmp/PARTIAL", "KTQUEUE 1\n");
    append_raw("status/ORPHAN", "done 0\n");
    kt_queue_cleanup(qdir);
    snprintf(path, sizeof(path), "%s/tmp/PARTIAL", qdir);
    assert_int_equal(stat(path, &st), -1);
    snprintf(path, sizeof(path), "%s/status/ORPHAN", qdir);
    assert_int_equal(stat(path, &st), -1);
    snprintf(path, sizeof(path), "%s/status/%s", qdir, live);
    assert_int_equal(stat(path, &st), 0);
}

static int open_dir(const char *sub)
{
    char path[512];
    if (kt_queue_init_dirs(qdir) < 0)
        return -1;
    snprintf(path, sizeof(path), "%s/%s", qdir, sub);
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

static void test_mark_many(void **state)
{
    char id[KT_QUEUE_ID_MAX] = "", path[1024];
    struct kt_qmsg *m, *again;
    int status_fd = open_dir("status");
    assert_true(status_fd >= 0);
    assert_int_equal(kt_queue_write(qdir, "a@b", rcpts, 3, "x\r\n", 3, id, sizeof(id)), 0);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_int_equal(m->has_status, 0);
    /* one job's outcomes: one append, read back as three records */
    struct kt_qmark marks[] = {
        { 0, KT_QR_DONE, NULL }, { 2, KT_QR_FAILED, "5.1.1 - no\nsuch" }, { (size_t)-1, KT_QR_PENDING, NULL },
    };
    assert_int_equal(kt_queue_mark_many(status_fd, m, marks, 3), 0);
    assert_int_equal(m->has_status, 1);
    assert_int_equal(m->rcpts[0].state, KT_QR_DONE);
    assert_int_equal(m->rcpts[2].state, KT_QR_FAILED);
    assert_int_equal(m->warned, 1);
    snprintf(path, sizeof(path), "%s/status/%s", qdir, id);
    FILE *f = fopen(path, "r");
    char buf[256] = "";
    assert_non_null(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    assert_string_equal(buf, "done 0\nfail 2 5.1.1 - no such\nwarn\n");
    assert_int_equal(kt_queue_load(qdir, id, &again), 0);
    assert_int_equal(again->has_status, 1);
    assert_int_equal(again->rcpts[1].state, KT_QR_PENDING);
    assert_string_equal(again->rcpts[2].reason, "5.1.1 - no such");
    kt_qmsg_free(again);
    kt_qmsg_free(m);
    close(status_fd);
}

static void test_retire_as_spare(void **state)
{
    char id[KT_QUEUE_ID_MAX] = "", path[1024];
    struct stat st;
    int new_fd = open_dir("new"), tmp_fd = open_dir("tmp"), status_fd = open_dir("status");
    assert_true(new_fd >= 0 && tmp_fd >= 0 && status_fd >= 0);
    assert_int_equal(kt_queue_write(qdir, "a@b", rcpts, 1, "x\r\n", 3, id, sizeof(id)), 0);
    snprintf(path, sizeof(path), "%s/new/%s", qdir, id);
    assert_int_equal(stat(path, &st), 0);
    ino_t ino = st.st_ino;
    assert_int_equal(kt_queue_retire_at(qdir, new_fd, tmp_fd, status_fd, id, 0), 0);
    /* gone from the queue, kept as tmp/ID with the same inode */
    assert_int_equal(stat(path, &st), -1);
    snprintf(path, sizeof(path), "%s/tmp/%s", qdir, id);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_ino, ino);
    assert_int_equal(kt_queue_retire_at(qdir, new_fd, tmp_fd, status_fd, id, 0), -ENOENT);
    /* the start-up cleanup removes spares like any other leftover */
    kt_queue_spares_clear();
    kt_queue_cleanup(qdir);
    assert_int_equal(stat(path, &st), -1);
    close(new_fd);
    close(tmp_fd);
    close(status_fd);
}

static void test_bad_files(void **state)
{
    struct kt_qmsg *m;
    assert_int_equal(kt_queue_init_dirs(qdir), 0);
    append_raw("new/NOMAGIC", "hello\nbody\n");
    append_raw("new/NOBODY", "KTQUEUE 1\nsender a@b\nrcpt c@d\n");
    append_raw("new/NOSENDER", "KTQUEUE 1\nrcpt c@d\nbody\nx");
    assert_int_equal(kt_queue_load(qdir, "NOMAGIC", &m), -EINVAL);
    assert_int_equal(kt_queue_load(qdir, "NOBODY", &m), -EINVAL);
    assert_int_equal(kt_queue_load(qdir, "NOSENDER", &m), -EINVAL);
}

static void test_dsn(void **state)
{
    const char hdrs[] = "Subject: hello\r\nMessage-Id: <1@x>\r\n";
    struct kt_dsn_rcpt r[2] = {
        { "bob@remote.test", "5.1.1 mx.remote.test[192.0.2.1]:25 host mx.remote.test[192.0.2.1]:25 said: 550 5.1.1 "
                             "unknown user (in reply to RCPT TO command)", NULL, NULL },
        { "carol@remote.test", "5.4.7 - message expired: connection refused", "rfc822;c+2Bx@remote.test", NULL },
    };
    struct kt_dsn_msg msg = { .id = "ABC", .orig_sender = "alice@example.test", .arrival = 1000,
                              .original = hdrs, .original_len = strlen(hdrs) };
    char *t = kt_dsn_build(KT_DSN_FAILED, "relay.example", &msg, r, 2);
    assert_non_null(strstr(t, "To: alice@example.test\r\n"));
    assert_non_null(strstr(t, "Content-Type: multipart/report; report-type=delivery-status;"));
    assert_non_null(strstr(t, "Reporting-MTA: dns; relay.example\r\nX-Ktrelay-Queue-ID: ABC\r\n"));
    assert_null(strstr(t, "Original-Envelope-Id"));
    assert_non_null(strstr(t, "Final-Recipient: rfc822; bob@remote.test\r\nOriginal-Recipient: rfc822;bob@remote.test\r\n"
                              "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.remote.test\r\n"
                              "Diagnostic-Code: smtp; 550 5.1.1 unknown user\r\n"));
    /* the ORCPT given, its xtext decoded */
    assert_non_null(strstr(t, "Final-Recipient: rfc822; carol@remote.test\r\nOriginal-Recipient: rfc822;c+x@remote.test\r\n"));
    assert_non_null(strstr(t, "Status: 5.4.7\r\n"));
    assert_non_null(strstr(t, "Content-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n"
                              "\r\nSubject: hello\r\nMessage-Id: <1@x>\r\n"));
    assert_null(strstr(t, "Will-Retry-Until"));
    /* every line ends in CRLF */
    for (char *p = strchr(t, '\n'); p; p = strchr(p + 1, '\n'))
        assert_int_equal(p[-1], '\r');
    kt_free(t);
    msg.retry_until = 5000;
    t = kt_dsn_build(KT_DSN_DELAYED, "relay.example", &msg, r, 1);
    assert_non_null(strstr(t, "Action: delayed\r\n"));
    assert_non_null(strstr(t, "Will-Retry-Until: "));
    kt_free(t);
    /* the whole message, an ENVID with a control character encoded, a success notice */
    const char whole[] = "Subject: hello\r\n\r\nbody line\r\n";
    struct kt_dsn_msg full = { .id = "ABC", .orig_sender = "alice@example.test", .arrival = 1000,
                               .envid = "QQ+2B1+0A", .original = whole, .original_len = strlen(whole), .full = 1 };
    struct kt_dsn_rcpt ok = { "bob@example.test", "2.0.0 - delivered to maildir", NULL, "delivered" };
    t = kt_dsn_build(KT_DSN_SUCCESS, "relay.example", &full, &ok, 1);
    assert_non_null(strstr(t, "Subject: Successful Mail Delivery Report\r\n"));
    assert_non_null(strstr(t, "Reporting-MTA: dns; relay.example\r\nOriginal-Envelope-Id: QQ+1?\r\n"));
    assert_non_null(strstr(t, "Action: delivered\r\nStatus: 2.0.0\r\nDiagnostic-Code: X-Ktrelay; delivered to maildir\r\n"));
    assert_non_null(strstr(t, "Content-Description: Message\r\nContent-Type: message/rfc822\r\n\r\n"
                              "Subject: hello\r\n\r\nbody line\r\n"));
    kt_free(t);
}

/* SMTPUTF8, BODY=, RET=, ENVID=, NOTIFY= and ORCPT= survive the queue file; a file without them loads as
 * before. */
static void test_props(void **state)
{
    const char *addrs[] = { "a@x.test", "b@x.test", "c@x.test" };
    unsigned notify[] = { KT_QNOTIFY_SUCCESS | KT_QNOTIFY_DELAY, 0, KT_QNOTIFY_NEVER };
    const char *orcpt[] = { "rfc822;A+2Bx@x.test", NULL, "utf-8;c@x.test" };
    struct kt_qprops props = { .smtputf8 = 1, .body = KT_QBODY_8BITMIME, .ret = KT_QRET_HDRS, .envid = "ENV+2B1",
                               .notify = notify, .orcpt = orcpt };
    char id[KT_QUEUE_ID_MAX] = "";
    struct kt_qmsg *m;
    assert_int_equal(kt_queue_write_props(qdir, 1000, "s@x.test", addrs, 3, &props, "x\r\n", 3, id, sizeof(id)), 0);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_int_equal(m->smtputf8, 1);
    assert_int_equal(m->body, KT_QBODY_8BITMIME);
    assert_int_equal(m->ret, KT_QRET_HDRS);
    assert_string_equal(m->envid, "ENV+2B1");
    assert_int_equal(m->n_rcpts, 3);
    assert_int_equal(m->rcpts[0].notify, KT_QNOTIFY_SUCCESS | KT_QNOTIFY_DELAY);
    assert_string_equal(m->rcpts[0].orcpt, "rfc822;A+2Bx@x.test");
    assert_int_equal(m->rcpts[1].notify, 0);
    assert_null(m->rcpts[1].orcpt);
    assert_int_equal(m->rcpts[2].notify, KT_QNOTIFY_NEVER);
    assert_string_equal(m->rcpts[2].orcpt, "utf-8;c@x.test");
    assert_int_equal(m->body_len, 3);
    /* requeue keeps them for the recipients it takes */
    size_t idx[] = { 2 };
    unsigned n2[1];
    const char *o2[1], *g2[1];
    struct kt_qprops p2;
    kt_qmsg_props(m, idx, 1, n2, o2, g2, &p2);
    assert_int_equal(p2.notify[0], KT_QNOTIFY_NEVER);
    assert_string_equal(p2.orcpt[0], "utf-8;c@x.test");
    assert_string_equal(p2.envid, "ENV+2B1");
    kt_qmsg_free(m);
    char x[64];
    kt_xtext_encode("a+b=c d\xc3\xa4", x, sizeof(x));
    assert_string_equal(x, "a+2Bb+3Dc+20d+C3+A4");
    kt_xtext_decode("a+2Bb+0Dc", x, sizeof(x));
    assert_string_equal(x, "a+b?c");
}

/* The content filter and the original recipients survive the file and are not mistaken for recipients. */
static void test_filter_and_orig_rcpt(void **state)
{
    (void)state;
    const char *origs[] = { "team@alias.test", NULL, "dave@remote.test" };
    struct kt_qprops x = { .filter = "smtp:[127.0.0.1]:10024", .orig_rcpt = origs };
    char id[KT_QUEUE_ID_MAX] = "";
    assert_int_equal(kt_queue_write_props(qdir, 1000, "a@b", rcpts, 3, &x, "x\r\n", 3, id, sizeof(id)), 0);
    char path[1024], buf[1024];
    snprintf(path, sizeof(path), "%s/new/%s", qdir, id);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* orig_rcpt only where it differs, on the line after its rcpt */
    assert_non_null(strstr(buf, "canonical 1\nfilter smtp:[127.0.0.1]:10024\nrcpt bob@remote.test\n"
                                "orig_rcpt team@alias.test\nrcpt carol@remote.test\nrcpt dave@remote.test\nbody\n"));
    struct kt_qmsg *m;
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_string_equal(m->filter, "smtp:[127.0.0.1]:10024");
    assert_int_equal(m->n_rcpts, 3);
    assert_string_equal(m->rcpts[0].orig_rcpt, "team@alias.test");
    assert_null(m->rcpts[1].orig_rcpt);
    assert_null(m->rcpts[2].orig_rcpt);
    kt_qmsg_free(m);
    /* without extras: neither record */
    id[0] = '\0';
    assert_int_equal(kt_queue_write(qdir, "a@b", rcpts, 1, "x\r\n", 3, id, sizeof(id)), 0);
    assert_int_equal(kt_queue_load(qdir, id, &m), 0);
    assert_null(m->filter);
    assert_null(m->rcpts[0].orig_rcpt);
    kt_qmsg_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_and_load, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_records, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remove_and_cleanup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mark_many, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retire_as_spare, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_files, setup, teardown),
        cmocka_unit_test(test_dsn),
        cmocka_unit_test_setup_teardown(test_props, setup, teardown),
        cmocka_unit_test_setup_teardown(test_filter_and_orig_rcpt, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
