/* SMTP server protocol (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
 * ENHANCEDSTATUSCODES, CHUNKING, SMTPUTF8 and STARTTLS).
 *
 * Input is processed command by command from the session's input buffer;
 * replies are collected in the output buffer and written once the input
 * buffer runs dry or the session must wait, so the replies to a pipelined
 * group leave in one write. A 250 for a message is only sent from the
 * delivery's commit callback, i.e. after every copy is fsync'd.
 *
 * Each verb is a row of the command table (smtpd_cmds below): its handler
 * and its preconditions (TLS, HELO, inside or outside a transaction, ...),
 * which command_refusal() checks in one place before any handler runs.
 * The session moves through explicit states (enum kt_session_state), each
 * change through session_enter_state(). A mail transaction is a struct of
 * its own (struct kt_smtpd_txn), created by MAIL and released when the
 * message ends, by RSET, HELO/EHLO, STARTTLS or the end of the session. */
#include <arpa/inet.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/table.h"
#include "core/log.h"
#include "delivery/maildir.h"
#include "delivery/transport.h"
#include "delivery/rewrite.h"
#include "metrics/metrics.h"
#include "smtpd/policy.h"
#include "queue/qmgr.h"
#include "queue/queue.h"
#include "conf/config.h"
#include "core/table.h"
#include "smtpd/anvil.h"
#include "smtpd/cleanup.h"
#include "smtpd/client_dns.h"
#include "milter/milter.h"
#include "smtpd/proxy.h"
#include "smtpd/sasl.h"
#include "smtpd/session.h"
#include "smtpd/worker.h"
#include "conf/settings.h"
#include "tls/conn.h"
#include "tls/tls.h"

/* AUTH failures in one session before it is disconnected. */
#define AUTH_MAX_FAILURES 3
/* Cap on the delay before a failure reply, in units of smtpd_error_sleep_time. */
#define AUTH_MAX_DELAY_STEPS 5

/* Read sizes: a command line fits a small read; body reads are several TLS records each. */
#define COMMAND_READ 1024
#define BODY_READ 65536
#define BODY_SPACE_MIN 4096   /* body bytes are parsed straight into the spool buffer when it has this room */

static void session_process(struct kt_session *s);
static void bdat_fail(struct kt_session *s, const char *why);
static int milter_after(struct kt_session *s, int stage);
static void on_milter_event(void *arg, const struct kt_milter_result *r);
static void session_welcome(struct kt_session *s);
static void message_end(struct kt_session *s);
static void start_spool(struct kt_session *s);

/* Stop the session: the connection closes (TLS close_notify, socket I/O
 * cancelled) and reports back once it is gone; then the session is freed. */
static void session_close(struct kt_session *s)
{
    if (s->dead)
        return;
    s->dead = 1;
    kt_conn_close(s->conn);
}

const char *kt_session_state_str(enum kt_session_state st)
{
    switch (st) {
    case KT_SS_NEW: return "NEW";
    case KT_SS_HANDSHAKE: return "HANDSHAKE";
    case KT_SS_COMMAND: return "COMMAND";
    case KT_SS_AUTH: return "AUTH";
    case KT_SS_DATA: return "DATA";
    case KT_SS_BDAT: return "BDAT";
    case KT_SS_CLOSING: return "CLOSING";
    }
    return "?";
}

/* The stage Postfix names in "timeout after X" and "too many errors after X". */
static const char *stage_str(enum kt_session_state st)
{
    switch (st) {
    case KT_SS_HANDSHAKE: return "STARTTLS";
    case KT_SS_AUTH: return "AUTH";
    case KT_SS_DATA: return "DATA";
    case KT_SS_BDAT: return "BDAT";
    case KT_SS_CLOSING: return "END-OF-MESSAGE";
    case KT_SS_NEW:
    case KT_SS_COMMAND: break;
    }
    return "CONNECT";
}

/* The client's verified name for logs, "unknown" without one (Postfix's namaddr). */
static const char *client_name(const struct kt_session *s)
{
    return s->client_name ? s->client_name : "unknown";
}

/* The one place the session state changes. */
static void session_enter_state(struct kt_session *s, enum kt_session_state st)
{
    if (s->state == st)
        return;
    kt_debug("session %s[%s]: %s -> %s", client_name(s), s->addr, kt_session_state_str(s->state),
             kt_session_state_str(st));
    s->state = st;
    if (st == KT_SS_CLOSING && s->conn)
        kt_conn_last_output(s->conn);   /* the last reply leaves with close_notify and FIN */
}

/* ---- DNS for client checks ----
 * Answers live in the shared cache (client_dns.h). A step that misses one
 * fetches it through the worker's resolver and runs again once every
 * answer is in; the job outlives a session that goes away meanwhile. */

struct dns_job {
    struct kt_session *s;      /* NULL once the session is gone */
    unsigned outstanding;
};

static void dns_fetched(void *arg, int cancelled, const struct kt_dns_result *res)
{
    struct dns_job *j = arg;
    struct kt_session *s = j->s;
    if (s && res) {
        /* kept until the step is done: the cache may drop it sooner */
        s->dns_answers = kt_realloc(s->dns_answers, (s->n_dns_answers + 1) * sizeof(*s->dns_answers));
        s->dns_answers[s->n_dns_answers++] = *res;
    }
    if (--j->outstanding)
        return;
    kt_free(j);
    if (!s)
        return;
    s->dns_job = NULL;
    s->wait = KT_WAIT_NONE;
    if (s->dead) {   /* closed meanwhile (drain deadline): nothing to resume */
        kt_session_maybe_free(s);
        return;
    }
    s->dns_resume(s);
}

/* Fetches every query in nd. Returns 1 when the session now waits (resume
 * runs later), 0 when all answers came at once. */
static int dns_wait(struct kt_session *s, const struct kt_dns_needs *nd, void (*resume)(struct kt_session *))
{
    struct dns_job *j = kt_calloc(1, sizeof(*j));
    j->s = s;
    j->outstanding = 1;   /* held until every query is started */
    s->dns_job = j;
    s->dns_resume = resume;
    s->wait = KT_WAIT_DNS;
    s->dns_rounds++;
    for (unsigned i = 0; i < nd->n; i++) {
        j->outstanding++;
        kt_cdns_fetch(s->worker->dns, nd->v[i].type, nd->v[i].name, dns_fetched, j);
    }
    if (--j->outstanding)
        return 1;
    kt_free(j);
    s->dns_job = NULL;
    s->wait = KT_WAIT_NONE;
    return 0;
}

static void dns_step_done(struct kt_session *s)
{
    kt_free(s->dns_answers);
    s->dns_answers = NULL;
    s->n_dns_answers = 0;
    s->dns_rounds = 0;
}

static int dns_answer(const struct kt_session *s, int type, const char *name, struct kt_dns_answer *a)
{
    for (unsigned i = 0; i < s->n_dns_answers; i++)
        if (s->dns_answers[i].type == type && strcasecmp(s->dns_answers[i].name, name) == 0) {
            *a = s->dns_answers[i].ans;
            return 1;
        }
    return kt_cdns_lookup(type, name, a);
}

/* The answer for (type, name): 1 with *a (a failure after two rounds
 * without one), or 0 when the session waits and resume runs later. */
static int session_dns(struct kt_session *s, int type, const char *name, struct kt_dns_answer *a,
                       void (*resume)(struct kt_session *))
{
    if (dns_answer(s, type, name, a))
        return 1;
    if (s->dns_rounds < 2) {
        struct kt_dns_needs nd = { .n = 1 };
        nd.v[0].type = type;
        snprintf(nd.v[0].name, sizeof(nd.v[0].name), "%s", name);
        if (dns_wait(s, &nd, resume))
            return 0;
        if (dns_answer(s, type, name, a))
            return 1;
    }
    memset(a, 0, sizeof(*a));
    a->status = KT_DNS_TEMP;
    snprintf(a->why, sizeof(a->why), "no answer");
    return 1;
}

/* A new request (command line, body, TLS handshake) starts: it has smtpd_timeout. */
static void session_touch(struct kt_session *s)
{
    s->deadline = time(NULL) + s->cfg->timeout_s;
    s->rate_credit_ms = 0;
}

/* smtpd_per_request_deadline (Postfix 3.7): body bytes received extend the request's deadline by
 * bytes / smtpd_min_data_rate seconds, so a client that trickles is cut off however it spaces its
 * bytes; without it every read restarts smtpd_timeout. */
static void body_progress(struct kt_session *s, size_t bytes)
{
    if (!s->cfg->per_request_deadline) {
        session_touch(s);
        return;
    }
    s->rate_credit_ms += (unsigned long long)bytes * 1000 / (unsigned long long)s->cfg->min_data_rate;
    s->deadline += (time_t)(s->rate_credit_ms / 1000);
    s->rate_credit_ms %= 1000;
}

static void count_error(struct kt_session *s);

/* One reply line; counts errors and enforces smtpd_hard_error_limit. */
static void reply(struct kt_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(struct kt_session *s, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(line) - 3)
        n = (int)sizeof(line) - 3;
    line[n++] = '\r';
    line[n++] = '\n';
    kt_buf_append(&s->out, line, (size_t)n);
    if ((line[0] == '4' || line[0] == '5') && !(line[0] == '4' && line[1] == '2' && line[2] == '1'))
        count_error(s);
}

/* One more error: past smtpd_soft_error_limit the next reply waits, at smtpd_hard_error_limit the session
 * ends with 421 (Postfix's smtpd). */
static void count_error(struct kt_session *s)
{
    s->errors++;
    if (s->errors > s->cfg->soft_error_limit)
        s->tarpit_owed = 1;
    if (s->errors >= s->cfg->hard_error_limit && s->state != KT_SS_CLOSING) {
        kt_info("too many errors after %s from %s[%s]", stage_str(s->state), client_name(s), s->addr);
        reply(s, "421 4.7.0 %s Error: too many errors", s->cfg->myhostname);
        session_enter_state(s, KT_SS_CLOSING);
    }
}

static void make_queue_id(struct kt_session *s)
{
    kt_queue_new_id(s->txn->queue_id, sizeof(s->txn->queue_id));
}

/* A new, empty transaction (MAIL accepted). */
static struct kt_smtpd_txn *transaction_new(void)
{
    return kt_calloc(1, sizeof(struct kt_smtpd_txn));
}

/* Ends the transaction, if any: an unfinished delivery is abandoned and
 * all transaction memory goes back, so idle sessions stay small. */
static void transaction_reset(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    if (!t)
        return;
    s->txn = NULL;
    kt_milters_abort(s->milters);
    if (t->delivery)
        kt_delivery_abandon(t->delivery);
    kt_cleanup_free(t->cleanup);
    kt_buf_release(&t->rcpts);
    kt_buf_release(&t->orig_rcpts);
    kt_buf_release(&t->skip_notes);
    kt_buf_release(&t->relay_rcpts);
    for (size_t i = 0; i < t->rcpt_dsn_cap; i++)
        kt_free(t->rcpt_orcpt[i]);
    kt_free(t->rcpt_orcpt);
    kt_free(t->rcpt_notify);
    kt_free(t->mailboxes);
    kt_free(t);
}

static const char *protocol_name(const struct kt_session *s)
{
    if (!s->esmtp)
        return s->tls_on ? "SMTPS" : "SMTP";
    /* RFC 3848 */
    if (s->sasl_username[0])
        return s->tls_on ? "ESMTPSA" : "ESMTPA";
    return s->tls_on ? "ESMTPS" : "ESMTP";
}

/* Message bytes into the spool, through the header and body checks when the service has any. Returns 1 when
 * the writer is behind. */
static int spool_append(struct kt_session *s, const char *p, size_t n)
{
    struct kt_smtpd_txn *t = s->txn;
    return t->cleanup ? kt_cleanup_feed(t->cleanup, p, n) : kt_delivery_append(t->delivery, p, n);
}

/* Final delivery from the session (one recipient, its Maildirs): what Postfix's virtual(8) and local(8)
 * prepend, RFC 5321 4.4's return path first, in the same form as the queue manager's deliveries. Written
 * straight into the spool, before the Received: header: the checks do not see it, as in Postfix, where
 * the delivery agent adds it. */
static void add_trace_headers(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    /* X-Original-To: the address before canonical and virtual alias rewriting */
    char *hdr = kt_asprintf("Return-Path: <%s>\r\nX-Original-To: %s\r\nDelivered-To: %s\r\n", t->sender_full,
                            t->orig_rcpts.data, t->rcpts.data);
    kt_delivery_append(t->delivery, hdr, strlen(hdr));
    kt_free(hdr);
}

/* RFC 5321 4.4 trace header, in Postfix's layout. */
static void add_received_header(struct kt_session *s)
{
    char date[64];
    char hdr[1400];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
    int n = snprintf(hdr, sizeof(hdr), "Received: from %s (%s [%s])\r\n", s->helo[0] ? s->helo : client_name(s),
                     client_name(s), s->addr);
    if (s->sasl_username[0] && s->cfg->sasl_authenticated_header && n > 0 && (size_t)n < sizeof(hdr))
        n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "\t(Authenticated sender: %s)\r\n", s->sasl_username);
    if (n > 0 && (size_t)n < sizeof(hdr))
        n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "\tby %s (%s) with %s id %s\r\n", s->cfg->myhostname,
                      "ktrelay", protocol_name(s), s->txn->queue_id);
    if (s->tls_on && s->cfg->tls_received_header && n > 0 && (size_t)n < sizeof(hdr))
        n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "\t(using %s)\r\n", kt_conn_tls_desc(s->conn));
    if (n > 0 && (size_t)n < sizeof(hdr)) {
        if (s->txn->n_rcpts == 1)
            n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "\tfor <%s>; %s\r\n", s->txn->rcpts.data, date);
        else
            n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "\t%s\r\n", date);
    }
    if (n > 0 && (size_t)n < sizeof(hdr))
        spool_append(s, hdr, (size_t)n);   /* header_checks see it too, as in Postfix */
}

/* ---- greeting, EHLO ---- */

static void send_banner(struct kt_session *s)
{
    /* Postfix: a milter that refused the connection gets 554 (5xx) or 421 (then close) instead of the
     * banner; a 4xx refusal keeps the banner and answers MAIL and later commands */
    if (s->milter_greeting == 554) {
        reply(s, "554 %s ESMTP not accepting connections", s->cfg->myhostname);
    } else if (s->milter_greeting == 421) {
        reply(s, "421 %s Service unavailable - try again later", s->cfg->myhostname);
        session_enter_state(s, KT_SS_CLOSING);
    } else {
        reply(s, "220 %s", s->cfg->banner);
    }
}

static int tls_offerable(const struct kt_session *s)
{
    return s->cfg->tls && !s->tls_on && !s->cfg->wrappermode && s->cfg->tls_level != KT_TLS_NONE;
}

/* ---- anvil(8) limits ---- */

static const char *service_name(const struct kt_session *s)
{
    return s->cfg->service ? s->cfg->service->name : "smtp";
}

/* Counts one event toward a per-client rate limit (0 = none) and says
 * whether the client is over it, with Postfix's log line. */
static int rate_exceeded(struct kt_session *s, enum kt_anvil_rate ev, long long limit, const char *what)
{
    if (limit <= 0 || s->anvil_exempt)
        return 0;
    unsigned rate = kt_anvil_event(service_name(s), s->addr, ev, s->cfg->anvil_unit_s);
    if (rate <= limit)
        return 0;
    kt_warn("%s rate limit exceeded: %u from %s[%s] for service %s", what, rate, client_name(s), s->addr, service_name(s));
    return 1;
}

/* smtpd_client_connection_count_limit and _rate_limit, checked once per
 * connection (the count drops at disconnect). */
static int connection_refused(struct kt_session *s)
{
    const struct kt_smtpd_settings *cfg = s->cfg;
    s->anvil_exempt = cfg->limit_exceptions && kt_net_list_match(cfg->limit_exceptions, s->addr);
    if (s->anvil_exempt || (cfg->conn_count_limit <= 0 && cfg->conn_rate_limit <= 0))
        return 0;
    unsigned count, rate;
    kt_anvil_connect(service_name(s), s->addr, cfg->anvil_unit_s, &count, &rate);
    s->anvil_connected = 1;
    if (cfg->conn_count_limit > 0 && count > cfg->conn_count_limit) {
        kt_warn("Connection concurrency limit exceeded: %u from %s[%s] for service %s", count, client_name(s), s->addr,
                service_name(s));
        return 1;
    }
    if (cfg->conn_rate_limit > 0 && rate > cfg->conn_rate_limit) {
        kt_warn("Connection rate limit exceeded: %u from %s[%s] for service %s", rate, client_name(s), s->addr,
                service_name(s));
        return 1;
    }
    return 0;
}

