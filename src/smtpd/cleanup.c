/* Streaming header and body checks (contract in cleanup.h). Bytes are cut into physical lines in a
 * small line buffer; in a header section lines are gathered into the current logical header, which is
 * checked and written when the next line does not continue it; in a body each line is checked and
 * written at once. Output goes through a staging buffer so that the writer sees blocks, not lines. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/alloc.h"
#include "core/log.h"
#include "core/table.h"
#include "smtpd/cleanup.h"

#define OUT_BUF 16384
/* Time all the lookups of one message may take together. A hostile regexp: or pcre: rule costs up to
 * ~15 ms per lookup at the match limit, so a message of many headers or body lines could hold its worker
 * thread for minutes; past this budget the message is deferred (451 4.3.0) and no more lookups run. */
#define LOOKUP_BUDGET_NS (1000LL * 1000 * 1000)
#define BOUNDARY_MAX 2048 /* Postfix's mime_boundary_length_limit: longer ones are compared on this prefix */

struct kt_cleanup_checks {
    struct kt_maps *header, *mime, *nested, *body;
    size_t header_size_limit;
    unsigned long long body_size_limit;
    int need_queue;
};

enum hdr_class { HC_PRIMARY, HC_MULTIPART, HC_NESTED };

struct kt_cleanup {
    const struct kt_cleanup_checks *ck;
    kt_cleanup_out_fn out;
    void *out_arg;
    int behind;
    char obuf[OUT_BUF];
    size_t olen;

    char line[KT_CLEANUP_LINE_MAX];   /* physical line being gathered (without its end) */
    size_t line_len;
    int mid_line;                     /* the last piece handed on did not end its physical line */

    int in_headers;
    enum hdr_class hclass;            /* class of the current header section */
    char *hdr;                        /* the logical header being gathered, with its CRLFs */
    size_t hdr_len, hdr_cap;
    char *key;                        /* lookup key built from hdr */
    size_t key_cap;

    char *boundary[KT_CLEANUP_MIME_DEPTH];   /* of each open multipart level (allocated as levels open) */
    int depth;                        /* open multipart levels */
    int deep_multipart;               /* a multipart level beyond KT_CLEANUP_MIME_DEPTH was seen */
    char *next_boundary;              /* from this section's Content-Type: multipart, or NULL */
    int next_rfc822;                  /* this section's Content-Type is message/rfc822 */
    unsigned long long body_off;      /* body bytes seen (for body_checks_size_limit) */

    long long lookup_ns;              /* time spent in lookups for this message (CLOCK_MONOTONIC) */
    int stop;                         /* REJECT, DISCARD or REDIRECT: no more checks */
    int drop_output;                  /* REJECT or DISCARD: nothing more is written */
    enum kt_cleanup_verdict verdict;
    char reply[512];
    int hold;
    char *redirect, *filter;

    char queue_id[32];
    char *origin;                     /* "name[addr]" */
    char *tail;                       /* "; from=<s> to=<r> proto=P helo=<h>" */
};

/* ---- the tables ---- */

static int open_list(const char *name, const char *list, struct kt_maps **out, char *err, size_t errlen)
{
    char msg[512];
    int rc;

    *out = NULL;
    if (!list || !*list)
        return 0;
    rc = kt_maps_open(list, KT_TABLE_MAP, out, msg, sizeof(msg));
    if (rc < 0)
        kt_set_err(err, errlen, "%s: %s", name, msg);
    return rc;
}

static int action_is(const char *v, const char *word)
{
    size_t n = strlen(word);

    while (*v == ' ' || *v == '\t')
        v++;
    return strncasecmp(v, word, n) == 0 && (v[n] == 0 || v[n] == ' ' || v[n] == '\t');
}

static int queue_action(const char *key, const char *value, void *arg)
{
    (void)key;
    (void)arg;
    while (*value == ' ' || *value == '\t')
        value++;
    return action_is(value, "HOLD") || action_is(value, "REDIRECT") || action_is(value, "FILTER") ||
           value[0] == '$';
}

