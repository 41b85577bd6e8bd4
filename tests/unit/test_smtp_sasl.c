/* Unit tests for the smarthost credential lookup (key order, bracket forms, sender-dependent keys),
 * the username:password split and smtp_sasl_mechanism_filter. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "core/table.h"
#include "queue/smtp_client.h"
#include "queue/smtp_sasl.h"

static struct kt_maps *maps_of(const char *spec)
{
    struct kt_maps *m = NULL;
    char err[256] = "";
    assert_int_equal(kt_maps_open(spec, KT_TABLE_MAP, &m, err, sizeof(err)), 0);
    return m;
}

static const char *find(const struct kt_maps *m, const char *sender, int dep, const char *server, const char *nh)
{
    struct kt_smtp_sasl_keys k = { .sender = sender, .sender_dependent = dep, .server = server, .nexthop = nh };
    return kt_smtp_sasl_lookup(m, &k);
}

static void test_key_order(void **state)
{
    (void)state;
    struct kt_maps *m = maps_of("inline:{ a@x.test=sender:1, @x.test=domain:2, mx.relay.test=server:3, "
                                "[relay.test]:587=hostport:4, [relay.test]=bracket:5, relay.test=bare:6 }");
    /* sender keys only when sender-dependent, and never for the null sender */
    assert_string_equal(find(m, "a@x.test", 1, "mx.relay.test", "[relay.test]:587"), "sender:1");
    assert_string_equal(find(m, "b@x.test", 1, "mx.relay.test", "[relay.test]:587"), "domain:2");
    assert_string_equal(find(m, "a@x.test", 0, "mx.relay.test", "[relay.test]:587"), "server:3");
    assert_string_equal(find(m, "", 1, "mx.relay.test", "[relay.test]:587"), "server:3");
    /* then the next hop as written, "[host]" for "[host]:port", the bare host */
    assert_string_equal(find(m, NULL, 0, "other", "[relay.test]:587"), "hostport:4");
    assert_string_equal(find(m, NULL, 0, "other", "[relay.test]:25"), "bracket:5");
    assert_string_equal(find(m, NULL, 0, "other", "[relay.test]"), "bracket:5");
    assert_string_equal(find(m, NULL, 0, "other", "relay.test:2525"), "bare:6");
    assert_string_equal(find(m, NULL, 0, "other", "relay.test"), "bare:6");
    assert_null(find(m, NULL, 0, "other", "[elsewhere.test]:587"));
    assert_null(find(m, NULL, 0, "other", "[broken"));
    assert_null(find(NULL, NULL, 0, "mx.relay.test", "relay.test"));
    kt_maps_free(m);
}

static void test_split(void **state)
{
    (void)state;
    char *u, *p;
    assert_int_equal(kt_smtp_sasl_split("user@example.org:pa:ss word", &u, &p), 0);
    assert_string_equal(u, "user@example.org");
    assert_string_equal(p, "pa:ss word");
    kt_free(u);
    kt_free(p);
    assert_int_equal(kt_smtp_sasl_split("user:", &u, &p), 0);
    assert_string_equal(p, "");
    kt_free(u);
    kt_free(p);
    assert_int_equal(kt_smtp_sasl_split("nocolon", &u, &p), -EINVAL);
    assert_null(u);
    assert_int_equal(kt_smtp_sasl_split(":pass", &u, &p), -EINVAL);
    assert_int_equal(kt_smtp_sasl_split(NULL, &u, &p), -EINVAL);
}

static void test_filter(void **state)
{
    (void)state;
    unsigned m = 0;
    char err[256] = "";
    const unsigned all = KT_SMTP_MECH_PLAIN | KT_SMTP_MECH_LOGIN;
    assert_int_equal(kt_smtp_sasl_filter("", &m, err, sizeof(err)), 0);
    assert_int_equal(m, all);
    assert_int_equal(kt_smtp_sasl_filter("plain", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_SMTP_MECH_PLAIN);
    assert_int_equal(kt_smtp_sasl_filter("cram-md5, LOGIN", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_SMTP_MECH_LOGIN);
    assert_int_equal(kt_smtp_sasl_filter("!plain, static:all", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_SMTP_MECH_LOGIN);
    /* first match wins */
    assert_int_equal(kt_smtp_sasl_filter("plain, !plain, !login", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_SMTP_MECH_PLAIN);
    assert_int_equal(kt_smtp_sasl_filter("gssapi", &m, err, sizeof(err)), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kt_smtp_sasl_filter("hash:/etc/postfix/mechs", &m, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "not tables or files"));
    assert_int_equal(kt_smtp_sasl_filter("/etc/postfix/mechs", &m, err, sizeof(err)), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_order),
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_filter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
