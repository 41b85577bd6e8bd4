/* SASL pieces that do not touch the event loop: base64, the PLAIN message,
 * security options, and the two password backends. kt_sasl_check blocks
 * (crypt(3) is slow on purpose, Dovecot may delay a failure), so only the
 * auth pool threads and the unit tests call it. Passwords are wiped after use
 * and compared in constant time; an unknown user costs one crypt(3) too, so
 * timing does not tell which users exist. */
#include <crypt.h>
#include <ctype.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "smtpd/sasl.h"

#define DOVECOT_TIMEOUT_MS 15000

/* ---- mechanisms and options ---- */

unsigned kt_sasl_mech_from_name(const char *name, size_t len)
{
    if (len == 5 && strncasecmp(name, "PLAIN", 5) == 0)
        return KT_MECH_PLAIN;
    if (len == 5 && strncasecmp(name, "LOGIN", 5) == 0)
        return KT_MECH_LOGIN;
    return 0;
}

int kt_sasl_security_mechs(const char *options, unsigned *mechs, char *err, size_t errlen)
{
    static const char *const known[] = { "noanonymous", "noplaintext", "noactive", "nodictionary",
                                         "mutual_auth", "forward_secrecy" };
    char *copy = kt_strdup(options ? options : ""), *save = NULL;
    int rc = 0;

    *mechs = KT_MECH_ALL;
    for (char *tok = strtok_r(copy, ", \t\r\n", &save); tok; tok = strtok_r(NULL, ", \t\r\n", &save)) {
        size_t i;
        for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
            if (strcasecmp(tok, known[i]) == 0)
                break;
        if (i == sizeof(known) / sizeof(known[0])) {
            snprintf(err, errlen, "unknown SASL security option \"%s\"", tok);
            rc = -EINVAL;
            break;
        }
        if (i > 0)
            *mechs = 0;   /* PLAIN and LOGIN send the password itself */
    }
    kt_free(copy);
    return rc;
}

/* ---- base64 ---- */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void kt_base64_encode(const void *in, size_t len, char *out)
{
    const unsigned char *p = in;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        unsigned v = (unsigned)p[i] << 16;
        if (i + 1 < len)
            v |= (unsigned)p[i + 1] << 8;
        if (i + 2 < len)
            v |= p[i + 2];
        out[o++] = b64[(v >> 18) & 63];
        out[o++] = b64[(v >> 12) & 63];
        out[o++] = i + 1 < len ? b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? b64[v & 63] : '=';
    }
    out[o] = '\0';
}

static int b64_val(char c)
{
    const char *p = c ? strchr(b64, c) : NULL;
    return p ? (int)(p - b64) : -1;
}

ssize_t kt_base64_decode(const char *in, size_t len, void *out, size_t outlen)
{
    unsigned char *o = out;
    size_t n = 0;

    if (len % 4)
        return -EINVAL;
    for (size_t i = 0; i < len; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            if (in[i + k] == '=' && i + 4 == len && k >= 2) {
                v[k] = 0;
                pad++;
                continue;
            }
            if (pad || (v[k] = b64_val(in[i + k])) < 0)
                return -EINVAL;
        }
        unsigned x = (unsigned)v[0] << 18 | (unsigned)v[1] << 12 | (unsigned)v[2] << 6 | (unsigned)v[3];
        size_t take = 3 - (size_t)pad;
        if (n + take > outlen)
            return -EINVAL;
        /* non-canonical: bits hidden under the padding must be zero */
        if ((pad == 1 && (x & 0xff)) || (pad == 2 && (x & 0xffff)))
            return -EINVAL;
        o[n++] = (unsigned char)(x >> 16);
        if (take > 1)
            o[n++] = (unsigned char)(x >> 8);
        if (take > 2)
            o[n++] = (unsigned char)x;
    }
    return (ssize_t)n;
}

