/* Milter client: the Sendmail mail filter protocol (version 2 to 6), as
 * Postfix's milter8 speaks it.
 *
 * A struct kt_milter_set is the parsed smtpd_milters (or non_smtpd_milters)
 * of one service with the milter_* parameters; it is built once per
 * configuration generation and shared read-only. A struct kt_milters is one
 * SMTP session's (or one locally submitted message's, queue/pickup.c)
 * conversation with every milter of its set, in order: each SMTP
 * event (connect, HELO, MAIL, RCPT, DATA, end of message, unknown command)
 * goes to the first milter, then to the next, until one of them decides, and
 * the session hears the outcome through a callback. All socket I/O is on
 * the session's io_uring (connect, send, recv, each bounded by a linked
 * timeout), so a slow filter holds only its own session.
 *
 * At the end of the message the message file (already spooled, not yet
 * committed) is read back and sent as header and body events; each milter's
 * modifications (headers, body, sender, recipients) are applied to an
 * in-memory view of the message that the next milter sees, as Postfix's
 * cleanup does, and kt_milters_write() then writes the edited message into
 * a new delivery. A milter that cannot be reached, times out or breaks the
 * protocol is handled by its default_action (milter_default_action). */
#ifndef KTRELAY_MILTER_H
#define KTRELAY_MILTER_H

#include <stddef.h>
#include <sys/types.h>

#include "core/loop.h"

struct kt_delivery;

/* milter_default_action */
enum kt_milter_default { KT_MILTER_DEF_TEMPFAIL, KT_MILTER_DEF_ACCEPT, KT_MILTER_DEF_REJECT,
                         KT_MILTER_DEF_QUARANTINE };

/* Macro stages, in the order of Postfix's milter_*_macros parameters. */
enum kt_milter_stage { KT_MS_CONNECT, KT_MS_HELO, KT_MS_MAIL, KT_MS_RCPT, KT_MS_DATA, KT_MS_EOH, KT_MS_EOD,
                       KT_MS_UNKNOWN, KT_MS_COUNT };

/* One milter: its socket and its own settings (Postfix's "{ name, key=value, ... }" form). */
struct kt_milter_conf {
    char *endpoint;                  /* "inet:host:port" or "unix:/path" as configured */
    int family;                      /* AF_INET, AF_INET6 or AF_UNIX */
    char host[256];                  /* inet: host or address; unix: the path */
    unsigned port;
    enum kt_milter_default default_action;
    long long connect_timeout_ms, command_timeout_ms, content_timeout_ms;
    unsigned protocol;               /* milter_protocol: 2 .. 6 */
};

struct kt_milter_set {
    size_t n;
    struct kt_milter_conf *v;
    char *macros[KT_MS_COUNT];       /* milter_*_macros: space-separated names */
    long long message_size_limit;    /* bytes; bounds a replaced body (SMFIR_REPLBODY); 0 = unlimited */
};

/* What the main.cf parameters give the parser (times in seconds, as kt_config_get_time returns). */
struct kt_milter_defaults {
    const char *default_action;      /* milter_default_action */
    const char *protocol;            /* milter_protocol */
    long long connect_timeout_s, command_timeout_s, content_timeout_s;
    const char *macros[KT_MS_COUNT];
    long long message_size_limit;    /* message_size_limit, bytes; 0 = unlimited */
};

/* Parse a smtpd_milters value ("inet:127.0.0.1:8891, unix:/run/x.sock, { inet:h:p, default_action=accept,
 * command_timeout=10s }"). *out is NULL for an empty list. 0, or -EINVAL with err set (fail closed: an
 * unknown key or value is an error, not a warning). */
int kt_milter_set_parse(const char *list, const struct kt_milter_defaults *def, struct kt_milter_set **out,
                        char *err, size_t errlen);
void kt_milter_set_free(struct kt_milter_set *set);
/* 0 when value is one of Postfix's milter_default_action values (tempfail, accept, reject, quarantine;
 * ktrelay refuses Postfix's "shutdown"), else -EINVAL. */
int kt_milter_default_parse(const char *value, enum kt_milter_default *out);

/* The outcome of one event, for the session. reply is a complete SMTP reply (possibly multi-line, lines
 * separated by CRLF, without the final CRLF) when verdict is REJECT or SHUTDOWN. */
enum kt_milter_verdict {
    KT_MILTER_CONTINUE,              /* go on (every milter continued or accepted) */
    KT_MILTER_REJECT,                /* refuse with reply (4xx or 5xx) */
    KT_MILTER_DISCARD,               /* accept and drop the message (end of message, or at MAIL/RCPT for it) */
    KT_MILTER_SHUTDOWN,              /* reply 421 and close */
};

struct kt_milter_result {
    enum kt_milter_verdict verdict;
    char reply[1024];
    int hold;                        /* a milter asked for quarantine (hold queue) */
    char hold_reason[128];
    int edited;                      /* end of message: headers or body changed */
    int envelope_edited;             /* end of message: sender or recipients changed */
};

