/* regexp: and pcre: lookup tables (Postfix regexp_table(5), pcre_table(5)) compiled with libpcre2-8.
 * The rules are kept in file order; an `if` rule knows where its block ends, so a lookup is one pass
 * over the rules. Patterns are compiled once at load; a lookup makes one pcre2 match data for the whole
 * pass and expands $n from its offsets. The contract is in regexp_table.h. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/log.h"
#include "core/regexp_table.h"

/* Per lookup: backtracking steps and heap (KiB) a pattern may use before the match is given up. */
#define MATCH_LIMIT 1000000
#define HEAP_LIMIT_KIB 16384

enum rule_op { RULE_MATCH, RULE_IF };

struct pattern {
    pcre2_code *re;
    int negate;
};

struct rule {
    enum rule_op op;
    struct pattern p1;
    struct pattern p2;   /* regexp: "/p1/!/p2/": p1 must match and p2 must not; re NULL otherwise */
    char *result;        /* RULE_MATCH */
    size_t skip;         /* RULE_IF: index of the first rule after its endif */
    unsigned lineno;
};

struct kt_regexp_table {
    char *name;
    int pcre_syntax;
    struct rule *rules;
    size_t n, cap;
    size_t *open_ifs;    /* while loading: indexes of the if rules not yet closed */
    size_t n_open, cap_open;
    uint32_t max_groups;
    unsigned unreadable;  /* rules skipped and unmatched if/endif: the table is refused */
    pcre2_general_context *gctx;   /* pcre2's memory through kt_malloc: out of memory aborts as elsewhere */
    pcre2_match_context *mctx;
    pcre2_compile_context *ccctx;
};

static void *pcre_malloc(PCRE2_SIZE size, void *data)
{
    (void)data;
    return kt_malloc(size);
}

