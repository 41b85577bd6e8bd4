/* Chained hash table of intrusive nodes (see hash.h). */
#include "core/alloc.h"
#include "core/hash.h"

uint64_t kt_fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

void kt_htab_resize(struct kt_htab *t, size_t nb)
{
    struct kt_hnode **nbk = kt_calloc(nb, sizeof(*nbk));
    for (size_t i = 0; i < t->n_buckets; i++) {
        struct kt_hnode *e, *next;
        for (e = t->b[i]; e; e = next) {
            next = e->next;
            e->next = nbk[e->hash & (nb - 1)];
            nbk[e->hash & (nb - 1)] = e;
        }
    }
    kt_free(t->b);
    t->b = nbk;
    t->n_buckets = nb;
}

struct kt_hnode **kt_htab_chain(struct kt_htab *t, uint64_t hash)
{
    return &t->b[hash & (t->n_buckets - 1)];
}

void kt_htab_insert(struct kt_htab *t, struct kt_hnode *n)
{
    struct kt_hnode **pp = kt_htab_chain(t, n->hash);
    n->next = *pp;
    *pp = n;
    t->n_entries++;
}

struct kt_hnode *kt_htab_unlink(struct kt_htab *t, struct kt_hnode **pp)
{
    struct kt_hnode *n = *pp;
    *pp = n->next;
    t->n_entries--;
    return n;
}

void kt_htab_sweep(struct kt_htab *t, int (*drop)(const struct kt_hnode *, void *), void *arg,
                   void (*free_fn)(struct kt_hnode *))
{
    for (size_t i = 0; i < t->n_buckets; i++) {
        struct kt_hnode **pp = &t->b[i];
        while (*pp) {
            if (drop(*pp, arg))
                free_fn(kt_htab_unlink(t, pp));
            else
                pp = &(*pp)->next;
        }
    }
}

void kt_htab_free(struct kt_htab *t)
{
    kt_free(t->b);
    t->b = NULL;
    t->n_buckets = t->n_entries = 0;
}
