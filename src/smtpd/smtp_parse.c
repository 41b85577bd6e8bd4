/* SMTP protocol parsers: line framing, verbs, MAIL/RCPT paths and ESMTP parameters, HELO names, BDAT and the
 * message body state machine. Guarantees: no allocation, no I/O, never reads or writes outside the given
 * lengths; the body parser gives the same result however the input is chunked, writes only canonical CRLF
 * lines and ends data only on CRLF.CRLF, so a bare LF or CR can never be used to smuggle a second message,
 * here or at a next hop. */
#include "smtpd/smtp_parse.h"

#include <arpa/inet.h>
#include <errno.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <stdio.h>
#include <string.h>

#define MAX_ADDR 512

static const char *const verb_names[] = {
    [KT_VERB_UNKNOWN] = "UNKNOWN", [KT_VERB_HELO] = "HELO", [KT_VERB_EHLO] = "EHLO",
    [KT_VERB_MAIL] = "MAIL", [KT_VERB_RCPT] = "RCPT", [KT_VERB_DATA] = "DATA", [KT_VERB_BDAT] = "BDAT",
    [KT_VERB_RSET] = "RSET", [KT_VERB_NOOP] = "NOOP", [KT_VERB_QUIT] = "QUIT", [KT_VERB_VRFY] = "VRFY",
    [KT_VERB_EXPN] = "EXPN", [KT_VERB_HELP] = "HELP", [KT_VERB_STARTTLS] = "STARTTLS",
    [KT_VERB_AUTH] = "AUTH", [KT_VERB_ETRN] = "ETRN",
};
#define N_VERBS (sizeof(verb_names) / sizeof(verb_names[0]))

static int is_sp(char c)
{
    return c == ' ' || c == '\t';
}

static int is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* Case-insensitive match of s[0..n) against an upper-case literal. ASCII only, independent of locale. */
static int ieq(const char *s, size_t n, const char *lit)
{
    size_t i;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 'a' && c <= 'z')
            c -= 'a' - 'A';
        if (lit[i] == '\0' || c != (unsigned char)lit[i])
            return 0;
    }
    return lit[n] == '\0';
}

/* Length of the well-formed UTF-8 sequence (2-4 bytes) at s, 0 if there is none: overlongs, surrogates and
 * truncated sequences are refused so that nothing malformed reaches logs, lookups or mailbox names. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t len, i;

    if (c >= 0xc2 && c <= 0xdf)
        len = 2;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4;
    else
        return 0;
    if (c == 0xe0)
        lo = 0xa0;
    else if (c == 0xed)
        hi = 0x9f;
    else if (c == 0xf0)
        lo = 0x90;
    else if (c == 0xf4)
        hi = 0x8f;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return len;
}

const char *kt_smtp_verb_str(enum kt_smtp_verb v)
{
    return (unsigned)v < N_VERBS ? verb_names[v] : "UNKNOWN";
}

enum kt_line_status kt_smtp_frame_line(const char *buf, size_t len, size_t max, size_t *line_len,
                                       size_t *consumed, int *bare_lf)
{
    size_t scan = len < max + 2 ? len : max + 2;
    const char *lf = memchr(buf, '\n', scan);

    *line_len = 0;
    *consumed = 0;
    *bare_lf = 0;
    if (lf) {
        size_t i = (size_t)(lf - buf);
        int cr = i > 0 && buf[i - 1] == '\r';
        if (i - (size_t)cr > max)
            return KT_LINE_TOO_LONG;
        *line_len = i - (size_t)cr;
        *consumed = i + 1;
        *bare_lf = !cr;
        return KT_LINE_OK;
    }
    /* A CR right after max bytes may still be the start of the terminator. */
    if (len <= max || (len == max + 1 && buf[max] == '\r'))
        return KT_LINE_MORE;
    return KT_LINE_TOO_LONG;
}

