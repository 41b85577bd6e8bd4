/* Unit tests of the outbound TLS policy (queue/tls_policy.c): Postfix's policy table syntax, the
 * lookup keys and parent-domain matching of smtp_tls_policy_maps, the main.cf defaults of each level;
 * and of the TLSA answer parser (tls/dane.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <errno.h>
#include <openssl/ssl.h>

#include "core/alloc.h"
#include "core/table.h"
#include "queue/tls_policy.h"
#include "tls/dane.h"

static const struct kt_tls_policy_defaults DEF = {
    .security_level = "may",
    .verify_cert_match = "hostname",
    .secure_cert_match = "nexthop, dot-nexthop",
    .fingerprint_cert_match = "",
    .protocols = ">=TLSv1",
    .mandatory_protocols = ">=TLSv1.2",
    .ciphers = "medium",
    .mandatory_ciphers = "high",
    .exclude_ciphers = "",
    .mandatory_exclude_ciphers = "",
    .servername = "",
    .fingerprint_digest = "sha256",
};

static struct kt_tls_policy_set *set_with(const char *inline_spec, const char *level, int expect_rc, char *err,
                                          size_t errlen)
{
    struct kt_maps *maps = NULL;
    struct kt_tls_policy_set *s = NULL;
    struct kt_tls_policy_defaults def = DEF;
    def.security_level = level;
    if (inline_spec)
        assert_int_equal(kt_maps_open(inline_spec, KT_TABLE_MAP, &maps, err, errlen), 0);
    int rc = kt_tls_policy_set_new(&def, maps, &s, err, errlen);
    assert_int_equal(rc, expect_rc);
    if (rc < 0)
        kt_maps_free(maps);
    return s;
}

/* The policy of nexthop in set, into *p; returns its level (an enum kt_smtp_tls). */
static int level_of(const struct kt_tls_policy_set *set, const char *nexthop, struct kt_tls_policy *p)
{
    kt_tls_policy_lookup(set, nexthop, p);
    return p->level;
}

static void test_levels(void **state)
{
    (void)state;
    static const char *const names[] = { "none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",
                                         "secure" };
    for (size_t i = 0; i < 8; i++) {
        int l = kt_tls_level_parse(names[i]);
        assert_true(l >= 0);
        assert_string_equal(kt_tls_level_name(l), names[i]);
    }
    assert_int_equal(kt_tls_level_parse(""), KT_SMTP_TLS_NONE);
    assert_int_equal(kt_tls_level_parse("DANE-ONLY"), KT_SMTP_TLS_DANE_ONLY);
    assert_int_equal(kt_tls_level_parse("mandatory"), -1);
    /* dane without usable TLSA falls back to may: not mandatory by itself */
    assert_false(kt_tls_level_mandatory(KT_SMTP_TLS_DANE));
    assert_false(kt_tls_level_mandatory(KT_SMTP_TLS_MAY));
    assert_true(kt_tls_level_mandatory(KT_SMTP_TLS_ENCRYPT));
    assert_true(kt_tls_level_mandatory(KT_SMTP_TLS_DANE_ONLY));
    assert_true(kt_tls_level_mandatory(KT_SMTP_TLS_FINGERPRINT));
    assert_false(kt_tls_level_authenticates(KT_SMTP_TLS_ENCRYPT));
    assert_true(kt_tls_level_authenticates(KT_SMTP_TLS_SECURE));
}

