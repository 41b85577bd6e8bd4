/* Shared driver of the fuzz targets (tests/fuzz/fuzz_*.c each define LLVMFuzzerTestOneInput).
 *
 * Built with clang -fsanitize=fuzzer (tests/fuzz/run-libfuzzer.sh, run by tests/run-all.sh for a bounded
 * time) libFuzzer supplies main() and this file adds nothing. Otherwise, as the `fuzz` suite of
 * `meson test`, main() replays every file of the given directories -- the seed corpus and regressions/,
 * where each input that ever crashed a target is kept -- and deterministic mutations of each. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#ifndef KT_LIBFUZZER
static uint32_t mut_state = 1;
/* Bytes that matter to the parsers under test: line ends, SMTP and address syntax, table syntax. */
static const char interesting[] = "\r\n.<>@\":[] =,+\\\x80\xc3\0\t{}/#!%$";

static uint32_t mut_rand(void)
{
    mut_state = mut_state * 1103515245u + 12345u;
    return mut_state >> 8;
}

/* Byte flips and insertions of the bytes that matter to the parsers. */
static size_t mutate(uint8_t *buf, size_t len, size_t cap)
{
    unsigned k, edits = 1 + mut_rand() % 4;

    for (k = 0; k < edits; k++) {
        size_t pos = len ? mut_rand() % len : 0;
        uint8_t c = (uint8_t)interesting[mut_rand() % (sizeof(interesting) - 1)];
        switch (mut_rand() % 4) {
        case 0:
            if (len)
                buf[pos] = c;
            break;
        case 1:
            if (len < cap) {
                memmove(buf + pos + 1, buf + pos, len - pos);
                buf[pos] = c;
                len++;
            }
            break;
        case 2:
            if (len) {
                memmove(buf + pos, buf + pos + 1, len - pos - 1);
                len--;
            }
            break;
        default:
            if (len)
                buf[pos] = (uint8_t)mut_rand();
            break;
        }
    }
    return len;
}

static int run_file(const char *path, unsigned mutations)
{
    FILE *f = fopen(path, "rb");
    uint8_t *orig, *buf;
    size_t len, cap;
    unsigned m;

    if (!f)
        return -1;
    orig = malloc(1 << 20);
    len = fread(orig, 1, 1 << 20, f);
    fclose(f);
    cap = len + 64;
    buf = malloc(cap);
    LLVMFuzzerTestOneInput(orig, len);
    for (m = 0; m < mutations; m++) {
        size_t n;
        memcpy(buf, orig, len);
        n = mutate(buf, len, cap);
        LLVMFuzzerTestOneInput(buf, n);
    }
    free(orig);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned files = 0, mutations = 300;
    int i;

    if (getenv("KT_FUZZ_MUTATIONS"))
        mutations = (unsigned)strtoul(getenv("KT_FUZZ_MUTATIONS"), NULL, 10);
    for (i = 1; i < argc; i++) {
        DIR *d = opendir(argv[i]);
        struct dirent *e;

        if (!d) {
            if (run_file(argv[i], mutations) == 0)
                files++;
            continue;
        }
        while ((e = readdir(d)) != NULL) {
            char path[4096];
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof(path), "%s/%s", argv[i], e->d_name);
            if (run_file(path, mutations) == 0)
                files++;
        }
        closedir(d);
    }
    printf("%u corpus files, %u mutations each: ok\n", files, mutations);
    return files ? 0 : 1;  /* an empty or missing corpus is a broken test, not a pass */
}
#endif