void kt_smtp_parse_command(const char *line, size_t len, struct kt_smtp_command *out)
{
    size_t vlen = 0, i;

    while (vlen < len && !is_sp(line[vlen]))
        vlen++;
    out->verb = KT_VERB_UNKNOWN;
    for (i = 1; i < N_VERBS; i++) {
        if (ieq(line, vlen, verb_names[i])) {
            out->verb = (enum kt_smtp_verb)i;
            break;
        }
    }
    i = vlen;
    while (i < len && is_sp(line[i]))
        i++;
    while (len > i && is_sp(line[len - 1]))
        len--;
    out->arg = i < len ? line + i : "";
    out->arg_len = len - i;
}

int kt_smtp_arg_has_ctl(const char *arg, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)arg[i];
        if ((c < ' ' && c != '\t') || c == 0x7f)
            return 1;
    }
    return 0;
}

/* Index just past the closing quote of the quoted-string starting at s[0] == '"', or 0 if unterminated. */
static size_t quoted_end(const char *s, size_t n)
{
    size_t i;

    for (i = 1; i < n; i++) {
        if (s[i] == '\\')
            i++;
        else if (s[i] == '"')
            return i + 1;
    }
    return 0;
}

/* Domain name: dot-separated labels of letters, digits, '-' (not at either end of a label), '_' (seen in
 * real host names) and, when allowed, UTF-8. */
static int valid_domain_name(const char *s, size_t n, int allow_utf8, int *utf8)
{
    size_t i = 0, label = 0;

    if (n == 0 || n > 255)
        return 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t step = 1;

        if (c == '.') {
            if (label == 0 || s[i - 1] == '-')
                return 0;
            label = 0;
            i++;
            continue;
        }
        if (c == '-') {
            if (label == 0)
                return 0;
        } else if (c >= 0x80) {
            if (!allow_utf8 || (step = utf8_len((const unsigned char *)s + i, n - i)) == 0)
                return 0;
            *utf8 = 1;
        } else if (!is_alnum(c) && c != '_') {
            return 0;
        }
        label += step;
        if (label > 63)
            return 0;
        i += step;
    }
    return label > 0 && s[n - 1] != '-';
}

/* [1.2.3.4] or [IPv6:...]; general address literals ([tag:...]) are not accepted. */
static int valid_literal(const char *s, size_t n)
{
    char tmp[INET6_ADDRSTRLEN + 1];
    unsigned char bin[16];
    int af = AF_INET;

    if (n < 3 || s[0] != '[' || s[n - 1] != ']')
        return 0;
    s++;
    n -= 2;
    if (n > 5 && ieq(s, 5, "IPV6:")) {
        af = AF_INET6;
        s += 5;
        n -= 5;
    }
    /* inet_pton stops at a NUL: "[192.0.2.1\0junk]" must not pass as 192.0.2.1 */
    if (n >= sizeof(tmp) || memchr(s, '\0', n))
        return 0;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    return inet_pton(af, tmp, bin) == 1;
}

static int valid_domain(const char *s, size_t n, int allow_utf8, int *utf8)
{
    if (n > 0 && s[0] == '[')
        return valid_literal(s, n);
    return valid_domain_name(s, n, allow_utf8, utf8);
}

/* Unquoted local part: printable ASCII except specials and space, plus UTF-8. Dots are allowed anywhere
 * because real senders use "a..b" and "a." and Postfix takes them. */
static int valid_atom_text(const char *s, size_t n, int *utf8)
{
    size_t i = 0;

    if (n == 0)
        return 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t step = utf8_len((const unsigned char *)s + i, n - i);
            if (step == 0)
                return 0;
            *utf8 = 1;
            i += step;
            continue;
        }
        if (c <= ' ' || c == 0x7f || strchr("()<>[]:;@\\,\"", c))
            return 0;
        i++;
    }
    return 1;
}

