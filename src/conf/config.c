/* Configuration loader: main.cf and master.cf with Postfix syntax and meaning.
 *
 * Guarantees: every parameter of the table is expanded ($name, ${name},
 * $(name), ${name?..}, ${name:..}, ${{a} op {b}?..:..}) against the final
 * values, once globally and once per service with its -o overrides, and
 * type-checked before kt_config_load returns; afterwards the configuration
 * is never written, so any number of threads may read it. Expansion loops
 * and runaway values are load errors, not hangs. Every problem is reported
 * as "FILE:LINE: message"; identical messages are reported once. */
#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "core/alloc.h"
#include "conf/config.h"
#include "core/log.h"

#define MAX_DEPTH 100               /* nesting of $name references */
#define MAX_VALUE (1u << 20)        /* an expanded value; stops exponential $a$a chains */
#define MAX_FILE (16u << 20)

static const char default_master_cf[] = "smtp inet n - n - - smtpd\n";

struct def {                        /* one "name = value" of main.cf or -o of master.cf */
    const char *name, *value, *file;
    int line;
};

struct ctx {                        /* parameter values as one service sees them */
    const struct def **defs;        /* per symbol: assignment in effect, or NULL */
    char **val;                     /* per symbol: expanded value */
    long long *num;                 /* per symbol: parsed bool/int/size/time */
    unsigned char *state;           /* per symbol: 0 untouched, 1 expanding, 2 done */
    const char *file;               /* where defaults are reported for this context */
    int line;
};

struct svc {
    struct kt_service pub;          /* first: callers hold &svc->pub */
    struct def *over;
    size_t nover;
    struct ctx ctx;
};

struct kt_config {
    char *main_file, *master_file;
    char *hostname;
    struct def *defs;               /* main.cf in file order */
    size_t ndefs;
    const char **extra;             /* names outside the table: symbols npar.. */
    unsigned char *extra_used;
    size_t nextra, npar, nsym;
    struct ctx global;
    struct svc *svcs;
    size_t nsvcs;
    struct svc *xports;             /* master.cf's smtp and relay transports (unix ... smtp) */
    size_t nxports;
    char **pool;                    /* strings owned by the configuration */
    size_t npool;
    char **seen;                    /* messages already reported */
    size_t nseen;
    int errors;
    const char *chroot_file;        /* first master.cf line with chroot y that the worker serves */
    int chroot_line;
};

struct where {                      /* the text being expanded */
    const char *file;
    int line;
    const char *owner;              /* parameter it is the value of */
};

struct buf {
    char *p;
    size_t len, cap;
    int overflow;
};

struct expander {
    struct kt_config *cfg;
    struct ctx *c;
    int stack[MAX_DEPTH];
    size_t depth;
    int failures;                   /* expansion errors so far, reported or not */
};

static void *grow(void *arr, size_t n, size_t size)
{
    /* capacity doubles at powers of two, so callers keep only a count */
    if (n == 0 || (n & (n - 1)) == 0)
        arr = kt_realloc(arr, (n ? 2 * n : 4) * size);
    return arr;
}

static char *keep(struct kt_config *cfg, char *s)
{
    cfg->pool = grow(cfg->pool, cfg->npool, sizeof(*cfg->pool));
    cfg->pool[cfg->npool++] = s;
    return s;
}

static void __attribute__((format(printf, 5, 6)))
report(struct kt_config *cfg, int is_error, const char *file, int line, const char *fmt, ...)
{
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    char *full = line > 0 ? kt_asprintf("%s:%d: %s", file, line, msg) : kt_asprintf("%s: %s", file, msg);
    for (size_t i = 0; i < cfg->nseen; i++) {
        if (strcmp(cfg->seen[i], full) == 0) {
            kt_free(full);
            return;
        }
    }
    cfg->seen = grow(cfg->seen, cfg->nseen, sizeof(*cfg->seen));
    cfg->seen[cfg->nseen++] = full;
    if (is_error) {
        kt_err("%s", full);
        cfg->errors++;
    } else {
        kt_warn("%s", full);
    }
}

/* ---- symbols: table parameters first, then names only the files define ---- */

static const char *sym_name(const struct kt_config *cfg, int sym)
{
    return (size_t)sym < cfg->npar ? kt_param_at((size_t)sym)->name : cfg->extra[(size_t)sym - cfg->npar];
}

static int sym_find(const struct kt_config *cfg, const char *name)
{
    const struct kt_param_def *p = kt_param_find(name);
    if (p)
        return (int)(p - kt_param_at(0));
    for (size_t i = 0; i < cfg->nextra; i++)
        if (strcmp(cfg->extra[i], name) == 0)
            return (int)(cfg->npar + i);
    return -1;
}

static void sym_add(struct kt_config *cfg, const char *name)
{
    if (sym_find(cfg, name) >= 0)
        return;
    cfg->extra = grow(cfg->extra, cfg->nextra, sizeof(*cfg->extra));
    cfg->extra[cfg->nextra++] = name;
}

static int is_name_char(int ch)
{
    return isalnum(ch) || ch == '_';
}

/* ---- expansion ---- */

