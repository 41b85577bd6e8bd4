/* File-system confinement of the worker (master.cf's chroot column).
 *
 * Postfix chroots smtpd into queue_directory: the daemon then reaches only
 * the queue and the sockets of the other daemons. ktrelay's worker also
 * writes the virtual mailboxes and data_directory, so it gets the same
 * containment without moving its root: a Landlock ruleset (Linux 5.19+, ABI 2)
 * under which the process can write only beneath the directories it is given,
 * read only beneath the read-only ones, and execute nothing. Paths keep their
 * names, so every logged and configured path means what it says. */
#ifndef KT_MASTER_CONFINE_H
#define KT_MASTER_CONFINE_H

#include <stddef.h>

/* Landlock's ABI version on this kernel: > 0, or -errno (-ENOSYS: not built
 * in; -EOPNOTSUPP: built in but not enabled with lsm=). */
int kt_confine_abi(void);

/* Restrict the calling process (all its threads must be created after this,
 * or be io_uring workers, which take its credentials) to: read and write
 * beneath each of RW[0..NRW), read beneath each of RO[0..NRO), nothing else;
 * no execution anywhere. PR_SET_NO_NEW_PRIVS must already be set. A path that
 * does not exist is skipped. Returns 0, -EOPNOTSUPP when the kernel's Landlock
 * is missing or older than ABI 2 (which allows renames between directories,
 * as Maildir needs), or -errno; *WHY then names the failing step (static). */
int kt_confine_paths(const char *const *rw, size_t nrw, const char *const *ro, size_t nro, const char **why);

#endif
