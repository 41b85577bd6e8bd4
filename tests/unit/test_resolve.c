/* Unit tests for recipient resolution: address classes, alias expansion,
 * passwd users, virtual mailboxes. Fixtures live in tests/unit/tables/; alias
 * files that need absolute :include: paths are written to a temporary
 * directory at set-up. */
#include <errno.h>
#include <pthread.h>
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
#include "delivery/resolve.h"

static char tmpdir[] = "/tmp/kt_resolve_XXXXXX";
static char *fx_aliases, *fx_passwd, *fx_vmailbox, *fx_vuid, *tmp_aliases, *tmp_inc1, *tmp_inc2, *alias_maps;
static char *vmaps, *vuid_maps;
static struct kt_resolver *res_main;

static char *fixture(const char *name)
{
    const char *src = getenv("KT_TEST_SRCDIR");
    return kt_asprintf("%s/tables/%s", src ? src : ".", name);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static struct kt_resolve_config base_config(void)
{
    struct kt_resolve_config c = {
        .myhostname = "mx.example.com",
        .mydestination = "Example.com, localhost",
        .relay_domains = "relay.example",
        .virtual_mailbox_domains = "virtual.example catch.example",
        .virtual_mailbox_base = "/var/vmail/",
        .virtual_mailbox_maps = vmaps,
        .virtual_uid_maps = vuid_maps,
        .virtual_gid_maps = "static:6000",
        .alias_maps = alias_maps,
        .home_mailbox = "Maildir/",
        .inet_interfaces_addrs = "192.0.2.1 2001:db8::1",
        .passwd_file = fx_passwd,
    };
    return c;
}

static int setup(void **state)
{
    char *text, chain[2048] = "";
    size_t n = 0;
    struct kt_resolve_config c;
    char err[256] = "";

    (void)state;
    if (!mkdtemp(tmpdir))
        return -1;
    fx_aliases = fixture("aliases");
    fx_passwd = fixture("passwd");
    fx_vmailbox = fixture("vmailbox");
    fx_vuid = fixture("vuid");
    vmaps = kt_asprintf("hash:%s", fx_vmailbox);
    vuid_maps = kt_asprintf("texthash:%s", fx_vuid);
    tmp_aliases = kt_asprintf("%s/aliases", tmpdir);
    tmp_inc1 = kt_asprintf("%s/inc1", tmpdir);
    tmp_inc2 = kt_asprintf("%s/inc2", tmpdir);
    text = kt_asprintf("# nested includes that loop back\nbob\n\ncarol, dave@remote.example\n:include:%s\n", tmp_inc2);
    write_file(tmp_inc1, text);
    kt_free(text);
    text = kt_asprintf("Bob\n:include:%s\n", tmp_inc1);
    write_file(tmp_inc2, text);
    kt_free(text);
    /* chain5: c1 -> c2 -> ... -> c5 -> carol; chain25 is 25 deep, beyond the limit. */
    for (int i = 1; i < 25; i++)
        n += (size_t)snprintf(chain + n, sizeof(chain) - n, "c%d: c%d\n", i, i + 1);
    snprintf(chain + n, sizeof(chain) - n, "c25: carol\nchain5: c21\nchain25: c1\n");
    text = kt_asprintf("list: :include:%s\nrelative: :include:inc1\n%s", tmp_inc1, chain);
    write_file(tmp_aliases, text);
    kt_free(text);
    alias_maps = kt_asprintf("hash:%s, texthash:%s", fx_aliases, tmp_aliases);
    c = base_config();
    if (kt_resolver_new(&c, &res_main, err, sizeof(err)) != 0) {
        print_error("resolver: %s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kt_resolver_free(res_main);
    unlink(tmp_aliases);
    unlink(tmp_inc1);
    unlink(tmp_inc2);
    rmdir(tmpdir);
    kt_free(fx_aliases);
    kt_free(fx_passwd);
    kt_free(fx_vmailbox);
    kt_free(fx_vuid);
    kt_free(vmaps);
    kt_free(vuid_maps);
    kt_free(tmp_aliases);
    kt_free(tmp_inc1);
    kt_free(tmp_inc2);
    kt_free(alias_maps);
    return 0;
}

/* Fills the caller's result: reply points into it, so results are never copied by value. */
static void resolve_into(struct kt_resolve_result *r, const char *addr)
{
    memset(r, 0x5a, sizeof(*r));   /* the resolver must not rely on a cleared result */
    kt_resolve_recipient(res_main, addr, r);
}

static int has_mailbox(const struct kt_resolve_result *r, const char *path, unsigned uid, unsigned gid)
{
    for (size_t i = 0; i < r->n_mailboxes; i++)
        if (strcmp(r->mailboxes[i].path, path) == 0)
            return r->mailboxes[i].uid == uid && r->mailboxes[i].gid == gid;
    return 0;
}

/* Resolves addr into *r, which must be accepted (no reply) with the mailbox path owned by uid:gid among
 * its mailboxes. */
static void expect_mailbox(struct kt_resolve_result *r, const char *addr, const char *path, unsigned uid,
                           unsigned gid)
{
    resolve_into(r, addr);
    assert_null(r->reply);
    assert_true(has_mailbox(r, path, uid, gid));
}

static void test_classes(void **state)
{
    (void)state;
    assert_int_equal(kt_resolve_class(res_main, NULL), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, ""), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, "EXAMPLE.COM"), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, "localhost"), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, "sub.example.com"), KT_CLASS_DEFAULT);
    assert_int_equal(kt_resolve_class(res_main, "[192.0.2.1]"), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, "[IPv6:2001:DB8::1]"), KT_CLASS_LOCAL);
    assert_int_equal(kt_resolve_class(res_main, "[192.0.2.2]"), KT_CLASS_DEFAULT);
    assert_int_equal(kt_resolve_class(res_main, "[not an ip]"), KT_CLASS_DEFAULT);
    assert_int_equal(kt_resolve_class(res_main, "Virtual.Example"), KT_CLASS_VIRTUAL);
    assert_int_equal(kt_resolve_class(res_main, "relay.example"), KT_CLASS_RELAY);
    assert_int_equal(kt_resolve_class(res_main, "mx1.relay.example"), KT_CLASS_RELAY);
    assert_int_equal(kt_resolve_class(res_main, "other.org"), KT_CLASS_DEFAULT);
}