int kt_cleanup_checks_new(const struct kt_cleanup_params *p, struct kt_cleanup_checks **out, char *err,
                          size_t errlen)
{
    struct kt_cleanup_checks *c = kt_calloc(1, sizeof(*c));
    int rc;

    *out = NULL;
    if ((rc = open_list("header_checks", p->header_checks, &c->header, err, errlen)) < 0 ||
        (rc = open_list("mime_header_checks", p->mime_header_checks, &c->mime, err, errlen)) < 0 ||
        (rc = open_list("nested_header_checks", p->nested_header_checks, &c->nested, err, errlen)) < 0 ||
        (rc = open_list("body_checks", p->body_checks, &c->body, err, errlen)) < 0)
        goto fail;
    if (!c->header && !c->mime && !c->nested && !c->body) {
        kt_cleanup_checks_free(c);
        return 0;
    }
    if (p->header_size_limit <= 0) {
        kt_set_err(err, errlen, "header_size_limit must be a positive number of bytes");
        rc = -EINVAL;
        goto fail;
    }
    c->header_size_limit = (size_t)p->header_size_limit;
    c->body_size_limit = p->body_checks_size_limit > 0 ? (unsigned long long)p->body_checks_size_limit : 0;
    c->need_queue = kt_maps_foreach(c->header, queue_action, NULL) || kt_maps_foreach(c->mime, queue_action, NULL) ||
                    kt_maps_foreach(c->nested, queue_action, NULL) || kt_maps_foreach(c->body, queue_action, NULL);
    *out = c;
    return 0;
fail:
    kt_cleanup_checks_free(c);
    return rc;
}

int kt_cleanup_checks_need_queue(const struct kt_cleanup_checks *c)
{
    return c && c->need_queue;
}

void kt_cleanup_checks_free(struct kt_cleanup_checks *c)
{
    if (!c)
        return;
    kt_maps_free(c->header);
    kt_maps_free(c->mime);
    kt_maps_free(c->nested);
    kt_maps_free(c->body);
    kt_free(c);
}

/* ---- output ---- */

static void flush_out(struct kt_cleanup *c)
{
    if (c->olen) {
        c->behind |= c->out(c->out_arg, c->obuf, c->olen);
        c->olen = 0;
    }
}

static void emit(struct kt_cleanup *c, const char *p, size_t n)
{
    if (c->drop_output)
        return;
    if (n >= OUT_BUF) {
        flush_out(c);
        c->behind |= c->out(c->out_arg, p, n);
        return;
    }
    if (c->olen + n > OUT_BUF)
        flush_out(c);
    memcpy(c->obuf + c->olen, p, n);
    c->olen += n;
}

/* A PREPEND or REPLACE text and its CRLF. A text made with $n from a folded header carries the fold's
 * "\n": it is written as CRLF (and a continuation line starts with a blank), never as a bare LF. */
static void emit_line(struct kt_cleanup *c, const char *text)
{
    for (const char *p = text; *p;) {
        size_t n = strcspn(p, "\n");
        if (n && p[n] == '\n' && p[n - 1] == '\r')
            n--;
        emit(c, p, n);
        p += n;
        if (!*p)
            break;
        p += *p == '\r' ? 2 : 1;
        if (!*p)
            break;   /* a last line end would make the next line empty: the end of the header section */
        emit(c, "\r\n", 2);
        if (*p && *p != ' ' && *p != '\t')
            emit(c, "\t", 1);
    }
    emit(c, "\r\n", 2);
}

/* ---- the state ---- */

