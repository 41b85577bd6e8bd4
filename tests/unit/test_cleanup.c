/* Unit tests for the streaming header and body checks (smtpd/cleanup.c): the same message fed whole and
 * cut into pieces of every size from 1 byte gives the same output and verdict, so a header or line split
 * across reads is checked as one; folded headers, MIME parts, nested messages, header_size_limit and
 * body_checks_size_limit, against pcre tables written by the test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "smtpd/cleanup.h"

static char *write_table(const char *text)
{
    char *path = kt_strdup("/tmp/kt-cleanup-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

struct out {
    char *data;
    size_t len;
};

static int collect(void *arg, const char *p, size_t n)
{
    struct out *o = arg;
    o->data = kt_realloc(o->data, o->len + n + 1);
    memcpy(o->data + o->len, p, n);
    o->len += n;
    o->data[o->len] = 0;
    return 0;
}

static const struct kt_cleanup_origin origin = { "QID", "unknown[127.0.0.1]", "s@example.org", "r@example.test",
                                                 "ESMTP", "client" };

/* Runs msg through checks in pieces of `step` bytes (0: whole); the output and the verdict. */
static enum kt_cleanup_verdict run(const struct kt_cleanup_checks *ck, const char *msg, size_t step, struct out *o,
                                   char *reply, size_t replylen)
{
    struct kt_cleanup *c = kt_cleanup_new(ck, &origin, collect, o);
    size_t len = strlen(msg);
    enum kt_cleanup_verdict v;

    o->data = NULL;
    o->len = 0;
    for (size_t off = 0; off < len;) {
        size_t n = step && len - off > step ? step : len - off;
        kt_cleanup_feed(c, msg + off, n);
        off += n;
    }
    kt_cleanup_finish(c);
    v = kt_cleanup_verdict(c);
    if (reply)
        snprintf(reply, replylen, "%s", kt_cleanup_reply(c));
    kt_cleanup_free(c);
    return v;
}

/* Every cut gives what the whole message gives. */
static void expect(const struct kt_cleanup_checks *ck, const char *msg, enum kt_cleanup_verdict want_v,
                   const char *want_out)
{
    for (size_t step = 0; step <= strlen(msg); step = step ? step + 1 : 1) {
        struct out o;
        enum kt_cleanup_verdict v = run(ck, msg, step, &o, NULL, 0);
        if (v != want_v || (want_out && (!o.data || strcmp(o.data, want_out) != 0)))
            fail_msg("step %zu: verdict %d, output:\n%s\nwanted:\n%s", step, (int)v, o.data ? o.data : "(none)",
                     want_out ? want_out : "(any)");
        kt_free(o.data);
        if (step > 64)
            step += 37;   /* long messages: a sample of the larger cuts */
    }
}

static struct kt_cleanup_checks *checks(const char *hc, const char *mc, const char *nc, const char *bc,
                                        long long hsl, long long bcsl, char **paths)
{
    struct kt_cleanup_checks *ck = NULL;
    char specs[4][300];
    const char *texts[4] = { hc, mc, nc, bc };
    char err[512];

    for (int i = 0; i < 4; i++) {
        specs[i][0] = 0;
        if (texts[i]) {
            paths[i] = write_table(texts[i]);
            snprintf(specs[i], sizeof(specs[i]), "pcre:%s", paths[i]);
        } else {
            paths[i] = NULL;
        }
    }
    struct kt_cleanup_params p = { specs[0], specs[1], specs[2], specs[3], hsl, bcsl };
    assert_int_equal(kt_cleanup_checks_new(&p, &ck, err, sizeof(err)), 0);
    assert_non_null(ck);
    return ck;
}

static void drop(struct kt_cleanup_checks *ck, char **paths)
{
    kt_cleanup_checks_free(ck);
    for (int i = 0; i < 4; i++) {
        if (paths[i])
            unlink(paths[i]);
        kt_free(paths[i]);
    }
}

