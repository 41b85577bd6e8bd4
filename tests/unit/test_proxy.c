/* PROXY protocol v1/v2 header parsing and exact-length reading: every
 * accepted form, every refusal, and that the reader leaves the bytes after
 * the header in the socket. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "smtpd/proxy.h"

static const unsigned char sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

static int parse(const void *buf, size_t len, struct kt_proxy_header *h, const char **why)
{
    memset(h, 0, sizeof(*h));
    *why = NULL;
    return kt_proxy_parse(buf, len, h, why);
}

static void test_v1(void **state)
{
    struct kt_proxy_header h;
    const char *why;
    const char l4[] = "PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
    assert_int_equal(parse(l4, strlen(l4), &h, &why), 44);
    assert_string_equal(h.addr, "192.0.2.7");
    assert_int_equal(h.port, 40000);
    assert_int_equal(h.local, 0);
    const char l6[] = "PROXY TCP6 2001:db8:0::19 2001:db8::1 1 25\r\n";
    assert_int_equal(parse(l6, strlen(l6), &h, &why), (int)strlen(l6));
    assert_string_equal(h.addr, "2001:db8::19");
    /* IPv4-mapped IPv6 (an HAProxy listening on :: with v4v6) is the IPv4 client, as in v2 */
    const char m6[] = "PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.1 1 25\r\n";
    assert_int_equal(parse(m6, strlen(m6), &h, &why), (int)strlen(m6));
    assert_string_equal(h.addr, "192.0.2.7");
    const char unk[] = "PROXY UNKNOWN\r\n";
    assert_int_equal(parse(unk, strlen(unk), &h, &why), (int)strlen(unk));
    assert_int_equal(h.local, 1);
    /* incomplete: more bytes needed */
    for (size_t n = 0; n < 44; n++)
        assert_int_equal(parse(l4, n, &h, &why), 0);
}

static void test_v1_refused(void **state)
{
    static const char *bad[] = {
        "PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",      /* a field missing */
        "PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n",     /* family mismatch */
        "PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",   /* port out of range */
        "PROXY TCP4 192.0.2.7 198.51.100.1 01 25\r\n",      /* leading zero */
        "PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n",
        "proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n",
        "EHLO client.example\r\n",
        "\x16\x03\x01\x02\x00",                             /* a TLS ClientHello */
    };
    struct kt_proxy_header h;
    const char *why;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(parse(bad[i], strlen(bad[i]), &h, &why), -EINVAL);
        assert_non_null(why);
    }
    char longline[200];
    memset(longline, 'x', sizeof(longline));
    memcpy(longline, "PROXY TCP4 ", 11);
    assert_int_equal(parse(longline, sizeof(longline), &h, &why), -EINVAL);
}

static size_t v2(unsigned char *b, unsigned char cmd, unsigned char fam, const unsigned char *addr, size_t alen)
{
    memcpy(b, sig, 12);
    b[12] = cmd;
    b[13] = fam;
    b[14] = (unsigned char)(alen >> 8);
    b[15] = (unsigned char)alen;
    memcpy(b + 16, addr, alen);
    return 16 + alen;
}

static void test_v2(void **state)
{
    struct kt_proxy_header h;
    const char *why;
    unsigned char b[2000];
    const unsigned char a4[12 + 7] = { 192, 0, 2, 9, 198, 51, 100, 1, 0x9c, 0x40, 0, 25,
                                       /* a TLV (PP2_TYPE_NOOP) after the addresses is skipped */
                                       0x04, 0x00, 0x04, 1, 2, 3, 4 };
    size_t n = v2(b, 0x21, 0x11, a4, sizeof(a4));
    assert_int_equal(parse(b, n, &h, &why), (int)n);
    assert_string_equal(h.addr, "192.0.2.9");
    assert_int_equal(h.port, 40000);
    for (size_t k = 0; k < n; k++)
        assert_int_equal(parse(b, k, &h, &why), 0);
    unsigned char a6[36] = { 0x20, 0x01, 0x0d, 0xb8 };
    a6[15] = 0x19;
    a6[33] = 25;
    n = v2(b, 0x21, 0x21, a6, sizeof(a6));
    assert_int_equal(parse(b, n, &h, &why), (int)n);
    assert_string_equal(h.addr, "2001:db8::19");
    assert_int_equal(h.port, 25);
    /* LOCAL (health check): no client named */
    n = v2(b, 0x20, 0x00, a4, 0);
    assert_int_equal(parse(b, n, &h, &why), 16);
    assert_int_equal(h.local, 1);
}

static void test_v2_refused(void **state)
{
    struct kt_proxy_header h;
    const char *why;
    unsigned char b[2000];
    const unsigned char a4[12] = { 192, 0, 2, 9 };
    size_t n = v2(b, 0x11, 0x11, a4, sizeof(a4));            /* version 1 in a v2 header */
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    n = v2(b, 0x22, 0x11, a4, sizeof(a4));                   /* command 2 */
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    n = v2(b, 0x21, 0x12, a4, sizeof(a4));                   /* UDP */
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    n = v2(b, 0x21, 0x31, a4, sizeof(a4));                   /* AF_UNIX */
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    n = v2(b, 0x21, 0x11, a4, 8);                            /* address block too short */
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    n = v2(b, 0x21, 0x21, a4, 12);
    assert_int_equal(parse(b, n, &h, &why), -EINVAL);
    b[14] = 0x10;                                            /* 4 KB of TLVs */
    b[15] = 0;
    assert_int_equal(parse(b, 16, &h, &why), -EINVAL);
}

/* The reader takes the header out of the socket and nothing after it, even
 * when the header arrives a byte at a time. */
static void test_read_exact(void **state)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    const char msg[] = "PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n\x16\x03\x01";
    unsigned char buf[KT_PROXY_MAX_HEADER];
    size_t have = 0;
    struct kt_proxy_header h;
    const char *why = NULL;
    int rc = 0;
    assert_int_equal(kt_proxy_read(sv[0], buf, &have, &h, &why), 0);   /* nothing yet */
    for (size_t i = 0; i < 10; i++) {
        assert_int_equal(write(sv[1], msg + i, 1), 1);
        assert_int_equal(kt_proxy_read(sv[0], buf, &have, &h, &why), 0);
    }
    assert_int_equal(write(sv[1], msg + 10, sizeof(msg) - 1 - 10), (ssize_t)(sizeof(msg) - 1 - 10));
    rc = kt_proxy_read(sv[0], buf, &have, &h, &why);
    assert_int_equal(rc, 44);
    assert_string_equal(h.addr, "192.0.2.7");
    char rest[8];
    assert_int_equal(read(sv[0], rest, sizeof(rest)), 3);
    assert_memory_equal(rest, "\x16\x03\x01", 3);
    close(sv[1]);
    have = 0;
    assert_int_equal(kt_proxy_read(sv[0], buf, &have, &h, &why), -EIO);
    close(sv[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v1),
        cmocka_unit_test(test_v1_refused),
        cmocka_unit_test(test_v2),
        cmocka_unit_test(test_v2_refused),
        cmocka_unit_test(test_read_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
