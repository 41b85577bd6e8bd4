/* Per-service typed settings built from the configuration: parameter values
 * are read (and expanded) once here, not on the session hot path. Resolvers
 * and TLS contexts are shared between services whose parameters are equal. */
#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <stdarg.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/alloc.h"
#include "queue/smtp_client.h"
#include "queue/smtp_sasl.h"
#include "queue/tls_policy.h"
#include "conf/config.h"
#include "tls/ktls.h"
#include "metrics/metrics.h"
#include "core/log.h"
#include "smtpd/cleanup.h"
#include "smtpd/policy.h"
#include "delivery/resolve.h"
#include "delivery/rewrite.h"
#include "milter/milter.h"
#include "smtpd/sasl.h"
#include "conf/settings.h"
#include "core/table.h"
#include "delivery/transport.h"
#include "tls/tls.h"

/* Owned objects, shared by services with equal keys. */
struct shared_obj {
    char *key;
    void *obj;
    int kind;       /* 0 resolver, 1 tls, 2 net list, 3 policy, 4 SASL backend, 5 checks, 6 rewriter, 7 milters */
};

struct runtime_private {
    struct kt_runtime pub;
    struct kt_transport *transport;   /* pub.qmgr.transport, every service's transport */
    SSL_CTX *smtp_ssl_ctx;            /* pub.qmgr.smtp.ssl_ctx */
    struct kt_maps *smtp_sasl_maps;   /* pub.qmgr.smtp.sasl_password_maps */
    struct sockaddr_storage *own_addrs;  /* pub.qmgr.own_addrs */
    struct kt_tls_policy_set *tls_policy;   /* pub.qmgr.smtp.tls_policy */
    struct shared_obj *objs;
    size_t n_objs;
};

static const char *get(const struct kt_config *cfg, const struct kt_service *svc, const char *name)
{
    const char *v = kt_config_get(cfg, svc, name);
    return v ? v : "";
}

/* An error found while building a component, reported at the main.cf or
 * master.cf line that set the parameter it concerns, as the loader reports
 * its own: "FILE:LINE: service NAME: message". PARAM NULL: the parameter the
 * message begins with ("smtpd_recipient_restrictions: ..."), if any. */
static void __attribute__((format(printf, 4, 5)))
param_err(const struct kt_config *cfg, const struct kt_service *svc, const char *param, const char *fmt, ...)
{
    char msg[4096], name[128];
    const char *file = NULL;
    int line = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!param) {
        size_t n = strspn(msg, "abcdefghijklmnopqrstuvwxyz0123456789_");
        if (n > 0 && n < sizeof(name) && (msg[n] == ':' || msg[n] == ' ')) {
            memcpy(name, msg, n);
            name[n] = '\0';
            if (kt_param_find(name))
                param = name;
        }
    }
    const char *svc_part = svc ? "service " : "", *svc_name = svc ? svc->name : "", *sep = svc ? ": " : "";
    if (param && kt_config_where(cfg, svc, param, &file, &line))
        kt_err("%s:%d: %s%s%s%s", file, line, svc_part, svc_name, sep, msg);
    else
        kt_err("%s%s%s%s", svc_part, svc_name, sep, msg);
}

static void *shared_find(struct runtime_private *rp, int kind, const char *key)
{
    for (size_t i = 0; i < rp->n_objs; i++)
        if (rp->objs[i].kind == kind && strcmp(rp->objs[i].key, key) == 0)
            return rp->objs[i].obj;
    return NULL;
}

static void shared_add(struct runtime_private *rp, int kind, const char *key, void *obj)
{
    rp->objs = kt_realloc(rp->objs, (rp->n_objs + 1) * sizeof(*rp->objs));
    rp->objs[rp->n_objs].key = kt_strdup(key);
    rp->objs[rp->n_objs].obj = obj;
    rp->objs[rp->n_objs].kind = kind;
    rp->n_objs++;
}

/* local_recipient_maps: ktrelay knows local recipients from the system users and alias_maps, Postfix's
 * default "proxy:unix:passwd.byname $alias_maps". That is the one value it can honour; an empty value
 * (Postfix: accept any local part) would let mail for unknown users in, and other tables are not
 * implemented, so both are refused at start. */
static int local_recipient_maps_ok(const struct kt_config *cfg, const struct kt_service *svc, int *errors)
{
    const char *v = get(cfg, svc, "local_recipient_maps"), *aliases = get(cfg, svc, "alias_maps");
    const char *p = v;
    char tok[512];

    while (*p) {
        size_t n;
        p += strspn(p, " \t,");
        n = strcspn(p, " \t,");
        if (!n)
            break;
        snprintf(tok, sizeof(tok), "%.*s", (int)n, p);
        p += n;
        if (!strcmp(tok, "proxy:unix:passwd.byname") || !strcmp(tok, "unix:passwd.byname"))
            continue;
        /* an alias_maps table, as $alias_maps expands */
        const char *a = strstr(aliases, tok);
        if (a && (a == aliases || strchr(" \t,", a[-1])) && strchr(" \t,", a[strlen(tok)]))
            continue;
        kt_err("service %s: local_recipient_maps: only the system users (unix:passwd.byname) and $alias_maps "
               "are supported, not \"%s\"", svc->name, tok);
        (*errors)++;
        return 0;
    }
    if (!strstr(v, "passwd.byname")) {
        kt_err("service %s: local_recipient_maps must list unix:passwd.byname (Postfix's default); an empty "
               "value would accept mail for any local part", svc->name);
        (*errors)++;
        return 0;
    }
    return 1;
}

static struct kt_resolver *service_resolver(struct runtime_private *rp, const struct kt_config *cfg,
                                            const struct kt_service *svc, int *errors)
{
    struct kt_resolve_config rc = {
        .myhostname = get(cfg, svc, "myhostname"),
        .mydestination = get(cfg, svc, "mydestination"),
        .relay_domains = get(cfg, svc, "relay_domains"),
        .virtual_mailbox_domains = get(cfg, svc, "virtual_mailbox_domains"),
        .virtual_mailbox_base = get(cfg, svc, "virtual_mailbox_base"),
        .virtual_mailbox_maps = get(cfg, svc, "virtual_mailbox_maps"),
        .virtual_uid_maps = get(cfg, svc, "virtual_uid_maps"),
        .virtual_gid_maps = get(cfg, svc, "virtual_gid_maps"),
        .alias_maps = get(cfg, svc, "alias_maps"),
        .home_mailbox = get(cfg, svc, "home_mailbox"),
        .inet_interfaces_addrs = NULL,
        .passwd_file = NULL,
        .mail_owner = get(cfg, NULL, "mail_owner"),
        .myorigin = get(cfg, svc, "myorigin"),
        .mydomain = get(cfg, svc, "mydomain"),
        .append_at_myorigin = kt_config_get_bool(cfg, svc, "append_at_myorigin") == 1,
        .append_dot_mydomain = kt_config_get_bool(cfg, svc, "append_dot_mydomain") == 1,
        .default_privs = get(cfg, svc, "default_privs"),
        .virtual_alias_domains = get(cfg, svc, "virtual_alias_domains"),
        .recipient_delimiter = get(cfg, svc, "recipient_delimiter"),
        .unknown_local_code = (int)kt_config_get_int(cfg, svc, "unknown_local_recipient_reject_code"),
    };
    if (rc.unknown_local_code < 400 || rc.unknown_local_code > 599) {
        param_err(cfg, svc, "unknown_local_recipient_reject_code",
                  "bad value %d for unknown_local_recipient_reject_code: expected a 4xx or 5xx reply code",
                  rc.unknown_local_code);
        (*errors)++;
        return NULL;
    }
    if (!local_recipient_maps_ok(cfg, svc, errors))
        return NULL;
    char *key = kt_asprintf("%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%d\1%d\1%s\1%s\1%s\1%d", rc.myhostname,
                            rc.mydestination, rc.relay_domains, rc.virtual_mailbox_domains,
                            rc.virtual_mailbox_base, rc.virtual_mailbox_maps, rc.virtual_uid_maps,
                            rc.virtual_gid_maps, rc.alias_maps, rc.home_mailbox, rc.myorigin, rc.mydomain,
                            rc.append_at_myorigin, rc.append_dot_mydomain, rc.default_privs,
                            rc.virtual_alias_domains, rc.recipient_delimiter, rc.unknown_local_code);
    struct kt_resolver *r = shared_find(rp, 0, key);
    if (!r) {
        char err[512];
        if (kt_resolver_new(&rc, &r, err, sizeof(err)) < 0) {
            param_err(cfg, svc, NULL, "%s", err);
            (*errors)++;
            r = NULL;
        } else {
            shared_add(rp, 0, key, r);
        }
    }
    kt_free(key);
    return r;
}

/* canonical_maps, sender_/recipient_canonical_maps, virtual_alias_maps and their classes and limits
 * (delivery/rewrite.h), shared by services with equal values and the same resolver. */
