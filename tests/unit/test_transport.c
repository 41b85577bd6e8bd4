/* Transport selection (delivery/transport.c) as trivial-rewrite does it:
 * transport_maps before the class transports (address, domain, parent
 * domain, "*"), an entry without a transport or next hop filled from the
 * class, relayhost only where no next hop is named, lmtp next hops in their
 * forms, mailbox_transport, and every value ktrelay cannot run refused with
 * the parameter named first. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "delivery/transport.h"

static struct kt_transport *build(const struct kt_transport_config *c)
{
    struct kt_transport *t = NULL;
    char err[512];
    int rc = kt_transport_new(c, &t, err, sizeof(err));
    if (rc != 0)
        fail_msg("kt_transport_new: %s", err);
    return t;
}

static void expect(const struct kt_transport *t, const char *addr, enum kt_addr_class cls,
                   enum kt_transport_kind kind, const char *nexthop)
{
    struct kt_route r;
    kt_transport_route(t, addr, cls, &r);
    if (r.kind != kind || strcmp(r.nexthop, nexthop) != 0)
        fail_msg("%s: got kind %d \"%s\", want kind %d \"%s\"", addr, r.kind, r.nexthop, kind, nexthop);
}

static void test_defaults(void **state)
{
    struct kt_transport_config c = { .relayhost = "" };
    struct kt_transport *t = build(&c);
    expect(t, "bob@localhost", KT_CLASS_LOCAL, KT_XPORT_MAILDIR, "");
    expect(t, "alice@example.test", KT_CLASS_VIRTUAL, KT_XPORT_MAILDIR, "");
    expect(t, "x@Relay.Test", KT_CLASS_RELAY, KT_XPORT_SMTP, "relay.test");
    expect(t, "x@remote.test", KT_CLASS_DEFAULT, KT_XPORT_SMTP, "remote.test");
    assert_int_equal(kt_transport_queued(t, "alice@example.test", KT_CLASS_VIRTUAL), 0);
    struct kt_route r;
    assert_int_equal(kt_transport_mailbox(t, &r), 0);
    kt_transport_free(t);
}

static void test_class_transports_and_relayhost(void **state)
{
    struct kt_transport_config c = {
        .local_transport = "lmtp:inet:[127.0.0.1]:2424", .virtual_transport = "lmtp:unix:private/dovecot-lmtp",
        .relay_transport = "relay", .default_transport = "smtp:[10.0.0.1]:25", .relayhost = "[192.0.2.1]:587",
    };
    struct kt_transport *t = build(&c);
    expect(t, "bob@localhost", KT_CLASS_LOCAL, KT_XPORT_LMTP, "inet:[127.0.0.1]:2424");
    expect(t, "alice@example.test", KT_CLASS_VIRTUAL, KT_XPORT_LMTP, "unix:private/dovecot-lmtp");
    expect(t, "x@relay.test", KT_CLASS_RELAY, KT_XPORT_SMTP, "[192.0.2.1]:587");     /* relayhost */
    expect(t, "x@remote.test", KT_CLASS_DEFAULT, KT_XPORT_SMTP, "[10.0.0.1]:25");    /* named: no relayhost */
    assert_int_equal(kt_transport_queued(t, "alice@example.test", KT_CLASS_VIRTUAL), 1);
    assert_int_equal(kt_transport_queued(t, "bob@localhost", KT_CLASS_LOCAL), 1);
    kt_transport_free(t);
}

