/* Milter client (see milter.h for the contract).
 *
 * Wire format (Sendmail's libmilter, as Postfix's milter8 speaks it): every
 * packet is a 4-byte network-order length, one command byte, then data; the
 * length counts the command byte. The MTA negotiates (SMFIC_OPTNEG) the
 * protocol version, the modifications the filter may make and the events it
 * wants, then sends events, each preceded by its macros (SMFIC_MACRO), and
 * reads one reply per event unless the filter asked for none (SMFIP_NR_*).
 *
 * Each milter connection does one exchange at a time on the loop: packets
 * collect in its output buffer and are sent when a reply is needed (events
 * without replies ride along with the next one), then one reply packet is
 * read. Every send, receive and connect carries an io_uring linked timeout
 * (milter_connect_timeout, milter_command_timeout, and
 * milter_content_timeout from the first header on). Any failure makes the
 * milter's default_action its answer to this and every later event, as in
 * Postfix: tempfail "451 4.7.1", reject "550 5.5.0", accept (the milter is
 * skipped), quarantine (hold).
 *
 * The message file is read back with pread(2): it was written by this
 * process a moment earlier and is in the page cache. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/log.h"
#include "delivery/maildir.h"
#include "milter/milter.h"

/* Commands, MTA to filter */
#define SMFIC_ABORT 'A'
#define SMFIC_BODY 'B'
#define SMFIC_CONNECT 'C'
#define SMFIC_MACRO 'D'
#define SMFIC_BODYEOB 'E'
#define SMFIC_HELO 'H'
#define SMFIC_HEADER 'L'
#define SMFIC_MAIL 'M'
#define SMFIC_EOH 'N'
#define SMFIC_OPTNEG 'O'
#define SMFIC_QUIT 'Q'
#define SMFIC_RCPT 'R'
#define SMFIC_DATA 'T'
#define SMFIC_UNKNOWN 'U'

/* Replies, filter to MTA */
#define SMFIR_ADDRCPT '+'
#define SMFIR_DELRCPT '-'
#define SMFIR_ADDRCPT_PAR '2'
#define SMFIR_SHUTDOWN '4'
#define SMFIR_ACCEPT 'a'
#define SMFIR_REPLBODY 'b'
#define SMFIR_CONTINUE 'c'
#define SMFIR_DISCARD 'd'
#define SMFIR_CHGFROM 'e'
#define SMFIR_CONN_FAIL 'f'
#define SMFIR_ADDHEADER 'h'
#define SMFIR_INSHEADER 'i'
#define SMFIR_CHGHEADER 'm'
#define SMFIR_PROGRESS 'p'
#define SMFIR_QUARANTINE 'q'
#define SMFIR_REJECT 'r'
#define SMFIR_SKIP 's'
#define SMFIR_TEMPFAIL 't'
#define SMFIR_REPLYCODE 'y'

/* Modification actions (SMFIF_*) */
#define SMFIF_ADDHDRS 0x01
#define SMFIF_CHGBODY 0x02
#define SMFIF_ADDRCPT 0x04
#define SMFIF_DELRCPT 0x08
#define SMFIF_CHGHDRS 0x10
#define SMFIF_QUARANTINE 0x20
#define SMFIF_CHGFROM 0x40
#define SMFIF_ADDRCPT_PAR 0x80
#define SMFIF_SETSYMLIST 0x100

/* Protocol steps (SMFIP_*) */
#define SMFIP_NOCONNECT 0x1
#define SMFIP_NOHELO 0x2
#define SMFIP_NOMAIL 0x4
#define SMFIP_NORCPT 0x8
#define SMFIP_NOBODY 0x10
#define SMFIP_NOHDRS 0x20
#define SMFIP_NOEOH 0x40
#define SMFIP_NR_HDR 0x80
#define SMFIP_NOUNKNOWN 0x100
#define SMFIP_NODATA 0x200
#define SMFIP_SKIP 0x400
#define SMFIP_RCPT_REJ 0x800
#define SMFIP_NR_CONN 0x1000
#define SMFIP_NR_HELO 0x2000
#define SMFIP_NR_MAIL 0x4000
#define SMFIP_NR_RCPT 0x8000
#define SMFIP_NR_DATA 0x10000
#define SMFIP_NR_UNKN 0x20000
#define SMFIP_NR_EOH 0x40000
#define SMFIP_NR_BODY 0x80000
#define SMFIP_HDR_LEADSPC 0x100000

#define MILTER_CHUNK 65535                 /* largest body packet (libmilter's MILTER_CHUNK_SIZE) */
#define MAX_PACKET (4 * 1024 * 1024)       /* a longer reply is a protocol error */
#define MAX_HEADER_SECTION (1024 * 1024)   /* beyond it the rest counts as body */
#define MAX_REPLACED_BODY (64 * 1024 * 1024)
#define MAX_ADDED_HEADERS (1024 * 1024)    /* bytes of headers a milter may add to a message */
#define MAX_RCPTS 10000                    /* envelope recipients after the milters' additions */
/* SMFIR_PROGRESS restarts the wait for a reply (as Postfix and Sendmail), but one reply, progress
 * reports and modifications included, must come within this many times the stage's timeout */
#define MAX_EXCHANGE_TIMEOUTS 4

static const char *const reply_reject = "550 5.7.1 Command rejected";
static const char *const reply_tempfail = "451 4.7.1 Service unavailable - try again later";

/* ---- configuration ---- */

int kt_milter_default_parse(const char *value, enum kt_milter_default *out)
{
    static const struct { const char *name; enum kt_milter_default v; } tab[] = {
        { "tempfail", KT_MILTER_DEF_TEMPFAIL }, { "accept", KT_MILTER_DEF_ACCEPT },
        { "reject", KT_MILTER_DEF_REJECT }, { "quarantine", KT_MILTER_DEF_QUARANTINE },
    };
    for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++)
        if (strcasecmp(value, tab[i].name) == 0) {
            *out = tab[i].v;
            return 0;
        }
    return -EINVAL;
}

static int parse_protocol(const char *v, unsigned *out)
{
    char *end;
    long p = strtol(v, &end, 10);
    if (end == v || *end || p < 2 || p > 6)
        return -EINVAL;
    *out = (unsigned)p;
    return 0;
}

/* Postfix time value with a default unit of seconds: "10", "10s", "2m", "1h". */
static int parse_time_ms(const char *v, long long *out)
{
    char *end;
    long long n = strtoll(v, &end, 10);
    if (end == v || n < 0)
        return -EINVAL;
    long long mult = 1000;
    if (*end) {
        if (end[1])
            return -EINVAL;
        switch (*end) {
        case 's': mult = 1000; break;
        case 'm': mult = 60000; break;
        case 'h': mult = 3600000; break;
        case 'd': mult = 86400000; break;
        case 'w': mult = 604800000; break;
        default: return -EINVAL;
        }
    }
    *out = n * mult;
    return 0;
}

static int parse_endpoint(struct kt_milter_conf *m, const char *ep, char *err, size_t errlen)
{
    m->endpoint = kt_strdup(ep);
    if (strncmp(ep, "unix:", 5) == 0) {
        const char *path = ep + 5;
        if (path[0] != '/' || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            snprintf(err, errlen, "milter \"%s\": a unix: milter needs an absolute socket path", ep);
            return -EINVAL;
        }
        m->family = AF_UNIX;
        snprintf(m->host, sizeof(m->host), "%s", path);
        return 0;
    }
    const char *rest = NULL;
    if (strncmp(ep, "inet:", 5) == 0)
        rest = ep + 5;
    else if (strncmp(ep, "inet6:", 6) == 0)
        rest = ep + 6;
    if (!rest) {
        snprintf(err, errlen, "milter \"%s\": unsupported socket type (inet:host:port or unix:/path)", ep);
        return -EINVAL;
    }
    /* inet:host:port, inet:[v6addr]:port; Sendmail's inet:port@host too */
    char host[256] = "";
    const char *port;
    const char *at = strchr(rest, '@');
    if (at) {
        snprintf(host, sizeof(host), "%s", at + 1);
        char pbuf[16];
        snprintf(pbuf, sizeof(pbuf), "%.*s", (int)(at - rest), rest);
        port = NULL;
        char *end;
        long p = strtol(pbuf, &end, 10);
        if (end == pbuf || *end || p <= 0 || p > 65535)
            goto bad;
        m->port = (unsigned)p;
    } else {
        const char *colon;
        if (rest[0] == '[') {
            const char *rb = strchr(rest, ']');
            if (!rb || rb[1] != ':')
                goto bad;
            snprintf(host, sizeof(host), "%.*s", (int)(rb - rest - 1), rest + 1);
            colon = rb + 1;
        } else {
            colon = strrchr(rest, ':');
            if (!colon)
                goto bad;
            snprintf(host, sizeof(host), "%.*s", (int)(colon - rest), rest);
        }
        port = colon + 1;
        char *end;
        long p = strtol(port, &end, 10);
        if (end == port || *end || p <= 0 || p > 65535)
            goto bad;
        m->port = (unsigned)p;
    }
    if (!host[0])
        goto bad;
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1) {
        m->family = AF_INET;
    } else if (inet_pton(AF_INET6, host, &a6) == 1) {
        m->family = AF_INET6;
    } else if (strcasecmp(host, "localhost") == 0) {
        /* the worker resolves nothing synchronously: a name other than localhost is refused here */
        snprintf(host, sizeof(host), "127.0.0.1");
        m->family = AF_INET;
    } else {
        snprintf(err, errlen, "milter \"%s\": give the milter's address as a numeric IP address or localhost", ep);
        return -EINVAL;
    }
    snprintf(m->host, sizeof(m->host), "%s", host);
    return 0;
bad:
    snprintf(err, errlen, "milter \"%s\": bad address (inet:host:port or unix:/path)", ep);
    return -EINVAL;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