static struct kt_rewrite *service_rewrite(struct runtime_private *rp, const struct kt_config *cfg,
                                          const struct kt_service *svc, const struct kt_resolver *resolver,
                                          int *errors)
{
    struct kt_rewrite_config c = {
        .virtual_alias_maps = get(cfg, svc, "virtual_alias_maps"),
        .canonical_maps = get(cfg, svc, "canonical_maps"),
        .sender_canonical_maps = get(cfg, svc, "sender_canonical_maps"),
        .recipient_canonical_maps = get(cfg, svc, "recipient_canonical_maps"),
        .canonical_classes = get(cfg, svc, "canonical_classes"),
        .sender_canonical_classes = get(cfg, svc, "sender_canonical_classes"),
        .recipient_canonical_classes = get(cfg, svc, "recipient_canonical_classes"),
        .propagate_unmatched_extensions = get(cfg, svc, "propagate_unmatched_extensions"),
        .virtual_alias_expansion_limit = kt_config_get_int(cfg, svc, "virtual_alias_expansion_limit"),
        .virtual_alias_recursion_limit = kt_config_get_int(cfg, svc, "virtual_alias_recursion_limit"),
        .resolver = resolver,
    };
    static const char *const limits[] = { "virtual_alias_expansion_limit", "virtual_alias_recursion_limit" };
    for (size_t i = 0; i < 2; i++)
        if (kt_config_get_int(cfg, svc, limits[i]) <= 0) {
            param_err(cfg, svc, limits[i], "%s must be a positive number", limits[i]);
            (*errors)++;
        }
    /* local(8)'s alias and :include: expansion do not carry an unmatched extension along */
    static const char *const unimplemented[] = { "alias", "include" };
    for (size_t i = 0; i < 2; i++) {
        const char *v = c.propagate_unmatched_extensions, *p = v;
        size_t wl = strlen(unimplemented[i]);
        for (p += strspn(p, ", \t"); *p; p += strspn(p, ", \t")) {
            size_t n = strcspn(p, ", \t");
            if (n == wl && !strncasecmp(p, unimplemented[i], n)) {
                param_err(cfg, svc, "propagate_unmatched_extensions", "propagate_unmatched_extensions: ktrelay "
                          "does not propagate extensions into local %s expansions; remove \"%s\"",
                          i == 0 ? "alias" : ":include:", unimplemented[i]);
                (*errors)++;
            }
            p += n;
        }
    }
    if (!resolver)
        return NULL;   /* already reported */
    char *key = kt_asprintf("%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%lld\1%lld\1%p", c.virtual_alias_maps,
                            c.canonical_maps, c.sender_canonical_maps, c.recipient_canonical_maps,
                            c.canonical_classes, c.sender_canonical_classes, c.recipient_canonical_classes,
                            c.propagate_unmatched_extensions, c.virtual_alias_expansion_limit,
                            c.virtual_alias_recursion_limit, (const void *)resolver);
    struct kt_rewrite *rw = shared_find(rp, 6, key);
    if (!rw) {
        char err[512];
        if (kt_rewrite_new(&c, &rw, err, sizeof(err)) < 0) {
            param_err(cfg, svc, NULL, "%s", err);
            (*errors)++;
            rw = NULL;
        } else {
            shared_add(rp, 6, key, rw);
        }
    }
    kt_free(key);
    return rw;
}

/* The loader admits only Postfix's server levels (none, may, encrypt, empty). */
static enum kt_tls_level tls_level(const struct kt_config *cfg, const struct kt_service *svc)
{
    const char *level = get(cfg, svc, "smtpd_tls_security_level");
    if (!strcasecmp(level, "encrypt"))
        return KT_TLS_ENCRYPT;
    if (!strcasecmp(level, "may"))
        return KT_TLS_MAY;
    if (!strcasecmp(level, "none"))
        return KT_TLS_NONE;
    /* Postfix's legacy switches when the level is empty */
    if (kt_config_get_bool(cfg, svc, "smtpd_enforce_tls") == 1)
        return KT_TLS_ENCRYPT;
    if (kt_config_get_bool(cfg, svc, "smtpd_use_tls") == 1)
        return KT_TLS_MAY;
    return KT_TLS_NONE;
}

/* The parameter an error from building a server TLS context is about, so
 * that it is reported at the line that set it. */
static const char *server_tls_param(const char *err, const struct kt_tls_server_params *p, int mandatory)
{
    int rsa = p->cert_file[0] != '\0';
    if (strstr(err, "private key"))
        return rsa ? "smtpd_tls_key_file" : "smtpd_tls_eckey_file";
    if (strstr(err, "CA certificates") || strstr(err, "client CA names"))
        return p->CAfile[0] ? "smtpd_tls_CAfile" : "smtpd_tls_CApath";
    if (strstr(err, "TLS protocol"))
        return mandatory ? "smtpd_tls_mandatory_protocols" : "smtpd_tls_protocols";
    if (strstr(err, "cipher"))
        return mandatory ? "smtpd_tls_mandatory_ciphers" : "smtpd_tls_ciphers";
    if (strstr(err, "session cache"))
        return "smtpd_tls_session_cache_timeout";
    return rsa ? "smtpd_tls_cert_file" : "smtpd_tls_eccert_file";
}

static struct kt_tls_server *service_tls(struct runtime_private *rp, const struct kt_config *cfg,
                                         const struct kt_service *svc, struct kt_smtpd_settings *st, int *errors)
{
    int mandatory = st->tls_level == KT_TLS_ENCRYPT;
    struct kt_tls_server_params p = {
        .cert_file = get(cfg, svc, "smtpd_tls_cert_file"),
        .key_file = get(cfg, svc, "smtpd_tls_key_file"),
        .eccert_file = get(cfg, svc, "smtpd_tls_eccert_file"),
        .eckey_file = get(cfg, svc, "smtpd_tls_eckey_file"),
        .CAfile = get(cfg, svc, "smtpd_tls_CAfile"),
        .CApath = get(cfg, svc, "smtpd_tls_CApath"),
        .protocols = get(cfg, svc, mandatory ? "smtpd_tls_mandatory_protocols" : "smtpd_tls_protocols"),
        .ciphers = get(cfg, svc, mandatory ? "smtpd_tls_mandatory_ciphers" : "smtpd_tls_ciphers"),
        .high_cipherlist = get(cfg, svc, "tls_high_cipherlist"),
        .medium_cipherlist = get(cfg, svc, "tls_medium_cipherlist"),
        .low_cipherlist = get(cfg, svc, "tls_low_cipherlist"),
        .exclude_ciphers = get(cfg, svc, mandatory ? "smtpd_tls_mandatory_exclude_ciphers"
                                                   : "smtpd_tls_exclude_ciphers"),
        .loglevel = (int)kt_config_get_int(cfg, svc, "smtpd_tls_loglevel"),
        .session_cache_timeout = (long)kt_config_get_time(cfg, svc, "smtpd_tls_session_cache_timeout"),
        .ask_ccert = kt_config_get_bool(cfg, svc, "smtpd_tls_ask_ccert") == 1,
        .ktls = kt_config_get_bool(cfg, svc, "tls_ktls_enable") == 1,
    };
    if (!p.cert_file[0] && !p.eccert_file[0]) {
        if (st->wrappermode || st->tls_level == KT_TLS_ENCRYPT) {
            param_err(cfg, svc, st->wrappermode ? "smtpd_tls_wrappermode"
                                : get(cfg, svc, "smtpd_tls_security_level")[0] ? "smtpd_tls_security_level"
                                : "smtpd_enforce_tls",
                      "TLS is required but neither smtpd_tls_cert_file nor smtpd_tls_eccert_file is set");
            (*errors)++;
        } else {
            kt_warn("service %s: no server certificate (smtpd_tls_cert_file): STARTTLS is not offered", svc->name);
            st->tls_level = KT_TLS_NONE;
        }
        return NULL;
    }
    char *key = kt_asprintf("%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%d\1%ld\1%d\1%d", p.cert_file,
                            p.key_file, p.eccert_file, p.eckey_file, p.CAfile, p.CApath, p.protocols, p.ciphers,
                            p.high_cipherlist, p.medium_cipherlist, p.low_cipherlist, p.exclude_ciphers, p.loglevel,
                            p.session_cache_timeout, p.ask_ccert, p.ktls);
    struct kt_tls_server *t = shared_find(rp, 1, key);
    if (!t) {
        char err[2048];
        if (kt_tls_server_new(&p, &t, err, sizeof(err)) < 0) {
            param_err(cfg, svc, server_tls_param(err, &p, mandatory), "%s", err);
            (*errors)++;
            t = NULL;
        } else {
            if (p.ktls)
                kt_ktls_prepare_ctx(kt_tls_server_ctx(t));
            shared_add(rp, 1, key, t);
        }
    }
    kt_free(key);
    return t;
}

/* mynetworks left at its default follows mynetworks_style, as in Postfix. */
static struct kt_net_list *service_mynetworks(struct runtime_private *rp, const struct kt_config *cfg,
                                              const struct kt_service *svc, int *errors)
{
    const char *mynetworks = get(cfg, svc, "mynetworks");
    const char *style = get(cfg, svc, "mynetworks_style");
    const struct kt_param_def *def = kt_param_find("mynetworks");
    char *computed = NULL;
    struct kt_net_list *nets;

    if (strcasecmp(style, "host") && strcasecmp(style, "subnet") && strcasecmp(style, "class")) {
        param_err(cfg, svc, "mynetworks_style", "mynetworks_style must be host, subnet or class, not \"%s\"", style);
        (*errors)++;
        return NULL;
    }
    if (def && def->def && strcmp(mynetworks, def->def) == 0)
        mynetworks = computed = kt_mynetworks_from_style(style);
    nets = shared_find(rp, 2, mynetworks);
    if (!nets) {
        char err[512];
        if (kt_net_list_open(mynetworks, &nets, err, sizeof(err)) < 0) {
            param_err(cfg, svc, "mynetworks", "mynetworks: %s", err);
            (*errors)++;
            nets = NULL;
        } else {
            shared_add(rp, 2, mynetworks, nets);
        }
    }
    kt_free(computed);
    return nets;
}

