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

static const char *subject_of(enum kt_dsn_kind kind)
{
    return kind == KT_DSN_FAILED ? "Undelivered Mail Returned to Sender"
         : kind == KT_DSN_DELAYED ? "Delayed Mail (still being retried)" : "Successful Mail Delivery Report";
}

char *kt_dsn_build(enum kt_dsn_kind kind, const char *myhostname, const struct kt_dsn_msg *msg,
                   const struct kt_dsn_rcpt *rcpts, size_t n)
{
    struct kt_buf b = { 0 };
    char date[64], boundary[300], text[1024];
    time_t now = time(NULL);

    rfc2822_date(now, date, sizeof(date));
    snprintf(boundary, sizeof(boundary), "%s.%lld/%s", msg->id, (long long)now, myhostname);
    kt_buf_printf(&b, "From: MAILER-DAEMON@%s (Mail Delivery System)\r\n", myhostname);
    kt_buf_printf(&b, "To: %s\r\n", msg->orig_sender);
    kt_buf_printf(&b, "Subject: %s\r\n", subject_of(kind));
    kt_buf_printf(&b, "Date: %s\r\n", date);
    kt_buf_printf(&b, "Message-Id: <%lld.%s@%s>\r\n", (long long)now, msg->id, myhostname);
    kt_buf_printf(&b, "Auto-Submitted: auto-replied\r\n");
    kt_buf_printf(&b, "MIME-Version: 1.0\r\n");
    kt_buf_printf(&b, "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"%s\"\r\n",
                  boundary);
    kt_buf_printf(&b, "\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    kt_buf_printf(&b, "--%s\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
                  boundary);
    kt_buf_printf(&b, "This is the mail system at host %s.\r\n\r\n", myhostname);
    if (kind == KT_DSN_FAILED)
        kt_buf_printf(&b, "I'm sorry to have to inform you that your message could not\r\n"
                          "be delivered to one or more recipients. It's attached below.\r\n\r\n");
    else if (kind == KT_DSN_DELAYED)
        kt_buf_printf(&b, "####################################################################\r\n"
                          "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
                          "####################################################################\r\n\r\n"
                          "Your message could not be delivered for some time. It will be retried\r\n"
                          "until it is too old.\r\n\r\n");
    else
        kt_buf_printf(&b, "Your message was successfully delivered to the destination(s)\r\n"
                          "listed below. If the message was delivered to mailbox you will\r\n"
                          "receive no further notifications. Otherwise you may still receive\r\n"
                          "notifications of mail delivery errors from other systems.\r\n\r\n");
    kt_buf_printf(&b, "                   The mail system\r\n\r\n");
    for (size_t i = 0; i < n; i++) {
        char status[32], mta[300];
        const char *diag;
        split_reason(rcpts[i].reason, status, sizeof(status), mta, sizeof(mta), &diag);
        kt_buf_printf(&b, "<%s>: %s\r\n\r\n", rcpts[i].addr, diag);
    }

    kt_buf_printf(&b, "--%s\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
                  boundary);
    rfc2822_date(msg->arrival, date, sizeof(date));
    kt_buf_printf(&b, "Reporting-MTA: dns; %s\r\n", myhostname);
    /* RFC 3464 2.2.1: the ENVID, decoded from xtext as Postfix shows it */
    if (msg->envid && *msg->envid) {
        kt_xtext_decode(msg->envid, text, sizeof(text));
        kt_buf_printf(&b, "Original-Envelope-Id: %s\r\n", text);
    }
    kt_buf_printf(&b, "X-Ktrelay-Queue-ID: %s\r\nX-Ktrelay-Sender: rfc822; %s\r\nArrival-Date: %s\r\n", msg->id,
                  msg->orig_sender, date);
    for (size_t i = 0; i < n; i++) {
        char status[32], mta[300], host[300];
        const char *diag;
        split_reason(rcpts[i].reason, status, sizeof(status), mta, sizeof(mta), &diag);
        kt_buf_printf(&b, "\r\nFinal-Recipient: rfc822; %s\r\n", rcpts[i].addr);
        /* RFC 3464 2.3.1: the ORCPT as given, its address decoded from xtext (Postfix's form) */
        if (rcpts[i].orcpt && strchr(rcpts[i].orcpt, ';')) {
            const char *semi = strchr(rcpts[i].orcpt, ';');
            kt_xtext_decode(semi + 1, text, sizeof(text));
            kt_buf_printf(&b, "Original-Recipient: %.*s;%s\r\n", (int)(semi - rcpts[i].orcpt), rcpts[i].orcpt, text);
        } else {
            kt_buf_printf(&b, "Original-Recipient: rfc822;%s\r\n", rcpts[i].addr);
        }
        kt_buf_printf(&b, "Action: %s\r\nStatus: %s\r\n",
                      kind == KT_DSN_FAILED ? "failed" : kind == KT_DSN_DELAYED ? "delayed"
                      : rcpts[i].action ? rcpts[i].action : "delivered", status);
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
        if (kind == KT_DSN_DELAYED) {
            rfc2822_date(msg->retry_until, date, sizeof(date));
            kt_buf_printf(&b, "Will-Retry-Until: %s\r\n", date);
        }
    }
    kt_buf_printf(&b, "\r\n--%s\r\nContent-Description: %s%s\r\nContent-Type: %s\r\n", boundary,
                  kind == KT_DSN_SUCCESS ? "" : "Undelivered ", msg->full ? "Message" : "Message Headers",
                  msg->full ? "message/rfc822" : "text/rfc822-headers");
    if (msg->eight_bit)
        kt_buf_printf(&b, "Content-Transfer-Encoding: 8bit\r\n");
    kt_buf_printf(&b, "\r\n");
    kt_buf_append(&b, msg->original, msg->original_len);
    if (msg->original_len < 2 || memcmp(msg->original + msg->original_len - 2, "\r\n", 2) != 0)
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

/* All of the queued message, when it can be read whole. */
static char *read_all(int fd, const struct kt_qmsg *m, size_t *len)
{
    char *buf = kt_malloc((size_t)m->body_len + 1);
    size_t got = 0;
    while (got < (size_t)m->body_len) {
        ssize_t r = pread(fd, buf + got, (size_t)m->body_len - got, m->body_off + (off_t)got);
        if (r <= 0) {
            kt_free(buf);
            return NULL;
        }
        got += (size_t)r;
    }
    *len = got;
    return buf;
}

int kt_dsn_send(const char *qdir, const char *myhostname, enum kt_dsn_kind kind, const struct kt_qmsg *m, int fd,
                const struct kt_dsn_rcpt *rcpts, size_t n, time_t retry_until, long long size_limit, char *new_id,
                size_t idlen)
{
    if (!m->sender[0])
        return 1;
    struct kt_dsn_msg msg = {
        .id = m->id, .orig_sender = m->sender, .arrival = m->arrival, .envid = m->envid,
        .eight_bit = m->body == KT_QBODY_8BITMIME || m->body == KT_QBODY_BINARYMIME, .retry_until = retry_until,
    };
    char *orig = NULL;
    /* Postfix: the whole message with a failure unless RET=HDRS; headers only when it is larger than
     * bounce_size_limit, and with delay and success notices */
    if (fd >= 0 && kind == KT_DSN_FAILED && m->ret != KT_QRET_HDRS && size_limit > 0 && m->body_len <= size_limit &&
        (orig = read_all(fd, m, &msg.original_len)))
        msg.full = 1;
    if (!orig) {
        orig = kt_malloc(MAX_HEADERS);
        msg.original_len = fd >= 0 ? read_headers(fd, m, orig, MAX_HEADERS) : 0;
    }
    msg.original = orig;
    char *text = kt_dsn_build(kind, myhostname, &msg, rcpts, n);
    const char *to = m->sender;
    new_id[0] = '\0';
    int rc = kt_queue_write(qdir, "", &to, 1, text, strlen(text), new_id, idlen);
    kt_free(text);
    kt_free(orig);
    return rc;
}
