/* Recipient resolution in the manner of Postfix's trivial-rewrite, local(8)
 * and virtual(8): address class by domain, alias expansion for local
 * recipients, passwd users and virtual mailbox maps. Everything that needs the
 * file system (passwd, alias and :include: files, tables) is read when the
 * resolver is built; resolving afterwards is read-only, bounded (depth, fan-out
 * and result sizes are capped) and allocation-free, except for system users:
 * they are looked up through NSS (getpwnam_r) when resolved, so an account
 * made after the start works at once, and each one found is interned once
 * (under a mutex). Mailbox paths returned point into the resolver and stay
 * valid until kt_resolver_free. */
#include <arpa/inet.h>
#include <errno.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <pthread.h>
#include <pwd.h>
#include "core/log.h"
#include "core/alloc.h"
#include "delivery/aliases.h"
#include "delivery/resolve.h"
#include "core/table.h"

#define ALIAS_DEPTH 20
#define MAX_STEPS 1000      /* alias targets examined per recipient */
#define SEEN_POOL 4096
#define MAX_SEEN 128
#define MAX_LOCAL_ADDRS 64

struct user {
    char *name;
    char *mailbox;
    char *home;
    size_t home_len;   /* the home directory part of mailbox */
    unsigned uid, gid;
    size_t line;   /* keeps the first of duplicate names, like getpwnam */
};

struct vpath {
    uintptr_t value;   /* a value pointer from virtual_mailbox_maps */
    char *path;
};

struct ip {
    int family;
    unsigned char a[16];
};

struct kt_resolver {
    struct kt_domain_list *mydest, *relay, *vdomains, *adomains;
    char *delim;                   /* recipient_delimiter, "" = none */
    char unknown_code[32];         /* "550 5.1.1": unknown_local_recipient_reject_code and its class */
    struct kt_maps *vmaps, *vuid, *vgid;
    struct kt_aliases *aliases;
    struct user *users;
    size_t nusers;
    struct vpath *vpaths;
    size_t nvpaths;
    struct ip local_ips[MAX_LOCAL_ADDRS];
    size_t nlocal_ips;
    unsigned self_uid, self_gid;
    struct nss_cache *nss;         /* NULL when users come from passwd_file */
    unsigned default_uid, default_gid;   /* default_privs */
    char *myorigin, *mydomain;
    int append_at_myorigin, append_dot_mydomain;
};

/* Users through NSS (getpwnam_r) at lookup time, so a user created after the
 * start receives mail at once. A found user's mailbox path is interned here
 * and lives as long as the resolver (callers keep kt_mailbox.path pointers);
 * the mutex guards only this list, which grows by one entry per distinct
 * (user, home, uid, gid) ever seen. */
struct nss_cache {
    pthread_mutex_t lock;
    char *home_mailbox;
    struct nss_user {
        struct user u;
        struct nss_user *next;
    } *list;
};


static int empty(const char *s)
{
    return !s || !*s;
}

static void lower_copy(char *dst, const char *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (src[i] >= 'A' && src[i] <= 'Z') ? (char)(src[i] + 32) : src[i];
    dst[n] = 0;
}

/* "1.2.3.4", "::1", "IPv6:::1"; IPv4-mapped IPv6 counts as IPv4. */
static int parse_ip(const char *s, size_t n, struct ip *ip)
{
    char buf[INET6_ADDRSTRLEN + 8];

    if (n > 5 && strncasecmp(s, "ipv6:", 5) == 0) {
        s += 5;
        n -= 5;
    }
    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, s, n);
    buf[n] = 0;
    memset(ip, 0, sizeof(*ip));
    if (inet_pton(AF_INET, buf, ip->a) == 1) {
        ip->family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, buf, ip->a) == 1) {
        static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
        ip->family = AF_INET6;
        if (memcmp(ip->a, mapped, 12) == 0) {
            memmove(ip->a, ip->a + 12, 4);
            memset(ip->a + 4, 0, 12);
            ip->family = AF_INET;
        }
        return 0;
    }
    return -1;
}

