/* Sendmail macros of an SMTP session for its milters (milter_*_macros), with
 * the values Postfix's smtpd_milter_eval gives them. A macro without a value
 * here and now (no TLS, no AUTH, outside a transaction) is not sent. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "conf/settings.h"
#include "smtpd/session.h"
#include "tls/conn.h"

static const char *tls_cipher_bits(const struct kt_session *s, char *buf, size_t len)
{
    SSL *ssl = s->tls_on ? kt_conn_ssl(s->conn) : NULL;
    if (!ssl)
        return NULL;
    int alg = 0;
    int bits = SSL_CIPHER_get_bits(SSL_get_current_cipher(ssl), &alg);
    snprintf(buf, len, "%d", bits);
    return buf;
}

static const char *cert_name(const struct kt_session *s, int issuer, char *buf, size_t len)
{
    SSL *ssl = s->tls_on && s->ccert == KT_CCERT_TRUSTED ? kt_conn_ssl(s->conn) : NULL;
    if (!ssl)
        return NULL;
    X509 *peer = SSL_get1_peer_certificate(ssl);
    if (!peer)
        return NULL;
    X509_NAME *n = issuer ? X509_get_issuer_name(peer) : X509_get_subject_name(peer);
    int got = X509_NAME_get_text_by_NID(n, NID_commonName, buf, (int)len);
    X509_free(peer);
    return got > 0 ? buf : NULL;
}

static const char *daemon_addr(const struct kt_session *s, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = s->conn ? kt_conn_fd(s->conn) : -1;
    if (fd < 0 || getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return NULL;
    const void *a = ss.ss_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr
                                             : (const void *)&((struct sockaddr_in *)&ss)->sin_addr;
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)
        return NULL;
    return inet_ntop(ss.ss_family, a, buf, (socklen_t)len);
}

/* The domain of an address, "" without one. */
static const char *domain_of(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at ? at + 1 : "";
}

const char *kt_session_milter_macro(void *arg, const char *name, char *buf, size_t len)
{
    struct kt_session *s = arg;
    const struct kt_smtpd_txn *t = s->txn;
    const char *cname = s->client_name ? s->client_name : "unknown";
    const char *rname = s->reverse_name ? s->reverse_name : "unknown";

    if (!strcmp(name, "{daemon_name}"))
        return s->cfg->milter_daemon_name;
    if (!strcmp(name, "v"))
        return s->cfg->milter_macro_v;
    if (!strcmp(name, "j"))
        return s->cfg->myhostname;
    if (!strcmp(name, "_")) {
        snprintf(buf, len, "%s [%s]%s", rname, s->addr, strcasecmp(cname, rname) ? " (may be forged)" : "");
        return buf;
    }
    if (!strcmp(name, "{client_addr}"))
        return s->addr;
    if (!strcmp(name, "{client_port}")) {
        snprintf(buf, len, "%d", s->port);
        return buf;
    }
    if (!strcmp(name, "{client_name}"))
        return cname;
    if (!strcmp(name, "{client_ptr}"))
        return rname;
    if (!strcmp(name, "{daemon_addr}"))
        return daemon_addr(s, buf, len);
    if (!strcmp(name, "{tls_version}"))
        return s->tls_on && kt_conn_ssl(s->conn) ? SSL_get_version(kt_conn_ssl(s->conn)) : NULL;
    if (!strcmp(name, "{cipher}"))
        return s->tls_on && kt_conn_ssl(s->conn) ? SSL_get_cipher_name(kt_conn_ssl(s->conn)) : NULL;
    if (!strcmp(name, "{cipher_bits}"))
        return tls_cipher_bits(s, buf, len);
    if (!strcmp(name, "{cert_subject}"))
        return cert_name(s, 0, buf, len);
    if (!strcmp(name, "{cert_issuer}"))
        return cert_name(s, 1, buf, len);
    if (!strcmp(name, "{auth_type}"))
        return s->sasl_username[0] ? s->sasl_method : NULL;
    if (!strcmp(name, "{auth_authen}"))
        return s->sasl_username[0] ? s->sasl_username : NULL;
    if (!t)
        return NULL;
    if (!strcmp(name, "i"))
        return t->queue_id;
    if (!strcmp(name, "{mail_addr}"))
        return t->sender_full;
    if (!strcmp(name, "{mail_host}"))
        return t->sender_full[0] ? domain_of(t->sender_full) : NULL;
    if (!strcmp(name, "{rcpt_addr}"))
        return s->mstate->rcpt[0] ? s->mstate->rcpt : NULL;
    if (!strcmp(name, "{rcpt_host}"))
        return s->mstate->rcpt[0] ? domain_of(s->mstate->rcpt) : NULL;
    return NULL;
}