/* Values of macros for the session: the value of name ("j", "{mail_addr}", ...) or NULL when undefined
 * (not sent). buf is scratch space the function may use for the value. */
typedef const char *(*kt_milter_macro_fn)(void *arg, const char *name, char *buf, size_t len);
/* Completion of an event; r is valid during the call only. Never called re-entrantly from a kt_milters_*
 * call, never after kt_milters_free. */
typedef void (*kt_milter_cb)(void *arg, const struct kt_milter_result *r);

struct kt_milters;

/* A session's milters (set must outlive it: the runtime's). NULL when set is NULL or empty. */
struct kt_milters *kt_milters_new(struct kt_loop *loop, const struct kt_milter_set *set, kt_milter_macro_fn macro,
                                  void *macro_arg);
/* Ends the conversations (SMFIC_QUIT) and frees the object once its I/O in flight has completed; no
 * callback fires after this. NULL is fine. */
void kt_milters_free(struct kt_milters *ms);

/* Events. Each calls cb once, later, from the loop. family: '4', '6' or 'U' (unknown); addr may be NULL. */
void kt_milters_connect(struct kt_milters *ms, const char *hostname, int family, const char *addr, unsigned port,
                        kt_milter_cb cb, void *arg);
void kt_milters_helo(struct kt_milters *ms, const char *helo, kt_milter_cb cb, void *arg);
/* args: the path in angle brackets, then each ESMTP parameter; n of them. */
void kt_milters_mail(struct kt_milters *ms, const char *const *args, size_t n, kt_milter_cb cb, void *arg);
void kt_milters_rcpt(struct kt_milters *ms, const char *const *args, size_t n, kt_milter_cb cb, void *arg);
/* SMFIC_DATA (protocol 4 and later); at most once per message, later calls continue at once. */
void kt_milters_data(struct kt_milters *ms, kt_milter_cb cb, void *arg);
void kt_milters_unknown(struct kt_milters *ms, const char *line, kt_milter_cb cb, void *arg);
/* The message ended (or was refused before its end): SMFIC_ABORT to every milter that saw it. */
void kt_milters_abort(struct kt_milters *ms);
/* 1 while a message (MAIL accepted by the milters) is open. */
int kt_milters_in_message(const struct kt_milters *ms);

/* End of message. The message is len bytes at offset off of fd (read with pread; the file was just written
 * by this process), CRLF line ends; fd is duplicated, the caller's may close after cb. The first `fixed`
 * headers (the trace headers of a final delivery) are not shown to the milters and stay first;
 * skip_received: the header after them is our own Received:, not shown either (as Postfix). sender: the
 * envelope sender without brackets ("" = null sender); rcpts: the n envelope recipients. */
void kt_milters_eom(struct kt_milters *ms, int fd, off_t off, off_t len, size_t fixed, int skip_received,
                    const char *sender, const char *const *rcpts, size_t n, kt_milter_cb cb, void *arg);
/* After an end-of-message result with envelope_edited: the edited envelope, valid until the next message. */
const char *kt_milters_sender(const struct kt_milters *ms);
size_t kt_milters_rcpts(const struct kt_milters *ms, const char *const **rcpts);
/* Appends the edited message (headers, then the body from the file or as replaced) to d, which must be open;
 * keep_fixed 0 leaves out the `fixed` headers (the message goes to the queue instead of a final delivery).
 * cb(arg, 0 or -errno) once every byte is handed to d (d's drain callback is used meanwhile); cb may run
 * before this returns. */
void kt_milters_write(struct kt_milters *ms, struct kt_delivery *d, int keep_fixed, void (*cb)(void *arg, int res),
                      void *arg);
/* The same, synchronously into memory, every header included: for a message small enough to be held there
 * (a local submission, at most message_size_limit). Appends to out; 0 or -errno (reading the body back). */
struct kt_buf;
int kt_milters_render(struct kt_milters *ms, struct kt_buf *out);

/* For the fuzz target (tests/fuzz/fuzz_milter.c): one session's events (connect, HELO, an unknown command
 * when flags & 16, MAIL, RCPT, DATA, the end of the message held in msg_fd, msg_len bytes from offset 0)
 * through one milter of milter_protocol `protocol` whose replies are the `len` bytes of replies, read as
 * the ring would (in slices of 4096 bytes, or 1 with flags & 8; the end of them is the milter closing),
 * without a loop or a socket. flags & 3: its default_action; flags & 4: message_size_limit = 64. check
 * sees each event's outcome. 0; -EDEADLK when an event got no outcome (or two); -EPROTO when the edited
 * message broke what any milter input must leave intact (header names and folding, envelope addresses
 * on one line, the replaced body's limit). */
int kt_milter_replay(const unsigned char *replies, size_t len, unsigned protocol, unsigned flags, int msg_fd,
                     off_t msg_len, void (*check)(void *arg, const struct kt_milter_result *r), void *arg);

#endif