/* Quoted local part, s[0] == '"' and s[n-1] is the closing quote: printable ASCII, quoted pairs, UTF-8. */
static int valid_quoted(const char *s, size_t n, int *utf8)
{
    size_t i = 1;

    while (i < n - 1) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t step = utf8_len((const unsigned char *)s + i, n - 1 - i);
            if (step == 0)
                return 0;
            *utf8 = 1;
            i += step;
            continue;
        }
        if (c < ' ' || c == 0x7f)
            return 0;
        i += c == '\\' ? 2 : 1;
    }
    return i == n - 1;
}

/* Mailbox ("local", "local@domain", "\"quoted\"@domain", optionally preceded by a source route) into path. */
static int parse_mailbox(const char *s, size_t n, struct kt_smtp_path *path)
{
    size_t i = 0, local_end;

    if (n > 0 && s[0] == '@') {
        for (;;) {
            size_t start = ++i;
            while (i < n && s[i] != ',' && s[i] != ':')
                i++;
            if (i == n || !valid_domain(s + start, i - start, 1, &path->utf8))
                return 0;
            if (s[i++] == ':')
                break;
            if (i == n || s[i] != '@')
                return 0;
        }
        path->had_route = 1;
        s += i;
        n -= i;
    }
    if (n == 0 || n > MAX_ADDR)
        return 0;
    if (s[0] == '"') {
        local_end = quoted_end(s, n);
        if (local_end < 3 || !valid_quoted(s, local_end, &path->utf8))
            return 0;
        path->quoted_local = 1;
    } else {
        const char *at = memchr(s, '@', n);
        local_end = at ? (size_t)(at - s) : n;
        if (!valid_atom_text(s, local_end, &path->utf8))
            return 0;
    }
    if (local_end < n && (s[local_end] != '@' || !valid_domain(s + local_end + 1, n - local_end - 1, 1,
                                                                &path->utf8)))
        return 0;
    memcpy(path->addr, s, n);
    path->addr[n] = '\0';
    path->addr_len = n;
    return 1;
}

struct cmd_replies {
    const char *keyword;      /* "FROM" or "TO" */
    const char *syntax;
    const char *bad_addr;
};

static const struct cmd_replies mail_replies = {
    "FROM", "501 5.5.4 Syntax: MAIL FROM:<address>", "501 5.1.7 Bad sender address syntax",
};
static const struct cmd_replies rcpt_replies = {
    "TO", "501 5.5.4 Syntax: RCPT TO:<address>", "501 5.1.3 Bad recipient address syntax",
};

/* "KEYWORD:" [spaces] path. On success *rest points just past the path (at spaces or the end). */
static const char *parse_path(const char *arg, size_t len, const struct cmd_replies *r,
                              struct kt_smtp_path *path, size_t *rest)
{
    size_t kl = strlen(r->keyword), i, end;

    memset(path, 0, sizeof(*path));
    if (len <= kl || arg[kl] != ':' || !ieq(arg, kl, r->keyword))
        return r->syntax;
    i = kl + 1;
    while (i < len && is_sp(arg[i]))
        i++;
    if (i == len)
        return r->syntax;
    if (arg[i] == '<') {
        size_t j = i + 1;
        while (j < len && arg[j] != '>') {
            if (arg[j] == '"') {
                size_t q = quoted_end(arg + j, len - j);
                if (q == 0)
                    return r->syntax;
                j += q;
            } else {
                j++;
            }
        }
        if (j == len || (j + 1 < len && !is_sp(arg[j + 1])))
            return r->syntax;
        *rest = j + 1;
        if (j == i + 1) {
            path->is_null = 1;
            return NULL;
        }
        return parse_mailbox(arg + i + 1, j - i - 1, path) ? NULL : r->bad_addr;
    }
    end = i;
    while (end < len && !is_sp(arg[end]))
        end++;
    *rest = end;
    /* "FROM:John Doe <j@d>": a display name, not a bracketless address followed by parameters. */
    while (end < len) {
        if (arg[end] == '<' && is_sp(arg[end - 1]))
            return r->syntax;
        end++;
    }
    return parse_mailbox(arg + i, *rest - i, path) ? NULL : r->bad_addr;
}

