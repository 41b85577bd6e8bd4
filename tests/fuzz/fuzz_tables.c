/* Fuzz target for lookup tables and lists: the input as the body of an inline:{...} table, as a
 * mynetworks-style network list, as a domain list, and written to a file read as texthash:, cidr:, regexp:, pcre: and an
 * aliases file (with every alias expanded token by token). Lookups of a few keys run on whatever loaded.
 * Built as described in fuzz_driver.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"
#include "core/table.h"
#include "delivery/aliases.h"
#include "fuzz.h"

static const char *const keys[] = { "a", "alice@example.com", "example.com", "@example.com", "postmaster",
                                    "192.0.2.1", "2001:db8::1", "", "root",
                                    "Subject: hello world", "X-Spam: (yes) $1 ${2}" };
#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

static int visit(const char *key, const char *value, void *arg)
{
    (void)arg;
    return key && value ? 0 : -1;
}

static void try_maps(const char *spec, enum kt_table_kind kind)
{
    struct kt_maps *m;
    char err[256];

    if (kt_maps_open(spec, kind, &m, err, sizeof(err)) < 0)
        return;
    for (size_t i = 0; i < N_KEYS; i++)
        (void)kt_maps_get(m, keys[i]);
    kt_maps_foreach(m, visit, NULL);
    kt_maps_free(m);
}

static void try_aliases(const char *spec)
{
    struct kt_aliases *a;
    char err[256], tok[1024];
    enum kt_alias_type type;

    if (kt_aliases_open(spec, &a, err, sizeof(err)) < 0)
        return;
    for (size_t i = 0; i < N_KEYS; i++) {
        const char *v = kt_aliases_get(a, keys[i]);
        while (v && kt_alias_next(&v, tok, sizeof(tok), &type))
            ;
    }
    kt_aliases_free(a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[64];
    char err[256], *spec, *text = malloc(size + 1);
    struct kt_net_list *nets;
    struct kt_domain_list *doms;

    if (!path[0]) {
        struct kt_log_config lc = { .use_syslog = 0, .use_stderr = 0 };
        kt_log_configure(&lc, err, sizeof(err));
        snprintf(path, sizeof(path), "/tmp/ktrelay-fuzz-table-%d", (int)getpid());
    }
    memcpy(text, data, size);
    text[size] = '\0';     /* string APIs see the input up to its first NUL */

    spec = malloc(size + 16);
    snprintf(spec, size + 16, "inline:{%s}", text);
    try_maps(spec, KT_TABLE_MAP);
    free(spec);

    if (kt_net_list_open(text, &nets, err, sizeof(err)) == 0) {
        for (size_t i = 0; i < N_KEYS; i++)
            (void)kt_net_list_match(nets, keys[i]);
        kt_net_list_free(nets);
    }
    if (kt_domain_list_open(text, 1, &doms, err, sizeof(err)) == 0) {
        for (size_t i = 0; i < N_KEYS; i++)
            (void)kt_domain_list_match(doms, keys[i]);
        kt_domain_list_free(doms);
    }

    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(data, 1, size, f);     /* files get every byte, NULs included */
        fclose(f);
        char file_spec[96];
        snprintf(file_spec, sizeof(file_spec), "texthash:%s", path);
        try_maps(file_spec, KT_TABLE_MAP);
        try_maps(file_spec, KT_TABLE_ALIASES);
        try_aliases(file_spec);
        snprintf(file_spec, sizeof(file_spec), "cidr:%s", path);
        try_maps(file_spec, KT_TABLE_MAP);
        snprintf(file_spec, sizeof(file_spec), "regexp:%s", path);
        try_maps(file_spec, KT_TABLE_MAP);
        snprintf(file_spec, sizeof(file_spec), "pcre:%s", path);
        try_maps(file_spec, KT_TABLE_MAP);
        unlink(path);
    }
    free(text);
    return 0;
}
