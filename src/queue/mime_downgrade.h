/* 8BITMIME to 7BIT conversion of a message for a next hop that does not announce 8BITMIME, as
 * Postfix's smtp(8) does with disable_mime_output_conversion = no (mime_state's downgrade): every leaf
 * part (and a single-part message) whose Content-Transfer-Encoding is 8bit or binary, or absent with 8-bit
 * bytes in it, is sent as quoted-printable (RFC 2045 6.7: lines of at most 76 characters, soft line breaks,
 * the hard line breaks kept as CRLF) with its Content-Transfer-Encoding header replaced (or added at the
 * end of the part's headers); a multipart or message/rfc822 entity declared 8bit/binary gets
 * "Content-Transfer-Encoding: 7bit" and its parts (by boundary, nested) or its enclosed message are
 * converted in turn. No other header is changed. Pure function over bytes: no I/O. */
#ifndef KTRELAY_MIME_DOWNGRADE_H
#define KTRELAY_MIME_DOWNGRADE_H

#include <stddef.h>

#include "core/buf.h"

/* Nesting deeper than this (Postfix's mime_nesting_limit default) is passed on unchanged. */
#define KT_MIME_NESTING_LIMIT 100

/* Convert the message in[0..len) (headers and body, any line ends) and append the result to out with
 * CRLF line ends throughout. Returns 1 when something was converted, 0 when no part needed it (out then
 * holds the input with CRLF line ends, which the caller may ignore and send the original instead). */
int kt_mime_downgrade(const char *in, size_t len, struct kt_buf *out);

#endif
