/*
 * pq.c — the request queue: a lock-free MPMC priority queue. Interface: prealloc/pq.h.
 *
 * Algorithm
 * ---------
 * J. Lindén and B. Jonsson, "A Skiplist-Based Concurrent Priority Queue with Minimal Memory
 * Contention", OPODIS 2013. A skiplist ordered by key, with a head and a tail sentinel.
 *   - Delete-min walks level 0 from the head. A node is logically deleted when the
 *     *predecessor's* level-0 pointer carries the delete bit (bit 0), so the deleted nodes
 *     form a prefix of the list. The walk skips the marked pointers and claims the first
 *     node behind an unmarked one by setting the bit (one `lock bts`): exactly one claimer
 *     per node, and consumers touch the prefix's lines, not the head tower.
 *   - Physical removal is batched: only when a walk passed at least PQ_BOUND_OFFSET deleted
 *     nodes does that consumer swing head's level-0 pointer past the prefix with one CAS,
 *     move head's upper pointers past deleted nodes (restructure) and retire the cut nodes.
 *     It never cuts past a node whose insertion is still linking upper levels.
 *     Deviation from the paper: restructure marks ("freezes") the upper link of every node
 *     it passes before moving head past it, and an insert whose CAS meets a frozen link
 *     stops raising its tower. The paper's version can skip a node that an insert links
 *     behind a passed node in the window before head's CAS; that node is then reachable at
 *     an upper level but not below it, a later insert's check misses the deleted node it
 *     links in front of, and a cut node stays reachable — found by a reachability check
 *     run at every retire under the index churn test (see restructure()).
 *   - Insert is the Fraser / Sundell-Tsigas skiplist insert (link level 0 by CAS, then each
 *     upper level), except that the search treats every deleted node as smaller than any
 *     key, so a new node always lands behind the deleted prefix (never inside it), and it
 *     stops raising its tower when a successor turns out deleted.
 * Keys are four 64-bit words compared lexicographically: ~enc(priority), ~enc(confidence),
 * enc(deadline) or UINT64_MAX for "none", arrival — where enc maps a double to an unsigned
 * integer with the same order (flip all bits of negatives, the sign bit of the rest; -0.0
 * is first made +0.0) and ~ reverses it for the "highest first" fields. Arrival is a ticket
 * from the queue's atomic counter, taken when the push starts, so keys are unique and the
 * order is total. FIFO among otherwise equal items is ticket order: a push that returned
 * before another began comes out first; two pushes that overlap in time come out in ticket
 * order, which need not be the order in which they became visible (the one holding the
 * smaller ticket may link its node later). test_pq_linearizability checks exactly this.
 *
 * Tuning (measured with benchmarks/c/bench_pq.c and callgrind on a 2-core VM): towers grow
 * with p = 1/4 in a small queue (fewer levels and upper-level CASes than p = 1/2 for the
 * same search length) and, for single pushes, with p = 1/2 in a large one, where the
 * search's misses dominate and its prefetch hides more of them ("Tower shape" below),
 * capped at one level above the levels in use (Pugh), and searches start at the highest
 * non-empty level of head's tower; PQ_BOUND_OFFSET = 8 (the walk over the deleted
 * prefix is the bulk of a pop; 4..32 made no measurable difference at 2 threads). Freed
 * nodes go to a per-thread cache by tower height and, when that is full, to a depot shared
 * by all threads, so steady-state push/pop does not call malloc even when one thread
 * pushes and another pops; the size is a striped counter, one stripe (and line) owned by
 * each thread, so it is neither a shared hot line nor a locked add. A batch push sorts
 * each chunk by key before inserting it (each search then follows the previous one's
 * cached path); a larger batch is sorted by groups of up to PQ_BATCH_GROUP and inserted
 * with finger searches (below). The sort is an MSD radix sort that skips the digits the
 * batch's keys agree on (sort_keys_into), and the nodes of each height are given the
 * batch's keys in address order (order_nodes), so recycled nodes are walked in memory
 * order too. Costs per operation, measured with cachegrind:
 * benchmarks/README.md.
 *
 * Finger search (batch push)
 * --------------------------
 * A batch's items are inserted in ascending key order, PQ_BATCH_CHUNK per operation, and
 * each insert after the first of its operation searches from a finger left by the insert
 * before it instead of from head: at[i] = that insert's predecessor at level i, or the
 * inserted node itself at the levels it was linked at (levels a search did not reach keep
 * an older entry). The search climbs from level height-1 to the first level j whose
 * at[j]'s successor stops a search for the key (a node whose level-0 link is unmarked and
 * whose key is larger, or tail), and from at[j] runs the ordinary search (locate_preds'
 * loop) at levels j..0; if no level qualifies, or any CAS of the insert fails, it searches
 * from head as a single push does. Why this is as safe as a search from head:
 *   (F1) Memory. Every finger node was reached in the current operation, which EBR
 *        protects until op_end: none is freed before the search reads it, and every node
 *        reached from it is protected as in any search that was preempted at that node
 *        (a link only ever points at a node linked after it or at its successor when the
 *        link was marked/frozen, which was reachable then). The finger is dropped at
 *        op_end (test_pq_finger pops and frees everything between two operations of one
 *        batch; a finger kept across them reaches a freed node).
 *   (F2) A valid start. The ordinary search's results are correct from any start node S
 *        with: S is head, or S is deleted, or key(S) < key — because nothing before S can
 *        be a live node with a larger key (before a deleted node everything is deleted,
 *        and inserts land behind the deleted prefix, never before one of its nodes; before
 *        a live S the live nodes have smaller keys) — and S is linked at the search's top
 *        level (a node reached by walking that level, or head). Every finger entry is one
 *        of: head; a predecessor the earlier search passed (deleted, or key < the earlier
 *        key < this key, since the run ascends: keys are immutable and deletion is
 *        permanent, so this stays true); or the inserted node at a level its CAS linked.
 *        An inserted node is *not* an entry at a level its tower did not reach: its link
 *        there is a private value, and a node linked behind it would be reachable at the
 *        level above but not at that one (the shape restructure's freeze exists to rule
 *        out). A finger entry removed from its level since (head moved past it) has a
 *        frozen link at that level: the walk follows it, and a CAS on it fails and ends
 *        the tower, as for any predecessor in a search from head.
 *   (F3) The `del` rule. The insert's upper levels rely on: whenever an upper level's
 *        successor is the last deleted node D (whose deletion only its predecessor's mark
 *        shows), the level-0 walk started at or before D, so it passed D and returned it as
 *        `del`. A search from head has this because each level starts where the level
 *        above stopped: level i-1's walk starts at preds[i] and stops at or before
 *        succs[i], or passes it — which it does only once succs[i]'s level-0 link is
 *        marked (its key is larger), and a successor with a marked link ends the tower —
 *        so level 0 starts before every succs[i] that can still be D. The finger search
 *        keeps that shape: one start node at[j] for levels j..0, each level starting at
 *        the predecessor the level above found. Mixing
 *        entries per level (level 0 from at[0], level i from at[i]) would break it — a
 *        level-0 start behind D with an upper level stopping before D — which is why the
 *        search descends from a single entry. The other checks (n or succs[i] turned
 *        deleted, frozen links, the retry from head when an upper CAS fails) are unchanged.
 * Memory: a group's sort buffer is 64 bytes per item (4 MiB at most: the keys and the
 * radix sort's scratch, which then holds three node arrays and the drawn heights),
 * malloc'ed per group;
 * when that fails the group is pushed chunk by chunk (each chunk sorted, with its own run).
 * Linearizability: the batch's items are separate pushes overlapping the call; tickets are
 * taken (in input order) before any item is visible, so the sorted insertion order is one
 * of the orders their overlap allows.
 *
 * Cancellation (PA_PQ_INDEXED)
 * ----------------------------
 * An index value -> node: a lock-free hash set after M. Michael, "High performance dynamic
 * lock-free hash tables and list-based sets" (SPAA 2002): 2^18 buckets (fixed; calloc'ed at
 * create, so pages are faulted in only as buckets are used), each a Harris-Michael list
 * sorted by descending value with the delete bit in the link. The queue node itself is the
 * list entry (no second allocation). The bucket function folds the value's bits rather
 * than scrambling them, so neighbouring values (the engine's table ids) share pages.
 * Expected cost O(1 + n / 2^18): about 4 nodes per bucket at a million queued values; the
 * lists grow linearly beyond that (there is no resize), and values that collide on purpose
 * (equal in every 18-bit field they are folded from) share one bucket.
 * Each node has a state word:
 *     PENDING -> QUEUED (push done)  -> TAKEN (pop) | CANCELLED (cancel)
 *     PENDING -> TAKEN (a pop claimed it before the pusher finished)
 *     PENDING -> DEAD (a racing push of the same value aborted this unfinished attempt)
 * one CAS per edge, so of a racing pop and cancel exactly one wins; whoever makes a node
 * leave PENDING/QUEUED removes its index entry (a node marks its own link, so the removal is
 * conditional on that very node) and adjusts the size. Delete-min skips nodes it claimed in
 * state CANCELLED or DEAD. Two rules keep this linearizable although the structural claim
 * (the bit on the predecessor) and the state live in different words:
 *   - every walk over the deleted prefix (pop, peek, the -EEXIST check) moves each prefix
 *     node still PENDING/QUEUED to TAKEN on behalf of the consumer that claimed it; so when
 *     a pop claims a node, every node before it has been decided, and a cancel can only win
 *     against a node whose claimer has not yet been passed by anyone (without this rule the
 *     linearizability test finds violations within seconds);
 *   - push inserts into the index first and into the skiplist second; a push that finds its
 *     value's entry QUEUED first resolves the prefix and answers -EEXIST only if the entry is
 *     still QUEUED; one that finds it PENDING aborts it (DEAD) and retries; one that finds it
 *     TAKEN/CANCELLED/DEAD helps remove it and retries. So -EEXIST means really queued.
 * Unindexed queues carry no state transitions and no index at all.
 *
 * Memory reclamation: epoch-based (epoch.h). A node is retired only when it is unreachable:
 * cut from level 0 and (by restructure) from every upper level, and — indexed — unlinked
 * from its bucket; `refs` (one per structure, and one more while an all-or-nothing batch
 * holds the node: pa_pq_push_all) decides who retires it.
 *
 * Complexity: push O(log n) expected; pop O(1) expected plus O(PQ_BOUND_OFFSET) for the
 * walk over the deleted prefix (the cut every ~PQ_BOUND_OFFSET pops costs O(log n));
 * cancel O(1 + n/2^18) expected; peek O(prefix). Progress: lock-free (no mutex or spin
 * anywhere), except that two concurrent pushes of the *same* value to an indexed queue may
 * abort each other's unfinished attempt repeatedly (obstruction-free for that pair).
 * Limits: a cancelled node stays in the skiplist until delete-min reaches it (it costs
 * memory and search length until then); a thread stalled inside an operation delays every
 * reclamation (EBR). A *producer* stalled between linking its node at level 0 and finishing
 * its tower (preempted there, or a thread of the parent caught there by fork) holds the
 * prefix cut before its node once that node is popped: until the push finishes, every pop
 * walks every node popped since — O(pops since the stall) per pop (150 ns -> 107 us after
 * 20 k pops was measured), and those nodes are not retired. Cutting past the node would
 * let its insert link a retired node; helping the insert finish would need the insert's
 * private search state. test_pq_inserting measures the prefix (20 001 nodes after 20 000
 * pops with a stalled push, <= PQ_BOUND_OFFSET without). A stalled consumer holds nothing
 * back: its cut CAS just fails later. Each thread
 * keeps up to PQ_CACHE_PER_LEVEL free nodes per tower height until it exits; beyond that
 * they go to a shared depot (up to PQ_DEPOT_MAX per height) where other threads' pushes
 * take them (see "The depot").
 */
#define _GNU_SOURCE
#include "prealloc/pq.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "atomics.h"
#include "epoch.h"

