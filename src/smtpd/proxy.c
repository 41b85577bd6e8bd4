/* PROXY protocol v1/v2 header parsing and exact-length reading (proxy.h).
 *
 * Reading: the socket is peeked, the bytes are parsed together with those
 * already kept, and only the bytes that belong to the header are taken out
 * of the socket: all of them while the header is incomplete (every byte
 * seen so far is header), exactly the rest once its length is known. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "smtpd/proxy.h"

static const unsigned char v2_sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

#define V1_MAX 107   /* "PROXY TCP6 " + two 39-byte addresses + two ports + spaces + CRLF */

static int parse_port(const char *s, int *port)
{
    long v = 0;
    if (!*s || (s[0] == '0' && s[1]) || strlen(s) > 5)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
    }
    if (v > 65535)
        return -1;
    *port = (int)v;
    return 0;
}

static int parse_v1(const unsigned char *buf, size_t len, struct kt_proxy_header *out, const char **why)
{
    const unsigned char *crlf = NULL;
    for (size_t i = 0; i + 1 < len && i + 2 <= V1_MAX; i++)
        if (buf[i] == '\r' && buf[i + 1] == '\n') {
            crlf = buf + i;
            break;
        }
    if (!crlf) {
        if (len >= V1_MAX) {
            *why = "PROXY v1 line too long";
            return -EINVAL;
        }
        return 0;
    }
    char line[V1_MAX + 1];
    size_t n = (size_t)(crlf - buf);
    memcpy(line, buf, n);
    line[n] = '\0';
    char *f[7];
    size_t nf = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, " ", &save); tok && nf < 7; tok = strtok_r(NULL, " ", &save))
        f[nf++] = tok;
    if (nf >= 2 && strcmp(f[0], "PROXY") == 0 && strcmp(f[1], "UNKNOWN") == 0) {
        out->local = 1;
        return (int)(n + 2);
    }
    if (nf != 6 || strcmp(f[0], "PROXY") != 0) {
        *why = "malformed PROXY v1 line";
        return -EINVAL;
    }
    unsigned char bin[16];
    int family = strcmp(f[1], "TCP4") == 0 ? AF_INET : strcmp(f[1], "TCP6") == 0 ? AF_INET6 : 0;
    int dport;
    if (!family || inet_pton(family, f[2], bin) != 1 || inet_pton(family, f[3], bin) != 1
        || parse_port(f[4], &out->port) < 0 || parse_port(f[5], &dport) < 0) {
        *why = "malformed PROXY v1 line";
        return -EINVAL;
    }
    inet_pton(family, f[2], bin);
    /* canonical text, so the address compares like one taken from a socket;
     * IPv4-mapped IPv6 becomes IPv4 as in v2 and for a socket's own address
     * (else DNS lists would look up an IPv6 name and limits count it apart) */
    if (family == AF_INET6 && IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)bin))
        inet_ntop(AF_INET, bin + 12, out->addr, sizeof(out->addr));
    else
        inet_ntop(family, bin, out->addr, sizeof(out->addr));
    out->local = 0;
    return (int)(n + 2);
}

static int parse_v2(const unsigned char *buf, size_t len, struct kt_proxy_header *out, const char **why)
{
    if (len < 16)
        return 0;
    size_t body = (size_t)buf[14] << 8 | buf[15];
    if (16 + body > KT_PROXY_MAX_HEADER) {
        *why = "PROXY v2 header too long";
        return -EINVAL;
    }
    if ((buf[12] & 0xF0) != 0x20 || (buf[12] & 0x0F) > 1) {
        *why = "unsupported PROXY v2 version or command";
        return -EINVAL;
    }
    if (len < 16 + body)
        return 0;
    if ((buf[12] & 0x0F) == 0) {
        /* LOCAL: the proxy speaks for itself (health checks) */
        out->local = 1;
        return (int)(16 + body);
    }
    const unsigned char *a = buf + 16;
    switch (buf[13]) {
    case 0x11:   /* TCP over IPv4 */
        if (body < 12)
            break;
        inet_ntop(AF_INET, a, out->addr, sizeof(out->addr));
        out->port = a[8] << 8 | a[9];
        out->local = 0;
        return (int)(16 + body);
    case 0x21:   /* TCP over IPv6 */
        if (body < 36)
            break;
        if (IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)a))
            inet_ntop(AF_INET, a + 12, out->addr, sizeof(out->addr));
        else
            inet_ntop(AF_INET6, a, out->addr, sizeof(out->addr));
        out->port = a[32] << 8 | a[33];
        out->local = 0;
        return (int)(16 + body);
    default:
        *why = "unsupported PROXY v2 address family";
        return -EINVAL;
    }
    *why = "PROXY v2 address block too short";
    return -EINVAL;
}

int kt_proxy_parse(const unsigned char *buf, size_t len, struct kt_proxy_header *out, const char **why)
{
    size_t cmp = len < sizeof(v2_sig) ? len : sizeof(v2_sig);
    if (len == 0)
        return 0;
    if (memcmp(buf, v2_sig, cmp) == 0)
        return cmp < sizeof(v2_sig) ? 0 : parse_v2(buf, len, out, why);
    static const char v1[] = "PROXY ";
    cmp = len < sizeof(v1) - 1 ? len : sizeof(v1) - 1;
    if (memcmp(buf, v1, cmp) == 0)
        return cmp < sizeof(v1) - 1 ? 0 : parse_v1(buf, len, out, why);
    *why = "no PROXY protocol header";
    return -EINVAL;
}

int kt_proxy_read(int fd, unsigned char *buf, size_t *have, struct kt_proxy_header *out, const char **why)
{
    ssize_t n = recv(fd, buf + *have, KT_PROXY_MAX_HEADER - *have, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (n <= 0) {
        *why = n == 0 ? "connection closed before the PROXY header" : "read error before the PROXY header";
        return -EIO;
    }
    int rc = kt_proxy_parse(buf, *have + (size_t)n, out, why);
    if (rc < 0)
        return rc;
    /* take out of the socket exactly what belongs to the header */
    size_t take = rc == 0 ? (size_t)n : (size_t)rc - *have;
    unsigned char sink[KT_PROXY_MAX_HEADER];
    ssize_t got = recv(fd, sink, take, MSG_DONTWAIT);
    if (got != (ssize_t)take) {
        *why = "read error in the PROXY header";
        return -EIO;
    }
    *have += take;
    return rc;
}
