/* SMTP relay control like Postfix's smtpd_check: recipient rewriting as
 * trivial-rewrite(8) does it, and the five smtpd_*_restrictions lists,
 * evaluated at RCPT time (smtpd_delay_reject = yes). Guarantees: an address
 * whose real destination is remote, or uncertain because it carries
 * sender-specified routing (percent hack, bang path, '@' in a quoted local
 * part, source route), is never an authorized destination; a policy that
 * could relay for anybody is refused at load. Checks never block or allocate
 * beyond the stack. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "conf/config.h"
#include "core/alloc.h"
#include "core/log.h"
#include "smtpd/policy.h"
#include "core/table.h"
#include "smtpd/smtp_parse.h"

/* ---- address rewriting ---- */

/* Position of the last (or first) c outside double quotes, or -1. */
static long find_unquoted(const char *s, char c, int last)
{
    long pos = -1;
    int q = 0;
    for (long i = 0; s[i]; i++) {
        if (q && s[i] == '\\' && s[i + 1]) {
            i++;
            continue;
        }
        if (s[i] == '"')
            q = !q;
        else if (!q && s[i] == c) {
            pos = i;
            if (!last)
                break;
        }
    }
    return pos;
}

static void dequote(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    int q = 0;
    for (size_t i = 0; in[i] && o + 1 < outlen; i++) {
        if (in[i] == '"') {
            q = !q;
            continue;
        }
        if (q && in[i] == '\\' && in[i + 1])
            i++;
        out[o++] = in[i];
    }
    out[o] = '\0';
}

void kt_addr_resolve(const struct kt_resolver *r, unsigned flags, const char *addr, int had_route,
                     struct kt_resolved_addr *out)
{
    char *a = out->addr;
    char tmp[sizeof(out->addr)];

    if (flags & KT_ADDR_DEQUOTE)
        dequote(addr, a, sizeof(out->addr));
    else
        snprintf(a, sizeof(out->addr), "%s", addr);
    out->routed = had_route;
    out->rewritten = 0;
    out->cls = KT_CLASS_LOCAL;
    /* bounded: every round removes a domain or an operator */
    for (int round = 0; round < 16; round++) {
        long at = find_unquoted(a, '@', 1);
        if (at >= 0 && kt_resolve_complete(r, a, tmp, sizeof(tmp)) == 0 && strcmp(tmp, a) != 0) {
            /* append_dot_mydomain: "user@host" is user@host.$mydomain */
            snprintf(a, sizeof(out->addr), "%s", tmp);
            out->rewritten = 1;
        }
        size_t local_len = at >= 0 ? (size_t)at : strlen(a);
        out->cls = kt_resolve_class(r, at >= 0 ? a + at + 1 : NULL);
        memcpy(tmp, a, local_len);
        tmp[local_len] = '\0';
        long inner_at = find_unquoted(tmp, '@', 1);
        long pct = flags & KT_ADDR_PERCENT_HACK ? find_unquoted(tmp, '%', 1) : -1;
        long bang = flags & KT_ADDR_SWAP_BANGPATH ? find_unquoted(tmp, '!', 0) : -1;
        if (out->cls != KT_CLASS_LOCAL) {
            /* a remote or virtual domain: whatever routing is left in the local part is the sender's */
            if (inner_at >= 0 || pct >= 0 || bang >= 0)
                out->routed = 1;
            return;
        }
        if (inner_at >= 0) {
            snprintf(a, sizeof(out->addr), "%s", tmp);
        } else if (pct >= 0) {
            tmp[pct] = '@';
            snprintf(a, sizeof(out->addr), "%s", tmp);
        } else if (bang >= 0) {
            /* "host!user" has the same length as "user@host" */
            size_t hlen = (size_t)bang, ulen = local_len - hlen - 1;
            memcpy(a, tmp + bang + 1, ulen);
            a[ulen] = '@';
            memcpy(a + ulen + 1, tmp, hlen);
            a[local_len] = '\0';
        } else if (at < 0) {
            /* trivial-rewrite's order: operators first, then a bare local part gets @$myorigin
             * (append_at_myorigin) and is looked at again */
            if (kt_resolve_complete(r, tmp, a, sizeof(out->addr)) < 0 || strchr(a, '@') == NULL) {
                snprintf(a, sizeof(out->addr), "%s", tmp);
                return;   /* no completion: a local address without a domain */
            }
        } else {
            return;   /* a plain local address */
        }
        out->rewritten = 1;
    }
    out->routed = 1;   /* routing nested beyond reason */
}

/* ---- restriction lists ---- */

enum rtype {
    R_PERMIT, R_REJECT, R_DEFER, R_PERMIT_MYNETWORKS, R_PERMIT_SASL, R_REJECT_UNAUTH_DEST, R_DEFER_UNAUTH_DEST,
    R_PERMIT_AUTH_DEST, R_REJECT_UNAUTH_PIPELINING, R_NON_FQDN_SENDER, R_NON_FQDN_RCPT, R_NON_FQDN_HELO,
    R_UNLISTED_RCPT, R_UNLISTED_SENDER, R_LOGIN_MISMATCH, R_AUTH_LOGIN_MISMATCH, R_UNAUTH_LOGIN_MISMATCH,
    R_INVALID_HELO, R_UNKNOWN_CLIENT, R_UNKNOWN_REVERSE_CLIENT, R_UNKNOWN_HELO, R_UNKNOWN_SENDER_DOMAIN,
    R_PERMIT_TLS_CLIENTCERTS, R_PERMIT_TLS_ALL_CLIENTCERTS,
    R_CHECK_CLIENT, R_CHECK_HELO, R_CHECK_SENDER, R_CHECK_RCPT,
    /* DNS lists: one "domain[=filter]" argument */
    R_RBL_CLIENT, R_RHSBL_CLIENT, R_RHSBL_REVERSE_CLIENT, R_RHSBL_SENDER, R_RHSBL_HELO, R_DNSWL_CLIENT,
};