static void buf_put(struct buf *b, const char *s, size_t n)
{
    if (b->overflow || b->len + n > MAX_VALUE) {
        b->overflow = 1;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = kt_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static char *buf_take(struct buf *b)
{
    char *s = b->p ? b->p : kt_strdup("");
    b->p = NULL;
    b->len = b->cap = 0;
    return s;
}

static const char *expand_sym(struct expander *e, int sym);
static int expand_into(struct expander *e, struct buf *b, const char *s, size_t n, const struct where *w);

static int defined(const struct expander *e, int sym)
{
    return sym >= 0 && ((size_t)sym < e->cfg->npar || e->c->defs[sym] != NULL);
}

/* Value of NAME (LEN bytes) or NULL when undefined. */
static const char *lookup(struct expander *e, const char *name, size_t len)
{
    char key[256];
    if (len >= sizeof(key))
        return NULL;
    memcpy(key, name, len);
    key[len] = '\0';
    int sym = sym_find(e->cfg, key);
    if (!defined(e, sym))
        return NULL;
    if ((size_t)sym >= e->cfg->npar)
        e->cfg->extra_used[(size_t)sym - e->cfg->npar] = 1;
    return expand_sym(e, sym);
}

static void put_lookup(struct expander *e, struct buf *b, const char *name, size_t len, const struct where *w)
{
    const char *v = lookup(e, name, len);
    if (v)
        buf_put(b, v, strlen(v));
    else
        report(e->cfg, 0, w->file, w->line, "undefined parameter $%.*s in value of %s expands to empty",
               (int)len, name, w->owner);
}

static size_t skip_space(const char *s, size_t i, size_t n)
{
    while (i < n && isspace((unsigned char)s[i]))
        i++;
    return i;
}

/* S[I] is '{': sets *END to the index of its matching '}', or fails. */
static int match_brace(const char *s, size_t i, size_t n, size_t *end)
{
    int depth = 0;
    for (; i < n; i++) {
        if (s[i] == '{')
            depth++;
        else if (s[i] == '}' && --depth == 0) {
            *end = i;
            return 0;
        }
    }
    return -1;
}

static int expand_alloc(struct expander *e, const char *s, size_t n, const struct where *w, char **out)
{
    struct buf b = { 0 };
    int rc = expand_into(e, &b, s, n, w);
    if (b.overflow) {
        report(e->cfg, 1, w->file, w->line, "value of %s is too long after expansion", w->owner);
        e->failures++;
        b.len = 0;
        rc = -1;
    }
    *out = buf_take(&b);
    return rc;
}

static int all_digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return 0;
    return 1;
}

/* "{a} OP {b}" at S[*I]: evaluates the comparison into *TRUTH. */
static int relation(struct expander *e, const char *s, size_t *i, size_t n, const struct where *w, int *truth)
{
    static const char *const ops[] = { "==", "!=", "<=", ">=", "<", ">" };
    size_t a_end, b_end, k = *i, op;
    if (match_brace(s, k, n, &a_end) < 0)
        return -1;
    size_t a0 = k + 1, alen = a_end - a0;
    k = skip_space(s, a_end + 1, n);
    for (op = 0; op < 6; op++)
        if (n - k >= strlen(ops[op]) && strncmp(s + k, ops[op], strlen(ops[op])) == 0)
            break;
    if (op == 6)
        return -1;
    k = skip_space(s, k + strlen(ops[op]), n);
    if (k >= n || s[k] != '{' || match_brace(s, k, n, &b_end) < 0)
        return -1;
    char *a, *b;
    int rc = expand_alloc(e, s + a0, alen, w, &a);
    rc |= expand_alloc(e, s + k + 1, b_end - k - 1, w, &b);
    int cmp;
    if (all_digits(a) && all_digits(b)) {
        unsigned long long x = strtoull(a, NULL, 10), y = strtoull(b, NULL, 10);
        cmp = (x > y) - (x < y);
    } else {
        cmp = strcmp(a, b);
    }
    kt_free(a);
    kt_free(b);
    int results[] = { cmp == 0, cmp != 0, cmp <= 0, cmp >= 0, cmp < 0, cmp > 0 };
    *truth = results[op];
    *i = b_end + 1;
    return rc;
}

/* Inside of ${...} (without the outer braces). */
static int expand_braced(struct expander *e, struct buf *b, const char *s, size_t n, const struct where *w)
{
    size_t i = skip_space(s, 0, n);
    int truth, relational = i < n && s[i] == '{';
    if (relational) {
        if (relation(e, s, &i, n, w, &truth) < 0)
            goto bad;
        i = skip_space(s, i, n);
        if (i >= n || (s[i] != '?' && s[i] != ':'))
            goto bad;
    } else {
        size_t name = i;
        while (i < n && is_name_char((unsigned char)s[i]))
            i++;
        if (i == name)
            goto bad;
        if (i == n) {
            put_lookup(e, b, s + name, i - name, w);
            return 0;
        }
        if (s[i] != '?' && s[i] != ':')
            goto bad;
        const char *v = lookup(e, s + name, i - name);
        truth = v && *v;
    }

    char op = s[i++];
    const char *v1 = s + i, *v2 = NULL;
    size_t n1 = n - i, n2 = 0;
    size_t k = skip_space(s, i, n), end;
    if (k < n && s[k] == '{') {
        /* Postfix 3 form: {value1} and, after '?', an optional :{value2} */
        if (match_brace(s, k, n, &end) < 0)
            goto bad;
        v1 = s + k + 1;
        n1 = end - k - 1;
        k = skip_space(s, end + 1, n);
        if (op == '?' && k < n && s[k] == ':') {
            k = skip_space(s, k + 1, n);
            if (k < n && s[k] == '{') {
                if (match_brace(s, k, n, &end) < 0)
                    goto bad;
                v2 = s + k + 1;
                n2 = end - k - 1;
                k = skip_space(s, end + 1, n);
            } else {
                size_t last = n;
                while (last > k && isspace((unsigned char)s[last - 1]))
                    last--;
                v2 = s + k;
                n2 = last - k;
                k = n;
            }
        }
        if (k != n)
            goto bad;
    } else if (relational) {
        goto bad;   /* a relation needs braced values */
    }
    if (op == ':')
        truth = !truth;
    if (truth)
        return expand_into(e, b, v1, n1, w);
    if (v2)
        return expand_into(e, b, v2, n2, w);
    return 0;
bad:
    report(e->cfg, 1, w->file, w->line, "bad expression \"${%.*s}\" in value of %s", (int)n, s, w->owner);
    e->failures++;
    return -1;
}

static int expand_into(struct expander *e, struct buf *b, const char *s, size_t n, const struct where *w)
{
    int rc = 0;
    buf_put(b, "", 0);
    size_t i = 0;
    while (i < n) {
        size_t lit = i;
        while (i < n && s[i] != '$')
            i++;
        buf_put(b, s + lit, i - lit);
        if (i >= n)
            break;
        char next = i + 1 < n ? s[i + 1] : '\0';
        if (next == '$') {
            buf_put(b, "$", 1);
            i += 2;
        } else if (is_name_char((unsigned char)next)) {
            size_t name = ++i;
            while (i < n && is_name_char((unsigned char)s[i]))
                i++;
            put_lookup(e, b, s + name, i - name, w);
        } else if (next == '{' || next == '(') {
            char close = next == '{' ? '}' : ')';
            int depth = 0;
            size_t k;
            for (k = i + 1; k < n; k++) {
                if (s[k] == next)
                    depth++;
                else if (s[k] == close && --depth == 0)
                    break;
            }
            if (k >= n) {
                report(e->cfg, 1, w->file, w->line, "missing '%c' in value of %s", close, w->owner);
                e->failures++;
                return -1;
            }
            if (expand_braced(e, b, s + i + 2, k - i - 2, w) < 0)
                rc = -1;
            i = k + 1;
        } else {
            buf_put(b, "$", 1);     /* a '$' before anything else stands for itself */
            i++;
        }
    }
    return rc;
}

/* myhostname and mydomain defaults, derived as Postfix does. */
static char *computed_default(struct expander *e, int sym)
{
    struct kt_config *cfg = e->cfg;
    if (strcmp(sym_name(cfg, sym), "myhostname") == 0) {
        if (strchr(cfg->hostname, '.'))
            return kt_strdup(cfg->hostname);
        int dom = sym_find(cfg, "mydomain");
        const char *d = e->c->defs[dom] ? expand_sym(e, dom) : "localdomain";
        return kt_asprintf("%s.%s", cfg->hostname, d);
    }
    const char *host = expand_sym(e, sym_find(cfg, "myhostname"));
    const char *dot = strchr(host, '.');
    return kt_strdup(dot && strchr(dot + 1, '.') ? dot + 1 : "localdomain");
}

static void validate(struct expander *e, int sym, const struct where *w)
{
    const struct kt_param_def *p = kt_param_at((size_t)sym);
    const char *v = e->c->val[sym];
    long long num = 0;
    int rc = 0;
    const char *what = NULL;
    const char *expect = "";
    switch (p->type) {
    case KT_PARAM_BOOL:
        rc = kt_param_parse_bool(v, &num);
        what = "boolean";
        expect = " (expected yes or no)";
        break;
    case KT_PARAM_INT:
    case KT_PARAM_SIZE:
        rc = kt_param_parse_int(v, &num);
        what = "numerical";
        expect = " (expected a whole number)";
        break;
    case KT_PARAM_TIME:
        rc = kt_param_parse_time(v, p->unit, &num);
        what = "time";
        expect = " (expected a number with an optional unit s, m, h, d or w)";
        break;
    default:
        break;
    }
    if (rc < 0)
        report(e->cfg, 1, w->file, w->line, "bad %s value for %s: \"%s\"%s", what, p->name, v, expect);
    e->c->num[sym] = rc < 0 ? -1 : num;
    char msg[1024];
    if (rc == 0 && p->check && p->check(p, v, msg, sizeof(msg)) < 0)
        report(e->cfg, 1, w->file, w->line, "%s", msg);
}

/* Expanded value of SYM in the expander's context; "" after a reported error. */
static const char *expand_sym(struct expander *e, int sym)
{
    struct kt_config *cfg = e->cfg;
    struct ctx *c = e->c;
    const struct def *d = c->defs[sym];
    struct where w = { d ? d->file : c->file, d ? d->line : c->line, sym_name(cfg, sym) };

    if (c->state[sym] == 2)
        return c->val[sym];
    if (c->state[sym] == 1 || e->depth == MAX_DEPTH) {
        char chain[1024] = "";
        size_t from = 0, len = 0;
        while (from < e->depth && e->stack[from] != sym)
            from++;
        for (size_t i = from; i < e->depth && len < sizeof(chain); i++)
            len += (size_t)snprintf(chain + len, sizeof(chain) - len, "$%s -> ", sym_name(cfg, e->stack[i]));
        if (len < sizeof(chain))
            snprintf(chain + len, sizeof(chain) - len, "$%s", w.owner);
        const struct def *top = e->depth ? c->defs[e->stack[e->depth - 1]] : NULL;
        report(cfg, 1, top ? top->file : c->file, top ? top->line : c->line, "%s: %s",
               c->state[sym] == 1 ? "parameter expansion loop" : "parameter nesting too deep", chain);
        e->failures++;
        return "";
    }

    c->state[sym] = 1;
    e->stack[e->depth++] = sym;
    const struct kt_param_def *p = (size_t)sym < cfg->npar ? kt_param_at((size_t)sym) : NULL;
    char *v;
    int rc = 0, failures = e->failures;
    if (p && p->local_template)
        v = kt_strdup(d ? d->value : p->def ? p->def : "");
    else if (d)
        rc = expand_alloc(e, d->value, strlen(d->value), &w, &v);
    else if (p && p->def)
        rc = expand_alloc(e, p->def, strlen(p->def), &w, &v);
    else
        v = computed_default(e, sym);
    e->depth--;
    c->val[sym] = v;
    c->state[sym] = 2;
    if (p && p->implemented && rc == 0 && e->failures == failures)
        validate(e, sym, &w);
    return v;
}

/* ---- reading main.cf and master.cf ---- */

typedef void (*line_fn)(struct kt_config *cfg, const char *file, int line, char *text, void *arg);

/* Calls FN once per logical line: comment and blank lines dropped,
 * continuation lines joined with one space, outer whitespace trimmed. */
static void logical_lines(struct kt_config *cfg, const char *text, const char *file, line_fn fn, void *arg)
{
    struct buf cur = { 0 };
    int cur_line = 0, lineno = 0;
    const char *p = text;
    while (*p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        lineno++;
        size_t i = skip_space(p, 0, n);
        size_t end = n;
        while (end > i && isspace((unsigned char)p[end - 1]))
            end--;
        if (i < end && p[i] != '#') {
            if (i > 0 && cur_line) {
                buf_put(&cur, " ", 1);
                buf_put(&cur, p + i, end - i);
            } else {
                if (i > 0)
                    report(cfg, 0, file, lineno, "logical line must not start with whitespace");
                if (cur_line)
                    fn(cfg, file, cur_line, cur.p, arg);
                cur.len = 0;
                buf_put(&cur, p + i, end - i);
                cur_line = lineno;
            }
        }
        p += eol ? n + 1 : n;
    }
    if (cur_line)
        fn(cfg, file, cur_line, cur.p, arg);
    kt_free(cur.p);
}

static int valid_name(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!is_name_char((unsigned char)*s) && *s != '-' && *s != '.')
            return 0;
    return 1;
}

