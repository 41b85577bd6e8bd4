/* Unit tests for address rewriting (delivery/rewrite.c): Postfix's lookup order with recipient_delimiter,
 * "@domain" results, propagate_unmatched_extensions, canonical mapping and its classes, virtual alias
 * expansion (one-to-many, recursion, an address that expands to itself, loops and the two limits),
 * whole envelopes for local submission, and the recipient_delimiter split rules. Tables are inline:. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "delivery/resolve.h"
#include "delivery/rewrite.h"

static struct kt_resolver *resolver;

static int setup(void **state)
{
    const char *src = getenv("KT_TEST_SRCDIR");
    char *passwd = kt_asprintf("%s/tables/passwd", src ? src : ".");
    struct kt_resolve_config c = {
        .myhostname = "mx.example.com",
        .mydestination = "example.com",
        .virtual_mailbox_domains = "virtual.example",
        .alias_maps = "",
        .home_mailbox = "Maildir/",
        .passwd_file = passwd,
        .virtual_alias_domains = "alias.example",
        .recipient_delimiter = "+-",
    };
    char err[256];
    int rc = kt_resolver_new(&c, &resolver, err, sizeof(err));
    kt_free(passwd);
    (void)state;
    if (rc < 0)
        fprintf(stderr, "resolver: %s\n", err);
    return rc;
}

static int teardown(void **state)
{
    (void)state;
    kt_resolver_free(resolver);
    return 0;
}

static struct kt_rewrite *make(const char *valias, const char *canon, const char *propagate, long long exp_limit,
                               long long rec_limit)
{
    struct kt_rewrite_config c = {
        .virtual_alias_maps = valias,
        .canonical_maps = canon,
        .canonical_classes = "envelope_sender, envelope_recipient, header_sender, header_recipient",
        .sender_canonical_classes = "envelope_sender, header_sender",
        .recipient_canonical_classes = "envelope_recipient, header_recipient",
        .propagate_unmatched_extensions = propagate,
        .virtual_alias_expansion_limit = exp_limit,
        .virtual_alias_recursion_limit = rec_limit,
        .resolver = resolver,
    };
    struct kt_rewrite *rw = NULL;
    char err[256];
    assert_int_equal(kt_rewrite_new(&c, &rw, err, sizeof(err)), 0);
    return rw;
}

/* The expansion of addr as "a,b,c" (or "E<errno>"). */
static const char *expand(const struct kt_rewrite *rw, const char *addr)
{
    static char out[2048];
    struct kt_rewrite_result r;
    int rc = kt_rewrite_recipient(rw, "TESTID", addr, &r);
    if (rc < 0) {
        snprintf(out, sizeof(out), "E%d", -rc);
        return out;
    }
    out[0] = '\0';
    for (size_t i = 0; i < r.n; i++)
        snprintf(out + strlen(out), sizeof(out) - strlen(out), "%s%s", i ? "," : "", r.addrs[i]);
    kt_rewrite_result_free(&r);
    return out;
}

static void test_split(void **state)
{
    (void)state;
    assert_int_equal(kt_addr_unextended("+", "user+tag", 8), 4);
    assert_int_equal(kt_addr_unextended("+-", "user-tag+x", 10), 4);
    assert_int_equal(kt_addr_unextended("+", "user", 4), 4);
    assert_int_equal(kt_addr_unextended("", "user+tag", 8), 8);
    assert_int_equal(kt_addr_unextended("+", "+tag", 4), 4);        /* empty local part: no split */
    assert_int_equal(kt_addr_unextended("+", "user+", 5), 5);       /* empty extension: no split */
    assert_int_equal(kt_addr_unextended("-", "owner-list", 10), 10);
    assert_int_equal(kt_addr_unextended("-", "list-request", 12), 12);
    assert_int_equal(kt_addr_unextended("+", "owner+x", 7), 5);     /* the owner- rule is for '-' only */
    assert_int_equal(kt_addr_unextended("-", "mailer-daemon", 13), 13);
}

static void test_lookup_order(void **state)
{
    (void)state;
    struct kt_rewrite *rw = make("inline:{ { a+x@alias.example = full }, { a@alias.example = bare@virtual.example },"
                                 " { @alias.example = @virtual.example }, { root = admin@virtual.example },"
                                 " { Mixed@Alias.Example = mixed@virtual.example } }", "", "canonical, virtual",
                                 1000, 1000);
    assert_string_equal(expand(rw, "a+x@alias.example"), "full");
    /* unmatched extension propagated into the result */
    assert_string_equal(expand(rw, "a+y@alias.example"), "bare+y@virtual.example");
    /* @domain: the whole local part goes along */
    assert_string_equal(expand(rw, "zed+q@alias.example"), "zed+q@virtual.example");
    /* a bare user only for a local domain */
    assert_string_equal(expand(rw, "root@example.com"), "admin@virtual.example");
    assert_string_equal(expand(rw, "root@virtual.example"), "root@virtual.example");
    assert_string_equal(expand(rw, "MIXED@alias.EXAMPLE"), "mixed@virtual.example");
    kt_rewrite_free(rw);
    rw = make("inline:{ { a@alias.example = bare@virtual.example } }", "", "canonical", 1000, 1000);
    assert_string_equal(expand(rw, "a+y@alias.example"), "bare@virtual.example");
    kt_rewrite_free(rw);
}

