/* DNS list pieces of policy.c: result filters (=127.0.0.2, [N;N..M]
 * octets), query names for IPv4 and IPv6 clients, rbl_reply_maps template
 * expansion and Postfix's default reply, and the HELO name test of
 * reject_invalid_helo_hostname. The .c is included to reach its statics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../src/smtpd/policy.c"

static void test_filters(void **state)
{
    assert_int_equal(filter_match("127.0.0.2", "127.0.0.2"), 1);
    assert_int_equal(filter_match("127.0.0.2", "127.0.0.3"), 0);
    assert_int_equal(filter_match("127.0.0.[2..4]", "127.0.0.4"), 1);
    assert_int_equal(filter_match("127.0.0.[2..4]", "127.0.0.5"), 0);
    assert_int_equal(filter_match("127.0.[0..255].[2;3;10..12]", "127.0.9.11"), 1);
    assert_int_equal(filter_match("127.0.[0..255].[2;3;10..12]", "127.0.9.4"), 0);
    assert_int_equal(filter_match("127.0.0.2", "not an address"), 0);
    static const char *bad[] = { "127.0.0", "127.0.0.2.1", "127.0.0.[2..x]", "127.0.0.256", "127.0.0.[4..2]",
                                 "127.0.0.2..4", "127.0.0.[2", "127.0.0.1;2", "", "127..0.1" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_false(filter_valid(bad[i]));
    }
    assert_true(filter_valid("127.0.0.[1;2;5..7]"));
}

static void test_query_names(void **state)
{
    char q[300];
    assert_int_equal(rbl_query_name("192.0.2.7", "zen.test", q, sizeof(q)), 0);
    assert_string_equal(q, "7.2.0.192.zen.test");
    assert_int_equal(rbl_query_name("2001:db8::19", "zen.test", q, sizeof(q)), 0);
    assert_string_equal(q, "9.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test");
    assert_int_equal(rbl_query_name("unknown", "zen.test", q, sizeof(q)), -1);
}

static void test_reply_templates(void **state)
{
    struct kt_policy_request r = { .client_addr = "192.0.2.7", .helo = "h.example", .sender = "s@example.org",
                                   .recipient = "r@example.net", .client_name = NULL };
    struct kt_policy p = { 0 };
    char reply[700];
    struct eval e = { .p = &p, .r = &r, .reply = reply, .replylen = sizeof(reply) };
    snprintf(e.client, sizeof(e.client), "unknown[192.0.2.7]");
    struct restriction rs = { .type = R_RBL_CLIENT, .zone = "zen.test" };
    assert_int_equal(rbl_reject(&e, &rs, "Client host", "192.0.2.7", "see http://x/"), REJECT);
    assert_string_equal(reply, "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using zen.test; "
                               "see http://x/");
    assert_int_equal(rbl_reject(&e, &rs, "Client host", "192.0.2.7", ""), REJECT);
    assert_string_equal(reply, "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using zen.test");
    char out[300];
    struct rbl_vars v = { .code = "554", .domain = "zen.test", .cls = "Client host", .what = "192.0.2.7", .reason = "" };
    const char *t = "$rbl_code [${rbl_reason?has}] [${rbl_domain?has $rbl_domain}] ${rbl_reason:empty} $client $$ $(helo_name) ${sender}";
    rbl_expand(&e, &v, t, strlen(t), out, 0, sizeof(out), 0);
    assert_string_equal(out, "554 [] [has zen.test] empty unknown[192.0.2.7] $ h.example s@example.org");
}

static void test_helo_names(void **state)
{
    assert_true(valid_helo_name("mail.example.net"));
    assert_true(valid_helo_name("[192.0.2.1]"));
    assert_true(valid_helo_name("[IPv6:2001:db8::1]"));
    assert_true(valid_helo_name("[2001:db8::1]"));
    assert_true(valid_helo_name("2001:db8::1"));
    assert_true(valid_helo_name("192.0.2.1"));
    assert_false(valid_helo_name("a..b"));
    assert_false(valid_helo_name("two words"));
    assert_false(valid_helo_name("[192.0.2.300]"));
    assert_false(valid_helo_name("[IPv6:zz]"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_query_names),
        cmocka_unit_test(test_reply_templates),
        cmocka_unit_test(test_helo_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