int kt_resolve_complete(const struct kt_resolver *r, const char *addr, char *out, size_t outlen)
{
    size_t n = strlen(addr), at = n;
    int q = 0, len;

    /* the domain starts after the last '@' outside a quoted local part */
    for (size_t i = 0; i < n; i++) {
        if (addr[i] == '\\' && q && i + 1 < n)
            i++;
        else if (addr[i] == '"')
            q = !q;
        else if (addr[i] == '@' && !q)
            at = i;
    }
    if (at == n && r->append_at_myorigin && r->myorigin[0]) {
        len = snprintf(out, outlen, "%s@%s", addr, r->myorigin);
        at = n;
    } else {
        len = snprintf(out, outlen, "%s", addr);
    }
    if (len < 0 || (size_t)len >= outlen)
        return -ENAMETOOLONG;
    if (r->append_dot_mydomain && r->mydomain[0] && out[at] == '@' && out[at + 1] != '['
        && !strchr(out + at + 1, '.')) {
        size_t used = (size_t)len;
        len = snprintf(out + used, outlen - used, ".%s", r->mydomain);
        if (len < 0 || (size_t)len >= outlen - used)
            return -ENAMETOOLONG;
    }
    return 0;
}

enum kt_addr_class kt_resolve_class(const struct kt_resolver *r, const char *domain)
{
    size_t n;

    if (empty(domain))
        return KT_CLASS_LOCAL;
    n = strlen(domain);
    if (domain[0] == '[') {
        struct ip ip;
        if (n < 3 || domain[n - 1] != ']' || parse_ip(domain + 1, n - 2, &ip) < 0)
            return KT_CLASS_DEFAULT;
        for (size_t i = 0; i < r->nlocal_ips; i++)
            if (r->local_ips[i].family == ip.family && memcmp(r->local_ips[i].a, ip.a, 16) == 0)
                return KT_CLASS_LOCAL;
        return KT_CLASS_DEFAULT;
    }
    if (kt_domain_list_match(r->mydest, domain))
        return KT_CLASS_LOCAL;
    if (kt_domain_list_match(r->adomains, domain))
        return KT_CLASS_ALIAS;
    if (kt_domain_list_match(r->vdomains, domain))
        return KT_CLASS_VIRTUAL;
    if (kt_domain_list_match(r->relay, domain))
        return KT_CLASS_RELAY;
    return KT_CLASS_DEFAULT;
}

size_t kt_addr_unextended(const char *delims, const char *lp, size_t len)
{
    size_t n;

    if (empty(delims) || len == 0)
        return len;
    if ((len == 10 && strncasecmp(lp, "postmaster", 10) == 0) || (len == 13 && strncasecmp(lp, "mailer-daemon", 13) == 0))
        return len;
    if (strchr(delims, '-')
        && ((len > 6 && strncasecmp(lp, "owner-", 6) == 0) || (len > 8 && strncasecmp(lp + len - 8, "-request", 8) == 0)))
        return len;
    for (n = 0; n < len && !strchr(delims, lp[n]); n++)
        ;
    return n == 0 || n + 1 >= len ? len : n;
}

const char *kt_resolve_delimiter(const struct kt_resolver *r)
{
    return r ? r->delim : "";
}

/* ---- lookups ---- */

static int user_cmp_key(const void *key, const void *elem)
{
    return strcmp(key, ((const struct user *)elem)->name);
}

static char *join_path(const char *dir, const char *rel);

static const struct user *nss_find_user(struct nss_cache *c, const char *name)
{
    struct passwd pw, *found = NULL;
    char buf[4096];
    if (getpwnam_r(name, &pw, buf, sizeof(buf), &found) != 0 || !found || pw.pw_dir[0] != '/')
        return NULL;     /* unknown, NSS failure, or no home that could hold a Maildir */
    char *mailbox = join_path(pw.pw_dir, c->home_mailbox);
    const struct user *hit = NULL;
    pthread_mutex_lock(&c->lock);
    for (struct nss_user *n = c->list; n; n = n->next)
        if (n->u.uid == pw.pw_uid && n->u.gid == pw.pw_gid && !strcmp(n->u.name, name)
            && !strcmp(n->u.mailbox, mailbox) && !strcmp(n->u.home, pw.pw_dir)) {
            hit = &n->u;
            break;
        }
    if (!hit) {
        struct nss_user *n = kt_calloc(1, sizeof(*n));
        n->u.name = kt_strdup(name);
        n->u.mailbox = mailbox;
        n->u.home = kt_strdup(pw.pw_dir);     /* the delivery agent resolves the Maildir beneath it */
        mailbox = NULL;
        n->u.uid = pw.pw_uid;
        n->u.gid = pw.pw_gid;
        n->u.home_len = strlen(n->u.mailbox) - strlen(c->home_mailbox);
        n->next = c->list;
        c->list = n;
        hit = &n->u;
    }
    pthread_mutex_unlock(&c->lock);
    kt_free(mailbox);
    return hit;
}

static const struct user *find_user(const struct kt_resolver *r, const char *name)
{
    if (r->nss)
        return nss_find_user(r->nss, name);
    return r->nusers ? bsearch(name, r->users, r->nusers, sizeof(*r->users), user_cmp_key) : NULL;
}

