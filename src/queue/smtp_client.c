/* Outbound SMTP client (see smtp_client.h).
 *
 * The bytes move through the connection layer (tls/conn.h), the same one the
 * SMTP server sessions use: connect, plaintext, userspace TLS, kernel TLS and
 * sendfile all live there. This file is the client protocol only. One "pump"
 * loop flushes what is queued for output, sends the body, then reads and
 * dispatches the replies it still expects; reply handlers only queue more
 * output and change state, and connection events only record what happened
 * and call the pump, which does not recurse. Reading a queue file block is a
 * plain pread: the file is local and mostly in the page cache.
 *
 * A client is freed only when none of its connections (one per address
 * tried) is still open: each reports KT_CONN_EV_CLOSED once nothing refers
 * to it any more. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "metrics/metrics.h"
#include "core/log.h"
#include "queue/queue.h"
#include "queue/smtp_client.h"
#include "queue/mime_downgrade.h"
#include "tls/conn.h"
#include "tls/dane.h"
#include "tls/tls.h"

#define MAX_REPLY 8192
#define BODY_BLOCK (32 * 1024)
#define REPLY_READ 16384

enum state {
    ST_CONNECT, ST_GREETING, ST_EHLO, ST_HELO, ST_STARTTLS, ST_HANDSHAKE, ST_EHLO2, ST_AUTH, ST_AUTH_ABORT, ST_IDLE,
    ST_MAIL, ST_DATA, ST_BODY, ST_DOT, ST_RSET, ST_QUIT, ST_DONE,
};

struct kt_smtp_conn {
    struct kt_loop *loop;
    struct kt_smtp_params p;
    char *sni;                     /* own copy behind p.sni */
    char *sasl_username, *sasl_password, *loop_myhostname, *nexthop;   /* own copies, as above */
    int plain_retry;               /* the may handshake failed: this connection goes on without TLS */
    int quit_after_fail;           /* our own refusal at a clean point of the dialogue: close says QUIT */
    char dsn[16];                  /* enhanced status code of our own session failure, "" if none */
    char *nexthop_domain, *match, *fp_digest, *cipherlist;   /* own copies behind p's strings */
    struct kt_dane_set *dane;      /* own copy behind p.dane */
    int level;                     /* the current address's level: the policy's, or DANE's verdict */
    const struct kt_dane_host *dane_host;   /* the current address's TLSA records (level dane) */
    int match_names;               /* verify/secure: names asked of the certificate */
    char skipped[1024];            /* why the last address not tried was skipped (dane-only, TLSA errors) */
    struct kt_smtp_addr *addrs;
    size_t n_addrs, cur_addr;
    struct kt_conn *conn;          /* the current address's connection */
    unsigned conns_open;           /* connections not yet reported closed */
    int sending;                   /* output flushed, KT_CONN_EV_SENT not yet seen */
    int sendfile_busy;             /* body handed to kt_conn_sendfile */
    enum state state;
    int in_pump, closing, failed, freed;
    time_t deadline;
    char relay[320];
    char peer_ip[INET6_ADDRSTRLEN];

    struct kt_buf in, out;
    size_t expect;                 /* replies still to read */
    struct kt_buf reply;           /* lines of the reply being read, '\n' separated */

    /* TLS reporting: the outcome at the current server */
    int tls_known;
    const char *tls_result;        /* RFC 8460 result type, NULL for a success */
    char local_ip[INET6_ADDRSTRLEN];   /* our address on the connection ("" unknown) */

    /* EHLO extensions */
    int ext_starttls, ext_pipelining, ext_chunking, ext_size;
    unsigned ext;                  /* KT_SMTP_EXT_* */
    unsigned ext_auth;             /* KT_SMTP_MECH_* the server offers in its AUTH line */
    int ehlo_loop;                 /* the EHLO reply named this host (loop detection) */
    unsigned auth_mech;            /* the mechanism in use */
    int auth_step;                 /* LOGIN: 0 user name next, 1 password next, 2 done */
    char auth_why[640];            /* ST_AUTH_ABORT: the failure reported once "*" is answered */

    kt_smtp_cb cb;
    void *arg;

    /* transaction */
    struct kt_smtp_msg *m;
    size_t reply_idx;              /* replies seen in this transaction */
    int pipelined_data;            /* DATA went out with MAIL and RCPT */
    int mail_code;
    char *mail_text;
    size_t accepted;
    size_t dot_next;               /* LMTP: recipient index the next end-of-data reply is for */
    int use_chunking, use_sendfile, sendfile_counted, body_crlf;
    off_t body_pos, body_end;
    int line_start;                /* DATA in userspace: at the start of a line */
    int cr_pending;                /* DATA in userspace: a CR waits for the next byte */
    struct kt_buf conv;            /* the body converted to 7BIT (len 0: the queue file's bytes go) */
};

static unsigned long sendfile_count;
static long live_count;

static void pump(struct kt_smtp_conn *c);

long kt_smtp_live(void)
{
    return __atomic_load_n(&live_count, __ATOMIC_RELAXED);
}

unsigned long kt_smtp_sendfile_count(void)
{
    return __atomic_load_n(&sendfile_count, __ATOMIC_RELAXED);
}

int kt_smtp_tls_level_parse(const char *s)
{
    return kt_tls_level_parse(s);
}

const char *kt_smtp_dsn(const struct kt_smtp_conn *c)
{
    return c && c->dsn[0] ? c->dsn : NULL;
}

const char *kt_smtp_relay(const struct kt_smtp_conn *c)
{
    return c && c->relay[0] ? c->relay : "none";
}

int kt_smtp_usable(const struct kt_smtp_conn *c)
{
    return c && !c->failed && !c->freed && !c->closing && c->state == ST_IDLE;
}

unsigned kt_smtp_extensions(const struct kt_smtp_conn *c)
{
    return c ? c->ext : 0;
}

int kt_smtp_tls_state(const struct kt_smtp_conn *c)
{
    if (!c || !c->conn || !kt_conn_ssl(c->conn))
        return 0;
    return kt_conn_ktls(c->conn) & KT_CONN_KTLS_TX ? 2 : 1;
}

static time_t now_s(void)
{
    return time(NULL);
}

static void set_deadline(struct kt_smtp_conn *c, long long secs)
{
    c->deadline = now_s() + (time_t)(secs > 0 ? secs : 300);
}

static void conn_free_if_idle(struct kt_smtp_conn *c)
{
    if (!c->freed || c->conns_open || c->in_pump)
        return;
    kt_buf_release(&c->in);
    kt_buf_release(&c->out);
    kt_buf_release(&c->reply);
    kt_buf_release(&c->conv);
    kt_free(c->mail_text);
    kt_free(c->addrs);
    kt_free(c->sni);
    if (c->sasl_password)
        explicit_bzero(c->sasl_password, strlen(c->sasl_password));
    kt_free(c->sasl_password);
    kt_free(c->sasl_username);
    kt_free(c->loop_myhostname);
    kt_free(c->nexthop);
    kt_free(c->nexthop_domain);
    kt_free(c->match);
    kt_free(c->fp_digest);
    kt_free(c->cipherlist);
    kt_dane_set_free(c->dane);
    kt_free(c);
    __atomic_sub_fetch(&live_count, 1, __ATOMIC_RELAXED);
    kt_metric_add(KT_M_CONN_SMTP, -1);
}

/* Stop all I/O; the object goes once its connection reported itself closed. */
static void conn_teardown(struct kt_smtp_conn *c)
{
    if (c->freed)
        return;
    c->freed = 1;
    c->cb = NULL;
    kt_conn_close(c->conn);
    c->conn = NULL;       /* it reports CLOSED, and nothing else, from the loop */
    conn_free_if_idle(c);
}

static void report(struct kt_smtp_conn *c, int res, const char *reason)
{
    kt_smtp_cb cb = c->cb;
    c->cb = NULL;
    if (cb)
        cb(c->arg, res, reason);
}

