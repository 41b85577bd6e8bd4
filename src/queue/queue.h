/* The mail queue: one file per message under queue_directory, plus an
 * append-only status file per message.
 *
 * Layout:
 *   tmp/ID       being written; never acknowledged, removed at start-up
 *   new/ID       queued: envelope header, then the message (immutable)
 *   status/ID    per-recipient outcomes appended as they become final
 *   public/qmgr  FIFO on which a running queue manager hears of messages
 *                queued by other processes (kt_queue_notify), like Postfix's
 *
 * A message file starts with text lines
 *   "KTQUEUE 1\n" "arrival <epoch>\n" "sender <addr>\n" ["dots <0|1>\n"] ["canonical 1\n"]
 *   ["smtputf8 1\n"] ["encoding 7BIT|8BITMIME|BINARYMIME\n"] ["ret FULL|HDRS\n"] ["envid <xtext>\n"]
 *   ["filter <transport:nexthop>\n"]
 *   ("rcpt <addr>\n" ["notify SUCCESS,FAILURE,DELAY|NEVER\n"] ["orcpt <type;xtext>\n"] ["orig_rcpt <addr>\n"])...
 *   "body\n"
 * followed by the message bytes (CRLF line ends, not dot-stuffed) up to the
 * end of the file. "sender " with an empty address is the null sender. The optional lines carry the
 * message's properties as the client declared them: SMTPUTF8 (RFC 6531), BODY= (RFC 6152, 3030) and the
 * DSN parameters (RFC 3461) RET, ENVID and, on the lines after their recipient's, NOTIFY and ORCPT, with
 * ENVID and ORCPT kept in their xtext form. Files without them (older ones) mean none was given; unknown
 * lines are skipped. "filter" (Postfix's content_filter or an access table's FILTER action, its queue
 * file record L) sends the message, every recipient, to that next hop instead of routing it.
 * "orig_rcpt" (Postfix's record O) is the address its recipient had before address rewriting
 * (canonical_maps, virtual_alias_maps), for X-Original-To and the log's orig_to=; without it the two
 * are the same.
 * The status file holds lines "done N", "fail N REASON" (recipient N,
 * 0-based, is final; REASON is one line for the bounce) and "warn" (a delay warning went out); each append is fsync'd
 * before the outcome counts. A message whose recipients were all delivered
 * needs no "done" records: removing new/ID is its outcome, and the removal
 * is made durable by an fsync of new/ shared with other removals. A message
 * is created by writing tmp/ID, fsync, rename to new/ID, fsync of new/: once
 * the creator reports success the message survives a crash. Removal unlinks
 * new/ID first, then status/ID (an orphan status file is removed at the next
 * start). */
#ifndef KTRELAY_QUEUE_H
#define KTRELAY_QUEUE_H

#include <stddef.h>
#include <sys/types.h>
#include <time.h>

#include "core/loop.h"
#include "delivery/maildir.h"

enum kt_qrcpt_state { KT_QR_PENDING, KT_QR_DONE, KT_QR_FAILED };

/* NOTIFY (RFC 3461 4.1) bits of a recipient; 0 = no NOTIFY given (failures and delays are reported, as
 * Postfix does). NEVER is exclusive. */
enum { KT_QNOTIFY_NEVER = 1, KT_QNOTIFY_SUCCESS = 2, KT_QNOTIFY_FAILURE = 4, KT_QNOTIFY_DELAY = 8 };
/* BODY= as the client declared it (KT_QBODY_NONE: not given). */
enum kt_qbody { KT_QBODY_NONE, KT_QBODY_7BIT, KT_QBODY_8BITMIME, KT_QBODY_BINARYMIME };
/* RET= (RFC 3461 4.3; KT_QRET_NONE: not given, bounces return the full message as Postfix's do). */
enum kt_qret { KT_QRET_NONE, KT_QRET_FULL, KT_QRET_HDRS };

struct kt_qrcpt {
    char *addr;
    enum kt_qrcpt_state state;
    char *reason;                  /* for a failed recipient: "DSN MTA DIAGNOSTIC" as marked, or NULL */
    unsigned notify;               /* KT_QNOTIFY_* bits, 0 = none given */
    char *orcpt;                   /* ORCPT "addr-type;xtext" as received, or NULL */
    char *orig_rcpt;               /* the address before rewriting, NULL when it is addr itself */
};

