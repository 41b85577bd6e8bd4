/* Client accounting for smtpd's anvil limits (see anvil.h). A chained hash
 * table under one mutex: every operation is a lookup and a few increments,
 * far cheaper than the socket work around it, so one lock for all workers
 * is enough. Memory stays bounded by the clients of about one window: an
 * entry with no connection whose window has ended is removed by a sweep that
 * runs whenever the table has doubled since the last one. The clock is
 * CLOCK_MONOTONIC seconds, so wall-clock steps never stretch a window. */
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "core/alloc.h"
#include "core/hash.h"
#include "smtpd/anvil.h"

struct entry {
    struct kt_hnode node;                /* first: the table's link and hash */
    unsigned conns;                      /* simultaneous connections */
    unsigned rate[KT_ANVIL_NRATES];      /* events in the current window */
    time_t start;                        /* start of the current window */
    long long unit;                      /* window length last asked for */
    char key[];                          /* "service\0addr" */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct kt_htab table;
static unsigned long sweep_at = 1024;

static time_t now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

/* FNV-1a over "service\0addr" */
static uint64_t key_hash(const char *service, const char *addr)
{
    return kt_fnv1a(kt_fnv1a(KT_FNV_OFFSET, service, strlen(service) + 1), addr, strlen(addr));
}

static int expired(const struct kt_hnode *n, void *arg)
{
    const struct entry *e = (const struct entry *)n;
    return e->conns == 0 && e->start + e->unit < *(const time_t *)arg;
}

static void free_entry(struct kt_hnode *n)
{
    kt_free(n);
}

static void sweep(time_t now)
{
    kt_htab_sweep(&table, expired, &now, free_entry);
    sweep_at = table.n_entries * 2 > 1024 ? table.n_entries * 2 : 1024;
}

/* The entry for service and addr, its window brought up to date; created
 * when create is set. Called with the lock held. */
static struct entry *lookup(const char *service, const char *addr, long long unit, int create)
{
    uint64_t h = key_hash(service, addr);
    size_t sl = strlen(service), al = strlen(addr);
    time_t now = now_s();
    struct entry *e = NULL;

    if (table.n_buckets) {
        for (struct kt_hnode **pp = kt_htab_chain(&table, h); *pp; pp = &(*pp)->next) {
            struct entry *c = (struct entry *)*pp;
            if (c->node.hash == h && memcmp(c->key, service, sl + 1) == 0 && strcmp(c->key + sl + 1, addr) == 0) {
                e = c;
                break;
            }
        }
    }
    if (!e) {
        if (!create)
            return NULL;
        if (table.n_entries >= sweep_at)
            sweep(now);
        if (table.n_entries >= table.n_buckets)
            kt_htab_resize(&table, table.n_buckets ? table.n_buckets * 2 : 256);
        e = kt_calloc(1, sizeof(*e) + sl + al + 2);
        e->node.hash = h;
        memcpy(e->key, service, sl + 1);
        memcpy(e->key + sl + 1, addr, al + 1);
        e->start = now;
        e->unit = unit > 0 ? unit : 1;
        kt_htab_insert(&table, &e->node);
    }
    if (unit > 0)
        e->unit = unit;
    if (e->start + e->unit < now) {
        /* anvil(8): a new window starts with the first event after the old one ended */
        memset(e->rate, 0, sizeof(e->rate));
        e->start = now;
    }
    return e;
}

void kt_anvil_connect(const char *service, const char *addr, long long unit_s, unsigned *count, unsigned *rate)
{
    pthread_mutex_lock(&lock);
    struct entry *e = lookup(service, addr, unit_s, 1);
    e->conns++;
    if (e->rate[KT_ANVIL_CONN] < UINT_MAX)
        e->rate[KT_ANVIL_CONN]++;
    *count = e->conns;
    *rate = e->rate[KT_ANVIL_CONN];
    pthread_mutex_unlock(&lock);
}

void kt_anvil_disconnect(const char *service, const char *addr)
{
    pthread_mutex_lock(&lock);
    struct entry *e = lookup(service, addr, 0, 0);
    if (e && e->conns)
        e->conns--;
    pthread_mutex_unlock(&lock);
}

unsigned kt_anvil_event(const char *service, const char *addr, enum kt_anvil_rate ev, long long unit_s)
{
    pthread_mutex_lock(&lock);
    struct entry *e = lookup(service, addr, unit_s, 1);
    if (e->rate[ev] < UINT_MAX)
        e->rate[ev]++;
    unsigned r = e->rate[ev];
    pthread_mutex_unlock(&lock);
    return r;
}

unsigned kt_anvil_peek(const char *service, const char *addr, enum kt_anvil_rate ev, long long unit_s)
{
    pthread_mutex_lock(&lock);
    struct entry *e = lookup(service, addr, unit_s, 0);
    unsigned r = e ? e->rate[ev] : 0;
    pthread_mutex_unlock(&lock);
    return r;
}

unsigned long kt_anvil_size(void)
{
    pthread_mutex_lock(&lock);
    unsigned long n = table.n_entries;
    pthread_mutex_unlock(&lock);
    return n;
}