#define PQ_MAX_LEVEL 24            /* tower height limit */
#ifndef PQ_BOUND_OFFSET
#define PQ_BOUND_OFFSET 8          /* deleted prefix length that triggers a cut */
#endif
#ifndef PQ_LEVEL_LOG2P
#define PQ_LEVEL_LOG2P 2           /* a tower grows one level with probability 2^-this ... */
#endif
#ifndef PQ_WIDE_SIZE
#define PQ_WIDE_SIZE (1u << 17)    /* ... and with p = 1/2 for single pushes into a queue this large */
#endif
#define PQ_WIDE_SAMPLE 256         /* a thread's single pushes per look at the size of the queue */
#define PQ_INDEX_BITS 18            /* 2^18 buckets: 2 MiB of address space per queue */
#define PQ_INDEX_BUCKETS (1u << PQ_INDEX_BITS)
#define PQ_SIZE_SHARDS 16          /* size counter stripes owned by one thread each (one line each) */
#define PQ_CACHE_PER_LEVEL 1024    /* free nodes a thread keeps per tower height */
#define PQ_DEPOT_BATCH 64          /* nodes a full cache hands to the depot at once */
#define PQ_DEPOT_MAX 65536         /* nodes of one height the depot holds at most */
/* Items per operation in the batch calls: one operation holds back reclamation (EBR)
 * while it runs, so a large batch is served in operations of this many. */
#define PQ_BATCH_CHUNK 256

enum { ST_PENDING = 0, ST_QUEUED = 1, ST_TAKEN = 2, ST_CANCELLED = 3, ST_DEAD = 4, ST_POISON = 0xDEADu };

/* Debug builds. Under AddressSanitizer the node cache is off: a node that EBR frees goes
 * back to malloc at once, so a reader that reaches freed memory is a reported
 * use-after-free instead of a silent read of a recycled node. With PA_PQ_DEBUG defined
 * (the white-box tests define it), a node is poisoned when EBR frees it (state ST_POISON,
 * keys overwritten) and every traversal checks each node it reaches: reaching a poisoned
 * one — a node freed while still linked — aborts with a message. Neither costs anything
 * in a normal build. */
#if defined(__SANITIZE_ADDRESS__)
#define PQ_NO_CACHE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PQ_NO_CACHE 1
#endif
#endif
#ifdef PA_PQ_DEBUG
#include <stdio.h>
#define PQ_ASSERT_LIVE(n) pq_assert_live((n), __func__)
#else
#define PQ_ASSERT_LIVE(n) ((void)0)
#endif

/* Contention counters, compiled in only with PA_PQ_STATS (bench_pq's stats build): CAS
 * failures by site, lost claims, walk lengths. Read with pa__pq_stats. */
enum { PQS_INSERT0_FAIL, PQS_INSERTUP_FAIL, PQS_CLAIM_LOST, PQS_CUT_OK, PQS_CUT_FAIL, PQS_WALK_STEPS, PQS_COUNT };
#ifdef PA_PQ_STATS
static _Atomic uint64_t pq_stats[PQS_COUNT];
#define PQ_STAT(k, v) pa__fetch_add_relaxed(&pq_stats[k], (v))
void pa__pq_stats(uint64_t *out, bool reset);
void pa__pq_stats(uint64_t *out, bool reset) {
    for (int k = 0; k < PQS_COUNT; k++)
        out[k] = reset ? atomic_exchange_explicit(&pq_stats[k], 0, memory_order_relaxed) : pa__load_relaxed(&pq_stats[k]);
}
#else
#define PQ_STAT(k, v) ((void)0)
#endif

/* Test hooks (white-box tests compile this file with them defined): PQ_INSERT_HOOK runs
 * in an insert just before the CAS that links level i >= 1; PQ_TEST_LEVEL(cap), when it
 * yields a non-zero height, replaces the random tower height. */
#ifndef PQ_INSERT_HOOK
#define PQ_INSERT_HOOK(pq, n, i) ((void)0)
#endif
#ifndef PQ_TEST_LEVEL
#define PQ_TEST_LEVEL(cap) 0u
#endif
/* PQ_GROUP_HOOK(pq) runs in a sorted group push between two of its operations (where no
 * node the previous operation saw is protected any more). */
#ifndef PQ_GROUP_HOOK
#define PQ_GROUP_HOOK(pq) ((void)0)
#endif

typedef struct pq_node {
    /* The fields a consumer walking the prefix reads come first, on one line. */
    _Atomic uintptr_t next0;    /* level 0; bit 0 set = the successor is deleted */
    _Atomic uint32_t state;     /* indexed queues only */
    _Atomic uint8_t inserting;  /* 1 while the tower is being linked */
    uint8_t level;
    _Atomic uint16_t refs;      /* structures still linking the node (1 or 2), + a batch holding it */
    uint64_t key[4];            /* immutable once published */
    uint64_t value;
    _Atomic uintptr_t up[];     /* levels 1 .. level-1, then a pq_node_ext_t */
} pq_node_t;

/* Fields touched off the hot path, stored after the tower. */
typedef struct pq_node_ext {
    _Atomic uintptr_t hnext; /* index bucket list; bit 0 set = removed from the index */
    pa__ebr_link_t link;
    pq_node_t *self;
} pq_node_ext_t;

typedef struct pq_size_shard {
    PA_CACHE_ALIGNED _Atomic int64_t n;
} pq_size_shard_t;

struct pa_pq {
    /* read-mostly */
    pq_node_t *head;
    pq_node_t *tail;
    _Atomic uintptr_t *buckets; /* indexed only */
    unsigned flags;
    _Atomic uint32_t top; /* an upper bound of the levels in use (only ever raised) */
    _Atomic uint32_t wide; /* single pushes draw towers with p = 1/2 (see tower_wide) */
    PA_CACHE_ALIGNED _Atomic uint64_t arrival;
    /* The size is striped so that pushes and pops on different threads do not bounce one
     * counter line between them; pa_pq_size sums the stripes. */
    pq_size_shard_t size[PQ_SIZE_SHARDS + 1]; /* the last one is shared by threads without a stripe */
};

#define MARK ((uintptr_t)1)
static inline bool is_marked(uintptr_t p) { return (p & MARK) != 0; }
static inline pq_node_t *unmark(uintptr_t p) { return (pq_node_t *)(p & ~MARK); }

#ifdef PA_PQ_DEBUG
static void pq_assert_live(pq_node_t *n, const char *where) {
    if (pa__load_relaxed(&n->state) == ST_POISON) {
        fprintf(stderr, "pq: %s reached node %p after it was freed\n", where, (void *)n);
        abort();
    }
}
#endif

static inline _Atomic uintptr_t *next_at(pq_node_t *n, int i) {
    return i == 0 ? &n->next0 : &n->up[i - 1];
}
static inline pq_node_ext_t *node_ext(pq_node_t *n) {
    return (pq_node_ext_t *)(void *)&n->up[n->level - 1];
}

/* ---- keys ---- */

/* A double as an unsigned word in the same order, without branches (the batch loops run
 * it per item): x + 0.0 is +0.0 for both zeros (-0.0 and +0.0 are the same priority) and x
 * otherwise; then negatives flip every bit, the rest only the sign bit. */
static inline uint64_t enc_asc(double d) {
    uint64_t u = pa__double_bits(d + 0.0);
    return u ^ ((uint64_t)((int64_t)u >> 63) | (1ull << 63));
}

/* A key's first three words (the fourth is the arrival ticket): priority and confidence
 * descending, deadline ascending with NaN and +inf ("no deadline") after every other —
 * a double whose exponent bits are all ones is one of those two. The one encoding of the
 * single push and the batch paths. */
static inline void encode_key(uint64_t key[3], double priority, double confidence, double deadline) {
    const uint64_t exp_mask = 0x7ff0000000000000ull;
    key[0] = ~enc_asc(priority);
    key[1] = ~enc_asc(confidence);
    uint64_t e = enc_asc(deadline);
    key[2] = (pa__double_bits(deadline) & exp_mask) == exp_mask ? UINT64_MAX : e;
}
static inline double dec_asc(uint64_t e) {
    return pa__bits_double((e >> 63) ? e & ~(1ull << 63) : ~e);
}

static inline bool key_less(const uint64_t *a, const uint64_t *b) {
    if (a[0] != b[0]) return a[0] < b[0];
    if (a[1] != b[1]) return a[1] < b[1];
    if (a[2] != b[2]) return a[2] < b[2];
    return a[3] < b[3];
}

static void node_to_item(const pq_node_t *n, pa_pq_item_t *item) {
    item->value = n->value;
    item->priority = dec_asc(~n->key[0]);
    item->confidence = dec_asc(~n->key[1]);
    item->deadline = n->key[2] == UINT64_MAX ? INFINITY : dec_asc(n->key[2]);
    item->arrival = n->key[3];
}

/* ---- per-thread state: random levels, size stripe, node cache ---- */

/* Everything a thread keeps for the queues, in one TLS block (one TLS lookup). Freed
 * nodes are cached per tower height and reused by the same thread's next pushes, so the
 * steady state of push/pop never calls malloc; the cache is bounded and emptied when the
 * thread exits. */
typedef struct pq_thread {
    uint64_t rng;
    uint32_t pushes; /* single pushes, the clock of tower_wide's samples */
    unsigned shard;
    bool exclusive; /* shard is this thread's alone: updated without a locked add */
    bool registered;
    pq_node_t *cache[PQ_MAX_LEVEL];
    uint32_t cached[PQ_MAX_LEVEL];
} pq_thread_t;

static _Thread_local pq_thread_t tls_pq;
static pthread_once_t pq_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t pq_key;
static bool pq_key_ok;
/* Size stripes: bit k set = stripe k is owned by a live thread. A thread claims a free one
 * at its first operation and releases it when it exits (the pthread key destructor), so
 * its size updates are a plain load and store (no `lock` prefix: one per push, one per
 * pop walk). More than PQ_SIZE_SHARDS threads at once, or a thread that cannot register
 * its exit: the shared stripe PQ_SIZE_SHARDS, with an atomic add. A stripe's count lives
 * on after its owner (the size is the sum); the next owner continues from it. */
static _Atomic uint32_t pq_stripes_owned;

static void stripe_release(pq_thread_t *t) {
    if (!t->exclusive) return;
    t->exclusive = false;
    /* release: the next owner's claiming CAS (acquire) sees our last stores to the stripe */
    atomic_fetch_and_explicit(&pq_stripes_owned, ~(1u << t->shard), memory_order_release);
    t->shard = PQ_SIZE_SHARDS;
}

static void pq_thread_exit(void *arg) {
    pq_thread_t *t = arg;
    stripe_release(t);
    for (int l = 0; l < PQ_MAX_LEVEL; l++) {
        pq_node_t *n = t->cache[l];
        while (n) {
            pq_node_t *next = (pq_node_t *)pa__load_relaxed(&n->next0);
            free(n);
            n = next;
        }
        t->cache[l] = NULL;
        t->cached[l] = 0;
    }
    t->registered = false;
}

/* fork: only the forking thread exists in the child, so only its stripe stays owned (the
 * parent's other threads would otherwise hold theirs forever there). Runs before fork()
 * returns in the child, on its only thread. */
static void pq_fork_child(void) {
    pa__store_relaxed(&pq_stripes_owned, tls_pq.exclusive ? 1u << tls_pq.shard : 0u);
}

static void pq_make_key(void) {
    pq_key_ok = pthread_key_create(&pq_key, pq_thread_exit) == 0;
    (void)pthread_atfork(NULL, NULL, pq_fork_child); /* ENOMEM: children share stripes */
}

static bool cache_register(pq_thread_t *t);

static void stripe_claim(pq_thread_t *t) {
    t->shard = PQ_SIZE_SHARDS;
    t->exclusive = false;
    if (!cache_register(t)) return; /* could not release it at exit: stay shared */
    uint32_t owned = pa__load_relaxed(&pq_stripes_owned);
    while (owned != (1u << PQ_SIZE_SHARDS) - 1) {
        unsigned k = (unsigned)__builtin_ctz(~owned);
        /* acquire: pairs with stripe_release's release (the previous owner's stores) */
        if (atomic_compare_exchange_weak_explicit(&pq_stripes_owned, &owned, owned | (1u << k),
                                                  memory_order_acquire, memory_order_relaxed)) {
            t->shard = k;
            t->exclusive = true;
            return;
        }
    }
}

static pq_thread_t *pq_thread(void) {
    pq_thread_t *t = &tls_pq;
    if (!t->rng) {
        t->rng = (uint64_t)(uintptr_t)t * 0x9E3779B97F4A7C15ull | 1;
        stripe_claim(t);
    }
    return t;
}

/* One operation's context: the thread-local state is looked up once per call. */
typedef struct pq_op {
    pa_pq_t *pq;
    pa__ebr_thread_t *ebr;
    pq_thread_t *t;
    bool indexed;
} pq_op_t;

