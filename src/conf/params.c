/* Parameter table: every main.cf name ktrelay knows, with its type, its
 * Postfix default (raw, $name references unexpanded) and whether ktrelay
 * acts on it. Names of Postfix features ktrelay lacks are listed too, so a
 * Postfix main.cf loads with a warning instead of a misleading "unknown".
 * The table is kept in strcmp order for binary search (a unit test checks). */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kt_build.h"
#include "conf/config.h"
#include "core/table.h"

static int check_enum(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_enum_list(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_smtpd_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_smtp_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_lmtp_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_dns_support_level(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_grade(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_protocols(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_maps(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_parent_matches(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_filter(const struct kt_param_def *p, const char *value, char *msg, size_t len);
static int check_forward_path(const struct kt_param_def *p, const char *value, char *msg, size_t len);

#define S(n, d)    { #n, KT_PARAM_STRING, d, 0, 1, NULL, NULL, 0, 0 }
#define L(n, d)    { #n, KT_PARAM_LIST, d, 0, 1, NULL, NULL, 0, 0 }
#define B(n, d)    { #n, KT_PARAM_BOOL, d, 0, 1, NULL, NULL, 0, 0 }
#define I(n, d)    { #n, KT_PARAM_INT, d, 0, 1, NULL, NULL, 0, 0 }
#define Z(n, d)    { #n, KT_PARAM_SIZE, d, 0, 1, NULL, NULL, 0, 0 }
#define T(n, d, u) { #n, KT_PARAM_TIME, d, u, 1, NULL, NULL, 0, 0 }
/* Checked values: one of an enumeration, a list of them, or a special check. */
#define E(n, d, v)  { #n, KT_PARAM_STRING, d, 0, 1, v, check_enum, 0, 0 }
#define EL(n, d, v) { #n, KT_PARAM_LIST, d, 0, 1, v, check_enum_list, 0, 0 }
#define C(n, d, f)  { #n, KT_PARAM_STRING, d, 0, 1, NULL, f, 0, 0 }
#define M(n, d)     { #n, KT_PARAM_LIST, d, 0, 1, NULL, check_maps, 0, 0 }
#define G(n, d)     { #n, KT_PARAM_STRING, d, 0, 1, "high|medium|low", check_grade, 0, 0 }
#define P(n, d)     { #n, KT_PARAM_LIST, d, 0, 1, NULL, check_protocols, 0, 0 }
/* Accepted and ignored: typed as strings since nothing reads them. N: cosmetic
 * (a warning); X: it changes who may send, what is filtered or where mail goes,
 * so a non-empty value fails the configuration (unless ktrelay_ignore_unimplemented). */
#define N(n)       { #n, KT_PARAM_STRING, "", 0, 0, NULL, NULL, 0, 0 }
#define X(n)       { #n, KT_PARAM_STRING, "", 0, 0, NULL, NULL, 1, 0 }

#define SASL_OPTIONS "noanonymous|noplaintext|noactive|nodictionary|mutual_auth|forward_secrecy"

static const struct kt_param_def params[] = {
    N(alias_database),
    M(alias_maps, "hash:/etc/aliases"),
    N(allow_mail_to_commands),
    N(allow_mail_to_files),
    B(allow_percent_hack, "yes"),
    X(always_bcc),
    T(anvil_rate_time_unit, "60s", 's'),
    B(append_at_myorigin, "yes"),
    B(append_dot_mydomain, "no"),
    N(biff),
    M(body_checks, ""),
    Z(body_checks_size_limit, "51200"),
    T(bounce_queue_lifetime, "5d", 'd'),
    I(bounce_size_limit, "50000"),
    B(broken_sasl_auth_clients, "no"),
    EL(canonical_classes, "envelope_sender, envelope_recipient, header_sender, header_recipient",
       "envelope_sender|envelope_recipient|header_sender|header_recipient"),
    M(canonical_maps, ""),
    N(command_directory),
    N(compatibility_level),
    C(content_filter, "", check_filter),
    N(daemon_directory),
    S(data_directory, "/var/lib/ktrelay"),
    N(debug_peer_level),
    N(debug_peer_list),
    I(default_destination_concurrency_limit, "20"),
    T(default_destination_rate_delay, "0s", 's'),
    I(default_destination_recipient_limit, "50"),
    S(default_privs, "nobody"),
    I(default_process_limit, "100"),
    S(default_transport, "smtp"),
    T(delay_warning_time, "0h", 'h'),
    N(disable_dns_lookups),
    B(disable_mime_output_conversion, "no"),
    B(disable_vrfy_command, "no"),
    X(fallback_transport),
    /* a local(8) template, kept as written (see check_forward_path) */
    { "forward_path", KT_PARAM_LIST, "$home/.forward${recipient_delimiter}${extension}, $home/.forward", 0, 1,
      NULL, check_forward_path, 0, 1 },
    M(header_checks, ""),
    Z(header_size_limit, "102400"),
    S(home_mailbox, "Maildir/"),
    N(html_directory),
    L(inet_interfaces, "all"),
    EL(inet_protocols, "all", "all|ipv4|ipv6"),
    I(initial_destination_concurrency, "5"),
    S(ktrelay_dns_servers, ""),
    B(ktrelay_ignore_unimplemented, "no"),
    S(ktrelay_metrics_address, ""),
    S(ktrelay_mta_sts_CAfile, ""),
    S(ktrelay_mta_sts_cache_directory, "$data_directory/mta-sts"),
    B(ktrelay_mta_sts_enable, "no"),
    T(ktrelay_mta_sts_fetch_timeout, "60s", 's'),
    S(ktrelay_sasl_password_file, ""),
    S(ktrelay_tlsrpt_contact_info, "postmaster@$mydomain"),
    S(ktrelay_tlsrpt_directory, "$data_directory/tlsrpt"),
    B(ktrelay_tlsrpt_enable, "no"),
    S(ktrelay_tlsrpt_organization_name, "$mydomain"),
    I(ktrelay_worker_threads, "0"),
    I(line_length_limit, "2048"),
    T(lmtp_connect_timeout, "0s", 's'),
    T(lmtp_data_done_timeout, "600s", 's'),
    I(lmtp_destination_concurrency_limit, "$default_destination_concurrency_limit"),
    I(lmtp_destination_recipient_limit, "$default_destination_recipient_limit"),
    S(lmtp_lhlo_name, "$myhostname"),
    C(lmtp_tls_security_level, "", check_lmtp_tls_level),
    L(local_recipient_maps, "proxy:unix:passwd.byname $alias_maps"),
    S(local_transport, "local:$myhostname"),
    X(luser_relay),
    S(mail_name, "ktrelay"),
    S(mail_owner, "ktrelay"),
    N(mail_spool_directory),
    S(mail_version, KT_VERSION),
    X(mailbox_command),
    N(mailbox_size_limit),
    S(mailbox_transport, ""),
    S(maillog_file, ""),
    L(maillog_file_prefixes, "/var, /dev/stdout"),
    N(mailq_path),
    N(manpage_directory),
    X(maps_rbl_domains),
    X(masquerade_domains),
    N(masquerade_exceptions),
    T(maximal_backoff_time, "4000s", 's'),
    T(maximal_queue_lifetime, "5d", 'd'),
    Z(message_size_limit, "10240000"),
    N(meta_directory),
    T(milter_command_timeout, "30s", 's'),
    S(milter_connect_macros, "j {daemon_name} {daemon_addr} v _"),
    T(milter_connect_timeout, "30s", 's'),
    T(milter_content_timeout, "300s", 's'),
    S(milter_data_macros, "i"),
    E(milter_default_action, "tempfail", "tempfail|accept|reject|quarantine"),
    S(milter_end_of_data_macros, "i"),
    S(milter_end_of_header_macros, "i"),
    N(milter_header_checks),
    S(milter_helo_macros, "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"),
    S(milter_macro_daemon_name, "$myhostname"),
    S(milter_macro_v, "$mail_name $mail_version"),
    S(milter_mail_macros, "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"),
    E(milter_protocol, "6", "2|3|4|5|6"),
    S(milter_rcpt_macros, "i {rcpt_addr} {rcpt_host} {rcpt_mailer}"),
    S(milter_unknown_command_macros, ""),
    M(mime_header_checks, "$header_checks"),
    T(minimal_backoff_time, "300s", 's'),
    L(mydestination, "$myhostname, localhost.$mydomain, localhost"),
    S(mydomain, NULL),
    S(myhostname, NULL),
    L(mynetworks, "127.0.0.0/8 [::1]/128"),
    E(mynetworks_style, "host", "host|subnet|class"),
    S(myorigin, "$myhostname"),
    M(nested_header_checks, "$header_checks"),
    N(newaliases_path),
    S(non_smtpd_milters, ""),
    N(notify_classes),
    C(parent_domain_matches_subdomains, "debug_peer_list,fast_flush_domains,mynetworks,permit_mx_backup_networks,"
      "qmqpd_authorized_clients,relay_domains,smtpd_access_maps", check_parent_matches),
    N(postscreen_access_list),
    N(postscreen_bare_newline_enable),
    N(postscreen_blacklist_action),
    N(postscreen_cache_map),
    N(postscreen_denylist_action),
    N(postscreen_dnsbl_action),
    N(postscreen_dnsbl_sites),
    N(postscreen_dnsbl_threshold),
    N(postscreen_greet_action),
    N(postscreen_non_smtp_command_enable),
    N(postscreen_pipelining_enable),
    X(postscreen_upstream_proxy_protocol),
    EL(propagate_unmatched_extensions, "canonical, virtual", "canonical|virtual|alias|forward|include|generic"),
    L(proxy_interfaces, ""),
    N(proxy_read_maps),
    S(queue_directory, "/var/spool/ktrelay"),
    T(queue_run_delay, "300s", 's'),
    L(rbl_reply_maps, ""),
    N(readme_directory),
    EL(receive_override_options, "", "no_unknown_recipient_checks|no_address_mappings|no_header_body_checks|no_milters"),
    X(recipient_bcc_maps),
    EL(recipient_canonical_classes, "envelope_recipient, header_recipient", "envelope_recipient|header_recipient"),
    M(recipient_canonical_maps, ""),
    S(recipient_delimiter, ""),
    L(relay_clientcerts, ""),
    L(relay_domains, ""),
    X(relay_recipient_maps),
    S(relay_transport, "relay"),
    S(relayhost, ""),
    X(relocated_maps),
    B(resolve_dequoted_address, "yes"),
    N(sample_directory),
    X(sender_bcc_maps),
    EL(sender_canonical_classes, "envelope_sender, header_sender", "envelope_sender|header_sender"),
    M(sender_canonical_maps, ""),
    N(sendmail_path),
    N(setgid_group),
    N(shlib_directory),
    S(smtp_bind_address, ""),
    S(smtp_bind_address6, ""),
    B(smtp_bind_address_enforce, "no"),
    T(smtp_connect_timeout, "30s", 's'),
    T(smtp_connection_cache_time_limit, "2s", 's'),
    I(smtp_connection_reuse_count_limit, "0"),
    T(smtp_destination_rate_delay, "$default_destination_rate_delay", 's'),
    I(smtp_destination_recipient_limit, "$default_destination_recipient_limit"),
    C(smtp_dns_support_level, "", check_dns_support_level),
    X(smtp_header_checks),
    S(smtp_helo_name, "$myhostname"),
    N(smtp_helo_timeout),
    N(smtp_host_lookup),
    B(smtp_randomize_addresses, "yes"),
    N(smtp_sasl_auth_cache_name),
    N(smtp_sasl_auth_cache_time),
    B(smtp_sasl_auth_enable, "no"),
    B(smtp_sasl_auth_soft_bounce, "yes"),
    L(smtp_sasl_mechanism_filter, ""),
    M(smtp_sasl_password_maps, ""),
    N(smtp_sasl_path),
    EL(smtp_sasl_security_options, "noplaintext, noanonymous", SASL_OPTIONS),
    EL(smtp_sasl_tls_security_options, "$smtp_sasl_security_options", SASL_OPTIONS),
    E(smtp_sasl_type, "cyrus", "cyrus"),
    B(smtp_sender_dependent_authentication, "no"),
    S(smtp_tls_CAfile, ""),
    S(smtp_tls_CApath, ""),
    X(smtp_tls_cert_file),
    G(smtp_tls_ciphers, "medium"),
    L(smtp_tls_exclude_ciphers, ""),
    L(smtp_tls_fingerprint_cert_match, ""),
    S(smtp_tls_fingerprint_digest, "sha256"),
    X(smtp_tls_key_file),
    I(smtp_tls_loglevel, "0"),
    G(smtp_tls_mandatory_ciphers, "medium"),
    L(smtp_tls_mandatory_exclude_ciphers, ""),
    P(smtp_tls_mandatory_protocols, ">=TLSv1"),
    N(smtp_tls_note_starttls_offer),
    M(smtp_tls_policy_maps, ""),
    P(smtp_tls_protocols, ">=TLSv1"),
    L(smtp_tls_secure_cert_match, "nexthop, dot-nexthop"),
    C(smtp_tls_security_level, "", check_smtp_tls_level),
    S(smtp_tls_servername, ""),
    N(smtp_tls_session_cache_database),
    N(smtp_tls_session_cache_timeout),
    L(smtp_tls_verify_cert_match, "hostname"),
    N(smtpd_authorized_xclient_hosts),
    N(smtpd_authorized_xforward_hosts),
    S(smtpd_banner, "$myhostname ESMTP $mail_name"),
    I(smtpd_client_auth_rate_limit, "0"),
    I(smtpd_client_connection_count_limit, "50"),
    I(smtpd_client_connection_rate_limit, "0"),
    L(smtpd_client_event_limit_exceptions, "$mynetworks"),
    I(smtpd_client_message_rate_limit, "0"),
    I(smtpd_client_new_tls_session_rate_limit, "0"),
    N(smtpd_client_port_logging),
    I(smtpd_client_recipient_rate_limit, "0"),
    L(smtpd_client_restrictions, ""),
    X(smtpd_data_restrictions),
    B(smtpd_delay_reject, "yes"),
    L(smtpd_discard_ehlo_keywords, ""),
    X(smtpd_end_of_data_restrictions),
    B(smtpd_enforce_tls, "no"),
    T(smtpd_error_sleep_time, "1s", 's'),
    X(smtpd_etrn_restrictions),
    S(smtpd_forbid_bare_newline, "normalize"),
    L(smtpd_forbid_bare_newline_exclusions, "$mynetworks"),
    I(smtpd_forbid_bare_newline_reject_code, "550"),
    I(smtpd_hard_error_limit, "${stress?{1}:{20}}"),
    B(smtpd_helo_required, "no"),
    L(smtpd_helo_restrictions, ""),
    I(smtpd_junk_command_limit, "${stress?{1}:{100}}"),
    S(smtpd_milters, ""),
    I(smtpd_min_data_rate, "500"),
    B(smtpd_peername_lookup, "yes"),
    B(smtpd_per_request_deadline, "yes"),
    X(smtpd_proxy_filter),
    N(smtpd_proxy_options),
    N(smtpd_proxy_timeout),
    I(smtpd_recipient_limit, "1000"),
    I(smtpd_recipient_overshoot_limit, "1000"),
    L(smtpd_recipient_restrictions, ""),
    B(smtpd_reject_unlisted_recipient, "yes"),
    B(smtpd_reject_unlisted_sender, "no"),
    L(smtpd_relay_restrictions, "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"),
    B(smtpd_sasl_auth_enable, "no"),
    B(smtpd_sasl_authenticated_header, "no"),
    X(smtpd_sasl_exceptions_networks),
    S(smtpd_sasl_local_domain, ""),
    S(smtpd_sasl_path, "smtpd"),
    EL(smtpd_sasl_security_options, "noanonymous", SASL_OPTIONS),
    EL(smtpd_sasl_tls_security_options, "$smtpd_sasl_security_options", SASL_OPTIONS),
    E(smtpd_sasl_type, "cyrus", "cyrus|dovecot|ktrelay"),
    M(smtpd_sender_login_maps, ""),
    L(smtpd_sender_restrictions, ""),
    I(smtpd_soft_error_limit, "10"),
    T(smtpd_starttls_timeout, "${stress?{10}:{300}}s", 's'),
    T(smtpd_timeout, "${stress?{10}:{300}}s", 's'),
    S(smtpd_tls_CAfile, ""),
    S(smtpd_tls_CApath, ""),
    B(smtpd_tls_ask_ccert, "no"),
    B(smtpd_tls_auth_only, "no"),
    N(smtpd_tls_ccert_verifydepth),
    S(smtpd_tls_cert_file, ""),
    X(smtpd_tls_chain_files),
    G(smtpd_tls_ciphers, "medium"),
    N(smtpd_tls_dh1024_param_file),
    S(smtpd_tls_eccert_file, ""),
    S(smtpd_tls_eckey_file, "$smtpd_tls_eccert_file"),
    N(smtpd_tls_eecdh_grade),
    L(smtpd_tls_exclude_ciphers, ""),
    S(smtpd_tls_fingerprint_digest, "sha256"),
    S(smtpd_tls_key_file, "$smtpd_tls_cert_file"),
    I(smtpd_tls_loglevel, "0"),
    G(smtpd_tls_mandatory_ciphers, "medium"),
    L(smtpd_tls_mandatory_exclude_ciphers, ""),
    P(smtpd_tls_mandatory_protocols, ">=TLSv1"),
    P(smtpd_tls_protocols, ">=TLSv1"),
    B(smtpd_tls_received_header, "no"),
    X(smtpd_tls_req_ccert),
    C(smtpd_tls_security_level, "", check_smtpd_tls_level),
    S(smtpd_tls_session_cache_database, ""),
    T(smtpd_tls_session_cache_timeout, "3600s", 's'),
    B(smtpd_tls_wrappermode, "no"),
    S(smtpd_upstream_proxy_protocol, ""),
    T(smtpd_upstream_proxy_timeout, "5s", 's'),
    B(smtpd_use_tls, "no"),
    B(smtputf8_enable, "yes"),
    X(soft_bounce),
    S(stress, ""),
    X(strict_rfc821_envelopes),
    B(swap_bangpath, "yes"),
    S(syslog_facility, "mail"),
    S(syslog_name, "ktrelay"),
    S(tls_high_cipherlist, "aNULL:-aNULL:HIGH:@STRENGTH"),
    B(tls_ktls_enable, "yes"),
    B(tls_ktls_rx_tls13, "yes"),
    S(tls_low_cipherlist, "aNULL:-aNULL:HIGH:MEDIUM:LOW:+RC4:@STRENGTH"),
    S(tls_medium_cipherlist, "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"),
    N(tls_preempt_cipherlist),
    S(tls_random_source, "dev:/dev/urandom"),
    N(tls_ssl_options),
    M(transport_maps, ""),
    I(unknown_local_recipient_reject_code, "550"),
    L(virtual_alias_domains, "$virtual_alias_maps"),
    I(virtual_alias_expansion_limit, "1000"),
    M(virtual_alias_maps, ""),
    I(virtual_alias_recursion_limit, "1000"),
    M(virtual_gid_maps, ""),
    S(virtual_mailbox_base, ""),
    L(virtual_mailbox_domains, "$virtual_mailbox_maps"),
    M(virtual_mailbox_maps, ""),
    X(virtual_minimum_uid),
    S(virtual_transport, "virtual"),
    M(virtual_uid_maps, ""),
};

#undef S
#undef L
#undef B
#undef I
#undef Z
#undef T
#undef E
#undef EL
#undef C
#undef M
#undef G
#undef P
#undef N
#undef X
#undef SASL_OPTIONS

#define NPARAMS (sizeof(params) / sizeof(params[0]))

static int cmp_name(const void *key, const void *elem)
{
    return strcmp(key, ((const struct kt_param_def *)elem)->name);
}

const struct kt_param_def *kt_param_find(const char *name)
{
    return bsearch(name, params, NPARAMS, sizeof(params[0]), cmp_name);
}

size_t kt_param_count(void)
{
    return NPARAMS;
}

const struct kt_param_def *kt_param_at(size_t i)
{
    return i < NPARAMS ? &params[i] : NULL;
}

int kt_param_is_known(const char *name)
{
    return kt_param_find(name) != NULL;
}

/* Case-insensitive optimal-string-alignment distance (a swap of two
 * neighbours counts once: "relayhots" is one typo away from "relayhost"),
 * giving up early once the distance exceeds LIMIT. */
static size_t edit_distance(const char *a, const char *b, size_t limit)
{
    size_t la = strlen(a), lb = strlen(b);
    if ((la > lb ? la - lb : lb - la) > limit)
        return limit + 1;
    size_t *rows = calloc(3 * (lb + 1), sizeof(*rows));
    if (!rows)
        return limit + 1;
    size_t *prev2 = rows, *prev = rows + lb + 1, *cur = rows + 2 * (lb + 1);
    for (size_t j = 0; j <= lb; j++)
        prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t row_min = cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            size_t d = prev[j - 1] + (ca != cb);
            if (prev[j] + 1 < d)
                d = prev[j] + 1;
            if (cur[j - 1] + 1 < d)
                d = cur[j - 1] + 1;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2])
                && tolower((unsigned char)a[i - 2]) == cb && prev2[j - 2] + 1 < d)
                d = prev2[j - 2] + 1;
            cur[j] = d;
            if (d < row_min)
                row_min = d;
        }
        size_t *t = prev2;
        prev2 = prev;
        prev = cur;
        cur = t;
        if (row_min > limit) {
            free(rows);
            return limit + 1;
        }
    }
    size_t d = prev[lb];
    free(rows);
    return d;
}

const char *kt_closest(const char *word, size_t len, const char *const *candidates, size_t n)
{
    /* "Reasonably close": at most 3 edits and at most a quarter of the word
     * (one edit for words of 3 to 7 letters), so short words only match
     * near-identical ones. */
    char *w = strndup(word, len);
    if (!w)
        return NULL;
    size_t limit = len / 4;
    if (limit > 3)
        limit = 3;
    if (limit == 0 && len >= 3)
        limit = 1;                /* "mey" is one edit from "may" */
    const char *best = NULL;
    size_t best_d = limit + 1;
    for (size_t i = 0; i < n && best_d > 0; i++) {
        size_t d = edit_distance(w, candidates[i], limit);
        if (d < best_d) {
            best_d = d;
            best = candidates[i];
        }
    }
    free(w);
    return best;
}

const char *kt_param_suggest(const char *name)
{
    static const char *names[NPARAMS];
    if (!names[NPARAMS - 1])      /* filled once; the same pointers every time, so a race is harmless */
        for (size_t i = 0; i < NPARAMS; i++)
            names[i] = params[i].name;
    return kt_closest(name, strlen(name), names, NPARAMS);
}

int kt_param_parse_bool(const char *value, long long *out)
{
    if (strcasecmp(value, "yes") == 0)
        *out = 1;
    else if (strcasecmp(value, "no") == 0)
        *out = 0;
    else
        return -EINVAL;
    return 0;
}

/* Unsigned decimal prefix of S; *END points after it. */
static int parse_number(const char *s, const char **end, long long *out)
{
    if (!isdigit((unsigned char)*s))
        return -EINVAL;
    errno = 0;
    char *e;
    long long v = strtoll(s, &e, 10);
    if (errno == ERANGE)
        return -EINVAL;
    *end = e;
    *out = v;
    return 0;
}

int kt_param_parse_int(const char *value, long long *out)
{
    const char *end;
    if (parse_number(value, &end, out) < 0 || *end != '\0')
        return -EINVAL;
    return 0;
}

int kt_param_parse_time(const char *value, char default_unit, long long *out)
{
    const char *end;
    long long n;
    if (parse_number(value, &end, &n) < 0)
        return -EINVAL;
    char unit = *end ? *end : default_unit;
    if (*end && end[1] != '\0')
        return -EINVAL;
    long long mult;
    switch (unit) {
    case 's': mult = 1; break;
    case 'm': mult = 60; break;
    case 'h': mult = 3600; break;
    case 'd': mult = 86400; break;
    case 'w': mult = 604800; break;
    default: return -EINVAL;
    }
    /* Postfix keeps times in an int; larger values are configuration errors. */
    if (n > INT_MAX / mult)
        return -EINVAL;
    *out = n * mult;
    return 0;
}

/* ---- value checks (fail closed: anything Postfix would not accept is an error) ---- */

#define LIST_SEP ", \t\r\n"
#define MAX_CHOICES 16

/* Splits p->values ("a|b|c") into CHOICES; returns their count. */
static size_t choices_of(const char *values, char buf[256], const char *choices[MAX_CHOICES])
{
    size_t n = 0;
    snprintf(buf, 256, "%s", values);
    for (char *s = buf; n < MAX_CHOICES; ) {
        choices[n++] = s;
        char *bar = strchr(s, '|');
        if (!bar)
            break;
        *bar = '\0';
        s = bar + 1;
    }
    return n;
}

/* "a, b or c" */
static void join_choices(const char *const *choices, size_t n, char *out, size_t len)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && used < len; i++)
        used += (size_t)snprintf(out + used, len - used, "%s%s", i == 0 ? "" : i + 1 == n ? " or " : ", ",
                                 choices[i]);
}

