/* Per-client connection and rate accounting, like Postfix's anvil(8): one
 * process-wide table shared by every worker thread (and kept across
 * configuration reloads), keyed by service name and client address.
 * Rates count events in a fixed window of anvil_rate_time_unit seconds that
 * starts with the first event after the previous window ended; all rates of a
 * client share that window, as in anvil. Thread-safe; never blocks on I/O. */
#ifndef KTRELAY_ANVIL_H
#define KTRELAY_ANVIL_H

enum kt_anvil_rate {
    KT_ANVIL_CONN,     /* smtpd_client_connection_rate_limit */
    KT_ANVIL_MAIL,     /* smtpd_client_message_rate_limit */
    KT_ANVIL_RCPT,     /* smtpd_client_recipient_rate_limit */
    KT_ANVIL_NEWTLS,   /* smtpd_client_new_tls_session_rate_limit */
    KT_ANVIL_AUTH,     /* smtpd_client_auth_rate_limit */
    KT_ANVIL_NRATES,
};

/* A new connection from addr to service: *count is the number of its
 * simultaneous connections including this one, *rate its connections in the
 * current window including this one. Pair with kt_anvil_disconnect. */
void kt_anvil_connect(const char *service, const char *addr, long long unit_s, unsigned *count, unsigned *rate);
void kt_anvil_disconnect(const char *service, const char *addr);
/* Counts one event of kind ev (not KT_ANVIL_CONN); returns the rate in the
 * current window including it. */
unsigned kt_anvil_event(const char *service, const char *addr, enum kt_anvil_rate ev, long long unit_s);
/* The rate of ev in the current window, without counting (new TLS sessions
 * are checked before a handshake and counted after it). */
unsigned kt_anvil_peek(const char *service, const char *addr, enum kt_anvil_rate ev, long long unit_s);
/* Number of clients tracked (tests, statistics). */
unsigned long kt_anvil_size(void);

#endif
