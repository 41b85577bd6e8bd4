/* Unit tests for relay control: recipient rewriting (percent hack, bang
 * paths, quoted local parts, routes, IP literals) and the restriction lists
 * with access tables and sender login maps. Tables are written to a
 * temporary directory at set-up. */
#include <errno.h>
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
#include "smtpd/policy.h"
#include "core/table.h"

static char tmpdir[] = "/tmp/kt_policy_XXXXXX";
static char *path_vmailbox, *path_sender, *path_client, *path_client_cidr, *path_logins, *path_rcpt;
static struct kt_resolver *resolver;
static struct kt_net_list *mynets;

static char *fixture(const char *name)
{
    const char *src = getenv("KT_TEST_SRCDIR");
    return kt_asprintf("%s/tables/%s", src ? src : ".", name);
}

static char *write_tmp(const char *name, const char *text)
{
    char *p = kt_asprintf("%s/%s", tmpdir, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static int setup(void **state)
{
    (void)state;
    assert_non_null(mkdtemp(tmpdir));
    path_vmailbox = write_tmp("vmailbox", "vuser@virtual.example virtual.example/vuser/\n");
    path_sender = write_tmp("sender", "spammer@bad.example REJECT go away\n"
                                      "bad2.example 550 5.7.0 no thanks\n"
                                      "defer.example DEFER\n"
                                      "good.example OK\n"
                                      "<> REJECT no bounces here\n"
                                      "friend@ 421 4.7.9 odd\n");
    path_client = write_tmp("client", "203.0.113 DEFER try later\n");
    path_client_cidr = write_tmp("client.cidr", "198.51.100.0/24 REJECT blocked net\n2001:db8:bad::/48 REJECT v6\n");
    path_logins = write_tmp("logins", "alice@example.com alice, admin\n@corp.example bob\n");
    path_rcpt = write_tmp("rcpt", "abuse@example.com OK\nhold@example.com reject_unauth_destination\n");
    char *passwd = fixture("passwd");
    char *vmaps = kt_asprintf("texthash:%s", path_vmailbox);
    struct kt_resolve_config rc = {
        .myhostname = "mx.example.com",
        .mydestination = "example.com, localhost",
        .relay_domains = "relay.example",
        .virtual_mailbox_domains = "virtual.example",
        .virtual_mailbox_base = "/var/vmail/",
        .virtual_mailbox_maps = vmaps,
        .virtual_gid_maps = "static:6000",
        .virtual_uid_maps = "static:6000",
        .alias_maps = "",
        .home_mailbox = "Maildir/",
        .inet_interfaces_addrs = "192.0.2.1",
        .passwd_file = passwd,
    };
    char err[512];
    assert_int_equal(kt_resolver_new(&rc, &resolver, err, sizeof(err)), 0);
    assert_int_equal(kt_net_list_open("192.0.2.0/24 [2001:db8:1::]/48", &mynets, err, sizeof(err)), 0);
    kt_free(passwd);
    kt_free(vmaps);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kt_resolver_free(resolver);
    kt_net_list_free(mynets);
    char *files[] = { path_vmailbox, path_sender, path_client, path_client_cidr, path_logins, path_rcpt };
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        unlink(files[i]);
        kt_free(files[i]);
    }
    rmdir(tmpdir);
    return 0;
}

#define ALL_FLAGS (KT_ADDR_PERCENT_HACK | KT_ADDR_SWAP_BANGPATH | KT_ADDR_DEQUOTE)

static void expect_addr(unsigned flags, const char *in, int route, const char *out, enum kt_addr_class cls,
                        int routed, int rewritten)
{
    struct kt_resolved_addr ra;
    kt_addr_resolve(resolver, flags, in, route, &ra);
    assert_string_equal(ra.addr, out);
    assert_int_equal(ra.cls, cls);
    assert_int_equal(ra.routed, routed);
    assert_int_equal(ra.rewritten, rewritten);
}

static void test_addr_plain(void **state)
{
    (void)state;
    expect_addr(ALL_FLAGS, "user@remote.example", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 0);
    expect_addr(ALL_FLAGS, "alice@example.com", 0, "alice@example.com", KT_CLASS_LOCAL, 0, 0);
    expect_addr(ALL_FLAGS, "vuser@virtual.example", 0, "vuser@virtual.example", KT_CLASS_VIRTUAL, 0, 0);
    expect_addr(ALL_FLAGS, "x@relay.example", 0, "x@relay.example", KT_CLASS_RELAY, 0, 0);
    expect_addr(ALL_FLAGS, "postmaster", 0, "postmaster", KT_CLASS_LOCAL, 0, 0);
}

static void test_addr_percent_hack(void **state)
{
    (void)state;
    expect_addr(ALL_FLAGS, "user%remote.example@example.com", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 1);
    expect_addr(ALL_FLAGS, "alice%example.com@localhost", 0, "alice@example.com", KT_CLASS_LOCAL, 0, 1);
    /* nested: the last % goes first */
    expect_addr(ALL_FLAGS, "a%b.example%localhost@example.com", 0, "a@b.example", KT_CLASS_DEFAULT, 0, 1);
    /* off: the % is part of a local user name */
    expect_addr(KT_ADDR_SWAP_BANGPATH | KT_ADDR_DEQUOTE, "user%remote.example@example.com", 0,
                "user%remote.example@example.com", KT_CLASS_LOCAL, 0, 0);
    /* a non-local domain keeps the %: sender routing through a virtual or relay domain */
    expect_addr(ALL_FLAGS, "user%remote.example@virtual.example", 0, "user%remote.example@virtual.example",
                KT_CLASS_VIRTUAL, 1, 0);
    expect_addr(ALL_FLAGS, "user%remote.example@relay.example", 0, "user%remote.example@relay.example",
                KT_CLASS_RELAY, 1, 0);
}

static void test_addr_bang_quoted_route_literal(void **state)
{
    (void)state;
    expect_addr(ALL_FLAGS, "remote.example!user@example.com", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 1);
    expect_addr(ALL_FLAGS, "remote.example!user", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 1);
    expect_addr(KT_ADDR_PERCENT_HACK, "remote.example!user@example.com", 0, "remote.example!user@example.com",
                KT_CLASS_LOCAL, 0, 0);
    expect_addr(ALL_FLAGS, "a!b@relay.example", 0, "a!b@relay.example", KT_CLASS_RELAY, 1, 0);

    expect_addr(ALL_FLAGS, "\"user@remote.example\"@example.com", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 1);
    expect_addr(ALL_FLAGS, "\"user@remote.example\"@virtual.example", 0, "user@remote.example@virtual.example",
                KT_CLASS_VIRTUAL, 1, 0);
    /* not dequoted: the quoted '@' is opaque, the address is a local one */
    expect_addr(KT_ADDR_PERCENT_HACK, "\"user@remote.example\"@example.com", 0, "\"user@remote.example\"@example.com",
                KT_CLASS_LOCAL, 0, 0);
    expect_addr(ALL_FLAGS, "\"john doe\"@virtual.example", 0, "john doe@virtual.example", KT_CLASS_VIRTUAL, 0, 0);

    /* a stripped source route leaves the destination uncertain */
    expect_addr(ALL_FLAGS, "alice@example.com", 1, "alice@example.com", KT_CLASS_LOCAL, 1, 0);

    expect_addr(ALL_FLAGS, "user@[198.51.100.7]", 0, "user@[198.51.100.7]", KT_CLASS_DEFAULT, 0, 0);
    expect_addr(ALL_FLAGS, "user@[192.0.2.1]", 0, "user@[192.0.2.1]", KT_CLASS_LOCAL, 0, 0);
    expect_addr(ALL_FLAGS, "user%remote.example@[192.0.2.1]", 0, "user@remote.example", KT_CLASS_DEFAULT, 0, 1);
}

static struct kt_policy *policy(const char *client, const char *helo, const char *sender, const char *relay,
                                const char *rcpt, const char *logins, int unlisted_sender)
{
    struct kt_policy_config c = {
        .client_restrictions = client,
        .helo_restrictions = helo,
        .sender_restrictions = sender,
        .relay_restrictions = relay,
        .recipient_restrictions = rcpt,
        .sender_login_maps = logins,
        .reject_unlisted_sender = unlisted_sender,
        .addr_flags = ALL_FLAGS,
        .resolver = resolver,
        .mynetworks = mynets,
    };
    struct kt_policy *p = NULL;
    char err[512];
    int rc = kt_policy_new(&c, &p, err, sizeof(err));
    if (rc < 0)
        fprintf(stderr, "kt_policy_new: %s\n", err);
    assert_int_equal(rc, 0);
    return p;
}

#define RELAY_STD "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"

/* Returns the reply ("" when permitted) in a static buffer. */
static const char *check(const struct kt_policy *p, const char *client, const char *sender, const char *rcpt,
                         const char *user)
{
    static char reply[700];
    struct kt_resolved_addr ra;
    struct kt_policy_request r = { .client_addr = client, .helo = "client.example.net", .sender = sender,
                                   .recipient = rcpt, .sasl_username = user, .esmtp = 1 };
    int rc = kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply));
    if (rc == 0)
        assert_string_equal(reply, "");
    else
        assert_true(reply[0] == '4' || reply[0] == '5');
    return reply;
}

