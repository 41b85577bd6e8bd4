/* `ktrelay sendmail` (also invoked as sendmail, mailq, newaliases): the
 * Sendmail-compatible local submission interface, in the manner of
 * Postfix's sendmail(1).
 *
 * Options: -t (recipients from To:, Cc:, Bcc:, added to those given; Bcc:
 * removed), -i / -oi (a lone "." does not end the message), -f / -r sender
 * ("<>" is the null sender), -F full name (for a From: header that is
 * missing), -C / -c configuration directory, -v (log lines on stderr too),
 * -bm (the default: submit), -bp (list the queue, like mailq), -bs (SMTP on
 * stdin/stdout), -bi (newaliases), -q (flush the queue), and the DSN requests
 * of Postfix's sendmail: -N never | success,delay,failure (NOTIFY for every
 * recipient), -R hdrs | full (RET), -V envid (ENVID, printable ASCII of at
 * most 100 characters; stored as xtext). -B, -X,
 * -h, -L, -m, -n, -U and other -o options are accepted and ignored, as
 * Postfix's sendmail ignores most of them; -bd, -bD, -bh, -bH, -bl, -bv are
 * refused.
 *
 * The message is read from stdin (LF or CRLF; stored CRLF; bare CR dropped).
 * Local submissions get the headers they lack (From:, Date:, Message-ID:)
 * as Postfix's cleanup adds them. The default sender is LOGIN@$myorigin, and
 * myorigin = /file reads the domain from the file's first line, as Debian's
 * myorigin = /etc/mailname means.
 *
 * Where it goes: a user who can write the queue (root, the queue's owner)
 * queues the message directly (durable before the exit status 0) and logs it
 * like Postfix's pickup; anybody else drops it into maildrop/ for the
 * daemon's pickup (pickup.h). Either way an envelope the pickup would refuse
 * (an address with a space, a control character, < or >, or of more than
 * 512 bytes; more than 10000 recipients) is refused here, before anything is
 * written, so that no message is lost after an exit status 0 and no address
 * can add a line to the queue file. A message larger than
 * message_size_limit (with the headers added here) is refused the same way,
 * as Postfix's sendmail refuses it ("SENDER(UID): message file too big";
 * 552 5.3.4 in -bs mode). Exit codes are sysexits(3)'s: 0, 64 usage, 65
 * such an envelope, 69 no maildrop (no daemon has prepared this queue) or
 * a message too big, 75 try again, 77, 78. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "conf/config.h"
#include "conf/settings.h"
#include "core/alloc.h"
#include "core/durable.h"
#include "delivery/resolve.h"
#include "delivery/rewrite.h"
#include "core/buf.h"
#include "core/log.h"
#include "queue/pickup.h"
#include "smtpd/smtp_parse.h"
#include "queue/queue.h"

struct rcpt_list {
    char **v;
    size_t n, cap;
};

static void rcpt_add(struct rcpt_list *l, const char *s, size_t len)
{
    while (len && (*s == ' ' || *s == '\t')) {
        s++;
        len--;
    }
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    if (len >= 2 && s[0] == '<' && s[len - 1] == '>') {
        s++;
        len -= 2;
    }
    if (!len)
        return;
    for (size_t i = 0; i < l->n; i++)
        if (strlen(l->v[i]) == len && !strncasecmp(l->v[i], s, len))
            return;
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->v = kt_realloc(l->v, l->cap * sizeof(*l->v));
    }
    l->v[l->n++] = kt_strndup(s, len);
}

static void rcpt_free(struct rcpt_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        kt_free(l->v[i]);
    kt_free(l->v);
}

/* An RFC 5322 address list ("A <a@x>, b@y (c), grp: c@z;"): the addresses. */
static void parse_address_list(struct rcpt_list *l, const char *v, size_t len)
{
    char cur[1024];
    size_t cl = 0;
    int quote = 0, angle = 0, comment = 0, have_angle = 0, word_end = 0;
    char angle_buf[1024];
    size_t al = 0;
    for (size_t i = 0; i <= len; i++) {
        char c = i < len ? v[i] : ',';
        if (quote) {
            if (c == '\\' && i + 1 < len)
                i++;
            else if (c == '"')
                quote = 0;
            continue;
        }
        if (comment) {
            if (c == '(')
                comment++;
            else if (c == ')')
                comment--;
            continue;
        }
        if (angle) {
            if (c == '>')
                angle = 0;
            else if (al + 1 < sizeof(angle_buf))
                angle_buf[al++] = c;
            continue;
        }
        switch (c) {
        case '"': quote = 1; cl = 0; break;     /* a display name, not an address */
        case '(': comment = 1; break;
        case '<': angle = 1; have_angle = 1; al = 0; break;
        case ':': cl = 0; break;                 /* group name */
        case ',':
        case ';':
            if (have_angle)
                rcpt_add(l, angle_buf, al);
            else
                rcpt_add(l, cur, cl);
            cl = al = 0;
            have_angle = word_end = 0;
            break;
        case '\r':
        case '\n':
            break;
        default:
            if (c == ' ' || c == '\t') {
                word_end = cl > 0;
                break;
            }
            if (word_end) {          /* "Name addr" without brackets: keep the last word */
                cl = 0;
                word_end = 0;
            }
            if (cl + 1 < sizeof(cur))
                cur[cl++] = c;
        }
    }
}