static void test_local_users(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "BOB@Example.Com");
    assert_int_equal(r.cls, KT_CLASS_LOCAL);
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_int_equal(r.n_forward, 0);
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));

    resolve_into(&r, "carol");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/home/carol/Maildir/", 1003, 1003));

    resolve_into(&r, "carol@[192.0.2.1]");
    assert_int_equal(r.cls, KT_CLASS_LOCAL);
    assert_true(has_mailbox(&r, "/home/carol/Maildir/", 1003, 1003));

    resolve_into(&r, "nosuchuser@example.com");
    assert_string_equal(r.reply, "550 5.1.1 <nosuchuser@example.com>: Recipient address rejected: User unknown in local recipient table");
    assert_int_equal(r.n_mailboxes, 0);

    /* passwd names are matched after case folding, so "MixedCase" is unreachable; "+nis" and bad lines are ignored. */
    resolve_into(&r, "MixedCase@example.com");
    assert_non_null(r.reply);
    resolve_into(&r, "nohome@example.com");
    assert_non_null(r.reply);
    resolve_into(&r, "+nisuser@example.com");
    assert_non_null(r.reply);
}

static void test_alias_self_and_root(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    /* alice: alice, alice@remote.example -- the self reference reaches her mailbox (first passwd entry). */
    resolve_into(&r, "Alice@example.com");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/home/alice/Maildir/", 1001, 1001));
    assert_int_equal(r.n_forward, 1);
    assert_string_equal(r.forward[0], "alice@remote.example");

    resolve_into(&r, "root@localhost");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/home/alice/Maildir/", 1001, 1001));

    expect_mailbox(&r, "postmaster", "/home/alice/Maildir/", 1001, 1001);
    expect_mailbox(&r, "POSTMASTER@example.com", "/home/alice/Maildir/", 1001, 1001);
}