static void pcre_free(void *p, void *data)
{
    (void)data;
    kt_free(p);
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

static int is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int keyword(const char *p, const char *kw)
{
    size_t n = strlen(kw);

    return strncasecmp(p, kw, n) == 0 && !is_alnum(p[n]) && p[n] != '_';
}

struct kt_regexp_table *kt_regexp_table_new(const char *name, int pcre_syntax)
{
    struct kt_regexp_table *t = kt_calloc(1, sizeof(*t));

    t->name = kt_strdup(name);
    t->pcre_syntax = pcre_syntax;
    t->gctx = pcre2_general_context_create(pcre_malloc, pcre_free, NULL);
    t->mctx = pcre2_match_context_create(t->gctx);
    t->ccctx = pcre2_compile_context_create(t->gctx);
    pcre2_set_match_limit(t->mctx, MATCH_LIMIT);
    pcre2_set_heap_limit(t->mctx, HEAP_LIMIT_KIB);
    return t;
}

static void pattern_free(struct pattern *p)
{
    pcre2_code_free(p->re);
    p->re = NULL;
}

/* Applies one flag letter to the compile options; 0, or -1 for a letter this syntax does not have. */
static int apply_flag(const struct kt_regexp_table *t, char f, uint32_t *opts)
{
    switch (f) {
    case 'i':
        *opts ^= PCRE2_CASELESS;
        return 0;
    case 'm':
        /* regexp: REG_NEWLINE (^ $ at lines, . not across them); pcre: PCRE2_MULTILINE */
        *opts ^= t->pcre_syntax ? PCRE2_MULTILINE : (PCRE2_MULTILINE | PCRE2_DOTALL);
        return 0;
    }
    if (!t->pcre_syntax)
        return -1;
    switch (f) {
    case 's':
        *opts ^= PCRE2_DOTALL;
        return 0;
    case 'x':
        *opts ^= PCRE2_EXTENDED;
        return 0;
    case 'A':
        *opts ^= PCRE2_ANCHORED;
        return 0;
    case 'E':
        *opts ^= PCRE2_DOLLAR_ENDONLY;
        return 0;
    case 'U':
        *opts ^= PCRE2_UNGREEDY;
        return 0;
    case 'X':   /* PCRE1's PCRE_EXTRA; PCRE2 has no equivalent and Postfix ignores it too */
        return 0;
    }
    return -1;
}

/* Reads [!]<d>pattern<d>flags at *pp and compiles it; -1 (warned) when the rule must be skipped. */
static int parse_pattern(struct kt_regexp_table *t, const char **pp, unsigned lineno, struct pattern *out)
{
    const char *p = *pp, *start;
    uint32_t opts = PCRE2_CASELESS;
    char delim, *text;
    int errcode;
    PCRE2_SIZE erroff;

    /* POSIX extended matching as regexec(3) without REG_NEWLINE: . matches a newline, $ only the end */
    if (!t->pcre_syntax)
        opts |= PCRE2_DOTALL | PCRE2_DOLLAR_ENDONLY;
    out->re = NULL;
    out->negate = 0;
    if (*p == '!') {
        out->negate = 1;
        p++;
        while (is_space(*p))
            p++;
    }
    delim = *p;
    if (!delim || is_space(delim) || is_alnum(delim) || delim == '\\') {
        kt_warn("%s, line %u: no regexp delimiter: this rule cannot be used", t->name, lineno);
        t->unreadable++;
        return -1;
    }
    start = ++p;
    while (*p && *p != delim) {
        if (*p == '\\' && p[1])
            p++;
        p++;
    }
    if (!*p) {
        kt_warn("%s, line %u: no closing regexp delimiter \"%c\": this rule cannot be used", t->name, lineno, delim);
        t->unreadable++;
        return -1;
    }
    text = kt_strndup(start, (size_t)(p - start));
    p++;
    for (; *p && !is_space(*p); p++) {
        if (!t->pcre_syntax && *p == '!' && !out->negate)
            break;   /* "/p1/!/p2/" */
        if (apply_flag(t, *p, &opts) < 0) {
            if (!t->pcre_syntax && *p == 'x')
                kt_warn("%s, line %u: basic regular expression syntax (flag x) is not supported: this rule "
                        "cannot be used", t->name, lineno);
            else
                kt_warn("%s, line %u: unknown regexp option \"%c\": this rule cannot be used", t->name, lineno, *p);
            t->unreadable++;
            kt_free(text);
            return -1;
        }
    }
    out->re = pcre2_compile((PCRE2_SPTR)text, PCRE2_ZERO_TERMINATED, opts, &errcode, &erroff, t->ccctx);
    if (!out->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(errcode, msg, sizeof(msg));
        kt_warn("%s, line %u: error in regexp \"%s\" at offset %zu: %s: this rule cannot be used", t->name, lineno, text,
                (size_t)erroff, (const char *)msg);
        t->unreadable++;
        kt_free(text);
        return -1;
    }
    kt_free(text);
    *pp = p;
    return 0;
}

/* Checks the $ references of a result against the pattern's groups; -1 (warned) to skip the rule. */
static int check_result(struct kt_regexp_table *t, const struct rule *r, unsigned lineno, uint32_t groups)
{
    for (const char *p = r->result; *p; p++) {
        unsigned long idx = 0;
        const char *q;
        char close = 0;

        if (*p != '$')
            continue;
        q = p + 1;
        if (*q == '$') {
            p = q;
            continue;
        }
        if (*q == '{' || *q == '(') {
            close = *q == '{' ? '}' : ')';
            q++;
        }
        if (!is_digit(*q)) {
            if (close || is_alnum(*q) || *q == '_') {
                kt_warn("%s, line %u: non-numeric replacement index in \"%s\": this rule cannot be used", t->name, lineno,
                        r->result);
                t->unreadable++;
                return -1;
            }
            continue;   /* a lone $ is text */
        }
        while (is_digit(*q) && idx < 1000)
            idx = idx * 10 + (unsigned long)(*q++ - '0');
        if (close ? *q != close : (is_alnum(*q) || *q == '_')) {
            kt_warn("%s, line %u: bad replacement index in \"%s\": this rule cannot be used", t->name, lineno, r->result);
            t->unreadable++;
            return -1;
        }
        if (r->p1.negate) {
            kt_warn("%s, line %u: $number found in negative match replacement text: this rule cannot be used", t->name,
                    lineno);
            t->unreadable++;
            return -1;
        }
        if (idx > groups) {
            kt_warn("%s, line %u: out-of-range replacement index \"%lu\": this rule cannot be used", t->name, lineno, idx);
            t->unreadable++;
            return -1;
        }
        p = close ? q : q - 1;
    }
    return 0;
}

static void push_rule(struct kt_regexp_table *t, const struct rule *r)
{
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 16;
        t->rules = kt_realloc(t->rules, t->cap * sizeof(*t->rules));
    }
    t->rules[t->n++] = *r;
}

