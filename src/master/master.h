/* The master process, like nginx's master and Postfix's master(8): it reads
 * the configuration and the TLS keys, creates queue_directory and
 * data_directory, binds the listening sockets, and starts a generation: one
 * local delivery agent (delivery/local.h, stays root) and one worker process
 * (smtpd/server.h) that runs as mail_owner with no capabilities and
 * PR_SET_NO_NEW_PRIVS. SIGHUP starts a new generation with the new
 * configuration, keys and listeners, then retires the old one (it stops
 * accepting and finishes its sessions); a configuration with errors is
 * refused and the running generation kept. SIGTERM/SIGINT stop every
 * generation and exit 0 when they all stopped cleanly.
 *
 * Started by a normal user, nothing changes owner: the worker keeps that
 * user's identity and there is no delivery agent.
 *
 * master.cf's chroot field y on a line the worker serves confines the worker
 * to queue_directory, data_directory and virtual_mailbox_base (writable) and
 * the configuration directory, /etc and /usr (read-only), with no program
 * execution (master/confine.h); a kernel without Landlock ABI 2 makes that a
 * start-up error rather than an unconfined worker. */
#ifndef KTRELAY_MASTER_H
#define KTRELAY_MASTER_H

struct kt_runtime;

/* Run until SIGTERM/SIGINT; takes RT (the start-up configuration loaded from
 * CONFIG_DIR). Returns the process exit code: 0 after a clean stop, 1 when
 * start-up failed or a worker process died. */
int kt_master_run(struct kt_runtime *rt, const char *config_dir);

/* FD holds the instance lock (core/lockfile.h) for the master's lifetime;
 * the processes the master starts close their copy, so the lock ends with
 * the master however it ends. */
void kt_master_keep_lock(int fd);

#endif