struct kt_cleanup *kt_cleanup_new(const struct kt_cleanup_checks *checks, const struct kt_cleanup_origin *o,
                                  kt_cleanup_out_fn out, void *arg)
{
    struct kt_cleanup *c = kt_calloc(1, sizeof(*c));

    c->ck = checks;
    c->out = out;
    c->out_arg = arg;
    c->in_headers = 1;
    c->hclass = HC_PRIMARY;
    snprintf(c->queue_id, sizeof(c->queue_id), "%s", o->queue_id ? o->queue_id : "NOQUEUE");
    c->origin = kt_strdup(o->client ? o->client : "unknown");
    c->tail = kt_asprintf(" from=<%s> to=<%s> proto=%s helo=<%s>", o->sender ? o->sender : "",
                          o->rcpt ? o->rcpt : "", o->proto ? o->proto : "SMTP", o->helo ? o->helo : "");
    return c;
}

void kt_cleanup_free(struct kt_cleanup *c)
{
    if (!c)
        return;
    kt_free(c->hdr);
    kt_free(c->key);
    for (int i = 0; i < KT_CLEANUP_MIME_DEPTH; i++)
        kt_free(c->boundary[i]);
    kt_free(c->next_boundary);
    kt_free(c->redirect);
    kt_free(c->filter);
    kt_free(c->origin);
    kt_free(c->tail);
    kt_free(c);
}

enum kt_cleanup_verdict kt_cleanup_verdict(const struct kt_cleanup *c)
{
    return c->verdict;
}

const char *kt_cleanup_reply(const struct kt_cleanup *c)
{
    return c->reply;
}

int kt_cleanup_hold(const struct kt_cleanup *c)
{
    return c->hold;
}

const char *kt_cleanup_redirect(const struct kt_cleanup *c)
{
    return c->redirect;
}

const char *kt_cleanup_filter(const struct kt_cleanup *c)
{
    return c->filter;
}

/* ---- actions ---- */

/* Postfix's is_header(): a name of printable characters other than ':', optional blanks, then ':'. */
static int is_header(const char *p, size_t n)
{
    size_t i = 0;

    while (i < n && (unsigned char)p[i] > ' ' && (unsigned char)p[i] < 127 && p[i] != ':')
        i++;
    if (i == 0)
        return 0;
    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    return i < n && p[i] == ':';
}

/* Makes an action's text (which $n may have filled with client bytes) one line for a reply or a log:
 * a line end and the blanks after it (a fold) become one space, other control characters and, unless
 * eight_bit, bytes above 126 become '?', as Postfix's printable(). */
static void one_line(char *s, int eight_bit)
{
    char *o = s;

    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        if (*p == '\r' || *p == '\n') {
            while (*p == '\r' || *p == '\n' || *p == ' ' || *p == '\t')
                p++;
            *o++ = ' ';
            continue;
        }
        *o++ = (*p < ' ' && *p != '\t') || *p == 127 || (*p > 127 && !eight_bit) ? '?' : (char)*p;
        p++;
    }
    *o = 0;
}

/* "QUEUEID: ACTION: CLASS CONTENT from ORIGIN; from=<> to=<> proto=P helo=<h>[: TEXT]" */
static void act_log(const struct kt_cleanup *c, const char *action, const char *cls, const char *content,
                    const char *text)
{
    char shown[201];
    size_t o = 0;

    /* at most 200 bytes of the content, as Postfix; the joints of folded lines are left out */
    for (const char *p = content; *p && o < sizeof(shown) - 1; p++)
        if (*p != '\n' && *p != '\r')
            shown[o++] = *p;
    shown[o] = 0;
    char *t = kt_strdup(text ? text : "");
    one_line(t, 1);
    kt_info_as("cleanup", "%s: %s: %s %s from %s;%s%s%s", c->queue_id, action, cls, shown, c->origin, c->tail,
               *t ? ": " : "", t);
    kt_free(t);
}

enum act_result { ACT_KEEP, ACT_DROP, ACT_REPLACE };

/* A REDIRECT address or FILTER next hop: one token of printable characters (it becomes an envelope line). */
static int one_token(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == 127)
            return 0;
    return 1;
}

