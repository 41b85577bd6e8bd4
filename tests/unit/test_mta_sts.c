/* MTA-STS policy text, MX patterns and TXT records (RFC 8461 3.1, 3.2, 4.1), and TLSRPT records
 * (RFC 8460 3): exact results for the RFC's examples and for each way a record or policy is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "queue/mta_sts.h"
#include "queue/tlsrpt.h"

static int parse(const char *text, struct kt_sts_policy *p, char *err, size_t len)
{
    memset(p, 0, sizeof(*p));
    return kt_sts_policy_parse(text, strlen(text), p, err, len);
}

static void test_policy_rfc_example(void **state)
{
    (void)state;
    struct kt_sts_policy p;
    char err[256] = "";
    assert_int_equal(parse("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
                           "mx: backupmx.example.com\r\nmax_age: 604800\r\n", &p, err, sizeof(err)), 0);
    assert_int_equal(p.mode, KT_STS_MODE_ENFORCE);
    assert_int_equal(p.max_age, 604800);
    assert_int_equal(p.n_mx, 3);
    assert_string_equal(p.mx[0], "mail.example.com");
    assert_string_equal(p.mx[1], "*.example.net");
    assert_true(kt_sts_mx_match(&p, "mail.example.com"));
    assert_true(kt_sts_mx_match(&p, "MAIL.Example.COM."));
    assert_true(kt_sts_mx_match(&p, "mx1.example.net"));
    /* the wildcard is one label only, and not the bare domain */
    assert_false(kt_sts_mx_match(&p, "a.b.example.net"));
    assert_false(kt_sts_mx_match(&p, "example.net"));
    assert_false(kt_sts_mx_match(&p, "mail.example.com.evil.test"));
    assert_false(kt_sts_mx_match(&p, "xmail.example.com"));
    kt_sts_policy_clear(&p);
}

static void test_policy_lf_spaces_unknown_keys(void **state)
{
    (void)state;
    struct kt_sts_policy p;
    char err[256] = "";
    assert_int_equal(parse("version: STSv1\nmode:testing\nmx:   MX.Example.ORG.  \nfoo: bar\nmax_age: 0\n", &p, err,
                           sizeof(err)), 0);
    assert_int_equal(p.mode, KT_STS_MODE_TESTING);
    assert_int_equal(p.max_age, 0);
    assert_string_equal(p.mx[0], "mx.example.org");
    kt_sts_policy_clear(&p);
    assert_int_equal(parse("version: STSv1\nmode: none\nmax_age: 86400\n", &p, err, sizeof(err)), 0);
    assert_int_equal(p.mode, KT_STS_MODE_NONE);
    assert_int_equal(p.n_mx, 0);
    kt_sts_policy_clear(&p);
}

static void refused(const char *text, const char *why)
{
    struct kt_sts_policy p;
    char err[256] = "";
    assert_int_equal(parse(text, &p, err, sizeof(err)), -22);
    if (!strstr(err, why))
        fail_msg("\"%s\" does not say \"%s\"", err, why);
    assert_int_equal(p.n_mx, 0);
}

