/* 8BITMIME to 7BIT conversion (queue/mime_downgrade.c), exact bytes: a single-part 8bit message becomes
 * quoted-printable with its Content-Transfer-Encoding replaced, a part without one gets it added, long
 * lines take soft breaks at 76 characters, trailing blanks and '=' are encoded, a multipart message is
 * converted only in its 8bit part (base64 and 7bit parts, preamble and epilogue as they were), nested
 * multiparts and message/rfc822 are walked, and a message with nothing to convert is reported as such. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "core/buf.h"
#include "queue/mime_downgrade.h"

static void check(const char *in, int want_rc, const char *want)
{
    struct kt_buf out = { 0 };
    int rc = kt_mime_downgrade(in, strlen(in), &out);
    assert_int_equal(rc, want_rc);
    if (out.len != strlen(want) || (out.len && memcmp(out.data, want, out.len)))
        fail_msg("got:\n%.*s\nwant:\n%s", (int)out.len, out.data ? out.data : "", want);
    kt_buf_release(&out);
}

static void single_part_8bit(void **state)
{
    (void)state;
    check("Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
          "Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9f" "e = 1 \r\n.dot\r\n",
          1,
          "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
          "Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe =3D 1=20\r\n.dot\r\n");
}

static void no_cte_bare_lf(void **state)
{
    (void)state;
    /* no Content-Transfer-Encoding and 8-bit bytes: one is added at the end of the headers */
    check("Subject: caf\xc3\xa9\nFrom: a@b\n\ncaf\xc3\xa9\n", 1,
          "Subject: caf\xc3\xa9\r\nFrom: a@b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n");
}

static void soft_breaks(void **state)
{
    (void)state;
    char in[512], want[512];
    char line[101];
    memset(line, 'a', 100);
    line[100] = 0;
    snprintf(in, sizeof(in), "Content-Transfer-Encoding: 8bit\r\n\r\n%s\xe9\r\n", line);
    /* 75 characters then "=", the rest with the encoded byte */
    snprintf(want, sizeof(want), "Content-Transfer-Encoding: quoted-printable\r\n\r\n%.75s=\r\n%.25s=E9\r\n",
             line, line);
    check(in, 1, want);
    /* an encoded octet is never split: 74 'a' then =E9 does not fit in 75 */
    snprintf(in, sizeof(in), "Content-Transfer-Encoding: 8bit\r\n\r\n%.74s\xe9x\r\n", line);
    snprintf(want, sizeof(want), "Content-Transfer-Encoding: quoted-printable\r\n\r\n%.74s=\r\n=E9x\r\n", line);
    check(in, 1, want);
    /* the last token may end the line at exactly 76 */
    snprintf(in, sizeof(in), "Content-Transfer-Encoding: 8bit\r\n\r\n%.73s\xe9\r\n", line);
    snprintf(want, sizeof(want), "Content-Transfer-Encoding: quoted-printable\r\n\r\n%.73s=E9\r\n", line);
    check(in, 1, want);
}

static void multipart_only_8bit_part(void **state)
{
    (void)state;
    check("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
          "preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
          "\xc3\xa9t\xc3\xa9\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
          "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
          "--b1--\r\nepilogue\r\n",
          1,
          "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
          "preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
          "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
          "=C3=A9t=C3=A9\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
          "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
          "--b1--\r\nepilogue\r\n");
}

static void nested_and_rfc822(void **state)
{
    (void)state;
    check("Content-Type: multipart/mixed; boundary=outer\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
          "--outer\r\nContent-Type: multipart/alternative;\r\n boundary=\"in ner\"\r\n\r\n"
          "--in ner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8BIT\r\n\r\n\xff\r\n--in ner--\r\n"
          "--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
          "Subject: inner\r\nContent-Transfer-Encoding: binary\r\n\r\nx\xfe\r\n"
          "--outer--\r\n",
          1,
          "Content-Type: multipart/mixed; boundary=outer\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
          "--outer\r\nContent-Type: multipart/alternative;\r\n boundary=\"in ner\"\r\n\r\n"
          "--in ner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=FF\r\n"
          "--in ner--\r\n"
          "--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
          "Subject: inner\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx=FE\r\n"
          "--outer--\r\n");
}

static void nothing_to_convert(void **state)
{
    (void)state;
    /* 7-bit only, and 8-bit bytes under a declared 7bit or base64 are left alone */
    check("Subject: x\r\n\r\nhello\r\n", 0, "Subject: x\r\n\r\nhello\r\n");
    check("Content-Transfer-Encoding: base64\r\n\r\nAAEC\n", 0,
          "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n");
    /* headers only, no body */
    check("Subject: x", 0, "Subject: x");
    check("", 0, "");
}

static void unterminated_and_empty_parts(void **state)
{
    (void)state;
    /* no close delimiter: the last part runs to the end; a last line without CRLF keeps none */
    check("Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n\xe9",
          1, "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9");
    /* an empty part between two delimiters */
    check("Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b--\r\n", 0,
          "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b--\r\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(single_part_8bit),
        cmocka_unit_test(no_cte_bare_lf),
        cmocka_unit_test(soft_breaks),
        cmocka_unit_test(multipart_only_8bit_part),
        cmocka_unit_test(nested_and_rfc822),
        cmocka_unit_test(nothing_to_convert),
        cmocka_unit_test(unterminated_and_empty_parts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
