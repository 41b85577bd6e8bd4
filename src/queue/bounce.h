/* Delivery status notifications (RFC 3464): a multipart/report with a
 * human-readable part, a message/delivery-status part and the original
 * message (whole, or its headers), queued with the null sender so that no
 * notification is ever sent about a notification. Which recipients are
 * reported follows their NOTIFY parameter (RFC 3461 4.1; the caller picks
 * them), what is returned the message's RET parameter (RFC 3461 4.3), as
 * Postfix's bounce(8) does. */
#ifndef KTRELAY_BOUNCE_H
#define KTRELAY_BOUNCE_H

#include <stddef.h>
#include <time.h>

#include "queue/queue.h"

/* failed: non-delivery (Action: failed); delayed: delay warning; success: delivered or relayed (NOTIFY=SUCCESS). */
enum kt_dsn_kind { KT_DSN_FAILED, KT_DSN_DELAYED, KT_DSN_SUCCESS };

/* Per-recipient entry of the report. reason as stored by the queue manager,
 * "DSN-STATUS REMOTE-MTA DIAGNOSTIC" (REMOTE-MTA "-" when none). orcpt: the ORCPT
 * parameter ("addr-type;xtext") or NULL (then "rfc822;ADDR", as Postfix reports).
 * action: for KT_DSN_SUCCESS, "delivered" (final delivery) or "relayed" (passed to
 * a next hop that does not offer DSN, RFC 3461 5.2.2). */
struct kt_dsn_rcpt {
    const char *addr;
    const char *reason;
    const char *orcpt;
    const char *action;
};

/* The reported message. original/original_len: its headers, or all of it when full. envid: the ENVID
 * parameter (xtext) or NULL. retry_until: for KT_DSN_DELAYED. eight_bit: it was declared 8BITMIME. */
struct kt_dsn_msg {
    const char *id;
    const char *orig_sender;
    time_t arrival;
    const char *envid;
    const char *original;
    size_t original_len;
    int full;
    int eight_bit;
    time_t retry_until;
};

/* The notification text (CRLF line ends), kt_malloc'ed. */
char *kt_dsn_build(enum kt_dsn_kind kind, const char *myhostname, const struct kt_dsn_msg *msg,
                   const struct kt_dsn_rcpt *rcpts, size_t n);
/* Build and queue a notification for m to its sender (no-op, returning 1, for the null sender). fd: the
 * queue file (the original is read from it; -1: none). A failure notice returns the whole message unless
 * RET=HDRS or the message is larger than size_limit bytes (bounce_size_limit; Postfix then returns the
 * headers only); delay and success notices return the headers. new_id receives the notification's queue
 * id. 0 or -errno. */
int kt_dsn_send(const char *qdir, const char *myhostname, enum kt_dsn_kind kind, const struct kt_qmsg *m, int fd,
                const struct kt_dsn_rcpt *rcpts, size_t n, time_t retry_until, long long size_limit, char *new_id,
                size_t idlen);

#endif
