/* The local delivery agent, like Postfix's local(8): a small process that
 * stays root while the SMTP workers run as mail_owner, and writes messages into
 * Maildirs that belong to other users (system users' home_mailbox, and
 * virtual mailboxes whose virtual_uid_maps uid is not mail_owner's).
 *
 * Request interface (one SOCK_SEQPACKET datagram per message): a struct
 * kt_local_req naming the Maildirs, plus two descriptors passed with
 * SCM_RIGHTS: the spooled message (read from offset 0, `size` bytes) and a
 * socket on which the agent sends back one struct kt_local_reply. The agent
 * checks every request against what it knows itself (a local recipient's home
 * must be the one in the passwd database for that uid; a virtual mailbox must
 * lie below virtual_mailbox_base), never delivers as uid 0, and writes each
 * copy in a child process running with the recipient's uid and gid.
 *
 * Every path is resolved below the home directory (or virtual_mailbox_base)
 * with openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH); a Maildir, tmp/, new/
 * or cur/ that is a symbolic link or is not owned by the recipient is refused,
 * the home directory is never created, an existing path is never chowned, and
 * the tmp file is created O_EXCL | O_NOFOLLOW. A refusal defers the message
 * (the worker answers 4xx; the queue manager retries) with a log line naming
 * the reason; nothing is written anywhere else. */
#ifndef KTRELAY_LOCAL_H
#define KTRELAY_LOCAL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define KT_LOCAL_MAGIC 0x6b746c31u     /* "ktl1" */
#define KT_LOCAL_MAX_BOXES 64
#define KT_LOCAL_PATH_MAX 512

struct kt_local_box {
    uint32_t uid, gid;
    char home[KT_LOCAL_PATH_MAX];      /* local(8): the user's home; "" for a virtual mailbox */
    char path[KT_LOCAL_PATH_MAX];      /* absolute Maildir path ending in '/' */
};

struct kt_local_req {
    uint32_t magic;
    uint32_t n_boxes;
    uint32_t n_total;                  /* mailboxes of the whole delivery, these and those the worker writes */
    uint64_t size;                     /* message bytes in the passed file, from offset 0 */
    char name[256];                    /* Maildir file name: tmp/NAME, then new/NAME */
    struct kt_local_box boxes[KT_LOCAL_MAX_BOXES];
};

struct kt_local_reply {
    int32_t status;                    /* 0, or a positive errno (the message is deferred) */
    uint32_t delivered;                /* boxes written before a failure */
    char reason[480];                  /* why, for the log: "/home/u/Maildir is a symbolic link" */
};

/* Fork the agent (the caller is root). VIRTUAL_BASE is virtual_mailbox_base
 * ("" when unset). CHECK_FORWARD (forward_path is not empty): a local user's
 * delivery is deferred (EOPNOTSUPP, with the reason) while $home/.forward
 * exists, since ktrelay does not forward through it as Postfix's local(8)
 * would. On success *worker_fd is the socket workers send requests
 * to (the caller gives it to its worker process and closes it) and *pid the
 * agent's process id; the agent exits once every copy of *worker_fd is closed.
 * Returns 0 or -errno. */
int kt_local_agent_start(const char *virtual_base, int check_forward, const int *close_fds, size_t n_close,
                         int *worker_fd, pid_t *pid);

/* Deliver one copy, with the caller's own privileges (the agent calls it in a
 * child that already runs as the recipient). ROOT_FD is the directory the
 * Maildir path is resolved beneath (an O_PATH descriptor of the home or of
 * virtual_mailbox_base); REL the Maildir relative to it ("Maildir/"); UID the
 * owner the Maildir and its tmp/ new/ cur/ must have; missing folders are
 * created (0700). The file is tmp/NAME, fsync'd, renamed to new/NAME (never
 * over an existing name), and new/ is fsync'd. MSG_FD < 0 checks only: the
 * folders are made and checked, nothing is written (the agent checks every
 * mailbox of a message before it writes any). Returns 0 or -errno with the
 * reason in why. */
int kt_local_deliver_box(int root_fd, const char *rel, uid_t uid, int msg_fd, uint64_t size, const char *name,
                         char *why, size_t whylen);

#endif