static bool op_begin(pq_op_t *op, pa_pq_t *pq) {
    op->ebr = pa__ebr_enter();
    if (!op->ebr) return false;
    op->pq = pq;
    op->t = pq_thread();
    op->indexed = (pq->flags & PA_PQ_INDEXED) != 0;
    return true;
}

static void op_end(pq_op_t *op) { pa__ebr_exit(op->ebr); }

/* Tower shape. p = 1/4 in a small queue: a search visits about as many nodes as with 1/2
 * (4 per level over log4 n levels against 2 over log2 n) and a push links fewer upper
 * levels (1.33 on average against 2). In a large queue each visited node is a cache miss,
 * and the search's prefetch (locate_from) overlaps the miss of the node that stops a level
 * with the next level's first one: with p = 1/2 that is half of each level's misses, with
 * 1/4 a quarter. So a single push into a queue of PQ_WIDE_SIZE items or more draws its
 * tower with p = 1/2 (measured, one thread, a push/pop mix on a filled queue: 11 % faster
 * at 2e5 items, 25 % at 1e6; p = 1/2 at every size was 15 % slower at 2e4, where the list
 * is still cached, and at 1e3). Either shape, or any mix, gives correct searches: the
 * heights only decide which nodes a search skips. The size is summed over the stripes by
 * every PQ_WIDE_SAMPLE-th single push of a thread (pa_pq_size: 17 relaxed loads), and
 * the answer kept in the queue (written only when it changes, so the line stays shared).
 * Batches keep p = 1/4 (batch_cap). True: p = 1/2. */
static bool tower_wide(pq_op_t *op) {
    pa_pq_t *const pq = op->pq;
    if (++op->t->pushes % PQ_WIDE_SAMPLE == 0) {
        uint32_t wide = pa_pq_size(pq) >= PQ_WIDE_SIZE;
        if (pa__load_relaxed(&pq->wide) != wide) pa__store_relaxed(&pq->wide, wide);
    }
    /* relaxed: a stale answer costs speed, not correctness */
    return pa__load_relaxed(&pq->wide) != 0;
}

/* Geometric tower height, p = 2^-PQ_LEVEL_LOG2P (p = 1/2 when wide), capped at `cap`. */
static unsigned random_level(pq_thread_t *t, unsigned cap, bool wide) {
    uint64_t x = t->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t->rng = x;
    uint64_t r = x * 0x2545F4914F6CDD1Dull;
    unsigned zeros = (unsigned)__builtin_ctzll(r | (1ull << 63));
    unsigned level = 1u + (wide ? zeros : zeros / PQ_LEVEL_LOG2P);
    unsigned forced = PQ_TEST_LEVEL(cap);
    if (forced) return forced;
    return level < cap ? level : cap;
}

/* The depot: free nodes travelling between threads, one stack per tower height. In the
 * engine's shape (callers push, workers pop) the nodes are freed by the consumers' EBR and
 * would fill only the consumers' caches while every push mallocs; so a thread whose cache
 * of a height is full hands PQ_DEPOT_BATCH nodes over as one batch, and a thread whose
 * cache is empty takes the whole depot of that height. Batches are pushed with a CAS and
 * taken all at once with an exchange (as EBR's orphan list), so there is no ABA. A batch
 * is a chain through next0; its first node keeps the chain's length in `value`, its last
 * node in key[1] and the next batch in key[0]. Bounded by PQ_DEPOT_MAX nodes per height
 * (then nodes are freed); nodes in the depot are not freed at exit (still reachable,
 * reused by the next pushes). */
typedef struct pq_depot {
    PA_CACHE_ALIGNED _Atomic(pq_node_t *) batches;
    _Atomic size_t count;
} pq_depot_t;
static pq_depot_t pq_depot[PQ_MAX_LEVEL];

/* So that pq_thread_exit empties the cache when this thread ends. False: cannot. */
static bool cache_register(pq_thread_t *t) {
    if (t->registered) return true;
    pthread_once(&pq_key_once, pq_make_key);
    if (!pq_key_ok || pthread_setspecific(pq_key, t) != 0) return false;
    t->registered = true;
    return true;
}

static void depot_give(unsigned l, pq_node_t *first, pq_node_t *last, size_t count) {
    pq_depot_t *d = &pq_depot[l];
    first->value = count;
    first->key[1] = (uint64_t)(uintptr_t)last; /* so that depot_take need not walk the batch */
    pq_node_t *head = pa__load_relaxed(&d->batches);
    do {
        first->key[0] = (uint64_t)(uintptr_t)head;
        /* release: publishes the batch (its links and fields) to depot_take's acquire */
    } while (!atomic_compare_exchange_weak_explicit(&d->batches, &head, first, memory_order_release,
                                                    memory_order_relaxed));
    pa__fetch_add_relaxed(&d->count, count);
}

/* Moves every batch of height l+1 into t's cache; true when it got any. */
static bool depot_take(pq_thread_t *t, unsigned l) {
    pq_depot_t *d = &pq_depot[l];
    if (!pa__load_relaxed(&d->batches) || !cache_register(t)) return false;
    /* acquire: pairs with depot_give's release CAS */
    pq_node_t *b = atomic_exchange_explicit(&d->batches, NULL, memory_order_acquire);
    size_t taken = 0;
    while (b) {
        pq_node_t *next_batch = (pq_node_t *)(uintptr_t)b->key[0];
        size_t count = (size_t)b->value;
        /* splice the whole batch in front of the cache; walking to its last node instead
         * would be one cache miss per node of the depot, each load depending on the last */
        pq_node_t *last = (pq_node_t *)(uintptr_t)b->key[1];
        pa__store_relaxed(&last->next0, (uintptr_t)t->cache[l]);
        t->cache[l] = b;
        t->cached[l] += (uint32_t)count;
        taken += count;
        b = next_batch;
    }
    if (taken) pa__fetch_sub_relaxed(&d->count, taken);
    return taken != 0;
}

static pq_node_t *node_alloc(pq_thread_t *t, unsigned level) {
    pq_node_t *n = t ? t->cache[level - 1] : NULL;
    if (!n && t && depot_take(t, level - 1)) n = t->cache[level - 1];
    if (n) {
        t->cache[level - 1] = (pq_node_t *)pa__load_relaxed(&n->next0);
        t->cached[level - 1]--;
    } else {
        size_t size = sizeof(pq_node_t) + (level - 1) * sizeof(_Atomic uintptr_t) + sizeof(pq_node_ext_t);
        n = malloc(size);
        if (!n) return NULL;
    }
    n->level = (uint8_t)level;
    pa__store_relaxed(&n->next0, 0);
    pa__store_relaxed(&n->state, ST_QUEUED);
    pa__store_relaxed(&n->inserting, 0);
    pa__store_relaxed(&n->refs, 1);
    for (unsigned i = 1; i < level; i++) pa__store_relaxed(&n->up[i - 1], 0);
    pq_node_ext_t *ext = node_ext(n);
    pa__store_relaxed(&ext->hnext, 0);
    ext->self = n;
    return n;
}

/* Gives a node nobody can reach any more to the calling thread's cache (or to free). */
static void node_recycle(pq_node_t *n) {
#ifdef PA_PQ_DEBUG
    pa__store_relaxed(&n->state, ST_POISON);
    for (int k = 0; k < 4; k++) n->key[k] = 0xDEADDEADDEADDEADull;
#endif
#ifdef PQ_NO_CACHE
    free(n);
    return;
#endif
    pq_thread_t *t = &tls_pq;
    unsigned l = n->level - 1u;
    if (!cache_register(t)) {
        free(n);
        return;
    }
    if (t->cached[l] >= PQ_CACHE_PER_LEVEL) {
        /* full: hand a batch (n and the PQ_DEPOT_BATCH - 1 newest cached) to the depot,
         * where the pushing threads find it; free it when the depot is full too */
        pq_node_t *first = n, *last = t->cache[l];
        pa__store_relaxed(&n->next0, (uintptr_t)last);
        for (int k = 2; k < PQ_DEPOT_BATCH; k++) last = (pq_node_t *)pa__load_relaxed(&last->next0);
        t->cache[l] = (pq_node_t *)pa__load_relaxed(&last->next0);
        t->cached[l] -= PQ_DEPOT_BATCH - 1;
        pa__store_relaxed(&last->next0, 0);
        if (pa__load_relaxed(&pq_depot[l].count) < PQ_DEPOT_MAX) {
            depot_give(l, first, last, PQ_DEPOT_BATCH);
        } else {
            while (first) {
                pq_node_t *next = (pq_node_t *)pa__load_relaxed(&first->next0);
                free(first);
                first = next;
            }
        }
        return;
    }
    pa__store_relaxed(&n->next0, (uintptr_t)t->cache[l]);
    t->cache[l] = n;
    t->cached[l]++;
}

static void node_free_link(pa__ebr_link_t *link) {
    pq_node_ext_t *ext = (pq_node_ext_t *)(void *)((char *)link - offsetof(pq_node_ext_t, link));
    node_recycle(ext->self);
}

/* tests/c/test_pq_retire.c compiles this file with a hook that checks, at every retire,
 * that the node is unreachable from head at every level and from its bucket. */
#ifndef PQ_RETIRE_HOOK
#define PQ_RETIRE_HOOK(op, n) ((void)0)
#endif

/* One of the structures holding n let go of it (it is unreachable through that one).
 * The last one retires it. */
static void node_release(pq_op_t *op, pq_node_t *n) {
    if (!op->indexed) {
        PQ_RETIRE_HOOK(op, n);
        pa__ebr_retire(op->ebr, &node_ext(n)->link, node_free_link); /* one structure only */
        return;
    }
    /* acq_rel: the release half orders our unlink before the other releaser's retire;
     * the acquire half lets the retiring thread see the other's unlink */
    if (pa__fetch_sub_acq_rel(&n->refs, 1) == 1) {
        PQ_RETIRE_HOOK(op, n);
        pa__ebr_retire(op->ebr, &node_ext(n)->link, node_free_link);
    }
}

/* ---- the index (indexed queues) ---- */

/* Folds the value's bits instead of scrambling them: values that are close together (the
 * engine's table ids: slot index in the low bits) land in neighbouring buckets, so a queue
 * of n such values touches about n/512 pages of the bucket array, not n. */
static inline _Atomic uintptr_t *bucket_of(pa_pq_t *pq, uint64_t value) {
    uint64_t h = value ^ (value >> PQ_INDEX_BITS) ^ (value >> (2 * PQ_INDEX_BITS)) ^ (value >> (3 * PQ_INDEX_BITS));
    return &pq->buckets[h & (PQ_INDEX_BUCKETS - 1)];
}

/* Harris-Michael find over a bucket list sorted by descending value (increasing ids, the
 * common case, then insert at the front): prev/cur (out) is the position of the first
 * node with a value <= v (cur may be NULL); unlinks the removed (marked) nodes it passes.
 * True when cur holds v. */
static bool index_find(pq_op_t *op, uint64_t v, _Atomic uintptr_t **prevp, pq_node_t **curp) {
retry:;
    _Atomic uintptr_t *prev = bucket_of(op->pq, v);
    /* acquire: pairs with the release CAS that linked the node (index_insert) */
    pq_node_t *cur = (pq_node_t *)pa__load_acquire(prev);
    for (;;) {
        if (!cur) {
            *prevp = prev;
            *curp = NULL;
            return false;
        }
        pq_node_ext_t *ext = node_ext(cur);
        uintptr_t next = pa__load_acquire(&ext->hnext); /* acquire: pairs with the linking CAS */
        if (is_marked(next)) {
            uintptr_t expected = (uintptr_t)cur;
            /* acq_rel: our unlink is ordered before node_release's retire */
            if (!pa__cas_strong_acq_rel(prev, &expected, (uintptr_t)unmark(next))) goto retry;
            node_release(op, cur);
            cur = unmark(next);
            continue;
        }
        if (cur->value <= v) {
            *prevp = prev;
            *curp = cur;
            return cur->value == v;
        }
        prev = &ext->hnext;
        cur = unmark(next);
    }
}

/* Removes n from the index if it is still there (only n itself is affected). */
static void index_remove(pq_op_t *op, pq_node_t *n) {
    /* acq_rel: the mark is the logical removal; find's acquire load sees it */
    if ((pa__fetch_or_acq_rel(&node_ext(n)->hnext, MARK) & MARK) == 0) {
        _Atomic uintptr_t *prev;
        pq_node_t *cur;
        (void)index_find(op, n->value, &prev, &cur); /* unlinks n (and any other marked) */
    }
}