static int bad_choice(const char *param, const char *word, size_t wlen, const char *const *choices, size_t n,
                      char *msg, size_t len)
{
    char all[512];
    const char *near = kt_closest(word, wlen, choices, n);
    join_choices(choices, n, all, sizeof(all));
    if (near)
        snprintf(msg, len, "bad value \"%.*s\" for %s (did you mean %s?); expected %s", (int)wlen, word, param,
                 near, all);
    else
        snprintf(msg, len, "bad value \"%.*s\" for %s; expected %s", (int)wlen, word, param, all);
    return -EINVAL;
}

static int in_choices(const char *word, size_t wlen, const char *const *choices, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(choices[i]) == wlen && strncasecmp(word, choices[i], wlen) == 0)
            return 1;
    return 0;
}

static int check_enum(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    char buf[256];
    const char *choices[MAX_CHOICES];
    size_t n = choices_of(p->values, buf, choices);
    if (in_choices(value, strlen(value), choices, n))
        return 0;
    return bad_choice(p->name, value, strlen(value), choices, n, msg, len);
}

static int check_enum_list(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    char buf[256];
    const char *choices[MAX_CHOICES];
    size_t n = choices_of(p->values, buf, choices);
    for (const char *s = value + strspn(value, LIST_SEP); *s; s += strspn(s, LIST_SEP)) {
        size_t wlen = strcspn(s, LIST_SEP);
        if (!in_choices(s, wlen, choices, n))
            return bad_choice(p->name, s, wlen, choices, n, msg, len);
        s += wlen;
    }
    return 0;
}

