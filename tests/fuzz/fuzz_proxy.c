/* Fuzz target for the PROXY protocol header parser (HAProxy's proxy-protocol.txt, v1 and v2), which reads
 * bytes from whoever connects to a port with smtpd_upstream_proxy_protocol = haproxy. Invariants: a header
 * that parses is no longer than the input or KT_PROXY_MAX_HEADER, parses again to the same result from
 * exactly its own bytes and from any longer input, never needs a byte past itself (every shorter prefix
 * asks for more), and names a valid address and port unless it is a LOCAL/UNKNOWN header. Built as
 * described in fuzz_driver.c. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtpd/proxy.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kt_proxy_header h, again;
    const char *why = NULL;
    int r;

    memset(&h, 0, sizeof(h));
    r = kt_proxy_parse(data, size, &h, &why);

    CHECK(r >= 0 || (r == -EINVAL && why && *why));
    if (r <= 0)
        return 0;
    CHECK((size_t)r <= size && r <= KT_PROXY_MAX_HEADER);
    CHECK(memchr(h.addr, '\0', sizeof(h.addr)) != NULL);
    if (!h.local) {
        unsigned char bin[sizeof(struct in6_addr)];
        CHECK(inet_pton(AF_INET, h.addr, bin) == 1 || inet_pton(AF_INET6, h.addr, bin) == 1);
        CHECK(h.port >= 0 && h.port <= 65535);
    }
    /* the header's own bytes give the same header: nothing after it was needed */
    memset(&again, 0, sizeof(again));
    CHECK(kt_proxy_parse(data, (size_t)r, &again, &why) == r);
    CHECK(again.local == h.local);
    CHECK(h.local || (again.port == h.port && strcmp(again.addr, h.addr) == 0));
    /* a shorter prefix asks for more bytes rather than taking another header */
    CHECK(kt_proxy_parse(data, (size_t)r - 1, &again, &why) <= 0);
    return 0;
}
