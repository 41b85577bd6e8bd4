/* Unit tests for lookup tables, map lists, domain lists and network lists,
 * against the fixtures in tests/unit/tables/. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "core/table.h"

static char *fixture(const char *name)
{
    const char *src = getenv("KT_TEST_SRCDIR");
    return kt_asprintf("%s/tables/%s", src ? src : ".", name);
}

static struct kt_table *open_ok(const char *spec, enum kt_table_kind kind)
{
    struct kt_table *t = NULL;
    char err[256] = "";
    int rc = kt_table_open(spec, kind, &t, err, sizeof(err));

    if (rc != 0)
        print_error("%s: %s\n", spec, err);
    assert_int_equal(rc, 0);
    assert_non_null(t);
    return t;
}

static void check_text_map(const char *type)
{
    char *path = fixture("map.txt");
    char *spec = kt_asprintf("%s:%s", type, path);
    struct kt_table *t = open_ok(spec, KT_TABLE_MAP);

    assert_string_equal(kt_table_get(t, "key1"), "value one");
    assert_string_equal(kt_table_get(t, "KEY1"), "value one");   /* duplicate later line ignored */
    assert_string_equal(kt_table_get(t, "key2"), "value two  continued here\tand more");
    assert_string_equal(kt_table_get(t, "key3"), "");
    assert_string_equal(kt_table_get(t, "key4"), "value # not a comment");
    assert_string_equal(kt_table_get(t, "mixed.example.com"), "ok");
    assert_null(kt_table_get(t, "# a"));
    assert_null(kt_table_get(t, "continued"));
    assert_null(kt_table_get(t, "and"));
    assert_null(kt_table_get(t, "absent"));
    assert_null(kt_table_get(t, "key"));
    kt_table_free(t);
    kt_free(spec);
    kt_free(path);
}

static void test_text_types(void **state)
{
    (void)state;
    check_text_map("texthash");
    check_text_map("hash");
    check_text_map("btree");
    check_text_map("lmdb");
}

static void test_aliases_syntax(void **state)
{
    char *path = fixture("aliases");
    char *spec = kt_asprintf("hash:%s", path);
    struct kt_table *t = open_ok(spec, KT_TABLE_ALIASES);

    (void)state;
    assert_string_equal(kt_table_get(t, "root"), "alice");
    assert_string_equal(kt_table_get(t, "TEAM"), "alice, Bob, carol@Example.COM,\tbob");
    assert_string_equal(kt_table_get(t, "cmd"), "\"|/usr/bin/procmail -a x\", /var/log/mail.file");
    assert_string_equal(kt_table_get(t, "quoted name"), "bob");
    assert_null(kt_table_get(t, "broken"));
    assert_null(kt_table_get(t, "broken line without colon"));
    kt_table_free(t);
    kt_free(spec);
    kt_free(path);
}

