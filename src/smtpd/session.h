/* One SMTP server session. The protocol logic (session.c) sees the network
 * only through its connection (tls/conn.h), which hides whether bytes move as
 * plaintext, through userspace OpenSSL, or through kernel TLS, and owns the
 * socket and the SSL. The session owns the connection's input and output
 * buffers and is freed only after the connection reported itself closed. */
#ifndef KTRELAY_SESSION_H
#define KTRELAY_SESSION_H

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <stdint.h>
#include <time.h>

#include "core/buf.h"
#include "core/loop.h"
#include "delivery/resolve.h"
#include "smtpd/smtp_parse.h"
#include "delivery/header_scan.h"
#include "tls/tls.h"

struct kt_worker;
struct kt_runtime;
struct kt_smtpd_settings;
struct kt_delivery;
struct kt_cleanup;
struct kt_auth_req;
struct kt_conn;
struct dns_job;
struct kt_dns_result;

/* Where the session stands. Every change goes through session_enter_state()
 * (session.c), which logs "old -> new" at verbose level (ktrelay run -v). */
enum kt_session_state {
    KT_SS_NEW,            /* accepted, nothing sent or read yet */
    KT_SS_HANDSHAKE,      /* TLS handshake in progress (wrapper mode or after STARTTLS) */
    KT_SS_COMMAND,        /* reading command lines */
    KT_SS_AUTH,           /* reading an AUTH response after "334" (RFC 4954 4) */
    KT_SS_DATA,           /* reading a DATA body, then until its commit completes */
    KT_SS_BDAT,           /* reading a BDAT chunk, then until the LAST chunk's commit completes */
    KT_SS_CLOSING,        /* flushing the last reply, then close */
};

/* State name for logs ("COMMAND"); "?" for values out of range. */
const char *kt_session_state_str(enum kt_session_state st);

/* What blocks input processing until an asynchronous step completes. */
enum kt_session_wait {
    KT_WAIT_NONE,
    KT_WAIT_OPEN,         /* spool file being created before 354 / first BDAT chunk */
    KT_WAIT_COMMIT,       /* message being made durable before 250 */
    KT_WAIT_SPLICE,       /* BDAT bytes moving socket -> pipe -> file */
    KT_WAIT_DRAIN,        /* spool writes behind: stop reading until they catch up */
    KT_WAIT_STARTTLS,     /* "220 Ready to start TLS" being sent */
    KT_WAIT_AUTH,         /* password check on the auth pool, or the delay after a failure */
    KT_WAIT_TARPIT,       /* error reply held for smtpd_error_sleep_time (soft error limit) */
    KT_WAIT_PROXY,        /* reading the PROXY protocol header, before the banner */
    KT_WAIT_DNS,          /* DNS answers for the client's names or a restriction */
    KT_WAIT_MILTER,       /* a milter's answer (smtpd_milters), or the message being rewritten after it */
};

/* Which response an AUTH exchange waits for (KT_SS_AUTH). */
enum kt_auth_step {
    KT_AUTH_NONE,             /* no exchange, or the check is in flight */
    KT_AUTH_PLAIN_RESPONSE,   /* "334 " sent, waiting for the PLAIN message */
    KT_AUTH_LOGIN_USER,       /* "334 VXNlcm5hbWU6" sent */
    KT_AUTH_LOGIN_PASS,       /* "334 UGFzc3dvcmQ6" sent */
};

/* Counters for the disconnect log line, like Postfix's "ehlo=1 mail=1 ...". */
struct kt_cmd_counts {
    unsigned helo, ehlo, starttls, auth, mail, rcpt, data, bdat, rset, noop, vrfy, quit, unknown, total;
    unsigned helo_ok, ehlo_ok, auth_ok, mail_ok, rcpt_ok, data_ok, bdat_ok;
};

/* One mail transaction (RFC 5321 3.3): created by a successful MAIL,
 * released by RSET, HELO/EHLO, STARTTLS, the end of the message (whatever
 * its outcome) and the end of the session. Owned by its session. */