static void test_relay_decisions(void **state)
{
    (void)state;
    struct kt_policy *p = policy("", "", "", RELAY_STD, "", "", 0);
    const char *out = "198.51.100.1";
    assert_string_equal(check(p, "192.0.2.5", "s@x.example", "u@remote.example", NULL), "");
    assert_string_equal(check(p, "2001:db8:1::7", "s@x.example", "u@remote.example", NULL), "");
    assert_string_equal(check(p, out, "s@x.example", "u@remote.example", NULL),
                        "554 5.7.1 <u@remote.example>: Relay access denied");
    assert_string_equal(check(p, out, "s@x.example", "u@remote.example", "alice"), "");
    assert_string_equal(check(p, out, "s@x.example", "alice@example.com", NULL), "");
    assert_string_equal(check(p, out, "s@x.example", "vuser@virtual.example", NULL), "");
    assert_string_equal(check(p, out, "s@x.example", "x@relay.example", NULL), "");
    /* every trick from outside */
    static const char *const tricks[] = {
        "u%remote.example@example.com", "remote.example!u@example.com", "\"u@remote.example\"@example.com",
        "u%remote.example@virtual.example", "u%remote.example@relay.example", "remote.example!u@relay.example",
        "\"u@remote.example\"@relay.example", "u@[198.51.100.9]", "u@[IPv6:2001:db8::9]",
        "u%remote.example@[192.0.2.1]",
    };
    for (size_t i = 0; i < sizeof(tricks) / sizeof(tricks[0]); i++) {
        const char *r = check(p, out, "s@x.example", tricks[i], NULL);
        assert_non_null(strstr(r, "Relay access denied"));
        assert_int_equal(strncmp(r, "554 5.7.1 <", 11), 0);
    }
    /* a stripped route */
    struct kt_policy_request r = { .client_addr = out, .helo = "h.example", .sender = "", .recipient = "alice@example.com",
                                   .recipient_had_route = 1, .esmtp = 1 };
    struct kt_resolved_addr ra;
    char reply[700];
    assert_int_equal(kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply)), 1);
    assert_string_equal(reply, "554 5.7.1 <alice@example.com>: Relay access denied");
    /* the same tricks from a trusted client resolve to where they really go */
    r.client_addr = "192.0.2.9";
    r.recipient = "u%remote.example@example.com";
    r.recipient_had_route = 0;
    assert_int_equal(kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply)), 0);
    assert_string_equal(ra.addr, "u@remote.example");
    assert_int_equal(ra.cls, KT_CLASS_DEFAULT);
    kt_policy_free(p);

    p = policy("", "", "", "permit_mynetworks, defer_unauth_destination", "", "", 0);
    assert_string_equal(check(p, out, "", "u@remote.example", NULL), "454 4.7.1 <u@remote.example>: Relay access denied");
    kt_policy_free(p);

    /* the protection may sit in smtpd_recipient_restrictions instead */
    p = policy("", "", "", "", "permit_mynetworks, reject_unauth_destination", "", 0);
    assert_string_equal(check(p, out, "", "u@remote.example", NULL), "554 5.7.1 <u@remote.example>: Relay access denied");
    assert_string_equal(check(p, "192.0.2.1", "", "u@remote.example", NULL), "");
    kt_policy_free(p);
}