static void test_alias_lists(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "team@example.com");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 3);   /* bob twice and "Bob" fold into one */
    assert_true(has_mailbox(&r, "/home/alice/Maildir/", 1001, 1001));
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));
    assert_true(has_mailbox(&r, "/home/carol/Maildir/", 1003, 1003));
    assert_int_equal(r.n_forward, 1);

    resolve_into(&r, "upper@example.com");   /* "\Bob": straight to the mailbox */
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));

    resolve_into(&r, "quoted name@example.com");
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));

    resolve_into(&r, "virt@example.com");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/var/vmail/virtual.example/vuser/", 5001, 6000));

    resolve_into(&r, "nouser@example.com");
    assert_string_equal(r.reply, "550 5.1.1 <nouser@example.com>: Recipient address rejected: User unknown in local recipient table");
    assert_int_equal(r.n_skipped, 1);
    /* an alias is listed, even when it reaches nobody: not reject_unlisted_sender's case, and not
     * unknown_local_recipient_reject_code's */
    assert_int_equal(r.unlisted, 0);
    assert_int_equal(r.unknown_user, 0);
    resolve_into(&r, "ghost@example.com");
    assert_int_equal(r.unlisted, 1);
    assert_int_equal(r.unknown_user, 1);

    resolve_into(&r, "many@example.com");   /* more remote targets than the result holds */
    assert_non_null(r.reply);
    assert_int_equal(strncmp(r.reply, "451 4.3.0 <many@example.com>:", 29), 0);
    assert_int_equal(r.n_forward, 0);
}

static void test_alias_loops_and_depth(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    /* The loop closes at the name seen again, which then means that user's own mailbox. */
    resolve_into(&r, "loop2@example.com");   /* loop2 -> loop1 -> loop2, and there is no user loop2 */
    assert_string_equal(r.reply, "550 5.1.1 <loop2@example.com>: Recipient address rejected: User unknown in local recipient table");
    assert_int_equal(r.n_mailboxes, 0);

    resolve_into(&r, "loop1@example.com");   /* loop1 -> loop2 -> loop1: user loop1 */
    assert_int_equal(r.n_mailboxes, 1);
    assert_null(r.reply);
    assert_true(has_mailbox(&r, "/home/loop1/Maildir/", 1004, 1004));

    resolve_into(&r, "loopx@example.com");
    assert_string_equal(r.reply, "550 5.1.1 <loopx@example.com>: Recipient address rejected: User unknown in local recipient table");

    expect_mailbox(&r, "chain5@example.com", "/home/carol/Maildir/", 1003, 1003);

    resolve_into(&r, "chain25@example.com");
    assert_non_null(r.reply);
    assert_int_equal(r.n_mailboxes, 0);
    assert_string_equal(r.skip_reason, "alias nesting too deep");
}

static void test_alias_unsupported(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "cmd@example.com");
    assert_string_equal(r.reply, "550 5.1.1 <cmd@example.com>: Recipient address rejected: unsupported alias target");
    assert_int_equal(r.n_skipped, 2);
    assert_non_null(r.skip_reason);

    /* one target ktrelay cannot deliver refuses the whole recipient: bob's copy alone would drop the
     * command's part unseen */
    resolve_into(&r, "mixed@example.com");
    assert_string_equal(r.reply, "550 5.1.1 <mixed@example.com>: Recipient address rejected: unsupported alias target");
    assert_int_equal(r.n_mailboxes, 0);
    assert_int_equal(r.n_skipped, 1);
    assert_string_equal(r.skip_reason, "|command alias targets are not supported");
    assert_string_equal(r.skip_target, "|/bin/cat");

    /* an unknown user in a list: the others get the message, and the result names what was left out
     * (kt_resolve_warn_skipped logs it) */
    resolve_into(&r, "partial@example.com");
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));
    assert_int_equal(r.n_skipped, 1);
    assert_string_equal(r.skip_reason, "unknown local user");
    assert_string_equal(r.skip_target, "ghost");

    resolve_into(&r, "relative@example.com");   /* :include: needs an absolute path */
    assert_string_equal(r.reply, "550 5.1.1 <relative@example.com>: Recipient address rejected: unsupported alias target");
}

static void test_alias_include(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "list@example.com");   /* inc1 -> inc2 -> inc1 loops harmlessly */
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 2);
    assert_true(has_mailbox(&r, "/home/bob/Maildir/", 1002, 1002));
    assert_true(has_mailbox(&r, "/home/carol/Maildir/", 1003, 1003));
    assert_int_equal(r.n_forward, 1);
    assert_string_equal(r.forward[0], "dave@remote.example");
}

