/* Fuzz target for the 8BITMIME to 7BIT conversion (queue/mime_downgrade.c), which reads whatever body a
 * client sent. Invariants: no memory error (ASan, UBSan), a result of 0 or 1, and no bare CR or LF in the
 * output (CRLF line ends throughout); the output is converted again to check the second pass too.
 * Not checked: that a second conversion changes nothing. On malformed MIME (8-bit bytes in a nested
 * message's fields, for one) a second pass can read the structure differently; the conversion runs
 * once per delivery, on the queued original. Built as described in fuzz_driver.c. */
#include <stdint.h>
#include <stdlib.h>

#include "core/buf.h"
#include "queue/mime_downgrade.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kt_buf out = { 0 }, again = { 0 };
    int rc = kt_mime_downgrade((const char *)data, size, &out);
    CHECK(rc == 0 || rc == 1);
    for (size_t i = 0; i < out.len; i++) {
        if (out.data[i] == '\r')
            CHECK(i + 1 < out.len && out.data[i + 1] == '\n');
        if (out.data[i] == '\n')
            CHECK(i > 0 && out.data[i - 1] == '\r');
    }
    rc = kt_mime_downgrade(out.data ? out.data : "", out.len, &again);
    CHECK(rc == 0 || rc == 1);
    kt_buf_release(&out);
    kt_buf_release(&again);
    return 0;
}
