/* Relay control in Postfix's terms: the address rewriting that decides where
 * a recipient really goes (percent hack, bang paths, quoted local parts,
 * source routes) and the smtpd_*_restrictions lists, evaluated together at
 * RCPT time as with smtpd_delay_reject = yes. A policy is built once per
 * (re)load and shared read-only by the workers; checks never block. */
#ifndef KTRELAY_POLICY_H
#define KTRELAY_POLICY_H

#include <stddef.h>

#include "delivery/resolve.h"
#include "smtpd/client_dns.h"

struct kt_net_list;

/* ---- addresses ---- */

enum { KT_ADDR_PERCENT_HACK = 1, KT_ADDR_SWAP_BANGPATH = 2, KT_ADDR_DEQUOTE = 4 };

struct kt_resolved_addr {
    char addr[520];           /* final address after rewriting, "user@domain" (no domain: local user) */
    enum kt_addr_class cls;   /* class of its domain */
    int routed;               /* sender-specified routing remains: never an authorized destination */
    int rewritten;            /* addr differs from the input beyond dequoting */
};

/* Like trivial-rewrite(8): a local domain (mydestination, [local IP]) is stripped and what remains is looked
 * at again, "user%host" becoming "user@host" (KT_ADDR_PERCENT_HACK) and "host!user" becoming "user@host"
 * (KT_ADDR_SWAP_BANGPATH); with KT_ADDR_DEQUOTE a quoted local part is read without its quotes, so an '@'
 * hidden inside counts. What is left without a domain is completed by kt_resolve_complete
 * (append_at_myorigin: "root" is root@$myorigin, of $myorigin's class). had_route: the SMTP path carried a
 * source route. */
void kt_addr_resolve(const struct kt_resolver *r, unsigned flags, const char *addr, int had_route,
                     struct kt_resolved_addr *out);

/* ---- restrictions ---- */

struct kt_policy_config {
    const char *client_restrictions, *helo_restrictions, *sender_restrictions, *relay_restrictions,
               *recipient_restrictions;
    const char *sender_login_maps;
    const char *relay_clientcerts;   /* tables: client certificate (or public key) fingerprint -> anything */
    int reject_unlisted_sender;      /* smtpd_reject_unlisted_sender */
    unsigned addr_flags;             /* KT_ADDR_* from allow_percent_hack, swap_bangpath, resolve_dequoted_address */
    const struct kt_resolver *resolver;      /* not owned */
    const struct kt_net_list *mynetworks;    /* not owned */
    const char *rbl_reply_maps;      /* rbl_reply_maps: reply templates by DNS list domain */
};

struct kt_policy;
/* Returns 0, or -EINVAL (unknown restriction, missing or unreadable table, no relay protection at all)
 * with a message in err. */
int kt_policy_new(const struct kt_policy_config *c, struct kt_policy **out, char *err, size_t errlen);
void kt_policy_free(struct kt_policy *p);
unsigned kt_policy_addr_flags(const struct kt_policy *p);

struct kt_policy_request {
    const char *client_addr;      /* "192.0.2.1", "2001:db8::1" */
    const char *helo;             /* "" if none */
    const char *sender;           /* "" for the null sender */
    const char *recipient;        /* as received, route stripped */
    int recipient_had_route;
    const char *sasl_username;    /* NULL unless authenticated */
    int ccert_trusted;            /* a client certificate that verifies (permit_tls_all_clientcerts) */
    const char *ccert_fp;         /* its fingerprint, NULL without one (permit_tls_clientcerts) */
    const char *ccert_pkey_fp;    /* its public key's fingerprint, NULL without one */
    int esmtp;                    /* the client said EHLO */
    int pipelined;                /* input was waiting behind this command */
    /* client names, as Postfix's smtpd_peer: name is forward-confirmed ("unknown" otherwise),
     * reverse_name is what the PTR lookup gave; statuses KT_NAME_* */
    const char *client_name;      /* NULL = "unknown" */
    int client_name_status;
    const char *reverse_name;     /* NULL = "unknown" */
    int reverse_name_status;
    /* DNS answers come from the cache (client_dns.h). With needs set, a restriction whose answer is
     * missing adds its queries there and counts as not matching, and the check returns
     * KT_POLICY_NEED_DNS when any were added; with needs NULL a missing answer is a lookup failure. */
    struct kt_dns_needs *needs;
    const struct kt_dns_result *answers;   /* answers fetched for this check, looked at before the cache */
    unsigned n_answers;
    /* Out: an access table's "FILTER transport:nexthop" (access(5)) met during the evaluation, the last
     * one winning, as Postfix; it does not end the evaluation. NULL: FILTER is ignored. */
    char *filter;                 /* KT_FILTER_MAX bytes, left alone when no FILTER matched */
};

#define KT_FILTER_MAX 256

enum { KT_NAME_OK, KT_NAME_PERM, KT_NAME_TEMP };

#define KT_POLICY_NEED_DNS 2

struct kt_dns_needs {
    unsigned n;
    struct {
        int type;
        char name[KT_DNS_RR_LEN];
    } v[24];
};

/* Evaluates smtpd_client, helo, sender, relay and recipient restrictions in that order. Fills *ra with
 * the recipient's resolution. Returns 0 when permitted, 1 with a complete reply line (no CRLF) in
 * reply, or KT_POLICY_NEED_DNS (see kt_policy_request.needs): fetch the answers and check again. */
int kt_policy_check_rcpt(const struct kt_policy *p, const struct kt_policy_request *r, struct kt_resolved_addr *ra,
                         char *reply, size_t replylen);

/* mynetworks computed from mynetworks_style ("host", "subnet", "class") and this machine's interfaces,
 * as Postfix does when mynetworks is not set. Returns a list for kt_net_list_open (kt_free it). */
char *kt_mynetworks_from_style(const char *style);

#endif
