/* One running instance: an exclusive flock(2) on a file that names the PID
 * of its holder, like Postfix's master.lock in data_directory. The lock lives
 * as long as the open file description, so it ends when the holder exits,
 * however it exits; a stale file left behind is never mistaken for a live
 * holder. */
#ifndef KTRELAY_LOCKFILE_H
#define KTRELAY_LOCKFILE_H

#include <sys/types.h>

/* Create PATH if needed (mode 0644, never through a symlink), lock it without
 * waiting and write this process's PID into it. Returns 0 and the descriptor
 * in *fd (close-on-exec; keep it open for as long as the lock should hold);
 * -EWOULDBLOCK when another process holds it, with its PID in *holder (0 when
 * it has not written it yet); or -errno. */
int kt_lockfile_acquire(const char *path, int *fd, pid_t *holder);

#endif
