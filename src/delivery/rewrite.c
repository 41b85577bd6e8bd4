/* Address rewriting in the manner of Postfix's cleanup(8): canonical maps
 * (cleanup_map11: one result, repeated up to ten times until the address
 * maps to itself) and virtual alias expansion (cleanup_map1n: every address
 * of the growing list is looked up again until it has no entry or has
 * expanded to itself; virtual_alias_recursion_limit bounds the nesting of
 * one address and virtual_alias_expansion_limit the size of the list). The
 * lookups are Postfix's mail_addr_map: keys lowercased; user+ext@domain,
 * user@domain, then, for a local domain, user+ext and user, then @domain; a
 * result "@other" gets the address's local part; an extension that the
 * matching key did not have is carried into every result when
 * propagate_unmatched_extensions names the table's class. Lists and
 * strings of a result are allocated per call; the tables are read-only. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "core/log.h"
#include "core/table.h"
#include "delivery/rewrite.h"

#define CANON_RECURSION 10      /* Postfix's cleanup_map11 MAX_RECURSION */
#define ADDR_MAX 512            /* longest address a rewrite may produce (the session's envelope buffers) */

enum { CLASS_ENV_SENDER = 1, CLASS_ENV_RCPT = 2 };

struct kt_rewrite {
    struct kt_maps *valias, *canon, *scanon, *rcanon;
    unsigned canon_classes, scanon_classes, rcanon_classes;
    int prop_canonical, prop_virtual;
    size_t expansion_limit, recursion_limit;
    const struct kt_resolver *resolver;
};

struct strv {
    char **v;
    size_t n, cap;
};

static void strv_add(struct strv *s, char *str)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 8;
        s->v = kt_realloc(s->v, s->cap * sizeof(*s->v));
    }
    s->v[s->n++] = str;
}

