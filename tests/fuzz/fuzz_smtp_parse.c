/* Fuzz target for the SMTP parsers. Each input is used as a stream of command lines (framed, parsed, and
 * every argument fed to every argument parser) and as a message body in DATA and in chunked (BDAT) mode
 * (one shot compared with random chunking and output room; the output must be canonical CRLF lines).
 * Any broken invariant aborts. Built as described in fuzz_driver.c. */
#include "smtpd/smtp_parse.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

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
        /* whatever the parser accepts, no NUL truncates it (the session also refuses control bytes) */
        CHECK(memchr(path.addr, '\0', path.addr_len) == NULL);
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

/* Every LF is preceded by CR and every CR followed by LF (a held trailing CR is not in out yet). */
static void check_canonical(const char *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (out[i] == '\r')
            CHECK(i + 1 < n && out[i + 1] == '\n');
        if (out[i] == '\n')
            CHECK(i > 0 && out[i - 1] == '\r');
    }
}

static void fuzz_body(const uint8_t *data, size_t size, int chunked_mode)
{
    struct kt_data_parser one, chunked;
    char *out = malloc(2 * size + 4), *got = malloc(2 * size + 4), tmp[96];
    size_t out_len, used, i = 0, got_len = 0;
    uint32_t seed = size ? data[0] * 2654435761u + (uint32_t)size : 1;

    if (chunked_mode)
        kt_data_parser_init_chunked(&one);
    else
        kt_data_parser_init(&one);
    used = kt_data_parse(&one, (const char *)data, size, out, 2 * size + 2, &out_len);
    CHECK(used <= size && out_len <= 2 * used);
    CHECK(one.out_bytes == out_len);
    if (one.done)
        CHECK(!chunked_mode && ((used == 3 && memcmp(data, ".\r\n", 3) == 0) ||
                                (used >= 5 && memcmp(data + used - 5, "\r\n.\r\n", 5) == 0)));
    else
        CHECK(used == size);
    if (chunked_mode)
        out_len += kt_data_parse_end(&one, out + out_len);
    check_canonical(out, out_len);
    if (one.done)
        CHECK(out_len == 0 || (out_len >= 2 && memcmp(out + out_len - 2, "\r\n", 2) == 0));
    if (!one.bare_lf && !one.bare_cr && !chunked_mode)
        CHECK(out_len <= used);

    /* random input chunks and random output room */
    if (chunked_mode)
        kt_data_parser_init_chunked(&chunked);
    else
        kt_data_parser_init(&chunked);
    while (i < size && !chunked.done) {
        size_t chunk, cap, n, u;
        seed = seed * 1103515245u + 12345u;
        chunk = 1 + (seed >> 16) % 64;
        cap = 2 + (seed >> 8) % (sizeof(tmp) - 2);
        if (chunk > size - i)
            chunk = size - i;
        u = kt_data_parse(&chunked, (const char *)data + i, chunk, tmp, cap, &n);
        CHECK(n <= cap && (u > 0 || n > 0));
        memcpy(got + got_len, tmp, n);
        got_len += n;
        i += u;
    }
    if (chunked_mode)
        got_len += kt_data_parse_end(&chunked, got + got_len);
    CHECK(i == used && got_len == out_len && memcmp(got, out, got_len) == 0);
    CHECK(chunked.done == one.done && chunked.bare_lf == one.bare_lf && chunked.bare_cr == one.bare_cr);
    free(out);
    free(got);
}

static void fuzz_data(const uint8_t *data, size_t size)
{
    fuzz_body(data, size, 0);
    fuzz_body(data, size, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_commands((const char *)data, size, 512);
    fuzz_commands((const char *)data, size, 16);
    fuzz_data(data, size);
    return 0;
}

