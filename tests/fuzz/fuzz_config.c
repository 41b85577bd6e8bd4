/* Fuzz target for main.cf and master.cf: the input is main.cf text, a NUL, then master.cf text (no NUL:
 * main.cf only). A configuration that loads is read back through every parameter with its type's getter,
 * for every service, and printed both ways (postconf and postconf -n). Errors are fine; a crash, a leak or
 * undefined behaviour is not. Built as described in fuzz_driver.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf/config.h"
#include "core/log.h"
#include "fuzz.h"

static void read_all(const struct kt_config *cfg, const struct kt_service *svc)
{
    for (size_t i = 0; i < kt_param_count(); i++) {
        const struct kt_param_def *d = kt_param_at(i);
        switch (d->type) {
        case KT_PARAM_BOOL:
            (void)kt_config_get_bool(cfg, svc, d->name);
            break;
        case KT_PARAM_INT:
        case KT_PARAM_SIZE:
            (void)kt_config_get_int(cfg, svc, d->name);
            break;
        case KT_PARAM_TIME:
            (void)kt_config_get_time(cfg, svc, d->name);
            break;
        default:
            (void)kt_config_get(cfg, svc, d->name);
            break;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int quiet;
    struct kt_config *cfg;
    char *text = malloc(size + 2);
    const char *master = NULL;

    if (!quiet) {
        struct kt_log_config lc = { .use_syslog = 0, .use_stderr = 0 };
        char err[128];
        kt_log_configure(&lc, err, sizeof(err));
        quiet = 1;
    }
    memcpy(text, data, size);
    text[size] = '\0';
    text[size + 1] = '\0';
    char *nul = memchr(text, '\0', size);
    if (nul)
        master = nul + 1;
    if (kt_config_load_text(text, master, "fuzz", &cfg) == 0) {
        FILE *null = fopen("/dev/null", "w");
        read_all(cfg, NULL);
        for (size_t i = 0; i < kt_config_service_count(cfg); i++)
            read_all(cfg, kt_config_service(cfg, i));
        if (null) {
            kt_config_print(cfg, null, 0);
            kt_config_print(cfg, null, 1);
            fclose(null);
        }
        kt_config_free(cfg);
    }
    free(text);
    return 0;
}