static void test_parse(void **state)
{
    (void)state;
    struct kt_tls_policy p;
    char err[512];
    assert_int_equal(kt_tls_policy_parse(&DEF, "secure match=nexthop:.example.net protocols=>=TLSv1.3 "
                                               "ciphers=high exclude=3DES servername=mx.example.net", &p, err,
                                         sizeof(err)), 0);
    assert_int_equal(p.level, KT_SMTP_TLS_SECURE);
    assert_string_equal(p.match, "nexthop:.example.net");
    assert_string_equal(p.protocols, ">=TLSv1.3");
    assert_string_equal(p.ciphers, "high");
    assert_string_equal(p.exclude, "3DES");
    assert_string_equal(p.servername, "mx.example.net");
    /* the level's main.cf match list when the entry gives none, in the table's ':' form */
    assert_int_equal(kt_tls_policy_parse(&DEF, "secure", &p, err, sizeof(err)), 0);
    assert_string_equal(p.match, "nexthop:dot-nexthop");
    assert_int_equal(kt_tls_policy_parse(&DEF, "VERIFY", &p, err, sizeof(err)), 0);
    assert_string_equal(p.match, "hostname");
    /* several match= of fingerprint join with '|' (a fingerprint holds ':') */
    assert_int_equal(kt_tls_policy_parse(&DEF, "fingerprint match=AB:CD match=ef:01|23:45", &p, err, sizeof(err)), 0);
    assert_string_equal(p.match, "AB:CD|ef:01|23:45");
    assert_int_equal(kt_tls_policy_parse(&DEF, "dane-only connection_reuse=yes", &p, err, sizeof(err)), 0);
    assert_int_equal(p.level, KT_SMTP_TLS_DANE_ONLY);

    static const struct {
        const char *value, *message;
    } bad[] = {
        { "encrpyt", "unknown TLS security level \"encrpyt\" (did you mean encrypt?)" },
        { "", "empty TLS policy" },
        { "secure mach=nexthop", "unknown attribute \"mach\" (did you mean match?)" },
        { "secure tafile=/etc/ta.pem", "unsupported attribute \"tafile\"" },
        { "encrypt match=nexthop", "the match attribute is only for the fingerprint, verify and secure levels" },
        { "may protocols=TLSv1.4", "unknown TLS protocol" },
        { "may ciphers=strong", "unsupported cipher grade \"strong\"" },
        { "may exclude=!RC4", "invalid unary" },
        { "fingerprint", "the fingerprint level needs match=" },
        { "secure match=", "empty match attribute" },
        { "secure nexthop", "malformed attribute \"nexthop\"" },
        { "may connection_reuse=maybe", "bad connection_reuse value" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_int_equal(kt_tls_policy_parse(&DEF, bad[i].value, &p, err, sizeof(err)), -EINVAL);
        if (!strstr(err, bad[i].message))
            print_message("%s: %s\n", bad[i].value, err);
        assert_non_null(strstr(err, bad[i].message));
    }
}

static void test_lookup_keys(void **state)
{
    (void)state;
    char err[512];
    struct kt_tls_policy p;
    struct kt_tls_policy_set *s =
        set_with("inline:{ {[mx.example.com]:587 = secure match=mx.example.com}, {[mx.example.com] = encrypt}, "
                 "{example.com = verify}, {.example.com = encrypt}, {.org = none}, {relay.example.net:2525 = secure} }",
                 "may", 0, err, sizeof(err));
    assert_true(kt_tls_policy_set_uses_tls(s));
    assert_false(kt_tls_policy_set_uses_dane(s));
    /* "[host]:port" and "[host]" are exact keys */
    assert_int_equal(level_of(s, "[mx.example.com]:587", &p), KT_SMTP_TLS_SECURE);
    assert_string_equal(p.match, "mx.example.com");
    assert_int_equal(level_of(s, "[MX.Example.COM]", &p), KT_SMTP_TLS_ENCRYPT);
    /* no parent lookups for a bracketed or port-qualified next hop */
    assert_int_equal(level_of(s, "[sub.example.com]", &p), KT_SMTP_TLS_MAY);
    assert_string_equal(p.source, "smtp_tls_security_level");
    assert_int_equal(level_of(s, "sub.example.com:25", &p), KT_SMTP_TLS_MAY);
    assert_int_equal(level_of(s, "relay.example.net:2525", &p), KT_SMTP_TLS_SECURE);
    /* a domain: itself, then ".parent" keys, as TLS_README describes */
    assert_int_equal(level_of(s, "example.com", &p), KT_SMTP_TLS_VERIFY);
    assert_string_equal(p.source, "smtp_tls_policy_maps");
    assert_int_equal(level_of(s, "a.b.example.com.", &p), KT_SMTP_TLS_ENCRYPT);
    assert_int_equal(level_of(s, "example.org", &p), KT_SMTP_TLS_NONE);
    assert_int_equal(level_of(s, "example.net", &p), KT_SMTP_TLS_MAY);
    /* OpenSSL settings: mandatory levels take the mandatory parameters */
    int mn, mx;
    long no;
    char *cl;
    kt_tls_policy_lookup(s, "example.net", &p);
    assert_int_equal(kt_tls_policy_openssl(s, &p, &mn, &mx, &no, &cl), 0);
    assert_int_equal(mn, TLS1_VERSION);
    kt_free(cl);
    kt_tls_policy_lookup(s, "[mx.example.com]", &p);
    assert_int_equal(kt_tls_policy_openssl(s, &p, &mn, &mx, &no, &cl), 0);
    assert_int_equal(mn, TLS1_2_VERSION);
    kt_free(cl);
    kt_tls_policy_set_free(s);

    /* every entry is checked when the set is built */
    s = set_with("inline:{ a.example=may, {b.example = dane-onyl} }", "may", -EINVAL, err, sizeof(err));
    assert_null(s);
    assert_non_null(strstr(err, "entry \"b.example\": unknown TLS security level \"dane-onyl\" (did you mean dane-only?)"));
    s = set_with(NULL, "fingerprint", -EINVAL, err, sizeof(err));
    assert_non_null(strstr(err, "needs smtp_tls_fingerprint_cert_match"));
    /* none everywhere: no TLS context is needed; a dane entry is seen */
    s = set_with(NULL, "none", 0, err, sizeof(err));
    assert_false(kt_tls_policy_set_uses_tls(s));
    kt_tls_policy_set_free(s);
    s = set_with("inline:{ a.example=dane }", "", 0, err, sizeof(err));
    assert_true(kt_tls_policy_set_uses_dane(s));
    kt_tls_policy_set_free(s);
}

/* A TLSA answer for _25._tcp.mx.example. with the records given (usage, selector, type, data length). */
static size_t tlsa_answer(unsigned char *m, const unsigned char (*rr)[4], size_t n)
{
    static const unsigned char qname[] = "\x03_25\x04_tcp\x02mx\x07" "example";
    size_t o = 0;
    const unsigned char hdr[12] = { 0x12, 0x34, 0x81, 0xa0, 0, 1, 0, (unsigned char)n, 0, 0, 0, 0 };
    memcpy(m, hdr, 12);
    o = 12;
    memcpy(m + o, qname, sizeof(qname));      /* includes the root label's 0 */
    o += sizeof(qname);
    m[o++] = 0, m[o++] = 52, m[o++] = 0, m[o++] = 1;
    for (size_t i = 0; i < n; i++) {
        m[o++] = 0xc0, m[o++] = 12;           /* the question's name */
        m[o++] = 0, m[o++] = 52, m[o++] = 0, m[o++] = 1;
        m[o++] = 0, m[o++] = 0, m[o++] = 1, m[o++] = 0x2c;
        size_t dlen = rr[i][3];
        m[o++] = 0, m[o++] = (unsigned char)(3 + dlen);
        m[o++] = rr[i][0], m[o++] = rr[i][1], m[o++] = rr[i][2];
        memset(m + o, 0xab, dlen);
        o += dlen;
    }
    return o;
}

static void test_tlsa_parse(void **state)
{
    (void)state;
    unsigned char m[2048];
    struct kt_dane_host h;
    /* 3 1 1 and 2 0 2 are usable; PKIX-EE (1), a wrong digest length and selector 2 are not */
    static const unsigned char rr[][4] = { { 3, 1, 1, 32 }, { 1, 1, 1, 32 }, { 2, 0, 2, 64 }, { 3, 1, 1, 31 },
                                           { 3, 2, 1, 32 } };
    size_t len = tlsa_answer(m, rr, 5);
    assert_int_equal(kt_dane_parse_tlsa(m, (int)len, &h), 0);
    assert_int_equal(h.state, KT_DANE_USABLE);
    assert_int_equal(h.n, 2);
    assert_int_equal(h.rr[0].usage, 3);
    assert_int_equal(h.rr[0].len, 32);
    assert_int_equal(h.rr[1].usage, 2);
    assert_int_equal(h.rr[1].mtype, 2);
    assert_int_equal(h.rr[1].data[63], 0xab);
    len = tlsa_answer(m, rr + 1, 1);
    assert_int_equal(kt_dane_parse_tlsa(m, (int)len, &h), 0);
    assert_int_equal(h.state, KT_DANE_UNUSABLE);
    len = tlsa_answer(m, rr, 0);
    assert_int_equal(kt_dane_parse_tlsa(m, (int)len, &h), 0);
    assert_int_equal(h.state, KT_DANE_NO_TLSA);
    /* every truncation is refused, none read past the end */
    len = tlsa_answer(m, rr, 2);
    for (size_t cut = 0; cut < len; cut++) {
        unsigned char *copy = test_malloc(cut ? cut : 1);
        memcpy(copy, m, cut);
        int rc = kt_dane_parse_tlsa(copy, (int)cut, &h);
        assert_true(rc == -EINVAL || h.n < 2);
        test_free(copy);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_lookup_keys),
        cmocka_unit_test(test_tlsa_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