/* Bytes of the header section: the header lines (RFC 5322 2.2: a field name
 * of printable characters and a colon, or a continuation line) from the
 * start, up to the first line that is none (normally the empty line). */
static size_t header_len(const char *m, size_t len)
{
    size_t pos = 0;
    int any = 0;
    while (pos < len) {
        const char *nl = memchr(m + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - m) + 1 : len;
        size_t i = pos;
        if ((m[pos] == ' ' || m[pos] == '\t') && any) {
            pos = end;
            continue;
        }
        while (i < end && m[i] > ' ' && m[i] < 0x7f && m[i] != ':')
            i++;
        if (i == pos || i >= end || m[i] != ':')
            break;
        any = 1;
        pos = end;
    }
    return pos;
}

/* Walk the headers: cb(name, name_len, value, value_len, start, end) per
 * logical header (continuation lines included). */
typedef void (*header_cb)(void *arg, const char *name, size_t nl, const char *val, size_t vl, size_t start,
                          size_t end);
static void each_header(const char *m, size_t hlen, header_cb cb, void *arg)
{
    size_t pos = 0;
    while (pos < hlen) {
        size_t start = pos, end = pos;
        do {
            const char *nl = memchr(m + end, '\n', hlen - end);
            end = nl ? (size_t)(nl - m) + 1 : hlen;
        } while (end < hlen && (m[end] == ' ' || m[end] == '\t'));
        const char *colon = memchr(m + start, ':', end - start);
        if (colon)
            cb(arg, m + start, (size_t)(colon - (m + start)), colon + 1, end - (size_t)(colon + 1 - m), start, end);
        pos = end;
    }
}

struct scan_state {
    struct rcpt_list *rcpts;
    int want_rcpts;
    int has_from, has_date, has_msgid;
    size_t bcc_start[64], bcc_end[64];
    size_t n_bcc;
};

static void scan_header(void *arg, const char *name, size_t nl, const char *val, size_t vl, size_t start,
                        size_t end)
{
    struct scan_state *st = arg;
    int is_bcc = nl == 3 && !strncasecmp(name, "bcc", 3);
    if (st->want_rcpts && ((nl == 2 && (!strncasecmp(name, "to", 2) || !strncasecmp(name, "cc", 2))) || is_bcc))
        parse_address_list(st->rcpts, val, vl);
    if (is_bcc && st->n_bcc < 64) {
        st->bcc_start[st->n_bcc] = start;
        st->bcc_end[st->n_bcc++] = end;
    }
    if (nl == 4 && !strncasecmp(name, "from", 4))
        st->has_from = 1;
    if (nl == 4 && !strncasecmp(name, "date", 4))
        st->has_date = 1;
    if (nl == 10 && !strncasecmp(name, "message-id", 10))
        st->has_msgid = 1;
}

/* stdin: lines end in LF or CRLF. The lines then go through the server's line-ending rule (smtp_parse.h), so
 * a CR inside a line is stored as a line end, as smtpd stores it, never raw: the queue holds only canonical
 * CRLF lines. How a "." is read: */
enum dots {
    DOTS_IGNORE,     /* -i, -oi: a "." is text */
    DOTS_SENDMAIL,   /* sendmail(1) without -i: a line with a single "." ends the message */
    DOTS_SMTP,       /* -bs DATA (RFC 5321 4.5.2): a single "." ends it, a leading "." of a line is removed, and past
                      * the limit the rest is read to the "." and dropped, so the session stays in step */
};

/* read_message's outcome: bits */
#define READ_OVER 1   /* past the limit: what was kept is not the whole message */
#define READ_EOF 2    /* DOTS_SMTP: the input ended before the "." (the message is incomplete) */

/* Reads the message from IN into OUT (CRLF lines). Past LIMIT bytes in OUT (0: no limit) it stops keeping
 * what it reads, and stops reading (but for DOTS_SMTP), as Postfix's sendmail stops at its file size limit.
 * Returns READ_* bits, 0 for a whole message. A line longer than READ_PIECE goes to the parser in pieces, so what is held is
 * bounded by the limit and READ_PIECE, never by the longest line: a line of hundreds of megabytes is refused
 * without being held. */