/* Mechanisms AUTH may use right now. Mandatory TLS implies smtpd_tls_auth_only, as in Postfix. */
static unsigned auth_mechs_now(const struct kt_session *s)
{
    if (!s->cfg->sasl_enable)
        return 0;
    if (!s->tls_on && (s->cfg->tls_auth_only || s->cfg->tls_level == KT_TLS_ENCRYPT))
        return 0;
    return s->tls_on ? s->cfg->sasl_tls_mechs : s->cfg->sasl_mechs;
}

static void mech_list(unsigned mechs, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s%s%s", mechs & KT_MECH_PLAIN ? "PLAIN" : "",
             (mechs & KT_MECH_PLAIN) && (mechs & KT_MECH_LOGIN) ? " " : "", mechs & KT_MECH_LOGIN ? "LOGIN" : "");
}

/* s->helo before HELO/EHLO: a static string, never freed */
static const char no_helo[] = "";
#define HELO_MAX 255

static void helo_forget(struct kt_session *s)
{
    if (s->helo != no_helo)
        kt_free((char *)s->helo);
    s->helo = no_helo;
}

/* Keeps the HELO name for logs, restrictions and Received:, as Postfix's
 * printable(): control characters become '?', UTF-8 stays. */
static void helo_store(struct kt_session *s, const char *arg, size_t len)
{
    size_t n = len < HELO_MAX ? len : HELO_MAX;
    char *h = kt_malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)arg[i];
        h[i] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
    }
    h[n] = '\0';
    helo_forget(s);
    s->helo = h;
}

