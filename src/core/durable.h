/* Files written durably: whole files replaced in a directory, for state kept across restarts in
 * data_directory (MTA-STS policies, TLS report counts and reports): a reader sees the old file or the
 * complete new one, never part of one, and the new one survives a crash once the call returned 0. The
 * usual sequence: write a temporary file beside it, fsync, rename over the name, fsync the directory. Its
 * steps (a complete write, a directory fsync) serve the queue files too. */
#ifndef KTRELAY_DURABLE_H
#define KTRELAY_DURABLE_H

#include <stddef.h>

/* Writes all len bytes at p to fd, again after EINTR and short writes. Returns 0 or -errno. */
int kt_write_all(int fd, const void *p, size_t len);

/* fsync(2) of the directory at path, which makes the renames and unlinks done in it durable. Returns 0 or
 * -errno (of the open or the fsync). */
int kt_fsync_dir(const char *path);

/* Replace DIR/NAME by the len bytes at data. The temporary file is DIR/.NAME.tmp (mode 0600, opened
 * without following a symbolic link, truncated if left over); it is removed when any step fails. DIR
 * must exist. Returns 0, or -errno of the first step that failed (open, write, fsync, close, rename);
 * the directory's fsync after the rename is best effort and changes nothing in the result. */
int kt_durable_write(const char *dir, const char *name, const void *data, size_t len);

#endif