int kt_sasl_plain_split(char *msg, size_t len, const char **authzid, const char **authcid, const char **passwd)
{
    char *nul1 = memchr(msg, '\0', len);
    char *nul2 = nul1 ? memchr(nul1 + 1, '\0', len - (size_t)(nul1 + 1 - msg)) : NULL;
    msg[len] = '\0';
    if (!nul1 || !nul2 || memchr(nul2 + 1, '\0', len - (size_t)(nul2 + 1 - msg)))
        return -EINVAL;
    if (nul2 == nul1 + 1 || nul2 + 1 == msg + len)
        return -EINVAL;
    *authzid = msg;
    *authcid = nul1 + 1;
    *passwd = nul2 + 1;
    return 0;
}

/* ---- backends ---- */

struct pw_entry {
    char *user;
    char *hash;
};

struct kt_sasl_server {
    int dovecot;
    char *path;                  /* Dovecot socket or password file */
    struct pw_entry *pw;         /* sorted by user */
    size_t n_pw;
};

static int pw_cmp(const void *a, const void *b)
{
    return strcmp(((const struct pw_entry *)a)->user, ((const struct pw_entry *)b)->user);
}

/* "{SHA512-CRYPT}$6$..." (Dovecot's passwd-file) is a crypt(3) hash with a label. */
static const char *strip_scheme(const char *hash)
{
    if (hash[0] != '{')
        return hash;
    const char *end = strchr(hash, '}');
    if (!end)
        return hash;
    size_t n = (size_t)(end - hash - 1);
    if ((n >= 5 && strncasecmp(end - 5, "CRYPT", 5) == 0))
        return end + 1;
    return hash;
}

static int load_passwords(struct kt_sasl_server *srv, char *err, size_t errlen)
{
    FILE *f = fopen(srv->path, "re");
    char *line = NULL;
    size_t cap = 0, lineno = 0, alloc = 0;

    if (!f) {
        int e = errno;
        snprintf(err, errlen, "SASL password file %s: %s", srv->path, strerror(e));
        return -e;
    }
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        line[strcspn(line, "\r\n")] = '\0';
        char *p = line;
        while (isspace((unsigned char)*p))
            p++;
        if (!*p || *p == '#')
            continue;
        char *colon = strchr(p, ':');
        if (!colon || colon == p) {
            kt_warn("%s, line %zu: expected \"user:hash\"; line ignored", srv->path, lineno);
            continue;
        }
        *colon = '\0';
        char *hash = colon + 1;
        hash[strcspn(hash, ":")] = '\0';
        hash = (char *)strip_scheme(hash);
        if (hash[0] != '$') {
            kt_warn("%s, line %zu: password of %s is not a crypt(3) hash; user cannot log in", srv->path, lineno, p);
            hash = "*";
        }
        if (srv->n_pw == alloc) {
            alloc = alloc ? alloc * 2 : 16;
            srv->pw = kt_realloc(srv->pw, alloc * sizeof(*srv->pw));
        }
        srv->pw[srv->n_pw].user = kt_strdup(p);
        srv->pw[srv->n_pw].hash = kt_strdup(hash);
        srv->n_pw++;
    }
    free(line);
    fclose(f);
    if (srv->n_pw)
        qsort(srv->pw, srv->n_pw, sizeof(*srv->pw), pw_cmp);
    return 0;
}

int kt_sasl_server_open(const char *type, const char *path, struct kt_sasl_server **out, char *err, size_t errlen)
{
    struct kt_sasl_server *srv;
    int dovecot = strcasecmp(type, "dovecot") == 0;

    *out = NULL;
    if (!dovecot && strcasecmp(type, "cyrus") != 0 && strcasecmp(type, "ktrelay") != 0) {
        snprintf(err, errlen, "unsupported smtpd_sasl_type \"%s\" (use dovecot, or cyrus for the built-in password file)",
                 type);
        return -EINVAL;
    }
    if (!path || !path[0]) {
        snprintf(err, errlen, dovecot ? "smtpd_sasl_path is empty"
                                      : "SASL is enabled but ktrelay_sasl_password_file is empty");
        return -EINVAL;
    }
    if (dovecot && strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        snprintf(err, errlen, "Dovecot auth socket path too long: %s", path);
        return -EINVAL;
    }
    srv = kt_calloc(1, sizeof(*srv));
    srv->dovecot = dovecot;
    srv->path = kt_strdup(path);
    if (!dovecot) {
        int rc = load_passwords(srv, err, errlen);
        if (rc < 0) {
            kt_sasl_server_free(srv);
            return rc;
        }
    }
    *out = srv;
    return 0;
}