/* The properties a writer stores with an envelope. envid: xtext, NULL = none. notify/orcpt: one entry per
 * recipient (NULL arrays or NULL entries: none given). All borrowed. */
struct kt_qprops {
    int smtputf8;
    enum kt_qbody body;
    enum kt_qret ret;
    const char *envid;
    const unsigned *notify;
    const char *const *orcpt;
    const char *filter;              /* content filter "transport:nexthop"; NULL or "" = none */
    const char *const *orig_rcpt;    /* per recipient: the address before rewriting (NULL, or equal = none) */
    int hold;                        /* kt_queue_write_props: commit into hold/ instead of new/ */
};

struct kt_qmsg {
    char *id;
    char *sender;                  /* "" = null sender */
    time_t arrival;
    int dots;                      /* -1 unknown, 0 no body line starts with '.', 1 some do */
    int canonical;                 /* 1: every body line ends in CRLF, no bare CR or LF ("canonical 1") */
    int warned;                    /* delay warning already sent */
    int deferred;                  /* a delivery attempt was deferred (status "defer" records) */
    size_t n_rcpts;
    struct kt_qrcpt *rcpts;
    off_t body_off, body_len;      /* message bytes in the file */
    int has_status;                /* status/ID exists (records were loaded or appended) */
    int smtputf8;                  /* the client asked for SMTPUTF8 */
    enum kt_qbody body;
    enum kt_qret ret;
    char *envid;                   /* ENVID in xtext, or NULL */
    char *filter;                  /* "transport:destination" of a content filter (content_filter, an access
                                      table's or header/body_checks' FILTER): every recipient goes there;
                                      NULL = routed as usual */
};

/* One status record for kt_queue_mark_many: recipient rcpt becomes state (done or failed with reason). */
struct kt_qmark {
    size_t rcpt;
    enum kt_qrcpt_state state;
    const char *reason;
};

#define KT_QUEUE_ID_MAX 300

/* Create tmp/ new/ status/ public/ hold/ (mode 0700) under qdir (0711 when made here). 0 or -errno. */
int kt_queue_init_dirs(const char *qdir);
/* maildrop/: where local users who cannot write the queue drop messages for
 * the daemon's pickup (sendmail). Mode 1733: anybody may create a file, nobody
 * but the owner may list it or remove another's file (sticky), like Postfix's
 * maildrop before postdrop. Made and checked by the daemon (its owner). */
int kt_queue_init_maildrop(const char *qdir);
/* Fresh queue id, Postfix's short form: 13 upper-case hex digits (seconds,
 * microseconds, a counter). Given when a transaction starts (MAIL, sendmail)
 * and kept by the message everywhere: log lines, queue file, Maildir names. */
void kt_queue_new_id(char *buf, size_t len);
/* The envelope header text (kt_malloc'ed). dots: -1 unknown, 0, 1. canonical: the body is known to hold
 * only CRLF line ends (every writer of this version makes it so; files without the line are sent through
 * the client's canonicalizing path). */
char *kt_queue_envelope(const char *sender, const char *const *rcpts, size_t n, time_t arrival, int dots,
                        int canonical, const struct kt_qprops *props);
/* The properties of a loaded message as a writer takes them, for the recipients idx[0..n) (requeue keeps
 * them, the content filter and the original recipients too). notify, orcpt and orig are caller arrays of n
 * entries; the strings stay m's. */
void kt_qmsg_props(const struct kt_qmsg *m, const size_t *idx, size_t n, unsigned *notify, const char **orcpt,
                   const char **orig, struct kt_qprops *out);
/* RFC 3461 4 xtext: decode s into out (cap bytes, NUL-terminated), every byte outside 0x20..0x7e shown as
 * '?', so that the result can go into a header field. */
void kt_xtext_decode(const char *s, char *out, size_t cap);
/* The reverse: out gets s with '+', '=' and bytes outside 33..126 as "+XX". */
void kt_xtext_encode(const char *s, char *out, size_t cap);
/* 1 when s is xtext of 1..max characters that decodes to printable ASCII (0x20..0x7e): an ENVID as
 * Postfix accepts it. */