/* Postfix's TLS security levels: the server takes none, may and encrypt; the
 * others exist only for the SMTP client. */
static const char *const smtpd_levels[] = { "", "none", "may", "encrypt" };
static const char *const smtp_levels[] = { "", "none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",
                                           "secure" };
static const char *const client_only_levels[] = { "dane", "dane-only", "fingerprint", "verify", "secure" };

static int check_level(const struct kt_param_def *p, const char *value, const char *const *ok, size_t n,
                       char *msg, size_t len)
{
    if (in_choices(value, strlen(value), ok, n))
        return 0;
    int client_only = in_choices(value, strlen(value), client_only_levels, 5);
    if (client_only && n == 4) {
        snprintf(msg, len, "bad value \"%s\" for %s: %s is a client-only TLS security level "
                 "(smtp_tls_security_level); the server takes none, may or encrypt", value, p->name, value);
        return -EINVAL;
    }
    return bad_choice(p->name, value, strlen(value), ok + 1, n - 1, msg, len);
}

static int check_smtpd_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    return check_level(p, value, smtpd_levels, 4, msg, len);
}

static int check_smtp_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    return check_level(p, value, smtp_levels, 9, msg, len);
}

/* smtp_dns_support_level: Postfix's values; empty means enabled. */
static int check_dns_support_level(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    static const char *const levels[] = { "", "disabled", "enabled", "dnssec" };
    if (in_choices(value, strlen(value), levels, 4))
        return 0;
    return bad_choice(p->name, value, strlen(value), levels + 1, 3, msg, len);
}