static void test_virtual(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "vuser@virtual.example");
    assert_int_equal(r.cls, KT_CLASS_VIRTUAL);
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 1);
    assert_true(has_mailbox(&r, "/var/vmail/virtual.example/vuser/", 5001, 6000));

    expect_mailbox(&r, "VCASE@virtual.EXAMPLE", "/var/vmail/virtual.example/vcase/", 5003, 6000);

    expect_mailbox(&r, "anyone@catch.example", "/var/vmail/catch.example/all/", 5002, 6000);

    resolve_into(&r, "mboxuser@virtual.example");
    assert_string_equal(r.reply, "550 5.1.1 <mboxuser@virtual.example>: Recipient address rejected: mailbox format not supported");

    resolve_into(&r, "ghost@virtual.example");
    assert_string_equal(r.reply, "550 5.1.1 <ghost@virtual.example>: Recipient address rejected: User unknown in virtual mailbox table");
    assert_int_equal(r.n_mailboxes, 0);

    resolve_into(&r, "nouid@virtual.example");
    assert_string_equal(r.reply, "451 4.3.0 <nouid@virtual.example>: Temporary lookup failure");
}

static void test_relay_default(void **state)
{
    struct kt_resolve_result r;

    (void)state;
    resolve_into(&r, "someone@relay.example");
    assert_int_equal(r.cls, KT_CLASS_RELAY);
    assert_null(r.reply);
    assert_int_equal(r.n_mailboxes, 0);
    resolve_into(&r, "someone@other.org");
    assert_int_equal(r.cls, KT_CLASS_DEFAULT);
    assert_null(r.reply);
    resolve_into(&r, "bob@[192.0.2.9]");
    assert_int_equal(r.cls, KT_CLASS_DEFAULT);
}

static void test_defaults(void **state)
{
    struct kt_resolve_config c = base_config();
    struct kt_resolver *r;
    struct kt_resolve_result res;
    char err[256];

    (void)state;
    c.alias_maps = NULL;
    c.virtual_uid_maps = NULL;
    c.virtual_gid_maps = "";
    c.mydestination = NULL;   /* Postfix default: $myhostname, localhost */
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), 0);
    kt_resolve_recipient(r, "PostMaster@mx.example.com", &res);
    assert_null(res.reply);
    assert_int_equal(res.n_mailboxes, 1);
    /* root's mail is never owned by uid 0: default_privs (nobody), and root's home is never created */
    assert_string_equal(res.mailboxes[0].path, "/root/Maildir/");
    assert_int_equal(res.mailboxes[0].uid, 65534);
    assert_int_equal(res.mailboxes[0].gid, 65534);
    assert_int_equal(res.mailboxes[0].keep, strlen("/root/"));
    kt_resolve_recipient(r, "alice@localhost", &res);
    assert_null(res.reply);
    assert_int_equal(res.n_forward, 0);
    assert_string_equal(res.mailboxes[0].path, "/home/alice/Maildir/");
    assert_int_equal(kt_resolve_class(r, "example.com"), KT_CLASS_DEFAULT);
    kt_resolve_recipient(r, "vuser@virtual.example", &res);
    assert_null(res.reply);
    assert_int_equal(res.mailboxes[0].uid, (unsigned)getuid());
    assert_int_equal(res.mailboxes[0].gid, (unsigned)getgid());
    kt_resolver_free(r);
    kt_resolver_free(NULL);
}

static void test_config_errors(void **state)
{
    struct kt_resolve_config c = base_config();
    struct kt_resolver *r = NULL;
    char err[256];
    char *bad_alias = NULL;

    (void)state;
    c.home_mailbox = "Mailbox";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "home_mailbox must name a Maildir (end with /)");
    assert_null(r);
    c.home_mailbox = NULL;
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "home_mailbox must name a Maildir (end with /)");
    c.home_mailbox = "Maildir/";

    c.passwd_file = "/nonexistent/ktrelay/passwd";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "/nonexistent/ktrelay/passwd"));
    c.passwd_file = fx_passwd;

    c.virtual_uid_maps = "static:nobody";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
    c.virtual_uid_maps = vuid_maps;

    bad_alias = kt_asprintf("inline:{ x=:include:%s/missing }", tmpdir);
    c.alias_maps = bad_alias;
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "missing"));
    kt_free(bad_alias);

    c.alias_maps = alias_maps;
    c.inet_interfaces_addrs = "192.0.2.1 not-an-ip";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
}