void kt_regexp_table_add_line(struct kt_regexp_table *t, const char *line, unsigned lineno)
{
    struct rule r = { .lineno = lineno };
    const char *p = line;
    uint32_t groups = 0;

    while (is_space(*p))
        p++;
    if (keyword(p, "endif")) {
        p += 5;
        while (is_space(*p))
            p++;
        if (*p)
            kt_warn("%s, line %u: ignoring extra text after ENDIF", t->name, lineno);
        if (!t->n_open) {
            kt_warn("%s, line %u: ignoring ENDIF without matching IF", t->name, lineno);
            t->unreadable++;
            return;
        }
        t->rules[t->open_ifs[--t->n_open]].skip = t->n;
        return;
    }
    if (keyword(p, "if")) {
        p += 2;
        while (is_space(*p))
            p++;
        r.op = RULE_IF;
        if (parse_pattern(t, &p, lineno, &r.p1) < 0) {
            /* the block's rules still load; the IF that guards them would have to be fixed anyway, so its
             * body is made unreachable rather than unconditional */
            r.p1.re = NULL;
        }
        while (is_space(*p))
            p++;
        if (*p)
            kt_warn("%s, line %u: ignoring extra text after IF", t->name, lineno);
        if (t->n_open == t->cap_open) {
            t->cap_open = t->cap_open ? t->cap_open * 2 : 8;
            t->open_ifs = kt_realloc(t->open_ifs, t->cap_open * sizeof(*t->open_ifs));
        }
        t->open_ifs[t->n_open++] = t->n;
        push_rule(t, &r);
        return;
    }
    r.op = RULE_MATCH;
    if (parse_pattern(t, &p, lineno, &r.p1) < 0)
        return;
    if (!t->pcre_syntax && *p == '!') {
        const char *q = p;   /* "!/p2/": parsed as a negated pattern */
        if (parse_pattern(t, &q, lineno, &r.p2) < 0) {
            pattern_free(&r.p1);
            return;
        }
        p = q;
    }
    if (*p && !is_space(*p)) {
        kt_warn("%s, line %u: unexpected text after the pattern: this rule cannot be used", t->name, lineno);
        t->unreadable++;
        goto skip;
    }
    while (is_space(*p))
        p++;
    if (!*p)
        kt_warn("%s, line %u: no replacement text: using empty string", t->name, lineno);
    r.result = kt_strdup(p);
    pcre2_pattern_info(r.p1.re, PCRE2_INFO_CAPTURECOUNT, &groups);
    if (check_result(t, &r, lineno, groups) < 0)
        goto skip;
    if (groups > t->max_groups)
        t->max_groups = groups;
    push_rule(t, &r);
    return;
skip:
    pattern_free(&r.p1);
    pattern_free(&r.p2);
    kt_free(r.result);
}

unsigned kt_regexp_table_finish(struct kt_regexp_table *t)
{
    while (t->n_open) {
        struct rule *r = &t->rules[t->open_ifs[--t->n_open]];
        kt_warn("%s, line %u: IF has no matching ENDIF", t->name, r->lineno);
        t->unreadable++;
        r->skip = t->n;
    }
    kt_free(t->open_ifs);
    t->open_ifs = NULL;
    t->cap_open = 0;
    return t->unreadable;
}