static int is_dsn(const char *t)
{
    /* "D.DDD.DDD" followed by a blank or the end, D in 2, 4, 5 */
    const char *p = t;
    int n;

    if ((*p != '2' && *p != '4' && *p != '5') || p[1] != '.')
        return 0;
    p += 2;
    for (int part = 0; part < 2; part++) {
        for (n = 0; *p >= '0' && *p <= '9'; p++)
            n++;
        if (n < 1 || n > 3)
            return 0;
        if (part == 0 && *p++ != '.')
            return 0;
    }
    return *p == 0 || *p == ' ' || *p == '\t';
}

/* Acts on the result `value` for `content` (a header or body line); *repl gets REPLACE's text. */
static enum act_result act(struct kt_cleanup *c, const char *cls, const char *map, const char *content,
                           const char *value, char **repl)
{
    const char *text = value + strcspn(value, " \t");
    size_t wlen = (size_t)(text - value);
    int header = cls[0] == 'h';

    while (*text == ' ' || *text == '\t')
        text++;
#define IS(w) (wlen == strlen(w) && strncasecmp(value, w, wlen) == 0)
    if (IS("REJECT")) {
        char reason[400];
        one_line((char *)text, 0);   /* the SMTP reply is ASCII */
        if (!*text)
            snprintf(reason, sizeof(reason), "5.7.1 message content rejected");
        else if (is_dsn(text))
            snprintf(reason, sizeof(reason), "%s", text);
        else
            snprintf(reason, sizeof(reason), "5.7.1 %s", text);
        if (reason[0] != '4' && reason[0] != '5') {
            kt_warn("bad DSN action in %s -- need 4.x.x or 5.x.x", text);
            reason[0] = '4';
        }
        snprintf(c->reply, sizeof(c->reply), "%d %s", reason[0] == '4' ? 451 : 550, reason);
        c->verdict = KT_CLEANUP_REJECT;
        c->stop = c->drop_output = 1;
        act_log(c, "reject", cls, content, reason);
        return ACT_KEEP;
    }
    if (IS("WARN")) {
        act_log(c, "warning", cls, content, text);
        return ACT_KEEP;
    }
    if (IS("INFO")) {
        act_log(c, "info", cls, content, text);
        return ACT_KEEP;
    }
    if (IS("FILTER")) {
        if (!*text)
            kt_warn("missing FILTER command argument in %s map", map);
        else if (!strchr(text, ':') || !one_token(text))
            kt_warn("bad FILTER command %s in %s -- need transport:destination", text, map);
        else {
            kt_free(c->filter);
            c->filter = kt_strdup(text);
            act_log(c, "filter", cls, content, text);
        }
        return ACT_KEEP;
    }
    if (IS("DISCARD")) {
        act_log(c, "discard", cls, content, text);
        c->verdict = KT_CLEANUP_DISCARD;
        c->stop = c->drop_output = 1;
        return ACT_KEEP;
    }
    if (IS("HOLD")) {
        if (!c->hold) {
            act_log(c, "hold", cls, content, text);
            c->hold = 1;
        }
        return ACT_KEEP;
    }
    if (IS("PREPEND") || IS("REPLACE")) {
        int prepend = IS("PREPEND");
        if (!*text) {
            kt_warn("%s action without text in %s map", prepend ? "PREPEND" : "REPLACE", map);
            return ACT_KEEP;
        }
        if (header && !is_header(text, strlen(text))) {
            kt_warn("bad %s header text \"%s\" in %s map -- need \"headername: headervalue\"",
                    prepend ? "PREPEND" : "REPLACE", text, map);
            return ACT_KEEP;
        }
        act_log(c, prepend ? "prepend" : "replace", cls, content, text);
        if (prepend) {
            emit_line(c, text);
            return ACT_KEEP;
        }
        *repl = kt_strdup(text);
        return ACT_REPLACE;
    }
    if (IS("REDIRECT")) {
        if (!strchr(text, '@') || !one_token(text)) {
            kt_warn("bad REDIRECT target \"%s\" in %s map -- need user@domain", text, map);
            return ACT_KEEP;
        }
        kt_free(c->redirect);
        c->redirect = kt_strdup(text);
        act_log(c, "redirect", cls, content, text);
        c->stop = 1;
        return ACT_KEEP;
    }
    if (IS("IGNORE"))
        return ACT_DROP;
    if (IS("DUNNO") || IS("OK"))
        return ACT_KEEP;
#undef IS
    kt_warn("unknown command in %s map: %s", map, value);
    return ACT_KEEP;
}