/* The LMTP client speaks plaintext only (a local socket or a trusted network, as Dovecot's LMTP is
 * usually reached): a level that asks for TLS fails rather than delivering in the clear. */
static int check_lmtp_tls_level(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    if (!*value || !strcasecmp(value, "none"))
        return 0;
    if (in_choices(value, strlen(value), smtp_levels, 6) || in_choices(value, strlen(value), client_only_levels, 5)) {
        snprintf(msg, len, "bad value \"%s\" for %s: ktrelay's LMTP client does not implement TLS; it takes none",
                 value, p->name);
        return -EINVAL;
    }
    static const char *const none[] = { "none" };
    return bad_choice(p->name, value, strlen(value), none, 1, msg, len);
}

static int check_grade(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    if (!strcasecmp(value, "export") || !strcasecmp(value, "null")) {
        snprintf(msg, len, "bad value \"%s\" for %s: ktrelay does not offer the %s cipher grade; it takes high, "
                 "medium or low", value, p->name, value);
        return -EINVAL;
    }
    return check_enum(p, value, msg, len);
}

/* Postfix 2.x "!SSLv3, !TLSv1" and 3.6 ">=TLSv1.2" / "<=TLSv1.3" syntax; a bound may also be
 * Postfix's hexadecimal protocol number ("0x0303"). */
