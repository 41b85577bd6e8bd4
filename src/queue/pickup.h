/* Local submission: the maildrop/ directory and its pickup, in the manner of
 * Postfix's postdrop and pickup(8).
 *
 * `ktrelay sendmail` run by a user who cannot write the queue drops the
 * message into queue_directory/maildrop/ (mode 1733, see
 * kt_queue_init_maildrop): a file with the queue envelope lines ("KTQUEUE 1",
 * "arrival", "sender", "rcpt"..., "body") and the message, written under a
 * dot name and renamed when complete. The daemon's pickup reads each
 * complete file, trusting nothing in it but what it can check: the submitter
 * is the file's owner (logged as uid=, named in the Received: header it
 * adds), the file must be a regular file with one link, of bounded size, with
 * a well-formed envelope; line ends are made CRLF and bare CRs dropped. It is
 * then queued under a new queue id like any message (durably, before the drop
 * file is removed) and logged as Postfix logs it:
 *   ktrelay/pickup: ID: uid=1000 from=<user@origin>
 *   ktrelay/cleanup: ID: message-id=<...>
 *   ktrelay/qmgr: ID: from=<user@origin>, size=N, nrcpt=N (queue active)
 * A malformed file is removed with a warning. */
#ifndef KTRELAY_PICKUP_H
#define KTRELAY_PICKUP_H

#include <stddef.h>
#include <sys/types.h>

struct kt_rewrite;
struct kt_pickup;
/* Pick up the complete files in P's queue_directory/maildrop, at most 1000 directory entries a call: a
 * pass through the directory goes on where the last call left it and ends at the end of the directory, so
 * each file is tried once a pass and files that stay (a recipient that cannot be rewritten, a full disk)
 * hide none behind them. size_limit: message_size_limit (0 = none). rw (may be NULL): canonical and
 * virtual alias rewriting of the envelope, as Postfix's cleanup applies to picked-up mail; a recipient
 * that cannot be rewritten keeps the drop file for a later try. content_filter (NULL or "" = none):
 * main.cf's, recorded in every message picked up, as Postfix's pickup service applies it.
 * Returns the number of messages queued (>= 0). Blocking file I/O: run it
 * where that is acceptable (the queue manager's tick). */
int kt_pickup_run(struct kt_pickup *p, long long size_limit, const char *hostname, const struct kt_rewrite *rw,
                  const char *content_filter);

/* What a drop file may carry (and `ktrelay sendmail` therefore refuses beyond it, before anything is
 * dropped or queued): at most this many recipients, and envelope addresses (without angle brackets) of at
 * most 512 bytes without a space, a control character, DEL, '<' or '>' (the queue keeps the envelope as
 * lines). kt_pickup_addr_ok: 1 when the n bytes at s are such an address. */
#define KT_PICKUP_MAX_RCPTS 10000
int kt_pickup_addr_ok(const char *s, size_t n);

/* The three log lines of a locally submitted message (also used by
 * `ktrelay sendmail` when it queues directly). msg: the message as queued. */
void kt_pickup_log(const char *id, uid_t uid, const char *sender, const char *msg, size_t len, size_t nrcpt);

/* With non_smtpd_milters, the same pickup runs every message through the milters first, as Postfix's
 * cleanup does for pickup mail (cleanup_milter_emul_*): connect from localhost[127.0.0.1] (family inet,
 * port 0), EHLO localhost, MAIL with the sender, RCPT for each recipient, DATA, then the message (our own
 * Received: not shown) and the end of message, with Postfix's non-SMTP macro values. One message at a
 * time, asynchronously on the queue manager's ring; the drop file stays in maildrop/ until the message as
 * the milters left it is durably queued (or returned, or discarded). Outcomes, as Postfix's:
 *   continue/accept: queued with the milters' changes (headers, body, sender, recipients);
 *   quarantine: queued into hold/ (logged milter-hold);
 *   discard: the drop file is removed (logged milter-discard);
 *   5xx (not at RCPT): returned to the sender in a non-delivery notification with the milter's reply;
 *   4xx, 421, or a 5xx at RCPT (Postfix's "can't reject recipient in non-smtpd(8) submission"): kept in
 *   maildrop/ and tried again after queue_run_delay.
 * A milter that is down answers with its default_action (milter_default_action). The pickup goes through
 * maildrop/ in passes, at most one a tick: every file is tried at most once a pass, so files the milters
 * keep deferring neither hide the others nor keep the milters busy in a loop. */
struct kt_loop;
struct kt_runtime;
struct kt_pickup;
/* qdir: the queue_directory the queue manager serves (copied). */
struct kt_pickup *kt_pickup_new(struct kt_loop *loop, const char *qdir);
/* Abandons a conversation in flight (its drop file stays for the next run). NULL is fine. */
void kt_pickup_free(struct kt_pickup *p);
/* The queue manager is stopping: the conversation under way ends, no other starts. */
void kt_pickup_stop(struct kt_pickup *p);
/* 1 while a message is with the milters. */
int kt_pickup_busy(const struct kt_pickup *p);
/* Starts on the next drop file unless a conversation runs; rt's qmgr settings (non_smtpd_milters, ...)
 * are used and rt referenced until the next generation comes. From the queue manager's tick. */
void kt_pickup_milter_run(struct kt_pickup *p, struct kt_runtime *rt);

#endif