enum { P_SIZE, P_BODY, P_SMTPUTF8, P_AUTH, P_RET, P_ENVID, P_NOTIFY, P_ORCPT, P_COUNT };
#define P_FIRST_RCPT P_NOTIFY

static const struct {
    const char *name, *bad, *dup;
} params[P_COUNT] = {
#define PARAM(n) { #n, "501 5.5.4 Bad " #n " parameter value", "501 5.5.4 Duplicate " #n " parameter" }
/* Postfix's smtpd words for the DSN parameters, one reply for a bad and a repeated value */
#define DSN_PARAM(n, e) { #n, "501 5.5.4 " e "Bad " #n " parameter syntax", "501 5.5.4 " e "Bad " #n " parameter syntax" }
    PARAM(SIZE), PARAM(BODY), PARAM(SMTPUTF8), PARAM(AUTH), DSN_PARAM(RET, ""), DSN_PARAM(ENVID, ""),
    DSN_PARAM(NOTIFY, "Error: "), DSN_PARAM(ORCPT, "Error: "),
#undef PARAM
#undef DSN_PARAM
};

static _Thread_local char unsupported_reply[96];

/* xtext (RFC 3461): chars 33..126 except '+' and '=', with '+' introducing two upper-case hex digits.
 * With utf8, raw UTF-8 is allowed too (RFC 6533 utf-8-addr-unitext). An encoded control character
 * (below 0x20, or DEL) is refused: the value would carry a line break into a queue file or a report. */
static int valid_xtext(const char *s, size_t n, size_t max, int utf8)
{
    size_t i = 0;

    if (n == 0 || n > max)
        return 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == '+') {
            int k;
            for (k = 1; k <= 2; k++) {
                unsigned char h = i + (size_t)k < n ? (unsigned char)s[i + (size_t)k] : 0;
                if (!is_digit(h) && !(h >= 'A' && h <= 'F'))
                    return 0;
            }
            if (s[i + 1] < '2' || (s[i + 1] == '7' && s[i + 2] == 'F'))
                return 0;
            i += 3;
        } else if (c >= 0x80 && utf8) {
            size_t step = utf8_len((const unsigned char *)s + i, n - i);
            if (step == 0)
                return 0;
            i += step;
        } else if (c < 33 || c > 126 || c == '=') {
            return 0;
        } else {
            i++;
        }
    }
    return 1;
}

static int parse_notify(const char *s, size_t n, unsigned *out)
{
    unsigned bits = 0;
    size_t i = 0;

    while (i < n) {
        const char *comma = memchr(s + i, ',', n - i);
        size_t wl = comma ? (size_t)(comma - (s + i)) : n - i;
        if (ieq(s + i, wl, "NEVER"))
            bits |= KT_NOTIFY_NEVER;
        else if (ieq(s + i, wl, "SUCCESS"))
            bits |= KT_NOTIFY_SUCCESS;
        else if (ieq(s + i, wl, "FAILURE"))
            bits |= KT_NOTIFY_FAILURE;
        else if (ieq(s + i, wl, "DELAY"))
            bits |= KT_NOTIFY_DELAY;
        else
            return 0;
        i += wl + 1;
        if (comma && i == n)
            return 0;
    }
    if (bits == 0 || ((bits & KT_NOTIFY_NEVER) && bits != KT_NOTIFY_NEVER))
        return 0;
    *out = bits;
    return 1;
}

/* ORCPT=addr-type;xtext. The "utf-8" type carries UTF-8 as is. */
static int valid_orcpt(const char *s, size_t n)
{
    const char *semi = memchr(s, ';', n);
    size_t tl, i;

    if (!semi || semi == s)
        return 0;
    tl = (size_t)(semi - s);
    for (i = 0; i < tl; i++)
        if (!is_alnum((unsigned char)s[i]) && s[i] != '-')
            return 0;
    return valid_xtext(semi + 1, n - tl - 1, 500, ieq(s, tl, "UTF-8"));
}

