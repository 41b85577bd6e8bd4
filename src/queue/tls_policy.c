/* Per-destination outbound TLS policy (see tls_policy.h): smtp_tls_policy_maps
 * over main.cf's smtp_tls_* defaults, as Postfix's smtp(8) reads them
 * (postconf(5) smtp_tls_policy_maps, TLS_README "TLS policy table"). Table
 * entries are parsed once at load for validation and again at each lookup
 * (a few dozen bytes; lookups happen per connection, not per message). */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "core/alloc.h"
#include "conf/config.h"
#include "core/table.h"
#include "queue/tls_policy.h"
#include "tls/tls.h"

#define LIST_SEP " \t,\r\n"

struct kt_tls_policy_set {
    struct kt_tls_policy_defaults def;
    struct kt_maps *maps;
    struct kt_tls_policy dflt;        /* the main.cf policy */
    int uses_tls, uses_dane;
};

static const char *const level_names[] = {
    [KT_SMTP_TLS_NONE] = "none", [KT_SMTP_TLS_MAY] = "may", [KT_SMTP_TLS_ENCRYPT] = "encrypt",
    [KT_SMTP_TLS_VERIFY] = "verify", [KT_SMTP_TLS_SECURE] = "secure", [KT_SMTP_TLS_DANE] = "dane",
    [KT_SMTP_TLS_DANE_ONLY] = "dane-only", [KT_SMTP_TLS_FINGERPRINT] = "fingerprint",
};
#define N_LEVELS (sizeof(level_names) / sizeof(level_names[0]))

int kt_tls_level_parse(const char *s)
{
    if (!s || !*s)
        return KT_SMTP_TLS_NONE;
    for (size_t i = 0; i < N_LEVELS; i++)
        if (!strcasecmp(s, level_names[i]))
            return (int)i;
    return -1;
}

const char *kt_tls_level_name(int level)
{
    return level >= 0 && (size_t)level < N_LEVELS ? level_names[level] : "invalid";
}

int kt_tls_level_mandatory(int level)
{
    return level != KT_SMTP_TLS_NONE && level != KT_SMTP_TLS_MAY && level != KT_SMTP_TLS_DANE;
}

int kt_tls_level_authenticates(int level)
{
    return level == KT_SMTP_TLS_VERIFY || level == KT_SMTP_TLS_SECURE || level == KT_SMTP_TLS_FINGERPRINT
           || level == KT_SMTP_TLS_DANE || level == KT_SMTP_TLS_DANE_ONLY;
}

/* Append the words of a main.cf list (separated by spaces, commas, or sep itself) to out, joined by sep. */
static int join_list(char *out, size_t len, size_t *used, const char *list, char sep)
{
    char seps[8];
    snprintf(seps, sizeof(seps), "%s%c", " \t,\r\n", sep);
    for (const char *s = list + strspn(list, seps); *s; s += strspn(s, seps)) {
        size_t w = strcspn(s, seps);
        if (*used + w + 2 > len)
            return -ENOSPC;
        if (*used)
            out[(*used)++] = sep;
        memcpy(out + *used, s, w);
        *used += w;
        out[*used] = '\0';
        s += w;
    }
    return 0;
}

/* A policy's storage: strings are appended into p->buf, NUL-separated. */
static const char *keep(struct kt_tls_policy *p, size_t *used, const char *s, size_t n)
{
    if (*used + n + 1 > sizeof(p->buf))
        return NULL;
    char *d = p->buf + *used;
    memcpy(d, s, n);
    d[n] = '\0';
    *used += n + 1;
    return d;
}

static int check_protocols(const char *spec, char *err, size_t errlen)
{
    int mn, mx;
    long no;
    return kt_tls_parse_protocols(spec, &mn, &mx, &no, err, errlen);
}

static int check_grade(const char *g, char *err, size_t errlen)
{
    if (!strcasecmp(g, "high") || !strcasecmp(g, "medium") || !strcasecmp(g, "low"))
        return 0;
    snprintf(err, errlen, "unsupported cipher grade \"%s\" (high, medium or low)", g);
    return -EINVAL;
}

static void defaults_for_level(const struct kt_tls_policy_defaults *def, struct kt_tls_policy *p)
{
    p->match = "";
    p->protocols = "";
    p->ciphers = "";
    p->exclude = "";
    p->servername = def->servername ? def->servername : "";
    p->fingerprint_digest = def->fingerprint_digest && *def->fingerprint_digest ? def->fingerprint_digest : "sha256";
}

