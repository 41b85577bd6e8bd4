/* SMTP protocol parsers: command line framing, verbs, MAIL/RCPT paths with ESMTP parameters, HELO names,
 * BDAT arguments and the DATA body (dot-unstuffing, end-of-data detection).
 * Pure functions: no I/O, no allocation, no global state except the reply buffer described below. */
#ifndef KTRELAY_SMTP_PARSE_H
#define KTRELAY_SMTP_PARSE_H

#include <stddef.h>

enum kt_smtp_verb { KT_VERB_UNKNOWN, KT_VERB_HELO, KT_VERB_EHLO, KT_VERB_MAIL, KT_VERB_RCPT, KT_VERB_DATA,
                    KT_VERB_BDAT, KT_VERB_RSET, KT_VERB_NOOP, KT_VERB_QUIT, KT_VERB_VRFY, KT_VERB_EXPN,
                    KT_VERB_HELP, KT_VERB_STARTTLS, KT_VERB_AUTH, KT_VERB_ETRN };

/* Upper-case verb name; "UNKNOWN" for KT_VERB_UNKNOWN or out-of-range values. */
const char *kt_smtp_verb_str(enum kt_smtp_verb v);

/* Line framing for commands. Looks for the first line end in buf[0..len).
 * `max` is the longest line accepted, terminator excluded (so the caller's buffer needs max + 2 bytes).
 * KT_LINE_OK: *line_len is the line without its terminator, *consumed includes the terminator and
 *   *bare_lf tells whether the line ended in a LF without CR (accepted, as Postfix does; log it).
 * KT_LINE_MORE: no terminator yet and the line may still fit (len <= max, or len == max + 1 ending in CR).
 * KT_LINE_TOO_LONG: more than max bytes without a terminator; *line_len and *consumed are 0 (the caller
 *   discards up to the next LF and replies "500 5.5.2 Error: line too long").
 * A CR not followed by LF stays part of the line. */
enum kt_line_status { KT_LINE_OK, KT_LINE_MORE, KT_LINE_TOO_LONG };
enum kt_line_status kt_smtp_frame_line(const char *buf, size_t len, size_t max, size_t *line_len,
                                       size_t *consumed, int *bare_lf);

struct kt_smtp_command {
    enum kt_smtp_verb verb;
    const char *arg;      /* points into the line: text after the verb and one or more spaces; "" if none */
    size_t arg_len;       /* trailing spaces trimmed */
};
/* Verb is case-insensitive and ends at a space or tab or the end of the line ("MAILX" is unknown). */
void kt_smtp_parse_command(const char *line, size_t len, struct kt_smtp_command *out);

/* 1 if the argument holds a NUL or another control character (anything below 0x20 but TAB, or DEL): such a
 * command is refused whole with "501 5.5.2" before any argument parser sees it, so that no truncated or
 * terminal-controlling value reaches a lookup, a log line or a queue file. */
int kt_smtp_arg_has_ctl(const char *arg, size_t len);

enum kt_body_type { KT_BODY_7BIT, KT_BODY_8BITMIME, KT_BODY_BINARYMIME };
enum kt_dsn_ret { KT_RET_NONE, KT_RET_FULL, KT_RET_HDRS };
/* NOTIFY bits; KT_NOTIFY_NEVER is exclusive. */
enum { KT_NOTIFY_NEVER = 1, KT_NOTIFY_SUCCESS = 2, KT_NOTIFY_FAILURE = 4, KT_NOTIFY_DELAY = 8 };

struct kt_mail_params {
    long long size;       /* -1 if absent */
    enum kt_body_type body;
    int has_body;         /* BODY= was given */
    int smtputf8;
    int has_auth;
    enum kt_dsn_ret ret;
    int has_envid;
    const char *envid;    /* ENVID value (xtext, as received) inside the argument, envid_len bytes */
    size_t envid_len;
};
struct kt_rcpt_params {
    int has_notify;
    int has_orcpt;
    unsigned notify;      /* KT_NOTIFY_* bits, 0 if absent */
    const char *orcpt;    /* ORCPT value "addr-type;xtext" inside the argument, orcpt_len bytes */
    size_t orcpt_len;
};
struct kt_smtp_path {
    char addr[513];       /* NUL-terminated */
    size_t addr_len;
    int is_null;          /* <> */
    int had_route;        /* source route was stripped */
    int quoted_local;     /* local part was a quoted-string */
    int utf8;             /* non-ASCII bytes present (always valid UTF-8) */
};

