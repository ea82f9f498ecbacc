/*
 * mound.h — benchmark code only (never shipped): the mound of Y. Liu and M. Spear,
 * "Mounds: Array-Based Concurrent Priority Queues", ICPP 2012, in its locking variant, so
 * that bench_pq can show the published alternative to our skiplist side by side with it
 * (issue 16 asks for that before any switch).
 *
 * Why the locking variant: the paper's lock-free mound needs a double-word CAS on two
 * different nodes (emulated in software where the hardware has none, x86-64 included) and
 * ran slower in the authors' own figures than the locking one. So this is the mound at
 * its fastest, and it is not lock-free: it answers "would the mound be faster", not "could
 * we ship it".
 *
 * Shape: a complete binary tree kept level by level (level d holds 2^d nodes, allocated
 * when the tree grows). Each node holds a sorted singly linked list of items; a node's
 * value is its list's head (an empty node is +infinity), and every node's value is at most
 * its children's (the mound invariant).
 *   - Insert(k): pick a random leaf whose value is >= k (MOUND_TRIES tries, then grow a
 *     level: a new level is all empty, so any of its leaves qualifies); the values on the
 *     leaf-to-root path descend, so binary search it (unlocked reads of each node's head key
 *     copy, a hint) for the topmost node n with value >= k; lock n's parent and n (top
 *     down), check that parent < k <= n still holds and push k at the front of n's list
 *     (else unlock and retry). O(log log n) node reads.
 *   - ExtractMin: lock the root, take its list's head, then restore the invariant
 *     hand over hand (moundify): holding a node, lock both children; if the smaller child
 *     is smaller than the node, swap the two nodes' lists and continue at that child, else
 *     stop. O(log n), three locks per level.
 * Every lock is taken top down (a parent before its children, a left child before its
 * right sibling), so there is no deadlock. The root is never left violating the invariant
 * while unlocked, so the root's head is the minimum of every completed insert: strict and
 * linearizable (at the root lock for extract, at the child's lock for insert).
 * Keys are the queue's four words (arrival ticket last, from an atomic counter), items are
 * malloc'ed and freed per operation, as a user writing this would.
 */
#ifndef PA_BENCH_MOUND_H
#define PA_BENCH_MOUND_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/native/atomics.h" /* relative: bench_pq and its test both include this */
#include "bench_util.h"

#define MOUND_MAX_LEVELS 25 /* 2^24 nodes in the last level (1 GiB): ENOMEM beyond */
#define MOUND_TRIES 8       /* random leaves tried before the tree grows a level */

typedef struct mound_item {
    uint64_t k[4];
    uint64_t value;
    struct mound_item *next;
} mound_item_t;

typedef struct mound_node {
    PA_CACHE_ALIGNED _Atomic uint32_t lock;
    /* a copy of the list head's key for the unlocked binary search (all ones: empty);
     * written under the lock, read without it, so a reader may see a torn key: it is
     * only a hint, checked again under the lock */
    _Atomic uint64_t hk[4];
    mound_item_t *list; /* under the lock */
} mound_node_t;

typedef struct mound {
    mound_node_t *level[MOUND_MAX_LEVELS];
    _Atomic uint32_t levels; /* levels allocated: 0 .. levels-1 */
    pthread_mutex_t grow;
    PA_CACHE_ALIGNED _Atomic uint64_t arrival;
} mound_t;

static inline void mound_lock(mound_node_t *n) {
    for (;;) {
        /* acq_rel exchange: acquire pairs with mound_unlock's release */
        if (!pa__exchange_acq_rel(&n->lock, 1)) return;
        while (pa__load_relaxed(&n->lock)) pa__cpu_relax();
    }
}
static inline void mound_unlock(mound_node_t *n) { pa__store_release(&n->lock, 0); }

static inline bool mound_key_less(const uint64_t *a, const uint64_t *b) {
    if (a[0] != b[0]) return a[0] < b[0];
    if (a[1] != b[1]) return a[1] < b[1];
    if (a[2] != b[2]) return a[2] < b[2];
    return a[3] < b[3];
}

static const uint64_t mound_empty[4] = {UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX};

/* The node's value under its lock. */
static inline const uint64_t *mound_value(const mound_node_t *n) { return n->list ? n->list->k : mound_empty; }

/* The unlocked hint, copied out word by word. */
static inline void mound_hint(mound_node_t *n, uint64_t out[4]) {
    for (int w = 0; w < 4; w++) out[w] = pa__load_relaxed(&n->hk[w]);
}

/* After n's list changed (under its lock). */
static inline void mound_publish(mound_node_t *n) {
    const uint64_t *v = mound_value(n);
    for (int w = 0; w < 4; w++) pa__store_relaxed(&n->hk[w], v[w]);
}

static mound_node_t *mound_level_alloc(uint32_t d) {
    size_t count = (size_t)1 << d;
    mound_node_t *a = aligned_alloc(PA_CACHE_LINE, count * sizeof *a);
    if (!a) return NULL;
    memset(a, 0, count * sizeof *a);
    for (size_t i = 0; i < count; i++)
        for (int w = 0; w < 4; w++) pa__store_relaxed(&a[i].hk[w], UINT64_MAX);
    return a;
}