static void test_policy_new_errors(void **state)
{
    (void)state;
    struct kt_policy_config c = { .resolver = resolver, .mynetworks = mynets, .relay_restrictions = "permit_mynetworks" };
    struct kt_policy *p = (struct kt_policy *)1;
    char err[512];
    assert_int_equal(kt_policy_new(&c, &p, err, sizeof(err)), -EINVAL);
    assert_null(p);
    assert_non_null(strstr(err, "open relay"));
    c.relay_restrictions = "permit_mynetworks, reject_unauth_destinaton";
    assert_int_equal(kt_policy_new(&c, &p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "reject_unauth_destinaton"));
    c.relay_restrictions = "reject_unauth_destination";
    c.sender_restrictions = "check_sender_access";
    assert_int_equal(kt_policy_new(&c, &p, err, sizeof(err)), -EINVAL);
    c.sender_restrictions = "check_sender_access texthash:/nonexistent/file";
    assert_true(kt_policy_new(&c, &p, err, sizeof(err)) < 0);
    c.sender_restrictions = "reject_sender_login_mismatch";
    assert_int_equal(kt_policy_new(&c, &p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "smtpd_sender_login_maps"));
    c.sender_restrictions = "check_sender_access inline:{ a@b.example=REJECT, { c@d.example = OK } }, permit";
    assert_int_equal(kt_policy_new(&c, &p, err, sizeof(err)), 0);
    assert_string_equal(check(p, "198.51.100.1", "a@b.example", "alice@example.com", NULL),
                        "554 5.7.1 <a@b.example>: Sender address rejected: Access denied");
    assert_string_equal(check(p, "198.51.100.1", "c@d.example", "alice@example.com", NULL), "");
    kt_policy_free(p);
    kt_policy_free(NULL);
}