/* One "{ endpoint, key=value, ... }" group (without the braces). */
static int parse_group(struct kt_milter_conf *m, char *body, char *err, size_t errlen)
{
    int first = 1;
    char *save = NULL;
    for (char *tok = strtok_r(body, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *t = trim(tok);
        if (!*t)
            continue;
        if (first) {
            first = 0;
            if (parse_endpoint(m, t, err, errlen) < 0)
                return -EINVAL;
            continue;
        }
        char *eq = strchr(t, '=');
        if (!eq) {
            snprintf(err, errlen, "milter \"%s\": expected key=value, got \"%s\"", m->endpoint, t);
            return -EINVAL;
        }
        *eq = '\0';
        char *key = trim(t), *val = trim(eq + 1);
        int rc = 0;
        if (strcmp(key, "default_action") == 0)
            rc = kt_milter_default_parse(val, &m->default_action);
        else if (strcmp(key, "protocol") == 0)
            rc = parse_protocol(val, &m->protocol);
        else if (strcmp(key, "connect_timeout") == 0)
            rc = parse_time_ms(val, &m->connect_timeout_ms);
        else if (strcmp(key, "command_timeout") == 0)
            rc = parse_time_ms(val, &m->command_timeout_ms);
        else if (strcmp(key, "content_timeout") == 0)
            rc = parse_time_ms(val, &m->content_timeout_ms);
        else {
            snprintf(err, errlen, "milter \"%s\": unknown setting \"%s\" (default_action, protocol, "
                     "connect_timeout, command_timeout, content_timeout)", m->endpoint, key);
            return -EINVAL;
        }
        if (rc < 0) {
            snprintf(err, errlen, "milter \"%s\": bad %s value \"%s\"", m->endpoint, key, val);
            return -EINVAL;
        }
    }
    if (first) {
        snprintf(err, errlen, "empty milter group \"{}\"");
        return -EINVAL;
    }
    return 0;
}

int kt_milter_set_parse(const char *list, const struct kt_milter_defaults *def, struct kt_milter_set **out,
                        char *err, size_t errlen)
{
    struct kt_milter_conf proto = { 0 };
    *out = NULL;
    if (kt_milter_default_parse(def->default_action, &proto.default_action) < 0) {
        snprintf(err, errlen, "milter_default_action: unknown value \"%s\" (tempfail, accept, reject, quarantine)",
                 def->default_action);
        return -EINVAL;
    }
    if (parse_protocol(def->protocol, &proto.protocol) < 0) {
        snprintf(err, errlen, "milter_protocol: unsupported value \"%s\" (2 to 6)", def->protocol);
        return -EINVAL;
    }
    proto.connect_timeout_ms = def->connect_timeout_s * 1000;
    proto.command_timeout_ms = def->command_timeout_s * 1000;
    proto.content_timeout_ms = def->content_timeout_s * 1000;

    struct kt_milter_set *set = kt_calloc(1, sizeof(*set));
    char *copy = kt_strdup(list ? list : "");
    char *p = copy;
    int rc = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\n' || *p == '\r')
            p++;
        if (!*p)
            break;
        struct kt_milter_conf m = proto;
        if (*p == '{') {
            char *close = strchr(p, '}');
            if (!close) {
                snprintf(err, errlen, "missing '}' in milter list \"%s\"", list);
                rc = -EINVAL;
                break;
            }
            *close = '\0';
            rc = parse_group(&m, p + 1, err, errlen);
            p = close + 1;
        } else {
            size_t n = strcspn(p, " \t,\n\r");
            char save = p[n];
            p[n] = '\0';
            if (strchr(p, '}'))
                rc = -EINVAL, snprintf(err, errlen, "unexpected '}' in milter list \"%s\"", list);
            else
                rc = parse_endpoint(&m, p, err, errlen);
            p[n] = save;
            p += n;
        }
        set->v = kt_realloc(set->v, (set->n + 1) * sizeof(*set->v));
        set->v[set->n++] = m;
        if (rc < 0)
            break;
        if (m.connect_timeout_ms <= 0 || m.command_timeout_ms <= 0 || m.content_timeout_ms <= 0) {
            snprintf(err, errlen, "milter \"%s\": timeouts must be at least 1s", m.endpoint);
            rc = -EINVAL;
            break;
        }
    }
    kt_free(copy);
    if (rc == 0)
        for (int i = 0; i < KT_MS_COUNT; i++)
            set->macros[i] = kt_strdup(def->macros[i] ? def->macros[i] : "");
    set->message_size_limit = def->message_size_limit > 0 ? def->message_size_limit : 0;
    if (rc < 0 || set->n == 0) {
        kt_milter_set_free(set);
        return rc;
    }
    *out = set;
    return 0;
}

void kt_milter_set_free(struct kt_milter_set *set)
{
    if (!set)
        return;
    for (size_t i = 0; i < set->n; i++)
        kt_free(set->v[i].endpoint);
    kt_free(set->v);
    for (int i = 0; i < KT_MS_COUNT; i++)
        kt_free(set->macros[i]);
    kt_free(set);
}

/* ---- the message as the milters see it ---- */

struct mhdr {
    char *name;
    char *value;          /* as stored: what follows the colon, folded lines joined with CRLF */
};

struct msgview {
    int fd;               /* our duplicate of the spool file */
    off_t msg_off, msg_len;
    struct mhdr *hdrs;
    size_t n_hdrs;
    size_t fixed;         /* leading headers that are not shown and stay first (a final delivery's trace headers) */
    size_t hidden;        /* our own Received: after them is not shown (0 or 1) */
    int had_blank;        /* a blank line separated header and body */
    off_t body_off, body_len;
    int body_replaced;
    struct kt_buf newbody; /* the replacement, CRLF lines */
    int body_open;         /* a replacement is being collected from the current milter */
    int body_too_big;      /* the replacement grew past message_size_limit: the message is refused */
    size_t added_bytes;    /* header names and values the milters added or changed */
    char *sender;
    char **rcpts;
    size_t n_rcpts;
    int edited, envelope_edited;
};

static void msgview_free(struct msgview *v)
{
    if (!v)
        return;
    if (v->fd >= 0)
        close(v->fd);
    for (size_t i = 0; i < v->n_hdrs; i++) {
        kt_free(v->hdrs[i].name);
        kt_free(v->hdrs[i].value);
    }
    kt_free(v->hdrs);
    kt_buf_release(&v->newbody);
    kt_free(v->sender);
    for (size_t i = 0; i < v->n_rcpts; i++)
        kt_free(v->rcpts[i]);
    kt_free(v->rcpts);
    kt_free(v);
}

static int header_name_len(const char *line, size_t len)
{
    size_t i = 0;
    while (i < len && line[i] > 32 && line[i] < 127 && line[i] != ':')
        i++;
    if (i == 0)
        return -1;
    size_t n = i;
    while (i < len && (line[i] == ' ' || line[i] == '\t'))
        i++;
    if (i >= len || line[i] != ':')
        return -1;
    return (int)n;
}

static void view_add_header(struct msgview *v, size_t at, const char *name, size_t nlen, const char *val, size_t vlen)
{
    v->hdrs = kt_realloc(v->hdrs, (v->n_hdrs + 1) * sizeof(*v->hdrs));
    if (at > v->n_hdrs)
        at = v->n_hdrs;
    memmove(&v->hdrs[at + 1], &v->hdrs[at], (v->n_hdrs - at) * sizeof(*v->hdrs));
    v->hdrs[at].name = kt_strndup(name, nlen);
    v->hdrs[at].value = kt_strndup(val, vlen);
    v->n_hdrs++;
}

/* Reads the header section: headers until a blank line, a line that is no header, the end of the message
 * or MAX_HEADER_SECTION. 0 or -errno. */
static int view_load(struct msgview *v)
{
    struct kt_buf b = { 0 };
    off_t want = v->msg_len < MAX_HEADER_SECTION ? v->msg_len : MAX_HEADER_SECTION;
    kt_buf_reserve(&b, (size_t)want + 1);
    while ((off_t)b.len < want) {
        ssize_t r = pread(v->fd, b.data + b.len, (size_t)(want - (off_t)b.len), v->msg_off + (off_t)b.len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? -errno : -EIO;
            kt_buf_release(&b);
            return e;
        }
        b.len += (size_t)r;
    }
    size_t pos = 0, body = b.len;
    const char *d = b.data;
    v->had_blank = 0;
    while (pos < b.len) {
        const char *lf = memchr(d + pos, '\n', b.len - pos);
        if (!lf)
            break;   /* an unterminated line (only at the section cap or the end) is body */
        size_t llen = (size_t)(lf - (d + pos)) + 1;
        size_t tlen = llen >= 2 && d[pos + llen - 2] == '\r' ? llen - 2 : llen - 1;
        if (tlen == 0) {
            v->had_blank = 1;
            pos += llen;
            body = pos;
            goto done;
        }
        int nlen = header_name_len(d + pos, tlen);
        if (nlen < 0)
            break;
        /* the header runs on over continuation lines */
        size_t end = pos + llen;
        while (end < b.len && (d[end] == ' ' || d[end] == '\t')) {
            const char *lf2 = memchr(d + end, '\n', b.len - end);
            if (!lf2)
                break;
            end = (size_t)(lf2 - d) + 1;
        }
        if (end == b.len && (off_t)b.len < v->msg_len) {
            break;   /* may continue past the cap: leave it to the body */
        }
        const char *colon = memchr(d + pos, ':', tlen);
        size_t vstart = (size_t)(colon - d) + 1;
        size_t vend = end;
        if (vend >= 2 && d[vend - 2] == '\r')
            vend -= 2;
        else
            vend -= 1;
        view_add_header(v, v->n_hdrs, d + pos, (size_t)nlen, d + vstart, vend - vstart);
        pos = end;
    }
    body = pos;
done:
    v->body_off = v->msg_off + (off_t)body;
    v->body_len = v->msg_len - (off_t)body;
    kt_buf_release(&b);
    return 0;
}

/* Index (into hdrs) of the idx-th (1-based) header called name among those shown to milters, or -1. */
static long view_find(const struct msgview *v, const char *name, unsigned idx)
{
    if (idx == 0)
        idx = 1;   /* Sendmail: index 0 means the first */
    for (size_t i = v->fixed + v->hidden; i < v->n_hdrs; i++)
        if (strcasecmp(v->hdrs[i].name, name) == 0 && --idx == 0)
            return (long)i;
    return -1;
}

/* A milter's header value as stored: Sendmail's one space after the colon unless the milter handles
 * leading space itself (SMFIP_HDR_LEADSPC). Line breaks (LF, CRLF or a bare CR) become CRLF followed by
 * white space, so each one only folds the header: a line that does not begin with a space or tab gets a
 * tab first, empty lines and breaks at the end are dropped. A value can thus never end the header or
 * the header section, or start another header. */
static char *header_value_from_milter(const char *val, int leadspc)
{
    struct kt_buf b = { 0 };
    if (!leadspc)
        kt_buf_append(&b, " ", 1);
    for (const char *p = val; *p;) {
        size_t n = strcspn(p, "\r\n");
        if (n) {
            if (b.len && (b.data[b.len - 1] == '\n') && *p != ' ' && *p != '\t')
                kt_buf_append(&b, "\t", 1);
            kt_buf_append(&b, p, n);
            p += n;
            continue;
        }
        while (*p == '\r' || *p == '\n')
            p++;
        if (*p && b.len && b.data[b.len - 1] != '\n')
            kt_buf_append(&b, "\r\n", 2);
    }
    kt_buf_append(&b, "", 1);
    char *s = kt_strdup(b.data);
    kt_buf_release(&b);
    return s;
}

