/* Typed, per-service view of the configuration, built once per (re)load and
 * shared read-only by all workers. A reload builds a new runtime; sessions keep
 * the one they started with (reference counted). */
#ifndef KTRELAY_SETTINGS_H
#define KTRELAY_SETTINGS_H

#include <stdatomic.h>
#include <stddef.h>
#include <sys/socket.h>

#include <openssl/ssl.h>

struct kt_config;
struct kt_service;
struct kt_resolver;
struct kt_tls_server;
struct kt_net_list;
struct kt_policy;
struct kt_sasl_server;
struct kt_maps;
struct kt_transport;
struct kt_rewrite;

/* receive_override_options bits (Postfix's names) */
enum {
    KT_RO_NO_UNKNOWN_RECIPIENT_CHECKS = 1u << 0,
    KT_RO_NO_ADDRESS_MAPPINGS = 1u << 1,      /* no canonical mapping, no virtual alias expansion */
    KT_RO_NO_HEADER_BODY_CHECKS = 1u << 2,
    KT_RO_NO_MILTERS = 1u << 3,
};
struct kt_milter_set;

enum kt_tls_level { KT_TLS_NONE, KT_TLS_MAY, KT_TLS_ENCRYPT };
/* smtpd_forbid_bare_newline (Postfix 3.9). Every value stores CRLF and ends data only at CRLF.CRLF. */
enum kt_bare_newline { KT_BARE_NEWLINE_NORMALIZE, KT_BARE_NEWLINE_REJECT, KT_BARE_NEWLINE_NO };

/* smtpd_discard_ehlo_keywords: EHLO keywords not announced (bits). KT_EHLO_DSN also refuses the DSN
 * parameters ("501 5.7.1 DSN support is disabled") and KT_EHLO_SMTPUTF8 the SMTPUTF8 one, as in Postfix. */
enum {
    KT_EHLO_PIPELINING = 1 << 0, KT_EHLO_SIZE = 1 << 1, KT_EHLO_VRFY = 1 << 2, KT_EHLO_STARTTLS = 1 << 3,
    KT_EHLO_AUTH = 1 << 4, KT_EHLO_ENHANCEDSTATUSCODES = 1 << 5, KT_EHLO_8BITMIME = 1 << 6, KT_EHLO_DSN = 1 << 7,
    KT_EHLO_SMTPUTF8 = 1 << 8, KT_EHLO_CHUNKING = 1 << 9, KT_EHLO_ETRN = 1 << 10, KT_EHLO_SILENT = 1 << 11,
};

struct kt_cleanup_checks;