/* Records NAME = VALUE as a definition; NULL when the name is malformed. */
static int add_def(struct kt_config *cfg, struct def **defs, size_t *ndefs, const char *file, int line,
                   const char *name, size_t nlen, const char *value)
{
    char *nm = keep(cfg, kt_strndup(name, nlen));
    if (!valid_name(nm)) {
        report(cfg, 1, file, line, "bad parameter name \"%s\"", nm);
        return -1;
    }
    const struct kt_param_def *p = kt_param_find(nm);
    if (p && !p->implemented && !p->policy)
        report(cfg, 0, file, line, "parameter %s is a Postfix parameter that ktrelay does not implement; ignored", nm);
    *defs = grow(*defs, *ndefs, sizeof(**defs));
    (*defs)[(*ndefs)++] = (struct def){ nm, keep(cfg, kt_strdup(value)), file, line };
    return 0;
}

static void main_line(struct kt_config *cfg, const char *file, int line, char *text, void *arg)
{
    char *eq = strchr(text, '=');
    if (!eq) {
        report(cfg, 1, file, line, "missing '=' after parameter name: \"%.40s\"", text);
        return;
    }
    size_t nlen = (size_t)(eq - text);
    while (nlen > 0 && isspace((unsigned char)text[nlen - 1]))
        nlen--;
    const char *value = eq + 1 + skip_space(eq + 1, 0, strlen(eq + 1));
    add_def(cfg, &cfg->defs, &cfg->ndefs, file, line, text, nlen, value);
}