static int check_protocols(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    static const char *const names[] = { "SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3" };
    for (const char *s = value + strspn(value, LIST_SEP); *s; s += strspn(s, LIST_SEP)) {
        size_t wlen = strcspn(s, LIST_SEP);
        const char *w = s;
        size_t n = wlen;
        int bound = 0;
        s += wlen;
        if (n >= 2 && (!strncmp(w, ">=", 2) || !strncmp(w, "<=", 2))) {
            w += 2, n -= 2, bound = 1;
        } else if (n >= 1 && w[0] == '!') {
            w++, n--;
        }
        if (in_choices(w, n, names, 6))
            continue;
        if (bound && n > 0) {
            char hex[16];
            snprintf(hex, sizeof(hex), "%.*s", (int)(n < 15 ? n : 15), w);
            char *end;
            unsigned long v = strtoul(hex, &end, 16);
            if (n < 15 && !*end && v >= 0x300 && v <= 0x304)
                continue;
        }
        const char *near = kt_closest(w, n, names, 6);
        snprintf(msg, len, "bad value \"%.*s\" for %s: unknown TLS protocol%s%s%s; expected SSLv3, TLSv1, TLSv1.1, "
                 "TLSv1.2 or TLSv1.3, each with an optional ! or a >= or <= bound", (int)wlen, s - wlen, p->name,
                 near ? " (did you mean " : "", near ? near : "", near ? "?)" : "");
        return -EINVAL;
    }
    return 0;
}

