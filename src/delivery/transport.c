/* Transport selection (see transport.h).
 *
 * A transport value is "name[:nexthop]" as in transport(5). The class
 * transports are parsed once here; transport_maps values are parsed at each
 * lookup, after every entry was checked once when the table was built, so a
 * bad entry fails the configuration instead of deferring mail later. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/log.h"
#include "core/table.h"
#include "delivery/transport.h"

struct xport {
    enum kt_transport_kind kind;
    char nexthop[512];
};

struct kt_transport {
    struct xport local, virt, relay, dflt;
    struct xport mbox;             /* mailbox_transport */
    int has_mbox;
    char *relayhost;
    struct kt_maps *maps;
};

static void lower_into(char *dst, size_t len, const char *src)
{
    size_t i = 0;
    for (; src[i] && i + 1 < len; i++)
        dst[i] = (src[i] >= 'A' && src[i] <= 'Z') ? (char)(src[i] + 32) : src[i];
    dst[i] = 0;
}

/* "1".."65535" */
static int port_ok(const char *s)
{
    char *end;
    if (!*s)
        return 0;
    long v = strtol(s, &end, 10);
    return *end == 0 && v > 0 && v <= 65535;
}

/* lmtp(8) destinations: unix:PATH, inet:HOST, inet:HOST:PORT, inet:[HOST], inet:[HOST]:PORT, and the same
 * without "inet:". Written as "unix:PATH" or "inet:..." into out. 0 or -EINVAL with why set. */
static int lmtp_nexthop(const char *nh, char *out, size_t len, const char **why)
{
    if (!strncmp(nh, "unix:", 5)) {
        if (!nh[5]) {
            *why = "unix: needs a socket path";
            return -EINVAL;
        }
        if ((size_t)snprintf(out, len, "%s", nh) >= len || strlen(nh + 5) >= 108) {
            *why = "socket path too long";
            return -EINVAL;
        }
        return 0;
    }
    const char *rest = !strncmp(nh, "inet:", 5) ? nh + 5 : nh;
    if (!*rest) {
        *why = "inet: needs a host";
        return -EINVAL;
    }
    if (rest[0] == '[') {
        const char *end = strchr(rest, ']');
        if (!end || end == rest + 1 || (end[1] && (end[1] != ':' || !port_ok(end + 2)))) {
            *why = "expected [host] or [host]:port";
            return -EINVAL;
        }
    } else {
        const char *colon = strchr(rest, ':');
        if (colon && (strchr(colon + 1, ':') || colon == rest || !port_ok(colon + 1))) {
            *why = "expected host or host:port (an IPv6 address goes in brackets)";
            return -EINVAL;
        }
    }
    if ((size_t)snprintf(out, len, "inet:%s", rest) >= len) {
        *why = "next hop too long";
        return -EINVAL;
    }
    return 0;
}

/* Parse "name[:nexthop]". name_len 0 (":nexthop") leaves x->kind alone (the class's transport).
 * 0, or -ENOENT (a transport ktrelay does not run) / -EINVAL (a bad next hop) with why set. */
static int parse_xport(const char *v, struct xport *x, const char **why)
{
    const char *colon = strchr(v, ':');
    size_t n = colon ? (size_t)(colon - v) : strlen(v);
    const char *nh = colon ? colon + 1 : "";
    x->nexthop[0] = 0;
    if (n == 0) {
        /* keep the class's transport, take this next hop */
    } else if ((n == 5 && !strncmp(v, "local", 5)) || (n == 7 && !strncmp(v, "virtual", 7))) {
        x->kind = KT_XPORT_MAILDIR;
        return 0;   /* local:$myhostname: the next hop means nothing to a Maildir delivery */
    } else if ((n == 4 && !strncmp(v, "smtp", 4)) || (n == 5 && !strncmp(v, "relay", 5))) {
        x->kind = KT_XPORT_SMTP;
    } else if (n == 4 && !strncmp(v, "lmtp", 4)) {
        x->kind = KT_XPORT_LMTP;
    } else if (n == 5 && !strncmp(v, "error", 5)) {
        x->kind = KT_XPORT_ERROR;
    } else {
        *why = "ktrelay runs the local, virtual, smtp, relay, lmtp and error transports only";
        return -ENOENT;
    }
    if (x->kind == KT_XPORT_LMTP && *nh)
        return lmtp_nexthop(nh, x->nexthop, sizeof(x->nexthop), why);
    if ((size_t)snprintf(x->nexthop, sizeof(x->nexthop), "%s", nh) >= sizeof(x->nexthop)) {
        *why = "next hop too long";
        return -EINVAL;
    }
    return 0;
}

