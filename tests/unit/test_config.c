/* Unit tests for the configuration module: main.cf / master.cf syntax,
 * Postfix $name expansion, typed validation and diagnostics. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netdb.h>
#include <sys/stat.h>
#include <cmocka.h>

#include "kt_build.h"
#include "conf/config.h"

/* ---- capturing what the loader logs on stderr ---- */

static char logbuf[1 << 16];

struct loaded {
    int rc;
    struct kt_config *cfg;
    const char *log;
};

static void capture_begin(FILE **tmp, int *saved)
{
    fflush(stderr);
    *tmp = tmpfile();
    assert_non_null(*tmp);
    *saved = dup(STDERR_FILENO);
    assert_true(*saved >= 0);
    assert_true(dup2(fileno(*tmp), STDERR_FILENO) >= 0);
}

static const char *capture_end(FILE *tmp, int saved)
{
    fflush(stderr);
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    rewind(tmp);
    size_t n = fread(logbuf, 1, sizeof(logbuf) - 1, tmp);
    logbuf[n] = '\0';
    fclose(tmp);
    return logbuf;
}

static struct loaded load(const char *main_cf, const char *master_cf)
{
    FILE *tmp;
    int saved;
    struct loaded l;
    capture_begin(&tmp, &saved);
    l.rc = kt_config_load_text(main_cf, master_cf, NULL, &l.cfg);
    l.log = capture_end(tmp, saved);
    return l;
}

static void expect_log(const char *log, const char *needle)
{
    if (!strstr(log, needle)) {
        print_message("expected in log: %s\nlog was:\n%s", needle, log ? log : "");
        fail();
    }
}

static void expect_no_log(const char *log, const char *needle)
{
    if (strstr(log, needle)) {
        print_message("unexpected in log: %s\nlog was:\n%s", needle, log ? log : "");
        fail();
    }
}

static struct kt_config *load_ok(const char *main_cf, const char *master_cf)
{
    struct loaded l = load(main_cf, master_cf);
    if (l.rc != 0)
        print_message("load failed (%d); log:\n%s", l.rc, l.log);
    assert_int_equal(l.rc, 0);
    assert_non_null(l.cfg);
    return l.cfg;
}

static const char *load_fails(const char *main_cf, const char *master_cf)
{
    struct loaded l = load(main_cf, master_cf);
    if (l.rc != -EINVAL)
        print_message("load did not fail (%d); log:\n%s", l.rc, l.log);
    assert_int_equal(l.rc, -EINVAL);
    assert_null(l.cfg);
    return l.log;
}

#define GET(cfg, name) kt_config_get(cfg, NULL, name)

/* ---- parameter table ---- */

static void test_table_sorted_and_typed(void **state)
{
    (void)state;
    size_t n = kt_param_count(), impl = 0, ignored = 0;
    assert_true(n > 150);
    for (size_t i = 0; i < n; i++) {
        const struct kt_param_def *p = kt_param_at(i);
        if (i > 0 && strcmp(kt_param_at(i - 1)->name, p->name) >= 0) {
            print_message("table out of order at %s\n", p->name);
            fail();
        }
        assert_ptr_equal(kt_param_find(p->name), p);
        assert_true(kt_param_is_known(p->name));
        if (p->type == KT_PARAM_TIME)
            assert_non_null(strchr("smhdw", p->unit));
        p->implemented ? impl++ : ignored++;
    }
    assert_null(kt_param_at(n));
    assert_true(ignored >= 60 && ignored <= 140);
    assert_true(impl >= 100);
    assert_false(kt_param_is_known("no_such_parameter"));
    assert_false(kt_param_is_known("SMTPD_BANNER"));   /* names are case-sensitive */
    assert_true(kt_param_is_known("smtp_header_checks"));
    assert_false(kt_param_find("smtp_header_checks")->implemented);
    assert_true(kt_param_find("header_checks")->implemented);
    assert_true(kt_param_find("smtpd_tls_CApath")->implemented);
}