/* A header name a milter may add: printable ASCII without ':' (RFC 5322 2.2). */
static int valid_header_name(const char *name)
{
    if (!*name)
        return 0;
    for (const char *p = name; *p; p++)
        if (*p <= 32 || *p >= 127 || *p == ':')
            return 0;
    return 1;
}

/* An address from a milter without its angle brackets. -1 when it does not fit in out (no silent
 * truncation into another address) or has a control character: the envelope is stored as lines. */
static int strip_brackets(const char *in, char *out, size_t outlen)
{
    size_t n = strlen(in);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)in[i] < 32 || in[i] == 127)
            return -1;
    if (n >= 2 && in[0] == '<' && in[n - 1] == '>') {
        in++;
        n -= 2;
    }
    if (n >= outlen)
        return -1;
    memcpy(out, in, n);
    out[n] = '\0';
    return 0;
}

/* ---- connections ---- */

enum mstate {
    M_CLOSED,          /* not connected yet */
    M_CONNECTING,
    M_NEGOTIATING,
    M_READY,
    M_ERROR,           /* failed: def_reply answers every event */
    M_REJECT_CON,      /* refused the connection: def_reply answers every event */
    M_ACCEPT_CON,      /* accepted the connection: no more events */
};

enum io_kind { IO_NONE, IO_CONNECT, IO_SEND, IO_RECV };

struct mconn {
    struct kt_milters *g;
    const struct kt_milter_conf *conf;
    int fd;
    enum mstate state;
    int msg_accepted;           /* accepted (or discarded) the current message: no more message events */
    int saw_message;            /* MAIL went to it: ABORT is owed if the message ends early */
    int data_sent;
    int skip_body;
    const char *def_reply;      /* NULL: accept */
    int def_hold;
    char def_buf[1024];
    unsigned version, actions, pflags;
    char *macros[KT_MS_COUNT];  /* asked for in the negotiation (SMFIR_SETSYMLIST); NULL: configured */
    struct kt_buf out, in;
    struct kt_op io_op, to_op;
    enum io_kind io;
    int want_reply;
    long long timeout_ms;
    long long exchange_start_ms;   /* CLOCK_MONOTONIC when the command that wants a reply went out */
    struct __kernel_timespec ts;
    struct sockaddr_storage sa;
    socklen_t salen;
};

enum event { EV_CONNECT, EV_HELO, EV_MAIL, EV_RCPT, EV_DATA, EV_UNKNOWN, EV_EOM };

/* Steps of the end of message for one milter. */
enum eom_step { E_DATA, E_HEADERS, E_EOH, E_BODY, E_EOM, E_REPLIES, E_DONE };

struct kt_milters {
    struct kt_loop *loop;
    const struct kt_milter_set *set;
    kt_milter_macro_fn macro;
    void *macro_arg;
    size_t n;
    struct mconn *conns;
    unsigned pending;            /* operations in flight (connection I/O, timeouts, the deferral) */
    int freed;

    enum event ev;
    size_t cur;                  /* milter the event is at */
    int decided;                 /* the milter at cur decided the event (reject, discard, shutdown) */
    char **args;                 /* the event's arguments */
    size_t n_args;
    int family;
    unsigned port;
    kt_milter_cb cb;
    void *cb_arg;
    struct kt_milter_result res;
    int in_msg;
    int discard;                 /* a milter discarded the message at MAIL/RCPT */
    struct kt_op defer_op;       /* completes an event that needed no I/O */
    int in_call;                 /* inside a kt_milters_* call: outcomes wait for the loop */

    /* end of message */
    struct msgview *view;
    enum eom_step step;
    size_t hdr_i;
    off_t body_pos;
    char *chunk;                 /* MILTER_CHUNK bytes */
    /* writing the edited message */
    struct kt_delivery *wd;
    off_t wpos;
    void (*wcb)(void *arg, int res);
    void *warg;

    struct replay *replay;       /* kt_milter_replay: no loop, no socket */
};

/* kt_milter_replay's stand-in for the ring: the one operation "in flight" and the deferred outcome. */
struct replay {
    struct kt_milters *g;        /* until the completion that frees it */
    const unsigned char *data;   /* what the milter sends, read in slices */
    size_t len, pos, slice;
    struct mconn *io;
    int deferred;
    int called;
    void (*check)(void *arg, const struct kt_milter_result *r);
    void *check_arg;
};

static void conn_next(struct mconn *c);
static void conn_read(struct mconn *c);
static void event_next(struct kt_milters *g);
static void eom_next(struct mconn *c);
static void group_maybe_free(struct kt_milters *g);

static void put32(struct kt_buf *b, uint32_t v)
{
    uint32_t n = htonl(v);
    kt_buf_append(b, &n, 4);
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

/* Starts a packet: returns its offset for packet_end. */
static size_t packet_begin(struct kt_buf *b, char cmd)
{
    size_t at = b->len;
    put32(b, 0);
    kt_buf_append(b, &cmd, 1);
    return at;
}

static void packet_end(struct kt_buf *b, size_t at)
{
    uint32_t n = htonl((uint32_t)(b->len - at - 4));
    memcpy(b->data + at, &n, 4);
}

static void put_str(struct kt_buf *b, const char *s)
{
    kt_buf_append(b, s, strlen(s) + 1);
}

static const char *stage_name(enum event ev)
{
    switch (ev) {
    case EV_CONNECT: return "CONNECT";
    case EV_HELO: return "HELO";
    case EV_MAIL: return "MAIL";
    case EV_RCPT: return "RCPT";
    case EV_DATA: return "DATA";
    case EV_UNKNOWN: return "UNKNOWN";
    case EV_EOM: return "END-OF-MESSAGE";
    }
    return "?";
}

/* Failure of the conversation: the milter's default_action answers from now on (Postfix's
 * milter8_comm_error). The socket is shut down; completions still in flight find it so. */
static void conn_fail(struct mconn *c, const char *why)
{
    kt_warn("milter %s: %s", c->conf->endpoint, why);
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    c->state = M_ERROR;
    c->def_hold = 0;
    switch (c->conf->default_action) {
    case KT_MILTER_DEF_ACCEPT: c->def_reply = NULL; break;
    case KT_MILTER_DEF_REJECT: c->def_reply = "550 5.5.0 Service unavailable"; break;
    case KT_MILTER_DEF_QUARANTINE: c->def_reply = NULL; c->def_hold = 1; break;
    case KT_MILTER_DEF_TEMPFAIL: c->def_reply = reply_tempfail; break;
    }
}

static void on_timeout_done(struct kt_op *op, int res, unsigned flags)
{
    struct mconn *c = (struct mconn *)((char *)op - offsetof(struct mconn, to_op));
    (void)res;
    (void)flags;
    c->g->pending--;
    group_maybe_free(c->g);
}

static void on_io(struct kt_op *op, int res, unsigned flags);

/* Submits the connection's one operation with its linked timeout. */
static void conn_submit(struct mconn *c, enum io_kind kind)
{
    struct kt_milters *g = c->g;
    if (g->replay) {
        c->io = kind;
        if (kind == IO_RECV) {
            kt_buf_compact(&c->in);
            kt_buf_reserve(&c->in, 16384);
        }
        g->replay->io = c;
        g->pending += 2;
        return;
    }
    /* the operation and its timeout must reach the kernel in one submission */
    if (io_uring_sq_space_left(&g->loop->ring) < 2) {
        io_uring_submit(&g->loop->ring);
        g->loop->pending_sqes = 0;
    }
    struct io_uring_sqe *sqe = kt_loop_sqe(g->loop, &c->io_op);
    c->io = kind;
    switch (kind) {
    case IO_CONNECT:
        io_uring_prep_connect(sqe, c->fd, (struct sockaddr *)&c->sa, c->salen);
        break;
    case IO_SEND:
        io_uring_prep_send(sqe, c->fd, kt_buf_head(&c->out), kt_buf_used(&c->out), MSG_NOSIGNAL);
        break;
    case IO_RECV:
        kt_buf_compact(&c->in);
        kt_buf_reserve(&c->in, 16384);
        io_uring_prep_recv(sqe, c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, 0);
        break;
    case IO_NONE:
        break;
    }
    sqe->flags |= IOSQE_IO_LINK;
    c->ts.tv_sec = c->timeout_ms / 1000;
    c->ts.tv_nsec = (c->timeout_ms % 1000) * 1000000;
    struct io_uring_sqe *to = kt_loop_sqe(g->loop, &c->to_op);
    io_uring_prep_link_timeout(to, &c->ts, 0);
    g->pending += 2;
}

static long long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sends what is queued; then reads one reply packet when want_reply. */
static void conn_flush(struct mconn *c, int want_reply, long long timeout_ms)
{
    c->want_reply = want_reply;
    c->timeout_ms = timeout_ms;
    c->exchange_start_ms = monotonic_ms();
    if (kt_buf_used(&c->out))
        conn_submit(c, IO_SEND);
    else if (want_reply)
        conn_read(c);
    else
        conn_next(c);
}

static int sockaddr_of(const struct kt_milter_conf *m, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    if (m->family == AF_UNIX) {
        struct sockaddr_un *un = (struct sockaddr_un *)ss;
        un->sun_family = AF_UNIX;
        size_t n = strnlen(m->host, sizeof(un->sun_path) - 1);   /* checked when parsed */
        memcpy(un->sun_path, m->host, n);
        *len = sizeof(*un);
    } else if (m->family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)m->port);
        inet_pton(AF_INET, m->host, &in->sin_addr);
        *len = sizeof(*in);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)m->port);
        inet_pton(AF_INET6, m->host, &in6->sin6_addr);
        *len = sizeof(*in6);
    }
    return 0;
}

static void conn_start(struct mconn *c)
{
    c->fd = c->g->replay ? -2 : socket(c->conf->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd == -1) {
        char why[128];
        snprintf(why, sizeof(why), "socket: %s", strerror(errno));
        conn_fail(c, why);
        event_next(c->g);
        return;
    }
    sockaddr_of(c->conf, &c->sa, &c->salen);
    c->state = M_CONNECTING;
    c->timeout_ms = c->conf->connect_timeout_ms;
    conn_submit(c, IO_CONNECT);
}