/* A list of type:name tables (Postfix's "maps" parameters); "{...}" is one element. */
static int check_maps(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    size_t ntypes;
    const char *const *types = kt_table_types(&ntypes);
    const char *s = value;
    for (;;) {
        while (*s && (*s == ',' || isspace((unsigned char)*s)))
            s++;
        if (!*s)
            return 0;
        const char *w = s;
        int depth = 0;
        while (*s && (depth || (*s != ',' && !isspace((unsigned char)*s)))) {
            if (*s == '{')
                depth++;
            else if (*s == '}' && depth)
                depth--;
            s++;
        }
        size_t wlen = (size_t)(s - w);
        const char *colon = memchr(w, ':', wlen);
        if (!colon) {
            snprintf(msg, len, "bad value \"%.*s\" for %s: expected type:table (for example hash:/etc/postfix/%s)",
                     (int)wlen, w, p->name, p->name);
            return -EINVAL;
        }
        size_t tlen = (size_t)(colon - w);
        if (!in_choices(w, tlen, types, ntypes)) {
            char all[256];
            const char *near = kt_closest(w, tlen, types, ntypes);
            join_choices(types, ntypes, all, sizeof(all));
            snprintf(msg, len, "bad value \"%.*s\" for %s: unsupported table type \"%.*s\"%s%s%s; ktrelay reads %s",
                     (int)wlen, w, p->name, (int)tlen, w, near ? " (did you mean " : "", near ? near : "",
                     near ? "?)" : "", all);
            return -EINVAL;
        }
    }
}

