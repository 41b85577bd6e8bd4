/* 8BITMIME to 7BIT conversion for a next hop without 8BITMIME (mime_downgrade.h). The input is first
 * brought to CRLF line ends (what the DATA path would send anyway), then each entity is parsed: its
 * header block (up to the empty line, or to the first line that is neither a header nor a continuation),
 * Content-Type (type, subtype, boundary) and Content-Transfer-Encoding. Multipart bodies are split at
 * their delimiter lines (RFC 2046 5.1.1: the CRLF before a delimiter belongs to it), preamble and
 * epilogue pass unchanged. */
#include "queue/mime_downgrade.h"

#include <string.h>
#include <strings.h>

#include "core/buf.h"

enum cte { CTE_NONE, CTE_7BIT, CTE_8BIT, CTE_BINARY, CTE_OTHER };

struct entity_hdr {
    size_t body;            /* offset of the body (after the empty line, if any) */
    size_t cte_start, cte_end;   /* the Content-Transfer-Encoding field with its continuations */
    int has_cte;
    enum cte cte;
    int multipart, rfc822, digest;
    char boundary[71];      /* RFC 2046: 1 to 70 characters */
    size_t boundary_len;
};

static void put(struct kt_buf *b, const void *p, size_t n)
{
    if (n)
        kt_buf_append(b, p, n);
}

static size_t line_end(const char *p, size_t n, size_t i)
{
    const char *e = memchr(p + i, '\n', n - i);
    return e ? (size_t)(e - p) + 1 : n;
}

static int has_8bit(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] & 0x80)
            return 1;
    return 0;
}

/* Skip blanks and RFC 5322 comments in a header value. */
static size_t skip_cfws(const char *v, size_t n, size_t i)
{
    while (i < n) {
        if (v[i] == ' ' || v[i] == '\t' || v[i] == '\r' || v[i] == '\n') {
            i++;
        } else if (v[i] == '(') {
            int depth = 0;
            for (; i < n; i++) {
                if (v[i] == '\\' && i + 1 < n)
                    i++;
                else if (v[i] == '(')
                    depth++;
                else if (v[i] == ')' && --depth == 0) {
                    i++;
                    break;
                }
            }
        } else {
            break;
        }
    }
    return i;
}

static int is_tspecial_or_end(char ch)
{
    return strchr("()<>@,;:\\\"/[]?= \t\r\n", ch) != NULL;
}

static size_t token(const char *v, size_t n, size_t i)
{
    while (i < n && !is_tspecial_or_end(v[i]) && (unsigned char)v[i] > 32)
        i++;
    return i;
}

/* A token with the comments and white space around it, from v[i]: its bounds in [*s, *e); returns the
 * index after the white space that follows it. */
static size_t cfws_token(const char *v, size_t n, size_t i, size_t *s, size_t *e)
{
    *s = skip_cfws(v, n, i);
    *e = token(v, n, *s);
    return skip_cfws(v, n, *e);
}

static int token_is(const char *v, size_t s, size_t e, const char *word)
{
    return e - s == strlen(word) && !strncasecmp(v + s, word, e - s);
}

static void parse_content_type(struct entity_hdr *h, const char *v, size_t n)
{
    size_t s, te, ss, se;
    size_t i = cfws_token(v, n, 0, &s, &te);
    if (i >= n || v[i] != '/')
        return;
    i = cfws_token(v, n, i + 1, &ss, &se);
    h->multipart = token_is(v, s, te, "multipart");
    h->rfc822 = token_is(v, s, te, "message") && token_is(v, ss, se, "rfc822");
    h->digest = h->multipart && token_is(v, ss, se, "digest");
    /* parameters: ; attribute = value */
    while (i < n) {
        i = skip_cfws(v, n, i);
        if (i >= n || v[i] != ';')
            break;
        size_t as, ae;
        i = cfws_token(v, n, i + 1, &as, &ae);
        if (i >= n || v[i] != '=')
            break;
        i = skip_cfws(v, n, i + 1);
        char val[sizeof(h->boundary)];
        size_t vl = 0;
        int too_long = 0;
        if (i < n && v[i] == '"') {
            for (i++; i < n && v[i] != '"'; i++) {
                if (v[i] == '\\' && i + 1 < n)
                    i++;
                if (v[i] == '\r' || v[i] == '\n')
                    continue;
                if (vl < sizeof(val) - 1)
                    val[vl++] = v[i];
                else
                    too_long = 1;
            }
            if (i < n)
                i++;
        } else {
            size_t vs = i;
            i = token(v, n, i);
            for (size_t k = vs; k < i; k++) {
                if (vl < sizeof(val) - 1)
                    val[vl++] = v[k];
                else
                    too_long = 1;
            }
        }
        if (token_is(v, as, ae, "boundary") && !too_long && vl > 0) {
            memcpy(h->boundary, val, vl);
            h->boundary[vl] = 0;
            h->boundary_len = vl;
        }
    }
}