/* smtpd_client_event_limit_exceptions: usually $mynetworks, then the same list. */
static struct kt_net_list *service_limit_exceptions(struct runtime_private *rp, const struct kt_config *cfg,
                                                    const struct kt_service *svc, struct kt_smtpd_settings *st,
                                                    int *errors)
{
    const char *list = get(cfg, svc, "smtpd_client_event_limit_exceptions");
    if (strcmp(list, get(cfg, svc, "mynetworks")) == 0)
        return st->mynetworks;
    struct kt_net_list *nets = shared_find(rp, 2, list);
    if (!nets) {
        char err[512];
        if (kt_net_list_open(list, &nets, err, sizeof(err)) < 0) {
            param_err(cfg, svc, "smtpd_client_event_limit_exceptions", "smtpd_client_event_limit_exceptions: %s", err);
            (*errors)++;
            return NULL;
        }
        shared_add(rp, 2, list, nets);
    }
    return nets;
}

/* smtpd_forbid_bare_newline and its exclusions. Postfix 3.9 values: normalize (and its alias yes), reject,
 * no. Postfix's "no" would also let <LF>.<LF> end the data; ktrelay never does (that is SMTP smuggling),
 * so "no" normalizes like "normalize" and says so. */
static int service_bare_newline(struct runtime_private *rp, const struct kt_config *cfg,
                                const struct kt_service *svc, struct kt_smtpd_settings *st)
{
    const char *v = get(cfg, svc, "smtpd_forbid_bare_newline");
    const char *excl = get(cfg, svc, "smtpd_forbid_bare_newline_exclusions");
    long long code = kt_config_get_int(cfg, svc, "smtpd_forbid_bare_newline_reject_code");

    if (!strcasecmp(v, "normalize") || !strcasecmp(v, "yes")) {
        st->bare_newline = KT_BARE_NEWLINE_NORMALIZE;
    } else if (!strcasecmp(v, "reject")) {
        st->bare_newline = KT_BARE_NEWLINE_REJECT;
    } else if (!strcasecmp(v, "no")) {
        st->bare_newline = KT_BARE_NEWLINE_NO;
        kt_warn("service %s: smtpd_forbid_bare_newline = no: bare <LF> and <CR> are stored as <CR><LF> and "
                "only <CR><LF>.<CR><LF> ends the data, as with normalize", svc->name);
    } else {
        kt_err("service %s: smtpd_forbid_bare_newline must be normalize, yes, reject or no, not \"%s\"",
               svc->name, v);
        return 1;
    }
    if (code < 400 || code > 599) {
        kt_err("service %s: smtpd_forbid_bare_newline_reject_code must be a 4xx or 5xx code, not %lld", svc->name,
               code);
        return 1;
    }
    st->bare_newline_reject_code = (int)code;
    if (!excl[0]) {
        st->bare_newline_exclusions = NULL;
        return 0;
    }
    if (!strcmp(excl, get(cfg, svc, "mynetworks"))) {
        st->bare_newline_exclusions = st->mynetworks;   /* the default, $mynetworks, with its style */
        return st->mynetworks ? 0 : 1;
    }
    st->bare_newline_exclusions = shared_find(rp, 2, excl);
    if (!st->bare_newline_exclusions) {
        char err[512];
        if (kt_net_list_open(excl, &st->bare_newline_exclusions, err, sizeof(err)) < 0) {
            kt_err("service %s: smtpd_forbid_bare_newline_exclusions: %s", svc->name, err);
            return 1;
        }
        shared_add(rp, 2, excl, st->bare_newline_exclusions);
    }
    return 0;
}

/* header_checks, mime_header_checks, nested_header_checks, body_checks with header_size_limit and
 * body_checks_size_limit: one checker per distinct set, shared by the services that use it. */
static int service_checks(struct runtime_private *rp, const struct kt_config *cfg, const struct kt_service *svc,
                          struct kt_smtpd_settings *st)
{
    struct kt_cleanup_params cp = {
        .header_checks = get(cfg, svc, "header_checks"),
        .mime_header_checks = get(cfg, svc, "mime_header_checks"),
        .nested_header_checks = get(cfg, svc, "nested_header_checks"),
        .body_checks = get(cfg, svc, "body_checks"),
        .header_size_limit = kt_config_get_int(cfg, svc, "header_size_limit"),
        .body_checks_size_limit = kt_config_get_int(cfg, svc, "body_checks_size_limit"),
    };
    char *key = kt_asprintf("%s\1%s\1%s\1%s\1%lld\1%lld", cp.header_checks, cp.mime_header_checks,
                            cp.nested_header_checks, cp.body_checks, cp.header_size_limit, cp.body_checks_size_limit);
    int errors = 0;

    st->checks = NULL;
    if (!cp.header_checks[0] && !cp.mime_header_checks[0] && !cp.nested_header_checks[0] && !cp.body_checks[0])
        goto done;
    st->checks = shared_find(rp, 5, key);
    if (!st->checks) {
        char err[600];
        if (kt_cleanup_checks_new(&cp, &st->checks, err, sizeof(err)) < 0) {
            param_err(cfg, svc, NULL, "%s", err);
            errors++;
            goto done;
        }
        if (st->checks)
            shared_add(rp, 5, key, st->checks);
    }
    st->checks_need_queue = kt_cleanup_checks_need_queue(st->checks);
done:
    kt_free(key);
    return errors;
}

static struct kt_policy *service_policy(struct runtime_private *rp, const struct kt_config *cfg,
                                        const struct kt_service *svc, const struct kt_smtpd_settings *st,
                                        int *errors)
{
    struct kt_policy_config pc = {
        .client_restrictions = get(cfg, svc, "smtpd_client_restrictions"),
        .helo_restrictions = get(cfg, svc, "smtpd_helo_restrictions"),
        .sender_restrictions = get(cfg, svc, "smtpd_sender_restrictions"),
        .relay_restrictions = get(cfg, svc, "smtpd_relay_restrictions"),
        .recipient_restrictions = get(cfg, svc, "smtpd_recipient_restrictions"),
        .sender_login_maps = get(cfg, svc, "smtpd_sender_login_maps"),
        .relay_clientcerts = get(cfg, svc, "relay_clientcerts"),
        .reject_unlisted_sender = kt_config_get_bool(cfg, svc, "smtpd_reject_unlisted_sender") == 1,
        .addr_flags = (kt_config_get_bool(cfg, svc, "allow_percent_hack") == 1 ? KT_ADDR_PERCENT_HACK : 0)
                      | (kt_config_get_bool(cfg, svc, "swap_bangpath") == 1 ? KT_ADDR_SWAP_BANGPATH : 0)
                      | (kt_config_get_bool(cfg, svc, "resolve_dequoted_address") == 1 ? KT_ADDR_DEQUOTE : 0),
        .resolver = st->resolver,
        .mynetworks = st->mynetworks,
        .rbl_reply_maps = get(cfg, svc, "rbl_reply_maps"),
    };
    if (!pc.resolver || !pc.mynetworks)
        return NULL;   /* already reported */
    if (kt_config_get_bool(cfg, svc, "smtpd_delay_reject") == 0)
        kt_warn("service %s: smtpd_delay_reject = no is not supported; restrictions are evaluated at RCPT",
                svc->name);
    /* Safety rules that ktrelay does not let a configuration switch off */
    if (kt_config_get_bool(cfg, svc, "smtpd_reject_unlisted_recipient") == 0)
        kt_warn("service %s: smtpd_reject_unlisted_recipient = no is not supported; unknown local and virtual "
                "recipients are always rejected", svc->name);
    char *key = kt_asprintf("%s\1%s\1%s\1%s\1%s\1%s\1%s\1%s\1%d\1%u\1%p\1%p", pc.rbl_reply_maps,
                            pc.client_restrictions,
                            pc.helo_restrictions, pc.sender_restrictions, pc.relay_restrictions,
                            pc.recipient_restrictions, pc.sender_login_maps, pc.relay_clientcerts,
                            pc.reject_unlisted_sender,
                            pc.addr_flags, (const void *)pc.resolver, (const void *)pc.mynetworks);
    struct kt_policy *p = shared_find(rp, 3, key);
    if (!p) {
        char err[512];
        if (kt_policy_new(&pc, &p, err, sizeof(err)) < 0) {
            param_err(cfg, svc, NULL, "%s", err);
            (*errors)++;
            p = NULL;
        } else {
            shared_add(rp, 3, key, p);
        }
    }
    kt_free(key);
    return p;
}

static int service_sasl(struct runtime_private *rp, const struct kt_config *cfg, const struct kt_service *svc,
                        struct kt_smtpd_settings *st)
{
    char err[512];
    int errors = 0;

    st->tls_auth_only = kt_config_get_bool(cfg, svc, "smtpd_tls_auth_only") == 1;
    st->broken_sasl_auth_clients = kt_config_get_bool(cfg, svc, "broken_sasl_auth_clients") == 1;
    st->sasl_authenticated_header = kt_config_get_bool(cfg, svc, "smtpd_sasl_authenticated_header") == 1;
    st->sasl_local_domain = get(cfg, svc, "smtpd_sasl_local_domain");
    if (kt_sasl_security_mechs(get(cfg, svc, "smtpd_sasl_security_options"), &st->sasl_mechs, err,
                               sizeof(err)) < 0 ||
        kt_sasl_security_mechs(get(cfg, svc, "smtpd_sasl_tls_security_options"), &st->sasl_tls_mechs, err,
                               sizeof(err)) < 0) {
        param_err(cfg, svc, "smtpd_sasl_security_options", "%s", err);
        return 1;
    }
    if (kt_config_get_bool(cfg, svc, "smtpd_sasl_auth_enable") != 1)
        return 0;
    const char *type = get(cfg, svc, "smtpd_sasl_type");
    char *path;
    if (strcasecmp(type, "dovecot") == 0) {
        const char *sp = get(cfg, svc, "smtpd_sasl_path");
        /* Postfix: a relative path is below queue_directory ("private/auth") */
        path = sp[0] == '/' || !sp[0] ? kt_strdup(sp) : kt_asprintf("%s/%s", get(cfg, svc, "queue_directory"), sp);
    } else {
        path = kt_strdup(get(cfg, svc, "ktrelay_sasl_password_file"));
    }
    char *key = kt_asprintf("%s\1%s", type, path);
    st->sasl = shared_find(rp, 4, key);
    if (!st->sasl) {
        if (kt_sasl_server_open(type, path, &st->sasl, err, sizeof(err)) < 0) {
            param_err(cfg, svc, strcasecmp(type, "dovecot") ? "ktrelay_sasl_password_file" : "smtpd_sasl_path",
                      "%s", err);
            errors++;
        } else {
            shared_add(rp, 4, key, st->sasl);
        }
    }
    kt_free(key);
    kt_free(path);
    st->sasl_enable = st->sasl != NULL;
    return errors;
}

