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

enum kt_body_type { KT_BODY_7BIT, KT_BODY_8BITMIME, KT_BODY_BINARYMIME };
enum kt_dsn_ret { KT_RET_NONE, KT_RET_FULL, KT_RET_HDRS };
/* NOTIFY bits; KT_NOTIFY_NEVER is exclusive. */
enum { KT_NOTIFY_NEVER = 1, KT_NOTIFY_SUCCESS = 2, KT_NOTIFY_FAILURE = 4, KT_NOTIFY_DELAY = 8 };

struct kt_mail_params {
    long long size;       /* -1 if absent */
    enum kt_body_type body;
    int smtputf8;
    int has_auth;
    enum kt_dsn_ret ret;
    int has_envid;
};
struct kt_rcpt_params {
    int has_notify;
    int has_orcpt;
    unsigned notify;      /* KT_NOTIFY_* bits, 0 if absent */
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

/* DATA body: incremental, resumable across arbitrary chunk boundaries. A zeroed struct is initialised. */
struct kt_data_parser {
    unsigned state;       /* private */
    int done;             /* CRLF.CRLF seen (or "." CRLF at the very start) */
    int bare_lf;          /* a LF not preceded by CR was seen */
    int bare_cr;          /* a CR not followed by LF was seen */
    unsigned long long out_bytes;   /* total unstuffed bytes produced */
};
void kt_data_parser_init(struct kt_data_parser *p);

/* Consumes in[0..in_len) up to and including the end-of-data line; writes the dot-unstuffed content to out
 * (room for in_len bytes; out == in works in place) and sets *out_len. Returns the number of input bytes
 * consumed, < in_len only when done (the rest is pipelined commands); 0 once done.
 * Lines are CRLF-terminated; line ends are kept as sent. End of data is ONLY CRLF "." CRLF (the first CRLF
 * is content), or "." CRLF at the very start. A bare LF or bare CR is content and sets its flag; the line
 * after a bare LF is not a new line for end-of-data or unstuffing, so "\n.\n", "\r\n.\n", "\n.\r\n" and
 * "\r.\r\n" never end the data (no SMTP smuggling). A line starting with "." loses that dot. The one place
 * where output differs from input beyond unstuffing: a line-leading "." followed by a CR that is not
 * followed by LF drops that CR too (bare_cr is set; the message is malformed anyway). */
size_t kt_data_parse(struct kt_data_parser *p, const char *in, size_t in_len, char *out, size_t *out_len);

#endif