struct token {
    char *text;
    int braced;                     /* written as { ... } */
};

/* Splits a master.cf line into fields; "{ a b }" is one field "a b". */
static int tokenize(char *s, struct token **out, size_t *count)
{
    size_t n = 0, len = strlen(s);
    struct token *t = NULL;
    size_t i = skip_space(s, 0, len);
    while (i < len) {
        size_t start = i, end;
        int braced = s[i] == '{';
        if (braced) {
            if (match_brace(s, i, len, &end) < 0 || (end + 1 < len && !isspace((unsigned char)s[end + 1]))) {
                kt_free(t);
                return -1;
            }
            start = skip_space(s, i + 1, end);
            size_t last = end;
            while (last > start && isspace((unsigned char)s[last - 1]))
                last--;
            s[last] = '\0';
            i = end + 1;
        } else {
            while (i < len && !isspace((unsigned char)s[i]))
                i++;
            end = i;
            if (i < len)
                i++;
            s[end] = '\0';
        }
        t = grow(t, n, sizeof(*t));
        t[n++] = (struct token){ s + start, braced };
        i = skip_space(s, i, len);
    }
    *out = t;
    *count = n;
    return 0;
}

static int resolve_port(const char *port)
{
    if (all_digits(port)) {
        long v = strlen(port) <= 5 ? strtol(port, NULL, 10) : 0;
        return v >= 1 && v <= 65535 ? (int)v : -1;
    }
    if (strcmp(port, "smtp") == 0)
        return 25;
    if (strcmp(port, "submission") == 0)
        return 587;
    if (strcmp(port, "smtps") == 0)
        return 465;
    struct servent *se = getservbyname(port, "tcp");
    return se ? ntohs((unsigned short)se->s_port) : -1;
}

/* host:port, [host]:port, port or service; HOST is NULL without a host part. */
static int parse_endpoint(struct kt_config *cfg, const char *name, const char **host, int *port)
{
    const char *colon = strrchr(name, ':');
    *host = NULL;
    if (name[0] == '[') {
        const char *close = strchr(name, ']');
        if (!close || close[1] != ':' || close == name + 1)
            return -1;
        *host = keep(cfg, kt_strndup(name + 1, (size_t)(close - name - 1)));
        colon = close + 1;
    } else if (colon) {
        if (colon == name)
            return -1;
        *host = keep(cfg, kt_strndup(name, (size_t)(colon - name)));
    }
    *port = resolve_port(colon ? colon + 1 : name);
    return *port < 0 ? -1 : 0;
}

static int yn_field(const char *s)
{
    return strcmp(s, "y") == 0 || strcmp(s, "n") == 0 || strcmp(s, "-") == 0;
}