struct kt_smtpd_settings {
    const struct kt_service *service;
    const char *myhostname;
    const char *banner;              /* expanded smtpd_banner */
    long long message_size_limit;    /* 0 = unlimited */
    long long recipient_limit;
    long long recipient_overshoot_limit; /* excess recipients that are not counted as errors */
    int helo_required;               /* smtpd_helo_required: MAIL needs HELO/EHLO first */
    int disable_vrfy;                /* disable_vrfy_command: VRFY gets 502, EHLO omits it */
    unsigned ehlo_discard;           /* smtpd_discard_ehlo_keywords: KT_EHLO_* bits */
    int smtputf8_enable;             /* smtputf8_enable: no = SMTPUTF8 neither announced nor accepted */
    long long timeout_s;             /* smtpd_timeout */
    int per_request_deadline;        /* smtpd_per_request_deadline: timeout_s bounds a whole request */
    long long min_data_rate;         /* smtpd_min_data_rate, bytes/s: body bytes that extend the deadline */
    long long starttls_timeout_s;    /* handshake deadline */
    long long hard_error_limit;
    long long soft_error_limit;
    long long junk_command_limit;    /* smtpd_junk_command_limit: HELO, EHLO, RSET, NOOP, VRFY, ETRN past it
                                      * each count as an error, as in Postfix */
    long long error_sleep_ms;
    size_t line_length_limit;        /* command line bound */
    enum kt_bare_newline bare_newline;            /* smtpd_forbid_bare_newline */
    struct kt_net_list *bare_newline_exclusions;  /* clients exempt from reject (may be mynetworks) */
    int bare_newline_reject_code;                 /* smtpd_forbid_bare_newline_reject_code */
    enum kt_tls_level tls_level;
    int wrappermode;                 /* implicit TLS from the first byte */
    int tls_loglevel;
    int tls_received_header;
    int ktls_rx_tls13;               /* install TLS 1.3 RX keys ourselves */
    const char *tls_fingerprint_digest;  /* smtpd_tls_fingerprint_digest: client certificate fingerprints */
    struct kt_tls_server *tls;       /* NULL when the level is none and not wrappermode */
    struct kt_resolver *resolver;
    const struct kt_transport *transport;  /* transport_maps and *_transport (main.cf), owned by the runtime */
    struct kt_net_list *mynetworks;
    struct kt_policy *policy;        /* smtpd_*_restrictions and address rewriting */
    struct kt_rewrite *rewrite;      /* canonical and virtual alias maps (cleanup's rewriting) */
    const char *content_filter;      /* "transport:nexthop" for every message received here; "" = none */
    unsigned receive_override;       /* KT_RO_* from receive_override_options */
    /* SASL AUTH */
    int sasl_enable;                 /* smtpd_sasl_auth_enable and a backend */
    unsigned sasl_mechs;             /* KT_MECH_* allowed without TLS (smtpd_sasl_security_options) */
    unsigned sasl_tls_mechs;         /* ... with TLS (smtpd_sasl_tls_security_options) */
    int tls_auth_only;               /* smtpd_tls_auth_only */
    int broken_sasl_auth_clients;    /* also announce "AUTH=..." */
    int sasl_authenticated_header;   /* login name in the Received: header */
    const char *sasl_local_domain;   /* realm appended to a login without '@' */
    struct kt_sasl_server *sasl;     /* NULL unless sasl_enable */
    /* anvil(8) limits per client address; 0 = no limit */
    long long conn_count_limit;      /* smtpd_client_connection_count_limit */
    long long conn_rate_limit;       /* smtpd_client_connection_rate_limit */
    long long msg_rate_limit;        /* smtpd_client_message_rate_limit */
    long long rcpt_rate_limit;       /* smtpd_client_recipient_rate_limit */
    long long newtls_rate_limit;     /* smtpd_client_new_tls_session_rate_limit */
    long long auth_rate_limit;       /* smtpd_client_auth_rate_limit */
    long long anvil_unit_s;          /* anvil_rate_time_unit */
    struct kt_net_list *limit_exceptions; /* smtpd_client_event_limit_exceptions */
    int upstream_proxy;              /* smtpd_upstream_proxy_protocol = haproxy */
    int peername_lookup;             /* smtpd_peername_lookup: reverse DNS of every client */
    long long upstream_proxy_timeout_s; /* smtpd_upstream_proxy_timeout */
    struct kt_cleanup_checks *checks;    /* header_checks, mime_header_checks, nested_header_checks,
                                            body_checks (smtpd/cleanup.h); NULL when all are empty */
    int checks_need_queue;           /* some check can HOLD, REDIRECT or FILTER: every message is queued */
    struct kt_milter_set *milters;   /* smtpd_milters with the milter_* parameters; NULL = none */
    const char *milter_daemon_name;  /* milter_macro_daemon_name: {daemon_name} */
    const char *milter_macro_v;      /* milter_macro_v: v */
};

/* smtp_dns_support_level ("" is enabled). */
enum { KT_SMTP_DNS_ENABLED, KT_SMTP_DNS_DISABLED, KT_SMTP_DNS_DNSSEC };

struct kt_tls_policy_set;