static void strv_free(struct strv *s)
{
    for (size_t i = 0; i < s->n; i++)
        kt_free(s->v[i]);
    kt_free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

static int has_word(const char *list, const char *word)
{
    size_t wl = strlen(word);
    for (const char *p = list ? list : ""; *p; ) {
        p += strspn(p, ", \t\r\n");
        size_t n = strcspn(p, ", \t\r\n");
        if (n == wl && strncasecmp(p, word, n) == 0)
            return 1;
        p += n;
    }
    return 0;
}

static unsigned classes_of(const char *list)
{
    return (has_word(list, "envelope_sender") ? CLASS_ENV_SENDER : 0)
           | (has_word(list, "envelope_recipient") ? CLASS_ENV_RCPT : 0);
}

static int open_maps(const char *list, struct kt_maps **out, const char *what, char *err, size_t errlen)
{
    char e[400];
    if (!list || !*list)
        return 0;
    int rc = kt_maps_open(list, KT_TABLE_MAP, out, e, sizeof(e));
    if (rc < 0)
        kt_set_err(err, errlen, "%s: %s", what, e);
    return rc;
}

int kt_rewrite_new(const struct kt_rewrite_config *c, struct kt_rewrite **out, char *err, size_t errlen)
{
    struct kt_rewrite *rw = kt_calloc(1, sizeof(*rw));
    int rc = open_maps(c->virtual_alias_maps, &rw->valias, "virtual_alias_maps", err, errlen);
    if (rc == 0)
        rc = open_maps(c->canonical_maps, &rw->canon, "canonical_maps", err, errlen);
    if (rc == 0)
        rc = open_maps(c->sender_canonical_maps, &rw->scanon, "sender_canonical_maps", err, errlen);
    if (rc == 0)
        rc = open_maps(c->recipient_canonical_maps, &rw->rcanon, "recipient_canonical_maps", err, errlen);
    if (rc < 0) {
        kt_rewrite_free(rw);
        *out = NULL;
        return rc;
    }
    rw->canon_classes = classes_of(c->canonical_classes);
    rw->scanon_classes = classes_of(c->sender_canonical_classes);
    rw->rcanon_classes = classes_of(c->recipient_canonical_classes);
    rw->prop_canonical = has_word(c->propagate_unmatched_extensions, "canonical");
    rw->prop_virtual = has_word(c->propagate_unmatched_extensions, "virtual");
    rw->expansion_limit = c->virtual_alias_expansion_limit > 0 ? (size_t)c->virtual_alias_expansion_limit : 1000;
    rw->recursion_limit = c->virtual_alias_recursion_limit > 0 ? (size_t)c->virtual_alias_recursion_limit : 1000;
    rw->resolver = c->resolver;
    *out = rw;
    return 0;
}

void kt_rewrite_free(struct kt_rewrite *rw)
{
    if (!rw)
        return;
    kt_maps_free(rw->valias);
    kt_maps_free(rw->canon);
    kt_maps_free(rw->scanon);
    kt_maps_free(rw->rcanon);
    kt_free(rw);
}

int kt_rewrite_active(const struct kt_rewrite *rw)
{
    return rw && (rw->valias || rw->canon || rw->scanon || rw->rcanon);
}

/* ---- mail_addr_map ---- */

static const char *lookup_lower(const struct kt_maps *m, const char *fmt_a, size_t na, const char *b)
{
    char key[ADDR_MAX + 8];
    int n = snprintf(key, sizeof(key), "%.*s%s", (int)na, fmt_a, b);
    if (n < 0 || (size_t)n >= sizeof(key))
        return NULL;
    for (char *p = key; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return kt_maps_get(m, key);
}

/* The results of looking addr up in m, appended to out (0 = no entry). */
static size_t addr_map(const struct kt_rewrite *rw, const struct kt_maps *m, const char *addr, int propagate,
                       struct strv *out)
{
    const char *at = strrchr(addr, '@');
    size_t lp = at ? (size_t)(at - addr) : strlen(addr);
    const char *domain = at ? at + 1 : "";
    const char *delim = rw->resolver ? kt_resolve_delimiter(rw->resolver) : "";
    size_t base = kt_addr_unextended(delim, addr, lp);
    const char *v;
    int unmatched = 0, at_domain = 0;

    v = lookup_lower(m, addr, strlen(addr), "");
    if (!v && base < lp && at) {
        v = lookup_lower(m, addr, base, at);
        unmatched = v != NULL;
    }
    if (!v && (!at || (rw->resolver && kt_resolve_class(rw->resolver, domain) == KT_CLASS_LOCAL))) {
        v = lookup_lower(m, addr, lp, "");
        if (!v && base < lp) {
            v = lookup_lower(m, addr, base, "");
            unmatched = v != NULL;
        }
    }
    if (!v && at && *domain) {
        v = lookup_lower(m, at, strlen(at), "");
        at_domain = v != NULL;
    }
    if (!v)
        return 0;
    size_t before = out->n;
    for (const char *p = v; *p; ) {
        p += strspn(p, ", \t\r\n");
        size_t n = strcspn(p, ", \t\r\n");
        if (!n)
            break;
        char *r;
        if (p[0] == '@') {
            /* "@other": the local part goes along, without an extension the key did not have */
            size_t keep = at_domain ? lp : base;
            r = kt_asprintf("%.*s%.*s", (int)keep, addr, (int)n, p);
        } else {
            r = kt_strndup(p, n);
        }
        if (unmatched && propagate) {
            /* propagate_unmatched_extensions: user@x becomes user+ext@x */
            char *rat = strrchr(r, '@');
            size_t rl = rat ? (size_t)(rat - r) : strlen(r);
            char *e = kt_asprintf("%.*s%.*s%s", (int)rl, r, (int)(lp - base), addr + base, r + rl);
            kt_free(r);
            r = e;
        }
        strv_add(out, r);
        p += n;
    }
    if (out->n == before)
        strv_add(out, kt_strdup(addr));   /* an empty value: Postfix keeps the address */
    return out->n - before;
}

/* cleanup_map11: one-to-one, until the address maps to itself or CANON_RECURSION lookups. */
static int map11(const struct kt_rewrite *rw, const struct kt_maps *m, const char *what, char *addr, size_t len)
{
    int changed = 0;
    for (int count = 0; count < CANON_RECURSION; count++) {
        struct strv r = { 0 };
        if (!addr_map(rw, m, addr, rw->prop_canonical, &r))
            return changed;
        if (r.n > 1)
            kt_warn("multi-valued %s entry for %s", what, addr);
        int self = strcasecmp(r.v[0], addr) == 0;
        if (strlen(r.v[0]) >= len || strlen(r.v[0]) >= ADDR_MAX) {
            kt_warn("%s result for %s is too long; not rewritten", what, addr);
            strv_free(&r);
            return -ENAMETOOLONG;
        }
        changed |= strcmp(r.v[0], addr) != 0;
        strcpy(addr, r.v[0]);
        strv_free(&r);
        if (self)
            return changed;
    }
    kt_warn("unreasonable %s map nesting for %s", what, addr);
    return changed;
}

int kt_rewrite_sender(const struct kt_rewrite *rw, const char *addr, char *out, size_t outlen)
{
    int changed = 0, rc;
    if ((size_t)snprintf(out, outlen, "%s", addr) >= outlen)
        return -ENAMETOOLONG;
    if (!rw || !*addr)
        return 0;
    if (rw->scanon && (rw->scanon_classes & CLASS_ENV_SENDER)) {
        if ((rc = map11(rw, rw->scanon, "sender_canonical_maps", out, outlen)) < 0)
            return rc;
        changed |= rc;
    }
    if (rw->canon && (rw->canon_classes & CLASS_ENV_SENDER)) {
        if ((rc = map11(rw, rw->canon, "canonical_maps", out, outlen)) < 0)
            return rc;
        changed |= rc;
    }
    return changed;
}

static int been_here(const struct strv *seen, const char *a)
{
    for (size_t i = 0; i < seen->n; i++)
        if (strcasecmp(seen->v[i], a) == 0)
            return 1;
    return 0;
}

/* cleanup_map1n */
static int map1n(const struct kt_rewrite *rw, const char *queue_id, const char *addr, struct strv *list, int *hit)
{
    struct strv seen = { 0 };
    int rc = 0;

    strv_add(list, kt_strdup(addr));
    for (size_t arg = 0; arg < list->n && rc == 0; arg++) {
        for (size_t count = 0;; count++) {
            if (been_here(&seen, list->v[arg]))
                break;
            if (count >= rw->recursion_limit) {
                kt_warn("%s: unreasonable virtual_alias_maps map nesting for %s -- message not accepted",
                        queue_id, addr);
                rc = -ELOOP;
                break;
            }
            struct strv r = { 0 };
            if (!addr_map(rw, rw->valias, list->v[arg], rw->prop_virtual, &r))
                break;
            *hit = 1;
            char *lhs = list->v[arg];
            for (size_t i = 0; i < r.n && rc == 0; i++) {
                if (strlen(r.v[i]) >= ADDR_MAX) {
                    kt_warn("%s: unreasonable virtual_alias_maps result %.300s -- message not accepted",
                            queue_id, r.v[i]);
                    rc = -ENAMETOOLONG;
                    break;
                }
                /* an address may expand into itself once: it is then kept */
                if (strcasecmp(lhs, r.v[i]) == 0 && !been_here(&seen, lhs))
                    strv_add(&seen, kt_strdup(lhs));
                if (i == 0) {
                    list->v[arg] = r.v[0];
                    r.v[0] = NULL;
                } else {
                    strv_add(list, r.v[i]);
                    r.v[i] = NULL;
                }
            }
            kt_free(lhs);
            strv_free(&r);
            if (rc == 0 && list->n > rw->expansion_limit) {
                kt_warn("%s: unreasonable virtual_alias_maps map expansion size for %s -- message not accepted",
                        queue_id, addr);
                rc = -E2BIG;
            }
            if (rc < 0)
                break;
        }
    }
    strv_free(&seen);
    return rc;
}

int kt_rewrite_recipient(const struct kt_rewrite *rw, const char *queue_id, const char *addr,
                         struct kt_rewrite_result *res)
{
    char canon[ADDR_MAX + 8];
    struct strv list = { 0 };
    int rc;

    memset(res, 0, sizeof(*res));
    if ((size_t)snprintf(canon, sizeof(canon), "%s", addr) >= sizeof(canon))
        return -ENAMETOOLONG;
    if (rw && rw->rcanon && (rw->rcanon_classes & CLASS_ENV_RCPT)
        && (rc = map11(rw, rw->rcanon, "recipient_canonical_maps", canon, sizeof(canon))) < 0)
        return rc;
    if (rw && rw->canon && (rw->canon_classes & CLASS_ENV_RCPT)
        && (rc = map11(rw, rw->canon, "canonical_maps", canon, sizeof(canon))) < 0)
        return rc;
    if (!rw || !rw->valias) {
        strv_add(&list, kt_strdup(canon));
    } else if ((rc = map1n(rw, queue_id, canon, &list, &res->aliased)) < 0) {
        strv_free(&list);
        res->aliased = 0;
        return rc;
    }
    /* one delivery per distinct address, as cleanup drops duplicate recipients */
    res->addrs = kt_calloc(list.n, sizeof(*res->addrs));
    for (size_t i = 0; i < list.n; i++) {
        int dup = 0;
        for (size_t k = 0; k < res->n && !dup; k++)
            dup = strcasecmp(res->addrs[k], list.v[i]) == 0;
        if (dup)
            kt_free(list.v[i]);
        else
            res->addrs[res->n++] = list.v[i];
    }
    kt_free(list.v);
    return 0;
}

void kt_rewrite_result_free(struct kt_rewrite_result *res)
{
    for (size_t i = 0; i < res->n; i++)
        kt_free(res->addrs[i]);
    kt_free(res->addrs);
    res->addrs = NULL;
    res->n = 0;
}

void kt_rewrite_envelope_free(struct kt_rewrite_envelope *e)
{
    for (size_t i = 0; i < e->n; i++) {
        kt_free(e->rcpts[i]);
        kt_free(e->origs[i]);
    }
    kt_free(e->rcpts);
    kt_free(e->origs);
    kt_free(e->src);
    kt_free(e->sender);
    memset(e, 0, sizeof(*e));
}

int kt_rewrite_envelope(const struct kt_rewrite *rw, const char *queue_id, const char *sender,
                        const char *const *rcpts, size_t n, struct kt_rewrite_envelope *out, const char **failed)
{
    char s[ADDR_MAX + 8];
    size_t cap = 0;

    memset(out, 0, sizeof(*out));
    *failed = NULL;
    if (kt_rewrite_sender(rw, sender, s, sizeof(s)) < 0)
        snprintf(s, sizeof(s), "%s", sender);        /* too long to rewrite: kept */
    out->sender = kt_strdup(sender && strlen(sender) < sizeof(s) ? s : sender ? sender : "");
    for (size_t i = 0; i < n; i++) {
        struct kt_rewrite_result rr;
        int rc = kt_rewrite_recipient(rw, queue_id, rcpts[i], &rr);
        if (rc < 0) {
            *failed = rcpts[i];
            kt_rewrite_envelope_free(out);
            return rc;
        }
        for (size_t k = 0; k < rr.n; k++) {
            int dup = 0;
            for (size_t j = 0; j < out->n && !dup; j++)
                dup = strcasecmp(out->rcpts[j], rr.addrs[k]) == 0;
            if (dup) {
                kt_free(rr.addrs[k]);
                continue;
            }
            if (out->n == cap) {
                cap = cap ? cap * 2 : 8;
                out->rcpts = kt_realloc(out->rcpts, cap * sizeof(*out->rcpts));
                out->origs = kt_realloc(out->origs, cap * sizeof(*out->origs));
                out->src = kt_realloc(out->src, cap * sizeof(*out->src));
            }
            out->src[out->n] = i;
            out->rcpts[out->n] = rr.addrs[k];
            out->origs[out->n++] = kt_strdup(rcpts[i]);
        }
        kt_free(rr.addrs);
    }
    return 0;
}