/* Looks key up in maps and acts; the lookup result is copied first (a regexp result lives in a per-thread
 * buffer). */
static enum act_result check(struct kt_cleanup *c, const struct kt_maps *maps, const char *map, const char *cls,
                             const char *key, char **repl)
{
    const char *v;
    char value[4096];

    if (!maps || c->stop)
        return ACT_KEEP;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    v = kt_maps_get(maps, key);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c->lookup_ns += (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    if (c->lookup_ns > LOOKUP_BUDGET_NS) {
        /* a resource problem of this message, not a content verdict: try again later, as Postfix's
         * cleanup answers for its own trouble */
        kt_warn("%s: header and body checks took more than %lld ms for this message from %s;%s; message "
                "deferred", c->queue_id, LOOKUP_BUDGET_NS / 1000000, c->origin, c->tail);
        snprintf(c->reply, sizeof(c->reply), "451 4.3.0 Error: too much time in header and body checks");
        c->verdict = KT_CLEANUP_REJECT;
        c->stop = c->drop_output = 1;
        return ACT_KEEP;
    }
    if (!v)
        return ACT_KEEP;
    snprintf(value, sizeof(value), "%s", v);
    return act(c, cls, map, key, value, repl);
}

/* ---- MIME ---- */

static int mime_header(const char *h, size_t n)
{
    return (n >= 8 && strncasecmp(h, "Content-", 8) == 0) || (n >= 12 && strncasecmp(h, "MIME-Version", 12) == 0 &&
                                                               (h[12] == ':' || h[12] == ' ' || h[12] == '\t'));
}

/* Content-Type: remembers multipart/...; boundary=... and message/rfc822 for the end of this section. */
static void content_type(struct kt_cleanup *c, const char *key)
{
    const char *v = strchr(key, ':'), *b;

    if (!v)
        return;
    v++;
    while (*v == ' ' || *v == '\t' || *v == '\n')
        v++;
    if (strncasecmp(v, "message/rfc822", 14) == 0) {
        c->next_rfc822 = 1;
        return;
    }
    if (strncasecmp(v, "multipart/", 10) != 0)
        return;
    for (b = v; (b = strcasestr(b, "boundary")) != NULL; b += 8) {
        const char *p = b + 8;
        size_t n = 0;
        if (b > v && b[-1] != ';' && b[-1] != ' ' && b[-1] != '\t' && b[-1] != '\n')
            continue;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p++ != '=')
            continue;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '"') {
            p++;
            while (p[n] && p[n] != '"')
                n++;
        } else {
            while (p[n] && p[n] != ';' && p[n] != ' ' && p[n] != '\t' && p[n] != '\n')
                n++;
        }
        if (n) {
            kt_free(c->next_boundary);
            c->next_boundary = kt_strndup(p, n < BOUNDARY_MAX ? n : BOUNDARY_MAX);
        }
        return;
    }
}