static void conn_fail(struct kt_smtp_conn *c, int res, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A failure with its own enhanced status code (TLS policy: 4.7.4, 4.7.5). */
#define conn_fail_dsn(c, dsn_, res, ...) \
    do { \
        snprintf((c)->dsn, sizeof((c)->dsn), "%s", (dsn_)); \
        conn_fail((c), (res), __VA_ARGS__); \
    } while (0)

/* The connection is unusable: tell the owner (who will close it). */
static void conn_fail(struct kt_smtp_conn *c, int res, const char *fmt, ...)
{
    char reason[1024];
    va_list ap;
    if (c->failed)
        return;
    c->failed = 1;
    c->state = ST_DONE;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    if (c->closing) {
        conn_teardown(c);
        return;
    }
    report(c, res, reason);
}

/* ---- connect ---- */

static void on_conn_event(void *arg, enum kt_conn_event ev, int res);

/* The TLS level for address a: the policy's, or for dane and dane-only what the host's TLSA records
 * allow (tls/dane.h, Postfix's fallbacks). -1 when the address must not be used (dane-only without
 * DANE, a TLSA lookup error), with the reason in c->skipped. */
static int address_level(struct kt_smtp_conn *c, const struct kt_smtp_addr *a, int port)
{
    int dane_only = c->p.tls_level == KT_SMTP_TLS_DANE_ONLY;
    c->dane_host = NULL;
    c->level = c->p.tls_level;
    if (c->p.tls_level != KT_SMTP_TLS_DANE && !dane_only)
        return 0;
    const struct kt_dane_host *h = c->dane ? kt_dane_set_find(c->dane, a->host) : NULL;
    enum kt_dane_state st = h && a->dnssec ? h->state : KT_DANE_INSECURE;
    switch (st) {
    case KT_DANE_USABLE:
        c->dane_host = h;
        return 0;
    case KT_DANE_ERROR:
        snprintf(c->skipped, sizeof(c->skipped), "TLSA lookup error for %s:%d", a->host, port);
        kt_info_as("smtp", "warning: %s", c->skipped);
        return -1;
    case KT_DANE_UNUSABLE:
        if (!dane_only) {
            c->level = KT_SMTP_TLS_ENCRYPT;
            return 0;
        }
        break;
    case KT_DANE_INSECURE:
    case KT_DANE_NO_TLSA:
        if (!dane_only) {
            c->level = KT_SMTP_TLS_MAY;
            return 0;
        }
        break;
    }
    snprintf(c->skipped, sizeof(c->skipped), "client TLS configuration problem");
    kt_info_as("smtp", "warning: TLS policy lookup for %s/%s: %s", c->p.nexthop_domain, a->host,
               kt_dane_state_str(st));
    return -1;
}

/* TLS is mandatory for the current address: its level says so, or it has usable TLSA records (RFC 7672
 * 2.2: a server with usable TLSA records must not be sent mail in plaintext). */
static int tls_required(const struct kt_smtp_conn *c)
{
    return kt_tls_level_mandatory(c->level) || c->dane_host != NULL;
}

static void connect_next(struct kt_smtp_conn *c)
{
    if (c->conn) {
        kt_conn_close(c->conn);
        c->conn = NULL;
    }
    while (c->cur_addr < c->n_addrs) {
        const struct kt_smtp_addr *a = &c->addrs[c->cur_addr];
        int port = 0;
        if (a->ss.ss_family == AF_UNIX) {
            snprintf(c->peer_ip, sizeof(c->peer_ip), "unix");
            snprintf(c->relay, sizeof(c->relay), "%s", a->host);
        } else if (a->ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->ss)->sin_addr, c->peer_ip, sizeof(c->peer_ip));
            port = ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
        } else {
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->ss)->sin6_addr, c->peer_ip, sizeof(c->peer_ip));
            port = ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port);
        }
        if (a->ss.ss_family != AF_UNIX)
            snprintf(c->relay, sizeof(c->relay), "%s[%s]:%d", a->host, c->peer_ip, port);
        if (address_level(c, a, port) < 0) {
            c->cur_addr++;
            continue;
        }
        int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            c->cur_addr++;
            continue;
        }
        const struct sockaddr *src = a->ss.ss_family == AF_INET ? c->p.bind_addr4
                                     : a->ss.ss_family == AF_INET6 ? c->p.bind_addr6 : NULL;
        if (src) {
            /* the port is chosen at connect, per destination, so many connections share the address */
            int one = 1;
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
            if (bind(fd, src, a->ss.ss_family == AF_INET ? c->p.bind_len4 : c->p.bind_len6) < 0) {
                int err = -errno;
                char text[INET6_ADDRSTRLEN] = "?";
                inet_ntop(src->sa_family, src->sa_family == AF_INET
                          ? (const void *)&((const struct sockaddr_in *)src)->sin_addr
                          : (const void *)&((const struct sockaddr_in6 *)src)->sin6_addr, text, sizeof(text));
                const char *param = src->sa_family == AF_INET ? "smtp_bind_address" : "smtp_bind_address6";
                if (c->p.bind_enforce) {
                    close(fd);
                    conn_fail(c, err, "bind %s (%s): %s", text, param, strerror(-err));
                    return;
                }
                /* Postfix's smtp_bind_address_enforce = no (its default): said, and connected unbound */
                kt_warn("%s: bind %s (%s): %s; connecting from the kernel's choice of address (set "
                        "smtp_bind_address_enforce = yes to defer instead)", c->relay, text, param, strerror(-err));
            }
        }
        c->state = ST_CONNECT;
        c->tls_known = 0;
        c->tls_result = NULL;
        if (c->p.connect_timeout_s > 0)
            set_deadline(c, c->p.connect_timeout_s);
        else
            c->deadline = 0;      /* lmtp_connect_timeout = 0: the kernel's own limit */
        c->conn = kt_conn_new(c->loop, fd, KT_CONN_CLIENT, c->relay, &c->in, &c->out, on_conn_event, c);
        c->conns_open++;
        kt_conn_connect(c->conn, (const struct sockaddr *)&a->ss, a->len);
        return;
    }
    if (c->skipped[0]) {
        conn_fail_dsn(c, "4.7.5", -EACCES, "%s", c->skipped);
        return;
    }
    conn_fail(c, -EHOSTUNREACH, "no usable address for the next hop");
}

