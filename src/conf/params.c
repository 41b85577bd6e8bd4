/* Parameter table: every main.cf name ktrelay knows, with its type, its
 * Postfix default (raw, $name references unexpanded) and whether ktrelay
 * acts on it. Names of Postfix features ktrelay lacks are listed too, so a
 * Postfix main.cf loads with a warning instead of a misleading "unknown".
 * The table is kept in strcmp order for binary search (a unit test checks). */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kt_build.h"
#include "conf/config.h"

#define S(n, d)    { #n, KT_PARAM_STRING, d, 0, 1 }
#define L(n, d)    { #n, KT_PARAM_LIST, d, 0, 1 }
#define B(n, d)    { #n, KT_PARAM_BOOL, d, 0, 1 }
#define I(n, d)    { #n, KT_PARAM_INT, d, 0, 1 }
#define Z(n, d)    { #n, KT_PARAM_SIZE, d, 0, 1 }
#define T(n, d, u) { #n, KT_PARAM_TIME, d, u, 1 }
/* Accepted and ignored: typed as strings since nothing reads them. */
#define N(n)       { #n, KT_PARAM_STRING, "", 0, 0 }

static const struct kt_param_def params[] = {
    N(alias_database),
    L(alias_maps, "hash:/etc/aliases"),
    N(allow_mail_to_commands),
    N(allow_mail_to_files),
    B(allow_percent_hack, "yes"),
    N(always_bcc),
    T(anvil_rate_time_unit, "60s", 's'),
    N(append_dot_mydomain),
    N(biff),
    N(body_checks),
    T(bounce_queue_lifetime, "5d", 'd'),
    B(broken_sasl_auth_clients, "no"),
    N(canonical_maps),
    N(command_directory),
    N(compatibility_level),
    N(content_filter),
    N(daemon_directory),
    S(data_directory, "/var/lib/ktrelay"),
    N(debug_peer_level),
    N(debug_peer_list),
    I(default_destination_concurrency_limit, "20"),
    I(default_process_limit, "100"),
    N(default_transport),
    T(delay_warning_time, "0h", 'h'),
    N(disable_dns_lookups),
    N(disable_vrfy_command),
    N(fallback_transport),
    N(forward_path),
    N(header_checks),
    N(header_size_limit),
    S(home_mailbox, "Maildir/"),
    N(html_directory),
    L(inet_interfaces, "all"),
    L(inet_protocols, "all"),
    I(initial_destination_concurrency, "5"),
    S(ktrelay_dns_servers, ""),
    S(ktrelay_metrics_address, ""),
    S(ktrelay_sasl_password_file, ""),
    I(ktrelay_worker_threads, "0"),
    I(line_length_limit, "2048"),
    N(local_recipient_maps),
    N(local_transport),
    N(luser_relay),
    S(mail_name, "ktrelay"),
    N(mail_owner),
    N(mail_spool_directory),
    S(mail_version, KT_VERSION),
    N(mailbox_command),
    N(mailbox_size_limit),
    N(mailbox_transport),
    S(maillog_file, ""),
    L(maillog_file_prefixes, "/var, /dev/stdout"),
    N(mailq_path),
    N(manpage_directory),
    N(maps_rbl_domains),
    N(masquerade_domains),
    N(masquerade_exceptions),
    T(maximal_backoff_time, "4000s", 's'),
    T(maximal_queue_lifetime, "5d", 'd'),
    Z(message_size_limit, "10240000"),
    N(meta_directory),
    N(milter_connect_macros),
    N(milter_default_action),
    N(milter_header_checks),
    N(milter_mail_macros),
    N(milter_protocol),
    N(milter_rcpt_macros),
    N(mime_header_checks),
    T(minimal_backoff_time, "300s", 's'),
    L(mydestination, "$myhostname, localhost.$mydomain, localhost"),
    S(mydomain, NULL),
    S(myhostname, NULL),
    L(mynetworks, "127.0.0.0/8 [::1]/128"),
    S(mynetworks_style, "host"),
    S(myorigin, "$myhostname"),
    N(nested_header_checks),
    N(newaliases_path),
    N(non_smtpd_milters),
    N(notify_classes),
    N(parent_domain_matches_subdomains),
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
    N(postscreen_upstream_proxy_protocol),
    N(proxy_interfaces),
    N(proxy_read_maps),
    S(queue_directory, "/var/spool/ktrelay"),
    T(queue_run_delay, "300s", 's'),
    L(rbl_reply_maps, ""),
    N(readme_directory),
    N(receive_override_options),
    N(recipient_bcc_maps),
    N(recipient_canonical_maps),
    N(recipient_delimiter),
    L(relay_domains, ""),
    N(relay_recipient_maps),
    N(relay_transport),
    S(relayhost, ""),
    N(relocated_maps),
    B(resolve_dequoted_address, "yes"),
    N(sample_directory),
    N(sender_bcc_maps),
    N(sender_canonical_maps),
    N(sendmail_path),
    N(setgid_group),
    N(shlib_directory),
    N(smtp_bind_address),
    N(smtp_bind_address6),
    T(smtp_connect_timeout, "30s", 's'),
    N(smtp_header_checks),
    S(smtp_helo_name, "$myhostname"),
    N(smtp_helo_timeout),
    N(smtp_host_lookup),
    N(smtp_sasl_auth_enable),
    N(smtp_sasl_password_maps),
    N(smtp_sasl_security_options),
    N(smtp_sasl_tls_security_options),
    S(smtp_tls_CAfile, ""),
    S(smtp_tls_CApath, ""),
    N(smtp_tls_cert_file),
    S(smtp_tls_ciphers, "medium"),
    L(smtp_tls_exclude_ciphers, ""),
    N(smtp_tls_key_file),
    I(smtp_tls_loglevel, "0"),
    S(smtp_tls_mandatory_ciphers, "medium"),
    L(smtp_tls_mandatory_exclude_ciphers, ""),
    L(smtp_tls_mandatory_protocols, ">=TLSv1"),
    N(smtp_tls_note_starttls_offer),
    N(smtp_tls_policy_maps),
    L(smtp_tls_protocols, ">=TLSv1"),
    S(smtp_tls_security_level, ""),
    S(smtp_tls_servername, ""),
    N(smtp_tls_session_cache_database),
    N(smtp_tls_session_cache_timeout),
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
    N(smtpd_data_restrictions),
    B(smtpd_delay_reject, "yes"),
    N(smtpd_discard_ehlo_keywords),
    N(smtpd_end_of_data_restrictions),
    B(smtpd_enforce_tls, "no"),
    T(smtpd_error_sleep_time, "1s", 's'),
    N(smtpd_etrn_restrictions),
    B(smtpd_forbid_bare_newline, "yes"),
    I(smtpd_hard_error_limit, "${stress?{1}:{20}}"),
    B(smtpd_helo_required, "no"),
    L(smtpd_helo_restrictions, ""),
    N(smtpd_junk_command_limit),
    N(smtpd_milters),
    B(smtpd_peername_lookup, "yes"),
    N(smtpd_proxy_filter),
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
    N(smtpd_sasl_exceptions_networks),
    S(smtpd_sasl_local_domain, ""),
    S(smtpd_sasl_path, "smtpd"),
    L(smtpd_sasl_security_options, "noanonymous"),
    L(smtpd_sasl_tls_security_options, "$smtpd_sasl_security_options"),
    S(smtpd_sasl_type, "cyrus"),
    L(smtpd_sender_login_maps, ""),
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
    N(smtpd_tls_chain_files),
    S(smtpd_tls_ciphers, "medium"),
    N(smtpd_tls_dh1024_param_file),
    S(smtpd_tls_eccert_file, ""),
    S(smtpd_tls_eckey_file, "$smtpd_tls_eccert_file"),
    N(smtpd_tls_eecdh_grade),
    L(smtpd_tls_exclude_ciphers, ""),
    N(smtpd_tls_fingerprint_digest),
    S(smtpd_tls_key_file, "$smtpd_tls_cert_file"),
    I(smtpd_tls_loglevel, "0"),
    S(smtpd_tls_mandatory_ciphers, "medium"),
    L(smtpd_tls_mandatory_exclude_ciphers, ""),
    L(smtpd_tls_mandatory_protocols, ">=TLSv1"),
    L(smtpd_tls_protocols, ">=TLSv1"),
    B(smtpd_tls_received_header, "no"),
    N(smtpd_tls_req_ccert),
    S(smtpd_tls_security_level, ""),
    S(smtpd_tls_session_cache_database, ""),
    T(smtpd_tls_session_cache_timeout, "3600s", 's'),
    B(smtpd_tls_wrappermode, "no"),
    S(smtpd_upstream_proxy_protocol, ""),
    T(smtpd_upstream_proxy_timeout, "5s", 's'),
    B(smtpd_use_tls, "no"),
    N(smtputf8_enable),
    N(soft_bounce),
    S(stress, ""),
    N(strict_rfc821_envelopes),
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
    L(transport_maps, ""),
    N(unknown_local_recipient_reject_code),
    N(virtual_alias_domains),
    N(virtual_alias_maps),
    L(virtual_gid_maps, ""),
    S(virtual_mailbox_base, ""),
    L(virtual_mailbox_domains, "$virtual_mailbox_maps"),
    L(virtual_mailbox_maps, ""),
    N(virtual_minimum_uid),
    N(virtual_transport),
    L(virtual_uid_maps, ""),
};

#undef S
#undef L
#undef B
#undef I
#undef Z
#undef T
#undef N

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

const char *kt_param_suggest(const char *name)
{
    /* "Reasonably close": at most 3 edits and at most a quarter of the name,
     * so short names only match near-identical ones. */
    size_t limit = strlen(name) / 4;
    if (limit > 3)
        limit = 3;
    const char *best = NULL;
    size_t best_d = limit + 1;
    for (size_t i = 0; i < NPARAMS && best_d > 0; i++) {
        size_t d = edit_distance(name, params[i].name, limit);
        if (d < best_d) {
            best_d = d;
            best = params[i].name;
        }
    }
    return best;
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
