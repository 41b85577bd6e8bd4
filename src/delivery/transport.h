/* Transport selection, as Postfix's trivial-rewrite(8) does it for a
 * recipient: transport_maps first (the address, the domain, each parent
 * ".domain", then "*"), else the transport of the recipient's address class
 * (local_transport, virtual_transport, relay_transport, default_transport),
 * with relayhost as the next hop of non-local mail when none is named. Built
 * once per configuration generation from main.cf strings, then shared
 * read-only: routing never blocks, allocates or locks.
 *
 * ktrelay runs these transports itself: local and virtual (its Maildir
 * delivery), smtp and relay (its SMTP client), lmtp (the same client in LMTP
 * mode, RFC 2033) and error. A parameter naming any other transport is
 * refused when the table is built, and so is a transport_maps entry naming
 * one. mailbox_transport (local(8) hands each local user's mailbox delivery
 * to it after alias expansion) takes only lmtp:NEXTHOP. */
#ifndef KTRELAY_TRANSPORT_H
#define KTRELAY_TRANSPORT_H

#include <stddef.h>

#include "delivery/resolve.h"

/* main.cf values after $name expansion; NULL or "" = Postfix's default */
struct kt_transport_config {
    const char *local_transport;    /* "local:$myhostname" */
    const char *virtual_transport;  /* "virtual" */
    const char *relay_transport;    /* "relay" */
    const char *default_transport;  /* "smtp" */
    const char *relayhost;          /* next hop of relay and default mail without one; "" = the domain */
    const char *transport_maps;     /* "" = none */
    const char *mailbox_transport;  /* "" = local(8) writes the Maildir; else lmtp:NEXTHOP */
};

enum kt_transport_kind {
    KT_XPORT_MAILDIR,       /* local or virtual: ktrelay's own Maildir delivery */
    KT_XPORT_SMTP,          /* smtp or relay: nexthop "[host]:port", "host:port" or "host" */
    KT_XPORT_LMTP,          /* lmtp: nexthop "unix:PATH" (relative: below queue_directory) or "inet:HOST[:PORT]" */
    KT_XPORT_ERROR,         /* error: nexthop is the reason text */
    KT_XPORT_UNAVAILABLE,   /* a transport_maps entry naming a transport ktrelay does not run */
};

struct kt_route {
    enum kt_transport_kind kind;
    char nexthop[512];
};

struct kt_transport;

/* 0, or -EINVAL/-ENOENT with "PARAMETER: why" in err (the parameter first, so a caller can point at
 * its main.cf line) for a transport ktrelay does not run or an lmtp next hop it cannot parse. */
int kt_transport_new(const struct kt_transport_config *c, struct kt_transport **out, char *err, size_t errlen);
/* NULL is fine. */
void kt_transport_free(struct kt_transport *t);
/* The route of addr (an envelope recipient, any case) of class cls. Never fails: a next hop that does not
 * fit in out->nexthop makes the route KT_XPORT_UNAVAILABLE. */
void kt_transport_route(const struct kt_transport *t, const char *addr, enum kt_addr_class cls, struct kt_route *out);
/* The route of addr when value ("transport:nexthop", as a transport_maps result: a content filter's FILTER
 * action) takes the place of the lookup; an empty transport or next hop is filled in as for a table entry.
 * A value ktrelay cannot run gives KT_XPORT_UNAVAILABLE. */
void kt_transport_route_as(const struct kt_transport *t, const char *value, const char *addr, enum kt_addr_class cls,
                           struct kt_route *out);
/* local(8)'s mailbox_transport: 1 with *out (an lmtp: route) when the mailbox deliveries of local users go
 * to another transport after alias expansion, 0 when local(8) writes their Maildirs. */
int kt_transport_mailbox(const struct kt_transport *t, struct kt_route *out);
/* 1 when a recipient of class cls in addr's domain leaves the SMTP session through the queue (anything but
 * the Maildir delivery), so the session must not deliver it itself. */
int kt_transport_queued(const struct kt_transport *t, const char *addr, enum kt_addr_class cls);

#endif
