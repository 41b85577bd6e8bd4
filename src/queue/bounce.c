/* RFC 3464 delivery status notifications, in the layout Postfix's bounce(8)
 * uses. A notification is an ordinary queue file with the null sender; the
 * queue manager never notifies about a message whose sender is null. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/alloc.h"
#include "queue/bounce.h"
#include "core/buf.h"

#define MAX_HEADERS (64 * 1024)

static void rfc2822_date(time_t t, char *buf, size_t len)
{
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(buf, len, "%a, %d %b %Y %H:%M:%S %z (%Z)", &tm);
}

/* "5.1.1 host[1.2.3.4]:25 host ... said: 550 ..." -> status, mta, diagnostic */
static void split_reason(const char *reason, char *status, size_t slen, char *mta, size_t mlen, const char **diag)
{
    const char *r = reason ? reason : "5.0.0 - unknown error";
    const char *sp1 = strchr(r, ' ');
    const char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2) {
        snprintf(status, slen, "5.0.0");
        snprintf(mta, mlen, "-");
        *diag = r;
        return;
    }
    snprintf(status, slen, "%.*s", (int)(sp1 - r), r);
    snprintf(mta, mlen, "%.*s", (int)(sp2 - sp1 - 1), sp1 + 1);
    *diag = sp2 + 1;
}

/* "relay[1.2.3.4]:25" -> "relay" for Remote-MTA */
static void mta_name(const char *mta, char *out, size_t len)
{
    size_t n = strcspn(mta, "[");
    snprintf(out, len, "%.*s", (int)n, mta);
}