static void test_defaults(void **state)
{
    (void)state;
    struct kt_config *cfg = load_ok("", NULL);
    assert_string_equal(GET(cfg, "mail_name"), "ktrelay");
    assert_string_equal(GET(cfg, "mail_version"), KT_VERSION);
    const char *host = GET(cfg, "myhostname");
    assert_non_null(strchr(host, '.'));
    char banner[512];
    snprintf(banner, sizeof(banner), "%s ESMTP ktrelay", host);
    assert_string_equal(GET(cfg, "smtpd_banner"), banner);
    assert_null(strstr(GET(cfg, "smtpd_banner"), KT_VERSION));
    assert_int_equal(kt_config_get_int(cfg, NULL, "message_size_limit"), 10240000);
    assert_int_equal(kt_config_get_int(cfg, NULL, "smtpd_hard_error_limit"), 20);
    assert_int_equal(kt_config_get_time(cfg, NULL, "smtpd_timeout"), 300);
    assert_int_equal(kt_config_get_time(cfg, NULL, "smtpd_starttls_timeout"), 300);
    assert_int_equal(kt_config_get_time(cfg, NULL, "maximal_queue_lifetime"), 5 * 86400);
    assert_int_equal(kt_config_get_time(cfg, NULL, "delay_warning_time"), 0);
    assert_string_equal(GET(cfg, "smtpd_forbid_bare_newline"), "normalize");
    assert_string_equal(GET(cfg, "smtpd_forbid_bare_newline_exclusions"), GET(cfg, "mynetworks"));
    assert_int_equal(kt_config_get_int(cfg, NULL, "smtpd_forbid_bare_newline_reject_code"), 550);
    assert_int_equal(kt_config_get_bool(cfg, NULL, "smtpd_use_tls"), 0);
    assert_string_equal(GET(cfg, "smtpd_tls_protocols"), ">=TLSv1");
    assert_string_equal(GET(cfg, "home_mailbox"), "Maildir/");
    assert_string_equal(GET(cfg, "smtpd_relay_restrictions"),
                        "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination");
    assert_string_equal(GET(cfg, "virtual_mailbox_domains"), "");
    /* typed reads refuse the wrong type or an unknown name */
    assert_null(GET(cfg, "no_such_parameter"));
    assert_int_equal(kt_config_get_int(cfg, NULL, "smtpd_use_tls"), -1);
    assert_int_equal(kt_config_get_bool(cfg, NULL, "no_such_parameter"), -1);
    assert_int_equal(kt_config_get_time(cfg, NULL, "message_size_limit"), -1);
    /* no master.cf: the one default smtp service */
    assert_int_equal(kt_config_service_count(cfg), 1);
    const struct kt_service *s = kt_config_service(cfg, 0);
    assert_string_equal(s->name, "smtp");
    assert_null(s->host);
    assert_int_equal(s->port, 25);
    assert_int_equal(s->maxproc, 100);
    assert_null(kt_config_service(cfg, 1));
    kt_config_free(cfg);
    kt_config_free(NULL);
}

/* ---- main.cf syntax ---- */

static void test_main_syntax(void **state)
{
    (void)state;
    struct kt_config *cfg = load_ok(
        "# a comment\n"
        "\n"
        "myhostname=mx.example.com   \n"
        "   \t\n"
        "mydestination = a.example,\n"
        "    b.example,\n"
        "# comments inside a continued value are skipped\n"
        "\tc.example\n"
        "  # indented comment is a comment too\n"
        "relayhost = first\n"
        "relayhost   =    [smart.example]:587  \n"
        "mynetworks =\n", NULL);
    assert_string_equal(GET(cfg, "myhostname"), "mx.example.com");
    assert_string_equal(GET(cfg, "mydestination"), "a.example, b.example, c.example");
    assert_string_equal(GET(cfg, "relayhost"), "[smart.example]:587");
    assert_string_equal(GET(cfg, "mynetworks"), "");
    /* mydomain default derives from the configured myhostname */
    assert_string_equal(GET(cfg, "mydomain"), "example.com");
    kt_config_free(cfg);

    const char *log = load_fails("smtpd_banner = ok\nthis line has no equals sign\n", NULL);
    expect_log(log, "main.cf:2: missing '='");
    log = load_fails("bad name! = 1\n", NULL);
    expect_log(log, "main.cf:1: bad parameter name");

    struct loaded l = load("  relayhost = indented\n", NULL);
    assert_int_equal(l.rc, 0);
    expect_log(l.log, "main.cf:1: logical line must not start with whitespace");
    assert_string_equal(GET(l.cfg, "relayhost"), "indented");
    kt_config_free(l.cfg);
}

static void test_mydomain_rules(void **state)
{
    (void)state;
    /* Postfix: a two-label hostname does not make a domain */
    struct kt_config *cfg = load_ok("myhostname = host.com\n", NULL);
    assert_string_equal(GET(cfg, "mydomain"), "localdomain");
    assert_string_equal(GET(cfg, "mydestination"), "host.com, localhost.localdomain, localhost");
    kt_config_free(cfg);
    cfg = load_ok("mydomain = example.net\nmyhostname = mail.$mydomain\n", NULL);
    assert_string_equal(GET(cfg, "myhostname"), "mail.example.net");
    assert_string_equal(GET(cfg, "myorigin"), "mail.example.net");
    assert_string_equal(GET(cfg, "smtp_helo_name"), "mail.example.net");
    kt_config_free(cfg);
}

/* ---- expansion ---- */

static void test_lazy_expansion(void **state)
{
    (void)state;
    /* used before defined, and overridden after use: the final value counts */
    struct kt_config *cfg = load_ok(
        "smtpd_banner = $myhostname says ${greeting} $(who)\n"
        "myhostname = mx.example.org\n"
        "greeting = early\n"
        "greeting = hello\n"
        "who = $$USER\n"
        "smtpd_tls_cert_file = /etc/ssl/c.pem\n", NULL);
    assert_string_equal(GET(cfg, "smtpd_banner"), "mx.example.org says hello $USER");
    /* a default that refers to another parameter follows it */
    assert_string_equal(GET(cfg, "smtpd_tls_key_file"), "/etc/ssl/c.pem");
    kt_config_free(cfg);
}