/* The listening addresses the server will bind, resolved as it resolves them
 * (getaddrinfo, AI_PASSIVE), so a name or address that cannot be resolved
 * fails check-config as it fails run. */
static int service_listen_check(const struct kt_config *cfg, const struct kt_service *svc)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
    struct addrinfo *res;
    int errors = 0, rc;

    if (svc->host) {
        if ((rc = getaddrinfo(svc->host, NULL, &hints, &res)) != 0) {
            kt_err("%s:%d: service %s: cannot resolve listen address %s: %s", svc->file, svc->line, svc->name,
                   svc->host, gai_strerror(rc));
            return 1;
        }
        freeaddrinfo(res);
        return 0;
    }
    const char *ifs = get(cfg, svc, "inet_interfaces");
    if (!ifs[0] || !strcasecmp(ifs, "all") || !strcasecmp(ifs, "loopback-only"))
        return 0;
    char *copy = kt_strdup(ifs), *save = NULL;
    for (char *tok = strtok_r(copy, ", \t\n", &save); tok; tok = strtok_r(NULL, ", \t\n", &save)) {
        size_t len = strlen(tok);
        if (tok[0] == '[' && tok[len - 1] == ']') {
            tok[len - 1] = '\0';
            tok++;
        }
        if ((rc = getaddrinfo(tok, NULL, &hints, &res)) != 0) {
            param_err(cfg, svc, "inet_interfaces", "inet_interfaces: cannot resolve listen address %s: %s", tok,
                      gai_strerror(rc));
            errors++;
        } else {
            freeaddrinfo(res);
        }
    }
    kt_free(copy);
    return errors;
}

/* ktrelay_dns_servers as c-ares reads it ("ip[:port],[v6]:port"), checked
 * with a channel of its own so check-config refuses what the resolvers would. */
static int dns_servers_check(const struct kt_config *cfg)
{
    const char *servers = get(cfg, NULL, "ktrelay_dns_servers");
    ares_channel ch;
    struct ares_options opts;
    int errors = 0;

    if (!servers[0])
        return 0;
    memset(&opts, 0, sizeof(opts));
    if (ares_init_options(&ch, &opts, 0) != ARES_SUCCESS)
        return 0;                     /* cannot check here; the resolvers report it */
    if (ares_set_servers_ports_csv(ch, servers) != ARES_SUCCESS) {
        param_err(cfg, NULL, "ktrelay_dns_servers", "ktrelay_dns_servers: bad server list \"%s\" (expected "
                  "ip[:port] or [ipv6]:port, separated by commas)", servers);
        errors++;
    }
    ares_destroy(ch);
    return errors;
}

/* smtpd_discard_ehlo_keywords: names of EHLO keywords, any case, separated by spaces or commas. An unknown
 * name is ignored with a warning, as Postfix's ehlo_mask() does. */
static unsigned ehlo_discard_mask(const struct kt_config *cfg, const struct kt_service *svc)
{
    static const struct { const char *name; unsigned bit; } words[] = {
        { "pipelining", KT_EHLO_PIPELINING }, { "size", KT_EHLO_SIZE }, { "vrfy", KT_EHLO_VRFY },
        { "etrn", KT_EHLO_ETRN }, { "starttls", KT_EHLO_STARTTLS }, { "auth", KT_EHLO_AUTH },
        { "enhancedstatuscodes", KT_EHLO_ENHANCEDSTATUSCODES }, { "8bitmime", KT_EHLO_8BITMIME },
        { "dsn", KT_EHLO_DSN }, { "smtputf8", KT_EHLO_SMTPUTF8 }, { "chunking", KT_EHLO_CHUNKING },
        { "silent-discard", KT_EHLO_SILENT },
    };
    const char *v = get(cfg, svc, "smtpd_discard_ehlo_keywords");
    unsigned mask = 0;
    while (*v) {
        size_t n = strcspn(v, " \t,");
        if (n > 0) {
            size_t k;
            for (k = 0; k < sizeof(words) / sizeof(words[0]); k++)
                if (strlen(words[k].name) == n && !strncasecmp(v, words[k].name, n))
                    break;
            if (k < sizeof(words) / sizeof(words[0]))
                mask |= words[k].bit;
            else
                kt_warn("smtpd_discard_ehlo_keywords: unknown keyword \"%.*s\" ignored", (int)n, v);
        }
        v += n;
        v += strspn(v, " \t,");
    }
    return mask;
}

/* A milter list parameter (smtpd_milters per service through -o; non_smtpd_milters from main.cf) with the
 * milter_* parameters, as Postfix's milter8 reads them. Every value is checked here, so check-config
 * refuses what run would. *out: NULL for an empty list, else owned by the runtime. Returns the error count. */
static int milter_list(struct runtime_private *rp, const struct kt_config *cfg, const struct kt_service *svc,
                       const char *param, struct kt_milter_set **out)
{
    static const char *const macro_params[KT_MS_COUNT] = {
        [KT_MS_CONNECT] = "milter_connect_macros", [KT_MS_HELO] = "milter_helo_macros",
        [KT_MS_MAIL] = "milter_mail_macros", [KT_MS_RCPT] = "milter_rcpt_macros",
        [KT_MS_DATA] = "milter_data_macros", [KT_MS_EOH] = "milter_end_of_header_macros",
        [KT_MS_EOD] = "milter_end_of_data_macros", [KT_MS_UNKNOWN] = "milter_unknown_command_macros",
    };
    struct kt_milter_defaults def = {
        .default_action = get(cfg, svc, "milter_default_action"),
        .protocol = get(cfg, svc, "milter_protocol"),
        .connect_timeout_s = kt_config_get_time(cfg, svc, "milter_connect_timeout"),
        .command_timeout_s = kt_config_get_time(cfg, svc, "milter_command_timeout"),
        .content_timeout_s = kt_config_get_time(cfg, svc, "milter_content_timeout"),
        .message_size_limit = kt_config_get_int(cfg, svc, "message_size_limit"),
    };
    for (int i = 0; i < KT_MS_COUNT; i++)
        def.macros[i] = get(cfg, svc, macro_params[i]);
    char err[512];
    *out = NULL;
    if (kt_milter_set_parse(get(cfg, svc, param), &def, out, err, sizeof(err)) < 0) {
        param_err(cfg, svc, param, "%s: %s", param, err);
        return 1;
    }
    if (*out)
        shared_add(rp, 7, param, *out);
    return 0;
}

/* smtpd_milters of one service. A service's -o non_smtpd_milters means nothing to an SMTP server: Postfix's
 * smtpd never reads it, neither does this. */
static int service_milters(struct runtime_private *rp, const struct kt_config *cfg, const struct kt_service *svc,
                           struct kt_smtpd_settings *st)
{
    st->milter_daemon_name = get(cfg, svc, "milter_macro_daemon_name");
    st->milter_macro_v = get(cfg, svc, "milter_macro_v");
    if (milter_list(rp, cfg, svc, "smtpd_milters", &st->milters))
        return 1;
    if (st->receive_override & KT_RO_NO_MILTERS)
        st->milters = NULL;   /* receive_override_options = no_milters: checked, not applied */
    return 0;
}