static void size_add(pq_op_t *op, int64_t d) {
    _Atomic int64_t *n = &op->pq->size[op->t->shard].n;
    if (op->t->exclusive) {
        /* relaxed: only this thread writes the stripe (pa_pq_size reads it relaxed) */
        pa__store_relaxed(n, pa__load_relaxed(n) + d);
    } else {
        pa__fetch_add_relaxed(n, d);
    }
}

/* Moves a claimed (or about to be returned) node out of PENDING/QUEUED into TAKEN. True
 * when the node ends TAKEN — by us or by a helper — i.e. it belongs to its claimer.
 * Whoever makes the move removes the index entry: at once, or (unindex != NULL) the node
 * is appended to unindex[*pending] for the caller to remove before its operation ends —
 * an entry that lingers in state TAKEN is only ever helped out of the index (push) or
 * passed over (cancel), and the node's index reference keeps it from being retired. */
static bool resolve_taken_into(pq_op_t *op, pq_node_t *n, pq_node_t **unindex, size_t *pending) {
    /* acquire: pairs with the release CAS of whoever set the state */
    uint32_t s = pa__load_acquire(&n->state);
    while (s == ST_PENDING || s == ST_QUEUED) {
        /* acq_rel: the one CAS that decides between pop, cancel and an aborting push */
        if (pa__cas_strong_acq_rel(&n->state, &s, ST_TAKEN)) {
            size_add(op, -1);
            if (unindex) unindex[(*pending)++] = n;
            else index_remove(op, n);
            return true;
        }
    }
    return s == ST_TAKEN;
}
static bool resolve_taken(pq_op_t *op, pq_node_t *n) { return resolve_taken_into(op, n, NULL, NULL); }

/* The deferred removals of a batch pop: every bucket and index link is requested first,
 * so their cache misses overlap instead of coming one after another (the values come out
 * in key order, which scatters them over the bucket array). */
static void index_remove_all(pq_op_t *op, pq_node_t **nodes, size_t count) {
    for (size_t k = 0; k < count; k++) {
        __builtin_prefetch(bucket_of(op->pq, nodes[k]->value), 1);
        __builtin_prefetch(&node_ext(nodes[k])->hnext, 1);
    }
    for (size_t k = 0; k < count; k++) index_remove(op, nodes[k]);
}

/* Decides every node of the deleted prefix (see the design comment). */
static void resolve_prefix(pq_op_t *op) {
    pq_node_t *x = op->pq->head;
    for (;;) {
        /* acquire: pairs with the insert CAS / claiming fetch-or that wrote the link */
        uintptr_t nxt = pa__load_acquire(&x->next0);
        if (!is_marked(nxt)) return;
        x = unmark(nxt);
        (void)resolve_taken(op, x);
    }
}

/* Inserts n into the index, or: -EEXIST when its value is really queued. */
static int index_insert(pq_op_t *op, pq_node_t *n) {
    for (;;) {
        _Atomic uintptr_t *prev;
        pq_node_t *cur;
        if (index_find(op, n->value, &prev, &cur)) {
            /* acquire: pairs with the CAS that set cur's state */
            uint32_t s = pa__load_acquire(&cur->state);
            if (s == ST_QUEUED) {
                /* cur may be claimed by a pop that has not decided it yet: decide it */
                resolve_prefix(op);
                s = pa__load_acquire(&cur->state);
                if (s == ST_QUEUED) return -EEXIST;
            }
            if (s == ST_PENDING) {
                /* acq_rel: pairs with the pusher's PENDING -> QUEUED CAS (one wins) */
                if (!pa__cas_strong_acq_rel(&cur->state, &s, ST_DEAD)) continue;
            }
            index_remove(op, cur); /* stale entry: taken, cancelled or dead */
            continue;
        }
        pa__store_relaxed(&node_ext(n)->hnext, (uintptr_t)cur);
        uintptr_t expected = (uintptr_t)cur;
        /* release: publishes n's value and state to index readers (acquire loads in find) */
        if (pa__cas_strong_acq_rel(prev, &expected, (uintptr_t)n)) return 0;
    }
}

/* ---- the skiplist ---- */

/* Fills preds/succs for key at levels top..0; returns the last deleted node the level-0
 * search passed (Lindén-Jonsson's `del`), or NULL. Deleted nodes count as smaller than
 * every key, so level 0 always ends behind the deleted prefix.
 * The walk is a chain of dependent loads, one cache miss per node once the list outgrows
 * the cache; so each time the search stands on a new predecessor it prefetches that
 * node's successor one level down, which is where the search goes when the node ahead
 * stops it: that miss then overlaps the one for the node ahead. (A prefetch is only a
 * hint: a stale or freed address costs a wasted line, never a fault.) */
static pq_node_t *locate_from(pq_node_t *start, const uint64_t *key, int top, pq_node_t **preds,
                              pq_node_t **succs) {
    pq_node_t *pred = start;
    for (int i = top; i >= 1; i--) {
        /* acquire (all link loads below): pairs with the release CAS that linked the node
         * (or the fetch-or / restructure CAS continuing it), so its key is visible; an
         * upper link may carry restructure's freeze */
        pq_node_t *cur = unmark(pa__load_acquire(&pred->up[i - 1]));
        __builtin_prefetch(unmark(pa__load_relaxed(next_at(pred, i - 1))));
        for (;;) {
            PQ_ASSERT_LIVE(cur);
            if (!(is_marked(pa__load_acquire(&cur->next0)) || key_less(cur->key, key))) break;
            pred = cur;
            __builtin_prefetch(unmark(pa__load_relaxed(next_at(pred, i - 1))));
            cur = unmark(pa__load_acquire(&cur->up[i - 1]));
        }
        preds[i] = pred;
        succs[i] = cur;
    }
    /* level 0: a marked link says its successor is deleted */
    pq_node_t *del = NULL;
    uintptr_t raw = pa__load_acquire(&pred->next0);
    for (;;) {
        const bool d = is_marked(raw);
        pq_node_t *cur = unmark(raw);
        PQ_ASSERT_LIVE(cur);
        uintptr_t cur_next0 = pa__load_acquire(&cur->next0);
        if (!(d || is_marked(cur_next0) || key_less(cur->key, key))) {
            preds[0] = pred;
            succs[0] = cur;
            return del;
        }
        if (d) del = cur;
        pred = cur;
        raw = cur_next0;
    }
}

/* The ordinary search: from head, at levels top..0. */
static inline pq_node_t *locate_preds(pa_pq_t *pq, const uint64_t *key, int top, pq_node_t **preds,
                                      pq_node_t **succs) {
    return locate_from(pq->head, key, top, preds, succs);
}

/* A finger for a run of inserts in ascending key order inside one operation: at[i] is a
 * node linked at level i that the previous inserts of the run left behind (their
 * predecessors, or the inserted node itself where its tower was linked), valid for levels
 * 0 .. levels-1; levels 0 = none yet. See "Finger search" in the design comment. */
typedef struct pq_finger {
    pq_node_t *at[PQ_MAX_LEVEL];
    int levels;
#ifdef PA_PQ_DEBUG
    uint64_t last[4]; /* the previous key of the run: keys must ascend */
#endif
} pq_finger_t;

/* Finger search for key: climbs the finger from level 0 until a level j >= height - 1
 * whose finger node's successor stops a search for key (a node not known deleted with a
 * larger key, or tail), then searches from that one node at levels j..0 exactly as
 * locate_preds does from head. Fills preds/succs at levels 0..j and returns `del` as
 * locate_preds; *searched = j. -1 in *searched: no usable level (the caller searches
 * from head). */
static pq_node_t *locate_finger(const pq_finger_t *f, const uint64_t *key, int height, pq_node_t **preds,
                                pq_node_t **succs, int *searched) {
    for (int j = height - 1; j < f->levels; j++) {
        pq_node_t *c = f->at[j];
        PQ_ASSERT_LIVE(c);
        /* acquire (link loads): as in locate_preds */
        pq_node_t *s = unmark(pa__load_acquire(next_at(c, j)));
        PQ_ASSERT_LIVE(s);
        if (is_marked(pa__load_acquire(&s->next0)) || key_less(s->key, key)) continue;
        *searched = j;
        return locate_from(c, key, j, preds, succs);
    }
    *searched = -1;
    return NULL;
}

/* Continues the level-i search from `del` (a deleted node the search stopped before):
 * past it and every node after it that is deleted (marked level-0 link) or smaller than
 * key. False when del's link at this level is frozen by restructure (head is being moved
 * past it: the tower ends here, as when an insert's CAS meets a frozen link). */
static bool walk_past_deleted(const uint64_t *key, int i, pq_node_t *del, pq_node_t **pred_out,
                              pq_node_t **succ_out) {
    /* acquire (link loads): as in locate_preds */
    uintptr_t raw = pa__load_acquire(&del->up[i - 1]);
    if (is_marked(raw)) return false;
    pq_node_t *pred = del, *cur = unmark(raw);
    while ((PQ_ASSERT_LIVE(cur), is_marked(pa__load_acquire(&cur->next0))) || key_less(cur->key, key)) {
        pred = cur;
        raw = pa__load_acquire(&cur->up[i - 1]);
        cur = unmark(raw);
    }
    *pred_out = pred;
    *succ_out = cur;
    return true;
}

/* Levels that hold at least one node, read off head's tower (contiguous, hot): searches
 * start there instead of at the highest level ever used. */
static unsigned levels_in_use(pa_pq_t *pq) {
    unsigned top = pa__load_relaxed(&pq->top);
    /* acquire not needed: a stale answer only makes the search start lower or higher */
    while (top > 1 && pa__load_relaxed(&pq->head->up[top - 2]) == (uintptr_t)pq->tail) top--;
    return top;
}

/* levels from levels_in_use; n->level is capped by the caller (levels + 1 for a single
 * push, a few more for a batch chunk); the search starts at the higher of the two. f
 * (nullable): the finger of a run of inserts in ascending key order in this operation;
 * the first search starts from it and it is updated for the next insert of the run. */
static void skiplist_insert(pa_pq_t *pq, pq_node_t *n, unsigned levels, pq_finger_t *f) {
    pq_node_t *preds[PQ_MAX_LEVEL], *succs[PQ_MAX_LEVEL];
    const int height = n->level;
    uint32_t top = pa__load_relaxed(&pq->top);
    /* restructure walks every level up to `top`: raise it before linking a taller tower */
    while ((uint32_t)height > top && !pa__cas_strong_relaxed(&pq->top, &top, (uint32_t)height)) {
    }
    const int top_index = (height > (int)levels ? height : (int)levels) - 1;

    pa__store_relaxed(&n->inserting, 1);
    pq_node_t *del = NULL;
    int searched = -1; /* preds/succs hold levels 0..searched */
#ifdef PA_PQ_DEBUG
    if (f && f->levels > 0 && !key_less(f->last, n->key)) {
        fprintf(stderr, "pq: finger run out of key order\n");
        abort();
    }
#endif
    if (f && f->levels > 0) del = locate_finger(f, n->key, height, preds, succs, &searched);
    for (;;) {
        if (searched < 0) {
            del = locate_preds(pq, n->key, top_index, preds, succs);
            searched = top_index;
        }
        pa__store_relaxed(&n->next0, (uintptr_t)succs[0]);
        uintptr_t expected = (uintptr_t)succs[0]; /* fails if preds[0] got marked meanwhile */
        /* release: publishes n (key, value, state, next0, inserting) to every acquire load
         * of this link: searches, delete-min's walk and fetch-or */
        if (pa__cas_strong_acq_rel(&preds[0]->next0, &expected, (uintptr_t)n)) break;
        PQ_STAT(PQS_INSERT0_FAIL, 1);
        searched = -1; /* retry from head */
    }
    int linked = 1; /* levels of n linked */
    for (int i = 1; i < height;) {
        if (del != NULL && succs[i] == del) {
            /* The successor at this level is the last deleted node. An upper-level search
             * cannot tell it from a live node (only its predecessor's level-0 link says it
             * is deleted), so it compared keys with it and may have stopped before it.
             * Linking there would order a live node before a deleted one; giving up the
             * tower instead (Lindén-Jonsson's rule) degenerates the list when many inserts
             * arrive while the prefix's last node holds a stale key — e.g. after a queue
             * was emptied, every new tower stopped at level 1 and pushes became O(n).
             * So continue this level's walk past it, as level 0 does. */
            if (!walk_past_deleted(n->key, i, del, &preds[i], &succs[i])) break; /* frozen */
        }
        pa__store_relaxed(&n->up[i - 1], (uintptr_t)succs[i]);
        /* Stop raising when n or the successor is deleted: linking there could order a
         * live node before a deleted one. */
        if (is_marked(pa__load_acquire(&n->next0)) || is_marked(pa__load_acquire(&succs[i]->next0)))
            break;
        uintptr_t expected = (uintptr_t)succs[i];
        PQ_INSERT_HOOK(pq, n, i);
        /* release: as for level 0 (publishes n->up[i-1]) */
        if (pa__cas_strong_acq_rel(&preds[i]->up[i - 1], &expected, (uintptr_t)n)) {
            linked = ++i;
        } else if (is_marked(expected)) {
            PQ_STAT(PQS_INSERTUP_FAIL, 1);
            break; /* restructure froze the predecessor's link: the tower ends here */
        } else {
            PQ_STAT(PQS_INSERTUP_FAIL, 1);
            del = locate_preds(pq, n->key, top_index, preds, succs);
            searched = top_index;
            if (succs[0] != n) break; /* n was deleted meanwhile */
        }
    }
    if (f) {
        /* The next insert of the run (a larger key) may start from any of these: each is
         * head, deleted, or smaller than n; n itself only at the levels it is linked at. */
        for (int i = 0; i <= searched; i++) f->at[i] = preds[i];
        for (int i = 0; i < linked; i++) f->at[i] = n;
        if (searched + 1 > f->levels) f->levels = searched + 1;
#ifdef PA_PQ_DEBUG
        memcpy(f->last, n->key, sizeof f->last);
#endif
    }
    /* release: pairs with delete-min's acquire load; our upper links happen before any
     * cut that passes n */
    pa__store_release(&n->inserting, 0);
}