#define READ_PIECE 65536
static int read_message(FILE *in, struct kt_buf *out, enum dots dots, long long limit)
{
    struct kt_data_parser p;
    const size_t canon_cap = 2 * (READ_PIECE + 2) + 2;   /* a bare line end grows by a byte (smtp_parse.h) */
    char *line = kt_malloc(READ_PIECE + 2), *canon = kt_malloc(canon_cap), end[2];
    size_t len = 0;
    int pieces = 0;   /* earlier pieces of the line under way went to the parser */
    int over = 0;     /* past the limit: nothing more is kept */
    int dot = 0;      /* the "." line ended it */

    kt_data_parser_init_chunked(&p);
    for (;;) {
        int ch = getc_unlocked(in);
        int line_end = ch == EOF || ch == '\n';
        if (!line_end) {
            line[len++] = (char)ch;
            if (len < READ_PIECE)
                continue;
        } else if (ch == EOF && len == 0 && !pieces) {
            break;   /* the input ended after a line end */
        }
        /* a whole line (or the end of the input, after a last line without a line end), or a piece of a
         * long line: all of it but a last CR, which may be the start of the line's end */
        size_t take = len, skip = 0;
        if (line_end) {
            if (take > 0 && line[take - 1] == '\r')
                take--;
            /* in SMTP the "." must end its line too (RFC 5321 4.1.1.4: CRLF "." CRLF) */
            if (dots != DOTS_IGNORE && !pieces && take == 1 && line[0] == '.' && (dots != DOTS_SMTP || ch != EOF)) {
                dot = 1;
                break;
            }
            line[take++] = '\r';
            line[take++] = '\n';
        } else if (line[take - 1] == '\r') {
            take--;
        }
        if (dots == DOTS_SMTP && !pieces && line[0] == '.')
            skip = 1;
        for (size_t used = skip; !over && used < take;) {
            size_t got;
            used += kt_data_parse(&p, line + used, take - used, canon, canon_cap, &got);
            kt_buf_append(out, canon, got);
        }
        if (line_end) {
            len = 0;
            pieces = 0;
        } else {
            len = len - take;   /* the CR held back, or nothing */
            line[0] = '\r';
            pieces = 1;
        }
        if (limit > 0 && (long long)kt_buf_used(out) > limit)
            over = 1;
        if (ch == EOF || (over && dots != DOTS_SMTP))
            break;
    }
    if (!over)
        kt_buf_append(out, end, kt_data_parse_end(&p, end));
    kt_free(canon);
    kt_free(line);
    return (over ? READ_OVER : 0) | (dots == DOTS_SMTP && !dot ? READ_EOF : 0);
}

/* myorigin, with Postfix's "/file" form: the first line of the file. */
static char *origin_of(const struct kt_config *cfg)
{
    const char *o = kt_config_get(cfg, NULL, "myorigin");
    if (!o || !*o)
        o = kt_config_get(cfg, NULL, "myhostname");
    if (o[0] != '/')
        return kt_strdup(o);
    FILE *f = fopen(o, "re");
    char buf[256] = "";
    if (f) {
        if (!fgets(buf, sizeof(buf), f))
            buf[0] = '\0';
        fclose(f);
    }
    buf[strcspn(buf, " \t\r\n")] = '\0';
    if (!buf[0]) {
        fprintf(stderr, "sendmail: warning: myorigin = %s: cannot read a domain from the file; using myhostname\n",
                o);
        return kt_strdup(kt_config_get(cfg, NULL, "myhostname"));
    }
    return kt_strdup(buf);
}

struct submit_ctx {
    const struct kt_config *cfg;
    const char *qdir, *host;
    char *origin;
    const char *fullname;
    int extract;             /* -t */
    unsigned notify;         /* -N: KT_QNOTIFY_* for every recipient, 0 = none */
    enum kt_qret ret;        /* -R */
    const char *envid;       /* -V, as xtext; NULL = none */
    int verbose;
    long long size_limit;    /* message_size_limit in bytes, 0 = none */
    int too_big;             /* the last submit() refused the message as larger than that */
    int input_too_big;       /* read_message() stopped at the limit (-t: recipients may lie past it) */
    int smtp_mode;           /* -bs: a refusal is a reply, not a fatal error on stderr */
    /* canonical and virtual alias rewriting for a message queued directly (built at its first use; the
     * daemon's pickup rewrites what is dropped into maildrop/) */
    int rw_built;
    struct kt_resolver *resolver;
    struct kt_rewrite *rw;
    /* non_smtpd_milters is set: every message goes through maildrop/ and the daemon's pickup, where the
     * milters see it (one path for all local submissions, as Postfix's postdrop and pickup) */
    int milters;
};

/* maildrop/NAME: the envelope and the message, written under ".NAME" and
 * renamed once complete and on disk. */
static int drop(const char *qdir, const char *sender, struct rcpt_list *r, const struct kt_qprops *props,
                const char *msg, size_t len)
{
    unsigned char rnd[16];
    char name[40], tmp[PATH_MAX], dst[PATH_MAX];
    if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
        return -EAGAIN;
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(name + 2 * i, 3, "%02X", rnd[i]);
    snprintf(tmp, sizeof(tmp), "%s/maildrop/.%s", qdir, name);
    snprintf(dst, sizeof(dst), "%s/maildrop/%s", qdir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    /* the pickup does not take a maildrop file's word for it (a local user wrote it): not marked canonical */
    char *env = kt_queue_envelope(sender, (const char *const *)r->v, r->n, time(NULL), -1, 0, props);
    int rc = kt_write_all(fd, env, strlen(env));
    kt_free(env);
    if (rc == 0)
        rc = kt_write_all(fd, msg, len);
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, dst) < 0)
        rc = -errno;
    if (rc < 0)
        unlink(tmp);
    return rc;
}