/* Value check and store for one parameter; v is NULL when there was no '='. Returns 0 if the value is bad. */
static int apply_param(int id, const char *v, size_t vl, struct kt_mail_params *m, struct kt_rcpt_params *r)
{
    size_t i;

    if (id == P_SMTPUTF8) {
        m->smtputf8 = 1;
        return v == NULL;
    }
    if (v == NULL || vl == 0)
        return 0;
    switch (id) {
    case P_SIZE:
        if (vl > 18)    /* keeps the value far from overflow; 10^18 bytes is not a message */
            return 0;
        m->size = 0;
        for (i = 0; i < vl; i++) {
            if (!is_digit((unsigned char)v[i]))
                return 0;
            m->size = m->size * 10 + (v[i] - '0');
        }
        return 1;
    case P_BODY:
        m->has_body = 1;
        if (ieq(v, vl, "7BIT"))
            m->body = KT_BODY_7BIT;
        else if (ieq(v, vl, "8BITMIME"))
            m->body = KT_BODY_8BITMIME;
        else if (ieq(v, vl, "BINARYMIME"))
            m->body = KT_BODY_BINARYMIME;
        else
            return 0;
        return 1;
    case P_AUTH:
        m->has_auth = 1;
        return valid_xtext(v, vl, 500, 0);
    case P_RET:
        m->ret = ieq(v, vl, "FULL") ? KT_RET_FULL : ieq(v, vl, "HDRS") ? KT_RET_HDRS : KT_RET_NONE;
        return m->ret != KT_RET_NONE;
    case P_ENVID:
        m->has_envid = 1;
        m->envid = v;
        m->envid_len = vl;
        /* Postfix: the decoded value must be printable ASCII */
        for (i = 0; i + 2 < vl; i++)
            if (v[i] == '+' && v[i + 1] >= '8')
                return 0;
        return valid_xtext(v, vl, 100, 0);
    case P_NOTIFY:
        r->has_notify = 1;
        return parse_notify(v, vl, &r->notify);
    default:    /* P_ORCPT */
        r->has_orcpt = 1;
        r->orcpt = v;
        r->orcpt_len = vl;
        return valid_orcpt(v, vl);
    }
}

/* Space-separated "KEYWORD[=value]" list; only the keywords of one command are known to it. */
static const char *parse_params(const char *s, size_t n, int is_mail, const char *syntax,
                                struct kt_mail_params *m, struct kt_rcpt_params *r)
{
    int first = is_mail ? 0 : P_FIRST_RCPT, last = is_mail ? P_FIRST_RCPT : P_COUNT;
    unsigned seen = 0;
    size_t i = 0;

    for (;;) {
        size_t start, kl, tl;
        const char *eq;
        int id;

        while (i < n && is_sp(s[i]))
            i++;
        if (i == n)
            return NULL;
        start = i;
        while (i < n && !is_sp(s[i]))
            i++;
        tl = i - start;
        eq = memchr(s + start, '=', tl);
        kl = eq ? (size_t)(eq - (s + start)) : tl;
        if (kl == 0 || !is_alnum((unsigned char)s[start]))
            return syntax;
        for (size_t k = 1; k < kl; k++)
            if (!is_alnum((unsigned char)s[start + k]) && s[start + k] != '-')
                return syntax;
        for (id = first; id < last; id++)
            if (ieq(s + start, kl, params[id].name))
                break;
        if (id == last) {
            snprintf(unsupported_reply, sizeof(unsupported_reply), "555 5.5.4 Unsupported option: %.*s",
                     (int)(kl < 64 ? kl : 64), s + start);
            return unsupported_reply;
        }
        if (seen & (1u << id))
            return params[id].dup;
        seen |= 1u << id;
        if (!apply_param(id, eq ? eq + 1 : NULL, eq ? tl - kl - 1 : 0, m, r))
            return params[id].bad;
    }
}