/* match: main.cf lists become ':' (names) or '|' (fingerprints) separated, like table attributes. */
static int default_match(const struct kt_tls_policy_defaults *def, struct kt_tls_policy *p, size_t *used)
{
    const char *list = p->level == KT_SMTP_TLS_VERIFY        ? def->verify_cert_match
                       : p->level == KT_SMTP_TLS_SECURE      ? def->secure_cert_match
                       : p->level == KT_SMTP_TLS_FINGERPRINT ? def->fingerprint_cert_match
                                                             : NULL;
    char tmp[sizeof(p->buf)];
    size_t n = 0;
    tmp[0] = '\0';
    if (!list)
        return 0;
    if (join_list(tmp, sizeof(tmp), &n, list, p->level == KT_SMTP_TLS_FINGERPRINT ? '|' : ':') < 0)
        return -ENOSPC;
    const char *m = keep(p, used, tmp, n);
    if (!m)
        return -ENOSPC;
    p->match = m;
    return 0;
}

int kt_tls_policy_parse(const struct kt_tls_policy_defaults *def, const char *value, struct kt_tls_policy *out,
                        char *err, size_t errlen)
{
    size_t used = 0;
    char match[sizeof(out->buf)];
    size_t mlen = 0;
    int have_match = 0;

    memset(out, 0, offsetof(struct kt_tls_policy, buf));
    out->buf[0] = '\0';
    snprintf(out->source, sizeof(out->source), "smtp_tls_policy_maps");
    defaults_for_level(def, out);
    match[0] = '\0';
    const char *s = value + strspn(value, LIST_SEP);
    size_t wlen = strcspn(s, LIST_SEP);
    char word[64];
    if (wlen == 0) {
        snprintf(err, errlen, "empty TLS policy");
        return -EINVAL;
    }
    snprintf(word, sizeof(word), "%.*s", (int)(wlen < 63 ? wlen : 63), s);
    out->level = wlen < 63 ? kt_tls_level_parse(word) : -1;
    if (out->level < 0) {
        const char *near = kt_closest(s, wlen, level_names, N_LEVELS);
        snprintf(err, errlen, "unknown TLS security level \"%.*s\"%s%s%s; expected none, may, encrypt, dane, "
                 "dane-only, fingerprint, verify or secure", (int)wlen, s, near ? " (did you mean " : "",
                 near ? near : "", near ? "?)" : "");
        return -EINVAL;
    }
    for (s += wlen; *(s += strspn(s, LIST_SEP));) {
        wlen = strcspn(s, LIST_SEP);
        const char *eq = memchr(s, '=', wlen);
        if (!eq) {
            snprintf(err, errlen, "malformed attribute \"%.*s\" (expected name=value)", (int)wlen, s);
            return -EINVAL;
        }
        size_t nlen = (size_t)(eq - s), vlen = wlen - nlen - 1;
        const char *v = eq + 1;
        char val[sizeof(out->buf)];
        snprintf(val, sizeof(val), "%.*s", (int)vlen, v);
        if (nlen == 5 && !strncasecmp(s, "match", 5)) {
            if (out->level != KT_SMTP_TLS_FINGERPRINT && out->level != KT_SMTP_TLS_VERIFY
                && out->level != KT_SMTP_TLS_SECURE) {
                snprintf(err, errlen, "the match attribute is only for the fingerprint, verify and secure levels, "
                         "not %s", level_names[out->level]);
                return -EINVAL;
            }
            if (!vlen) {
                snprintf(err, errlen, "empty match attribute");
                return -EINVAL;
            }
            if (mlen + vlen + 2 > sizeof(match)) {
                snprintf(err, errlen, "match attributes too long");
                return -EINVAL;
            }
            if (mlen)
                match[mlen++] = out->level == KT_SMTP_TLS_FINGERPRINT ? '|' : ':';
            memcpy(match + mlen, v, vlen);
            match[mlen += vlen] = '\0';
            have_match = 1;
        } else if (nlen == 9 && !strncasecmp(s, "protocols", 9)) {
            if (check_protocols(val, err, errlen) < 0)
                return -EINVAL;
            out->protocols = keep(out, &used, v, vlen);
        } else if (nlen == 7 && !strncasecmp(s, "ciphers", 7)) {
            if (check_grade(val, err, errlen) < 0)
                return -EINVAL;
            out->ciphers = keep(out, &used, v, vlen);
        } else if (nlen == 7 && !strncasecmp(s, "exclude", 7)) {
            char *cl = NULL;
            if (kt_tls_cipherlist("medium", NULL, NULL, NULL, val, &cl, err, errlen) < 0)
                return -EINVAL;
            kt_free(cl);
            out->exclude = keep(out, &used, v, vlen);
        } else if (nlen == 10 && !strncasecmp(s, "servername", 10)) {
            out->servername = keep(out, &used, v, vlen);
        } else if (nlen == 16 && !strncasecmp(s, "connection_reuse", 16)) {
            /* ktrelay keeps connections per destination anyway; only the value is checked */
            if (strcasecmp(val, "yes") && strcasecmp(val, "no")) {
                snprintf(err, errlen, "bad connection_reuse value \"%s\" (yes or no)", val);
                return -EINVAL;
            }
        } else {
            static const char *const attrs[] = { "match", "protocols", "ciphers", "exclude", "servername",
                                                 "connection_reuse" };
            const char *near = kt_closest(s, nlen, attrs, 6);
            snprintf(err, errlen, "%s attribute \"%.*s\"%s%s%s; ktrelay takes match, protocols, ciphers, exclude, "
                     "servername and connection_reuse",
                     nlen == 6 && !strncasecmp(s, "tafile", 6) ? "unsupported" : "unknown", (int)nlen, s,
                     near ? " (did you mean " : "", near ? near : "", near ? "?)" : "");
            return -EINVAL;
        }
        if (!out->protocols || !out->ciphers || !out->exclude || !out->servername) {
            snprintf(err, errlen, "policy too long");
            return -EINVAL;
        }
        s += wlen;
    }
    if (have_match) {
        if (!(out->match = keep(out, &used, match, mlen))) {
            snprintf(err, errlen, "policy too long");
            return -EINVAL;
        }
    } else if (default_match(def, out, &used) < 0) {
        snprintf(err, errlen, "policy too long");
        return -EINVAL;
    }
    if (out->level == KT_SMTP_TLS_FINGERPRINT && !*out->match) {
        snprintf(err, errlen, "the fingerprint level needs match= (or smtp_tls_fingerprint_cert_match)");
        return -EINVAL;
    }
    return 0;
}

