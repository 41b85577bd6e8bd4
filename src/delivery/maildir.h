/* Durable Maildir delivery driven by io_uring.
 *
 * A delivery owns one spool file in the first mailbox's tmp/: an unnamed
 * O_TMPFILE where the kernel and /proc allow it, else a named file. The caller
 * appends bytes (or has them spliced into the file at the offset it is
 * given); commit then writes what is
 * buffered, fsyncs the file, links it into every mailbox's new/ (a named file:
 * rename for a single mailbox, links and then the tmp name removed for
 * several) and fsyncs each new/ directory. Only
 * after all of that does the completion report success, so a 250 sent on it
 * means every copy is on disk. Any failure removes what was created in new/
 * and reports an error; nothing half-written is ever visible in new/. */
#ifndef KTRELAY_MAILDIR_H
#define KTRELAY_MAILDIR_H

#include <stddef.h>
#include <sys/types.h>
#include <time.h>

#include "core/loop.h"
#include "delivery/resolve.h"

struct kt_delivery;

/* Completion: res is 0 or -errno. Called from the loop, never re-entrantly
 * from inside a kt_delivery_* call. */
typedef void (*kt_delivery_cb)(void *arg, int res);

/* Spool buffer size: bytes beyond it are written out while the body streams in. */
#define KT_DELIVERY_CHUNK (256 * 1024)

/* Privilege separation (ktrelay started as root): mailboxes that are not
 * virtual mailboxes of UID (mail_owner) are written by the local delivery
 * agent reached through FD (see delivery/local.h); a message with none of
 * ours is spooled as an O_TMPFILE in SPOOL_DIR. Call once per worker process
 * before the first delivery; without it every mailbox is written here. */
void kt_delivery_use_agent(int fd, const char *spool_dir, unsigned uid);

/* queue_id (may be NULL): the message's queue id, carried in the file name
 * ("SECONDS.IQUEUEIDM...P...Q....HOST,S=...,W=..."), so that one id ties the
 * log lines, the queue file and the delivered files together. */
struct kt_delivery *kt_delivery_new(struct kt_loop *loop, const struct kt_mailbox *boxes, size_t n,
                                    const char *hostname, unsigned worker_id, const char *queue_id);
/* For a queue file: the file is called exactly NAME in tmp/ and new/ (no
 * Maildir decorations), and the commit never replaces an existing new/NAME
 * (RENAME_NOREPLACE: -EEXIST instead). Single mailbox only; before open. */
void kt_delivery_set_exact_name(struct kt_delivery *d, const char *name);
/* Before kt_delivery_open: write into the existing file path (a spare queue file in the first mailbox's tmp/,
 * truncated on open) instead of creating a new one, so that no inode is allocated; the file is then renamed into
 * new/ as usual. When path no longer exists, a new file is created after all. */
void kt_delivery_reuse_file(struct kt_delivery *d, const char *path);
/* The directory beside tmp/ that the commit renames or links into: "new" (the default, Maildir) or, for a
 * queue file, "hold" (header/body checks HOLD). At most 7 characters; before commit. */
void kt_delivery_set_new_dir(struct kt_delivery *d, const char *dir);
/* Create the tmp file (and missing Maildir folders); cb when done. */
void kt_delivery_open(struct kt_delivery *d, kt_delivery_cb cb, void *arg);
/* Append body bytes. Returns 1 when the caller should stop feeding until the
 * drain callback fires (spool writes behind), else 0. */
int kt_delivery_append(struct kt_delivery *d, const void *data, size_t len);
/* Appending without a copy: a pointer to at least min (<= KT_DELIVERY_CHUNK) writable bytes of the spool
 * buffer, *room of them in all, valid until the next call on d. Whatever is written there becomes part of
 * the message only through kt_delivery_fill(d, n), n <= *room, which returns what kt_delivery_append
 * would. */
char *kt_delivery_space(struct kt_delivery *d, size_t min, size_t *room);
int kt_delivery_fill(struct kt_delivery *d, size_t n);
void kt_delivery_set_drain_cb(struct kt_delivery *d, kt_delivery_cb cb, void *arg);
/* Zero-copy body bytes: where the next bytes of the message go, for the
 * connection layer to splice them straight into the file (tls/conn.h).
 * Bytes appended so far are submitted to their own offsets first. Sets *fd
 * and *off and returns 0, or returns the delivery's -errno once it failed.
 * The fd stays open until kt_delivery_abandon. */
int kt_delivery_splice_target(struct kt_delivery *d, int *fd, off_t *off);
/* n bytes were written at that offset: they are part of the message now. */
void kt_delivery_spliced(struct kt_delivery *d, size_t n);
/* Writing body bytes outside this object failed (-errno): the commit will
 * report the error and nothing reaches new/. */
void kt_delivery_fail(struct kt_delivery *d, int err);
/* Read-back before the commit (milters): every byte appended so far is written to the file, then
 * cb(arg, 0 or -errno) from the loop; the file (kt_delivery_fd) may then be read with pread. Appending
 * may go on afterwards. */
void kt_delivery_flush(struct kt_delivery *d, kt_delivery_cb cb, void *arg);
/* The spool file once open (-1 before). Owned by the delivery. */
int kt_delivery_fd(const struct kt_delivery *d);
unsigned long long kt_delivery_size(const struct kt_delivery *d);
/* 0, or the -errno of a write that already failed (the commit will fail with it). */
int kt_delivery_error(const struct kt_delivery *d);
/* Make durable; cb(arg, 0) only when every copy and directory is fsync'd. */
void kt_delivery_commit(struct kt_delivery *d, kt_delivery_cb cb, void *arg);
/* Drop the message: no callback ever fires again; the object frees itself
 * once its I/O has drained. Safe at any stage; after commit has completed
 * it only frees. */
void kt_delivery_abandon(struct kt_delivery *d);
/* Maildir rule for tmp/ (maildir(5): files older than 36 hours are abandoned): remove from
 * maildir/tmp/ the files ktrelay itself names ("<sec>.M<usec>P<pid>Q<worker>x<seq>.<host>", host as
 * escaped for hostname) whose modification time is older than 36 hours, e.g. left by kill -9 or power
 * loss. Other files are never touched, nor are symlinks or anything but regular files. Synchronous; for
 * start-up. Returns the number removed, or -errno when tmp/ cannot be read (-ENOENT is not an error: 0). */
#define KT_MAILDIR_TMP_MAX_AGE (36 * 3600)
int kt_maildir_clean_tmp(const char *maildir, const char *hostname, time_t now);

/* Name of the file in new/ once committed (basename). */
const char *kt_delivery_name(const struct kt_delivery *d);
/* Why the local delivery agent deferred the delivery ("/home/u/.forward exists: ..."), or NULL when it did
 * not (another error, or none). Lives as long as d. */
const char *kt_delivery_agent_reason(const struct kt_delivery *d);
/* Data of the delivery's creator (the queue writer's envelope), freed with free_fn when the delivery is
 * freed unless taken back first with kt_delivery_take_user. */
void kt_delivery_set_user(struct kt_delivery *d, void *user, void (*free_fn)(void *));
void *kt_delivery_take_user(struct kt_delivery *d);

#endif