static int wakeup_field(const char *s)
{
    if (strcmp(s, "-") == 0)
        return 1;
    size_t n = strspn(s, "0123456789");
    return n > 0 && (s[n] == '\0' || (s[n] == '?' && s[n + 1] == '\0'));
}

static void free_ctx(struct ctx *c, size_t nsym)
{
    for (size_t i = 0; c->val && i < nsym; i++)
        kt_free(c->val[i]);
    kt_free(c->val);
    kt_free(c->defs);
    kt_free(c->num);
    kt_free(c->state);
}

static void parse_options(struct kt_config *cfg, struct svc *s, struct token *t, size_t nt,
                          const char *file, int line)
{
    for (size_t i = 8; i < nt; i++) {
        const char *arg = t[i].text;
        if (t[i].braced || strncmp(arg, "-o", 2) != 0) {
            report(cfg, 0, file, line, "service %s: argument \"%s\" ignored", s->pub.name, arg);
            continue;
        }
        int braced = 0;
        if (arg[2] == '\0') {
            if (++i == nt) {
                report(cfg, 1, file, line, "service %s: -o without name=value", s->pub.name);
                return;
            }
            arg = t[i].text;
            braced = t[i].braced;
        } else {
            arg += 2;
        }
        const char *eq = strchr(arg, '=');
        size_t nlen = eq ? (size_t)(eq - arg) : 0;
        /* the long form { name = value } allows spaces; the short one does not */
        while (braced && nlen > 0 && isspace((unsigned char)arg[nlen - 1]))
            nlen--;
        if (!eq || nlen == 0) {
            report(cfg, 1, file, line, "service %s: bad -o option \"%s\": expected name=value", s->pub.name, arg);
            continue;
        }
        const char *value = eq + 1;
        if (braced)
            value += skip_space(value, 0, strlen(value));
        /* ktrelay logs under one syslog_name per process; Postfix's per-service
         * "postfix/submission" tags are not reproduced (the line's service still is) */
        if (nlen == 11 && !strncmp(arg, "syslog_name", 11))
            report(cfg, 0, file, line, "-o syslog_name is not implemented per service; ignored (every line "
                   "uses main.cf's syslog_name)");
        add_def(cfg, &s->over, &s->nover, file, line, arg, nlen, value);
    }
}

static void master_line(struct kt_config *cfg, const char *file, int line, char *text, void *arg)
{
    struct token *t = NULL;
    size_t nt = 0;
    if (tokenize(text, &t, &nt) < 0) {
        report(cfg, 1, file, line, "unbalanced '{' in service definition");
        return;
    }
    static const char *const types[] = { "inet", "unix", "unix-dgram", "fifo", "pass" };
    size_t ty = 0;
    while (nt >= 8 && ty < 5 && strcmp(t[1].text, types[ty]) != 0)
        ty++;
    if (nt < 8) {
        report(cfg, 1, file, line, "service definition needs 8 fields: name type private unpriv chroot "
               "wakeup maxproc command");
    } else if (ty == 5) {
        report(cfg, 1, file, line, "service %s: unknown service type \"%s\"", t[0].text, t[1].text);
    } else if (!yn_field(t[2].text) || !yn_field(t[3].text) || !yn_field(t[4].text)) {
        report(cfg, 1, file, line, "service %s/%s: private, unpriv and chroot fields must be y, n or -",
               t[0].text, t[1].text);
    } else if (!wakeup_field(t[5].text)) {
        report(cfg, 1, file, line, "service %s/%s: bad wakeup field \"%s\"", t[0].text, t[1].text, t[5].text);
    } else if (strcmp(t[6].text, "-") != 0 && !all_digits(t[6].text)) {
        report(cfg, 1, file, line, "service %s/%s: bad maxproc field \"%s\"", t[0].text, t[1].text, t[6].text);
    } else {
        int served = (ty == 1 && strcmp(t[7].text, "smtp") == 0
                      && (strcmp(t[0].text, "smtp") == 0 || strcmp(t[0].text, "relay") == 0))
                     || (ty == 0 && strcmp(t[7].text, "smtpd") == 0);
        if (served && strcmp(t[4].text, "y") == 0 && !cfg->chroot_file) {
            cfg->chroot_file = file;
            cfg->chroot_line = line;
        }
        if (served && ty == 0 && strcmp(t[3].text, "n") == 0)
            report(cfg, 0, file, line, "service %s/inet: unprivileged field n ignored: the SMTP workers always run "
                   "as mail_owner, never as root", t[0].text);
        /* Postfix keeps the last definition of a name/type pair. */
        if (ty == 0) {
            for (size_t i = 0; i < cfg->nsvcs; i++) {
                if (strcmp(cfg->svcs[i].pub.name, t[0].text) == 0) {
                    report(cfg, 0, file, line, "service %s/inet redefined; the definition at %s:%d is replaced",
                           t[0].text, cfg->svcs[i].pub.file, cfg->svcs[i].pub.line);
                    kt_free(cfg->svcs[i].over);
                    memmove(&cfg->svcs[i], &cfg->svcs[i + 1], (cfg->nsvcs - i - 1) * sizeof(*cfg->svcs));
                    cfg->nsvcs--;
                    break;
                }
            }
        }
        if (ty == 1 && strcmp(t[7].text, "smtp") == 0
            && (strcmp(t[0].text, "smtp") == 0 || strcmp(t[0].text, "relay") == 0)) {
            /* ktrelay's one outbound client stands for these transports;
             * their -o overrides are checked in build() */
            kt_info("%s:%d: service %s/%s ignored: ktrelay runs only inet smtpd services",
                    file, line, t[0].text, t[1].text);
            struct svc x = { 0 };
            x.pub.name = keep(cfg, kt_asprintf("%s/unix", t[0].text));
            x.pub.file = file;
            x.pub.line = line;
            parse_options(cfg, &x, t, nt, file, line);
            for (size_t i = 0; i < cfg->nxports; i++) {
                if (strcmp(cfg->xports[i].pub.name, x.pub.name) == 0) {
                    kt_free(cfg->xports[i].over);
                    memmove(&cfg->xports[i], &cfg->xports[i + 1], (cfg->nxports - i - 1) * sizeof(x));
                    cfg->nxports--;
                    break;
                }
            }
            cfg->xports = grow(cfg->xports, cfg->nxports, sizeof(x));
            cfg->xports[cfg->nxports++] = x;
        } else if (ty != 0 || strcmp(t[7].text, "smtpd") != 0) {
            kt_info("%s:%d: service %s/%s ignored: ktrelay runs only inet smtpd services",
                    file, line, t[0].text, t[1].text);
        } else {
            struct svc s = { 0 };
            s.pub.name = keep(cfg, kt_strdup(t[0].text));
            s.pub.file = file;
            s.pub.line = line;
            s.pub.maxproc = strcmp(t[6].text, "-") == 0 ? -1
                : strlen(t[6].text) > 9 ? -2 : atoi(t[6].text);
            if (s.pub.maxproc == -2)
                report(cfg, 1, file, line, "service %s/inet: bad maxproc field \"%s\"", t[0].text, t[6].text);
            if (parse_endpoint(cfg, s.pub.name, &s.pub.host, &s.pub.port) < 0)
                report(cfg, 1, file, line, "service %s/inet: bad service name: expected [host:]port "
                       "with a known port", s.pub.name);
            parse_options(cfg, &s, t, nt, file, line);
            cfg->svcs = grow(cfg->svcs, cfg->nsvcs, sizeof(*cfg->svcs));
            cfg->svcs[cfg->nsvcs++] = s;
        }
    }
    kt_free(t);
}