static void connected(struct kt_smtp_conn *c, int res)
{
    if (res < 0) {
        char why[512];
        snprintf(why, sizeof(why), "connect to %s: %s", c->relay, strerror(-res));
        if (++c->cur_addr < c->n_addrs) {
            kt_info_as("smtp", "%s", why);
            c->plain_retry = 0;    /* the next server gets its own TLS attempt */
            connect_next(c);
            return;
        }
        conn_fail(c, res, "%s", why);
        return;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    c->local_ip[0] = '\0';
    if (getsockname(kt_conn_fd(c->conn), (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, c->local_ip, sizeof(c->local_ip));
        else if (ss.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, c->local_ip, sizeof(c->local_ip));
    }
    c->state = ST_GREETING;
    c->expect = 1;
    set_deadline(c, c->p.command_timeout_s);
    pump(c);
}

struct kt_smtp_conn *kt_smtp_connect(struct kt_loop *loop, const struct kt_smtp_params *p,
                                     const struct kt_smtp_addr *addrs, size_t n, kt_smtp_cb cb, void *arg)
{
    struct kt_smtp_conn *c = kt_calloc(1, sizeof(*c));
    __atomic_add_fetch(&live_count, 1, __ATOMIC_RELAXED);
    kt_metric_inc(KT_M_CONN_SMTP);
    c->loop = loop;
    c->p = *p;
    /* the caller's strings may not outlive this call */
    c->sni = p->sni ? kt_strdup(p->sni) : NULL;
    c->nexthop_domain = kt_strdup(p->nexthop_domain ? p->nexthop_domain : "");
    c->match = kt_strdup(p->match ? p->match : "");
    c->fp_digest = kt_strdup(p->fingerprint_digest && *p->fingerprint_digest ? p->fingerprint_digest : "sha256");
    c->cipherlist = p->cipherlist ? kt_strdup(p->cipherlist) : NULL;
    c->dane = kt_dane_set_copy(p->dane);
    c->p.sni = c->sni;
    c->sasl_username = p->sasl_username ? kt_strdup(p->sasl_username) : NULL;
    c->sasl_password = p->sasl_password ? kt_strdup(p->sasl_password) : NULL;
    c->loop_myhostname = p->loop_myhostname ? kt_strdup(p->loop_myhostname) : NULL;
    c->nexthop = p->nexthop ? kt_strdup(p->nexthop) : NULL;
    c->p.sasl_username = c->sasl_username;
    c->p.sasl_password = c->sasl_password;
    c->p.loop_myhostname = c->loop_myhostname;
    c->p.nexthop = c->nexthop;
    c->p.nexthop_domain = c->nexthop_domain;
    c->p.match = c->match;
    c->p.fingerprint_digest = c->fp_digest;
    c->p.cipherlist = c->cipherlist;
    c->p.dane = c->dane;
    c->addrs = kt_calloc(n ? n : 1, sizeof(*addrs));
    memcpy(c->addrs, addrs, n * sizeof(*addrs));
    c->n_addrs = n;
    c->cb = cb;
    c->arg = arg;
    connect_next(c);
    return c;
}

/* One complete reply from c->in into c->reply: returns the code, 0 if more
 * bytes are needed, -1 on a malformed reply. */
static int parse_reply(struct kt_smtp_conn *c)
{
    for (;;) {
        size_t used = kt_buf_used(&c->in);
        if (used == 0)
            return 0;      /* nothing buffered yet (the buffer may not even exist) */
        char *head = kt_buf_head(&c->in);
        char *nl = memchr(head, '\n', used);
        if (!nl)
            return used > MAX_REPLY ? -1 : 0;
        size_t len = (size_t)(nl - head);
        if (len > 0 && head[len - 1] == '\r')
            len--;
        if (len < 3 || head[0] < '2' || head[0] > '5' || head[1] < '0' || head[1] > '9' || head[2] < '0' ||
            head[2] > '9' || (len > 3 && head[3] != ' ' && head[3] != '-') || kt_buf_used(&c->reply) > MAX_REPLY)
            return -1;
        int last = len == 3 || head[3] == ' ';
        if (kt_buf_used(&c->reply))
            kt_buf_append(&c->reply, "\n", 1);
        kt_buf_append(&c->reply, head, len);
        kt_buf_consume(&c->in, (size_t)(nl - head) + 1);
        if (last) {
            kt_buf_append(&c->reply, "", 1);
            c->reply.len--;   /* NUL-terminated, not counted */
            return (head[0] - '0') * 100 + (head[1] - '0') * 10 + (head[2] - '0');
        }
    }
}

/* The reply on one line, as Postfix logs it. */
static char *reply_text(struct kt_smtp_conn *c, const char *cmd)
{
    char *t = kt_strndup(kt_buf_head(&c->reply), kt_buf_used(&c->reply));
    for (char *p = t; *p; p++)
        if (*p == '\n')
            *p = ' ';
    char *r = kt_asprintf("host %s said: %s (in reply to %s command)", c->relay, t, cmd);
    kt_free(t);
    return r;
}

/* ---- protocol ---- */

static void send_ehlo(struct kt_smtp_conn *c, enum state st)
{
    c->ext_starttls = c->ext_pipelining = c->ext_chunking = c->ext_size = 0;
    c->ext = 0;
    c->ext_auth = 0;
    c->ehlo_loop = 0;
    kt_buf_printf(&c->out, "%s %s\r\n", c->p.lmtp ? "LHLO" : "EHLO", c->p.helo_name);
    c->state = st;
    c->expect = 1;
}

static void parse_ehlo(struct kt_smtp_conn *c)
{
    char *save = NULL;
    char *text = kt_strndup(kt_buf_head(&c->reply), kt_buf_used(&c->reply));
    int first = 1;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        const char *kw = strlen(line) > 4 ? line + 4 : "";
        if (first) {
            /* the server's name: with loop detection, our own name means the mail would come back */
            size_t n = strcspn(kw, " \t");
            first = 0;
            if (c->p.loop_myhostname && n == strlen(c->p.loop_myhostname) && n > 0 &&
                !strncasecmp(kw, c->p.loop_myhostname, n))
                c->ehlo_loop = 1;
            continue;
        }
        if (!strncasecmp(kw, "AUTH", 4) && (kw[4] == ' ' || kw[4] == '=')) {
            /* "AUTH PLAIN LOGIN ..." (RFC 4954), or the "AUTH=" of old drafts */
            for (const char *m = kw + 5; *m;) {
                size_t n = strcspn(m, " \t");
                unsigned bit = (n == 5 && !strncasecmp(m, "PLAIN", 5))   ? KT_SMTP_MECH_PLAIN
                               : (n == 5 && !strncasecmp(m, "LOGIN", 5)) ? KT_SMTP_MECH_LOGIN
                                                                         : 0;
                c->ext_auth |= bit;
                m += n;
                m += strspn(m, " \t");
            }
        } else if (!strncasecmp(kw, "STARTTLS", 8))
            c->ext_starttls = 1;
        else if (!strncasecmp(kw, "PIPELINING", 10))
            c->ext_pipelining = 1;
        else if (!strncasecmp(kw, "CHUNKING", 8))
            c->ext_chunking = 1;
        else if (!strncasecmp(kw, "SIZE", 4))
            c->ext_size = 1;
        else if (!strcasecmp(kw, "8BITMIME"))
            c->ext |= KT_SMTP_EXT_8BITMIME;
        else if (!strcasecmp(kw, "SMTPUTF8"))
            c->ext |= KT_SMTP_EXT_SMTPUTF8;
        else if (!strcasecmp(kw, "DSN"))
            c->ext |= KT_SMTP_EXT_DSN;
        else if (!strcasecmp(kw, "BINARYMIME"))
            c->ext |= KT_SMTP_EXT_BINARYMIME;
    }
    kt_free(text);
}

static void session_ready(struct kt_smtp_conn *c)
{
    c->state = ST_IDLE;
    c->expect = 0;
    c->deadline = 0;
    report(c, 0, NULL);
}

/* Names the certificate must match at verify and secure: the policy's match list with Postfix's words
 * "hostname" (the host connected to), "nexthop" and "dot-nexthop" replaced. An address literal (a
 * [192.0.2.1] next hop) names no DNS name a certificate could hold and is left out; with no name left,
 * nothing verifies (c->match_names stays 0). 0 or -EINVAL. */
static int set_match_names(struct kt_smtp_conn *c, SSL *ssl)
{
    const char *host = c->addrs[c->cur_addr].host;
    int first = 1;
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    for (const char *s = c->p.match; *s;) {
        size_t n = strcspn(s, ":");
        char name[300];
        if (n == 8 && !strncasecmp(s, "hostname", 8))
            snprintf(name, sizeof(name), "%s", host);
        else if (n == 7 && !strncasecmp(s, "nexthop", 7))
            snprintf(name, sizeof(name), "%s", c->p.nexthop_domain);
        else if (n == 11 && !strncasecmp(s, "dot-nexthop", 11))
            snprintf(name, sizeof(name), ".%s", c->p.nexthop_domain);
        else
            snprintf(name, sizeof(name), "%.*s", (int)(n < 299 ? n : 299), s);
        unsigned char ip[16];
        const char *bare = name[0] == '.' ? name + 1 : name;
        int literal = inet_pton(AF_INET, bare, ip) == 1 || inet_pton(AF_INET6, bare, ip) == 1;
        if (name[0] && strcmp(name, ".") && !literal) {
            if (!(first ? SSL_set1_host(ssl, name) : SSL_add1_host(ssl, name)))
                return -EINVAL;
            first = 0;
            c->match_names++;
        }
        s += n;
        if (*s == ':')
            s++;
    }
    return 0;
}

static void start_tls(struct kt_smtp_conn *c)
{
    SSL *ssl = kt_conn_tls_new(c->conn, c->p.ssl_ctx, 0, NULL);
    if (!ssl) {
        conn_fail(c, -ENOMEM, "cannot create a TLS session for %s", c->relay);
        return;
    }
    /* nothing the server sent before the handshake may count as protected */
    kt_buf_reset(&c->in);
    /* the policy's protocols and ciphers (policy table attributes, or the level's main.cf values) */
    if (c->p.min_version)
        SSL_set_min_proto_version(ssl, c->p.min_version);
    if (c->p.max_version)
        SSL_set_max_proto_version(ssl, c->p.max_version);
    if (c->p.no_mask)
        SSL_set_options(ssl, (uint64_t)c->p.no_mask);
    if (c->p.cipherlist && !SSL_set_cipher_list(ssl, c->p.cipherlist)) {
        conn_fail(c, -EINVAL, "TLS policy for %s: no usable cipher in \"%s\"", c->relay, c->p.cipherlist);
        return;
    }
    const char *mx = c->addrs[c->cur_addr].host;
    if (c->p.verify_mx_name) {
        SSL_set_tlsext_host_name(ssl, mx);        /* MTA-STS: SNI is the MX host name */
    } else if (c->p.sni && *c->p.sni) {
        const char *sni = !strcmp(c->p.sni, "hostname") ? mx : !strcmp(c->p.sni, "nexthop") ? c->p.nexthop_domain : c->p.sni;
        SSL_set_tlsext_host_name(ssl, sni);
    }
    c->match_names = 0;
    if (c->dane_host) {
        if (kt_dane_arm(ssl, c->dane_host, c->p.nexthop_domain) < 0) {
            conn_fail_dsn(c, "4.7.5", -EINVAL, "TLSA records of %s could not be used", c->relay);
            return;
        }
    } else if (c->p.verify_mx_name) {
        /* MTA-STS: the certificate must name the MX host (verified at secure, recorded below it) */
        if (c->level == KT_SMTP_TLS_VERIFY || c->level == KT_SMTP_TLS_SECURE)
            SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
        SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (SSL_set1_host(ssl, mx))
            c->match_names = 1;
    } else if (c->level == KT_SMTP_TLS_VERIFY || c->level == KT_SMTP_TLS_SECURE) {
        SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
        if (set_match_names(c, ssl) < 0) {
            conn_fail(c, -EINVAL, "TLS policy for %s: bad match names \"%s\"", c->relay, c->p.match);
            return;
        }
    }
    c->state = ST_HANDSHAKE;
    set_deadline(c, c->p.command_timeout_s);
    kt_conn_start_tls(c->conn);
}

/* RFC 8460 4.3 result type of a certificate verification error */
static const char *verify_result_type(long vr)
{
    switch (vr) {
    case X509_V_ERR_HOSTNAME_MISMATCH:
        return "certificate-host-mismatch";
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "certificate-expired";
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_CERT_UNTRUSTED:
        return "certificate-not-trusted";
    default:
        return "validation-failure";
    }
}

int kt_smtp_tls_report(const struct kt_smtp_conn *c, const char **result, const char **mx, const char **ip,
                       const char **local_ip)
{
    *result = c->tls_result;
    *mx = c->cur_addr < c->n_addrs ? c->addrs[c->cur_addr].host : NULL;
    *ip = c->peer_ip[0] ? c->peer_ip : NULL;
    *local_ip = c->local_ip[0] ? c->local_ip : NULL;
    return c->tls_known;
}

/* fingerprint level: the certificate's or its public key's digest is one of the match list ('|'). */
static int fingerprint_matches(struct kt_smtp_conn *c, SSL *ssl)
{
    char fp[KT_TLS_FP_MAX], pkey_fp[KT_TLS_FP_MAX];
    if (kt_tls_peer_cert(ssl, c->p.fingerprint_digest, fp, pkey_fp) == KT_CCERT_NONE || !fp[0])
        return 0;
    for (const char *s = c->p.match; *s;) {
        size_t n = strcspn(s, "|");
        if ((n == strlen(fp) && !strncasecmp(s, fp, n)) || (n == strlen(pkey_fp) && !strncasecmp(s, pkey_fp, n)))
            return 1;
        s += n;
        if (*s == '|')
            s++;
    }
    return 0;
}

static void tls_ready(struct kt_smtp_conn *c)
{
    SSL *ssl = kt_conn_ssl(c->conn);
    int ktls_tx = (kt_conn_ktls(c->conn) & KT_CONN_KTLS_TX) != 0;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    int peer = cert != NULL;
    int chain_ok = peer && SSL_get_verify_result(ssl) == X509_V_OK;
    int verified = 0;
    X509_free(cert);
    if (c->dane_host)
        verified = chain_ok && SSL_get0_dane_authority(ssl, NULL, NULL) >= 0;
    else if (c->level == KT_SMTP_TLS_FINGERPRINT)
        verified = peer && fingerprint_matches(c, ssl);
    else if (c->level == KT_SMTP_TLS_VERIFY || c->level == KT_SMTP_TLS_SECURE)
        verified = chain_ok && c->match_names > 0;
    /* DANE through an MX answer that was not validated: authenticated, but the name may be forged */
    int insecure_mx = c->dane_host && !c->addrs[c->cur_addr].mx_dnssec;
    const char *trust = !peer                    ? "Anonymous"
                        : verified && !insecure_mx ? "Verified"
                        : chain_ok                 ? "Trusted"
                                                   : "Untrusted";
    long vr = SSL_get_verify_result(ssl);
    c->tls_known = 1;
    c->tls_result = c->p.verify_mx_name && vr != X509_V_OK ? verify_result_type(vr) : NULL;
    if (c->p.tls_loglevel >= 1 || (kt_tls_level_authenticates(c->level) && !verified))
        kt_info_as("smtp", "%s TLS connection established to %s: %s ktls=%s", trust, c->relay,
                   kt_conn_tls_desc(c->conn), ktls_tx ? "tx" : "none");
    if (kt_tls_level_authenticates(c->level) && !verified) {
        kt_info_as("smtp", "server certificate verification failed for %s: %s", c->relay,
                   c->level == KT_SMTP_TLS_FINGERPRINT ? "fingerprint mismatch"
                   : c->match_names == 0 && !c->dane_host ? "no certificate name to match (only address literals)"
                                                          : "not verified");
        conn_fail_dsn(c, "4.7.5", -EACCES, "Server certificate not verified");
        return;
    }
    send_ehlo(c, ST_EHLO2);
}

static void tls_failed(struct kt_smtp_conn *c)
{
    long vr = SSL_get_verify_result(kt_conn_ssl(c->conn));
    c->tls_known = 1;
    c->tls_result = vr != X509_V_OK ? verify_result_type(vr) : "validation-failure";
    if (vr != X509_V_OK && (c->dane_host || c->level == KT_SMTP_TLS_VERIFY || c->level == KT_SMTP_TLS_SECURE)) {
        kt_info_as("smtp", "server certificate verification failed for %s: num=%ld:%s", c->relay, vr,
                   X509_verify_cert_error_string(vr));
        conn_fail_dsn(c, "4.7.5", -EACCES, "Server certificate not verified");
        return;
    }
    if (c->level == KT_SMTP_TLS_MAY && !c->plain_retry && !c->closing) {
        /* Postfix at level may: TLS is opportunistic, so the same server is tried again at once, on a
         * new connection, in plaintext (the conversation on this one is in an unknown state) */
        kt_info_as("smtp", "TLS handshake with %s failed: %s; TLS is not required, retrying in plaintext",
                   c->relay, kt_conn_why(c->conn));
        c->plain_retry = 1;
        c->sending = 0;
        kt_buf_reset(&c->in);
        kt_buf_reset(&c->out);
        kt_buf_reset(&c->reply);
        c->expect = 0;
        /* the failed handshake stays this server's TLS outcome (TLS reporting) */
        int known = c->tls_known;
        const char *result = c->tls_result;
        connect_next(c);
        c->tls_known = known;
        c->tls_result = result;
        return;
    }
    conn_fail(c, -EIO, "TLS handshake with %s failed: %s", c->relay, kt_conn_why(c->conn));
}

/* "host[addr]", the server as Postfix names it in SASL and loop messages */
static const char *namaddr(const struct kt_smtp_conn *c, char *buf, size_t len)
{
    snprintf(buf, len, "%s[%s]", c->addrs[c->cur_addr].host, c->peer_ip);
    return buf;
}

static void send_auth_line(struct kt_smtp_conn *c, const char *prefix, const void *data, size_t len)
{
    char *b64 = kt_malloc(4 * ((len + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)b64, data, (int)len);
    kt_buf_printf(&c->out, "%s%s\r\n", prefix, b64);
    explicit_bzero(b64, strlen(b64));
    kt_free(b64);
    c->expect = 1;
}

/* AUTH after the last EHLO (RFC 4954), with the best mechanism that the server offers and the
 * security options for this connection allow: PLAIN (with its initial response), else LOGIN. */
static void start_auth(struct kt_smtp_conn *c)
{
    char na[320];
    int tls = kt_conn_ssl(c->conn) != NULL;
    unsigned usable = c->ext_auth & (tls ? c->p.sasl_tls_mechs : c->p.sasl_mechs);
    if (!usable) {
        /* Postfix: no usable mechanism is a temporary failure, never a password sent in the clear */
        snprintf(c->dsn, sizeof(c->dsn), "4.7.0");
        c->quit_after_fail = 1;
        conn_fail(c, 450, "SASL authentication failed; cannot authenticate to server %s: no mechanism available%s",
                  namaddr(c, na, sizeof(na)),
                  !tls && (c->ext_auth & c->p.sasl_tls_mechs) ? " without TLS (smtp_sasl_security_options)" : "");
        return;
    }
    c->state = ST_AUTH;
    c->auth_step = 0;
    if (usable & KT_SMTP_MECH_PLAIN) {
        size_t ul = strlen(c->p.sasl_username), pl = strlen(c->p.sasl_password);
        char *msg = kt_malloc(ul + pl + 2);
        msg[0] = '\0';
        memcpy(msg + 1, c->p.sasl_username, ul);
        msg[1 + ul] = '\0';
        memcpy(msg + 2 + ul, c->p.sasl_password, pl);
        c->auth_mech = KT_SMTP_MECH_PLAIN;
        c->auth_step = 2;
        send_auth_line(c, "AUTH PLAIN ", msg, ul + pl + 2);
        explicit_bzero(msg, ul + pl + 2);
        kt_free(msg);
        return;
    }
    c->auth_mech = KT_SMTP_MECH_LOGIN;
    kt_buf_printf(&c->out, "AUTH LOGIN\r\n");
    c->expect = 1;
}

static void session_ready_or_auth(struct kt_smtp_conn *c)
{
    if (c->p.sasl_username && c->ext_auth) {
        start_auth(c);
        return;
    }
    session_ready(c);
}

/* A SASL challenge (RFC 4954 4): base64 of RFC 4648 4, padded, possibly empty; one line. */
static int is_base64(const char *s)
{
    size_t n = strlen(s), pad = 0;
    if (n % 4)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '=') {
            if (++pad > 2)
                return 0;
        } else if (pad || !(isalnum(ch) || ch == '+' || ch == '/')) {
            return 0;
        }
    }
    return 1;
}