static mound_t *mound_create(void) {
    mound_t *m = aligned_alloc(PA_CACHE_LINE, sizeof *m);
    if (!m) return NULL;
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->grow, NULL);
    m->level[0] = mound_level_alloc(0);
    if (!m->level[0]) {
        free(m);
        return NULL;
    }
    pa__store_release(&m->levels, 1);
    return m;
}

static void mound_destroy(mound_t *m) {
    uint32_t levels = pa__load_relaxed(&m->levels);
    for (uint32_t d = 0; d < levels; d++) {
        for (size_t i = 0; i < ((size_t)1 << d); i++) {
            mound_item_t *it = m->level[d][i].list;
            while (it) {
                mound_item_t *next = it->next;
                free(it);
                it = next;
            }
        }
        free(m->level[d]);
    }
    pthread_mutex_destroy(&m->grow);
    free(m);
}

/* Adds a level when the tree still has `seen` levels (another thread may have grown it). */
static int mound_grow(mound_t *m, uint32_t seen) {
    int rc = 0;
    pthread_mutex_lock(&m->grow);
    if (pa__load_relaxed(&m->levels) == seen) {
        if (seen >= MOUND_MAX_LEVELS) {
            rc = -ENOMEM;
        } else if (!(m->level[seen] = mound_level_alloc(seen))) {
            rc = -ENOMEM;
        } else {
            /* release: the new level's nodes are initialized before anyone indexes it */
            pa__store_release(&m->levels, seen + 1);
        }
    }
    pthread_mutex_unlock(&m->grow);
    return rc;
}

static _Thread_local uint64_t mound_rng;

static int mound_push(mound_t *m, uint64_t value, const uint64_t key3[3]) {
    mound_item_t *it = malloc(sizeof *it);
    if (!it) return -ENOMEM;
    memcpy(it->k, key3, 3 * sizeof *key3);
    it->k[3] = pa__fetch_add_relaxed(&m->arrival, 1);
    it->value = value;
    if (!mound_rng) mound_rng = (uint64_t)(uintptr_t)&mound_rng * 0x9E3779B97F4A7C15ull | 1;
    for (;;) {
        /* acquire: pairs with mound_grow's release (the level's nodes are initialized) */
        uint32_t levels = pa__load_acquire(&m->levels);
        uint32_t leaf_d = levels - 1;
        size_t leaf = 0;
        bool found = false;
        uint64_t h[4];
        for (int t = 0; t < MOUND_TRIES && !found; t++) {
            leaf = (size_t)(bench_rand(&mound_rng) & (((uint64_t)1 << leaf_d) - 1));
            mound_hint(&m->level[leaf_d][leaf], h);
            found = !mound_key_less(h, it->k);
        }
        if (!found) {
            int rc = mound_grow(m, levels);
            if (rc) {
                free(it);
                return rc;
            }
            continue;
        }
        /* binary search the path (depth e holds leaf >> (leaf_d - e)) for the topmost
         * depth whose value is >= the key; the leaf's is */
        uint32_t lo = 0, hi = leaf_d;
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            mound_hint(&m->level[mid][leaf >> (leaf_d - mid)], h);
            if (mound_key_less(h, it->k)) lo = mid + 1;
            else hi = mid;
        }
        mound_node_t *n = &m->level[hi][leaf >> (leaf_d - hi)];
        mound_node_t *parent = hi ? &m->level[hi - 1][leaf >> (leaf_d - hi + 1)] : NULL;
        if (parent) mound_lock(parent);
        mound_lock(n);
        bool fits = !mound_key_less(mound_value(n), it->k) && (!parent || mound_key_less(mound_value(parent), it->k));
        if (fits) {
            it->next = n->list;
            n->list = it;
            mound_publish(n);
        }
        mound_unlock(n);
        if (parent) mound_unlock(parent);
        if (fits) return 0;
    }
}

static bool mound_pop(mound_t *m, uint64_t *value) {
    mound_node_t *n = &m->level[0][0];
    mound_lock(n);
    mound_item_t *it = n->list;
    if (!it) {
        mound_unlock(n);
        return false;
    }
    n->list = it->next;
    mound_publish(n);
    /* moundify, hand over hand; levels read under the node's lock: an insert below n
     * holds n's lock (as a parent) or an ancestor's, so every level it used is seen */
    uint32_t d = 0;
    size_t i = 0;
    for (;;) {
        /* acquire: pairs with mound_grow's release */
        if (d + 1 >= pa__load_acquire(&m->levels)) break;
        mound_node_t *l = &m->level[d + 1][2 * i], *r = l + 1;
        mound_lock(l);
        mound_lock(r);
        bool left = !mound_key_less(mound_value(r), mound_value(l));
        mound_node_t *c = left ? l : r, *other = left ? r : l;
        mound_unlock(other);
        if (!mound_key_less(mound_value(c), mound_value(n))) {
            mound_unlock(c);
            break;
        }
        mound_item_t *swap = n->list;
        n->list = c->list;
        c->list = swap;
        mound_publish(n);
        mound_publish(c);
        mound_unlock(n);
        n = c;
        d++;
        i = 2 * i + (left ? 0 : 1);
    }
    mound_unlock(n);
    *value = it->value;
    free(it);
    return true;
}

#endif /* PA_BENCH_MOUND_H */
