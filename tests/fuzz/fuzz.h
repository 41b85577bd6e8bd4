/* What every fuzz target (tests/fuzz/fuzz_*.c) shares: the libFuzzer entry point each one defines, and
 * CHECK, which names a broken invariant (file, line, condition) on stderr and aborts, so that libFuzzer
 * and the replaying driver (fuzz_driver.c) both report the input. It evaluates its condition once, in
 * every build. */
#ifndef KT_FUZZ_H
#define KT_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* One input of size bytes at data (not NUL-terminated, not to be kept); returns 0. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

#endif
