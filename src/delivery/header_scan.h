/* Reads the header section of a message as its bytes stream past, to find
 * what the log reports about it (Postfix's cleanup logs "message-id=").
 * Bytes are looked at, never kept: one line of at most 998 bytes is held
 * while it is being read. Scanning stops at the empty line that ends the
 * headers, or after KT_HEADER_SCAN_MAX bytes.
 * It also finds a mail loop as Postfix's local(8) and virtual(8) do: a Delivered-To: header whose value
 * (on the header's first line, blanks trimmed) is the address being delivered to, compared without
 * regard to case. */
#ifndef KTRELAY_HEADER_SCAN_H
#define KTRELAY_HEADER_SCAN_H

#include <stddef.h>

#define KT_HEADER_SCAN_MAX (256 * 1024)

struct kt_header_scan {
    int done;                 /* end of headers seen (or the scan limit) */
    int in_msgid;             /* the current logical header is Message-ID */
    size_t seen;              /* bytes looked at */
    size_t line_len;
    char line[1000];          /* the physical line being read (longer lines are cut) */
    char message_id[256];     /* trimmed value of the first Message-ID header, "" if none */
    const char *loop_rcpt;    /* set by the caller after reset: Delivered-To: this address is a loop */
    int loop;                 /* such a header was seen */
};

void kt_header_scan_reset(struct kt_header_scan *h);
/* Feed the next bytes of the message (CRLF or LF line ends). */
void kt_header_scan_feed(struct kt_header_scan *h, const char *data, size_t len);

#endif
