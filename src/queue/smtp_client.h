/* Outbound SMTP client on an io_uring loop: one connection delivers any
 * number of messages (transactions) in turn. It connects (trying each
 * address), reads the greeting, sends EHLO (HELO if refused), STARTTLS as
 * the security level demands, and then runs transactions with PIPELINING
 * and CHUNKING when the server offers them. With credentials it
 * authenticates (AUTH PLAIN or LOGIN, RFC 4954) after EHLO, once TLS is up,
 * and only with a mechanism that the security options allow for the
 * connection as it is (Postfix smtp(8): smtp_sasl_security_options before
 * TLS, smtp_sasl_tls_security_options after). A failed STARTTLS handshake at
 * level may is retried once on a new connection without TLS, as Postfix
 * does. With loop detection (Postfix: port 25) an EHLO reply that names
 * this host is a mail loop (5.4.6). In LMTP mode (RFC 2033, as Postfix's
 * lmtp(8)) it greets with LHLO, never falls back to HELO, sends bodies with
 * DATA, and reads one reply per accepted recipient after the end of data,
 * each the outcome of its own recipient; the server may be a unix-domain
 * socket (AF_UNIX address) as well as TCP. Bodies move from the queue file
 * to the socket with sendfile(2) on plaintext and on kernel TLS (TX) and
 * through SSL_write otherwise. All socket and TLS I/O goes through the
 * connection layer (tls/conn.h) that the SMTP server sessions use too. */
#ifndef KTRELAY_SMTP_CLIENT_H
#define KTRELAY_SMTP_CLIENT_H

#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "core/loop.h"
#include "queue/tls_policy.h"

/* SASL mechanisms the client speaks (bits of kt_smtp_params.sasl_mechs). */
enum { KT_SMTP_MECH_PLAIN = 1, KT_SMTP_MECH_LOGIN = 2 };

/* "none" ... "dane-only" (case-insensitive; "" = none). -1 for anything else (kt_tls_level_parse). */
int kt_smtp_tls_level_parse(const char *s);

struct kt_dane_set;

/* The TLS side is the effective policy of the next hop (queue/tls_policy.h). */
struct kt_smtp_params {
    const char *helo_name;
    enum kt_smtp_tls tls_level;
    SSL_CTX *ssl_ctx;             /* required unless the level is none */
    const char *sni;              /* server name indication, NULL = none; "hostname": the host connected to */
    const char *nexthop_domain;   /* next-hop domain: "nexthop" and "dot-nexthop" in match, DANE, SNI */
    const char *match;            /* verify/secure names (':'), fingerprint digests ('|'); see tls_policy.h */
    const char *fingerprint_digest;   /* smtp_tls_fingerprint_digest */
    int min_version, max_version; /* protocol bounds for this policy (0 = none) */
    long no_mask;                 /* SSL_OP_NO_* inside the bounds */
    const char *cipherlist;       /* OpenSSL cipher list for this policy; NULL = the context's */
    /* dane and dane-only: per host TLSA records and DNSSEC state (queue/dane.h); NULL otherwise */
    const struct kt_dane_set *dane;
    int verify_mx_name;           /* MTA-STS (RFC 8461 4.1, 4.2): SNI and the certificate name are each
                                   * address's MX host name (instead of sni and match); at levels below
                                   * verify the result is only recorded (kt_smtp_tls_report) */
    int tls_loglevel;
    long long connect_timeout_s;  /* 0 = no limit but the kernel's */
    long long command_timeout_s;  /* each reply */
    long long data_done_timeout_s;  /* the reply (LMTP: every reply) to the end of data; 0 = command_timeout_s */
    int lmtp;                     /* LMTP (RFC 2033) instead of SMTP */
    /* AUTH (RFC 4954): sasl_username NULL = never; both strings are copied and wiped at the end */
    const char *sasl_username, *sasl_password;
    unsigned sasl_mechs;          /* KT_SMTP_MECH_* allowed without TLS */
    unsigned sasl_tls_mechs;      /* allowed once TLS is active */
    int sasl_soft_bounce;         /* smtp_sasl_auth_soft_bounce: a 5xx AUTH reply fails as 4xx */
    /* loop detection (Postfix: only for port 25): NULL = off; an EHLO reply whose first word is
     * myhostname fails the connection "mail for NEXTHOP loops back to myself" (both copied) */
    const char *loop_myhostname, *nexthop;
    /* disable_mime_output_conversion = no: a message not declared BODY=7BIT goes to a server that does
     * not announce 8BITMIME with its 8-bit parts converted to 7BIT (mime_downgrade.h), without BODY= */
    int mime_output_conversion;
    /* smtp_bind_address(6): the source address of a connection of that family (port 0), NULL = the
     * kernel's choice */
    const struct sockaddr *bind_addr4, *bind_addr6;
    socklen_t bind_len4, bind_len6;
    int bind_enforce;             /* smtp_bind_address_enforce: else a failed bind is a warning and the
                                   * connection goes out unbound, as Postfix's default */
};

