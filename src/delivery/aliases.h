/* Alias databases (aliases(5)) for local delivery: alias_maps tables plus the
 * :include: files they name, all read at load time so that expansion never
 * touches the file system. Read-only after kt_aliases_open. */
#ifndef KTRELAY_ALIASES_H
#define KTRELAY_ALIASES_H

#include <stddef.h>

enum kt_alias_type {
    KT_ALIAS_LOCAL,     /* "name": local recipient, subject to further alias expansion */
    KT_ALIAS_USER,      /* "\name": the user's own mailbox, no further expansion */
    KT_ALIAS_ADDRESS,   /* "user@domain" */
    KT_ALIAS_INCLUDE,   /* ":include:/file": buffer holds the path */
    KT_ALIAS_COMMAND,   /* "|command" */
    KT_ALIAS_FILE,      /* "/file/name" */
    KT_ALIAS_INVALID,   /* too long for the buffer, or ":include:" of a relative path */
};

struct kt_aliases;
/* alias_maps: list of tables in /etc/aliases syntax. Fails (negative errno, message in err)
 * if a table or an :include: file cannot be read. */
int kt_aliases_open(const char *alias_maps, struct kt_aliases **out, char *err, size_t errlen);
/* Comma list of targets for a local name (case-insensitive), NULL if it has no alias. */
const char *kt_aliases_get(const struct kt_aliases *a, const char *name);
/* Targets listed in an :include: file, NULL if the file was not named by any alias. */
const char *kt_aliases_include(const struct kt_aliases *a, const char *path);
/* Copies the next target of the list at *cursor into buf (quotes removed, prefix "\" or
 * ":include:" stripped) and advances *cursor. Returns 1 with *type set, 0 at the end.
 * Allocation-free. */
int kt_alias_next(const char **cursor, char *buf, size_t len, enum kt_alias_type *type);
void kt_aliases_free(struct kt_aliases *a);

#endif
