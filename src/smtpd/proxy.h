/* The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) in
 * front of an SMTP session, as Postfix's smtpd_upstream_proxy_protocol =
 * haproxy: the header names the real client, which then stands for the
 * client everywhere. The reader never consumes a byte past the header, so
 * what follows (a TLS ClientHello on a wrapper-mode port) stays in the
 * socket for the next reader. */
#ifndef KTRELAY_PROXY_H
#define KTRELAY_PROXY_H

#include <netinet/in.h>
#include <stddef.h>

/* Longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes plus
 * addresses and TLVs, which HAProxy keeps well below this. */
#define KT_PROXY_MAX_HEADER 1040

struct kt_proxy_header {
    int local;                          /* v2 LOCAL or v1 UNKNOWN: no client named (health checks) */
    char addr[INET6_ADDRSTRLEN];        /* source address, text */
    int port;                           /* source port */
};

/* Parses a header at the start of buf[0..len). Returns its length (> 0) with
 * *out filled, 0 when more bytes are needed, or -EINVAL with the reason in
 * *why (a static string) for anything else: a wrong signature, a malformed
 * v1 line, a v2 version or command not 2/LOCAL/PROXY, a family other than
 * TCP over IPv4 or IPv6 (for PROXY), addresses that do not fit, or a header
 * longer than KT_PROXY_MAX_HEADER. */
int kt_proxy_parse(const unsigned char *buf, size_t len, struct kt_proxy_header *out, const char **why);

/* Reads the header from the non-blocking socket fd, keeping the bytes seen
 * so far in buf (KT_PROXY_MAX_HEADER bytes, *have of them used); call when
 * the socket is readable. Returns like kt_proxy_parse; -EIO (with *why) when
 * the peer closed or the read failed; 0 also when nothing was there yet. */
int kt_proxy_read(int fd, unsigned char *buf, size_t *have, struct kt_proxy_header *out, const char **why);

#endif