static void test_access_tables(void **state)
{
    (void)state;
    char *sender = kt_asprintf("check_sender_access texthash:%s", path_sender);
    char *client = kt_asprintf("check_client_access cidr:%s, check_client_access texthash:%s", path_client_cidr,
                               path_client);
    char *rcpt = kt_asprintf("check_recipient_access texthash:%s, " RELAY_STD, path_rcpt);
    struct kt_policy *p = policy(client, "", sender, "reject_unauth_destination", rcpt, "", 0);
    const char *out = "198.51.100.1", *ok = "192.0.2.1", *to = "alice@example.com";

    assert_string_equal(check(p, ok, "spammer@bad.example", to, NULL),
                        "554 5.7.1 <spammer@bad.example>: Sender address rejected: go away");
    assert_string_equal(check(p, ok, "x@bad2.example", to, NULL),
                        "550 5.7.0 <x@bad2.example>: Sender address rejected: no thanks");
    /* parent domains match */
    assert_string_equal(check(p, ok, "x@sub.bad2.example", to, NULL),
                        "550 5.7.0 <x@sub.bad2.example>: Sender address rejected: no thanks");
    assert_string_equal(check(p, ok, "x@defer.example", to, NULL),
                        "450 4.7.1 <x@defer.example>: Sender address rejected: Access denied");
    assert_string_equal(check(p, ok, "", to, NULL), "554 5.7.1 <>: Sender address rejected: no bounces here");
    assert_string_equal(check(p, ok, "friend@any.example", to, NULL),
                        "421 4.7.9 <friend@any.example>: Sender address rejected: odd");
    assert_string_equal(check(p, ok, "Someone@Good.Example", to, NULL), "");
    /* OK in the sender list ends that list only: the relay check still applies */
    assert_string_equal(check(p, "203.0.113.50", "x@good.example", "u@remote.example", NULL),
                        "450 4.7.1 <unknown[203.0.113.50]>: Client host rejected: try later");
    assert_string_equal(check(p, out, "x@good.example", to, NULL),
                        "554 5.7.1 <unknown[198.51.100.1]>: Client host rejected: blocked net");
    assert_string_equal(check(p, "2001:db8:bad::1", "x@good.example", to, NULL),
                        "554 5.7.1 <unknown[2001:db8:bad::1]>: Client host rejected: v6");
    assert_string_equal(check(p, "192.0.2.77", "x@good.example", "u@remote.example", NULL),
                        "554 5.7.1 <u@remote.example>: Relay access denied");
    /* a restriction name as the result */
    assert_string_equal(check(p, "192.0.2.77", "x@good.example", "hold@example.com", NULL), "");
    kt_policy_free(p);
    kt_free(sender);
    kt_free(client);
    kt_free(rcpt);
}

static void test_fqdn_pipelining_client_reject(void **state)
{
    (void)state;
    struct kt_policy *p = policy("reject_unauth_pipelining", "reject_non_fqdn_helo_hostname",
                                 "reject_non_fqdn_sender", RELAY_STD, "reject_non_fqdn_recipient", "", 0);
    const char *ok = "192.0.2.1";
    assert_string_equal(check(p, ok, "user", "alice@example.com", NULL),
                        "504 5.5.2 <user>: Sender address rejected: need fully-qualified address");
    assert_string_equal(check(p, ok, "user@localhost", "alice@example.com", NULL),
                        "504 5.5.2 <user@localhost>: Sender address rejected: need fully-qualified address");
    assert_string_equal(check(p, ok, "", "alice@localhost", NULL),
                        "504 5.5.2 <alice@localhost>: Recipient address rejected: need fully-qualified address");
    assert_string_equal(check(p, ok, "u@[192.0.2.1]", "alice@example.com", NULL), "");

    struct kt_policy_request r = { .client_addr = ok, .helo = "localhost", .sender = "", .recipient = "alice@example.com",
                                   .esmtp = 1 };
    struct kt_resolved_addr ra;
    char reply[700];
    assert_int_equal(kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply)), 1);
    assert_string_equal(reply, "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname");
    r.helo = "client.example.net";
    r.pipelined = 1;
    assert_int_equal(kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply)), 0);
    r.esmtp = 0;
    assert_int_equal(kt_policy_check_rcpt(p, &r, &ra, reply, sizeof(reply)), 1);
    assert_string_equal(reply,
                        "503 5.5.0 <unknown[192.0.2.1]>: Client host rejected: Improper use of SMTP command pipelining");
    kt_policy_free(p);

    /* the submission profile */
    p = policy("permit_sasl_authenticated, reject", "", "", RELAY_STD, "", "", 0);
    assert_string_equal(check(p, ok, "", "alice@example.com", NULL),
                        "554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied");
    assert_string_equal(check(p, "198.51.100.1", "", "u@remote.example", "bob"), "");
    kt_policy_free(p);
}