/* The protocol offered for a milter_protocol version (Postfix's milter8 table). */
static void offer_for(unsigned version, uint32_t *actions, uint32_t *pflags)
{
    if (version >= 6) {
        *actions = 0x1ff;
        *pflags = 0x1fffff;
    } else if (version >= 4) {
        *actions = 0x3f;
        *pflags = 0x3ff;
    } else if (version == 3) {
        *actions = 0x3f;
        *pflags = 0x7f;
    } else {
        *actions = 0x1f;
        *pflags = 0x7f;
    }
}

static void send_optneg(struct mconn *c)
{
    uint32_t actions, pflags;
    offer_for(c->conf->protocol, &actions, &pflags);
    size_t at = packet_begin(&c->out, SMFIC_OPTNEG);
    put32(&c->out, c->conf->protocol);
    put32(&c->out, actions);
    put32(&c->out, pflags);
    packet_end(&c->out, at);
    c->state = M_NEGOTIATING;
    conn_flush(c, 1, c->conf->command_timeout_ms);
}

static int negotiated(struct mconn *c, const unsigned char *d, size_t len)
{
    if (len < 12)
        return -1;
    uint32_t offered_actions, offered_pflags;
    offer_for(c->conf->protocol, &offered_actions, &offered_pflags);
    c->version = get32(d);
    if (c->version < 2) {
        conn_fail(c, "protocol version below 2");
        return -1;
    }
    char why[128];
    /* as Postfix's milter8: a version or a modification the MTA did not offer breaks the negotiation
     * (events it did not offer are only left out) */
    if (c->version > c->conf->protocol) {
        snprintf(why, sizeof(why), "protocol version %u conflict with MTA protocol version %u", c->version,
                 c->conf->protocol);
        conn_fail(c, why);
        return -1;
    }
    if (get32(d + 4) & ~offered_actions) {
        snprintf(why, sizeof(why), "request mask 0x%x conflict with MTA request mask 0x%x", get32(d + 4),
                 offered_actions);
        conn_fail(c, why);
        return -1;
    }
    c->actions = get32(d + 4);
    c->pflags = get32(d + 8) & offered_pflags;
    /* SMFIR_SETSYMLIST in the negotiation: the macros the milter wants at each stage */
    static const int where_to_stage[] = { KT_MS_CONNECT, KT_MS_HELO, KT_MS_MAIL, KT_MS_RCPT, KT_MS_DATA,
                                          KT_MS_EOD, KT_MS_EOH };
    size_t pos = 12;
    while (pos + 4 < len) {
        uint32_t where = get32(d + pos);
        pos += 4;
        const unsigned char *nul = memchr(d + pos, '\0', len - pos);
        if (!nul)
            break;
        if (where < sizeof(where_to_stage) / sizeof(where_to_stage[0])) {
            int st = where_to_stage[where];
            kt_free(c->macros[st]);
            c->macros[st] = kt_strndup((const char *)d + pos, (size_t)(nul - (d + pos)));
        }
        pos = (size_t)(nul - d) + 1;
    }
    c->state = M_READY;
    return 0;
}

/* Queues the macros of a stage for the command cmd (nothing when none has a value). */
static void put_macros(struct mconn *c, int stage, char cmd)
{
    struct kt_milters *g = c->g;
    const char *list = c->macros[stage] ? c->macros[stage] : g->set->macros[stage];
    if (!list || !*list)
        return;
    size_t at = packet_begin(&c->out, SMFIC_MACRO);
    kt_buf_append(&c->out, &cmd, 1);
    size_t base = c->out.len;
    char *copy = kt_strdup(list);
    char *save = NULL;
    for (char *name = strtok_r(copy, " \t,", &save); name; name = strtok_r(NULL, " \t,", &save)) {
        char buf[1024];
        const char *val = g->macro(g->macro_arg, name, buf, sizeof(buf));
        if (!val)
            continue;
        put_str(&c->out, name);
        put_str(&c->out, val);
    }
    kt_free(copy);
    if (c->out.len == base)
        c->out.len = at;   /* no values: no packet */
    else
        packet_end(&c->out, at);
}

/* ---- events ---- */

static void result_reply(struct kt_milters *g, enum kt_milter_verdict v, const char *reply)
{
    g->res.verdict = v;
    snprintf(g->res.reply, sizeof(g->res.reply), "%s", reply ? reply : "");
}

static void args_free(struct kt_milters *g)
{
    for (size_t i = 0; i < g->n_args; i++)
        kt_free(g->args[i]);
    kt_free(g->args);
    g->args = NULL;
    g->n_args = 0;
}

static void on_defer(struct kt_op *op, int res, unsigned flags);

static void event_finish(struct kt_milters *g)
{
    kt_milter_cb cb = g->cb;
    g->cb = NULL;
    args_free(g);
    if (g->ev == EV_EOM) {
        g->in_msg = 0;
        for (size_t i = 0; i < g->n; i++) {
            /* milters after the one that refused or discarded the message never saw its end: they get
             * SMFIC_ABORT (kt_milters_abort) like Postfix's milter_abort */
            if (g->res.verdict != KT_MILTER_CONTINUE && i > g->cur)
                continue;
            g->conns[i].msg_accepted = 0;
            g->conns[i].saw_message = 0;
            g->conns[i].data_sent = 0;
        }
        if (g->view) {
            g->res.edited = g->view->edited;
            g->res.envelope_edited = g->view->envelope_edited;
        }
    }
    if (g->res.verdict == KT_MILTER_CONTINUE && (g->ev == EV_MAIL) )
        g->in_msg = 1;
    if (cb)
        cb(g->cb_arg, &g->res);
}

/* The event has an outcome: report it now if I/O led here, else from the loop (never re-entrantly). */
static void event_done(struct kt_milters *g)
{
    if (!g->in_call) {
        event_finish(g);
        return;
    }
    if (g->replay) {
        g->replay->deferred = 1;
        g->pending++;
        return;
    }
    io_uring_prep_nop(kt_loop_sqe(g->loop, &g->defer_op));
    g->pending++;
}

static void on_defer(struct kt_op *op, int res, unsigned flags)
{
    struct kt_milters *g = (struct kt_milters *)((char *)op - offsetof(struct kt_milters, defer_op));
    (void)res;
    (void)flags;
    g->pending--;
    if (g->freed) {
        group_maybe_free(g);
        return;
    }
    event_finish(g);
}

static int is_message_event(enum event ev)
{
    return ev == EV_MAIL || ev == EV_RCPT || ev == EV_DATA || ev == EV_EOM;
}

/* A milter that failed or refused the connection answers with its default reply. Returns 1 when that
 * decides the event. */
static int def_answer(struct kt_milters *g, struct mconn *c)
{
    if (c->def_hold && g->ev == EV_EOM) {
        g->res.hold = 1;
        snprintf(g->res.hold_reason, sizeof(g->res.hold_reason), "default_action");
    }
    if (!c->def_reply)
        return 0;
    /* Postfix: a milter's refusal at CONNECT does not refuse HELO/EHLO */
    if (g->ev == EV_HELO)
        return 0;
    result_reply(g, c->def_reply[0] == '4' && c->def_reply[1] == '2' && c->def_reply[2] == '1'
                 ? KT_MILTER_SHUTDOWN : KT_MILTER_REJECT, c->def_reply);
    return 1;
}

/* Queues the event's packets for c; returns the SMFIP_NR_* flag that says no reply comes, or -1 when the
 * milter asked not to get this event. */
static long put_event(struct mconn *c)
{
    struct kt_milters *g = c->g;
    size_t at;
    switch (g->ev) {
    case EV_CONNECT:
        if (c->pflags & SMFIP_NOCONNECT)
            return -1;
        put_macros(c, KT_MS_CONNECT, SMFIC_CONNECT);
        at = packet_begin(&c->out, SMFIC_CONNECT);
        put_str(&c->out, g->args[0]);
        if (g->family == '4' || g->family == '6') {
            char fam = (char)g->family;
            uint16_t port = htons((uint16_t)g->port);
            kt_buf_append(&c->out, &fam, 1);
            kt_buf_append(&c->out, &port, 2);
            put_str(&c->out, g->args[1]);
        } else {
            kt_buf_append(&c->out, "U", 1);
        }
        packet_end(&c->out, at);
        return SMFIP_NR_CONN;
    case EV_HELO:
        if (c->pflags & SMFIP_NOHELO)
            return -1;
        put_macros(c, KT_MS_HELO, SMFIC_HELO);
        at = packet_begin(&c->out, SMFIC_HELO);
        put_str(&c->out, g->args[0]);
        packet_end(&c->out, at);
        return SMFIP_NR_HELO;
    case EV_MAIL:
    case EV_RCPT:
        if (c->pflags & (g->ev == EV_MAIL ? SMFIP_NOMAIL : SMFIP_NORCPT))
            return -1;
        put_macros(c, g->ev == EV_MAIL ? KT_MS_MAIL : KT_MS_RCPT, g->ev == EV_MAIL ? SMFIC_MAIL : SMFIC_RCPT);
        at = packet_begin(&c->out, g->ev == EV_MAIL ? SMFIC_MAIL : SMFIC_RCPT);
        for (size_t i = 0; i < g->n_args; i++)
            put_str(&c->out, g->args[i]);
        packet_end(&c->out, at);
        return g->ev == EV_MAIL ? SMFIP_NR_MAIL : SMFIP_NR_RCPT;
    case EV_DATA:
        if (c->version < 4 || (c->pflags & SMFIP_NODATA) || c->data_sent)
            return -1;
        c->data_sent = 1;
        put_macros(c, KT_MS_DATA, SMFIC_DATA);
        at = packet_begin(&c->out, SMFIC_DATA);
        packet_end(&c->out, at);
        return SMFIP_NR_DATA;
    case EV_UNKNOWN:
        if (c->version < 3 || (c->pflags & SMFIP_NOUNKNOWN))
            return -1;
        put_macros(c, KT_MS_UNKNOWN, SMFIC_UNKNOWN);
        at = packet_begin(&c->out, SMFIC_UNKNOWN);
        put_str(&c->out, g->args[0]);
        packet_end(&c->out, at);
        return SMFIP_NR_UNKN;
    case EV_EOM:
        break;
    }
    return -1;
}