struct validate_ctx {
    const struct kt_tls_policy_set *s;
    char *err;
    size_t errlen;
    int uses_tls, uses_dane;
};

static int validate_entry(const char *key, const char *value, void *arg)
{
    struct validate_ctx *v = arg;
    struct kt_tls_policy p;
    char why[400];
    if (kt_tls_policy_parse(&v->s->def, value, &p, why, sizeof(why)) < 0) {
        snprintf(v->err, v->errlen, "entry \"%s\": %s", key ? key : "*", why);
        return -EINVAL;
    }
    v->uses_tls |= p.level != KT_SMTP_TLS_NONE;
    v->uses_dane |= p.level == KT_SMTP_TLS_DANE || p.level == KT_SMTP_TLS_DANE_ONLY;
    return 0;
}

int kt_tls_policy_set_new(const struct kt_tls_policy_defaults *def, struct kt_maps *maps,
                          struct kt_tls_policy_set **out, char *err, size_t errlen)
{
    struct kt_tls_policy_set *s = kt_calloc(1, sizeof(*s));
    int rc = 0;
    size_t used = 0;

    *out = NULL;
    s->def = *def;
    s->maps = maps;
    int level = kt_tls_level_parse(def->security_level);
    if (level < 0) {
        snprintf(err, errlen, "smtp_tls_security_level: unknown level \"%s\"", def->security_level);
        rc = -EINVAL;
        goto cleanup;
    }
    memset(&s->dflt, 0, sizeof(s->dflt));
    s->dflt.level = level;
    defaults_for_level(def, &s->dflt);
    snprintf(s->dflt.source, sizeof(s->dflt.source), "smtp_tls_security_level");
    if (default_match(def, &s->dflt, &used) < 0) {
        snprintf(err, errlen, "smtp_tls_*_cert_match: too long");
        rc = -EINVAL;
        goto cleanup;
    }
    if (level == KT_SMTP_TLS_FINGERPRINT && !*s->dflt.match) {
        snprintf(err, errlen, "smtp_tls_security_level = fingerprint needs smtp_tls_fingerprint_cert_match");
        rc = -EINVAL;
        goto cleanup;
    }
    if (s->dflt.fingerprint_digest[0] && !EVP_get_digestbyname(s->dflt.fingerprint_digest)) {
        snprintf(err, errlen, "smtp_tls_fingerprint_digest: unknown digest \"%s\"", s->dflt.fingerprint_digest);
        rc = -EINVAL;
        goto cleanup;
    }
    struct validate_ctx v = { s, err, errlen, level != KT_SMTP_TLS_NONE,
                              level == KT_SMTP_TLS_DANE || level == KT_SMTP_TLS_DANE_ONLY };
    if (maps && kt_maps_foreach(maps, validate_entry, &v) != 0) {
        rc = -EINVAL;
        goto cleanup;
    }
    s->uses_tls = v.uses_tls;
    s->uses_dane = v.uses_dane;
    *out = s;
    return 0;
cleanup:
    s->maps = NULL;          /* the caller keeps maps on failure */
    kt_tls_policy_set_free(s);
    return rc;
}