/* Outbound SMTP client (Postfix smtp(8) parameters, main.cf only). */
struct kt_smtp_settings {
    const char *helo_name;           /* smtp_helo_name, expanded */
    int tls_level;                   /* enum kt_smtp_tls (queue/smtp_client.h): smtp_tls_security_level */
    int tls_loglevel;                /* smtp_tls_loglevel */
    SSL_CTX *ssl_ctx;                /* client context, owned by the runtime; NULL at level none */
    const char *tls_servername;      /* smtp_tls_servername: "", "hostname", "nexthop" or a fixed name */
    struct kt_tls_policy_set *tls_policy;   /* smtp_tls_policy_maps over the smtp_tls_* defaults; owned by the runtime */
    int dns_support_level;           /* smtp_dns_support_level: KT_SMTP_DNS_* */
    long long connect_timeout_s;     /* smtp_connect_timeout */
    long long command_timeout_s;     /* per reply; 300 s, Postfix's smtp_*_timeout defaults */
    /* AUTH towards the next hop (Postfix smtp(8) SASL) */
    int sasl_auth_enable;            /* smtp_sasl_auth_enable */
    const struct kt_maps *sasl_password_maps;  /* smtp_sasl_password_maps; owned by the runtime, NULL if off */
    unsigned sasl_mechs;             /* KT_SMTP_MECH_*: smtp_sasl_security_options and the filter */
    unsigned sasl_tls_mechs;         /* smtp_sasl_tls_security_options and the filter */
    int sasl_soft_bounce;            /* smtp_sasl_auth_soft_bounce */
    int sender_dependent_auth;       /* smtp_sender_dependent_authentication */
    int randomize_addresses;         /* smtp_randomize_addresses */
    unsigned recipient_limit;        /* smtp_destination_recipient_limit; 0 = none */
    long long rate_delay_s;          /* smtp_destination_rate_delay; 0 = none */
    long long conn_cache_time_s;     /* smtp_connection_cache_time_limit */
    unsigned reuse_count_limit;      /* smtp_connection_reuse_count_limit; 0 = none */
    long long data_done_timeout_s;   /* the reply(s) to the end of data (lmtp_data_done_timeout) */
    /* smtp_bind_address, smtp_bind_address6 (or inet_interfaces' one non-loopback address of the family):
     * the source address of outbound connections of that family; len 0 = the kernel's choice */
    struct sockaddr_storage bind_addr4, bind_addr6;
    socklen_t bind_len4, bind_len6;
    int bind_enforce;                /* smtp_bind_address_enforce: a failed bind defers (else: warning, unbound) */
};