static const struct {
    const char *name;
    enum rtype type;
} rnames[] = {
    { "permit", R_PERMIT },
    { "reject", R_REJECT },
    { "defer", R_DEFER },
    { "permit_mynetworks", R_PERMIT_MYNETWORKS },
    { "permit_sasl_authenticated", R_PERMIT_SASL },
    { "reject_unauth_destination", R_REJECT_UNAUTH_DEST },
    { "defer_unauth_destination", R_DEFER_UNAUTH_DEST },
    { "permit_auth_destination", R_PERMIT_AUTH_DEST },
    { "reject_unauth_pipelining", R_REJECT_UNAUTH_PIPELINING },
    { "reject_non_fqdn_sender", R_NON_FQDN_SENDER },
    { "reject_non_fqdn_recipient", R_NON_FQDN_RCPT },
    { "reject_non_fqdn_helo_hostname", R_NON_FQDN_HELO },
    { "reject_non_fqdn_hostname", R_NON_FQDN_HELO },
    { "reject_invalid_helo_hostname", R_INVALID_HELO },
    { "reject_invalid_hostname", R_INVALID_HELO },
    { "reject_unlisted_recipient", R_UNLISTED_RCPT },
    { "reject_unlisted_sender", R_UNLISTED_SENDER },
    { "reject_sender_login_mismatch", R_LOGIN_MISMATCH },
    { "reject_authenticated_sender_login_mismatch", R_AUTH_LOGIN_MISMATCH },
    { "reject_unauthenticated_sender_login_mismatch", R_UNAUTH_LOGIN_MISMATCH },
    { "reject_unknown_client_hostname", R_UNKNOWN_CLIENT },
    { "reject_unknown_client", R_UNKNOWN_CLIENT },
    { "reject_unknown_reverse_client_hostname", R_UNKNOWN_REVERSE_CLIENT },
    { "reject_unknown_helo_hostname", R_UNKNOWN_HELO },
    { "reject_unknown_hostname", R_UNKNOWN_HELO },
    { "reject_unknown_sender_domain", R_UNKNOWN_SENDER_DOMAIN },
    { "reject_rbl_client", R_RBL_CLIENT },
    { "reject_rhsbl_client", R_RHSBL_CLIENT },
    { "reject_rhsbl_reverse_client", R_RHSBL_REVERSE_CLIENT },
    { "reject_rhsbl_sender", R_RHSBL_SENDER },
    { "reject_rhsbl_helo", R_RHSBL_HELO },
    { "permit_dnswl_client", R_DNSWL_CLIENT },
    { "permit_tls_clientcerts", R_PERMIT_TLS_CLIENTCERTS },
    { "permit_tls_all_clientcerts", R_PERMIT_TLS_ALL_CLIENTCERTS },
    { "check_client_access", R_CHECK_CLIENT },
    { "check_helo_access", R_CHECK_HELO },
    { "check_sender_access", R_CHECK_SENDER },
    { "check_recipient_access", R_CHECK_RCPT },
};

struct restriction {
    enum rtype type;
    struct kt_table *table;   /* check_*_access */
    char *zone;               /* DNS lists: the list's domain */
    char *filter;             /* DNS lists: "127.0.0.[2..4]" from "=127.0.0.[2..4]", or NULL */
};

struct rlist {
    struct restriction *v;
    size_t n;
};

enum { L_CLIENT, L_HELO, L_SENDER, L_RELAY, L_RCPT, L_COUNT };

static const char *const list_param[L_COUNT] = { "smtpd_client_restrictions", "smtpd_helo_restrictions",
                                                 "smtpd_sender_restrictions", "smtpd_relay_restrictions",
                                                 "smtpd_recipient_restrictions" };

struct kt_policy {
    struct rlist lists[L_COUNT];
    struct kt_maps *login_maps;
    struct kt_maps *relay_ccerts;    /* relay_clientcerts */
    int reject_unlisted_sender;
    unsigned addr_flags;
    const struct kt_resolver *resolver;
    const struct kt_net_list *mynetworks;
    struct kt_maps *rbl_reply_maps;
};

static int rtype_find(const char *name, size_t len, enum rtype *t)
{
    for (size_t i = 0; i < sizeof(rnames) / sizeof(rnames[0]); i++)
        if (strlen(rnames[i].name) == len && strncasecmp(rnames[i].name, name, len) == 0) {
            *t = rnames[i].type;
            return 0;
        }
    return -1;
}

/* ---- DNS list result filters: "127.0.0.2", "127.0.0.[2..4]", "127.0.[0..255].[2;3;10..12]" ---- */

/* Does one octet pattern (a number, or [items] of N and N..M separated by ';') match v? -1 if malformed. */
static int octet_match(const char *pat, size_t len, int v)
{
    char buf[128];
    if (len == 0 || len >= sizeof(buf))
        return -1;
    memcpy(buf, pat, len);
    buf[len] = '\0';
    char *body = buf;
    if (buf[0] == '[') {
        if (buf[len - 1] != ']')
            return -1;
        buf[len - 1] = '\0';
        body = buf + 1;
    }
    int hit = 0, items = 0;
    char *save = NULL;
    for (char *it = strtok_r(body, ";", &save); it; it = strtok_r(NULL, ";", &save)) {
        char *e1, *e2;
        long lo = strtol(it, &e1, 10), hi = lo;
        if (e1 == it)
            return -1;
        if (e1[0] == '.' && e1[1] == '.') {
            if (body == buf)
                return -1;   /* ranges only inside brackets */
            hi = strtol(e1 + 2, &e2, 10);
            if (e2 == e1 + 2)
                return -1;
            e1 = e2;
        }
        if (*e1 || lo < 0 || hi > 255 || lo > hi)
            return -1;
        if (body == buf && items)
            return -1;
        items++;
        if (v >= lo && v <= hi)
            hit = 1;
    }
    return items ? hit : -1;
}

/* 1 if addr ("127.0.0.2") matches filter, 0 if not, -1 if the filter is malformed. */
static int filter_match(const char *filter, const char *addr)
{
    unsigned char a[4];
    if (inet_pton(AF_INET, addr, a) != 1)
        return 0;
    const char *p = filter;
    int result = 1;
    for (int i = 0; i < 4; i++) {
        const char *end = p;
        int depth = 0;
        /* outside brackets every '.' separates octets; inside, ".." makes a range */
        while (*end && (depth || *end != '.')) {
            if (*end == '[')
                depth++;
            else if (*end == ']')
                depth--;
            end++;
        }
        int m = octet_match(p, (size_t)(end - p), a[i]);
        if (m < 0)
            return -1;
        if (!m)
            result = 0;   /* keep going: the rest must still be well-formed */
        if (i < 3 && *end != '.')
            return -1;
        if (i == 3 && *end)
            return -1;
        p = end + 1;
    }
    return result;
}

static int filter_valid(const char *filter)
{
    return filter_match(filter, "0.0.0.0") >= 0;
}

/* Next list element: separated by commas and white space, "{...}" kept whole. */
static const char *next_token(const char *p, size_t *len)
{
    while (*p && (*p == ',' || isspace((unsigned char)*p)))
        p++;
    if (!*p)
        return NULL;
    const char *s = p;
    int depth = 0;
    while (*p && (depth || (*p != ',' && !isspace((unsigned char)*p)))) {
        if (*p == '{')
            depth++;
        else if (*p == '}' && depth)
            depth--;
        p++;
    }
    *len = (size_t)(p - s);
    return s;
}