struct kt_smtpd_txn {
    char queue_id[24];                     /* given at MAIL (kt_queue_new_id) */
    int client_logged;                     /* "client=" logged at the first accepted RCPT */
    char sender[513];                      /* reverse-path without brackets; "" for <>: what restrictions see */
    char sender_full[520];                 /* completed (append_at_myorigin): what is queued and logged */
    struct timespec t_start;               /* MAIL time, for delay= */
    int body_8bit;                         /* BODY=8BITMIME or BINARYMIME */
    /* message properties for the queue envelope (queue.h): SMTPUTF8, BODY=, RET=, ENVID= */
    int smtputf8;
    int body;                              /* enum kt_qbody */
    int ret;                               /* enum kt_qret */
    char envid[104];                       /* xtext as received (at most 100), "" = none */
    /* per recipient, in the order of rcpts (NULL until a recipient has NOTIFY or ORCPT) */
    unsigned *rcpt_notify;                 /* KT_QNOTIFY_* bits */
    char **rcpt_orcpt;                     /* "addr-type;xtext" or NULL */
    size_t rcpt_dsn_cap;                   /* entries in both */
    size_t dsn_bytes;                      /* what NOTIFY and ORCPT add to the queue envelope */
    int want_success;                      /* a recipient asked for NOTIFY=SUCCESS: through the queue */
    struct kt_buf rcpts;                   /* NUL-separated recipient addresses (after address rewriting) */
    struct kt_buf orig_rcpts;              /* the same count: each one's address before rewriting */
    char filter[256];                      /* content_filter or FILTER (KT_FILTER_MAX); "" = none */
    int queue_all;                         /* a recipient the queue manager must handle: queue the message */
    unsigned n_rcpts;                      /* all accepted recipients, local and relayed */
    struct kt_buf relay_rcpts;             /* NUL-separated recipients to relay (handed over at end of data) */
    unsigned n_relay_rcpts;
    struct kt_mailbox *mailboxes;          /* distinct Maildirs of the local recipients */
    size_t n_mailboxes;
    long long rcpt_overshoot;              /* recipients refused past smtpd_recipient_limit */
    struct kt_delivery *delivery;          /* from the first DATA/BDAT on; owned */
    struct kt_data_parser dp;              /* line-ending rule for DATA, or for all BDAT chunks */
    int nl_reject;                         /* smtpd_forbid_bare_newline = reject applies to this client */
    int msg_too_big;                       /* message_size_limit passed: refuse at the end */
    int bdat_failed;                       /* a BDAT was refused: refuse every chunk until RSET/MAIL */
    char bdat_error[96];                   /* the reply those chunks get */
    unsigned long long msg_bytes;          /* stored (canonical) body bytes so far */
    unsigned long long bdat_received;      /* chunk bytes received (RFC 3030 replies) */
    struct kt_header_scan hdrscan;         /* Message-ID for the log, read as the body streams in */
    struct kt_cleanup *cleanup;            /* header and body checks (smtpd/cleanup.h) while spooling; owned */
    int queued;                            /* spooled as a queue file (relayed recipients or checks_need_queue) */
    unsigned long long msg_off;            /* where the message starts in the spool file (after a queue envelope) */
    int milter_discard;                    /* a milter discarded the message: 250, then dropped */
    int milter_hold;                       /* a milter quarantined it: queued on hold */
    struct kt_buf skip_notes;              /* NUL-separated kt_resolve_skipped_note()s of accepted recipients,
                                            * logged if the message is delivered here (the queue manager
                                            * logs its own when it delivers) */
};

/* What the milter events of a session need (allocated only with smtpd_milters: idle sessions stay small). */
struct kt_session_milter {
    char rcpt[520];                        /* the recipient of the RCPT being checked ({rcpt_addr}) */
    char params[520];                      /* its ESMTP parameters (or MAIL's), or an unknown command line */
    size_t undo_rcpts, undo_relay;         /* the transaction before that RCPT, restored if a milter refuses */
    unsigned undo_n_rcpts, undo_n_relay;
    size_t undo_n_mailboxes;
    size_t undo_dsn_bytes;
    int undo_want_success;
    size_t undo_skip_notes;                /* t->skip_notes.len before that RCPT */
    int undo_queue_all;
};

/* A client certificate's fingerprints (smtpd_tls_fingerprint_digest, "AB:CD:..."): allocated only for a
 * session whose client sent one, which keeps an idle session small. */
struct kt_ccert_fps {
    char cert[KT_TLS_FP_MAX];
    char pkey[KT_TLS_FP_MAX];              /* of its public key */
};

struct kt_session {
    struct kt_session *next, *prev;        /* worker's session list */
    struct kt_worker *worker;
    struct kt_runtime *rt;                 /* reference held for the session's life */
    const struct kt_smtpd_settings *cfg;
    struct kt_conn *conn;                  /* NULL once it reported itself closed */
    char addr[INET6_ADDRSTRLEN];
    int port;
    enum kt_session_state state;
    enum kt_session_wait wait;
    unsigned pending;                      /* own io_uring operations (timers, AUTH) in flight */
    int dead;                              /* connection closing: finish and free */
    int anvil_exempt;                      /* smtpd_client_event_limit_exceptions matched */
    int anvil_connected;                   /* counted by kt_anvil_connect: uncount at the end */
    time_t deadline;                       /* idle/handshake timeout, checked by the worker tick */