char *kt_dsn_build(enum kt_dsn_kind kind, const char *myhostname, const char *id, const char *orig_sender,
                   time_t arrival, const struct kt_dsn_rcpt *rcpts, size_t n, const char *headers,
                   size_t headers_len, time_t retry_until)
{
    struct kt_buf b = { 0 };
    char date[64], boundary[300];
    time_t now = time(NULL);
    int failed = kind == KT_DSN_FAILED;

    rfc2822_date(now, date, sizeof(date));
    snprintf(boundary, sizeof(boundary), "%s.%lld/%s", id, (long long)now, myhostname);
    kt_buf_printf(&b, "From: MAILER-DAEMON@%s (Mail Delivery System)\r\n", myhostname);
    kt_buf_printf(&b, "To: %s\r\n", orig_sender);
    kt_buf_printf(&b, "Subject: %s\r\n",
                  failed ? "Undelivered Mail Returned to Sender" : "Delayed Mail (still being retried)");
    kt_buf_printf(&b, "Date: %s\r\n", date);
    kt_buf_printf(&b, "Message-Id: <%lld.%s@%s>\r\n", (long long)now, id, myhostname);
    kt_buf_printf(&b, "Auto-Submitted: auto-replied\r\n");
    kt_buf_printf(&b, "MIME-Version: 1.0\r\n");
    kt_buf_printf(&b, "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"%s\"\r\n",
                  boundary);
    kt_buf_printf(&b, "\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    kt_buf_printf(&b, "--%s\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
                  boundary);
    kt_buf_printf(&b, "This is the mail system at host %s.\r\n\r\n", myhostname);
    if (failed)
        kt_buf_printf(&b, "I'm sorry to have to inform you that your message could not\r\n"
                          "be delivered to one or more recipients. It's attached below.\r\n\r\n");
    else
        kt_buf_printf(&b, "####################################################################\r\n"
                          "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
                          "####################################################################\r\n\r\n"
                          "Your message could not be delivered for some time. It will be retried\r\n"
                          "until it is too old.\r\n\r\n");
    kt_buf_printf(&b, "                   The mail system\r\n\r\n");
    for (size_t i = 0; i < n; i++) {
        char status[32], mta[300];
        const char *diag;
        split_reason(rcpts[i].reason, status, sizeof(status), mta, sizeof(mta), &diag);
        kt_buf_printf(&b, "<%s>: %s\r\n\r\n", rcpts[i].addr, diag);
    }

    kt_buf_printf(&b, "--%s\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
                  boundary);
    rfc2822_date(arrival, date, sizeof(date));
    kt_buf_printf(&b, "Reporting-MTA: dns; %s\r\nX-Ktrelay-Queue-ID: %s\r\nX-Ktrelay-Sender: rfc822; %s\r\n"
                      "Arrival-Date: %s\r\n", myhostname, id, orig_sender, date);
    for (size_t i = 0; i < n; i++) {
        char status[32], mta[300], host[300];
        const char *diag;
        split_reason(rcpts[i].reason, status, sizeof(status), mta, sizeof(mta), &diag);
        kt_buf_printf(&b, "\r\nFinal-Recipient: rfc822; %s\r\nOriginal-Recipient: rfc822;%s\r\n", rcpts[i].addr,
                      rcpts[i].addr);
        kt_buf_printf(&b, "Action: %s\r\nStatus: %s\r\n", failed ? "failed" : "delayed", status);
        if (strcmp(mta, "-") != 0) {
            mta_name(mta, host, sizeof(host));
            kt_buf_printf(&b, "Remote-MTA: dns; %s\r\n", host);
        }
        /* the SMTP reply itself when the diagnostic quotes one */
        const char *said = strstr(diag, " said: ");
        if (said) {
            const char *end = strstr(said, " (in reply to ");
            int len = end ? (int)(end - said - 7) : (int)strlen(said + 7);
            kt_buf_printf(&b, "Diagnostic-Code: smtp; %.*s\r\n", len, said + 7);
        } else {
            kt_buf_printf(&b, "Diagnostic-Code: X-Ktrelay; %s\r\n", diag);
        }
        if (!failed) {
            rfc2822_date(retry_until, date, sizeof(date));
            kt_buf_printf(&b, "Will-Retry-Until: %s\r\n", date);
        }
    }
    kt_buf_printf(&b, "\r\n--%s\r\nContent-Description: Undelivered Message Headers\r\n"
                      "Content-Type: text/rfc822-headers\r\n\r\n", boundary);
    kt_buf_append(&b, headers, headers_len);
    if (headers_len < 2 || memcmp(headers + headers_len - 2, "\r\n", 2) != 0)
        kt_buf_printf(&b, "\r\n");
    kt_buf_printf(&b, "\r\n--%s--\r\n", boundary);
    kt_buf_append(&b, "", 1);
    return b.data;
}

/* The header section of the queued message (up to the empty line). */
static size_t read_headers(int fd, const struct kt_qmsg *m, char *buf, size_t cap)
{
    size_t want = (size_t)m->body_len < cap ? (size_t)m->body_len : cap;
    ssize_t n = want ? pread(fd, buf, want, m->body_off) : 0;
    if (n <= 0)
        return 0;
    for (ssize_t i = 0; i + 3 < n; i++)
        if (!memcmp(buf + i, "\r\n\r\n", 4))
            return (size_t)i + 2;
    return (size_t)n;
}

int kt_dsn_send(const char *qdir, const char *myhostname, enum kt_dsn_kind kind, const struct kt_qmsg *m, int fd,
                const struct kt_dsn_rcpt *rcpts, size_t n, time_t retry_until, char *new_id, size_t idlen)
{
    if (!m->sender[0])
        return 1;
    char *hdrs = kt_malloc(MAX_HEADERS);
    size_t hlen = fd >= 0 ? read_headers(fd, m, hdrs, MAX_HEADERS) : 0;
    char *text = kt_dsn_build(kind, myhostname, m->id, m->sender, m->arrival, rcpts, n, hdrs, hlen, retry_until);
    const char *to = m->sender;
    new_id[0] = '\0';
    int rc = kt_queue_write(qdir, "", &to, 1, text, strlen(text), new_id, idlen);
    kt_free(text);
    kt_free(hdrs);
    return rc;
}