void kt_sasl_server_free(struct kt_sasl_server *srv)
{
    if (!srv)
        return;
    for (size_t i = 0; i < srv->n_pw; i++) {
        kt_free(srv->pw[i].user);
        kt_free(srv->pw[i].hash);
    }
    kt_free(srv->pw);
    kt_free(srv->path);
    kt_free(srv);
}

/* ---- checks ---- */

/* A valid SHA-512-crypt hash of nothing anybody knows, checked for unknown users. */
#define DUMMY_HASH "$6$ktrelaydummy$/V1EAjt3H3MQKEZp0y8pXXpMvcblNZzFCvYVkajSv4qQb5wVWQsNq5PjyccyBwo4AK11LregSsleQeBfCjjkB1"

static int check_password_file(struct kt_auth_req *req)
{
    struct pw_entry key = { .user = req->user }, *e;
    struct crypt_data *cd = kt_calloc(1, sizeof(*cd));
    int ok = 0;

    e = req->srv->n_pw ? bsearch(&key, req->srv->pw, req->srv->n_pw, sizeof(*e), pw_cmp) : NULL;
    /* an unknown user is checked against a real entry's hash: same algorithm, same cost */
    const char *hash = e ? e->hash : req->srv->n_pw ? req->srv->pw[0].hash : DUMMY_HASH;
    if (hash[0] != '$')
        hash = DUMMY_HASH;
    /* crypt_rn, not crypt_r: sanitizer runtimes define crypt_r themselves, and a link that takes it
     * from there drops libcrypt, leaving the interceptor nothing to call */
    const char *h = crypt_rn(req->pass, hash, cd, (int)sizeof(*cd));
    if (e && hash == e->hash && h && h[0] != '*' && strlen(h) == strlen(hash))
        ok = CRYPTO_memcmp(h, hash, strlen(hash)) == 0;
    OPENSSL_cleanse(cd, sizeof(*cd));
    kt_free(cd);
    if (ok) {
        snprintf(req->canon_user, sizeof(req->canon_user), "%s", req->user);
        return KT_AUTH_OK;
    }
    snprintf(req->reason, sizeof(req->reason), "authentication failure");
    return KT_AUTH_FAIL;
}

/* Dovecot auth client: one connection per check; the handshake is cheap and
 * nothing is held between checks. */
struct dc_conn {
    int fd;
    char buf[8192];
    size_t len;
};