static void test_conditionals(void **state)
{
    (void)state;
    struct kt_config *cfg = load_ok(
        "on = yes\n"
        "off =\n"
        "empty_via_ref = $off\n"
        "smtpd_banner = [${on?set}][${off?set}][${on:unset}][${off:unset}]\n"
        "relayhost = [${on?{a b}}][${off?{a b}}][${on:{c d}}][${off:{c d}}]\n"
        "smtpd_tls_CAfile = [${on?{one}:{two}}][${off?{one}:{two}}][${off?{one}:two}][${nothing?{x}:{y}}]\n"
        "smtpd_tls_CApath = [${empty_via_ref?full:empty}][${on?$myorigin}][${{$on} == {yes} ? {eq} : {ne}}]"
        "[${{10} < {9} ? {lt} : {ge}}][${{abc} != {abd}?{ne}}]\n"
        "myorigin = origin.example\n", NULL);
    assert_string_equal(GET(cfg, "smtpd_banner"), "[set][][][unset]");
    assert_string_equal(GET(cfg, "relayhost"), "[a b][][][c d]");
    assert_string_equal(GET(cfg, "smtpd_tls_CAfile"), "[one][two][two][y]");
    assert_string_equal(GET(cfg, "smtpd_tls_CApath"), "[][origin.example][eq][ge][ne]");
    kt_config_free(cfg);

    /* the Postfix default smtpd_starttls_timeout = ${stress?{10}:{300}}s */
    cfg = load_ok("stress = yes\n", NULL);
    assert_int_equal(kt_config_get_time(cfg, NULL, "smtpd_starttls_timeout"), 10);
    assert_int_equal(kt_config_get_int(cfg, NULL, "smtpd_hard_error_limit"), 1);
    kt_config_free(cfg);

    const char *log = load_fails("smtpd_banner = ${myhostname\n", NULL);
    expect_log(log, "main.cf:1: missing '}' in value of smtpd_banner");
    log = load_fails("relayhost = ${a?{x}junk}\n", NULL);
    expect_log(log, "main.cf:1: bad expression");
    log = load_fails("relayhost = ${{a} =~ {b}?{x}}\n", NULL);
    expect_log(log, "main.cf:1: bad expression");
}

static void test_undefined_and_user_parameters(void **state)
{
    (void)state;
    struct loaded l = load("smtpd_banner = x${nowhere}y\n"
                           "relayhost = ${nowhere?a}${nowhere:b}\n"
                           "my_relay = [relay.example]\n"
                           "smtp_tls_servername = $my_relay\n", NULL);
    assert_int_equal(l.rc, 0);
    assert_string_equal(GET(l.cfg, "smtpd_banner"), "xy");
    assert_string_equal(GET(l.cfg, "relayhost"), "b");
    assert_string_equal(GET(l.cfg, "smtp_tls_servername"), "[relay.example]");
    expect_log(l.log, "main.cf:1: undefined parameter $nowhere in value of smtpd_banner");
    expect_no_log(l.log, "main.cf:2:");       /* a conditional test is no use of the value */
    expect_no_log(l.log, "unknown parameter my_relay");   /* used, like Postfix */
    /* names outside the table are not part of the API */
    assert_null(GET(l.cfg, "my_relay"));
    kt_config_free(l.cfg);
}

static void test_expansion_loops(void **state)
{
    (void)state;
    const char *log = load_fails("myorigin = $mydomain\nmydomain = x.$myorigin\n", NULL);
    expect_log(log, "parameter expansion loop");
    expect_log(log, "$myorigin");
    expect_log(log, "$mydomain");
    log = load_fails("smtpd_banner = ${smtpd_banner?x}\n", NULL);
    expect_log(log, "main.cf:1: parameter expansion loop: $smtpd_banner -> $smtpd_banner");
    /* through user-defined names and with the loop in a service only */
    log = load_fails("a = $b\nb = $a\nrelayhost = $a\n", NULL);
    expect_log(log, "parameter expansion loop: $a -> $b -> $a");
    log = load_fails("", "smtp inet n - n - - smtpd -o relayhost=$smtp_helo_name "
                         "-o smtp_helo_name=$relayhost\n");
    expect_log(log, "master.cf:1: parameter expansion loop");
    /* exponential growth is cut off, not computed */
    char big[4096] = "";
    for (int i = 0; i < 30; i++) {
        char line[64];
        snprintf(line, sizeof(line), "v%d = $v%d$v%d\n", i, i + 1, i + 1);
        strcat(big, line);
    }
    strcat(big, "v30 = xxxxxxxx\nrelayhost = $v0\n");
    log = load_fails(big, NULL);
    expect_log(log, "too long after expansion");
}

/* ---- typed values ---- */

