/* Smarthost credentials for the outbound client, as Postfix's smtp(8) finds
 * them: smtp_sasl_password_maps looked up by sender (with
 * smtp_sender_dependent_authentication), by the server's name and by the
 * next hop, values "username:password"; and smtp_sasl_mechanism_filter, the
 * list that narrows the mechanisms a server offers. Tables are the
 * configuration's (read by the privileged master, kept in memory). */
#ifndef KTRELAY_SMTP_SASL_H
#define KTRELAY_SMTP_SASL_H

#include <stddef.h>

#include "core/table.h"

/* What a lookup may use; NULL or "" members are skipped. */
struct kt_smtp_sasl_keys {
    const char *sender;       /* envelope sender; only with sender_dependent */
    int sender_dependent;     /* smtp_sender_dependent_authentication */
    const char *server;       /* the server's host name (an MX name, or the host of [host]) */
    const char *nexthop;      /* the next hop as written: "[host]:port", "[host]", "host:port", "domain" */
};

/* The first value found, in this order (Postfix's, extended by the bracket forms): the sender address,
 * then "@domain" of the sender (sender-dependent only, never for the null sender); the server's name;
 * the next hop as written; "[host]" when the next hop was "[host]:port"; the next hop without brackets
 * and port. Returns the table's value (valid while the maps live) or NULL. */
const char *kt_smtp_sasl_lookup(const struct kt_maps *maps, const struct kt_smtp_sasl_keys *k);

/* "username:password" (split at the first colon, so a password may hold colons) -> kt_malloc'ed copies.
 * Returns 0, or -EINVAL when there is no colon or the user name is empty. */
int kt_smtp_sasl_split(const char *value, char **username, char **password);

/* smtp_sasl_mechanism_filter -> the KT_SMTP_MECH_* bits it lets through. Postfix's string list: names
 * (case-insensitive), "!name" to exclude, first match wins, no match excludes; "static:all" (or any
 * static: value) matches every mechanism; empty keeps all. Other tables and /file names are not
 * implemented: -EINVAL with a message in err. */
int kt_smtp_sasl_filter(const char *filter, unsigned *mechs, char *err, size_t errlen);

#endif