static int dc_write(struct dc_conn *c, const char *s, size_t n)
{
    while (n) {
        ssize_t w = send(c->fd, s, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Next line without its LF (NUL-terminated in place), consumed on the following call. */
static char *dc_line(struct dc_conn *c, size_t *consumed)
{
    if (*consumed) {
        memmove(c->buf, c->buf + *consumed, c->len - *consumed);
        c->len -= *consumed;
        *consumed = 0;
    }
    for (;;) {
        char *lf = memchr(c->buf, '\n', c->len);
        if (lf) {
            *lf = '\0';
            *consumed = (size_t)(lf - c->buf) + 1;
            return c->buf;
        }
        if (c->len == sizeof(c->buf))
            return NULL;
        struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
        if (poll(&pfd, 1, DOVECOT_TIMEOUT_MS) <= 0)
            return NULL;
        ssize_t r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return NULL;
        c->len += (size_t)r;
    }
}

/* Value of "name=value" among the tab-separated fields after the first two. */
static void dc_param(const char *line, const char *name, char *out, size_t outlen)
{
    size_t n = strlen(name);
    out[0] = '\0';
    for (const char *p = strchr(line, '\t'); p; p = strchr(p + 1, '\t')) {
        if (strncmp(p + 1, name, n) == 0 && (p[1 + n] == '=' || p[1 + n] == '\t' || p[1 + n] == '\0')) {
            const char *v = p[1 + n] == '=' ? p + 2 + n : p + 1 + n;
            snprintf(out, outlen, "%.*s", (int)strcspn(v, "\t"), v);
            return;
        }
    }
}

static int check_dovecot(struct kt_auth_req *req)
{
    struct dc_conn *c = kt_calloc(1, sizeof(*c));
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    size_t used = 0;
    int result = KT_AUTH_TEMP, have_plain = 0;
    char *msg = NULL, *b64msg = NULL, *cmd = NULL;

    snprintf(req->reason, sizeof(req->reason), "Dovecot auth server unavailable");
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", req->srv->path);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        kt_warn("SASL: cannot connect to Dovecot auth socket %s: %s", req->srv->path, strerror(errno));
        goto out;
    }
    char hello[64];
    int n = snprintf(hello, sizeof(hello), "VERSION\t1\t2\nCPID\t%d\n", (int)getpid());
    if (dc_write(c, hello, (size_t)n) < 0)
        goto out;
    for (;;) {
        char *line = dc_line(c, &used);
        if (!line)
            goto out;
        if (strncmp(line, "VERSION\t", 8) == 0 && atoi(line + 8) != 1) {
            kt_warn("SASL: Dovecot auth protocol version %s not supported", line + 8);
            goto out;
        }
        if (strncmp(line, "MECH\tPLAIN", 10) == 0 && (line[10] == '\t' || line[10] == '\0'))
            have_plain = 1;
        if (strcmp(line, "DONE") == 0)
            break;
    }
    if (!have_plain) {
        kt_warn("SASL: Dovecot does not offer the PLAIN mechanism (auth_mechanisms)");
        goto out;
    }
    /* Both SMTP mechanisms reach Dovecot as PLAIN: the client's password is all we have anyway. */
    size_t ulen = strlen(req->user), plen = strlen(req->pass);
    size_t mlen = 1 + ulen + 1 + plen;
    msg = kt_malloc(mlen);
    msg[0] = '\0';
    memcpy(msg + 1, req->user, ulen + 1);
    memcpy(msg + 2 + ulen, req->pass, plen);
    b64msg = kt_malloc(4 * ((mlen + 2) / 3) + 1);
    kt_base64_encode(msg, mlen, b64msg);
    cmd = kt_asprintf("AUTH\t1\tPLAIN\tservice=smtp\tnologin\trip=%s%s\tresp=%s\n", req->client_addr,
                      req->secured ? "\tsecured" : "", b64msg);
    if (dc_write(c, cmd, strlen(cmd)) < 0)
        goto out;
    char *line = dc_line(c, &used);
    if (!line)
        goto out;
    if (strncmp(line, "OK\t1", 4) == 0 && (line[4] == '\t' || line[4] == '\0')) {
        dc_param(line, "user", req->canon_user, sizeof(req->canon_user));
        if (!req->canon_user[0])
            snprintf(req->canon_user, sizeof(req->canon_user), "%s", req->user);
        req->reason[0] = '\0';
        result = KT_AUTH_OK;
    } else if (strncmp(line, "FAIL\t1", 6) == 0 && (line[6] == '\t' || line[6] == '\0')) {
        dc_param(line, "reason", req->reason, sizeof(req->reason));
        if (!req->reason[0])
            snprintf(req->reason, sizeof(req->reason), "authentication failure");
        result = strstr(line, "\ttemp") ? KT_AUTH_TEMP : KT_AUTH_FAIL;
    } else {
        kt_warn("SASL: unexpected reply from Dovecot: %.40s", line);
    }
out:
    if (msg)
        OPENSSL_cleanse(msg, 1 + strlen(req->user) + 1 + strlen(req->pass));
    if (b64msg)
        OPENSSL_cleanse(b64msg, strlen(b64msg));
    if (cmd)
        OPENSSL_cleanse(cmd, strlen(cmd));
    kt_free(msg);
    kt_free(b64msg);
    kt_free(cmd);
    if (c->fd >= 0)
        close(c->fd);
    OPENSSL_cleanse(c->buf, sizeof(c->buf));
    kt_free(c);
    return result;
}

int kt_sasl_check(struct kt_auth_req *req)
{
    req->canon_user[0] = '\0';
    req->reason[0] = '\0';
    int rc = req->srv->dovecot ? check_dovecot(req) : check_password_file(req);
    OPENSSL_cleanse(req->pass, sizeof(req->pass));
    return rc;
}