struct check_ctx {
    char *err;
    size_t errlen;
    int rc;
};

static int check_entry(const char *key, const char *value, void *arg)
{
    struct check_ctx *cx = arg;
    struct xport x = { KT_XPORT_SMTP, "" };
    const char *why = NULL;
    if (parse_xport(value, &x, &why) < 0) {
        kt_set_err(cx->err, cx->errlen, "transport_maps: %s: bad value \"%s\": %s", key, value, why);
        cx->rc = -EINVAL;
        return 1;
    }
    return 0;
}

static int class_xport(const char *param, const char *value, const char *dflt, struct xport *x, char *err,
                       size_t errlen)
{
    const char *why = NULL;
    const char *v = value && *value ? value : dflt;
    x->kind = KT_XPORT_SMTP;
    int rc = parse_xport(v, x, &why);
    if (rc == 0 && v[0] == ':') {
        why = "names no transport";
        rc = -EINVAL;
    }
    if (rc < 0)
        kt_set_err(err, errlen, "%s: bad value \"%s\": %s", param, v, why);
    return rc < 0 ? -EINVAL : 0;
}

int kt_transport_new(const struct kt_transport_config *c, struct kt_transport **out, char *err, size_t errlen)
{
    struct kt_transport *t = kt_calloc(1, sizeof(*t));
    int rc = class_xport("local_transport", c->local_transport, "local", &t->local, err, errlen);
    if (rc == 0)
        rc = class_xport("virtual_transport", c->virtual_transport, "virtual", &t->virt, err, errlen);
    if (rc == 0)
        rc = class_xport("relay_transport", c->relay_transport, "relay", &t->relay, err, errlen);
    if (rc == 0)
        rc = class_xport("default_transport", c->default_transport, "smtp", &t->dflt, err, errlen);
    if (rc == 0 && c->mailbox_transport && *c->mailbox_transport) {
        const char *why = NULL;
        t->mbox.kind = KT_XPORT_SMTP;
        rc = parse_xport(c->mailbox_transport, &t->mbox, &why);
        if (rc == 0 && (t->mbox.kind != KT_XPORT_LMTP || !t->mbox.nexthop[0])) {
            why = "ktrelay hands local(8) mailbox deliveries only to lmtp:NEXTHOP";
            rc = -EINVAL;
        }
        if (rc < 0) {
            kt_set_err(err, errlen, "mailbox_transport: bad value \"%s\": %s", c->mailbox_transport, why);
            rc = -EINVAL;
        }
        t->has_mbox = rc == 0;
    }
    if (rc == 0 && c->transport_maps && *c->transport_maps) {
        char why[400];
        rc = kt_maps_open(c->transport_maps, KT_TABLE_MAP, &t->maps, why, sizeof(why));
        if (rc < 0) {
            kt_set_err(err, errlen, "transport_maps: %s", why);
        } else {
            struct check_ctx cx = { err, errlen, 0 };
            kt_maps_foreach(t->maps, check_entry, &cx);
            rc = cx.rc;
        }
    }
    t->relayhost = kt_strdup(c->relayhost ? c->relayhost : "");
    if (rc < 0) {
        kt_transport_free(t);
        *out = NULL;
        return rc;
    }
    *out = t;
    return 0;
}

void kt_transport_free(struct kt_transport *t)
{
    if (!t)
        return;
    kt_maps_free(t->maps);
    kt_free(t->relayhost);
    kt_free(t);
}

