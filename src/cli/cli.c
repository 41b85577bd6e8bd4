/* The configuration directory rule and its messages (see cli.h). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cli/cli.h"

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