static enum cte parse_cte(const char *v, size_t n)
{
    size_t s = skip_cfws(v, n, 0), e = token(v, n, s);
    if (token_is(v, s, e, "7bit"))
        return CTE_7BIT;
    if (token_is(v, s, e, "8bit"))
        return CTE_8BIT;
    if (token_is(v, s, e, "binary"))
        return CTE_BINARY;
    return CTE_OTHER;
}

/* The header block of the entity p[0..n). */
static void parse_headers(const char *p, size_t n, int digest_default, struct entity_hdr *h)
{
    memset(h, 0, sizeof(*h));
    h->rfc822 = digest_default;
    size_t i = 0;
    while (i < n) {
        size_t e = line_end(p, n, i);
        if (p[i] == '\r' || p[i] == '\n') {          /* the empty line */
            h->body = e;
            return;
        }
        /* field name: printable characters up to ':' */
        size_t k = i;
        while (k < e && p[k] != ':' && (unsigned char)p[k] > 32 && (unsigned char)p[k] < 127)
            k++;
        if (k == i || k >= e || p[k] != ':') {       /* not a header: the body starts here */
            h->body = i;
            return;
        }
        size_t fe = e;                               /* with its continuation lines */
        while (fe < n && (p[fe] == ' ' || p[fe] == '\t'))
            fe = line_end(p, n, fe);
        const char *v = p + k + 1;
        size_t vn = fe - (k + 1);
        if (token_is(p, i, k, "Content-Type")) {
            h->multipart = h->rfc822 = h->digest = 0;
            h->boundary_len = 0;
            parse_content_type(h, v, vn);
        } else if (token_is(p, i, k, "Content-Transfer-Encoding")) {
            h->has_cte = 1;
            h->cte = parse_cte(v, vn);
            h->cte_start = i;
            h->cte_end = fe;
        }
        i = fe;
    }
    h->body = n;
}

static const char hexdigits[] = "0123456789ABCDEF";

/* RFC 2045 6.7 quoted-printable of p[0..n) (CRLF line ends): literal printable ASCII but '=', blanks
 * literal except at the end of a line, lines of at most 76 characters with "=" soft breaks. */
static void qp_encode(const char *p, size_t n, struct kt_buf *out)
{
    size_t i = 0;
    while (i < n) {
        size_t e = line_end(p, n, i), ce = e;
        int crlf = 0;
        if (ce - i >= 2 && p[ce - 2] == '\r' && p[ce - 1] == '\n') {
            ce -= 2;
            crlf = 1;
        }
        size_t col = 0;
        for (size_t k = i; k < ce; k++) {
            unsigned char ch = (unsigned char)p[k];
            char tok[3];
            size_t t;
            int last = k + 1 == ce;
            if ((ch >= 33 && ch <= 126 && ch != '=') || ((ch == ' ' || ch == '\t') && !last)) {
                tok[0] = (char)ch;
                t = 1;
            } else {
                tok[0] = '=';
                tok[1] = hexdigits[ch >> 4];
                tok[2] = hexdigits[ch & 15];
                t = 3;
            }
            if (col + t > (last ? 76u : 75u)) {
                put(out, "=\r\n", 3);
                col = 0;
            }
            put(out, tok, t);
            col += t;
        }
        if (crlf)
            put(out, "\r\n", 2);
        i = e;
    }
}

/* The headers p[0..h->body) with the Content-Transfer-Encoding field replaced by (or, without one,
 * followed by) "Content-Transfer-Encoding: cte". */
