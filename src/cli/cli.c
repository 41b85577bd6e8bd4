/* The configuration directory rule and its messages (see cli.h). */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "conf/config.h"

const char *kt_cli_config_dir(const char *given, int *is_default)
{
    *is_default = 0;
    if (given && *given)
        return given;
    const char *env = getenv("KTRELAY_CONFIG");
    if (env && *env)
        return env;
    if (access(KT_CLI_SYSTEM_DIR "/main.cf", F_OK) == 0)
        return KT_CLI_SYSTEM_DIR;
    *is_default = 1;
    return KT_CLI_DEFAULT_DIR;
}

const char *kt_cli_config_dir_existing(const char *given, const char *prog)
{
    int is_default;
    const char *dir = kt_cli_config_dir(given, &is_default);
    if (is_default && access(KT_CLI_DEFAULT_DIR "/main.cf", F_OK) != 0) {
        fprintf(stderr,
                "%s: no configuration found: give -c DIR (the directory with main.cf and master.cf), "
                "set KTRELAY_CONFIG=DIR, or install one as " KT_CLI_SYSTEM_DIR "/main.cf; "
                "`ktrelay run` in this directory writes the embedded default into ./" KT_CLI_DEFAULT_DIR "\n",
                prog);
        return NULL;
    }
    return dir;
}

#if defined(__SANITIZE_ADDRESS__)
static void restore_ids(void)
{
    if (seteuid(0) == 0 && setegid(0) == 0)
        prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
}
#endif

int kt_cli_as_queue_owner(const struct kt_config *cfg, const char *prog)
{
    const char *owner = kt_config_get(cfg, NULL, "mail_owner");
    const char *qdir = kt_config_get(cfg, NULL, "queue_directory");
    struct passwd *pw = geteuid() == 0 && owner && *owner ? getpwnam(owner) : NULL;
    struct stat qst;
    if (!pw || pw->pw_uid == 0 || !qdir || lstat(qdir, &qst) < 0 || !S_ISDIR(qst.st_mode) ||
        qst.st_uid != pw->pw_uid)
        return 0;
    gid_t gid = pw->pw_gid;
    if (setgroups(1, &gid) < 0 || setegid(gid) < 0 || seteuid(pw->pw_uid) < 0) {
        int e = errno;
        fprintf(stderr, "%s: cannot switch to mail_owner %s: %s\n", prog, owner, strerror(e));
        return -e;
    }
#if defined(__SANITIZE_ADDRESS__)
    /* LeakSanitizer's exit check stops the threads with ptrace, which a
     * process with mixed ids may not do: take root's effective ids back at
     * exit (sanitizer builds only; runs before the check, registered later) */
    atexit(restore_ids);
#endif
    return 0;
}