void kt_tls_policy_set_free(struct kt_tls_policy_set *s)
{
    if (!s)
        return;
    kt_maps_free(s->maps);
    kt_free(s);
}

int kt_tls_policy_set_uses_tls(const struct kt_tls_policy_set *s)
{
    return s && s->uses_tls;
}

int kt_tls_policy_set_uses_dane(const struct kt_tls_policy_set *s)
{
    return s && s->uses_dane;
}

void kt_tls_policy_lookup(const struct kt_tls_policy_set *s, const char *nexthop, struct kt_tls_policy *out)
{
    char key[300];
    char err[256];
    const char *v = NULL;

    if (!s) {
        memset(out, 0, sizeof(*out));
        out->level = KT_SMTP_TLS_NONE;
        out->match = out->protocols = out->ciphers = out->exclude = out->servername = "";
        out->fingerprint_digest = "sha256";
        snprintf(out->source, sizeof(out->source), "smtp_tls_security_level");
        return;
    }
    if (s->maps) {
        size_t n = 0;
        for (const char *p = nexthop; *p && n + 1 < sizeof(key); p++)
            key[n++] = (char)tolower((unsigned char)*p);
        key[n] = '\0';
        if (n && key[n - 1] == '.')
            key[--n] = '\0';
        v = kt_maps_get(s->maps, key);
        /* a bare domain: its parents as ".parent" keys (transport(5) style) */
        if (!v && !strchr(key, '[') && !strchr(key, ':')) {
            for (const char *dot = strchr(key + 1, '.'); !v && dot; dot = strchr(dot + 1, '.'))
                v = kt_maps_get(s->maps, dot);
        }
    }
    if (v && kt_tls_policy_parse(&s->def, v, out, err, sizeof(err)) == 0)
        return;
    /* the entries were all checked at load: a failure here cannot happen; fall back to the default */
    *out = s->dflt;
}

int kt_tls_policy_openssl(const struct kt_tls_policy_set *s, const struct kt_tls_policy *p, int *min_version,
                          int *max_version, long *no_mask, char **cipherlist)
{
    static const struct kt_tls_policy_defaults none = { 0 };
    const struct kt_tls_policy_defaults *d = s ? &s->def : &none;
    int mand = kt_tls_level_mandatory(p->level);
    char err[256];
    const char *protocols = *p->protocols ? p->protocols : mand ? d->mandatory_protocols : d->protocols;
    const char *grade = *p->ciphers ? p->ciphers : mand ? d->mandatory_ciphers : d->ciphers;
    const char *exclude = *p->exclude ? p->exclude : mand ? d->mandatory_exclude_ciphers : d->exclude_ciphers;

    *cipherlist = NULL;
    if (kt_tls_parse_protocols(protocols ? protocols : "", min_version, max_version, no_mask, err, sizeof(err)) < 0)
        return -EINVAL;
    return kt_tls_cipherlist(grade, d->high_cipherlist, d->medium_cipherlist, d->low_cipherlist, exclude,
                             cipherlist, err, sizeof(err));
}