/* parent_domain_matches_subdomains: ktrelay always lets "example.com" in
 * relay_domains and in smtpd_access_maps tables (check_*_access) match its
 * subdomains, as Postfix's default list says. A list without either asks for
 * the stricter ".example.com"-only matching, which ktrelay does not
 * implement: honouring it wrongly would relay or permit for more domains than
 * asked, so it is refused. The other names matter nowhere in ktrelay. */
/* forward_path: ktrelay delivers no mail through .forward files. With Postfix's default (or its parts:
 * "$home/.forward", "$home/.forward${recipient_delimiter}${extension}", either with ${home}) the local
 * delivery agent looks for $home/.forward and defers a user's mail while it exists, so that mail the user
 * forwards is never quietly put in a Maildir nobody reads; an empty value means no .forward file is read,
 * as in Postfix. Any other path would be a file ktrelay does not look at: an error. */
static int check_forward_path(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    static const char *const known[] = {
        "$home/.forward", "${home}/.forward", "$home/.forward${recipient_delimiter}${extension}",
        "${home}/.forward${recipient_delimiter}${extension}", "$home/.forward$recipient_delimiter$extension",
        "${home}/.forward$recipient_delimiter$extension",
    };
    for (const char *s = value + strspn(value, LIST_SEP); *s; s += strspn(s, LIST_SEP)) {
        size_t wlen = strcspn(s, LIST_SEP);
        int found = 0;
        for (size_t i = 0; i < sizeof(known) / sizeof(known[0]) && !found; i++)
            found = wlen == strlen(known[i]) && strncmp(s, known[i], wlen) == 0;
        if (!found) {
            snprintf(msg, len, "bad value \"%.*s\" in %s: ktrelay delivers no mail through .forward files and "
                     "checks only $home/.forward (mail for a user who has one waits in the queue); use Postfix's "
                     "default, or an empty value to deliver to the Maildir whatever .forward files exist",
                     (int)wlen, s, p->name);
            return -EINVAL;
        }
        s += wlen;
    }
    return 0;
}