static int can_write_queue(const char *qdir)
{
    char p[PATH_MAX];
    if (geteuid() == 0)
        return 1;      /* root makes the queue directories if they are missing */
    snprintf(p, sizeof(p), "%s/new", qdir);
    if (access(p, W_OK) != 0)
        return errno == ENOENT && access(qdir, W_OK) == 0;
    snprintf(p, sizeof(p), "%s/tmp", qdir);
    return access(p, W_OK) == 0;
}

/* 0 when the envelope can be queued or dropped (pickup.h's rule), else EX_DATAERR with a message naming the
 * address (its control characters shown as '?'). */
static int envelope_check(const char *sender, const struct rcpt_list *rcpts)
{
    const char *bad = NULL, *what = "sender";
    if (!kt_pickup_addr_ok(sender, strlen(sender)))
        bad = sender;
    for (size_t i = 0; !bad && i < rcpts->n; i++)
        if (!kt_pickup_addr_ok(rcpts->v[i], strlen(rcpts->v[i]))) {
            bad = rcpts->v[i];
            what = "recipient";
        }
    if (bad) {
        char shown[80];
        size_t k = 0;
        for (; bad[k] && k + 1 < sizeof(shown); k++)
            shown[k] = (unsigned char)bad[k] < ' ' || bad[k] == 0x7f ? '?' : bad[k];
        shown[k] = '\0';
        fprintf(stderr, "sendmail: %s address <%s%s> cannot be used: it has a space, a control character, < or >, "
                "or more than 512 bytes; message not queued\n", what, shown, bad[k] ? "..." : "");
        return EX_DATAERR;
    }
    if (rcpts->n > KT_PICKUP_MAX_RCPTS) {
        fprintf(stderr, "sendmail: %zu recipients, more than %d in one message; message not queued\n", rcpts->n,
                KT_PICKUP_MAX_RCPTS);
        return EX_DATAERR;
    }
    return 0;
}

/* A message over message_size_limit, as Postfix's sendmail says it ("SENDER(UID): message file too big",
 * exit 69 EX_UNAVAILABLE): refused here rather than dropped for a pickup that could only remove it. */
static int too_big(const struct submit_ctx *c, const char *sender)
{
    if (c->smtp_mode) {
        kt_warn("%s(%u): message file too big", sender, (unsigned)getuid());
    } else {
        fprintf(stderr, "sendmail: fatal: %s(%u): message file too big\n", sender, (unsigned)getuid());
        kt_err("fatal: %s(%u): message file too big", sender, (unsigned)getuid());
    }
    return EX_UNAVAILABLE;
}

/* One message: complete its headers, pick its recipients, queue or drop it. EX_UNAVAILABLE for a message
 * larger than message_size_limit (with its added headers), EX_DATAERR for an envelope the pickup refuses. */