/* Queue manager (Postfix qmgr(8) parameters, main.cf only). Times in seconds. */
struct kt_qmgr_settings {
    const char *queue_directory;
    const char *myhostname;          /* Maildir file names and bounces */
    const char *relayhost;           /* "" = direct delivery */
    const char *dns_servers;         /* ktrelay_dns_servers; read at start only */
    long long minimal_backoff_time;  /* >= 1 */
    long long maximal_backoff_time;  /* >= minimal_backoff_time */
    long long queue_run_delay;       /* >= 1 */
    long long maximal_queue_lifetime;
    long long bounce_queue_lifetime;
    long long delay_warning_time;    /* 0 = no delay warnings */
    long long bounce_size_limit;     /* bytes of the original returned with a failure notice, else headers */
    int smtputf8_enable;             /* no: SMTPUTF8 is never sent on and never required of a next hop */
    int mime_output_conversion;      /* disable_mime_output_conversion = no: 8BITMIME to 7BIT for a next
                                      * hop without 8BITMIME */
    unsigned destination_concurrency_limit;  /* default_destination_concurrency_limit, > 0 */
    unsigned initial_destination_concurrency;  /* 1 .. destination_concurrency_limit */
    long long message_size_limit;    /* for maildrop pickup; 0 = none */
    const struct kt_transport *transport;  /* transport_maps, *_transport, relayhost; owned by the runtime */
    const struct kt_resolver *resolver;  /* address classes (main.cf values); NULL if it failed */
    /* this host's addresses for the "loops back to myself" check: inet_interfaces (all: every
     * interface's), and proxy_interfaces; owned by the runtime */
    const struct sockaddr_storage *own_addrs;
    size_t n_own_addrs;
    const struct kt_rewrite *rewrite;    /* main.cf's canonical and virtual alias maps (local submissions) */
    const char *content_filter;          /* main.cf's content_filter, for local submissions; "" = none */
    /* non_smtpd_milters with main.cf's milter_* parameters, for local submissions (the pickup); NULL = none;
     * owned by the runtime */
    const struct kt_milter_set *non_smtpd_milters;
    const char *milter_daemon_name;      /* milter_macro_daemon_name: {daemon_name} */
    const char *milter_macro_v;          /* milter_macro_v: v */
    struct kt_smtp_settings smtp;
    /* MTA-STS (RFC 8461) and TLS reporting (RFC 8460) */
    int mta_sts_enable;              /* ktrelay_mta_sts_enable */
    const char *mta_sts_cache_directory;  /* ktrelay_mta_sts_cache_directory, absolute */
    const char *mta_sts_CAfile;      /* ktrelay_mta_sts_CAfile: "" = the system's CA store */
    long long mta_sts_fetch_timeout; /* ktrelay_mta_sts_fetch_timeout, seconds, >= 1 */
    int tlsrpt_enable;               /* ktrelay_tlsrpt_enable */
    const char *tlsrpt_directory;    /* ktrelay_tlsrpt_directory, absolute */
    const char *tlsrpt_organization_name, *tlsrpt_contact_info;
    struct kt_smtp_settings lmtp;    /* the LMTP client (Postfix lmtp(8)): lmtp_lhlo_name, lmtp_*_timeout */
    unsigned lmtp_concurrency_limit; /* lmtp_destination_concurrency_limit, > 0 */
    unsigned lmtp_recipient_limit;   /* lmtp_destination_recipient_limit: recipients per transaction; 0 = none */
};

struct kt_runtime {
    atomic_int refs;
    struct kt_config *cfg;
    size_t n_services;
    struct kt_smtpd_settings *services;  /* same order as kt_config_service() */
    unsigned worker_threads;
    const char *queue_directory;
    const char *data_directory;          /* ktrelay's own files: the instance lock (master.lock) */
    struct kt_qmgr_settings qmgr;        /* queue manager and outbound client */
    /* logging (core/log.h): checked here so that check-config refuses what run would */
    const char *syslog_name;         /* syslog_name */
    int syslog_facility;             /* LOG_MAIL, ... from syslog_facility */
    const char *maillog_file;        /* "" = syslog; else within maillog_file_prefixes */
    const char *myhostname;          /* for maillog_file lines */
    const char *metrics_address;     /* ktrelay_metrics_address: "" = off, else host:port */
};

/* Build from a loaded configuration (takes ownership of cfg on success):
 * every component's settings (smtpd services, queue manager, outbound
 * client), with their tables, TLS contexts and resolvers. check-config and
 * run both go through here. Returns 0 or -EINVAL after logging every problem. */
int kt_runtime_new(struct kt_config *cfg, struct kt_runtime **out);
struct kt_runtime *kt_runtime_ref(struct kt_runtime *rt);
/* main.cf's resolver and address rewriter alone, built as the queue manager's are, for a local submission
 * that queues directly (ktrelay sendmail run by root). 0, or -EINVAL after logging the problems. The
 * caller frees both (kt_rewrite_free first). */
int kt_settings_rewriter(const struct kt_config *cfg, struct kt_resolver **resolver, struct kt_rewrite **rw);
void kt_runtime_unref(struct kt_runtime *rt);
/* smtpd's command-line bound for svc (NULL: main.cf's): line_length_limit in bytes without the CRLF, never
 * below RFC 5321's 512 (4.5.3.1.4). One rule for smtpd and `sendmail -bs`. */
size_t kt_settings_line_length_limit(const struct kt_config *cfg, const struct kt_service *svc);
/* smtpd_recipient_limit for svc (NULL: main.cf's): recipients per transaction; 0 or less means 1,000,000. */
long long kt_settings_recipient_limit(const struct kt_config *cfg, const struct kt_service *svc);

#endif
