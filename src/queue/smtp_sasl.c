/* Smarthost credentials and the mechanism filter (see smtp_sasl.h). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "queue/smtp_client.h"
#include "queue/smtp_sasl.h"

static const char *get(const struct kt_maps *maps, const char *key)
{
    return key && *key ? kt_maps_get(maps, key) : NULL;
}

const char *kt_smtp_sasl_lookup(const struct kt_maps *maps, const struct kt_smtp_sasl_keys *k)
{
    char key[600];
    const char *v;

    if (!maps)
        return NULL;
    if (k->sender_dependent && k->sender && *k->sender) {
        if ((v = get(maps, k->sender)))
            return v;
        const char *at = strrchr(k->sender, '@');
        if (at && (v = get(maps, at)))
            return v;
    }
    if ((v = get(maps, k->server)))
        return v;
    const char *nh = k->nexthop ? k->nexthop : "";
    if ((v = get(maps, nh)))
        return v;
    if (nh[0] == '[') {
        const char *end = strchr(nh, ']');
        if (!end)
            return NULL;
        if (end[1] && snprintf(key, sizeof(key), "%.*s", (int)(end - nh + 1), nh) < (int)sizeof(key) &&
            (v = get(maps, key)))
            return v;
        snprintf(key, sizeof(key), "%.*s", (int)(end - nh - 1), nh + 1);
        return get(maps, key);
    }
    const char *colon = strrchr(nh, ':');
    if (colon) {
        snprintf(key, sizeof(key), "%.*s", (int)(colon - nh), nh);
        return get(maps, key);
    }
    return NULL;
}

int kt_smtp_sasl_split(const char *value, char **username, char **password)
{
    const char *colon = value ? strchr(value, ':') : NULL;
    *username = *password = NULL;
    if (!colon || colon == value)
        return -EINVAL;
    *username = kt_strndup(value, (size_t)(colon - value));
    *password = kt_strdup(colon + 1);
    return 0;
}

int kt_smtp_sasl_filter(const char *filter, unsigned *mechs, char *err, size_t errlen)
{
    static const struct { const char *name; unsigned bit; } known[] = {
        { "PLAIN", KT_SMTP_MECH_PLAIN }, { "LOGIN", KT_SMTP_MECH_LOGIN },
    };
    char *copy = kt_strdup(filter ? filter : ""), *save = NULL;
    int any = 0, rc = 0;

    *mechs = 0;
    /* each mechanism takes the verdict of the first entry that matches it */
    unsigned decided = 0;
    for (char *tok = strtok_r(copy, ", \t\r\n", &save); tok; tok = strtok_r(NULL, ", \t\r\n", &save)) {
        int neg = tok[0] == '!';
        const char *name = tok + neg;
        any = 1;
        unsigned match = 0;
        if (!strncasecmp(name, "static:", 7)) {
            match = KT_SMTP_MECH_PLAIN | KT_SMTP_MECH_LOGIN;
        } else if (name[0] == '/' || strchr(name, ':')) {
            snprintf(err, errlen, "\"%s\": ktrelay takes mechanism names, \"!name\" and static:all here, not tables "
                     "or files", tok);
            rc = -EINVAL;
            break;
        } else {
            for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
                if (!strcasecmp(name, known[i].name))
                    match = known[i].bit;
        }
        match &= ~decided;
        decided |= match;
        if (!neg)
            *mechs |= match;
    }
    kt_free(copy);
    if (!any)
        *mechs = KT_SMTP_MECH_PLAIN | KT_SMTP_MECH_LOGIN;
    return rc;
}