/* A body line "--boundary" or "--boundary--" of an open level: 1 part start, 2 level end, 0 neither. */
static int boundary_line(struct kt_cleanup *c, const char *p, size_t n)
{
    if (n < 3 || p[0] != '-' || p[1] != '-')
        return 0;
    for (int i = c->depth - 1; i >= 0; i--) {
        size_t bl = strlen(c->boundary[i]);
        /* a boundary as long as the line buffer is compared on what the line's first piece holds */
        size_t cmp = n - 2 < bl && n >= KT_CLEANUP_LINE_MAX ? n - 2 : bl;
        if (n < 2 + cmp || memcmp(p + 2, c->boundary[i], cmp) != 0)
            continue;
        if (n >= 4 + bl && p[2 + bl] == '-' && p[3 + bl] == '-') {
            c->depth = i;
            return 2;
        }
        c->depth = i + 1;
        return 1;
    }
    return 0;
}

/* ---- headers ---- */

static void header_done(struct kt_cleanup *c)
{
    enum hdr_class cls;
    const struct kt_maps *maps;
    const char *map;
    enum act_result r;
    char *repl = NULL;
    size_t k = 0;

    if (!c->hdr_len)
        return;
    if (c->key_cap < c->hdr_len + 1) {
        c->key_cap = c->hdr_len + 1;
        c->key = kt_realloc(c->key, c->key_cap);
    }
    /* the key: CRLF between folded lines becomes "\n", the last line end goes */
    for (size_t i = 0; i < c->hdr_len; i++) {
        if (c->hdr[i] == '\r' && i + 1 < c->hdr_len && c->hdr[i + 1] == '\n')
            continue;
        c->key[k++] = c->hdr[i];
    }
    while (k && (c->key[k - 1] == '\n' || c->key[k - 1] == '\r'))
        k--;
    c->key[k] = 0;
    if (strncasecmp(c->key, "Content-Type", 12) == 0 && (c->key[12] == ':' || c->key[12] == ' ' || c->key[12] == '\t'))
        content_type(c, c->key);
    cls = mime_header(c->key, k) ? HC_MULTIPART : c->hclass;
    maps = cls == HC_PRIMARY ? c->ck->header : cls == HC_MULTIPART ? c->ck->mime : c->ck->nested;
    map = cls == HC_PRIMARY ? "header_checks" : cls == HC_MULTIPART ? "mime_header_checks" : "nested_header_checks";
    r = check(c, maps, map, "header", c->key, &repl);
    if (r == ACT_KEEP) {
        emit(c, c->hdr, c->hdr_len);
        if (c->hdr_len < 2 || c->hdr[c->hdr_len - 1] != '\n')
            emit(c, "\r\n", 2);   /* cut by header_size_limit or the end of the message */
    } else if (r == ACT_REPLACE) {
        emit_line(c, repl);
        kt_free(repl);
    }
    c->hdr_len = 0;
}

static void hdr_add(struct kt_cleanup *c, const char *p, size_t n)
{
    size_t room = c->ck->header_size_limit > c->hdr_len ? c->ck->header_size_limit - c->hdr_len : 0;

    if (n > room)
        n = room;   /* the excess is dropped (header_size_limit) */
    if (!n)
        return;
    if (c->hdr_len + n > c->hdr_cap) {
        c->hdr_cap = (c->hdr_len + n) * 2;
        if (c->hdr_cap > c->ck->header_size_limit + 2)
            c->hdr_cap = c->ck->header_size_limit + 2;
        c->hdr = kt_realloc(c->hdr, c->hdr_cap);
    }
    memcpy(c->hdr + c->hdr_len, p, n);
    c->hdr_len += n;
}

/* The end of a header section (its empty line was written): what follows. */
static void headers_end(struct kt_cleanup *c)
{
    if (c->next_boundary) {
        if (c->depth < KT_CLEANUP_MIME_DEPTH) {
            kt_free(c->boundary[c->depth]);
            c->boundary[c->depth++] = c->next_boundary;
        } else {
            c->deep_multipart = 1;
            kt_free(c->next_boundary);
        }
        c->next_boundary = NULL;
        c->next_rfc822 = 0;
        c->in_headers = 0;
        return;
    }
    if (c->next_rfc822) {
        c->next_rfc822 = 0;
        c->hclass = HC_NESTED;   /* an attached message: its own header section follows */
        return;
    }
    c->in_headers = 0;
}