static int submit(struct submit_ctx *c, const char *sender_arg, struct rcpt_list *rcpts, struct kt_buf *body)
{
    struct passwd *pw = getpwuid(getuid());
    const char *login = pw ? pw->pw_name : "nobody";
    char *sender;
    if (!sender_arg)
        sender = kt_asprintf("%s@%s", login, c->origin);
    else if (!strcmp(sender_arg, "<>") || !*sender_arg)
        sender = kt_strdup("");
    else {
        size_t l = strlen(sender_arg);
        sender = (sender_arg[0] == '<' && l >= 2 && sender_arg[l - 1] == '>') ? kt_strndup(sender_arg + 1, l - 2)
                                                                             : kt_strdup(sender_arg);
        if (!strchr(sender, '@') && *sender) {
            char *q = kt_asprintf("%s@%s", sender, c->origin);
            kt_free(sender);
            sender = q;
        }
    }
    struct scan_state st = { .rcpts = rcpts, .want_rcpts = c->extract };
    size_t hlen = header_len(body->data ? body->data : "", kt_buf_used(body));
    each_header(body->data ? body->data : "", hlen, scan_header, &st);
    int rc = 0;
    c->too_big = c->input_too_big;
    if (c->too_big) {
        rc = too_big(c, sender);
        goto out;
    }
    if (rcpts->n == 0) {
        fprintf(stderr, "sendmail: no recipients given%s\n", c->extract ? " (none in To:, Cc:, Bcc: either)" : "");
        rc = EX_USAGE;
        goto out;
    }
    if ((rc = envelope_check(sender, rcpts)) != 0)
        goto out;
    /* the message as queued: the headers it lacks after its own (as Postfix's
     * cleanup adds them), Bcc: left out */
    struct kt_buf msg = { 0 }, added = { 0 };
    char date[64], id[KT_QUEUE_ID_MAX] = "";
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
    kt_queue_new_id(id, sizeof(id));
    int direct = !c->milters && can_write_queue(c->qdir);
    if (direct)
        kt_buf_printf(&msg, "Received: by %s (ktrelay, from userid %u)\r\n\tid %s; %s\r\n", c->host,
                      (unsigned)getuid(), id, date);
    if (!st.has_from) {
        if (c->fullname)
            kt_buf_printf(&added, "From: %s <%s>\r\n", c->fullname, sender[0] ? sender : "MAILER-DAEMON");
        else
            kt_buf_printf(&added, "From: %s\r\n", sender[0] ? sender : "MAILER-DAEMON");
    }
    if (!st.has_date)
        kt_buf_printf(&added, "Date: %s\r\n", date);
    if (!st.has_msgid)
        kt_buf_printf(&added, "Message-ID: <%04d%02d%02d%02d%02d%02d.%s@%s>\r\n", tm.tm_year + 1900, tm.tm_mon + 1,
                      tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, id, c->host);
    const char *b = body->data ? body->data : "";
    size_t blen = kt_buf_used(body), pos = 0;
    for (size_t i = 0; i < st.n_bcc; i++) {
        kt_buf_append(&msg, b + pos, st.bcc_start[i] - pos);
        pos = st.bcc_end[i];
    }
    kt_buf_append(&msg, b + pos, hlen - pos);
    kt_buf_append(&msg, added.data ? added.data : "", kt_buf_used(&added));
    /* a body that starts without the empty line gets one after the headers */
    if (hlen < blen && !(b[hlen] == '\r' && hlen + 1 < blen && b[hlen + 1] == '\n'))
        kt_buf_append(&msg, "\r\n", 2);
    else if (hlen == blen)
        kt_buf_append(&msg, "\r\n", 2);
    kt_buf_append(&msg, b + hlen, blen - hlen);
    kt_buf_release(&added);
    c->too_big = c->size_limit > 0 && (long long)kt_buf_used(&msg) > c->size_limit;
    if (c->too_big) {
        rc = too_big(c, sender);
        kt_buf_release(&msg);
        goto out;
    }

    /* -N, -R, -V */
    unsigned *notify = c->notify ? kt_calloc(rcpts->n, sizeof(*notify)) : NULL;
    for (size_t i = 0; notify && i < rcpts->n; i++)
        notify[i] = c->notify;
    struct kt_qprops props = { .ret = c->ret, .envid = c->envid, .notify = notify };
    if (direct) {
        struct kt_rewrite_envelope env;
        const char *failed;
        int w = 0;
        if (!c->rw_built) {
            /* built only when there is something to rewrite: no tables, no work (and no NSS lookups) */
            static const char *const maps[] = { "virtual_alias_maps", "canonical_maps", "sender_canonical_maps",
                                                "recipient_canonical_maps" };
            int any = 0;
            for (size_t i = 0; i < sizeof(maps) / sizeof(maps[0]); i++) {
                const char *v = kt_config_get(c->cfg, NULL, maps[i]);
                any |= v && v[strspn(v, " \t,")] != '\0';
            }
            c->rw_built = 1;
            if (any)
                w = kt_settings_rewriter(c->cfg, &c->resolver, &c->rw);
        }
        if (w < 0) {
            fprintf(stderr, "sendmail: the configuration's address rewriting tables cannot be loaded (ktrelay "
                    "check-config says why); message not queued\n");
            rc = EX_CONFIG;
        } else if ((w = kt_rewrite_envelope(c->rw, id, sender, (const char *const *)rcpts->v, rcpts->n, &env,
                                            &failed)) < 0) {
            /* as Postfix's cleanup: an alias loop or an oversized expansion is not accepted */
            fprintf(stderr, "sendmail: <%s>: unreasonable virtual alias expansion; message not queued\n", failed);
            rc = EX_TEMPFAIL;
        } else {
            /* main.cf's content_filter applies to local submissions too, as to Postfix's pickup; every
             * recipient keeps -N */
            unsigned *rnotify = c->notify ? kt_calloc(env.n ? env.n : 1, sizeof(*rnotify)) : NULL;
            for (size_t i = 0; rnotify && i < env.n; i++)
                rnotify[i] = c->notify;
            struct kt_qprops rprops = props;
            rprops.notify = rnotify;
            rprops.filter = kt_config_get(c->cfg, NULL, "content_filter");
            rprops.orig_rcpt = (const char *const *)env.origs;
            w = kt_queue_write_props(c->qdir, time(NULL), env.sender, (const char *const *)env.rcpts, env.n, &rprops,
                                     msg.data, kt_buf_used(&msg), id, sizeof(id));
            kt_free(rnotify);
            if (w < 0) {
                fprintf(stderr, "sendmail: cannot queue the message in %s: %s\n", c->qdir, strerror(-w));
                rc = w == -EACCES || w == -EPERM ? EX_NOPERM : EX_TEMPFAIL;
            } else {
                kt_pickup_log(id, getuid(), env.sender, msg.data, kt_buf_used(&msg), env.n);
                kt_queue_notify(c->qdir, id);
            }
            kt_rewrite_envelope_free(&env);
        }
    } else {
        int w = drop(c->qdir, sender, rcpts, &props, msg.data, kt_buf_used(&msg));
        if (w == -ENOENT) {
            fprintf(stderr, "sendmail: %s/maildrop does not exist: start the ktrelay daemon once on this "
                    "queue_directory (it creates maildrop/ for local users)\n", c->qdir);
            rc = EX_UNAVAILABLE;
        } else if (w < 0) {
            fprintf(stderr, "sendmail: cannot drop the message into %s/maildrop: %s\n", c->qdir, strerror(-w));
            rc = w == -EACCES || w == -EPERM ? EX_NOPERM : EX_TEMPFAIL;
        } else if (c->verbose) {
            fprintf(stderr, "sendmail: dropped into %s/maildrop for the daemon's pickup\n", c->qdir);
        }
    }
    kt_buf_release(&msg);
    kt_free(notify);
out:
    kt_free(sender);
    return rc;
}