/* 1 when the pattern applies (matches, or does not when negated), 0 when not, -1 on a match error. */
static int pattern_applies(const struct kt_regexp_table *t, const struct pattern *p, const char *key, size_t klen,
                           pcre2_match_data *md)
{
    int rc;

    if (!p->re)
        return 0;
    rc = pcre2_match(p->re, (PCRE2_SPTR)key, klen, 0, 0, md, t->mctx);
    if (rc == PCRE2_ERROR_NOMATCH)
        return p->negate;
    if (rc < 0) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        kt_warn("%s: matching \"%.100s\": %s: treated as no match", t->name, key, (const char *)msg);
        return -1;
    }
    return !p->negate;
}

static void expand(const char *tpl, const char *key, pcre2_match_data *md, char *buf, size_t buflen)
{
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    uint32_t npairs = pcre2_get_ovector_count(md);
    size_t o = 0;

#define PUT(c) do { if (o + 1 < buflen) buf[o++] = (c); } while (0)
    for (const char *p = tpl; *p; p++) {
        unsigned long idx = 0;
        const char *q;
        char close = 0;

        if (*p != '$') {
            PUT(*p);
            continue;
        }
        q = p + 1;
        if (*q == '$') {
            PUT('$');
            p = q;
            continue;
        }
        if (*q == '{' || *q == '(') {
            close = *q == '{' ? '}' : ')';
            q++;
        }
        if (!is_digit(*q)) {
            PUT('$');
            continue;
        }
        while (is_digit(*q) && idx < 1000)
            idx = idx * 10 + (unsigned long)(*q++ - '0');
        p = close ? q : q - 1;
        if (idx < npairs && ov[2 * idx] != PCRE2_UNSET && ov[2 * idx + 1] >= ov[2 * idx])
            for (PCRE2_SIZE i = ov[2 * idx]; i < ov[2 * idx + 1]; i++)
                PUT(key[i]);
    }
#undef PUT
    if (buflen)
        buf[o < buflen ? o : buflen - 1] = 0;
}

const char *kt_regexp_table_get(const struct kt_regexp_table *t, const char *key, char *buf, size_t buflen)
{
    pcre2_match_data *md;
    const char *found = NULL;
    size_t klen = strlen(key);

    if (!t->n)
        return NULL;
    md = pcre2_match_data_create(t->max_groups + 1, t->gctx);
    for (size_t i = 0; i < t->n;) {
        const struct rule *r = &t->rules[i];

        if (r->op == RULE_IF) {
            i = pattern_applies(t, &r->p1, key, klen, md) == 1 ? i + 1 : r->skip;
            continue;
        }
        i++;
        if (r->p2.re) {
            /* p2 first so that the match data ends holding p1's groups */
            /* "!/p2/" was parsed with its own '!': it applies when p2 does not match */
            if (pattern_applies(t, &r->p2, key, klen, md) != 1)
                continue;
        }
        if (pattern_applies(t, &r->p1, key, klen, md) != 1)
            continue;
        expand(r->result, key, md, buf, buflen);
        found = buf;
        break;
    }
    pcre2_match_data_free(md);
    return found;
}

int kt_regexp_table_foreach(const struct kt_regexp_table *t, int (*fn)(const char *key, const char *value, void *arg),
                            void *arg)
{
    int rc = 0;

    for (size_t i = 0; t && i < t->n && !rc; i++)
        if (t->rules[i].op == RULE_MATCH)
            rc = fn(NULL, t->rules[i].result, arg);
    return rc;
}

void kt_regexp_table_free(struct kt_regexp_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n; i++) {
        pattern_free(&t->rules[i].p1);
        pattern_free(&t->rules[i].p2);
        kt_free(t->rules[i].result);
    }
    kt_free(t->rules);
    kt_free(t->open_ifs);
    pcre2_match_context_free(t->mctx);
    pcre2_compile_context_free(t->ccctx);
    pcre2_general_context_free(t->gctx);
    kt_free(t->name);
    kt_free(t);
}