/* Moves head's upper-level pointers past the nodes whose level-0 link is marked
 * (Lindén-Jonsson's Restructure), freezing each passed node's link at that level first.
 * Without the freeze an insert could link a new node behind a passed node between our
 * read of that node's link and our CAS on head: the new node would then be unreachable at
 * that level while reachable at the levels above, which breaks the invariant the insert's
 * `del` check relies on (at every level, deleted nodes before live ones) and lets a cut
 * node stay reachable through a live one. Every level is walked from head's own pointer:
 * a node passed without being frozen would reopen the same window. */
static void restructure(pa_pq_t *pq) {
    pq_node_t *head = pq->head;
    int i = (int)pa__load_relaxed(&pq->top) - 1;
    while (i > 0) {
        /* acquire (link and next0 loads): pair with the CASes that wrote them; head's
         * links are never frozen (marked) */
        uintptr_t h = pa__load_acquire(&head->up[i - 1]);
        pq_node_t *cur = (pq_node_t *)h;
        if (!is_marked(pa__load_acquire(&cur->next0))) {
            i--;
            continue;
        }
        do {
            PQ_ASSERT_LIVE(cur);
            /* acq_rel: freezes cur's link at this level (an insert's CAS that expects an
             * unmarked link now fails); acquire pairs with the CAS that linked the next */
            cur = unmark(pa__fetch_or_acq_rel(&cur->up[i - 1], MARK));
        } while (is_marked(pa__load_acquire(&cur->next0)));
        /* acq_rel: publishes the new first node at this level; only moves forward */
        if (pa__cas_strong_acq_rel(&head->up[i - 1], &h, (uintptr_t)cur)) i--;
    }
}

/* Delete-min, up to `max` times in one walk: each claim continues from the node claimed
 * before it instead of walking the deleted prefix again from head, and the walk ends with
 * at most one cut. Each claimed node's key goes to items[k] (nullable) and its value to
 * values[k] (nullable), read while this operation still protects the node. Returns how
 * many were taken; fewer than max when the queue ran empty. */
static size_t skiplist_take(pq_op_t *op, size_t max, pa_pq_item_t *items, uint64_t *values) {
    pa_pq_t *const pq = op->pq;
    const bool indexed = op->indexed;
    pq_node_t *const head = pq->head, *const tail = pq->tail;
    pq_node_t *x = head, *newhead = NULL;
    size_t taken = 0;
    /* indexed batch pops remove their index entries after the walk (index_remove_all) */
    pq_node_t *unindex[PQ_BATCH_CHUNK];
    size_t unindexing = 0;
    const bool defer = indexed && max > 1 && max <= PQ_BATCH_CHUNK;
    /* acquire: pairs with the insert / cut CAS that wrote head's link */
    const uintptr_t obs_head = pa__load_acquire(&head->next0);
    unsigned offset = 0;
    for (;;) {
        offset++;
        PQ_ASSERT_LIVE(x);
        /* acquire: pairs with the CAS / fetch-or that wrote x's link */
        uintptr_t nxt = pa__load_acquire(&x->next0);
        /* acquire: pairs with the inserter's release store; a node still linking its
         * tower must stay reachable from head, so the cut stops before it */
        if (!newhead && pa__load_acquire(&x->inserting)) newhead = x;
        pq_node_t *y = unmark(nxt);
        if (y == tail) break; /* every node before the tail is deleted: empty */
        if (!is_marked(nxt)) {
            /* acq_rel: the claim. Acquire pairs with the insert CAS that published y.
             * For a node of the prefix only the old mark bit is needed: one `lock bts`
             * on x86 (a fetch-or that returns the whole word is a CAS loop, retried under
             * contention), and a marked link never changes again, so reading it after
             * the claim gives the node claimed. Head's link is the exception — a cut may
             * swing it right after our claim — so from head the whole old word is taken. */
            bool claimed;
            if (x != head) {
                claimed = (pa__fetch_or_acq_rel(&x->next0, MARK) & MARK) == 0;
                nxt = pa__load_relaxed(&x->next0);
            } else {
                nxt = pa__fetch_or_acq_rel(&x->next0, MARK);
                claimed = !is_marked(nxt);
            }
            y = unmark(nxt);
            if (claimed) {
                /* y is ours, unless (indexed) a cancel or an aborting push decided it
                 * first: then discard it and go on */
                x = y;
                bool ours = true;
                /* (unindexed: counted once below) */
                if (indexed) ours = resolve_taken_into(op, y, defer ? unindex : NULL, &unindexing);
                if (ours) {
                    if (items) node_to_item(y, &items[taken]);
                    if (values) values[taken] = y->value;
                    if (++taken == max) break;
                }
                continue;
            }
            PQ_STAT(PQS_CLAIM_LOST, 1); /* we tried and another consumer won */
        }
        /* y was claimed by another consumer */
        if (indexed) (void)resolve_taken(op, y);
        x = y;
    }
    /* unindexed: every claim is ours; one size update for the walk instead of one locked
     * add per item (the size is exact only when no operation is in flight anyway) */
    if (!indexed && taken) size_add(op, -(int64_t)taken);
    if (unindexing) index_remove_all(op, unindex, unindexing);
    PQ_STAT(PQS_WALK_STEPS, offset);
    if (!newhead) newhead = x;
    if (offset >= PQ_BOUND_OFFSET && is_marked(obs_head) && newhead != unmark(obs_head)) {
        uintptr_t expected = obs_head;
        /* acq_rel: the cut. Succeeds only if no other consumer cut since we read obs_head,
         * so the nodes from obs_head to newhead are exactly the ones we walked. */
        if (pa__cas_strong_acq_rel(&head->next0, &expected, (uintptr_t)newhead | MARK)) {
            PQ_STAT(PQS_CUT_OK, 1);
            restructure(pq);
            pq_node_t *cur = unmark(obs_head);
            while (cur != newhead) {
                /* relaxed: a marked link never changes again, and we read it in the walk */
                pq_node_t *next = unmark(pa__load_relaxed(&cur->next0));
                node_release(op, cur);
                cur = next;
            }
        } else {
            PQ_STAT(PQS_CUT_FAIL, 1);
        }
    }
    return taken;
}

/* ---- the interface ---- */

int pa_pq_create(unsigned flags, pa_pq_t **out) {
    if (!out || (flags & ~PA_PQ_INDEXED)) return -EINVAL;
    pa_pq_t *pq = aligned_alloc(PA_CACHE_LINE, sizeof *pq);
    if (!pq) return -ENOMEM;
    memset(pq, 0, sizeof *pq);
    pq->flags = flags;
    pq->head = node_alloc(NULL, PQ_MAX_LEVEL);
    pq->tail = node_alloc(NULL, 1);
    if (flags & PA_PQ_INDEXED) pq->buckets = calloc(PQ_INDEX_BUCKETS, sizeof *pq->buckets);
    if (!pq->head || !pq->tail || ((flags & PA_PQ_INDEXED) && !pq->buckets)) {
        free(pq->head);
        free(pq->tail);
        free(pq->buckets);
        free(pq);
        return -ENOMEM;
    }
    for (int k = 0; k < 4; k++) pq->tail->key[k] = UINT64_MAX;
    pq->tail->value = 0;
    for (int i = 0; i < PQ_MAX_LEVEL; i++) pa__store_relaxed(next_at(pq->head, i), (uintptr_t)pq->tail);
    pa__store_relaxed(&pq->top, 1);
    pa__store_relaxed(&pq->wide, 0);
    pa__store_relaxed(&pq->arrival, 0);
    for (int k = 0; k <= PQ_SIZE_SHARDS; k++) pa__store_relaxed(&pq->size[k].n, 0);
    *out = pq;
    return 0;
}

/* destroy: drop one structure's hold on n without EBR (no other thread may be here) */
static void node_drop_now(pq_node_t *n) {
    uint16_t r = pa__load_relaxed(&n->refs);
    if (r <= 1) {
        free(n);
    } else {
        pa__store_relaxed(&n->refs, (uint16_t)(r - 1));
    }
}

void pa_pq_destroy(pa_pq_t *pq) {
    if (!pq) return;
    /* Level 0 holds every node the skiplist still links (the uncut prefix included). */
    pq_node_t *x = unmark(pa__load_relaxed(&pq->head->next0));
    while (x != pq->tail) {
        pq_node_t *next = unmark(pa__load_relaxed(&x->next0));
        node_drop_now(x);
        x = next;
    }
    if (pq->buckets) {
        for (uint32_t b = 0; b < PQ_INDEX_BUCKETS; b++) {
            pq_node_t *n = (pq_node_t *)pa__load_relaxed(&pq->buckets[b]);
            while (n) {
                pq_node_t *next = unmark(pa__load_relaxed(&node_ext(n)->hnext));
                node_drop_now(n);
                n = next;
            }
        }
        free(pq->buckets);
    }
    free(pq->head);
    free(pq->tail);
    free(pq);
    /* Nodes this queue retired earlier free themselves (their free function does not
     * touch the queue); give them a chance now. */
    pa__ebr_flush();
}

static bool key_valid(double priority, double confidence, double deadline) {
    return !isnan(priority) && !isnan(confidence) && !(isinf(deadline) && deadline < 0);
}

/* One push inside an operation. `ticket` is the arrival number reserved for it, or
 * PQ_NO_TICKET to take one from the counter once the index accepted the value (so that no
 * number is spent on a push that fails). A retry always takes a fresh number: the aborted
 * attempt may still sit in the skiplist with the old one, and keys must stay unique.
 * kept (indexed queues, nullable): receives the pushed node, with a third reference that
 * keeps it from being retired (and its memory valid) until the caller's node_release —
 * the all-or-nothing batch withdraws its items through it (pa_pq_push_all). */