const char *kt_smtp_parse_mail(const char *arg, size_t len, struct kt_smtp_path *path, struct kt_mail_params *p)
{
    const char *err;
    size_t rest = 0;

    memset(p, 0, sizeof(*p));
    p->size = -1;
    err = parse_path(arg, len, &mail_replies, path, &rest);
    if (err)
        return err;
    return parse_params(arg + rest, len - rest, 1, mail_replies.syntax, p, NULL);
}

const char *kt_smtp_parse_rcpt(const char *arg, size_t len, struct kt_smtp_path *path, struct kt_rcpt_params *p)
{
    const char *err;
    size_t rest = 0;

    memset(p, 0, sizeof(*p));
    err = parse_path(arg, len, &rcpt_replies, path, &rest);
    if (err)
        return err;
    if (path->is_null)
        return rcpt_replies.bad_addr;
    return parse_params(arg + rest, len - rest, 0, rcpt_replies.syntax, NULL, p);
}

int kt_smtp_split_address(const char *addr, size_t len, size_t *at_pos)
{
    size_t i = 0;

    *at_pos = len;
    while (i < len) {
        if (addr[i] == '"') {
            size_t q = quoted_end(addr + i, len - i);
            if (q == 0)
                return -EINVAL;
            i += q;
            continue;
        }
        if (addr[i] == '@')
            *at_pos = i;
        i++;
    }
    return 0;
}

int kt_smtp_valid_helo(const char *arg, size_t len)
{
    int utf8 = 0;

    return valid_domain(arg, len, 0, &utf8);
}

const char *kt_smtp_parse_bdat(const char *arg, size_t len, unsigned long long *size, int *last)
{
    static const char syntax[] = "501 5.5.4 Syntax: BDAT count [LAST]";
    unsigned long long v = 0;
    size_t i = 0;

    while (len > 0 && is_sp(arg[len - 1]))
        len--;
    if (len == 0 || !is_digit((unsigned char)arg[0]))
        return syntax;
    for (; i < len && is_digit((unsigned char)arg[i]); i++) {
        unsigned d = (unsigned)(arg[i] - '0');
        if (v > (~0ULL - d) / 10)
            return syntax;
        v = v * 10 + d;
    }
    *last = 0;
    if (i < len) {
        if (!is_sp(arg[i]))
            return syntax;
        while (is_sp(arg[i]))
            i++;
        if (!ieq(arg + i, len - i, "LAST"))
            return syntax;
        *last = 1;
    }
    *size = v;
    return NULL;
}

/* Body states. BOL: just after a raw CRLF (or at the start), the only place where a dot can begin the end of
 * data. NBOL: just after a bare LF or bare CR (written out as CRLF): a dot there is unstuffed but can never
 * end the data. CR: a CR is held until the next byte says whether it was part of CRLF. */
enum { D_BOL = 0, D_MID, D_CR, D_DOT, D_DOT_CR, D_NBOL };

void kt_data_parser_init(struct kt_data_parser *p)
{
    memset(p, 0, sizeof(*p));
    p->state = D_BOL;
    p->ends_in_lf = 1;
}

void kt_data_parser_init_chunked(struct kt_data_parser *p)
{
    kt_data_parser_init(p);
    p->chunked = 1;
    p->state = D_MID;
}

static unsigned after_crlf(const struct kt_data_parser *p)
{
    return p->chunked ? D_MID : D_BOL;
}

static unsigned after_bare(const struct kt_data_parser *p)
{
    return p->chunked ? D_MID : D_NBOL;
}

/* Offset of the first CR or LF in s[k..n), or n. */
static size_t next_line_end(const char *s, size_t k, size_t n)
{
#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');
    for (; k + 16 <= n; k += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(s + k));
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)));
        if (m)
            return k + (size_t)__builtin_ctz(m);
    }