/* ---- lines ---- */

static void body_piece(struct kt_cleanup *c, const char *p, size_t n, int start, int end)
{
    size_t tl = end && n >= 2 && p[n - 2] == '\r' ? n - 2 : (end && n && p[n - 1] == '\n' ? n - 1 : n);
    char *repl = NULL, key[KT_CLEANUP_LINE_MAX + 1];
    enum act_result r = ACT_KEEP;
    int b = 0;

    if (start && c->depth)
        b = boundary_line(c, p, tl);
    if (c->ck->body && !c->stop && (!c->ck->body_size_limit || c->body_off < c->ck->body_size_limit)) {
        memcpy(key, p, tl);
        key[tl] = 0;
        r = check(c, c->ck->body, "body_checks", "body", key, &repl);
    }
    c->body_off += n;
    if (r == ACT_KEEP) {
        emit(c, p, n);
    } else if (r == ACT_REPLACE) {
        emit(c, repl, strlen(repl));
        if (end)
            emit(c, "\r\n", 2);
        kt_free(repl);
    }
    if (b == 1) {
        c->in_headers = 1;   /* a body part's headers follow */
        c->hclass = HC_MULTIPART;
        kt_free(c->next_boundary);
        c->next_boundary = NULL;
        c->next_rfc822 = 0;
    }
}

/* One piece of a physical line: start = it begins the line, end = it ends it (its CRLF included). */
static void piece(struct kt_cleanup *c, const char *p, size_t n, int start, int end)
{
    if (!c->in_headers) {
        body_piece(c, p, n, start, end);
        return;
    }
    if (!start) {
        hdr_add(c, p, n);   /* the rest of a long header line */
        return;
    }
    if (c->hdr_len && (p[0] == ' ' || p[0] == '\t')) {
        hdr_add(c, p, n);   /* a folded continuation */
        return;
    }
    header_done(c);
    if ((n == 2 && p[0] == '\r' && p[1] == '\n') || (n == 1 && p[0] == '\n')) {
        emit(c, p, n);
        headers_end(c);
        return;
    }
    if (is_header(p, n)) {
        hdr_add(c, p, n);
        return;
    }
    /* not a header: the header section ended without an empty line */
    headers_end(c);
    c->in_headers = 0;
    body_piece(c, p, n, start, end);
}

int kt_cleanup_feed(struct kt_cleanup *c, const char *data, size_t len)
{
    c->behind = 0;
    while (len && !c->drop_output) {
        const char *nl = memchr(data, '\n', len);
        size_t take = nl ? (size_t)(nl - data) + 1 : len;

        if (c->line_len + take > sizeof(c->line)) {
            /* a long line: hand on what the buffer holds as one piece */
            size_t room = sizeof(c->line) - c->line_len;
            memcpy(c->line + c->line_len, data, room);
            piece(c, c->line, sizeof(c->line), !c->mid_line, 0);
            c->mid_line = 1;
            c->line_len = 0;
            data += room;
            len -= room;
            continue;
        }
        if (!nl) {
            memcpy(c->line + c->line_len, data, take);
            c->line_len += take;
            break;
        }
        if (c->line_len) {
            memcpy(c->line + c->line_len, data, take);
            piece(c, c->line, c->line_len + take, !c->mid_line, 1);
            c->line_len = 0;
        } else {
            piece(c, data, take, !c->mid_line, 1);
        }
        c->mid_line = 0;
        data += take;
        len -= take;
    }
    flush_out(c);
    return c->behind;
}

int kt_cleanup_finish(struct kt_cleanup *c)
{
    c->behind = 0;
    if (!c->drop_output) {
        if (c->line_len)
            piece(c, c->line, c->line_len, !c->mid_line, 1);
        c->line_len = 0;
        if (c->in_headers)
            header_done(c);
    }
    flush_out(c);
    return c->behind;
}