/* Runs the current event through the milters from g->cur on. */
static void event_next(struct kt_milters *g)
{
    while (g->cur < g->n) {
        struct mconn *c = &g->conns[g->cur];
        if (c->state == M_CLOSED) {
            conn_start(c);   /* at the first event, normally CONNECT */
            return;
        }
        if (c->state == M_ERROR || c->state == M_REJECT_CON) {
            if (def_answer(g, c)) {
                event_done(g);
                return;
            }
            g->cur++;
            continue;
        }
        if (c->state == M_ACCEPT_CON || (is_message_event(g->ev) && c->msg_accepted)) {
            g->cur++;
            continue;
        }
        if (g->ev == EV_EOM) {
            g->step = E_DATA;
            g->hdr_i = g->view ? g->view->fixed + g->view->hidden : 0;
            g->body_pos = 0;
            c->skip_body = 0;
            eom_next(c);
            return;
        }
        if (g->ev == EV_MAIL)
            c->saw_message = 1;
        long nr = put_event(c);
        if (nr < 0) {
            g->cur++;
            continue;
        }
        if (c->pflags & (uint32_t)nr) {
            g->cur++;   /* no reply: the packets leave with the next exchange */
            continue;
        }
        conn_flush(c, 1, c->conf->command_timeout_ms);
        return;
    }
    /* packets of events without replies wait in their buffers for the next exchange */
    result_reply(g, KT_MILTER_CONTINUE, NULL);
    event_done(g);
}

static void event_start(struct kt_milters *g, enum event ev, const char *const *args, size_t n, kt_milter_cb cb,
                        void *arg)
{
    g->ev = ev;
    g->cur = 0;
    g->decided = 0;
    g->cb = cb;
    g->cb_arg = arg;
    g->in_call++;
    memset(&g->res, 0, sizeof(g->res));
    args_free(g);
    g->args = kt_calloc(n ? n : 1, sizeof(*g->args));
    for (size_t i = 0; i < n; i++)
        g->args[i] = kt_strdup(args[i] ? args[i] : "");
    g->n_args = n;
    if (is_message_event(ev) && g->discard)
        result_reply(g, ev == EV_EOM ? KT_MILTER_DISCARD : KT_MILTER_CONTINUE, NULL), event_done(g);
    else
        event_next(g);
    g->in_call--;
}

/* A SMFIR_REPLYCODE text is one SMTP reply, which the session passes on as it is: every line (lines end
 * in CRLF) has the code of the first, a 4xx or 5xx one, then '-' or ' ' (set here as the line's place
 * says), an enhanced status code of the same class if any (Postfix's check, there on the first line
 * only), and no other control character. Otherwise the milter could make the client read a second reply
 * of its choosing. 1 when reply is such a reply (edited in place), 0 when malformed. */
static int reply_code_ok(char *reply)
{
    if ((reply[0] != '4' && reply[0] != '5') || !isdigit((unsigned char)reply[1])
        || !isdigit((unsigned char)reply[2]))
        return 0;
    for (char *line = reply;;) {
        char *crlf = strstr(line, "\r\n");
        size_t len = crlf ? (size_t)(crlf - line) : strlen(line);
        if (len < 4 || memcmp(line, reply, 3) != 0 || (line[3] != ' ' && line[3] != '-')
            || (isdigit((unsigned char)line[4]) && line[4] != reply[0]))
            return 0;
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)line[i] < 32 || line[i] == 127)
                return 0;
        if (!crlf || !crlf[2]) {
            line[3] = ' ';
            if (crlf)
                *crlf = '\0';   /* the session ends the reply's last line itself */
            return 1;
        }
        line[3] = '-';
        line = crlf + 2;
    }
}

/* A reply to an event other than the end of message. Returns 0 when the exchange is over, 1 to read
 * another packet. */
static int event_reply(struct mconn *c, char cmd, const char *d, size_t len)
{
    struct kt_milters *g = c->g;
    int at_connect = g->ev == EV_CONNECT || g->ev == EV_HELO;
    switch (cmd) {
    case SMFIR_CONTINUE:
        g->cur++;
        break;
    case SMFIR_ACCEPT:
        if (at_connect)
            c->state = M_ACCEPT_CON;
        else
            c->msg_accepted = 1;
        g->cur++;
        break;
    case SMFIR_REJECT:
    case SMFIR_TEMPFAIL:
    case SMFIR_REPLYCODE: {
        char reply[1024];
        if (cmd == SMFIR_REPLYCODE) {
            size_t n = len && d[len - 1] == '\0' ? len - 1 : len;
            /* "ddd d.d.d text", possibly multi-line; '%%' is Sendmail's escape for '%' */
            size_t o = 0;
            for (size_t i = 0; i < n && o + 1 < sizeof(reply); i++) {
                if (d[i] == '%' && i + 1 < n && d[i + 1] == '%')
                    i++;
                else if (d[i] == '%')
                    continue;
                reply[o++] = d[i];
            }
            reply[o] = '\0';
            if (!reply_code_ok(reply)) {
                char why[1200];
                snprintf(why, sizeof(why), "malformed reply: %s", reply);
                conn_fail(c, why);
                return 0;   /* event_next answers with the default action */
            }
        } else {
            snprintf(reply, sizeof(reply), "%s", cmd == SMFIR_REJECT ? reply_reject : reply_tempfail);
        }
        if (at_connect && g->ev == EV_CONNECT) {
            c->state = M_REJECT_CON;
            snprintf(c->def_buf, sizeof(c->def_buf), "%s", reply);
            c->def_reply = c->def_buf;
        }
        if (g->ev == EV_HELO) {
            /* Postfix does not refuse HELO/EHLO on a milter's word: the refusal applies from MAIL on */
            c->state = M_REJECT_CON;
            snprintf(c->def_buf, sizeof(c->def_buf), "%s", reply);
            c->def_reply = c->def_buf;
            g->cur++;
            break;
        }
        result_reply(g, strncmp(reply, "421", 3) == 0 ? KT_MILTER_SHUTDOWN : KT_MILTER_REJECT, reply);
        g->decided = 1;
        break;
    }
    case SMFIR_SHUTDOWN:
        c->state = M_REJECT_CON;
        c->def_reply = "421 4.7.0 Server closing connection";
        result_reply(g, KT_MILTER_SHUTDOWN, c->def_reply);
        g->decided = 1;
        break;
    case SMFIR_DISCARD:
        if (at_connect) {
            conn_fail(c, "DISCARD action is not allowed for connect or helo");
            return 0;
        }
        g->discard = 1;
        result_reply(g, KT_MILTER_DISCARD, NULL);
        g->decided = 1;
        break;
    case SMFIR_QUARANTINE:
        g->res.hold = 1;
        snprintf(g->res.hold_reason, sizeof(g->res.hold_reason), "%.*s", (int)(len ? len - 1 : 0), d);
        return 1;
    case SMFIR_PROGRESS:
        return 1;
    default: {
        char why[80];
        snprintf(why, sizeof(why), "unexpected filter response '%c' after %s", cmd, stage_name(g->ev));
        conn_fail(c, why);
        return 0;
    }
    }
    return 0;
}

/* ---- end of message ---- */

static void put_header(struct mconn *c, const struct mhdr *h)
{
    size_t at = packet_begin(&c->out, SMFIC_HEADER);
    put_str(&c->out, h->name);
    const char *v = h->value;
    /* Sendmail eats the one space after the colon unless the milter asked for it (SMFIP_HDR_LEADSPC);
     * folded lines are sent separated by LF */
    if (!(c->pflags & SMFIP_HDR_LEADSPC) && *v == ' ')
        v++;
    for (; *v; v++)
        if (!(*v == '\r' && v[1] == '\n'))
            kt_buf_append(&c->out, v, 1);
    kt_buf_append(&c->out, "", 1);
    packet_end(&c->out, at);
}

/* Queues the next body chunk; 0 at the end of the body, -errno on a read error. */
static int put_body_chunk(struct mconn *c)
{
    struct kt_milters *g = c->g;
    struct msgview *v = g->view;
    off_t total = v->body_replaced ? (off_t)v->newbody.len : v->body_len;
    if (g->body_pos >= total)
        return 0;
    size_t n = (size_t)(total - g->body_pos < MILTER_CHUNK ? total - g->body_pos : MILTER_CHUNK);
    size_t at = packet_begin(&c->out, SMFIC_BODY);
    if (v->body_replaced) {
        kt_buf_append(&c->out, v->newbody.data + g->body_pos, n);
    } else {
        kt_buf_reserve(&c->out, n);
        ssize_t r;
        do
            r = pread(v->fd, c->out.data + c->out.len, n, v->body_off + g->body_pos);
        while (r < 0 && errno == EINTR);
        if (r <= 0) {
            c->out.len = at;
            return r < 0 ? -errno : -EIO;
        }
        n = (size_t)r;
        c->out.len += n;
    }
    packet_end(&c->out, at);
    g->body_pos += (off_t)n;
    return 1;
}

/* The next step of the end of message for c; queues and exchanges packets. */
static void eom_next(struct mconn *c)
{
    struct kt_milters *g = c->g;
    struct msgview *v = g->view;
    long long tmo = c->conf->content_timeout_ms;
    for (;;) {
        switch (g->step) {
        case E_DATA:
            g->step = E_HEADERS;
            if (c->version >= 4 && !(c->pflags & SMFIP_NODATA) && !c->data_sent) {
                c->data_sent = 1;
                put_macros(c, KT_MS_DATA, SMFIC_DATA);
                size_t at = packet_begin(&c->out, SMFIC_DATA);
                packet_end(&c->out, at);
                if (!(c->pflags & SMFIP_NR_DATA)) {
                    conn_flush(c, 1, c->conf->command_timeout_ms);
                    return;
                }
            }
            continue;
        case E_HEADERS:
            if ((c->pflags & SMFIP_NOHDRS) || g->hdr_i >= v->n_hdrs) {
                g->step = E_EOH;
                continue;
            }
            put_macros(c, KT_MS_EOH, SMFIC_HEADER);
            put_header(c, &v->hdrs[g->hdr_i++]);
            if (!(c->pflags & SMFIP_NR_HDR)) {
                conn_flush(c, 1, tmo);
                return;
            }
            continue;
        case E_EOH:
            g->step = E_BODY;
            if (!(c->pflags & SMFIP_NOEOH)) {
                put_macros(c, KT_MS_EOH, SMFIC_EOH);
                size_t at = packet_begin(&c->out, SMFIC_EOH);
                packet_end(&c->out, at);
                if (!(c->pflags & SMFIP_NR_EOH)) {
                    conn_flush(c, 1, tmo);
                    return;
                }
            }
            continue;
        case E_BODY: {
            if ((c->pflags & SMFIP_NOBODY) || c->skip_body) {
                g->step = E_EOM;
                continue;
            }
            int rc = put_body_chunk(c);
            if (rc < 0) {
                conn_fail(c, "cannot read the message file");
                event_next(g);
                return;
            }
            if (rc == 0) {
                g->step = E_EOM;
                continue;
            }
            if (!(c->pflags & SMFIP_NR_BODY)) {
                conn_flush(c, 1, tmo);
                return;
            }
            /* without replies, send in batches so the output buffer stays small */
            if (kt_buf_used(&c->out) >= 4 * MILTER_CHUNK) {
                conn_flush(c, 0, tmo);
                return;
            }
            continue;
        }
        case E_EOM: {
            g->step = E_REPLIES;
            put_macros(c, KT_MS_EOD, SMFIC_BODYEOB);
            size_t at = packet_begin(&c->out, SMFIC_BODYEOB);
            packet_end(&c->out, at);
            conn_flush(c, 1, tmo);
            return;
        }
        case E_REPLIES:
        case E_DONE:
            return;
        }
    }
}

