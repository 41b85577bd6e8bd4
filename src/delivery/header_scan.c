/* Message-ID from the streamed header section (see header_scan.h). RFC 5322
 * 2.2.3: a line starting with white space continues the previous header. */
#include <string.h>
#include <strings.h>

#include "delivery/header_scan.h"

void kt_header_scan_reset(struct kt_header_scan *h)
{
    h->done = 0;
    h->in_msgid = 0;
    h->seen = 0;
    h->line_len = 0;
    h->message_id[0] = '\0';
    h->loop_rcpt = NULL;
    h->loop = 0;
}

static void append_trimmed(char *dst, size_t cap, const char *src, size_t len)
{
    while (len && (*src == ' ' || *src == '\t')) {
        src++;
        len--;
    }
    while (len && (src[len - 1] == ' ' || src[len - 1] == '\t'))
        len--;
    size_t have = strlen(dst);
    if (have + len >= cap)
        len = cap - 1 - have;
    memcpy(dst + have, src, len);
    dst[have + len] = '\0';
}

static void line_done(struct kt_header_scan *h)
{
    size_t len = h->line_len;
    const char *l = h->line;
    h->line_len = 0;
    if (len && l[len - 1] == '\r')
        len--;
    if (len == 0) {
        h->done = 1;
        return;
    }
    if (l[0] == ' ' || l[0] == '\t') {
        if (h->in_msgid)
            append_trimmed(h->message_id, sizeof(h->message_id), l, len);
        return;
    }
    h->in_msgid = 0;
    static const char dt[] = "delivered-to:";
    if (h->loop_rcpt && len >= sizeof(dt) - 1 && strncasecmp(l, dt, sizeof(dt) - 1) == 0) {
        char v[sizeof(h->line)];
        v[0] = '\0';
        append_trimmed(v, sizeof(v), l + sizeof(dt) - 1, len - (sizeof(dt) - 1));
        if (strcasecmp(v, h->loop_rcpt) == 0)
            h->loop = 1;
        return;
    }
    static const char name[] = "message-id:";
    if (!h->message_id[0] && len >= sizeof(name) - 1 && strncasecmp(l, name, sizeof(name) - 1) == 0) {
        h->in_msgid = 1;
        append_trimmed(h->message_id, sizeof(h->message_id), l + sizeof(name) - 1, len - (sizeof(name) - 1));
    }
}

void kt_header_scan_feed(struct kt_header_scan *h, const char *data, size_t len)
{
    for (size_t i = 0; i < len && !h->done; i++) {
        if (++h->seen > KT_HEADER_SCAN_MAX) {
            h->done = 1;
            break;
        }
        if (data[i] == '\n') {
            line_done(h);
            continue;
        }
        if (h->line_len < sizeof(h->line))
            h->line[h->line_len++] = data[i];
    }
}