/* MAIL FROM / RCPT TO. `arg` is the command argument ("FROM:<a@b> SIZE=10").
 * Accepted: optional spaces after the colon; <> (MAIL only); bracketless addresses without spaces;
 * source routes "<@a,@b:user@c>" (route stripped, had_route set); quoted local parts (kept quoted);
 * address literals user@[1.2.3.4] and user@[IPv6:...]; UTF-8 local parts and domains (utf8 set; whether
 * SMTPUTF8 was requested is the caller's policy); local parts without a domain ("postmaster").
 * addr[] gets the address without brackets and route, "" for the null sender; at most 512 bytes.
 * ESMTP keywords are case-insensitive; MAIL knows SIZE BODY SMTPUTF8 AUTH RET ENVID, RCPT knows NOTIFY ORCPT.
 * The DSN parameters (RFC 3461) get Postfix's replies, for a bad value and a repeated one alike:
 * "501 5.5.4 Bad RET parameter syntax", "501 5.5.4 Bad ENVID parameter syntax" (xtext of at most 100
 * characters that decodes to printable ASCII), "501 5.5.4 Error: Bad NOTIFY parameter syntax" and
 * "501 5.5.4 Error: Bad ORCPT parameter syntax" (addr-type;xtext, no control character once decoded).
 * Returns NULL on success, or a reply line without CRLF. Replies are static strings, except
 * "555 5.5.4 Unsupported option: NAME", which lives in a per-thread buffer valid until the next call of
 * kt_smtp_parse_mail/kt_smtp_parse_rcpt on the same thread. *path and *p are unspecified after an error. */
const char *kt_smtp_parse_mail(const char *arg, size_t len, struct kt_smtp_path *path, struct kt_mail_params *p);
const char *kt_smtp_parse_rcpt(const char *arg, size_t len, struct kt_smtp_path *path, struct kt_rcpt_params *p);

/* Split addr into local part and domain at the last '@' outside quotes; returns 0 or -EINVAL
 * (unterminated quoted string). */
int kt_smtp_split_address(const char *addr, size_t len, size_t *at_pos /* index of '@' or len if none */);

/* HELO/EHLO argument check: an ASCII domain name or an address literal; returns 1 if acceptable. */
int kt_smtp_valid_helo(const char *arg, size_t len);

/* BDAT argument: "<size> [LAST]". Returns NULL or "501 5.5.4 Syntax: BDAT count [LAST]". */
const char *kt_smtp_parse_bdat(const char *arg, size_t len, unsigned long long *size, int *last);

/* Message body line-ending rule, one for every way in (DATA, BDAT, `ktrelay sendmail`): the output is always
 * canonical, every line ending in CRLF, so that no stored message holds a bare CR or LF that a next hop could
 * read as a line end of its own. A bare LF and a bare CR (one not followed by LF) each become CRLF and set
 * their flag; whether the message is then refused (smtpd_forbid_bare_newline = reject) is the caller's policy.
 *
 * DATA mode (kt_data_parser_init): end of data is ONLY the raw sequence CRLF "." CRLF (its first CRLF is
 * content), or "." CRLF at the very start. A line-leading "." is removed (RFC 5321 4.5.2) after any line
 * end, but after a bare LF or bare CR the line is never the end of data, so "\n.\n", "\r\n.\n", "\n.\r\n",
 * "\r.\r\n", "\r.\r" and "\n.\r\n" stay content (Postfix 3.9 `normalize`): no SMTP smuggling.
 * Chunked mode (kt_data_parser_init_chunked, BDAT and local submission): no dot handling and no end marker;
 * call kt_data_parse_end after the last byte.
 * Either way the result does not depend on how the input is split into calls. */
struct kt_data_parser {
    unsigned state;       /* private */
    int chunked;          /* private: BDAT mode */
    int done;             /* DATA: CRLF.CRLF seen (or "." CRLF at the very start) */
    int bare_lf;          /* a LF not preceded by CR was seen */
    int bare_cr;          /* a CR not followed by LF was seen */
    int ends_in_lf;       /* the output so far ends with LF (or is empty) */
    unsigned long long out_bytes;   /* total bytes produced */
};
void kt_data_parser_init(struct kt_data_parser *p);
void kt_data_parser_init_chunked(struct kt_data_parser *p);

/* Consumes input from in[0..in_len) and writes canonical content to out[0..out_cap), out_cap >= 2 (a bare
 * line end grows by one byte, so out_cap >= 2 * in_len + 2 always takes all of it; out must not overlap in).
 * Returns the number of input bytes consumed: all of them, unless the end of data came first (the rest is
 * pipelined commands; 0 once done) or out filled up (call again). *out_len is the number of bytes written. */
size_t kt_data_parse(struct kt_data_parser *p, const char *in, size_t in_len, char *out, size_t out_cap,
                     size_t *out_len);

/* Chunked mode, after the last byte: writes to out (room for 2 bytes) a CR still held back as CRLF (it was
 * bare). A last line without any line end stays as it is: it holds no bare CR or LF, and the SMTP client
 * ends it before the end-of-data dot. Returns bytes written (0 or 2). */
size_t kt_data_parse_end(struct kt_data_parser *p, char out[2]);

#endif
