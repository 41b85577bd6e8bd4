/* Address rewriting as Postfix's cleanup(8) does it before a message is
 * queued: canonical mapping of the envelope sender (sender_canonical_maps,
 * then canonical_maps) and recipients (recipient_canonical_maps, then
 * canonical_maps), each one-to-one and repeated until the address stops
 * changing, then virtual alias expansion of every recipient
 * (virtual_alias_maps): recursive and one-to-many, with Postfix's nesting and
 * size limits, an address that expands to itself kept as it is. Lookups go in
 * Postfix's order (user+ext@domain, user@domain, then for a local domain
 * user+ext and user, then @domain) with recipient_delimiter and
 * propagate_unmatched_extensions. A rewriter is built once per configuration
 * generation and shared read-only by every thread; its functions never block. */
#ifndef KTRELAY_REWRITE_H
#define KTRELAY_REWRITE_H

#include <stddef.h>

#include "delivery/resolve.h"

/* main.cf values after $name expansion; NULL or "" = empty. */
struct kt_rewrite_config {
    const char *virtual_alias_maps;
    const char *canonical_maps, *sender_canonical_maps, *recipient_canonical_maps;
    /* which addresses each canonical table applies to: "envelope_sender", "envelope_recipient",
     * "header_sender", "header_recipient" (only the envelope ones are rewritten here) */
    const char *canonical_classes, *sender_canonical_classes, *recipient_canonical_classes;
    const char *propagate_unmatched_extensions;   /* "canonical, virtual" (Postfix's default) */
    long long virtual_alias_expansion_limit;      /* addresses one recipient may become (1000) */
    long long virtual_alias_recursion_limit;      /* nesting depth (1000) */
    const struct kt_resolver *resolver;           /* not owned: local domains, recipient_delimiter */
};

struct kt_rewrite;

/* 0 or a negative errno (a table that cannot be read) with a message in err. */
int kt_rewrite_new(const struct kt_rewrite_config *c, struct kt_rewrite **out, char *err, size_t errlen);
void kt_rewrite_free(struct kt_rewrite *rw);
/* 1 when rw has any table (canonical or virtual alias); 0 for NULL or none: nothing to rewrite. */
int kt_rewrite_active(const struct kt_rewrite *rw);

/* The envelope sender through sender_canonical_maps and canonical_maps (envelope_sender class). out gets
 * the result (the address itself when nothing matched; the null sender stays null). Returns 1 when it
 * changed, 0 when not, -ENAMETOOLONG when it does not fit. */
int kt_rewrite_sender(const struct kt_rewrite *rw, const char *addr, char *out, size_t outlen);

/* One recipient's final addresses. */
struct kt_rewrite_result {
    size_t n;
    char **addrs;          /* kt_malloc'ed, distinct (case-insensitively), in expansion order */
    int aliased;           /* virtual_alias_maps matched */
};
/* recipient_canonical_maps and canonical_maps (envelope_recipient class), then virtual_alias_maps. Returns
 * 0 with res filled (at least one address), or, leaving res empty and logging Postfix's warning:
 * -ELOOP (virtual_alias_recursion_limit), -E2BIG (virtual_alias_expansion_limit) or -ENAMETOOLONG (an
 * address over 1000 bytes); Postfix then does not accept the message, ktrelay refuses the recipient
 * with a temporary error. queue_id names the message in the warning. */
int kt_rewrite_recipient(const struct kt_rewrite *rw, const char *queue_id, const char *addr,
                         struct kt_rewrite_result *res);
void kt_rewrite_result_free(struct kt_rewrite_result *res);

/* A whole envelope rewritten at once, for local submission (sendmail, pickup), where Postfix's cleanup
 * does the same: the sender, then every recipient, results distinct across recipients. */
struct kt_rewrite_envelope {
    char *sender;
    size_t n;
    char **rcpts;          /* final recipients */
    char **origs;          /* for each, the address it was submitted as */
    size_t *src;           /* for each, the index of that address in the rcpts given */
};
/* rw NULL: copied unchanged. 0, or the error of the first recipient that cannot be rewritten (see
 * kt_rewrite_recipient; *failed names it) with nothing left allocated. */
int kt_rewrite_envelope(const struct kt_rewrite *rw, const char *queue_id, const char *sender,
                        const char *const *rcpts, size_t n, struct kt_rewrite_envelope *out, const char **failed);
void kt_rewrite_envelope_free(struct kt_rewrite_envelope *e);

#endif