static int service_settings(struct runtime_private *rp, const struct kt_config *cfg, const struct kt_service *svc,
                            struct kt_smtpd_settings *st)
{
    int errors = 0;
    st->service = svc;
    st->myhostname = get(cfg, svc, "myhostname");
    st->banner = get(cfg, svc, "smtpd_banner");
    st->message_size_limit = kt_config_get_int(cfg, svc, "message_size_limit");
    st->recipient_limit = kt_settings_recipient_limit(cfg, svc);
    st->recipient_overshoot_limit = kt_config_get_int(cfg, svc, "smtpd_recipient_overshoot_limit");
    st->helo_required = kt_config_get_bool(cfg, svc, "smtpd_helo_required") == 1;
    st->disable_vrfy = kt_config_get_bool(cfg, svc, "disable_vrfy_command") == 1;
    st->ehlo_discard = ehlo_discard_mask(cfg, svc);
    st->smtputf8_enable = kt_config_get_bool(cfg, svc, "smtputf8_enable") == 1;
    st->timeout_s = kt_config_get_time(cfg, svc, "smtpd_timeout");
    st->per_request_deadline = kt_config_get_bool(cfg, svc, "smtpd_per_request_deadline") == 1;
    st->min_data_rate = kt_config_get_int(cfg, svc, "smtpd_min_data_rate");
    if (st->min_data_rate <= 0) {
        kt_err("service %s: smtpd_min_data_rate must be a positive number of bytes per second", svc->name);
        errors++;
    }
    st->starttls_timeout_s = kt_config_get_time(cfg, svc, "smtpd_starttls_timeout");
    st->hard_error_limit = kt_config_get_int(cfg, svc, "smtpd_hard_error_limit");
    st->soft_error_limit = kt_config_get_int(cfg, svc, "smtpd_soft_error_limit");
    st->junk_command_limit = kt_config_get_int(cfg, svc, "smtpd_junk_command_limit");
    if (st->junk_command_limit < 1) {   /* Postfix's minimum */
        param_err(cfg, svc, "smtpd_junk_command_limit", "smtpd_junk_command_limit must be at least 1");
        errors++;
    }
    st->error_sleep_ms = kt_config_get_time(cfg, svc, "smtpd_error_sleep_time") * 1000;
    st->line_length_limit = kt_settings_line_length_limit(cfg, svc);
    st->wrappermode = kt_config_get_bool(cfg, svc, "smtpd_tls_wrappermode") == 1;
    st->tls_level = tls_level(cfg, svc);
    st->tls_loglevel = (int)kt_config_get_int(cfg, svc, "smtpd_tls_loglevel");
    st->tls_received_header = kt_config_get_bool(cfg, svc, "smtpd_tls_received_header") == 1;
    st->ktls_rx_tls13 = kt_config_get_bool(cfg, svc, "tls_ktls_rx_tls13") == 1;
    st->tls_fingerprint_digest = get(cfg, svc, "smtpd_tls_fingerprint_digest");
    if (!EVP_get_digestbyname(st->tls_fingerprint_digest)) {
        kt_err("service %s: smtpd_tls_fingerprint_digest: unknown digest \"%s\"", svc->name,
               st->tls_fingerprint_digest);
        errors++;
    }
    if (st->tls_level != KT_TLS_NONE || st->wrappermode)
        st->tls = service_tls(rp, cfg, svc, st, &errors);
    st->resolver = service_resolver(rp, cfg, svc, &errors);
    st->transport = rp->transport;
    st->rewrite = service_rewrite(rp, cfg, svc, st->resolver, &errors);
    st->content_filter = get(cfg, svc, "content_filter");
    const char *ro = get(cfg, svc, "receive_override_options");
    static const char *const ro_names[] = { "no_unknown_recipient_checks", "no_address_mappings",
                                            "no_header_body_checks", "no_milters" };
    for (size_t i = 0; i < 4; i++) {
        size_t wl = strlen(ro_names[i]);
        for (const char *p = ro + strspn(ro, ", \t"); *p; p += strspn(p, ", \t")) {
            size_t n = strcspn(p, ", \t");
            if (n == wl && !strncasecmp(p, ro_names[i], n))
                st->receive_override |= 1u << i;
            p += n;
        }
    }
    st->mynetworks = service_mynetworks(rp, cfg, svc, &errors);
    st->policy = service_policy(rp, cfg, svc, st, &errors);
    st->conn_count_limit = kt_config_get_int(cfg, svc, "smtpd_client_connection_count_limit");
    st->conn_rate_limit = kt_config_get_int(cfg, svc, "smtpd_client_connection_rate_limit");
    st->msg_rate_limit = kt_config_get_int(cfg, svc, "smtpd_client_message_rate_limit");
    st->rcpt_rate_limit = kt_config_get_int(cfg, svc, "smtpd_client_recipient_rate_limit");
    st->newtls_rate_limit = kt_config_get_int(cfg, svc, "smtpd_client_new_tls_session_rate_limit");
    st->auth_rate_limit = kt_config_get_int(cfg, svc, "smtpd_client_auth_rate_limit");
    st->anvil_unit_s = kt_config_get_time(cfg, svc, "anvil_rate_time_unit");
    if (st->anvil_unit_s <= 0) {
        param_err(cfg, svc, "anvil_rate_time_unit", "anvil_rate_time_unit must be at least 1s");
        errors++;
    }
    st->limit_exceptions = service_limit_exceptions(rp, cfg, svc, st, &errors);
    const char *proxy = get(cfg, svc, "smtpd_upstream_proxy_protocol");
    if (strcasecmp(proxy, "haproxy") == 0) {
        st->upstream_proxy = 1;
    } else if (proxy[0]) {
        /* fail closed: an unknown proxy protocol would make the proxy's address the client's */
        param_err(cfg, svc, "smtpd_upstream_proxy_protocol",
                  "smtpd_upstream_proxy_protocol: unsupported value \"%s\" (empty or haproxy)", proxy);
        errors++;
    }
    st->upstream_proxy_timeout_s = kt_config_get_time(cfg, svc, "smtpd_upstream_proxy_timeout");
    st->peername_lookup = kt_config_get_bool(cfg, svc, "smtpd_peername_lookup") != 0;
    errors += service_bare_newline(rp, cfg, svc, st);
    errors += service_checks(rp, cfg, svc, st);
    if (st->receive_override & KT_RO_NO_HEADER_BODY_CHECKS) {
        /* receive_override_options = no_header_body_checks (a re-injection service after a content filter):
         * the tables are still built and checked, and not applied here */
        st->checks = NULL;
        st->checks_need_queue = 0;
    }
    errors += service_milters(rp, cfg, svc, st);
    errors += service_sasl(rp, cfg, svc, st);
    errors += service_listen_check(cfg, svc);
    return errors;
}

/* smtp_sasl_* and the other Postfix smtp(8) delivery limits. Returns the error count. */
static int smtp_sasl_settings(struct runtime_private *rp, const struct kt_config *cfg, struct kt_smtp_settings *sm)
{
    char err[512];
    int errors = 0;
    unsigned opts = 0, tls_opts = 0, filter = 0;

    sm->sasl_soft_bounce = kt_config_get_bool(cfg, NULL, "smtp_sasl_auth_soft_bounce") == 1;
    sm->sender_dependent_auth = kt_config_get_bool(cfg, NULL, "smtp_sender_dependent_authentication") == 1;
    sm->randomize_addresses = kt_config_get_bool(cfg, NULL, "smtp_randomize_addresses") == 1;
    long long lim = kt_config_get_int(cfg, NULL, "smtp_destination_recipient_limit");
    sm->recipient_limit = lim > 0 ? (unsigned)(lim > 100000 ? 100000 : lim) : 0;
    sm->rate_delay_s = kt_config_get_time(cfg, NULL, "smtp_destination_rate_delay");
    sm->conn_cache_time_s = kt_config_get_time(cfg, NULL, "smtp_connection_cache_time_limit");
    long long reuse = kt_config_get_int(cfg, NULL, "smtp_connection_reuse_count_limit");
    sm->reuse_count_limit = reuse > 0 ? (unsigned)(reuse > 1000000 ? 1000000 : reuse) : 0;
    if (sm->rate_delay_s < 0)
        sm->rate_delay_s = 0;
    if (sm->conn_cache_time_s < 0)
        sm->conn_cache_time_s = 0;

    /* checked even when AUTH is off, so check-config finds a bad value before it is switched on */
    if (kt_sasl_security_mechs(get(cfg, NULL, "smtp_sasl_security_options"), &opts, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, "smtp_sasl_security_options", "smtp_sasl_security_options: %s", err);
        errors++;
    }
    if (kt_sasl_security_mechs(get(cfg, NULL, "smtp_sasl_tls_security_options"), &tls_opts, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, "smtp_sasl_tls_security_options", "smtp_sasl_tls_security_options: %s", err);
        errors++;
    }
    if (kt_smtp_sasl_filter(get(cfg, NULL, "smtp_sasl_mechanism_filter"), &filter, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, "smtp_sasl_mechanism_filter", "smtp_sasl_mechanism_filter: %s", err);
        errors++;
    }
    /* the server side's option bits are the same mechanisms: PLAIN 1, LOGIN 2 */
    sm->sasl_mechs = ((opts & KT_MECH_PLAIN ? KT_SMTP_MECH_PLAIN : 0u) | (opts & KT_MECH_LOGIN ? KT_SMTP_MECH_LOGIN : 0u)) & filter;
    sm->sasl_tls_mechs = ((tls_opts & KT_MECH_PLAIN ? KT_SMTP_MECH_PLAIN : 0u) |
                          (tls_opts & KT_MECH_LOGIN ? KT_SMTP_MECH_LOGIN : 0u)) & filter;
    sm->sasl_auth_enable = kt_config_get_bool(cfg, NULL, "smtp_sasl_auth_enable") == 1;
    if (!sm->sasl_auth_enable)
        return errors;
    const char *maps = get(cfg, NULL, "smtp_sasl_password_maps");
    if (!*maps) {
        /* Postfix stops too: AUTH on, but nowhere to find a password */
        param_err(cfg, NULL, "smtp_sasl_auth_enable",
                  "smtp_sasl_auth_enable = yes needs a password table in smtp_sasl_password_maps");
        return errors + 1;
    }
    if (kt_maps_open(maps, KT_TABLE_MAP, &rp->smtp_sasl_maps, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, "smtp_sasl_password_maps", "smtp_sasl_password_maps: %s", err);
        return errors + 1;
    }
    sm->sasl_password_maps = rp->smtp_sasl_maps;
    return errors;
}

static void own_add(struct runtime_private *rp, size_t *n, const struct sockaddr *sa)
{
    size_t len = sa->sa_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    if (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)
        return;
    rp->own_addrs = kt_realloc(rp->own_addrs, (*n + 1) * sizeof(*rp->own_addrs));
    memset(&rp->own_addrs[*n], 0, sizeof(*rp->own_addrs));
    memcpy(&rp->own_addrs[*n], sa, len);
    (*n)++;
}

/* Names or addresses of a list (inet_interfaces, proxy_interfaces) into own_addrs; "all" takes every
 * interface's address, "loopback-only" 127.0.0.1 and ::1, as Postfix's own_inet_addr. Returns errors. */