static void test_expansion(void **state)
{
    (void)state;
    struct kt_rewrite *rw = make("inline:{ { team@alias.example = a@virtual.example, b@virtual.example, "
                                 "sub@alias.example }, { sub@alias.example = c@virtual.example, a@virtual.example },"
                                 " { keep@virtual.example = keep@virtual.example, x@virtual.example },"
                                 " { l1@alias.example = l2@alias.example }, { l2@alias.example = l1@alias.example },"
                                 " { big@alias.example = 1@v.example 2@v.example 3@v.example 4@v.example 5@v.example } }",
                                 "", "canonical, virtual", 4, 20);
    /* breadth as Postfix: the first result takes the slot, the others are appended; duplicates once (the
     * limit counts them: a, b, c, a) */
    assert_string_equal(expand(rw, "team@alias.example"), "a@virtual.example,b@virtual.example,c@virtual.example");
    assert_string_equal(expand(rw, "keep@virtual.example"), "keep@virtual.example,x@virtual.example");
    assert_string_equal(expand(rw, "l1@alias.example"), "E40");     /* ELOOP: recursion limit */
    assert_string_equal(expand(rw, "big@alias.example"), "E7");     /* E2BIG: expansion limit */
    assert_string_equal(expand(rw, "other@remote.example"), "other@remote.example");
    kt_rewrite_free(rw);
}

static void test_canonical(void **state)
{
    (void)state;
    struct kt_rewrite *rw = make("inline:{ { new@alias.example = final@virtual.example } }",
                                 "inline:{ { old@example.com = new@alias.example }, { @legacy.example = @example.com },"
                                 " { ping@x.example = pong@x.example }, { pong@x.example = ping@x.example } }",
                                 "canonical, virtual", 1000, 1000);
    /* canonical first, then the virtual alias of its result */
    assert_string_equal(expand(rw, "old@example.com"), "final@virtual.example");
    char out[512];
    assert_int_equal(kt_rewrite_sender(rw, "old@example.com", out, sizeof(out)), 1);
    assert_string_equal(out, "new@alias.example");     /* senders get no virtual aliasing */
    assert_int_equal(kt_rewrite_sender(rw, "bob@legacy.example", out, sizeof(out)), 1);
    assert_string_equal(out, "bob@example.com");
    assert_int_equal(kt_rewrite_sender(rw, "", out, sizeof(out)), 0);
    assert_string_equal(out, "");
    /* a canonical loop stops after ten lookups, with the address where it stopped (it did rewrite on the way,
     * as Postfix's did_rewrite says) */
    assert_int_equal(kt_rewrite_sender(rw, "ping@x.example", out, sizeof(out)), 1);
    assert_string_equal(out, "ping@x.example");
    kt_rewrite_free(rw);
}

static void test_envelope(void **state)
{
    (void)state;
    struct kt_rewrite *rw = make("inline:{ { team@alias.example = a@virtual.example, b@virtual.example },"
                                 " { l1@alias.example = l2@alias.example }, { l2@alias.example = l1@alias.example } }",
                                 "", "canonical, virtual", 1000, 10);
    const char *rcpts[] = { "team@alias.example", "b@virtual.example", "c@remote.example" };
    struct kt_rewrite_envelope e;
    const char *failed;
    assert_int_equal(kt_rewrite_envelope(rw, "ID", "s@example.com", rcpts, 3, &e, &failed), 0);
    assert_int_equal(e.n, 3);
    assert_string_equal(e.rcpts[0], "a@virtual.example");
    assert_string_equal(e.origs[0], "team@alias.example");
    assert_string_equal(e.rcpts[1], "b@virtual.example");
    assert_string_equal(e.origs[1], "team@alias.example");
    assert_string_equal(e.rcpts[2], "c@remote.example");
    assert_string_equal(e.origs[2], "c@remote.example");
    assert_string_equal(e.sender, "s@example.com");
    kt_rewrite_envelope_free(&e);
    const char *bad[] = { "c@remote.example", "l1@alias.example" };
    assert_int_equal(kt_rewrite_envelope(rw, "ID", "", bad, 2, &e, &failed), -ELOOP);
    assert_string_equal(failed, "l1@alias.example");
    /* no rewriter: the envelope as given */
    assert_int_equal(kt_rewrite_envelope(NULL, "ID", "s@example.com", rcpts, 1, &e, &failed), 0);
    assert_int_equal(e.n, 1);
    assert_string_equal(e.rcpts[0], "team@alias.example");
    kt_rewrite_envelope_free(&e);
    kt_rewrite_free(rw);
}

static void test_classes_and_delimiter_in_resolver(void **state)
{
    (void)state;
    assert_int_equal(kt_resolve_class(resolver, "alias.example"), KT_CLASS_ALIAS);
    assert_int_equal(kt_resolve_class(resolver, "example.com"), KT_CLASS_LOCAL);
    struct kt_resolve_result res;
    kt_resolve_recipient(resolver, "nobody@alias.example", &res);
    assert_string_equal(res.reply, "550 5.1.1 <nobody@alias.example>: Recipient address rejected: User unknown in "
                                   "virtual alias table");
    /* user+tag of a local user is that user */
    kt_resolve_recipient(resolver, "alice+tag@example.com", &res);
    assert_null(res.reply);
    assert_int_equal(res.n_mailboxes, 1);
    assert_string_equal(res.mailboxes[0].path, "/home/alice/Maildir/");
    kt_resolve_recipient(resolver, "alice-tag@example.com", &res);
    assert_null(res.reply);
    kt_resolve_recipient(resolver, "nosuch+tag@example.com", &res);
    assert_non_null(res.reply);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_lookup_order),
        cmocka_unit_test(test_expansion),
        cmocka_unit_test(test_canonical),
        cmocka_unit_test(test_envelope),
        cmocka_unit_test(test_classes_and_delimiter_in_resolver),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