/* Bytes of the ESMTP arguments at s (up to end, where the packet ends, which need not be a NUL) to log,
 * at most 100 as Postfix; a control character ends them. */
static int args_len(const char *s, const char *end)
{
    int n = 0;
    while (s + n < end && n < 100 && (unsigned char)s[n] >= 32 && s[n] != 127)
        n++;
    return n;
}

static int rcpt_index(const struct msgview *v, const char *addr)
{
    for (size_t i = 0; i < v->n_rcpts; i++)
        if (strcasecmp(v->rcpts[i], addr) == 0)
            return (int)i;
    return -1;
}

/* A modification request at the end of message (Postfix's cleanup_milter.c semantics). 0, or -1 for a
 * malformed or not negotiated one. */
static int eom_modify(struct mconn *c, char cmd, const char *d, size_t len)
{
    struct msgview *v = c->g->view;
    const char *end = d + len;
    const char *s1 = d, *s2 = NULL;
    uint32_t idx = 0;
    char addr[600];
    if (cmd == SMFIR_INSHEADER || cmd == SMFIR_CHGHEADER) {
        if (len < 4)
            return -1;
        idx = get32((const unsigned char *)d);
        s1 = d + 4;
    }
    if (cmd != SMFIR_REPLBODY) {
        const char *nul = memchr(s1, '\0', (size_t)(end - s1));
        if (!nul)
            return -1;
        s2 = nul + 1;
    }
    switch (cmd) {
    case SMFIR_ADDHEADER:
    case SMFIR_INSHEADER:
    case SMFIR_CHGHEADER: {
        if (!(c->actions & (cmd == SMFIR_CHGHEADER ? SMFIF_CHGHDRS : SMFIF_ADDHDRS)))
            return -1;
        if (s2 >= end || !memchr(s2, '\0', (size_t)(end - s2)) || !valid_header_name(s1))
            return -1;
        v->added_bytes += strlen(s1) + strlen(s2);
        if (v->added_bytes > MAX_ADDED_HEADERS)
            return -1;
        char *val = header_value_from_milter(s2, (c->pflags & SMFIP_HDR_LEADSPC) != 0);
        if (cmd == SMFIR_CHGHEADER) {
            long i = view_find(v, s1, idx);
            if (i >= 0 && !*s2) {
                kt_free(v->hdrs[i].name);
                kt_free(v->hdrs[i].value);
                memmove(&v->hdrs[i], &v->hdrs[i + 1], (v->n_hdrs - (size_t)i - 1) * sizeof(*v->hdrs));
                v->n_hdrs--;
            } else if (i >= 0) {
                kt_free(v->hdrs[i].value);
                v->hdrs[i].value = val;
                val = NULL;
            } else if (*s2) {
                view_add_header(v, v->n_hdrs, s1, strlen(s1), val, strlen(val));
            }
        } else if (cmd == SMFIR_INSHEADER) {
            /* positions count our own Received: header too (not the trace headers of a final delivery, which
             * Postfix's delivery agents add later) */
            view_add_header(v, v->fixed + idx, s1, strlen(s1), val, strlen(val));
            if (idx == 0 && v->hidden)
                v->hidden = 0;   /* something now precedes it: it is an ordinary header from here on */
        } else {
            view_add_header(v, v->n_hdrs, s1, strlen(s1), val, strlen(val));
        }
        kt_free(val);
        v->edited = 1;
        return 0;
    }
    case SMFIR_ADDRCPT:
    case SMFIR_ADDRCPT_PAR:
    case SMFIR_DELRCPT:
        if (!(c->actions & (cmd == SMFIR_DELRCPT ? SMFIF_DELRCPT
                            : cmd == SMFIR_ADDRCPT ? SMFIF_ADDRCPT : SMFIF_ADDRCPT_PAR)))
            return -1;
        if (strip_brackets(s1, addr, sizeof(addr)) < 0)
            return -1;
        if (cmd == SMFIR_ADDRCPT_PAR && s2 < end && *s2)
            kt_warn("milter %s: add recipient <%s>: ignoring ESMTP arguments \"%.*s\"", c->conf->endpoint,
                    addr, args_len(s2, end), s2);
        if (cmd == SMFIR_DELRCPT) {
            int i = rcpt_index(v, addr);
            if (i >= 0) {
                kt_free(v->rcpts[i]);
                memmove(&v->rcpts[i], &v->rcpts[i + 1], (v->n_rcpts - (size_t)i - 1) * sizeof(*v->rcpts));
                v->n_rcpts--;
            }
        } else if (addr[0] && rcpt_index(v, addr) < 0) {
            if (v->n_rcpts >= MAX_RCPTS)
                return -1;   /* not dropped in silence: the milter failed */
            v->rcpts = kt_realloc(v->rcpts, (v->n_rcpts + 1) * sizeof(*v->rcpts));
            v->rcpts[v->n_rcpts++] = kt_strdup(addr);
        }
        v->envelope_edited = 1;
        return 0;
    case SMFIR_CHGFROM:
        if (!(c->actions & SMFIF_CHGFROM))
            return -1;
        if (strip_brackets(s1, addr, sizeof(addr)) < 0)
            return -1;
        /* as Postfix's cleanup: the sender changes, its ESMTP parameters do not */
        if (s2 < end && *s2)
            kt_warn("milter %s: change sender to <%s>: ignoring ESMTP arguments \"%.*s\"", c->conf->endpoint,
                    addr, args_len(s2, end), s2);
        kt_free(v->sender);
        v->sender = kt_strdup(addr);
        v->envelope_edited = 1;
        return 0;
    case SMFIR_REPLBODY:
        if (!(c->actions & SMFIF_CHGBODY))
            return -1;
        if (!v->body_open) {
            v->body_open = 1;
            kt_buf_reset(&v->newbody);
        }
        if (v->body_too_big)
            return 0;   /* the rest of it is read and dropped: the message is refused at the milter's end */
        /* stored with CRLF line ends, whatever the milter sends (a bare LF grows by one byte; a bare CR is
         * dropped, also one that ended the previous packet) */
        if (len && d[0] != '\n' && v->newbody.len && v->newbody.data[v->newbody.len - 1] == '\r')
            v->newbody.len--;
        for (size_t i = 0; i < len; i++) {
            if (d[i] == '\n' && !(v->newbody.len && v->newbody.data[v->newbody.len - 1] == '\r'))
                kt_buf_append(&v->newbody, "\r\n", 2);
            else if (d[i] == '\r' && i + 1 < len && d[i + 1] != '\n')
                continue;
            else
                kt_buf_append(&v->newbody, d + i, 1);
        }
        /* the limit applies to the body as stored, its final CRLF included (eom_milter_done) */
        long long limit = c->g->set->message_size_limit;
        if ((limit > 0 && (long long)v->newbody.len + 2 > limit) || v->newbody.len + 2 > MAX_REPLACED_BODY) {
            kt_warn("milter %s: replaced body is larger than message_size_limit (%lld bytes)", c->conf->endpoint,
                    limit > 0 ? limit : (long long)MAX_REPLACED_BODY);
            v->body_too_big = 1;
            kt_buf_release(&v->newbody);
        }
        return 0;
    }
    return -1;
}

/* The milter's end-of-message replies are over (c->g->res says how, or the milter failed). */
static void eom_milter_done(struct mconn *c)
{
    struct msgview *v = c->g->view;
    if (v->body_open) {
        v->body_open = 0;
        if (v->newbody.len && v->newbody.data[v->newbody.len - 1] == '\r')
            v->newbody.len--;   /* a bare CR at the very end */
        if (v->newbody.len && (v->newbody.len < 2 || memcmp(v->newbody.data + v->newbody.len - 2, "\r\n", 2)))
            kt_buf_append(&v->newbody, "\r\n", 2);
        v->body_replaced = 1;
        v->edited = 1;
    }
}

static int eom_reply(struct mconn *c, char cmd, const char *d, size_t len)
{
    struct kt_milters *g = c->g;
    if (g->step != E_REPLIES) {
        /* a reply to DATA, a header, the end of headers or a body chunk */
        switch (cmd) {
        case SMFIR_CONTINUE:
            eom_next(c);
            return 0;
        case SMFIR_SKIP:
            if (g->step == E_BODY || g->step == E_EOM) {
                c->skip_body = 1;
                g->step = E_EOM;
                eom_next(c);
                return 0;
            }
            break;
        case SMFIR_PROGRESS:
            return 1;
        case SMFIR_QUARANTINE:
        case SMFIR_ACCEPT:
        case SMFIR_REJECT:
        case SMFIR_TEMPFAIL:
        case SMFIR_REPLYCODE:
        case SMFIR_DISCARD:
        case SMFIR_SHUTDOWN:
            break;
        default: {
            char why[80];
            snprintf(why, sizeof(why), "unexpected filter response '%c' during the message", cmd);
            conn_fail(c, why);
            event_next(g);
            return 0;
        }
        }
    }
    switch (cmd) {
    case SMFIR_ADDHEADER:
    case SMFIR_INSHEADER:
    case SMFIR_CHGHEADER:
    case SMFIR_ADDRCPT:
    case SMFIR_ADDRCPT_PAR:
    case SMFIR_DELRCPT:
    case SMFIR_CHGFROM:
    case SMFIR_REPLBODY:
        if (g->step != E_REPLIES || eom_modify(c, cmd, d, len) < 0) {
            char why[96];
            snprintf(why, sizeof(why), "bad or not negotiated modification '%c'", cmd);
            conn_fail(c, why);
            event_next(g);
            return 0;
        }
        return 1;
    case SMFIR_QUARANTINE:
        if (!(c->actions & SMFIF_QUARANTINE) && c->version >= 3) {
            conn_fail(c, "quarantine not negotiated");
            event_next(g);
            return 0;
        }
        g->res.hold = 1;
        snprintf(g->res.hold_reason, sizeof(g->res.hold_reason), "%.*s", (int)(len ? len - 1 : 0), d);
        return 1;
    case SMFIR_PROGRESS:
        return 1;
    case SMFIR_CONTINUE:
    case SMFIR_ACCEPT:
        eom_milter_done(c);
        if (g->view->body_too_big) {
            /* Postfix's cleanup: the queue file grew past message_size_limit */
            result_reply(g, KT_MILTER_REJECT, "552 5.3.4 Error: message file too big");
            event_done(g);
            return 0;
        }
        g->cur++;
        event_next(g);
        return 0;
    case SMFIR_DISCARD:
        eom_milter_done(c);
        result_reply(g, KT_MILTER_DISCARD, NULL);
        event_done(g);
        return 0;
    case SMFIR_SKIP:
        break;
    default:
        /* reject, tempfail, reply code, shutdown: as for any event */
        event_reply(c, cmd, d, len);
        if (c->state == M_ERROR) {
            event_next(g);
            return 0;
        }
        event_done(g);
        return 0;
    }
    conn_fail(c, "unexpected filter response at the end of the message");
    event_next(g);
    return 0;
}