static int own_list(struct runtime_private *rp, const struct kt_config *cfg, const char *param, size_t *n)
{
    char *copy = kt_strdup(get(cfg, NULL, param)), *save = NULL;
    int errors = 0;
    for (char *tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        if (!strcasecmp(tok, "all") && !strcmp(param, "inet_interfaces")) {
            struct ifaddrs *ifs = NULL;
            if (getifaddrs(&ifs) == 0) {
                for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
                    if (i->ifa_addr)
                        own_add(rp, n, i->ifa_addr);
                freeifaddrs(ifs);
            }
            continue;
        }
        if (!strcasecmp(tok, "loopback-only") && !strcmp(param, "inet_interfaces")) {
            struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
            struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
            own_add(rp, n, (struct sockaddr *)&a4);
            own_add(rp, n, (struct sockaddr *)&a6);
            continue;
        }
        char host[256];
        snprintf(host, sizeof(host), "%s", tok[0] == '[' ? tok + 1 : tok);
        host[strcspn(host, "]")] = '\0';
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai = NULL;
        if (getaddrinfo(host, NULL, &hints, &ai) != 0) {
            param_err(cfg, NULL, param, "%s: cannot resolve %s", param, tok);
            errors++;
            continue;
        }
        for (struct addrinfo *a = ai; a; a = a->ai_next)
            own_add(rp, n, a->ai_addr);
        freeaddrinfo(ai);
    }
    kt_free(copy);
    return errors;
}

/* smtp_bind_address (FAMILY AF_INET) or smtp_bind_address6 (AF_INET6) into *ss and *len, as Postfix's
 * smtp(8): a numerical address of that family, or, when the parameter is empty and inet_interfaces names
 * exactly one address of the family that is not a loopback address, that one (Postfix uses it as the bind
 * address then; names in inet_interfaces are not resolved for this). *len stays 0 for none. 0, or 1 after
 * a reported error. */
static int bind_setting(const struct kt_config *cfg, int family, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *param = family == AF_INET ? "smtp_bind_address" : "smtp_bind_address6";
    const char *value = get(cfg, NULL, param);
    char addr[INET6_ADDRSTRLEN + 3];
    size_t n = value ? strspn(value, " \t") : 0;
    *len = 0;
    memset(ss, 0, sizeof(*ss));
    if (value && value[n]) {
        /* one address; postconf(5): "may be enclosed inside []" */
        size_t vlen = strcspn(value + n, " \t,");
        if (value[n + vlen + strspn(value + n + vlen, " \t,")] != '\0') {
            param_err(cfg, NULL, param, "bad value \"%s\" for %s: expected one numerical address", value + n, param);
            return 1;
        }
        if (vlen >= 2 && value[n] == '[' && value[n + vlen - 1] == ']') {
            n++;
            vlen -= 2;
        }
        snprintf(addr, sizeof(addr), "%.*s", (int)vlen, value + n);
    } else {
        /* inet_interfaces: one address of the family, not loopback */
        const char *ifs = get(cfg, NULL, "inet_interfaces");
        char *copy = kt_strdup(ifs ? ifs : ""), *save = NULL;
        int found = 0, other = 0;
        for (char *tok = strtok_r(copy, ", \t\n", &save); tok; tok = strtok_r(NULL, ", \t\n", &save)) {
            size_t tl = strlen(tok);
            if (tok[0] == '[' && tl > 1 && tok[tl - 1] == ']') {
                tok[tl - 1] = '\0';
                tok++;
            }
            unsigned char buf[sizeof(struct in6_addr)];
            if (inet_pton(family, tok, buf) == 1) {
                if (found++ == 0)
                    snprintf(addr, sizeof(addr), "%s", tok);
            } else {
                other += inet_pton(family == AF_INET ? AF_INET6 : AF_INET, tok, buf) != 1;   /* a name, "all" */
            }
        }
        kt_free(copy);
        if (found != 1 || other)
            return 0;
        struct in_addr a4;
        struct in6_addr a6;
        if ((family == AF_INET && inet_pton(AF_INET, addr, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127)
            || (family == AF_INET6 && inet_pton(AF_INET6, addr, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6)))
            return 0;
    }
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) {
            param_err(cfg, NULL, param, "bad value \"%s\" for %s: expected a numerical IPv4 address", addr, param);
            return 1;
        }
        *len = sizeof(*sin);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        sin6->sin6_family = AF_INET6;
        if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) != 1) {
            param_err(cfg, NULL, param, "bad value \"%s\" for %s: expected a numerical IPv6 address", addr, param);
            return 1;
        }
        *len = sizeof(*sin6);
    }
    return 0;
}

/* The outbound client: smtp_* parameters of main.cf (Postfix smtp(8)), with smtp_tls_policy_maps. */
static int smtp_settings(struct runtime_private *rp, const struct kt_config *cfg, struct kt_smtp_settings *sm)
{
    char err[512];
    const char *level_name = get(cfg, NULL, "smtp_tls_security_level");
    int level = kt_smtp_tls_level_parse(level_name);
    if (smtp_sasl_settings(rp, cfg, sm))
        return 1;

    sm->helo_name = get(cfg, NULL, "smtp_helo_name");
    sm->tls_servername = get(cfg, NULL, "smtp_tls_servername");
    sm->tls_loglevel = (int)kt_config_get_int(cfg, NULL, "smtp_tls_loglevel");
    sm->connect_timeout_s = kt_config_get_time(cfg, NULL, "smtp_connect_timeout");
    if (bind_setting(cfg, AF_INET, &sm->bind_addr4, &sm->bind_len4)
        | bind_setting(cfg, AF_INET6, &sm->bind_addr6, &sm->bind_len6))
        return 1;
    sm->bind_enforce = kt_config_get_bool(cfg, NULL, "smtp_bind_address_enforce") == 1;
    sm->command_timeout_s = 300;
    sm->data_done_timeout_s = sm->command_timeout_s;
    if (level < 0) {
        param_err(cfg, NULL, "smtp_tls_security_level",
                  "unsupported smtp_tls_security_level \"%s\" (none, may, encrypt, dane, dane-only, fingerprint, "
                  "verify, secure)", level_name);
        return 1;
    }
    sm->tls_level = level;
    const char *dns_level = get(cfg, NULL, "smtp_dns_support_level");
    sm->dns_support_level = !strcasecmp(dns_level, "dnssec")     ? KT_SMTP_DNS_DNSSEC
                            : !strcasecmp(dns_level, "disabled") ? KT_SMTP_DNS_DISABLED
                                                                 : KT_SMTP_DNS_ENABLED;
    struct kt_tls_policy_defaults def = {
        .security_level = level_name,
        .verify_cert_match = get(cfg, NULL, "smtp_tls_verify_cert_match"),
        .secure_cert_match = get(cfg, NULL, "smtp_tls_secure_cert_match"),
        .fingerprint_cert_match = get(cfg, NULL, "smtp_tls_fingerprint_cert_match"),
        .protocols = get(cfg, NULL, "smtp_tls_protocols"),
        .mandatory_protocols = get(cfg, NULL, "smtp_tls_mandatory_protocols"),
        .ciphers = get(cfg, NULL, "smtp_tls_ciphers"),
        .mandatory_ciphers = get(cfg, NULL, "smtp_tls_mandatory_ciphers"),
        .exclude_ciphers = get(cfg, NULL, "smtp_tls_exclude_ciphers"),
        .mandatory_exclude_ciphers = get(cfg, NULL, "smtp_tls_mandatory_exclude_ciphers"),
        .servername = sm->tls_servername,
        .fingerprint_digest = get(cfg, NULL, "smtp_tls_fingerprint_digest"),
        .high_cipherlist = get(cfg, NULL, "tls_high_cipherlist"),
        .medium_cipherlist = get(cfg, NULL, "tls_medium_cipherlist"),
        .low_cipherlist = get(cfg, NULL, "tls_low_cipherlist"),
    };
    struct kt_maps *maps = NULL;
    const char *pm = get(cfg, NULL, "smtp_tls_policy_maps");
    if (*pm && kt_maps_open(pm, KT_TABLE_MAP, &maps, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, "smtp_tls_policy_maps", "smtp_tls_policy_maps: %s", err);
        return 1;
    }
    if (kt_tls_policy_set_new(&def, maps, &rp->tls_policy, err, sizeof(err)) < 0) {
        kt_maps_free(maps);
        const char *about = !strncmp(err, "entry ", 6)                    ? "smtp_tls_policy_maps"
                            : !strncmp(err, "smtp_tls_fingerprint_digest", 27) ? "smtp_tls_fingerprint_digest"
                                                                           : "smtp_tls_security_level";
        param_err(cfg, NULL, about, "%s: %s", about, err);
        return 1;
    }
    sm->tls_policy = rp->tls_policy;
    if (kt_tls_policy_set_uses_dane(rp->tls_policy) && sm->dns_support_level != KT_SMTP_DNS_DNSSEC)
        kt_warn("smtp_tls_security_level or smtp_tls_policy_maps uses dane, but smtp_dns_support_level is not "
                "dnssec: dane is used as may, and dane-only defers");
    /* MTA-STS raises the level per destination: the client context must exist whatever the default */
    int sts = kt_config_get_bool(cfg, NULL, "ktrelay_mta_sts_enable") == 1;
    if (!kt_tls_policy_set_uses_tls(rp->tls_policy) && !sts)
        return 0;
    /* The context carries what every policy shares (trust anchors, kTLS); each connection sets its
     * policy's protocols and ciphers (kt_tls_policy_openssl) on its own SSL. */
    int mandatory = kt_tls_level_mandatory(level);
    struct kt_tls_client_params p = {
        .CAfile = get(cfg, NULL, "smtp_tls_CAfile"),
        .CApath = get(cfg, NULL, "smtp_tls_CApath"),
        .protocols = get(cfg, NULL, mandatory ? "smtp_tls_mandatory_protocols" : "smtp_tls_protocols"),
        .ciphers = get(cfg, NULL, mandatory ? "smtp_tls_mandatory_ciphers" : "smtp_tls_ciphers"),
        .loglevel = sm->tls_loglevel,
        .ktls = kt_config_get_bool(cfg, NULL, "tls_ktls_enable") == 1,
        .high_cipherlist = get(cfg, NULL, "tls_high_cipherlist"),
        .medium_cipherlist = get(cfg, NULL, "tls_medium_cipherlist"),
        .low_cipherlist = get(cfg, NULL, "tls_low_cipherlist"),
        .exclude_ciphers = get(cfg, NULL, mandatory ? "smtp_tls_mandatory_exclude_ciphers"
                                                    : "smtp_tls_exclude_ciphers"),
    };
    if (kt_tls_client_ctx_new(&p, &rp->smtp_ssl_ctx, err, sizeof(err)) < 0) {
        const char *about = strstr(err, "CA certificates") ? (p.CAfile[0] ? "smtp_tls_CAfile" : "smtp_tls_CApath")
                          : strstr(err, "TLS protocol") ? (mandatory ? "smtp_tls_mandatory_protocols"
                                                                     : "smtp_tls_protocols")
                          : strstr(err, "cipher") ? (mandatory ? "smtp_tls_mandatory_ciphers" : "smtp_tls_ciphers")
                          : "smtp_tls_security_level";
        param_err(cfg, NULL, about, "outbound TLS: %s", err);
        return 1;
    }
    /* MTA-STS trusts the WebPKI (RFC 8461 4.2): without smtp_tls_CAfile/CApath, the system's store */
    if (sts && !p.CAfile[0] && !p.CApath[0] && !SSL_CTX_set_default_verify_paths(rp->smtp_ssl_ctx)) {
        param_err(cfg, NULL, "ktrelay_mta_sts_enable", "outbound TLS: cannot load the system's CA certificates "
                  "for MTA-STS; set smtp_tls_CAfile");
        return 1;
    }
    sm->ssl_ctx = rp->smtp_ssl_ctx;
    return 0;
}