static int parse_list(const char *param, const char *text, struct rlist *l, char *err, size_t errlen)
{
    const char *p = text ? text : "";
    size_t len;
    const char *tok;

    while ((tok = next_token(p, &len)) != NULL) {
        p = tok + len;
        struct restriction res = { 0 };
        if (rtype_find(tok, len, &res.type) < 0) {
            const char *names[sizeof(rnames) / sizeof(rnames[0])];
            for (size_t i = 0; i < sizeof(rnames) / sizeof(rnames[0]); i++)
                names[i] = rnames[i].name;
            const char *near = kt_closest(tok, len, names, sizeof(rnames) / sizeof(rnames[0]));
            snprintf(err, errlen, "%s: unknown restriction \"%.*s\"%s%s%s", param, (int)len, tok,
                     near ? " (did you mean " : "", near ? near : "", near ? "?)" : "");
            return -EINVAL;
        }
        if (res.type >= R_RBL_CLIENT) {
            size_t zlen;
            const char *z = next_token(p, &zlen);
            if (!z) {
                snprintf(err, errlen, "%s: %.*s needs a domain argument", param, (int)len, tok);
                return -EINVAL;
            }
            p = z + zlen;
            res.zone = kt_strndup(z, zlen);
            char *eq = strchr(res.zone, '=');
            if (eq) {
                *eq = '\0';
                res.filter = kt_strdup(eq + 1);
            }
            if (!res.zone[0] || (res.filter && !filter_valid(res.filter))) {
                snprintf(err, errlen, "%s: %.*s: bad DNS list \"%.*s\" (domain or domain=127.0.0.N, octets may "
                         "be [N;N..M])", param, (int)len, tok, (int)zlen, z);
                kt_free(res.zone);
                kt_free(res.filter);
                return -EINVAL;
            }
        } else if (res.type >= R_CHECK_CLIENT) {
            size_t tlen;
            const char *spec = next_token(p, &tlen);
            if (!spec || !memchr(spec, ':', tlen)) {
                snprintf(err, errlen, "%s: %.*s needs a type:table argument", param, (int)len, tok);
                return -EINVAL;
            }
            p = spec + tlen;
            char *s = kt_strndup(spec, tlen), msg[400];
            int rc = kt_table_open(s, KT_TABLE_MAP, &res.table, msg, sizeof(msg));
            kt_free(s);
            if (rc < 0) {
                snprintf(err, errlen, "%s: %s", param, msg);
                return rc;
            }
        }
        l->v = kt_realloc(l->v, (l->n + 1) * sizeof(*l->v));
        l->v[l->n++] = res;
    }
    return 0;
}

static int list_has(const struct rlist *l, int (*pred)(enum rtype))
{
    for (size_t i = 0; i < l->n; i++)
        if (pred(l->v[i].type))
            return 1;
    return 0;
}

static int protects_relay(enum rtype t)
{
    return t == R_REJECT_UNAUTH_DEST || t == R_DEFER_UNAUTH_DEST || t == R_REJECT || t == R_DEFER;
}

static int needs_login_maps(enum rtype t)
{
    return t == R_LOGIN_MISMATCH || t == R_AUTH_LOGIN_MISMATCH || t == R_UNAUTH_LOGIN_MISMATCH;
}

static int needs_relay_ccerts(enum rtype t)
{
    return t == R_PERMIT_TLS_CLIENTCERTS;
}

