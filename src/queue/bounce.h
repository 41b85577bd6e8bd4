/* Delivery status notifications (RFC 3464): a multipart/report with a
 * human-readable part, a message/delivery-status part and the original
 * message's headers, queued with the null sender so that no notification
 * is ever sent about a notification. */
#ifndef KTRELAY_BOUNCE_H
#define KTRELAY_BOUNCE_H

#include <stddef.h>
#include <time.h>

#include "queue/queue.h"

enum kt_dsn_kind { KT_DSN_FAILED, KT_DSN_DELAYED };

/* Per-recipient line of the report: reason as stored by the queue manager,
 * "DSN-STATUS REMOTE-MTA DIAGNOSTIC" (REMOTE-MTA "-" when none). */
struct kt_dsn_rcpt {
    const char *addr;
    const char *reason;
};

/* The notification text (CRLF line ends), kt_malloc'ed. headers/headers_len:
 * the original message's header section. retry_until: for KT_DSN_DELAYED. */
char *kt_dsn_build(enum kt_dsn_kind kind, const char *myhostname, const char *id, const char *orig_sender,
                   time_t arrival, const struct kt_dsn_rcpt *rcpts, size_t n, const char *headers,
                   size_t headers_len, time_t retry_until);
/* Build and queue a notification for m to its sender (no-op, returning 1, for
 * the null sender). new_id receives the notification's queue id. 0 or -errno. */
int kt_dsn_send(const char *qdir, const char *myhostname, enum kt_dsn_kind kind, const struct kt_qmsg *m, int fd,
                const struct kt_dsn_rcpt *rcpts, size_t n, time_t retry_until, char *new_id, size_t idlen);

#endif
