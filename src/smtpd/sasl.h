/* SASL for the SMTP server (RFC 4954): PLAIN and LOGIN message handling, the
 * two password backends (a built-in crypt(3) password file and Dovecot's
 * auth protocol on its unix socket) and the small thread pool that runs the
 * checks away from the event loops. */
#ifndef KTRELAY_SASL_H
#define KTRELAY_SASL_H

#include <stddef.h>
#include <sys/types.h>

#include "core/loop.h"

/* Mechanism bits. */
enum { KT_MECH_PLAIN = 1, KT_MECH_LOGIN = 2, KT_MECH_ALL = 3 };

/* smtpd_sasl_security_options / smtpd_sasl_tls_security_options -> the mechanisms they leave (PLAIN and
 * LOGIN are plaintext, dictionary-prone, non-mutual mechanisms: any option but noanonymous removes them).
 * Returns 0, or -EINVAL for an unknown option with a message in err. */
int kt_sasl_security_mechs(const char *options, unsigned *mechs, char *err, size_t errlen);
/* "PLAIN" / "LOGIN" (case-insensitive) -> bit, 0 if unknown. */
unsigned kt_sasl_mech_from_name(const char *name, size_t len);

/* RFC 4648 base64. encode writes 4*ceil(len/3) characters and a NUL. decode accepts only canonical input
 * (padding required, no white space) and returns the decoded length or -EINVAL; out needs len*3/4 bytes. */
void kt_base64_encode(const void *in, size_t len, char *out);
ssize_t kt_base64_decode(const char *in, size_t len, void *out, size_t outlen);

/* RFC 4616 message "authzid NUL authcid NUL passwd" (msg[len] must be writable and is set to NUL).
 * Returns 0 with pointers into msg, or -EINVAL when malformed or authcid/passwd is empty. */
int kt_sasl_plain_split(char *msg, size_t len, const char **authzid, const char **authcid, const char **passwd);

/* A backend, immutable after opening and shared by all workers.
 * type: "dovecot" (path: Dovecot auth socket) or "cyrus"/"ktrelay" (path: password file with
 * "user:crypt-hash[:...]" lines; a "{SHA512-CRYPT}"-style scheme prefix is accepted).
 * Returns 0 or a negative errno with a message in err. */
struct kt_sasl_server;
int kt_sasl_server_open(const char *type, const char *path, struct kt_sasl_server **out, char *err, size_t errlen);
void kt_sasl_server_free(struct kt_sasl_server *srv);

enum kt_auth_result { KT_AUTH_OK = 1, KT_AUTH_FAIL = 2, KT_AUTH_TEMP = 3 };

/* One password check. The caller fills the inputs, keeps the request alive until the completion and
 * frees it afterwards; the password is wiped once checked. */
struct kt_auth_req {
    struct kt_op op;                    /* completion: op.cb(&op, result, 0) on the submitting worker's ring */
    const struct kt_sasl_server *srv;
    int ring_fd;                        /* the io_uring that receives the completion */
    char user[256];
    char pass[256];
    char client_addr[64];
    int secured;                        /* the connection is TLS protected */
    /* outputs */
    char canon_user[256];               /* name the backend knows the user by */
    char reason[128];                   /* for the log on failure */
    struct kt_auth_req *next;           /* pool queue */
};

/* Runs the check in the calling thread (blocking); returns a kt_auth_result. */
int kt_sasl_check(struct kt_auth_req *req);
/* Queues the check on the pool; the result arrives through req->op on req->ring_fd with
 * IORING_OP_MSG_RING, so the event loop never blocks on crypt(3) or on Dovecot. Never fails. */
void kt_auth_submit(struct kt_auth_req *req);

/* Failures per client address in the last ten minutes, shared by all workers: record one failure and
 * return the count including it; a success forgets the address. */
unsigned kt_auth_fail_record(const char *client_addr);
void kt_auth_fail_forget(const char *client_addr);

#endif