static void test_transport_maps_order(void **state)
{
    struct kt_transport_config c = {
        .relayhost = "[192.0.2.1]",
        .transport_maps = "inline:{ alice@example.test=lmtp:h1:24, example.test=lmtp:inet:h2, "
                          ".sub.test=error:no_such_place, *=smtp:, other.test=:[10.1.1.1], "
                          "lm.test=lmtp, local.test=local }",
    };
    struct kt_transport *t = build(&c);
    expect(t, "Alice@Example.Test", KT_CLASS_VIRTUAL, KT_XPORT_LMTP, "inet:h1:24");      /* the address */
    expect(t, "bob@example.test", KT_CLASS_VIRTUAL, KT_XPORT_LMTP, "inet:h2");           /* the domain */
    expect(t, "x@a.b.sub.test", KT_CLASS_DEFAULT, KT_XPORT_ERROR, "no_such_place");     /* a parent */
    expect(t, "x@remote.test", KT_CLASS_DEFAULT, KT_XPORT_SMTP, "[192.0.2.1]");          /* "*", relayhost */
    expect(t, "x@other.test", KT_CLASS_DEFAULT, KT_XPORT_SMTP, "[10.1.1.1]");            /* class's smtp */
    expect(t, "x@lm.test", KT_CLASS_DEFAULT, KT_XPORT_LMTP, "inet:lm.test");             /* the domain */
    expect(t, "x@local.test", KT_CLASS_DEFAULT, KT_XPORT_MAILDIR, "");
    assert_int_equal(kt_transport_queued(t, "bob@example.test", KT_CLASS_VIRTUAL), 1);
    kt_transport_free(t);
}

static void test_mailbox_transport(void **state)
{
    struct kt_transport_config c = { .mailbox_transport = "lmtp:unix:/run/dovecot/lmtp" };
    struct kt_transport *t = build(&c);
    struct kt_route r;
    assert_int_equal(kt_transport_mailbox(t, &r), 1);
    assert_int_equal(r.kind, KT_XPORT_LMTP);
    assert_string_equal(r.nexthop, "unix:/run/dovecot/lmtp");
    /* local(8) runs in the queue manager then; virtual recipients are not local(8)'s */
    assert_int_equal(kt_transport_queued(t, "bob@localhost", KT_CLASS_LOCAL), 1);
    assert_int_equal(kt_transport_queued(t, "alice@example.test", KT_CLASS_VIRTUAL), 0);
    kt_transport_free(t);
}

static void test_refused(void **state)
{
    static const struct {
        struct kt_transport_config c;
        const char *err;
    } cases[] = {
        { { .virtual_transport = "dovecot" }, "virtual_transport: bad value \"dovecot\": ktrelay runs the local, "
                                              "virtual, smtp, relay, lmtp and error transports only" },
        { { .local_transport = ":[10.0.0.1]" }, "local_transport: bad value \":[10.0.0.1]\": names no transport" },
        { { .default_transport = "lmtp:unix:" }, "default_transport: bad value \"lmtp:unix:\": unix: needs a socket path" },
        { { .relay_transport = "lmtp:inet:[::1" }, "relay_transport: bad value \"lmtp:inet:[::1\": expected [host] or [host]:port" },
        { { .virtual_transport = "lmtp:::1:24" }, "virtual_transport: bad value \"lmtp:::1:24\": expected host or "
                                                  "host:port (an IPv6 address goes in brackets)" },
        { { .virtual_transport = "lmtp:host:0" }, "virtual_transport: bad value \"lmtp:host:0\": expected host or "
                                                  "host:port (an IPv6 address goes in brackets)" },
        { { .mailbox_transport = "lmtp" }, "mailbox_transport: bad value \"lmtp\": ktrelay hands local(8) mailbox "
                                           "deliveries only to lmtp:NEXTHOP" },
        { { .mailbox_transport = "smtp:[10.0.0.1]" }, "mailbox_transport: bad value \"smtp:[10.0.0.1]\": ktrelay "
                                                      "hands local(8) mailbox deliveries only to lmtp:NEXTHOP" },
        { { .transport_maps = "inline:{ a.test=pipe:flags=R }" }, "transport_maps: a.test: bad value \"pipe:flags=R\": "
                                                                  "ktrelay runs the local, virtual, smtp, relay, lmtp and error transports only" },
        { { .transport_maps = "inline:{ a.test=lmtp:inet:h:x }" }, "transport_maps: a.test: bad value \"lmtp:inet:h:x\": "
                                                                   "expected host or host:port (an IPv6 address goes in brackets)" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct kt_transport *t = (struct kt_transport *)1;
        char err[512] = "";
        assert_int_equal(kt_transport_new(&cases[i].c, &t, err, sizeof(err)), -EINVAL);
        assert_null(t);
        assert_string_equal(err, cases[i].err);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_class_transports_and_relayhost),
        cmocka_unit_test(test_transport_maps_order),
        cmocka_unit_test(test_mailbox_transport),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