static void helo_or_ehlo(struct kt_session *s, const struct kt_smtp_command *c, int ehlo)
{
    if (c->arg_len == 0) {
        reply(s, "501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
        return;
    }
    /* Like Postfix: any argument is accepted here (several words are one
     * name); smtpd_helo_restrictions judge it at RCPT. */
    transaction_reset(s);
    helo_store(s, c->arg, c->arg_len);
    s->esmtp = ehlo;
    if (!ehlo) {
        s->counts.helo_ok++;
        reply(s, "250 %s", s->cfg->myhostname);
        return;
    }
    s->counts.ehlo_ok++;
    /* Postfix's keywords in Postfix's order, less smtpd_discard_ehlo_keywords */
    unsigned discard = s->cfg->ehlo_discard;
    char kw[12][300];
    size_t n = 0;
    snprintf(kw[n++], sizeof(kw[0]), "%s", s->cfg->myhostname);
    if (!(discard & KT_EHLO_PIPELINING))
        snprintf(kw[n++], sizeof(kw[0]), "PIPELINING");
    if (!(discard & KT_EHLO_SIZE) && s->cfg->message_size_limit > 0)
        snprintf(kw[n++], sizeof(kw[0]), "SIZE %lld", s->cfg->message_size_limit);
    else if (!(discard & KT_EHLO_SIZE))
        snprintf(kw[n++], sizeof(kw[0]), "SIZE");
    if (!s->cfg->disable_vrfy && !(discard & KT_EHLO_VRFY))
        snprintf(kw[n++], sizeof(kw[0]), "VRFY");
    if (tls_offerable(s) && !(discard & KT_EHLO_STARTTLS))
        snprintf(kw[n++], sizeof(kw[0]), "STARTTLS");
    unsigned mechs = discard & KT_EHLO_AUTH ? 0 : auth_mechs_now(s);
    if (mechs) {
        char list[32];
        mech_list(mechs, list, sizeof(list));
        snprintf(kw[n++], sizeof(kw[0]), "AUTH %s", list);
        if (s->cfg->broken_sasl_auth_clients)
            snprintf(kw[n++], sizeof(kw[0]), "AUTH=%s", list);
    }
    if (!(discard & KT_EHLO_ENHANCEDSTATUSCODES))
        snprintf(kw[n++], sizeof(kw[0]), "ENHANCEDSTATUSCODES");
    if (!(discard & KT_EHLO_8BITMIME))
        snprintf(kw[n++], sizeof(kw[0]), "8BITMIME");
    if (!(discard & KT_EHLO_DSN))
        snprintf(kw[n++], sizeof(kw[0]), "DSN");
    if (!(discard & KT_EHLO_SMTPUTF8) && s->cfg->smtputf8_enable)
        snprintf(kw[n++], sizeof(kw[0]), "SMTPUTF8");
    if (!(discard & KT_EHLO_CHUNKING))
        snprintf(kw[n++], sizeof(kw[0]), "CHUNKING");
    for (size_t i = 0; i < n; i++)
        kt_buf_printf(&s->out, "250%c%s\r\n", i + 1 < n ? '-' : ' ', kw[i]);
}

static void cmd_helo(struct kt_session *s, const struct kt_smtp_command *c)
{
    s->milter_mark = s->out.len;
    helo_or_ehlo(s, c, 0);
    if (s->helo[0] && c->arg_len)
        milter_after(s, KT_MS_HELO);
}

static void cmd_ehlo(struct kt_session *s, const struct kt_smtp_command *c)
{
    s->milter_mark = s->out.len;
    helo_or_ehlo(s, c, 1);
    if (s->helo[0] && c->arg_len)
        milter_after(s, KT_MS_HELO);
}

/* The ESMTP parameters after a MAIL or RCPT path, for the milters. */
static void milter_params_of(struct kt_session *s, const struct kt_smtp_command *c)
{
    if (!s->milters)
        return;
    s->mstate->params[0] = '\0';
    const char *gt = memchr(c->arg, '>', c->arg_len);
    if (!gt)
        return;
    size_t rest = c->arg_len - (size_t)(gt + 1 - c->arg);
    snprintf(s->mstate->params, sizeof(s->mstate->params), "%.*s", (int)rest, gt + 1);
}

/* ---- MAIL, RCPT ---- */

static void cmd_mail(struct kt_session *s, const struct kt_smtp_command *c)
{
    struct kt_smtp_path path;
    struct kt_mail_params p;

    if (rate_exceeded(s, KT_ANVIL_MAIL, s->cfg->msg_rate_limit, "Message delivery request")) {
        reply(s, "450 4.7.1 Error: too much mail from %s", s->addr);
        return;
    }
    const char *err = kt_smtp_parse_mail(c->arg, c->arg_len, &path, &p);
    if (err) {
        reply(s, "%s", err);
        return;
    }
    /* smtpd_discard_ehlo_keywords: Postfix no longer knows what it does not announce */
    if (p.smtputf8 && ((s->cfg->ehlo_discard & KT_EHLO_SMTPUTF8) || !s->cfg->smtputf8_enable)) {
        reply(s, "555 5.5.4 Unsupported option: SMTPUTF8");
        return;
    }
    if ((p.ret != KT_RET_NONE || p.has_envid) && (s->cfg->ehlo_discard & KT_EHLO_DSN)) {
        reply(s, "501 5.7.1 DSN support is disabled");
        return;
    }
    /* smtputf8_enable = no: UTF-8 is only 8-bit data, as before SMTPUTF8 (Postfix) */
    if (path.utf8 && !p.smtputf8 && s->cfg->smtputf8_enable) {
        reply(s, "553 5.6.7 Must declare SMTPUTF8 to send unicode address");
        return;
    }
    if (p.size > 0 && s->cfg->message_size_limit > 0 && p.size > s->cfg->message_size_limit) {
        reply(s, "552 5.3.4 Message size exceeds fixed limit");
        return;
    }
    char full[sizeof(((struct kt_smtpd_txn *)0)->sender_full)] = "";
    if (!path.is_null && kt_resolve_complete(s->cfg->resolver, path.addr, full, sizeof(full)) < 0) {
        reply(s, "501 5.1.7 Bad sender address syntax");
        return;
    }
    /* cleanup's envelope sender rewriting: sender_canonical_maps, canonical_maps */
    if (full[0] && !(s->cfg->receive_override & KT_RO_NO_ADDRESS_MAPPINGS) && kt_rewrite_active(s->cfg->rewrite)) {
        char canon[sizeof(full)];
        if (kt_rewrite_sender(s->cfg->rewrite, full, canon, sizeof(canon)) > 0)
            memcpy(full, canon, sizeof(full));
    }
    s->txn = transaction_new();
    memcpy(s->txn->sender, path.addr, path.addr_len + 1);
    memcpy(s->txn->sender_full, full, sizeof(full));
    snprintf(s->txn->filter, sizeof(s->txn->filter), "%s", s->cfg->content_filter ? s->cfg->content_filter : "");
    s->txn->body_8bit = p.body != KT_BODY_7BIT;
    /* the message's properties, carried in the queue envelope */
    s->txn->smtputf8 = p.smtputf8;
    s->txn->body = p.has_body ? (p.body == KT_BODY_7BIT ? KT_QBODY_7BIT
                                                  : p.body == KT_BODY_8BITMIME ? KT_QBODY_8BITMIME
                                                  : KT_QBODY_BINARYMIME) : KT_QBODY_NONE;
    s->txn->ret = p.ret == KT_RET_FULL ? KT_QRET_FULL : p.ret == KT_RET_HDRS ? KT_QRET_HDRS : KT_QRET_NONE;
    if (p.has_envid)
        snprintf(s->txn->envid, sizeof(s->txn->envid), "%.*s", (int)p.envid_len, p.envid);
    clock_gettime(CLOCK_MONOTONIC, &s->txn->t_start);
    make_queue_id(s);
    s->counts.mail_ok++;
    s->milter_mark = s->out.len;
    reply(s, "250 2.1.0 Ok");
    milter_params_of(s, c);
    milter_after(s, KT_MS_MAIL);
}

static void add_mailbox(struct kt_smtpd_txn *t, const struct kt_mailbox *m)
{
    for (size_t i = 0; i < t->n_mailboxes; i++)
        if (strcmp(t->mailboxes[i].path, m->path) == 0)
            return;
    /* bounded by smtpd_recipient_limit times KT_RESOLVE_MAX_MAILBOXES */
    if ((t->n_mailboxes & 7) == 0)
        t->mailboxes = kt_realloc(t->mailboxes, (t->n_mailboxes + 8) * sizeof(*t->mailboxes));
    t->mailboxes[t->n_mailboxes++] = *m;
}

/* An accepted recipient's alias targets left out, kept for the log line at the message's acceptance. */
static void keep_skip_note(struct kt_smtpd_txn *t, const struct kt_resolve_result *res, const char *addr)
{
    char note[1024];
    if (kt_resolve_skipped_note(res, addr, note, sizeof(note)))
        kt_buf_append(&t->skip_notes, note, strlen(note) + 1);
}

static int rcpt_already(const struct kt_smtpd_txn *t, const char *addr)
{
    const char *p = t->rcpts.data;
    for (unsigned i = 0; i < t->n_rcpts; i++) {
        if (strcasecmp(p, addr) == 0)
            return 1;
        p += strlen(p) + 1;
    }
    return 0;
}

/* Like Postfix's smtpd, which opens the queue file at the first accepted
 * recipient: the message's "client=" line (what pflogsumm counts as
 * received) is logged then, and rejections before it say NOQUEUE. */
static void rcpt_accepted(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    s->counts.rcpt_ok++;
    s->milter_mark = s->out.len;
    if (!t->client_logged) {
        t->client_logged = 1;
        if (s->sasl_username[0])
            kt_info("%s: client=%s[%s], sasl_method=%s, sasl_username=%s", t->queue_id, client_name(s), s->addr,
                    s->sasl_method, s->sasl_username);
        else
            kt_info("%s: client=%s[%s]", t->queue_id, client_name(s), s->addr);
    }
    reply(s, "250 2.1.5 Ok");
    milter_after(s, KT_MS_RCPT);
}

static void rcpt_reject(struct kt_session *s, const char *why, const char *rcpt)
{
    struct kt_smtpd_txn *t = s->txn;
    kt_info("%s: reject: RCPT from %s[%s]: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
            t->client_logged ? t->queue_id : "NOQUEUE", client_name(s), s->addr, why, t->sender, rcpt,
            protocol_name(s), s->helo);
    kt_metric_inc(KT_M_REJECT_RCPT);
    reply(s, "%s", why);
}

/* ---- relay hand-over ----
 * A recipient the restrictions allow to relay (class relay or default) is
 * kept in txn->relay_rcpts (and in txn->rcpts with the others). A transaction
 * with such a recipient is written, for all its recipients, into the queue
 * (queue.h) instead of the Maildirs: the commit makes the queue file durable
 * before the single 250, and the queue manager then delivers the local
 * recipients to their Maildirs and relays the others. */
#define RELAY_ENVELOPE_MAX (KT_DELIVERY_CHUNK / 2)

/* The message goes into the queue, not straight into the Maildirs: some recipient is relayed, or asked for
 * a success notice (NOTIFY=SUCCESS), which the queue manager sends once it delivered, or there are several
 * recipients (a copy each, with its own Delivered-To:), or a recipient did not resolve after address
 * rewriting (the queue manager bounces or retries it), or a content filter applies (content_filter, an
 * access table's FILTER). */
static int via_queue(const struct kt_smtpd_txn *t)
{
    return t->n_relay_rcpts || t->want_success || t->n_rcpts > 1 || t->queue_all || t->filter[0];
}

/* What a recipient's NOTIFY and ORCPT add to the queue envelope ("notify ...\n", "orcpt ...\n"). */
static size_t rcpt_dsn_bytes(const struct kt_rcpt_params *p)
{
    return (p->has_notify ? 40 : 0) + (p->has_orcpt ? p->orcpt_len + 8 : 0);
}

/* 1 when one more recipient of addr_len bytes (orig_len before rewriting) with p's DSN parameters keeps
 * the queue envelope within what is buffered in memory until the queue file exists. */
static int envelope_room(const struct kt_smtpd_txn *t, size_t addr_len, size_t orig_len, const struct kt_rcpt_params *p)
{
    /* "orig_rcpt " lines: at most one per recipient */
    return kt_buf_used(&t->rcpts) + addr_len + 1 + 6 * ((size_t)t->n_rcpts + 1) + t->dsn_bytes +
           rcpt_dsn_bytes(p) + kt_buf_used(&t->orig_rcpts) + orig_len + 12 * ((size_t)t->n_rcpts + 1)
           <= RELAY_ENVELOPE_MAX;
}

/* NOTIFY and ORCPT of the recipient just added to t->rcpts (RFC 3461), kept for the queue envelope. */
static void rcpt_dsn_keep(struct kt_smtpd_txn *t, const struct kt_rcpt_params *p)
{
    unsigned i = t->n_rcpts - 1;
    if (!p->has_notify && !p->has_orcpt && !t->rcpt_notify)
        return;
    if (i >= t->rcpt_dsn_cap) {
        size_t cap = t->rcpt_dsn_cap ? t->rcpt_dsn_cap : 16;
        while (cap <= i)
            cap *= 2;
        t->rcpt_notify = kt_realloc(t->rcpt_notify, cap * sizeof(*t->rcpt_notify));
        t->rcpt_orcpt = kt_realloc(t->rcpt_orcpt, cap * sizeof(*t->rcpt_orcpt));
        for (size_t k = t->rcpt_dsn_cap; k < cap; k++) {
            t->rcpt_notify[k] = 0;
            t->rcpt_orcpt[k] = NULL;
        }
        t->rcpt_dsn_cap = cap;
    }
    t->rcpt_notify[i] = (p->notify & KT_NOTIFY_NEVER ? KT_QNOTIFY_NEVER : 0) |
                        (p->notify & KT_NOTIFY_SUCCESS ? KT_QNOTIFY_SUCCESS : 0) |
                        (p->notify & KT_NOTIFY_FAILURE ? KT_QNOTIFY_FAILURE : 0) |
                        (p->notify & KT_NOTIFY_DELAY ? KT_QNOTIFY_DELAY : 0);
    t->rcpt_orcpt[i] = p->has_orcpt ? kt_strndup(p->orcpt, p->orcpt_len) : NULL;
    t->dsn_bytes += rcpt_dsn_bytes(p);
    if (p->notify & KT_NOTIFY_SUCCESS)
        t->want_success = 1;
}

/* A recipient into the envelope: addr as rewritten, orig as the client gave it (for orig_rcpt), with its
 * DSN parameters. */
static void rcpt_keep(struct kt_smtpd_txn *t, const char *addr, const char *orig, const struct kt_rcpt_params *p)
{
    kt_buf_append(&t->rcpts, addr, strlen(addr) + 1);
    kt_buf_append(&t->orig_rcpts, orig, strlen(orig) + 1);
    t->n_rcpts++;
    rcpt_dsn_keep(t, p);
}

static int relay_accept(struct kt_smtpd_txn *t, const char *addr, const char *orig, const struct kt_rcpt_params *p)
{
    size_t n = strlen(addr) + 1;
    /* the queue envelope is buffered in memory until the queue file exists */
    if (!envelope_room(t, n - 1, strlen(orig), p))
        return -1;
    kt_buf_append(&t->relay_rcpts, addr, n);
    t->n_relay_rcpts++;
    rcpt_keep(t, addr, orig, p);
    return 0;
}

/* Postfix: the first smtpd_recipient_overshoot_limit excess recipients of a
 * transaction are not errors, so a client sending a long list in one
 * pipelined group keeps its session (and the recipients accepted so far). */
static void too_many_recipients(struct kt_session *s)
{
    if (s->txn->rcpt_overshoot++ < s->cfg->recipient_overshoot_limit)
        kt_buf_printf(&s->out, "452 4.5.3 Error: too many recipients\r\n");
    else
        reply(s, "452 4.5.3 Error: too many recipients");
}

static void resume_commands(struct kt_session *s)
{
    session_process(s);
}

/* A recipient that address rewriting left alone: local and virtual ones must resolve to Maildirs here
 * (unknown users are refused), others are relayed (the restrictions allowed it). 1 when accepted. */
static int rcpt_single(struct kt_session *s, struct kt_smtp_path *path, const struct kt_resolved_addr *ra,
                       const char *addr, const char *orig, const struct kt_rcpt_params *p)
{
    struct kt_smtpd_txn *t = s->txn;
    struct kt_resolve_result res;
    if (ra->cls != KT_CLASS_LOCAL && ra->cls != KT_CLASS_VIRTUAL && ra->cls != KT_CLASS_ALIAS) {
        if (!rcpt_already(t, addr) && relay_accept(t, addr, orig, p) < 0) {
            too_many_recipients(s);
            return 0;
        }
        rcpt_accepted(s);
        return 1;
    }
    if (ra->rewritten)
        memcpy(path->addr, ra->addr, strlen(ra->addr) + 1);
    path->addr_len = strlen(path->addr);
    /* another transport delivers it (virtual_transport = lmtp:..., transport_maps): the message goes
     * through the queue, like relayed mail, and no Maildir is written here; the address is passed on
     * as it is, so only whether the recipient exists matters */
    int queued = ra->cls != KT_CLASS_ALIAS && kt_transport_queued(s->cfg->transport, path->addr, ra->cls);
    if (queued && ra->cls == KT_CLASS_VIRTUAL) {
        /* Postfix: virtual_mailbox_maps lists who exists; the value is virtual(8)'s, unused here */
        if (!kt_resolve_virtual_listed(s->cfg->resolver, path->addr)) {
            char msg[700];
            snprintf(msg, sizeof(msg), "550 5.1.1 <%s>: Recipient address rejected: User unknown in virtual "
                     "mailbox table", path->addr);
            rcpt_reject(s, msg, path->addr);
            return 0;
        }
    } else {
        kt_resolve_recipient(s->cfg->resolver, path->addr, &res);
        if (res.reply) {
            rcpt_reject(s, res.reply, path->addr);
            return 0;
        }
    }
    if (queued) {
        if (!rcpt_already(t, path->addr) && relay_accept(t, path->addr, orig, p) < 0) {
            too_many_recipients(s);
            return 0;
        }
        rcpt_accepted(s);
        return 1;
    }
    if (res.n_mailboxes == 0 || res.n_forward > 0) {
        /* Postfix's local(8) forwards a local alias's remote targets; ktrelay does not (virtual_alias_maps
         * does), and delivering only the local part would drop the rest unseen */
        char msg[700];
        snprintf(msg, sizeof(msg), "550 5.1.1 <%s>: Recipient address rejected: alias forwards to remote "
                 "addresses, which this server does not relay", path->addr);
        rcpt_reject(s, msg, path->addr);
        return 0;
    }
    if (rcpt_already(t, path->addr)) {
        rcpt_accepted(s);
        return 1;
    }
    if ((p->has_notify || p->has_orcpt || via_queue(t)) && !envelope_room(t, path->addr_len, strlen(orig), p)) {
        too_many_recipients(s);
        return 0;
    }
    keep_skip_note(t, &res, path->addr);
    for (size_t i = 0; i < res.n_mailboxes; i++)
        add_mailbox(t, &res.mailboxes[i]);
    rcpt_keep(t, path->addr, orig, p);
    rcpt_accepted(s);
    return 1;
}

/* A recipient that canonical or virtual alias maps rewrote (into one address or several): it is accepted,
 * as Postfix's smtpd accepts an address that virtual_alias_maps know, and each result is delivered by its
 * own class, with the recipient's DSN parameters. Local and virtual results that resolve go straight into
 * their Maildirs; the others (remote ones, and results that do not resolve, which the queue manager then
 * bounces or retries as Postfix would after accepting them) send the message through the queue. 1 when
 * accepted. */
static int rcpt_expanded(struct kt_session *s, const struct kt_rewrite_result *rr, const char *orig,
                         const struct kt_rcpt_params *p)
{
    struct kt_smtpd_txn *t = s->txn;
    struct kt_resolve_result res;
    for (size_t i = 0; i < rr->n; i++) {
        const char *a = rr->addrs[i];
        if (rcpt_already(t, a))
            continue;
        const char *at = strrchr(a, '@');
        enum kt_addr_class cls = kt_resolve_class(s->cfg->resolver, at ? at + 1 : NULL);
        /* remote, or delivered by another transport (lmtp:, transport_maps): through the queue */
        if ((cls != KT_CLASS_LOCAL && cls != KT_CLASS_VIRTUAL && cls != KT_CLASS_ALIAS)
            || (cls != KT_CLASS_ALIAS && kt_transport_queued(s->cfg->transport, a, cls))) {
            if (relay_accept(t, a, orig, p) < 0) {
                too_many_recipients(s);
                return 0;
            }
            continue;
        }
        if (!envelope_room(t, strlen(a), strlen(orig), p)) {
            too_many_recipients(s);
            return 0;
        }
        res.reply = "";
        res.n_mailboxes = 0;
        if (cls != KT_CLASS_ALIAS)   /* an alias domain address that expanded to itself: bounced */
            kt_resolve_recipient(s->cfg->resolver, a, &res);
        if (!res.reply && res.n_mailboxes > 0 && res.n_forward == 0) {
            keep_skip_note(t, &res, a);
            for (size_t k = 0; k < res.n_mailboxes; k++)
                add_mailbox(t, &res.mailboxes[k]);
        } else {
            t->queue_all = 1;
        }
        rcpt_keep(t, a, orig, p);
    }
    rcpt_accepted(s);
    return 1;
}

static void cmd_rcpt(struct kt_session *s, const struct kt_smtp_command *c)
{
    struct kt_smtp_path path;
    struct kt_rcpt_params p;
    struct kt_smtpd_txn *t = s->txn;   /* the command table guarantees one */
    char filter[KT_FILTER_MAX] = "";

    if (!s->cmd_replay && rate_exceeded(s, KT_ANVIL_RCPT, s->cfg->rcpt_rate_limit, "Recipient address")) {
        reply(s, "450 4.7.1 Error: too many recipients from %s", s->addr);
        return;
    }
    const char *err = kt_smtp_parse_rcpt(c->arg, c->arg_len, &path, &p);
    if (err) {
        reply(s, "%s", err);
        return;
    }
    if ((p.has_notify || p.has_orcpt) && (s->cfg->ehlo_discard & KT_EHLO_DSN)) {
        reply(s, "501 5.7.1 DSN support is disabled");
        return;
    }
    if (s->milters) {   /* what a milter's refusal of this recipient puts back */
        snprintf(s->mstate->rcpt, sizeof(s->mstate->rcpt), "%s", path.addr);
        milter_params_of(s, c);
        s->mstate->undo_rcpts = t->rcpts.len;
        s->mstate->undo_relay = t->relay_rcpts.len;
        s->mstate->undo_n_rcpts = t->n_rcpts;
        s->mstate->undo_n_relay = t->n_relay_rcpts;
        s->mstate->undo_n_mailboxes = t->n_mailboxes;
        s->mstate->undo_dsn_bytes = t->dsn_bytes;
        s->mstate->undo_want_success = t->want_success;
        s->mstate->undo_skip_notes = t->skip_notes.len;
        s->mstate->undo_queue_all = t->queue_all;
    }
    if (t->n_rcpts >= s->cfg->recipient_limit) {
        too_many_recipients(s);
        return;
    }
    /* RFC 5321 4.5.1 (and Postfix's smtpd_check_rcpt): <postmaster> without a domain is always accepted,
     * whatever the restrictions; it is completed like any other bare local part */
    int bare_postmaster = strcasecmp(path.addr, "postmaster") == 0;
    struct kt_policy_request pr = {
        .client_addr = s->addr,
        .helo = s->helo,
        .sender = t->sender,
        .recipient = path.addr,
        .recipient_had_route = path.had_route,
        .sasl_username = s->sasl_username[0] ? s->sasl_username : NULL,
        .ccert_trusted = s->tls_on && s->ccert == KT_CCERT_TRUSTED,
        .ccert_fp = s->tls_on && s->ccert_fps ? s->ccert_fps->cert : NULL,
        .ccert_pkey_fp = s->tls_on && s->ccert_fps ? s->ccert_fps->pkey : NULL,
        .esmtp = s->esmtp,
        .pipelined = s->cmd_pipelined,
        .client_name = s->client_name,
        .client_name_status = s->client_name_status,
        .reverse_name = s->reverse_name,
        .reverse_name_status = s->reverse_name_status,
        .filter = filter,
    };
    struct kt_resolved_addr ra;
    struct kt_dns_needs needs;
    char why[700];
    int prc = 0;
    if (bare_postmaster) {
        kt_addr_resolve(s->cfg->resolver, kt_policy_addr_flags(s->cfg->policy), path.addr, 0, &ra);
    } else {
        for (;;) {
            needs.n = 0;
            /* after two rounds of fetching, a missing answer is a failed lookup */
            pr.needs = s->dns_rounds < 2 ? &needs : NULL;
            pr.answers = s->dns_answers;
            pr.n_answers = s->n_dns_answers;
            prc = kt_policy_check_rcpt(s->cfg->policy, &pr, &ra, why, sizeof(why));
            if (prc != KT_POLICY_NEED_DNS)
                break;
            if (dns_wait(s, &needs, resume_commands))
                return;   /* the command runs again once the answers are in */
        }
    }
    if (prc) {
        rcpt_reject(s, why, path.addr);
        return;
    }
    /* the address trivial-rewrite made of it, then cleanup's canonical and virtual alias rewriting */
    const char *addr0 = ra.cls != KT_CLASS_LOCAL && ra.cls != KT_CLASS_VIRTUAL ? ra.addr
                        : ra.rewritten ? ra.addr : path.addr;
    struct kt_rewrite_result rr = { 0 };
    int rrc = 0;
    if (!(s->cfg->receive_override & KT_RO_NO_ADDRESS_MAPPINGS) && kt_rewrite_active(s->cfg->rewrite))
        rrc = kt_rewrite_recipient(s->cfg->rewrite, t->client_logged ? t->queue_id : "NOQUEUE", addr0, &rr);
    if (rrc < 0) {
        char msg[700];
        snprintf(msg, sizeof(msg), "451 4.3.0 <%s>: Temporary lookup failure", path.addr);
        rcpt_reject(s, msg, path.addr);
        return;
    }
    if (rr.n == 0) {
        rr.addrs = kt_calloc(1, sizeof(*rr.addrs));
        rr.addrs[rr.n++] = kt_strdup(addr0);
    }
    int rewritten = rr.aliased || rr.n != 1 || strcmp(rr.addrs[0], addr0) != 0;
    int accepted = rewritten ? rcpt_expanded(s, &rr, addr0, &p) : rcpt_single(s, &path, &ra, rr.addrs[0], addr0, &p);
    kt_rewrite_result_free(&rr);
    /* an access table's FILTER counts once the recipient is accepted; the whole message goes there */
    if (accepted && filter[0] && strcmp(filter, t->filter) != 0) {
        kt_info("%s: filter: RCPT from %s[%s]: <%s>: triggers FILTER %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                t->queue_id, client_name(s), s->addr, path.addr, filter, t->sender, path.addr, protocol_name(s),
                s->helo);
        memcpy(t->filter, filter, sizeof(t->filter));
    }
}

/* ---- message body: DATA and BDAT ---- */

static double elapsed_since(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* The reply for a failed queue or mailbox write: a full disk or quota is "insufficient system storage"
 * (RFC 3463 4.3.1, Postfix's 452), anything else a local error in processing. */
static void reply_write_error(struct kt_session *s, int err)
{
    if (err == -ENOSPC || err == -EDQUOT)
        reply(s, "452 4.3.1 Error: insufficient system storage");
    else
        reply(s, "451 4.3.0 Error: queue file write error");
}

/* The message is accepted (stored, or dropped by a DISCARD): counted, and 250 with its queue id. */
static void accept_message(struct kt_session *s)
{
    if (s->state == KT_SS_BDAT)
        s->counts.bdat_ok++;
    else
        s->counts.data_ok++;
    reply(s, "250 2.0.0 Ok: queued as %s", s->txn->queue_id);
    /* Postfix forgives a client's earlier errors and junk commands once a message is received */
    s->errors = 0;
    s->junk_cmds = 0;
}

/* After the reply to the end of a message: the next transaction starts, and pipelined commands run. */
static void transaction_done(struct kt_session *s)
{
    transaction_reset(s);
    if (s->state != KT_SS_CLOSING)
        session_enter_state(s, KT_SS_COMMAND);
    session_touch(s);
    session_process(s);
}

static void on_commit(void *arg, int res)
{
    struct kt_session *s = arg;
    struct kt_smtpd_txn *t = s->txn;
    s->wait = KT_WAIT_NONE;
    if (res < 0) {
        kt_err("%s: delivery failed: %s", t->queue_id, strerror(-res));
        reply_write_error(s, res);
    } else {
        const char *r = t->rcpts.data;
        double delay = elapsed_since(&t->t_start);
        /* Postfix's division of labour in the log: cleanup reports the
         * message, qmgr its envelope, local/virtual each delivery. */
        kt_info_as("cleanup", "%s: message-id=%s", t->queue_id,
                   t->hdrscan.message_id[0] ? t->hdrscan.message_id : "<>");
        const char *redirect = t->cleanup ? kt_cleanup_redirect(t->cleanup) : NULL;
        const char *filter = t->cleanup ? kt_cleanup_filter(t->cleanup) : NULL;
        int hold = (t->cleanup && kt_cleanup_hold(t->cleanup)) || t->milter_hold;   /* milters' quarantine too */
        int in_hold = hold || redirect || filter;   /* committed into hold/ (checks_end) */
        if (in_hold && (redirect || filter)) {
            int rc = kt_queue_rewrite_held(s->rt->queue_directory, t->queue_id, redirect, filter, hold);
            if (rc < 0)
                kt_err("%s: cannot apply %s%s%s to the queued message: %s; it stays on hold", t->queue_id,
                       redirect ? "REDIRECT" : "", redirect && filter ? " and " : "", filter ? "FILTER" : "",
                       strerror(-rc));
            else if (!hold)
                in_hold = 0;   /* in new/ now, and the queue manager was told */
        }
        if (!in_hold)
            kt_info_as("qmgr", "%s: from=<%s>, size=%llu, nrcpt=%u (queue active)", t->queue_id, t->sender_full,
                       kt_delivery_size(t->delivery), redirect && !in_hold ? 1 : t->n_rcpts);
        kt_metric_inc(KT_M_MESSAGES_RECEIVED);
        if (s->tls_on)
            kt_metric_add(kt_conn_ktls(s->conn) & KT_CONN_KTLS_RX ? KT_M_TLS_BYTES_RX_KTLS : KT_M_TLS_BYTES_RX_USER,
                          (long long)t->msg_bytes);
        if (t->queued && !redirect && !filter && !hold)
            kt_qmgr_submit(t->delivery);
        const char *o = t->orig_rcpts.data;
        for (unsigned i = 0; i < t->n_rcpts && !t->queued; i++) {
            const char *at = strrchr(r, '@');
            int virt = s->cfg->resolver && kt_resolve_class(s->cfg->resolver, at ? at + 1 : "") == KT_CLASS_VIRTUAL;
            char orig_to[600] = "";
            if (strcmp(o, r) != 0)
                snprintf(orig_to, sizeof(orig_to), ", orig_to=<%s>", o);
            kt_info_as(virt ? "virtual" : "local",
                       "%s: to=<%s>%s, relay=%s, delay=%.2f, dsn=2.0.0, status=sent "
                       "(delivered to maildir as %s)", t->queue_id, r, orig_to, virt ? "virtual" : "local", delay,
                       kt_delivery_name(t->delivery));
            kt_metric_inc(KT_M_DELIVERY_SENT);
            kt_metric_observe(KT_H_DELIVERY, delay);
            r += strlen(r) + 1;
            o += strlen(o) + 1;
        }
        if (!t->queued) {
            /* delivered here: what alias expansion left out is logged with the deliveries (from the queue,
             * the queue manager logs it when it delivers) */
            for (size_t off = t->skip_notes.off; off < t->skip_notes.len; off += strlen(t->skip_notes.data + off) + 1)
                kt_warn("%s: %s", t->queue_id, t->skip_notes.data + off);
            kt_info_as("qmgr", "%s: removed", t->queue_id);
        }
        accept_message(s);
    }
    transaction_done(s);
}

static void commit_message(struct kt_session *s)
{
    s->wait = KT_WAIT_COMMIT;
    kt_delivery_commit(s->txn->delivery, on_commit, s);
}

static void on_drained(void *arg, int res)
{
    struct kt_session *s = arg;
    if (s->wait != KT_WAIT_DRAIN)
        return;
    s->wait = KT_WAIT_NONE;
    session_process(s);
}

/* smtpd_forbid_bare_newline = reject, and the client is not in smtpd_forbid_bare_newline_exclusions.
 * Otherwise bare line ends are stored as CRLF (normalize). */
static int bare_newline_rejects(const struct kt_session *s)
{
    if (s->cfg->bare_newline != KT_BARE_NEWLINE_REJECT)
        return 0;
    return !(s->cfg->bare_newline_exclusions && kt_net_list_match(s->cfg->bare_newline_exclusions, s->addr) == 1);
}

static void bare_newline_reply(struct kt_session *s)
{
    const struct kt_smtpd_txn *t = s->txn;
    const char *what = t->dp.bare_lf ? "LF" : "CR";
    int code = s->cfg->bare_newline_reject_code;
    kt_info("%s: reject: bare <%s> in message body from %s[%s]", t->queue_id, what, client_name(s), s->addr);
    reply(s, "%d %d.5.2 Error: bare <%s> received", code, code / 100, what);
}

static void bare_newline_note(struct kt_session *s)
{
    const struct kt_smtpd_txn *t = s->txn;
    if (t->dp.bare_lf || t->dp.bare_cr)
        kt_info("%s: bare <%s> in message body from %s[%s] stored as <CR><LF>", t->queue_id,
                t->dp.bare_lf ? "LF" : "CR", client_name(s), s->addr);
}

static void on_spool_open(void *arg, int res)
{
    struct kt_session *s = arg;
    struct kt_smtpd_txn *t = s->txn;
    s->wait = KT_WAIT_NONE;
    if (res < 0) {
        kt_err("%s: cannot create spool file: %s", t->queue_id, strerror(-res));
        if (s->state == KT_SS_BDAT) {
            /* the chunk's bytes still have to be read and thrown away */
            bdat_fail(s, res == -ENOSPC || res == -EDQUOT ? "452 4.3.1 Error: insufficient system storage"
                                                          : "451 4.3.0 Error: queue file write error");
            kt_delivery_abandon(t->delivery);
            t->delivery = NULL;
        } else {
            reply_write_error(s, res);
            transaction_reset(s);
            session_enter_state(s, KT_SS_COMMAND);
        }
        session_process(s);
        return;
    }
    kt_delivery_set_drain_cb(t->delivery, on_drained, s);
    t->msg_off = kt_delivery_size(t->delivery);
    if (!t->queued)
        add_trace_headers(s);
    add_received_header(s);
    if (s->state == KT_SS_DATA) {
        session_touch(s);   /* the body is the next request */
        kt_data_parser_init(&t->dp);
        t->nl_reject = bare_newline_rejects(s);
        reply(s, "354 End data with <CR><LF>.<CR><LF>");
    }
    session_process(s);
}

static int cleanup_out(void *arg, const char *p, size_t n)
{
    return kt_delivery_append(arg, p, n);
}

static void start_spool(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    /* A check that can HOLD, REDIRECT or FILTER needs the message in the queue, whatever its recipients;
     * so does mail for several recipients (via_queue): each final delivery carries its own Delivered-To:,
     * which one file linked into several Maildirs cannot. */
    if (via_queue(t) || s->cfg->checks_need_queue) {
        const char **list = kt_calloc(t->n_rcpts, sizeof(*list));
        const char *r = t->rcpts.data, *o = t->orig_rcpts.data;
        unsigned *notify = kt_calloc(t->n_rcpts, sizeof(*notify));
        const char **orcpt = kt_calloc(t->n_rcpts, sizeof(*orcpt));
        const char **origs = kt_calloc(t->n_rcpts, sizeof(*origs));
        size_t n = 0;
        /* one delivery per recipient: the same address twice (any case) is one recipient, with the DSN
         * parameters (and the original address) it was first given */
        for (unsigned i = 0; i < t->n_rcpts; i++, r += strlen(r) + 1, o += strlen(o) + 1) {
            size_t k = 0;
            while (k < n && strcasecmp(list[k], r) != 0)
                k++;
            if (k < n)
                continue;
            list[n] = r;
            notify[n] = i < t->rcpt_dsn_cap ? t->rcpt_notify[i] : 0;
            orcpt[n] = i < t->rcpt_dsn_cap ? t->rcpt_orcpt[i] : NULL;
            origs[n] = o;
            n++;
        }
        struct kt_qprops props = {
            .smtputf8 = t->smtputf8, .body = (enum kt_qbody)t->body, .ret = (enum kt_qret)t->ret,
            .envid = t->envid[0] ? t->envid : NULL, .notify = t->rcpt_notify ? notify : NULL,
            .orcpt = t->rcpt_orcpt ? orcpt : NULL, .filter = t->filter, .orig_rcpt = origs,
        };
        /* envelope_room keeps the envelope small enough for this never to be NULL */
        t->delivery = kt_queue_delivery_new(&s->worker->loop, s->rt->queue_directory, t->sender_full, list, n,
                                            &props, s->cfg->myhostname, s->worker->id, t->queue_id);
        kt_free(notify);
        kt_free(orcpt);
        kt_free(list);
        kt_free(origs);
        t->queued = t->delivery != NULL;
    }
    if (!t->delivery) {
        t->delivery = kt_delivery_new(&s->worker->loop, t->mailboxes, t->n_mailboxes, s->cfg->myhostname,
                                      s->worker->id, t->queue_id);
        t->hdrscan.loop_rcpt = t->rcpts.data;   /* final delivery here: a Delivered-To: for it is a loop */
    }
    if (s->cfg->checks) {
        char client[600];
        snprintf(client, sizeof(client), "%s[%s]", client_name(s), s->addr);
        struct kt_cleanup_origin o = { .queue_id = t->queue_id, .client = client, .sender = t->sender_full,
                                       .rcpt = t->rcpts.data, .proto = protocol_name(s), .helo = s->helo };
        t->cleanup = kt_cleanup_new(s->cfg->checks, &o, cleanup_out, t->delivery);
    }
    s->wait = KT_WAIT_OPEN;
    kt_delivery_open(t->delivery, on_spool_open, s);
}

static void cmd_data(struct kt_session *s, const struct kt_smtp_command *c)
{
    if (c->arg_len) {
        reply(s, "501 5.5.4 Syntax: DATA");
        return;
    }
    if (s->txn->n_rcpts == 0) {
        reply(s, "554 5.5.1 Error: no valid recipients");
        return;
    }
    if (s->txn->delivery) {
        reply(s, "503 5.5.1 Error: DATA after BDAT");
        return;
    }
    session_enter_state(s, KT_SS_DATA);
    if (milter_after(s, KT_MS_DATA))
        return;   /* the spool opens once the milters said yes */
    start_spool(s);
}

/* End of the message for the header and body checks: REJECT and DISCARD are answered here (1: the
 * transaction is over); HOLD, REDIRECT and FILTER commit the queue file into hold/ (0: commit). */
static int checks_end(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    struct kt_cleanup *c = t->cleanup;
    if (!c)
        return 0;
    kt_cleanup_finish(c);
    switch (kt_cleanup_verdict(c)) {
    case KT_CLEANUP_REJECT:
        kt_metric_inc(KT_M_REJECT_DATA);
        session_enter_state(s, KT_SS_COMMAND);
        reply(s, "%s", kt_cleanup_reply(c));
        transaction_reset(s);
        return 1;
    case KT_CLEANUP_DISCARD:
        /* Postfix's answer: the client is told the message was taken (and its errors are forgiven), and it
         * goes nowhere */
        accept_message(s);
        session_enter_state(s, KT_SS_COMMAND);
        transaction_reset(s);
        return 1;
    case KT_CLEANUP_ACCEPT:
        break;
    }
    if (kt_cleanup_hold(c) || kt_cleanup_redirect(c) || kt_cleanup_filter(c)) {
        if (!t->queued) {
            /* the envelope was too large for a queue file: the action cannot be honoured */
            kt_err("%s: HOLD, REDIRECT or FILTER needs a queue file, which this envelope does not fit", t->queue_id);
            session_enter_state(s, KT_SS_COMMAND);
            reply(s, "451 4.3.0 Error: queue file write error");
            transaction_reset(s);
            return 1;
        }
        kt_delivery_set_new_dir(t->delivery, "hold");
    }
    return 0;
}

/* A message that already carries a Delivered-To: for its (one, final) recipient loops (Postfix's local(8)
 * and virtual(8) bounce it with 5.4.6); refused here, before anything is stored, so no bounce is needed. */
static int mail_loop(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    if (t->queued || !t->hdrscan.loop)
        return 0;
    kt_info("%s: reject: mail forwarding loop for %s from %s[%s]; from=<%s> to=<%s> proto=%s helo=<%s>", t->queue_id,
            t->rcpts.data, client_name(s), s->addr, t->sender_full, t->rcpts.data, protocol_name(s), s->helo);
    kt_metric_inc(KT_M_REJECT_DATA);
    session_enter_state(s, KT_SS_COMMAND);
    reply(s, "554 5.4.6 Error: mail forwarding loop for %s", t->rcpts.data);
    transaction_reset(s);
    return 1;
}

static void data_finish(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    if (t->nl_reject && (t->dp.bare_lf || t->dp.bare_cr)) {
        kt_metric_inc(KT_M_REJECT_DATA);
        session_enter_state(s, KT_SS_COMMAND);
        bare_newline_reply(s);
        transaction_reset(s);
        return;
    }
    if (t->msg_too_big) {
        kt_info("%s: reject: message size exceeds limit from %s[%s]", t->queue_id, client_name(s), s->addr);
        kt_metric_inc(KT_M_REJECT_DATA);
        session_enter_state(s, KT_SS_COMMAND);
        reply(s, "552 5.3.4 Error: message file too big");
        transaction_reset(s);
        return;
    }
    bare_newline_note(s);
    if (checks_end(s) || mail_loop(s))
        return;
    message_end(s);   /* the state stays DATA until the commit callback */
}

static int body_fits(const struct kt_session *s, unsigned long long more)
{
    long long limit = s->cfg->message_size_limit;
    return limit <= 0 || s->txn->msg_bytes + more <= (unsigned long long)limit;
}

/* Whether n canonical body bytes at p are to be stored, counting them if so. Nothing more is stored once
 * the message is sure to be refused. */
static int body_keep(struct kt_session *s, const char *p, size_t n)
{
    struct kt_smtpd_txn *t = s->txn;
    if (n == 0 || t->msg_too_big || (t->nl_reject && (t->dp.bare_lf || t->dp.bare_cr)))
        return 0;
    if (!body_fits(s, n)) {
        t->msg_too_big = 1;
        return 0;
    }
    t->msg_bytes += n;
    if (!t->hdrscan.done)
        kt_header_scan_feed(&t->hdrscan, p, n);
    return 1;
}

/* Canonical body bytes into the spool (DATA and BDAT); 1 when the writer is behind. */
static int body_store(struct kt_session *s, const char *p, size_t n)
{
    return body_keep(s, p, n) ? spool_append(s, p, n) : 0;
}

/* Body bytes through the line-ending rule (smtp_parse.h), in blocks, until the input is used up, the
 * end of data is reached or the writer is behind. `limit` bounds the input taken (BDAT: the chunk). */
static size_t body_feed(struct kt_session *s, size_t limit, int *behind)
{
    struct kt_smtpd_txn *t = s->txn;
    char out[2 * 8192 + 2];
    const char *head = kt_buf_head(&s->in);
    size_t used = 0;

    *behind = 0;
    while (used < limit && !t->dp.done && !*behind) {
        size_t out_len = 0, take = limit - used;
        if (!t->cleanup && t->delivery && !t->msg_too_big) {
            /* straight into the spool buffer: the bytes are kept only if body_keep says so */
            size_t room;
            char *dst = kt_delivery_space(t->delivery, BODY_SPACE_MIN, &room);
            used += kt_data_parse(&t->dp, head + used, take, dst, room, &out_len);
            if (body_keep(s, dst, out_len))
                *behind = kt_delivery_fill(t->delivery, out_len);
            continue;
        }
        if (take > 8192)
            take = 8192;
        used += kt_data_parse(&t->dp, head + used, take, out, sizeof(out), &out_len);
        *behind = body_store(s, out, out_len);
    }
    kt_buf_consume(&s->in, used);
    body_progress(s, used);
    return used;
}

static void data_feed(struct kt_session *s)
{
    int behind;
    body_feed(s, kt_buf_used(&s->in), &behind);
    if (s->txn->dp.done)
        data_finish(s);
    else if (behind)
        s->wait = KT_WAIT_DRAIN;
}

/* A refused BDAT is answered only after its chunk has been read (RFC 3030).
 * Inside a transaction the refusal sticks: every later chunk gets the same
 * reply until the transaction ends (LAST, RSET, MAIL). */
static void bdat_fail(struct kt_session *s, const char *why)
{
    struct kt_smtpd_txn *t = s->txn;
    if (t && !t->bdat_failed) {
        snprintf(t->bdat_error, sizeof(t->bdat_error), "%s", why);
        t->bdat_failed = 1;
    }
    if (!s->bdat_refused) {
        kt_free(s->bdat_error);
        s->bdat_error = kt_strdup(t ? t->bdat_error : why);
    }
    s->bdat_refused = 1;
}

static void bdat_chunk_done(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    if (!s->bdat_refused && t && s->bdat_last) {
        char end[2];
        size_t n = kt_data_parse_end(&t->dp, end);
        if (body_store(s, end, n))
            s->wait = KT_WAIT_DRAIN;
    }
    if (!s->bdat_refused && t && !s->bdat_last && t->delivery && kt_delivery_error(t->delivery) < 0) {
        /* a write of this message already failed: say so now, not only at the last chunk */
        int err = kt_delivery_error(t->delivery);
        kt_err("%s: delivery failed: %s", t->queue_id, strerror(-err));
        bdat_fail(s, err == -ENOSPC || err == -EDQUOT ? "452 4.3.1 Error: insufficient system storage"
                                                      : "451 4.3.0 Error: queue file write error");
    }
    if (!s->bdat_refused && t && t->nl_reject && (t->dp.bare_lf || t->dp.bare_cr)) {
        char why[96];
        int code = s->cfg->bare_newline_reject_code;
        kt_info("%s: reject: bare <%s> in message body from %s[%s]", t->queue_id,
                t->dp.bare_lf ? "LF" : "CR", client_name(s), s->addr);
        snprintf(why, sizeof(why), "%d %d.5.2 Error: bare <%s> received", code, code / 100,
                 t->dp.bare_lf ? "LF" : "CR");
        bdat_fail(s, why);
    }
    if (s->bdat_refused) {
        session_enter_state(s, KT_SS_COMMAND);
        reply(s, "%s", s->bdat_error ? s->bdat_error : "554 5.5.1 Error: no valid recipients");
        if (s->bdat_last)
            transaction_reset(s);
        return;
    }
    if (s->bdat_last) {
        bare_newline_note(s);
        if (checks_end(s) || mail_loop(s))
            return;
        message_end(s);   /* the state stays BDAT until the commit callback */
        return;
    }
    session_enter_state(s, KT_SS_COMMAND);
    reply(s, "250 2.0.0 Ok: %llu bytes", s->txn->bdat_received);
}

/* Chunk bytes go through the same line-ending rule as DATA (in chunked mode: no dots, no end marker), so a
 * BDAT body is never stored with a bare CR or LF; that is why chunks are read, not spliced. */
static void bdat_feed(struct kt_session *s)
{
    size_t avail = kt_buf_used(&s->in);
    size_t take = avail < s->bdat_left ? avail : (size_t)s->bdat_left;
    if (take) {
        if (s->bdat_refused) {
            kt_buf_consume(&s->in, take);
        } else {
            int behind;
            take = body_feed(s, take, &behind);
            if (behind)
                s->wait = KT_WAIT_DRAIN;
            if (s->txn->msg_too_big)   /* the rest of the chunk is only read and dropped */
                bdat_fail(s, "552 5.3.4 Error: message file too big");
        }
        s->bdat_left -= take;
    }
    if (s->bdat_left == 0)
        bdat_chunk_done(s);
}

static void bdat_start(struct kt_session *s, const struct kt_smtp_command *c, const char *refusal)
{
    unsigned long long size;
    int last;

    const char *err = kt_smtp_parse_bdat(c->arg, c->arg_len, &size, &last);
    if (err) {
        /* without a valid size the chunk cannot be skipped: the session cannot continue */
        reply(s, "%s", err);
        reply(s, "421 4.5.0 %s Error: cannot resynchronize after bad BDAT", s->cfg->myhostname);
        session_enter_state(s, KT_SS_CLOSING);
        return;
    }
    session_enter_state(s, KT_SS_BDAT);
    s->bdat_left = size;
    s->bdat_last = last;
    s->bdat_refused = 0;
    kt_free(s->bdat_error);
    s->bdat_error = NULL;
    if (refusal)
        bdat_fail(s, refusal);
    else if (s->txn->bdat_failed)
        bdat_fail(s, s->txn->bdat_error);
    else if (s->txn->n_rcpts == 0)
        bdat_fail(s, "554 5.5.1 Error: no valid recipients");
    if (!s->bdat_refused) {
        s->txn->bdat_received += size;
        if (s->txn->delivery == NULL) {
            kt_data_parser_init_chunked(&s->txn->dp);   /* the rule's state runs across the message's chunks */
            s->txn->nl_reject = bare_newline_rejects(s);
            start_spool(s);
        }
    }
}

/* ---- milters (smtpd_milters) ----
 * Each SMTP event goes to the milters (milter/milter.h) once ktrelay itself
 * has accepted it, as in Postfix: HELO, MAIL and RCPT after their 250 was
 * queued (held back until the milters answered: a refusal replaces it), DATA
 * before its 354, the end of the message after the body is spooled and
 * before the commit. A milter that edits the message gets it rewritten into
 * a new spool file (or queue file, when the envelope changed or the message
 * is quarantined); the 250 still waits for the fsync. */

/* Postfix's check_milter_reply log line: "ID: milter-reject: RCPT from name[addr]: reply; from=<> ..." */
static void milter_log(struct kt_session *s, const char *action, const char *where, const char *text)
{
    const struct kt_smtpd_txn *t = s->txn;
    char whatsup[1400] = "";
    int n = 0;
    if (t)
        n = snprintf(whatsup, sizeof(whatsup), " from=<%s>", t->sender_full);
    if (t && n >= 0 && (size_t)n < sizeof(whatsup)) {
        const char *to = s->milter_stage == KT_MS_RCPT ? s->mstate->rcpt : t->n_rcpts ? t->rcpts.data : NULL;
        if (to)
            n += snprintf(whatsup + n, sizeof(whatsup) - (size_t)n, " to=<%s>", to);
    }
    if (n >= 0 && (size_t)n < sizeof(whatsup))
        snprintf(whatsup + n, sizeof(whatsup) - (size_t)n, " proto=%s helo=<%s>", protocol_name(s), s->helo);
    const char *id = t && (t->client_logged || s->milter_stage == KT_MS_EOD) ? t->queue_id : "NOQUEUE";
    kt_info("%s: %s: %s from %s[%s]: %s;%s", id, action, where, client_name(s), s->addr, text, whatsup);
}

static const char *milter_where(int stage)
{
    switch (stage) {
    case KT_MS_CONNECT: return "CONNECT";
    case KT_MS_HELO: return "HELO";
    case KT_MS_MAIL: return "MAIL";
    case KT_MS_RCPT: return "RCPT";
    case KT_MS_DATA: return "DATA";
    case KT_MS_UNKNOWN: return "UNKNOWN";
    }
    return "END-OF-MESSAGE";
}

/* "<path>" and the ESMTP parameters, for MAIL and RCPT events. */
static size_t milter_args(const char *path, char *params, const char **args, size_t max)
{
    size_t n = 0;
    args[n++] = path;
    char *save = NULL;
    for (char *w = strtok_r(params, " ", &save); w && n < max; w = strtok_r(NULL, " ", &save))
        args[n++] = w;
    return n;
}

/* Sends the event of stage to the milters and waits for their answer (returns 1), or returns 0 without
 * milters. */
static int milter_after(struct kt_session *s, int stage)
{
    if (!s->milters)
        return 0;
    struct kt_smtpd_txn *t = s->txn;
    char path[540];
    const char *args[32];
    s->milter_stage = stage;
    s->wait = KT_WAIT_MILTER;
    switch (stage) {
    case KT_MS_HELO:
        kt_milters_helo(s->milters, s->helo, on_milter_event, s);
        break;
    case KT_MS_MAIL:
        snprintf(path, sizeof(path), "<%s>", t->sender);
        kt_milters_mail(s->milters, args, milter_args(path, s->mstate->params, args, 32), on_milter_event, s);
        break;
    case KT_MS_RCPT:
        snprintf(path, sizeof(path), "<%s>", s->mstate->rcpt);
        kt_milters_rcpt(s->milters, args, milter_args(path, s->mstate->params, args, 32), on_milter_event, s);
        break;
    case KT_MS_UNKNOWN:
        kt_milters_unknown(s->milters, s->mstate->params, on_milter_event, s);
        break;
    default:
        kt_milters_data(s->milters, on_milter_event, s);
        break;
    }
    return 1;
}

/* A milter refused what ktrelay had accepted: its reply replaces ours, and the command is undone. */
static void milter_refused(struct kt_session *s, const struct kt_milter_result *r)
{
    struct kt_smtpd_txn *t = s->txn;
    milter_log(s, "milter-reject", milter_where(s->milter_stage), r->reply);
    if (s->milter_stage == KT_MS_MAIL || s->milter_stage == KT_MS_RCPT || s->milter_stage == KT_MS_HELO)
        s->out.len = s->milter_mark;   /* the 250 not yet sent */
    if (s->milter_stage == KT_MS_MAIL) {
        s->counts.mail_ok--;
        transaction_reset(s);
    } else if (s->milter_stage == KT_MS_RCPT && t) {
        s->counts.rcpt_ok--;
        t->rcpts.len = s->mstate->undo_rcpts;
        t->relay_rcpts.len = s->mstate->undo_relay;
        t->n_rcpts = s->mstate->undo_n_rcpts;
        t->n_relay_rcpts = s->mstate->undo_n_relay;
        t->n_mailboxes = s->mstate->undo_n_mailboxes;
        for (size_t i = s->mstate->undo_n_rcpts; i < t->rcpt_dsn_cap; i++) {   /* its NOTIFY and ORCPT */
            kt_free(t->rcpt_orcpt[i]);
            t->rcpt_orcpt[i] = NULL;
            t->rcpt_notify[i] = 0;
        }
        t->dsn_bytes = s->mstate->undo_dsn_bytes;
        t->want_success = s->mstate->undo_want_success;
        t->skip_notes.len = s->mstate->undo_skip_notes;
        t->queue_all = s->mstate->undo_queue_all;
    } else if (s->milter_stage == KT_MS_DATA) {
        session_enter_state(s, KT_SS_COMMAND);
    }
    reply(s, "%s", r->reply);
    if (r->verdict == KT_MILTER_SHUTDOWN)
        session_enter_state(s, KT_SS_CLOSING);
}

static void on_milter_event(void *arg, const struct kt_milter_result *r)
{
    struct kt_session *s = arg;
    s->wait = KT_WAIT_NONE;
    if (s->dead) {
        kt_session_maybe_free(s);
        return;
    }
    if (s->milter_stage == KT_MS_CONNECT) {
        if (r->verdict == KT_MILTER_SHUTDOWN || (r->verdict == KT_MILTER_REJECT && r->reply[0] == '5')) {
            s->milter_greeting = r->verdict == KT_MILTER_SHUTDOWN ? 421 : 554;
            milter_log(s, "milter-reject", "CONNECT", r->reply);
        }
        session_welcome(s);
        return;
    }
    if (r->verdict == KT_MILTER_REJECT || r->verdict == KT_MILTER_SHUTDOWN) {
        /* HELO is refused only by a 421 (Postfix): other refusals answer MAIL and later commands */
        if (s->milter_stage != KT_MS_HELO || r->verdict == KT_MILTER_SHUTDOWN)
            milter_refused(s, r);
        session_process(s);
        return;
    }
    if (s->txn && r->verdict == KT_MILTER_DISCARD && !s->txn->milter_discard) {
        s->txn->milter_discard = 1;
        milter_log(s, "milter-discard", milter_where(s->milter_stage), "milter triggers DISCARD action");
    }
    if (s->txn && r->hold && !s->txn->milter_hold) {
        s->txn->milter_hold = 1;
        milter_log(s, "milter-hold", milter_where(s->milter_stage),
                   r->hold_reason[0] ? r->hold_reason : "milter triggers HOLD action");
    }
    if (s->milter_stage == KT_MS_DATA) {
        start_spool(s);
        return;
    }
    if (s->milter_stage == KT_MS_UNKNOWN)
        reply(s, "502 5.5.2 Error: command not recognized");
    session_process(s);
}

/* The end of the message is refused (a milter, or an envelope the milters left empty). */
static void on_milter_eom_refuse(struct kt_session *s, const char *why, int shutdown)
{
    s->wait = KT_WAIT_NONE;
    kt_metric_inc(KT_M_REJECT_DATA);
    transaction_reset(s);
    session_enter_state(s, shutdown ? KT_SS_CLOSING : KT_SS_COMMAND);
    reply(s, "%s", why);
    session_touch(s);
    session_process(s);
}

/* The message is accepted and dropped (a milter's DISCARD): 250, nothing stored. */
static void milter_discarded(struct kt_session *s)
{
    s->wait = KT_WAIT_NONE;
    accept_message(s);
    transaction_done(s);
}

static void on_milter_written(void *arg, int res)
{
    struct kt_session *s = arg;
    struct kt_smtpd_txn *t = s->txn;
    if (res < 0)
        kt_delivery_fail(t->delivery, res);
    kt_delivery_set_drain_cb(t->delivery, on_drained, s);
    commit_message(s);   /* reports a failed write too */
}

static void on_milter_reopened(void *arg, int res)
{
    struct kt_session *s = arg;
    if (res < 0) {
        on_commit(s, res);
        return;
    }
    kt_milters_write(s->milters, s->txn->delivery, s->milter_keep_fixed, on_milter_written, s);
}

/* The milters changed the message, its envelope or want it held: the edited message goes into a new
 * file (the old one is dropped; nothing of either is visible before the commit). A changed envelope or a
 * hold goes to the queue, whose manager resolves the recipients; otherwise the same Maildirs. */
static void milter_rewrite(struct kt_session *s, int envelope_edited)
{
    struct kt_smtpd_txn *t = s->txn;
    int was_queued = t->queued;
    if (envelope_edited) {
        const char *const *rl;
        size_t n = kt_milters_rcpts(s->milters, &rl);
        if (n == 0) {
            milter_log(s, "milter-reject", "END-OF-MESSAGE", "554 5.5.1 Error: no valid recipients");
            on_milter_eom_refuse(s, "554 5.5.1 Error: no valid recipients", 0);
            return;
        }
        snprintf(t->sender_full, sizeof(t->sender_full), "%s", kt_milters_sender(s->milters));
        kt_buf_reset(&t->rcpts);
        for (size_t i = 0; i < n; i++)
            kt_buf_append(&t->rcpts, rl[i], strlen(rl[i]) + 1);
        t->n_rcpts = (unsigned)n;
    }
    kt_delivery_abandon(t->delivery);
    t->delivery = NULL;
    if (t->queued || envelope_edited || t->milter_hold) {
        const char **list = kt_calloc(t->n_rcpts, sizeof(*list));
        unsigned *notify = kt_calloc(t->n_rcpts, sizeof(*notify));
        const char **orcpt = kt_calloc(t->n_rcpts, sizeof(*orcpt));
        const char *r = t->rcpts.data;
        size_t n = 0;
        /* one delivery per recipient (as start_spool); the recipients' NOTIFY and ORCPT only while the
         * recipients are the client's */
        int dsn = !envelope_edited && t->rcpt_notify;
        for (unsigned i = 0; i < t->n_rcpts; i++, r += strlen(r) + 1) {
            size_t k = 0;
            while (k < n && strcasecmp(list[k], r) != 0)
                k++;
            if (k < n)
                continue;
            list[n] = r;
            notify[n] = dsn && i < t->rcpt_dsn_cap ? t->rcpt_notify[i] : 0;
            orcpt[n] = dsn && i < t->rcpt_dsn_cap ? t->rcpt_orcpt[i] : NULL;
            n++;
        }
        struct kt_qprops props = {
            .smtputf8 = t->smtputf8, .body = (enum kt_qbody)t->body, .ret = (enum kt_qret)t->ret,
            .envid = t->envid[0] ? t->envid : NULL, .notify = dsn ? notify : NULL, .orcpt = dsn ? orcpt : NULL,
        };
        t->delivery = kt_queue_delivery_new(&s->worker->loop, s->rt->queue_directory, t->sender_full, list, n,
                                            &props, s->cfg->myhostname, s->worker->id, t->queue_id);
        kt_free(notify);
        kt_free(orcpt);
        kt_free(list);
        if (!t->delivery) {
            on_milter_eom_refuse(s, "452 4.5.3 Error: too many recipients", 0);
            return;
        }
        t->queued = 1;
        if (t->milter_hold || (t->cleanup && (kt_cleanup_hold(t->cleanup) || kt_cleanup_redirect(t->cleanup)
                                              || kt_cleanup_filter(t->cleanup))))
            kt_delivery_set_new_dir(t->delivery, "hold");
    } else {
        t->delivery = kt_delivery_new(&s->worker->loop, t->mailboxes, t->n_mailboxes, s->cfg->myhostname,
                                      s->worker->id, t->queue_id);
    }
    /* the trace headers of a final delivery here stay only if it still is one */
    s->milter_keep_fixed = !(t->queued && !was_queued);
    kt_delivery_open(t->delivery, on_milter_reopened, s);
}

static void on_milter_eom(void *arg, const struct kt_milter_result *r)
{
    struct kt_session *s = arg;
    struct kt_smtpd_txn *t = s->txn;
    if (s->dead) {
        s->wait = KT_WAIT_NONE;
        kt_session_maybe_free(s);
        return;
    }
    if (r->verdict == KT_MILTER_REJECT || r->verdict == KT_MILTER_SHUTDOWN) {
        milter_log(s, "milter-reject", "END-OF-MESSAGE", r->reply);
        on_milter_eom_refuse(s, r->reply, r->verdict == KT_MILTER_SHUTDOWN);
        return;
    }
    if (r->verdict == KT_MILTER_DISCARD) {
        milter_log(s, "milter-discard", "END-OF-MESSAGE", "milter triggers DISCARD action");
        milter_discarded(s);
        return;
    }
    if (r->hold && !t->milter_hold) {
        t->milter_hold = 1;
        milter_log(s, "milter-hold", "END-OF-MESSAGE", r->hold_reason[0] ? r->hold_reason
                                                                           : "milter triggers HOLD action");
    }
    if (r->edited || r->envelope_edited || (t->milter_hold && !t->queued)) {
        milter_rewrite(s, r->envelope_edited);
        return;
    }
    if (t->milter_hold)
        kt_delivery_set_new_dir(t->delivery, "hold");   /* quarantine: committed into hold/ */
    commit_message(s);
}

static void on_milter_flushed(void *arg, int res)
{
    struct kt_session *s = arg;
    struct kt_smtpd_txn *t = s->txn;
    if (res < 0) {
        on_commit(s, res);
        return;
    }
    const char **list = kt_calloc(t->n_rcpts ? t->n_rcpts : 1, sizeof(*list));
    const char *r = t->rcpts.data;
    for (unsigned i = 0; i < t->n_rcpts; i++, r += strlen(r) + 1)
        list[i] = r;
    unsigned long long size = kt_delivery_size(t->delivery);
    /* a final delivery from here starts with its trace headers (add_trace_headers), then our Received: */
    kt_milters_eom(s->milters, kt_delivery_fd(t->delivery), (off_t)t->msg_off, (off_t)(size - t->msg_off),
                   t->queued ? 0 : 3, 1, t->sender_full, list, t->n_rcpts, on_milter_eom, s);
    kt_free(list);
}

/* The body is in: the milters see the message (once its bytes are in the file), then the commit. */
static void message_end(struct kt_session *s)
{
    struct kt_smtpd_txn *t = s->txn;
    if (!s->milters) {
        commit_message(s);
        return;
    }
    if (t->milter_discard) {
        milter_discarded(s);
        return;
    }
    s->wait = KT_WAIT_MILTER;
    s->milter_stage = KT_MS_EOD;
    kt_delivery_flush(t->delivery, on_milter_flushed, s);
}

/* ---- other commands ---- */

static void cmd_vrfy(struct kt_session *s, const struct kt_smtp_command *c)
{
    struct kt_resolve_result res;
    char addr[520];
    if (s->cfg->disable_vrfy) {             /* Postfix's reply; it counts as an error */
        reply(s, "502 5.5.1 VRFY command is disabled");
        return;
    }
    if (c->arg_len == 0) {
        reply(s, "501 5.5.4 Syntax: VRFY address");
        return;
    }
    size_t n = c->arg_len;
    const char *a = c->arg;
    if (n >= 2 && a[0] == '<' && a[n - 1] == '>') {
        a++;
        n -= 2;
    }
    if (n == 0 || n >= sizeof(addr)) {
        reply(s, "501 5.1.3 Bad recipient address syntax");
        return;
    }
    memcpy(addr, a, n);
    addr[n] = '\0';
    char full[520];
    if (kt_resolve_complete(s->cfg->resolver, addr, full, sizeof(full)) < 0) {
        reply(s, "501 5.1.3 Bad recipient address syntax");
        return;
    }
    /* an address virtual_alias_maps know is deliverable, as for RCPT */
    struct kt_rewrite_result rr;
    if (!(s->cfg->receive_override & KT_RO_NO_ADDRESS_MAPPINGS) && kt_rewrite_active(s->cfg->rewrite)
        && kt_rewrite_recipient(s->cfg->rewrite, "NOQUEUE", full, &rr) == 0) {
        int aliased = rr.aliased;
        kt_rewrite_result_free(&rr);
        if (aliased) {
            reply(s, "252 2.0.0 %s", addr);
            return;
        }
    }
    kt_resolve_recipient(s->cfg->resolver, full, &res);
    /* handed to another transport (lmtp:), a virtual recipient needs only its entry, as at RCPT */
    if (res.reply && res.cls == KT_CLASS_VIRTUAL && kt_transport_queued(s->cfg->transport, full, res.cls)
        && kt_resolve_virtual_listed(s->cfg->resolver, full))
        res.reply = NULL;
    if (res.reply)
        reply(s, "%s", res.reply);
    else if (res.cls == KT_CLASS_LOCAL || res.cls == KT_CLASS_VIRTUAL)
        reply(s, "252 2.0.0 %s", addr);
    else
        reply(s, "554 5.7.1 <%s>: Relay access denied", addr);
}

/* smtpd_client_new_tls_session_rate_limit: checked before a handshake,
 * counted after one that did not resume a cached session (Postfix). */
static int newtls_exceeded(struct kt_session *s)
{
    if (s->cfg->newtls_rate_limit <= 0 || s->anvil_exempt)
        return 0;
    unsigned rate = kt_anvil_peek(service_name(s), s->addr, KT_ANVIL_NEWTLS, s->cfg->anvil_unit_s);
    if (rate < s->cfg->newtls_rate_limit)
        return 0;
    kt_warn("New TLS session rate limit exceeded: %u from %s[%s] for service %s", rate, client_name(s), s->addr,
            service_name(s));
    return 1;
}

static void cmd_starttls(struct kt_session *s, const struct kt_smtp_command *c)
{
    if (c->arg_len) {
        reply(s, "501 5.5.4 Syntax: STARTTLS");
        return;
    }
    if (s->tls_on) {
        reply(s, "554 5.5.1 Error: TLS already active");
        return;
    }
    if (!tls_offerable(s)) {
        reply(s, "502 5.5.1 Error: command not implemented");
        return;
    }
    if (newtls_exceeded(s)) {
        reply(s, "454 4.7.0 Error: too many new TLS sessions from %s", s->addr);
        return;
    }
    reply(s, "220 2.0.0 Ready to start TLS");
    s->wait = KT_WAIT_STARTTLS;
}

/* ---- AUTH (RFC 4954) ---- */

/* The check request and the session it answers to; req comes first so that
 * the completion's kt_op leads back here. */
struct auth_job {
    struct kt_auth_req req;
    struct kt_session *s;
};

static void auth_job_free(struct kt_session *s)
{
    if (!s->auth_req)
        return;
    OPENSSL_cleanse(s->auth_req, sizeof(struct auth_job));
    kt_free(s->auth_req);
    s->auth_req = NULL;
}

/* The next line is the client's response to a "334" (RFC 4954 4). */
static void auth_await(struct kt_session *s, enum kt_auth_step step)
{
    s->auth_step = step;
    session_enter_state(s, KT_SS_AUTH);
}

/* No more responses expected: the check is in flight or the exchange is over. */
static void auth_responses_done(struct kt_session *s)
{
    s->auth_step = KT_AUTH_NONE;
    if (s->state == KT_SS_AUTH)
        session_enter_state(s, KT_SS_COMMAND);
}

static void auth_end(struct kt_session *s)
{
    auth_responses_done(s);
    auth_job_free(s);
}

static void auth_fail_reply(struct kt_session *s)
{
    reply(s, "%s", s->auth_reply ? s->auth_reply : "535 5.7.8 Error: authentication failed");
    if (s->auth_failures >= AUTH_MAX_FAILURES && s->state != KT_SS_CLOSING) {
        kt_info("too many authentication failures from %s[%s]", client_name(s), s->addr);
        reply(s, "421 4.7.0 %s Error: too many authentication failures", s->cfg->myhostname);
        session_enter_state(s, KT_SS_CLOSING);
    }
}

static void on_auth_delay(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = (struct kt_session *)((char *)op - offsetof(struct kt_session, delay_op));
    s->pending--;
    s->wait = KT_WAIT_NONE;
    if (!s->dead)
        auth_fail_reply(s);
    session_process(s);
}

/* A wrong password is answered late, later the more failures came from the
 * same address recently (across connections), and a session that keeps
 * failing is closed: guessing gets slow and then stops. */
static void auth_failed(struct kt_session *s, const char *why)
{
    kt_warn("%s[%s]: SASL %s authentication failed: %s", client_name(s), s->addr, s->sasl_method, why);
    s->auth_failures++;
    kt_free(s->auth_reply);
    s->auth_reply = kt_asprintf("535 5.7.8 Error: authentication failed: %s", why);
    unsigned recent = kt_auth_fail_record(s->addr);
    unsigned steps = recent > 1 ? recent - 1 : 0;
    if (steps > AUTH_MAX_DELAY_STEPS)
        steps = AUTH_MAX_DELAY_STEPS;
    long long ms = (long long)steps * s->cfg->error_sleep_ms;
    if (ms <= 0) {
        auth_fail_reply(s);
        return;
    }
    s->delay_ts.tv_sec = ms / 1000;
    s->delay_ts.tv_nsec = (ms % 1000) * 1000000;
    s->delay_op.cb = on_auth_delay;
    s->wait = KT_WAIT_AUTH;
    s->pending++;
    io_uring_prep_timeout(kt_loop_sqe(&s->worker->loop, &s->delay_op), &s->delay_ts, 0, 0);
}

static void on_auth_checked(struct kt_op *op, int res, unsigned flags)
{
    struct auth_job *job = (struct auth_job *)op;
    struct kt_session *s = job->s;

    s->pending--;
    s->wait = KT_WAIT_NONE;
    if (s->dead) {
        auth_job_free(s);
        kt_session_maybe_free(s);
        return;
    }
    if (res == KT_AUTH_OK) {
        snprintf(s->sasl_username, sizeof(s->sasl_username), "%s", job->req.canon_user);
        kt_auth_fail_forget(s->addr);
        s->counts.auth_ok++;
        reply(s, "235 2.7.0 Authentication successful");
    } else if (res == KT_AUTH_TEMP) {
        kt_warn("%s[%s]: SASL %s authentication failed: %s", client_name(s), s->addr, s->sasl_method, job->req.reason);
        reply(s, "454 4.7.0 Temporary authentication failure: %s", job->req.reason);
    } else {
        char why[sizeof(job->req.reason)];
        memcpy(why, job->req.reason, sizeof(why));
        auth_job_free(s);
        auth_failed(s, why[0] ? why : "authentication failure");
    }
    auth_job_free(s);
    session_process(s);
}

static void auth_check(struct kt_session *s)
{
    struct auth_job *job = (struct auth_job *)s->auth_req;
    struct kt_auth_req *req = &job->req;
    const char *realm = s->cfg->sasl_local_domain;

    auth_responses_done(s);
    if (realm[0] && !strchr(req->user, '@')) {
        size_t n = strlen(req->user);
        if (n + 1 + strlen(realm) >= sizeof(req->user)) {
            auth_end(s);
            auth_failed(s, "authentication failure");
            return;
        }
        snprintf(req->user + n, sizeof(req->user) - n, "@%s", realm);
    }
    job->s = s;
    req->op.cb = on_auth_checked;
    req->srv = s->cfg->sasl;
    req->ring_fd = s->worker->loop.ring.ring_fd;
    req->secured = s->tls_on;
    snprintf(req->client_addr, sizeof(req->client_addr), "%s", s->addr);
    s->wait = KT_WAIT_AUTH;
    s->pending++;
    kt_auth_submit(req);
}

/* Decoded client response; 0, or -1 after replying (the exchange is over). */
static int auth_decode(struct kt_session *s, const char *b64, size_t len, char *out, size_t outlen, size_t *n,
                       int initial)
{
    ssize_t r = len == 1 && b64[0] == '=' && initial ? 0 : kt_base64_decode(b64, len, out, outlen - 1);
    if (r < 0) {
        kt_warn("%s[%s]: SASL %s authentication failed: malformed base64 in %s response", client_name(s), s->addr,
                s->sasl_method, initial ? "initial" : "continued");
        reply(s, "501 5.5.2 Invalid base64 data in %s response", initial ? "initial" : "continued");
        auth_end(s);
        return -1;
    }
    out[r] = '\0';
    *n = (size_t)r;
    return 0;
}

static void auth_plain(struct kt_session *s, char *msg, size_t n)
{
    struct kt_auth_req *req = s->auth_req;
    const char *authzid, *authcid, *passwd;
    if (kt_sasl_plain_split(msg, n, &authzid, &authcid, &passwd) < 0 || strlen(authcid) >= sizeof(req->user)
        || strlen(passwd) >= sizeof(req->pass)) {
        auth_end(s);
        auth_failed(s, "malformed PLAIN message");
        return;
    }
    if (authzid[0] && strcmp(authzid, authcid) != 0) {
        auth_end(s);
        auth_failed(s, "authorization identity differs from the login");
        return;
    }
    memcpy(req->user, authcid, strlen(authcid) + 1);
    memcpy(req->pass, passwd, strlen(passwd) + 1);
    auth_check(s);
}

/* LOGIN: the user name (step 1) or the password (step 2). */
static void auth_login(struct kt_session *s, const char *v, size_t n)
{
    struct kt_auth_req *req = s->auth_req;
    if (memchr(v, '\0', n) || n >= sizeof(req->user) || (s->auth_step == KT_AUTH_LOGIN_USER && n == 0)) {
        auth_end(s);
        auth_failed(s, "malformed LOGIN response");
        return;
    }
    if (s->auth_step == KT_AUTH_LOGIN_USER) {
        memcpy(req->user, v, n + 1);
        auth_await(s, KT_AUTH_LOGIN_PASS);
        reply(s, "334 UGFzc3dvcmQ6");   /* "Password:" */
        return;
    }
    memcpy(req->pass, v, n + 1);
    auth_check(s);
}

static void auth_response(struct kt_session *s, const char *line, size_t len)
{
    char buf[1024];
    size_t n;

    if (len == 1 && line[0] == '*') {
        kt_warn("%s[%s]: SASL %s authentication aborted", client_name(s), s->addr, s->sasl_method);
        auth_end(s);
        reply(s, "501 5.7.0 Authentication aborted");
        return;
    }
    if (auth_decode(s, line, len, buf, sizeof(buf), &n, 0) < 0)
        return;
    if (s->auth_step == KT_AUTH_PLAIN_RESPONSE)
        auth_plain(s, buf, n);
    else
        auth_login(s, buf, n);
    OPENSSL_cleanse(buf, sizeof(buf));
}

static void cmd_auth(struct kt_session *s, const struct kt_smtp_command *c)
{
    if (!s->tls_on && s->cfg->tls_auth_only) {
        reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        return;
    }
    if (s->sasl_username[0]) {
        reply(s, "503 5.5.1 Error: already authenticated");
        return;
    }
    if (rate_exceeded(s, KT_ANVIL_AUTH, s->cfg->auth_rate_limit, "AUTH command")) {
        reply(s, "450 4.7.1 Error: too many AUTH commands from %s", s->addr);
        return;
    }
    size_t mlen = 0;
    while (mlen < c->arg_len && c->arg[mlen] != ' ')
        mlen++;
    if (mlen == 0) {
        reply(s, "501 5.5.4 Syntax: AUTH mechanism");
        return;
    }
    unsigned mech = kt_sasl_mech_from_name(c->arg, mlen);
    if (!mech) {
        reply(s, "504 5.5.4 Unrecognized authentication type");
        return;
    }
    if (!(auth_mechs_now(s) & mech)) {
        if (!s->tls_on && (s->cfg->sasl_tls_mechs & mech))
            reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        else
            reply(s, "504 5.5.4 Unrecognized authentication type");
        return;
    }
    const char *ir = c->arg + mlen;
    size_t ir_len = c->arg_len - mlen;
    while (ir_len && *ir == ' ') {
        ir++;
        ir_len--;
    }
    s->sasl_method = mech == KT_MECH_PLAIN ? "PLAIN" : "LOGIN";
    s->auth_req = kt_calloc(1, sizeof(struct auth_job));
    if (!ir_len) {
        auth_await(s, mech == KT_MECH_PLAIN ? KT_AUTH_PLAIN_RESPONSE : KT_AUTH_LOGIN_USER);
        reply(s, mech == KT_MECH_PLAIN ? "334 " : "334 VXNlcm5hbWU6");   /* "Username:" */
        return;
    }
    char buf[1024];
    size_t n;
    if (auth_decode(s, ir, ir_len, buf, sizeof(buf), &n, 1) < 0)
        return;
    if (mech == KT_MECH_PLAIN) {
        auth_plain(s, buf, n);
    } else {
        s->auth_step = KT_AUTH_LOGIN_USER;
        auth_login(s, buf, n);
    }
    OPENSSL_cleanse(buf, sizeof(buf));
}

static void cmd_rset(struct kt_session *s, const struct kt_smtp_command *c)
{
    transaction_reset(s);
    reply(s, "250 2.0.0 Ok");
}

static void cmd_noop(struct kt_session *s, const struct kt_smtp_command *c)
{
    reply(s, "250 2.0.0 Ok");
}

static void cmd_quit(struct kt_session *s, const struct kt_smtp_command *c)
{
    reply(s, "221 2.0.0 Bye");
    session_enter_state(s, KT_SS_CLOSING);
}

static void cmd_help(struct kt_session *s, const struct kt_smtp_command *c)
{
    reply(s, "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP%s",
          tls_offerable(s) ? " STARTTLS" : "");
}

static void cmd_not_implemented(struct kt_session *s, const struct kt_smtp_command *c)
{
    reply(s, "502 5.5.1 Error: command not implemented");
}

static void cmd_unknown(struct kt_session *s, const struct kt_smtp_command *c)
{
    if (milter_after(s, KT_MS_UNKNOWN))
        return;   /* a milter may answer it instead (Postfix) */
    reply(s, "502 5.5.2 Error: command not recognized");
}

static void cmd_bdat(struct kt_session *s, const struct kt_smtp_command *c)
{
    bdat_start(s, c, NULL);
}

/* ---- the command table ----
 * Every verb's preconditions are flags of its row, checked by
 * command_refusal() before any handler runs (as Postfix's smtpd_cmd_table
 * and OpenSMTPD's smtp_session.c do), in this order: TLS, SASL, HELO,
 * transaction. A handler may assume what its flags promise (CMD_IN_TXN:
 * s->txn is set). No verb runs while an AUTH exchange waits for a
 * response: in KT_SS_AUTH every line is that response (RFC 4954 4). */
enum {
    CMD_PRE_TLS = 1 << 0,        /* allowed before STARTTLS where TLS is mandatory (smtpd_tls_security_level = encrypt) */
    CMD_SASL = 1 << 1,           /* only where smtpd_sasl_auth_enable = yes */
    CMD_NEED_HELO = 1 << 2,      /* only after a successful HELO/EHLO */
    CMD_HELO_REQUIRED = 1 << 3,  /* only after HELO/EHLO where smtpd_helo_required = yes */
    CMD_IN_TXN = 1 << 4,         /* only inside a mail transaction (after MAIL) */
    CMD_NO_TXN = 1 << 5,         /* only outside a mail transaction */
    CMD_LAST = 1 << 6,           /* must end a PIPELINING group (RFC 2920 3.1): input behind it is improper */
    CMD_CHUNK = 1 << 7,          /* carries a BDAT chunk: even a refused one is read first (RFC 3030 2) */
    CMD_JUNK = 1 << 8,           /* can be repeated without end: past smtpd_junk_command_limit each is an error */
};

/* Counter in struct kt_cmd_counts, +1 so that 0 means none. */
#define COUNTER(field) (offsetof(struct kt_cmd_counts, field) + 1)

struct smtpd_cmd {
    void (*run)(struct kt_session *s, const struct kt_smtp_command *c);
    unsigned flags;
    const char *txn_refusal;   /* reply when the CMD_IN_TXN or CMD_NO_TXN rule fails */
    size_t counter;            /* COUNTER(...) for the disconnect line, or 0 */
};

static const struct smtpd_cmd smtpd_cmds[] = {
    [KT_VERB_HELO] = { cmd_helo, CMD_PRE_TLS | CMD_LAST | CMD_JUNK, NULL, COUNTER(helo) },
    [KT_VERB_EHLO] = { cmd_ehlo, CMD_PRE_TLS | CMD_LAST | CMD_JUNK, NULL, COUNTER(ehlo) },
    [KT_VERB_STARTTLS] = { cmd_starttls, CMD_PRE_TLS | CMD_LAST, NULL, COUNTER(starttls) },
    [KT_VERB_AUTH] = { cmd_auth, CMD_SASL | CMD_NEED_HELO | CMD_NO_TXN, "503 5.5.1 Error: MAIL transaction in progress",
                       COUNTER(auth) },
    [KT_VERB_MAIL] = { cmd_mail, CMD_HELO_REQUIRED | CMD_NO_TXN, "503 5.5.1 Error: nested MAIL command", COUNTER(mail) },
    [KT_VERB_RCPT] = { cmd_rcpt, CMD_IN_TXN, "503 5.5.1 Error: need MAIL command", COUNTER(rcpt) },
    [KT_VERB_DATA] = { cmd_data, CMD_IN_TXN | CMD_LAST, "503 5.5.1 Error: need RCPT command", COUNTER(data) },
    [KT_VERB_BDAT] = { cmd_bdat, CMD_IN_TXN | CMD_CHUNK, "503 5.5.1 Error: need MAIL command", COUNTER(bdat) },
    [KT_VERB_RSET] = { cmd_rset, CMD_PRE_TLS | CMD_JUNK, NULL, COUNTER(rset) },
    [KT_VERB_NOOP] = { cmd_noop, CMD_PRE_TLS | CMD_LAST | CMD_JUNK, NULL, COUNTER(noop) },
    [KT_VERB_VRFY] = { cmd_vrfy, CMD_LAST | CMD_JUNK, NULL, COUNTER(vrfy) },
    [KT_VERB_QUIT] = { cmd_quit, CMD_PRE_TLS, NULL, COUNTER(quit) },
    [KT_VERB_HELP] = { cmd_help, CMD_PRE_TLS, NULL, 0 },
    [KT_VERB_EXPN] = { cmd_not_implemented, CMD_PRE_TLS, NULL, 0 },
    [KT_VERB_ETRN] = { cmd_not_implemented, CMD_PRE_TLS | CMD_JUNK, NULL, 0 },
    [KT_VERB_UNKNOWN] = { cmd_unknown, CMD_PRE_TLS, NULL, COUNTER(unknown) },
};

/* The reply refusing the command here and now, or NULL when its row's preconditions hold. */
static const char *command_refusal(const struct kt_session *s, const struct smtpd_cmd *cmd)
{
    if (!(cmd->flags & CMD_PRE_TLS) && s->cfg->tls_level == KT_TLS_ENCRYPT && !s->tls_on)
        return "530 5.7.0 Must issue a STARTTLS command first";
    if ((cmd->flags & CMD_SASL) && !s->cfg->sasl_enable)
        return "503 5.5.1 Error: authentication not enabled";
    if (((cmd->flags & CMD_NEED_HELO) || ((cmd->flags & CMD_HELO_REQUIRED) && s->cfg->helo_required)) && !s->helo[0])
        return "503 5.5.1 Error: send HELO/EHLO first";
    if ((cmd->flags & CMD_IN_TXN) && !s->txn)
        return cmd->txn_refusal;
    if ((cmd->flags & CMD_NO_TXN) && s->txn)
        return cmd->txn_refusal;
    return NULL;
}

static const struct smtpd_cmd *command_lookup(enum kt_smtp_verb verb)
{
    if ((size_t)verb >= sizeof(smtpd_cmds) / sizeof(smtpd_cmds[0]) || !smtpd_cmds[verb].run)
        verb = KT_VERB_UNKNOWN;
    return &smtpd_cmds[verb];
}

/* One command line: count it, check its row, run its handler. Returns the row. */
static const struct smtpd_cmd *handle_command(struct kt_session *s, const char *line, size_t len)
{
    struct kt_smtp_command c;
    size_t blank = 0;
    while (blank < len && (line[blank] == ' ' || line[blank] == '\t'))
        blank++;
    if (blank == len) {
        /* Postfix: an empty line is no command at all */
        reply(s, "500 5.5.2 Error: bad syntax");
        return NULL;
    }
    kt_smtp_parse_command(line, len, &c);
    const struct smtpd_cmd *cmd = command_lookup(c.verb);
    if (!s->cmd_replay) {   /* a command run again after DNS answers counts once */
        s->counts.total++;
        if (cmd->counter)
            (*(unsigned *)((char *)&s->counts + cmd->counter - 1))++;
    }
    if (c.verb != KT_VERB_UNKNOWN && c.verb != KT_VERB_HELO && c.verb != KT_VERB_EHLO
        && kt_smtp_arg_has_ctl(c.arg, c.arg_len)) {
        /* a NUL or control character would truncate or disguise the argument downstream (HELO/EHLO take
         * any argument, as in Postfix: the name is kept with such bytes made printable) */
        reply(s, "501 5.5.2 Syntax error: control character in command argument");
        if (c.verb == KT_VERB_BDAT) {
            /* its chunk cannot be skipped without a size */
            reply(s, "421 4.5.0 %s Error: cannot resynchronize after bad BDAT", s->cfg->myhostname);
            session_enter_state(s, KT_SS_CLOSING);
        }
        return cmd;
    }
    if (c.verb == KT_VERB_UNKNOWN && s->milters)   /* the whole line goes to the milters */
        snprintf(s->mstate->params, sizeof(s->mstate->params), "%.*s", (int)len, line);
    const char *refusal = command_refusal(s, cmd);
    if (refusal && (cmd->flags & CMD_CHUNK))
        bdat_start(s, &c, refusal);
    else if (refusal)
        reply(s, "%s", refusal);
    else
        cmd->run(s, &c);
    /* Postfix's smtpd_junk_command_limit: such a command past the limit also counts as an error (the reply
     * is unchanged), so a client that only repeats them meets the error limits */
    if ((cmd->flags & CMD_JUNK) && !s->cmd_replay && s->junk_cmds++ > s->cfg->junk_command_limit
        && s->state != KT_SS_CLOSING)
        count_error(s);
    return cmd;
}

static void on_tarpit_done(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = (struct kt_session *)((char *)op - offsetof(struct kt_session, delay_op));
    s->pending--;
    s->wait = KT_WAIT_NONE;
    session_process(s);
}

/* Past smtpd_soft_error_limit errors, each error reply waits
 * smtpd_error_sleep_time before it is sent, as in Postfix: a client that
 * keeps failing (address harvesting, broken scripts) gets slow. */
static void tarpit(struct kt_session *s)
{
    s->tarpit_owed = 0;
    if (s->cfg->error_sleep_ms <= 0 || s->wait != KT_WAIT_NONE || s->state == KT_SS_CLOSING)
        return;
    s->delay_ts.tv_sec = s->cfg->error_sleep_ms / 1000;
    s->delay_ts.tv_nsec = (s->cfg->error_sleep_ms % 1000) * 1000000;
    s->delay_op.cb = on_tarpit_done;
    s->wait = KT_WAIT_TARPIT;
    s->pending++;
    io_uring_prep_timeout(kt_loop_sqe(&s->worker->loop, &s->delay_op), &s->delay_ts, 0, 0);
}

static void command_feed(struct kt_session *s)
{
    char *head = kt_buf_head(&s->in);
    size_t avail = kt_buf_used(&s->in);
    size_t line_len, consumed;
    int bare_lf = 0;

    if (s->discard_line) {
        const char *lf = memchr(head, '\n', avail);
        kt_buf_consume(&s->in, lf ? (size_t)(lf - head) + 1 : avail);
        if (lf)
            s->discard_line = 0;
        return;
    }
    enum kt_line_status st = kt_smtp_frame_line(head, avail, s->cfg->line_length_limit, &line_len, &consumed,
                                                &bare_lf);
    if (st == KT_LINE_MORE) {
        s->wait = KT_WAIT_NONE;
        return;
    }
    if (st == KT_LINE_TOO_LONG) {
        reply(s, "500 5.5.2 Error: line too long");
        s->discard_line = 1;
        auth_end(s);
        return;
    }
    s->cmd_pipelined = consumed < avail;
    const struct smtpd_cmd *cmd = NULL;
    if (bare_lf && bare_newline_rejects(s)) {
        /* Postfix 3.9 smtpd_forbid_bare_newline = reject: a command line ending in a bare LF is refused */
        int code = s->cfg->bare_newline_reject_code;
        kt_info("bare <LF> received in command from %s[%s]", client_name(s), s->addr);
        reply(s, "%d %d.5.2 Error: bare <LF> received", code, code / 100);
        if (s->state == KT_SS_AUTH)
            auth_end(s);
    } else if (s->state == KT_SS_AUTH) {
        auth_response(s, head, line_len);
    } else {
        cmd = handle_command(s, head, line_len);
    }
    if (s->wait == KT_WAIT_DNS) {
        /* the line stays in the buffer: the command runs again with the answers */
        s->cmd_replay = 1;
        return;
    }
    s->cmd_replay = 0;
    if (s->dns_rounds || s->dns_answers)
        dns_step_done(s);
    kt_buf_consume(&s->in, consumed);
    if (s->state == KT_SS_COMMAND || s->state == KT_SS_BDAT || s->state == KT_SS_AUTH)
        session_touch(s);   /* a complete line ends a request; the next one (or a BDAT chunk) starts */
    if (s->wait == KT_WAIT_STARTTLS && kt_buf_used(&s->in)) {
        /* CVE-2011-0411: plaintext pipelined after STARTTLS must not be
         * executed inside the TLS session */
        kt_info("improper command pipelining after STARTTLS from %s[%s]: discarded %zu bytes", client_name(s), s->addr,
                kt_buf_used(&s->in));
        kt_buf_reset(&s->in);
        s->improper_pipelining = 1;
    } else if (cmd && (cmd->flags & CMD_LAST) && kt_buf_used(&s->in) && !s->improper_pipelining) {
        kt_info("improper command pipelining after %s from %s[%s]", kt_smtp_verb_str((enum kt_smtp_verb)(cmd - smtpd_cmds)),
                client_name(s), s->addr);
        s->improper_pipelining = 1;
    }
    if (s->tarpit_owed)
        tarpit(s);
}

/* Run the input buffer through the protocol until it is empty or the session
 * must wait for an asynchronous step; then write replies and read more. */
static void session_process(struct kt_session *s)
{
    while (!s->dead && s->wait == KT_WAIT_NONE && s->state != KT_SS_CLOSING && s->state != KT_SS_HANDSHAKE) {
        size_t before = kt_buf_used(&s->in);
        enum kt_session_state st = s->state;
        if (st == KT_SS_BDAT) {
            bdat_feed(s);
            if (s->state == KT_SS_BDAT && kt_buf_used(&s->in) == 0)
                break;
            continue;
        }
        if (before == 0)
            break;
        if (st == KT_SS_COMMAND || st == KT_SS_AUTH)
            command_feed(s);
        else if (st == KT_SS_DATA)
            data_feed(s);
        if (kt_buf_used(&s->in) == before && s->state == st && s->wait == KT_WAIT_NONE)
            break;   /* incomplete line: read more */
    }
    if (s->dead) {
        kt_session_maybe_free(s);
        return;
    }
    /* Between messages a session keeps at most a small input buffer: memory
     * per idle session matters with many thousands of them. */
    if (kt_buf_used(&s->in) == 0 && (s->in.cap > 65536 || (s->in.cap > 4096 && s->state == KT_SS_COMMAND)))
        kt_buf_release(&s->in);
    /* the held error reply leaves when the delay ends; a reply a milter may still overrule waits for it */
    if (s->wait != KT_WAIT_TARPIT && s->wait != KT_WAIT_MILTER)
        kt_conn_flush(s->conn);
    if (!s->dead && s->wait == KT_WAIT_NONE && s->state != KT_SS_CLOSING && s->state != KT_SS_HANDSHAKE)
        kt_conn_arm_read(s->conn, s->state == KT_SS_COMMAND || s->state == KT_SS_AUTH ? COMMAND_READ : BODY_READ);
    kt_session_maybe_free(s);
}

static void session_on_input(struct kt_session *s)
{
    /* With smtpd_per_request_deadline a read does not restart the clock: requests do */
    if (!s->cfg->per_request_deadline)
        session_touch(s);
    session_process(s);
}

static void session_start_tls(struct kt_session *s)
{
    clock_gettime(CLOCK_MONOTONIC, &s->tls_t0);
    session_enter_state(s, KT_SS_HANDSHAKE);
    s->deadline = time(NULL) + s->cfg->starttls_timeout_s;
    if (!kt_conn_tls_new(s->conn, kt_tls_server_ctx(s->cfg->tls), s->cfg->ktls_rx_tls13, s->worker->ktls)) {
        kt_err("cannot create TLS session for %s[%s]", client_name(s), s->addr);
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    kt_conn_start_tls(s->conn);
}

static void session_on_sent(struct kt_session *s)
{
    if (s->state == KT_SS_CLOSING) {
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    if (s->wait == KT_WAIT_STARTTLS) {
        s->tls_used_starttls = 1;
        session_start_tls(s);
    }
}

/* Postfix's line about a client certificate (smtpd, loglevel 1): what relay_clientcerts needs. */
static void log_client_cert(struct kt_session *s, SSL *ssl)
{
    X509 *cert = ssl ? SSL_get0_peer_certificate(ssl) : NULL;
    char subject[128] = "", issuer[128] = "";
    if (!cert || !s->ccert_fps)
        return;
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, subject, sizeof(subject));
    X509_NAME_get_text_by_NID(X509_get_issuer_name(cert), NID_commonName, issuer, sizeof(issuer));
    kt_info("unknown[%s]: %s: subject_CN=%s, issuer_CN=%s, fingerprint=%s, pkey_fingerprint=%s", s->addr,
            kt_tls_ccert_str(s->ccert), subject, issuer, s->ccert_fps->cert, s->ccert_fps->pkey);
}

static void session_on_tls_ready(struct kt_session *s)
{
    SSL *ssl = kt_conn_ssl(s->conn);
    unsigned ktls = kt_conn_ktls(s->conn);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    kt_metric_tls_handshake(SSL_version(ssl), SSL_session_reused(ssl), (double)(now.tv_sec - s->tls_t0.tv_sec)
                            + (double)(now.tv_nsec - s->tls_t0.tv_nsec) / 1e9, (ktls & KT_CONN_KTLS_TX) != 0,
                            (ktls & KT_CONN_KTLS_RX) != 0);
    s->tls_on = 1;
    if (s->cfg->newtls_rate_limit > 0 && !s->anvil_exempt && !SSL_session_reused(ssl))
        kt_anvil_event(service_name(s), s->addr, KT_ANVIL_NEWTLS, s->cfg->anvil_unit_s);
    s->ccert = KT_CCERT_NONE;
    if (SSL_get0_peer_certificate(ssl)) {
        s->ccert_fps = kt_calloc(1, sizeof(*s->ccert_fps));
        s->ccert = kt_tls_peer_cert(ssl, s->cfg->tls_fingerprint_digest, s->ccert_fps->cert, s->ccert_fps->pkey);
    }
    log_client_cert(s, ssl);
    session_enter_state(s, KT_SS_COMMAND);
    s->wait = KT_WAIT_NONE;
    session_touch(s);
    if (s->tls_used_starttls) {
        /* RFC 3207 4.2: forget everything learned before the handshake */
        transaction_reset(s);
        helo_forget(s);
        s->esmtp = 0;
        s->sasl_username[0] = '\0';
    } else {
        send_banner(s);
    }
    session_process(s);
}

static void log_disconnect(struct kt_session *s)
{
    char buf[512];
    size_t n = 0;
    const struct kt_cmd_counts *c = &s->counts;
#define COUNT(name, tried, ok)                                                                      \
    if (tried && n < sizeof(buf))                                                                   \
    {                                                                                               \
        if (ok == tried)                                                                            \
            n += (size_t)snprintf(buf + n, sizeof(buf) - n, " %s=%u", name, tried);                 \
        else                                                                                        \
            n += (size_t)snprintf(buf + n, sizeof(buf) - n, " %s=%u/%u", name, ok, tried);          \
    }
    unsigned quit_ok = c->quit, starttls_ok = c->starttls && s->tls_used_starttls ? c->starttls : 0;
    COUNT("helo", c->helo, c->helo_ok);
    COUNT("ehlo", c->ehlo, c->ehlo_ok);
    COUNT("starttls", c->starttls, starttls_ok);
    COUNT("auth", c->auth, c->auth_ok);
    COUNT("mail", c->mail, c->mail_ok);
    COUNT("rcpt", c->rcpt, c->rcpt_ok);
    COUNT("data", c->data, c->data_ok);
    COUNT("bdat", c->bdat, c->bdat_ok);
    COUNT("rset", c->rset, c->rset);
    COUNT("noop", c->noop, c->noop);
    COUNT("vrfy", c->vrfy, c->vrfy);
    COUNT("quit", c->quit, quit_ok);
    COUNT("unknown", c->unknown, 0u);
#undef COUNT
    buf[n < sizeof(buf) ? n : sizeof(buf) - 1] = '\0';
    kt_info("disconnect from %s[%s]%s commands=%u", client_name(s), s->addr, buf, c->total);
}

/* What the connection reports. A read or write failure ends the session;
 * the connection has logged TLS-level ends itself (as Postfix's smtpd does). */
static void on_conn_event(void *arg, enum kt_conn_event ev, int res)
{
    struct kt_session *s = arg;
    const char *where = s->state == KT_SS_DATA ? "DATA" : "command";

    switch (ev) {
    case KT_CONN_EV_INPUT:
        session_on_input(s);
        return;
    case KT_CONN_EV_SENT:
        session_on_sent(s);
        return;
    case KT_CONN_EV_TLS_READY:
        session_on_tls_ready(s);
        return;
    case KT_CONN_EV_SPLICED:
        return;   /* sessions never splice: every body byte goes through the line-ending rule */
    case KT_CONN_EV_CLOSED:
        s->conn = NULL;
        kt_session_maybe_free(s);
        return;
    case KT_CONN_EV_EOF:
        if (!s->dead)
            kt_info("lost connection after %s from %s[%s]", where, client_name(s), s->addr);
        break;
    case KT_CONN_EV_ERROR:
        if (s->dead || res == -EPROTO)
            break;
        if (kt_conn_failed_step(s->conn) == KT_CONN_STEP_SPLICE_FILE) {
            kt_delivery_fail(s->txn->delivery, res);
            kt_info("BDAT splice from %s[%s] failed: %s", client_name(s), s->addr, strerror(-res));
        } else {
            kt_info("%s after %s from %s[%s]: %s",
                    kt_conn_failed_step(s->conn) == KT_CONN_STEP_SEND ? "write error" : "read error", where,
                    client_name(s), s->addr, strerror(-res));
        }
        break;
    default:
        return;
    }
    session_close(s);
    kt_session_maybe_free(s);
}

static void session_unlink(struct kt_session *s)
{
    struct kt_worker *w = s->worker;
    if (s->prev)
        s->prev->next = s->next;
    else
        w->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->next = s->prev = NULL;
    w->n_sessions--;
}

void kt_session_maybe_free(struct kt_session *s)
{
    if (!s->dead || s->pending || s->conn)
        return;
    if (!s->proxy_buf)   /* a connection whose PROXY header never came was no client */
        log_disconnect(s);
    if (s->anvil_connected)
        kt_anvil_disconnect(service_name(s), s->addr);
    transaction_reset(s);
    kt_milters_free(s->milters);
    s->milters = NULL;
    kt_free(s->mstate);
    kt_buf_release(&s->in);
    kt_buf_release(&s->out);
    auth_job_free(s);
    kt_free(s->proxy_buf);
    if (s->dns_job)
        s->dns_job->s = NULL;
    kt_free(s->client_name);
    kt_free(s->reverse_name);
    kt_free(s->dns_answers);
    helo_forget(s);
    kt_free(s->ccert_fps);
    kt_free(s->auth_reply);
    kt_free(s->bdat_error);
    session_unlink(s);
    kt_metric_add(KT_M_CONN_SMTPD, -1);
    kt_runtime_unref(s->rt);
    kt_free(s);
}

void kt_session_timeout(struct kt_session *s)
{
    if (s->dead || s->state == KT_SS_CLOSING)
        return;
    if (s->wait == KT_WAIT_PROXY) {
        kt_warn("haproxy read: timeout reading the PROXY header from %s; closing", s->addr);
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    if (s->wait == KT_WAIT_COMMIT || s->wait == KT_WAIT_OPEN || s->wait == KT_WAIT_DRAIN || s->wait == KT_WAIT_AUTH
        || s->wait == KT_WAIT_TARPIT || s->wait == KT_WAIT_DNS || s->wait == KT_WAIT_MILTER)
        return;   /* waiting on our own disk, password check, DNS or a milter (its own timeouts), not the client */
    kt_info("timeout after %s from %s[%s]", stage_str(s->state), client_name(s), s->addr);
    if (s->state == KT_SS_HANDSHAKE || s->wait == KT_WAIT_SPLICE) {
        /* no plaintext reply is possible mid-handshake or mid-splice */
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    reply(s, "421 4.4.2 %s Error: timeout exceeded", s->cfg->myhostname);
    session_enter_state(s, KT_SS_CLOSING);
    kt_conn_flush(s->conn);
    kt_session_maybe_free(s);
}

void kt_session_shutdown(struct kt_session *s)
{
    if (s->dead || s->state == KT_SS_CLOSING || s->wait != KT_WAIT_NONE)
        return;
    if (s->state == KT_SS_HANDSHAKE) {
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    reply(s, "421 4.3.2 %s Service shutting down, closing transmission channel", s->cfg->myhostname);
    session_enter_state(s, KT_SS_CLOSING);
    kt_conn_flush(s->conn);
    kt_session_maybe_free(s);
}

void kt_session_abort(struct kt_session *s)
{
    session_close(s);
    kt_session_maybe_free(s);
}

static void session_greet(struct kt_session *s);
static void session_welcome(struct kt_session *s);
static void on_milter_event(void *arg, const struct kt_milter_result *r);

static int same_address(const char *x, const char *y)
{
    unsigned char a[16], b[16];
    int fam = strchr(x, ':') ? AF_INET6 : AF_INET;
    return inet_pton(fam, x, a) == 1 && inet_pton(fam, y, b) == 1 && memcmp(a, b, fam == AF_INET ? 4 : 16) == 0;
}

/* A PTR result Postfix would use: a syntactically valid host name that is not an address. */
static int usable_hostname(const char *name)
{
    unsigned char b[16];
    return name[0] && kt_smtp_valid_helo(name, strlen(name)) && name[0] != '['
           && inet_pton(AF_INET, name, b) != 1 && inet_pton(AF_INET6, name, b) != 1;
}

/* Postfix's smtpd_peer: the PTR name of the client's address, accepted as
 * the client name only if it resolves back to that address. */
static void client_names(struct kt_session *s)
{
    struct kt_dns_answer a;
    char q[128];
    unsigned char b[16];

    if (inet_pton(AF_INET, s->addr, b) == 1) {
        snprintf(q, sizeof(q), "%u.%u.%u.%u.in-addr.arpa", b[3], b[2], b[1], b[0]);
    } else if (inet_pton(AF_INET6, s->addr, b) == 1) {
        size_t o = 0;
        for (int i = 15; i >= 0; i--)
            o += (size_t)snprintf(q + o, sizeof(q) - o, "%x.%x.", b[i] & 15, b[i] >> 4);
        snprintf(q + o, sizeof(q) - o, "ip6.arpa");
    } else {
        goto done;
    }
    if (!s->reverse_name) {
        if (!session_dns(s, KT_RR_PTR, q, &a, client_names))
            return;
        dns_step_done(s);
        if (a.status != KT_DNS_FOUND) {
            s->reverse_name_status = s->client_name_status = a.status == KT_DNS_TEMP ? KT_NAME_TEMP : KT_NAME_PERM;
            goto done;
        }
        if (!usable_hostname(a.rr[0])) {
            kt_warn("%s: malformed or numeric PTR name: %s", s->addr, a.rr[0]);
            goto done;
        }
        s->reverse_name = kt_strdup(a.rr[0]);
    }
    s->reverse_name_status = KT_NAME_OK;
    int fwd = strchr(s->addr, ':') ? KT_RR_AAAA : KT_RR_A;
    if (!session_dns(s, fwd, s->reverse_name, &a, client_names))
        return;
    dns_step_done(s);
    if (a.status == KT_DNS_TEMP) {
        kt_warn("hostname %s does not resolve to address %s: %s", s->reverse_name, s->addr, a.why);
        s->client_name_status = KT_NAME_TEMP;
        goto done;
    }
    for (unsigned i = 0; i < a.n; i++)
        if (same_address(s->addr, a.rr[i])) {
            s->client_name = kt_strdup(s->reverse_name);
            s->client_name_status = KT_NAME_OK;
            goto done;
        }
    if (a.status == KT_DNS_FOUND)
        kt_warn("hostname %s does not resolve to address %s", s->reverse_name, s->addr);
    else
        kt_warn("hostname %s does not resolve to address %s: Name or service not known", s->reverse_name, s->addr);
    s->client_name_status = KT_NAME_PERM;
done:
    dns_step_done(s);
    if (s->client_name) {
        char peer[sizeof(s->addr) + 260];
        snprintf(peer, sizeof(peer), "%s[%s]", s->client_name, s->addr);
        kt_conn_set_peer(s->conn, peer);
    }
    session_greet(s);
}

static void session_begin(struct kt_session *s)
{
    s->client_name_status = s->reverse_name_status = KT_NAME_PERM;
    if (s->cfg->peername_lookup)
        client_names(s);
    else
        session_greet(s);
}

/* The client is known: limits, then the banner (or the TLS handshake of a
 * wrapper-mode service). */
static void session_greet(struct kt_session *s)
{
    kt_info("connect from %s[%s]", client_name(s), s->addr);
    if (connection_refused(s)) {
        if (s->cfg->wrappermode) {
            /* no plaintext reply on a TLS port */
            session_close(s);
            kt_session_maybe_free(s);
            return;
        }
        reply(s, "421 4.7.0 %s Error: too many connections from %s", s->cfg->myhostname, s->addr);
        session_enter_state(s, KT_SS_CLOSING);
        kt_conn_flush(s->conn);
        kt_session_maybe_free(s);
        return;
    }
    if (s->cfg->milters) {
        /* the milters hear of the client before it gets a banner */
        s->milters = kt_milters_new(&s->worker->loop, s->cfg->milters, kt_session_milter_macro, s);
        s->mstate = kt_calloc(1, sizeof(*s->mstate));
        char bracketed[INET6_ADDRSTRLEN + 2];
        snprintf(bracketed, sizeof(bracketed), "[%s]", s->addr);
        s->wait = KT_WAIT_MILTER;
        s->milter_stage = KT_MS_CONNECT;
        kt_milters_connect(s->milters, s->client_name ? s->client_name : bracketed, strchr(s->addr, ':') ? '6' : '4',
                           s->addr, (unsigned)s->port, on_milter_event, s);
        return;
    }
    session_welcome(s);
}

/* Banner or, in wrapper mode, the TLS handshake first. */
static void session_welcome(struct kt_session *s)
{
    if (s->cfg->wrappermode) {
        if (newtls_exceeded(s)) {
            session_close(s);
            kt_session_maybe_free(s);
            return;
        }
        session_start_tls(s);
        return;
    }
    session_enter_state(s, KT_SS_COMMAND);
    session_touch(s);
    send_banner(s);
    session_process(s);
}

/* ---- PROXY protocol ----
 * Behind a proxy the connection's own address is the proxy's: nothing may
 * be decided on it. The session starts (limits, banner) only once the
 * header named the client; anything else closes the connection. */

static void proxy_poll(struct kt_session *s);

static void proxy_readable(struct kt_op *op, int res, unsigned flags)
{
    struct kt_session *s = (struct kt_session *)((char *)op - offsetof(struct kt_session, proxy_op));
    struct kt_proxy_header h;
    const char *why = NULL;
    s->pending--;
    if (s->dead) {
        kt_session_maybe_free(s);
        return;
    }
    int fd = kt_conn_fd(s->conn);
    int rc = res < 0 || fd < 0 ? -EIO : kt_proxy_read(fd, s->proxy_buf, &s->proxy_have, &h, &why);
    if (rc == 0) {
        proxy_poll(s);
        return;
    }
    if (rc < 0) {
        kt_warn("haproxy read from %s: %s; closing", s->addr, why ? why : strerror(-res));
        session_close(s);
        kt_session_maybe_free(s);
        return;
    }
    kt_free(s->proxy_buf);
    s->proxy_buf = NULL;
    s->wait = KT_WAIT_NONE;
    if (!h.local) {
        /* the real client, for everything from here on */
        snprintf(s->addr, sizeof(s->addr), "%s", h.addr);
        s->port = h.port;
        char peer[sizeof(s->addr) + 16];
        snprintf(peer, sizeof(peer), "unknown[%s]", s->addr);
        kt_conn_set_peer(s->conn, peer);
    }
    session_begin(s);
}

static void proxy_poll(struct kt_session *s)
{
    s->proxy_op.cb = proxy_readable;
    s->pending++;
    io_uring_prep_poll_add(kt_loop_sqe(&s->worker->loop, &s->proxy_op), kt_conn_fd(s->conn), POLLIN);
}

static void proxy_start(struct kt_session *s)
{
    s->proxy_buf = kt_malloc(KT_PROXY_MAX_HEADER);
    s->proxy_have = 0;
    s->wait = KT_WAIT_PROXY;
    session_enter_state(s, KT_SS_COMMAND);
    s->deadline = time(NULL) + s->cfg->upstream_proxy_timeout_s;
    proxy_poll(s);
}

void kt_session_start(struct kt_worker *w, int fd, const struct sockaddr *sa, socklen_t salen,
                      struct kt_runtime *rt, const struct kt_smtpd_settings *cfg)
{
    struct kt_session *s = kt_calloc(1, sizeof(*s));
    s->helo = no_helo;
    s->worker = w;
    s->rt = kt_runtime_ref(rt);
    s->cfg = cfg;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, s->addr, sizeof(s->addr));
        s->port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
            inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], s->addr, sizeof(s->addr));
        else
            inet_ntop(AF_INET6, &in6->sin6_addr, s->addr, sizeof(s->addr));
        s->port = ntohs(in6->sin6_port);
    } else {
        snprintf(s->addr, sizeof(s->addr), "unknown");
    }
    (void)salen;
    char peer[sizeof(s->addr) + 16];
    snprintf(peer, sizeof(peer), "unknown[%s]", s->addr);
    s->conn = kt_conn_new(&w->loop, fd, KT_CONN_SERVER, peer, &s->in, &s->out, on_conn_event, s);
    s->next = w->sessions;
    if (w->sessions)
        w->sessions->prev = s;
    w->sessions = s;
    w->n_sessions++;
    kt_metric_inc(KT_M_CONN_SMTPD);
    if (cfg->upstream_proxy) {
        proxy_start(s);
        return;
    }
    session_begin(s);
}