static void test_typed_values(void **state)
{
    (void)state;
    struct kt_config *cfg = load_ok("smtpd_timeout = 2m\n"
                                    "maximal_queue_lifetime = 2\n"
                                    "delay_warning_time = 4h\n"
                                    "bounce_queue_lifetime = 1w\n"
                                    "smtpd_error_sleep_time = 0\n"
                                    "smtpd_use_tls = YES\n"
                                    "my_limit = 5000\n"
                                    "message_size_limit = ${my_limit}0\n", NULL);
    assert_int_equal(kt_config_get_time(cfg, NULL, "smtpd_timeout"), 120);
    assert_int_equal(kt_config_get_time(cfg, NULL, "maximal_queue_lifetime"), 2 * 86400);
    assert_int_equal(kt_config_get_time(cfg, NULL, "delay_warning_time"), 4 * 3600);
    assert_int_equal(kt_config_get_time(cfg, NULL, "bounce_queue_lifetime"), 7 * 86400);
    assert_int_equal(kt_config_get_time(cfg, NULL, "smtpd_error_sleep_time"), 0);
    assert_int_equal(kt_config_get_bool(cfg, NULL, "smtpd_use_tls"), 1);
    assert_int_equal(kt_config_get_int(cfg, NULL, "message_size_limit"), 50000);
    kt_config_free(cfg);

    long long v;
    assert_int_equal(kt_param_parse_time("10s", 's', &v), 0);
    assert_int_equal(v, 10);
    assert_int_equal(kt_param_parse_time("3", 'h', &v), 0);
    assert_int_equal(v, 3 * 3600);
    assert_int_equal(kt_param_parse_time("10ss", 's', &v), -EINVAL);
    assert_int_equal(kt_param_parse_time("-1s", 's', &v), -EINVAL);
    assert_int_equal(kt_param_parse_time("s", 's', &v), -EINVAL);
    assert_int_equal(kt_param_parse_time("99999999999w", 's', &v), -EINVAL);
    assert_int_equal(kt_param_parse_int("", &v), -EINVAL);
    assert_int_equal(kt_param_parse_int("12 ", &v), -EINVAL);
    assert_int_equal(kt_param_parse_int("99999999999999999999999", &v), -EINVAL);
    assert_int_equal(kt_param_parse_bool("No", &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(kt_param_parse_bool("true", &v), -EINVAL);
}

static void test_bad_values(void **state)
{
    (void)state;
    const char *log = load_fails("# size\n\nmessage_size_limit = 10MB\n", NULL);
    expect_log(log, "main.cf:3: bad numerical value for message_size_limit: \"10MB\"");
    log = load_fails("smtpd_use_tls = maybe\nsmtpd_recipient_limit = -5\n", NULL);
    expect_log(log, "main.cf:1: bad boolean value for smtpd_use_tls: \"maybe\"");
    expect_log(log, "main.cf:2: bad numerical value for smtpd_recipient_limit: \"-5\"");
    log = load_fails("smtpd_timeout = 5x\n", NULL);
    expect_log(log, "main.cf:1: bad time value for smtpd_timeout: \"5x\"");
    /* checked after expansion, reported where the parameter is set */
    log = load_fails("t = soon\nsmtpd_timeout = $t\n", NULL);
    expect_log(log, "main.cf:2: bad time value for smtpd_timeout: \"soon\"");
    /* a bad override fails the load too */
    log = load_fails("", "smtp inet n - n - - smtpd\n"
                         "submission inet n - n - - smtpd\n  -o smtpd_tls_auth_only=sure\n");
    expect_log(log, "master.cf:2: bad boolean value for smtpd_tls_auth_only: \"sure\"");
    /* ignored parameters are not validated */
    struct kt_config *cfg = load_ok("mailbox_size_limit = lots\n", NULL);
    kt_config_free(cfg);
}

/* ---- diagnostics for unknown and unimplemented names ---- */

static void test_suggestions(void **state)
{
    (void)state;
    assert_string_equal(kt_param_suggest("smtpd_tls_CApth"), "smtpd_tls_CApath");
    assert_string_equal(kt_param_suggest("relayhots"), "relayhost");
    assert_string_equal(kt_param_suggest("SMTPD_BANNER"), "smtpd_banner");
    assert_string_equal(kt_param_suggest("mynetwork"), "mynetworks");
    assert_null(kt_param_suggest("completely_unrelated_name"));
    assert_null(kt_param_suggest("abc"));
    assert_null(kt_param_suggest(""));

    struct loaded l = load("myhostname = a.b.c\nsmtpd_banner = hi\nsmtpd_tls_CApth = /etc/ssl/certs\n"
                           "zz_local_thing = 1\n", NULL);
    assert_int_equal(l.rc, 0);
    expect_log(l.log, "warning: main.cf:3: unknown parameter smtpd_tls_CApth (did you mean smtpd_tls_CApath?)");
    expect_log(l.log, "warning: main.cf:4: unknown parameter zz_local_thing\n");
    kt_config_free(l.cfg);
}

static void test_not_implemented(void **state)
{
    (void)state;
    /* features that change who may send, what is filtered or where mail goes: errors */
    struct loaded l = load("myhostname = a.b.c\n"
                           "smtp_header_checks = regexp:/etc/postfix/smtp_header_checks\n"
                           "smtpd_proxy_filter = 127.0.0.1:10025\n"
                           "debug_peer_level = 3\n"
                           "relocated_maps =\n",
                           "smtp inet n - n - - smtpd -o smtpd_proxy_filter=127.0.0.1:10025\n");
    assert_int_equal(l.rc, -EINVAL);
    expect_log(l.log, "error: main.cf:2: parameter smtp_header_checks is not implemented by ktrelay, and running "
                      "without it would change who may send, what is filtered or where mail goes; remove it, "
                      "or set ktrelay_ignore_unimplemented = yes to run without it");
    expect_log(l.log, "error: main.cf:3: parameter smtpd_proxy_filter is not implemented by ktrelay");
    expect_log(l.log, "error: master.cf:1: parameter smtpd_proxy_filter is not implemented by ktrelay");
    /* cosmetic ones and empty values stay warnings */
    expect_log(l.log, "warning: main.cf:4: parameter debug_peer_level is a Postfix parameter that ktrelay does "
                      "not implement; ignored");
    expect_log(l.log, "warning: main.cf:5: parameter relocated_maps is a Postfix parameter that ktrelay "
                      "does not implement; ignored (empty)");
    expect_no_log(l.log, "unknown parameter");

    /* the operator's explicit opt-out */
    l = load("myhostname = a.b.c\nktrelay_ignore_unimplemented = yes\n"
             "smtp_header_checks = regexp:/etc/postfix/smtp_header_checks\n",
             "smtp inet n - n - - smtpd -o smtpd_proxy_filter=127.0.0.1:10025\n");
    assert_int_equal(l.rc, 0);
    expect_log(l.log, "warning: main.cf:3: parameter smtp_header_checks is not implemented by ktrelay; ignored because "
                      "ktrelay_ignore_unimplemented = yes");
    expect_log(l.log, "warning: master.cf:1: parameter smtpd_proxy_filter is not implemented by ktrelay; ignored");
    kt_config_free(l.cfg);
}

/* Every enumerated parameter takes exactly Postfix's values: anything else is
 * an error at its line, with the value that was probably meant. */
static void test_enumerated_values(void **state)
{
    (void)state;
    static const struct {
        const char *line, *message;
    } bad[] = {
        { "smtpd_tls_security_level = mandatory",
          "main.cf:2: bad value \"mandatory\" for smtpd_tls_security_level; expected none, may or encrypt" },
        { "smtpd_tls_security_level = encrpyt",
          "main.cf:2: bad value \"encrpyt\" for smtpd_tls_security_level (did you mean encrypt?)" },
        { "smtpd_tls_security_level = verify",
          "main.cf:2: bad value \"verify\" for smtpd_tls_security_level: verify is a client-only TLS security level" },
        { "smtpd_tls_security_level = secure", "secure is a client-only TLS security level" },
        { "smtp_tls_security_level = daneonly",
          "main.cf:2: bad value \"daneonly\" for smtp_tls_security_level (did you mean dane-only?)" },
        { "smtp_tls_security_level = fingerprnt", "(did you mean fingerprint?)" },
        { "smtp_dns_support_level = dnsec", "bad value \"dnsec\" for smtp_dns_support_level (did you mean dnssec?)" },
        { "smtp_tls_policy_maps = /etc/postfix/tls_policy", "for smtp_tls_policy_maps: expected type:table" },
        { "smtp_tls_security_level = mey", "bad value \"mey\" for smtp_tls_security_level (did you mean may?)" },
        { "smtpd_use_tls = ture", "main.cf:2: bad boolean value for smtpd_use_tls: \"ture\" (expected yes or no)" },
        { "smtpd_tls_wrappermode = 1", "bad boolean value for smtpd_tls_wrappermode" },
        { "smtpd_tls_ciphers = hihg", "bad value \"hihg\" for smtpd_tls_ciphers (did you mean high?)" },
        { "smtp_tls_mandatory_ciphers = export", "ktrelay does not offer the export cipher grade" },
        { "smtpd_tls_protocols = !SSLv2, !TLSv1.4", "bad value \"!TLSv1.4\" for smtpd_tls_protocols: unknown TLS protocol" },
        { "smtp_tls_protocols = >=TLS1.2", "unknown TLS protocol (did you mean TLSv1.2?)" },
        { "inet_protocols = ipv5", "bad value \"ipv5\" for inet_protocols (did you mean ipv4?)" },
        { "mynetworks_style = hots", "bad value \"hots\" for mynetworks_style (did you mean host?)" },
        { "smtpd_sasl_type = dovcot", "bad value \"dovcot\" for smtpd_sasl_type (did you mean dovecot?)" },
        { "smtpd_sasl_security_options = noanonymous, noplaintxt",
          "bad value \"noplaintxt\" for smtpd_sasl_security_options (did you mean noplaintext?)" },
        { "alias_maps = hahs:/etc/aliases",
          "bad value \"hahs:/etc/aliases\" for alias_maps: unsupported table type \"hahs\" (did you mean hash?)" },
        { "transport_maps = /etc/postfix/transport", "for transport_maps: expected type:table" },
        { "smtpd_timeout = 300x", "bad time value for smtpd_timeout: \"300x\" (expected a number with an optional unit" },
        { "message_size_limit = 10M", "bad numerical value for message_size_limit: \"10M\"" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char main_cf[256];
        snprintf(main_cf, sizeof(main_cf), "myhostname = a.b.c\n%s\n", bad[i].line);
        struct loaded l = load(main_cf, NULL);
        if (l.rc != -EINVAL)
            print_message("accepted: %s\n", bad[i].line);
        assert_int_equal(l.rc, -EINVAL);
        expect_log(l.log, bad[i].message);
    }
    /* what Postfix accepts, in either case */
    struct kt_config *cfg = load_ok("myhostname = a.b.c\nsmtpd_tls_security_level = ENCRYPT\n"
                                    "smtp_tls_security_level = dane-only\nsmtp_dns_support_level = dnssec\n"
                                    "smtpd_tls_protocols = >=TLSv1.2 <=0x0304\n"
                                    "smtp_tls_protocols = !SSLv2, !SSLv3, !TLSv1, !TLSv1.1\n"
                                    "inet_protocols = ipv4, ipv6\nsmtpd_tls_ciphers = HIGH\n"
                                    "alias_maps = hash:/etc/aliases, inline:{ a=b, c=d }\n", NULL);
    kt_config_free(cfg);
    /* an override is checked at its master.cf line */
    struct loaded l = load("myhostname = a.b.c\n", "smtp inet n - n - - smtpd\n  -o smtpd_tls_security_level=verify\n");
    assert_int_equal(l.rc, -EINVAL);
    expect_log(l.log, "error: master.cf:1: bad value \"verify\" for smtpd_tls_security_level");
}

/* ---- master.cf ---- */

static void test_master_services(void **state)
{
    (void)state;
    struct loaded l = load(
        "default_process_limit = 50\n"
        "smtpd_tls_cert_file = /etc/ssl/main.pem\n"
        "sub_level = encrypt\n",
        "# ==========================================================================\n"
        "# service type  private unpriv  chroot  wakeup  maxproc command + args\n"
        "smtp      inet  n       -       y       -       -       smtpd\n"
        "submission inet n       -       y       -       10      smtpd\n"
        "  -o syslog_name=postfix/submission\n"
        "  -o smtpd_tls_security_level=$sub_level\n"
        "  -o { smtpd_banner = $myhostname  submission  service }\n"
        "  -o {smtpd_tls_cert_file=/etc/ssl/sub.pem}\n"
        "smtps     inet  n       -       y       -       -       smtpd -o smtpd_tls_wrappermode=yes\n"
        "127.0.0.1:2525 inet n - n - - smtpd\n"
        "[::1]:25 inet n - n - - smtpd\n"
        "pickup    unix  n       -       y       60      1       pickup\n"
        "cleanup   unix  n       -       y       -       0       cleanup\n"
        "qmgr      unix  n       -       n       300     1       qmgr\n"
        "628       inet  n       -       y       -       -       qmqpd\n"
        "relay     unix  -       -       y       -       -       smtp\n"
        "        -o syslog_name=postfix/$service_name\n");
    if (l.rc != 0)
        print_message("%s", l.log);
    assert_int_equal(l.rc, 0);
    struct kt_config *cfg = l.cfg;
    expect_log(l.log, "master.cf:12: service pickup/unix ignored: ktrelay runs only inet smtpd services");
    expect_log(l.log, "master.cf:13: service cleanup/unix ignored");
    expect_log(l.log, "master.cf:15: service 628/inet ignored");
    expect_log(l.log, "master.cf:16: service relay/unix ignored");
    expect_log(l.log, "master.cf:4: -o syslog_name is not implemented per service; ignored");
    expect_no_log(l.log, "error");

    assert_int_equal(kt_config_service_count(cfg), 5);
    const struct kt_service *smtp = kt_config_service(cfg, 0), *sub = kt_config_service(cfg, 1),
                            *smtps = kt_config_service(cfg, 2), *lo = kt_config_service(cfg, 3),
                            *v6 = kt_config_service(cfg, 4);
    assert_string_equal(smtp->name, "smtp");
    assert_int_equal(smtp->port, 25);
    assert_int_equal(smtp->maxproc, 50);
    assert_string_equal(smtp->file, "master.cf");
    assert_int_equal(smtp->line, 3);
    assert_int_equal(sub->port, 587);
    assert_int_equal(sub->maxproc, 10);
    assert_int_equal(sub->line, 4);
    assert_int_equal(smtps->port, 465);
    assert_string_equal(lo->host, "127.0.0.1");
    assert_int_equal(lo->port, 2525);
    assert_string_equal(v6->name, "[::1]:25");
    assert_string_equal(v6->host, "::1");
    assert_int_equal(v6->port, 25);

    /* overrides apply to their service only, through lazy expansion */
    assert_string_equal(kt_config_get(cfg, sub, "smtpd_tls_security_level"), "encrypt");
    assert_string_equal(kt_config_get(cfg, smtp, "smtpd_tls_security_level"), "");
    assert_string_equal(GET(cfg, "smtpd_tls_security_level"), "");
    char want[512];
    snprintf(want, sizeof(want), "%s  submission  service", GET(cfg, "myhostname"));
    assert_string_equal(kt_config_get(cfg, sub, "smtpd_banner"), want);
    assert_string_equal(kt_config_get(cfg, sub, "smtpd_tls_key_file"), "/etc/ssl/sub.pem");
    assert_string_equal(kt_config_get(cfg, smtp, "smtpd_tls_key_file"), "/etc/ssl/main.pem");
    assert_int_equal(kt_config_get_bool(cfg, smtps, "smtpd_tls_wrappermode"), 1);
    assert_int_equal(kt_config_get_bool(cfg, smtp, "smtpd_tls_wrappermode"), 0);
    kt_config_free(cfg);

    /* a name only one service defines is undefined everywhere else */
    l = load("relayhost = ${only_here?{set}:{unset}}\n",
             "smtp inet n - n - - smtpd\n2525 inet n - n - - smtpd -o only_here=1\n");
    assert_int_equal(l.rc, 0);
    expect_no_log(l.log, "unknown parameter only_here");
    assert_string_equal(GET(l.cfg, "relayhost"), "unset");
    assert_string_equal(kt_config_get(l.cfg, kt_config_service(l.cfg, 0), "relayhost"), "unset");
    assert_string_equal(kt_config_get(l.cfg, kt_config_service(l.cfg, 1), "relayhost"), "set");
    kt_config_free(l.cfg);
}

static void test_master_names_and_errors(void **state)
{
    (void)state;
    struct servent *se = getservbyname("pop3", "tcp");
    if (se) {
        struct kt_config *cfg = load_ok("", "10.0.0.1:pop3 inet n - n - - smtpd\n");
        assert_int_equal(kt_config_service(cfg, 0)->port, 110);
        kt_config_free(cfg);
    }
    /* unbracketed IPv6 splits at the last colon, as Postfix does */
    struct kt_config *cfg = load_ok("", "::1:smtp inet n - n - - smtpd\n");
    assert_string_equal(kt_config_service(cfg, 0)->host, "::1");
    assert_int_equal(kt_config_service(cfg, 0)->port, 25);
    kt_config_free(cfg);

    /* a later definition of the same service replaces the earlier one */
    struct loaded l = load("", "smtp inet n - n - - smtpd\nsmtp inet n - n - - postscreen\n"
                               "2525 inet n - n - 7 smtpd\n2525 inet n - n - 8 smtpd\n");
    assert_int_equal(l.rc, 0);
    assert_int_equal(kt_config_service_count(l.cfg), 1);
    assert_int_equal(kt_config_service(l.cfg, 0)->maxproc, 8);
    assert_int_equal(kt_config_service(l.cfg, 0)->line, 4);
    kt_config_free(l.cfg);

    /* an existing but empty master.cf listens nowhere: allowed, with a warning */
    l = load("", "# nothing\n");
    assert_int_equal(l.rc, 0);
    assert_int_equal(kt_config_service_count(l.cfg), 0);
    expect_log(l.log, "no inet smtpd service");
    kt_config_free(l.cfg);

    const char *log = load_fails("", "smtp inet n - n - smtpd\n");
    expect_log(log, "master.cf:1: service definition needs 8 fields");
    log = load_fails("", "smtp tcp n - n - - smtpd\n");
    expect_log(log, "master.cf:1: service smtp: unknown service type \"tcp\"");
    log = load_fails("", "smtp inet x - n - - smtpd\n");
    expect_log(log, "master.cf:1: service smtp/inet: private, unpriv and chroot");
    log = load_fails("", "smtp inet n - n - many smtpd\n");
    expect_log(log, "master.cf:1: service smtp/inet: bad maxproc field \"many\"");
    log = load_fails("", "no_such_service_name inet n - n - - smtpd\n");
    expect_log(log, "master.cf:1: service no_such_service_name/inet: bad service name");
    log = load_fails("", "70000 inet n - n - - smtpd\n");
    expect_log(log, "bad service name");
    log = load_fails("", "[::1 inet n - n - - smtpd\n");
    expect_log(log, "bad service name");
    log = load_fails("", "smtp inet n - n - - smtpd\n25 inet n - n - - smtpd\n");
    expect_log(log, "master.cf:2: service 25 uses the same address as service smtp (master.cf:1)");
    log = load_fails("", "smtp inet n - n - - smtpd -o\n");
    expect_log(log, "master.cf:1: service smtp: -o without name=value");
    log = load_fails("", "smtp inet n - n - - smtpd -o novalue\n");
    expect_log(log, "bad -o option \"novalue\"");
    log = load_fails("", "smtp inet n - n - - smtpd -o { a = b \n");
    expect_log(log, "master.cf:1: unbalanced '{'");

    /* an unknown -o name is an error: the service would silently run on main.cf's value */
    l = load("", "smtp inet n - n - - smtpd -o smtpd_tls_securty_level=may -v\n");
    assert_int_equal(l.rc, -EINVAL);
    expect_log(l.log, "error: master.cf:1: unknown parameter in -o override: smtpd_tls_securty_level "
                      "(did you mean smtpd_tls_security_level?)");
    expect_log(l.log, "argument \"-v\" ignored");
}

/* ---- postconf output ---- */

static char *print_to_string(const struct kt_config *cfg, int nondefault)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    kt_config_print(cfg, f, nondefault);
    fclose(f);
    return text;
}

static void test_print(void **state)
{
    (void)state;
    struct kt_config *cfg = load_ok("relayhost = first\n"
                                    "myhostname = mx.example.com\n"
                                    "smtpd_banner = $myhostname ESMTP\n"
                                    "debug_peer_level = 3\n"
                                    "relayhost = [second]\n"
                                    "mydestination = a,\n  b\n", NULL);
    char *n = print_to_string(cfg, 1);
    assert_string_equal(n, "debug_peer_level = 3\n"
                           "mydestination = a, b\n"
                           "myhostname = mx.example.com\n"
                           "relayhost = [second]\n"
                           "smtpd_banner = $myhostname ESMTP\n");
    free(n);

    char *all = print_to_string(cfg, 0);
    assert_non_null(strstr(all, "\nsmtpd_banner = $myhostname ESMTP\n"));
    assert_non_null(strstr(all, "\nmyorigin = $myhostname\n"));
    assert_non_null(strstr(all, "\nmydomain = example.com\n"));
    assert_non_null(strstr(all, "\nsmtpd_starttls_timeout = ${stress?{10}:{300}}s\n"));
    assert_null(strstr(all, "debug_peer_level"));
    /* one line per implemented parameter, in name order */
    size_t lines = 0, impl = 0;
    char prev[256] = "";
    for (char *line = strtok(all, "\n"); line; line = strtok(NULL, "\n")) {
        char name[256];
        assert_int_equal(sscanf(line, "%255s =", name), 1);
        assert_true(strcmp(prev, name) < 0);
        strcpy(prev, name);
        lines++;
    }
    for (size_t i = 0; i < kt_param_count(); i++)
        impl += kt_param_at(i)->implemented != 0;
    assert_int_equal(lines, impl);
    free(all);
    kt_config_free(cfg);
}

/* ---- loading from a directory ---- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_load_dir(void **state)
{
    (void)state;
    char dir[] = "/tmp/kt-config-test-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char main_path[128], master_path[128];
    snprintf(main_path, sizeof(main_path), "%s/main.cf", dir);
    snprintf(master_path, sizeof(master_path), "%s/master.cf", dir);

    struct kt_config *cfg = NULL;
    FILE *tmp;
    int saved;
    capture_begin(&tmp, &saved);
    int rc = kt_config_load(dir, &cfg);
    const char *log = capture_end(tmp, saved);
    assert_int_equal(rc, -ENOENT);
    assert_null(cfg);
    expect_log(log, "main.cf: cannot read");

    write_file(main_path, "myhostname = h.example.com\nmessage_size_limit = 1k\n");
    capture_begin(&tmp, &saved);
    rc = kt_config_load(dir, &cfg);
    log = capture_end(tmp, saved);
    assert_int_equal(rc, -EINVAL);
    char want[256];
    snprintf(want, sizeof(want), "%s:2: bad numerical value for message_size_limit: \"1k\"", main_path);
    expect_log(log, want);

    write_file(main_path, "myhostname = h.example.com\n");
    capture_begin(&tmp, &saved);
    rc = kt_config_load(dir, &cfg);
    capture_end(tmp, saved);
    assert_int_equal(rc, 0);
    assert_int_equal(kt_config_service_count(cfg), 1);
    assert_int_equal(kt_config_service(cfg, 0)->port, 25);
    assert_string_equal(kt_config_get(cfg, NULL, "mydomain"), "example.com");
    kt_config_free(cfg);

    write_file(master_path, "2525 inet n - n - - smtpd\n");
    capture_begin(&tmp, &saved);
    rc = kt_config_load(dir, &cfg);
    capture_end(tmp, saved);
    assert_int_equal(rc, 0);
    assert_int_equal(kt_config_service(cfg, 0)->port, 2525);
    assert_string_equal(kt_config_service(cfg, 0)->file, master_path);
    kt_config_free(cfg);

    unlink(master_path);
    unlink(main_path);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table_sorted_and_typed),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_main_syntax),
        cmocka_unit_test(test_mydomain_rules),
        cmocka_unit_test(test_lazy_expansion),
        cmocka_unit_test(test_conditionals),
        cmocka_unit_test(test_undefined_and_user_parameters),
        cmocka_unit_test(test_expansion_loops),
        cmocka_unit_test(test_typed_values),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_suggestions),
        cmocka_unit_test(test_not_implemented),
        cmocka_unit_test(test_enumerated_values),
        cmocka_unit_test(test_master_services),
        cmocka_unit_test(test_master_names_and_errors),
        cmocka_unit_test(test_print),
        cmocka_unit_test(test_load_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