/* ---- I/O completions ---- */

/* One complete reply packet. Returns 1 when the connection should read another one; 0 when the event
 * went on (another exchange, the next milter or the outcome). */
static int conn_packet(struct mconn *c, char cmd, const char *d, size_t len)
{
    struct kt_milters *g = c->g;
    if (c->state == M_NEGOTIATING) {
        if (cmd != SMFIC_OPTNEG || negotiated(c, (const unsigned char *)d, len) < 0) {
            if (c->state != M_ERROR)
                conn_fail(c, "bad negotiation reply");
        }
        event_next(g);   /* negotiated: now the event the connection was made for */
        return 0;
    }
    if (g->ev == EV_EOM)
        return eom_reply(c, cmd, d, len);
    if (event_reply(c, cmd, d, len))
        return 1;
    if (g->decided)
        event_done(g);
    else
        event_next(g);
    return 0;
}

/* Takes reply packets from the input buffer, reading more when none is complete. */
static void conn_read(struct mconn *c)
{
    for (;;) {
        size_t have = kt_buf_used(&c->in);
        if (have < 4) {
            conn_submit(c, IO_RECV);
            return;
        }
        const unsigned char *p = (const unsigned char *)kt_buf_head(&c->in);   /* not before: NULL + 0 */
        uint32_t plen = get32(p);
        if (plen == 0 || plen > MAX_PACKET) {
            conn_fail(c, "bad reply packet length");
            event_next(c->g);
            return;
        }
        if (have < 4 + (size_t)plen) {
            conn_submit(c, IO_RECV);
            return;
        }
        if (c->want_reply && monotonic_ms() - c->exchange_start_ms > MAX_EXCHANGE_TIMEOUTS * c->timeout_ms) {
            char why[128];
            snprintf(why, sizeof(why), "no decision within %lld s (%d times the timeout) of progress reports or "
                     "modifications", MAX_EXCHANGE_TIMEOUTS * c->timeout_ms / 1000, MAX_EXCHANGE_TIMEOUTS);
            conn_fail(c, why);
            event_next(c->g);
            return;
        }
        char *pkt = kt_malloc(plen);
        memcpy(pkt, p + 4, plen);
        kt_buf_consume(&c->in, 4 + (size_t)plen);
        int more = conn_packet(c, pkt[0], pkt + 1, plen - 1);
        kt_free(pkt);
        if (!more)
            return;
    }
}

/* After an exchange: the next thing for this connection. */
static void conn_next(struct mconn *c)
{
    struct kt_milters *g = c->g;
    if (g->cb && g->ev == EV_EOM && g->step != E_REPLIES && g->step != E_DONE && g->cur < g->n
        && &g->conns[g->cur] == c) {
        eom_next(c);
        return;
    }
}

static void on_io(struct kt_op *op, int res, unsigned flags)
{
    struct mconn *c = (struct mconn *)((char *)op - offsetof(struct mconn, io_op));
    struct kt_milters *g = c->g;
    enum io_kind kind = c->io;
    (void)flags;
    g->pending--;
    c->io = IO_NONE;
    if (g->freed) {
        group_maybe_free(g);
        return;
    }
    if (c->state == M_ERROR)
        return;   /* failed meanwhile: the event went on without it */
    if (res < 0 || (res == 0 && kind == IO_RECV)) {
        char why[160];
        const char *what = kind == IO_CONNECT ? "connect" : kind == IO_SEND ? "write" : "read";
        if (res == -ECANCELED)
            snprintf(why, sizeof(why), "%s timeout", what);
        else if (res == 0)
            snprintf(why, sizeof(why), "read: connection closed by the milter");
        else
            snprintf(why, sizeof(why), "%s: %s", what, strerror(-res));
        conn_fail(c, why);
        event_next(g);
        return;
    }
    switch (kind) {
    case IO_CONNECT:
        send_optneg(c);
        return;
    case IO_SEND:
        kt_buf_consume(&c->out, (size_t)res);
        if (kt_buf_used(&c->out)) {
            conn_submit(c, IO_SEND);
            return;
        }
        kt_buf_reset(&c->out);
        if (c->want_reply) {
            conn_read(c);
            return;
        }
        conn_next(c);
        return;
    case IO_RECV:
        c->in.len += (size_t)res;
        break;
    case IO_NONE:
        return;
    }
    conn_read(c);
}

/* ---- the session's interface ---- */

struct kt_milters *kt_milters_new(struct kt_loop *loop, const struct kt_milter_set *set, kt_milter_macro_fn macro,
                                  void *macro_arg)
{
    if (!set || set->n == 0)
        return NULL;
    struct kt_milters *g = kt_calloc(1, sizeof(*g));
    g->loop = loop;
    g->set = set;
    g->macro = macro;
    g->macro_arg = macro_arg;
    g->n = set->n;
    g->conns = kt_calloc(set->n, sizeof(*g->conns));
    g->defer_op.cb = on_defer;
    for (size_t i = 0; i < set->n; i++) {
        struct mconn *c = &g->conns[i];
        c->g = g;
        c->conf = &set->v[i];
        c->fd = -1;
        c->io_op.cb = on_io;
        c->to_op.cb = on_timeout_done;
    }
    return g;
}

static void group_maybe_free(struct kt_milters *g)
{
    if (!g->freed || g->pending)
        return;
    for (size_t i = 0; i < g->n; i++) {
        struct mconn *c = &g->conns[i];
        if (c->fd >= 0)
            close(c->fd);
        kt_buf_release(&c->out);
        kt_buf_release(&c->in);
        for (int k = 0; k < KT_MS_COUNT; k++)
            kt_free(c->macros[k]);
    }
    args_free(g);
    msgview_free(g->view);
    kt_free(g->chunk);
    kt_free(g->conns);
    kt_free(g);
}

void kt_milters_free(struct kt_milters *ms)
{
    if (!ms)
        return;
    ms->freed = 1;
    ms->cb = NULL;
    for (size_t i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->conns[i];
        if (c->fd < 0)
            continue;
        if (c->io == IO_NONE && (c->state == M_READY || c->state == M_ACCEPT_CON || c->state == M_REJECT_CON)) {
            /* SMFIC_QUIT, best effort: a few bytes into an idle socket never block */
            static const unsigned char quit[5] = { 0, 0, 0, 1, SMFIC_QUIT };
            ssize_t w = send(c->fd, quit, sizeof(quit), MSG_DONTWAIT | MSG_NOSIGNAL);
            (void)w;
        }
        shutdown(c->fd, SHUT_RDWR);   /* operations in flight complete now */
    }
    group_maybe_free(ms);
}

void kt_milters_connect(struct kt_milters *ms, const char *hostname, int family, const char *addr, unsigned port,
                        kt_milter_cb cb, void *arg)
{
    const char *args[2] = { hostname, addr ? addr : "" };
    ms->family = family;
    ms->port = port;
    event_start(ms, EV_CONNECT, args, 2, cb, arg);
}

void kt_milters_helo(struct kt_milters *ms, const char *helo, kt_milter_cb cb, void *arg)
{
    event_start(ms, EV_HELO, &helo, 1, cb, arg);
}

void kt_milters_mail(struct kt_milters *ms, const char *const *args, size_t n, kt_milter_cb cb, void *arg)
{
    kt_milters_abort(ms);
    ms->discard = 0;
    event_start(ms, EV_MAIL, args, n, cb, arg);
}

void kt_milters_rcpt(struct kt_milters *ms, const char *const *args, size_t n, kt_milter_cb cb, void *arg)
{
    event_start(ms, EV_RCPT, args, n, cb, arg);
}

void kt_milters_data(struct kt_milters *ms, kt_milter_cb cb, void *arg)
{
    event_start(ms, EV_DATA, NULL, 0, cb, arg);
}

void kt_milters_unknown(struct kt_milters *ms, const char *line, kt_milter_cb cb, void *arg)
{
    event_start(ms, EV_UNKNOWN, &line, 1, cb, arg);
}

int kt_milters_in_message(const struct kt_milters *ms)
{
    return ms && ms->in_msg;
}

void kt_milters_abort(struct kt_milters *ms)
{
    if (!ms)
        return;
    for (size_t i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->conns[i];
        if (c->saw_message && c->state == M_READY) {
            /* no reply; it leaves with the next exchange */
            size_t at = packet_begin(&c->out, SMFIC_ABORT);
            packet_end(&c->out, at);
        }
        c->saw_message = 0;
        c->msg_accepted = 0;
        c->data_sent = 0;
    }
    ms->in_msg = 0;
    ms->discard = 0;
    msgview_free(ms->view);
    ms->view = NULL;
}

void kt_milters_eom(struct kt_milters *ms, int fd, off_t off, off_t len, size_t fixed, int skip_received,
                    const char *sender, const char *const *rcpts, size_t n, kt_milter_cb cb, void *arg)
{
    msgview_free(ms->view);
    struct msgview *v = ms->view = kt_calloc(1, sizeof(*v));
    v->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    v->msg_off = off;
    v->msg_len = len;
    v->sender = kt_strdup(sender);
    v->rcpts = kt_calloc(n ? n : 1, sizeof(*v->rcpts));
    for (size_t i = 0; i < n; i++)
        v->rcpts[i] = kt_strdup(rcpts[i]);
    v->n_rcpts = n;
    int rc = v->fd < 0 ? -errno : view_load(v);
    if (rc == 0) {
        v->fixed = fixed < v->n_hdrs ? fixed : v->n_hdrs;
        if (skip_received && v->fixed < v->n_hdrs && strcasecmp(v->hdrs[v->fixed].name, "Received") == 0)
            v->hidden = 1;
    }
    if (rc < 0) {
        ms->ev = EV_EOM;
        ms->cb = cb;
        ms->cb_arg = arg;
        memset(&ms->res, 0, sizeof(ms->res));
        kt_err("milter: cannot read the message back: %s", strerror(-rc));
        result_reply(ms, KT_MILTER_REJECT, "451 4.3.0 Error: queue file read error");
        ms->in_call++;
        event_done(ms);
        ms->in_call--;
        return;
    }
    event_start(ms, EV_EOM, NULL, 0, cb, arg);
}

