/* What every ktrelay command shares: where the configuration lives and the
 * exit codes. One rule finds the configuration directory for every command
 * (run, check-config, config, queue, sendmail and its names):
 *   1. -c DIR, given anywhere on the command line;
 *   2. else $KTRELAY_CONFIG when set and not empty;
 *   3. else /etc/ktrelay when /etc/ktrelay/main.cf exists;
 *   4. else ./ktrelay-data, the embedded default: `run` writes it on first
 *      start, the other commands use it only when it is already there.
 * Exit codes are sysexits(3)'s, as sendmail(1) and Postfix's tools use them. */
#ifndef KTRELAY_CLI_H
#define KTRELAY_CLI_H

#include <sysexits.h>

#define KT_CLI_DEFAULT_DIR "ktrelay-data"
#define KT_CLI_SYSTEM_DIR  "/etc/ktrelay"

/* The configuration directory by the rule above (given: the -c argument or
 * NULL). Never NULL: when nothing matches it is ./ktrelay-data, and
 * *is_default says so (1 when rule 4 chose it). The string is static or
 * from the environment/argv; do not free. */
const char *kt_cli_config_dir(const char *given, int *is_default);

/* For a command other than run: the directory, or NULL after telling the
 * user on stderr what to do (prog names the command in the message). */
const char *kt_cli_config_dir_existing(const char *given, const char *prog);

struct kt_config;
/* Run by root: when mail_owner owns queue_directory, switch the effective
 * uid and gid to it (the real ones stay root's, so the sender and the
 * "from userid" are root), so that what the command writes into the queue is
 * readable by the queue manager, which runs as mail_owner. Before the first
 * start the queue is root's and nothing changes (the master gives the files
 * to mail_owner when it starts). 0, or -errno after telling the user. */
int kt_cli_as_queue_owner(const struct kt_config *cfg, const char *prog);

#endif