static void smtp_reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void smtp_reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputs("\r\n", stdout);
    fflush(stdout);
}

/* -bs: one command line from IN into line (room limit + 2), its line end (LF, or CRLF) removed. 1 for a
 * line, 0 at the end of the input, -1 for a line longer than limit bytes without its line end (smtpd's
 * line_length_limit): the rest of it is read and dropped, so what is held stays bounded. *len gets the
 * line's length (it may hold NUL bytes). */
static int command_line(FILE *in, char *line, size_t limit, size_t *len)
{
    size_t n = 0;
    int ch, too_long = 0;
    while ((ch = getc_unlocked(in)) != EOF && ch != '\n') {
        if (n < limit + 1)
            line[n++] = (char)ch;   /* one more than the limit: the CR of a CRLF */
        else
            too_long = 1;
    }
    if (ch == EOF && n == 0 && !too_long)
        return 0;
    if (n > 0 && line[n - 1] == '\r')
        n--;
    line[n] = '\0';
    *len = n;
    return too_long || n > limit ? -1 : 1;
}

/* -bs: SMTP on stdin/stdout (RFC 5321 subset: HELO, EHLO, MAIL, RCPT, DATA,
 * RSET, NOOP, QUIT), each message submitted as above. */
static int serve_stdio(struct submit_ctx *c)
{
    size_t limit = kt_settings_line_length_limit(c->cfg, NULL), len;
    long long rcpt_limit = kt_settings_recipient_limit(c->cfg, NULL);
    char *line = kt_malloc(limit + 2), sender[513] = "";
    int in_mail = 0, failed = 0, got;
    struct rcpt_list rcpts = { 0 };
    smtp_reply("220 %s ESMTP ktrelay (sendmail -bs)", c->host);
    while ((got = command_line(stdin, line, limit, &len)) != 0) {
        if (got < 0) {
            smtp_reply("500 5.5.2 Error: line too long");   /* as smtpd */
            continue;
        }
        /* the command as smtpd reads it (smtp_parse.h), with smtpd's replies */
        if (strspn(line, " \t") == len) {
            smtp_reply("500 5.5.2 Error: bad syntax");
            continue;
        }
        struct kt_smtp_command cmd;
        kt_smtp_parse_command(line, len, &cmd);
        if (cmd.verb != KT_VERB_UNKNOWN && cmd.verb != KT_VERB_HELO && cmd.verb != KT_VERB_EHLO
            && kt_smtp_arg_has_ctl(cmd.arg, cmd.arg_len)) {
            smtp_reply("501 5.5.2 Syntax error: control character in command argument");
            continue;
        }
        struct kt_smtp_path path;
        const char *err;
        if (cmd.verb == KT_VERB_HELO || cmd.verb == KT_VERB_EHLO) {
            int ehlo = cmd.verb == KT_VERB_EHLO;
            char size_kw[40] = "SIZE";   /* as smtpd announces it: SIZE alone when there is no limit */
            if (c->size_limit > 0)
                snprintf(size_kw, sizeof(size_kw), "SIZE %lld", c->size_limit);
            if (!cmd.arg_len)
                smtp_reply("501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
            else if (ehlo)
                smtp_reply("250-%s\r\n250-PIPELINING\r\n250-%s\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES", c->host,
                           size_kw);
            else
                smtp_reply("250 %s", c->host);
        } else if (cmd.verb == KT_VERB_MAIL) {
            struct kt_mail_params mp;
            if (in_mail) {
                smtp_reply("503 5.5.1 Error: nested MAIL command");
            } else if ((err = kt_smtp_parse_mail(cmd.arg, cmd.arg_len, &path, &mp)) != NULL) {
                smtp_reply("%s", err);
            } else if (mp.size > 0 && c->size_limit > 0 && mp.size > c->size_limit) {
                smtp_reply("552 5.3.4 Message size exceeds fixed limit");   /* before the data */
            } else {
                snprintf(sender, sizeof(sender), "%s", path.addr);   /* "" for <> */
                rcpt_free(&rcpts);
                memset(&rcpts, 0, sizeof(rcpts));
                in_mail = 1;
                smtp_reply("250 2.1.0 Ok");
            }
        } else if (cmd.verb == KT_VERB_RCPT) {
            struct kt_rcpt_params rp;
            if (!in_mail)
                smtp_reply("503 5.5.1 Error: need MAIL command");
            else if ((err = kt_smtp_parse_rcpt(cmd.arg, cmd.arg_len, &path, &rp)) != NULL)
                smtp_reply("%s", err);
            else if ((long long)rcpts.n >= rcpt_limit)
                smtp_reply("452 4.5.3 Error: too many recipients");
            else {
                rcpt_add(&rcpts, path.addr, path.addr_len);
                smtp_reply("250 2.1.5 Ok");
            }
        } else if (cmd.verb == KT_VERB_DATA) {
            if (!in_mail || !rcpts.n) {
                smtp_reply("503 5.5.1 Error: need RCPT command");
                continue;
            }
            smtp_reply("354 End data with <CR><LF>.<CR><LF>");
            struct kt_buf body = { 0 };
            /* past message_size_limit the rest is read to the "." but not kept: submit() refuses it */
            if (read_message(stdin, &body, DOTS_SMTP, c->size_limit) & READ_EOF) {
                /* the input ended inside the message: nothing is queued and nothing answered, as smtpd does
                 * with a connection lost after DATA */
                kt_info("lost input after DATA (%zu bytes) from local", kt_buf_used(&body));
                kt_buf_release(&body);
                break;
            }
            int save = c->extract;
            c->extract = 0;
            int rc = submit(c, sender[0] ? sender : "<>", &rcpts, &body);
            c->extract = save;
            kt_buf_release(&body);
            if (rc == 0)
                smtp_reply("250 2.0.0 Ok: queued");
            else if (rc == EX_DATAERR)
                smtp_reply("550 5.1.3 Error: bad address syntax");
            else if (rc == EX_UNAVAILABLE && c->too_big)
                smtp_reply("552 5.3.4 Error: message file too big");
            else {
                smtp_reply("451 4.3.0 Error: queue file write error");
                failed = 1;
            }
            in_mail = 0;
        } else if (cmd.verb == KT_VERB_RSET) {
            in_mail = 0;
            smtp_reply("250 2.0.0 Ok");
        } else if (cmd.verb == KT_VERB_NOOP) {   /* RFC 5321 4.1.1.9: any argument */
            smtp_reply("250 2.0.0 Ok");
        } else if (cmd.verb == KT_VERB_QUIT) {
            smtp_reply("221 2.0.0 Bye");
            break;
        } else {
            smtp_reply("502 5.5.2 Error: command not recognized");
        }
    }
    kt_free(line);
    rcpt_free(&rcpts);
    return failed ? EX_TEMPFAIL : EX_OK;
}

/* Logging as the daemon logs (syslog or maillog_file) where this user may;
 * log lines on stderr only with -v, so cron jobs stay quiet. */
static void cli_logging(const struct kt_config *cfg, int verbose)
{
    const char *mf = kt_config_get(cfg, NULL, "maillog_file");
    const char *prefixes = kt_config_get(cfg, NULL, "maillog_file_prefixes");
    int fac = kt_log_facility(kt_config_get(cfg, NULL, "syslog_facility"));
    struct kt_log_config lc = {
        .syslog_name = kt_config_get(cfg, NULL, "syslog_name"),
        .syslog_facility = fac < 0 ? LOG_MAIL : fac,
        .use_syslog = !(mf && *mf),
        .maillog_file = mf && *mf && kt_log_prefix_allowed(mf, prefixes ? prefixes : "") && access(mf, W_OK) == 0
                            ? mf : NULL,
        .hostname = kt_config_get(cfg, NULL, "myhostname"),
        .use_stderr = verbose,
    };
    char err[256];
    if (kt_log_configure(&lc, err, sizeof(err)) < 0 && verbose)
        fprintf(stderr, "sendmail: %s\n", err);
}

int kt_queue_cli_sendmail(int argc, char **argv)
{
    const char *dir = NULL, *sender = NULL, *fullname = NULL, *mode = "m";
    int ignore_dots = 0, extract = 0, verbose = 0, flush = 0, opt;
    unsigned notify = 0;
    enum kt_qret ret = KT_QRET_NONE;
    char envid[304] = "";
    optind = 0;
    /* "+": stop at the first recipient, as sendmail does (an address is never an option) */
    while ((opt = getopt(argc, argv, "+B:C:c:F:f:h:iL:mN:no:q::R:r:tUV:vX:b:")) != -1) {
        switch (opt) {
        case 'C':
        case 'c': dir = optarg; break;
        case 'F': fullname = optarg; break;
        case 'f':
        case 'r': sender = optarg; break;
        case 'i': ignore_dots = 1; break;
        case 'o': if (!strcmp(optarg, "i")) ignore_dots = 1; break;
        case 't': extract = 1; break;
        case 'v': verbose = 1; kt_log_set_debug(1); break;
        case 'q': flush = 1; break;
        case 'b': mode = optarg; break;
        case 'N':
            /* RFC 3461 NOTIFY for every recipient; Postfix's sendmail refuses a bad list */
            if (!(notify = kt_notify_parse(optarg))) {
                fprintf(stderr, "sendmail: bad -N option value \"%s\" (never, or success, delay, failure)\n", optarg);
                return EX_USAGE;
            }
            break;
        case 'R':
            if (!strcasecmp(optarg, "hdrs"))
                ret = KT_QRET_HDRS;
            else if (!strcasecmp(optarg, "full"))
                ret = KT_QRET_FULL;
            else {
                fprintf(stderr, "sendmail: bad -R option value \"%s\" (hdrs or full)\n", optarg);
                return EX_USAGE;
            }
            break;
        case 'V': {
            int ok = *optarg && strlen(optarg) <= 100;
            for (const char *v = optarg; ok && *v; v++)
                ok = (unsigned char)*v >= 0x20 && (unsigned char)*v <= 0x7e;
            if (!ok) {
                fprintf(stderr, "sendmail: -V needs an envelope id of printable ASCII, at most 100 characters\n");
                return EX_USAGE;
            }
            kt_xtext_encode(optarg, envid, sizeof(envid));
            break;
        }
        case 'B': case 'h': case 'L': case 'm': case 'n': case 'U': case 'X':
            break;   /* accepted and ignored, as Postfix's sendmail ignores most of these */
        default:
            fprintf(stderr, "usage: sendmail [-t] [-i] [-f sender] [-F name] [-C dir] [-bm|-bp|-bs|-bi] [-q] "
                    "[recipient ...]\n");
            return EX_USAGE;
        }
    }
    if (!strcmp(mode, "i")) {
        printf("newaliases: ktrelay reads alias_maps from their text files; nothing to rebuild. A running\n"
               "server loads changes on reload (systemctl reload ktrelay, or SIGHUP).\n");
        return EX_OK;
    }
    if (!strcmp(mode, "p") || flush) {
        char *qargv[5];
        int qn = 0;
        qargv[qn++] = (char *)"queue";
        if (dir) {
            qargv[qn++] = (char *)"-c";
            qargv[qn++] = (char *)dir;
        }
        qargv[qn++] = (char *)(flush ? "flush" : "list");
        qargv[qn] = NULL;
        return kt_queue_cli_queue(qn, qargv);
    }
    if (strcmp(mode, "m") && strcmp(mode, "s")) {
        fprintf(stderr, "sendmail: -b%s is not supported (ktrelay's sendmail: -bm, -bp, -bs, -bi)\n", mode);
        return EX_USAGE;
    }
    const char *cdir = kt_cli_config_dir_existing(dir, "sendmail");
    struct kt_config *cfg;
    if (!cdir || kt_config_load(cdir, &cfg) < 0)
        return EX_CONFIG;
    if (kt_cli_as_queue_owner(cfg, "sendmail") < 0) {
        kt_config_free(cfg);
        return EX_NOPERM;
    }
    cli_logging(cfg, verbose);
    struct submit_ctx c = {
        .cfg = cfg,
        .qdir = kt_config_get(cfg, NULL, "queue_directory"),
        .host = kt_config_get(cfg, NULL, "myhostname"),
        .origin = origin_of(cfg),
        .fullname = fullname,
        .extract = extract,
        .verbose = verbose,
        .notify = notify,
        .ret = ret,
        .envid = envid[0] ? envid : NULL,
        .size_limit = kt_config_get_int(cfg, NULL, "message_size_limit"),
    };
    const char *nsm = kt_config_get(cfg, NULL, "non_smtpd_milters");
    c.milters = nsm && nsm[strspn(nsm, " \t\r\n,")] != '\0';
    int rc;
    if (!strcmp(mode, "s")) {
        c.smtp_mode = 1;
        rc = serve_stdio(&c);
    } else if (optind >= argc && !extract) {
        fprintf(stderr, "sendmail: no recipients given (name them, or use -t)\n");
        rc = EX_USAGE;
    } else {
        struct rcpt_list rcpts = { 0 };
        for (int i = optind; i < argc; i++)
            parse_address_list(&rcpts, argv[i], strlen(argv[i]));
        struct kt_buf body = { 0 };
        c.input_too_big = read_message(stdin, &body, ignore_dots ? DOTS_IGNORE : DOTS_SENDMAIL, c.size_limit) & READ_OVER;
        rc = submit(&c, sender, &rcpts, &body);
        kt_buf_release(&body);
        rcpt_free(&rcpts);
    }
    kt_free(c.origin);
    kt_rewrite_free(c.rw);
    kt_resolver_free(c.resolver);
    kt_config_free(cfg);
    return rc;
}