/* transport(5) lookup order: the address, the domain, each parent ".domain", then "*". */
static const char *maps_lookup(const struct kt_maps *m, const char *addr, const char *domain)
{
    const char *v;
    if (!m)
        return NULL;
    if ((v = kt_maps_get(m, addr)))
        return v;
    if (*domain && (v = kt_maps_get(m, domain)))
        return v;
    for (const char *p = domain; (p = strchr(p, '.')); p++)
        if ((v = kt_maps_get(m, p)))
            return v;
    return kt_maps_get(m, "*");
}

/* The route of addr (lowercased a, its domain) of class cls; v: the transport_maps (or FILTER) value,
 * or NULL for the class's transport. */
static void route_with(const struct kt_transport *t, const char *domain, enum kt_addr_class cls, const char *v,
                       struct kt_route *out)
{
    const struct xport *base = cls == KT_CLASS_LOCAL ? &t->local : cls == KT_CLASS_VIRTUAL ? &t->virt
                             : cls == KT_CLASS_RELAY ? &t->relay : &t->dflt;
    struct xport x = *base;
    if (v && *v) {
        const char *why;
        x.kind = base->kind;
        if (parse_xport(v, &x, &why) < 0) {
            out->kind = KT_XPORT_UNAVAILABLE;
            snprintf(out->nexthop, sizeof(out->nexthop), "%s", why);
            return;
        }
        if (!x.nexthop[0])
            snprintf(x.nexthop, sizeof(x.nexthop), "%s", base->kind == x.kind ? base->nexthop : "");
    }
    out->kind = x.kind;
    int n = 0;
    if (x.nexthop[0])
        n = snprintf(out->nexthop, sizeof(out->nexthop), "%s", x.nexthop);
    else if (x.kind == KT_XPORT_SMTP)
        /* relayhost: the next hop of non-local mail (Postfix applies it to the relay and default classes;
         * local and virtual mail reaches smtp only through transport_maps or the class transports) */
        n = snprintf(out->nexthop, sizeof(out->nexthop), "%s", *t->relayhost ? t->relayhost : domain);
    else if (x.kind == KT_XPORT_LMTP)
        n = snprintf(out->nexthop, sizeof(out->nexthop), "inet:%s", domain);
    else if (x.kind == KT_XPORT_ERROR)
        n = snprintf(out->nexthop, sizeof(out->nexthop), "%s", "mail for this domain is refused");
    else
        out->nexthop[0] = 0;
    if (n < 0 || (size_t)n >= sizeof(out->nexthop))
        out->kind = KT_XPORT_UNAVAILABLE;
}

void kt_transport_route(const struct kt_transport *t, const char *addr, enum kt_addr_class cls, struct kt_route *out)
{
    char a[512];
    lower_into(a, sizeof(a), addr);
    const char *at = strrchr(a, '@');
    const char *domain = at ? at + 1 : "";
    route_with(t, domain, cls, maps_lookup(t->maps, a, domain), out);
}

void kt_transport_route_as(const struct kt_transport *t, const char *value, const char *addr, enum kt_addr_class cls,
                           struct kt_route *out)
{
    char a[512];
    lower_into(a, sizeof(a), addr);
    const char *at = strrchr(a, '@');
    route_with(t, at ? at + 1 : "", cls, value, out);
}

int kt_transport_mailbox(const struct kt_transport *t, struct kt_route *out)
{
    if (!t || !t->has_mbox)
        return 0;
    out->kind = t->mbox.kind;
    snprintf(out->nexthop, sizeof(out->nexthop), "%s", t->mbox.nexthop);
    return 1;
}

int kt_transport_queued(const struct kt_transport *t, const char *addr, enum kt_addr_class cls)
{
    struct kt_route r;
    if (!t)
        return 0;
    kt_transport_route(t, addr, cls, &r);
    /* local(8) with a mailbox_transport runs in the queue manager */
    return r.kind != KT_XPORT_MAILDIR || (cls == KT_CLASS_LOCAL && t->has_mbox);
}