const char *kt_milters_sender(const struct kt_milters *ms)
{
    return ms->view ? ms->view->sender : "";
}

size_t kt_milters_rcpts(const struct kt_milters *ms, const char *const **rcpts)
{
    if (!ms->view) {
        *rcpts = NULL;
        return 0;
    }
    *rcpts = (const char *const *)ms->view->rcpts;
    return ms->view->n_rcpts;
}

/* ---- writing the edited message ---- */

static void write_body(struct kt_milters *g);

static void on_write_drained(void *arg, int res)
{
    struct kt_milters *g = arg;
    if (res < 0) {
        void (*cb)(void *, int) = g->wcb;
        g->wcb = NULL;
        if (cb)
            cb(g->warg, res);
        return;
    }
    write_body(g);
}

static void write_body(struct kt_milters *g)
{
    struct msgview *v = g->view;
    while (g->wpos < v->body_len) {
        if (!g->chunk)
            g->chunk = kt_malloc(MILTER_CHUNK);
        size_t n = (size_t)(v->body_len - g->wpos < MILTER_CHUNK ? v->body_len - g->wpos : MILTER_CHUNK);
        ssize_t r;
        do
            r = pread(v->fd, g->chunk, n, v->body_off + g->wpos);
        while (r < 0 && errno == EINTR);
        if (r <= 0) {
            void (*cb)(void *, int) = g->wcb;
            g->wcb = NULL;
            if (cb)
                cb(g->warg, r < 0 ? -errno : -EIO);
            return;
        }
        g->wpos += r;
        if (kt_delivery_append(g->wd, g->chunk, (size_t)r))
            return;   /* the drain callback goes on */
    }
    void (*cb)(void *, int) = g->wcb;
    g->wcb = NULL;
    if (cb)
        cb(g->warg, 0);
}

void kt_milters_write(struct kt_milters *ms, struct kt_delivery *d, int keep_fixed, void (*cb)(void *arg, int res),
                      void *arg)
{
    struct msgview *v = ms->view;
    struct kt_buf b = { 0 };
    for (size_t i = keep_fixed ? 0 : v->fixed; i < v->n_hdrs; i++) {
        kt_buf_printf(&b, "%s:", v->hdrs[i].name);
        kt_buf_append(&b, v->hdrs[i].value, strlen(v->hdrs[i].value));
        kt_buf_append(&b, "\r\n", 2);
    }
    if (v->had_blank || v->body_replaced)
        kt_buf_append(&b, "\r\n", 2);
    ms->wd = d;
    ms->wcb = cb;
    ms->warg = arg;
    kt_delivery_set_drain_cb(d, on_write_drained, ms);
    if (v->body_replaced) {
        kt_buf_append(&b, v->newbody.data, v->newbody.len);
        ms->wpos = v->body_len;   /* nothing from the file */
    } else {
        ms->wpos = 0;
    }
    int behind = kt_delivery_append(d, b.data, b.len);
    kt_buf_release(&b);
    if (behind)
        return;
    write_body(ms);
}

int kt_milters_render(struct kt_milters *ms, struct kt_buf *out)
{
    struct msgview *v = ms->view;
    if (!v)
        return -EINVAL;
    for (size_t i = 0; i < v->n_hdrs; i++) {
        kt_buf_printf(out, "%s:", v->hdrs[i].name);
        kt_buf_append(out, v->hdrs[i].value, strlen(v->hdrs[i].value));
        kt_buf_append(out, "\r\n", 2);
    }
    if (v->had_blank || v->body_replaced)
        kt_buf_append(out, "\r\n", 2);
    if (v->body_replaced) {
        kt_buf_append(out, v->newbody.data, v->newbody.len);
        return 0;
    }
    kt_buf_reserve(out, (size_t)v->body_len);
    for (off_t pos = 0; pos < v->body_len;) {
        ssize_t r = pread(v->fd, out->data + out->len, (size_t)(v->body_len - pos), v->body_off + pos);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        out->len += (size_t)r;
        pos += r;
    }
    return 0;
}

/* ---- replay: the reply parser without a ring or a socket (tests/fuzz/fuzz_milter.c) ---- */

/* Completes the operation "in flight" or the deferred outcome until none is left. */
static void replay_run(struct replay *r)
{
    while (r->io || r->deferred) {
        if (!r->io) {
            r->deferred = 0;
            on_defer(&r->g->defer_op, 0, 0);
            continue;
        }
        struct mconn *c = r->io;
        r->io = NULL;
        int res = 0;
        if (c->io == IO_SEND) {
            res = (int)kt_buf_used(&c->out);
        } else if (c->io == IO_RECV) {
            size_t n = r->len - r->pos;   /* 0: the milter closed the connection */
            if (n > r->slice)
                n = r->slice;
            if (n > c->in.cap - c->in.len)
                n = c->in.cap - c->in.len;
            memcpy(c->in.data + c->in.len, r->data + r->pos, n);
            r->pos += n;
            res = (int)n;
        }
        on_io(&c->io_op, res, 0);
        on_timeout_done(&c->to_op, -ECANCELED, 0);
    }
}

static void replay_cb(void *arg, const struct kt_milter_result *res)
{
    struct replay *r = arg;
    r->called++;
    if (r->check)
        r->check(r->check_arg, res);
}

static const char *replay_macro(void *arg, const char *name, char *buf, size_t len)
{
    (void)arg;
    snprintf(buf, len, "value of %s", name);
    return buf;
}

/* What an edited message must look like whatever the milter sent: header names a header may have, values
 * whose every line break is CRLF followed by white space, envelope addresses without control characters,
 * a replaced body within the limit. 0 or -EPROTO. */
static int replay_view_ok(const struct kt_milters *g)
{
    const struct msgview *v = g->view;
    if (!v)
        return 0;
    for (size_t i = 0; i < v->n_hdrs; i++) {
        if (!valid_header_name(v->hdrs[i].name))
            return -EPROTO;
        for (const char *p = v->hdrs[i].value; *p; p++) {
            if (*p == '\n' && (p == v->hdrs[i].value || p[-1] != '\r'))
                return -EPROTO;
            if (*p == '\r' && (p[1] != '\n' || (p[2] != ' ' && p[2] != '\t')))
                return -EPROTO;
        }
    }
    for (size_t i = 0; i <= v->n_rcpts; i++) {
        const char *a = i < v->n_rcpts ? v->rcpts[i] : v->sender;
        for (const char *p = a; p && *p; p++)
            if ((unsigned char)*p < 32 || *p == 127)
                return -EPROTO;
    }
    if (g->set->message_size_limit && v->newbody.len > (size_t)g->set->message_size_limit)
        return -EPROTO;
    for (size_t i = 0; v->body_replaced && i < v->newbody.len; i++)
        if ((v->newbody.data[i] == '\r') != (i + 1 < v->newbody.len && v->newbody.data[i + 1] == '\n')
            || (v->newbody.data[i] == '\n' && (i == 0 || v->newbody.data[i - 1] != '\r')))
            return -EPROTO;   /* a bare CR or LF in the replaced body */
    return 0;
}

int kt_milter_replay(const unsigned char *replies, size_t len, unsigned protocol, unsigned flags,
                     int msg_fd, off_t msg_len, void (*check)(void *arg, const struct kt_milter_result *r),
                     void *arg)
{
    struct kt_milter_conf conf = {
        .endpoint = (char *)"inet:127.0.0.1:9", .family = AF_INET, .host = "127.0.0.1", .port = 9,
        .default_action = (enum kt_milter_default)(flags & 3), .connect_timeout_ms = 1000,
        .command_timeout_ms = 1000, .content_timeout_ms = 1000, .protocol = protocol < 2 || protocol > 6 ? 6 : protocol,
    };
    struct kt_milter_set set = { .n = 1, .v = &conf, .message_size_limit = flags & 4 ? 64 : 0 };
    char macros[] = "j {daemon_name} i";
    for (int i = 0; i < KT_MS_COUNT; i++)
        set.macros[i] = macros;
    struct replay r = { .data = replies, .len = len, .slice = flags & 8 ? 1 : 4096, .check = check,
                        .check_arg = arg };
    struct kt_milters *g = kt_milters_new(NULL, &set, replay_macro, NULL);
    g->replay = &r;
    r.g = g;
    int rc = 0;
    const char *mail[] = { "<a@example.org>", "SIZE=100" };
    const char *rcpt[] = { "<b@example.test>" };
    const char *rcpts[] = { "b@example.test", "c@example.test" };
    for (int step = 0; step < 7 && rc == 0; step++) {
        int before = r.called;
        switch (step) {
        case 0: kt_milters_connect(g, "[127.0.0.1]", '4', "127.0.0.1", 2525, replay_cb, &r); break;
        case 1: kt_milters_helo(g, "client.example", replay_cb, &r); break;
        case 2:
            if (!(flags & 16))
                continue;
            kt_milters_unknown(g, "XFOO bar", replay_cb, &r);
            break;
        case 3: kt_milters_mail(g, mail, 2, replay_cb, &r); break;
        case 4: kt_milters_rcpt(g, rcpt, 1, replay_cb, &r); break;
        case 5: kt_milters_data(g, replay_cb, &r); break;
        case 6:
            kt_milters_eom(g, msg_fd, 0, msg_len, 0, 1, "a@example.org", rcpts, 2, replay_cb, &r);
            break;
        }
        replay_run(&r);
        if (r.called != before + 1)
            rc = -EDEADLK;   /* every event has exactly one outcome */
        else if (step == 6 && (rc = replay_view_ok(g)) == 0 && g->res.verdict == KT_MILTER_CONTINUE) {
            /* the edited message as a caller gets it: CRLF line ends only */
            struct kt_buf out = { 0 };
            if (kt_milters_render(g, &out) == 0)
                for (size_t i = 0; i < out.len && rc == 0; i++)
                    if ((out.data[i] == '\r') != (i + 1 < out.len && out.data[i + 1] == '\n')
                        || (out.data[i] == '\n' && (i == 0 || out.data[i - 1] != '\r')))
                        rc = -EPROTO;
            kt_buf_release(&out);
        }
        else if (g->res.verdict != KT_MILTER_CONTINUE && step >= 3)
            break;   /* the session would not go on with this message */
    }
    kt_milters_free(g);
    replay_run(&r);   /* completes what was in flight; the last completion frees */
    return rc;
}
