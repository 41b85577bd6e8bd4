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
#include <string.h>
#include <strings.h>

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
    R_INVALID_HELO,
    R_CHECK_CLIENT, R_CHECK_HELO, R_CHECK_SENDER, R_CHECK_RCPT,
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
    { "check_client_access", R_CHECK_CLIENT },
    { "check_helo_access", R_CHECK_HELO },
    { "check_sender_access", R_CHECK_SENDER },
    { "check_recipient_access", R_CHECK_RCPT },
};

struct restriction {
    enum rtype type;
    struct kt_table *table;   /* check_*_access */
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
    int reject_unlisted_sender;
    unsigned addr_flags;
    const struct kt_resolver *resolver;
    const struct kt_net_list *mynetworks;
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
            snprintf(err, errlen, "%s: unknown restriction \"%.*s\"", param, (int)len, tok);
            return -EINVAL;
        }
        if (res.type >= R_CHECK_CLIENT) {
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
        for (size_t k = 0; k < p->lists[i].n; k++)
            kt_table_free(p->lists[i].v[k].table);
        kt_free(p->lists[i].v);
    }
    kt_maps_free(p->login_maps);
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
    char client[80];          /* "unknown[addr]" */
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
    return !ra->routed && (ra->cls == KT_CLASS_LOCAL || ra->cls == KT_CLASS_VIRTUAL || ra->cls == KT_CLASS_RELAY);
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
    if (!res.reply || res.reply[0] != '5')
        return DUNNO;
    const char *why = strstr(res.reply, "rejected: ");
    return deny(e, 550, "5.1.0", L_SENDER, why ? why + 10 : "User unknown");
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

    snprintf(e.client, sizeof(e.client), "unknown[%s]", r->client_addr);
    kt_addr_resolve(p->resolver, p->addr_flags, r->recipient, r->recipient_had_route, ra);
    reply[0] = '\0';
    for (e.list = 0; e.list < L_COUNT; e.list++) {
        const struct rlist *l = &p->lists[e.list];
        for (size_t i = 0; i < l->n; i++) {
            int v = apply(&e, l->v[i].type, l->v[i].table, 0);
            if (v == REJECT)
                return 1;
            if (v == PERMIT)
                break;
        }
        /* smtpd_reject_unlisted_sender: an implicit reject_unlisted_sender after the sender list */
        if (e.list == L_SENDER && p->reject_unlisted_sender && unlisted_sender(&e) == REJECT)
            return 1;
    }
    return 0;
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