#endif
    for (; k < n; k++) {
        if (s[k] == '\r' || s[k] == '\n')
            return k;
    }
    return n;
}

/* In the middle of a line: the length of the longest prefix of s[0..n) that the byte-wise rules would copy
 * unchanged and leave in the middle of a line. Every CR in it is followed by LF, every LF follows a CR, and
 * after each such CRLF comes a byte inside the prefix that is not a dot (DATA mode: a dot there is stuffing
 * or the end of data). So a well-formed body is scanned 16 bytes at a time and copied in long runs; the
 * byte after the prefix (a CR or LF that needs the state machine) is left to the caller. */
static size_t plain_span(const char *s, size_t n, int chunked)
{
    size_t k = 0;
    for (;;) {
        size_t j = next_line_end(s, k, n);
        if (j == n)
            return n;
        if (s[j] != '\r' || j + 2 >= n || s[j + 1] != '\n' || (!chunked && s[j + 2] == '.'))
            return j;
        k = j + 2;
    }
}

size_t kt_data_parse(struct kt_data_parser *p, const char *in, size_t in_len, char *out, size_t out_cap,
                     size_t *out_len)
{
    unsigned st = p->state;
    size_t i = 0, o = 0;

    while (i < in_len && !p->done && o + 2 <= out_cap) {
        const char c = in[i];

        switch (st) {
        case D_BOL:
            if (c == '.') {
                i++;
                st = D_DOT;
            } else {
                st = D_MID;
            }
            break;
        case D_NBOL:
            if (c == '.')
                i++;
            st = D_MID;
            break;
        case D_DOT:
            if (c == '\r') {
                i++;
                st = D_DOT_CR;
            } else {
                st = D_MID;
            }
            break;
        case D_DOT_CR:
            if (c == '\n') {
                i++;
                p->done = 1;
                break;
            }
            /* "." CR x: the CR is bare; the dot was stuffing */
            p->bare_cr = 1;
            out[o++] = '\r';
            out[o++] = '\n';
            st = after_bare(p);
            break;
        case D_CR:
            out[o++] = '\r';
            out[o++] = '\n';
            if (c == '\n') {
                i++;
                st = after_crlf(p);
            } else {
                p->bare_cr = 1;
                st = after_bare(p);
            }
            break;
        default: {  /* D_MID: copy the plain run in one go, then the rest of the line */
            const char *s = in + i;
            size_t n = in_len - i;
            if (n > out_cap - o)
                n = out_cap - o;
            size_t run = plain_span(s, n, p->chunked);
            if (run > 0) {
                memcpy(out + o, s, run);
                o += run;
                i += run;
                break;
            }
            const char *lf = memchr(s, '\n', n);
            size_t span = lf ? (size_t)(lf - s) : n;
            const char *cr = memchr(s, '\r', span);

            if (cr)
                span = (size_t)(cr - s);
            memcpy(out + o, s, span);
            o += span;
            i += span;
            if (cr) {
                i++;
                st = D_CR;
            } else if (lf) {
                if (o + 2 > out_cap)
                    break;      /* no room for the CRLF yet */
                i++;
                p->bare_lf = 1;
                out[o++] = '\r';
                out[o++] = '\n';
                st = after_bare(p);
            }
            break;
        }
        }
    }
    p->state = st;
    p->out_bytes += o;
    if (o > 0)
        p->ends_in_lf = out[o - 1] == '\n';
    *out_len = o;
    return i;
}

size_t kt_data_parse_end(struct kt_data_parser *p, char out[2])
{
    if (p->state != D_CR)
        return 0;
    p->bare_cr = 1;
    p->state = D_MID;
    out[0] = '\r';
    out[1] = '\n';
    p->out_bytes += 2;
    p->ends_in_lf = 1;
    return 2;
}