/* Cancel the exchange with "*" (RFC 4954 4) and fail with why (4.7.0, Postfix's code for a SASL
 * exchange the client cannot go on with) once the server answered it, closed or timed out. */
static void auth_abort(struct kt_smtp_conn *c, const char *why)
{
    snprintf(c->auth_why, sizeof(c->auth_why), "%s", why);
    snprintf(c->dsn, sizeof(c->dsn), "4.7.0");
    kt_buf_printf(&c->out, "*\r\n");
    c->state = ST_AUTH_ABORT;
    c->expect = 1;
}

static void auth_reply(struct kt_smtp_conn *c, int code, const char *text)
{
    char na[320];
    if (code == 235) {
        session_ready(c);
        return;
    }
    if (code == 334 && c->auth_mech == KT_SMTP_MECH_LOGIN && c->auth_step < 2) {
        if (!is_base64(text + (strlen(text) > 4 ? 4 : strlen(text)))) {
            /* Postfix (Cyrus): a challenge that is not base64 ends the exchange; no password goes out */
            char why[512];
            snprintf(why, sizeof(why), "SASL authentication failed; cannot authenticate to server %s: malformed "
                     "SASL challenge from server", namaddr(c, na, sizeof(na)));
            auth_abort(c, why);
            return;
        }
        const char *v = c->auth_step == 0 ? c->p.sasl_username : c->p.sasl_password;
        c->auth_step++;
        send_auth_line(c, "", v, strlen(v));
        return;
    }
    char *t = kt_strdup(text);
    for (char *q = t; *q; q++)
        if (*q == '\n')
            *q = ' ';
    int res = code;
    if (code == 334) {
        /* a challenge where none can come: end the exchange (RFC 4954 "*") and give up */
        char *why = kt_asprintf("SASL authentication failed; server %s said: %s", namaddr(c, na, sizeof(na)), t);
        auth_abort(c, why);
        kt_free(why);
        kt_free(t);
        return;
    }
    c->quit_after_fail = 1;
    if (code >= 500 && c->p.sasl_soft_bounce) {
        res = code - 100;       /* smtp_sasl_auth_soft_bounce: the 5.x.y of the reply becomes 4.x.y */
    }
    conn_fail(c, res, "SASL authentication failed; server %s said: %s", namaddr(c, na, sizeof(na)), t);
    kt_free(t);
}

