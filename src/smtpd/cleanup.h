/* Header and body checks applied while a message streams in, as Postfix's cleanup(8) applies
 * header_checks, mime_header_checks, nested_header_checks and body_checks (header_checks(5)).
 *
 * The session feeds the canonical message bytes (CRLF line ends, dots removed) as they arrive; the
 * checker cuts them into lines, holds one logical header at a time (a header and its folded
 * continuation lines, at most header_size_limit bytes: the excess is dropped, as Postfix does), looks it
 * up when it is complete, and passes every byte it keeps to its output function. Nothing else of the
 * message is held: body lines are checked one by one (a line longer than KT_CLEANUP_LINE_MAX is checked
 * in pieces of that size, as Postfix checks pieces of line_length_limit), and only in the first
 * body_checks_size_limit bytes of the body (0 = all).
 *
 * Which table applies (Postfix's classes): MIME headers (Content-*, MIME-Version) anywhere, and every
 * header of a multipart body part, go to mime_header_checks; other headers of the message to
 * header_checks; other headers of an attached message/rfc822 to nested_header_checks. The MIME tracker
 * is minimal: Content-Type multipart/... with a boundary= parameter opens a level (up to
 * KT_CLEANUP_MIME_DEPTH nested levels; deeper ones are body text), a "--boundary" line starts a part's
 * headers, "--boundary--" closes the level, a part or message of type message/rfc822 is followed by
 * nested headers. Encoded content (base64, quoted-printable) is not decoded: body_checks see the
 * lines as sent, as in Postfix.
 *
 * Lookup keys: a header with its folded lines joined by "\n" (the CRLF line ends removed), a body line
 * without its CRLF. Actions (the first word of the result, any case): REJECT [text], DISCARD [text],
 * WARN [text], INFO [text], HOLD [text], FILTER transport:destination, REDIRECT user@domain,
 * PREPEND text, REPLACE text, IGNORE, DUNNO and OK. After REJECT, DISCARD or REDIRECT no more checks
 * run. Each action is logged as Postfix's cleanup logs it:
 *   QUEUEID: reject: header Subject: hi from name[addr]; from=<s> to=<r> proto=ESMTP helo=<h>: 5.7.1 text
 * A bad action (unknown word, PREPEND or REPLACE of a header with text that is not "name: value",
 * REDIRECT without '@', FILTER without ':') is a warning and the line is kept. */
#ifndef KTRELAY_CLEANUP_H
#define KTRELAY_CLEANUP_H

#include <stddef.h>

#define KT_CLEANUP_LINE_MAX 2048
#define KT_CLEANUP_MIME_DEPTH 100   /* Postfix's mime_nesting_limit */

/* The tables of one configuration (per service), shared read-only by every session using it. */
struct kt_cleanup_checks;

struct kt_cleanup_params {
    const char *header_checks, *mime_header_checks, *nested_header_checks, *body_checks;   /* map lists */
    long long header_size_limit;        /* bytes of one logical header kept; > 0 */
    long long body_checks_size_limit;   /* body bytes that body_checks look at; 0 = all */
};

/* NULL *out (and 0) when every list is empty: there is nothing to check. -errno with err set when a
 * table cannot be opened. */
int kt_cleanup_checks_new(const struct kt_cleanup_params *p, struct kt_cleanup_checks **out, char *err,
                          size_t errlen);
/* 1 when some table can answer HOLD, REDIRECT or FILTER (or a result that starts with a $n), so that a
 * message must go through the queue whatever its recipients. */
int kt_cleanup_checks_need_queue(const struct kt_cleanup_checks *c);
void kt_cleanup_checks_free(struct kt_cleanup_checks *c);

/* Output for the bytes kept: returns 1 when the writer is behind (the caller should stop feeding until
 * it drains), else 0. */
typedef int (*kt_cleanup_out_fn)(void *arg, const char *data, size_t len);

/* Who sent the message, for the log lines; copied. */
struct kt_cleanup_origin {
    const char *queue_id;
    const char *client;    /* "name[addr]" */
    const char *sender;    /* "" for the null sender */
    const char *rcpt;      /* the first recipient */
    const char *proto;     /* "ESMTP", ... */
    const char *helo;      /* "" when none */
};

enum kt_cleanup_verdict { KT_CLEANUP_ACCEPT, KT_CLEANUP_REJECT, KT_CLEANUP_DISCARD };

struct kt_cleanup;
struct kt_cleanup *kt_cleanup_new(const struct kt_cleanup_checks *checks, const struct kt_cleanup_origin *o,
                                  kt_cleanup_out_fn out, void *arg);
/* The next message bytes. Returns 1 when the output reported it is behind during this call. */
int kt_cleanup_feed(struct kt_cleanup *c, const char *data, size_t len);
/* End of the message: the last line and header are checked and written. Returns like kt_cleanup_feed. */
int kt_cleanup_finish(struct kt_cleanup *c);
enum kt_cleanup_verdict kt_cleanup_verdict(const struct kt_cleanup *c);
/* For REJECT: the SMTP reply, "550 5.7.1 message content rejected" or "451 4.x.x text". */
const char *kt_cleanup_reply(const struct kt_cleanup *c);
int kt_cleanup_hold(const struct kt_cleanup *c);               /* HOLD was asked for */
const char *kt_cleanup_redirect(const struct kt_cleanup *c);   /* REDIRECT address, or NULL */
const char *kt_cleanup_filter(const struct kt_cleanup *c);     /* FILTER transport:destination, or NULL */
void kt_cleanup_free(struct kt_cleanup *c);

#endif
