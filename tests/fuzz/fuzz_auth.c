/* Fuzz target for AUTH decoding: base64 (RFC 4648, as AUTH responses carry it), the PLAIN message split
 * (RFC 4616: authzid NUL authcid NUL passwd), mechanism names and smtpd_sasl_security_options. The decoded
 * length never exceeds the output room, and an encode-decode round trip gives the bytes back. Built as
 * described in fuzz_driver.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "smtpd/sasl.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *out = malloc(size + 1), *enc = malloc(4 * (size / 3 + 2) + 1), *back = malloc(size + 1);
    char *str = malloc(size + 1), err[128];
    const char *authzid, *authcid, *passwd;
    unsigned mechs;

    /* the input as a base64 response */
    ssize_t n = kt_base64_decode((const char *)data, size, out, size);
    if (n >= 0) {
        CHECK((size_t)n <= size);
        out[n] = '\0';
        if (kt_sasl_plain_split(out, (size_t)n, &authzid, &authcid, &passwd) == 0) {
            CHECK(authzid >= out && authcid >= out && passwd >= out);
            CHECK(passwd + strlen(passwd) <= out + n);
        }
    }
    /* the input as the decoded bytes: round trip */
    kt_base64_encode(data, size, enc);
    n = kt_base64_decode(enc, strlen(enc), back, size);
    CHECK(n == (ssize_t)size && memcmp(back, data, size) == 0);
    /* the input as a PLAIN message directly, and as option and mechanism names */
    memcpy(str, data, size);
    str[size] = '\0';
    (void)kt_sasl_plain_split(str, size, &authzid, &authcid, &passwd);
    memcpy(str, data, size);
    str[size] = '\0';
    (void)kt_sasl_security_mechs(str, &mechs, err, sizeof(err));
    (void)kt_sasl_mech_from_name((const char *)data, size);
    free(out);
    free(enc);
    free(back);
    free(str);
    return 0;
}