/* ---- building the contexts ---- */

static void ctx_init(struct kt_config *cfg, struct ctx *c, const char *file, int line)
{
    c->defs = kt_calloc(cfg->nsym, sizeof(*c->defs));
    c->val = kt_calloc(cfg->nsym, sizeof(*c->val));
    c->num = kt_calloc(cfg->nsym, sizeof(*c->num));
    c->state = kt_calloc(cfg->nsym, 1);
    c->file = file;
    c->line = line;
}

static void ctx_expand(struct kt_config *cfg, struct ctx *c)
{
    struct expander e = { .cfg = cfg, .c = c };
    for (size_t i = 0; i < cfg->npar; i++)
        expand_sym(&e, (int)i);
}

/* An unknown name in main.cf is a warning, as in Postfix (it may be a
 * variable for $name use); in a master.cf -o override it is an error: a
 * misspelt override would silently leave the service on main.cf's value. */
static void check_unknown(struct kt_config *cfg, const struct def *d, int is_override)
{
    int sym = sym_find(cfg, d->name);
    if ((size_t)sym < cfg->npar || cfg->extra_used[(size_t)sym - cfg->npar])
        return;
    const char *near = kt_param_suggest(d->name);
    const char *what = is_override ? "unknown parameter in -o override:" : "unknown parameter";
    if (near)
        report(cfg, is_override, d->file, d->line, "%s %s (did you mean %s?)", what, d->name, near);
    else
        report(cfg, is_override, d->file, d->line, "%s %s", what, d->name);
}

/* A Postfix feature ktrelay lacks that changes who may send, what is filtered
 * or where mail goes: running without it would silently do something else
 * than the configuration says, so a non-empty value is an error unless the
 * operator opts out with ktrelay_ignore_unimplemented = yes. */
static void check_unimplemented(struct kt_config *cfg, const struct ctx *c, const struct def *d)
{
    int sym = sym_find(cfg, d->name);
    if ((size_t)sym >= cfg->npar)
        return;
    const struct kt_param_def *p = kt_param_at((size_t)sym);
    if (p->implemented || !p->policy)
        return;
    const char *v = c->val[sym] ? c->val[sym] : "";
    if (!v[strspn(v, " \t,")]) {
        report(cfg, 0, d->file, d->line, "parameter %s is a Postfix parameter that ktrelay does not implement; "
               "ignored (empty)", d->name);
        return;
    }
    if (c->num[sym_find(cfg, "ktrelay_ignore_unimplemented")] == 1)
        report(cfg, 0, d->file, d->line, "parameter %s is not implemented by ktrelay; ignored because "
               "ktrelay_ignore_unimplemented = yes: mail is sent, filtered and routed as if it were not set",
               d->name);
    else
        report(cfg, 1, d->file, d->line, "parameter %s is not implemented by ktrelay, and running without it "
               "would change who may send, what is filtered or where mail goes; remove it, or set "
               "ktrelay_ignore_unimplemented = yes to run without it", d->name);
}

/* An -o override on master.cf's smtp or relay transport: ktrelay's outbound
 * client uses main.cf's values for every transport, so the override would
 * silently not apply (smtp_tls_security_level=encrypt would still send in
 * plaintext). An error unless ktrelay_ignore_unimplemented = yes; syslog_name
 * only warns (reported when parsed). */
static void check_transport_override(struct kt_config *cfg, const struct svc *x, const struct def *d)
{
    if (strcmp(d->name, "syslog_name") == 0)
        return;
    if (cfg->global.num[sym_find(cfg, "ktrelay_ignore_unimplemented")] == 1)
        report(cfg, 0, d->file, d->line, "service %s: -o %s is not applied: ktrelay's outbound client uses "
               "main.cf's values for every transport; ignored because ktrelay_ignore_unimplemented = yes",
               x->pub.name, d->name);
    else
        report(cfg, 1, d->file, d->line, "service %s: -o %s is not applied: ktrelay's outbound client uses "
               "main.cf's values for every transport; set it in main.cf, remove it, or set "
               "ktrelay_ignore_unimplemented = yes to run without it", x->pub.name, d->name);
}