static void test_inline_static(void **state)
{
    struct kt_table *t = open_ok("inline:{ a=1, B=two, { c = value with, comma }, {d=} }", KT_TABLE_MAP);
    char err[256];

    (void)state;
    assert_string_equal(kt_table_get(t, "a"), "1");
    assert_string_equal(kt_table_get(t, "b"), "two");
    assert_string_equal(kt_table_get(t, "C"), "value with, comma");
    assert_string_equal(kt_table_get(t, "d"), "");
    assert_null(kt_table_get(t, "comma"));
    kt_table_free(t);

    t = open_ok("static:fixed", KT_TABLE_MAP);
    assert_string_equal(kt_table_get(t, "anything"), "fixed");
    assert_string_equal(kt_table_get(t, ""), "fixed");
    kt_table_free(t);
    t = open_ok("static:{ with space }", KT_TABLE_MAP);
    assert_string_equal(kt_table_get(t, "x"), "with space");
    kt_table_free(t);

    assert_int_equal(kt_table_open("inline:{ novalue }", KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_null(t);
    assert_int_equal(kt_table_open("inline:a=b", KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_table_open("inline:{ { a=b }", KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
}

static void test_cidr(void **state)
{
    char *path = fixture("cidr");
    char *spec = kt_asprintf("cidr:%s", path);
    struct kt_table *t = open_ok(spec, KT_TABLE_MAP);

    (void)state;
    assert_string_equal(kt_table_get(t, "192.168.1.7"), "first");       /* first match, not longest */
    assert_string_equal(kt_table_get(t, "192.168.1.255"), "first");
    assert_string_equal(kt_table_get(t, "192.168.2.1"), "second");
    assert_string_equal(kt_table_get(t, "::ffff:192.168.1.7"), "first");
    assert_string_equal(kt_table_get(t, "10.200.0.1"), "ten   continued");
    assert_string_equal(kt_table_get(t, "2001:db8:1::1"), "v6-net");
    assert_string_equal(kt_table_get(t, "2001:DB8:ffff::"), "v6-net");
    assert_string_equal(kt_table_get(t, "[::1]"), "loopback6");
    assert_null(kt_table_get(t, "::2"));                               /* negated v4 rule skips v6 */
    assert_null(kt_table_get(t, "2001:db9::1"));
    assert_string_equal(kt_table_get(t, "1.2.3.4"), "not-private");     /* host-bits line was skipped */
    assert_string_equal(kt_table_get(t, "8.8.8.8"), "not-private");
    assert_null(kt_table_get(t, "172.16.5.5"));
    assert_null(kt_table_get(t, "172.31.255.255"));
    assert_string_equal(kt_table_get(t, "172.32.0.0"), "not-private");
    assert_null(kt_table_get(t, "not-an-address"));
    assert_null(kt_table_get(t, "192.168.1"));
    kt_table_free(t);
    kt_free(spec);
    kt_free(path);
}

static void test_open_errors(void **state)
{
    struct kt_table *t = (struct kt_table *)1;
    char err[256] = "";

    (void)state;
    assert_int_equal(kt_table_open("ldap:/etc/x", KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_null(t);
    assert_non_null(strstr(err, "ldap:/etc/x"));
    assert_int_equal(kt_table_open("/etc/passwd", KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_table_open("hash:/nonexistent/ktrelay/x", KT_TABLE_MAP, &t, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "/nonexistent/ktrelay/x"));
    assert_int_equal(kt_table_open("cidr:/nonexistent/ktrelay/x", KT_TABLE_MAP, &t, err, sizeof(err)), -ENOENT);
    kt_table_free(NULL);
    kt_maps_free(NULL);
    kt_domain_list_free(NULL);
    kt_net_list_free(NULL);
}

static void test_crlf(void **state)
{
    char path[] = "/tmp/kt_table_crlf_XXXXXX";
    int fd = mkstemp(path);
    static const char text[] = "# dos file\r\nkey first\r\n  second\r\nother  value \r\n";
    char *spec;
    struct kt_table *t;

    (void)state;
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, sizeof(text) - 1), (ssize_t)(sizeof(text) - 1));
    close(fd);
    spec = kt_asprintf("texthash:%s", path);
    t = open_ok(spec, KT_TABLE_MAP);
    assert_string_equal(kt_table_get(t, "key"), "first  second");
    assert_string_equal(kt_table_get(t, "other"), "value");
    kt_table_free(t);
    kt_free(spec);
    unlink(path);
}

static int count_entry(const char *key, const char *value, void *arg)
{
    (void)value;
    if (key)
        ++*(size_t *)arg;
    return 0;
}

static void test_maps(void **state)
{
    char *path = fixture("map.txt");
    char *list = kt_asprintf("inline:{ key1=override }, texthash:%s,static:fallback", path);
    struct kt_maps *m;
    char err[256];
    size_t n = 0;

    (void)state;
    assert_int_equal(kt_maps_open(list, KT_TABLE_MAP, &m, err, sizeof(err)), 0);
    assert_int_equal(kt_maps_count(m), 3);
    assert_string_equal(kt_maps_get(m, "Key1"), "override");
    assert_string_equal(kt_maps_get(m, "key4"), "value # not a comment");
    assert_string_equal(kt_maps_get(m, "zzz"), "fallback");
    assert_int_equal(kt_maps_foreach(m, count_entry, &n), 0);
    assert_int_equal(n, 1 + 5);
    kt_maps_free(m);

    assert_int_equal(kt_maps_open("", KT_TABLE_MAP, &m, err, sizeof(err)), 0);
    assert_null(kt_maps_get(m, "x"));
    assert_int_equal(kt_maps_count(m), 0);
    kt_maps_free(m);
    assert_int_equal(kt_maps_open(NULL, KT_TABLE_MAP, &m, err, sizeof(err)), 0);
    assert_null(kt_maps_get(m, "x"));
    kt_maps_free(m);

    assert_int_equal(kt_maps_open("static:x, hash:/nonexistent/ktrelay", KT_TABLE_MAP, &m, err, sizeof(err)), -ENOENT);
    assert_null(m);
    kt_free(list);
    kt_free(path);
}

static void test_domain_list(void **state)
{
    char *path = fixture("domains.txt");
    char *list = kt_asprintf("Example.COM, %s !bad.sub.example sub.example inline:{ table.example=1, .dot.example=1 }", path);
    struct kt_domain_list *l;
    char err[256];

    (void)state;
    assert_int_equal(kt_domain_list_open(list, 0, &l, err, sizeof(err)), 0);
    assert_int_equal(kt_domain_list_match(l, "example.com"), 1);
    assert_int_equal(kt_domain_list_match(l, "EXAMPLE.com."), 1);
    assert_int_equal(kt_domain_list_match(l, "a.example.com"), 0);
    assert_int_equal(kt_domain_list_match(l, "notexample.com"), 0);
    assert_int_equal(kt_domain_list_match(l, "relay.example"), 1);        /* from the file */
    assert_int_equal(kt_domain_list_match(l, "other.example"), 1);        /* second entry on a file line */
    assert_int_equal(kt_domain_list_match(l, "x.Dotted.example"), 1);     /* ".domain" always matches subdomains */
    assert_int_equal(kt_domain_list_match(l, "dotted.example"), 0);
    assert_int_equal(kt_domain_list_match(l, "bad.sub.example"), 0);      /* negated before the positive entry */
    assert_int_equal(kt_domain_list_match(l, "sub.example"), 1);
    assert_int_equal(kt_domain_list_match(l, "TABLE.example"), 1);
    assert_int_equal(kt_domain_list_match(l, "x.table.example"), 0);
    assert_int_equal(kt_domain_list_match(l, "x.dot.example"), 1);        /* table key ".dot.example" */
    assert_int_equal(kt_domain_list_match(l, "dot.example"), 0);
    assert_int_equal(kt_domain_list_match(l, ""), 0);
    kt_domain_list_free(l);

    assert_int_equal(kt_domain_list_open(list, 1, &l, err, sizeof(err)), 0);
    assert_int_equal(kt_domain_list_match(l, "a.example.com"), 1);
    assert_int_equal(kt_domain_list_match(l, "deep.a.EXAMPLE.com"), 1);
    assert_int_equal(kt_domain_list_match(l, "notexample.com"), 0);
    assert_int_equal(kt_domain_list_match(l, "x.relay.example"), 1);
    assert_int_equal(kt_domain_list_match(l, "x.table.example"), 1);      /* parent looked up as "table.example" */
    assert_int_equal(kt_domain_list_match(l, "x.bad.sub.example"), 0);
    assert_int_equal(kt_domain_list_match(l, "x.sub.example"), 1);
    kt_domain_list_free(l);

    assert_int_equal(kt_domain_list_open("", 0, &l, err, sizeof(err)), 0);
    assert_int_equal(kt_domain_list_match(l, "example.com"), 0);
    kt_domain_list_free(l);
    assert_int_equal(kt_domain_list_open("a.example /nonexistent/ktrelay", 0, &l, err, sizeof(err)), -ENOENT);
    assert_null(l);
    assert_int_equal(kt_domain_list_open("ldap:/x", 0, &l, err, sizeof(err)), -EINVAL);
    kt_free(list);
    kt_free(path);
}

static void test_net_list(void **state)
{
    char *file = fixture("nets.txt"), *cidr = fixture("nets.cidr");
    char *list = kt_asprintf("127.0.0.0/8 [::1]/128, 192.168.1.1 %s !10.1.0.0/16 10.0.0.0/8 cidr:%s fe80::/10", file, cidr);
    struct kt_net_list *l;
    char err[256];

    (void)state;
    assert_int_equal(kt_net_list_open(list, &l, err, sizeof(err)), 0);
    assert_int_equal(kt_net_list_match(l, "127.0.0.1"), 1);
    assert_int_equal(kt_net_list_match(l, "127.255.1.2"), 1);
    assert_int_equal(kt_net_list_match(l, "::ffff:127.0.0.5"), 1);
    assert_int_equal(kt_net_list_match(l, "128.0.0.1"), 0);
    assert_int_equal(kt_net_list_match(l, "::1"), 1);
    assert_int_equal(kt_net_list_match(l, "::2"), 0);
    assert_int_equal(kt_net_list_match(l, "192.168.1.1"), 1);
    assert_int_equal(kt_net_list_match(l, "192.168.1.2"), 0);
    assert_int_equal(kt_net_list_match(l, "192.0.2.55"), 1);
    assert_int_equal(kt_net_list_match(l, "2001:db8:feed:1::1"), 1);
    assert_int_equal(kt_net_list_match(l, "2001:db8:fee0::1"), 0);
    assert_int_equal(kt_net_list_match(l, "10.1.2.3"), 0);
    assert_int_equal(kt_net_list_match(l, "10.2.3.4"), 1);
    assert_int_equal(kt_net_list_match(l, "203.0.113.9"), 1);
    assert_int_equal(kt_net_list_match(l, "203.0.114.9"), 0);
    assert_int_equal(kt_net_list_match(l, "FE80::1"), 1);
    assert_int_equal(kt_net_list_match(l, "garbage"), 0);
    assert_int_equal(kt_net_list_match(l, ""), 0);
    kt_net_list_free(l);

    assert_int_equal(kt_net_list_open("1.2.3.4/24", &l, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "host address bits"));
    assert_int_equal(kt_net_list_open("999.1.1.1", &l, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_net_list_open("1.2.3.0/33", &l, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_net_list_open("[::1", &l, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_net_list_open("mail.example.com", &l, err, sizeof(err)), -EINVAL);
    assert_int_equal(kt_net_list_open("", &l, err, sizeof(err)), 0);
    assert_int_equal(kt_net_list_match(l, "127.0.0.1"), 0);
    kt_net_list_free(l);
    kt_free(list);
    kt_free(file);
    kt_free(cidr);
}

/* A few hundred thousand keys load and every one is found (the load time is printed; speed is measured
 * in bench/, never asserted in a test). */
static void test_large_table(void **state)
{
    char path[] = "/tmp/kt_table_large_XXXXXX";
    int fd = mkstemp(path);
    FILE *f;
    char *spec, key[64];
    struct kt_table *t;
    struct timespec a, b;
    const unsigned n = 300000;

    (void)state;
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "User%u@Domain%u.example  value-%u\n", i, i % 1000, i);
    fclose(f);
    spec = kt_asprintf("hash:%s", path);
    clock_gettime(CLOCK_MONOTONIC, &a);
    t = open_ok(spec, KT_TABLE_MAP);
    clock_gettime(CLOCK_MONOTONIC, &b);
    print_message("loaded %u keys in %.3f s\n", n,
                  (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9);
    for (unsigned i = 0; i < n; i += 997) {
        char want[32];
        snprintf(key, sizeof(key), "user%u@DOMAIN%u.example", i, i % 1000);
        snprintf(want, sizeof(want), "value-%u", i);
        assert_string_equal(kt_table_get(t, key), want);
    }
    assert_null(kt_table_get(t, "user300000@domain0.example"));
    kt_table_free(t);
    kt_free(spec);
    unlink(path);
}

/* regexp: and pcre: over one fixture whose rules mean the same in both syntaxes. */
static void check_regexp(const char *type)
{
    char *path = fixture("regexp");
    char *spec = kt_asprintf("%s:%s", type, path);
    struct kt_table *t = open_ok(spec, KT_TABLE_MAP);

    assert_string_equal(kt_table_get(t, "Subject: buy VIAGRA now"), "REJECT spam subject");
    assert_string_equal(kt_table_get(t, "X-Mailer: Foo 1.0"), "WARN mailer is Foo 1.0");
    assert_string_equal(kt_table_get(t, "To: x@worse.example"), "REJECT worse in To");
    assert_string_equal(kt_table_get(t, "Subject: hello"), "BARE no at sign in $");
    assert_string_equal(kt_table_get(t, "x-case: YES@"), "case folded by default");
    assert_string_equal(kt_table_get(t, "X-Sensitive: YES@"), "case kept with i");
    assert_null(kt_table_get(t, "X-Sensitive: yes@"));
    assert_string_equal(kt_table_get(t, "multi: first  second@"), "joined continuation line");
    /* if blocks, nested, negated */
    assert_string_equal(kt_table_get(t, "if-block: one"), "first of block");
    assert_string_equal(kt_table_get(t, "if-block: three"), "nested, not two");
    assert_string_equal(kt_table_get(t, "if-block: two three@"), "block catch-all");
    assert_string_equal(kt_table_get(t, "delim#@"), "slash not special");
    assert_string_equal(kt_table_get(t, "pct-delim: x@"), "pct delimiter x");
    assert_string_equal(kt_table_get(t, "Empty-Groups: b"), "[][b]");
    assert_string_equal(kt_table_get(t, "Empty-Groups: ab"), "[a][b]");
    assert_string_equal(kt_table_get(t, "Last-Rule@"), "last");
    assert_null(kt_table_get(t, "nothing@matches"));
    kt_table_free(t);
    kt_free(spec);
    kt_free(path);

    /* Rules that cannot be read (out-of-range, non-numeric, $n in a negated
     * rule, bad flag, unclosed, bad pattern, a stray endif): Postfix skips
     * them with a warning; ktrelay refuses the table, so a misspelt REJECT
     * rule cannot silently stop applying. */
    path = fixture("regexp-bad");
    spec = kt_asprintf("%s:%s", type, path);
    char err[512] = "";
    t = NULL;
    assert_int_equal(kt_table_open(spec, KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_null(t);
    assert_non_null(strstr(err, ": 7 rules could not be read (the warnings above name the lines); a table is used "
                                "whole or not at all"));
    kt_free(spec);
    kt_free(path);
}

static int count_rule(const char *key, const char *value, void *arg)
{
    (void)key;
    assert_non_null(value);
    (*(int *)arg)++;
    return 0;
}

static void test_regexp(void **state)
{
    struct kt_table *t;
    struct kt_maps *m;
    char err[256];
    int n = 0;

    (void)state;
    check_regexp("regexp");
    check_regexp("pcre");
    /* a missing file is an error, as for every file table */
    assert_int_equal(kt_table_open("pcre:/nonexistent/ktrelay/x", KT_TABLE_MAP, &t, err, sizeof(err)), -ENOENT);
    /* through a map list, in order with other tables; foreach sees each loaded rule's result */
    {
        char *path = fixture("regexp");
        char *list = kt_asprintf("inline:{ {Subject: hello=exact} }, pcre:%s", path);
        assert_int_equal(kt_maps_open(list, KT_TABLE_MAP, &m, err, sizeof(err)), 0);
        assert_string_equal(kt_maps_get(m, "Subject: hello"), "exact");
        assert_string_equal(kt_maps_get(m, "Subject: hello again"), "BARE no at sign in $");
        kt_maps_foreach(m, count_rule, &n);
        kt_maps_free(m);
        kt_free(list);
        kt_free(path);
    }
    assert_int_equal(n, 1 + 14);
}

static void test_regexp_syntax_only(void **state)
{
    char path[] = "/tmp/kt-regexp-XXXXXX";
    int fd = mkstemp(path);
    struct kt_table *t;
    char *spec;
    FILE *f;

    (void)state;
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    /* pcre only: flags s x U; regexp only: /a/!/b/; a catastrophic pattern is bounded */
    fputs("/^a.b$/s  dotall\n/^x y z $/x  extended\n/^(<.+>)/U  ungreedy $1\n/^(a+)+$/ backtrack\n", f);
    fclose(f);
    spec = kt_asprintf("pcre:%s", path);
    t = open_ok(spec, KT_TABLE_MAP);
    assert_string_equal(kt_table_get(t, "a\nb"), "dotall");
    assert_string_equal(kt_table_get(t, "xyz"), "extended");
    assert_string_equal(kt_table_get(t, "<a><b>"), "ungreedy <a>");
    assert_null(kt_table_get(t, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab"));
    kt_table_free(t);
    kt_free(spec);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("/^Subject:/!/urgent/  not urgent\n/^a.b$/  dot matches newline\n", f);
    fclose(f);
    spec = kt_asprintf("regexp:%s", path);
    t = open_ok(spec, KT_TABLE_MAP);
    assert_string_equal(kt_table_get(t, "Subject: hello"), "not urgent");
    assert_null(kt_table_get(t, "Subject: urgent hello"));
    assert_string_equal(kt_table_get(t, "a\nb"), "dot matches newline");
    assert_null(kt_table_get(t, "x"));
    kt_table_free(t);
    /* pcre's s flag is no regexp: flag: the rule, and so the table, is refused */
    f = fopen(path, "a");
    assert_non_null(f);
    fputs("/^x/s  never\n", f);
    fclose(f);
    char err[256];
    t = NULL;
    assert_int_equal(kt_table_open(spec, KT_TABLE_MAP, &t, err, sizeof(err)), -EINVAL);
    assert_null(t);
    kt_free(spec);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_types),
        cmocka_unit_test(test_aliases_syntax),
        cmocka_unit_test(test_inline_static),
        cmocka_unit_test(test_cidr),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_crlf),
        cmocka_unit_test(test_maps),
        cmocka_unit_test(test_domain_list),
        cmocka_unit_test(test_net_list),
        cmocka_unit_test(test_large_table),
        cmocka_unit_test(test_regexp),
        cmocka_unit_test(test_regexp_syntax_only),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