/* Transport selection (Postfix trivial-rewrite(8)): main.cf values only, shared by every smtpd service
 * (which must leave recipients of a non-Maildir transport to the queue) and the queue manager. */
static int transport_settings(struct runtime_private *rp, const struct kt_config *cfg)
{
    char err[600];
    struct kt_transport_config tc = {
        .local_transport = get(cfg, NULL, "local_transport"),
        .virtual_transport = get(cfg, NULL, "virtual_transport"),
        .relay_transport = get(cfg, NULL, "relay_transport"),
        .default_transport = get(cfg, NULL, "default_transport"),
        .relayhost = get(cfg, NULL, "relayhost"),
        .transport_maps = get(cfg, NULL, "transport_maps"),
        .mailbox_transport = get(cfg, NULL, "mailbox_transport"),
    };
    if (kt_transport_new(&tc, &rp->transport, err, sizeof(err)) < 0) {
        param_err(cfg, NULL, NULL, "%s", err);
        return 1;
    }
    return 0;
}

/* The queue manager: main.cf values only, as Postfix's qmgr(8) reads them. */
static int qmgr_settings(struct runtime_private *rp, const struct kt_config *cfg, struct kt_qmgr_settings *qs)
{
    int errors = 0;

    qs->queue_directory = get(cfg, NULL, "queue_directory");
    qs->myhostname = get(cfg, NULL, "myhostname");
    qs->relayhost = get(cfg, NULL, "relayhost");
    qs->dns_servers = get(cfg, NULL, "ktrelay_dns_servers");
    qs->minimal_backoff_time = kt_config_get_time(cfg, NULL, "minimal_backoff_time");
    qs->maximal_backoff_time = kt_config_get_time(cfg, NULL, "maximal_backoff_time");
    qs->queue_run_delay = kt_config_get_time(cfg, NULL, "queue_run_delay");
    qs->maximal_queue_lifetime = kt_config_get_time(cfg, NULL, "maximal_queue_lifetime");
    qs->bounce_queue_lifetime = kt_config_get_time(cfg, NULL, "bounce_queue_lifetime");
    qs->delay_warning_time = kt_config_get_time(cfg, NULL, "delay_warning_time");
    qs->bounce_size_limit = kt_config_get_int(cfg, NULL, "bounce_size_limit");
    qs->smtputf8_enable = kt_config_get_bool(cfg, NULL, "smtputf8_enable") == 1;
    /* Postfix's default "no" converts 8-bit MIME parts to quoted-printable for a next hop without 8BITMIME;
     * "yes" sends the body as it is */
    qs->mime_output_conversion = kt_config_get_bool(cfg, NULL, "disable_mime_output_conversion") != 1;
    if (qs->bounce_size_limit < 1) {
        param_err(cfg, NULL, "bounce_size_limit", "bounce_size_limit: must be at least 1 (Postfix)");
        errors++;
    }
    qs->message_size_limit = kt_config_get_int(cfg, NULL, "message_size_limit");
    if (qs->minimal_backoff_time < 1)
        qs->minimal_backoff_time = 1;
    if (qs->maximal_backoff_time < qs->minimal_backoff_time)
        qs->maximal_backoff_time = qs->minimal_backoff_time;
    if (qs->queue_run_delay < 1)
        qs->queue_run_delay = 1;
    long long conc = kt_config_get_int(cfg, NULL, "default_destination_concurrency_limit");
    qs->destination_concurrency_limit = conc > 0 ? (unsigned)(conc > 10000 ? 10000 : conc) : 20;
    long long init = kt_config_get_int(cfg, NULL, "initial_destination_concurrency");
    qs->initial_destination_concurrency = init > 0 ? (unsigned)init : 5;
    if (qs->initial_destination_concurrency > qs->destination_concurrency_limit)
        qs->initial_destination_concurrency = qs->destination_concurrency_limit;
    qs->transport = rp->transport;
    qs->resolver = service_resolver(rp, cfg, NULL, &errors);
    qs->mta_sts_enable = kt_config_get_bool(cfg, NULL, "ktrelay_mta_sts_enable") == 1;
    qs->mta_sts_cache_directory = get(cfg, NULL, "ktrelay_mta_sts_cache_directory");
    qs->mta_sts_CAfile = get(cfg, NULL, "ktrelay_mta_sts_CAfile");
    qs->mta_sts_fetch_timeout = kt_config_get_time(cfg, NULL, "ktrelay_mta_sts_fetch_timeout");
    if (qs->mta_sts_fetch_timeout < 1)
        qs->mta_sts_fetch_timeout = 1;
    qs->tlsrpt_enable = kt_config_get_bool(cfg, NULL, "ktrelay_tlsrpt_enable") == 1;
    qs->tlsrpt_directory = get(cfg, NULL, "ktrelay_tlsrpt_directory");
    qs->tlsrpt_organization_name = get(cfg, NULL, "ktrelay_tlsrpt_organization_name");
    qs->tlsrpt_contact_info = get(cfg, NULL, "ktrelay_tlsrpt_contact_info");
    if (qs->mta_sts_enable && qs->mta_sts_cache_directory[0] != '/') {
        param_err(cfg, NULL, "ktrelay_mta_sts_cache_directory", "ktrelay_mta_sts_cache_directory must be an "
                  "absolute path, not \"%s\"", qs->mta_sts_cache_directory);
        errors++;
    }
    if (qs->mta_sts_enable && qs->mta_sts_CAfile[0] && access(qs->mta_sts_CAfile, R_OK) < 0) {
        param_err(cfg, NULL, "ktrelay_mta_sts_CAfile", "ktrelay_mta_sts_CAfile: cannot read %s: %s",
                  qs->mta_sts_CAfile, strerror(errno));
        errors++;
    }
    if (qs->tlsrpt_enable && qs->tlsrpt_directory[0] != '/') {
        param_err(cfg, NULL, "ktrelay_tlsrpt_directory", "ktrelay_tlsrpt_directory must be an absolute path, "
                  "not \"%s\"", qs->tlsrpt_directory);
        errors++;
    }
    qs->rewrite = service_rewrite(rp, cfg, NULL, qs->resolver, &errors);
    qs->content_filter = get(cfg, NULL, "content_filter");
    /* non_smtpd_milters: mail from ktrelay sendmail, through the pickup (as Postfix's cleanup for pickup) */
    struct kt_milter_set *nsm = NULL;
    errors += milter_list(rp, cfg, NULL, "non_smtpd_milters", &nsm);
    qs->non_smtpd_milters = nsm;
    /* main.cf's receive_override_options = no_milters turns them off for the pickup too, as Postfix's
     * pickup passes it to cleanup (checked all the same) */
    const char *ro = get(cfg, NULL, "receive_override_options");
    for (const char *w = ro + strspn(ro, ", \t"); *w; w += strspn(w, ", \t")) {
        size_t n = strcspn(w, ", \t");
        if (n == strlen("no_milters") && !strncasecmp(w, "no_milters", n))
            qs->non_smtpd_milters = NULL;
        w += n;
    }
    qs->milter_daemon_name = get(cfg, NULL, "milter_macro_daemon_name");
    qs->milter_macro_v = get(cfg, NULL, "milter_macro_v");
    errors += smtp_settings(rp, cfg, &qs->smtp);
    size_t n_own = 0;
    errors += own_list(rp, cfg, "inet_interfaces", &n_own);
    errors += own_list(rp, cfg, "proxy_interfaces", &n_own);
    qs->own_addrs = rp->own_addrs;
    qs->n_own_addrs = n_own;
    /* the LMTP client: plaintext only (lmtp_tls_security_level takes none), its own names and timeouts */
    qs->lmtp.helo_name = get(cfg, NULL, "lmtp_lhlo_name");
    qs->lmtp.tls_level = KT_SMTP_TLS_NONE;
    qs->lmtp.tls_servername = "";
    qs->lmtp.connect_timeout_s = kt_config_get_time(cfg, NULL, "lmtp_connect_timeout");
    qs->lmtp.command_timeout_s = 300;
    qs->lmtp.data_done_timeout_s = kt_config_get_time(cfg, NULL, "lmtp_data_done_timeout");
    /* Postfix's lmtp_* defaults of these follow smtp's (or default_destination_rate_delay) */
    qs->lmtp.conn_cache_time_s = qs->smtp.conn_cache_time_s;
    qs->lmtp.reuse_count_limit = qs->smtp.reuse_count_limit;
    qs->lmtp.randomize_addresses = qs->smtp.randomize_addresses;
    qs->lmtp.rate_delay_s = kt_config_get_time(cfg, NULL, "default_destination_rate_delay");
    long long lc = kt_config_get_int(cfg, NULL, "lmtp_destination_concurrency_limit");
    qs->lmtp_concurrency_limit = lc > 0 ? (unsigned)(lc > 10000 ? 10000 : lc) : qs->destination_concurrency_limit;
    long long lr = kt_config_get_int(cfg, NULL, "lmtp_destination_recipient_limit");
    qs->lmtp_recipient_limit = lr > 0 ? (unsigned)(lr > 1000000 ? 1000000 : lr) : 0;   /* 0: no limit, as smtp's */
    return errors;
}

