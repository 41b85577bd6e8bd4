/* Unit tests for the SMTP parsers: verbs, line framing, MAIL/RCPT with ESMTP parameters, HELO, BDAT and the
 * DATA state machine (checked against a simple line-by-line reference and under every chunking). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#include "smtpd/smtp_parse.h"

#define S(lit) (lit), (sizeof(lit) - 1)

/* ---- verbs ---- */

static void test_verbs(void **state)
{
    static const struct { const char *name; enum kt_smtp_verb v; } all[] = {
        { "HELO", KT_VERB_HELO }, { "EHLO", KT_VERB_EHLO }, { "MAIL", KT_VERB_MAIL },
        { "RCPT", KT_VERB_RCPT }, { "DATA", KT_VERB_DATA }, { "BDAT", KT_VERB_BDAT },
        { "RSET", KT_VERB_RSET }, { "NOOP", KT_VERB_NOOP }, { "QUIT", KT_VERB_QUIT },
        { "VRFY", KT_VERB_VRFY }, { "EXPN", KT_VERB_EXPN }, { "HELP", KT_VERB_HELP },
        { "STARTTLS", KT_VERB_STARTTLS }, { "AUTH", KT_VERB_AUTH }, { "ETRN", KT_VERB_ETRN },
    };
    struct kt_smtp_command c;
    char line[64];
    size_t i, k;

    (void)state;
    for (i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        size_t n = strlen(all[i].name);
        assert_string_equal(kt_smtp_verb_str(all[i].v), all[i].name);
        kt_smtp_parse_command(all[i].name, n, &c);
        assert_int_equal(c.verb, all[i].v);
        assert_int_equal(c.arg_len, 0);
        assert_string_equal(c.arg, "");
        /* lower case, and mixed case with an argument */
        for (k = 0; k < n; k++)
            line[k] = (char)(all[i].name[k] | 0x20);
        kt_smtp_parse_command(line, n, &c);
        assert_int_equal(c.verb, all[i].v);
        for (k = 0; k < n; k++)
            line[k] = (char)(k % 2 ? all[i].name[k] | 0x20 : all[i].name[k]);
        memcpy(line + n, "  x y  ", 7);
        kt_smtp_parse_command(line, n + 7, &c);
        assert_int_equal(c.verb, all[i].v);
        assert_int_equal(c.arg_len, 3);
        assert_memory_equal(c.arg, "x y", 3);
        assert_ptr_equal(c.arg, line + n + 2);
        /* a longer word is another verb */
        memcpy(line + n, "X", 1);
        kt_smtp_parse_command(line, n + 1, &c);
        assert_int_equal(c.verb, KT_VERB_UNKNOWN);
        /* a shorter one too */
        kt_smtp_parse_command(line, n - 1, &c);
        assert_int_equal(c.verb, KT_VERB_UNKNOWN);
    }
    assert_string_equal(kt_smtp_verb_str(KT_VERB_UNKNOWN), "UNKNOWN");
    assert_string_equal(kt_smtp_verb_str((enum kt_smtp_verb)999), "UNKNOWN");

    kt_smtp_parse_command(S("MAIL FROM:<a@b>"), &c);
    assert_int_equal(c.verb, KT_VERB_MAIL);
    assert_int_equal(c.arg_len, 10);
    assert_memory_equal(c.arg, "FROM:<a@b>", 10);
    kt_smtp_parse_command(S("rcpt\tTO:<a@b>\t "), &c);
    assert_int_equal(c.verb, KT_VERB_RCPT);
    assert_int_equal(c.arg_len, 8);
    kt_smtp_parse_command(S("QUIT   "), &c);
    assert_int_equal(c.verb, KT_VERB_QUIT);
    assert_int_equal(c.arg_len, 0);
    kt_smtp_parse_command(S(""), &c);
    assert_int_equal(c.verb, KT_VERB_UNKNOWN);
    assert_int_equal(c.arg_len, 0);
    kt_smtp_parse_command(S("   "), &c);
    assert_int_equal(c.verb, KT_VERB_UNKNOWN);
    kt_smtp_parse_command(S("MAIL:FROM:<a>"), &c);
    assert_int_equal(c.verb, KT_VERB_UNKNOWN);
    kt_smtp_parse_command(S("GET / HTTP/1.0"), &c);
    assert_int_equal(c.verb, KT_VERB_UNKNOWN);
    assert_int_equal(c.arg_len, 10);
    kt_smtp_parse_command(S("M\xc3\xa4IL x"), &c);
    assert_int_equal(c.verb, KT_VERB_UNKNOWN);
}

/* ---- line framing ---- */