/* Lookups share one resolver across threads without locks. */
static void *resolve_many(void *arg)
{
    struct kt_resolve_result r;
    uintptr_t bad = 0;

    (void)arg;
    for (int i = 0; i < 2000; i++) {
        kt_resolve_recipient(res_main, "team@example.com", &r);
        bad += r.reply != NULL || r.n_mailboxes != 3;
        kt_resolve_recipient(res_main, "anyone@catch.example", &r);
        bad += r.reply != NULL || r.n_mailboxes != 1;
    }
    return (void *)bad;
}

/* Postfix trivial-rewrite completion: append_at_myorigin, append_dot_mydomain. */
static void test_complete(void **state)
{
    struct kt_resolve_config c = base_config();
    struct kt_resolver *r;
    char err[256], out[64];

    (void)state;
    c.myorigin = "origin.example";
    c.mydomain = "example.com";
    c.append_at_myorigin = 1;
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), 0);
    assert_int_equal(kt_resolve_complete(r, "root", out, sizeof(out)), 0);
    assert_string_equal(out, "root@origin.example");
    assert_int_equal(kt_resolve_class(r, strchr(out, '@') + 1), KT_CLASS_DEFAULT);
    assert_int_equal(kt_resolve_complete(r, "\"a@b\"", out, sizeof(out)), 0);
    assert_string_equal(out, "\"a@b\"@origin.example");
    assert_int_equal(kt_resolve_complete(r, "a@host", out, sizeof(out)), 0);
    assert_string_equal(out, "a@host");              /* append_dot_mydomain = no (Postfix 3) */
    assert_int_equal(kt_resolve_complete(r, "a@b.c", out, sizeof(out)), 0);
    assert_string_equal(out, "a@b.c");
    assert_int_equal(kt_resolve_complete(r, "a-very-long-local-part-that-will-not-fit-at-all", out, 40),
                     -ENAMETOOLONG);
    kt_resolver_free(r);

    c.append_at_myorigin = 0;
    c.append_dot_mydomain = 1;
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), 0);
    assert_int_equal(kt_resolve_complete(r, "root", out, sizeof(out)), 0);
    assert_string_equal(out, "root");
    assert_int_equal(kt_resolve_complete(r, "a@host", out, sizeof(out)), 0);
    assert_string_equal(out, "a@host.example.com");
    assert_int_equal(kt_resolve_complete(r, "a@[192.0.2.1]", out, sizeof(out)), 0);
    assert_string_equal(out, "a@[192.0.2.1]");
    kt_resolver_free(r);

    /* myorigin defaults to myhostname */
    c = base_config();
    c.append_at_myorigin = 1;
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), 0);
    assert_int_equal(kt_resolve_complete(r, "daemon", out, sizeof(out)), 0);
    assert_string_equal(out, "daemon@mx.example.com");
    kt_resolver_free(r);

    /* default_privs must be an unprivileged known user */
    c.default_privs = "root";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "default_privs: root is a privileged user");
    c.default_privs = "nosuchuser";
    assert_int_equal(kt_resolver_new(&c, &r, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "default_privs: nosuchuser is not a known user");
}

static void test_threads(void **state)
{
    pthread_t t[4];
    void *bad;

    (void)state;
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, resolve_many, NULL), 0);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(t[i], &bad), 0);
        assert_null(bad);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_classes),
        cmocka_unit_test(test_local_users),
        cmocka_unit_test(test_alias_self_and_root),
        cmocka_unit_test(test_alias_lists),
        cmocka_unit_test(test_alias_loops_and_depth),
        cmocka_unit_test(test_alias_unsupported),
        cmocka_unit_test(test_alias_include),
        cmocka_unit_test(test_virtual),
        cmocka_unit_test(test_relay_default),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_complete),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
