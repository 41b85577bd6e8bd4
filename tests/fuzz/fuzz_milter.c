/* Fuzz target for what ktrelay reads from a milter (milter/milter.c): packet framing, the negotiation
 * reply with its macro lists (SMFIR_SETSYMLIST), every reply and modification at every stage of a
 * session, through kt_milter_replay (no ring, no socket). Input: byte 0 picks milter_protocol (2 to 6),
 * byte 1 the replay flags (default_action, a small message_size_limit, 1-byte reads, an unknown command),
 * the rest is what the milter sends. Invariants: no memory error or leak (ASan, UBSan); every event has
 * exactly one outcome; a refusal passed to the SMTP client is one well-formed 4xx/5xx reply (every line
 * with the same code, CRLF between lines, no other control character); the edited message keeps valid
 * header names, folded header values and one-line envelope addresses (kt_milter_replay checks those).
 * Built as described in fuzz_driver.c. */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz.h"
#include "milter/milter.h"

static const char message[] = "Received: from client.example (unknown [127.0.0.1])\r\n\tby mx.example.test\r\n"
                              "From: a@example.org\r\nSubject: hello\r\nSubject: again\r\n\r\nbody line\r\n";

static void check_result(void *arg, const struct kt_milter_result *r)
{
    (void)arg;
    if (r->verdict != KT_MILTER_REJECT && r->verdict != KT_MILTER_SHUTDOWN)
        return;
    const char *s = r->reply;
    CHECK((s[0] == '4' || s[0] == '5') && s[1] >= '0' && s[1] <= '9' && s[2] >= '0' && s[2] <= '9');
    for (const char *line = s;;) {
        const char *end = strstr(line, "\r\n");
        size_t len = end ? (size_t)(end - line) : strlen(line);
        CHECK(len >= 4 && memcmp(line, s, 3) == 0 && line[3] == (end ? '-' : ' '));
        for (size_t i = 0; i < len; i++)
            CHECK((unsigned char)line[i] >= 32 && line[i] != 127);
        if (!end)
            break;
        line = end + 2;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    if (fd < 0) {
        fd = memfd_create("message", MFD_CLOEXEC);
        CHECK(fd >= 0 && write(fd, message, sizeof(message) - 1) == (ssize_t)(sizeof(message) - 1));
    }
    if (size < 2)
        return 0;
    int rc = kt_milter_replay(data + 2, size - 2, 2 + data[0] % 5, data[1], fd, sizeof(message) - 1, check_result,
                              NULL);
    CHECK(rc == 0);
    return 0;
}