#define PQ_NO_TICKET UINT64_MAX
static int push_one(pq_op_t *op, uint64_t value, double priority, double confidence, double deadline,
                    uint64_t ticket, pq_node_t **kept) {
    pa_pq_t *const pq = op->pq;
    uint64_t words[3];
    encode_key(words, priority, confidence, deadline);
    size_add(op, 1); /* counted from now on; undone on failure */
    int rc = 0;
    for (;;) {
        /* Towers at most one level above the current top (Pugh's cap): no level that
         * holds a single tall node gets walked by every search. */
        unsigned levels = levels_in_use(pq);
        unsigned cap = levels + 1 < PQ_MAX_LEVEL ? levels + 1 : PQ_MAX_LEVEL;
        pq_node_t *n = node_alloc(op->t, random_level(op->t, cap, tower_wide(op)));
        if (!n) {
            rc = -ENOMEM;
            break;
        }
        memcpy(n->key, words, sizeof words);
        n->value = value;
        if (op->indexed) {
            pa__store_relaxed(&n->state, ST_PENDING);
            pa__store_relaxed(&n->refs, kept ? 3 : 2); /* skiplist + index (+ the caller) */
            rc = index_insert(op, n);
            if (rc != 0) {
                node_recycle(n); /* never published */
                break;
            }
        }
        n->key[3] = ticket != PQ_NO_TICKET ? ticket : pa__fetch_add_relaxed(&pq->arrival, 1);
        ticket = PQ_NO_TICKET;
        if (op->indexed && pa__load_acquire(&n->state) == ST_DEAD) {
            node_release(op, n); /* aborted before linking: the skiplist never holds it */
            if (kept) node_release(op, n);
            continue;
        }
        skiplist_insert(pq, n, levels, NULL);
        if (!op->indexed) break;
        uint32_t s = ST_PENDING;
        /* acq_rel: the push's completion; loses to a pop that already took the node (then
         * the push is done as well) or to a racing push that aborted it (then retry) */
        if (pa__cas_strong_acq_rel(&n->state, &s, ST_QUEUED) || s != ST_DEAD) {
            if (kept) *kept = n;
            break;
        }
        if (kept) node_release(op, n); /* the aborted attempt: the cut releases the rest */
    }
    if (rc != 0) size_add(op, -1);
    return rc;
}

int pa_pq_push(pa_pq_t *pq, uint64_t value, double priority, double confidence, double deadline) {
    if (!pq || !key_valid(priority, confidence, deadline)) return -EINVAL;
    pq_op_t op;
    if (!op_begin(&op, pq)) return -ENOMEM;
    int rc = push_one(&op, value, priority, confidence, deadline, PQ_NO_TICKET, NULL);
    op_end(&op);
    return rc;
}

static inline size_t batch_chunk(size_t left) { return left < PQ_BATCH_CHUNK ? left : PQ_BATCH_CHUNK; }

/* Sorting a batch's keys. A key record is the node's four key words; the arrival word
 * k[3] is the item's ticket, and tickets are given in input order, so k[3] - first ticket
 * is the item's index in the input. */
typedef struct pq_sort_key {
    uint64_t k[4];
} pq_sort_key_t;

/* The n items' keys, with tickets from `ticket` in input order; diff[w] gets the bits in
 * which word w of some key differs from the first key's (what sort_keys starts from). */
static inline void make_key(pq_sort_key_t *key, double priority, double confidence, double deadline,
                            uint64_t ticket) {
    encode_key(key->k, priority, confidence, deadline);
    key->k[3] = ticket;
}

static void make_keys(pq_sort_key_t *keys, size_t n, const double *priorities, const double *confidences,
                      const double *deadlines, uint64_t ticket, uint64_t diff[3]) {
    diff[0] = diff[1] = diff[2] = 0;
    if (n == 0) return;
    make_key(&keys[0], priorities[0], confidences[0], deadlines[0], ticket);
    const uint64_t f0 = keys[0].k[0], f1 = keys[0].k[1], f2 = keys[0].k[2];
    uint64_t d0 = 0, d1 = 0, d2 = 0;
    for (size_t k = 1; k < n; k++) {
        make_key(&keys[k], priorities[k], confidences[k], deadlines[k], ticket + k);
        d0 |= keys[k].k[0] ^ f0;
        d1 |= keys[k].k[1] ^ f1;
        d2 |= keys[k].k[2] ^ f2;
    }
    diff[0] = d0;
    diff[1] = d1;
    diff[2] = d2;
}

/* At most this many keys are sorted by insertion (a radix level costs a few hundred
 * instructions of its own) */
#define PQ_SORT_LEAF 16

/* Sorts the n keys of x ascending by their first three words, stably: keys equal there
 * keep their order in x. On keys made in input order (k[3] ascending) that is the order
 * of the whole key, k[3] included. y (room for n) is scratch; the result ends in y when
 * into_y, else in x. An MSD radix sort: a level distributes the keys into y by a digit
 * of up to 8 bits (fewer when n < 256: about one key per bucket) with a counting sort
 * (one pass to count, one to move: stable), and sorts each bucket by the bits below the
 * digit the same way. The digit starts at bit `top` of word k[w], where all keys agree on
 * every bit before it: w < 0 means not known, and the level first finds the highest bit
 * in which the keys differ (one pass: OR of every key XOR the first); a bucket's keys
 * agree down to its level's digit, so a bucket starts just below it; a digit in which
 * all keys agree (the count finds them in one bucket) sends the level back to the search.
 * So constant digits cost no move (small-integer priorities leave most of k[0] equal, a
 * batch of one confidence all of k[1]), and keys equal in all three words (w = 3) end a
 * level at once. Stack: the largest bucket is sorted by looping in the same frame, the
 * others (each at most half the level) by recursion, so the depth is at most log2(n): 16
 * frames of ~1 KiB for a group, 8 for a chunk. Termination: each level either moves the
 * keys by a digit whose top bit differs among them (every bucket is smaller than the
 * level) or, after the search, ends or starts at a bit that differs. */
static void sort_keys_into(pq_sort_key_t *x, pq_sort_key_t *y, size_t n, bool into_y, int w, int top) {
    for (;;) {
        if (n <= PQ_SORT_LEAF) {
            for (size_t i = 1; i < n; i++) {
                pq_sort_key_t v = x[i];
                size_t j = i;
                while (j > 0 && key_less(v.k, x[j - 1].k)) {
                    x[j] = x[j - 1];
                    j--;
                }
                x[j] = v;
            }
            if (into_y) memcpy(y, x, n * sizeof *x);
            return;
        }
        if (w < 0) {
            uint64_t d0 = 0, d1 = 0, d2 = 0;
            for (size_t i = 1; i < n; i++) {
                d0 |= x[i].k[0] ^ x[0].k[0];
                d1 |= x[i].k[1] ^ x[0].k[1];
                d2 |= x[i].k[2] ^ x[0].k[2];
            }
            uint64_t d = d0 ? d0 : d1 ? d1 : d2;
            w = d0 ? 0 : d1 ? 1 : d2 ? 2 : 3;
            if (d) top = 63 - __builtin_clzll(d);
        }
        if (w > 2) { /* equal in k[0..2]: in x's order already */
            if (into_y) memcpy(y, x, n * sizeof *x);
            return;
        }
        unsigned bits = 63u - (unsigned)__builtin_clzll((unsigned long long)n);
        if (bits > 8) bits = 8;
        unsigned shift = (unsigned)top + 1 >= bits ? (unsigned)top + 1 - bits : 0;
        uint64_t mask = (1u << bits) - 1;
        unsigned nb = 1u << bits;
        uint32_t end[256]; /* counts, then each bucket's start, then its end */
        memset(end, 0, nb * sizeof end[0]);
        for (size_t i = 0; i < n; i++) end[(x[i].k[w] >> shift) & mask]++;
        uint32_t sum = 0;
        bool one = false;
        for (unsigned b = 0; b < nb; b++) {
            uint32_t c = end[b];
            one |= c == n;
            end[b] = sum;
            sum += c;
        }
        if (one) { /* the keys agree on this digit: find where they differ */
            w = -1;
            continue;
        }
        for (size_t i = 0; i < n; i++) y[end[(x[i].k[w] >> shift) & mask]++] = x[i];
        int cw = shift ? w : w + 1, ctop = shift ? (int)shift - 1 : 63; /* where the buckets start */
        uint32_t lo = 0, big_lo = 0, big_n = 0;
        for (unsigned b = 0; b < nb && lo < n; b++) {
            uint32_t c = end[b] - lo;
            if (c > big_n) { /* the largest so far: sorted last, here */
                if (big_n) sort_keys_into(y + big_lo, x + big_lo, big_n, !into_y, cw, ctop);
                big_lo = lo;
                big_n = c;
            } else if (c) {
                sort_keys_into(y + lo, x + lo, c, !into_y, cw, ctop);
            }
            lo = end[b];
        }
        pq_sort_key_t *t = x;
        x = y + big_lo;
        y = t + big_lo;
        n = big_n;
        into_y = !into_y;
        w = cw;
        top = ctop;
    }
}

/* Sorts n keys made in input order ascending by the whole key, given make_keys' diff;
 * tmp has room for n. */
static void sort_keys(pq_sort_key_t *a, pq_sort_key_t *tmp, size_t n, const uint64_t diff[3]) {
    int w = diff[0] ? 0 : diff[1] ? 1 : diff[2] ? 2 : 3;
    sort_keys_into(a, tmp, n, false, w, w < 3 ? 63 - __builtin_clzll(diff[w]) : 0);
}

/* Sorts nodes by address (tmp has room for n): an LSD radix sort over the address bits
 * that differ among them (11 per pass — two passes for nodes within 64 MiB —, fewer for a
 * small n; none when already ascending). */
