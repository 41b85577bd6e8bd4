/* Fuzz target for what MTA-STS and TLS reporting read from other domains: the policy body served over
 * HTTPS (RFC 8461 3.2), the _mta-sts TXT record (3.1) and the _smtp._tls TXT record (RFC 8460 3). The
 * first input byte picks the parser. Invariants: a policy that parses has a known mode, a max_age within
 * the RFC's limit, at least one mx unless its mode is none, and every mx pattern matches a host made from
 * it; parsing is repeatable; a TXT id is 1 to 32 alphanumerics; a TLSRPT record that parses has at least
 * one non-empty URI. Built as described in fuzz_driver.c. */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "queue/mta_sts.h"
#include "queue/tlsrpt.h"
#include "fuzz.h"

static void policy(const char *text, size_t len)
{
    struct kt_sts_policy p = { .fetched = 0 }, again = { .fetched = 0 };
    char err[256];
    int r = kt_sts_policy_parse(text, len, &p, err, sizeof(err));
    if (r < 0) {
        CHECK(err[0]);
        CHECK(kt_sts_policy_parse(text, len, &again, err, sizeof(err)) == r);
        return;
    }
    CHECK(p.mode == KT_STS_MODE_NONE || p.mode == KT_STS_MODE_TESTING || p.mode == KT_STS_MODE_ENFORCE);
    CHECK(p.max_age >= 0 && p.max_age <= KT_STS_MAX_AGE_LIMIT);
    CHECK(p.mode == KT_STS_MODE_NONE || p.n_mx > 0);
    CHECK(p.text && strlen(p.text) == len);
    for (size_t i = 0; i < p.n_mx; i++) {
        char host[300];
        const char *pat = p.mx[i];
        if (!strncmp(pat, "*.", 2))
            snprintf(host, sizeof(host), "x.%s", pat + 2);
        else
            snprintf(host, sizeof(host), "%s", pat);
        CHECK(kt_sts_mx_match(&p, host));
    }
    CHECK(kt_sts_policy_parse(text, len, &again, err, sizeof(err)) == 0);
    CHECK(again.mode == p.mode && again.max_age == p.max_age && again.n_mx == p.n_mx);
    kt_sts_policy_clear(&p);
    kt_sts_policy_clear(&again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    char *text = kt_malloc(size);
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    size_t len = size - 1;
    switch (data[0] % 3) {
    case 0:
        policy(text, len);
        break;
    case 1: {
        char id[40];
        if (kt_sts_txt_parse(text, len, id, sizeof(id)) == 0) {
            size_t n = strlen(id);
            CHECK(n >= 1 && n <= 32);
            for (size_t i = 0; i < n; i++)
                CHECK(isalnum((unsigned char)id[i]));
        }
        break;
    }
    default: {
        char **uris;
        size_t n;
        if (!memchr(text, '\0', len) && kt_tlsrpt_txt_parse(text, &uris, &n) == 0) {
            CHECK(n >= 1);
            for (size_t i = 0; i < n; i++) {
                CHECK(uris[i][0]);
                kt_free(uris[i]);
            }
            kt_free(uris);
        }
        break;
    }
    }
    kt_free(text);
    return 0;
}
