/* Alias databases: alias_maps tables in /etc/aliases syntax and the
 * :include: files they reference, read once at load. Afterwards all access is
 * read-only and allocation-free, so expansion can run on any event-loop thread.
 * Nested :include: files are loaded too; each file is read once, which also
 * makes include loops harmless here (expansion bounds its own recursion). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "delivery/aliases.h"
#include "core/table.h"

#define MAX_INCLUDES 1024

struct include_file {
    char *path;
    char *targets;   /* the file's targets as one comma list */
};

struct kt_aliases {
    struct kt_maps *maps;
    struct include_file *inc;
    size_t ninc;
};

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

int kt_alias_next(const char **cursor, char *buf, size_t len, enum kt_alias_type *type)
{
    const char *p = *cursor, *s, *e;
    int quoted = 0;
    size_t n;

    while (*p && (is_space(*p) || *p == ','))
        p++;
    if (!*p) {
        *cursor = p;
        return 0;
    }
    for (s = p; *p && (quoted || *p != ','); p++) {
        if (*p == '"')
            quoted = !quoted;
        else if (*p == '\\' && p[1])
            p++;
    }
    *cursor = p;
    for (e = p; e > s && is_space(e[-1]); e--)
        ;
    /* "|command with spaces" and "/file name" are written in quotes. */
    if (e - s >= 2 && *s == '"' && e[-1] == '"' && memchr(s + 1, '"', (size_t)(e - s - 2)) == NULL) {
        s++;
        e--;
    }
    n = (size_t)(e - s);
    if (n >= len) {
        if (len) {
            memcpy(buf, s, len - 1);
            buf[len - 1] = 0;
        }
        *type = KT_ALIAS_INVALID;
        return 1;
    }
    memcpy(buf, s, n);
    buf[n] = 0;
    if (buf[0] == '|') {
        *type = KT_ALIAS_COMMAND;
    } else if (n > 9 && strncasecmp(buf, ":include:", 9) == 0) {
        const char *path = buf + 9;
        while (is_space(*path))
            path++;
        memmove(buf, path, strlen(path) + 1);
        *type = buf[0] == '/' ? KT_ALIAS_INCLUDE : KT_ALIAS_INVALID;
    } else if (buf[0] == '/') {
        *type = KT_ALIAS_FILE;
    } else if (buf[0] == '\\') {
        memmove(buf, buf + 1, n);
        *type = buf[0] ? KT_ALIAS_USER : KT_ALIAS_INVALID;
    } else if (strchr(buf, '@')) {
        *type = KT_ALIAS_ADDRESS;
    } else {
        *type = KT_ALIAS_LOCAL;
    }
    return 1;
}

const char *kt_aliases_include(const struct kt_aliases *a, const char *path)
{
    for (size_t i = 0; a && i < a->ninc; i++)
        if (strcmp(a->inc[i].path, path) == 0)
            return a->inc[i].targets;
    return NULL;
}

const char *kt_aliases_get(const struct kt_aliases *a, const char *name)
{
    return a ? kt_maps_get(a->maps, name) : NULL;
}

struct load_ctx {
    struct kt_aliases *a;
    char *err;
    size_t errlen;
};

static int load_includes_of(struct load_ctx *ctx, const char *list);

/* Include files hold targets one or more per line; '#' lines are comments. */
static int load_include(struct load_ctx *ctx, const char *path)
{
    struct kt_aliases *a = ctx->a;
    FILE *f;
    char *line = NULL, *targets = kt_strdup("");
    size_t cap = 0, n = 0;

    if (kt_aliases_include(a, path)) {
        kt_free(targets);
        return 0;
    }
    if (a->ninc >= MAX_INCLUDES) {
        snprintf(ctx->err, ctx->errlen, "too many :include: files (limit %d)", MAX_INCLUDES);
        kt_free(targets);
        return -E2BIG;
    }
    f = fopen(path, "re");
    if (!f) {
        int e = errno;
        snprintf(ctx->err, ctx->errlen, "alias :include: file %s: %s", path, strerror(e));
        kt_free(targets);
        return -e;
    }
    while (getline(&line, &cap, f) >= 0) {
        char *p = line;
        size_t l;

        while (is_space(*p))
            p++;
        if (!*p || *p == '#')
            continue;
        l = strlen(p);
        while (l && is_space(p[l - 1]))
            p[--l] = 0;
        targets = kt_realloc(targets, n + l + 3);
        if (n) {
            memcpy(targets + n, ", ", 2);
            n += 2;
        }
        memcpy(targets + n, p, l + 1);
        n += l;
    }
    kt_free(line);
    fclose(f);
    a->inc = kt_realloc(a->inc, (a->ninc + 1) * sizeof(*a->inc));
    a->inc[a->ninc].path = kt_strdup(path);
    a->inc[a->ninc].targets = targets;
    a->ninc++;
    return load_includes_of(ctx, targets);
}

static int load_includes_of(struct load_ctx *ctx, const char *list)
{
    char buf[4096];
    enum kt_alias_type type;
    int rc = 0;

    while (rc == 0 && kt_alias_next(&list, buf, sizeof(buf), &type))
        if (type == KT_ALIAS_INCLUDE)
            rc = load_include(ctx, buf);
    return rc;
}

static int scan_value(const char *key, const char *value, void *arg)
{
    (void)key;
    return load_includes_of(arg, value);
}

int kt_aliases_open(const char *alias_maps, struct kt_aliases **out, char *err, size_t errlen)
{
    struct kt_aliases *a = kt_calloc(1, sizeof(*a));
    struct load_ctx ctx = { a, err, errlen };
    int rc = kt_maps_open(alias_maps, KT_TABLE_ALIASES, &a->maps, err, errlen);

    if (rc == 0)
        rc = kt_maps_foreach(a->maps, scan_value, &ctx);
    if (rc < 0) {
        kt_aliases_free(a);
        *out = NULL;
        return rc;
    }
    *out = a;
    return 0;
}

void kt_aliases_free(struct kt_aliases *a)
{
    if (!a)
        return;
    kt_maps_free(a->maps);
    for (size_t i = 0; i < a->ninc; i++) {
        kt_free(a->inc[i].path);
        kt_free(a->inc[i].targets);
    }
    kt_free(a->inc);
    kt_free(a);
}