int kt_xtext_printable(const char *s, size_t max);
/* NOTIFY names ("NEVER", or any of "SUCCESS", "FAILURE", "DELAY", comma-separated, any case) as
 * KT_QNOTIFY_* bits; 0 for anything else (RFC 3461 4.1, Postfix's sendmail -N). */
unsigned kt_notify_parse(const char *s);
/* Synchronous durable creation from memory. id (KT_QUEUE_ID_MAX bytes) is used when it holds a
 * string, else a fresh id is written there. 0 or -errno. */
int kt_queue_write(const char *qdir, const char *sender, const char *const *rcpts, size_t n, const void *body,
                   size_t len, char *id, size_t idlen);
/* The same with a given arrival time (requeue keeps the original one). */
int kt_queue_write_at(const char *qdir, time_t arrival, const char *sender, const char *const *rcpts, size_t n,
                      const void *body, size_t len, char *id, size_t idlen);
/* The same with the message's properties (props may be NULL; props->hold commits into hold/). */
int kt_queue_write_props(const char *qdir, time_t arrival, const char *sender, const char *const *rcpts, size_t n,
                         const struct kt_qprops *props, const void *body, size_t len, char *id, size_t idlen);
/* A message the SMTP server committed into hold/ID (kt_delivery_set_new_dir) whose envelope the header and
 * body checks changed: REDIRECT (redirect non-NULL: the only recipient) and FILTER (filter non-NULL: the
 * "filter" line). Writes a new file with the changed envelope and the same message bytes (copied in the
 * kernel, copy_file_range), fsyncs it and renames it over hold/ID (keep_held) or to new/ID (then
 * hold/ID is removed and a running queue manager told), fsyncing the directories. Synchronous: only for
 * these rare actions. 0 or -errno; on failure hold/ID stays as it was (the message is held, not lost). */
int kt_queue_rewrite_held(const char *qdir, const char *id, const char *redirect, const char *filter, int keep_held);
/* Read the envelope and the status records of new/ID (hold/ID). 0, -ENOENT, -EINVAL (bad file), -errno.
 * A pending recipient's reason is its last deferral reason, if any. */
int kt_queue_load(const char *qdir, const char *id, struct kt_qmsg **out);
int kt_queue_load_held(const char *qdir, const char *id, struct kt_qmsg **out);
/* Append "defer N REASON" for every pending recipient with a reason (the
 * queue manager after a delivery round; not fsync'd: informational, for the
 * queue listing). 0 or -errno. */
int kt_queue_note_deferrals(const char *qdir, const struct kt_qmsg *m);
/* postsuper -h / -H: move new/ID to hold/ID and back (never replacing a
 * file). A running queue manager drops a held message at its next look
 * (within a second) unless a delivery attempt is in flight, which ends first.
 * 0, -ENOENT, -EEXIST, -errno. */
int kt_queue_hold(const char *qdir, const char *id);
int kt_queue_release(const char *qdir, const char *id);
int kt_queue_list_held(const char *qdir, char ***ids, size_t *n);
void kt_qmsg_free(struct kt_qmsg *m);
/* Open the message file read-only (body at m->body_off). fd or -errno. The _at form takes an open new/. */
int kt_queue_open_body(const char *qdir, const char *id);
int kt_queue_open_body_at(int new_fd, const char *id);
/* Append "done N"/"fail N REASON" (state) or "warn" (rcpt == (size_t)-1) and fsync; reason may be
 * NULL and has its line breaks replaced. 0 or -errno. */
int kt_queue_mark(const char *qdir, struct kt_qmsg *m, size_t rcpt, enum kt_qrcpt_state state, const char *reason);
/* Group commit of n records of one message: one append and one fsync for all of them (and one of status/
 * when the file is new). status_fd is an open status/ directory. Updates m only on success. 0 or -errno. */
int kt_queue_mark_many(int status_fd, struct kt_qmsg *m, const struct kt_qmark *marks, size_t n);
/* 1 when no recipient is pending. */
int kt_qmsg_finished(const struct kt_qmsg *m);
/* Unlink new/ID then status/ID. 0 or -errno (-ENOENT if the message was not there). The removal is
 * durable once new/ is fsync'd (the caller does that, for many removals at once). The _at form takes open
 * new/ and status/ directories and skips status/ID when has_status is 0. */