static void after_ehlo(struct kt_smtp_conn *c)
{
    if (c->ehlo_loop) {
        /* Postfix: a server that answers EHLO with our own name is us; 5.4.6 when it is among the best
         * MX hosts of the next hop, else 4.4.6 */
        char na[320];
        int best = c->addrs[c->cur_addr].pref == c->addrs[0].pref;
        kt_log_as("smtp", KT_LOG_WARN, "host %s replied to HELO/EHLO with my own hostname %s", namaddr(c, na, sizeof(na)),
                  c->p.loop_myhostname);
        snprintf(c->dsn, sizeof(c->dsn), "%s", best ? "5.4.6" : "4.4.6");
        c->quit_after_fail = 1;
        conn_fail(c, best ? 550 : 450, "mail for %s loops back to myself", c->p.nexthop ? c->p.nexthop : c->relay);
        return;
    }
    if (c->state == ST_EHLO && c->level != KT_SMTP_TLS_NONE && !c->plain_retry) {
        c->tls_known = !c->ext_starttls;
        c->tls_result = c->ext_starttls ? NULL : "starttls-not-supported";
        if (c->ext_starttls) {
            kt_buf_printf(&c->out, "STARTTLS\r\n");
            c->state = ST_STARTTLS;
            c->expect = 1;
            return;
        }
        if (tls_required(c)) {
            conn_fail_dsn(c, "4.7.4", 450, "TLS is required, but was not offered by host %s", c->relay);
            return;
        }
    }
    session_ready_or_auth(c);
}

static void txn_done(struct kt_smtp_conn *c)
{
    c->m = NULL;
    c->state = ST_IDLE;
    c->expect = 0;
    c->deadline = 0;
    if (kt_buf_used(&c->in) > 0) {
        /* more replies than commands (an LMTP server with one reply too many): the next one would answer
         * the wrong command, so the transaction's outcome stands and the connection is not reused */
        kt_warn("%s sent more replies than commands: the connection is not reused", c->relay);
        c->failed = 1;
        c->state = ST_DONE;
    }
    report(c, 0, NULL);
}

static void set_all(struct kt_smtp_conn *c, int code, const char *text, int only_accepted)
{
    for (size_t i = 0; i < c->m->n_rcpts; i++) {
        if (only_accepted && (c->m->codes[i] < 200 || c->m->codes[i] > 299))
            continue;
        if (!only_accepted && c->m->codes[i])
            continue;
        c->m->codes[i] = code;
        kt_free(c->m->replies[i]);
        c->m->replies[i] = kt_strdup(text);
    }
}

static void send_rset(struct kt_smtp_conn *c)
{
    kt_buf_printf(&c->out, "RSET\r\n");
    c->state = ST_RSET;
    c->expect = 1;
}

static void start_body(struct kt_smtp_conn *c)
{
    c->state = ST_BODY;
    if (c->conv.len) {
        c->body_pos = 0;
        c->body_end = (off_t)c->conv.len;
    } else {
        c->body_pos = c->m->body_off;
        c->body_end = c->m->body_off + c->m->body_len;
    }
    c->line_start = 1;
    c->cr_pending = 0;
    if (c->use_chunking)
        kt_buf_printf(&c->out, "BDAT %lld LAST\r\n", (long long)(c->body_end - c->body_pos));
    set_deadline(c, c->p.command_timeout_s);
}