struct kt_smtp_addr {
    struct sockaddr_storage ss;
    socklen_t len;
    char host[256];               /* name shown in logs: "mx.example.com" or the address; for AF_UNIX
                                   * the whole relay= text, Postfix's "myhostname[private/dovecot-lmtp]" */
    unsigned pref;                /* MX preference (0 without MX); the list is in ascending order */
    int dnssec;                   /* its address answers were DNSSEC-validated (AD) */
    int mx_dnssec;                /* and the MX answer that named it was too (1 without an MX lookup) */
};

/* One transaction. The client fills codes[] (SMTP reply code per recipient;
 * 0 = no reply for it; in LMTP mode an accepted recipient's code is its reply
 * to the end of data) and replies[] (kt_malloc'ed "host H[A] said: ..." text,
 * or the reply for a success) which the caller frees. */
struct kt_smtp_msg {
    const char *id;               /* for log lines */
    const char *sender;
    const char *const *rcpts;
    size_t n_rcpts;
    int fd;                       /* queue file */
    off_t body_off, body_len;
    int dots;                     /* -1 unknown, 0 no line starts with '.', 1 some do */
    int canonical;                /* body holds only CRLF line ends (else it is canonicalized on the way) */
    /* properties sent on when the server offers the extension (queue.h): SMTPUTF8 (RFC 6531), BODY=
     * (RFC 6152; BINARYMIME only with CHUNKING, RFC 3030), RET= and ENVID= (RFC 3461) on MAIL; NOTIFY= and
     * ORCPT= on each RCPT (notify/orcpt: one entry per recipient, or NULL). Without ORCPT the client sends
     * ORCPT=rfc822;ADDRESS for an ASCII address, as Postfix does. */
    int smtputf8;
    int body;                     /* enum kt_qbody */
    int ret;                      /* enum kt_qret */
    const char *envid;            /* xtext or NULL */
    const unsigned *notify;       /* KT_QNOTIFY_* bits */
    const char *const *orcpt;     /* "addr-type;xtext" or NULL */
    int *codes;
    char **replies;
    size_t final_upto;            /* LMTP: codes[i] for i < final_upto are final even if the connection
                                   * then broke (each recipient's own end-of-data reply) */
};

/* res: 0 on success; otherwise a negative errno or an SMTP code (4xx/5xx) of a
 * session-level refusal, with reason (valid during the call) for the log. */
typedef void (*kt_smtp_cb)(void *arg, int res, const char *reason);

struct kt_smtp_conn;

/* Connect to addrs[0], then the next ones on failure. p and addrs are copied (its strings and dane
 * too; helo_name and ssl_ctx must outlive the connection). cb once: ready for a
 * transaction (res 0) or failed; after a failure the caller must kt_smtp_close. */
struct kt_smtp_conn *kt_smtp_connect(struct kt_loop *loop, const struct kt_smtp_params *p,
                                     const struct kt_smtp_addr *addrs, size_t n, kt_smtp_cb cb, void *arg);
/* Run one transaction on a ready connection; cb once when it ended. res < 0 or
 * an SMTP code means the connection broke (codes[] tell what was final). */
void kt_smtp_send(struct kt_smtp_conn *c, struct kt_smtp_msg *m, kt_smtp_cb cb, void *arg);
/* QUIT if the connection is healthy and idle, then close and free once no
 * I/O is in flight. No callback fires after this. NULL is fine. */
void kt_smtp_close(struct kt_smtp_conn *c);
/* Fail the connection when its current step's deadline has passed. */
void kt_smtp_check_timeout(struct kt_smtp_conn *c, time_t now);
/* Extensions the server announced in its last EHLO reply (0 after HELO). */
enum { KT_SMTP_EXT_8BITMIME = 1, KT_SMTP_EXT_SMTPUTF8 = 2, KT_SMTP_EXT_DSN = 4, KT_SMTP_EXT_BINARYMIME = 8 };
unsigned kt_smtp_extensions(const struct kt_smtp_conn *c);
/* 1 when another transaction may run on it. */
int kt_smtp_usable(const struct kt_smtp_conn *c);
/* The enhanced status code ("4.7.0", "5.4.6") of the client's own last session failure when no
 * server reply carries one, else NULL. */
const char *kt_smtp_dsn(const struct kt_smtp_conn *c);
/* "host[addr]:port" of the connected server ("none" before connecting). */
const char *kt_smtp_relay(const struct kt_smtp_conn *c);
/* 1 when the connection used TLS, 2 when its transmit side is kernel TLS. */
int kt_smtp_tls_state(const struct kt_smtp_conn *c);
/* The TLS outcome of the last server tried, for TLS reporting (RFC 8460): 0 when no server got as
 * far as EHLO; else 1 with *result NULL (TLS established, and with verify_mx_name the certificate
 * verified against the MX name) or an RFC 8460 result type ("starttls-not-supported",
 * "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
 * "validation-failure"), *mx the MX host name, *ip its address and *local_ip ours (each NULL when
 * unknown; valid while c lives). */
int kt_smtp_tls_report(const struct kt_smtp_conn *c, const char **result, const char **mx, const char **ip,
                       const char **local_ip);
/* Transactions whose body went out with sendfile (all time, this process). */
unsigned long kt_smtp_sendfile_count(void);
/* Connections not yet freed (this process). */
long kt_smtp_live(void);

#endif
