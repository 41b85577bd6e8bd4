/* Recipient resolution: Postfix address classes (local, virtual, relay,
 * default), alias expansion and mailbox lookup. A resolver is built at
 * start-up or reload from plain configuration strings and is then shared
 * read-only by all event-loop threads: resolving never blocks, never allocates
 * and takes no locks. */
#ifndef KTRELAY_RESOLVE_H
#define KTRELAY_RESOLVE_H

#include <stddef.h>

/* Configuration values as they appear in main.cf after $name expansion. NULL or "" = empty. */
struct kt_resolve_config {
    const char *myhostname, *mydestination, *relay_domains, *virtual_mailbox_domains, *virtual_mailbox_base,
               *virtual_mailbox_maps, *virtual_uid_maps, *virtual_gid_maps, *alias_maps, *home_mailbox,
               *inet_interfaces_addrs;  /* space-separated local IP addresses for [ip] literal matching; may be NULL */
    const char *passwd_file;  /* NULL = system users through NSS (getpwnam_r) at each lookup, so new
                               * users work at once; a file (tests): passwd(5) lines read once here */
    const char *mail_owner;   /* started as root: the default owner of virtual mailboxes
                               * (else the process's own uid and gid); NULL = none */
    /* Postfix trivial-rewrite address completion (kt_resolve_complete) */
    const char *myorigin, *mydomain;   /* NULL or "" = $myhostname, and no mydomain */
    int append_at_myorigin;            /* Postfix default yes (settings.c passes it) */
    int append_dot_mydomain;           /* Postfix >= 3.0 default no */
    const char *default_privs;         /* owner of mail for uid 0; NULL = "nobody" */
    const char *virtual_alias_domains; /* Postfix virtual alias class (default $virtual_alias_maps: the
                                        * domains that are keys of those tables); NULL = none */
    const char *recipient_delimiter;   /* extension delimiters ("+", "+-"); NULL or "" = none */
    int unknown_local_code;            /* unknown_local_recipient_reject_code: 4xx or 5xx; 0 = 550 */
};

/* Postfix's address classes; KT_CLASS_ALIAS is the virtual alias class (virtual_alias_domains): an
 * authorized destination with no mailboxes of its own, every address of which must be rewritten by
 * virtual_alias_maps (delivery/rewrite.h) before it is resolved. */
enum kt_addr_class { KT_CLASS_LOCAL, KT_CLASS_VIRTUAL, KT_CLASS_RELAY, KT_CLASS_DEFAULT, KT_CLASS_ALIAS };

struct kt_mailbox {
    const char *path;   /* absolute Maildir path ending in '/'; owned by the resolver */
    unsigned uid, gid;  /* never 0 for a local user: root's mail is owned by default_privs */
    const char *home;   /* local(8) class: the user's home directory, which holds the
                         * Maildir (home_mailbox); NULL for virtual mailboxes */
    size_t keep;        /* leading bytes of path that must exist already (a user's home): never created */
    const char *user;   /* local(8) class: the user's login name (owned by the resolver); NULL for virtual */
};

#define KT_RESOLVE_MAX_MAILBOXES 16
#define KT_RESOLVE_MAX_FORWARD 8

struct kt_resolve_result {
    enum kt_addr_class cls;
    const char *reply;            /* NULL if deliverable/relayable; else a complete reply line without CRLF */
    size_t n_mailboxes;           /* local + virtual: Maildirs to deliver into (after alias expansion, deduped) */
    struct kt_mailbox mailboxes[KT_RESOLVE_MAX_MAILBOXES];
    size_t n_forward;             /* alias targets that are not local (remote addresses): kept for the relay work */
    char forward[KT_RESOLVE_MAX_FORWARD][256];
    size_t n_skipped;             /* alias targets left out (unknown users, too deep, too long; |command,
                                   * /file and invalid targets refuse the whole recipient instead) */
    const char *skip_reason;      /* why the last one was left out (static text), NULL if none */
    char skip_target[256];        /* that target, as written in the aliases (cut to fit) */
    int unlisted;                 /* reply says the address is in neither local_recipient_maps (no such
                                   * user or alias) nor virtual_mailbox_maps: reject_unlisted_sender's test */
    int unknown_user;             /* reply is "User unknown in local recipient table", with
                                   * unknown_local_recipient_reject_code (450 while migrating): a
                                   * message already accepted for such a user bounces (local(8)) */
    char reply_buf[600];          /* storage behind reply: copy a result with memcpy and re-point reply,
                                   * or better, do not copy it */
};

