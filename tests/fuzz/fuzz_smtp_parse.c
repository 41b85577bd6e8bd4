/* Fuzz driver for the SMTP parsers. Each input is used twice: as a stream of command lines (framed, parsed,
 * and every argument fed to every argument parser) and as a DATA stream (one shot compared with chunked,
 * in-place parsing). Any broken invariant aborts.
 * Built with -DKT_LIBFUZZER it is a libFuzzer target:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -DKT_LIBFUZZER -D_GNU_SOURCE -Isrc \
 *         src/smtpd/smtp_parse.c tests/fuzz/fuzz_smtp_parse.c -o fuzz_smtp_parse
 *   ./fuzz_smtp_parse tests/fuzz/corpus_smtp
 * Otherwise main() replays the files of the given directories plus deterministic mutations of each. */
#include "smtpd/smtp_parse.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* A reply is one line: "ddd x.y.z text", no CR or LF. */
static void check_reply(const char *r)
{
    if (!r)
        return;
    CHECK(strlen(r) > 10 && r[0] >= '4' && r[0] <= '5' && r[3] == ' ');
    CHECK(strpbrk(r, "\r\n") == NULL);
}

static void check_path(const struct kt_smtp_path *path)
{
    size_t at;

    CHECK(path->addr_len <= 512);
    CHECK(strlen(path->addr) == path->addr_len);
    CHECK(path->is_null == (path->addr_len == 0));
    CHECK(kt_smtp_split_address(path->addr, path->addr_len, &at) == 0);
    CHECK(at <= path->addr_len);
}

static void fuzz_arguments(const char *arg, size_t len)
{
    struct kt_smtp_path path;
    struct kt_mail_params mp;
    struct kt_rcpt_params rp;
    unsigned long long size;
    size_t at;
    int last;
    const char *r;

    r = kt_smtp_parse_mail(arg, len, &path, &mp);
    check_reply(r);
    if (!r) {
        check_path(&path);
        CHECK(mp.size >= -1);
    }
    r = kt_smtp_parse_rcpt(arg, len, &path, &rp);
    check_reply(r);
    if (!r) {
        check_path(&path);
        CHECK(!path.is_null);
    }
    check_reply(kt_smtp_parse_bdat(arg, len, &size, &last));
    (void)kt_smtp_valid_helo(arg, len);
    if (kt_smtp_split_address(arg, len, &at) == 0)
        CHECK(at <= len && (at == len || arg[at] == '@'));
}

static void fuzz_commands(const char *buf, size_t len, size_t max)
{
    while (len > 0) {
        struct kt_smtp_command cmd;
        size_t line_len, used;
        int bare_lf;
        enum kt_line_status st = kt_smtp_frame_line(buf, len, max, &line_len, &used, &bare_lf);

        if (st == KT_LINE_MORE) {
            CHECK(len <= max + 1 && memchr(buf, '\n', len) == NULL);
            line_len = len;     /* end of input: parse the partial line as if it were complete */
            used = len;
        } else if (st == KT_LINE_TOO_LONG) {
            const char *lf = memchr(buf, '\n', len);
            CHECK(len > max);
            if (!lf)
                return;
            len -= (size_t)(lf + 1 - buf);
            buf = lf + 1;
            continue;
        } else {
            CHECK(line_len <= max && used <= len && buf[used - 1] == '\n');
            CHECK(used == line_len + 1 + (size_t)!bare_lf);
            CHECK(memchr(buf, '\n', line_len) == NULL);
        }
        kt_smtp_parse_command(buf, line_len, &cmd);
        CHECK(kt_smtp_verb_str(cmd.verb) != NULL);
        CHECK(cmd.arg_len == 0 || (cmd.arg > buf && cmd.arg + cmd.arg_len <= buf + line_len));
        fuzz_arguments(cmd.arg, cmd.arg_len);
        fuzz_arguments(buf, line_len);
        buf += used;
        len -= used;
    }
}

static void fuzz_data(const uint8_t *data, size_t size)
{
    struct kt_data_parser one, chunked;
    char *out = malloc(size + 1), *buf = malloc(size + 1);
    size_t out_len, used, i = 0, got = 0;
    uint32_t seed = size ? data[0] * 2654435761u + (uint32_t)size : 1;

    kt_data_parser_init(&one);
    used = kt_data_parse(&one, (const char *)data, size, out, &out_len);
    CHECK(out_len <= used && used <= size);
    CHECK(one.out_bytes == out_len);
    if (one.done)
        CHECK((used == 3 && memcmp(data, ".\r\n", 3) == 0) ||
              (used >= 5 && memcmp(data + used - 5, "\r\n.\r\n", 5) == 0));
    else
        CHECK(used == size);

    /* random chunk sizes, in place; outputs gathered at the front of buf */
    memcpy(buf, data, size);
    kt_data_parser_init(&chunked);
    while (i < size && !chunked.done) {
        size_t chunk, n, u;
        seed = seed * 1103515245u + 12345u;
        chunk = 1 + (seed >> 16) % 64;
        if (chunk > size - i)
            chunk = size - i;
        u = kt_data_parse(&chunked, buf + i, chunk, buf + i, &n);
        CHECK(n <= u && (u == chunk || chunked.done));
        memmove(buf + got, buf + i, n);
        got += n;
        i += u;
    }
    CHECK(i == used && got == out_len && memcmp(buf, out, got) == 0);
    CHECK(chunked.done == one.done && chunked.bare_lf == one.bare_lf && chunked.bare_cr == one.bare_cr);
    free(out);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_commands((const char *)data, size, 512);
    fuzz_commands((const char *)data, size, 16);
    fuzz_data(data, size);
    return 0;
}

#ifndef KT_LIBFUZZER
static uint32_t mut_state = 1;

static uint32_t mut_rand(void)
{
    mut_state = mut_state * 1103515245u + 12345u;
    return mut_state >> 8;
}

/* Byte flips and insertions of the bytes that matter to the parsers. */
static size_t mutate(uint8_t *buf, size_t len, size_t cap)
{
    static const char interesting[] = "\r\n.<>@\":[] =,+\\\x80\xc3";
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