static void rcpts_answered(struct kt_smtp_conn *c)
{
    if (c->accepted == 0) {
        if (c->pipelined_data)
            return;       /* the DATA reply is still to come */
        send_rset(c);
        return;
    }
    if (c->use_chunking) {
        start_body(c);
        return;
    }
    if (!c->pipelined_data) {
        kt_buf_printf(&c->out, "DATA\r\n");
        c->state = ST_DATA;
        c->expect = 1;
    }
}

static int is_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 0;
    return 1;
}

/* A "utf-8" ORCPT given with raw UTF-8 (RFC 6533 utf-8-addr-unitext, which the server accepts only
 * as the ORCPT's own form) for a next hop without SMTPUTF8: each non-ASCII character becomes the
 * 7-bit EmbeddedUnicodeChar "\x{HEX}" of utf-8-addr-xtext (RFC 6533 3), never raw 8-bit bytes in
 * a command the hop did not agree to. Malformed UTF-8 (the server refused it at RCPT) goes as "?". */
static void orcpt_xtext(struct kt_smtp_conn *c, const char *v)
{
    const unsigned char *p = (const unsigned char *)v;
    while (*p) {
        if (*p < 0x80) {
            kt_buf_append(&c->out, (const char *)p, 1);
            p++;
            continue;
        }
        int n = (*p & 0xE0) == 0xC0 ? 2 : (*p & 0xF0) == 0xE0 ? 3 : (*p & 0xF8) == 0xF0 ? 4 : 1;
        unsigned cp = n == 2 ? *p & 0x1F : n == 3 ? *p & 0x0F : *p & 0x07;
        int k = 1;
        for (; k < n && (p[k] & 0xC0) == 0x80; k++)
            cp = cp << 6 | (p[k] & 0x3F);
        if (n == 1 || k < n)
            kt_buf_printf(&c->out, "?");
        else
            kt_buf_printf(&c->out, "\\x{%X}", cp);
        p += k;
    }
}

/* RCPT TO, with NOTIFY= and ORCPT= (RFC 3461 4.1, 4.2) when the server offers DSN. */
static void send_rcpt(struct kt_smtp_conn *c, size_t i)
{
    const struct kt_smtp_msg *m = c->m;
    kt_buf_printf(&c->out, "RCPT TO:<%s>", m->rcpts[i]);
    if (c->ext & KT_SMTP_EXT_DSN) {
        unsigned n = m->notify ? m->notify[i] : 0;
        if (n & KT_QNOTIFY_NEVER)
            kt_buf_printf(&c->out, " NOTIFY=NEVER");
        else if (n)
            kt_buf_printf(&c->out, " NOTIFY=%s%s%s%s%s", n & KT_QNOTIFY_SUCCESS ? "SUCCESS" : "",
                          (n & KT_QNOTIFY_SUCCESS) && (n & (KT_QNOTIFY_FAILURE | KT_QNOTIFY_DELAY)) ? "," : "",
                          n & KT_QNOTIFY_FAILURE ? "FAILURE" : "",
                          (n & KT_QNOTIFY_FAILURE) && (n & KT_QNOTIFY_DELAY) ? "," : "",
                          n & KT_QNOTIFY_DELAY ? "DELAY" : "");
        if (m->orcpt && m->orcpt[i] && !is_ascii(m->orcpt[i]) && !(c->ext & KT_SMTP_EXT_SMTPUTF8)) {
            kt_buf_printf(&c->out, " ORCPT=");
            orcpt_xtext(c, m->orcpt[i]);
        } else if (m->orcpt && m->orcpt[i]) {
            kt_buf_printf(&c->out, " ORCPT=%s", m->orcpt[i]);
        } else if (is_ascii(m->rcpts[i])) {
            char x[1600];
            kt_xtext_encode(m->rcpts[i], x, sizeof(x));
            kt_buf_printf(&c->out, " ORCPT=rfc822;%s", x);
        }
    }
    kt_buf_printf(&c->out, "\r\n");
}

static void on_reply(struct kt_smtp_conn *c, int code)
{
    const char *text = kt_buf_head(&c->reply);
    switch (c->state) {
    case ST_GREETING:
        if (code / 100 != 2) {
            conn_fail(c, code, "host %s refused to talk to me: %s", c->relay, text);
            return;
        }
        if (c->p.loop_myhostname && strlen(text) > 4) {
            /* Postfix only warns about the greeting; the EHLO reply decides */
            size_t n = strcspn(text + 4, " \t\n");
            char na[320];
            if (n == strlen(c->p.loop_myhostname) && !strncasecmp(text + 4, c->p.loop_myhostname, n))
                kt_log_as("smtp", KT_LOG_WARN, "host %s greeted me with my own hostname %s", namaddr(c, na, sizeof(na)),
                          c->p.loop_myhostname);
        }
        send_ehlo(c, ST_EHLO);
        return;
    case ST_EHLO:
    case ST_EHLO2:
        if (code / 100 != 2) {
            if (c->state == ST_EHLO2 || tls_required(c) || c->p.lmtp) {
                /* RFC 2033 4.1: LMTP has no HELO to fall back to */
                conn_fail(c, code, "host %s refused %s: %s", c->relay, c->p.lmtp ? "LHLO" : "EHLO", text);
                return;
            }
            kt_buf_printf(&c->out, "HELO %s\r\n", c->p.helo_name);
            c->state = ST_HELO;
            c->expect = 1;
            return;
        }
        parse_ehlo(c);
        after_ehlo(c);
        return;
    case ST_HELO:
        if (code / 100 != 2) {
            conn_fail(c, code, "host %s refused HELO: %s", c->relay, text);
            return;
        }
        session_ready(c);
        return;
    case ST_STARTTLS:
        if (code / 100 != 2) {
            c->tls_known = 1;
            c->tls_result = "starttls-not-supported";
            if (tls_required(c)) {
                conn_fail_dsn(c, "4.7.4", 450, "TLS is required, but host %s refused to start TLS: %s", c->relay,
                              text);
                return;
            }
            session_ready_or_auth(c);
            return;
        }
        start_tls(c);
        return;
    case ST_AUTH:
        auth_reply(c, code, text);
        return;
    case ST_AUTH_ABORT:
        c->quit_after_fail = 1;     /* the server answered the "*": the session can end with QUIT */
        conn_fail(c, 450, "%s", c->auth_why);
        return;
    case ST_MAIL: {
        size_t idx = c->reply_idx++;
        struct kt_smtp_msg *m = c->m;
        if (idx == 0) {
            c->mail_code = code;
            kt_free(c->mail_text);
            c->mail_text = code / 100 == 2 ? NULL : reply_text(c, "MAIL FROM");
            if (code / 100 != 2 && !c->ext_pipelining) {
                set_all(c, code, c->mail_text, 0);
                send_rset(c);
                return;
            }
            if (!c->ext_pipelining) {
                send_rcpt(c, 0);
                c->expect = 1;
            }
            return;
        }
        if (idx <= m->n_rcpts) {
            size_t i = idx - 1;
            if (c->mail_code / 100 != 2) {
                m->codes[i] = c->mail_code;
                m->replies[i] = kt_strdup(c->mail_text);
            } else {
                m->codes[i] = code;
                if (code / 100 == 2)
                    c->accepted++;
                else
                    m->replies[i] = reply_text(c, "RCPT TO");
            }
            if (!c->ext_pipelining && i + 1 < m->n_rcpts) {
                send_rcpt(c, i + 1);
                c->expect = 1;
                return;
            }
            if (i + 1 == m->n_rcpts)
                rcpts_answered(c);
            return;
        }
        /* the pipelined DATA */
        if (c->accepted == 0) {
            if (code == 354) {
                /* nobody to deliver to: end the empty message at once */
                kt_buf_printf(&c->out, ".\r\n");
                c->state = ST_DOT;
                c->expect = 1;
                c->accepted = (size_t)-1;
                return;
            }
            send_rset(c);
            return;
        }
        goto data_reply;
    }
    case ST_DATA:
    data_reply:
        if (code != 354) {
            /* a 2xx here is no delivery (the server has not seen the message): it must not read as one
             * for the accepted recipients, so it counts as a temporary failure, as any unexpected reply */
            char *r = reply_text(c, "DATA");
            set_all(c, code / 100 == 2 ? 450 : code, r, 1);
            kt_free(r);
            send_rset(c);
            return;
        }
        start_body(c);
        return;
    case ST_DOT:
        if (c->p.lmtp && c->accepted != (size_t)-1) {
            /* RFC 2033 4.2: one reply per accepted recipient, in RCPT order, each that recipient's outcome */
            struct kt_smtp_msg *m = c->m;
            while (c->dot_next < m->n_rcpts && (m->codes[c->dot_next] < 200 || m->codes[c->dot_next] > 299))
                c->dot_next++;
            if (c->dot_next < m->n_rcpts) {
                size_t i = c->dot_next++;
                m->codes[i] = code;
                kt_free(m->replies[i]);
                m->replies[i] = reply_text(c, "end of DATA");
                m->final_upto = i + 1;
            }
            if (c->expect == 0)
                txn_done(c);
            return;
        }
        if (c->accepted != (size_t)-1) {
            char *r = reply_text(c, c->use_chunking ? "end of BDAT" : "end of DATA");
            set_all(c, code, r, 1);
            kt_free(r);
        }
        txn_done(c);
        return;
    case ST_RSET:
        if (code / 100 != 2) {
            /* the transaction's outcome stands; the connection is not reused */
            c->failed = 1;
            c->state = ST_DONE;
            c->m = NULL;
            report(c, 0, NULL);
            return;
        }
        txn_done(c);
        return;
    case ST_QUIT:
        c->state = ST_DONE;
        conn_teardown(c);
        return;
    default:
        return;
    }
}