struct kt_resolver;
/* Returns 0 or a negative errno with a message in err. */
int kt_resolver_new(const struct kt_resolve_config *c, struct kt_resolver **out, char *err, size_t errlen);
void kt_resolver_free(struct kt_resolver *r);
/* addr: envelope recipient without brackets. Never blocks, never allocates (result written into *res). */
void kt_resolve_recipient(const struct kt_resolver *r, const char *addr, struct kt_resolve_result *res);
/* Logs (warning) the alias targets res left out of an accepted recipient's expansion, so that no part
 * of an alias is dropped unseen: Postfix's local(8) bounces such a target, ktrelay delivers to the
 * others and logs it. queue_id: the message's id, or NULL ("NOQUEUE"). Nothing when res has a reply or
 * skipped nothing. */
void kt_resolve_warn_skipped(const struct kt_resolve_result *res, const char *queue_id, const char *addr);
/* The same note without the id ("to=<addr>: 1 alias target not delivered, ...") into OUT: 1 when there is
 * one, 0 when res has a reply or skipped nothing (OUT is then ""). For a caller that logs it later, once
 * the message is accepted. */
int kt_resolve_skipped_note(const struct kt_resolve_result *res, const char *addr, char *out, size_t outlen);
/* Postfix's address completion for envelope addresses (trivial-rewrite, "local" context): an address
 * without a domain gets "@$myorigin" when append_at_myorigin is on, and a domain without a dot gets
 * ".$mydomain" when append_dot_mydomain is on (not an address literal). So with "mydestination =" a bare
 * <root> from a client is root@$myorigin, a remote address, and refused unless the client may relay.
 * out gets the completed address. Returns 0, or -ENAMETOOLONG when it does not fit in outlen. */
int kt_resolve_complete(const struct kt_resolver *r, const char *addr, char *out, size_t outlen);
/* Calls fn for every Maildir the resolver knows (virtual mailboxes, users' home mailboxes); stops at the
 * first non-zero return and returns it. For start-up housekeeping. */
int kt_resolver_foreach_mailbox(const struct kt_resolver *r, int (*fn)(const char *maildir, void *arg), void *arg);
/* 1 when addr (virtual class) has an entry in virtual_mailbox_maps, the address or its "@domain", whatever
 * the value: Postfix's smtpd recipient check when another transport than virtual(8) delivers (lmtp:, where
 * the table only lists who exists). */
int kt_resolve_virtual_listed(const struct kt_resolver *r, const char *addr);
/* Class of a domain ("example.com", "[192.0.2.1]"; NULL or "" = local), in trivial-rewrite's order:
 * local (mydestination, this host's [address]), virtual alias, virtual mailbox, relay, default. */
enum kt_addr_class kt_resolve_class(const struct kt_resolver *r, const char *domain);
/* Postfix's split_addr: the length of the part of local part lp (len bytes) before its address extension
 * (the first character of delims), or len when it has none: no delimiters, a delimiter at the start or
 * the end, postmaster and MAILER-DAEMON, and, when '-' is a delimiter, "owner-*" and "*-request". */
size_t kt_addr_unextended(const char *delims, const char *lp, size_t len);
/* The resolver's recipient_delimiter ("" = none). */
const char *kt_resolve_delimiter(const struct kt_resolver *r);

#endif
