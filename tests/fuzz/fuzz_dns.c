/* Fuzz target for ktrelay's reading of DNS answer messages (RFC 1035 4.1, name compression included), the
 * bytes a resolver hands back for the SMTP server's client checks: reverse names, DNS lists, sender and
 * HELO domains. Each input is read as an answer for every record type those checks ask for. Invariants:
 * at most KT_DNS_MAX_RR records, each a non-empty NUL-terminated string inside its slot; an A or AAAA
 * record is a valid address of its family; FOUND exactly when a record was kept. The same bytes are read
 * as a TLSA answer for DANE (tls/dane.c): only usable records kept (usage 2 or 3, selector 0 or 1,
 * matching type 0 to 2 with its digest's length), at most KT_DANE_MAX_RR, and USABLE exactly when one
 * was. Built as described in fuzz_driver.c. */
#include <ares.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtpd/client_dns.h"
#include "tls/dane.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const int types[] = { KT_RR_A, KT_RR_AAAA, KT_RR_PTR, KT_RR_MX, KT_RR_TXT };
    static const int statuses[] = { ARES_SUCCESS, ARES_ENOTFOUND, ARES_ENODATA };
    struct kt_dns_answer ans;
    unsigned ttl;
    unsigned char bin[sizeof(struct in6_addr)];

    if (size > 65535)
        return 0;
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        for (size_t s = 0; s < sizeof(statuses) / sizeof(statuses[0]); s++) {
            kt_cdns_parse(types[t], statuses[s], data, (int)size, &ans, &ttl);
            CHECK(ans.n <= KT_DNS_MAX_RR);
            CHECK((ans.status == KT_DNS_FOUND) == (ans.n > 0));
            CHECK(ans.status != KT_DNS_TEMP);
            for (unsigned i = 0; i < ans.n; i++) {
                size_t len = strnlen(ans.rr[i], KT_DNS_RR_LEN);
                CHECK(len > 0 && len < KT_DNS_RR_LEN);
                if (types[t] == KT_RR_A)
                    CHECK(inet_pton(AF_INET, ans.rr[i], bin) == 1);
                if (types[t] == KT_RR_AAAA)
                    CHECK(inet_pton(AF_INET6, ans.rr[i], bin) == 1);
            }
        }
    }
    static struct kt_dane_host h;
    if (kt_dane_parse_tlsa(data, (int)size, &h) == 0) {
        CHECK(h.n <= KT_DANE_MAX_RR);
        CHECK((h.state == KT_DANE_USABLE) == (h.n > 0));
        CHECK(h.state == KT_DANE_USABLE || h.state == KT_DANE_UNUSABLE || h.state == KT_DANE_NO_TLSA);
        for (size_t i = 0; i < h.n; i++) {
            CHECK(h.rr[i].usage == 2 || h.rr[i].usage == 3);
            CHECK(h.rr[i].selector <= 1 && h.rr[i].mtype <= 2);
            CHECK(h.rr[i].len > 0 && h.rr[i].len <= KT_DANE_MAX_DATA);
            CHECK(h.rr[i].mtype != 1 || h.rr[i].len == 32);
            CHECK(h.rr[i].mtype != 2 || h.rr[i].len == 64);
        }
    }
    return 0;
}