    struct kt_buf in, out;                 /* lent to the connection */
    int discard_line;                      /* skipping the rest of an over-long command line */
    int cmd_pipelined;                     /* more input was waiting behind the current command */
    int improper_pipelining;               /* input followed a command that must end a group (RFC 2920 3.1) */

    /* TLS */
    int tls_on;                            /* handshake done, all I/O is TLS */
    int tls_used_starttls;
    struct timespec tls_t0;                /* handshake start, for ktrelay_tls_handshake_seconds */
    enum kt_ccert ccert;                   /* client certificate: none, untrusted, trusted (verified) */
    struct kt_ccert_fps *ccert_fps;        /* with a client certificate only: its fingerprints */

    /* PROXY protocol (smtpd_upstream_proxy_protocol = haproxy) */
    struct kt_op proxy_op;                 /* readability poll while the header is read */
    unsigned char *proxy_buf;              /* header bytes so far (KT_PROXY_MAX_HEADER), NULL after it */
    size_t proxy_have;

    /* client names (smtpd_peername_lookup), NULL = "unknown"; statuses KT_NAME_* (policy.h) */
    char *client_name;                     /* forward-confirmed name */
    char *reverse_name;                    /* PTR name, confirmed or not */
    int client_name_status, reverse_name_status;
    struct dns_job *dns_job;               /* queries in flight for this session */
    void (*dns_resume)(struct kt_session *s);
    unsigned dns_rounds;                   /* fetch rounds for the current step */
    struct kt_dns_result *dns_answers;     /* answers fetched for the current step */
    unsigned n_dns_answers;
    int cmd_replay;                        /* the current command runs again after DNS answers */

    /* SMTP state */
    const char *helo;                      /* never NULL: "" (a static string) until HELO/EHLO, else owned */
    int esmtp;
    int errors;                            /* error replies since the last accepted message (Postfix forgives
                                            * a client's errors when a message is received) */
    long long junk_cmds;                   /* HELO, EHLO, RSET, NOOP, VRFY, ETRN since then */
    int tarpit_owed;                       /* an error reply past the soft limit awaits its delay */
    struct kt_cmd_counts counts;

    /* SASL AUTH */
    char sasl_username[256];               /* "" until authenticated */
    const char *sasl_method;               /* "PLAIN", "LOGIN" */
    enum kt_auth_step auth_step;
    struct kt_auth_req *auth_req;          /* check in flight or being collected */
    unsigned auth_failures;                /* in this session */
    char *auth_reply;                      /* failure reply held back during the delay, NULL without */
    struct kt_op delay_op;
    struct __kernel_timespec delay_ts;

    /* milters (smtpd_milters): NULL without */
    struct kt_milters *milters;
    int milter_stage;                      /* the event awaited (session.c) */
    size_t milter_mark;                    /* output length before the reply the milter may overrule */
    int milter_greeting;                   /* connect refused by a milter: 554 or 421 instead of 220 */
    int milter_keep_fixed;                 /* the rewritten message keeps the trace headers of a final delivery */
    struct kt_session_milter *mstate;     /* with milters only: what their events need */

    /* mail transaction: NULL outside one */
    struct kt_smtpd_txn *txn;

    /* BDAT chunk being read (RFC 3030); set by every BDAT, also one refused outside a transaction */
    unsigned long long bdat_left;          /* bytes of the current chunk still to read */
    int bdat_last;                         /* the current chunk is the LAST */
    int bdat_refused;                      /* the chunk is read and thrown away, then bdat_error is sent */
    char *bdat_error;                      /* reply owed at the end of a refused chunk, NULL without */
    unsigned long long rate_credit_ms;     /* body bytes not yet turned into deadline seconds */
};

/* smtpd_milter.c: the value of a Sendmail macro for this session (kt_milter_macro_fn) */
const char *kt_session_milter_macro(void *arg, const char *name, char *buf, size_t len);

/* session.c */
void kt_session_start(struct kt_worker *w, int fd, const struct sockaddr *sa, socklen_t salen,
                      struct kt_runtime *rt, const struct kt_smtpd_settings *cfg);
void kt_session_timeout(struct kt_session *s);
void kt_session_shutdown(struct kt_session *s);       /* server stopping: 421 and close */
void kt_session_abort(struct kt_session *s);          /* drain deadline: close without a reply */
/* Free s once it is closing, its own operations are done and its connection
 * reported itself closed; otherwise nothing. */
void kt_session_maybe_free(struct kt_session *s);

#endif
