/* Postfix regexp_table(5) and pcre_table(5) lookup tables on one engine, libpcre2-8.
 * A table is an ordered list of rules read from a file:
 *     /pattern/flags  result        the first rule whose pattern matches gives the result
 *     !/pattern/flags result        ...or whose pattern does not match
 *     /pat1/!/pat2/   result        (regexp: only) pat1 matches and pat2 does not
 *     if /pattern/flags ... endif   the enclosed rules apply only when the pattern matches (if ! too; nested)
 * Any non-space, non-alphanumeric character other than '\' may be the delimiter; '\' escapes it inside
 * the pattern. Flags: `i` toggles case-insensitive matching (on by default), `m` multi-line; pcre: also `s`
 * (dot matches newline), `x` (extended), `A` (anchored), `E` (dollar matches only at the end), `U`
 * (ungreedy), `X` (accepted for compatibility, no effect). regexp: tables are POSIX extended syntax, which
 * PCRE reads the same way for the constructs Postfix users write; `x` (basic syntax) is not supported. The
 * result may use $1..$n (also ${n} and $(n)) for what the corresponding group matched (empty when it did
 * not take part) and $$ for a dollar. As postmap does, a rule that does not compile, a bad flag, a
 * replacement index beyond the pattern's groups or a $n in a negated rule's result is skipped with a
 * warning naming the file and line; an `if` without `endif` is closed at the end of the file, an `endif`
 * without `if` is ignored, both with a warning. Keys are matched as given (never lowercased). Lookups may
 * allocate (pcre2 match data) and are bounded by a match limit, so a pathological pattern cannot stall a
 * thread; a lookup that hits the limit counts as no match and is logged. A table is read-only once loaded
 * and may be used by any number of threads at once. */
#ifndef KTRELAY_REGEXP_TABLE_H
#define KTRELAY_REGEXP_TABLE_H

#include <stddef.h>

struct kt_regexp_table;

/* An empty table; pcre_syntax selects pcre: (1) or regexp: (0) rules. name is used in warnings. */
struct kt_regexp_table *kt_regexp_table_new(const char *name, int pcre_syntax);
/* One logical line (comments and continuation already handled by the caller), lineno its first line. */
void kt_regexp_table_add_line(struct kt_regexp_table *t, const char *line, unsigned lineno);
/* After the last line: closes open if blocks (with a warning). Returns how
 * many rules could not be read (each logged with its line, as postmap does);
 * Postfix skips them, ktrelay refuses the table (a REJECT rule with a typo
 * must not silently stop applying). */
unsigned kt_regexp_table_finish(struct kt_regexp_table *t);
/* The result of the first matching rule, $n expanded, written into buf (NUL-terminated, cut at
 * buflen - 1); returns buf, or NULL when no rule matches. */
const char *kt_regexp_table_get(const struct kt_regexp_table *t, const char *key, char *buf, size_t buflen);
/* fn(NULL, result text before expansion) for every rule, in file order; stops at the first non-zero. */
int kt_regexp_table_foreach(const struct kt_regexp_table *t, int (*fn)(const char *key, const char *value, void *arg),
                            void *arg);
void kt_regexp_table_free(struct kt_regexp_table *t);

#endif
