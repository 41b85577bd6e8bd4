/* A chained hash table of intrusive nodes, for the caches and counters the
 * workers share (client accounting, DNS answers). Entries begin with a
 * struct kt_hnode; the table never allocates or frees entries, only its
 * bucket array, and takes no lock (callers hold their own). The bucket count
 * is a power of two; FNV-1a is the hash. */
#ifndef KTRELAY_CORE_HASH_H
#define KTRELAY_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

struct kt_hnode {
    struct kt_hnode *next;
    uint64_t hash;
};

struct kt_htab {
    struct kt_hnode **b;
    size_t n_buckets;                /* 0 until the first kt_htab_resize */
    size_t n_entries;
};

#define KT_FNV_OFFSET 1469598103934665603ULL

/* FNV-1a of N bytes at P, continuing from H (start with KT_FNV_OFFSET). */
uint64_t kt_fnv1a(uint64_t h, const void *p, size_t n);

/* Rehash into N_BUCKETS (a power of two) buckets; the first call allocates. */
void kt_htab_resize(struct kt_htab *t, size_t n_buckets);

/* Where nodes of HASH are chained; the table must have buckets. Walk with
 * `for (pp = kt_htab_chain(t, h); *pp; pp = &(*pp)->next)`; unlink with
 * kt_htab_unlink(t, pp). */
struct kt_hnode **kt_htab_chain(struct kt_htab *t, uint64_t hash);

/* Link N (its hash set) at the head of its chain. */
void kt_htab_insert(struct kt_htab *t, struct kt_hnode *n);

/* Take *PP out of its chain; returns it (the caller frees it). */
struct kt_hnode *kt_htab_unlink(struct kt_htab *t, struct kt_hnode **pp);

/* Unlink every node for which DROP(node, ARG) returns 1, then pass it to
 * FREE_FN. */
void kt_htab_sweep(struct kt_htab *t, int (*drop)(const struct kt_hnode *, void *), void *arg,
                   void (*free_fn)(struct kt_hnode *));

/* Free the bucket array (not the nodes: sweep them first). */
void kt_htab_free(struct kt_htab *t);

#endif