static void sort_by_address(pq_node_t **a, pq_node_t **tmp, size_t n) {
    if (n < 2) return;
    uintptr_t d = 0, f = (uintptr_t)a[0];
    bool ascending = true;
    for (size_t i = 1; i < n; i++) {
        d |= (uintptr_t)a[i] ^ f;
        ascending &= (uintptr_t)a[i - 1] < (uintptr_t)a[i];
    }
    if (ascending) return;
    if (n <= PQ_SORT_LEAF) {
        for (size_t i = 1; i < n; i++) {
            pq_node_t *v = a[i];
            size_t j = i;
            for (; j > 0 && (uintptr_t)v < (uintptr_t)a[j - 1]; j--) a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    unsigned lo = (unsigned)__builtin_ctzll((unsigned long long)d), hi = 63u - (unsigned)__builtin_clzll((unsigned long long)d);
    unsigned bits = 63u - (unsigned)__builtin_clzll((unsigned long long)n); /* fewer for a small n */
    if (bits > 11) bits = 11;
    const uintptr_t mask = ((uintptr_t)1 << bits) - 1;
    const unsigned nb = 1u << bits;
    pq_node_t **src = a, **dst = tmp;
    for (unsigned sh = lo; sh <= hi; sh += bits) {
        uint32_t end[2048];
        memset(end, 0, nb * sizeof end[0]);
        for (size_t i = 0; i < n; i++) end[((uintptr_t)src[i] >> sh) & mask]++;
        uint32_t sum = 0;
        for (unsigned b = 0; b < nb; b++) {
            uint32_t c = end[b];
            end[b] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++) dst[end[((uintptr_t)src[i] >> sh) & mask]++] = src[i];
        pq_node_t **x = src;
        src = dst;
        dst = x;
    }
    if (src != a) memcpy(a, src, n * sizeof *a);
}

/* Puts a batch's blank nodes in the order its sorted keys take them: nodes[k] was
 * allocated with heights[k], the height drawn for the k-th key, and afterwards nodes[k]
 * is a node of that height again — so the heights along the keys stay the independent
 * draws they were — while the nodes of each height are taken in ascending address order.
 * So the inserts write, and the pops walk, a few ascending streams of memory (one per
 * height) instead of the scattered order in which recycled nodes leave the per-height
 * caches and the depot (pop_many of 2e5 recycled nodes: ~3x the time per item of a first
 * fill without this). Sorting all nodes by address alone is not allowed: a node's height
 * is not independent of its address (each height is its own cache, depot list and malloc
 * size), and runs of one height along the keys degrade the skiplist into a list — a
 * refill of 1e6 items took minutes that way. cls and scratch have room for n. */
static void order_nodes(pq_node_t **nodes, const uint8_t *heights, pq_node_t **cls, pq_node_t **scratch, size_t n) {
    uint32_t next[PQ_MAX_LEVEL + 1] = {0}; /* per height: count, then the class's next node */
    for (size_t k = 0; k < n; k++) next[heights[k]]++;
    uint32_t lo = 0;
    for (unsigned h = 0; h <= PQ_MAX_LEVEL; h++) {
        uint32_t c = next[h];
        next[h] = lo;
        lo += c;
    }
    for (size_t k = 0; k < n; k++) cls[next[heights[k]]++] = nodes[k];
    lo = 0;
    for (unsigned h = 0; h <= PQ_MAX_LEVEL; h++) { /* next[h] is now the class's end */
        uint32_t c = next[h] - lo;
        sort_by_address(cls + lo, scratch, c);
        next[h] = lo; /* back to its start */
        lo += c;
    }
    for (size_t k = 0; k < n; k++) nodes[k] = cls[next[heights[k]]++];
}

/* The tower cap for a batch of n nodes whose heights are drawn before any is linked:
 * Pugh's cap (one level above those in use) would stunt a batch pushed into a small queue
 * — the first chunk into an empty one would be all height 1 or 2, a near-linked list. The
 * batch itself fills log4(n) more levels, so the cap is raised by that much. A batch's
 * towers grow with p = 1/4 at every size: its inserts are finger searches that mostly
 * stay at the lowest levels, so they gain little from the wide shape and pay for its
 * taller towers (1e6 items in batch calls ran 10-20 % slower with p = 1/2). */
static unsigned batch_cap(unsigned levels, size_t n) {
    unsigned grow = (unsigned)(63 - __builtin_clzll((unsigned long long)n | 1)) / PQ_LEVEL_LOG2P;
    return levels + 1 + grow < PQ_MAX_LEVEL ? levels + 1 + grow : PQ_MAX_LEVEL;
}

/* One chunk of an unindexed batch push: every node is allocated first (so a failure
 * pushes nothing of the chunk and the pushed items stay a prefix of the input), keyed
 * with the chunk's arrival numbers in input order, then inserted in key order — each
 * insert's search then follows the previous one's path, whose nodes are in cache (each is
 * still a separate push, linearizable on its own; they overlap, so any order among them
 * is allowed, and keys with their tickets are fixed before any is visible). */
static int push_chunk_sorted(pq_op_t *op, size_t chunk, const uint64_t *values, const double *priorities,
                             const double *confidences, const double *deadlines) {
    pa_pq_t *const pq = op->pq;
    pq_node_t *nodes[PQ_BATCH_CHUNK];
    uint8_t heights[PQ_BATCH_CHUNK];
    pq_sort_key_t keys[2 * PQ_BATCH_CHUNK]; /* the keys, then the sorts' scratch */
    unsigned cap = batch_cap(levels_in_use(pq), chunk); /* heights drawn before any is linked */
    for (size_t k = 0; k < chunk; k++) {
        heights[k] = (uint8_t)random_level(op->t, cap, false);
        nodes[k] = node_alloc(op->t, heights[k]);
        if (!nodes[k]) {
            while (k > 0) node_recycle(nodes[--k]); /* never published */
            return -ENOMEM;
        }
    }
    uint64_t ticket = pa__fetch_add_relaxed(&pq->arrival, chunk);
    uint64_t diff[3];
    make_keys(keys, chunk, priorities, confidences, deadlines, ticket, diff);
    sort_keys(keys, keys + chunk, chunk, diff);
    pq_node_t **cls = (pq_node_t **)(void *)(keys + chunk); /* the scratch half: 4 pointers per item */
    order_nodes(nodes, heights, cls, cls + chunk, chunk);
    /* node k, of the height drawn for it, takes the k-th key */
    for (size_t k = 0; k < chunk; k++) {
        memcpy(nodes[k]->key, keys[k].k, sizeof nodes[k]->key);
        nodes[k]->value = values[keys[k].k[3] - ticket];
    }
    size_add(op, (int64_t)chunk);
    pq_finger_t finger;
    finger.levels = 0;
    for (size_t k = 0; k < chunk; k++) skiplist_insert(pq, nodes[k], levels_in_use(pq), &finger);
    return 0;
}

/* The first steps of a sorted group push (push_group_sorted, push_all_group): the n keys,
 * with the group's tickets (from *ticket) in input order, sorted ascending; a node of a
 * freshly drawn height for each, all allocated before any is used (a failure publishes
 * nothing) and put in order_nodes' order. On 0, *keys_out (the caller frees it) holds the
 * sorted keys in its first half and the key-ordered nodes from (pq_node_t **)(keys + n);
 * node k is to take key k. 1: no sort buffer (nothing done); -ENOMEM: too few nodes
 * (none kept; the tickets are spent). */
static int group_prepare(pa_pq_t *pq, pq_thread_t *t, size_t n, const double *priorities, const double *confidences,
                         const double *deadlines, pq_sort_key_t **keys_out, uint64_t *ticket) {
    pq_sort_key_t *keys = malloc(2 * n * sizeof *keys);
    if (!keys) return 1;
    *ticket = pa__fetch_add_relaxed(&pq->arrival, n);
    uint64_t diff[3];
    make_keys(keys, n, priorities, confidences, deadlines, *ticket, diff);
    sort_keys(keys, keys + n, n, diff);
    unsigned cap = batch_cap(levels_in_use(pq), n); /* as in push_chunk_sorted */
    /* in the sort's scratch half (32 bytes per item): 3 node arrays and the heights */
    pq_node_t **nodes = (pq_node_t **)(void *)(keys + n), **cls = nodes + n, **scratch = cls + n;
    uint8_t *heights = (uint8_t *)(void *)(scratch + n);
    for (size_t k = 0; k < n; k++) {
        heights[k] = (uint8_t)random_level(t, cap, false);
        nodes[k] = node_alloc(t, heights[k]);
        if (!nodes[k]) {
            while (k > 0) node_recycle(nodes[--k]); /* never published */
            free(keys);
            return -ENOMEM;
        }
    }
    order_nodes(nodes, heights, cls, scratch, n);
    *keys_out = keys;
    return 0;
}

/* Batches larger than a chunk are pushed in groups of up to PQ_BATCH_GROUP items, each
 * sorted by key as a whole before any of it is linked: the group's inserts then arrive in
 * ascending order, each a finger search from the one before, and into a queue that holds
 * fewer items than the group most of them land next to their predecessor (a sorted run is
 * appended, not searched). The nodes are allocated in key order, so a pop walk over them
 * reads memory in the order the allocator handed it out. */
#define PQ_BATCH_GROUP 65536

/* One group of an unindexed batch push (n > PQ_BATCH_CHUNK items): keys with the
 * group's arrival numbers in input order, sorted; every node allocated (in key order,
 * chained privately through next0) before any is linked, so a failure pushes nothing of
 * the group; then linked in key order, PQ_BATCH_CHUNK per operation, each operation's
 * inserts one finger run. -ENOMEM before anything is linked; 1: the sort buffer could
 * not be had (nothing done: the caller pushes the group chunk by chunk instead). */
static int push_group_sorted(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                             const double *confidences, const double *deadlines) {
    pq_op_t op;
    /* The reclamation record first: once this thread has one, op_begin cannot fail */
    if (!op_begin(&op, pq)) return -ENOMEM;
    op_end(&op);
    pq_sort_key_t *keys;
    uint64_t ticket;
    int rc = group_prepare(pq, op.t, n, priorities, confidences, deadlines, &keys, &ticket);
    if (rc != 0) return rc;
    pq_node_t **nodes = (pq_node_t **)(void *)(keys + n);
    pq_node_t *first = NULL, *last = NULL;
    for (size_t k = 0; k < n; k++) {
        pq_node_t *x = nodes[k];
        memcpy(x->key, keys[k].k, sizeof x->key);
        x->value = values[keys[k].k[3] - ticket];
        /* private until linked: a chain through next0 (node_alloc zeroed x's) */
        if (last) pa__store_relaxed(&last->next0, (uintptr_t)x);
        else first = x;
        last = x;
    }
    free(keys);
    size_t left = n;
    while (left) {
        (void)op_begin(&op, pq); /* cannot fail: this thread holds its record (above) */
        size_t chunk = batch_chunk(left);
        size_add(&op, (int64_t)chunk);
        pq_finger_t finger;
        finger.levels = 0;
        for (size_t k = 0; k < chunk; k++) {
            pq_node_t *x = first;
            first = (pq_node_t *)pa__load_relaxed(&x->next0);
            skiplist_insert(pq, x, levels_in_use(pq), &finger);
        }
        left -= chunk;
        op_end(&op);
        PQ_GROUP_HOOK(pq);
    }
    return 0;
}

int pa_pq_push_many(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                    const double *confidences, const double *deadlines, size_t *pushed) {
    if (pushed) *pushed = 0;
    if (!pq || (n && (!values || !priorities || !confidences || !deadlines))) return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!key_valid(priorities[i], confidences[i], deadlines[i])) return -EINVAL;
    const bool indexed = (pq->flags & PA_PQ_INDEXED) != 0;
    size_t done = 0;
    int rc = 0;
    while (done < n && rc == 0) {
        pq_op_t op;
        if (!op_begin(&op, pq)) {
            rc = -ENOMEM;
            break;
        }
        size_t chunk = batch_chunk(n - done);
        if (!indexed && n - done > PQ_BATCH_CHUNK) {
            op_end(&op);
            size_t group = n - done < PQ_BATCH_GROUP ? n - done : PQ_BATCH_GROUP;
            rc = push_group_sorted(pq, group, values + done, priorities + done, confidences + done,
                                   deadlines + done);
            if (rc == 0) {
                done += group;
                continue;
            }
            if (rc < 0) break;
            rc = 0; /* no sort buffer: this group chunk by chunk */
            if (!op_begin(&op, pq)) {
                rc = -ENOMEM;
                break;
            }
        }
        if (!indexed) {
            /* one counter update reserves the chunk's arrival numbers, in input order (so
             * equal keys keep it) */
            rc = push_chunk_sorted(&op, chunk, values + done, priorities + done, confidences + done,
                                   deadlines + done);
            if (rc == 0) done += chunk;
            op_end(&op);
            continue;
        }
        /* Indexed pushes may fail (-EEXIST) and take their numbers one by one, in order. */
        for (size_t k = 0; k < chunk; k++, done++) {
            rc = push_one(&op, values[done], priorities[done], confidences[done], deadlines[done], PQ_NO_TICKET,
                          NULL);
            if (rc != 0) break;
        }
        op_end(&op);
    }
    if (pushed) *pushed = done;
    return rc;
}

/* ---- all or nothing: the indexed batch push ----
 *
 * pa_pq_push_many keeps its prefix contract on an indexed queue by pushing item by item:
 * sorting the items cannot keep what was pushed a prefix of the input once a racing push
 * of the same value aborts one of them while later ones are already linked (and maybe
 * popped). pa_pq_push_all gives that contract up for another one, which is what a caller
 * withdrawing a failed batch wants anyway: all items or none. Then the items can be
 * sorted and linked with finger searches as an unindexed batch is.
 *
 * Per group of up to PQ_BATCH_GROUP items (keys made with the group's tickets in input
 * order, sorted, nodes allocated in key order, as push_group_sorted does), in operations
 * of PQ_BATCH_CHUNK items:
 *   A. (input order) each node enters the index PENDING, with a third reference — ours —
 *      so that it stays valid until the call ends whatever happens to it meanwhile. A
 *      value queued already ends the call (-EEXIST, withdraw). A PENDING entry found for
 *      the value is aborted, as by any push: it may be another push's, or this input's own
 *      earlier copy of the value, which phase C then retries and finds the copy.
 *   B. (key order) each node still PENDING is linked, a finger search from the one before
 *      (a node a racing push aborted meanwhile is left out), and
 *   C. completed at once, PENDING -> QUEUED. One taken by a pop meanwhile is done as
 *      well. One aborted by a racing push of its value is pushed again by push_one (a
 *      fresh node and ticket): that either queues it or answers -EEXIST (the value is
 *      queued elsewhere, or twice in the input), which ends the call. Key order, not
 *      input order: which copy of a value given twice fails depends on their keys.
 * Withdrawal (the call fails): every node of the call that is still PENDING is aborted
 * (-> DEAD) and every one QUEUED is cancelled, each leaving the index as a cancel's does;
 * one that a pop or a cancel took first stays taken and is counted in *kept. Then, as on
 * success, our references are let go (and the skiplist's, for nodes never linked).
 * Size: +1 per item from phase A on; -1 by whoever ends an item without a pop or a cancel
 * (an abort found in C, a withdrawal) — pops and cancels count their own.
 * Linearizability: each item is a separate push overlapping the call (its tickets fixed
 * before any is visible, as for the unindexed batch), completed at its CAS in C or at a
 * pop's claim; a withdrawal is a cancel overlapping the call. */
enum { PQ_ITEM_PRIVATE, PQ_ITEM_INDEXED, PQ_ITEM_LINKED, PQ_ITEM_GONE };

typedef struct push_all_state {
    pq_node_t **node; /* per input item: the node that holds our reference */
    uint8_t *status;  /* per input item: PQ_ITEM_* (PRIVATE until published) */
} push_all_state_t;

/* Phases A to C for input items [base, base + n). 0, or -EEXIST / -ENOMEM with *failed
 * set (an input index); 1: the sort buffer could not be had (nothing done). */
static int push_all_group(pa_pq_t *pq, push_all_state_t *st, size_t base, size_t n, const uint64_t *values,
                          const double *priorities, const double *confidences, const double *deadlines,
                          size_t *failed) {
    pq_op_t op;
    (void)op_begin(&op, pq); /* cannot fail: the caller made sure this thread has its record */
    op_end(&op);
    pq_sort_key_t *keys;
    uint64_t ticket;
    int rc = group_prepare(pq, op.t, n, priorities + base, confidences + base, deadlines + base, &keys, &ticket);
    if (rc == -ENOMEM) *failed = base;
    if (rc != 0) return rc;
    pq_node_t **nodes = (pq_node_t **)(void *)(keys + n);
    for (size_t k = 0; k < n; k++) {
        pq_node_t *x = nodes[k];
        memcpy(x->key, keys[k].k, sizeof x->key);
        size_t i = base + (size_t)(keys[k].k[3] - ticket);
        x->value = values[i];
        pa__store_relaxed(&x->state, ST_PENDING);
        pa__store_relaxed(&x->refs, 3); /* skiplist + index + this call */
        st->node[i] = x;
    }
    /* nodes[] (key order) stays in the scratch half; the keys half is not needed now */
    /* A: into the index, in input order */
    for (size_t done = 0; done < n && rc == 0;) {
        (void)op_begin(&op, pq);
        size_t chunk = batch_chunk(n - done), k = 0;
        for (; k < chunk; k++) {
            size_t i = base + done + k;
            rc = index_insert(&op, st->node[i]);
            if (rc != 0) {
                *failed = i;
                break;
            }
            st->status[i] = PQ_ITEM_INDEXED;
        }
        size_add(&op, (int64_t)k);
        op_end(&op);
        done += k;
    }
    /* B and C: linked and completed in key order (the nodes were allocated in that order,
     * so this walks memory forwards); after a failure in A nothing is linked */
    for (size_t done = 0; done < n && rc == 0;) {
        (void)op_begin(&op, pq);
        size_t chunk = batch_chunk(n - done);
        pq_finger_t finger;
        finger.levels = 0;
        for (size_t k = 0; k < chunk && rc == 0; k++) {
            pq_node_t *x = nodes[done + k];
            size_t i = base + (size_t)(x->key[3] - ticket);
            /* acquire: pairs with the aborting CAS (then its index removal is visible) */
            if (pa__load_acquire(&x->state) == ST_PENDING) {
                st->status[i] = PQ_ITEM_LINKED;
                skiplist_insert(pq, x, levels_in_use(pq), &finger);
            } /* else aborted already: left out */
            uint32_t s = ST_PENDING;
            /* acq_rel: the push's completion, as in push_one */
            if (pa__cas_strong_acq_rel(&x->state, &s, ST_QUEUED) || s != ST_DEAD) continue;
            /* aborted by a racing push of its value: this attempt ends, a new one starts
             * (a search from head; the finger stays valid: it holds none of its nodes,
             * and the keys after this one are still larger than all of the run's) */
            size_add(&op, -1);
            if (st->status[i] == PQ_ITEM_INDEXED) node_release(&op, x); /* never linked */
            node_release(&op, x);
            st->status[i] = PQ_ITEM_GONE;
            pq_node_t *again = NULL;
            rc = push_one(&op, values[i], priorities[i], confidences[i], deadlines[i], PQ_NO_TICKET, &again);
            if (rc != 0) {
                *failed = i;
                break;
            }
            st->node[i] = again;
            st->status[i] = PQ_ITEM_LINKED;
        }
        op_end(&op);
        done += chunk;
        PQ_GROUP_HOOK(pq);
    }
    free(keys);
    return rc;
}

/* Withdraws every item of the call's n still queued or pending; returns how many a pop or
 * a cancel had taken first. */
static size_t push_all_withdraw(pa_pq_t *pq, push_all_state_t *st, size_t n) {
    size_t taken = 0;
    for (size_t done = 0; done < n;) {
        pq_op_t op;
        (void)op_begin(&op, pq);
        size_t chunk = batch_chunk(n - done);
        for (size_t i = done; i < done + chunk; i++) {
            if (st->status[i] != PQ_ITEM_INDEXED && st->status[i] != PQ_ITEM_LINKED) continue;
            pq_node_t *x = st->node[i];
            /* acquire: pairs with the CAS that set the state */
            uint32_t s = pa__load_acquire(&x->state);
            for (;;) {
                if (s == ST_PENDING || s == ST_QUEUED) {
                    /* acq_rel: decides against a pop's claim, a cancel or a racing push */
                    if (!pa__cas_strong_acq_rel(&x->state, &s, s == ST_PENDING ? ST_DEAD : ST_CANCELLED)) continue;
                    size_add(&op, -1);
                    index_remove(&op, x);
                } else if (s == ST_DEAD) {
                    size_add(&op, -1); /* aborted by a racing push: nobody counted it off */
                } else {
                    taken++; /* TAKEN or CANCELLED: a pop or a cancel counted it */
                }
                break;
            }
        }
        op_end(&op);
        done += chunk;
    }
    return taken;
}

/* Lets go of this call's references (and the skiplist's for nodes never linked). */
static void push_all_release(pa_pq_t *pq, push_all_state_t *st, size_t n) {
    for (size_t done = 0; done < n;) {
        pq_op_t op;
        (void)op_begin(&op, pq);
        size_t chunk = batch_chunk(n - done);
        for (size_t i = done; i < done + chunk; i++) {
            pq_node_t *x = st->node[i];
            switch (st->status[i]) {
            case PQ_ITEM_PRIVATE:
                if (x) node_recycle(x); /* allocated, never published */
                break;
            case PQ_ITEM_INDEXED:
                node_release(&op, x); /* the skiplist never held it */
                node_release(&op, x);
                break;
            case PQ_ITEM_LINKED:
                node_release(&op, x);
                break;
            default:
                break; /* GONE: released already */
            }
        }
        op_end(&op);
        done += chunk;
    }
}

int pa_pq_push_all(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                   const double *confidences, const double *deadlines, size_t *failed, size_t *kept) {
    if (failed) *failed = 0;
    if (kept) *kept = 0;
    if (!pq || (n && (!values || !priorities || !confidences || !deadlines))) return -EINVAL;
    if (!(pq->flags & PA_PQ_INDEXED)) return -ENOTSUP;
    for (size_t i = 0; i < n; i++)
        if (!key_valid(priorities[i], confidences[i], deadlines[i])) {
            if (failed) *failed = i;
            return -EINVAL;
        }
    if (n == 0) return 0;
    pq_op_t op;
    /* the reclamation record first: once this thread has one, op_begin cannot fail */
    if (!op_begin(&op, pq)) return -ENOMEM;
    op_end(&op);
    push_all_state_t st = {calloc(n, sizeof *st.node), calloc(n, 1)};
    if (!st.node || !st.status) {
        free(st.node);
        free(st.status);
        return -ENOMEM;
    }
    size_t where = 0;
    int rc = 0;
    for (size_t base = 0; base < n && rc == 0;) {
        size_t group = n - base < PQ_BATCH_GROUP ? n - base : PQ_BATCH_GROUP;
        rc = push_all_group(pq, &st, base, group, values, priorities, confidences, deadlines, &where);
        if (rc == 1) {
            /* no sort buffer: this group item by item (each a push_one keeping its node) */
            rc = 0;
            for (size_t i = base; i < base + group && rc == 0; i++) {
                (void)op_begin(&op, pq);
                rc = push_one(&op, values[i], priorities[i], confidences[i], deadlines[i], PQ_NO_TICKET, &st.node[i]);
                op_end(&op);
                if (rc != 0) where = i;
                else st.status[i] = PQ_ITEM_LINKED;
            }
        }
        base += group;
    }
    size_t taken = 0;
    if (rc != 0) {
        taken = push_all_withdraw(pq, &st, n);
        if (failed) *failed = where;
    }
    push_all_release(pq, &st, n);
    if (kept) *kept = taken;
    free(st.node);
    free(st.status);
    return rc;
}

int pa_pq_pop(pa_pq_t *pq, pa_pq_item_t *item) {
    if (!pq) return -EINVAL;
    pq_op_t op;
    if (!op_begin(&op, pq)) return -ENOMEM; /* no reclaimer record: not "empty" */
    size_t got = skiplist_take(&op, 1, item, NULL);
    op_end(&op);
    return got == 1 ? 1 : 0;
}

/* Items popped, or -ENOMEM when not even the first operation could begin (items popped by
 * earlier chunks are reported; the next call reports the error). */
static ssize_t pop_batch(pa_pq_t *pq, size_t max, pa_pq_item_t *items, uint64_t *values) {
    size_t got = 0;
    while (got < max) {
        pq_op_t op;
        if (!op_begin(&op, pq)) {
            if (got == 0) return -ENOMEM;
            break;
        }
        size_t want = batch_chunk(max - got);
        size_t n = skiplist_take(&op, want, items ? items + got : NULL, values ? values + got : NULL);
        op_end(&op);
        got += n;
        if (n < want) break; /* empty */
    }
    return (ssize_t)got;
}

ssize_t pa_pq_pop_many(pa_pq_t *pq, uint64_t *values, size_t max) {
    if (!pq || (!values && max) || max > (size_t)SSIZE_MAX) return -EINVAL;
    return pop_batch(pq, max, NULL, values);
}

ssize_t pa_pq_pop_items(pa_pq_t *pq, pa_pq_item_t *items, size_t max) {
    if (!pq || (!items && max) || max > (size_t)SSIZE_MAX) return -EINVAL;
    return pop_batch(pq, max, items, NULL);
}

int pa_pq_peek(pa_pq_t *pq, pa_pq_item_t *item) {
    if (!pq) return -EINVAL;
    pq_op_t op;
    if (!op_begin(&op, pq)) return -ENOMEM;
    pq_node_t *x = pq->head;
    bool found = false;
    for (;;) {
        /* acquire: pairs with the CAS / fetch-or that wrote the link */
        uintptr_t nxt = pa__load_acquire(&x->next0);
        pq_node_t *y = unmark(nxt);
        if (y == pq->tail) break;
        if (op.indexed) {
            if (is_marked(nxt)) {
                (void)resolve_taken(&op, y); /* decide claimed nodes, as pop does */
                x = y;
                continue;
            }
            /* acquire: pairs with the CAS that set the state */
            if (pa__load_acquire(&y->state) != ST_QUEUED) {
                x = y; /* pending (not pushed yet) or cancelled */
                continue;
            }
        } else if (is_marked(nxt)) {
            x = y;
            continue;
        }
        if (item) node_to_item(y, item);
        found = true;
        break;
    }
    op_end(&op);
    return found ? 1 : 0;
}

int pa_pq_cancel(pa_pq_t *pq, uint64_t value) {
    if (!pq) return -EINVAL;
    if (!(pq->flags & PA_PQ_INDEXED)) return -ENOTSUP;
    pq_op_t op;
    if (!op_begin(&op, pq)) return -ENOMEM;
    int rc = -ENOENT;
    _Atomic uintptr_t *prev;
    pq_node_t *cur;
    if (index_find(&op, value, &prev, &cur)) {
        /* acquire: pairs with the CAS that set the state */
        uint32_t s = pa__load_acquire(&cur->state);
        while (s == ST_QUEUED) {
            /* acq_rel: the one CAS that decides between this cancel and a pop */
            if (pa__cas_strong_acq_rel(&cur->state, &s, ST_CANCELLED)) {
                size_add(&op, -1);
                index_remove(&op, cur);
                rc = 0;
                break;
            }
        }
        /* PENDING: the push has not happened yet (-ENOENT). Otherwise it is over. */
    }
    op_end(&op);
    return rc;
}

size_t pa_pq_size(const pa_pq_t *pq) {
    if (!pq) return 0;
    int64_t s = 0;
    for (int k = 0; k <= PQ_SIZE_SHARDS; k++) s += pa__load_relaxed(&((pa_pq_t *)pq)->size[k].n);
    return s > 0 ? (size_t)s : 0;
}