/* DATA body bytes as canonical lines with RFC 5321 4.5.2 transparency: a bare CR or LF goes out as CRLF
 * (never raw, so a next hop cannot find an end of data ktrelay did not mean), and a line-leading dot is
 * doubled. State runs across calls. */
static void data_canonical(struct kt_smtp_conn *c, const char *buf, size_t n)
{
    size_t start = 0;

    for (size_t i = 0; i < n; i++) {
        char ch = buf[i];
        if (c->cr_pending) {
            c->cr_pending = 0;
            kt_buf_append(&c->out, "\r\n", 2);
            c->line_start = 1;
            if (ch == '\n') {
                start = i + 1;
                continue;
            }
        }
        if (ch == '\r' || ch == '\n') {
            kt_buf_append(&c->out, buf + start, i - start);
            start = i + 1;
            if (ch == '\r') {
                c->cr_pending = 1;
            } else {
                kt_buf_append(&c->out, "\r\n", 2);
                c->line_start = 1;
            }
            continue;
        }
        if (c->line_start && ch == '.') {
            kt_buf_append(&c->out, buf + start, i - start);
            kt_buf_append(&c->out, ".", 1);
            start = i;
        }
        c->line_start = 0;
    }
    kt_buf_append(&c->out, buf + start, n - start);
}

/* The next body bytes into c->out (the pump flushes them), or the whole body
 * to kt_conn_sendfile. Returns 1 when all of it is out, 0 when there is more
 * (or sendfile is running), -1 after a failure. */
static int send_body(struct kt_smtp_conn *c)
{
    if (c->body_pos >= c->body_end)
        return 1;
    if (c->use_sendfile) {
        if (!c->sendfile_busy) {
            c->sendfile_busy = 1;
            kt_conn_sendfile(c->conn, c->m->fd, c->body_pos, (size_t)(c->body_end - c->body_pos));
        }
        return c->failed ? -1 : c->body_pos >= c->body_end;
    }
    char buf[BODY_BLOCK];
    size_t want = (size_t)(c->body_end - c->body_pos);
    if (want > sizeof(buf))
        want = sizeof(buf);
    if (c->conv.len) {
        /* the converted body: CRLF lines, dots still to stuff on DATA */
        c->body_pos += (off_t)want;
        if (c->use_chunking)
            kt_buf_append(&c->out, c->conv.data + c->body_pos - want, want);
        else
            data_canonical(c, c->conv.data + c->body_pos - want, want);
        return 0;
    }
    ssize_t n = pread(c->m->fd, buf, want, c->body_pos);
    if (n <= 0) {
        conn_fail(c, -EIO, "cannot read queue file %s: %s", c->m->id, n < 0 ? strerror(errno) : "truncated");
        return -1;
    }
    c->body_pos += n;
    if (c->use_chunking) {
        kt_buf_append(&c->out, buf, (size_t)n);
    } else {
        data_canonical(c, buf, (size_t)n);
    }
    return 0;
}

static void sendfile_done(struct kt_smtp_conn *c, int res)
{
    c->sendfile_busy = 0;
    if (res < 0) {
        conn_fail(c, res, "lost connection with %s while sending message body: %s", c->relay, kt_conn_why(c->conn));
        return;
    }
    c->body_pos = c->body_end;
    if (!c->sendfile_counted) {
        c->sendfile_counted = 1;
        __atomic_add_fetch(&sendfile_count, 1, __ATOMIC_RELAXED);
    }
}

static void body_sent(struct kt_smtp_conn *c)
{
    if (!c->use_chunking && c->use_sendfile) {
        kt_buf_printf(&c->out, "%s.\r\n", c->body_crlf ? "" : "\r\n");
    } else if (!c->use_chunking) {
        /* a pending CR or an unterminated last line gets its CRLF before the end marker */
        kt_buf_printf(&c->out, "%s.\r\n", c->cr_pending || !c->line_start ? "\r\n" : "");
        c->cr_pending = 0;
    }
    kt_buf_release(&c->conv);
    c->state = ST_DOT;
    c->expect = c->p.lmtp ? c->accepted : 1;
    c->dot_next = 0;
    set_deadline(c, c->p.data_done_timeout_s > 0 ? c->p.data_done_timeout_s : c->p.command_timeout_s);
}

static void pump(struct kt_smtp_conn *c)
{
    if (c->in_pump)
        return;
    c->in_pump = 1;
    while (!c->freed && !c->failed) {
        if (c->state == ST_CONNECT || c->state == ST_HANDSHAKE || c->sending || c->sendfile_busy)
            break;      /* an event from the connection brings us back */
        if (kt_buf_used(&c->out) > 0) {
            c->sending = 1;
            kt_conn_flush(c->conn);   /* SENT may come before this returns */
            continue;
        }
        if (c->state == ST_BODY) {
            int r = send_body(c);
            if (r < 0)
                break;
            if (r > 0)
                body_sent(c);
            continue;
        }
        if (c->expect > 0) {
            int code = parse_reply(c);
            if (code < 0) {
                conn_fail(c, -EPROTO, "malformed reply from %s", c->relay);
                break;
            }
            if (code > 0) {
                c->expect--;
                on_reply(c, code);
                kt_buf_reset(&c->reply);
                continue;
            }
            kt_conn_arm_read(c->conn, REPLY_READ);
            break;
        }
        if (c->closing && c->state != ST_QUIT) {
            if (c->state == ST_IDLE) {
                kt_buf_printf(&c->out, "QUIT\r\n");
                c->state = ST_QUIT;
                c->expect = 1;
                set_deadline(c, 10);
                continue;
            }
            conn_teardown(c);
        }
        break;
    }
    c->in_pump = 0;
    if (c->failed && c->closing)
        conn_teardown(c);
    conn_free_if_idle(c);
}

/* What the connection reports; old connections (addresses given up on) only
 * ever report CLOSED. */