static void build(struct kt_config *cfg)
{
    cfg->npar = kt_param_count();
    for (size_t i = 0; i < cfg->ndefs; i++)
        sym_add(cfg, cfg->defs[i].name);
    for (size_t s = 0; s < cfg->nsvcs; s++)
        for (size_t i = 0; i < cfg->svcs[s].nover; i++)
            sym_add(cfg, cfg->svcs[s].over[i].name);
    cfg->nsym = cfg->npar + cfg->nextra;
    cfg->extra_used = kt_calloc(cfg->nextra, 1);

    ctx_init(cfg, &cfg->global, cfg->main_file, 0);
    for (size_t i = 0; i < cfg->ndefs; i++)
        cfg->global.defs[sym_find(cfg, cfg->defs[i].name)] = &cfg->defs[i];
    ctx_expand(cfg, &cfg->global);
    long long limit = cfg->global.num[sym_find(cfg, "default_process_limit")];

    for (size_t s = 0; s < cfg->nsvcs; s++) {
        struct svc *v = &cfg->svcs[s];
        ctx_init(cfg, &v->ctx, v->pub.file, v->pub.line);
        memcpy(v->ctx.defs, cfg->global.defs, cfg->nsym * sizeof(*v->ctx.defs));
        for (size_t i = 0; i < v->nover; i++)
            v->ctx.defs[sym_find(cfg, v->over[i].name)] = &v->over[i];
        ctx_expand(cfg, &v->ctx);
        if (v->pub.maxproc == -1)
            v->pub.maxproc = (int)(limit > 0 && limit < 1000000 ? limit : 0);
        for (size_t o = 0; o < s; o++) {
            const struct kt_service *a = &cfg->svcs[o].pub, *b = &v->pub;
            int same_host = a->host == b->host || (a->host && b->host && strcmp(a->host, b->host) == 0);
            if (a->port == b->port && a->port > 0 && same_host)
                report(cfg, 1, b->file, b->line, "service %s uses the same address as service %s (%s:%d)",
                       b->name, a->name, a->file, a->line);
        }
    }
    if (cfg->nsvcs == 0)
        report(cfg, 0, cfg->master_file, 0, "no inet smtpd service defined; ktrelay will not listen");

    for (size_t i = 0; i < cfg->ndefs; i++) {
        check_unknown(cfg, &cfg->defs[i], 0);
        check_unimplemented(cfg, &cfg->global, &cfg->defs[i]);
    }
    for (size_t x = 0; x < cfg->nxports; x++)
        for (size_t i = 0; i < cfg->xports[x].nover; i++)
            check_transport_override(cfg, &cfg->xports[x], &cfg->xports[x].over[i]);
    for (size_t s = 0; s < cfg->nsvcs; s++) {
        for (size_t i = 0; i < cfg->svcs[s].nover; i++) {
            check_unknown(cfg, &cfg->svcs[s].over[i], 1);
            check_unimplemented(cfg, &cfg->svcs[s].ctx, &cfg->svcs[s].over[i]);
        }
    }
}

static char *machine_hostname(void)
{
    char name[256];
    if (gethostname(name, sizeof(name)) < 0 || !name[0])
        return kt_strdup("localhost");
    name[sizeof(name) - 1] = '\0';
    return kt_strdup(name);
}

int kt_config_load_text(const char *main_cf, const char *master_cf, const char *label, struct kt_config **out)
{
    struct kt_config *cfg = kt_calloc(1, sizeof(*cfg));
    int dir = label && *label;
    cfg->main_file = dir ? kt_asprintf("%s/main.cf", label) : kt_strdup("main.cf");
    cfg->master_file = master_cf ? (dir ? kt_asprintf("%s/master.cf", label) : kt_strdup("master.cf"))
                                 : kt_strdup("built-in master.cf");
    cfg->hostname = machine_hostname();

    logical_lines(cfg, main_cf ? main_cf : "", cfg->main_file, main_line, NULL);
    logical_lines(cfg, master_cf ? master_cf : default_master_cf, cfg->master_file, master_line, NULL);
    build(cfg);

    *out = NULL;
    if (cfg->errors) {
        kt_config_free(cfg);
        return -EINVAL;
    }
    *out = cfg;
    return 0;
}

