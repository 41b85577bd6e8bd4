/* Configuration: Postfix-compatible main.cf and master.cf, and the table of
 * parameters ktrelay knows about (with their types and Postfix defaults).
 *
 * A loaded struct kt_config is immutable: every value is expanded and
 * validated at load time, so readers in many threads never write to it. */
#ifndef KTRELAY_CONFIG_H
#define KTRELAY_CONFIG_H

#include <stddef.h>
#include <stdio.h>

/* ---- parameter table (src/params.c) ---- */

enum kt_param_type {
    KT_PARAM_STRING,
    KT_PARAM_LIST,      /* comma/whitespace separated; kept as one string */
    KT_PARAM_BOOL,      /* yes / no, case-insensitive */
    KT_PARAM_INT,
    KT_PARAM_SIZE,      /* byte counts; an int that may be large */
    KT_PARAM_TIME,      /* number with optional unit s, m, h, d, w */
};

struct kt_param_def;

/* A value check beyond the type: 0, or -EINVAL with a message that names the
 * accepted values and, when one is close, the value meant ("did you mean"). */
typedef int (*kt_param_check_fn)(const struct kt_param_def *p, const char *value, char *msg, size_t len);

struct kt_param_def {
    const char *name;
    enum kt_param_type type;
    const char *def;    /* raw default, may hold $name; NULL = computed at load */
    char unit;          /* default unit of a time parameter ('s', 'h', 'd', ...) */
    int implemented;    /* 0: a Postfix parameter ktrelay accepts and ignores */
    const char *values; /* enumerated values "a|b|c" for check (case-insensitive, as Postfix) */
    kt_param_check_fn check;  /* NULL: any value of the type */
    int policy;         /* not implemented, and it changes who may send, what is filtered or where
                         * mail goes: a non-empty value is an error unless ktrelay_ignore_unimplemented */
    int local_template; /* a local(8) template ($home, $user, $extension are the recipient's, not main.cf
                         * parameters): kept as written, never expanded, as Postfix's local(8) expands it */
};

/* Known parameter by exact (case-sensitive) name, or NULL. */
const struct kt_param_def *kt_param_find(const char *name);
/* The table in name order; i < kt_param_count(). */
size_t kt_param_count(void);
const struct kt_param_def *kt_param_at(size_t i);
/* True for implemented and for accepted-but-ignored Postfix parameters. */
int kt_param_is_known(const char *name);
/* The known name closest to NAME (case-insensitive edit distance), or NULL
 * when nothing is reasonably close. */
const char *kt_param_suggest(const char *name);

/* The candidate closest to WORD (LEN bytes; case-insensitive edit distance of
 * at most a quarter of its length, 3 at most, 1 for 3 to 7 letters), or NULL. */
const char *kt_closest(const char *word, size_t len, const char *const *candidates, size_t n);

/* Parse a value of the given type as Postfix does. Returns 0 and stores the
 * number (seconds for time, 1/0 for bool), or -EINVAL. */
int kt_param_parse_bool(const char *value, long long *out);
int kt_param_parse_int(const char *value, long long *out);
int kt_param_parse_time(const char *value, char default_unit, long long *out);

/* ---- loaded configuration (src/config.c) ---- */

struct kt_config;                 /* immutable after load; safe to read from many threads */

struct kt_service {               /* one `inet ... smtpd` line of master.cf */
    const char *name;             /* first field as written: "smtp", "127.0.0.1:2525", "[::1]:25" */
    const char *host;             /* host part if NAME had one ("127.0.0.1", "::1"), else NULL */
    int port;                     /* resolved: smtp=25, submission=587, smtps=465, numeric, or /etc/services */
    int maxproc;                  /* field 7; "-" = default_process_limit; 0 = no limit */
    const char *file;             /* where it was defined */
    int line;
};

/* Load DIR/main.cf (required) and DIR/master.cf (optional: a missing file
 * means the single service `smtp inet n - n - - smtpd`).
 * Returns 0, -EINVAL after logging every error as "FILE:LINE: message", or
 * -errno when a file cannot be read. */
int kt_config_load(const char *dir, struct kt_config **out);
/* Same from memory. MASTER_CF may be NULL (the default service). LABEL, when
 * not NULL or empty, is the directory shown in messages ("LABEL/main.cf"). */
int kt_config_load_text(const char *main_cf, const char *master_cf, const char *label,
                        struct kt_config **out);
void kt_config_free(struct kt_config *cfg);

/* 1 when a master.cf line the worker serves (an inet smtpd service, or the
 * smtp/relay unix transports) has y in its chroot field, with where the first
 * such line is; else 0. The worker is then confined (src/master/confine.h). */
int kt_config_chroot(const struct kt_config *cfg, const char **file, int *line);

size_t kt_config_service_count(const struct kt_config *cfg);
const struct kt_service *kt_config_service(const struct kt_config *cfg, size_t i);

/* Parameter value after $name expansion, with the service's -o overrides
 * applied when svc != NULL. Returns NULL for an unknown parameter name.
 * Strings live as long as cfg. */
const char *kt_config_get(const struct kt_config *cfg, const struct kt_service *svc, const char *name);
/* Typed reads; they return -1 when NAME is unknown or not of that type
 * (bool: bool; int: int or size; time: time, in seconds). */
int kt_config_get_bool(const struct kt_config *cfg, const struct kt_service *svc, const char *name);
long long kt_config_get_int(const struct kt_config *cfg, const struct kt_service *svc, const char *name);
long long kt_config_get_time(const struct kt_config *cfg, const struct kt_service *svc, const char *name);

/* Where NAME's value for SVC (NULL: main.cf) was set: 1 with *file and *line
 * (main.cf or a master.cf -o line), 0 when it is the default. */
int kt_config_where(const struct kt_config *cfg, const struct kt_service *svc, const char *name,
                    const char **file, int *line);

/* postconf / postconf -n: "name = value" lines sorted by name, raw
 * (unexpanded) values. NONDEFAULT_ONLY prints what main.cf sets; otherwise
 * every implemented parameter's effective raw value. */
void kt_config_print(const struct kt_config *cfg, FILE *out, int nondefault_only);
/* postconf NAME: one "name = value" line (raw value) for a known parameter
 * or one that main.cf defines. 0, or -ENOENT (nothing printed) otherwise. */
int kt_config_print_param(const struct kt_config *cfg, FILE *out, const char *name);

#endif