int kt_policy_new(const struct kt_policy_config *c, struct kt_policy **out, char *err, size_t errlen)
{
    struct kt_policy *p = kt_calloc(1, sizeof(*p));
    const char *text[L_COUNT] = { c->client_restrictions, c->helo_restrictions, c->sender_restrictions,
                                  c->relay_restrictions, c->recipient_restrictions };
    int rc = 0;

    *out = NULL;
    p->reject_unlisted_sender = c->reject_unlisted_sender;
    p->addr_flags = c->addr_flags;
    p->resolver = c->resolver;
    p->mynetworks = c->mynetworks;
    for (int i = 0; i < L_COUNT && rc == 0; i++)
        rc = parse_list(list_param[i], text[i], &p->lists[i], err, errlen);
    if (rc == 0 && c->rbl_reply_maps && c->rbl_reply_maps[0]) {
        char msg[400];
        rc = kt_maps_open(c->rbl_reply_maps, KT_TABLE_MAP, &p->rbl_reply_maps, msg, sizeof(msg));
        if (rc < 0)
            snprintf(err, errlen, "rbl_reply_maps: %s", msg);
    }
    if (rc == 0 && !list_has(&p->lists[L_RELAY], protects_relay) && !list_has(&p->lists[L_RCPT], protects_relay)) {
        snprintf(err, errlen, "smtpd_relay_restrictions and smtpd_recipient_restrictions: specify at least one "
                              "of reject_unauth_destination, defer_unauth_destination, reject, defer "
                              "(this server would be an open relay)");
        rc = -EINVAL;
    }
    int want_maps = 0;
    for (int i = 0; i < L_COUNT; i++)
        want_maps |= list_has(&p->lists[i], needs_login_maps);
    if (rc == 0 && want_maps) {
        if (!c->sender_login_maps || !c->sender_login_maps[0]) {
            snprintf(err, errlen, "reject_sender_login_mismatch needs smtpd_sender_login_maps");
            rc = -EINVAL;
        } else {
            char msg[400];
            rc = kt_maps_open(c->sender_login_maps, KT_TABLE_MAP, &p->login_maps, msg, sizeof(msg));
            if (rc < 0)
                snprintf(err, errlen, "smtpd_sender_login_maps: %s", msg);
        }
    }
    int want_ccerts = 0;
    for (int i = 0; i < L_COUNT; i++)
        want_ccerts |= list_has(&p->lists[i], needs_relay_ccerts);
    if (rc == 0 && want_ccerts) {
        /* Postfix would permit nobody here; a list that can never match is a configuration mistake */
        if (!c->relay_clientcerts || !c->relay_clientcerts[0]) {
            snprintf(err, errlen, "permit_tls_clientcerts needs relay_clientcerts");
            rc = -EINVAL;
        } else {
            char msg[400];
            rc = kt_maps_open(c->relay_clientcerts, KT_TABLE_MAP, &p->relay_ccerts, msg, sizeof(msg));
            if (rc < 0)
                snprintf(err, errlen, "relay_clientcerts: %s", msg);
        }
    }
    if (rc < 0) {
        kt_policy_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

void kt_policy_free(struct kt_policy *p)
{
    if (!p)
        return;
    for (int i = 0; i < L_COUNT; i++) {
        for (size_t k = 0; k < p->lists[i].n; k++) {
            kt_table_free(p->lists[i].v[k].table);
            kt_free(p->lists[i].v[k].zone);
            kt_free(p->lists[i].v[k].filter);
        }
        kt_free(p->lists[i].v);
    }
    kt_maps_free(p->login_maps);
    kt_maps_free(p->rbl_reply_maps);
    kt_maps_free(p->relay_ccerts);
    kt_free(p);
}

unsigned kt_policy_addr_flags(const struct kt_policy *p)
{
    return p->addr_flags;
}

/* ---- evaluation ---- */

enum { DUNNO, PERMIT, REJECT };

struct eval {
    const struct kt_policy *p;
    const struct kt_policy_request *r;
    const struct kt_resolved_addr *ra;
    int list;
    char client[320];         /* "name[addr]" */
    char *reply;
    size_t replylen;
};

static const char *list_what(int list)
{
    switch (list) {
    case L_CLIENT: return "Client host";
    case L_HELO: return "Helo command";
    case L_SENDER: return "Sender address";
    default: return "Recipient address";
    }
}

static const char *list_subject(const struct eval *e, int list)
{
    switch (list) {
    case L_CLIENT: return e->client;
    case L_HELO: return e->r->helo;
    case L_SENDER: return e->r->sender;
    default: return e->r->recipient;
    }
}

static int deny(struct eval *e, int code, const char *dsn, int list, const char *text)
{
    snprintf(e->reply, e->replylen, "%d %s <%s>: %s rejected: %s", code, dsn, list_subject(e, list), list_what(list),
             text);
    return REJECT;
}

static void lower_copy(char *out, size_t outlen, const char *in)
{
    size_t i;
    for (i = 0; in[i] && i + 1 < outlen; i++)
        out[i] = (char)tolower((unsigned char)in[i]);
    out[i] = '\0';
}

static const char *domain_of(const char *addr)
{
    long at = find_unquoted(addr, '@', 1);
    return at >= 0 ? addr + at + 1 : NULL;
}

static int fqdn(const char *domain)
{
    if (!domain || !*domain)
        return 0;
    if (domain[0] == '[')
        return 1;
    return strchr(domain, '.') != NULL && domain[strlen(domain) - 1] != '.';
}

static int auth_destination(const struct kt_resolved_addr *ra)
{
    return !ra->routed && (ra->cls == KT_CLASS_LOCAL || ra->cls == KT_CLASS_VIRTUAL || ra->cls == KT_CLASS_RELAY
                           || ra->cls == KT_CLASS_ALIAS);
}

static int apply(struct eval *e, enum rtype t, const struct kt_table *table, int depth);

/* An access(5) result: OK, REJECT/DEFER [text], NNN text, DUNNO, or a restriction name. */
static int access_result(struct eval *e, const char *value, int list, int depth)
{
    while (isspace((unsigned char)*value))
        value++;
    size_t wlen = strcspn(value, " \t");
    const char *text = value + wlen;
    while (isspace((unsigned char)*text))
        text++;
    int digits = wlen > 0 && strspn(value, "0123456789") == wlen;
    enum rtype t;

    if ((wlen == 2 && strncasecmp(value, "OK", 2) == 0) || (digits && !(wlen == 3 && (*value == '4' || *value == '5'))))
        return PERMIT;
    if (wlen == 5 && strncasecmp(value, "DUNNO", 5) == 0)
        return DUNNO;
    if (wlen == 6 && strncasecmp(value, "FILTER", 6) == 0) {
        /* access(5): the message goes to this content filter once queued; evaluation goes on */
        size_t n = strcspn(text, " \t");
        const char *colon = memchr(text, ':', n);
        if (!colon || colon == text || colon + 1 == text + n || n >= KT_FILTER_MAX) {
            kt_warn("access table: FILTER action without transport:nexthop: \"%s\"; ignored", text);
            return DUNNO;
        }
        if (e->r->filter)
            snprintf(e->r->filter, KT_FILTER_MAX, "%.*s", (int)n, text);
        return DUNNO;
    }
    int code = 0;
    if (wlen == 6 && strncasecmp(value, "REJECT", 6) == 0)
        code = 554;
    else if (wlen == 5 && strncasecmp(value, "DEFER", 5) == 0)
        code = 450;
    else if (digits)
        code = (value[0] - '0') * 100 + (value[1] - '0') * 10 + (value[2] - '0');
    if (code) {
        char dsn[16];
        snprintf(dsn, sizeof(dsn), "%c.7.1", code >= 500 ? '5' : '4');
        /* an enhanced status code at the start of the text replaces the default one */
        if (isdigit((unsigned char)text[0]) && text[0] == dsn[0] && text[1] == '.') {
            size_t n = strcspn(text, " \t");
            if (n < sizeof(dsn)) {
                snprintf(dsn, sizeof(dsn), "%.*s", (int)n, text);
                text += n;
                while (isspace((unsigned char)*text))
                    text++;
            }
        }
        return deny(e, code, dsn, list, *text ? text : "Access denied");
    }
    if (depth == 0 && rtype_find(value, wlen, &t) == 0 && t < R_CHECK_CLIENT)
        return apply(e, t, NULL, depth + 1);
    kt_warn("access table result \"%.*s\" is not supported; ignored", (int)wlen, value);
    return DUNNO;
}

/* Lookup order of check_{sender,recipient}_access: user@domain, domain and its parents (also as
 * ".parent"), then user@. */
static int check_mail_access(struct eval *e, const struct kt_table *t, const char *addr, int list, int depth)
{
    char key[520];
    const char *v;

    if (!*addr) {
        v = kt_table_get(t, "<>");
        return v ? access_result(e, v, list, depth) : DUNNO;
    }
    lower_copy(key, sizeof(key), addr);
    if ((v = kt_table_get(t, key)))
        return access_result(e, v, list, depth);
    long at = find_unquoted(key, '@', 1);
    /* access(5) with recipient_delimiter: user+foo@domain, user@domain, domain, user+foo@, user@ */
    size_t base = at >= 0 ? kt_addr_unextended(kt_resolve_delimiter(e->p->resolver), key, (size_t)at) : 0;
    if (at >= 0 && base < (size_t)at) {
        char bare[520];
        snprintf(bare, sizeof(bare), "%.*s%s", (int)base, key, key + at);
        if ((v = kt_table_get(t, bare)))
            return access_result(e, v, list, depth);
    }
    if (at >= 0) {
        const char *d = key + at + 1;
        for (const char *p = d; p && *p; p = strchr(p + 1, '.')) {
            const char *name = p == d ? p : p + 1;
            if ((v = kt_table_get(t, name)) || (p != d && (v = kt_table_get(t, p))))
                return access_result(e, v, list, depth);
        }
        key[at + 1] = '\0';
        if ((v = kt_table_get(t, key)))
            return access_result(e, v, list, depth);
        if (base < (size_t)at) {
            key[base] = '@';
            key[base + 1] = '\0';
            if ((v = kt_table_get(t, key)))
                return access_result(e, v, list, depth);
        }
    }
    return DUNNO;
}

static int check_helo_access(struct eval *e, const struct kt_table *t, int depth)
{
    char key[260];
    const char *v;
    if (!e->r->helo[0])
        return DUNNO;
    lower_copy(key, sizeof(key), e->r->helo);
    for (const char *p = key; p && *p; p = strchr(p + 1, '.')) {
        const char *name = p == key ? p : p + 1;
        if ((v = kt_table_get(t, name)) || (p != key && (v = kt_table_get(t, p))))
            return access_result(e, v, L_HELO, depth);
    }
    return DUNNO;
}

/* The address, then (IPv4) its shorter prefixes "1.2.3", "1.2", "1", or (IPv6) fewer groups. */
static int check_client_access(struct eval *e, const struct kt_table *t, int depth)
{
    char key[64];
    const char *v;
    snprintf(key, sizeof(key), "%s", e->r->client_addr);
    char sep = strchr(key, ':') ? ':' : '.';
    for (;;) {
        if ((v = kt_table_get(t, key)))
            return access_result(e, v, L_CLIENT, depth);
        char *last = strrchr(key, sep);
        if (!last)
            return DUNNO;
        *last = '\0';
        if (!key[0])
            return DUNNO;
    }
}

static int owner_listed(const char *owners, const char *user)
{
    const char *p = owners;
    size_t len;
    const char *tok;
    while ((tok = next_token(p, &len)) != NULL) {
        if (strlen(user) == len && strncasecmp(tok, user, len) == 0)
            return 1;
        p = tok + len;
    }
    return 0;
}

static int login_mismatch(struct eval *e, int check_auth, int check_unauth)
{
    const char *sender = e->r->sender, *owners;
    char key[520];

    if (!*sender || !e->p->login_maps)
        return DUNNO;
    lower_copy(key, sizeof(key), sender);
    owners = kt_maps_get(e->p->login_maps, key);
    long at = find_unquoted(key, '@', 1);
    if (!owners && at >= 0)
        owners = kt_maps_get(e->p->login_maps, key + at);
    if (e->r->sasl_username) {
        if (check_auth && (!owners || !owner_listed(owners, e->r->sasl_username))) {
            char text[400];
            snprintf(text, sizeof(text), "not owned by user %s", e->r->sasl_username);
            return deny(e, 553, "5.7.1", L_SENDER, text);
        }
    } else if (check_unauth && owners) {
        return deny(e, 553, "5.7.1", L_SENDER, "not logged in");
    }
    return DUNNO;
}

/* The resolver's "550 5.1.1 <a>: Recipient address rejected: X" as a sender reply. */
static int unlisted_sender(struct eval *e)
{
    const char *sender = e->r->sender;
    struct kt_resolve_result res;
    if (!*sender)
        return DUNNO;
    enum kt_addr_class cls = kt_resolve_class(e->p->resolver, domain_of(sender));
    if (cls != KT_CLASS_LOCAL && cls != KT_CLASS_VIRTUAL)
        return DUNNO;
    kt_resolve_recipient(e->p->resolver, sender, &res);
    /* listed (a user, an alias, a virtual mailbox) is enough: an alias ktrelay cannot deliver to, or whose
     * targets are gone, still names a sender that exists, as in Postfix */
    if (!res.reply || !res.unlisted)
        return DUNNO;
    const char *why = strstr(res.reply, "rejected: ");
    /* an unknown local sender gets unknown_local_recipient_reject_code, as Postfix's check_rcpt_maps */
    int code = res.unknown_user ? atoi(res.reply) : 550;
    return deny(e, code, code / 100 == 4 ? "4.1.0" : "5.1.0", L_SENDER, why ? why + 10 : "User unknown");
}

static int unlisted_recipient(struct eval *e)
{
    struct kt_resolve_result res;
    if (e->ra->cls != KT_CLASS_LOCAL && e->ra->cls != KT_CLASS_VIRTUAL)
        return DUNNO;
    kt_resolve_recipient(e->p->resolver, e->ra->rewritten ? e->ra->addr : e->r->recipient, &res);
    if (!res.reply)
        return DUNNO;
    snprintf(e->reply, e->replylen, "%s", res.reply);
    return REJECT;
}

/* ---- DNS-based checks ---- */

/* The cached answer for (type, name): 1 with *a. Missing: with r->needs the
 * query is added there and 0 returned (the restriction does not match this
 * round); without, *a says the lookup failed and 1 is returned. */
static int dns_get(struct eval *e, int type, const char *name, struct kt_dns_answer *a)
{
    for (unsigned i = 0; i < e->r->n_answers; i++)
        if (e->r->answers[i].type == type && strcasecmp(e->r->answers[i].name, name) == 0) {
            *a = e->r->answers[i].ans;
            return 1;
        }
    if (kt_cdns_lookup(type, name, a))
        return 1;
    struct kt_dns_needs *nd = e->r->needs;
    if (!nd) {
        memset(a, 0, sizeof(*a));
        a->status = KT_DNS_TEMP;
        snprintf(a->why, sizeof(a->why), "no answer");
        return 1;
    }
    for (unsigned i = 0; i < nd->n; i++)
        if (nd->v[i].type == type && strcasecmp(nd->v[i].name, name) == 0)
            return 0;
    if (nd->n < sizeof(nd->v) / sizeof(nd->v[0])) {
        nd->v[nd->n].type = type;
        snprintf(nd->v[nd->n].name, sizeof(nd->v[nd->n].name), "%s", name);
        nd->n++;
    }
    return 0;
}

/* DNS list query name for an address: 4.3.2.1.zone, or IPv6 nibbles reversed. */
static int rbl_query_name(const char *addr, const char *zone, char *out, size_t outlen)
{
    unsigned char b[16];
    if (inet_pton(AF_INET, addr, b) == 1) {
        snprintf(out, outlen, "%u.%u.%u.%u.%s", b[3], b[2], b[1], b[0], zone);
        return 0;
    }
    if (inet_pton(AF_INET6, addr, b) == 1) {
        size_t o = 0;
        for (int i = 15; i >= 0 && o + 5 < outlen; i--)
            o += (size_t)snprintf(out + o, outlen - o, "%x.%x.", b[i] & 15, b[i] >> 4);
        snprintf(out + o, outlen - o, "%s", zone);
        return 0;
    }
    return -1;
}

struct rbl_vars {
    const char *code, *domain, *cls, *what, *reason;
};

static const char *rbl_var(const struct eval *e, const struct rbl_vars *v, const char *name, size_t len)
{
#define IS(n) (len == sizeof(n) - 1 && strncmp(name, n, len) == 0)
    if (IS("rbl_code")) return v->code;
    if (IS("rbl_domain")) return v->domain;
    if (IS("rbl_class")) return v->cls;
    if (IS("rbl_what")) return v->what;
    if (IS("rbl_reason") || IS("rbl_txt")) return v->reason;
    if (IS("client_address")) return e->r->client_addr;
    if (IS("client_name")) return e->r->client_name ? e->r->client_name : "unknown";
    if (IS("reverse_client_name")) return e->r->reverse_name ? e->r->reverse_name : "unknown";
    if (IS("client")) return e->client;
    if (IS("helo_name")) return e->r->helo;
    if (IS("sender")) return e->r->sender;
    if (IS("recipient")) return e->r->recipient;
#undef IS
    return "";
}

/* rbl_reply_maps template expansion: $name, ${name}, ${name?text} and
 * ${name:text} (text expanded in turn), $$ for a dollar sign. */
static size_t rbl_expand(const struct eval *e, const struct rbl_vars *v, const char *t, size_t tlen, char *out,
                         size_t o, size_t outlen, int depth)
{
    for (size_t i = 0; i < tlen && o + 1 < outlen;) {
        if (t[i] != '$' || i + 1 >= tlen) {
            out[o++] = t[i++];
            continue;
        }
        i++;
        if (t[i] == '$') {
            out[o++] = '$';
            i++;
            continue;
        }
        if (t[i] == '{' || t[i] == '(') {
            char close = t[i] == '{' ? '}' : ')';
            size_t start = ++i, nest = 0, end = i;
            while (end < tlen && (nest || t[end] != close)) {
                if (t[end] == '{' || t[end] == '(')
                    nest++;
                else if ((t[end] == '}' || t[end] == ')') && nest)
                    nest--;
                end++;
            }
            size_t nlen = 0;
            while (start + nlen < end && (isalnum((unsigned char)t[start + nlen]) || t[start + nlen] == '_'))
                nlen++;
            const char *val = rbl_var(e, v, t + start, nlen);
            char op = start + nlen < end ? t[start + nlen] : 0;
            if ((op == '?' && *val) || (op == ':' && !*val)) {
                if (depth < 3)
                    o = rbl_expand(e, v, t + start + nlen + 1, end - start - nlen - 1, out, o, outlen, depth + 1);
            } else if (!op) {
                o += (size_t)snprintf(out + o, outlen - o, "%s", val);
            }
            i = end < tlen ? end + 1 : end;
            continue;
        }
        size_t nlen = 0;
        while (i + nlen < tlen && (isalnum((unsigned char)t[i + nlen]) || t[i + nlen] == '_'))
            nlen++;
        o += (size_t)snprintf(out + o, outlen - o, "%s", rbl_var(e, v, t + i, nlen));
        i += nlen;
    }
    if (o >= outlen)
        o = outlen - 1;
    out[o] = '\0';
    return o;
}

static const char default_rbl_reply[] =
    "$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using $rbl_domain${rbl_reason?; $rbl_reason}";

/* The reply for a listed client: rbl_reply_maps (keyed by the list's
 * domain) or Postfix's default_rbl_reply; an enhanced status code is added
 * when the template has none. */
static int rbl_reject(struct eval *e, const struct restriction *rs, const char *cls, const char *what,
                      const char *reason)
{
    struct rbl_vars v = { .code = "554", .domain = rs->zone, .cls = cls, .what = what, .reason = reason };
    const char *tpl = e->p->rbl_reply_maps ? kt_maps_get(e->p->rbl_reply_maps, rs->zone) : NULL;
    char text[600];
    if (!tpl)
        tpl = default_rbl_reply;
    rbl_expand(e, &v, tpl, strlen(tpl), text, 0, sizeof(text), 0);
    const char *t = text;
    if (!(isdigit((unsigned char)t[0]) && isdigit((unsigned char)t[1]) && isdigit((unsigned char)t[2])
          && (t[0] == '4' || t[0] == '5') && t[3] == ' ')) {
        snprintf(e->reply, e->replylen, "554 5.7.1 %s", t);
        return REJECT;
    }
    const char *rest = t + 4;
    if (isdigit((unsigned char)rest[0]) && rest[1] == '.')
        snprintf(e->reply, e->replylen, "%s", t);
    else
        snprintf(e->reply, e->replylen, "%.3s %c.7.1 %s", t, t[0], rest);
    return REJECT;
}

/* One DNS list lookup: 1 if name is listed (an A record passing the
 * filter), with the TXT reason; a lookup failure counts as not listed. */
static int dnsbl_listed(struct eval *e, const struct restriction *rs, const char *qname, char *reason,
                        size_t reasonlen)
{
    struct kt_dns_answer a, txt;
    reason[0] = '\0';
    int have_a = dns_get(e, KT_RR_A, qname, &a);
    int have_txt = dns_get(e, KT_RR_TXT, qname, &txt);
    if (!have_a)
        return 0;
    if (a.status == KT_DNS_TEMP) {
        kt_warn("%s: RBL lookup error: %s (counted as not listed)", qname, a.why);
        return 0;
    }
    int listed = 0;
    for (unsigned i = 0; i < a.n && !listed; i++)
        listed = !rs->filter || filter_match(rs->filter, a.rr[i]) == 1;
    if (listed && have_txt && txt.status == KT_DNS_FOUND)
        snprintf(reason, reasonlen, "%s", txt.rr[0]);
    return listed;
}

static int is_address_literal(const char *name)
{
    unsigned char b[16];
    return name[0] == '[' || inet_pton(AF_INET, name, b) == 1 || inet_pton(AF_INET6, name, b) == 1;
}

static int dns_list(struct eval *e, const struct restriction *rs)
{
    const struct kt_policy_request *r = e->r;
    char qname[600], reason[KT_DNS_RR_LEN];
    const char *dom = NULL, *cls = NULL;

    switch (rs->type) {
    case R_RBL_CLIENT:
    case R_DNSWL_CLIENT:
        if (rbl_query_name(r->client_addr, rs->zone, qname, sizeof(qname)) < 0)
            return DUNNO;
        if (!dnsbl_listed(e, rs, qname, reason, sizeof(reason)))
            return DUNNO;
        if (rs->type == R_DNSWL_CLIENT) {
            /* Postfix: never a way around reject_unauth_destination */
            if ((e->list == L_RELAY || e->list == L_RCPT) && !auth_destination(e->ra))
                return DUNNO;
            return PERMIT;
        }
        return rbl_reject(e, rs, "Client host", r->client_addr, reason);
    case R_RHSBL_CLIENT:
        if (r->client_name_status == KT_NAME_OK && r->client_name)
            dom = r->client_name;
        cls = "Client host";
        break;
    case R_RHSBL_REVERSE_CLIENT:
        if (r->reverse_name_status == KT_NAME_OK && r->reverse_name)
            dom = r->reverse_name;
        cls = "Unverified Client host";
        break;
    case R_RHSBL_SENDER:
        dom = r->sender[0] ? domain_of(r->sender) : NULL;
        cls = "Sender address";
        break;
    case R_RHSBL_HELO:
        dom = r->helo[0] ? r->helo : NULL;
        cls = "Helo command";
        break;
    default:
        return DUNNO;
    }
    if (!dom || !*dom || is_address_literal(dom))
        return DUNNO;
    snprintf(qname, sizeof(qname), "%s.%s", dom, rs->zone);
    if (!dnsbl_listed(e, rs, qname, reason, sizeof(reason)))
        return DUNNO;
    return rbl_reject(e, rs, cls, dom, reason);
}

/* Has the domain an MX, A or AAAA record? 1 yes, 0 no (all three say so),
 * -1 unknown (a lookup failed or is still to be made); *null_mx for a null
 * MX (RFC 7505). */
static int domain_exists(struct eval *e, const char *dom, int *null_mx)
{
    struct kt_dns_answer mx, a4, a6;
    int h1 = dns_get(e, KT_RR_MX, dom, &mx), h2 = dns_get(e, KT_RR_A, dom, &a4), h3 = dns_get(e, KT_RR_AAAA, dom, &a6);
    *null_mx = 0;
    if (h1 && mx.status == KT_DNS_FOUND) {
        *null_mx = mx.n == 1 && strcmp(mx.rr[0], "0 ") == 0;
        return 1;
    }
    if ((h2 && a4.status == KT_DNS_FOUND) || (h3 && a6.status == KT_DNS_FOUND))
        return 1;
    if (!h1 || !h2 || !h3)
        return -1;
    if (mx.status == KT_DNS_TEMP || a4.status == KT_DNS_TEMP || a6.status == KT_DNS_TEMP) {
        kt_warn("%s: domain lookup error: %s (not rejected)", dom,
                mx.status == KT_DNS_TEMP ? mx.why : a4.status == KT_DNS_TEMP ? a4.why : a6.why);
        return -1;
    }
    return 0;
}

static int unknown_sender_domain(struct eval *e)
{
    const char *dom = e->r->sender[0] ? domain_of(e->r->sender) : NULL;
    int null_mx;
    if (!dom || !*dom || dom[0] == '[')
        return DUNNO;
    int x = domain_exists(e, dom, &null_mx);
    if (x == 0)
        return deny(e, 450, "4.1.8", L_SENDER, "Domain not found");
    if (x == 1 && null_mx) {
        char text[400];
        snprintf(text, sizeof(text), "Domain %s does not accept mail (nullMX)", dom);
        return deny(e, 550, "5.7.27", L_SENDER, text);
    }
    return DUNNO;
}

static int unknown_helo(struct eval *e)
{
    const char *h = e->r->helo;
    int null_mx;
    if (!h[0] || is_address_literal(h) || !kt_smtp_valid_helo(h, strlen(h)))
        return DUNNO;
    if (domain_exists(e, h, &null_mx) == 0)
        return deny(e, 450, "4.7.1", L_HELO, "Host not found");
    return DUNNO;
}

/* Postfix's reject_unknown_client_hostname / _reverse_client_hostname: unknown_client_reject_code (450)
 * whether the lookup failed for good or for now. */
static int unknown_client(struct eval *e, int reverse)
{
    int st = reverse ? e->r->reverse_name_status : e->r->client_name_status;
    if (st == KT_NAME_OK)
        return DUNNO;
    snprintf(e->reply, e->replylen, "450 4.7.25 Client host rejected: cannot find your %shostname, [%s]",
             reverse ? "reverse " : "", e->r->client_addr);
    return REJECT;
}

/* Postfix's reject_invalid_helo_hostname test: a host name, or an address
 * with or without brackets (and "IPv6:" inside them), as valid_hostaddr()
 * and valid_mailhost_addr() accept. */
static int valid_helo_name(const char *helo)
{
    char a[INET6_ADDRSTRLEN + 8];
    unsigned char bin[16];
    size_t len = strlen(helo);
    const char *p = helo;
    if (helo[0] == '[' && len > 2 && helo[len - 1] == ']') {
        p = helo + 1;
        len -= 2;
        if (len > 5 && strncasecmp(p, "IPv6:", 5) == 0) {
            p += 5;
            len -= 5;
        }
    }
    if (len < sizeof(a)) {
        memcpy(a, p, len);
        a[len] = '\0';
        if (inet_pton(AF_INET, a, bin) == 1 || inet_pton(AF_INET6, a, bin) == 1)
            return 1;
    }
    return p == helo && kt_smtp_valid_helo(helo, strlen(helo));
}

/* Text tables keep their keys in lower case (as postmap does), so the hex is looked up that way: a
 * fingerprint written in either case matches. */
static int fingerprint_listed(const struct kt_maps *m, const char *fp)
{
    char key[200];
    size_t i;

    if (!m || !fp || !*fp)
        return 0;
    for (i = 0; fp[i] && i + 1 < sizeof(key); i++)
        key[i] = (char)tolower((unsigned char)fp[i]);
    key[i] = '\0';
    return kt_maps_get(m, key) != NULL;
}

static int apply(struct eval *e, enum rtype t, const struct kt_table *table, int depth)
{
    const struct kt_policy_request *r = e->r;
    switch (t) {
    case R_PERMIT:
        return PERMIT;
    case R_REJECT:
        return deny(e, 554, "5.7.1", e->list, "Access denied");
    case R_DEFER:
        return deny(e, 450, "4.7.1", e->list, "Access denied");
    case R_PERMIT_MYNETWORKS:
        return e->p->mynetworks && kt_net_list_match(e->p->mynetworks, r->client_addr) ? PERMIT : DUNNO;
    case R_PERMIT_SASL:
        return r->sasl_username ? PERMIT : DUNNO;
    case R_PERMIT_TLS_ALL_CLIENTCERTS:
        return r->ccert_trusted ? PERMIT : DUNNO;
    case R_PERMIT_TLS_CLIENTCERTS:
        /* Postfix: the certificate's fingerprint, then its public key's, in relay_clientcerts */
        return fingerprint_listed(e->p->relay_ccerts, r->ccert_fp)
               || fingerprint_listed(e->p->relay_ccerts, r->ccert_pkey_fp) ? PERMIT : DUNNO;
    case R_PERMIT_AUTH_DEST:
        return auth_destination(e->ra) ? PERMIT : DUNNO;
    case R_REJECT_UNAUTH_DEST:
    case R_DEFER_UNAUTH_DEST:
        if (auth_destination(e->ra))
            return DUNNO;
        snprintf(e->reply, e->replylen, "%s <%s>: Relay access denied",
                 t == R_REJECT_UNAUTH_DEST ? "554 5.7.1" : "454 4.7.1", r->recipient);
        return REJECT;
    case R_REJECT_UNAUTH_PIPELINING:
        if (r->pipelined && !r->esmtp)
            return deny(e, 503, "5.5.0", L_CLIENT, "Improper use of SMTP command pipelining");
        return DUNNO;
    case R_NON_FQDN_SENDER:
        if (*r->sender && !fqdn(domain_of(r->sender)))
            return deny(e, 504, "5.5.2", L_SENDER, "need fully-qualified address");
        return DUNNO;
    case R_NON_FQDN_RCPT:
        if (!fqdn(domain_of(r->recipient)))
            return deny(e, 504, "5.5.2", L_RCPT, "need fully-qualified address");
        return DUNNO;
    case R_NON_FQDN_HELO:
        if (r->helo[0] && !fqdn(r->helo))
            return deny(e, 504, "5.5.2", L_HELO, "need fully-qualified hostname");
        return DUNNO;
    case R_INVALID_HELO:
        /* Postfix's invalid_hostname_reject_code is 501 */
        if (r->helo[0] && !valid_helo_name(r->helo))
            return deny(e, 501, "5.5.2", L_HELO, "Invalid name");
        return DUNNO;
    case R_UNKNOWN_CLIENT:
        return unknown_client(e, 0);
    case R_UNKNOWN_REVERSE_CLIENT:
        return unknown_client(e, 1);
    case R_UNKNOWN_HELO:
        return unknown_helo(e);
    case R_UNKNOWN_SENDER_DOMAIN:
        return unknown_sender_domain(e);
    case R_RBL_CLIENT:
    case R_RHSBL_CLIENT:
    case R_RHSBL_REVERSE_CLIENT:
    case R_RHSBL_SENDER:
    case R_RHSBL_HELO:
    case R_DNSWL_CLIENT:
        return DUNNO;   /* reached only through access tables, which cannot give arguments */
    case R_UNLISTED_RCPT:
        return unlisted_recipient(e);
    case R_UNLISTED_SENDER:
        return unlisted_sender(e);
    case R_LOGIN_MISMATCH:
        return login_mismatch(e, 1, 1);
    case R_AUTH_LOGIN_MISMATCH:
        return login_mismatch(e, 1, 0);
    case R_UNAUTH_LOGIN_MISMATCH:
        return login_mismatch(e, 0, 1);
    case R_CHECK_CLIENT:
        return table ? check_client_access(e, table, depth) : DUNNO;
    case R_CHECK_HELO:
        return table ? check_helo_access(e, table, depth) : DUNNO;
    case R_CHECK_SENDER:
        return table ? check_mail_access(e, table, r->sender, L_SENDER, depth) : DUNNO;
    case R_CHECK_RCPT:
        return table ? check_mail_access(e, table, r->recipient, L_RCPT, depth) : DUNNO;
    }
    return DUNNO;
}

int kt_policy_check_rcpt(const struct kt_policy *p, const struct kt_policy_request *r, struct kt_resolved_addr *ra,
                         char *reply, size_t replylen)
{
    struct eval e = { .p = p, .r = r, .ra = ra, .reply = reply, .replylen = replylen };

    snprintf(e.client, sizeof(e.client), "%s[%s]", r->client_name ? r->client_name : "unknown", r->client_addr);
    kt_addr_resolve(p->resolver, p->addr_flags, r->recipient, r->recipient_had_route, ra);
    reply[0] = '\0';
    for (e.list = 0; e.list < L_COUNT; e.list++) {
        const struct rlist *l = &p->lists[e.list];
        for (size_t i = 0; i < l->n; i++) {
            int v = l->v[i].type >= R_RBL_CLIENT ? dns_list(&e, &l->v[i]) : apply(&e, l->v[i].type, l->v[i].table, 0);
            if (v == REJECT)
                return r->needs && r->needs->n ? KT_POLICY_NEED_DNS : 1;
            if (v == PERMIT)
                break;
        }
        /* smtpd_reject_unlisted_sender: an implicit reject_unlisted_sender after the sender list */
        if (e.list == L_SENDER && p->reject_unlisted_sender && unlisted_sender(&e) == REJECT)
            return r->needs && r->needs->n ? KT_POLICY_NEED_DNS : 1;
    }
    /* an answer was missing: the verdict may change once it is there */
    return r->needs && r->needs->n ? KT_POLICY_NEED_DNS : 0;
}

/* ---- mynetworks_style ---- */

static void append_net(char **list, int v6, const char *addr, int bits)
{
    char *joined = v6 ? kt_asprintf("%s [%s]/%d", *list, addr, bits) : kt_asprintf("%s %s/%d", *list, addr, bits);
    kt_free(*list);
    *list = joined;
}

char *kt_mynetworks_from_style(const char *style)
{
    char *list = kt_strdup("127.0.0.0/8 [::1]/128");
    struct ifaddrs *ifs = NULL;
    int subnet = strcasecmp(style, "subnet") == 0, klass = strcasecmp(style, "class") == 0;

    if (getifaddrs(&ifs) < 0)
        return list;
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next) {
        char text[INET6_ADDRSTRLEN];
        if (!i->ifa_addr || (i->ifa_flags & IFF_LOOPBACK))
            continue;
        if (i->ifa_addr->sa_family == AF_INET) {
            struct in_addr a = ((struct sockaddr_in *)i->ifa_addr)->sin_addr;
            uint32_t host = ntohl(a.s_addr), mask = 0xffffffffu;
            int bits = 32;
            if (subnet && i->ifa_netmask) {
                mask = ntohl(((struct sockaddr_in *)i->ifa_netmask)->sin_addr.s_addr);
                bits = __builtin_popcount(mask);
            } else if (klass) {
                bits = host < 0x80000000u ? 8 : host < 0xc0000000u ? 16 : 24;
                mask = 0xffffffffu << (32 - bits);
            }
            a.s_addr = htonl(host & mask);
            inet_ntop(AF_INET, &a, text, sizeof(text));
            append_net(&list, 0, text, bits);
        } else if (i->ifa_addr->sa_family == AF_INET6) {
            struct in6_addr a = ((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr;
            if (IN6_IS_ADDR_LINKLOCAL(&a))
                continue;
            int bits = 128;
            if ((subnet || klass) && i->ifa_netmask) {
                const struct in6_addr *m = &((struct sockaddr_in6 *)i->ifa_netmask)->sin6_addr;
                bits = 0;
                for (int k = 0; k < 16; k++) {
                    bits += __builtin_popcount(m->s6_addr[k]);
                    a.s6_addr[k] &= m->s6_addr[k];
                }
            }
            inet_ntop(AF_INET6, &a, text, sizeof(text));
            append_net(&list, 1, text, bits);
        }
    }
    freeifaddrs(ifs);
    return list;
}