static void on_conn_event(void *arg, enum kt_conn_event ev, int res)
{
    struct kt_smtp_conn *c = arg;
    int tls;

    switch (ev) {
    case KT_CONN_EV_CLOSED:
        c->conns_open--;
        conn_free_if_idle(c);
        return;
    case KT_CONN_EV_CONNECTED:
        connected(c, res);
        return;
    case KT_CONN_EV_INPUT:
        set_deadline(c, c->state == ST_DOT && c->p.data_done_timeout_s > 0 ? c->p.data_done_timeout_s
                                                                           : c->p.command_timeout_s);
        break;
    case KT_CONN_EV_SENT:
        c->sending = 0;
        break;
    case KT_CONN_EV_TLS_READY:
        tls_ready(c);
        break;
    case KT_CONN_EV_SENDFILE:
        sendfile_done(c, res);
        break;
    case KT_CONN_EV_SPLICED:
        return;
    case KT_CONN_EV_EOF:
    case KT_CONN_EV_ERROR:
        c->sending = 0;
        tls = kt_conn_ssl(c->conn) != NULL;
        if (c->state == ST_AUTH_ABORT) {
            conn_fail(c, 450, "%s", c->auth_why);     /* the server closed instead of answering "*" */
            break;
        }
        switch (kt_conn_failed_step(c->conn)) {
        case KT_CONN_STEP_HANDSHAKE:
            tls_failed(c);
            break;
        case KT_CONN_STEP_SEND:
            if (tls)
                conn_fail(c, -EIO, "TLS write with %s failed: %s", c->relay, kt_conn_why(c->conn));
            else
                conn_fail(c, res, "lost connection with %s while sending: %s", c->relay, strerror(-res));
            break;
        default:
            if (tls)
                conn_fail(c, -EIO, "TLS read with %s failed: %s", c->relay,
                          ev == KT_CONN_EV_EOF ? "I/O error" : kt_conn_why(c->conn));
            else
                conn_fail(c, res < 0 ? res : -ECONNRESET, "lost connection with %s while receiving the %s", c->relay,
                          c->state == ST_GREETING ? "initial server greeting" : "reply");
            break;
        }
        break;
    }
    pump(c);
}

/* The 8BITMIME to 7BIT conversion (disable_mime_output_conversion = no) for a server without 8BITMIME, for
 * a message received with BODY=8BITMIME or BINARYMIME or without BODY= (which may hold 8-bit bytes; one
 * declared BODY=7BIT is taken at its word):
 * the whole body is read and converted into c->conv (bounded by message_size_limit, as the body is;
 * a message with nothing to convert keeps c->conv empty and goes from the queue file as it is, with
 * sendfile where it can). Returns 1 to go on, 0 after the connection failed. */
static int downgrade(struct kt_smtp_conn *c, struct kt_smtp_msg *m)
{
    size_t len = (size_t)m->body_len, got = 0;
    char *raw = kt_malloc(len ? len : 1);
    while (got < len) {
        ssize_t n = pread(m->fd, raw + got, len - got, m->body_off + (off_t)got);
        if (n <= 0) {
            kt_free(raw);
            conn_fail(c, -EIO, "cannot read queue file %s: %s", m->id, n < 0 ? strerror(errno) : "truncated");
            return 0;
        }
        got += (size_t)n;
    }
    if (kt_mime_downgrade(raw, len, &c->conv) != 1 || !c->conv.len)
        kt_buf_release(&c->conv);
    kt_free(raw);
    return 1;
}

void kt_smtp_send(struct kt_smtp_conn *c, struct kt_smtp_msg *m, kt_smtp_cb cb, void *arg)
{
    char tail[2] = { 0, 0 };
    c->cb = cb;
    c->arg = arg;
    c->m = m;
    c->reply_idx = 0;
    c->accepted = 0;
    c->mail_code = 0;
    m->final_upto = 0;
    for (size_t i = 0; i < m->n_rcpts; i++) {
        m->codes[i] = 0;
        m->replies[i] = NULL;
    }
    kt_buf_release(&c->conv);
    if (c->p.mime_output_conversion && !(c->ext & KT_SMTP_EXT_8BITMIME) &&
        m->body != KT_QBODY_7BIT && !downgrade(c, m))
        return;
    /* BDAT states the byte count first: only a body known to be canonical can go as it is (the
     * converted body always is) */
    c->use_chunking = c->ext_chunking && (m->canonical || c->conv.len) && !c->p.lmtp;   /* lmtp(8) sends DATA, as Postfix */
    if (m->body_len >= 2 && pread(m->fd, tail, 2, m->body_off + m->body_len - 2) == 2)
        c->body_crlf = tail[0] == '\r' && tail[1] == '\n';
    else
        c->body_crlf = m->body_len == 0;
    /* sendfile needs the bytes as they are: a canonical body over BDAT, or over DATA without a line to
     * stuff */
    c->use_sendfile = kt_conn_can_sendfile(c->conn) && m->canonical && (c->use_chunking || m->dots == 0) &&
                      !c->conv.len;
    c->sendfile_counted = 0;
    kt_buf_printf(&c->out, "MAIL FROM:<%s>", m->sender);
    if (c->ext_size)
        kt_buf_printf(&c->out, " SIZE=%lld", c->conv.len ? (long long)c->conv.len : (long long)m->body_len);
    /* BODY= as the client declared it; BINARYMIME only where it can go as such (BDAT), else 8BITMIME */
    if (m->body == KT_QBODY_BINARYMIME && (c->ext & KT_SMTP_EXT_BINARYMIME) && c->use_chunking)
        kt_buf_printf(&c->out, " BODY=BINARYMIME");
    else if (m->body != KT_QBODY_NONE && (c->ext & KT_SMTP_EXT_8BITMIME))
        kt_buf_printf(&c->out, " BODY=%s", m->body == KT_QBODY_7BIT ? "7BIT" : "8BITMIME");
    if (m->smtputf8 && (c->ext & KT_SMTP_EXT_SMTPUTF8))
        kt_buf_printf(&c->out, " SMTPUTF8");
    if (c->ext & KT_SMTP_EXT_DSN) {
        if (m->ret != KT_QRET_NONE)
            kt_buf_printf(&c->out, " RET=%s", m->ret == KT_QRET_HDRS ? "HDRS" : "FULL");
        if (m->envid)
            kt_buf_printf(&c->out, " ENVID=%s", m->envid);
    }
    kt_buf_printf(&c->out, "\r\n");
    c->expect = 1;
    c->pipelined_data = 0;
    if (c->ext_pipelining) {
        for (size_t i = 0; i < m->n_rcpts; i++)
            send_rcpt(c, i);
        c->expect += m->n_rcpts;
        if (!c->use_chunking) {
            kt_buf_printf(&c->out, "DATA\r\n");
            c->expect++;
            c->pipelined_data = 1;
        }
    }
    c->state = ST_MAIL;
    set_deadline(c, c->p.command_timeout_s);
    pump(c);
}

void kt_smtp_close(struct kt_smtp_conn *c)
{
    if (!c || c->closing)
        return;
    c->closing = 1;
    c->cb = NULL;
    if (c->failed && c->quit_after_fail && c->conn && !c->freed) {
        /* we gave up, not the server: take leave as Postfix does, with QUIT */
        c->failed = 0;
        c->state = ST_IDLE;
        c->expect = 0;
    }
    if (c->failed || c->state != ST_IDLE) {
        conn_teardown(c);
        return;
    }
    pump(c);
}

void kt_smtp_check_timeout(struct kt_smtp_conn *c, time_t now)
{
    if (!c || c->freed || c->failed || !c->deadline || now < c->deadline)
        return;
    if (c->closing) {
        conn_teardown(c);
        return;
    }
    static const char *const what[] = {
        [ST_CONNECT] = "connect", [ST_GREETING] = "initial server greeting", [ST_EHLO] = "EHLO",
        [ST_HELO] = "HELO", [ST_STARTTLS] = "STARTTLS", [ST_HANDSHAKE] = "TLS handshake", [ST_EHLO2] = "EHLO",
        [ST_AUTH] = "AUTH", [ST_AUTH_ABORT] = "AUTH",
        [ST_IDLE] = "idle", [ST_MAIL] = "MAIL FROM", [ST_DATA] = "DATA", [ST_BODY] = "message transfer",
        [ST_DOT] = "end of data", [ST_RSET] = "RSET", [ST_QUIT] = "QUIT", [ST_DONE] = "end",
    };
    if (c->state == ST_CONNECT)
        conn_fail(c, -ETIMEDOUT, "connect to %s: Connection timed out", c->relay);
    else if (c->state == ST_AUTH_ABORT)
        conn_fail(c, 450, "%s", c->auth_why);
    else
        conn_fail(c, -ETIMEDOUT, "conversation with %s timed out while sending %s", c->relay, what[c->state]);
}
