/* Read-only lookup tables in the Postfix style, loaded once at start-up or
 * reload and then shared by every event-loop thread. Lookups never allocate,
 * never block and take no locks; a table must not be freed while a lookup
 * may still run. */
#ifndef KTRELAY_TABLE_H
#define KTRELAY_TABLE_H

#include <stddef.h>

/* spec: "texthash:/path" (plain "key value" lines, Postfix texthash), "hash:/path" and "btree:/path" and
 * "lmdb:/path" (read the TEXT source file /path, no .db needed), "cidr:/path" (Postfix cidr_table: "network/len
 * result" lines, IPv4 and IPv6, first match wins), "inline:{ key=value, { key = value } }", "static:value",
 * "regexp:/path" and "pcre:/path" (Postfix regexp_table(5)/pcre_table(5), see regexp_table.h: the key is matched
 * as given, and the result, with $n expanded, lives in a per-thread buffer until the calling thread's next
 * regexp/pcre lookup; copy it to keep it longer).
 * Key matching for text tables is case-insensitive (keys lowercased, like postmap). Comments (#), blank lines and
 * continuation lines (leading whitespace) as in postmap. kind selects the source syntax:
 * KT_TABLE_MAP = "key value", KT_TABLE_ALIASES = /etc/aliases syntax "name: value, value".
 * Malformed lines are skipped with a warning, as postmap does; an unreadable file or a bad spec is an error.
 * Functions returning int give 0 or a negative errno, with a message in err. */
enum kt_table_kind { KT_TABLE_MAP, KT_TABLE_ALIASES };

struct kt_table;
/* The table types kt_table_open reads ("texthash", "hash", ..., "static"); *n set to their count. */
const char *const *kt_table_types(size_t *n);
int kt_table_open(const char *spec, enum kt_table_kind kind, struct kt_table **out, char *err, size_t errlen);
const char *kt_table_get(const struct kt_table *t, const char *key);   /* NULL if absent */
/* Calls fn for every entry (key is NULL for static: tables); the value pointers are the ones
 * kt_table_get returns. Stops at and returns the first non-zero result of fn. */
int kt_table_foreach(const struct kt_table *t, int (*fn)(const char *key, const char *value, void *arg), void *arg);
void kt_table_free(struct kt_table *t);

/* A list of tables as in "alias_maps = hash:/etc/aliases, texthash:/etc/x": first hit wins. Empty list ok. */
struct kt_maps;
int kt_maps_open(const char *list, enum kt_table_kind kind, struct kt_maps **out, char *err, size_t errlen);
const char *kt_maps_get(const struct kt_maps *m, const char *key);
int kt_maps_foreach(const struct kt_maps *m, int (*fn)(const char *key, const char *value, void *arg), void *arg);
size_t kt_maps_count(const struct kt_maps *m);  /* number of tables in the list */
void kt_maps_free(struct kt_maps *m);

/* Domain/host lists as in mydestination, relay_domains, virtual_mailbox_domains: names, "/file/name" (one
 * entry per line), and "type:table" entries (match when the domain is a key); "!entry" negates, first match
 * wins. With match_subdomains (Postfix parent_domain_matches_subdomains: relay_domains) "example.com" also
 * matches "sub.example.com"; without it only ".example.com" does. */
struct kt_domain_list;
int kt_domain_list_open(const char *list, int match_subdomains, struct kt_domain_list **out, char *err, size_t errlen);
int kt_domain_list_match(const struct kt_domain_list *l, const char *domain);  /* case-insensitive, 1/0 */
void kt_domain_list_free(struct kt_domain_list *l);

/* Network lists as in mynetworks: "127.0.0.0/8 [::1]/128 192.168.1.1 /file type:table" (for type:table, cidr: tables).
 * Address given as text ("127.0.0.1", "::1", "::ffff:1.2.3.4" handled as IPv4). "!entry" negates. */
struct kt_net_list;
int kt_net_list_open(const char *list, struct kt_net_list **out, char *err, size_t errlen);
int kt_net_list_match(const struct kt_net_list *l, const char *addr);
void kt_net_list_free(struct kt_net_list *l);

#endif