static void test_headers_in_any_cut(void **state)
{
    char *paths[4];
    struct kt_cleanup_checks *ck = checks("/^Subject: spam/ REJECT no spam\n"
                                          "/^X-Drop:/ IGNORE\n"
                                          "/^X-Fold: a\\n\\s+b$/ REPLACE X-Fold: joined\n"
                                          "/^X-Tag: (\\w+)/ PREPEND X-Before: $1\n",
                                          NULL, NULL, "/^bad line$/ REJECT 4.7.0 later\n/^secret (\\d+)$/ REPLACE xx $1\n",
                                          102400, 51200, paths);
    char reply[600];
    struct out o;

    (void)state;
    expect(ck, "Subject: ok\r\nX-Drop: x\r\n y\r\nX-Fold: a\r\n\tb\r\nX-Tag: hi there\r\n\r\nbody\r\nsecret 42\r\n",
           KT_CLEANUP_ACCEPT, "Subject: ok\r\nX-Fold: joined\r\nX-Before: hi\r\nX-Tag: hi there\r\n\r\nbody\r\nxx 42\r\n");
    expect(ck, "From: a\r\nSubject: spam here\r\n\r\nbody\r\n", KT_CLEANUP_REJECT, NULL);
    expect(ck, "From: a\r\n\r\nok\r\nbad line\r\nmore\r\n", KT_CLEANUP_REJECT, NULL);
    assert_int_equal(run(ck, "Subject: spam\r\n\r\n", 0, &o, reply, sizeof(reply)), KT_CLEANUP_REJECT);
    assert_string_equal(reply, "550 5.7.1 no spam");
    kt_free(o.data);
    assert_int_equal(run(ck, "A: b\r\n\r\nbad line\r\n", 0, &o, reply, sizeof(reply)), KT_CLEANUP_REJECT);
    assert_string_equal(reply, "451 4.7.0 later");
    kt_free(o.data);
    /* a message that ends inside its headers, without a final line end, is still checked */
    expect(ck, "X-Tag: last", KT_CLEANUP_ACCEPT, "X-Before: last\r\nX-Tag: last\r\n");
    /* a "header" line without a colon ends the header section: it is body */
    expect(ck, "Subject: ok\r\nsecret 7\r\n", KT_CLEANUP_ACCEPT, "Subject: ok\r\nxx 7\r\n");
    drop(ck, paths);
}

static void test_mime_classes_and_limits(void **state)
{
    char *paths[4];
    struct kt_cleanup_checks *ck = checks("/^X-Where: /  REJECT primary\n",
                                          "/^Content-Type: application\\/bad/ REJECT mime\n/^X-Where: part/ DISCARD\n",
                                          "/^X-Where: nested/ REJECT nested\n",
                                          "/^late$/ REJECT late body line\n", 50, 64, paths);
#define MULTI(part, nested) "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npre\r\n" \
                            "--b1\r\nContent-Type: text/plain\r\n" part "\r\ntext\r\n" \
                            "--b1\r\nContent-Type: message/rfc822\r\n\r\n" nested "\r\ninner\r\n--b1--\r\nepilogue\r\n"
    char msg[1024];

    (void)state;
    snprintf(msg, sizeof(msg), "%s", MULTI("", "X-Other: x\r\n"));
    expect(ck, msg, KT_CLEANUP_ACCEPT, msg);
    snprintf(msg, sizeof(msg), "%s", MULTI("X-Where: part\r\n", "X-Other: x\r\n"));
    expect(ck, msg, KT_CLEANUP_DISCARD, NULL);
    snprintf(msg, sizeof(msg), "%s", MULTI("", "X-Where: nested\r\n"));
    expect(ck, msg, KT_CLEANUP_REJECT, NULL);
    expect(ck, "Content-Type: application/bad\r\n\r\n", KT_CLEANUP_REJECT, NULL);
    expect(ck, "X-Where: top\r\n\r\n", KT_CLEANUP_REJECT, NULL);
    /* header_size_limit = 50: the rest of a longer header is dropped and the header still ends its line */
    expect(ck, "X-Long: 012345678901234567890123456789012345678901234567890123456789\r\n\tmore\r\nA: b\r\n\r\nx\r\n",
           KT_CLEANUP_ACCEPT, "X-Long: 012345678901234567890123456789012345678901\r\nA: b\r\n\r\nx\r\n");
    /* body_checks_size_limit = 64: a line that starts past 64 body bytes is not looked at */
    expect(ck, "A: b\r\n\r\nlate\r\n", KT_CLEANUP_REJECT, NULL);
    expect(ck, "A: b\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123456789\r\nlate\r\n",
           KT_CLEANUP_ACCEPT, NULL);
    drop(ck, paths);
}

static void test_nothing_configured_and_queue_actions(void **state)
{
    struct kt_cleanup_checks *ck = (struct kt_cleanup_checks *)1;
    struct kt_cleanup_params none = { "", "", "", "", 102400, 51200 };
    char err[256], *paths[4];

    (void)state;
    assert_int_equal(kt_cleanup_checks_new(&none, &ck, err, sizeof(err)), 0);
    assert_null(ck);
    ck = checks("/^Subject: a/ WARN x\n", NULL, NULL, NULL, 102400, 0, paths);
    assert_false(kt_cleanup_checks_need_queue(ck));
    drop(ck, paths);
    ck = checks("/^Subject: a/ WARN x\n/^Subject: b/ hold\n", NULL, NULL, NULL, 102400, 0, paths);
    assert_true(kt_cleanup_checks_need_queue(ck));
    drop(ck, paths);
    ck = checks(NULL, NULL, NULL, "/^(\\w+) (.*)/ $1 $2\n", 102400, 0, paths);
    assert_true(kt_cleanup_checks_need_queue(ck));
    drop(ck, paths);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_headers_in_any_cut),
        cmocka_unit_test(test_mime_classes_and_limits),
        cmocka_unit_test(test_nothing_configured_and_queue_actions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
