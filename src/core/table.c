/* Postfix-style lookup tables (texthash/hash/btree/lmdb text sources, cidr,
 * inline, static; regexp and pcre in regexp_table.c) and the domain and network lists built on them.
 * Everything is parsed at open time; lookups only read, never allocate and
 * never block, so any number of threads may query a table at once. Text
 * tables are open-addressing hash tables whose keys and values live in one
 * arena, which keeps loading of large maps linear and cache friendly. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "core/regexp_table.h"
#include "core/table.h"

#define LIST_FILE_DEPTH 8


/* Key folding is ASCII only and locale independent, like postmap's lowercase(). */
static unsigned char lc(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

static int ascii_casecmp(const char *a, const char *b)
{
    while (*a && lc((unsigned char)*a) == lc((unsigned char)*b)) {
        a++;
        b++;
    }
    return lc((unsigned char)*a) - lc((unsigned char)*b);
}

static char *trim(char *s)
{
    char *e;

    while (is_space(*s))
        s++;
    e = s + strlen(s);
    while (e > s && is_space(e[-1]))
        *--e = 0;
    return s;
}

/* Whole file into a NUL-terminated buffer. */
static int read_file(const char *path, char **out, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t len = 0, cap = 65536;
    char *buf;

    if (fd < 0) {
        int e = errno;
        kt_set_err(err, errlen, "open %s: %s", path, strerror(e));
        return -e;
    }
    buf = kt_malloc(cap);
    for (;;) {
        ssize_t n;

        if (cap - len < 2) {
            cap *= 2;
            buf = kt_realloc(buf, cap);
        }
        n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            kt_set_err(err, errlen, "read %s: %s", path, strerror(e));
            close(fd);
            kt_free(buf);
            return -e;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    *out = buf;
    return 0;
}

/* Splits text into postmap logical lines: '#' lines and blank lines are
 * ignored, a line starting with whitespace continues the previous one. fn gets
 * a modifiable, trimmed line and the number of its first physical line. */
typedef void (*line_fn)(char *line, unsigned lineno, void *arg);

static void for_each_logical_line(const char *name, char *text, line_fn fn, void *arg)
{
    char *line = NULL;
    size_t len = 0, cap = 0;
    unsigned lineno = 0, start = 0;
    char *p = text;

    while (*p) {
        char *nl = strchr(p, '\n');
        char *end = nl ? nl : p + strlen(p);
        char *q = p;
        size_t n;

        lineno++;
        while (q < end && is_space(*q))
            q++;
        if (q == end || *q == '#') {
            p = nl ? nl + 1 : end;
            continue;
        }
        if (q == p) {
            if (len)
                fn(trim(line), start, arg);
            len = 0;
            start = lineno;
        } else if (!len) {
            kt_warn("%s, line %u: logical line must not start with whitespace, skipping", name, lineno);
            p = nl ? nl + 1 : end;
            continue;
        }
        /* CRLF files: a CR kept here would end up inside a joined value. */
        while (end > p && end[-1] == '\r')
            end--;
        n = (size_t)(end - p);
        if (len + n + 1 > cap) {
            cap = (len + n + 1) * 2;
            line = kt_realloc(line, cap);
        }
        memcpy(line + len, p, n);
        len += n;
        line[len] = 0;
        p = nl ? nl + 1 : p + strlen(p);
    }
    if (len)
        fn(trim(line), start, arg);
    kt_free(line);
}

/* ---- open-addressing hash of lowercased keys ---- */

struct slot {
    uint64_t hash;
    size_t key;   /* arena offset; 0 = empty (arena[0] is a spare NUL) */
    size_t val;
};

struct htab {
    char *arena;
    size_t alen, acap;
    struct slot *slots;
    size_t mask, count;
};

/* FNV-1a over the folded key: lookups fold on the fly and need no copy. */
static uint64_t hash_key(const char *k)
{
    uint64_t h = 1469598103934665603ULL;

    for (; *k; k++) {
        h ^= lc((unsigned char)*k);
        h *= 1099511628211ULL;
    }
    return h;
}

static size_t arena_add(struct htab *h, const char *s, int fold)
{
    size_t n = strlen(s) + 1, off = h->alen;

    if (h->alen + n > h->acap) {
        h->acap = (h->alen + n) * 2;
        h->arena = kt_realloc(h->arena, h->acap);
    }
    for (size_t i = 0; i < n; i++)
        h->arena[off + i] = fold ? (char)lc((unsigned char)s[i]) : s[i];
    h->alen += n;
    return off;
}

static void ht_init(struct htab *h)
{
    h->acap = 4096;
    h->arena = kt_malloc(h->acap);
    h->arena[0] = 0;
    h->alen = 1;
    h->mask = 63;
    h->slots = kt_calloc(h->mask + 1, sizeof(*h->slots));
    h->count = 0;
}

static void ht_grow(struct htab *h)
{
    size_t nmask = h->mask * 2 + 1;
    struct slot *ns = kt_calloc(nmask + 1, sizeof(*ns));

    for (size_t i = 0; i <= h->mask; i++) {
        size_t j;

        if (!h->slots[i].key)
            continue;
        for (j = h->slots[i].hash & nmask; ns[j].key; j = (j + 1) & nmask)
            ;
        ns[j] = h->slots[i];
    }
    kt_free(h->slots);
    h->slots = ns;
    h->mask = nmask;
}

static const struct slot *ht_find(const struct htab *h, const char *key, uint64_t hv)
{
    for (size_t i = hv & h->mask; h->slots[i].key; i = (i + 1) & h->mask) {
        const struct slot *s = &h->slots[i];
        if (s->hash == hv && ascii_casecmp(h->arena + s->key, key) == 0)
            return s;
    }
    return NULL;
}

/* Returns 0, or 1 when the key exists already: the first entry is kept, as postmap does. */
static int ht_put(struct htab *h, const char *key, const char *val)
{
    uint64_t hv = hash_key(key);
    size_t i;

    if (ht_find(h, key, hv))
        return 1;
    if ((h->count + 1) * 2 > h->mask + 1)
        ht_grow(h);
    for (i = hv & h->mask; h->slots[i].key; i = (i + 1) & h->mask)
        ;
    h->slots[i].hash = hv;
    h->slots[i].key = arena_add(h, key, 1);
    h->slots[i].val = arena_add(h, val, 0);
    h->count++;
    return 0;
}

static const char *ht_get(const struct htab *h, const char *key)
{
    const struct slot *s;

    if (!h->slots)
        return NULL;
    s = ht_find(h, key, hash_key(key));
    return s ? h->arena + s->val : NULL;
}

static void ht_free(struct htab *h)
{
    kt_free(h->arena);
    kt_free(h->slots);
}

/* ---- CIDR patterns ---- */

struct cidr {
    int family;
    unsigned char addr[16];
    unsigned len;
};

/* Parses a lookup address; IPv4-mapped IPv6 becomes IPv4 so one set of
 * IPv4 patterns covers both socket families. */
static int parse_addr(const char *text, struct cidr *c)
{
    char buf[INET6_ADDRSTRLEN + 8];
    size_t n = strlen(text);

    if (n >= 2 && text[0] == '[' && text[n - 1] == ']') {
        text++;
        n -= 2;
    }
    if (n >= sizeof(buf))
        return -1;
    memcpy(buf, text, n);
    buf[n] = 0;
    if (inet_pton(AF_INET, buf, c->addr) == 1) {
        c->family = AF_INET;
        c->len = 32;
        return 0;
    }
    if (inet_pton(AF_INET6, buf, c->addr) == 1) {
        static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
        if (memcmp(c->addr, mapped, 12) == 0) {
            memmove(c->addr, c->addr + 12, 4);
            c->family = AF_INET;
            c->len = 32;
        } else {
            c->family = AF_INET6;
            c->len = 128;
        }
        return 0;
    }
    return -1;
}

/* Pattern "a.b.c.d[/len]", "[v6][/len]" or "v6[/len]". Host bits set beyond
 * the prefix are refused as Postfix does: they usually mean a typo. */
static int parse_cidr(const char *text, struct cidr *c, char *err, size_t errlen)
{
    char buf[INET6_ADDRSTRLEN + 8];
    const char *slash, *a = text, *aend;
    unsigned max, len;

    if (*a == '[') {
        aend = strchr(a, ']');
        if (!aend)
            goto bad;
        a++;
        slash = aend[1] == '/' ? aend + 1 : NULL;
        if (!slash && aend[1])
            goto bad;
    } else {
        slash = strchr(a, '/');
        aend = slash ? slash : a + strlen(a);
    }
    if ((size_t)(aend - a) >= sizeof(buf) || aend == a)
        goto bad;
    memcpy(buf, a, (size_t)(aend - a));
    buf[aend - a] = 0;
    memset(c->addr, 0, sizeof(c->addr));
    if (inet_pton(AF_INET, buf, c->addr) == 1)
        c->family = AF_INET;
    else if (inet_pton(AF_INET6, buf, c->addr) == 1)
        c->family = AF_INET6;
    else
        goto bad;
    max = c->family == AF_INET ? 32 : 128;
    len = max;
    if (slash) {
        const char *d = slash + 1;
        if (!*d || strlen(d) > 3)
            goto bad;
        len = 0;
        for (; *d; d++) {
            if (*d < '0' || *d > '9')
                goto bad;
            len = len * 10 + (unsigned)(*d - '0');
        }
        if (len > max)
            goto bad;
    }
    c->len = len;
    for (unsigned bit = len; bit < max; bit++) {
        if (c->addr[bit / 8] & (0x80 >> (bit % 8))) {
            kt_set_err(err, errlen, "non-null host address bits in \"%s\"", text);
            return -EINVAL;
        }
    }
    return 0;
bad:
    kt_set_err(err, errlen, "bad address pattern \"%s\"", text);
    return -EINVAL;
}

static int cidr_match(const struct cidr *pat, const struct cidr *a)
{
    unsigned full = pat->len / 8, rest = pat->len % 8;

    if (pat->family != a->family)
        return 0;
    if (memcmp(pat->addr, a->addr, full) != 0)
        return 0;
    if (rest) {
        unsigned char m = (unsigned char)(0xff << (8 - rest));
        if ((pat->addr[full] & m) != (a->addr[full] & m))
            return 0;
    }
    return 1;
}

/* ---- tables ---- */

enum table_type { TT_HASH, TT_CIDR, TT_STATIC, TT_REGEXP };

struct cidr_rule {
    struct cidr net;
    int negate;
    size_t val;   /* arena offset */
};

struct kt_table {
    enum table_type type;
    char *name;
    struct htab h;            /* TT_HASH; its arena also holds cidr results */
    struct cidr_rule *rules;  /* TT_CIDR, in file order */
    size_t nrules, rcap;
    char *value;              /* TT_STATIC */
    struct kt_regexp_table *re;   /* TT_REGEXP (regexp: and pcre:) */
};

struct load_ctx {
    struct kt_table *t;
    enum kt_table_kind kind;
};

static void add_entry(struct kt_table *t, unsigned lineno, const char *key, const char *val)
{
    if (ht_put(&t->h, key, val))
        kt_warn("%s, line %u: duplicate entry: \"%s\", keeping the first", t->name, lineno, key);
}

static void load_map_line(char *line, unsigned lineno, void *arg)
{
    struct load_ctx *ctx = arg;
    char *key = line, *val;

    if (ctx->kind == KT_TABLE_ALIASES) {
        int quoted = 0;
        for (val = line; *val && (quoted || *val != ':'); val++) {
            if (*val == '"')
                quoted = !quoted;
            else if (*val == '\\' && val[1])
                val++;
        }
        if (*val != ':') {
            kt_warn("%s, line %u: need name:value pair, skipping", ctx->t->name, lineno);
            return;
        }
        *val++ = 0;
        key = trim(key);
        val = trim(val);
        if (key[0] == '"' && strlen(key) >= 2 && key[strlen(key) - 1] == '"') {
            key[strlen(key) - 1] = 0;
            key++;
        }
        if (!*key) {
            kt_warn("%s, line %u: need name:value pair, skipping", ctx->t->name, lineno);
            return;
        }
    } else {
        for (val = line; *val && !is_space(*val); val++)
            ;
        if (*val)
            *val++ = 0;
        val = trim(val);
    }
    add_entry(ctx->t, lineno, key, val);
}

static void load_cidr_line(char *line, unsigned lineno, void *arg)
{
    struct load_ctx *ctx = arg;
    struct kt_table *t = ctx->t;
    struct cidr_rule r = { 0 };
    char *pat = line, *val, msg[256];

    for (val = line; *val && !is_space(*val); val++)
        ;
    if (*val)
        *val++ = 0;
    val = trim(val);
    if (*pat == '!') {
        r.negate = 1;
        pat++;
    }
    if (!*val) {
        kt_warn("%s, line %u: no lookup result, skipping", t->name, lineno);
        return;
    }
    if (parse_cidr(pat, &r.net, msg, sizeof(msg)) < 0) {
        kt_warn("%s, line %u: %s, skipping", t->name, lineno, msg);
        return;
    }
    r.val = arena_add(&t->h, val, 0);
    if (t->nrules == t->rcap) {
        t->rcap = t->rcap ? t->rcap * 2 : 16;
        t->rules = kt_realloc(t->rules, t->rcap * sizeof(*t->rules));
    }
    t->rules[t->nrules++] = r;
}

static void load_regexp_line(char *line, unsigned lineno, void *arg)
{
    kt_regexp_table_add_line(arg, line, lineno);
}

/* inline:{ key=value, { key = value } }: braces let a value hold spaces and commas. */
static int load_inline(struct kt_table *t, const char *body, char *err, size_t errlen)
{
    size_t n = strlen(body);
    char *copy, *p;
    int rc = 0;

    if (n < 2 || body[0] != '{' || body[n - 1] != '}') {
        kt_set_err(err, errlen, "%s: expected inline:{ key=value, ... }", t->name);
        return -EINVAL;
    }
    copy = kt_strndup(body + 1, n - 2);
    p = copy;
    for (;;) {
        char *tok, *eq;

        while (*p && (is_space(*p) || *p == ','))
            p++;
        if (!*p)
            break;
        if (*p == '{') {
            tok = ++p;
            while (*p && *p != '}')
                p++;
            if (!*p) {
                kt_set_err(err, errlen, "%s: missing '}'", t->name);
                rc = -EINVAL;
                break;
            }
        } else {
            tok = p;
            while (*p && !is_space(*p) && *p != ',')
                p++;
        }
        if (*p)
            *p++ = 0;
        eq = strchr(tok, '=');
        if (!eq) {
            kt_set_err(err, errlen, "%s: missing '=' in \"%s\"", t->name, tok);
            rc = -EINVAL;
            break;
        }
        *eq = 0;
        tok = trim(tok);
        if (!*tok) {
            kt_set_err(err, errlen, "%s: empty key", t->name);
            rc = -EINVAL;
            break;
        }
        add_entry(t, 0, tok, trim(eq + 1));
    }
    kt_free(copy);
    return rc;
}

static const char *const text_types[] = { "texthash", "hash", "btree", "lmdb" };

/* Length of the "type" in "type:rest" when type is one this module knows, else 0. */
static size_t table_type_len(const char *spec)
{
    static const char *const others[] = { "cidr", "inline", "static", "regexp", "pcre" };
    const char *colon = strchr(spec, ':');
    size_t n;

    if (!colon)
        return 0;
    n = (size_t)(colon - spec);
    for (size_t i = 0; i < sizeof(text_types) / sizeof(*text_types); i++)
        if (strlen(text_types[i]) == n && strncmp(spec, text_types[i], n) == 0)
            return n;
    for (size_t i = 0; i < sizeof(others) / sizeof(*others); i++)
        if (strlen(others[i]) == n && strncmp(spec, others[i], n) == 0)
            return n;
    return 0;
}

const char *const *kt_table_types(size_t *n)
{
    static const char *const all[] = { "texthash", "hash", "btree", "lmdb", "cidr", "inline", "static", "regexp",
                                       "pcre" };
    *n = sizeof(all) / sizeof(*all);
    return all;
}

/* "type:..." with a plausible type name, known or not. */
static int looks_like_table(const char *s)
{
    const char *p = s;

    while ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')
        p++;
    return p > s && *p == ':' && !(*s >= '0' && *s <= '9');
}

int kt_table_open(const char *spec, enum kt_table_kind kind, struct kt_table **out, char *err, size_t errlen)
{
    size_t tl = table_type_len(spec);
    const char *arg = spec + tl + 1;
    struct kt_table *t;
    struct load_ctx ctx;
    char *text = NULL;
    int rc = 0;

    *out = NULL;
    if (!tl) {
        kt_set_err(err, errlen, "unsupported lookup table \"%s\"", spec);
        return -EINVAL;
    }
    t = kt_calloc(1, sizeof(*t));
    t->name = kt_strdup(spec);
    ht_init(&t->h);
    ctx.t = t;
    ctx.kind = kind;
    if (strncmp(spec, "static:", 7) == 0) {
        size_t n = strlen(arg);
        t->type = TT_STATIC;
        if (n >= 2 && arg[0] == '{' && arg[n - 1] == '}') {
            char *v = kt_strndup(arg + 1, n - 2);
            t->value = kt_strdup(trim(v));
            kt_free(v);
        } else {
            t->value = kt_strdup(arg);
        }
    } else if (strncmp(spec, "inline:", 7) == 0) {
        t->type = TT_HASH;
        rc = load_inline(t, arg, err, errlen);
    } else if (strncmp(spec, "regexp:", 7) == 0 || strncmp(spec, "pcre:", 5) == 0) {
        t->type = TT_REGEXP;
        t->re = kt_regexp_table_new(spec, spec[0] == 'p');
        rc = read_file(arg, &text, err, errlen);
        if (rc == 0) {
            for_each_logical_line(t->name, text, load_regexp_line, t->re);
            unsigned bad = kt_regexp_table_finish(t->re);
            if (bad) {
                rc = -EINVAL;
                snprintf(err, errlen, "%s: %u rule%s could not be read (the warnings above name the lines); a "
                         "table is used whole or not at all", arg, bad, bad == 1 ? "" : "s");
            }
        }
    } else if (strncmp(spec, "cidr:", 5) == 0) {
        t->type = TT_CIDR;
        rc = read_file(arg, &text, err, errlen);
        if (rc == 0)
            for_each_logical_line(t->name, text, load_cidr_line, &ctx);
    } else {
        t->type = TT_HASH;
        rc = read_file(arg, &text, err, errlen);
        if (rc == 0)
            for_each_logical_line(t->name, text, load_map_line, &ctx);
    }
    kt_free(text);
    if (rc < 0) {
        kt_table_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

const char *kt_table_get(const struct kt_table *t, const char *key)
{
    struct cidr a;

    if (!t || !key)
        return NULL;
    switch (t->type) {
    case TT_STATIC:
        return t->value;
    case TT_HASH:
        return ht_get(&t->h, key);
    case TT_REGEXP: {
        /* the expanded result lives until this thread's next regexp lookup (see table.h) */
        static __thread char result[4096];
        return kt_regexp_table_get(t->re, key, result, sizeof(result));
    }
    case TT_CIDR:
        if (parse_addr(key, &a) < 0)
            return NULL;
        /* A rule of the other address family never applies, negated or not. */
        for (size_t i = 0; i < t->nrules; i++)
            if (t->rules[i].net.family == a.family && cidr_match(&t->rules[i].net, &a) != t->rules[i].negate)
                return t->h.arena + t->rules[i].val;
        return NULL;
    }
    return NULL;
}

int kt_table_foreach(const struct kt_table *t, int (*fn)(const char *key, const char *value, void *arg), void *arg)
{
    int rc = 0;

    if (!t)
        return 0;
    if (t->type == TT_STATIC)
        return fn(NULL, t->value, arg);
    if (t->type == TT_REGEXP)
        return kt_regexp_table_foreach(t->re, fn, arg);
    if (t->type == TT_CIDR) {
        for (size_t i = 0; i < t->nrules && !rc; i++)
            rc = fn(NULL, t->h.arena + t->rules[i].val, arg);
        return rc;
    }
    for (size_t i = 0; i <= t->h.mask && !rc; i++)
        if (t->h.slots[i].key)
            rc = fn(t->h.arena + t->h.slots[i].key, t->h.arena + t->h.slots[i].val, arg);
    return rc;
}

void kt_table_free(struct kt_table *t)
{
    if (!t)
        return;
    ht_free(&t->h);
    kt_free(t->rules);
    kt_free(t->value);
    kt_regexp_table_free(t->re);
    kt_free(t->name);
    kt_free(t);
}

/* ---- lists of entries ("a, b c" with {...} groups and /file expansion) ---- */

/* Next list element; commas and whitespace separate, braces group. NULL at end. */
static char *next_list_token(const char **pp)
{
    const char *p = *pp, *s;
    int depth = 0;

    while (*p && (is_space(*p) || *p == ','))
        p++;
    if (!*p) {
        *pp = p;
        return NULL;
    }
    for (s = p; *p && (depth || (!is_space(*p) && *p != ',')); p++) {
        if (*p == '{')
            depth++;
        else if (*p == '}' && depth)
            depth--;
    }
    *pp = p;
    return kt_strndup(s, (size_t)(p - s));
}

typedef int (*entry_fn)(const char *entry, void *arg, char *err, size_t errlen);

struct file_ctx {
    entry_fn fn;
    void *arg;
    int depth;
    int rc;
    char *err;
    size_t errlen;
};

static int walk_list(const char *list, int depth, entry_fn fn, void *arg, char *err, size_t errlen);

static void walk_file_line(char *line, unsigned lineno, void *arg)
{
    struct file_ctx *fc = arg;

    (void)lineno;
    if (fc->rc == 0)
        fc->rc = walk_list(line, fc->depth, fc->fn, fc->arg, fc->err, fc->errlen);
}

/* Calls fn for every element of list, replacing "/file" elements by the file's contents. */
static int walk_list(const char *list, int depth, entry_fn fn, void *arg, char *err, size_t errlen)
{
    const char *p = list ? list : "";
    char *tok;
    int rc = 0;

    while (rc == 0 && (tok = next_list_token(&p)) != NULL) {
        if (tok[0] == '/') {
            struct file_ctx fc = { fn, arg, depth + 1, 0, err, errlen };
            char *text = NULL;

            if (depth >= LIST_FILE_DEPTH) {
                kt_set_err(err, errlen, "%s: pattern files nested too deeply", tok);
                rc = -ELOOP;
            } else if ((rc = read_file(tok, &text, err, errlen)) == 0) {
                for_each_logical_line(tok, text, walk_file_line, &fc);
                rc = fc.rc;
            }
            kt_free(text);
        } else {
            rc = fn(tok, arg, err, errlen);
        }
        kt_free(tok);
    }
    return rc;
}

/* ---- maps ---- */

struct kt_maps {
    struct kt_table **tables;
    size_t n;
};

struct maps_ctx {
    struct kt_maps *m;
    enum kt_table_kind kind;
};

static int maps_add(const char *entry, void *arg, char *err, size_t errlen)
{
    struct maps_ctx *mc = arg;
    struct kt_table *t;
    int rc = kt_table_open(entry, mc->kind, &t, err, errlen);

    if (rc < 0)
        return rc;
    mc->m->tables = kt_realloc(mc->m->tables, (mc->m->n + 1) * sizeof(*mc->m->tables));
    mc->m->tables[mc->m->n++] = t;
    return 0;
}

int kt_maps_open(const char *list, enum kt_table_kind kind, struct kt_maps **out, char *err, size_t errlen)
{
    struct kt_maps *m = kt_calloc(1, sizeof(*m));
    struct maps_ctx mc = { m, kind };
    const char *p = list ? list : "";
    char *tok;
    int rc = 0;

    /* A map list names tables only, so "/file" is not expanded here. */
    while (rc == 0 && (tok = next_list_token(&p)) != NULL) {
        rc = maps_add(tok, &mc, err, errlen);
        kt_free(tok);
    }
    if (rc < 0) {
        kt_maps_free(m);
        *out = NULL;
        return rc;
    }
    *out = m;
    return 0;
}

const char *kt_maps_get(const struct kt_maps *m, const char *key)
{
    if (!m)
        return NULL;
    for (size_t i = 0; i < m->n; i++) {
        const char *v = kt_table_get(m->tables[i], key);
        if (v)
            return v;
    }
    return NULL;
}

int kt_maps_foreach(const struct kt_maps *m, int (*fn)(const char *key, const char *value, void *arg), void *arg)
{
    int rc = 0;

    for (size_t i = 0; m && i < m->n && !rc; i++)
        rc = kt_table_foreach(m->tables[i], fn, arg);
    return rc;
}

size_t kt_maps_count(const struct kt_maps *m)
{
    return m ? m->n : 0;
}

void kt_maps_free(struct kt_maps *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++)
        kt_table_free(m->tables[i]);
    kt_free(m->tables);
    kt_free(m);
}

/* ---- domain lists ---- */

struct dom_entry {
    int negate;
    char *name;              /* lowercased, or NULL for a table */
    struct kt_table *table;
};

struct kt_domain_list {
    struct dom_entry *e;
    size_t n;
    int subdomains;
};

static int domain_add(const char *entry, void *arg, char *err, size_t errlen)
{
    struct kt_domain_list *l = arg;
    struct dom_entry d = { 0 };

    if (*entry == '!') {
        d.negate = 1;
        entry++;
    }
    if (!*entry || *entry == '/') {
        kt_set_err(err, errlen, "unsupported domain list entry \"%s\"", entry);
        return -EINVAL;
    }
    if (looks_like_table(entry)) {
        int rc = kt_table_open(entry, KT_TABLE_MAP, &d.table, err, errlen);
        if (rc < 0)
            return rc;
    } else {
        size_t n = strlen(entry);
        d.name = kt_strdup(entry);
        for (char *c = d.name; *c; c++)
            *c = (char)lc((unsigned char)*c);
        if (n > 1 && d.name[n - 1] == '.')
            d.name[n - 1] = 0;
    }
    l->e = kt_realloc(l->e, (l->n + 1) * sizeof(*l->e));
    l->e[l->n++] = d;
    return 0;
}

int kt_domain_list_open(const char *list, int match_subdomains, struct kt_domain_list **out, char *err, size_t errlen)
{
    struct kt_domain_list *l = kt_calloc(1, sizeof(*l));
    int rc;

    l->subdomains = match_subdomains;
    rc = walk_list(list, 0, domain_add, l, err, errlen);
    if (rc < 0) {
        kt_domain_list_free(l);
        *out = NULL;
        return rc;
    }
    *out = l;
    return 0;
}

/* Postfix match_hostname(): the name itself, then each parent domain; a
 * table is asked for "parent" when parents match subdomains, else ".parent". */
static int domain_entry_match(const struct kt_domain_list *l, const struct dom_entry *d, const char *name)
{
    const char *e;
    size_t nlen = strlen(name);

    if (d->table) {
        for (e = name; e; e = strchr(e + 1, '.')) {
            const char *key = e == name ? e : (l->subdomains ? e + 1 : e);
            if (*key && kt_table_get(d->table, key))
                return 1;
        }
        return 0;
    }
    if (ascii_casecmp(name, d->name) == 0)
        return 1;
    if (d->name[0] == '.') {
        size_t plen = strlen(d->name);
        return nlen > plen && ascii_casecmp(name + nlen - plen, d->name) == 0;
    }
    if (l->subdomains) {
        size_t plen = strlen(d->name);
        return nlen > plen && name[nlen - plen - 1] == '.' && ascii_casecmp(name + nlen - plen, d->name) == 0;
    }
    return 0;
}

int kt_domain_list_match(const struct kt_domain_list *l, const char *domain)
{
    char buf[256];
    size_t n;

    if (!l || !domain)
        return 0;
    /* A trailing dot names the same domain; dropping it needs a bounded copy. */
    n = strlen(domain);
    if (n > 1 && domain[n - 1] == '.') {
        if (n > sizeof(buf))
            return 0;
        memcpy(buf, domain, n - 1);
        buf[n - 1] = 0;
        domain = buf;
    }
    if (!*domain)
        return 0;
    for (size_t i = 0; i < l->n; i++)
        if (domain_entry_match(l, &l->e[i], domain))
            return !l->e[i].negate;
    return 0;
}

void kt_domain_list_free(struct kt_domain_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++) {
        kt_free(l->e[i].name);
        kt_table_free(l->e[i].table);
    }
    kt_free(l->e);
    kt_free(l);
}

/* ---- network lists ---- */

struct net_entry {
    int negate;
    struct cidr net;
    struct kt_table *table;  /* or NULL for net */
};

struct kt_net_list {
    struct net_entry *e;
    size_t n;
};

static int net_add(const char *entry, void *arg, char *err, size_t errlen)
{
    struct kt_net_list *l = arg;
    struct net_entry ne = { 0 };

    if (*entry == '!') {
        ne.negate = 1;
        entry++;
    }
    /* Only known types count as tables here: "fe80::/10" looks like "type:name". */
    if (table_type_len(entry)) {
        int rc = kt_table_open(entry, KT_TABLE_MAP, &ne.table, err, errlen);
        if (rc < 0)
            return rc;
    } else if (parse_cidr(entry, &ne.net, err, errlen) < 0) {
        return -EINVAL;
    }
    l->e = kt_realloc(l->e, (l->n + 1) * sizeof(*l->e));
    l->e[l->n++] = ne;
    return 0;
}

int kt_net_list_open(const char *list, struct kt_net_list **out, char *err, size_t errlen)
{
    struct kt_net_list *l = kt_calloc(1, sizeof(*l));
    int rc = walk_list(list, 0, net_add, l, err, errlen);

    if (rc < 0) {
        kt_net_list_free(l);
        *out = NULL;
        return rc;
    }
    *out = l;
    return 0;
}

int kt_net_list_match(const struct kt_net_list *l, const char *addr)
{
    struct cidr a;

    if (!l || !addr || parse_addr(addr, &a) < 0)
        return 0;
    for (size_t i = 0; i < l->n; i++) {
        const struct net_entry *ne = &l->e[i];
        if (ne->table ? kt_table_get(ne->table, addr) != NULL : cidr_match(&ne->net, &a))
            return !ne->negate;
    }
    return 0;
}

void kt_net_list_free(struct kt_net_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++)
        kt_table_free(l->e[i].table);
    kt_free(l->e);
    kt_free(l);
}