static int vpath_cmp(const void *a, const void *b)
{
    uintptr_t x = ((const struct vpath *)a)->value, y = ((const struct vpath *)b)->value;
    return x < y ? -1 : x > y;
}

static const char *find_vpath(const struct kt_resolver *r, const char *value)
{
    struct vpath key = { (uintptr_t)value, NULL };
    const struct vpath *v = r->nvpaths ? bsearch(&key, r->vpaths, r->nvpaths, sizeof(*r->vpaths), vpath_cmp) : NULL;

    return v ? v->path : NULL;
}

/* virtual(8) order: the full address, the address without its extension (recipient_delimiter), then the
 * "@domain" catch-all. */
static const char *virtual_get(const struct kt_resolver *r, const struct kt_maps *m, const char *addr)
{
    const char *v = kt_maps_get(m, addr), *at = strrchr(addr, '@');

    if (!v && at) {
        size_t lp = (size_t)(at - addr), base = kt_addr_unextended(r->delim, addr, lp);
        char key[520];
        if (base < lp && (size_t)snprintf(key, sizeof(key), "%.*s%s", (int)base, addr, at) < sizeof(key))
            v = kt_maps_get(m, key);
    }
    if (!v && at)
        v = kt_maps_get(m, at);
    return v;
}

static int parse_id(const char *s, unsigned *out)
{
    unsigned long v = 0;

    if (!s || !*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > 0x7fffffffUL)
            return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static int virtual_id(const struct kt_resolver *r, const struct kt_maps *m, const char *addr, unsigned self,
                      unsigned *out)
{
    if (!kt_maps_count(m)) {
        *out = self;
        return 0;
    }
    return parse_id(virtual_get(r, m, addr), out);
}

enum vresult { V_OK, V_UNKNOWN, V_MBOX, V_IDS };

static enum vresult virtual_lookup(const struct kt_resolver *r, const char *addr, struct kt_mailbox *mb)
{
    const char *v = virtual_get(r, r->vmaps, addr);
    size_t n;

    mb->home = NULL;
    mb->user = NULL;
    mb->keep = 0;   /* virtual(8) makes the folders below virtual_mailbox_base as needed */

    if (!v)
        return V_UNKNOWN;
    n = strlen(v);
    if (!n || v[n - 1] != '/' || !(mb->path = find_vpath(r, v)))
        return V_MBOX;
    if (virtual_id(r, r->vuid, addr, r->self_uid, &mb->uid) < 0 || virtual_id(r, r->vgid, addr, r->self_gid, &mb->gid) < 0)
        return V_IDS;
    return V_OK;
}

/* ---- alias expansion ---- */

struct expand {
    const struct kt_resolver *r;
    struct kt_resolve_result *res;
    const char *stack[ALIAS_DEPTH + 1];   /* names and include paths being expanded */
    int depth;
    const char *seen[MAX_SEEN];           /* names expanded already (copies in pool) */
    size_t nseen, pool_used, steps;
    char pool[SEEN_POOL];
    int unsupported, overflow;
};

static void skip(struct expand *x, const char *why, const char *target)
{
    x->res->n_skipped++;
    x->res->skip_reason = why;
    size_t n = strnlen(target, sizeof(x->res->skip_target) - 1);
    memcpy(x->res->skip_target, target, n);
    x->res->skip_target[n] = '\0';
}

static void add_mailbox(struct expand *x, const struct kt_mailbox *mb)
{
    struct kt_resolve_result *res = x->res;

    for (size_t i = 0; i < res->n_mailboxes; i++)
        if (strcmp(res->mailboxes[i].path, mb->path) == 0)
            return;
    if (res->n_mailboxes == KT_RESOLVE_MAX_MAILBOXES) {
        x->overflow = 1;
        return;
    }
    res->mailboxes[res->n_mailboxes++] = *mb;
}

static void add_forward(struct expand *x, const char *addr)
{
    struct kt_resolve_result *res = x->res;

    if (strlen(addr) >= sizeof(res->forward[0])) {
        skip(x, "alias target too long", addr);
        return;
    }
    for (size_t i = 0; i < res->n_forward; i++)
        if (strcasecmp(res->forward[i], addr) == 0)
            return;
    if (res->n_forward == KT_RESOLVE_MAX_FORWARD) {
        x->overflow = 1;
        return;
    }
    strcpy(res->forward[res->n_forward++], addr);
}

static void deliver_user(struct expand *x, const char *name)
{
    const struct user *u = find_user(x->r, name);
    size_t len = strlen(name), base = kt_addr_unextended(x->r->delim, name, len);

    if (!u && base < len) {
        /* local(8): user+extension is delivered to user */
        char bare[256];
        snprintf(bare, sizeof(bare), "%.*s", (int)base, name);
        u = find_user(x->r, bare);
    }
    if (u) {
        /* Never deliver as root: its mail is owned by default_privs, as Postfix's local(8) delivers
         * for root; the home must exist (it is never created). */
        struct kt_mailbox mb = { u->mailbox, u->uid ? u->uid : x->r->default_uid,
                                 u->uid ? u->gid : x->r->default_gid, u->home, u->home_len, u->name };
        add_mailbox(x, &mb);
    } else {
        skip(x, "unknown local user", name);
    }
}

static int on_stack(const struct expand *x, const char *s)
{
    for (int i = 0; i < x->depth; i++)
        if (strcmp(x->stack[i], s) == 0)
            return 1;
    return 0;
}

static int seen(const struct expand *x, const char *name)
{
    for (size_t i = 0; i < x->nseen; i++)
        if (strcmp(x->seen[i], name) == 0)
            return 1;
    return 0;
}

static int remember(struct expand *x, const char *name)
{
    size_t n = strlen(name) + 1;

    if (x->nseen == MAX_SEEN || x->pool_used + n > SEEN_POOL)
        return -1;
    memcpy(x->pool + x->pool_used, name, n);
    x->seen[x->nseen++] = x->pool + x->pool_used;
    x->pool_used += n;
    return 0;
}

static void expand_list(struct expand *x, const char *list);

/* name is lowercased. An alias that lists itself, directly or through others,
 * delivers to the user's own mailbox instead of looping (aliases(5)). */
static void expand_local(struct expand *x, const char *name)
{
    const char *value = kt_aliases_get(x->r->aliases, name);
    size_t len = strlen(name), base = kt_addr_unextended(x->r->delim, name, len);

    if (!value && base < len && !find_user(x->r, name)) {
        /* local(8): user+extension has the aliases of user, unless a user of the full name exists */
        char bare[256];
        snprintf(bare, sizeof(bare), "%.*s", (int)base, name);
        if (kt_aliases_get(x->r->aliases, bare)) {
            expand_local(x, bare);    /* bare has no extension: this recursion ends there */
            return;
        }
    }
    if (!value || on_stack(x, name)) {
        deliver_user(x, name);
        return;
    }
    if (seen(x, name))
        return;
    if (x->depth == ALIAS_DEPTH) {
        skip(x, "alias nesting too deep", name);
        return;
    }
    if (remember(x, name) < 0) {
        x->overflow = 1;
        return;
    }
    x->stack[x->depth++] = name;
    expand_list(x, value);
    x->depth--;
}

static void expand_address(struct expand *x, const char *addr)
{
    const char *at = strrchr(addr, '@');
    char local[256];
    struct kt_mailbox mb;

    switch (kt_resolve_class(x->r, at + 1)) {
    case KT_CLASS_LOCAL:
        if ((size_t)(at - addr) >= sizeof(local)) {
            skip(x, "alias target too long", addr);
            return;
        }
        lower_copy(local, addr, (size_t)(at - addr));
        expand_local(x, local);
        return;
    case KT_CLASS_VIRTUAL:
        if (virtual_lookup(x->r, addr, &mb) == V_OK)
            add_mailbox(x, &mb);
        else
            skip(x, "undeliverable virtual alias target", addr);
        return;
    case KT_CLASS_ALIAS:      /* forwarded: virtual_alias_maps rewrite it on its way */
    case KT_CLASS_RELAY:
    case KT_CLASS_DEFAULT:
        add_forward(x, addr);
        return;
    }
}

static void expand_list(struct expand *x, const char *list)
{
    char tok[1024];
    enum kt_alias_type type;

    while (!x->overflow && kt_alias_next(&list, tok, sizeof(tok), &type)) {
        if (++x->steps > MAX_STEPS) {
            x->overflow = 1;
            return;
        }
        switch (type) {
        case KT_ALIAS_LOCAL:
        case KT_ALIAS_USER:
            lower_copy(tok, tok, strlen(tok));
            if (type == KT_ALIAS_USER)
                deliver_user(x, tok);
            else
                expand_local(x, tok);
            break;
        case KT_ALIAS_ADDRESS:
            expand_address(x, tok);
            break;
        case KT_ALIAS_INCLUDE: {
            const char *inc = kt_aliases_include(x->r->aliases, tok);
            /* Include loops end here; the names they reach were delivered once already. */
            if (!inc || on_stack(x, tok))
                break;
            if (x->depth == ALIAS_DEPTH) {
                skip(x, "alias nesting too deep", tok);
                break;
            }
            x->stack[x->depth++] = tok;
            expand_list(x, inc);
            x->depth--;
            break;
        }
        case KT_ALIAS_COMMAND:
            x->unsupported = 1;
            skip(x, "|command alias targets are not supported", tok);
            break;
        case KT_ALIAS_FILE:
            x->unsupported = 1;
            skip(x, "/file alias targets are not supported", tok);
            break;
        case KT_ALIAS_INVALID:
            x->unsupported = 1;
            skip(x, "invalid alias target", tok);
            break;
        }
    }
}

static void reply(struct kt_resolve_result *res, const char *code, const char *addr, const char *text)
{
    snprintf(res->reply_buf, sizeof(res->reply_buf), "%s <%s>: %s", code, addr, text);
    res->reply = res->reply_buf;
}

static void unknown_user(const struct kt_resolver *r, const char *addr, struct kt_resolve_result *res)
{
    reply(res, r->unknown_code, addr, "Recipient address rejected: User unknown in local recipient table");
    res->unknown_user = 1;
    res->unlisted = 1;
}

/* NAME (lowercased) is an alias, or user+extension of one (local(8) finds "user" then). */
static int alias_listed(const struct kt_resolver *r, const char *name)
{
    size_t len = strlen(name), base = kt_addr_unextended(r->delim, name, len);
    char bare[256];
    if (kt_aliases_get(r->aliases, name))
        return 1;
    if (base >= len || base >= sizeof(bare))
        return 0;
    memcpy(bare, name, base);
    bare[base] = '\0';
    return kt_aliases_get(r->aliases, bare) != NULL;
}

static void resolve_local(const struct kt_resolver *r, const char *addr, size_t local_len, struct kt_resolve_result *res)
{
    struct expand x;
    char name[256];

    if (local_len >= sizeof(name)) {
        unknown_user(r, addr, res);
        return;
    }
    lower_copy(name, addr, local_len);
    /* RFC 5321 4.5.1: postmaster is always accepted, falling back to root. */
    if (strcmp(name, "postmaster") == 0 && !kt_aliases_get(r->aliases, name) && !find_user(r, name))
        strcpy(name, "root");
    x.r = r;
    x.res = res;
    x.depth = 0;
    x.nseen = x.pool_used = x.steps = 0;
    x.unsupported = x.overflow = 0;
    expand_local(&x, name);
    if (x.overflow) {
        res->n_mailboxes = res->n_forward = 0;
        reply(res, "451 4.3.0", addr, "Temporary lookup failure");
    } else if (x.unsupported) {
        /* a |command, /file or invalid target anywhere in the expansion refuses the whole recipient: ktrelay
         * cannot deliver what the alias asks for, and delivering to the rest would drop that part unseen */
        res->n_mailboxes = res->n_forward = 0;
        reply(res, "550 5.1.1", addr, "Recipient address rejected: unsupported alias target");
    } else if (res->n_mailboxes + res->n_forward == 0 && alias_listed(r, name)) {
        /* an alias whose targets are all unknown users: it is listed (Postfix accepts it, and local(8)
         * bounces each target), so not unknown_local_recipient_reject_code's case */
        reply(res, "550 5.1.1", addr, "Recipient address rejected: User unknown in local recipient table");
    } else if (res->n_mailboxes + res->n_forward == 0) {
        unknown_user(r, addr, res);
    }
}

int kt_resolve_skipped_note(const struct kt_resolve_result *res, const char *addr, char *out, size_t outlen)
{
    if (outlen)
        out[0] = '\0';
    if (res->reply || res->n_skipped == 0)
        return 0;
    snprintf(out, outlen, "to=<%s>: %zu alias target%s not delivered, the last one %s: %s", addr, res->n_skipped,
             res->n_skipped == 1 ? "" : "s", res->skip_target, res->skip_reason);
    return 1;
}

void kt_resolve_warn_skipped(const struct kt_resolve_result *res, const char *queue_id, const char *addr)
{
    char note[1024];
    if (kt_resolve_skipped_note(res, addr, note, sizeof(note)))
        kt_warn("%s: %s", queue_id ? queue_id : "NOQUEUE", note);
}

void kt_resolve_recipient(const struct kt_resolver *r, const char *addr, struct kt_resolve_result *res)
{
    const char *at = strrchr(addr, '@');
    struct kt_mailbox mb;

    res->reply = NULL;
    res->n_mailboxes = res->n_forward = res->n_skipped = 0;
    res->skip_reason = NULL;
    res->skip_target[0] = 0;
    res->unknown_user = res->unlisted = 0;
    res->reply_buf[0] = 0;
    res->cls = kt_resolve_class(r, at ? at + 1 : NULL);
    switch (res->cls) {
    case KT_CLASS_LOCAL:
        resolve_local(r, addr, at ? (size_t)(at - addr) : strlen(addr), res);
        break;
    case KT_CLASS_VIRTUAL:
        switch (virtual_lookup(r, addr, &mb)) {
        case V_OK:
            res->mailboxes[res->n_mailboxes++] = mb;
            break;
        case V_UNKNOWN:
            reply(res, "550 5.1.1", addr, "Recipient address rejected: User unknown in virtual mailbox table");
            res->unlisted = 1;
            break;
        case V_MBOX:
            reply(res, "550 5.1.1", addr, "Recipient address rejected: mailbox format not supported");
            break;
        case V_IDS:
            reply(res, "451 4.3.0", addr, "Temporary lookup failure");
            break;
        }
        break;
    case KT_CLASS_ALIAS:
        /* an address of a virtual alias domain that virtual_alias_maps did not rewrite */
        reply(res, "550 5.1.1", addr, "Recipient address rejected: User unknown in virtual alias table");
        break;
    case KT_CLASS_RELAY:
    case KT_CLASS_DEFAULT:
        break;
    }
}

int kt_resolve_virtual_listed(const struct kt_resolver *r, const char *addr)
{
    return virtual_get(r, r->vmaps, addr) != NULL;
}

/* ---- construction ---- */

static char *join_path(const char *dir, const char *rel)
{
    size_t n = strlen(dir);

    while (n && dir[n - 1] == '/')
        n--;
    while (*rel == '/')
        rel++;
    return kt_asprintf("%.*s/%s", (int)n, dir, rel);
}

static int user_sort(const void *a, const void *b)
{
    const struct user *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    return c ? c : (x->line > y->line) - (x->line < y->line);
}

/* passwd(5) lines "name:pw:uid:gid:gecos:home:shell"; NIS "+"/"-" lines and
 * entries without an absolute home are ignored, as they cannot hold a Maildir. */
static int load_passwd(struct kt_resolver *r, const char *file, const char *home_mailbox, char *err, size_t errlen)
{
    FILE *f = fopen(file, "re");
    char *line = NULL;
    size_t cap = 0, lineno = 0, cap_users = 0, out = 0;

    if (!f) {
        int e = errno;
        kt_set_err(err, errlen, "passwd file %s: %s", file, strerror(e));
        return -e;
    }
    while (getline(&line, &cap, f) >= 0) {
        char *field[7], *p = line;
        unsigned uid, gid;
        int nf = 0;

        lineno++;
        line[strcspn(line, "\r\n")] = 0;
        if (!*line || *line == '#' || *line == '+' || *line == '-')
            continue;
        while (nf < 7) {
            field[nf++] = p;
            p = strchr(p, ':');
            if (!p)
                break;
            *p++ = 0;
        }
        if (nf < 7 || !*field[0] || parse_id(field[2], &uid) < 0 || parse_id(field[3], &gid) < 0 || field[5][0] != '/')
            continue;
        if (r->nusers == cap_users) {
            cap_users = cap_users ? cap_users * 2 : 64;
            r->users = kt_realloc(r->users, cap_users * sizeof(*r->users));
        }
        r->users[r->nusers].name = kt_strdup(field[0]);
        r->users[r->nusers].mailbox = join_path(field[5], home_mailbox);
        r->users[r->nusers].home = kt_strdup(field[5]);
        /* "home/" + home_mailbox (relative, checked by the caller) */
        r->users[r->nusers].home_len = strlen(r->users[r->nusers].mailbox) - strlen(home_mailbox);
        r->users[r->nusers].uid = uid;
        r->users[r->nusers].gid = gid;
        r->users[r->nusers].line = lineno;
        r->nusers++;
    }
    kt_free(line);
    fclose(f);
    if (r->nusers)
        qsort(r->users, r->nusers, sizeof(*r->users), user_sort);
    for (size_t i = 0; i < r->nusers; i++) {
        if (out && strcmp(r->users[out - 1].name, r->users[i].name) == 0) {
            kt_free(r->users[i].name);
            kt_free(r->users[i].mailbox);
            kt_free(r->users[i].home);
            continue;
        }
        r->users[out++] = r->users[i];
    }
    r->nusers = out;
    return 0;
}

struct vpath_ctx {
    struct kt_resolver *r;
    const char *base;
    size_t cap;
};

static int add_vpath(const char *key, const char *value, void *arg)
{
    struct vpath_ctx *vc = arg;
    struct kt_resolver *r = vc->r;
    size_t n = strlen(value);

    (void)key;
    if (!n || value[n - 1] != '/')
        return 0;  /* mbox: refused per recipient */
    if (r->nvpaths == vc->cap) {
        vc->cap = vc->cap ? vc->cap * 2 : 64;
        r->vpaths = kt_realloc(r->vpaths, vc->cap * sizeof(*r->vpaths));
    }
    r->vpaths[r->nvpaths].value = (uintptr_t)value;
    r->vpaths[r->nvpaths].path = join_path(vc->base, value);
    r->nvpaths++;
    return 0;
}

static int check_id(const char *key, const char *value, void *arg)
{
    unsigned id;

    (void)key;
    (void)arg;
    return parse_id(value, &id) < 0 ? -EINVAL : 0;
}

static int open_ids(const char *list, const char *what, struct kt_maps **out, char *err, size_t errlen)
{
    int rc = kt_maps_open(list, KT_TABLE_MAP, out, err, errlen);

    if (rc == 0 && kt_maps_foreach(*out, check_id, NULL) < 0) {
        kt_set_err(err, errlen, "%s: values must be numeric ids", what);
        rc = -EINVAL;
    }
    return rc;
}

static int load_local_ips(struct kt_resolver *r, const char *list, char *err, size_t errlen)
{
    const char *p = list ? list : "";

    for (;;) {
        size_t n;

        p += strspn(p, " \t,");
        if (!*p)
            return 0;
        n = strcspn(p, " \t,");
        if (r->nlocal_ips == MAX_LOCAL_ADDRS || parse_ip(p, n, &r->local_ips[r->nlocal_ips]) < 0) {
            kt_set_err(err, errlen, "inet_interfaces_addrs: bad or too many addresses at \"%.*s\"", (int)n, p);
            return -EINVAL;
        }
        r->nlocal_ips++;
        p += n;
    }
}

/* myorigin, or myhostname when it is empty; Postfix's "/file" form means the file's first word. */
static char *origin_value(const struct kt_resolve_config *c)
{
    const char *o = !empty(c->myorigin) ? c->myorigin : empty(c->myhostname) ? "" : c->myhostname;
    char buf[256] = "";
    FILE *f;

    if (o[0] != '/')
        return kt_strdup(o);
    if ((f = fopen(o, "re")) != NULL) {
        if (!fgets(buf, sizeof(buf), f))
            buf[0] = '\0';
        fclose(f);
    }
    buf[strcspn(buf, " \t\r\n")] = '\0';
    return kt_strdup(buf[0] ? buf : empty(c->myhostname) ? "" : c->myhostname);
}

int kt_resolver_new(const struct kt_resolve_config *c, struct kt_resolver **out, char *err, size_t errlen)
{
    struct kt_resolver *r;
    const char *hm = c->home_mailbox;
    const char *base = empty(c->virtual_mailbox_base) ? "" : c->virtual_mailbox_base;
    struct vpath_ctx vc;
    char *mydest = NULL;
    int rc;

    *out = NULL;
    if (empty(hm) || hm[strlen(hm) - 1] != '/') {
        kt_set_err(err, errlen, "home_mailbox must name a Maildir (end with /)");
        return -EINVAL;
    }
    if (hm[0] == '/') {
        kt_set_err(err, errlen, "home_mailbox must be relative to the home directory");
        return -EINVAL;
    }
    if (*base && *base != '/') {
        kt_set_err(err, errlen, "virtual_mailbox_base must be an absolute path");
        return -EINVAL;
    }
    r = kt_calloc(1, sizeof(*r));
    r->self_uid = (unsigned)getuid();
    r->self_gid = (unsigned)getgid();
    if (geteuid() == 0 && c->mail_owner && *c->mail_owner) {
        /* the workers run as mail_owner and own the virtual mailboxes */
        struct passwd *pw = getpwnam(c->mail_owner);
        if (pw) {
            r->self_uid = (unsigned)pw->pw_uid;
            r->self_gid = (unsigned)pw->pw_gid;
        }
    }
    /* Postfix's default mydestination is $myhostname, localhost.$mydomain, localhost. */
    if (!c->mydestination)
        mydest = kt_asprintf("%s localhost", empty(c->myhostname) ? "" : c->myhostname);
    rc = kt_domain_list_open(mydest ? mydest : c->mydestination, 0, &r->mydest, err, errlen);
    kt_free(mydest);
    if (rc == 0)
        rc = kt_domain_list_open(c->relay_domains, 1, &r->relay, err, errlen);
    if (rc == 0)
        rc = kt_domain_list_open(c->virtual_mailbox_domains, 0, &r->vdomains, err, errlen);
    if (rc == 0)
        rc = kt_domain_list_open(c->virtual_alias_domains, 0, &r->adomains, err, errlen);
    r->delim = kt_strdup(empty(c->recipient_delimiter) ? "" : c->recipient_delimiter);
    int code = c->unknown_local_code ? c->unknown_local_code : 550;
    snprintf(r->unknown_code, sizeof(r->unknown_code), "%d %d.1.1", code, code / 100);
    if (rc == 0)
        rc = kt_maps_open(c->virtual_mailbox_maps, KT_TABLE_MAP, &r->vmaps, err, errlen);
    if (rc == 0)
        rc = open_ids(c->virtual_uid_maps, "virtual_uid_maps", &r->vuid, err, errlen);
    if (rc == 0)
        rc = open_ids(c->virtual_gid_maps, "virtual_gid_maps", &r->vgid, err, errlen);
    if (rc == 0) {
        vc.r = r;
        vc.base = base;
        vc.cap = 0;
        kt_maps_foreach(r->vmaps, add_vpath, &vc);
        if (r->nvpaths)
            qsort(r->vpaths, r->nvpaths, sizeof(*r->vpaths), vpath_cmp);
        rc = kt_aliases_open(c->alias_maps, &r->aliases, err, errlen);
    }
    if (rc == 0)
    {
        if (c->passwd_file) {
            rc = load_passwd(r, c->passwd_file, hm, err, errlen);
        } else {
            r->nss = kt_calloc(1, sizeof(*r->nss));
            pthread_mutex_init(&r->nss->lock, NULL);
            r->nss->home_mailbox = kt_strdup(hm);
        }
    }
    if (rc == 0)
        rc = load_local_ips(r, c->inet_interfaces_addrs, err, errlen);
    if (rc == 0) {
        const char *dp = empty(c->default_privs) ? "nobody" : c->default_privs;
        const struct user *u = find_user(r, dp);
        if (!u || u->uid == 0) {
            kt_set_err(err, errlen, "default_privs: %s is %s", dp, u ? "a privileged user" : "not a known user");
            rc = -EINVAL;
        } else {
            r->default_uid = u->uid;
            r->default_gid = u->gid;
        }
    }
    r->myorigin = origin_value(c);
    r->mydomain = kt_strdup(empty(c->mydomain) ? "" : c->mydomain);
    r->append_at_myorigin = c->append_at_myorigin;
    r->append_dot_mydomain = c->append_dot_mydomain;
    if (rc < 0) {
        kt_resolver_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

int kt_resolver_foreach_mailbox(const struct kt_resolver *r, int (*fn)(const char *maildir, void *arg), void *arg)
{
    int rc = 0;

    for (size_t i = 0; i < r->nvpaths && !rc; i++)
        rc = fn(r->vpaths[i].path, arg);
    for (size_t i = 0; i < r->nusers && !rc; i++)
        rc = fn(r->users[i].mailbox, arg);
    if (r->nss && !rc) {
        /* users through NSS: every entry once (start-up, one thread) */
        struct passwd *pw;
        setpwent();
        while (!rc && (pw = getpwent()) != NULL) {
            if (pw->pw_dir[0] != '/')
                continue;
            char *mb = join_path(pw->pw_dir, r->nss->home_mailbox);
            rc = fn(mb, arg);
            kt_free(mb);
        }
        endpwent();
    }
    return rc;
}

void kt_resolver_free(struct kt_resolver *r)
{
    if (!r)
        return;
    kt_domain_list_free(r->mydest);
    kt_domain_list_free(r->relay);
    kt_domain_list_free(r->vdomains);
    kt_domain_list_free(r->adomains);
    kt_free(r->delim);
    kt_maps_free(r->vmaps);
    kt_maps_free(r->vuid);
    kt_maps_free(r->vgid);
    kt_aliases_free(r->aliases);
    for (size_t i = 0; i < r->nusers; i++) {
        kt_free(r->users[i].name);
        kt_free(r->users[i].mailbox);
        kt_free(r->users[i].home);
    }
    kt_free(r->users);
    if (r->nss) {
        for (struct nss_user *n = r->nss->list, *next; n; n = next) {
            next = n->next;
            kt_free(n->u.name);
            kt_free(n->u.mailbox);
            kt_free(n->u.home);
            kt_free(n);
        }
        pthread_mutex_destroy(&r->nss->lock);
        kt_free(r->nss->home_mailbox);
        kt_free(r->nss);
    }
    for (size_t i = 0; i < r->nvpaths; i++)
        kt_free(r->vpaths[i].path);
    kt_free(r->vpaths);
    kt_free(r->myorigin);
    kt_free(r->mydomain);
    kt_free(r);
}