/* Whole file, NUL-terminated. */
static int read_file(const char *path, char **text)
{
    *text = NULL;
    FILE *f = fopen(path, "r");
    if (!f)
        return -errno;
    size_t len = 0, cap = 8192, n;
    char *p = kt_malloc(cap);
    while ((n = fread(p + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 == cap) {
            cap *= 2;
            p = kt_realloc(p, cap);
        }
        if (len > MAX_FILE)
            break;
    }
    int rc = ferror(f) ? -EIO : len > MAX_FILE ? -EFBIG : 0;
    fclose(f);
    if (rc < 0) {
        kt_free(p);
        return rc;
    }
    p[len] = '\0';
    *text = p;
    return 0;
}

int kt_config_load(const char *dir, struct kt_config **out)
{
    char *main_path = kt_asprintf("%s/main.cf", dir), *master_path = kt_asprintf("%s/master.cf", dir);
    char *main_cf = NULL, *master_cf = NULL;
    *out = NULL;
    int rc = read_file(main_path, &main_cf);
    if (rc < 0) {
        kt_err("%s: cannot read: %s", main_path, strerror(-rc));
        goto out;
    }
    rc = read_file(master_path, &master_cf);
    if (rc == -ENOENT) {
        rc = 0;
    } else if (rc < 0) {
        kt_err("%s: cannot read: %s", master_path, strerror(-rc));
        goto out;
    }
    rc = kt_config_load_text(main_cf, master_cf, dir, out);
out:
    kt_free(main_cf);
    kt_free(master_cf);
    kt_free(main_path);
    kt_free(master_path);
    return rc;
}

void kt_config_free(struct kt_config *cfg)
{
    if (!cfg)
        return;
    for (size_t s = 0; s < cfg->nsvcs; s++) {
        free_ctx(&cfg->svcs[s].ctx, cfg->nsym);
        kt_free(cfg->svcs[s].over);
    }
    kt_free(cfg->svcs);
    for (size_t x = 0; x < cfg->nxports; x++)
        kt_free(cfg->xports[x].over);
    kt_free(cfg->xports);
    free_ctx(&cfg->global, cfg->nsym);
    for (size_t i = 0; i < cfg->npool; i++)
        kt_free(cfg->pool[i]);
    kt_free(cfg->pool);
    for (size_t i = 0; i < cfg->nseen; i++)
        kt_free(cfg->seen[i]);
    kt_free(cfg->seen);
    kt_free(cfg->defs);
    kt_free(cfg->extra);
    kt_free(cfg->extra_used);
    kt_free(cfg->main_file);
    kt_free(cfg->master_file);
    kt_free(cfg->hostname);
    kt_free(cfg);
}

/* ---- reading a loaded configuration ---- */

int kt_config_chroot(const struct kt_config *cfg, const char **file, int *line)
{
    if (!cfg->chroot_file)
        return 0;
    *file = cfg->chroot_file;
    *line = cfg->chroot_line;
    return 1;
}

size_t kt_config_service_count(const struct kt_config *cfg)
{
    return cfg ? cfg->nsvcs : 0;
}

const struct kt_service *kt_config_service(const struct kt_config *cfg, size_t i)
{
    return cfg && i < cfg->nsvcs ? &cfg->svcs[i].pub : NULL;
}

static const struct ctx *ctx_of(const struct kt_config *cfg, const struct kt_service *svc)
{
    for (size_t i = 0; svc && i < cfg->nsvcs; i++)
        if (&cfg->svcs[i].pub == svc)
            return &cfg->svcs[i].ctx;
    return &cfg->global;
}

/* Table index of NAME when its type is one of the allowed ones, or -1. */
int kt_config_where(const struct kt_config *cfg, const struct kt_service *svc, const char *name,
                    const char **file, int *line)
{
    int sym = sym_find(cfg, name);
    if (sym < 0)
        return 0;
    const struct def *d = ctx_of(cfg, svc)->defs[sym];
    if (!d)
        return 0;
    *file = d->file;
    *line = d->line;
    return 1;
}

static int typed_index(const char *name, enum kt_param_type a, enum kt_param_type b)
{
    const struct kt_param_def *p = kt_param_find(name);
    if (!p || (p->type != a && p->type != b))
        return -1;
    return (int)(p - kt_param_at(0));
}

const char *kt_config_get(const struct kt_config *cfg, const struct kt_service *svc, const char *name)
{
    const struct kt_param_def *p = kt_param_find(name);
    return p ? ctx_of(cfg, svc)->val[p - kt_param_at(0)] : NULL;
}

int kt_config_get_bool(const struct kt_config *cfg, const struct kt_service *svc, const char *name)
{
    int i = typed_index(name, KT_PARAM_BOOL, KT_PARAM_BOOL);
    return i < 0 ? -1 : (int)ctx_of(cfg, svc)->num[i];
}

long long kt_config_get_int(const struct kt_config *cfg, const struct kt_service *svc, const char *name)
{
    int i = typed_index(name, KT_PARAM_INT, KT_PARAM_SIZE);
    return i < 0 ? -1 : ctx_of(cfg, svc)->num[i];
}

long long kt_config_get_time(const struct kt_config *cfg, const struct kt_service *svc, const char *name)
{
    int i = typed_index(name, KT_PARAM_TIME, KT_PARAM_TIME);
    return i < 0 ? -1 : ctx_of(cfg, svc)->num[i];
}

static int cmp_def_name(const void *a, const void *b)
{
    return strcmp((*(const struct def *const *)a)->name, (*(const struct def *const *)b)->name);
}

void kt_config_print(const struct kt_config *cfg, FILE *out, int nondefault_only)
{
    if (nondefault_only) {
        /* the effective (last) definition of each name, in name order */
        const struct def **list = kt_calloc(cfg->ndefs, sizeof(*list));
        size_t n = 0;
        for (size_t i = 0; i < cfg->ndefs; i++)
            if (cfg->global.defs[sym_find(cfg, cfg->defs[i].name)] == &cfg->defs[i])
                list[n++] = &cfg->defs[i];
        qsort(list, n, sizeof(*list), cmp_def_name);
        for (size_t i = 0; i < n; i++)
            fprintf(out, "%s = %s\n", list[i]->name, list[i]->value);
        kt_free(list);
        return;
    }
    for (size_t i = 0; i < cfg->npar; i++) {
        const struct kt_param_def *p = kt_param_at(i);
        const struct def *d = cfg->global.defs[i];
        if (p->implemented)
            fprintf(out, "%s = %s\n", p->name, d ? d->value : p->def ? p->def : cfg->global.val[i]);
    }
}

int kt_config_print_param(const struct kt_config *cfg, FILE *out, const char *name)
{
    int sym = sym_find(cfg, name);
    if (sym < 0)
        return -ENOENT;
    const struct def *d = cfg->global.defs[sym];
    if ((size_t)sym < cfg->npar) {
        const struct kt_param_def *p = kt_param_at((size_t)sym);
        fprintf(out, "%s = %s\n", p->name, d ? d->value : p->def ? p->def : cfg->global.val[sym]);
        return 0;
    }
    if (!d)
        return -ENOENT;
    fprintf(out, "%s = %s\n", name, d->value);
    return 0;
}