static void test_login_mismatch_and_unlisted(void **state)
{
    (void)state;
    char *maps = kt_asprintf("texthash:%s", path_logins);
    struct kt_policy *p = policy("", "", "reject_sender_login_mismatch", RELAY_STD, "", maps, 0);
    const char *c = "198.51.100.1", *to = "alice@example.com";
    assert_string_equal(check(p, c, "alice@example.com", to, "alice"), "");
    assert_string_equal(check(p, c, "Alice@Example.com", to, "admin"), "");
    assert_string_equal(check(p, c, "alice@example.com", to, "bob"),
                        "553 5.7.1 <alice@example.com>: Sender address rejected: not owned by user bob");
    assert_string_equal(check(p, c, "anyone@corp.example", to, "bob"), "");
    assert_string_equal(check(p, c, "stranger@elsewhere.example", to, "bob"),
                        "553 5.7.1 <stranger@elsewhere.example>: Sender address rejected: not owned by user bob");
    assert_string_equal(check(p, c, "alice@example.com", to, NULL),
                        "553 5.7.1 <alice@example.com>: Sender address rejected: not logged in");
    assert_string_equal(check(p, c, "stranger@elsewhere.example", to, NULL), "");
    assert_string_equal(check(p, c, "", to, "bob"), "");
    kt_policy_free(p);

    p = policy("", "", "reject_authenticated_sender_login_mismatch", RELAY_STD, "", maps, 0);
    assert_string_equal(check(p, c, "alice@example.com", to, NULL), "");
    kt_policy_free(p);

    p = policy("", "", "", RELAY_STD, "", "", 1);
    assert_string_equal(check(p, c, "nobody@virtual.example", to, NULL),
                        "550 5.1.0 <nobody@virtual.example>: Sender address rejected: User unknown in virtual mailbox table");
    assert_string_equal(check(p, c, "vuser@virtual.example", to, NULL), "");
    assert_string_equal(check(p, c, "nosuchuser@example.com", to, NULL),
                        "550 5.1.0 <nosuchuser@example.com>: Sender address rejected: User unknown in local recipient table");
    assert_string_equal(check(p, c, "x@remote.example", to, NULL), "");
    kt_policy_free(p);

    p = policy("", "", "", RELAY_STD, "reject_unlisted_recipient", "", 0);
    assert_string_equal(check(p, c, "", "nobody@virtual.example", NULL),
                        "550 5.1.1 <nobody@virtual.example>: Recipient address rejected: User unknown in virtual mailbox table");
    kt_policy_free(p);
    kt_free(maps);
}

static void test_mynetworks_style(void **state)
{
    (void)state;
    static const char *const styles[] = { "host", "subnet", "class" };
    for (size_t i = 0; i < 3; i++) {
        char *list = kt_mynetworks_from_style(styles[i]);
        struct kt_net_list *l;
        char err[256];
        assert_int_equal(strncmp(list, "127.0.0.0/8 [::1]/128", 21), 0);
        assert_int_equal(kt_net_list_open(list, &l, err, sizeof(err)), 0);
        assert_int_equal(kt_net_list_match(l, "127.0.0.2"), 1);
        assert_int_equal(kt_net_list_match(l, "::1"), 1);
        assert_int_equal(kt_net_list_match(l, "240.0.0.1"), 0);
        kt_net_list_free(l);
        kt_free(list);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_addr_plain),
        cmocka_unit_test(test_addr_percent_hack),
        cmocka_unit_test(test_addr_bang_quoted_route_literal),
        cmocka_unit_test(test_relay_decisions),
        cmocka_unit_test(test_policy_new_errors),
        cmocka_unit_test(test_access_tables),
        cmocka_unit_test(test_fqdn_pipelining_client_reject),
        cmocka_unit_test(test_login_mismatch_and_unlisted),
        cmocka_unit_test(test_mynetworks_style),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