static int check_parent_matches(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    static const char *const needed[] = { "relay_domains", "smtpd_access_maps" };
    for (size_t i = 0; i < 2; i++) {
        size_t n = strlen(needed[i]);
        int found = 0;
        for (const char *s = value + strspn(value, LIST_SEP); *s && !found; s += strspn(s, LIST_SEP)) {
            size_t wlen = strcspn(s, LIST_SEP);
            found = wlen == n && strncmp(s, needed[i], n) == 0;
            s += wlen;
        }
        if (!found) {
            snprintf(msg, len, "bad value \"%s\" for %s: ktrelay does not implement the list without %s "
                     "(its %s always match subdomains, as in Postfix's default); keep %s in the list",
                     value, p->name, needed[i],
                     i == 0 ? "relay_domains entries" : "smtpd_access_maps (check_*_access) domain keys",
                     needed[i]);
            return -EINVAL;
        }
    }
    return 0;
}

/* content_filter: empty, or Postfix's "transport:nexthop" with a transport ktrelay has a client for (smtp,
 * relay) and a next hop; anything else would leave mail unfiltered or stuck, so it is refused. */
static int check_filter(const struct kt_param_def *p, const char *value, char *msg, size_t len)
{
    static const char *const transports[] = { "smtp", "relay" };
    if (!*value)
        return 0;
    const char *colon = strchr(value, ':');
    size_t tlen = colon ? (size_t)(colon - value) : strlen(value);
    if (!in_choices(value, tlen, transports, 2)) {
        const char *near = kt_closest(value, tlen, transports, 2);
        snprintf(msg, len, "bad value \"%s\" for %s: transport \"%.*s\" is not supported%s%s%s; expected "
                 "smtp:nexthop or relay:nexthop, for example smtp:[127.0.0.1]:10024", value, p->name, (int)tlen,
                 value, near ? " (did you mean " : "", near ? near : "", near ? "?)" : "");
        return -EINVAL;
    }
    if (!colon || !colon[1] || strpbrk(colon + 1, " \t,")) {
        snprintf(msg, len, "bad value \"%s\" for %s: expected transport:nexthop with one next hop, for example "
                 "smtp:[127.0.0.1]:10024", value, p->name);
        return -EINVAL;
    }
    return 0;
}