static void test_frame_line(void **state)
{
    size_t ll, used;
    int bare;

    (void)state;
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 4);
    assert_int_equal(used, 6);
    assert_int_equal(bare, 0);

    assert_int_equal(kt_smtp_frame_line(S("NOOP\nQUIT\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 4);
    assert_int_equal(used, 5);
    assert_int_equal(bare, 1);

    /* pipelined: only the first line */
    assert_int_equal(kt_smtp_frame_line(S("RSET\r\nNOOP\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 4);
    assert_int_equal(used, 6);

    /* empty lines */
    assert_int_equal(kt_smtp_frame_line(S("\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 0);
    assert_int_equal(used, 2);
    assert_int_equal(kt_smtp_frame_line(S("\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 0);
    assert_int_equal(used, 1);
    assert_int_equal(bare, 1);

    /* CRLF split across reads */
    assert_int_equal(kt_smtp_frame_line(S(""), 100, &ll, &used, &bare), KT_LINE_MORE);
    assert_int_equal(kt_smtp_frame_line(S("NOOP"), 100, &ll, &used, &bare), KT_LINE_MORE);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r"), 100, &ll, &used, &bare), KT_LINE_MORE);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(bare, 0);

    /* a lone CR stays in the line */
    assert_int_equal(kt_smtp_frame_line(S("NO\rOP\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 5);
    assert_int_equal(used, 7);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r\r\n"), 100, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 5);

    /* limits: max = 4 */
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r\n"), 4, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(ll, 4);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\n"), 4, &ll, &used, &bare), KT_LINE_OK);
    assert_int_equal(kt_smtp_frame_line(S("NOOP"), 4, &ll, &used, &bare), KT_LINE_MORE);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r"), 4, &ll, &used, &bare), KT_LINE_MORE);
    assert_int_equal(kt_smtp_frame_line(S("NOOPX"), 4, &ll, &used, &bare), KT_LINE_TOO_LONG);
    assert_int_equal(kt_smtp_frame_line(S("NOOPX\r\n"), 4, &ll, &used, &bare), KT_LINE_TOO_LONG);
    assert_int_equal(kt_smtp_frame_line(S("NOOPX\n"), 4, &ll, &used, &bare), KT_LINE_TOO_LONG);
    assert_int_equal(kt_smtp_frame_line(S("NOOP\r\r"), 4, &ll, &used, &bare), KT_LINE_TOO_LONG);
    assert_int_equal(kt_smtp_frame_line(S("NOOPXXXXXXXX\r\n"), 4, &ll, &used, &bare), KT_LINE_TOO_LONG);
    assert_int_equal(ll, 0);
    assert_int_equal(used, 0);
}

/* ---- MAIL / RCPT ---- */

static const char *mail(const char *arg, struct kt_smtp_path *path, struct kt_mail_params *p)
{
    return kt_smtp_parse_mail(arg, strlen(arg), path, p);
}

static const char *rcpt(const char *arg, struct kt_smtp_path *path, struct kt_rcpt_params *p)
{
    return kt_smtp_parse_rcpt(arg, strlen(arg), path, p);
}

static void expect_mail(const char *arg, const char *addr)
{
    struct kt_smtp_path path;
    struct kt_mail_params p;
    const char *err = mail(arg, &path, &p);

    if (err)
        fail_msg("MAIL %s: %s", arg, err);
    assert_string_equal(path.addr, addr);
    assert_int_equal(path.addr_len, strlen(addr));
}

static void expect_mail_err(const char *arg, const char *reply)
{
    struct kt_smtp_path path;
    struct kt_mail_params p;
    const char *err = mail(arg, &path, &p);

    if (!err)
        fail_msg("MAIL %s accepted", arg);
    if (strcmp(err, reply) != 0)
        fail_msg("MAIL %s: %s", arg, err);
}

static void expect_rcpt_err(const char *arg, const char *reply)
{
    struct kt_smtp_path path;
    struct kt_rcpt_params p;
    const char *err = rcpt(arg, &path, &p);

    if (!err)
        fail_msg("RCPT %s accepted", arg);
    if (strcmp(err, reply) != 0)
        fail_msg("RCPT %s: %s", arg, err);
}

#define MAIL_SYNTAX "501 5.5.4 Syntax: MAIL FROM:<address>"
#define RCPT_SYNTAX "501 5.5.4 Syntax: RCPT TO:<address>"
#define BAD_SENDER "501 5.1.7 Bad sender address syntax"
#define BAD_RCPT "501 5.1.3 Bad recipient address syntax"

static void test_mail_ok(void **state)
{
    struct kt_smtp_path path;
    struct kt_mail_params p;

    (void)state;
    assert_null(mail("FROM:<user@example.com>", &path, &p));
    assert_string_equal(path.addr, "user@example.com");
    assert_int_equal(path.addr_len, 16);
    assert_int_equal(path.is_null, 0);
    assert_int_equal(path.had_route, 0);
    assert_int_equal(path.quoted_local, 0);
    assert_int_equal(path.utf8, 0);
    assert_int_equal(p.size, -1);
    assert_int_equal(p.body, KT_BODY_7BIT);
    assert_int_equal(p.smtputf8, 0);
    assert_int_equal(p.has_auth, 0);
    assert_int_equal(p.ret, KT_RET_NONE);
    assert_int_equal(p.has_envid, 0);

    expect_mail("from:<user@example.com>", "user@example.com");
    expect_mail("From: <user@example.com>", "user@example.com");
    expect_mail("FROM:   <user@example.com>   ", "user@example.com");
    expect_mail("FROM:user@example.com", "user@example.com");
    expect_mail("FROM: user@example.com SIZE=5", "user@example.com");
    expect_mail("FROM:<postmaster>", "postmaster");
    expect_mail("FROM:<first.last+tag@sub.example-host.org>", "first.last+tag@sub.example-host.org");
    expect_mail("FROM:<a@under_score.example>", "a@under_score.example");

    assert_null(mail("FROM:<>", &path, &p));
    assert_int_equal(path.is_null, 1);
    assert_string_equal(path.addr, "");
    assert_int_equal(path.addr_len, 0);
    assert_null(mail("FROM:<> SIZE=0", &path, &p));
    assert_int_equal(path.is_null, 1);
    assert_int_equal(p.size, 0);

    /* source route */
    assert_null(mail("FROM:<@relay1.example,@relay2.example:user@example.com>", &path, &p));
    assert_string_equal(path.addr, "user@example.com");
    assert_int_equal(path.had_route, 1);
    assert_null(mail("FROM:<@[10.0.0.1]:user@example.com>", &path, &p));
    assert_string_equal(path.addr, "user@example.com");
    assert_int_equal(path.had_route, 1);

    /* quoted local part, kept quoted; the '@' and '>' inside do not count */
    assert_null(mail("FROM:<\"john doe\"@example.com>", &path, &p));
    assert_string_equal(path.addr, "\"john doe\"@example.com");
    assert_int_equal(path.quoted_local, 1);
    expect_mail("FROM:<\"a@b>c\"@example.com> SIZE=1", "\"a@b>c\"@example.com");
    expect_mail("FROM:<\"a\\\"b\"@example.com>", "\"a\\\"b\"@example.com");

    /* address literals */
    expect_mail("FROM:<user@[192.0.2.1]>", "user@[192.0.2.1]");
    expect_mail("FROM:<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]");
    expect_mail("FROM:<user@[ipv6:::1]>", "user@[ipv6:::1]");

    /* UTF-8 */
    assert_null(mail("FROM:<j\xc3\xb6rg@b\xc3\xbc" "cher.example> SMTPUTF8", &path, &p));
    assert_string_equal(path.addr, "j\xc3\xb6rg@b\xc3\xbc" "cher.example");
    assert_int_equal(path.utf8, 1);
    assert_int_equal(p.smtputf8, 1);
    assert_null(mail("FROM:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a>", &path, &p));
    assert_int_equal(path.utf8, 1);
    assert_null(mail("FROM:<\"\xf0\x9f\x93\xa7 x\"@example.com>", &path, &p));
    assert_int_equal(path.utf8, 1);
    assert_int_equal(path.quoted_local, 1);
}

static void test_mail_params(void **state)
{
    struct kt_smtp_path path;
    struct kt_mail_params p;

    (void)state;
    assert_null(mail("FROM:<a@b.c> SIZE=1048576 BODY=8BITMIME", &path, &p));
    assert_int_equal(p.size, 1048576);
    assert_int_equal(p.body, KT_BODY_8BITMIME);
    assert_null(mail("FROM:<a@b.c> size=999999999999999999 body=binarymime", &path, &p));
    assert_int_equal(p.size, 999999999999999999LL);
    assert_int_equal(p.body, KT_BODY_BINARYMIME);
    assert_null(mail("FROM:<a@b.c> BODY=7bit", &path, &p));
    assert_int_equal(p.body, KT_BODY_7BIT);
    assert_null(mail("FROM:<a@b.c>  SmtpUtf8   AUTH=<>  RET=hdrs ENVID=QQ+2Bx", &path, &p));
    assert_int_equal(p.smtputf8, 1);
    assert_int_equal(p.has_auth, 1);
    assert_int_equal(p.ret, KT_RET_HDRS);
    assert_int_equal(p.has_envid, 1);
    assert_int_equal(p.envid_len, 6);
    assert_memory_equal(p.envid, "QQ+2Bx", 6);
    assert_int_equal(p.size, -1);
    assert_int_equal(p.has_body, 0);
    /* the decoded ENVID is printable ASCII; no xtext value may decode to a control character */
    expect_mail_err("FROM:<a@b.c> ENVID=a+0Ab", "501 5.5.4 Bad ENVID parameter syntax");
    expect_mail_err("FROM:<a@b.c> ENVID=a+C3+A4", "501 5.5.4 Bad ENVID parameter syntax");
    expect_mail_err("FROM:<a@b.c> ENVID=a+7F", "501 5.5.4 Bad ENVID parameter syntax");
    expect_mail_err("FROM:<a@b.c> RET=HDRS RET=HDRS", "501 5.5.4 Bad RET parameter syntax");
    expect_mail_err("FROM:<a@b.c> ENVID=a ENVID=a", "501 5.5.4 Bad ENVID parameter syntax");
    assert_null(mail("FROM:<a@b.c> AUTH=user+2Bx@example.com RET=FULL", &path, &p));
    assert_int_equal(p.ret, KT_RET_FULL);

    expect_mail_err("FROM:<a@b.c> SIZE=", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> SIZE", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> SIZE=-1", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> SIZE=12k", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> SIZE=+12", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> SIZE=99999999999999999999999", "501 5.5.4 Bad SIZE parameter value");
    expect_mail_err("FROM:<a@b.c> BODY=8BIT", "501 5.5.4 Bad BODY parameter value");
    expect_mail_err("FROM:<a@b.c> BODY", "501 5.5.4 Bad BODY parameter value");
    expect_mail_err("FROM:<a@b.c> SMTPUTF8=yes", "501 5.5.4 Bad SMTPUTF8 parameter value");
    expect_mail_err("FROM:<a@b.c> RET=ALL", "501 5.5.4 Bad RET parameter syntax");
    expect_mail_err("FROM:<a@b.c> AUTH=a+2", "501 5.5.4 Bad AUTH parameter value");
    expect_mail_err("FROM:<a@b.c> AUTH=a+zz", "501 5.5.4 Bad AUTH parameter value");
    expect_mail_err("FROM:<a@b.c> AUTH=\xc3\xa4", "501 5.5.4 Bad AUTH parameter value");
    expect_mail_err("FROM:<a@b.c> ENVID=a=b", "501 5.5.4 Bad ENVID parameter syntax");
    expect_mail_err("FROM:<a@b.c> ENVID=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "501 5.5.4 Bad ENVID parameter syntax");

    expect_mail_err("FROM:<a@b.c> FOO", "555 5.5.4 Unsupported option: FOO");
    expect_mail_err("FROM:<a@b.c> SIZE=1 X-Thing=1", "555 5.5.4 Unsupported option: X-Thing");
    expect_mail_err("FROM:<a@b.c> NOTIFY=NEVER", "555 5.5.4 Unsupported option: NOTIFY");
    expect_mail_err("FROM:<a@b.c> ORCPT=rfc822;a@b", "555 5.5.4 Unsupported option: ORCPT");
    expect_mail_err("FROM:<a@b.c> SIZE=1 size=2", "501 5.5.4 Duplicate SIZE parameter");
    expect_mail_err("FROM:<a@b.c> SMTPUTF8 SMTPUTF8", "501 5.5.4 Duplicate SMTPUTF8 parameter");
    expect_mail_err("FROM:<a@b.c> BODY=7BIT RET=FULL body=7BIT", "501 5.5.4 Duplicate BODY parameter");
    expect_mail_err("FROM:<a@b.c> =1", MAIL_SYNTAX);
    expect_mail_err("FROM:<a@b.c> -X=1", MAIL_SYNTAX);
    expect_mail_err("FROM:<a@b.c> S:ZE=1", MAIL_SYNTAX);
}

static void test_mail_errors(void **state)
{
    (void)state;
    expect_mail_err("", MAIL_SYNTAX);
    expect_mail_err("FROM", MAIL_SYNTAX);
    expect_mail_err("FROM:", MAIL_SYNTAX);
    expect_mail_err("FROM:   ", MAIL_SYNTAX);
    expect_mail_err("FROM<a@b.c>", MAIL_SYNTAX);
    expect_mail_err("FROM <a@b.c>", MAIL_SYNTAX);
    expect_mail_err("FRM:<a@b.c>", MAIL_SYNTAX);
    expect_mail_err("TO:<a@b.c>", MAIL_SYNTAX);
    expect_mail_err("FROMX:<a@b.c>", MAIL_SYNTAX);
    /* unbalanced brackets */
    expect_mail_err("FROM:<a@b.c", MAIL_SYNTAX);
    expect_mail_err("FROM:<a@b.c SIZE=1", MAIL_SYNTAX);
    expect_mail_err("FROM:<\"a>@b.c", MAIL_SYNTAX);
    expect_mail_err("FROM:<<a@b.c>>", MAIL_SYNTAX);
    expect_mail_err("FROM:<a@b.c>x", MAIL_SYNTAX);
    expect_mail_err("FROM:a@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<a<b@c>", BAD_SENDER);
    /* no brackets, spaces: a display name */
    expect_mail_err("FROM:John Doe <jd@example.com>", MAIL_SYNTAX);
    expect_mail_err("FROM:John <jd@example.com>", MAIL_SYNTAX);
    expect_mail_err("FROM:john doe@example.com", MAIL_SYNTAX);
    expect_mail_err("FROM:John Doe", "555 5.5.4 Unsupported option: Doe");
    /* address syntax */
    expect_mail_err("FROM:< >", BAD_SENDER);
    expect_mail_err("FROM:<a b@c.d>", BAD_SENDER);
    expect_mail_err("FROM:<@c.d>", BAD_SENDER);
    expect_mail_err("FROM:<a@>", BAD_SENDER);
    expect_mail_err("FROM:<a@b..c>", BAD_SENDER);
    expect_mail_err("FROM:<a@.b>", BAD_SENDER);
    expect_mail_err("FROM:<a@b.>", BAD_SENDER);
    expect_mail_err("FROM:<a@-b.c>", BAD_SENDER);
    expect_mail_err("FROM:<a@b-.c>", BAD_SENDER);
    expect_mail_err("FROM:<a@b@c.d>", BAD_SENDER);
    expect_mail_err("FROM:<a@b,c>", BAD_SENDER);
    expect_mail_err("FROM:<a(x)@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<a\x01@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<\"\"@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<\"a\"b@c.d>", BAD_SENDER);
    expect_mail_err("FROM:<\"a\x01\"@c.d>", BAD_SENDER);
    /* routes */
    expect_mail_err("FROM:<@a.b:>", BAD_SENDER);
    expect_mail_err("FROM:<@a.b,c.d:u@e.f>", BAD_SENDER);
    expect_mail_err("FROM:<@a.b,@:u@e.f>", BAD_SENDER);
    expect_mail_err("FROM:<@a..b:u@e.f>", BAD_SENDER);
    expect_mail_err("FROM:<@a.b>", BAD_SENDER);
    /* literals */
    expect_mail_err("FROM:<u@[1.2.3]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[1.2.3.256]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[IPv6:1.2.3.4.5]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[IPv6:fe80::1::2]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[x-tag:abc]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[]>", BAD_SENDER);
    expect_mail_err("FROM:<u@[1.2.3.4>", BAD_SENDER);
    /* malformed UTF-8: stray continuation, overlong, surrogate, truncated, beyond U+10FFFF */
    expect_mail_err("FROM:<\x80@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<\xc0\xaf@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<\xed\xa0\x80@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<a@b.\xc3>", BAD_SENDER);
    expect_mail_err("FROM:<\xf4\x90\x80\x80@b.c>", BAD_SENDER);
    expect_mail_err("FROM:<\xe0\x80\xaf@b.c>", BAD_SENDER);
}

static void test_mail_length(void **state)
{
    char arg[700], want[600];
    struct kt_smtp_path path;
    struct kt_mail_params p;

    (void)state;
    /* 512 bytes fits exactly, 513 does not */
    memset(want, 'a', 500);
    memcpy(want + 500, "@example.com", 13);
    assert_int_equal(strlen(want), 512);
    snprintf(arg, sizeof(arg), "FROM:<%s>", want);
    assert_null(mail(arg, &path, &p));
    assert_int_equal(path.addr_len, 512);
    assert_string_equal(path.addr, want);
    snprintf(arg, sizeof(arg), "FROM:<a%s>", want);
    assert_string_equal(mail(arg, &path, &p), BAD_SENDER);
    /* the route does not count */
    snprintf(arg, sizeof(arg), "FROM:<@relay.example:%s>", want);
    assert_null(mail(arg, &path, &p));
    assert_string_equal(path.addr, want);
    /* over-long domain label */
    memset(want, 'b', 64);
    want[64] = '\0';
    snprintf(arg, sizeof(arg), "FROM:<a@%s.com>", want);
    assert_string_equal(mail(arg, &path, &p), BAD_SENDER);
    want[63] = '\0';
    snprintf(arg, sizeof(arg), "FROM:<a@%s.com>", want);
    assert_null(mail(arg, &path, &p));
}

static void test_rcpt(void **state)
{
    struct kt_smtp_path path;
    struct kt_rcpt_params p;

    (void)state;
    assert_null(rcpt("TO:<user@example.com>", &path, &p));
    assert_string_equal(path.addr, "user@example.com");
    assert_int_equal(p.has_notify, 0);
    assert_int_equal(p.has_orcpt, 0);
    assert_int_equal(p.notify, 0);
    assert_null(rcpt("to: <Postmaster>", &path, &p));
    assert_string_equal(path.addr, "Postmaster");
    assert_null(rcpt("TO:user@example.com", &path, &p));
    assert_string_equal(path.addr, "user@example.com");
    assert_null(rcpt("TO:<@hop.example:\"x@y\"@[IPv6:::1]>", &path, &p));
    assert_string_equal(path.addr, "\"x@y\"@[IPv6:::1]");
    assert_int_equal(path.had_route, 1);
    assert_int_equal(path.quoted_local, 1);

    assert_null(rcpt("TO:<a@b.c> NOTIFY=SUCCESS,failure,Delay ORCPT=rfc822;a+40b.c", &path, &p));
    assert_int_equal(p.has_notify, 1);
    assert_int_equal(p.notify, KT_NOTIFY_SUCCESS | KT_NOTIFY_FAILURE | KT_NOTIFY_DELAY);
    assert_int_equal(p.has_orcpt, 1);
    assert_int_equal(p.orcpt_len, strlen("rfc822;a+40b.c"));
    assert_memory_equal(p.orcpt, "rfc822;a+40b.c", p.orcpt_len);
    expect_rcpt_err("TO:<a@b.c> ORCPT=rfc822;a+0D+0Ab", "501 5.5.4 Error: Bad ORCPT parameter syntax");
    assert_null(rcpt("TO:<a@b.c> notify=never", &path, &p));
    assert_int_equal(p.notify, KT_NOTIFY_NEVER);
    assert_null(rcpt("TO:<\xc3\xa4@b.c> ORCPT=utf-8;\xc3\xa4@b.c", &path, &p));
    assert_int_equal(p.has_orcpt, 1);
    assert_int_equal(path.utf8, 1);

    expect_rcpt_err("TO:<>", BAD_RCPT);
    expect_rcpt_err("TO:<> NOTIFY=NEVER", BAD_RCPT);
    expect_rcpt_err("FROM:<a@b.c>", RCPT_SYNTAX);
    expect_rcpt_err("TO <a@b.c>", RCPT_SYNTAX);
    expect_rcpt_err("TO:", RCPT_SYNTAX);
    expect_rcpt_err("TO:<a@b.c", RCPT_SYNTAX);
    expect_rcpt_err("TO:<a@@b.c>", BAD_RCPT);
    expect_rcpt_err("TO:Joe <a@b.c>", RCPT_SYNTAX);
    expect_rcpt_err("TO:<a@b.c> SIZE=1", "555 5.5.4 Unsupported option: SIZE");
    expect_rcpt_err("TO:<a@b.c> BODY=8BITMIME", "555 5.5.4 Unsupported option: BODY");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=SUCCESS,", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=SOMETIMES", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Error: Bad NOTIFY parameter syntax");
    expect_rcpt_err("TO:<a@b.c> ORCPT=a@b.c", "501 5.5.4 Error: Bad ORCPT parameter syntax");
    expect_rcpt_err("TO:<a@b.c> ORCPT=;a@b.c", "501 5.5.4 Error: Bad ORCPT parameter syntax");
    expect_rcpt_err("TO:<a@b.c> ORCPT=rfc822;", "501 5.5.4 Error: Bad ORCPT parameter syntax");
    expect_rcpt_err("TO:<a@b.c> ORCPT=rfc822;\xc3\xa4@b.c", "501 5.5.4 Error: Bad ORCPT parameter syntax");
    expect_rcpt_err("TO:<a@b.c> ORCPT=rfc822;a ORCPT=rfc822;b", "501 5.5.4 Error: Bad ORCPT parameter syntax");
}

static void test_unsupported_name(void **state)
{
    char arg[200];
    struct kt_smtp_path path;
    struct kt_mail_params p;
    const char *err;

    (void)state;
    /* long names are cut, the reply stays one bounded line */
    memset(arg, 0, sizeof(arg));
    strcpy(arg, "FROM:<a@b.c> ");
    memset(arg + strlen(arg), 'K', 120);
    err = mail(arg, &path, &p);
    assert_non_null(err);
    assert_int_equal(strncmp(err, "555 5.5.4 Unsupported option: KKKK", 34), 0);
    assert_true(strlen(err) < 100);
    assert_null(strchr(err, '\r'));
}

/* ---- split / HELO / BDAT ---- */

static void test_split_address(void **state)
{
    size_t at;

    (void)state;
    assert_int_equal(kt_smtp_split_address(S("user@example.com"), &at), 0);
    assert_int_equal(at, 4);
    assert_int_equal(kt_smtp_split_address(S("postmaster"), &at), 0);
    assert_int_equal(at, 10);
    assert_int_equal(kt_smtp_split_address(S("\"a@b\"@c.d"), &at), 0);
    assert_int_equal(at, 5);
    assert_int_equal(kt_smtp_split_address(S("\"a@b\""), &at), 0);
    assert_int_equal(at, 5);
    assert_int_equal(kt_smtp_split_address(S("\"a\\\"@b\"@c"), &at), 0);
    assert_int_equal(at, 7);
    assert_int_equal(kt_smtp_split_address(S("a@b@c"), &at), 0);
    assert_int_equal(at, 3);
    assert_int_equal(kt_smtp_split_address(S(""), &at), 0);
    assert_int_equal(at, 0);
    assert_int_equal(kt_smtp_split_address(S("\"a@b"), &at), -EINVAL);
    assert_int_equal(kt_smtp_split_address(S("\"a@b\\\""), &at), -EINVAL);
}

static void test_helo(void **state)
{
    (void)state;
    assert_true(kt_smtp_valid_helo(S("mail.example.com")));
    assert_true(kt_smtp_valid_helo(S("localhost")));
    assert_true(kt_smtp_valid_helo(S("MX-1.Example.COM")));
    assert_true(kt_smtp_valid_helo(S("host_name.example")));
    assert_true(kt_smtp_valid_helo(S("[192.0.2.7]")));
    assert_true(kt_smtp_valid_helo(S("[IPv6:2001:db8::7]")));
    assert_true(kt_smtp_valid_helo(S("192.0.2.7")));
    assert_false(kt_smtp_valid_helo(S("")));
    assert_false(kt_smtp_valid_helo(S("two words")));
    assert_false(kt_smtp_valid_helo(S("a..b")));
    assert_false(kt_smtp_valid_helo(S(".a")));
    assert_false(kt_smtp_valid_helo(S("-a.b")));
    assert_false(kt_smtp_valid_helo(S("a-.b")));
    assert_false(kt_smtp_valid_helo(S("a/b")));
    assert_false(kt_smtp_valid_helo(S("[192.0.2.7")));
    assert_false(kt_smtp_valid_helo(S("[300.0.2.7]")));
    assert_false(kt_smtp_valid_helo(S("[IPv6:xyz]")));
    assert_false(kt_smtp_valid_helo(S("b\xc3\xbc" "cher.example")));
    assert_false(kt_smtp_valid_helo(S("a\0b")));
}

static void test_bdat(void **state)
{
    unsigned long long size = 7;
    int last = 7;
    const char *syntax = "501 5.5.4 Syntax: BDAT count [LAST]";

    (void)state;
    assert_null(kt_smtp_parse_bdat(S("0"), &size, &last));
    assert_int_equal(size, 0);
    assert_int_equal(last, 0);
    assert_null(kt_smtp_parse_bdat(S("1024 LAST"), &size, &last));
    assert_int_equal(size, 1024);
    assert_int_equal(last, 1);
    assert_null(kt_smtp_parse_bdat(S("86  last  "), &size, &last));
    assert_int_equal(size, 86);
    assert_int_equal(last, 1);
    assert_null(kt_smtp_parse_bdat(S("18446744073709551615"), &size, &last));
    assert_true(size == 18446744073709551615ULL);
    assert_string_equal(kt_smtp_parse_bdat(S("18446744073709551616"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S(""), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("LAST"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("-1"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("12x"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("12 LASTX"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("12 LAST X"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S("12LAST"), &size, &last), syntax);
    assert_string_equal(kt_smtp_parse_bdat(S(" 12"), &size, &last), syntax);
}

/* ---- message body: DATA and chunked (BDAT) ---- */

struct data_result {
    char out[1 << 19];
    size_t out_len;
    size_t consumed;
    int done, bare_lf, bare_cr;
};

static void out_crlf(struct data_result *r)
{
    r->out[r->out_len++] = '\r';
    r->out[r->out_len++] = '\n';
}

/* Reference: byte at a time, with the rule written out literally. bol: 0 inside a line, 1 after a raw CRLF
 * (or at the start), 2 after a bare line end written out as CRLF. A trailing CR (or "." CR at a line start)
 * is undecided: consumed, nothing written yet. */
static void data_reference(const char *in, size_t len, int chunked, struct data_result *r)
{
    size_t i = 0;
    int bol = chunked ? 0 : 1;

    memset(r, 0, sizeof(*r));
    while (i < len) {
        if (bol && in[i] == '.') {
            int raw = bol == 1;
            i++;                                    /* stuffing, or the end marker's dot */
            bol = 0;
            if (raw && i < len && in[i] == '\r') {
                if (i + 1 == len) {
                    i++;
                    break;
                }
                if (in[i + 1] == '\n') {
                    r->done = 1;
                    i += 2;
                    break;
                }
                r->bare_cr = 1;
                out_crlf(r);
                i++;
                bol = 2;
            }
            continue;
        }
        bol = 0;
        if (in[i] == '\r') {
            if (i + 1 == len) {
                i++;
                break;
            }
            if (in[i + 1] == '\n') {
                out_crlf(r);
                i += 2;
                bol = chunked ? 0 : 1;
                continue;
            }
            r->bare_cr = 1;
            out_crlf(r);
            i++;
            bol = chunked ? 0 : 2;
            continue;
        }
        if (in[i] == '\n') {
            r->bare_lf = 1;
            out_crlf(r);
            i++;
            bol = chunked ? 0 : 2;
            continue;
        }
        r->out[r->out_len++] = in[i++];
    }
    r->consumed = i;
}

/* Every LF in out is preceded by CR and every CR followed by LF. */
static void assert_canonical(const char *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (out[i] == '\r')
            assert_true(i + 1 < n && out[i + 1] == '\n');
        if (out[i] == '\n')
            assert_true(i > 0 && out[i - 1] == '\r');
    }
}

/* Input split at `split` (two calls) with output room `cap` per call (repeated while input is left). */
static void data_run(const char *in, size_t len, int chunked, size_t split, size_t cap, struct data_result *r)
{
    static char tmp[sizeof(((struct data_result *)0)->out)];
    struct kt_data_parser p;
    size_t part[2] = { split, len - split }, off = 0;

    memset(r, 0, sizeof(*r));
    if (chunked)
        kt_data_parser_init_chunked(&p);
    else
        kt_data_parser_init(&p);
    for (int k = 0; k < 2; k++) {
        size_t left = part[k];
        while (left > 0 && !p.done) {
            size_t n = 0, used = kt_data_parse(&p, in + off, left, tmp, cap, &n);
            assert_true(n <= cap);
            assert_true(used > 0 || n > 0);
            memcpy(r->out + r->out_len, tmp, n);
            r->out_len += n;
            off += used;
            left -= used;
        }
        if (p.done)
            break;
    }
    if (p.done) {
        size_t n = 1;
        assert_int_equal(kt_data_parse(&p, in + off, len - off, tmp, cap, &n), 0);
        assert_int_equal(n, 0);
    }
    r->consumed = off;
    r->done = p.done;
    r->bare_lf = p.bare_lf;
    r->bare_cr = p.bare_cr;
    assert_int_equal(p.out_bytes, r->out_len);
}

static void assert_same_result(const struct data_result *a, const struct data_result *b)
{
    assert_int_equal(a->consumed, b->consumed);
    assert_int_equal(a->out_len, b->out_len);
    assert_memory_equal(a->out, b->out, a->out_len);
    assert_int_equal(a->done, b->done);
    assert_int_equal(a->bare_lf, b->bare_lf);
    assert_int_equal(a->bare_cr, b->bare_cr);
}

/* One shot, every split point, and tiny output room must all equal the reference. */
static void check_all_splits(const char *in, size_t len, int chunked)
{
    static struct data_result ref, r;

    data_reference(in, len, chunked, &ref);
    assert_canonical(ref.out, ref.out_len);
    for (size_t k = 0; k <= len; k++) {
        data_run(in, len, chunked, k, 2 * len + 2, &r);
        assert_same_result(&ref, &r);
    }
    data_run(in, len, chunked, 0, 2, &r);
    assert_same_result(&ref, &r);
    data_run(in, len, chunked, len / 2, 3, &r);
    assert_same_result(&ref, &r);
}

static void expect_body(const char *in, size_t len, int chunked, const char *want, size_t want_len,
                        size_t consumed, int done, int bare_lf, int bare_cr)
{
    static struct data_result r;

    data_run(in, len, chunked, len, 2 * len + 2, &r);
    assert_int_equal(r.out_len, want_len);
    assert_memory_equal(r.out, want, want_len);
    assert_int_equal(r.consumed, consumed);
    assert_int_equal(r.done, done);
    assert_int_equal(r.bare_lf, bare_lf);
    assert_int_equal(r.bare_cr, bare_cr);
    check_all_splits(in, len, chunked);
}

#define EXPECT_DATA(in, want, consumed, done, lf, cr) \
    expect_body(S(in), 0, S(want), (consumed), (done), (lf), (cr))
#define EXPECT_CHUNKED(in, want, lf, cr) \
    expect_body(S(in), 1, S(want), sizeof(in) - 1, 0, (lf), (cr))

static void test_data_basic(void **state)
{
    (void)state;
    EXPECT_DATA("Subject: x\r\n\r\nbody\r\n.\r\n", "Subject: x\r\n\r\nbody\r\n", 23, 1, 0, 0);
    /* empty message */
    EXPECT_DATA(".\r\n", "", 3, 1, 0, 0);
    EXPECT_DATA(".\r\nQUIT\r\n", "", 3, 1, 0, 0);
    EXPECT_DATA("\r\n.\r\n", "\r\n", 5, 1, 0, 0);
    /* dot-stuffing */
    EXPECT_DATA("..\r\n.\r\n", ".\r\n", 7, 1, 0, 0);
    EXPECT_DATA("a\r\n..\r\n...\r\n.x\r\n..y\r\n.\r\n", "a\r\n.\r\n..\r\nx\r\n.y\r\n", 24, 1, 0, 0);
    EXPECT_DATA("a.\r\nb..\r\n. \r\n.\r\n", "a.\r\nb..\r\n \r\n", 16, 1, 0, 0);
    /* the end, with pipelined commands after it */
    EXPECT_DATA("x\r\n.\r\nMAIL FROM:<a@b>\r\n", "x\r\n", 6, 1, 0, 0);
    EXPECT_DATA("x\r\n.\r\n.\r\n", "x\r\n", 6, 1, 0, 0);
    /* not ended yet: a trailing CR is held until the next byte */
    EXPECT_DATA("x\r\n.", "x\r\n", 4, 0, 0, 0);
    EXPECT_DATA("x\r\n.\r", "x\r\n", 5, 0, 0, 0);
    EXPECT_DATA("x\r\n", "x\r\n", 3, 0, 0, 0);
    EXPECT_DATA("x\r", "x", 2, 0, 0, 0);
    EXPECT_DATA("", "", 0, 0, 0, 0);
    /* 8-bit and NUL bytes are just content */
    EXPECT_DATA("\xff\x00\x80\r\n.\r\n", "\xff\x00\x80\r\n", 8, 1, 0, 0);
}

/* Every end-of-data look-alike (SMTP smuggling): never the end, stored as canonical lines, so that a next
 * hop cannot see an end of data either. */
static void test_data_smuggling(void **state)
{
    (void)state;
    EXPECT_DATA("a\n.\nb\r\n.\r\n", "a\r\n\r\nb\r\n", 10, 1, 1, 0);         /* <LF>.<LF> */
    EXPECT_DATA("a\r\n.\nb\r\n.\r\n", "a\r\n\r\nb\r\n", 11, 1, 1, 0);       /* <CR><LF>.<LF> */
    EXPECT_DATA("a\n.\r\nb\r\n.\r\n", "a\r\n\r\nb\r\n", 11, 1, 1, 0);       /* <LF>.<CR><LF> */
    EXPECT_DATA("a\r.\r\nb\r\n.\r\n", "a\r\n\r\nb\r\n", 11, 1, 0, 1);       /* <CR>.<CR><LF> */
    EXPECT_DATA("a\r.\rb\r\n.\r\n", "a\r\n\r\nb\r\n", 10, 1, 0, 1);         /* <CR>.<CR> */
    EXPECT_DATA("a\r.\nb\r\n.\r\n", "a\r\n\r\nb\r\n", 10, 1, 1, 1);         /* <CR>.<LF> */
    EXPECT_DATA("a\r\n.\rb\r\n.\r\n", "a\r\n\r\nb\r\n", 11, 1, 0, 1);       /* <CR><LF>.<CR> */
    EXPECT_DATA("a\rb\r\n.\r\n", "a\r\nb\r\n", 8, 1, 0, 1);
    EXPECT_DATA("a\r\r\n.\r\n", "a\r\n\r\n", 7, 1, 0, 1);
    EXPECT_DATA("\n.\n", "\r\n\r\n", 3, 0, 1, 0);
    EXPECT_DATA("\n.\r\n", "\r\n\r\n", 4, 0, 1, 0);
    EXPECT_DATA("\r\n.\n", "\r\n\r\n", 4, 0, 1, 0);
    EXPECT_DATA(".\r.\r\n", "\r\n\r\n", 5, 0, 0, 1);
    /* a line after a bare line end is unstuffed like any other, but "." there never ends the data */
    EXPECT_DATA("a\n..\r\n.\r\n", "a\r\n.\r\n", 9, 1, 1, 0);
    EXPECT_DATA("a\n.\r\n.\r\n", "a\r\n\r\n", 8, 1, 1, 0);
}

/* Long runs of plain lines are scanned 16 bytes at a time: every rule must hold wherever its bytes fall
 * relative to those blocks, so the same lines are tried with 0 to 40 bytes in front of each line end. */
static void test_data_long_lines(void **state)
{
    (void)state;
    static char in[512], want[512];
    for (size_t pad = 0; pad <= 40; pad++) {
        size_t n = 0, w = 0;
#define PUT(buf, len, str) (memcpy((buf) + (len), (str), sizeof(str) - 1), (len) += sizeof(str) - 1)
#define PAD(buf, len, c) (memset((buf) + (len), (c), pad), (len) += pad)
        /* DATA: stuffed dot, bare LF, bare CR, a dot after a bare LF, then the end */
        PAD(in, n, 'a'); PUT(in, n, "\r\n..x"); PAD(in, n, 'b'); PUT(in, n, "\n"); PAD(in, n, 'c');
        PUT(in, n, "\rd"); PAD(in, n, 'e'); PUT(in, n, "\n.\r\n"); PAD(in, n, 'f'); PUT(in, n, "\r\n.\r\nQUIT\r\n");
        PAD(want, w, 'a'); PUT(want, w, "\r\n.x"); PAD(want, w, 'b'); PUT(want, w, "\r\n"); PAD(want, w, 'c');
        PUT(want, w, "\r\nd"); PAD(want, w, 'e'); PUT(want, w, "\r\n\r\n"); PAD(want, w, 'f'); PUT(want, w, "\r\n");
        expect_body(in, n, 0, want, w, n - 6, 1, 1, 1);
        /* BDAT: dots stay, the same line-ending rule */
        n = w = 0;
        PAD(in, n, 'a'); PUT(in, n, "\r\n..x"); PAD(in, n, 'b'); PUT(in, n, "\r\n.\r\n"); PAD(in, n, 'c'); PUT(in, n, "\n");
        PAD(want, w, 'a'); PUT(want, w, "\r\n..x"); PAD(want, w, 'b'); PUT(want, w, "\r\n.\r\n"); PAD(want, w, 'c');
        PUT(want, w, "\r\n");
        expect_body(in, n, 1, want, w, n, 0, 1, 0);
#undef PUT
#undef PAD
    }
}

static void test_chunked(void **state)
{
    (void)state;
    /* no dots removed, no end marker, the same line-ending rule */
    EXPECT_CHUNKED("a\r\n.\r\nb\r\n", "a\r\n.\r\nb\r\n", 0, 0);
    EXPECT_CHUNKED("a\r.\r\n", "a\r\n.\r\n", 0, 1);
    EXPECT_CHUNKED("a\r.\r", "a\r\n.", 0, 1);                 /* the last CR waits for kt_data_parse_end */
    EXPECT_CHUNKED("a\r.\nb", "a\r\n.\r\nb", 1, 1);
    EXPECT_CHUNKED("a\n.\n", "a\r\n.\r\n", 1, 0);
    EXPECT_CHUNKED("a\n.\r\n", "a\r\n.\r\n", 1, 0);
    EXPECT_CHUNKED("..\r\n", "..\r\n", 0, 0);

    struct kt_data_parser p;
    char out[16], end[2];
    size_t n;

    kt_data_parser_init_chunked(&p);
    kt_data_parse(&p, "x\r", 2, out, sizeof(out), &n);
    assert_int_equal(kt_data_parse_end(&p, end), 2);
    assert_memory_equal(end, "\r\n", 2);
    assert_true(p.bare_cr);
    assert_int_equal(p.out_bytes, 3);

    kt_data_parser_init_chunked(&p);
    kt_data_parse(&p, "x", 1, out, sizeof(out), &n);
    assert_int_equal(kt_data_parse_end(&p, end), 0);     /* an unterminated last line stays so */
    assert_false(p.bare_cr);

    kt_data_parser_init_chunked(&p);
    kt_data_parse(&p, "x\r\n", 3, out, sizeof(out), &n);
    assert_int_equal(kt_data_parse_end(&p, end), 0);
    kt_data_parser_init_chunked(&p);
    assert_int_equal(kt_data_parse_end(&p, end), 0);    /* empty stays empty */
}

static void test_arg_ctl(void **state)
{
    struct kt_smtp_path path;
    struct kt_rcpt_params rp;

    (void)state;
    assert_false(kt_smtp_arg_has_ctl(S("TO:<a@b> NOTIFY=NEVER")));
    assert_false(kt_smtp_arg_has_ctl(S("TO:<a@b>\tNOTIFY=NEVER")));
    assert_false(kt_smtp_arg_has_ctl(S("TO:<\xc3\xa9@b>")));
    assert_true(kt_smtp_arg_has_ctl(S("TO:<a@[192.0.2.1\0x]>")));
    assert_true(kt_smtp_arg_has_ctl(S("TO:<a@b>\r")));
    assert_true(kt_smtp_arg_has_ctl(S("TO:<a\x1b[2J@b>")));
    assert_true(kt_smtp_arg_has_ctl(S("TO:<a\x7f@b>")));
    /* and the literal parser itself never lets a NUL through */
    assert_non_null(kt_smtp_parse_rcpt(S("TO:<x@[192.0.2.1\0...]>"), &path, &rp));
    assert_null(kt_smtp_parse_rcpt(S("TO:<x@[192.0.2.1]>"), &path, &rp));
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* A body of random lines, many starting with dots, with bare CR and LF when asked, ending in CRLF.CRLF
 * and a pipelined command, fed in random chunks with random output room; must equal the reference. */
static void random_body(int with_junk)
{
    static const char alphabet[] = "abc .\t\x80\xff";
    static struct data_result ref, got;
    static char in[1 << 18];
    static char tmp[1024];
    struct kt_data_parser p;
    size_t len = 0, i = 0;

    while (len < sizeof(in) - 1000) {
        size_t n = 2 + rng() % 120;     /* two bytes or more: never a lone "." line */
        if (rng() % 3 == 0)
            in[len++] = '.';
        if (rng() % 7 == 0)
            in[len++] = '.';
        while (n--) {
            unsigned r = rng() % (with_junk ? 40 : 36);
            /* bare CR and LF, but never a CRLF pair that could start a line with "." */
            if (r >= 36)
                in[len++] = r < 38 ? '\r' : '\n';
            in[len++] = alphabet[r % 9] == '\r' ? 'x' : alphabet[r % 9];
        }
        in[len++] = '\r';
        in[len++] = '\n';
    }
    memcpy(in + len, ".\r\nQUIT\r\n", 9);
    len += 9;

    data_reference(in, len, 0, &ref);
    assert_int_equal(ref.consumed, len - 6);
    assert_true(ref.done);
    assert_int_equal(ref.bare_lf, with_junk);
    assert_int_equal(ref.bare_cr, with_junk);
    assert_canonical(ref.out, ref.out_len);

    memset(&got, 0, sizeof(got));
    kt_data_parser_init(&p);
    while (i < len && !p.done) {
        size_t chunk = 1 + rng() % 300, cap = 2 + rng() % 700, n, used;
        if (chunk > len - i)
            chunk = len - i;
        used = kt_data_parse(&p, in + i, chunk, tmp, cap, &n);
        assert_true(n <= cap);
        assert_true(used == chunk || p.done || n + 2 > cap);
        memcpy(got.out + got.out_len, tmp, n);
        got.out_len += n;
        i += used;
    }
    got.consumed = i;
    got.done = p.done;
    got.bare_lf = p.bare_lf;
    got.bare_cr = p.bare_cr;
    assert_same_result(&ref, &got);
    assert_int_equal(p.out_bytes, got.out_len);
}

static void test_data_random(void **state)
{
    (void)state;
    random_body(0);
    random_body(1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verbs),
        cmocka_unit_test(test_frame_line),
        cmocka_unit_test(test_mail_ok),
        cmocka_unit_test(test_mail_params),
        cmocka_unit_test(test_mail_errors),
        cmocka_unit_test(test_mail_length),
        cmocka_unit_test(test_rcpt),
        cmocka_unit_test(test_unsupported_name),
        cmocka_unit_test(test_split_address),
        cmocka_unit_test(test_helo),
        cmocka_unit_test(test_bdat),
        cmocka_unit_test(test_data_basic),
        cmocka_unit_test(test_data_smuggling),
        cmocka_unit_test(test_data_long_lines),
        cmocka_unit_test(test_chunked),
        cmocka_unit_test(test_arg_ctl),
        cmocka_unit_test(test_data_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