static void runtime_free(struct runtime_private *rp)
{
    for (size_t i = 0; i < rp->n_objs; i++) {
        if (rp->objs[i].kind == 0)
            kt_resolver_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 1)
            kt_tls_server_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 2)
            kt_net_list_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 3)
            kt_policy_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 5)
            kt_cleanup_checks_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 6)
            kt_rewrite_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 4)
            kt_sasl_server_free(rp->objs[i].obj);
        else if (rp->objs[i].kind == 7)
            kt_milter_set_free(rp->objs[i].obj);
        kt_free(rp->objs[i].key);
    }
    kt_free(rp->objs);
    kt_transport_free(rp->transport);
    kt_maps_free(rp->smtp_sasl_maps);
    kt_free(rp->own_addrs);
    SSL_CTX_free(rp->smtp_ssl_ctx);
    kt_tls_policy_set_free(rp->tls_policy);
    kt_free(rp->pub.services);
    kt_config_free(rp->pub.cfg);
    kt_free(rp);
}

size_t kt_settings_line_length_limit(const struct kt_config *cfg, const struct kt_service *svc)
{
    long long v = kt_config_get_int(cfg, svc, "line_length_limit");
    return v < 512 ? 512 : (size_t)v;   /* RFC 5321 4.5.3.1.4: a command line is at most 512 octets */
}

long long kt_settings_recipient_limit(const struct kt_config *cfg, const struct kt_service *svc)
{
    long long v = kt_config_get_int(cfg, svc, "smtpd_recipient_limit");
    return v <= 0 ? 1000000 : v;
}

int kt_settings_rewriter(const struct kt_config *cfg, struct kt_resolver **resolver, struct kt_rewrite **rw)
{
    struct runtime_private rp = { 0 };
    int errors = 0;
    *resolver = service_resolver(&rp, cfg, NULL, &errors);
    *rw = service_rewrite(&rp, cfg, NULL, *resolver, &errors);
    for (size_t i = 0; i < rp.n_objs; i++)
        kt_free(rp.objs[i].key);       /* the objects themselves go to the caller */
    kt_free(rp.objs);
    if (errors) {
        kt_rewrite_free(*rw);
        kt_resolver_free(*resolver);
        *rw = NULL;
        *resolver = NULL;
        return -EINVAL;
    }
    return 0;
}

/* syslog_facility, syslog_name, maillog_file and maillog_file_prefixes as
 * Postfix checks them; ktrelay_metrics_address. Returns the error count. */
static int log_settings(struct kt_config *cfg, struct kt_runtime *rt)
{
    int errors = 0;
    const char *fac = get(cfg, NULL, "syslog_facility");
    rt->syslog_facility = kt_log_facility(fac);
    if (rt->syslog_facility < 0) {
        param_err(cfg, NULL, "syslog_facility", "syslog_facility: unknown facility \"%s\" (mail, daemon, user, local0 ... local7, ...)", fac);
        errors++;
    }
    rt->syslog_name = get(cfg, NULL, "syslog_name");
    if (!rt->syslog_name[0] || strchr(rt->syslog_name, '[') || strchr(rt->syslog_name, ':')
        || strchr(rt->syslog_name, ' ')) {
        param_err(cfg, NULL, "syslog_name", "syslog_name: \"%s\" must be a non-empty name without spaces, '[' or ':'", rt->syslog_name);
        errors++;
    }
    rt->maillog_file = get(cfg, NULL, "maillog_file");
    const char *prefixes = get(cfg, NULL, "maillog_file_prefixes");
    if (rt->maillog_file[0] && rt->maillog_file[0] != '/') {
        param_err(cfg, NULL, "maillog_file", "maillog_file: \"%s\" must be an absolute path", rt->maillog_file);
        errors++;
    } else if (rt->maillog_file[0] && !kt_log_prefix_allowed(rt->maillog_file, prefixes)) {
        param_err(cfg, NULL, "maillog_file", "maillog_file value \"%s\" does not match any prefix in maillog_file_prefixes (%s)",
               rt->maillog_file, prefixes);
        errors++;
    }
    rt->myhostname = get(cfg, NULL, "myhostname");
    rt->metrics_address = get(cfg, NULL, "ktrelay_metrics_address");
    if (rt->metrics_address[0]) {
        char host[256], err[300];
        unsigned port;
        if (kt_metrics_parse_address(rt->metrics_address, host, sizeof(host), &port, err, sizeof(err)) < 0) {
            param_err(cfg, NULL, "ktrelay_metrics_address", "ktrelay_metrics_address: %s", err);
            errors++;
        }
    }
    return errors;
}

/* run's master creates queue_directory at start, one level only, as Postfix's
 * postfix-script does; a path that is not a directory, or whose parent does
 * not exist, would stop run, so the same build refuses it here and
 * check-config says what run would. Returns the number of errors (0 or 1). */
static int queue_directory_check(const struct kt_config *cfg, const char *q)
{
    struct stat st;
    if (stat(q, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return 0;
        param_err(cfg, NULL, "queue_directory", "queue_directory %s is not a directory", q);
        return 1;
    }
    size_t len = strlen(q);
    while (len > 1 && q[len - 1] == '/')
        len--;
    while (len > 0 && q[len - 1] != '/')
        len--;
    while (len > 1 && q[len - 1] == '/')
        len--;
    char *parent = len ? kt_strndup(q, len) : kt_strdup(".");
    int bad = stat(parent, &st) < 0 || !S_ISDIR(st.st_mode);
    if (bad)
        param_err(cfg, NULL, "queue_directory", "queue_directory %s cannot be created: its parent %s is not an "
                  "existing directory", q, parent);
    kt_free(parent);
    return bad;
}

int kt_runtime_new(struct kt_config *cfg, struct kt_runtime **out)
{
    struct runtime_private *rp = kt_calloc(1, sizeof(*rp));
    struct kt_runtime *rt = &rp->pub;
    int errors = 0;

    atomic_init(&rt->refs, 1);
    rt->cfg = cfg;
    rt->n_services = kt_config_service_count(cfg);
    rt->services = kt_calloc(rt->n_services ? rt->n_services : 1, sizeof(*rt->services));
    errors += transport_settings(rp, cfg);
    for (size_t i = 0; i < rt->n_services; i++)
        errors += service_settings(rp, cfg, kt_config_service(cfg, i), &rt->services[i]);
    long long workers = kt_config_get_int(cfg, NULL, "ktrelay_worker_threads");
    if (workers <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        workers = n > 0 ? n : 1;
    }
    rt->worker_threads = (unsigned)(workers > 256 ? 256 : workers);
    rt->queue_directory = get(cfg, NULL, "queue_directory");
    rt->data_directory = get(cfg, NULL, "data_directory");
    if (rt->data_directory[0] != '/') {     /* run's instance lock needs it; check-config says so too */
        param_err(cfg, NULL, "data_directory", "data_directory must be an absolute path (it holds the instance "
                  "lock), not \"%s\"", rt->data_directory);
        errors++;
    }
    errors += queue_directory_check(cfg, rt->queue_directory);
    errors += qmgr_settings(rp, cfg, &rt->qmgr);
    errors += dns_servers_check(cfg);
    errors += log_settings(cfg, rt);
    if (errors) {
        rp->pub.cfg = NULL;   /* the caller still owns cfg on failure */
        runtime_free(rp);
        return -EINVAL;
    }
    *out = rt;
    return 0;
}

struct kt_runtime *kt_runtime_ref(struct kt_runtime *rt)
{
    atomic_fetch_add(&rt->refs, 1);
    return rt;
}

void kt_runtime_unref(struct kt_runtime *rt)
{
    if (!rt)
        return;
    if (atomic_fetch_sub(&rt->refs, 1) == 1)
        runtime_free((struct runtime_private *)rt);
}