int kt_queue_remove(const char *qdir, const char *id);
int kt_queue_remove_at(int new_fd, int status_fd, const char *id, int has_status);
/* Removal that keeps the file's inode for a later message: new/ID is renamed to tmp/ID and becomes a spare
 * (at most KT_QUEUE_SPARES of them; beyond that, or for another qdir, it is unlinked). A spare is only ever
 * written by kt_queue_delivery_new's writer, which truncates it: creating and deleting an inode per message
 * is what costs most on ext4 (inode allocation skips recently deleted inodes). tmp/ is emptied at start, so
 * spares never outlive the process. Same return as kt_queue_remove_at. */
#define KT_QUEUE_SPARES 4096
int kt_queue_retire_at(const char *qdir, int new_fd, int tmp_fd, int status_fd, const char *id, int has_status);
/* Forget the spares (queue manager stop); the files stay in tmp/ until the next start. */
void kt_queue_spares_clear(void);
/* Tell a running queue manager about a message in new/ (id) or ask for a flush (id NULL), through
 * public/qmgr. Without a running queue manager nothing happens: it loads new/ when it starts. */
void kt_queue_notify(const char *qdir, const char *id);
/* Tell a running queue manager to drop message id from memory, through public/qmgr: why is 'D'
 * (deleted), 'H' (put on hold) or 'Q' (requeued under a new id); it logs that. An attempt under way
 * ends first. */
void kt_queue_forget(const char *qdir, const char *id, char why);
/* Ids in new/, sorted. *ids is a kt_malloc'ed array of kt_malloc'ed strings. 0 or -errno. */
int kt_queue_list_ids(const char *qdir, char ***ids, size_t *n);
void kt_queue_free_ids(char **ids, size_t n);
/* Remove tmp/ leftovers and status files without a message (start-up only). */
void kt_queue_cleanup(const char *qdir);

/* The envelope of a message written by kt_queue_delivery_new, once its commit succeeded: id, sender,
 * recipients and body offsets, ready for the queue manager without reading the file back. The caller owns
 * it (kt_qmsg_free); NULL when d was not made by kt_queue_delivery_new or was already taken. */
struct kt_qmsg *kt_queue_delivery_take(struct kt_delivery *d);

/* In-process writer for the SMTP session: a struct kt_delivery (maildir.h)
 * whose "Maildir" is the queue directory, so the session drives it exactly
 * like a local delivery (open, append or splice, commit, abandon) and the
 * commit's create-fsync-rename-fsync makes the message durable in new/
 * before the 250. The envelope is appended here, before the file exists:
 * kt_delivery buffers up to KT_DELIVERY_CHUNK bytes in memory until then.
 * Returns NULL when the envelope would not fit in that buffer (far more
 * recipients than any recipient limit allows). props (may be NULL) as for kt_queue_envelope. The queue file is named
 * queue_id (the session's id, from kt_queue_new_id()), and a clash with an
 * existing file fails the commit with -EEXIST rather than replacing it. */
struct kt_delivery *kt_queue_delivery_new(struct kt_loop *loop, const char *qdir, const char *sender,
                                          const char *const *rcpts, size_t n, const struct kt_qprops *props,
                                          const char *hostname, unsigned worker_id, const char *queue_id);

/* Command line: argv[0] is the command name; return the process exit code.
 *   sendmail [options] [rcpt...]   (cli/sendmail.c) local submission, like Postfix's sendmail(1)
 *   queue [-c DIR] list | flush | delete ID|ALL ...   (cli/queue_cli.c) like mailq, postqueue, postsuper */
int kt_queue_cli_sendmail(int argc, char **argv);
int kt_queue_cli_queue(int argc, char **argv);
/* `ktrelay tlsrpt [-c DIR] flush`: asks the queue manager to write its TLS reports now (a request file,
 * queue_directory/tlsrpt-flush, and a wakeup through public/qmgr). */
int kt_queue_cli_tlsrpt(int argc, char **argv);

#endif