static void put_headers(const char *p, const struct entity_hdr *h, const char *cte, struct kt_buf *out)
{
    size_t hb = h->body;
    int empty_line = hb >= 2 && p[hb - 2] == '\r' && p[hb - 1] == '\n' &&
                     (hb == 2 || (hb >= 4 && p[hb - 4] == '\r' && p[hb - 3] == '\n'));
    if (h->has_cte) {
        put(out, p, h->cte_start);
        kt_buf_printf(out, "Content-Transfer-Encoding: %s\r\n", cte);
        put(out, p + h->cte_end, h->body - h->cte_end);
        /* a body that began right after the fields gets the empty line, as Postfix's cleanup adds
         * it: encoded, its first line could otherwise read as one more field */
        if (!empty_line)
            put(out, "\r\n", 2);
        return;
    }
    /* the new field goes before the empty line (or, without one, one is added) */
    size_t fields = empty_line ? hb - 2 : hb;
    put(out, p, fields);
    if (fields > 0 && !(fields >= 2 && p[fields - 2] == '\r' && p[fields - 1] == '\n'))
        put(out, "\r\n", 2);
    kt_buf_printf(out, "Content-Transfer-Encoding: %s\r\n\r\n", cte);
}

static int entity(const char *p, size_t n, int depth, int digest_default, struct kt_buf *out);

/* Is the line p[i..e) a delimiter "--boundary" (close: "--boundary--"), blanks allowed before CRLF? */
static int delimiter(const char *p, size_t i, size_t e, const struct entity_hdr *h, int *close)
{
    size_t bl = h->boundary_len;
    if (e - i < 2 + bl || p[i] != '-' || p[i + 1] != '-' || memcmp(p + i + 2, h->boundary, bl))
        return 0;
    size_t k = i + 2 + bl;
    *close = e - k >= 2 && p[k] == '-' && p[k + 1] == '-';
    if (*close)
        k += 2;
    while (k < e && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r' || p[k] == '\n'))
        k++;
    return k == e;
}

static int multipart_body(const char *p, size_t n, const struct entity_hdr *h, int depth, struct kt_buf *out)
{
    int changed = 0, in_part = 0;
    size_t copied = 0, part = 0;   /* bytes up to copied are out; part: start of the current part */
    size_t i = 0;
    while (i < n) {
        size_t e = line_end(p, n, i);
        int close;
        if (delimiter(p, i, e, h, &close)) {
            if (in_part) {
                size_t ce = i >= part + 2 && p[i - 2] == '\r' && p[i - 1] == '\n' ? i - 2 : part;
                changed |= entity(p + part, ce - part, depth + 1, h->digest, out);
                copied = ce;
            }
            put(out, p + copied, e - copied);
            copied = e;
            if (close) {
                in_part = 0;
                break;
            }
            in_part = 1;
            part = e;
        }
        i = e;
    }
    if (in_part) {          /* no close delimiter: the last part runs to the end */
        changed |= entity(p + part, n - part, depth + 1, h->digest, out);
        copied = n;
    }
    put(out, p + copied, n - copied);
    return changed;
}

static int entity(const char *p, size_t n, int depth, int digest_default, struct kt_buf *out)
{
    struct entity_hdr h;
    if (depth > KT_MIME_NESTING_LIMIT) {
        put(out, p, n);
        return 0;
    }
    parse_headers(p, n, digest_default, &h);
    const char *body = p + h.body;
    size_t bn = n - h.body;
    int eight = h.cte == CTE_8BIT || h.cte == CTE_BINARY;
    if ((h.multipart && h.boundary_len) || h.rfc822) {
        struct kt_buf inner = { 0 };
        int changed = h.multipart ? multipart_body(body, bn, &h, depth, &inner)
                                  : entity(body, bn, depth + 1, 0, &inner);
        if (eight) {
            put_headers(p, &h, "7bit", out);
            changed = 1;
        } else {
            put(out, p, h.body);
        }
        if (inner.len)
            put(out, inner.data, inner.len);
        kt_buf_release(&inner);
        return changed;
    }
    if (eight || (h.cte == CTE_NONE && has_8bit(body, bn))) {
        put_headers(p, &h, "quoted-printable", out);
        qp_encode(body, bn, out);
        return 1;
    }
    put(out, p, n);
    return 0;
}

int kt_mime_downgrade(const char *in, size_t len, struct kt_buf *out)
{
    struct kt_buf norm = { 0 };
    kt_buf_reserve(&norm, len + len / 16 + 16);
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\n' || in[i] == '\r') {
            put(&norm, in + start, i - start);
            put(&norm, "\r\n", 2);
            if (in[i] == '\r' && i + 1 < len && in[i + 1] == '\n')
                i++;
            start = i + 1;
        }
    }
    put(&norm, in + start, len - start);
    int changed = entity(norm.data ? norm.data : "", norm.len, 0, 0, out);
    kt_buf_release(&norm);
    return changed;
}