static void test_policy_refused(void **state)
{
    (void)state;
    refused("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "unsupported version \"STSv2\"");
    refused("mode: enforce\nmx: a.example\nmax_age: 1\n", "missing version");
    refused("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "unknown mode \"strict\"");
    refused("version: STSv1\nmode: enforce\nmx: a.example\n", "missing max_age");
    refused("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "bad max_age \"31557601\"");
    refused("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "bad max_age");
    refused("version: STSv1\nmode: enforce\nmax_age: 86400\n", "no mx in a policy of mode enforce");
    refused("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 86400\n", "bad mx pattern");
    refused("version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 86400\n", "bad mx pattern");
    refused("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 86400\n", "line without ':'");
}

static void test_txt(void **state)
{
    (void)state;
    char id[40];
    assert_int_equal(kt_sts_txt_parse("v=STSv1; id=20160831085700Z;", 28, id, sizeof(id)), 0);
    assert_string_equal(id, "20160831085700Z");
    assert_int_equal(kt_sts_txt_parse("v=STSv1;id=abc;ext=1", 20, id, sizeof(id)), 0);
    assert_string_equal(id, "abc");
    assert_int_equal(kt_sts_txt_parse("v=STSv1; ", 9, id, sizeof(id)), -22);
    assert_int_equal(kt_sts_txt_parse("id=abc; v=STSv1", 15, id, sizeof(id)), -22);
    assert_int_equal(kt_sts_txt_parse("v=STSv1; id=a-b", 15, id, sizeof(id)), -22);
    assert_int_equal(kt_sts_txt_parse("v=STSv1; id=123456789012345678901234567890123", 45, id, sizeof(id)), -22);
}

static void test_tlsrpt_txt(void **state)
{
    (void)state;
    char **u;
    size_t n;
    assert_int_equal(kt_tlsrpt_txt_parse("v=TLSRPTv1; rua=mailto:reports@example.com, https://r.example/v1", &u, &n),
                     0);
    assert_int_equal(n, 2);
    assert_string_equal(u[0], "mailto:reports@example.com");
    assert_string_equal(u[1], "https://r.example/v1");
    for (size_t i = 0; i < n; i++)
        kt_free(u[i]);
    kt_free(u);
    /* a URI with a line break, a space or a control character is left out */
    assert_int_equal(kt_tlsrpt_txt_parse("v=TLSRPTv1; rua=mailto:a@b.example\nhttps://evil.example/x,"
                                         "mailto:c d@e.example,mailto:f@g\001.example,mailto:ok@h.example", &u, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(u[0], "mailto:ok@h.example");
    kt_free(u[0]);
    kt_free(u);
    assert_int_equal(kt_tlsrpt_txt_parse("v=TLSRPTv1; rua=mailto:a@b.example\r\nmailto:x@y", &u, &n), -22);
    assert_int_equal(kt_tlsrpt_txt_parse("v=TLSRPTv2; rua=mailto:a@b", &u, &n), -22);
    assert_int_equal(kt_tlsrpt_txt_parse("v=TLSRPTv1;", &u, &n), -22);
    assert_int_equal(n, 0);
}

/* Many policy domains: each keeps one record with its exact counts (kept across a restart through the
 * saved counts), however many domains there are. */
static void test_tlsrpt_many_domains(void **state)
{
    (void)state;
    char dir[] = "/tmp/kt-tlsrpt-XXXXXX", path[64], line[256], dom[64];
    assert_non_null(mkdtemp(dir));
    struct kt_tlsrpt_settings set = { dir, "Org", "c@sender.test", "relay.sender.test", "" };
    enum { N = 3000 };
    for (int round = 0; round < 2; round++) {
        struct kt_tlsrpt *t = NULL;
        assert_int_equal(kt_tlsrpt_new(NULL, &set, time(NULL), NULL, NULL, &t), 0);
        for (int k = 0; k < 3; k++)
            for (int i = 0; i < N; i++) {
                snprintf(dom, sizeof(dom), "D%d.Example", i);
                kt_tlsrpt_count(t, dom, NULL, i % 3 == k ? "starttls-not-supported" : NULL, "192.0.2.1",
                                "mx.test", "192.0.2.2", "no STARTTLS");
            }
        kt_tlsrpt_free(t);
    }
    snprintf(path, sizeof(path), "%s/counts", dir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char seen[N];
    int records = 0;
    while (fgets(line, sizeof(line), f)) {
        int i, sts;
        long long ok, failed;
        if (strncmp(line, "record ", 7))
            continue;
        records++;
        assert_int_equal(sscanf(line, "record d%d.example %d %lld %lld -", &i, &sts, &ok, &failed), 4);
        assert_true(i >= 0 && i < N && !seen[i]);
        seen[i] = 1;
        assert_int_equal(sts, 0);
        /* two rounds of three sessions: one failure per round */
        assert_int_equal(ok, 4);
        assert_int_equal(failed, 2);
    }
    fclose(f);
    assert_int_equal(records, N);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy_rfc_example),
        cmocka_unit_test(test_policy_lf_spaces_unknown_keys),
        cmocka_unit_test(test_policy_refused),
        cmocka_unit_test(test_txt),
        cmocka_unit_test(test_tlsrpt_txt),
        cmocka_unit_test(test_tlsrpt_many_domains),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
